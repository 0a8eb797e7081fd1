//! A distillation run, validated once: [`DistillOptions::resolve`] checks every setting and
//! returns a [`DistillPlan`] with typed fields (model specs, the [`Divergence`], the
//! [`LossPlan`], the [`TeacherPlan`], LoRA, data options and the [`Schedule`]). The trainer and
//! the teacher-cache builder read the plan; nothing downstream parses or re-checks a setting.

use std::path::PathBuf;

use crate::distill::config::{DistillOptions, Objective, OnPolicyLoss};
use crate::distill::data::DataOptions;
use crate::distill::divergence::Divergence;
use crate::distill::lora::{DEFAULT_TARGETS, LoraSpec};
use crate::distill::teacher::MissingMass;
use crate::error::{Error, Result};
use crate::model_spec::ModelSpec;

/// Where the teacher signal comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum TeacherPlan {
    /// No teacher (SFT, REDI).
    None,
    /// A teacher model run alongside the student.
    Live(ModelSpec),
    /// An offline top-k cache (`--teacher-cache`) and the policy for the mass outside the top k.
    Cache {
        /// The cache folder.
        dir: PathBuf,
        /// The missing-mass policy of the sparse signal.
        missing_mass: MissingMass,
    },
}

/// The token-level KD term.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KdTerm {
    /// The divergence.
    pub divergence: Divergence,
    /// Divides both logit sets.
    pub temperature: f64,
    /// Weight `w`: per token `(1 - w) * sft + w * kd`.
    pub kd_weight: f64,
}

/// How on-policy steps sample and score the student.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OnPolicySampling {
    /// Probability that a step trains on student samples (GKD's λ).
    pub lambda: f64,
    /// The loss on the student's samples.
    pub loss: OnPolicyLoss,
    /// Most new tokens per sample.
    pub max_new_tokens: usize,
    /// The student's sampling temperature.
    pub temperature: f64,
}

/// What the student is trained on, with the settings each objective uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LossPlan {
    /// Cross-entropy on the completion tokens.
    Sft,
    /// Token-level KD (live teacher or cache).
    Kd(KdTerm),
    /// GKD-style on-policy distillation (live teacher).
    OnPolicy {
        /// The divergence used on dataset steps (and on samples with `on-policy-loss
        /// divergence`).
        kd: KdTerm,
        /// Sampling and the loss on samples.
        sampling: OnPolicySampling,
    },
    /// REDI on positive and negative traces.
    Redi {
        /// α: weight of the negatives' length-normalised log-likelihood.
        negative_weight: f64,
    },
}

/// The optimisation schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Optimizer steps; wins over `epochs`.
    pub max_steps: Option<usize>,
    /// Passes over the data when `max_steps` is not set.
    pub epochs: usize,
    /// Sequences per optimizer step.
    pub batch_size: usize,
    /// Sequences per forward/backward.
    pub micro_batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    /// Cosine floor as a fraction of the peak.
    pub min_lr_ratio: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Gradient clipping norm (absent: none).
    pub max_grad_norm: Option<f64>,
    /// Seed of the data order, on-policy draws and sampling.
    pub seed: u64,
}

impl Schedule {
    /// Optimizer steps of the run, given the batches of one epoch.
    pub fn total_steps(&self, batches_per_epoch: usize) -> usize {
        self.max_steps.unwrap_or(self.epochs * batches_per_epoch)
    }
}

/// Test hooks carried from [`DistillOptions`] (never saved).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hooks {
    /// Make the loss of this (1-based) step non-finite.
    pub inject_non_finite_at_step: Option<usize>,
    /// Stop (as if killed) after this many steps, without the final save.
    pub stop_after_step: Option<usize>,
}

/// A validated `retort distill` run.
#[derive(Debug, Clone, PartialEq)]
pub struct DistillPlan {
    /// The student.
    pub student: ModelSpec,
    /// Training records.
    pub data: PathBuf,
    /// Held-out records for the evaluation loss.
    pub eval_data: Option<PathBuf>,
    /// The output folder.
    pub output: PathBuf,
    /// Where the teacher signal comes from.
    pub teacher: TeacherPlan,
    /// The objective and its settings.
    pub loss: LossPlan,
    /// LoRA adapters instead of full fine-tuning.
    pub lora: Option<LoraSpec>,
    /// How records become examples.
    pub data_options: DataOptions,
    /// Steps, batches and the optimizer.
    pub schedule: Schedule,
    /// Evaluate every N steps (and at the end) when `eval_data` is set.
    pub eval_every: Option<usize>,
    /// Write `OUTPUT/checkpoint-N` every N steps.
    pub checkpoint_every: Option<usize>,
    /// Continue from the latest checkpoint.
    pub resume: bool,
    /// With LoRA, also write the merged model.
    pub merge_lora: bool,
    /// Device and precision of the student and a local teacher.
    pub compute: crate::compute::Compute,
    /// Test hooks.
    pub hooks: Hooks,
    /// The options as saved in `config.toml` and every `trainer_state.json` (`resume` and the
    /// test hooks cleared).
    pub saved: DistillOptions,
}

