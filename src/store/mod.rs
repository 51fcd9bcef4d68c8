//! The durable store: where each resource's highest token, the epoch history and the audit log
//! live. The gate and everything above it see only the [`Store`] trait; which database is behind
//! it is decided once, at start-up ([`open`]):
//!
//! - `sqlite/`: the embedded default, one file, one server. One writer thread owns the
//!   connection and commits every waiting write in one transaction (group commit).
//! - `postgres/` (cluster mode): the same calls against a shared PostgreSQL, where every write is
//!   also conditional on this replica still holding the lease of the resource's shard.
//!
//! Every backend answers a write only after it is durable, and numbers its answers in commit
//! order ([`Durable::seq`]), so that the gate's copy in memory follows the database.
//!
//! The request hot path (a write with the current token of a resident resource) never comes here.

pub mod postgres;
mod queue;
pub mod reader;
pub mod sqlite;

use std::path::PathBuf;
use std::sync::Arc;

use crate::audit::Rejection;
use crate::route::ResourceKey;
use crate::token::FencingToken;

pub use reader::{
    EpochQuery, EpochRow, Page, ReadError, Reader, RejectionQuery, RejectionRow, ResourceQuery,
    ResourceRow,
};

/// The store as the gate, the proxy and the admin plane use it. Cheap to clone.
pub type SharedStore = Arc<dyn Store>;

/// What a durable store does. Every write returns only once it is durable; every answer carries
/// the backend's commit-order number (see [`Durable`]).
#[async_trait::async_trait]
pub trait Store: std::fmt::Debug + Send + Sync + 'static {
    /// The durable highest token of `resource` (`None` if it was never seen).
    async fn load(&self, resource: &ResourceKey) -> Result<Durable, StoreError>;

    /// Raises `resource`'s highest token to `token` unless it is already at or above it, and
    /// records the advance in the epoch history.
    async fn advance(
        &self,
        resource: &ResourceKey,
        token: FencingToken,
        via: Via,
    ) -> Result<Advance, StoreError>;

    /// Raises each of `resources` to `token` in one transaction, all or nothing: if any is already
    /// above `token`, nothing is written (see [`AllAdvanced::refused_by`]). Records each advance in
    /// the epoch history.
    async fn advance_all(
        &self,
        resources: Vec<ResourceKey>,
        token: FencingToken,
        via: Via,
    ) -> Result<AllAdvanced, StoreError>;

    /// Sets `resource`'s highest token to `token` even if that is lower, and records the reset and
    /// the operator's `reason` in the epoch history.
    async fn reset(
        &self,
        resource: &ResourceKey,
        token: FencingToken,
        reason: String,
    ) -> Result<Reset, StoreError>;

    /// Appends a rejection to the audit log.
    async fn record_rejection(&self, rejection: Rejection) -> Result<(), StoreError>;

    /// Deletes up to `batch` audit rows that `plan` no longer keeps, oldest first, in a
    /// transaction of its own. Returns how many were deleted; fewer than `batch` means none are
    /// left to prune.
    async fn prune(&self, plan: PrunePlan, batch: usize) -> Result<usize, StoreError>;

    /// Answers once the writer has taken a command: it is alive and not stuck.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// Keeps a store's writer running. [`WriterGuard::close`] lets it finish every queued write and
/// records how this server stopped; dropping the guard without closing stops the writer as an
/// unclean stop, without waiting.
pub struct WriterGuard {
    last_stop: LastStop,
    writer: Box<dyn CloseWriter>,
}

/// How a backend stops its writer (see [`WriterGuard`]). Its `Drop` is the unclean stop.
#[async_trait::async_trait]
pub trait CloseWriter: Send {
    /// Flushes every write queued so far, records `this_stop`, stops the writer and waits for it.
    async fn close(self: Box<Self>, this_stop: LastStop);
}

impl WriterGuard {
    pub fn new(last_stop: LastStop, writer: Box<dyn CloseWriter>) -> Self {
        Self { last_stop, writer }
    }

    /// How the previous server on this database stopped.
    pub fn last_stop(&self) -> LastStop {
        self.last_stop
    }

    /// Flushes every write queued so far, records how this server stopped (`Clean` only if
    /// nothing it forwarded can still be applied upstream), stops the writer, and waits for it.
    pub async fn close(self, this_stop: LastStop) {
        self.writer.close(this_stop).await;
    }
}

impl std::fmt::Debug for WriterGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterGuard")
            .field("last_stop", &self.last_stop)
            .finish_non_exhaustive()
    }
}

/// What raised a resource's highest token; recorded in the epoch history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// A fenced request carried a higher token.
    Write,
    /// An operator or a new leader fenced the resource through the admin API.
    Fence,
    /// An operator set the token, possibly lower, through the admin API.
    Reset,
}

impl Via {
    /// The name stored in the epoch history and shown to operators.
    pub const fn as_str(self) -> &'static str {
        match self {
            Via::Write => "write",
            Via::Fence => "fence",
            Via::Reset => "reset",
        }
    }
}

/// A resource's durable highest token as of one point in the writer's commit order.
///
/// `seq` orders observations: the writer numbers every write it applies, and a read sees the
/// number of the last write before it. Whoever keeps a copy in memory keeps the observation with
/// the greatest `seq`, so the copy follows the database even when a reset lowers the token and
/// the answers to concurrent callers arrive out of order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durable {
    /// `None` if the resource was never seen.
    pub highest: Option<FencingToken>,
    pub seq: u64,
}

