//! Training tests on the fixture models: gradients of every parameter against finite
//! differences, loss falling, micro-batch equivalence, weight decay, save → reload.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use retort_model::train::{
    AdamW, AdamWConfig, Decay, Gradients, LrSchedule, TrainConfig, Trainer, causal_lm_loss,
    named_vars,
};
use retort_model::{CausalLm, LoadOptions, Result, load, load_trainable};

fn fixture(name: &str) -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/fixtures"
    ))
    .join(name)
}

/// A batch: ids `[b, t]`, attention mask, position ids and labels (`-100` on padding).
struct Batch {
    ids: Tensor,
    mask: Tensor,
    positions: Tensor,
    labels: Tensor,
}

/// Rows of token ids, left-padded (pad id 509) to the longest, with `position_ids` =
/// `cumsum(mask) - 1` (pads at 1) as transformers' `generate` builds them.
fn batch(rows: &[Vec<u32>]) -> Result<Batch> {
    let width = rows.iter().map(Vec::len).max().unwrap_or(0);
    let (mut ids, mut mask, mut pos, mut labels) = (vec![], vec![], vec![], vec![]);
    for row in rows {
        let pad = width - row.len();
        for i in 0..width {
            if i < pad {
                ids.push(509u32);
                mask.push(0u32);
                pos.push(1u32);
                labels.push(-100i64);
            } else {
                ids.push(row[i - pad]);
                mask.push(1);
                pos.push((i - pad) as u32);
                // The first real token has no context: never a target.
                labels.push(if i == pad {
                    -100
                } else {
                    i64::from(row[i - pad])
                });
            }
        }
    }
    let shape = (rows.len(), width);
    let dev = &Device::Cpu;
    Ok(Batch {
        ids: Tensor::from_vec(ids, shape, dev)?,
        mask: Tensor::from_vec(mask, shape, dev)?,
        positions: Tensor::from_vec(pos, shape, dev)?,
        labels: Tensor::from_vec(labels, shape, dev)?,
    })
}

fn random_rows(rng: &mut ChaCha8Rng, lengths: &[usize]) -> Vec<Vec<u32>> {
    lengths
        .iter()
        .map(|&n| (0..n).map(|_| rng.random_range(0..509u32)).collect())
        .collect()
}

/// Summed token loss and token count of `model` on `batch`, computed in f64.
fn loss_sum(model: &CausalLm, batch: &Batch) -> Result<(Tensor, usize)> {
    let logits = model.forward(&batch.ids, Some(&batch.mask), Some(&batch.positions))?;
    causal_lm_loss(&logits.to_dtype(DType::F64)?, &batch.labels)
}

/// The fixture's weights as f64 variables and a model built on them.
fn f64_model(name: &str) -> Result<(CausalLm, Vec<(String, Var)>)> {
    let (loaded, varmap) = load_trainable(&fixture(name))?;
    let varmap64 = VarMap::new();
    let mut vars = Vec::new();
    {
        let mut data = varmap64
            .data()
            .lock()
            .expect("fresh VarMap lock is not poisoned");
        for (name, var) in named_vars(&varmap) {
            let var64 = Var::from_tensor(&var.as_tensor().to_dtype(DType::F64)?)?;
            data.insert(name.clone(), var64.clone());
            vars.push((name, var64));
        }
    }
    let vb = VarBuilder::from_varmap(&varmap64, DType::F64, &Device::Cpu);
    Ok((CausalLm::new(&loaded.config, vb)?, vars))
}

