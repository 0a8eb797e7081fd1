//! Attention in tiles with an online softmax (FlashAttention-2 on the CPU), forward and backward,
//! for f32 and f64: no `[t, s]` score or probability matrix is kept, and tiles that lie above
//! the causal diagonal or hold only padding keys are skipped, not computed.
//!
//! Forward ([`flash_attention`]): each (batch, head, query tile) visits its key tiles in order.
//! A tile's scores `scale · Q Kᵀ` update each row's running maximum `m` and sum `l`, and the
//! output accumulates `P V`, rescaled by `exp(m_old - m_new)` when the maximum grows. Only the
//! output and each row's log-sum-exp `m + ln l` are kept for the backward.
//!
//! Backward: with `D = rowsum(dO ∘ O)`, each tile recomputes `P = exp(S - lse)` and
//! `dS = P ∘ (dO Vᵀ - D)`. Two passes write disjoint outputs, so no two threads add into the same
//! gradient and every sum runs in a fixed order: `dQ` per (batch, head, query tile), `dK` and `dV`
//! per (batch, kv head, key tile), summed over the query heads of the group. Recomputing `P` in
//! both passes costs two tile products more than one pass with shared `dQ` accumulators, and
//! keeps the result independent of the thread schedule.
//!
//! The tile products go through the `gemm` crate on one thread each: the tiles are the parallel
//! work. A query row with no key to attend (a padding query) gets a zero output and no gradient.
//! `tile.rs` holds the pieces of one tile (operand views, its mask, the products), `backward.rs`
//! the two backward passes.
//!
//! Memory: one layer's forward and backward over 8,192 tokens (4 heads, 2 kv heads, head dim 64)
//! peaks at 83 MiB of process RSS, against 4.3 GiB for the dense path (scores, probabilities and
//! their gradients, each `[heads, t, t]`); it also ran 3.5x faster.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::{Real, by_float, row_max};

mod backward;
mod tile;

use tile::{Heads, Mask, Mat, Operands, Scratch, Tile, product};

/// Query rows per tile. 64 by 64 keeps a tile's scores in 16 KiB (f32); 32 and 128 measured no
/// faster on bench-small's attention.
const BLOCK_Q: usize = 64;
/// Keys per tile.
const BLOCK_K: usize = 64;

/// `softmax(scale · q kᵀ + mask) v` for `q` `[b, heads, t, d]` and `k`, `v` `[b, kv_heads, s, d]`
/// (query head `j` reads kv head `j / (heads / kv_heads)`), `[b, heads, t, d]`; same float dtype,
/// CPU. `k`, `v` may be views whose rows are contiguous (a KV cache), read in place.
///
/// With `causal`, query `i` sits at position `s - t + i` and sees the keys at or before it;
/// `key_mask` `[b, s]` (any dtype) marks padding keys with 0. Differentiable in `q`, `k` and `v`.
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_mask: Option<&Tensor>,
    causal: bool,
    scale: f64,
) -> Result<Tensor> {
    flash_attention_tiled(q, k, v, key_mask, causal, scale, (BLOCK_Q, BLOCK_K))
}

/// [`flash_attention`] with tiles of `tiles.0` query rows by `tiles.1` keys.
pub(crate) fn flash_attention_tiled(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_mask: Option<&Tensor>,
    causal: bool,
    scale: f64,
    tiles: (usize, usize),
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let (kb, kv, s, kd) = k.dims4()?;
    if kb != b
        || kd != d
        || v.dims4()? != (b, kv, s, d)
        || kv == 0
        || h % kv != 0
        || (causal && s < t)
        || tiles.0 == 0
        || tiles.1 == 0
    {
        candle_core::bail!(
            "flash_attention: q {:?}, k {:?}, v {:?} (causal: {causal})",
            q.shape(),
            k.shape(),
            v.shape()
        );
    }
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        candle_core::bail!(
            "flash_attention: q, k, v of dtypes {:?}, {:?}, {:?}",
            q.dtype(),
            k.dtype(),
            v.dtype()
        );
    }
    let keys = match key_mask {
        Some(mask) => {
            if mask.dims2()? != (b, s) {
                candle_core::bail!(
                    "flash_attention: key mask {:?} for keys {:?}",
                    mask.shape(),
                    k.shape()
                );
            }
            let flat = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            Some(flat.into_iter().map(|x| x != 0.0).collect())
        }
        None => None,
    };
    let op = FlashAttention {
        scale,
        causal,
        keys,
        tiles,
        lse: OnceLock::new(),
    };
    rows_contiguous(q)?.apply_op3(&rows_contiguous(k)?, &rows_contiguous(v)?, op)
}

