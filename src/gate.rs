//! The gate: per resource, the only place that decides whether a fenced request may be forwarded.
//!
//! Each resource has a [`Slot`] in memory holding its durable highest token, the token that is
//! currently *open* (whose requests may be forwarded), how many forwarded requests are in flight,
//! and until when a torn-down request stays *in doubt*. All in-flight requests carry the open
//! token, because a new token opens only when none are left. That gives the contract's guarantee:
//!
//! - A request with the open token takes a [`Permit`] at once: a short mutex section, no I/O.
//! - A higher token is first made durable through the store, then waits until the in-flight count
//!   is zero and the in-doubt deadline has passed, and only then opens. Any request that is lower
//!   than the highest by then (superseded while it waited) is refused and never forwarded.
//! - A lower token is refused.
//!
//! The forwarding permit is held until the upstream has answered; dropping it without
//! [`Permit::settle`] (a torn-down request) puts the resource in doubt for `in_doubt_grace`.
//!
//! A request that changes several resources (a COPY onto another resource's path) takes one
//! permit per resource with [`Gate::admit_all`]: every gate is judged before any is changed, the
//! advances are made durable in one transaction, and the permits are taken in the resources' sorted
//! order, so that two such requests can never each hold what the other waits for.
//!
//! Idle slots are evicted by [`Gate::evict_idle`] and reloaded from the database on next use.

use std::cmp::Ordering;
use std::num::NonZeroU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::route::ResourceKey;
use crate::store::{Advance, AllAdvanced, Durable, LastStop, Reset, SharedStore, StoreError, Via};
use crate::token::FencingToken;

/// How a token compares with a resource's highest: the pure check at the heart of fencing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Lower than the highest: a zombie's request.
    Stale { highest: FencingToken },
    /// Equal to the highest: the current leader.
    Current,
    /// Above the highest, or the first token the resource sees: a new leader.
    Newer,
}

/// Compares `token` with the resource's highest (`None` if the resource was never seen).
pub fn judge(highest: Option<FencingToken>, token: FencingToken) -> Verdict {
    match highest.map(|highest| (highest, token.cmp(&highest))) {
        Some((highest, Ordering::Less)) => Verdict::Stale { highest },
        Some((_, Ordering::Equal)) => Verdict::Current,
        None | Some((_, Ordering::Greater)) => Verdict::Newer,
    }
}

/// Refuses a token further above `highest` than `max_jump` allows. A resource's first token is
/// never a jump: there is nothing to measure it from.
pub fn check_jump(
    highest: Option<FencingToken>,
    token: FencingToken,
    max_jump: Option<u64>,
) -> Result<(), Refusal> {
    match (highest, max_jump) {
        (Some(highest), Some(limit)) if token.get().saturating_sub(highest.get()) > limit => {
            Err(Refusal::Jump { highest, limit })
        }
        _ => Ok(()),
    }
}

/// Why the gate refused a request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    #[error("token is lower than the highest token {highest}")]
    Stale { highest: FencingToken },
    #[error("token is more than {limit} above the highest token {highest}")]
    Jump { highest: FencingToken, limit: u64 },
    #[error("the token is no longer the durable highest; retry")]
    NotDurable,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A refusal of a request that changes several resources, with the resource whose gate refused.
#[derive(Debug, Clone)]
pub struct RefusedBy {
    pub resource: ResourceKey,
    pub refusal: Refusal,
}

/// How long a slot must go unused before [`Gate::evict_idle`] may drop it.
pub const IDLE_EVICTION: Duration = Duration::from_secs(60);

/// The per-resource ordering gate. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Gate {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    slots: DashMap<ResourceKey, Arc<Slot>>,
    store: SharedStore,
    in_doubt_grace: Duration,
    metrics: Arc<Metrics>,
    /// Slots keep their times as milliseconds since this instant (see [`EpochState`]).
    base: Instant,
    /// After an unclean stop: the end of the start-up in-doubt period, in those milliseconds.
    in_doubt_from_start: Option<NonZeroU64>,
    /// Another process's requests that may still reach the upstream for some resources (cluster
    /// mode: the previous owner of a shard this replica took over).
    others_in_doubt: Option<Arc<dyn OthersInDoubt>>,
}

