//! The eval stage: sample k responses per problem from any [`Backend`] (through
//! [`crate::generate`]), verify each against the gold answer ([`retort_verify`]) and report
//! accuracy the ways papers do ([`EvalSummary`]):
//!
//! - `accuracy`: pass@1 averaged over the k samples, i.e. the mean over problems of `c / n`
//!   (`n` samples, `c` correct);
//! - `pass_at_k`: the unbiased estimator of Chen et al. (2021), `1 - C(n-c, k) / C(n, k)`, for k in
//!   {1, 2, 4, …, K} ∪ {K}, averaged over the problems with at least k samples;
//! - `maj_at_k`: majority vote over the extracted answers of the first k samples (by `sample`
//!   index). Answers are grouped with [`retort_verify::equivalent`] (so `0.5` and `\frac{1}{2}`
//!   vote together; identical whitespace-normalised strings short-cut the check); responses
//!   without an extracted answer do not vote; a tie goes to the group whose first member came
//!   first; the vote is correct when the winning group's first member was judged correct; a
//!   problem where nobody voted counts as wrong;
//! - `mean_tokens` (response tokens per trace), `truncation_rate` (`finish_reason == "length"`),
//!   `no_answer_rate`, counts, and the same figures per value of a record field (`by`).
//!
//! [`summarize`] is the pure part: it computes the summary from already-verified traces.
//! [`Protocol`] holds published evaluation settings (DeepSeek-R1: temperature 0.6, top-p 0.95,
//! 4 samples).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::PathBuf;
use std::str::FromStr;

use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::backend::{Backend, SamplingParams};
use crate::error::{Error, Result};
use crate::generate::{GenerateOptions, GenerateSummary, generate_problems, read_problems};
use crate::io::{AtomicFile, read_records};
use crate::records::InputFormat;

pub use retort_verify::VerifyOptions;

/// Published evaluation settings.
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// DeepSeek-R1's: temperature 0.6, top-p 0.95, 4 samples per problem (pass@1 averaged).
    DeepseekR1,
}

/// The settings a [`Protocol`] fixes (flags given explicitly take precedence).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProtocolPreset {
    /// Sampling temperature.
    pub temperature: f64,
    /// Nucleus mass.
    pub top_p: f64,
    /// Samples per problem.
    pub samples: usize,
}

impl Protocol {
    /// The protocol's settings.
    pub fn preset(self) -> ProtocolPreset {
        match self {
            Self::DeepseekR1 => ProtocolPreset {
                temperature: 0.6,
                top_p: 0.95,
                samples: 4,
            },
        }
    }
}

impl FromStr for Protocol {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "deepseek-r1" | "deepseek_r1" | "r1" => Ok(Self::DeepseekR1),
            other => Err(Error::Invalid(format!(
                "unknown protocol `{other}`; expected `deepseek-r1`"
            ))),
        }
    }
}

/// Options of the eval stage.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Problems with gold answers.
    pub input: PathBuf,
    /// Where the verified traces go. Generation resumes from traces already there; the file is
    /// rewritten with verdicts at the end. `None` uses a temporary file, removed afterwards.
    pub output: Option<PathBuf>,
    /// Samples per problem (k).
    pub samples: usize,
    /// Input shape.
    pub format: InputFormat,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// Verifier policy.
    pub policy: VerifyOptions,
    /// Break the figures down by this record field (e.g. `level`).
    pub by: Option<String>,
    /// Requests handed to the backend at a time.
    pub chunk_size: usize,
}

impl EvalOptions {
    /// Defaults for `input`: one sample, default sampling and verifier, no breakdown.
    pub fn new(input: impl Into<PathBuf>) -> Self {
        Self {
            input: input.into(),
            output: None,
            samples: 1,
            format: InputFormat::Auto,
            sampling: SamplingParams::default(),
            policy: VerifyOptions::default(),
            by: None,
            chunk_size: 4096,
        }
    }
}

/// Options of [`summarize`].
#[derive(Debug, Clone, Default)]
pub struct SummaryOptions {
    /// Break the figures down by this record field.
    pub by: Option<String>,
    /// The equivalence policy used to group answers for maj@k.
    pub policy: VerifyOptions,
}

