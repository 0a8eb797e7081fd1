//! One module per subcommand: each validates its arguments, calls one stage and displays the result.

use std::process::ExitCode;

use crate::args::{Cli, Command};

mod check;
mod generate;
mod score;
mod verify;

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Verify(args) => verify::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Score(args) => score::run(args),
        Command::Check(args) => check::run(args),
        Command::Bench(_args) => anyhow::bail!("`retort bench` is not built yet"),
    }
}
