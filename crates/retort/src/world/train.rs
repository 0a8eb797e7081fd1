//! `retort world train`: trains the world's tokenizer, teacher and base student from scratch and
//! writes them as Qwen2 Hugging Face folders (WORLD.md's recipe).
//!
//! A model starts from seeded ChaCha normal(0, 0.02) weights (norms 1, biases 0) and trains with
//! retort-model's [`Trainer`]: AdamW (β 0.9/0.95), linear warmup then cosine to 10%, loss on the
//! completion tokens only, `<|endoftext|>` appended. Examples are right-padded (causal attention
//! never lets a real token see the padding after it, so no mask is needed) and batched by similar
//! length to waste little compute on padding. The teacher learns [`teacher_solution`] on training
//! problems of levels 1-4; the base student learns [`student_corpus`].

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use retort_model::train::{
    AdamWConfig, LrSchedule, StepStats, TrainConfig, Trainer, causal_lm_loss_chunked, named_vars,
};
use retort_model::{CausalLm, ModelConfig, Tokenizer};
use serde::Serialize;
use serde_json::{Value, json};

use super::EOS;
use super::eval::{EvalReport, accuracy, held_out_problems};
pub use super::problems::training_problems;
use super::styles::{student_corpus, teacher_solution};
use super::tokenizer::{DEFAULT_VOCAB_SIZE, write_world_tokenizer};
use crate::{Error, Result};

/// The seed of the shipped models.
pub const DEFAULT_SEED: u64 = 1;

/// Training problems per level (1 to 4) of the shipped models.
pub const TRAIN_PER_LEVEL: usize = 10_000;

/// Label of positions without a target.
const IGNORE: i64 = -100;

/// The size of a Qwen2 model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ModelShape {
    /// `hidden_size`.
    pub hidden: usize,
    /// `num_hidden_layers`.
    pub layers: usize,
    /// `num_attention_heads`.
    pub heads: usize,
    /// `num_key_value_heads`.
    pub kv_heads: usize,
    /// `intermediate_size`.
    pub intermediate: usize,
}

/// The teacher: 1.66M parameters with a 256-id vocabulary.
pub const TEACHER_SHAPE: ModelShape = ModelShape {
    hidden: 192,
    layers: 4,
    heads: 4,
    kv_heads: 2,
    intermediate: 512,
};

/// The base student: 0.77M parameters with a 256-id vocabulary.
pub const STUDENT_SHAPE: ModelShape = ModelShape {
    hidden: 128,
    layers: 4,
    heads: 4,
    kv_heads: 2,
    intermediate: 352,
};

/// A transformers-compatible `config.json` for a tied Qwen2 model of `shape`.
pub fn qwen2_config(shape: &ModelShape, vocab_size: usize, eos_id: u32) -> Value {
    json!({
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "hidden_act": "silu",
        "hidden_size": shape.hidden,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate,
        "max_position_embeddings": 512,
        "max_window_layers": shape.layers,
        "model_type": "qwen2",
        "num_attention_heads": shape.heads,
        "num_hidden_layers": shape.layers,
        "num_key_value_heads": shape.kv_heads,
        "rms_norm_eps": 1e-6,
        "rope_scaling": null,
        "rope_theta": 10000.0,
        "sliding_window": null,
        "tie_word_embeddings": true,
        "torch_dtype": "float32",
        "transformers_version": "4.45.0",
        "use_cache": true,
        "use_sliding_window": false,
        "vocab_size": vocab_size
    })
}

