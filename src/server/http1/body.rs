//! A request body read straight off the client's connection.
//!
//! The body borrows the connection's read half and its buffer for as long as it is being read,
//! and gives them back through a oneshot the moment its last byte is decoded. A body dropped
//! before that discards what of it is already buffered; if that is not all of it, it gives them
//! back marked unfinished, and the connection closes (the next request's first byte could not be
//! found). The handler, or a task it spawned to finish sending an early-answered body upstream,
//! may hold the body after the response is written; the connection waits for it before reading
//! the next request.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http_body_util::Full;
use hyper::body::{Frame, SizeHint};
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::oneshot;

use crate::proxy::wire::{ChunkedDecoder, Decoded};

/// Sent to a client that waits for it before its body (`Expect: 100-continue`).
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// How much is read from the socket at a time.
const READ_SIZE: usize = 16 * 1024;

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the client closed the connection before the end of the request body")]
    Truncated,
    #[error("the request's chunked body is malformed")]
    Chunk,
    #[error("reading the request body failed: {0}")]
    Io(#[from] std::io::Error),
}

/// The connection's read side, lent to a body and given back.
#[derive(Debug)]
pub struct ReadSide {
    pub read: OwnedReadHalf,
    pub buf: BytesMut,
}

/// What a body gives back: the read side, and whether the body was read to its end.
#[derive(Debug)]
pub struct Returned {
    pub side: ReadSide,
    pub complete: bool,
}

#[derive(Debug)]
enum Decoding {
    Length(u64),
    Chunked(ChunkedDecoder),
}

/// A request body on an HTTP/1.1 connection.
#[derive(Debug)]
pub struct RequestBody {
    /// `None` once the body has ended (or failed) and the read side is back with the connection.
    side: Option<ReadSide>,
    decoding: Decoding,
    /// The part of `100 Continue` still to be written, if the client waits for it.
    continue_left: &'static [u8],
    back: Option<oneshot::Sender<Returned>>,
}

impl RequestBody {
    pub fn new(
        side: ReadSide,
        length: Option<u64>,
        expect_continue: bool,
        back: oneshot::Sender<Returned>,
    ) -> RequestBody {
        RequestBody {
            side: Some(side),
            decoding: match length {
                Some(length) => Decoding::Length(length),
                None => Decoding::Chunked(ChunkedDecoder::default()),
            },
            continue_left: if expect_continue { CONTINUE } else { &[] },
            back: Some(back),
        }
    }

    /// Gives the read side back to the connection.
    fn give_back(&mut self, complete: bool) {
        if let (Some(side), Some(back)) = (self.side.take(), self.back.take()) {
            // The connection may be gone (its task ended): then nobody needs the socket.
            let _ = back.send(Returned { side, complete });
        }
    }

    /// Writes `100 Continue` before the first read, as the client waits for it.
    fn poll_continue(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let Some(side) = self.side.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        while !self.continue_left.is_empty() {
            // The read half writes through the shared socket: `100 Continue` is only ever sent
            // while the connection itself writes nothing (it is waiting for the handler).
            let written = ready!(poll_write_through(&side.read, cx, self.continue_left))?;
            self.continue_left = &self.continue_left[written..];
        }
        Poll::Ready(Ok(()))
    }

    /// Takes the next piece of the body out of the buffer, if it holds one.
    fn decode(&mut self) -> Result<Option<Frame<Bytes>>, BodyError> {
        let Some(side) = self.side.as_mut() else {
            return Ok(None);
        };
        match &mut self.decoding {
            Decoding::Length(left) => {
                if side.buf.is_empty() {
                    return Ok(None);
                }
                let take = usize::try_from(*left)
                    .unwrap_or(usize::MAX)
                    .min(side.buf.len());
                *left -= take as u64;
                Ok(Some(Frame::data(side.buf.split_to(take).freeze())))
            }
            Decoding::Chunked(decoder) => match decoder.decode(&mut side.buf) {
                Ok(None) => Ok(None),
                Ok(Some(Decoded::Data(data))) => Ok(Some(Frame::data(data))),
                Ok(Some(Decoded::Trailers(trailers))) => Ok(Some(Frame::trailers(trailers))),
                // The end is noticed by `is_done` below.
                Ok(Some(Decoded::End)) => Ok(None),
                Err(_) => Err(BodyError::Chunk),
            },
        }
    }

