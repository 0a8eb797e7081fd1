//! Teachers behind a server, at the edges (issue 14): reasoning a server splits out reaches every
//! later stage, and a dead server ends a run quickly while a flaky one does not.

use std::path::Path;
use std::time::{Duration, Instant};

use retort::backend::openai::{Endpoint, OpenAiBackend, OpenAiOptions};
use retort::backend::{Backend, GenerateRequest, Message, Prompt, SamplingParams};
use retort::distill::data::{DataOptions, TokenizerView, load_examples};
use retort::generate::{GenerateOptions, generate};
use retort::mock_server::{Fault, FaultPlan, MOCK_REASONING, MockServer, mock_answer};
use retort::reasoning::ReasoningMode;
use retort::records::InputFormat;
use retort::select::{SelectOptions, Strategy, select_file};
use serde_json::{Value, json};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures");

fn options(dead_after: Option<Duration>) -> OpenAiOptions {
    OpenAiOptions {
        concurrency: 4,
        timeout: Duration::from_millis(500),
        max_retries: 50,
        backoff_base: Duration::from_millis(2),
        backoff_max: Duration::from_millis(20),
        endpoint: Endpoint::Auto,
        api_key: None,
        extra_body: serde_json::Map::new(),
        dead_after,
    }
}

fn read_jsonl(path: &Path) -> Vec<Value> {
    fs_err::read_to_string(path)
        .expect("readable")
        .lines()
        .map(|line| serde_json::from_str(line).expect("JSON line"))
        .collect()
}

/// Chat problems whose gold answer is what the mock answers with seed 5, sample 0.
fn chat_problems(dir: &Path, n: usize) -> std::path::PathBuf {
    let text: String = (0..n)
        .map(|i| {
            let question = format!("Problem {i}?");
            let row = json!({"id": format!("p{i}"),
                "messages": [{"role": "user", "content": question}],
                "answer": mock_answer(&question, Some(5)).to_string()});
            format!("{row}\n")
        })
        .collect();
    let path = dir.join("problems.jsonl");
    fs_err::write(&path, text).expect("write problems");
    path
}

fn generate_with(
    server: &MockServer,
    input: &Path,
    output: &Path,
    reasoning: ReasoningMode,
) -> retort::generate::GenerateSummary {
    let backend = OpenAiBackend::new(&server.spec("teacher"), options(None)).expect("backend");
    let options = GenerateOptions {
        input: input.to_path_buf(),
        output: output.to_path_buf(),
        samples: 1,
        sampling: SamplingParams {
            seed: Some(5),
            ..SamplingParams::default()
        },
        chunk_size: 64,
        verify: Some(Default::default()),
        reasoning,
        ..GenerateOptions::default()
    };
    generate(&backend, &options, &mut |_, _| {}).expect("generate")
}

fn sft_targets(path: &Path) -> (Vec<String>, usize) {
    let tokenizer =
        retort_model::Tokenizer::from_dir(&Path::new(FIXTURES).join("qwen2-tiny")).expect("tok");
    let eos_id = tokenizer.eos_token_id().expect("fixture has an EOS token");
    let view = TokenizerView {
        tokenizer: &tokenizer,
        eos_id,
        eos_ids: vec![eos_id],
    };
    let data = DataOptions {
        input_format: InputFormat::Auto,
        only_correct: true,
        max_seq_len: 1024,
    };
    let (examples, stats) = load_examples(path, &view, &data).expect("examples");
    let targets = examples
        .iter()
        .map(|e| {
            tokenizer
                .decode(&e.ids[e.prompt_len..], true)
                .expect("decode")
        })
        .collect();
    (targets, stats.joined_reasoning)
}

// See: #14 (reasoning from a reasoning parser was kept in a field no later stage read).
#[test]
fn parser_reasoning_reaches_selected_traces_and_sft_targets() {
    let server = MockServer::start(FaultPlan::none()).expect("server");
    let dir = tempfile::tempdir().expect("tempdir");
    let input = chat_problems(dir.path(), 4);

    // keep (the default): joined in the native form, verified on the answer part.
    let traces = dir.path().join("traces.jsonl");
    let summary = generate_with(&server, &input, &traces, ReasoningMode::Keep);
    assert_eq!((summary.generated, summary.correct), (4, 4));
    assert_eq!(summary.separate_reasoning, 4);
    let selected = dir.path().join("selected.jsonl");
    let select = SelectOptions {
        strategies: vec![Strategy::Correct],
        ..SelectOptions::default()
    };
    select_file(&traces, &selected, &select, None, &[]).expect("select");
    let kept = read_jsonl(&selected);
    assert_eq!(kept.len(), 4);
    for record in &kept {
        let response = record["response"].as_str().expect("response");
        let answer = record["answer"].as_str().expect("answer");
        assert_eq!(
            response,
            format!("<think>\n{MOCK_REASONING}\n</think>\n\nThe answer is {answer}.")
        );
        assert!(record.get("reasoning").is_none());
    }
    let (targets, joined) = sft_targets(&selected);
    assert_eq!((targets.len(), joined), (4, 0));
    for target in &targets {
        assert!(target.contains(MOCK_REASONING), "{target:?}");
        assert!(target.contains("</think>"), "{target:?}");
    }

    // separate: stored apart, and joined back for training (never silently lost).
    let separate = dir.path().join("separate.jsonl");
    let summary = generate_with(&server, &input, &separate, ReasoningMode::Separate);
    assert_eq!(summary.correct, 4);
    let records = read_jsonl(&separate);
    assert!(
        records
            .iter()
            .all(|r| r["reasoning"] == json!(MOCK_REASONING))
    );
    assert!(records.iter().all(|r| {
        r["response"]
            .as_str()
            .is_some_and(|t| t.starts_with("The answer"))
    }));
    let (targets, joined) = sft_targets(&separate);
    assert_eq!(joined, 4);
    assert!(targets.iter().all(|t| t.contains(MOCK_REASONING)));

    // drop: the answer only, on purpose.
    let dropped = dir.path().join("dropped.jsonl");
    generate_with(&server, &input, &dropped, ReasoningMode::Drop);
    let (targets, _) = sft_targets(&dropped);
    assert!(targets.iter().all(|t| !t.contains(MOCK_REASONING)));
}

