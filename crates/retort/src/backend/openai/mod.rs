//! OpenAI-compatible HTTP backend ([`OpenAiBackend`]) for vLLM, SGLang, llama.cpp and hosted APIs.
//!
//! The spec `openai:URL#MODEL` names the server's API root (`http://host:8000/v1`; requests go to
//! `URL/chat/completions` and `URL/completions`) and the served model. The API key comes from
//! `RETORT_API_KEY` or `OPENAI_API_KEY` and lives in an [`ApiKey`], which never prints.
//!
//! This is the only module that knows about tokio: each backend owns a small multi-threaded
//! runtime, and [`Backend::generate`] blocks the calling thread on it. Requests run as tasks
//! bounded by a semaphore (`concurrency`, shared by every call on the backend; a request keeps
//! its permit while it waits to retry, so a struggling server sees less traffic, not more). Each
//! outcome is sent back over a channel and handed to the sink on the calling thread, so the
//! sink is a plain `FnMut` that may block (append + flush a journal line). Retries: see
//! [`retry`](self) — backoff with jitter, `Retry-After`, 429/5xx/timeouts/resets/malformed
//! JSON. A request that fails for good reaches the sink as `Err(description)`; if a task were
//! ever lost, its request is still reported as failed, so every request gets exactly one outcome.
//!
//! `timeout` bounds one attempt; a request as a whole ends within about
//! `(max_retries + 1) * timeout` plus its backoff delays. A dead server ends a run sooner:
//! [`OpenAiBackend::preflight`] checks the server before a run, and a breaker stops
//! [`Backend::generate`] with an error once every attempt has failed for
//! [`OpenAiOptions::dead_after`] (see [`breaker`](self)). Create and drop the backend outside
//! any async runtime (tokio forbids blocking on or dropping a runtime from inside another).
//!
//! Mapping of [`SamplingParams`]: `temperature`, `top_p`, `max_new_tokens` → `max_tokens`,
//! `stop`, `top_k` (a vLLM/SGLang extension, sent only when set), `seed` → `seed + sample` so
//! the samples of one record differ while each (record, sample) is reproducible on servers that
//! honour per-request seeds (vLLM does), and `logprobs` → `logprobs: true, top_logprobs: k`
//! (chat) or `logprobs: k` (completions). `n` is always 1: one request per (record, sample) means
//! each journal line maps to one request, so a retry or a resume can never produce a second copy
//! of a sample that already succeeded (with `n > 1` a failure would lose or redo all `n`).
//!
//! Reasoning: a separate `message.reasoning_content` (vLLM reasoning parsers, DeepSeek) or
//! `message.reasoning` goes to [`Completion::reasoning`]; `content` is kept verbatim in
//! [`Completion::text`], so a server without a reasoning parser returns `<think>...</think>`
//! inline in the text and retort does not strip or split it. The generate stage joins the two
//! back in the teacher's native form ([`crate::reasoning`]). Completions responses have no
//! reasoning field. `finish_reason` `stop` and `length` map directly; anything else (`abort`,
//! `content_filter`, null) maps to [`FinishReason::Stop`], is logged with its raw value and
//! counted in [`UsageTotals::odd_finish_reasons`].
//!
//! [`Completion::reasoning`]: crate::backend::Completion::reasoning
//! [`Completion::text`]: crate::backend::Completion::text
//! [`FinishReason::Stop`]: crate::backend::FinishReason::Stop
//!
//! Scoring ([`Backend::score`]) sends `POST URL/completions` with the prompt text followed by
//! the completion text, `echo: true, max_tokens: 1, logprobs: k, prompt_logprobs: k,
//! return_token_ids: true, temperature: 0` (plus `extra_body`), and splits the echoed tokens at
//! the prompt's length in characters using `text_offset`; see `wire::parse_score` for the rules.

mod breaker;
mod replicas;
mod retry;
pub mod score;
mod wire;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reqwest::header::HeaderValue;
use serde_json::{Map, Value};
use tokio::sync::{Semaphore, mpsc, watch};

