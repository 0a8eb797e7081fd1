//! A fault-injecting OpenAI-compatible HTTP server on loopback ([`MockServer`]), for tests and
//! benchmarks of remote backends.
//!
//! It speaks just enough HTTP/1.1 (keep-alive, `Content-Length` bodies) to serve
//! `POST /v1/chat/completions`, `POST /v1/completions` (with `echo`, `logprobs`,
//! `prompt_logprobs` and `return_token_ids` for scoring) and `GET /v1/models`. Answers are
//! deterministic: the text is `"The answer is N."` with `N = `[`mock_answer`]`(prompt, seed)`,
//! chat responses add [`MOCK_REASONING`] as `reasoning_content`, as a server with a reasoning
//! parser does (or inline as `<think>\n...\n</think>\n\n` before the answer, as a server
//! without one does, when [`FaultPlan::inline_reasoning`] is set; and not at all when the request
//! says `chat_template_kwargs: {"enable_thinking": false}`), tokens are
//! whitespace-led words ([`mock_tokenize`]) with fake log-probs ([`mock_logprob`]) and ids
//! ([`mock_token_id`]). `max_tokens` truncates (reasoning first, then content) and reports
//! `finish_reason: "length"`.
//!
//! Faults ([`Fault`]) follow a [`FaultPlan`]: one for every request (`always`), a schedule by
//! arrival order, or seeded probabilities. The server runs on its own tokio runtime and stops
//! when the [`MockServer`] is dropped.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The reasoning every chat answer carries.
pub const MOCK_REASONING: &str = "Let me think step by step.";

/// Largest request head or body accepted.
const MAX_REQUEST_BYTES: usize = 16 << 20;

/// One injected failure.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// HTTP 429 with `Retry-After: retry_after_s`.
    RateLimited {
        /// Seconds in the `Retry-After` header.
        retry_after_s: u64,
    },
    /// HTTP 500.
    Internal,
    /// HTTP 503, with `Retry-After` when set.
    Unavailable {
        /// Seconds in the `Retry-After` header, if any.
        retry_after_s: Option<u64>,
    },
    /// Waits this long before answering normally (set it past the client's timeout).
    Stall(Duration),
    /// HTTP 200 with a truncated JSON body.
    MalformedJson,
    /// Sends the status line and part of the body, then closes the connection.
    DropConnection,
    /// HTTP 400 (must not be retried).
    BadRequest,
}

/// Which requests fail and how. Precedence: `always`, then `schedule`, then `random`.
#[derive(Debug, Clone, Default)]
pub struct FaultPlan {
    /// Applied to every request ("always fail" mode).
    pub always: Option<Fault>,
    /// Request number i (0-based, in arrival order) gets `schedule[i]`; `None` answers normally.
    pub schedule: Vec<Option<Fault>>,
    /// After the schedule, each request draws fault j with probability `random[j].1`.
    pub random: Vec<(Fault, f64)>,
    /// Seed of the draws.
    pub seed: u64,
    /// Delay before every answer (zero by default).
    pub latency: Duration,
    /// Keep each request's JSON body in [`MockServer::requests`] (off by default: memory).
    pub record_bodies: bool,
    /// Chat answers carry their reasoning inline in `content` (a server without a reasoning
    /// parser) instead of in `reasoning_content`.
    pub inline_reasoning: bool,
    /// `GET /v1/models` always answers normally and takes no fault (an API front end that is up
    /// while the engine behind it fails every generation).
    pub healthy_models: bool,
}

impl FaultPlan {
    /// No faults.
    pub fn none() -> Self {
        Self::default()
    }

    /// Every request fails with `fault`.
    pub fn always(fault: Fault) -> Self {
        Self {
            always: Some(fault),
            ..Self::default()
        }
    }

    /// Faults by arrival order, then normal answers.
    pub fn schedule(schedule: Vec<Option<Fault>>) -> Self {
        Self {
            schedule,
            ..Self::default()
        }
    }

    /// Seeded random faults with the given probabilities.
    pub fn random(seed: u64, random: Vec<(Fault, f64)>) -> Self {
        Self {
            random,
            seed,
            ..Self::default()
        }
    }
}

/// What the server saw of one request.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    /// Arrival time (after the body was read).
    pub at: Instant,
    /// Method and path, e.g. `POST /v1/completions`.
    pub target: String,
    /// The `Authorization` header, if sent.
    pub authorization: Option<String>,
    /// The fault injected, if any.
    pub fault: Option<Fault>,
    /// The JSON body, when [`FaultPlan::record_bodies`] is set and it parsed.
    pub body: Option<Value>,
}