impl DistillPlan {
    /// The live teacher's spec, if any.
    pub fn live_teacher(&self) -> Option<&ModelSpec> {
        match &self.teacher {
            TeacherPlan::Live(spec) => Some(spec),
            _ => None,
        }
    }

    /// The objective trained.
    pub fn objective(&self) -> Objective {
        match self.loss {
            LossPlan::Sft => Objective::Sft,
            LossPlan::Kd(_) => Objective::Kd,
            LossPlan::OnPolicy { .. } => Objective::OnPolicy,
            LossPlan::Redi { .. } => Objective::Redi,
        }
    }
}

/// What the teacher-cache builder needs: the student and teacher, the data and its tokenisation,
/// and the temperature.
#[derive(Debug, Clone, PartialEq)]
pub struct CachePlan {
    /// The student whose tokenisation the cache follows.
    pub student: ModelSpec,
    /// The teacher run over the data.
    pub teacher: ModelSpec,
    /// Training records.
    pub data: PathBuf,
    /// Held-out records, cached too.
    pub eval_data: Option<PathBuf>,
    /// How records become examples.
    pub data_options: DataOptions,
    /// The temperature the log-probs are computed at.
    pub temperature: f64,
    /// Device and precision of the teacher (and the student's tokenizer load).
    pub compute: crate::compute::Compute,
}

fn missing(name: &str) -> Error {
    Error::Invalid(format!("missing `{name}` (flag `--{name}`)"))
}

fn bad(field: &str, why: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("field `{field}`: {why}"))
}

impl DistillOptions {
    /// Sequences per forward/backward.
    pub fn micro_batch(&self) -> usize {
        self.micro_batch_size.unwrap_or(self.batch_size).max(1)
    }

    /// How records become training examples.
    pub fn data_options(&self) -> DataOptions {
        DataOptions {
            input_format: self.input_format,
            only_correct: self.only_correct,
            max_seq_len: self.max_seq_len,
        }
    }

    /// The LoRA settings, when `lora-rank` is set: alpha defaults to `2 * rank`, the targets to
    /// [`DEFAULT_TARGETS`].
    pub fn lora(&self) -> Option<LoraSpec> {
        let rank = self.lora_rank?;
        Some(LoraSpec {
            rank,
            alpha: self.lora_alpha.unwrap_or(2.0 * rank as f64),
            targets: self
                .lora_targets
                .clone()
                .unwrap_or_else(|| DEFAULT_TARGETS.map(String::from).to_vec()),
            dropout: self.lora_dropout.unwrap_or(0.0),
            base_dtype: self.lora_base_dtype.unwrap_or_default().dtype(),
        })
    }

    /// The KD divergence named by `divergence`, `beta` and `alpha`.
    pub fn divergence(&self) -> Result<Divergence> {
        Divergence::new(self.divergence, self.beta, self.alpha).map_err(|e| bad("divergence", e))
    }

    fn kd_temperature(&self) -> Result<f64> {
        if self.temperature.is_finite() && self.temperature > 0.0 {
            Ok(self.temperature)
        } else {
            Err(bad(
                "temperature",
                format!("must be positive, got {}", self.temperature),
            ))
        }
    }

    /// The inputs of `--cache-teacher`: student, teacher, data and temperature.
    pub fn resolve_cache(&self) -> Result<CachePlan> {
        let needs = |name: &str| {
            Error::Invalid(format!(
                "building a teacher cache needs `{name}` (flag `--{name}`)"
            ))
        };
        Ok(CachePlan {
            student: self.student.clone().ok_or_else(|| needs("student"))?,
            teacher: self.teacher.clone().ok_or_else(|| needs("teacher"))?,
            data: self.data.clone().ok_or_else(|| needs("data"))?,
            eval_data: self.eval_data.clone(),
            data_options: self.data_options(),
            temperature: self.kd_temperature()?,
            compute: crate::compute::Compute {
                device: self.device,
                precision: self.dtype,
            },
        })
    }

