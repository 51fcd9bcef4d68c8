//! `fencegate epochs`: every resource and its highest token, straight from the database.

use std::io::BufWriter;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::audit::PAGE_ROWS;
use super::output::{self, Format};
use crate::config::DEFAULT_DATABASE;
use crate::store::{Reader, ResourceQuery, ResourceRow};

/// Flags of `fencegate epochs`.
#[derive(Debug, Args)]
pub struct EpochsArgs {
    /// SQLite database file, opened read-only.
    #[arg(long, env = "FENCEGATE_DB", value_name = "FILE", default_value = DEFAULT_DATABASE)]
    pub db: PathBuf,
    /// Only this resource.
    #[arg(long, value_name = "R")]
    pub resource: Option<String>,
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
}

/// Streams the resources, in name order, to stdout.
pub fn run(args: &EpochsArgs) -> ExitCode {
    let reader = match Reader::open(&args.db) {
        Ok(reader) => reader,
        Err(e) => {
            eprintln!("fencegate epochs: {e}");
            return ExitCode::FAILURE;
        }
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
