//! A deterministic generator of word problems: a person starts with some items, then 1 to 4
//! gains or losses happen, one sentence each; the question asks how many items they have now.
//! The level is the number of operations. Every running total stays within 0..=99.

use std::collections::HashSet;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

const PEOPLE: &[(&str, &str)] = &[
    ("Mia", "She"),
    ("Leo", "He"),
    ("Ava", "She"),
    ("Noah", "He"),
    ("Zoe", "She"),
    ("Liam", "He"),
    ("Emma", "She"),
    ("Omar", "He"),
    ("Lily", "She"),
    ("Ivan", "He"),
    ("Nora", "She"),
    ("Sam", "He"),
    ("Ella", "She"),
    ("Ben", "He"),
    ("Ruby", "She"),
    ("Max", "He"),
    ("Iris", "She"),
    ("Tom", "He"),
    ("Maya", "She"),
    ("Eli", "He"),
];

const ITEMS: &[&str] = &[
    "apples", "marbles", "stickers", "books", "coins", "pencils", "cards", "shells", "stamps",
    "cookies", "balloons", "buttons", "candies", "toys", "plums", "rocks",
];

const GAINS: &[&str] = &[
    "buys {n} more {item}",
    "finds {n} more {item}",
    "wins {n} {item}",
    "gets {n} more {item}",
    "receives {n} {item}",
];
const LOSSES: &[&str] = &[
    "gives away {n} {item}",
    "sells {n} {item}",
    "loses {n} {item}",
    "eats {n} {item}",
    "trades away {n} {item}",
];

/// One operation: a gain (`+`) or a loss (`-`) of `amount` items.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    /// True for a gain.
    pub gain: bool,
    /// How many items.
    pub amount: u32,
}

/// A generated problem.
#[derive(Debug, Clone, PartialEq)]
pub struct WorldProblem {
    /// Stable id: `{prefix}-{index}`.
    pub id: String,
    /// The word problem.
    pub question: String,
    /// Starting count.
    pub start: u32,
    /// The operations in order.
    pub ops: Vec<Op>,
    /// The final count.
    pub answer: u32,
}

impl WorldProblem {
    /// Number of operations.
    pub fn level(&self) -> usize {
        self.ops.len()
    }

    /// The model prompt: `Q: {question}\nA:`.
    pub fn prompt(&self) -> String {
        format!("Q: {}\nA:", self.question)
    }

    /// A problem record for the pipeline (`id`, `prompt`, `answer`, `level`).
    pub fn to_record(&self) -> Value {
        json!({ "id": self.id, "prompt": self.prompt(), "answer": self.answer.to_string(), "level": self.level() })
    }

    /// Running totals after each operation.
    pub fn totals(&self) -> Vec<u32> {
        let mut total = self.start;
        self.ops
            .iter()
            .map(|op| {
                total = if op.gain {
                    total + op.amount
                } else {
                    total - op.amount
                };
                total
            })
            .collect()
    }
}

fn sample_problem(rng: &mut ChaCha8Rng, level: usize) -> (u32, Vec<Op>) {
    loop {
        let start = rng.random_range(2..=60u32);
        let mut total = start;
        let mut ops = Vec::with_capacity(level);
        for _ in 0..level {
            let gain = rng.random_bool(0.5);
            let amount = rng.random_range(1..=30u32);
            let next = if gain {
                total + amount
            } else {
                total.wrapping_sub(amount)
            };
            if (gain && next > 99) || (!gain && amount > total) {
                break;
            }
            total = next;
            ops.push(Op { gain, amount });
        }
        if ops.len() == level {
            return (start, ops);
        }
    }
}

fn render(rng: &mut ChaCha8Rng, start: u32, ops: &[Op]) -> String {
    let (name, pronoun) = PEOPLE[rng.random_range(0..PEOPLE.len())];
    let item = ITEMS[rng.random_range(0..ITEMS.len())];
    let mut text = format!("{name} has {start} {item}.");
    for (i, op) in ops.iter().enumerate() {
        let templates = if op.gain { GAINS } else { LOSSES };
        let phrase = templates[rng.random_range(0..templates.len())]
            .replace("{n}", &op.amount.to_string())
            .replace("{item}", item);
        let subject = if i == 0 {
            pronoun.to_string()
        } else {
            format!("Then {}", pronoun.to_lowercase())
        };
        text.push_str(&format!(" {subject} {phrase}."));
    }
    text.push_str(&format!(" How many {item} does {name} have now?"));
    text
}

/// `count` problems per level in `levels`, from `seed`, with ids `{prefix}-{n}`. Questions are
/// unique within the set and never in `exclude` (so train and held-out sets never share one).
pub fn generate_problems(
    seed: u64,
    levels: &[usize],
    count_per_level: usize,
    prefix: &str,
    exclude: &HashSet<String>,
) -> Vec<WorldProblem> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(levels.len() * count_per_level);
    for &level in levels {
        let mut made = 0;
        let mut attempts = 0usize;
        while made < count_per_level && attempts < count_per_level * 1000 + 1000 {
            attempts += 1;
            let (start, ops) = sample_problem(&mut rng, level.max(1));
            let question = render(&mut rng, start, &ops);
            if exclude.contains(&question) || !seen.insert(question.clone()) {
                continue;
            }
            let mut problem = WorldProblem {
                id: String::new(),
                question,
                start,
                ops,
                answer: 0,
            };
            problem.answer = problem.totals().last().copied().unwrap_or(start);
            problem.id = format!("{prefix}-{}", out.len());
            out.push(problem);
            made += 1;
        }
    }
    out
}

/// The training problems of levels 1-4 for `seed` (what `retort world train` trains on).
pub fn training_problems(seed: u64, per_level: usize) -> Vec<WorldProblem> {
    generate_problems(seed, &[1, 2, 3, 4], per_level, "train", &Default::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_bounded_and_disjoint() {
        let a = generate_problems(1, &[1, 2, 3, 4], 50, "train", &HashSet::new());
        let b = generate_problems(1, &[1, 2, 3, 4], 50, "train", &HashSet::new());
        assert_eq!(a, b);
        assert_eq!(a.len(), 200);
        for p in &a {
            assert!(p.totals().iter().all(|&t| t <= 99));
            assert!((2..=60).contains(&p.start));
            assert!(p.ops.iter().all(|o| (1..=30).contains(&o.amount)));
            assert!(p.question.ends_with("have now?"));
        }
        let exclude: HashSet<String> = a.iter().map(|p| p.question.clone()).collect();
        let held = generate_problems(2, &[1, 2, 3, 4], 50, "test", &exclude);
        assert!(held.iter().all(|p| !exclude.contains(&p.question)));
        assert_eq!(held.iter().filter(|p| p.level() == 4).count(), 50);
    }
}