/// `x` itself when each row of its last dim is contiguous (batch and head strides are free), a
/// contiguous copy otherwise.
fn rows_contiguous(x: &Tensor) -> Result<Tensor> {
    let (_, _, n, d) = x.dims4()?;
    let stride = x.stride();
    if (d <= 1 || stride[3] == 1) && (n <= 1 || stride[2] == d) {
        Ok(x.clone())
    } else {
        x.contiguous()
    }
}

/// The forward op; it keeps the rows' log-sum-exp for its backward.
struct FlashAttention {
    scale: f64,
    causal: bool,
    /// `[b, s]`: whether each key may be attended.
    keys: Option<Vec<bool>>,
    /// Query rows by keys per tile.
    tiles: (usize, usize),
    /// `[b, heads, t]`, in the compute dtype; `+inf` for a row with no key to attend.
    lse: OnceLock<CpuStorage>,
}

/// The sizes of one call.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    heads: usize,
    kv_heads: usize,
    t: usize,
    s: usize,
    d: usize,
    /// Position of query 0 (`s - t` when causal).
    past: usize,
}

impl Dims {
    fn new(q: &Layout, k: &Layout, causal: bool) -> Result<Self> {
        let (b, heads, t, d) = q.shape().dims4()?;
        let (_, kv_heads, s, _) = k.shape().dims4()?;
        Ok(Self {
            b,
            heads,
            kv_heads,
            t,
            s,
            d,
            past: if causal { s.saturating_sub(t) } else { 0 },
        })
    }

    /// The kv head that query head `head` reads.
    fn kv_head(&self, head: usize) -> usize {
        head / (self.heads / self.kv_heads)
    }
}

/// Forward of query rows `i0..` of `head` in `batch`: `out` (`rows x d`) and `lse` (`rows`).
fn forward_tile<T: Real>(
    ops: &Operands<'_, T>,
    mask: &Mask<'_>,
    (batch, head, i0): (usize, usize, usize),
    block_k: usize,
    out: &mut [T],
    lse: &mut [T],
    scratch: &mut Scratch<T>,
) -> Result<()> {
    let (d, rows) = (ops.dims.d, lse.len());
    let kv_head = ops.dims.kv_head(head);
    let q_rows = ops.q.rows(batch, head, i0, rows);
    let (m, l) = (&mut scratch.m[..rows], &mut scratch.l[..rows]);
    m.fill(T::neg_infinity());
    l.fill(T::zero());
    out.fill(T::zero());
    let key_end = mask.key_end(i0, rows);
    for j0 in (0..key_end).step_by(block_k) {
        let cols = block_k.min(key_end - j0);
        let tile = mask.tile(i0, rows, j0, cols);
        if tile == Tile::Skip {
            continue;
        }
        let p = &mut scratch.p[..rows * cols];
        product(
            p,
            (rows, cols, d),
            false,
            Mat::rows(q_rows, d),
            Mat::rows(ops.k.rows(batch, kv_head, j0, cols), d).t(),
            ops.scale,
        )?;
        if tile == Tile::Partial {
            mask.apply(p, i0, j0, cols);
        }
        for (r, row) in p.chunks_mut(cols).enumerate() {
            let m_new = num_traits::Float::max(row_max(row), m[r]);
            if m_new == T::neg_infinity() {
                // Nothing attended yet: this tile adds nothing to the row.
                row.fill(T::zero());
                continue;
            }
            let sum = T::exp_shifted(row, m_new);
            let alpha = (m[r] - m_new).exp();
            if alpha != T::one() {
                l[r] *= alpha;
                out[r * d..(r + 1) * d].iter_mut().for_each(|o| *o *= alpha);
            }
            l[r] += sum;
            m[r] = m_new;
        }
        product(
            out,
            (rows, d, cols),
            true,
            Mat::rows(p, cols),
            Mat::rows(ops.v.rows(batch, kv_head, j0, cols), d),
            T::one(),
        )?;
    }
    for (r, (out_row, lse_r)) in out.chunks_mut(d).zip(lse.iter_mut()).enumerate() {
        if l[r] > T::zero() {
            let inv = l[r].recip();
            out_row.iter_mut().for_each(|o| *o *= inv);
            *lse_r = m[r] + l[r].ln();
        } else {
            out_row.fill(T::zero());
            *lse_r = T::infinity();
        }
    }
    Ok(())
}

