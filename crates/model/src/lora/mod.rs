//! LoRA inside the network: a [`LoraAdapter`] rides on a frozen linear layer and adds
//! `scale · (drop(x) · Aᵀ) · Bᵀ` to its output, so the layer computes `x · Wᵀ + scale · B · A · x`
//! without ever forming `W + scale · B · A`.
//!
//! The backward of an adapted layer is three products of [`crate::kernels::linear`]: `W` takes no
//! part in autograd (the kernel's frozen-weight path: no `dW` GEMM), so the step costs `dx` for
//! the base and `dA`, `dB`, `dx` for the two rank-`r` products. The frozen base may be stored in
//! a lower precision (bf16): the layer computes in the input's dtype with
//! [`crate::kernels::linear_frozen`], which widens `W` per call instead of keeping a wide copy.
//!
//! The architecture files are not LoRA-aware: [`build_adapted`] builds a [`CausalLm`] while a
//! scoped table of adapters (by module path, e.g. `model.layers.0.self_attn.q_proj`) is in place,
//! and [`crate::models::linear`] attaches the adapter of its own path when there is one.
//! [`AdaptedBackend`] answers the weight requests with the frozen base tensors, low-precision
//! linear weights as stored.
//!
//! [`peft`] reads PEFT adapter folders: [`AdapterConfig`], [`read_adapter`], [`adapter_base`] and
//! [`load_with_adapter`] (a base model with an adapter merged in).

mod peft;

