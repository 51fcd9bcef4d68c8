//! One request and its response on one upstream connection, driven by the request's own task.
//!
//! There is no connection task and no channel: [`Exchange::poll_head`] writes the request (head
//! and body, interleaved with reading) until the response head arrives, and the
//! [`ResponseBody`] it becomes reads the rest as the client's connection asks for it. If the
//! upstream answers before the request body is all sent (an early `201`, a `413`), the response
//! body goes on sending it as it reads, and ends only once it is sent: the contract counts the
//! request in flight until both have happened ([`BodySent`] says when the last byte was written).
//! At the end the connection goes back to the thread's pool, or is closed if anything about the
//! exchange leaves it in doubt.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use super::stream::UpstreamStream;
use bytes::{Buf, Bytes, BytesMut};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};

use super::pool::{self, Connection};
use super::wire::{
    self, ChunkedDecoder, Decoded, Framing, RequestFraming, ResponseHead, WireError,
};
use crate::proxy::inflight::BodySent;
use crate::server::ClientBody;
use crate::verbatim::{CarriesHeaders, VerbatimHeaders};

/// Bytes read from the upstream per system call, at most.
const READ_CHUNK: usize = 16 * 1024;

/// Body frames are gathered behind the head (or each other) up to this size before a write, so
/// that a small request goes out in one system call.
const COALESCE: usize = 16 * 1024;

/// How long a request with `Expect: 100-continue` holds its body back for the upstream's
/// `100 Continue` before sending it anyway (RFC 9110 §10.1.1: not indefinitely).
const CONTINUE_WAIT: Duration = Duration::from_secs(1);

