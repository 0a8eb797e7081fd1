//! Token-level KD divergences between a teacher signal and the student's logits.
//!
//! [`Divergence`] names the objective (forward/reverse KL, TRL's generalised JSD, DistiLLM's skew
//! KLs, TVD); [`per_token`] computes it at every `[batch, time]` position from the student's
//! logits and a [`TeacherSignal`] (dense logits or sparse top-k log-probs); [`masked_mean`]
//! reduces it over completion tokens. Numbers match `shared/fixtures/kd_losses.json` (PyTorch/TRL).
//!
//! Conventions (as TRL): both logit sets are divided by the temperature before the softmax, no
//! `T²` factor is applied, `p_t` is the teacher's and `p_s` the student's distribution.
//!
//! Memory and gradients: positions are processed in chunks of rows (about [`CHUNK_ELEMENTS`]
//! logits per chunk). Under candle's autograd every op keeps its inputs alive until backward, so
//! chunking alone would not bound memory: the ~10 `[rows, vocab]` temporaries of a divergence
//! would all stay in the graph. Instead each chunk is computed on plain tensors (no graph) and
//! its gradient `G = ∂D_row/∂logits_row` is written in closed form on the spot
//! ([`log_prob_sensitivity`] pushed through the softmax); the chunk's temporaries are freed before
//! the next chunk. The returned per-token tensor is
//! `value + rowdot(logits, G) − detach(rowdot(logits, G))`: its value is exact and its gradient
//! with respect to the student logits is exactly `G` per row, so any reduction downstream
//! (masked mean, accumulation weights) back-propagates correctly. What stays alive for backward
//! is one `[b·t, v]` tensor (`G`) besides the logits themselves. When the student logits carry
//! no graph (evaluation), no gradient is computed at all. The
//! teacher never receives a gradient. Higher-order derivatives are not supported.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::teacher::{MissingMass, TAIL_FLOOR, TeacherSignal};

/// Default β for [`Divergence::Jsd`] (TRL's `GKDConfig.beta` default).
pub const DEFAULT_JSD_BETA: f64 = 0.5;
/// Default α for the skew KLs (DistiLLM's default skew).
pub const DEFAULT_SKEW_ALPHA: f64 = 0.1;
/// Logits per chunk (4 Mi elements, 16 MiB in f32): ~28 positions at a 150k vocabulary, 1024 at
/// 4096. Large enough that per-op overhead is negligible, small enough to stay in cache-sized
/// working sets and to keep the per-chunk graph's temporaries at a few tens of MiB.
pub const CHUNK_ELEMENTS: usize = 1 << 22;

/// A token-level divergence between the teacher's and the student's next-token distributions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Divergence {
    /// `KL(p_t ‖ p_s)`: mass-covering; the classic KD loss (`fkl`).
    ForwardKl,
    /// `KL(p_s ‖ p_t)`: mode-seeking (`rkl`).
    ReverseKl,
    /// TRL's generalised JSD (`jsd`): `m = β·p_t + (1−β)·p_s`,
    /// `β·KL(p_t‖m) + (1−β)·KL(p_s‖m)`; β weights the teacher. β = 0 is forward KL and β = 1
    /// reverse KL exactly (TRL's special cases; the formula itself vanishes at both ends).
    Jsd {
        /// Weight of the teacher in the mixture, in `[0, 1]`.
        beta: f64,
    },
    /// DistiLLM's skew forward KL (`skl`): `KL(p_t ‖ α·p_t + (1−α)·p_s)`; α weights the first
    /// argument. α = 0 is forward KL, α = 1 is 0.
    SkewForwardKl {
        /// Weight of the teacher in the skewed mixture, in `[0, 1]`.
        alpha: f64,
    },
    /// DistiLLM's skew reverse KL (`srkl`): `KL(p_s ‖ α·p_s + (1−α)·p_t)`. α = 0 is reverse KL.
    SkewReverseKl {
        /// Weight of the student in the skewed mixture, in `[0, 1]`.
        alpha: f64,
    },
    /// Total variation distance (`tvd`): `½·Σ|p_t − p_s|`.
    Tvd,
}

/// A divergence family by its short name, as `--divergence` and the TOML key `divergence` take
/// it; [`Divergence::new`] adds the family's parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum DivergenceKind {
    /// Forward KL(teacher ‖ student).
    #[default]
    Fkl,
    /// Reverse KL(student ‖ teacher).
    Rkl,
    /// Generalised JSD (`beta`: the teacher's weight in the mixture).
    Jsd,
    /// Skew forward KL (`alpha`).
    Skl,
    /// Skew reverse KL (`alpha`).
    Srkl,
    /// Total variation distance.
    Tvd,
}

impl DivergenceKind {
    /// The short name (`fkl`, `rkl`, `jsd`, `skl`, `srkl`, `tvd`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Fkl => "fkl",
            Self::Rkl => "rkl",
            Self::Jsd => "jsd",
            Self::Skl => "skl",
            Self::Srkl => "srkl",
            Self::Tvd => "tvd",
        }
    }
}

impl fmt::Display for DivergenceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DivergenceKind {
    type Err = ParseDivergenceError;

    fn from_str(name: &str) -> std::result::Result<Self, Self::Err> {
        Ok(match name {
            "fkl" => Self::Fkl,
            "rkl" => Self::Rkl,
            "jsd" => Self::Jsd,
            "skl" => Self::Skl,
            "srkl" => Self::Srkl,
            "tvd" => Self::Tvd,
            other => {
                return Err(ParseDivergenceError(format!(
                    "unknown divergence `{other}`; expected one of {}",
                    Divergence::NAMES.map(|n| format!("`{n}`")).join(", ")
                )));
            }
        })
    }
}

/// An invalid divergence name or parameter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseDivergenceError(String);

impl Divergence {
    /// The short names, as accepted by `--divergence` and [`FromStr`].
    pub const NAMES: [&'static str; 6] = ["fkl", "rkl", "jsd", "skl", "srkl", "tvd"];

    /// The short name (`fkl`, `rkl`, `jsd`, `skl`, `srkl`, `tvd`).
    pub fn name(&self) -> &'static str {
        match self {
            Self::ForwardKl => "fkl",
            Self::ReverseKl => "rkl",
            Self::Jsd { .. } => "jsd",
            Self::SkewForwardKl { .. } => "skl",
            Self::SkewReverseKl { .. } => "srkl",
            Self::Tvd => "tvd",
        }
    }

    /// The divergence's family.
    pub fn kind(&self) -> DivergenceKind {
        match self {
            Self::ForwardKl => DivergenceKind::Fkl,
            Self::ReverseKl => DivergenceKind::Rkl,
            Self::Jsd { .. } => DivergenceKind::Jsd,
            Self::SkewForwardKl { .. } => DivergenceKind::Skl,
            Self::SkewReverseKl { .. } => DivergenceKind::Srkl,
            Self::Tvd => DivergenceKind::Tvd,
        }
    }

