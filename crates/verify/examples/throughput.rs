//! Verify throughput on one core over the public math-verify cases.
//!
//! Run: `cargo run -p retort-verify --release --example throughput [ROUNDS]`.

use retort_verify::{VerifyOptions, verify};
use std::time::Instant;

const CASES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../../shared/data/verify/mathverify-tests.jsonl"
);

fn main() {
    let text = fs_err::read_to_string(CASES).unwrap_or_else(|e| panic!("{CASES}: {e}"));
    let pairs: Vec<(String, String)> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("valid JSON line");
            (
                v["pred"].as_str().unwrap_or("").to_string(),
                v["gold"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let opts = VerifyOptions::default();
    let mut correct = 0usize;
    let start = Instant::now();
    for _ in 0..rounds {
        for (pred, gold) in &pairs {
            correct += usize::from(verify(pred, gold, &opts).correct);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let n = rounds * pairs.len();
    println!(
        "{n} pairs in {secs:.3} s: {:.0} pairs/s on one core ({correct} judged correct)",
        n as f64 / secs
    );
}
