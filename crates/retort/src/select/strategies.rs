//! The selection steps: filters that drop records with a counted reason, and orderings. Each
//! takes the surviving [`Item`]s in order and returns the survivors.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::minhash::{NearDuplicates, hash_run, normalise, word_hashes};
use super::scoring::{
    ModelRole, ScoreInput, Scorer, TeacherGuided, perplexity, rank_surprisal_ratio, teacher_guided,
};
use super::{Context, DedupOn, Item, Strategy};
use crate::backend::Prompt;
use crate::error::{Error, Result};
use crate::io::read::kind;
use crate::records::{InputFormat, problem_from_record};

/// A problem's student results: samples with a verdict and how many were correct.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassRate {
    /// Samples with a verdict.
    pub samples: usize,
    /// Correct samples.
    pub correct: usize,
}

impl PassRate {
    /// `correct / samples` (`None` without samples).
    pub fn rate(&self) -> Option<f64> {
        (self.samples > 0).then(|| self.correct as f64 / self.samples as f64)
    }
}

/// Pass rate per problem id over `records` (those without `verdict.correct` are not counted);
/// `path` names the file in errors.
pub fn pass_rates(
    records: &[Map<String, Value>],
    path: &Path,
) -> Result<HashMap<String, PassRate>> {
    let mut rates: HashMap<String, PassRate> = HashMap::new();
    for (i, record) in records.iter().enumerate() {
        let Some(correct) = verdict(record) else {
            continue;
        };
        let id = record_id(record, path, i + 1)?;
        let rate = rates.entry(id).or_default();
        rate.samples += 1;
        rate.correct += usize::from(correct);
    }
    Ok(rates)
}

fn verdict(record: &Map<String, Value>) -> Option<bool> {
    record.get("verdict")?.get("correct")?.as_bool()
}

fn record_id(record: &Map<String, Value>, path: &Path, line: usize) -> Result<String> {
    match record.get("id") {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        _ => Ok(problem_from_record(record, InputFormat::Auto, path, line)?.id),
    }
}

/// The problem id of an item (its `id`, else the stable hash of its prompt).
pub(crate) fn problem_id(item: &Item, cx: &Context<'_>) -> Result<String> {
    record_id(&item.record, &cx.source, item.line)
}

fn prompt(item: &Item, cx: &Context<'_>) -> Result<Prompt> {
    Ok(problem_from_record(&item.record, InputFormat::Auto, &cx.source, item.line)?.prompt)
}

/// The prompt as plain text (message contents joined by newlines; empty for token ids).
fn prompt_text(prompt: &Prompt) -> String {
    match prompt {
        Prompt::Text(text) => text.clone(),
        Prompt::Messages(messages) => messages
            .iter()
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        Prompt::Ids(_) => String::new(),
    }
}

fn response<'a>(item: &'a Item, cx: &Context<'_>) -> Result<&'a str> {
    let field = cx.options.response_field.as_str();
    match item.record.get(field) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(cx.error(
            item.line,
            format!("field `{field}`: expected a string, got {}", kind(other)),
        )),
        None => Err(cx.error(item.line, format!("missing field `{field}`"))),
    }
}

/// `num_tokens`, else the length of `response_ids`.
fn num_tokens(item: &Item, cx: &Context<'_>) -> Result<usize> {
    if let Some(n) = item.record.get("num_tokens").and_then(Value::as_u64) {
        return Ok(n as usize);
    }
    match item.record.get("response_ids") {
        Some(Value::Array(ids)) => Ok(ids.len()),
        _ => Err(cx.error(
            item.line,
            "missing field `num_tokens` (or `response_ids`): length needs token counts".into(),
        )),
    }
}

