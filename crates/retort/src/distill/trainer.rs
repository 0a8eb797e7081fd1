//! The distillation run: [`distill`] resolves the options into a [`DistillPlan`], prepares a
//! [`Run`] (student, teacher or cache, data, optimizer, resume point) and trains it step by step
//! with gradient accumulation, AdamW, warmup + cosine and clipping
//! ([`retort_model::train::Trainer`]), writing `metrics.jsonl`, atomic checkpoints and the final
//! Hugging Face folder.
//!
//! One step ([`Run::train_step`]) is: take the step's batch, sample the student's completions on
//! on-policy steps, accumulate the loss of each micro-batch, update, then log, evaluate and
//! checkpoint.
//!
//! Resuming is exact: the data order of an epoch is a pure function of the seed and the epoch
//! ([`super::data::epoch_batches`]), step `s` reads batch `s mod batches_per_epoch` of epoch
//! `s / batches_per_epoch`, and a checkpoint restores the weights (f32, bit for bit), the AdamW
//! moments and step count, so a run killed and resumed ends with the weights of an
//! uninterrupted one. A non-finite loss stops the run with an error before any update, leaving
//! the last checkpoint as it was.
//!
//! With LoRA the trainable variables are adapters on frozen base weights
//! ([`super::lora::LoraModel`]); the network is rebuilt from them after every update, and the
//! checkpoints and output are PEFT adapter folders (plus `OUTPUT/merged` with `merge-lora`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use retort_model::LoadedModel;
use retort_model::load::load_trainable_with;
use retort_model::train::{AdamWConfig, LrSchedule, StepStats, TrainConfig, Trainer, named_vars};
use serde::Serialize;
use serde_json::{Value, json};

use crate::distill::cache::TeacherCache;
use crate::distill::checkpoint::{self, ModelFiles, OPTIMIZER_FILE, RngState, TrainerState};
use crate::distill::config::{DistillOptions, OnPolicyLoss};
use crate::distill::data::{self, DataStats, Example, TokenizerView};
use crate::distill::held_out::{CachedTeacher, held_out_loss, scalar};
use crate::distill::lora::{BaseName, LoraModel};
use crate::distill::objective::{LossSpec, MicroBatch, SampleStats, loss, sample_completions};
use crate::distill::plan::{DistillPlan, LossPlan, OnPolicySampling, TeacherPlan};
use crate::distill::resume::{ResumePoint, open_metrics};
use crate::distill::teacher::{LiveTeacher, MissingMass, open_live_teacher};
use crate::error::{Error, Result};
use crate::io::Journal;
use crate::model_spec::ModelSpec;

pub use crate::distill::held_out::EvalLoss;

/// Folder of the merged model of a LoRA run with `merge-lora`, inside the output folder.
pub const MERGED_DIR: &str = "merged";

pub use crate::distill::resume::METRICS_FILE;

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
    /// Whether the final model was written (false when the run stopped early).
    pub finished: bool,
    /// Whether a stop request (Ctrl-C, SIGTERM) ended the run after a checkpoint; `--resume`
    /// continues it.
    pub interrupted: bool,
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

impl std::fmt::Debug for TrainedStudent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainedStudent")
            .field("model", &self.model.dir)
            .finish_non_exhaustive()
    }
}

/// Trains the student per `options`, calling `progress` after every optimizer step.
pub fn distill(
    options: &DistillOptions,
    progress: &mut dyn FnMut(&StepStats),
) -> Result<DistillSummary> {
    Ok(distill_trained(options, progress)?.0)
}

/// [`distill`], also returning the trained student.
pub fn distill_trained(
    options: &DistillOptions,
    progress: &mut dyn FnMut(&StepStats),
) -> Result<(DistillSummary, TrainedStudent)> {
    let plan = options.resolve()?;
    let mut run = Run::prepare(&plan)?;
    for step in run.start_step + 1..=run.total_steps {
        let stats = run.train_step(step)?;
        progress(&stats);
        if plan.hooks.stop_after_step == Some(step) {
            return run.finish();
        }
        if crate::interrupt::requested().is_some() && step < run.total_steps {
            // Stop after the step that was running, with a checkpoint to resume from.
            let written = checkpoint::checkpoint_dir(&plan.output, step);
            if run.summary.checkpoints.last() != Some(&written) {
                run.checkpoint(step, stats.loss)?;
            }
            run.summary.interrupted = true;
            return run.finish();
        }
    }
    run.save_final()?;
    run.finish()
}

