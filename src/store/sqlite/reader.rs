//! Read-only queries for operators: the admin API and the `audit` / `epochs` commands.
//!
//! Reads never go through the writer thread. Each runs on a read-only connection of its own,
//! which in WAL mode reads a snapshot: it neither blocks the writer nor waits for it. Results come
//! in pages found by keyset (`id < after`, `resource > after`), each page one short read
//! transaction, so a caller can walk ten million rows without loading them into memory or holding
//! a snapshot open for long (which would keep the WAL from being checkpointed).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params, params_from_iter};

use super::schema::CURRENT_VERSION;
use super::token_from_sql;
use crate::audit::Reason;
use crate::store::reader::{
    EpochQuery, EpochRow, Page, ReadError, RejectionQuery, RejectionRow, ResourceQuery,
    ResourceRow, into_page, timestamp,
};
use crate::store::{PrunePlan, Retention};

/// Connections kept open between reads; more are opened when reads overlap.
const MAX_IDLE_CONNECTIONS: usize = 4;

/// How long a read waits if the database is locked (only during WAL recovery, in practice).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Read-only access to the database. Cheap to clone; blocking (call it from `spawn_blocking`).
#[derive(Debug, Clone)]
pub struct SqliteReader {
    inner: Arc<Pool>,
}

#[derive(Debug)]
struct Pool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl SqliteReader {
    /// Opens `path` read-only, checking that it is a fencegate database this version can read.
    /// Never creates or changes the file.
    pub fn open(path: &Path) -> Result<SqliteReader, ReadError> {
        let reader = SqliteReader {
            inner: Arc::new(Pool {
                path: path.to_owned(),
                idle: Mutex::new(Vec::new()),
            }),
        };
        let conn = reader.connect()?;
        reader.give_back(conn);
        Ok(reader)
    }

    /// What retention deletes: per reason, the newest id beyond that reason's `max_rows` newest
    /// rows. Found here, on a read-only connection, because the walk down a reason's index costs
    /// up to `max_rows` steps, which the writer's group commits must not wait for.
    pub fn prune_plan(&self, retention: Retention) -> Result<PrunePlan, ReadError> {
        let conn = self.connect()?;
        let keep = i64::try_from(retention.max_rows).unwrap_or(i64::MAX);
        let mut cutoffs = Vec::new();
        for reason in Reason::ALL {
            let cutoff: Option<i64> = conn
                .prepare_cached(
                    "SELECT id FROM rejections WHERE reason = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2",
                )?
                .query_row(params![reason.as_str(), keep], |row| row.get(0))
                .optional()?;
            cutoffs.extend(cutoff.map(|id| (reason, id)));
        }
        self.give_back(conn);
        Ok(PrunePlan {
            max_age: retention.max_age,
            cutoffs,
        })
    }

    /// A page of resources in name order.
    pub fn resources(&self, query: &ResourceQuery) -> Result<Page<ResourceRow>, ReadError> {
        let mut filter = Filter::default();
        if let Some(exact) = &query.exact {
            filter.push("resource = ?", exact.clone());
        }
        if let Some(prefix) = &query.prefix {
            filter.push("resource GLOB ?", glob_prefix(prefix));
        }
        if let Some(after) = &query.after {
            filter.push("resource > ?", after.clone());
        }
        let sql = format!(
            "SELECT resource, highest, updated_at FROM resources {} ORDER BY resource LIMIT ?",
            filter.clause()
        );
        self.page(&sql, filter, query.limit, resource_row, |row| {
            row.resource.clone()
        })
    }

    /// A page of the audit log, newest first.
    pub fn rejections(&self, query: &RejectionQuery) -> Result<Page<RejectionRow>, ReadError> {
        let mut filter = Filter::default();
        if let Some(resource) = &query.resource {
            filter.push("resource = ?", resource.clone());
        }
        if let Some(reason) = query.reason {
            filter.push("reason = ?", reason.as_str().to_owned());
        }
        if let Some(since) = query.since {
            // The sub-select finds, through the time index, the lowest id that can match: the
            // scan by id then stops there instead of reading the rest of the log.
            let since = timestamp(since);
            filter.push(
                "id >= (SELECT min(id) FROM rejections WHERE at >= ?)",
                since.clone(),
            );
            filter.push("at >= ?", since);
        }
        if let Some(after) = query.after {
            filter.push("id < ?", after);
        }
        let sql = format!(
            "SELECT id, at, resource, reason, token, highest, method, path, client, request_id, identity
             FROM rejections {} ORDER BY id DESC LIMIT ?",
            filter.clause()
        );
        self.page(&sql, filter, query.limit, rejection_row, |row| {
            row.id.to_string()
        })
    }

