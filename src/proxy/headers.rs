//! Proxy header conventions: hop-by-hop removal, `Forwarded` / `X-Forwarded-For`, and the refusal
//! of method-override headers.

use std::cell::RefCell;
use std::fmt::Write;
use std::net::{IpAddr, SocketAddr};

use bytes::{BufMut, BytesMut};
use http::HeaderMap;
use http::header::{
    AUTHORIZATION, CONNECTION, CONTENT_LENGTH, HOST, HeaderName, HeaderValue, TE, TRAILER,
    TRANSFER_ENCODING, UPGRADE,
};
use smallvec::SmallVec;

use super::upstream::wire;
use crate::problem::ProxyError;
use crate::tls::ClientIdentity;

/// Hop-by-hop headers (RFC 9110 §7.6.1, plus the legacy ones proxies still see). They describe
/// one connection and are never passed on.
const HOP_BY_HOP: [HeaderName; 8] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
    TE,
    TRANSFER_ENCODING,
    UPGRADE,
];

/// Headers that some frameworks use to run a request as another method. A GET carrying one could
/// become an unfenced write upstream, so they are refused on every route.
const METHOD_OVERRIDES: [HeaderName; 3] = [
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-method-override"),
    HeaderName::from_static("x-http-method"),
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The `Destination` header of WebDAV's COPY and MOVE: a second path the request writes.
pub(super) const DESTINATION: HeaderName = crate::profile::webdav::DESTINATION;

/// Headers that fencing reads or that must reach the upstream as the client sent them. A
/// `Connection` header naming one would have fencegate check it and then strip it as hop-by-hop:
/// storage that checks tokens itself would be switched off by the client.
const FENCING_HEADERS: [HeaderName; 2] = [crate::token::FENCING_TOKEN, DESTINATION];

/// Refuses a request that carries a method-override header.
///
/// One pass over the names the request has, not a lookup of each override: every request is
/// checked, it carries a handful of headers, and three lookups hashed three names each time.
pub(super) fn refuse_method_override(headers: &HeaderMap) -> Result<(), ProxyError> {
    let overriding = headers
        .keys()
        .filter(|name| name.as_str().starts_with("x-"))
        .find(|name| METHOD_OVERRIDES.contains(name));
    match overriding {
        Some(name) => Err(ProxyError::MethodOverride(name.clone())),
        None => Ok(()),
    }
}

/// Refuses a `Connection` header that names a header fencing depends on: `Fencing-Token`,
/// `Destination`, and `also` (a route's own `token_header`).
pub(super) fn refuse_hop_by_hop_fencing_headers(
    headers: &HeaderMap,
    also: Option<&HeaderName>,
) -> Result<(), ProxyError> {
    let named = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .find_map(|name| {
            FENCING_HEADERS
                .iter()
                .chain(also)
                .find(|fencing| fencing.as_str().eq_ignore_ascii_case(name.trim()))
                .cloned()
        });
    match named {
        Some(name) => Err(ProxyError::HopByHopFencingHeader(name)),
        None => Ok(()),
    }
}

/// Whether `name` is hop-by-hop on its own; `Connection` may name more.
pub(super) fn is_hop_by_hop(name: &HeaderName) -> bool {
    *name == TRAILER || HOP_BY_HOP.contains(name)
}

/// The headers of an upstream's answer that the proxy reads or changes before passing it on:
/// the self-references it rewrites, and those it adds unless present (`X-Request-Id`,
/// `Fencegate-Replica`) or replaces (`Fencing-Token-Highest`). An answer with none of them
/// keeps its headers verbatim ([`crate::verbatim`]), and what the proxy adds goes into an
/// otherwise empty map, with no name shared. Code that reads or changes another header of an
/// upstream's answer adds it here and to [`answer_header`].
#[cfg_attr(not(test), allow(dead_code))]
const HANDLED_IN_ANSWERS: [HeaderName; 5] = [
    http::header::LOCATION,
    http::header::CONTENT_LOCATION,
    super::request_id::X_REQUEST_ID,
    crate::token::FENCING_TOKEN_HIGHEST,
    FENCEGATE_REPLICA,
];

/// What a header of an upstream's answer is to the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AnswerHeader {
    Connection,
    TransferEncoding,
    ContentLength,
    Date,
    /// Another header that is hop-by-hop on its own ([`HOP_BY_HOP`], `Trailer`).
    HopByHop,
    /// One of [`HANDLED_IN_ANSWERS`].
    Handled,
    Other,
}

