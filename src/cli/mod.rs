//! The command line: one subcommand per operator task.

pub mod serve;

use clap::{Parser, Subcommand};

/// An HTTP reverse proxy that enforces fencing tokens in front of storage that does not.
#[derive(Debug, Parser)]
#[command(name = "fencegate", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy and its admin plane.
    Serve(serve::ServeArgs),
}
