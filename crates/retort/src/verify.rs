//! The verify stage: adds `"verdict": {"correct", "extracted"}` to every record by comparing its
//! response's final answer with its gold answer ([`retort_verify`]), plus `"reason"`
//! (`no_answer` or `truncated`) when no answer was extracted. A record's `finish_reason`
//! (`length` for a generation cut at its token limit) is passed to the verifier. A response that
//! carries its reasoning inline is read after the reasoning's closing tag
//! ([`crate::reasoning::answer_part`]), so a number in the chain of thought never counts as the
//! answer. Streams the input in chunks,
//! verifies each chunk on all cores, and writes the output atomically in input order.

use std::io::Write;
use std::path::Path;

use rayon::prelude::*;
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::error::{Error, Result};
use crate::io::{AtomicFile, RecordReader, read::kind};
use crate::reasoning::{ThinkTags, answer_part};

pub use retort_verify::{Verdict, VerifyOptions};

/// Options of the verify stage.
#[derive(Debug, Clone)]
pub struct VerifyStageOptions {
    /// Field holding the gold answer (a plain answer, a GSM8K `#### n` solution or a `\boxed{}` solution).
    pub gold_field: String,
    /// Field holding the model response.
    pub response_field: String,
    /// Equivalence policy.
    pub policy: VerifyOptions,
    /// Records verified per parallel chunk.
    pub chunk_size: usize,
    /// The tags around inline reasoning; the answer is read after the closing one.
    pub think_tags: ThinkTags,
}

impl Default for VerifyStageOptions {
    fn default() -> Self {
        Self {
            gold_field: "answer".into(),
            response_field: "response".into(),
            policy: VerifyOptions::default(),
            chunk_size: 8192,
            think_tags: ThinkTags::default(),
        }
    }
}

/// Counts from a verify run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifySummary {
    /// Records verified.
    pub total: usize,
    /// Records judged correct.
    pub correct: usize,
    /// Records whose response had no extractable final answer.
    pub no_answer: usize,
}

impl VerifySummary {
    /// Fraction correct (0 when empty).
    pub fn accuracy(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.correct as f64 / self.total as f64
        }
    }
}

/// Verifies one record in place; `path` and `line` name it in errors.
pub fn verify_record(
    record: &mut Map<String, Value>,
    options: &VerifyStageOptions,
    path: &Path,
    line: usize,
) -> Result<Verdict> {
    let field = |name: &str| -> Result<String> {
        match record.get(name) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Number(n)) => Ok(n.to_string()),
            Some(other) => Err(Error::Input {
                path: path.to_path_buf(),
                line,
                message: format!("field `{name}`: expected a string, got {}", kind(other)),
            }),
            None => {
                let flag = if name == options.gold_field {
                    "--gold-field"
                } else {
                    "--response-field"
                };
                Err(Error::Input {
                    path: path.to_path_buf(),
                    line,
                    message: format!(
                        "missing field `{name}`\nhint: pass `{flag} NAME` if the record keeps it \
                         under another name"
                    ),
                })
            }
        }
    };
    let gold = field(&options.gold_field)?;
    let response = field(&options.response_field)?;
    let finish_reason = record.get("finish_reason").and_then(Value::as_str);
    let answer = answer_part(&response, &options.think_tags);
    let verdict = retort_verify::verify_finished(&answer, &gold, finish_reason, &options.policy);
    record.insert("verdict".into(), verdict_json(&verdict));
    Ok(verdict)
}

/// A record's `verdict` field: `correct`, `extracted`, and `reason` when no answer was found.
pub fn verdict_json(verdict: &Verdict) -> Value {
    let mut out = json!({ "correct": verdict.correct, "extracted": verdict.extracted });
    if let Some(reason) = verdict.reason {
        out["reason"] = json!(reason.as_str());
    }
    out
}

/// Verifies every record of `input` into `output` (written atomically: nothing on error).
/// `progress` is called with the number of records done so far.
pub fn verify_file(
    input: &Path,
    output: &Path,
    options: &VerifyStageOptions,
    progress: &dyn Fn(usize),
) -> Result<VerifySummary> {
    let mut reader = RecordReader::open(input)?;
    let mut out = AtomicFile::create(output)?;
    let mut summary = VerifySummary::default();
    loop {
        let chunk: Vec<(usize, Map<String, Value>)> = reader
            .by_ref()
            .take(options.chunk_size.max(1))
            .collect::<Result<_>>()?;
        if chunk.is_empty() {
            break;
        }
        let verified: Vec<(Map<String, Value>, Verdict)> = chunk
            .into_par_iter()
            .map(|(line, mut record)| {
                let verdict = verify_record(&mut record, options, input, line)?;
                Ok((record, verdict))
            })
            .collect::<Result<_>>()?;
        for (record, verdict) in &verified {
            summary.total += 1;
            summary.correct += usize::from(verdict.correct);
            summary.no_answer += usize::from(verdict.extracted.is_none());
            serde_json::to_writer(&mut out, record).map_err(|e| Error::Invalid(e.to_string()))?;
            out.write_all(b"\n")?;
        }
        progress(summary.total);
    }
    if summary.total == 0 {
        return Err(Error::Invalid(format!(
            "`{}` holds no records\nhint: pass a JSONL file with one record per line",
            input.display()
        )));
    }
    out.commit()?;
    Ok(summary)
}
