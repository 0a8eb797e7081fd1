//! Objectives: from a micro-batch of examples to the *summed* per-token loss the trainer
//! accumulates (gradient accumulation divides by the step's total target tokens).
//!
//! [`MicroBatch`] lays examples out right-padded (causal attention never lets a real token see
//! the padding after it, so no mask is needed) and lists the flat positions whose next token is a
//! completion token. Only those positions go through `lm_head`: the `[b, t, vocab]` logits are
//! never built for prompt or padding positions, for the student or the teacher. Even at those
//! positions the head runs in chunks ([`loss`], [`retort_model::train::head_loss`]): every
//! objective reduces one chunk's logits (and a dense teacher's) and back-propagates them before
//! the next, so the memory of a long trace is bounded by the chunk, not by its length.
//!
//! [`LossSpec`] is the closed set of objectives: `sft` (cross-entropy), `kd`
//! (`(1 - w) * sft + w * divergence(teacher, student)` per token, dense teacher logits computed
//! under no gradient, or the sparse top-k signal of an offline cache) and REDI.

use candle_core::{DType, Device, Tensor};
use retort_model::CausalLm;
use retort_model::score::head_chunk_rows;
use retort_model::train::{gather_logprobs, head_loss, head_loss_value};

use crate::distill::data::Example;
use crate::distill::divergence::{Divergence, per_token};
use crate::distill::teacher::TeacherSignal;
use crate::error::Result;

/// Right-padded input ids and the positions that carry a loss.
#[derive(Debug, Clone)]
pub struct MicroBatch {
    /// `[b, len]` u32.
    pub input_ids: Tensor,
    /// `[n]` u32: flat indices `row * len + position` whose next token is a target.
    pub positions: Tensor,
    /// `[1, n]` u32: the target token at each of those positions.
    pub targets: Tensor,
    /// `n`: target tokens in the micro-batch.
    pub tokens: usize,
    /// Real (unpadded) tokens in the micro-batch.
    pub input_tokens: usize,
    /// The row of each target.
    pub target_rows: Vec<usize>,
    /// `verdict.correct` of each row.
    pub row_correct: Vec<Option<bool>>,
    /// The cached sparse teacher signal `[1, n, k]` of the targets (for [`LossSpec::KdCached`]).
    pub teacher: Option<TeacherSignal>,
    /// The teacher's log-probs `[1, n]` of the targets, from a server (for
    /// [`LossSpec::OnPolicyRewardScored`]).
    pub teacher_target_logprobs: Option<Tensor>,
}

impl MicroBatch {
    /// Lays out `examples`, padding with `pad_id`.
    pub fn new(examples: &[&Example], pad_id: u32, device: &Device) -> Result<Self> {
        let len = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(examples.len() * len);
        let mut positions = Vec::new();
        let mut targets = Vec::new();
        let mut input_tokens = 0;
        let mut target_rows = Vec::new();
        for (row, example) in examples.iter().enumerate() {
            input_tokens += example.ids.len();
            ids.extend_from_slice(&example.ids);
            ids.extend(std::iter::repeat_n(pad_id, len - example.ids.len()));
            // Position p predicts token p + 1; the first target is the first completion token.
            for p in example.prompt_len.saturating_sub(1)..example.ids.len().saturating_sub(1) {
                positions.push((row * len + p) as u32);
                targets.push(example.ids[p + 1]);
                target_rows.push(row);
            }
        }
        let tokens = targets.len();
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (examples.len(), len), device)?,
            positions: Tensor::from_vec(positions, tokens, device)?,
            targets: Tensor::from_vec(targets, (1, tokens), device)?,
            tokens,
            input_tokens,
            target_rows,
            row_correct: examples.iter().map(|e| e.correct).collect(),
            teacher: None,
            teacher_target_logprobs: None,
        })
    }
}