/// A standard normal sample (Box-Muller) from `rng`.
fn normal(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// A fresh model from `config` with seeded weights: every matrix normal(0, 0.02) from a ChaCha8
/// stream of `seed` (variables in name order), norm weights 1, biases 0. Returns the model (its
/// weights are the variables of the returned `VarMap`) and the parsed config.
pub fn init_model(config: &Value, seed: u64) -> Result<(CausalLm, VarMap, ModelConfig)> {
    let cfg = ModelConfig::from_json(config, "<world config>")?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = CausalLm::new(&cfg, vb)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (name, var) in named_vars(&varmap) {
        let shape = var.shape().clone();
        let n = shape.elem_count();
        let values: Vec<f32> = if name.contains("norm") {
            vec![1.0; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            (0..n).map(|_| 0.02 * normal(&mut rng)).collect()
        };
        var.set(&Tensor::from_vec(values, shape, &Device::Cpu)?)?;
    }
    Ok((model, varmap, cfg))
}

/// One training example: `prompt + completion + EOS` token ids; the loss covers the ids from
/// `prompt_len` on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// All ids.
    pub ids: Vec<u32>,
    /// How many leading ids are the prompt (no loss).
    pub prompt_len: usize,
}

/// Tokenizes `(prompt, completion)` pairs, each part on its own, with the EOS id appended.
pub fn encode_examples(tokenizer: &Tokenizer, pairs: &[(String, String)]) -> Result<Vec<Example>> {
    let eos = tokenizer.token_to_id(EOS).ok_or_else(|| {
        Error::Invalid(format!(
            "tokenizer `{}` has no `{EOS}`",
            tokenizer.path().display()
        ))
    })?;
    pairs
        .iter()
        .map(|(prompt, completion)| {
            let mut ids = tokenizer.encode(prompt, false)?;
            let prompt_len = ids.len();
            ids.extend(tokenizer.encode(completion, false)?);
            ids.push(eos);
            Ok(Example { ids, prompt_len })
        })
        .collect()
}

/// Hyper-parameters of one from-scratch training run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TrainOptions {
    /// Optimizer steps (the cosine schedule spans exactly these).
    pub steps: usize,
    /// Examples per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warmup steps.
    pub warmup: usize,
    /// Final learning rate as a fraction of the peak.
    pub min_lr_ratio: f64,
    /// Clip the global gradient norm to this.
    pub max_grad_norm: f64,
    /// Seed of the initial weights and of the batch order.
    pub seed: u64,
}

impl TrainOptions {
    /// WORLD.md's optimiser: lr 2e-3, warmup 100, cosine to 10%, batch 64.
    pub fn world(steps: usize, seed: u64) -> Self {
        Self {
            steps,
            batch_size: 64,
            lr: 2e-3,
            warmup: 100,
            min_lr_ratio: 0.1,
            max_grad_norm: 1.0,
            seed,
        }
    }
}

/// What a training run did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainSummary {
    /// Steps taken.
    pub steps: usize,
    /// Mean loss of the first and the last step.
    pub first_loss: f64,
    /// Mean loss over the last 10 steps.
    pub final_loss: f64,
    /// Non-padding input tokens processed.
    pub tokens: usize,
    /// Wall seconds of the run.
    pub seconds: f64,
    /// `tokens / seconds`.
    pub tokens_per_second: f64,
}

/// Progress of a training run: the step's stats, non-padding tokens so far and seconds so far.
pub type StepCallback<'a> = dyn FnMut(&StepStats, usize, f64) + 'a;

/// Batches of example indices for `steps` steps: epochs in a seeded shuffled order, cut into
/// chunks of 16 batches, each chunk sorted by length before it is split, so a batch holds examples
/// of similar length; the batches of a chunk run in a shuffled order.
fn batch_plan(
    examples: &[Example],
    steps: usize,
    batch_size: usize,
    rng: &mut ChaCha8Rng,
) -> Vec<Vec<usize>> {
    let mut plan = Vec::with_capacity(steps);
    while plan.len() < steps {
        let mut order: Vec<usize> = (0..examples.len()).collect();
        order.shuffle(rng);
        for chunk in order.chunks(batch_size * 16) {
            let mut chunk = chunk.to_vec();
            chunk.sort_by_key(|&i| examples[i].ids.len());
            let mut batches: Vec<Vec<usize>> =
                chunk.chunks(batch_size).map(<[usize]>::to_vec).collect();
            batches.shuffle(rng);
            plan.extend(batches.into_iter().filter(|b| b.len() == batch_size));
        }
    }
    plan.truncate(steps);
    plan
}

/// Right-padded `input_ids` and `labels` (`[b, t]`) for a batch; pad id `pad`.
fn collate(examples: &[Example], batch: &[usize], pad: u32) -> Result<(Tensor, Tensor, usize)> {
    let t = batch
        .iter()
        .map(|&i| examples[i].ids.len())
        .max()
        .unwrap_or(1);
    let mut ids = Vec::with_capacity(batch.len() * t);
    let mut labels = Vec::with_capacity(batch.len() * t);
    let mut real = 0;
    for &i in batch {
        let example = &examples[i];
        real += example.ids.len();
        for position in 0..t {
            match example.ids.get(position) {
                Some(&id) => {
                    ids.push(id);
                    labels.push(if position >= example.prompt_len {
                        i64::from(id)
                    } else {
                        IGNORE
                    });
                }
                None => {
                    ids.push(pad);
                    labels.push(IGNORE);
                }
            }
        }
    }
    let shape = (batch.len(), t);
    Ok((
        Tensor::from_vec(ids, shape, &Device::Cpu)?,
        Tensor::from_vec(labels, shape, &Device::Cpu)?,
        real,
    ))
}

