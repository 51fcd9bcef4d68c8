//! The PostgreSQL writer task and its group commit.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};

use super::batch::{Batch, Outcome, resources_of};
use super::{Connection, token_from_sql, token_to_sql};
use crate::cluster::{Ownership, Shard};
use crate::route::ResourceKey;
use crate::store::queue::{Command, MAX_BATCH, QueueCloser, Reply, Write};
use crate::store::{CloseWriter, Durable, PrunePlan, StoreError};
use crate::token::FencingToken;

/// After PostgreSQL failed, calls fail at once for this long before the writer tries again, so
/// that an outage costs each request a 503, not a connect timeout.
const RETRY_AFTER_FAILURE: std::time::Duration = std::time::Duration::from_millis(250);

pub(super) fn spawn(
    connection: Connection,
    ownership: Arc<Ownership>,
    receiver: mpsc::Receiver<Command>,
    commands: mpsc::Sender<Command>,
) -> Box<dyn CloseWriter> {
    let writer = Writer {
        connection,
        ownership,
        session: None,
        down_until: None,
        seq: 0,
    };
    tokio::spawn(writer.run(receiver));
    Box::new(QueueCloser::new(commands))
}

struct Writer {
    connection: Connection,
    ownership: Arc<Ownership>,
    session: Option<Session>,
    /// Set after a failure: until then every call fails without trying.
    down_until: Option<Instant>,
    /// The number of the last write applied (see [`Durable`]).
    seq: u64,
}

/// A connection and the writer's statements, prepared on it once: a statement sent as text is
/// parsed again on every call, which costs a round trip of its own.
struct Session {
    client: Client,
    statements: Statements,
}

struct Statements {
    load_highest: Statement,
    lease_check: Statement,
    lock_highest: Statement,
    upsert_highest: Statement,
    insert_epochs: Statement,
    insert_rejections: Statement,
}

/// The lease condition: the rows stay locked (`FOR SHARE`) until the commit, so no takeover can
/// commit between this check and the batch's writes.
const LEASE_CHECK: &str = "SELECT l.shard FROM leases l
     JOIN unnest($2::int[], $3::bigint[]) AS held(shard, epoch)
       ON l.shard = held.shard AND l.epoch = held.epoch
     WHERE l.owner = $1
     FOR SHARE OF l";

/// Negative control (`no-lease-condition`): every shard counts as held.
const NO_LEASE_CHECK: &str =
    "SELECT shard FROM unnest($2::int[], $3::bigint[]) AS held(shard, epoch) WHERE $1 <> ''";

impl Statements {
    async fn prepare(client: &Client) -> Result<Self, tokio_postgres::Error> {
        let unconditional = cfg!(feature = "negative-controls")
            && crate::cluster::ownership::negative_control("no-lease-condition");
        let lease_check = if unconditional {
            NO_LEASE_CHECK
        } else {
            LEASE_CHECK
        };
        let (load_highest, lease_check, lock_highest, upsert_highest, insert_epochs, insert_rejections) = tokio::try_join!(
            client.prepare("SELECT resource, highest FROM resources WHERE resource = ANY($1)"),
            client.prepare(lease_check),
            // Sorted, so that two replicas' batches lock shared rows in one order.
            client.prepare(
                "SELECT resource, highest FROM resources WHERE resource = ANY($1) ORDER BY resource FOR UPDATE"
            ),
            client.prepare(
                "INSERT INTO resources (resource, highest, updated_at)
                 SELECT name, highest, $3 FROM unnest($1::text[], $2::bigint[]) AS t(name, highest)
                 ON CONFLICT (resource) DO UPDATE SET highest = excluded.highest, updated_at = excluded.updated_at"
            ),
            client.prepare(
                "INSERT INTO epochs (at, resource, from_token, to_token, via, reason, replica)
                 SELECT $6, * , $7 FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::text[])"
            ),
            client.prepare(
                "INSERT INTO rejections (at, resource, reason, token, highest, method, path, client, request_id, identity, replica)
                 SELECT *, $11 FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::bigint[],
                                          $5::bigint[], $6::text[], $7::text[], $8::text[], $9::text[],
                                          $10::text[])"
            ),
        )?;
        Ok(Self {
            load_highest,
            lease_check,
            lock_highest,
            upsert_highest,
            insert_epochs,
            insert_rejections,
        })
    }
}

