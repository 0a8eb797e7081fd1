//! The gated MLP activation `y = silu(g) * u`, `silu(g) = g * sigmoid(g)`.
//! Backward: `du = dy * silu(g)`, `dg = dy * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))`.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::{Real, by_float, data, for_rows};

/// Fused `silu(gate) * up` (same shape and float dtype, CPU).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() {
        candle_core::bail!("swiglu: gate {:?}, up {:?}", gate.shape(), up.shape());
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, Swiglu)
}

/// `out[k] = sigmoid(g[k])` over one chunk.
fn sigmoid_into<T: Real>(g: &[T], out: &mut [T]) {
    for (o, &gv) in out.iter_mut().zip(g) {
        *o = -gv;
    }
    T::exp_shifted(out, T::zero());
    for o in out.iter_mut() {
        *o = (T::one() + *o).recip();
    }
}

/// Rows of this many elements are the unit of parallel work.
const CHUNK: usize = 4096;

struct Swiglu;

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "retort-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_float!(s1, self.name(), T => {
            let g = data::<T>(s1, l1, self.name())?;
            let u = data::<T>(s2, l2, self.name())?;
            let mut y = vec![T::zero(); g.len()];
            for_rows(&mut y, CHUNK, |c, out| {
                let at = c * CHUNK;
                let (g, u) = (&g[at..at + out.len()], &u[at..at + out.len()]);
                sigmoid_into(g, out);
                for ((o, &gv), &uv) in out.iter_mut().zip(g).zip(u) {
                    *o = gv * *o * uv;
                }
            });
            Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
        })
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let packed = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &SwigluBwd)?;
        let dg = packed.get(0)?.reshape(gate.shape())?;
        let du = packed.get(1)?.reshape(up.shape())?;
        Ok((Some(dg), Some(du)))
    }
}

/// `(g, u, dy)` to `[2, n]`: `dg`, then `du`.
struct SwigluBwd;

impl CustomOp3 for SwigluBwd {
    fn name(&self) -> &'static str {
        "retort-swiglu-bwd"
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
            let g = data::<T>(s1, l1, self.name())?;
            let u = data::<T>(s2, l2, self.name())?;
            let dy = data::<T>(s3, l3, self.name())?;
            let n = g.len();
            let mut out = vec![T::zero(); 2 * n];
            let (dg, du) = out.split_at_mut(n);
            for_rows(dg, CHUNK, |c, out| {
                let at = c * CHUNK;
                let m = out.len();
                sigmoid_into(&g[at..at + m], out);
                for (k, o) in out.iter_mut().enumerate() {
                    let (gv, sg) = (g[at + k], *o);
                    *o = dy[at + k] * u[at + k] * sg * (T::one() + gv * (T::one() - sg));
                }
            });
            for_rows(du, CHUNK, |c, out| {
                let at = c * CHUNK;
                let m = out.len();
                sigmoid_into(&g[at..at + m], out);
                for (k, o) in out.iter_mut().enumerate() {
                    *o *= dy[at + k] * g[at + k];
                }
            });
            Ok((T::to_cpu_storage_owned(out), Shape::from((2, n))))
        })
    }
}
