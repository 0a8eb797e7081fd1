//! `--device` / `--dtype`: a CPU build refuses CUDA with the way to get it; `device-check` passes
//! on the CPU; bf16 autocast training follows the f32 run and is recorded in the run's identity.

use super::*;

#[test]
fn a_cpu_build_refuses_cuda_naming_the_device_and_the_build_script() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    write_jsonl(&input, &[json!({"id": "a", "prompt": "Q: 1 + 1 = ?\nA:"})]);
    for env_device in [false, true] {
        let mut cmd = retort();
        cmd.arg("generate")
            .arg("--model")
            .arg(fixtures().join("qwen2-tiny"))
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(dir.path().join("out.jsonl"))
            .args(["--max-new-tokens", "4"]);
        if env_device {
            cmd.env("RETORT_DEVICE", "cuda:1");
        } else {
            cmd.args(["--device", "cuda:1"]);
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains("cuda:1") && err.contains("scripts/cuda-build.sh"),
            "{err}"
        );
    }
    let out = retort()
        .args(["score", "--device", "tpu"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`cpu`, `cuda` or `cuda:N`"), "{err}");
}

#[test]
fn device_check_passes_on_the_cpu_and_reports_every_check() {
    let out = retort()
        .arg("device-check")
        .arg("--fixtures")
        .arg(fixtures())
        .args(["--device", "cpu", "--dtype", "f32", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(line.lines().last().unwrap()).unwrap();
    let checks = report["checks"].as_array().unwrap();
    // Per model: logits, scoring, greedy generation, training loss and gradient norm.
    assert_eq!(checks.len(), 3 * 5, "{report}");
    assert!(checks.iter().all(|c| c["pass"] == json!(true)), "{report}");
    // The CPU against itself: the same computation (up to the order of parallel sums).
    let train: Vec<f64> = checks
        .iter()
        .filter(|c| c["what"].as_str().unwrap().starts_with("training"))
        .map(|c| c["value"].as_f64().unwrap())
        .collect();
    assert!(train.iter().all(|&v| v < 1e-12), "{train:?}");
}

#[test]
fn bf16_autocast_training_follows_f32_and_is_part_of_the_run_identity() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.jsonl");
    let rows: Vec<Value> = (0..8)
        .map(|i| {
            json!({
                "id": format!("r{i}"),
                "prompt": format!("Q: {i} + {} = ?\nA:", i + 3),
                "response": format!(" {i} plus {} is {}.", i + 3, 2 * i + 3),
                "finish_reason": "stop",
            })
        })
        .collect();
    write_jsonl(&data, &rows);
    let distill = |out: &Path, dtype: &str| {
        let mut cmd = retort();
        cmd.args(["distill", "--objective", "sft", "--max-steps", "6"])
            .args([
                "--batch-size",
                "4",
                "--lr",
                "1e-3",
                "--seed",
                "1",
                "--dtype",
                dtype,
            ])
            .arg("--student")
            .arg(fixtures().join("qwen2-tiny"))
            .arg("--data")
            .arg(&data)
            .arg("--output")
            .arg(out);
        cmd
    };
    let train = |out: &Path, dtype: &str| {
        distill(out, dtype).assert().success();
        read_jsonl(&out.join("metrics.jsonl"))
            .iter()
            .map(|m| m["loss"].as_f64().unwrap())
            .collect::<Vec<f64>>()
    };
    let f32_losses = train(&dir.path().join("f32"), "f32");
    let bf16_out = dir.path().join("bf16");
    let bf16_losses = train(&bf16_out, "bf16");
    assert_eq!(f32_losses.len(), 6);
    for (a, b) in f32_losses.iter().zip(&bf16_losses) {
        // bf16 keeps 8 mantissa bits: the losses agree to a few percent, never exactly.
        assert!(
            (a - b).abs() / a < 0.05,
            "f32 {f32_losses:?} vs bf16 {bf16_losses:?}"
        );
    }
    assert_ne!(f32_losses, bf16_losses, "the bf16 run computed in f32");
    let config = fs_err::read_to_string(bf16_out.join("config.toml")).unwrap();
    assert!(config.contains("dtype = \"bf16\""), "{config}");
    // The weights written are f32 (master weights), loadable as before.
    let weights = fs_err::read(bf16_out.join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&weights[8..8 + header_len]).unwrap();
    let dtypes: Vec<&Value> = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .map(|(_, t)| &t["dtype"])
        .collect();
    assert!(
        !dtypes.is_empty() && dtypes.iter().all(|d| *d == "F32"),
        "{dtypes:?}"
    );
    // Another dtype into the same output is another run: refused.
    let out = distill(&bf16_out, "f32").arg("--resume").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("dtype"));
}