/// What the header named `name` (any case) is to the proxy. By length first: most names are
/// told apart by it alone, and no name is compared with more than two (comparing each with the
/// fourteen known ones was 850 instructions per answer, `bench/instructions.sh`).
pub(crate) fn answer_header(name: &[u8]) -> AnswerHeader {
    use AnswerHeader::*;
    let is = |known: &[u8]| crate::ascii::eq_lowercase(name, known);
    match name.len() {
        2 if is(b"te") => HopByHop,
        4 if is(b"date") => Date,
        7 if is(b"upgrade") || is(b"trailer") => HopByHop,
        8 if is(b"location") => Handled,
        10 if is(b"connection") => Connection,
        10 if is(b"keep-alive") => HopByHop,
        12 if is(b"x-request-id") => Handled,
        14 if is(b"content-length") => ContentLength,
        16 if is(b"proxy-connection") => HopByHop,
        16 if is(b"content-location") => Handled,
        17 if is(b"transfer-encoding") => TransferEncoding,
        17 if is(b"fencegate-replica") => Handled,
        18 if is(b"proxy-authenticate") => HopByHop,
        19 if is(b"proxy-authorization") => HopByHop,
        21 if is(b"fencing-token-highest") => Handled,
        _ => Other,
    }
}

/// The headers of `headers` that go on to the next hop: not hop-by-hop, not named by
/// `Connection`, not `Content-Length` (the head writes its own framing), and not `also_left_out`.
fn end_to_end(
    headers: &HeaderMap,
    also_left_out: impl Fn(&HeaderName) -> bool,
) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
    let hop = HopFilter::of(headers);
    headers
        .iter()
        .filter(move |(name, _)| hop.passes(name) && !also_left_out(name))
}

/// Which headers of a map are this hop's only: the hop-by-hop ones, those its `Connection`
/// names, and `Content-Length`.
struct HopFilter<'a> {
    headers: &'a HeaderMap,
    has_connection: bool,
}

impl<'a> HopFilter<'a> {
    fn of(headers: &'a HeaderMap) -> Self {
        HopFilter {
            headers,
            has_connection: headers.contains_key(CONNECTION),
        }
    }

    fn passes(&self, name: &HeaderName) -> bool {
        !(is_hop_by_hop(name)
            || *name == CONTENT_LENGTH
            || (self.has_connection && self.named_by_connection(name)))
    }

    fn named_by_connection(&self, name: &HeaderName) -> bool {
        self.headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|named| named.trim().eq_ignore_ascii_case(name.as_str()))
    }
}

/// Which of the client's headers that fencegate may consume an upstream still gets.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Kept {
    /// The client's `Host` (storage that signs it, like S3, needs it unchanged).
    pub keep_host: bool,
    /// `Authorization`, unless it carries fencegate's own bearer token (`allow_bearer_sha256`).
    pub keep_authorization: bool,
}

