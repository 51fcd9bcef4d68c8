//! HTTP/2 to an `https://` upstream that chose `h2` by ALPN, through hyper's HTTP/2 client.
//!
//! Each data-plane thread keeps at most one HTTP/2 connection per upstream and multiplexes its
//! requests on it. The contract's "in flight" holds as on HTTP/1.1: [`SentBody`] tells the
//! request's [`BodySent`] once hyper has taken the body's last frame (or the whole request was its
//! headers), and a stream that is reset, or a connection that fails, drops it untold: in doubt.

use std::cell::RefCell;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::ForwardError;
use super::exchange::ExchangeError;
use super::wire::RequestFraming;
use crate::proxy::inflight::BodySent;
use crate::server::ClientBody;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// What this thread knows of an upstream that may choose HTTP/2.
enum Known {
    /// Its HTTP/2 connection.
    H2(SendRequest<SentBody>),
    /// A request is connecting: the others wait for it rather than each open a connection of
    /// their own, since the answer may be one HTTP/2 connection for all of them.
    Connecting(Arc<Notify>),
    /// It chose HTTP/1.1 last time.
    Http1,
}

thread_local! {
    /// This thread's knowledge of upstreams that may choose HTTP/2, by pool key.
    static KNOWN: RefCell<HashMap<Arc<str>, Known>> = RefCell::new(HashMap::new());
}

/// How the next request to `pool_key` goes, as far as this thread knows.
pub(super) enum Next {
    H2(SendRequest<SentBody>),
    /// Wait for the request that is connecting, then ask again.
    Wait(Arc<Notify>),
    /// HTTP/1.1: an idle connection, else a new one.
    Http1,
    /// Nobody knows yet: connect, and tell the others through the guard.
    Connect(Connecting),
}

/// Asks what this thread knows of `pool_key`. A closed HTTP/2 connection is forgotten.
pub(super) fn next(pool_key: &Arc<str>) -> Next {
    KNOWN.with(|known| {
        let mut known = known.borrow_mut();
        match known.get(pool_key) {
            Some(Known::H2(sender)) if !sender.is_closed() => return Next::H2(sender.clone()),
            Some(Known::Connecting(notify)) => return Next::Wait(Arc::clone(notify)),
            Some(Known::Http1) => return Next::Http1,
            Some(Known::H2(_)) | None => {}
        }
        let notify = Arc::new(Notify::new());
        known.insert(Arc::clone(pool_key), Known::Connecting(Arc::clone(&notify)));
        Next::Connect(Connecting {
            pool_key: Arc::clone(pool_key),
            notify,
            settled: false,
        })
    })
}

/// Forgets what this thread knew of `pool_key`.
pub(super) fn forget(pool_key: &Arc<str>) {
    KNOWN.with(|known| known.borrow_mut().remove(pool_key));
}

/// The request that connects to an upstream for this thread. Whatever happens to it, the
/// requests waiting for it are woken: with the connection's protocol known, or, if it failed or
/// was dropped, with nothing known, so that one of them tries again.
pub(super) struct Connecting {
    pool_key: Arc<str>,
    notify: Arc<Notify>,
    settled: bool,
}

impl Connecting {
    /// The upstream chose HTTP/1.1.
    pub(super) fn chose_http1(mut self) {
        self.settle(Some(Known::Http1));
    }

    /// Starts HTTP/2 on a TLS connection whose ALPN chose `h2`; this thread's next requests to
    /// the upstream share it. Its connection task runs on this thread's runtime.
    pub(super) async fn start_h2(
        mut self,
        stream: Box<TlsStream<TcpStream>>,
    ) -> Result<SendRequest<SentBody>, ForwardError> {
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ForwardError::NotSent(ExchangeError::Write(std::io::Error::other(e))))?;
        let upstream = Arc::clone(&self.pool_key);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, %upstream, "HTTP/2 connection to the upstream ended");
            }
        });
        self.settle(Some(Known::H2(sender.clone())));
        Ok(sender)
    }

    fn settle(&mut self, known: Option<Known>) {
        self.settled = true;
        KNOWN.with(|map| {
            let mut map = map.borrow_mut();
            match known {
                Some(known) => {
                    map.insert(Arc::clone(&self.pool_key), known);
                }
                None => {
                    map.remove(&self.pool_key);
                }
            }
        });
        self.notify.notify_waiters();
    }
}

