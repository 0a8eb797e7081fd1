//! Provenance tracing and eval on the fixture models (tiny random transformers sharing one
//! tokenizer): attribution matches direct scoring, identical models give identical columns, and
//! eval writes its summary keys.

use std::path::{Path, PathBuf};

use retort::backend::local::LocalBackend;
use retort::backend::{Prompt, SamplingParams};
use retort::eval::{EvalOptions, run as evaluate};
use retort::io::read_records;
use retort::provenance::{Category, Thresholds, TraceOptions, TraceSummary, trace};
use serde_json::{Map, Value, json};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures");

fn model(name: &str) -> LocalBackend {
    let path = format!("{FIXTURES}/{name}");
    LocalBackend::load(&path, 4).unwrap_or_else(|e| panic!("load fixture `{path}`: {e}"))
}

const PROMPT: &str = "Question: Tom has 19 apples and gives away 5. How many are left?\nAnswer:";
const RESPONSE: &str =
    " He starts with 19 apples. He gives away 5 apples. So 19 - 5 = 14. The answer is 14.";

fn write_jsonl(path: &Path, records: &[Value]) {
    let text: String = records.iter().map(|r| format!("{r}\n")).collect();
    fs_err::write(path, text).unwrap();
}

fn run_trace(
    teacher: &LocalBackend,
    base: &LocalBackend,
    distilled: &LocalBackend,
    records: &[Value],
    thresholds: Thresholds,
) -> (Vec<Map<String, Value>>, TraceSummary) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    write_jsonl(&input, records);
    let mut options = TraceOptions::new(&input, &output);
    options.thresholds = thresholds;
    options.batch_size = 2;
    let mut calls = 0;
    let summary = trace(teacher, base, distilled, &options, &mut |_, _| calls += 1).unwrap();
    assert!(calls >= 2, "progress is reported");
    let out = read_records(&output)
        .unwrap()
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    (out, summary)
}

fn actions(record: &Map<String, Value>) -> &Vec<Value> {
    record["actions"].as_array().expect("actions array")
}

fn column(record: &Map<String, Value>, model: &str) -> Vec<Option<f64>> {
    actions(record)
        .iter()
        .map(|a| a["logprob"][model].as_f64())
        .collect()
}

fn encode(backend: &LocalBackend, text: &str) -> Vec<u32> {
    backend.model().tokenizer.encode(text, false).unwrap()
}

#[test]
fn action_logprob_equals_direct_score_of_the_sentence_in_context() {
    let teacher = model("qwen2-tiny");
    let base = model("llama-tiny");
    let distilled = model("qwen3-tiny");
    let records =
        [json!({"id": "a", "prompt": PROMPT, "response": RESPONSE, "verdict": {"correct": true}})];
    let (out, summary) = run_trace(&teacher, &base, &distilled, &records, Thresholds::default());
    let acts = actions(&out[0]);
    let texts: Vec<&str> = acts.iter().map(|a| a["text"].as_str().unwrap()).collect();
    assert_eq!(
        texts,
        [
            " He starts with 19 apples.",
            " He gives away 5 apples.",
            " So 19 - 5 = 14.",
            " The answer is 14."
        ]
    );
    assert_eq!(out[0]["id"], "a", "input fields are carried");
    assert_eq!(summary.actions, 4);
    assert_eq!(summary.correct.records, 1);

    let prompt_ids = teacher.prompt_ids(&Prompt::Text(PROMPT.into())).unwrap();
    let mut max_diff = 0.0f64;
    for (model_name, backend) in [
        ("teacher", &teacher),
        ("base", &base),
        ("distilled", &distilled),
    ] {
        for action in acts {
            let start = action["start"].as_u64().unwrap() as usize;
            let end = action["end"].as_u64().unwrap() as usize;
            let (prefix, sentence) = (&RESPONSE[..start], &RESPONSE[start..end]);
            // The premise: this boundary tokenizes cleanly.
            let joined: Vec<u32> = [encode(backend, prefix), encode(backend, sentence)].concat();
            assert_eq!(
                joined,
                encode(backend, &RESPONSE[..end]),
                "boundary before {sentence:?} must be clean"
            );
            let context: Vec<u32> = [prompt_ids.clone(), encode(backend, prefix)].concat();
            let model = backend.model();
            let scores = retort_model::score::score_batch(
                &model.model,
                &[(context, encode(backend, sentence))],
                model.pad_id(),
            )
            .unwrap();
            let direct =
                scores[0].iter().map(|&x| f64::from(x)).sum::<f64>() / scores[0].len() as f64;
            let traced = action["logprob"][model_name].as_f64().unwrap();
            max_diff = max_diff.max((direct - traced).abs());
            assert!(
                (direct - traced).abs() < 1e-4,
                "{model_name} {sentence:?}: traced {traced} vs direct {direct}"
            );
        }
    }
    eprintln!("trace vs direct score: max_abs_diff = {max_diff:e}");
    // Random models disagree: the three columns differ.
    assert_ne!(column(&out[0], "teacher"), column(&out[0], "base"));
}

