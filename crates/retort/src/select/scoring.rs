//! Model scores for selection: the [`Scorer`] seam (per-token log-probs, byte offsets and
//! optionally ranks of a response under the student or the teacher), its implementation over the
//! [`TokenScorer`] seam [`ModelScorer`] (local models or servers alike), and the three scores
//! built on it:
//!
//! - **student perplexity**: `exp(-mean token log-prob)` of the response under the student;
//! - **Rank-Surprisal Ratio** (Yang et al., 2026): mean token rank over mean surprisal
//!   (`-log p`) under the student, ranks counted from 1 and capped at `rank_cap` so one absurd
//!   token cannot dominate; lower is better (tokens the student ranks high yet finds surprising);
//! - **teacher-guided** ([`TeacherGuided`]): the response is cut into sentences, and each
//!   sentence's probability under a model is the geometric mean of its token probabilities,
//!   `p = exp(mean token log-prob)`. The paper's score ("Where Did This Sentence Come From?",
//!   2025, as a detailed summary gives it) counts the sentences with `p_teacher - p_student >
//!   beta` (default 0.1): teacher-originated sentences, what distillation can still teach; the
//!   selection keeps, per problem, the response with the most of them. Variants for its
//!   ablation: that count over the number of sentences (`proportion`), the fewest (`min`), and
//!   retort's earlier score, the mean over sentences of the log-prob gap (`mean`). Each model
//!   scores the same text with its own tokenizer, so the two may differ in vocabulary. Sentences
//!   are the provenance segmenter's actions, so selection and `retort trace` cut alike.

use crate::backend::Prompt;
use crate::backend::scorer::{ScoreRequest, ScoreWants, TokenScorer};
use crate::error::{Error, Result};

/// Which model scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelRole {
    /// The student being trained.
    Student,
    /// The teacher.
    Teacher,
}

/// One response to score.
#[derive(Debug, Clone, Copy)]
pub struct ScoreInput<'a> {
    /// The prompt it answers.
    pub prompt: &'a Prompt,
    /// The response text.
    pub response: &'a str,
    /// The record's line in the input, for error messages.
    pub line: usize,
}

/// Per-token scores of one response.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenScores {
    /// Log-prob of each response token given the prompt and the tokens before it.
    pub logprobs: Vec<f32>,
    /// Byte range of each token in the response.
    pub offsets: Vec<(usize, usize)>,
    /// 1-based rank of each token among the vocabulary (empty unless asked for).
    pub ranks: Vec<u32>,
}

/// Something that scores responses under the student and, optionally, the teacher.
pub trait Scorer {
    /// Whether a model for `role` is available.
    fn has(&self, role: ModelRole) -> bool;
    /// Scores every item under the `role` model; `ranks` asks for token ranks too.
    fn score(
        &self,
        role: ModelRole,
        items: &[ScoreInput<'_>],
        ranks: bool,
    ) -> Result<Vec<TokenScores>>;
}

/// Scores with a [`TokenScorer`] per role (local models or servers), `batch_size` responses per
/// call (a local model runs them as one forward pass; a server gets them concurrently).
pub struct ModelScorer<'a> {
    /// The student.
    pub student: Option<&'a dyn TokenScorer>,
    /// The teacher.
    pub teacher: Option<&'a dyn TokenScorer>,
    /// Responses per call.
    pub batch_size: usize,
}

/// The former name of [`ModelScorer`], from when only local models scored.
pub type LocalScorer<'a> = ModelScorer<'a>;

impl Scorer for ModelScorer<'_> {
    fn has(&self, role: ModelRole) -> bool {
        match role {
            ModelRole::Student => self.student.is_some(),
            ModelRole::Teacher => self.teacher.is_some(),
        }
    }

    fn score(
        &self,
        role: ModelRole,
        items: &[ScoreInput<'_>],
        ranks: bool,
    ) -> Result<Vec<TokenScores>> {
        let scorer = match role {
            ModelRole::Student => self.student,
            ModelRole::Teacher => self.teacher,
        }
        .ok_or_else(|| {
            Error::Invalid(format!(
                "selection needs a {role:?} model; give `--{}`",
                role_flag(role)
            ))
        })?;
        let mut out = Vec::with_capacity(items.len());
        for chunk in items.chunks(self.batch_size.max(1)) {
            out.extend(score_chunk(scorer, chunk, ranks)?);
        }
        Ok(out)
    }
}

