//! `retort bench` without the CLI: prints the bench JSON line on stdout, progress on stderr.
//!
//! ```text
//! cargo run --release -p retort --example bench -- [--only train,score,generate,kd,verify]
//!     [--config bench-tiny,bench-small] [--seconds 3]
//! ```
//! Uses mimalloc as the `retort` binary does (glibc malloc page-faults on tensor-sized
//! allocations, DESIGN.md §7).

use std::process::ExitCode;

use retort::bench::{BenchOptions, run};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn list(value: Option<String>) -> Vec<String> {
    value
        .map(|v| v.split(',').map(str::to_string).collect())
        .unwrap_or_default()
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (mut only, mut config, mut seconds) = (Vec::new(), Vec::new(), 3.0);
    while let Some(flag) = args.next() {
        let value = args.next();
        match flag.as_str() {
            "--only" => only = list(value),
            "--config" => config = list(value),
            "--seconds" => match value.as_deref().map(str::parse::<f64>) {
                Some(Ok(s)) => seconds = s,
                _ => {
                    eprintln!("error: `--seconds` needs a number");
                    return ExitCode::FAILURE;
                }
            },
            other => {
                eprintln!("error: unknown argument `{other}`");
                return ExitCode::FAILURE;
            }
        }
    }
    let result = BenchOptions::from_filters(&only, &config, seconds)
        .and_then(|options| run(&options, &mut |line| eprintln!("{line}")));
    match result {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
