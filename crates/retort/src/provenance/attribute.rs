//! Attribution: each action's mean token log-prob under one model ([`score_actions`]) and the
//! category that the three log-probs give ([`classify`]).
//!
//! **Scoring across tokenizers.** Each model scores the *whole* response once, in its own
//! tokenizer, given its own rendering of the prompt: `score(prompt_ids, encode(response))`. Every
//! response token is then assigned to the action that holds its first non-whitespace byte (the
//! tokenizer's byte offsets locate it; a token that is only whitespace goes by its first byte),
//! and an action's log-prob is the mean over its tokens. Compared with encoding `prompt+prefix`
//! and `prompt+prefix+action` per action, this costs one forward pass per (model, record)
//! instead of one per action, and it scores the exact token sequence the model would read, so
//! per-action values add up to the response's log-prob. The price is at boundaries: a token that
//! spans two actions (a BPE merge such as `.\n` across a sentence end) counts wholly toward the
//! action where it starts. Where the boundary tokenizes cleanly (`encode(prefix) +
//! encode(action)` equals `encode(prefix + action)`), the value equals the mean of scoring the
//! action's tokens after the prefix. An action with no token of its own has no log-prob (`null`).
//!
//! **Categories** ([`Thresholds`], two rules). An action's probability under a model is the
//! geometric mean of its token probabilities, `p = exp(mean token log-prob)`.
//!
//! [`Rule::Paper`] (the default) is the rule of "Where Did This Sentence Come From? Tracing
//! Provenance in LLM Reasoning Distillation" (2025) as a detailed summary of the paper gives it
//! (the paper's own text was not available to us): it compares the probabilities *between*
//! models, in this order, with `p_T`, `p_S`, `p_D` under the teacher, the base student and the
//! distilled student:
//! - `shared`: all three pairwise differences are at most `alpha` (default 0.1);
//! - `teacher`: `p_T - p_S > beta` (default 0.1, the paper's; it also tried 0.05 and 0.15);
//! - `student`: `p_S - p_T > beta`;
//! - `boosted`: otherwise (both models give it a similar probability, and distillation moved
//!   it away from them);
//! - `unattributed`: only for an action without a value (no token of its own, or non-finite).
//!
//! [`Rule::Confident`] (retort's earlier rule) asks each model alone whether it finds an action
//! *likely*: mean token log-prob at least `likely` (default `ln 0.5`):
//! - `teacher`: teacher likely, base student not;
//! - `student`: base likely, teacher not;
//! - `boosted`: both likely, and the distilled student's log-prob exceeds the base's by more than
//!   `boost_margin` nats per token (default 0.2);
//! - `shared`: both likely, not raised by distillation;
//! - `unattributed`: neither likely, or a log-prob is missing.

use serde::{Deserialize, Serialize};

use super::segment::Segment;
use crate::backend::scorer::{ScoreRequest, ScoreWants, TokenScorer};
use crate::error::{Error, Result};

/// Where an action came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// Likely under the teacher, unlikely under the base student.
    Teacher,
    /// Likely under the base student, unlikely under the teacher.
    Student,
    /// Likely under both, not raised by distillation.
    Shared,
    /// Likely under both and raised by distillation.
    Boosted,
    /// Likely under neither (or not scored).
    Unattributed,
}

impl Category {
    /// Every category, in report order.
    pub const ALL: [Self; 5] = [
        Self::Teacher,
        Self::Student,
        Self::Shared,
        Self::Boosted,
        Self::Unattributed,
    ];

    /// The name used in files (`teacher`, `student`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Teacher => "teacher",
            Self::Student => "student",
            Self::Shared => "shared",
            Self::Boosted => "boosted",
            Self::Unattributed => "unattributed",
        }
    }
}

/// Which categorisation rule (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// The paper's: probability differences between the models (`alpha`, `beta`).
    #[default]
    Paper,
    /// retort's earlier rule: each model's own confidence (`likely`, `boost_margin`).
    Confident,
}