use self::breaker::Breaker;
use self::replicas::Replicas;
use self::retry::{AttemptError, RetryPolicy, post_watched, post_with_retries};
use self::wire::{ChatRequest, CommonParams, CompletionRequest, Parsed, PromptField};
use crate::backend::{Backend, GenerateRequest, Prompt, RequestOutcome, SamplingParams, Scored};
use crate::error::{Error, Result};
use crate::model_spec::{ModelSpec, ServerSpec};

/// How often a generation call checks for a stop request while requests are in flight.
const STOP_POLL: Duration = Duration::from_millis(100);

/// An API key that never shows itself in `Debug` or `Display` output.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key.
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// `RETORT_API_KEY`, else `OPENAI_API_KEY`; empty values count as unset.
    pub fn from_env() -> Option<Self> {
        ["RETORT_API_KEY", "OPENAI_API_KEY"]
            .iter()
            .filter_map(|name| std::env::var(name).ok())
            .find(|value| !value.trim().is_empty())
            .map(|value| Self(value.trim().to_owned()))
    }

    /// The secret itself, for building the `Authorization` header.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(****)")
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("****")
    }
}

/// Which endpoint generation uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Endpoint {
    /// `/chat/completions` for everything; a text prompt becomes one user message.
    Chat,
    /// `/completions` for everything; chat prompts are refused (render the template first).
    Completions,
    /// Chat prompts to `/chat/completions`, text and token-id prompts to `/completions`.
    #[default]
    Auto,
}

impl std::str::FromStr for Endpoint {
    type Err = Error;

    /// `chat`, `completions` or `auto`.
    fn from_str(text: &str) -> Result<Self> {
        match text {
            "chat" => Ok(Self::Chat),
            "completions" => Ok(Self::Completions),
            "auto" => Ok(Self::Auto),
            other => Err(Error::Invalid(format!(
                "endpoint `{other}`: expected `chat`, `completions` or `auto`"
            ))),
        }
    }
}

/// Settings of an [`OpenAiBackend`].
#[derive(Debug, Clone)]
pub struct OpenAiOptions {
    /// Requests in flight at once, across all calls on the backend.
    pub concurrency: usize,
    /// Limit for one attempt, from sending the request to the last byte of the response.
    pub timeout: Duration,
    /// Retries after the first attempt before a request fails for good.
    pub max_retries: usize,
    /// First backoff delay; it doubles per retry.
    pub backoff_base: Duration,
    /// Largest backoff delay (a server's `Retry-After` may ask for longer and is honoured).
    pub backoff_max: Duration,
    /// Which endpoint generation uses.
    pub endpoint: Endpoint,
    /// Sent as `Authorization: Bearer KEY` when set.
    pub api_key: Option<ApiKey>,
    /// Extra top-level fields merged into every request body (they override retort's own),
    /// e.g. `{"chat_template_kwargs": {"enable_thinking": true}}`.
    pub extra_body: Map<String, Value>,
    /// [`Backend::generate`] stops with an error once every attempt has failed for this long
    /// (and at least twice the requests in flight in a row); `None` retries each request to the
    /// end of its retries.
    pub dead_after: Option<Duration>,
}

impl Default for OpenAiOptions {
    /// 64 in flight, 600 s per attempt (long reasoning traces), 8 retries from 1 s up to 60 s,
    /// [`Endpoint::Auto`], the key from the environment ([`ApiKey::from_env`]), a run stopped
    /// after 30 s of nothing but failures.
    fn default() -> Self {
        Self {
            concurrency: 64,
            timeout: Duration::from_secs(600),
            max_retries: 8,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            endpoint: Endpoint::Auto,
            api_key: ApiKey::from_env(),
            extra_body: Map::new(),
            dead_after: Some(Duration::from_secs(30)),
        }
    }
}

