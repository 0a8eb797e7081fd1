//! The linear layer `y = x · Wᵀ (+ b)` over many rows, as one custom op with its own backward.
//!
//! Each product calls the `gemm` crate directly with the operands' natural strides: the weight
//! gradient `dW = dyᵀ · x` is written straight into `W`'s `[out, in]` layout, where candle's
//! matmul backward forms `xᵀ · dy` as `[in, out]` and copies it transposed. The bias is fused:
//! the output starts as the broadcast bias and the GEMM accumulates onto it; its gradient is the
//! column sum of `dy`.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{Real, by_float, data};

/// `x` `[.., in]` times `w` `[out, in]` transposed, plus `bias` `[out]`: `[.., out]` (one float
/// dtype, CPU).
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (out_dim, in_dim) = w.dims2()?;
    let x_in = x.dim(candle_core::D::Minus1)?;
    if x_in != in_dim {
        candle_core::bail!("linear: x {:?} with weight {:?}", x.shape(), w.shape());
    }
    let rows = x.elem_count() / in_dim.max(1);
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank >= 1") = out_dim;
    let x2 = x.contiguous()?.reshape((rows, in_dim))?;
    let w = w.contiguous()?;
    let y = match bias {
        Some(b) => x2.apply_op3(&w, &b.contiguous()?, LinearBias)?,
        None => x2.apply_op2(&w, Linear)?,
    };
    y.reshape(dims)
}

/// `x` `[.., in]` times a frozen `w` `[out, in]` of any float dtype, computed in `x`'s dtype
/// (f32 or f64, CPU). `W` is widened per call, in the forward and again in the backward, and never
/// kept wide, so a bf16 base costs half the memory of an f32 one. The backward gives `dx` only.
pub fn linear_frozen(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if w.dtype() == x.dtype() {
        return linear(x, &w.detach(), None);
    }
    let (out_dim, in_dim) = w.dims2()?;
    if x.dim(candle_core::D::Minus1)? != in_dim {
        candle_core::bail!(
            "linear_frozen: x {:?} with weight {:?}",
            x.shape(),
            w.shape()
        );
    }
    let rows = x.elem_count() / in_dim.max(1);
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank >= 1") = out_dim;
    let x2 = x.contiguous()?.reshape((rows, in_dim))?;
    let op = FrozenLinear {
        w: w.detach().contiguous()?,
    };
    x2.apply_op1(op)?.reshape(dims)
}

/// Forward of [`linear_frozen`]: `[rows, in] x [out, in] -> [rows, out]`, `W` in its own dtype.
struct FrozenLinear {
    w: Tensor,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "linear-frozen"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        by_float!(s, self.name(), T => {
            let x = data::<T>(s, l, self.name())?;
            let wide = self.w.to_dtype(T::DTYPE)?;
            let (storage, layout) = wide.storage_and_layout();
            let candle_core::Storage::Cpu(cpu) = &*storage else {
                candle_core::bail!("{}: the weight is not on the CPU", self.name());
            };
            let w = data::<T>(cpu, layout, self.name())?;
            forward(x, l, w, layout, None)
        })
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let wide = self.w.to_dtype(grad.dtype())?;
        Ok(Some(
            grad.contiguous()?.apply_op2_no_bwd(&wide, &Grad::Input)?,
        ))
    }
}

/// A row-major view of a matrix inside a slice: element `(i, j)` at `i * rs + j * cs`.
#[derive(Clone, Copy)]
struct View<'a, T> {
    data: &'a [T],
    rs: usize,
    cs: usize,
}

impl<'a, T> View<'a, T> {
    fn row_major(data: &'a [T], cols: usize) -> Self {
        Self {
            data,
            rs: cols,
            cs: 1,
        }
    }

