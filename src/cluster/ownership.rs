//! Which shards this replica holds, under which lease epoch, and until when.
//!
//! The lease loop grants and renews terms here; the proxy asks [`Ownership::admit`] before it
//! gates a request, and the PostgreSQL store asks [`Ownership::epoch_for_write`] before every
//! write. A term ends at its deadline even if nothing else runs: [`Ownership::watch_deadlines`]
//! cancels it, which tears down the term's in-flight upstream requests.
//!
//! Timing: a renewal sent at `t` (boot-time clock) makes the deadline `t + lease_ttl × (1 −
//! max_clock_drift)`. PostgreSQL sets the lease's expiry to its own `now() + lease_ttl` when it
//! runs the renewal, which is after `t`; another replica takes the lease over only once that
//! expiry plus a drift margin has passed on the database's clock. So with clock rates within
//! `max_clock_drift`, this replica's deadline comes first. No request is admitted within
//! `safety_margin` of the deadline, so that one admitted just before it has time to leave the host.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::clock::BootInstant;
use super::{Shard, ShardMap};
use crate::gate::OthersInDoubt;
use crate::route::ResourceKey;

/// This replica's hold on one shard: one lease epoch, from its grant until it ends.
#[derive(Debug, Clone)]
pub struct Term {
    pub epoch: i64,
    /// Requests are admitted only before this.
    admit_until: BootInstant,
    /// The lease runs out here, on this replica's clock.
    deadline: BootInstant,
    /// Stopping: no new requests, the ones in flight finish (a handoff).
    draining: bool,
    /// The requests admitted under it, and the signal that tears them down when it ends.
    in_flight: Arc<InFlight>,
    /// After a takeover: until then the previous owner's requests may still reach the upstream.
    others_in_doubt_until: Option<Instant>,
}

/// A request admitted under a term. Dropping it tells the term that the request is over.
#[derive(Debug)]
pub struct Admission {
    pub shard: Shard,
    pub epoch: i64,
    in_flight: Arc<InFlight>,
}

impl Admission {
    /// Whether the term may still start this request: held, and not within the safety margin of
    /// its deadline. Asked again right before the request goes upstream, because the request may
    /// have waited (in the gate, or stopped with the whole process by SIGSTOP) since it was
    /// admitted: a replica that wakes past its deadline sends nothing.
    pub fn in_time(&self) -> bool {
        self.in_flight.admits_now()
    }

    /// What the request's bytes ask before each write to the upstream: the admission itself is
    /// dropped when the response head is handed on, but the rest of a request body may still be
    /// streaming after an early answer.
    pub fn window(&self) -> TermWindow {
        TermWindow(Arc::clone(&self.in_flight))
    }

    /// Completes when the term ends (at once if it has): the request must then be torn down.
    pub async fn term_ended(&self) {
        self.in_flight.ended().await;
    }
}

/// Whether the term a request was admitted under still lets its bytes leave this replica.
///
/// Asked right before every write of the request to the upstream, in the same poll as the write:
/// a replica whose process was stopped (SIGSTOP, a long pause) past its deadline must not send
/// the rest of a request when it wakes, and nothing else is sure to run first. The deadline
/// watcher runs on another thread, and after a stop the data thread may be scheduled before it.
#[derive(Debug, Clone)]
pub struct TermWindow(Arc<InFlight>);

impl TermWindow {
    /// The term has not ended and is not within the safety margin of its deadline.
    pub fn is_open(&self) -> bool {
        self.0.admits_now()
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if self.in_flight.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.in_flight.idle.notify_waiters();
        }
    }
}

/// What a term shares with the requests admitted under it. A flag and a `Notify` rather than a
/// `CancellationToken`: each request would clone, poll and drop a token, a lock each time, and a
/// flag is all the hot path reads.
#[derive(Debug, Default)]
struct InFlight {
    count: AtomicUsize,
    idle: Notify,
    /// The term's `admit_until`, as boot-time nanoseconds, moved by every renewal.
    admit_until: AtomicU64,
    /// Set once, when the term ends; `end` then wakes every request waiting on it.
    ended: AtomicBool,
    end: Notify,
}

impl InFlight {
    fn has_ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// Not ended, and before `admit_until` on the boot-time clock (which runs on while the
    /// process is stopped).
    fn admits_now(&self) -> bool {
        !self.has_ended()
            && BootInstant::now().as_nanos() < self.admit_until.load(Ordering::Acquire)
    }

    /// Ends the term for the requests admitted under it.
    fn end(&self) {
        self.ended.store(true, Ordering::Release);
        self.end.notify_waiters();
    }

