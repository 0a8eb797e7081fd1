//! End-to-end tests of the `retort` binary on the fixture models and real files (one test binary).

use std::path::{Path, PathBuf};
use std::process::Command;

use assert_cmd::prelude::*;
use serde_json::{Value, json};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures")
}

fn retort() -> Command {
    let mut cmd = Command::cargo_bin("retort").expect("the retort binary is built for tests");
    cmd.arg("--quiet");
    cmd
}

fn golden(model: &str) -> Value {
    let text = fs_err::read_to_string(fixtures().join(model).join("golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn write_jsonl(path: &Path, rows: &[Value]) {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    fs_err::write(path, text).unwrap();
}

fn read_jsonl(path: &Path) -> Vec<Value> {
    fs_err::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[path = "cli/outputs.rs"]
mod outputs;

#[path = "cli/compute.rs"]
mod compute;

const MODELS: [&str; 3] = ["qwen2-tiny", "llama-tiny", "qwen3-tiny"];

#[test]
fn score_matches_pytorch_goldens() {
    let dir = tempfile::tempdir().unwrap();
    for model in MODELS {
        let g = golden(model);
        let rows: Vec<Value> = g["scoring"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| {
                [
                    json!({"id": format!("{}-ids", s["name"].as_str().unwrap()), "prompt_ids": s["prompt_ids"], "completion_ids": s["continuation_ids"]}),
                    json!({"id": format!("{}-text", s["name"].as_str().unwrap()), "prompt": s["prompt_text"], "completion": s["continuation_text"], "keep": 1}),
                ]
            })
            .collect();
        let input = dir.path().join(format!("{model}-in.jsonl"));
        let output = dir.path().join(format!("{model}-out.jsonl"));
        write_jsonl(&input, &rows);
        retort()
            .args(["score", "--model"])
            .arg(fixtures().join(model))
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .args(["--batch-size", "4"])
            .assert()
            .success();
        let out = read_jsonl(&output);
        assert_eq!(out.len(), rows.len());
        let mut max_abs_diff = 0.0f64;
        for (i, s) in g["scoring"].as_array().unwrap().iter().enumerate() {
            let want: Vec<f64> = s["logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            for record in &out[2 * i..2 * i + 2] {
                let got: Vec<f64> = record["token_logprobs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect();
                assert_eq!(got.len(), want.len(), "{model} {}", record["id"]);
                for (a, b) in got.iter().zip(&want) {
                    max_abs_diff = max_abs_diff.max((a - b).abs());
                }
                assert_eq!(record["num_tokens"], json!(want.len()));
            }
            assert_eq!(
                out[2 * i + 1]["keep"],
                json!(1),
                "unknown fields are carried through"
            );
        }
        println!("{model}: score max_abs_diff {max_abs_diff:.2e}");
        assert!(max_abs_diff < 1e-4, "{model}: {max_abs_diff}");
        assert!(
            output
                .with_file_name(format!("{model}-out.jsonl.manifest.json"))
                .exists()
        );
    }
}

#[test]
fn greedy_generate_matches_pytorch_goldens() {
    let dir = tempfile::tempdir().unwrap();
    for model in MODELS {
        let g = golden(model);
        let gens = g["generation"].as_array().unwrap();
        let rows: Vec<Value> = gens
            .iter()
            .map(|s| json!({"id": s["name"], "prompt_ids": s["prompt_ids"]}))
            .collect();
        let input = dir.path().join(format!("{model}-gen.jsonl"));
        let output = dir.path().join(format!("{model}-traces.jsonl"));
        write_jsonl(&input, &rows);
        retort()
            .args([
                "generate",
                "--temperature",
                "0",
                "--max-new-tokens",
                "24",
                "--model",
            ])
            .arg(fixtures().join(model))
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .assert()
            .success();
        let out = read_jsonl(&output);
        assert_eq!(out.len(), gens.len());
        for s in gens {
            let trace = out
                .iter()
                .find(|t| t["id"] == s["name"])
                .expect("every prompt has a trace");
            assert_eq!(
                trace["response_ids"], s["new_token_ids"],
                "{model} {}",
                s["name"]
            );
            assert_eq!(
                trace["response"], s["text_skip_special"],
                "{model} {}",
                s["name"]
            );
            let want = if s["stopped_on_eos"].as_bool().unwrap() {
                "stop"
            } else {
                "length"
            };
            assert_eq!(trace["finish_reason"], json!(want));
            assert_eq!(trace["sample"], json!(0));
        }
    }
}

#[test]
fn seeded_sampling_is_reproducible_and_resumes_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("p.jsonl");
    let rows: Vec<Value> = (0..3)
        .map(|i| json!({"prompt": format!("Q: {i} + 2 =")}))
        .collect();
    write_jsonl(&input, &rows);
    let run = |out: &Path, extra: &[&str]| {
        retort()
            .args([
                "generate",
                "--samples",
                "2",
                "--temperature",
                "1.0",
                "--top-p",
                "0.9",
                "--max-new-tokens",
                "8",
                "--seed",
                "7",
            ])
            .args(extra)
            .arg("--model")
            .arg(fixtures().join("qwen2-tiny"))
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(out)
            .assert()
            .success();
    };
    let a = dir.path().join("a.jsonl");
    run(&a, &[]);
    let b = dir.path().join("b.jsonl");
    run(&b, &["--batch-size", "1"]);
    let key = |v: &Value| {
        (
            v["id"].as_str().unwrap().to_string(),
            v["sample"].as_u64().unwrap(),
        )
    };
    let mut ta = read_jsonl(&a);
    let mut tb = read_jsonl(&b);
    ta.sort_by_key(key);
    tb.sort_by_key(key);
    assert_eq!(ta.len(), 6);
    let ids = |t: &[Value]| {
        t.iter()
            .map(|v| v["response_ids"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&ta), ids(&tb), "a trace does not depend on batching");
    assert_ne!(
        ta[0]["response_ids"], ta[1]["response_ids"],
        "samples differ"
    );

    // Simulate a kill: keep two complete lines and a torn third, then rerun.
    let text = fs_err::read_to_string(&a).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    fs_err::write(
        &a,
        format!(
            "{}\n{}\n{}",
            lines[0],
            lines[1],
            &lines[2][..lines[2].len() / 2]
        ),
    )
    .unwrap();
    run(&a, &[]);
    let mut again = read_jsonl(&a);
    again.sort_by_key(key);
    assert_eq!(
        ids(&again),
        ids(&ta),
        "resumed output equals an uninterrupted run, each pair once"
    );
}

#[test]
fn bad_input_names_file_and_line_and_leaves_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("broken.jsonl");
    fs_err::write(
        &input,
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\", \n",
    )
    .unwrap();
    let output = dir.path().join("out.jsonl");
    let assert = retort()
        .args(["score", "--model"])
        .arg(fixtures().join("qwen2-tiny"))
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .assert()
        .failure();
    let stderr = String::from_utf8_lossy(&assert.get_output().stderr).to_string();
    assert!(stderr.contains("broken.jsonl:2"), "{stderr}");
    assert!(!output.exists());

    fs_err::write(&input, "{\"prompt\": \"a\"}\n").unwrap();
    let assert = retort()
        .args(["score", "--model"])
        .arg(fixtures().join("qwen2-tiny"))
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .assert()
        .failure();
    let stderr = String::from_utf8_lossy(&assert.get_output().stderr).to_string();
    assert!(
        stderr.contains("broken.jsonl:1") && stderr.contains("`completion`"),
        "{stderr}"
    );
    assert!(!output.exists());

    let model_dir = dir.path().join("model");
    fs_err::create_dir_all(&model_dir).unwrap();
    for file in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        fs_err::copy(
            fixtures().join("qwen2-tiny").join(file),
            model_dir.join(file),
        )
        .unwrap();
    }
    fs_err::write(
        model_dir.join("model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":",
    )
    .unwrap();
    let assert = retort()
        .args(["generate", "--model"])
        .arg(&model_dir)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .assert()
        .failure();
    let stderr = String::from_utf8_lossy(&assert.get_output().stderr).to_string();
    assert!(stderr.contains("model.safetensors"), "{stderr}");
    assert!(!output.exists());

    let mut config: Value =
        serde_json::from_str(&fs_err::read_to_string(model_dir.join("config.json")).unwrap())
            .unwrap();
    config["architectures"] = json!(["GPT2LMHeadModel"]);
    fs_err::write(model_dir.join("config.json"), config.to_string()).unwrap();
    let assert = retort()
        .args(["generate", "--model"])
        .arg(&model_dir)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .assert()
        .failure();
    let stderr = String::from_utf8_lossy(&assert.get_output().stderr).to_string();
    assert!(
        stderr.contains("GPT2LMHeadModel") && stderr.contains("Qwen2ForCausalLM"),
        "{stderr}"
    );
}

#[test]
fn verify_adds_verdicts_and_reports_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("traces.jsonl");
    write_jsonl(
        &input,
        &[
            json!({"id": 1, "answer": "14", "response": "12 + 7 = 19. 19 - 5 = 14. The answer is 14.", "extra": [1]}),
            json!({"id": 2, "answer": "\\frac{1}{2}", "response": "so $\\boxed{0.5}$"}),
            json!({"id": 3, "answer": "7", "response": "We start by adding"}),
        ],
    );
    let output = dir.path().join("verified.jsonl");
    retort()
        .args(["verify", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .assert()
        .success();
    let out = read_jsonl(&output);
    let verdicts: Vec<bool> = out
        .iter()
        .map(|r| r["verdict"]["correct"].as_bool().unwrap())
        .collect();
    assert_eq!(verdicts, [true, true, false]);
    assert_eq!(out[0]["extra"], json!([1]));
    assert_eq!(out[2]["verdict"]["extracted"], Value::Null);

    fs_err::write(
        &input,
        "{\"answer\": \"1\", \"response\": \"1\"}\n{\"answer\": \"1\"}\n",
    )
    .unwrap();
    let bad = dir.path().join("bad.jsonl");
    let assert = retort()
        .args(["verify", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&bad)
        .assert()
        .failure();
    let stderr = String::from_utf8_lossy(&assert.get_output().stderr).to_string();
    assert!(
        stderr.contains("traces.jsonl:2") && stderr.contains("`response`"),
        "{stderr}"
    );
    assert!(!bad.exists());
}

// See: #14: `retort render` shows the exact prompt, with a `{% generation %}` template.
#[test]
fn render_prints_each_prompt_with_its_token_count() {
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("template.jinja");
    // A SmolLM3-style template (written for this test): assistant turns in `{% generation %}`.
    // The expected texts are what jinja2 3.1.6 renders with transformers' settings.
    fs_err::write(
        &template,
        "{%- set think = enable_thinking | default(true) -%}\n\
         {%- for message in messages -%}\n\
         {%- if message.role == 'assistant' -%}\n\
         <|im_start|>assistant\n\
         {% generation %}{{ message.content }}<|im_end|>\n{% endgeneration %}\n\
         {%- else -%}\n\
         <|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n\n\
         {%- endif -%}\n\
         {%- endfor -%}\n\
         {%- if add_generation_prompt %}<|im_start|>assistant\n{% if not think %}<think>\n\n</think>\n{% endif %}{% endif %}",
    )
    .unwrap();
    let input = dir.path().join("problems.jsonl");
    write_jsonl(
        &input,
        &[
            json!({"id": "a", "messages": [{"role": "user", "content": "2+2?"}]}),
            json!({"id": "b", "messages": [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "3+3?"}]}),
        ],
    );
    let output = retort()
        .args(["render", "--model"])
        .arg(fixtures().join("qwen2-tiny"))
        .arg("--input")
        .arg(&input)
        .arg("--chat-template")
        .arg(&template)
        .args([
            "--chat-template-kwargs",
            r#"{"enable_thinking": false}"#,
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rows: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        rows[0]["text"],
        json!("<|im_start|>user\n2+2?<|im_end|><|im_start|>assistant\n<think>\n\n</think>\n")
    );
    assert_eq!(
        rows[1]["text"],
        json!(
            "<|im_start|>user\nHi<|im_end|><|im_start|>assistant\nHello<|im_end|>\n\
               <|im_start|>user\n3+3?<|im_end|><|im_start|>assistant\n<think>\n\n</think>\n"
        )
    );
    assert!(rows.iter().all(|r| r["num_tokens"].as_u64().unwrap() > 5));
    // The text form, and a server spec refused with a reason.
    let text = retort()
        .args(["render", "--model"])
        .arg(fixtures().join("qwen2-tiny"))
        .arg("--input")
        .arg(&input)
        .args(["--limit", "1"])
        .output()
        .unwrap();
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(text.starts_with("### a ("), "{text}");
    assert!(text.contains("<|im_start|>user\n2+2?<|im_end|>"), "{text}");
    let refused = retort()
        .args([
            "render",
            "--model",
            "openai:http://127.0.0.1:9/v1#m",
            "--input",
        ])
        .arg(&input)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("own"));
}

mod remote {
    use std::time::{Duration, Instant};

    use retort::mock_server::{Fault, FaultPlan, MockServer, mock_answer};

    use super::*;

    fn problems(dir: &Path, n: usize, gold: impl Fn(&str) -> String) -> PathBuf {
        let rows: Vec<Value> = (0..n)
            .map(|i| {
                let prompt = format!("Q: problem number {i}?\nA:");
                json!({"id": format!("p{i}"), "prompt": prompt, "answer": gold(&prompt)})
            })
            .collect();
        let path = dir.join("problems.jsonl");
        write_jsonl(&path, &rows);
        path
    }

    fn generate(server: &MockServer, input: &Path, output: &Path, extra: &[&str]) -> Command {
        let mut cmd = retort();
        cmd.args([
            "generate",
            "--model",
            &server.spec("teacher"),
            "--temperature",
            "0.7",
            "--seed",
            "3",
        ])
        .args([
            "--timeout",
            "1",
            "--backoff-base",
            "0.01",
            "--backoff-max",
            "0.05",
        ])
        .args(extra)
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output);
        cmd
    }

    fn pairs(path: &Path) -> Vec<(String, u64)> {
        let mut keys: Vec<(String, u64)> = read_jsonl(path)
            .iter()
            .map(|t| {
                (
                    t["id"].as_str().unwrap().to_string(),
                    t["sample"].as_u64().unwrap(),
                )
            })
            .collect();
        keys.sort();
        keys
    }

    #[test]
    fn faults_are_retried_and_every_trace_lands_exactly_once() {
        let dir = tempfile::tempdir().unwrap();
        let plan = FaultPlan::random(
            11,
            vec![
                (Fault::RateLimited { retry_after_s: 0 }, 0.1),
                (Fault::Internal, 0.1),
                (
                    Fault::Unavailable {
                        retry_after_s: None,
                    },
                    0.05,
                ),
                (Fault::Stall(Duration::from_secs(3)), 0.05),
                (Fault::MalformedJson, 0.05),
                (Fault::DropConnection, 0.05),
            ],
        );
        let server = MockServer::start(plan).unwrap();
        let input = problems(dir.path(), 12, |_| "1".into());
        let output = dir.path().join("traces.jsonl");
        generate(
            &server,
            &input,
            &output,
            &[
                "--samples",
                "3",
                "--concurrency",
                "8",
                "--max-retries",
                "12",
            ],
        )
        .assert()
        .success();
        let keys = pairs(&output);
        let mut want: Vec<(String, u64)> = (0..12)
            .flat_map(|i| (0..3).map(move |s| (format!("p{i}"), s)))
            .collect();
        want.sort();
        assert_eq!(keys, want);
        assert!(
            server.requests_served() > 36,
            "faults were injected and retried"
        );
    }

    #[test]
    fn rejection_sampling_stops_at_the_first_correct_sample() {
        let dir = tempfile::tempdir().unwrap();
        let server = MockServer::start(FaultPlan::none()).unwrap();
        // The mock answers from (prompt, seed + sample): make sample 2 the first correct one.
        let input = problems(dir.path(), 4, |prompt| {
            mock_answer(prompt, Some(3 + 2)).to_string()
        });
        let output = dir.path().join("traces.jsonl");
        generate(
            &server,
            &input,
            &output,
            &["--until-correct", "1", "--max-samples", "5"],
        )
        .assert()
        .success();
        let traces = read_jsonl(&output);
        for i in 0..4 {
            let prompt = format!("Q: problem number {i}?\nA:");
            let gold = mock_answer(&prompt, Some(5));
            let first = (0..=2)
                .find(|s| mock_answer(&prompt, Some(3 + s)) == gold)
                .unwrap();
            let mine: Vec<&Value> = traces
                .iter()
                .filter(|t| t["id"] == json!(format!("p{i}")))
                .collect();
            assert_eq!(
                mine.len() as u64,
                first + 1,
                "p{i}: samples up to the first correct one"
            );
            assert_eq!(
                mine.iter()
                    .filter(|t| t["verdict"]["correct"] == json!(true))
                    .count(),
                1
            );
        }
    }

    #[test]
    fn score_through_a_server_keeps_the_completion_log_probs() {
        let dir = tempfile::tempdir().unwrap();
        let server = MockServer::start(FaultPlan::schedule(vec![Some(Fault::Internal)])).unwrap();
        let input = dir.path().join("pairs.jsonl");
        write_jsonl(
            &input,
            &[
                json!({"id": "a", "prompt": "Q: 2 + 2?\nA:", "completion": " 2 + 2 = 4. The answer is 4."}),
            ],
        );
        let output = dir.path().join("scores.jsonl");
        retort()
            .args([
                "score",
                "--model",
                &server.spec("teacher"),
                "--top-k",
                "2",
                "--input",
            ])
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .assert()
            .success();
        let out = read_jsonl(&output);
        let logprobs: Vec<f64> = out[0]["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let want: Vec<f64> = retort::mock_server::mock_tokenize(" 2 + 2 = 4. The answer is 4.")
            .iter()
            .map(|(token, _)| retort::mock_server::mock_logprob(token))
            .collect();
        assert_eq!(logprobs.len(), want.len());
        for (a, b) in logprobs.iter().zip(&want) {
            assert!((a - b).abs() < 1e-9, "{logprobs:?} vs {want:?}");
        }
        assert_eq!(out[0]["top_logprobs"].as_array().unwrap().len(), want.len());
        assert!(
            server.requests_served() >= 2,
            "the first attempt's 500 was retried"
        );
    }

    /// `retort generate` with the default retry and breaker settings.
    fn generate_with_defaults(spec: &str, input: &Path, output: &Path) -> Command {
        let mut cmd = retort();
        cmd.args(["generate", "--model", spec, "--samples", "2"])
            .arg("--input")
            .arg(input)
            .arg("--output")
            .arg(output);
        cmd
    }

    // See: #14 (a dead server kept `generate` retrying for more than ten minutes).
    #[test]
    fn a_dead_server_ends_the_run_within_a_minute_naming_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let input = problems(dir.path(), 200, |_| "1".into());
        let output = dir.path().join("traces.jsonl");
        // Connection refused: a port bound, then released.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/v1");
        let start = Instant::now();
        let assert = generate_with_defaults(&format!("openai:{url}#teacher"), &input, &output)
            .assert()
            .failure();
        let refused = start.elapsed();
        let stderr = String::from_utf8_lossy(&assert.get_output().stderr).to_string();
        assert!(refused < Duration::from_secs(60), "{refused:?}");
        assert!(stderr.contains(&url), "{stderr}");
        assert!(stderr.contains("not answering"), "{stderr}");
        // HTTP 500 to everything, `/models` included.
        let server = MockServer::start(FaultPlan::always(Fault::Internal)).unwrap();
        let start = Instant::now();
        let assert = generate_with_defaults(&server.spec("teacher"), &input, &output)
            .assert()
            .failure();
        let all_500 = start.elapsed();
        let stderr = String::from_utf8_lossy(&assert.get_output().stderr).to_string();
        assert!(all_500 < Duration::from_secs(60), "{all_500:?}");
        assert!(stderr.contains(server.url()), "{stderr}");
        assert!(stderr.contains("HTTP 500"), "{stderr}");
        eprintln!("connection refused: {refused:?}; all 500: {all_500:?}");
    }

    // See: #14: a server that dies mid-run stops the run; the journal keeps what succeeded and a
    // rerun finishes the rest, every pair once.
    #[test]
    fn a_server_dying_mid_run_trips_the_breaker_then_the_rerun_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let input = problems(dir.path(), 20, |_| "1".into());
        let output = dir.path().join("traces.jsonl");
        // The preflight and 5 generations succeed, then every generation fails.
        let mut plan = FaultPlan::schedule(vec![None; 6]);
        plan.random = vec![(Fault::Internal, 1.0)];
        plan.healthy_models = true;
        let dying = MockServer::start(plan).unwrap();
        let start = Instant::now();
        let assert = generate(
            &dying,
            &input,
            &output,
            &[
                "--concurrency",
                "1",
                "--max-retries",
                "1000",
                "--dead-after",
                "1",
            ],
        )
        .assert()
        .failure();
        let stderr = String::from_utf8_lossy(&assert.get_output().stderr).to_string();
        assert!(start.elapsed() < Duration::from_secs(30));
        assert!(stderr.contains("looks down"), "{stderr}");
        assert!(stderr.contains(dying.url()), "{stderr}");
        assert_eq!(read_jsonl(&output).len(), 5, "what succeeded is kept");
        let healthy = MockServer::start(FaultPlan::none()).unwrap();
        generate(&healthy, &input, &output, &[]).assert().success();
        let mut want: Vec<(String, u64)> = (0..20).map(|i| (format!("p{i}"), 0)).collect();
        want.sort();
        assert_eq!(pairs(&output), want);
    }

    // See: #14: `--reasoning` and `--chat-template-kwargs` from the command line.
    #[test]
    fn reasoning_is_joined_by_default_and_template_kwargs_reach_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let rows: Vec<Value> = (0..3)
            .map(|i| json!({"id": format!("c{i}"), "messages": [{"role": "user", "content": format!("Q{i}?")}]}))
            .collect();
        let input = dir.path().join("chat.jsonl");
        write_jsonl(&input, &rows);
        let mut plan = FaultPlan::none();
        plan.record_bodies = true;
        let server = MockServer::start(plan).unwrap();
        let output = dir.path().join("traces.jsonl");
        generate(
            &server,
            &input,
            &output,
            &[
                "--chat-template-kwargs",
                r#"{"enable_thinking": true}"#,
                "--extra-body",
                r#"{"min_p": 0.05}"#,
            ],
        )
        .assert()
        .success();
        for trace in read_jsonl(&output) {
            let response = trace["response"].as_str().unwrap();
            assert!(
                response
                    .starts_with("<think>\nLet me think step by step.\n</think>\n\nThe answer is"),
                "{response:?}"
            );
        }
        let bodies: Vec<Value> = server
            .requests()
            .into_iter()
            .filter_map(|r| r.body)
            .collect();
        assert_eq!(bodies.len(), 3);
        for body in &bodies {
            assert_eq!(
                body["chat_template_kwargs"],
                json!({"enable_thinking": true})
            );
            assert_eq!(body["min_p"], json!(0.05));
        }
        let tagged = dir.path().join("tagged.jsonl");
        generate(
            &server,
            &input,
            &tagged,
            &[
                "--reasoning",
                "separate",
                "--think-tags",
                "<seed:think>",
                "</seed:think>",
            ],
        )
        .assert()
        .success();
        for trace in read_jsonl(&tagged) {
            assert!(
                trace["response"]
                    .as_str()
                    .unwrap()
                    .starts_with("The answer is")
            );
            assert_eq!(trace["reasoning"], json!("Let me think step by step."));
        }
    }

    #[test]
    fn kill_9_mid_run_then_rerun_gives_every_pair_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut plan = FaultPlan::none();
        plan.latency = Duration::from_millis(40);
        let server = MockServer::start(plan).unwrap();
        let input = problems(dir.path(), 30, |_| "1".into());
        let output = dir.path().join("traces.jsonl");
        let mut child = generate(
            &server,
            &input,
            &output,
            &["--samples", "2", "--concurrency", "2"],
        )
        .spawn()
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let lines = fs_err::read_to_string(&output)
                .map(|t| t.lines().count())
                .unwrap_or(0);
            if lines >= 8 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let partial = fs_err::read_to_string(&output).unwrap().lines().count();
        assert!(
            (8..60).contains(&partial),
            "killed mid-run after {partial} traces"
        );
        generate(
            &server,
            &input,
            &output,
            &["--samples", "2", "--concurrency", "2"],
        )
        .assert()
        .success();
        let keys = pairs(&output);
        let mut want: Vec<(String, u64)> = (0..30)
            .flat_map(|i| (0..2).map(move |s| (format!("p{i}"), s)))
            .collect();
        want.sort();
        assert_eq!(keys, want, "complete, no duplicates");
    }
}

