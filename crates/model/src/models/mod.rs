//! The causal LMs: [`CausalLm`] dispatches to one file per architecture, and this module holds
//! the small set of differentiable layer functions those files share.
//!
//! Every function here trains: on CPU in f32/f64 it runs the fused kernels of
//! [`crate::kernels`] (hand-written backward), elsewhere the `*_plain` versions built from candle
//! ops with candle's autograd (candle's own fused `rms_norm`, `rope` and `softmax_last_dim` have
//! no backward, DESIGN.md §7).

pub mod llama;
pub mod qwen2;
pub mod qwen3;

use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::kernels;
use crate::kv_cache::{KvCache, KvStore};
use crate::lora::LoraAdapter;

/// A causal LM of one of the supported architectures.
#[derive(Debug, Clone)]
pub enum CausalLm {
    /// Qwen2 / Qwen2.5.
    Qwen2(qwen2::Model),
    /// Qwen3.
    Qwen3(qwen3::Model),
    /// Llama.
    Llama(llama::Model),
}

impl CausalLm {
    /// Builds the model from weights named as in the Hugging Face state dict.
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        Ok(match cfg.architecture {
            Architecture::Qwen2 => Self::Qwen2(qwen2::Model::new(cfg, vb)?),
            Architecture::Qwen3 => Self::Qwen3(qwen3::Model::new(cfg, vb)?),
            Architecture::Llama => Self::Llama(llama::Model::new(cfg, vb)?),
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &ModelConfig {
        match self {
            Self::Qwen2(m) => m.config(),
            Self::Qwen3(m) => m.config(),
            Self::Llama(m) => m.config(),
        }
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.embed_weight().device()
    }

    /// The compute dtype: that of the activations, embeddings and norms (and of the linear
    /// weights unless they are stored narrower, see [`CausalLm::weight_dtype`]).
    pub fn dtype(&self) -> DType {
        self.embed_weight().dtype()
    }

    /// The storage dtype of the linear weights (projections and `lm_head`): the compute dtype,
    /// or bf16/f16 under weight-only low precision on the CPU ([`WeightStorage`]).
    pub fn weight_dtype(&self) -> DType {
        match self {
            Self::Qwen2(m) => m.lm_head_weight().dtype(),
            Self::Qwen3(m) => m.lm_head_weight().dtype(),
            Self::Llama(m) => m.lm_head_weight().dtype(),
        }
    }

    /// The input embedding matrix `[vocab, hidden]`.
    pub fn embed_weight(&self) -> &Tensor {
        match self {
            Self::Qwen2(m) => m.embed_weight(),
            Self::Qwen3(m) => m.embed_weight(),
            Self::Llama(m) => m.embed_weight(),
        }
    }

    /// Full-sequence forward without cache, differentiable: logits `[b, t, vocab]` in f32.
    ///
    /// `attention_mask` is `[b, t]` with 1 for real tokens and 0 for padding; `position_ids`
    /// is `[b, t]` (default `0..t` in every row).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
    ) -> Result<Tensor> {
        let hidden = self.forward_hidden(input_ids, attention_mask, position_ids)?;
        self.lm_head(&hidden)
    }

    /// Like [`CausalLm::forward`] but returns the final normalised hidden states `[b, t, hidden]`
    /// (compute dtype), so callers can apply [`CausalLm::lm_head`] to the positions they need.
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b_sz, seq_len) = input_ids.dims2()?;
        let position_ids = match position_ids {
            Some(p) => p.clone(),
            None => default_positions(b_sz, seq_len, 0, input_ids.device())?,
        };
        let mask = AttentionMask::causal(attention_mask, b_sz, seq_len)?;
        self.hidden(input_ids, &position_ids, &mask, None)
    }

    /// Incremental forward with a KV cache: logits `[b, t, vocab]` in f32 for the new tokens.
    ///
    /// `position_ids` is `[b, t]`; `attention_mask`, when given, is `[b, past + t]` and covers
    /// the cached positions too (1 = attend, 0 = padding).
    pub fn forward_cached(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let hidden = self.forward_cached_hidden(input_ids, position_ids, attention_mask, cache)?;
        self.lm_head(&hidden)
    }

    /// Like [`CausalLm::forward_cached`] but returns the final hidden states `[b, t, hidden]`.
    pub fn forward_cached_hidden(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (b_sz, seq_len) = input_ids.dims2()?;
        if cache.batch_size() != b_sz {
            return Err(Error::invalid(format!(
                "KV cache was built for batch size {} but the input has {b_sz} rows",
                cache.batch_size()
            )));
        }
        if cache.len() + seq_len > cache.max_len() {
            return Err(Error::invalid(format!(
                "KV cache overflow: {} cached + {seq_len} new positions exceed its capacity {}",
                cache.len(),
                cache.max_len()
            )));
        }
        let mask = AttentionMask::causal(attention_mask, b_sz, cache.len() + seq_len)?;
        let hidden = self.hidden(input_ids, position_ids, &mask, Some(cache))?;
        cache.advance(seq_len);
        Ok(hidden)
    }

    /// Final hidden states `[n, 1, hidden]` of one generation-engine step: row `i` is the token
    /// `input_ids[i]` (`[n, 1]`) at position `position_ids[i]` of a sequence whose keys and values
    /// `store` holds and attends (causality and the rows' sequences are the store's business).
    pub fn forward_step_hidden(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        store: &mut dyn KvStore,
    ) -> Result<Tensor> {
        let mask = AttentionMask {
            causal: true,
            keys: None,
        };
        self.hidden(input_ids, position_ids, &mask, Some(store))
    }

    /// Projects hidden states to f32 logits with `lm_head` (the embedding when tied).
    pub fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = match self {
            Self::Qwen2(m) => m.lm_head(hidden)?,
            Self::Qwen3(m) => m.lm_head(hidden)?,
            Self::Llama(m) => m.lm_head(hidden)?,
        };
        Ok(logits.to_dtype(DType::F32)?)
    }

    /// The `lm_head` weight `[vocab, hidden]` when the head is a plain projection (no bias, no
    /// adapter), so that callers may apply it to chunks of positions themselves; the embedding
    /// matrix when tied.
    pub fn lm_head_weight(&self) -> Option<&Tensor> {
        let layer = match self {
            Self::Qwen2(m) => m.lm_head_layer(),
            Self::Qwen3(m) => m.lm_head_layer(),
            Self::Llama(m) => m.lm_head_layer(),
        };
        (layer.bias().is_none() && layer.adapter().is_none()).then(|| layer.weight())
    }

    fn hidden(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        mask: &AttentionMask,
        cache: Option<&mut dyn KvStore>,
    ) -> Result<Tensor> {
        let (cos, sin) = match self {
            Self::Qwen2(m) => m.rotary().cos_sin(position_ids)?,
            Self::Qwen3(m) => m.rotary().cos_sin(position_ids)?,
            Self::Llama(m) => m.rotary().cos_sin(position_ids)?,
        };
        let rope = Rope {
            cos: cos.to_dtype(self.dtype())?,
            sin: sin.to_dtype(self.dtype())?,
        };
        Ok(match self {
            Self::Qwen2(m) => m.forward_hidden(input_ids, &rope, mask, cache)?,
            Self::Qwen3(m) => m.forward_hidden(input_ids, &rope, mask, cache)?,
            Self::Llama(m) => m.forward_hidden(input_ids, &rope, mask, cache)?,
        })
    }
}

