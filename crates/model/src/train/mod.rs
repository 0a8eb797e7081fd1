//! Training primitives: the causal-LM loss, gradient accumulation, AdamW, clipping and the
//! learning-rate schedule, joined in a [`Trainer`].
//!
//! A step reads as five calls, whatever the objective (SFT, KD, ...):
//! ```text
//! for micro_batch in step_batches {
//!     let logits = model.forward(&input_ids, Some(&mask), None)?;       // 1. forward
//!     let (loss_sum, n_tokens) = causal_lm_loss(&logits, &labels)?;    // 2. summed token loss
//!     trainer.accumulate(&loss_sum, n_tokens)?;                         // 3. backward + accumulate
//! }
//! let stats = trainer.step()?;                                          // 4. clip, 5. AdamW update
//! ```
//! An objective only supplies the *sum* of its per-token losses and how many tokens it covers.
//! [`Trainer::step`] divides the accumulated gradient by the total token count of the whole
//! step, so every target token weighs the same however the batch was cut into micro-batches
//! (the gradient equals that of `sum(all token losses) / total_tokens`).
//!
//! Every op here is differentiable in candle: [`log_softmax`] is built from `max` (detached),
//! `exp`, `sum` and `log`, never the fused `softmax_last_dim`, which has no backward; on CPU in
//! f32/f64 [`causal_lm_loss`] runs the fused [`crate::kernels::cross_entropy_sum`] instead.
//!
//! For long sequences, [`causal_lm_loss_chunked`] takes the final hidden states instead of the
//! logits and runs the LM head in chunks of positions, forward and backward ([`head`]).

pub mod head;
pub mod optimizer;
pub mod schedule;

use candle_core::{DType, Tensor, Var};

pub use head::{causal_lm_loss_chunked, head_loss, head_loss_value};
pub use optimizer::{AdamW, AdamWConfig, Gradients, Param, decays};
pub use schedule::{Decay, LrSchedule};

use crate::{Error, Result};

/// Label value that marks a position without a target (prompt or padding), as in transformers.
pub const IGNORE_INDEX: i64 = -100;

/// Differentiable log-softmax over the last dimension.
///
/// The row maximum is detached: it only shifts for stability and its exact gradient is zero.
pub fn log_softmax(xs: &Tensor) -> Result<Tensor> {
    let last = xs.rank().saturating_sub(1);
    let max = xs.max_keepdim(last)?.detach();
    let shifted = xs.broadcast_sub(&max)?;
    let log_sum_exp = shifted.exp()?.sum_keepdim(last)?.log()?;
    Ok(shifted.broadcast_sub(&log_sum_exp)?)
}

/// Log-probabilities of `targets` (`[b, t]`, u32) under `logits` (`[b, t, vocab]`): `[b, t]`,
/// differentiable with respect to `logits`.
pub fn gather_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if crate::kernels::supported(logits) {
        return Ok(crate::kernels::target_logprobs(logits, targets)?);
    }
    let logprobs = log_softmax(logits)?;
    let targets = targets.to_dtype(DType::U32)?.unsqueeze(2)?;
    Ok(logprobs.gather(&targets.contiguous()?, 2)?.squeeze(2)?)
}

