//! `retort select`: curate traces into a training set (strategies compose in the order given).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use retort::ModelSpec;
use retort::backend::scorer::{TokenScorer, open_scorer};
use retort::identity::{Identity, RunStatus, SameRun};
use retort::manifest::{Manifest, manifest_path};
use retort::select::{DedupOn, ModelScorer, Scorer, SelectOptions, Strategy, select_file};

use crate::args::ServerScoreArgs;
use crate::run::Run;
use crate::ui;

/// `retort select` arguments.
#[derive(Debug, clap::Args)]
pub struct SelectArgs {
    /// Input traces (JSONL, JSON array or Parquet as the readers accept).
    #[arg(long)]
    pub input: PathBuf,
    /// Output JSONL (written atomically; a manifest is written beside it).
    #[arg(long)]
    pub output: PathBuf,
    /// Strategies, applied in the order given (comma-separated or repeated).
    #[arg(long = "strategy", value_enum, value_delimiter = ',', required = true)]
    pub strategies: Vec<Strategy>,
    /// Keep at most this many records (applied last).
    #[arg(long)]
    pub budget: Option<usize>,
    /// Keep at most this many records per problem id (before the budget).
    #[arg(long)]
    pub per_problem: Option<usize>,
    /// Seed of `random` and of the MinHash functions.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Teacher model (local folder, `hf:ORG/NAME`, `world:teacher`, or a server
    /// `openai:URL[,URL...]#MODEL`) for `teacher-guided`.
    #[arg(long)]
    pub teacher: Option<ModelSpec>,
    /// Student model for `student-ppl`, `rsr` and `teacher-guided`.
    #[arg(long)]
    pub student: Option<ModelSpec>,
    /// Responses scored per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Eval files whose prompts must not leak into training (`decontaminate`).
    #[arg(long, num_args = 1..)]
    pub eval_files: Vec<PathBuf>,
    /// Words per n-gram for `decontaminate`.
    #[arg(long, default_value_t = 13)]
    pub ngram: usize,
    /// `length`: fewest tokens kept.
    #[arg(long)]
    pub min_tokens: Option<usize>,
    /// `length`: most tokens kept.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Drop truncated records first (the `finished` strategy before the others).
    #[arg(long)]
    pub drop_truncated: bool,
    /// `dedup`: near-duplicates at estimated Jaccard similarity at or above this.
    #[arg(long, default_value_t = 0.8)]
    pub jaccard: f64,
    /// `dedup`: words per shingle.
    #[arg(long, default_value_t = 5)]
    pub shingle: usize,
    /// `dedup`: MinHash functions.
    #[arg(long, default_value_t = 128)]
    pub num_perm: usize,
    /// `dedup`: which text is compared.
    #[arg(long, value_enum, default_value_t = DedupOn::Both)]
    pub dedup_on: DedupOn,
    /// `difficulty`: the student's samples with verdicts (default: the input's own verdicts).
    #[arg(long)]
    pub difficulty_from: Option<PathBuf>,
    /// `difficulty`: lowest pass rate kept.
    #[arg(long, default_value_t = 0.0)]
    pub min_pass_rate: f64,
    /// `difficulty`: highest pass rate kept.
    #[arg(long, default_value_t = 1.0)]
    pub max_pass_rate: f64,
    /// `student-ppl`: most perplexing first instead of least.
    #[arg(long)]
    pub ppl_highest: bool,
    /// `rsr`: ranks above this count as this.
    #[arg(long, default_value_t = 100)]
    pub rsr_rank_cap: u32,
    /// `teacher-guided` (and `-proportion`, `-min`): a sentence is teacher-originated when
    /// p_teacher - p_student exceeds this (geometric-mean token probabilities; the paper: 0.1).
    #[arg(long, default_value_t = SelectOptions::default().teacher_guided_beta)]
    pub teacher_guided_beta: f64,
    /// Field holding the response text.
    #[arg(long, default_value = "response")]
    pub response_field: String,
    /// Scoring on servers.
    #[command(flatten)]
    pub server: ServerScoreArgs,
    /// Replace an existing output made by another run instead of refusing.
    #[arg(long)]
    pub overwrite: bool,
}

