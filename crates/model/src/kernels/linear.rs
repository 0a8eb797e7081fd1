//! `y = x · Wᵀ` for a few rows of `x` (decoding): every output is the dot product of a row of
//! `x` with a contiguous row of `W` `[out, in]`, so `W` is streamed once with no packing (a
//! general GEMM packs the whole weight on every call, which dominates at one or eight rows).
//!
//! Backward (through candle ops): `dx = dy · W`, `dW = dyᵀ · x`, each only when that input takes
//! part in autograd.

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

/// Dot products of the rows of `x` with one weight row, portable: 8 independent lanes.
fn dots<T: Real>(w_row: &[T], x: &[T], out: &mut [T]) {
    let n = w_row.len();
    let lanes = n / 8 * 8;
    for (r, o) in out.iter_mut().enumerate() {
        let xr = &x[r * n..(r + 1) * n];
        let mut acc = [T::zero(); 8];
        for (wc, xc) in w_row[..lanes]
            .chunks_exact(8)
            .zip(xr[..lanes].chunks_exact(8))
        {
            for l in 0..8 {
                acc[l] += wc[l] * xc[l];
            }
        }
        let mut sum = acc.iter().fold(T::zero(), |a, &b| a + b);
        for k in lanes..n {
            sum += w_row[k] * xr[k];
        }
        *o = sum;
    }
}

/// One f32 dot product with AVX2 + FMA, two 8-wide accumulators.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(unsafe_code)]
fn dot_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut i = 0;
    // SAFETY: every load reads 8 floats at `i..i + 8` with `i + 8 <= n`, inside both slices.
    unsafe {
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        while i + 16 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 8)),
                _mm256_loadu_ps(pb.add(i + 8)),
                acc1,
            );
            i += 16;
        }
        if i + 8 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            i += 8;
        }
        let acc = _mm256_add_ps(acc0, acc1);
        let quad = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
        let mut sum = _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
        while i < n {
            sum += a[i] * b[i];
            i += 1;
        }
        sum
    }
}

/// Whether [`dot_f32_avx2`] may run here.
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The dot products of `x`'s rows with one weight row: AVX2 + FMA for f32 where the CPU has
/// them, [`dots`] otherwise.
pub(crate) trait RowDots: Sized {
    fn row_dots(w_row: &[Self], x: &[Self], out: &mut [Self]);
}

impl RowDots for f64 {
    fn row_dots(w_row: &[Self], x: &[Self], out: &mut [Self]) {
        dots(w_row, x, out);
    }
}

impl RowDots for f32 {
    fn row_dots(w_row: &[Self], x: &[Self], out: &mut [Self]) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            let n = w_row.len();
            for (r, o) in out.iter_mut().enumerate() {
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                #[allow(unsafe_code)]
                let v = unsafe { dot_f32_avx2(w_row, &x[r * n..(r + 1) * n]) };
                *o = v;
            }
            return;
        }
        dots(w_row, x, out);
    }
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
            T::row_dots(&w[o * in_dim..(o + 1) * in_dim], x, chunk);
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
        // A frozen weight (LoRA's base) or an untracked input costs no product.
        let dx = match x.track_op() {
            true => Some(grad.matmul(w)?),
            false => None,
        };
        let dw = match w.track_op() {
            true => Some(grad.t()?.matmul(x)?),
            false => None,
        };
        Ok((dx, dw))
    }
}
