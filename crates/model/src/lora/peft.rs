//! PEFT adapter folders: [`AdapterConfig`] (`adapter_config.json`), the adapter tensors of
//! `adapter_model.safetensors` ([`read_adapter`], keys `base_model.model.<module>.lora_A.weight`
//! / `.lora_B.weight`), the linear layers a `target_modules` list names ([`target_modules`]), and
//! [`load_with_adapter`]: a base model with an adapter merged in, ready for inference.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::load::{LoadOptions, LoadedModel};
use crate::models::CausalLm;

/// File name of the PEFT adapter config.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
/// File name of the PEFT adapter weights.
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// PEFT's prefix of the adapter keys of a causal LM.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// `adapter_config.json` as PEFT reads and writes it (the fields retort uses; others are kept
/// when read and ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// Always `LORA`.
    pub peft_type: String,
    /// Always `CAUSAL_LM`.
    #[serde(default)]
    pub task_type: Option<String>,
    /// The rank.
    pub r: usize,
    /// The scale numerator.
    pub lora_alpha: f64,
    /// Adapted module names.
    pub target_modules: Vec<String>,
    /// The base model (a folder path or a hub name).
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// The hub revision of the base, when it came from the hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Whether weights are stored `[in, out]` (never, for these models).
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Which biases train (`none`).
    #[serde(default = "bias_none")]
    pub bias: String,
    /// Dropout on the LoRA input during training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Rank-stabilised scaling `alpha / sqrt(r)` instead of `alpha / r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// Whether the adapter is frozen (inference only).
    #[serde(default)]
    pub inference_mode: bool,
    /// Layers saved whole beside the adapter (none).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Every other field, kept as read.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn bias_none() -> String {
    "none".into()
}

impl AdapterConfig {
    /// The config of a LoRA adapter of rank `r` and scale numerator `lora_alpha` on the modules
    /// `target_modules` of the base `base_model_name_or_path` (at `revision` on the hub).
    pub fn lora(
        r: usize,
        lora_alpha: f64,
        target_modules: Vec<String>,
        lora_dropout: f64,
        base_model_name_or_path: String,
        revision: Option<String>,
    ) -> Self {
        Self {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            r,
            lora_alpha,
            target_modules,
            base_model_name_or_path: Some(base_model_name_or_path),
            revision,
            fan_in_fan_out: false,
            bias: bias_none(),
            lora_dropout,
            use_rslora: false,
            inference_mode: true,
            modules_to_save: None,
            extra: serde_json::Map::new(),
        }
    }

    /// Reads `dir/adapter_config.json` and checks that retort can apply it.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(ADAPTER_CONFIG_FILE);
        if !path.is_file() {
            return Err(Error::Invalid(format!(
                "`{}` is not a PEFT adapter folder: `{ADAPTER_CONFIG_FILE}` is missing",
                dir.display()
            )));
        }
        let text = fs_err::read_to_string(&path)?;
        let bad = |line: usize, message: String| {
            Error::Model(format!("{}:{line}: {message}", path.display()))
        };
        let config: Self = serde_json::from_str(&text)
            .map_err(|e| bad(e.line(), format!("invalid adapter config: {e}")))?;
        if config.peft_type != "LORA" {
            return Err(bad(
                1,
                format!(
                    "field `peft_type`: expected `LORA`, got `{}`",
                    config.peft_type
                ),
            ));
        }
        if config.r == 0 {
            return Err(bad(1, "field `r`: must be at least 1".into()));
        }
        if config.fan_in_fan_out {
            return Err(bad(
                1,
                "field `fan_in_fan_out`: `true` (Conv1D layouts) is not supported".into(),
            ));
        }
        if config.bias != "none" {
            return Err(bad(
                1,
                format!(
                    "field `bias`: only `none` is supported, got `{}`",
                    config.bias
                ),
            ));
        }
        if config
            .modules_to_save
            .as_ref()
            .is_some_and(|m| !m.is_empty())
        {
            return Err(bad(1, "field `modules_to_save`: not supported".into()));
        }
        for key in ["rank_pattern", "alpha_pattern"] {
            if config
                .extra
                .get(key)
                .is_some_and(|v| v.as_object().is_some_and(|o| !o.is_empty()))
            {
                return Err(bad(
                    1,
                    format!("field `{key}`: per-module ranks are not supported"),
                ));
            }
        }
        if config
            .extra
            .get("use_dora")
            .and_then(serde_json::Value::as_bool)
            == Some(true)
        {
            return Err(bad(1, "field `use_dora`: DoRA is not supported".into()));
        }
        Ok(config)
    }

    /// The factor on `B @ A`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }
}

/// The modules of `base` whose last path component is one of `targets`, with their weight's
/// `(out, in)`, sorted. Only 2-D `*.weight` tensors other than the embeddings qualify; a target
/// that matches nothing is an error listing the linear layers there are.
pub fn target_modules(
    base: &HashMap<String, Tensor>,
    targets: &[String],
) -> Result<BTreeMap<String, (usize, usize)>> {
    if targets.is_empty() {
        return Err(Error::Invalid(
            "field `lora-targets`: name at least one module".into(),
        ));
    }
    let mut linear = BTreeMap::new();
    for (name, tensor) in base {
        let Some(module) = name.strip_suffix(".weight") else {
            continue;
        };
        let last = module.rsplit('.').next().unwrap_or(module);
        if let (Ok((out_dim, in_dim)), false) = (tensor.dims2(), last == "embed_tokens") {
            linear.insert(module.to_string(), (last.to_string(), (out_dim, in_dim)));
        }
    }
    let mut chosen = BTreeMap::new();
    for target in targets {
        let before = chosen.len();
        for (module, (last, dims)) in &linear {
            if last == target {
                chosen.insert(module.clone(), *dims);
            }
        }
        if chosen.len() == before {
            let mut kinds: Vec<&str> = linear.values().map(|(l, _)| l.as_str()).collect();
            kinds.sort_unstable();
            kinds.dedup();
            return Err(Error::Invalid(format!(
                "field `lora-targets`: `{target}` matches no linear layer of the model; it has \
                 {}",
                kinds.join(", ")
            )));
        }
    }
    Ok(chosen)
}

