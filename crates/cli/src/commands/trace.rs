//! `retort trace`: sentence provenance of responses under a teacher, the base student and the
//! distilled student, with a summary table of category shares.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use retort::ModelSpec;
use retort::backend::scorer::{TokenScorer, open_scorer};
use retort::identity::{Identity, RunStatus, SameRun};
use retort::provenance::{Category, Rule, Thresholds, TraceOptions, trace};
use retort::records::InputFormat;

use crate::args::ServerScoreArgs;
use crate::run::Run;
use crate::ui;

/// `retort trace`.
#[derive(Debug, clap::Args)]
pub struct TraceArgs {
    /// The teacher: a Hugging Face folder, `hf:ORG/NAME[@REV]`, `world:teacher` or a server
    /// `openai:URL[,URL...]#MODEL` (so may `--base` and `--distilled` be).
    #[arg(long)]
    pub teacher: ModelSpec,
    /// The student before distillation.
    #[arg(long)]
    pub base: ModelSpec,
    /// The student after distillation.
    #[arg(long)]
    pub distilled: ModelSpec,
    /// Records with a prompt (any input shape) and a response, e.g. traces from `retort generate`.
    #[arg(long, short)]
    pub input: PathBuf,
    /// Output JSONL: each record with `actions` (text, start, end, logprob, category) added.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Categorisation: `paper` compares each action's geometric-mean token probability between
    /// the models (`--alpha`, `--beta`); `confident` asks each model alone whether the action is
    /// likely (`--likely`, `--boost-margin`).
    #[arg(long, value_enum, default_value_t = Rule::Paper)]
    pub rule: Rule,
    /// `paper`: an action is shared when every pairwise probability difference is at most this.
    #[arg(long, default_value_t = Thresholds::default().alpha)]
    pub alpha: f64,
    /// `paper`: teacher-originated when p_teacher - p_base exceeds this (student-originated when
    /// p_base - p_teacher does); the paper used 0.1 (also 0.05, 0.15).
    #[arg(long, default_value_t = Thresholds::default().beta)]
    pub beta: f64,
    /// `confident`: a model finds an action likely when its mean token log-prob is at least this
    /// (ln 0.5).
    #[arg(long, default_value_t = -std::f64::consts::LN_2, allow_negative_numbers = true)]
    pub likely: f64,
    /// `confident`: an action likely under both is boosted when distilled minus base exceeds this
    /// (nats/token).
    #[arg(long, default_value_t = 0.2, allow_negative_numbers = true)]
    pub boost_margin: f64,
    /// Field holding the response.
    #[arg(long, default_value = "response")]
    pub response_field: String,
    /// Input shape (for the prompt).
    #[arg(long, value_enum, default_value_t = InputFormat::Auto, visible_alias = "input-format")]
    pub format: InputFormat,
    /// Records scored together in one forward pass per model.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Scoring on servers.
    #[command(flatten)]
    pub server: ServerScoreArgs,
    /// Replace an existing output made by another run instead of refusing.
    #[arg(long)]
    pub overwrite: bool,
}

fn opt(x: Option<f64>, digits: usize) -> String {
    x.map_or_else(|| "-".to_string(), |v| format!("{v:.digits$}"))
}

