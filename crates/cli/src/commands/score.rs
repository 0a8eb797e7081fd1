//! `retort score`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use retort::ModelSpec;
use retort::backend::open::open_local;
use retort::identity::{Identity, RunStatus, SameRun};
use retort::score::{ScoreOptions, score};

use crate::args::ComputeArgs;
use crate::run::Run;
use crate::ui;

/// `retort score`.
#[derive(Debug, clap::Args)]
pub struct ScoreArgs {
    /// Model: a Hugging Face folder, `hf:ORG/NAME[@REV]`, or `openai:URL#MODEL` (vLLM `prompt_logprobs`).
    #[arg(long, short)]
    pub model: ModelSpec,
    /// Input: `prompt`/`messages` + `completion`, or `prompt_ids` + `completion_ids`.
    #[arg(long, short)]
    pub input: PathBuf,
    /// Output JSONL with `token_logprobs`, `logprob`, `num_tokens`; reruns resume.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Records per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// With a server (`openai:URL#MODEL`): also keep the top-k alternatives of each token.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Replace an existing output made by another run instead of refusing.
    #[arg(long)]
    pub overwrite: bool,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

/// Runs `retort score`.
pub fn run(args: ScoreArgs) -> anyhow::Result<ExitCode> {
    let start = Instant::now();
    let identity = Identity::new("score")
        .with_model("model", &args.model)?
        .with("input", std::path::absolute(&args.input)?)
        .with("top_k", args.top_k)
        .with_compute(args.compute.compute());
    let mut run = Run::start(
        &args.output,
        identity,
        serde_json::Value::Null,
        SameRun::Continue,
        args.overwrite,
    )?;
    if args.model.is_remote() {
        let backend = retort::backend::open::open_backend(&args.model, &Default::default())
            .with_context(|| format!("cannot open model `{}`", args.model))?;
        let options = ScoreOptions {
            input: args.input.clone(),
            output: args.output.clone(),
            batch_size: 1,
        };
        let bar = ui::progress(Some(0), "score");
        let summary = retort::score::score_with_backend(
            backend.as_ref(),
            &options,
            args.top_k,
            &mut |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            },
        )
        .with_context(|| format!("cannot score `{}`", args.input.display()))?;
        bar.finish_and_clear();
        let manifest = &mut run.manifest;
        manifest.settings = serde_json::json!({ "top_k": args.top_k });
        manifest.add_input(&args.input)?;
        manifest.add_model(&args.model)?;
        manifest.counts = serde_json::to_value(&summary)?;
        manifest.wall_seconds = start.elapsed().as_secs_f64();
        run.finish(RunStatus::Complete)?;
        ui::table(
            "score",
            &[
                ("records", summary.records.to_string()),
                ("scored now", summary.scored.to_string()),
                ("tokens", summary.tokens.to_string()),
            ],
        );
        return Ok(ExitCode::SUCCESS);
    }
    let backend = open_local(&args.model, args.batch_size, args.compute.compute())
        .with_context(|| format!("cannot open model `{}`", args.model))?;
    let options = ScoreOptions {
        input: args.input.clone(),
        output: args.output.clone(),
        batch_size: args.batch_size,
    };
    let bar = ui::progress(Some(0), "score");
    let summary = score(&backend, &options, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .with_context(|| format!("cannot score `{}`", args.input.display()))?;
    bar.finish_and_clear();
    let manifest = &mut run.manifest;
    manifest.settings = serde_json::json!({ "batch_size": args.batch_size });
    manifest.add_input(&args.input)?;
    manifest.add_model(&args.model)?;
    manifest.counts = serde_json::to_value(&summary)?;
    manifest.wall_seconds = start.elapsed().as_secs_f64();
    run.finish(RunStatus::Complete)?;
    ui::table(
        "score",
        &[
            ("records", summary.records.to_string()),
            ("already done", summary.already_done.to_string()),
            ("scored now", summary.scored.to_string()),
            ("tokens", summary.tokens.to_string()),
            (
                "mean token log-prob",
                format!("{:.4}", summary.mean_token_logprob),
            ),
            (
                "tokens/s",
                format!(
                    "{:.0}",
                    summary.tokens as f64 / start.elapsed().as_secs_f64().max(1e-9)
                ),
            ),
            ("output", args.output.display().to_string()),
        ],
    );
    Ok(ExitCode::SUCCESS)
}
