//! The upstream side: where a route forwards to, and the pooled client that does it.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use http_body_util::LengthLimitError;
use http_body_util::Limited;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::headers;
use super::inflight::{BodyDeadline, InFlight, SentBody};
use crate::route::Route;

/// How long an idle pooled upstream connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// A route's upstream: an `http://host:port` base, optionally with a path prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    authority: Authority,
    /// Prepended to every forwarded path; empty or starting with `/`, never ending with one.
    prefix: String,
}

/// Why an upstream URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamUrlError {
    #[error("is not a URL ({0}); write it like http://127.0.0.1:5984")]
    Unparsable(String),
    #[error("must be an http:// URL with a host, like http://127.0.0.1:5984")]
    NotHttp,
    #[error(
        "uses https, which fencegate does not speak to upstreams; terminate TLS in front of storage or use http on a private network"
    )]
    Https,
    #[error("must not have a query string")]
    Query,
}

impl FromStr for Upstream {
    type Err = UpstreamUrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let uri: Uri = s
            .parse()
            .map_err(|e: http::uri::InvalidUri| UpstreamUrlError::Unparsable(e.to_string()))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => return Err(UpstreamUrlError::Https),
            _ => return Err(UpstreamUrlError::NotHttp),
        }
        let authority = uri.authority().cloned().ok_or(UpstreamUrlError::NotHttp)?;
        if uri.query().is_some() {
            return Err(UpstreamUrlError::Query);
        }
        Ok(Self {
            authority,
            prefix: uri.path().trim_end_matches('/').to_owned(),
        })
    }
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.authority, self.prefix)
    }
}

impl Upstream {
    /// The absolute URL of `path` (as sent, percent-encoded) on this upstream: what a rewritten
    /// `Destination` header says, so that the upstream reads the very path fencegate fenced.
    pub fn absolute_url(&self, path: &str) -> String {
        format!("http://{}{}{path}", self.authority, self.prefix)
    }

    /// The upstream URI for a client's request target: the same path and query, under this base.
    fn uri_for(&self, original: &Uri) -> Result<Uri, http::Error> {
        let path_and_query = match (self.prefix.is_empty(), original.path_and_query()) {
            (true, Some(pq)) => pq.clone(),
            (_, pq) => {
                let pq = pq.map_or("/", PathAndQuery::as_str);
                PathAndQuery::from_str(&format!("{}{pq}", self.prefix))?
            }
        };
        Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
    }
}

/// A request body on its way upstream: the client's, streaming, or one fencegate has already read
/// (where a profile named resources from it).
pub type UpstreamBody = http_body_util::Either<Incoming, http_body_util::Full<bytes::Bytes>>;

/// Why forwarding failed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("cannot connect to the upstream: {0}")]
    Connect(#[source] hyper_util::client::legacy::Error),
    #[error("the upstream exchange failed: {0}")]
    Exchange(#[source] hyper_util::client::legacy::Error),
    #[error("the upstream did not answer in time")]
    Timeout,
    #[error("the request body exceeded the limit")]
    BodyTooLarge,
    #[error("cannot build the upstream URI: {0}")]
    Uri(#[from] http::Error),
    #[error(
        "the upstream answered 101 Switching Protocols; fencegate does not tunnel other protocols, whose writes it could not fence"
    )]
    SwitchedProtocols,
}

impl ForwardError {
    /// Whether the upstream certainly never received the request, so it cannot apply it later.
    pub fn never_sent(&self) -> bool {
        matches!(self, ForwardError::Connect(_) | ForwardError::Uri(_))
    }
}

/// The pooled keep-alive HTTP/1.1 client used for every upstream.
#[derive(Debug, Clone)]
pub struct UpstreamClient {
    client: Client<HttpConnector, Limited<SentBody<UpstreamBody>>>,
    timeout: Duration,
    connect_timeout: Duration,
    max_body: u64,
}

impl UpstreamClient {
    /// A client whose exchanges time out after `timeout` (connecting, within that, after
    /// `connect_timeout`) and whose request bodies stop at `max_body` bytes.
    pub fn new(timeout: Duration, connect_timeout: Duration, max_body: u64) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build(connector);
        Self {
            client,
            timeout,
            connect_timeout,
            max_body,
        }
    }

    /// A client with the same settings and a pool of its own: one per data-plane thread, so that
    /// a request and its upstream connection are driven by the same thread.
    pub fn with_own_pool(&self) -> Self {
        Self::new(self.timeout, self.connect_timeout, self.max_body)
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
    /// A fenced request's `in_flight` learns when its body has been sent in full. The whole
    /// exchange, the request body included, must be done within the upstream timeout.
    pub(super) async fn forward(
        &self,
        route: &Route,
        request: Request<UpstreamBody>,
        client: SocketAddr,
        in_flight: Option<&InFlight>,
    ) -> Result<Response<Incoming>, ForwardError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let (mut parts, body) = request.into_parts();
        parts.uri = route.upstream().uri_for(&parts.uri)?;
        // The client may have spoken HTTP/2 to us; the upstream connection is HTTP/1.1.
        parts.version = Version::HTTP_11;
        headers::prepare_upstream_request(&mut parts.headers, client, route.preserves_host());
        let limit = usize::try_from(self.max_body).unwrap_or(usize::MAX);
        let body = Limited::new(SentBody::new(body, in_flight, deadline), limit);
        let request = Request::from_parts(parts, body);
        let mut response =
            match tokio::time::timeout_at(deadline, self.client.request(request)).await {
                Err(_) => return Err(ForwardError::Timeout),
                Ok(Err(e)) if caused_by::<LengthLimitError>(&e) => {
                    return Err(ForwardError::BodyTooLarge);
                }
                Ok(Err(e)) if caused_by::<BodyDeadline>(&e) => return Err(ForwardError::Timeout),
                Ok(Err(e)) if e.is_connect() => return Err(ForwardError::Connect(e)),
                Ok(Err(e)) => return Err(ForwardError::Exchange(e)),
                Ok(Ok(response)) => response,
            };
        // hyper hands a 101 over with the connection; relaying it would open a tunnel whose
        // traffic no gate sees.
        if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            return Err(ForwardError::SwitchedProtocols);
        }
        headers::strip_hop_by_hop(response.headers_mut());
        Ok(response)
    }
}

fn caused_by<E: std::error::Error + 'static>(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(e) = source {
        if e.is::<E>() {
            return true;
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls_are_validated() {
        assert!("http://127.0.0.1:5984".parse::<Upstream>().is_ok());
        assert!("http://storage.internal".parse::<Upstream>().is_ok());
        assert_eq!(
            "https://x".parse::<Upstream>(),
            Err(UpstreamUrlError::Https)
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
    fn forwarded_uri_keeps_path_and_query_under_the_base() {
        let plain: Upstream = "http://127.0.0.1:5984".parse().unwrap();
        let original: Uri = "/wallets/1?x=2".parse().unwrap();
        assert_eq!(
            plain.uri_for(&original).unwrap(),
            "http://127.0.0.1:5984/wallets/1?x=2"
        );

        let prefixed: Upstream = "http://127.0.0.1:5984/db/".parse().unwrap();
        assert_eq!(
            prefixed.uri_for(&original).unwrap(),
            "http://127.0.0.1:5984/db/wallets/1?x=2"
        );
        assert_eq!(prefixed.to_string(), "http://127.0.0.1:5984/db");
    }
}
