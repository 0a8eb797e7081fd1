//! Scoring on a server ([`RemoteScorer`]): the server half of the [`TokenScorer`] seam.
//!
//! Every request sends the sequence as token ids (`prompt` = prompt ids then completion ids),
//! tokenised locally, so the server never re-tokenises and each answer is matched to the local
//! tokens by id. Three ways to ask ([`ScoreProtocol`]):
//!
//! - **vLLM `prompt_logprobs`** on `POST URL/completions` (`max_tokens: 1`, `prompt_logprobs:
//!   k`): per position a map from token id to `{logprob, rank}` that always holds the actual
//!   token, plus the top-k (k up to the server's `--max-logprobs`). Gives ranks too.
//! - **`echo` + `logprobs`** on the same endpoint, for servers without `prompt_logprobs`: the
//!   echoed tokens' log-probs; top-k alternatives are keyed by text, so they must be `token_id:N`
//!   (vLLM `--return-tokens-as-token-ids`). No ranks.
//! - **SGLang's native `POST ROOT/generate`** (`input_ids`, `return_logprob`,
//!   `logprob_start_len`, `top_logprobs_num`, `max_new_tokens: 0`), `ROOT` being the URL
//!   without `/v1`. No ranks.
//!
//! [`ScoreProtocol::Auto`] starts with `prompt_logprobs` and switches to `echo` for good the
//! first time a server answers without `prompt_logprobs`.
//!
//! Because the ids are sent, a wrong local tokenizer would go unnoticed; so the first call
//! probes once: a sample text is sent as text (`return_token_ids`), and the ids the server made of
//! it must equal the local tokenizer's, else the call fails naming the first differing position.
//! A server that does not return the ids (or SGLang's native protocol) is not probed. Requests run concurrently under the
//! backend's semaphore, spread over replicas (least outstanding), retried as generation is; one
//! that fails for good fails the call with the record's label.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::retry::{AttemptError, post_with_retries};
use super::{Inner, OpenAiBackend, OpenAiOptions};
use crate::backend::open::BackendOptions;
use crate::backend::scorer::{
    ScoreRequest, ScoreWants, SequenceScores, TokenScorer, check_request,
};
use crate::error::{Error, Result};
use crate::model_spec::ServerSpec;
use retort_model::tokenizer::Tokenizer;

/// How a server is asked for log-probs; see the module docs.
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScoreProtocol {
    /// `prompt-logprobs`, falling back to `echo` when the server ignores it.
    #[default]
    Auto,
    /// vLLM's `prompt_logprobs` on `/v1/completions`.
    PromptLogprobs,
    /// `echo` + `logprobs` on `/v1/completions`.
    Echo,
    /// SGLang's native `/generate`.
    Sglang,
}

impl ScoreProtocol {
    fn code(self) -> u8 {
        match self {
            Self::Auto | Self::PromptLogprobs => 0,
            Self::Echo => 1,
            Self::Sglang => 2,
        }
    }

    fn from_code(code: u8) -> Self {
        match code {
            0 => Self::PromptLogprobs,
            1 => Self::Echo,
            _ => Self::Sglang,
        }
    }
}

/// A served model scored through its local tokenizer; see the module docs.
pub struct RemoteScorer {
    backend: OpenAiBackend,
    tokenizer: Tokenizer,
    eos_ids: Vec<u32>,
    vocab_rows: Option<usize>,
    /// The protocol in use ([`ScoreProtocol::code`]).
    current: Arc<AtomicU8>,
    auto: bool,
    warned_fallback: Arc<AtomicBool>,
    /// The outcome of the tokenizer probe, once run.
    probed: std::sync::OnceLock<std::result::Result<(), String>>,
}

/// The text of the tokenizer probe: digits, operators, LaTeX and a newline, where tokenizers of
/// one family most often differ.
const PROBE_TEXT: &str = "Tokenizer check: 12 + 30 = 42.\nThe answer is \\boxed{42}.";

impl std::fmt::Debug for RemoteScorer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteScorer")
            .field("backend", &self.backend)
            .field(
                "protocol",
                &ScoreProtocol::from_code(self.current.load(Ordering::Relaxed)),
            )
            .finish_non_exhaustive()
    }
}

