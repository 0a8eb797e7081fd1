//! `retort bench`: training, scoring, generation, KD and verification throughput on fixed
//! configs, printed as one JSON line shaped like `shared/bench/torch_bench.py`'s output
//! (`results.<config>.<figure>.tokens_per_s`) so the two compare key by key (DESIGN.md §7).
//!
//! The two configs ([`BENCH_TINY`], [`BENCH_SMALL`]) are Qwen2 models (untied, RoPE θ 1e4, RMSNorm
//! ε 1e-6) with random f32 weights from a seeded ChaCha stream (candle's CPU `set_seed` fails):
//! matrices `N(0, 0.02)`, norm weights 1, biases 0, as transformers initialises them. The
//! figures run the product's own code paths:
//! - `train`: [`CausalLm::forward_hidden`] + [`causal_lm_loss_chunked`] + [`Trainer`] (backward, AdamW, lr 1e-4,
//!   no weight decay) on `[batch, seq]` random ids; `tokens = batch·seq` per step.
//! - `lora`, `lora_bf16`: the `train` step through LoRA ([`LoraModel`]: rank 16, alpha 32, every
//!   projection, as `torch_bench.py`'s PEFT figure) on the same weights, the frozen base held in
//!   f32 or bf16. Both training figures report `train_state_mib`: weights, gradients and AdamW
//!   moments (for LoRA the frozen base plus the adapters with theirs), and `peak_rss_mib`, the
//!   process's peak resident memory during that figure alone (Linux, activations included).
//! - `score`: [`score_batch`] on frozen weights (plain tensors, not `Var`s); `tokens = batch·seq`.
//! - `generate_b1`, `generate_b8`: greedy [`generate`], 16-token prompt, exactly 128 new tokens
//!   (no EOS), prefill included; `tokens = batch·128`.
//! - `generate_many`: the many-streams workload of `shared/bench/gen_vs_vllm.sh` on the
//!   generation engine ([`generate_all`], default options): 16 random prompts × 16 samples,
//!   200 new tokens (no EOS), temperature 0.8; `tokens` = tokens generated. It also reports the
//!   peak key/value cache (`peak_kv_bytes`) and the same run without batch-invariant
//!   projections (`tokens_per_s_not_invariant`), so the cost of invariance reads side by side.
//! - Inference dtypes ([`BenchOptions::dtypes`], `--dtype f32,bf16`): `score` and the three
//!   generation figures run once per dtype on the same weights, the linear weights stored in that
//!   dtype and widened as read (weight-only bf16, [`WeightStorage`]); f32 under the plain key,
//!   others under `<figure>_<dtype>` (`generate_b1_bf16`) with `vs_f32`, their tokens/s over the
//!   f32 entry's of the same run. Each such entry names its `weight_dtype`.
//! - `kd_small_to_tiny`: the distillation trainer's KD step ([`objective::loss`] with
//!   [`LossSpec::Kd`]: frozen bench-small teacher and bench-tiny-shaped student, both projected
//!   to the teacher's vocabulary only at the target positions, forward KL summed per token; then
//!   [`Trainer`] backward and AdamW) on `[batch, seq]` random ids whose first token is the prompt;
//!   `tokens = batch·seq` of bench-small.
//! - `verify`: [`retort_verify::verify`] on embedded answer pairs, one thread; `pairs_per_s`.
//! - `long` (only with `--only long`, `long_train` or `long_score`; reported as
//!   `results.long.{train,score}`): the [`LONG`] shape, one 8,192-token sequence with a
//!   151,936-entry vocabulary. `train` is one SFT step through [`causal_lm_loss_chunked`] and
//!   `score` is [`score_batch`], both running the LM head in chunks of positions. Each reports
//!   `peak_rss_mib`: with [`BenchOptions::long_child`] (the CLI sets it) the figure runs in a
//!   child process of the same binary and this is the child's `VmHWM`, the whole process's peak
//!   as `torch_bench.py`'s `ru_maxrss` (run it with `--only train` or `--only score` alone to
//!   compare per figure).
//!
//! Timing follows the reference: warmup iterations (2; 1 for generation), then at least
//! [`BenchOptions::min_iters`] iterations and until [`BenchOptions::seconds`] have passed;
//! median, min and max. Training and KD entries also carry `phases_ms`, the median time of each
//! phase of a step (forward, loss, backward, optimizer), for profiling.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use retort_model::models::WeightStorage;
use retort_model::score::head_chunk_rows;
use retort_model::train::{
    AdamWConfig, LrSchedule, TrainConfig, Trainer, causal_lm_loss, causal_lm_loss_chunked,
    named_vars,
};
use retort_model::{
    CausalLm, EngineOptions, GenerationParams, ModelConfig, Request, Tokenizer, generate,
    generate_all, score_batch,
};
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::distill::data::Example;
use crate::distill::divergence::Divergence;
use crate::distill::lora::{self, BaseName, DEFAULT_TARGETS, LoraModel, LoraSpec};
use crate::distill::objective::{self, LossSpec, MicroBatch};
use crate::error::{Error, Result};

/// The candle version the workspace requires (reported in `versions`).
pub const CANDLE_VERSION: &str = "0.11.1";

/// Most timed iterations of one figure, whatever `seconds` allows.
const MAX_ITERS: usize = 200;
/// Passes over the embedded pairs per timed `verify` iteration.
const VERIFY_PASSES: usize = 10;

/// One benchmark model shape and its workload, as `torch_bench.py`'s `CONFIGS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BenchConfig {
    /// `bench-tiny` or `bench-small` (the key under `results`).
    #[serde(skip)]
    pub name: &'static str,
    /// Residual width.
    pub hidden: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// MLP inner width.
    pub intermediate: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Sequence length of the train and score batches.
    pub seq: usize,
    /// Rows of the train and score batches.
    pub batch: usize,
}

/// DESIGN.md §7 bench-tiny.
pub const BENCH_TINY: BenchConfig = BenchConfig {
    name: "bench-tiny",
    hidden: 256,
    layers: 4,
    heads: 4,
    kv_heads: 2,
    intermediate: 704,
    vocab: 512,
    seq: 128,
    batch: 8,
};

/// DESIGN.md §7 bench-small.
pub const BENCH_SMALL: BenchConfig = BenchConfig {
    name: "bench-small",
    hidden: 512,
    layers: 8,
    heads: 8,
    kv_heads: 4,
    intermediate: 1408,
    vocab: 4096,
    seq: 256,
    batch: 4,
};

/// Both fixed configs, in report order.
pub const CONFIGS: [BenchConfig; 2] = [BENCH_TINY, BENCH_SMALL];

/// A Qwen2.5-0.5B-shaped model (random weights), sized for a GPU; run only when named
/// (`--config bench-0.5b`), as `torch_bench.py`'s config of that name.
pub const BENCH_05B: BenchConfig = BenchConfig {
    name: "bench-0.5b",
    hidden: 896,
    layers: 24,
    heads: 14,
    kv_heads: 2,
    intermediate: 4864,
    vocab: 151_936,
    seq: 1024,
    batch: 8,
};

/// The `long` figures' shape (`torch_bench.py`'s `long`): one 8,192-token sequence through a
/// bench-tiny-sized model with a Qwen-sized vocabulary.
pub const LONG: BenchConfig = BenchConfig {
    name: "long",
    hidden: 256,
    layers: 4,
    heads: 4,
    kv_heads: 2,
    intermediate: 704,
    vocab: 151_936,
    seq: 8192,
    batch: 1,
};

/// Set in the environment of the child process a `long` figure runs in.
pub const LONG_CHILD_ENV: &str = "RETORT_BENCH_LONG_CHILD";

