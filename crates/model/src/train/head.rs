//! Losses through the LM head in chunks of positions, forward and backward: the
//! `[positions, vocab]` logits never exist whole.
//!
//! [`head_loss`] hands a caller's per-chunk loss the logits of each chunk of rows of the final
//! hidden states. Each chunk is computed on a detached copy of its rows (a fresh [`Var`]) and the
//! head weight, and back-propagated on the spot: its gradient with respect to those rows (`dH`)
//! and to the weight (`dW`) is kept, and the chunk's logits and their graph are freed before the
//! next chunk. The returned scalar is `L + S − detach(S)` with `S = Σ h·dH + Σ W·dW`: its value is
//! the total loss `L` and its gradient is exactly `dH` for the hidden states and `dW` for the
//! weight, so the caller's backward continues through the model without ever seeing a
//! `[rows, vocab]` tensor. Any loss built from candle ops works (cross-entropy, every KD
//! divergence); higher-order derivatives are not supported.

use candle_core::{DType, Tensor, Var};

use crate::models::CausalLm;
use crate::score::head_chunk_rows;
use crate::{Error, Result};

/// The sum of `chunk_loss` over chunks of `chunk_rows` rows of `hidden` (`[n, hidden]`, usually
/// attached to the model's graph), as a scalar whose gradient reaches `hidden` and the head
/// weight (see the module docs).
///
/// `chunk_loss(start, logits)` gets the f32 logits `[len, vocab]` of rows `start..start + len`
/// and returns a scalar; it must not use any tensor of the model's graph (only the logits it is
/// given and constants), since each chunk is back-propagated on its own. When the head is not a
/// plain projection (a bias or a LoRA adapter on it) the logits are built whole and
/// `chunk_loss(0, all logits)` is called once, with the ordinary graph.
pub fn head_loss<F, E>(
    model: &CausalLm,
    hidden: &Tensor,
    chunk_rows: usize,
    mut chunk_loss: F,
) -> std::result::Result<Tensor, E>
where
    F: FnMut(usize, &Tensor) -> std::result::Result<Tensor, E>,
    E: From<Error>,
{
    let mut failure = None;
    let mut inner = |start: usize, logits: &Tensor| -> Result<Tensor> {
        chunk_loss(start, logits).map_err(|e| {
            failure = Some(e);
            Error::Model("head_loss: the chunk loss failed".into())
        })
    };
    head_loss_with(model, hidden, chunk_rows, &mut inner).map_err(|e| match failure.take() {
        Some(caller) => caller,
        None => E::from(e),
    })
}

