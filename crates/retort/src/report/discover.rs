//! Finding and reading a run's files for the report: eval and demo summaries (`*eval*.json`,
//! `*summary*.json`), selection manifests (`*.manifest.json` with `dropped` counts), training
//! metrics (`metrics.jsonl`, or JSONL whose records have `step` and `loss`), provenance files
//! (records with `actions`) and traces (records with `verdict`). Folders are searched three levels
//! deep, skipping hidden entries and `checkpoint-*` folders. A file that cannot be read is listed
//! with its error instead of failing the report.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::Result;
use crate::io::RecordReader;

/// Provenance categories in display order.
pub const CATEGORIES: [&str; 5] = ["teacher", "student", "shared", "boosted", "unattributed"];

/// JSON files larger than this are not summaries (model configs, tokenizers) and are skipped.
const MAX_JSON_BYTES: u64 = 8 << 20;
/// Example responses shown per provenance file.
const EXAMPLES: usize = 3;
/// Records kept per provenance file to choose the examples from.
const CANDIDATES: usize = 20;

/// Counts of trace records with verdicts.
#[derive(Debug, Clone, Default)]
pub struct TraceStats {
    /// Records.
    pub records: usize,
    /// Records with `verdict.correct`.
    pub judged: usize,
    /// Correct records.
    pub correct: usize,
    /// Sum of `num_tokens` and records that had it.
    pub tokens: (u64, usize),
    /// Records with `finish_reason: "length"`.
    pub truncated: usize,
}

/// A provenance file's category counts and example records.
#[derive(Debug, Clone, Default)]
pub struct ProvenanceStats {
    /// Records.
    pub records: usize,
    /// Actions per category (order of [`CATEGORIES`]).
    pub counts: [usize; 5],
    /// Actions per category in correct responses.
    pub correct: [usize; 5],
    /// Actions per category in incorrect responses.
    pub incorrect: [usize; 5],
    /// The first records (candidates for the examples).
    pub examples: Vec<Map<String, Value>>,
}

impl ProvenanceStats {
    /// Up to three examples: the first correct response, the first incorrect one, then the
    /// first others.
    pub fn pick_examples(&self) -> Vec<&Map<String, Value>> {
        let mut picked: Vec<usize> = Vec::new();
        for wanted in [Some(true), Some(false)] {
            if let Some(i) = self.examples.iter().position(|r| verdict(r) == wanted) {
                picked.push(i);
            }
        }
        for i in 0..self.examples.len() {
            if picked.len() >= EXAMPLES {
                break;
            }
            if !picked.contains(&i) {
                picked.push(i);
            }
        }
        picked.sort_unstable();
        picked.into_iter().map(|i| &self.examples[i]).collect()
    }
}