/// One request's outcome: scores, or "this server does not speak the protocol".
enum Reply {
    Scores(SequenceScores),
    Unsupported(String),
}

impl RemoteScorer {
    /// Builds the client for `server` (no request is sent) with the tokenizer, EOS ids and
    /// vocabulary size of the local folder `tokenizer_dir`.
    pub fn connect(
        server: &ServerSpec,
        tokenizer_dir: &std::path::Path,
        protocol: ScoreProtocol,
        options: &BackendOptions,
    ) -> Result<Self> {
        let backend = OpenAiBackend::connect(
            server,
            OpenAiOptions {
                concurrency: options.concurrency,
                timeout: options.timeout,
                max_retries: options.max_retries,
                backoff_base: options.backoff_base,
                backoff_max: options.backoff_max,
                ..OpenAiOptions::default()
            },
        )?;
        let tokenizer = Tokenizer::from_dir(tokenizer_dir)?;
        let config_path = tokenizer_dir.join("config.json");
        let (vocab_rows, eos_ids) = if config_path.is_file() {
            let config = retort_model::config::ModelConfig::from_file(&config_path)?;
            let generation =
                retort_model::config::GenerationConfig::from_dir(tokenizer_dir, &config)?;
            let eos = if generation.eos_token_ids.is_empty() {
                tokenizer.eos_token_id().into_iter().collect()
            } else {
                generation.eos_token_ids.clone()
            };
            (Some(config.vocab_size), eos)
        } else {
            (None, tokenizer.eos_token_id().into_iter().collect())
        };
        Ok(Self {
            backend,
            tokenizer,
            eos_ids,
            vocab_rows,
            current: Arc::new(AtomicU8::new(protocol.code())),
            auto: protocol == ScoreProtocol::Auto,
            warned_fallback: Arc::new(AtomicBool::new(false)),
            probed: std::sync::OnceLock::new(),
        })
    }

    /// Sends [`PROBE_TEXT`] as text once and compares the server's ids with the local ones; see
    /// the module docs. One attempt: a server that is down fails the real requests anyway.
    fn probe_tokenizer(&self) -> Result<()> {
        let outcome = self.probed.get_or_init(|| {
            if self.protocol() == ScoreProtocol::Sglang {
                return Ok(());
            }
            let local = match self.tokenizer.encode(PROBE_TEXT, true) {
                Ok(ids) => ids,
                Err(e) => return Err(e.to_string()),
            };
            let inner = &self.backend.inner;
            let body = json!({"model": inner.model, "prompt": PROBE_TEXT, "max_tokens": 1,
                "temperature": 0.0, "return_token_ids": true});
            let Ok(body) = serde_json::to_vec(&with_extra(body, &inner.extra_body, ScoreProtocol::Echo))
            else {
                return Ok(());
            };
            let policy = super::retry::RetryPolicy {
                max_retries: 0,
                ..inner.policy
            };
            let (result, _) = self.backend.runtime.block_on(async {
                let replica = inner.replicas.lease();
                post_with_retries(
                    &inner.client,
                    &replica.url("completions"),
                    inner.auth.as_ref(),
                    &body,
                    policy,
                    |bytes| Ok(first_choice(bytes)?.prompt_token_ids),
                )
                .await
            });
            let Ok(Some(served)) = result else {
                tracing::debug!(backend = %inner.name, "tokenizer probe skipped: no `prompt_token_ids`");
                return Ok(());
            };
            match (0..local.len().max(served.len())).find(|&i| local.get(i) != served.get(i)) {
                None => Ok(()),
                Some(position) => Err(format!(
                    "the server tokenizes {PROBE_TEXT:?} differently from the local tokenizer \
                     `{}`: position {position} holds id {:?} there and {:?} here\nhint: score with \
                     the served model's own tokenizer (serve it under its folder or hub name)",
                    self.tokenizer.path().display(),
                    served.get(position),
                    local.get(position)
                )),
            }
        });
        outcome.clone().map_err(|message| Error::Backend {
            backend: self.name().to_owned(),
            message,
        })
    }

