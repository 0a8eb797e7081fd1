//! LoRA on the student: [`LoraModel`] keeps the base weights frozen and trains, for each targeted
//! linear layer `W [out, in]`, a pair `A [r, in]` (Kaiming-uniform, as PEFT initialises it) and
//! `B [out, r]` (zero), so the layer computes `x · Wᵀ + (alpha / r) · (x · Aᵀ) · Bᵀ`.
//!
//! The adapted layer itself lives in the model crate ([`retort_model::lora`]):
//! [`LoraModel::build`] builds the network with a [`LoraAdapter`] on each targeted layer, whose
//! `A`/`B` are the trainable variables. The merged weight is never formed while training and no
//! base weight takes part in autograd: the backward computes `dx` through `W` and `dA`, `dB`
//! through the two rank-`r` products. The frozen base may be held in bf16
//! ([`LoraSpec::base_dtype`]; the layers compute in f32, adapters and optimizer state stay f32).
//! Dropout on the adapter input ([`LoraSpec::dropout`]) follows PEFT and is off in
//! [`LoraModel::build_detached`], which merges `W + scale · B · A` for inference.
//!
//! Adapters are saved in PEFT's format ([`write_adapter`]): `adapter_config.json`
//! ([`AdapterConfig`]) and `adapter_model.safetensors` with keys
//! `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`. [`load_with_adapter`] reads such a
//! folder onto its base model.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
pub use retort_model::lora::{
    ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, AdapterConfig, adapter_base, load_with_adapter,
};
use retort_model::lora::{AdaptedBackend, LoraAdapter, LoraDropout, PEFT_PREFIX, target_modules};
use retort_model::train::named_vars;
use retort_model::{CausalLm, ModelConfig};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

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
    /// Dropout probability on the adapter input while training (PEFT's `lora_dropout`).
    pub dropout: f64,
    /// The dtype the frozen base's linear weights are held in (f32, or bf16 for half the memory).
    pub base_dtype: DType,
}

impl LoraSpec {
    /// `alpha / r`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// The dtype LoRA holds the frozen base's linear weights in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum LoraBaseDtype {
    /// Full precision.
    #[default]
    F32,
    /// bfloat16: half the memory; the layers widen each weight to f32 per call.
    Bf16,
}

impl LoraBaseDtype {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
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
    dropout: f64,
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
        if !(0.0..1.0).contains(&spec.dropout) {
            return Err(Error::Invalid(format!(
                "field `lora-dropout`: must be in [0, 1), got {}",
                spec.dropout
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
            let a = Tensor::from_vec(values, (spec.rank, in_dim), weight.device())?;
            let b = Tensor::zeros((out_dim, spec.rank), DType::F32, weight.device())?;
            adapters.push(Adapter {
                module,
                a: Var::from_tensor(&a)?,
                b: Var::from_tensor(&b)?,
            });
        }
        Ok(Self {
            base: Arc::new(narrow_base(base, spec.base_dtype)?),
            adapters,
            scale: spec.scale(),
            dropout: spec.dropout,
            config: config.clone(),
            adapter_config: AdapterConfig::lora(
                spec.rank,
                spec.alpha,
                spec.targets.clone(),
                spec.dropout,
                base_name.name,
                base_name.revision,
            ),
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
        let adapters = retort_model::lora::read_adapter(dir, &adapter_config, &base)?
            .into_iter()
            .map(|(module, a, b)| {
                Ok(Adapter {
                    module,
                    a: Var::from_tensor(&a)?,
                    b: Var::from_tensor(&b)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (dropout, base_dtype) = spec.map_or((0.0, DType::F32), |s| (s.dropout, s.base_dtype));
        Ok(Self {
            base: Arc::new(narrow_base(base, base_dtype)?),
            adapters,
            scale: adapter_config.scale(),
            dropout,
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

    /// The training network: each targeted layer computes `x · Wᵀ + scale · (drop(x) · Aᵀ) · Bᵀ`
    /// with `W` frozen, differentiable in every `A` and `B` and in nothing else.
    pub fn build(&self) -> Result<CausalLm> {
        // Masks are seeded from the adapters' current values: a resumed run draws the same ones
        // as an uninterrupted run without a counter in the checkpoint.
        let dropout_seed = match (self.dropout > 0.0, self.adapters.first()) {
            (true, Some(first)) => values_seed(&first.a.as_detached_tensor())?,
            _ => 0,
        };
        let adapters = self
            .adapters
            .iter()
            .enumerate()
            .map(|(i, adapter)| {
                let dropout = (self.dropout > 0.0).then(|| {
                    LoraDropout::new(
                        self.dropout,
                        dropout_seed ^ (i as u64).wrapping_mul(INIT_SALT),
                    )
                });
                let layer = LoraAdapter::new(
                    adapter.a.as_tensor().clone(),
                    adapter.b.as_tensor().clone(),
                    self.scale,
                )
                .with_dropout(dropout);
                (adapter.module.clone(), layer)
            })
            .collect();
        let vb = AdaptedBackend::var_builder(Arc::clone(&self.base), &self.device());
        Ok(retort_model::lora::build_adapted(
            &self.config,
            vb,
            adapters,
        )?)
    }

    fn device(&self) -> Device {
        self.base
            .values()
            .next()
            .map_or(Device::Cpu, |t| t.device().clone())
    }

    /// The network with merged weights and no graph (inference).
    pub fn build_detached(&self) -> Result<CausalLm> {
        self.build_from(self.merged()?)
    }

    /// Every weight of the merged model under its Hugging Face name (detached), sorted: what a
    /// full Hugging Face folder of the adapted model holds.
    pub fn merged_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let merged = self.merged()?;
        let mut out: Vec<(String, Tensor)> = self
            .base
            .iter()
            .map(|(name, tensor)| {
                let tensor = merged.get(name).unwrap_or(tensor).to_dtype(DType::F32)?;
                Ok((name.clone(), tensor))
            })
            .collect::<Result<_>>()?;
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

    /// `W + scale · B · A` of every adapted layer, detached, in f32.
    fn merged(&self) -> Result<HashMap<String, Tensor>> {
        let mut merged = HashMap::with_capacity(self.adapters.len());
        for adapter in &self.adapters {
            let name = adapter.weight_name();
            let (a, b) = (
                adapter.a.as_detached_tensor(),
                adapter.b.as_detached_tensor(),
            );
            let delta = b.matmul(&a)?.affine(self.scale, 0.0)?;
            merged.insert(
                name.clone(),
                (self.base[&name].to_dtype(DType::F32)? + delta)?,
            );
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

/// `base` with the 2-D linear weights (not the embeddings) in `dtype`; norms, biases and
/// embeddings stay as they are.
fn narrow_base(base: HashMap<String, Tensor>, dtype: DType) -> Result<HashMap<String, Tensor>> {
    base.into_iter()
        .map(|(name, tensor)| {
            let linear = tensor.rank() == 2
                && name.ends_with(".weight")
                && !name.ends_with("embed_tokens.weight");
            let tensor = if linear && tensor.dtype() != dtype {
                tensor.to_dtype(dtype)?
            } else {
                tensor
            };
            Ok((name, tensor))
        })
        .collect()
}

/// A seed from the bits of `tensor`'s values (FNV-1a).
fn values_seed(tensor: &Tensor) -> Result<u64> {
    let values = tensor
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?;
    Ok(values.iter().fold(0xcbf2_9ce4_8422_2325, |hash, v| {
        (hash ^ u64::from(v.to_bits())).wrapping_mul(0x0100_0000_01b3)
    }))
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
