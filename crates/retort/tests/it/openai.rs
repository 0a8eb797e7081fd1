//! The OpenAI-compatible backend against the fault-injecting mock server on loopback.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use retort::backend::openai::{ApiKey, Endpoint, OpenAiBackend, OpenAiOptions};
use retort::backend::{
    Backend, FinishReason, GenerateRequest, Message, Prompt, RequestOutcome, SamplingParams,
};
use retort::mock_server::{
    Fault, FaultPlan, MOCK_REASONING, MockServer, mock_answer, mock_logprob, mock_token_id,
    mock_tokenize,
};

/// Fast settings for tests: short timeouts, tiny backoffs, no key from the environment.
fn fast_options() -> OpenAiOptions {
    OpenAiOptions {
        concurrency: 16,
        timeout: Duration::from_millis(400),
        max_retries: 20,
        backoff_base: Duration::from_millis(2),
        backoff_max: Duration::from_millis(20),
        endpoint: Endpoint::Auto,
        api_key: None,
        extra_body: serde_json::Map::new(),
        dead_after: None,
    }
}

fn prompt_for(key: usize) -> Prompt {
    if key.is_multiple_of(2) {
        Prompt::Messages(vec![
            Message {
                role: "system".to_owned(),
                content: "Be brief.".to_owned(),
            },
            Message {
                role: "user".to_owned(),
                content: format!("Problem {key}?"),
            },
        ])
    } else {
        Prompt::Text(format!("Problem {key}?"))
    }
}

/// The text the mock hashes for `prompt` (see `mock_answer`).
fn hashed_text(prompt: &Prompt) -> String {
    match prompt {
        Prompt::Text(text) => text.clone(),
        Prompt::Messages(messages) => messages
            .iter()
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        Prompt::Ids(ids) => ids
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" "),
    }
}

fn requests(records: usize, samples: usize) -> Vec<GenerateRequest> {
    (0..records)
        .flat_map(|key| {
            (0..samples).map(move |sample| GenerateRequest {
                key,
                sample,
                prompt: prompt_for(key),
            })
        })
        .collect()
}

fn collect(
    backend: &OpenAiBackend,
    requests: Vec<GenerateRequest>,
    params: &SamplingParams,
) -> Vec<RequestOutcome> {
    let caller = std::thread::current().id();
    let mut outcomes = Vec::new();
    backend
        .generate(requests, params, &mut |outcome| {
            assert_eq!(
                std::thread::current().id(),
                caller,
                "sink off the calling thread"
            );
            outcomes.push(outcome);
        })
        .expect("generate");
    outcomes
}

#[test]
fn mixed_faults_every_request_comes_back_exactly_once() {
    let server = MockServer::start(FaultPlan::random(
        7,
        vec![
            (Fault::RateLimited { retry_after_s: 0 }, 0.08),
            (Fault::Internal, 0.08),
            (
                Fault::Unavailable {
                    retry_after_s: Some(0),
                },
                0.05,
            ),
            (Fault::Stall(Duration::from_millis(1500)), 0.04),
            (Fault::MalformedJson, 0.08),
            (Fault::DropConnection, 0.08),
        ],
    ))
    .expect("server");
    let backend = OpenAiBackend::new(&server.spec("mock"), fast_options()).expect("backend");
    let params = SamplingParams {
        seed: Some(100),
        ..SamplingParams::default()
    };
    let (records, samples) = (40, 3);
    let outcomes = collect(&backend, requests(records, samples), &params);

    let mut seen: BTreeMap<(usize, usize), usize> = BTreeMap::new();
    let mut attempts = 0;
    for outcome in &outcomes {
        *seen.entry((outcome.key, outcome.sample)).or_default() += 1;
        attempts += outcome.attempts;
        let completion = outcome.result.as_ref().expect("every request succeeds");
        let answer = mock_answer(
            &hashed_text(&prompt_for(outcome.key)),
            Some(100 + outcome.sample as u64),
        );
        assert!(
            completion
                .text
                .ends_with(&format!("The answer is {answer}.")),
            "{:?}",
            completion.text
        );
        assert_eq!(completion.finish_reason, FinishReason::Stop);
    }
    assert_eq!(outcomes.len(), records * samples);
    assert_eq!(seen.len(), records * samples, "some (key, sample) missing");
    assert!(seen.values().all(|&n| n == 1), "duplicates: {seen:?}");
    assert!(attempts > records * samples, "no fault was injected");
    assert_eq!(
        server.requests_served(),
        attempts,
        "attempts vs server count"
    );
    assert_eq!(server.responses_ok(), records * samples);
    let usage = backend.usage();
    assert_eq!(usage.succeeded as usize, records * samples);
    assert_eq!(usage.failed, 0);
    assert_eq!(usage.attempts as usize, attempts);
    assert!(usage.completion_tokens > 0 && usage.prompt_tokens > 0);
    eprintln!(
        "mixed faults: {} requests, {attempts} attempts",
        records * samples
    );
}

