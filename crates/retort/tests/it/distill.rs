//! The distillation trainer on the tiny fixture models: SFT and KD lower their loss, the output
//! reloads to identical logits, kill + resume equals an uninterrupted run bit for bit, the
//! micro-batch split leaves the update unchanged, a non-finite loss stops the run with the last
//! checkpoint intact, and bad records name their file and line.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use retort::ModelSpec;
use retort::distill::{
    DistillOptions, DivergenceKind, Objective, OnPolicyLoss, TrainedStudent, distill,
    distill_trained,
};
use retort_model::train::named_vars;
use serde_json::{Value, json};

pub(crate) const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures");

pub(crate) type TestResult = Result<(), Box<dyn std::error::Error>>;

pub(crate) fn fixture(name: &str) -> String {
    format!("{FIXTURES}/{name}")
}

/// Eight short records in three shapes: raw prompt + trace response, chat messages, prompt ids.
pub(crate) fn write_data(dir: &Path) -> std::io::Result<PathBuf> {
    let mut lines = Vec::new();
    for i in 0..6u32 {
        let (a, b) = (i + 2, 3 * i + 1);
        lines.push(json!({
            "id": format!("p{i}"),
            "prompt": format!("Q: {a} + {b} = ?\nA:"),
            "response": format!(" {a} plus {b} is {}. The answer is {}.", a + b, a + b),
            "finish_reason": "stop",
            "verdict": {"correct": i != 5, "extracted": null},
        }));
    }
    lines.push(json!({
        "messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"}],
    }));
    lines.push(json!({"prompt_ids": [1, 2, 3, 4], "completion_ids": [5, 6, 7, 8, 9, 10]}));
    let path = dir.join("data.jsonl");
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    fs_err::write(&path, text)?;
    Ok(path)
}

pub(crate) fn base_options(dir: &Path, output: &str) -> std::io::Result<DistillOptions> {
    Ok(DistillOptions {
        student: Some(ModelSpec::folder(fixture("qwen2-tiny"))),
        data: Some(write_data(dir)?),
        output: Some(dir.join(output)),
        batch_size: 4,
        lr: 3e-3,
        warmup_steps: 2,
        max_steps: Some(12),
        seed: 7,
        ..DistillOptions::default()
    })
}

pub(crate) fn metrics(output: &Path) -> Result<Vec<Value>, Box<dyn std::error::Error>> {
    let text = fs_err::read_to_string(output.join("metrics.jsonl"))?;
    Ok(text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?)
}

fn weights(trained: &TrainedStudent) -> Vec<(String, Vec<f32>)> {
    named_vars(&trained.varmap)
        .into_iter()
        .map(|(name, var)| {
            let values = var
                .as_tensor()
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>());
            (name, values.unwrap_or_default())
        })
        .collect()
}

fn max_abs_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut max = 0f32;
    for ((na, va), (nb, vb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        assert_eq!(va.len(), vb.len());
        for (x, y) in va.iter().zip(vb) {
            max = max.max((x - y).abs());
        }
    }
    max
}

/// Loss falls (held-out = training data, evaluated after every step) and the saved folder
/// reloads to the in-memory model's logits exactly.
fn assert_trains_and_reloads(options: &DistillOptions, key: &str) -> TestResult {
    let mut seen = Vec::new();
    let (summary, trained) = distill_trained(options, &mut |s| seen.push(s.step))?;
    assert!(summary.finished);
    assert_eq!(seen, (1..=12).collect::<Vec<_>>());
    let output = summary.output.clone();
    let lines = metrics(&output)?;
    assert_eq!(lines.len(), 12);
    let first = lines[0][key].as_f64().ok_or("no eval loss")?;
    let last = lines[11][key].as_f64().ok_or("no eval loss")?;
    eprintln!(
        "{key}: {first:.4} -> {last:.4}; {:.0} tokens/s over {} steps",
        summary.tokens_per_s, summary.steps
    );
    assert!(last < 0.9 * first, "{key} did not fall: {first} -> {last}");

    let reloaded = retort_model::load(output.to_str().ok_or("path")?, &Default::default())?;
    let ids = Tensor::new(&[[3u32, 17, 42, 99, 5, 250, 7]], &Device::Cpu)?;
    let want = trained.model.model.forward(&ids, None, None)?;
    let got = reloaded.model.forward(&ids, None, None)?;
    let diff = (want - got)?.abs()?.max_all()?.to_scalar::<f32>()?;
    eprintln!("reload max_abs_diff = {diff}");
    assert_eq!(diff, 0.0);
    for file in [
        "config.json",
        "config.toml",
        "trainer_state.json",
        "tokenizer.json",
    ] {
        assert!(output.join(file).is_file(), "missing {file}");
    }
    let saved = DistillOptions::from_toml_file(&output.join("config.toml"))?;
    assert_eq!(saved.objective, options.objective);
    Ok(())
}