    /// Checks every setting and returns the run's plan; errors name the field and what was
    /// expected.
    pub fn resolve(&self) -> Result<DistillPlan> {
        let student = self.student.clone().ok_or_else(|| missing("student"))?;
        let data = self.data.clone().ok_or_else(|| missing("data"))?;
        let output = self.output.clone().ok_or_else(|| missing("output"))?;
        let schedule = self.schedule()?;
        for (field, value) in [
            ("eval-every", self.eval_every),
            ("checkpoint-every", self.checkpoint_every),
        ] {
            if value == Some(0) {
                return Err(bad(field, "must be at least 1"));
            }
        }
        if self.max_seq_len < 2 {
            return Err(bad("max-seq-len", "must be at least 2"));
        }
        if !(0.0..=1.0).contains(&self.kd_weight) {
            return Err(bad(
                "kd-weight",
                format!("must lie in [0, 1], got {}", self.kd_weight),
            ));
        }
        self.kd_temperature()?;
        let lora = self.resolve_lora()?;
        let teacher = self.resolve_teacher()?;
        let loss = self.resolve_loss()?;
        Ok(DistillPlan {
            student,
            data,
            eval_data: self.eval_data.clone(),
            output,
            teacher,
            loss,
            lora,
            data_options: self.data_options(),
            schedule,
            eval_every: self.eval_every,
            checkpoint_every: self.checkpoint_every,
            resume: self.resume,
            merge_lora: self.merge_lora,
            compute: crate::compute::Compute {
                device: self.device,
                precision: self.dtype,
            },
            hooks: Hooks {
                inject_non_finite_at_step: self.inject_non_finite_at_step,
                stop_after_step: self.stop_after_step,
            },
            saved: self.saved(),
        })
    }

    /// The options as saved: test hooks and `resume` cleared.
    pub fn saved(&self) -> Self {
        Self {
            resume: false,
            inject_non_finite_at_step: None,
            stop_after_step: None,
            ..self.clone()
        }
    }

