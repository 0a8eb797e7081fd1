//! Terminal output: logging, progress bars, summary tables and error chains, all on stderr.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

static QUIET: AtomicBool = AtomicBool::new(false);

/// Sets up `tracing` on stderr (`RUST_LOG` overrides the level).
pub fn init_logging(verbose: u8, quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, _) => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .try_init();
}

/// A progress bar on stderr, hidden when quiet or when stderr is not a terminal.
pub fn progress(len: Option<u64>, message: &str) -> ProgressBar {
    let bar = match len {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::new_spinner(),
    };
    let hidden = QUIET.load(Ordering::Relaxed) || !std::io::stderr().is_terminal();
    bar.set_draw_target(if hidden {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    });
    let template = if len.is_some() {
        "{msg:>10} [{bar:30.cyan/blue}] {pos}/{len} ({per_sec}, eta {eta}) {prefix}"
    } else {
        "{msg:>10} {spinner} {pos} ({per_sec}) {prefix}"
    };
    bar.set_style(
        ProgressStyle::with_template(template)
            .expect("static template is valid")
            .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

/// Prints a two-column summary table on stderr unless quiet.
pub fn table(title: &str, rows: &[(&str, String)]) {
    if QUIET.load(Ordering::Relaxed) {
        return;
    }
    let width = rows
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    let value_width = rows
        .iter()
        .map(|(_, v)| v.chars().count())
        .max()
        .unwrap_or(0);
    let rule = "─".repeat(width + value_width + 5);
    eprintln!("{title}");
    eprintln!("{rule}");
    for (key, value) in rows {
        eprintln!("  {key:<width$}   {value:>value_width$}");
    }
    eprintln!("{rule}");
}

/// Prints an error chain as `error:` / `Caused by:` lines, with a hint when one applies.
pub fn print_error(err: &anyhow::Error) {
    eprintln!("error: {err}");
    let causes: Vec<String> = err.chain().skip(1).map(ToString::to_string).collect();
    if !causes.is_empty() {
        eprintln!("\nCaused by:");
        for cause in &causes {
            eprintln!("  {cause}");
        }
    }
    if let Some(hint) = hint_for(err) {
        eprintln!("\nhint: {hint}");
    }
}

fn hint_for(err: &anyhow::Error) -> Option<&'static str> {
    let text = format!("{err:#}");
    if text.contains("pytorch_model.bin") {
        Some(
            "convert the weights to safetensors first (e.g. with transformers: `model.save_pretrained(dir, safe_serialization=True)`)",
        )
    } else if text.contains("No such file or directory") {
        Some(
            "check the path; model specs are a folder, `hf:ORG/NAME[@REV]`, `openai:URL#MODEL` or `world:teacher`",
        )
    } else if text.contains("the server looks down") || text.contains("the server is not answering")
    {
        Some(
            "check that the server is up (`curl URL/models`); what succeeded is kept, and rerunning the same command resumes",
        )
    } else {
        None
    }
}
