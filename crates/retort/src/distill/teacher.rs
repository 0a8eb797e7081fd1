//! The teacher signal: what a teacher hands the student, as one typed value (DESIGN.md §2).
//!
//! [`TeacherSignal::Dense`] carries the teacher's full logits (a local white-box teacher);
//! [`TeacherSignal::Sparse`] carries top-k log-probs (a server or an offline cache) together with
//! the temperature they were computed at and an explicit [`MissingMass`] policy for the
//! probability outside the top-k set. The KD divergences in [`super::divergence`] consume it.
//! Text-only (API) teachers give no distribution and are handled as SFT targets elsewhere.
//! [`load_teacher`] loads a local teacher and checks it against the student; [`open_live_teacher`]
//! opens a live teacher as a [`LiveTeacher`]: a local model (dense logits) or a server
//! ([`RemoteTeacher`]: top-k log-probs per micro-batch through the scoring seam, as a
//! [`TeacherSignal::Sparse`], and the log-probs of sampled tokens for the on-policy reward).
//!
//! Padded vocabularies (one tokenizer, more embedding rows in one model, e.g. Qwen2.5-7B's
//! 152,064 vs 1.5B's 151,936) are accepted when the tokenizers agree: KD and on-policy use the
//! first `min(V)` logits (ids past the tokenizer never occur in text), which is said once.

use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};

/// What to do with the teacher's probability mass outside its top-k set.
///
/// The default is [`MissingMass::Tail`]: it compares the two distributions coarse-grained to the
/// k teacher tokens plus one "everything else" bucket. That is a faithful (k+1)-outcome view of
/// both distributions, so every divergence here is a lower bound of its dense value (data
/// processing inequality) and equals it once the student's tail matches the teacher's, and it
/// penalises the student for mass it puts outside the teacher's set. [`MissingMass::Renormalize`]
/// hides that mass: a student with 90% of its mass outside the set but the right shape inside it
/// gets zero loss. With k = vocabulary both policies equal the dense divergence.
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MissingMass {
    /// Restrict both distributions to the teacher's top-k set and renormalise each to sum to 1
    /// there (DistillKit-style sparse KD). The student's mass outside the set is not penalised.
    Renormalize,
    /// Keep a (k+1)-th bucket: the teacher's holds `1 - sum(top-k probs)` (clamped at 0; values
    /// within rounding of 0 count as 0), the student's holds its exact mass outside the set.
    /// Buckets with zero mass are floored at [`TAIL_FLOOR`] so logs stay finite.
    #[default]
    Tail,
}

/// Smallest probability given to an empty tail bucket, so log-probs stay finite (no `0 * log 0`).
pub const TAIL_FLOOR: f64 = 1e-30;

/// A teacher's output for a batch of sequences, aligned with the student's positions.
///
/// Positions are `[batch, time]`; the teacher never receives a gradient (it is detached).
#[derive(Debug, Clone)]
pub enum TeacherSignal {
    /// Full raw logits `[batch, time, vocab]` (temperature 1, i.e. as the model outputs them).
    /// The vocabulary must equal the student's.
    Dense {
        /// Raw teacher logits `[b, t, v]`, any float dtype.
        logits: Tensor,
    },
    /// Top-k log-probs `[batch, time, k]`, as a server (vLLM `logprobs`) or an offline cache
    /// gives them.
    Sparse {
        /// Token ids `[b, t, k]`, `u32`, distinct within a position, each `< vocab`.
        indices: Tensor,
        /// Log-probs `[b, t, k]` of those ids under the teacher's full distribution at
        /// `temperature`.
        logprobs: Tensor,
        /// The temperature the log-probs were computed at (1.0 for raw log-probs). KD at a
        /// temperature `T` rescales them by `temperature / T` before renormalising.
        temperature: f64,
        /// How the mass outside the top-k set is handled.
        missing_mass: MissingMass,
    },
}

impl TeacherSignal {
    /// A dense signal from raw logits `[b, t, v]`.
    pub fn dense(logits: Tensor) -> Self {
        Self::Dense { logits }
    }

    /// A sparse signal from top-k ids and log-probs at temperature 1, with the default
    /// [`MissingMass`] policy.
    pub fn sparse(indices: Tensor, logprobs: Tensor) -> Self {
        Self::Sparse {
            indices,
            logprobs,
            temperature: 1.0,
            missing_mass: MissingMass::default(),
        }
    }

    /// The temperature the signal was computed at (dense logits are raw: 1.0).
    pub fn temperature(&self) -> f64 {
        match self {
            Self::Dense { .. } => 1.0,
            Self::Sparse { temperature, .. } => *temperature,
        }
    }

