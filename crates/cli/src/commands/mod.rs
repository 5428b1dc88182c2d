//! One file per subcommand; `run` dispatches.
mod bench;
mod compare;
mod demo;
mod eval;
mod export;
mod merge;
mod predict;
mod report;
mod train;

use crate::args::{Cli, Command};
use anyhow::Result;
use std::process::ExitCode;

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Bench(what) => bench::run(what.into_args()),
        Command::Compare(args) => compare::run(args),
        Command::Export(args) => export::run(args),
        Command::Merge(args) => merge::run(args),
        Command::Predict(args) => predict::run(args),
        Command::Report(args) => report::run(args),
    }
}
