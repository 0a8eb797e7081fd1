//! AdamW over named parameters, gradients aligned with them, and clipping by global norm.
//!
//! [`AdamW`] follows PyTorch's `torch.optim.AdamW`: decoupled weight decay
//! (`p -= lr * weight_decay * p`), bias-corrected first and second moments, and `eps` added to
//! the corrected root second moment. Unlike candle's own `AdamW`, a parameter without a gradient
//! is an error, never silently skipped. [`Gradients`] holds one gradient per parameter, in the
//! optimizer's order. Optimizer state saves to safetensors as `exp_avg.<name>`,
//! `exp_avg_sq.<name>` and `step`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Shape, Tensor, Var};

use crate::{Error, Result};

/// AdamW hyper-parameters (the learning rate comes from the schedule at each step).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    /// Decay rate of the first moment.
    pub beta1: f64,
    /// Decay rate of the second moment.
    pub beta2: f64,
    /// Added to the bias-corrected root second moment.
    pub eps: f64,
    /// Decoupled weight decay, applied only to parameters where [`decays`] is true.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// transformers' `TrainingArguments` defaults, with weight decay 0.01.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Whether a parameter gets weight decay.
///
/// As transformers' `Trainer` does by default (`get_decay_parameter_names`): biases and
/// normalisation weights do not decay; every other matrix (including embeddings and
/// `lm_head`) does. Here that is every tensor of rank below 2, every name ending in `.bias`,
/// and every name with a `norm` component (`input_layernorm`, `q_norm`, `model.norm`, ...).
pub fn decays(name: &str, shape: &Shape) -> bool {
    let is_norm = name
        .split('.')
        .any(|part| part == "norm" || part.ends_with("_norm") || part.ends_with("layernorm"));
    !(shape.rank() < 2 || name.ends_with(".bias") || is_norm)
}

/// A trainable parameter: its Hugging Face name, its variable and whether it decays.
#[derive(Debug, Clone)]
pub struct Param {
    /// The Hugging Face weight name, e.g. `model.layers.0.mlp.up_proj.weight`.
    pub name: String,
    /// The variable the model reads.
    pub var: Var,
    /// Whether weight decay applies (see [`decays`]).
    pub weight_decay: bool,
}

/// One gradient per parameter, in the optimizer's parameter order.
#[derive(Debug, Clone)]
pub struct Gradients {
    /// `grads[i]` belongs to parameter `i` of the optimizer.
    pub grads: Vec<Tensor>,
}

impl Gradients {
    /// The L2 norm of all gradients taken together.
    pub fn global_norm(&self) -> Result<f64> {
        let mut sum_sq = 0f64;
        for grad in &self.grads {
            sum_sq += if crate::kernels::supported(grad) {
                crate::kernels::sum_squares(grad)?
            } else {
                grad.to_dtype(DType::F64)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f64>()?
            };
        }
        Ok(sum_sq.sqrt())
    }

    /// Scales every gradient by `factor`.
    pub fn scale(&mut self, factor: f64) -> Result<()> {
        for grad in &mut self.grads {
            *grad = grad.affine(factor, 0.0)?;
        }
        Ok(())
    }

    /// Clips to global norm `max_norm` as `torch.nn.utils.clip_grad_norm_` does
    /// (scale by `max_norm / (norm + 1e-6)` when that is below 1) and returns the norm before
    /// clipping.
    pub fn clip_by_global_norm(&mut self, max_norm: f64) -> Result<f64> {
        let norm = self.global_norm()?;
        let coef = max_norm / (norm + 1e-6);
        if norm.is_finite() && coef < 1.0 {
            self.scale(coef)?;
        }
        Ok(norm)
    }
}

/// AdamW with decoupled weight decay over named parameters.
#[derive(Debug)]
pub struct AdamW {
    params: Vec<Param>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    step: usize,
    config: AdamWConfig,
}