impl BenchConfig {
    /// The Qwen2 [`ModelConfig`] of this shape with vocabulary `vocab`.
    pub fn model_config(&self, vocab: usize) -> Result<ModelConfig> {
        let value = json!({
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": vocab,
            "hidden_size": self.hidden,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "intermediate_size": self.intermediate,
            "max_position_embeddings": 1024,
            "rope_theta": 10000.0,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": false,
            "use_sliding_window": false,
            "hidden_act": "silu",
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 0,
            "torch_dtype": "float32",
        });
        Ok(ModelConfig::from_json(&value, format!("<{}>", self.name))?)
    }
}

/// One measured figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Figure {
    /// Forward + loss + backward + AdamW.
    Train,
    /// As `train` through LoRA (rank 16, alpha 32, every projection), frozen f32 base.
    Lora,
    /// As `lora` with the frozen base held in bf16.
    LoraBf16,
    /// All-position log-probs, no gradient.
    Score,
    /// Greedy generation, batch 1.
    GenerateB1,
    /// Greedy generation, batch 8.
    GenerateB8,
    /// Many streams on the engine: prompts × samples, sampled.
    GenerateMany,
    /// KD step, bench-small teacher to bench-tiny-shaped student.
    Kd,
    /// Answer verification, one thread.
    Verify,
    /// [`LONG`]: one SFT step (chunked LM-head loss) on one 8k-token sequence, with its peak
    /// memory.
    LongTrain,
    /// [`LONG`]: scoring one 8k-token sequence (LM head in chunks), with its peak memory.
    LongScore,
}

impl Figure {
    /// The figures a plain `retort bench` runs, in report order (the `long` ones only on
    /// request: minutes each).
    pub const ALL: [Self; 9] = [
        Self::Train,
        Self::Lora,
        Self::LoraBf16,
        Self::Score,
        Self::GenerateB1,
        Self::GenerateB8,
        Self::GenerateMany,
        Self::Kd,
        Self::Verify,
    ];

    /// The key under `results` (per config for the first four, top level for the others).
    pub fn key(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Lora => "lora",
            Self::LoraBf16 => "lora_bf16",
            Self::Score => "score",
            Self::GenerateB1 => "generate_b1",
            Self::GenerateB8 => "generate_b8",
            Self::GenerateMany => "generate_many",
            Self::Kd => "kd_small_to_tiny",
            Self::Verify => "verify",
            Self::LongTrain => "train",
            Self::LongScore => "score",
        }
    }

    /// Figures named in `--only` (`train`, `lora`, `lora_bf16`, `score`, `generate` (all three
    /// generation figures), `generate_b1`, `generate_b8`, `generate_many`, `kd`,
    /// `kd_small_to_tiny`, `verify`, `long` (both long figures), `long_train`, `long_score`);
    /// empty means [`Figure::ALL`].
    pub fn parse_list(names: &[String]) -> Result<Vec<Self>> {
        if names.is_empty() {
            return Ok(Self::ALL.to_vec());
        }
        let mut out = Vec::new();
        for name in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
            let figures: &[Self] = match name {
                "train" => &[Self::Train],
                "lora" => &[Self::Lora],
                "lora_bf16" => &[Self::LoraBf16],
                "score" => &[Self::Score],
                "generate" => &[Self::GenerateB1, Self::GenerateB8, Self::GenerateMany],
                "generate_b1" => &[Self::GenerateB1],
                "generate_b8" => &[Self::GenerateB8],
                "generate_many" => &[Self::GenerateMany],
                "kd" | "kd_small_to_tiny" => &[Self::Kd],
                "verify" => &[Self::Verify],
                "long" => &[Self::LongTrain, Self::LongScore],
                "long_train" => &[Self::LongTrain],
                "long_score" => &[Self::LongScore],
                other => {
                    return Err(Error::Invalid(format!(
                        "unknown figure `{other}` in `--only`; expected `train`, `lora`, \
                         `lora_bf16`, `score`, `generate`, `generate_b1`, `generate_b8`, \
                         `generate_many`, `kd`, `verify`, `long`, `long_train` or `long_score`"
                    )));
                }
            };
            for f in figures {
                if !out.contains(f) {
                    out.push(*f);
                }
            }
        }
        Ok(out)
    }
}

/// What to measure and for how long.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Figures to run.
    pub figures: Vec<Figure>,
    /// Configs for `train`, `score` and the generation figures.
    pub configs: Vec<BenchConfig>,
    /// KD teacher (its vocabulary and batch shape are used).
    pub kd_teacher: BenchConfig,
    /// KD student shape (vocabulary replaced by the teacher's).
    pub kd_student: BenchConfig,
    /// Seconds of timed iterations per figure (after warmup).
    pub seconds: f64,
    /// Untimed iterations first (generation uses at most 1, as the reference).
    pub warmup: usize,
    /// Timed iterations at least.
    pub min_iters: usize,
    /// Prompt tokens of the generation figures.
    pub prompt_len: usize,
    /// New tokens per row of the generation figures.
    pub new_tokens: usize,
    /// `generate_many`: (prompts, samples per prompt, new tokens per sample).
    pub many: (usize, usize, usize),
    /// The shape of the `long` figures.
    pub long: BenchConfig,
    /// The `retort` binary to run each `long` figure in, as a child process whose peak resident
    /// memory is the figure's alone (`None`: in this process, after resetting its peak).
    pub long_child: Option<std::path::PathBuf>,
    /// Storage dtypes of the linear weights for `score` and the generation figures, each run in
    /// turn (f32, bf16 or f16; compute stays f32).
    pub dtypes: Vec<DType>,
    /// Where the models run (`cpu` or `cuda:N`).
    pub device: crate::compute::DeviceChoice,
    /// Training figures on a GPU: the matrix multiplies in this dtype (autocast), f32 weights.
    pub train_autocast: Option<DType>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            figures: Figure::ALL.to_vec(),
            configs: CONFIGS.to_vec(),
            kd_teacher: BENCH_SMALL,
            kd_student: BENCH_TINY,
            seconds: 3.0,
            warmup: 2,
            min_iters: 3,
            prompt_len: 16,
            new_tokens: 128,
            many: (16, 16, 200),
            long: LONG,
            long_child: None,
            dtypes: vec![DType::F32],
            device: crate::compute::DeviceChoice::Cpu,
            train_autocast: None,
        }
    }
}

impl BenchOptions {
    /// Sets the inference dtypes; one non-f32 dtype alone also makes training autocast in it.
    pub fn set_dtypes(&mut self, dtypes: Vec<DType>) {
        self.train_autocast = match dtypes.as_slice() {
            [only] if *only != DType::F32 => Some(*only),
            _ => None,
        };
        self.dtypes = dtypes;
    }

    /// The device of [`BenchOptions::device`], opened.
    fn device(&self) -> Result<Device> {
        self.device.device()
    }
}

impl BenchOptions {
    /// Options from the command line's `--only`, `--config` (empty: all) and `--seconds`.
    pub fn from_filters(only: &[String], configs: &[String], seconds: f64) -> Result<Self> {
        if !(seconds.is_finite() && seconds >= 0.0) {
            return Err(Error::Invalid(format!(
                "`--seconds` must be a non-negative number, got {seconds}"
            )));
        }
        let mut chosen = Vec::new();
        for name in configs.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
            let known = [BENCH_TINY, BENCH_SMALL, BENCH_05B];
            let config = known.iter().find(|c| c.name == name).ok_or_else(|| {
                Error::Invalid(format!(
                    "unknown config `{name}` in `--config`; expected `bench-tiny`, `bench-small` \
                     or `bench-0.5b`"
                ))
            })?;
            if !chosen.contains(config) {
                chosen.push(*config);
            }
        }
        Ok(Self {
            figures: Figure::parse_list(only)?,
            configs: if chosen.is_empty() {
                CONFIGS.to_vec()
            } else {
                chosen
            },
            seconds,
            ..Self::default()
        })
    }
}