#[test]
fn permanently_failing_server_gives_errors_in_bounded_time() {
    let cases = [
        (Fault::Internal, 4),
        (Fault::Stall(Duration::from_secs(5)), 4),
        (Fault::BadRequest, 1),
        (Fault::DropConnection, 4),
    ];
    for (fault, expected_attempts) in cases {
        let server = MockServer::start(FaultPlan::always(fault.clone())).expect("server");
        let backend = OpenAiBackend::new(
            &server.spec("mock"),
            OpenAiOptions {
                max_retries: 3,
                timeout: Duration::from_millis(200),
                ..fast_options()
            },
        )
        .expect("backend");
        let started = Instant::now();
        let outcomes = collect(&backend, requests(10, 2), &SamplingParams::default());
        let elapsed = started.elapsed();
        assert!(
            elapsed < Duration::from_secs(20),
            "{fault:?} took {elapsed:?}"
        );
        assert_eq!(outcomes.len(), 20, "{fault:?}");
        for outcome in &outcomes {
            let error = outcome.result.as_ref().expect_err("must fail");
            assert_eq!(outcome.attempts, expected_attempts, "{fault:?}: {error}");
        }
        let keys: std::collections::BTreeSet<_> =
            outcomes.iter().map(|o| (o.key, o.sample)).collect();
        assert_eq!(keys.len(), 20);
        assert_eq!(
            server.requests_served(),
            20 * expected_attempts,
            "{fault:?}"
        );
        assert_eq!(backend.usage().failed, 20);
        let first = outcomes[0].result.as_ref().expect_err("failed");
        eprintln!("{fault:?}: {elapsed:?}, e.g. {first}");
    }
}

#[test]
fn retry_after_is_respected() {
    for fault in [
        Fault::RateLimited { retry_after_s: 1 },
        Fault::Unavailable {
            retry_after_s: Some(1),
        },
    ] {
        let server =
            MockServer::start(FaultPlan::schedule(vec![Some(fault.clone())])).expect("server");
        let backend = OpenAiBackend::new(&server.spec("mock"), fast_options()).expect("backend");
        let outcomes = collect(&backend, requests(1, 1), &SamplingParams::default());
        assert_eq!(outcomes.len(), 1);
        assert!(outcomes[0].result.is_ok());
        assert_eq!(outcomes[0].attempts, 2);
        let log = server.requests();
        assert_eq!(log.len(), 2);
        assert_eq!(log[0].fault, Some(fault.clone()));
        let gap = log[1].at - log[0].at;
        // Backoff alone would be at most 20 ms here.
        assert!(
            gap >= Duration::from_millis(950),
            "{fault:?}: retried after {gap:?}"
        );
    }
}

#[test]
fn api_key_is_sent_as_bearer_and_never_printed() {
    let server = MockServer::start(FaultPlan::none()).expect("server");
    let secret = "sk-test-very-secret-123";
    let options = OpenAiOptions {
        api_key: Some(ApiKey::new(secret)),
        ..fast_options()
    };
    assert!(!format!("{options:?}").contains(secret));
    let backend = OpenAiBackend::new(&server.spec("mock"), options).expect("backend");
    assert!(!format!("{backend:?}").contains(secret));
    assert!(!backend.name().contains(secret));
    let outcomes = collect(&backend, requests(2, 1), &SamplingParams::default());
    assert!(outcomes.iter().all(|o| o.result.is_ok()));
    let log = server.requests();
    assert_eq!(log.len(), 2);
    for record in log {
        assert_eq!(
            record.authorization.as_deref(),
            Some(&*format!("Bearer {secret}"))
        );
    }
    // A rejected key is not retried and its error does not echo the key.
    let failing = MockServer::start(FaultPlan::always(Fault::BadRequest)).expect("server");
    let backend = OpenAiBackend::new(
        &failing.spec("mock"),
        OpenAiOptions {
            api_key: Some(ApiKey::new(secret)),
            ..fast_options()
        },
    )
    .expect("backend");
    let outcomes = collect(&backend, requests(1, 1), &SamplingParams::default());
    let error = outcomes[0].result.as_ref().expect_err("400");
    assert!(error.contains("400") && !error.contains(secret), "{error}");
}

