//! Cluster mode's store: the same [`Store`](super::Store) calls against a PostgreSQL that every
//! replica shares, with one more rule: every durable change (an advance, a fence, a reset, an
//! audit row) is conditional, in its own transaction, on this replica still holding the lease of
//! the resource's shard under the epoch it was granted. A deposed replica can therefore never raise
//! or lower a highest token, whatever its own clock says.
//!
//! One writer task owns one connection and commits every waiting write in one transaction (group
//! commit), as the SQLite writer does; the batch is worked out in memory ([`batch`]) and sent as a
//! few set-based statements. When PostgreSQL cannot be reached every call fails at once (the caller
//! answers 503: fail closed) and the writer reconnects on a later call.

mod batch;
mod reader;
mod schema;
mod tls;
mod writer;

use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use super::queue::QueuedStore;
use super::{LastStop, SharedStore, StoreError, WriterGuard};
use crate::cluster::{Ownership, ShardMap};

pub use reader::PostgresReader;
pub use schema::CURRENT_VERSION;

/// How a replica reaches PostgreSQL.
#[derive(Clone)]
pub struct Connection {
    config: tokio_postgres::Config,
    /// TLS, verified, when the URL's `sslmode` asks for it (see [`tls`]).
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    /// The longest any one exchange with PostgreSQL may take before it counts as unreachable.
    pub timeout: Duration,
}

impl Connection {
    /// Reads a `postgres://` URL (or key=value string) and applies the timeouts: connecting,
    /// TCP keepalives and `tcp_user_timeout`, so that a black-holed connection is noticed within
    /// `timeout` instead of the kernel's minutes.
    pub fn new(url: &str, replica: &str, timeout: Duration) -> Result<Self, StoreError> {
        let url = tls::parse(url)?;
        let mut config =
            tokio_postgres::Config::from_str(&url.url).map_err(|e| StoreError::PostgresUrl {
                cause: e.to_string(),
            })?;
        // The kernel counts keepalive times in whole seconds; zero is refused.
        let second = Duration::from_secs(1);
        config
            .application_name(format!("fencegate {replica}"))
            .connect_timeout(timeout)
            .keepalives(true)
            .keepalives_idle(timeout.max(second))
            .keepalives_interval((timeout / 3).max(second))
            .keepalives_retries(3)
            .tcp_user_timeout(timeout)
            // A replica stopped mid-transaction (SIGSTOP, a long pause) must not keep the lease
            // rows it locked FOR SHARE from being taken over: PostgreSQL ends such a transaction.
            .options(format!(
                "-c statement_timeout={ms} -c idle_in_transaction_session_timeout={ms}",
                ms = timeout.as_millis().max(1)
            ));
        Ok(Self {
            config,
            tls: url.tls,
            timeout,
        })
    }

    /// A new connection, its driver spawned on the current runtime.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, StoreError> {
        match &self.tls {
            None => self.connect_with(tokio_postgres::NoTls).await,
            Some(tls) => self.connect_with(tls.clone()).await,
        }
    }

    async fn connect_with<T>(&self, tls: T) -> Result<tokio_postgres::Client, StoreError>
    where
        T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
        T::Stream: Send + 'static,
    {
        let connecting = self.config.connect(tls);
        let (client, connection) = tokio::time::timeout(self.timeout, connecting)
            .await
            .map_err(|_| StoreError::Unavailable {
                cause: format!("no connection within {:?}", self.timeout),
            })?
            .map_err(|e| StoreError::Unavailable {
                cause: crate::problem::with_causes(&e),
            })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "a PostgreSQL connection ended");
            }
        });
        Ok(client)
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("config", &self.config)
            .field("tls", &self.tls.is_some())
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Opens the cluster's store: brings the schema to this version (once, under an advisory lock,
/// however many replicas start together), creates the cluster with `map`'s shard count or checks
/// that it has that count, and starts the writer task.
pub async fn open(
    connection: Connection,
    map: ShardMap,
    ownership: Arc<Ownership>,
) -> Result<(SharedStore, WriterGuard), StoreError> {
    let mut client = connection.connect().await?;
    schema::migrate(&mut client).await?;
    schema::join_cluster(&client, map).await?;
    drop(client);
    let (store, commands, receiver) = QueuedStore::new();
    let closer = writer::spawn(connection, ownership, receiver, commands);
    // A new owner of a shard waits out the previous owner's requests itself (the lease loop
    // knows, per shard, whether it was handed over cleanly); the store has no stop of its own.
    Ok((Arc::new(store), WriterGuard::new(LastStop::Clean, closer)))
}

/// Tokens are `u64`, PostgreSQL's `bigint` is `i64`: store the bit pattern, compare only in Rust.
fn token_to_sql(token: crate::token::FencingToken) -> i64 {
    token.get() as i64
}

fn token_from_sql(value: i64) -> crate::token::FencingToken {
    crate::token::FencingToken::new(value as u64)
}