fn retain(
    items: Vec<Item>,
    cx: &mut Context<'_>,
    mut reason: impl FnMut(&Item, &Context<'_>) -> Result<Option<&'static str>>,
) -> Result<Vec<Item>> {
    let mut kept = Vec::with_capacity(items.len());
    for item in items {
        match reason(&item, cx)? {
            Some(why) => cx.drop_one(why),
            None => kept.push(item),
        }
    }
    Ok(kept)
}

/// `correct`: keeps records whose `verdict.correct` is true.
pub(crate) fn correct(items: Vec<Item>, cx: &mut Context<'_>) -> Vec<Item> {
    let kept = retain(items, cx, |item, _| {
        Ok(match verdict(&item.record) {
            Some(true) => None,
            Some(false) => Some("incorrect"),
            None => Some("no_verdict"),
        })
    });
    kept.unwrap_or_default()
}

/// `finished`: drops records cut at the token limit.
pub(crate) fn finished(items: Vec<Item>, cx: &mut Context<'_>) -> Vec<Item> {
    let kept = retain(items, cx, |item, _| {
        Ok(
            (item.record.get("finish_reason").and_then(Value::as_str) == Some("length"))
                .then_some("truncated"),
        )
    });
    kept.unwrap_or_default()
}

/// `length`: keeps records within `[min_tokens, max_tokens]`.
pub(crate) fn length(items: Vec<Item>, cx: &mut Context<'_>) -> Result<Vec<Item>> {
    let (lo, hi) = (cx.options.min_tokens, cx.options.max_tokens);
    retain(items, cx, |item, cx| {
        let n = num_tokens(item, cx)?;
        Ok(if lo.is_some_and(|lo| n < lo) {
            Some("too_short")
        } else if hi.is_some_and(|hi| n > hi) {
            Some("too_long")
        } else {
            None
        })
    })
}

/// `dedup`: exact duplicates (normalised text), then MinHash near-duplicates.
pub(crate) fn dedup(items: Vec<Item>, cx: &mut Context<'_>) -> Result<Vec<Item>> {
    let options = cx.options;
    let mut exact: HashSet<[u8; 32]> = HashSet::new();
    let mut near = NearDuplicates::new(
        options.num_perm,
        options.shingle,
        options.jaccard,
        options.seed,
    );
    retain(items, cx, |item, cx| {
        let text = match options.dedup_on {
            DedupOn::Response => response(item, cx)?.to_string(),
            DedupOn::Prompt => prompt_text(&prompt(item, cx)?),
            DedupOn::Both => format!(
                "{}\n{}",
                prompt_text(&prompt(item, cx)?),
                response(item, cx)?
            ),
        };
        let digest: [u8; 32] = Sha256::digest(normalise(&text).as_bytes()).into();
        if !exact.insert(digest) {
            return Ok(Some("duplicate"));
        }
        Ok(near.check_and_insert(&text).map(|_| "near_duplicate"))
    })
}

/// N-grams of the eval prompts: full `n`-word windows, plus whole prompts shorter than `n`.
struct EvalIndex {
    n: usize,
    grams: HashSet<(usize, u64)>,
    lengths: Vec<usize>,
}

impl EvalIndex {
    fn new(prompts: &[String], n: usize) -> Self {
        let n = n.max(1);
        let mut grams = HashSet::new();
        let mut lengths = HashSet::new();
        for prompt in prompts {
            let words = word_hashes(prompt);
            if words.is_empty() {
                continue;
            }
            let len = words.len().min(n);
            lengths.insert(len);
            for window in words.windows(len) {
                grams.insert((len, hash_run(window)));
            }
        }
        let mut lengths: Vec<usize> = lengths.into_iter().collect();
        lengths.sort_unstable();
        Self { n, grams, lengths }
    }

    fn overlaps(&self, text: &str) -> bool {
        let words = word_hashes(text);
        self.lengths
            .iter()
            .filter(|&&len| len <= self.n)
            .any(|&len| {
                words
                    .windows(len)
                    .any(|w| self.grams.contains(&(len, hash_run(w))))
            })
    }
}

/// The prompts of every record of the eval files.
fn eval_prompts(paths: &[std::path::PathBuf]) -> Result<Vec<String>> {
    let mut prompts = Vec::new();
    for path in paths {
        for (line, record) in crate::io::read_records(path)? {
            let problem = problem_from_record(&record, InputFormat::Auto, path, line)?;
            prompts.push(prompt_text(&problem.prompt));
        }
    }
    Ok(prompts)
}

/// `decontaminate`: drops records whose prompt or response shares an n-gram with an eval prompt.
pub(crate) fn decontaminate(items: Vec<Item>, cx: &mut Context<'_>) -> Result<Vec<Item>> {
    let index = EvalIndex::new(&eval_prompts(&cx.options.eval_files)?, cx.options.ngram);
    retain(items, cx, |item, cx| {
        let contaminated =
            index.overlaps(&prompt_text(&prompt(item, cx)?)) || index.overlaps(response(item, cx)?);
        Ok(contaminated.then_some("contaminated"))
    })
}

/// `difficulty`: keeps problems whose pass rate is within the band.
pub(crate) fn difficulty(
    items: Vec<Item>,
    cx: &mut Context<'_>,
    rates: &HashMap<String, PassRate>,
) -> Result<Vec<Item>> {
    let (lo, hi) = (cx.options.min_pass_rate, cx.options.max_pass_rate);
    retain(items, cx, |item, cx| {
        let id = problem_id(item, cx)?;
        Ok(match rates.get(&id).and_then(PassRate::rate) {
            None => Some("no_pass_rate"),
            Some(r) if r > hi => Some("too_easy"),
            Some(r) if r < lo => Some("too_hard"),
            Some(_) => None,
        })
    })
}

/// `random`: a seeded shuffle.
pub(crate) fn random(mut items: Vec<Item>, seed: u64) -> Vec<Item> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    items.shuffle(&mut rng);
    items
}