/// Accuracy figures over a set of problems.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Metrics {
    /// Problems.
    pub problems: usize,
    /// Verified traces.
    pub traces: usize,
    /// Traces judged correct.
    pub correct: usize,
    /// pass@1 averaged over samples: mean over problems of correct / samples.
    pub accuracy: f64,
    /// Unbiased pass@k per k (over problems with at least k samples).
    pub pass_at_k: BTreeMap<usize, f64>,
    /// Majority-vote accuracy per k (first k samples of each problem).
    pub maj_at_k: BTreeMap<usize, f64>,
    /// Mean response tokens per trace (over traces with `num_tokens`).
    pub mean_tokens: f64,
    /// Fraction of traces that hit the token limit.
    pub truncation_rate: f64,
    /// Fraction of traces without an extractable answer.
    pub no_answer_rate: f64,
}

/// What an eval run found.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EvalSummary {
    /// Figures over all problems.
    #[serde(flatten)]
    pub overall: Metrics,
    /// Most samples any problem has (k).
    pub samples: usize,
    /// The field of the breakdown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by_field: Option<String>,
    /// Figures per value of `by_field` (`(none)` for records without it).
    pub by: BTreeMap<String, Metrics>,
    /// Traces skipped because their problem has no gold answer.
    pub unverifiable: usize,
    /// The evaluated model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The sampling settings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampling: Option<SamplingParams>,
    /// Generation counts (failures, resumed traces, tokens).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<GenerateSummary>,
}

/// The ks reported for at most `max_k` samples: 1, the powers of two below `max_k`, and `max_k`.
pub fn k_values(max_k: usize) -> Vec<usize> {
    let mut ks = Vec::new();
    let mut k = 1;
    while k < max_k {
        ks.push(k);
        k *= 2;
    }
    if max_k > 0 {
        ks.push(max_k);
    }
    ks
}

/// Unbiased pass@k for `n` samples of which `c` are correct: `1 - C(n-c, k) / C(n, k)`, computed
/// as a stable product. Requires `k <= n`.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    if n < k || k == 0 {
        return f64::NAN;
    }
    if n - c.min(n) < k {
        return 1.0;
    }
    let mut fail = 1.0;
    for i in (n - c + 1)..=n {
        fail *= 1.0 - k as f64 / i as f64;
    }
    1.0 - fail
}

/// One verified sample of a problem.
#[derive(Debug, Clone)]
struct Sample {
    index: usize,
    correct: bool,
    extracted: Option<String>,
    tokens: Option<f64>,
    truncated: bool,
}

/// Whether the majority answer of `samples` is correct (see the module docs for the rules).
fn majority_correct(samples: &[&Sample], policy: &VerifyOptions) -> bool {
    // (representative, votes, correct of the representative), in order of first appearance.
    let mut groups: Vec<(String, usize, bool)> = Vec::new();
    for sample in samples {
        let Some(answer) = sample
            .extracted
            .as_deref()
            .map(str::trim)
            .filter(|a| !a.is_empty())
        else {
            continue;
        };
        let normalised = answer.split_whitespace().collect::<Vec<_>>().join(" ");
        let found = groups
            .iter()
            .position(|(repr, _, _)| *repr == normalised)
            .or_else(|| {
                groups
                    .iter()
                    .position(|(repr, _, _)| retort_verify::equivalent(repr, answer, policy))
            });
        match found {
            Some(g) => groups[g].1 += 1,
            None => groups.push((normalised, 1, sample.correct)),
        }
    }
    let mut best: Option<&(String, usize, bool)> = None;
    for group in &groups {
        if best.is_none_or(|b| group.1 > b.1) {
            best = Some(group);
        }
    }
    best.is_some_and(|g| g.2)
}