/// `0..t` offset by `start` in every row, `[b, t]` u32.
pub fn default_positions(
    b_sz: usize,
    seq_len: usize,
    start: usize,
    dev: &Device,
) -> Result<Tensor> {
    let pos = Tensor::arange(start as u32, (start + seq_len) as u32, dev)?;
    Ok(pos
        .unsqueeze(0)?
        .broadcast_as((b_sz, seq_len))?
        .contiguous()?)
}

/// The most negative finite value of `dtype`, used as the additive mask.
fn mask_value(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => -65504.0,
        DType::BF16 => -3.38e38,
        DType::F64 => f64::from(f32::MIN),
        _ => f64::from(f32::MIN),
    }
}

/// Additive attention bias `[b, 1, t, past + t]`: 0 where query `i` may attend key `j` (causal and
/// not padding), the dtype's most negative value elsewhere. `None` when nothing is masked.
///
/// A fully masked row (a padding query) gets a constant row, hence a uniform softmax and no NaN.
pub fn attention_bias(
    attention_mask: Option<&Tensor>,
    b_sz: usize,
    seq_len: usize,
    past: usize,
    dtype: DType,
    dev: &Device,
) -> Result<Option<Tensor>> {
    let kv_len = past + seq_len;
    if attention_mask.is_none() && seq_len == 1 {
        return Ok(None);
    }
    let q_pos = Tensor::arange(past as u32, kv_len as u32, dev)?.reshape((seq_len, 1))?;
    let k_pos = Tensor::arange(0u32, kv_len as u32, dev)?.reshape((1, kv_len))?;
    // 1.0 where allowed.
    let mut allowed = k_pos
        .broadcast_le(&q_pos)?
        .to_dtype(DType::F32)?
        .reshape((1, 1, seq_len, kv_len))?;
    if let Some(mask) = attention_mask {
        let dims = mask.dims2()?;
        if dims != (b_sz, kv_len) {
            return Err(Error::invalid(format!(
                "attention mask has shape {dims:?}, expected ({b_sz}, {kv_len})"
            )));
        }
        let m = mask.to_dtype(DType::F32)?.reshape((b_sz, 1, 1, kv_len))?;
        allowed = allowed.broadcast_mul(&m)?;
    }
    // allowed 1 -> 0, allowed 0 -> mask value.
    let bias = ((allowed - 1.0)? * (-mask_value(dtype)))?;
    Ok(Some(bias.to_dtype(dtype)?))
}