/// Wall times of one figure's timed iterations.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Timing {
    /// Median seconds per iteration.
    pub median_s: f64,
    /// Fastest iteration.
    pub min_s: f64,
    /// Slowest iteration.
    pub max_s: f64,
    /// Timed iterations.
    pub iters: usize,
    /// Every iteration, rounded to 0.1 ms.
    pub times_s: Vec<f64>,
    /// Share of the whole machine's CPU used by other processes while timing (Linux).
    pub other_procs_cpu_share: Option<f64>,
}

/// Runs `step` `warmup` times, then at least `min_iters` times and until `seconds` have passed
/// (at most [`MAX_ITERS`]).
pub fn time_it(
    warmup: usize,
    min_iters: usize,
    seconds: f64,
    mut step: impl FnMut() -> Result<()>,
) -> Result<Timing> {
    for _ in 0..warmup {
        step()?;
    }
    let machine0 = machine_jiffies();
    let self0 = self_jiffies();
    let start = Instant::now();
    let mut times = Vec::new();
    while times.len() < min_iters.max(1)
        || (start.elapsed().as_secs_f64() < seconds && times.len() < MAX_ITERS)
    {
        let t0 = Instant::now();
        step()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    let other = match (machine0, machine_jiffies(), self0, self_jiffies()) {
        (Some((b0, t0)), Some((b1, t1)), Some(s0), Some(s1)) if t1 > t0 => {
            let other =
                (b1.saturating_sub(b0) as f64 - s1.saturating_sub(s0) as f64) / (t1 - t0) as f64;
            Some((other.max(0.0) * 1000.0).round() / 1000.0)
        }
        _ => None,
    };
    Ok(Timing {
        median_s: median(&times),
        min_s: times.iter().copied().fold(f64::INFINITY, f64::min),
        max_s: times.iter().copied().fold(0.0, f64::max),
        iters: times.len(),
        times_s: times.iter().map(|t| (t * 1e4).round() / 1e4).collect(),
        other_procs_cpu_share: other,
    })
}

/// Median of a non-empty slice (mean of the middle two for an even length), 0 when empty.
fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

/// (busy, total) jiffies over all CPUs from `/proc/stat`.
fn machine_jiffies() -> Option<(u64, u64)> {
    let text = fs_err::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = text
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    let total: u64 = fields.iter().sum();
    Some((total - idle, total))
}

/// This process's user + system jiffies from `/proc/self/stat`.
fn self_jiffies() -> Option<u64> {
    let text = fs_err::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Peak resident memory (`VmHWM`) in MiB, Linux only.
pub fn peak_rss_mib() -> Option<f64> {
    let text = fs_err::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The widest x86 vector extension available (`torch`'s `cpu_capability`).
fn cpu_capability() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "AVX512";
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return "AVX2";
        }
    }
    "DEFAULT"
}

/// Random weights for `cfg` in a fresh [`VarMap`] and the model reading them: matrices
/// `N(0, 0.02)`, rank-1 weights (norms) 1, biases 0, drawn in name order from ChaCha8 `seed`.
pub fn random_model(cfg: &ModelConfig, seed: u64) -> Result<(VarMap, CausalLm)> {
    random_model_on(cfg, seed, &Device::Cpu)
}

/// [`random_model`] on `device` (the same values: drawn on the CPU, then moved).
pub fn random_model_on(
    cfg: &ModelConfig,
    seed: u64,
    device: &Device,
) -> Result<(VarMap, CausalLm)> {
    let varmap = VarMap::new();
    // The default VarMap init is the constant 0; every variable is overwritten below.
    let model = CausalLm::new(cfg, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (name, var) in named_vars(&varmap) {
        let n = var.elem_count();
        let values = if var.rank() >= 2 {
            normal(&mut rng, n, 0.02)
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            vec![1.0; n]
        };
        var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu)?.to_device(device)?)?;
    }
    Ok((varmap, model))
}

/// A model with the same random weights as [`random_model`], held as plain (frozen) tensors.
pub fn frozen_model(cfg: &ModelConfig, seed: u64) -> Result<CausalLm> {
    frozen_model_as(cfg, seed, DType::F32)
}

/// [`frozen_model`] with the linear weights stored in `dtype` (compute stays f32).
pub fn frozen_model_as(cfg: &ModelConfig, seed: u64, dtype: DType) -> Result<CausalLm> {
    frozen_model_on(cfg, seed, dtype, &Device::Cpu)
}

/// [`frozen_model_as`] on `device`: on the CPU the linear weights are stored in `dtype` and the
/// compute stays f32; elsewhere the whole model is in `dtype`.
pub fn frozen_model_on(
    cfg: &ModelConfig,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<CausalLm> {
    let (varmap, _) = random_model_on(cfg, seed, device)?;
    let tensors: HashMap<String, Tensor> = named_vars(&varmap)
        .into_iter()
        .map(|(name, var)| (name, var.as_detached_tensor()))
        .collect();
    if !device.is_cpu() {
        return Ok(CausalLm::new(
            cfg,
            VarBuilder::from_tensors(tensors, dtype, device),
        )?);
    }
    let _narrow = (dtype != DType::F32).then(|| WeightStorage::enter(dtype));
    Ok(CausalLm::new(
        cfg,
        VarBuilder::from_tensors(tensors, DType::F32, device),
    )?)
}

/// The storage dtypes named in `--dtype` (`f32`, `bf16`, `f16`, in order, without repeats).
pub fn parse_dtypes(names: &[String]) -> Result<Vec<DType>> {
    let mut out = Vec::new();
    for name in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
        let dtype = match name {
            "f32" | "float32" => DType::F32,
            "bf16" | "bfloat16" => DType::BF16,
            "f16" | "float16" => DType::F16,
            other => {
                return Err(Error::Invalid(format!(
                    "unknown dtype `{other}` in `--dtype`; expected `f32`, `bf16` or `f16`"
                )));
            }
        };
        if !out.contains(&dtype) {
            out.push(dtype);
        }
    }
    if out.is_empty() {
        out.push(DType::F32);
    }
    Ok(out)
}

/// `float32`, `bfloat16`, `float16`: a dtype as PyTorch names it.
fn torch_name(dtype: DType) -> String {
    match dtype {
        DType::F32 => "float32".into(),
        DType::BF16 => "bfloat16".into(),
        DType::F16 => "float16".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// The results key of an inference figure in `dtype`: the figure's own for f32,
/// `<figure>_<dtype>` otherwise.
fn dtype_key(figure: Figure, dtype: DType) -> String {
    match dtype {
        DType::F32 => figure.key().to_string(),
        other => format!("{}_{}", figure.key(), other.as_str()),
    }
}

/// `n` draws of `N(0, std²)` (Box-Muller).
fn normal(rng: &mut ChaCha8Rng, n: usize, std: f64) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let theta = std::f64::consts::TAU * u2;
        out.push((r * theta.cos()) as f32);
        out.push((r * theta.sin()) as f32);
    }
    out.truncate(n);
    out
}

/// `[batch, seq]` random ids in `2..vocab` (as the reference: 0 and 1 are BOS/EOS).
fn random_ids(batch: usize, seq: usize, vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let high = vocab.max(3) as u32;
    (0..batch)
        .map(|_| (0..seq).map(|_| rng.random_range(2..high)).collect())
        .collect()
}

fn ids_tensor(rows: &[Vec<u32>], device: &Device) -> Result<Tensor> {
    let (b, s) = (rows.len(), rows.first().map_or(0, Vec::len));
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (b, s), device)?)
}

fn trainer_for(varmap: &VarMap) -> Result<Trainer> {
    let config = TrainConfig {
        adamw: AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
        schedule: LrSchedule::constant(1e-4),
        max_grad_norm: None,
    };
    Ok(Trainer::new(named_vars(varmap), config)?)
}

/// Times the phases of a step: `phase(i)` ends phase `i` (milliseconds since the last mark).
struct Phases {
    names: &'static [&'static str],
    rows: Vec<Vec<f64>>,
    mark: Instant,
}

