//! `retort bench`: throughput figures on the fixed bench configs, one JSON line on stdout shaped
//! like `shared/bench/torch_bench.py`'s output; progress on stderr.

use std::process::ExitCode;

use anyhow::Context;
use retort::bench::{BenchOptions, run as run_bench};

use crate::args::BenchArgs;

/// Runs the selected figures and prints the report.
pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let options = BenchOptions::from_filters(&args.only, &args.config, args.seconds)?;
    let report = run_bench(&options, &mut |line| eprintln!("{line}")).context("bench failed")?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(ExitCode::SUCCESS)
}
