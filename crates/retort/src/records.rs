//! Input records and the dataset shapes retort recognises (DESIGN.md §3).
//!
//! A [`Problem`] is what a stage needs from an input record: a stable id, the prompt and the gold
//! answer. Everything else in the record is carried through untouched by the stages.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::backend::{Message, Prompt};
use crate::error::{Error, Result};
use crate::io::read::kind;

/// The shape of an input record.
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InputFormat {
    /// Recognise the shape from the fields present (the order of the variants below).
    #[default]
    Auto,
    /// `prompt_ids`: token ids in the model's vocabulary.
    Ids,
    /// `messages`: chat messages (`role`, `content`).
    Messages,
    /// `conversations`: ShareGPT (`from`: human/gpt/system, `value`).
    Sharegpt,
    /// `prompt`: raw text sent as is.
    Prompt,
    /// GSM8K: `question`, `answer` ending `#### n`.
    Gsm8k,
    /// MATH: `problem`, and `answer` or a `solution` with `\boxed{}`.
    Math,
}

/// A problem: what generation and evaluation need from a record.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// The record's `id`, or a stable hash of its prompt.
    pub id: String,
    /// What the model continues.
    pub prompt: Prompt,
    /// The gold answer (plain, or a full solution with `\boxed{}`), when the record has one.
    pub answer: Option<String>,
}

/// Turns an input record into a [`Problem`]; `path` and `line` name the record in errors.
pub fn problem_from_record(
    record: &Map<String, Value>,
    format: InputFormat,
    path: &Path,
    line: usize,
) -> Result<Problem> {
    let err = |message: String| Error::Input {
        path: path.to_path_buf(),
        line,
        message,
    };
    let format = if format == InputFormat::Auto {
        detect(record).ok_or_else(|| {
        err("expected one of the fields `prompt_ids`, `messages`, `conversations`, `prompt`, `question` (GSM8K) or `problem` (MATH)".into())
    })?
    } else {
        format
    };
    let text_field = |name: &str| -> Result<String> {
        match record.get(name) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(err(format!(
                "field `{name}`: expected a string, got {}",
                kind(other)
            ))),
            None => Err(err(format!("missing field `{name}`"))),
        }
    };
    let (prompt, default_answer) = match format {
        InputFormat::Auto => unreachable!("auto is resolved above"),
        InputFormat::Ids => {
            let ids = match record.get("prompt_ids") {
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
                    .collect::<Option<Vec<u32>>>()
                    .ok_or_else(|| {
                        err("field `prompt_ids`: expected an array of token ids".into())
                    })?,
                Some(other) => {
                    return Err(err(format!(
                        "field `prompt_ids`: expected an array of token ids, got {}",
                        kind(other)
                    )));
                }
                None => return Err(err("missing field `prompt_ids`".into())),
            };
            (Prompt::Ids(ids), None)
        }
        InputFormat::Messages => {
            let mut messages =
                parse_messages(record.get("messages"), "messages", "role", "content", &err)?;
            let reference = trailing_assistant(&mut messages);
            (Prompt::Messages(messages), reference)
        }
        InputFormat::Sharegpt => {
            let mut messages = parse_messages(
                record.get("conversations"),
                "conversations",
                "from",
                "value",
                &err,
            )?;
            let reference = trailing_assistant(&mut messages);
            (Prompt::Messages(messages), reference)
        }
        InputFormat::Prompt => (Prompt::Text(text_field("prompt")?), None),
        InputFormat::Gsm8k => {
            let question = text_field("question")?;
            (
                Prompt::Messages(vec![Message {
                    role: "user".into(),
                    content: question,
                }]),
                None,
            )
        }
        InputFormat::Math => {
            let problem = text_field("problem")?;
            let solution = match record.get("solution") {
                Some(Value::String(s)) => Some(s.clone()),
                _ => None,
            };
            (
                Prompt::Messages(vec![Message {
                    role: "user".into(),
                    content: problem,
                }]),
                solution,
            )
        }
    };
    let answer = match record.get("answer") {
        Some(Value::String(s)) => Some(gsm8k_final(s).unwrap_or(s).to_string()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(Value::Null) | None => default_answer,
        Some(other) => {
            return Err(err(format!(
                "field `answer`: expected a string or a number, got {}",
                kind(other)
            )));
        }
    };
    let id = match record.get("id") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => {
            return Err(err(format!(
                "field `id`: expected a string or a number, got {}",
                kind(other)
            )));
        }
        None => stable_id(&prompt),
    };
    Ok(Problem { id, prompt, answer })
}

