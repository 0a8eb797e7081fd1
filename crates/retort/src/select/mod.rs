//! The select stage (DESIGN.md §4, §5 "Curation", "Teacher-guided selection"): turns traces into
//! a training set by applying [`Strategy`]s in the order given, then a per-problem cap and a
//! budget. Filters drop records and count why ([`SelectSummary::dropped`]); scoring strategies
//! reorder the survivors (best first) so the cap and the budget keep the best ones.
//!
//! | strategy | kind | what it does | drop reasons |
//! |---|---|---|---|
//! | `correct` | filter | keeps `verdict.correct == true` | `incorrect`, `no_verdict` |
//! | `finished` | filter | drops `finish_reason == "length"` (also `--drop-truncated`) | `truncated` |
//! | `length` | filter | keeps `min_tokens <= num_tokens <= max_tokens` | `too_short`, `too_long` |
//! | `dedup` | filter | exact duplicates after whitespace/case normalisation, then MinHash near-duplicates at Jaccard ≥ `jaccard` over `shingle`-word shingles; the first occurrence stays | `duplicate`, `near_duplicate` |
//! | `decontaminate` | filter | drops a record whose prompt or response shares an `ngram`-word n-gram with a prompt of the eval files (an eval prompt shorter than `ngram` words must appear whole) | `contaminated` |
//! | `difficulty` | filter | keeps problems whose student pass rate is in `[min_pass_rate, max_pass_rate]` | `too_easy`, `too_hard`, `no_pass_rate` |
//! | `student-ppl` | score | student perplexity of the response; lowest first (or highest with `ppl_highest`) | `unscorable` |
//! | `rsr` | score | Rank-Surprisal Ratio under the student; lowest first | `unscorable` |
//! | `teacher-guided` | score | the paper's: sentences with `p_teacher − p_student > beta` (`teacher_guided_beta`, 0.1); most first, so `per_problem: 1` keeps each problem's response with the most | `unscorable` |
//! | `teacher-guided-proportion` | score | that count over the response's sentences; highest first | `unscorable` |
//! | `teacher-guided-min` | score | the same count; fewest first (the paper's worst arm) | `unscorable` |
//! | `teacher-guided-mean` | score | mean over sentences of teacher − student mean log-prob; highest first | `unscorable` |
//! | `random` | order | seeded shuffle | |
//! | `shortest` | order | fewest tokens first | |
//! | `longest` | order | most tokens first | |
//!
//! Difficulty input: the student's pass rate of a problem is the share of records with that `id`
//! whose `verdict.correct` is true, counted over a file of student samples (`difficulty_from`, e.g.
//! `retort generate --model STUDENT --samples 8` then `retort verify`), or, without one, over the
//! input records themselves (all of them, before any strategy ran).
//!
//! A kept record gets `"selection": {"strategy", "score"}` from the last scoring strategy, and
//! `"selection_scores"` with every scoring strategy's value when more than one ran.

pub mod minhash;
pub mod scoring;
pub mod strategies;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::error::{Error, Result};
use crate::io::{AtomicFile, read_records};
use crate::manifest::Manifest;
use crate::model_spec::ModelSpec;

pub use minhash::{NearDuplicates, choose_bands, normalise, shingles};
pub use scoring::{
    LocalScorer, ModelRole, ModelScorer, ScoreInput, Scorer, TeacherGuided, TokenScores,
    perplexity, rank_surprisal_ratio, sentence_means, sentences, teacher_guided,
    teacher_guided_score,
};
pub use strategies::{PassRate, pass_rates};

