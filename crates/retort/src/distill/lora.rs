//! LoRA on the student: [`LoraModel`] keeps the base weights frozen and trains, for each targeted
//! linear layer `W [out, in]`, a pair `A [r, in]` (Kaiming-uniform, as PEFT initialises it) and
//! `B [out, r]` (zero), so the layer computes with `W + (alpha / r) * B @ A`.
//!
//! The model files are not LoRA-aware: [`LoraModel::build`] hands [`CausalLm::new`] a
//! [`candle_nn::var_builder::SimpleBackend`] that answers each targeted `*.weight` with the merged
//! tensor (built from the current `A`/`B` variables, so autograd reaches them) and every other
//! name with the frozen base tensor. The trainer rebuilds the network after each optimizer step;
//! building costs one `B @ A` per target. The trade-off: the backward still forms the full
//! `[out, in]` gradient of each merged weight before projecting it onto `A` and `B`, so a step
//! costs about what full fine-tuning does; what LoRA saves is optimizer state and output size.
//!
//! Adapters are saved in PEFT's format ([`write_adapter`]): `adapter_config.json`
//! ([`AdapterConfig`]) and `adapter_model.safetensors` with keys
//! `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`. [`load_with_adapter`] reads such a
//! folder onto its base model. Dropout on the LoRA input is not implemented (`lora_dropout` is
//! written as 0).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use retort_model::train::named_vars;
use retort_model::{CausalLm, LoadOptions, LoadedModel, ModelConfig};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// File name of the PEFT adapter config.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
/// File name of the PEFT adapter weights.
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The linear layers targeted when none are named: every projection of attention and MLP.
pub const DEFAULT_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];
/// PEFT's prefix of the adapter keys of a causal LM.
const PEFT_PREFIX: &str = "base_model.model.";
/// Mixed into the run's seed for the `A` initialisation, so it is independent of the data order.
const INIT_SALT: u64 = 0x6c6f_7261_5f69_6e69;

/// What to adapt and how strongly.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// Rank `r` of each `B @ A`.
    pub rank: usize,
    /// `alpha`: the update is scaled by `alpha / r`.
    pub alpha: f64,
    /// Module names (last path component, as PEFT's `target_modules`).
    pub targets: Vec<String>,
}

