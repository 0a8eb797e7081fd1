//! `y = x · Wᵀ` whose every output element is reduced in one fixed order, whatever the number of
//! rows of `x`: the batch-invariant projection of the generation engine.
//!
//! An element is the dot product of a row of `x` with a row of `W` `[out, in]`: sixteen lanes,
//! lane `l` accumulating `x[k] * w[k]` (fused multiply-add) for `k ≡ l (mod 16)` in increasing
//! `k`, then the lanes summed as a fixed tree (`l + 8`, `l + 4`, `l + 2`, `l + 1`), then the
//! `in % 16` tail added in order. The rows are only tiled (4 rows × 4 weight rows share their
//! loads), never split along `in`, so a row computes the same bits alone or among 255 others; a
//! general GEMM blocks the reduction by the problem shape and a GEMV runs for one row, which is
//! why 2 of 256 rows used to flip a token between batch sizes (issue 21).
//!
//! The AVX-512 path and the portable path evaluate the same operations in the same order (a
//! fused multiply-add is exactly rounded wherever it runs), so they agree bit for bit.
//!
//! [`FixedOrder`] is a scope in which [`crate::models::Linear`] takes this kernel for every row
//! count: the engine enters it around a decoding step.

use std::cell::Cell;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{by_float, data};

/// Lanes of one accumulator.
const LANES: usize = 16;
/// Rows of `x` per tile.
const MR: usize = 4;
/// Rows of `W` per tile.
const NR: usize = 4;
/// Rows of `W` per parallel task (its slice of `W` stays in L2 while the rows of `x` stream).
const BLOCK: usize = 64;

thread_local! {
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
}

/// While alive, linear layers on this thread reduce in the fixed order of [`linear_fixed`].
#[derive(Debug)]
pub struct FixedOrder {
    previous: bool,
}

impl FixedOrder {
    /// Enters the scope (nested scopes restore the outer state on drop).
    pub fn enter() -> Self {
        Self {
            previous: ACTIVE.with(|a| a.replace(true)),
        }
    }

    /// Whether a scope is active on this thread.
    pub fn active() -> bool {
        ACTIVE.with(Cell::get)
    }
}

impl Drop for FixedOrder {
    fn drop(&mut self) {
        ACTIVE.with(|a| a.set(self.previous));
    }
}

/// `x` `[.., in]` times `w` `[out, in]` transposed: `[.., out]`, each element in the fixed order
/// described in the module docs (f32 or f64, CPU, any number of rows).
pub fn linear_fixed(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (out_dim, in_dim) = w.dims2()?;
    let x_in = x.dim(candle_core::D::Minus1)?;
    if x_in != in_dim {
        candle_core::bail!(
            "linear_fixed: x {:?} with weight {:?}",
            x.shape(),
            w.shape()
        );
    }
    let rows = x.elem_count() / in_dim.max(1);
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank >= 1") = out_dim;
    let x2 = x.contiguous()?.reshape((rows, in_dim))?;
    x2.apply_op2_no_bwd(&w.contiguous()?, &LinearFixed)?
        .reshape(dims)
}

/// One element in the fixed order, portable (the reference of the tiled kernels).
#[inline(always)]
pub(super) fn dot_fixed<T: num_traits::Float>(x: &[T], w: &[T]) -> T {
    let n = x.len();
    let body = n / LANES * LANES;
    let mut acc = [T::zero(); LANES];
    for (xc, wc) in x[..body]
        .chunks_exact(LANES)
        .zip(w[..body].chunks_exact(LANES))
    {
        for l in 0..LANES {
            acc[l] = xc[l].mul_add(wc[l], acc[l]);
        }
    }
    let mut sum = reduce_lanes(&acc);
    for k in body..n {
        sum = x[k].mul_add(w[k], sum);
    }
    sum
}

/// The fixed reduction tree of sixteen lanes.
#[inline(always)]
fn reduce_lanes<T: num_traits::Float>(acc: &[T; LANES]) -> T {
    let mut s8 = [T::zero(); 8];
    for l in 0..8 {
        s8[l] = acc[l] + acc[l + 8];
    }
    let mut s4 = [T::zero(); 4];
    for l in 0..4 {
        s4[l] = s8[l] + s8[l + 4];
    }
    let s2 = [s4[0] + s4[2], s4[1] + s4[3]];
    s2[0] + s2[1]
}

