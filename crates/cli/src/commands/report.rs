//! `retort report`: one self-contained HTML page about a run folder.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use retort::report::write_report;

use crate::ui;

/// `retort report` arguments.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// The run's folder: whatever of its traces, selection manifests, metrics.jsonl, eval
    /// summaries and provenance files are present is shown.
    #[arg(long)]
    pub run: PathBuf,
    /// The HTML page to write (inline CSS and SVG only; nothing is loaded from the network).
    #[arg(long, default_value = "report.html")]
    pub output: PathBuf,
}

/// Runs `retort report`.
pub fn run(args: ReportArgs) -> anyhow::Result<ExitCode> {
    let summary = write_report(&args.run, &args.output)
        .with_context(|| format!("cannot write a report of `{}`", args.run.display()))?;
    let none = || "none".to_string();
    ui::table(
        "report",
        &[
            (
                "sections",
                if summary.sections.is_empty() {
                    none()
                } else {
                    summary.sections.join(", ")
                },
            ),
            (
                "not in this run",
                if summary.missing.is_empty() {
                    none()
                } else {
                    summary.missing.join(", ")
                },
            ),
            ("files read", summary.files_read.to_string()),
            ("files unreadable", summary.files_unreadable.to_string()),
            ("bytes", summary.bytes.to_string()),
            ("output", args.output.display().to_string()),
        ],
    );
    Ok(ExitCode::SUCCESS)
}