    /// The `[batch, time]` positions the signal covers.
    pub fn positions(&self) -> Result<(usize, usize)> {
        let tensor = match self {
            Self::Dense { logits } => logits,
            Self::Sparse { logprobs, .. } => logprobs,
        };
        let (b, t, _) = tensor.dims3()?;
        Ok((b, t))
    }

    /// Checks shapes and dtypes against a student vocabulary of `vocab` tokens and a
    /// `[batch, time]` layout; returns a message naming the field that is wrong.
    pub fn validate(&self, batch: usize, time: usize, vocab: usize) -> Result<()> {
        match self {
            Self::Dense { logits } => {
                let dims = logits.dims();
                if dims != [batch, time, vocab] {
                    candle_core::bail!(
                        "teacher signal: field `logits`: expected shape [{batch}, {time}, {vocab}] \
                         (the student's), got {dims:?}"
                    );
                }
                if !logits.dtype().is_float() {
                    candle_core::bail!(
                        "teacher signal: field `logits`: expected a float dtype, got {:?}",
                        logits.dtype()
                    );
                }
            }
            Self::Sparse {
                indices,
                logprobs,
                temperature,
                ..
            } => {
                let (ib, it, k) = indices.dims3().map_err(|e| {
                    candle_core::Error::Msg(format!(
                        "teacher signal: field `indices`: expected [b, t, k]: {e}"
                    ))
                })?;
                if (ib, it) != (batch, time) || logprobs.dims() != indices.dims() {
                    candle_core::bail!(
                        "teacher signal: fields `indices` {:?} and `logprobs` {:?}: expected both \
                         [{batch}, {time}, k]",
                        indices.dims(),
                        logprobs.dims()
                    );
                }
                if k == 0 || k > vocab {
                    candle_core::bail!(
                        "teacher signal: field `indices`: expected 1 <= k <= vocab ({vocab}), got k = {k}"
                    );
                }
                if indices.dtype() != DType::U32 {
                    candle_core::bail!(
                        "teacher signal: field `indices`: expected dtype u32, got {:?}",
                        indices.dtype()
                    );
                }
                if !logprobs.dtype().is_float() {
                    candle_core::bail!(
                        "teacher signal: field `logprobs`: expected a float dtype, got {:?}",
                        logprobs.dtype()
                    );
                }
                if !(temperature.is_finite() && *temperature > 0.0) {
                    candle_core::bail!(
                        "teacher signal: field `temperature`: expected a positive number, got {temperature}"
                    );
                }
                // One pass over the ids on the host: k is small (tens), so this costs far less
                // than the loss itself and catches misaligned caches before they train anything.
                let ids = indices.flatten_all()?.to_vec1::<u32>()?;
                let mut row = Vec::with_capacity(k);
                for (position, chunk) in ids.chunks(k).enumerate() {
                    row.clear();
                    row.extend_from_slice(chunk);
                    row.sort_unstable();
                    if let Some(&max) = row.last()
                        && max as usize >= vocab
                    {
                        candle_core::bail!(
                            "teacher signal: field `indices`: id {max} at position {position} is \
                             outside the student's vocabulary of {vocab}"
                        );
                    }
                    if let Some(pair) = row.windows(2).find(|pair| pair[0] == pair[1]) {
                        candle_core::bail!(
                            "teacher signal: field `indices`: id {} appears twice at position \
                             {position}; top-k ids must be distinct",
                            pair[0]
                        );
                    }
                }
            }
        }
        Ok(())
    }
}

/// Loads the teacher `spec` and checks that it shares the student's vocabulary and tokenizer
/// (a padded vocabulary of the same tokenizer is accepted; see the module docs).
///
/// The teacher goes on the student's device, in `precision` (the teacher only runs forward: with
/// autocast training that is the autocast dtype, see [`teacher_precision`]).
pub fn load_teacher(
    spec: &crate::ModelSpec,
    student: &retort_model::LoadedModel,
    precision: crate::compute::Precision,
) -> crate::Result<retort_model::LoadedModel> {
    let dir = spec.local_dir()?;
    let options = retort_model::LoadOptions {
        device: student.model.device().clone(),
        dtype: precision.dtype(),
        hf_cache: None,
    };
    let teacher = retort_model::load(&dir.to_string_lossy(), &options)?;
    check_shared_vocabulary(spec, &teacher.tokenizer, teacher.config.vocab_size, student)?;
    Ok(teacher)
}