impl Phases {
    fn new(names: &'static [&'static str]) -> Self {
        Self {
            names,
            rows: Vec::new(),
            mark: Instant::now(),
        }
    }

    fn start(&mut self) {
        self.rows.push(Vec::with_capacity(self.names.len()));
        self.mark = Instant::now();
    }

    fn end_phase(&mut self) {
        let now = Instant::now();
        if let Some(row) = self.rows.last_mut() {
            row.push((now - self.mark).as_secs_f64() * 1e3);
        }
        self.mark = now;
    }

    /// Median per phase over the last `iters` steps (the timed ones), in ms.
    fn medians(&self, iters: usize) -> Value {
        let timed = &self.rows[self.rows.len().saturating_sub(iters)..];
        let mut out = Map::new();
        for (i, name) in self.names.iter().enumerate() {
            let values: Vec<f64> = timed.iter().filter_map(|r| r.get(i).copied()).collect();
            out.insert(
                (*name).into(),
                json!((median(&values) * 100.0).round() / 100.0),
            );
        }
        Value::Object(out)
    }
}

fn entry(timing: &Timing, extra: Value) -> Result<Value> {
    let mut value = serde_json::to_value(timing)
        .map_err(|e| Error::Invalid(format!("cannot serialise a timing: {e}")))?;
    if let (Value::Object(map), Value::Object(extra)) = (&mut value, extra) {
        map.extend(extra);
    }
    Ok(value)
}

/// Times SFT steps (forward, the chunked LM-head loss, backward, AdamW) on `c`'s random batch,
/// phase by phase (`phases` names the four); returns the timing, the phase medians and the
/// parameter count.
fn time_sft_steps(
    c: &BenchConfig,
    o: &BenchOptions,
    (warmup, min_iters): (usize, usize),
    phases: &'static [&'static str],
) -> Result<(Timing, Value, usize)> {
    let cfg = c.model_config(c.vocab)?;
    let (varmap, model) = random_model_on(&cfg, 1, &o.device()?)?;
    let mut trainer = trainer_for(&varmap)?;
    let ids = ids_tensor(&random_ids(c.batch, c.seq, c.vocab, 11), &o.device()?)?;
    let mut phases = Phases::new(phases);
    let timing = time_it(warmup, min_iters, o.seconds, || {
        phases.start();
        let autocast = retort_model::autocast::enter(o.train_autocast);
        let hidden = model.forward_hidden(&ids, None, None)?;
        phases.end_phase();
        let (loss_sum, n_tokens) = causal_lm_loss_chunked(&model, &hidden, &ids, None)?;
        drop(autocast);
        phases.end_phase();
        trainer.accumulate(&loss_sum, n_tokens)?;
        phases.end_phase();
        trainer.step()?;
        phases.end_phase();
        Ok(())
    })?;
    let params = named_vars(&varmap)
        .iter()
        .map(|(_, v)| v.elem_count())
        .sum();
    let medians = phases.medians(timing.iters);
    Ok((timing, medians, params))
}

fn bench_train(c: &BenchConfig, o: &BenchOptions) -> Result<Value> {
    // The loss phase includes the LM head's forward and backward (chunks of positions).
    let (timing, phases, params) = time_sft_steps(
        c,
        o,
        (o.warmup, o.min_iters),
        &["forward", "loss", "backward", "optimizer"],
    )?;
    let tokens = c.batch * c.seq;
    // Weights, gradients and two AdamW moments, all f32.
    let state_bytes = params * 4 * 4;
    entry(
        &timing,
        json!({
            "tokens_per_step": tokens,
            "tokens_per_s": tokens as f64 / timing.median_s,
            "params": params,
            "train_state_mib": mib(state_bytes),
            "peak_rss_mib": peak_rss_mib(),
            "phases_ms": phases,
        }),
    )
}

/// One LoRA step (rank 16, alpha 32, every projection, as `torch_bench.py`'s PEFT figure) on a
/// base held in `base_dtype`: the same weights, batch and phases as [`bench_train`].
fn bench_lora(c: &BenchConfig, o: &BenchOptions, base_dtype: DType) -> Result<Value> {
    let cfg = c.model_config(c.vocab)?;
    let (varmap, _) = random_model_on(&cfg, 1, &o.device()?)?;
    let spec = LoraSpec {
        rank: 16,
        alpha: 32.0,
        targets: DEFAULT_TARGETS.map(String::from).to_vec(),
        dropout: 0.0,
        base_dtype,
    };
    let base = BaseName {
        name: format!("<{}>", c.name),
        revision: None,
    };
    let lora = LoraModel::new(lora::frozen_weights(&varmap), &cfg, &spec, base, 1)?;
    drop(varmap);
    // The layers hold the adapter variables' storage, which AdamW updates in place: one build
    // serves every step.
    let model = lora.build()?;
    let mut trainer = trainer_for(&lora.varmap())?;
    let ids = ids_tensor(&random_ids(c.batch, c.seq, c.vocab, 11), &o.device()?)?;
    let mut phases = Phases::new(&["forward", "loss", "backward", "optimizer"]);
    let timing = time_it(o.warmup, o.min_iters, o.seconds, || {
        phases.start();
        let logits = model.forward(&ids, None, None)?;
        phases.end_phase();
        let (loss_sum, n_tokens) = causal_lm_loss(&logits, &ids)?;
        phases.end_phase();
        trainer.accumulate(&loss_sum, n_tokens)?;
        phases.end_phase();
        trainer.step()?;
        phases.end_phase();
        Ok(())
    })?;
    let tokens = c.batch * c.seq;
    let trainable: usize = lora.vars().iter().map(|(_, v)| v.elem_count()).sum();
    let base_bytes: usize = lora
        .base_weights()
        .values()
        .map(|t| t.elem_count() * t.dtype().size_in_bytes())
        .sum();
    // The frozen base, then the adapters with their gradients and two AdamW moments (f32).
    let state_bytes = base_bytes + trainable * 4 * 4;
    entry(
        &timing,
        json!({
            "tokens_per_step": tokens,
            "tokens_per_s": tokens as f64 / timing.median_s,
            "trainable_params": trainable,
            "base_dtype": format!("{base_dtype:?}").to_lowercase(),
            "train_state_mib": mib(state_bytes),
            "peak_rss_mib": peak_rss_mib(),
            "phases_ms": phases.medians(timing.iters),
        }),
    )
}

/// Bytes in MiB, rounded to 0.01.
fn mib(bytes: usize) -> f64 {
    (bytes as f64 / (1024.0 * 1024.0) * 100.0).round() / 100.0
}

/// Resets the peak resident memory the kernel reports as `VmHWM` (Linux; elsewhere nothing), so
/// each figure's `peak_rss_mib` is its own.
fn reset_peak_rss() {
    let _ = fs_err::write("/proc/self/clear_refs", "5");
}

fn bench_score(c: &BenchConfig, o: &BenchOptions, dtype: DType) -> Result<Value> {
    let model = frozen_model_on(&c.model_config(c.vocab)?, 2, dtype, &o.device()?)?;
    // Prompt = the first token, completion = the rest: every position 0..seq-1 predicts the next.
    let items: Vec<(Vec<u32>, Vec<u32>)> = random_ids(c.batch, c.seq, c.vocab, 12)
        .into_iter()
        .map(|row| (row[..1].to_vec(), row[1..].to_vec()))
        .collect();
    let timing = time_it(o.warmup, o.min_iters, o.seconds, || {
        score_batch(&model, &items, 0)?;
        Ok(())
    })?;
    let tokens = c.batch * c.seq;
    entry(
        &timing,
        json!({"tokens_per_call": tokens, "tokens_per_s": tokens as f64 / timing.median_s}),
    )
}

