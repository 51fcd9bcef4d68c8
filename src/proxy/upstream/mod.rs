//! The upstream side: where a route forwards to, and the lean HTTP/1.1 client that does it.
//!
//! Each data-plane thread forwards with connections of its own ([`pool`]), and each request
//! drives its own exchange ([`exchange`]): no connection task, no channel, no lock between a
//! request and its upstream connection. [`wire`] is the HTTP/1.1 framing, parsed with httparse.

mod exchange;
mod h2;
mod pool;
mod stream;
mod tls;
pub mod wire;

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use http::header::{CONTENT_LENGTH, EXPECT, HOST};
use http::uri::Authority;
use http::{Method, Request, Response, Uri};
use hyper::body::Body;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::headers;
use super::inflight::InFlight;
use crate::route::Route;
use crate::server::{ClientBody, ClientRequest};
use exchange::{Exchange, HeadFailure, Sender};
pub use exchange::{ExchangeError, ResponseBody};
use pool::Connection;
use stream::UpstreamStream;
use tls::{Alpn, UpstreamTls};
pub use tls::{HandshakeFailure, TlsClientFiles};
use wire::RequestFraming;

/// Where a request goes next, and so how its head is written.
#[derive(Debug, Clone, Copy)]
enum Hop<'a> {
    /// To the storage: hop-by-hop headers stripped, `Forwarded` appended.
    Upstream(headers::Kept),
    /// To the replica that owns the request's shard (cluster mode).
    Peer { secret: Option<&'a str> },
}

/// A route's upstream: an `http://host:port` or `https://host:port` base, optionally with a path
/// prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    authority: Authority,
    /// Prepended to every forwarded path; empty or starting with `/`, never ending with one.
    prefix: String,
    /// `host:port` (with the scheme and TLS files for https), naming the upstream's connections
    /// in each thread's pool: a connection is reused only for the upstream it was made for.
    pool_key: Arc<str>,
    /// `host:port`, resolved per connect when the host is a name.
    host_port: Arc<str>,
    /// The address to connect to, if the host is an IP address (a name is resolved per connect).
    address: Option<SocketAddr>,
    /// For `https://`: how the connection is secured and the certificate verified.
    tls: Option<UpstreamTls>,
}

/// Why an upstream URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamUrlError {
    #[error("is not a URL ({0}); write it like http://127.0.0.1:5984")]
    Unparsable(String),
    #[error("must be an http:// or https:// URL with a host, like http://127.0.0.1:5984")]
    NotHttp,
    #[error("must not have a query string")]
    Query,
    #[error("cannot set up TLS to it: {0}")]
    Tls(String),
    #[error("is http://, so upstream_ca, upstream_cert and upstream_key would never be used")]
    TlsFilesOnHttp,
}

impl FromStr for Upstream {
    type Err = UpstreamUrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let uri: Uri = s
            .parse()
            .map_err(|e: http::uri::InvalidUri| UpstreamUrlError::Unparsable(e.to_string()))?;
        let secure = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(UpstreamUrlError::NotHttp),
        };
        let authority = uri.authority().cloned().ok_or(UpstreamUrlError::NotHttp)?;
        if uri.query().is_some() {
            return Err(UpstreamUrlError::Query);
        }
        let port = authority
            .port_u16()
            .unwrap_or(if secure { 443 } else { 80 });
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let tls = secure
            .then(|| UpstreamTls::new(host, TlsClientFiles::default(), Alpn::H2OrHttp1))
            .transpose()
            .map_err(|e| UpstreamUrlError::Tls(e.to_string()))?;
        let host_port: Arc<str> = format!("{host}:{port}").into();
        Ok(Self {
            pool_key: pool_key(&host_port, tls.as_ref()),
            host_port,
            address: host
                .parse::<IpAddr>()
                .ok()
                .map(|ip| SocketAddr::new(ip, port)),
            authority,
            prefix: uri.path().trim_end_matches('/').to_owned(),
            tls,
        })
    }
}

/// The name of an upstream's connections in the pool: its address, and for TLS the scheme and the
/// files, so that two routes to one storage with different client certificates never share a
/// connection.
fn pool_key(host_port: &str, tls: Option<&UpstreamTls>) -> Arc<str> {
    match tls.map(UpstreamTls::files) {
        None => host_port.into(),
        Some(files) if *files == TlsClientFiles::default() => format!("https://{host_port}").into(),
        Some(files) => format!("https://{host_port} {files:?}").into(),
    }
}

impl Upstream {
    /// The same upstream verified against `files.ca` besides the system's roots, and presenting
    /// `files.identity`; only for `https://`.
    pub fn with_tls_files(self, files: TlsClientFiles) -> Result<Self, UpstreamUrlError> {
        self.with_tls(files, Alpn::H2OrHttp1)
    }

