//! The distillation run's settings: [`DistillOptions`], one struct for the CLI flags and the
//! `--config FILE` TOML (same keys as the flags, kebab-case, unknown keys rejected), and the
//! [`Objective`] it trains. [`DistillOptions::resolve`] (in [`super::plan`]) validates them once
//! into the [`super::plan::DistillPlan`] the trainer runs.
//!
//! The resolved options are saved beside the model as `config.toml` and inside every
//! `trainer_state.json`, so a run can be reproduced and resumed from its output folder alone.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::compute::{DeviceChoice, Precision};
use crate::distill::divergence::DivergenceKind;
use crate::distill::lora::LoraBaseDtype;
use crate::distill::teacher::MissingMass;
use crate::error::{Error, Result};
use crate::model_spec::ModelSpec;
use crate::records::InputFormat;

/// What the student is trained to do.
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Objective {
    /// Cross-entropy on the completion tokens.
    #[default]
    Sft,
    /// Token-level KD against a local teacher's logits, mixed with SFT by `kd-weight`.
    Kd,
    /// GKD: each step, with probability `lambda`, the student samples the completions and
    /// trains on its own tokens against the teacher (by `on-policy-loss`: the per-token
    /// reverse-KL reward, or the KD divergence); other steps take the divergence on the
    /// dataset's tokens.
    OnPolicy,
    /// REDI on positive and negative traces (`verdict.correct`), after an SFT stage: the
    /// length-normalised log-likelihood of positives minus `redi-alpha` times that of negatives.
    Redi,
}

impl Objective {
    /// The name used on the command line and in TOML.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sft => "sft",
            Self::Kd => "kd",
            Self::OnPolicy => "on-policy",
            Self::Redi => "redi",
        }
    }
}

/// The loss of on-policy steps (those that train on the student's own samples).
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnPolicyLoss {
    /// Per-token reverse KL as a reward: the teacher scores the sampled tokens and the loss is
    /// `-sum_t sg(log p_teacher(x_t) - log p_student(x_t)) * log p_student(x_t)` over the sampled
    /// tokens (policy gradient, discount 0), whose gradient is that of the reverse KL on the
    /// student's own distribution. Log-probs at temperature 1.
    #[default]
    Reward,
    /// The chosen `divergence` on the full distributions at every sampled position (GKD).
    Divergence,
}

impl OnPolicyLoss {
    /// The name used on the command line and in TOML.
    pub fn name(self) -> &'static str {
        match self {
            Self::Reward => "reward",
            Self::Divergence => "divergence",
        }
    }
}

/// Every setting of a `retort distill` run. TOML keys are the flag names (`max-steps`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct DistillOptions {
    /// The student: a model folder, `hf:ORG/NAME[@REV]` or `world:student`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub student: Option<ModelSpec>,
    /// Training records (JSONL or JSON array).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<PathBuf>,
    /// Output folder: the final model, `checkpoint-N/`, `metrics.jsonl`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<PathBuf>,
    /// The teacher (required by `kd`): a model folder or `hf:` spec sharing the student's
    /// vocabulary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teacher: Option<ModelSpec>,
    /// The training objective.
    pub objective: Objective,
    /// KD divergence: `fkl`, `rkl`, `jsd`, `skl`, `srkl`, `tvd`.
    pub divergence: DivergenceKind,
    /// β of `jsd` (TRL's semantics: the teacher's weight in the mixture).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta: Option<f64>,
    /// α of `skl`/`srkl` (DistiLLM's skew).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    /// KD temperature (divides both logit sets).
    pub temperature: f64,
    /// Weight `w` of the KD term: per token `loss = (1 - w) * sft + w * kd`.
    pub kd_weight: f64,
    /// On-policy: probability that a step trains on student samples (GKD's λ).
    pub lambda: f64,
    /// On-policy: the loss on the student's samples (steps on dataset sequences use the
    /// divergence).
    pub on_policy_loss: OnPolicyLoss,
    /// On-policy: most new tokens per student sample.
    pub max_new_tokens: usize,
    /// On-policy: sampling temperature of the student.
    pub sample_temperature: f64,
    /// REDI's α: weight of the negative traces' length-normalised log-likelihood.
    pub redi_alpha: f64,
    /// Optimizer steps; wins over `epochs` when both are set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<usize>,
    /// Passes over the data when `max-steps` is not set.
    pub epochs: usize,
    /// Sequences per optimizer step.
    pub batch_size: usize,
    /// Sequences per forward/backward (gradient accumulation); default: the batch size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub micro_batch_size: Option<usize>,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    /// Cosine floor as a fraction of the peak learning rate.
    pub min_lr_ratio: f64,
    /// AdamW decoupled weight decay (not applied to biases and norms).
    pub weight_decay: f64,
    /// Clip the gradient to this global norm (0 or absent: no clipping).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_grad_norm: Option<f64>,
    /// Seed of the data order (a pure function of seed and epoch).
    pub seed: u64,
    /// Longest training sequence (prompt + completion); longer ones are cut at the end.
    pub max_seq_len: usize,
    /// Train only on records whose `verdict.correct` is true.
    pub only_correct: bool,
    /// Shape of the prompt in the records (`auto` detects it).
    pub input_format: InputFormat,
    /// Held-out records for the evaluation loss.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_data: Option<PathBuf>,
    /// Evaluate every N steps (and at the end) when `eval-data` is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_every: Option<usize>,
    /// Write `OUTPUT/checkpoint-N` every N steps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_every: Option<usize>,
    /// Continue from the latest checkpoint in the output folder.
    pub resume: bool,
    /// `kd` from an offline teacher cache (built with `retort distill --cache-teacher DIR`)
    /// instead of a live teacher.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teacher_cache: Option<PathBuf>,
    /// Sparse teacher signals: what happens to the probability outside the top-k set
    /// (`tail` or `renormalize`, see [`MissingMass`]).
    pub missing_mass: MissingMass,
    /// A served teacher (`openai:URL#MODEL`): log-probs per position asked for (at most the
    /// server's `--max-logprobs`; default [`DEFAULT_TEACHER_TOP_K`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teacher_top_k: Option<usize>,
    /// Train LoRA adapters of this rank instead of every weight (absent: full fine-tuning).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_rank: Option<usize>,
    /// LoRA's alpha: the update `B @ A` is scaled by `alpha / rank` (default `2 * rank`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_alpha: Option<f64>,
    /// Module names LoRA adapts (default: every attention and MLP projection,
    /// [`crate::distill::lora::DEFAULT_TARGETS`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_targets: Option<Vec<String>>,
    /// With LoRA, also write the merged model as a Hugging Face folder in `OUTPUT/merged`.
    pub merge_lora: bool,
    /// LoRA dropout on the adapter input while training (PEFT's `lora_dropout`, default 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_dropout: Option<f64>,
    /// The dtype LoRA holds the frozen base's linear weights in (`f32`, the default, or `bf16`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_base_dtype: Option<LoraBaseDtype>,
    /// Where the student (and a local teacher) run; a run may resume on another device, so it is
    /// never saved.
    #[serde(skip)]
    pub device: DeviceChoice,
    /// Precision of training (f32 master weights; bf16/f16 autocast of the matrix multiplies)
    /// and of a local teacher; see [`crate::compute`].
    #[serde(skip_serializing_if = "Precision::is_auto")]
    pub dtype: Precision,
    /// Test hook: make the loss of this (1-based) step non-finite. Never saved.
    #[doc(hidden)]
    #[serde(skip)]
    pub inject_non_finite_at_step: Option<usize>,
    /// Test hook: stop (as if killed) after this many steps, without the final save.
    #[doc(hidden)]
    #[serde(skip)]
    pub stop_after_step: Option<usize>,
}

