//! The `retort` command-line tool: parses arguments, calls one pipeline stage, shows progress and
//! a summary table on stderr. Data (JSONL, bench JSON) goes to files or stdout.

use std::process::ExitCode;

use clap::Parser;

mod args;
mod commands;
mod run;
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
    if let Err(e) = stop_on_signals() {
        eprintln!("warning: cannot install the Ctrl-C handler: {e}");
    }
    let cli = args::Cli::parse();
    if let Some(threads) = cli.global.threads.filter(|&n| n > 0) {
        set_threads(threads);
    }
    ui::init_logging(cli.global.verbose, cli.global.quiet);
    match run_in_pool(cli) {
        Ok(code) => code,
        Err(err) => {
            ui::print_error(&err);
            ExitCode::FAILURE
        }
    }
}

/// The first Ctrl-C or SIGTERM asks the running stage to stop at its next checkpoint
/// (`retort::interrupt`); a second one exits at once (130 or 143), leaving journals as
/// consistent as after `kill -9`.
fn stop_on_signals() -> std::io::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    let seen = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let code = i32::from(retort::interrupt::exit_code(signal));
        // Registered first, so it runs before `seen` is set: it exits only on a second signal.
        signal_hook::flag::register_conditional_shutdown(signal, code, Arc::clone(&seen))?;
        signal_hook::flag::register(signal, Arc::clone(&seen))?;
        signal_hook::flag::register_usize(
            signal,
            retort::interrupt::stop_flag(),
            usize::try_from(signal).unwrap_or(2),
        )?;
    }
    Ok(())
}

/// Stack of each rayon worker: the command runs on one, and candle's backward walks the
/// graph recursively.
const WORKER_STACK_BYTES: usize = 64 << 20;

/// Runs the command on a worker of rayon's global pool rather than on the main thread.
///
/// Parallel work started from outside the pool is queued and the caller sleeps until it is
/// done: every kernel call then costs a wake-up of the workers and one of the caller, which
/// dominated decoding (hundreds of small parallel calls per token). From inside the pool the
/// calling thread takes its share of the work and only the other workers are woken.
fn run_in_pool(cli: args::Cli) -> anyhow::Result<ExitCode> {
    // The pool's size still comes from `RAYON_NUM_THREADS` (set by `--threads`).
    if let Err(err) = rayon::ThreadPoolBuilder::new()
        .stack_size(WORKER_STACK_BYTES)
        .thread_name(|i| format!("retort-worker-{i}"))
        .build_global()
    {
        tracing::debug!("rayon pool already built: {err}");
    }
    rayon::scope(|_| commands::run(cli))
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