/// The next-token cross-entropy summed over target tokens, and the number of target tokens.
///
/// `logits` is `[b, t, vocab]`; `labels` is `[b, t]` (any integer dtype) aligned with the input
/// ids, as transformers' `labels`: position `i`'s logits predict `labels[i + 1]`, and labels
/// equal to [`IGNORE_INDEX`] (any negative value) are skipped. Returns a scalar `loss_sum`
/// (differentiable, in the logits' dtype) and `n_tokens`; the mean loss is `loss_sum / n_tokens`.
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    let (b, t, vocab) = logits.dims3()?;
    let label_dims = labels.dims2()?;
    if label_dims != (b, t) {
        return Err(Error::Model(format!(
            "causal_lm_loss: labels have shape {label_dims:?}, logits {:?}",
            logits.shape()
        )));
    }
    if t < 2 {
        return Ok((Tensor::zeros((), logits.dtype(), logits.device())?, 0));
    }
    let rows = labels.to_dtype(DType::I64)?.to_vec2::<i64>()?;
    let mut targets = Vec::with_capacity(b * (t - 1));
    let mut mask = Vec::with_capacity(b * (t - 1));
    for (row_index, row) in rows.iter().enumerate() {
        for (position, &label) in row.iter().enumerate().skip(1) {
            if label < 0 {
                targets.push(0u32);
                mask.push(0f64);
            } else if (label as u64) < vocab as u64 {
                targets.push(label as u32);
                mask.push(1f64);
            } else {
                return Err(Error::Model(format!(
                    "causal_lm_loss: label {label} at row {row_index}, position {position} is \
                     outside the vocabulary of {vocab}"
                )));
            }
        }
    }
    let n_tokens = mask.iter().filter(|&&m| m > 0.0).count();
    if crate::kernels::supported(logits) {
        // Row (i, p) predicts the label at p + 1; the last position of each row predicts nothing.
        let mut shifted = Vec::with_capacity(b * t);
        for (i, chunk) in targets.chunks(t - 1).enumerate() {
            for (p, &target) in chunk.iter().enumerate() {
                let counted = mask[i * (t - 1) + p] > 0.0;
                shifted.push(if counted { i64::from(target) } else { -1 });
            }
            shifted.push(-1);
        }
        let loss_sum = crate::kernels::cross_entropy_sum(logits, shifted)?;
        return Ok((loss_sum, n_tokens));
    }
    let device = logits.device();
    let targets = Tensor::from_vec(targets, (b, t - 1), device)?;
    let mask = Tensor::from_vec(mask, (b, t - 1), device)?.to_dtype(logits.dtype())?;
    let logprobs = gather_logprobs(&logits.narrow(1, 0, t - 1)?, &targets)?;
    let loss_sum = logprobs.mul(&mask)?.sum_all()?.neg()?;
    Ok((loss_sum, n_tokens))
}

/// Every variable of a `VarMap` as `(name, var)`, sorted by name (a stable optimizer order).
pub fn named_vars(varmap: &candle_nn::VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock();
    let mut vars: Vec<(String, Var)> = match data {
        Ok(map) => map.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        Err(poisoned) => poisoned
            .into_inner()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    };
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Sums of gradients and token counts over the micro-batches of one step.
#[derive(Debug, Default)]
pub struct GradAccumulator {
    sums: Vec<Option<Tensor>>,
    tokens: usize,
    loss_sum: f64,
    micro_batches: usize,
}

impl GradAccumulator {
    /// Runs backward on `loss_sum` (a scalar: the sum of the micro-batch's token losses) and
    /// adds each parameter's gradient. Errors name any parameter that got no gradient.
    pub fn add(&mut self, params: &[Param], loss_sum: &Tensor, n_tokens: usize) -> Result<f64> {
        if loss_sum.elem_count() != 1 {
            return Err(Error::Model(format!(
                "accumulate: loss_sum must be a scalar, got shape {:?}",
                loss_sum.shape()
            )));
        }
        let loss_sum = loss_sum.reshape(())?;
        let value = loss_sum.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            return Err(Error::Model(format!(
                "non-finite loss ({value}) in micro-batch {}",
                self.micro_batches
            )));
        }
        if self.sums.len() != params.len() {
            self.sums = vec![None; params.len()];
        }
        self.micro_batches += 1;
        if n_tokens == 0 {
            return Ok(value);
        }
        let store = loss_sum.backward()?;
        for (param, sum) in params.iter().zip(self.sums.iter_mut()) {
            let grad = store
                .get(param.var.as_tensor())
                .ok_or_else(|| optimizer::missing_gradient(&param.name))?;
            *sum = Some(match sum.take() {
                Some(previous) => (previous + grad)?.detach(),
                None => grad.detach(),
            });
        }
        self.tokens += n_tokens;
        self.loss_sum += value;
        Ok(value)
    }

    /// Target tokens accumulated so far in this step.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// The gradient of `sum(token losses) / total_tokens`, the mean loss and the token count;
    /// resets the accumulator.
    pub fn finish(&mut self, params: &[Param]) -> Result<(Gradients, f64, usize)> {
        let (mut grads, scale, loss, tokens) = self.finish_unscaled(params)?;
        grads.scale(scale)?;
        Ok((grads, loss, tokens))
    }

    /// Like [`GradAccumulator::finish`] but returns the summed gradients unscaled, with the
    /// scale (`1 / tokens`) that turns them into the step's gradient.
    pub fn finish_unscaled(&mut self, params: &[Param]) -> Result<(Gradients, f64, f64, usize)> {
        let tokens = self.tokens;
        let loss_sum = self.loss_sum;
        let sums = std::mem::take(&mut self.sums);
        *self = Self::default();
        if tokens == 0 {
            return Err(Error::Model(
                "optimizer step with no target tokens: every label was ignored".into(),
            ));
        }
        let scale = 1.0 / tokens as f64;
        let mut grads = Vec::with_capacity(params.len());
        for (param, sum) in params.iter().zip(sums) {
            grads.push(sum.ok_or_else(|| optimizer::missing_gradient(&param.name))?);
        }
        Ok((Gradients { grads }, scale, loss_sum * scale, tokens))
    }
}