/// Gradient check of every parameter against central differences, in two forms:
/// - along the tensor's own gradient direction `u = g / |g|`: `(L(θ + h u) - L(θ - h u)) / 2h`
///   must equal `|g|` (the largest signal a finite difference of one tensor can give);
/// - on single coordinates (three random ones and the largest).
///
/// The model runs on f64 weights, but the model files compute RMSNorm statistics, softmax and
/// logits in f32, so the loss carries f32 round-off (~1e-7 relative) and the per-coordinate
/// tolerance is set by that noise divided by `h`.
fn gradient_check(name: &str) -> Result<()> {
    const H_DIRECTION: f64 = 4e-2;
    const H_COORD: f64 = 4e-2;
    let (model, vars) = f64_model(name)?;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let data = batch(&random_rows(&mut rng, &[6, 4]))?;
    let mean_loss = || -> Result<f64> {
        let (sum, n) = loss_sum(&model, &data)?;
        Ok(sum.to_scalar::<f64>()? / n as f64)
    };
    let (sum, n) = loss_sum(&model, &data)?;
    let loss = (sum / n as f64)?;
    let store = loss.backward()?;
    // Every parameter gets a gradient (an error names the first that does not) ...
    let optimizer = AdamW::new(vars.clone(), AdamWConfig::default())?;
    let grads = optimizer.gradients(&store)?;
    let central = |var: &Var, original: &Tensor, direction: &Tensor, h: f64| -> Result<f64> {
        var.set(&(original + direction.affine(h, 0.0)?)?)?;
        let plus = mean_loss()?;
        var.set(&(original - direction.affine(h, 0.0)?)?)?;
        let minus = mean_loss()?;
        var.set(original)?;
        Ok((plus - minus) / (2.0 * h))
    };
    // Richardson extrapolation of two central differences cancels the O(h^2) term, so `h` can
    // be large enough that the f32 round-off of the loss stays small against the difference.
    let richardson = |var: &Var, original: &Tensor, direction: &Tensor, h: f64| -> Result<f64> {
        let coarse = central(var, original, direction, h)?;
        let fine = central(var, original, direction, h / 2.0)?;
        Ok((4.0 * fine - coarse) / 3.0)
    };
    let (mut worst_dir, mut worst_coord, mut checked) = (0f64, 0f64, 0);
    for ((param, var), grad) in vars.iter().zip(&grads.grads) {
        let original = var.as_tensor().copy()?;
        let values = grad.flatten_all()?.to_vec1::<f64>()?;
        let norm = values.iter().map(|g| g * g).sum::<f64>().sqrt();
        // ... and a non-zero one.
        assert!(norm > 0.0, "{name}: `{param}` has an all-zero gradient");
        let numeric = richardson(var, &original, &(grad / norm)?, H_DIRECTION)?;
        let err = (numeric - norm).abs() / norm;
        worst_dir = worst_dir.max(err);
        assert!(
            err < 1e-3,
            "{name}: `{param}`: |grad| {norm:e}, finite difference along it {numeric:e} (rel err {err:e})"
        );
        let mut coords: Vec<usize> = (0..3).map(|_| rng.random_range(0..values.len())).collect();
        let largest = (0..values.len())
            .max_by(|&a, &b| values[a].abs().total_cmp(&values[b].abs()))
            .unwrap_or(0);
        coords.push(largest);
        for &i in &coords {
            let mut unit = vec![0f64; values.len()];
            unit[i] = 1.0;
            let unit = Tensor::from_vec(unit, var.shape(), &Device::Cpu)?;
            let numeric = richardson(var, &original, &unit, H_COORD)?;
            let analytic = values[i];
            let err = (analytic - numeric).abs() / analytic.abs().max(numeric.abs()).max(1e-2);
            worst_coord = worst_coord.max(err);
            checked += 1;
            assert!(
                err < 5e-3,
                "{name}: `{param}`[{i}]: backward {analytic:e}, finite difference {numeric:e} (rel err {err:e})"
            );
        }
    }
    eprintln!(
        "{name}: gradient check of {} parameters: along-gradient worst rel err {worst_dir:e}; \
         {checked} coordinates, worst rel err {worst_coord:e}",
        vars.len()
    );
    Ok(())
}

