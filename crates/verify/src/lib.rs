//! Final-answer extraction and mathematical equivalence for model responses.
//!
//! [`verify`] answers one question: is the final answer of a model response equal to a dataset
//! gold? It extracts the answer ([`extract_answer`], fallback order in [`extract`]), reduces the
//! gold the same way (a plain answer, or the boxed answer of a full solution), and compares the
//! two with [`equivalent`]. Every policy is a field of [`VerifyOptions`]; its [`Default`] is the
//! recommended setting. A response without an answer gets a [`Reason`] (`no_answer`,
//! `truncated`); [`verify_finished`] also takes the generation's finish reason, so a response
//! cut at its token limit is not judged by the last number it happened to reach. The crate is pure (no I/O), never panics on any input, and bounds its
//! work (nesting depth, evaluation steps, answer length), so a pair takes microseconds.
//!
//! ```
//! use retort_verify::{verify, VerifyOptions};
//! let v = verify("So the total is $\\boxed{\\frac{1}{2}}$.", "0.5", &VerifyOptions::default());
//! assert!(v.correct);
//! assert_eq!(v.extracted.as_deref(), Some("\\frac{1}{2}"));
//! ```
//!
//! Modules: [`extract`] (response to answer string), [`normalize`] (answer string to tokens),
//! [`expr`] (tokens to trees), [`eval`] (exact and numeric evaluation), [`number`] (rationals,
//! complex),
//! [`equiv`] (tree comparison), [`units`] (quantities such as `3 hours`).

pub mod equiv;
pub mod eval;
pub mod expr;
pub mod extract;
pub mod normalize;
pub mod number;
pub mod units;

pub use equiv::equivalent;
pub use extract::{extract_answer, extract_final};

/// How a trailing `%` is compared with a plain number.
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PercentPolicy {
    /// `28%` equals both `28` and `0.28` (a percent question answered without the sign, or
    /// converted to a fraction). Recommended: golds and responses drop or keep `%` freely.
    #[default]
    Either,
    /// `28%` equals `0.28` only.
    Strict,
    /// `%` is ignored: `28%` equals `28` only.
    Ignore,
}

/// Verification policies. [`Default`] is the recommended policy.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifyOptions {
    /// Percent handling (default [`PercentPolicy::Either`]).
    pub percent: PercentPolicy,
    /// Relative tolerance for numbers; `None` (default) means exact: `1.414` is not `\sqrt{2}`
    /// and `0.33` is not `1/3`, while `0.5` is `1/2` (an exact decimal).
    pub float_tolerance: Option<f64>,
    /// A decimal written with at least this many significant digits is a machine-precision
    /// value (`0.0833333333333333` for `1/12`, `4.123105625617661` for `\sqrt{17}`) and matches
    /// to within its last digit. Default `Some(12)`; `None` disables.
    pub precise_decimal_digits: Option<u32>,
    /// Drop units after a value: `\text{cm}`, `miles`, `m^2`, `\mbox{ cm}^2` (default true).
    /// Currency signs (`$`, `\$`, `€`) are always dropped. A degree mark (`^\circ`, `°`) may be
    /// dropped (`90^\circ` equals `90`) or read as `π/180` (`60^\circ` equals `\frac{\pi}{3}`,
    /// `\sin 30^\circ` equals `\frac12`).
    pub strip_units: bool,
    /// Two answers that both carry a unit of the same dimension (time, length, mass, volume)
    /// compare as quantities: `3 \text{ hours}` equals `180 minutes` and not `3 minutes`
    /// (default true). A unit against a bare number is dropped and the numbers compare as
    /// written (`180 minutes` is not gold `3`): the bare number's unit is the question's.
    pub convert_units: bool,
    /// Highest multiple-choice letter: a gold that is a single letter `A`..=this (optionally
    /// `(B)`, `\text{B}`) is compared with the letter the response chose (default `'J'`).
    pub max_choice_letter: char,
    /// `e` is Euler's number (default true).
    pub e_is_euler: bool,
    /// `i` is the imaginary unit (default true).
    pub i_is_imaginary: bool,
    /// `3\frac{1}{2}`, `3 1/2` and `3½` are mixed numbers, 7/2 (default true).
    pub mixed_numbers: bool,
    /// `1,22` (digits, comma, digits, no space) compared with a single number reads as the
    /// decimal `1.22` (default true). `32, 349` (with a space) stays a two-element list;
    /// `1,234` is always the thousands-separated 1234.
    pub decimal_comma: bool,
    /// Points at which expressions with variables are evaluated (default 6).
    pub eval_points: u32,
    /// Seed of the deterministic point generator (default 0x5EED).
    pub seed: u64,
    /// Answers longer than this many bytes are compared as whitespace-normalised strings only
    /// (default 4096).
    pub max_answer_chars: usize,
    /// Parser nesting limit (default 100).
    pub max_depth: u32,
    /// Evaluation steps per expression and point (default 200,000); bounds sums and towers.
    pub eval_budget: u32,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self {
            percent: PercentPolicy::Either,
            float_tolerance: None,
            precise_decimal_digits: Some(12),
            strip_units: true,
            convert_units: true,
            max_choice_letter: 'J',
            e_is_euler: true,
            i_is_imaginary: true,
            mixed_numbers: true,
            decimal_comma: true,
            eval_points: 6,
            seed: 0x5EED,
            max_answer_chars: 4096,
            max_depth: 100,
            eval_budget: 200_000,
        }
    }
}