impl Drop for Connecting {
    fn drop(&mut self) {
        if !self.settled {
            self.settle(None);
        }
    }
}

/// Sends `request` on `sender` and waits, until `deadline`, for the response head.
pub(super) async fn exchange(
    mut sender: SendRequest<SentBody>,
    request: Request<SentBody>,
    limits: Arc<BodyLimits>,
    deadline: Instant,
) -> Result<Response<Incoming>, ForwardError> {
    let exchanged = tokio::time::timeout_at(deadline, async {
        // Waiting for a stream slot sends nothing: a failure here leaves nothing in doubt.
        sender
            .ready()
            .await
            .map_err(|e| ForwardError::NotSent(ExchangeError::Write(std::io::Error::other(e))))?;
        // The last look before the stream opens (its headers go out on hyper's connection task):
        // the wait for a stream slot may have outlasted the lease.
        if request.body().lease_ran_out() {
            return Err(ForwardError::NotSent(ExchangeError::LeaseEnded));
        }
        sender
            .send_request(request)
            .await
            .map_err(|e| limits.failure(e))
    });
    match exchanged.await {
        Ok(result) => result,
        Err(_) => Err(limits.timed_out()),
    }
}

/// What a request body may be, checked as hyper takes it, and what went wrong if it was not.
#[derive(Debug)]
pub(super) struct BodyLimits {
    framing: RequestFraming,
    max_body: u64,
    too_large: AtomicBool,
    wrong_length: AtomicBool,
    client_failed: AtomicBool,
    lease_ended: AtomicBool,
}

impl BodyLimits {
    pub(super) fn new(framing: RequestFraming, max_body: u64) -> Arc<BodyLimits> {
        Arc::new(BodyLimits {
            framing,
            max_body,
            too_large: AtomicBool::new(false),
            wrong_length: AtomicBool::new(false),
            client_failed: AtomicBool::new(false),
            lease_ended: AtomicBool::new(false),
        })
    }

    /// The failure of an exchange whose stream hyper reported failed: the body's own, if it
    /// broke a limit, else the upstream's (it may have received the request: in doubt).
    fn failure(&self, error: hyper::Error) -> ForwardError {
        if self.too_large.load(Ordering::Relaxed) {
            return ForwardError::BodyTooLarge;
        }
        if self.wrong_length.load(Ordering::Relaxed) {
            return ForwardError::Exchange(ExchangeError::BodyLength);
        }
        if self.lease_ended.load(Ordering::Relaxed) {
            return ForwardError::Exchange(ExchangeError::LeaseEnded);
        }
        if self.client_failed.load(Ordering::Relaxed) {
            return ForwardError::Exchange(ExchangeError::ClientBody(Box::new(error)));
        }
        ForwardError::Exchange(ExchangeError::Read(std::io::Error::other(error)))
    }

    fn timed_out(&self) -> ForwardError {
        ForwardError::Timeout
    }
}

/// The request body as hyper's HTTP/2 client takes it: counted against `max_body` and the
/// declared length, and telling [`BodySent`] when it has all been taken.
pub(super) struct SentBody {
    inner: Option<ClientBody>,
    limits: Arc<BodyLimits>,
    taken: u64,
    sent: Option<BodySent>,
}

impl SentBody {
    pub(super) fn new(
        inner: ClientBody,
        limits: Arc<BodyLimits>,
        sent: Option<BodySent>,
    ) -> SentBody {
        // A body framed as nothing is sent as nothing, whatever the client's body held.
        let inner = (limits.framing != RequestFraming::None).then_some(inner);
        SentBody {
            inner,
            limits,
            taken: 0,
            sent,
        }
    }

