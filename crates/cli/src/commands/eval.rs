//! `retort eval`: sample k responses per problem, verify them and report pass@1 (averaged over
//! k), unbiased pass@k, maj@k, mean tokens and truncation rate, overall and per field.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use retort::ModelSpec;
use retort::backend::SamplingParams;
use retort::backend::open::open_backend;
use retort::eval::{EvalOptions, EvalSummary, Metrics, Protocol};
use retort::generate::read_problems;
use retort::identity::{Identity, RunStatus, SameRun};
use retort::records::InputFormat;

use crate::args::BackendArgs;
use crate::run::Run;
use crate::ui;

/// `retort eval`.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Model: a Hugging Face folder, `hf:ORG/NAME[@REV]`, `openai:URL#MODEL` or `world:student`.
    #[arg(long, short)]
    pub model: ModelSpec,
    /// Problems with gold answers: JSONL or a JSON array (prompt, messages, GSM8K, MATH, ...).
    #[arg(long, short)]
    pub input: PathBuf,
    /// Samples per problem, k [default: 1, or the protocol's].
    #[arg(long)]
    pub samples: Option<usize>,
    /// Preset sampling settings; flags given explicitly take precedence.
    #[arg(long, value_enum)]
    pub protocol: Option<Protocol>,
    /// Softmax temperature; 0 is greedy [default: 1, or the protocol's].
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass [default: 1, or the protocol's].
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Keep only the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Maximum new tokens per response.
    #[arg(long, default_value_t = SamplingParams::default().max_new_tokens)]
    pub max_new_tokens: usize,
    /// Seed: the same seed gives the same samples.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Extra stop strings (EOS ids always stop). Repeatable.
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Keep the verified traces here (JSONL); a rerun resumes from the traces already there.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Write the summary as JSON (`accuracy`, `pass_at_k`, `maj_at_k`, `mean_tokens`, ...).
    #[arg(long)]
    pub summary: Option<PathBuf>,
    /// Break the figures down by this record field (e.g. `level`).
    #[arg(long)]
    pub by: Option<String>,
    /// Input shape.
    #[arg(long, value_enum, default_value_t = InputFormat::Auto, visible_alias = "input-format")]
    pub format: InputFormat,
    /// Replace an existing `--output` made by another run instead of refusing.
    #[arg(long)]
    pub overwrite: bool,
    #[command(flatten)]
    pub backend: BackendArgs,
}