impl LoraSpec {
    /// `alpha / r`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

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
    /// Dropout on the LoRA input during training (retort trains without it).
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
    /// The config of an adapter trained per `spec` on `base`.
    pub fn new(spec: &LoraSpec, base: BaseName) -> Self {
        Self {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            r: spec.rank,
            lora_alpha: spec.alpha,
            target_modules: spec.targets.clone(),
            base_model_name_or_path: Some(base.name),
            revision: base.revision,
            fan_in_fan_out: false,
            bias: bias_none(),
            lora_dropout: 0.0,
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
        let config: Self = serde_json::from_str(&text).map_err(|e| Error::Input {
            path: path.clone(),
            line: e.line(),
            message: format!("invalid adapter config: {e}"),
        })?;
        let bad = |message: String| Error::Input {
            path: path.clone(),
            line: 1,
            message,
        };
        if config.peft_type != "LORA" {
            return Err(bad(format!(
                "field `peft_type`: expected `LORA`, got `{}`",
                config.peft_type
            )));
        }
        if config.r == 0 {
            return Err(bad("field `r`: must be at least 1".into()));
        }
        if config.fan_in_fan_out {
            return Err(bad(
                "field `fan_in_fan_out`: `true` (Conv1D layouts) is not supported".into(),
            ));
        }
        if config.bias != "none" {
            return Err(bad(format!(
                "field `bias`: only `none` is supported, got `{}`",
                config.bias
            )));
        }
        if config
            .modules_to_save
            .as_ref()
            .is_some_and(|m| !m.is_empty())
        {
            return Err(bad("field `modules_to_save`: not supported".into()));
        }
        for key in ["rank_pattern", "alpha_pattern"] {
            if config
                .extra
                .get(key)
                .is_some_and(|v| v.as_object().is_some_and(|o| !o.is_empty()))
            {
                return Err(bad(format!(
                    "field `{key}`: per-module ranks are not supported"
                )));
            }
        }
        if config
            .extra
            .get("use_dora")
            .and_then(serde_json::Value::as_bool)
            == Some(true)
        {
            return Err(bad("field `use_dora`: DoRA is not supported".into()));
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

/// How an adapter names its base model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseName {
    /// A folder path, or `ORG/NAME` on the hub.
    pub name: String,
    /// The hub revision.
    pub revision: Option<String>,
}

impl BaseName {
    /// From a model spec: `hf:ORG/NAME[@REV]` becomes the hub name and revision, a folder its
    /// absolute path (so the adapter finds its base from anywhere).
    pub fn from_spec(spec: &str) -> Self {
        if let Some(rest) = spec.strip_prefix("hf:") {
            let (name, revision) = match rest.split_once('@') {
                Some((name, revision)) => (name.to_string(), Some(revision.to_string())),
                None => (rest.to_string(), None),
            };
            return Self { name, revision };
        }
        let path = Path::new(spec);
        let name = std::path::absolute(path)
            .unwrap_or_else(|_| path.to_path_buf())
            .display()
            .to_string();
        Self {
            name,
            revision: None,
        }
    }
}

/// One adapted linear layer.
#[derive(Debug, Clone)]
struct Adapter {
    /// The module path, e.g. `model.layers.0.self_attn.q_proj`.
    module: String,
    /// `[r, in]`.
    a: Var,
    /// `[out, r]`.
    b: Var,
}

impl Adapter {
    fn weight_name(&self) -> String {
        format!("{}.weight", self.module)
    }

    fn key(&self, which: &str) -> String {
        format!("{PEFT_PREFIX}{}.lora_{which}.weight", self.module)
    }
}

/// A frozen base model with trainable LoRA adapters.
#[derive(Debug, Clone)]
pub struct LoraModel {
    base: Arc<HashMap<String, Tensor>>,
    adapters: Vec<Adapter>,
    scale: f64,
    config: ModelConfig,
    adapter_config: AdapterConfig,
}

impl LoraModel {
    /// Fresh adapters on `base` (the Hugging Face weights of a model with `config`): `A` drawn
    /// Kaiming-uniform (PEFT's `kaiming_uniform_(a=sqrt(5))`, i.e. U(-1/sqrt(in), 1/sqrt(in)))
    /// from a stream of `seed`, `B` zero.
    pub fn new(
        base: HashMap<String, Tensor>,
        config: &ModelConfig,
        spec: &LoraSpec,
        base_name: BaseName,
        seed: u64,
    ) -> Result<Self> {
        if spec.rank == 0 {
            return Err(Error::Invalid(
                "field `lora-rank`: must be at least 1".into(),
            ));
        }
        if !(spec.alpha.is_finite() && spec.alpha > 0.0) {
            return Err(Error::Invalid(format!(
                "field `lora-alpha`: must be positive, got {}",
                spec.alpha
            )));
        }
        let modules = target_modules(&base, &spec.targets)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ INIT_SALT);
        let mut adapters = Vec::with_capacity(modules.len());
        for (module, (out_dim, in_dim)) in modules {
            let weight = &base[&format!("{module}.weight")];
            let bound = 1.0 / (in_dim as f32).sqrt();
            let values: Vec<f32> = (0..spec.rank * in_dim)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            let a = Tensor::from_vec(values, (spec.rank, in_dim), weight.device())?
                .to_dtype(weight.dtype())?;
            let b = Tensor::zeros((out_dim, spec.rank), weight.dtype(), weight.device())?;
            adapters.push(Adapter {
                module,
                a: Var::from_tensor(&a)?,
                b: Var::from_tensor(&b)?,
            });
        }
        Ok(Self {
            base: Arc::new(base),
            adapters,
            scale: spec.scale(),
            config: config.clone(),
            adapter_config: AdapterConfig::new(spec, base_name),
        })
    }

    /// The adapters saved in `dir` (a PEFT folder) on `base`; with `spec`, the folder must
    /// match it (rank, alpha and targets), so a resumed run cannot silently change them.
    pub fn from_adapter_dir(
        base: HashMap<String, Tensor>,
        config: &ModelConfig,
        dir: &Path,
        spec: Option<&LoraSpec>,
    ) -> Result<Self> {
        let adapter_config = AdapterConfig::read(dir)?;
        if let Some(spec) = spec {
            let mut want = spec.targets.clone();
            let mut have = adapter_config.target_modules.clone();
            want.sort();
            have.sort();
            if adapter_config.r != spec.rank
                || adapter_config.lora_alpha != spec.alpha
                || want != have
            {
                return Err(Error::Invalid(format!(
                    "`{}`: the adapter has r = {}, alpha = {}, targets {:?}; the options ask for \
                     r = {}, alpha = {}, targets {:?}",
                    dir.display(),
                    adapter_config.r,
                    adapter_config.lora_alpha,
                    adapter_config.target_modules,
                    spec.rank,
                    spec.alpha,
                    spec.targets
                )));
            }
        }
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
        let modules = target_modules(&base, &adapter_config.target_modules)?;
        let rank = adapter_config.r;
        let mut adapters = Vec::with_capacity(modules.len());
        for (module, (out_dim, in_dim)) in modules {
            let dtype = base[&format!("{module}.weight")].dtype();
            let mut take = |which: &str, shape: (usize, usize)| -> Result<Var> {
                let key = format!("{PEFT_PREFIX}{module}.lora_{which}.weight");
                let tensor = tensors.remove(&key).ok_or_else(|| {
                    Error::Invalid(format!(
                        "`{}`: missing tensor `{key}` (targets {:?})",
                        path.display(),
                        adapter_config.target_modules
                    ))
                })?;
                if tensor.dims() != [shape.0, shape.1] {
                    return Err(Error::Invalid(format!(
                        "`{}`: tensor `{key}` has shape {:?}, the base model and r = {rank} \
                         imply [{}, {}]",
                        path.display(),
                        tensor.dims(),
                        shape.0,
                        shape.1
                    )));
                }
                Ok(Var::from_tensor(&tensor.to_dtype(dtype)?)?)
            };
            let a = take("A", (rank, in_dim))?;
            let b = take("B", (out_dim, rank))?;
            adapters.push(Adapter { module, a, b });
        }
        if let Some(key) = tensors.keys().min() {
            return Err(Error::Invalid(format!(
                "`{}`: tensor `{key}` matches no targeted layer of the base model",
                path.display()
            )));
        }
        Ok(Self {
            base: Arc::new(base),
            adapters,
            scale: adapter_config.scale(),
            config: config.clone(),
            adapter_config,
        })
    }

    /// The trainable variables under their PEFT key names, sorted.
    pub fn vars(&self) -> Vec<(String, Var)> {
        let mut vars = Vec::with_capacity(2 * self.adapters.len());
        for adapter in &self.adapters {
            vars.push((adapter.key("A"), adapter.a.clone()));
            vars.push((adapter.key("B"), adapter.b.clone()));
        }
        vars.sort_by(|x, y| x.0.cmp(&y.0));
        vars
    }

    /// The variables in a [`candle_nn::VarMap`] (PEFT key names).
    pub fn varmap(&self) -> candle_nn::VarMap {
        let varmap = candle_nn::VarMap::new();
        if let Ok(mut data) = varmap.data().lock() {
            data.extend(self.vars());
        }
        varmap
    }

    /// The frozen base weights under their Hugging Face names.
    pub fn base_weights(&self) -> &HashMap<String, Tensor> {
        &self.base
    }

    /// The adapted modules (`model.layers.N.self_attn.q_proj`, ...), sorted.
    pub fn modules(&self) -> Vec<&str> {
        self.adapters.iter().map(|a| a.module.as_str()).collect()
    }

    /// `alpha / r` (or `alpha / sqrt(r)` for rsLoRA adapters read from disk).
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// The adapter config that [`write_adapter`] saves.
    pub fn adapter_config(&self) -> &AdapterConfig {
        &self.adapter_config
    }

    /// The network with merged weights `W + scale * B @ A`, differentiable in every `A` and `B`.
    pub fn build(&self) -> Result<CausalLm> {
        self.build_from(self.merged(false)?)
    }

    /// The network with merged weights and no graph (inference).
    pub fn build_detached(&self) -> Result<CausalLm> {
        self.build_from(self.merged(true)?)
    }

    /// Every weight of the merged model under its Hugging Face name (detached), sorted: what a
    /// full Hugging Face folder of the adapted model holds.
    pub fn merged_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let merged = self.merged(true)?;
        let mut out: Vec<(String, Tensor)> = self
            .base
            .iter()
            .map(|(name, tensor)| {
                let tensor = merged.get(name).unwrap_or(tensor).clone();
                (name.clone(), tensor)
            })
            .collect();
        out.sort_by(|x, y| x.0.cmp(&y.0));
        Ok(out)
    }

    /// The adapter tensors under their PEFT key names (detached), sorted.
    pub fn adapter_weights(&self) -> Vec<(String, Tensor)> {
        self.vars()
            .into_iter()
            .map(|(name, var)| (name, var.as_detached_tensor()))
            .collect()
    }

    fn merged(&self, detached: bool) -> Result<HashMap<String, Tensor>> {
        let mut merged = HashMap::with_capacity(self.adapters.len());
        for adapter in &self.adapters {
            let name = adapter.weight_name();
            let (a, b) = if detached {
                (
                    adapter.a.as_detached_tensor(),
                    adapter.b.as_detached_tensor(),
                )
            } else {
                (adapter.a.as_tensor().clone(), adapter.b.as_tensor().clone())
            };
            let delta = b.matmul(&a)?.affine(self.scale, 0.0)?;
            merged.insert(name.clone(), (&self.base[&name] + delta)?);
        }
        Ok(merged)
    }

    fn build_from(&self, merged: HashMap<String, Tensor>) -> Result<CausalLm> {
        let device = self
            .base
            .values()
            .next()
            .map_or(Device::Cpu, |t| t.device().clone());
        let backend = MergedBackend {
            base: Arc::clone(&self.base),
            merged,
        };
        let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, device);
        Ok(CausalLm::new(&self.config, vb)?)
    }
}