/// What a [`Trainer`] needs besides the parameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    /// AdamW hyper-parameters.
    pub adamw: AdamWConfig,
    /// Learning rate per step.
    pub schedule: LrSchedule,
    /// Clip gradients to this global norm (`None`: no clipping; the norm is still reported).
    pub max_grad_norm: Option<f64>,
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct StepStats {
    /// 1-based number of the step just taken.
    pub step: usize,
    /// Mean loss per target token over the step.
    pub loss: f64,
    /// Target tokens in the step.
    pub tokens: usize,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

/// Gradient accumulation, clipping, schedule and AdamW over named parameters.
#[derive(Debug)]
pub struct Trainer {
    optimizer: AdamW,
    schedule: LrSchedule,
    max_grad_norm: Option<f64>,
    accumulator: GradAccumulator,
}

impl Trainer {
    /// A trainer over `params` (`(name, var)`, e.g. from [`named_vars`]).
    pub fn new(params: Vec<(String, Var)>, config: TrainConfig) -> Result<Self> {
        Ok(Self {
            optimizer: AdamW::new(params, config.adamw)?,
            schedule: config.schedule,
            max_grad_norm: config.max_grad_norm,
            accumulator: GradAccumulator::default(),
        })
    }

    /// Backward on one micro-batch's summed token loss (`n_tokens` target tokens) and adds its
    /// gradient to the step. Returns the loss sum as a number.
    pub fn accumulate(&mut self, loss_sum: &Tensor, n_tokens: usize) -> Result<f64> {
        self.accumulator
            .add(self.optimizer.params(), loss_sum, n_tokens)
    }

    /// Normalises the accumulated gradient by the step's total target tokens, clips it, and
    /// applies AdamW with the scheduled learning rate. A non-finite gradient norm is an error
    /// and leaves the weights untouched.
    pub fn step(&mut self) -> Result<StepStats> {
        let (grads, scale, loss, tokens) =
            self.accumulator.finish_unscaled(self.optimizer.params())?;
        let grad_norm = scale * grads.global_norm()?;
        // The clip coefficient of `Gradients::clip_by_global_norm`, folded into the update.
        let clip = match self.max_grad_norm {
            Some(max_norm) if grad_norm.is_finite() => (max_norm / (grad_norm + 1e-6)).min(1.0),
            _ => 1.0,
        };
        if !grad_norm.is_finite() {
            return Err(Error::Model(format!(
                "non-finite gradient norm ({grad_norm}) at step {}; weights left unchanged",
                self.optimizer.step_count() + 1
            )));
        }
        let lr = self.schedule.lr_at(self.optimizer.step_count());
        self.optimizer.step_scaled(&grads, scale * clip, lr)?;
        Ok(StepStats {
            step: self.optimizer.step_count(),
            loss,
            tokens,
            lr,
            grad_norm,
        })
    }

    /// The optimizer (parameters, state, save/load).
    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    /// The optimizer, mutably (to restore its state on resume).
    pub fn optimizer_mut(&mut self) -> &mut AdamW {
        &mut self.optimizer
    }

    /// The learning-rate schedule.
    pub fn schedule(&self) -> &LrSchedule {
        &self.schedule
    }

    /// Optimizer steps taken so far.
    pub fn step_count(&self) -> usize {
        self.optimizer.step_count()
    }
}
