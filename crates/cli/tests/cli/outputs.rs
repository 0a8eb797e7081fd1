//! Outputs a user can trust (issue 20), on the bundled world models: a rerun resumes, extends or
//! is refused with its output untouched; `--overwrite`; model folders are never outputs; secrets
//! are hidden and every other setting kept; one error for a model-wide problem; degenerate input
//! refused; Ctrl-C stops with a manifest, exit 130 and an exact resume.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::prelude::*;
use serde_json::{Value, json};

use super::{read_jsonl, retort, write_jsonl};

fn world(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../assets/world")
        .join(name)
}

fn problems(dir: &Path, n: usize) -> PathBuf {
    let path = dir.join("problems.jsonl");
    let rows: Vec<Value> = (0..n)
        .map(|i| {
            json!({"id": format!("p{i}"), "prompt": format!("Q: Ann has {} apples. She buys {} more apples. How many apples does Ann have now?\nA:", i + 2, i % 7 + 1), "answer": format!("{}", i + 2 + i % 7 + 1)})
        })
        .collect();
    write_jsonl(&path, &rows);
    path
}

fn generate(input: &Path, output: &Path, extra: &[&str]) -> Command {
    let mut cmd = retort();
    cmd.args(["generate", "--model"])
        .arg(world("teacher"))
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output)
        .args(["--max-new-tokens", "48", "--seed", "3"])
        .args(extra);
    cmd
}

fn manifest(output: &Path) -> Value {
    let mut name = output.file_name().unwrap().to_os_string();
    name.push(".manifest.json");
    serde_json::from_str(&fs_err::read_to_string(output.with_file_name(name)).unwrap()).unwrap()
}

fn manifest_bytes(output: &Path) -> Vec<u8> {
    let mut name = output.file_name().unwrap().to_os_string();
    name.push(".manifest.json");
    fs_err::read(output.with_file_name(name)).unwrap()
}

fn keys(rows: &[Value]) -> Vec<(String, u64)> {
    let mut keys: Vec<(String, u64)> = rows
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().to_string(),
                r["sample"].as_u64().unwrap(),
            )
        })
        .collect();
    keys.sort();
    keys
}

fn stderr_of(assert: &assert_cmd::assert::Assert) -> String {
    String::from_utf8_lossy(&assert.get_output().stderr).to_string()
}

