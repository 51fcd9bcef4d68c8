//! The lease loop: every `lease_ttl`/3 this replica says it is alive, renews the leases it holds,
//! reads the cluster, and moves shards towards the owners rendezvous hashing picks among the live
//! replicas. It runs on its own PostgreSQL connection, apart from the writer's.
//!
//! - **Renewal.** One statement renews every lease still held under its epoch; the deadline is
//!   taken from the moment the renewal was *sent* (see [`super::ownership`]). A lease that did not
//!   come back renewed was taken over: its term ends at once.
//! - **Acquisition.** A shard whose lease is free, or has run out on the database's clock by more
//!   than the drift margin, is taken with `epoch + 1`. If the last owner let go of it cleanly
//!   (drained, nothing in doubt) its requests open at once; otherwise (a crash, a pause, a
//!   partition) new tokens wait `in_doubt_grace`, exactly as after an unclean stop.
//! - **Handoff.** A shard that should now be another replica's (a replica joined, or this one is
//!   leaving) is drained: no new requests, the ones in flight finish; then released, clean if
//!   nothing was left in doubt. Its next owner takes it on its next round.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::clock::BootInstant;
use super::ownership::{ClusterView, ReplicaInfo, ShardInfo};
use super::{Ownership, Shard};
use crate::gate::Gate;
use crate::store::StoreError;
use crate::store::postgres::Connection;

/// What the lease loop needs to know about this replica and the cluster's timing.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    /// How other replicas reach this one's peer plane.
    pub peer: String,
    pub lease_ttl: Duration,
    /// The clock-rate error tolerated, as a fraction (0.01 for 1%).
    pub max_clock_drift: f64,
    pub in_doubt_grace: Duration,
}

impl LeaseSettings {
    /// A renewal sent at `t` holds the lease until `t + lease_ttl × (1 − drift)` on this clock.
    fn deadline_after(&self, sent: BootInstant) -> BootInstant {
        sent + self
            .lease_ttl
            .mul_f64((1.0 - self.max_clock_drift).max(0.0))
    }

    /// How long past a lease's expiry, on the database's clock, before another replica may take
    /// it: twice the drift one `lease_ttl` can accumulate, so that the owner's own deadline has
    /// passed first even if both clocks err in the worst directions.
    fn takeover_margin(&self) -> Duration {
        self.lease_ttl.mul_f64(2.0 * self.max_clock_drift)
    }

    fn period(&self) -> Duration {
        self.lease_ttl / 3
    }
}

/// A handed-over shard, ready to be released.
#[derive(Debug)]
struct Drained {
    shard: Shard,
    epoch: i64,
    clean: bool,
}

pub struct LeaseLoop {
    connection: Connection,
    ownership: Arc<Ownership>,
    gate: Gate,
    settings: LeaseSettings,
    metrics: Arc<crate::metrics::Metrics>,
    client: Option<Client>,
    /// Shards being drained for a handoff.
    handing_over: HashSet<Shard>,
    drained_tx: mpsc::UnboundedSender<Drained>,
    drained_rx: mpsc::UnboundedReceiver<Drained>,
    leaving: bool,
}