fn detect(record: &Map<String, Value>) -> Option<InputFormat> {
    [
        ("prompt_ids", InputFormat::Ids),
        ("messages", InputFormat::Messages),
        ("conversations", InputFormat::Sharegpt),
        ("prompt", InputFormat::Prompt),
        ("question", InputFormat::Gsm8k),
        ("problem", InputFormat::Math),
    ]
    .into_iter()
    .find(|(field, _)| record.contains_key(*field))
    .map(|(_, format)| format)
}

/// GSM8K golds end with `#### n`: returns `n` when present.
fn gsm8k_final(answer: &str) -> Option<&str> {
    answer.rsplit_once("####").map(|(_, tail)| tail.trim())
}

fn parse_messages(
    value: Option<&Value>,
    field: &str,
    role_key: &str,
    content_key: &str,
    err: &dyn Fn(String) -> Error,
) -> Result<Vec<Message>> {
    let items = match value {
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(err(format!(
                "field `{field}`: expected an array of messages, got {}",
                kind(other)
            )));
        }
        None => return Err(err(format!("missing field `{field}`"))),
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let role = item.get(role_key).and_then(Value::as_str);
            let content = item.get(content_key).and_then(Value::as_str);
            match (role, content) {
                (Some(role), Some(content)) => Ok(Message {
                    role: normalise_role(role).into(),
                    content: content.into(),
                }),
                _ => Err(err(format!(
                    "field `{field}[{i}]`: expected string fields `{role_key}` and `{content_key}`"
                ))),
            }
        })
        .collect()
}

fn normalise_role(role: &str) -> &str {
    match role {
        "human" | "user" => "user",
        "gpt" | "assistant" | "model" => "assistant",
        "system" => "system",
        other => other,
    }
}

/// A conversation ending with an assistant turn keeps that turn as the reference answer.
fn trailing_assistant(messages: &mut Vec<Message>) -> Option<String> {
    if messages.last().is_some_and(|m| m.role == "assistant") {
        messages.pop().map(|m| m.content)
    } else {
        None
    }
}

/// A stable id for a prompt: the first 16 hex digits of the SHA-256 of its JSON form.
pub fn stable_id(prompt: &Prompt) -> String {
    let bytes = serde_json::to_vec(prompt).unwrap_or_default();
    hex::encode(&Sha256::digest(&bytes)[..8])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn problem(v: Value) -> Result<Problem> {
        problem_from_record(
            v.as_object().unwrap(),
            InputFormat::Auto,
            Path::new("in.jsonl"),
            7,
        )
    }

    #[test]
    fn recognises_dataset_shapes() {
        let p =
            problem(json!({"question": "How many?", "answer": "He has 3.\n#### 1,234"})).unwrap();
        assert_eq!(p.answer.as_deref(), Some("1,234"));
        assert!(matches!(p.prompt, Prompt::Messages(ref m) if m[0].content == "How many?"));
        let p = problem(json!({"problem": "x?", "solution": "so \\boxed{5}"})).unwrap();
        assert_eq!(p.answer.as_deref(), Some("so \\boxed{5}"));
        let p = problem(json!({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "42"}]})).unwrap();
        assert_eq!(p.answer.as_deref(), Some("42"));
        assert!(matches!(p.prompt, Prompt::Messages(ref m) if m.len() == 1 && m[0].role == "user"));
        let p = problem(json!({"id": 5, "prompt_ids": [1, 2, 3]})).unwrap();
        assert_eq!(p.id, "5");
        assert_eq!(p.prompt, Prompt::Ids(vec![1, 2, 3]));
    }

    #[test]
    fn stable_ids_and_clear_errors() {
        let a = problem(json!({"prompt": "Q: 1+1?\nA:"})).unwrap();
        let b = problem(json!({"prompt": "Q: 1+1?\nA:", "other": 1})).unwrap();
        assert_eq!(a.id, b.id);
        assert_eq!(a.id.len(), 16);
        let err = problem(json!({"prompt": 3})).unwrap_err().to_string();
        assert_eq!(
            err,
            "in.jsonl:7: field `prompt`: expected a string, got a number"
        );
        let err = problem(json!({"text": "x"})).unwrap_err().to_string();
        assert!(
            err.starts_with("in.jsonl:7: expected one of the fields"),
            "{err}"
        );
        let err = problem(json!({"prompt_ids": [1, -2]}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`prompt_ids`"), "{err}");
    }
}
