//! Raw command-line arguments (clap derive). Doc comments are the help text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// retort: reasoning distillation from teacher traces to a small student, in one binary.
#[derive(Debug, Parser)]
#[command(name = "retort", version, about, max_term_width = 100)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// More log output (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// No progress bars or tables.
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

/// The pipeline's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Add a `verdict` to every record by checking its response's final answer against the gold.
    Verify(VerifyArgs),
}

/// `retort verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Input records (JSONL or a JSON array).
    #[arg(long, short)]
    pub input: PathBuf,
    /// Output JSONL: the input records with `verdict` added.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Field holding the gold answer.
    #[arg(long, default_value = "answer")]
    pub gold_field: String,
    /// Field holding the model response.
    #[arg(long, default_value = "response")]
    pub response_field: String,
    /// Treat `50%`, `50` and `0.5` as the same answer.
    #[arg(long)]
    pub percent_equals_fraction: bool,
    /// Accept decimals within this relative tolerance of the gold (default: exact).
    #[arg(long)]
    pub tolerance: Option<f64>,
}