/// The epoch's batches, recomputed when the epoch changes.
struct EpochBatches {
    lengths: Vec<usize>,
    batch_size: usize,
    seed: u64,
    per_epoch: usize,
    epoch: Option<usize>,
    batches: Vec<Vec<usize>>,
}

impl EpochBatches {
    /// The example indices of the batch of 0-based step `step_index`.
    fn batch(&mut self, step_index: usize) -> Vec<usize> {
        let epoch = step_index / self.per_epoch;
        if self.epoch != Some(epoch) {
            self.batches = data::epoch_batches(&self.lengths, self.batch_size, self.seed, epoch);
            self.epoch = Some(epoch);
        }
        self.batches[step_index % self.per_epoch].clone()
    }
}

/// The loaded student: its network and the variables the optimizer updates.
struct Student {
    model: LoadedModel,
    varmap: candle_nn::VarMap,
    lora: Option<LoraModel>,
}

/// Sums over one step's micro-batches.
#[derive(Debug, Default)]
struct StepTerms {
    sft_sum: f64,
    kd_sum: Option<f64>,
    input_tokens: usize,
    target_tokens: usize,
}

/// A prepared run: everything the step loop reads and updates.
pub struct Run<'p> {
    plan: &'p DistillPlan,
    started: Instant,
    student: Student,
    teacher: Option<LiveTeacher>,
    cache: Option<TeacherCache>,
    examples: Vec<Example>,
    eval_examples: Option<Vec<Example>>,
    batches: EpochBatches,
    trainer: Trainer,
    metrics: Journal,
    /// Steps the checkpoint held (0 for a fresh run).
    pub start_step: usize,
    /// Steps of the whole run.
    pub total_steps: usize,
    tokens_seen: usize,
    last_checkpoint: Option<PathBuf>,
    train_seconds: f64,
    input_tokens_total: usize,
    summary: DistillSummary,
}

impl<'p> Run<'p> {
    /// Loads the student (and LoRA adapters), the teacher or its cache and the data, builds the
    /// optimizer and restores the resume point.
    pub fn prepare(plan: &'p DistillPlan) -> Result<Self> {
        let started = Instant::now();
        fs_err::create_dir_all(&plan.output)?;
        let resume = ResumePoint::find(&plan.output, plan.resume)?;
        let student = load_student(plan, resume.as_ref())?;
        let cache = open_cache(plan, &student.model)?;
        let teacher = match plan.live_teacher() {
            Some(spec) => {
                check_served_temperature(plan, spec, student.model.config.vocab_size)?;
                Some(open_live_teacher(
                    spec,
                    &student.model,
                    plan.saved.teacher_top_k(),
                    plan.saved.missing_mass,
                    crate::distill::teacher::teacher_precision(plan.compute),
                )?)
            }
            None => None,
        };
        let (examples, eval_examples, data_stats) = load_data(plan, &student.model)?;
        let lengths: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
        let per_epoch = data::batches_per_epoch(examples.len(), plan.schedule.batch_size);
        let total_steps = plan.schedule.total_steps(per_epoch);
        let mut trainer =
            Trainer::new(named_vars(&student.varmap), train_config(plan, total_steps))?;
        let (start_step, tokens_seen) = match &resume {
            Some(point) => {
                let state = point.restore(&mut trainer, &plan.saved, per_epoch, examples.len())?;
                (point.step, state.tokens_seen)
            }
            None => (0, 0),
        };
        let metrics = open_metrics(&plan.output, start_step)?;
        Ok(Self {
            plan,
            started,
            student,
            teacher,
            cache,
            eval_examples,
            batches: EpochBatches {
                lengths,
                batch_size: plan.schedule.batch_size,
                seed: plan.schedule.seed,
                per_epoch,
                epoch: None,
                batches: Vec::new(),
            },
            trainer,
            metrics,
            start_step,
            total_steps,
            tokens_seen,
            last_checkpoint: resume.as_ref().map(|point| point.dir.clone()),
            train_seconds: 0.0,
            input_tokens_total: 0,
            summary: DistillSummary {
                steps: start_step,
                steps_this_run: 0,
                resumed_from: resume.as_ref().map(|point| point.step),
                data: data_stats,
                first_loss: None,
                final_loss: None,
                eval_loss: None,
                target_tokens: 0,
                tokens_per_s: 0.0,
                wall_seconds: 0.0,
                checkpoints: Vec::new(),
                output: plan.output.clone(),
                finished: false,
                interrupted: false,
            },
            examples,
        })
    }