    /// The protocol in use now (after any fallback).
    pub fn protocol(&self) -> ScoreProtocol {
        ScoreProtocol::from_code(self.current.load(Ordering::Relaxed))
    }

    /// Requests sent to each replica so far.
    pub fn replica_requests(&self) -> Vec<u64> {
        self.backend.replica_requests()
    }
}

impl TokenScorer for RemoteScorer {
    fn name(&self) -> &str {
        &self.backend.inner.name
    }

    fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    fn eos_ids(&self) -> Vec<u32> {
        self.eos_ids.clone()
    }

    fn vocab_rows(&self) -> Option<usize> {
        self.vocab_rows
    }

    fn score_ids(
        &self,
        requests: &[ScoreRequest],
        wants: ScoreWants,
    ) -> Result<Vec<SequenceScores>> {
        let name = self.name().to_owned();
        for request in requests {
            check_request(&name, request, self.vocab_rows)?;
        }
        if requests.iter().any(|r| !r.completion_ids.is_empty()) {
            self.probe_tokenizer()?;
        }
        let inner = Arc::clone(&self.backend.inner);
        let current = Arc::clone(&self.current);
        let warned = Arc::clone(&self.warned_fallback);
        let auto = self.auto;
        let requests: Vec<ScoreRequest> = requests.to_vec();
        let results = self.backend.runtime.block_on(async move {
            let mut tasks = Vec::with_capacity(requests.len());
            for request in requests {
                let (inner, current, warned) =
                    (Arc::clone(&inner), Arc::clone(&current), Arc::clone(&warned));
                tasks.push(tokio::spawn(async move {
                    if request.completion_ids.is_empty() {
                        return Ok(SequenceScores::default());
                    }
                    let _permit = inner.permits.acquire().await;
                    loop {
                        let protocol = ScoreProtocol::from_code(current.load(Ordering::Relaxed));
                        match score_one(&inner, &request, wants, protocol).await? {
                            Reply::Scores(scores) => return Ok(scores),
                            Reply::Unsupported(why)
                                if auto && protocol == ScoreProtocol::PromptLogprobs =>
                            {
                                current.store(ScoreProtocol::Echo.code(), Ordering::Relaxed);
                                if !warned.swap(true, Ordering::Relaxed) {
                                    tracing::warn!(backend = %inner.name, %why,
                                        "no `prompt_logprobs` in the answer: scoring with `echo` + `logprobs` from now on");
                                }
                            }
                            Reply::Unsupported(why) => {
                                return Err(format!("{}: {why}", request.label));
                            }
                        }
                    }
                }));
            }
            let mut results = Vec::with_capacity(tasks.len());
            for task in tasks {
                results.push(
                    task.await
                        .unwrap_or_else(|e| Err(format!("scoring task failed: {e}"))),
                );
            }
            results
        });
        results
            .into_iter()
            .map(|r| {
                r.map_err(|message| Error::Backend {
                    backend: name.clone(),
                    message,
                })
            })
            .collect()
    }
}