/// Everything the report found.
#[derive(Debug, Default)]
pub struct RunData {
    /// Files read: path relative to the run folder and what they were read as.
    pub files: Vec<(String, &'static str)>,
    /// Files that could not be read, with the error.
    pub unreadable: Vec<(String, String)>,
    /// Accuracy bars from `X_accuracy` keys of summaries (e.g. the demo's `summary.json`).
    pub accuracy: Vec<(String, f64)>,
    /// Accuracy bars from `accuracy` keys (eval summaries), shown when there is no other.
    pub eval_accuracy: Vec<(String, f64)>,
    /// Eval summaries: label and the summary object.
    pub evals: Vec<(String, Map<String, Value>)>,
    /// Provenance shares from summaries: label and counts or shares per category.
    pub provenance_shares: Vec<(String, [f64; 5])>,
    /// Training metrics per file.
    pub metrics: Vec<(String, Vec<Map<String, Value>>)>,
    /// Selection manifests: label, `counts` and `settings`.
    pub selections: Vec<(String, Value, Value)>,
    /// Trace files.
    pub traces: Vec<(String, TraceStats)>,
    /// Provenance files.
    pub provenance: Vec<(String, ProvenanceStats)>,
}

/// Reads what it recognises under `dir`; `skip` (the report being written) is ignored.
pub fn discover(dir: &Path, skip: Option<&Path>) -> Result<RunData> {
    let mut paths = Vec::new();
    walk(dir, 0, &mut paths)?;
    paths.sort();
    let skip = skip.and_then(|p| fs_err::canonicalize(p).ok());
    let mut data = RunData::default();
    for path in paths {
        if skip.is_some() && fs_err::canonicalize(&path).ok() == skip {
            continue;
        }
        let rel = path
            .strip_prefix(dir)
            .unwrap_or(&path)
            .display()
            .to_string();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        let outcome = if name.ends_with(".jsonl") {
            read_jsonl(&path, &rel, &mut data)
        } else if name.ends_with(".json") {
            read_json(&path, &rel, &name, &mut data)
        } else {
            Ok(None)
        };
        match outcome {
            Ok(Some(kind)) => data.files.push((rel, kind)),
            Ok(None) => {}
            Err(e) => data.unreadable.push((rel, e.to_string())),
        }
    }
    Ok(data)
}

fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs_err::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with('.') {
            continue;
        }
        if path.is_dir() {
            if depth < 3 && !name.starts_with("checkpoint-") {
                walk(&path, depth + 1, out)?;
            }
        } else {
            out.push(path);
        }
    }
    Ok(())
}

fn label_of(rel: &str) -> String {
    rel.trim_end_matches(".jsonl")
        .trim_end_matches(".json")
        .to_string()
}

fn read_json(
    path: &Path,
    rel: &str,
    name: &str,
    data: &mut RunData,
) -> Result<Option<&'static str>> {
    let is_manifest = name.ends_with(".manifest.json");
    if !(is_manifest || name.contains("eval") || name.contains("summary")) {
        return Ok(None);
    }
    if fs_err::metadata(path)?.len() > MAX_JSON_BYTES {
        return Ok(None);
    }
    let text = fs_err::read_to_string(path)?;
    let value: Value = serde_json::from_str(&text).map_err(|e| crate::Error::Input {
        path: path.to_path_buf(),
        line: e.line(),
        message: format!("invalid JSON: {e}"),
    })?;
    let Value::Object(map) = value else {
        return Ok(None);
    };
    let label = label_of(rel);
    if is_manifest {
        let counts = map.get("counts").cloned().unwrap_or(Value::Null);
        if counts.get("dropped").is_some_and(Value::is_object) {
            let settings = map.get("settings").cloned().unwrap_or(Value::Null);
            data.selections.push((
                label.trim_end_matches(".manifest").to_string(),
                counts,
                settings,
            ));
            return Ok(Some("selection manifest"));
        }
        return Ok(None);
    }
    let before = (
        data.accuracy.len() + data.eval_accuracy.len(),
        data.provenance_shares.len(),
    );
    collect_accuracy(&map, &label, 0, data);
    if map.get("accuracy").is_some_and(Value::is_number) {
        data.evals.push((
            map.get("model")
                .and_then(Value::as_str)
                .map_or_else(|| label.clone(), String::from),
            map.clone(),
        ));
    }
    if let Some(Value::Object(provenance)) = map.get("provenance") {
        for (key, value) in provenance {
            if let Some(row) = category_row(value) {
                data.provenance_shares.push((key.clone(), row));
            }
        }
    } else if map.contains_key("actions")
        && let Some(row) = category_row(&Value::Object(map.clone()))
    {
        data.provenance_shares.push((label.clone(), row));
    }
    let after = (
        data.accuracy.len() + data.eval_accuracy.len(),
        data.provenance_shares.len(),
    );
    Ok((after != before).then_some("summary"))
}