    /// Trains 1-based step `step`: batch, on-policy samples, loss of each micro-batch, update,
    /// then metrics, evaluation and checkpoint.
    pub fn train_step(&mut self, step: usize) -> Result<StepStats> {
        // The examples are lent out for the step, so the step can update the rest of the run.
        let examples = std::mem::take(&mut self.examples);
        let result = self.train_step_on(step, &examples);
        self.examples = examples;
        result
    }

    fn train_step_on(&mut self, step: usize, examples: &[Example]) -> Result<StepStats> {
        let step_index = step - 1;
        let step_start = Instant::now();
        let batch = self.batches.batch(step_index);
        let rows: Vec<&Example> = batch.iter().map(|&i| &examples[i]).collect();
        let seed = self.plan.schedule.seed;
        let sampled = match self.plan.loss {
            LossPlan::OnPolicy { sampling, .. } if on_policy_step(seed, sampling.lambda, step) => {
                Some(sample_on_policy(
                    &self.student.model,
                    &rows,
                    sampling,
                    seed,
                    step,
                )?)
            }
            _ => None,
        };
        let on_samples = sampled
            .as_ref()
            .is_some_and(|(samples, _)| !samples.is_empty());
        let rows: Vec<&Example> = match &sampled {
            Some((samples, _)) if on_samples => samples.iter().collect(),
            _ => rows,
        };
        let reward = on_samples
            && matches!(
                self.plan.loss,
                LossPlan::OnPolicy { sampling, .. } if sampling.loss == OnPolicyLoss::Reward
            );
        let terms = self.accumulate(step, &rows, reward)?;
        let stats = self
            .trainer
            .step()
            .map_err(|e| non_finite(step, &e.to_string(), self.last_checkpoint.as_deref()))?;
        if let Some(adapters) = &self.student.lora {
            // Rebuilt after each update: it draws the next step's dropout masks.
            self.student.model.model = adapters.build()?;
        }
        let seconds = step_start.elapsed().as_secs_f64();
        self.count(step, &stats, &terms, seconds);
        let mut line = metrics_line(
            step,
            step_index / self.batches.per_epoch,
            &stats,
            &terms,
            seconds,
        );
        match (terms.kd_sum, reward) {
            (Some(kd), true) => line["reverse_kl"] = json!(kd / terms.target_tokens.max(1) as f64),
            (Some(kd), false) => line["kd_loss"] = json!(kd / terms.target_tokens.max(1) as f64),
            (None, _) => {}
        }
        if let LossPlan::OnPolicy { .. } = self.plan.loss {
            line["on_policy"] = json!(sampled.is_some());
            if let Some((_, sample_stats)) = &sampled {
                line["sample_length"] = json!(sample_stats.mean_length);
                line["sample_truncation_rate"] = json!(sample_stats.truncation_rate);
                line["sample_eos_rate"] = json!(sample_stats.eos_rate);
            }
        }
        let eval_now = self.plan.eval_every.is_some_and(|n| step.is_multiple_of(n))
            || step == self.total_steps;
        if eval_now && let Some(result) = self.held_out()? {
            line["eval_loss"] = json!(result.loss);
            line["eval_sft_loss"] = json!(result.sft);
            if let Some(kd) = result.kd {
                line["eval_kd_loss"] = json!(kd);
            }
            self.summary.eval_loss = Some(result.loss);
        }
        self.metrics.append(&line)?;
        if self
            .plan
            .checkpoint_every
            .is_some_and(|n| step.is_multiple_of(n))
        {
            self.checkpoint(step, stats.loss)?;
        }
        Ok(stats)
    }

