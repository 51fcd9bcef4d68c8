//! The writer thread and its group commit.

use std::time::SystemTime;

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use tokio::sync::{mpsc, oneshot};

use super::{LockFile, token_from_sql, token_to_sql};
use crate::audit::Rejection;
use crate::route::ResourceKey;
use crate::store::queue::{Command, MAX_BATCH, QueueCloser, Reply, Write};
use crate::store::reader::timestamp;
use crate::store::{
    Advance, AllAdvanced, Durable, LastStop, PrunePlan, Reset, StoreError, Via, WriterGuard,
};
use crate::token::FencingToken;

pub(super) fn spawn(
    conn: Connection,
    lock: LockFile,
    last_stop: LastStop,
    receiver: mpsc::Receiver<Command>,
    commands: mpsc::Sender<Command>,
) -> Result<WriterGuard, StoreError> {
    std::thread::Builder::new()
        .name("fencegate-store".into())
        .spawn(move || run(conn, lock, receiver))
        .map_err(|e| StoreError::Spawn(std::sync::Arc::new(e)))?;
    Ok(WriterGuard::new(
        last_stop,
        Box::new(QueueCloser::new(commands)),
    ))
}

/// The writer's connection and the number of the last write it applied (see [`Durable`]).
struct Writer {
    conn: Connection,
    seq: u64,
}

/// Runs the writer until it is closed; `lock` is the single-server lock, held until then.
fn run(conn: Connection, lock: LockFile, mut receiver: mpsc::Receiver<Command>) {
    let mut writer = Writer { conn, seq: 0 };
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = receiver.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(command) => batch.push(command),
                Err(_) => break,
            }
        }
        if let Some((done, this_stop)) = writer.execute(&mut batch) {
            // Commands still queued are dropped with their reply channels: their callers get
            // `StoreError::Closed`, never a false success.
            receiver.close();
            drop(receiver);
            match writer.conn.close() {
                Ok(()) if this_stop == LastStop::Clean => lock.mark_clean_stop(),
                Ok(()) => {}
                Err((_, e)) => tracing::error!(error = %e, "closing the database failed"),
            }
            // Released before saying so, so that whoever waited can open the database at once.
            drop(lock);
            let _ = done.send(());
            return;
        }
    }
}

impl Writer {
    /// Answers reads at once, commits all writes of the batch in one transaction, then runs any
    /// prune in a transaction of its own (a failed prune must not fail the batch's writes).
    /// Returns the close request, if the batch held one.
    fn execute(&mut self, batch: &mut Vec<Command>) -> Option<(oneshot::Sender<()>, LastStop)> {
        let mut close = None;
        let mut writes = Vec::new();
        let mut prunes = Vec::new();
        for command in batch.drain(..) {
            match command {
                Command::Load { resource, reply } => {
                    let loaded = load_highest(&self.conn, &resource).map(|highest| Durable {
                        highest,
                        seq: self.seq,
                    });
                    let _ = reply.send(loaded.map_err(StoreError::from));
                }
                Command::Ping { reply } => {
                    let _ = reply.send(Ok(()));
                }
                Command::Close { done, this_stop } => close = Some((done, this_stop)),
                Command::Write(write) => writes.push(write),
                Command::Prune { plan, batch, reply } => prunes.push((plan, batch, reply)),
            }
        }
        if !writes.is_empty() {
            self.commit(writes);
        }
        for (plan, batch, reply) in prunes {
            let pruned = prune(&mut self.conn, &plan, batch).map_err(StoreError::from);
            let _ = reply.send(pruned);
        }
        close
    }