    /// Another replica's peer plane at this URL: over TLS with `files`, HTTP/1.1 only (the peer
    /// hop is fencegate's own client, end to end).
    pub fn peer_with_tls_files(self, files: TlsClientFiles) -> Result<Self, UpstreamUrlError> {
        self.with_tls(files, Alpn::Http1)
    }

    fn with_tls(mut self, files: TlsClientFiles, alpn: Alpn) -> Result<Self, UpstreamUrlError> {
        if self.tls.is_none() {
            return Err(UpstreamUrlError::TlsFilesOnHttp);
        }
        let host = self.host_port.rsplit_once(':').map_or("", |(host, _)| host);
        let tls = UpstreamTls::new(host, files, alpn)
            .map_err(|e| UpstreamUrlError::Tls(e.to_string()))?;
        self.pool_key = pool_key(&self.host_port, Some(&tls));
        self.tls = Some(tls);
        Ok(self)
    }

    /// Whether requests may go over HTTP/2, if the upstream chooses it.
    fn offers_h2(&self) -> bool {
        self.tls.as_ref().is_some_and(UpstreamTls::offers_h2)
    }

    /// Whether it is spoken to over TLS.
    pub fn is_https(&self) -> bool {
        self.tls.is_some()
    }

    /// `http` or `https`.
    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// Makes `Location` and `Content-Location` values that name the upstream's own address
    /// (`http://host:port/prefix/...`) path-absolute (`/...`), as nginx's `proxy_redirect default`
    /// does: the client resolves them against the address it used, and never learns of, or
    /// bypasses fencegate for, the upstream behind it.
    ///
    /// One pass over the answer's headers, each value rewritten in place: two lookups by name
    /// cost more than the whole pass on the hot path (bench/instructions.sh).
    fn rewrite_self_references(&self, headers: &mut http::HeaderMap) {
        for (name, value) in headers.iter_mut() {
            if *name != http::header::LOCATION && *name != http::header::CONTENT_LOCATION {
                continue;
            }
            if let Some(path) = self.path_of(value.as_bytes())
                && let Ok(rewritten) = http::HeaderValue::from_bytes(path)
            {
                *value = rewritten;
            }
        }
    }

    /// The path below this upstream's prefix that `url` names, if it is an absolute URL of this
    /// upstream.
    fn path_of<'u>(&self, url: &'u [u8]) -> Option<&'u [u8]> {
        let rest = url
            .strip_prefix(self.scheme().as_bytes())?
            .strip_prefix(b"://")?;
        let authority = self.authority.as_str().as_bytes();
        let rest = match rest.get(..authority.len()) {
            Some(host) if host.eq_ignore_ascii_case(authority) => &rest[authority.len()..],
            _ => return None,
        };
        let rest = rest.strip_prefix(self.prefix.as_bytes())?;
        match rest.first() {
            None => Some(b"/"),
            Some(b'/') => Some(rest),
            Some(b'?') => None, // `/prefix?x` would need a path the client never used
            Some(_) => None,    // `/prefixed-other`: not below the prefix
        }
    }
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}{}", self.scheme(), self.authority, self.prefix)
    }
}

impl Upstream {
    /// The absolute URL of `path` (as sent, percent-encoded) on this upstream: what a rewritten
    /// `Destination` header says, so that the upstream reads the very path fencegate fenced.
    pub fn absolute_url(&self, path: &str) -> String {
        format!(
            "{}://{}{}{path}",
            self.scheme(),
            self.authority,
            self.prefix
        )
    }

    /// The request target on the upstream for a client's: the same path and query, under the
    /// prefix. In its two pieces, written one after the other into the request head, without a
    /// string made for them on every request.
    fn target_for<'a>(&'a self, original: &'a Uri) -> [&'a str; 2] {
        let path_and_query = original.path_and_query().map_or("/", |pq| pq.as_str());
        [&self.prefix, path_and_query]
    }

    /// A new connection: TCP, and for `https://` the TLS handshake, both within `timeout`.
    async fn connect(&self, timeout: Duration) -> Result<UpstreamStream, ForwardError> {
        let connecting = async {
            let tcp = self.connect_tcp().await.map_err(ForwardError::Connect)?;
            tcp.set_nodelay(true).map_err(ForwardError::Connect)?;
            match &self.tls {
                None => Ok(UpstreamStream::Plain(tcp)),
                Some(tls) => match tls.handshake(tcp).await {
                    Ok(secured) => Ok(UpstreamStream::Tls(Box::new(secured))),
                    Err(e) => Err(ForwardError::Handshake(e)),
                },
            }
        };
        tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| {
                ForwardError::Connect(std::io::Error::from(std::io::ErrorKind::TimedOut))
            })?
    }

    async fn connect_tcp(&self) -> Result<TcpStream, std::io::Error> {
        {
            match self.address {
                Some(address) => TcpStream::connect(address).await,
                None => {
                    // Resolved first, so that a name that does not resolve is told apart from
                    // an address that refuses (the resolver's error has no kind of its own).
                    let addresses: Vec<SocketAddr> = tokio::net::lookup_host(&*self.host_port)
                        .await
                        .map_err(|e| {
                            std::io::Error::new(
                                std::io::ErrorKind::NotFound,
                                format!("cannot resolve {}: {e}", self.host_port),
                            )
                        })?
                        .collect();
                    TcpStream::connect(&addresses[..]).await
                }
            }
        }
    }
}

