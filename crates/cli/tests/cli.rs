//! End-to-end tests of the `retort` binary on the fixture models and real files (one test binary).

use std::path::{Path, PathBuf};
use std::process::Command;

use assert_cmd::prelude::*;
use serde_json::{json, Value};

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
    fs_err::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

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
            let want: Vec<f64> = s["logprobs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            for record in &out[2 * i..2 * i + 2] {
                let got: Vec<f64> = record["token_logprobs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
                assert_eq!(got.len(), want.len(), "{model} {}", record["id"]);
                for (a, b) in got.iter().zip(&want) {
                    max_abs_diff = max_abs_diff.max((a - b).abs());
                }
                assert_eq!(record["num_tokens"], json!(want.len()));
            }
            assert_eq!(out[2 * i + 1]["keep"], json!(1), "unknown fields are carried through");
        }
        println!("{model}: score max_abs_diff {max_abs_diff:.2e}");
        assert!(max_abs_diff < 1e-4, "{model}: {max_abs_diff}");
        assert!(output.with_file_name(format!("{model}-out.jsonl.manifest.json")).exists());
    }
}

#[test]
fn greedy_generate_matches_pytorch_goldens() {
    let dir = tempfile::tempdir().unwrap();
    for model in MODELS {
        let g = golden(model);
        let gens = g["generation"].as_array().unwrap();
        let rows: Vec<Value> =
            gens.iter().map(|s| json!({"id": s["name"], "prompt_ids": s["prompt_ids"]})).collect();
        let input = dir.path().join(format!("{model}-gen.jsonl"));
        let output = dir.path().join(format!("{model}-traces.jsonl"));
        write_jsonl(&input, &rows);
        retort()
            .args(["generate", "--temperature", "0", "--max-new-tokens", "24", "--model"])
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
            let trace = out.iter().find(|t| t["id"] == s["name"]).expect("every prompt has a trace");
            assert_eq!(trace["response_ids"], s["new_token_ids"], "{model} {}", s["name"]);
            assert_eq!(trace["response"], s["text_skip_special"], "{model} {}", s["name"]);
            let want = if s["stopped_on_eos"].as_bool().unwrap() { "stop" } else { "length" };
            assert_eq!(trace["finish_reason"], json!(want));
            assert_eq!(trace["sample"], json!(0));
        }
    }
}

#[test]
fn seeded_sampling_is_reproducible_and_resumes_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("p.jsonl");
    let rows: Vec<Value> = (0..3).map(|i| json!({"prompt": format!("Q: {i} + 2 =")})).collect();
    write_jsonl(&input, &rows);
    let run = |out: &Path, extra: &[&str]| {
        retort()
            .args(["generate", "--samples", "2", "--temperature", "1.0", "--top-p", "0.9", "--max-new-tokens", "8", "--seed", "7"])
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
    let key = |v: &Value| (v["id"].as_str().unwrap().to_string(), v["sample"].as_u64().unwrap());
    let mut ta = read_jsonl(&a);
    let mut tb = read_jsonl(&b);
    ta.sort_by_key(key);
    tb.sort_by_key(key);
    assert_eq!(ta.len(), 6);
    let ids = |t: &[Value]| t.iter().map(|v| v["response_ids"].clone()).collect::<Vec<_>>();
    assert_eq!(ids(&ta), ids(&tb), "a trace does not depend on batching");
    assert_ne!(ta[0]["response_ids"], ta[1]["response_ids"], "samples differ");

    // Simulate a kill: keep two complete lines and a torn third, then rerun.
    let text = fs_err::read_to_string(&a).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    fs_err::write(&a, format!("{}\n{}\n{}", lines[0], lines[1], &lines[2][..lines[2].len() / 2])).unwrap();
    run(&a, &[]);
    let mut again = read_jsonl(&a);
    again.sort_by_key(key);
    assert_eq!(ids(&again), ids(&ta), "resumed output equals an uninterrupted run, each pair once");
}

#[test]
fn bad_input_names_file_and_line_and_leaves_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("broken.jsonl");
    fs_err::write(&input, "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\", \n").unwrap();
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
    assert!(stderr.contains("broken.jsonl:1") && stderr.contains("`completion`"), "{stderr}");
    assert!(!output.exists());

    let model_dir = dir.path().join("model");
    fs_err::create_dir_all(&model_dir).unwrap();
    for file in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        fs_err::copy(fixtures().join("qwen2-tiny").join(file), model_dir.join(file)).unwrap();
    }
    fs_err::write(model_dir.join("model.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":").unwrap();
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

    let mut config: Value = serde_json::from_str(&fs_err::read_to_string(model_dir.join("config.json")).unwrap()).unwrap();
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
    assert!(stderr.contains("GPT2LMHeadModel") && stderr.contains("Qwen2ForCausalLM"), "{stderr}");
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
    retort().args(["verify", "--input"]).arg(&input).arg("--output").arg(&output).assert().success();
    let out = read_jsonl(&output);
    let verdicts: Vec<bool> = out.iter().map(|r| r["verdict"]["correct"].as_bool().unwrap()).collect();
    assert_eq!(verdicts, [true, true, false]);
    assert_eq!(out[0]["extra"], json!([1]));
    assert_eq!(out[2]["verdict"]["extracted"], Value::Null);

    fs_err::write(&input, "{\"answer\": \"1\", \"response\": \"1\"}\n{\"answer\": \"1\"}\n").unwrap();
    let bad = dir.path().join("bad.jsonl");
    let assert = retort().args(["verify", "--input"]).arg(&input).arg("--output").arg(&bad).assert().failure();
    let stderr = String::from_utf8_lossy(&assert.get_output().stderr).to_string();
    assert!(stderr.contains("traces.jsonl:2") && stderr.contains("`response`"), "{stderr}");
    assert!(!bad.exists());
}
