//! The attention softmax: `y = softmax(scale * s + bias)` over the last dim, with the additive
//! mask fused in. Backward: `ds = scale * y * (dy - sum(dy * y))`.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use super::{Real, by_float, data, for_rows, row_max};

/// Fused `softmax(scale * scores + bias)` over the last dim of `scores` `[b, h, t, s]`; `bias`
/// `[b or 1, 1, t, s]` is a constant (no gradient). Same float dtype, CPU.
pub fn scaled_softmax(scores: &Tensor, bias: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let scores = scores.contiguous()?;
    match bias {
        None => scores.apply_op1(ScaledSoftmax { scale }),
        Some(bias) => {
            let (b, _, t, s) = scores.dims4()?;
            let (bb, one, bt, bs) = bias.dims4()?;
            if (one, bt, bs) != (1, t, s) || !(bb == b || bb == 1) {
                candle_core::bail!(
                    "scaled_softmax: scores {:?} with bias {:?}",
                    scores.shape(),
                    bias.shape()
                );
            }
            scores.apply_op2(&bias.contiguous()?, ScaledSoftmax { scale })
        }
    }
}

struct ScaledSoftmax {
    scale: f64,
}

impl ScaledSoftmax {
    fn run<T: Real>(&self, x: &[T], bias: Option<&[T]>, dims: &[usize]) -> Vec<T> {
        let s = dims[dims.len() - 1];
        let (heads, t) = if dims.len() == 4 {
            (dims[1], dims[2])
        } else {
            (1, 1)
        };
        let scale = T::from_f64(self.scale);
        let mut y = vec![T::zero(); x.len()];
        for_rows(&mut y, s, |row, out| {
            let xr = &x[row * s..(row + 1) * s];
            match bias {
                Some(bias) => {
                    let bias_batches = bias.len() / (t * s);
                    let bi = (row / (heads * t)) % bias_batches;
                    let at = (bi * t + row % t) * s;
                    for ((o, &v), &m) in out.iter_mut().zip(xr).zip(&bias[at..at + s]) {
                        *o = v * scale + m;
                    }
                }
                None => {
                    for (o, &v) in out.iter_mut().zip(xr) {
                        *o = v * scale;
                    }
                }
            }
            let max = row_max(out);
            let sum = T::exp_shifted(out, max);
            let inv = sum.recip();
            for o in out.iter_mut() {
                *o *= inv;
            }
        });
        y
    }
}

impl CustomOp1 for ScaledSoftmax {
    fn name(&self) -> &'static str {
        "retort-scaled-softmax"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        by_float!(s1, CustomOp1::name(self), T => {
            let x = data::<T>(s1, l1, CustomOp1::name(self))?;
            let y = self.run(x, None, l1.dims());
            Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
        })
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let ds = res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBwd { scale: self.scale })?;
        Ok(Some(ds))
    }
}

impl CustomOp2 for ScaledSoftmax {
    fn name(&self) -> &'static str {
        "retort-scaled-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_float!(s1, CustomOp1::name(self), T => {
            let x = data::<T>(s1, l1, CustomOp1::name(self))?;
            let bias = data::<T>(s2, l2, CustomOp1::name(self))?;
            let y = self.run(x, Some(bias), l1.dims());
            Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
        })
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        _bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let ds = res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBwd { scale: self.scale })?;
        Ok((Some(ds), None))
    }
}

/// `(y, dy)` to `scale * y * (dy - sum(dy * y))`, row by row.
struct SoftmaxBwd {
    scale: f64,
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "retort-scaled-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let s = l1.dims()[l1.dims().len() - 1];
        by_float!(s1, self.name(), T => {
            let y = data::<T>(s1, l1, self.name())?;
            let dy = data::<T>(s2, l2, self.name())?;
            let scale = T::from_f64(self.scale);
            let mut dx = vec![T::zero(); y.len()];
            for_rows(&mut dx, s, |row, out| {
                let yr = &y[row * s..(row + 1) * s];
                let gr = &dy[row * s..(row + 1) * s];
                let dot = yr.iter().zip(gr).fold(T::zero(), |acc, (&a, &b)| acc + a * b);
                for ((o, &yv), &gv) in out.iter_mut().zip(yr).zip(gr) {
                    *o = scale * yv * (gv - dot);
                }
            });
            Ok((T::to_cpu_storage_owned(dx), l1.shape().clone()))
        })
    }
}
