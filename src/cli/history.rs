//! `fencegate history`: the epoch history (every advance of a highest token, by a write, a fence
//! or a reset), newest first, straight from the database; what `GET /v1/epochs` serves.

use std::io::BufWriter;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::audit::PAGE_ROWS;
use super::output::{self, Format};
use super::sources::ConfigFile;
use crate::store::{EpochQuery, EpochRow};

/// Flags of `fencegate history`.
#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// SQLite database file, opened read-only [default: the config's `database`, else
    /// fencegate.db].
    #[arg(long, env = "FENCEGATE_DB", value_name = "FILE")]
    pub db: Option<PathBuf>,
    #[command(flatten)]
    pub config: ConfigFile,
    /// Only this resource's advances.
    #[arg(long, value_name = "R")]
    pub resource: Option<String>,
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
}

/// Streams the advances, newest first, to stdout.
pub fn run(args: &HistoryArgs) -> ExitCode {
    let reader = match args.config.open_reader("history", args.db.as_ref()) {
        Ok(reader) => reader,
        Err(status) => return status,
    };
    let mut query = EpochQuery {
        resource: args.resource.clone(),
        limit: PAGE_ROWS,
        ..EpochQuery::default()
    };
    let out = BufWriter::new(std::io::stdout().lock());
    let result = output::stream(args.format, out, |last: Option<&EpochRow>| {
        query.after = last.map(|row| row.id);
        reader.epochs(&query)
    });
    output::finish("history", result)
}