fn head_loss_with(
    model: &CausalLm,
    hidden: &Tensor,
    chunk_rows: usize,
    chunk_loss: &mut dyn FnMut(usize, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let rows = hidden.dims2()?.0;
    let weight = match model.lm_head_weight() {
        // A derived (tracked, non-leaf) weight would need its own graph: not chunked.
        Some(w) if !w.track_op() || w.is_variable() => w.clone(),
        _ => return chunk_loss(0, &model.lm_head(hidden)?),
    };
    let track_hidden = hidden.track_op();
    let track_weight = weight.is_variable();
    let chunk_rows = chunk_rows.max(1);
    let mut total = 0f64;
    let mut loss_dtype = DType::F32;
    let mut d_hidden = Vec::with_capacity(rows.div_ceil(chunk_rows));
    let mut d_weight: Option<Tensor> = None;
    let mut start = 0;
    while start < rows {
        let len = chunk_rows.min(rows - start);
        let rows_in = hidden.narrow(0, start, len)?.detach();
        let leaf = if track_hidden {
            Some(Var::from_tensor(&rows_in)?)
        } else {
            None
        };
        let input = leaf.as_ref().map_or(&rows_in, |v| v.as_tensor());
        let logits = model.lm_head(input)?;
        let loss = chunk_loss(start, &logits)?;
        if loss.elem_count() != 1 {
            return Err(Error::Model(format!(
                "head_loss: a chunk's loss must be a scalar, got shape {:?}",
                loss.shape()
            )));
        }
        let loss = loss.reshape(())?;
        loss_dtype = loss.dtype();
        total += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if loss.track_op() && (track_hidden || track_weight) {
            let mut grads = loss.backward()?;
            if let Some(leaf) = &leaf {
                d_hidden.push(match grads.remove(leaf.as_tensor()) {
                    Some(g) => g,
                    None => leaf.as_tensor().zeros_like()?,
                });
            }
            if track_weight && let Some(g) = grads.remove(&weight) {
                d_weight = Some(match d_weight.take() {
                    Some(sum) => add_into(sum, &g)?,
                    None if start + len >= rows => g,
                    // An accumulator of our own for the next chunks to add into in place: the
                    // gradient's storage may be shared.
                    None => g.copy()?,
                });
            }
        } else if let Some(leaf) = &leaf {
            d_hidden.push(leaf.as_tensor().zeros_like()?);
        }
        start += len;
    }
    let value = Tensor::new(total, hidden.device())?.to_dtype(loss_dtype)?;
    let mut surrogate: Option<Tensor> = None;
    if track_hidden && !d_hidden.is_empty() {
        let d_hidden = Tensor::cat(&d_hidden, 0)?;
        surrogate = Some(dot(hidden, &d_hidden)?.to_dtype(loss_dtype)?);
    }
    if let Some(d_weight) = d_weight {
        let term = dot(&weight, &d_weight)?.to_dtype(loss_dtype)?;
        surrogate = Some(match surrogate {
            Some(s) => (s + term)?,
            None => term,
        });
    }
    Ok(match surrogate {
        // Exactly 0 in value; gradient dH and dW.
        Some(s) => ((&s - s.detach())? + value)?,
        None => value,
    })
}

/// `Σ a·b` as a scalar whose gradient with respect to `a` is `b`. A `[1, n] × [n, 1]` matmul of
/// flat views: the graph keeps only `a` and `b`, not an `a·b` product as large as the weight.
fn dot(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let n = a.elem_count();
    let b = b.to_dtype(a.dtype())?.contiguous()?.reshape((n, 1))?;
    Ok(a.contiguous()?.reshape((1, n))?.matmul(&b)?.reshape(())?)
}

/// The value of [`head_loss`] without any gradient (evaluation): the sum of `chunk_loss` over
/// chunks of `chunk_rows` rows of `hidden`, read detached.
pub fn head_loss_value<F, E>(
    model: &CausalLm,
    hidden: &Tensor,
    chunk_rows: usize,
    mut chunk_loss: F,
) -> std::result::Result<f64, E>
where
    F: FnMut(usize, &Tensor) -> std::result::Result<Tensor, E>,
    E: From<Error>,
{
    let mut total = 0f64;
    crate::score::for_each_logits_chunk(
        model,
        hidden,
        chunk_rows,
        |start, logits| -> std::result::Result<(), E> {
            let loss = chunk_loss(start, logits)?;
            total += loss
                .sum_all()
                .and_then(|l| l.to_dtype(DType::F64))
                .and_then(|l| l.to_scalar::<f64>())
                .map_err(Error::from)?;
            Ok(())
        },
    )?;
    Ok(total)
}

/// `sum + g`: in place on CPU in f32/f64 (`sum` is this function's own accumulator, never
/// shared), else a new tensor.
fn add_into(sum: Tensor, g: &Tensor) -> Result<Tensor> {
    let in_place = sum.device().is_cpu()
        && g.device().is_cpu()
        && sum.dtype() == g.dtype()
        && matches!(sum.dtype(), DType::F32 | DType::F64)
        && sum.shape() == g.shape()
        && sum.is_contiguous();
    if !in_place {
        return Ok((sum + g)?);
    }
    sum.inplace_op2(&g.contiguous()?, &AddAssign)?;
    Ok(sum)
}

/// `a += b` elementwise on contiguous CPU storage.
struct AddAssign;

impl candle_core::InplaceOp2 for AddAssign {
    fn name(&self) -> &'static str {
        "add-assign"
    }

    fn cpu_fwd(
        &self,
        a: &mut candle_core::CpuStorage,
        la: &candle_core::Layout,
        b: &candle_core::CpuStorage,
        lb: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::CpuStorage;
        fn add<T: Copy + std::ops::AddAssign + Send + Sync>(
            a: &mut [T],
            la: &candle_core::Layout,
            b: &[T],
            lb: &candle_core::Layout,
        ) -> candle_core::Result<()> {
            use rayon::prelude::*;
            let (Some((a0, a1)), Some((b0, b1))) =
                (la.contiguous_offsets(), lb.contiguous_offsets())
            else {
                candle_core::bail!("add-assign: contiguous tensors expected");
            };
            if a1 - a0 != b1 - b0 {
                candle_core::bail!("add-assign: {} vs {} elements", a1 - a0, b1 - b0);
            }
            a[a0..a1]
                .par_chunks_mut(1 << 16)
                .zip(b[b0..b1].par_chunks(1 << 16))
                .for_each(|(x, y)| x.iter_mut().zip(y).for_each(|(x, y)| *x += *y));
            Ok(())
        }
        match (a, b) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => add(a, la, b, lb),
            (CpuStorage::F64(a), CpuStorage::F64(b)) => add(a, la, b, lb),
            _ => candle_core::bail!("add-assign: f32 or f64 tensors of one dtype expected"),
        }
    }
}

