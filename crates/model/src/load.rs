//! Loading a Hugging Face model folder: [`load`] for inference, [`load_trainable`] for training.
//!
//! A folder holds `config.json`, `model.safetensors` (or shards listed in
//! `model.safetensors.index.json`), `tokenizer.json`, and optionally `tokenizer_config.json`,
//! `chat_template.jinja` and `generation_config.json`. Weights are memory-mapped and cast to the
//! compute dtype (f32 on CPU); on the CPU, bf16 or f16 keeps the linear weights in that dtype
//! and computes in f32 (weight-only low precision, [`LoadOptions::dtype`]). Pickled
//! `pytorch_model.bin` checkpoints are refused: unpickling can run code.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};
use serde_json::Value;

use crate::config::{GenerationConfig, ModelConfig};
use crate::error::{Error, Result};
use crate::hub::{self, HfSpec};
use crate::models::{CausalLm, WeightStorage};
use crate::tokenizer::Tokenizer;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Where the weights go.
    pub device: Device,
    /// The model's dtype; default f32 on the CPU, the checkpoint's dtype elsewhere. On the CPU,
    /// bf16 and f16 are weight-only: the linear weights (projections and `lm_head`) are stored in
    /// that dtype and widened as the kernels read them, while activations, embeddings, norms,
    /// attention and sums stay f32 (CPU arithmetic in bf16 is slow and f16 diverges, DESIGN.md
    /// §7); a tied `lm_head` keeps its own narrow copy beside the f32 embedding. Elsewhere the
    /// whole model runs in the dtype. [`crate::CausalLm::dtype`] is the compute dtype and
    /// [`crate::CausalLm::weight_dtype`] the storage one.
    pub dtype: Option<DType>,
    /// Hugging Face hub cache for `hf:` specs; default from the environment.
    pub hf_cache: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: None,
            hf_cache: None,
        }
    }
}

/// A model ready to run, with everything read from its folder.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    /// The network.
    pub model: CausalLm,
    /// `config.json`.
    pub config: ModelConfig,
    /// Tokenizer, special tokens and chat template.
    pub tokenizer: Tokenizer,
    /// `generation_config.json` (EOS ids etc.).
    pub generation: GenerationConfig,
    /// The folder it was loaded from (the snapshot folder for `hf:` specs).
    pub dir: PathBuf,
}

impl LoadedModel {
    /// Ids that end a generation: `generation_config.json`, else `config.json`, else the
    /// tokenizer's `eos_token`.
    pub fn eos_ids(&self) -> Vec<u32> {
        if !self.generation.eos_token_ids.is_empty() {
            return self.generation.eos_token_ids.clone();
        }
        self.tokenizer.eos_token_id().into_iter().collect()
    }

    /// The id used for left padding: pad from the generation config, model config or tokenizer,
    /// else the first EOS id, else 0. Padded positions are masked, so any valid id works.
    pub fn pad_id(&self) -> u32 {
        self.generation
            .pad_token_id
            .or(self.config.pad_token_id)
            .or_else(|| self.tokenizer.pad_token_id())
            .or_else(|| self.eos_ids().first().copied())
            .unwrap_or(0)
    }
}

/// Loads `spec_or_dir`: a folder path or `hf:ORG/NAME[@REV]` from the local hub cache.
pub fn load(spec_or_dir: &str, opts: &LoadOptions) -> Result<LoadedModel> {
    let dir = resolve_dir(spec_or_dir, opts.hf_cache.as_deref())?;
    let config = read_config(&dir)?;
    let (dtype, storage) = dtypes(&config, opts);
    let weights = WeightFiles::open(&dir)?;
    let backend = FileBackend::new(weights, None);
    let used = Arc::clone(&backend.used);
    let all = backend.names();
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, opts.device.clone());
    let model = {
        let _narrow = (storage != dtype).then(|| WeightStorage::enter(storage));
        build(&config, vb, &dir)?
    };
    report_unused(&used, &all, &dir);
    finish(model, config, dir)
}

/// Loads a folder for training: every weight the model uses becomes an f32 [`Var`] in the
/// returned [`VarMap`] under its Hugging Face name (tied models: only `embed_tokens`).
pub fn load_trainable(dir: &Path) -> Result<(LoadedModel, VarMap)> {
    load_trainable_with(dir, &LoadOptions::default())
}

