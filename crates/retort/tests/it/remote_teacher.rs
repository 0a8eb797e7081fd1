//! Every teacher use through a server equals the local one on the fixture models: `select`
//! (teacher-guided, RSR, student-ppl), `trace`, `check`, KD with a live served teacher and with
//! a cache built from the server, and on-policy (reward and divergence forms). The server is
//! the mock in model mode, computing real log-probs with the same fixture model.

use std::path::Path;

use retort::ModelSpec;
use retort::backend::local::LocalBackend;
use retort::backend::scorer::{ScorerOptions, TokenScorer, open_scorer};
use retort::check::check_pair;
use retort::distill::cache::{CacheDtype, build_teacher_cache};
use retort::distill::{DistillOptions, DivergenceKind, Objective, OnPolicyLoss, distill};
use retort::mock_server::{FaultPlan, MockServer};
use retort::provenance::{TraceOptions, trace};
use retort::select::{ModelScorer, SelectOptions, Strategy, select};
use serde_json::{Map, Value, json};

use crate::distill::{TestResult, base_options, fixture, metrics};
use crate::scoring::{fast_options, served, spec_of};

fn remote(server: &MockServer, name: &str) -> Box<dyn TokenScorer> {
    open_scorer(
        &spec_of(&[server], name),
        &ScorerOptions {
            backend: fast_options(),
            ..ScorerOptions::default()
        },
    )
    .expect("the served fixture opens")
}

fn records() -> Vec<Map<String, Value>> {
    let texts = [
        ("Q: 2 + 3 = ?\nA:", " 2 plus 3 is 5. The answer is 5."),
        ("Q: 4 + 4 = ?\nA:", " 4 and 4 make 8. So 8. Done!"),
        ("Compute 7 * 6.", " 7 * 6 = 42. The answer is 42."),
        ("Say hi.", " Hi there. How are you?"),
        ("Q: 9 - 1 = ?\nA:", " 9 minus 1 is 8. Therefore 8."),
    ];
    texts
        .iter()
        .enumerate()
        .map(|(i, (prompt, response))| {
            let value = json!({"id": format!("r{i}"), "prompt": prompt, "response": response,
                "verdict": {"correct": true, "extracted": null}});
            value.as_object().cloned().unwrap_or_default()
        })
        .collect()
}

fn kept(records: &[Map<String, Value>]) -> Vec<(String, f64)> {
    records
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap_or_default().to_owned(),
                r["selection"]["score"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect()
}

#[test]
fn select_with_served_models_ranks_as_local() -> TestResult {
    let (teacher_server, teacher) = served("llama-tiny", FaultPlan::none());
    let (student_server, student) = served("qwen2-tiny", FaultPlan::none());
    let (remote_teacher, remote_student) = (
        remote(&teacher_server, "llama-tiny"),
        remote(&student_server, "qwen2-tiny"),
    );
    for strategy in [Strategy::TeacherGuided, Strategy::Rsr, Strategy::StudentPpl] {
        let options = SelectOptions {
            strategies: vec![strategy],
            ..SelectOptions::default()
        };
        let local = ModelScorer {
            student: Some(&student),
            teacher: Some(&teacher),
            batch_size: 2,
        };
        let served = ModelScorer {
            student: Some(remote_student.as_ref()),
            teacher: Some(remote_teacher.as_ref()),
            batch_size: 64,
        };
        let (a, _) = select(records(), &options, Some(&local))?;
        let (b, _) = select(records(), &options, Some(&served))?;
        let (a, b) = (kept(&a), kept(&b));
        let ids = |v: &[(String, f64)]| v.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&a), ids(&b), "{strategy:?}: same ranking");
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x.1 - y.1).abs() / x.1.abs().max(1.0))
            .fold(0.0, f64::max);
        println!("select {strategy:?}: same ranking, max_rel_diff of scores {diff:.3e}");
        assert!(diff < 1e-4, "{strategy:?}: {a:?} vs {b:?}");
    }
    Ok(())
}

fn write_jsonl(path: &Path, records: &[Map<String, Value>]) -> std::io::Result<()> {
    let text: String = records
        .iter()
        .map(|r| format!("{}\n", Value::Object(r.clone())))
        .collect();
    fs_err::write(path, text)
}

fn read_actions(path: &Path) -> Result<Vec<Value>, Box<dyn std::error::Error>> {
    let text = fs_err::read_to_string(path)?;
    let mut all = Vec::new();
    for line in text.lines() {
        let record: Value = serde_json::from_str(line)?;
        all.extend(record["actions"].as_array().cloned().unwrap_or_default());
    }
    Ok(all)
}