/// `shortest`: fewest tokens first (stable).
pub(crate) fn shortest(items: Vec<Item>, cx: &mut Context<'_>) -> Result<Vec<Item>> {
    let mut keyed = Vec::with_capacity(items.len());
    for item in items {
        keyed.push((num_tokens(&item, cx)?, item));
    }
    keyed.sort_by_key(|(n, _)| *n);
    Ok(keyed.into_iter().map(|(_, item)| item).collect())
}

/// `longest`: most tokens first (stable).
pub(crate) fn longest(items: Vec<Item>, cx: &mut Context<'_>) -> Result<Vec<Item>> {
    let mut keyed = Vec::with_capacity(items.len());
    for item in items {
        keyed.push((num_tokens(&item, cx)?, item));
    }
    keyed.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    Ok(keyed.into_iter().map(|(_, item)| item).collect())
}

/// The model-scored strategies: computes each item's score, drops the unscorable and sorts best
/// first (stable, so ties keep the earlier order).
pub(crate) fn score_and_rank(
    items: Vec<Item>,
    cx: &mut Context<'_>,
    scorer: &dyn Scorer,
    strategy: Strategy,
) -> Result<Vec<Item>> {
    let prompts: Vec<Prompt> = items
        .iter()
        .map(|item| prompt(item, cx))
        .collect::<Result<_>>()?;
    let responses: Vec<&str> = items
        .iter()
        .map(|item| response(item, cx))
        .collect::<Result<_>>()?;
    let inputs: Vec<ScoreInput<'_>> = prompts
        .iter()
        .zip(&responses)
        .zip(&items)
        .map(|((prompt, response), item)| ScoreInput {
            prompt,
            response,
            line: item.line,
        })
        .collect();
    let scores: Vec<Option<f64>> = match strategy {
        Strategy::StudentPpl => scorer
            .score(ModelRole::Student, &inputs, false)?
            .iter()
            .map(perplexity)
            .collect(),
        Strategy::Rsr => {
            let cap = cx.options.rsr_rank_cap;
            scorer
                .score(ModelRole::Student, &inputs, true)?
                .iter()
                .map(|s| rank_surprisal_ratio(s, cap))
                .collect()
        }
        guided if guided.is_teacher_guided() => {
            let kind = match guided {
                Strategy::TeacherGuidedProportion => TeacherGuided::Proportion,
                Strategy::TeacherGuidedMean => TeacherGuided::Mean,
                _ => TeacherGuided::Count,
            };
            let beta = cx.options.teacher_guided_beta;
            let teacher = scorer.score(ModelRole::Teacher, &inputs, false)?;
            let student = scorer.score(ModelRole::Student, &inputs, false)?;
            responses
                .iter()
                .zip(teacher.iter().zip(&student))
                .map(|(r, (t, s))| teacher_guided(r, t, s, kind, beta))
                .collect()
        }
        other => {
            return Err(Error::Invalid(format!(
                "strategy `{}` is not a scoring strategy",
                other.as_str()
            )));
        }
    };
    // Higher is better for teacher-guided but its `min` arm (and for perplexity when asked);
    // lower otherwise.
    let descending = match strategy {
        Strategy::TeacherGuidedMin => false,
        guided if guided.is_teacher_guided() => true,
        Strategy::StudentPpl => cx.options.ppl_highest,
        _ => false,
    };
    let mut scored = Vec::with_capacity(items.len());
    for (mut item, score) in items.into_iter().zip(scores) {
        match score.filter(|s| !s.is_nan()) {
            Some(score) => {
                item.scores.push((strategy, score));
                scored.push((score, item));
            }
            None => cx.drop_one("unscorable"),
        }
    }
    scored.sort_by(|a, b| {
        if descending {
            b.0.total_cmp(&a.0)
        } else {
            a.0.total_cmp(&b.0)
        }
    });
    Ok(scored.into_iter().map(|(_, item)| item).collect())
}

/// At most `cap` records per problem id, the first ones in the current order.
pub(crate) fn per_problem(items: Vec<Item>, cx: &mut Context<'_>, cap: usize) -> Result<Vec<Item>> {
    let mut counts: HashMap<String, usize> = HashMap::new();
    retain(items, cx, |item, cx| {
        let count = counts.entry(problem_id(item, cx)?).or_default();
        *count += 1;
        Ok((*count > cap).then_some("per_problem_cap"))
    })
}