#[test]
fn sampling_params_reasoning_truncation_and_usage() {
    let server = MockServer::start(FaultPlan {
        record_bodies: true,
        ..FaultPlan::none()
    })
    .expect("server");
    let mut options = fast_options();
    options
        .extra_body
        .insert("min_p".to_owned(), serde_json::json!(0.05));
    let backend = OpenAiBackend::new(&server.spec("teacher"), options).expect("backend");
    let params = SamplingParams {
        temperature: 0.7,
        top_p: 0.9,
        top_k: Some(40),
        max_new_tokens: 64,
        seed: Some(5),
        stop: vec!["</s>".to_owned()],
        logprobs: 2,
    };
    let mut outcomes = collect(&backend, requests(2, 2), &params);
    outcomes.sort_by_key(|o| (o.key, o.sample));
    // Key 0 is a chat prompt: reasoning kept separately, content verbatim.
    let chat = outcomes[1].result.as_ref().expect("ok");
    assert_eq!(chat.reasoning.as_deref(), Some(MOCK_REASONING));
    let answer = mock_answer(&hashed_text(&prompt_for(0)), Some(6));
    assert_eq!(chat.text, format!("The answer is {answer}."));
    let logprobs = chat.logprobs.as_ref().expect("logprobs");
    assert_eq!(logprobs.len(), 4);
    assert_eq!(logprobs[0].logprob, mock_logprob("The"));
    assert_eq!(logprobs[0].top.len(), 2);
    // Key 1 is a text prompt: completions endpoint, per-token log-probs with top-2.
    let text = outcomes[2].result.as_ref().expect("ok");
    assert_eq!(text.reasoning, None);
    assert!(text.text.starts_with(&format!(" {MOCK_REASONING}")));
    assert_eq!(
        text.logprobs.as_ref().expect("logprobs")[0].top.len(),
        2,
        "{text:?}"
    );
    assert_eq!(text.completion_tokens, 10);
    assert_eq!(text.prompt_tokens, 2);

    let log = server.requests();
    let mut seeds: Vec<u64> = Vec::new();
    for record in &log {
        let body = record.body.as_ref().expect("recorded");
        assert_eq!(body["model"], "teacher");
        assert_eq!(body["temperature"], 0.7);
        assert_eq!(body["top_p"], 0.9);
        assert_eq!(body["top_k"], 40);
        assert_eq!(body["max_tokens"], 64);
        assert_eq!(body["stop"], serde_json::json!(["</s>"]));
        assert_eq!(body["n"], 1);
        assert_eq!(body["min_p"], 0.05);
        seeds.push(body["seed"].as_u64().expect("seed"));
    }
    seeds.sort_unstable();
    assert_eq!(seeds, vec![5, 5, 6, 6]);
    let chat_targets = log
        .iter()
        .filter(|r| r.target == "POST /v1/chat/completions")
        .count();
    assert_eq!(chat_targets, 2);

    // Truncation reports `length`; token-id prompts go to completions.
    let short = SamplingParams {
        max_new_tokens: 3,
        ..SamplingParams::default()
    };
    let ids = vec![GenerateRequest {
        key: 9,
        sample: 0,
        prompt: Prompt::Ids(vec![1, 2, 3]),
    }];
    let outcomes = collect(&backend, ids, &short);
    let truncated = outcomes[0].result.as_ref().expect("ok");
    assert_eq!(truncated.finish_reason, FinishReason::Length);
    assert_eq!(truncated.completion_tokens, 3);
    assert_eq!(truncated.text, " Let me think");
    assert_eq!(backend.usage().succeeded, 5);
}

#[test]
fn chat_prompt_on_completions_endpoint_is_refused_up_front() {
    let server = MockServer::start(FaultPlan::none()).expect("server");
    let backend = OpenAiBackend::new(
        &server.spec("mock"),
        OpenAiOptions {
            endpoint: Endpoint::Completions,
            ..fast_options()
        },
    )
    .expect("backend");
    let result = backend.generate(requests(1, 1), &SamplingParams::default(), &mut |_| {});
    assert!(result.is_err());
    assert_eq!(server.requests_served(), 0);
    assert!(OpenAiBackend::new("openai:http://127.0.0.1:1/v1", fast_options()).is_err());
}

fn expected_scores(prompt: &str, completion: &str) -> (Vec<f64>, Vec<u32>) {
    let boundary = prompt.chars().count();
    let tokens = mock_tokenize(&format!("{prompt}{completion}"));
    let start = tokens
        .iter()
        .rposition(|(_, offset)| *offset <= boundary)
        .expect("a token");
    let kept = &tokens[start..];
    (
        kept.iter().map(|(t, _)| mock_logprob(t)).collect(),
        kept.iter().map(|(t, _)| mock_token_id(t)).collect(),
    )
}