/// One selection step.
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Keep records whose `verdict.correct` is true.
    Correct,
    /// Drop truncated records (`finish_reason: "length"`).
    Finished,
    /// Keep records within `--min-tokens`/`--max-tokens`.
    Length,
    /// Drop exact duplicates and MinHash near-duplicates (`--jaccard`).
    Dedup,
    /// Drop records sharing an n-gram with the prompts of `--eval-files`.
    Decontaminate,
    /// Keep problems whose student pass rate is within `--min-pass-rate`..`--max-pass-rate`.
    Difficulty,
    /// Order by student perplexity, lowest first (needs `--student`).
    StudentPpl,
    /// Order by Rank-Surprisal Ratio under the student, lowest first (needs `--student`).
    Rsr,
    /// Most teacher-originated sentences first (`p_teacher - p_student > beta`; needs both models).
    TeacherGuided,
    /// Highest share of teacher-originated sentences first.
    TeacherGuidedProportion,
    /// Fewest teacher-originated sentences first.
    TeacherGuidedMin,
    /// Highest mean teacher-minus-student sentence log-prob first.
    TeacherGuidedMean,
    /// Seeded shuffle.
    Random,
    /// Fewest tokens first.
    Shortest,
    /// Most tokens first.
    Longest,
}

impl Strategy {
    /// Every strategy, in documentation order.
    pub const ALL: [Self; 15] = [
        Self::Correct,
        Self::Finished,
        Self::Length,
        Self::Dedup,
        Self::Decontaminate,
        Self::Difficulty,
        Self::StudentPpl,
        Self::Rsr,
        Self::TeacherGuided,
        Self::TeacherGuidedProportion,
        Self::TeacherGuidedMin,
        Self::TeacherGuidedMean,
        Self::Random,
        Self::Shortest,
        Self::Longest,
    ];

    /// The name used on the command line and in summaries.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Correct => "correct",
            Self::Finished => "finished",
            Self::Length => "length",
            Self::Dedup => "dedup",
            Self::Decontaminate => "decontaminate",
            Self::Difficulty => "difficulty",
            Self::StudentPpl => "student-ppl",
            Self::Rsr => "rsr",
            Self::TeacherGuided => "teacher-guided",
            Self::TeacherGuidedProportion => "teacher-guided-proportion",
            Self::TeacherGuidedMin => "teacher-guided-min",
            Self::TeacherGuidedMean => "teacher-guided-mean",
            Self::Random => "random",
            Self::Shortest => "shortest",
            Self::Longest => "longest",
        }
    }

    /// Whether the strategy computes a model score (and so annotates `selection`).
    pub fn is_scoring(self) -> bool {
        self.is_teacher_guided() || matches!(self, Self::StudentPpl | Self::Rsr)
    }

    /// Whether the strategy scores with the teacher and the student.
    pub fn is_teacher_guided(self) -> bool {
        matches!(
            self,
            Self::TeacherGuided
                | Self::TeacherGuidedProportion
                | Self::TeacherGuidedMin
                | Self::TeacherGuidedMean
        )
    }
}

impl FromStr for Strategy {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|x| x.as_str()).collect();
                Error::Invalid(format!(
                    "unknown strategy `{s}`; expected one of {}",
                    names.join(", ")
                ))
            })
    }
}

/// Which text deduplication compares.
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DedupOn {
    /// The prompt and the response together (two samples of one problem with the same response
    /// are duplicates; the same response to different problems is not).
    #[default]
    Both,
    /// The response only.
    Response,
    /// The prompt only (one trace per distinct problem).
    Prompt,
}