/// Classification rule and thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Thresholds {
    /// The rule.
    pub rule: Rule,
    /// [`Rule::Paper`]: `shared` when every pairwise probability difference is at most this
    /// (default 0.1).
    pub alpha: f64,
    /// [`Rule::Paper`]: `teacher` when `p_T - p_S` exceeds this, `student` when `p_S - p_T`
    /// does (default 0.1).
    pub beta: f64,
    /// [`Rule::Confident`]: a model finds an action likely when its mean token log-prob is at
    /// least this (default `ln 0.5` ≈ -0.693).
    pub likely: f64,
    /// [`Rule::Confident`]: an action likely under both is `boosted` when `distilled - base`
    /// exceeds this (default 0.2).
    pub boost_margin: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            rule: Rule::Paper,
            alpha: 0.1,
            beta: 0.1,
            likely: 0.5f64.ln(),
            boost_margin: 0.2,
        }
    }
}

impl Thresholds {
    /// [`Rule::Confident`] with `likely` and `boost_margin`.
    pub fn confident(likely: f64, boost_margin: f64) -> Self {
        Self {
            rule: Rule::Confident,
            likely,
            boost_margin,
            ..Self::default()
        }
    }
}

/// An action's mean token log-prob under the three models (`None`: it has no token).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct ActionLogprobs {
    /// Under the teacher.
    pub teacher: Option<f64>,
    /// Under the base (original) student.
    pub base: Option<f64>,
    /// Under the distilled student.
    pub distilled: Option<f64>,
}

/// The category of an action with log-probs `lp` (see the module docs).
pub fn classify(lp: &ActionLogprobs, thresholds: &Thresholds) -> Category {
    match thresholds.rule {
        Rule::Paper => classify_paper(lp, thresholds.alpha, thresholds.beta),
        Rule::Confident => classify_confident(lp, thresholds),
    }
}

/// [`Rule::Paper`] on geometric-mean token probabilities.
fn classify_paper(lp: &ActionLogprobs, alpha: f64, beta: f64) -> Category {
    let probability = |x: Option<f64>| x.map(f64::exp).filter(|p| p.is_finite());
    let (Some(t), Some(s), Some(d)) = (
        probability(lp.teacher),
        probability(lp.base),
        probability(lp.distilled),
    ) else {
        return Category::Unattributed;
    };
    if (t - s).abs() <= alpha && (t - d).abs() <= alpha && (s - d).abs() <= alpha {
        Category::Shared
    } else if t - s > beta {
        Category::Teacher
    } else if s - t > beta {
        Category::Student
    } else {
        Category::Boosted
    }
}

/// [`Rule::Confident`]: each model's own confidence.
fn classify_confident(lp: &ActionLogprobs, thresholds: &Thresholds) -> Category {
    let (Some(teacher), Some(base)) = (lp.teacher, lp.base) else {
        return Category::Unattributed;
    };
    let likely = |x: f64| x.is_finite() && x >= thresholds.likely;
    match (likely(teacher), likely(base)) {
        (true, false) => Category::Teacher,
        (false, true) => Category::Student,
        (false, false) => Category::Unattributed,
        (true, true) => match lp.distilled {
            Some(distilled) if distilled - base > thresholds.boost_margin => Category::Boosted,
            _ => Category::Shared,
        },
    }
}

/// One action of a traced response, as written to the provenance file (DESIGN.md §3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Action {
    /// The action's text: exactly `response[start..end]` (whitespace before it included).
    pub text: String,
    /// First byte in the response.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
    /// Mean token log-probs under the three models.
    pub logprob: ActionLogprobs,
    /// The category.
    pub category: Category,
}

/// The segment index of every token: the segment holding the token's first non-whitespace byte
/// (its first byte when it is all whitespace). `offsets` are byte ranges into `text`.
pub fn assign_tokens(text: &str, offsets: &[(usize, usize)], segments: &[Segment]) -> Vec<usize> {
    offsets
        .iter()
        .map(|&(start, end)| {
            let span = text.get(start..end.max(start)).unwrap_or("");
            let lead = span.len() - span.trim_start().len();
            let position = if lead < span.len() {
                start + lead
            } else {
                start
            };
            segments
                .partition_point(|s| s.start <= position)
                .saturating_sub(1)
        })
        .collect()
}