/// The writes of one batch whose shards this replica holds, and the lease epochs they were
/// granted under.
struct Held {
    writes: Vec<Write>,
    epochs: BTreeMap<Shard, i64>,
}

impl Writer {
    async fn run(mut self, mut receiver: mpsc::Receiver<Command>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while let Some(first) = receiver.recv().await {
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match receiver.try_recv() {
                    Ok(command) => batch.push(command),
                    Err(_) => break,
                }
            }
            if let Some(done) = self.execute(&mut batch).await {
                receiver.close();
                while let Ok(command) = receiver.try_recv() {
                    command.fail(StoreError::Closed);
                }
                let _ = done.send(());
                return;
            }
        }
    }

    /// Answers loads and commits the writes (together: two pipelined round trips), then runs the
    /// prunes and pings. Returns the close request, if the batch held one.
    async fn execute(&mut self, batch: &mut Vec<Command>) -> Option<oneshot::Sender<()>> {
        let mut close = None;
        let mut loads = Vec::new();
        let mut writes = Vec::new();
        let mut prunes = Vec::new();
        let mut pings = Vec::new();
        for command in batch.drain(..) {
            match command {
                Command::Load { resource, reply } => loads.push((resource, reply)),
                Command::Write(write) => writes.push(write),
                Command::Prune { plan, batch, reply } => prunes.push((plan, batch, reply)),
                Command::Ping { reply } => pings.push(reply),
                Command::Close { done, .. } => close = Some(done),
            }
        }
        let session = match self.connected().await {
            Ok(session) => session,
            Err(error) => {
                loads
                    .into_iter()
                    .for_each(|(_, r)| drop(r.send(Err(error.clone()))));
                writes.into_iter().for_each(|w| w.fail(error.clone()));
                prunes
                    .into_iter()
                    .for_each(|(_, _, r)| drop(r.send(Err(error.clone()))));
                pings
                    .into_iter()
                    .for_each(|r| drop(r.send(Err(error.clone()))));
                return close;
            }
        };
        if !loads.is_empty() || !writes.is_empty() {
            let held = self.held(writes);
            self.load_and_commit(&session, loads, held).await;
        }
        let timeout = self.connection.timeout;
        let client = &session.client;
        for (plan, batch, reply) in prunes {
            let pruned = within(timeout, prune(client, &plan, batch)).await;
            if let Err(error) = &pruned {
                self.failed(error);
            }
            drop(reply.send(pruned));
        }
        if !pings.is_empty() {
            let alive = within(timeout, async {
                client.simple_query("").await.map_err(StoreError::from)?;
                Ok(())
            })
            .await;
            if let Err(error) = &alive {
                self.failed(error);
            }
            pings.into_iter().for_each(|r| drop(r.send(alive.clone())));
        }
        if self.down_until.is_none() {
            self.session = Some(session);
        }
        close
    }

    /// The open session (taken: [`Writer::execute`] gives it back unless it failed), or a new
    /// one; fails at once while the last failure is recent.
    async fn connected(&mut self) -> Result<Session, StoreError> {
        if let Some(session) = self.session.take().filter(|s| !s.client.is_closed()) {
            return Ok(session);
        }
        if self.down_until.is_some_and(|until| Instant::now() < until) {
            return Err(StoreError::Unavailable {
                cause: "the last attempt failed moments ago".into(),
            });
        }
        let timeout = self.connection.timeout;
        let opened = within(timeout, async {
            let client = self.connection.connect().await?;
            let statements = Statements::prepare(&client).await?;
            Ok(Session { client, statements })
        })
        .await;
        match opened {
            Ok(session) => {
                if self.down_until.take().is_some() {
                    tracing::info!("PostgreSQL is reachable again");
                }
                Ok(session)
            }
            Err(error) => {
                self.failed(&error);
                Err(error)
            }
        }
    }

    /// Marks the connection as not to be reused after a failure that may have left it unusable.
    fn failed(&mut self, error: &StoreError) {
        if matches!(error, StoreError::NotOwner { .. }) {
            return;
        }
        if self.down_until.is_none() {
            tracing::error!(error = %error, "PostgreSQL failed: fenced writes are refused (503) until it answers again");
        }
        self.down_until = Some(Instant::now() + RETRY_AFTER_FAILURE);
    }

    /// The writes whose every shard this replica holds a term of, with those terms' epochs; the
    /// others fail here with `NotOwner`.
    fn held(&self, writes: Vec<Write>) -> Held {
        let map = self.ownership.map();
        let mut held = Held {
            writes: Vec::with_capacity(writes.len()),
            epochs: BTreeMap::new(),
        };
        for write in writes {
            let shards: Option<Vec<(Shard, i64)>> = resources_of(&write)
                .into_iter()
                .map(|resource| {
                    let shard = map.shard_of(resource.as_str());
                    self.ownership
                        .epoch_for_write(shard)
                        .map(|epoch| (shard, epoch))
                })
                .collect();
            match shards {
                Some(shards) => {
                    held.epochs.extend(shards);
                    held.writes.push(write);
                }
                None => {
                    let error = not_owner(&self.ownership, resources_of(&write));
                    write.fail(error);
                }
            }
        }
        held
    }

    /// Answers `loads` and commits `held` in one transaction that re-checks each lease. Every
    /// writer is answered only after the commit: a success means "durable".
    async fn load_and_commit(
        &mut self,
        session: &Session,
        loads: Vec<(ResourceKey, Reply<Durable>)>,
        held: Held,
    ) {
        let timeout = self.connection.timeout;
        let replica = self.ownership.replica().to_owned();
        let map = self.ownership.map();
        // Loads read what was committed before this batch's transaction, which the server runs
        // after them: they are answered with the number of the last write before the batch.
        let seq_before = self.seq;
        let names: Vec<&str> = loads.iter().map(|(r, _)| r.as_str()).collect();
        let first = within(timeout, first_round_trip(session, &names, &replica, &held)).await;
        let (highest, locked) = match first {
            Ok(answers) => answers,
            Err(error) => {
                self.failed(&error);
                loads
                    .into_iter()
                    .for_each(|(_, r)| drop(r.send(Err(error.clone()))));
                held.writes.into_iter().for_each(|w| w.fail(error.clone()));
                return;
            }
        };
        for (resource, reply) in loads {
            let highest = highest.get(resource.as_str()).copied();
            drop(reply.send(Ok(Durable {
                highest,
                seq: seq_before,
            })));
        }
        let Some((still_held, loaded)) = locked else {
            return;
        };
        let batch = self.apply(held.writes, &still_held, loaded, map);
        // Past the timeout the commit is given up, and the connection with it (PostgreSQL rolls
        // back what it has not committed): those callers hear that the writer could not answer,
        // never a success.
        let committed = within(timeout, second_round_trip(session, &batch, &replica)).await;
        match committed {
            Ok(()) => batch.outcomes.into_iter().for_each(Outcome::succeed),
            Err(error) => {
                tracing::error!(error = %error, batch = batch.outcomes.len(), "PostgreSQL commit failed");
                self.failed(&error);
                batch
                    .outcomes
                    .into_iter()
                    .for_each(|o| o.fail(error.clone()));
            }
        }
    }

    /// Works the batch out in memory from the locked rows: writes on shards whose lease was lost
    /// meanwhile fail with `NotOwner`, the rest are numbered in commit order and applied.
    fn apply(
        &mut self,
        writes: Vec<Write>,
        still_held: &BTreeSet<Shard>,
        loaded: HashMap<ResourceKey, Option<FencingToken>>,
        map: crate::cluster::ShardMap,
    ) -> Batch {
        let mut batch = Batch::new(loaded);
        for write in writes {
            let lost = resources_of(&write)
                .iter()
                .map(|r| map.shard_of(r.as_str()))
                .find(|shard| !still_held.contains(shard));
            match lost {
                Some(shard) => write.fail(StoreError::NotOwner { shard }),
                None => {
                    self.seq += 1;
                    batch.apply(write, self.seq);
                }
            }
        }
        batch
    }
}