#[test]
fn distilled_equal_to_teacher_gives_identical_columns() {
    let teacher = model("qwen2-tiny");
    let teacher_again = model("qwen2-tiny");
    let base = model("llama-tiny");
    let records = [
        json!({"id": "a", "prompt": PROMPT, "response": RESPONSE}),
        json!({"id": "b", "prompt": "Add 3 and 4.", "response": "3 + 4 = 7. The answer is 7."}),
        json!({"id": "c", "prompt": "Say nothing.", "response": ""}),
    ];
    let (out, _) = run_trace(
        &teacher,
        &base,
        &teacher_again,
        &records,
        Thresholds::default(),
    );
    for record in &out {
        assert_eq!(column(record, "teacher"), column(record, "distilled"));
    }
    assert!(
        actions(&out[2]).is_empty(),
        "an empty response has no actions"
    );
    // The same object passed twice takes the shortcut and agrees too.
    let (same, _) = run_trace(&teacher, &base, &teacher, &records, Thresholds::default());
    assert_eq!(column(&same[0], "distilled"), column(&out[0], "distilled"));
}

#[test]
fn distilled_equal_to_base_boosts_nothing() {
    let teacher = model("qwen2-tiny");
    let base = model("llama-tiny");
    let base_again = model("llama-tiny");
    let other = model("qwen3-tiny");
    let records = [
        json!({"id": "a", "prompt": PROMPT, "response": RESPONSE, "verdict": {"correct": true}}),
        json!({"id": "b", "prompt": "Add 3 and 4.", "response": "3 + 4 = 7. The answer is 7.", "verdict": {"correct": false}}),
    ];
    // Everything is "likely" under both models, so each action is shared or boosted.
    let lenient = Thresholds::confident(-1e9, 0.0);
    let (out, summary) = run_trace(&teacher, &base, &base_again, &records, lenient);
    assert_eq!(summary.counts.boosted, 0);
    assert_eq!(summary.counts.shared, summary.actions);
    for record in &out {
        assert_eq!(column(record, "base"), column(record, "distilled"));
        assert!(actions(record).iter().all(|a| a["category"] == "shared"));
    }
    // The check can fail: a margin every difference clears makes every action boosted.
    let eager = Thresholds::confident(-1e9, -1e9);
    let (_, summary) = run_trace(&teacher, &base, &other, &records, eager);
    assert_eq!(summary.counts.boosted, summary.actions);
    assert_eq!(summary.shares["boosted"], 1.0);
    assert_eq!(summary.correct.records + summary.incorrect.records, 2);
    // The paper's rule on random models: every action is improbable under all three models
    // (mean log-probs near ln(1/512)), so the probabilities agree within alpha: all shared.
    let (out, summary) = run_trace(&teacher, &base, &other, &records, Thresholds::default());
    assert_eq!(summary.counts.shared, summary.actions);
    let positioned: usize = summary.by_position.all.iter().map(|c| c.total()).sum();
    assert_eq!(positioned, summary.actions);
    let split: usize = summary
        .by_position
        .correct
        .iter()
        .chain(&summary.by_position.incorrect)
        .map(|c| c.total())
        .sum();
    assert_eq!(split, summary.actions, "both records carry a verdict");
    assert!(
        out.iter()
            .flat_map(actions)
            .all(|a| a["category"] == "shared")
    );
    // The confident rule's defaults on random models: nothing is likely.
    let confident = Thresholds {
        rule: retort::provenance::Rule::Confident,
        ..Thresholds::default()
    };
    let (out, summary) = run_trace(&teacher, &base, &other, &records, confident);
    assert_eq!(summary.counts.unattributed, summary.actions);
    assert!(
        out.iter()
            .flat_map(actions)
            .all(|a| a["category"] == Category::Unattributed.as_str())
    );
    assert_eq!(summary.correct.teacher_share, Some(0.0));
}

#[test]
fn trace_reports_bad_input_with_file_and_line() {
    let teacher = model("qwen2-tiny");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    write_jsonl(
        &input,
        &[
            json!({"prompt": "x", "response": "y"}),
            json!({"prompt": "x", "response": 3}),
        ],
    );
    let options = TraceOptions::new(&input, dir.path().join("out.jsonl"));
    let err = trace(&teacher, &teacher, &teacher, &options, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("in.jsonl:2: field `response`: expected a string"),
        "{err}"
    );
    assert!(
        !dir.path().join("out.jsonl").exists(),
        "nothing is written on error"
    );
}