    fn is_done(&self) -> bool {
        match &self.decoding {
            Decoding::Length(left) => *left == 0,
            Decoding::Chunked(decoder) => decoder.is_done(),
        }
    }

    /// Reads more bytes from the socket into the buffer.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BodyError>> {
        let Some(side) = self.side.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        side.buf.reserve(READ_SIZE);
        let read = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut side.read),
            cx,
            &mut side.buf
        ))?;
        if read == 0 {
            return Poll::Ready(Err(BodyError::Truncated));
        }
        Poll::Ready(Ok(()))
    }
}

/// Writes through a read half: tokio's halves share one socket, and writing needs only `&self`.
fn poll_write_through(
    read: &OwnedReadHalf,
    cx: &mut Context<'_>,
    bytes: &[u8],
) -> Poll<std::io::Result<usize>> {
    let stream: &tokio::net::TcpStream = read.as_ref();
    loop {
        ready!(stream.poll_write_ready(cx))?;
        match stream.try_write(bytes) {
            Ok(written) => return Poll::Ready(Ok(written)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

impl hyper::body::Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if let Err(e) = ready!(this.poll_continue(cx)) {
            this.give_back(false);
            return Poll::Ready(Some(Err(e.into())));
        }
        loop {
            if this.side.is_none() {
                return Poll::Ready(None);
            }
            let decoded = this.decode();
            let done = this.is_done();
            match decoded {
                Ok(Some(frame)) => {
                    if done {
                        this.give_back(true);
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Ok(None) if done => {
                    this.give_back(true);
                    return Poll::Ready(None);
                }
                Ok(None) => {}
                Err(e) => {
                    this.give_back(false);
                    return Poll::Ready(Some(Err(e)));
                }
            }
            if let Err(e) = ready!(this.poll_fill(cx)) {
                this.give_back(false);
                return Poll::Ready(Some(Err(e)));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.side.is_none() || self.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoding {
            Decoding::Length(left) => SizeHint::with_exact(left),
            Decoding::Chunked(_) => SizeHint::default(),
        }
    }
}

impl Drop for RequestBody {
    /// Discards what is left of the body if it has all arrived already (a small body usually
    /// comes with its head), so that the connection can carry the next request; the socket
    /// itself is not read here.
    fn drop(&mut self) {
        while !self.is_done() {
            match self.decode() {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        let complete = self.is_done();
        self.give_back(complete);
    }
}

/// A request as the data plane passes it on, boxed once when its head is parsed: it goes through
/// half a dozen layers of futures on its way upstream, and each moved all 312 bytes of it twice
/// (a uprobe on memmove counted 13 copies per request).
pub type ClientRequest = Box<http::Request<ClientBody>>;

/// A request body, from either server the data plane runs, or already read whole.
#[derive(Debug)]
pub enum ClientBody {
    /// A request without a body.
    Empty,
    /// Read by fencegate's own HTTP/1.1 server (plain TCP).
    Http1(RequestBody),
    /// Read by hyper's server: h2, and every request over TLS.
    Hyper(hyper::body::Incoming),
    /// Read whole by the proxy, to find the resources a write names in it; sent on as read.
    Read(Full<Bytes>),
}

/// Why a client's request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    #[error(transparent)]
    Http1(#[from] BodyError),
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
}

impl hyper::body::Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        match self.get_mut() {
            ClientBody::Empty => Poll::Ready(None),
            ClientBody::Http1(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|frame| frame.map(|frame| frame.map_err(ClientBodyError::from))),
            ClientBody::Hyper(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|frame| frame.map(|frame| frame.map_err(ClientBodyError::from))),
            ClientBody::Read(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|frame| frame.map(|frame| frame.map_err(|never| match never {}))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Empty => true,
            ClientBody::Http1(body) => body.is_end_stream(),
            ClientBody::Hyper(body) => body.is_end_stream(),
            ClientBody::Read(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Empty => SizeHint::with_exact(0),
            ClientBody::Http1(body) => body.size_hint(),
            ClientBody::Hyper(body) => body.size_hint(),
            ClientBody::Read(body) => body.size_hint(),
        }
    }
}
