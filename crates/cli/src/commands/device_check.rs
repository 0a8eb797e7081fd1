//! `retort device-check`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::args::ComputeArgs;
use crate::ui;

/// `retort device-check`.
#[derive(Debug, clap::Args)]
pub struct DeviceCheckArgs {
    /// The golden fixtures (default: `../shared/fixtures` or `shared/fixtures`).
    #[arg(long)]
    pub fixtures: Option<PathBuf>,
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// Also print the checks as one JSON line.
    #[arg(long)]
    pub json: bool,
}

/// Runs `retort device-check`: exit 1 when a check fails.
pub fn run(args: DeviceCheckArgs) -> anyhow::Result<ExitCode> {
    let fixtures = retort::device_check::fixtures_dir(args.fixtures.clone())?;
    let compute = args.compute.compute();
    let checks = retort::device_check::run(&fixtures, compute)
        .with_context(|| format!("device check on {compute}"))?;
    let rows: Vec<(String, String)> = checks
        .iter()
        .map(|c| {
            (
                format!("{} {}", c.model, c.what),
                format!(
                    "{:.3e} (bound {:.1e}) {}",
                    c.value,
                    c.bound,
                    if c.pass { "ok" } else { "FAIL" }
                ),
            )
        })
        .collect();
    let borrowed: Vec<(&str, String)> = rows.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    ui::table(&format!("device-check {compute}"), &borrowed);
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "device": compute.device, "dtype": compute.precision, "checks": checks })
        );
    }
    let failed = checks.iter().filter(|c| !c.pass).count();
    if failed > 0 {
        eprintln!("{failed} of {} checks failed on {compute}", checks.len());
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