/// How an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("writing the request failed: {0}")]
    Write(#[source] std::io::Error),
    #[error("reading the response failed: {0}")]
    Read(#[source] std::io::Error),
    #[error("the upstream closed the connection before it answered")]
    ClosedBeforeAnswer,
    #[error("{0}")]
    Response(#[from] WireError),
    #[error("the client's request body failed: {0}")]
    ClientBody(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the client's request body did not match its Content-Length")]
    BodyLength,
    #[error("the request body exceeded the limit")]
    BodyTooLarge,
    #[error("the request body was still being sent when the upstream timeout ran out")]
    BodyDeadline,
    #[error("the upstream sent no response bytes within the read timeout")]
    ReadTimeout,
    #[error(
        "the cluster lease the request was admitted under ran out before all of it was written"
    )]
    LeaseEnded,
}

/// The request's side of an exchange: the head and body still to be written.
#[derive(Debug)]
pub(super) struct Sender {
    /// Bytes framed and waiting to be written.
    pending: BytesMut,
    /// The client's body, until its last frame has been taken.
    body: Option<ClientBody>,
    framing: RequestFraming,
    /// Body bytes taken from the client so far.
    taken: u64,
    max_body: u64,
    /// Bytes of this request the kernel has accepted: zero means the upstream cannot have seen
    /// any of it.
    written: u64,
    /// Told once the last byte has been written.
    sent: Option<BodySent>,
    /// Set while the body waits for `100 Continue`: when to send it anyway.
    held_until: Option<Instant>,
    deadline: Instant,
    /// Armed the first time the sender has to wait; most requests never do.
    timer: Option<Pin<Box<Sleep>>>,
}

impl Sender {
    pub(super) fn new(
        head: BytesMut,
        body: Option<ClientBody>,
        framing: RequestFraming,
        max_body: u64,
        sent: Option<BodySent>,
        expects_continue: bool,
        deadline: Instant,
    ) -> Self {
        let body = body.filter(|_| framing != RequestFraming::None);
        Sender {
            pending: head,
            held_until: (expects_continue && body.is_some())
                .then(|| Instant::now() + CONTINUE_WAIT),
            body,
            framing,
            taken: 0,
            max_body,
            written: 0,
            sent,
            deadline,
            timer: None,
        }
    }

    /// Whether this request could be sent again on another connection, written anew: it has no
    /// body, nobody waits to hear it was sent, and none of it is written yet.
    pub(super) fn replayable(&self) -> bool {
        self.body.is_none() && self.sent.is_none() && self.written == 0
    }

    /// Whether any byte of the request has left fencegate.
    pub(super) fn wrote_anything(&self) -> bool {
        self.written > 0
    }

    /// Whether the body is still held back for `100 Continue`.
    fn held(&self) -> bool {
        self.held_until.is_some()
    }

    /// The upstream said `100 Continue`: the body may go.
    fn release(&mut self) {
        self.held_until = None;
    }

    /// Writes what it can. Ready(Ok) once the whole request has been written.
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut UpstreamStream,
    ) -> Poll<Result<(), ExchangeError>> {
        loop {
            let waiting_for_body = self.gather(cx)?;
            if !self.pending.is_empty() {
                match self.poll_write(cx, stream) {
                    Poll::Ready(result) => {
                        result?;
                        continue;
                    }
                    Poll::Pending => return self.poll_deadline(cx),
                }
            }
            if self.body.is_none() {
                match stream.poll_flush(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(ExchangeError::Write(e))),
                    Poll::Pending => return self.poll_deadline(cx),
                }
                if let Some(sent) = self.sent.take() {
                    sent.sent();
                }
                return Poll::Ready(Ok(()));
            }
            if waiting_for_body || self.held() {
                return self.poll_deadline(cx);
            }
        }
    }

    /// Takes body frames into `pending`, framed, until it holds `COALESCE` bytes, the body ends
    /// or has nothing ready. Returns whether it is waiting on the client's body.
    fn gather(&mut self, cx: &mut Context<'_>) -> Result<bool, ExchangeError> {
        if let Some(until) = self.held_until {
            if Instant::now() < until {
                return Ok(false);
            }
            self.held_until = None;
        }
        while self.pending.len() < COALESCE {
            let Some(body) = self.body.as_mut() else {
                return Ok(false);
            };
            match Pin::new(body).poll_frame(cx) {
                Poll::Pending => return Ok(true),
                Poll::Ready(None) => self.end_body()?,
                Poll::Ready(Some(Err(e))) => return Err(ExchangeError::ClientBody(Box::new(e))),
                Poll::Ready(Some(Ok(frame))) => {
                    // Trailers of a client's chunked body are not forwarded.
                    if let Ok(data) = frame.into_data() {
                        self.take_data(&data)?;
                    }
                }
            }
        }
        Ok(false)
    }

    fn take_data(&mut self, data: &Bytes) -> Result<(), ExchangeError> {
        self.taken += data.len() as u64;
        if self.taken > self.max_body {
            return Err(ExchangeError::BodyTooLarge);
        }
        match self.framing {
            RequestFraming::Length(length) if self.taken > length => {
                return Err(ExchangeError::BodyLength);
            }
            RequestFraming::Chunked => {
                wire::write_chunk(&mut self.pending, data);
            }
            _ => self.pending.extend_from_slice(data),
        }
        Ok(())
    }

    fn end_body(&mut self) -> Result<(), ExchangeError> {
        self.body = None;
        match self.framing {
            RequestFraming::Length(length) if self.taken != length => {
                Err(ExchangeError::BodyLength)
            }
            RequestFraming::Chunked => {
                self.pending.extend_from_slice(wire::LAST_CHUNK);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut UpstreamStream,
    ) -> Poll<Result<(), ExchangeError>> {
        // Every write, not only the first: a process stopped mid-request must not send the rest
        // when it wakes past its lease (see `TermWindow`).
        if self.sent.as_ref().is_some_and(|sent| !sent.may_write()) {
            return Poll::Ready(Err(ExchangeError::LeaseEnded));
        }
        match ready!(stream.poll_write(cx, &self.pending)) {
            Ok(0) => {
                let closed = std::io::Error::from(std::io::ErrorKind::WriteZero);
                Poll::Ready(Err(ExchangeError::Write(closed)))
            }
            Ok(written) => {
                self.written += written as u64;
                self.pending.advance(written);
                Poll::Ready(Ok(()))
            }
            Err(e) => Poll::Ready(Err(ExchangeError::Write(e))),
        }
    }

    /// Pending, unless the exchange's deadline has passed: then the body is given up.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ExchangeError>> {
        let wake_at = match self.held_until {
            Some(until) => until.min(self.deadline),
            None => self.deadline,
        };
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(wake_at)));
        if timer.deadline() != wake_at {
            timer.as_mut().reset(wake_at);
        }
        ready!(timer.as_mut().poll(cx));
        if Instant::now() >= self.deadline {
            return Poll::Ready(Err(ExchangeError::BodyDeadline));
        }
        // The wait for `100 Continue` is over: send the body.
        self.held_until = None;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// A request being exchanged on one connection, until its response head has arrived.
#[derive(Debug)]
pub(super) struct Exchange {
    connection: Connection,
    /// `None` once the whole request has been written (or given up after an early answer).
    sender: Option<Sender>,
    /// A write failure seen while waiting for the head: the answer may still be readable.
    write_failed: Option<ExchangeError>,
    /// Whether the upstream has sent a response head, interim ones included.
    answered: bool,
}