#[test]
fn trace_with_a_served_teacher_and_student_categorises_as_local() -> TestResult {
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("in.jsonl");
    write_jsonl(&input, &records())?;
    let (teacher_server, teacher) = served("llama-tiny", FaultPlan::none());
    let (base_server, base) = served("qwen2-tiny", FaultPlan::none());
    let distilled = LocalBackend::load(fixture("qwen3-tiny"), 4)?;
    let (remote_teacher, remote_base) = (
        remote(&teacher_server, "llama-tiny"),
        remote(&base_server, "qwen2-tiny"),
    );
    let mut options = TraceOptions::new(&input, dir.path().join("local.jsonl"));
    // The fixtures' random weights give low log-probs: the median of the teacher's and the
    // base's action log-probs as the threshold mixes the categories.
    trace(&teacher, &base, &distilled, &options, &mut |_, _| {})?;
    let mut values: Vec<f64> = read_actions(&options.output)?
        .iter()
        .flat_map(|a| {
            [
                a["logprob"]["teacher"].as_f64(),
                a["logprob"]["base"].as_f64(),
            ]
        })
        .flatten()
        .collect();
    values.sort_by(f64::total_cmp);
    options.thresholds.likely = values[values.len() / 2];
    options.thresholds.boost_margin = 0.05;
    let local = trace(&teacher, &base, &distilled, &options, &mut |_, _| {})?;
    options.output = dir.path().join("remote.jsonl");
    options.batch_size = 64;
    let served = trace(
        remote_teacher.as_ref(),
        remote_base.as_ref(),
        &distilled,
        &options,
        &mut |_, _| {},
    )?;
    assert_eq!(local.counts, served.counts, "same categories");
    let (a, b) = (
        read_actions(&dir.path().join("local.jsonl"))?,
        read_actions(&options.output)?,
    );
    assert_eq!(a.len(), b.len());
    let mut diff = 0f64;
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x["category"], y["category"]);
        for model in ["teacher", "base", "distilled"] {
            if let (Some(p), Some(q)) = (x["logprob"][model].as_f64(), y["logprob"][model].as_f64())
            {
                diff = diff.max((p - q).abs());
            }
        }
    }
    println!(
        "trace: {} actions, same categories {:?}; max_abs_diff of action log-probs {diff:.3e}",
        a.len(),
        served.counts
    );
    assert!(diff < 1e-4);
    Ok(())
}

#[test]
fn check_with_a_served_teacher_reports_as_local() -> TestResult {
    let (server, teacher) = served("llama-tiny", FaultPlan::none());
    let student = LocalBackend::load(fixture("qwen2-tiny"), 4)?;
    let local = check_pair(&teacher, &student)?;
    let served = check_pair(remote(&server, "llama-tiny").as_ref(), &student)?;
    let statuses = |r: &retort::check::CheckReport| {
        r.rows
            .iter()
            .map(|row| (row.check.clone(), row.status))
            .collect::<Vec<_>>()
    };
    assert_eq!(statuses(&local), statuses(&served));
    let scored = |r: &retort::check::CheckReport| {
        r.rows
            .iter()
            .find(|row| row.check == "scored sequence")
            .map(|row| row.detail.clone())
    };
    println!(
        "check: local {:?} / served {:?}",
        scored(&local),
        scored(&served)
    );
    assert_eq!(scored(&local), scored(&served));
    Ok(())
}

/// KD options with the teacher `spec` (k = the whole vocabulary, so the served top-k signal is
/// the dense distribution).
fn kd_options(dir: &Path, output: &str, teacher: ModelSpec) -> std::io::Result<DistillOptions> {
    let mut options = base_options(dir, output)?;
    options.objective = Objective::Kd;
    options.teacher = Some(teacher);
    options.teacher_top_k = Some(512);
    options.max_steps = Some(4);
    options.eval_data = options.data.clone();
    options.eval_every = Some(2);
    Ok(options)
}

fn max_metric_diff(a: &Path, b: &Path, keys: &[&str]) -> Result<f64, Box<dyn std::error::Error>> {
    let (a, b) = (metrics(a)?, metrics(b)?);
    assert_eq!(a.len(), b.len());
    let mut diff = 0f64;
    for (x, y) in a.iter().zip(&b) {
        for key in keys {
            if let (Some(p), Some(q)) = (x[*key].as_f64(), y[*key].as_f64()) {
                diff = diff.max((p - q).abs());
            } else {
                assert_eq!(x.get(*key).is_some(), y.get(*key).is_some(), "{key}");
            }
        }
    }
    Ok(diff)
}