/// The shards still held, and every written resource's highest token, locked.
type Locked = (BTreeSet<Shard>, HashMap<ResourceKey, Option<FencingToken>>);

/// One round trip: the loads' read, then (if there are writes) BEGIN, the lease condition and the
/// written resources' rows locked `FOR UPDATE`. The requests are sent together and PostgreSQL runs
/// them in the order they were first polled (`biased`).
async fn first_round_trip(
    session: &Session,
    names: &[&str],
    replica: &str,
    held: &Held,
) -> Result<(HashMap<String, FencingToken>, Option<Locked>), StoreError> {
    let load = async {
        if names.is_empty() {
            return Ok(HashMap::new());
        }
        load_highest(session, names).await
    };
    let lock = async {
        if held.writes.is_empty() {
            return Ok(None);
        }
        open_transaction(session, replica, held).await.map(Some)
    };
    let (loaded, locked) = tokio::join!(biased; load, lock);
    Ok((loaded?, locked?))
}

async fn load_highest(
    session: &Session,
    names: &[&str],
) -> Result<HashMap<String, FencingToken>, StoreError> {
    let rows = session
        .client
        .query(&session.statements.load_highest, &[&names])
        .await?;
    Ok(rows
        .iter()
        .map(|row| (row.get::<_, String>(0), token_from_sql(row.get(1))))
        .collect())
}