struct State {
    plan: FaultPlan,
    model: Option<Arc<crate::mock_scoring::MockModel>>,
    rng: Mutex<ChaCha8Rng>,
    served: AtomicUsize,
    ok: AtomicUsize,
    log: Mutex<Vec<RequestRecord>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking connection task must not take the whole server down.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl State {
    fn fault(&self, index: usize) -> Option<Fault> {
        if let Some(fault) = &self.plan.always {
            return Some(fault.clone());
        }
        if let Some(slot) = self.plan.schedule.get(index) {
            return slot.clone();
        }
        if self.plan.random.is_empty() {
            return None;
        }
        let mut draw: f64 = lock(&self.rng).random();
        for (fault, p) in &self.plan.random {
            if draw < *p {
                return Some(fault.clone());
            }
            draw -= p;
        }
        None
    }
}

/// A running mock server; dropping it stops the server and closes its connections before
/// `drop` returns. Drop it outside any async runtime.
pub struct MockServer {
    url: String,
    state: Arc<State>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for MockServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockServer")
            .field("url", &self.url)
            .field("requests_served", &self.requests_served())
            .finish_non_exhaustive()
    }
}

impl MockServer {
    /// Binds `127.0.0.1:0` and starts serving on two worker threads named `mock-server`.
    pub fn start(plan: FaultPlan) -> std::io::Result<Self> {
        Self::start_inner(plan, None)
    }

    /// [`Self::start`] with scoring answers computed by a real model (see
    /// [`crate::mock_scoring`]); generation stays synthetic.
    pub fn start_with_model(
        plan: FaultPlan,
        model: crate::mock_scoring::MockModel,
    ) -> std::io::Result<Self> {
        Self::start_inner(plan, Some(Arc::new(model)))
    }

