//! Training examples: records tokenised once into [`Example`]s (prompt + completion ids, loss on
//! the completion only), and the data order: length-bucketed batches shuffled by a seeded RNG
//! ([`epoch_batches`], a pure function of the seed and the epoch, so a resumed run sees the same
//! batches as an uninterrupted one).
//!
//! A record gives its prompt as `prompt`, `messages`, `prompt_ids` (or any shape of
//! [`crate::records::InputFormat`]) and its completion as `completion_ids`, `completion`, or
//! `response` (a trace from `retort generate`), else a trailing assistant message. A `response`
//! whose reasoning was stored apart (`generate --reasoning separate`, a `reasoning` field) is
//! trained on with its reasoning joined back in the native `<think>` form
//! ([`crate::reasoning::join`]), so the student learns the chain of thought, not only the answer. Text
//! completions get the EOS token appended unless `finish_reason` is `length` or they already
//! end with EOS; `completion_ids` are taken as they are.

use std::path::Path;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::backend::{Message, Prompt};
use crate::error::{Error, Result};
use crate::io::read::{RecordReader, kind};
use crate::records::{InputFormat, problem_from_record};

/// One tokenised training sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Prompt then completion token ids.
    pub ids: Vec<u32>,
    /// How many leading ids are prompt (no loss on them).
    pub prompt_len: usize,
    /// The record's 1-based line in its file.
    pub line: usize,
    /// The record's identity: `id` (with `#sample` when the record has a `sample` index), else
    /// `line-N`. Keys the offline teacher cache together with a hash of `ids`.
    pub key: String,
    /// `verdict.correct` when the record has one.
    pub correct: Option<bool>,
}

impl Example {
    /// Completion (target) tokens.
    pub fn target_len(&self) -> usize {
        self.ids.len() - self.prompt_len
    }
}

/// How to turn records into examples.
#[derive(Debug, Clone, PartialEq)]
pub struct DataOptions {
    /// Prompt shape.
    pub input_format: InputFormat,
    /// Keep only records whose `verdict.correct` is true.
    pub only_correct: bool,
    /// Cut sequences to this many tokens.
    pub max_seq_len: usize,
}

/// Counts from reading a data file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DataStats {
    /// Records read.
    pub records: usize,
    /// Examples kept.
    pub examples: usize,
    /// Skipped by `only-correct` (verdict false or absent).
    pub skipped_incorrect: usize,
    /// Cut to `max-seq-len`.
    pub truncated: usize,
    /// Dropped: the prompt alone fills `max-seq-len`, or the completion is empty.
    pub dropped: usize,
    /// Completion tokens kept (loss targets per epoch).
    pub target_tokens: usize,
    /// Records whose separate `reasoning` field was joined into the target.
    pub joined_reasoning: usize,
}

/// What tokenising needs from the student.
pub struct TokenizerView<'a> {
    /// The student's tokenizer.
    pub tokenizer: &'a retort_model::Tokenizer,
    /// The id appended after a finished completion.
    pub eos_id: u32,
    /// Every id that ends a generation (an existing one is not doubled).
    pub eos_ids: Vec<u32>,
}

impl<'a> TokenizerView<'a> {
    /// The student's tokenizer with its EOS ids; a student that names no EOS token is an error.
    pub fn of(student: &'a retort_model::LoadedModel) -> Result<Self> {
        let mut eos_ids = student.eos_ids();
        let eos_id = student
            .tokenizer
            .eos_token_id()
            .or_else(|| eos_ids.first().copied())
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "student `{}` names no EOS token (tokenizer_config.json or \
                     generation_config.json)",
                    student.dir.display()
                ))
            })?;
        if !eos_ids.contains(&eos_id) {
            eos_ids.push(eos_id);
        }
        Ok(Self {
            tokenizer: &student.tokenizer,
            eos_id,
            eos_ids,
        })
    }
}