/// One SFT step on one [`LONG`] sequence: [`CausalLm::forward_hidden`] +
/// [`causal_lm_loss_chunked`] (the LM head in chunks of positions, forward and backward) +
/// [`Trainer`]; one warmup step and `min_iters.min(2)` timed ones at least.
fn bench_long_train(c: &BenchConfig, o: &BenchOptions) -> Result<Value> {
    let (timing, phases, _) = time_sft_steps(
        c,
        o,
        (o.warmup.min(1), o.min_iters.min(2)),
        &["forward", "loss_and_head_backward", "backward", "optimizer"],
    )?;
    let tokens = c.batch * c.seq;
    entry(
        &timing,
        json!({
            "tokens_per_step": tokens,
            "tokens_per_s": tokens as f64 / timing.median_s,
            "head_chunk_rows": head_chunk_rows(c.vocab),
            "peak_rss_mib": peak_rss_mib(),
            "phases_ms": phases,
        }),
    )
}

/// Scoring one [`LONG`] sequence with [`score_batch`] (the LM head in chunks of positions).
fn bench_long_score(c: &BenchConfig, o: &BenchOptions) -> Result<Value> {
    let model = frozen_model_on(&c.model_config(c.vocab)?, 2, DType::F32, &o.device()?)?;
    let items: Vec<(Vec<u32>, Vec<u32>)> = random_ids(c.batch, c.seq, c.vocab, 12)
        .into_iter()
        .map(|row| (row[..1].to_vec(), row[1..].to_vec()))
        .collect();
    let timing = time_it(o.warmup.min(1), o.min_iters.min(2), o.seconds, || {
        score_batch(&model, &items, 0)?;
        Ok(())
    })?;
    let tokens = c.batch * c.seq;
    entry(
        &timing,
        json!({
            "tokens_per_call": tokens,
            "tokens_per_s": tokens as f64 / timing.median_s,
            "head_chunk_rows": head_chunk_rows(c.vocab),
            "peak_rss_mib": peak_rss_mib(),
        }),
    )
}

/// Runs one `long` figure: in a child process of `exe` (`retort bench --only long_<figure>`
/// with [`LONG_CHILD_ENV`] set), whose peak resident memory (`VmHWM` of the whole child: model,
/// weights and the figure's iterations) is reported as `peak_rss_mib`, as `torch_bench.py`
/// reports its process's `ru_maxrss`; or in this process after resetting its peak.
fn run_long(figure: Figure, o: &BenchOptions) -> Result<Value> {
    let Some(exe) = &o.long_child else {
        reset_peak_rss();
        let mut value = match figure {
            Figure::LongTrain => bench_long_train(&o.long, o)?,
            _ => bench_long_score(&o.long, o)?,
        };
        if let Value::Object(map) = &mut value {
            map.insert(
                "peak_rss_scope".into(),
                json!("this process, peak reset before the figure"),
            );
        }
        return Ok(value);
    };
    let name = format!("long_{}", figure.key());
    let output = std::process::Command::new(exe)
        .args([
            "bench",
            "--only",
            &name,
            "--seconds",
            &o.seconds.to_string(),
        ])
        .env(LONG_CHILD_ENV, "1")
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| Error::Invalid(format!("bench: cannot run `{}`: {e}", exe.display())))?;
    if !output.status.success() {
        return Err(Error::Invalid(format!(
            "bench: the child process of figure `{name}` failed ({})",
            output.status
        )));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let report: Value = text
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str(line).ok())
        .ok_or_else(|| Error::Invalid(format!("bench: figure `{name}` printed no JSON report")))?;
    let mut value = report
        .pointer(&format!("/results/{}/{}", o.long.name, figure.key()))
        .cloned()
        .ok_or_else(|| Error::Invalid(format!("bench: figure `{name}` reported no result")))?;
    if let Value::Object(map) = &mut value {
        map.insert(
            "peak_rss_mib".into(),
            report.get("peak_rss_mib").cloned().unwrap_or(Value::Null),
        );
        map.insert(
            "peak_rss_scope".into(),
            json!("child process (VmHWM of the whole process)"),
        );
    }
    Ok(value)
}

/// A tokenizer for [`generate`]'s final decode: a one-token WordLevel vocabulary (every other id
/// decodes to nothing). `retort_model::Tokenizer` loads from a file only, so it is written to a
/// fresh temporary folder and removed at once.
fn placeholder_tokenizer() -> Result<Tokenizer> {
    const JSON: &str = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
"normalizer":null,"pre_tokenizer":null,"post_processor":null,"decoder":null,
"model":{"type":"WordLevel","vocab":{"<unk>":0},"unk_token":"<unk>"}}"#;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!("retort-bench-{}-{nanos}", std::process::id()));
    fs_err::create_dir_all(&dir)?;
    let path = dir.join("tokenizer.json");
    let loaded = fs_err::write(&path, JSON)
        .map_err(Error::from)
        .and_then(|()| Tokenizer::from_file(&path).map_err(Error::from));
    // Best effort: a leftover temporary folder is harmless.
    let _ = fs_err::remove_dir_all(&dir);
    loaded
}

fn bench_generate(c: &BenchConfig, batch: usize, o: &BenchOptions, dtype: DType) -> Result<Value> {
    let model = frozen_model_on(&c.model_config(c.vocab)?, 3, dtype, &o.device()?)?;
    let tokenizer = placeholder_tokenizer()?;
    let prompts = random_ids(batch, o.prompt_len, c.vocab, 13);
    let params = GenerationParams {
        max_new_tokens: o.new_tokens,
        temperature: 0.0,
        eos_ids: Vec::new(),
        ..GenerationParams::default()
    };
    let new_tokens = o.new_tokens;
    let timing = time_it(o.warmup.min(1), o.min_iters, o.seconds, || {
        let out = generate(&model, &tokenizer, &prompts, &params)?;
        if let Some(row) = out.iter().find(|g| g.token_ids.len() != new_tokens) {
            return Err(Error::Invalid(format!(
                "bench: a row generated {} tokens, expected exactly {new_tokens}",
                row.token_ids.len()
            )));
        }
        Ok(())
    })?;
    entry(
        &timing,
        json!({
            "batch": batch,
            "new_tokens": new_tokens,
            "tokens_per_s": (batch * new_tokens) as f64 / timing.median_s,
            "ms_per_step": 1000.0 * timing.median_s / new_tokens.max(1) as f64,
        }),
    )
}

fn bench_generate_many(c: &BenchConfig, o: &BenchOptions, dtype: DType) -> Result<Value> {
    let model = frozen_model_on(&c.model_config(c.vocab)?, 3, dtype, &o.device()?)?;
    let tokenizer = placeholder_tokenizer()?;
    let (prompts, samples, new_tokens) = o.many;
    let prompts = random_ids(prompts, o.prompt_len, c.vocab, 17);
    let requests: Vec<Request> = (0..samples as u64)
        .flat_map(|sample| {
            prompts.iter().enumerate().map(move |(i, p)| Request {
                prompt: p.clone(),
                seed: 1 + i as u64,
                stream: sample,
            })
        })
        .collect();
    let params = GenerationParams {
        max_new_tokens: new_tokens,
        temperature: 0.8,
        ..GenerationParams::default()
    };
    // One timed run each (a run is ~50k tokens): invariant (the default), then not.
    let measure = |batch_invariant: bool| -> Result<(Timing, f64, usize)> {
        let options = EngineOptions {
            batch_invariant,
            ..EngineOptions::default()
        };
        let (mut tokens, mut peak) = (0, 0);
        let timing = time_it(0, 1, 0.0, || {
            let (out, stats) = generate_all(&model, &tokenizer, &requests, &params, &options)?;
            peak = stats.peak_kv_bytes();
            tokens = out.iter().map(|g| g.token_ids.len()).sum();
            Ok(())
        })?;
        let rate = tokens as f64 / timing.median_s;
        Ok((timing, rate, peak))
    };
    let (timing, rate, peak) = measure(true)?;
    let (_, fast, _) = measure(false)?;
    entry(
        &timing,
        json!({
            "sequences": requests.len(),
            "new_tokens": new_tokens,
            "tokens_per_s": rate,
            "tokens_per_s_not_invariant": fast,
            "invariance_cost": 1.0 - rate / fast,
            "peak_kv_bytes": peak,
        }),
    )
}