#[test]
fn gradient_check_qwen2_every_parameter() -> Result<()> {
    gradient_check("qwen2-tiny")
}

#[test]
fn gradient_check_qwen3_every_parameter() -> Result<()> {
    gradient_check("qwen3-tiny")
}

#[test]
fn gradient_check_llama_every_parameter() -> Result<()> {
    gradient_check("llama-tiny")
}

#[test]
fn unused_parameter_is_an_error() -> Result<()> {
    let (loaded, varmap) = load_trainable(&fixture("llama-tiny"))?;
    let mut params = named_vars(&varmap);
    params.push((
        "extra.weight".into(),
        Var::zeros((2, 2), DType::F32, &Device::Cpu)?,
    ));
    let mut trainer = Trainer::new(params, config(1e-3, 0.0, None))?;
    let data = batch(&[vec![1, 2, 3, 4]])?;
    let logits = loaded
        .model
        .forward(&data.ids, Some(&data.mask), Some(&data.positions))?;
    let (sum, n) = causal_lm_loss(&logits, &data.labels)?;
    let err = trainer
        .accumulate(&sum, n)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("`extra.weight` received no gradient"), "{err}");
    Ok(())
}

fn config(lr: f64, weight_decay: f64, max_grad_norm: Option<f64>) -> TrainConfig {
    TrainConfig {
        adamw: AdamWConfig {
            weight_decay,
            ..AdamWConfig::default()
        },
        schedule: LrSchedule::constant(lr),
        max_grad_norm,
    }
}

#[test]
fn loss_falls_on_a_fixed_batch() -> Result<()> {
    let (loaded, varmap) = load_trainable(&fixture("qwen2-tiny"))?;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let data = batch(&random_rows(&mut rng, &[12, 9]))?;
    let mut trainer = Trainer::new(
        named_vars(&varmap),
        TrainConfig {
            adamw: AdamWConfig::default(),
            schedule: LrSchedule::cosine(1e-2, 3, 20, 0.1),
            max_grad_norm: Some(1.0),
        },
    )?;
    let mut losses = vec![];
    for _ in 0..20 {
        let logits = loaded
            .model
            .forward(&data.ids, Some(&data.mask), Some(&data.positions))?;
        let (sum, n) = causal_lm_loss(&logits, &data.labels)?;
        trainer.accumulate(&sum, n)?;
        let stats = trainer.step()?;
        assert_eq!(stats.tokens, 19);
        losses.push(stats.loss);
    }
    eprintln!("loss over 20 AdamW steps: {losses:.3?}");
    let (first, last) = (losses[0], losses[19]);
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    Ok(())
}