async fn open_transaction(
    session: &Session,
    replica: &str,
    held: &Held,
) -> Result<Locked, StoreError> {
    let (client, statements) = (&session.client, &session.statements);
    let shards: Vec<i32> = held.epochs.keys().map(|s| *s as i32).collect();
    let epochs: Vec<i64> = held.epochs.values().copied().collect();
    let mut names: Vec<&str> = held
        .writes
        .iter()
        .flat_map(resources_of)
        .map(ResourceKey::as_str)
        .collect();
    names.sort_unstable();
    names.dedup();
    let lease_params: [&(dyn ToSql + Sync); 3] = [&replica, &shards, &epochs];
    let lock_params: [&(dyn ToSql + Sync); 1] = [&names];
    let (_, lease_rows, highest_rows) = tokio::try_join!(
        biased;
        client.batch_execute("BEGIN"),
        client.query(&statements.lease_check, &lease_params),
        client.query(&statements.lock_highest, &lock_params),
    )?;
    let still_held = lease_rows
        .iter()
        .map(|row| row.get::<_, i32>(0) as Shard)
        .collect();
    let mut highest: HashMap<ResourceKey, Option<FencingToken>> = names
        .iter()
        .map(|name| (ResourceKey::new(*name), None))
        .collect();
    for row in highest_rows {
        let name: &str = row.get(0);
        highest.insert(ResourceKey::new(name), Some(token_from_sql(row.get(1))));
    }
    Ok((still_held, highest))
}

