//! A raw-TCP upstream whose every connection follows a script: for the upstream client's
//! behaviours that a well-behaved HTTP server never shows (chunked trailers, a close mid-body, an
//! early answer, a keep-alive limit, a slow loris).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One accepted connection: its stream and the bytes read past what the script has consumed.
pub struct Peer {
    pub stream: TcpStream,
    buffer: Vec<u8>,
    /// Which connection this is, counting from 0.
    pub index: usize,
}

impl Peer {
    /// Reads one request head; `None` if the connection closed first.
    pub async fn head(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                let head: Vec<u8> = self.buffer.drain(..end + 4).collect();
                return Some(String::from_utf8_lossy(&head).into_owned());
            }
            if self.fill().await == 0 {
                return None;
            }
        }
    }

    /// Reads exactly `length` body bytes.
    pub async fn body(&mut self, length: usize) -> Vec<u8> {
        while self.buffer.len() < length {
            assert!(self.fill().await > 0, "closed inside a body");
        }
        self.buffer.drain(..length).collect()
    }

    /// Reads a whole chunked body (no trailers expected).
    pub async fn chunked(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let line = self.line().await;
            let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16).unwrap();
            if size == 0 {
                assert_eq!(self.line().await, "", "no trailers are sent upstream");
                return body;
            }
            body.extend(self.body(size).await);
            assert_eq!(self.body(2).await, b"\r\n");
        }
    }

    /// Reads and drops `length` body bytes (for bodies larger than memory).
    pub async fn discard(&mut self, length: u64) {
        let mut left = length;
        while left > 0 {
            if self.buffer.is_empty() {
                assert!(self.fill().await > 0, "closed inside a body");
            }
            let take = usize::try_from(left)
                .unwrap_or(usize::MAX)
                .min(self.buffer.len());
            self.buffer.drain(..take);
            left -= take as u64;
        }
    }

    /// Reads a whole chunked body, keeping only its length (for bodies larger than memory).
    pub async fn chunked_length(&mut self) -> u64 {
        let mut total = 0u64;
        loop {
            let line = self.line().await;
            let size = u64::from_str_radix(line.split(';').next().unwrap().trim(), 16).unwrap();
            if size == 0 {
                assert_eq!(self.line().await, "");
                return total;
            }
            self.discard(size).await;
            total += size;
            assert_eq!(self.body(2).await, b"\r\n");
        }
    }

    async fn line(&mut self) -> String {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buffer.drain(..end + 2).collect();
                return String::from_utf8_lossy(&line[..end]).into_owned();
            }
            assert!(self.fill().await > 0, "closed inside a chunked body");
        }
    }

    async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 8192];
        let read = self.stream.read(&mut chunk).await.unwrap_or(0);
        self.buffer.extend_from_slice(&chunk[..read]);
        read
    }

    /// Everything the client sends (what is buffered already included) until it closes the
    /// connection or `within` runs out.
    pub async fn rest(&mut self, within: std::time::Duration) -> Vec<u8> {
        let _ = tokio::time::timeout(within, async { while self.fill().await > 0 {} }).await;
        std::mem::take(&mut self.buffer)
    }

    /// Writes raw bytes.
    pub async fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }
}

/// The value of `name` in a request head (case-insensitive), if present.
pub fn header<'h>(head: &'h str, name: &str) -> Option<&'h str> {
    head.lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, value)| value.trim())
}

pub struct ScriptedUpstream {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl ScriptedUpstream {
    /// Serves every connection with `script`.
    pub async fn start<F, Fut>(script: F) -> Self
    where
        F: Fn(Peer) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        let script = Arc::new(script);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let index = counter.fetch_add(1, Ordering::SeqCst);
                let peer = Peer {
                    stream,
                    buffer: Vec::new(),
                    index,
                };
                tokio::spawn(script(peer));
            }
        });
        ScriptedUpstream { addr, accepted }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many connections fencegate has opened to it.
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}