/// Which keys each query of an attention call may attend: the mask's structure. [`attention`]
/// hands it to the tiled kernel, or builds the dense bias from it for the plain path.
#[derive(Debug, Clone, Default)]
pub struct AttentionMask {
    /// Query `i` of `t` sits at position `s - t + i` and attends only the keys at or before it.
    pub causal: bool,
    /// `[b, s]`: 1 for keys to attend, 0 for padding.
    pub keys: Option<Tensor>,
}

impl AttentionMask {
    /// Causal attention over `kv_len` keys per row, with the padding of `attention_mask`
    /// (`[b, kv_len]`, 1 = attend, 0 = padding) when given.
    pub fn causal(attention_mask: Option<&Tensor>, b_sz: usize, kv_len: usize) -> Result<Self> {
        if let Some(mask) = attention_mask {
            let dims = mask.dims2()?;
            if dims != (b_sz, kv_len) {
                return Err(Error::invalid(format!(
                    "attention mask has shape {dims:?}, expected ({b_sz}, {kv_len})"
                )));
            }
        }
        Ok(Self {
            causal: true,
            keys: attention_mask.cloned(),
        })
    }

    /// The additive bias `[b, 1, t, s]` of this mask (see [`attention_bias`]); `None` when
    /// nothing is masked.
    pub fn bias(
        &self,
        b_sz: usize,
        seq_len: usize,
        kv_len: usize,
        dtype: DType,
        dev: &Device,
    ) -> Result<Option<Tensor>> {
        if self.causal {
            let past = kv_len.checked_sub(seq_len).ok_or_else(|| {
                Error::invalid(format!(
                    "causal attention of {seq_len} queries over {kv_len} keys"
                ))
            })?;
            return attention_bias(self.keys.as_ref(), b_sz, seq_len, past, dtype, dev);
        }
        let Some(keys) = &self.keys else {
            return Ok(None);
        };
        let allowed = keys.to_dtype(DType::F32)?.reshape((b_sz, 1, 1, kv_len))?;
        let bias = ((allowed - 1.0)? * (-mask_value(dtype)))?;
        Ok(Some(
            bias.broadcast_as((b_sz, 1, seq_len, kv_len))?
                .contiguous()?
                .to_dtype(dtype)?,
        ))
    }
}

/// RoPE frequencies of one model; produces cos/sin for given positions.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    /// `[head_dim / 2]` f32.
    inv_freq: Tensor,
}