    /// Every caller is answered only after the commit has returned: a success means "on disk".
    /// If any statement or the commit fails, the whole batch rolls back and every caller gets the
    /// error.
    fn commit(&mut self, writes: Vec<Write>) {
        let now = timestamp(SystemTime::now());
        let count = writes.len();
        let mut applied = Vec::with_capacity(count);
        let mut failed = None;
        let mut pending = writes.into_iter();
        let seq = &mut self.seq;
        let result = (|| {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            for write in pending.by_ref() {
                *seq += 1;
                match apply(&tx, write, &now, *seq) {
                    Ok(done) => applied.push(done),
                    Err((e, write)) => {
                        failed = Some(write);
                        return Err(e);
                    }
                }
            }
            tx.commit()
        })();
        match result {
            Ok(()) => applied.into_iter().for_each(Applied::succeed),
            Err(e) => {
                tracing::error!(error = %e, batch = count, "database commit failed");
                let error = StoreError::from(e);
                applied.into_iter().for_each(|a| a.fail(error.clone()));
                failed
                    .into_iter()
                    .chain(pending)
                    .for_each(|w| w.fail(error.clone()));
            }
        }
    }
}

fn load_highest(
    conn: &Connection,
    resource: &ResourceKey,
) -> rusqlite::Result<Option<FencingToken>> {
    conn.prepare_cached("SELECT highest FROM resources WHERE resource = ?1")?
        .query_row([resource.as_str()], |row| row.get(0))
        .optional()
        .map(|highest| highest.map(token_from_sql))
}

/// A write that is in the open transaction, waiting for the commit to be answered.
enum Applied {
    Advance(Reply<Advance>, Advance),
    AdvanceAll(Reply<AllAdvanced>, AllAdvanced),
    Reset(Reply<Reset>, Reset),
    Recorded(Reply<()>),
}

impl Applied {
    fn succeed(self) {
        // A caller that has gone away no longer needs its answer; the write stands regardless.
        match self {
            Applied::Advance(reply, advance) => drop(reply.send(Ok(advance))),
            Applied::AdvanceAll(reply, advanced) => drop(reply.send(Ok(advanced))),
            Applied::Reset(reply, reset) => drop(reply.send(Ok(reset))),
            Applied::Recorded(reply) => drop(reply.send(Ok(()))),
        }
    }

    fn fail(self, error: StoreError) {
        match self {
            Applied::Advance(reply, _) => drop(reply.send(Err(error))),
            Applied::AdvanceAll(reply, _) => drop(reply.send(Err(error))),
            Applied::Reset(reply, _) => drop(reply.send(Err(error))),
            Applied::Recorded(reply) => drop(reply.send(Err(error))),
        }
    }
}

/// Runs one write inside the transaction. A failed write is handed back, so that its caller too
/// hears the database's error.
fn apply(
    tx: &Transaction<'_>,
    write: Write,
    now: &str,
    seq: u64,
) -> Result<Applied, (rusqlite::Error, Write)> {
    match write {
        Write::Advance {
            resource,
            token,
            via,
            reply,
        } => match advance(tx, &resource, token, via, now, seq) {
            Ok(outcome) => Ok(Applied::Advance(reply, outcome)),
            Err(e) => Err((
                e,
                Write::Advance {
                    resource,
                    token,
                    via,
                    reply,
                },
            )),
        },
        Write::Reset {
            resource,
            token,
            reason,
            reply,
        } => match reset(tx, &resource, token, &reason, now, seq) {
            Ok(outcome) => Ok(Applied::Reset(reply, outcome)),
            Err(e) => Err((
                e,
                Write::Reset {
                    resource,
                    token,
                    reason,
                    reply,
                },
            )),
        },
        Write::AdvanceAll {
            resources,
            token,
            via,
            reply,
        } => match advance_all(tx, &resources, token, via, now, seq) {
            Ok(outcome) => Ok(Applied::AdvanceAll(reply, outcome)),
            Err(e) => Err((
                e,
                Write::AdvanceAll {
                    resources,
                    token,
                    via,
                    reply,
                },
            )),
        },
        Write::Reject { rejection, reply } => match insert_rejection(tx, &rejection) {
            Ok(()) => Ok(Applied::Recorded(reply)),
            Err(e) => Err((e, Write::Reject { rejection, reply })),
        },
    }
}

fn advance(
    tx: &Transaction<'_>,
    resource: &ResourceKey,
    token: FencingToken,
    via: Via,
    now: &str,
    seq: u64,
) -> rusqlite::Result<Advance> {
    let previous = load_highest(tx, resource)?;
    if let Some(highest) = previous.filter(|highest| *highest >= token) {
        return Ok(Advance::AlreadyAt { highest, seq });
    }
    set_highest(tx, resource, previous, token, via, None, now)?;
    Ok(Advance::Raised {
        from: previous,
        seq,
    })
}

