//! The distillation run: [`distill`] loads the student (and teacher), tokenises the data, and
//! trains with gradient accumulation, AdamW, warmup + cosine and clipping
//! ([`retort_model::train::Trainer`]), writing `metrics.jsonl`, atomic checkpoints and the final
//! Hugging Face folder.
//!
//! Resuming is exact: the data order of an epoch is a pure function of the seed and the epoch
//! ([`super::data::epoch_batches`]), step `s` reads batch `s mod batches_per_epoch` of epoch
//! `s / batches_per_epoch`, and a checkpoint restores the weights (f32, bit for bit), the AdamW
//! moments and step count, so a run killed and resumed ends with the weights of an
//! uninterrupted one. A non-finite loss stops the run with an error before any update, leaving
//! the last checkpoint as it was.
//!
//! With `lora-rank` the trainable variables are LoRA adapters on frozen base weights
//! ([`super::lora::LoraModel`]); the network is rebuilt from them after every update, and the
//! checkpoints and output are PEFT adapter folders (plus `OUTPUT/merged` with `merge-lora`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use retort_model::train::{AdamWConfig, LrSchedule, StepStats, TrainConfig, Trainer, named_vars};
use retort_model::{CausalLm, LoadOptions, LoadedModel};
use serde::Serialize;
use serde_json::{Value, json};

use crate::distill::cache::TeacherCache;
use crate::distill::checkpoint::{
    self, ModelFiles, OPTIMIZER_FILE, RngState, TRAINER_STATE_FILE, TrainerState,
};
use crate::distill::config::{DistillOptions, Objective, OnPolicyLoss};
use crate::distill::data::{self, DataOptions, DataStats, Example, TokenizerView};
use crate::distill::lora::{self, BaseName, LoraModel};
use crate::distill::objective::{LossSpec, MicroBatch, loss, sample_completions};
use crate::distill::teacher::MissingMass;
use crate::error::{Error, Result};
use crate::io::{AtomicFile, Journal};

/// Folder of the merged model of a LoRA run with `merge-lora`, inside the output folder.
pub const MERGED_DIR: &str = "merged";

/// File name of the per-step metrics journal in the output folder.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct DistillSummary {
    /// Optimizer steps done in total (including those before a resume).
    pub steps: usize,
    /// Steps done by this call.
    pub steps_this_run: usize,
    /// The checkpoint step this call resumed from.
    pub resumed_from: Option<usize>,
    /// Training data counts.
    pub data: DataStats,
    /// Mean loss of the first step of this call.
    pub first_loss: Option<f64>,
    /// Mean loss of the last step.
    pub final_loss: Option<f64>,
    /// Held-out loss at the end (with `eval-data`).
    pub eval_loss: Option<f64>,
    /// Completion (target) tokens trained on by this call.
    pub target_tokens: usize,
    /// Sequence tokens (prompt + completion) processed per second of training.
    pub tokens_per_s: f64,
    /// Wall time of the call.
    pub wall_seconds: f64,
    /// Checkpoints written by this call.
    pub checkpoints: Vec<PathBuf>,
    /// The output folder.
    pub output: PathBuf,
    /// Whether the final model was written (false when a test hook stopped the run early).
    pub finished: bool,
}

/// Held-out loss per target token.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EvalLoss {
    /// The objective's loss.
    pub loss: f64,
    /// Cross-entropy.
    pub sft: f64,
    /// The KD divergence (KD only).
    pub kd: Option<f64>,
}

/// The student as trained, in memory.
pub struct TrainedStudent {
    /// The model (with LoRA: the merged network).
    pub model: LoadedModel,
    /// The trained variables: every weight under its Hugging Face name, or with LoRA the
    /// adapters under their PEFT key names.
    pub varmap: candle_nn::VarMap,
    /// The frozen base and the adapters of a LoRA run.
    pub lora: Option<LoraModel>,
}

