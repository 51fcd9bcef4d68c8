//! Read-only queries for operators, the admin API and the `audit` / `epochs` / `history`
//! commands: one [`Reader`] whichever backend holds the data, so that every caller reads a file
//! and a `postgres://` cluster the same way. Results come in pages found by keyset (`id < after`,
//! `resource > after`), each page one short read.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;

use super::postgres::PostgresReader;
use super::sqlite::SqliteReader;
use super::{PrunePlan, Retention};
use crate::audit::Reason;

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(
        "no database at {0} (fencegate serve creates it on first start; name another with --db or FENCEGATE_DB)"
    )]
    Missing(PathBuf),
    #[error("cannot open database {path} read-only: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "{path} is at schema version {found}, this fencegate reads version {}; \
         {hint}",
        super::sqlite::CURRENT_VERSION
    )]
    Schema {
        path: PathBuf,
        found: i64,
        hint: &'static str,
    },
    #[error("database query failed: {0}")]
    Query(#[from] rusqlite::Error),
    #[error("cannot read the cluster's PostgreSQL database: {0}")]
    Postgres(String),
    #[error(
        "the PostgreSQL database is not a fencegate cluster at schema version {known} (it reports {found}); \
         start fencegate serve on it once to create or migrate it, or run a newer fencegate"
    )]
    PostgresSchema { found: i32, known: i32 },
}

/// One page of results. `next`, when present, is the cursor to pass as `after` for the next page.
#[derive(Debug, Clone, Serialize)]
pub struct Page<T> {
    pub rows: Vec<T>,
    pub next: Option<String>,
}

/// A resource and its durable highest token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResourceRow {
    pub resource: String,
    pub highest: u64,
    pub updated_at: String,
}

/// One row of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RejectionRow {
    pub id: i64,
    pub at: String,
    pub resource: String,
    pub reason: String,
    pub token: Option<u64>,
    pub highest: Option<u64>,
    pub method: String,
    pub path: String,
    pub client: String,
    pub request_id: Option<String>,
    /// The client's certificate identity, when the data plane verified one.
    pub identity: Option<String>,
}

/// One epoch advance: a resource's highest token changed from `from` to `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EpochRow {
    pub id: i64,
    pub at: String,
    pub resource: String,
    pub from: Option<u64>,
    pub to: u64,
    pub via: String,
    /// The operator's reason, for resets.
    pub reason: Option<String>,
}

/// Which resources to list, in name order.
#[derive(Debug, Clone, Default)]
pub struct ResourceQuery {
    pub prefix: Option<String>,
    /// Only this one resource.
    pub exact: Option<String>,
    /// The cursor: list resources whose names sort after this one.
    pub after: Option<String>,
    pub limit: usize,
}

/// Which rejections to list, newest first.
#[derive(Debug, Clone, Default)]
pub struct RejectionQuery {
    pub resource: Option<String>,
    pub reason: Option<Reason>,
    pub since: Option<SystemTime>,
    /// The cursor: list rows older than this id.
    pub after: Option<i64>,
    pub limit: usize,
}

/// Which epoch advances to list, newest first.
#[derive(Debug, Clone, Default)]
pub struct EpochQuery {
    pub resource: Option<String>,
    /// The cursor: list rows older than this id.
    pub after: Option<i64>,
    pub limit: usize,
}

/// Read-only access to the database, either backend. Cheap to clone; blocking (call it from
/// `spawn_blocking`).
#[derive(Debug, Clone)]
pub enum Reader {
    Sqlite(SqliteReader),
    Postgres(PostgresReader),
}

impl Reader {
    /// Opens `database` read-only: a SQLite file, or a `postgres://` URL (cluster mode). Never
    /// creates or changes anything.
    pub fn open(database: &Path) -> Result<Reader, ReadError> {
        match crate::config::postgres_url(database) {
            Some(url) => PostgresReader::open(url).map(Reader::Postgres),
            None => SqliteReader::open(database).map(Reader::Sqlite),
        }
    }

    /// What retention deletes: per reason, the newest id beyond that reason's `max_rows` newest
    /// rows (found here, off the writer, because the walk costs up to `max_rows` steps).
    pub fn prune_plan(&self, retention: Retention) -> Result<PrunePlan, ReadError> {
        match self {
            Reader::Sqlite(reader) => reader.prune_plan(retention),
            Reader::Postgres(reader) => reader.prune_plan(retention),
        }
    }

    /// One resource, or `None` if it was never seen.
    pub fn resource(&self, name: &str) -> Result<Option<ResourceRow>, ReadError> {
        let query = ResourceQuery {
            exact: Some(name.to_owned()),
            limit: 1,
            ..ResourceQuery::default()
        };
        Ok(self.resources(&query)?.rows.pop())
    }

    /// A page of resources in name order.
    pub fn resources(&self, query: &ResourceQuery) -> Result<Page<ResourceRow>, ReadError> {
        match self {
            Reader::Sqlite(reader) => reader.resources(query),
            Reader::Postgres(reader) => reader.resources(query),
        }
    }

    /// A page of the audit log, newest first.
    pub fn rejections(&self, query: &RejectionQuery) -> Result<Page<RejectionRow>, ReadError> {
        match self {
            Reader::Sqlite(reader) => reader.rejections(query),
            Reader::Postgres(reader) => reader.rejections(query),
        }
    }

    /// A page of the epoch history, newest first.
    pub fn epochs(&self, query: &EpochQuery) -> Result<Page<EpochRow>, ReadError> {
        match self {
            Reader::Sqlite(reader) => reader.epochs(query),
            Reader::Postgres(reader) => reader.epochs(query),
        }
    }
}

/// Keeps `limit` rows of the `limit + 1` a query fetched; the extra one says there is a next page,
/// whose cursor is the last kept row's.
pub(super) fn into_page<T>(mut rows: Vec<T>, limit: usize, cursor: fn(&T) -> String) -> Page<T> {
    let next = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(cursor)
    } else {
        None
    };
    Page { rows, next }
}

/// RFC 3339 UTC with milliseconds: fixed width, so the text order of stored timestamps is their
/// time order. The one format every backend shows times in.
pub fn timestamp(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}