/// Why forwarding failed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("cannot connect to the upstream: {0}")]
    Connect(#[source] std::io::Error),
    #[error("the TLS handshake with the upstream failed: {0}")]
    Handshake(#[source] std::io::Error),
    #[error("the upstream exchange failed: {0}")]
    Exchange(#[source] ExchangeError),
    #[error("the request could not be sent; none of it reached the upstream: {0}")]
    NotSent(#[source] ExchangeError),
    #[error("the upstream did not answer in time")]
    Timeout,
    #[error("the request body exceeded the limit")]
    BodyTooLarge,
    #[error(
        "the upstream answered 101 Switching Protocols; fencegate does not tunnel other protocols, whose writes it could not fence"
    )]
    SwitchedProtocols,
}

impl ForwardError {
    /// What went wrong, in one word for logs and metrics: `timeout`, `connect_timeout`,
    /// `refused`, `dns`, `reset`, `closed`, `bad_response`, `client_body`, `body_too_large`,
    /// `switched_protocols`, `lease_ended` or `io`.
    pub fn cause(&self) -> &'static str {
        let of_io = |e: &std::io::Error| match e.kind() {
            std::io::ErrorKind::ConnectionRefused => "refused",
            std::io::ErrorKind::TimedOut => "connect_timeout",
            std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe => "reset",
            // What `Upstream::connect` makes of a name that does not resolve.
            std::io::ErrorKind::NotFound => "dns",
            std::io::ErrorKind::HostUnreachable | std::io::ErrorKind::NetworkUnreachable => {
                "unreachable"
            }
            _ => "io",
        };
        let of_exchange = |e: &ExchangeError| match e {
            // TLS 1.3 finishes the client's side of the handshake before the server has checked
            // the client's certificate: a refusal arrives as an alert on the first read.
            ExchangeError::Write(io) | ExchangeError::Read(io)
                if HandshakeFailure::of(io) != HandshakeFailure::Other =>
            {
                HandshakeFailure::of(io).cause()
            }
            ExchangeError::Write(io) | ExchangeError::Read(io) => match io.kind() {
                std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::BrokenPipe => "reset",
                _ => "io",
            },
            ExchangeError::ClosedBeforeAnswer => "closed",
            ExchangeError::Response(_) => "bad_response",
            ExchangeError::ClientBody(_) | ExchangeError::BodyLength => "client_body",
            ExchangeError::BodyTooLarge => "body_too_large",
            ExchangeError::BodyDeadline | ExchangeError::ReadTimeout => "timeout",
            ExchangeError::LeaseEnded => "lease_ended",
        };
        match self {
            ForwardError::Connect(e) => of_io(e),
            ForwardError::Handshake(e) => HandshakeFailure::of(e).cause(),
            ForwardError::NotSent(e) | ForwardError::Exchange(e) => of_exchange(e),
            ForwardError::Timeout => "timeout",
            ForwardError::BodyTooLarge => "body_too_large",
            ForwardError::SwitchedProtocols => "switched_protocols",
        }
    }

    /// A TLS failure: in the handshake, or an alert that ended the session (a refused client
    /// certificate, in TLS 1.3).
    pub fn tls_failure(&self) -> Option<HandshakeFailure> {
        match self {
            ForwardError::Handshake(e) => Some(HandshakeFailure::of(e)),
            ForwardError::NotSent(ExchangeError::Write(e) | ExchangeError::Read(e))
            | ForwardError::Exchange(ExchangeError::Write(e) | ExchangeError::Read(e)) => {
                Some(HandshakeFailure::of(e)).filter(|failure| *failure != HandshakeFailure::Other)
            }
            _ => None,
        }
    }

    /// Whether writing stopped because a cluster lease the request was admitted under ran out
    /// (see [`crate::cluster::ownership::TermWindow`]).
    pub fn lease_ended(&self) -> bool {
        matches!(
            self,
            ForwardError::NotSent(ExchangeError::LeaseEnded)
                | ForwardError::Exchange(ExchangeError::LeaseEnded)
        )
    }

    /// Whether the upstream certainly never received the request, so it cannot apply it later.
    pub fn never_sent(&self) -> bool {
        matches!(
            self,
            ForwardError::Connect(_) | ForwardError::Handshake(_) | ForwardError::NotSent(_)
        )
    }

    /// An exchange that failed before writing anything: a body over the limit or too slow is
    /// still answered as such.
    fn unsent(error: ExchangeError) -> Self {
        match error {
            ExchangeError::BodyTooLarge | ExchangeError::BodyDeadline => Self::from_exchange(error),
            other => ForwardError::NotSent(other),
        }
    }

    fn from_exchange(error: ExchangeError) -> Self {
        match error {
            ExchangeError::BodyTooLarge => ForwardError::BodyTooLarge,
            ExchangeError::BodyDeadline => ForwardError::Timeout,
            other => ForwardError::Exchange(other),
        }
    }
}

