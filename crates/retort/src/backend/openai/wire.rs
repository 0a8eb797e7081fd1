//! JSON shapes of the OpenAI-compatible API ([`ChatRequest`], [`CompletionRequest`] and their
//! responses) and their conversion to retort's [`Completion`] and [`Scored`].
//!
//! Only the fields retort uses are modelled; unknown response fields are ignored, so vLLM, SGLang
//! and llama.cpp extensions pass through harmlessly.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::retry::AttemptError;
use crate::backend::{Completion, FinishReason, Message, Scored, TokenLogprob};

/// Sampling fields shared by both endpoints.
#[derive(Debug, Serialize)]
pub(crate) struct CommonParams<'a> {
    pub temperature: f64,
    pub top_p: f64,
    /// vLLM/SGLang extension; OpenAI itself rejects it, so it is omitted when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    pub max_tokens: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub stop: &'a [String],
    /// Choices per request. retort always sends 1 (see the module docs of `openai`).
    pub n: usize,
}

/// Body of `POST /chat/completions`.
#[derive(Debug, Serialize)]
pub(crate) struct ChatRequest<'a> {
    pub model: &'a str,
    pub messages: &'a [Message],
    #[serde(flatten)]
    pub common: CommonParams<'a>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub logprobs: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<usize>,
}

/// The `prompt` of a completions request: text or token ids.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub(crate) enum PromptField<'a> {
    Text(&'a str),
    Ids(&'a [u32]),
}

/// Body of `POST /completions` (generation and scoring).
#[derive(Debug, Serialize)]
pub(crate) struct CompletionRequest<'a> {
    pub model: &'a str,
    pub prompt: PromptField<'a>,
    #[serde(flatten)]
    pub common: CommonParams<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<usize>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub echo: bool,
    /// vLLM extension: log-probs of every prompt token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<usize>,
    /// vLLM extension: return `prompt_token_ids` / `token_ids` in each choice.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub return_token_ids: bool,
}

/// Token counts reported by the server.
#[derive(Debug, Default, Clone, Copy, Deserialize)]
pub(crate) struct Usage {
    #[serde(default)]
    pub prompt_tokens: usize,
    #[serde(default)]
    pub completion_tokens: usize,
}

#[derive(Debug, Deserialize)]
struct ChatResponse {
    #[serde(default)]
    choices: Vec<ChatChoice>,
    usage: Option<Usage>,
}

#[derive(Debug, Deserialize)]
struct ChatChoice {
    message: ChatMessageOut,
    finish_reason: Option<String>,
    logprobs: Option<ChatLogprobs>,
    token_ids: Option<Vec<u32>>,
}