/// Raises every resource below `token` to it, all or nothing: if any resource is already above
/// `token`, nothing is written and the first such resource is named.
fn advance_all(
    tx: &Transaction<'_>,
    resources: &[ResourceKey],
    token: FencingToken,
    via: Via,
    now: &str,
    seq: u64,
) -> rusqlite::Result<AllAdvanced> {
    let previous = resources
        .iter()
        .map(|resource| load_highest(tx, resource))
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let refused_by = previous
        .iter()
        .position(|highest| highest.is_some_and(|highest| highest > token));
    if refused_by.is_none() {
        for (resource, from) in resources.iter().zip(&previous) {
            if from.is_none_or(|from| from < token) {
                set_highest(tx, resource, *from, token, via, None, now)?;
            }
        }
    }
    Ok(AllAdvanced {
        previous,
        refused_by,
        token,
        seq,
    })
}

fn reset(
    tx: &Transaction<'_>,
    resource: &ResourceKey,
    token: FencingToken,
    reason: &str,
    now: &str,
    seq: u64,
) -> rusqlite::Result<Reset> {
    let previous = load_highest(tx, resource)?;
    set_highest(tx, resource, previous, token, Via::Reset, Some(reason), now)?;
    Ok(Reset {
        from: previous,
        durable: Durable {
            highest: Some(token),
            seq,
        },
    })
}

/// Writes the new highest token and its epoch history row.
fn set_highest(
    tx: &Transaction<'_>,
    resource: &ResourceKey,
    previous: Option<FencingToken>,
    token: FencingToken,
    via: Via,
    reason: Option<&str>,
    now: &str,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO resources (resource, highest, updated_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (resource) DO UPDATE SET highest = excluded.highest, updated_at = excluded.updated_at",
    )?
    .execute(params![resource.as_str(), token_to_sql(token), now])?;
    tx.prepare_cached(
        "INSERT INTO epochs (at, resource, from_token, to_token, via, reason)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        now,
        resource.as_str(),
        previous.map(token_to_sql),
        token_to_sql(token),
        via.as_str(),
        reason,
    ])?;
    Ok(())
}

/// Deletes up to `batch` rows past each reason's row limit (the cut-offs that
/// [`super::Reader::retention_cutoffs`] found), then, if the batch is not full, rows past the age
/// limit. Every delete walks an index, so a prune costs the same on a ten-million-row log as on a
/// small one.
fn prune(conn: &mut Connection, plan: &PrunePlan, batch: usize) -> rusqlite::Result<usize> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut deleted = 0;
    for (reason, last_dropped) in &plan.cutoffs {
        let left = i64::try_from(batch - deleted).unwrap_or(i64::MAX);
        if left == 0 {
            break;
        }
        deleted += tx
            .prepare_cached(
                "DELETE FROM rejections WHERE id IN
                 (SELECT id FROM rejections WHERE reason = ?1 AND id <= ?2 ORDER BY id LIMIT ?3)",
            )?
            .execute(params![reason.as_str(), last_dropped, left])?;
    }
    if deleted < batch {
        let oldest_kept = SystemTime::now()
            .checked_sub(plan.max_age)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let left = i64::try_from(batch - deleted).unwrap_or(i64::MAX);
        deleted += tx
            .prepare_cached(
                "DELETE FROM rejections WHERE id IN
                 (SELECT id FROM rejections WHERE at < ?1 ORDER BY at LIMIT ?2)",
            )?
            .execute(params![timestamp(oldest_kept), left])?;
    }
    tx.commit()?;
    Ok(deleted)
}

fn insert_rejection(tx: &Transaction<'_>, r: &Rejection) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO rejections (at, resource, reason, token, highest, method, path, client, request_id, identity)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?
    .execute(params![
        timestamp(r.at),
        r.resource.as_str(),
        r.reason.as_str(),
        r.token.map(token_to_sql),
        r.highest.map(token_to_sql),
        r.method,
        r.path,
        r.client,
        r.request_id,
        r.identity,
    ])?;
    Ok(())
}
