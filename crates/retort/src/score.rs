//! The score stage: per-token log-probs of each record's completion given its prompt, under a
//! local model. Input records carry `prompt`/`messages` + `completion` text, or `prompt_ids` +
//! `completion_ids`. Records are scored in left-padded batches and appended in input order, so a
//! rerun after a kill resumes after the last complete output record.

use std::path::PathBuf;

use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::backend::Backend;
use crate::backend::local::LocalBackend;
use crate::error::{Error, Result};
use crate::io::read::kind;
use crate::io::{Journal, RecordReader};
use crate::records::{InputFormat, problem_from_record};

/// Options of the score stage.
#[derive(Debug, Clone)]
pub struct ScoreOptions {
    /// Input records.
    pub input: PathBuf,
    /// Output JSONL.
    pub output: PathBuf,
    /// Records per forward pass.
    pub batch_size: usize,
}

/// Counts from a score run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScoreSummary {
    /// Records in the input.
    pub records: usize,
    /// Records already scored by an earlier run.
    pub already_done: usize,
    /// Records scored by this run.
    pub scored: usize,
    /// Completion tokens scored by this run.
    pub tokens: usize,
    /// Mean log-prob per token over this run's records.
    pub mean_token_logprob: f64,
}

struct Item {
    record: Map<String, Value>,
    id: String,
    prompt_ids: Vec<u32>,
    completion_ids: Vec<u32>,
}

fn ids_field(
    record: &Map<String, Value>,
    name: &str,
    err: &dyn Fn(String) -> Error,
) -> Result<Option<Vec<u32>>> {
    match record.get(name) {
        None => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect::<Option<Vec<u32>>>()
            .map(Some)
            .ok_or_else(|| err(format!("field `{name}`: expected an array of token ids"))),
        Some(other) => Err(err(format!(
            "field `{name}`: expected an array of token ids, got {}",
            kind(other)
        ))),
    }
}

fn read_items(backend: &LocalBackend, options: &ScoreOptions) -> Result<Vec<Item>> {
    let mut items = Vec::new();
    for entry in RecordReader::open(&options.input)? {
        let (line, record) = entry?;
        let err = |message: String| Error::Input {
            path: options.input.clone(),
            line,
            message,
        };
        let problem = problem_from_record(&record, InputFormat::Auto, &options.input, line)?;
        let prompt_ids = backend.prompt_ids(&problem.prompt)?;
        let completion_ids = match ids_field(&record, "completion_ids", &err)? {
            Some(ids) => ids,
            None => match record.get("completion") {
                Some(Value::String(text)) => backend.model().tokenizer.encode(text, false)?,
                Some(other) => {
                    return Err(err(format!(
                        "field `completion`: expected a string, got {}",
                        kind(other)
                    )));
                }
                None => {
                    return Err(err(
                        "missing field `completion` (or `completion_ids`)".into()
                    ));
                }
            },
        };
        if prompt_ids.is_empty() {
            return Err(err(
                "the prompt is empty: scoring needs at least one prompt token".into(),
            ));
        }
        let vocab = backend.model().config.vocab_size as u32;
        if let Some(bad) = prompt_ids
            .iter()
            .chain(&completion_ids)
            .find(|&&t| t >= vocab)
        {
            return Err(err(format!(
                "token id {bad} is out of range for a vocabulary of {vocab}"
            )));
        }
        items.push(Item {
            record,
            id: problem.id,
            prompt_ids,
            completion_ids,
        });
    }
    Ok(items)
}