#[test]
fn check_accepts_the_fixture_pair_and_rejects_a_mismatched_one() {
    let output = retort()
        .args(["check", "--json", "--teacher"])
        .arg(fixtures().join("llama-tiny"))
        .arg("--student")
        .arg(fixtures().join("qwen2-tiny"))
        .assert()
        .success();
    let report: Value = serde_json::from_slice(&output.get_output().stdout).unwrap();
    let statuses: Vec<&str> = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses.len(), 5);
    assert!(statuses.iter().all(|s| *s == "ok"), "{report}");

    // A student whose tokenizer swaps two vocabulary entries and whose EOS differs.
    let dir = tempfile::tempdir().unwrap();
    let student = dir.path().join("student");
    fs_err::create_dir_all(&student).unwrap();
    for file in ["config.json", "model.safetensors", "tokenizer_config.json"] {
        fs_err::copy(fixtures().join("qwen2-tiny").join(file), student.join(file)).unwrap();
    }
    let mut tokenizer: Value = serde_json::from_str(
        &fs_err::read_to_string(fixtures().join("qwen2-tiny/tokenizer.json")).unwrap(),
    )
    .unwrap();
    let vocab = tokenizer["model"]["vocab"].as_object_mut().unwrap();
    let (a, b) = (vocab["0"].clone(), vocab["1"].clone());
    vocab.insert("0".into(), b);
    vocab.insert("1".into(), a);
    fs_err::write(student.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    fs_err::write(
        student.join("generation_config.json"),
        r#"{"eos_token_id": 509}"#,
    )
    .unwrap();
    let output = retort()
        .args(["check", "--json", "--teacher"])
        .arg(fixtures().join("llama-tiny"))
        .arg("--student")
        .arg(&student)
        .assert()
        .failure();
    let report: Value = serde_json::from_slice(&output.get_output().stdout).unwrap();
    let status = |name: &str| {
        report["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["check"] == name)
            .unwrap()["status"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(status("vocabulary"), "error", "{report}");
    assert_eq!(status("tokenization"), "error", "{report}");
    assert_eq!(status("eos ids"), "error", "{report}");
}

#[test]
fn local_kill_9_then_rerun_and_shards_cover_everything_once() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("p.jsonl");
    let rows: Vec<Value> = (0..60)
        .map(|i| json!({"id": format!("q{i}"), "prompt": format!("Q: {i} + {i} =")}))
        .collect();
    write_jsonl(&input, &rows);
    let command = |out: &Path, extra: &[&str]| {
        let mut cmd = retort();
        cmd.args([
            "generate",
            "--samples",
            "2",
            "--temperature",
            "0.8",
            "--max-new-tokens",
            "24",
            "--batch-size",
            "1",
            "--seed",
            "5",
        ])
        .args(extra)
        .arg("--model")
        .arg(fixtures().join("qwen3-tiny"))
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(out);
        cmd
    };
    let output = dir.path().join("traces.jsonl");
    let mut child = command(&output, &[]).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if fs_err::read_to_string(&output)
            .map(|t| t.lines().count())
            .unwrap_or(0)
            >= 5
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let partial = fs_err::read_to_string(&output).unwrap().lines().count();
    assert!(partial < 120, "killed before the end ({partial} traces)");
    command(&output, &[]).assert().success();
    let key = |v: &Value| {
        (
            v["id"].as_str().unwrap().to_string(),
            v["sample"].as_u64().unwrap(),
        )
    };
    let mut resumed: Vec<(String, u64)> = read_jsonl(&output).iter().map(key).collect();
    resumed.sort();
    let mut want: Vec<(String, u64)> = (0..60)
        .flat_map(|i| (0..2).map(move |s| (format!("q{i}"), s)))
        .collect();
    want.sort();
    assert_eq!(resumed, want, "complete, no duplicates after kill -9");

    // Two shards together hold every pair once, with the same traces as the single run.
    let (a, b) = (dir.path().join("s0.jsonl"), dir.path().join("s1.jsonl"));
    command(&a, &["--shard", "0/2"]).assert().success();
    command(&b, &["--shard", "1/2"]).assert().success();
    let mut sharded: Vec<Value> = read_jsonl(&a).into_iter().chain(read_jsonl(&b)).collect();
    let mut single = read_jsonl(&output);
    sharded.sort_by_key(key);
    single.sort_by_key(key);
    assert_eq!(sharded.len(), 120);
    let ids = |t: &[Value]| {
        t.iter()
            .map(|v| v["response_ids"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&sharded), ids(&single));
    command(&a, &["--shard", "2/2"]).assert().failure();
}

#[test]
fn reduced_demo_runs_end_to_end_and_writes_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    retort()
        .args(["demo", "--quick", "--seed", "0", "--out"])
        .arg(&out)
        .assert()
        .success();
    let summary: Value =
        serde_json::from_str(&fs_err::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    for key in [
        "teacher_accuracy",
        "base_accuracy",
        "distilled_accuracy",
        "wall_seconds",
    ] {
        let value = summary[key].as_f64().unwrap_or(f64::NAN);
        assert!(value.is_finite() && value >= 0.0, "{key}: {summary}");
    }
    for model in ["base", "distilled"] {
        let shares = summary["provenance"][model].as_object().unwrap();
        for category in ["teacher", "student", "shared", "boosted", "unattributed"] {
            assert!(
                shares.contains_key(category),
                "{model} {category}: {summary}"
            );
        }
        let total: f64 = shares.values().map(|v| v.as_f64().unwrap()).sum();
        assert!((total - 1.0).abs() < 1e-9, "{model} shares sum to {total}");
    }
    let stages = summary["stage_seconds"].as_object().unwrap();
    for stage in [
        "generate",
        "select",
        "distill-sft",
        "distill-on-policy",
        "eval",
        "trace",
        "report",
    ] {
        assert!(stages.contains_key(stage), "{stage}: {summary}");
    }
    for file in [
        "problems.jsonl",
        "traces.jsonl",
        "traces.jsonl.manifest.json",
        "selected.jsonl",
        "student-sft/model.safetensors",
        "student-distilled/model.safetensors",
        "student-distilled/metrics.jsonl",
        "eval_teacher.json",
        "provenance_distilled.jsonl",
        "report.html",
    ] {
        assert!(out.join(file).exists(), "{file} missing");
    }
    let traces = read_jsonl(&out.join("traces.jsonl"));
    assert!(
        traces.iter().all(|t| t.get("verdict").is_some()),
        "traces are verified inline"
    );
    let html = fs_err::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("<svg") && !html.contains("https://"));

    // The same seed gives the same run.
    let again = dir.path().join("again");
    retort()
        .args(["demo", "--quick", "--seed", "0", "--out"])
        .arg(&again)
        .assert()
        .success();
    let a: Value =
        serde_json::from_str(&fs_err::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let b: Value =
        serde_json::from_str(&fs_err::read_to_string(again.join("summary.json")).unwrap()).unwrap();
    for key in [
        "teacher_accuracy",
        "base_accuracy",
        "distilled_accuracy",
        "provenance",
        "traces",
        "training",
    ] {
        if key == "training" {
            assert_eq!(
                a[key]["sft"]["final_loss"], b[key]["sft"]["final_loss"],
                "deterministic training"
            );
        } else {
            assert_eq!(
                a[key], b[key],
                "{key} differs between two runs with one seed"
            );
        }
    }
}

/// `retort distill` killed with SIGKILL after its first checkpoint and rerun with `--resume`
/// ends with the same weights, byte for byte, as an uninterrupted run.
#[test]
fn distill_kill_9_then_resume_equals_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.jsonl");
    let rows: Vec<Value> = (0..8)
        .map(|i| {
            json!({
                "id": format!("r{i}"),
                "prompt": format!("Q: {i} + {} = ?\nA:", i + 3),
                "response": format!(" {i} plus {} is {}. The answer is {}.", i + 3, 2 * i + 3, 2 * i + 3),
                "finish_reason": "stop",
            })
        })
        .collect();
    write_jsonl(&data, &rows);
    let command = |out: &Path, extra: &[&str]| {
        let mut cmd = retort();
        cmd.args([
            "distill",
            "--objective",
            "sft",
            "--max-steps",
            "150",
            "--batch-size",
            "4",
            "--lr",
            "1e-3",
            "--seed",
            "3",
            "--checkpoint-every",
            "10",
        ])
        .args(extra)
        .arg("--student")
        .arg(fixtures().join("qwen2-tiny"))
        .arg("--data")
        .arg(&data)
        .arg("--output")
        .arg(out);
        cmd
    };
    let straight = dir.path().join("straight");
    command(&straight, &[]).assert().success();

    let killed = dir.path().join("killed");
    let mut child = command(&killed, &[]).spawn().unwrap();
    let first = killed.join("checkpoint-10").join("trainer_state.json");
    let steps_done = || {
        fs_err::read_to_string(killed.join("metrics.jsonl"))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    // Kill between checkpoints (after step 15), so the resumed run redoes lost steps.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !(first.is_file() && steps_done() >= 15) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(first.is_file(), "no checkpoint before the deadline");
    eprintln!("killed after {} of 150 steps", steps_done());
    assert!(
        !killed.join("trainer_state.json").exists(),
        "the run finished before the kill"
    );
    // Without --resume the folder is refused; with it the run finishes.
    command(&killed, &[]).assert().failure();
    command(&killed, &["--resume"]).assert().success();
    let a = fs_err::read(straight.join("model.safetensors")).unwrap();
    let b = fs_err::read(killed.join("model.safetensors")).unwrap();
    assert!(
        a == b,
        "weights after kill -9 and --resume differ from the uninterrupted run"
    );
    let steps: Vec<u64> = read_jsonl(&killed.join("metrics.jsonl"))
        .iter()
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=150).collect::<Vec<_>>());
}

#[test]
fn bench_compare_prints_ratios_and_refuses_a_bad_reference_up_front() {
    let dir = tempfile::tempdir().unwrap();
    // A reference that is not JSON fails before any figure runs, naming the file.
    let bad = dir.path().join("torch.json");
    fs_err::write(&bad, "not json\n").unwrap();
    let assert = retort()
        .args(["bench", "--only", "verify", "--seconds", "0.1", "--compare"])
        .arg(&bad)
        .assert()
        .failure();
    let stderr = String::from_utf8_lossy(&assert.get_output().stderr).to_string();
    assert!(stderr.contains("torch.json"), "{stderr}");
    // A reference with the figure: the JSON gains its ratio.
    let reference = dir.path().join("ref.json");
    fs_err::write(
        &reference,
        json!({"results": {"verify": {"pairs_per_s": 1.0},
                           "bench-tiny": {"score": {"tokens_per_s": 1.0}}}})
        .to_string(),
    )
    .unwrap();
    let assert = retort()
        .args([
            "bench",
            "--only",
            "score",
            "--config",
            "bench-tiny",
            "--seconds",
            "0.1",
        ])
        .arg("--compare")
        .arg(&reference)
        .assert()
        .success();
    let report: Value = serde_json::from_slice(&assert.get_output().stdout).unwrap();
    let rows = report["compare"].as_array().expect("compare rows");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["figure"], "bench-tiny/score");
    let ours = report["results"]["bench-tiny"]["score"]["tokens_per_s"]
        .as_f64()
        .unwrap();
    assert!((rows[0]["ratio"].as_f64().unwrap() - ours).abs() < 1e-9 * ours);
}