/// Totals over the backend's life, for run summaries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageTotals {
    /// HTTP attempts made (first tries and retries).
    pub attempts: u64,
    /// Requests that succeeded.
    pub succeeded: u64,
    /// Requests that failed for good.
    pub failed: u64,
    /// Prompt tokens reported by the server over successful requests.
    pub prompt_tokens: u64,
    /// Completion tokens reported by the server over successful requests.
    pub completion_tokens: u64,
    /// Successful generations whose `finish_reason` was neither `stop` nor `length`.
    pub odd_finish_reasons: u64,
}

#[derive(Debug, Default)]
struct Counters {
    attempts: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    odd_finish_reasons: AtomicU64,
}

/// What the request tasks share.
struct Inner {
    name: String,
    model: String,
    replicas: Replicas,
    concurrency: usize,
    timeout: Duration,
    dead_after: Option<Duration>,
    endpoint: Endpoint,
    extra_body: Map<String, Value>,
    auth: Option<HeaderValue>,
    policy: RetryPolicy,
    client: reqwest::Client,
    permits: Arc<Semaphore>,
    counters: Counters,
}

/// A model served over the OpenAI-compatible HTTP API; see the module docs.
pub struct OpenAiBackend {
    inner: Arc<Inner>,
    runtime: tokio::runtime::Runtime,
}

impl fmt::Debug for OpenAiBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiBackend")
            .field("name", &self.inner.name)
            .field("endpoint", &self.inner.endpoint)
            .field("policy", &self.inner.policy)
            .field("authorized", &self.inner.auth.is_some())
            .finish_non_exhaustive()
    }
}

impl OpenAiBackend {
    /// [`Self::connect`] to the server of `spec` (`openai:URL#MODEL`); a spec of another kind
    /// is an error.
    pub fn new(spec: &str, options: OpenAiOptions) -> Result<Self> {
        match ModelSpec::parse(spec)? {
            ModelSpec::Server(server) => Self::connect(&server, options),
            other => Err(Error::Invalid(format!(
                "model spec `{other}`: expected `openai:URL#MODEL`, e.g. \
                 `openai:http://127.0.0.1:8000/v1#Qwen/Qwen3-8B`"
            ))),
        }
    }