/// Tells the gate until when requests that *another* process forwarded for a resource may still
/// reach the upstream, so that a slot created before then starts in doubt. Cluster mode's
/// ownership implements it per shard: after taking over a shard whose owner did not hand it over
/// cleanly, until `in_doubt_grace` after the takeover.
pub trait OthersInDoubt: std::fmt::Debug + Send + Sync {
    fn in_doubt_until(&self, resource: &ResourceKey) -> Option<Instant>;
}

impl Gate {
    /// A gate whose durable state lives in `store`.
    ///
    /// After an unclean stop of the previous server (`kill -9`, a crash, a drain that timed
    /// out), its torn-down requests may still be applied upstream for up to `in_doubt_grace`,
    /// exactly like a torn-down request of this process; so every resource starts in doubt, and
    /// no token opens before the grace has passed since start-up.
    pub fn new(
        store: SharedStore,
        in_doubt_grace: Duration,
        metrics: Arc<Metrics>,
        last_stop: LastStop,
    ) -> Self {
        let in_doubt_from_start = match last_stop {
            LastStop::Clean => None,
            LastStop::Unclean => NonZeroU64::new(ceil_millis(in_doubt_grace)),
        };
        Self {
            inner: Arc::new(Inner {
                slots: DashMap::new(),
                store,
                in_doubt_grace,
                metrics,
                base: Instant::now(),
                in_doubt_from_start,
                others_in_doubt: None,
            }),
        }
    }