/// The `(module, A, B)` tensors (f32, on `base`'s device) of the adapter in `dir` with `config`,
/// sorted by module. Every targeted layer of `base` must have both tensors in the shapes the
/// base and `r` imply, and every tensor must belong to a targeted layer.
pub fn read_adapter(
    dir: &Path,
    config: &AdapterConfig,
    base: &HashMap<String, Tensor>,
) -> Result<Vec<(String, Tensor, Tensor)>> {
    let path = dir.join(ADAPTER_WEIGHTS_FILE);
    let device = base
        .values()
        .next()
        .map_or(Device::Cpu, |t| t.device().clone());
    let mut tensors = candle_core::safetensors::load(&path, &device).map_err(|e| {
        Error::Invalid(format!(
            "cannot read adapter weights `{}`: {e}",
            path.display()
        ))
    })?;
    let rank = config.r;
    let mut out = Vec::new();
    for (module, (out_dim, in_dim)) in target_modules(base, &config.target_modules)? {
        let mut take = |which: &str, shape: (usize, usize)| -> Result<Tensor> {
            let key = format!("{PEFT_PREFIX}{module}.lora_{which}.weight");
            let tensor = tensors.remove(&key).ok_or_else(|| {
                Error::Invalid(format!(
                    "`{}`: missing tensor `{key}` (targets {:?})",
                    path.display(),
                    config.target_modules
                ))
            })?;
            if tensor.dims() != [shape.0, shape.1] {
                return Err(Error::Invalid(format!(
                    "`{}`: tensor `{key}` has shape {:?}, the base model and r = {rank} imply \
                     [{}, {}]",
                    path.display(),
                    tensor.dims(),
                    shape.0,
                    shape.1
                )));
            }
            Ok(tensor.to_dtype(DType::F32)?)
        };
        let a = take("A", (rank, in_dim))?;
        let b = take("B", (out_dim, rank))?;
        out.push((module, a, b));
    }
    if let Some(key) = tensors.keys().min() {
        return Err(Error::Invalid(format!(
            "`{}`: tensor `{key}` matches no targeted layer of the base model",
            path.display()
        )));
    }
    Ok(out)
}

/// The base model spec an adapter folder names, when `dir` is a PEFT adapter folder (an
/// `adapter_config.json` and no `config.json`), as `AutoPeftModelForCausalLM` reads it: an
/// existing folder as is, otherwise a hub name (`hf:NAME[@REVISION]`).
pub fn adapter_base(dir: &Path) -> Result<Option<String>> {
    if !dir.join(ADAPTER_CONFIG_FILE).is_file() || dir.join("config.json").is_file() {
        return Ok(None);
    }
    let config = AdapterConfig::read(dir)?;
    let Some(name) = config.base_model_name_or_path else {
        return Err(Error::Invalid(format!(
            "`{}`: adapter_config.json has no base_model_name_or_path; load the base model and \
             the adapter explicitly",
            dir.join(ADAPTER_CONFIG_FILE).display()
        )));
    };
    if Path::new(&name).is_dir() {
        return Ok(Some(name));
    }
    Ok(Some(match config.revision {
        Some(revision) => format!("hf:{name}@{revision}"),
        None => format!("hf:{name}"),
    }))
}

/// Loads the base model `base` (a folder or `hf:` spec) with the PEFT LoRA adapter in
/// `adapter_dir` merged into its weights (`W + scale · B · A`, PEFT's `merge`), ready for
/// inference.
pub fn load_with_adapter(
    base: &str,
    adapter_dir: &Path,
    opts: &LoadOptions,
) -> Result<LoadedModel> {
    let dir = crate::load::resolve_dir(base, opts.hf_cache.as_deref())?;
    let (mut model, varmap) = crate::load_trainable_with(&dir, opts)?;
    let mut weights: HashMap<String, Tensor> = crate::train::named_vars(&varmap)
        .into_iter()
        .map(|(name, var)| (name, var.as_detached_tensor()))
        .collect();
    let config = AdapterConfig::read(adapter_dir)?;
    let scale = config.scale();
    for (module, a, b) in read_adapter(adapter_dir, &config, &weights)? {
        let name = format!("{module}.weight");
        let base = &weights[&name];
        let merged = (base + b.matmul(&a)?.affine(scale, 0.0)?.to_dtype(base.dtype())?)?;
        weights.insert(name, merged);
    }
    let device = model.model.device().clone();
    // `opts.dtype` as `load` applies it: on the CPU a 16-bit dtype stores the linear weights
    // narrow (compute in f32); elsewhere the whole model takes it.
    let half = opts.dtype.filter(|d| matches!(d, DType::BF16 | DType::F16));
    let dtype = match (device.is_cpu(), opts.dtype) {
        (false, Some(dtype)) => dtype,
        _ => model.model.dtype(),
    };
    let _narrow = half
        .filter(|_| device.is_cpu())
        .map(crate::models::WeightStorage::enter);
    model.model = CausalLm::new(
        &model.config,
        VarBuilder::from_tensors(weights, dtype, &device),
    )?;
    Ok(model)
}
