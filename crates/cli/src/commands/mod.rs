//! One module per subcommand: each validates its arguments, calls one stage and displays the result.

use std::process::ExitCode;

use crate::args::{Cli, Command};

pub mod bench;
pub mod check;
pub mod demo;
pub mod device_check;
pub mod distill;
pub mod eval;
pub mod generate;
pub mod render;
pub mod report;
pub mod score;
pub mod select;
pub mod trace;
pub mod verify;
pub mod world;

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Verify(args) => verify::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Score(args) => score::run(args),
        Command::Check(args) => check::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Select(args) => select::run(args),
        Command::Distill(args) => distill::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Trace(args) => trace::run(args),
        Command::Report(args) => report::run(args),
        Command::Render(args) => render::run(args),
        Command::World(args) => world::run(args),
        Command::DeviceCheck(args) => device_check::run(args),
    }
}
