//! The select stage: every strategy on small constructed sets, composition order, the cap and the
//! budget, and the model-scored strategies on the fixture models checked against scores computed
//! here directly with `score_batch` and full logits.

use candle_core::Tensor;
use retort::backend::local::LocalBackend;
use retort::select::{
    LocalScorer, SelectOptions, SelectSummary, Strategy, select, select_file, sentences,
};
use serde_json::{Map, Value, json};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures");

fn records(values: Vec<Value>) -> Vec<Map<String, Value>> {
    values
        .into_iter()
        .map(|v| v.as_object().expect("test records are objects").clone())
        .collect()
}

fn trace(id: &str, prompt: &str, response: &str, correct: bool, tokens: u64) -> Value {
    json!({"id": id, "prompt": prompt, "response": response, "verdict": {"correct": correct, "extracted": null},
           "finish_reason": "stop", "num_tokens": tokens})
}

fn options(strategies: &[Strategy]) -> SelectOptions {
    SelectOptions {
        strategies: strategies.to_vec(),
        ..SelectOptions::default()
    }
}

fn run(input: Vec<Value>, options: &SelectOptions) -> (Vec<String>, SelectSummary) {
    let (kept, summary) = select(records(input), options, None).expect("selection runs");
    let ids = kept
        .iter()
        .map(|r| {
            r["response"]
                .as_str()
                .unwrap_or_default()
                .chars()
                .take(2)
                .collect()
        })
        .collect();
    (ids, summary)
}

fn dropped(summary: &SelectSummary, reason: &str) -> usize {
    summary.dropped.get(reason).copied().unwrap_or(0)
}

/// 60 pseudo-random words (an LCG over a small vocabulary), so different seeds give unrelated texts.
fn long_text(seed: u64) -> String {
    let vocab = [
        "apples", "bridge", "carbon", "delta", "engine", "forest", "garden", "harbor", "island",
        "jungle", "kettle", "ladder", "marble", "needle", "orange", "pepper", "quartz", "rocket",
        "silver", "tunnel", "violet", "window",
    ];
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..60)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            vocab[((x >> 33) % vocab.len() as u64) as usize]
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn correct_finished_and_length_filters_count_their_reasons() {
    let mut truncated = trace("p3", "q3", "C3 cut", true, 50);
    truncated["finish_reason"] = json!("length");
    let mut unverified = trace("p4", "q4", "D4", true, 5);
    unverified
        .as_object_mut()
        .expect("object")
        .remove("verdict");
    let input = vec![
        trace("p1", "q1", "A1 fine", true, 10),
        trace("p2", "q2", "B2 wrong", false, 10),
        truncated,
        unverified,
        trace("p5", "q5", "E5 long", true, 500),
        trace("p6", "q6", "F6 short", true, 1),
    ];
    let mut opts = options(&[Strategy::Correct, Strategy::Finished, Strategy::Length]);
    opts.min_tokens = Some(2);
    opts.max_tokens = Some(100);
    let (kept, summary) = run(input, &opts);
    assert_eq!(kept, ["A1"]);
    assert_eq!(summary.input, 6);
    assert_eq!(summary.kept, 1);
    for reason in [
        "incorrect",
        "no_verdict",
        "truncated",
        "too_long",
        "too_short",
    ] {
        assert_eq!(
            dropped(&summary, reason),
            1,
            "{reason}: {:?}",
            summary.dropped
        );
    }
    assert_eq!(
        summary
            .steps
            .iter()
            .map(|s| (s.before, s.after))
            .collect::<Vec<_>>(),
        [(6, 4), (4, 3), (3, 1)]
    );
}

#[test]
fn dedup_finds_exact_and_near_duplicates_and_keeps_a_different_text() {
    let base = long_text(1);
    // One word changed of 60: 5-word shingle Jaccard ≈ 51/61 ≈ 0.84 ≥ 0.8.
    let mut words: Vec<&str> = base.split(' ').collect();
    words[30] = "zeppelin";
    let near = words.join(" ");
    let other = long_text(2);
    let input = vec![
        trace("p1", "Solve it.", &format!("N1 {base}"), true, 60),
        trace(
            "p1",
            "Solve  it.",
            &format!("n1   {}", base.to_uppercase()),
            true,
            60,
        ),
        trace("p1", "Solve it.", &format!("N1 {near}"), true, 60),
        trace("p1", "Solve it.", &format!("O2 {other}"), true, 60),
    ];
    let (kept, summary) = run(input.clone(), &options(&[Strategy::Dedup]));
    assert_eq!(kept, ["N1", "O2"], "{:?}", summary.dropped);
    assert_eq!(dropped(&summary, "duplicate"), 1);
    assert_eq!(dropped(&summary, "near_duplicate"), 1);
    // A stricter threshold keeps the one-word edit.
    let mut strict = options(&[Strategy::Dedup]);
    strict.jaccard = 0.95;
    let (kept, _) = run(input, &strict);
    assert_eq!(kept.len(), 3);
}

