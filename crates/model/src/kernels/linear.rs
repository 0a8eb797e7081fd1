//! `y = x · Wᵀ` for a few rows of `x` (decoding): every output is the dot product of a row of
//! `x` with a contiguous row of `W` `[out, in]`, so `W` is streamed once with no packing (a
//! general GEMM packs the whole weight on every call, which dominates at one or eight rows). A
//! bf16/f16 weight is widened to f32 as it is loaded (weight-only low precision: half the bytes
//! streamed per token).
//!
//! Backward (through candle ops): `dx = dy · W`, `dW = dyᵀ · x`, each only when that input takes
//! part in autograd (a 16-bit weight widened for the product).

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::widen::load8;
use super::widen::{Weight, by_half, has_avx2_f16c, is_half_storage};
use super::{Real, by_float, data};

/// The most rows of `x` the kernel takes; larger inputs go to the GEMM.
pub const MAX_ROWS: usize = 16;

/// Outputs computed per parallel task.
const BLOCK: usize = 64;

/// `x` `[.., in]` times `w` `[out, in]` transposed: `[.., out]` (CPU, at most [`MAX_ROWS`] rows).
/// `x` and `w` are both f32 or both f64, or `x` is f32 and `w` bf16 or f16, widened exactly as
/// it is read (the bits of the f32 weight, at half the bytes read).
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
    dots_by(w_row, x, out, |v| v);
}

/// [`dots`] with each weight passed through `wide` first.
#[inline(always)]
fn dots_by<T: Real, W: Copy>(w_row: &[W], x: &[T], out: &mut [T], wide: impl Fn(W) -> T) {
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
                acc[l] += wide(wc[l]) * xc[l];
            }
        }
        let mut sum = acc.iter().fold(T::zero(), |a, &b| a + b);
        for k in lanes..n {
            sum += wide(w_row[k]) * xr[k];
        }
        *o = sum;
    }
}

/// One dot product of a weight row (f32, or bf16/f16 widened exactly as it is loaded) with an
/// f32 row, AVX2 + FMA: two 8-wide accumulators, so a widened weight gives the bits of its f32
/// value.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(unsafe_code)]
fn dot_avx2<W: Weight>(a: &[W], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut i = 0;
    // SAFETY: every load reads 8 elements at `i..i + 8` with `i + 8 <= n`, inside both slices.
    unsafe {
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        while i + 16 <= n {
            acc0 = _mm256_fmadd_ps(load8(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(load8(pa.add(i + 8)), _mm256_loadu_ps(pb.add(i + 8)), acc1);
            i += 16;
        }
        if i + 8 <= n {
            acc0 = _mm256_fmadd_ps(load8(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            i += 8;
        }
        let acc = _mm256_add_ps(acc0, acc1);
        let quad = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
        let mut sum = _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
        while i < n {
            sum += a[i].widen() * b[i];
            i += 1;
        }
        sum
    }
}

/// Whether the CPU has AVX2 and FMA.
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

/// The dot products of f32 `x`'s rows with one weight row of `W`: [`dot_avx2`] where the CPU has
/// AVX2, FMA and F16C, [`dots_by`] otherwise. Either way a 16-bit weight gives the bits its
/// widened f32 value gives.
fn wide_dots<W: Weight>(w_row: &[W], x: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_f16c() {
        let n = w_row.len();
        for (r, o) in out.iter_mut().enumerate() {
            // SAFETY: the CPU has AVX2, FMA and F16C (checked above).
            #[allow(unsafe_code)]
            let v = unsafe { dot_avx2(w_row, &x[r * n..(r + 1) * n]) };
            *o = v;
        }
        return;
    }
    dots_by(w_row, x, out, W::widen);
}

/// The dot products of `x`'s rows with one weight row of the same dtype: AVX2 + FMA for f32
/// where the CPU has them, [`dots`] otherwise.
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
        wide_dots(w_row, x, out);
    }
}

/// `[rows, in] x [out, in]ᵀ` with `dots` giving one weight row's outputs for every row.
fn run<T: Copy + Default + Send + Sync, W: Sync>(
    x: &[T],
    w: &[W],
    in_dim: usize,
    dots: fn(&[W], &[T], &mut [T]),
) -> Vec<T> {
    let rows = x.len() / in_dim;
    let out_dim = w.len() / in_dim;
    // Blocks of outputs, each `[BLOCK, rows]`, then transposed into `[rows, out]`.
    let block = |b: usize| -> Vec<T> {
        let lo = b * BLOCK;
        let hi = out_dim.min(lo + BLOCK);
        let mut part = vec![T::default(); (hi - lo) * rows];
        for (o, chunk) in (lo..hi).zip(part.chunks_mut(rows)) {
            dots(&w[o * in_dim..(o + 1) * in_dim], x, chunk);
        }
        part
    };
    let n_blocks = out_dim.div_ceil(BLOCK);
    let parts: Vec<Vec<T>> = if w.len() >= super::PARALLEL_MIN * 4 {
        (0..n_blocks).into_par_iter().map(block).collect()
    } else {
        (0..n_blocks).map(block).collect()
    };
    let mut y = vec![T::default(); rows * out_dim];
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
        let name = self.name();
        if is_half_storage(s2) {
            let x = data::<f32>(s1, l1, name)?;
            return by_half!(s2, name, W => {
                let w = data::<W>(s2, l2, name)?;
                let y = run(x, w, in_dim, wide_dots::<W>);
                Ok((CpuStorage::F32(y), Shape::from((rows, out_dim))))
            });
        }
        by_float!(s1, name, T => {
            let x = data::<T>(s1, l1, name)?;
            let w = data::<T>(s2, l2, name)?;
            let y = run(x, w, in_dim, T::row_dots);
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
        // A frozen weight (LoRA's base) or an untracked input costs no product; a 16-bit
        // weight is widened for the product.
        let dx = match x.track_op() {
            true => Some(grad.matmul(&w.to_dtype(grad.dtype())?)?),
            false => None,
        };
        let dw = match w.track_op() {
            true => Some(grad.t()?.matmul(x)?.to_dtype(w.dtype())?),
            false => None,
        };
        Ok((dx, dw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dispatched row dots of a bf16/f16 weight give the bits of its widened f32 weight, and
    /// agree with the portable dots (another summation order) to rounding.
    #[test]
    fn half_weight_dots_are_the_widened_weight_dots() {
        fn check<W: Weight>(narrow: fn(f32) -> W) {
            // 45: two 16-wide steps, one 8-wide step, a tail of 5.
            let n = 45;
            let w: Vec<W> = (0..n)
                .map(|i| narrow(((i * 7 % 13) as f32 - 6.0) / 7.0))
                .collect();
            let wide: Vec<f32> = w.iter().map(|v| v.widen()).collect();
            let x: Vec<f32> = (0..3 * n)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0)
                .collect();
            let mut got = vec![0f32; 3];
            wide_dots(&w, &x, &mut got);
            let mut want = vec![0f32; 3];
            wide_dots(&wide, &x, &mut want);
            assert_eq!(got, want);
            let mut portable = vec![0f32; 3];
            dots_by(&w, &x, &mut portable, W::widen);
            for (g, p) in got.iter().zip(&portable) {
                assert!((g - p).abs() < 1e-5, "{g} vs {p}");
            }
        }
        check::<half::bf16>(half::bf16::from_f32);
        check::<half::f16>(half::f16::from_f32);
    }
}
