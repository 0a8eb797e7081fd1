//! Summed cross-entropy `-sum_r log softmax(z_r)[target_r]` over rows whose target is not
//! negative, without materialising the log-probabilities. Backward:
//! `dz_r = g * (softmax(z_r) - onehot(target_r))` on counted rows, zero elsewhere.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{PARALLEL_MIN, Real, by_float, data, for_rows, row_max};

/// Fused summed cross-entropy of `logits` `[.., vocab]` (f32 or f64, CPU) against one target
/// per row (`targets.len()` = number of rows; negative = not counted). Returns a scalar.
pub fn cross_entropy_sum(logits: &Tensor, targets: Vec<i64>) -> Result<Tensor> {
    let vocab = logits.dim(candle_core::D::Minus1)?;
    let rows = logits.elem_count() / vocab.max(1);
    if targets.len() != rows {
        candle_core::bail!(
            "cross_entropy_sum: {} targets for {rows} rows of logits",
            targets.len()
        );
    }
    if let Some(bad) = targets.iter().find(|&&t| t >= vocab as i64) {
        candle_core::bail!("cross_entropy_sum: target {bad} outside the vocabulary of {vocab}");
    }
    logits.contiguous()?.apply_op1(CrossEntropy {
        targets: Arc::new(targets),
    })
}

/// `log(sum(exp(z)))` of one row, stable; `scratch` receives `exp(z - max)`.
fn log_sum_exp<T: Real>(row: &[T], scratch: &mut [T]) -> T {
    let max = row_max(row);
    scratch.copy_from_slice(row);
    max + T::exp_shifted(scratch, max).ln()
}

struct CrossEntropy {
    targets: Arc<Vec<i64>>,
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "retort-cross-entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        let vocab = l1.dims()[l1.dims().len() - 1];
        by_float!(s1, self.name(), T => {
            let z = data::<T>(s1, l1, self.name())?;
            let row_loss = |(r, &target): (usize, &i64)| -> f64 {
                if target < 0 {
                    return 0.0;
                }
                let row = &z[r * vocab..(r + 1) * vocab];
                let mut scratch = vec![T::zero(); vocab];
                let lse = log_sum_exp(row, &mut scratch);
                (lse - row[target as usize]).to_f64()
            };
            // Per-row losses in parallel, summed in row order: the same bits for any schedule.
            let losses: Vec<f64> = if z.len() >= PARALLEL_MIN {
                self.targets.par_iter().enumerate().map(row_loss).collect()
            } else {
                self.targets.iter().enumerate().map(row_loss).collect()
            };
            let total: f64 = losses.iter().sum();
            Ok((T::to_cpu_storage_owned(vec![T::from_f64(total)]), Shape::from(())))
        })
    }

    fn bwd(&self, logits: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.to_dtype(candle_core::DType::F64)?.to_vec0::<f64>()?;
        let dz = logits.apply_op1_no_bwd(&CrossEntropyBwd {
            targets: self.targets.clone(),
            grad: g,
        })?;
        Ok(Some(dz))
    }
}

struct CrossEntropyBwd {
    targets: Arc<Vec<i64>>,
    grad: f64,
}

impl CustomOp1 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "retort-cross-entropy-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        let vocab = l1.dims()[l1.dims().len() - 1];
        by_float!(s1, self.name(), T => {
            let z = data::<T>(s1, l1, self.name())?;
            let g = T::from_f64(self.grad);
            let mut dz = vec![T::zero(); z.len()];
            for_rows(&mut dz, vocab, |r, out| {
                let target = self.targets[r];
                if target < 0 {
                    return;
                }
                let row = &z[r * vocab..(r + 1) * vocab];
                // softmax = exp(z - max) / sum: one pass of exp, written in place.
                let max = row_max(row);
                out.copy_from_slice(row);
                let scale = g / T::exp_shifted(out, max);
                for o in out.iter_mut() {
                    *o *= scale;
                }
                out[target as usize] -= g;
            });
            Ok((T::to_cpu_storage_owned(dz), l1.shape().clone()))
        })
    }
}