fn percent(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

fn metric_rows(m: &Metrics) -> Vec<(String, String)> {
    let mut rows = vec![
        ("problems".to_string(), m.problems.to_string()),
        ("traces".to_string(), m.traces.to_string()),
        (
            "accuracy (pass@1, mean over k)".to_string(),
            percent(m.accuracy),
        ),
    ];
    rows.extend(
        m.pass_at_k
            .iter()
            .map(|(k, v)| (format!("pass@{k}"), percent(*v))),
    );
    rows.extend(
        m.maj_at_k
            .iter()
            .map(|(k, v)| (format!("maj@{k}"), percent(*v))),
    );
    rows.push((
        "mean response tokens".to_string(),
        format!("{:.1}", m.mean_tokens),
    ));
    rows.push(("truncated (length)".to_string(), percent(m.truncation_rate)));
    rows.push(("no answer found".to_string(), percent(m.no_answer_rate)));
    rows
}

fn show(title: &str, rows: &[(String, String)]) {
    let rows: Vec<(&str, String)> = rows.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    ui::table(title, &rows);
}

/// Runs `retort eval`.
pub fn run(args: EvalArgs) -> anyhow::Result<ExitCode> {
    let start = Instant::now();
    let preset = args.protocol.map(Protocol::preset);
    let samples = args.samples.or(preset.map(|p| p.samples)).unwrap_or(1);
    if samples == 0 {
        anyhow::bail!("`--samples` must be at least 1");
    }
    let sampling = SamplingParams {
        temperature: args
            .temperature
            .or(preset.map(|p| p.temperature))
            .unwrap_or(1.0),
        top_p: args.top_p.or(preset.map(|p| p.top_p)).unwrap_or(1.0),
        top_k: args.top_k,
        max_new_tokens: args.max_new_tokens,
        seed: Some(args.seed),
        stop: args.stop.clone(),
        logprobs: 0,
    };
    let mut options = EvalOptions::new(&args.input);
    options.output = args.output.clone();
    options.samples = samples;
    options.format = args.format;
    options.sampling = sampling;
    options.by = args.by.clone();
    // Read the input before loading the model so bad input fails fast.
    let problems = read_problems(&options.input, options.format)?;
    options.sampling.validate()?;
    // The traces of `--output` are a journal a rerun continues (raising `--samples` extends it).
    let mut run = match args.output.as_ref().or(args.summary.as_ref()) {
        Some(beside) => {
            let identity = Identity::new("eval")
                .with_model("model", &args.model)?
                .with("input", std::path::absolute(&args.input)?)
                .with("format", options.format)
                .with_fields(&options.sampling, &[])
                .with_compute(args.backend.compute.compute());
            Some(Run::start(
                beside,
                identity,
                serde_json::Value::Null,
                SameRun::Continue,
                args.overwrite,
            )?)
        }
        None => None,
    };
    let backend = open_backend(&args.model, &args.backend.options())
        .with_context(|| format!("cannot open model `{}`", args.model))?;
    let bar = ui::progress(Some(0), "eval");
    let summary: EvalSummary =
        retort::eval::run_problems(backend.as_ref(), problems, &options, &mut |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        })
        .with_context(|| {
            format!(
                "cannot evaluate `{}` on `{}`",
                args.model,
                args.input.display()
            )
        })?;
    bar.finish_and_clear();

    if let Some(path) = &args.summary {
        let json = serde_json::to_vec_pretty(&summary)?;
        retort::io::AtomicFile::write_all(path, &json)
            .with_context(|| format!("cannot write the summary to `{}`", path.display()))?;
    }
    let interrupted = summary.generation.as_ref().is_some_and(|g| g.interrupted);
    if let Some(mut run) = run.take() {
        let manifest = &mut run.manifest;
        manifest.settings = serde_json::json!({
            "sampling": options.sampling,
            "samples": samples,
            "protocol": args.protocol.map(|p| format!("{p:?}")),
            "by": args.by,
        });
        manifest.add_input(&args.input)?;
        manifest.add_model(&args.model)?;
        manifest.counts = serde_json::to_value(&summary)?;
        manifest.wall_seconds = start.elapsed().as_secs_f64();
        run.finish(if interrupted {
            RunStatus::Interrupted
        } else {
            RunStatus::Complete
        })?;
    }
    if interrupted {
        return Ok(crate::run::interrupted(
            "the figures above cover the samples generated so far",
            &[],
        ));
    }

    let mut rows = vec![
        ("model".to_string(), args.model.to_string()),
        ("samples per problem".to_string(), samples.to_string()),
    ];
    rows.extend(metric_rows(&summary.overall));
    if summary.unverifiable > 0 {
        rows.push((
            "unverifiable (no gold)".to_string(),
            summary.unverifiable.to_string(),
        ));
    }
    if let Some(path) = &args.summary {
        rows.push(("summary".to_string(), path.display().to_string()));
    }
    show("eval", &rows);
    if let Some(field) = &summary.by_field {
        for (value, metrics) in &summary.by {
            show(&format!("eval: {field} = {value}"), &metric_rows(metrics));
        }
    }
    let failed = summary.generation.as_ref().map_or(0, |g| g.failed);
    if failed > 0 {
        for failure in summary.generation.iter().flat_map(|g| &g.failures) {
            eprintln!("  failed: {failure}");
        }
        eprintln!(
            "error: {failed} of {} samples failed for good; the figures above cover the rest",
            samples * summary.generation.as_ref().map_or(0, |g| g.problems)
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
