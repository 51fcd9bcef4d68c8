//! `fencegate audit`: the rejection log, straight from the database.

use std::io::BufWriter;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use clap::Args;

use super::output::{self, Format};
use super::sources::ConfigFile;
use crate::audit::{self, Reason};
use crate::store::{RejectionQuery, RejectionRow};

/// Rows read per page; each page is one short read transaction.
pub const PAGE_ROWS: usize = 1000;

/// Flags of `fencegate audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// SQLite database file, opened read-only [default: the config's `database`, else
    /// fencegate.db].
    #[arg(long, env = "FENCEGATE_DB", value_name = "FILE")]
    pub db: Option<PathBuf>,
    #[command(flatten)]
    pub config: ConfigFile,
    /// Only rejections of this resource.
    #[arg(long, value_name = "R")]
    pub resource: Option<String>,
    /// Only rejections for this reason: stale, missing, invalid, jump, collection, forbidden or
    /// unattributable.
    #[arg(long)]
    pub reason: Option<Reason>,
    /// Only rejections since then: an RFC 3339 time or a duration such as 1h.
    #[arg(long, value_name = "WHEN", value_parser = since)]
    pub since: Option<SystemTime>,
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
}

fn since(text: &str) -> Result<SystemTime, String> {
    audit::parse_since(text, SystemTime::now())
}

/// Streams the matching rejections, newest first, to stdout.
pub fn run(args: &AuditArgs) -> ExitCode {
    let reader = match args.config.open_reader("audit", args.db.as_ref()) {
        Ok(reader) => reader,
        Err(status) => return status,
    };
    let mut query = RejectionQuery {
        resource: args.resource.clone(),
        reason: args.reason,
        since: args.since,
        after: None,
        limit: PAGE_ROWS,
    };
    let out = BufWriter::new(std::io::stdout().lock());
    let result = output::stream(args.format, out, |last: Option<&RejectionRow>| {
        query.after = last.map(|row| row.id);
        reader.rejections(&query)
    });
    output::finish("audit", result)
}