/// [`load_trainable`] on a chosen device (the dtype is always f32).
pub fn load_trainable_with(dir: &Path, opts: &LoadOptions) -> Result<(LoadedModel, VarMap)> {
    let dir = dir.to_path_buf();
    if !dir.is_dir() {
        return Err(Error::model(format!(
            "model folder `{}` does not exist",
            dir.display()
        )));
    }
    let config = read_config(&dir)?;
    let weights = WeightFiles::open(&dir)?;
    let varmap = VarMap::new();
    let backend = FileBackend::new(weights, Some(varmap.clone()));
    let used = Arc::clone(&backend.used);
    let all = backend.names();
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, opts.device.clone());
    let model = build(&config, vb, &dir)?;
    report_unused(&used, &all, &dir);
    Ok((finish(model, config, dir)?, varmap))
}

/// Turns a spec into a folder.
pub fn resolve_dir(spec_or_dir: &str, hf_cache: Option<&Path>) -> Result<PathBuf> {
    let dir = match HfSpec::parse(spec_or_dir) {
        Some(spec) => hub::resolve(&spec?, hf_cache)?,
        None => PathBuf::from(spec_or_dir),
    };
    if !dir.is_dir() {
        return Err(Error::model(format!(
            "model folder `{}` does not exist",
            dir.display()
        )));
    }
    Ok(dir)
}

fn read_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join("config.json");
    if !path.is_file() {
        return Err(Error::model(format!(
            "missing `config.json` in model folder `{}`",
            dir.display()
        )));
    }
    ModelConfig::from_file(&path)
}

/// The compute dtype and the storage dtype of the linear weights for a load.
fn dtypes(config: &ModelConfig, opts: &LoadOptions) -> (DType, DType) {
    match opts.dtype {
        // Weight-only on the CPU: bf16/f16 arithmetic there was slower than f32 and f16
        // diverged (DESIGN.md §7), while decoding is bound by the bytes of the weights.
        Some(d) if opts.device.is_cpu() && crate::kernels::is_half(d) => (DType::F32, d),
        Some(d) => (d, d),
        None if opts.device.is_cpu() => (DType::F32, DType::F32),
        None => {
            let d = match config.torch_dtype.as_deref() {
                Some("bfloat16") => DType::BF16,
                Some("float16") => DType::F16,
                _ => DType::F32,
            };
            (d, d)
        }
    }
}

fn build(config: &ModelConfig, vb: VarBuilder, dir: &Path) -> Result<CausalLm> {
    CausalLm::new(config, vb).map_err(|e| {
        Error::model(format!(
            "cannot load the weights of `{}`: {e}",
            dir.display()
        ))
    })
}

fn finish(model: CausalLm, config: ModelConfig, dir: PathBuf) -> Result<LoadedModel> {
    let tokenizer = Tokenizer::from_dir(&dir)?;
    let generation = GenerationConfig::from_dir(&dir, &config)?;
    if tokenizer.vocab_size() > config.vocab_size {
        tracing::warn!(
            "tokenizer of `{}` has {} tokens but the model only {} embeddings",
            dir.display(),
            tokenizer.vocab_size(),
            config.vocab_size
        );
    }
    Ok(LoadedModel {
        model,
        config,
        tokenizer,
        generation,
        dir,
    })
}

/// Logs checkpoint tensors the model did not use (e.g. `lm_head.weight` of a tied model).
fn report_unused(used: &Mutex<BTreeSet<String>>, all: &BTreeSet<String>, dir: &Path) {
    let Ok(used) = used.lock() else { return };
    let unused: Vec<&String> = all.difference(&used).collect();
    if !unused.is_empty() {
        tracing::warn!(
            "{} tensor(s) in `{}` are not used by the model: {:?}",
            unused.len(),
            dir.display(),
            unused.iter().take(5).collect::<Vec<_>>()
        );
    }
}

/// The safetensors files of a folder, memory-mapped, with a name -> file routing table.
struct WeightFiles {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    routing: HashMap<String, usize>,
}

impl WeightFiles {
    fn open(dir: &Path) -> Result<Self> {
        let paths = weight_paths(dir)?;
        let mut files = Vec::with_capacity(paths.len());
        let mut routing = HashMap::new();
        for (index, path) in paths.into_iter().enumerate() {
            let st = mmap(&path).map_err(|e| {
                Error::model(format!(
                    "cannot read safetensors file `{}`: {e}",
                    path.display()
                ))
            })?;
            for (name, _) in st.tensors() {
                routing.insert(name, index);
            }
            files.push((path, st));
        }
        Ok(Self { files, routing })
    }