    async fn ended(&self) {
        loop {
            // Made before the flag is read: a `Notified` sees every `notify_waiters` from its
            // creation on, so an end between the read and the wait is not missed.
            let notified = self.end.notified();
            if self.has_ended() {
                return;
            }
            notified.await;
        }
    }
}

/// Why a request cannot be gated here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotAdmitted {
    /// Another replica holds the shard, or nobody does yet.
    NotHeld,
    /// This replica holds it, but is handing it over or its lease is about to run out.
    Ending,
}

/// This replica's shards. Shared by the lease loop, the proxy and the store.
#[derive(Debug)]
pub struct Ownership {
    replica: String,
    map: ShardMap,
    safety_margin: Duration,
    terms: Box<[Mutex<Option<Term>>]>,
    /// Wakes [`Ownership::watch_deadlines`] when a deadline moves.
    changed: Notify,
    /// The whole cluster as the lease loop last read it.
    view: std::sync::RwLock<Arc<ClusterView>>,
    /// Wakes requests waiting for a shard to get an owner.
    view_changed: Notify,
}

/// The cluster as the lease loop last read it from PostgreSQL.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ClusterView {
    pub replicas: Vec<ReplicaInfo>,
    pub shards: Vec<ShardInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReplicaInfo {
    pub replica: String,
    pub peer: String,
    pub alive: bool,
    /// How many shards it holds.
    pub shards: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ShardInfo {
    pub shard: Shard,
    pub owner: Option<String>,
    pub epoch: i64,
}

impl Ownership {
    pub fn new(replica: String, map: ShardMap, safety_margin: Duration) -> Self {
        Self {
            replica,
            map,
            safety_margin,
            terms: (0..map.shards()).map(|_| Mutex::new(None)).collect(),
            changed: Notify::new(),
            view: std::sync::RwLock::new(Arc::default()),
            view_changed: Notify::new(),
        }
    }

    /// The cluster as last read.
    pub fn view(&self) -> Arc<ClusterView> {
        Arc::clone(
            &self
                .view
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }

    /// Replaces the view and wakes whoever waits for a shard's owner.
    pub fn set_view(&self, view: ClusterView) {
        *self
            .view
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(view);
        self.view_changed.notify_waiters();
    }

    /// The replica that holds `shard` by the last view, and its peer URL, if it is not this one
    /// and is alive.
    pub fn owner_elsewhere(&self, shard: Shard) -> Option<(String, String)> {
        let view = self.view();
        let owner = view.shards.get(shard as usize)?.owner.as_deref()?;
        if owner == self.replica {
            return None;
        }
        view.replicas
            .iter()
            .find(|replica| replica.replica == owner && replica.alive)
            .map(|replica| (replica.replica.clone(), replica.peer.clone()))
    }

    /// Resolves when the view or a term changes: a waiting request looks again.
    pub async fn changed(&self) {
        self.view_changed.notified().await;
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    pub fn map(&self) -> ShardMap {
        self.map
    }

    /// Admits a request for `shard` if this replica holds it and may still start requests
    /// under it. The admission must live until the request is over.
    pub fn admit(&self, shard: Shard) -> Result<Admission, NotAdmitted> {
        let terms = self.term(shard);
        let term = terms.as_ref().ok_or(NotAdmitted::NotHeld)?;
        if term.draining || BootInstant::now() >= term.admit_until {
            return Err(NotAdmitted::Ending);
        }
        if cfg!(feature = "negative-controls") && negative_control("forward-past-deadline") {
            // Negative control: admissions never run out (see Cargo.toml).
            term.in_flight
                .admit_until
                .store(u64::MAX, Ordering::Release);
        }
        term.in_flight.count.fetch_add(1, Ordering::AcqRel);
        Ok(Admission {
            shard,
            epoch: term.epoch,
            in_flight: Arc::clone(&term.in_flight),
        })
    }

    /// The lease epoch a write for `shard` must be conditional on, if this replica still holds
    /// the shard on its own clock. The database checks the epoch again in the write's
    /// transaction: this only saves a round trip for a write that is bound to fail.
    pub fn epoch_for_write(&self, shard: Shard) -> Option<i64> {
        self.term(shard)
            .as_ref()
            .filter(|term| BootInstant::now() < term.deadline)
            .map(|term| term.epoch)
    }

    /// The shards this replica holds, with their epochs.
    pub fn held(&self) -> Vec<(Shard, i64)> {
        (0..self.map.shards())
            .filter_map(|shard| self.term(shard).as_ref().map(|term| (shard, term.epoch)))
            .collect()
    }

    /// Starts a term: this replica now holds `shard` under `epoch`, until `deadline` unless
    /// renewed. A term it still had under another epoch ends first.
    pub fn grant(
        &self,
        shard: Shard,
        epoch: i64,
        deadline: BootInstant,
        others_in_doubt_until: Option<Instant>,
    ) {
        let mut term = self.term(shard);
        if let Some(old) = term.take() {
            old.in_flight.end();
        }
        let admit_until = self.admit_until(deadline);
        let in_flight = InFlight {
            admit_until: AtomicU64::new(admit_until.as_nanos()),
            ..InFlight::default()
        };
        *term = Some(Term {
            epoch,
            admit_until,
            deadline,
            draining: false,
            in_flight: Arc::new(in_flight),
            others_in_doubt_until,
        });
        drop(term);
        self.changed.notify_one();
        self.view_changed.notify_waiters();
    }

    /// Moves the deadline of `shard`'s term, if it is still under `epoch`.
    pub fn renew(&self, shard: Shard, epoch: i64, deadline: BootInstant) {
        let mut term = self.term(shard);
        if let Some(term) = term.as_mut().filter(|term| term.epoch == epoch) {
            term.deadline = term.deadline.max(deadline);
            term.admit_until = self.admit_until(term.deadline);
            term.in_flight
                .admit_until
                .store(term.admit_until.as_nanos(), Ordering::Release);
        }
        drop(term);
        self.changed.notify_one();
    }

    /// Ends `shard`'s term now: its in-flight requests are torn down. Returns the epoch it had.
    pub fn end(&self, shard: Shard) -> Option<i64> {
        let ended = self.term(shard).take();
        self.view_changed.notify_waiters();
        ended.map(|term| {
            term.in_flight.end();
            term.epoch
        })
    }

    /// Stops admitting requests for `shard` and waits until those in flight are over, or the
    /// term ends. Returns whether the shard drained with the term still held under `epoch`.
    pub async fn drain(&self, shard: Shard, epoch: i64) -> bool {
        let in_flight = {
            let mut term = self.term(shard);
            let Some(term) = term.as_mut().filter(|term| term.epoch == epoch) else {
                return false;
            };
            term.draining = true;
            Arc::clone(&term.in_flight)
        };
        loop {
            let idle = in_flight.idle.notified();
            if in_flight.count.load(Ordering::Acquire) == 0 {
                return !in_flight.has_ended();
            }
            tokio::select! {
                () = idle => {}
                () = in_flight.ended() => return false,
            }
        }
    }

    /// Ends every term whose deadline has passed, as they pass, for as long as it runs.
    pub async fn watch_deadlines(&self) {
        loop {
            let changed = self.changed.notified();
            let now = BootInstant::now();
            let mut next = None;
            for shard in 0..self.map.shards() {
                let mut term = self.term(shard);
                let overdue_ends = !(cfg!(feature = "negative-controls")
                    && negative_control("forward-past-deadline"));
                match term.as_ref().map(|term| term.deadline) {
                    Some(deadline) if deadline <= now && overdue_ends => {
                        let ended = term.take().map(|term| {
                            term.in_flight.end();
                            term.epoch
                        });
                        drop(term);
                        tracing::warn!(shard, epoch = ?ended, replica = %self.replica, "lease deadline passed without a renewal: the shard's requests are torn down and it is no longer served here");
                    }
                    Some(deadline) => {
                        next = Some(next.map_or(deadline, |next: BootInstant| next.min(deadline)));
                    }
                    None => {}
                }
            }
            let wait = next.map_or(Duration::from_secs(3600), |deadline| {
                deadline.saturating_duration_since(now)
            });
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = changed => {}
            }
        }
    }

    /// Whether `shard` is held here and handing over (draining).
    pub fn is_draining(&self, shard: Shard) -> bool {
        self.term(shard).as_ref().is_some_and(|term| term.draining)
    }

    fn admit_until(&self, deadline: BootInstant) -> BootInstant {
        deadline.checked_sub(self.safety_margin).unwrap_or(deadline)
    }

    fn term(&self, shard: Shard) -> MutexGuard<'_, Option<Term>> {
        self.terms[shard as usize]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Whether the negative control `name` is on (`FENCEGATE_NEGATIVE_CONTROL`); only in a build with
/// the `negative-controls` feature, which exists to prove that the fault test catches each bug.
pub(crate) fn negative_control(name: &str) -> bool {
    std::env::var("FENCEGATE_NEGATIVE_CONTROL").is_ok_and(|control| control == name)
}

impl OthersInDoubt for Ownership {
    fn in_doubt_until(&self, resource: &ResourceKey) -> Option<Instant> {
        self.term(self.map.shard_of(resource.as_str()))
            .as_ref()
            .and_then(|term| term.others_in_doubt_until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ownership() -> Ownership {
        Ownership::new("fg-1".into(), ShardMap::new(4), Duration::from_millis(50))
    }

    fn in_ms(ms: u64) -> BootInstant {
        BootInstant::now() + Duration::from_millis(ms)
    }

    #[test]
    fn only_a_held_shard_admits_and_only_before_its_safety_margin() {
        let ownership = ownership();
        assert_eq!(ownership.admit(0).unwrap_err(), NotAdmitted::NotHeld);
        ownership.grant(0, 7, in_ms(10_000), None);
        let admission = ownership.admit(0).unwrap();
        assert_eq!((admission.shard, admission.epoch), (0, 7));
        assert_eq!(ownership.epoch_for_write(0), Some(7));
        assert_eq!(ownership.epoch_for_write(1), None);
        // Inside the margin: writes may still commit, new requests may not start.
        ownership.grant(1, 3, in_ms(30), None);
        assert_eq!(ownership.admit(1).unwrap_err(), NotAdmitted::Ending);
        assert_eq!(ownership.epoch_for_write(1), Some(3));
        assert_eq!(ownership.held(), vec![(0, 7), (1, 3)]);
    }

    #[test]
    fn an_admission_may_start_its_request_only_while_its_term_holds_outside_the_margin() {
        let ownership = ownership();
        ownership.grant(0, 7, in_ms(10_000), None);
        let admission = ownership.admit(0).unwrap();
        assert!(admission.in_time());
        ownership.end(0);
        assert!(!admission.in_time(), "the term has ended");

        // Admitted with 150 ms to go and a 50 ms margin: in time now, not 120 ms later.
        ownership.grant(1, 3, in_ms(150), None);
        let late = ownership.admit(1).unwrap();
        assert!(late.in_time());
        std::thread::sleep(Duration::from_millis(120));
        assert!(!late.in_time(), "inside the safety margin");
        // A renewal moves the margin of the admissions already made too.
        ownership.renew(1, 3, in_ms(10_000));
        assert!(late.in_time());
    }

    #[test]
    fn a_renewal_under_another_epoch_changes_nothing() {
        let ownership = ownership();
        ownership.grant(0, 7, in_ms(30), None);
        ownership.renew(0, 6, in_ms(10_000));
        assert_eq!(ownership.admit(0).unwrap_err(), NotAdmitted::Ending);
        ownership.renew(0, 7, in_ms(10_000));
        assert!(ownership.admit(0).is_ok());
    }

    #[test]
    fn ending_a_term_tears_down_its_requests() {
        let ownership = ownership();
        ownership.grant(2, 1, in_ms(10_000), None);
        let admission = ownership.admit(2).unwrap();
        assert_eq!(ownership.end(2), Some(1));
        assert!(admission.in_flight.has_ended());
        assert_eq!(ownership.admit(2).unwrap_err(), NotAdmitted::NotHeld);
        assert_eq!(ownership.epoch_for_write(2), None);
    }

    #[tokio::test]
    async fn a_deadline_without_renewal_ends_the_term_by_itself() {
        let ownership = Arc::new(ownership());
        let watcher = tokio::spawn({
            let ownership = Arc::clone(&ownership);
            async move { ownership.watch_deadlines().await }
        });
        ownership.grant(0, 1, in_ms(100), None);
        ownership.grant(1, 1, in_ms(10_000), None);
        let admission = ownership.admit(0).unwrap();
        tokio::time::timeout(Duration::from_secs(5), admission.term_ended())
            .await
            .expect("the term ended at its deadline");
        assert_eq!(ownership.held(), vec![(1, 1)]);
        watcher.abort();
    }

    #[tokio::test]
    async fn a_drain_waits_for_the_requests_in_flight_and_admits_no_more() {
        let ownership = Arc::new(ownership());
        ownership.grant(0, 4, in_ms(10_000), None);
        let admission = ownership.admit(0).unwrap();
        let drain = tokio::spawn({
            let ownership = Arc::clone(&ownership);
            async move { ownership.drain(0, 4).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!drain.is_finished(), "a request is still in flight");
        assert_eq!(ownership.admit(0).unwrap_err(), NotAdmitted::Ending);
        drop(admission);
        assert!(drain.await.unwrap(), "drained under its own term");
        assert!(!ownership.drain(0, 5).await, "another epoch");
    }
}
