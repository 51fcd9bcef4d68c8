//! When a fenced request stops being in flight.
//!
//! The contract counts a request as in flight until its upstream response head has arrived *and*
//! its request body has been sent in full. Storage may answer before it has read the whole body
//! (an early `201`, an error it decides on from the headers); the old leader's bytes still
//! streaming upstream at that moment must keep the next token back, or they would land after the
//! new leader's first write. So the permits are held by [`InFlight`], shared between the proxy
//! (which sees the response head) and the [`BodySent`] handle of the upstream exchange (which sees
//! the last byte of the request written), and settled only when both have happened. If either
//! side goes away first, the permits are dropped unsettled: the resource is in doubt for
//! `in_doubt_grace`.
//!
//! In cluster mode it also carries the terms the request was admitted under, which
//! [`BodySent::may_write`] reads before each write: no byte of the request leaves once one has
//! run out.

use std::sync::{Arc, Mutex, MutexGuard};

use smallvec::SmallVec;

use crate::cluster::ownership::TermWindow;
use crate::gate::Permits;
use crate::token::FencingToken;

/// A fenced request's permits, held until the request is no longer in flight.
#[derive(Debug)]
pub(super) struct InFlight {
    shared: Arc<Shared>,
}

/// The terms a request was admitted under: none on a single node, one for almost every request
/// in cluster mode (kept inline, so that holding it allocates nothing).
pub(super) type Terms = SmallVec<[TermWindow; 1]>;

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Read without the lock: they never change.
    terms: Terms,
}

#[derive(Debug)]
struct State {
    /// `None` once settled. Dropped with the last handle if never settled: in doubt.
    permits: Option<Permits>,
    answered: bool,
    body_sent: bool,
}

impl Shared {
    /// Only short sections that cannot panic hold the lock, so a poisoned one is still consistent.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    /// Settles the permits if the request is done on both sides; returns the highest token.
    fn settle_if_done(&mut self) -> Option<FencingToken> {
        if self.answered && self.body_sent {
            self.permits.take().and_then(Permits::settle)
        } else {
            self.permits.as_ref().and_then(Permits::highest)
        }
    }
}

impl InFlight {
    /// Holds `permits` for a request about to be forwarded under `terms` (cluster mode; empty on
    /// a single node).
    pub(super) fn new(permits: Permits, terms: Terms) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    permits: Some(permits),
                    answered: false,
                    body_sent: false,
                }),
                terms,
            }),
        }
    }

    /// The upstream's response head has arrived. Returns the highest token for the
    /// `Fencing-Token-Highest` header.
    pub(super) fn answered(&self) -> Option<FencingToken> {
        let mut state = self.shared.lock();
        state.answered = true;
        state.settle_if_done()
    }

    /// The upstream certainly never received the request (it could not be reached): nothing of it
    /// can be applied later. Returns the highest token.
    pub(super) fn never_sent(&self) -> Option<FencingToken> {
        self.shared.lock().permits.take().and_then(Permits::settle)
    }

    /// The handle the upstream exchange tells when the request is written in full.
    pub(super) fn body_sent(&self) -> BodySent {
        BodySent {
            shared: Arc::clone(&self.shared),
        }
    }

    /// The highest token right now, without settling anything.
    pub(super) fn highest(&self) -> Option<FencingToken> {
        self.shared
            .lock()
            .permits
            .as_ref()
            .and_then(Permits::highest)
    }
}

/// The request body's side of an [`InFlight`]: told once the upstream connection has taken the
/// last byte of the request. Dropped untold (a body cut off, a connection torn down), it leaves
/// the request in doubt.
#[derive(Debug)]
pub(crate) struct BodySent {
    shared: Arc<Shared>,
}

impl BodySent {
    /// Whether more of the request may be written now: every term it was admitted under still
    /// admits (always, on a single node). Asked in the same poll as the write it allows, so that
    /// a process that wakes from a stop past its deadline writes nothing more.
    pub(crate) fn may_write(&self) -> bool {
        self.shared.terms.iter().all(TermWindow::is_open)
    }

    /// The whole request has been written to the upstream connection.
    pub(crate) fn sent(self) {
        let mut state = self.shared.lock();
        state.body_sent = true;
        state.settle_if_done();
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::time::Duration;

    use crate::gate::Gate;
    use crate::metrics::Metrics;
    use crate::route::ResourceKey;
    use crate::store::LastStop;
    use crate::store::sqlite::SqliteStore;

    /// A gate on a fresh database, and a resource already at token 1.
    pub(in crate::proxy) async fn gate() -> (Gate, ResourceKey, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let (store, guard) = SqliteStore::open(&dir.path().join("fg.db")).unwrap();
        std::mem::forget(guard); // the writer lives as long as the test
        let gate = Gate::new(
            store,
            Duration::from_secs(60),
            Metrics::new(),
            LastStop::Clean,
        );
        let resource = ResourceKey::new("r");
        (gate, resource, dir)
    }

    pub(in crate::proxy) async fn permits(gate: &Gate, resource: &ResourceKey) -> Permits {
        gate.admit_all(resource, &[], FencingToken::new(1), None, "")
            .await
            .unwrap()
    }

    /// Whether token 2 can be admitted at once (nothing older in flight or in doubt).
    async fn next_token_goes_through(gate: &Gate, resource: &ResourceKey) -> bool {
        let admit = gate.admit_all(resource, &[], FencingToken::new(2), None, "");
        tokio::time::timeout(Duration::from_millis(200), admit)
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn an_answer_before_the_body_is_sent_keeps_the_request_in_flight() {
        let (gate, resource, _dir) = gate().await;
        let in_flight = InFlight::new(permits(&gate, &resource).await, Terms::new());
        let body = in_flight.body_sent();
        in_flight.answered();
        drop(in_flight);
        assert!(
            !next_token_goes_through(&gate, &resource).await,
            "body still streaming"
        );
        body.sent();
        assert!(
            next_token_goes_through(&gate, &resource).await,
            "sent and answered"
        );
    }

    #[tokio::test]
    async fn a_body_sent_before_the_answer_waits_for_the_answer() {
        let (gate, resource, _dir) = gate().await;
        let in_flight = InFlight::new(permits(&gate, &resource).await, Terms::new());
        in_flight.body_sent().sent();
        assert!(
            !next_token_goes_through(&gate, &resource).await,
            "not answered"
        );
        in_flight.answered();
        assert!(next_token_goes_through(&gate, &resource).await);
    }

    #[tokio::test]
    async fn a_request_never_sent_is_settled_and_every_outcome_tells_the_highest_token() {
        let (gate, resource, _dir) = gate().await;
        let in_flight = InFlight::new(permits(&gate, &resource).await, Terms::new());
        // The token a refused or failed leader learns from `Fencing-Token-Highest`.
        assert_eq!(in_flight.highest(), Some(FencingToken::new(1)));
        assert_eq!(in_flight.never_sent(), Some(FencingToken::new(1)));
        assert!(
            next_token_goes_through(&gate, &resource).await,
            "nothing reached the upstream: nothing is in doubt"
        );
    }

    #[tokio::test]
    async fn a_body_cut_off_after_the_answer_leaves_the_resource_in_doubt() {
        let (gate, resource, _dir) = gate().await;
        let in_flight = InFlight::new(permits(&gate, &resource).await, Terms::new());
        let body = in_flight.body_sent();
        in_flight.answered();
        drop(in_flight);
        drop(body);
        assert!(
            !next_token_goes_through(&gate, &resource).await,
            "in doubt for the grace"
        );
    }
}