/// One batch of 4 rows of different lengths versus 4 micro-batches of 1: the same normalised
/// gradient and the same weights after one step.
#[test]
fn micro_batches_give_the_same_update() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let rows = random_rows(&mut rng, &[3, 9, 5, 7]);
    let run = |micro: bool| -> Result<(Vec<Vec<f64>>, Gradients)> {
        let (model, vars) = f64_model("qwen2-tiny")?;
        let mut trainer = Trainer::new(vars.clone(), config(1e-2, 0.1, None))?;
        let batches = if micro {
            rows.iter()
                .map(|r| batch(std::slice::from_ref(r)))
                .collect::<Result<Vec<_>>>()?
        } else {
            vec![batch(&rows)?]
        };
        for b in &batches {
            let (sum, n) = loss_sum(&model, b)?;
            trainer.accumulate(&sum, n)?;
        }
        // The normalised gradient, taken from a twin accumulator, before the step.
        let mut twin = retort_model::train::GradAccumulator::default();
        for b in &batches {
            let (sum, n) = loss_sum(&model, b)?;
            twin.add(trainer.optimizer().params(), &sum, n)?;
        }
        let (grads, _, tokens) = twin.finish(trainer.optimizer().params())?;
        assert_eq!(tokens, 2 + 8 + 4 + 6);
        if micro {
            // The test can tell: averaging per-micro-batch means weighs short rows too much.
            let mut mean_of_means: Option<Vec<Tensor>> = None;
            for b in &batches {
                let mut one = retort_model::train::GradAccumulator::default();
                let (sum, n) = loss_sum(&model, b)?;
                one.add(trainer.optimizer().params(), &sum, n)?;
                let (g, _, _) = one.finish(trainer.optimizer().params())?;
                mean_of_means = Some(match mean_of_means {
                    None => g.grads,
                    Some(acc) => acc
                        .iter()
                        .zip(&g.grads)
                        .map(|(a, b)| a + b)
                        .collect::<candle_core::Result<_>>()?,
                });
            }
            let naive = mean_of_means.unwrap_or_default();
            let d = (&naive[0].affine(0.25, 0.0)? - &grads.grads[0])?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f64>()?;
            let scale = grads.grads[0]
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f64>()?;
            assert!(
                d > 1e-3 * scale,
                "mean of micro-batch means should differ ({d:e})"
            );
        }
        trainer.step()?;
        let weights = vars
            .iter()
            .map(|(_, v)| v.as_tensor().flatten_all()?.to_vec1::<f64>())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((weights, grads))
    };
    let (full_w, full_g) = run(false)?;
    let (micro_w, micro_g) = run(true)?;
    let mut grad_diff = 0f64;
    for (a, b) in full_g.grads.iter().zip(&micro_g.grads) {
        let d = (a - b)?
            .abs()?
            .max_keepdim(0)?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f64>()?;
        let scale = a
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f64>()?
            .max(1e-12);
        grad_diff = grad_diff.max(d / scale);
    }
    let mut weight_diff = 0f64;
    for (a, b) in full_w.iter().zip(&micro_w) {
        for (x, y) in a.iter().zip(b) {
            weight_diff = weight_diff.max((x - y).abs());
        }
    }
    eprintln!(
        "micro-batch vs full batch: grad max rel diff {grad_diff:e}, weight max_abs_diff {weight_diff:e}"
    );
    assert!(grad_diff < 1e-5, "gradients differ by {grad_diff:e}");
    assert!(weight_diff < 1e-6, "weights differ by {weight_diff:e}");
    Ok(())
}

/// With a zero gradient AdamW moves nothing but the decay: matrices shrink by `1 - lr * wd`,
/// norm weights and biases stay as they are.
#[test]
fn weight_decay_skips_norms_and_biases() -> Result<()> {
    let (_, varmap) = load_trainable(&fixture("qwen2-tiny"))?;
    let vars = named_vars(&varmap);
    let before: Vec<Tensor> = vars
        .iter()
        .map(|(_, v)| v.as_tensor().copy())
        .collect::<candle_core::Result<_>>()?;
    let mut optimizer = AdamW::new(
        vars.clone(),
        AdamWConfig {
            weight_decay: 0.5,
            ..AdamWConfig::default()
        },
    )?;
    let zeros = vars
        .iter()
        .map(|(_, v)| v.zeros_like())
        .collect::<candle_core::Result<Vec<_>>>()?;
    optimizer.step(&Gradients { grads: zeros }, 0.1)?;
    let mut decayed = vec![];
    for (((name, var), old), param) in vars.iter().zip(&before).zip(optimizer.params()) {
        let factor = if param.weight_decay { 0.95 } else { 1.0 };
        let diff = (var.as_tensor() - old.affine(factor, 0.0)?)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-6, "`{name}` off by {diff}");
        if param.weight_decay {
            decayed.push(name.as_str());
        } else {
            assert!(
                name.ends_with(".bias") || name.contains("norm"),
                "`{name}` should decay"
            );
        }
    }
    assert!(decayed.contains(&"model.embed_tokens.weight") && decayed.contains(&"lm_head.weight"));
    assert!(decayed.iter().all(|n| n.ends_with("proj.weight")
        || n.ends_with("embed_tokens.weight")
        || *n == "lm_head.weight"));
    Ok(())
}

