//! Reasoning in traces: how a server's separate reasoning (`reasoning_content`) becomes part of a
//! trace ([`ReasoningMode`], [`join`]) and how a stage finds the answer part of a response that
//! carries its reasoning inline ([`answer_part`]). The tags are a [`ThinkTags`] pair.
//!
//! A server with a reasoning parser (vLLM/SGLang `--reasoning-parser`, the usual setup for R1 and
//! Qwen3 teachers) splits a generation into `reasoning_content` and `content`. Every later stage
//! (verify, select, distill, trace) reads one `response` text, so by default ([`ReasoningMode::Keep`])
//! the two are joined back in the teacher's native form, the one its chat template writes for a
//! past assistant turn (Qwen3, DeepSeek-R1):
//!
//! ```text
//! <think>\n{reasoning without leading/trailing newlines}\n</think>\n\n{answer without leading newlines}
//! ```
//!
//! A generation cut off by the token limit inside its reasoning (no answer yet) is joined without
//! the closing tag, as the model wrote it, so no stage mistakes an unfinished thought for an answer.
//!
//! ```
//! use retort::reasoning::{ThinkTags, answer_part, join};
//! let tags = ThinkTags::default();
//! let text = join("\nLet me think.\n", "\n\nThe answer is 4.", true, &tags);
//! assert_eq!(text, "<think>\nLet me think.\n</think>\n\nThe answer is 4.");
//! assert_eq!(answer_part(&text, &tags), "\n\nThe answer is 4.");
//! ```

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// What `generate` does with reasoning a server returns separately.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum ReasoningMode {
    /// Join it into `response` in the teacher's native form (every later stage sees it).
    #[default]
    Keep,
    /// Discard it: `response` is the final answer only.
    Drop,
    /// Keep it in its own `reasoning` field; `response` is the final answer only.
    Separate,
}

/// The pair of tags around a model's reasoning, `<think>` and `</think>` by default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThinkTags {
    /// Opens the reasoning.
    pub open: String,
    /// Closes the reasoning.
    pub close: String,
}

impl Default for ThinkTags {
    fn default() -> Self {
        Self {
            open: "<think>".to_owned(),
            close: "</think>".to_owned(),
        }
    }
}

impl ThinkTags {
    /// A pair from its two tags; both must be non-empty and differ.
    pub fn new(open: &str, close: &str) -> crate::Result<Self> {
        if open.is_empty() || close.is_empty() || open == close {
            return Err(crate::Error::Invalid(format!(
                "think tags `{open}` `{close}`: expected two different, non-empty tags, e.g. `<think>` `</think>`"
            )));
        }
        Ok(Self {
            open: open.to_owned(),
            close: close.to_owned(),
        })
    }

    fn is_default(&self) -> bool {
        self.open == "<think>" && self.close == "</think>"
    }
}

/// Joins `reasoning` and `answer` in the native form (see the module docs). `finished` is false
/// when generation stopped at the token limit: with an empty answer the reasoning is then left
/// open.
pub fn join(reasoning: &str, answer: &str, finished: bool, tags: &ThinkTags) -> String {
    let reasoning = reasoning.trim_matches('\n');
    let answer = answer.trim_start_matches('\n');
    if !finished && answer.is_empty() {
        return format!("{}\n{reasoning}", tags.open);
    }
    format!("{}\n{reasoning}\n{}\n\n{answer}", tags.open, tags.close)
}

/// The trace fields for a generation whose final text is `text` and whose separate reasoning is
/// `reasoning`: (`response`, `reasoning` field) under `mode`. Without separate reasoning the text
/// is kept as is (a server without a reasoning parser returns the tags inline).
pub fn shape(
    text: &str,
    reasoning: Option<&str>,
    finished: bool,
    mode: ReasoningMode,
    tags: &ThinkTags,
) -> (String, Option<String>) {
    match (reasoning, mode) {
        (None, _) | (Some(_), ReasoningMode::Drop) => (text.to_owned(), None),
        (Some(reasoning), ReasoningMode::Keep) => (join(reasoning, text, finished, tags), None),
        (Some(reasoning), ReasoningMode::Separate) => (text.to_owned(), Some(reasoning.to_owned())),
    }
}

/// The part of `response` an answer is read from: the text after the last closing tag when there
/// is one; otherwise the whole text (with `tags` other than the default rewritten to
/// `<think>`/`</think>`, so the verifier treats an unclosed reasoning block as it treats `<think>`:
/// only a strong answer such as `\boxed{}` counts).
pub fn answer_part<'a>(response: &'a str, tags: &ThinkTags) -> Cow<'a, str> {
    if let Some(at) = response.rfind(tags.close.as_str()) {
        return Cow::Borrowed(&response[at + tags.close.len()..]);
    }
    if tags.is_default() || !response.contains(tags.open.as_str()) {
        return Cow::Borrowed(response);
    }
    Cow::Owned(response.replace(tags.open.as_str(), "<think>"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_like_the_qwen3_template_and_splits_back() {
        let tags = ThinkTags::default();
        assert_eq!(
            join("a\nb", "ans", true, &tags),
            "<think>\na\nb\n</think>\n\nans"
        );
        // Truncated inside the reasoning: no closing tag, and no answer part to read.
        let open = join("half a tho", "", false, &tags);
        assert_eq!(open, "<think>\nhalf a tho");
        assert_eq!(answer_part(&open, &tags), open);
        // Truncated in the answer: the reasoning did close.
        assert_eq!(
            join("r", "The ans", false, &tags),
            "<think>\nr\n</think>\n\nThe ans"
        );
        let seed = ThinkTags::new("<seed:think>", "</seed:think>").expect("tags");
        let text = join("r", "42", true, &seed);
        assert_eq!(text, "<seed:think>\nr\n</seed:think>\n\n42");
        assert_eq!(answer_part(&text, &seed), "\n\n42");
        assert_eq!(
            answer_part("<seed:think>maybe 3", &seed),
            "<think>maybe 3",
            "an unclosed custom tag reads as an unclosed <think>"
        );
        assert_eq!(answer_part("plain 5", &seed), "plain 5");
        assert!(ThinkTags::new("<t>", "<t>").is_err());
        let keep = shape("4", Some("r"), true, ReasoningMode::Keep, &tags);
        assert_eq!(keep, ("<think>\nr\n</think>\n\n4".to_owned(), None));
        let separate = shape("4", Some("r"), true, ReasoningMode::Separate, &tags);
        assert_eq!(separate, ("4".to_owned(), Some("r".to_owned())));
        let dropped = shape("4", Some("r"), true, ReasoningMode::Drop, &tags);
        assert_eq!(dropped, ("4".to_owned(), None));
        assert_eq!(shape("4", None, true, ReasoningMode::Keep, &tags).0, "4");
    }
}
