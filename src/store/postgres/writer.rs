//! The PostgreSQL writer task and its group commit.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_postgres::Client;

use super::batch::{Batch, Outcome, resources_of};
use super::{Connection, token_from_sql, token_to_sql};
use crate::cluster::{Ownership, Shard};
use crate::route::ResourceKey;
use crate::store::queue::{Command, MAX_BATCH, QueueCloser, Write};
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
        client: None,
        down_until: None,
        seq: 0,
    };
    tokio::spawn(writer.run(receiver));
    Box::new(QueueCloser::new(commands))
}

struct Writer {
    connection: Connection,
    ownership: Arc<Ownership>,
    client: Option<Client>,
    /// Set after a failure: until then every call fails without trying.
    down_until: Option<Instant>,
    /// The number of the last write applied (see [`Durable`]).
    seq: u64,
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

    /// Answers loads and pings, commits the writes in one transaction, then runs the prunes.
    /// Returns the close request, if the batch held one.
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
        let mut client = match self.connected().await {
            Ok(client) => client,
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
        let timeout = self.connection.timeout;
        if !loads.is_empty() {
            let names: Vec<&str> = loads.iter().map(|(r, _)| r.as_str()).collect();
            let loaded = within(timeout, load_highest(&client, &names)).await;
            let seq = self.seq;
            match loaded {
                Ok(highest) => loads.into_iter().for_each(|(resource, reply)| {
                    let highest = highest.get(resource.as_str()).copied();
                    drop(reply.send(Ok(Durable { highest, seq })));
                }),
                Err(error) => {
                    self.failed(&error);
                    loads
                        .into_iter()
                        .for_each(|(_, r)| drop(r.send(Err(error.clone()))));
                }
            }
        }
        if !writes.is_empty() {
            self.commit(&mut client, writes).await;
        }
        for (plan, batch, reply) in prunes {
            let pruned = within(timeout, prune(&client, &plan, batch)).await;
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
            self.client = Some(client);
        }
        close
    }

    /// The open connection (taken: [`Writer::execute`] gives it back unless it failed), or a new
    /// one; fails at once while the last failure is recent.
    async fn connected(&mut self) -> Result<Client, StoreError> {
        if let Some(client) = self.client.take().filter(|client| !client.is_closed()) {
            return Ok(client);
        }
        if self.down_until.is_some_and(|until| Instant::now() < until) {
            return Err(StoreError::Unavailable {
                cause: "the last attempt failed moments ago".into(),
            });
        }
        match self.connection.connect().await {
            Ok(client) => {
                if self.down_until.take().is_some() {
                    tracing::info!("PostgreSQL is reachable again");
                }
                Ok(client)
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

    /// Commits every write whose shards this replica holds, in one transaction that re-checks
    /// each lease. Every caller is answered only after the commit: a success means "durable".
    async fn commit(&mut self, client: &mut Client, writes: Vec<Write>) {
        let map = self.ownership.map();
        let mut epochs: BTreeMap<Shard, i64> = BTreeMap::new();
        let mut held = Vec::with_capacity(writes.len());
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
                    epochs.extend(shards);
                    held.push(write);
                }
                None => {
                    let error = not_owner(&self.ownership, resources_of(&write));
                    write.fail(error);
                }
            }
        }
        if held.is_empty() {
            return;
        }
        let timeout = self.connection.timeout;
        let replica = self.ownership.replica().to_owned();
        let work = transaction(client, &replica, &epochs, held, &mut self.seq, map);
        // Past the timeout the transaction is dropped, and with it the replies it held: those
        // callers hear that the writer could not answer, never a success.
        let committed = tokio::time::timeout(timeout, work)
            .await
            .unwrap_or_else(|_| {
                let error = StoreError::Unavailable {
                    cause: format!("no answer within {timeout:?}"),
                };
                Err((error, Vec::new(), Vec::new()))
            });
        match committed {
            Ok(batch) => batch.outcomes.into_iter().for_each(Outcome::succeed),
            Err((error, outcomes, refused)) => {
                self.failed(&error);
                outcomes.into_iter().for_each(|o| o.fail(error.clone()));
                refused.into_iter().for_each(|w| w.fail(error.clone()));
            }
        }
    }
}

/// What a failed transaction owes its callers: the error, the writes it had applied, and those
/// it had not reached.
type Failed = (StoreError, Vec<Outcome>, Vec<Write>);

