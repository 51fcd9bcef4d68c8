//! Per-connection limits that hyper does not enforce by itself: a deadline for reading a request
//! head that starts with its first byte (slowloris), measured by wrapping the connection's socket.
//!
//! hyper's own `header_read_timeout` starts as soon as a connection is ready for a request, so it
//! bounds idle keep-alive connections; fencegate uses it as `idle_timeout`. [`HeadDeadline`] adds
//! the tighter `header_read_timeout`, from a request's first byte until the service is called.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Whether a connection is inside a request (its head has been read and the service has not
/// answered yet). Shared by the connection's socket wrapper and its service.
#[derive(Debug, Default)]
pub(super) struct RequestPhase {
    in_request: AtomicBool,
    /// How many requests the service has begun: a head deadline armed before the latest one
    /// began belongs to a head that has since arrived.
    begun: AtomicU64,
}

impl RequestPhase {
    /// Marks the connection as inside a request until the returned guard is dropped.
    pub(super) fn begin(self: &Arc<Self>) -> InRequest {
        self.in_request.store(true, Ordering::Relaxed);
        self.begun.fetch_add(1, Ordering::Relaxed);
        InRequest(Arc::clone(self))
    }

    fn in_request(&self) -> bool {
        self.in_request.load(Ordering::Relaxed)
    }

    fn begun(&self) -> u64 {
        self.begun.load(Ordering::Relaxed)
    }
}

/// Held while the service answers a request.
#[derive(Debug)]
pub(super) struct InRequest(Arc<RequestPhase>);

impl Drop for InRequest {
    fn drop(&mut self) {
        self.0.in_request.store(false, Ordering::Relaxed);
    }
}

/// A socket whose request heads must arrive within `limit` of their first byte. Bytes read
/// between requests arm the deadline; the service's [`InRequest`] disarms it. Once it passes,
/// reads fail with `TimedOut` and hyper closes the connection.
#[derive(Debug)]
pub(super) struct HeadDeadline<T> {
    io: T,
    limit: Duration,
    phase: Arc<RequestPhase>,
    /// Created on first use: most connections never need it.
    deadline: Option<Pin<Box<Sleep>>>,
    /// The number of requests begun when the deadline was armed, if it is.
    armed: Option<u64>,
    /// The number of requests begun when bytes of a head were last read, before it was armed.
    head_started: Option<u64>,
}

impl<T> HeadDeadline<T> {
    pub(super) fn new(io: T, limit: Duration, phase: Arc<RequestPhase>) -> Self {
        Self {
            io,
            limit,
            phase,
            deadline: None,
            armed: None,
            head_started: None,
        }
    }

    fn arm(&mut self, cx: &mut Context<'_>) {
        let at = Instant::now() + self.limit;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        deadline.as_mut().reset(at);
        // Registers this task's waker, so the deadline wakes a connection nobody else polls.
        let _ = deadline.as_mut().poll(cx);
        self.armed = Some(self.phase.begun());
    }

    /// Whether the head being read has taken too long; disarms once its request has begun.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        if self.armed != Some(self.phase.begun()) {
            self.armed = None;
            return false;
        }
        self.deadline
            .as_mut()
            .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready())
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for HeadDeadline<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.expired(cx) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request head not received within header_read_timeout",
            )));
        }
        // A head that needs another read did not arrive whole: its deadline starts now, a moment
        // after its first byte. Most heads arrive in one read and never arm it (a timer reset
        // and a clock read saved on every request).
        if this.armed.is_none()
            && this.head_started == Some(this.phase.begun())
            && !this.phase.in_request()
        {
            this.arm(cx);
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        let got_bytes = buf.filled().len() > before;
        if got_bytes && this.armed.is_none() && !this.phase.in_request() {
            this.head_started = Some(this.phase.begun());
        }
        read
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for HeadDeadline<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