/// How a head could not be had.
#[derive(Debug)]
pub(super) struct HeadFailure {
    pub(super) error: ExchangeError,
    /// The request, if not one byte of it was written: it can go on another connection.
    pub(super) unsent: Option<Sender>,
    /// Whether the upstream sent any byte of an answer.
    pub(super) answered_anything: bool,
}

impl Exchange {
    pub(super) fn new(connection: Connection, sender: Sender) -> Self {
        Exchange {
            connection,
            sender: Some(sender),
            write_failed: None,
            answered: false,
        }
    }

    /// Ready once the exchange's `deadline` has passed.
    pub(super) fn poll_deadline(&mut self, cx: &mut Context<'_>, deadline: Instant) -> Poll<()> {
        self.connection.poll_deadline(cx, deadline)
    }

    pub(super) fn reused(&self) -> bool {
        self.connection.reused
    }

    /// Sends the request and reads until a final response head, skipping interim ones.
    pub(super) fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<ResponseHead, HeadFailure>> {
        let mut interim = 0;
        loop {
            if let Err(error) = self.poll_sender(cx) {
                return Poll::Ready(Err(self.failure(error)));
            }
            match wire::parse_head(&mut self.connection.buffer) {
                Ok(Some(head)) => {
                    self.answered = true;
                    if head.status.is_informational()
                        && head.status != http::StatusCode::SWITCHING_PROTOCOLS
                    {
                        if head.status == http::StatusCode::CONTINUE
                            && let Some(sender) = self.sender.as_mut()
                        {
                            sender.release();
                        }
                        interim += 1;
                        if interim > 16 {
                            return Poll::Ready(
                                Err(self.failure(WireError::TooManyInterim.into())),
                            );
                        }
                        continue;
                    }
                    return Poll::Ready(Ok(head));
                }
                Ok(None) => {}
                Err(e) => return Poll::Ready(Err(self.failure(e.into()))),
            }
            match ready!(poll_read(
                &mut self.connection.stream,
                cx,
                &mut self.connection.buffer
            )) {
                Ok(0) => {
                    let error = match self.write_failed.take() {
                        Some(error) => error,
                        None if self.connection.buffer.is_empty() => {
                            ExchangeError::ClosedBeforeAnswer
                        }
                        None => WireError::Truncated.into(),
                    };
                    return Poll::Ready(Err(self.failure(error)));
                }
                Ok(_) => {}
                Err(e) => {
                    let error = self.write_failed.take().unwrap_or(ExchangeError::Read(e));
                    return Poll::Ready(Err(self.failure(error)));
                }
            }
        }
    }

    /// Moves the request on. A failure stops it; a write failure is reported only if no answer
    /// can be read (the upstream may have answered and closed), any other at once.
    fn poll_sender(&mut self, cx: &mut Context<'_>) -> Result<(), ExchangeError> {
        if self.write_failed.is_some() {
            return Ok(());
        }
        let Some(sender) = self.sender.as_mut() else {
            return Ok(());
        };
        match sender.poll_send(cx, &mut self.connection.stream) {
            Poll::Pending => Ok(()),
            Poll::Ready(Ok(())) => {
                self.sender = None;
                Ok(())
            }
            Poll::Ready(Err(error @ ExchangeError::Write(_))) => {
                self.write_failed = Some(error);
                Ok(())
            }
            Poll::Ready(Err(error)) => Err(error),
        }
    }

    fn failure(&mut self, error: ExchangeError) -> HeadFailure {
        let unsent = self.sender.take().filter(|sender| !sender.wrote_anything());
        HeadFailure {
            error,
            unsent,
            answered_anything: self.answered || !self.connection.buffer.is_empty(),
        }
    }

    /// The response head has arrived: the body that reads the rest, on behalf of `pool_key`'s
    /// pool, and sends what is left of the request after an early answer.
    pub(super) fn into_body(
        self,
        framing: Framing,
        keep_alive: bool,
        pool_key: Arc<str>,
        read_timeout: Duration,
    ) -> ResponseBody {
        // A body held back for `100 Continue` that got a final answer instead is never sent: the
        // request stays in doubt (its body was not sent in full) and the connection is closed.
        // Any other early answer, even with `Connection: close`, gets the rest of the body, as
        // the upstream may read it before closing; the exchange ends once it is written.
        let stop_sending = self.sender.as_ref().is_some_and(Sender::held);
        let sender = self.sender.filter(|_| !stop_sending);
        let reusable = keep_alive && self.write_failed.is_none() && !stop_sending;
        let mut body = Streaming {
            connection: Some(self.connection),
            sender,
            body: match framing {
                Framing::Empty => BodyState::Done,
                Framing::Length(length) => BodyState::Length(length),
                Framing::Chunked => BodyState::Chunked(ChunkedDecoder::default()),
                Framing::UntilClose => BodyState::UntilClose,
            },
            reusable,
            pool_key,
            read_timeout,
            timer: None,
            read_since_armed: false,
            headers: None,
        };
        if body.is_end_stream() {
            body.finish();
        }
        ResponseBody(Box::new(body))
    }
}