#[derive(Debug, Deserialize)]
struct ChatMessageOut {
    content: Option<String>,
    /// vLLM's reasoning parsers (DeepSeek-R1, Qwen3) and DeepSeek's API.
    reasoning_content: Option<String>,
    /// Newer vLLM and OpenRouter spell it `reasoning`.
    reasoning: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChatLogprobs {
    content: Option<Vec<ChatTokenLogprob>>,
}

#[derive(Debug, Deserialize)]
struct ChatTokenLogprob {
    token: String,
    logprob: f64,
    #[serde(default)]
    top_logprobs: Vec<TopEntry>,
}

#[derive(Debug, Deserialize)]
struct TopEntry {
    token: String,
    logprob: f64,
}

#[derive(Debug, Deserialize)]
struct CompletionResponse {
    #[serde(default)]
    choices: Vec<CompletionChoice>,
    usage: Option<Usage>,
}

#[derive(Debug, Deserialize)]
struct CompletionChoice {
    #[serde(default)]
    text: String,
    finish_reason: Option<String>,
    logprobs: Option<CompletionLogprobs>,
    token_ids: Option<Vec<u32>>,
    prompt_token_ids: Option<Vec<u32>>,
    /// vLLM: one entry per prompt token (the first is null), token id -> log-prob.
    prompt_logprobs: Option<Vec<Option<HashMap<String, PromptLogprob>>>>,
}

#[derive(Debug, Deserialize)]
struct CompletionLogprobs {
    #[serde(default)]
    tokens: Vec<String>,
    #[serde(default)]
    token_logprobs: Vec<Option<f64>>,
    #[serde(default)]
    top_logprobs: Option<Vec<Option<HashMap<String, f64>>>>,
    /// Character (Unicode scalar) offset of each token in the returned text.
    #[serde(default)]
    text_offset: Vec<usize>,
}

#[derive(Debug, Deserialize)]
struct PromptLogprob {
    logprob: f64,
    rank: Option<usize>,
}

/// A parsed generation: the completion and the server's raw `finish_reason` when it was
/// neither `stop` nor `length` (mapped to [`FinishReason::Stop`]).
pub(crate) struct Parsed {
    pub completion: Completion,
    pub odd_finish_reason: Option<String>,
}

fn malformed(what: &str, error: &serde_json::Error) -> AttemptError {
    AttemptError::retryable(format!("malformed JSON in {what} response: {error}"))
}

fn finish(raw: Option<String>) -> (FinishReason, Option<String>) {
    match raw.as_deref() {
        Some("stop") => (FinishReason::Stop, None),
        Some("length") => (FinishReason::Length, None),
        _ => (
            FinishReason::Stop,
            Some(raw.unwrap_or_else(|| "null".to_owned())),
        ),
    }
}

/// vLLM's `return_tokens_as_token_ids` spells tokens `token_id:123`.
fn token_id(token: &str) -> Option<u32> {
    token.strip_prefix("token_id:")?.parse().ok()
}

fn sorted_top(map: &HashMap<String, f64>) -> Vec<(String, f64)> {
    let mut top: Vec<(String, f64)> = map.iter().map(|(t, &lp)| (t.clone(), lp)).collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    top
}

/// Parses a `/chat/completions` response body.
pub(crate) fn parse_chat(body: &[u8]) -> Result<Parsed, AttemptError> {
    let response: ChatResponse = serde_json::from_slice(body).map_err(|e| malformed("chat", &e))?;
    let usage = response.usage.unwrap_or_default();
    let choice = response
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| AttemptError::retryable("chat response has no `choices`".to_owned()))?;
    let (finish_reason, odd_finish_reason) = finish(choice.finish_reason);
    let logprobs = choice.logprobs.and_then(|l| l.content).map(|content| {
        content
            .into_iter()
            .map(|t| TokenLogprob {
                id: token_id(&t.token),
                top: t
                    .top_logprobs
                    .into_iter()
                    .map(|e| (e.token, e.logprob))
                    .collect(),
                token: Some(t.token),
                logprob: t.logprob,
            })
            .collect()
    });
    let message = choice.message;
    Ok(Parsed {
        completion: Completion {
            text: message.content.unwrap_or_default(),
            reasoning: message.reasoning_content.or(message.reasoning),
            token_ids: choice.token_ids,
            finish_reason,
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            logprobs,
        },
        odd_finish_reason,
    })
}

/// Parses a `/completions` response body (generation, no echo).
pub(crate) fn parse_completion(body: &[u8]) -> Result<Parsed, AttemptError> {
    let response: CompletionResponse =
        serde_json::from_slice(body).map_err(|e| malformed("completions", &e))?;
    let usage = response.usage.unwrap_or_default();
    let choice = response.choices.into_iter().next().ok_or_else(|| {
        AttemptError::retryable("completions response has no `choices`".to_owned())
    })?;
    let (finish_reason, odd_finish_reason) = finish(choice.finish_reason);
    let logprobs = choice.logprobs.map(|l| {
        let tops = l.top_logprobs.unwrap_or_default();
        l.tokens
            .into_iter()
            .enumerate()
            .map(|(i, token)| TokenLogprob {
                id: token_id(&token),
                logprob: l
                    .token_logprobs
                    .get(i)
                    .copied()
                    .flatten()
                    .unwrap_or(f64::NAN),
                top: tops
                    .get(i)
                    .and_then(Option::as_ref)
                    .map(sorted_top)
                    .unwrap_or_default(),
                token: Some(token),
            })
            .collect()
    });
    Ok(Parsed {
        completion: Completion {
            text: choice.text,
            reasoning: None,
            token_ids: choice.token_ids,
            finish_reason,
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            logprobs,
        },
        odd_finish_reason,
    })
}

