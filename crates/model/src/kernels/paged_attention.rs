//! Attention of single query positions over their own sequence's key/value blocks: the decode
//! (and prefill) attention of the generation engine.
//!
//! The pools hold `[blocks, block_size, kv_heads, head_dim]` keys and values; row `r` reads
//! positions `0..lens[r]` through its block table. Each row is computed on its own (rows run in
//! parallel, never split), in a fixed order: scores as the fixed-order dot product of
//! [`super::fixed_linear`], the softmax by [`super::Real::exp_shifted`] over exactly the row's
//! positions, and the weighted sum of values accumulated position by position. So a row's output
//! depends only on its query and its own cached keys and values, not on the other rows, on how
//! many there are, or on where its blocks lie in the pool.

use rayon::prelude::*;

use super::Real;
use super::fixed_linear::dot_fixed;

/// Shapes shared by every row of one call.
#[derive(Debug, Clone, Copy)]
pub struct PagedShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (query head `j` reads head `j / (heads / kv_heads)`).
    pub kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Positions per block.
    pub block_size: usize,
}

/// `softmax(scale · q kᵀ) v` per row and head: `q` is `[rows, heads, head_dim]`, the result too.
/// `tables[r]` lists row `r`'s blocks in position order; `lens[r]` positions are attended.
pub fn paged_attention(
    q: &[f32],
    k_pool: &[f32],
    v_pool: &[f32],
    tables: &[&[u32]],
    lens: &[usize],
    shape: PagedShape,
    scale: f32,
) -> Vec<f32> {
    let row_len = shape.heads * shape.head_dim;
    let mut out = vec![0f32; q.len()];
    let work = |(r, out_row): (usize, &mut [f32])| {
        attend_row(
            &q[r * row_len..(r + 1) * row_len],
            k_pool,
            v_pool,
            tables[r],
            lens[r],
            shape,
            scale,
            out_row,
        );
    };
    if row_len == 0 {
        return out;
    }
    // One task per row: the parallel split never enters a row's reductions.
    if lens.iter().sum::<usize>() * row_len >= super::PARALLEL_MIN {
        out.par_chunks_mut(row_len).enumerate().for_each(work);
    } else {
        out.chunks_mut(row_len).enumerate().for_each(work);
    }
    out
}

#[expect(clippy::too_many_arguments, reason = "one row of a flat kernel")]
fn attend_row(
    q: &[f32],
    k_pool: &[f32],
    v_pool: &[f32],
    table: &[u32],
    len: usize,
    shape: PagedShape,
    scale: f32,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if super::fixed_linear::has_avx512() {
        // SAFETY: the CPU has AVX-512F (checked above).
        #[allow(unsafe_code)]
        unsafe {
            attend_row_avx512(q, k_pool, v_pool, table, len, shape, scale, out);
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::linear::has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        #[allow(unsafe_code)]
        unsafe {
            attend_row_fma(q, k_pool, v_pool, table, len, shape, scale, out);
        }
        return;
    }
    attend_row_generic(q, k_pool, v_pool, table, len, shape, scale, out);
}

/// [`attend_row_generic`] compiled with AVX-512 (sixteen lanes per instruction, same results).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[expect(clippy::too_many_arguments, reason = "one row of a flat kernel")]
#[allow(unsafe_code)]
fn attend_row_avx512(
    q: &[f32],
    k_pool: &[f32],
    v_pool: &[f32],
    table: &[u32],
    len: usize,
    shape: PagedShape,
    scale: f32,
    out: &mut [f32],
) {
    attend_row_generic(q, k_pool, v_pool, table, len, shape, scale, out);
}

/// [`attend_row_generic`] compiled with FMA, so `mul_add` is one instruction (same results: a
/// fused multiply-add is exactly rounded wherever it runs).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[expect(clippy::too_many_arguments, reason = "one row of a flat kernel")]
#[allow(unsafe_code)]
fn attend_row_fma(
    q: &[f32],
    k_pool: &[f32],
    v_pool: &[f32],
    table: &[u32],
    len: usize,
    shape: PagedShape,
    scale: f32,
    out: &mut [f32],
) {
    attend_row_generic(q, k_pool, v_pool, table, len, shape, scale, out);
}

#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "one row of a flat kernel")]
fn attend_row_generic(
    q: &[f32],
    k_pool: &[f32],
    v_pool: &[f32],
    table: &[u32],
    len: usize,
    shape: PagedShape,
    scale: f32,
    out: &mut [f32],
) {
    let PagedShape {
        heads,
        kv_heads,
        head_dim: d,
        block_size: bs,
    } = shape;
    let groups = heads / kv_heads.max(1);
    // Where each position's slot starts, computed once for all heads.
    let bases: Vec<usize> = (0..len)
        .map(|p| (table[p / bs] as usize * bs + p % bs) * kv_heads * d)
        .collect();
    let mut scores = vec![0f32; len];
    for h in 0..heads {
        let g = h / groups.max(1);
        let qh = &q[h * d..(h + 1) * d];
        for (s, &base) in scores.iter_mut().zip(&bases) {
            let at = base + g * d;
            *s = dot_fixed(qh, &k_pool[at..at + d]) * scale;
        }
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let total = f32::exp_shifted(&mut scores, max);
        let oh = &mut out[h * d..(h + 1) * d];
        oh.fill(0.0);
        for (&e, &base) in scores.iter().zip(&bases) {
            let at = base + g * d;
            for (o, &v) in oh.iter_mut().zip(&v_pool[at..at + d]) {
                *o = e.mul_add(v, *o);
            }
        }
        let inv = total.recip();
        for o in oh.iter_mut() {
            *o *= inv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_dense_attention_and_ignores_other_rows() {
        let shape = PagedShape {
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
            block_size: 3,
        };
        let slot = shape.kv_heads * shape.head_dim;
        let blocks = 6;
        let pool = |seed: f32| -> Vec<f32> {
            (0..blocks * shape.block_size * slot)
                .map(|i| (i as f32 * 0.37 + seed).sin())
                .collect()
        };
        let (k, v) = (pool(0.1), pool(0.7));
        let q: Vec<f32> = (0..2 * 32).map(|i| (i as f32 * 0.11).cos()).collect();
        let t0: [u32; 3] = [4, 0, 2];
        let t1: [u32; 1] = [5];
        let both = paged_attention(&q, &k, &v, &[&t0, &t1], &[7, 2], shape, 0.5);
        let alone = paged_attention(&q[..32], &k, &v, &[&t0], &[7], shape, 0.5);
        assert_eq!(both[..32], alone[..]);
        // Dense reference for row 0, head 3 (kv head 1).
        let pos = |p: usize| (t0[p / 3] as usize * 3 + p % 3) * slot + 8;
        let qh = &q[24..32];
        let s: Vec<f64> = (0..7)
            .map(|p| {
                0.5 * (0..8)
                    .map(|i| f64::from(qh[i] * k[pos(p) + i]))
                    .sum::<f64>()
            })
            .collect();
        let m = s.iter().cloned().fold(f64::MIN, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        for i in 0..8 {
            let want: f64 = (0..7).map(|p| e[p] / z * f64::from(v[pos(p) + i])).sum();
            assert!((want - f64::from(alone[24 + i])).abs() < 1e-5);
        }
    }
}
