//! Keep-alive connections to upstreams, one pool per data-plane thread.
//!
//! The pool is thread-local: a data-plane thread runs one current-thread runtime, so a request,
//! its upstream connection and the pool it comes from and goes back to are all on that thread.
//! Taking and giving back a connection is a `RefCell` borrow: no lock, no channel, no other
//! thread involved. (The types stay `Send` only because tokio's `spawn` asks for it.)

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use super::stream::UpstreamStream;
use crate::idle::IdleSince;
use bytes::BytesMut;
use tokio::time::Sleep;

/// How long an idle connection is kept. Shorter than the keep-alive timeouts storage commonly
/// uses (Node's 5 s, nginx's 75 s), so that the upstream rarely closes a connection fencegate
/// is about to reuse; the check in [`take`] catches most of the rest.
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// The most idle connections kept per upstream and thread; more are closed.
const MAX_IDLE_PER_UPSTREAM: usize = 256;

/// An open HTTP/1.1 connection to an upstream, between requests.
#[derive(Debug)]
pub(super) struct Connection {
    pub(super) stream: UpstreamStream,
    /// Bytes read past the end of the last response: always empty between requests, since a
    /// response that leaves any makes the connection unusable; kept for its allocation.
    pub(super) buffer: BytesMut,
    /// Whether it has carried a request before (a reused connection may have been closed by the
    /// upstream in the meantime).
    pub(super) reused: bool,
    /// The timer behind the exchange deadline, kept from one request to the next (see
    /// [`Connection::poll_deadline`]).
    pub(super) deadline_timer: Option<Pin<Box<Sleep>>>,
}

impl Connection {
    pub(super) fn new(stream: UpstreamStream) -> Connection {
        Connection {
            stream,
            buffer: BytesMut::new(),
            reused: false,
            deadline_timer: None,
        }
    }

    /// Ready once `deadline` has passed. The timer is moved only when it fires before the
    /// deadline it serves (it still holds an earlier request's) or when it would fire after it:
    /// with one timeout for every request, that is about once per timeout period, where
    /// re-arming it for every request cost a timer-wheel insertion and removal each.
    pub(super) fn poll_deadline(
        &mut self,
        cx: &mut Context<'_>,
        deadline: tokio::time::Instant,
    ) -> Poll<()> {
        let timer = self
            .deadline_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() > deadline {
            timer.as_mut().reset(deadline);
        }
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if tokio::time::Instant::now() >= deadline {
                return Poll::Ready(());
            }
            timer.as_mut().reset(deadline);
        }
    }
}

#[derive(Debug)]
struct Idle {
    connection: Connection,
    since: IdleSince,
}

/// The idle connections of one thread, by upstream. Hashed with foldhash, not std's SipHash:
/// the keys are the configured upstreams' authorities, never a client's input, so there is no
/// flooding to resist, and SipHash cost two hashes of 250 instructions on every request (a take
/// and a keep; callgrind).
type Pool = HashMap<String, Vec<Idle>, foldhash::fast::FixedState>;

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

/// An idle connection to `upstream` (its `host:port`) that still looks open, most recently used
/// first; expired or closed ones found on the way are dropped.
pub(super) fn take(upstream: &str) -> Option<Connection> {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let idle = pool.get_mut(upstream)?;
        let now = IdleSince::now();
        while let Some(Idle { connection, since }) = idle.pop() {
            if since.until(now) < IDLE_TIMEOUT && connection.stream.still_open() {
                return Some(connection);
            }
        }
        None
    })
}

/// Gives a connection whose exchange ended cleanly back for the next request to `upstream`.
pub(super) fn give_back(upstream: &str, mut connection: Connection) {
    connection.reused = true;
    keep(upstream, connection);
}

/// Puts a connection that has carried nothing yet where the request that opened it takes it at
/// once (an upstream's first connection, opened to learn what its ALPN chooses). Not marked
/// reused: a failure on it is not a stale connection's, and is not retried.
pub(super) fn offer_new(upstream: &str, connection: Connection) {
    keep(upstream, connection);
}

/// Whether an idle connection to `upstream` is kept (expired or closed ones included).
pub(super) fn has_idle(upstream: &str) -> bool {
    POOL.with(|pool| {
        pool.borrow()
            .get(upstream)
            .is_some_and(|idle| !idle.is_empty())
    })
}

fn keep(upstream: &str, connection: Connection) {
    let now = IdleSince::now();
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let idle = match pool.get_mut(upstream) {
            Some(idle) => idle,
            None => pool.entry(upstream.to_owned()).or_default(),
        };
        // The oldest are at the front; they expire first.
        let expired = idle
            .iter()
            .take_while(|i| i.since.until(now) >= IDLE_TIMEOUT)
            .count();
        idle.drain(..expired);
        if idle.len() >= MAX_IDLE_PER_UPSTREAM {
            idle.remove(0);
        }
        idle.push(Idle {
            connection,
            since: now,
        });
    });
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;
    use tokio::net::TcpStream;

    async fn connection() -> (Connection, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (Connection::new(UpstreamStream::Plain(client)), server)
    }

    async fn passed(connection: &mut Connection, deadline: Instant) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(connection.poll_deadline(cx, deadline).is_ready()))
            .await
    }

    #[tokio::test]
    async fn connections_given_back_together_are_all_kept_until_they_expire() {
        let upstream = "connections-given-back-together:1";
        let (first, _first_peer) = connection().await;
        let (second, _second_peer) = connection().await;
        give_back(upstream, first);
        give_back(upstream, second);
        assert!(take(upstream).is_some());
        assert!(take(upstream).is_some(), "a fresh connection was dropped");
        assert!(take(upstream).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_timer_kept_from_an_earlier_request_fires_neither_early_nor_late() {
        let (mut connection, _peer) = connection().await;
        let timeout = Duration::from_secs(1);
        let first = Instant::now() + timeout;
        assert!(!passed(&mut connection, first).await);
        tokio::time::advance(timeout).await;
        assert!(passed(&mut connection, first).await);

        // The next request's deadline is later: the timer, which has fired, must not say so.
        let second = Instant::now() + timeout;
        assert!(!passed(&mut connection, second).await);
        tokio::time::advance(timeout / 2).await;
        assert!(!passed(&mut connection, second).await);
        tokio::time::advance(timeout / 2).await;
        assert!(passed(&mut connection, second).await);

        // An earlier deadline than the timer holds moves it forward.
        let late = Instant::now() + timeout;
        assert!(!passed(&mut connection, late).await);
        let early = Instant::now() + Duration::from_millis(10);
        assert!(!passed(&mut connection, early).await);
        tokio::time::advance(Duration::from_millis(10)).await;
        assert!(passed(&mut connection, early).await);
    }
}
