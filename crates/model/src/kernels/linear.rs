//! `y = x · Wᵀ` for a few rows of `x` (decoding): every output is the dot product of a row of
//! `x` with a contiguous row of `W` `[out, in]`, so `W` is streamed once with no packing (a
//! general GEMM packs the whole weight on every call, which dominates at one or eight rows).
//!
//! Backward (through candle ops): `dx = dy · W`, `dW = dyᵀ · x`.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{Real, by_float, data};

/// The most rows of `x` the kernel takes; larger inputs go to the GEMM.
pub const MAX_ROWS: usize = 16;

/// Outputs computed per parallel task.
const BLOCK: usize = 64;

/// `x` `[.., in]` times `w` `[out, in]` transposed: `[.., out]` (same float dtype, CPU, at most
/// [`MAX_ROWS`] rows).
pub fn linear_rows(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (out_dim, in_dim) = w.dims2()?;
    let x_in = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / x_in.max(1);
    if x_in != in_dim || rows > MAX_ROWS {
        candle_core::bail!(
            "linear_rows: x {:?} with weight {:?} (at most {MAX_ROWS} rows)",
            x.shape(),
            w.shape()
        );
    }
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank >= 1") = out_dim;
    let x2 = x.contiguous()?.reshape((rows, in_dim))?;
    x2.apply_op2(&w.contiguous()?, LinearRows)?.reshape(dims)
}

/// Dot products of up to [`MAX_ROWS`] rows of `x` with one weight row, 8 lanes per row; `FMA`
/// fuses multiply and add (only where the CPU has FMA: otherwise it is a slow libm call).
#[inline(always)]
fn dots<T: Real, const FMA: bool>(w_row: &[T], x: &[T], rows: usize, out: &mut [T]) {
    let n = w_row.len();
    let lanes = n / 8 * 8;
    for r in 0..rows {
        let xr = &x[r * n..(r + 1) * n];
        let mut acc = [T::zero(); 8];
        for (wc, xc) in w_row[..lanes]
            .chunks_exact(8)
            .zip(xr[..lanes].chunks_exact(8))
        {
            for l in 0..8 {
                acc[l] = if FMA {
                    wc[l].mul_add(xc[l], acc[l])
                } else {
                    acc[l] + wc[l] * xc[l]
                };
            }
        }
        let mut sum =
            (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        for k in lanes..n {
            sum += w_row[k] * xr[k];
        }
        out[r] = sum;
    }
}

/// [`dots`] compiled for AVX2 + FMA (the default target has neither).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dots_avx2<T: Real>(w_row: &[T], x: &[T], rows: usize, out: &mut [T]) {
    dots::<T, true>(w_row, x, rows, out);
}

fn dots_dispatch<T: Real>(w_row: &[T], x: &[T], rows: usize, out: &mut [T]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features `dots_avx2` is compiled for (checked above).
        #[allow(unsafe_code)]
        unsafe {
            dots_avx2(w_row, x, rows, out);
        }
        return;
    }
    dots::<T, false>(w_row, x, rows, out);
}

fn run<T: Real>(x: &[T], w: &[T], in_dim: usize) -> Vec<T> {
    let rows = x.len() / in_dim;
    let out_dim = w.len() / in_dim;
    // Blocks of outputs, each `[BLOCK, rows]`, then transposed into `[rows, out]`.
    let block = |b: usize| -> Vec<T> {
        let lo = b * BLOCK;
        let hi = out_dim.min(lo + BLOCK);
        let mut part = vec![T::zero(); (hi - lo) * rows];
        for (o, chunk) in (lo..hi).zip(part.chunks_mut(rows)) {
            dots_dispatch(&w[o * in_dim..(o + 1) * in_dim], x, rows, chunk);
        }
        part
    };
    let n_blocks = out_dim.div_ceil(BLOCK);
    let parts: Vec<Vec<T>> = if w.len() >= super::PARALLEL_MIN * 4 {
        (0..n_blocks).into_par_iter().map(block).collect()
    } else {
        (0..n_blocks).map(block).collect()
    };
    let mut y = vec![T::zero(); rows * out_dim];
    for (b, part) in parts.iter().enumerate() {
        for (i, chunk) in part.chunks(rows).enumerate() {
            let o = b * BLOCK + i;
            for (r, &v) in chunk.iter().enumerate() {
                y[r * out_dim + o] = v;
            }
        }
    }
    y
}

struct LinearRows;

impl CustomOp2 for LinearRows {
    fn name(&self) -> &'static str {
        "retort-linear-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, in_dim) = l1.shape().dims2()?;
        let (out_dim, _) = l2.shape().dims2()?;
        by_float!(s1, self.name(), T => {
            let x = data::<T>(s1, l1, self.name())?;
            let w = data::<T>(s2, l2, self.name())?;
            let y = run(x, w, in_dim);
            Ok((T::to_cpu_storage_owned(y), Shape::from((rows, out_dim))))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = grad.matmul(w)?;
        let dw = grad.t()?.matmul(x)?;
        Ok((Some(dx), Some(dw)))
    }
}