#[test]
fn kd_from_a_served_teacher_and_from_its_cache_equals_the_local_teacher() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (server, _) = served("llama-tiny", FaultPlan::none());
    let local = kd_options(
        dir.path(),
        "local",
        ModelSpec::folder(fixture("llama-tiny")),
    )?;
    let live = kd_options(dir.path(), "live", spec_of(&[&server], "llama-tiny"))?;
    let a = distill(&local, &mut |_| {})?;
    let b = distill(&live, &mut |_| {})?;
    let keys = ["loss", "kd_loss", "eval_loss", "eval_kd_loss", "grad_norm"];
    let diff = max_metric_diff(&a.output, &b.output, &keys)?;
    println!("kd, served teacher (k = 512) vs local dense: max_abs_diff of losses {diff:.3e}");
    assert!(diff < 1e-3, "{diff}");

    let cache = dir.path().join("cache");
    build_teacher_cache(&live, &cache, 512, CacheDtype::F32, &mut |_, _| {})?;
    let mut cached = live.clone();
    cached.teacher = None;
    cached.teacher_cache = Some(cache);
    cached.output = Some(dir.path().join("cached"));
    let c = distill(&cached, &mut |_| {})?;
    let diff = max_metric_diff(&a.output, &c.output, &keys)?;
    println!("kd, cache built from the server vs local dense: max_abs_diff of losses {diff:.3e}");
    assert!(diff < 1e-3, "{diff}");

    // Served log-probs are at temperature 1: a top-k below the vocabulary with the tail bucket
    // cannot be re-tempered, so KD at temperature 2 is refused up front.
    let mut hot = kd_options(dir.path(), "hot", spec_of(&[&server], "llama-tiny"))?;
    hot.temperature = 2.0;
    hot.teacher_top_k = Some(20);
    let err = distill(&hot, &mut |_| {}).expect_err("tail cannot be re-tempered");
    assert!(err.to_string().contains("renormalize"), "{err}");
    Ok(())
}

#[test]
fn on_policy_with_a_served_teacher_equals_the_local_teacher() -> TestResult {
    let (server, _) = served("llama-tiny", FaultPlan::none());
    for loss in [OnPolicyLoss::Reward, OnPolicyLoss::Divergence] {
        let dir = tempfile::tempdir()?;
        let options = |output: &str, teacher: ModelSpec| -> std::io::Result<DistillOptions> {
            let mut options = base_options(dir.path(), output)?;
            options.objective = Objective::OnPolicy;
            options.on_policy_loss = loss;
            options.teacher = Some(teacher);
            options.teacher_top_k = Some(512);
            options.lambda = 1.0;
            options.max_new_tokens = 8;
            options.max_steps = Some(3);
            options.divergence = DivergenceKind::Rkl;
            Ok(options)
        };
        let a = distill(
            &options("local", ModelSpec::folder(fixture("llama-tiny")))?,
            &mut |_| {},
        )?;
        let b = distill(
            &options("live", spec_of(&[&server], "llama-tiny"))?,
            &mut |_| {},
        )?;
        let diff = max_metric_diff(
            &a.output,
            &b.output,
            &["loss", "kd_loss", "reverse_kl", "grad_norm"],
        )?;
        println!("on-policy {loss:?}, served vs local teacher: max_abs_diff {diff:.3e}");
        assert!(diff < 1e-3, "{loss:?}: {diff}");
    }
    Ok(())
}

/// `llama-tiny` with 64 extra output rows (zero embeddings, so their logits are 0), as a padded
/// vocabulary of one tokenizer (Qwen2.5-7B's 152,064 vs 1.5B's 151,936).
fn padded_llama(dir: &Path) -> Result<std::path::PathBuf, Box<dyn std::error::Error>> {
    use candle_core::{Device, Tensor};
    let source = Path::new(&fixture("llama-tiny")).to_path_buf();
    let out = dir.join("llama-tiny-padded");
    fs_err::create_dir_all(&out)?;
    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        fs_err::copy(source.join(file), out.join(file))?;
    }
    let mut config: Value =
        serde_json::from_str(&fs_err::read_to_string(source.join("config.json"))?)?;
    config["vocab_size"] = json!(576);
    fs_err::write(out.join("config.json"), config.to_string())?;
    let mut tensors =
        candle_core::safetensors::load(source.join("model.safetensors"), &Device::Cpu)?;
    let embed = tensors
        .get("model.embed_tokens.weight")
        .ok_or("no embeddings")?
        .clone();
    let pad = Tensor::zeros((64, embed.dim(1)?), embed.dtype(), &Device::Cpu)?;
    tensors.insert(
        "model.embed_tokens.weight".into(),
        Tensor::cat(&[&embed, &pad], 0)?,
    );
    candle_core::safetensors::save(&tensors, out.join("model.safetensors"))?;
    Ok(out)
}

