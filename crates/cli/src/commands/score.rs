//! `retort score`.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use retort::backend::open::{open_local, resolve_local_spec};
use retort::manifest::Manifest;
use retort::score::{ScoreOptions, score};

use crate::args::ScoreArgs;
use crate::ui;

pub fn run(args: ScoreArgs) -> anyhow::Result<ExitCode> {
    let start = Instant::now();
    if args.model.starts_with("openai:") {
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
        let mut manifest = Manifest::new(serde_json::json!({ "top_k": args.top_k }));
        manifest.add_input(&args.input)?;
        manifest.add_model(&args.model, None)?;
        manifest.counts = serde_json::to_value(&summary)?;
        manifest.wall_seconds = start.elapsed().as_secs_f64();
        manifest.write_beside(&args.output)?;
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
    let backend = open_local(&args.model, args.batch_size)
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
    let mut manifest = Manifest::new(serde_json::json!({ "batch_size": args.batch_size }));
    manifest.add_input(&args.input)?;
    manifest.add_model(
        &args.model,
        Some(std::path::Path::new(&resolve_local_spec(&args.model))),
    )?;
    manifest.counts = serde_json::to_value(&summary)?;
    manifest.wall_seconds = start.elapsed().as_secs_f64();
    manifest.write_beside(&args.output)?;
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
