//! LoRA distillation on the tiny fixtures: the loss falls while only the adapters change, the
//! PEFT files carry PEFT's names and fields, the adapter reloads onto its base to the merged
//! model's logits, and a killed LoRA run resumes to the same adapter bit for bit.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use retort::distill::lora::{self, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE};
use retort::distill::{DistillOptions, distill, distill_trained};
use serde_json::Value;

use crate::distill::{TestResult, base_options, fixture, metrics};

fn fixture_weights(name: &str) -> candle_core::Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(format!("{}/model.safetensors", fixture(name)), &Device::Cpu)
}

fn bits(tensor: &Tensor) -> candle_core::Result<Vec<u32>> {
    Ok(tensor
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f32::to_bits)
        .collect())
}

fn lora_options(dir: &std::path::Path, output: &str) -> std::io::Result<DistillOptions> {
    let mut options = base_options(dir, output)?;
    options.lora_rank = Some(4);
    options.lr = 1e-2;
    Ok(options)
}

#[test]
fn lora_trains_only_the_adapters_and_reloads_onto_its_base() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut options = lora_options(dir.path(), "out")?;
    options.lora_targets = Some(vec!["q_proj".into(), "v_proj".into(), "down_proj".into()]);
    options.merge_lora = true;
    options.eval_data = options.data.clone();
    options.eval_every = Some(1);
    let (summary, trained) = distill_trained(&options, &mut |_| {})?;
    assert!(summary.finished);
    let lines = metrics(&summary.output)?;
    let first = lines[0]["eval_loss"].as_f64().ok_or("eval_loss")?;
    let last = lines[11]["eval_loss"].as_f64().ok_or("eval_loss")?;
    eprintln!("lora eval_loss: {first:.4} -> {last:.4}");
    assert!(
        last < 0.9 * first,
        "LoRA did not lower the loss: {first} -> {last}"
    );

    // Only A and B are trained: the variables are the adapters, and the base is bit-identical.
    let adapters = trained.lora.as_ref().ok_or("no LoRA state")?;
    let names: Vec<String> = retort_model::train::named_vars(&trained.varmap)
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    assert_eq!(names.len(), 2 * 2 * 3, "{names:?}");
    assert!(
        names
            .iter()
            .all(|n| n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight"))
    );
    let original = fixture_weights("qwen2-tiny")?;
    for (name, tensor) in adapters.base_weights() {
        assert_eq!(
            bits(tensor)?,
            bits(&original[name])?,
            "base weight `{name}` changed"
        );
    }

    // PEFT's config fields and key names.
    let output = &summary.output;
    let config: Value =
        serde_json::from_str(&fs_err::read_to_string(output.join(ADAPTER_CONFIG_FILE))?)?;
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["task_type"], "CAUSAL_LM");
    assert_eq!(config["r"], 4);
    assert_eq!(config["lora_alpha"], 8.0);
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["q_proj", "v_proj", "down_proj"])
    );
    assert_eq!(config["fan_in_fan_out"], false);
    assert_eq!(config["bias"], "none");
    assert_eq!(config["lora_dropout"], 0.0);
    let base_path = config["base_model_name_or_path"].as_str().ok_or("base")?;
    assert!(
        std::path::Path::new(base_path)
            .join("config.json")
            .is_file(),
        "{base_path}"
    );
    let saved = candle_core::safetensors::load(output.join(ADAPTER_WEIGHTS_FILE), &Device::Cpu)?;
    let q_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    let q_b = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight";
    let down_a = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight";
    let v_b = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight";
    // qwen2-tiny: hidden 64, 4 heads of 16, 2 KV heads, MLP 176.
    assert_eq!(saved[q_a].dims(), [4, 64]);
    assert_eq!(saved[q_b].dims(), [64, 4]);
    assert_eq!(saved[down_a].dims(), [4, 176]);
    assert_eq!(saved[v_b].dims(), [32, 4]);
    assert_eq!(saved.len(), 12);
    assert!(
        saved[q_b].abs()?.max_all()?.to_scalar::<f32>()? > 0.0,
        "B never moved"
    );

    // The merged folder: untouched tensors bit-identical, adapted ones W + (alpha / r) B A.
    let merged =
        candle_core::safetensors::load(output.join("merged/model.safetensors"), &Device::Cpu)?;
    let module = "model.layers.0.self_attn.q_proj";
    let a = &saved[&format!("base_model.model.{module}.lora_A.weight")];
    let b = &saved[&format!("base_model.model.{module}.lora_B.weight")];
    let want = (&original[&format!("{module}.weight")] + b.matmul(a)?.affine(2.0, 0.0)?)?;
    assert_eq!(bits(&merged[&format!("{module}.weight")])?, bits(&want)?);
    for name in [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.q_proj.bias",
    ] {
        assert_eq!(
            bits(&merged[name])?,
            bits(&original[name])?,
            "`{name}` changed"
        );
    }

    // The adapter reloads onto its base to the merged model's logits.
    let reloaded = lora::load_with_adapter(&fixture("qwen2-tiny"), output, &Default::default())?;
    let merged_model = retort_model::load(
        output.join("merged").to_str().ok_or("path")?,
        &Default::default(),
    )?;
    let ids = Tensor::new(&[[3u32, 17, 42, 99, 5, 250, 7]], &Device::Cpu)?;
    let from_adapter = reloaded.model.forward(&ids, None, None)?;
    let from_merged = merged_model.model.forward(&ids, None, None)?;
    let in_memory = trained.model.model.forward(&ids, None, None)?;
    let diff = (&from_adapter - &from_merged)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    let diff_memory = (&from_adapter - &in_memory)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    eprintln!("adapter reload vs merged: max_abs_diff = {diff:e}; vs in memory {diff_memory:e}");
    assert!(diff < 1e-5 && diff_memory < 1e-5, "{diff} {diff_memory}");
    let base = retort_model::load(&fixture("qwen2-tiny"), &Default::default())?;
    let moved = (&from_adapter - base.model.forward(&ids, None, None)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert!(moved > 1e-3, "the adapter changed nothing: {moved}");

    // Every command's local loader takes the adapter folder itself, as AutoPeftModel does.
    let backend = retort::backend::local::LocalBackend::load(output.to_str().ok_or("path")?, 4)?;
    let from_folder = backend.model().model.forward(&ids, None, None)?;
    let diff = (&from_folder - &from_adapter)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert!(diff == 0.0, "adapter folder load differs by {diff}");
    Ok(())
}

