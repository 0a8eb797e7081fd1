//! Qwen3 (`Qwen3ForCausalLM`): pre-norm decoder with GQA, RoPE, SwiGLU MLP, an explicit
//! `head_dim` (q/o projections need not be square) and per-head RMSNorm on queries and keys
//! (`q_norm`, `k_norm`, over `head_dim`, before RoPE); biases only when `attention_bias` is set.
//!
//! Reads top to bottom: [`Mlp`], [`Attention`], [`DecoderLayer`], [`Model`]. Weight names
//! mirror the transformers state dict (`model.layers.N.self_attn.q_proj.weight`, `lm_head.weight`).

use candle_core::{Module, Tensor};
use candle_nn::{Embedding, VarBuilder};

use super::{
    AttentionMask, Linear, Rope, RotaryEmbedding, apply_rope, attention, linear, rms_norm, swiglu,
};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::kv_cache::KvStore;

/// The gated MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    span: tracing::Span,
}

impl Mlp {
    fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: linear(h, i, false, vb.pp("gate_proj"))?,
            up_proj: linear(h, i, false, vb.pp("up_proj"))?,
            down_proj: linear(i, h, false, vb.pp("down_proj"))?,
            span: tracing::span!(tracing::Level::TRACE, "mlp"),
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        let act = swiglu(&self.gate_proj.forward(xs)?, &self.up_proj.forward(xs)?)?;
        Ok(self.down_proj.forward(&act)?)
    }
}

/// Multi-head attention with grouped key/value heads.
#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Tensor,
    k_norm: Tensor,
    eps: f64,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    span: tracing::Span,
}

impl Attention {
    fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let bias = cfg.attention_bias;
        Ok(Self {
            q_proj: linear(h, nh * d, bias, vb.pp("q_proj"))?,
            k_proj: linear(h, nkv * d, bias, vb.pp("k_proj"))?,
            v_proj: linear(h, nkv * d, bias, vb.pp("v_proj"))?,
            o_proj: linear(nh * d, h, bias, vb.pp("o_proj"))?,
            q_norm: vb.pp("q_norm").get(d, "weight")?,
            k_norm: vb.pp("k_norm").get(d, "weight")?,
            eps: cfg.rms_norm_eps,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: d,
            span: tracing::span!(tracing::Level::TRACE, "attn"),
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        rope: &Rope,
        mask: &AttentionMask,
        cache: Option<(&mut dyn KvStore, usize)>,
    ) -> Result<Tensor> {
        let _enter = self.span.enter();
        let (b_sz, seq_len, _) = xs.dims3()?;
        let q = self.q_proj.forward(xs)?;
        let k = self.k_proj.forward(xs)?;
        let v = self.v_proj.forward(xs)?;
        // q_norm / k_norm act per head, over head_dim, before RoPE.
        let q = q.reshape((b_sz, seq_len, self.num_heads, self.head_dim))?;
        let q = rms_norm(&q, &self.q_norm, self.eps)?
            .transpose(1, 2)?
            .contiguous()?;
        let k = k.reshape((b_sz, seq_len, self.num_kv_heads, self.head_dim))?;
        let k = rms_norm(&k, &self.k_norm, self.eps)?
            .transpose(1, 2)?
            .contiguous()?;
        let v = v
            .reshape((b_sz, seq_len, self.num_kv_heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = apply_rope(&q, rope)?;
        let k = apply_rope(&k, rope)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let out = match cache {
            Some((cache, layer)) => cache.attend(layer, &q, &k, &v, mask, scale)?,
            None => attention(&q, &k, &v, mask, scale)?,
        };
        let out = out
            .transpose(1, 2)?
            .reshape((b_sz, seq_len, self.num_heads * self.head_dim))?;
        Ok(self.o_proj.forward(&out)?)
    }
}

/// One pre-norm block: `x += attn(norm(x))`, `x += mlp(norm(x))`.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: Tensor,
    post_attention_layernorm: Tensor,
    eps: f64,
    span: tracing::Span,
}

impl DecoderLayer {
    fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            self_attn: Attention::new(cfg, vb.pp("self_attn"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
            input_layernorm: vb.pp("input_layernorm").get(h, "weight")?,
            post_attention_layernorm: vb.pp("post_attention_layernorm").get(h, "weight")?,
            eps: cfg.rms_norm_eps,
            span: tracing::span!(tracing::Level::TRACE, "layer"),
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        rope: &Rope,
        mask: &AttentionMask,
        cache: Option<(&mut dyn KvStore, usize)>,
    ) -> Result<Tensor> {
        let _enter = self.span.enter();
        let h = rms_norm(xs, &self.input_layernorm, self.eps)?;
        let xs = (xs + self.self_attn.forward(&h, rope, mask, cache)?)?;
        let h = rms_norm(&xs, &self.post_attention_layernorm, self.eps)?;
        Ok((&xs + self.mlp.forward(&h)?)?)
    }
}

/// The full model: embeddings, decoder layers, final norm and `lm_head`.
#[derive(Debug, Clone)]
pub struct Model {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: Linear,
    rotary: RotaryEmbedding,
    cfg: ModelConfig,
}

impl Model {
    /// Builds the model; `lm_head` is the embedding when `tie_word_embeddings` is set.
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let vb_m = vb.pp("model");
        let embed = vb_m
            .pp("embed_tokens")
            .get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, vb_m.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let norm = vb_m.pp("norm").get(cfg.hidden_size, "weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(embed.clone(), None)
        } else {
            linear(cfg.hidden_size, cfg.vocab_size, false, vb.pp("lm_head"))?
        };
        Ok(Self {
            embed_tokens: Embedding::new(embed, cfg.hidden_size),
            layers,
            norm,
            lm_head,
            rotary: RotaryEmbedding::new(cfg, vb.device())?,
            cfg: cfg.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The rotary frequencies.
    pub fn rotary(&self) -> &RotaryEmbedding {
        &self.rotary
    }

    /// The embedding matrix `[vocab, hidden]`.
    pub fn embed_weight(&self) -> &Tensor {
        self.embed_tokens.embeddings()
    }

    /// Final normalised hidden states `[b, t, hidden]`.
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        rope: &Rope,
        mask: &AttentionMask,
        mut cache: Option<&mut dyn KvStore>,
    ) -> Result<Tensor> {
        let mut xs = self.embed_tokens.forward(input_ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| (c as &mut dyn KvStore, i));
            xs = layer.forward(&xs, rope, mask, layer_cache)?;
        }
        rms_norm(&xs, &self.norm, self.cfg.rms_norm_eps)
    }

    /// Logits `[.., vocab]` in the compute dtype.
    pub fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(hidden)?)
    }

    /// The `lm_head` layer (the embedding when tied).
    pub fn lm_head_layer(&self) -> &Linear {
        &self.lm_head
    }

    /// The `lm_head` weight `[vocab, hidden]`, as stored (bf16 under weight-only bf16).
    pub fn lm_head_weight(&self) -> &Tensor {
        self.lm_head.weight()
    }
}
