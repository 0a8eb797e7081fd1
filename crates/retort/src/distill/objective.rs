//! Objectives: from a micro-batch of examples to the *summed* per-token loss the trainer
//! accumulates (gradient accumulation divides by the step's total target tokens).
//!
//! [`MicroBatch`] lays examples out right-padded (causal attention never lets a real token see
//! the padding after it, so no mask is needed) and lists the flat positions whose next token is a
//! completion token. Only those positions go through `lm_head`: the `[b, t, vocab]` logits are
//! never built for prompt or padding positions, for the student or the teacher.
//!
//! [`LossSpec`] is the closed set of objectives: `sft` (cross-entropy), `kd`
//! (`(1 - w) * sft + w * divergence(teacher, student)` per token, dense teacher logits computed
//! under no gradient, or the sparse top-k signal of an offline cache) and REDI.

use candle_core::{DType, Device, Tensor};
use retort_model::CausalLm;
use retort_model::train::gather_logprobs;

use crate::distill::data::Example;
use crate::distill::divergence::{Divergence, per_token};
use crate::distill::teacher::TeacherSignal;
use crate::error::Result;

/// Right-padded input ids and the positions that carry a loss.
#[derive(Debug, Clone)]
pub struct MicroBatch {
    /// `[b, len]` u32.
    pub input_ids: Tensor,
    /// `[n]` u32: flat indices `row * len + position` whose next token is a target.
    pub positions: Tensor,
    /// `[1, n]` u32: the target token at each of those positions.
    pub targets: Tensor,
    /// `n`: target tokens in the micro-batch.
    pub tokens: usize,
    /// Real (unpadded) tokens in the micro-batch.
    pub input_tokens: usize,
    /// The row of each target.
    pub target_rows: Vec<usize>,
    /// `verdict.correct` of each row.
    pub row_correct: Vec<Option<bool>>,
    /// The cached sparse teacher signal `[1, n, k]` of the targets (for [`LossSpec::KdCached`]).
    pub teacher: Option<TeacherSignal>,
    /// The teacher's log-probs `[1, n]` of the targets, from a server (for
    /// [`LossSpec::OnPolicyRewardScored`]).
    pub teacher_target_logprobs: Option<Tensor>,
}

impl MicroBatch {
    /// Lays out `examples`, padding with `pad_id`.
    pub fn new(examples: &[&Example], pad_id: u32, device: &Device) -> Result<Self> {
        let len = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(examples.len() * len);
        let mut positions = Vec::new();
        let mut targets = Vec::new();
        let mut input_tokens = 0;
        let mut target_rows = Vec::new();
        for (row, example) in examples.iter().enumerate() {
            input_tokens += example.ids.len();
            ids.extend_from_slice(&example.ids);
            ids.extend(std::iter::repeat_n(pad_id, len - example.ids.len()));
            // Position p predicts token p + 1; the first target is the first completion token.
            for p in example.prompt_len.saturating_sub(1)..example.ids.len().saturating_sub(1) {
                positions.push((row * len + p) as u32);
                targets.push(example.ids[p + 1]);
                target_rows.push(row);
            }
        }
        let tokens = targets.len();
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (examples.len(), len), device)?,
            positions: Tensor::from_vec(positions, tokens, device)?,
            targets: Tensor::from_vec(targets, (1, tokens), device)?,
            tokens,
            input_tokens,
            target_rows,
            row_correct: examples.iter().map(|e| e.correct).collect(),
            teacher: None,
            teacher_target_logprobs: None,
        })
    }
}

/// What the loss is.
#[derive(Debug, Clone, Copy)]
pub enum LossSpec<'a> {
    /// Cross-entropy on completion tokens.
    Sft,
    /// Token-level KD against a dense local teacher, mixed with SFT.
    Kd {
        /// The teacher (plain tensors; never trained).
        teacher: &'a CausalLm,
        /// The divergence.
        divergence: Divergence,
        /// Temperature dividing both logit sets.
        temperature: f64,
        /// `w` in `(1 - w) * sft + w * kd`.
        kd_weight: f64,
    },
    /// Token-level KD against the sparse top-k signal the micro-batch carries
    /// ([`MicroBatch::teacher`], from an offline cache), mixed with SFT.
    KdCached {
        /// The divergence.
        divergence: Divergence,
        /// Temperature dividing the student's logits (the signal is rescaled to it).
        temperature: f64,
        /// `w` in `(1 - w) * sft + w * kd`.
        kd_weight: f64,
    },
    /// On-policy distillation with the per-token reverse KL as a reward: on sequences the
    /// student sampled, `-sum_t sg(log p_teacher(x_t) - log p_student(x_t)) * log p_student(x_t)`
    /// (REINFORCE with discount 0). `kd_sum` reports `sum_t log p_student(x_t) - log
    /// p_teacher(x_t)`, the sampled estimate of the reverse KL.
    OnPolicyReward {
        /// The teacher that scores the sampled tokens.
        teacher: &'a CausalLm,
    },
    /// [`LossSpec::OnPolicyReward`] with the teacher's log-probs of the sampled tokens already
    /// in the micro-batch ([`MicroBatch::teacher_target_logprobs`], from a server).
    OnPolicyRewardScored,
    /// REDI: length-normalised log-likelihood of positive traces minus `negative_weight` times
    /// that of negative ones (every row needs a verdict). The normaliser is the number of
    /// sequences, not tokens.
    Redi {
        /// α: weight of the negative term (REDI's recommended 0.8).
        negative_weight: f64,
    },
}

