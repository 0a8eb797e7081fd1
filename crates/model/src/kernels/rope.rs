//! RoPE in the "rotate_half" layout: `y = x * cos + rotate_half(x) * sin` with
//! `rotate_half([x1, x2]) = [-x2, x1]` over the halves of the last dim.
//!
//! The map is linear in `x`, so the backward is its transpose:
//! `dx = dy * cos + [dy2 * sin2, -dy1 * sin1]`.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::{Real, by_float, data, for_rows};

/// Fused RoPE on `x` `[b, heads, t, d]` with `cos`, `sin` `[b or 1, 1, t, d]` (same float
/// dtype, CPU).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, _, t, d) = x.dims4()?;
    let (cb, one, ct, cd) = cos.dims4()?;
    if (one, ct, cd) != (1, t, d) || !(cb == b || cb == 1) || sin.dims() != cos.dims() || d % 2 != 0
    {
        candle_core::bail!(
            "rope: x {:?} with cos {:?}, sin {:?}",
            x.shape(),
            cos.shape(),
            sin.shape()
        );
    }
    x.contiguous()?.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        Rope { transpose: false },
    )
}

/// The rotation, or its transpose (the backward).
struct Rope {
    transpose: bool,
}

impl Rope {
    fn run<T: Real>(
        &self,
        x: &[T],
        cos: &[T],
        sin: &[T],
        dims: (usize, usize, usize, usize),
    ) -> Vec<T> {
        let (_, heads, t, d) = dims;
        let half = d / 2;
        let cos_batches = cos.len() / (t * d);
        let mut y = vec![T::zero(); x.len()];
        for_rows(&mut y, d, |row, out| {
            let bi = row / (heads * t);
            let ti = row % t;
            let at = ((bi % cos_batches) * t + ti) * d;
            let (c, s) = (&cos[at..at + d], &sin[at..at + d]);
            let xr = &x[row * d..(row + 1) * d];
            if self.transpose {
                for k in 0..half {
                    out[k] = xr[k] * c[k] + xr[k + half] * s[k + half];
                    out[k + half] = xr[k + half] * c[k + half] - xr[k] * s[k];
                }
            } else {
                for k in 0..half {
                    out[k] = xr[k] * c[k] - xr[k + half] * s[k];
                    out[k + half] = xr[k + half] * c[k + half] + xr[k] * s[k + half];
                }
            }
        });
        y
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        if self.transpose {
            "retort-rope-bwd"
        } else {
            "retort-rope"
        }
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
        let dims = l1.shape().dims4()?;
        by_float!(s1, self.name(), T => {
            let x = data::<T>(s1, l1, self.name())?;
            let cos = data::<T>(s2, l2, self.name())?;
            let sin = data::<T>(s3, l3, self.name())?;
            let y = self.run(x, cos, sin, dims);
            Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
        })
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = grad
            .contiguous()?
            .apply_op3_no_bwd(cos, sin, &Self { transpose: true })?;
        Ok((Some(dx), None, None))
    }
}