fn bench_kd(o: &BenchOptions) -> Result<Value> {
    let (tc, sc) = (&o.kd_teacher, &o.kd_student);
    let device = o.device()?;
    let teacher = frozen_model_on(&tc.model_config(tc.vocab)?, 4, DType::F32, &device)?;
    let (varmap, student) = random_model_on(&sc.model_config(tc.vocab)?, 5, &device)?;
    let mut trainer = trainer_for(&varmap)?;
    let (b, s) = (tc.batch, tc.seq);
    let examples: Vec<Example> = random_ids(b, s, tc.vocab, 14)
        .into_iter()
        .enumerate()
        .map(|(row, ids)| Example {
            ids,
            prompt_len: 1,
            line: row + 1,
            key: format!("bench-{row}"),
            correct: None,
        })
        .collect();
    let rows: Vec<&Example> = examples.iter().collect();
    let batch = MicroBatch::new(&rows, 0, &device)?;
    let spec = LossSpec::Kd {
        teacher: &teacher,
        divergence: Divergence::ForwardKl,
        temperature: 1.0,
        kd_weight: 1.0,
    };
    let mut phases = Phases::new(&["forward_and_loss", "backward", "optimizer"]);
    let timing = time_it(o.warmup, o.min_iters, o.seconds, || {
        phases.start();
        let terms = objective::loss(&student, &batch, &spec)?;
        phases.end_phase();
        trainer.accumulate(&terms.sum, terms.tokens)?;
        phases.end_phase();
        trainer.step()?;
        phases.end_phase();
        Ok(())
    })?;
    let count = |vm: &VarMap| -> usize { named_vars(vm).iter().map(|(_, v)| v.elem_count()).sum() };
    let teacher_params: usize = teacher_param_count(tc)?;
    entry(
        &timing,
        json!({
            "batch": b,
            "seq": s,
            "tokens_per_s": (b * s) as f64 / timing.median_s,
            "student_params": count(&varmap),
            "teacher_params": teacher_params,
            "phases_ms": phases.medians(timing.iters),
        }),
    )
}

/// Parameters of an untied Qwen2 of shape `c` (q/k/v biases included).
fn teacher_param_count(c: &BenchConfig) -> Result<usize> {
    let cfg = c.model_config(c.vocab)?;
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    let q = cfg.num_attention_heads * cfg.head_dim;
    let attention = h * q + q + 2 * (h * kv + kv) + q * h;
    let layer = attention + 3 * h * i + 2 * h;
    Ok(2 * v * h + cfg.num_hidden_layers * layer + h)
}

fn bench_verify(o: &BenchOptions) -> Result<Value> {
    let pairs = verify_pairs();
    let options = retort_verify::VerifyOptions::default();
    let mut correct = 0usize;
    let timing = time_it(o.warmup, o.min_iters, o.seconds, || {
        correct = 0;
        for _ in 0..VERIFY_PASSES {
            for (response, gold) in &pairs {
                correct += usize::from(retort_verify::verify(response, gold, &options).correct);
            }
        }
        Ok(())
    })?;
    let per_iter = pairs.len() * VERIFY_PASSES;
    entry(
        &timing,
        json!({
            "pairs": pairs.len(),
            "pairs_per_iter": per_iter,
            "correct_share": correct as f64 / per_iter.max(1) as f64,
            "pairs_per_s": per_iter as f64 / timing.median_s,
            "threads": 1,
        }),
    )
}

/// Runs the selected figures and returns the report (one JSON object); `progress` gets a line
/// per finished figure.
pub fn run(options: &BenchOptions, progress: &mut dyn FnMut(&str)) -> Result<Value> {
    let start = Instant::now();
    let wants = |f: Figure| options.figures.contains(&f);
    let mut results = Map::new();
    let mut report_line = |name: &str, figure: &str, value: &Value| {
        let rate = value
            .get("tokens_per_s")
            .map(|r| format!("{:.0} tokens/s", r.as_f64().unwrap_or(0.0)))
            .or_else(|| {
                value
                    .get("pairs_per_s")
                    .map(|r| format!("{:.0} pairs/s", r.as_f64().unwrap_or(0.0)))
            })
            .unwrap_or_default();
        let median = value.get("median_s").and_then(Value::as_f64).unwrap_or(0.0);
        let label = if name.is_empty() {
            figure.to_string()
        } else {
            format!("{name} {figure}")
        };
        let versus = value
            .get("vs_f32")
            .and_then(Value::as_f64)
            .map(|r| format!(" ({r:.2}x f32)"))
            .unwrap_or_default();
        progress(&format!(
            "{label}: {:.1} ms median, {rate}{versus}",
            median * 1e3
        ));
    };
    for c in &options.configs {
        let mut figures = Map::new();
        for figure in [
            Figure::Train,
            Figure::Lora,
            Figure::LoraBf16,
            Figure::Score,
            Figure::GenerateB1,
            Figure::GenerateB8,
            Figure::GenerateMany,
        ] {
            if !wants(figure) {
                continue;
            }
            let inference = matches!(
                figure,
                Figure::Score | Figure::GenerateB1 | Figure::GenerateB8 | Figure::GenerateMany
            );
            let dtypes = match inference {
                true => options.dtypes.as_slice(),
                false => &[DType::F32],
            };
            for &dtype in dtypes {
                reset_peak_rss();
                let mut value = match figure {
                    Figure::Train => bench_train(c, options)?,
                    Figure::Lora => bench_lora(c, options, DType::F32)?,
                    Figure::LoraBf16 => bench_lora(c, options, DType::BF16)?,
                    Figure::Score => bench_score(c, options, dtype)?,
                    Figure::GenerateB1 => bench_generate(c, 1, options, dtype)?,
                    Figure::GenerateMany => bench_generate_many(c, options, dtype)?,
                    _ => bench_generate(c, 8, options, dtype)?,
                };
                let key = dtype_key(figure, dtype);
                if inference {
                    let rate = |v: &Value| v.get("tokens_per_s").and_then(Value::as_f64);
                    let base = figures.get(figure.key()).and_then(rate);
                    let vs_f32 = match (dtype, base, rate(&value)) {
                        (DType::F32, ..) => None,
                        (_, Some(base), Some(ours)) if base > 0.0 => Some(ours / base),
                        _ => None,
                    };
                    if let Some(map) = value.as_object_mut() {
                        map.insert("weight_dtype".into(), torch_name(dtype).into());
                        if let Some(ratio) = vs_f32 {
                            map.insert("vs_f32".into(), ratio.into());
                        }
                    }
                }
                report_line(c.name, &key, &value);
                figures.insert(key, value);
            }
        }
        if !figures.is_empty() {
            results.insert(c.name.into(), Value::Object(figures));
        }
    }
    if wants(Figure::Kd) {
        let value = bench_kd(options)?;
        report_line("", Figure::Kd.key(), &value);
        results.insert(Figure::Kd.key().into(), value);
    }
    if wants(Figure::Verify) {
        let value = bench_verify(options)?;
        report_line("", Figure::Verify.key(), &value);
        results.insert(Figure::Verify.key().into(), value);
    }
    let mut long = Map::new();
    for figure in [Figure::LongTrain, Figure::LongScore] {
        if wants(figure) {
            let value = run_long(figure, options)?;
            report_line(options.long.name, figure.key(), &value);
            long.insert(figure.key().into(), value);
        }
    }
    let mut configs: Map<String, Value> = options
        .configs
        .iter()
        .map(|c| (c.name.to_string(), json!(c)))
        .collect();
    if !long.is_empty() {
        results.insert(options.long.name.into(), Value::Object(long));
        configs.insert(options.long.name.into(), json!(options.long));
    }
    Ok(json!({
        "bench": "retort",
        "versions": {"retort": env!("CARGO_PKG_VERSION"), "candle": CANDLE_VERSION},
        "threads": candle_core::utils::get_num_threads(),
        "rayon_threads": rayon::current_num_threads(),
        "cpu_capability": cpu_capability(),
        "dtype": "float32",
        "inference_weight_dtypes": options.dtypes.iter().map(|&d| torch_name(d)).collect::<Vec<_>>(),
        "configs": configs,
        "results": results,
        "total_wall_s": start.elapsed().as_secs_f64(),
        "peak_rss_mib": peak_rss_mib(),
    }))
}

