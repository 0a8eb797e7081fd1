//! `retort check`.

use std::process::ExitCode;

use anyhow::Context;
use retort::ModelSpec;
use retort::backend::scorer::open_scorer;
use retort::check::{Status, check_pair};

use crate::args::ServerScoreArgs;

/// `retort check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Teacher model (folder, `hf:ORG/NAME[@REV]`, `world:teacher` or a server
    /// `openai:URL[,URL...]#MODEL`, scored with its local tokenizer).
    #[arg(long)]
    pub teacher: ModelSpec,
    /// Student model.
    #[arg(long)]
    pub student: ModelSpec,
    /// Also print the report as one JSON line on stdout.
    #[arg(long)]
    pub json: bool,
    /// Scoring on servers.
    #[command(flatten)]
    pub server: ServerScoreArgs,
}

/// Runs `retort check`.
pub fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    // A server whose served name is not a local model borrows the other model's tokenizer.
    let open = |spec: &ModelSpec, other: &ModelSpec| {
        let options = args.server.options(1, other.local_path());
        open_scorer(spec, &options).with_context(|| format!("cannot open model `{spec}`"))
    };
    let teacher = open(&args.teacher, &args.student)?;
    let student = open(&args.student, &args.teacher)?;
    let report = check_pair(teacher.as_ref(), student.as_ref())?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    let width = report.rows.iter().map(|r| r.check.len()).max().unwrap_or(0);
    eprintln!("teacher `{}` vs student `{}`", args.teacher, args.student);
    for row in &report.rows {
        let status = match row.status {
            Status::Ok => "ok   ",
            Status::Warn => "warn ",
            Status::Error => "ERROR",
        };
        eprintln!("  {status}  {:<width$}  {}", row.check, row.detail);
    }
    if report.compatible() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "error: this pair is not safe for token-level distillation (see ERROR rows); text-only SFT on teacher traces still works"
        );
        Ok(ExitCode::FAILURE)
    }
}