#[test]
fn decontamination_drops_items_overlapping_the_eval_prompts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let eval = dir.path().join("eval.jsonl");
    let leaked =
        "A train leaves the station at nine and travels sixty miles per hour toward the coast";
    fs_err::write(
        &eval,
        format!(
            "{}\n{}\n",
            json!({"id": "e1", "prompt": leaked}),
            json!({"id": "e2", "prompt": "What is 17 times 23?"})
        ),
    )
    .expect("write eval");
    let input = vec![
        trace(
            "p1",
            &format!("Question: {}?", leaked.to_lowercase()),
            "L1 answer",
            true,
            5,
        ),
        trace(
            "p2",
            "An unrelated question about gardens.",
            "K2 fine",
            true,
            5,
        ),
        trace(
            "p3",
            "Anything",
            "S3 as asked: what is 17 TIMES 23? It is 391.",
            true,
            5,
        ),
        trace(
            "p4",
            "A train leaves the station at ten",
            "K4 fine",
            true,
            5,
        ),
    ];
    let mut opts = options(&[Strategy::Decontaminate]);
    opts.eval_files = vec![eval];
    let (kept, summary) = run(input, &opts);
    assert_eq!(kept, ["K2", "K4"]);
    assert_eq!(dropped(&summary, "contaminated"), 2);
    let err = select(records(vec![]), &options(&[Strategy::Decontaminate]), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("eval files"), "{err}");
}

#[test]
fn difficulty_keeps_problems_within_the_pass_rate_band() {
    // Student samples: easy 4/4, mid 2/4, hard 0/4.
    let mut input = Vec::new();
    for (id, correct) in [("easy", 4), ("mid", 2), ("hard", 0)] {
        for k in 0..4 {
            input.push(trace(id, id, &format!("{}{k}", &id[..1]), k < correct, 5));
        }
    }
    let mut opts = options(&[Strategy::Difficulty]);
    opts.min_pass_rate = 0.25;
    opts.max_pass_rate = 0.75;
    let (kept, summary) = run(input.clone(), &opts);
    assert_eq!(kept, ["m0", "m1", "m2", "m3"]);
    assert_eq!(dropped(&summary, "too_easy"), 4);
    assert_eq!(dropped(&summary, "too_hard"), 4);
    // Composed with `correct` first, pass rates still come from all the input's samples.
    opts.strategies = vec![Strategy::Correct, Strategy::Difficulty];
    let (kept, _) = run(input.clone(), &opts);
    assert_eq!(kept, ["m0", "m1"]);
    // Pass rates from a separate file of student samples.
    let dir = tempfile::tempdir().expect("temp dir");
    let samples = dir.path().join("student.jsonl");
    let lines: Vec<String> = [("easy", false), ("easy", true), ("hard", true)]
        .iter()
        .map(|(id, c)| json!({"id": id, "prompt": id, "verdict": {"correct": c}}).to_string())
        .collect();
    fs_err::write(&samples, lines.join("\n")).expect("write samples");
    opts.strategies = vec![Strategy::Difficulty];
    opts.difficulty_from = Some(samples);
    let (kept, summary) = run(input, &opts);
    assert_eq!(kept, ["e0", "e1", "e2", "e3"]);
    assert_eq!(dropped(&summary, "no_pass_rate"), 4);
    assert_eq!(dropped(&summary, "too_easy"), 4);
}

#[test]
fn random_is_seeded_and_shortest_orders_by_tokens() {
    let input: Vec<Value> = (0..20)
        .map(|i| {
            trace(
                &format!("p{i}"),
                "q",
                &format!("{:02}", i),
                true,
                (20 - i) as u64,
            )
        })
        .collect();
    let mut opts = options(&[Strategy::Random]);
    let (a, _) = run(input.clone(), &opts);
    let (b, _) = run(input.clone(), &opts);
    opts.seed = 1;
    let (c, _) = run(input.clone(), &opts);
    assert_eq!(a, b);
    assert_ne!(a, c);
    let mut sorted = a.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        (0..20).map(|i| format!("{i:02}")).collect::<Vec<_>>()
    );
    let (s, _) = run(input, &options(&[Strategy::Random, Strategy::Shortest]));
    assert_eq!(s[..3], ["19", "18", "17"]);
}