/// The upstream client's settings; the connections are per thread ([`pool`]).
#[derive(Debug, Clone)]
pub struct UpstreamClient {
    timeout: Duration,
    connect_timeout: Duration,
    max_body: u64,
}

impl UpstreamClient {
    /// A client whose exchanges time out after `timeout` (connecting, within that, after
    /// `connect_timeout`) and whose request bodies stop at `max_body` bytes.
    pub fn new(timeout: Duration, connect_timeout: Duration, max_body: u64) -> Self {
        Self {
            timeout,
            connect_timeout,
            max_body,
        }
    }

    /// The configured exchange timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The largest request body forwarded, in bytes.
    pub fn max_body(&self) -> u64 {
        self.max_body
    }

    /// Sends `request` to `route`'s upstream and returns its response head; the body streams on.
    /// The request must be written and the head received within the upstream timeout; the body
    /// then may pause for at most as long between two reads. A fenced request's `in_flight`
    /// learns when the last byte of the request has been written. The timeout counts from
    /// `started`, when the caller began the upstream call (and read the clock for its metrics).
    pub(super) fn forward<'a>(
        &'a self,
        route: &'a Route,
        request: ClientRequest,
        client: SocketAddr,
        in_flight: Option<&'a InFlight>,
        started: Instant,
    ) -> impl Future<Output = Result<Response<ResponseBody>, ForwardError>> + 'a {
        // Not an `async fn`: the hot path's future is `forward_to`'s own, with no layer around it.
        let hop = Hop::Upstream(headers::Kept {
            keep_host: route.preserves_host(),
            keep_authorization: !route.takes_bearer_tokens(),
        });
        self.forward_to(route.upstream(), hop, request, client, in_flight, started)
    }

    /// Sends `request` to the replica that owns its shard, over the peer plane: every
    /// end-to-end header as the client sent it (`Host` too, so that the owner routes it exactly
    /// as this replica would have), the client's address and the cluster secret.
    pub(super) async fn forward_to_peer(
        &self,
        peer: &Upstream,
        secret: Option<&str>,
        request: ClientRequest,
        client: SocketAddr,
    ) -> Result<Response<ResponseBody>, ForwardError> {
        let hop = Hop::Peer { secret };
        self.forward_to(peer, hop, request, client, None, Instant::now())
            .await
    }

    async fn forward_to(
        &self,
        upstream: &Upstream,
        hop: Hop<'_>,
        request: ClientRequest,
        client: SocketAddr,
        in_flight: Option<&InFlight>,
        started: Instant,
    ) -> Result<Response<ResponseBody>, ForwardError> {
        let deadline = started + self.timeout;
        // The head stays in its box, borrowed: taken apart, its 200 bytes were copied out.
        let mut request = request;
        let body = std::mem::replace(request.body_mut(), ClientBody::Empty);
        let framing = request_framing(request.method(), request.headers(), &body);
        // An https:// storage upstream may choose HTTP/2. Boxed: the plain hot path never
        // takes this branch, and its futures would otherwise grow by theirs.
        if let Hop::Upstream(kept) = hop
            && upstream.offers_h2()
        {
            match Box::pin(self.h1_or_h2(upstream, deadline)).await? {
                // A new HTTP/1.1 connection waits in the pool, taken at once below.
                Protocol::Http1 => {}
                Protocol::H2(sender) => {
                    *request.body_mut() = body;
                    let exchange = H2Exchange {
                        upstream,
                        kept,
                        client,
                        framing,
                        deadline,
                    };
                    return Box::pin(self.forward_h2(sender, exchange, *request, in_flight)).await;
                }
            }
        }
        // Only a body can be held back for `100 Continue`.
        let expects_continue = !body.is_end_stream()
            && request
                .headers()
                .get(EXPECT)
                .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        let keep_host = match hop {
            Hop::Upstream(kept) => kept.keep_host,
            Hop::Peer { .. } => true,
        };
        let host = match request.uri().authority() {
            _ if keep_host && request.headers().contains_key(HOST) => None,
            // An HTTP/2 client's authority is in the URI, not in a Host header.
            Some(authority) if keep_host => Some(authority.as_str()),
            _ => Some(upstream.authority.as_str()),
        };
        let write_head = || {
            let mut head = BytesMut::with_capacity(512);
            wire::write_request_head(
                &mut head,
                request.method(),
                &upstream.target_for(request.uri()),
                host,
                framing,
                |out| match hop {
                    Hop::Upstream(kept) => {
                        headers::write_upstream_headers(out, request.headers(), client, kept);
                    }
                    Hop::Peer { secret } => {
                        let identity = request
                            .extensions()
                            .get::<Arc<crate::tls::ClientIdentity>>()
                            .map(Arc::as_ref);
                        headers::write_peer_headers(
                            out,
                            request.headers(),
                            client,
                            identity,
                            secret,
                        );
                    }
                },
            );
            head
        };
        let sender = Sender::new(
            write_head(),
            Some(body),
            framing,
            self.max_body,
            in_flight.map(InFlight::body_sent),
            expects_continue,
            deadline,
        );
        // Written again only if the request has to go again (see `exchange_head`), so that the
        // common case keeps no copy of it.
        let again = || {
            Sender::new(
                write_head(),
                None,
                framing,
                self.max_body,
                None,
                false,
                deadline,
            )
        };
        // A bodiless unfenced read may go again even if it reached the upstream: it changes nothing.
        let may_replay = in_flight.is_none() && request.method().is_safe() && sender.replayable();
        let (exchange, head) = self
            .exchange_head(upstream, sender, again, may_replay, deadline)
            .await?;
        // A 101 would hand over the connection; relaying it would open a tunnel whose traffic no
        // gate sees.
        if head.status == http::StatusCode::SWITCHING_PROTOCOLS {
            return Err(ForwardError::SwitchedProtocols);
        }
        let (framing, keep_alive) = wire::framing_of(&head, request.method())
            .map_err(|e| ForwardError::Exchange(e.into()))?;
        let mut body = exchange.into_body(
            framing,
            keep_alive,
            Arc::clone(&upstream.pool_key),
            self.timeout,
        );
        // Room for what the proxy adds to an answer (`X-Request-Id`, `Fencing-Token-Highest`,
        // `Fencegate-Replica`): a map that grows on the hot path rehashes every header it holds.
        let mut headers = crate::header_maps::with_capacity(3);
        if head.handled {
            head.headers
                .append_to(&mut headers)
                .map_err(|_| ForwardError::Exchange(wire::WireError::InvalidHeader.into()))?;
            if let Hop::Upstream { .. } = hop {
                // The owner has done so for a request that went over the peer plane.
                upstream.rewrite_self_references(&mut headers);
            }
        } else {
            body.carry(head.headers);
        }
        let mut response = Response::new(body);
        *response.status_mut() = head.status;
        *response.headers_mut() = headers;
        // The request's head is written and will not be again: its map serves the next one.
        crate::header_maps::give_back(std::mem::take(request.headers_mut()));
        Ok(response)
    }

    /// Sends the request on a pooled connection, or a new one, until its response head arrives.
    /// A pooled connection the upstream has closed in the meantime is replaced when that cannot
    /// have delivered the request: nothing of it was written, or it is a bodiless unfenced read
    /// that got no answer at all.
    async fn exchange_head(
        &self,
        upstream: &Upstream,
        mut sender: Sender,
        again: impl Fn() -> Sender,
        mut may_replay: bool,
        deadline: Instant,
    ) -> Result<(Exchange, wire::ResponseHead), ForwardError> {
        loop {
            let connection = match pool::take(&upstream.pool_key) {
                Some(connection) => connection,
                // Boxed: connecting is rare on a warm pool, and its future is large.
                None => Box::pin(tokio::time::timeout_at(deadline, self.connect(upstream)))
                    .await
                    .map_err(|_| ForwardError::Timeout)??,
            };
            let mut exchange = Exchange::new(connection, sender);
            let head = std::future::poll_fn(|cx| match exchange.poll_head(cx) {
                Poll::Ready(head) => Poll::Ready(Some(head)),
                Poll::Pending => exchange.poll_deadline(cx, deadline).map(|()| None),
            });
            let failure = match head.await {
                Some(Ok(head)) => return Ok((exchange, head)),
                Some(Err(failure)) => failure,
                // The exchange is dropped: its connection is closed, whatever it sent.
                None => return Err(ForwardError::Timeout),
            };
            let HeadFailure {
                error,
                unsent,
                answered_anything,
            } = failure;
            // Only the connection's own failures say it was stale; a client body that failed or
            // ran over the limit fails the same way on any connection.
            let connection_failed = matches!(
                error,
                ExchangeError::Write(_)
                    | ExchangeError::Read(_)
                    | ExchangeError::ClosedBeforeAnswer
            );
            let stale = connection_failed && exchange.reused() && !answered_anything;
            sender = match unsent {
                Some(unsent) if stale => unsent,
                None if stale && may_replay => {
                    may_replay = false;
                    again()
                }
                // Not one byte left fencegate: the upstream cannot apply any of it.
                Some(_) => return Err(ForwardError::unsent(error)),
                None => return Err(ForwardError::from_exchange(error)),
            };
            tracing::debug!(%error, upstream = %upstream.pool_key, "pooled connection was closed; retrying on a new one");
        }
    }

    /// How the next request to an upstream that offers HTTP/2 goes: on this thread's HTTP/2
    /// connection, on an idle HTTP/1.1 one, or on a new connection, as its ALPN chose.
    async fn h1_or_h2(
        &self,
        upstream: &Upstream,
        deadline: Instant,
    ) -> Result<Protocol, ForwardError> {
        loop {
            let connecting = match h2::next(&upstream.pool_key) {
                h2::Next::H2(sender) => return Ok(Protocol::H2(sender)),
                h2::Next::Http1 => return Ok(Protocol::Http1),
                h2::Next::Wait(notify) => {
                    tokio::time::timeout_at(deadline, notify.notified())
                        .await
                        .map_err(|_| ForwardError::Timeout)?;
                    continue;
                }
                h2::Next::Connect(connecting) => connecting,
            };
            // An idle HTTP/1.1 connection says what the upstream chose.
            if pool::has_idle(&upstream.pool_key) {
                connecting.chose_http1();
                return Ok(Protocol::Http1);
            }
            let stream = tokio::time::timeout_at(deadline, upstream.connect(self.connect_timeout))
                .await
                .map_err(|_| ForwardError::Timeout)??;
            return match stream.into_h2() {
                Ok(tls) => Ok(Protocol::H2(connecting.start_h2(tls).await?)),
                Err(stream) => {
                    connecting.chose_http1();
                    pool::offer_new(&upstream.pool_key, Connection::new(stream));
                    Ok(Protocol::Http1)
                }
            };
        }
    }

    /// Sends `request` as an HTTP/2 stream: the headers an HTTP/1.1 upstream would get, the
    /// body counted and reported sent by [`h2::SentBody`].
    async fn forward_h2(
        &self,
        sender: hyper::client::conn::http2::SendRequest<h2::SentBody>,
        exchange: H2Exchange<'_>,
        request: Request<ClientBody>,
        in_flight: Option<&InFlight>,
    ) -> Result<Response<ResponseBody>, ForwardError> {
        let H2Exchange {
            upstream,
            kept,
            client,
            framing,
            deadline,
        } = exchange;
        let (parts, body) = request.into_parts();
        let mut lines = BytesMut::with_capacity(512);
        headers::write_upstream_headers(&mut lines, &parts.headers, client, kept);
        let mut headers = h2::headers_from_lines(&lines);
        if let RequestFraming::Length(length) = framing {
            headers.insert(CONTENT_LENGTH, length.into());
        }
        let client_host = parts
            .headers
            .get(HOST)
            .and_then(|host| host.to_str().ok())
            .or_else(|| parts.uri.authority().map(Authority::as_str));
        let authority = match client_host {
            Some(host) if kept.keep_host => host,
            _ => upstream.authority.as_str(),
        };
        let uri = format!(
            "https://{authority}{}",
            upstream.target_for(&parts.uri).concat()
        )
        .parse::<Uri>()
        .map_err(|e| ForwardError::NotSent(ExchangeError::Write(std::io::Error::other(e))))?;
        let limits = h2::BodyLimits::new(framing, self.max_body);
        let body = h2::SentBody::new(
            body,
            Arc::clone(&limits),
            in_flight.map(InFlight::body_sent),
        );
        let mut request = Request::new(body);
        *request.method_mut() = parts.method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        *request.version_mut() = http::Version::HTTP_2;
        let response = h2::exchange(sender, request, limits, deadline).await?;
        let (mut head, incoming) = response.into_parts();
        head.version = http::Version::HTTP_11;
        let body = ResponseBody::h2(incoming, Arc::clone(&upstream.pool_key), self.timeout);
        let mut response = Response::from_parts(head, body);
        upstream.rewrite_self_references(response.headers_mut());
        Ok(response)
    }

    /// A new HTTP/1.1 connection. An upstream that chose HTTP/1.1 before and now chooses h2 on
    /// it (reconfigured) is forgotten, and this request refused unsent: the next one learns.
    async fn connect(&self, upstream: &Upstream) -> Result<Connection, ForwardError> {
        let stream = upstream.connect(self.connect_timeout).await?;
        match stream.into_h2() {
            Err(stream) => Ok(Connection::new(stream)),
            Ok(_) => {
                h2::forget(&upstream.pool_key);
                let changed = std::io::Error::other("the upstream now chooses HTTP/2");
                Err(ForwardError::NotSent(ExchangeError::Write(changed)))
            }
        }
    }
}

