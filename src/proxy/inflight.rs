//! When a fenced request stops being in flight.
//!
//! The contract counts a request as in flight until its upstream response head has arrived *and*
//! its request body has been sent in full. Storage may answer before it has read the whole body
//! (an early `201`, an error it decides on from the headers); the old leader's bytes still
//! streaming upstream at that moment must keep the next token back, or they would land after the
//! new leader's first write. So the permits are held by [`InFlight`], shared between the proxy
//! (which sees the response head) and the [`SentBody`] that hyper sends (which sees the end of the
//! body), and settled only when both have happened. If either side goes away first, the permits
//! are dropped unsettled: the resource is in doubt for `in_doubt_grace`.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::gate::Permits;
use crate::token::FencingToken;

/// A fenced request's permits, held until the request is no longer in flight.
#[derive(Debug)]
pub(super) struct InFlight {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
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
    /// Holds `permits` for a request about to be forwarded.
    pub(super) fn new(permits: Permits) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    permits: Some(permits),
                    answered: false,
                    body_sent: false,
                }),
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

    /// The highest token right now, without settling anything.
    pub(super) fn highest(&self) -> Option<FencingToken> {
        self.shared
            .lock()
            .permits
            .as_ref()
            .and_then(Permits::highest)
    }
}

/// Why a request body stopped before its end.
#[derive(Debug, thiserror::Error)]
#[error("the request body was still being sent when the upstream timeout ran out")]
pub(super) struct BodyDeadline;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body on its way upstream: it tells the [`InFlight`] (if any) when it has been sent in
/// full, and gives up at `deadline`, so that a client that drips its body after the upstream has
/// answered cannot keep a resource in flight (and every newer token waiting) for ever.
#[derive(Debug)]
pub(super) struct SentBody<B> {
    inner: B,
    in_flight: Option<Arc<Shared>>,
    deadline: Instant,
    /// Armed on the first wait for more of the body; most bodies never wait.
    timer: Option<Pin<Box<Sleep>>>,
}

impl<B: Body> SentBody<B> {
    /// Wraps `inner`; `in_flight` learns when it has been sent in full.
    pub(super) fn new(inner: B, in_flight: Option<&InFlight>, deadline: Instant) -> Self {
        let body = Self {
            inner,
            in_flight: in_flight.map(|in_flight| Arc::clone(&in_flight.shared)),
            deadline,
            timer: None,
        };
        // An empty body is never polled: it is sent with the head.
        if body.inner.is_end_stream() {
            body.mark_sent();
        }
        body
    }

    fn mark_sent(&self) {
        if let Some(shared) = &self.in_flight {
            let mut state = shared.lock();
            state.body_sent = true;
            state.settle_if_done();
        }
    }
}

impl<B> Body for SentBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.mark_sent();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if this.inner.is_end_stream() {
                    this.mark_sent();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Pending => {
                let deadline = this.deadline;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                ready!(timer.as_mut().poll(cx));
                Poll::Ready(Some(Err(Box::new(BodyDeadline))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use crate::gate::Gate;
    use crate::metrics::Metrics;
    use crate::route::ResourceKey;
    use crate::store::{LastStop, Store};
    use http_body_util::{BodyExt, StreamBody};

    type Chunks =
        StreamBody<tokio_stream::wrappers::ReceiverStream<Result<Frame<Bytes>, BoxError>>>;

    /// A gate on a fresh database, and a resource already at token 1.
    async fn gate() -> (Gate, ResourceKey, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let (store, guard) = Store::open(&dir.path().join("fg.db")).unwrap();
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

    async fn permits(gate: &Gate, resource: &ResourceKey) -> Permits {
        gate.admit_all(resource, &[], FencingToken::new(1), None, "")
            .await
            .unwrap()
    }

    fn streaming() -> (
        tokio::sync::mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
        Chunks,
    ) {
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(receiver));
        (sender, body)
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
        let in_flight = InFlight::new(permits(&gate, &resource).await);
        let (sender, chunks) = streaming();
        let mut body = SentBody::new(
            chunks,
            Some(&in_flight),
            Instant::now() + Duration::from_secs(60),
        );
        sender
            .send(Ok(Frame::data(Bytes::from("part"))))
            .await
            .unwrap();
        body.frame().await.unwrap().unwrap();
        in_flight.answered();
        drop(in_flight);
        assert!(
            !next_token_goes_through(&gate, &resource).await,
            "body still streaming"
        );
        drop(sender);
        assert!(body.frame().await.is_none());
        assert!(
            next_token_goes_through(&gate, &resource).await,
            "sent and answered"
        );
    }

    #[tokio::test]
    async fn a_body_cut_off_after_the_answer_leaves_the_resource_in_doubt() {
        let (gate, resource, _dir) = gate().await;
        let in_flight = InFlight::new(permits(&gate, &resource).await);
        let (_sender, chunks) = streaming();
        let body = SentBody::new(
            chunks,
            Some(&in_flight),
            Instant::now() + Duration::from_secs(60),
        );
        in_flight.answered();
        drop(in_flight);
        drop(body);
        assert!(
            !next_token_goes_through(&gate, &resource).await,
            "in doubt for the grace"
        );
    }

    #[tokio::test]
    async fn an_empty_body_is_sent_with_the_head() {
        let (gate, resource, _dir) = gate().await;
        let in_flight = InFlight::new(permits(&gate, &resource).await);
        let body = SentBody::new(
            http_body_util::Empty::<Bytes>::new(),
            Some(&in_flight),
            Instant::now() + Duration::from_secs(60),
        );
        in_flight.answered();
        assert!(next_token_goes_through(&gate, &resource).await);
        drop(body);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stalls_past_its_deadline_fails() {
        let (_sender, chunks) = streaming();
        let mut body = SentBody::new(chunks, None, Instant::now() + Duration::from_secs(30));
        let error = body.frame().await.unwrap().unwrap_err();
        assert!(error.is::<BodyDeadline>());
    }
}
