//! Accuracy of a world model: greedy, batched generation on held-out problems, each response
//! verified ("The answer is N.") against the gold answer, reported per level.

use std::collections::HashSet;

use retort_model::engine::{EngineOptions, Request};
use retort_model::generate::{GenerationParams, generate_all};
use retort_model::{CausalLm, Tokenizer};
use serde::Serialize;

use super::EOS;
use super::problems::{WorldProblem, generate_problems, training_problems};
use crate::{Error, Result};

/// Added to the training seed to draw held-out problems.
pub const HELD_OUT_SEED_OFFSET: u64 = 1_000_003;

/// `per_level` held-out problems for each of levels 1-5 (5 is harder than any training problem),
/// from another seed than the training problems of `train_seed` and sharing no question with the
/// first `train_per_level` of them per level. Ids are `heldout-N`.
pub fn held_out_problems(
    train_seed: u64,
    train_per_level: usize,
    per_level: usize,
) -> Vec<WorldProblem> {
    let exclude: HashSet<String> = training_problems(train_seed, train_per_level)
        .into_iter()
        .map(|p| p.question)
        .collect();
    generate_problems(
        train_seed.wrapping_add(HELD_OUT_SEED_OFFSET),
        &[1, 2, 3, 4, 5],
        per_level,
        "heldout",
        &exclude,
    )
}

/// Accuracy on one level.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LevelAccuracy {
    /// Number of operations.
    pub level: usize,
    /// Problems.
    pub problems: usize,
    /// Verified correct.
    pub correct: usize,
    /// `correct / problems`.
    pub accuracy: f64,
}

/// One problem's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct ProblemResult {
    /// The problem id.
    pub id: String,
    /// Its level.
    pub level: usize,
    /// The generated completion.
    pub response: String,
    /// Whether it verified.
    pub correct: bool,
}

/// Accuracy per level and over levels 1-4 (the training levels).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalReport {
    /// Accuracy over the problems of levels 1-4.
    pub accuracy: f64,
    /// Per level, ascending.
    pub levels: Vec<LevelAccuracy>,
    /// Every problem's outcome, in input order.
    #[serde(skip)]
    pub results: Vec<ProblemResult>,
}

impl EvalReport {
    /// The accuracy on `level`, if it was evaluated.
    pub fn level(&self, level: usize) -> Option<f64> {
        self.levels
            .iter()
            .find(|l| l.level == level)
            .map(|l| l.accuracy)
    }
}

/// Greedy answers of `model` to `problems`, verified against gold: each level's problems go to
/// the generation engine at once (`batch_size` sequences in flight, 0 for the engine's default),
/// with `16 · level + 32` new tokens at most.
pub fn accuracy(
    model: &CausalLm,
    tokenizer: &Tokenizer,
    problems: &[WorldProblem],
    batch_size: usize,
) -> Result<EvalReport> {
    let eos = tokenizer.token_to_id(EOS).ok_or_else(|| {
        Error::Invalid(format!(
            "tokenizer `{}` has no `{EOS}`",
            tokenizer.path().display()
        ))
    })?;
    let mut levels: Vec<usize> = problems.iter().map(WorldProblem::level).collect();
    levels.sort_unstable();
    levels.dedup();
    let mut by_index: Vec<Option<ProblemResult>> = vec![None; problems.len()];
    for level in levels {
        let chosen: Vec<usize> = (0..problems.len())
            .filter(|&i| problems[i].level() == level)
            .collect();
        let requests = chosen
            .iter()
            .map(|&i| {
                Ok(Request {
                    prompt: tokenizer.encode(&problems[i].prompt(), false)?,
                    seed: 0,
                    stream: i as u64,
                })
            })
            .collect::<retort_model::Result<Vec<_>>>()?;
        let params = GenerationParams {
            max_new_tokens: 16 * level + 32,
            eos_ids: vec![eos],
            ..Default::default()
        };
        let options = EngineOptions {
            max_seqs: batch_size,
            ..EngineOptions::default()
        };
        let (outputs, _) = generate_all(model, tokenizer, &requests, &params, &options)?;
        for (&i, output) in chosen.iter().zip(outputs) {
            let problem = &problems[i];
            let verdict = retort_verify::verify(
                &output.text,
                &problem.answer.to_string(),
                &Default::default(),
            );
            by_index[i] = Some(ProblemResult {
                id: problem.id.clone(),
                level: problem.level(),
                response: output.text,
                correct: verdict.correct,
            });
        }
    }
    let results = by_index.into_iter().flatten().collect();
    Ok(report(results))
}

