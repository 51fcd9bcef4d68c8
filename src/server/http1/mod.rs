//! The data plane's HTTP/1.1 server: one connection, its requests one after another.
//!
//! fencegate reads its clients' requests itself instead of through hyper's server, which cost
//! about a fifth of the hot path (its dispatcher, a timer reset per request, header maps built
//! and dropped twice; bench/compare.sh). What it does, in order, for each request:
//!
//! 1. Read a head ([`head`]): within `idle_timeout` of the previous answer for its first byte,
//!    then within `header_read_timeout` of that byte for the rest (slowloris). Refused heads are
//!    answered with problem+json and the connection closed.
//! 2. Lend the connection's read side to the request's body ([`body`]), which gives it back when
//!    its last byte is decoded.
//! 3. Call the handler, write its response ([`response`]), and take the read side back. A body
//!    left unread (the response then says `close`), a response that said `close`, HTTP/1.0
//!    without keep-alive, or a stop closes the connection, gracefully: the write side is shut
//!    and what the client still sends is read and dropped for a moment, so that its answer is
//!    not destroyed by a reset.
//!
//! A connection that opens with HTTP/2's preface is handed back to the caller, for hyper's h2.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::Response;
use hyper::body::Body;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::idle::IdleSince;
use crate::verbatim::CarriesHeaders;

mod body;
pub mod head;
mod response;

pub use body::{ClientBody, ClientBodyError, ClientRequest, RequestBody};
use body::{ReadSide, Returned};
use head::{BodyFraming, RequestHead};
pub use head::{HeadError, HeadLimits};
use response::{Asked, Writer};

/// HTTP/2's connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How much is read from the socket at a time.
const READ_SIZE: usize = 8 * 1024;

/// How long a closing connection reads and drops what the client still sends.
const LINGER: Duration = Duration::from_millis(500);

/// The most a closing connection reads and drops.
const LINGER_BYTES: usize = 256 * 1024;

/// A connection's limits.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub head: HeadLimits,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
}

/// How a connection ended.
#[derive(Debug)]
pub enum Ended {
    Closed,
    /// The client opened with HTTP/2's preface: the socket, and the bytes already read from it.
    Http2 {
        stream: TcpStream,
        read: Bytes,
    },
}

/// What waiting for a head came to.
enum NextHead {
    Head(RequestHead),
    Http2,
    /// The client closed, went idle past `idle_timeout`, or the server is stopping.
    Gone,
    /// The head did not arrive within `header_read_timeout`, or the socket failed.
    Failed,
    Refused(HeadError),
}

/// Serves the HTTP/1.1 requests of one connection with `handle`, until it closes or `stop`.
pub async fn serve<H, F, B>(
    stream: TcpStream,
    settings: Settings,
    stop: CancellationToken,
    mut handle: H,
) -> Ended
where
    H: FnMut(ClientRequest) -> F,
    F: Future<Output = Response<B>>,
    B: Body<Data = Bytes> + CarriesHeaders,
    B::Error: std::fmt::Display,
{
    let (read, write) = stream.into_split();
    let mut side = Some(ReadSide {
        read,
        buf: BytesMut::with_capacity(READ_SIZE),
    });
    let mut writer = Writer::new(write, settings.idle_timeout);
    let mut waiting = Waiting::new(settings, stop.clone());
    let mut first = true;
    loop {
        let Some(current) = side.as_mut() else {
            return Ended::Closed;
        };
        let head = match waiting.next_head(current, first).await {
            NextHead::Head(head) => head,
            NextHead::Http2 => {
                let Some(ReadSide { read, buf }) = side.take() else {
                    return Ended::Closed;
                };
                return match read.reunite(writer.into_inner()) {
                    Ok(stream) => Ended::Http2 {
                        stream,
                        read: buf.freeze(),
                    },
                    Err(_) => Ended::Closed,
                };
            }
            NextHead::Gone | NextHead::Failed => return Ended::Closed,
            NextHead::Refused(error) => {
                refuse(&mut writer, &error).await;
                linger_and_close(side, writer).await;
                return Ended::Closed;
            }
        };
        first = false;
        let RequestHead {
            mut request,
            framing,
            keep_alive,
            expect_continue,
        } = head;
        let asked = Asked::of(&request, keep_alive && !stop.is_cancelled());
        let (body, returned) = match (framing, side.take()) {
            (BodyFraming::None, taken) => {
                side = taken;
                (ClientBody::Empty, None)
            }
            (BodyFraming::Length(_) | BodyFraming::Chunked, None) => return Ended::Closed,
            (framing, Some(lent)) => {
                let length = match framing {
                    BodyFraming::Length(length) => Some(length),
                    _ => None,
                };
                let (back, returned) = oneshot::channel();
                let body = RequestBody::new(lent, length, expect_continue, back);
                (ClientBody::Http1(body), Some(returned))
            }
        };
        *request.body_mut() = body;
        let response = handle(request).await;
        let mut returned = returned.map(BodyReturn::Pending);
        // A body the handler dropped unread ends the connection: say so in this response, or
        // the client would send its next request into a socket that is closing.
        let asked = match returned.as_mut().map(BodyReturn::poll_now) {
            Some(Some(false)) => asked.closing(),
            _ => asked,
        };
        let mut keep_alive = match writer.respond(response, asked).await {
            Ok(keep_alive) => keep_alive,
            Err(e) => {
                tracing::debug!(error = %e, "response not written whole; connection closed");
                return Ended::Closed;
            }
        };
        if let Some(returned) = returned {
            match returned.wait().await {
                Some(Returned {
                    side: back,
                    complete,
                }) => {
                    keep_alive &= complete;
                    side = Some(back);
                }
                None => return Ended::Closed,
            }
        }
        if !keep_alive || stop.is_cancelled() {
            linger_and_close(side, writer).await;
            return Ended::Closed;
        }
        waiting.answered();
    }
}

