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
//! The AVX-512 path, the AVX2 path (the sixteen lanes as two 8-wide halves) and the portable path
//! evaluate the same operations in the same order (a fused multiply-add is exactly rounded
//! wherever it runs), so they agree bit for bit. A bf16/f16 weight is widened to f32 as it is
//! loaded, which is exact: the result has the bits of the f32 weight, at half the bytes read.
//!
//! [`FixedOrder`] is a scope in which [`crate::models::Linear`] takes this kernel for every row
//! count: the engine enters it around a decoding step.

use std::cell::Cell;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::widen::{Weight, by_half, is_half_storage};
#[cfg(target_arch = "x86_64")]
use super::widen::{load8, load16};
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
/// described in the module docs (CPU, any number of rows). `x` and `w` are both f32 or both f64,
/// or `x` is f32 and `w` bf16 or f16: the weight is then widened as it is read, which is exact, so
/// the result has the bits the f32 weight would give.
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
    dot_fixed_by(x, w, |v| v)
}

/// [`dot_fixed`] with each weight passed through `wide` first.
#[inline(always)]
fn dot_fixed_by<T: num_traits::Float, W: Copy>(x: &[T], w: &[W], wide: impl Fn(W) -> T) -> T {
    let n = x.len();
    let body = n / LANES * LANES;
    let mut acc = [T::zero(); LANES];
    for (xc, wc) in x[..body]
        .chunks_exact(LANES)
        .zip(w[..body].chunks_exact(LANES))
    {
        for l in 0..LANES {
            acc[l] = xc[l].mul_add(wide(wc[l]), acc[l]);
        }
    }
    let mut sum = reduce_lanes(&acc);
    for k in body..n {
        sum = x[k].mul_add(wide(w[k]), sum);
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

/// The tree of [`reduce_lanes`] from its second level (`l + 4`, `l + 2`, `l + 1`) on the eight
/// sums `acc[l] + acc[l + 8]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn reduce8(s8: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)))
}

/// Sixteen lanes with AVX-512 for `R` rows of `x` and `C` rows of `w` (`R <= 4`, `C <= 8`), same
/// operations as [`dot_fixed`] (the weight widened exactly as it is loaded).
/// `out[r * out_stride + c]` receives row `r` times weight row `c`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[allow(unsafe_code)]
fn tile_avx512<W: Weight, const R: usize, const C: usize>(
    x: &[f32],
    w: &[W],
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
    // SAFETY: every load reads 16 elements at `row * in_dim + k` with `k + 16 <= body <= in_dim`
    // for `row < R` (resp. `C`), inside `x` (resp. `w`) by the assertion above.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let mut k = 0;
        while k < body {
            let mut wv = [_mm512_setzero_ps(); C];
            for (c, v) in wv.iter_mut().enumerate() {
                *v = load16(pw.add(c * in_dim + k));
                // The next tile's rows, ahead of use: short rows give the hardware prefetcher
                // little to train on.
                _mm_prefetch::<_MM_HINT_T0>(pw.wrapping_add((c + C) * in_dim + k).cast());
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
                // The tree of `reduce_lanes`: l + 8, then `reduce8`.
                let lo = _mm512_castps512_ps256(a);
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1));
                let mut sum = reduce8(_mm256_add_ps(lo, hi));
                for kk in body..in_dim {
                    sum = x[r * in_dim + kk].mul_add(w[c * in_dim + kk].widen(), sum);
                }
                out[r * out_stride + c] = sum;
            }
        }
    }
}

