//! Weight-only bf16/f16 on the CPU (issue 15): the linear weights stored in 16 bits, everything
//! else in f32. Logits stay within a stated tolerance of the f32 model, equal (to f32 rounding)
//! the f32 model whose linear weights were rounded to bf16, and generation through `generate`
//! and the engine gives that model's tokens exactly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use retort_model::kv_cache::KvCache;
use retort_model::models::default_positions;
use retort_model::{
    EngineOptions, GenerationParams, LoadOptions, LoadedModel, Request, generate, generate_all,
    load,
};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures");
const MODELS: [&str; 3] = ["qwen2-tiny", "qwen3-tiny", "llama-tiny"];

/// Largest |logit difference| allowed between a bf16-weight model and its f32 model on the
/// fixtures' prompts (logits up to ~8.8 in magnitude). Measured 0.118 (qwen2-tiny), 0.080
/// (qwen3-tiny), 0.108 (llama-tiny): bf16 keeps 8 significant bits, so each weight moves by up to
/// 2^-9 of itself; the bound leaves 2x margin.
const BF16_TOL: f32 = 0.25;
/// As [`BF16_TOL`] for f16 weights (11 significant bits). Measured 0.023, 0.011, 0.017; 2x margin.
const F16_TOL: f32 = 0.05;

fn fixture(name: &str) -> PathBuf {
    Path::new(FIXTURES).join(name)
}

fn load_as(dir: &Path, dtype: Option<DType>) -> LoadedModel {
    let opts = LoadOptions {
        device: Device::Cpu,
        dtype,
        ..LoadOptions::default()
    };
    load(dir.to_str().expect("utf8 path"), &opts).expect("load fixture")
}

fn prompts(name: &str) -> Vec<Vec<u32>> {
    let text = fs_err::read_to_string(fixture(name).join("golden.json")).expect("golden");
    let golden: serde_json::Value = serde_json::from_str(&text).expect("json");
    golden["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .map(|p| {
            p["input_ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|v| v.as_u64().expect("id") as u32)
                .collect()
        })
        .collect()
}

fn logits(m: &LoadedModel, ids: &[u32]) -> Vec<f32> {
    let t = Tensor::new(ids, &Device::Cpu)
        .expect("t")
        .unsqueeze(0)
        .expect("b");
    m.model
        .forward(&t, None, None)
        .expect("forward")
        .flatten_all()
        .expect("flat")
        .to_vec1()
        .expect("vec")
}