async fn transaction(
    client: &mut Client,
    replica: &str,
    epochs: &BTreeMap<Shard, i64>,
    writes: Vec<Write>,
    seq: &mut u64,
    map: crate::cluster::ShardMap,
) -> Result<Batch, Failed> {
    let tx = match client.transaction().await {
        Ok(tx) => tx,
        Err(e) => return Err((e.into(), Vec::new(), writes)),
    };
    // The lease condition: the rows stay locked (FOR SHARE) until the commit, so no takeover can
    // commit between this check and our writes.
    let shards: Vec<i32> = epochs.keys().map(|s| *s as i32).collect();
    let epoch_values: Vec<i64> = epochs.values().copied().collect();
    let unconditional = cfg!(feature = "negative-controls")
        && crate::cluster::ownership::negative_control("no-lease-condition");
    let lease_check = if unconditional {
        // Negative control: every shard counts as held.
        "SELECT shard FROM unnest($2::int[], $3::bigint[]) AS held(shard, epoch) WHERE $1 <> ''"
    } else {
        "SELECT l.shard FROM leases l
         JOIN unnest($2::int[], $3::bigint[]) AS held(shard, epoch)
           ON l.shard = held.shard AND l.epoch = held.epoch
         WHERE l.owner = $1
         FOR SHARE OF l"
    };
    let still_held: BTreeSet<Shard> = match tx
        .query(lease_check, &[&replica, &shards, &epoch_values])
        .await
    {
        Ok(rows) => rows
            .iter()
            .map(|row| row.get::<_, i32>(0) as Shard)
            .collect(),
        Err(e) => return Err((e.into(), Vec::new(), writes)),
    };
    let (writes, lost): (Vec<Write>, Vec<Write>) = writes.into_iter().partition(|write| {
        resources_of(write)
            .iter()
            .all(|r| still_held.contains(&map.shard_of(r.as_str())))
    });
    for write in lost {
        let shard = resources_of(&write)
            .iter()
            .map(|r| map.shard_of(r.as_str()))
            .find(|shard| !still_held.contains(shard))
            .unwrap_or_default();
        write.fail(StoreError::NotOwner { shard });
    }
    let names: Vec<&str> = {
        let mut names: Vec<&str> = writes
            .iter()
            .flat_map(resources_of)
            .map(ResourceKey::as_str)
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    };
    let loaded = match tx
        .query(
            "SELECT resource, highest FROM resources WHERE resource = ANY($1) ORDER BY resource FOR UPDATE",
            &[&names],
        )
        .await
    {
        Ok(rows) => rows,
        Err(e) => return Err((e.into(), Vec::new(), writes)),
    };
    let mut highest: HashMap<ResourceKey, Option<FencingToken>> = names
        .iter()
        .map(|name| (ResourceKey::new(*name), None))
        .collect();
    for row in loaded {
        let name: &str = row.get(0);
        highest.insert(ResourceKey::new(name), Some(token_from_sql(row.get(1))));
    }
    let mut batch = Batch::new(highest);
    for write in writes {
        *seq += 1;
        batch.apply(write, *seq);
    }
    let now = SystemTime::now();
    let written = write_rows(&tx, &batch, replica, now).await;
    let committed = match written {
        Ok(()) => tx.commit().await.map_err(StoreError::from),
        Err(e) => Err(e),
    };
    match committed {
        Ok(()) => Ok(batch),
        Err(e) => {
            tracing::error!(error = %e, batch = batch.outcomes.len(), "PostgreSQL commit failed");
            Err((e, batch.outcomes, Vec::new()))
        }
    }
}

/// The batch's rows, as three set-based statements.
async fn write_rows(
    tx: &tokio_postgres::Transaction<'_>,
    batch: &Batch,
    replica: &str,
    now: SystemTime,
) -> Result<(), StoreError> {
    let (names, tokens): (Vec<&str>, Vec<i64>) = batch
        .changed()
        .map(|(resource, highest)| (resource.as_str(), token_to_sql(highest)))
        .unzip();
    if !names.is_empty() {
        tx.execute(
            "INSERT INTO resources (resource, highest, updated_at)
             SELECT name, highest, $3 FROM unnest($1::text[], $2::bigint[]) AS t(name, highest)
             ON CONFLICT (resource) DO UPDATE SET highest = excluded.highest, updated_at = excluded.updated_at",
            &[&names, &tokens, &now],
        )
        .await?;
    }
    if !batch.epochs.is_empty() {
        let resources: Vec<&str> = batch.epochs.iter().map(|e| e.resource.as_str()).collect();
        let from: Vec<Option<i64>> = batch
            .epochs
            .iter()
            .map(|e| e.from.map(token_to_sql))
            .collect();
        let to: Vec<i64> = batch.epochs.iter().map(|e| token_to_sql(e.to)).collect();
        let via: Vec<&str> = batch.epochs.iter().map(|e| e.via.as_str()).collect();
        let reasons: Vec<Option<&str>> = batch.epochs.iter().map(|e| e.reason.as_deref()).collect();
        tx.execute(
            "INSERT INTO epochs (at, resource, from_token, to_token, via, reason, replica)
             SELECT $6, * , $7 FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::text[])",
            &[&resources, &from, &to, &via, &reasons, &now, &replica],
        )
        .await?;
    }
    if !batch.rejections.is_empty() {
        let r = &batch.rejections;
        let at: Vec<SystemTime> = r.iter().map(|r| r.at).collect();
        let resources: Vec<&str> = r.iter().map(|r| r.resource.as_str()).collect();
        let reasons: Vec<&str> = r.iter().map(|r| r.reason.as_str()).collect();
        let tokens: Vec<Option<i64>> = r.iter().map(|r| r.token.map(token_to_sql)).collect();
        let highest: Vec<Option<i64>> = r.iter().map(|r| r.highest.map(token_to_sql)).collect();
        let methods: Vec<&str> = r.iter().map(|r| r.method.as_str()).collect();
        let paths: Vec<&str> = r.iter().map(|r| r.path.as_str()).collect();
        let clients: Vec<&str> = r.iter().map(|r| r.client.as_str()).collect();
        let ids: Vec<Option<&str>> = r.iter().map(|r| r.request_id.as_deref()).collect();
        tx.execute(
            "INSERT INTO rejections (at, resource, reason, token, highest, method, path, client, request_id, replica)
             SELECT *, $10 FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::bigint[],
                                      $5::bigint[], $6::text[], $7::text[], $8::text[], $9::text[])",
            &[&at, &resources, &reasons, &tokens, &highest, &methods, &paths, &clients, &ids, &replica],
        )
        .await?;
    }
    Ok(())
}

async fn load_highest(
    client: &Client,
    names: &[&str],
) -> Result<HashMap<String, FencingToken>, StoreError> {
    let rows = client
        .query(
            "SELECT resource, highest FROM resources WHERE resource = ANY($1)",
            &[&names],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| (row.get::<_, String>(0), token_from_sql(row.get(1))))
        .collect())
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