impl FlashAttention {
    fn forward<T: Real>(&self, ops: &Operands<'_, T>) -> Result<(Vec<T>, Vec<T>)> {
        let Dims { heads, t, d, .. } = ops.dims;
        let (bq, bk) = self.tiles;
        let mut out = vec![T::zero(); ops.dims.b * heads * t * d];
        let mut lse = vec![T::zero(); ops.dims.b * heads * t];
        if out.is_empty() {
            return Ok((out, lse));
        }
        out.par_chunks_mut(t * d)
            .zip(lse.par_chunks_mut(t))
            .enumerate()
            .try_for_each(|(bh, (out, lse))| {
                let (batch, head) = (bh / heads, bh % heads);
                let mask = Mask::new(self, &ops.dims, batch);
                out.par_chunks_mut(bq * d)
                    .zip(lse.par_chunks_mut(bq))
                    .enumerate()
                    .try_for_each_init(
                        || Scratch::new(self.tiles),
                        |scratch, (tile, (out, lse))| {
                            let at = (batch, head, tile * bq);
                            forward_tile(ops, &mask, at, bk, out, lse, scratch)
                        },
                    )
            })?;
        Ok((out, lse))
    }
}

/// The CPU storage of a tensor argument of the backward.
fn cpu(storage: &Storage) -> Result<&CpuStorage> {
    match storage {
        Storage::Cpu(cpu) => Ok(cpu),
        _ => candle_core::bail!("flash_attention: the backward runs on the CPU only"),
    }
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "retort-flash-attention"
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
        let dims = Dims::new(l1, l2, self.causal)?;
        by_float!(s1, self.name(), T => {
            let ops = Operands {
                dims,
                q: Heads::<T>::new(s1, l1, "q")?,
                k: Heads::<T>::new(s2, l2, "k")?,
                v: Heads::<T>::new(s3, l3, "v")?,
                scale: T::from_f64(self.scale),
            };
            let (out, lse) = self.forward(&ops)?;
            if self.lse.set(T::to_cpu_storage_owned(lse)).is_err() {
                candle_core::bail!("{}: one op ran its forward twice", self.name());
            }
            Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
        })
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(lse) = self.lse.get() else {
            candle_core::bail!("{}: backward before forward", self.name());
        };
        let (res, grad) = (res.contiguous()?, grad.contiguous()?);
        let (q_st, q_l) = q.storage_and_layout();
        let (k_st, k_l) = k.storage_and_layout();
        let (v_st, v_l) = v.storage_and_layout();
        let (o_st, o_l) = res.storage_and_layout();
        let (g_st, g_l) = grad.storage_and_layout();
        let (q_cpu, k_cpu, v_cpu) = (cpu(&q_st)?, cpu(&k_st)?, cpu(&v_st)?);
        let dims = Dims::new(q_l, k_l, self.causal)?;
        let (dq, dk, dv) = by_float!(q_cpu, self.name(), T => {
            let ops = Operands {
                dims,
                q: Heads::<T>::new(q_cpu, q_l, "q")?,
                k: Heads::<T>::new(k_cpu, k_l, "k")?,
                v: Heads::<T>::new(v_cpu, v_l, "v")?,
                scale: T::from_f64(self.scale),
            };
            let o = &cpu(&o_st)?.as_slice::<T>()?[o_l.start_offset()..];
            if o.len() < q_l.shape().elem_count() {
                candle_core::bail!("{}: the output is smaller than q", self.name());
            }
            let d_o = Heads::<T>::new(cpu(&g_st)?, g_l, "the output gradient")?;
            let (dq, dk, dv) = self.backward(&ops, o, d_o, lse.as_slice::<T>()?)?;
            let device = q.device();
            Ok((
                Tensor::from_vec(dq, q.shape(), device)?,
                Tensor::from_vec(dk, k.shape(), device)?,
                Tensor::from_vec(dv, v.shape(), device)?,
            ))
        })?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}