    /// The loss spec of a step: the objective's, or the reward form on on-policy samples.
    fn loss_spec(&self, reward: bool) -> LossSpec<'_> {
        loss_spec(self.plan.loss, self.teacher.as_ref(), reward)
    }

    /// Accumulates the gradient of every micro-batch of `rows`; a non-finite loss stops the run
    /// before the update.
    fn accumulate(&mut self, step: usize, rows: &[&Example], reward: bool) -> Result<StepTerms> {
        let spec = loss_spec(self.plan.loss, self.teacher.as_ref(), reward);
        let pad_id = self.student.model.pad_id();
        let device = self.student.model.model.device().clone();
        let mut terms = StepTerms::default();
        for chunk in rows.chunks(self.plan.schedule.micro_batch) {
            let mut micro_batch = MicroBatch::new(chunk, pad_id, &device)?;
            if let (Some(cache), TeacherPlan::Cache { missing_mass, .. }) =
                (&self.cache, &self.plan.teacher)
            {
                micro_batch.teacher =
                    Some(cache.signal(chunk, &self.plan.data, *missing_mass, &device)?);
            }
            if let Some(LiveTeacher::Remote(remote)) = &self.teacher {
                match spec {
                    LossSpec::KdCached { .. } => {
                        micro_batch.teacher = Some(remote.signal(chunk, &device)?);
                    }
                    LossSpec::OnPolicyRewardScored => {
                        micro_batch.teacher_target_logprobs =
                            Some(remote.target_logprobs(chunk, &device)?);
                    }
                    _ => {}
                }
            }
            terms.input_tokens += micro_batch.input_tokens;
            let mut loss_terms = {
                // bf16/f16 training: the forward's matrix multiplies (and so the backward's).
                let _autocast = retort_model::autocast::enter(self.plan.compute.autocast());
                loss(&self.student.model.model, &micro_batch, &spec)?
            };
            if self.plan.hooks.inject_non_finite_at_step == Some(step) {
                loss_terms.sum = loss_terms.sum.affine(f64::NAN, 0.0)?;
            }
            let value = scalar(&loss_terms.sum)?;
            if !value.is_finite() {
                return Err(non_finite(
                    step,
                    &format!("loss {value}"),
                    self.last_checkpoint.as_deref(),
                ));
            }
            self.trainer
                .accumulate(&loss_terms.sum, loss_terms.tokens)
                .map_err(|e| non_finite(step, &e.to_string(), self.last_checkpoint.as_deref()))?;
            terms.sft_sum += loss_terms.sft_sum;
            terms.target_tokens += loss_terms.target_tokens;
            if let Some(kd) = loss_terms.kd_sum {
                *terms.kd_sum.get_or_insert(0.0) += kd;
            }
        }
        Ok(terms)
    }

    /// Adds a finished step to the totals.
    fn count(&mut self, step: usize, stats: &StepStats, terms: &StepTerms, seconds: f64) {
        self.train_seconds += seconds;
        self.input_tokens_total += terms.input_tokens;
        self.tokens_seen += terms.target_tokens;
        let summary = &mut self.summary;
        summary.target_tokens += terms.target_tokens;
        summary.steps = step;
        summary.steps_this_run += 1;
        summary.first_loss.get_or_insert(stats.loss);
        summary.final_loss = Some(stats.loss);
    }

    /// The held-out loss, when the run has evaluation data.
    fn held_out(&self) -> Result<Option<EvalLoss>> {
        let Some(eval) = &self.eval_examples else {
            return Ok(None);
        };
        let cached = match (&self.cache, &self.plan.eval_data, &self.plan.teacher) {
            (Some(cache), Some(source), TeacherPlan::Cache { missing_mass, .. }) => {
                Some(CachedTeacher {
                    cache,
                    source,
                    missing_mass: *missing_mass,
                })
            }
            _ => None,
        };
        let remote = match &self.teacher {
            Some(LiveTeacher::Remote(remote)) => Some(remote),
            _ => None,
        };
        let result = held_out_loss(
            &self.student.model.model,
            eval,
            self.plan.schedule.micro_batch,
            self.student.model.pad_id(),
            &self.loss_spec(false),
            cached,
            remote,
        )?;
        Ok(Some(result))
    }

    /// The trainer state after `step` steps.
    fn state(&self, step: usize, last_loss: Option<f64>) -> TrainerState {
        let per_epoch = self.batches.per_epoch;
        TrainerState {
            step,
            total_steps: self.total_steps,
            epoch: step / per_epoch,
            batch_in_epoch: step % per_epoch,
            batches_per_epoch: per_epoch,
            examples: self.batches.lengths.len(),
            rng: RngState {
                algorithm: "chacha8".into(),
                seed: self.plan.schedule.seed,
                stream: (step / per_epoch) as u64,
            },
            tokens_seen: self.tokens_seen,
            optimizer_state: None,
            last_loss,
            config: self.plan.saved.clone(),
            retort_version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    /// Writes `checkpoint-<step>`.
    fn checkpoint(&mut self, step: usize, loss: f64) -> Result<()> {
        let mut state = self.state(step, Some(loss));
        state.optimizer_state = Some(OPTIMIZER_FILE.into());
        let output = &self.plan.output;
        let dir = match &self.student.lora {
            Some(adapters) => checkpoint::save_adapter_checkpoint(
                output,
                adapters,
                &self.student.model.dir,
                self.trainer.optimizer(),
                &state,
            )?,
            None => {
                let tensors = weights(&self.student.varmap);
                checkpoint::save_checkpoint(
                    output,
                    &model_files(&self.student.model, &tensors),
                    self.trainer.optimizer(),
                    &state,
                )?
            }
        };
        self.summary.checkpoints.push(dir.clone());
        self.last_checkpoint = Some(dir);
        Ok(())
    }

    /// Writes the final model (or adapter, and the merged model with `merge-lora`).
    fn save_final(&mut self) -> Result<()> {
        if self.summary.eval_loss.is_none()
            && let Some(result) = self.held_out()?
        {
            self.summary.eval_loss = Some(result.loss);
        }
        let state = self.state(self.total_steps, self.summary.final_loss);
        let output = &self.plan.output;
        let student = &self.student;
        match &student.lora {
            Some(adapters) => {
                if self.plan.merge_lora {
                    let tensors = adapters.merged_weights()?;
                    retort_model::save::save_hf_folder_raw(
                        &output.join(MERGED_DIR),
                        &tensors,
                        &student.model.config.raw,
                        student.model.config.tie_word_embeddings,
                        &student.model.dir,
                    )?;
                }
                checkpoint::save_final_adapter(output, adapters, &student.model.dir, &state)?;
            }
            None => {
                let tensors = weights(&student.varmap);
                checkpoint::save_final(output, &model_files(&student.model, &tensors), &state)?;
            }
        }
        self.summary.finished = true;
        Ok(())
    }

    /// The summary and the trained student.
    pub fn finish(self) -> Result<(DistillSummary, TrainedStudent)> {
        let mut summary = self.summary;
        summary.tokens_per_s = self.input_tokens_total as f64 / self.train_seconds.max(1e-9);
        summary.wall_seconds = self.started.elapsed().as_secs_f64();
        let Student {
            mut model,
            varmap,
            lora,
        } = self.student;
        if let Some(adapters) = &lora {
            model.model = adapters.build_detached()?;
        }
        Ok((
            summary,
            TrainedStudent {
                model,
                varmap,
                lora,
            },
        ))
    }
}

/// The loss spec of a step: the objective's, or the reward form on on-policy samples.
///
/// A served teacher gives its signal through the micro-batch: the sparse top-k
/// ([`LossSpec::KdCached`]) or the log-probs of the sampled tokens
/// ([`LossSpec::OnPolicyRewardScored`]).
fn loss_spec(plan: LossPlan, teacher: Option<&LiveTeacher>, reward: bool) -> LossSpec<'_> {
    let local = match teacher {
        Some(LiveTeacher::Local(model)) => Some(&model.model),
        _ => None,
    };
    let remote = matches!(teacher, Some(LiveTeacher::Remote(_)));
    match (plan, local) {
        (LossPlan::OnPolicy { .. }, Some(teacher)) if reward => {
            LossSpec::OnPolicyReward { teacher }
        }
        (LossPlan::OnPolicy { .. }, None) if reward && remote => LossSpec::OnPolicyRewardScored,
        (LossPlan::Kd(kd) | LossPlan::OnPolicy { kd, .. }, None) if remote => LossSpec::KdCached {
            divergence: kd.divergence,
            temperature: kd.temperature,
            kd_weight: kd.kd_weight,
        },
        (LossPlan::Kd(kd) | LossPlan::OnPolicy { kd, .. }, Some(teacher)) => LossSpec::Kd {
            teacher,
            divergence: kd.divergence,
            temperature: kd.temperature,
            kd_weight: kd.kd_weight,
        },
        (LossPlan::Kd(kd), None) => LossSpec::KdCached {
            divergence: kd.divergence,
            temperature: kd.temperature,
            kd_weight: kd.kd_weight,
        },
        (LossPlan::Redi { negative_weight }, _) => LossSpec::Redi { negative_weight },
        _ => LossSpec::Sft,
    }
}