/// [`crate::train::causal_lm_loss`] from the final hidden states `[b, t, hidden]` (see
/// [`CausalLm::forward_hidden`]) instead of the logits: only positions with a label go through the
/// LM head, `chunk_rows` at a time (`None`: [`head_chunk_rows`]), in the forward and the backward.
pub fn causal_lm_loss_chunked(
    model: &CausalLm,
    hidden: &Tensor,
    labels: &Tensor,
    chunk_rows: Option<usize>,
) -> Result<(Tensor, usize)> {
    let (b, t, h) = hidden.dims3()?;
    let vocab = model.config().vocab_size;
    let label_dims = labels.dims2()?;
    if label_dims != (b, t) {
        return Err(Error::Model(format!(
            "causal_lm_loss: labels have shape {label_dims:?}, hidden states {:?}",
            hidden.shape()
        )));
    }
    let rows = labels.to_dtype(DType::I64)?.to_vec2::<i64>()?;
    let mut positions = Vec::new();
    let mut targets = Vec::new();
    for (row_index, row) in rows.iter().enumerate() {
        for (position, &label) in row.iter().enumerate().skip(1) {
            if label < 0 {
                continue;
            }
            if label as u64 >= vocab as u64 {
                return Err(Error::Model(format!(
                    "causal_lm_loss: label {label} at row {row_index}, position {position} is \
                     outside the vocabulary of {vocab}"
                )));
            }
            // Position p - 1 predicts the label at p.
            positions.push((row_index * t + position - 1) as u32);
            targets.push(label as u32);
        }
    }
    let n_tokens = targets.len();
    if n_tokens == 0 {
        return Ok((Tensor::zeros((), DType::F32, hidden.device())?, 0));
    }
    let device = hidden.device();
    let positions = Tensor::from_vec(positions, n_tokens, device)?;
    let selected = hidden.reshape((b * t, h))?.index_select(&positions, 0)?;
    let chunk_rows = chunk_rows.unwrap_or_else(|| head_chunk_rows(vocab));
    let loss_sum = head_loss(
        model,
        &selected,
        chunk_rows,
        |start, logits| -> Result<Tensor> {
            let len = logits.dim(0)?;
            let chunk = Tensor::from_slice(&targets[start..start + len], (1, len), device)?;
            Ok(super::gather_logprobs(&logits.unsqueeze(0)?, &chunk)?
                .sum_all()?
                .neg()?)
        },
    )?;
    Ok((loss_sum, n_tokens))
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};
    use candle_nn::{VarBuilder, VarMap};

    use super::*;
    use crate::config::ModelConfig;
    use crate::score::{score_batch_chunked, target_logprobs_chunked, token_logprobs_from_logits};
    use crate::train::{causal_lm_loss, named_vars};

    /// A tiny Qwen2 whose weights are a fixed pseudo-random pattern of scale ~0.5.
    fn tiny(tied: bool) -> Result<(VarMap, CausalLm)> {
        let value = serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": 40,
            "hidden_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "intermediate_size": 24,
            "max_position_embeddings": 64,
            "rope_theta": 10000.0,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": tied,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        });
        let cfg = ModelConfig::from_json(&value, "<tiny>")?;
        let varmap = VarMap::new();
        let model = CausalLm::new(
            &cfg,
            VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        )?;
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for (name, var) in named_vars(&varmap) {
            let n = var.elem_count();
            let values: Vec<f32> = (0..n)
                .map(|_| {
                    state = state
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    let u = (state >> 40) as f32 / (1u64 << 24) as f32;
                    if var.rank() >= 2 {
                        u - 0.5
                    } else if name.ends_with(".bias") {
                        0.1 * (u - 0.5)
                    } else {
                        1.0 + 0.2 * (u - 0.5)
                    }
                })
                .collect();
            var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu)?)?;
        }
        Ok((varmap, model))
    }

    fn grads_of(varmap: &VarMap, loss: &Tensor) -> Result<Vec<(String, Vec<f32>)>> {
        let store = loss.backward()?;
        named_vars(varmap)
            .into_iter()
            .map(|(name, var)| {
                let grad = store
                    .get(var.as_tensor())
                    .ok_or_else(|| Error::Model(format!("no gradient for {name}")))?;
                Ok((name, grad.flatten_all()?.to_vec1::<f32>()?))
            })
            .collect()
    }

    /// The chunked causal-LM loss (chunks of 4 positions, the last one shorter) equals the
    /// whole-logits one in value and in every parameter's gradient, tied or not.
    #[test]
    fn chunked_causal_lm_loss_equals_the_whole_logits_loss() -> Result<()> {
        for tied in [false, true] {
            let (varmap, model) = tiny(tied)?;
            let ids = Tensor::new(
                &[[3u32, 9, 1, 30, 22, 5, 17], [8, 8, 2, 39, 0, 11, 4]],
                &Device::Cpu,
            )?;
            // Ignored labels in both rows: 10 of the 12 shifted positions count.
            let labels = Tensor::new(
                &[[3i64, 9, -100, 30, 22, 5, 17], [8, -100, 2, 39, 0, 11, 4]],
                &Device::Cpu,
            )?;
            let (want, want_n) = causal_lm_loss(&model.forward(&ids, None, None)?, &labels)?;
            let hidden = model.forward_hidden(&ids, None, None)?;
            let (got, got_n) = causal_lm_loss_chunked(&model, &hidden, &labels, Some(4))?;
            assert_eq!((got_n, want_n), (10, 10));
            let (a, b) = (got.to_scalar::<f32>()?, want.to_scalar::<f32>()?);
            assert!((a - b).abs() <= 1e-5 * b.abs(), "loss {a} vs {b}");
            let got = grads_of(&varmap, &got)?;
            let want = grads_of(&varmap, &want)?;
            for ((name, a), (_, b)) in got.iter().zip(&want) {
                let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
                let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                println!("tied {tied} {name}: max diff {diff:.2e} (scale {scale:.2e})");
                assert!(
                    scale > 0.0 && diff <= 1e-4 * scale,
                    "{name}: {diff} vs {scale}"
                );
            }
        }
        Ok(())
    }

    /// A chunk that fails hands back the caller's own error.
    #[test]
    fn a_failing_chunk_returns_its_error() -> Result<()> {
        #[derive(Debug)]
        enum Failure {
            Model,
            Chunk(usize),
        }
        impl From<Error> for Failure {
            fn from(_: Error) -> Self {
                Self::Model
            }
        }
        let (_, model) = tiny(false)?;
        let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu)?;
        let hidden = model.forward_hidden(&ids, None, None)?.squeeze(0)?;
        let result = head_loss(&model, &hidden, 2, |start, logits| {
            if start == 2 {
                Err(Failure::Chunk(start))
            } else {
                Ok(logits.sum_all().map_err(Error::from)?)
            }
        });
        assert!(matches!(result, Err(Failure::Chunk(2))), "{result:?}");
        Ok(())
    }

    /// Scoring in chunks of 3 positions equals scoring with the whole logits.
    #[test]
    fn chunked_scoring_equals_whole_logits() -> Result<()> {
        let (_, model) = tiny(false)?;
        let items = vec![
            (vec![5u32, 6], vec![7u32, 8, 9, 10, 11, 12, 13]),
            (vec![1], vec![2, 3]),
            (vec![4, 4, 4], vec![]),
        ];
        let chunked = score_batch_chunked(&model, &items, 0, 3)?;
        let whole = score_batch_chunked(&model, &items, 0, 1 << 20)?;
        assert_eq!(
            chunked.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![7, 2, 0]
        );
        for (a, b) in chunked.iter().flatten().zip(whole.iter().flatten()) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        // And the direct reference: log_softmax of the full logits.
        let ids = Tensor::new(&[[5u32, 6, 7, 8, 9, 10, 11, 12, 13]], &Device::Cpu)?;
        let logits = model.forward(&ids, None, None)?.narrow(1, 1, 7)?;
        let targets = Tensor::new(&[[7u32, 8, 9, 10, 11, 12, 13]], &Device::Cpu)?;
        let reference = token_logprobs_from_logits(&logits, &targets)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let hidden = model
            .forward_hidden(&ids, None, None)?
            .squeeze(0)?
            .narrow(0, 1, 7)?;
        let direct = target_logprobs_chunked(&model, &hidden, &[7, 8, 9, 10, 11, 12, 13], 2)?;
        for (a, b) in direct
            .iter()
            .zip(&reference)
            .chain(chunked[0].iter().zip(&reference))
        {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        Ok(())
    }
}
