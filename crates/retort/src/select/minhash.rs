//! Near-duplicate detection: MinHash signatures over word shingles and locality-sensitive hashing
//! by bands ([`NearDuplicates`]), plus the text normalisation and hashing shared with exact
//! deduplication and decontamination.
//!
//! Everything is seeded and deterministic: the `i`-th MinHash function is a SplitMix64 mix of the
//! shingle's hash with a per-function key drawn from the seed, so the same seed gives the same
//! signatures on every machine. Two texts are near-duplicates when the fraction of equal signature
//! entries (an unbiased estimate of their shingle-set Jaccard similarity) reaches the threshold;
//! LSH only chooses which pairs to compare.

use std::collections::HashMap;

/// SplitMix64's finaliser: a fast, well-mixed 64-bit permutation.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a of `bytes` (stable across platforms and Rust versions, unlike `DefaultHasher`).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Lower-cased alphanumeric words of `text` (everything else separates words).
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// Hash of each word (see [`words`]).
pub fn word_hashes(text: &str) -> Vec<u64> {
    words(text).iter().map(|w| fnv1a(w.as_bytes())).collect()
}

/// Hash of a run of word hashes (order-sensitive).
pub fn hash_run(run: &[u64]) -> u64 {
    run.iter()
        .fold(0x51_7CC1_B727_220A, |h, &w| mix64(h ^ w).rotate_left(5))
}

