//! The report: sections appear when their files exist, model text is escaped, nothing points
//! outside the page, and the markup (SVG included) is balanced.

use std::path::Path;

use retort::report::write_report;
use retort::select::{SelectOptions, Strategy, select_file};
use serde_json::{Value, json};

const EVIL: &str =
    "<script>alert(1)</script> see https://evil.example/x.js and <img src=\"http://x/y.png\">";

fn write_jsonl(path: &Path, records: &[Value]) {
    if let Some(parent) = path.parent() {
        fs_err::create_dir_all(parent).expect("create folder");
    }
    let text: String = records.iter().map(|r| format!("{r}\n")).collect();
    fs_err::write(path, text).expect("write JSONL");
}

fn write_json(path: &Path, value: &Value) {
    fs_err::write(path, serde_json::to_string_pretty(value).expect("JSON")).expect("write JSON");
}

/// Checks that every element opened is closed in order (void elements and `/>` excepted) and
/// returns how many `<svg>` elements there are.
fn check_balanced(html: &str) -> usize {
    let void = ["meta", "br", "img", "input", "link", "hr"];
    let mut stack: Vec<String> = Vec::new();
    let mut svgs = 0;
    let mut rest = html;
    while let Some(open) = rest.find('<') {
        let close = rest[open..]
            .find('>')
            .map(|i| open + i)
            .unwrap_or_else(|| panic!("unclosed tag at …{}", &rest[open..]));
        let tag = &rest[open + 1..close];
        rest = &rest[close + 1..];
        if tag.starts_with('!') {
            continue;
        }
        if let Some(name) = tag.strip_prefix('/') {
            let top = stack
                .pop()
                .unwrap_or_else(|| panic!("`</{name}>` closes nothing"));
            assert_eq!(top, name.trim(), "`</{name}>` closes `<{top}>`");
            continue;
        }
        let name: String = tag
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        assert!(!name.is_empty(), "bad tag `<{tag}>`");
        if name == "svg" {
            svgs += 1;
        }
        if !tag.ends_with('/') && !void.contains(&name.as_str()) {
            stack.push(name);
        }
    }
    assert!(stack.is_empty(), "unclosed elements: {stack:?}");
    svgs
}

fn assert_self_contained(html: &str) {
    let lower = html.to_lowercase();
    for bad in [
        "http://", "https://", "<script", "url(", "@import", "<link", "<img", "<iframe", "<object",
        "<embed",
    ] {
        assert!(!lower.contains(bad), "the page contains `{bad}`");
    }
    // Inside tags: no `src` at all, and `href` only to anchors on the page.
    let mut rest = lower.as_str();
    while let Some(open) = rest.find('<') {
        let close = rest[open..].find('>').map_or(rest.len(), |i| open + i);
        let tag = &rest[open..close];
        assert!(!tag.contains("src="), "tag with a source: {tag}");
        for (i, _) in tag.match_indices("href=") {
            assert!(
                tag[i..].starts_with("href=\"#"),
                "link out of the page: {tag}"
            );
        }
        rest = &rest[close.min(rest.len())..];
        if rest.is_empty() {
            break;
        }
        rest = &rest[1..];
    }
}

