//! The report stage: one self-contained HTML page about a run ([`write_report`]). It reads
//! whatever of the run's files are present ([`discover::discover`]) and shows, each in its own
//! section: accuracy before and after (bar chart), training curves (loss terms and learning rate
//! against step), the selection summary (steps and drop reasons), provenance shares (stacked
//! bars, base vs distilled and per provenance file), colour-coded sentences of example responses,
//! and trace counts. A section whose files are missing is left out and named under "Not in this
//! run".
//!
//! Self-contained means: inline CSS and inline SVG only, no script, no image, no font, no URL of
//! any kind. Every piece of text taken from a file is escaped ([`html::escape`]), which also
//! writes `://` as `&#58;//` so a URL inside model output stays inert text.

pub mod discover;
pub mod html;
pub mod svg;

use std::fmt::Write;
use std::path::Path;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::io::AtomicFile;
use discover::{CATEGORIES, RunData};
use html::{escape, table};

/// Bar colours of the provenance categories (order of [`discover::CATEGORIES`]).
const CATEGORY_COLOURS: [&str; 5] = ["#e69f00", "#009e73", "#7570b3", "#cc79a7", "#aaaaaa"];

/// What a report contains.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReportSummary {
    /// Sections written, in page order.
    pub sections: Vec<String>,
    /// Sections left out for lack of input.
    pub missing: Vec<String>,
    /// Files read.
    pub files_read: usize,
    /// Files that could not be read (listed on the page).
    pub files_unreadable: usize,
    /// Size of the page in bytes.
    pub bytes: usize,
}

