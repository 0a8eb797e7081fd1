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
    ui::init_logging(cli.global.verbose, cli.global.quiet);
    match commands::run(cli) {
        Ok(code) => code,
        Err(err) => {
            ui::print_error(&err);
            ExitCode::FAILURE
        }
    }
}