/// `check` warns about a padded pair and `distill` accepts it (the first min(V) logits): KD from
/// the padded teacher, local or served from a padded replica, equals KD from the unpadded one.
#[test]
fn padded_vocabularies_are_a_warning_in_check_and_train_in_distill() -> TestResult {
    use retort::mock_scoring::MockModel;
    let dir = tempfile::tempdir()?;
    let padded = padded_llama(dir.path())?;
    let student = LocalBackend::load(fixture("qwen2-tiny"), 4)?;
    let padded_teacher = LocalBackend::load(&padded, 4)?;
    let report = check_pair(&padded_teacher, &student)?;
    let vocabulary = &report.rows[0];
    assert_eq!(
        vocabulary.status,
        retort::check::Status::Warn,
        "{vocabulary:?}"
    );
    assert!(vocabulary.detail.contains("first 512"), "{vocabulary:?}");

    let base = kd_options(dir.path(), "base", ModelSpec::folder(fixture("llama-tiny")))?;
    let local = kd_options(dir.path(), "padded", ModelSpec::folder(&padded))?;
    let a = distill(&base, &mut |_| {})?;
    let b = distill(&local, &mut |_| {})?;
    let keys = ["loss", "kd_loss", "eval_kd_loss", "grad_norm"];
    let diff = max_metric_diff(&a.output, &b.output, &keys)?;
    println!("kd, padded (576 rows) vs unpadded local teacher: max_abs_diff {diff:.3e}");
    assert!(diff < 1e-5, "{diff}");

    let unpadded = LocalBackend::load(fixture("llama-tiny"), 4)?;
    let server = MockServer::start_with_model(
        FaultPlan::none(),
        MockModel {
            padded_rows: 64,
            ..MockModel::new(unpadded.model().clone())
        },
    )?;
    let served = kd_options(dir.path(), "served", spec_of(&[&server], "llama-tiny"))?;
    let c = distill(&served, &mut |_| {})?;
    let diff = max_metric_diff(&a.output, &c.output, &keys)?;
    println!("kd, padded served replica vs unpadded local teacher: max_abs_diff {diff:.3e}");
    assert!(diff < 1e-3, "{diff}");
    Ok(())
}

/// Records per second of teacher-guided selection and trace against the mock server at
/// concurrency 64 (a figure for the notes, not a check: run with `--ignored --nocapture`).
#[test]
#[ignore = "a throughput figure, not a test"]
fn throughput_against_the_mock_at_concurrency_64() -> TestResult {
    let (teacher_server, _) = served("llama-tiny", FaultPlan::none());
    let (student_server, _) = served("qwen2-tiny", FaultPlan::none());
    let open = |server: &MockServer, name: &str| {
        open_scorer(
            &spec_of(&[server], name),
            &ScorerOptions {
                backend: retort::backend::open::BackendOptions {
                    concurrency: 64,
                    ..fast_options()
                },
                ..ScorerOptions::default()
            },
        )
    };
    let (teacher, student) = (
        open(&teacher_server, "llama-tiny")?,
        open(&student_server, "qwen2-tiny")?,
    );
    let mut input = Vec::new();
    for round in 0..200 {
        for mut record in records() {
            record.insert("id".into(), json!(format!("{round}-{}", record["id"])));
            input.push(record);
        }
    }
    let n = input.len();
    let scorer = ModelScorer {
        student: Some(student.as_ref()),
        teacher: Some(teacher.as_ref()),
        batch_size: 256,
    };
    let options = SelectOptions {
        strategies: vec![Strategy::TeacherGuided],
        ..SelectOptions::default()
    };
    let start = std::time::Instant::now();
    select(input.clone(), &options, Some(&scorer))?;
    let select_rate = n as f64 / start.elapsed().as_secs_f64();
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("in.jsonl");
    write_jsonl(&path, &input)?;
    let mut trace_options = TraceOptions::new(&path, dir.path().join("out.jsonl"));
    trace_options.batch_size = 256;
    let start = std::time::Instant::now();
    trace(
        teacher.as_ref(),
        student.as_ref(),
        student.as_ref(),
        &trace_options,
        &mut |_, _| {},
    )?;
    let trace_rate = n as f64 / start.elapsed().as_secs_f64();
    println!(
        "{n} records, concurrency 64: select teacher-guided {select_rate:.0} records/s (2 models), \
         trace {trace_rate:.0} records/s (2 distinct models)"
    );
    Ok(())
}
