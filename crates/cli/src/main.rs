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

// mimalloc's C API (linked through the `mimalloc` crate): `mi_option_set(mi_option_t, long)`.
#[allow(unsafe_code)]
unsafe extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_purge_delay` (index 15 in both mimalloc v2 and v3's `mi_option_e`).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// Keeps freed pages instead of returning them to the OS after 10 ms: a training step frees and
/// reallocates the same tensor sizes every few milliseconds, and each returned page costs a page
/// fault and a kernel page clear when reused (27% of an SFT step on the world student).
fn keep_freed_memory() {
    // SAFETY: a plain setter of a process-wide option, valid at any time; -1 means "never purge".
    #[allow(unsafe_code)]
    unsafe {
        mi_option_set(MI_OPTION_PURGE_DELAY, -1);
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
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
