//! One module per subcommand: each validates its arguments, calls one stage and displays the result.

use std::process::ExitCode;

use crate::args::{Cli, Command};

mod verify;

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Verify(args) => verify::run(args),
    }
}
