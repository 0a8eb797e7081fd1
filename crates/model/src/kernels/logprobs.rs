//! Per-row log-probability of one target token, `log softmax(z_r)[t_r]`, without materialising
//! the `[rows, vocab]` log-probabilities. Backward: `dz_r = g_r * (onehot(t_r) - softmax(z_r))`.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use rayon::prelude::*;

use super::{PARALLEL_MIN, Real, by_float, data, for_rows, row_max};

/// `log softmax(logits)[.., target]` for `logits` `[.., vocab]` and `targets` `[..]` (integer
/// ids below `vocab`); same leading shape out. f32 or f64 on CPU.
pub fn target_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let vocab = logits.dim(candle_core::D::Minus1)?;
    let lead = &logits.dims()[..logits.rank() - 1];
    if targets.dims() != lead {
        candle_core::bail!(
            "target_logprobs: targets {:?} for logits {:?}",
            targets.shape(),
            logits.shape()
        );
    }
    let ids = targets
        .flatten_all()?
        .to_dtype(candle_core::DType::U32)?
        .to_vec1::<u32>()?;
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("target_logprobs: target {bad} outside the vocabulary of {vocab}");
    }
    logits
        .contiguous()?
        .apply_op1(TargetLogprobs {
            targets: Arc::new(ids),
        })?
        .reshape(lead)
}

struct TargetLogprobs {
    targets: Arc<Vec<u32>>,
}

impl CustomOp1 for TargetLogprobs {
    fn name(&self) -> &'static str {
        "retort-target-logprobs"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        let vocab = l1.dims()[l1.dims().len() - 1];
        by_float!(s1, self.name(), T => {
            let z = data::<T>(s1, l1, self.name())?;
            let rows = self.targets.len();
            let mut out = vec![T::zero(); rows];
            // Rows in blocks: each block reuses one scratch row for exp.
            const BLOCK: usize = 16;
            let run = |b: usize, block: &mut [T]| {
                let mut scratch = vec![T::zero(); vocab];
                for (i, o) in block.iter_mut().enumerate() {
                    let r = b * BLOCK + i;
                    let row = &z[r * vocab..(r + 1) * vocab];
                    let max = row_max(row);
                    scratch.copy_from_slice(row);
                    let lse = max + T::exp_shifted(&mut scratch, max).ln();
                    *o = row[self.targets[r] as usize] - lse;
                }
            };
            if z.len() >= PARALLEL_MIN {
                out.par_chunks_mut(BLOCK).enumerate().for_each(|(b, block)| run(b, block));
            } else {
                out.chunks_mut(BLOCK).enumerate().for_each(|(b, block)| run(b, block));
            }
            Ok((T::to_cpu_storage_owned(out), Shape::from(rows)))
        })
    }

    fn bwd(&self, logits: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dz = logits.apply_op2_no_bwd(
            &grad.flatten_all()?.contiguous()?,
            &TargetLogprobsBwd {
                targets: self.targets.clone(),
            },
        )?;
        Ok(Some(dz))
    }
}

/// `(z, g)` to `dz_r = g_r * (onehot(t_r) - softmax(z_r))`.
struct TargetLogprobsBwd {
    targets: Arc<Vec<u32>>,
}

impl CustomOp2 for TargetLogprobsBwd {
    fn name(&self) -> &'static str {
        "retort-target-logprobs-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let vocab = l1.dims()[l1.dims().len() - 1];
        by_float!(s1, self.name(), T => {
            let z = data::<T>(s1, l1, self.name())?;
            let g = data::<T>(s2, l2, self.name())?;
            let mut dz = vec![T::zero(); z.len()];
            for_rows(&mut dz, vocab, |r, out| {
                let row = &z[r * vocab..(r + 1) * vocab];
                let max = row_max(row);
                out.copy_from_slice(row);
                let scale = -g[r] / T::exp_shifted(out, max);
                for o in out.iter_mut() {
                    *o *= scale;
                }
                out[self.targets[r] as usize] += g[r];
            });
            Ok((T::to_cpu_storage_owned(dz), l1.shape().clone()))
        })
    }
}