/// [`tile_avx512`] with AVX2 and FMA: the sixteen lanes as two 8-wide halves (lanes `0..8` and
/// `8..16`), same operations in the same order. `R, C <= 2` (the accumulators fit the 16
/// registers).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(unsafe_code)]
fn tile_avx2<W: Weight, const R: usize, const C: usize>(
    x: &[f32],
    w: &[W],
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
    // SAFETY: every load reads 8 elements at `row * in_dim + k (+ 8)` with `k + 16 <= body <=
    // in_dim` for `row < R` (resp. `C`), inside `x` (resp. `w`) by the assertion above.
    unsafe {
        let mut lo = [[_mm256_setzero_ps(); C]; R];
        let mut hi = [[_mm256_setzero_ps(); C]; R];
        let mut k = 0;
        while k < body {
            let mut w_lo = [_mm256_setzero_ps(); C];
            let mut w_hi = [_mm256_setzero_ps(); C];
            for c in 0..C {
                w_lo[c] = load8(pw.add(c * in_dim + k));
                w_hi[c] = load8(pw.add(c * in_dim + k + 8));
            }
            for r in 0..R {
                let x_lo = _mm256_loadu_ps(px.add(r * in_dim + k));
                let x_hi = _mm256_loadu_ps(px.add(r * in_dim + k + 8));
                for c in 0..C {
                    lo[r][c] = _mm256_fmadd_ps(x_lo, w_lo[c], lo[r][c]);
                    hi[r][c] = _mm256_fmadd_ps(x_hi, w_hi[c], hi[r][c]);
                }
            }
            k += LANES;
        }
        for r in 0..R {
            for c in 0..C {
                let mut sum = reduce8(_mm256_add_ps(lo[r][c], hi[r][c]));
                for kk in body..in_dim {
                    sum = x[r * in_dim + kk].mul_add(w[c * in_dim + kk].widen(), sum);
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
        *DETECTED.get_or_init(|| {
            std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `mr` rows of `x` (at most [`MR`]) times `nr` rows of `w` (at most [`NR`], `2 * NR` for one or
/// two rows), f32 results, the weight f32 or widened: AVX-512, else AVX2 + FMA, else portable;
/// all give the same bits.
#[allow(unsafe_code)]
fn tile_wide<W: Weight>(
    x: &[f32],
    w: &[W],
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
                unsafe { tile_avx512::<W, $r, $c>(x, w, in_dim, out, out_stride) }
            };
        }
        match (mr, nr) {
            (1, 8) => call!(1, 8),
            (1, 7) => call!(1, 7),
            (1, 6) => call!(1, 6),
            (1, 5) => call!(1, 5),
            (2, 8) => call!(2, 8),
            (2, 7) => call!(2, 7),
            (2, 6) => call!(2, 6),
            (2, 5) => call!(2, 5),
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
    #[cfg(target_arch = "x86_64")]
    if super::widen::has_avx2_f16c() {
        for r0 in (0..mr).step_by(2) {
            for c0 in (0..nr).step_by(2) {
                let (xs, ws) = (&x[r0 * in_dim..], &w[c0 * in_dim..]);
                let o = &mut out[r0 * out_stride + c0..];
                // SAFETY: the CPU has AVX2, FMA and F16C (checked above).
                unsafe {
                    match ((mr - r0).min(2), (nr - c0).min(2)) {
                        (2, 2) => tile_avx2::<W, 2, 2>(xs, ws, in_dim, o, out_stride),
                        (2, _) => tile_avx2::<W, 2, 1>(xs, ws, in_dim, o, out_stride),
                        (_, 2) => tile_avx2::<W, 1, 2>(xs, ws, in_dim, o, out_stride),
                        _ => tile_avx2::<W, 1, 1>(xs, ws, in_dim, o, out_stride),
                    }
                }
            }
        }
        return;
    }
    tile_portable(x, w, in_dim, mr, nr, out, out_stride, W::widen);
}

#[expect(
    clippy::too_many_arguments,
    reason = "the tile signature plus the widening"
)]
fn tile_portable<T: num_traits::Float, W: Copy>(
    x: &[T],
    w: &[W],
    in_dim: usize,
    mr: usize,
    nr: usize,
    out: &mut [T],
    out_stride: usize,
    wide: impl Fn(W) -> T + Copy,
) {
    for r in 0..mr {
        for c in 0..nr {
            out[r * out_stride + c] = dot_fixed_by(
                &x[r * in_dim..(r + 1) * in_dim],
                &w[c * in_dim..(c + 1) * in_dim],
                wide,
            );
        }
    }
}

/// Sealed dispatch of a same-dtype tile to the fastest path of the float type.
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
        tile_wide(x, w, in_dim, mr, nr, out, s);
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
        tile_portable(x, w, in_dim, mr, nr, out, s, |v| v);
    }
}

/// The signature of a tile: `x`, `w`, `in`, `mr`, `nr`, `out`, `out_stride`.
type TileFn<T, W> = fn(&[T], &[W], usize, usize, usize, &mut [T], usize);

fn run<T: num_traits::Float + Send + Sync, W: Sync>(
    x: &[T],
    w: &[W],
    in_dim: usize,
    tile: TileFn<T, W>,
) -> Vec<T> {
    let rows = x.len() / in_dim.max(1);
    let out_dim = w.len() / in_dim.max(1);
    // Each task owns `BLOCK` weight rows and writes a `[rows, BLOCK]` part.
    let block = |b: usize| -> Vec<T> {
        let lo = b * BLOCK;
        let hi = out_dim.min(lo + BLOCK);
        let width = hi - lo;
        let mut part = vec![T::zero(); rows * width];
        // One or two rows (decoding) take eight weight rows per tile: more independent
        // accumulators and more weight streams in flight.
        let nr_max = if rows <= 2 { 2 * NR } else { NR };
        for r0 in (0..rows).step_by(MR) {
            let mr = MR.min(rows - r0);
            for c0 in (lo..hi).step_by(nr_max) {
                let nr = nr_max.min(hi - c0);
                tile(
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
        let name = self.name();
        if is_half_storage(s2) {
            let x = data::<f32>(s1, l1, name)?;
            return by_half!(s2, name, W => {
                let w = data::<W>(s2, l2, name)?;
                let y = run(x, w, in_dim, tile_wide::<W>);
                Ok((CpuStorage::F32(y), Shape::from((rows, out_dim))))
            });
        }
        by_float!(s1, name, T => {
            let x = data::<T>(s1, l1, name)?;
            let w = data::<T>(s2, l2, name)?;
            let y = run(x, w, in_dim, T::tile);
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
        let all = run(&x, &w, in_dim, f32::tile);
        for rows in [1, 2, 3, 5, 37] {
            let part = run(&x[..rows * in_dim], &w, in_dim, f32::tile);
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

    /// Every instruction-set path this CPU has gives the portable path's bits, for f32, bf16 and
    /// f16 weights, on every tile shape.
    #[test]
    fn every_path_gives_the_portable_bits() {
        fn check<W: Weight>(narrow: fn(f32) -> W) {
            let in_dim = 100;
            let w: Vec<W> = values(8 * in_dim, 5).into_iter().map(narrow).collect();
            let x = values(4 * in_dim, 6);
            for (mr, nr) in [(4, 4), (3, 2), (1, 1), (2, 3), (1, 4), (1, 8), (2, 5)] {
                let mut want = vec![0f32; 32];
                tile_portable(&x, &w, in_dim, mr, nr, &mut want, 8, W::widen);
                let mut got = vec![0f32; 32];
                tile_wide(&x, &w, in_dim, mr, nr, &mut got, 8);
                assert_eq!(got, want, "dispatched path, {mr}x{nr}");
                #[cfg(target_arch = "x86_64")]
                if crate::kernels::widen::has_avx2_f16c() {
                    let mut avx2 = vec![0f32; 32];
                    for r in 0..mr {
                        for c in 0..nr {
                            let o = &mut avx2[r * 8 + c..];
                            // SAFETY: the CPU has AVX2, FMA and F16C (checked above).
                            #[allow(unsafe_code)]
                            unsafe {
                                tile_avx2::<W, 1, 1>(
                                    &x[r * in_dim..],
                                    &w[c * in_dim..],
                                    in_dim,
                                    o,
                                    8,
                                );
                            }
                        }
                    }
                    assert_eq!(avx2, want, "AVX2 path, {mr}x{nr}");
                }
            }
        }
        check::<f32>(|v| v);
        check::<half::bf16>(half::bf16::from_f32);
        check::<half::f16>(half::f16::from_f32);
    }

    #[test]
    fn matches_a_plain_product() {
        let (in_dim, out_dim, rows) = (48, 9, 6);
        let w = values(out_dim * in_dim, 3);
        let x = values(rows * in_dim, 4);
        let y = run(&x, &w, in_dim, f32::tile);
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
