//! The trace stage: sentence-level provenance of responses (DESIGN.md §5, "Where Did This
//! Sentence Come From?", 2025). Each response is cut into actions ([`segment::segment`]); each
//! action gets its mean token log-prob under the teacher, the base student and the distilled
//! student in the same context ([`attribute::score_actions`]) and a [`Category`]
//! ([`attribute::classify`]). [`trace`] writes every input record with `"actions"` added
//! (DESIGN.md §3) and returns a [`TraceSummary`]: the share of each category, and the share of
//! teacher-originated actions in correct and incorrect responses when records carry a `verdict`.
//! [`summarize_provenance`] recomputes that summary from a provenance file's records.

pub mod attribute;
pub mod segment;

use std::io::Write;
use std::path::PathBuf;

use serde::Serialize;
use serde_json::{Map, Value};

pub use attribute::{Action, ActionLogprobs, Category, Rule, Thresholds, classify};
pub use segment::{Segment, segment};

use crate::backend::scorer::TokenScorer;
use crate::error::{Error, Result};
use crate::io::read::kind;
use crate::io::{AtomicFile, RecordReader};
use crate::records::{InputFormat, problem_from_record};
use attribute::{ScoreItem, score_actions};

/// Options of the trace stage.
#[derive(Debug, Clone)]
pub struct TraceOptions {
    /// Input records: a prompt (any shape [`problem_from_record`] reads) and a response.
    pub input: PathBuf,
    /// Output JSONL: each input record with `actions` added (written atomically).
    pub output: PathBuf,
    /// Input shape (auto-detected by default).
    pub format: InputFormat,
    /// Field holding the response text (default `response`).
    pub response_field: String,
    /// Classification thresholds.
    pub thresholds: Thresholds,
    /// Records scored together in one forward pass per model.
    pub batch_size: usize,
}

impl TraceOptions {
    /// Default options for `input` → `output`.
    pub fn new(input: impl Into<PathBuf>, output: impl Into<PathBuf>) -> Self {
        Self {
            input: input.into(),
            output: output.into(),
            format: InputFormat::Auto,
            response_field: "response".into(),
            thresholds: Thresholds::default(),
            batch_size: 4,
        }
    }
}

/// Action counts per category.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CategoryCounts {
    /// Teacher-originated actions.
    pub teacher: usize,
    /// Student-originated actions.
    pub student: usize,
    /// Shared actions.
    pub shared: usize,
    /// Boosted actions.
    pub boosted: usize,
    /// Unattributed actions.
    pub unattributed: usize,
}

impl CategoryCounts {
    /// Counts one action.
    pub fn add(&mut self, category: Category) {
        *self.get_mut(category) += 1;
    }

    /// The count of `category`.
    pub fn get(&self, category: Category) -> usize {
        match category {
            Category::Teacher => self.teacher,
            Category::Student => self.student,
            Category::Shared => self.shared,
            Category::Boosted => self.boosted,
            Category::Unattributed => self.unattributed,
        }
    }

    fn get_mut(&mut self, category: Category) -> &mut usize {
        match category {
            Category::Teacher => &mut self.teacher,
            Category::Student => &mut self.student,
            Category::Shared => &mut self.shared,
            Category::Boosted => &mut self.boosted,
            Category::Unattributed => &mut self.unattributed,
        }
    }

    /// All actions counted.
    pub fn total(&self) -> usize {
        Category::ALL.iter().map(|&c| self.get(c)).sum()
    }

    /// The fraction of actions in `category` (`None` when there are none).
    pub fn share(&self, category: Category) -> Option<f64> {
        let total = self.total();
        (total > 0).then(|| self.get(category) as f64 / total as f64)
    }
}

/// Actions of the responses with one verdict.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct VerdictGroup {
    /// Responses with this verdict.
    pub records: usize,
    /// Their actions per category.
    pub counts: CategoryCounts,
    /// Teacher-originated actions over all their actions (pooled over actions).
    pub teacher_share: Option<f64>,
}

/// Mean over actions of each model's mean token log-prob.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct MeanLogprobs {
    /// Under the teacher.
    pub teacher: Option<f64>,
    /// Under the base student.
    pub base: Option<f64>,
    /// Under the distilled student.
    pub distilled: Option<f64>,
}

/// What a trace run found.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TraceSummary {
    /// Records traced.
    pub records: usize,
    /// Actions over all records.
    pub actions: usize,
    /// Actions per category.
    pub counts: CategoryCounts,
    /// Share of each category (`teacher`, `student`, `shared`, `boosted`, `unattributed`).
    pub shares: std::collections::BTreeMap<String, f64>,
    /// Responses whose `verdict.correct` is true.
    pub correct: VerdictGroup,
    /// Responses whose `verdict.correct` is false.
    pub incorrect: VerdictGroup,
    /// Records without a `verdict`.
    pub no_verdict: usize,
    /// Mean action log-prob per model.
    pub mean_logprob: MeanLogprobs,
    /// Actions per category by relative position in their response, in [`POSITION_BUCKETS`]
    /// equal buckets (an action's position: its index over the response's action count), for
    /// correct and incorrect responses apart, as the paper plots them.
    pub by_position: PositionCounts,
    /// The thresholds used.
    pub thresholds: Thresholds,
}

