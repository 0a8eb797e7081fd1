//! The `retort` command-line tool: parses arguments, calls one pipeline stage, shows progress and
//! a summary table on stderr. Data (JSONL, bench JSON) goes to files or stdout.

use std::process::ExitCode;

use clap::Parser;

mod args;
mod commands;
mod ui;

// glibc malloc page-faults heavily on tensor-sized allocations; mimalloc avoids it (DESIGN.md §7).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = args::Cli::parse();
    if let Some(threads) = cli.global.threads.filter(|&n| n > 0) {
        set_threads(threads);
    }
    ui::init_logging(cli.global.verbose, cli.global.quiet);
    match commands::run(cli) {
        Ok(code) => code,
        Err(err) => {
            ui::print_error(&err);
            ExitCode::FAILURE
        }
    }
}

/// Sizes candle's two CPU pools (its barrier pool for element-wise ops, rayon for GEMM), which
/// read these variables once, at their first use.
fn set_threads(threads: usize) {
    let n = threads.to_string();
    // SAFETY: called first thing in `main`, before any other thread exists, so nothing can read
    // the environment concurrently.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", &n);
        std::env::set_var("CANDLE_NUM_THREADS", &n);
    }
}