/// Trains the student per `options`, calling `progress` after every optimizer step.
pub fn distill(
    options: &DistillOptions,
    progress: &mut dyn FnMut(&StepStats),
) -> Result<DistillSummary> {
    Ok(distill_trained(options, progress)?.0)
}

impl std::fmt::Debug for TrainedStudent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainedStudent")
            .field("model", &self.model.dir)
            .finish_non_exhaustive()
    }
}

/// [`distill`], also returning the trained student.
pub fn distill_trained(
    options: &DistillOptions,
    progress: &mut dyn FnMut(&StepStats),
) -> Result<(DistillSummary, TrainedStudent)> {
    let started = Instant::now();
    let (student_spec, data_path, output) = options.validate()?;
    fs_err::create_dir_all(output)?;

    let latest = checkpoint::latest_checkpoint(output)?;
    let resume_from = match (&latest, options.resume) {
        (Some(found), true) => Some(found.clone()),
        (None, true) => {
            tracing::warn!(
                "no checkpoint in `{}`: starting from the beginning",
                output.display()
            );
            None
        }
        (Some((step, _)), false) => {
            return Err(Error::Invalid(format!(
                "`{}` already holds checkpoints (latest: step {step})\nhint: pass `--resume` to \
                 continue that run, or choose another output folder",
                output.display()
            )));
        }
        (None, false) => None,
    };

    let lora_spec = options.lora();
    let student_dir = match (&resume_from, &lora_spec) {
        (Some((_, dir)), None) => dir.clone(),
        _ => retort_model::load::resolve_dir(student_spec, None)?,
    };
    let (mut student, varmap) = retort_model::load_trainable(&student_dir)?;
    // With LoRA the base weights stay frozen tensors and the trainable variables are the
    // adapters (fresh, or those of the checkpoint being resumed).
    let (varmap, lora) = match &lora_spec {
        None => (varmap, None),
        Some(spec) => {
            let base = lora::frozen_weights(&varmap);
            let adapters = match &resume_from {
                Some((_, dir)) => {
                    LoraModel::from_adapter_dir(base, &student.config, dir, Some(spec))?
                }
                None => LoraModel::new(
                    base,
                    &student.config,
                    spec,
                    BaseName::from_spec(student_spec),
                    options.seed,
                )?,
            };
            student.model = adapters.build()?;
            (adapters.varmap(), Some(adapters))
        }
    };
    let teacher_cache = match &options.teacher_cache {
        Some(dir) => {
            let cache = TeacherCache::open(dir)?;
            if cache.header().vocab_size != student.config.vocab_size {
                return Err(Error::Invalid(format!(
                    "the teacher cache `{}` has a vocabulary of {}, the student `{}` {}",
                    dir.display(),
                    cache.header().vocab_size,
                    student.dir.display(),
                    student.config.vocab_size
                )));
            }
            Some(cache)
        }
        None => None,
    };
    let teacher = match (options.objective, &teacher_cache) {
        (Objective::Kd | Objective::OnPolicy, None) => {
            let spec = options.teacher.as_deref().unwrap_or_default();
            Some(load_teacher(spec, &student)?)
        }
        _ => None,
    };

    let view = tokenizer_view(&student)?;
    let data_options = DataOptions {
        input_format: options.input_format,
        only_correct: options.only_correct,
        max_seq_len: options.max_seq_len,
    };
    let (examples, data_stats) = data::load_examples(data_path, &view, &data_options)?;
    if examples.is_empty() {
        return Err(Error::Invalid(format!(
            "`{}`: no usable training example ({} records, {} skipped by `only-correct`, {} dropped)",
            data_path.display(),
            data_stats.records,
            data_stats.skipped_incorrect,
            data_stats.dropped
        )));
    }
    let eval_examples = match &options.eval_data {
        Some(path) => Some(data::load_examples(path, &view, &data_options)?.0),
        None => None,
    };
    if options.objective == Objective::Redi {
        let eval_path = options.eval_data.as_deref().unwrap_or(data_path);
        for (path, set) in [
            (data_path, Some(&examples)),
            (eval_path, eval_examples.as_ref()),
        ] {
            if let Some(example) = set.and_then(|s| s.iter().find(|e| e.correct.is_none())) {
                return Err(Error::Input {
                    path: path.to_path_buf(),
                    line: example.line,
                    message: "missing field `verdict.correct`: objective `redi` needs a verdict \
                              on every record (run `retort verify` first)"
                        .into(),
                });
            }
        }
    }
    let lengths: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
    let batches_per_epoch = data::batches_per_epoch(examples.len(), options.batch_size);
    let total_steps = options
        .max_steps
        .unwrap_or(options.epochs * batches_per_epoch);

    let max_grad_norm = options.max_grad_norm.filter(|n| *n > 0.0);
    let config = TrainConfig {
        adamw: AdamWConfig {
            weight_decay: options.weight_decay,
            ..AdamWConfig::default()
        },
        schedule: LrSchedule::cosine(
            options.lr,
            options.warmup_steps,
            total_steps,
            options.min_lr_ratio,
        ),
        max_grad_norm,
    };
    let mut trainer = Trainer::new(named_vars(&varmap), config)?;
    let mut tokens_seen = 0;
    let start_step = match &resume_from {
        Some((step, dir)) => {
            let state = TrainerState::read(&dir.join(TRAINER_STATE_FILE))?;
            check_resumable(&state, options, batches_per_epoch, examples.len(), dir)?;
            trainer
                .optimizer_mut()
                .load_state(&dir.join(OPTIMIZER_FILE))?;
            if trainer.step_count() != *step {
                return Err(Error::Invalid(format!(
                    "`{}`: the optimizer state is at step {}, the folder name says {step}",
                    dir.display(),
                    trainer.step_count()
                )));
            }
            tokens_seen = state.tokens_seen;
            *step
        }
        None => 0,
    };
    let mut metrics = open_metrics(output, start_step)?;

    let spec = match (&teacher, options.objective) {
        (None, Objective::Kd) => LossSpec::KdCached {
            divergence: options.divergence()?,
            temperature: options.temperature,
            kd_weight: options.kd_weight,
        },
        (Some(teacher), Objective::Kd | Objective::OnPolicy) => LossSpec::Kd {
            teacher: &teacher.model,
            divergence: options.divergence()?,
            temperature: options.temperature,
            kd_weight: options.kd_weight,
        },
        (_, Objective::Redi) => LossSpec::Redi {
            negative_weight: options.redi_alpha,
        },
        _ => LossSpec::Sft,
    };
    let pad_id = student.pad_id();
    let micro = options.micro_batch();
    let device = student.model.device().clone();
    let state_at = |step: usize, tokens_seen: usize, last_loss: Option<f64>| TrainerState {
        step,
        total_steps,
        epoch: step / batches_per_epoch,
        batch_in_epoch: step % batches_per_epoch,
        batches_per_epoch,
        examples: examples.len(),
        rng: RngState {
            algorithm: "chacha8".into(),
            seed: options.seed,
            stream: (step / batches_per_epoch) as u64,
        },
        tokens_seen,
        optimizer_state: None,
        last_loss,
        config: resolved(options),
        retort_version: env!("CARGO_PKG_VERSION").into(),
    };

    let cached_eval = match (&teacher_cache, &options.eval_data) {
        (Some(cache), Some(source)) => Some(CachedTeacher {
            cache,
            source,
            missing_mass: options.missing_mass,
        }),
        _ => None,
    };
    let mut summary = DistillSummary {
        steps: start_step,
        steps_this_run: 0,
        resumed_from: resume_from.as_ref().map(|(s, _)| *s),
        data: data_stats,
        first_loss: None,
        final_loss: None,
        eval_loss: None,
        target_tokens: 0,
        tokens_per_s: 0.0,
        wall_seconds: 0.0,
        checkpoints: Vec::new(),
        output: output.to_path_buf(),
        finished: false,
    };
    let mut last_checkpoint = resume_from.as_ref().map(|(_, dir)| dir.clone());
    let mut epoch_cache: Option<(usize, Vec<Vec<usize>>)> = None;
    let mut train_seconds = 0.0;
    let mut input_tokens_total = 0usize;

    for step_index in start_step..total_steps {
        let step = step_index + 1;
        let epoch = step_index / batches_per_epoch;
        if epoch_cache.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let batches = data::epoch_batches(&lengths, options.batch_size, options.seed, epoch);
            epoch_cache = Some((epoch, batches));
        }
        let batch: &[usize] = match &epoch_cache {
            Some((_, batches)) => &batches[step_index % batches_per_epoch],
            None => unreachable!("the epoch's batches were just computed"),
        };
        let step_start = Instant::now();
        let (mut sft_sum, mut kd_sum, mut input_tokens) = (0.0, None::<f64>, 0usize);
        let mut target_tokens = 0usize;
        let mut rows: Vec<&Example> = batch.iter().map(|&i| &examples[i]).collect();
        let sampled;
        let mut sample_stats = None;
        let mut on_samples = false;
        if options.objective == Objective::OnPolicy && on_policy_step(options, step) {
            let seeds: Vec<u64> = (0..rows.len())
                .map(|row| sample_seed(options.seed, step, row))
                .collect();
            let (samples, stats) = sample_completions(
                &student,
                &rows,
                &seeds,
                options.max_new_tokens,
                options.sample_temperature,
            )?;
            if stats.truncation_rate > 0.5 {
                tracing::warn!(
                    "step {step}: {:.0}% of the student's samples ran to `max-new-tokens` ({}): \
                     runaway length (check EOS agreement with `retort check`)",
                    100.0 * stats.truncation_rate,
                    options.max_new_tokens
                );
            }
            sampled = samples;
            sample_stats = Some(stats);
            if !sampled.is_empty() {
                rows = sampled.iter().collect();
                on_samples = true;
            }
        }
        let reward = on_samples && options.on_policy_loss == OnPolicyLoss::Reward;
        let step_spec = match (&teacher, reward) {
            (Some(teacher), true) => LossSpec::OnPolicyReward {
                teacher: &teacher.model,
            },
            _ => spec,
        };
        for chunk in rows.chunks(micro) {
            let mut micro_batch = MicroBatch::new(chunk, pad_id, &device)?;
            if let Some(cache) = &teacher_cache {
                micro_batch.teacher =
                    Some(cache.signal(chunk, data_path, options.missing_mass, &device)?);
            }
            input_tokens += micro_batch.input_tokens;
            let mut terms = loss(&student.model, &micro_batch, &step_spec)?;
            if options.inject_non_finite_at_step == Some(step) {
                terms.sum = terms.sum.affine(f64::NAN, 0.0)?;
            }
            let value = scalar(&terms.sum)?;
            if !value.is_finite() {
                return Err(non_finite(
                    step,
                    &format!("loss {value}"),
                    last_checkpoint.as_deref(),
                ));
            }
            trainer
                .accumulate(&terms.sum, terms.tokens)
                .map_err(|e| non_finite(step, &e.to_string(), last_checkpoint.as_deref()))?;
            sft_sum += terms.sft_sum;
            target_tokens += terms.target_tokens;
            if let Some(kd) = terms.kd_sum {
                *kd_sum.get_or_insert(0.0) += kd;
            }
        }
        let stats = trainer
            .step()
            .map_err(|e| non_finite(step, &e.to_string(), last_checkpoint.as_deref()))?;
        if let Some(adapters) = &lora {
            // The merged weights were computed from the adapters before the update.
            student.model = adapters.build()?;
        }
        let seconds = step_start.elapsed().as_secs_f64();
        train_seconds += seconds;
        input_tokens_total += input_tokens;
        tokens_seen += target_tokens;
        summary.target_tokens += target_tokens;
        summary.steps = step;
        summary.steps_this_run += 1;
        summary.first_loss.get_or_insert(stats.loss);
        summary.final_loss = Some(stats.loss);

        let denominator = target_tokens.max(1) as f64;
        let mut line = json!({
            "step": step,
            "epoch": epoch,
            "loss": stats.loss,
            "sft_loss": sft_sum / denominator,
            "lr": stats.lr,
            "grad_norm": stats.grad_norm,
            "tokens": target_tokens,
            "input_tokens": input_tokens,
            "tokens_per_s": input_tokens as f64 / seconds.max(1e-9),
            "step_seconds": seconds,
        });
        match (kd_sum, reward) {
            (Some(kd), true) => line["reverse_kl"] = json!(kd / denominator),
            (Some(kd), false) => line["kd_loss"] = json!(kd / denominator),
            (None, _) => {}
        }
        if options.objective == Objective::OnPolicy {
            line["on_policy"] = json!(sample_stats.is_some());
            if let Some(stats) = sample_stats {
                line["sample_length"] = json!(stats.mean_length);
                line["sample_truncation_rate"] = json!(stats.truncation_rate);
                line["sample_eos_rate"] = json!(stats.eos_rate);
            }
        }
        let eval_now = options.eval_every.is_some_and(|n| step % n == 0) || step == total_steps;
        if let (Some(eval), true) = (&eval_examples, eval_now) {
            let result = evaluate(&student.model, eval, micro, pad_id, &spec, cached_eval)?;
            line["eval_loss"] = json!(result.loss);
            line["eval_sft_loss"] = json!(result.sft);
            if let Some(kd) = result.kd {
                line["eval_kd_loss"] = json!(kd);
            }
            summary.eval_loss = Some(result.loss);
        }
        metrics.append(&line)?;
        progress(&stats);

        let checkpoint_now = options.checkpoint_every.is_some_and(|n| step % n == 0);
        if checkpoint_now {
            let mut state = state_at(step, tokens_seen, Some(stats.loss));
            state.optimizer_state = Some(OPTIMIZER_FILE.into());
            let dir = match &lora {
                Some(adapters) => checkpoint::save_adapter_checkpoint(
                    output,
                    adapters,
                    &student.dir,
                    trainer.optimizer(),
                    &state,
                )?,
                None => {
                    let tensors = weights(&varmap);
                    checkpoint::save_checkpoint(
                        output,
                        &model_files(&student, &tensors),
                        trainer.optimizer(),
                        &state,
                    )?
                }
            };
            summary.checkpoints.push(dir.clone());
            last_checkpoint = Some(dir);
        }
        if options.stop_after_step == Some(step) {
            summary.tokens_per_s = input_tokens_total as f64 / train_seconds.max(1e-9);
            summary.wall_seconds = started.elapsed().as_secs_f64();
            return finish(summary, student, varmap, lora);
        }
    }

    if let (Some(eval), None) = (&eval_examples, summary.eval_loss) {
        summary.eval_loss =
            Some(evaluate(&student.model, eval, micro, pad_id, &spec, cached_eval)?.loss);
    }
    let state = state_at(total_steps, tokens_seen, summary.final_loss);
    match &lora {
        Some(adapters) => {
            if options.merge_lora {
                let tensors = adapters.merged_weights()?;
                retort_model::save::save_hf_folder_raw(
                    &output.join(MERGED_DIR),
                    &tensors,
                    &student.config.raw,
                    student.config.tie_word_embeddings,
                    &student.dir,
                )?;
            }
            checkpoint::save_final_adapter(output, adapters, &student.dir, &state)?;
        }
        None => {
            let tensors = weights(&varmap);
            checkpoint::save_final(output, &model_files(&student, &tensors), &state)?;
        }
    }
    summary.finished = true;
    summary.tokens_per_s = input_tokens_total as f64 / train_seconds.max(1e-9);
    summary.wall_seconds = started.elapsed().as_secs_f64();
    finish(summary, student, varmap, lora)
}