fn metrics(problems: &[&Vec<Sample>], policy: &VerifyOptions) -> Metrics {
    let mut m = Metrics {
        problems: problems.len(),
        ..Metrics::default()
    };
    let max_k = problems.iter().map(|p| p.len()).max().unwrap_or(0);
    let mut accuracy = 0.0;
    let (mut tokens, mut with_tokens, mut truncated, mut no_answer) = (0.0, 0usize, 0usize, 0usize);
    for samples in problems {
        let c = samples.iter().filter(|s| s.correct).count();
        m.traces += samples.len();
        m.correct += c;
        if !samples.is_empty() {
            accuracy += c as f64 / samples.len() as f64;
        }
        for s in samples.iter() {
            if let Some(t) = s.tokens {
                tokens += t;
                with_tokens += 1;
            }
            truncated += usize::from(s.truncated);
            no_answer += usize::from(s.extracted.is_none());
        }
    }
    let ratio = |a: f64, b: usize| if b == 0 { 0.0 } else { a / b as f64 };
    m.accuracy = ratio(accuracy, problems.len());
    m.mean_tokens = ratio(tokens, with_tokens);
    m.truncation_rate = ratio(truncated as f64, m.traces);
    m.no_answer_rate = ratio(no_answer as f64, m.traces);
    for k in k_values(max_k) {
        let eligible: Vec<&&Vec<Sample>> = problems.iter().filter(|p| p.len() >= k).collect();
        if eligible.is_empty() {
            continue;
        }
        let pass: f64 = eligible
            .iter()
            .map(|p| pass_at_k(p.len(), p.iter().filter(|s| s.correct).count(), k))
            .sum();
        m.pass_at_k.insert(k, pass / eligible.len() as f64);
        let maj = eligible
            .iter()
            .filter(|p| majority_correct(&p.iter().take(k).collect::<Vec<_>>(), policy))
            .count();
        m.maj_at_k.insert(k, maj as f64 / eligible.len() as f64);
    }
    m
}