    /// Builds a divergence from its short name and optional `--beta` (jsd) / `--alpha` (skl,
    /// srkl); a missing parameter takes its default, a parameter the divergence does not use is
    /// an error.
    pub fn from_name(
        name: &str,
        beta: Option<f64>,
        alpha: Option<f64>,
    ) -> std::result::Result<Self, ParseDivergenceError> {
        Self::new(name.parse()?, beta, alpha)
    }

    /// Builds a divergence of family `kind` with optional `beta` (jsd) / `alpha` (skl, srkl); a
    /// missing parameter takes its default, a parameter the family does not use is an error.
    pub fn new(
        kind: DivergenceKind,
        beta: Option<f64>,
        alpha: Option<f64>,
    ) -> std::result::Result<Self, ParseDivergenceError> {
        let name = kind.name();
        let divergence = match kind {
            DivergenceKind::Fkl => Self::ForwardKl,
            DivergenceKind::Rkl => Self::ReverseKl,
            DivergenceKind::Jsd => Self::Jsd {
                beta: beta.unwrap_or(DEFAULT_JSD_BETA),
            },
            DivergenceKind::Skl => Self::SkewForwardKl {
                alpha: alpha.unwrap_or(DEFAULT_SKEW_ALPHA),
            },
            DivergenceKind::Srkl => Self::SkewReverseKl {
                alpha: alpha.unwrap_or(DEFAULT_SKEW_ALPHA),
            },
            DivergenceKind::Tvd => Self::Tvd,
        };
        if beta.is_some() && !matches!(divergence, Self::Jsd { .. }) {
            return Err(ParseDivergenceError(format!(
                "`beta` applies to `jsd` only, not to `{name}`"
            )));
        }
        if alpha.is_some()
            && !matches!(
                divergence,
                Self::SkewForwardKl { .. } | Self::SkewReverseKl { .. }
            )
        {
            return Err(ParseDivergenceError(format!(
                "`alpha` applies to `skl` and `srkl` only, not to `{name}`"
            )));
        }
        divergence.validate()?;
        Ok(divergence)
    }

    /// Checks that β or α lies in `[0, 1]`.
    pub fn validate(&self) -> std::result::Result<(), ParseDivergenceError> {
        let (field, value) = match *self {
            Self::Jsd { beta } => ("beta", beta),
            Self::SkewForwardKl { alpha } | Self::SkewReverseKl { alpha } => ("alpha", alpha),
            Self::ForwardKl | Self::ReverseKl | Self::Tvd => return Ok(()),
        };
        if (0.0..=1.0).contains(&value) {
            Ok(())
        } else {
            Err(ParseDivergenceError(format!(
                "divergence `{}`: `{field}` must lie in [0, 1], got {value}",
                self.name()
            )))
        }
    }
}

/// `fkl`, `rkl`, `tvd`, `jsd:<beta>`, `skl:<alpha>`, `srkl:<alpha>`; parses back with [`FromStr`].
impl fmt::Display for Divergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Jsd { beta } => write!(f, "jsd:{beta}"),
            Self::SkewForwardKl { alpha } => write!(f, "skl:{alpha}"),
            Self::SkewReverseKl { alpha } => write!(f, "srkl:{alpha}"),
            other => f.write_str(other.name()),
        }
    }
}

/// Accepts a short name, optionally with its parameter after a colon: `jsd`, `jsd:0.9`, `skl:0.1`.
impl FromStr for Divergence {
    type Err = ParseDivergenceError;

    fn from_str(text: &str) -> std::result::Result<Self, Self::Err> {
        let text = text.trim();
        let (name, parameter) = match text.split_once(':') {
            Some((name, parameter)) => {
                let value = parameter.trim().parse::<f64>().map_err(|_| {
                    ParseDivergenceError(format!(
                        "divergence `{text}`: expected a number after `:`, got `{parameter}`"
                    ))
                })?;
                (name.trim(), Some(value))
            }
            None => (text, None),
        };
        match name {
            "jsd" => Self::from_name(name, parameter, None),
            "skl" | "srkl" => Self::from_name(name, None, parameter),
            _ if parameter.is_some() => Err(ParseDivergenceError(format!(
                "divergence `{name}` takes no parameter, got `{text}`"
            ))),
            _ => Self::from_name(name, None, None),
        }
    }
}