/// The read side on its way back from a request's body.
enum BodyReturn {
    Pending(oneshot::Receiver<Returned>),
    Back(Option<Returned>),
}

impl BodyReturn {
    /// Whether the body has come back complete, if it has come back yet. A body still held (by a
    /// task finishing an upload the upstream answered early) is waited for after the response.
    fn poll_now(&mut self) -> Option<bool> {
        if let BodyReturn::Pending(receiver) = self {
            match receiver.try_recv() {
                Ok(returned) => *self = BodyReturn::Back(Some(returned)),
                Err(oneshot::error::TryRecvError::Closed) => *self = BodyReturn::Back(None),
                Err(oneshot::error::TryRecvError::Empty) => return None,
            }
        }
        match self {
            BodyReturn::Back(Some(returned)) => Some(returned.complete),
            BodyReturn::Back(None) => Some(false),
            BodyReturn::Pending(_) => None,
        }
    }

    /// The read side, once the body gives it back; `None` if it never will.
    async fn wait(self) -> Option<Returned> {
        match self {
            BodyReturn::Pending(receiver) => receiver.await.ok(),
            BodyReturn::Back(returned) => returned,
        }
    }
}

/// Answers a refused head with problem+json.
async fn refuse(writer: &mut Writer, error: &HeadError) {
    let title = match error.status().as_u16() {
        431 => "Request head too large",
        501 => "Transfer coding not implemented",
        _ => "Malformed request",
    };
    let response = crate::problem::response(error.status(), error.slug(), title, error.to_string());
    let asked = Asked {
        head: false,
        version: http::Version::HTTP_11,
        keep_alive: false,
    };
    if let Err(e) = writer.respond(response, asked).await {
        tracing::debug!(error = %e, "refusal not written");
    }
}