    /// Connects nothing yet: builds the HTTP client and the runtime for `server`. Fails on zero
    /// concurrency or a key that is not a valid header.
    pub fn connect(server: &ServerSpec, options: OpenAiOptions) -> Result<Self> {
        let model = server.model.clone();
        if options.concurrency == 0 {
            return Err(Error::Invalid(
                "`concurrency` must be at least 1".to_owned(),
            ));
        }
        let name = server.redacted();
        let auth = options
            .api_key
            .as_ref()
            .map(|key| {
                let mut value = HeaderValue::from_str(&format!("Bearer {}", key.expose_secret()))
                    .map_err(|_| {
                    Error::Invalid(
                        "the API key contains characters not allowed in an HTTP header".to_owned(),
                    )
                })?;
                value.set_sensitive(true);
                Ok::<_, Error>(value)
            })
            .transpose()?;
        let backend_error = |message: String| Error::Backend {
            backend: name.clone(),
            message,
        };
        let client = reqwest::Client::builder()
            .timeout(options.timeout)
            .connect_timeout(options.timeout.min(Duration::from_secs(30)))
            .pool_max_idle_per_host(options.concurrency)
            // Below uvicorn's (vLLM's) 5 s keep-alive, so a pooled connection is rarely reused
            // just as the server closes it.
            .pool_idle_timeout(Duration::from_secs(4))
            .tcp_nodelay(true)
            .user_agent(concat!("retort/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| backend_error(format!("cannot build the HTTP client: {e}")))?;
        // A few workers are plenty: the work per request is JSON in and out.
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("retort-http")
            .enable_all()
            .build()
            .map_err(|e| backend_error(format!("cannot start the async runtime: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                name,
                replicas: Replicas::new(server.urls()),
                concurrency: options.concurrency,
                timeout: options.timeout,
                dead_after: options.dead_after,
                model,
                endpoint: options.endpoint,
                extra_body: options.extra_body,
                auth,
                policy: RetryPolicy {
                    max_retries: options.max_retries,
                    base: options.backoff_base,
                    max: options.backoff_max.max(options.backoff_base),
                },
                client,
                permits: Arc::new(Semaphore::new(options.concurrency)),
                counters: Counters::default(),
            }),
            runtime,
        })
    }

    /// Checks that the server answers, before a run: `GET URL/models`, a few quick tries (see
    /// [`breaker`](self)). Fails with a message naming the server when it is down or refuses
    /// the API key.
    pub fn preflight(&self) -> Result<()> {
        let inner = &self.inner;
        for root in inner.replicas.roots() {
            self.runtime
                .block_on(breaker::preflight(
                    &inner.client,
                    &format!("{root}/models"),
                    inner.auth.as_ref(),
                    inner.policy,
                    inner.timeout,
                ))
                .map_err(|message| Error::Backend {
                    backend: inner.name.clone(),
                    message,
                })?;
        }
        Ok(())
    }

    /// The served model's name (the part after `#`).
    pub fn model(&self) -> &str {
        &self.inner.model
    }

    /// Requests sent to each replica so far (one entry per URL of the spec, in order).
    pub fn replica_requests(&self) -> Vec<u64> {
        self.inner.replicas.sent()
    }

    /// Attempts, outcomes and token usage summed over the backend's life.
    pub fn usage(&self) -> UsageTotals {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        UsageTotals {
            attempts: get(&c.attempts),
            succeeded: get(&c.succeeded),
            failed: get(&c.failed),
            prompt_tokens: get(&c.prompt_tokens),
            completion_tokens: get(&c.completion_tokens),
            odd_finish_reasons: get(&c.odd_finish_reasons),
        }
    }
}

/// Turns a 2xx body into a generation.
type ParseFn = fn(&[u8]) -> std::result::Result<Parsed, AttemptError>;

/// Where a prompt goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Chat,
    Completions,
}

impl Inner {
    fn route(&self, prompt: &Prompt) -> Result<Route> {
        match (self.endpoint, prompt) {
            (Endpoint::Chat, Prompt::Ids(_)) => Err(Error::Invalid(format!(
                "backend `{}`: token-id prompts need the completions endpoint, not chat",
                self.name
            ))),
            (Endpoint::Completions, Prompt::Messages(_)) => Err(Error::Invalid(format!(
                "backend `{}`: chat prompts need the chat endpoint (or render the chat template first)",
                self.name
            ))),
            (Endpoint::Chat, _) | (Endpoint::Auto, Prompt::Messages(_)) => Ok(Route::Chat),
            _ => Ok(Route::Completions),
        }
    }

    /// Serialises `request` and merges `extra_body` over it.
    fn body(&self, request: &impl serde::Serialize) -> std::result::Result<Vec<u8>, String> {
        if self.extra_body.is_empty() {
            // The common case skips the detour through a `Value` tree.
            return serde_json::to_vec(request).map_err(|e| format!("cannot encode request: {e}"));
        }
        let mut value =
            serde_json::to_value(request).map_err(|e| format!("cannot encode request: {e}"))?;
        if let Value::Object(map) = &mut value {
            for (k, v) in &self.extra_body {
                map.insert(k.clone(), v.clone());
            }
        }
        serde_json::to_vec(&value).map_err(|e| format!("cannot encode request: {e}"))
    }