    /// A page of the epoch history, newest first.
    pub fn epochs(&self, query: &EpochQuery) -> Result<Page<EpochRow>, ReadError> {
        let mut filter = Filter::default();
        if let Some(resource) = &query.resource {
            filter.push("resource = ?", resource.clone());
        }
        if let Some(after) = query.after {
            filter.push("id < ?", after);
        }
        let sql = format!(
            "SELECT id, at, resource, from_token, to_token, via, reason
             FROM epochs {} ORDER BY id DESC LIMIT ?",
            filter.clause()
        );
        self.page(&sql, filter, query.limit, epoch_row, |row| {
            row.id.to_string()
        })
    }

    /// Runs `sql` for one more row than `limit`: if it comes back, there is a next page.
    fn page<T>(
        &self,
        sql: &str,
        filter: Filter,
        limit: usize,
        read: fn(&Row<'_>) -> rusqlite::Result<T>,
        cursor: fn(&T) -> String,
    ) -> Result<Page<T>, ReadError> {
        let conn = self.connect()?;
        let mut values = filter.values;
        values.push(Value::Integer(
            i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX),
        ));
        let rows = conn
            .prepare_cached(sql)?
            .query_map(params_from_iter(values), read)?
            .collect::<rusqlite::Result<Vec<T>>>();
        self.give_back(conn);
        Ok(into_page(rows?, limit, cursor))
    }

    fn connect(&self) -> Result<Connection, ReadError> {
        let idle = self
            .inner
            .idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pop();
        match idle {
            Some(conn) => Ok(conn),
            None => open_read_only(&self.inner.path),
        }
    }

    fn give_back(&self, conn: Connection) {
        let mut idle = self
            .inner
            .idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if idle.len() < MAX_IDLE_CONNECTIONS {
            idle.push(conn);
        }
    }
}

fn open_read_only(path: &Path) -> Result<Connection, ReadError> {
    if !path.exists() {
        return Err(ReadError::Missing(path.to_owned()));
    }
    let open_error = |source| ReadError::Open {
        path: path.to_owned(),
        source,
    };
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(open_error)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_error)?;
    let found: i64 = conn
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(open_error)?;
    let hint = match found {
        0 => "it is not a fencegate database",
        found if found < CURRENT_VERSION => "start fencegate serve on it once to migrate it",
        _ => return Ok(conn),
    };
    Err(ReadError::Schema {
        path: path.to_owned(),
        found,
        hint,
    })
}

/// A WHERE clause under construction, with its positional parameters.
#[derive(Default)]
struct Filter {
    conditions: Vec<&'static str>,
    values: Vec<Value>,
}

impl Filter {
    fn push(&mut self, condition: &'static str, value: impl Into<Value>) {
        self.conditions.push(condition);
        self.values.push(value.into());
    }

    fn clause(&self) -> String {
        if self.conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", self.conditions.join(" AND "))
        }
    }
}

/// A GLOB pattern matching names that start with `prefix`, its wildcards taken literally. GLOB
/// (unlike LIKE) is case-sensitive, as resource names are, and SQLite answers it from the index.
fn glob_prefix(prefix: &str) -> String {
    let mut pattern = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        match c {
            '*' => pattern.push_str("[*]"),
            '?' => pattern.push_str("[?]"),
            '[' => pattern.push_str("[[]"),
            c => pattern.push(c),
        }
    }
    pattern.push('*');
    pattern
}

fn token(value: Option<i64>) -> Option<u64> {
    value.map(|value| token_from_sql(value).get())
}