    fn transposed(self) -> Self {
        Self {
            data: self.data,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Whether every element of an `rows x cols` matrix lies inside the slice.
    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// `dst` (`m x n`, row-major) `= lhs · rhs` (`m x k` and `k x n`), or `+=` when `accumulate`.
fn gemm_into<T: Real>(
    dst: &mut [T],
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
    lhs: View<'_, T>,
    rhs: View<'_, T>,
) -> Result<()> {
    if dst.len() != m * n || !lhs.fits(m, k) || !rhs.fits(k, n) {
        candle_core::bail!("gemm: operands do not fit a {m}x{k} by {k}x{n} product");
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            dst.fill(T::zero());
        }
        return Ok(());
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the checks above keep every element the product reads or writes inside `dst`,
    // `lhs.data` and `rhs.data` (all strides are non-negative); `dst` is borrowed mutably and
    // does not overlap the shared operands.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

/// Forward: `[rows, in] x [out, in] -> [rows, out]`.
struct Linear;

/// Forward with a bias: `[rows, in] x [out, in] + [out] -> [rows, out]`.
struct LinearBias;

fn forward<T: Real>(
    x: &[T],
    lx: &Layout,
    w: &[T],
    lw: &Layout,
    bias: Option<&[T]>,
) -> Result<(CpuStorage, Shape)> {
    let (rows, in_dim) = lx.shape().dims2()?;
    let (out_dim, _) = lw.shape().dims2()?;
    let mut y = match bias {
        Some(b) => {
            let mut y = Vec::with_capacity(rows * out_dim);
            for _ in 0..rows {
                y.extend_from_slice(b);
            }
            y
        }
        None => vec![T::zero(); rows * out_dim],
    };
    gemm_into(
        &mut y,
        rows,
        out_dim,
        in_dim,
        bias.is_some(),
        View::row_major(x, in_dim),
        View::row_major(w, in_dim).transposed(),
    )?;
    Ok((T::to_cpu_storage_owned(y), Shape::from((rows, out_dim))))
}

/// The gradients with respect to `x` and `w` (and `bias`), each only when that input takes part
/// in autograd: a frozen weight costs no weight-gradient GEMM.
fn backward(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    grad: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let grad = grad.contiguous()?;
    let dx = match x.track_op() {
        true => Some(grad.apply_op2_no_bwd(w, &Grad::Input)?),
        false => None,
    };
    let dw = match w.track_op() {
        true => Some(grad.apply_op2_no_bwd(x, &Grad::Weight)?),
        false => None,
    };
    let db = match bias {
        Some(b) if b.track_op() => Some(grad.apply_op1_no_bwd(&ColumnSums)?),
        _ => None,
    };
    Ok((dx, dw, db))
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "linear"
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
            forward(x, l1, w, l2, None)
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = backward(x, w, None, grad)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for LinearBias {
    fn name(&self) -> &'static str {
        "linear-bias"
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
            let name = self.name();
            let x = data::<T>(s1, l1, name)?;
            let w = data::<T>(s2, l2, name)?;
            let b = data::<T>(s3, l3, name)?;
            if b.len() != l2.shape().dims2()?.0 {
                candle_core::bail!("{name}: bias {:?} for weight {:?}", l3.shape(), l2.shape());
            }
            forward(x, l1, w, l2, Some(b))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        backward(x, w, Some(b), grad)
    }
}

/// A gradient product of the linear layer, from `dy` `[rows, out]` and a second operand.
#[derive(Clone, Copy)]
enum Grad {
    /// `dx = dy · W` with `W` `[out, in]`: `[rows, in]`.
    Input,
    /// `dW = dyᵀ · x` with `x` `[rows, in]`: `[out, in]`.
    Weight,
}

impl CustomOp2 for Grad {
    fn name(&self) -> &'static str {
        match self {
            Self::Input => "linear-input-grad",
            Self::Weight => "linear-weight-grad",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_float!(s1, self.name(), T => {
            let dy = data::<T>(s1, l1, self.name())?;
            let other = data::<T>(s2, l2, self.name())?;
            let (rows, out_dim) = l1.shape().dims2()?;
            let (_, in_dim) = l2.shape().dims2()?;
            let dy_view = View::row_major(dy, out_dim);
            let other_view = View::row_major(other, in_dim);
            // (m, k, lhs): the product is `m x in_dim` over `k`.
            let (m, k, lhs) = match self {
                Self::Input => (rows, out_dim, dy_view),
                Self::Weight => (out_dim, rows, dy_view.transposed()),
            };
            let mut out = vec![T::zero(); m * in_dim];
            gemm_into(&mut out, m, in_dim, k, false, lhs, other_view)?;
            Ok((T::to_cpu_storage_owned(out), Shape::from((m, in_dim))))
        })
    }
}

/// Rows per partial sum of [`ColumnSums`]; partials are added in row order, so the result does
/// not depend on the thread schedule.
const SUM_ROWS: usize = 64;

/// The bias gradient: `[rows, n] -> [n]`, the sum over rows.
struct ColumnSums;

impl CustomOp1 for ColumnSums {
    fn name(&self) -> &'static str {
        "linear-bias-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        by_float!(s, self.name(), T => {
            let xs = data::<T>(s, l, self.name())?;
            let (_, n) = l.shape().dims2()?;
            let partials: Vec<Vec<T>> = xs
                .par_chunks(SUM_ROWS * n.max(1))
                .map(|block| {
                    let mut acc = vec![T::zero(); n];
                    for row in block.chunks(n.max(1)) {
                        for (a, &v) in acc.iter_mut().zip(row) {
                            *a += v;
                        }
                    }
                    acc
                })
                .collect();
            let mut sums = vec![T::zero(); n];
            for part in &partials {
                for (a, &v) in sums.iter_mut().zip(part) {
                    *a += v;
                }
            }
            Ok((T::to_cpu_storage_owned(sums), Shape::from(n)))
        })
    }
}