/// What the loss is.
#[derive(Debug, Clone, Copy)]
pub enum LossSpec<'a> {
    /// Cross-entropy on completion tokens.
    Sft,
    /// Token-level KD against a dense local teacher, mixed with SFT.
    Kd {
        /// The teacher (plain tensors; never trained).
        teacher: &'a CausalLm,
        /// The divergence.
        divergence: Divergence,
        /// Temperature dividing both logit sets.
        temperature: f64,
        /// `w` in `(1 - w) * sft + w * kd`.
        kd_weight: f64,
    },
    /// Token-level KD against the sparse top-k signal the micro-batch carries
    /// ([`MicroBatch::teacher`], from an offline cache), mixed with SFT.
    KdCached {
        /// The divergence.
        divergence: Divergence,
        /// Temperature dividing the student's logits (the signal is rescaled to it).
        temperature: f64,
        /// `w` in `(1 - w) * sft + w * kd`.
        kd_weight: f64,
    },
    /// On-policy distillation with the per-token reverse KL as a reward: on sequences the
    /// student sampled, `-sum_t sg(log p_teacher(x_t) - log p_student(x_t)) * log p_student(x_t)`
    /// (REINFORCE with discount 0). `kd_sum` reports `sum_t log p_student(x_t) - log
    /// p_teacher(x_t)`, the sampled estimate of the reverse KL.
    OnPolicyReward {
        /// The teacher that scores the sampled tokens.
        teacher: &'a CausalLm,
    },
    /// [`LossSpec::OnPolicyReward`] with the teacher's log-probs of the sampled tokens already
    /// in the micro-batch ([`MicroBatch::teacher_target_logprobs`], from a server).
    OnPolicyRewardScored,
    /// REDI: length-normalised log-likelihood of positive traces minus `negative_weight` times
    /// that of negative ones (every row needs a verdict). The normaliser is the number of
    /// sequences, not tokens.
    Redi {
        /// α: weight of the negative term (REDI's recommended 0.8).
        negative_weight: f64,
    },
}

/// One micro-batch's loss: the differentiable sum and its terms as numbers.
#[derive(Debug, Clone)]
pub struct LossTerms {
    /// Scalar: the sum over target tokens of the per-token loss (differentiable).
    pub sum: Tensor,
    /// What the sum is normalised by: target tokens (sequences for REDI).
    pub tokens: usize,
    /// Target tokens.
    pub target_tokens: usize,
    /// Sum of the per-token cross-entropy.
    pub sft_sum: f64,
    /// Sum of the per-token divergence (KD only).
    pub kd_sum: Option<f64>,
}

/// Final hidden states `[n, hidden]` at the micro-batch's target positions.
pub fn hidden_at_targets(model: &CausalLm, batch: &MicroBatch) -> Result<Tensor> {
    let hidden = model.forward_hidden(&batch.input_ids, None, None)?;
    let (b, t, h) = hidden.dims3()?;
    Ok(hidden
        .reshape((b * t, h))?
        .index_select(&batch.positions, 0)?)
}

/// Logits `[1, n, vocab]` at the micro-batch's target positions (all at once).
pub fn logits_at_targets(model: &CausalLm, batch: &MicroBatch) -> Result<Tensor> {
    let selected = hidden_at_targets(model, batch)?.unsqueeze(0)?;
    Ok(model.lm_head(&selected)?)
}

/// The loss of `student` on `batch` under `spec`, through the LM head in chunks of
/// [`head_chunk_rows`] positions (forward and backward; see [`loss_chunked`]).
pub fn loss(student: &CausalLm, batch: &MicroBatch, spec: &LossSpec<'_>) -> Result<LossTerms> {
    let rows = head_chunk_rows(student.config().vocab_size);
    loss_chunked(student, batch, spec, rows)
}

/// [`loss`] with `chunk_rows` positions per chunk of the LM head.
///
/// Neither the student's nor a dense teacher's `[n, vocab]` logits exist whole: each chunk of
/// positions is reduced to its terms and back-propagated to the selected hidden states and the
/// head weight on the spot ([`head_loss`]). A head with a LoRA adapter takes
/// [`loss_unchunked`].
pub fn loss_chunked(
    student: &CausalLm,
    batch: &MicroBatch,
    spec: &LossSpec<'_>,
    chunk_rows: usize,
) -> Result<LossTerms> {
    if batch.tokens == 0 {
        return LossTerms::empty(student.device());
    }
    if student.lm_head_weight().is_none() {
        return loss_unchunked(student, batch, spec);
    }
    let context = Context::new(student, batch, spec)?;
    let hidden = hidden_at_targets(student, batch)?;
    let (mut sft_sum, mut kd_sum) = (0.0, None);
    let sum = head_loss(
        student,
        &hidden,
        chunk_rows,
        |start, logits| -> Result<Tensor> {
            let terms = context.chunk(&logits.unsqueeze(0)?, start)?;
            sft_sum += terms.sft;
            if let Some(kd) = terms.kd {
                *kd_sum.get_or_insert(0.0) += kd;
            }
            Ok(terms.sum)
        },
    )?;
    Ok(context.terms(sum, sft_sum, kd_sum))
}