/// Buckets of relative position in [`TraceSummary::by_position`].
pub const POSITION_BUCKETS: usize = 10;

/// Category counts per position bucket (first bucket: the start of the responses).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PositionCounts {
    /// Every traced response.
    pub all: Vec<CategoryCounts>,
    /// Responses whose `verdict.correct` is true.
    pub correct: Vec<CategoryCounts>,
    /// Responses whose `verdict.correct` is false.
    pub incorrect: Vec<CategoryCounts>,
}

impl PositionCounts {
    fn new() -> Self {
        let empty = vec![CategoryCounts::default(); POSITION_BUCKETS];
        Self {
            all: empty.clone(),
            correct: empty.clone(),
            incorrect: empty,
        }
    }

    fn add(&mut self, actions: &[Action], correct: Option<bool>) {
        for (index, action) in actions.iter().enumerate() {
            let bucket = index * POSITION_BUCKETS / actions.len();
            self.all[bucket].add(action.category);
            match correct {
                Some(true) => self.correct[bucket].add(action.category),
                Some(false) => self.incorrect[bucket].add(action.category),
                None => {}
            }
        }
    }
}

/// Accumulates a [`TraceSummary`] record by record.
#[derive(Debug, Default)]
struct SummaryBuilder {
    summary: TraceSummary,
    sums: [(f64, usize); 3],
}

impl SummaryBuilder {
    fn new(thresholds: Thresholds) -> Self {
        Self {
            summary: TraceSummary {
                thresholds,
                by_position: PositionCounts::new(),
                ..TraceSummary::default()
            },
            sums: [(0.0, 0); 3],
        }
    }

    fn add(&mut self, actions: &[Action], correct: Option<bool>) {
        let s = &mut self.summary;
        s.records += 1;
        s.actions += actions.len();
        s.by_position.add(actions, correct);
        let group = match correct {
            Some(true) => Some(&mut s.correct),
            Some(false) => Some(&mut s.incorrect),
            None => {
                s.no_verdict += 1;
                None
            }
        };
        if let Some(group) = group {
            group.records += 1;
            for action in actions {
                group.counts.add(action.category);
            }
        }
        for action in actions {
            s.counts.add(action.category);
            let values = [
                action.logprob.teacher,
                action.logprob.base,
                action.logprob.distilled,
            ];
            for (sum, value) in self.sums.iter_mut().zip(values) {
                if let Some(v) = value.filter(|v| v.is_finite()) {
                    sum.0 += v;
                    sum.1 += 1;
                }
            }
        }
    }

    fn finish(mut self) -> TraceSummary {
        let s = &mut self.summary;
        for category in Category::ALL {
            s.shares.insert(
                category.as_str().into(),
                s.counts.share(category).unwrap_or(0.0),
            );
        }
        s.correct.teacher_share = s.correct.counts.share(Category::Teacher);
        s.incorrect.teacher_share = s.incorrect.counts.share(Category::Teacher);
        let mean = |(sum, n): (f64, usize)| (n > 0).then(|| sum / n as f64);
        s.mean_logprob = MeanLogprobs {
            teacher: mean(self.sums[0]),
            base: mean(self.sums[1]),
            distilled: mean(self.sums[2]),
        };
        self.summary
    }
}

/// `verdict.correct` of a record, when present.
fn verdict_of(record: &Map<String, Value>) -> Option<bool> {
    record.get("verdict")?.get("correct")?.as_bool()
}

/// One record read for tracing.
struct Pending {
    line: usize,
    record: Map<String, Value>,
    prompt: crate::backend::Prompt,
    response: String,
    segments: Vec<Segment>,
}

