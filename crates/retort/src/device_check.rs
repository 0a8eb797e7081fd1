//! `retort device-check`: whether a device and dtype give the numbers of the PyTorch +
//! transformers fixtures (`shared/fixtures`) and of retort's own CPU training step.
//!
//! For each fixture model (Qwen2, Qwen3, Llama): the logits of its golden prompts and the
//! per-token log-probs of its golden scoring rows, against the golden values; greedy generation
//! against the golden token ids (f32 only: a lower precision may pick another token at a near
//! tie); and one SFT training step (loss and global gradient norm) on the device against the same
//! step in f32 on the CPU. Bounds: f32 `1e-4` absolute on logits and log-probs (the CPU parity
//! tests' bound) and `1e-4` relative on the loss and gradient norm; bf16/f16 `5%` of the largest
//! golden |logit| (the fixtures' logits reach about 9, so about 0.45) and `2%` relative on the
//! training step, since bf16 keeps 8 bits of mantissa.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use serde_json::Value;

use crate::compute::Compute;
use crate::error::{Error, Result};

/// The fixture models checked.
pub const FIXTURE_MODELS: [&str; 3] = ["qwen2-tiny", "qwen3-tiny", "llama-tiny"];

/// One measured quantity against its bound.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// The fixture model.
    pub model: String,
    /// What was compared.
    pub what: String,
    /// The measured difference (absolute or relative, as `what` says).
    pub value: f64,
    /// The largest difference that passes.
    pub bound: f64,
    /// `value <= bound`.
    pub pass: bool,
}

/// Runs every check of the fixtures in `fixtures` on `compute`'s device and dtype.
pub fn run(fixtures: &Path, compute: Compute) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for name in FIXTURE_MODELS {
        checks.extend(check_model(&fixtures.join(name), name, compute)?);
    }
    Ok(checks)
}

fn read_golden(dir: &Path) -> Result<Value> {
    let path = dir.join("golden.json");
    let text = fs_err::read_to_string(&path)?;
    serde_json::from_str(&text)
        .map_err(|e| Error::Invalid(format!("{}: not valid JSON: {e}", path.display())))
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_u64)
                .map(|v| v as u32)
                .collect()
        })
        .unwrap_or_default()
}

fn floats(value: &Value) -> Vec<f32> {
    match value {
        Value::Array(items) => items.iter().flat_map(floats).collect(),
        Value::Number(n) => vec![n.as_f64().unwrap_or(f64::NAN) as f32],
        _ => Vec::new(),
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from((x - y).abs()))
        .fold(0.0, f64::max)
}

