//! Choosing the next token from one row of logits: greedy [`argmax`] or [`sample`] with
//! temperature, top-k and top-p (applied in that order, as transformers does).

use rand::Rng;

use crate::error::{Error, Result};

/// How to pick a token from logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f64,
    /// Nucleus mass in (0, 1]; 1 disables it.
    pub top_p: f64,
    /// Keep only the k most likely tokens; `None` or 0 disables it.
    pub top_k: Option<usize>,
}

impl SamplingParams {
    /// Rejects negative or non-finite temperatures and top-p outside (0, 1].
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::invalid(format!(
                "`temperature` must be >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid(format!(
                "`top_p` must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// Index of the largest logit (the first one on ties, like `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_val = f32::NEG_INFINITY;
    for (i, &x) in logits.iter().enumerate() {
        if x > best_val {
            best = i;
            best_val = x;
        }
    }
    best as u32
}

/// Picks a token: greedy when `temperature == 0`, else samples from the filtered softmax.
pub fn sample(logits: &[f32], params: &SamplingParams, rng: &mut impl Rng) -> u32 {
    if params.temperature == 0.0 || logits.len() <= 1 {
        return argmax(logits);
    }
    let candidates = filtered_probs(logits, params);
    let u: f64 = rng.random::<f64>();
    let mut acc = 0.0f64;
    for &(id, p) in &candidates {
        acc += p;
        if u < acc {
            return id;
        }
    }
    candidates
        .last()
        .map_or_else(|| argmax(logits), |&(id, _)| id)
}

/// The tokens that survive top-k and top-p with their renormalised probabilities, most
/// likely first.
pub fn filtered_probs(logits: &[f32], params: &SamplingParams) -> Vec<(u32, f64)> {
    let inv_t = 1.0 / params.temperature;
    let mut items: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .filter(|(_, x)| x.is_finite())
        .map(|(i, &x)| (i as u32, f64::from(x) * inv_t))
        .collect();
    if items.is_empty() {
        return vec![(argmax(logits), 1.0)];
    }
    let by_logit_desc = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    match params.top_k {
        Some(k) if k > 0 && k < items.len() => {
            // Partition then sort only the k kept entries.
            items.select_nth_unstable_by(k - 1, by_logit_desc);
            items.truncate(k);
            items.sort_unstable_by(by_logit_desc);
        }
        _ => items.sort_unstable_by(by_logit_desc),
    }
    let max = items[0].1;
    let mut total = 0.0;
    for it in &mut items {
        it.1 = (it.1 - max).exp();
        total += it.1;
    }
    for it in &mut items {
        it.1 /= total;
    }
    if params.top_p < 1.0 {
        // Smallest prefix whose mass reaches top_p (at least one token).
        let mut acc = 0.0;
        let mut keep = items.len();
        for (i, it) in items.iter().enumerate() {
            acc += it.1;
            if acc >= params.top_p {
                keep = i + 1;
                break;
            }
        }
        items.truncate(keep.max(1));
        let mass: f64 = items.iter().map(|it| it.1).sum();
        for it in &mut items {
            it.1 /= mass;
        }
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    const LOGITS: [f32; 5] = [1.0, 3.0, 2.0, 0.5, 2.9];

    #[test]
    fn greedy_is_argmax() {
        let p = SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: None,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(sample(&LOGITS, &p, &mut rng), 1);
        assert_eq!(argmax(&[2.0, 2.0]), 0);
    }

    #[test]
    fn top_k_keeps_k_most_likely() {
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: Some(2),
        };
        let kept: Vec<u32> = filtered_probs(&LOGITS, &p).iter().map(|x| x.0).collect();
        assert_eq!(kept, vec![1, 4]);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for _ in 0..200 {
            assert!(matches!(sample(&LOGITS, &p, &mut rng), 1 | 4));
        }
    }

    #[test]
    fn top_p_keeps_smallest_prefix() {
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            top_k: None,
        };
        let probs = filtered_probs(&LOGITS, &p);
        // p(1) ~ 0.38, p(4) ~ 0.34: two tokens reach 0.5.
        assert_eq!(probs.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 4]);
        assert!((probs.iter().map(|x| x.1).sum::<f64>() - 1.0).abs() < 1e-12);
        let tiny = SamplingParams {
            temperature: 1.0,
            top_p: 1e-6,
            top_k: None,
        };
        assert_eq!(filtered_probs(&LOGITS, &tiny).len(), 1);
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: None,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut counts = [0usize; 5];
        let n = 20_000;
        for _ in 0..n {
            counts[sample(&LOGITS, &p, &mut rng) as usize] += 1;
        }
        let probs = filtered_probs(&LOGITS, &p);
        for (id, prob) in probs {
            let freq = counts[id as usize] as f64 / n as f64;
            assert!((freq - prob).abs() < 0.02, "token {id}: {freq} vs {prob}");
        }
    }
}