/// Sixteen lanes with AVX-512 for `mr` rows of `x` and `nr` rows of `w` (`mr, nr <= 4`), same
/// operations as [`dot_fixed`]. `out[r * out_stride + c]` receives row `r` times weight row `c`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(unsafe_code)]
fn tile_avx512<const R: usize, const C: usize>(
    x: &[f32],
    w: &[f32],
    in_dim: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    use std::arch::x86_64::*;
    let body = in_dim / LANES * LANES;
    assert!(
        x.len() >= R * in_dim && w.len() >= C * in_dim,
        "tile inside its operands"
    );
    let (px, pw) = (x.as_ptr(), w.as_ptr());
    // SAFETY: every load reads 16 floats at `row * in_dim + k` with `k + 16 <= body <= in_dim`
    // for `row < R` (resp. `C`), inside `x` (resp. `w`) by the assertion above.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let mut k = 0;
        while k < body {
            let mut wv = [_mm512_setzero_ps(); C];
            for (c, v) in wv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(pw.add(c * in_dim + k));
            }
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let xv = _mm512_loadu_ps(px.add(r * in_dim + k));
                for c in 0..C {
                    acc_r[c] = _mm512_fmadd_ps(xv, wv[c], acc_r[c]);
                }
            }
            k += LANES;
        }
        for (r, acc_r) in acc.iter().enumerate() {
            for (c, &a) in acc_r.iter().enumerate() {
                // The tree of `reduce_lanes`: l + 8, l + 4, l + 2, l + 1.
                let lo = _mm512_castps512_ps256(a);
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1));
                let s8 = _mm256_add_ps(lo, hi);
                let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
                let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
                let mut sum = _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
                for kk in body..in_dim {
                    sum = x[r * in_dim + kk].mul_add(w[c * in_dim + kk], sum);
                }
                out[r * out_stride + c] = sum;
            }
        }
    }
}

/// Whether [`tile_avx512`] may run here.
pub(super) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| std::is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `mr` rows of `x` (at most [`MR`]) times `nr` rows of `w` (at most [`NR`]).
#[allow(unsafe_code)]
fn tile_f32(
    x: &[f32],
    w: &[f32],
    in_dim: usize,
    mr: usize,
    nr: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        macro_rules! call {
            ($r:literal, $c:literal) => {
                // SAFETY: the CPU has AVX-512F (checked above).
                unsafe { tile_avx512::<$r, $c>(x, w, in_dim, out, out_stride) }
            };
        }
        match (mr, nr) {
            (4, 4) => call!(4, 4),
            (4, 3) => call!(4, 3),
            (4, 2) => call!(4, 2),
            (4, 1) => call!(4, 1),
            (3, 4) => call!(3, 4),
            (3, 3) => call!(3, 3),
            (3, 2) => call!(3, 2),
            (3, 1) => call!(3, 1),
            (2, 4) => call!(2, 4),
            (2, 3) => call!(2, 3),
            (2, 2) => call!(2, 2),
            (2, 1) => call!(2, 1),
            (1, 4) => call!(1, 4),
            (1, 3) => call!(1, 3),
            (1, 2) => call!(1, 2),
            _ => call!(1, 1),
        }
        return;
    }
    tile_portable(x, w, in_dim, mr, nr, out, out_stride);
}

fn tile_portable<T: num_traits::Float>(
    x: &[T],
    w: &[T],
    in_dim: usize,
    mr: usize,
    nr: usize,
    out: &mut [T],
    out_stride: usize,
) {
    for r in 0..mr {
        for c in 0..nr {
            out[r * out_stride + c] = dot_fixed(
                &x[r * in_dim..(r + 1) * in_dim],
                &w[c * in_dim..(c + 1) * in_dim],
            );
        }
    }
}

/// Sealed dispatch of a tile to the fastest path of the float type.
trait Tile: num_traits::Float + Send + Sync + candle_core::WithDType {
    fn tile(
        x: &[Self],
        w: &[Self],
        in_dim: usize,
        mr: usize,
        nr: usize,
        out: &mut [Self],
        s: usize,
    );
}