/// One figure of a side-by-side comparison with a reference run (`torch_bench.py`'s output).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    /// `config/figure`, or the figure alone for `kd_small_to_tiny`.
    pub figure: String,
    /// Our tokens/s.
    pub ours: f64,
    /// The reference's tokens/s.
    pub reference: f64,
    /// `ours / reference`.
    pub ratio: f64,
}

/// Pairs every tokens/s figure of `report` with the same key in `reference` (both shaped as
/// `results.<config>.<figure>.tokens_per_s`, or `results.<figure>.tokens_per_s`); figures the
/// reference lacks are skipped.
pub fn compare(report: &Value, reference: &Value) -> Vec<Comparison> {
    let rate = |v: &Value| v.get("tokens_per_s").and_then(Value::as_f64);
    let mut out = Vec::new();
    let Some(ours) = report.get("results").and_then(Value::as_object) else {
        return out;
    };
    let theirs = reference.get("results");
    for (key, value) in ours {
        let mut push = |figure: String, ours: &Value, theirs: Option<&Value>| {
            if let (Some(a), Some(b)) = (rate(ours), theirs.and_then(rate))
                && b > 0.0
            {
                out.push(Comparison {
                    figure,
                    ours: a,
                    reference: b,
                    ratio: a / b,
                });
            }
        };
        if rate(value).is_some() {
            push(key.clone(), value, theirs.and_then(|t| t.get(key)));
        } else if let Some(figures) = value.as_object() {
            for (figure, v) in figures {
                let theirs = theirs.and_then(|t| t.get(key)).and_then(|c| c.get(figure));
                push(format!("{key}/{figure}"), v, theirs);
            }
        }
    }
    out
}

/// About three hundred (response, gold) pairs in the shapes real math answers take: integers,
/// thousands separators, fractions, decimals, roots, percents, tuples, intervals, sets,
/// polynomials, π, units, degrees, multiple choice, wrong answers and responses without an
/// answer, each after a few sentences of worked arithmetic. Deterministic.
pub fn verify_pairs() -> Vec<(String, String)> {
    let mut rng = ChaCha8Rng::seed_from_u64(0xBE4C);
    let mut pairs = Vec::with_capacity(300);
    for index in 0..300usize {
        let a: i64 = rng.random_range(2..60);
        let b: i64 = rng.random_range(2..40);
        let (gold, answer) = match index % 22 {
            0 => (a.to_string(), a.to_string()),
            1 => ((a * 1_000_003).to_string(), thousands(a * 1_000_003)),
            2 => (format!("\\frac{{{a}}}{{{b}}}"), format!("{a}/{b}")),
            3 => ("0.5".into(), "\\frac{1}{2}".into()),
            4 => (
                format!("{b}\\sqrt{{3}}"),
                format!("\\sqrt{{{}}}", 3 * b * b),
            ),
            5 => (format!("{b}\\%"), format!("{}", b as f64 / 100.0)),
            6 => (format!("({a}, {b})"), format!("({a},{b})")),
            7 => (format!("[{b}, {a})"), format!("[{b},{a})")),
            8 => (
                format!("x^2 + {}x + {}", 2 * b, b * b),
                format!("(x+{b})^2"),
            ),
            9 => (format!("\\frac{{\\pi}}{{{b}}}"), format!("\\pi/{b}")),
            10 => ("B".into(), "(B)".into()),
            11 => (a.to_string(), (a + 1).to_string()),
            12 => (a.to_string(), format!("{a} \\text{{ cm}}")),
            13 => (
                format!("\\{{{a}, {b}, {}\\}}", a + b),
                format!("\\{{{}, {b}, {a}\\}}", a + b),
            ),
            14 => (a.to_string(), String::new()),
            15 => (format!("x^2 - {}", b * b), format!("x^2 + {}", b * b)),
            16 => ("-\\frac{3}{4}".into(), "-0.75".into()),
            17 => (format!("{b}"), format!("{b}^\\circ")),
            18 => (format!("y = {a}x + {b}"), format!("y={a}x+{b}")),
            19 => (
                format!("\\begin{{pmatrix}} {a} \\\\ {b} \\end{{pmatrix}}"),
                format!("\\begin{{pmatrix}}{a}\\\\{b}\\end{{pmatrix}}"),
            ),
            20 => (format!("{a}.{b}"), format!("{a}.{b}0")),
            _ => (
                format!("\\frac{{{a}\\sqrt{{2}}}}{{{b}}}"),
                format!("{a}\\sqrt{{2}}/{b}"),
            ),
        };
        let mut response = String::new();
        for step in 0..rng.random_range(1..10) {
            let (x, y): (i64, i64) = (rng.random_range(1..500), rng.random_range(1..90));
            response.push_str(&match step % 4 {
                0 => format!("First, we compute ${x} + {y} = {}$. ", x + y),
                1 => format!("Then multiplying gives ${x} \\times {y} = {}$. ", x * y),
                2 => format!("So $\\frac{{{x}}}{{{y}}}$ is the ratio we need. "),
                _ => format!("Subtracting, {x} - {y} = {}, which we keep.\n\n", x - y),
            });
        }
        if answer.is_empty() {
            response.push_str("Now we need to check the remaining case, where");
        } else {
            response.push_str(&match index % 4 {
                0 => format!("Therefore, the final answer is $\\boxed{{{answer}}}$."),
                1 => format!("**Final Answer**\n\\[\n\\boxed{{{answer}}}\n\\]"),
                2 => format!("The answer is {answer}."),
                _ => format!("Answer: ${answer}$"),
            });
        }
        pairs.push((response, gold));
    }
    pairs
}