fn resource_row(row: &Row<'_>) -> rusqlite::Result<ResourceRow> {
    Ok(ResourceRow {
        resource: row.get(0)?,
        highest: token_from_sql(row.get(1)?).get(),
        updated_at: row.get(2)?,
    })
}

fn rejection_row(row: &Row<'_>) -> rusqlite::Result<RejectionRow> {
    Ok(RejectionRow {
        id: row.get(0)?,
        at: row.get(1)?,
        resource: row.get(2)?,
        reason: row.get(3)?,
        token: token(row.get(4)?),
        highest: token(row.get(5)?),
        method: row.get(6)?,
        path: row.get(7)?,
        client: row.get(8)?,
        request_id: row.get(9)?,
        identity: row.get(10)?,
    })
}

fn epoch_row(row: &Row<'_>) -> rusqlite::Result<EpochRow> {
    Ok(EpochRow {
        id: row.get(0)?,
        at: row.get(1)?,
        resource: row.get(2)?,
        from: token(row.get(3)?),
        to: token_from_sql(row.get(4)?).get(),
        via: row.get(5)?,
        reason: row.get(6)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Rejection;
    use crate::route::ResourceKey;
    use crate::store::Reader;
    use crate::store::sqlite::SqliteStore;
    use crate::store::{Retention, SharedStore, Via};
    use crate::token::FencingToken;
    use std::time::SystemTime;

    fn rejection(resource: &str, reason: Reason, at: SystemTime) -> Rejection {
        Rejection {
            at,
            resource: ResourceKey::new(resource),
            reason,
            token: Some(FencingToken::new(1)),
            highest: Some(FencingToken::new(2)),
            method: "PUT".into(),
            path: format!("/{resource}"),
            client: "127.0.0.1:9".into(),
            request_id: None,
            identity: None,
        }
    }

    /// A database holding `rows`, its store (still writable) and a reader.
    struct Fixture {
        store: SharedStore,
        reader: Reader,
        _guard: crate::store::WriterGuard,
        _dir: tempfile::TempDir,
    }

    async fn store_with(rows: &[(&str, Reason)]) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fg.db");
        let (store, guard) = SqliteStore::open(&path).unwrap();
        for (resource, reason) in rows {
            store
                .record_rejection(rejection(resource, *reason, SystemTime::now()))
                .await
                .unwrap();
        }
        let reader = Reader::open(&path).unwrap();
        Fixture {
            store,
            reader,
            _guard: guard,
            _dir: dir,
        }
    }

    fn walk(reader: &Reader, mut query: RejectionQuery) -> Vec<i64> {
        let mut ids = Vec::new();
        loop {
            let page = reader.rejections(&query).unwrap();
            ids.extend(page.rows.iter().map(|row| row.id));
            match page.next {
                Some(next) => query.after = Some(next.parse().unwrap()),
                None => return ids,
            }
        }
    }

    #[tokio::test]
    async fn pages_cover_every_row_once_newest_first() {
        let rows: Vec<_> = (0..25).map(|_| ("a", Reason::Stale)).collect();
        let Fixture { reader, .. } = &store_with(&rows).await;
        let query = RejectionQuery {
            limit: 7,
            ..RejectionQuery::default()
        };
        let ids = walk(reader, query);
        assert_eq!(ids, (1..=25).rev().collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn an_exactly_full_last_page_has_no_next_cursor() {
        let rows: Vec<_> = (0..10).map(|_| ("a", Reason::Stale)).collect();
        let Fixture { reader, .. } = &store_with(&rows).await;
        let query = RejectionQuery {
            limit: 10,
            ..RejectionQuery::default()
        };
        let page = reader.rejections(&query).unwrap();
        assert_eq!((page.rows.len(), page.next), (10, None));
    }

    #[tokio::test]
    async fn filters_combine() {
        let rows = [
            ("a", Reason::Stale),
            ("b", Reason::Stale),
            ("a", Reason::Missing),
            ("a", Reason::Stale),
        ];
        let Fixture { reader, .. } = &store_with(&rows).await;
        let query = RejectionQuery {
            resource: Some("a".into()),
            reason: Some(Reason::Stale),
            limit: 100,
            ..RejectionQuery::default()
        };
        assert_eq!(walk(reader, query), vec![4, 1]);
        let future = RejectionQuery {
            since: Some(SystemTime::now() + Duration::from_secs(60)),
            limit: 100,
            ..RejectionQuery::default()
        };
        assert!(walk(reader, future).is_empty());
    }

    #[tokio::test]
    async fn resource_prefix_takes_wildcards_literally() {
        let Fixture { store, reader, .. } = &store_with(&[]).await;
        for name in ["wallet:1", "wallet:2", "wallet*x", "walrus", "other"] {
            store
                .advance(&ResourceKey::new(name), FencingToken::new(3), Via::Write)
                .await
                .unwrap();
        }
        let names = |prefix: &str| {
            let query = ResourceQuery {
                prefix: Some(prefix.into()),
                limit: 100,
                ..ResourceQuery::default()
            };
            let page = reader.resources(&query).unwrap();
            page.rows
                .into_iter()
                .map(|r| r.resource)
                .collect::<Vec<_>>()
        };
        assert_eq!(names("wallet:"), ["wallet:1", "wallet:2"]);
        assert_eq!(names("wallet*"), ["wallet*x"]);
        assert_eq!(names("wal"), ["wallet*x", "wallet:1", "wallet:2", "walrus"]);
        assert_eq!(reader.resource("walrus").unwrap().unwrap().highest, 3);
        assert_eq!(reader.resource("wal").unwrap(), None);
    }

    /// What the server's retention task does: plan on a reader, delete through the writer.
    async fn prune(
        store: &SharedStore,
        reader: &Reader,
        retention: Retention,
        batch: usize,
    ) -> usize {
        let plan = reader.prune_plan(retention).unwrap();
        store.prune(plan, batch).await.unwrap()
    }

    #[tokio::test]
    async fn prune_keeps_the_newest_rows_within_the_limits() {
        let rows: Vec<_> = (0..30).map(|_| ("a", Reason::Stale)).collect();
        let Fixture { store, reader, .. } = &store_with(&rows).await;
        let keep_ten = Retention {
            max_age: Duration::from_secs(3600),
            max_rows: 10,
        };
        assert_eq!(prune(store, reader, keep_ten, 8).await, 8);
        assert_eq!(prune(store, reader, keep_ten, 8).await, 8);
        assert_eq!(prune(store, reader, keep_ten, 8).await, 4);
        assert_eq!(prune(store, reader, keep_ten, 8).await, 0);
        let all = RejectionQuery {
            limit: 100,
            ..RejectionQuery::default()
        };
        assert_eq!(
            walk(reader, all.clone()),
            (21..=30).rev().collect::<Vec<_>>()
        );
        let old = SystemTime::now() - Duration::from_secs(7200);
        store
            .record_rejection(rejection("a", Reason::Stale, old))
            .await
            .unwrap();
        assert_eq!(
            prune(store, reader, keep_ten, 8).await,
            2,
            "one over the count, one too old"
        );
        assert_eq!(walk(reader, all), (22..=30).rev().collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_flood_of_one_reason_does_not_prune_another_reasons_rows() {
        let mut rows = vec![("wallet:1", Reason::Stale)];
        rows.extend((0..50).map(|_| ("wallet:1", Reason::Missing)));
        let Fixture { store, reader, .. } = &store_with(&rows).await;
        let keep_ten = Retention {
            max_age: Duration::from_secs(3600),
            max_rows: 10,
        };
        while prune(store, reader, keep_ten, 16).await > 0 {}
        let of = |reason| RejectionQuery {
            reason: Some(reason),
            limit: 100,
            ..RejectionQuery::default()
        };
        assert_eq!(
            walk(reader, of(Reason::Stale)),
            vec![1],
            "the zombie's row stays"
        );
        assert_eq!(
            walk(reader, of(Reason::Missing)),
            (42..=51).rev().collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_missing_file_is_not_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.db");
        assert!(matches!(Reader::open(&path), Err(ReadError::Missing(_))));
        assert!(!path.exists());
    }

    #[test]
    fn a_database_that_is_not_fencegate_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        let error = Reader::open(&path).unwrap_err().to_string();
        assert!(error.contains("not a fencegate database"), "{error}");
    }
}
