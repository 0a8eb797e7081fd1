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

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::{Real, by_float, row_max};

/// Query rows per tile.
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

/// A `[b, heads, n, d]` operand whose rows of `d` elements are contiguous.
#[derive(Clone, Copy)]
struct Heads<'a, T> {
    data: &'a [T],
    start: usize,
    batch_stride: usize,
    head_stride: usize,
    d: usize,
}

impl<'a, T: Real> Heads<'a, T> {
    fn new(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<Self> {
        let data = storage.as_slice::<T>()?;
        let (b, heads, n, d) = layout.shape().dims4()?;
        let stride = layout.stride();
        if (d > 1 && stride[3] != 1) || (n > 1 && stride[2] != d) {
            candle_core::bail!("flash_attention: the rows of {what} are not contiguous");
        }
        let start = layout.start_offset();
        let (batch_stride, head_stride) = (stride[0], stride[1]);
        if b * heads * n * d > 0
            && start + (b - 1) * batch_stride + (heads - 1) * head_stride + n * d > data.len()
        {
            candle_core::bail!("flash_attention: {what} lies outside its storage");
        }
        Ok(Self {
            data,
            start,
            batch_stride,
            head_stride,
            d,
        })
    }

    /// Rows `from..from + count` of `head` in `batch`, `count * d` elements.
    fn rows(&self, batch: usize, head: usize, from: usize, count: usize) -> &'a [T] {
        let at = self.start + batch * self.batch_stride + head * self.head_stride + from * self.d;
        &self.data[at..at + count * self.d]
    }
}

/// How a tile of queries by keys is masked.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tile {
    /// No query of the tile may attend any of its keys.
    Skip,
    /// Every query may attend every key.
    Full,
    /// Some pairs are masked.
    Partial,
}

/// Which keys the queries of one batch row may attend.
#[derive(Clone, Copy)]
struct Mask<'a> {
    causal: bool,
    past: usize,
    s: usize,
    /// `[s]`: whether each key may be attended.
    keys: Option<&'a [bool]>,
}

impl<'a> Mask<'a> {
    fn new(op: &'a FlashAttention, dims: &Dims, batch: usize) -> Self {
        let s = dims.s;
        Self {
            causal: op.causal,
            past: dims.past,
            s,
            keys: op.keys.as_deref().map(|k| &k[batch * s..(batch + 1) * s]),
        }
    }

    /// One past the last key that query rows `i0..i0 + rows` may attend.
    fn key_end(&self, i0: usize, rows: usize) -> usize {
        match self.causal {
            true => (self.past + i0 + rows).min(self.s),
            false => self.s,
        }
    }

    /// How the tile of query rows `i0..i0 + rows` by keys `j0..j0 + cols` is masked.
    fn tile(&self, i0: usize, rows: usize, j0: usize, cols: usize) -> Tile {
        if rows == 0 || cols == 0 || (self.causal && j0 >= self.past + i0 + rows) {
            return Tile::Skip;
        }
        let crosses = self.causal && j0 + cols > self.past + i0 + 1;
        match self.keys.map(|k| &k[j0..j0 + cols]) {
            Some(keys) if !keys.contains(&true) => Tile::Skip,
            Some(keys) if keys.contains(&false) => Tile::Partial,
            _ if crosses => Tile::Partial,
            _ => Tile::Full,
        }
    }

    /// Sets the masked entries of the `rows x cols` tile `scores` to `-inf`.
    fn apply<T: Real>(&self, scores: &mut [T], i0: usize, j0: usize, cols: usize) {
        for (r, row) in scores.chunks_mut(cols).enumerate() {
            let last = self.past + i0 + r;
            for (c, x) in row.iter_mut().enumerate() {
                let j = j0 + c;
                let allowed = (!self.causal || j <= last) && self.keys.is_none_or(|k| k[j]);
                if !allowed {
                    *x = T::neg_infinity();
                }
            }
        }
    }
}

/// A matrix inside a slice: element `(i, j)` at `i * rs + j * cs`.
#[derive(Clone, Copy)]
struct Mat<'a, T> {
    data: &'a [T],
    rs: usize,
    cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// Row-major with `cols` columns.
    fn rows(data: &'a [T], cols: usize) -> Self {
        Self {
            data,
            rs: cols,
            cs: 1,
        }
    }

    fn t(self) -> Self {
        Self {
            data: self.data,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Whether every element of a `rows x cols` matrix lies inside the slice.
    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// `dst` (`m x n`, row-major) `= beta · lhs · rhs` (`m x k` by `k x n`), or `+=` when
/// `accumulate`, on the calling thread.
#[allow(clippy::too_many_arguments)]
fn product<T: Real>(
    dst: &mut [T],
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    lhs: Mat<'_, T>,
    rhs: Mat<'_, T>,
    beta: T,
) -> Result<()> {
    if dst.len() < m * n || !lhs.fits(m, k) || !rhs.fits(k, n) {
        candle_core::bail!("flash_attention: a {m}x{k} by {k}x{n} tile product out of bounds");
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(T::zero());
        }
        return Ok(());
    }
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
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    Ok(())
}

/// Per-thread buffers of one tile.
struct Scratch<T> {
    /// Scores, then probabilities, `rows x cols`.
    p: Vec<T>,
    /// `dP`, then `dS`, `rows x cols`.
    ds: Vec<T>,
    /// Running row maxima.
    m: Vec<T>,
    /// Running row sums.
    l: Vec<T>,
}

impl<T: Real> Scratch<T> {
    fn new((bq, bk): (usize, usize)) -> Self {
        Self {
            p: vec![T::zero(); bq * bk],
            ds: vec![T::zero(); bq * bk],
            m: vec![T::zero(); bq],
            l: vec![T::zero(); bq],
        }
    }
}

/// The operands of one call, as slices.
struct Operands<'a, T> {
    dims: Dims,
    q: Heads<'a, T>,
    k: Heads<'a, T>,
    v: Heads<'a, T>,
    scale: T,
}

impl<T: Real> Operands<'_, T> {
    /// Probabilities of query rows `i0..i0 + rows` of `head` over keys `j0..j0 + cols` into
    /// `p` (`rows x cols`), given each row's log-sum-exp.
    #[allow(clippy::too_many_arguments)]
    fn probabilities(
        &self,
        mask: &Mask<'_>,
        tile: Tile,
        (batch, head): (usize, usize),
        (i0, rows): (usize, usize),
        (j0, cols): (usize, usize),
        lse: &[T],
        p: &mut [T],
    ) -> Result<()> {
        let d = self.dims.d;
        let kv_head = self.dims.kv_head(head);
        let p = &mut p[..rows * cols];
        product(
            p,
            (rows, cols, d),
            false,
            Mat::rows(self.q.rows(batch, head, i0, rows), d),
            Mat::rows(self.k.rows(batch, kv_head, j0, cols), d).t(),
            self.scale,
        )?;
        if tile == Tile::Partial {
            mask.apply(p, i0, j0, cols);
        }
        for (row, &shift) in p.chunks_mut(cols).zip(lse) {
            // A row with nothing to attend has lse = +inf: every probability is 0.
            T::exp_shifted(row, shift);
        }
        Ok(())
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

    /// `dq`, `dk`, `dv` from the saved `lse`, the output `o` and its gradient `d_o`.
    fn backward<T: Real>(
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
        let rows_at = (i0, rows);
        self.ops
            .probabilities(mask, tile, (batch, head), rows_at, (j0, cols), lse, p)?;
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