// See: #20
#[test]
fn reruns_resume_extend_or_refuse_and_overwrite_starts_again() {
    let dir = tempfile::tempdir().unwrap();
    let input = problems(dir.path(), 6);
    let output = dir.path().join("traces.jsonl");
    generate(&input, &output, &["--api-key", "sk-secret-123"])
        .assert()
        .success();
    let first = manifest(&output);
    assert_eq!(first["status"], "complete");
    let command: Vec<&str> = first["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let at = command
        .iter()
        .position(|a| *a == "--max-new-tokens")
        .unwrap();
    assert_eq!(command[at + 1], "48", "numbers are kept verbatim");
    assert!(!command.contains(&"sk-secret-123"), "{command:?}");
    assert_eq!(read_jsonl(&output).len(), 6);

    // Another temperature: refused, output and manifest byte-identical.
    let (traces, manifest_before) = (fs_err::read(&output).unwrap(), manifest_bytes(&output));
    let assert = generate(&input, &output, &["--temperature", "0.5"])
        .assert()
        .failure();
    let stderr = stderr_of(&assert);
    assert!(stderr.contains("temperature: 1.0 → 0.5"), "{stderr}");
    assert!(stderr.contains("--overwrite"), "{stderr}");
    assert_eq!(fs_err::read(&output).unwrap(), traces);
    assert_eq!(manifest_bytes(&output), manifest_before);
    // Another model: refused the same way.
    let mut other_model = retort();
    other_model
        .args(["generate", "--model"])
        .arg(world("student"))
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .args(["--max-new-tokens", "48", "--seed", "3"]);
    let stderr = stderr_of(&other_model.assert().failure());
    assert!(stderr.contains("model:"), "{stderr}");
    assert_eq!(fs_err::read(&output).unwrap(), traces);

    // The same command resumes (nothing new); more samples extend with no duplicates.
    generate(&input, &output, &[]).assert().success();
    assert_eq!(fs_err::read(&output).unwrap(), traces);
    generate(&input, &output, &["--samples", "2", "--concurrency", "3"])
        .assert()
        .success();
    let rows = read_jsonl(&output);
    let mut unique = keys(&rows);
    unique.dedup();
    assert_eq!(rows.len(), 12);
    assert_eq!(unique.len(), 12, "no duplicates");

    // `--overwrite` starts again with the new settings.
    generate(&input, &output, &["--temperature", "0.5", "--overwrite"])
        .assert()
        .success();
    assert_eq!(read_jsonl(&output).len(), 6);
    assert_eq!(manifest(&output)["identity"]["temperature"], json!(0.5));

    // An output with no manifest of ours is refused unless `--overwrite`.
    let theirs = dir.path().join("theirs.jsonl");
    fs_err::write(&theirs, "precious\n").unwrap();
    let stderr = stderr_of(&generate(&input, &theirs, &[]).assert().failure());
    assert!(stderr.contains("--overwrite"), "{stderr}");
    assert_eq!(fs_err::read_to_string(&theirs).unwrap(), "precious\n");
}

// See: #20
#[test]
fn distill_never_writes_into_a_model_folder_and_needs_resume_for_its_own_run() {
    let dir = tempfile::tempdir().unwrap();
    let student = dir.path().join("stu");
    fs_err::create_dir_all(&student).unwrap();
    for entry in fs_err::read_dir(world("student")).unwrap() {
        let entry = entry.unwrap();
        fs_err::copy(entry.path(), student.join(entry.file_name())).unwrap();
    }
    let data = dir.path().join("train.jsonl");
    write_jsonl(
        &data,
        &[
            json!({"prompt": "Q: 2 + 3 = ?\nA:", "response": " 2 + 3 = 5. The answer is 5."}),
            json!({"prompt": "Q: 4 + 1 = ?\nA:", "response": " 4 + 1 = 5. The answer is 5."}),
        ],
    );
    let weights = fs_err::read(student.join("model.safetensors")).unwrap();
    let distill = |output: &Path, extra: &[&str]| {
        let mut cmd = retort();
        cmd.args(["distill", "--max-steps", "2", "--batch-size", "2"])
            .arg("--student")
            .arg(&student)
            .arg("--data")
            .arg(&data)
            .arg("--output")
            .arg(output)
            .args(extra);
        cmd
    };
    for output in [student.clone(), student.join("run")] {
        let stderr = stderr_of(&distill(&output, &["--overwrite"]).assert().failure());
        assert!(stderr.contains("would destroy"), "{stderr}");
    }
    assert_eq!(
        fs_err::read(student.join("model.safetensors")).unwrap(),
        weights
    );

    let output = dir.path().join("out");
    distill(&output, &[]).assert().success();
    let trained = fs_err::read(output.join("model.safetensors")).unwrap();
    let stderr = stderr_of(&distill(&output, &[]).assert().failure());
    assert!(stderr.contains("--resume"), "{stderr}");
    distill(&output, &["--resume"]).assert().success();
    assert_eq!(
        fs_err::read(output.join("model.safetensors")).unwrap(),
        trained,
        "a complete run is not trained again"
    );
    let stderr = stderr_of(&distill(&output, &["--lr", "0.5"]).assert().failure());
    assert!(stderr.contains("lr:"), "{stderr}");
    distill(&output, &["--lr", "0.5", "--overwrite"])
        .assert()
        .success();
}

// See: #20
#[test]
fn a_model_wide_problem_is_one_error_and_degenerate_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let chats = dir.path().join("chats.jsonl");
    let rows: Vec<Value> = (0..20)
        .map(|i| json!({"id": i, "messages": [{"role": "user", "content": format!("What is {i} + 1?")}]}))
        .collect();
    write_jsonl(&chats, &rows);
    // The world teacher without its chat template.
    let bare_model = dir.path().join("no-template");
    fs_err::create_dir_all(&bare_model).unwrap();
    for entry in fs_err::read_dir(world("teacher")).unwrap() {
        let entry = entry.unwrap();
        fs_err::copy(entry.path(), bare_model.join(entry.file_name())).unwrap();
    }
    let config_path = bare_model.join("tokenizer_config.json");
    let mut config: Value =
        serde_json::from_str(&fs_err::read_to_string(&config_path).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("chat_template");
    fs_err::write(&config_path, config.to_string()).unwrap();
    let output = dir.path().join("chat-traces.jsonl");
    let mut chat = retort();
    chat.args(["generate", "--model"])
        .arg(&bare_model)
        .arg("--input")
        .arg(&chats)
        .arg("--output")
        .arg(&output);
    let stderr = stderr_of(&chat.assert().failure());
    assert_eq!(stderr.matches("no chat template").count(), 1, "{stderr}");
    assert!(!stderr.contains("rerun the same command"), "{stderr}");

    let input = problems(dir.path(), 2);
    let empty = dir.path().join("empty.jsonl");
    fs_err::write(&empty, "").unwrap();
    let out = dir.path().join("o.jsonl");
    for (input, extra, expected) in [
        (&empty, vec![], "no records"),
        (&input, vec!["--max-new-tokens", "0"], "max-new-tokens"),
        (&input, vec!["--samples", "0"], "samples"),
        (&input, vec!["--temperature=-1"], "temperature"),
        (&input, vec!["--top-p", "0"], "top-p"),
        (&input, vec!["--top-p", "1.5"], "top-p"),
    ] {
        let stderr = stderr_of(&generate(input, &out, &extra).assert().failure());
        assert!(stderr.contains(expected), "{extra:?}: {stderr}");
        assert!(!out.exists(), "{extra:?} left an output");
    }

    let no_gold = dir.path().join("no-gold.jsonl");
    write_jsonl(&no_gold, &[json!({"prompt": "Q: 1 + 1 = ?\nA:"})]);
    let mut eval = retort();
    eval.args(["eval", "--model"])
        .arg(world("teacher"))
        .arg("--input")
        .arg(&no_gold);
    let stderr = stderr_of(&eval.assert().failure());
    assert!(stderr.contains("gold answer"), "{stderr}");

    let unverified = dir.path().join("traces.jsonl");
    write_jsonl(&unverified, &[json!({"response": "The answer is 2."})]);
    let mut verify = retort();
    verify
        .args(["verify", "--input"])
        .arg(&unverified)
        .arg("--output")
        .arg(dir.path().join("v.jsonl"));
    let stderr = stderr_of(&verify.assert().failure());
    assert!(stderr.contains("--gold-field"), "{stderr}");

    let mut folder = retort();
    folder
        .args(["verify", "--input"])
        .arg(dir.path())
        .arg("--output")
        .arg(dir.path().join("v.jsonl"));
    let stderr = stderr_of(&folder.assert().failure());
    assert!(stderr.contains("JSONL"), "{stderr}");

    let mut bare = retort();
    bare.args(["generate", "--model", "Qwen/Qwen2.5-0.5B", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(dir.path().join("q.jsonl"));
    let stderr = stderr_of(&bare.assert().failure());
    assert!(stderr.contains("hf:Qwen/Qwen2.5-0.5B"), "{stderr}");
}

/// Waits until `ready()` or 120 s, then sends SIGINT to `child` and returns its exit code.
fn interrupt_when(child: &mut std::process::Child, ready: impl Fn() -> bool) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ready() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    child.wait().unwrap().code()
}

// See: #20
#[test]
fn ctrl_c_stops_generate_with_a_manifest_and_the_rerun_finishes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let input = problems(dir.path(), 200);
    let straight = dir.path().join("straight.jsonl");
    generate(&input, &straight, &["--batch-size", "1"])
        .assert()
        .success();

    let output = dir.path().join("traces.jsonl");
    let mut child = generate(&input, &output, &["--batch-size", "1"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = || {
        fs_err::read_to_string(&output)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    let code = interrupt_when(&mut child, || lines() >= 5);
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(code, Some(130), "{stderr}");
    assert!(stderr.contains("resume with: retort"), "{stderr}");
    assert_eq!(manifest(&output)["status"], "interrupted");
    let partial = lines();
    assert!((5..200).contains(&partial), "{partial}");

    generate(&input, &output, &["--batch-size", "1"])
        .assert()
        .success();
    assert_eq!(manifest(&output)["status"], "complete");
    let by_key = |rows: Vec<Value>| {
        let mut rows: Vec<(String, Value)> = rows
            .into_iter()
            .map(|r| {
                (
                    r["id"].as_str().unwrap().to_string(),
                    r["response_ids"].clone(),
                )
            })
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        rows
    };
    assert_eq!(
        by_key(read_jsonl(&output)),
        by_key(read_jsonl(&straight)),
        "interrupted then resumed equals one uninterrupted run"
    );
}

// See: #20
#[test]
fn ctrl_c_stops_distill_after_a_checkpoint_and_resume_ends_where_a_straight_run_ends() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.jsonl");
    let rows: Vec<Value> = (0..8)
        .map(|i| json!({"prompt": format!("Q: {i} + 2 = ?\nA:"), "response": format!(" {i} + 2 = {}. The answer is {}.", i + 2, i + 2)}))
        .collect();
    write_jsonl(&data, &rows);
    let distill = |output: &Path, extra: &[&str]| {
        let mut cmd = retort();
        cmd.args([
            "distill",
            "--max-steps",
            "200",
            "--batch-size",
            "4",
            "--lr",
            "1e-3",
            "--seed",
            "5",
        ])
        .arg("--student")
        .arg(world("student"))
        .arg("--data")
        .arg(&data)
        .arg("--output")
        .arg(output)
        .args(extra);
        cmd
    };
    let straight = dir.path().join("straight");
    distill(&straight, &[]).assert().success();

    let output = dir.path().join("run");
    let mut child = distill(&output, &[])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let steps = || {
        fs_err::read_to_string(output.join("metrics.jsonl"))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    let code = interrupt_when(&mut child, || steps() >= 3);
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(code, Some(130), "{stderr}");
    assert!(stderr.contains("--resume"), "{stderr}");
    let status = manifest(&output)["status"].clone();
    assert_eq!(status, "interrupted", "{stderr}");
    let done = steps();
    assert!(
        output.join(format!("checkpoint-{done}")).is_dir(),
        "a checkpoint at the step the run stopped after ({done})"
    );
    distill(&output, &["--resume"]).assert().success();
    assert_eq!(
        fs_err::read(output.join("model.safetensors")).unwrap(),
        fs_err::read(straight.join("model.safetensors")).unwrap(),
        "interrupted then resumed equals one uninterrupted run"
    );
}