/// Runs the trace stage: `teacher`, `base` and `distilled` each score every response with their
/// own tokenizer and chat template, each a local model or a server. `progress(done, total)` is
/// called after each batch.
pub fn trace(
    teacher: &dyn TokenScorer,
    base: &dyn TokenScorer,
    distilled: &dyn TokenScorer,
    options: &TraceOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<TraceSummary> {
    let t = options.thresholds;
    if ![t.likely, t.boost_margin, t.alpha, t.beta]
        .iter()
        .all(|v| v.is_finite())
        || t.alpha < 0.0
        || t.beta < 0.0
    {
        return Err(Error::Invalid(format!(
            "thresholds must be finite numbers (alpha and beta at least 0), got `alpha` {}, \
             `beta` {}, `likely` {} and `boost_margin` {}",
            t.alpha, t.beta, t.likely, t.boost_margin
        )));
    }
    let mut pending = Vec::new();
    for item in RecordReader::open(&options.input)? {
        let (line, record) = item?;
        let problem = problem_from_record(&record, options.format, &options.input, line)?;
        let response = match record.get(&options.response_field) {
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(Error::Input {
                    path: options.input.clone(),
                    line,
                    message: format!(
                        "field `{}`: expected a string, got {}",
                        options.response_field,
                        kind(other)
                    ),
                });
            }
            None => {
                return Err(Error::Input {
                    path: options.input.clone(),
                    line,
                    message: format!("missing field `{}`", options.response_field),
                });
            }
        };
        let segments = segment(&response);
        pending.push(Pending {
            line,
            record,
            prompt: problem.prompt,
            response,
            segments,
        });
    }
    let total = pending.len();
    let mut out = AtomicFile::create(&options.output)?;
    let mut builder = SummaryBuilder::new(options.thresholds);
    progress(0, total);
    let mut done = 0;
    for batch in pending.chunks_mut(options.batch_size.max(1)) {
        let score = |backend: &dyn TokenScorer| -> Result<Vec<Vec<Option<f64>>>> {
            let items = batch
                .iter()
                .map(|p| {
                    Ok(ScoreItem {
                        label: format!("line {}", p.line),
                        prompt_ids: backend.prompt_ids(&p.prompt)?,
                        response: &p.response,
                        segments: &p.segments,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            score_actions(backend, &items)
        };
        let teacher_lp = score(teacher)?;
        // The same model passed twice is scored once.
        let base_lp = if std::ptr::addr_eq(base, teacher) {
            teacher_lp.clone()
        } else {
            score(base)?
        };
        let distilled_lp = if std::ptr::addr_eq(distilled, teacher) {
            teacher_lp.clone()
        } else if std::ptr::addr_eq(distilled, base) {
            base_lp.clone()
        } else {
            score(distilled)?
        };
        for (i, item) in batch.iter_mut().enumerate() {
            let actions: Vec<Action> = item
                .segments
                .iter()
                .enumerate()
                .map(|(j, s)| {
                    let logprob = ActionLogprobs {
                        teacher: teacher_lp[i][j],
                        base: base_lp[i][j],
                        distilled: distilled_lp[i][j],
                    };
                    Action {
                        text: s.text(&item.response).to_string(),
                        start: s.start,
                        end: s.end,
                        logprob,
                        category: classify(&logprob, &options.thresholds),
                    }
                })
                .collect();
            builder.add(&actions, verdict_of(&item.record));
            let mut record = std::mem::take(&mut item.record);
            record.insert(
                "actions".into(),
                serde_json::to_value(&actions).map_err(|e| Error::Invalid(e.to_string()))?,
            );
            serde_json::to_writer(&mut out, &record).map_err(|e| Error::Invalid(e.to_string()))?;
            out.write_all(b"\n")?;
        }
        done += batch.len();
        progress(done, total);
    }
    out.commit()?;
    Ok(builder.finish())
}

/// Recomputes a [`TraceSummary`] from provenance records (each with `actions` and optionally
/// `verdict`), e.g. those of a file [`trace`] wrote. `thresholds` is recorded as given; the
/// categories are read from the records.
pub fn summarize_provenance(
    records: &[Map<String, Value>],
    thresholds: Thresholds,
) -> Result<TraceSummary> {
    let mut builder = SummaryBuilder::new(thresholds);
    for (i, record) in records.iter().enumerate() {
        let actions: Vec<Action> = match record.get("actions") {
            Some(value) => serde_json::from_value(value.clone())
                .map_err(|e| Error::Invalid(format!("record {}: field `actions`: {e}", i + 1)))?,
            None => {
                return Err(Error::Invalid(format!(
                    "record {}: missing field `actions`",
                    i + 1
                )));
            }
        };
        builder.add(&actions, verdict_of(record));
    }
    Ok(builder.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn summary_shares_and_verdict_groups() {
        let action = |category: &str, teacher: f64| {
            json!({"text": "x", "start": 0, "end": 1, "category": category,
                   "logprob": {"teacher": teacher, "base": -1.0, "distilled": null}})
        };
        let records: Vec<Map<String, Value>> = [
            json!({"verdict": {"correct": true}, "actions": [action("teacher", -0.5), action("teacher", -0.5), action("shared", -1.0)]}),
            json!({"verdict": {"correct": false}, "actions": [action("student", -2.0), action("teacher", -0.5)]}),
            json!({"actions": [action("unattributed", -4.0)]}),
        ]
        .into_iter()
        .map(|v| v.as_object().cloned().unwrap())
        .collect();
        let s = summarize_provenance(&records, Thresholds::default()).unwrap();
        assert_eq!((s.records, s.actions, s.no_verdict), (3, 6, 1));
        assert_eq!(
            s.counts,
            CategoryCounts {
                teacher: 3,
                student: 1,
                shared: 1,
                boosted: 0,
                unattributed: 1
            }
        );
        assert_eq!(s.shares["teacher"], 0.5);
        assert_eq!(s.shares["boosted"], 0.0);
        assert_eq!(s.correct.records, 1);
        assert!((s.correct.teacher_share.unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(s.incorrect.teacher_share, Some(0.5));
        assert!((s.mean_logprob.teacher.unwrap() - (-8.5 / 6.0)).abs() < 1e-12);
        assert_eq!(s.mean_logprob.distilled, None);
        let bad = vec![json!({"actions": 3}).as_object().cloned().unwrap()];
        assert!(
            summarize_provenance(&bad, Thresholds::default())
                .unwrap_err()
                .to_string()
                .contains("record 1")
        );
    }
}