/// Reads what is available into `buffer`. Through `AsyncRead`, so that a read that drains the
/// socket clears its readiness: the next request's check that its pooled connection is still open
/// ([`pool::take`]) then costs no system call.
fn poll_read(
    stream: &mut UpstreamStream,
    cx: &mut Context<'_>,
    buffer: &mut BytesMut,
) -> Poll<std::io::Result<usize>> {
    buffer.reserve(READ_CHUNK);
    tokio_util::io::poll_read_buf(Pin::new(stream), cx, buffer)
}

impl Drop for Streaming {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Sends the rest of an early-answered request; the connection is reused only if that works.
async fn finish_sending(
    mut connection: Connection,
    mut sender: Sender,
    reusable: bool,
    pool_key: Arc<str>,
) {
    match std::future::poll_fn(|cx| sender.poll_send(cx, &mut connection.stream)).await {
        Ok(()) if reusable => pool::give_back(&pool_key, connection),
        Ok(()) => {}
        Err(error) => tracing::debug!(%error, "the rest of an early-answered request was not sent"),
    }
}

/// A response body streaming from the upstream connection to the client. Boxed: the response it
/// travels in is moved through every layer of the proxy, and each move copied all of the
/// stream's state (176 bytes, a dozen times per request by a uprobe on memmove).
#[derive(Debug)]
pub struct ResponseBody(Box<Streaming>);

impl ResponseBody {
    /// The body of an HTTP/2 response: no connection of its own to give back (the stream's
    /// connection is shared), the same read timeout.
    pub(super) fn h2(incoming: Incoming, pool_key: Arc<str>, read_timeout: Duration) -> Self {
        ResponseBody(Box::new(Streaming::h2(incoming, pool_key, read_timeout)))
    }

    /// Carries the answer's headers, kept verbatim, to the writer of its head.
    pub(super) fn carry(&mut self, headers: VerbatimHeaders) {
        self.0.headers = Some(headers);
    }
}

impl CarriesHeaders for ResponseBody {
    fn verbatim_headers(&self) -> Option<&VerbatimHeaders> {
        self.0.headers.as_ref()
    }

    fn take_verbatim_headers(&mut self) -> Option<VerbatimHeaders> {
        self.0.headers.take()
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = ExchangeError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        self.0.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}

/// What a [`ResponseBody`] reads, and what it still sends.
#[derive(Debug)]
struct Streaming {
    /// `None` once given back to the pool or closed.
    connection: Option<Connection>,
    /// The rest of an early-answered request, still being sent.
    sender: Option<Sender>,
    body: BodyState,
    /// Whether the connection can carry another request once this exchange ends.
    reusable: bool,
    pool_key: Arc<str>,
    /// The longest wait for the next bytes of the body.
    read_timeout: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    read_since_armed: bool,
    /// The answer's headers, when kept as the upstream sent them: carried by the body, which the
    /// data plane's HTTP/1.1 server writes the answer's head beside.
    headers: Option<VerbatimHeaders>,
}

#[derive(Debug)]
enum BodyState {
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
    Done,
    /// An HTTP/2 response's body, read by hyper's client.
    H2(Incoming),
}

impl Streaming {
    fn h2(incoming: Incoming, pool_key: Arc<str>, read_timeout: Duration) -> Self {
        Streaming {
            connection: None,
            sender: None,
            body: BodyState::H2(incoming),
            reusable: false,
            pool_key,
            read_timeout,
            timer: None,
            read_since_armed: false,
            headers: None,
        }
    }

    /// The next frame of an HTTP/2 body, or a read timeout.
    fn poll_h2(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        let BodyState::H2(incoming) = &mut self.body else {
            return Poll::Ready(None);
        };
        match Pin::new(incoming).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                self.read_since_armed = true;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                Poll::Ready(Some(Err(ExchangeError::Read(std::io::Error::other(e)))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match self.poll_read_timeout(cx) {
                Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
                _ => Poll::Pending,
            },
        }
    }

    /// Ends the exchange: the connection goes back to the pool if the whole response was read
    /// and nothing is left in doubt. The rest of an early-answered request is still sent, by a
    /// task of this thread's that outlives the response (hyper drops a body it has sent in full).
    fn finish(&mut self) {
        let Some(connection) = self.connection.take() else {
            return;
        };
        let reusable =
            self.reusable && matches!(self.body, BodyState::Done) && connection.buffer.is_empty();
        match self.sender.take() {
            None if reusable => pool::give_back(&self.pool_key, connection),
            None => {}
            Some(sender) => {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    let pool_key = Arc::clone(&self.pool_key);
                    runtime.spawn(finish_sending(connection, sender, reusable, pool_key));
                }
            }
        }
    }