/// The value of every term of [`loss`], without a gradient (held-out evaluation), through the
/// LM head in chunks of positions. `sum` carries no graph.
pub fn loss_value(
    student: &CausalLm,
    batch: &MicroBatch,
    spec: &LossSpec<'_>,
) -> Result<LossTerms> {
    if batch.tokens == 0 {
        return LossTerms::empty(student.device());
    }
    let context = Context::new(student, batch, spec)?;
    let hidden = hidden_at_targets(student, batch)?.detach();
    let (mut sft_sum, mut kd_sum) = (0.0, None);
    let rows = head_chunk_rows(student.config().vocab_size);
    let total = head_loss_value(student, &hidden, rows, |start, logits| -> Result<Tensor> {
        let terms = context.chunk(&logits.unsqueeze(0)?, start)?;
        sft_sum += terms.sft;
        if let Some(kd) = terms.kd {
            *kd_sum.get_or_insert(0.0) += kd;
        }
        Ok(terms.sum)
    })?;
    let sum = Tensor::new(total as f32, student.device())?;
    Ok(context.terms(sum, sft_sum, kd_sum))
}

/// [`loss`] from the whole `[1, n, vocab]` logits at once, with the ordinary autograd graph (the
/// reference of the chunked path).
pub fn loss_unchunked(
    student: &CausalLm,
    batch: &MicroBatch,
    spec: &LossSpec<'_>,
) -> Result<LossTerms> {
    if batch.tokens == 0 {
        return LossTerms::empty(student.device());
    }
    let context = Context::new(student, batch, spec)?;
    let logits = logits_at_targets(student, batch)?;
    let terms = context.chunk(&logits, 0)?;
    Ok(context.terms(terms.sum, terms.sft, terms.kd))
}

impl LossTerms {
    fn empty(device: &Device) -> Result<Self> {
        Ok(Self {
            sum: Tensor::zeros((), DType::F32, device)?,
            tokens: 0,
            target_tokens: 0,
            sft_sum: 0.0,
            kd_sum: None,
        })
    }
}

/// One chunk's differentiable loss sum and its terms as numbers.
struct ChunkTerms {
    sum: Tensor,
    sft: f64,
    kd: Option<f64>,
}

/// What every chunk of one micro-batch's loss shares: the spec, the batch, the teacher's
/// hidden states at the targets (a local teacher) and REDI's per-token weights.
struct Context<'s, 'b> {
    spec: LossSpec<'s>,
    batch: &'b MicroBatch,
    /// `[n, hidden]`, detached.
    teacher_hidden: Option<Tensor>,
    /// `[1, n]`: REDI's signed, length-normalised weight of each target.
    redi_weights: Option<Tensor>,
    /// What the sum is normalised by.
    tokens: usize,
}

