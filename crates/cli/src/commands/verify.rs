//! `retort verify`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use retort::identity::{Identity, RunStatus, SameRun};
use retort::verify::{VerifyStageOptions, verify_file};

use retort_verify::PercentPolicy;

use crate::run::Run;
use crate::ui;

/// `retort verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Input records (JSONL or a JSON array).
    #[arg(long, short)]
    pub input: PathBuf,
    /// Output JSONL: the input records with `verdict` added.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Field holding the gold answer.
    #[arg(long, default_value = "answer")]
    pub gold_field: String,
    /// Field holding the model response.
    #[arg(long, default_value = "response")]
    pub response_field: String,
    /// Percent policy: `either` (28% = 28 = 0.28), `strict` (28% = 0.28 only), `ignore` (28% = 28 only).
    #[arg(long, value_enum, default_value_t = PercentPolicy::Either)]
    pub percent: PercentPolicy,
    /// Accept numbers within this relative tolerance of the gold (default: exact, so 1.414 is not √2).
    #[arg(long)]
    pub tolerance: Option<f64>,
    /// The tags around inline reasoning (default `<think>` `</think>`); the answer is read after
    /// the second.
    #[arg(long, num_args = 2, value_names = ["OPEN", "CLOSE"])]
    pub think_tags: Option<Vec<String>>,
    /// Keep units after values (`5 cm` vs `5`) instead of stripping them.
    #[arg(long)]
    pub keep_units: bool,
    /// Replace an existing output made by another run instead of refusing.
    #[arg(long)]
    pub overwrite: bool,
}

/// Runs `retort verify`.
pub fn run(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let start = Instant::now();
    let mut options = VerifyStageOptions {
        gold_field: args.gold_field,
        response_field: args.response_field,
        think_tags: crate::commands::generate::think_tags(args.think_tags.as_deref())?,
        ..VerifyStageOptions::default()
    };
    options.policy.percent = args.percent;
    options.policy.float_tolerance = args.tolerance;
    options.policy.strip_units = !args.keep_units;
    let identity = Identity::new("verify")
        .with("input", std::path::absolute(&args.input)?)
        .with("gold_field", &options.gold_field)
        .with("response_field", &options.response_field)
        .with("policy", format!("{:?}", options.policy));
    let run = Run::start(
        &args.output,
        identity,
        serde_json::Value::Null,
        SameRun::Continue,
        args.overwrite,
    )?;
    let bar = ui::progress(None, "verify");
    let summary = verify_file(&args.input, &args.output, &options, &|n| {
        bar.set_position(n as u64)
    })
    .with_context(|| format!("cannot verify `{}`", args.input.display()))?;
    bar.finish_and_clear();
    let mut run = run;
    let manifest = &mut run.manifest;
    manifest.settings = serde_json::json!({
        "gold_field": options.gold_field,
        "response_field": options.response_field,
        "policy": format!("{:?}", options.policy),
    });
    manifest.add_input(&args.input)?;
    manifest.counts = serde_json::to_value(&summary)?;
    manifest.wall_seconds = start.elapsed().as_secs_f64();
    run.finish(RunStatus::Complete)?;
    let seconds = start.elapsed().as_secs_f64();
    ui::table(
        "verify",
        &[
            ("records", summary.total.to_string()),
            ("correct", summary.correct.to_string()),
            ("no final answer", summary.no_answer.to_string()),
            ("accuracy", format!("{:.4}", summary.accuracy())),
            (
                "pairs/s",
                format!("{:.0}", summary.total as f64 / seconds.max(1e-9)),
            ),
            ("output", args.output.display().to_string()),
        ],
    );
    Ok(ExitCode::SUCCESS)
}