#[test]
fn scoring_returns_the_completion_part_only() {
    let server =
        MockServer::start(FaultPlan::schedule(vec![Some(Fault::Internal)])).expect("server");
    let backend = OpenAiBackend::new(&server.spec("mock"), fast_options()).expect("backend");
    let prompt = "Question: what is 2+2?";
    let completion = " The answer is 4.";
    let scored = backend
        .score(&Prompt::Text(prompt.to_owned()), completion, 3)
        .expect("score");
    let (logprobs, ids) = expected_scores(prompt, completion);
    assert_eq!(logprobs.len(), 4);
    assert_eq!(scored.token_logprobs, logprobs);
    assert_eq!(scored.completion_ids, Some(ids.clone()));
    assert_eq!(scored.top_logprobs.len(), 4);
    for (top, id) in scored.top_logprobs.iter().zip(&ids) {
        assert_eq!(top.len(), 3);
        assert_eq!(top[0].0, id.to_string(), "rank 1 is the actual token");
    }
    // A token straddling the boundary ("wor|ld") counts as the completion's.
    let scored = backend
        .score(&Prompt::Text("Hello wor".to_owned()), "ld again", 0)
        .expect("score");
    let (logprobs, _) = expected_scores("Hello wor", "ld again");
    assert_eq!(scored.token_logprobs, logprobs);
    assert_eq!(scored.token_logprobs[0], mock_logprob(" world"));
    assert!(scored.top_logprobs.is_empty());
    // The first request hit the injected 500 and was retried.
    assert_eq!(server.requests_served(), 3);
    assert!(
        backend
            .score(&Prompt::Messages(Vec::new()), "x", 1)
            .is_err()
    );
}

/// Throughput against the zero-latency mock (run with
/// `cargo test -p retort --test it --release -- --ignored --nocapture openai_throughput`).
/// Reports requests/s and the client's CPU time per request (threads not named `mock-server`),
/// read from /proc on Linux.
#[test]
#[ignore = "benchmark"]
fn openai_throughput() {
    let server = MockServer::start(FaultPlan::none()).expect("server");
    let backend = OpenAiBackend::new(
        &server.spec("mock"),
        OpenAiOptions {
            concurrency: 64,
            ..fast_options()
        },
    )
    .expect("backend");
    let params = SamplingParams {
        max_new_tokens: 64,
        seed: Some(1),
        ..SamplingParams::default()
    };
    // Warm up the connection pool.
    collect(&backend, requests(64, 1), &params);
    let n = 20_000;
    let (client_before, server_before) = cpu_split();
    let started = Instant::now();
    let outcomes = collect(&backend, requests(n / 4, 4), &params);
    let wall = started.elapsed().as_secs_f64();
    let (client_after, server_after) = cpu_split();
    assert_eq!(outcomes.len(), n);
    assert!(outcomes.iter().all(|o| o.result.is_ok()));
    let client = client_after - client_before;
    let server_cpu = server_after - server_before;
    eprintln!(
        "openai_throughput: {n} requests in {wall:.2} s = {:.0} req/s; client CPU {:.1} us/request \
         ({client:.2} s), mock server CPU {:.1} us/request",
        n as f64 / wall,
        client / n as f64 * 1e6,
        server_cpu / n as f64 * 1e6
    );
}

/// (client, server) CPU seconds of this process's threads, split by thread name.
fn cpu_split() -> (f64, f64) {
    let ticks = 100.0; // USER_HZ on Linux.
    let (mut client, mut server) = (0.0, 0.0);
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return (0.0, 0.0);
    };
    for task in tasks.flatten() {
        let path = task.path();
        let comm = fs_err::read_to_string(path.join("comm")).unwrap_or_default();
        let stat = fs_err::read_to_string(path.join("stat")).unwrap_or_default();
        // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let cpu = fields
            .get(11..13)
            .map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum::<f64>())
            .unwrap_or(0.0)
            / ticks;
        if comm.trim().starts_with("mock-server") {
            server += cpu;
        } else {
            client += cpu;
        }
    }
    (client, server)
}

#[test]
fn mock_server_lists_models_and_stops_when_dropped() {
    use std::io::{Read, Write};
    let server = MockServer::start(FaultPlan::none()).expect("server");
    let address = server
        .url()
        .trim_start_matches("http://")
        .trim_end_matches("/v1")
        .to_owned();
    let mut stream = std::net::TcpStream::connect(&address).expect("connect");
    stream
        .write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).expect("read");
    assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
    assert!(reply.contains(r#""id":"mock""#), "{reply}");
    assert_eq!(server.requests_served(), 1);
    drop(server);
    assert!(
        std::net::TcpStream::connect(&address).is_err(),
        "still listening after drop"
    );
}