    fn describe(&self) -> String {
        let names: Vec<String> = self
            .files
            .iter()
            .map(|(p, _)| format!("`{}`", p.display()))
            .collect();
        names.join(", ")
    }
}

#[expect(
    unsafe_code,
    reason = "memory-mapping a safetensors file; it must not change while loaded"
)]
fn mmap(path: &Path) -> candle_core::Result<MmapedSafetensors> {
    // SAFETY: the mapping is read-only; a checkpoint modified while loaded is out of contract.
    unsafe { MmapedSafetensors::new(path) }
}

/// The weight files of `dir`, in index order.
fn weight_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = fs_err::read_to_string(&index)?;
        let v: Value = serde_json::from_str(&text).map_err(|e| {
            Error::model(format!(
                "`{}`:{}:{}: invalid JSON: {e}",
                index.display(),
                e.line(),
                e.column()
            ))
        })?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| {
                Error::model(format!(
                    "`{}`: field `weight_map`: expected an object of tensor name -> file",
                    index.display()
                ))
            })?;
        let mut files = BTreeSet::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| {
                Error::model(format!(
                    "`{}`: field `weight_map.{name}`: expected a file name",
                    index.display()
                ))
            })?;
            files.insert(file.to_string());
        }
        let mut out = Vec::new();
        for file in files {
            let path = dir.join(&file);
            if !path.is_file() {
                return Err(Error::model(format!(
                    "`{}` lists shard `{file}`, which is missing from `{}`",
                    index.display(),
                    dir.display()
                )));
            }
            out.push(path);
        }
        return Ok(out);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    for pickled in ["pytorch_model.bin", "pytorch_model.bin.index.json"] {
        if dir.join(pickled).is_file() {
            return Err(Error::model(format!(
                "`{}` has only `{pickled}`: pickled checkpoints can run code when loaded and are refused\nhint: convert it to safetensors, e.g. `python -c \"from transformers import AutoModelForCausalLM as M; M.from_pretrained('{d}').save_pretrained('{d}', safe_serialization=True)\"`",
                dir.display(),
                d = dir.display()
            )));
        }
    }
    Err(Error::model(format!(
        "no weights in `{}`: expected `model.safetensors` or `model.safetensors.index.json`",
        dir.display()
    )))
}

/// A [`SimpleBackend`] over [`WeightFiles`] that names files in its errors, records which
/// tensors the model used, and optionally turns each into a [`Var`] of a [`VarMap`].
struct FileBackend {
    weights: WeightFiles,
    vars: Option<VarMap>,
    used: Arc<Mutex<BTreeSet<String>>>,
}

impl FileBackend {
    fn new(weights: WeightFiles, vars: Option<VarMap>) -> Self {
        Self {
            weights,
            vars,
            used: Arc::new(Mutex::new(BTreeSet::new())),
        }
    }

    fn names(&self) -> BTreeSet<String> {
        self.weights.routing.keys().cloned().collect()
    }

    fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let index = *self.weights.routing.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "tensor `{name}` not found in {}",
                self.weights.describe()
            ))
        })?;
        let (path, st) = &self.weights.files[index];
        let tensor = st
            .load(name, dev)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| {
                candle_core::Error::Msg(format!(
                    "cannot read tensor `{name}` from `{}`: {e}",
                    path.display()
                ))
            })?;
        if let Ok(mut used) = self.used.lock() {
            used.insert(name.to_string());
        }
        match &self.vars {
            None => Ok(tensor),
            Some(varmap) => {
                let var = Var::from_tensor(&tensor)?;
                let out = var.as_tensor().clone();
                varmap
                    .data()
                    .lock()
                    .map_err(|_| candle_core::Error::Msg("var map lock poisoned".into()))?
                    .insert(name.to_string(), var);
                Ok(out)
            }
        }
    }
}

impl SimpleBackend for FileBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.load(name, dtype, dev)?;
        if tensor.shape() != &s {
            let file = self
                .weights
                .routing
                .get(name)
                .map(|i| self.weights.files[*i].0.display().to_string())
                .unwrap_or_default();
            return Err(candle_core::Error::Msg(format!(
                "tensor `{name}` in `{file}` has shape {:?}, but the config implies {:?}",
                tensor.dims(),
                s.dims()
            )));
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.weights.routing.contains_key(name)
    }
}
