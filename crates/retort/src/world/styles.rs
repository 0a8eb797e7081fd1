//! Solution styles. The teacher writes one equation per step with its intermediate result
//! (`12 + 7 = 19. 19 - 5 = 14. The answer is 14.`); the base student's word-problem data skips
//! the intermediate results (`12 + 7 - 5 = 14. The answer is 14.`) but it also sees bare chains
//! solved step by step and single-step drills, so it owns the skill without using it on words.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::problems::{Op, WorldProblem, generate_problems};

fn sign(op: &Op) -> char {
    if op.gain { '+' } else { '-' }
}

fn stepwise(start: u32, ops: &[Op]) -> String {
    let mut total = start;
    let mut text = String::new();
    for op in ops {
        let next = if op.gain {
            total + op.amount
        } else {
            total - op.amount
        };
        text.push_str(&format!(" {total} {} {} = {next}.", sign(op), op.amount));
        total = next;
    }
    text.push_str(&format!(" The answer is {total}."));
    text
}

/// The teacher's solution (the completion after `A:`), without the end-of-text token.
pub fn teacher_solution(problem: &WorldProblem) -> String {
    stepwise(problem.start, &problem.ops)
}

/// The terse style: the whole chain in one equation.
pub fn terse_solution(problem: &WorldProblem) -> String {
    let chain: String = problem
        .ops
        .iter()
        .map(|op| format!(" {} {}", sign(op), op.amount))
        .collect();
    format!(
        " {}{chain} = {}. The answer is {}.",
        problem.start, problem.answer, problem.answer
    )
}

/// The base student's pre-training corpus: (prompt, completion) pairs mixing terse word-problem
/// solutions, bare chains solved step by step (30%) and single-step drills (15%).
pub fn student_corpus(seed: u64, problems: &[WorldProblem]) -> Vec<(String, String)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let chains = generate_problems(
        seed ^ 0x5eed,
        &[1, 2, 3, 4],
        problems.len() / 4 + 1,
        "chain",
        &Default::default(),
    );
    let mut out = Vec::with_capacity(problems.len() * 2);
    for (i, problem) in problems.iter().enumerate() {
        let roll: f64 = rng.random();
        if roll < 0.30 {
            let chain = &chains[i % chains.len()];
            let expr: String = chain
                .ops
                .iter()
                .map(|op| format!(" {} {}", sign(op), op.amount))
                .collect();
            out.push((
                format!("Q: Compute {}{expr}.\nA:", chain.start),
                stepwise(chain.start, &chain.ops),
            ));
        } else if roll < 0.45 {
            let a = rng.random_range(1..=60u32);
            let gain = rng.random_bool(0.5);
            let b = if gain {
                rng.random_range(1..=30u32.min(99 - a).max(1))
            } else {
                rng.random_range(1..=a.min(30))
            };
            let op = Op { gain, amount: b };
            out.push((
                format!("Q: Compute {a} {} {b}.\nA:", sign(&op)),
                stepwise(a, &[op]),
            ));
        } else {
            out.push((problem.prompt(), terse_solution(problem)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn styles_render_as_documented() {
        let p = WorldProblem {
            id: "x".into(),
            question: "q".into(),
            start: 12,
            ops: vec![
                Op {
                    gain: true,
                    amount: 7,
                },
                Op {
                    gain: false,
                    amount: 5,
                },
            ],
            answer: 14,
        };
        assert_eq!(
            teacher_solution(&p),
            " 12 + 7 = 19. 19 - 5 = 14. The answer is 14."
        );
        assert_eq!(terse_solution(&p), " 12 + 7 - 5 = 14. The answer is 14.");
        let problems = generate_problems(3, &[1, 2, 3, 4], 100, "t", &Default::default());
        let corpus = student_corpus(3, &problems);
        assert_eq!(corpus.len(), problems.len());
        let chains = corpus
            .iter()
            .filter(|(p, _)| p.starts_with("Q: Compute"))
            .count();
        assert!((100..=220).contains(&chains), "{chains}");
    }
}
