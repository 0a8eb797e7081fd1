//! The offline teacher cache on the tiny fixtures: with k = vocabulary it trains exactly as the
//! dense teacher does, a small k still lowers the KD loss, an interrupted build resumes, and a
//! cache that does not match the data is refused with the example named.

use retort::distill::cache::{CACHE_FILE, CacheDtype, CacheHeader, build_teacher_cache};
use retort::distill::{DistillOptions, Objective, distill, distill_trained};
use serde_json::Value;

use crate::distill::{TestResult, base_options, fixture, metrics};

fn kd_options(dir: &std::path::Path, output: &str) -> std::io::Result<DistillOptions> {
    let mut options = base_options(dir, output)?;
    options.objective = Objective::Kd;
    options.teacher = Some(retort::ModelSpec::folder(fixture("llama-tiny")));
    options.temperature = 2.0;
    options.eval_data = options.data.clone();
    options.eval_every = Some(1);
    Ok(options)
}

fn from_cache(options: &DistillOptions, cache: &std::path::Path, output: &str) -> DistillOptions {
    let mut cached = options.clone();
    cached.teacher = None;
    cached.teacher_cache = Some(cache.to_path_buf());
    cached.output = options.output.as_ref().map(|o| o.with_file_name(output));
    cached
}

#[test]
fn cache_with_k_equal_to_vocabulary_trains_as_the_dense_teacher() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut options = kd_options(dir.path(), "dense")?;
    options.max_steps = Some(4);
    let cache = dir.path().join("cache");
    let summary = build_teacher_cache(&options, &cache, 512, CacheDtype::F32, &mut |_, _| {})?;
    assert_eq!(summary.shards, 1);
    let (dense, dense_model) = distill_trained(&options, &mut |_| {})?;
    let (cached, cached_model) =
        distill_trained(&from_cache(&options, &cache, "cached"), &mut |_| {})?;
    let (a, b) = (metrics(&dense.output)?, metrics(&cached.output)?);
    let mut loss_diff = 0f64;
    for (x, y) in a.iter().zip(&b) {
        for key in ["loss", "kd_loss", "eval_kd_loss", "grad_norm"] {
            let (x, y) = (x[key].as_f64().ok_or(key)?, y[key].as_f64().ok_or(key)?);
            loss_diff = loss_diff.max((x - y).abs());
        }
    }
    let weights = |trained: &retort::distill::TrainedStudent| -> Vec<f32> {
        retort_model::train::named_vars(&trained.varmap)
            .into_iter()
            .flat_map(|(_, v)| {
                v.as_tensor()
                    .flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .unwrap_or_default()
            })
            .collect()
    };
    let (wa, wb) = (weights(&dense_model), weights(&cached_model));
    assert_eq!(wa.len(), wb.len());
    let weight_diff = wa
        .iter()
        .zip(&wb)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    eprintln!(
        "cache k=vocab vs dense teacher over 4 steps: loss/grad-norm max_abs_diff {loss_diff:.3e}, \
         weights max_abs_diff {weight_diff:.3e}"
    );
    assert!(loss_diff < 1e-4, "{loss_diff}");
    assert!(weight_diff < 1e-4, "{weight_diff}");
    Ok(())
}