impl std::fmt::Debug for LeaseLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseLoop")
            .field("replica", &self.ownership.replica())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl LeaseLoop {
    pub fn new(
        connection: Connection,
        ownership: Arc<Ownership>,
        gate: Gate,
        settings: LeaseSettings,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        let (drained_tx, drained_rx) = mpsc::unbounded_channel();
        Self {
            connection,
            ownership,
            gate,
            settings,
            metrics,
            client: None,
            handing_over: HashSet::new(),
            drained_tx,
            drained_rx,
            leaving: false,
        }
    }

    /// Runs rounds until `leave` is cancelled; then hands every shard over (each drained within
    /// `drain_for`, else released unclean) and returns once none is held.
    pub async fn run(mut self, leave: CancellationToken, drain_for: Duration) {
        loop {
            self.round().await;
            tokio::select! {
                () = tokio::time::sleep(self.settings.period()) => {}
                Some(drained) = self.drained_rx.recv() => self.release(drained).await,
                () = leave.cancelled(), if !self.leaving => {
                    self.leaving = true;
                    tracing::info!(replica = %self.ownership.replica(), "leaving the cluster: handing every shard over");
                }
            }
            if self.leaving {
                return self.leave(drain_for).await;
            }
        }
    }

    /// Hands every held shard over, then says this replica has left.
    async fn leave(mut self, drain_for: Duration) {
        let give_up = tokio::time::Instant::now() + drain_for;
        loop {
            self.round().await;
            if self.ownership.held().is_empty() {
                break;
            }
            tokio::select! {
                Some(drained) = self.drained_rx.recv() => self.release(drained).await,
                () = tokio::time::sleep(self.settings.period()) => {}
                () = tokio::time::sleep_until(give_up) => {
                    tracing::warn!("handoff did not finish within the shutdown grace; the shards left move after their leases run out");
                    break;
                }
            }
            while let Ok(drained) = self.drained_rx.try_recv() {
                self.release(drained).await;
            }
        }
        if let Ok(client) = self.connected().await {
            let replica = self.ownership.replica().to_owned();
            let _ = self
                .within(client.execute("DELETE FROM replicas WHERE replica = $1", &[&replica]))
                .await;
            self.client = Some(client);
        }
    }

    /// One round: heartbeat and renewal, then the cluster's state, then acquisitions and
    /// handoffs. A failure leaves everything to the next round; held leases run out on their own.
    async fn round(&mut self) {
        let client = match self.connected().await {
            Ok(client) => client,
            Err(error) => {
                tracing::warn!(error = %error, "lease round skipped: PostgreSQL is unreachable");
                return;
            }
        };
        match self.round_on(&client).await {
            Ok(()) => self.client = Some(client),
            Err(error) => {
                tracing::warn!(error = %error, "lease round failed; held leases are not renewed and run out unless a later round succeeds")
            }
        }
    }

    async fn round_on(&mut self, client: &Client) -> Result<(), StoreError> {
        self.renew(client).await?;
        self.metrics.shards_owned(self.ownership.held().len());
        let (view, leases) = self.read_cluster(client).await?;
        let desired = rendezvous(&view, self.ownership.map().shards());
        self.ownership.set_view(view);
        let me = self.ownership.replica().to_owned();
        for lease in leases {
            let wanted_here = desired.get(&lease.shard).is_some_and(|owner| *owner == me);
            let held_here = self.ownership.epoch_for_write(lease.shard).is_some();
            if wanted_here && !held_here && (lease.free || lease.expired) {
                self.acquire(client, &lease).await?;
            } else if held_here && !wanted_here && !self.handing_over.contains(&lease.shard) {
                self.hand_over(lease.shard);
            }
        }
        Ok(())
    }

    /// Says this replica is alive and renews every lease it holds, under its epoch.
    async fn renew(&mut self, client: &Client) -> Result<(), StoreError> {
        let me = self.ownership.replica().to_owned();
        let held = self.ownership.held();
        let sent = BootInstant::now();
        let started = tokio::time::Instant::now();
        let ttl = self.settings.lease_ttl.as_secs_f64();
        self.within(client.execute(
            "INSERT INTO replicas (replica, peer, seen_at, leaving) VALUES ($1, $2, now(), $3)
             ON CONFLICT (replica) DO UPDATE
             SET peer = excluded.peer, seen_at = excluded.seen_at, leaving = excluded.leaving",
            &[&me, &self.settings.peer, &self.leaving],
        ))
        .await?;
        if held.is_empty() {
            return Ok(());
        }
        let shards: Vec<i32> = held.iter().map(|(shard, _)| *shard as i32).collect();
        let epochs: Vec<i64> = held.iter().map(|(_, epoch)| *epoch).collect();
        let renewed = self
            .within(client.query(
                "UPDATE leases SET expires_at = now() + make_interval(secs => $2)
                 WHERE owner = $1 AND (shard, epoch) IN (SELECT * FROM unnest($3::int[], $4::bigint[]))
                 RETURNING shard, epoch",
                &[&me, &ttl, &shards, &epochs],
            ))
            .await?;
        self.metrics.lease_renewed(started.elapsed());
        let deadline = self.settings.deadline_after(sent);
        let renewed: BTreeMap<Shard, i64> = renewed
            .iter()
            .map(|row| (row.get::<_, i32>(0) as Shard, row.get::<_, i64>(1)))
            .collect();
        for (shard, epoch) in held {
            if renewed.get(&shard) == Some(&epoch) {
                self.ownership.renew(shard, epoch, deadline);
            } else {
                self.ownership.end(shard);
                self.forget(shard);
                self.metrics.lease_lost();
                tracing::warn!(shard, epoch, replica = %me, "lease lost: another replica took the shard over");
            }
        }
        Ok(())
    }

    async fn read_cluster(&self, client: &Client) -> Result<(ClusterView, Vec<Lease>), StoreError> {
        let ttl = self.settings.lease_ttl.as_secs_f64();
        let margin = self.settings.takeover_margin().as_secs_f64();
        let replicas = self
            .within(client.query(
                "SELECT replica, peer, seen_at > now() - make_interval(secs => $1) AND NOT leaving
                 FROM replicas ORDER BY replica",
                &[&ttl],
            ))
            .await?;
        let leases = self
            .within(client.query(
                "SELECT shard, owner, epoch, expires_at < now() - make_interval(secs => $1), clean
                 FROM leases ORDER BY shard",
                &[&margin],
            ))
            .await?;
        let leases: Vec<Lease> = leases
            .iter()
            .map(|row| {
                let owner: Option<String> = row.get(1);
                Lease {
                    shard: row.get::<_, i32>(0) as Shard,
                    free: owner.is_none(),
                    owner,
                    epoch: row.get(2),
                    expired: row.get(3),
                    clean: row.get(4),
                }
            })
            .collect();
        let replicas = replicas
            .iter()
            .map(|row| {
                let replica: String = row.get(0);
                let shards = leases
                    .iter()
                    .filter(|lease| lease.owner.as_deref() == Some(replica.as_str()))
                    .count();
                ReplicaInfo {
                    replica,
                    peer: row.get(1),
                    alive: row.get(2),
                    shards,
                }
            })
            .collect();
        let shards = leases
            .iter()
            .map(|lease| ShardInfo {
                shard: lease.shard,
                owner: lease.owner.clone(),
                epoch: lease.epoch,
            })
            .collect();
        Ok((ClusterView { replicas, shards }, leases))
    }

    /// Takes `lease` with the next epoch, if it is still as read (free, or expired past the
    /// margin), and records how in the lease history.
    async fn acquire(&mut self, client: &Client, lease: &Lease) -> Result<(), StoreError> {
        let me = self.ownership.replica().to_owned();
        let ttl = self.settings.lease_ttl.as_secs_f64();
        let margin = self.settings.takeover_margin().as_secs_f64();
        let sent = BootInstant::now();
        let taken = self
            .within(client.query_opt(
                "WITH taken AS (
                     UPDATE leases SET owner = $1, epoch = epoch + 1,
                                       expires_at = now() + make_interval(secs => $3), clean = false
                     WHERE shard = $2 AND epoch = $4
                       AND (owner IS NULL OR expires_at < now() - make_interval(secs => $5))
                     RETURNING shard, epoch)
                 INSERT INTO lease_history (shard, epoch, owner, previous, kind)
                 SELECT shard, epoch, $1, $6, $7 FROM taken
                 RETURNING epoch",
                &[
                    &me,
                    &(lease.shard as i32),
                    &ttl,
                    &lease.epoch,
                    &margin,
                    &lease.owner,
                    &if lease.free { "acquire" } else { "takeover" },
                ],
            ))
            .await?;
        let Some(row) = taken else {
            return Ok(()); // someone else was quicker; the next round reads the new state
        };
        let epoch: i64 = row.get(0);
        let handed_over_cleanly = lease.free && lease.clean;
        let no_wait = cfg!(feature = "negative-controls")
            && super::ownership::negative_control("no-takeover-wait");
        let others_in_doubt_until = (!handed_over_cleanly && !no_wait)
            .then(|| tokio::time::Instant::now() + self.settings.in_doubt_grace);
        self.forget(lease.shard);
        self.ownership.grant(
            lease.shard,
            epoch,
            self.settings.deadline_after(sent),
            others_in_doubt_until,
        );
        if lease.free {
            self.metrics.shard_acquired();
        } else {
            self.metrics.shard_taken_over();
        }
        tracing::info!(
            shard = lease.shard, epoch, replica = %me, previous = ?lease.owner,
            clean = handed_over_cleanly,
            "lease acquired{}",
            if handed_over_cleanly { "" } else { ": new tokens wait in_doubt_grace for the previous owner's requests" }
        );
        Ok(())
    }

    /// Starts draining `shard` for its next owner; [`LeaseLoop::release`] lets go of it after.
    fn hand_over(&mut self, shard: Shard) {
        let Some(epoch) = self.ownership.epoch_for_write(shard) else {
            return;
        };
        self.handing_over.insert(shard);
        let ownership = Arc::clone(&self.ownership);
        let gate = self.gate.clone();
        let drained = self.drained_tx.clone();
        tracing::info!(
            shard,
            epoch,
            "handing the shard over: draining its requests"
        );
        tokio::spawn(async move {
            let still_held = ownership.drain(shard, epoch).await;
            let map = ownership.map();
            let clean = still_held && !gate.in_doubt_where(|r| map.shard_of(r.as_str()) == shard);
            let _ = drained.send(Drained {
                shard,
                epoch,
                clean,
            });
        });
    }

    /// Lets go of a drained shard: free for its next owner, marked clean if nothing was left in
    /// doubt, so that it opens at once there.
    async fn release(&mut self, drained: Drained) {
        self.handing_over.remove(&drained.shard);
        let me = self.ownership.replica().to_owned();
        let released = match self.connected().await {
            Ok(client) => {
                let released = self
                    .within(client.query_opt(
                        "WITH released AS (
                             UPDATE leases SET owner = NULL, clean = $4, expires_at = '-infinity'
                             WHERE shard = $1 AND owner = $2 AND epoch = $3
                             RETURNING shard, epoch)
                         INSERT INTO lease_history (shard, epoch, owner, previous, kind)
                         SELECT shard, epoch, NULL, $2, 'release' FROM released
                         RETURNING epoch",
                        &[&(drained.shard as i32), &me, &drained.epoch, &drained.clean],
                    ))
                    .await;
                self.client = Some(client);
                released
            }
            Err(error) => Err(error),
        };
        // Whether or not the release reached the database, this replica no longer serves the
        // shard: unreleased, the lease simply runs out.
        self.ownership.end(drained.shard);
        self.forget(drained.shard);
        match released {
            Ok(Some(_)) => {
                self.metrics.shard_handed_over();
                tracing::info!(
                    shard = drained.shard,
                    epoch = drained.epoch,
                    clean = drained.clean,
                    "shard handed over"
                );
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(shard = drained.shard, error = %error, "cannot release the shard; it moves when its lease runs out");
            }
        }
    }

    /// Drops the gate's memory of `shard`'s resources: another replica may change them next.
    fn forget(&self, shard: Shard) {
        let map = self.ownership.map();
        self.gate
            .forget_where(|r| map.shard_of(r.as_str()) == shard);
    }

    async fn connected(&mut self) -> Result<Client, StoreError> {
        match self.client.take().filter(|client| !client.is_closed()) {
            Some(client) => Ok(client),
            None => self.connection.connect().await,
        }
    }

    async fn within<T>(
        &self,
        work: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, StoreError> {
        let timeout = self.connection.timeout;
        match tokio::time::timeout(timeout, work).await {
            Ok(result) => result.map_err(StoreError::from),
            Err(_) => Err(StoreError::Unavailable {
                cause: format!("no answer within {timeout:?}"),
            }),
        }
    }
}

