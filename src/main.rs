use std::process::ExitCode;

use clap::Parser;
use fencegate::cli::{Cli, Command, serve};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let config = match args.load_config() {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("fencegate: {e}");
                    return ExitCode::from(2);
                }
            };
            fencegate::telemetry::init();
            serve::run(config)
        }
    }
}