    fn generation_body(
        &self,
        route: Route,
        request: &GenerateRequest,
        params: &SamplingParams,
    ) -> std::result::Result<Vec<u8>, String> {
        let common = CommonParams {
            temperature: params.temperature,
            top_p: params.top_p,
            top_k: params.top_k,
            max_tokens: params.max_new_tokens,
            seed: params
                .seed
                .map(|seed| seed.wrapping_add(request.sample as u64)),
            stop: &params.stop,
            n: 1,
        };
        let single;
        match (route, &request.prompt) {
            (Route::Chat, prompt) => {
                let messages = match prompt {
                    Prompt::Messages(messages) => messages.as_slice(),
                    Prompt::Text(text) => {
                        single = [crate::backend::Message {
                            role: "user".to_owned(),
                            content: text.clone(),
                        }];
                        &single
                    }
                    Prompt::Ids(_) => return Err("token-id prompt on the chat endpoint".to_owned()),
                };
                self.body(&ChatRequest {
                    model: &self.model,
                    messages,
                    common,
                    logprobs: params.logprobs > 0,
                    top_logprobs: (params.logprobs > 0).then_some(params.logprobs),
                })
            }
            (Route::Completions, prompt) => {
                let prompt = match prompt {
                    Prompt::Text(text) => PromptField::Text(text),
                    Prompt::Ids(ids) => PromptField::Ids(ids),
                    Prompt::Messages(_) => {
                        return Err("chat prompt on the completions endpoint".to_owned());
                    }
                };
                self.body(&CompletionRequest {
                    model: &self.model,
                    prompt,
                    common,
                    logprobs: (params.logprobs > 0).then_some(params.logprobs),
                    echo: false,
                    prompt_logprobs: None,
                    return_token_ids: false,
                })
            }
        }
    }

    /// One request, all attempts; never fails outside the outcome.
    async fn run(
        &self,
        request: GenerateRequest,
        params: &SamplingParams,
        breaker: &Breaker,
    ) -> RequestOutcome {
        let (key, sample) = (request.key, request.sample);
        let outcome = |result, attempts| RequestOutcome {
            unusable: false,
            key,
            sample,
            result,
            attempts,
        };
        let route = match self.route(&request.prompt) {
            Ok(route) => route,
            Err(e) => return outcome(Err(e.to_string()), 0),
        };
        let body = match self.generation_body(route, &request, params) {
            Ok(body) => body,
            Err(e) => return outcome(Err(e), 0),
        };
        let replica = self.replicas.lease();
        let (url, parse): (String, ParseFn) = match route {
            Route::Chat => (replica.url("chat/completions"), wire::parse_chat),
            Route::Completions => (replica.url("completions"), wire::parse_completion),
        };
        let (result, attempts) = post_watched(
            &self.client,
            &url,
            self.auth.as_ref(),
            &body,
            self.policy,
            parse,
            Some(breaker),
        )
        .await;
        let c = &self.counters;
        c.attempts.fetch_add(attempts as u64, Ordering::Relaxed);
        let result = match result {
            Ok(Parsed {
                completion,
                odd_finish_reason,
            }) => {
                if let Some(raw) = odd_finish_reason {
                    c.odd_finish_reasons.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(backend = %self.name, key, sample, finish_reason = %raw,
                        "unexpected finish_reason, recorded as `stop`");
                }
                c.succeeded.fetch_add(1, Ordering::Relaxed);
                c.prompt_tokens
                    .fetch_add(completion.prompt_tokens as u64, Ordering::Relaxed);
                c.completion_tokens
                    .fetch_add(completion.completion_tokens as u64, Ordering::Relaxed);
                Ok(completion)
            }
            Err(message) => {
                c.failed.fetch_add(1, Ordering::Relaxed);
                Err(message)
            }
        };
        outcome(result, attempts)
    }
}