/// The student as the optimizer sees it: every weight, or LoRA adapters on a frozen base (fresh,
/// or those of the checkpoint being resumed).
fn load_student(plan: &DistillPlan, resume: Option<&ResumePoint>) -> Result<Student> {
    let dir = match (resume, &plan.lora) {
        (Some(point), None) => point.dir.clone(),
        _ => plan.student.local_dir()?,
    };
    let (mut model, varmap) = load_trainable_with(&dir, &plan.compute.load_options()?)?;
    let Some(spec) = &plan.lora else {
        return Ok(Student {
            model,
            varmap,
            lora: None,
        });
    };
    let base = crate::distill::lora::frozen_weights(&varmap);
    let adapters = match resume {
        Some(point) => LoraModel::from_adapter_dir(base, &model.config, &point.dir, Some(spec))?,
        None => LoraModel::new(
            base,
            &model.config,
            spec,
            base_name(&plan.student, &dir),
            plan.schedule.seed,
        )?,
    };
    model.model = adapters.build()?;
    Ok(Student {
        model,
        varmap: adapters.varmap(),
        lora: Some(adapters),
    })
}

/// How the adapter names its base: the hub name of an `hf:` spec, else the folder.
fn base_name(spec: &ModelSpec, dir: &Path) -> BaseName {
    match spec {
        ModelSpec::Hub(hub) => BaseName {
            name: hub.repo.clone(),
            revision: (hub.revision != "main").then(|| hub.revision.clone()),
        },
        _ => BaseName::from_spec(&dir.display().to_string()),
    }
}

