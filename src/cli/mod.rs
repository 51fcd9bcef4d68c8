//! The command line: one subcommand per operator task, one module per subcommand.
//!
//! Exit status: 0 when the command did what was asked; 1 when it ran and the answer is no (a
//! refused fence, an invalid config) or it failed (no database, admin plane unreachable); 2 for
//! an unusable command line or, for `serve`, an unusable configuration.

pub mod audit;
pub mod check_config;
pub mod demo;
pub mod epochs;
pub mod fence;
pub mod history;
pub mod output;
pub mod serve;
pub mod sources;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::telemetry::{self, LogFormat};

/// An HTTP reverse proxy that enforces fencing tokens in front of storage that does not.
#[derive(Debug, Parser)]
#[command(name = "fencegate", version, about)]
pub struct Cli {
    /// How log lines on stderr are written.
    #[arg(
        long,
        global = true,
        env = "FENCEGATE_LOG_FORMAT",
        value_enum,
        default_value_t
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy and its admin plane.
    Serve(serve::ServeArgs),
    /// Print the rejection log, newest first (read-only; safe while serve runs).
    Audit(audit::AuditArgs),
    /// Print every resource and its highest token (read-only; safe while serve runs).
    Epochs(epochs::EpochsArgs),
    /// Print the epoch history, every advance of a highest token, newest first (read-only).
    History(history::HistoryArgs),
    /// Fence a resource to a token through the admin API, as a new leader does.
    Fence(fence::FenceArgs),
    /// Validate a config file and print the routes it would serve.
    CheckConfig(check_config::CheckConfigArgs),
    /// Play the split-brain wallet story, without and with fencing; exits 0 only if fenced right.
    Demo(demo::DemoArgs),
    /// Print shell completions for bash, zsh or fish.
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), for `man -l -` or /usr/share/man/man1/fencegate.1.
    Man,
}

impl Cli {
    /// Runs the chosen subcommand.
    pub fn run(self) -> ExitCode {
        match self.command {
            Command::Serve(args) => {
                let config = match args.load_config() {
                    Ok(config) => config,
                    Err(e) => {
                        eprintln!("fencegate: {e}");
                        return ExitCode::from(2);
                    }
                };
                telemetry::init(self.log_format, config.log_level.as_ref());
                serve::run(config, args)
            }
            Command::Audit(args) => audit::run(&args),
            Command::Epochs(args) => epochs::run(&args),
            Command::History(args) => history::run(&args),
            Command::Fence(args) => {
                telemetry::init(self.log_format, None);
                fence::run(&args)
            }
            Command::CheckConfig(args) => check_config::run(&args),
            Command::Demo(args) => demo::run(&args),
            Command::Completions { shell } => {
                let mut command = <Cli as clap::CommandFactory>::command();
                let mut out = Vec::new();
                clap_complete::generate(shell, &mut command, "fencegate", &mut out);
                // A reader that stops early closes the pipe: not an error.
                let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), &out);
                ExitCode::SUCCESS
            }
            Command::Man => {
                let command = <Cli as clap::CommandFactory>::command();
                let mut out = Vec::new();
                if let Err(e) = clap_mangen::Man::new(command).render(&mut out) {
                    eprintln!("fencegate man: {e}");
                    return ExitCode::FAILURE;
                }
                let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), &out);
                ExitCode::SUCCESS
            }
        }
    }
}
