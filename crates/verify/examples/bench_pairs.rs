//! The `retort bench` verify figure without building the workspace: the same loop as
//! `retort::bench::bench_verify` (ten passes of [`verify`] over ~300 generated pairs per timed
//! iteration, one thread, median of the iterations) over the same pair shapes as
//! `retort::bench::verify_pairs`. The generator is a local xorshift instead of ChaCha8, so the
//! numbers differ from the real ones but not the mix of shapes.
//!
//! Run: `cargo run -p retort-verify --release --example bench_pairs [SECONDS]`.

use retort_verify::{VerifyOptions, verify};
use std::time::Instant;

const PASSES: usize = 10;

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn range(&mut self, low: i64, high: i64) -> i64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        low + (x % (high - low) as u64) as i64
    }
}

fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// A copy of `retort::bench::verify_pairs` (shapes, prose and answer phrasings).
fn pairs() -> Vec<(String, String)> {
    let mut rng = Rng(0xBE4C);
    let mut pairs = Vec::with_capacity(300);
    for index in 0..300usize {
        let a = rng.range(2, 60);
        let b = rng.range(2, 40);
        let (gold, answer): (String, String) = match index % 22 {
            0 => (a.to_string(), a.to_string()),
            1 => ((a * 1_000_003).to_string(), thousands(a * 1_000_003)),
            2 => (format!("\\frac{{{a}}}{{{b}}}"), format!("{a}/{b}")),
            3 => ("0.5".into(), "\\frac{1}{2}".into()),
            4 => (
                format!("{b}\\sqrt{{3}}"),
                format!("\\sqrt{{{}}}", 3 * b * b),
            ),
            5 => (format!("{b}\\%"), format!("{}", b as f64 / 100.0)),
            6 => (format!("({a}, {b})"), format!("({a},{b})")),
            7 => (format!("[{b}, {a})"), format!("[{b},{a})")),
            8 => (
                format!("x^2 + {}x + {}", 2 * b, b * b),
                format!("(x+{b})^2"),
            ),
            9 => (format!("\\frac{{\\pi}}{{{b}}}"), format!("\\pi/{b}")),
            10 => ("B".into(), "(B)".into()),
            11 => (a.to_string(), (a + 1).to_string()),
            12 => (a.to_string(), format!("{a} \\text{{ cm}}")),
            13 => (
                format!("\\{{{a}, {b}, {}\\}}", a + b),
                format!("\\{{{}, {b}, {a}\\}}", a + b),
            ),
            14 => (a.to_string(), String::new()),
            15 => (format!("x^2 - {}", b * b), format!("x^2 + {}", b * b)),
            16 => ("-\\frac{3}{4}".into(), "-0.75".into()),
            17 => (format!("{b}"), format!("{b}^\\circ")),
            18 => (format!("y = {a}x + {b}"), format!("y={a}x+{b}")),
            19 => (
                format!("\\begin{{pmatrix}} {a} \\\\ {b} \\end{{pmatrix}}"),
                format!("\\begin{{pmatrix}}{a}\\\\{b}\\end{{pmatrix}}"),
            ),
            20 => (format!("{a}.{b}"), format!("{a}.{b}0")),
            _ => (
                format!("\\frac{{{a}\\sqrt{{2}}}}{{{b}}}"),
                format!("{a}\\sqrt{{2}}/{b}"),
            ),
        };
        let mut response = String::new();
        for step in 0..rng.range(1, 10) {
            let (x, y) = (rng.range(1, 500), rng.range(1, 90));
            response.push_str(&match step % 4 {
                0 => format!("First, we compute ${x} + {y} = {}$. ", x + y),
                1 => format!("Then multiplying gives ${x} \\times {y} = {}$. ", x * y),
                2 => format!("So $\\frac{{{x}}}{{{y}}}$ is the ratio we need. "),
                _ => format!("Subtracting, {x} - {y} = {}, which we keep.\n\n", x - y),
            });
        }
        if answer.is_empty() {
            response.push_str("Now we need to check the remaining case, where");
        } else {
            response.push_str(&match index % 4 {
                0 => format!("Therefore, the final answer is $\\boxed{{{answer}}}$."),
                1 => format!("**Final Answer**\n\\[\n\\boxed{{{answer}}}\n\\]"),
                2 => format!("The answer is {answer}."),
                _ => format!("Answer: ${answer}$"),
            });
        }
        pairs.push((response, gold));
    }
    pairs
}

fn main() {
    let seconds: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let pairs = pairs();
    let opts = VerifyOptions::default();
    let mut correct = 0usize;
    let mut pass = || {
        correct = 0;
        for _ in 0..PASSES {
            for (response, gold) in &pairs {
                correct += usize::from(verify(response, gold, &opts).correct);
            }
        }
    };
    pass();
    let start = Instant::now();
    let mut times = Vec::new();
    while times.len() < 5 || start.elapsed().as_secs_f64() < seconds {
        let t0 = Instant::now();
        pass();
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let per_iter = pairs.len() * PASSES;
    println!(
        "{:.0} pairs/s (median of {} iterations of {per_iter} pairs; {:.3} correct)",
        per_iter as f64 / median,
        times.len(),
        correct as f64 / per_iter as f64
    );
}