    /// The same gate, also asking `others` whether a new slot must start in doubt. Only before
    /// the gate is first cloned.
    ///
    /// # Panics
    /// If the gate has been cloned already.
    pub fn with_others_in_doubt(mut self, others: Arc<dyn OthersInDoubt>) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("set before the gate is shared")
            .others_in_doubt = Some(others);
        self
    }

    /// Drops the slots of every resource `forget` picks, whatever they hold: cluster mode's
    /// replica forgets a shard it lost or newly took over, whose durable state another replica
    /// may have changed meanwhile. Requests still holding such a slot are those of the ended term,
    /// which are torn down; every later request loads the resource afresh.
    pub fn forget_where(&self, forget: impl Fn(&ResourceKey) -> bool) {
        self.inner.slots.retain(|resource, _| !forget(resource));
    }

    /// Whether a request that this gate forwarded for one of the resources `of` picks may still
    /// be applied upstream: one in flight, or torn down less than `in_doubt_grace` ago.
    pub fn in_doubt_where(&self, of: impl Fn(&ResourceKey) -> bool) -> bool {
        let now = millis_since(self.inner.base, Instant::now());
        self.inner.slots.iter().any(|slot| {
            of(slot.key()) && {
                let state = slot.lock();
                state.in_flight > 0 || state.in_doubt_until.is_some_and(|until| until.get() > now)
            }
        })
    }

    /// Whether a request forwarded by this gate may still be applied upstream: one in flight, or
    /// torn down less than `in_doubt_grace` ago. A server that stops while this holds must not
    /// record a clean stop.
    pub fn anything_in_doubt(&self) -> bool {
        let now = millis_since(self.inner.base, Instant::now());
        self.inner.slots.iter().any(|slot| {
            let state = slot.lock();
            state.in_flight > 0 || state.in_doubt_until.is_some_and(|until| until.get() > now)
        })
    }

    /// Admits a fenced request with `token` for `resource`, waiting as long as the ordering
    /// guarantee requires. The returned permit must live until the upstream has answered.
    /// `request_id` only labels the log line of an epoch advance.
    pub async fn admit(
        &self,
        resource: &ResourceKey,
        token: FencingToken,
        max_jump: Option<u64>,
        request_id: &str,
    ) -> Result<Permit, Refusal> {
        let slot = self.slot(resource).await?;
        let newer = {
            let mut state = slot.lock();
            match judge(state.highest(), token) {
                Verdict::Stale { highest } => return Err(Refusal::Stale { highest }),
                Verdict::Current if state.open() == Some(token) => {
                    state.enter();
                    drop(state);
                    return Ok(self.permit(slot));
                }
                // An advance to this token is still draining older requests: wait with it.
                Verdict::Current => false,
                Verdict::Newer => {
                    check_jump(state.highest(), token, max_jump)?;
                    true
                }
            }
        };
        if newer {
            self.make_durable(&slot, resource, token, Via::Write, request_id)
                .await?;
        }
        self.wait_for_turn(slot, token).await
    }

    /// Admits a request that changes `primary` and every one of `also` (in any order, repeats
    /// allowed): all or nothing. No gate is changed unless every gate accepts the token (judged
    /// first, then made durable in one transaction that re-checks them all); the permits are then
    /// taken in sorted order. On a refusal every permit already taken is given back, settled:
    /// nothing was sent. A token superseded on one resource *after* that transaction (while the
    /// request waits for older requests to drain) leaves the others at the token, as a fence to it
    /// would: it was the durable highest of every one of them when it was written.
    pub async fn admit_all(
        &self,
        primary: &ResourceKey,
        also: &[ResourceKey],
        token: FencingToken,
        max_jump: Option<u64>,
        request_id: &str,
    ) -> Result<Permits, RefusedBy> {
        if also.iter().all(|other| other == primary) {
            // The hot path: one resource, no allocation beyond what `admit` does.
            return match self.admit(primary, token, max_jump, request_id).await {
                Ok(permit) => Ok(Permits::one(permit)),
                Err(refusal) => Err(RefusedBy {
                    resource: primary.clone(),
                    refusal,
                }),
            };
        }
        let mut sorted = Vec::with_capacity(also.len() + 1);
        sorted.push(primary.clone());
        sorted.extend_from_slice(also);
        sorted.sort();
        sorted.dedup();
        let refused = |resource: &ResourceKey, refusal: Refusal| RefusedBy {
            resource: resource.clone(),
            refusal,
        };
        let mut slots = Vec::with_capacity(sorted.len());
        for resource in &sorted {
            let slot = self.slot(resource).await;
            slots.push(slot.map_err(|e| refused(resource, e.into()))?);
        }
        let mut newer = false;
        for (resource, slot) in sorted.iter().zip(&slots) {
            let highest = slot.lock().highest();
            match judge(highest, token) {
                Verdict::Stale { highest } => {
                    return Err(refused(resource, Refusal::Stale { highest }));
                }
                Verdict::Current => {}
                Verdict::Newer => {
                    check_jump(highest, token, max_jump).map_err(|r| refused(resource, r))?;
                    newer = true;
                }
            }
        }
        if newer {
            self.make_all_durable(&slots, &sorted, token, request_id)
                .await?;
        }
        let mut permits = Vec::with_capacity(slots.len());
        for (resource, slot) in sorted.iter().zip(slots) {
            match self.wait_for_turn(slot, token).await {
                Ok(permit) => permits.push(permit),
                Err(refusal) => {
                    for permit in permits {
                        permit.settle();
                    }
                    return Err(refused(resource, refusal));
                }
            }
        }
        // `sorted` holds at least two resources (all but one were not `primary`), so there is a
        // first permit; the fallback only keeps this free of a panic path.
        let mut permits = permits.into_iter();
        match permits.next() {
            Some(first) => Ok(Permits {
                first,
                rest: permits.collect(),
            }),
            None => self
                .admit(primary, token, max_jump, request_id)
                .await
                .map(Permits::one)
                .map_err(|refusal| refused(primary, refusal)),
        }
    }

    /// Raises `resource`'s highest token to `token` without forwarding anything, as a new leader
    /// does at election time. Returns the highest once it is durable and every older in-flight
    /// request has drained.
    #[tracing::instrument(skip(self))]
    pub async fn fence(
        &self,
        resource: &ResourceKey,
        token: FencingToken,
        request_id: &str,
    ) -> Result<FencingToken, Refusal> {
        let slot = self.slot(resource).await?;
        let highest = slot.lock().highest();
        if let Verdict::Stale { highest } = judge(highest, token) {
            return Err(Refusal::Stale { highest });
        }
        self.make_durable(&slot, resource, token, Via::Fence, request_id)
            .await?;
        let permit = self.wait_for_turn(slot, token).await?;
        Ok(permit.settle().unwrap_or(token))
    }

    /// Sets `resource`'s highest token to `token` even if that is lower: an operator undoing a
    /// runaway token. Returns once the reset is durable. Requests already in flight keep their
    /// permits; the next token to be forwarded waits for them to drain, as after any advance.
    #[tracing::instrument(skip(self))]
    pub async fn reset(
        &self,
        resource: &ResourceKey,
        token: FencingToken,
        reason: &str,
        request_id: &str,
    ) -> Result<Reset, Refusal> {
        let slot = self.slot(resource).await?;
        let store = self.inner.store.clone();
        let metrics = Arc::clone(&self.inner.metrics);
        let (resource, reason, request_id) =
            (resource.clone(), reason.to_owned(), request_id.to_owned());
        // Its own task, for the same reason as in `make_durable`.
        let reset = tokio::spawn(async move {
            let reset = store.reset(&resource, token, reason.clone()).await?;
            slot.observe(reset.durable, Reopen::Yes);
            metrics.advanced(Via::Reset);
            tracing::warn!(
                %resource, from = reset.from.map(FencingToken::get), to = token.get(), via = "reset",
                %reason, request_id, "epoch reset"
            );
            Ok::<_, StoreError>(reset)
        })
        .await
        .map_err(|_| StoreError::Closed)??;
        Ok(reset)
    }

    /// The resource's highest token, loading it if it is not in memory.
    pub async fn highest(
        &self,
        resource: &ResourceKey,
    ) -> Result<Option<FencingToken>, StoreError> {
        let slot = self.slot(resource).await?;
        let highest = slot.lock().highest();
        Ok(highest)
    }

    /// Drops the slots of resources that nobody has used for `idle_for` and that have nothing in
    /// flight or in doubt; they reload from the database on next use. Returns how many were
    /// dropped.
    pub fn evict_idle(&self, idle_for: Duration) -> usize {
        let now = millis_since(self.inner.base, Instant::now());
        let before = self.inner.slots.len();
        // A slot whose Arc is held elsewhere has a request in flight or waiting; the shard's write
        // lock, held during `retain`, keeps anyone from taking a new reference meanwhile.
        self.inner
            .slots
            .retain(|_, slot| Arc::strong_count(slot) > 1 || !slot.lock().is_idle(now, idle_for));
        before.saturating_sub(self.inner.slots.len())
    }

    /// How many resources are held in memory.
    pub fn resident(&self) -> usize {
        self.inner.slots.len()
    }

    async fn slot(&self, resource: &ResourceKey) -> Result<Arc<Slot>, StoreError> {
        let slot = match self.inner.slots.get(resource) {
            Some(slot) => Arc::clone(&slot),
            None => Arc::clone(
                &self
                    .inner
                    .slots
                    .entry(resource.clone())
                    .or_insert_with(|| Arc::new(self.new_slot(resource))),
            ),
        };
        // The hot path: loaded long ago, one uncontended lock.
        if slot.lock().load == Load::Done {
            return Ok(slot);
        }
        loop {
            // Registered before the state is read, as in `wait_for_turn`.
            let notified = slot.changed().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let load = {
                let mut state = slot.lock();
                let load = state.load;
                if load == Load::NotStarted {
                    state.load = Load::Running;
                }
                load
            };
            match load {
                Load::Done => return Ok(slot),
                Load::NotStarted => {
                    self.load(&slot, resource).await?;
                    return Ok(slot);
                }
                Load::Running => notified.await,
            }
        }
    }

    /// Reads the resource's durable state into a slot that is marked as loading. Runs as its own
    /// task, so that a caller that gives up cannot leave the slot loading forever; the slot is
    /// kept in the map meanwhile (the task holds a reference, so it cannot be evicted).
    async fn load(&self, slot: &Arc<Slot>, resource: &ResourceKey) -> Result<(), StoreError> {
        let store = self.inner.store.clone();
        let (slot, resource) = (Arc::clone(slot), resource.clone());
        tokio::spawn(async move {
            let loaded = store.load(&resource).await;
            slot.finish_load(loaded.as_ref().ok().copied());
            loaded.map(drop)
        })
        .await
        .map_err(|_| StoreError::Closed)?
    }

    /// Makes `token` durable as the resource's highest. Runs as its own task so that memory
    /// catches up with the database even if the request that asked is cancelled mid-commit:
    /// otherwise a fence whose client hung up could be durable but not enforced until restart.
    async fn make_durable(
        &self,
        slot: &Arc<Slot>,
        resource: &ResourceKey,
        token: FencingToken,
        via: Via,
        request_id: &str,
    ) -> Result<(), Refusal> {
        let store = self.inner.store.clone();
        let metrics = Arc::clone(&self.inner.metrics);
        let slot = Arc::clone(slot);
        let (resource, request_id) = (resource.clone(), request_id.to_owned());
        let durable = tokio::spawn(async move {
            let advance = store.advance(&resource, token, via).await?;
            if let Advance::Raised { from, .. } = advance {
                record_advance(&metrics, &resource, from, token, via, &request_id);
            }
            let durable = advance.durable(token);
            slot.observe(durable, Reopen::No);
            Ok::<_, StoreError>(durable)
        })
        .await
        .map_err(|_| StoreError::Closed)??;
        match judge(durable.highest, token) {
            Verdict::Stale { highest } => Err(Refusal::Stale { highest }),
            Verdict::Current | Verdict::Newer => Ok(()),
        }
    }

    /// [`Gate::make_durable`] for several resources at once, in one transaction: either every one
    /// is at least `token` afterwards, or (one was already above it) none was changed.
    async fn make_all_durable(
        &self,
        slots: &[Arc<Slot>],
        resources: &[ResourceKey],
        token: FencingToken,
        request_id: &str,
    ) -> Result<(), RefusedBy> {
        let store = self.inner.store.clone();
        let metrics = Arc::clone(&self.inner.metrics);
        let slots = slots.to_vec();
        let (keys, request_id) = (resources.to_vec(), request_id.to_owned());
        // Its own task, for the same reason as in `make_durable`.
        let advanced: Result<AllAdvanced, StoreError> = tokio::spawn(async move {
            let advanced = store.advance_all(keys.clone(), token, Via::Write).await?;
            for (index, (slot, resource)) in slots.iter().zip(&keys).enumerate() {
                if let Some(from) = advanced.raised_from(index) {
                    record_advance(&metrics, resource, from, token, Via::Write, &request_id);
                }
                slot.observe(advanced.durable(index), Reopen::No);
            }
            Ok(advanced)
        })
        .await
        .unwrap_or(Err(StoreError::Closed));
        let advanced = advanced.map_err(|e| RefusedBy {
            resource: resources[0].clone(),
            refusal: e.into(),
        })?;
        match advanced.refused_by {
            None => Ok(()),
            Some(index) => Err(RefusedBy {
                resource: resources[index].clone(),
                refusal: Refusal::Stale {
                    highest: advanced.previous[index].unwrap_or(token),
                },
            }),
        }
    }

    /// Waits until `token` (already durable) may be forwarded: no older request in flight or in
    /// doubt. Refuses if a higher token became durable meanwhile.
    async fn wait_for_turn(&self, slot: Arc<Slot>, token: FencingToken) -> Result<Permit, Refusal> {
        loop {
            // Registered before the state is read, so a release between the read and the await
            // still wakes this waiter.
            let notified = slot.changed().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = millis_since(self.inner.base, Instant::now());
            let deadline = match slot.lock().try_open(token, now) {
                Turn::Go => return Ok(self.permit(Arc::clone(&slot))),
                Turn::Superseded { highest } => return Err(Refusal::Stale { highest }),
                Turn::NotDurable => return Err(Refusal::NotDurable),
                Turn::Wait { until } => {
                    until.map(|ms| self.inner.base + Duration::from_millis(ms.get()))
                }
            };
            match deadline {
                Some(deadline) => {
                    tokio::select! {
                        () = &mut notified => {}
                        () = tokio::time::sleep_until(deadline) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// A slot created now; during the start-up in-doubt period, or while another process's
    /// requests for the resource may still arrive upstream, it starts in doubt.
    fn new_slot(&self, resource: &ResourceKey) -> Slot {
        let now = millis_since(self.inner.base, Instant::now());
        let slot = Slot::new(now);
        let others = self
            .inner
            .others_in_doubt
            .as_ref()
            .and_then(|others| others.in_doubt_until(resource))
            .and_then(|until| {
                NonZeroU64::new(ceil_millis(
                    until.saturating_duration_since(self.inner.base),
                ))
            });
        let start_in_doubt = self.inner.in_doubt_from_start.max(others);
        slot.lock().in_doubt_until = start_in_doubt.filter(|until| until.get() > now);
        slot
    }

    fn permit(&self, slot: Arc<Slot>) -> Permit {
        Permit {
            slot,
            in_doubt_grace: self.inner.in_doubt_grace,
            base: self.inner.base,
            settled: false,
        }
    }
}

/// Counts and logs an advance the store has made durable.
fn record_advance(
    metrics: &Metrics,
    resource: &ResourceKey,
    from: Option<FencingToken>,
    token: FencingToken,
    via: Via,
    request_id: &str,
) {
    metrics.advanced(via);
    tracing::info!(
        %resource, from = from.map(FencingToken::get), to = token.get(), via = via.as_str(),
        request_id, "epoch advanced"
    );
}

/// The right to forward one request upstream. Hold it until the upstream has answered, then call
/// [`Permit::settle`]. Dropped unsettled (the request was torn down, the upstream failed or timed
/// out) it leaves the resource in doubt for `in_doubt_grace`: the upstream may still apply it.
#[derive(Debug)]
#[must_use = "dropping a permit at once marks its request as torn down"]
pub struct Permit {
    slot: Arc<Slot>,
    in_doubt_grace: Duration,
    /// The gate's clock origin.
    base: Instant,
    settled: bool,
}

impl Permit {
    /// The resource's highest token right now, for the `Fencing-Token-Highest` header.
    pub fn highest(&self) -> Option<FencingToken> {
        self.slot.lock().highest()
    }

    /// The upstream has answered, or certainly never received the request. Returns the highest
    /// token at this moment.
    pub fn settle(mut self) -> Option<FencingToken> {
        self.settled = true;
        self.slot.leave(self.base, None)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.settled {
            self.slot.leave(self.base, Some(self.in_doubt_grace));
        }
    }
}

/// The permits of one request, one per resource it changes. Hold them until the upstream has
/// answered, then [`Permits::settle`]; dropped unsettled, each leaves its resource in doubt.
#[derive(Debug)]
#[must_use = "dropping permits at once marks their request as torn down"]
pub struct Permits {
    /// Kept apart from the rest so that the common request, with one resource, allocates nothing.
    first: Permit,
    rest: Vec<Permit>,
}

impl Permits {
    fn one(permit: Permit) -> Self {
        Self {
            first: permit,
            rest: Vec::new(),
        }
    }

    /// The greatest highest token among the resources right now, for `Fencing-Token-Highest`:
    /// if any resource has moved past the request's token, the leader learns it.
    pub fn highest(&self) -> Option<FencingToken> {
        let rest = self.rest.iter().filter_map(Permit::highest).max();
        self.first.highest().max(rest)
    }

    /// The upstream has answered, or certainly never received the request. Returns the greatest
    /// highest token at this moment.
    pub fn settle(self) -> Option<FencingToken> {
        let rest = self.rest.into_iter().filter_map(Permit::settle).max();
        self.first.settle().max(rest)
    }
}

/// How many `Notify`s all slots share between them; see [`Slot::changed`].
const WAKERS: usize = 256;

/// Where waiters for a slot's change wait. Waiting is rare (an advance draining older requests, a
/// cold load), so the slots share these instead of carrying 32 bytes each: a million resident
/// resources would otherwise spend 32 MB on them. Sharing only adds spurious wake-ups, which
/// every waiter already tolerates by re-reading its slot.
static CHANGED: [Notify; WAKERS] = [const { Notify::const_new() }; WAKERS];

/// One resource in memory. Kept small: there is one per resident resource (see
/// bench/results/run.md for the memory figure with a million of them).
#[derive(Debug)]
struct Slot {
    state: Mutex<EpochState>,
}

impl Slot {
    /// A slot not loaded yet, created `now` (in the gate's milliseconds).
    fn new(now: u64) -> Self {
        Self {
            state: Mutex::new(EpochState::new(now)),
        }
    }

    /// The state is only ever changed in short sections that cannot panic, so a poisoned lock
    /// still holds consistent state.
    fn lock(&self) -> MutexGuard<'_, EpochState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Signalled when a waiting higher token may be able to proceed or has been superseded, and
    /// when a load finishes. Chosen by the slot's address, which is stable while anyone holds it.
    fn changed(&self) -> &'static Notify {
        let address = std::ptr::from_ref(self) as usize;
        &CHANGED[(address / std::mem::align_of::<Self>()) % WAKERS]
    }

    /// Takes in what the database said, unless a later answer has already been taken in (see
    /// [`Durable`]). With `Reopen::Yes` the open token is closed, so that whichever token comes
    /// next waits for every request in flight, as after any change of epoch.
    fn observe(&self, durable: Durable, reopen: Reopen) {
        {
            let mut state = self.lock();
            state.take_durable(durable);
            if reopen == Reopen::Yes {
                state.set_open(None);
            }
        }
        // Waiters with a lower token must learn that they have been superseded.
        self.changed().notify_waiters();
    }

    /// Ends a load: with the database's answer the slot is ready; without one (the read failed)
    /// the next caller tries again.
    fn finish_load(&self, loaded: Option<Durable>) {
        {
            let mut state = self.lock();
            match loaded {
                Some(durable) => {
                    state.take_durable(durable);
                    state.load = Load::Done;
                }
                None => state.load = Load::NotStarted,
            }
        }
        self.changed().notify_waiters();
    }

    fn leave(&self, base: Instant, in_doubt_for: Option<Duration>) -> Option<FencingToken> {
        let (highest, wake) = {
            let mut state = self.lock();
            let wake = state.leave(Instant::now(), base, in_doubt_for);
            (state.highest(), wake)
        };
        if wake {
            self.changed().notify_waiters();
        }
        highest
    }
}

/// Whether a slot holds the database's state yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Load {
    NotStarted,
    Running,
    Done,
}

/// Whether taking in a durable state also closes the open token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reopen {
    Yes,
    No,
}

/// What [`EpochState::try_open`] decided for a waiting token.
#[derive(Debug, PartialEq, Eq)]
enum Turn {
    Go,
    Superseded {
        highest: FencingToken,
    },
    /// The highest fell below the waiting token (an operator's reset): the token is no longer
    /// durable, and forwarding it would break rule 2 of the contract.
    NotDurable,
    /// Until a release (`None`) or until the in-doubt deadline, in the gate's milliseconds.
    Wait {
        until: Option<NonZeroU64>,
    },
}

/// A resource's fencing state. Times are milliseconds since the gate's `base` rather than
/// `Instant`s (16 bytes each): with a million resident resources every byte here is a megabyte.
///
/// For the same reason the two optional tokens are a value and a bit each (an `Option<u64>` is
/// 16 bytes); read them through [`EpochState::highest`] and [`EpochState::open`].
#[derive(Debug)]
struct EpochState {
    /// The durable highest token, if `HAS_HIGHEST`; the resource was never seen otherwise.
    highest: u64,
    /// The token whose requests may be forwarded now, if `HAS_OPEN`. Every in-flight request
    /// carries it.
    open: u64,
    /// `HAS_HIGHEST` and `HAS_OPEN`.
    tokens: u8,
    /// Where `highest` stands in the writer's commit order (see [`Durable`]).
    seq: u64,
    /// A torn-down request may still be applied upstream until then (rounded up to the next
    /// millisecond, so the wait is never shorter than the grace).
    in_doubt_until: Option<NonZeroU64>,
    /// The low 32 bits of when it was made or its last request left; a slot with a request in
    /// flight is never idle, so entering does not read the clock. Compared with wrapping
    /// arithmetic, which is exact while the slot has been idle for less than 49 days; eviction
    /// drops an idle slot long before.
    last_used: u32,
    in_flight: u32,
    load: Load,
}

/// Milliseconds from `base` to `now`, rounded down.
fn millis_since(base: Instant, now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(base).as_millis()).unwrap_or(u64::MAX)
}