/// Reads the run folder `run_dir` and writes the report to `output` atomically.
pub fn write_report(run_dir: &Path, output: &Path) -> Result<ReportSummary> {
    if !run_dir.is_dir() {
        return Err(Error::Invalid(format!(
            "`{}` is not a folder: give the run's output folder",
            run_dir.display()
        )));
    }
    let data = discover::discover(run_dir, Some(output))?;
    let title = run_dir.file_name().map_or_else(
        || run_dir.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let (page, mut summary) = render(&title, &data);
    AtomicFile::write_all(output, page.as_bytes())?;
    summary.bytes = page.len();
    Ok(summary)
}

/// The page for `data`, and what it contains.
pub fn render(title: &str, data: &RunData) -> (String, ReportSummary) {
    let mut summary = ReportSummary {
        files_read: data.files.len(),
        files_unreadable: data.unreadable.len(),
        ..ReportSummary::default()
    };
    let mut body = String::new();
    let sections: [(&str, &str, Option<String>); 6] = [
        ("accuracy", "Accuracy", accuracy_section(data)),
        ("training", "Training", training_section(data)),
        ("selection", "Selection", selection_section(data)),
        ("provenance", "Provenance", provenance_section(data)),
        ("examples", "Example responses", examples_section(data)),
        ("traces", "Traces", traces_section(data)),
    ];
    let mut toc = String::new();
    for (id, heading, content) in sections {
        match content {
            Some(content) => {
                let _ = write!(
                    body,
                    r#"<section id="{id}"><h2>{heading}</h2>{content}</section>"#
                );
                let _ = write!(toc, r##"<a href="#{id}">{heading}</a> "##);
                summary.sections.push(id.to_string());
            }
            None => summary.missing.push(id.to_string()),
        }
    }
    let mut page = String::with_capacity(body.len() + 4096);
    let _ = write!(
        page,
        r#"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><title>retort report: {t}</title><style>{STYLE}</style></head><body><header><h1>retort report: {t}</h1><nav>{toc}</nav></header>"#,
        t = escape(title)
    );
    if !summary.missing.is_empty() {
        let _ = write!(
            page,
            r#"<p class="missing">Not in this run (no input files found): {}.</p>"#,
            summary
                .missing
                .iter()
                .map(|m| escape(m))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    page.push_str(&body);
    page.push_str(&files_section(data));
    page.push_str("</body></html>\n");
    (page, summary)
}

const STYLE: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}\
h1{font-size:1.5em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}\
nav a{margin-right:1em}table{border-collapse:collapse;margin:1em 0;font-size:.9em}\
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left}th{background:#f5f5f5}\
td:not(:first-child){font-variant-numeric:tabular-nums}\
.chart{width:100%;max-width:720px;height:auto;display:block;margin:1em 0;font-size:11px}\
.chart-title{font-size:13px;font-weight:600}.grid{stroke:#eee}.axis{stroke:#888}\
.tick,.legend,.value,.axis-label{fill:#333}.inbar{fill:#fff;font-size:10px}\
.missing{color:#777;font-style:italic}\
.response{white-space:pre-wrap;border:1px solid #ddd;border-radius:4px;padding:.6em;margin:.5em 0 1.5em;font-family:ui-monospace,monospace;font-size:.85em}\
.legend-row span{display:inline-block;padding:0 .5em;margin-right:.5em;border-radius:3px}\
.c-teacher{background:#fde0b0}.c-student{background:#bfe8d9}.c-shared{background:#dcd9f0}\
.c-boosted{background:#f6c9e0}.c-unattributed{background:#e8e8e8}";

fn accuracy_section(data: &RunData) -> Option<String> {
    // Summary keys (`teacher_accuracy`, ...) name the models best; eval files are the fallback.
    let bars = if data.accuracy.is_empty() {
        &data.eval_accuracy
    } else {
        &data.accuracy
    };
    if bars.is_empty() && data.evals.is_empty() {
        return None;
    }
    let mut out = String::new();
    if !bars.is_empty() {
        out.push_str(&svg::bar_chart(
            "Accuracy (pass@1)",
            "accuracy",
            bars,
            Some(1.0),
        ));
    }
    if !data.evals.is_empty() {
        let rows: Vec<Vec<String>> = data
            .evals
            .iter()
            .map(|(name, eval)| {
                let number = |key: &str| {
                    eval.get(key)
                        .and_then(Value::as_f64)
                        .map_or("–".into(), svg::format_number)
                };
                let ks = |key: &str| match eval.get(key) {
                    Some(Value::Object(by_k)) => by_k
                        .iter()
                        .map(|(k, v)| {
                            format!("@{k} {}", v.as_f64().map_or("–".into(), svg::format_number))
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                    _ => "–".into(),
                };
                vec![
                    name.clone(),
                    number("problems"),
                    number("accuracy"),
                    ks("pass_at_k"),
                    ks("maj_at_k"),
                    number("mean_tokens"),
                    number("truncation_rate"),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "eval",
                "problems",
                "accuracy",
                "pass@k",
                "maj@k",
                "mean tokens",
                "truncation rate",
            ],
            &rows,
        ));
    }
    Some(out)
}

fn series(rows: &[Map<String, Value>], key: &str) -> Vec<(f64, f64)> {
    rows.iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let x = r
                .get("step")
                .and_then(Value::as_f64)
                .unwrap_or(i as f64 + 1.0);
            Some((x, r.get(key)?.as_f64()?))
        })
        .collect()
}

fn training_section(data: &RunData) -> Option<String> {
    if data.metrics.is_empty() {
        return None;
    }
    let mut out = String::new();
    for (name, rows) in &data.metrics {
        let _ = write!(out, "<h3>{}</h3>", escape(name));
        // Every numeric field ending in `loss` is a loss term (loss, sft_loss, kd_loss, eval_loss).
        let mut loss_keys: Vec<String> = Vec::new();
        for row in rows {
            for (key, value) in row {
                if key.ends_with("loss") && value.is_number() && !loss_keys.contains(key) {
                    loss_keys.push(key.clone());
                }
            }
        }
        let losses: Vec<(String, Vec<(f64, f64)>)> = loss_keys
            .iter()
            .map(|k| (k.clone(), series(rows, k)))
            .collect();
        out.push_str(&svg::line_chart("Loss", "step", "loss", &losses));
        let lr = series(rows, "lr");
        if !lr.is_empty() {
            out.push_str(&svg::line_chart(
                "Learning rate",
                "step",
                "lr",
                &[("lr".into(), lr)],
            ));
        }
        let first = rows
            .first()
            .and_then(|r| r.get("loss"))
            .and_then(Value::as_f64);
        let last = rows
            .last()
            .and_then(|r| r.get("loss"))
            .and_then(Value::as_f64);
        let speeds: Vec<f64> = rows
            .iter()
            .filter_map(|r| r.get("tokens_per_s").and_then(Value::as_f64))
            .collect();
        let fmt = |x: Option<f64>| x.map_or("–".into(), svg::format_number);
        out.push_str(&table(
            &["steps", "first loss", "final loss", "mean tokens/s"],
            &[vec![
                rows.len().to_string(),
                fmt(first),
                fmt(last),
                fmt((!speeds.is_empty()).then(|| speeds.iter().sum::<f64>() / speeds.len() as f64)),
            ]],
        ));
    }
    Some(out)
}

fn selection_section(data: &RunData) -> Option<String> {
    if data.selections.is_empty() {
        return None;
    }
    let mut out = String::new();
    for (name, counts, settings) in &data.selections {
        let _ = write!(out, "<h3>{}</h3>", escape(name));
        let strategies = settings
            .get("strategies")
            .and_then(Value::as_array)
            .map_or_else(String::new, |s| {
                s.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(" → ")
            });
        let number = |key: &str| counts.get(key).map_or("–".into(), Value::to_string);
        out.push_str(&table(
            &["strategies", "input", "kept", "kept problems"],
            &[vec![
                strategies,
                number("input"),
                number("kept"),
                number("kept_problems"),
            ]],
        ));
        if let Some(Value::Array(steps)) = counts.get("steps") {
            let rows: Vec<Vec<String>> = steps
                .iter()
                .map(|s| {
                    let field = |k: &str| {
                        s.get(k).map_or("–".into(), |v| {
                            v.as_str().map_or_else(|| v.to_string(), String::from)
                        })
                    };
                    vec![field("step"), field("before"), field("after")]
                })
                .collect();
            out.push_str(&table(&["step", "before", "after"], &rows));
        }
        if let Some(Value::Object(dropped)) = counts.get("dropped") {
            let bars: Vec<(String, f64)> = dropped
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                .collect();
            if !bars.is_empty() {
                out.push_str(&svg::bar_chart(
                    "Dropped records by reason",
                    "records",
                    &bars,
                    None,
                ));
            }
            let rows: Vec<Vec<String>> = dropped
                .iter()
                .map(|(k, v)| vec![k.clone(), v.to_string()])
                .collect();
            out.push_str(&table(&["dropped: reason", "records"], &rows));
        }
    }
    Some(out)
}

fn category_legend() -> String {
    let mut out = String::from(r#"<p class="legend-row">"#);
    for category in CATEGORIES {
        let _ = write!(out, r#"<span class="c-{category}">{category}</span>"#);
    }
    out.push_str("</p>");
    out
}

fn provenance_section(data: &RunData) -> Option<String> {
    let mut rows: Vec<(String, Vec<f64>)> = data
        .provenance_shares
        .iter()
        .map(|(label, row)| (label.clone(), row.to_vec()))
        .collect();
    for (name, stats) in &data.provenance {
        rows.push((
            name.clone(),
            stats.counts.iter().map(|&c| c as f64).collect(),
        ));
    }
    if rows.is_empty() {
        return None;
    }
    let categories: Vec<(&str, &str)> = CATEGORIES.iter().copied().zip(CATEGORY_COLOURS).collect();
    let mut out = svg::stacked_bars("Share of actions by origin", &categories, &rows);
    let share = |counts: &[usize; 5], i: usize| {
        let total: usize = counts.iter().sum();
        if total == 0 {
            "–".to_string()
        } else {
            format!("{:.1}%", 100.0 * counts[i] as f64 / total as f64)
        }
    };
    let table_rows: Vec<Vec<String>> = data
        .provenance
        .iter()
        .map(|(name, s)| {
            let mut row = vec![
                name.clone(),
                s.records.to_string(),
                s.counts.iter().sum::<usize>().to_string(),
            ];
            row.extend((0..5).map(|i| format!("{} ({})", s.counts[i], share(&s.counts, i))));
            row.push(share(&s.correct, 0));
            row.push(share(&s.incorrect, 0));
            row
        })
        .collect();
    if !table_rows.is_empty() {
        let mut header = vec!["file", "responses", "actions"];
        header.extend(CATEGORIES);
        header.extend(["teacher share (correct)", "teacher share (incorrect)"]);
        out.push_str(&table(&header, &table_rows));
    }
    Some(out)
}

fn examples_section(data: &RunData) -> Option<String> {
    let mut out = String::new();
    for (name, stats) in &data.provenance {
        for record in stats.pick_examples() {
            let id = record.get("id").map_or_else(String::new, |v| {
                v.as_str().map_or_else(|| v.to_string(), String::from)
            });
            let verdict = match record
                .get("verdict")
                .and_then(|v| v.get("correct"))
                .and_then(Value::as_bool)
            {
                Some(true) => "correct",
                Some(false) => "incorrect",
                None => "no verdict",
            };
            let _ = write!(
                out,
                "<h3>{} · {} · {}</h3>",
                escape(name),
                escape(&id),
                verdict
            );
            out.push_str(r#"<div class="response">"#);
            if let Some(Value::Array(actions)) = record.get("actions") {
                for action in actions {
                    out.push_str(&render_action(action));
                }
            }
            out.push_str("</div>");
        }
    }
    (!out.is_empty()).then(|| category_legend() + &out)
}

fn render_action(action: &Value) -> String {
    let text = action.get("text").and_then(Value::as_str).unwrap_or("");
    let category = action
        .get("category")
        .and_then(Value::as_str)
        .unwrap_or("unattributed");
    let class = if CATEGORIES.contains(&category) {
        category
    } else {
        "unattributed"
    };
    let lp = |model: &str| {
        action
            .get("logprob")
            .and_then(|l| l.get(model))
            .and_then(Value::as_f64)
            .map_or("–".into(), |x| format!("{x:.3}"))
    };
    format!(
        r#"<span class="c-{class}" title="{cat}: teacher {t}, base {b}, distilled {d}">{text}</span>"#,
        cat = escape(category),
        t = lp("teacher"),
        b = lp("base"),
        d = lp("distilled"),
        text = escape(text)
    )
}

fn traces_section(data: &RunData) -> Option<String> {
    if data.traces.is_empty() {
        return None;
    }
    let rows: Vec<Vec<String>> = data
        .traces
        .iter()
        .map(|(name, s)| {
            let rate = |n: usize, d: usize| {
                if d == 0 {
                    "–".into()
                } else {
                    svg::format_number(n as f64 / d as f64)
                }
            };
            vec![
                name.clone(),
                s.records.to_string(),
                s.judged.to_string(),
                s.correct.to_string(),
                rate(s.correct, s.judged),
                if s.tokens.1 == 0 {
                    "–".into()
                } else {
                    svg::format_number(s.tokens.0 as f64 / s.tokens.1 as f64)
                },
                rate(s.truncated, s.records),
            ]
        })
        .collect();
    Some(table(
        &[
            "file",
            "records",
            "with verdict",
            "correct",
            "accuracy",
            "mean tokens",
            "truncated",
        ],
        &rows,
    ))
}

fn files_section(data: &RunData) -> String {
    let mut out = String::from(r#"<section id="files"><h2>Files read</h2>"#);
    let rows: Vec<Vec<String>> = data
        .files
        .iter()
        .map(|(path, kind)| vec![path.clone(), (*kind).to_string()])
        .collect();
    out.push_str(&table(&["file", "read as"], &rows));
    if !data.unreadable.is_empty() {
        let rows: Vec<Vec<String>> = data
            .unreadable
            .iter()
            .map(|(p, e)| vec![p.clone(), e.clone()])
            .collect();
        out.push_str("<h3>Files that could not be read</h3>");
        out.push_str(&table(&["file", "error"], &rows));
    }
    out.push_str("</section>");
    out
}