#[test]
fn lora_resume_equals_uninterrupted_run() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut options = lora_options(dir.path(), "straight")?;
    options.max_steps = Some(6);
    options.checkpoint_every = Some(2);
    let straight = distill(&options, &mut |_| {})?;
    assert!(
        straight
            .output
            .join("checkpoint-2")
            .join(ADAPTER_WEIGHTS_FILE)
            .is_file()
    );
    assert!(
        !straight
            .output
            .join("checkpoint-2/model.safetensors")
            .exists()
    );

    let mut killed = options.clone();
    killed.output = Some(dir.path().join("killed"));
    killed.stop_after_step = Some(3);
    distill(&killed, &mut |_| {})?;
    killed.stop_after_step = None;
    killed.resume = true;
    let resumed = distill(&killed, &mut |_| {})?;
    assert_eq!(resumed.resumed_from, Some(2));
    let a = fs_err::read(straight.output.join(ADAPTER_WEIGHTS_FILE))?;
    let b = fs_err::read(resumed.output.join(ADAPTER_WEIGHTS_FILE))?;
    assert!(a == b, "LoRA adapter differs after resume");

    // Resuming with another rank is refused with both settings named.
    let mut other = killed.clone();
    other.output = Some(dir.path().join("other"));
    other.stop_after_step = Some(2);
    other.resume = false;
    distill(&other, &mut |_| {})?;
    other.stop_after_step = None;
    other.resume = true;
    other.lora_rank = Some(2);
    let message = distill(&other, &mut |_| {})
        .err()
        .ok_or("expected an error")?
        .to_string();
    assert!(
        message.contains("r = 4") && message.contains("r = 2"),
        "{message}"
    );
    Ok(())
}

#[test]
fn lora_options_are_checked() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut options = lora_options(dir.path(), "out")?;
    options.lora_targets = Some(vec!["qkv".into()]);
    let message = distill(&options, &mut |_| {})
        .err()
        .ok_or("expected an error")?
        .to_string();
    assert!(
        message.contains("`qkv`") && message.contains("q_proj"),
        "{message}"
    );
    let mut options = base_options(dir.path(), "out2")?;
    options.merge_lora = true;
    let message = distill(&options, &mut |_| {})
        .err()
        .ok_or("expected an error")?
        .to_string();
    assert!(
        message.contains("merge-lora") && message.contains("lora-rank"),
        "{message}"
    );
    Ok(())
}

/// The largest `|a - b|` over all elements.
fn max_abs_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_vec0::<f32>()
}