/// `duration` in whole milliseconds, rounded up.
fn ceil_millis(duration: Duration) -> u64 {
    let millis = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    if duration > Duration::from_millis(millis) {
        millis.saturating_add(1)
    } else {
        millis
    }
}

const HAS_HIGHEST: u8 = 1;
const HAS_OPEN: u8 = 2;

impl EpochState {
    fn highest(&self) -> Option<FencingToken> {
        (self.tokens & HAS_HIGHEST != 0).then(|| FencingToken::new(self.highest))
    }

    fn open(&self) -> Option<FencingToken> {
        (self.tokens & HAS_OPEN != 0).then(|| FencingToken::new(self.open))
    }

    fn set_highest(&mut self, token: Option<FencingToken>) {
        self.highest = token.map_or(0, FencingToken::get);
        self.set_flag(HAS_HIGHEST, token.is_some());
    }

    fn set_open(&mut self, token: Option<FencingToken>) {
        self.open = token.map_or(0, FencingToken::get);
        self.set_flag(HAS_OPEN, token.is_some());
    }

    fn set_flag(&mut self, flag: u8, on: bool) {
        if on {
            self.tokens |= flag;
        } else {
            self.tokens &= !flag;
        }
    }

    /// Takes in what the database said, unless a later answer has already been taken in.
    fn take_durable(&mut self, durable: Durable) {
        if durable.seq >= self.seq {
            self.set_highest(durable.highest);
            self.seq = durable.seq;
        }
    }