/// One round trip: the batch's rows as three set-based statements (an empty one writes nothing),
/// then COMMIT. Any error fails the whole batch: after one, PostgreSQL refuses the rest of the
/// transaction and turns COMMIT into a rollback.
async fn second_round_trip(
    session: &Session,
    batch: &Batch,
    replica: &str,
) -> Result<(), StoreError> {
    let (client, statements) = (&session.client, &session.statements);
    let now = SystemTime::now();
    let (names, tokens): (Vec<&str>, Vec<i64>) = batch
        .changed()
        .map(|(resource, highest)| (resource.as_str(), token_to_sql(highest)))
        .unzip();
    let e = &batch.epochs;
    let e_resources: Vec<&str> = e.iter().map(|e| e.resource.as_str()).collect();
    let e_from: Vec<Option<i64>> = e.iter().map(|e| e.from.map(token_to_sql)).collect();
    let e_to: Vec<i64> = e.iter().map(|e| token_to_sql(e.to)).collect();
    let e_via: Vec<&str> = e.iter().map(|e| e.via.as_str()).collect();
    let e_reasons: Vec<Option<&str>> = e.iter().map(|e| e.reason.as_deref()).collect();
    let r = &batch.rejections;
    let r_at: Vec<SystemTime> = r.iter().map(|r| r.at).collect();
    let r_resources: Vec<&str> = r.iter().map(|r| r.resource.as_str()).collect();
    let r_reasons: Vec<&str> = r.iter().map(|r| r.reason.as_str()).collect();
    let r_tokens: Vec<Option<i64>> = r.iter().map(|r| r.token.map(token_to_sql)).collect();
    let r_highest: Vec<Option<i64>> = r.iter().map(|r| r.highest.map(token_to_sql)).collect();
    let r_methods: Vec<&str> = r.iter().map(|r| r.method.as_str()).collect();
    let r_paths: Vec<&str> = r.iter().map(|r| r.path.as_str()).collect();
    let r_clients: Vec<&str> = r.iter().map(|r| r.client.as_str()).collect();
    let r_ids: Vec<Option<&str>> = r.iter().map(|r| r.request_id.as_deref()).collect();
    let r_identities: Vec<Option<&str>> = r.iter().map(|r| r.identity.as_deref()).collect();
    let highest_params: [&(dyn ToSql + Sync); 3] = [&names, &tokens, &now];
    let epoch_params: [&(dyn ToSql + Sync); 7] = [
        &e_resources,
        &e_from,
        &e_to,
        &e_via,
        &e_reasons,
        &now,
        &replica,
    ];
    let rejection_params: [&(dyn ToSql + Sync); 11] = [
        &r_at,
        &r_resources,
        &r_reasons,
        &r_tokens,
        &r_highest,
        &r_methods,
        &r_paths,
        &r_clients,
        &r_ids,
        &r_identities,
        &replica,
    ];
    tokio::try_join!(
        biased;
        client.execute(&statements.upsert_highest, &highest_params),
        client.execute(&statements.insert_epochs, &epoch_params),
        client.execute(&statements.insert_rejections, &rejection_params),
        // PostgreSQL answers COMMIT in a failed transaction with a rollback and no error, but
        // only after one of the statements above has failed, and try_join reports that one.
        client.batch_execute("COMMIT"),
    )?;
    Ok(())
}

/// Deletes up to `batch` audit rows that `plan` no longer keeps: per reason, rows up to its
/// cut-off; then rows older than `max_age`. Audit rows of every replica are pruned by whichever
/// replica runs this; each delete is its own short statement.
async fn prune(client: &Client, plan: &PrunePlan, batch: usize) -> Result<usize, StoreError> {
    let mut deleted = 0_usize;
    for (reason, last_dropped) in &plan.cutoffs {
        let left = i64::try_from(batch - deleted).unwrap_or(i64::MAX);
        if left == 0 {
            break;
        }
        let n = client
            .execute(
                "DELETE FROM rejections WHERE id IN
                 (SELECT id FROM rejections WHERE reason = $1 AND id <= $2 ORDER BY id LIMIT $3)",
                &[&reason.as_str(), last_dropped, &left],
            )
            .await?;
        deleted += usize::try_from(n).unwrap_or(usize::MAX);
    }
    if deleted < batch {
        let oldest_kept = SystemTime::now()
            .checked_sub(plan.max_age)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let left = i64::try_from(batch - deleted).unwrap_or(i64::MAX);
        let n = client
            .execute(
                "DELETE FROM rejections WHERE id IN
                 (SELECT id FROM rejections WHERE at < $1 ORDER BY at LIMIT $2)",
                &[&oldest_kept, &left],
            )
            .await?;
        deleted += usize::try_from(n).unwrap_or(usize::MAX);
    }
    Ok(deleted)
}

/// The first resource's shard that this replica does not hold, as the error for its write.
fn not_owner(ownership: &Ownership, resources: Vec<&ResourceKey>) -> StoreError {
    let map = ownership.map();
    let shard = resources
        .into_iter()
        .map(|r| map.shard_of(r.as_str()))
        .find(|shard| ownership.epoch_for_write(*shard).is_none())
        .unwrap_or_default();
    StoreError::NotOwner { shard }
}

/// Runs `work` for at most `timeout`; past it, PostgreSQL counts as unreachable.
async fn within<T, E>(
    timeout: std::time::Duration,
    work: impl Future<Output = Result<T, E>>,
) -> Result<T, E>
where
    E: From<StoreError>,
{
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(E::from(StoreError::Unavailable {
            cause: format!("no answer within {timeout:?}"),
        })),
    }
}
