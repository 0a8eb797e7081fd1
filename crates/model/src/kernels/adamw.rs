//! The AdamW update in place, and the sum of squares of a gradient, for the optimizer.
//!
//! Three in-place passes per parameter (first moment, second moment, weight) replace the dozen
//! allocating candle ops of the plain update; the gradient's scale (`1 / tokens` times the clip
//! coefficient) is applied on the fly, so the scaled gradient is never materialised.

use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
use rayon::prelude::*;

use super::{Real, by_float, data};

/// Elements per parallel chunk (and per partial sum of [`sum_squares`]).
const CHUNK: usize = 1 << 16;

/// One AdamW step's coefficients, shared by every parameter of the step.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    /// Multiplies the raw gradient before use.
    pub grad_scale: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the bias-corrected root second moment.
    pub eps: f64,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f64,
    /// `sqrt(1 - beta2^t)`.
    pub bias_correction2_sqrt: f64,
    /// `1 - lr * weight_decay` (1 for parameters without decay).
    pub decay: f64,
}

/// The sum of the squared elements of `t` (f32/f64 on CPU), accumulated in f64 over fixed
/// chunks in a fixed order, so the result does not depend on the thread schedule.
pub fn sum_squares(t: &Tensor) -> Result<f64> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(storage) = &*storage else {
        candle_core::bail!("sum_squares: a CPU tensor expected");
    };
    by_float!(storage, "sum_squares", T => {
        let xs = data::<T>(storage, layout, "sum_squares")?;
        let partial: Vec<f64> = xs
            .par_chunks(CHUNK)
            .map(|chunk| {
                chunk.iter().map(|&x| {
                    let x = candle_core::WithDType::to_f64(x);
                    x * x
                }).sum::<f64>()
            })
            .collect();
        Ok(partial.iter().sum())
    })
}

/// Applies one AdamW update to `param` in place, updating `exp_avg` and `exp_avg_sq` in place
/// too, from the raw gradient `grad` (all of one float dtype, contiguous, on CPU).
pub fn adamw_update(
    param: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    grad: &Tensor,
    step: AdamWStep,
) -> Result<()> {
    let grad = grad.contiguous()?;
    exp_avg.inplace_op2(&grad, &Moment::First(step))?;
    exp_avg_sq.inplace_op2(&grad, &Moment::Second(step))?;
    param.inplace_op3(exp_avg, exp_avg_sq, &Update(step))
}

/// The contiguous data of a storage this op writes in place.
fn data_mut<'a, T: Real>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a mut [T]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: expects contiguous tensors")))?;
    let all = T::storage_mut(storage)
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: tensors of one dtype expected")))?;
    Ok(&mut all[start..end])
}

/// Runs `f(out_chunk, in_chunk)` over matching chunks of `out` and `xs`, in parallel.
fn zip_chunks<T: Real>(out: &mut [T], xs: &[T], f: impl Fn(&mut [T], &[T]) + Sync + Send) {
    out.par_chunks_mut(CHUNK)
        .zip(xs.par_chunks(CHUNK))
        .for_each(|(o, x)| f(o, x));
}

/// A moment update from the raw gradient `g` scaled by `s`.
enum Moment {
    /// `m = beta1 * m + (1 - beta1) * s * g`.
    First(AdamWStep),
    /// `v = beta2 * v + (1 - beta2) * (s * g)^2`.
    Second(AdamWStep),
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        match self {
            Self::First(_) => "adamw-first-moment",
            Self::Second(_) => "adamw-second-moment",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        by_float!(s2, self.name(), T => {
            let g = data::<T>(s2, l2, self.name())?;
            let state = data_mut::<T>(s1, l1, self.name())?;
            check_len(state.len(), g.len(), self.name())?;
            match *self {
                Self::First(s) => {
                    let b1 = T::from_f64(s.beta1);
                    let c = T::from_f64((1.0 - s.beta1) * s.grad_scale);
                    zip_chunks(state, g, |m, g| {
                        for (m, &g) in m.iter_mut().zip(g) {
                            *m = b1 * *m + c * g;
                        }
                    });
                }
                Self::Second(s) => {
                    let b2 = T::from_f64(s.beta2);
                    let c = T::from_f64(1.0 - s.beta2);
                    let scale = T::from_f64(s.grad_scale);
                    zip_chunks(state, g, |v, g| {
                        for (v, &g) in v.iter_mut().zip(g) {
                            let g = scale * g;
                            *v = b2 * *v + c * g * g;
                        }
                    });
                }
            }
            Ok(())
        })
    }
}

/// `p = decay * p - step_size * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)`.
struct Update(AdamWStep);

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let s = self.0;
        by_float!(s2, self.name(), T => {
            let m = data::<T>(s2, l2, self.name())?;
            let v = data::<T>(s3, l3, self.name())?;
            let p = data_mut::<T>(s1, l1, self.name())?;
            check_len(p.len(), m.len(), self.name())?;
            check_len(p.len(), v.len(), self.name())?;
            let decay = T::from_f64(s.decay);
            let step_size = T::from_f64(s.step_size);
            let inv_bc2 = T::from_f64(1.0 / s.bias_correction2_sqrt);
            let eps = T::from_f64(s.eps);
            p.par_chunks_mut(CHUNK)
                .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
                .for_each(|(p, (m, v))| {
                    for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                        let denom = v.sqrt() * inv_bc2 + eps;
                        *p = decay * *p - step_size * (m / denom);
                    }
                });
            Ok(())
        })
    }
}

fn check_len(a: usize, b: usize, op: &str) -> Result<()> {
    if a != b {
        candle_core::bail!("{op}: {a} elements against {b}");
    }
    Ok(())
}