#[test]
fn sft_lowers_loss_and_output_reloads() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut options = base_options(dir.path(), "out")?;
    options.eval_data = options.data.clone();
    options.eval_every = Some(1);
    assert_trains_and_reloads(&options, "eval_loss")
}

#[test]
fn kd_forward_and_reverse_kl_lower_their_loss() -> TestResult {
    for divergence in ["fkl", "rkl"] {
        let dir = tempfile::tempdir()?;
        let mut options = base_options(dir.path(), "out")?;
        options.objective = Objective::Kd;
        options.teacher = Some(ModelSpec::folder(fixture("llama-tiny")));
        options.divergence = divergence.parse()?;
        options.temperature = 2.0;
        options.eval_data = options.data.clone();
        options.eval_every = Some(1);
        eprintln!("divergence {divergence}");
        assert_trains_and_reloads(&options, "eval_kd_loss")?;
    }
    Ok(())
}

#[test]
fn kd_mixed_with_sft_logs_both_terms() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut options = base_options(dir.path(), "out")?;
    options.objective = Objective::Kd;
    options.teacher = Some(ModelSpec::folder(fixture("llama-tiny")));
    options.divergence = DivergenceKind::Jsd;
    options.beta = Some(0.5);
    options.kd_weight = 0.25;
    options.max_steps = Some(2);
    let summary = distill(&options, &mut |_| {})?;
    let lines = metrics(&summary.output)?;
    let line = &lines[0];
    let (loss, sft, kd) = (
        line["loss"].as_f64().ok_or("loss")?,
        line["sft_loss"].as_f64().ok_or("sft")?,
        line["kd_loss"].as_f64().ok_or("kd")?,
    );
    let mixed = 0.75 * sft + 0.25 * kd;
    assert!(
        (loss - mixed).abs() < 1e-4 * mixed.abs().max(1.0),
        "{loss} vs {mixed}"
    );
    Ok(())
}

/// A run stopped after step 5 (checkpoints every 2 steps: the kill loses step 5) and resumed
/// from checkpoint-4 ends with exactly the uninterrupted run's weights; 12 steps at 2 batches
/// per epoch cross 6 epochs.
#[test]
fn kill_and_resume_equals_uninterrupted_run() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut options = base_options(dir.path(), "straight")?;
    options.checkpoint_every = Some(2);
    let (straight, _) = distill_trained(&options, &mut |_| {})?;

    let mut killed = options.clone();
    killed.output = Some(dir.path().join("killed"));
    killed.stop_after_step = Some(5);
    let partial = distill(&killed, &mut |_| {})?;
    assert!(!partial.finished);
    // Without --resume an output with checkpoints is refused.
    killed.stop_after_step = None;
    let refused = distill(&killed, &mut |_| {})
        .err()
        .ok_or("expected an error")?;
    assert!(refused.to_string().contains("--resume"), "{refused}");
    killed.resume = true;
    let resumed = distill(&killed, &mut |_| {})?;
    assert_eq!(resumed.resumed_from, Some(4));
    assert_eq!(resumed.steps_this_run, 8);

    let a = fs_err::read(straight.output.join("model.safetensors"))?;
    let b = fs_err::read(resumed.output.join("model.safetensors"))?;
    assert!(a == b, "final weights differ after resume");
    // The metrics of the lost step 5 were replaced, not duplicated.
    let steps: Vec<u64> = metrics(&resumed.output)?
        .iter()
        .filter_map(|l| l["step"].as_u64())
        .collect();
    assert_eq!(steps, (1..=12).collect::<Vec<_>>());
    let la = metrics(&straight.output)?;
    let lb = metrics(&resumed.output)?;
    assert_eq!(la[11]["loss"], lb[11]["loss"]);
    Ok(())
}

#[test]
fn micro_batches_leave_the_update_unchanged() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut whole = base_options(dir.path(), "whole")?;
    whole.max_steps = Some(3);
    whole.micro_batch_size = Some(4);
    let mut split = whole.clone();
    split.output = Some(dir.path().join("split"));
    split.micro_batch_size = Some(1);
    let (_, a) = distill_trained(&whole, &mut |_| {})?;
    let (_, b) = distill_trained(&split, &mut |_| {})?;
    let diff = max_abs_diff(&weights(&a), &weights(&b));
    eprintln!("micro-batch 4 vs 1: max_abs_diff = {diff:e}");
    assert!(diff < 1e-5, "{diff}");
    Ok(())
}