impl Tile for f32 {
    fn tile(
        x: &[Self],
        w: &[Self],
        in_dim: usize,
        mr: usize,
        nr: usize,
        out: &mut [Self],
        s: usize,
    ) {
        tile_f32(x, w, in_dim, mr, nr, out, s);
    }
}

impl Tile for f64 {
    fn tile(
        x: &[Self],
        w: &[Self],
        in_dim: usize,
        mr: usize,
        nr: usize,
        out: &mut [Self],
        s: usize,
    ) {
        tile_portable(x, w, in_dim, mr, nr, out, s);
    }
}

fn run<T: Tile>(x: &[T], w: &[T], in_dim: usize) -> Vec<T> {
    let rows = x.len() / in_dim.max(1);
    let out_dim = w.len() / in_dim.max(1);
    // Each task owns `BLOCK` weight rows and writes a `[rows, BLOCK]` part.
    let block = |b: usize| -> Vec<T> {
        let lo = b * BLOCK;
        let hi = out_dim.min(lo + BLOCK);
        let width = hi - lo;
        let mut part = vec![T::zero(); rows * width];
        for r0 in (0..rows).step_by(MR) {
            let mr = MR.min(rows - r0);
            for c0 in (lo..hi).step_by(NR) {
                let nr = NR.min(hi - c0);
                T::tile(
                    &x[r0 * in_dim..(r0 + mr) * in_dim],
                    &w[c0 * in_dim..(c0 + nr) * in_dim],
                    in_dim,
                    mr,
                    nr,
                    &mut part[r0 * width + (c0 - lo)..],
                    width,
                );
            }
        }
        part
    };
    let n_blocks = out_dim.div_ceil(BLOCK);
    // Parallel split over output columns only, so threads never change a reduction.
    let parts: Vec<Vec<T>> = if rows * w.len() >= super::PARALLEL_MIN {
        (0..n_blocks).into_par_iter().map(block).collect()
    } else {
        (0..n_blocks).map(block).collect()
    };
    let mut y = vec![T::zero(); rows * out_dim];
    for (b, part) in parts.iter().enumerate() {
        let lo = b * BLOCK;
        let width = part.len() / rows.max(1);
        for r in 0..rows {
            y[r * out_dim + lo..r * out_dim + lo + width]
                .copy_from_slice(&part[r * width..(r + 1) * width]);
        }
    }
    y
}

struct LinearFixed;

impl CustomOp2 for LinearFixed {
    fn name(&self) -> &'static str {
        "retort-linear-fixed"
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn a_row_is_the_same_alone_and_in_any_batch() {
        // `in` = 100: six full lane chunks and a tail of four.
        let (in_dim, out_dim) = (100, 70);
        let w = values(out_dim * in_dim, 1);
        let x = values(37 * in_dim, 2);
        let all = run(&x, &w, in_dim);
        for rows in [1, 2, 3, 5, 37] {
            let part = run(&x[..rows * in_dim], &w, in_dim);
            assert_eq!(part, all[..rows * out_dim], "{rows} rows");
        }
        for r in 0..37 {
            for o in 0..out_dim {
                let reference = dot_fixed(
                    &x[r * in_dim..(r + 1) * in_dim],
                    &w[o * in_dim..(o + 1) * in_dim],
                );
                assert_eq!(all[r * out_dim + o].to_bits(), reference.to_bits());
            }
        }
    }

    #[test]
    fn matches_a_plain_product() {
        let (in_dim, out_dim, rows) = (48, 9, 6);
        let w = values(out_dim * in_dim, 3);
        let x = values(rows * in_dim, 4);
        let y = run(&x, &w, in_dim);
        let mut max = 0f32;
        for r in 0..rows {
            for o in 0..out_dim {
                let plain: f32 = (0..in_dim)
                    .map(|k| x[r * in_dim + k] * w[o * in_dim + k])
                    .sum();
                max = max.max((plain - y[r * out_dim + o]).abs());
            }
        }
        println!("max_abs_diff {max:e}");
        assert!(max < 1e-5);
    }
}