/// A lease as one round read it.
#[derive(Debug)]
struct Lease {
    shard: Shard,
    owner: Option<String>,
    epoch: i64,
    free: bool,
    /// Run out past the takeover margin on the database's clock.
    expired: bool,
    clean: bool,
}

/// Which live replica should own each shard: the one with the highest score for it (rendezvous
/// hashing), so that a replica joining or leaving moves only the shards it wins or held.
fn rendezvous(view: &ClusterView, shards: u32) -> BTreeMap<Shard, String> {
    let alive: Vec<&str> = view
        .replicas
        .iter()
        .filter(|replica| replica.alive)
        .map(|replica| replica.replica.as_str())
        .collect();
    (0..shards)
        .filter_map(|shard| {
            alive
                .iter()
                .max_by_key(|replica| (score(shard, replica), std::cmp::Reverse(**replica)))
                .map(|replica| (shard, (*replica).to_owned()))
        })
        .collect()
}

fn score(shard: Shard, replica: &str) -> u64 {
    let mut key = Vec::with_capacity(replica.len() + 5);
    key.extend_from_slice(replica.as_bytes());
    key.push(0);
    key.extend_from_slice(&shard.to_le_bytes());
    // FNV-1a mixes the last bytes weakly; a final avalanche spreads them over the whole word.
    let mut hash = super::fnv1a_64(&key);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(names: &[&str]) -> ClusterView {
        ClusterView {
            replicas: names
                .iter()
                .map(|name| ReplicaInfo {
                    replica: (*name).to_owned(),
                    peer: String::new(),
                    alive: true,
                    shards: 0,
                })
                .collect(),
            shards: Vec::new(),
        }
    }

    #[test]
    fn shards_spread_evenly_and_a_join_moves_only_what_the_new_replica_wins() {
        let three = rendezvous(&view(&["fg-1", "fg-2", "fg-3"]), 64);
        for name in ["fg-1", "fg-2", "fg-3"] {
            let owned = three.values().filter(|owner| *owner == name).count();
            assert!((12..=30).contains(&owned), "{name} owns {owned} of 64");
        }
        let four = rendezvous(&view(&["fg-1", "fg-2", "fg-3", "fg-4"]), 64);
        for (shard, owner) in &four {
            if owner != "fg-4" {
                assert_eq!(
                    &three[shard], owner,
                    "shard {shard} moved between old replicas"
                );
            }
        }
        assert!(four.values().any(|owner| owner == "fg-4"));
    }

    #[test]
    fn a_dead_replica_owns_nothing_and_nobody_alive_means_no_owner() {
        let mut cluster = view(&["fg-1", "fg-2"]);
        cluster.replicas[1].alive = false;
        assert!(
            rendezvous(&cluster, 8)
                .values()
                .all(|owner| owner == "fg-1")
        );
        cluster.replicas[0].alive = false;
        assert!(rendezvous(&cluster, 8).is_empty());
    }

    #[test]
    fn the_owner_deadline_comes_before_the_takeover_on_any_clock_within_the_drift() {
        let settings = LeaseSettings {
            peer: String::new(),
            lease_ttl: Duration::from_secs(6),
            max_clock_drift: 0.01,
            in_doubt_grace: Duration::from_secs(1),
        };
        let sent = BootInstant::now();
        let owner_holds_for = settings
            .deadline_after(sent)
            .saturating_duration_since(sent);
        // The database's expiry is at least lease_ttl after the send, plus the margin; a slow
        // owner clock stretches its own wait by at most the drift.
        let earliest_takeover = settings.lease_ttl + settings.takeover_margin();
        assert!(owner_holds_for.mul_f64(1.0 + settings.max_clock_drift) < earliest_takeover);
        assert_eq!(settings.period(), Duration::from_secs(2));
    }
}