/// A served teacher gives log-probs at temperature 1: KD at another temperature re-tempers them,
/// which the tail bucket cannot do exactly unless the top k is the whole vocabulary (the rule
/// [`open_cache`] applies to caches).
fn check_served_temperature(plan: &DistillPlan, spec: &ModelSpec, vocab: usize) -> Result<()> {
    let kd = match plan.loss {
        LossPlan::Kd(kd) => kd,
        // The reward form needs no temperature; dataset steps (λ < 1) train with KD.
        LossPlan::OnPolicy { kd, sampling }
            if sampling.loss != OnPolicyLoss::Reward || sampling.lambda < 1.0 =>
        {
            kd
        }
        _ => return Ok(()),
    };
    let k = plan.saved.teacher_top_k();
    if spec.is_remote()
        && plan.saved.missing_mass == MissingMass::Tail
        && (kd.temperature - 1.0).abs() > 1e-9
        && k < vocab
    {
        return Err(Error::Invalid(format!(
            "teacher `{spec}` is served: its top-{k} log-probs are at temperature 1 and the run \
             trains at {}; with `--missing-mass tail` the tail bucket cannot be re-tempered, so the \
             loss would be wrong\nhint: train at `--temperature 1`, or pass `--missing-mass \
             renormalize`, which re-tempers the top k exactly",
            kd.temperature
        )));
    }
    Ok(())
}

/// Opens the teacher cache of a cached-KD run and checks its vocabulary against the student's.
fn open_cache(plan: &DistillPlan, student: &LoadedModel) -> Result<Option<TeacherCache>> {
    let TeacherPlan::Cache { dir, missing_mass } = &plan.teacher else {
        return Ok(None);
    };
    let cache = TeacherCache::open(dir)?;
    let built_at = cache.header().temperature;
    if let LossPlan::Kd(kd) = plan.loss
        && *missing_mass == MissingMass::Tail
        && (kd.temperature - built_at).abs() > 1e-9
    {
        return Err(Error::Invalid(format!(
            "the teacher cache `{}` holds log-probs at temperature {built_at}, the run trains at \
             {}; with `--missing-mass tail` the tail bucket cannot be re-tempered, so the loss \
             would be wrong\nhint: rebuild the cache at temperature {} (`--cache-teacher DIR \
             --temperature {}`), or pass `--missing-mass renormalize`, which re-tempers the top \
             k exactly",
            dir.display(),
            kd.temperature,
            kd.temperature,
            kd.temperature
        )));
    }
    if cache.header().vocab_size != student.config.vocab_size {
        return Err(Error::Invalid(format!(
            "the teacher cache `{}` has a vocabulary of {}, the student `{}` {}",
            dir.display(),
            cache.header().vocab_size,
            student.dir.display(),
            student.config.vocab_size
        )));
    }
    Ok(Some(cache))
}