fn finish(
    summary: DistillSummary,
    mut student: LoadedModel,
    varmap: candle_nn::VarMap,
    lora: Option<LoraModel>,
) -> Result<(DistillSummary, TrainedStudent)> {
    if let Some(adapters) = &lora {
        student.model = adapters.build_detached()?;
    }
    Ok((
        summary,
        TrainedStudent {
            model: student,
            varmap,
            lora,
        },
    ))
}

/// Cached teacher signals for the examples of one data file.
#[derive(Debug, Clone, Copy)]
pub struct CachedTeacher<'a> {
    /// The cache.
    pub cache: &'a TeacherCache,
    /// The data file the examples come from (named in mismatch errors).
    pub source: &'a Path,
    /// The missing-mass policy of the sparse signal.
    pub missing_mass: MissingMass,
}

/// The held-out loss of `model` on `examples` (no gradient is taken); `cached` supplies the
/// teacher signal of [`LossSpec::KdCached`].
pub fn evaluate(
    model: &CausalLm,
    examples: &[Example],
    micro: usize,
    pad_id: u32,
    spec: &LossSpec<'_>,
    cached: Option<CachedTeacher<'_>>,
) -> Result<EvalLoss> {
    let mut order: Vec<&Example> = examples.iter().collect();
    order.sort_by_key(|e| e.ids.len());
    let (mut total, mut sft, mut kd, mut tokens) = (0.0, 0.0, None::<f64>, 0usize);
    let mut target_tokens = 0usize;
    for rows in order.chunks(micro.max(1)) {
        let mut batch = MicroBatch::new(rows, pad_id, model.device())?;
        if let Some(cached) = cached {
            batch.teacher = Some(cached.cache.signal(
                rows,
                cached.source,
                cached.missing_mass,
                model.device(),
            )?);
        }
        let terms = loss(model, &batch, spec)?;
        total += scalar(&terms.sum)?;
        sft += terms.sft_sum;
        if let Some(value) = terms.kd_sum {
            *kd.get_or_insert(0.0) += value;
        }
        tokens += terms.tokens;
        target_tokens += terms.target_tokens;
    }
    let targets = target_tokens.max(1) as f64;
    Ok(EvalLoss {
        loss: total / tokens.max(1) as f64,
        sft: sft / targets,
        kd: kd.map(|k| k / targets),
    })
}