/// One micro-batch's loss: the differentiable sum and its terms as numbers.
#[derive(Debug, Clone)]
pub struct LossTerms {
    /// Scalar: the sum over target tokens of the per-token loss (differentiable).
    pub sum: Tensor,
    /// What the sum is normalised by: target tokens (sequences for REDI).
    pub tokens: usize,
    /// Target tokens.
    pub target_tokens: usize,
    /// Sum of the per-token cross-entropy.
    pub sft_sum: f64,
    /// Sum of the per-token divergence (KD only).
    pub kd_sum: Option<f64>,
}

/// Logits `[1, n, vocab]` at the micro-batch's target positions.
pub fn logits_at_targets(model: &CausalLm, batch: &MicroBatch) -> Result<Tensor> {
    let hidden = model.forward_hidden(&batch.input_ids, None, None)?;
    let (b, t, h) = hidden.dims3()?;
    let selected = hidden
        .reshape((b * t, h))?
        .index_select(&batch.positions, 0)?
        .unsqueeze(0)?;
    Ok(model.lm_head(&selected)?)
}

/// The loss of `student` on `batch` under `spec`.
pub fn loss(student: &CausalLm, batch: &MicroBatch, spec: &LossSpec<'_>) -> Result<LossTerms> {
    if batch.tokens == 0 {
        let zero = Tensor::zeros((), DType::F32, student.device())?;
        return Ok(LossTerms {
            sum: zero,
            tokens: 0,
            target_tokens: 0,
            sft_sum: 0.0,
            kd_sum: None,
        });
    }
    let logits = logits_at_targets(student, batch)?;
    let scalar =
        |t: &Tensor| -> Result<f64> { Ok(t.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
    match *spec {
        LossSpec::Sft => {
            let sft = gather_logprobs(&logits, &batch.targets)?.neg()?;
            let sum = sft.sum_all()?;
            let sft_sum = scalar(&sum)?;
            Ok(LossTerms {
                sum,
                tokens: batch.tokens,
                target_tokens: batch.tokens,
                sft_sum,
                kd_sum: None,
            })
        }
        LossSpec::Kd {
            teacher,
            divergence,
            temperature,
            kd_weight,
        } => {
            let teacher_logits = logits_at_targets(teacher, batch)?.detach();
            // Padded vocabularies: the first min(V) logits (ids past the tokenizer never occur).
            let (tv, sv) = (teacher_logits.dim(2)?, logits.dim(2)?);
            let shared = tv.min(sv);
            let teacher_logits = if tv > shared {
                teacher_logits.narrow(2, 0, shared)?
            } else {
                teacher_logits
            };
            let logits = if sv > shared {
                logits.narrow(2, 0, shared)?
            } else {
                logits
            };
            let signal = TeacherSignal::dense(teacher_logits);
            kd_terms(&logits, batch, &signal, divergence, temperature, kd_weight)
        }
        LossSpec::KdCached {
            divergence,
            temperature,
            kd_weight,
        } => {
            let signal = batch.teacher.as_ref().ok_or_else(|| {
                crate::error::Error::Invalid(
                    "kd from a teacher cache: the micro-batch carries no cached signal".into(),
                )
            })?;
            kd_terms(&logits, batch, signal, divergence, temperature, kd_weight)
        }
        LossSpec::OnPolicyReward { .. } | LossSpec::OnPolicyRewardScored => {
            let student_logprobs = gather_logprobs(&logits, &batch.targets)?;
            let teacher_logprobs = match *spec {
                LossSpec::OnPolicyReward { teacher } => {
                    let teacher_logits = logits_at_targets(teacher, batch)?.detach();
                    gather_logprobs(&teacher_logits, &batch.targets)?
                }
                _ => batch
                    .teacher_target_logprobs
                    .as_ref()
                    .ok_or_else(|| {
                        crate::error::Error::Invalid(
                            "on-policy with a served teacher: the micro-batch carries no teacher \
                             log-probs"
                                .into(),
                        )
                    })?
                    .to_dtype(student_logprobs.dtype())?
                    .detach(),
            };
            let (per_token, reverse_kl) = reverse_kl_reward(&student_logprobs, &teacher_logprobs)?;
            Ok(LossTerms {
                sum: per_token.sum_all()?,
                tokens: batch.tokens,
                target_tokens: batch.tokens,
                sft_sum: -scalar(&student_logprobs)?,
                kd_sum: Some(scalar(&reverse_kl)?),
            })
        }
        LossSpec::Redi { negative_weight } => {
            let logprobs = gather_logprobs(&logits, &batch.targets)?;
            let rows = batch.row_correct.len();
            let mut lengths = vec![0usize; rows];
            for &row in &batch.target_rows {
                lengths[row] += 1;
            }
            let mut weights = Vec::with_capacity(batch.tokens);
            for &row in &batch.target_rows {
                let sign = match batch.row_correct[row] {
                    Some(true) => 1.0,
                    Some(false) => -negative_weight,
                    None => {
                        return Err(crate::error::Error::Invalid(
                            "redi: every record needs `verdict.correct`".into(),
                        ));
                    }
                };
                weights.push((sign / lengths[row] as f64) as f32);
            }
            let weights = Tensor::from_vec(weights, (1, batch.tokens), student.device())?;
            let sum = logprobs.mul(&weights)?.sum_all()?.neg()?;
            let sft_sum = -scalar(&logprobs)?;
            Ok(LossTerms {
                sum,
                tokens: lengths.iter().filter(|&&n| n > 0).count(),
                target_tokens: batch.tokens,
                sft_sum,
                kd_sum: None,
            })
        }
    }
}

/// The per-token policy-gradient loss of the reverse-KL reward and the per-token reverse KL
/// estimate, from the log-probs of the sampled tokens under the student (differentiable) and
/// the teacher: `advantage = sg(log p_teacher - log p_student)`, `loss = -advantage * log
/// p_student`, `reverse_kl = -advantage`.
///
/// In expectation over tokens drawn from the student, the loss's gradient is that of
/// `KL(student ‖ teacher)` (the score-function identity; tested below by exact enumeration).
pub fn reverse_kl_reward(
    student_logprobs: &Tensor,
    teacher_logprobs: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let advantage = (teacher_logprobs - student_logprobs.detach())?.detach();
    let loss = advantage.mul(student_logprobs)?.neg()?;
    Ok((loss, advantage.neg()?))
}

/// `(1 - w) * sft + w * divergence(signal, student)` summed over the targets.
fn kd_terms(
    logits: &Tensor,
    batch: &MicroBatch,
    signal: &TeacherSignal,
    divergence: Divergence,
    temperature: f64,
    kd_weight: f64,
) -> Result<LossTerms> {
    let scalar =
        |t: &Tensor| -> Result<f64> { Ok(t.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
    let kd = per_token(logits, signal, divergence, temperature)?;
    let kd_sum = scalar(&kd)?;
    let (sum, sft_sum) = if kd_weight >= 1.0 {
        // The SFT term has no weight: report it without keeping a graph for it.
        let sft = gather_logprobs(&logits.detach(), &batch.targets)?.neg()?;
        (kd.sum_all()?, scalar(&sft)?)
    } else {
        let sft = gather_logprobs(logits, &batch.targets)?.neg()?;
        let sft_sum = scalar(&sft)?;
        let mixed = (sft.affine(1.0 - kd_weight, 0.0)? + kd.affine(kd_weight, 0.0)?)?;
        (mixed.sum_all()?, sft_sum)
    };
    Ok(LossTerms {
        sum,
        tokens: batch.tokens,
        target_tokens: batch.tokens,
        sft_sum,
        kd_sum: Some(kd_sum),
    })
}

/// What the student's samples of one on-policy step looked like (DESIGN.md §5 diagnostics).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct SampleStats {
    /// Samples drawn.
    pub samples: usize,
    /// Mean new tokens per sample.
    pub mean_length: f64,
    /// Fraction cut at `max-new-tokens`.
    pub truncation_rate: f64,
    /// Fraction that ended with an EOS token.
    pub eos_rate: f64,
}

/// The student's own completions for the prompts of `examples` (GKD's on-policy sequences).
///
/// Row `i` samples with seed `seeds[i]`, so the samples are a pure function of the weights, the
/// prompts and the seeds (resume-exact). Empty samples are left out.
pub fn sample_completions(
    student: &retort_model::LoadedModel,
    examples: &[&Example],
    seeds: &[u64],
    max_new_tokens: usize,
    temperature: f64,
) -> Result<(Vec<Example>, SampleStats)> {
    let prompts: Vec<Vec<u32>> = examples
        .iter()
        .map(|e| e.ids[..e.prompt_len].to_vec())
        .collect();
    let eos_ids = student.eos_ids();
    let params = retort_model::GenerationParams {
        max_new_tokens,
        temperature,
        eos_ids: eos_ids.clone(),
        ..Default::default()
    };
    let generated = retort_model::generate::generate_with_seeds(
        &student.model,
        &student.tokenizer,
        &prompts,
        seeds,
        &params,
    )?;
    let mut out = Vec::with_capacity(examples.len());
    let mut stats = SampleStats {
        samples: generated.len(),
        ..SampleStats::default()
    };
    let (mut total, mut truncated, mut eos) = (0usize, 0usize, 0usize);
    for (example, sample) in examples.iter().zip(generated) {
        total += sample.token_ids.len();
        if sample.finish_reason == retort_model::FinishReason::Length {
            truncated += 1;
        }
        if sample
            .token_ids
            .last()
            .is_some_and(|id| eos_ids.contains(id))
        {
            eos += 1;
        }
        if sample.token_ids.is_empty() {
            continue;
        }
        let mut ids = example.ids[..example.prompt_len].to_vec();
        ids.extend_from_slice(&sample.token_ids);
        out.push(Example {
            ids,
            prompt_len: example.prompt_len,
            line: example.line,
            key: example.key.clone(),
            correct: None,
        });
    }
    let n = stats.samples.max(1) as f64;
    stats.mean_length = total as f64 / n;
    stats.truncation_rate = truncated as f64 / n;
    stats.eos_rate = eos as f64 / n;
    Ok((out, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Enumerating every token with its student probability as weight turns the sampled
    /// reward loss into its expectation, whose gradient must equal that of the exact reverse KL.
    #[test]
    fn reverse_kl_reward_is_an_unbiased_reverse_kl_gradient() -> Result<()> {
        let device = Device::Cpu;
        let student =
            candle_core::Var::from_vec(vec![0.3f64, -1.2, 2.0, 0.1, -0.4, 1.1], (1, 6), &device)?;
        let teacher = Tensor::new(&[[1.5f64, 0.2, -0.7, 0.9, 0.0, -2.0]], &device)?;
        let log_p = retort_model::train::log_softmax(student.as_tensor())?;
        let log_q = retort_model::train::log_softmax(&teacher)?;
        let (per_token, reverse_kl) = reverse_kl_reward(&log_p, &log_q)?;
        let weights = log_p.exp()?.detach();
        let expected_loss = per_token.mul(&weights)?.sum_all()?;
        let exact_kl = (log_p.exp()? * (&log_p - &log_q)?)?.sum_all()?;
        let g_reward = expected_loss.backward()?;
        let g_exact = exact_kl.backward()?;
        let (a, b) = (
            g_reward
                .get(student.as_tensor())
                .expect("a gradient")
                .flatten_all()?
                .to_vec1::<f64>()?,
            g_exact
                .get(student.as_tensor())
                .expect("a gradient")
                .flatten_all()?
                .to_vec1::<f64>()?,
        );
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        println!("reward vs exact reverse-KL gradient: max_abs_diff {diff:.3e}");
        assert!(diff < 1e-12, "{a:?} vs {b:?}");
        let estimate = reverse_kl.mul(&weights)?.sum_all()?.to_scalar::<f64>()?;
        assert!((estimate - exact_kl.to_scalar::<f64>()?).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn targets_are_the_completion_tokens() -> Result<()> {
        let a = Example {
            ids: vec![1, 2, 3, 4],
            prompt_len: 2,
            line: 1,
            key: "a".into(),
            correct: None,
        };
        let b = Example {
            ids: vec![5, 6, 7],
            prompt_len: 1,
            line: 2,
            key: "b".into(),
            correct: None,
        };
        let batch = MicroBatch::new(&[&a, &b], 0, &Device::Cpu)?;
        assert_eq!(
            batch.input_ids.to_vec2::<u32>()?,
            vec![vec![1, 2, 3, 4], vec![5, 6, 7, 0]]
        );
        // Row 0 predicts 3 (from p=1) and 4 (p=2); row 1 predicts 6 (p=0) and 7 (p=1).
        assert_eq!(batch.positions.to_vec1::<u32>()?, vec![1, 2, 4, 5]);
        assert_eq!(batch.targets.to_vec2::<u32>()?, vec![vec![3, 4, 6, 7]]);
        assert_eq!((batch.tokens, batch.input_tokens), (4, 7));
        Ok(())
    }
}
