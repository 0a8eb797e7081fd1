//! A preallocated key/value cache for incremental decoding: [`KvCache`].
//!
//! One `[b, kv_heads, max_len, head_dim]` buffer pair per layer is allocated up front and written
//! with `slice_set`, so a decoding step copies only the new positions (no `cat` per token). The
//! cache is explicit state owned by the caller: a fresh generation uses a fresh (or reset) cache.
//!
//! [`KvStore`] is the seam the attention layers call: [`KvCache`] appends and runs
//! [`crate::models::attention`] over its views; the generation engine's block cache
//! ([`crate::engine`]) attends each row over its own blocks.

use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::models::AttentionMask;

/// Where an attention layer keeps its keys and values and how it attends over them.
pub trait KvStore {
    /// Stores `k`, `v` (`[b, kv_heads, t, d]`, after RoPE) of `layer` and returns the attention of
    /// `q` (`[b, heads, t, d]`) over everything stored for its rows, `[b, heads, t, d]`; `mask`
    /// says which of them each query may attend.
    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &AttentionMask,
        scale: f64,
    ) -> Result<Tensor>;
}

impl KvStore for KvCache {
    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &AttentionMask,
        scale: f64,
    ) -> Result<Tensor> {
        let (k, v) = self.append(layer, k, v)?;
        crate::models::attention(q, &k, &v, mask, scale)
    }
}

/// Keys and values of every layer for the positions seen so far.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
    max_len: usize,
    batch_size: usize,
}

impl KvCache {
    /// Allocates room for `max_len` positions of `batch_size` rows.
    pub fn new(
        cfg: &ModelConfig,
        batch_size: usize,
        max_len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim);
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| {
                Ok((
                    Tensor::zeros(shape, dtype, device)?,
                    Tensor::zeros(shape, dtype, device)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            len: 0,
            max_len,
            batch_size,
        })
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Capacity in positions.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Rows the cache was built for.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Forgets every cached position (the buffers are kept).
    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// Writes `k`, `v` (`[b, kv_heads, t, d]`) of `layer` after the cached positions and returns
    /// views of all `len + t` positions. [`KvCache::advance`] commits them once every layer ran.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let seq_len = k.dim(2)?;
        let total = self.len + seq_len;
        if total > self.max_len {
            return Err(Error::invalid(format!(
                "KV cache overflow: {total} positions exceed its capacity {}",
                self.max_len
            )));
        }
        let (k_buf, v_buf) = self.layers.get(layer).ok_or_else(|| {
            Error::invalid(format!(
                "KV cache has no layer {layer} (it has {})",
                self.layers.len()
            ))
        })?;
        k_buf.slice_set(&k.contiguous()?, 2, self.len)?;
        v_buf.slice_set(&v.contiguous()?, 2, self.len)?;
        Ok((k_buf.narrow(2, 0, total)?, v_buf.narrow(2, 0, total)?))
    }

    /// Marks `seq_len` more positions as cached.
    pub fn advance(&mut self, seq_len: usize) {
        self.len += seq_len;
    }
}