impl Backend for OpenAiBackend {
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn generate(
        &self,
        requests: Vec<GenerateRequest>,
        params: &SamplingParams,
        sink: &mut dyn FnMut(RequestOutcome),
    ) -> Result<()> {
        for request in &requests {
            self.inner.route(&request.prompt)?;
        }
        let ids: Vec<(usize, usize)> = requests.iter().map(|r| (r.key, r.sample)).collect();
        let params = Arc::new(params.clone());
        let inner = Arc::clone(&self.inner);
        // Every request in flight failed, twice (see `breaker`).
        let in_flight = self.inner.concurrency.min(requests.len()).max(1);
        let breaker = Arc::new(Breaker::new(2 * in_flight, self.inner.dead_after));
        let (stop, stopped) = watch::channel(false);
        let drain = &mut *sink;
        let (delivered, tripped) = self.runtime.block_on(async move {
            let (sender, mut receiver) = mpsc::unbounded_channel::<(usize, RequestOutcome)>();
            let task_breaker = Arc::clone(&breaker);
            // The feeder spawns one task per request as permits free up, so a million requests
            // never become a million tasks; it runs on the workers while this thread drains.
            let feeder = tokio::spawn(async move {
                for (index, request) in requests.into_iter().enumerate() {
                    let Ok(permit) = Arc::clone(&inner.permits).acquire_owned().await else {
                        break; // The semaphore is never closed.
                    };
                    if crate::interrupt::requested().is_some() {
                        break; // A stop was asked for: no new requests.
                    }
                    let (inner, params, sender, breaker, mut stopped) = (
                        Arc::clone(&inner),
                        Arc::clone(&params),
                        sender.clone(),
                        Arc::clone(&task_breaker),
                        stopped.clone(),
                    );
                    tokio::spawn(async move {
                        tokio::select! {
                            biased;
                            outcome = inner.run(request, &params, &breaker) => {
                                drop(permit);
                                // Fails only when the caller stopped listening (its sink panicked).
                                let _ = sender.send((index, outcome));
                            }
                            // The breaker tripped: drop the request unreported (it did not fail
                            // for good; a rerun does it).
                            _ = stopped.wait_for(|&stop| stop) => {}
                        }
                    });
                }
            });
            let mut delivered = vec![false; ids.len()];
            let mut tripped = None;
            let mut watch = tokio::time::interval(Duration::from_millis(200));
            // Wakes up now and then to notice a stop request while requests are in flight: they
            // are dropped (not journaled), so a rerun sends them again.
            let mut poll = tokio::time::interval(STOP_POLL);
            loop {
                tokio::select! {
                    message = receiver.recv() => match message {
                        Some((index, outcome)) => {
                            delivered[index] = true;
                            drain(outcome);
                        }
                        // Every sender is gone: all requests ended (or were stopped).
                        None => break,
                    },
                    _ = watch.tick(), if tripped.is_none() && breaker.armed() => {
                        if let Some(reason) = breaker.tripped(Instant::now()) {
                            tripped = Some(reason);
                            feeder.abort();
                            let _ = stop.send(true);
                        }
                    }
                    _ = poll.tick() => {
                        if crate::interrupt::requested().is_some() {
                            feeder.abort();
                            let _ = stop.send(true);
                            break;
                        }
                    }
                }
            }
            let _ = feeder.await;
            ((delivered, ids), tripped)
        });
        if let Some(message) = tripped {
            return Err(Error::Backend {
                backend: self.inner.name.clone(),
                message,
            });
        }
        let (delivered, ids) = delivered;
        if crate::interrupt::requested().is_some() {
            return Ok(());
        }
        for (done, (key, sample)) in delivered.into_iter().zip(ids) {
            if !done {
                sink(RequestOutcome {
                    key,
                    sample,
                    result: Err("request task ended without a result".to_owned()),
                    attempts: 0,
                    unusable: false,
                });
            }
        }
        Ok(())
    }

