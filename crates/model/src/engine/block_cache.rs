//! The key/value cache in fixed-size blocks: [`BlockCache`] owns every layer's pool and a
//! reference-counted free list; [`PagedStep`] is the [`KvStore`] of one engine step, writing each
//! row's new keys and values into its sequence's blocks and attending over them.
//!
//! Memory follows the tokens held: a block is taken when a sequence's next position needs one
//! and returns to the free list when its last holder lets go. Samples of one prompt hold the
//! prompt's full blocks by reference (the prompt is prefilled once); each copies the partly filled
//! last block, so no sequence ever writes into a block another one reads.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::kernels::{PagedShape, paged_attention};
use crate::kv_cache::KvStore;
use crate::models::AttentionMask;

/// Positions per block.
pub const BLOCK_SIZE: usize = 16;

/// Every layer's keys and values, `[blocks, BLOCK_SIZE, kv_heads, head_dim]` f32 each.
#[derive(Debug)]
pub struct BlockCache {
    shape: PagedShape,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    refs: Vec<u32>,
    free: Vec<u32>,
    in_use: usize,
    peak: usize,
}

impl BlockCache {
    /// An empty cache for `layers` layers of `shape`.
    pub fn new(layers: usize, shape: PagedShape) -> Self {
        Self {
            shape,
            keys: vec![Vec::new(); layers],
            values: vec![Vec::new(); layers],
            refs: Vec::new(),
            free: Vec::new(),
            in_use: 0,
            peak: 0,
        }
    }

    fn block_len(&self) -> usize {
        self.shape.block_size * self.shape.kv_heads * self.shape.head_dim
    }

    /// Bytes one block takes over all layers (keys and values).
    pub fn block_bytes(&self) -> usize {
        2 * self.keys.len() * self.block_len() * std::mem::size_of::<f32>()
    }

    /// Blocks held by at least one sequence now.
    pub fn blocks_in_use(&self) -> usize {
        self.in_use
    }

    /// The most blocks ever held at once.
    pub fn peak_blocks(&self) -> usize {
        self.peak
    }

    /// Blocks allocated in the pools (held or free).
    pub fn blocks_allocated(&self) -> usize {
        self.refs.len()
    }

    /// Reserves address space for `blocks` blocks in every pool, so growing the pools never
    /// reallocates and copies them; pages are only touched (and counted) when a block is taken.
    pub fn reserve(&mut self, blocks: usize) {
        let len = self.block_len() * blocks;
        for pool in self.keys.iter_mut().chain(self.values.iter_mut()) {
            pool.reserve_exact(len.saturating_sub(pool.len()));
        }
    }

    /// A fresh block with one holder (reused from the free list when possible).
    pub fn allocate(&mut self) -> u32 {
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                let len = self.block_len();
                for pool in self.keys.iter_mut().chain(self.values.iter_mut()) {
                    pool.resize(pool.len() + len, 0.0);
                }
                self.refs.push(0);
                (self.refs.len() - 1) as u32
            }
        };
        self.refs[id as usize] = 1;
        self.in_use += 1;
        self.peak = self.peak.max(self.in_use);
        id
    }

    /// One more holder of `block`.
    pub fn retain(&mut self, block: u32) {
        self.refs[block as usize] += 1;
    }

    /// One holder fewer; the block is free when none is left.
    pub fn release(&mut self, block: u32) {
        let r = &mut self.refs[block as usize];
        debug_assert!(*r > 0, "a released block has a holder");
        *r -= 1;
        if *r == 0 {
            self.free.push(block);
            self.in_use -= 1;
        }
    }

    /// A new block holding a copy of `block`'s keys and values in every layer.
    pub fn copy_of(&mut self, block: u32) -> u32 {
        let id = self.allocate();
        let len = self.block_len();
        let (src, dst) = (block as usize * len, id as usize * len);
        for pool in self.keys.iter_mut().chain(self.values.iter_mut()) {
            pool.copy_within(src..src + len, dst);
        }
        id
    }
}

/// The rows of one engine step: row `i` is position `positions[i]` of the sequence whose blocks
/// are `tables[i]` (which already cover that position).
pub struct PagedStep<'a> {
    /// The cache the rows read and write.
    pub cache: &'a mut BlockCache,
    /// Each row's block table.
    pub tables: &'a [Vec<u32>],
    /// Each row's position.
    pub positions: &'a [usize],
}

impl KvStore for PagedStep<'_> {
    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _mask: &AttentionMask,
        scale: f64,
    ) -> Result<Tensor> {
        let (rows, heads, t, d) = q.dims4()?;
        let shape = self.cache.shape;
        if t != 1 || rows != self.positions.len() || q.dtype() != DType::F32 {
            return Err(Error::invalid(format!(
                "paged attention takes one f32 position per row, got q {:?} ({:?}) for {} rows",
                q.shape(),
                q.dtype(),
                self.positions.len()
            )));
        }
        let slot_len = shape.kv_heads * shape.head_dim;
        let k_host = k.flatten_all()?.to_vec1::<f32>()?;
        let v_host = v.flatten_all()?.to_vec1::<f32>()?;
        let bs = shape.block_size;
        let keys = &mut self.cache.keys[layer];
        let values = &mut self.cache.values[layer];
        for (i, (&pos, table)) in self.positions.iter().zip(self.tables).enumerate() {
            let slot = table[pos / bs] as usize * bs + pos % bs;
            let (dst, src) = (slot * slot_len, i * slot_len);
            keys[dst..dst + slot_len].copy_from_slice(&k_host[src..src + slot_len]);
            values[dst..dst + slot_len].copy_from_slice(&v_host[src..src + slot_len]);
        }
        let q_host = q.flatten_all()?.to_vec1::<f32>()?;
        let tables: Vec<&[u32]> = self.tables.iter().map(Vec::as_slice).collect();
        let lens: Vec<usize> = self.positions.iter().map(|p| p + 1).collect();
        let out = paged_attention(
            &q_host,
            &self.cache.keys[layer],
            &self.cache.values[layer],
            &tables,
            &lens,
            shape,
            scale as f32,
        );
        Ok(Tensor::from_vec(out, (rows, heads, 1, d), q.device())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_blocks_are_reused_and_copies_are_private() {
        let shape = PagedShape {
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
            block_size: 2,
        };
        let mut cache = BlockCache::new(2, shape);
        let a = cache.allocate();
        let b = cache.allocate();
        cache.keys[1][a as usize * 8] = 3.0;
        cache.retain(a);
        cache.release(a);
        assert_eq!(cache.blocks_in_use(), 2);
        let c = cache.copy_of(a);
        assert_eq!(cache.keys[1][c as usize * 8], 3.0);
        cache.release(b);
        assert_eq!(cache.allocate(), b, "a freed block is taken before growing");
        assert_eq!(cache.blocks_allocated(), 3);
        assert_eq!(cache.peak_blocks(), 3);
    }
}