/// One request with all its retries under `protocol`.
async fn score_one(
    inner: &Inner,
    request: &ScoreRequest,
    wants: ScoreWants,
    protocol: ScoreProtocol,
) -> std::result::Result<Reply, String> {
    let sequence: Vec<u32> = request
        .prompt_ids
        .iter()
        .chain(&request.completion_ids)
        .copied()
        .collect();
    let prompt_len = request.prompt_ids.len();
    let replica = inner.replicas.lease();
    let (url, body) = match protocol {
        ScoreProtocol::Auto | ScoreProtocol::PromptLogprobs => (
            replica.url("completions"),
            json!({"model": inner.model, "prompt": sequence, "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": wants.top_k, "return_token_ids": true}),
        ),
        ScoreProtocol::Echo => (
            replica.url("completions"),
            json!({"model": inner.model, "prompt": sequence, "max_tokens": 1, "temperature": 0.0,
                "echo": true, "logprobs": wants.top_k, "return_token_ids": true}),
        ),
        ScoreProtocol::Sglang => (
            format!("{}/generate", replica.server_root()),
            json!({"input_ids": sequence, "return_logprob": true,
                "logprob_start_len": prompt_len, "top_logprobs_num": wants.top_k,
                "sampling_params": {"max_new_tokens": 0, "temperature": 0.0}}),
        ),
    };
    let body = with_extra(body, &inner.extra_body, protocol);
    let body = serde_json::to_vec(&body).map_err(|e| format!("cannot encode request: {e}"))?;
    let label = request.label.as_str();
    let parse = |bytes: &[u8]| -> std::result::Result<Reply, AttemptError> {
        match protocol {
            ScoreProtocol::Auto | ScoreProtocol::PromptLogprobs => {
                parse_prompt_logprobs(bytes, &sequence, prompt_len, wants, label)
            }
            ScoreProtocol::Echo => parse_echo(bytes, &sequence, prompt_len, wants, label),
            ScoreProtocol::Sglang => parse_sglang(bytes, &sequence, prompt_len, wants, label),
        }
    };
    let (result, attempts) = post_with_retries(
        &inner.client,
        &url,
        inner.auth.as_ref(),
        &body,
        inner.policy,
        parse,
    )
    .await;
    drop(replica);
    let counters = &inner.counters;
    counters
        .attempts
        .fetch_add(attempts as u64, Ordering::Relaxed);
    match &result {
        Ok(_) => counters.succeeded.fetch_add(1, Ordering::Relaxed),
        Err(_) => counters.failed.fetch_add(1, Ordering::Relaxed),
    };
    result.map_err(|message| format!("{label}: {message}"))
}

/// Merges `extra_body` into an OpenAI-shaped body (SGLang's native body is left alone).
fn with_extra(mut body: Value, extra: &Map<String, Value>, protocol: ScoreProtocol) -> Value {
    if protocol != ScoreProtocol::Sglang
        && let Value::Object(map) = &mut body
    {
        for (k, v) in extra {
            map.insert(k.clone(), v.clone());
        }
    }
    body
}

fn malformed(what: &str, error: &serde_json::Error) -> AttemptError {
    AttemptError::retryable(format!("malformed JSON in {what} response: {error}"))
}

/// A mismatch between the server's tokens and the local ones: never retried.
fn mismatch(label: &str, position: usize, prompt_len: usize, what: String) -> AttemptError {
    let place = if position >= prompt_len {
        format!("completion position {}", position - prompt_len)
    } else {
        format!("prompt position {position}")
    };
    AttemptError::fatal(format!(
        "{label}, {place}: {what}; the server's tokenizer or model differs from the local one"
    ))
}

