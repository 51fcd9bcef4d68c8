//! Operators' reads of a cluster's PostgreSQL: the same pages as from a SQLite file, on
//! connections of their own (never the writer's or the lease loop's).
//!
//! Blocking, like the SQLite reader (callers run it in `spawn_blocking`, or on the command
//! line's own thread): the `postgres` crate drives tokio-postgres on a runtime of its own.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use postgres::types::ToSql;
use postgres::{Client, NoTls, Row};

use super::schema::CURRENT_VERSION;
use super::token_from_sql;
use crate::audit::Reason;
use crate::store::reader::{
    EpochQuery, EpochRow, Page, ReadError, RejectionQuery, RejectionRow, ResourceQuery,
    ResourceRow, into_page, timestamp,
};
use crate::store::{PrunePlan, Retention};

/// Connections kept open between reads.
const MAX_IDLE_CONNECTIONS: usize = 4;

/// How long connecting, or any one read, may take.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct PostgresReader {
    inner: Arc<Pool>,
}

struct Pool {
    config: postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    idle: Mutex<Vec<Client>>,
}

impl Drop for Pool {
    /// A `postgres::Client` closes by blocking on its own runtime, which panics inside an async
    /// one (where the last reader handle is typically dropped): the idle connections close on a
    /// thread of their own.
    fn drop(&mut self) {
        let idle = std::mem::take(
            self.idle
                .get_mut()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        if !idle.is_empty() {
            let _ = std::thread::Builder::new()
                .name("fencegate-reader-close".into())
                .spawn(move || drop(idle));
        }
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

impl PostgresReader {
    /// Connects to `url` and checks that it holds a fencegate cluster this version reads.
    pub fn open(url: &str) -> Result<PostgresReader, ReadError> {
        let url = super::tls::parse(url).map_err(|e| ReadError::Postgres(e.to_string()))?;
        let mut config: postgres::Config = url
            .url
            .parse()
            .map_err(|e: postgres::Error| ReadError::Postgres(e.to_string()))?;
        config
            .application_name("fencegate reader")
            .connect_timeout(READ_TIMEOUT)
            .options(&format!(
                "-c statement_timeout={} -c default_transaction_read_only=on",
                READ_TIMEOUT.as_millis()
            ));
        let reader = PostgresReader {
            inner: Arc::new(Pool {
                config,
                tls: url.tls,
                idle: Mutex::new(Vec::new()),
            }),
        };
        let mut client = reader.connect()?;
        let found: i32 = client
            .query_opt(
                "SELECT coalesce(max(version), 0) FROM fencegate_schema
                 WHERE to_regclass('fencegate_schema') IS NOT NULL",
                &[],
            )
            .map_err(|_| ReadError::PostgresSchema {
                found: 0,
                known: CURRENT_VERSION,
            })?
            .map_or(0, |row| row.get(0));
        if found != CURRENT_VERSION {
            return Err(ReadError::PostgresSchema {
                found,
                known: CURRENT_VERSION,
            });
        }
        reader.give_back(client);
        Ok(reader)
    }

    pub fn prune_plan(&self, retention: Retention) -> Result<PrunePlan, ReadError> {
        let keep = i64::try_from(retention.max_rows).unwrap_or(i64::MAX);
        let mut client = self.connect()?;
        let mut cutoffs = Vec::new();
        for reason in Reason::ALL {
            let cutoff = client
                .query_opt(
                    "SELECT id FROM rejections WHERE reason = $1 ORDER BY id DESC LIMIT 1 OFFSET $2",
                    &[&reason.as_str(), &keep],
                )
                .map_err(query_error)?;
            cutoffs.extend(cutoff.map(|row| (reason, row.get::<_, i64>(0))));
        }
        self.give_back(client);
        Ok(PrunePlan {
            max_age: retention.max_age,
            cutoffs,
        })
    }

    pub fn resources(&self, query: &ResourceQuery) -> Result<Page<ResourceRow>, ReadError> {
        let mut filter = Filter::default();
        if let Some(exact) = &query.exact {
            filter.push("resource = $", Box::new(exact.clone()));
        }
        if let Some(prefix) = &query.prefix {
            filter.push("starts_with(resource, $)", Box::new(prefix.clone()));
        }
        if let Some(after) = &query.after {
            filter.push("resource > $", Box::new(after.clone()));
        }
        let (clause, limit) = filter.finish(query.limit);
        let sql = format!(
            "SELECT resource, highest, updated_at FROM resources {clause} ORDER BY resource LIMIT {limit}"
        );
        let rows = self.query(&sql, &filter, resource_row)?;
        Ok(into_page(rows, query.limit, |row| row.resource.clone()))
    }

    pub fn rejections(&self, query: &RejectionQuery) -> Result<Page<RejectionRow>, ReadError> {
        let mut filter = Filter::default();
        if let Some(resource) = &query.resource {
            filter.push("resource = $", Box::new(resource.clone()));
        }
        if let Some(reason) = query.reason {
            filter.push("reason = $", Box::new(reason.as_str().to_owned()));
        }
        if let Some(since) = query.since {
            filter.push("at >= $", Box::new(since));
        }
        if let Some(after) = query.after {
            filter.push("id < $", Box::new(after));
        }
        let (clause, limit) = filter.finish(query.limit);
        let sql = format!(
            "SELECT id, at, resource, reason, token, highest, method, path, client, request_id, identity
             FROM rejections {clause} ORDER BY id DESC LIMIT {limit}"
        );
        let rows = self.query(&sql, &filter, rejection_row)?;
        Ok(into_page(rows, query.limit, |row| row.id.to_string()))
    }

    pub fn epochs(&self, query: &EpochQuery) -> Result<Page<EpochRow>, ReadError> {
        let mut filter = Filter::default();
        if let Some(resource) = &query.resource {
            filter.push("resource = $", Box::new(resource.clone()));
        }
        if let Some(after) = query.after {
            filter.push("id < $", Box::new(after));
        }
        let (clause, limit) = filter.finish(query.limit);
        let sql = format!(
            "SELECT id, at, resource, from_token, to_token, via, reason
             FROM epochs {clause} ORDER BY id DESC LIMIT {limit}"
        );
        let rows = self.query(&sql, &filter, epoch_row)?;
        Ok(into_page(rows, query.limit, |row| row.id.to_string()))
    }

    fn query<T>(
        &self,
        sql: &str,
        filter: &Filter,
        read: fn(&Row) -> T,
    ) -> Result<Vec<T>, ReadError> {
        let mut client = self.connect()?;
        let params: Vec<&(dyn ToSql + Sync)> = filter.values.iter().map(|v| &**v).collect();
        let rows = client.query(sql, &params).map_err(query_error)?;
        self.give_back(client);
        Ok(rows.iter().map(read).collect())
    }

    fn connect(&self) -> Result<Client, ReadError> {
        let idle = self
            .inner
            .idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pop();
        match idle.filter(|client| !client.is_closed()) {
            Some(client) => Ok(client),
            None => match &self.inner.tls {
                None => self.inner.config.connect(NoTls),
                Some(tls) => self.inner.config.connect(tls.clone()),
            }
            .map_err(|e| ReadError::Postgres(crate::problem::with_causes(&e))),
        }
    }

    fn give_back(&self, client: Client) {
        let mut idle = self
            .inner
            .idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if idle.len() < MAX_IDLE_CONNECTIONS {
            idle.push(client);
        }
    }
}

fn query_error(error: postgres::Error) -> ReadError {
    ReadError::Postgres(crate::problem::with_causes(&error))
}

/// A WHERE clause under construction: each condition's `$` becomes its parameter's number.
#[derive(Default)]
struct Filter {
    conditions: Vec<String>,
    values: Vec<Box<dyn ToSql + Sync>>,
}

impl Filter {
    fn push(&mut self, condition: &str, value: Box<dyn ToSql + Sync>) {
        self.values.push(value);
        let number = format!("${}", self.values.len());
        self.conditions.push(condition.replace('$', &number));
    }

    /// The WHERE clause, and the LIMIT that fetches one row more than a page (it says whether
    /// there is a next page).
    fn finish(&self, limit: usize) -> (String, i64) {
        let clause = if self.conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", self.conditions.join(" AND "))
        };
        (
            clause,
            i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX),
        )
    }
}

fn token(value: Option<i64>) -> Option<u64> {
    value.map(|value| token_from_sql(value).get())
}

fn resource_row(row: &Row) -> ResourceRow {
    ResourceRow {
        resource: row.get(0),
        highest: token_from_sql(row.get(1)).get(),
        updated_at: timestamp(row.get::<_, SystemTime>(2)),
    }
}

fn rejection_row(row: &Row) -> RejectionRow {
    RejectionRow {
        id: row.get(0),
        at: timestamp(row.get::<_, SystemTime>(1)),
        resource: row.get(2),
        reason: row.get(3),
        token: token(row.get(4)),
        highest: token(row.get(5)),
        method: row.get(6),
        path: row.get(7),
        client: row.get(8),
        request_id: row.get(9),
        identity: row.get(10),
    }
}

fn epoch_row(row: &Row) -> EpochRow {
    EpochRow {
        id: row.get(0),
        at: timestamp(row.get::<_, SystemTime>(1)),
        resource: row.get(2),
        from: token(row.get(3)),
        to: token_from_sql(row.get(4)).get(),
        via: row.get(5),
        reason: row.get(6),
    }
}