/// Runs `retort trace`.
pub fn run(args: TraceArgs) -> anyhow::Result<ExitCode> {
    let start = Instant::now();
    let specs = [&args.teacher, &args.base, &args.distilled];
    // A server whose served name is not a local model borrows a local model's tokenizer (the
    // students', then the teacher's).
    let fallback = [&args.base, &args.distilled, &args.teacher]
        .into_iter()
        .find_map(ModelSpec::local_path);
    let remote = specs.iter().any(|s| s.is_remote());
    // A server takes a batch concurrently, so it gets bigger batches than a forward pass.
    let batch_size = if remote {
        args.batch_size.max(4 * args.server.concurrency)
    } else {
        args.batch_size
    };
    let identity = Identity::new("trace")
        .with_model("teacher", &args.teacher)?
        .with_model("base", &args.base)?
        .with_model("distilled", &args.distilled)?
        .with("input", std::path::absolute(&args.input)?)
        .with("format", args.format)
        .with("thresholds", thresholds(&args))
        .with("response_field", &args.response_field)
        .with_compute(args.server.compute.compute());
    let mut run = Run::start(
        &args.output,
        identity,
        serde_json::Value::Null,
        SameRun::Continue,
        args.overwrite,
    )?;
    // A spec given twice is loaded once (and scored once).
    let mut loaded: Vec<(&ModelSpec, Box<dyn TokenScorer>)> = Vec::new();
    for spec in specs {
        if !loaded.iter().any(|(s, _)| *s == spec) {
            let options = args.server.options(args.batch_size, fallback.clone());
            let scorer = open_scorer(spec, &options)
                .with_context(|| format!("cannot open model `{spec}`"))?;
            loaded.push((spec, scorer));
        }
    }
    let get = |spec: &ModelSpec| -> &dyn TokenScorer {
        loaded
            .iter()
            .find(|(s, _)| *s == spec)
            .expect("every spec was loaded above")
            .1
            .as_ref()
    };
    let mut options = TraceOptions::new(&args.input, &args.output);
    options.format = args.format;
    options.response_field = args.response_field.clone();
    options.thresholds = thresholds(&args);
    options.batch_size = batch_size;
    let bar = ui::progress(Some(0), "trace");
    let summary = trace(
        get(&args.teacher),
        get(&args.base),
        get(&args.distilled),
        &options,
        &mut |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )
    .with_context(|| format!("cannot trace `{}`", args.input.display()))?;
    bar.finish_and_clear();

    let manifest = &mut run.manifest;
    manifest.settings = serde_json::json!({
        "thresholds": options.thresholds,
        "response_field": args.response_field,
        "roles": {"teacher": args.teacher.to_string(), "base": args.base.to_string(), "distilled": args.distilled.to_string()},
    });
    manifest.add_input(&args.input)?;
    for (spec, _) in &loaded {
        manifest.add_model(spec)?;
    }
    manifest.counts = serde_json::to_value(&summary)?;
    manifest.wall_seconds = start.elapsed().as_secs_f64();
    run.finish(RunStatus::Complete)?;

    let mut rows: Vec<(String, String)> = vec![
        ("records".into(), summary.records.to_string()),
        ("actions".into(), summary.actions.to_string()),
    ];
    for category in Category::ALL {
        let share = summary.counts.share(category).unwrap_or(0.0);
        rows.push((
            format!("{} actions", category.as_str()),
            format!(
                "{:>6}  {:5.1}%",
                summary.counts.get(category),
                100.0 * share
            ),
        ));
    }
    if summary.correct.records + summary.incorrect.records > 0 {
        rows.push((
            format!("teacher share, correct ({})", summary.correct.records),
            opt(summary.correct.teacher_share.map(|x| 100.0 * x), 1) + "%",
        ));
        rows.push((
            format!("teacher share, incorrect ({})", summary.incorrect.records),
            opt(summary.incorrect.teacher_share.map(|x| 100.0 * x), 1) + "%",
        ));
    }
    let lp = summary.mean_logprob;
    rows.push(("mean log-prob teacher".into(), opt(lp.teacher, 3)));
    rows.push(("mean log-prob base".into(), opt(lp.base, 3)));
    rows.push(("mean log-prob distilled".into(), opt(lp.distilled, 3)));
    rows.push((
        "thresholds".into(),
        match options.thresholds.rule {
            Rule::Paper => format!(
                "paper: shared within {:.3}, teacher/student beyond {:.3}",
                options.thresholds.alpha, options.thresholds.beta
            ),
            Rule::Confident => format!(
                "confident: likely >= {:.3}, boost > {:.3}",
                options.thresholds.likely, options.thresholds.boost_margin
            ),
        },
    ));
    rows.push(("output".into(), args.output.display().to_string()));
    let rows: Vec<(&str, String)> = rows.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    ui::table("trace", &rows);
    Ok(ExitCode::SUCCESS)
}

/// The rule and thresholds the flags give.
fn thresholds(args: &TraceArgs) -> Thresholds {
    Thresholds {
        rule: args.rule,
        alpha: args.alpha,
        beta: args.beta,
        likely: args.likely,
        boost_margin: args.boost_margin,
    }
}