    fn start_inner(
        plan: FaultPlan,
        model: Option<Arc<crate::mock_scoring::MockModel>>,
    ) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("mock-server")
            .enable_all()
            .build()?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        let state = Arc::new(State {
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(plan.seed)),
            plan,
            model,
            served: AtomicUsize::new(0),
            ok: AtomicUsize::new(0),
            log: Mutex::new(Vec::new()),
        });
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let accept_state = Arc::clone(&state);
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_connection(stream, Arc::clone(&accept_state)));
            }
        });
        Ok(Self {
            url: format!("http://{address}/v1"),
            state,
            runtime: Some(runtime),
        })
    }

    /// The API root, `http://127.0.0.1:PORT/v1`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A backend spec for this server: `openai:URL#MODEL`.
    pub fn spec(&self, model: &str) -> String {
        format!("openai:{}#{model}", self.url)
    }

    /// Requests received (complete heads and bodies), faulty or not.
    pub fn requests_served(&self) -> usize {
        self.state.served.load(Ordering::SeqCst)
    }

    /// Requests answered with a well-formed 200.
    pub fn responses_ok(&self) -> usize {
        self.state.ok.load(Ordering::SeqCst)
    }

    /// Everything received so far, in arrival order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.state.log).clone()
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Joins the workers, so the listener is closed when `drop` returns (tasks only
            // sleep or wait on sockets, so this is quick).
            runtime.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

/// FNV-1a, stable across Rust versions (unlike `DefaultHasher`).
fn fnv(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &byte in *part {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        hash ^= 0xff;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The number in the mock's answer to `prompt` (chat prompts: the message contents joined with
/// `\n`; token-id prompts: the ids joined with spaces) sampled with `seed`: in `0..100`.
pub fn mock_answer(prompt: &str, seed: Option<u64>) -> u64 {
    let seed = seed.map_or_else(|| "none".to_owned(), |s| s.to_string());
    fnv(&[prompt.as_bytes(), seed.as_bytes()]) % 100
}

/// The mock's tokenizer: each token is a run of whitespace followed by a run of non-whitespace.
/// Returns (token, offset in characters).
pub fn mock_tokenize(text: &str) -> Vec<(String, usize)> {
    let mut tokens = Vec::new();
    let mut current = String::new();
    let mut start = 0;
    let mut in_word = false;
    for (index, c) in text.chars().enumerate() {
        if c.is_whitespace() && in_word {
            tokens.push((std::mem::take(&mut current), start));
            start = index;
            in_word = false;
        }
        in_word |= !c.is_whitespace();
        current.push(c);
    }
    if !current.is_empty() {
        tokens.push((current, start));
    }
    tokens
}

/// The mock's log-prob of `token`, in `[-5.05, -0.05]`.
pub fn mock_logprob(token: &str) -> f64 {
    -((fnv(&[token.as_bytes()]) % 500) as f64) / 100.0 - 0.05
}

/// The mock's id of `token`, in `0..50_000`.
pub fn mock_token_id(token: &str) -> u32 {
    u32::try_from(fnv(&[b"id", token.as_bytes()]) % 50_000).expect("below 50000")
}

/// Request head and body.
struct Request {
    target: String,
    authorization: Option<String>,
    close: bool,
    body: Vec<u8>,
}

/// Reads one request; `None` at a clean end of the connection or on garbage.
async fn read_request(reader: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_owned(), parts.next()?.to_owned());
    let (mut length, mut authorization, mut close, mut head) = (0usize, None, false, line.len());
    loop {
        line.clear();
        head += reader.read_line(&mut line).await.ok()?;
        if head > MAX_REQUEST_BYTES || line.is_empty() {
            return None;
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':')?;
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => length = value.parse().ok()?,
            "authorization" => authorization = Some(value.to_owned()),
            "connection" => close = value.eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    if length > MAX_REQUEST_BYTES {
        return None;
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).await.ok()?;
    Some(Request {
        target: format!("{method} {path}"),
        authorization,
        close,
        body,
    })
}

fn response(status: &str, extra_headers: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra_headers}\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

fn error_body(message: &str) -> Vec<u8> {
    json!({"error": {"message": message, "type": "mock_error"}})
        .to_string()
        .into_bytes()
}

async fn serve_connection(stream: TcpStream, state: Arc<State>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    while let Some(request) = read_request(&mut reader).await {
        let index = state.served.fetch_add(1, Ordering::SeqCst);
        let fault = if state.plan.healthy_models && request.target == "GET /v1/models" {
            None
        } else {
            state.fault(index)
        };
        let parsed: Option<Value> = serde_json::from_slice(&request.body).ok();
        lock(&state.log).push(RequestRecord {
            at: Instant::now(),
            target: request.target.clone(),
            authorization: request.authorization.clone(),
            fault: fault.clone(),
            body: if state.plan.record_bodies {
                parsed.clone()
            } else {
                None
            },
        });
        if !state.plan.latency.is_zero() {
            tokio::time::sleep(state.plan.latency).await;
        }
        let bytes = match fault {
            Some(Fault::RateLimited { retry_after_s }) => response(
                "429 Too Many Requests",
                &format!("Retry-After: {retry_after_s}\r\n"),
                &error_body("rate limited"),
            ),
            Some(Fault::Internal) => {
                response("500 Internal Server Error", "", &error_body("injected"))
            }
            Some(Fault::Unavailable { retry_after_s }) => response(
                "503 Service Unavailable",
                &retry_after_s.map_or_else(String::new, |s| format!("Retry-After: {s}\r\n")),
                &error_body("unavailable"),
            ),
            Some(Fault::BadRequest) => response("400 Bad Request", "", &error_body("injected")),
            Some(Fault::MalformedJson) => response("200 OK", "", b"{\"choices\": [{\"text\": "),
            Some(Fault::DropConnection) => {
                let mut bytes = response("200 OK", "", br#"{"choices": [{"text": "The answer"}]}"#);
                bytes.truncate(bytes.len() - 20);
                let _ = write.write_all(&bytes).await;
                return;
            }
            Some(Fault::Stall(delay)) => {
                tokio::time::sleep(delay).await;
                answer(&request.target, parsed.as_ref(), &state)
            }
            None => answer(&request.target, parsed.as_ref(), &state),
        };
        if write.write_all(&bytes).await.is_err() || request.close {
            return;
        }
    }
}

/// A normal answer to `target` with JSON body `body`.
fn answer(target: &str, body: Option<&Value>, state: &State) -> Vec<u8> {
    let result = match (target, body) {
        ("GET /v1/models", _) => {
            Ok(json!({"object": "list", "data": [{"id": "mock", "object": "model"}]}))
        }
        ("POST /v1/chat/completions", Some(body)) => chat(body, state.plan.inline_reasoning),
        ("POST /v1/completions", Some(body)) => match state.model.as_ref() {
            Some(model) => model.completions(body).unwrap_or_else(|| completions(body)),
            None => completions(body),
        },
        ("POST /generate", Some(body)) if state.model.is_some() => state
            .model
            .as_ref()
            .map_or_else(|| Err("no model".to_owned()), |m| m.sglang_generate(body)),
        ("POST /v1/chat/completions" | "POST /v1/completions", None) => {
            Err("body is not JSON".to_owned())
        }
        _ => {
            return response(
                "404 Not Found",
                "",
                &error_body(&format!("no route {target}")),
            );
        }
    };
    match result {
        Ok(value) => {
            state.ok.fetch_add(1, Ordering::SeqCst);
            response("200 OK", "", value.to_string().as_bytes())
        }
        Err(message) => response("400 Bad Request", "", &error_body(&message)),
    }
}

/// Sampling fields both endpoints read.
struct Sampling {
    seed: Option<u64>,
    max_tokens: usize,
}

fn sampling(body: &Value) -> Result<Sampling, String> {
    if body.get("model").and_then(Value::as_str).is_none() {
        return Err("missing `model`".to_owned());
    }
    if body.get("n").and_then(Value::as_u64).unwrap_or(1) != 1 {
        return Err("the mock serves `n: 1` only".to_owned());
    }
    Ok(Sampling {
        seed: body.get("seed").and_then(Value::as_u64),
        max_tokens: body
            .get("max_tokens")
            .and_then(Value::as_u64)
            .map_or(16, |m| usize::try_from(m).unwrap_or(usize::MAX)),
    })
}

fn top_alternatives(token: &str, k: usize) -> Vec<(String, f64)> {
    let lp = mock_logprob(token);
    let mut top = vec![(token.to_owned(), lp)];
    top.extend((1..k).map(|j| (format!("alt{j}"), lp - j as f64)));
    top
}

fn chat(body: &Value, inline_reasoning: bool) -> Result<Value, String> {
    let sampling = sampling(body)?;
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("missing `messages`")?;
    let prompt: Vec<&str> = messages
        .iter()
        .map(|m| m.get("content").and_then(Value::as_str).unwrap_or(""))
        .collect();
    let prompt = prompt.join("\n");
    let answer = format!("The answer is {}.", mock_answer(&prompt, sampling.seed));
    let thinking = body
        .pointer("/chat_template_kwargs/enable_thinking")
        .and_then(Value::as_bool)
        != Some(false);
    let (reasoning, content) = match (thinking, inline_reasoning) {
        (false, _) => (String::new(), answer),
        (true, false) => (MOCK_REASONING.to_owned(), answer),
        (true, true) => (
            String::new(),
            format!("<think>\n{MOCK_REASONING}\n</think>\n\n{answer}"),
        ),
    };
    let reasoning_tokens = mock_tokenize(&reasoning);
    let content_tokens = mock_tokenize(&content);
    let keep_reasoning = reasoning_tokens.len().min(sampling.max_tokens);
    let keep_content = content_tokens
        .len()
        .min(sampling.max_tokens - keep_reasoning);
    let truncated = keep_reasoning + keep_content < reasoning_tokens.len() + content_tokens.len();
    let join = |tokens: &[(String, usize)]| tokens.iter().map(|t| t.0.as_str()).collect::<String>();
    let content_kept = &content_tokens[..keep_content];
    let mut message = json!({"role": "assistant", "content": join(content_kept)});
    if !reasoning.is_empty() {
        message["reasoning_content"] = json!(join(&reasoning_tokens[..keep_reasoning]));
    }
    let mut choice = json!({
        "index": 0,
        "message": message,
        "finish_reason": if truncated { "length" } else { "stop" },
    });
    if body.get("logprobs").and_then(Value::as_bool) == Some(true) {
        let k = body
            .get("top_logprobs")
            .and_then(Value::as_u64)
            .unwrap_or(0) as usize;
        let content: Vec<Value> = content_kept
            .iter()
            .map(|(token, _)| {
                let top: Vec<Value> = top_alternatives(token, k)
                    .into_iter()
                    .map(|(t, lp)| json!({"token": t, "logprob": lp}))
                    .collect();
                json!({"token": token, "logprob": mock_logprob(token), "top_logprobs": top})
            })
            .collect();
        choice["logprobs"] = json!({ "content": content });
    }
    Ok(json!({
        "id": "chatcmpl-mock", "object": "chat.completion", "model": body["model"],
        "choices": [choice],
        "usage": {"prompt_tokens": mock_tokenize(&prompt).len(),
            "completion_tokens": keep_reasoning + keep_content,
            "total_tokens": mock_tokenize(&prompt).len() + keep_reasoning + keep_content},
    }))
}

fn completions(body: &Value) -> Result<Value, String> {
    let sampling = sampling(body)?;
    let prompt = match body.get("prompt") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(ids)) if ids.iter().all(Value::is_u64) => ids
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" "),
        _ => return Err("`prompt` must be a string or an array of token ids".to_owned()),
    };
    let echo = body.get("echo").and_then(Value::as_bool) == Some(true);
    let logprobs = body
        .get("logprobs")
        .and_then(Value::as_u64)
        .map(|k| k as usize);
    let prompt_logprobs = body
        .get("prompt_logprobs")
        .and_then(Value::as_u64)
        .map(|k| k as usize);
    let return_ids = body.get("return_token_ids").and_then(Value::as_bool) == Some(true);

    let full = format!(
        " {MOCK_REASONING} The answer is {}.",
        mock_answer(&prompt, sampling.seed)
    );
    let full_tokens = mock_tokenize(&full);
    let kept = &full_tokens[..full_tokens.len().min(sampling.max_tokens)];
    let generated: String = kept.iter().map(|t| t.0.as_str()).collect();
    let prompt_tokens = mock_tokenize(&prompt);
    let prompt_chars = prompt.chars().count();

    // Tokens in the returned text: the prompt's (when echoing), then the generated ones.
    let mut shown: Vec<(String, usize, bool)> = Vec::new();
    if echo {
        shown.extend(prompt_tokens.iter().map(|(t, o)| (t.clone(), *o, true)));
    }
    let base = if echo { prompt_chars } else { 0 };
    shown.extend(kept.iter().map(|(t, o)| (t.clone(), base + o, false)));

    let mut choice = json!({
        "index": 0,
        "text": if echo { format!("{prompt}{generated}") } else { generated },
        "finish_reason": if kept.len() < full_tokens.len() { "length" } else { "stop" },
    });
    if let Some(k) = logprobs {
        let lp = |i: usize, token: &str, is_prompt: bool| {
            (!(is_prompt && i == 0)).then(|| mock_logprob(token))
        };
        choice["logprobs"] = json!({
            "tokens": shown.iter().map(|s| s.0.clone()).collect::<Vec<_>>(),
            "token_logprobs": shown.iter().enumerate().map(|(i, s)| lp(i, &s.0, s.2)).collect::<Vec<_>>(),
            "top_logprobs": shown.iter().enumerate().map(|(i, s)| {
                (!(s.2 && i == 0)).then(|| top_alternatives(&s.0, k).into_iter().collect::<BTreeMap<_, _>>())
            }).collect::<Vec<_>>(),
            "text_offset": shown.iter().map(|s| s.1).collect::<Vec<_>>(),
        });
    }
    if let Some(k) = prompt_logprobs {
        let entries: Vec<Value> = prompt_tokens
            .iter()
            .enumerate()
            .map(|(i, (token, _))| {
                if i == 0 {
                    return Value::Null;
                }
                let mut map = serde_json::Map::new();
                for (rank, (alt, lp)) in top_alternatives(token, k.max(1)).into_iter().enumerate() {
                    let id = if rank == 0 {
                        mock_token_id(token)
                    } else {
                        50_000 + rank as u32
                    };
                    map.insert(
                        id.to_string(),
                        json!({"logprob": lp, "rank": rank + 1, "decoded_token": alt}),
                    );
                }
                Value::Object(map)
            })
            .collect();
        choice["prompt_logprobs"] = Value::Array(entries);
    }
    if return_ids || prompt_logprobs.is_some() {
        choice["prompt_token_ids"] = prompt_tokens
            .iter()
            .map(|(t, _)| mock_token_id(t))
            .collect();
        choice["token_ids"] = kept.iter().map(|(t, _)| mock_token_id(t)).collect();
    }
    Ok(json!({
        "id": "cmpl-mock", "object": "text_completion", "model": body["model"],
        "choices": [choice],
        "usage": {"prompt_tokens": prompt_tokens.len(), "completion_tokens": kept.len(),
            "total_tokens": prompt_tokens.len() + kept.len()},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_keeps_offsets_in_characters() {
        let tokens = mock_tokenize("héllo  wörld !");
        assert_eq!(
            tokens,
            vec![
                ("héllo".to_owned(), 0),
                ("  wörld".to_owned(), 5),
                (" !".to_owned(), 12)
            ]
        );
        assert_eq!(
            tokens.iter().map(|t| t.0.as_str()).collect::<String>(),
            "héllo  wörld !"
        );
        assert!(mock_answer("q", Some(1)) < 100);
        assert_ne!(
            (0..10)
                .map(|s| mock_answer("q", Some(s)))
                .collect::<Vec<_>>(),
            vec![mock_answer("q", Some(0)); 10]
        );
    }
}