/// The protocol the next request to an upstream goes in.
enum Protocol {
    /// HTTP/1.1, on an idle connection from the pool or a new one.
    Http1,
    /// HTTP/2, on this thread's connection to the upstream.
    H2(hyper::client::conn::http2::SendRequest<h2::SentBody>),
}

/// What an HTTP/2 exchange needs besides the request.
struct H2Exchange<'a> {
    upstream: &'a Upstream,
    kept: headers::Kept,
    client: SocketAddr,
    framing: RequestFraming,
    deadline: Instant,
}

/// How the request body goes upstream: the client's `Content-Length`; nothing for an empty body
/// (with `Content-Length: 0` where the method usually has a body, or the client sent one, as
/// storage may insist on it); chunked when the length is unknown. A body that is not empty
/// knows its declared length: the server that read the head framed it by its `Content-Length`
/// (hyper's too), so only an empty one needs the header looked up, and only for a method that
/// has no body as a rule.
fn request_framing(
    method: &Method,
    headers: &http::HeaderMap,
    body: &ClientBody,
) -> RequestFraming {
    if !body.is_end_stream() {
        return match body.size_hint().exact() {
            Some(length) => RequestFraming::Length(length),
            None => RequestFraming::Chunked,
        };
    }
    if matches!(*method, Method::POST | Method::PUT | Method::PATCH)
        || headers.contains_key(CONTENT_LENGTH)
    {
        RequestFraming::Length(0)
    } else {
        RequestFraming::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_naming_the_upstream_become_paths_the_client_resolves() {
        let upstream: Upstream = "http://127.0.0.1:5984/api".parse().unwrap();
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::LOCATION,
            "http://127.0.0.1:5984/api/db/doc?rev=1".parse().unwrap(),
        );
        headers.insert(
            http::header::CONTENT_LOCATION,
            "http://elsewhere:80/api/x".parse().unwrap(),
        );
        headers.insert("x-origin", "http://127.0.0.1:5984/api/db".parse().unwrap());
        upstream.rewrite_self_references(&mut headers);
        assert_eq!(headers[http::header::LOCATION], "/db/doc?rev=1");
        assert_eq!(
            headers["x-origin"], "http://127.0.0.1:5984/api/db",
            "only Location and Content-Location are rewritten"
        );
        assert_eq!(
            headers[http::header::CONTENT_LOCATION],
            "http://elsewhere:80/api/x",
            "another host is left alone"
        );
        for (given, expected) in [
            ("http://127.0.0.1:5984/api", Some(&b"/"[..])),
            ("http://127.0.0.1:5984/apix/y", None),
            ("https://127.0.0.1:5984/api/y", None),
            ("/api/y", None),
        ] {
            assert_eq!(upstream.path_of(given.as_bytes()), expected, "{given}");
        }
    }

    #[test]
    fn upstream_urls_are_validated() {
        assert!("http://127.0.0.1:5984".parse::<Upstream>().is_ok());
        assert!("http://storage.internal".parse::<Upstream>().is_ok());
        let secure: Upstream = "https://storage.internal".parse().unwrap();
        assert_eq!(secure.to_string(), "https://storage.internal");
        assert_eq!(&*secure.host_port, "storage.internal:443");
        assert_eq!(&*secure.pool_key, "https://storage.internal:443");
        let plain: Upstream = "http://storage.internal".parse().unwrap();
        assert_eq!(&*plain.pool_key, "storage.internal:80");
        assert_eq!(
            plain.with_tls_files(TlsClientFiles::default()),
            Err(UpstreamUrlError::TlsFilesOnHttp)
        );
        assert_eq!(
            "ftp://x".parse::<Upstream>(),
            Err(UpstreamUrlError::NotHttp)
        );
        assert_eq!(
            "/just/a/path".parse::<Upstream>(),
            Err(UpstreamUrlError::NotHttp)
        );
        assert_eq!(
            "http://x/?a=1".parse::<Upstream>(),
            Err(UpstreamUrlError::Query)
        );
        assert!(matches!(
            "http://a b".parse::<Upstream>(),
            Err(UpstreamUrlError::Unparsable(_))
        ));
    }

    #[test]
    fn a_request_without_a_content_length_is_framed_by_its_body() {
        use http_body_util::Full;
        let none = http::HeaderMap::new();
        let framing = |method: Method, body: ClientBody| request_framing(&method, &none, &body);
        assert_eq!(
            framing(Method::DELETE, ClientBody::Empty),
            RequestFraming::None
        );
        assert_eq!(
            framing(Method::PUT, ClientBody::Empty),
            RequestFraming::Length(0)
        );
        // A body read whole for a profile goes on with its length, chunked or not as it came.
        let read = |bytes: &'static str| ClientBody::Read(Full::new(bytes::Bytes::from(bytes)));
        assert_eq!(framing(Method::PUT, read("ok")), RequestFraming::Length(2));
        assert_eq!(framing(Method::PUT, read("")), RequestFraming::Length(0));
        let mut declared = http::HeaderMap::new();
        declared.insert(CONTENT_LENGTH, http::HeaderValue::from_static("2"));
        let body = read("ok");
        assert_eq!(
            request_framing(&Method::POST, &declared, &body),
            RequestFraming::Length(2)
        );
        declared.insert(CONTENT_LENGTH, http::HeaderValue::from_static("0"));
        assert_eq!(
            request_framing(&Method::DELETE, &declared, &ClientBody::Empty),
            RequestFraming::Length(0),
            "a Content-Length: 0 the client sent goes on"
        );
    }

    /// Cluster mode: a request whose lease runs out while it is being sent (its process stopped
    /// and woke past the deadline, before the deadline watcher could tear it down) writes no
    /// further byte. The watcher is deliberately not running here: the write's own check is what
    /// is under test.
    mod lease {
        use super::*;
        use crate::cluster::ShardMap;
        use crate::cluster::clock::BootInstant;
        use crate::cluster::ownership::Ownership;
        use tokio::io::AsyncReadExt;

        /// The permits of token 1 on resource `r`, in a gate on a fresh database.
        async fn permits() -> (crate::gate::Permits, tempfile::TempDir) {
            let (gate, resource, dir) = crate::proxy::inflight::tests::gate().await;
            let permits = crate::proxy::inflight::tests::permits(&gate, &resource).await;
            (permits, dir)
        }

        /// An upstream that takes one connection and returns every byte it received on it, up
        /// to the client's close.
        async fn upstream() -> (Upstream, tokio::task::JoinHandle<Vec<u8>>) {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let received = tokio::spawn(async move {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut bytes = Vec::new();
                let _ = stream.read_to_end(&mut bytes).await;
                bytes
            });
            (url.parse().unwrap(), received)
        }

        fn put(expect_continue: bool) -> ClientRequest {
            let mut request = http::Request::builder()
                .method(Method::PUT)
                .uri("/w/1")
                .header(CONTENT_LENGTH, "1");
            if expect_continue {
                request = request.header(EXPECT, "100-continue");
            }
            let body = ClientBody::Read(http_body_util::Full::new(bytes::Bytes::from("x")));
            Box::new(request.body(body).unwrap())
        }

        async fn send(
            upstream: &Upstream,
            request: ClientRequest,
            in_flight: &InFlight,
        ) -> ForwardError {
            let client = UpstreamClient::new(Duration::from_secs(5), Duration::from_secs(1), 1024);
            let hop = Hop::Upstream(headers::Kept {
                keep_host: false,
                keep_authorization: true,
            });
            let sent = client.forward_to(
                upstream,
                hop,
                request,
                "127.0.0.1:1".parse().unwrap(),
                Some(in_flight),
                Instant::now(),
            );
            sent.await.expect_err("the lease ran out")
        }

        #[tokio::test]
        async fn a_request_whose_lease_ran_out_before_it_was_written_sends_nothing() {
            let ownership = Ownership::new("fg-1".into(), ShardMap::new(1), Duration::ZERO);
            ownership.grant(0, 1, BootInstant::now() + Duration::from_secs(60), None);
            let admission = ownership.admit(0).unwrap();
            let (permits, _dir) = permits().await;
            let in_flight = InFlight::new(permits, [admission.window()].into_iter().collect());
            // Admitted in time; the term ends before the request's first write.
            ownership.end(0);
            let (upstream, received) = upstream().await;
            let error = send(&upstream, put(false), &in_flight).await;
            assert!(error.lease_ended() && error.never_sent(), "{error:?}");
            assert_eq!(error.cause(), "lease_ended");
            assert_eq!(received.await.unwrap(), b"", "not one byte left fencegate");
        }

        #[tokio::test]
        async fn a_request_whose_lease_runs_out_mid_body_sends_no_more() {
            let ownership =
                Ownership::new("fg-1".into(), ShardMap::new(1), Duration::from_millis(10));
            // The head goes at once; the body waits a second for `100 Continue`, which never
            // comes, and the lease runs out in the meantime.
            ownership.grant(0, 1, BootInstant::now() + Duration::from_millis(300), None);
            let admission = ownership.admit(0).unwrap();
            let (permits, _dir) = permits().await;
            let in_flight = InFlight::new(permits, [admission.window()].into_iter().collect());
            let (upstream, received) = upstream().await;
            let error = send(&upstream, put(true), &in_flight).await;
            assert!(error.lease_ended() && !error.never_sent(), "{error:?}");
            let received = String::from_utf8(received.await.unwrap()).unwrap();
            assert!(
                received.starts_with("PUT /w/1 HTTP/1.1\r\n") && received.ends_with("\r\n\r\n"),
                "the head only, never the body: {received:?}"
            );
        }
    }

    #[test]
    fn forwarded_uri_keeps_path_and_query_under_the_base() {
        let plain: Upstream = "http://127.0.0.1:5984".parse().unwrap();
        let original: Uri = "/wallets/1?x=2".parse().unwrap();
        assert_eq!(plain.target_for(&original).concat(), "/wallets/1?x=2");

        let prefixed: Upstream = "http://127.0.0.1:5984/db/".parse().unwrap();
        assert_eq!(prefixed.target_for(&original).concat(), "/db/wallets/1?x=2");
        assert_eq!(prefixed.to_string(), "http://127.0.0.1:5984/db");
    }
}
