//! Against a real vLLM serving the bundled world teacher (ignored unless `RETORT_VLLM_URL` is
//! set, e.g. `http://127.0.0.1:8011/v1`; the served name is `RETORT_VLLM_MODEL`, default
//! `teacher`): the served teacher scores, selects, traces, checks and teaches (KD, on-policy) as
//! the local one does. Serve it with
//! `shared/tools/vllm-cpu.sh serve VENV assets/world/teacher 8011 teacher` (`--max-logprobs 64`).
//!
//! Run: `RETORT_VLLM_URL=http://127.0.0.1:8011/v1 cargo test -p retort --test it vllm -- --ignored --nocapture`.

use std::path::{Path, PathBuf};

use retort::ModelSpec;
use retort::backend::Prompt;
use retort::backend::local::LocalBackend;
use retort::backend::openai::score::{RemoteScorer, ScoreProtocol};
use retort::backend::scorer::{ScoreRequest, ScoreWants, TokenScorer};
use retort::check::check_pair;
use retort::distill::cache::{CacheDtype, build_teacher_cache};
use retort::distill::{DistillOptions, DivergenceKind, Objective, distill};
use retort::provenance::{TraceOptions, trace};
use retort::select::{ModelScorer, SelectOptions, Strategy, select};
use retort::world::problems::generate_problems;
use retort::world::styles::{teacher_solution, terse_solution};
use serde_json::{Map, Value, json};

use crate::distill::{TestResult, metrics};
use crate::scoring::fast_options;

fn world(name: &str) -> PathBuf {
    retort::model_spec::world_dir().join(name)
}

fn server_spec() -> Option<ModelSpec> {
    let url = std::env::var("RETORT_VLLM_URL").ok()?;
    let model = std::env::var("RETORT_VLLM_MODEL").unwrap_or_else(|_| "teacher".into());
    ModelSpec::parse(&format!("openai:{url}#{model}")).ok()
}

fn served_teacher(spec: &ModelSpec) -> RemoteScorer {
    RemoteScorer::connect(
        spec.server().expect("a server spec"),
        &world("teacher"),
        ScoreProtocol::Auto,
        &fast_options(),
    )
    .expect("client builds")
}

/// World problems answered in the teacher's style and the student's terse style.
fn records(n: usize) -> Vec<Map<String, Value>> {
    let problems = generate_problems(11, &[1, 2, 3], n.div_ceil(6), "v", &Default::default());
    let mut out = Vec::new();
    for (i, problem) in problems.iter().enumerate() {
        for (style, response) in [
            ("teacher", teacher_solution(problem)),
            ("terse", terse_solution(problem)),
        ] {
            let value = json!({"id": format!("{}-{style}", problem.id), "prompt": problem.prompt(),
                "response": response, "verdict": {"correct": i % 3 != 0, "extracted": null}});
            out.push(value.as_object().cloned().unwrap_or_default());
        }
    }
    out.truncate(n);
    out
}

fn write_jsonl(path: &Path, records: &[Map<String, Value>]) -> std::io::Result<()> {
    let text: String = records
        .iter()
        .map(|r| format!("{}\n", Value::Object(r.clone())))
        .collect();
    fs_err::write(path, text)
}