impl<'s, 'b> Context<'s, 'b> {
    fn new(student: &CausalLm, batch: &'b MicroBatch, spec: &LossSpec<'s>) -> Result<Self> {
        let mut context = Self {
            spec: *spec,
            batch,
            teacher_hidden: None,
            redi_weights: None,
            tokens: batch.tokens,
        };
        match *spec {
            LossSpec::Kd { teacher, .. } | LossSpec::OnPolicyReward { teacher } => {
                context.teacher_hidden = Some(hidden_at_targets(teacher, batch)?.detach());
            }
            LossSpec::KdCached { .. } if batch.teacher.is_none() => {
                return Err(crate::error::Error::Invalid(
                    "kd from a teacher cache: the micro-batch carries no cached signal".into(),
                ));
            }
            LossSpec::OnPolicyRewardScored if batch.teacher_target_logprobs.is_none() => {
                return Err(crate::error::Error::Invalid(
                    "on-policy with a served teacher: the micro-batch carries no teacher \
                     log-probs"
                        .into(),
                ));
            }
            LossSpec::Redi { negative_weight } => {
                let rows = batch.row_correct.len();
                let mut lengths = vec![0usize; rows];
                for &row in &batch.target_rows {
                    lengths[row] += 1;
                }
                let mut weights = Vec::with_capacity(batch.tokens);
                for &row in &batch.target_rows {
                    let sign = match batch.row_correct[row] {
                        Some(true) => 1.0,
                        Some(false) => -negative_weight,
                        None => {
                            return Err(crate::error::Error::Invalid(
                                "redi: every record needs `verdict.correct`".into(),
                            ));
                        }
                    };
                    weights.push((sign / lengths[row] as f64) as f32);
                }
                context.redi_weights = Some(Tensor::from_vec(
                    weights,
                    (1, batch.tokens),
                    student.device(),
                )?);
                context.tokens = lengths.iter().filter(|&&n| n > 0).count();
            }
            _ => {}
        }
        Ok(context)
    }

    fn terms(&self, sum: Tensor, sft_sum: f64, kd_sum: Option<f64>) -> LossTerms {
        LossTerms {
            sum,
            tokens: self.tokens,
            target_tokens: self.batch.tokens,
            sft_sum,
            kd_sum,
        }
    }

    /// The terms of targets `start..start + len` from the student's logits `[1, len, vocab]`.
    fn chunk(&self, logits: &Tensor, start: usize) -> Result<ChunkTerms> {
        let len = logits.dim(1)?;
        let batch = self.batch;
        let targets = batch.targets.narrow(1, start, len)?;
        let teacher_logits = |teacher: &CausalLm| -> Result<Tensor> {
            let hidden = self
                .teacher_hidden
                .as_ref()
                .expect("a local teacher's hidden states are computed in Context::new");
            Ok(teacher
                .lm_head(&hidden.narrow(0, start, len)?)?
                .detach()
                .unsqueeze(0)?)
        };
        match self.spec {
            LossSpec::Sft => {
                let sum = gather_logprobs(logits, &targets)?.neg()?.sum_all()?;
                let sft = scalar(&sum)?;
                Ok(ChunkTerms { sum, sft, kd: None })
            }
            LossSpec::Kd {
                teacher,
                divergence,
                temperature,
                kd_weight,
            } => {
                let teacher_logits = teacher_logits(teacher)?;
                // Padded vocabularies: the first min(V) logits (ids past the tokenizer never occur).
                let (tv, sv) = (teacher_logits.dim(2)?, logits.dim(2)?);
                let shared = tv.min(sv);
                let teacher_logits = if tv > shared {
                    teacher_logits.narrow(2, 0, shared)?
                } else {
                    teacher_logits
                };
                let logits = if sv > shared {
                    logits.narrow(2, 0, shared)?
                } else {
                    logits.clone()
                };
                let signal = TeacherSignal::dense(teacher_logits);
                kd_terms(
                    &logits,
                    &targets,
                    &signal,
                    divergence,
                    temperature,
                    kd_weight,
                )
            }
            LossSpec::KdCached {
                divergence,
                temperature,
                kd_weight,
            } => {
                let signal = batch.teacher.as_ref().ok_or_else(|| {
                    crate::error::Error::Invalid(
                        "kd from a teacher cache: the micro-batch carries no cached signal".into(),
                    )
                })?;
                let signal = narrow_signal(signal, start, len)?;
                kd_terms(
                    logits,
                    &targets,
                    &signal,
                    divergence,
                    temperature,
                    kd_weight,
                )
            }
            LossSpec::OnPolicyReward { .. } | LossSpec::OnPolicyRewardScored => {
                let student_logprobs = gather_logprobs(logits, &targets)?;
                let teacher_logprobs = match self.spec {
                    LossSpec::OnPolicyReward { teacher } => {
                        gather_logprobs(&teacher_logits(teacher)?, &targets)?
                    }
                    _ => batch
                        .teacher_target_logprobs
                        .as_ref()
                        .ok_or_else(|| {
                            crate::error::Error::Invalid(
                                "on-policy with a served teacher: the micro-batch carries no \
                                 teacher log-probs"
                                    .into(),
                            )
                        })?
                        .narrow(1, start, len)?
                        .to_dtype(student_logprobs.dtype())?
                        .detach(),
                };
                let (per_token, reverse_kl) =
                    reverse_kl_reward(&student_logprobs, &teacher_logprobs)?;
                Ok(ChunkTerms {
                    sum: per_token.sum_all()?,
                    sft: -scalar(&student_logprobs)?,
                    kd: Some(scalar(&reverse_kl)?),
                })
            }
            LossSpec::Redi { .. } => {
                let weights = self
                    .redi_weights
                    .as_ref()
                    .expect("REDI weights are computed in Context::new")
                    .narrow(1, start, len)?;
                let logprobs = gather_logprobs(logits, &targets)?;
                let sum = logprobs.mul(&weights)?.sum_all()?.neg()?;
                Ok(ChunkTerms {
                    sum,
                    sft: -scalar(&logprobs)?,
                    kd: None,
                })
            }
        }
    }
}