impl Serialize for Divergence {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Divergence {
    fn deserialize<De: Deserializer<'de>>(
        deserializer: De,
    ) -> std::result::Result<Self, De::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The divergence at every position: `[batch, time]`, in f32 (f64 when the student is f64).
///
/// `student_logits` is `[b, t, v]`; `temperature` divides both logit sets. Differentiable with
/// respect to `student_logits` (see the module docs for how); every position is computed, masked
/// or not, so the teacher signal must be finite everywhere.
pub fn per_token(
    student_logits: &Tensor,
    teacher: &TeacherSignal,
    divergence: Divergence,
    temperature: f64,
) -> Result<Tensor> {
    let vocab = student_logits.dims().last().copied().unwrap_or(1).max(1);
    let chunk_rows = (CHUNK_ELEMENTS / vocab).max(1);
    per_token_chunked(student_logits, teacher, divergence, temperature, chunk_rows)
}

/// [`per_token`] with an explicit number of positions per chunk.
pub fn per_token_chunked(
    student_logits: &Tensor,
    teacher: &TeacherSignal,
    divergence: Divergence,
    temperature: f64,
    chunk_rows: usize,
) -> Result<Tensor> {
    divergence
        .validate()
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    if !(temperature.is_finite() && temperature > 0.0) {
        candle_core::bail!("kd: `temperature` must be a positive number, got {temperature}");
    }
    let (batch, time, vocab) = student_logits.dims3().map_err(|e| {
        candle_core::Error::Msg(format!("kd: student logits: expected [b, t, v]: {e}"))
    })?;
    teacher.validate(batch, time, vocab)?;
    let rows = batch * time;
    let dtype = match student_logits.dtype() {
        DType::F64 => DType::F64,
        _ => DType::F32,
    };
    let student_flat = student_logits.reshape((rows, vocab))?;
    let student_data = student_flat.detach().to_dtype(dtype)?;
    let flat_teacher = FlatTeacher::new(teacher, rows, dtype)?;
    let track = student_logits.track_op();
    let chunk_rows = chunk_rows.max(1);

    let mut values = Vec::with_capacity(rows.div_ceil(chunk_rows));
    // Filled chunk by chunk in place, so the chunks and their concatenation never coexist.
    let gradient = if track {
        Some(Tensor::zeros(
            (rows, vocab),
            dtype,
            student_logits.device(),
        )?)
    } else {
        None
    };
    let mut start = 0;
    while start < rows {
        let len = chunk_rows.min(rows - start);
        let student_chunk = student_data.narrow(0, start, len)?;
        let teacher_chunk = flat_teacher.narrow(start, len)?;
        let (chunk_values, chunk_gradient) =
            teacher_chunk.per_row(&student_chunk, divergence, temperature, track)?;
        values.push(chunk_values);
        if let (Some(full), Some(chunk)) = (&gradient, chunk_gradient) {
            full.slice_set(&chunk.contiguous()?, 0, start)?;
        }
        start += len;
    }
    let values = if values.is_empty() {
        Tensor::zeros(rows, dtype, student_logits.device())?
    } else {
        Tensor::cat(&values, 0)?
    };
    let per_token = if let Some(gradient) = gradient.filter(|_| rows > 0) {
        // rowdot(logits, G) - detach(rowdot(logits, G)) is exactly 0 in value and has gradient G
        // per row. A batched [1, v] x [v, 1] matmul keeps only the logits and G for backward (an
        // elementwise product would keep a third [rows, v] tensor).
        let logits = student_flat.to_dtype(dtype)?.reshape((rows, 1, vocab))?;
        let dot = logits
            .matmul(&gradient.reshape((rows, vocab, 1))?)?
            .reshape(rows)?;
        (values + (&dot - dot.detach())?)?
    } else {
        values
    };
    per_token.reshape((batch, time))
}

/// Sum of `per_token` over positions where `mask` is 1 (a scalar); for accumulation over
/// micro-batches, divide by the total mask count yourself.
pub fn masked_sum(per_token: &Tensor, mask: &Tensor) -> Result<Tensor> {
    if per_token.dims() != mask.dims() {
        candle_core::bail!(
            "kd: `mask` shape {:?} differs from the per-token shape {:?}",
            mask.dims(),
            per_token.dims()
        );
    }
    let keep = mask.to_dtype(per_token.dtype())?.gt(0.0)?;
    // where_cond, not a product: a non-finite value at a masked position (padding) must not leak.
    keep.where_cond(per_token, &per_token.zeros_like()?)?
        .sum_all()
}

/// Mean of `per_token` over positions where `mask` (`[b, t]`, 0/1) is 1: a scalar. With no
/// position selected it is 0 (with a zero gradient) rather than NaN.
pub fn masked_mean(per_token: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let total = masked_sum(per_token, mask)?;
    let count = mask
        .to_dtype(DType::F64)?
        .gt(0.0)?
        .to_dtype(DType::F64)?
        .sum_all()?;
    let count = count.to_scalar::<f64>()?.max(1.0);
    total.affine(1.0 / count, 0.0)
}

/// The masked-mean divergence: [`per_token`] followed by [`masked_mean`].
pub fn loss(
    student_logits: &Tensor,
    teacher: &TeacherSignal,
    divergence: Divergence,
    temperature: f64,
    mask: &Tensor,
) -> Result<Tensor> {
    masked_mean(
        &per_token(student_logits, teacher, divergence, temperature)?,
        mask,
    )
}

/// The divergence per row between two sets of normalised log-probs `[rows, n]` (teacher first).
///
/// Used by [`per_token`]; public for diagnostics on already-normalised distributions.
pub fn from_log_probs(
    teacher_log_probs: &Tensor,
    student_log_probs: &Tensor,
    divergence: Divergence,
) -> Result<Tensor> {
    let (lt, ls) = (teacher_log_probs, student_log_probs);
    match divergence {
        Divergence::ForwardKl => kl(lt, ls),
        Divergence::ReverseKl => kl(ls, lt),
        Divergence::Jsd { beta: 0.0 } => kl(lt, ls),
        Divergence::Jsd { beta: 1.0 } => kl(ls, lt),
        Divergence::Jsd { beta } => {
            let mixture = log_mixture(lt, beta, ls)?;
            kl(lt, &mixture)?.affine(beta, 0.0)? + kl(ls, &mixture)?.affine(1.0 - beta, 0.0)?
        }
        Divergence::SkewForwardKl { alpha } => skew_kl(lt, ls, alpha),
        Divergence::SkewReverseKl { alpha } => skew_kl(ls, lt, alpha),
        Divergence::Tvd => {
            let difference = (lt.exp()? - ls.exp()?)?;
            // |d| = d·sign(d) with the sign held constant: the gradient is sign(d), 0 at d = 0,
            // and never NaN.
            let sign = difference.sign()?.detach();
            (difference * sign)?.sum(1)?.affine(0.5, 0.0)
        }
    }
}

/// `KL(a ‖ b)` per row from log-probs; `a` is finite, so `exp(a)·(a − b)` has no `0·log 0`.
fn kl(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    (a.exp()? * (a - b)?)?.sum(1)
}

/// `KL(a ‖ α·a + (1−α)·b)` per row, with the ends taken exactly.
fn skew_kl(a: &Tensor, b: &Tensor, alpha: f64) -> Result<Tensor> {
    if alpha == 0.0 {
        kl(a, b)
    } else if alpha == 1.0 {
        a.narrow(1, 0, 1)?.squeeze(1)?.zeros_like()
    } else {
        kl(a, &log_mixture(a, alpha, b)?)
    }
}

/// `log(w·exp(a) + (1−w)·exp(b))` for `0 < w < 1`, stably. The shift is detached: the result
/// does not depend on it, so its exact gradient through the shift is 0.
fn log_mixture(a: &Tensor, weight: f64, b: &Tensor) -> Result<Tensor> {
    let shift = a.maximum(b)?.detach();
    let sum = (a.sub(&shift)?.exp()?.affine(weight, 0.0)?
        + b.sub(&shift)?.exp()?.affine(1.0 - weight, 0.0)?)?;
    sum.log()? + shift
}

/// `log_softmax` over the last dimension of a `[rows, n]` tensor, from differentiable ops, with
/// the max shift detached (the result does not depend on it).
fn log_softmax_rows(xs: &Tensor) -> Result<Tensor> {
    let shift = xs.max_keepdim(1)?.detach();
    let shifted = xs.broadcast_sub(&shift)?;
    let log_sum = shifted.exp()?.sum_keepdim(1)?.log()?;
    shifted.broadcast_sub(&log_sum)
}

/// The teacher signal flattened to `[rows, ·]` rows in the compute dtype, detached.
enum FlatTeacher {
    Dense(Tensor),
    Sparse {
        indices: Tensor,
        logprobs: Tensor,
        /// The signal's temperature.
        temperature: f64,
        missing_mass: MissingMass,
        /// Tail masses at or below this are rounding noise of the log-probs and count as 0.
        tail_noise: f64,
    },
}

impl FlatTeacher {
    fn new(teacher: &TeacherSignal, rows: usize, dtype: DType) -> Result<Self> {
        Ok(match teacher {
            TeacherSignal::Dense { logits } => {
                let vocab = logits.dim(2)?;
                Self::Dense(logits.detach().reshape((rows, vocab))?.to_dtype(dtype)?)
            }
            TeacherSignal::Sparse {
                indices,
                logprobs,
                temperature,
                missing_mass,
            } => {
                let k = indices.dim(2)?;
                let epsilon = match logprobs.dtype() {
                    DType::F64 => f64::EPSILON,
                    DType::F32 => f64::from(f32::EPSILON),
                    // bf16/f16 log-probs: 2^-8 / 2^-11 relative precision.
                    DType::BF16 => 2f64.powi(-8),
                    _ => 2f64.powi(-11),
                };
                Self::Sparse {
                    indices: indices.reshape((rows, k))?.contiguous()?,
                    logprobs: logprobs.detach().reshape((rows, k))?.to_dtype(dtype)?,
                    temperature: *temperature,
                    missing_mass: *missing_mass,
                    tail_noise: 2.0 * epsilon * k as f64,
                }
            }
        })
    }

    fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        Ok(match self {
            Self::Dense(logits) => Self::Dense(logits.narrow(0, start, len)?),
            Self::Sparse {
                indices,
                logprobs,
                temperature,
                missing_mass,
                tail_noise,
            } => Self::Sparse {
                indices: indices.narrow(0, start, len)?,
                logprobs: logprobs.narrow(0, start, len)?,
                temperature: *temperature,
                missing_mass: *missing_mass,
                tail_noise: *tail_noise,
            },
        })
    }

    /// The divergence for each row of `student` (`[rows, v]`, compute dtype): `[rows]`, and with
    /// `want_gradient` its closed-form gradient with respect to `student` (`[rows, v]`).
    ///
    /// The values are built from differentiable ops (tests run candle's autograd through them as
    /// a second oracle); the gradient is `(u − q·Σu) / T` per row, where `u = ∂D/∂log q` from
    /// [`log_prob_sensitivity`] and `q` the student's distribution over the compared outcomes.
    fn per_row(
        &self,
        student: &Tensor,
        divergence: Divergence,
        temperature: f64,
        want_gradient: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let inverse = 1.0 / temperature;
        // Gradient of D with respect to logits z, from u = ∂D/∂log_softmax(z).
        let through_softmax = |u: &Tensor, log_q: &Tensor| -> Result<Tensor> {
            let q = log_q.exp()?;
            u.broadcast_sub(&q.broadcast_mul(&u.sum_keepdim(1)?)?)?
                .affine(inverse, 0.0)
        };
        match self {
            Self::Dense(teacher) => {
                let teacher = log_softmax_rows(&teacher.affine(inverse, 0.0)?)?;
                let student = log_softmax_rows(&student.affine(inverse, 0.0)?)?;
                let values = from_log_probs(&teacher, &student, divergence)?;
                let gradient = if want_gradient {
                    let u = log_prob_sensitivity(&teacher, &student, divergence)?;
                    Some(through_softmax(&u, &student)?)
                } else {
                    None
                };
                Ok((values, gradient))
            }
            Self::Sparse {
                indices,
                logprobs,
                temperature: signal_temperature,
                missing_mass,
                tail_noise,
            } => {
                // log p^(T_signal / T), renormalised below: the teacher at temperature T.
                let rescale = signal_temperature / temperature;
                match missing_mass {
                    MissingMass::Renormalize => {
                        // Renormalising over the set cancels the full-vocabulary normaliser, so
                        // the student's set logits suffice (same value, no [rows, v] softmax).
                        let student_set = student.gather(indices, 1)?.affine(inverse, 0.0)?;
                        let student_set = log_softmax_rows(&student_set)?;
                        let teacher = log_softmax_rows(&logprobs.affine(rescale, 0.0)?)?;
                        let values = from_log_probs(&teacher, &student_set, divergence)?;
                        let gradient = if want_gradient {
                            let u = log_prob_sensitivity(&teacher, &student_set, divergence)?;
                            let set_gradient = through_softmax(&u, &student_set)?;
                            // Ids are distinct (validated), so a plain scatter places each once.
                            Some(student.zeros_like()?.scatter(indices, &set_gradient, 1)?)
                        } else {
                            None
                        };
                        Ok((values, gradient))
                    }
                    MissingMass::Tail => {
                        let student_full = log_softmax_rows(&student.affine(inverse, 0.0)?)?;
                        let student_set = student_full.gather(indices, 1)?;
                        // The student's exact mass outside the set (a sum over the complement,
                        // not 1 − Σ set, which would be rounding noise when the tail is tiny).
                        let ones = Tensor::ones(indices.dims(), student.dtype(), student.device())?;
                        let outside = student_full
                            .zeros_like()?
                            .scatter(indices, &ones, 1)?
                            .affine(-1.0, 1.0)?;
                        let outside_probs = (student_full.exp()? * &outside)?;
                        let tail_mass = outside_probs.sum_keepdim(1)?;
                        let student_tail = tail_mass.maximum(TAIL_FLOOR)?.log()?;
                        let student_buckets = Tensor::cat(&[&student_set, &student_tail], 1)?;

                        let tail = logprobs.exp()?.sum_keepdim(1)?.affine(-1.0, 1.0)?;
                        let tail = tail
                            .gt(*tail_noise)?
                            .where_cond(&tail, &tail.zeros_like()?)?
                            .maximum(TAIL_FLOOR)?
                            .log()?;
                        // The tail bucket is tempered like one token: exact at T = T_signal, an
                        // approximation otherwise (how the tail spreads over tokens is unknown).
                        let teacher = Tensor::cat(&[logprobs, &tail], 1)?.affine(rescale, 0.0)?;
                        let teacher = log_softmax_rows(&teacher)?;
                        let values = from_log_probs(&teacher, &student_buckets, divergence)?;
                        let gradient = if want_gradient {
                            let k = indices.dim(1)?;
                            let u = log_prob_sensitivity(&teacher, &student_buckets, divergence)?;
                            let u_set = u.narrow(1, 0, k)?.contiguous()?;
                            let u_tail = u.narrow(1, k, 1)?;
                            // ∂ log(tail)/∂ log q_j = q_j / tail for j outside the set; zero where
                            // the tail sits at its floor (as the clamp's subgradient).
                            let live = tail_mass.gt(TAIL_FLOOR)?;
                            let per_mass = live.where_cond(
                                &(u_tail / tail_mass.maximum(TAIL_FLOOR)?)?,
                                &tail_mass.zeros_like()?,
                            )?;
                            let u_full = outside_probs
                                .broadcast_mul(&per_mass)?
                                .scatter(indices, &u_set, 1)?;
                            Some(through_softmax(&u_full, &student_full)?)
                        } else {
                            None
                        };
                        Ok((values, gradient))
                    }
                }
            }
        }
    }
}