    fn poll_sender(&mut self, cx: &mut Context<'_>) {
        let (Some(sender), Some(connection)) = (self.sender.as_mut(), self.connection.as_mut())
        else {
            return;
        };
        match sender.poll_send(cx, &mut connection.stream) {
            Poll::Pending => {}
            Poll::Ready(Ok(())) => self.sender = None,
            Poll::Ready(Err(error)) => {
                tracing::debug!(%error, "the rest of an early-answered request was not sent");
                self.sender = None;
                self.reusable = false;
            }
        }
    }

    /// The next piece of the body from the buffer, if it holds one.
    fn decode(&mut self) -> Result<Option<Decoded>, ExchangeError> {
        let Some(connection) = self.connection.as_mut() else {
            return Ok(Some(Decoded::End));
        };
        let buffer = &mut connection.buffer;
        match &mut self.body {
            BodyState::Done => Ok(Some(Decoded::End)),
            BodyState::Length(left) => {
                if buffer.is_empty() {
                    return Ok(None);
                }
                let take = usize::try_from(*left)
                    .unwrap_or(usize::MAX)
                    .min(buffer.len());
                *left -= take as u64;
                if *left == 0 {
                    self.body = BodyState::Done;
                }
                Ok(Some(Decoded::Data(buffer.split_to(take).freeze())))
            }
            BodyState::Chunked(decoder) => {
                let decoded = decoder.decode(buffer)?;
                // Trailers end the body too: hyper drops a body once it has sent its trailers.
                if decoder.is_done() {
                    self.body = BodyState::Done;
                }
                Ok(decoded)
            }
            BodyState::UntilClose if buffer.is_empty() => Ok(None),
            BodyState::UntilClose => Ok(Some(Decoded::Data(buffer.split().freeze()))),
            // Read by `poll_h2`, never from a connection buffer.
            BodyState::H2(_) => Ok(Some(Decoded::End)),
        }
    }

    fn poll_more(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ExchangeError>> {
        let Some(connection) = self.connection.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        match poll_read(&mut connection.stream, cx, &mut connection.buffer) {
            Poll::Ready(Ok(0)) => match self.body {
                BodyState::UntilClose => {
                    self.body = BodyState::Done;
                    Poll::Ready(Ok(()))
                }
                _ => Poll::Ready(Err(WireError::Truncated.into())),
            },
            Poll::Ready(Ok(_)) => {
                self.read_since_armed = true;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(ExchangeError::Read(e))),
            Poll::Pending => self.poll_read_timeout(cx),
        }
    }

    /// Pending, unless no bytes have come for `read_timeout`: a slow-loris upstream.
    fn poll_read_timeout(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ExchangeError>> {
        let timeout = self.read_timeout;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if std::mem::take(&mut self.read_since_armed) {
            timer.as_mut().reset(Instant::now() + timeout);
        }
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(Err(ExchangeError::ReadTimeout))
    }
}

/// What [`ResponseBody`]'s `Body` does, on the state it points to.
impl Streaming {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        if let BodyState::H2(_) = self.body {
            return self.poll_h2(cx);
        }
        loop {
            self.poll_sender(cx);
            match self.decode() {
                Ok(Some(Decoded::Data(data))) => {
                    if self.is_end_stream() {
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Some(Decoded::Trailers(trailers))) => {
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Ok(Some(Decoded::End)) => {
                    self.finish();
                    return Poll::Ready(None);
                }
                Ok(None) => {}
                Err(e) => {
                    self.connection = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            if let Err(e) = ready!(self.poll_more(cx)) {
                self.connection = None;
                return Poll::Ready(Some(Err(e)));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.body {
            BodyState::Done => true,
            BodyState::H2(incoming) => incoming.is_end_stream(),
            _ => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.body {
            BodyState::Length(left) => SizeHint::with_exact(*left),
            BodyState::Done => SizeHint::with_exact(0),
            BodyState::H2(incoming) => incoming.size_hint(),
            _ => SizeHint::default(),
        }
    }
}
