//! An upstream connection's byte stream: plain TCP, or TLS over it for an `https://` upstream.
//!
//! The exchange writes and reads through this one type, so that the HTTP/1.1 client is the
//! same whichever the upstream speaks. The plain variant adds a match to each call and nothing
//! else; the TLS one is boxed so that a pooled plain connection stays small.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

#[derive(Debug)]
pub(crate) enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl UpstreamStream {
    /// Writes what the connection takes of `buf` now.
    pub(super) fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self {
            UpstreamStream::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            UpstreamStream::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    /// Ready once every byte written has left for the network: at once for TCP (the kernel has
    /// it); for TLS, once the records rustls still holds have been written. A request counts as
    /// sent in full only then.
    pub(super) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            UpstreamStream::Plain(_) => Poll::Ready(Ok(())),
            UpstreamStream::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    /// The TLS connection, if ALPN chose HTTP/2 for it.
    pub(super) fn into_h2(self) -> Result<Box<TlsStream<TcpStream>>, UpstreamStream> {
        match self {
            UpstreamStream::Tls(tls) if tls.get_ref().1.alpn_protocol() == Some(b"h2") => Ok(tls),
            other => Err(other),
        }
    }

    /// Whether an idle connection is still open: it must have nothing to read. An upstream that
    /// closed it has sent a FIN (a read of 0) or a reset; bytes sent unasked are a protocol error
    /// on plain HTTP, and on TLS a close_notify alert. TLS bytes are only peeked at: reading them
    /// past rustls would break the session. A plain read costs a system call only when the
    /// runtime has seen the socket become readable.
    pub(super) fn still_open(&self) -> bool {
        match self {
            UpstreamStream::Plain(tcp) => {
                let mut probe = [0u8; 1];
                matches!(tcp.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            UpstreamStream::Tls(tls) => {
                let mut probe = [0u8; 1];
                let mut probe = ReadBuf::new(&mut probe);
                let mut cx = Context::from_waker(std::task::Waker::noop());
                tls.get_ref().0.poll_peek(&mut cx, &mut probe).is_pending()
            }
        }
    }
}

/// Reading goes through `AsyncRead`, so that a read that drains the socket clears its readiness.
impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            UpstreamStream::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}
