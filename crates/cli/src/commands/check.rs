//! `retort check`.

use std::process::ExitCode;

use anyhow::Context;
use retort::ModelSpec;
use retort::check::{Status, check_pair};
use retort_model::load::{LoadOptions, load};

/// `retort check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Teacher model (folder, `hf:ORG/NAME[@REV]` or `world:teacher`).
    #[arg(long)]
    pub teacher: ModelSpec,
    /// Student model.
    #[arg(long)]
    pub student: ModelSpec,
    /// Also print the report as one JSON line on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Runs `retort check`.
pub fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let open = |spec: &ModelSpec| {
        if spec.is_remote() {
            anyhow::bail!(
                "`retort check` compares local models (folders or `hf:` specs); `{spec}` is a server"
            );
        }
        let dir = spec.local_dir()?;
        load(&dir.to_string_lossy(), &LoadOptions::default())
            .with_context(|| format!("cannot open model `{spec}`"))
    };
    let teacher = open(&args.teacher)?;
    let student = open(&args.student)?;
    let report = check_pair(&teacher, &student)?;
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