/// Runs the stage. `progress(done, total)` is called after each batch.
pub fn score(
    backend: &LocalBackend,
    options: &ScoreOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ScoreSummary> {
    let items = read_items(backend, options)?;
    let ids: Vec<&str> = items.iter().map(|it| it.id.as_str()).collect();
    let mut writer = ScoreWriter::open(options, &ids)?;
    let done = writer.summary.already_done;
    progress(done, items.len());
    let model = backend.model();
    for batch in items[done..].chunks(options.batch_size.max(1)) {
        let pairs: Vec<(Vec<u32>, Vec<u32>)> = batch
            .iter()
            .map(|it| (it.prompt_ids.clone(), it.completion_ids.clone()))
            .collect();
        let scores = retort_model::score::score_batch(&model.model, &pairs, model.pad_id())?;
        for (item, token_logprobs) in batch.iter().zip(scores) {
            let sum: f64 = token_logprobs.iter().map(|&x| f64::from(x)).sum();
            let mut out = item.record.clone();
            out.insert("completion_ids".into(), json!(item.completion_ids));
            writer.append(
                out,
                &item.id,
                json!(token_logprobs),
                sum,
                token_logprobs.len(),
            )?;
        }
        progress(done + writer.summary.scored, items.len());
    }
    writer.finish()
}

/// The output journal of a score run, resumed in input order, and its running summary.
struct ScoreWriter {
    journal: Journal,
    summary: ScoreSummary,
    logprob_total: f64,
}

impl ScoreWriter {
    /// Opens the output and checks that records already there are the first of `ids`.
    fn open(options: &ScoreOptions, ids: &[&str]) -> Result<Self> {
        let (journal, recovered) = Journal::open(&options.output)?;
        let done = recovered.records.len();
        if done > ids.len() {
            return Err(Error::Invalid(format!(
                "`{}` already holds {done} records but the input has {}: is it the output of another input?",
                options.output.display(),
                ids.len()
            )));
        }
        for (i, (old, id)) in recovered.records.iter().zip(ids).enumerate() {
            if old.get("id").and_then(Value::as_str) != Some(*id) {
                return Err(Error::Input {
                    path: options.output.clone(),
                    line: i + 1,
                    message: format!(
                        "expected id `{id}` to resume from this input; remove the output to start over"
                    ),
                });
            }
        }
        let summary = ScoreSummary {
            records: ids.len(),
            already_done: done,
            ..ScoreSummary::default()
        };
        Ok(Self {
            journal,
            summary,
            logprob_total: 0.0,
        })
    }

    /// Appends one scored record (`id`, `token_logprobs`, `logprob`, `num_tokens` added).
    fn append(
        &mut self,
        mut out: Map<String, Value>,
        id: &str,
        token_logprobs: Value,
        sum: f64,
        tokens: usize,
    ) -> Result<()> {
        out.insert("id".into(), json!(id));
        out.insert("token_logprobs".into(), token_logprobs);
        out.insert("logprob".into(), json!(sum));
        out.insert("num_tokens".into(), json!(tokens));
        self.journal.append(&Value::Object(out))?;
        self.summary.scored += 1;
        self.summary.tokens += tokens;
        self.logprob_total += sum;
        Ok(())
    }

    fn finish(mut self) -> Result<ScoreSummary> {
        self.journal.sync()?;
        if self.summary.tokens > 0 {
            self.summary.mean_token_logprob = self.logprob_total / self.summary.tokens as f64;
        }
        Ok(self.summary)
    }
}

/// Scores every record through any [`Backend`] (e.g. an OpenAI-compatible server with vLLM's
/// `prompt_logprobs`), one request per record, appended in input order and resumable like
/// [`score`]. Records need `prompt`/`messages` + `completion` text; with `top_k > 0` each output
/// record also gets `top_logprobs` (per token, `[token, logprob]` pairs, most likely first).
pub fn score_with_backend(
    backend: &dyn Backend,
    options: &ScoreOptions,
    top_k: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ScoreSummary> {
    let mut items = Vec::new();
    for entry in RecordReader::open(&options.input)? {
        let (line, record) = entry?;
        let err = |message: String| Error::Input {
            path: options.input.clone(),
            line,
            message,
        };
        let problem = problem_from_record(&record, InputFormat::Auto, &options.input, line)?;
        let completion = match record.get("completion") {
            Some(Value::String(text)) => text.clone(),
            Some(other) => {
                return Err(err(format!(
                    "field `completion`: expected a string, got {}",
                    kind(other)
                )));
            }
            None => {
                return Err(err(
                    "missing field `completion` (a server scores text)".into()
                ));
            }
        };
        items.push((record, problem, completion));
    }
    let ids: Vec<&str> = items
        .iter()
        .map(|(_, problem, _)| problem.id.as_str())
        .collect();
    let mut writer = ScoreWriter::open(options, &ids)?;
    let done = writer.summary.already_done;
    progress(done, items.len());
    for (record, problem, completion) in &items[done..] {
        let scored = backend.score(&problem.prompt, completion, top_k)?;
        let sum: f64 = scored.token_logprobs.iter().sum();
        let mut out = record.clone();
        if let Some(ids) = &scored.completion_ids {
            out.insert("completion_ids".into(), json!(ids));
        }
        if top_k > 0 {
            out.insert("top_logprobs".into(), json!(scored.top_logprobs));
        }
        let tokens = scored.token_logprobs.len();
        writer.append(out, &problem.id, json!(scored.token_logprobs), sum, tokens)?;
        progress(done + writer.summary.scored, items.len());
    }
    writer.finish()
}