/// Answers the model's weight requests with merged tensors where adapted, base tensors elsewhere.
struct MergedBackend {
    base: Arc<HashMap<String, Tensor>>,
    merged: HashMap<String, Tensor>,
}

impl MergedBackend {
    fn lookup(&self, name: &str, dtype: DType) -> candle_core::Result<Tensor> {
        let tensor = self
            .merged
            .get(name)
            .or_else(|| self.base.get(name))
            .ok_or_else(|| {
                candle_core::Error::Msg(format!("tensor `{name}` is not in the base model"))
            })?;
        tensor.to_dtype(dtype)
    }
}

impl SimpleBackend for MergedBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        _: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.lookup(name, dtype)?;
        if tensor.shape() != &s {
            return Err(candle_core::Error::Msg(format!(
                "tensor `{name}` has shape {:?}, the config implies {:?}",
                tensor.dims(),
                s.dims()
            )));
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _: &Device) -> candle_core::Result<Tensor> {
        self.lookup(name, dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.merged.contains_key(name) || self.base.contains_key(name)
    }
}

/// The modules of `base` whose last path component is one of `targets`, with their weight's
/// `(out, in)`, sorted. Only 2-D `*.weight` tensors other than the embeddings qualify; a target
/// that matches nothing is an error listing the linear layers there are.
fn target_modules(
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

/// Every weight a trainable load of `model`'s folder yields, as plain (frozen) tensors.
pub fn frozen_weights(varmap: &candle_nn::VarMap) -> HashMap<String, Tensor> {
    named_vars(varmap)
        .into_iter()
        .map(|(name, var)| (name, var.as_detached_tensor()))
        .collect()
}

/// Writes the PEFT adapter files of `lora` (and the tokenizer files of `source_dir`) into `dir`.
pub fn write_adapter(dir: &Path, lora: &LoraModel, source_dir: &Path) -> Result<()> {
    let mut text = serde_json::to_string_pretty(lora.adapter_config())
        .map_err(|e| Error::Invalid(format!("cannot write the adapter config: {e}")))?;
    text.push('\n');
    fs_err::write(dir.join(ADAPTER_CONFIG_FILE), text)?;
    let tensors: Vec<(String, Tensor)> = lora
        .adapter_weights()
        .into_iter()
        .map(|(name, t)| Ok((name, t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes =
        safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
            .map_err(|e| Error::Invalid(format!("cannot serialise the adapter weights: {e}")))?;
    fs_err::write(dir.join(ADAPTER_WEIGHTS_FILE), bytes)?;
    for name in retort_model::save::TOKENIZER_FILES {
        let source = source_dir.join(name);
        if source.is_file() {
            fs_err::copy(&source, dir.join(name))?;
        }
    }
    Ok(())
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
/// `adapter_dir` merged into its weights, ready for inference.
pub fn load_with_adapter(
    base: &str,
    adapter_dir: &Path,
    opts: &LoadOptions,
) -> Result<LoadedModel> {
    let dir = retort_model::load::resolve_dir(base, opts.hf_cache.as_deref())?;
    let (mut model, varmap) = retort_model::load_trainable_with(&dir, opts)?;
    let lora =
        LoraModel::from_adapter_dir(frozen_weights(&varmap), &model.config, adapter_dir, None)?;
    model.model = lora.build_detached()?;
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> HashMap<String, Tensor> {
        let dev = Device::Cpu;
        let mut map = HashMap::new();
        for (name, dims) in [
            ("model.embed_tokens.weight", vec![10, 4]),
            ("model.layers.0.self_attn.q_proj.weight", vec![6, 4]),
            ("model.layers.0.self_attn.q_proj.bias", vec![6]),
            ("model.layers.0.mlp.down_proj.weight", vec![4, 8]),
            ("model.norm.weight", vec![4]),
        ] {
            map.insert(
                name.to_string(),
                Tensor::ones(dims, DType::F32, &dev).unwrap(),
            );
        }
        map
    }

    #[test]
    fn targets_match_last_component_and_unknown_ones_are_refused() {
        let chosen = target_modules(&base(), &["q_proj".into(), "down_proj".into()]).unwrap();
        assert_eq!(
            chosen.into_iter().collect::<Vec<_>>(),
            vec![
                ("model.layers.0.mlp.down_proj".to_string(), (4, 8)),
                ("model.layers.0.self_attn.q_proj".to_string(), (6, 4)),
            ]
        );
        let err = target_modules(&base(), &["qproj".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`qproj`") && err.contains("down_proj, q_proj"),
            "{err}"
        );
        let err = target_modules(&base(), &["embed_tokens".into()]).unwrap_err();
        assert!(err.to_string().contains("embed_tokens"));
    }

    #[test]
    fn base_name_from_specs() {
        assert_eq!(
            BaseName::from_spec("hf:Qwen/Qwen2.5-0.5B@main"),
            BaseName {
                name: "Qwen/Qwen2.5-0.5B".into(),
                revision: Some("main".into())
            }
        );
        assert!(Path::new(&BaseName::from_spec("some/dir").name).is_absolute());
    }
}