impl Default for DistillOptions {
    fn default() -> Self {
        Self {
            student: None,
            data: None,
            output: None,
            teacher: None,
            objective: Objective::Sft,
            divergence: DivergenceKind::Fkl,
            beta: None,
            alpha: None,
            temperature: 1.0,
            kd_weight: 1.0,
            redi_alpha: 0.8,
            lambda: 0.5,
            on_policy_loss: OnPolicyLoss::default(),
            max_new_tokens: 128,
            sample_temperature: 1.0,
            max_steps: None,
            epochs: 1,
            batch_size: 8,
            micro_batch_size: None,
            lr: 1e-5,
            warmup_steps: 0,
            min_lr_ratio: 0.1,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            seed: 0,
            max_seq_len: 4096,
            only_correct: false,
            input_format: InputFormat::Auto,
            eval_data: None,
            eval_every: None,
            checkpoint_every: None,
            resume: false,
            teacher_cache: None,
            missing_mass: MissingMass::default(),
            teacher_top_k: None,
            lora_rank: None,
            lora_alpha: None,
            lora_targets: None,
            merge_lora: false,
            lora_dropout: None,
            lora_base_dtype: None,
            device: DeviceChoice::Cpu,
            dtype: Precision::Auto,
            inject_non_finite_at_step: None,
            stop_after_step: None,
        }
    }
}

/// Top-k of a served teacher when `teacher-top-k` is not set: vLLM's default `--max-logprobs`.
pub const DEFAULT_TEACHER_TOP_K: usize = 20;

impl DistillOptions {
    /// The top-k asked of a served teacher.
    pub fn teacher_top_k(&self) -> usize {
        self.teacher_top_k.unwrap_or(DEFAULT_TEACHER_TOP_K)
    }

    /// Reads a TOML config file (keys as the flags; unknown keys are an error that names them).
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = fs_err::read_to_string(path)?;
        Self::from_toml_str(&text).map_err(|e| match e {
            Error::Invalid(message) => Error::Invalid(format!("{}: {message}", path.display())),
            other => other,
        })
    }

    /// Parses TOML text.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::Invalid(format!("invalid config: {e}")))
    }

    /// The options as TOML (what `config.toml` holds).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::Invalid(format!("cannot write config: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_round_trips_and_rejects_unknown_keys() -> Result<()> {
        let options = DistillOptions::from_toml_str(
            "student = \"m\"\nobjective = \"kd\"\ndivergence = \"jsd\"\nbeta = 0.9\nmax-steps = 5\n",
        )?;
        assert_eq!(options.objective, Objective::Kd);
        assert_eq!(options.max_steps, Some(5));
        assert_eq!(options.divergence, DivergenceKind::Jsd);
        assert_eq!(options.beta, Some(0.9));
        let again = DistillOptions::from_toml_str(&options.to_toml()?)?;
        assert_eq!(again, options);
        let err = DistillOptions::from_toml_str("max_stepz = 3\n");
        assert!(err.is_err_and(|e| e.to_string().contains("max_stepz")));
        Ok(())
    }
}