    fn new(now: u64) -> Self {
        Self {
            highest: 0,
            open: 0,
            tokens: 0,
            seq: 0,
            in_doubt_until: None,
            last_used: now as u32,
            in_flight: 0,
            load: Load::NotStarted,
        }
    }

    fn enter(&mut self) {
        self.in_flight += 1;
    }

    /// Returns whether a waiter may now be able to proceed.
    fn leave(&mut self, now: Instant, base: Instant, in_doubt_for: Option<Duration>) -> bool {
        self.in_flight -= 1;
        self.last_used = millis_since(base, now) as u32; // the low bits, on purpose
        if let Some(grace) = in_doubt_for {
            // Rounded up on both sides, so the deadline is never earlier than `now + grace`.
            let since_base = now.saturating_duration_since(base);
            let until = ceil_millis(since_base).saturating_add(ceil_millis(grace));
            let until = NonZeroU64::new(until.max(1)).unwrap_or(NonZeroU64::MIN);
            self.in_doubt_until = Some(self.in_doubt_until.map_or(until, |d| d.max(until)));
        }
        self.in_flight == 0 && self.highest() != self.open()
    }

    /// Opens `token` for forwarding if nothing older is in flight or in doubt. The caller made
    /// `token` durable, so `highest` is at least `token`. `now` is in the gate's milliseconds.
    fn try_open(&mut self, token: FencingToken, now: u64) -> Turn {
        match judge(self.highest(), token) {
            Verdict::Stale { highest } => return Turn::Superseded { highest },
            Verdict::Newer => return Turn::NotDurable,
            Verdict::Current => {}
        }
        if self.open() == Some(token) {
            self.enter();
            return Turn::Go;
        }
        if self.in_flight > 0 {
            return Turn::Wait { until: None };
        }
        if let Some(until) = self.in_doubt_until.filter(|until| until.get() > now) {
            return Turn::Wait { until: Some(until) };
        }
        self.set_open(Some(token));
        self.in_doubt_until = None;
        self.enter();
        Turn::Go
    }

    fn is_idle(&self, now: u64, idle_for: Duration) -> bool {
        // Signed: eviction takes `now` once and then walks every slot, while the data-plane
        // threads go on using them; a slot used after that `now` is "in the future", not idle for
        // 49 days (which evicted hundreds of busy slots per pass with a million resident).
        let idle = (now as u32).wrapping_sub(self.last_used) as i32;
        let Ok(idle) = u64::try_from(idle) else {
            return false;
        };
        self.in_flight == 0
            && self.in_doubt_until.is_none_or(|until| until.get() <= now)
            && idle >= ceil_millis(idle_for)
    }
}

#[cfg(test)]
mod tests;