#[test]
fn full_run_gets_every_section_with_escaped_text_and_no_external_reference() {
    let dir = tempfile::tempdir().expect("temp dir");
    let run = dir.path();
    write_json(
        &run.join("summary.json"),
        &json!({
            "teacher_accuracy": 0.9, "base_accuracy": 0.3, "distilled_accuracy": 0.6,
            "provenance": {
                "base": {"teacher": 2, "student": 5, "shared": 3, "boosted": 0, "unattributed": 1},
                "distilled": {"shares": {"teacher": 0.4, "student": 0.1, "shared": 0.3, "boosted": 0.15, "unattributed": 0.05}}
            }
        }),
    );
    write_json(
        &run.join("eval_distilled.json"),
        &json!({"problems": 4, "traces": 8, "correct": 5, "accuracy": 0.625, "pass_at_k": {"1": 0.625, "2": 0.75},
                "maj_at_k": {"1": 0.625}, "mean_tokens": 31.5, "truncation_rate": 0.0, "model": "<distilled>"}),
    );
    let metrics: Vec<Value> = (1..=10)
        .map(|s| json!({"step": s, "loss": 3.0 / f64::from(s), "kd_loss": 2.0 / f64::from(s), "lr": 1e-4 * f64::from(s).min(3.0), "tokens_per_s": 1000.0}))
        .collect();
    write_jsonl(&run.join("distill/metrics.jsonl"), &metrics);
    let traces = vec![
        json!({"id": "a", "prompt": "Q", "response": EVIL, "verdict": {"correct": true}, "num_tokens": 12, "finish_reason": "stop"}),
        json!({"id": "b", "prompt": "Q", "response": "x", "verdict": {"correct": false}, "num_tokens": 40, "finish_reason": "length"}),
    ];
    write_jsonl(&run.join("traces.jsonl"), &traces);
    let options = SelectOptions {
        strategies: vec![Strategy::Correct],
        ..SelectOptions::default()
    };
    select_file(
        &run.join("traces.jsonl"),
        &run.join("select/selected.jsonl"),
        &options,
        None,
        &[],
    )
    .expect("select");
    let action = |text: &str, category: &str| {
        json!({"text": text, "start": 0, "end": text.len(), "category": category,
               "logprob": {"teacher": -0.5, "base": -2.0, "distilled": -0.6}})
    };
    write_jsonl(
        &run.join("provenance.jsonl"),
        &[
            json!({"id": "a", "response": EVIL, "verdict": {"correct": true},
                   "actions": [action("<script>alert(1)</script>", "teacher"), action(" see https://evil.example/x.js", "student"),
                               action(" and <img src=\"http://x/y.png\">", "boosted")]}),
            json!({"id": "b", "verdict": {"correct": false}, "actions": [action("So 2+2=5.", "shared"), action(" Hmm", "weird")]}),
        ],
    );
    // Things the report must ignore or survive: a model folder, a torn file, a checkpoint.
    fs_err::create_dir_all(run.join("model")).expect("model folder");
    write_json(&run.join("model/config.json"), &json!({"vocab_size": 10}));
    fs_err::write(run.join("broken.jsonl"), "{\"verdict\": \n").expect("write broken");
    write_jsonl(
        &run.join("distill/checkpoint-5/metrics.jsonl"),
        &metrics[..5],
    );

    let output = run.join("report.html");
    let summary = write_report(run, &output).expect("report");
    let html = fs_err::read_to_string(&output).expect("read report");
    assert_eq!(
        summary.sections,
        [
            "accuracy",
            "training",
            "selection",
            "provenance",
            "examples",
            "traces"
        ]
    );
    assert!(summary.missing.is_empty());
    assert_eq!(summary.files_unreadable, 1);
    assert!(html.contains("broken.jsonl"));
    assert!(
        !html.contains("checkpoint-5"),
        "checkpoint folders are skipped"
    );
    assert_self_contained(&html);
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(html.contains("https&#58;//evil.example"));
    assert!(
        html.contains("&lt;distilled&gt;"),
        "the eval table names the model"
    );
    assert!(
        html.contains("<title>teacher: 0.9</title>"),
        "summary accuracies make the bars"
    );
    assert!(
        !html.contains("<title>&lt;distilled&gt;: 0.625</title>"),
        "eval files add no second bar"
    );
    // Colour-coded actions, one class per category; an unknown category falls back.
    for category in ["teacher", "student", "boosted", "shared", "unattributed"] {
        assert!(
            html.contains(&format!("class=\"c-{category}\"")),
            "{category}"
        );
    }
    // Accuracy bars, both loss terms and lr, drop reasons, provenance rows.
    for needle in [
        "distilled",
        "kd_loss",
        "Learning rate",
        "incorrect",
        "select/selected.jsonl",
        "Share of actions by origin",
    ] {
        assert!(html.contains(needle), "missing `{needle}`");
    }
    let svgs = check_balanced(&html);
    assert_eq!(svgs, 5, "accuracy, loss, lr, dropped reasons, provenance");
    println!(
        "report: {} bytes, {svgs} charts, sections {:?}",
        summary.bytes, summary.sections
    );
}

#[test]
fn missing_inputs_omit_their_sections_and_say_so() {
    let dir = tempfile::tempdir().expect("temp dir");
    let run = dir.path().join("run");
    fs_err::create_dir_all(&run).expect("run folder");
    let output = dir.path().join("report.html");
    let summary = write_report(&run, &output).expect("report of an empty run");
    assert!(summary.sections.is_empty());
    assert_eq!(summary.missing.len(), 6);
    let html = fs_err::read_to_string(&output).expect("read");
    assert!(html.contains("Not in this run"));
    assert_self_contained(&html);
    check_balanced(&html);

    // Only metrics: the training section alone.
    write_jsonl(
        &run.join("metrics.jsonl"),
        &[json!({"step": 1, "loss": 2.0, "lr": 0.001})],
    );
    let summary = write_report(&run, &output).expect("report");
    assert_eq!(summary.sections, ["training"]);
    let html = fs_err::read_to_string(&output).expect("read");
    assert_eq!(check_balanced(&html), 2);

    // Only an eval summary: its accuracy makes the bar.
    write_json(
        &run.join("eval_base.json"),
        &json!({"accuracy": 0.25, "problems": 4}),
    );
    let summary = write_report(&run, &output).expect("report");
    assert_eq!(summary.sections, ["accuracy", "training"]);
    let html = fs_err::read_to_string(&output).expect("read");
    assert!(html.contains("<title>eval_base: 0.25</title>"), "{html}");

    let err = write_report(&run.join("nope"), &output)
        .unwrap_err()
        .to_string();
    assert!(err.contains("is not a folder"), "{err}");
}