/// Options of the select stage.
#[derive(Debug, Clone, Serialize)]
pub struct SelectOptions {
    /// Steps, applied in this order.
    pub strategies: Vec<Strategy>,
    /// Records kept at most, after everything else.
    pub budget: Option<usize>,
    /// Records kept per problem id at most (applied before the budget).
    pub per_problem: Option<usize>,
    /// Seed of `random` and of the MinHash functions.
    pub seed: u64,
    /// `length`: fewest tokens kept.
    pub min_tokens: Option<usize>,
    /// `length`: most tokens kept.
    pub max_tokens: Option<usize>,
    /// `dedup`: near-duplicate threshold on estimated Jaccard similarity.
    pub jaccard: f64,
    /// `dedup`: words per shingle.
    pub shingle: usize,
    /// `dedup`: MinHash functions.
    pub num_perm: usize,
    /// `dedup`: which text is compared.
    pub dedup_on: DedupOn,
    /// `decontaminate`: eval files whose prompts must not leak into training.
    pub eval_files: Vec<PathBuf>,
    /// `decontaminate`: words per n-gram.
    pub ngram: usize,
    /// `difficulty`: student samples with verdicts (default: the input itself).
    pub difficulty_from: Option<PathBuf>,
    /// `difficulty`: lowest pass rate kept.
    pub min_pass_rate: f64,
    /// `difficulty`: highest pass rate kept.
    pub max_pass_rate: f64,
    /// `student-ppl`: keep the most perplexing first instead of the least.
    pub ppl_highest: bool,
    /// `rsr`: ranks above this count as this.
    pub rsr_rank_cap: u32,
    /// `teacher-guided` (count, proportion, min): a sentence is teacher-originated when
    /// `p_teacher - p_student` exceeds this (geometric-mean token probabilities).
    pub teacher_guided_beta: f64,
    /// The field holding the response text.
    pub response_field: String,
    /// The input file, named in error messages.
    pub source: Option<PathBuf>,
}

impl Default for SelectOptions {
    fn default() -> Self {
        Self {
            strategies: Vec::new(),
            budget: None,
            per_problem: None,
            seed: 0,
            min_tokens: None,
            max_tokens: None,
            jaccard: 0.8,
            shingle: 5,
            num_perm: 128,
            dedup_on: DedupOn::Both,
            eval_files: Vec::new(),
            ngram: 13,
            difficulty_from: None,
            min_pass_rate: 0.0,
            max_pass_rate: 1.0,
            ppl_highest: false,
            rsr_rank_cap: 100,
            teacher_guided_beta: 0.1,
            response_field: "response".into(),
            source: None,
        }
    }
}

/// Records before and after one step.
#[derive(Debug, Clone, Serialize)]
pub struct StepSummary {
    /// The step (a strategy name, `per-problem` or `budget`).
    pub step: String,
    /// Records entering it.
    pub before: usize,
    /// Records leaving it.
    pub after: usize,
}

/// Min / mean / max of a score over the kept records.
#[derive(Debug, Clone, Serialize)]
pub struct ScoreStats {
    /// The scoring strategy.
    pub strategy: String,
    /// Lowest kept score.
    pub min: f64,
    /// Mean kept score.
    pub mean: f64,
    /// Highest kept score.
    pub max: f64,
}

/// What a selection did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SelectSummary {
    /// Input records.
    pub input: usize,
    /// Records kept.
    pub kept: usize,
    /// Distinct problem ids among the kept records.
    pub kept_problems: usize,
    /// Dropped records by reason.
    pub dropped: BTreeMap<String, usize>,
    /// Records through each step, in order.
    pub steps: Vec<StepSummary>,
    /// Score statistics of the kept records, one per scoring strategy that ran.
    pub scores: Vec<ScoreStats>,
}

/// A record on its way through the steps.
#[derive(Debug, Clone)]
pub(crate) struct Item {
    pub(crate) record: Map<String, Value>,
    /// 1-based position in the input.
    pub(crate) line: usize,
    /// Scores by scoring strategy, in the order they ran.
    pub(crate) scores: Vec<(Strategy, f64)>,
}

/// Shared context of the steps: options, drop counts, error locations.
pub(crate) struct Context<'a> {
    pub(crate) options: &'a SelectOptions,
    pub(crate) dropped: BTreeMap<String, usize>,
    pub(crate) source: PathBuf,
}

impl Context<'_> {
    pub(crate) fn drop_one(&mut self, reason: &str) {
        *self.dropped.entry(reason.to_string()).or_default() += 1;
    }

    pub(crate) fn error(&self, line: usize, message: String) -> Error {
        Error::Input {
            path: self.source.clone(),
            line,
            message,
        }
    }
}