#[test]
fn small_k_cache_lowers_the_loss_and_an_interrupted_build_resumes() -> TestResult {
    let dir = tempfile::tempdir()?;
    let options = kd_options(dir.path(), "unused")?;
    let cache = dir.path().join("cache");
    let summary = build_teacher_cache(&options, &cache, 8, CacheDtype::F16, &mut |_, _| {})?;
    eprintln!(
        "cache k=8 f16: {} positions, {} bytes, {:.1} bytes per position",
        summary.positions, summary.bytes, summary.bytes_per_position
    );
    assert!(summary.positions > 50 && summary.bytes_per_position < 8.0 * 6.0 + 12.0);
    let header: CacheHeader =
        serde_json::from_str(&fs_err::read_to_string(cache.join(CACHE_FILE))?)?;
    assert!(header.complete && header.top_k == 8 && header.temperature == 2.0);

    // An interrupted build (header not yet complete) keeps its shards and finishes.
    let mut partial = header.clone();
    partial.complete = false;
    fs_err::write(cache.join(CACHE_FILE), serde_json::to_string(&partial)?)?;
    let mut trained = from_cache(&options, &cache, "out");
    let message = distill(&trained, &mut |_| {})
        .err()
        .ok_or("expected an error")?
        .to_string();
    assert!(message.contains("incomplete"), "{message}");
    let again = build_teacher_cache(&options, &cache, 8, CacheDtype::F16, &mut |_, _| {})?;
    assert_eq!(
        (again.reused_shards, again.positions),
        (1, summary.positions)
    );
    // Other settings in the same folder are refused.
    let other = build_teacher_cache(&options, &cache, 4, CacheDtype::F16, &mut |_, _| {});
    assert!(other.is_err_and(|e| e.to_string().contains("other data or settings")));

    trained.output = Some(dir.path().join("out"));
    let run = distill(&trained, &mut |_| {})?;
    let lines = metrics(&run.output)?;
    let first = lines[0]["eval_kd_loss"].as_f64().ok_or("eval_kd_loss")?;
    let last = lines[11]["eval_kd_loss"].as_f64().ok_or("eval_kd_loss")?;
    eprintln!("kd from a k=8 cache: eval_kd_loss {first:.4} -> {last:.4}");
    assert!(last < 0.9 * first, "{first} -> {last}");
    let saved: Value = toml_value(&run.output.join("config.toml"))?;
    assert_eq!(saved["missing-mass"], "tail");
    Ok(())
}

fn toml_value(path: &std::path::Path) -> Result<Value, Box<dyn std::error::Error>> {
    let options = DistillOptions::from_toml_file(path)?;
    Ok(serde_json::to_value(options)?)
}

#[test]
fn a_cache_of_other_data_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut options = kd_options(dir.path(), "out")?;
    options.eval_data = None;
    let cache = dir.path().join("cache");
    build_teacher_cache(&options, &cache, 4, CacheDtype::F16, &mut |_, _| {})?;
    let data = options.data.clone().ok_or("data")?;
    let text = fs_err::read_to_string(&data)?;
    // Record `p2` (line 3) gets another response.
    fs_err::write(&data, text.replace("4 plus 7 is 11", "4 plus 7 is eleven"))?;
    let cached = from_cache(&options, &cache, "out");
    let message = distill(&cached, &mut |_| {})
        .err()
        .ok_or("expected an error")?
        .to_string();
    eprintln!("{message}");
    assert!(
        message.starts_with(&format!("{}:3:", data.display()))
            && message.contains("`p2`")
            && message.contains("differ"),
        "{message}"
    );
    // A record the cache never saw.
    fs_err::write(
        &data,
        format!("{text}{{\"id\": \"new\", \"prompt\": \"Q\", \"response\": \"A\"}}\n"),
    )?;
    let message = distill(&cached, &mut |_| {})
        .err()
        .ok_or("expected an error")?
        .to_string();
    assert!(
        message.contains("`new` is not in the teacher cache"),
        "{message}"
    );
    // A cache is only for `kd`, and replaces the teacher.
    let mut wrong = cached.clone();
    wrong.objective = Objective::OnPolicy;
    assert!(distill(&wrong, &mut |_| {}).is_err_and(|e| e.to_string().contains("teacher-cache")));
    Ok(())
}

// See: #20
#[test]
fn a_tail_cache_made_at_another_temperature_is_refused_with_a_hint() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut options = kd_options(dir.path(), "out")?;
    options.eval_data = None;
    options.max_steps = Some(1);
    let cache = dir.path().join("cache");
    build_teacher_cache(&options, &cache, 8, CacheDtype::F32, &mut |_, _| {})?;
    let mut hotter = from_cache(&options, &cache, "hot");
    hotter.temperature = 4.0;
    let message = distill(&hotter, &mut |_| {})
        .err()
        .ok_or("expected an error")?
        .to_string();
    assert!(
        message.contains("temperature 2") && message.contains("renormalize"),
        "{message}"
    );
    hotter.missing_mass = retort::distill::teacher::MissingMass::Renormalize;
    distill(&hotter, &mut |_| {})?;
    Ok(())
}