/// Trains `model` (whose weights are the variables of `varmap`) on `examples`.
pub fn train_lm(
    model: &CausalLm,
    varmap: &VarMap,
    examples: &[Example],
    options: &TrainOptions,
    pad_id: u32,
    on_step: &mut StepCallback<'_>,
) -> Result<TrainSummary> {
    if examples.len() < options.batch_size || options.batch_size == 0 {
        return Err(Error::Invalid(format!(
            "training needs at least one full batch: {} examples for batch size {}",
            examples.len(),
            options.batch_size
        )));
    }
    let config = TrainConfig {
        adamw: AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.01,
        },
        schedule: LrSchedule::cosine(
            options.lr,
            options.warmup,
            options.steps,
            options.min_lr_ratio,
        ),
        max_grad_norm: Some(options.max_grad_norm),
    };
    let mut trainer = Trainer::new(named_vars(varmap), config)?;
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed ^ 0x0ba7_c4e5);
    let plan = batch_plan(examples, options.steps, options.batch_size, &mut rng);
    let start = Instant::now();
    let mut tokens = 0;
    let mut losses = Vec::with_capacity(plan.len());
    for batch in &plan {
        let (input_ids, labels, real) = collate(examples, batch, pad_id)?;
        let hidden = model.forward_hidden(&input_ids, None, None)?;
        let (loss_sum, n_tokens) = causal_lm_loss_chunked(model, &hidden, &labels, None)?;
        trainer.accumulate(&loss_sum, n_tokens)?;
        let stats = trainer.step()?;
        tokens += real;
        losses.push(stats.loss);
        on_step(&stats, tokens, start.elapsed().as_secs_f64());
    }
    let seconds = start.elapsed().as_secs_f64();
    let tail = &losses[losses.len().saturating_sub(10)..];
    Ok(TrainSummary {
        steps: plan.len(),
        first_loss: losses.first().copied().unwrap_or(f64::NAN),
        final_loss: tail.iter().sum::<f64>() / tail.len().max(1) as f64,
        tokens,
        seconds,
        tokens_per_second: tokens as f64 / seconds.max(1e-9),
    })
}

/// Which models `retort world train` builds.
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorldModel {
    /// The teacher (`teacher_solution` style).
    Teacher,
    /// The base student (`student_corpus`).
    Student,
}

impl WorldModel {
    /// `teacher` or `student`: the folder name under the output folder.
    pub fn name(self) -> &'static str {
        match self {
            Self::Teacher => "teacher",
            Self::Student => "student",
        }
    }
}

/// Options of `retort world train`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorldTrainOptions {
    /// Output folder; models go to `out/teacher` and `out/student`.
    pub out: PathBuf,
    /// Seed of the training problems, tokenizer corpus, weights and batch order.
    pub seed: u64,
    /// Which models to train (the tokenizer is always rebuilt; it is deterministic).
    pub models: Vec<WorldModel>,
    /// Tokenizer vocabulary size.
    pub vocab_size: usize,
    /// Training problems per level (1 to 4).
    pub train_per_level: usize,
    /// Teacher optimisation.
    pub teacher: TrainOptions,
    /// Base student optimisation.
    pub student: TrainOptions,
    /// Held-out problems per level for the evaluation after training (0: skip it).
    pub eval_per_level: usize,
    /// Continue from the weights in `init/teacher` and `init/student` instead of a fresh
    /// initialisation (a new warmup and cosine over the given steps).
    pub init: Option<PathBuf>,
}

impl WorldTrainOptions {
    /// The shipped recipe into `out` with `seed`.
    pub fn new(out: PathBuf, seed: u64) -> Self {
        Self {
            out,
            seed,
            models: vec![WorldModel::Teacher, WorldModel::Student],
            vocab_size: DEFAULT_VOCAB_SIZE,
            train_per_level: TRAIN_PER_LEVEL,
            teacher: TrainOptions::world(1200, seed),
            student: TrainOptions::world(1500, seed.wrapping_add(1)),
            eval_per_level: 200,
            init: None,
        }
    }
}