/// Why a response has no extracted answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The response ends without a final answer (empty, prose only, nothing after `</think>`).
    NoAnswer,
    /// The response was cut off: finish reason `length` without a completed answer, a `<think>`
    /// that never closes, or a long response that stops mid-sentence.
    Truncated,
}

impl Reason {
    /// The serialised name: `no_answer` or `truncated`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoAnswer => "no_answer",
            Self::Truncated => "truncated",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of verifying one response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The extracted answer equals the gold.
    pub correct: bool,
    /// The answer extracted from the response, if any.
    pub extracted: Option<String>,
    /// Why no answer was extracted; `None` when one was.
    pub reason: Option<Reason>,
}

/// Verifies a full model response against a dataset gold (a plain answer such as `42`,
/// `\frac{3}{4}`, `2\sqrt{3}`, a letter `B`, or a full solution with `\boxed{}`).
/// A response without a final answer (for example truncated mid-thought) is not correct.
/// [`verify_finished`] also takes the generation's finish reason.
pub fn verify(response: &str, gold: &str, opts: &VerifyOptions) -> Verdict {
    verify_finished(response, gold, None, opts)
}

/// [`verify`] for a response whose generation stopped for `finish_reason` (`"stop"`,
/// `"length"`, …; `None` when unknown). With `"length"` only an answer the model completed
/// counts (see [`extract`], step 4); otherwise the verdict is [`Reason::Truncated`].
pub fn verify_finished(
    response: &str,
    gold: &str,
    finish_reason: Option<&str>,
    opts: &VerifyOptions,
) -> Verdict {
    let hit_length = finish_reason.is_some_and(|r| r.eq_ignore_ascii_case("length"));
    let gold_answer = extract::gold_answer(gold);
    if let Some(letter) = extract::choice_letter(&gold_answer, opts.max_choice_letter) {
        if hit_length && let Err(reason) = extract::extract_final(response, true) {
            return Verdict::missing(reason);
        }
        return match extract::extract_choice(response, opts.max_choice_letter) {
            Some((c, s)) => Verdict {
                correct: c == letter,
                extracted: Some(s),
                reason: None,
            },
            None => Verdict::missing(Reason::NoAnswer),
        };
    }
    match extract::extract_final(response, hit_length) {
        Ok(pred) => Verdict {
            correct: equivalent(&gold_answer, &pred, opts),
            extracted: Some(pred),
            reason: None,
        },
        Err(reason) => Verdict::missing(reason),
    }
}

impl Verdict {
    fn missing(reason: Reason) -> Self {
        Self {
            correct: false,
            extracted: None,
            reason: Some(reason),
        }
    }
}