/// Shuts the write side, then reads and drops what the client still sends for a moment: closing
/// a socket with unread bytes resets it, and a reset can destroy the answer before the client
/// reads it.
async fn linger_and_close(side: Option<ReadSide>, writer: Writer) {
    let mut write = writer.into_inner();
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut write).await;
    let Some(ReadSide { mut read, mut buf }) = side else {
        return;
    };
    let drain = async {
        let mut drained = 0;
        while drained < LINGER_BYTES {
            buf.clear();
            buf.reserve(READ_SIZE);
            match tokio::io::AsyncReadExt::read_buf(&mut read, &mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(read) => drained += read,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// What is left of an idle timeout when its timer fires that is not waited for: the idle stamp
/// is only as exact as the coarse clock's tick (1 to 10 ms, by the kernel's HZ), and a timer
/// re-armed for less could fire again and again before that clock moved.
const IDLE_SLACK: Duration = Duration::from_millis(10);

/// Waiting for the next head: the idle timeout, the head deadline, and the server's stop.
struct Waiting {
    settings: Settings,
    /// Fires at or after the idle deadline. Moved forward lazily, only when it fires early: a
    /// timer reset on every request would cost more than the request's own parsing.
    idle: Pin<Box<Sleep>>,
    /// On the coarse clock: stamped after every answer, read only when the timer fires.
    idle_since: IdleSince,
    stop: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Waiting {
    fn new(settings: Settings, stop: CancellationToken) -> Waiting {
        Waiting {
            settings,
            idle: Box::pin(tokio::time::sleep(settings.idle_timeout)),
            idle_since: IdleSince::now(),
            stop: Box::pin(stop.cancelled_owned()),
        }
    }

    /// The previous request was answered: the connection is idle from now.
    fn answered(&mut self) {
        self.idle_since = IdleSince::now();
    }

    async fn next_head(&mut self, side: &mut ReadSide, first: bool) -> NextHead {
        let mut deadline: Option<Pin<Box<Sleep>>> = None;
        loop {
            if !side.buf.is_empty() {
                if first
                    && H2_PREFACE.starts_with(&side.buf[..side.buf.len().min(H2_PREFACE.len())])
                {
                    if side.buf.len() >= H2_PREFACE.len() {
                        return NextHead::Http2;
                    }
                } else {
                    match head::parse(&mut side.buf, self.settings.head) {
                        Ok(Some(head)) => return NextHead::Head(head),
                        Ok(None) => {}
                        Err(e) => return NextHead::Refused(e),
                    }
                }
                // Part of a head: the rest must come within header_read_timeout.
                if deadline.is_none() {
                    let limit = self.settings.header_read_timeout;
                    deadline = Some(Box::pin(tokio::time::sleep(limit)));
                }
            }
            side.buf.reserve(READ_SIZE);
            let started = !side.buf.is_empty();
            let read = poll_fn(|cx| {
                let read =
                    tokio_util::io::poll_read_buf(Pin::new(&mut side.read), cx, &mut side.buf);
                if let Poll::Ready(read) = read {
                    return Poll::Ready(Some(read));
                }
                if let Some(deadline) = deadline.as_mut() {
                    return deadline.as_mut().poll(cx).map(|()| None);
                }
                if !started && self.stop.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Some(Ok(0)));
                }
                self.poll_idle(cx).map(|()| Some(Ok(0)))
            })
            .await;
            match read {
                Some(Ok(0)) if side.buf.is_empty() => return NextHead::Gone,
                // Closed in the middle of a head, or the head deadline passed.
                Some(Ok(0)) | None => return NextHead::Failed,
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "reading a request head failed");
                    return NextHead::Failed;
                }
            }
        }
    }

    /// Ready once the connection has been idle for `idle_timeout`.
    fn poll_idle(&mut self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        loop {
            if self.idle.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let idle_for = self.idle_since.elapsed();
            match self.settings.idle_timeout.checked_sub(idle_for) {
                Some(left) if left > IDLE_SLACK => {
                    self.idle.as_mut().reset(Instant::now() + left);
                }
                _ => return Poll::Ready(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::{BodyExt, Full};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// One connection served by `serve` on loopback, with a handler that answers 200 and, when
    /// the request asks for it with `x-read-body`, reads the body first.
    async fn connect() -> TcpStream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let settings = Settings {
                head: HeadLimits {
                    max_size: 8 * 1024,
                    max_headers: 64,
                },
                header_read_timeout: Duration::from_secs(5),
                idle_timeout: Duration::from_secs(5),
            };
            serve(
                stream,
                settings,
                CancellationToken::new(),
                |request| async move {
                    let read = request.headers().contains_key("x-read-body");
                    let body = request.into_body();
                    let text = if read {
                        body.collect().await.unwrap().to_bytes()
                    } else {
                        drop(body);
                        Bytes::from_static(b"unread")
                    };
                    Response::new(Full::new(text))
                },
            )
            .await
        });
        TcpStream::connect(address).await.unwrap()
    }

    /// Reads one response: its head, and a body of the length it declares.
    async fn read_response(stream: &mut TcpStream) -> String {
        let mut got = Vec::new();
        let mut byte = [0; 1];
        while !got.ends_with(b"\r\n\r\n") {
            let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte))
                .await
                .expect("a response within 5 s")
                .unwrap();
            assert_eq!(read, 1, "the connection closed mid-response: {got:?}");
            got.push(byte[0]);
        }
        let head = String::from_utf8(got).unwrap();
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        let mut body = vec![0; length];
        stream.read_exact(&mut body).await.unwrap();
        head + std::str::from_utf8(&body).unwrap()
    }

    /// Whether the server closes the connection (cleanly, with nothing more to read) within 5 s.
    async fn closed(stream: &mut TcpStream) -> bool {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest));
        matches!(read.await, Ok(Ok(0)))
    }

    #[tokio::test]
    async fn a_body_left_unread_before_it_arrived_closes_the_connection_and_the_answer_says_so() {
        let mut stream = connect().await;
        stream
            .write_all(b"PUT /w HTTP/1.1\r\nhost: x\r\ncontent-length: 6\r\n\r\n")
            .await
            .unwrap();
        let answer = read_response(&mut stream).await;
        assert!(answer.contains("connection: close\r\n"), "{answer}");
        stream.write_all(b"zombie").await.unwrap();
        assert!(closed(&mut stream).await);
    }

    #[tokio::test]
    async fn a_body_that_arrived_with_its_head_is_discarded_and_the_connection_lives_on() {
        let mut stream = connect().await;
        for request in [
            "PUT /w HTTP/1.1\r\nhost: x\r\ncontent-length: 6\r\n\r\nzombie",
            "PUT /w HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n6\r\nzombie\r\n0\r\n\r\n",
        ] {
            stream.write_all(request.as_bytes()).await.unwrap();
            let answer = read_response(&mut stream).await;
            assert!(!answer.contains("connection: close"), "{answer}");
            assert!(answer.ends_with("unread"), "{answer}");
        }
        stream
            .write_all(
                b"PUT /w HTTP/1.1\r\nhost: x\r\nx-read-body: 1\r\ncontent-length: 4\r\n\r\nnext",
            )
            .await
            .unwrap();
        let answer = read_response(&mut stream).await;
        assert!(
            answer.ends_with("\r\n\r\nnext"),
            "the next request's body: {answer}"
        );
    }

    #[tokio::test]
    async fn a_discarded_body_ends_where_its_framing_says_and_a_pipelined_request_follows() {
        let mut stream = connect().await;
        stream
            .write_all(
                b"PUT /a HTTP/1.1\r\nhost: x\r\ncontent-length: 6\r\n\r\nzombie\
                  PUT /b HTTP/1.1\r\nhost: x\r\nx-read-body: 1\r\ncontent-length: 4\r\n\r\nnext",
            )
            .await
            .unwrap();
        let first = read_response(&mut stream).await;
        assert!(first.ends_with("\r\n\r\nunread"), "{first}");
        let second = read_response(&mut stream).await;
        assert!(second.ends_with("\r\n\r\nnext"), "{second}");
    }

    #[tokio::test]
    async fn a_body_read_to_its_end_keeps_the_connection() {
        let mut stream = connect().await;
        for _ in 0..2 {
            stream
                .write_all(
                    b"PUT /w HTTP/1.1\r\nhost: x\r\nx-read-body: 1\r\ncontent-length: 5\r\n\r\n",
                )
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            stream.write_all(b"hello").await.unwrap();
            let answer = read_response(&mut stream).await;
            assert!(!answer.contains("connection: close"), "{answer}");
            assert!(answer.ends_with("hello"), "{answer}");
        }
    }

    #[tokio::test]
    async fn the_idle_timeout_runs_from_the_last_answer_and_never_holds_the_thread() {
        let settings = Settings {
            head: HeadLimits {
                max_size: 8 * 1024,
                max_headers: 64,
            },
            header_read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_millis(300),
        };
        let mut waiting = Waiting::new(settings, CancellationToken::new());
        tokio::time::sleep(Duration::from_millis(150)).await;
        waiting.answered();
        let answered = std::time::Instant::now();
        // The timer armed when the connection opened fires first, 150 ms after the answer:
        // it must be moved on to the answer's deadline, once, and neither spin in a poll nor
        // wake the task again and again until then (the connection's thread serves every
        // other connection it holds).
        let (mut polls, mut longest_poll) = (0, Duration::ZERO);
        poll_fn(|cx| {
            let polled = std::time::Instant::now();
            let idle = waiting.poll_idle(cx);
            polls += 1;
            longest_poll = longest_poll.max(polled.elapsed());
            idle
        })
        .await;
        let idle = answered.elapsed();
        // Up to the slack and a tick of the coarse clock early.
        assert!(
            idle >= Duration::from_millis(280),
            "closed {idle:?} after the answer"
        );
        assert!(
            idle < Duration::from_secs(2),
            "closed {idle:?} after the answer"
        );
        assert!(longest_poll < Duration::from_millis(50), "{longest_poll:?}");
        // The first poll, the opening timer, the answer's deadline (and one to spare).
        assert!(polls <= 4, "woken {polls} times");
    }
}
