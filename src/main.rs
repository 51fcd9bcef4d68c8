use std::process::ExitCode;

use clap::Parser;
use fencegate::cli::Cli;

fn main() -> ExitCode {
    Cli::parse().run()
}