impl RotaryEmbedding {
    /// Frequencies from the config's theta and scaling, computed in f32 as transformers does.
    pub fn new(cfg: &ModelConfig, dev: &Device) -> Result<Self> {
        let dim = cfg.head_dim;
        let base = cfg.rope_theta as f32;
        let mut inv_freq: Vec<f32> = (0..dim / 2)
            .map(|i| 1.0f32 / base.powf((2 * i) as f32 / dim as f32))
            .collect();
        match &cfg.rope_scaling {
            RopeScaling::Default => {}
            RopeScaling::Linear { factor } => {
                for f in &mut inv_freq {
                    *f /= *factor as f32;
                }
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old_len = *original_max_position_embeddings as f64;
                let low_wavelen = old_len / low_freq_factor;
                let high_wavelen = old_len / high_freq_factor;
                for f in &mut inv_freq {
                    let freq = f64::from(*f);
                    let wavelen = 2.0 * std::f64::consts::PI / freq;
                    let scaled = if wavelen < high_wavelen {
                        freq
                    } else if wavelen > low_wavelen {
                        freq / factor
                    } else {
                        let smooth = (old_len / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * freq / factor + smooth * freq
                    };
                    *f = scaled as f32;
                }
            }
        }
        let n = inv_freq.len();
        Ok(Self {
            inv_freq: Tensor::from_vec(inv_freq, n, dev)?,
        })
    }

    /// `cos`, `sin` of shape `[b, 1, t, head_dim]` (f32) for `position_ids` `[b, t]`.
    pub fn cos_sin(&self, position_ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b_sz, seq_len) = position_ids.dims2()?;
        let half = self.inv_freq.dim(0)?;
        let pos = position_ids
            .to_dtype(DType::F32)?
            .reshape((b_sz, seq_len, 1))?;
        let freqs = pos.broadcast_mul(&self.inv_freq.reshape((1, 1, half))?)?;
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?;
        let cos = emb.cos()?.unsqueeze(1)?;
        let sin = emb.sin()?.unsqueeze(1)?;
        Ok((cos, sin))
    }
}

/// cos/sin tables for the current positions, `[b, 1, t, head_dim]` in the compute dtype.
#[derive(Debug, Clone)]
pub struct Rope {
    /// Cosines.
    pub cos: Tensor,
    /// Sines.
    pub sin: Tensor,
}

/// RMSNorm over the last dim: `x * (mean(x^2) + eps)^-1/2 * w`, statistics in f32.
pub fn rms_norm(xs: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if kernels::supported(xs) && xs.dtype() == weight.dtype() {
        return Ok(kernels::rms_norm(xs, weight, eps)?);
    }
    rms_norm_plain(xs, weight, eps)
}

/// [`rms_norm`] from plain candle ops (any dtype and device; the kernels' reference).
pub fn rms_norm_plain(xs: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = xs.dtype();
    let xs32 = xs.to_dtype(DType::F32)?;
    let inv = (xs32.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    let normed = xs32.broadcast_mul(&inv)?.to_dtype(dtype)?;
    Ok(normed.broadcast_mul(weight)?)
}

/// RoPE in the "rotate_half" layout on `[b, heads, t, head_dim]`.
pub fn apply_rope(xs: &Tensor, rope: &Rope) -> Result<Tensor> {
    if kernels::supported(xs) && xs.dtype() == rope.cos.dtype() {
        return Ok(kernels::rope(xs, &rope.cos, &rope.sin)?);
    }
    apply_rope_plain(xs, rope)
}

/// [`apply_rope`] from plain candle ops (any dtype and device; the kernels' reference).
pub fn apply_rope_plain(xs: &Tensor, rope: &Rope) -> Result<Tensor> {
    let head_dim = xs.dim(D::Minus1)?;
    let half = head_dim / 2;
    let x1 = xs.narrow(D::Minus1, 0, half)?;
    let x2 = xs.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((xs.broadcast_mul(&rope.cos)? + rotated.broadcast_mul(&rope.sin)?)?)
}

/// Scaled dot-product attention with GQA: `q` `[b, heads, t, d]`, `k`, `v` `[b, kv_heads, s, d]`
/// (query head `j` uses key/value head `j / (heads / kv_heads)`), `[b, heads, t, d]`.
///
/// On CPU in f32/f64 it runs [`kernels::flash_attention`] (tiled, no `[t, s]` matrix kept, the
/// masked half not computed); elsewhere [`attention_dense`] with the bias built from `mask`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f64,
) -> Result<Tensor> {
    // Every query count takes the kernel: at one query per row (decoding over a cache) it
    // measured faster than the dense path too.
    if kernels::supported(q) && k.dtype() == q.dtype() && v.dtype() == q.dtype() {
        return Ok(kernels::flash_attention(
            q,
            k,
            v,
            mask.keys.as_ref(),
            mask.causal,
            scale,
        )?);
    }
    let (b_sz, _, seq_len, _) = q.dims4()?;
    let kv_len = k.dim(2)?;
    let bias = mask.bias(b_sz, seq_len, kv_len, q.dtype(), q.device())?;
    attention_dense(q, k, v, bias.as_ref(), scale)
}