/// Parses an echo scoring response for `prompt + completion`, where the completion starts at
/// character `boundary` and the scored text is `total` characters long.
///
/// The completion's tokens are the echoed tokens from the one covering character `boundary`
/// (the last with `text_offset <= boundary`, so a token straddling the boundary counts as the
/// completion's) up to the end of the echoed text; a generated token (when the server insisted
/// on `max_tokens >= 1`) starts at `total` and is dropped. Top-k alternatives come from vLLM's
/// `prompt_logprobs` (keyed by token id, ordered by rank) when it is present and aligned with
/// the echoed tokens, else from the echo's `top_logprobs` (keyed by token text). Token ids come
/// from `prompt_token_ids` when aligned, else from `token_id:N` tokens, else are unknown.
pub(crate) fn parse_score(
    body: &[u8],
    boundary: usize,
    total: usize,
    top_k: usize,
) -> Result<Scored, AttemptError> {
    let response: CompletionResponse =
        serde_json::from_slice(body).map_err(|e| malformed("scoring", &e))?;
    let choice =
        response.choices.into_iter().next().ok_or_else(|| {
            AttemptError::retryable("scoring response has no `choices`".to_owned())
        })?;
    let logprobs = choice.logprobs.ok_or_else(|| {
        AttemptError::fatal(
            "scoring response has no `logprobs`: the server does not support `echo` with `logprobs`"
                .to_owned(),
        )
    })?;
    let n = logprobs.tokens.len();
    if boundary >= total {
        return Ok(Scored {
            completion_ids: Some(Vec::new()),
            token_logprobs: Vec::new(),
            top_logprobs: Vec::new(),
        });
    }
    if logprobs.text_offset.len() != n || logprobs.token_logprobs.len() != n {
        return Err(AttemptError::fatal(format!(
            "scoring response: `tokens` ({n}), `token_logprobs` ({}) and `text_offset` ({}) differ in length",
            logprobs.token_logprobs.len(),
            logprobs.text_offset.len()
        )));
    }
    // Echoed tokens end where a generated one starts (offset >= total) or at the end.
    let echoed = logprobs
        .text_offset
        .iter()
        .position(|&o| o >= total)
        .unwrap_or(n);
    let start = logprobs.text_offset[..echoed]
        .iter()
        .rposition(|&o| o <= boundary)
        .ok_or_else(|| {
            AttemptError::fatal("scoring response: no echoed token covers the prompt".to_owned())
        })?;
    let mut token_logprobs = Vec::with_capacity(echoed - start);
    for i in start..echoed {
        token_logprobs.push(logprobs.token_logprobs[i].ok_or_else(|| {
            AttemptError::fatal(format!(
                "scoring response: token {i} (`{}`) has no log-prob; the prompt must not be empty",
                logprobs.tokens[i]
            ))
        })?);
    }
    let completion_ids = match &choice.prompt_token_ids {
        Some(ids) if ids.len() == echoed => Some(ids[start..echoed].to_vec()),
        _ => logprobs.tokens[start..echoed]
            .iter()
            .map(|t| token_id(t))
            .collect(),
    };
    let top_logprobs = if top_k == 0 {
        Vec::new()
    } else {
        match &choice.prompt_logprobs {
            Some(prompt) if prompt.len() == echoed => prompt[start..echoed]
                .iter()
                .map(|entry| {
                    let mut top: Vec<(String, f64, usize)> = entry
                        .iter()
                        .flatten()
                        .map(|(id, lp)| (id.clone(), lp.logprob, lp.rank.unwrap_or(usize::MAX)))
                        .filter(|(_, _, rank)| *rank <= top_k)
                        .collect();
                    top.sort_by(|a, b| a.2.cmp(&b.2).then_with(|| b.1.total_cmp(&a.1)));
                    top.into_iter().map(|(id, lp, _)| (id, lp)).collect()
                })
                .collect(),
            _ => {
                let tops = logprobs.top_logprobs.unwrap_or_default();
                (start..echoed)
                    .map(|i| {
                        let mut top = tops
                            .get(i)
                            .and_then(Option::as_ref)
                            .map(sorted_top)
                            .unwrap_or_default();
                        top.truncate(top_k);
                        top
                    })
                    .collect()
            }
        }
    };
    Ok(Scored {
        completion_ids,
        token_logprobs,
        top_logprobs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_keeps_reasoning_and_maps_finish_reasons() {
        let body = br#"{"choices":[{"index":0,"message":{"role":"assistant",
            "content":"<think>x</think> 42","reasoning_content":"hmm"},"finish_reason":"length"}],
            "usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}"#;
        let parsed = parse_chat(body).expect("valid");
        assert_eq!(parsed.completion.text, "<think>x</think> 42");
        assert_eq!(parsed.completion.reasoning.as_deref(), Some("hmm"));
        assert_eq!(parsed.completion.finish_reason, FinishReason::Length);
        assert_eq!(parsed.completion.completion_tokens, 5);
        let body =
            br#"{"choices":[{"message":{"content":"a","reasoning":"r"},"finish_reason":"abort"}]}"#;
        let parsed = parse_chat(body).expect("valid");
        assert_eq!(parsed.completion.reasoning.as_deref(), Some("r"));
        assert_eq!(parsed.completion.finish_reason, FinishReason::Stop);
        assert_eq!(parsed.odd_finish_reason.as_deref(), Some("abort"));
        assert!(parse_chat(b"{\"choices\": [").is_err_and(|e| e.retryable));
        assert!(parse_chat(b"{\"choices\": []}").is_err_and(|e| e.retryable));
    }

    #[test]
    fn score_splits_on_character_offsets_with_a_straddling_token() {
        // "Hello wor" + "ld!" tokenised as ["Hello", " world", "!"] plus one generated token.
        let body = br#"{"choices":[{"text":"Hello world!?","logprobs":{
            "tokens":["Hello"," world","!","?"],
            "token_logprobs":[null,-1.5,-0.25,-3.0],
            "top_logprobs":[null,{" world":-1.5," there":-2.0},{"!":-0.25,".":-1.0},{"?":-3.0}],
            "text_offset":[0,5,11,12]},
            "prompt_token_ids":[7,8,9]}]}"#;
        let scored = parse_score(body, 9, 12, 1).expect("valid");
        assert_eq!(scored.token_logprobs, vec![-1.5, -0.25]);
        assert_eq!(scored.completion_ids, Some(vec![8, 9]));
        assert_eq!(
            scored.top_logprobs,
            vec![
                vec![(" world".to_owned(), -1.5)],
                vec![("!".to_owned(), -0.25)]
            ]
        );
    }

    #[test]
    fn score_prefers_prompt_logprobs_for_top_k() {
        let body = br#"{"choices":[{"text":"ab","logprobs":{
            "tokens":["a","b"],"token_logprobs":[null,-0.5],"text_offset":[0,1]},
            "prompt_logprobs":[null,{"12":{"logprob":-0.5,"rank":1,"decoded_token":"b"},
                                     "40":{"logprob":-1.5,"rank":2,"decoded_token":"c"},
                                     "41":{"logprob":-2.5,"rank":3,"decoded_token":"d"}}]}]}"#;
        let scored = parse_score(body, 1, 2, 2).expect("valid");
        assert_eq!(scored.token_logprobs, vec![-0.5]);
        assert_eq!(
            scored.top_logprobs,
            vec![vec![("12".to_owned(), -0.5), ("40".to_owned(), -1.5)]]
        );
        let no_echo = br#"{"choices":[{"text":"x"}]}"#;
        assert!(parse_score(no_echo, 1, 2, 2).is_err_and(|e| !e.retryable));
    }
}