/// Whitespace collapsed and lower-cased: the key of exact deduplication.
pub fn normalise(text: &str) -> String {
    text.split_whitespace()
        .map(str::to_lowercase)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Hashes of the `k`-word shingles of `text` (the whole text as one shingle when it is shorter).
pub fn shingles(text: &str, k: usize) -> Vec<u64> {
    let hashes = word_hashes(text);
    let k = k.max(1);
    if hashes.is_empty() {
        return Vec::new();
    }
    if hashes.len() <= k {
        return vec![hash_run(&hashes)];
    }
    let mut out: Vec<u64> = hashes.windows(k).map(hash_run).collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Bands and rows per band for `num_perm` hash functions and a Jaccard `threshold`: the split
/// that minimises the sum of the false-positive area (below the threshold) and false-negative
/// area (above it) of the LSH candidate curve `1 - (1 - s^r)^b`.
pub fn choose_bands(num_perm: usize, threshold: f64) -> (usize, usize) {
    let num_perm = num_perm.max(1);
    let probability = |s: f64, b: usize, r: usize| 1.0 - (1.0 - s.powi(r as i32)).powi(b as i32);
    let area = |lo: f64, hi: f64, f: &dyn Fn(f64) -> f64| {
        let steps = 200;
        let dx = (hi - lo) / steps as f64;
        (0..steps)
            .map(|i| f(lo + (i as f64 + 0.5) * dx) * dx)
            .sum::<f64>()
    };
    let mut best = (1, num_perm);
    let mut best_error = f64::INFINITY;
    for b in 1..=num_perm {
        let r = num_perm / b;
        if r == 0 {
            break;
        }
        let fp = area(0.0, threshold, &|s| probability(s, b, r));
        let fneg = area(threshold, 1.0, &|s| 1.0 - probability(s, b, r));
        if fp + fneg < best_error {
            best_error = fp + fneg;
            best = (b, r);
        }
    }
    best
}

/// MinHash signatures with an LSH index over the texts inserted so far.
#[derive(Debug)]
pub struct NearDuplicates {
    keys: Vec<u64>,
    bands: usize,
    rows: usize,
    threshold: f64,
    shingle: usize,
    signatures: Vec<Vec<u64>>,
    buckets: HashMap<(usize, u64), Vec<usize>>,
}

impl NearDuplicates {
    /// An empty index: `num_perm` hash functions seeded by `seed`, `shingle`-word shingles,
    /// near-duplicates at estimated Jaccard ≥ `threshold`.
    pub fn new(num_perm: usize, shingle: usize, threshold: f64, seed: u64) -> Self {
        let num_perm = num_perm.max(1);
        let keys = (0..num_perm as u64)
            .map(|i| mix64(seed ^ mix64(i.wrapping_add(0xA5A5))))
            .collect();
        let (bands, rows) = choose_bands(num_perm, threshold);
        Self {
            keys,
            bands,
            rows,
            threshold,
            shingle,
            signatures: Vec::new(),
            buckets: HashMap::new(),
        }
    }

    /// The MinHash signature of `text`; `None` when it has no word.
    pub fn signature(&self, text: &str) -> Option<Vec<u64>> {
        let shingles = shingles(text, self.shingle);
        if shingles.is_empty() {
            return None;
        }
        Some(
            self.keys
                .iter()
                .map(|&key| {
                    shingles
                        .iter()
                        .map(|&s| mix64(s ^ key))
                        .min()
                        .unwrap_or(u64::MAX)
                })
                .collect(),
        )
    }

    /// Estimated Jaccard similarity of two signatures: the fraction of equal entries.
    pub fn similarity(a: &[u64], b: &[u64]) -> f64 {
        if a.is_empty() || a.len() != b.len() {
            return 0.0;
        }
        a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64
    }

    /// The most similar earlier text at or above the threshold (its insertion index and the
    /// estimated similarity), or `None`; when `None`, `text` is inserted. Texts without words
    /// are never duplicates and are not inserted.
    pub fn check_and_insert(&mut self, text: &str) -> Option<(usize, f64)> {
        let signature = self.signature(text)?;
        let band_keys: Vec<u64> = (0..self.bands)
            .map(|b| hash_run(&signature[b * self.rows..(b + 1) * self.rows]))
            .collect();
        let mut best: Option<(usize, f64)> = None;
        let mut seen = Vec::new();
        for (band, key) in band_keys.iter().enumerate() {
            for &candidate in self
                .buckets
                .get(&(band, *key))
                .map(Vec::as_slice)
                .unwrap_or(&[])
            {
                if seen.contains(&candidate) {
                    continue;
                }
                seen.push(candidate);
                let s = Self::similarity(&signature, &self.signatures[candidate]);
                if s >= self.threshold && best.is_none_or(|(_, b)| s > b) {
                    best = Some((candidate, s));
                }
            }
        }
        if best.is_none() {
            let index = self.signatures.len();
            for (band, key) in band_keys.into_iter().enumerate() {
                self.buckets.entry((band, key)).or_default().push(index);
            }
            self.signatures.push(signature);
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_put_the_threshold_near_the_curve_midpoint() {
        let (b, r) = choose_bands(128, 0.8);
        assert!(b * r <= 128);
        let knee = (1.0 / b as f64).powf(1.0 / r as f64);
        assert!((knee - 0.8).abs() < 0.1, "b={b} r={r} knee={knee}");
    }

    #[test]
    fn signatures_estimate_jaccard() {
        let index = NearDuplicates::new(256, 1, 0.5, 7);
        // Word sets {a..t} vs {a..p, w, x, y, z}: Jaccard 16/24.
        let a = "a b c d e f g h i j k l m n o p q r s t";
        let b = "a b c d e f g h i j k l m n o p w x y z";
        let s =
            NearDuplicates::similarity(&index.signature(a).unwrap(), &index.signature(b).unwrap());
        assert!((s - 16.0 / 24.0).abs() < 0.1, "{s}");
        assert_eq!(
            index.signature(a),
            NearDuplicates::new(256, 1, 0.5, 7).signature(a)
        );
        assert!(index.signature(" ,. ").is_none());
    }

    #[test]
    fn normalisation() {
        assert_eq!(normalise("  The  Answer\nis 5 "), "the answer is 5");
        assert_eq!(words("x=3.5, Y!"), ["x", "3", "5", "y"]);
        assert_eq!(shingles("a b", 5).len(), 1);
        assert_eq!(shingles("a b c d", 2).len(), 3);
    }
}
