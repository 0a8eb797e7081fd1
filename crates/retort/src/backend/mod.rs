//! The [`Backend`] trait: "a model you can ask", local or remote, so every stage works with both.
//!
//! A backend receives a batch of [`GenerateRequest`]s and reports each [`RequestOutcome`] to a sink as
//! soon as it completes, so a stage can append results to its journal in completion order and a
//! killed run loses nothing that finished. Failures after all retries are reported, never dropped.

pub mod local;
pub mod open;
pub mod openai;
pub mod scorer;

use serde::{Deserialize, Serialize};

use crate::error::Result;

/// One chat message (`role`, `content`), as in the OpenAI and Hugging Face chat formats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The message text.
    pub content: String,
}

/// What the model is asked to continue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prompt {
    /// Raw text, sent as is (completions endpoint for remote models).
    Text(String),
    /// Chat messages, rendered with the model's chat template (`add_generation_prompt`).
    Messages(Vec<Message>),
    /// Token ids in the model's vocabulary.
    Ids(Vec<u32>),
}

/// Sampling settings shared by every backend. `temperature == 0` means greedy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Softmax temperature; 0 is greedy decoding.
    pub temperature: f64,
    /// Nucleus sampling mass (1.0 disables).
    pub top_p: f64,
    /// Keep only the k most likely tokens (None disables).
    pub top_k: Option<usize>,
    /// Maximum number of new tokens.
    pub max_new_tokens: usize,
    /// Seed for reproducible sampling; each request derives its own stream from it.
    pub seed: Option<u64>,
    /// Extra stop strings (EOS ids always stop).
    pub stop: Vec<String>,
    /// Return this many top log-probs per generated token (0 = none).
    pub logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: None,
            max_new_tokens: 1024,
            seed: None,
            stop: Vec::new(),
            logprobs: 0,
        }
    }
}

impl SamplingParams {
    /// Checks the ranges: `max_new_tokens` at least 1, `temperature` at least 0, `top_p` in
    /// (0, 1], `top_k` at least 1.
    pub fn validate(&self) -> crate::Result<()> {
        let bad = |flag: &str, why: String| crate::Error::Invalid(format!("`--{flag}`: {why}"));
        if self.max_new_tokens == 0 {
            return Err(bad("max-new-tokens", "must be at least 1".into()));
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(bad(
                "temperature",
                format!("must be 0 (greedy) or more, got {}", self.temperature),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(bad(
                "top-p",
                format!("must lie in (0, 1], got {}", self.top_p),
            ));
        }
        if self.top_k == Some(0) {
            return Err(bad("top-k", "must be at least 1".into()));
        }
        Ok(())
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An EOS token or a stop string.
    Stop,
    /// `max_new_tokens` reached.
    Length,
}

/// One generation request: the prompt, its sample index and a caller-chosen key.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Caller's key, returned unchanged in the outcome (e.g. the record index).
    pub key: usize,
    /// Sample index k of this request, used to derive a distinct seed per sample.
    pub sample: usize,
    /// What to continue.
    pub prompt: Prompt,
}

/// Log-probability of one token, with the alternatives the backend reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// The token id when the backend knows it.
    pub id: Option<u32>,
    /// The token text when the backend reports it.
    pub token: Option<String>,
    /// Log-probability of this token.
    pub logprob: f64,
    /// Top alternatives as (id or text, log-prob), most likely first.
    pub top: Vec<(String, f64)>,
}

/// A finished completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// The generated text (for chat models with separate reasoning, the final content).
    pub text: String,
    /// Reasoning returned separately by the server (`reasoning_content`), if any.
    pub reasoning: Option<String>,
    /// Generated token ids, when known.
    pub token_ids: Option<Vec<u32>>,
    /// Why generation ended.
    pub finish_reason: FinishReason,
    /// Prompt tokens counted by the backend.
    pub prompt_tokens: usize,
    /// Completion tokens counted by the backend.
    pub completion_tokens: usize,
    /// Per-token log-probs when requested.
    pub logprobs: Option<Vec<TokenLogprob>>,
}

/// The result of one request after all retries.
#[derive(Debug)]
pub struct RequestOutcome {
    /// The request's key.
    pub key: usize,
    /// The request's sample index.
    pub sample: usize,
    /// The completion, or a description of the permanent failure.
    pub result: std::result::Result<Completion, String>,
    /// Number of attempts made (1 when the first succeeded).
    pub attempts: usize,
    /// The failure lies in this record alone and no retry can fix it (e.g. a prompt longer
    /// than the model's context): the record is skipped, not counted as failed.
    pub unusable: bool,
}

/// Per-token log-probs of a completion given a prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    /// Completion token ids, in the backend's vocabulary when known.
    pub completion_ids: Option<Vec<u32>>,
    /// Per-token log-probs of the completion.
    pub token_logprobs: Vec<f64>,
    /// Top-k alternatives per completion token (empty when not requested).
    pub top_logprobs: Vec<Vec<(String, f64)>>,
}

/// A model you can ask: local (candle) or remote (OpenAI-compatible HTTP).
pub trait Backend: Send + Sync {
    /// A short name for manifests and records (the model spec, never a secret).
    fn name(&self) -> &str;

    /// Runs every request, calling `sink` once per request as it completes (in any order).
    /// Returns an error only for a failure that stops the whole batch (e.g. a broken model);
    /// a request that fails for good is reported through `sink` with `result: Err`.
    fn generate(
        &self,
        requests: Vec<GenerateRequest>,
        params: &SamplingParams,
        sink: &mut dyn FnMut(RequestOutcome),
    ) -> Result<()>;

    /// Per-token log-probs of `completion` given `prompt`, with `top_k` alternatives per token.
    fn score(&self, prompt: &Prompt, completion: &str, top_k: usize) -> Result<Scored>;
}