/// Train one step, save, reload through `load`: the logits are bit-identical.
fn save_and_reload(name: &str, tied: bool) -> Result<()> {
    let source = fixture(name);
    let (loaded, varmap) = load_trainable(&source)?;
    assert_eq!(loaded.config.tie_word_embeddings, tied);
    let data = batch(&[vec![5, 6, 7, 8, 9], vec![10, 11, 12]])?;
    let mut trainer = Trainer::new(named_vars(&varmap), config(1e-2, 0.01, Some(1.0)))?;
    let logits = loaded
        .model
        .forward(&data.ids, Some(&data.mask), Some(&data.positions))?;
    let (sum, n) = causal_lm_loss(&logits, &data.labels)?;
    trainer.accumulate(&sum, n)?;
    trainer.step()?;
    let trained = loaded
        .model
        .forward(&data.ids, Some(&data.mask), Some(&data.positions))?;
    let moved = (&trained - &logits)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    assert!(moved > 1e-3, "the step did not change the model");

    let root = tempfile::tempdir()?;
    let out = root.path().join("saved");
    retort_model::save::save_varmap(&out, &varmap, &loaded.config, &loaded.dir)?;
    for file in [
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let reloaded = load(
        out.to_str().expect("temp paths are UTF-8"),
        &LoadOptions::default(),
    )?;
    let again = reloaded
        .model
        .forward(&data.ids, Some(&data.mask), Some(&data.positions))?;
    let diff = (&again - &trained)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    eprintln!("{name}: save -> reload logits max_abs_diff {diff:e}");
    assert_eq!(diff, 0.0);

    // Same names as the source file (no lm_head when tied), float32, `format: pt`.
    let bytes = fs_err::read(out.join("model.safetensors"))?;
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| retort_model::Error::Model(e.to_string()))?;
    assert_eq!(
        metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get("format"))
            .map(String::as_str),
        Some("pt")
    );
    let saved = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| retort_model::Error::Model(e.to_string()))?;
    let source_bytes = fs_err::read(source.join("model.safetensors"))?;
    let original = safetensors::SafeTensors::deserialize(&source_bytes)
        .map_err(|e| retort_model::Error::Model(e.to_string()))?;
    let mut saved_names = saved.names();
    let mut original_names = original.names();
    saved_names.sort();
    original_names.sort();
    assert_eq!(saved_names, original_names);
    assert_eq!(saved_names.contains(&"lm_head.weight"), !tied);
    assert!(
        saved
            .tensors()
            .iter()
            .all(|(_, t)| t.dtype() == safetensors::Dtype::F32)
    );

    let config: serde_json::Value =
        serde_json::from_str(&fs_err::read_to_string(out.join("config.json"))?)
            .map_err(|e| retort_model::Error::Model(e.to_string()))?;
    let source_config: serde_json::Value =
        serde_json::from_str(&fs_err::read_to_string(source.join("config.json"))?)
            .map_err(|e| retort_model::Error::Model(e.to_string()))?;
    let dtype_key = if source_config.get("dtype").is_some() {
        "dtype"
    } else {
        "torch_dtype"
    };
    assert_eq!(config[dtype_key], "float32");
    let (mut a, mut b) = (config.clone(), source_config.clone());
    a.as_object_mut().map(|o| o.remove(dtype_key));
    b.as_object_mut().map(|o| o.remove(dtype_key));
    assert_eq!(a, b, "config.json keys other than the dtype are kept");
    assert_eq!(
        fs_err::read(out.join("tokenizer.json"))?,
        fs_err::read(source.join("tokenizer.json"))?
    );
    // Nothing but the saved folder is left beside it.
    assert_eq!(fs_err::read_dir(root.path())?.count(), 1);
    Ok(())
}