/// Logits of the last token of `ids` decoded one token at a time through the KV cache (the few-row
/// kernel, outside the engine).
fn cached_logits(m: &LoadedModel, ids: &[u32]) -> Vec<f32> {
    let mut cache =
        KvCache::new(m.model.config(), 1, ids.len(), DType::F32, &Device::Cpu).expect("cache");
    let mut last = Vec::new();
    for (i, &id) in ids.iter().enumerate() {
        let t = Tensor::new(&[[id]], &Device::Cpu).expect("t");
        let pos = default_positions(1, 1, i, &Device::Cpu).expect("pos");
        last = m
            .model
            .forward_cached(&t, &pos, None, &mut cache)
            .expect("step")
            .flatten_all()
            .expect("flat")
            .to_vec1()
            .expect("vec");
    }
    last
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn half_weight_logits_are_within_tolerance_of_f32() {
    for name in MODELS {
        let f32_model = load_as(&fixture(name), None);
        for (dtype, tol) in [(DType::BF16, BF16_TOL), (DType::F16, F16_TOL)] {
            let m = load_as(&fixture(name), Some(dtype));
            assert_eq!(m.model.dtype(), DType::F32, "{name}: computes in f32");
            assert_eq!(m.model.weight_dtype(), dtype, "{name}: stores {dtype:?}");
            assert!(retort_model::engine::supports(&m.model));
            let (mut worst, mut largest) = (0f32, 0f32);
            for ids in prompts(name) {
                let reference = logits(&f32_model, &ids);
                largest = reference.iter().fold(largest, |a, v| a.max(v.abs()));
                worst = worst.max(max_abs_diff(&logits(&m, &ids), &reference));
                let step = cached_logits(&m, &ids);
                let full = logits(&m, &ids);
                let d = max_abs_diff(&step, &full[full.len() - step.len()..]);
                assert!(d < 1e-4, "{name} {dtype:?}: cached decode vs forward {d}");
            }
            println!(
                "{name} {dtype:?} weights vs f32: logits max_abs_diff {worst:.3e} (largest |logit| {largest:.2})"
            );
            assert!(worst < tol, "{name} {dtype:?}: {worst} >= {tol}");
            assert!(
                worst > 0.0,
                "{name} {dtype:?}: the weights were not narrowed"
            );
        }
    }
}

/// `name`'s folder copied into `dst` with every linear weight (not the embeddings) rounded to bf16
/// and stored back in f32.
fn rounded_copy(name: &str, dst: &Path) {
    fs_err::create_dir_all(dst).expect("mkdir");
    for entry in fs_err::read_dir(fixture(name)).expect("read dir") {
        let entry = entry.expect("entry");
        if entry.file_name() != "model.safetensors" {
            fs_err::copy(entry.path(), dst.join(entry.file_name())).expect("copy");
        }
    }
    let tensors =
        candle_core::safetensors::load(fixture(name).join("model.safetensors"), &Device::Cpu)
            .expect("weights");
    let rounded: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(n, t)| {
            let linear = t.rank() == 2 && !n.ends_with("embed_tokens.weight");
            let t = match linear {
                true => t
                    .to_dtype(DType::BF16)
                    .and_then(|t| t.to_dtype(DType::F32))
                    .expect("round"),
                false => t,
            };
            (n, t)
        })
        .collect();
    candle_core::safetensors::save(&rounded, dst.join("model.safetensors")).expect("save");
}

/// Untied (its `lm_head` is a linear weight of its own): bf16 storage is then exactly the f32
/// model of the rounded weights, in logits and in every generated token.
#[test]
fn bf16_weights_are_the_f32_model_of_rounded_weights() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("rounded");
    rounded_copy("qwen2-tiny", &dir);
    let reference = load_as(&dir, None);
    let m = load_as(&fixture("qwen2-tiny"), Some(DType::BF16));
    let mut worst = 0f32;
    for ids in prompts("qwen2-tiny") {
        worst = worst.max(max_abs_diff(&logits(&m, &ids), &logits(&reference, &ids)));
    }
    println!("qwen2-tiny bf16 weights vs f32 of rounded weights: max_abs_diff {worst:.3e}");
    assert!(worst < 1e-5, "{worst}");
    // Greedy through `generate` (the engine), and sampled streams on the engine.
    let all = prompts("qwen2-tiny");
    let greedy = GenerationParams {
        max_new_tokens: 24,
        temperature: 0.0,
        eos_ids: Vec::new(),
        ..GenerationParams::default()
    };
    let out = generate(&m.model, &m.tokenizer, &all, &greedy).expect("generate");
    let want = generate(&reference.model, &reference.tokenizer, &all, &greedy).expect("generate");
    assert_eq!(out, want, "greedy tokens");
    assert!(out.iter().all(|g| g.token_ids.len() == 24));
    let requests: Vec<Request> = (0..4)
        .flat_map(|s| {
            all.iter().map(move |p| Request {
                prompt: p.clone(),
                seed: 7,
                stream: s,
            })
        })
        .collect();
    let sampled = GenerationParams {
        temperature: 1.0,
        ..greedy
    };
    let options = EngineOptions::default();
    let (out, _) =
        generate_all(&m.model, &m.tokenizer, &requests, &sampled, &options).expect("engine");
    let (want, _) = generate_all(
        &reference.model,
        &reference.tokenizer,
        &requests,
        &sampled,
        &options,
    )
    .expect("engine");
    assert_eq!(out, want, "sampled tokens");
}