/// The result of asking the store to raise a resource's highest token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advance {
    /// The token is now the durable highest; `from` was the previous one.
    Raised {
        from: Option<FencingToken>,
        seq: u64,
    },
    /// The durable highest was already at or above the token; nothing was written.
    AlreadyAt { highest: FencingToken, seq: u64 },
}

impl Advance {
    /// The durable state this advance left behind, for a caller that asked to raise to `token`.
    pub fn durable(self, token: FencingToken) -> Durable {
        match self {
            Advance::Raised { seq, .. } => Durable {
                highest: Some(token),
                seq,
            },
            Advance::AlreadyAt { highest, seq } => Durable {
                highest: Some(highest),
                seq,
            },
        }
    }
}

/// The result of raising several resources to one token in one transaction, all or nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllAdvanced {
    /// Each resource's highest before the write, in the order asked.
    pub previous: Vec<Option<FencingToken>>,
    /// The first resource that was already above the token; then nothing was written.
    pub refused_by: Option<usize>,
    pub token: FencingToken,
    pub seq: u64,
}

impl AllAdvanced {
    /// Resource `index`'s durable state after the write.
    pub fn durable(&self, index: usize) -> Durable {
        let previous = self.previous[index];
        let highest = match self.refused_by {
            Some(_) => previous,
            None => previous.max(Some(self.token)),
        };
        Durable {
            highest,
            seq: self.seq,
        }
    }

    /// Whether resource `index` was raised, and from what.
    pub fn raised_from(&self, index: usize) -> Option<Option<FencingToken>> {
        let previous = self.previous[index];
        (self.refused_by.is_none() && previous.is_none_or(|from| from < self.token))
            .then_some(previous)
    }
}

/// The result of an operator's reset: the token it replaced, and the state it left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reset {
    pub from: Option<FencingToken>,
    pub durable: Durable,
}

/// How much of the audit log to keep; older rows are pruned in the background.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Rows older than this are deleted.
    pub max_age: std::time::Duration,
    /// At most this many of the newest rows are kept *per reason*, so that a flood of one kind
    /// (requests without a token, say) cannot push another kind (a refused zombie write) out.
    pub max_rows: u64,
}

/// What one prune deletes: per reason, every row up to an id; and rows older than `max_age`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrunePlan {
    pub max_age: std::time::Duration,
    /// Per reason, the newest id past that reason's row limit.
    pub cutoffs: Vec<(crate::audit::Reason, i64)>,
}

/// Why the store could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    // The causes are in the messages, and deliberately not `source`s: a chain printed whole
    // (`{:#}`) would repeat them.
    #[error("cannot open database {path}: {cause}")]
    Open {
        path: PathBuf,
        cause: Arc<rusqlite::Error>,
    },
    #[error("cannot open database {path} for reading and writing: {cause}")]
    Access {
        path: PathBuf,
        cause: Arc<std::io::Error>,
    },
    #[error(
        "the directory of database {path} does not exist; create it, or name another file with --db (or FENCEGATE_DB, or `database` in the config file)"
    )]
    NoDirectory { path: PathBuf },
    #[error("cannot bring database {path} to the current schema: {cause}")]
    Migrate {
        path: PathBuf,
        cause: Arc<rusqlite_migration::Error>,
    },
    #[error(
        "database {path} is in use by another `fencegate serve` (it holds {lock}); two servers on one database would each enforce only their own tokens"
    )]
    InUse { path: PathBuf, lock: PathBuf },
    #[error(
        "database {path} is locked for writing by another process ({cause}); fencegate must be able to write before it serves (close any sqlite3 shell or other writer)"
    )]
    Locked {
        path: PathBuf,
        cause: Arc<rusqlite::Error>,
    },
    #[error("cannot lock {lock}: {cause}")]
    LockFile {
        lock: PathBuf,
        cause: Arc<std::io::Error>,
    },
    #[error("database {path} did not switch to WAL journaling (it reports {mode:?})")]
    NotWal { path: PathBuf, mode: String },
    #[error("cannot start the database writer thread: {0}")]
    Spawn(Arc<std::io::Error>),
    #[error("database error: {0}")]
    Sqlite(Arc<rusqlite::Error>),
    #[error("the database writer has stopped")]
    Closed,
    #[error("cannot read the PostgreSQL URL in `database`: {cause}")]
    PostgresUrl { cause: String },
    #[error("PostgreSQL is unreachable: {cause}")]
    Unavailable { cause: String },
    #[error("PostgreSQL error: {}", crate::problem::with_causes(.0.as_ref()))]
    Postgres(Arc<tokio_postgres::Error>),
    #[error(
        "this replica no longer holds the lease of shard {shard}; the write was not made (its new owner serves it)"
    )]
    NotOwner { shard: u32 },
    #[error(
        "the PostgreSQL database is at schema version {found}, this fencegate knows versions up to {known}; run a newer fencegate"
    )]
    SchemaTooNew { found: i32, known: i32 },
    #[error(
        "the cluster in this PostgreSQL database was created with {database} shards, the config says {config}; the shard count is fixed when a cluster is created (set `[cluster] shards = {database}`)"
    )]
    ShardCount { database: i32, config: i32 },
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        StoreError::Postgres(Arc::new(e))
    }
}

/// How the previous server on a database stopped, as its lock file tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LastStop {
    /// It drained every request and nothing it sent upstream was left in doubt; or there was no
    /// previous server (a new database).
    Clean,
    /// It was killed, crashed, or stopped with requests in flight or in doubt: the upstream may
    /// still apply some of them for up to `in_doubt_grace`.
    Unclean,
}