    fn fail(
        &mut self,
        flag: &AtomicBool,
        error: ExchangeError,
    ) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        flag.store(true, Ordering::Relaxed);
        self.inner = None;
        // Dropped untold: the stream is reset, the request in doubt.
        self.sent = None;
        Poll::Ready(Some(Err(error)))
    }

    fn ended(&mut self) {
        if let Some(sent) = self.sent.take() {
            sent.sent();
        }
    }

    /// Whether a cluster lease the request was admitted under has run out: then neither another
    /// frame nor the end of the stream goes, and hyper resets the stream, so that the upstream
    /// never holds the whole request. (hyper writes the frame on its connection task, a poll
    /// later: a looser check than HTTP/1.1's, which is made in the poll that writes.)
    fn lease_ran_out(&self) -> bool {
        self.sent.as_ref().is_some_and(|sent| !sent.may_write())
    }
}

impl Body for SentBody {
    type Data = Bytes;
    type Error = ExchangeError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        let this = &mut *self;
        loop {
            let Some(inner) = this.inner.as_mut() else {
                this.ended();
                return Poll::Ready(None);
            };
            let polled = ready!(Pin::new(inner).poll_frame(cx));
            if this.lease_ran_out() {
                let limits = Arc::clone(&this.limits);
                return this.fail(&limits.lease_ended, ExchangeError::LeaseEnded);
            }
            let frame = match polled {
                None => {
                    this.inner = None;
                    if let RequestFraming::Length(length) = this.limits.framing
                        && this.taken != length
                    {
                        let limits = Arc::clone(&this.limits);
                        return this.fail(&limits.wrong_length, ExchangeError::BodyLength);
                    }
                    this.ended();
                    return Poll::Ready(None);
                }
                Some(Err(e)) => {
                    let limits = Arc::clone(&this.limits);
                    return this.fail(
                        &limits.client_failed,
                        ExchangeError::ClientBody(Box::new(e)),
                    );
                }
                Some(Ok(frame)) => frame,
            };
            // Trailers of a client's body are not forwarded, as on HTTP/1.1.
            let Ok(data) = frame.into_data() else {
                continue;
            };
            this.taken += data.len() as u64;
            let limits = Arc::clone(&this.limits);
            if this.taken > limits.max_body {
                return this.fail(&limits.too_large, ExchangeError::BodyTooLarge);
            }
            if let RequestFraming::Length(length) = limits.framing
                && this.taken > length
            {
                return this.fail(&limits.wrong_length, ExchangeError::BodyLength);
            }
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        match self.limits.framing {
            RequestFraming::Length(length) => SizeHint::with_exact(length - self.taken.min(length)),
            _ => self
                .inner
                .as_ref()
                .map_or(SizeHint::with_exact(0), Body::size_hint),
        }
    }
}

/// hyper drops a body it has sent in full without polling its end (a request that is only
/// headers, or a body that said it had ended): that is sent too. Dropped before its end (a reset
/// stream, a failed connection), it leaves the request in doubt.
impl Drop for SentBody {
    fn drop(&mut self) {
        if self.is_end_stream() {
            self.ended();
        }
    }
}

/// The request head for HTTP/2: the headers an HTTP/1.1 upstream would get (written by the
/// same function, so that both follow one policy), less `Host` (HTTP/2 carries the authority
/// in the URI) and `Expect` (hyper's HTTP/2 client does not wait for `100 Continue`).
pub(super) fn headers_from_lines(lines: &[u8]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for line in lines.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii_start());
        let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name),
            http::HeaderValue::from_bytes(value),
        ) else {
            continue;
        };
        if name == http::header::HOST || name == http::header::EXPECT {
            continue;
        }
        headers.append(name, value);
    }
    headers
}