/// Whether on-policy step `step` trains on student samples: a draw with probability `lambda`
/// from a stream of the seed (a pure function of seed and step).
fn on_policy_step(options: &DistillOptions, step: usize) -> bool {
    use rand::Rng;
    let mut rng = data::epoch_rng(options.seed ^ 0x6f6e_706f_6c69_6379, step);
    rng.random::<f64>() < options.lambda
}

/// The sampling seed of row `row` at step `step` (splitmix64 of the three).
fn sample_seed(seed: u64, step: usize, row: usize) -> u64 {
    let mut z = seed
        .wrapping_add((step as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .wrapping_add((row as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn scalar(tensor: &Tensor) -> Result<f64> {
    Ok(tensor
        .to_dtype(candle_core::DType::F64)?
        .reshape(())?
        .to_scalar::<f64>()?)
}

fn non_finite(step: usize, what: &str, last_checkpoint: Option<&Path>) -> Error {
    let kept = match last_checkpoint {
        Some(dir) => format!("the last good checkpoint is `{}`", dir.display()),
        None => "no checkpoint was written yet".into(),
    };
    Error::Invalid(format!(
        "training stopped at step {step}: {what}; the weights were not updated and {kept}\nhint: \
         lower `--lr`, set `--max-grad-norm`, or resume from the checkpoint with `--resume`"
    ))
}

/// The options as saved: test hooks and `resume` cleared.
fn resolved(options: &DistillOptions) -> DistillOptions {
    DistillOptions {
        resume: false,
        inject_non_finite_at_step: None,
        stop_after_step: None,
        ..options.clone()
    }
}

fn check_resumable(
    state: &TrainerState,
    options: &DistillOptions,
    batches_per_epoch: usize,
    examples: usize,
    dir: &Path,
) -> Result<()> {
    if state.examples != examples || state.batches_per_epoch != batches_per_epoch {
        return Err(Error::Invalid(format!(
            "`{}`: the checkpoint was trained on {} examples in {} batches per epoch, the data \
             now gives {examples} in {batches_per_epoch}; resuming would change the data order",
            dir.display(),
            state.examples,
            state.batches_per_epoch
        )));
    }
    let saved = resolved(&state.config);
    let now = resolved(options);
    if saved != now {
        tracing::warn!(
            "resuming `{}` with options that differ from the checkpoint's: the result will not \
             equal an uninterrupted run",
            dir.display()
        );
    }
    Ok(())
}

fn open_metrics(output: &Path, start_step: usize) -> Result<Journal> {
    let path = output.join(METRICS_FILE);
    if start_step == 0 {
        if path.exists() {
            fs_err::remove_file(&path)?;
        }
    } else if path.exists() {
        // Drop lines of steps after the checkpoint: the resumed run writes them again.
        let (journal, recovered) = Journal::open(&path)?;
        drop(journal);
        let mut text = String::new();
        for record in recovered.records {
            let step = record.get("step").and_then(Value::as_u64).unwrap_or(0);
            if step as usize <= start_step {
                text.push_str(&Value::Object(record).to_string());
                text.push('\n');
            }
        }
        AtomicFile::write_all(&path, text.as_bytes())?;
    }
    Ok(Journal::open(&path)?.0)
}

/// Loads the teacher `spec` and checks that it shares the student's vocabulary and tokenizer.
pub(crate) fn load_teacher(spec: &str, student: &LoadedModel) -> Result<LoadedModel> {
    let teacher = retort_model::load(spec, &LoadOptions::default())?;
    let hint = |what: String| {
        Error::Invalid(format!(
            "teacher `{spec}` and student `{}` {what}; token-level KD needs a shared \
             vocabulary\nhint: run `retort check --teacher {spec} --student {}` to compare them",
            student.dir.display(),
            student.dir.display()
        ))
    };
    let (tv, sv) = (teacher.config.vocab_size, student.config.vocab_size);
    if tv != sv {
        return Err(hint(format!(
            "have different vocabulary sizes ({tv} vs {sv})"
        )));
    }
    let sample = "Distillation check: 12 + 30 = 42.\nThe answer is \\boxed{42}.";
    if teacher.tokenizer.encode(sample, false)? != student.tokenizer.encode(sample, false)? {
        return Err(hint("tokenise the same text differently".into()));
    }
    Ok(teacher)
}

/// The student's tokenizer with its EOS ids, as data loading needs it.
pub(crate) fn tokenizer_view(student: &LoadedModel) -> Result<TokenizerView<'_>> {
    let mut eos_ids = student.eos_ids();
    let eos_id = student
        .tokenizer
        .eos_token_id()
        .or_else(|| eos_ids.first().copied())
        .ok_or_else(|| {
            Error::Invalid(format!(
                "student `{}` names no EOS token (tokenizer_config.json or generation_config.json)",
                student.dir.display()
            ))
        })?;
    if !eos_ids.contains(&eos_id) {
        eos_ids.push(eos_id);
    }
    Ok(TokenizerView {
        tokenizer: &student.tokenizer,
        eos_id,
        eos_ids,
    })
}

fn weights(varmap: &candle_nn::VarMap) -> Vec<(String, Tensor)> {
    named_vars(varmap)
        .into_iter()
        .map(|(name, var)| (name, var.as_detached_tensor()))
        .collect()
}

fn model_files<'a>(student: &'a LoadedModel, tensors: &'a [(String, Tensor)]) -> ModelFiles<'a> {
    ModelFiles {
        tensors,
        raw_config: &student.config.raw,
        tie_word_embeddings: student.config.tie_word_embeddings,
        source_dir: &student.dir,
    }
}
