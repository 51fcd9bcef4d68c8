//! `fencegate epochs`: every resource and its highest token, straight from the database.

use std::io::BufWriter;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::audit::PAGE_ROWS;
use super::output::{self, Format};
use super::sources::ConfigFile;
use crate::store::{ResourceQuery, ResourceRow};

/// Flags of `fencegate epochs`.
#[derive(Debug, Args)]
pub struct EpochsArgs {
    /// SQLite database file, opened read-only [default: the config's `database`, else
    /// fencegate.db].
    #[arg(long, env = "FENCEGATE_DB", value_name = "FILE")]
    pub db: Option<PathBuf>,
    #[command(flatten)]
    pub config: ConfigFile,
    /// Only this resource.
    #[arg(long, value_name = "R")]
    pub resource: Option<String>,
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
}

/// Streams the resources, in name order, to stdout.
pub fn run(args: &EpochsArgs) -> ExitCode {
    let reader = match args.config.open_reader("epochs", args.db.as_ref()) {
        Ok(reader) => reader,
        Err(status) => return status,
    };
    let mut query = ResourceQuery {
        exact: args.resource.clone(),
        limit: PAGE_ROWS,
        ..ResourceQuery::default()
    };
    let out = BufWriter::new(std::io::stdout().lock());
    let result = output::stream(args.format, out, |last: Option<&ResourceRow>| {
        query.after = last.map(|row| row.resource.clone());
        reader.resources(&query)
    });
    output::finish("epochs", result)
}