/// [`attention`] with a dense additive `bias` `[b, 1, t, s]`, without materialising repeated
/// K/V: scores, softmax (fused on CPU in f32/f64) and probabilities are whole `[b, heads, t, s]`
/// tensors.
pub fn attention_dense(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (b_sz, n_heads, seq_len, head_dim) = q.dims4()?;
    let (_, n_kv, kv_len, _) = k.dims4()?;
    let groups = n_heads / n_kv;
    // Heads of one group are adjacent, so grouping them with the query rows is a free reshape
    // and k/v need no repeat. k/v may be views into a KV cache (rows contiguous, batch and head
    // dims mergeable), which the matmuls read in place: no copy of the cache per step.
    let q = q
        .contiguous()?
        .reshape((b_sz, n_kv, groups * seq_len, head_dim))?;
    let scores = q
        .matmul(&k.t()?)?
        .reshape((b_sz, n_heads, seq_len, kv_len))?;
    let probs = if kernels::supported(&scores) && bias.is_none_or(|b| b.dtype() == scores.dtype()) {
        kernels::scaled_softmax(&scores, bias, scale)?
    } else {
        scaled_softmax_plain(&scores, bias, scale)?
    };
    let probs = probs.reshape((b_sz, n_kv, groups * seq_len, kv_len))?;
    let out = probs.matmul(v)?;
    Ok(out.reshape((b_sz, n_heads, seq_len, head_dim))?)
}

/// `softmax(scale * scores + bias)` over the last dim from plain candle ops, in f32 for lower
/// precisions (any dtype and device; the kernels' reference).
pub fn scaled_softmax_plain(scores: &Tensor, bias: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let scores = (scores * scale)?;
    let scores = match bias {
        Some(bias) => scores.broadcast_add(bias)?,
        None => scores,
    };
    let dtype = scores.dtype();
    let compute = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    Ok(candle_nn::ops::softmax(&scores.to_dtype(compute)?, D::Minus1)?.to_dtype(dtype)?)
}

/// The gated MLP activation `silu(gate) * up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if kernels::supported(gate) && gate.dtype() == up.dtype() {
        return Ok(kernels::swiglu(gate, up)?);
    }
    swiglu_plain(gate, up)
}

/// [`swiglu`] from plain candle ops (any dtype and device; the kernels' reference).
pub fn swiglu_plain(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok((gate.silu()? * up)?)
}

/// A linear layer `[.., in] -> [.., out]` with optional bias, weights in HF layout `[out, in]`
/// (stored in the [`WeightStorage`] dtype while one is entered).
pub fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let weight = match WeightStorage::current() {
        // Read straight into the storage dtype: no transient copy in the compute dtype.
        Some(dtype) => {
            vb.get_with_hints_dtype((out_dim, in_dim), "weight", Default::default(), dtype)?
        }
        None => vb.get((out_dim, in_dim), "weight")?,
    };
    let bias = if bias {
        Some(vb.get(out_dim, "bias")?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias).with_adapter(crate::lora::scoped_adapter(&vb.prefix())))
}

thread_local! {
    static STORAGE: std::cell::Cell<Option<DType>> = const { std::cell::Cell::new(None) };
}

/// While alive, the [`Linear`] layers built on this thread store their weights in one dtype
/// (bf16 or f16 on the CPU: weight-only low precision) while their inputs, outputs and biases
/// stay in the compute dtype. [`crate::load()`] enters it for a CPU load in bf16 or f16.
#[derive(Debug)]
pub struct WeightStorage {
    previous: Option<DType>,
}

impl WeightStorage {
    /// Enters the scope (nested scopes restore the outer state on drop).
    pub fn enter(dtype: DType) -> Self {
        Self {
            previous: STORAGE.with(|s| s.replace(Some(dtype))),
        }
    }

    /// The storage dtype of the scope active on this thread, if any.
    pub fn current() -> Option<DType> {
        STORAGE.with(std::cell::Cell::get)
    }
}

impl Drop for WeightStorage {
    fn drop(&mut self) {
        STORAGE.with(|s| s.set(self.previous));
    }
}

/// `y = x · Wᵀ + b` with `W` `[out, in]`. On CPU in f32/f64: [`kernels::linear`] (one GEMM,
/// bias fused, hand-written backward), or [`kernels::linear_rows`] for the few rows of a
/// decoding step (no weight packing), or [`kernels::linear_fixed`] inside a generation step;
/// elsewhere candle's matmul. The weight may be stored narrower than the input (bf16/f16 with f32
/// activations: weight-only low precision, or LoRA's frozen base): the two decoding kernels widen
/// it as they read it, and many rows go through [`kernels::linear_frozen`]. With a
/// [`LoraAdapter`] (see [`crate::lora`]) the weight is frozen and the adapter's output is added.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<LoraAdapter>,
}