/// Reads and tokenises every record of `path`.
pub fn load_examples(
    path: &Path,
    tokens: &TokenizerView<'_>,
    options: &DataOptions,
) -> Result<(Vec<Example>, DataStats)> {
    let mut stats = DataStats::default();
    let mut examples = Vec::new();
    for item in RecordReader::open(path)? {
        let (line, record) = item?;
        stats.records += 1;
        let correct = verdict(&record, path, line)?;
        if options.only_correct && correct != Some(true) {
            stats.skipped_incorrect += 1;
            continue;
        }
        let (mut prompt, completion, joined) =
            parse_record(&record, options.input_format, path, line)?;
        stats.joined_reasoning += usize::from(joined);
        let err = |message: String| Error::Input {
            path: path.to_path_buf(),
            line,
            message,
        };
        let prompt_ids = match &mut prompt {
            Prompt::Ids(ids) => std::mem::take(ids),
            Prompt::Text(text) => tokens.tokenizer.encode(text, true)?,
            Prompt::Messages(messages) => {
                let values: Vec<Value> = messages
                    .iter()
                    .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
                    .collect();
                tokens
                    .tokenizer
                    .encode_chat(&values, true)
                    .map_err(|e| err(format!("field `messages`: {e}")))?
            }
        };
        let mut completion_ids = match completion {
            Completion::Ids(ids) => ids,
            Completion::Text { text, finished } => {
                let mut ids = tokens.tokenizer.encode(&text, false)?;
                let ends_with_eos = ids.last().is_some_and(|id| tokens.eos_ids.contains(id));
                if finished && !ends_with_eos {
                    ids.push(tokens.eos_id);
                }
                ids
            }
        };
        if prompt_ids.is_empty()
            || completion_ids.is_empty()
            || prompt_ids.len() >= options.max_seq_len
        {
            stats.dropped += 1;
            continue;
        }
        let room = options.max_seq_len - prompt_ids.len();
        if completion_ids.len() > room {
            completion_ids.truncate(room);
            stats.truncated += 1;
        }
        let prompt_len = prompt_ids.len();
        let mut ids = prompt_ids;
        ids.extend_from_slice(&completion_ids);
        stats.target_tokens += completion_ids.len();
        examples.push(Example {
            ids,
            prompt_len,
            line,
            key: record_key(&record, line),
            correct,
        });
    }
    stats.examples = examples.len();
    Ok((examples, stats))
}

/// `id[#sample]` of a record, else `line-N`.
fn record_key(record: &Map<String, Value>, line: usize) -> String {
    let id = match record.get("id") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => return format!("line-{line}"),
    };
    match record.get("sample").and_then(Value::as_u64) {
        Some(sample) => format!("{id}#{sample}"),
        None => id,
    }
}

/// A completion as the record gives it.
enum Completion {
    Ids(Vec<u32>),
    Text { text: String, finished: bool },
}

fn verdict(record: &Map<String, Value>, path: &Path, line: usize) -> Result<Option<bool>> {
    let err = |message: String| Error::Input {
        path: path.to_path_buf(),
        line,
        message,
    };
    match record.get("verdict") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(v)) => match v.get("correct") {
            Some(Value::Bool(b)) => Ok(Some(*b)),
            None | Some(Value::Null) => Ok(None),
            Some(other) => Err(err(format!(
                "field `verdict.correct`: expected a boolean, got {}",
                kind(other)
            ))),
        },
        Some(other) => Err(err(format!(
            "field `verdict`: expected an object, got {}",
            kind(other)
        ))),
    }
}