#[test]
fn eval_on_a_fixture_model_writes_the_summary_keys() {
    let backend = model("qwen2-tiny");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("problems.jsonl");
    write_jsonl(
        &input,
        &[
            json!({"id": "p1", "prompt": "What is 2 + 2?", "answer": "4", "level": 1}),
            json!({"id": "p2", "prompt": "What is 3 + 5?", "answer": "8", "level": 2}),
            json!({"id": "p3", "prompt": "What is 1 + 1?", "answer": "2", "level": 2}),
        ],
    );
    let output: PathBuf = dir.path().join("traces.jsonl");
    let mut options = EvalOptions::new(&input);
    options.output = Some(output.clone());
    options.samples = 2;
    options.by = Some("level".into());
    options.sampling = SamplingParams {
        temperature: 1.0,
        max_new_tokens: 6,
        seed: Some(7),
        ..SamplingParams::default()
    };
    let summary = evaluate(&backend, &options, &mut |_, _| {}).unwrap();
    assert_eq!(summary.overall.problems, 3);
    assert_eq!(summary.overall.traces, 6);
    assert_eq!(summary.samples, 2);
    assert!(summary.overall.mean_tokens > 0.0 && summary.overall.mean_tokens <= 6.0);
    let json = serde_json::to_value(&summary).unwrap();
    for key in [
        "accuracy",
        "pass_at_k",
        "maj_at_k",
        "mean_tokens",
        "truncation_rate",
        "by",
        "problems",
        "traces",
        "correct",
    ] {
        assert!(json.get(key).is_some(), "summary lacks `{key}`: {json}");
    }
    assert!(json["pass_at_k"].get("1").is_some() && json["pass_at_k"].get("2").is_some());
    assert_eq!(json["by"].as_object().unwrap().len(), 2);
    let traces = read_records(&output).unwrap();
    assert_eq!(traces.len(), 6);
    assert!(
        traces
            .iter()
            .all(|(_, r)| r["verdict"]["correct"].is_boolean()),
        "traces carry verdicts"
    );
    // A rerun resumes from the traces already there and gives the same figures.
    let again = evaluate(&backend, &options, &mut |_, _| {}).unwrap();
    assert_eq!(again.overall, summary.overall);
    assert_eq!(again.generation.as_ref().map(|g| g.already_done), Some(6));
}

#[test]
fn eval_against_a_remote_model_matches_hand_computed_pass_at_k() {
    use retort::backend::open::{BackendOptions, open_backend};
    use retort::eval::pass_at_k;
    use retort::mock_server::{FaultPlan, MockServer, mock_answer};

    let server = MockServer::start(FaultPlan::none()).expect("mock server");
    let spec: retort::ModelSpec = server.spec("mock").parse().unwrap();
    let backend = open_backend(&spec, &BackendOptions::default()).unwrap();
    let (samples, seed) = (4usize, 40u64);
    let prompts = ["Problem one?", "Problem two?", "Problem three?"];
    // The mock answers sample s of prompt p with mock_answer(p, seed + s); gold = sample g's answer.
    let answers: Vec<Vec<u64>> = prompts
        .iter()
        .map(|p| {
            (0..samples)
                .map(|s| mock_answer(p, Some(seed + s as u64)))
                .collect()
        })
        .collect();
    let gold: Vec<u64> = vec![answers[0][0], answers[1][2], 1000];
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("problems.jsonl");
    let records: Vec<Value> = prompts
        .iter()
        .zip(&gold)
        .enumerate()
        .map(|(i, (p, g))| json!({"id": format!("p{i}"), "prompt": p, "answer": g.to_string()}))
        .collect();
    write_jsonl(&input, &records);
    let mut options = EvalOptions::new(&input);
    options.samples = samples;
    options.sampling = SamplingParams {
        temperature: 0.6,
        top_p: 0.95,
        seed: Some(seed),
        ..SamplingParams::default()
    };
    let summary = evaluate(backend.as_ref(), &options, &mut |_, _| {}).unwrap();
    let correct: Vec<usize> = answers
        .iter()
        .zip(&gold)
        .map(|(a, g)| a.iter().filter(|x| *x == g).count())
        .collect();
    assert!(correct[0] >= 1 && correct[1] >= 1 && correct[2] == 0);
    let expected_accuracy = correct
        .iter()
        .map(|&c| c as f64 / samples as f64)
        .sum::<f64>()
        / 3.0;
    assert!((summary.overall.accuracy - expected_accuracy).abs() < 1e-12);
    for k in [1, 2, 4] {
        let expected = correct
            .iter()
            .map(|&c| pass_at_k(samples, c, k))
            .sum::<f64>()
            / 3.0;
        assert!(
            (summary.overall.pass_at_k[&k] - expected).abs() < 1e-12,
            "pass@{k}"
        );
    }
    assert_eq!(summary.overall.no_answer_rate, 0.0);
    assert_eq!(summary.generation.as_ref().map(|g| g.failed), Some(0));
    assert!(
        !dir.path().join("traces.jsonl").exists(),
        "no output asked, none kept"
    );
}