/// One trained model: where it went, how training went and its held-out accuracy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainedModel {
    /// Which model.
    pub model: WorldModel,
    /// Its folder.
    pub dir: PathBuf,
    /// The size.
    pub shape: ModelShape,
    /// Parameter count.
    pub parameters: usize,
    /// Training examples available.
    pub examples: usize,
    /// The hyper-parameters.
    pub options: TrainOptions,
    /// The run.
    pub train: TrainSummary,
    /// Held-out accuracy on levels 1-4 and on the harder level 5.
    pub eval: Option<EvalReport>,
}

/// What `retort world train` did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorldTrainSummary {
    /// The vocabulary size of the tokenizer.
    pub vocab_size: usize,
    /// The models trained.
    pub models: Vec<TrainedModel>,
}

/// Progress of `retort world train`: a model's step, or a message.
#[derive(Debug)]
pub enum WorldEvent<'a> {
    /// A stage started (`"tokenizer"`, `"teacher"`, `"evaluate teacher"`, ...).
    Stage(&'a str),
    /// One optimizer step of a model, with non-padding tokens and seconds so far.
    Step(WorldModel, &'a StepStats, usize, f64),
}

/// Trains the tokenizer and the chosen models and writes them under `options.out`.
pub fn train_world(
    options: &WorldTrainOptions,
    on_event: &mut dyn FnMut(WorldEvent<'_>),
) -> Result<WorldTrainSummary> {
    on_event(WorldEvent::Stage("tokenizer"));
    fs_err::create_dir_all(&options.out)?;
    let staging = options.out.join(".tokenizer");
    let vocab_size = write_world_tokenizer(&staging, options.seed, options.vocab_size)?;
    let tokenizer = Tokenizer::from_dir(&staging)?;
    let eos = tokenizer
        .eos_token_id()
        .ok_or_else(|| Error::Invalid(format!("`{}`: no eos token", staging.display())))?;
    let problems = training_problems(options.seed, options.train_per_level);
    let mut trained = Vec::new();
    for &which in &options.models {
        let (shape, train_options, pairs) = match which {
            WorldModel::Teacher => {
                let pairs: Vec<(String, String)> = problems
                    .iter()
                    .map(|p| (p.prompt(), teacher_solution(p)))
                    .collect();
                (TEACHER_SHAPE, options.teacher, pairs)
            }
            WorldModel::Student => (
                STUDENT_SHAPE,
                options.student,
                student_corpus(options.seed, &problems),
            ),
        };
        on_event(WorldEvent::Stage(which.name()));
        let examples = encode_examples(&tokenizer, &pairs)?;
        let config = qwen2_config(&shape, vocab_size, eos);
        let (model, varmap, _) = init_model(&config, train_options.seed)?;
        if let Some(init) = &options.init {
            let weights = init.join(which.name()).join("model.safetensors");
            let mut varmap = varmap.clone();
            varmap.load(&weights).map_err(|e| {
                Error::Invalid(format!("cannot continue from `{}`: {e}", weights.display()))
            })?;
        }
        let parameters = named_vars(&varmap)
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum();
        let summary = train_lm(
            &model,
            &varmap,
            &examples,
            &train_options,
            eos,
            &mut |stats, tokens, seconds| {
                on_event(WorldEvent::Step(which, stats, tokens, seconds));
            },
        )?;
        let dir = options.out.join(which.name());
        save_model(&dir, &varmap, &config, &staging)?;
        let eval = if options.eval_per_level > 0 {
            on_event(WorldEvent::Stage(match which {
                WorldModel::Teacher => "evaluate teacher",
                WorldModel::Student => "evaluate student",
            }));
            let loaded = retort_model::load(&dir.to_string_lossy(), &Default::default())?;
            let held_out = held_out_problems(
                options.seed,
                options.train_per_level,
                options.eval_per_level,
            );
            Some(accuracy(&loaded.model, &loaded.tokenizer, &held_out, 128)?)
        } else {
            None
        };
        trained.push(TrainedModel {
            model: which,
            dir,
            shape,
            parameters,
            examples: examples.len(),
            options: train_options,
            train: summary,
            eval,
        });
    }
    fs_err::remove_dir_all(&staging)?;
    Ok(WorldTrainSummary {
        vocab_size,
        models: trained,
    })
}

/// Writes a trained model as a Hugging Face folder at `dir`, with the tokenizer files of
/// `tokenizer_dir` and a `generation_config.json` naming the EOS id.
pub fn save_model(dir: &Path, varmap: &VarMap, config: &Value, tokenizer_dir: &Path) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = named_vars(varmap)
        .into_iter()
        .map(|(name, var)| (name, var.as_detached_tensor()))
        .collect();
    retort_model::save::save_hf_folder_raw(dir, &tensors, config, true, tokenizer_dir)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::tokenizer::write_world_tokenizer;

    const MICRO: ModelShape = ModelShape {
        hidden: 32,
        layers: 1,
        heads: 2,
        kv_heads: 1,
        intermediate: 64,
    };

    #[test]
    fn init_is_seeded_and_a_tiny_run_lowers_the_loss() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vocab = write_world_tokenizer(dir.path(), 3, 120).expect("tokenizer");
        let tokenizer = Tokenizer::from_dir(dir.path()).expect("load");
        let config = qwen2_config(&MICRO, vocab, 0);
        let (_, a, _) = init_model(&config, 7).expect("init");
        let (_, b, _) = init_model(&config, 7).expect("init");
        for ((name, x), (_, y)) in named_vars(&a).iter().zip(named_vars(&b).iter()) {
            let diff = (x.as_tensor() - y.as_tensor())
                .expect("sub")
                .abs()
                .expect("abs");
            let max = diff
                .max_all()
                .expect("max")
                .to_scalar::<f32>()
                .expect("scalar");
            assert_eq!(max, 0.0, "{name}");
        }
        let problems = training_problems(3, 8);
        let pairs: Vec<(String, String)> = problems
            .iter()
            .map(|p| (p.prompt(), teacher_solution(p)))
            .collect();
        let examples = encode_examples(&tokenizer, &pairs).expect("encode");
        assert!(
            examples
                .iter()
                .all(|e| e.ids.last() == Some(&0) && e.prompt_len < e.ids.len())
        );
        let (model, varmap, _) = init_model(&config, 7).expect("init");
        let options = TrainOptions {
            steps: 12,
            batch_size: 8,
            lr: 1e-2,
            warmup: 2,
            ..TrainOptions::world(12, 1)
        };
        let mut losses = Vec::new();
        let summary = train_lm(&model, &varmap, &examples, &options, 0, &mut |s, _, _| {
            losses.push(s.loss)
        })
        .expect("train");
        assert_eq!(summary.steps, 12);
        assert!(losses[11] < losses[0] * 0.8, "{losses:?}");
        // The saved folder loads and computes the same logits.
        let out = tempfile::tempdir().expect("tempdir");
        let folder = out.path().join("m");
        save_model(&folder, &varmap, &config, dir.path()).expect("save");
        let loaded =
            retort_model::load(&folder.to_string_lossy(), &Default::default()).expect("load");
        let ids = Tensor::new(examples[0].ids.as_slice(), &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .expect("ids");
        let x = model.forward(&ids, None, None).expect("fwd");
        let y = loaded.model.forward(&ids, None, None).expect("fwd");
        let diff = (x - y)
            .expect("sub")
            .abs()
            .expect("abs")
            .max_all()
            .expect("max")
            .to_scalar::<f32>()
            .expect("f32");
        assert!(diff < 1e-5, "{diff}");
        assert_eq!(loaded.eos_ids(), vec![0]);
    }

    #[test]
    fn batches_have_similar_lengths_and_full_size() {
        let examples: Vec<Example> = (0..200)
            .map(|i| Example {
                ids: vec![1; 10 + i % 50],
                prompt_len: 5,
            })
            .collect();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let plan = batch_plan(&examples, 30, 8, &mut rng);
        assert_eq!(plan.len(), 30);
        assert!(plan.iter().all(|b| b.len() == 8));
        let (ids, labels, real) = collate(&examples, &plan[0], 0).expect("collate");
        assert_eq!(ids.dims2().expect("dims").0, 8);
        let labels = labels.to_vec2::<i64>().expect("labels");
        assert!(
            labels
                .iter()
                .all(|row| row[..5].iter().all(|&l| l == IGNORE))
        );
        assert_eq!(
            real,
            plan[0]
                .iter()
                .map(|&i| examples[i].ids.len())
                .sum::<usize>()
        );
    }
}