/// Applies `options` to `records` (in input order); `scorer` is needed by `student-ppl`, `rsr`
/// (student) and `teacher-guided` (teacher and student). Returns the kept records, best first
/// where a scoring or ordering strategy ran, and the summary.
pub fn select(
    records: Vec<Map<String, Value>>,
    options: &SelectOptions,
    scorer: Option<&dyn Scorer>,
) -> Result<(Vec<Map<String, Value>>, SelectSummary)> {
    validate(options, scorer)?;
    let source = options
        .source
        .clone()
        .unwrap_or_else(|| PathBuf::from("<input>"));
    let mut cx = Context {
        options,
        dropped: BTreeMap::new(),
        source,
    };
    let input = records.len();
    let rates = if options.strategies.contains(&Strategy::Difficulty) {
        Some(match &options.difficulty_from {
            Some(path) => {
                let samples: Vec<_> = read_records(path)?.into_iter().map(|(_, r)| r).collect();
                pass_rates(&samples, path)?
            }
            None => pass_rates(&records, &cx.source)?,
        })
    } else {
        None
    };
    let mut items: Vec<Item> = records
        .into_iter()
        .enumerate()
        .map(|(i, record)| Item {
            record,
            line: i + 1,
            scores: Vec::new(),
        })
        .collect();
    let mut steps = Vec::new();
    for &strategy in &options.strategies {
        let before = items.len();
        items = match strategy {
            Strategy::Correct => strategies::correct(items, &mut cx),
            Strategy::Finished => strategies::finished(items, &mut cx),
            Strategy::Length => strategies::length(items, &mut cx)?,
            Strategy::Dedup => strategies::dedup(items, &mut cx)?,
            Strategy::Decontaminate => strategies::decontaminate(items, &mut cx)?,
            Strategy::Difficulty => {
                strategies::difficulty(items, &mut cx, rates.as_ref().unwrap_or(&HashMap::new()))?
            }
            Strategy::Random => strategies::random(items, options.seed),
            Strategy::Shortest => strategies::shortest(items, &mut cx)?,
            Strategy::Longest => strategies::longest(items, &mut cx)?,
            scoring => {
                let scorer = scorer.ok_or_else(|| missing_scorer(scoring))?;
                strategies::score_and_rank(items, &mut cx, scorer, scoring)?
            }
        };
        steps.push(StepSummary {
            step: strategy.as_str().into(),
            before,
            after: items.len(),
        });
    }
    if let Some(cap) = options.per_problem {
        let before = items.len();
        items = strategies::per_problem(items, &mut cx, cap)?;
        steps.push(StepSummary {
            step: "per-problem".into(),
            before,
            after: items.len(),
        });
    }
    if let Some(budget) = options.budget {
        let before = items.len();
        for _ in budget..items.len() {
            cx.drop_one("budget");
        }
        items.truncate(budget);
        steps.push(StepSummary {
            step: "budget".into(),
            before,
            after: items.len(),
        });
    }
    let mut problems = std::collections::HashSet::new();
    for item in &items {
        problems.insert(strategies::problem_id(item, &cx)?);
    }
    let scores = score_stats(&items);
    let kept: Vec<Map<String, Value>> = items.into_iter().map(annotate).collect();
    let summary = SelectSummary {
        input,
        kept: kept.len(),
        kept_problems: problems.len(),
        dropped: cx.dropped,
        steps,
        scores,
    };
    Ok((kept, summary))
}

fn validate(options: &SelectOptions, scorer: Option<&dyn Scorer>) -> Result<()> {
    if !(0.0..=1.0).contains(&options.jaccard) {
        return Err(Error::Invalid(format!(
            "`jaccard` must be within [0, 1], got `{}`",
            options.jaccard
        )));
    }
    if options.min_pass_rate > options.max_pass_rate {
        return Err(Error::Invalid(format!(
            "the pass-rate band is empty: `min_pass_rate` {} > `max_pass_rate` {}",
            options.min_pass_rate, options.max_pass_rate
        )));
    }
    if options.strategies.contains(&Strategy::Decontaminate) && options.eval_files.is_empty() {
        return Err(Error::Invalid(
            "strategy `decontaminate` needs eval files (`--eval-files`)".into(),
        ));
    }
    for &strategy in &options.strategies {
        let needs: &[ModelRole] = match strategy {
            Strategy::StudentPpl | Strategy::Rsr => &[ModelRole::Student],
            s if s.is_teacher_guided() => &[ModelRole::Teacher, ModelRole::Student],
            _ => &[],
        };
        for &role in needs {
            match scorer {
                Some(s) if s.has(role) => {}
                _ => {
                    let flag = if role == ModelRole::Teacher {
                        "--teacher"
                    } else {
                        "--student"
                    };
                    return Err(Error::Invalid(format!(
                        "strategy `{}` needs a model: give `{flag}`",
                        strategy.as_str()
                    )));
                }
            }
        }
    }
    Ok(())
}