#[test]
fn non_finite_loss_stops_with_last_checkpoint_intact() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut options = base_options(dir.path(), "out")?;
    options.checkpoint_every = Some(2);
    options.inject_non_finite_at_step = Some(3);
    let output = dir.path().join("out");
    let err = distill(&options, &mut |_| {})
        .err()
        .ok_or("expected an error")?;
    let message = err.to_string();
    eprintln!("{message}");
    assert!(
        message.contains("step 3") && message.contains("checkpoint-2"),
        "{message}"
    );
    assert!(!output.join("checkpoint-3").exists() && !output.join("model.safetensors").exists());
    let state: Value = serde_json::from_str(&fs_err::read_to_string(
        output.join("checkpoint-2/trainer_state.json"),
    )?)?;
    assert_eq!(state["step"], 2);
    retort_model::load(
        output.join("checkpoint-2").to_str().ok_or("path")?,
        &Default::default(),
    )?;
    assert_eq!(metrics(&output)?.len(), 2);
    // Resuming without the fault finishes the run.
    options.inject_non_finite_at_step = None;
    options.resume = true;
    let summary = distill(&options, &mut |_| {})?;
    assert_eq!((summary.resumed_from, summary.steps), (Some(2), 12));
    Ok(())
}

/// GKD on the student's own samples: the KD loss on held-out data falls, the sampling
/// diagnostics are logged, and a killed on-policy run resumes to the same weights (samples are
/// seeded per step and row).
#[test]
fn on_policy_lowers_kd_loss_and_resumes_exactly() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut options = base_options(dir.path(), "straight")?;
    options.objective = Objective::OnPolicy;
    options.on_policy_loss = OnPolicyLoss::Divergence;
    options.teacher = Some(ModelSpec::folder(fixture("llama-tiny")));
    options.divergence = DivergenceKind::Rkl;
    options.lambda = 0.75;
    options.max_new_tokens = 12;
    options.eval_data = options.data.clone();
    options.eval_every = Some(1);
    options.checkpoint_every = Some(4);
    let straight = distill(&options, &mut |_| {})?;
    let lines = metrics(&straight.output)?;
    let first = lines[0]["eval_kd_loss"].as_f64().ok_or("eval_kd_loss")?;
    let last = lines[11]["eval_kd_loss"].as_f64().ok_or("eval_kd_loss")?;
    let sampled = lines.iter().filter(|l| l["on_policy"] == true).count();
    eprintln!(
        "on-policy eval_kd_loss: {first:.4} -> {last:.4}; {sampled}/12 steps sampled; {:.0} tokens/s",
        straight.tokens_per_s
    );
    assert!(last < first, "{first} -> {last}");
    assert!(sampled > 0 && sampled < 12, "{sampled}");
    assert!(lines.iter().any(|l| l["sample_length"].as_f64().is_some()));

    let mut killed = options.clone();
    killed.output = Some(dir.path().join("killed"));
    killed.stop_after_step = Some(6);
    distill(&killed, &mut |_| {})?;
    killed.stop_after_step = None;
    killed.resume = true;
    let resumed = distill(&killed, &mut |_| {})?;
    assert_eq!(resumed.resumed_from, Some(4));
    let a = fs_err::read(straight.output.join("model.safetensors"))?;
    let b = fs_err::read(resumed.output.join("model.safetensors"))?;
    assert!(a == b, "on-policy weights differ after resume");
    Ok(())
}