fn role_flag(role: ModelRole) -> &'static str {
    match role {
        ModelRole::Student => "student",
        ModelRole::Teacher => "teacher",
    }
}

/// Tokenises `items` with the scorer's tokenizer (keeping byte offsets) and scores them.
fn score_chunk(
    scorer: &dyn TokenScorer,
    items: &[ScoreInput<'_>],
    ranks: bool,
) -> Result<Vec<TokenScores>> {
    let mut requests = Vec::with_capacity(items.len());
    let mut offsets = Vec::with_capacity(items.len());
    for item in items {
        let prompt_ids = scorer.prompt_ids(item.prompt)?;
        if prompt_ids.is_empty() {
            return Err(Error::Invalid(format!(
                "model `{}`, line {}: the prompt is empty after tokenization",
                scorer.name(),
                item.line
            )));
        }
        let encoding = scorer
            .tokenizer()
            .inner()
            .encode(item.response, false)
            .map_err(|e| Error::Backend {
                backend: scorer.name().to_string(),
                message: format!("line {}: cannot encode a response: {e}", item.line),
            })?;
        offsets.push(encoding.get_offsets().to_vec());
        requests.push(ScoreRequest {
            label: format!("line {}", item.line),
            prompt_ids,
            completion_ids: encoding.get_ids().to_vec(),
        });
    }
    let wants = ScoreWants { top_k: 0, ranks };
    let scores = scorer.score_ids(&requests, wants)?;
    Ok(scores
        .into_iter()
        .zip(offsets)
        .map(|(s, offsets)| TokenScores {
            logprobs: s.logprobs,
            offsets,
            ranks: s.ranks,
        })
        .collect())
}

/// Student perplexity: `exp(-mean log-prob)`; `None` without tokens.
pub fn perplexity(scores: &TokenScores) -> Option<f64> {
    mean(scores.logprobs.iter().map(|&x| f64::from(x))).map(|m| (-m).exp())
}

/// Rank-Surprisal Ratio: mean rank (capped at `rank_cap`) over mean surprisal; `None` without
/// tokens or ranks. A zero mean surprisal (every token certain) gives infinity.
pub fn rank_surprisal_ratio(scores: &TokenScores, rank_cap: u32) -> Option<f64> {
    if scores.ranks.is_empty() || scores.ranks.len() != scores.logprobs.len() {
        return None;
    }
    let rank = mean(
        scores
            .ranks
            .iter()
            .map(|&r| f64::from(r.min(rank_cap.max(1)))),
    )?;
    let surprisal = mean(scores.logprobs.iter().map(|&x| -f64::from(x)))?;
    Some(if surprisal > 0.0 {
        rank / surprisal
    } else {
        f64::INFINITY
    })
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// Sentences of `text` as byte ranges covering it end to end: the provenance segmenter's actions
/// ([`crate::provenance::segment()`]), which keep decimals, abbreviations and LaTeX whole.
pub fn sentences(text: &str) -> Vec<(usize, usize)> {
    crate::provenance::segment(text)
        .into_iter()
        .map(|s| (s.start, s.end))
        .collect()
}

/// Mean log-prob of the tokens of each sentence: a token belongs to the sentence holding its first
/// non-whitespace byte. Sentences without tokens get `None`.
pub fn sentence_means(
    text: &str,
    scores: &TokenScores,
    sentences: &[(usize, usize)],
) -> Vec<Option<f64>> {
    let mut sums = vec![0.0f64; sentences.len()];
    let mut counts = vec![0usize; sentences.len()];
    for (&(start, end), &lp) in scores.offsets.iter().zip(&scores.logprobs) {
        let span = text.get(start..end.max(start)).unwrap_or("");
        let lead = span.len() - span.trim_start().len();
        let position = if lead < span.len() {
            start + lead
        } else {
            start
        };
        let index = sentences
            .partition_point(|s| s.0 <= position)
            .saturating_sub(1);
        if let Some(sum) = sums.get_mut(index) {
            *sum += f64::from(lp);
            counts[index] += 1;
        }
    }
    sums.into_iter()
        .zip(counts)
        .map(|(s, n)| (n > 0).then(|| s / n as f64))
        .collect()
}

/// How a teacher-guided score is formed from the sentences of a response (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TeacherGuided {
    /// Sentences with `p_teacher - p_student > beta` (the paper's; most first).
    Count,
    /// That count over the sentences scored by both models.
    Proportion,
    /// Mean over sentences of teacher minus student mean token log-prob.
    Mean,
}

/// The teacher-guided score of one response under `kind` (`beta` for the count and the
/// proportion); `None` when no sentence is scored by both models.
pub fn teacher_guided(
    text: &str,
    teacher: &TokenScores,
    student: &TokenScores,
    kind: TeacherGuided,
    beta: f64,
) -> Option<f64> {
    let cuts = sentences(text);
    let t = sentence_means(text, teacher, &cuts);
    let s = sentence_means(text, student, &cuts);
    let pairs: Vec<(f64, f64)> = t
        .iter()
        .zip(&s)
        .filter_map(|(t, s)| Some(((*t)?, (*s)?)))
        .collect();
    if pairs.is_empty() {
        return None;
    }
    let teacher_originated = pairs
        .iter()
        .filter(|(t, s)| t.exp() - s.exp() > beta)
        .count() as f64;
    match kind {
        TeacherGuided::Count => Some(teacher_originated),
        TeacherGuided::Proportion => Some(teacher_originated / pairs.len() as f64),
        TeacherGuided::Mean => mean(pairs.iter().map(|(t, s)| t - s)),
    }
}

/// [`TeacherGuided::Mean`]: the mean over sentences (scored by both models) of the sentence's
/// mean teacher log-prob minus its mean student log-prob.
pub fn teacher_guided_score(
    text: &str,
    teacher: &TokenScores,
    student: &TokenScores,
) -> Option<f64> {
    teacher_guided(text, teacher, student, TeacherGuided::Mean, 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentence_cuts_keep_decimals_and_cover_the_text() {
        let text = "x = 3.5 here. Then y!\nDone.";
        let cuts = sentences(text);
        let parts: Vec<&str> = cuts.iter().map(|&(a, b)| &text[a..b]).collect();
        assert_eq!(parts, ["x = 3.5 here.", " Then y!", "\nDone."]);
    }

    #[test]
    fn scores_from_constructed_tokens() {
        let text = "Ab. Cd.";
        let teacher = TokenScores {
            logprobs: vec![-1.0, -1.0, -2.0],
            offsets: vec![(0, 3), (3, 6), (6, 7)],
            ranks: vec![],
        };
        let student = TokenScores {
            logprobs: vec![-2.0, -3.0],
            offsets: vec![(0, 3), (3, 7)],
            ranks: vec![1, 3],
        };
        // Sentences "Ab." and " Cd.": teacher means -1, -1.5; student -2, -3 → diffs 1, 1.5.
        assert_eq!(teacher_guided_score(text, &teacher, &student), Some(1.25));
        // Probabilities: teacher e^-1 = 0.368, e^-1.5 = 0.223; student 0.135, 0.050: gaps 0.233
        // and 0.173.
        let count = |beta| teacher_guided(text, &teacher, &student, TeacherGuided::Count, beta);
        assert_eq!(count(0.1), Some(2.0));
        assert_eq!(count(0.2), Some(1.0));
        assert_eq!(count(0.3), Some(0.0));
        let share = teacher_guided(text, &teacher, &student, TeacherGuided::Proportion, 0.2);
        assert_eq!(share, Some(0.5));
        assert!((perplexity(&student).unwrap() - 2.5f64.exp()).abs() < 1e-12);
        assert_eq!(rank_surprisal_ratio(&student, 100), Some(2.0 / 2.5));
        assert_eq!(rank_surprisal_ratio(&student, 2), Some(1.5 / 2.5));
        assert_eq!(rank_surprisal_ratio(&teacher, 100), None);
    }
}