/// The sum of a tensor as `f64`.
fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Positions `start..start + len` of a `[1, n, ·]` teacher signal.
fn narrow_signal(signal: &TeacherSignal, start: usize, len: usize) -> Result<TeacherSignal> {
    Ok(match signal {
        TeacherSignal::Dense { logits } => TeacherSignal::dense(logits.narrow(1, start, len)?),
        TeacherSignal::Sparse {
            indices,
            logprobs,
            temperature,
            missing_mass,
        } => TeacherSignal::Sparse {
            indices: indices.narrow(1, start, len)?,
            logprobs: logprobs.narrow(1, start, len)?,
            temperature: *temperature,
            missing_mass: *missing_mass,
        },
    })
}

/// The per-token policy-gradient loss of the reverse-KL reward and the per-token reverse KL
/// estimate, from the log-probs of the sampled tokens under the student (differentiable) and
/// the teacher: `advantage = sg(log p_teacher - log p_student)`, `loss = -advantage * log
/// p_student`, `reverse_kl = -advantage`.
///
/// In expectation over tokens drawn from the student, the loss's gradient is that of
/// `KL(student ‖ teacher)` (the score-function identity; tested below by exact enumeration).
pub fn reverse_kl_reward(
    student_logprobs: &Tensor,
    teacher_logprobs: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let advantage = (teacher_logprobs - student_logprobs.detach())?.detach();
    let loss = advantage.mul(student_logprobs)?.neg()?;
    Ok((loss, advantage.neg()?))
}

/// `(1 - w) * sft + w * divergence(signal, student)` summed over the targets `[1, n]`.
fn kd_terms(
    logits: &Tensor,
    targets: &Tensor,
    signal: &TeacherSignal,
    divergence: Divergence,
    temperature: f64,
    kd_weight: f64,
) -> Result<ChunkTerms> {
    let kd = per_token(logits, signal, divergence, temperature)?;
    let kd_sum = scalar(&kd)?;
    let (sum, sft_sum) = if kd_weight >= 1.0 {
        // The SFT term has no weight: report it without keeping a graph for it.
        let sft = gather_logprobs(&logits.detach(), targets)?.neg()?;
        (kd.sum_all()?, scalar(&sft)?)
    } else {
        let sft = gather_logprobs(logits, targets)?.neg()?;
        let sft_sum = scalar(&sft)?;
        let mixed = (sft.affine(1.0 - kd_weight, 0.0)? + kd.affine(kd_weight, 0.0)?)?;
        (mixed.sum_all()?, sft_sum)
    };
    Ok(ChunkTerms {
        sum,
        sft: sft_sum,
        kd: Some(kd_sum),
    })
}

/// What the student's samples of one on-policy step looked like (DESIGN.md §5 diagnostics).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct SampleStats {
    /// Samples drawn.
    pub samples: usize,
    /// Mean new tokens per sample.
    pub mean_length: f64,
    /// Fraction cut at `max-new-tokens`.
    pub truncation_rate: f64,
    /// Fraction that ended with an EOS token.
    pub eos_rate: f64,
}