/// Accuracy bars from a summary: `X_accuracy` keys, an `accuracy` key, and objects with an
/// `accuracy` key one or two levels down (labelled by their keys).
fn collect_accuracy(map: &Map<String, Value>, label: &str, depth: usize, data: &mut RunData) {
    if let Some(a) = map.get("accuracy").and_then(Value::as_f64) {
        let name = map.get("model").and_then(Value::as_str).unwrap_or(label);
        data.eval_accuracy.push((name.to_string(), a));
    }
    for (key, value) in map {
        if let (Some(stem), Some(a)) = (key.strip_suffix("_accuracy"), value.as_f64()) {
            let name = if depth == 0 {
                stem.to_string()
            } else {
                format!("{label} {stem}")
            };
            data.accuracy.push((name, a));
        } else if let (Value::Object(inner), true) = (value, depth < 2) {
            if key == "provenance" || key == "by" {
                continue;
            }
            let name = if depth == 0 {
                key.clone()
            } else {
                format!("{label} {key}")
            };
            collect_accuracy(inner, &name, depth + 1, data);
        }
    }
}

/// Category values from `{teacher, student, ...}`, or its `shares` or `counts` object.
fn category_row(value: &Value) -> Option<[f64; 5]> {
    let object = value
        .get("shares")
        .or_else(|| value.get("counts"))
        .unwrap_or(value);
    let mut row = [0.0; 5];
    let mut any = false;
    for (slot, name) in row.iter_mut().zip(CATEGORIES) {
        if let Some(x) = object.get(name).and_then(Value::as_f64) {
            *slot = x;
            any = true;
        }
    }
    any.then_some(row)
}

fn read_jsonl(path: &Path, rel: &str, data: &mut RunData) -> Result<Option<&'static str>> {
    let is_metrics = path.file_name().is_some_and(|n| n == "metrics.jsonl");
    let mut reader = RecordReader::open(path)?;
    let Some(first) = reader.next() else {
        return Ok(None);
    };
    let (_, first) = first?;
    let label = label_of(rel);
    if first.contains_key("actions") {
        let mut stats = ProvenanceStats::default();
        add_provenance(&mut stats, first);
        for record in reader {
            add_provenance(&mut stats, record?.1);
        }
        data.provenance.push((label, stats));
        Ok(Some("provenance"))
    } else if is_metrics || (first.contains_key("step") && first.contains_key("loss")) {
        let mut rows = vec![first];
        for record in reader {
            rows.push(record?.1);
        }
        data.metrics.push((label, rows));
        Ok(Some("training metrics"))
    } else if first.contains_key("verdict") {
        let mut stats = TraceStats::default();
        add_trace(&mut stats, &first);
        for record in reader {
            add_trace(&mut stats, &record?.1);
        }
        data.traces.push((label, stats));
        Ok(Some("traces"))
    } else {
        Ok(None)
    }
}

fn verdict(record: &Map<String, Value>) -> Option<bool> {
    record.get("verdict")?.get("correct")?.as_bool()
}

fn add_trace(stats: &mut TraceStats, record: &Map<String, Value>) {
    stats.records += 1;
    if let Some(correct) = verdict(record) {
        stats.judged += 1;
        stats.correct += usize::from(correct);
    }
    if let Some(n) = record.get("num_tokens").and_then(Value::as_u64) {
        stats.tokens.0 += n;
        stats.tokens.1 += 1;
    }
    if record.get("finish_reason").and_then(Value::as_str) == Some("length") {
        stats.truncated += 1;
    }
}

fn add_provenance(stats: &mut ProvenanceStats, record: Map<String, Value>) {
    stats.records += 1;
    let correct = verdict(&record);
    if let Some(Value::Array(actions)) = record.get("actions") {
        for action in actions {
            let category = action
                .get("category")
                .and_then(Value::as_str)
                .unwrap_or("unattributed");
            let index = CATEGORIES.iter().position(|c| *c == category).unwrap_or(4);
            stats.counts[index] += 1;
            match correct {
                Some(true) => stats.correct[index] += 1,
                Some(false) => stats.incorrect[index] += 1,
                None => {}
            }
        }
    }
    if stats.examples.len() < CANDIDATES {
        stats.examples.push(record);
    }
}