#[test]
#[ignore = "needs a vLLM server: set RETORT_VLLM_URL"]
fn vllm_scores_select_trace_and_check_as_local() -> TestResult {
    let Some(spec) = server_spec() else {
        return Ok(());
    };
    let remote = served_teacher(&spec);
    let teacher = LocalBackend::load(world("teacher"), 8)?;
    let student = LocalBackend::load(world("student"), 8)?;
    let input = records(24);

    // Log-probs, ranks and the top-20.
    let requests: Vec<ScoreRequest> = input
        .iter()
        .enumerate()
        .map(|(i, r)| ScoreRequest {
            label: format!("record {i}"),
            prompt_ids: teacher
                .prompt_ids(&Prompt::Text(
                    r["prompt"].as_str().unwrap_or_default().into(),
                ))
                .unwrap_or_default(),
            completion_ids: TokenScorer::tokenizer(&teacher)
                .encode(r["response"].as_str().unwrap_or_default(), false)
                .unwrap_or_default(),
        })
        .collect();
    let wants = ScoreWants {
        top_k: 20,
        ranks: true,
    };
    let (a, b) = (
        teacher.score_ids(&requests, wants)?,
        remote.score_ids(&requests, wants)?,
    );
    let (mut lp_diff, mut top_diff, mut tokens, mut rank_equal, mut top_ids_equal) =
        (0f32, 0f32, 0usize, 0usize, 0usize);
    for (x, y) in a.iter().zip(&b) {
        for i in 0..x.logprobs.len() {
            tokens += 1;
            lp_diff = lp_diff.max((x.logprobs[i] - y.logprobs[i]).abs());
            rank_equal += usize::from(x.ranks[i] == y.ranks[i]);
            let ids = |t: &[(u32, f32)]| t.iter().map(|p| p.0).collect::<Vec<_>>();
            top_ids_equal += usize::from(ids(&x.top[i]) == ids(&y.top[i]));
            for (p, q) in x.top[i].iter().zip(&y.top[i]) {
                if p.0 == q.0 {
                    top_diff = top_diff.max((p.1 - q.1).abs());
                }
            }
        }
    }
    println!(
        "vllm score: {tokens} tokens; max_abs_diff log-probs {lp_diff:.3e}, top-20 {top_diff:.3e}; \
         ranks equal {rank_equal}/{tokens}; top-20 ids equal {top_ids_equal}/{tokens}"
    );
    assert!(lp_diff < 1e-3, "{lp_diff}");

    // Teacher-guided selection.
    let options = SelectOptions {
        strategies: vec![Strategy::TeacherGuided],
        ..SelectOptions::default()
    };
    let local_scorer = ModelScorer {
        student: Some(&student),
        teacher: Some(&teacher),
        batch_size: 8,
    };
    let served_scorer = ModelScorer {
        student: Some(&student),
        teacher: Some(&remote),
        batch_size: 64,
    };
    let (x, _) = select(input.clone(), &options, Some(&local_scorer))?;
    let (y, _) = select(input.clone(), &options, Some(&served_scorer))?;
    let ids = |v: &[Map<String, Value>]| v.iter().map(|r| r["id"].clone()).collect::<Vec<_>>();
    let score_diff = x
        .iter()
        .zip(&y)
        .map(|(p, q)| {
            (p["selection"]["score"].as_f64().unwrap_or(0.0)
                - q["selection"]["score"].as_f64().unwrap_or(0.0))
            .abs()
        })
        .fold(0.0, f64::max);
    println!(
        "vllm select teacher-guided: ranking equal {}, max_abs_diff of scores {score_diff:.3e}",
        ids(&x) == ids(&y)
    );
    assert_eq!(ids(&x), ids(&y));

    // Trace.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("in.jsonl");
    write_jsonl(&path, &input)?;
    let mut trace_options = TraceOptions::new(&path, dir.path().join("local.jsonl"));
    let local = trace(&teacher, &student, &student, &trace_options, &mut |_, _| {})?;
    trace_options.output = dir.path().join("served.jsonl");
    trace_options.batch_size = 64;
    let served = trace(&remote, &student, &student, &trace_options, &mut |_, _| {})?;
    println!(
        "vllm trace: categories equal {} ({:?} vs {:?})",
        local.counts == served.counts,
        local.counts,
        served.counts
    );
    assert_eq!(local.counts, served.counts);

    // Check.
    let (x, y) = (
        check_pair(&teacher, &student)?,
        check_pair(&remote, &student)?,
    );
    let rows = |r: &retort::check::CheckReport| {
        r.rows
            .iter()
            .map(|row| (row.check.clone(), row.status, row.detail.clone()))
            .collect::<Vec<_>>()
    };
    println!(
        "vllm check: local {:?}\n            served {:?}",
        rows(&x),
        rows(&y)
    );
    assert_eq!(
        rows(&x).iter().map(|r| r.1).collect::<Vec<_>>(),
        rows(&y).iter().map(|r| r.1).collect::<Vec<_>>()
    );
    Ok(())
}