/// The student's own completions for the prompts of `examples` (GKD's on-policy sequences).
///
/// Row `i` samples with seed `seeds[i]`, so the samples are a pure function of the weights, the
/// prompts and the seeds (resume-exact). Empty samples are left out.
pub fn sample_completions(
    student: &retort_model::LoadedModel,
    examples: &[&Example],
    seeds: &[u64],
    max_new_tokens: usize,
    temperature: f64,
) -> Result<(Vec<Example>, SampleStats)> {
    let prompts: Vec<Vec<u32>> = examples
        .iter()
        .map(|e| e.ids[..e.prompt_len].to_vec())
        .collect();
    let eos_ids = student.eos_ids();
    let params = retort_model::GenerationParams {
        max_new_tokens,
        temperature,
        eos_ids: eos_ids.clone(),
        ..Default::default()
    };
    let generated = retort_model::generate::generate_with_seeds(
        &student.model,
        &student.tokenizer,
        &prompts,
        seeds,
        &params,
    )?;
    let mut out = Vec::with_capacity(examples.len());
    let mut stats = SampleStats {
        samples: generated.len(),
        ..SampleStats::default()
    };
    let (mut total, mut truncated, mut eos) = (0usize, 0usize, 0usize);
    for (example, sample) in examples.iter().zip(generated) {
        total += sample.token_ids.len();
        if sample.finish_reason == retort_model::FinishReason::Length {
            truncated += 1;
        }
        if sample
            .token_ids
            .last()
            .is_some_and(|id| eos_ids.contains(id))
        {
            eos += 1;
        }
        if sample.token_ids.is_empty() {
            continue;
        }
        let mut ids = example.ids[..example.prompt_len].to_vec();
        ids.extend_from_slice(&sample.token_ids);
        out.push(Example {
            ids,
            prompt_len: example.prompt_len,
            line: example.line,
            key: example.key.clone(),
            correct: None,
        });
    }
    let n = stats.samples.max(1) as f64;
    stats.mean_length = total as f64 / n;
    stats.truncation_rate = truncated as f64 / n;
    stats.eos_rate = eos as f64 / n;
    Ok((out, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Enumerating every token with its student probability as weight turns the sampled
    /// reward loss into its expectation, whose gradient must equal that of the exact reverse KL.
    #[test]
    fn reverse_kl_reward_is_an_unbiased_reverse_kl_gradient() -> Result<()> {
        let device = Device::Cpu;
        let student =
            candle_core::Var::from_vec(vec![0.3f64, -1.2, 2.0, 0.1, -0.4, 1.1], (1, 6), &device)?;
        let teacher = Tensor::new(&[[1.5f64, 0.2, -0.7, 0.9, 0.0, -2.0]], &device)?;
        let log_p = retort_model::train::log_softmax(student.as_tensor())?;
        let log_q = retort_model::train::log_softmax(&teacher)?;
        let (per_token, reverse_kl) = reverse_kl_reward(&log_p, &log_q)?;
        let weights = log_p.exp()?.detach();
        let expected_loss = per_token.mul(&weights)?.sum_all()?;
        let exact_kl = (log_p.exp()? * (&log_p - &log_q)?)?.sum_all()?;
        let g_reward = expected_loss.backward()?;
        let g_exact = exact_kl.backward()?;
        let (a, b) = (
            g_reward
                .get(student.as_tensor())
                .expect("a gradient")
                .flatten_all()?
                .to_vec1::<f64>()?,
            g_exact
                .get(student.as_tensor())
                .expect("a gradient")
                .flatten_all()?
                .to_vec1::<f64>()?,
        );
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        println!("reward vs exact reverse-KL gradient: max_abs_diff {diff:.3e}");
        assert!(diff < 1e-12, "{a:?} vs {b:?}");
        let estimate = reverse_kl.mul(&weights)?.sum_all()?.to_scalar::<f64>()?;
        assert!((estimate - exact_kl.to_scalar::<f64>()?).abs() < 1e-12);
        Ok(())
    }

    /// A tiny Qwen2 with random weights (std 0.4, so the logits and gradients are far from 0).
    fn tiny(vocab: usize, tied: bool, seed: u64) -> Result<(candle_nn::VarMap, CausalLm)> {
        let shape = crate::bench::BenchConfig {
            name: "objective-test",
            hidden: 16,
            layers: 2,
            heads: 2,
            kv_heads: 1,
            intermediate: 24,
            vocab,
            seq: 8,
            batch: 2,
        };
        let mut cfg = shape.model_config(vocab)?;
        cfg.tie_word_embeddings = tied;
        let varmap = candle_nn::VarMap::new();
        let model = CausalLm::new(
            &cfg,
            candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        )?;
        let (source, _) = crate::bench::random_model(&shape.model_config(vocab)?, seed)?;
        let source: std::collections::HashMap<String, Tensor> =
            retort_model::train::named_vars(&source)
                .into_iter()
                .map(|(name, var)| (name, var.as_detached_tensor()))
                .collect();
        for (name, var) in retort_model::train::named_vars(&varmap) {
            let value = &source[&name];
            let value = if var.rank() >= 2 {
                value.affine(20.0, 0.0)?
            } else {
                value.clone()
            };
            var.set(&value)?;
        }
        Ok((varmap, model))
    }

    fn examples() -> Vec<Example> {
        let example = |ids: Vec<u32>, prompt_len, correct| Example {
            ids,
            prompt_len,
            line: 1,
            key: "k".into(),
            correct,
        };
        vec![
            example(vec![3, 17, 5, 9, 22, 40, 1, 8], 3, Some(true)),
            example(vec![7, 2, 31, 11, 6], 1, Some(false)),
            example(vec![12, 19, 4, 25], 2, Some(true)),
        ]
    }

    /// Loss value, terms and every parameter's gradient of `loss_chunked` against
    /// `loss_unchunked`: relative max difference.
    fn compare(
        varmap: &candle_nn::VarMap,
        student: &CausalLm,
        batch: &MicroBatch,
        spec: &LossSpec<'_>,
        chunk_rows: usize,
    ) -> Result<f64> {
        let reference = loss_unchunked(student, batch, spec)?;
        let chunked = loss_chunked(student, batch, spec, chunk_rows)?;
        let value = |t: &Tensor| -> f64 { scalar(t).expect("a scalar") };
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * (1.0 + b.abs());
        assert!(
            close(value(&chunked.sum), value(&reference.sum)),
            "sum {} vs {}",
            value(&chunked.sum),
            value(&reference.sum)
        );
        assert!(close(chunked.sft_sum, reference.sft_sum));
        assert_eq!(chunked.kd_sum.is_some(), reference.kd_sum.is_some());
        if let (Some(a), Some(b)) = (chunked.kd_sum, reference.kd_sum) {
            assert!(close(a, b), "kd {a} vs {b}");
        }
        assert_eq!(
            (chunked.tokens, chunked.target_tokens),
            (reference.tokens, reference.target_tokens)
        );
        let want = reference.sum.backward()?;
        let got = chunked.sum.backward()?;
        let mut worst = 0f64;
        for (name, var) in retort_model::train::named_vars(varmap) {
            let flat = |store: &candle_core::backprop::GradStore| -> Vec<f64> {
                store
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("no gradient for {name}"))
                    .flatten_all()
                    .and_then(|t| t.to_dtype(DType::F64))
                    .and_then(|t| t.to_vec1::<f64>())
                    .expect("a gradient")
            };
            let (a, b) = (flat(&got), flat(&want));
            let scale = b.iter().fold(0f64, |m, x| m.max(x.abs()));
            assert!(scale > 0.0, "{name}: zero reference gradient");
            let diff = a
                .iter()
                .zip(&b)
                .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                diff <= 1e-4 * scale,
                "{name}: max diff {diff:.3e}, scale {scale:.3e}"
            );
            worst = worst.max(diff / scale);
        }
        Ok(worst)
    }

    /// Every objective, through the LM head in chunks of 3 positions (11 targets: chunks of 3,
    /// 3, 3 and 2), equals the whole-logits loss in value, terms and every parameter's gradient,
    /// untied and tied heads alike.
    #[test]
    fn chunked_loss_equals_unchunked_for_every_objective() -> Result<()> {
        let examples = examples();
        let refs: Vec<&Example> = examples.iter().collect();
        for tied in [false, true] {
            let (varmap, student) = tiny(48, tied, 1)?;
            // A padded teacher vocabulary: 56 rows, of which the first 48 are shared.
            let (_, teacher) = tiny(56, false, 2)?;
            let mut batch = MicroBatch::new(&refs, 0, &Device::Cpu)?;
            assert_eq!(batch.tokens, 11);
            let teacher_logits = logits_at_targets(&teacher, &batch)?
                .narrow(2, 0, 48)?
                .detach();
            batch.teacher = Some(crate::distill::divergence::tests::top_k(
                &teacher_logits,
                6,
                crate::distill::teacher::MissingMass::Tail,
            ));
            batch.teacher_target_logprobs = Some(
                gather_logprobs(&teacher_logits, &batch.targets)?
                    .affine(1.0, -0.1)?
                    .detach(),
            );
            let specs = [
                LossSpec::Sft,
                LossSpec::Kd {
                    teacher: &teacher,
                    divergence: Divergence::ForwardKl,
                    temperature: 2.0,
                    kd_weight: 0.5,
                },
                LossSpec::Kd {
                    teacher: &teacher,
                    divergence: Divergence::Jsd { beta: 0.3 },
                    temperature: 1.0,
                    kd_weight: 1.0,
                },
                LossSpec::KdCached {
                    divergence: Divergence::ReverseKl,
                    temperature: 1.5,
                    kd_weight: 0.7,
                },
                LossSpec::OnPolicyReward { teacher: &teacher },
                LossSpec::OnPolicyRewardScored,
                LossSpec::Redi {
                    negative_weight: 0.8,
                },
            ];
            let names = [
                "sft",
                "kd fkl",
                "kd jsd",
                "kd cached",
                "on-policy",
                "on-policy scored",
                "redi",
            ];
            for (name, spec) in names.iter().zip(&specs) {
                let worst = compare(&varmap, &student, &batch, spec, 3)?;
                println!("tied {tied}, {name}: worst relative gradient diff {worst:.2e}");
            }
        }
        Ok(())
    }

    /// The held-out value equals the training loss's value.
    #[test]
    fn loss_value_equals_loss() -> Result<()> {
        let examples = examples();
        let refs: Vec<&Example> = examples.iter().collect();
        let (_, student) = tiny(48, false, 3)?;
        let batch = MicroBatch::new(&refs, 0, &Device::Cpu)?;
        let spec = LossSpec::Redi {
            negative_weight: 0.8,
        };
        let (a, b) = (
            loss(&student, &batch, &spec)?,
            loss_value(&student, &batch, &spec)?,
        );
        assert!((scalar(&a.sum)? - scalar(&b.sum)?).abs() < 1e-4);
        assert!(!b.sum.track_op());
        assert_eq!(a.tokens, b.tokens);
        assert!((a.sft_sum - b.sft_sum).abs() < 1e-4);
        Ok(())
    }

    #[test]
    fn targets_are_the_completion_tokens() -> Result<()> {
        let a = Example {
            ids: vec![1, 2, 3, 4],
            prompt_len: 2,
            line: 1,
            key: "a".into(),
            correct: None,
        };
        let b = Example {
            ids: vec![5, 6, 7],
            prompt_len: 1,
            line: 2,
            key: "b".into(),
            correct: None,
        };
        let batch = MicroBatch::new(&[&a, &b], 0, &Device::Cpu)?;
        assert_eq!(
            batch.input_ids.to_vec2::<u32>()?,
            vec![vec![1, 2, 3, 4], vec![5, 6, 7, 0]]
        );
        // Row 0 predicts 3 (from p=1) and 4 (p=2); row 1 predicts 6 (p=0) and 7 (p=1).
        assert_eq!(batch.positions.to_vec1::<u32>()?, vec![1, 2, 4, 5]);
        assert_eq!(batch.targets.to_vec2::<u32>()?, vec![vec![3, 4, 6, 7]]);
        assert_eq!((batch.tokens, batch.input_tokens), (4, 7));
        Ok(())
    }
}