/// `check`, `select --strategy teacher-guided` and `trace` with the teacher behind a server (the
/// mock in model mode, serving the fixture) give what they give with the local teacher.
#[test]
fn served_teacher_commands_match_local_ones() {
    use retort::backend::local::LocalBackend;
    use retort::mock_scoring::MockModel;
    use retort::mock_server::{FaultPlan, MockServer};

    let teacher_dir = fixtures().join("llama-tiny");
    let student_dir = fixtures().join("qwen2-tiny");
    let local = LocalBackend::load(&teacher_dir, 4).unwrap();
    let server =
        MockServer::start_with_model(FaultPlan::none(), MockModel::new(local.model().clone()))
            .unwrap();
    let served = format!("openai:{}#{}", server.url(), teacher_dir.display());
    let teacher_local = teacher_dir.display().to_string();

    let check = |teacher: &str| -> Value {
        let output = retort()
            .args(["check", "--json", "--teacher", teacher, "--student"])
            .arg(&student_dir)
            .assert()
            .success();
        serde_json::from_slice(&output.get_output().stdout).unwrap()
    };
    assert_eq!(check(&teacher_local), check(&served));

    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("traces.jsonl");
    let rows: Vec<Value> = (0..6)
        .map(|i| {
            json!({"id": format!("r{i}"), "prompt": format!("Q: {i} + {i} = ?\nA:"),
                "response": format!(" {i} plus {i} is {}. The answer is {}.", 2 * i, 2 * i)})
        })
        .collect();
    write_jsonl(&input, &rows);
    let select = |teacher: &str, out: &str| -> Vec<Value> {
        let output = dir.path().join(out);
        retort()
            .args([
                "select",
                "--strategy",
                "teacher-guided",
                "--teacher",
                teacher,
            ])
            .arg("--student")
            .arg(&student_dir)
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .assert()
            .success();
        read_jsonl(&output)
            .iter()
            .map(|r| r["id"].clone())
            .collect()
    };
    assert_eq!(
        select(&teacher_local, "local.jsonl"),
        select(&served, "served.jsonl")
    );

    let trace = |teacher: &str, out: &str| -> Vec<Value> {
        let output = dir.path().join(out);
        retort()
            .args(["trace", "--likely", "-7", "--teacher", teacher])
            .arg("--base")
            .arg(&student_dir)
            .arg("--distilled")
            .arg(fixtures().join("qwen3-tiny"))
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .assert()
            .success();
        read_jsonl(&output)
            .iter()
            .flat_map(|r| r["actions"].as_array().cloned().unwrap_or_default())
            .map(|a| a["category"].clone())
            .collect()
    };
    assert_eq!(
        trace(&teacher_local, "trace-local.jsonl"),
        trace(&served, "trace-served.jsonl")
    );
}