/// Tokenises the training and evaluation data; REDI needs a verdict on every record.
fn load_data(
    plan: &DistillPlan,
    student: &LoadedModel,
) -> Result<(Vec<Example>, Option<Vec<Example>>, DataStats)> {
    let view = TokenizerView::of(student)?;
    let data_path = &plan.data;
    let (examples, stats) = data::load_examples(data_path, &view, &plan.data_options)?;
    if examples.is_empty() {
        return Err(Error::Invalid(format!(
            "`{}`: no usable training example ({} records, {} skipped by `only-correct`, {} dropped)",
            data_path.display(),
            stats.records,
            stats.skipped_incorrect,
            stats.dropped
        )));
    }
    let eval_examples = match &plan.eval_data {
        Some(path) => Some(data::load_examples(path, &view, &plan.data_options)?.0),
        None => None,
    };
    if let LossPlan::Redi { .. } = plan.loss {
        let eval_path = plan.eval_data.as_deref().unwrap_or(data_path);
        for (path, set) in [
            (data_path.as_path(), Some(&examples)),
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
    Ok((examples, eval_examples, stats))
}

fn train_config(plan: &DistillPlan, total_steps: usize) -> TrainConfig {
    let schedule = &plan.schedule;
    TrainConfig {
        adamw: AdamWConfig {
            weight_decay: schedule.weight_decay,
            ..AdamWConfig::default()
        },
        schedule: LrSchedule::cosine(
            schedule.lr,
            schedule.warmup_steps,
            total_steps,
            schedule.min_lr_ratio,
        ),
        max_grad_norm: schedule.max_grad_norm,
    }
}

/// The student's completions for the prompts of `rows` at step `step`, with a warning when most
/// of them run to `max-new-tokens`.
fn sample_on_policy(
    student: &LoadedModel,
    rows: &[&Example],
    sampling: OnPolicySampling,
    seed: u64,
    step: usize,
) -> Result<(Vec<Example>, SampleStats)> {
    let seeds: Vec<u64> = (0..rows.len())
        .map(|row| sample_seed(seed, step, row))
        .collect();
    let (samples, stats) = sample_completions(
        student,
        rows,
        &seeds,
        sampling.max_new_tokens,
        sampling.temperature,
    )?;
    if stats.truncation_rate > 0.5 {
        tracing::warn!(
            "step {step}: {:.0}% of the student's samples ran to `max-new-tokens` ({}): runaway \
             length (check EOS agreement with `retort check`)",
            100.0 * stats.truncation_rate,
            sampling.max_new_tokens
        );
    }
    Ok((samples, stats))
}

/// The step's line of `metrics.jsonl` (objective-specific fields are added by the caller).
fn metrics_line(
    step: usize,
    epoch: usize,
    stats: &StepStats,
    terms: &StepTerms,
    seconds: f64,
) -> Value {
    json!({
        "step": step,
        "epoch": epoch,
        "loss": stats.loss,
        "sft_loss": terms.sft_sum / terms.target_tokens.max(1) as f64,
        "lr": stats.lr,
        "grad_norm": stats.grad_norm,
        "tokens": terms.target_tokens,
        "input_tokens": terms.input_tokens,
        "tokens_per_s": terms.input_tokens as f64 / seconds.max(1e-9),
        "step_seconds": seconds,
    })
}

/// Whether on-policy step `step` trains on student samples: a draw with probability `lambda`
/// from a stream of the seed (a pure function of seed and step).
fn on_policy_step(seed: u64, lambda: f64, step: usize) -> bool {
    use rand::Rng;
    let mut rng = data::epoch_rng(seed ^ 0x6f6e_706f_6c69_6379, step);
    rng.random::<f64>() < lambda
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