    fn schedule(&self) -> Result<Schedule> {
        if self.batch_size == 0 {
            return Err(bad("batch-size", "must be at least 1"));
        }
        if let Some(micro) = self.micro_batch_size
            && (micro == 0 || micro > self.batch_size)
        {
            return Err(bad(
                "micro-batch-size",
                format!("must lie in 1..={}, got {micro}", self.batch_size),
            ));
        }
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return Err(bad(
                "lr",
                format!("expected a non-negative number, got {}", self.lr),
            ));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(bad(
                "min-lr-ratio",
                format!("must lie in [0, 1], got {}", self.min_lr_ratio),
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(bad(
                "weight-decay",
                format!("expected a non-negative number, got {}", self.weight_decay),
            ));
        }
        if self.max_steps.is_none() && self.epochs == 0 {
            return Err(bad("epochs", "must be at least 1 (or set `max-steps`)"));
        }
        Ok(Schedule {
            max_steps: self.max_steps,
            epochs: self.epochs,
            batch_size: self.batch_size,
            micro_batch: self.micro_batch(),
            lr: self.lr,
            warmup_steps: self.warmup_steps,
            min_lr_ratio: self.min_lr_ratio,
            weight_decay: self.weight_decay,
            max_grad_norm: self.max_grad_norm.filter(|n| *n > 0.0),
            seed: self.seed,
        })
    }

    fn resolve_lora(&self) -> Result<Option<LoraSpec>> {
        match self.lora_rank {
            Some(0) => Err(bad("lora-rank", "must be at least 1")),
            Some(_) => {
                if let Some(alpha) = self.lora_alpha
                    && !(alpha.is_finite() && alpha > 0.0)
                {
                    return Err(bad("lora-alpha", format!("must be positive, got {alpha}")));
                }
                if let Some(targets) = &self.lora_targets
                    && (targets.is_empty() || targets.iter().any(|t| t.trim().is_empty()))
                {
                    return Err(bad(
                        "lora-targets",
                        format!("expected module names such as `q_proj`, got {targets:?}"),
                    ));
                }
                if let Some(p) = self.lora_dropout
                    && !(0.0..1.0).contains(&p)
                {
                    return Err(bad("lora-dropout", format!("must be in [0, 1), got {p}")));
                }
                Ok(self.lora())
            }
            None => {
                let set = [
                    ("lora-dropout", self.lora_dropout.is_some()),
                    ("lora-base-dtype", self.lora_base_dtype.is_some()),
                    ("lora-alpha", self.lora_alpha.is_some()),
                    ("lora-targets", self.lora_targets.is_some()),
                    ("merge-lora", self.merge_lora),
                ];
                match set.iter().find(|(_, on)| *on) {
                    Some((field, _)) => Err(bad(field, "needs `lora-rank`")),
                    None => Ok(None),
                }
            }
        }
    }

    fn resolve_teacher(&self) -> Result<TeacherPlan> {
        let uses_teacher = matches!(self.objective, Objective::Kd | Objective::OnPolicy);
        match (&self.teacher_cache, &self.teacher) {
            (Some(_), _) if self.objective != Objective::Kd => Err(bad(
                "teacher-cache",
                format!(
                    "only objective `kd` trains from a cache, not `{}` (on-policy samples are \
                     new every step)",
                    self.objective.name()
                ),
            )),
            (Some(_), Some(_)) => Err(bad("teacher-cache", "replaces `teacher`: pass one of them")),
            (Some(dir), None) => Ok(TeacherPlan::Cache {
                dir: dir.clone(),
                missing_mass: self.missing_mass,
            }),
            (None, Some(spec)) if uses_teacher => Ok(TeacherPlan::Live(spec.clone())),
            (None, None) if uses_teacher => Err(Error::Invalid(format!(
                "objective `{}` needs a teacher: pass `--teacher MODEL`",
                self.objective.name()
            ))),
            (None, _) => Ok(TeacherPlan::None),
        }
    }

    fn resolve_loss(&self) -> Result<LossPlan> {
        let kd = || -> Result<KdTerm> {
            Ok(KdTerm {
                divergence: self.divergence()?,
                temperature: self.kd_temperature()?,
                kd_weight: self.kd_weight,
            })
        };
        Ok(match self.objective {
            Objective::Sft => LossPlan::Sft,
            Objective::Kd => LossPlan::Kd(kd()?),
            Objective::OnPolicy => {
                let kd = kd()?;
                if !(0.0..=1.0).contains(&self.lambda) {
                    return Err(bad(
                        "lambda",
                        format!("must lie in [0, 1], got {}", self.lambda),
                    ));
                }
                if self.max_new_tokens == 0 {
                    return Err(bad("max-new-tokens", "must be at least 1"));
                }
                if !(self.sample_temperature.is_finite() && self.sample_temperature >= 0.0) {
                    return Err(bad(
                        "sample-temperature",
                        format!("must be >= 0, got {}", self.sample_temperature),
                    ));
                }
                LossPlan::OnPolicy {
                    kd,
                    sampling: OnPolicySampling {
                        lambda: self.lambda,
                        loss: self.on_policy_loss,
                        max_new_tokens: self.max_new_tokens,
                        temperature: self.sample_temperature,
                    },
                }
            }
            Objective::Redi => {
                if !(0.0..=1.0).contains(&self.redi_alpha) {
                    return Err(bad(
                        "redi-alpha",
                        format!("must lie in [0, 1], got {}", self.redi_alpha),
                    ));
                }
                if self.only_correct {
                    return Err(bad(
                        "only-correct",
                        "objective `redi` trains on negative traces too",
                    ));
                }
                LossPlan::Redi {
                    negative_weight: self.redi_alpha,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::divergence::DivergenceKind;

    fn options() -> DistillOptions {
        DistillOptions {
            student: Some(ModelSpec::folder("s")),
            data: Some("d.jsonl".into()),
            output: Some("out".into()),
            ..DistillOptions::default()
        }
    }

    #[test]
    fn resolve_types_every_setting_once() -> Result<()> {
        let mut kd = options();
        kd.objective = Objective::Kd;
        kd.teacher = Some(ModelSpec::folder("t"));
        kd.divergence = DivergenceKind::Jsd;
        kd.beta = Some(0.9);
        let plan = kd.resolve()?;
        assert_eq!(plan.teacher, TeacherPlan::Live(ModelSpec::folder("t")));
        let LossPlan::Kd(term) = plan.loss else {
            panic!("expected KD, got {:?}", plan.loss);
        };
        assert_eq!(term.divergence, Divergence::Jsd { beta: 0.9 });
        assert_eq!(plan.objective(), Objective::Kd);
        // An SFT run ignores a teacher it was given.
        let mut sft = options();
        sft.teacher = Some(ModelSpec::folder("t"));
        assert_eq!(sft.resolve()?.teacher, TeacherPlan::None);
        Ok(())
    }

    #[test]
    fn resolve_names_the_bad_field() {
        type Edit = fn(&mut DistillOptions);
        let cases: [(&str, Edit); 6] = [
            ("batch-size", |o| o.batch_size = 0),
            ("micro-batch-size", |o| o.micro_batch_size = Some(99)),
            ("lora-alpha", |o| o.lora_alpha = Some(4.0)),
            ("teacher", |o| o.objective = Objective::Kd),
            ("teacher-cache", |o| {
                o.teacher_cache = Some("c".into());
            }),
            ("beta", |o| {
                o.objective = Objective::Kd;
                o.teacher = Some(ModelSpec::folder("t"));
                o.beta = Some(0.5);
            }),
        ];
        for (field, edit) in cases {
            let mut o = options();
            edit(&mut o);
            let err = o.resolve().expect_err(field).to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }
}