/// The first position where the server's ids differ from the ones sent.
fn check_ids(
    label: &str,
    sent: &[u32],
    returned: Option<&Vec<u32>>,
    prompt_len: usize,
) -> std::result::Result<(), AttemptError> {
    let Some(returned) = returned else {
        return Ok(());
    };
    if let Some(position) =
        (0..sent.len().max(returned.len())).find(|&i| sent.get(i) != returned.get(i))
    {
        return Err(mismatch(
            label,
            position,
            prompt_len,
            format!(
                "the server holds token id {:?} where the local tokenizer has {:?}",
                returned.get(position),
                sent.get(position)
            ),
        ));
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
struct PromptLogprob {
    logprob: f64,
    rank: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct CompletionChoice {
    prompt_logprobs: Option<Vec<Option<std::collections::HashMap<String, PromptLogprob>>>>,
    prompt_token_ids: Option<Vec<u32>>,
    logprobs: Option<EchoLogprobs>,
}

#[derive(Debug, Deserialize)]
struct EchoLogprobs {
    #[serde(default)]
    tokens: Vec<String>,
    #[serde(default)]
    token_logprobs: Vec<Option<f64>>,
    top_logprobs: Option<Vec<Option<std::collections::HashMap<String, f64>>>>,
}

#[derive(Debug, Deserialize)]
struct CompletionResponse {
    #[serde(default)]
    choices: Vec<CompletionChoice>,
}

fn first_choice(bytes: &[u8]) -> std::result::Result<CompletionChoice, AttemptError> {
    let response: CompletionResponse =
        serde_json::from_slice(bytes).map_err(|e| malformed("scoring", &e))?;
    response
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| AttemptError::retryable("scoring response has no `choices`".to_owned()))
}

/// Parses vLLM's `prompt_logprobs` for the completion positions of `sequence`.
fn parse_prompt_logprobs(
    bytes: &[u8],
    sequence: &[u32],
    prompt_len: usize,
    wants: ScoreWants,
    label: &str,
) -> std::result::Result<Reply, AttemptError> {
    let choice = first_choice(bytes)?;
    let Some(entries) = choice.prompt_logprobs else {
        return Ok(Reply::Unsupported(
            "the answer has no `prompt_logprobs`".to_owned(),
        ));
    };
    check_ids(
        label,
        sequence,
        choice.prompt_token_ids.as_ref(),
        prompt_len,
    )?;
    if entries.len() != sequence.len() {
        return Err(AttemptError::fatal(format!(
            "{label}: `prompt_logprobs` has {} positions for the {} tokens sent",
            entries.len(),
            sequence.len()
        )));
    }
    let n = sequence.len() - prompt_len;
    let mut scores = SequenceScores {
        logprobs: Vec::with_capacity(n),
        ranks: Vec::with_capacity(if wants.ranks { n } else { 0 }),
        top: Vec::with_capacity(if wants.top_k > 0 { n } else { 0 }),
    };
    for position in prompt_len..sequence.len() {
        let id = sequence[position];
        let entry = entries[position]
            .as_ref()
            .ok_or_else(|| mismatch(label, position, prompt_len, "no log-probs".to_owned()))?;
        let own = entry.get(&id.to_string()).ok_or_else(|| {
            mismatch(
                label,
                position,
                prompt_len,
                format!("token id {id} is not among the server's log-probs"),
            )
        })?;
        scores.logprobs.push(own.logprob as f32);
        if wants.ranks {
            let rank = own.rank.ok_or_else(|| {
                AttemptError::fatal(format!("{label}: the server gives no token ranks"))
            })?;
            scores.ranks.push(u32::try_from(rank).unwrap_or(u32::MAX));
        }
        if wants.top_k > 0 {
            let mut top: Vec<(u32, f32, u64)> = Vec::with_capacity(entry.len());
            for (key, value) in entry {
                let id: u32 = key.parse().map_err(|_| {
                    AttemptError::fatal(format!(
                        "{label}: `prompt_logprobs` key `{key}` is not a token id"
                    ))
                })?;
                let rank = value.rank.unwrap_or(u64::MAX);
                if rank <= wants.top_k as u64 || value.rank.is_none() {
                    top.push((id, value.logprob as f32, rank));
                }
            }
            top.sort_by(|a, b| {
                b.1.total_cmp(&a.1)
                    .then_with(|| a.2.cmp(&b.2))
                    .then_with(|| a.0.cmp(&b.0))
            });
            top.truncate(wants.top_k);
            scores
                .top
                .push(top.into_iter().map(|(id, lp, _)| (id, lp)).collect());
        }
    }
    Ok(Reply::Scores(scores))
}

/// The id of an echoed `token_id:N` token (vLLM `--return-tokens-as-token-ids`).
fn text_id(text: &str) -> Option<u32> {
    text.strip_prefix("token_id:")?.parse().ok()
}

/// Parses an `echo` + `logprobs` answer for the completion positions of `sequence`.
fn parse_echo(
    bytes: &[u8],
    sequence: &[u32],
    prompt_len: usize,
    wants: ScoreWants,
    label: &str,
) -> std::result::Result<Reply, AttemptError> {
    if wants.ranks {
        return Err(AttemptError::fatal(format!(
            "{label}: token ranks need `prompt_logprobs` (vLLM) or a local model; `echo` gives none"
        )));
    }
    let choice = first_choice(bytes)?;
    let Some(logprobs) = choice.logprobs else {
        return Ok(Reply::Unsupported(
            "the answer has no `logprobs`: the server does not support `echo` with `logprobs`"
                .to_owned(),
        ));
    };
    if let Some(ids) = &choice.prompt_token_ids {
        check_ids(label, sequence, Some(ids), prompt_len)?;
    }
    if logprobs.token_logprobs.len() < sequence.len() {
        return Err(AttemptError::fatal(format!(
            "{label}: the echo holds {} tokens for the {} sent",
            logprobs.token_logprobs.len(),
            sequence.len()
        )));
    }
    let tops = logprobs.top_logprobs.unwrap_or_default();
    let mut scores = SequenceScores::default();
    for (position, &expected) in sequence.iter().enumerate().skip(prompt_len) {
        if choice.prompt_token_ids.is_none()
            && let Some(Some(id)) = logprobs.tokens.get(position).map(|t| text_id(t))
            && id != expected
        {
            return Err(mismatch(
                label,
                position,
                prompt_len,
                format!("the server echoed token id {id}"),
            ));
        }
        let lp = logprobs.token_logprobs[position]
            .ok_or_else(|| mismatch(label, position, prompt_len, "no log-prob".to_owned()))?;
        scores.logprobs.push(lp as f32);
        if wants.top_k > 0 {
            let Some(Some(map)) = tops.get(position) else {
                return Err(mismatch(
                    label,
                    position,
                    prompt_len,
                    "no top log-probs".to_owned(),
                ));
            };
            let mut top = Vec::with_capacity(map.len());
            for (text, &lp) in map {
                let id = text_id(text).ok_or_else(|| {
                    AttemptError::fatal(format!(
                        "{label}: top-k alternative `{text}` is not a token id; serve with \
                         `--return-tokens-as-token-ids` or use `prompt_logprobs`"
                    ))
                })?;
                top.push((id, lp as f32));
            }
            top.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            top.truncate(wants.top_k);
            scores.top.push(top);
        }
    }
    Ok(Reply::Scores(scores))
}

/// SGLang's `[logprob, token_id, text]` triple.
#[derive(Debug, Deserialize)]
struct SglangEntry(
    Option<f64>,
    u32,
    #[serde(default)]
    #[expect(
        dead_code,
        reason = "the token text is part of the triple; ids are what count"
    )]
    Option<String>,
);