/// `u = ∂D/∂log q_s` per outcome, holding `q_s = exp(log q_s)` tied to it, for the divergence
/// `D` of [`from_log_probs`] (teacher log-probs `lt`, student log-probs `ls`, `[rows, n]`).
///
/// Closed forms (`p` teacher, `q` student, `m` the mixture in each definition):
/// fkl `−p`; rkl `q·(ls − lt + 1)`; jsd `(1−β)·q·(ls − lm)` (the mixture terms cancel);
/// skl `−(1−α)·p·q/m`; srkl `q·(ls − lm + 1) − α·q²/m`; tvd `½·sign(q − p)·q`.
fn log_prob_sensitivity(lt: &Tensor, ls: &Tensor, divergence: Divergence) -> Result<Tensor> {
    let reverse = || ls.exp()? * (ls - lt)?.affine(1.0, 1.0)?;
    match divergence {
        Divergence::ForwardKl
        | Divergence::Jsd { beta: 0.0 }
        | Divergence::SkewForwardKl { alpha: 0.0 } => lt.exp()?.neg(),
        Divergence::ReverseKl
        | Divergence::Jsd { beta: 1.0 }
        | Divergence::SkewReverseKl { alpha: 0.0 } => reverse(),
        Divergence::SkewForwardKl { alpha: 1.0 } | Divergence::SkewReverseKl { alpha: 1.0 } => {
            ls.zeros_like()
        }
        Divergence::Jsd { beta } => {
            let mixture = log_mixture(lt, beta, ls)?;
            (ls.exp()? * (ls - mixture)?)?.affine(1.0 - beta, 0.0)
        }
        Divergence::SkewForwardKl { alpha } => {
            let mixture = log_mixture(lt, alpha, ls)?;
            ((lt + ls)? - mixture)?.exp()?.affine(alpha - 1.0, 0.0)
        }
        Divergence::SkewReverseKl { alpha } => {
            let mixture = log_mixture(ls, alpha, lt)?;
            let first = (ls.exp()? * (ls - &mixture)?.affine(1.0, 1.0)?)?;
            let second = (ls.affine(2.0, 0.0)? - mixture)?
                .exp()?
                .affine(alpha, 0.0)?;
            first - second
        }
        Divergence::Tvd => {
            let q = ls.exp()?;
            ((&q - lt.exp()?)?.sign()? * q)?.affine(0.5, 0.0)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use candle_core::{Device, IndexOp, Var};
    use serde_json::Value;

    use super::*;

    const FIXTURE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/fixtures/kd_losses.json"
    );

    /// Every divergence the tests sweep, including both JSD ends and both skew ends.
    pub(crate) fn all_divergences() -> Vec<Divergence> {
        vec![
            Divergence::ForwardKl,
            Divergence::ReverseKl,
            Divergence::Jsd { beta: 0.0 },
            Divergence::Jsd { beta: 0.1 },
            Divergence::Jsd { beta: 0.5 },
            Divergence::Jsd { beta: 0.9 },
            Divergence::Jsd { beta: 1.0 },
            Divergence::SkewForwardKl { alpha: 0.1 },
            Divergence::SkewReverseKl { alpha: 0.1 },
            Divergence::SkewForwardKl { alpha: 0.0 },
            Divergence::SkewReverseKl { alpha: 0.0 },
            Divergence::Tvd,
        ]
    }

    /// SplitMix64 with Box-Muller: a tiny seeded PRNG so the property tests are reproducible.
    pub(crate) struct Rng(pub(crate) u64);

    impl Rng {
        pub(crate) fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        pub(crate) fn uniform(&mut self) -> f64 {
            (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
        }
        pub(crate) fn normal(&mut self) -> f64 {
            let u = self.uniform().max(1e-300);
            let v = self.uniform();
            (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
        }
        pub(crate) fn tensor(&mut self, dims: (usize, usize, usize), scale: f64) -> Tensor {
            let data: Vec<f64> = (0..dims.0 * dims.1 * dims.2)
                .map(|_| scale * self.normal())
                .collect();
            Tensor::from_vec(data, dims, &Device::Cpu).expect("shape matches data")
        }
    }

    pub(crate) fn values(tensor: &Tensor) -> Vec<f64> {
        tensor
            .to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f64>())
            .expect("a float tensor")
    }

    pub(crate) fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    /// Worst violation of `|a − b| <= atol + rtol·|b|` (≤ 0 means within tolerance).
    fn worst_excess(actual: &[f64], expected: &[f64], rtol: f64, atol: f64) -> f64 {
        actual
            .iter()
            .zip(expected)
            .map(|(a, e)| (a - e).abs() - (atol + rtol * e.abs()))
            .fold(f64::NEG_INFINITY, f64::max)
    }

    fn json_tensor(value: &Value, dims: &[usize], dtype: DType) -> Tensor {
        fn flatten(value: &Value, out: &mut Vec<f64>) {
            match value {
                Value::Array(items) => items.iter().for_each(|item| flatten(item, out)),
                Value::Number(number) => out.push(number.as_f64().expect("a finite number")),
                other => panic!("fixture: expected numbers, got {other}"),
            }
        }
        let mut data = Vec::new();
        flatten(value, &mut data);
        Tensor::from_vec(data, dims, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .expect("fixture shape matches its data")
    }

    fn divergence_for_key(key: &str) -> Option<Divergence> {
        let number = |prefix: &str| key.strip_prefix(prefix).map(str::parse::<f64>);
        Some(match key {
            "forward_kl" => Divergence::ForwardKl,
            "reverse_kl" => Divergence::ReverseKl,
            "tvd" => Divergence::Tvd,
            "teacher_entropy" => return None,
            _ => {
                if let Some(beta) = number("gjsd_beta_") {
                    Divergence::Jsd {
                        beta: beta.expect("fixture key number"),
                    }
                } else if let Some(alpha) = number("skew_forward_kl_alpha_") {
                    Divergence::SkewForwardKl {
                        alpha: alpha.expect("fixture key number"),
                    }
                } else if let Some(alpha) = number("skew_reverse_kl_alpha_") {
                    Divergence::SkewReverseKl {
                        alpha: alpha.expect("fixture key number"),
                    }
                } else {
                    panic!("fixture: unknown key `{key}`")
                }
            }
        })
    }

    /// A teacher signal that is the dense one at k = vocabulary, ids sorted by teacher log-prob
    /// (as a server returns them), log-probs computed at `signal_temperature`.
    pub(crate) fn full_top_k(
        teacher: &Tensor,
        signal_temperature: f64,
        policy: MissingMass,
    ) -> TeacherSignal {
        let (b, t, v) = teacher.dims3().expect("rank 3");
        let log_probs =
            candle_nn::ops::log_softmax(&teacher.affine(1.0 / signal_temperature, 0.0).unwrap(), 2)
                .unwrap();
        let rows = values(&log_probs);
        let mut ids = Vec::with_capacity(b * t * v);
        let mut sorted = Vec::with_capacity(b * t * v);
        for row in rows.chunks(v) {
            let mut order: Vec<usize> = (0..v).collect();
            order.sort_by(|&i, &j| row[j].total_cmp(&row[i]));
            ids.extend(order.iter().map(|&i| i as u32));
            sorted.extend(order.iter().map(|&i| row[i]));
        }
        TeacherSignal::Sparse {
            indices: Tensor::from_vec(ids, (b, t, v), &Device::Cpu).unwrap(),
            logprobs: Tensor::from_vec(sorted, (b, t, v), &Device::Cpu)
                .unwrap()
                .to_dtype(log_probs.dtype())
                .unwrap(),
            temperature: signal_temperature,
            missing_mass: policy,
        }
    }

    /// Top-k of a dense teacher (k < v) at temperature 1.
    pub(crate) fn top_k(teacher: &Tensor, k: usize, policy: MissingMass) -> TeacherSignal {
        let TeacherSignal::Sparse {
            indices, logprobs, ..
        } = full_top_k(teacher, 1.0, policy)
        else {
            unreachable!("full_top_k returns a sparse signal")
        };
        TeacherSignal::Sparse {
            indices: indices.narrow(2, 0, k).unwrap().contiguous().unwrap(),
            logprobs: logprobs.narrow(2, 0, k).unwrap().contiguous().unwrap(),
            temperature: 1.0,
            missing_mass: policy,
        }
    }

    #[test]
    fn fixture_parity_f32() {
        let text = fs_err::read_to_string(FIXTURE).expect("kd_losses.json is readable");
        let fixture: Value = serde_json::from_str(&text).expect("kd_losses.json parses");
        let dims: Vec<usize> = fixture["shape"]
            .as_array()
            .expect("shape")
            .iter()
            .map(|d| d.as_u64().expect("dim") as usize)
            .collect();
        let (rtol, atol) = (1e-5, 1e-6);
        let mut checked = 0;
        let mut overall = 0.0f64;
        for case in fixture["cases"].as_array().expect("cases") {
            let name = case["name"].as_str().expect("case name");
            let teacher = json_tensor(&case["teacher_logits"], &dims, DType::F32);
            let student = json_tensor(&case["student_logits"], &dims, DType::F32);
            let mask = json_tensor(&case["mask"], &dims[..2], DType::F32);
            let student_var = Var::from_tensor(&student).unwrap();
            let signals = [
                ("dense", TeacherSignal::dense(teacher.clone())),
                ("top-k=v tail", full_top_k(&teacher, 1.0, MissingMass::Tail)),
                (
                    "top-k=v renorm",
                    full_top_k(&teacher, 1.0, MissingMass::Renormalize),
                ),
            ];
            for result in case["results"].as_array().expect("results") {
                let temperature = result["temperature"].as_f64().expect("temperature");
                for (key, expected) in result.as_object().expect("result object") {
                    if key == "temperature" {
                        continue;
                    }
                    let Some(divergence) = divergence_for_key(key) else {
                        continue;
                    };
                    let expected_per_token =
                        values(&json_tensor(&expected["per_token"], &dims[..2], DType::F64));
                    let expected_value = expected["value"].as_f64().expect("value");
                    for (signal_name, signal) in &signals {
                        // Plain logits, a tracked leaf, and several chunks must all agree.
                        for (variant, logits, chunk) in [
                            ("plain", &student, 1 << 20),
                            ("tracked", student_var.as_tensor(), 3),
                        ] {
                            let per_token =
                                per_token_chunked(logits, signal, divergence, temperature, chunk)
                                    .unwrap();
                            assert_eq!(per_token.dtype(), DType::F32);
                            let got = values(&per_token);
                            let value = masked_mean(&per_token, &mask)
                                .unwrap()
                                .to_scalar::<f32>()
                                .unwrap() as f64;
                            let diff = max_abs_diff(&got, &expected_per_token)
                                .max((value - expected_value).abs());
                            let excess = worst_excess(&got, &expected_per_token, rtol, atol)
                                .max(worst_excess(&[value], &[expected_value], rtol, atol));
                            if *signal_name == "dense" && variant == "plain" {
                                println!("{name} T={temperature} {key}: max_abs_diff {diff:.3e}");
                            }
                            overall = overall.max(diff);
                            assert!(
                                excess <= 0.0,
                                "{name} T={temperature} {key} ({signal_name}, {variant}): \
                                 max_abs_diff {diff:.3e} exceeds rtol {rtol} / atol {atol}"
                            );
                            checked += 1;
                        }
                    }
                }
            }
        }
        println!("fixture parity: {checked} checks, overall max_abs_diff {overall:.3e}");
        // 4 cases × 2 temperatures × 10 divergence keys × 3 signals × 2 variants.
        assert_eq!(checked, 4 * 2 * 10 * 3 * 2);
    }

    /// Gradient of `Σ w ⊙ per_token` against central differences, in f64.
    fn check_gradient(
        student: &Tensor,
        teacher: &TeacherSignal,
        divergence: Divergence,
        temperature: f64,
        weights: &Tensor,
    ) -> f64 {
        let objective = |logits: &Tensor, chunk: usize| -> Tensor {
            let per_token =
                per_token_chunked(logits, teacher, divergence, temperature, chunk).unwrap();
            (per_token * weights).unwrap().sum_all().unwrap()
        };
        let leaf = Var::from_tensor(student).unwrap();
        // Two rows per chunk: the gradient must cross chunk boundaries correctly.
        let grads = objective(leaf.as_tensor(), 2).backward().unwrap();
        let analytic = values(
            grads
                .get(leaf.as_tensor())
                .expect("student logits get a gradient"),
        );
        let base = values(student);
        let step = 1e-6;
        let mut worst = 0.0f64;
        for (i, &a) in analytic.iter().enumerate() {
            let shifted = |delta: f64| {
                let mut data = base.clone();
                data[i] += delta;
                let logits = Tensor::from_vec(data, student.dims(), &Device::Cpu).unwrap();
                objective(&logits, 1 << 20).to_scalar::<f64>().unwrap()
            };
            let numeric = (shifted(step) - shifted(-step)) / (2.0 * step);
            let error = (a - numeric).abs() / (1.0 + numeric.abs());
            worst = worst.max(error);
        }
        worst
    }

    #[test]
    fn gradients_match_finite_differences() {
        let mut rng = Rng(7);
        let (b, t, v) = (2, 3, 7);
        let student = rng.tensor((b, t, v), 2.0);
        let teacher = rng.tensor((b, t, v), 2.0);
        let weights = rng.tensor((b, t, 1), 1.0).squeeze(2).unwrap();
        let signals = [
            ("dense", TeacherSignal::dense(teacher.clone())),
            ("top-4 tail", top_k(&teacher, 4, MissingMass::Tail)),
            ("top-4 renorm", top_k(&teacher, 4, MissingMass::Renormalize)),
        ];
        let mut overall = 0.0f64;
        for (name, signal) in &signals {
            for divergence in all_divergences() {
                for temperature in [1.0, 1.7] {
                    let error = check_gradient(&student, signal, divergence, temperature, &weights);
                    overall = overall.max(error);
                    assert!(
                        error < 1e-7,
                        "{name} {divergence} T={temperature}: gradient error {error:.3e}"
                    );
                }
            }
        }
        println!("finite differences: worst relative gradient error {overall:.3e}");
    }

    #[test]
    fn closed_form_gradient_matches_candle_autograd() {
        // A second oracle besides finite differences: candle's autograd through the value ops.
        let mut rng = Rng(12);
        let (b, t, v) = (2, 3, 9);
        let student = rng.tensor((b, t, v), 3.0);
        let teacher = rng.tensor((b, t, v), 3.0);
        let student_rows = student.reshape((b * t, v)).unwrap();
        let mut overall = 0.0f64;
        for signal in [
            TeacherSignal::dense(teacher.clone()),
            top_k(&teacher, 4, MissingMass::Tail),
            top_k(&teacher, 4, MissingMass::Renormalize),
            full_top_k(&teacher, 1.0, MissingMass::Tail),
        ] {
            let flat = FlatTeacher::new(&signal, b * t, DType::F64).unwrap();
            for divergence in all_divergences() {
                for temperature in [1.0, 2.5] {
                    let leaf = Var::from_tensor(&student_rows).unwrap();
                    let (value, _) = flat
                        .per_row(leaf.as_tensor(), divergence, temperature, false)
                        .unwrap();
                    let grads = value.sum_all().unwrap().backward().unwrap();
                    let autograd = match grads.get(leaf.as_tensor()) {
                        Some(g) => values(g),
                        None => vec![0.0; b * t * v],
                    };
                    let (_, closed) = flat
                        .per_row(&student_rows, divergence, temperature, true)
                        .unwrap();
                    let diff = max_abs_diff(&autograd, &values(&closed.unwrap()));
                    overall = overall.max(diff);
                    assert!(diff < 1e-12, "{divergence} T={temperature}: {diff:.3e}");
                }
            }
        }
        println!("closed form vs candle autograd: max_abs_diff {overall:.3e}");
    }

    #[test]
    fn gradient_flows_through_masked_mean_and_skips_masked_positions() {
        let mut rng = Rng(11);
        let (b, t, v) = (2, 4, 9);
        let student = rng.tensor((b, t, v), 1.5);
        let teacher = rng.tensor((b, t, v), 1.5);
        let mask = Tensor::new(&[[1f64, 1., 0., 0.], [1., 0., 1., 0.]], &Device::Cpu).unwrap();
        let signal = TeacherSignal::dense(teacher.clone());
        let leaf = Var::from_tensor(&student).unwrap();
        let objective = loss(
            leaf.as_tensor(),
            &signal,
            Divergence::Jsd { beta: 0.5 },
            2.0,
            &mask,
        )
        .unwrap();
        let grads = objective.backward().unwrap();
        let gradient = grads.get(leaf.as_tensor()).unwrap();
        for (bi, ti) in [(0, 2), (0, 3), (1, 1), (1, 3)] {
            let row = values(&gradient.i((bi, ti)).unwrap());
            assert!(
                row.iter().all(|g| *g == 0.0),
                "masked ({bi},{ti}) got {row:?}"
            );
        }
        for (bi, ti) in [(0, 0), (0, 1), (1, 0), (1, 2)] {
            let row = values(&gradient.i((bi, ti)).unwrap());
            assert!(
                row.iter().any(|g| g.abs() > 1e-6),
                "unmasked ({bi},{ti}) has no gradient"
            );
        }
    }

    #[test]
    fn divergences_are_nonnegative_and_zero_only_for_equal_distributions() {
        let mut rng = Rng(1);
        for scale in [0.5, 2.0, 8.0] {
            let student = rng.tensor((3, 4, 13), scale);
            let teacher = rng.tensor((3, 4, 13), scale);
            // The same distribution written with shifted logits.
            let shifted = student.broadcast_add(&rng.tensor((3, 4, 1), 5.0)).unwrap();
            for divergence in all_divergences() {
                for temperature in [1.0, 2.0] {
                    let distinct = values(
                        &per_token(
                            &student,
                            &TeacherSignal::dense(teacher.clone()),
                            divergence,
                            temperature,
                        )
                        .unwrap(),
                    );
                    assert!(
                        distinct.iter().all(|d| *d > 1e-6),
                        "{divergence} scale {scale}: distinct distributions gave {distinct:?}"
                    );
                    let same = values(
                        &per_token(
                            &student,
                            &TeacherSignal::dense(shifted.clone()),
                            divergence,
                            temperature,
                        )
                        .unwrap(),
                    );
                    assert!(
                        same.iter().all(|d| d.abs() < 1e-12),
                        "{divergence} scale {scale}: equal distributions gave {same:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn forward_kl_of_pq_is_reverse_kl_of_qp() {
        let mut rng = Rng(2);
        let p = rng.tensor((2, 5, 17), 3.0);
        let q = rng.tensor((2, 5, 17), 3.0);
        for temperature in [1.0, 0.5, 3.0] {
            let forward = per_token(
                &q,
                &TeacherSignal::dense(p.clone()),
                Divergence::ForwardKl,
                temperature,
            )
            .unwrap();
            let reverse = per_token(
                &p,
                &TeacherSignal::dense(q.clone()),
                Divergence::ReverseKl,
                temperature,
            )
            .unwrap();
            let diff = max_abs_diff(&values(&forward), &values(&reverse));
            assert!(diff < 1e-12, "T={temperature}: max_abs_diff {diff:.3e}");
        }
    }

    #[test]
    fn jsd_beta_limits() {
        let mut rng = Rng(3);
        let student = rng.tensor((2, 3, 11), 2.0);
        let teacher = TeacherSignal::dense(rng.tensor((2, 3, 11), 2.0));
        let eval = |divergence| values(&per_token(&student, &teacher, divergence, 1.0).unwrap());
        let forward = eval(Divergence::ForwardKl);
        let reverse = eval(Divergence::ReverseKl);
        // The special cases are exact.
        assert_eq!(eval(Divergence::Jsd { beta: 0.0 }), forward);
        assert_eq!(eval(Divergence::Jsd { beta: 1.0 }), reverse);
        assert_eq!(eval(Divergence::SkewForwardKl { alpha: 0.0 }), forward);
        assert_eq!(eval(Divergence::SkewReverseKl { alpha: 0.0 }), reverse);
        assert!(
            eval(Divergence::SkewForwardKl { alpha: 1.0 })
                .iter()
                .all(|d| *d == 0.0)
        );
        // Near the ends the formula behaves as β·FKL and (1 − β)·RKL (first order in β).
        let small = 1e-5;
        let near_zero = eval(Divergence::Jsd { beta: small });
        let near_one = eval(Divergence::Jsd { beta: 1.0 - small });
        for i in 0..forward.len() {
            let low = near_zero[i] / small;
            let high = near_one[i] / small;
            assert!(
                (low - forward[i]).abs() < 1e-3 * (1.0 + forward[i]),
                "{low} vs {}",
                forward[i]
            );
            assert!(
                (high - reverse[i]).abs() < 1e-3 * (1.0 + reverse[i]),
                "{high} vs {}",
                reverse[i]
            );
        }
        // And the formula vanishes at the ends (why TRL special-cases them).
        assert!(near_zero.iter().all(|d| *d < 1e-3));
    }

    #[test]
    fn masked_mean_ignores_masked_positions() {
        let mut rng = Rng(8);
        let student = rng.tensor((2, 3, 6), 1.0);
        let teacher = rng.tensor((2, 3, 6), 1.0);
        let mask = Tensor::new(&[[1f64, 0., 1.], [0., 1., 0.]], &Device::Cpu).unwrap();
        // Wild teacher logits at masked positions change nothing.
        let keep = mask
            .gt(0.0)
            .unwrap()
            .unsqueeze(2)
            .unwrap()
            .broadcast_as((2, 3, 6))
            .unwrap();
        let garbage = rng.tensor((2, 3, 6), 50.0);
        let noisy = keep.where_cond(&teacher, &garbage).unwrap();
        let eval = |t: &Tensor| {
            loss(
                &student,
                &TeacherSignal::dense(t.clone()),
                Divergence::ReverseKl,
                1.0,
                &mask,
            )
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
        };
        assert_eq!(eval(&teacher), eval(&noisy));
        // And it is the mean over the three selected positions.
        let per = values(
            &per_token(
                &student,
                &TeacherSignal::dense(teacher.clone()),
                Divergence::ReverseKl,
                1.0,
            )
            .unwrap(),
        );
        let expected = (per[0] + per[2] + per[4]) / 3.0;
        assert!((eval(&teacher) - expected).abs() < 1e-14);
        // Non-finite values at masked positions do not leak; an empty mask gives 0, not NaN.
        let with_nan = Tensor::new(
            &[[1f64, f64::NAN, 2.], [f64::INFINITY, 3., 0.]],
            &Device::Cpu,
        )
        .unwrap();
        let mean = masked_mean(&with_nan, &mask)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert_eq!(mean, 2.0);
        let empty = masked_mean(&with_nan.zeros_like().unwrap(), &mask.zeros_like().unwrap())
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert_eq!(empty, 0.0);
    }

    #[test]
    fn chunking_does_not_change_values_or_gradients() {
        let mut rng = Rng(9);
        let student = rng.tensor((3, 5, 9), 2.0);
        let teacher = rng.tensor((3, 5, 9), 2.0);
        for signal in [
            TeacherSignal::dense(teacher.clone()),
            top_k(&teacher, 4, MissingMass::Tail),
        ] {
            let run = |chunk: usize| {
                let leaf = Var::from_tensor(&student).unwrap();
                let per_token = per_token_chunked(
                    leaf.as_tensor(),
                    &signal,
                    Divergence::Jsd { beta: 0.3 },
                    1.3,
                    chunk,
                )
                .unwrap();
                let gradient = per_token.sum_all().unwrap().backward().unwrap();
                (
                    values(&per_token),
                    values(gradient.get(leaf.as_tensor()).unwrap()),
                )
            };
            let whole = run(1000);
            for chunk in [1, 4, 7] {
                let parts = run(chunk);
                assert!(max_abs_diff(&whole.0, &parts.0) < 1e-14);
                assert!(max_abs_diff(&whole.1, &parts.1) < 1e-14);
            }
        }
    }

    #[test]
    fn peaked_logits_stay_finite() {
        // ×60 logits: probabilities underflow to exactly 0; no 0·log 0 NaN in values or gradients.
        let mut rng = Rng(10);
        let student = rng.tensor((1, 4, 16), 60.0).to_dtype(DType::F32).unwrap();
        let teacher = rng.tensor((1, 4, 16), 60.0).to_dtype(DType::F32).unwrap();
        let identical = TeacherSignal::dense(student.clone());
        for signal in [
            TeacherSignal::dense(teacher.clone()),
            identical,
            top_k(&teacher, 3, MissingMass::Tail),
        ] {
            for divergence in all_divergences() {
                let leaf = Var::from_tensor(&student).unwrap();
                let per_token = per_token(leaf.as_tensor(), &signal, divergence, 1.0).unwrap();
                let gradient = per_token.sum_all().unwrap().backward().unwrap();
                let all = values(&per_token)
                    .into_iter()
                    .chain(values(gradient.get(leaf.as_tensor()).unwrap()));
                for x in all {
                    assert!(x.is_finite(), "{divergence}: non-finite {x}");
                }
            }
        }
    }

    #[test]
    fn names_parse_display_and_serde_round_trip() {
        for divergence in all_divergences() {
            let text = divergence.to_string();
            assert_eq!(text.parse::<Divergence>().unwrap(), divergence, "{text}");
            let json = serde_json::to_string(&divergence).unwrap();
            assert_eq!(
                serde_json::from_str::<Divergence>(&json).unwrap(),
                divergence
            );
        }
        assert_eq!(
            "jsd".parse::<Divergence>().unwrap(),
            Divergence::Jsd { beta: 0.5 }
        );
        assert_eq!(
            "skl".parse::<Divergence>().unwrap(),
            Divergence::SkewForwardKl { alpha: 0.1 }
        );
        assert_eq!(
            Divergence::from_name("srkl", None, Some(0.3)).unwrap(),
            Divergence::SkewReverseKl { alpha: 0.3 }
        );
        for bad in ["kl", "jsd:1.5", "jsd:x", "fkl:0.1", "skl:-0.1"] {
            assert!(bad.parse::<Divergence>().is_err(), "{bad} parsed");
        }
        assert!(Divergence::from_name("fkl", Some(0.5), None).is_err());
        assert!(Divergence::from_name("jsd", None, Some(0.5)).is_err());
        assert_eq!(Divergence::NAMES.len(), 6);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let device = Device::Cpu;
        let student = Tensor::zeros((1, 2, 5), DType::F32, &device).unwrap();
        let wrong_vocab =
            TeacherSignal::dense(Tensor::zeros((1, 2, 6), DType::F32, &device).unwrap());
        let error = per_token(&student, &wrong_vocab, Divergence::ForwardKl, 1.0).unwrap_err();
        assert!(error.to_string().contains("logits"), "{error}");
        let ids = Tensor::new(&[[[0u32, 5], [1, 2]]], &device).unwrap();
        let lp = Tensor::zeros((1, 2, 2), DType::F32, &device).unwrap();
        let out_of_range = TeacherSignal::sparse(ids, lp.clone());
        assert!(per_token(&student, &out_of_range, Divergence::ForwardKl, 1.0).is_err());
        let duplicate =
            TeacherSignal::sparse(Tensor::new(&[[[3u32, 3], [1, 2]]], &device).unwrap(), lp);
        let error = per_token(&student, &duplicate, Divergence::ForwardKl, 1.0).unwrap_err();
        assert!(error.to_string().contains("twice"), "{error}");
        let dense = TeacherSignal::dense(student.clone());
        assert!(per_token(&student, &dense, Divergence::Jsd { beta: 2.0 }, 1.0).is_err());
        assert!(per_token(&student, &dense, Divergence::ForwardKl, 0.0).is_err());
        let mask = Tensor::ones((2, 1), DType::F32, &device).unwrap();
        let per = per_token(&student, &dense, Divergence::ForwardKl, 1.0).unwrap();
        assert!(masked_mean(&per, &mask).is_err());
    }
}