#[test]
fn per_problem_cap_then_budget() {
    let input: Vec<Value> = (0..9)
        .map(|i| {
            trace(
                &format!("p{}", i % 3),
                "q",
                &format!("{i}{}", i % 3),
                true,
                5,
            )
        })
        .collect();
    let mut opts = options(&[]);
    opts.per_problem = Some(2);
    opts.budget = Some(5);
    let (kept, summary) = run(input, &opts);
    assert_eq!(kept, ["00", "11", "22", "30", "41"]);
    assert_eq!(dropped(&summary, "per_problem_cap"), 3);
    assert_eq!(dropped(&summary, "budget"), 1);
    assert_eq!(summary.kept_problems, 3);
    assert_eq!(
        summary.steps.last().map(|s| s.step.as_str()),
        Some("budget")
    );
}

#[test]
fn strategies_compose_in_the_order_given() {
    let text = long_text(3);
    let input = vec![
        trace("p1", "q", &format!("W1 {text}"), false, 5),
        trace("p1", "q", &format!("w1 {text}"), true, 5),
    ];
    // Dedup first: the correct copy is the duplicate, then the first copy is incorrect.
    let (kept, summary) = run(
        input.clone(),
        &options(&[Strategy::Dedup, Strategy::Correct]),
    );
    assert!(kept.is_empty());
    assert_eq!(
        (
            dropped(&summary, "duplicate"),
            dropped(&summary, "incorrect")
        ),
        (1, 1)
    );
    // Correct first: the correct copy survives dedup.
    let (kept, _) = run(input, &options(&[Strategy::Correct, Strategy::Dedup]));
    assert_eq!(kept, ["w1"]);
}