impl AdamW {
    /// An optimizer over `params` (name, variable), in the given order; decay per [`decays`].
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::with_capacity(params.len());
        let mut exp_avg = Vec::with_capacity(params.len());
        let mut exp_avg_sq = Vec::with_capacity(params.len());
        for (name, var) in params {
            if !seen.insert(name.clone()) {
                return Err(Error::Model(format!(
                    "optimizer: parameter `{name}` is listed twice"
                )));
            }
            if !var.dtype().is_float() {
                return Err(Error::Model(format!(
                    "optimizer: parameter `{name}` has non-float dtype {:?}",
                    var.dtype()
                )));
            }
            exp_avg.push(var.zeros_like()?);
            exp_avg_sq.push(var.zeros_like()?);
            let weight_decay = decays(&name, var.shape());
            out.push(Param {
                name,
                var,
                weight_decay,
            });
        }
        Ok(Self {
            params: out,
            exp_avg,
            exp_avg_sq,
            step: 0,
            config,
        })
    }

    /// The parameters, in optimizer order.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// The number of steps taken so far.
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// Collects each parameter's gradient from a backward pass; a parameter without a gradient
    /// is an error that names it (a detached op somewhere in the forward).
    pub fn gradients(&self, store: &candle_core::backprop::GradStore) -> Result<Gradients> {
        let mut grads = Vec::with_capacity(self.params.len());
        for param in &self.params {
            match store.get(param.var.as_tensor()) {
                Some(grad) => grads.push(grad.detach()),
                None => return Err(missing_gradient(&param.name)),
            }
        }
        Ok(Gradients { grads })
    }

    /// Applies one AdamW update with learning rate `lr`.
    pub fn step(&mut self, grads: &Gradients, lr: f64) -> Result<()> {
        self.step_scaled(grads, 1.0, lr)
    }

    /// Applies one AdamW update with learning rate `lr` from the gradients multiplied by
    /// `grad_scale` (the scaled gradients are never materialised on CPU: the fused
    /// [`crate::kernels::adamw_update`] scales on the fly and updates in place).
    pub fn step_scaled(&mut self, grads: &Gradients, grad_scale: f64, lr: f64) -> Result<()> {
        if grads.grads.len() != self.params.len() {
            return Err(Error::Model(format!(
                "optimizer: {} gradients for {} parameters",
                grads.grads.len(),
                self.params.len()
            )));
        }
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        let t = (self.step + 1) as i32;
        let bias_correction1 = 1.0 - beta1.powi(t);
        let bias_correction2_sqrt = (1.0 - beta2.powi(t)).sqrt();
        let step_size = lr / bias_correction1;
        for (i, param) in self.params.iter().enumerate() {
            let grad = &grads.grads[i];
            if grad.shape() != param.var.shape() {
                return Err(Error::Model(format!(
                    "optimizer: gradient of `{}` has shape {:?}, the parameter {:?}",
                    param.name,
                    grad.shape(),
                    param.var.shape()
                )));
            }
            let decay = if param.weight_decay {
                1.0 - lr * weight_decay
            } else {
                1.0
            };
            let coefficients = crate::kernels::AdamWStep {
                grad_scale,
                beta1,
                beta2,
                eps,
                step_size,
                bias_correction2_sqrt,
                decay,
            };
            if crate::kernels::supported(param.var.as_tensor())
                && grad.dtype() == param.var.dtype()
                && param.var.is_contiguous()
            {
                crate::kernels::adamw_update(
                    param.var.as_tensor(),
                    &self.exp_avg[i],
                    &self.exp_avg_sq[i],
                    grad,
                    coefficients,
                )?;
                continue;
            }
            let (value, m, v) = adamw_plain(
                &param.var.as_detached_tensor(),
                &self.exp_avg[i],
                &self.exp_avg_sq[i],
                &grad.to_dtype(param.var.dtype())?,
                coefficients,
            )?;
            param.var.set(&value)?;
            self.exp_avg[i] = m;
            self.exp_avg_sq[i] = v;
        }
        self.step += 1;
        Ok(())
    }

    /// Writes the optimizer state (`exp_avg.<name>`, `exp_avg_sq.<name>`, `step`) to a
    /// safetensors file, atomically (temp file + rename).
    pub fn save_state(&self, path: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(2 * self.params.len() + 1);
        for (i, param) in self.params.iter().enumerate() {
            tensors.push((format!("exp_avg.{}", param.name), self.exp_avg[i].clone()));
            tensors.push((
                format!("exp_avg_sq.{}", param.name),
                self.exp_avg_sq[i].clone(),
            ));
        }
        tensors.push((
            "step".to_string(),
            Tensor::new(self.step as i64, &candle_core::Device::Cpu)?,
        ));
        let mut metadata = HashMap::new();
        metadata.insert("format".to_string(), "pt".to_string());
        metadata.insert("optimizer".to_string(), "adamw".to_string());
        metadata.insert(
            "config".to_string(),
            serde_json::to_string(&self.config)
                .map_err(|e| Error::Model(format!("optimizer config: {e}")))?,
        );
        let bytes =
            safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
                .map_err(|e| {
                    Error::Model(format!(
                        "{}: cannot serialise optimizer state: {e}",
                        path.display()
                    ))
                })?;
        crate::save::write_atomic(path, &bytes)
    }

    /// Restores state written by [`AdamW::save_state`] for the same parameters.
    pub fn load_state(&mut self, path: &Path) -> Result<()> {
        let bytes = fs_err::read(path)?;
        let bad = |what: String| Error::Model(format!("{}: {what}", path.display()));
        let tensors = candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu)
            .map_err(|e| bad(format!("not a readable safetensors file: {e}")))?;
        let step = tensors
            .get("step")
            .ok_or_else(|| bad("missing tensor `step`".into()))?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        let step = match step.as_slice() {
            [s] if *s >= 0.0 && s.fract() == 0.0 => *s as usize,
            _ => return Err(bad("tensor `step` is not one non-negative integer".into())),
        };
        let expected = 2 * self.params.len() + 1;
        if tensors.len() != expected {
            return Err(bad(format!(
                "holds {} tensors, this optimizer expects {expected} (a different model?)",
                tensors.len()
            )));
        }
        let mut exp_avg = Vec::with_capacity(self.params.len());
        let mut exp_avg_sq = Vec::with_capacity(self.params.len());
        for param in &self.params {
            for (prefix, out) in [("exp_avg", &mut exp_avg), ("exp_avg_sq", &mut exp_avg_sq)] {
                let key = format!("{prefix}.{}", param.name);
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| bad(format!("missing tensor `{key}`")))?;
                if t.shape() != param.var.shape() {
                    return Err(bad(format!(
                        "tensor `{key}` has shape {:?}, the parameter {:?}",
                        t.shape(),
                        param.var.shape()
                    )));
                }
                out.push(
                    t.to_dtype(param.var.dtype())?
                        .to_device(param.var.device())?,
                );
            }
        }
        self.exp_avg = exp_avg;
        self.exp_avg_sq = exp_avg_sq;
        self.step = step;
        Ok(())
    }
}

