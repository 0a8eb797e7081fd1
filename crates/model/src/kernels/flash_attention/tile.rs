//! The pieces of one tile of [`super::flash_attention`]: operand views, the mask of a tile, the
//! tile products (the `gemm` crate on the calling thread) and per-thread buffers.

use candle_core::{CpuStorage, Layout, Result};

use super::{Dims, FlashAttention};
use crate::kernels::Real;

/// A `[b, heads, n, d]` operand whose rows of `d` elements are contiguous.
#[derive(Clone, Copy)]
pub(super) struct Heads<'a, T> {
    data: &'a [T],
    start: usize,
    batch_stride: usize,
    head_stride: usize,
    d: usize,
}

impl<'a, T: Real> Heads<'a, T> {
    pub(super) fn new(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<Self> {
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
    pub(super) fn rows(&self, batch: usize, head: usize, from: usize, count: usize) -> &'a [T] {
        let at = self.start + batch * self.batch_stride + head * self.head_stride + from * self.d;
        &self.data[at..at + count * self.d]
    }
}

/// How a tile of queries by keys is masked.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Tile {
    /// No query of the tile may attend any of its keys.
    Skip,
    /// Every query may attend every key.
    Full,
    /// Some pairs are masked.
    Partial,
}

/// Which keys the queries of one batch row may attend.
#[derive(Clone, Copy)]
pub(super) struct Mask<'a> {
    pub(super) causal: bool,
    past: usize,
    s: usize,
    /// `[s]`: whether each key may be attended.
    keys: Option<&'a [bool]>,
}

impl<'a> Mask<'a> {
    pub(super) fn new(op: &'a FlashAttention, dims: &Dims, batch: usize) -> Self {
        let s = dims.s;
        Self {
            causal: op.causal,
            past: dims.past,
            s,
            keys: op.keys.as_deref().map(|k| &k[batch * s..(batch + 1) * s]),
        }
    }

    /// One past the last key that query rows `i0..i0 + rows` may attend.
    pub(super) fn key_end(&self, i0: usize, rows: usize) -> usize {
        match self.causal {
            true => (self.past + i0 + rows).min(self.s),
            false => self.s,
        }
    }

    /// How the tile of query rows `i0..i0 + rows` by keys `j0..j0 + cols` is masked.
    pub(super) fn tile(&self, i0: usize, rows: usize, j0: usize, cols: usize) -> Tile {
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
    pub(super) fn apply<T: Real>(&self, scores: &mut [T], i0: usize, j0: usize, cols: usize) {
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
pub(super) struct Mat<'a, T> {
    data: &'a [T],
    rs: usize,
    cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// Row-major with `cols` columns.
    pub(super) fn rows(data: &'a [T], cols: usize) -> Self {
        Self {
            data,
            rs: cols,
            cs: 1,
        }
    }

    pub(super) fn t(self) -> Self {
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
pub(super) fn product<T: Real>(
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
pub(super) struct Scratch<T> {
    /// Scores, then probabilities, `rows x cols`.
    pub(super) p: Vec<T>,
    /// `dP`, then `dS`, `rows x cols`.
    pub(super) ds: Vec<T>,
    /// Running row maxima.
    pub(super) m: Vec<T>,
    /// Running row sums.
    pub(super) l: Vec<T>,
}

impl<T: Real> Scratch<T> {
    pub(super) fn new((bq, bk): (usize, usize)) -> Self {
        Self {
            p: vec![T::zero(); bq * bk],
            ds: vec![T::zero(); bq * bk],
            m: vec![T::zero(); bq],
            l: vec![T::zero(); bq],
        }
    }
}

/// The operands of one call, as slices.
pub(super) struct Operands<'a, T> {
    pub(super) dims: Dims,
    pub(super) q: Heads<'a, T>,
    pub(super) k: Heads<'a, T>,
    pub(super) v: Heads<'a, T>,
    pub(super) scale: T,
}

impl<T: Real> Operands<'_, T> {
    /// Probabilities of query rows `i0..i0 + rows` of `head` over keys `j0..j0 + cols` into
    /// `p` (`rows x cols`), given each row's log-sum-exp.
    #[expect(clippy::too_many_arguments, reason = "the coordinates of one tile")]
    pub(super) fn probabilities(
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