fn world_options(dir: &Path, output: &str, teacher: ModelSpec) -> std::io::Result<DistillOptions> {
    let path = dir.join("data.jsonl");
    write_jsonl(&path, &records(16))?;
    Ok(DistillOptions {
        student: Some(ModelSpec::folder(world("student"))),
        data: Some(path),
        output: Some(dir.join(output)),
        teacher: Some(teacher),
        objective: Objective::Kd,
        teacher_top_k: Some(64),
        batch_size: 4,
        lr: 1e-3,
        max_steps: Some(3),
        seed: 3,
        ..DistillOptions::default()
    })
}

fn loss_diff(a: &Path, b: &Path, keys: &[&str]) -> Result<f64, Box<dyn std::error::Error>> {
    let (a, b) = (metrics(a)?, metrics(b)?);
    let mut diff = 0f64;
    for (x, y) in a.iter().zip(&b) {
        for key in keys {
            if let (Some(p), Some(q)) = (x[*key].as_f64(), y[*key].as_f64()) {
                diff = diff.max((p - q).abs());
            }
        }
    }
    Ok(diff)
}

#[test]
#[ignore = "needs a vLLM server: set RETORT_VLLM_URL"]
fn vllm_teaches_kd_and_on_policy_as_local() -> TestResult {
    let Some(spec) = server_spec() else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    // KD, served live (top-64) vs a cache of the local teacher's top-64 at temperature 1.
    let live = world_options(dir.path(), "live", spec.clone())?;
    let local = world_options(dir.path(), "local", ModelSpec::folder(world("teacher")))?;
    let cache = dir.path().join("cache");
    build_teacher_cache(&local, &cache, 64, CacheDtype::F32, &mut |_, _| {})?;
    let mut cached = local.clone();
    cached.teacher = None;
    cached.teacher_cache = Some(cache);
    cached.output = Some(dir.path().join("cached"));
    let (a, b) = (distill(&live, &mut |_| {})?, distill(&cached, &mut |_| {})?);
    let keys = ["loss", "kd_loss", "grad_norm"];
    let kd = loss_diff(&a.output, &b.output, &keys)?;
    println!("vllm kd (top-64, served live vs local cache): max_abs_diff of losses {kd:.3e}");
    assert!(kd < 1e-3, "{kd}");

    // A cache built from the server vs the local one.
    let server_cache = dir.path().join("server-cache");
    build_teacher_cache(&live, &server_cache, 64, CacheDtype::F32, &mut |_, _| {})?;
    let mut from_server = cached.clone();
    from_server.teacher_cache = Some(server_cache);
    from_server.output = Some(dir.path().join("from-server"));
    let c = distill(&from_server, &mut |_| {})?;
    let cache_diff = loss_diff(&b.output, &c.output, &keys)?;
    println!("vllm kd (cache built from the server vs local cache): max_abs_diff {cache_diff:.3e}");
    assert!(cache_diff < 1e-3, "{cache_diff}");

    // On-policy, reverse-KL reward: the student samples locally, the teacher scores.
    let on_policy = |output: &str, teacher: ModelSpec| -> std::io::Result<DistillOptions> {
        let mut options = world_options(dir.path(), output, teacher)?;
        options.objective = Objective::OnPolicy;
        options.lambda = 1.0;
        options.max_new_tokens = 16;
        options.divergence = DivergenceKind::Rkl;
        Ok(options)
    };
    let x = distill(&on_policy("op-live", spec)?, &mut |_| {})?;
    let y = distill(
        &on_policy("op-local", ModelSpec::folder(world("teacher")))?,
        &mut |_| {},
    )?;
    let op = loss_diff(&x.output, &y.output, &["loss", "reverse_kl", "grad_norm"])?;
    println!("vllm on-policy reward (served vs local teacher): max_abs_diff {op:.3e}");
    assert!(op < 1e-3, "{op}");
    Ok(())
}