/// Opens `spec` as a scorer; a server borrows the tokenizer of `other` (the other model) when its
/// served name is not a local model.
fn open(
    spec: Option<&ModelSpec>,
    other: Option<&ModelSpec>,
    role: &str,
    args: &SelectArgs,
) -> anyhow::Result<Option<Box<dyn TokenScorer>>> {
    let Some(spec) = spec else { return Ok(None) };
    let fallback = other.and_then(ModelSpec::local_path);
    let options = args.server.options(args.batch_size, fallback);
    Ok(Some(
        open_scorer(spec, &options).with_context(|| format!("cannot open {role} `{spec}`"))?,
    ))
}

/// Runs `retort select`.
pub fn run(args: SelectArgs) -> anyhow::Result<ExitCode> {
    let mut strategies = args.strategies.clone();
    if args.drop_truncated && !strategies.contains(&Strategy::Finished) {
        strategies.insert(0, Strategy::Finished);
    }
    let options = SelectOptions {
        strategies,
        budget: args.budget,
        per_problem: args.per_problem,
        seed: args.seed,
        min_tokens: args.min_tokens,
        max_tokens: args.max_tokens,
        jaccard: args.jaccard,
        shingle: args.shingle,
        num_perm: args.num_perm,
        dedup_on: args.dedup_on,
        eval_files: args.eval_files.clone(),
        ngram: args.ngram,
        difficulty_from: args.difficulty_from.clone(),
        min_pass_rate: args.min_pass_rate,
        max_pass_rate: args.max_pass_rate,
        ppl_highest: args.ppl_highest,
        rsr_rank_cap: args.rsr_rank_cap,
        teacher_guided_beta: args.teacher_guided_beta,
        response_field: args.response_field.clone(),
        source: Some(args.input.clone()),
    };
    let mut identity = Identity::new("select")
        .with("input", std::path::absolute(&args.input)?)
        .with_fields(&options, &["source"])
        .with_compute(args.server.compute.compute());
    for (role, spec) in [("teacher", &args.teacher), ("student", &args.student)] {
        if let Some(spec) = spec {
            identity = identity.with_model(role, spec)?;
        }
    }
    let mut run = Run::start(
        &args.output,
        identity,
        serde_json::Value::Null,
        SameRun::Continue,
        args.overwrite,
    )?;
    let teacher = open(
        args.teacher.as_ref(),
        args.student.as_ref(),
        "teacher",
        &args,
    )?;
    let student = open(
        args.student.as_ref(),
        args.teacher.as_ref(),
        "student",
        &args,
    )?;
    // A server takes the batch concurrently, so it gets bigger batches than a forward pass.
    let remote = [&args.teacher, &args.student]
        .into_iter()
        .flatten()
        .any(ModelSpec::is_remote);
    let scorer = ModelScorer {
        student: student.as_deref(),
        teacher: teacher.as_deref(),
        batch_size: if remote {
            args.batch_size.max(4 * args.server.concurrency)
        } else {
            args.batch_size
        },
    };
    let models: Vec<&ModelSpec> = [&args.teacher, &args.student]
        .into_iter()
        .flatten()
        .collect();
    let scorer_ref: Option<&dyn Scorer> =
        (teacher.is_some() || student.is_some()).then_some(&scorer as &dyn Scorer);
    let summary = select_file(&args.input, &args.output, &options, scorer_ref, &models)
        .with_context(|| format!("cannot select from `{}`", args.input.display()))?;
    // `select_file` wrote the manifest's inputs, models and counts; keep them with the identity.
    let identity = std::mem::take(&mut run.manifest.identity);
    run.manifest = Manifest::read(&manifest_path(&args.output))?;
    run.manifest.identity = identity;
    run.finish(RunStatus::Complete)?;
    let mut rows: Vec<(String, String)> = vec![
        ("input records".into(), summary.input.to_string()),
        ("kept".into(), summary.kept.to_string()),
        ("kept problems".into(), summary.kept_problems.to_string()),
    ];
    for step in &summary.steps {
        rows.push((
            format!("step {}", step.step),
            format!("{} → {}", step.before, step.after),
        ));
    }
    for (reason, count) in &summary.dropped {
        rows.push((format!("dropped: {reason}"), count.to_string()));
    }
    for stats in &summary.scores {
        rows.push((
            format!("{} score", stats.strategy),
            format!("{:.4} / {:.4} / {:.4}", stats.min, stats.mean, stats.max),
        ));
    }
    rows.push(("output".into(), args.output.display().to_string()));
    let borrowed: Vec<(&str, String)> = rows.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    ui::table("select", &borrowed);
    Ok(ExitCode::SUCCESS)
}