#[test]
fn save_reload_identical_logits_untied() -> Result<()> {
    save_and_reload("qwen2-tiny", false)
}

#[test]
fn save_reload_identical_logits_tied() -> Result<()> {
    save_and_reload("qwen3-tiny", true)
}

#[test]
fn schedule_clipping_and_resume() -> Result<()> {
    // Warmup then cosine to the floor, as the distill trainer uses it.
    let s = LrSchedule {
        lr: 1.0,
        warmup_steps: 2,
        total_steps: 6,
        decay: Decay::Cosine,
        min_lr_ratio: 0.1,
    };
    let lrs: Vec<f64> = (0..8).map(|i| s.lr_at(i)).collect();
    let want = [
        0.5,
        1.0,
        1.0,
        0.55 + 0.45 * std::f64::consts::FRAC_1_SQRT_2,
        0.55,
        0.55 - 0.45 * std::f64::consts::FRAC_1_SQRT_2,
        0.1,
        0.1,
    ];
    for (got, want) in lrs.iter().zip(want) {
        assert!((got - want).abs() < 1e-12, "{lrs:?}");
    }
    // Clipping a constructed gradient of norm 13 to 1.
    let dev = Device::Cpu;
    let mut g = Gradients {
        grads: vec![Tensor::new(&[5f32], &dev)?, Tensor::new(&[[12f32]], &dev)?],
    };
    let norm = g.clip_by_global_norm(1.0)?;
    assert!((norm - 13.0).abs() < 1e-6 && (g.global_norm()? - 1.0).abs() < 1e-6);
    // Resume: two steps straight equal one step, save, restore into a fresh trainer, one step.
    let (loaded, varmap) = load_trainable(&fixture("llama-tiny"))?;
    let data = batch(&[vec![3, 1, 4, 1, 5, 9, 2, 6]])?;
    let cfg = TrainConfig {
        adamw: AdamWConfig::default(),
        schedule: LrSchedule::cosine(1e-2, 1, 4, 0.1),
        max_grad_norm: Some(1.0),
    };
    let step = |trainer: &mut Trainer, model: &CausalLm| -> Result<()> {
        let logits = model.forward(&data.ids, Some(&data.mask), Some(&data.positions))?;
        let (sum, n) = causal_lm_loss(&logits, &data.labels)?;
        trainer.accumulate(&sum, n)?;
        trainer.step().map(|_| ())
    };
    let root = tempfile::tempdir()?;
    let mut a = Trainer::new(named_vars(&varmap), cfg)?;
    step(&mut a, &loaded.model)?;
    // A checkpoint: the HF folder and the optimizer state, written in one atomic rename.
    let tensors: Vec<(String, Tensor)> = named_vars(&varmap)
        .into_iter()
        .map(|(n, v)| (n, v.as_detached_tensor()))
        .collect();
    retort_model::save::save_hf_folder_with(
        &root.path().join("ckpt"),
        &tensors,
        &loaded.config.raw,
        loaded.config.tie_word_embeddings,
        &loaded.dir,
        |tmp| a.optimizer().save_state(&tmp.join("optimizer.safetensors")),
    )?;
    step(&mut a, &loaded.model)?;
    let (resumed, varmap_b) = load_trainable(&root.path().join("ckpt"))?;
    let mut b = Trainer::new(named_vars(&varmap_b), cfg)?;
    b.optimizer_mut()
        .load_state(&root.path().join("ckpt/optimizer.safetensors"))?;
    assert_eq!(b.step_count(), 1);
    step(&mut b, &resumed.model)?;
    for ((name, va), (_, vb)) in named_vars(&varmap).iter().zip(named_vars(&varmap_b).iter()) {
        let d = (va.as_tensor() - vb.as_tensor())?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert_eq!(d, 0.0, "`{name}` differs after resume");
    }
    Ok(())
}