fn missing_scorer(strategy: Strategy) -> Error {
    Error::Invalid(format!(
        "strategy `{}` needs a scorer (`--student`, and `--teacher` for teacher-guided)",
        strategy.as_str()
    ))
}

fn score_stats(items: &[Item]) -> Vec<ScoreStats> {
    let mut order: Vec<Strategy> = Vec::new();
    for item in items {
        for (s, _) in &item.scores {
            if !order.contains(s) {
                order.push(*s);
            }
        }
    }
    order
        .into_iter()
        .filter_map(|strategy| {
            let values: Vec<f64> = items
                .iter()
                .flat_map(|i| {
                    i.scores
                        .iter()
                        .filter(|(s, _)| *s == strategy)
                        .map(|(_, v)| *v)
                })
                .collect();
            let n = values.len();
            (n > 0).then(|| ScoreStats {
                strategy: strategy.as_str().into(),
                min: values.iter().copied().fold(f64::INFINITY, f64::min),
                mean: values.iter().sum::<f64>() / n as f64,
                max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            })
        })
        .collect()
}

fn annotate(item: Item) -> Map<String, Value> {
    let mut record = item.record;
    if let Some(&(strategy, score)) = item.scores.last() {
        record.insert(
            "selection".into(),
            json!({"strategy": strategy.as_str(), "score": finite(score)}),
        );
        if item.scores.len() > 1 {
            let all: Map<String, Value> = item
                .scores
                .iter()
                .map(|(s, v)| (s.as_str().to_string(), finite(*v)))
                .collect();
            record.insert("selection_scores".into(), Value::Object(all));
        }
    }
    record
}

/// A JSON number, or null for a non-finite value (JSON has no infinity).
fn finite(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

/// Reads `input`, selects, writes the kept records to `output` atomically (JSONL) and
/// `<output>.manifest.json` beside it. `models` lists the models used, for the manifest.
pub fn select_file(
    input: &Path,
    output: &Path,
    options: &SelectOptions,
    scorer: Option<&dyn Scorer>,
    models: &[&ModelSpec],
) -> Result<SelectSummary> {
    let start = Instant::now();
    let records: Vec<Map<String, Value>> =
        read_records(input)?.into_iter().map(|(_, r)| r).collect();
    let mut options = options.clone();
    options.source.get_or_insert_with(|| input.to_path_buf());
    let (kept, summary) = select(records, &options, scorer)?;
    let mut out = AtomicFile::create(output)?;
    for record in &kept {
        let line = serde_json::to_string(record).map_err(|e| Error::Invalid(e.to_string()))?;
        std::io::Write::write_all(&mut out, line.as_bytes())?;
        std::io::Write::write_all(&mut out, b"\n")?;
    }
    out.commit()?;
    let settings = serde_json::to_value(&options).map_err(|e| Error::Invalid(e.to_string()))?;
    let mut manifest = Manifest::new(settings);
    manifest.add_input(input)?;
    for path in options.eval_files.iter().chain(&options.difficulty_from) {
        manifest.add_input(path)?;
    }
    for spec in models {
        manifest.add_model(spec)?;
    }
    manifest.counts = serde_json::to_value(&summary).map_err(|e| Error::Invalid(e.to_string()))?;
    manifest.wall_seconds = start.elapsed().as_secs_f64();
    manifest.write_beside(output)?;
    Ok(summary)
}