impl Linear {
    /// A layer from its weight `[out, in]` and optional bias `[out]`; inside a [`WeightStorage`]
    /// scope the weight is converted to its dtype (a tied `lm_head` gets its own narrow copy of
    /// the embedding).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        let weight = match WeightStorage::current() {
            // A float-to-float cast does not fail; if it did, the layer would keep the wider
            // weight and compute the same values.
            Some(dtype) if weight.dtype() != dtype && weight.dtype().is_float() => {
                weight.to_dtype(dtype).unwrap_or(weight)
            }
            _ => weight,
        };
        Self {
            weight,
            bias,
            lora: None,
        }
    }

    /// The same layer with `adapter` added to its output (the weight then takes no gradient).
    pub fn with_adapter(mut self, adapter: Option<LoraAdapter>) -> Self {
        self.lora = adapter;
        self
    }

    /// The weight `[out, in]`, as stored.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias `[out]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The LoRA adapter added to the output, if any.
    pub fn adapter(&self) -> Option<&LoraAdapter> {
        self.lora.as_ref()
    }
}

impl candle_core::Module for Linear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(dtype) = crate::autocast::dtype().filter(|&d| d != xs.dtype()) {
            return self.forward_autocast(xs, dtype);
        }
        let base = self.forward_base(xs)?;
        let Some(lora) = &self.lora else {
            return Ok(base);
        };
        let delta = lora
            .forward(xs)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        base + delta
    }
}

impl Linear {
    /// [`crate::autocast`]: the product in `dtype` (differentiable casts of input and weight),
    /// cast back to the input's dtype; bias and adapter in the input's dtype.
    fn forward_autocast(&self, xs: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
        let in_dim = xs.dim(D::Minus1)?;
        let rows = xs.elem_count() / in_dim.max(1);
        let mut dims = xs.dims().to_vec();
        let last = dims.len() - 1;
        dims[last] = self.weight.dim(0)?;
        let ys = xs
            .reshape((rows, in_dim))?
            .to_dtype(dtype)?
            .matmul(&self.weight.to_dtype(dtype)?.t()?)?
            .to_dtype(xs.dtype())?
            .reshape(dims)?;
        let ys = match &self.bias {
            Some(bias) => ys.broadcast_add(&bias.to_dtype(xs.dtype())?)?,
            None => ys,
        };
        match &self.lora {
            Some(lora) => {
                ys + lora
                    .forward(xs)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?
            }
            None => Ok(ys),
        }
    }

    /// `x · Wᵀ + b`, without the adapter.
    fn forward_base(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let in_dim = xs.dim(D::Minus1)?;
        let rows = xs.elem_count() / in_dim.max(1);
        let w = &self.weight;
        let projection = kernels::supported_projection(xs, w);
        // Inside a generation step every row count takes the fixed-order kernel, so a row's
        // logits do not depend on the rows beside it (issue 21).
        let ys = if projection && kernels::FixedOrder::active() {
            kernels::linear_fixed(xs, w)?
        } else if projection && rows <= kernels::LINEAR_ROWS_MAX {
            kernels::linear_rows(xs, w)?
        } else if kernels::supported(xs)
            && kernels::supported(w)
            && xs.dtype() == w.dtype()
            && self.bias.as_ref().is_none_or(|b| b.dtype() == xs.dtype())
        {
            return kernels::linear(xs, w, self.bias.as_ref());
        } else if kernels::supported(xs) && w.dtype() != xs.dtype() {
            // A narrow weight over many rows (prefill, scoring): widened per call, never kept.
            kernels::linear_frozen(xs, w)?
        } else {
            let mut dims = xs.dims().to_vec();
            let last = dims.len() - 1;
            dims[last] = w.dim(0)?;
            xs.reshape((rows, in_dim))?.matmul(&w.t()?)?.reshape(dims)?
        };
        match &self.bias {
            Some(bias) if bias.dtype() != ys.dtype() => {
                ys.broadcast_add(&bias.to_dtype(ys.dtype())?)
            }
            Some(bias) => ys.broadcast_add(bias),
            None => Ok(ys),
        }
    }
}