#[test]
fn inline_reasoning_and_enable_thinking_through_the_mock() {
    let server = MockServer::start(FaultPlan {
        inline_reasoning: true,
        record_bodies: true,
        ..FaultPlan::none()
    })
    .expect("server");
    let mut options = options(None);
    options.extra_body =
        serde_json::from_str(r#"{"chat_template_kwargs": {"enable_thinking": true}}"#)
            .expect("json");
    let backend = OpenAiBackend::new(&server.spec("m"), options).expect("backend");
    let request = GenerateRequest {
        key: 0,
        sample: 0,
        prompt: Prompt::Messages(vec![Message {
            role: "user".to_owned(),
            content: "Q?".to_owned(),
        }]),
    };
    let mut outcomes = Vec::new();
    backend
        .generate(
            vec![request.clone()],
            &SamplingParams::default(),
            &mut |o| {
                outcomes.push(o);
            },
        )
        .expect("generate");
    let completion = outcomes.remove(0).result.expect("ok");
    assert_eq!(completion.reasoning, None, "no parser: inline");
    assert!(
        completion.text.starts_with("<think>\nLet me think"),
        "{}",
        completion.text
    );
    let body = server.requests()[0].body.clone().expect("recorded");
    assert_eq!(body["chat_template_kwargs"]["enable_thinking"], json!(true));

    let mut options = self::options(None);
    options.extra_body =
        serde_json::from_str(r#"{"chat_template_kwargs": {"enable_thinking": false}}"#)
            .expect("json");
    let backend = OpenAiBackend::new(&server.spec("m"), options).expect("backend");
    backend
        .generate(vec![request], &SamplingParams::default(), &mut |o| {
            outcomes.push(o);
        })
        .expect("generate");
    let completion = outcomes.remove(0).result.expect("ok");
    assert!(!completion.text.contains("<think>"), "{}", completion.text);
}

fn text_requests(n: usize) -> Vec<GenerateRequest> {
    (0..n)
        .map(|key| GenerateRequest {
            key,
            sample: 0,
            prompt: Prompt::Text(format!("Problem {key}?")),
        })
        .collect()
}

#[test]
fn preflight_names_a_dead_server_and_passes_a_live_one() {
    // A port nobody listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let spec = format!("openai:http://127.0.0.1:{port}/v1#m");
    let backend = OpenAiBackend::new(&spec, options(None)).expect("backend");
    let started = Instant::now();
    let error = backend
        .preflight()
        .expect_err("nothing listens")
        .to_string();
    assert!(error.contains(&format!("127.0.0.1:{port}")), "{error}");
    assert!(error.contains("not answering"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(10));

    let failing = MockServer::start(FaultPlan::always(Fault::Internal)).expect("server");
    let backend = OpenAiBackend::new(&failing.spec("m"), options(None)).expect("backend");
    let error = backend.preflight().expect_err("500s").to_string();
    assert!(error.contains("HTTP 500"), "{error}");
    assert_eq!(failing.requests_served(), 4, "1 try + 3 retries");

    let live = MockServer::start(FaultPlan::schedule(vec![Some(Fault::Internal)])).expect("server");
    let backend = OpenAiBackend::new(&live.spec("m"), options(None)).expect("backend");
    backend.preflight().expect("answers on the second try");
}

// See: #14 (a dead server kept `generate` retrying for more than ten minutes).
#[test]
fn breaker_stops_a_dead_run_and_spares_a_flaky_one() {
    let dead = MockServer::start(FaultPlan {
        healthy_models: true,
        ..FaultPlan::always(Fault::Internal)
    })
    .expect("server");
    let backend = OpenAiBackend::new(&dead.spec("m"), options(Some(Duration::from_millis(300))))
        .expect("backend");
    backend.preflight().expect("the front end answers");
    let started = Instant::now();
    let mut delivered = 0;
    let error = backend
        .generate(text_requests(40), &SamplingParams::default(), &mut |_| {
            delivered += 1;
        })
        .expect_err("the breaker trips")
        .to_string();
    let elapsed = started.elapsed();
    assert!(error.contains("looks down"), "{error}");
    assert!(error.contains("HTTP 500"), "{error}");
    assert_eq!(
        delivered, 0,
        "stopped requests are not reported as failed for good"
    );
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    eprintln!("breaker tripped after {elapsed:?}: {error}");

    // Many faults, but never a whole window of them in a row: the run completes.
    let flaky = MockServer::start(FaultPlan::random(
        3,
        vec![
            (Fault::Internal, 0.2),
            (Fault::DropConnection, 0.05),
            (Fault::RateLimited { retry_after_s: 0 }, 0.1),
        ],
    ))
    .expect("server");
    let backend = OpenAiBackend::new(&flaky.spec("m"), options(Some(Duration::from_millis(1))))
        .expect("backend");
    let mut ok = 0;
    backend
        .generate(text_requests(60), &SamplingParams::default(), &mut |o| {
            ok += usize::from(o.result.is_ok());
        })
        .expect("no trip");
    assert_eq!(ok, 60);
}