pub use peft::{
    ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, AdapterConfig, PEFT_PREFIX, adapter_base,
    load_with_adapter, read_adapter, target_modules,
};

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{D, DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::ModelConfig;
use crate::error::Result;
use crate::kernels;
use crate::models::CausalLm;

/// Dropout on the adapter's input during training, as PEFT's `lora_dropout`: each element is
/// zeroed with probability `p` and the rest scaled by `1 / (1 - p)`; the base path sees `x`
/// unchanged.
#[derive(Debug, Clone)]
pub struct LoraDropout {
    p: f64,
    seed: u64,
    /// Forward calls so far: every call draws a fresh mask, reproducibly from `seed`.
    calls: Arc<AtomicU64>,
}

impl LoraDropout {
    /// Dropout with probability `p` (in `[0, 1)`), masks drawn from a stream of `seed`.
    pub fn new(p: f64, seed: u64) -> Self {
        Self {
            p,
            seed,
            calls: Arc::new(AtomicU64::new(0)),
        }
    }

    fn apply(&self, xs: &Tensor) -> Result<Tensor> {
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        let mut rng =
            ChaCha8Rng::seed_from_u64(self.seed ^ call.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let keep = 1.0 / (1.0 - self.p);
        let mask: Vec<f32> = (0..xs.elem_count())
            .map(|_| {
                if rng.random::<f64>() < self.p {
                    0.0
                } else {
                    keep as f32
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, xs.shape(), xs.device())?.to_dtype(xs.dtype())?;
        Ok(xs.mul(&mask)?)
    }
}

/// The low-rank update of one linear layer `W` `[out, in]`: `A` `[r, in]`, `B` `[out, r]` and the
/// factor on `B · A`. `A` and `B` are usually the tensors of trainable variables, so autograd
/// reaches them.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    a: Tensor,
    b: Tensor,
    scale: f64,
    dropout: Option<LoraDropout>,
}

impl LoraAdapter {
    /// An adapter adding `scale · (x · Aᵀ) · Bᵀ`.
    pub fn new(a: Tensor, b: Tensor, scale: f64) -> Self {
        Self {
            a,
            b,
            scale,
            dropout: None,
        }
    }

    /// The same adapter with dropout on its input (training only).
    pub fn with_dropout(mut self, dropout: Option<LoraDropout>) -> Self {
        self.dropout = dropout.filter(|d| d.p > 0.0);
        self
    }

    /// `scale · (drop(x) · Aᵀ) · Bᵀ`: `[.., in] -> [.., out]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = match &self.dropout {
            Some(dropout) => dropout.apply(xs)?,
            None => xs.clone(),
        };
        // The scale goes on the rank-`r` activations, the narrowest tensor of the path.
        let h = project(&xs, &self.a)?.affine(self.scale, 0.0)?;
        project(&h, &self.b)
    }
}

/// `x · Wᵀ` through the fused kernel where it applies, candle's matmul elsewhere.
fn project(xs: &Tensor, w: &Tensor) -> Result<Tensor> {
    if kernels::supported(xs) && kernels::supported(w) && xs.dtype() == w.dtype() {
        return Ok(kernels::linear(xs, w, None)?);
    }
    let in_dim = xs.dim(D::Minus1)?;
    let rows = xs.elem_count() / in_dim.max(1);
    let mut dims = xs.dims().to_vec();
    *dims.last_mut().expect("a linear input has rank >= 1") = w.dim(0)?;
    let w = w.to_dtype(xs.dtype())?;
    Ok(xs.reshape((rows, in_dim))?.matmul(&w.t()?)?.reshape(dims)?)
}

thread_local! {
    /// The adapters of the model [`build_adapted`] is building on this thread, by module path.
    static SCOPE: RefCell<Option<HashMap<String, LoraAdapter>>> = const { RefCell::new(None) };
}

/// The adapter of the module at `path`, while [`build_adapted`] builds a model on this thread.
pub(crate) fn scoped_adapter(path: &str) -> Option<LoraAdapter> {
    SCOPE.with(|scope| scope.borrow().as_ref().and_then(|m| m.get(path).cloned()))
}

/// Builds the network of `cfg` from `vb` (the frozen base) with `adapters` (keyed by module path,
/// `model.layers.0.self_attn.q_proj`) on the linear layers they name.
pub fn build_adapted(
    cfg: &ModelConfig,
    vb: VarBuilder,
    adapters: HashMap<String, LoraAdapter>,
) -> Result<CausalLm> {
    let previous = SCOPE.with(|scope| scope.replace(Some(adapters)));
    let model = CausalLm::new(cfg, vb);
    SCOPE.with(|scope| scope.replace(previous));
    model
}

/// Serves a model's weight requests from frozen tensors keyed by their Hugging Face names. The
/// 2-D weights of linear layers are returned as stored (bf16 stays bf16, widened per call by the
/// layer); every other tensor in the requested dtype.
pub struct AdaptedBackend {
    base: Arc<HashMap<String, Tensor>>,
}

impl AdaptedBackend {
    /// A backend over `base`.
    pub fn new(base: Arc<HashMap<String, Tensor>>) -> Self {
        Self { base }
    }

    /// A [`VarBuilder`] over `base` computing in f32 on `device`.
    pub fn var_builder(base: Arc<HashMap<String, Tensor>>, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(Self::new(base)), DType::F32, device.clone())
    }

    fn lookup(&self, name: &str, dtype: DType) -> candle_core::Result<Tensor> {
        let tensor = self.base.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!("tensor `{name}` is not in the base model"))
        })?;
        if keeps_dtype(name, tensor) {
            return Ok(tensor.clone());
        }
        tensor.to_dtype(dtype)
    }
}

/// Whether `tensor` (named `name`) is a low-precision linear weight the layer widens per call.
/// Embeddings are excluded: their lookup output would come out in the low precision.
fn keeps_dtype(name: &str, tensor: &Tensor) -> bool {
    matches!(tensor.dtype(), DType::BF16 | DType::F16)
        && tensor.rank() == 2
        && name.ends_with(".weight")
        && !name.ends_with("embed_tokens.weight")
}

impl SimpleBackend for AdaptedBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        _: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.lookup(name, dtype)?;
        if tensor.shape() != &s {
            return Err(candle_core::Error::Msg(format!(
                "tensor `{name}` has shape {:?}, the config implies {:?}",
                tensor.dims(),
                s.dims()
            )));
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _: &Device) -> candle_core::Result<Tensor> {
        self.lookup(name, dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.base.contains_key(name)
    }
}
