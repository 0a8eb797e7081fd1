//! The backward of [`super::flash_attention`]: `dQ` per (batch, head, query tile), then `dK`, `dV`
//! per (batch, kv head, key tile), each tile recomputing its probabilities from the saved
//! log-sum-exp.

use candle_core::Result;
use rayon::prelude::*;

use super::tile::{Heads, Mask, Mat, Operands, Scratch, Tile, product};
use super::{Dims, FlashAttention};
use crate::kernels::Real;

impl FlashAttention {
    /// `dq`, `dk`, `dv` from the saved `lse`, the output `o` and its gradient `d_o`.
    pub(super) fn backward<T: Real>(
        &self,
        ops: &Operands<'_, T>,
        o: &[T],
        d_o: Heads<'_, T>,
        lse: &[T],
    ) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
        let Dims {
            b,
            heads,
            kv_heads,
            t,
            s,
            d,
            ..
        } = ops.dims;
        let mut dq = vec![T::zero(); b * heads * t * d];
        let mut dk = vec![T::zero(); b * kv_heads * s * d];
        let mut dv = vec![T::zero(); b * kv_heads * s * d];
        if dq.is_empty() || dk.is_empty() {
            return Ok((dq, dk, dv));
        }
        // D = rowsum(dO ∘ O), one entry per query row.
        let mut row_dots = vec![T::zero(); b * heads * t];
        row_dots
            .par_chunks_mut(t)
            .enumerate()
            .for_each(|(bh, dots)| {
                let (batch, head) = (bh / heads, bh % heads);
                let grads = d_o.rows(batch, head, 0, t);
                let outs = &o[bh * t * d..(bh + 1) * t * d];
                for ((dot, g), y) in dots.iter_mut().zip(grads.chunks(d)).zip(outs.chunks(d)) {
                    *dot = g.iter().zip(y).fold(T::zero(), |acc, (&a, &b)| acc + a * b);
                }
            });
        let (bq, bk) = self.tiles;
        let pass = Backward {
            ops,
            d_o,
            lse,
            row_dots: &row_dots,
        };
        dq.par_chunks_mut(t * d)
            .enumerate()
            .try_for_each(|(bh, dq)| {
                let (batch, head) = (bh / heads, bh % heads);
                let mask = Mask::new(self, &ops.dims, batch);
                dq.par_chunks_mut(bq * d).enumerate().try_for_each_init(
                    || Scratch::new(self.tiles),
                    |scratch, (tile, dq)| {
                        pass.dq_tile(&mask, (batch, head, tile * bq), bk, dq, scratch)
                    },
                )
            })?;
        dk.par_chunks_mut(s * d)
            .zip(dv.par_chunks_mut(s * d))
            .enumerate()
            .try_for_each(|(bg, (dk, dv))| {
                let (batch, kv_head) = (bg / kv_heads, bg % kv_heads);
                let mask = Mask::new(self, &ops.dims, batch);
                dk.par_chunks_mut(bk * d)
                    .zip(dv.par_chunks_mut(bk * d))
                    .enumerate()
                    .try_for_each_init(
                        || Scratch::new(self.tiles),
                        |scratch, (tile, (dk, dv))| {
                            let at = (batch, kv_head, tile * bk);
                            pass.dkv_tile(&mask, at, bq, dk, dv, scratch)
                        },
                    )
            })?;
        Ok((dq, dk, dv))
    }
}

/// What both backward passes read.
struct Backward<'a, T> {
    ops: &'a Operands<'a, T>,
    d_o: Heads<'a, T>,
    /// `[b, heads, t]`.
    lse: &'a [T],
    /// `[b, heads, t]`: `rowsum(dO ∘ O)`.
    row_dots: &'a [T],
}