/// Checks that a teacher with `tokenizer` and `rows` output rows can teach `student` token by
/// token: the same tokenizer (same token for every id both define, same ids for sample text);
/// differing row counts are a padded vocabulary, said once.
fn check_shared_vocabulary(
    spec: &crate::ModelSpec,
    tokenizer: &retort_model::tokenizer::Tokenizer,
    rows: usize,
    student: &retort_model::LoadedModel,
) -> crate::Result<()> {
    use crate::Error;
    let hint = |what: String| {
        Error::Invalid(format!(
            "teacher `{spec}` and student `{}` {what}; token-level KD needs a shared \
             vocabulary\nhint: run `retort check --teacher {spec} --student {}` to compare them",
            student.dir.display(),
            student.dir.display()
        ))
    };
    let (tv, sv) = (rows, student.config.vocab_size);
    let shared = tokenizer.vocab_size().min(student.tokenizer.vocab_size()) as u32;
    if let Some(id) =
        (0..shared).find(|&id| tokenizer.id_to_token(id) != student.tokenizer.id_to_token(id))
    {
        return Err(hint(format!(
            "map token id {id} to different tokens ({:?} vs {:?})",
            tokenizer.id_to_token(id),
            student.tokenizer.id_to_token(id)
        )));
    }
    let sample = "Distillation check: 12 + 30 = 42.\nThe answer is \\boxed{42}.";
    if tokenizer.encode(sample, false)? != student.tokenizer.encode(sample, false)? {
        return Err(hint("tokenise the same text differently".into()));
    }
    if tv != sv {
        tracing::warn!(
            "teacher `{spec}` has {tv} output rows and student `{}` {sv} (a padded vocabulary of \
             one tokenizer): KD and on-policy use the first {} logits",
            student.dir.display(),
            tv.min(sv)
        );
    }
    Ok(())
}

/// A teacher run alongside the student.
pub enum LiveTeacher {
    /// A local model: dense logits.
    Local(Box<retort_model::LoadedModel>),
    /// A server: top-k log-probs through the scoring seam.
    Remote(RemoteTeacher),
}

/// The precision of a local teacher next to a student trained under `compute`: the autocast
/// dtype when there is one, else the inference default of the device.
pub fn teacher_precision(compute: crate::compute::Compute) -> crate::compute::Precision {
    use crate::compute::Precision;
    match compute.autocast() {
        Some(candle_core::DType::BF16) => Precision::Bf16,
        Some(candle_core::DType::F16) => Precision::F16,
        Some(_) => Precision::F32,
        None if compute.device.is_cpu() => Precision::F32,
        None => compute.precision,
    }
}

/// Opens the live teacher `spec` for `student`: a local model (on the student's device, in
/// `precision`), or a server scored with the student's tokenizer unless the served name is a
/// folder or cached `hf:` model of its own.
pub fn open_live_teacher(
    spec: &crate::ModelSpec,
    student: &retort_model::LoadedModel,
    top_k: usize,
    missing_mass: MissingMass,
    precision: crate::compute::Precision,
) -> crate::Result<LiveTeacher> {
    let Some(server) = spec.server() else {
        return Ok(LiveTeacher::Local(Box::new(load_teacher(
            spec, student, precision,
        )?)));
    };
    let dir = crate::backend::scorer::server_tokenizer_dir(spec, Some(&student.dir))?;
    let scorer = crate::backend::openai::score::RemoteScorer::connect(
        server,
        &dir,
        crate::backend::openai::score::ScoreProtocol::Auto,
        &crate::backend::open::BackendOptions::default(),
    )?;
    let rows = crate::backend::scorer::TokenScorer::vocab_rows(&scorer)
        .unwrap_or(student.config.vocab_size);
    check_shared_vocabulary(
        spec,
        crate::backend::scorer::TokenScorer::tokenizer(&scorer),
        rows,
        student,
    )?;
    RemoteTeacher::new(
        Box::new(scorer),
        student.config.vocab_size,
        top_k,
        missing_mass,
    )
    .map(LiveTeacher::Remote)
}

/// A teacher behind a server: per micro-batch, the top-k log-probs of every target position
/// ([`Self::signal`]) or the log-probs of the target tokens ([`Self::target_logprobs`]).
pub struct RemoteTeacher {
    scorer: Box<dyn crate::backend::scorer::TokenScorer>,
    /// The student's output rows: teacher ids at or past it are dropped (padded vocabularies).
    vocab: usize,
    top_k: usize,
    missing_mass: MissingMass,
    said_padding: std::sync::atomic::AtomicBool,
}