#[test]
fn select_file_writes_output_and_manifest_and_names_bad_lines() {
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("traces.jsonl");
    let lines = [
        trace("p1", "q", "A", true, 3),
        trace("p2", "q2", "B", false, 3),
    ];
    fs_err::write(
        &input,
        lines
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .expect("write input");
    let output = dir.path().join("out/selected.jsonl");
    let summary = select_file(&input, &output, &options(&[Strategy::Correct]), None, &[])
        .expect("select_file");
    assert_eq!(summary.kept, 1);
    let written = fs_err::read_to_string(&output).expect("output");
    assert_eq!(written.lines().count(), 1);
    let manifest: Value = serde_json::from_str(
        &fs_err::read_to_string(dir.path().join("out/selected.jsonl.manifest.json"))
            .expect("manifest"),
    )
    .expect("manifest JSON");
    assert_eq!(manifest["counts"]["dropped"]["incorrect"], 1);
    assert_eq!(manifest["settings"]["strategies"], json!(["correct"]));
    // A record without the response field: the error names the file and the line.
    fs_err::write(
        &input,
        format!(
            "{}\n{}\n",
            trace("p1", "q", "A", true, 3),
            json!({"id": "x", "prompt": "q"})
        ),
    )
    .expect("write input");
    let err = select_file(&input, &output, &options(&[Strategy::Dedup]), None, &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("traces.jsonl:2: missing field `response`"),
        "{err}"
    );
    let err = select(records(vec![]), &options(&[Strategy::TeacherGuided]), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--teacher"), "{err}");
}

// ---- Model-scored strategies on the fixture models (llama-tiny teacher, qwen2-tiny student). ----

fn model(name: &str) -> LocalBackend {
    let path = format!("{FIXTURES}/{name}");
    LocalBackend::load(&path, 4).unwrap_or_else(|e| panic!("load fixture `{path}`: {e}"))
}

fn scored_input() -> Vec<Value> {
    [
        ("q1", "The answer is 4. So 2 + 2 = 4."),
        ("q2", "First, add the numbers. The total is 12."),
        ("q3", "banana zebra quantum 7. purple"),
        ("q4", "We have 3.5 apples, e.g. a lot. Done."),
        ("q5", "Hello world."),
    ]
    .iter()
    .map(|(id, response)| trace(id, &format!("Question {id}: compute."), response, true, 5))
    .collect()
}

/// Per-token log-probs, ranks and byte offsets of a response.
type Direct = (Vec<f32>, Vec<u32>, Vec<(usize, usize)>);

/// Per-token (log-prob, rank) of `response` under `backend`, unbatched, from full logits.
fn direct(
    backend: &LocalBackend,
    prompt: &str,
    response: &str,
) -> (Vec<f32>, Vec<u32>, Vec<(usize, usize)>) {
    let model = backend.model();
    let prompt_ids = model.tokenizer.encode(prompt, true).expect("encode prompt");
    let encoding = model
        .tokenizer
        .inner()
        .encode(response, false)
        .expect("encode response");
    let ids = encoding.get_ids().to_vec();
    let logprobs = retort_model::score::score_batch(
        &model.model,
        &[(prompt_ids.clone(), ids.clone())],
        model.pad_id(),
    )
    .expect("score_batch")
    .remove(0);
    let all: Vec<u32> = prompt_ids.iter().chain(&ids).copied().collect();
    let input = Tensor::new(all.as_slice(), model.model.device())
        .and_then(|t| t.unsqueeze(0))
        .expect("tensor");
    let logits = model
        .model
        .forward(&input, None, None)
        .expect("forward")
        .squeeze(0)
        .expect("squeeze");
    let logits: Vec<Vec<f32>> = logits.to_vec2().expect("logits");
    let ranks = ids
        .iter()
        .enumerate()
        .map(|(t, &id)| {
            let row = &logits[prompt_ids.len() - 1 + t];
            1 + row.iter().filter(|&&x| x > row[id as usize]).count() as u32
        })
        .collect();
    (logprobs, ranks, encoding.get_offsets().to_vec())
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = xs.collect();
    v.iter().sum::<f64>() / v.len() as f64
}

fn kept_scores(kept: &[Map<String, Value>]) -> Vec<(String, f64)> {
    kept.iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap_or_default().to_string(),
                r["selection"]["score"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect()
}

fn check_ranking(kept: &[(String, f64)], expected: &[(String, f64)], descending: bool, what: &str) {
    let mut expected = expected.to_vec();
    expected.sort_by(|a, b| {
        if descending {
            b.1.total_cmp(&a.1)
        } else {
            a.1.total_cmp(&b.1)
        }
    });
    let mut max_abs_diff = 0.0f64;
    for ((id, got), (want_id, want)) in kept.iter().zip(&expected) {
        assert_eq!(
            id, want_id,
            "{what}: order differs: kept {kept:?}, expected {expected:?}"
        );
        max_abs_diff = max_abs_diff.max((got - want).abs() / want.abs().max(1.0));
    }
    println!("{what}: max_rel_diff = {max_abs_diff:.3e}");
    assert!(max_abs_diff < 1e-4, "{what}: {kept:?} vs {expected:?}");
}

#[test]
fn model_scored_strategies_follow_direct_scores_on_the_fixture_models() {
    let teacher = model("llama-tiny");
    let student = model("qwen2-tiny");
    let scorer = LocalScorer {
        student: Some(&student),
        teacher: Some(&teacher),
        batch_size: 3,
    };
    let input = scored_input();
    let direct_scores: Vec<(String, Direct, Direct, String)> = input
        .iter()
        .map(|r| {
            let (id, prompt, response) = (
                r["id"].as_str().unwrap_or_default(),
                r["prompt"].as_str().unwrap_or_default(),
                r["response"].as_str().unwrap_or_default(),
            );
            (
                id.to_string(),
                direct(&student, prompt, response),
                direct(&teacher, prompt, response),
                response.to_string(),
            )
        })
        .collect();

    // Student perplexity, lowest first; and highest first on request.
    let ppl: Vec<(String, f64)> = direct_scores
        .iter()
        .map(|(id, s, _, _)| (id.clone(), (-mean(s.0.iter().map(|&x| f64::from(x)))).exp()))
        .collect();
    let (kept, _) = select(
        records(input.clone()),
        &options(&[Strategy::StudentPpl]),
        Some(&scorer),
    )
    .expect("student-ppl");
    check_ranking(&kept_scores(&kept), &ppl, false, "student-ppl");
    let mut high = options(&[Strategy::StudentPpl]);
    high.ppl_highest = true;
    let (kept, _) = select(records(input.clone()), &high, Some(&scorer)).expect("student-ppl high");
    check_ranking(&kept_scores(&kept), &ppl, true, "student-ppl (highest)");

    // RSR: mean rank (capped at 100) over mean surprisal, lowest first.
    let rsr: Vec<(String, f64)> = direct_scores
        .iter()
        .map(|(id, s, _, _)| {
            let rank = mean(s.1.iter().map(|&r| f64::from(r.min(100))));
            (id.clone(), rank / mean(s.0.iter().map(|&x| -f64::from(x))))
        })
        .collect();
    let (kept, _) = select(
        records(input.clone()),
        &options(&[Strategy::Rsr]),
        Some(&scorer),
    )
    .expect("rsr");
    check_ranking(&kept_scores(&kept), &rsr, false, "rsr");

    // Teacher-guided: per-sentence mean log-prob, teacher − student, averaged; highest first.
    let sentence_mean =
        |text: &str, scores: &(Vec<f32>, Vec<u32>, Vec<(usize, usize)>), (a, b): (usize, usize)| {
            let values: Vec<f64> = scores
                .2
                .iter()
                .zip(&scores.0)
                .filter(|((s, e), _)| {
                    // A token belongs to the sentence of its first non-whitespace byte.
                    let span = &text[*s..*e];
                    let first = if span.trim().is_empty() {
                        *s
                    } else {
                        s + span.len() - span.trim_start().len()
                    };
                    first >= a && first < b
                })
                .map(|(_, &lp)| f64::from(lp))
                .collect();
            (!values.is_empty()).then(|| mean(values.into_iter()))
        };
    let guided: Vec<(String, f64)> = direct_scores
        .iter()
        .map(|(id, s, t, text)| {
            let diffs = sentences(text).into_iter().filter_map(|cut| {
                Some(sentence_mean(text, t, cut)? - sentence_mean(text, s, cut)?)
            });
            (id.clone(), mean(diffs))
        })
        .collect();
    let mut opts = options(&[Strategy::TeacherGuidedMean]);
    opts.budget = Some(3);
    let (kept, summary) =
        select(records(input.clone()), &opts, Some(&scorer)).expect("teacher-guided-mean");
    assert_eq!(kept.len(), 3);
    assert_eq!(dropped(&summary, "budget"), 2);
    assert_eq!(kept[0]["selection"]["strategy"], "teacher-guided-mean");
    check_ranking(&kept_scores(&kept), &guided, true, "teacher-guided-mean");
    println!("teacher-guided-mean scores: {guided:?}");

    // The paper's count: sentences whose geometric-mean token probability is higher under the
    // teacher by more than beta; with a beta every gap clears, the count is the sentence count.
    let counts = |beta: f64| -> Vec<(String, f64)> {
        direct_scores
            .iter()
            .map(|(id, s, t, text)| {
                let n = sentences(text)
                    .into_iter()
                    .filter_map(|cut| {
                        Some(
                            sentence_mean(text, t, cut)?.exp() - sentence_mean(text, s, cut)?.exp(),
                        )
                    })
                    .filter(|gap| *gap > beta)
                    .count();
                (id.clone(), n as f64)
            })
            .collect()
    };
    for beta in [-1.0, 0.0, 0.001] {
        let mut opts = options(&[Strategy::TeacherGuided]);
        opts.teacher_guided_beta = beta;
        let (kept, _) = select(records(input.clone()), &opts, Some(&scorer)).expect("count");
        assert_eq!(kept[0]["selection"]["strategy"], "teacher-guided");
        let want = counts(beta);
        check_ranking(&kept_scores(&kept), &want, true, "teacher-guided");
        // The min arm keeps the same scores, fewest first.
        let mut opts = options(&[Strategy::TeacherGuidedMin]);
        opts.teacher_guided_beta = beta;
        let (kept, _) = select(records(input.clone()), &opts, Some(&scorer)).expect("min");
        check_ranking(&kept_scores(&kept), &want, false, "teacher-guided-min");
        println!("teacher-guided counts at beta {beta}: {want:?}");
    }

    // Two scoring strategies: the last decides the order; both values are recorded.
    let (kept, summary) = select(
        records(input),
        &options(&[Strategy::StudentPpl, Strategy::TeacherGuided]),
        Some(&scorer),
    )
    .expect("both");
    assert_eq!(kept[0]["selection"]["strategy"], "teacher-guided");
    assert!(kept[0]["selection_scores"]["student-ppl"].is_f64());
    assert_eq!(summary.scores.len(), 2);
}

#[test]
fn scorer_needs_its_models() {
    let student = model("qwen2-tiny");
    let scorer = LocalScorer {
        student: Some(&student),
        teacher: None,
        batch_size: 2,
    };
    let err = select(
        records(scored_input()),
        &options(&[Strategy::TeacherGuided]),
        Some(&scorer),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("--teacher"), "{err}");
}