impl<T: Real> Backward<'_, T> {
    /// `dS = P ∘ (dO Vᵀ - D)` of one tile into `scratch.ds`, with `P` in `scratch.p`.
    fn score_grads(
        &self,
        mask: &Mask<'_>,
        tile: Tile,
        (batch, head): (usize, usize),
        (i0, rows): (usize, usize),
        (j0, cols): (usize, usize),
        scratch: &mut Scratch<T>,
    ) -> Result<()> {
        let dims = self.ops.dims;
        let at = (batch * dims.heads + head) * dims.t + i0;
        let (lse, dots) = (&self.lse[at..at + rows], &self.row_dots[at..at + rows]);
        let p = &mut scratch.p[..rows * cols];
        let (at_rows, at_cols) = ((i0, rows), (j0, cols));
        let ops = self.ops;
        ops.probabilities(mask, tile, (batch, head), at_rows, at_cols, lse, p)?;
        let ds = &mut scratch.ds[..rows * cols];
        product(
            ds,
            (rows, cols, dims.d),
            false,
            Mat::rows(self.d_o.rows(batch, head, i0, rows), dims.d),
            Mat::rows(self.ops.v.rows(batch, dims.kv_head(head), j0, cols), dims.d).t(),
            T::one(),
        )?;
        for ((ds_row, p_row), &dot) in ds.chunks_mut(cols).zip(p.chunks(cols)).zip(dots) {
            for (g, &pv) in ds_row.iter_mut().zip(p_row) {
                *g = pv * (*g - dot);
            }
        }
        Ok(())
    }

    /// `dq` (`rows x d`) of query rows `i0..` of `head` in `batch`.
    fn dq_tile(
        &self,
        mask: &Mask<'_>,
        (batch, head, i0): (usize, usize, usize),
        block_k: usize,
        dq: &mut [T],
        scratch: &mut Scratch<T>,
    ) -> Result<()> {
        let dims = self.ops.dims;
        let rows = dq.len() / dims.d;
        let kv_head = dims.kv_head(head);
        let key_end = mask.key_end(i0, rows);
        for j0 in (0..key_end).step_by(block_k) {
            let cols = block_k.min(key_end - j0);
            let tile = mask.tile(i0, rows, j0, cols);
            if tile == Tile::Skip {
                continue;
            }
            self.score_grads(mask, tile, (batch, head), (i0, rows), (j0, cols), scratch)?;
            product(
                dq,
                (rows, dims.d, cols),
                true,
                Mat::rows(&scratch.ds[..rows * cols], cols),
                Mat::rows(self.ops.k.rows(batch, kv_head, j0, cols), dims.d),
                self.ops.scale,
            )?;
        }
        Ok(())
    }

    /// `dk`, `dv` (`cols x d`) of keys `j0..` of `kv_head` in `batch`, over the group's heads.
    fn dkv_tile(
        &self,
        mask: &Mask<'_>,
        (batch, kv_head, j0): (usize, usize, usize),
        block_q: usize,
        dk: &mut [T],
        dv: &mut [T],
        scratch: &mut Scratch<T>,
    ) -> Result<()> {
        let dims = self.ops.dims;
        let (d, t) = (dims.d, dims.t);
        let cols = dk.len() / d;
        let groups = dims.heads / dims.kv_heads;
        // The first query that may see key j0; later tiles start there, so the first one holds
        // the diagonal.
        let first = if mask.causal {
            j0.saturating_sub(dims.past)
        } else {
            0
        };
        for head in kv_head * groups..(kv_head + 1) * groups {
            for i0 in (first..t).step_by(block_q) {
                let rows = block_q.min(t - i0);
                let tile = mask.tile(i0, rows, j0, cols);
                if tile == Tile::Skip {
                    continue;
                }
                self.score_grads(mask, tile, (batch, head), (i0, rows), (j0, cols), scratch)?;
                let d_o = self.d_o.rows(batch, head, i0, rows);
                product(
                    dv,
                    (cols, d, rows),
                    true,
                    Mat::rows(&scratch.p[..rows * cols], cols).t(),
                    Mat::rows(d_o, d),
                    T::one(),
                )?;
                product(
                    dk,
                    (cols, d, rows),
                    true,
                    Mat::rows(&scratch.ds[..rows * cols], cols).t(),
                    Mat::rows(self.ops.q.rows(batch, head, i0, rows), d),
                    self.ops.scale,
                )?;
            }
        }
        Ok(())
    }
}