/// Full fine-tuning and LoRA see the same loss at the merged weights, and LoRA's gradients are
/// full fine-tuning's weight gradient projected: `dA = s·Bᵀ·dW`, `dB = s·dW·Aᵀ` (See: #18).
#[test]
fn lora_gradients_are_the_full_gradient_projected() -> TestResult {
    use retort_model::train::{causal_lm_loss, named_vars};
    let dir = fixture("qwen2-tiny");
    let (student, varmap) = retort_model::load_trainable(std::path::Path::new(&dir))?;
    let spec = lora::LoraSpec {
        rank: 4,
        alpha: 8.0,
        targets: vec!["q_proj".into(), "o_proj".into(), "up_proj".into()],
        dropout: 0.0,
        base_dtype: candle_core::DType::F32,
    };
    let base = lora::BaseName::from_spec(&dir);
    let adapters = lora::LoraModel::new(
        lora::frozen_weights(&varmap),
        &student.config,
        &spec,
        base,
        3,
    )?;
    // B starts at zero, which would make every dA zero: give it values.
    for (i, (name, var)) in adapters.vars().into_iter().enumerate() {
        if name.ends_with("lora_B.weight") {
            let values = Tensor::randn(0f32, 0.05, var.shape(), &Device::Cpu)?;
            var.set(&values)?;
        } else {
            assert!(name.ends_with("lora_A.weight"), "{name} ({i})");
        }
    }
    let ids = Tensor::new(
        &[
            [3u32, 17, 42, 5, 99, 7, 23, 11],
            [8, 2, 64, 31, 12, 9, 4, 50],
        ],
        &Device::Cpu,
    )?;

    // LoRA: gradients of A and B only.
    let model = adapters.build()?;
    let (lora_loss, _) = causal_lm_loss(&model.forward(&ids, None, None)?, &ids)?;
    let lora_grads = lora_loss.backward()?;

    // Full fine-tuning at the merged weights: dW of every weight.
    // (The full model's variables share storage with the LoRA base, so this comes after the
    // LoRA backward.)
    let merged: HashMap<String, Tensor> = adapters.merged_weights()?.into_iter().collect();
    let full_vars: HashMap<String, candle_core::Var> = named_vars(&varmap).into_iter().collect();
    for module in adapters.modules() {
        let name = format!("{module}.weight");
        full_vars[&name].set(&merged[&name])?;
    }
    let (full_loss, _) = causal_lm_loss(&student.model.forward(&ids, None, None)?, &ids)?;
    let full_grads = full_loss.backward()?;
    let (lora_value, full_value) = (lora_loss.to_vec0::<f32>()?, full_loss.to_vec0::<f32>()?);
    eprintln!("loss: lora {lora_value} full {full_value}");
    assert!((lora_value - full_value).abs() < 1e-5 * full_value.abs().max(1.0));

    // No gradient reaches a base weight through the LoRA path.
    for (name, tensor) in adapters.base_weights() {
        assert!(lora_grads.get(tensor).is_none(), "`{name}` got a gradient");
    }
    let scale = adapters.scale();
    let vars: HashMap<String, candle_core::Var> = adapters.vars().into_iter().collect();
    for module in adapters.modules() {
        let key = |which: &str| format!("base_model.model.{module}.lora_{which}.weight");
        let (a, b) = (&vars[&key("A")], &vars[&key("B")]);
        let dw = full_grads
            .get(full_vars[&format!("{module}.weight")].as_tensor())
            .ok_or("no dW")?;
        let da_want = (b.as_tensor().t()?.matmul(dw)? * scale)?;
        let db_want = (dw.matmul(&a.as_tensor().t()?)? * scale)?;
        let da = lora_grads.get(a.as_tensor()).ok_or("no dA")?;
        let db = lora_grads.get(b.as_tensor()).ok_or("no dB")?;
        let (dda, ddb) = (max_abs_diff(da, &da_want)?, max_abs_diff(db, &db_want)?);
        let size = |t: &Tensor| -> candle_core::Result<f32> {
            t.abs()?.flatten_all()?.max(0)?.to_vec0::<f32>()
        };
        eprintln!("{module}: dA max_abs_diff {dda:e}, dB max_abs_diff {ddb:e}");
        assert!(
            dda <= 1e-4 * size(&da_want)?.max(1e-3),
            "{module}: dA {dda}"
        );
        assert!(
            ddb <= 1e-4 * size(&db_want)?.max(1e-3),
            "{module}: dB {ddb}"
        );
    }
    Ok(())
}