fn parse_record(
    record: &Map<String, Value>,
    format: InputFormat,
    path: &Path,
    line: usize,
) -> Result<(Prompt, Completion, bool)> {
    let err = |message: String| Error::Input {
        path: path.to_path_buf(),
        line,
        message,
    };
    let problem = problem_from_record(record, format, path, line)?;
    let finished = match record.get("finish_reason") {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s != "length",
        Some(other) => {
            return Err(err(format!(
                "field `finish_reason`: expected `stop` or `length`, got {}",
                kind(other)
            )));
        }
    };
    let text = |name: &str, value: &Value| -> Result<String> {
        match value {
            Value::String(s) => Ok(s.clone()),
            other => Err(err(format!(
                "field `{name}`: expected a string, got {}",
                kind(other)
            ))),
        }
    };
    if let Some(value) = record.get("completion_ids") {
        let ids = value
            .as_array()
            .and_then(|items| {
                items
                    .iter()
                    .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
                    .collect::<Option<Vec<u32>>>()
            })
            .ok_or_else(|| {
                err(format!(
                    "field `completion_ids`: expected an array of token ids, got {}",
                    kind(value)
                ))
            })?;
        return Ok((problem.prompt, Completion::Ids(ids), false));
    }
    if let Some(value) = record.get("completion") {
        let text = text("completion", value)?;
        return Ok((problem.prompt, Completion::Text { text, finished }, false));
    }
    if let Some(value) = record.get("response") {
        let mut text = text("response", value)?;
        let reasoning = match record.get("reasoning") {
            None | Some(Value::Null) => None,
            Some(value) => Some(self::text_field("reasoning", value, path, line)?),
        };
        if let Some(reasoning) = &reasoning {
            text = crate::reasoning::join(
                reasoning,
                &text,
                finished,
                &crate::reasoning::ThinkTags::default(),
            );
        }
        return Ok((
            problem.prompt,
            Completion::Text { text, finished },
            reasoning.is_some(),
        ));
    }
    // A conversation ending with an assistant turn: that turn is the completion.
    if let Some(Value::Array(messages)) = record.get("messages")
        && let Some(Value::Object(last)) = messages.last()
        && last.get("role").and_then(Value::as_str) == Some("assistant")
        && let Some(Value::String(content)) = last.get("content")
        && let Prompt::Messages(prompt) = &problem.prompt
        && prompt.len() + 1 == messages.len()
    {
        let prompt: Vec<Message> = prompt.clone();
        return Ok((
            Prompt::Messages(prompt),
            Completion::Text {
                text: content.clone(),
                finished,
            },
            false,
        ));
    }
    Err(err(
        "missing field `response`: expected the completion as `response`, `completion`, \
         `completion_ids` or a final assistant message"
            .into(),
    ))
}

fn text_field(name: &str, value: &Value, path: &Path, line: usize) -> Result<String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        other => Err(Error::Input {
            path: path.to_path_buf(),
            line,
            message: format!("field `{name}`: expected a string, got {}", kind(other)),
        }),
    }
}

/// The batches of one epoch, as indices into `lengths`: examples are shuffled, sorted by length
/// (so a batch holds similar lengths and pads little), cut into batches of `batch_size`, and the
/// batches shuffled. A pure function of `(lengths, batch_size, seed, epoch)`.
pub fn epoch_batches(
    lengths: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: usize,
) -> Vec<Vec<usize>> {
    let mut rng = epoch_rng(seed, epoch);
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(&mut rng);
    // Stable: equal lengths keep their shuffled order.
    order.sort_by_key(|&i| lengths[i]);
    let mut batches: Vec<Vec<usize>> = order
        .chunks(batch_size.max(1))
        .map(<[usize]>::to_vec)
        .collect();
    batches.shuffle(&mut rng);
    batches
}

/// The RNG of one epoch's data order: ChaCha8 seeded with `seed`, stream `epoch`.
pub fn epoch_rng(seed: u64, epoch: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch as u64);
    rng
}

/// Batches per epoch for `examples` examples.
pub fn batches_per_epoch(examples: usize, batch_size: usize) -> usize {
    examples.div_ceil(batch_size.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_a_pure_function_of_seed_and_epoch() {
        let lengths: Vec<usize> = (0..23).map(|i| (i * 7) % 11 + 3).collect();
        let a = epoch_batches(&lengths, 4, 5, 0);
        assert_eq!(a, epoch_batches(&lengths, 4, 5, 0));
        assert_ne!(a, epoch_batches(&lengths, 4, 5, 1));
        assert_ne!(a, epoch_batches(&lengths, 4, 6, 0));
        assert_eq!(a.len(), batches_per_epoch(23, 4));
        let mut all: Vec<usize> = a.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..23).collect::<Vec<_>>());
        // Each batch spans a narrow range of lengths: sorted before cutting.
        let mut spans: Vec<(usize, usize)> = a
            .iter()
            .map(|b| {
                let l: Vec<usize> = b.iter().map(|&i| lengths[i]).collect();
                (*l.iter().min().unwrap_or(&0), *l.iter().max().unwrap_or(&0))
            })
            .collect();
        spans.sort_unstable();
        for pair in spans.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "{spans:?}");
        }
    }
}
