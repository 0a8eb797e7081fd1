//! RMSNorm over the last dim: `y = x * r * w` with `r = (mean(x^2) + eps)^-1/2` per row.
//!
//! Backward, with `g = dy * w`: `dx = r * g - x * r^3 * mean(g * x)`, `dw = sum_rows(dy * x * r)`.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{PARALLEL_MIN, Real, by_float, data, for_rows};

/// Fused RMSNorm of `x` `[.., n]` with weight `w` `[n]` (same float dtype, CPU).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let n = x.dim(candle_core::D::Minus1)?;
    if w.dims() != [n] {
        candle_core::bail!("rms_norm: weight {:?} for rows of {n}", w.shape());
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
}

fn inv_rms<T: Real>(row: &[T], eps: f64) -> T {
    let ss = row.iter().fold(T::zero(), |acc, &v| acc + v * v);
    let mean = ss / T::from_f64(row.len() as f64);
    (mean + T::from_f64(eps)).sqrt().recip()
}

struct RmsNorm {
    eps: f64,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "retort-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_float!(s1, self.name(), T => {
            let x = data::<T>(s1, l1, self.name())?;
            let w = data::<T>(s2, l2, self.name())?;
            let n = w.len();
            let mut y = vec![T::zero(); x.len()];
            for_rows(&mut y, n, |i, out| {
                let row = &x[i * n..(i + 1) * n];
                let r = inv_rms(row, self.eps);
                for ((o, &v), &wv) in out.iter_mut().zip(row).zip(w) {
                    *o = v * r * wv;
                }
            });
            Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &RmsNormBwd { eps: self.eps })?;
        let rows = x.elem_count() / w.elem_count();
        let dx = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        // A frozen weight (LoRA's base) gets no gradient entry; the pass computes it anyway.
        let dw = match w.track_op() {
            true => Some(packed.narrow(0, rows, 1)?.reshape(w.shape())?),
            false => None,
        };
        Ok((Some(dx), dw))
    }
}

/// `(x, w, dy)` to `[rows + 1, n]`: the rows of `dx`, then `dw`.
struct RmsNormBwd {
    eps: f64,
}

impl RmsNormBwd {
    fn run<T: Real>(&self, x: &[T], w: &[T], dy: &[T]) -> Vec<T> {
        let n = w.len();
        let rows = x.len() / n;
        let mut out = vec![T::zero(); (rows + 1) * n];
        let (dx, dw) = out.split_at_mut(rows * n);
        // dw partial sums per block of rows, then summed.
        let block = if x.len() >= PARALLEL_MIN {
            rows.div_ceil(rayon::current_num_threads().max(1)).max(1)
        } else {
            rows.max(1)
        };
        let partials: Vec<Vec<T>> = dx
            .par_chunks_mut(block * n)
            .enumerate()
            .map(|(b, dx_block)| {
                let mut dw_part = vec![T::zero(); n];
                for (j, dx_row) in dx_block.chunks_mut(n).enumerate() {
                    let i = b * block + j;
                    let xr = &x[i * n..(i + 1) * n];
                    let gr = &dy[i * n..(i + 1) * n];
                    let r = inv_rms(xr, self.eps);
                    let mut dot = T::zero();
                    for k in 0..n {
                        dot += gr[k] * w[k] * xr[k];
                        dw_part[k] += gr[k] * xr[k] * r;
                    }
                    let c = r * r * r * dot / T::from_f64(n as f64);
                    for k in 0..n {
                        dx_row[k] = r * gr[k] * w[k] - xr[k] * c;
                    }
                }
                dw_part
            })
            .collect();
        for part in partials {
            for (d, p) in dw.iter_mut().zip(part) {
                *d += p;
            }
        }
        out
    }
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "retort-rms-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_float!(s1, self.name(), T => {
            let x = data::<T>(s1, l1, self.name())?;
            let w = data::<T>(s2, l2, self.name())?;
            let dy = data::<T>(s3, l3, self.name())?;
            let n = w.len();
            let out = self.run(x, w, dy);
            Ok((T::to_cpu_storage_owned(out), Shape::from((x.len() / n + 1, n))))
        })
    }
}