/// The mean log-prob of each segment's tokens (`None` for a segment without tokens).
pub fn segment_means(
    token_logprobs: &[f32],
    assignment: &[usize],
    segments: usize,
) -> Vec<Option<f64>> {
    let mut sums = vec![0.0f64; segments];
    let mut counts = vec![0usize; segments];
    for (&lp, &segment) in token_logprobs.iter().zip(assignment) {
        if let Some(sum) = sums.get_mut(segment) {
            *sum += f64::from(lp);
            counts[segment] += 1;
        }
    }
    sums.into_iter()
        .zip(counts)
        .map(|(sum, n)| (n > 0).then(|| sum / n as f64))
        .collect()
}

/// One response to score: the prompt's token ids in the scoring model's vocabulary, the response
/// text and its actions.
#[derive(Debug, Clone)]
pub struct ScoreItem<'a> {
    /// Names the record in errors (e.g. `line 4`).
    pub label: String,
    /// Prompt token ids (at least one).
    pub prompt_ids: Vec<u32>,
    /// The response text.
    pub response: &'a str,
    /// The response's actions.
    pub segments: &'a [Segment],
}

/// Mean token log-prob of every action of every item under `scorer` (a local model or a
/// server), scoring each whole response once.
pub fn score_actions(
    scorer: &dyn TokenScorer,
    items: &[ScoreItem<'_>],
) -> Result<Vec<Vec<Option<f64>>>> {
    let tokenizer = scorer.tokenizer().inner();
    let mut requests = Vec::with_capacity(items.len());
    let mut assignments = Vec::with_capacity(items.len());
    for item in items {
        if item.prompt_ids.is_empty() {
            return Err(Error::Invalid(format!(
                "model `{}`, {}: the prompt is empty; scoring needs at least one prompt token",
                scorer.name(),
                item.label
            )));
        }
        let encoding = tokenizer
            .encode(item.response, false)
            .map_err(|e| Error::Backend {
                backend: scorer.name().to_string(),
                message: format!("{}: cannot encode a response: {e}", item.label),
            })?;
        assignments.push(assign_tokens(
            item.response,
            encoding.get_offsets(),
            item.segments,
        ));
        requests.push(ScoreRequest {
            label: item.label.clone(),
            prompt_ids: item.prompt_ids.clone(),
            completion_ids: encoding.get_ids().to_vec(),
        });
    }
    let scores = scorer.score_ids(&requests, ScoreWants::default())?;
    Ok(scores
        .iter()
        .zip(&assignments)
        .zip(items)
        .map(|((s, assignment), item)| segment_means(&s.logprobs, assignment, item.segments.len()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lp(teacher: f64, base: f64, distilled: f64) -> ActionLogprobs {
        ActionLogprobs {
            teacher: Some(teacher),
            base: Some(base),
            distilled: Some(distilled),
        }
    }

    fn p(teacher: f64, base: f64, distilled: f64) -> ActionLogprobs {
        lp(teacher.ln(), base.ln(), distilled.ln())
    }

    #[test]
    fn the_papers_rule_compares_probabilities_between_models_in_order() {
        let t = Thresholds::default();
        assert_eq!(t.rule, Rule::Paper);
        assert_eq!(classify(&p(0.9, 0.85, 0.95), &t), Category::Shared);
        assert_eq!(classify(&p(0.9, 0.5, 0.9), &t), Category::Teacher);
        assert_eq!(classify(&p(0.3, 0.8, 0.7), &t), Category::Student);
        // Teacher and base agree, distillation raised it: boosted.
        assert_eq!(classify(&p(0.4, 0.35, 0.9), &t), Category::Boosted);
        // Shared comes first: a pair within alpha is shared even when another rule would fire.
        assert_eq!(classify(&p(0.5, 0.4, 0.45), &t), Category::Shared);
        // Strict beta: a difference of exactly beta is not teacher-originated.
        let exact = Thresholds {
            alpha: 0.05,
            beta: 0.25,
            ..Thresholds::default()
        };
        assert_eq!(classify(&p(0.75, 0.5, 0.9), &exact), Category::Boosted);
        assert_eq!(classify(&p(0.76, 0.5, 0.9), &exact), Category::Teacher);
        // Unattributed only without a value.
        let missing = ActionLogprobs {
            distilled: None,
            ..p(0.9, 0.9, 0.9)
        };
        assert_eq!(classify(&missing, &t), Category::Unattributed);
        assert_eq!(
            classify(&lp(f64::NAN, -0.1, -0.1), &t),
            Category::Unattributed
        );
        // Improbable under every model: still a category (shared), not unattributed.
        assert_eq!(classify(&p(0.01, 0.02, 0.01), &t), Category::Shared);
    }

    #[test]
    fn categories_from_constructed_triples() {
        let t = Thresholds::confident(-1.0, 0.2);
        assert_eq!(classify(&lp(-0.1, -3.0, -0.5), &t), Category::Teacher);
        assert_eq!(classify(&lp(-3.0, -0.1, -0.1), &t), Category::Student);
        assert_eq!(classify(&lp(-0.5, -0.9, -0.8), &t), Category::Shared);
        assert_eq!(classify(&lp(-0.5, -0.9, -0.5), &t), Category::Boosted);
        assert_eq!(classify(&lp(-2.0, -3.0, -0.1), &t), Category::Unattributed);
        // Thresholds are inclusive for "likely" and strict for the boost margin.
        assert_eq!(classify(&lp(-1.0, -1.0, -0.8), &t), Category::Shared);
        assert_eq!(classify(&lp(-1.0, -1.0, -0.7), &t), Category::Boosted);
        assert_eq!(classify(&lp(-1.0, -1.0001, -0.7), &t), Category::Teacher);
        // Distilled equal to base is never boosted, even with a zero margin.
        let zero = Thresholds::confident(-1.0, 0.0);
        assert_eq!(classify(&lp(-0.5, -0.5, -0.5), &zero), Category::Shared);
        // Missing or non-finite values.
        let missing = ActionLogprobs {
            teacher: None,
            base: Some(-0.1),
            distilled: Some(-0.1),
        };
        assert_eq!(classify(&missing, &t), Category::Unattributed);
        assert_eq!(classify(&lp(f64::NAN, -0.1, -0.1), &t), Category::Student);
        assert_eq!(
            classify(&lp(-0.1, f64::NEG_INFINITY, -0.1), &t),
            Category::Teacher
        );
        let no_distilled = ActionLogprobs {
            teacher: Some(-0.1),
            base: Some(-0.1),
            distilled: None,
        };
        assert_eq!(classify(&no_distilled, &t), Category::Shared);
    }

    #[test]
    fn default_confident_thresholds() {
        let t = Thresholds {
            rule: Rule::Confident,
            ..Thresholds::default()
        };
        assert!((t.likely - (-std::f64::consts::LN_2)).abs() < 1e-12);
        assert_eq!(classify(&lp(-0.6, -0.8, -0.8), &t), Category::Teacher);
        assert_eq!(classify(&lp(-0.6, -0.6, -0.35), &t), Category::Boosted);
        assert_eq!(classify(&lp(-0.6, -0.6, -0.45), &t), Category::Shared);
    }

    #[test]
    fn tokens_go_to_the_action_of_their_first_visible_byte() {
        let text = "Ab. Cd.\nEf";
        let segments = [
            Segment { start: 0, end: 3 },
            Segment { start: 3, end: 7 },
            Segment { start: 7, end: 10 },
        ];
        // "Ab" "." " Cd" ".\n" (spans a boundary) "Ef"; and a whitespace-only token " " at 3.
        let offsets = [(0, 2), (2, 3), (3, 6), (6, 8), (8, 10), (3, 4)];
        assert_eq!(assign_tokens(text, &offsets, &segments), [0, 0, 1, 1, 2, 1]);
        let means = segment_means(&[-1.0, -3.0, -2.0, -4.0, -0.5, 0.0], &[0, 0, 1, 1, 2, 1], 4);
        assert_eq!(means, [Some(-2.0), Some(-2.0), Some(-0.5), None]);
    }
}