/// `1234567` as `1,234,567`.
fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    if n < 0 { format!("-{out}") } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shrunk shape: the same code paths in milliseconds.
    const MINI: BenchConfig = BenchConfig {
        name: "bench-mini",
        hidden: 32,
        layers: 1,
        heads: 2,
        kv_heads: 1,
        intermediate: 48,
        vocab: 64,
        seq: 12,
        batch: 2,
    };

    fn mini_options() -> BenchOptions {
        BenchOptions {
            figures: Figure::ALL.to_vec(),
            configs: vec![MINI],
            kd_teacher: BenchConfig {
                name: "bench-mini-teacher",
                hidden: 48,
                layers: 2,
                vocab: 96,
                ..MINI
            },
            kd_student: MINI,
            seconds: 0.0,
            warmup: 1,
            min_iters: 1,
            prompt_len: 3,
            new_tokens: 4,
            many: (2, 2, 4),
            long: BenchConfig {
                name: "long",
                vocab: 300,
                seq: 40,
                batch: 1,
                ..MINI
            },
            long_child: None,
            dtypes: vec![DType::F32],
            device: crate::compute::DeviceChoice::Cpu,
            train_autocast: None,
        }
    }

    fn positive(value: &Value, path: &str, key: &str) {
        let rate = value.get(key).and_then(Value::as_f64);
        assert!(
            rate.is_some_and(|r| r.is_finite() && r > 0.0),
            "{path}.{key} = {rate:?}"
        );
        for k in ["median_s", "min_s", "max_s", "iters", "times_s"] {
            assert!(value.get(k).is_some(), "{path} lacks `{k}`");
        }
    }

    #[test]
    fn comparison_pairs_figures_by_key() {
        let ours = json!({"results": {
            "bench-tiny": {"train": {"tokens_per_s": 300.0}, "score": {"tokens_per_s": 50.0}},
            "kd_small_to_tiny": {"tokens_per_s": 30.0},
            "verify": {"pairs_per_s": 9.0}
        }});
        let reference = json!({"results": {
            "bench-tiny": {"train": {"tokens_per_s": 200.0}},
            "kd_small_to_tiny": {"tokens_per_s": 60.0}
        }});
        let rows = compare(&ours, &reference);
        let got: Vec<(&str, f64)> = rows.iter().map(|r| (r.figure.as_str(), r.ratio)).collect();
        assert_eq!(
            got,
            vec![("bench-tiny/train", 1.5), ("kd_small_to_tiny", 0.5)]
        );
    }

    #[test]
    fn every_figure_reports_the_reference_shape() {
        let mut lines = Vec::new();
        let report = run(&mini_options(), &mut |l| lines.push(l.to_string())).expect("bench runs");
        let text = serde_json::to_string(&report).expect("serialises");
        assert!(!text.contains('\n'));
        for key in [
            "versions",
            "threads",
            "dtype",
            "configs",
            "results",
            "total_wall_s",
        ] {
            assert!(report.get(key).is_some(), "report lacks `{key}`");
        }
        assert_eq!(report["bench"], "retort");
        assert_eq!(report["configs"]["bench-mini"]["hidden"], 32);
        let mini = &report["results"]["bench-mini"];
        for figure in [
            "train",
            "lora",
            "lora_bf16",
            "score",
            "generate_b1",
            "generate_b8",
            "generate_many",
        ] {
            positive(&mini[figure], figure, "tokens_per_s");
        }
        assert_eq!(mini["generate_many"]["sequences"], 4);
        assert!(mini["generate_many"]["peak_kv_bytes"].as_u64() > Some(0));
        for figure in ["train", "lora", "lora_bf16"] {
            positive(&mini[figure], figure, "train_state_mib");
        }
        assert_eq!(mini["train"]["tokens_per_step"], 24);
        assert_eq!(mini["generate_b8"]["batch"], 8);
        assert!(mini["train"]["phases_ms"]["backward"].as_f64().is_some());
        positive(&report["results"]["kd_small_to_tiny"], "kd", "tokens_per_s");
        positive(&report["results"]["verify"], "verify", "pairs_per_s");
        assert_eq!(report["results"]["verify"]["threads"], 1);
        assert_eq!(lines.len(), 9, "{lines:?}");
    }

    /// The `long` figures (in this process here) report tokens/s and their peak memory under
    /// `results.long`, and only run when asked for.
    #[test]
    fn long_figures_report_speed_and_peak_memory() {
        let options = BenchOptions {
            figures: Figure::parse_list(&["long".into()]).expect("valid"),
            ..mini_options()
        };
        let report = run(&options, &mut |_| {}).expect("bench runs");
        let long = &report["results"]["long"];
        positive(&long["train"], "long.train", "tokens_per_s");
        positive(&long["score"], "long.score", "tokens_per_s");
        assert_eq!(long["train"]["tokens_per_step"], 40);
        assert_eq!(report["configs"]["long"]["vocab"], 300);
        if cfg!(target_os = "linux") {
            positive(&long["train"], "long.train", "peak_rss_mib");
            positive(&long["score"], "long.score", "peak_rss_mib");
        }
        assert!(!Figure::ALL.contains(&Figure::LongTrain));
    }

    #[test]
    fn inference_figures_run_side_by_side_in_bf16() {
        let options = BenchOptions {
            figures: vec![Figure::Train, Figure::Score, Figure::GenerateB1],
            dtypes: vec![DType::F32, DType::BF16],
            ..mini_options()
        };
        let mut lines = Vec::new();
        let report = run(&options, &mut |l| lines.push(l.to_string())).expect("bench runs");
        let mini = &report["results"]["bench-mini"];
        for figure in ["score", "generate_b1"] {
            positive(&mini[figure], figure, "tokens_per_s");
            assert_eq!(mini[figure]["weight_dtype"], "float32");
            let narrow = format!("{figure}_bf16");
            positive(&mini[&narrow], &narrow, "tokens_per_s");
            positive(&mini[&narrow], &narrow, "vs_f32");
            assert_eq!(mini[&narrow]["weight_dtype"], "bfloat16");
        }
        assert!(mini.get("train_bf16").is_none(), "training runs once");
        assert_eq!(lines.len(), 5, "{lines:?}");
        assert!(lines[4].contains("x f32)"), "{}", lines[4]);
    }

    #[test]
    fn filters_select_figures_and_configs() {
        let o = BenchOptions::from_filters(
            &["generate".into(), "kd".into()],
            &["bench-small".into()],
            1.0,
        )
        .expect("valid filters");
        assert_eq!(
            o.figures,
            vec![
                Figure::GenerateB1,
                Figure::GenerateB8,
                Figure::GenerateMany,
                Figure::Kd
            ]
        );
        assert_eq!(o.configs, vec![BENCH_SMALL]);
        assert!(BenchOptions::from_filters(&["fast".into()], &[], 1.0).is_err());
        assert!(BenchOptions::from_filters(&[], &["bench-huge".into()], 1.0).is_err());
        assert!(BenchOptions::from_filters(&[], &[], f64::NAN).is_err());
        let dtypes = parse_dtypes(&["bf16".into(), "f32".into(), "bf16".into()]).expect("valid");
        assert_eq!(dtypes, vec![DType::BF16, DType::F32]);
        assert!(parse_dtypes(&["f8".into()]).is_err());
        let all = BenchOptions::from_filters(&[], &[], 1.0).expect("defaults");
        assert_eq!(all.figures.len(), 9);
        assert_eq!(all.configs, CONFIGS.to_vec());
    }

    #[test]
    fn random_weights_are_seeded_and_shaped_like_transformers() {
        let cfg = MINI.model_config(MINI.vocab).expect("config");
        let (a, _) = random_model(&cfg, 7).expect("model");
        let (b, _) = random_model(&cfg, 7).expect("model");
        let (c, _) = random_model(&cfg, 8).expect("model");
        let get = |vm: &VarMap, name: &str| -> Vec<f32> {
            let vars = named_vars(vm);
            let var = &vars
                .iter()
                .find(|(n, _)| n == name)
                .expect("weight exists")
                .1;
            var.as_tensor()
                .flatten_all()
                .and_then(|t| t.to_vec1())
                .expect("f32")
        };
        let q = "model.layers.0.self_attn.q_proj.weight";
        assert_eq!(get(&a, q), get(&b, q));
        assert_ne!(get(&a, q), get(&c, q));
        let values = get(&a, q);
        let std = (values.iter().map(|v| v * v).sum::<f32>() / values.len() as f32).sqrt();
        assert!((std - 0.02).abs() < 0.004, "std {std}");
        assert!(get(&a, "model.norm.weight").iter().all(|&v| v == 1.0));
        assert!(
            get(&a, "model.layers.0.self_attn.q_proj.bias")
                .iter()
                .all(|&v| v == 0.0)
        );
        let params: usize = named_vars(&a).iter().map(|(_, v)| v.elem_count()).sum();
        assert_eq!(params, teacher_param_count(&MINI).expect("count"));
    }

    #[test]
    fn verify_pairs_are_varied_and_mostly_correct() {
        let pairs = verify_pairs();
        assert_eq!(pairs.len(), 300);
        let options = retort_verify::VerifyOptions::default();
        let correct = pairs
            .iter()
            .filter(|(r, g)| retort_verify::verify(r, g, &options).correct)
            .count();
        // Wrong answers and answerless responses are 3 of every 22 kinds.
        assert!((150..290).contains(&correct), "{correct} correct");
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(thousands(-1000), "-1,000");
    }
}