/// One AdamW update from plain candle ops (any dtype and device; the reference of
/// [`crate::kernels::adamw_update`]): the new weight, first and second moments.
pub(crate) fn adamw_plain(
    value: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    grad: &Tensor,
    c: crate::kernels::AdamWStep,
) -> Result<(Tensor, Tensor, Tensor)> {
    let grad = grad.affine(c.grad_scale, 0.0)?;
    let m = (exp_avg.affine(c.beta1, 0.0)? + grad.affine(1.0 - c.beta1, 0.0)?)?;
    let v = (exp_avg_sq.affine(c.beta2, 0.0)? + grad.sqr()?.affine(1.0 - c.beta2, 0.0)?)?;
    let denom = v.sqrt()?.affine(1.0 / c.bias_correction2_sqrt, c.eps)?;
    let value = if c.decay != 1.0 {
        value.affine(c.decay, 0.0)?
    } else {
        value.clone()
    };
    let value = (value - (m.div(&denom)?.affine(c.step_size, 0.0))?)?;
    Ok((value, m, v))
}

pub(crate) fn missing_gradient(name: &str) -> Error {
    Error::Model(format!(
        "parameter `{name}` received no gradient: an op on its path has no backward \
         (fused rms_norm, rope or softmax_last_dim) or the parameter is unused; freeze it \
         explicitly instead"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn decay_exclusions() {
        let m = Shape::from((4, 4));
        let v = Shape::from(4);
        assert!(decays("model.layers.0.mlp.up_proj.weight", &m));
        assert!(decays("model.embed_tokens.weight", &m));
        assert!(decays("lm_head.weight", &m));
        assert!(!decays("model.layers.0.self_attn.q_proj.bias", &v));
        assert!(!decays("model.layers.0.input_layernorm.weight", &v));
        assert!(!decays(
            "model.layers.0.post_attention_layernorm.weight",
            &v
        ));
        assert!(!decays("model.layers.0.self_attn.q_norm.weight", &v));
        assert!(!decays("model.norm.weight", &v));
        // A rank-2 tensor named like a norm still does not decay.
        assert!(!decays("model.norm.weight", &m));
    }

    #[test]
    fn adamw_matches_hand_computed_update() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::from_vec(vec![1.0f64, -2.0, 3.0, 0.5], (2, 2), &dev)?;
        let b = Var::from_vec(vec![1.0f64, 1.0], 2, &dev)?;
        let config = AdamWConfig {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(
            vec![("w".into(), w.clone()), ("b.bias".into(), b.clone())],
            config,
        )?;
        let gw = Tensor::from_vec(vec![0.5f64, -1.0, 0.0, 2.0], (2, 2), &dev)?;
        let gb = Tensor::from_vec(vec![0.1f64, -0.1], 2, &dev)?;
        let grads = Gradients {
            grads: vec![gw.clone(), gb],
        };
        let lr = 0.01;
        opt.step(&grads, lr)?;
        // First step: m_hat = g, v_hat = g^2, update = lr * g / (|g| + eps).
        let w0 = [1.0f64, -2.0, 3.0, 0.5];
        let g = [0.5f64, -1.0, 0.0, 2.0];
        let got = w.flatten_all()?.to_vec1::<f64>()?;
        for k in 0..4 {
            let want = w0[k] * (1.0 - lr * 0.1) - lr * g[k] / (g[k].abs() + 1e-8);
            assert!((got[k] - want).abs() < 1e-12, "{k}: {} vs {want}", got[k]);
        }
        // No decay on the bias.
        let got = b.to_vec1::<f64>()?;
        assert!((got[0] - (1.0 - lr)).abs() < 1e-9 && (got[1] - (1.0 + lr)).abs() < 1e-9);
        // Second step with the same gradient: bias correction keeps the step at lr * sign(g).
        opt.step(&grads, lr)?;
        let got2 = w.flatten_all()?.to_vec1::<f64>()?;
        let w1 = w0[0] * (1.0 - lr * 0.1) - lr;
        let w2 = w1 * (1.0 - lr * 0.1) - lr;
        assert!((got2[0] - w2).abs() < 1e-9, "{} vs {w2}", got2[0]);
        Ok(())
    }

    #[test]
    fn clip_scales_to_max_norm_and_reports_pre_clip_norm() -> Result<()> {
        let dev = Device::Cpu;
        let mut grads = Gradients {
            grads: vec![
                Tensor::new(&[3.0f32, 0.0], &dev)?,
                Tensor::new(&[[0.0f32, 4.0]], &dev)?,
            ],
        };
        let norm = grads.clip_by_global_norm(1.0)?;
        assert!((norm - 5.0).abs() < 1e-6);
        assert!((grads.global_norm()? - 1.0).abs() < 1e-5);
        assert!((grads.grads[0].to_vec1::<f32>()?[0] - 0.6).abs() < 1e-5);
        // Below the limit nothing changes.
        let norm = grads.clip_by_global_norm(10.0)?;
        assert!((norm - 1.0).abs() < 1e-5);
        assert!((grads.global_norm()? - 1.0).abs() < 1e-5);
        Ok(())
    }

    #[test]
    fn state_round_trips() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::from_vec(vec![1.0f32, 2.0], 2, &dev)?;
        let mut opt = AdamW::new(vec![("a.weight".into(), w.clone())], AdamWConfig::default())?;
        let grads = Gradients {
            grads: vec![Tensor::new(&[0.3f32, -0.2], &dev)?],
        };
        opt.step(&grads, 0.1)?;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("optimizer.safetensors");
        opt.save_state(&path)?;
        let w2 = Var::from_vec(w.to_vec1::<f32>()?, 2, &dev)?;
        let mut opt2 = AdamW::new(
            vec![("a.weight".into(), w2.clone())],
            AdamWConfig::default(),
        )?;
        opt2.load_state(&path)?;
        assert_eq!(opt2.step_count(), 1);
        opt.step(&grads, 0.1)?;
        opt2.step(&grads, 0.1)?;
        assert_eq!(w.to_vec1::<f32>()?, w2.to_vec1::<f32>()?);
        // A different parameter set is refused with the file named.
        let mut opt3 = AdamW::new(vec![("b.weight".into(), w2)], AdamWConfig::default())?;
        let err = opt3
            .load_state(&path)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("optimizer.safetensors") && err.contains("exp_avg.b.weight"),
            "{err}"
        );
        Ok(())
    }
}