fn id_of(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn group_key(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => "(none)".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// Computes the eval figures from verified traces: each record needs `id` and
/// `verdict.correct`; `verdict.extracted`, `sample`, `num_tokens` and `finish_reason` are used
/// when present. Records are grouped into problems by `id`.
pub fn summarize(records: &[Map<String, Value>], options: &SummaryOptions) -> Result<EvalSummary> {
    let mut order: Vec<String> = Vec::new();
    let mut problems: HashMap<String, (Vec<Sample>, String)> = HashMap::new();
    for (i, record) in records.iter().enumerate() {
        let err = |message: &str| Error::Invalid(format!("record {}: {message}", i + 1));
        let id = record
            .get("id")
            .and_then(id_of)
            .ok_or_else(|| err("field `id`: expected a string or a number"))?;
        let verdict = record
            .get("verdict")
            .ok_or_else(|| err("missing field `verdict` (run verify first)"))?;
        let correct = verdict
            .get("correct")
            .and_then(Value::as_bool)
            .ok_or_else(|| err("field `verdict.correct`: expected a boolean"))?;
        let sample = Sample {
            index: record
                .get("sample")
                .and_then(Value::as_u64)
                .map_or(usize::MAX, |s| s as usize),
            correct,
            extracted: verdict
                .get("extracted")
                .and_then(Value::as_str)
                .map(str::to_string),
            tokens: record.get("num_tokens").and_then(Value::as_f64),
            truncated: record.get("finish_reason").and_then(Value::as_str) == Some("length"),
        };
        let key = options
            .by
            .as_deref()
            .map(|field| group_key(record.get(field)))
            .unwrap_or_default();
        let entry = problems.entry(id.clone()).or_insert_with(|| {
            order.push(id);
            (Vec::new(), key)
        });
        entry.0.push(sample);
    }
    for (samples, _) in problems.values_mut() {
        // Stable: samples without an index keep their order of appearance, after indexed ones.
        samples.sort_by_key(|s| s.index);
    }
    let all: Vec<&Vec<Sample>> = order.iter().map(|id| &problems[id].0).collect();
    let mut summary = EvalSummary {
        overall: metrics(&all, &options.policy),
        samples: all.iter().map(|p| p.len()).max().unwrap_or(0),
        by_field: options.by.clone(),
        ..EvalSummary::default()
    };
    if options.by.is_some() {
        let mut groups: BTreeMap<String, Vec<&Vec<Sample>>> = BTreeMap::new();
        for id in &order {
            let (samples, key) = &problems[id];
            groups.entry(key.clone()).or_default().push(samples);
        }
        summary.by = groups
            .into_iter()
            .map(|(key, members)| (key, metrics(&members, &options.policy)))
            .collect();
    }
    Ok(summary)
}

/// Runs the stage: generates `samples` responses per problem of `options.input` with `backend`,
/// verifies them and summarises. `progress(done, total)` follows generation.
pub fn run(
    backend: &dyn Backend,
    options: &EvalOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<EvalSummary> {
    let problems = read_problems(&options.input, options.format)?;
    run_problems(backend, problems, options, progress)
}

/// [`run`] on `problems`, already read from `options.input` by [`read_problems`].
pub fn run_problems(
    backend: &dyn Backend,
    problems: Vec<(Map<String, Value>, crate::records::Problem)>,
    options: &EvalOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<EvalSummary> {
    let gold: HashMap<String, Option<String>> = problems
        .iter()
        .map(|(_, p)| (p.id.clone(), p.answer.clone()))
        .collect();
    if problems.is_empty() {
        return Err(Error::Invalid(format!(
            "`{}` holds no records\nhint: pass a JSONL file with one problem per line",
            options.input.display()
        )));
    }
    if gold.values().all(Option::is_none) {
        return Err(Error::Invalid(format!(
            "no record of `{}` has a gold answer to evaluate against (looked for `answer`, a \
             GSM8K `answer` with `#### n`, or a MATH `solution` with `\\boxed{{}}`)\nhint: add \
             an `answer` field to each record",
            options.input.display()
        )));
    }
    let temporary = options.output.is_none();
    let output = match &options.output {
        Some(path) => path.clone(),
        None => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            std::env::temp_dir().join(format!("retort-eval-{}-{nanos}.jsonl", std::process::id()))
        }
    };
    let generate_options = GenerateOptions {
        input: options.input.clone(),
        output: output.clone(),
        samples: options.samples,
        format: options.format,
        sampling: options.sampling.clone(),
        shard: None,
        chunk_size: options.chunk_size,
        ..GenerateOptions::default()
    };
    let result =
        generate_problems(backend, problems, &generate_options, progress).and_then(|generation| {
            let traces = read_records(&output)?;
            let mut kept = Vec::new();
            let mut all = Vec::with_capacity(traces.len());
            let mut unverifiable = 0;
            for (_, mut record) in traces {
                let id = record.get("id").and_then(id_of);
                let sample = record
                    .get("sample")
                    .and_then(Value::as_u64)
                    .map_or(usize::MAX, |s| s as usize);
                let answer = id.as_ref().and_then(|id| gold.get(id));
                if let Some(answer) = answer.filter(|_| sample < options.samples) {
                    match (answer, record.get("response").and_then(Value::as_str)) {
                        (Some(gold), Some(response)) => {
                            let verdict = retort_verify::verify(response, gold, &options.policy);
                            record.insert(
                                "verdict".into(),
                                json!({"correct": verdict.correct, "extracted": verdict.extracted}),
                            );
                            kept.push(record.clone());
                        }
                        _ => unverifiable += 1,
                    }
                }
                all.push(record);
            }
            if !temporary {
                let mut file = AtomicFile::create(&output)?;
                for record in &all {
                    serde_json::to_writer(&mut file, record)
                        .map_err(|e| Error::Invalid(e.to_string()))?;
                    file.write_all(b"\n")?;
                }
                file.commit()?;
            }
            let mut summary = summarize(
                &kept,
                &SummaryOptions {
                    by: options.by.clone(),
                    policy: options.policy.clone(),
                },
            )?;
            summary.unverifiable = unverifiable;
            summary.model = Some(backend.name().to_string());
            summary.sampling = Some(options.sampling.clone());
            summary.generation = Some(generation);
            Ok(summary)
        });
    if temporary {
        let _ = fs_err::remove_file(&output);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binomial(n: u64, k: u64) -> f64 {
        if k > n {
            return 0.0;
        }
        (0..k).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
    }

    #[test]
    fn pass_at_k_matches_hand_computed_values() {
        // n = 4, c = 1: pass@1 = 1/4, pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6 = 1/2, pass@4 = 1.
        assert!((pass_at_k(4, 1, 1) - 0.25).abs() < 1e-12);
        assert!((pass_at_k(4, 1, 2) - 0.5).abs() < 1e-12);
        assert_eq!(pass_at_k(4, 1, 4), 1.0);
        // n = 5, c = 2, k = 2: 1 - C(3,2)/C(5,2) = 1 - 3/10.
        assert!((pass_at_k(5, 2, 2) - 0.7).abs() < 1e-12);
        assert_eq!(pass_at_k(3, 0, 2), 0.0);
        assert_eq!(pass_at_k(3, 3, 1), 1.0);
        assert!(pass_at_k(2, 1, 3).is_nan());
        for n in 1..12u64 {
            for c in 0..=n {
                for k in 1..=n {
                    let expected = 1.0 - binomial(n - c, k) / binomial(n, k);
                    let got = pass_at_k(n as usize, c as usize, k as usize);
                    assert!(
                        (got - expected).abs() < 1e-12,
                        "n={n} c={c} k={k}: {got} vs {expected}"
                    );
                }
            }
        }
        assert_eq!(k_values(1), [1]);
        assert_eq!(k_values(4), [1, 2, 4]);
        assert_eq!(k_values(6), [1, 2, 4, 6]);
        assert_eq!(k_values(0), Vec::<usize>::new());
    }

    fn trace(
        id: &str,
        sample: usize,
        correct: bool,
        extracted: Option<&str>,
        extra: Value,
    ) -> Map<String, Value> {
        let mut record = json!({
            "id": id, "sample": sample, "num_tokens": 10 * (sample + 1),
            "finish_reason": if extracted.is_none() { "length" } else { "stop" },
            "verdict": {"correct": correct, "extracted": extracted},
        });
        if let (Some(object), Value::Object(extra)) = (record.as_object_mut(), extra) {
            object.extend(extra);
        }
        record.as_object().cloned().unwrap()
    }

    #[test]
    fn summary_against_hand_computed_values() {
        let easy = json!({"level": 1});
        let hard = json!({"level": 2});
        let records = vec![
            // p1: 3 of 4 correct; answers 5, 5, 5.0 (equivalent), 7.
            trace("p1", 0, true, Some("5"), easy.clone()),
            trace("p1", 1, false, Some("7"), easy.clone()),
            trace("p1", 2, true, Some("5.0"), easy.clone()),
            trace("p1", 3, true, Some("5"), easy.clone()),
            // p2: 1 of 4 correct; answers 3 (right), 4, 4, none. Listed out of order.
            trace("p2", 3, false, None, hard.clone()),
            trace("p2", 0, true, Some("3"), hard.clone()),
            trace("p2", 1, false, Some("4"), hard.clone()),
            trace("p2", 2, false, Some("\\frac{8}{2}"), hard.clone()),
        ];
        let options = SummaryOptions {
            by: Some("level".into()),
            policy: VerifyOptions::default(),
        };
        let s = summarize(&records, &options).unwrap();
        let m = &s.overall;
        assert_eq!((m.problems, m.traces, m.correct, s.samples), (2, 8, 4, 4));
        assert!((m.accuracy - (0.75 + 0.25) / 2.0).abs() < 1e-12);
        // pass@2: p1 1 - C(1,2)/C(4,2) = 1; p2 1 - C(3,2)/C(4,2) = 1/2.
        assert!((m.pass_at_k[&1] - 0.5).abs() < 1e-12);
        assert!((m.pass_at_k[&2] - 0.75).abs() < 1e-12);
        assert_eq!(m.pass_at_k[&4], 1.0);
        // maj@1: p1 first sample 5 (right), p2 first sample 3 (right) → 1.
        // maj@2: p1 {5, 7} tie → 5 first → right; p2 {3, 4} tie → 3 first → right.
        // maj@4: p1 5 wins 3-1 → right; p2 4 and 8/2 vote together 2-1 → wrong.
        assert_eq!(m.maj_at_k[&1], 1.0);
        assert_eq!(m.maj_at_k[&2], 1.0);
        assert_eq!(m.maj_at_k[&4], 0.5);
        assert!((m.mean_tokens - 25.0).abs() < 1e-12);
        assert!((m.truncation_rate - 1.0 / 8.0).abs() < 1e-12);
        assert!((m.no_answer_rate - 1.0 / 8.0).abs() < 1e-12);
        assert_eq!(s.by.len(), 2);
        assert!((s.by["1"].accuracy - 0.75).abs() < 1e-12);
        assert_eq!(s.by["2"].maj_at_k[&4], 0.0);
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["pass_at_k"]["2"], 0.75);
        assert!(json["accuracy"].is_number());
        let err = summarize(
            &[json!({"id": "x"}).as_object().cloned().unwrap()],
            &options,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("record 1: missing field `verdict`"),
            "{err}"
        );
    }

    #[test]
    fn protocols() {
        let p: Protocol = "deepseek-r1".parse().unwrap();
        assert_eq!(
            p.preset(),
            ProtocolPreset {
                temperature: 0.6,
                top_p: 0.95,
                samples: 4
            }
        );
        assert!("gpt".parse::<Protocol>().is_err());
    }
}