fn report(results: Vec<ProblemResult>) -> EvalReport {
    let mut levels: Vec<usize> = results.iter().map(|r| r.level).collect();
    levels.sort_unstable();
    levels.dedup();
    let levels: Vec<LevelAccuracy> = levels
        .into_iter()
        .map(|level| {
            let problems = results.iter().filter(|r| r.level == level).count();
            let correct = results
                .iter()
                .filter(|r| r.level == level && r.correct)
                .count();
            LevelAccuracy {
                level,
                problems,
                correct,
                accuracy: correct as f64 / problems.max(1) as f64,
            }
        })
        .collect();
    let train: Vec<&LevelAccuracy> = levels
        .iter()
        .filter(|l| (1..=4).contains(&l.level))
        .collect();
    let (correct, total) = train
        .iter()
        .fold((0, 0), |(c, n), l| (c + l.correct, n + l.problems));
    EvalReport {
        accuracy: correct as f64 / total.max(1) as f64,
        levels,
        results,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::styles::teacher_solution;
    use crate::world::train::{DEFAULT_SEED, TRAIN_PER_LEVEL};

    fn assets(name: &str) -> String {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../assets/world/").to_string() + name
    }

    #[test]
    fn held_out_is_disjoint_from_training() {
        let train: HashSet<String> = training_problems(4, 30)
            .into_iter()
            .map(|p| p.question)
            .collect();
        let held = held_out_problems(4, 30, 10);
        assert_eq!(held.len(), 50);
        assert!(held.iter().all(|p| !train.contains(&p.question)));
        assert_eq!(held.iter().filter(|p| p.level() == 5).count(), 10);
    }

    #[test]
    fn report_counts_per_level() {
        let result = |level, correct| ProblemResult {
            id: String::new(),
            level,
            response: String::new(),
            correct,
        };
        let r = report(vec![
            result(1, true),
            result(1, false),
            result(2, true),
            result(5, false),
        ]);
        assert_eq!(r.level(1), Some(0.5));
        assert_eq!(r.level(5), Some(0.0));
        assert!((r.accuracy - 2.0 / 3.0).abs() < 1e-12);
    }

    /// Mean loss per completion token of `model` on the teacher solutions of `problems`.
    fn teacher_style_loss(loaded: &retort_model::LoadedModel, problems: &[WorldProblem]) -> f64 {
        use crate::world::train::encode_examples;
        let pairs: Vec<(String, String)> = problems
            .iter()
            .map(|p| (p.prompt(), teacher_solution(p)))
            .collect();
        let examples = encode_examples(&loaded.tokenizer, &pairs).expect("encode");
        let (mut sum, mut count) = (0.0, 0);
        for example in &examples {
            let ids = candle_core::Tensor::new(example.ids.as_slice(), &candle_core::Device::Cpu)
                .and_then(|t| t.unsqueeze(0))
                .expect("ids");
            let labels: Vec<i64> = example
                .ids
                .iter()
                .enumerate()
                .map(|(i, &id)| {
                    if i >= example.prompt_len {
                        i64::from(id)
                    } else {
                        -100
                    }
                })
                .collect();
            let labels = candle_core::Tensor::new(labels.as_slice(), &candle_core::Device::Cpu)
                .and_then(|t| t.unsqueeze(0))
                .expect("labels");
            let logits = loaded.model.forward(&ids, None, None).expect("forward");
            let (loss, n) = retort_model::train::causal_lm_loss(&logits, &labels).expect("loss");
            sum += loss.to_scalar::<f32>().expect("scalar") as f64;
            count += n;
        }
        sum / count as f64
    }

    /// The committed teacher and student load, share the tokenizer, and are trained: their loss
    /// on teacher solutions of held-out problems is far below that of fresh weights (about 5.5).
    /// Checks that the shipped weights and tokenizer files are intact.
    #[test]
    fn shipped_models_load_and_are_trained() {
        let teacher = retort_model::load(&assets("teacher"), &Default::default())
            .expect("load the shipped teacher");
        let student = retort_model::load(&assets("student"), &Default::default())
            .expect("load the shipped student");
        assert_eq!(
            student.tokenizer.vocab_size(),
            teacher.tokenizer.vocab_size()
        );
        assert_eq!(teacher.eos_ids(), vec![0]);
        let problems = held_out_problems(DEFAULT_SEED, TRAIN_PER_LEVEL, 1);
        let loss = teacher_style_loss(&teacher, &problems[..4]);
        assert!(loss < 1.0, "teacher loss {loss}");
        let loss = teacher_style_loss(&student, &problems[..4]);
        assert!(loss < 2.5, "student loss {loss}");
    }

    /// The shipped teacher solves three fixed held-out problems (levels 2-4) greedily.
    #[test]
    fn shipped_teacher_answers_held_out_problems() {
        let loaded = retort_model::load(&assets("teacher"), &Default::default())
            .expect("load the shipped teacher");
        let problems: Vec<WorldProblem> = held_out_problems(DEFAULT_SEED, TRAIN_PER_LEVEL, 1)
            .into_iter()
            .filter(|p| (2..=4).contains(&p.level()))
            .collect();
        assert_eq!(problems.len(), 3);
        let report = accuracy(&loaded.model, &loaded.tokenizer, &problems, 3).expect("evaluate");
        for (problem, result) in problems.iter().zip(&report.results) {
            assert!(
                result.correct,
                "{}: got {:?}, want {:?}",
                problem.question,
                result.response,
                teacher_solution(problem)
            );
        }
        let student = retort_model::load(&assets("student"), &Default::default())
            .expect("load the shipped student");
        assert_eq!(
            student.tokenizer.vocab_size(),
            loaded.tokenizer.vocab_size()
        );
    }
}