/// Writes a client's request headers into the upstream request head, as header lines: hop-by-hop
/// headers (and those `Connection` names) are left out, the client's `Host` too unless
/// `keep_host` (the upstream gets its own authority, and the original host travels in
/// `Forwarded`), `Authorization` unless `keep_authorization`, and the client's address is
/// appended to `Forwarded` and `X-Forwarded-For`. The framing headers are the head's own.
/// Written straight from the client's map, with no copy of it: this runs on every request.
pub(super) fn write_upstream_headers(
    out: &mut BytesMut,
    headers: &HeaderMap,
    client: SocketAddr,
    kept: Kept,
) {
    // `Host` and `X-Forwarded-For` are noted in the same pass as the rest is written (whatever
    // `Connection` says of them): two lookups in the map cost more than the writing.
    let hop = HopFilter::of(headers);
    let mut host = None;
    let mut chain = SmallVec::<[&HeaderValue; 2]>::new();
    for (name, value) in headers {
        if *name == HOST {
            host.get_or_insert(value);
            if !kept.keep_host {
                continue;
            }
        } else if *name == X_FORWARDED_FOR {
            chain.push(value);
            continue;
        } else if *name == AUTHORIZATION && !kept.keep_authorization {
            continue;
        }
        if hop.passes(name) {
            wire::write_header(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    write_forwarded(out, client.ip(), host);
    write_x_forwarded_for(out, &chain, client.ip());
}

/// The header that carries the client's address over the peer plane (cluster mode).
pub(super) const FENCEGATE_CLIENT: HeaderName = HeaderName::from_static("fencegate-client");
/// The header that carries the client's certificate identity over the peer plane.
pub(super) const FENCEGATE_CLIENT_IDENTITY: HeaderName =
    HeaderName::from_static("fencegate-client-identity");
/// The header that carries the cluster secret over the peer plane.
pub(super) const FENCEGATE_CLUSTER_SECRET: HeaderName =
    HeaderName::from_static("fencegate-cluster-secret");
/// The replica that answered a fenced request (cluster mode).
pub(super) const FENCEGATE_REPLICA: HeaderName = HeaderName::from_static("fencegate-replica");

/// Writes a client's request headers for the owner of its shard: every end-to-end header as
/// sent (`Host`, `Forwarded` and `X-Forwarded-For` included: the owner writes the upstream's), and
/// the client's address, certificate identity and the cluster secret in headers of fencegate's
/// own, replacing any a client sent.
pub(super) fn write_peer_headers(
    out: &mut BytesMut,
    headers: &HeaderMap,
    client: SocketAddr,
    identity: Option<&ClientIdentity>,
    secret: Option<&str>,
) {
    let left_out = |name: &HeaderName| {
        *name == FENCEGATE_CLIENT
            || *name == FENCEGATE_CLIENT_IDENTITY
            || *name == FENCEGATE_CLUSTER_SECRET
    };
    for (name, value) in end_to_end(headers, left_out) {
        wire::write_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    wire::write_header(
        out,
        FENCEGATE_CLIENT.as_str().as_bytes(),
        client.to_string().as_bytes(),
    );
    if let Some(identity) = identity {
        wire::write_header(
            out,
            FENCEGATE_CLIENT_IDENTITY.as_str().as_bytes(),
            identity.to_header().as_bytes(),
        );
    }
    if let Some(secret) = secret {
        wire::write_header(
            out,
            FENCEGATE_CLUSTER_SECRET.as_str().as_bytes(),
            secret.as_bytes(),
        );
    }
}

/// `Forwarded: for=…;proto=http;host="…"`, as a line of its own after any the client sent.
fn write_forwarded(out: &mut BytesMut, client: IpAddr, host: Option<&HeaderValue>) {
    out.extend_from_slice(b"forwarded: for=");
    with_ip_text(client, |ip| match client {
        IpAddr::V4(_) => out.extend_from_slice(ip.as_bytes()),
        IpAddr::V6(_) => {
            out.extend_from_slice(b"\"[");
            out.extend_from_slice(ip.as_bytes());
            out.extend_from_slice(b"]\"");
        }
    });
    out.extend_from_slice(b";proto=http");
    // Only a host that is safe inside a quoted-string is passed on.
    if let Some(host) = host.and_then(|h| h.to_str().ok())
        && !host.is_empty()
        && !host.contains(['"', '\\'])
    {
        out.extend_from_slice(b";host=\"");
        out.extend_from_slice(host.as_bytes());
        out.put_u8(b'"');
    }
    out.extend_from_slice(b"\r\n");
}

/// `X-Forwarded-For`: the client's chain, if it sent one, then the client's address, in one line.
fn write_x_forwarded_for(out: &mut BytesMut, chain: &[&HeaderValue], client: IpAddr) {
    out.extend_from_slice(b"x-forwarded-for: ");
    for earlier in chain {
        if let Ok(earlier) = earlier.to_str() {
            out.extend_from_slice(earlier.as_bytes());
            out.extend_from_slice(b", ");
        }
    }
    with_ip_text(client, |ip| out.extend_from_slice(ip.as_bytes()));
    out.extend_from_slice(b"\r\n");
}

thread_local! {
    /// The last client address this thread wrote, as text: a connection's requests all come from
    /// one address, so it is formatted once, not twice per request.
    static IP_TEXT: RefCell<(Option<IpAddr>, String)> = const { RefCell::new((None, String::new())) };
}

fn with_ip_text<R>(ip: IpAddr, use_text: impl FnOnce(&str) -> R) -> R {
    IP_TEXT.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != Some(ip) {
            cached.1.clear();
            // Writing to a String cannot fail.
            let _ = write!(cached.1, "{ip}");
            cached.0 = Some(ip);
        }
        use_text(&cached.1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answers_header_is_told_by_its_name_in_any_case() {
        use AnswerHeader::*;
        let class = |name: &HeaderName| {
            let lower = answer_header(name.as_str().as_bytes());
            let upper = answer_header(name.as_str().to_ascii_uppercase().as_bytes());
            assert_eq!(lower, upper, "{name}");
            lower
        };
        assert_eq!(class(&CONNECTION), Connection);
        assert_eq!(class(&TRANSFER_ENCODING), TransferEncoding);
        assert_eq!(class(&CONTENT_LENGTH), ContentLength);
        assert_eq!(class(&http::header::DATE), Date);
        for name in HOP_BY_HOP.iter().chain([&TRAILER]) {
            if *name != CONNECTION && *name != TRANSFER_ENCODING {
                assert_eq!(class(name), HopByHop, "{name}");
            }
        }
        for name in &HANDLED_IN_ANSWERS {
            assert_eq!(class(name), Handled, "{name}");
        }
        // Names of the same lengths as known ones, and a few common ones.
        for name in [
            "tf",
            "dato",
            "upgrades",
            "locatio",
            "x-request-ix",
            "content-type",
            "content-range",
            "proxy-connectiox",
            "content-encoding",
            "transfer-encodinh",
            "fencegate-replicas",
            "etag",
            "server",
            "set-cookie",
            "last-modified",
            "cache-control",
            "vary",
            "x-upstream",
            "accept-charset",
            "content-disposition",
            "fencing-token-highesu",
        ] {
            assert_eq!(answer_header(name.as_bytes()), Other, "{name}");
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    /// The header lines the upstream gets, in order, names lower-cased.
    fn upstream_lines(map: &HeaderMap, client: &str, keep_host: bool) -> Vec<(String, String)> {
        let kept = Kept {
            keep_host,
            keep_authorization: true,
        };
        upstream_lines_keeping(map, client, kept)
    }

    fn upstream_lines_keeping(map: &HeaderMap, client: &str, kept: Kept) -> Vec<(String, String)> {
        let mut out = BytesMut::new();
        write_upstream_headers(&mut out, map, client.parse().unwrap(), kept);
        String::from_utf8(out.to_vec())
            .unwrap()
            .lines()
            .map(|line| {
                let (name, value) = line.split_once(": ").unwrap();
                (name.to_owned(), value.to_owned())
            })
            .collect()
    }

    fn value<'a>(lines: &'a [(String, String)], name: &str) -> Vec<&'a str> {
        lines
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    #[test]
    fn hop_by_hop_headers_never_reach_the_upstream() {
        let map = headers(&[
            ("connection", "close, x-secret"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("x-secret", "1"),
            ("content-type", "text/plain"),
        ]);
        let lines = upstream_lines(&map, "192.0.2.7:4000", false);
        let names: Vec<&str> = lines.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["content-type", "forwarded", "x-forwarded-for"]);
    }

    #[test]
    fn authorization_reaches_the_upstream_unless_it_carries_fencegates_own_bearer_token() {
        let map = headers(&[
            ("authorization", "Bearer x"),
            ("content-type", "text/plain"),
        ]);
        let kept = |keep_authorization| Kept {
            keep_host: false,
            keep_authorization,
        };
        let storage_credential = upstream_lines_keeping(&map, "192.0.2.7:4000", kept(true));
        assert_eq!(value(&storage_credential, "authorization"), ["Bearer x"]);
        assert_eq!(value(&storage_credential, "content-type"), ["text/plain"]);
        let fencegates_own = upstream_lines_keeping(&map, "192.0.2.7:4000", kept(false));
        assert!(value(&fencegates_own, "authorization").is_empty());
        assert_eq!(value(&fencegates_own, "content-type"), ["text/plain"]);
    }

    #[test]
    fn client_address_is_appended_to_forwarding_headers() {
        let map = headers(&[
            ("host", "api.example"),
            ("x-forwarded-for", "10.0.0.1"),
            ("forwarded", "for=10.0.0.1"),
        ]);
        let lines = upstream_lines(&map, "192.0.2.7:4000", false);
        assert!(value(&lines, "host").is_empty());
        assert_eq!(value(&lines, "x-forwarded-for"), ["10.0.0.1, 192.0.2.7"]);
        assert_eq!(
            value(&lines, "forwarded"),
            [
                "for=10.0.0.1",
                "for=192.0.2.7;proto=http;host=\"api.example\""
            ]
        );
    }

    #[test]
    fn a_route_that_preserves_host_forwards_it_unchanged() {
        let map = headers(&[("host", "bucket-store:9000")]);
        let lines = upstream_lines(&map, "192.0.2.7:4000", true);
        assert_eq!(value(&lines, "host"), ["bucket-store:9000"]);
        assert_eq!(
            value(&lines, "forwarded"),
            ["for=192.0.2.7;proto=http;host=\"bucket-store:9000\""]
        );
    }

    #[test]
    fn ipv6_clients_are_quoted_in_forwarded() {
        let lines = upstream_lines(&HeaderMap::new(), "[::1]:4000", false);
        assert_eq!(value(&lines, "forwarded"), ["for=\"[::1]\";proto=http"]);
        assert_eq!(value(&lines, "x-forwarded-for"), ["::1"]);
    }

    #[test]
    fn a_connection_header_naming_a_fencing_header_is_refused() {
        for value in [
            "Fencing-Token",
            "close, fencing-token",
            "keep-alive,DESTINATION",
        ] {
            let map = headers(&[("connection", value)]);
            assert!(
                refuse_hop_by_hop_fencing_headers(&map, None).is_err(),
                "{value}"
            );
        }
        let map = headers(&[("connection", "close, x-fencing-token-ish")]);
        assert!(refuse_hop_by_hop_fencing_headers(&map, None).is_ok());
        // A route's own token header counts too.
        let custom = HeaderName::from_static("x-fencing-token-ish");
        assert!(refuse_hop_by_hop_fencing_headers(&map, Some(&custom)).is_err());
    }

    #[test]
    fn every_method_override_header_is_refused() {
        for name in [
            "X-HTTP-Method-Override",
            "X-Method-Override",
            "X-HTTP-Method",
        ] {
            let map = headers(&[(name, "DELETE")]);
            assert!(refuse_method_override(&map).is_err(), "{name}");
        }
        assert!(refuse_method_override(&headers(&[("x-other", "1")])).is_ok());
    }

    #[test]
    fn the_peer_hop_carries_only_fencegates_own_client_address_and_identity() {
        // A client that sends the peer headers itself must not speak for another client, or
        // claim an identity its certificate does not give it.
        let map = headers(&[
            ("fencegate-client", "10.9.9.9:1"),
            ("fencegate-client-identity", "spiffe://prod/wallet-leader"),
            ("fencegate-cluster-secret", "guess"),
            ("fencing-token", "7"),
        ]);
        let identity = ClientIdentity::of_names(["CN=intruder".to_owned()]).unwrap();
        let client: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let mut out = BytesMut::new();
        write_peer_headers(&mut out, &map, client, Some(&identity), Some("s3cret"));
        let text = String::from_utf8(out.to_vec()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.contains(&"fencing-token: 7"), "{text}");
        assert!(
            lines.contains(&"fencegate-client: 127.0.0.1:5000"),
            "{text}"
        );
        assert!(
            lines.contains(&"fencegate-client-identity: CN=intruder"),
            "{text}"
        );
        assert!(
            lines.contains(&"fencegate-cluster-secret: s3cret"),
            "{text}"
        );
        assert!(
            !text.contains("10.9.9.9")
                && !text.contains("wallet-leader")
                && !text.contains("guess"),
            "{text}"
        );

        let mut anonymous = BytesMut::new();
        write_peer_headers(&mut anonymous, &map, client, None, None);
        let text = String::from_utf8(anonymous.to_vec()).unwrap();
        assert!(!text.contains("fencegate-client-identity"), "{text}");
    }
}
