//! The held-out loss: [`held_out_loss`] runs the objective over evaluation examples without
//! taking a gradient (the `eval_loss` of `metrics.jsonl`).

use std::path::Path;

use retort_model::CausalLm;
use serde::Serialize;

use crate::distill::cache::TeacherCache;
use crate::distill::data::Example;
use crate::distill::objective::{LossSpec, MicroBatch, loss_value};
use crate::distill::teacher::MissingMass;
use crate::error::Result;

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

/// The held-out loss of `model` on `examples` (no gradient is taken); `cached` or `remote`
/// supplies the teacher signal of [`LossSpec::KdCached`] and [`LossSpec::OnPolicyRewardScored`].
pub fn held_out_loss(
    model: &CausalLm,
    examples: &[Example],
    micro: usize,
    pad_id: u32,
    spec: &LossSpec<'_>,
    cached: Option<CachedTeacher<'_>>,
    remote: Option<&crate::distill::teacher::RemoteTeacher>,
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
        if let Some(remote) = remote {
            match spec {
                LossSpec::KdCached { .. } => {
                    batch.teacher = Some(remote.signal(rows, model.device())?);
                }
                LossSpec::OnPolicyRewardScored => {
                    batch.teacher_target_logprobs =
                        Some(remote.target_logprobs(rows, model.device())?);
                }
                _ => {}
            }
        }
        let terms = loss_value(model, &batch, spec)?;
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

/// A scalar tensor as `f64`.
pub(crate) fn scalar(tensor: &candle_core::Tensor) -> Result<f64> {
    Ok(tensor
        .to_dtype(candle_core::DType::F64)?
        .reshape(())?
        .to_scalar::<f64>()?)
}