fn relative(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

fn check_model(dir: &Path, name: &str, compute: Compute) -> Result<Vec<Check>> {
    let golden = read_golden(dir)?;
    let path = dir.to_string_lossy();
    let model = retort_model::load(&path, &compute.load_options()?)?;
    let device = model.model.device().clone();
    let exact = compute.precision.dtype().unwrap_or(model.model.dtype()) == DType::F32;
    let (abs_bound, rel_bound) = if exact {
        (1e-4, 1e-4)
    } else {
        (0.05 * logit_scale(&golden).unwrap_or(1.0), 2e-2)
    };
    let check = |what: &str, value: f64, bound: f64| Check {
        model: name.to_string(),
        what: what.to_string(),
        value,
        bound,
        pass: value <= bound,
    };
    let mut checks = Vec::new();

    let mut worst = 0.0f64;
    for prompt in golden["prompts"].as_array().into_iter().flatten() {
        let input = Tensor::new(ids(&prompt["input_ids"]).as_slice(), &device)?.unsqueeze(0)?;
        let logits = model.model.forward(&input, None, None)?;
        let got: Vec<f32> = logits.flatten_all()?.to_device(&Device::Cpu)?.to_vec1()?;
        worst = worst.max(max_abs_diff(&got, &floats(&prompt["logits"])));
    }
    checks.push(check("logits max |diff| vs transformers", worst, abs_bound));

    let rows = golden["scoring"].as_array().cloned().unwrap_or_default();
    let items: Vec<(Vec<u32>, Vec<u32>)> = rows
        .iter()
        .map(|r| (ids(&r["prompt_ids"]), ids(&r["continuation_ids"])))
        .collect();
    let scored = retort_model::score_batch(&model.model, &items, model.pad_id())?;
    let worst = rows
        .iter()
        .zip(&scored)
        .map(|(row, got)| max_abs_diff(got, &floats(&row["logprobs"])))
        .fold(0.0, f64::max);
    checks.push(check(
        "scoring log-probs max |diff| vs transformers",
        worst,
        abs_bound,
    ));

    if exact {
        let mut mismatched = 0usize;
        for case in golden["generation"].as_array().into_iter().flatten() {
            let want = ids(&case["new_token_ids"]);
            let params = retort_model::GenerationParams {
                max_new_tokens: case["kwargs"]["max_new_tokens"]
                    .as_u64()
                    .map_or(want.len(), |n| n as usize),
                eos_ids: ids(&case["eos_token_ids"]),
                ..retort_model::GenerationParams::default()
            };
            let prompts = [ids(&case["prompt_ids"])];
            let out = retort_model::generate(&model.model, &model.tokenizer, &prompts, &params)?;
            if out.first().map(|g| &g.token_ids) != Some(&want) {
                mismatched += 1;
            }
        }
        checks.push(check(
            "greedy generations differing from transformers",
            mismatched as f64,
            0.0,
        ));
    }

    let (loss_cpu, norm_cpu) = train_step(dir, Compute::cpu(), &golden)?;
    let (loss_dev, norm_dev) = train_step(dir, compute, &golden)?;
    checks.push(check(
        "training step loss, relative diff vs CPU f32",
        relative(loss_dev, loss_cpu),
        rel_bound,
    ));
    checks.push(check(
        "training step gradient norm, relative diff vs CPU f32",
        relative(norm_dev, norm_cpu),
        rel_bound,
    ));
    Ok(checks)
}

/// The largest |logit| of the golden prompts.
fn logit_scale(golden: &Value) -> Option<f64> {
    let prompts = golden["prompts"].as_array()?;
    let largest = prompts
        .iter()
        .flat_map(|p| floats(&p["logits"]))
        .fold(0.0f64, |m, v| m.max(f64::from(v.abs())));
    (largest > 0.0).then_some(largest)
}

/// One SFT forward and backward over the golden prompts (one row each, loss summed over every
/// next token) under `compute` (f32 weights; autocast as `compute` says): the mean token loss and
/// the global gradient norm.
fn train_step(dir: &Path, compute: Compute, golden: &Value) -> Result<(f64, f64)> {
    let options = retort_model::LoadOptions {
        device: compute.device.device()?,
        dtype: Some(DType::F32),
        hf_cache: None,
    };
    let (model, varmap) = retort_model::load_trainable_with(dir, &options)?;
    let device = model.model.device().clone();
    let _autocast = retort_model::autocast::enter(compute.autocast());
    let mut total = Tensor::zeros((), DType::F32, &device)?;
    let mut tokens = 0usize;
    for prompt in golden["prompts"].as_array().into_iter().flatten() {
        let row = ids(&prompt["input_ids"]);
        let input = Tensor::new(row.as_slice(), &device)?.unsqueeze(0)?;
        let logits = model.model.forward(&input, None, None)?;
        let labels = Tensor::new(
            row.iter()
                .map(|&t| i64::from(t))
                .collect::<Vec<_>>()
                .as_slice(),
            &device,
        )?
        .unsqueeze(0)?;
        let (sum, n) = retort_model::train::causal_lm_loss(&logits, &labels)?;
        total = (total + sum.to_dtype(DType::F32)?)?;
        tokens += n;
    }
    let grads = total.backward()?;
    let mut squares = 0.0f64;
    for var in varmap.all_vars() {
        if let Some(grad) = grads.get(var.as_tensor()) {
            squares += grad
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
    }
    let loss = total.to_dtype(DType::F64)?.to_scalar::<f64>()? / tokens.max(1) as f64;
    Ok((loss, squares.sqrt() / tokens.max(1) as f64))
}

/// Where the fixtures are: `dir` when given, else `../shared/fixtures` or `shared/fixtures`
/// beside the working directory.
pub fn fixtures_dir(dir: Option<PathBuf>) -> Result<PathBuf> {
    let candidates = match dir {
        Some(dir) => vec![dir],
        None => vec![
            PathBuf::from("../shared/fixtures"),
            PathBuf::from("shared/fixtures"),
        ],
    };
    candidates
        .iter()
        .find(|d| d.join(FIXTURE_MODELS[0]).join("golden.json").is_file())
        .cloned()
        .ok_or_else(|| {
            Error::Invalid(format!(
                "no fixtures (`{}/golden.json`) in {}; pass `--fixtures DIR`",
                FIXTURE_MODELS[0],
                candidates
                    .iter()
                    .map(|d| format!("`{}`", d.display()))
                    .collect::<Vec<_>>()
                    .join(" or ")
            ))
        })
}