/// The default on-policy loss: the student samples every step (λ = 1), the teacher scores the
/// sampled tokens, and the per-token reverse KL (teacher log-prob minus student log-prob) is the
/// reward. The reverse KL falls, both as sampled on the student's own tokens and exactly
/// (full distributions) on the held-out data.
#[test]
fn on_policy_reverse_kl_reward_lowers_the_reverse_kl() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut options = base_options(dir.path(), "out")?;
    options.objective = Objective::OnPolicy;
    options.teacher = Some(ModelSpec::folder(fixture("llama-tiny")));
    options.lambda = 1.0;
    options.max_new_tokens = 12;
    options.max_steps = Some(30);
    options.batch_size = 8;
    options.lr = 1e-2;
    options.divergence = DivergenceKind::Rkl;
    options.eval_data = options.data.clone();
    options.eval_every = Some(1);
    assert_eq!(options.on_policy_loss, OnPolicyLoss::Reward);
    let summary = distill(&options, &mut |_| {})?;
    let lines = metrics(&summary.output)?;
    assert!(
        lines
            .iter()
            .all(|l| l["on_policy"] == true && l.get("kd_loss").is_none())
    );
    let series = |key: &str| -> Result<Vec<f64>, Box<dyn std::error::Error>> {
        Ok(lines
            .iter()
            .map(|l| l[key].as_f64().ok_or(format!("no `{key}`")))
            .collect::<Result<_, _>>()?)
    };
    let (sampled, exact) = (series("reverse_kl")?, series("eval_kd_loss")?);
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    let (early, late) = (mean(&sampled[..6]), mean(&sampled[24..]));
    eprintln!(
        "on-policy reward: sampled reverse KL {early:.4} (steps 1-6) -> {late:.4} (steps 25-30); \
         exact reverse KL on the data {:.4} -> {:.4}",
        exact[0], exact[29]
    );
    assert!(late < 0.9 * early, "sampled reverse KL: {early} -> {late}");
    assert!(
        exact[29] < 0.85 * exact[0],
        "exact reverse KL: {} -> {}",
        exact[0],
        exact[29]
    );
    Ok(())
}

#[test]
fn redi_lowers_its_loss_and_needs_verdicts() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut lines = String::new();
    for i in 0..8u32 {
        let (a, b) = (i + 2, 2 * i + 1);
        let correct = i % 2 == 0;
        let answer = if correct { a + b } else { a + b + 7 };
        let record = json!({
            "prompt": format!("Q: {a} + {b} = ?\nA:"),
            "response": format!(" The answer is {answer}."),
            "finish_reason": "stop",
            "verdict": {"correct": correct},
        });
        lines.push_str(&format!("{record}\n"));
    }
    let data = dir.path().join("redi.jsonl");
    fs_err::write(&data, &lines)?;
    let mut options = base_options(dir.path(), "out")?;
    options.data = Some(data.clone());
    options.eval_data = Some(data.clone());
    options.eval_every = Some(1);
    options.objective = Objective::Redi;
    let summary = distill(&options, &mut |_| {})?;
    let lines = metrics(&summary.output)?;
    let first = lines[0]["eval_loss"].as_f64().ok_or("eval_loss")?;
    let last = lines[11]["eval_loss"].as_f64().ok_or("eval_loss")?;
    eprintln!("redi eval_loss: {first:.4} -> {last:.4}");
    assert!(last < first - 0.5, "{first} -> {last}");

    // A record without a verdict is an error at its line.
    fs_err::write(
        &data,
        format!(
            "{lines_text}{{\"prompt\": \"x\", \"response\": \"y\"}}\n",
            lines_text = fs_err::read_to_string(&data)?
        ),
    )?;
    options.output = Some(dir.path().join("out2"));
    let message = distill(&options, &mut |_| {})
        .err()
        .ok_or("expected an error")?
        .to_string();
    assert!(
        message.contains(":9:") && message.contains("verdict.correct"),
        "{message}"
    );
    Ok(())
}

#[test]
fn bad_records_name_file_line_and_field() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut options = base_options(dir.path(), "out")?;
    let data = dir.path().join("bad.jsonl");
    fs_err::write(
        &data,
        "{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": \"c\"}\n",
    )?;
    options.data = Some(data.clone());
    let err = distill(&options, &mut |_| {})
        .err()
        .ok_or("expected an error")?;
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("{}:2:", data.display())),
        "{message}"
    );
    assert!(message.contains("`response`"), "{message}");

    fs_err::write(&data, "{\"prompt\": \"a\", \"response\": 3}\n")?;
    let message = distill(&options, &mut |_| {})
        .err()
        .ok_or("expected an error")?
        .to_string();
    assert!(
        message.contains(":1:") && message.contains("field `response`"),
        "{message}"
    );
    Ok(())
}

#[test]
fn only_correct_and_truncation_are_counted() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut options = base_options(dir.path(), "out")?;
    options.only_correct = true;
    options.max_seq_len = 16;
    options.max_steps = Some(1);
    let summary = distill(&options, &mut |_| {})?;
    // Five verified-correct records; the other three have no or a false verdict.
    assert_eq!(summary.data.records, 8);
    assert_eq!(summary.data.skipped_incorrect, 3);
    assert_eq!(summary.data.examples + summary.data.dropped, 5);
    assert!(
        summary.data.examples > 0 && summary.data.truncated > 0,
        "{:?}",
        summary.data
    );
    Ok(())
}