#[derive(Debug, Deserialize)]
struct SglangMeta {
    input_token_logprobs: Option<Vec<SglangEntry>>,
    input_top_logprobs: Option<Vec<Option<Vec<SglangEntry>>>>,
}

#[derive(Debug, Deserialize)]
struct SglangResponse {
    meta_info: SglangMeta,
}

/// Parses SGLang's `/generate` answer; `input_token_logprobs` starts at `logprob_start_len`
/// (the prompt length) or, in versions that count from one earlier, one position before it:
/// the ids tell which.
fn parse_sglang(
    bytes: &[u8],
    sequence: &[u32],
    prompt_len: usize,
    wants: ScoreWants,
    label: &str,
) -> std::result::Result<Reply, AttemptError> {
    if wants.ranks {
        return Err(AttemptError::fatal(format!(
            "{label}: token ranks need `prompt_logprobs` (vLLM) or a local model; SGLang gives none"
        )));
    }
    let response: SglangResponse =
        serde_json::from_slice(bytes).map_err(|e| malformed("SGLang generate", &e))?;
    let Some(tokens) = response.meta_info.input_token_logprobs else {
        return Ok(Reply::Unsupported(
            "the answer has no `meta_info.input_token_logprobs`".to_owned(),
        ));
    };
    let n = sequence.len() - prompt_len;
    let skip = match tokens.len() {
        len if len == n => 0,
        len if len == n + 1 => 1,
        len => {
            return Err(AttemptError::fatal(format!(
                "{label}: `input_token_logprobs` has {len} entries for {n} completion tokens"
            )));
        }
    };
    let tops = response.meta_info.input_top_logprobs.unwrap_or_default();
    let mut scores = SequenceScores::default();
    for i in 0..n {
        let position = prompt_len + i;
        let SglangEntry(lp, id, _) = &tokens[skip + i];
        if *id != sequence[position] {
            return Err(mismatch(
                label,
                position,
                prompt_len,
                format!("the server scored token id {id}"),
            ));
        }
        let lp =
            lp.ok_or_else(|| mismatch(label, position, prompt_len, "no log-prob".to_owned()))?;
        scores.logprobs.push(lp as f32);
        if wants.top_k > 0 {
            let Some(Some(entries)) = tops.get(skip + i) else {
                return Err(mismatch(
                    label,
                    position,
                    prompt_len,
                    "no top log-probs".to_owned(),
                ));
            };
            let mut top: Vec<(u32, f32)> = entries
                .iter()
                .filter_map(|SglangEntry(lp, id, _)| Some((*id, (*lp)? as f32)))
                .collect();
            top.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            top.truncate(wants.top_k);
            scores.top.push(top);
        }
    }
    Ok(Reply::Scores(scores))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(reply: Reply) -> SequenceScores {
        match reply {
            Reply::Scores(s) => s,
            Reply::Unsupported(why) => panic!("unsupported: {why}"),
        }
    }

    #[test]
    fn prompt_logprobs_take_the_sent_ids_and_rank_order() {
        let body = br#"{"choices":[{"prompt_token_ids":[5,6,7],"prompt_logprobs":[null,
            {"6":{"logprob":-0.5,"rank":1},"9":{"logprob":-1.5,"rank":2}},
            {"7":{"logprob":-3.0,"rank":4},"1":{"logprob":-0.1,"rank":1},"2":{"logprob":-2.0,"rank":2}}]}]}"#;
        let wants = ScoreWants {
            top_k: 2,
            ranks: true,
        };
        let s = scores(parse_prompt_logprobs(body, &[5, 6, 7], 1, wants, "line 3").expect("ok"));
        assert_eq!(s.logprobs, vec![-0.5, -3.0]);
        assert_eq!(s.ranks, vec![1, 4]);
        assert_eq!(
            s.top,
            vec![vec![(6, -0.5), (9, -1.5)], vec![(1, -0.1), (2, -2.0)]]
        );
        let err = parse_prompt_logprobs(body, &[5, 6, 8], 1, wants, "line 3")
            .err()
            .expect("mismatch");
        assert!(!err.retryable);
        assert!(
            err.message.contains("line 3, completion position 1"),
            "{}",
            err.message
        );
        let plain = br#"{"choices":[{"text":"x"}]}"#;
        assert!(matches!(
            parse_prompt_logprobs(plain, &[5, 6], 1, wants, "x"),
            Ok(Reply::Unsupported(_))
        ));
    }

    #[test]
    fn echo_and_sglang_align_by_id() {
        let echo = br#"{"choices":[{"logprobs":{"tokens":["token_id:5","token_id:6","token_id:7","token_id:1"],
            "token_logprobs":[null,-0.5,-3.0,-0.2],
            "top_logprobs":[null,{"token_id:6":-0.5},{"token_id:1":-0.1},{"token_id:1":-0.2}]}}]}"#;
        let wants = ScoreWants {
            top_k: 1,
            ranks: false,
        };
        let s = scores(parse_echo(echo, &[5, 6, 7], 2, wants, "r").expect("ok"));
        assert_eq!(s.logprobs, vec![-3.0]);
        assert_eq!(s.top, vec![vec![(1, -0.1)]]);
        assert!(parse_echo(echo, &[5, 6, 8], 2, wants, "r").is_err());
        let sglang =
            br#"{"text":"","meta_info":{"input_token_logprobs":[[-0.5,6,null],[-3.0,7,null]],
            "input_top_logprobs":[[[-0.5,6,null]],[[-0.1,1,null],[-3.0,7,null]]]}}"#;
        let s = scores(parse_sglang(sglang, &[5, 6, 7], 2, wants, "r").expect("ok"));
        assert_eq!(s.logprobs, vec![-3.0]);
        assert_eq!(s.top, vec![vec![(1, -0.1)]]);
        let s = scores(parse_sglang(sglang, &[5, 6, 7], 1, wants, "r").expect("ok"));
        assert_eq!(s.logprobs, vec![-0.5, -3.0]);
        assert!(parse_sglang(sglang, &[5, 9, 7], 1, wants, "r").is_err());
    }
}