/// Log-prob given to filler ids when a position has fewer than k usable alternatives (its
/// probability, e^-1e4, is zero in f32 and keeps every log finite).
const FILLER_LOGPROB: f32 = -1e4;

impl RemoteTeacher {
    /// Wraps a scorer; `vocab` is the student's number of output rows.
    pub fn new(
        scorer: Box<dyn crate::backend::scorer::TokenScorer>,
        vocab: usize,
        top_k: usize,
        missing_mass: MissingMass,
    ) -> crate::Result<Self> {
        if top_k == 0 || top_k > vocab {
            return Err(crate::Error::Invalid(format!(
                "field `teacher-top-k`: must lie in 1..={vocab} (the vocabulary), got {top_k}"
            )));
        }
        Ok(Self {
            scorer,
            vocab,
            top_k,
            missing_mass,
            said_padding: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The scorer (for names in manifests).
    pub fn scorer(&self) -> &dyn crate::backend::scorer::TokenScorer {
        self.scorer.as_ref()
    }

    fn score(
        &self,
        examples: &[&crate::distill::data::Example],
        wants: crate::backend::scorer::ScoreWants,
    ) -> crate::Result<Vec<crate::backend::scorer::SequenceScores>> {
        // The targets of an example are ids[max(prompt_len, 1)..] (see `MicroBatch::new`).
        let requests: Vec<crate::backend::scorer::ScoreRequest> = examples
            .iter()
            .map(|e| {
                let split = e.prompt_len.max(1).min(e.ids.len());
                crate::backend::scorer::ScoreRequest {
                    label: format!("example `{}` (line {})", e.key, e.line),
                    prompt_ids: e.ids[..split].to_vec(),
                    completion_ids: e.ids[split..].to_vec(),
                }
            })
            .collect();
        self.scorer.score_ids(&requests, wants)
    }

    /// The sparse signal `[1, n, k]` of the micro-batch's target positions (row order, as
    /// [`crate::distill::objective::MicroBatch`] lays them out).
    pub fn signal(
        &self,
        examples: &[&crate::distill::data::Example],
        device: &candle_core::Device,
    ) -> crate::Result<TeacherSignal> {
        let k = self.top_k;
        let scores = self.score(
            examples,
            crate::backend::scorer::ScoreWants {
                top_k: k,
                ranks: false,
            },
        )?;
        let mut indices = Vec::new();
        let mut logprobs = Vec::new();
        let mut dropped = 0usize;
        for scored in &scores {
            for top in &scored.top {
                let kept: Vec<(u32, f32)> = top
                    .iter()
                    .copied()
                    .filter(|(id, _)| (*id as usize) < self.vocab)
                    .take(k)
                    .collect();
                dropped += top
                    .iter()
                    .take(k)
                    .filter(|(id, _)| *id as usize >= self.vocab)
                    .count();
                let mut used: Vec<u32> = kept.iter().map(|t| t.0).collect();
                indices.extend(kept.iter().map(|t| t.0));
                logprobs.extend(kept.iter().map(|t| t.1));
                // Too few usable alternatives: fill with unused ids of zero probability.
                let mut filler = 0u32;
                for _ in kept.len()..k {
                    while used.contains(&filler) {
                        filler += 1;
                    }
                    used.push(filler);
                    indices.push(filler);
                    logprobs.push(FILLER_LOGPROB);
                }
            }
        }
        if dropped > 0
            && !self
                .said_padding
                .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(
                "teacher `{}` proposed ids past the student's {} output rows (a padded \
                 vocabulary); they are left to the missing mass",
                self.scorer.name(),
                self.vocab
            );
        }
        let n = logprobs.len() / k;
        Ok(TeacherSignal::Sparse {
            indices: Tensor::from_vec(indices, (1, n, k), device)?,
            logprobs: Tensor::from_vec(logprobs, (1, n, k), device)?,
            temperature: 1.0,
            missing_mass: self.missing_mass,
        })
    }

    /// The teacher's log-probs `[1, n]` (f32) of the micro-batch's target tokens: all the
    /// reverse-KL reward needs.
    pub fn target_logprobs(
        &self,
        examples: &[&crate::distill::data::Example],
        device: &candle_core::Device,
    ) -> crate::Result<Tensor> {
        let scores = self.score(examples, crate::backend::scorer::ScoreWants::default())?;
        let values: Vec<f32> = scores.into_iter().flat_map(|s| s.logprobs).collect();
        let n = values.len();
        Ok(Tensor::from_vec(values, (1, n), device)?)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use super::{MissingMass, TeacherSignal};
    use crate::distill::divergence::tests::{
        Rng, all_divergences, full_top_k, max_abs_diff, top_k, values,
    };
    use crate::distill::divergence::{Divergence, per_token, per_token_chunked};

    #[test]
    fn sparse_with_k_equal_to_vocabulary_equals_dense() {
        let mut rng = Rng(4);
        let student = rng.tensor((2, 3, 10), 3.0);
        let teacher = rng.tensor((2, 3, 10), 3.0);
        let dense = TeacherSignal::dense(teacher.clone());
        let mut overall = 0.0f64;
        for policy in [MissingMass::Tail, MissingMass::Renormalize] {
            for (signal_temperature, temperature) in
                [(1.0, 1.0), (1.0, 2.0), (2.0, 2.0), (1.0, 0.7)]
            {
                let sparse = full_top_k(&teacher, signal_temperature, policy);
                for divergence in all_divergences() {
                    let expect = |signal: &TeacherSignal| {
                        let leaf = Var::from_tensor(&student).unwrap();
                        let per_token =
                            per_token_chunked(leaf.as_tensor(), signal, divergence, temperature, 4)
                                .unwrap();
                        let gradient = per_token.sum_all().unwrap().backward().unwrap();
                        (
                            values(&per_token),
                            values(gradient.get(leaf.as_tensor()).unwrap()),
                        )
                    };
                    let (dense_values, dense_gradient) = expect(&dense);
                    let (sparse_values, sparse_gradient) = expect(&sparse);
                    let diff = max_abs_diff(&dense_values, &sparse_values)
                        .max(max_abs_diff(&dense_gradient, &sparse_gradient));
                    overall = overall.max(diff);
                    assert!(
                        diff < 1e-10,
                        "{policy:?} {divergence} T_signal={signal_temperature} T={temperature}: \
                         max_abs_diff {diff:.3e}"
                    );
                }
            }
        }
        println!("top-k = vocabulary vs dense (values and gradients): max_abs_diff {overall:.3e}");
    }

    #[test]
    fn tail_policy_lower_bounds_the_dense_divergence() {
        // At the signal's temperature the tail bucket is an exact coarse-graining, so every
        // (f-)divergence here can only shrink (data processing inequality).
        let mut rng = Rng(5);
        let student = rng.tensor((2, 4, 12), 2.0);
        let teacher = rng.tensor((2, 4, 12), 2.0);
        let dense = TeacherSignal::dense(teacher.clone());
        for k in [1, 3, 6, 11] {
            let sparse = top_k(&teacher, k, MissingMass::Tail);
            for divergence in all_divergences() {
                let full = values(&per_token(&student, &dense, divergence, 1.0).unwrap());
                let coarse = values(&per_token(&student, &sparse, divergence, 1.0).unwrap());
                for (c, f) in coarse.iter().zip(&full) {
                    assert!(
                        *c >= -1e-12 && *c <= f + 1e-12,
                        "{divergence} k={k}: {c} > {f}"
                    );
                }
            }
        }
    }

    #[test]
    fn renormalize_ignores_student_mass_outside_the_set_and_tail_does_not() {
        let mut rng = Rng(6);
        let teacher = rng.tensor((1, 2, 8), 2.0);
        let student = rng.tensor((1, 2, 8), 2.0);
        let renorm = top_k(&teacher, 3, MissingMass::Renormalize);
        let tail = top_k(&teacher, 3, MissingMass::Tail);
        // Raise the student's logits on the tokens outside the teacher's top-3 only.
        let TeacherSignal::Sparse { indices, .. } = &renorm else {
            unreachable!()
        };
        let set = Tensor::zeros((1, 2, 8), DType::F64, &Device::Cpu)
            .unwrap()
            .scatter(
                indices,
                &Tensor::ones((1, 2, 3), DType::F64, &Device::Cpu).unwrap(),
                2,
            )
            .unwrap();
        let boosted =
            (&student + set.affine(-1.0, 1.0).unwrap().affine(4.0, 0.0).unwrap()).unwrap();
        let eval = |signal: &TeacherSignal, logits: &Tensor| {
            values(&per_token(logits, signal, Divergence::ForwardKl, 1.0).unwrap())
        };
        assert!(max_abs_diff(&eval(&renorm, &student), &eval(&renorm, &boosted)) < 1e-12);
        let (before, after) = (eval(&tail, &student), eval(&tail, &boosted));
        assert!(
            before.iter().zip(&after).all(|(b, a)| a > b),
            "{before:?} {after:?}"
        );
    }
}