    fn score(&self, prompt: &Prompt, completion: &str, top_k: usize) -> Result<Scored> {
        let prompt = match prompt {
            Prompt::Text(text) => text,
            Prompt::Messages(_) | Prompt::Ids(_) => {
                return Err(Error::Invalid(format!(
                    "backend `{}`: remote scoring takes a text prompt (render chat templates first)",
                    self.inner.name
                )));
            }
        };
        if completion.is_empty() {
            return Ok(Scored {
                completion_ids: Some(Vec::new()),
                token_logprobs: Vec::new(),
                top_logprobs: Vec::new(),
            });
        }
        if prompt.is_empty() {
            return Err(Error::Invalid(format!(
                "backend `{}`: cannot score with an empty prompt (the first token has no log-prob)",
                self.inner.name
            )));
        }
        let text = format!("{prompt}{completion}");
        let boundary = prompt.chars().count();
        let total = text.chars().count();
        let inner = &self.inner;
        let backend_error = |message: String| Error::Backend {
            backend: inner.name.clone(),
            message,
        };
        let body = inner
            .body(&CompletionRequest {
                model: &inner.model,
                prompt: PromptField::Text(&text),
                common: CommonParams {
                    temperature: 0.0,
                    top_p: 1.0,
                    top_k: None,
                    max_tokens: 1,
                    seed: None,
                    stop: &[],
                    n: 1,
                },
                logprobs: Some(top_k.max(1)),
                echo: true,
                prompt_logprobs: Some(top_k.max(1)),
                return_token_ids: true,
            })
            .map_err(backend_error)?;
        let (result, attempts) = self.runtime.block_on(async {
            let _permit = inner.permits.acquire().await;
            let replica = inner.replicas.lease();
            post_with_retries(
                &inner.client,
                &replica.url("completions"),
                inner.auth.as_ref(),
                &body,
                inner.policy,
                |bytes| wire::parse_score(bytes, boundary, total, top_k),
            )
            .await
        });
        inner
            .counters
            .attempts
            .fetch_add(attempts as u64, Ordering::Relaxed);
        result.map_err(backend_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_redact() {
        let server = ModelSpec::parse("openai:http://127.0.0.1:8000/v1/#Qwen/Qwen3-8B")
            .ok()
            .and_then(|spec| spec.server().cloned())
            .expect("a server spec");
        assert_eq!(server.url, "http://127.0.0.1:8000/v1");
        assert_eq!(server.model, "Qwen/Qwen3-8B");
        for bad in [
            "http://x/v1#m",
            "openai:http://x/v1",
            "openai:x/v1#m",
            "openai:http://x#",
        ] {
            assert!(
                OpenAiBackend::new(bad, OpenAiOptions::default()).is_err(),
                "{bad}"
            );
        }
        let server = ModelSpec::parse("openai:http://u:p@h:1/v1#m").expect("spec");
        assert_eq!(server.to_string(), "openai:http://****@h:1/v1#m");
        assert_eq!("chat".parse::<Endpoint>().ok(), Some(Endpoint::Chat));
        assert!("both".parse::<Endpoint>().is_err());
        let key = ApiKey::new("sk-123");
        assert_eq!(format!("{key} {key:?}"), "**** ApiKey(****)");
    }

    #[test]
    fn generation_bodies_map_sampling_params() {
        let backend = OpenAiBackend::new(
            "openai:http://127.0.0.1:9/v1#m",
            OpenAiOptions {
                extra_body: serde_json::from_str(r#"{"min_p": 0.1}"#).expect("json"),
                ..OpenAiOptions::default()
            },
        )
        .expect("backend");
        let params = SamplingParams {
            temperature: 0.6,
            top_p: 0.95,
            top_k: Some(20),
            max_new_tokens: 64,
            seed: Some(10),
            stop: vec!["###".to_owned()],
            logprobs: 2,
        };
        let request = GenerateRequest {
            key: 0,
            sample: 3,
            prompt: Prompt::Text("hi".to_owned()),
        };
        let inner = &backend.inner;
        let body = inner
            .generation_body(Route::Completions, &request, &params)
            .expect("body");
        let value: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(
            value,
            serde_json::json!({"model": "m", "prompt": "hi", "temperature": 0.6, "top_p": 0.95,
                "top_k": 20, "max_tokens": 64, "seed": 13, "stop": ["###"], "n": 1, "logprobs": 2,
                "min_p": 0.1})
        );
        let body = inner
            .generation_body(Route::Chat, &request, &params)
            .expect("body");
        let value: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(value["messages"][0]["content"], "hi");
        assert_eq!(value["logprobs"], true);
        assert_eq!(value["top_logprobs"], 2);
    }
}
