//! Proxy header conventions: hop-by-hop removal, `Forwarded` / `X-Forwarded-For`, and the refusal
//! of method-override headers.

use std::fmt::Write;
use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use http::header::{
    CONNECTION, FORWARDED, HOST, HeaderName, HeaderValue, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};

use crate::problem::ProxyError;

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
pub(super) fn refuse_method_override(headers: &HeaderMap) -> Result<(), ProxyError> {
    match METHOD_OVERRIDES
        .iter()
        .find(|name| headers.contains_key(*name))
    {
        Some(name) => Err(ProxyError::MethodOverride(name.clone())),
        None => Ok(()),
    }
}

/// Refuses a `Connection` header that names a header fencing depends on.
pub(super) fn refuse_hop_by_hop_fencing_headers(headers: &HeaderMap) -> Result<(), ProxyError> {
    let named = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .find_map(|name| {
            FENCING_HEADERS
                .into_iter()
                .find(|fencing| fencing.as_str().eq_ignore_ascii_case(name.trim()))
        });
    match named {
        Some(name) => Err(ProxyError::HopByHopFencingHeader(name)),
        None => Ok(()),
    }
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them, and one pass over a handful of names is cheaper than nine
    // hashed removals (measured: the removals were 1.7% of a fenced PUT's CPU time).
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    // `Trailer` announces trailers of this hop's framing; hyper re-frames the body.
    headers.remove(TRAILER);
}

/// Whether `name` is hop-by-hop on its own; `Connection` may name more.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    *name == TRAILER || HOP_BY_HOP.contains(name)
}

/// Prepares a client's request headers for the upstream: hop-by-hop headers go, the client's
/// `Host` goes unless `keep_host` (the upstream gets its own authority, and the original host
/// travels in `Forwarded`; storage that signs `Host`, like S3, gets it unchanged), and the
/// client's address is appended to `Forwarded` and `X-Forwarded-For`.
pub(super) fn prepare_upstream_request(
    headers: &mut HeaderMap,
    client: SocketAddr,
    keep_host: bool,
) {
    strip_hop_by_hop(headers);
    let host = if keep_host {
        headers.get(HOST).cloned()
    } else {
        headers.remove(HOST)
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded_element(client.ip(), host.as_ref())) {
        headers.append(FORWARDED, value);
    }
    append_x_forwarded_for(headers, client.ip());
}

fn forwarded_element(client: IpAddr, host: Option<&HeaderValue>) -> String {
    let mut element = String::with_capacity(64);
    // Writing to a String cannot fail.
    let _ = match client {
        IpAddr::V4(ip) => write!(element, "for={ip};proto=http"),
        IpAddr::V6(ip) => write!(element, "for=\"[{ip}]\";proto=http"),
    };
    // Only a host that is safe inside a quoted-string is passed on.
    if let Some(host) = host.and_then(|h| h.to_str().ok())
        && !host.is_empty()
        && !host.contains(['"', '\\'])
    {
        let _ = write!(element, ";host=\"{host}\"");
    }
    element
}

fn append_x_forwarded_for(headers: &mut HeaderMap, client: IpAddr) {
    let earlier: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .collect();
    let chain = if earlier.is_empty() {
        client.to_string()
    } else {
        format!("{}, {client}", earlier.join(", "))
    };
    if let Ok(value) = HeaderValue::from_str(&chain) {
        headers.insert(X_FORWARDED_FOR, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut map = headers(&[
            ("connection", "close, x-secret"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("x-secret", "1"),
            ("content-type", "text/plain"),
        ]);
        strip_hop_by_hop(&mut map);
        assert_eq!(map.len(), 1);
        assert_eq!(map["content-type"], "text/plain");

        // `Connection` alone still takes the headers it names with it.
        let mut map = headers(&[
            ("connection", "x-secret"),
            ("x-secret", "1"),
            ("accept", "*/*"),
        ]);
        strip_hop_by_hop(&mut map);
        assert_eq!(map.len(), 1);
        assert!(map.contains_key("accept"));
    }

    #[test]
    fn client_address_is_appended_to_forwarding_headers() {
        let mut map = headers(&[("host", "api.example"), ("x-forwarded-for", "10.0.0.1")]);
        prepare_upstream_request(&mut map, "192.0.2.7:4000".parse().unwrap(), false);
        assert!(!map.contains_key(HOST));
        assert_eq!(map["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(
            map[FORWARDED],
            "for=192.0.2.7;proto=http;host=\"api.example\""
        );
    }

    #[test]
    fn a_route_that_preserves_host_forwards_it_unchanged() {
        let mut map = headers(&[("host", "bucket-store:9000")]);
        prepare_upstream_request(&mut map, "192.0.2.7:4000".parse().unwrap(), true);
        assert_eq!(map[HOST], "bucket-store:9000");
        assert_eq!(
            map[FORWARDED],
            "for=192.0.2.7;proto=http;host=\"bucket-store:9000\""
        );
    }

    #[test]
    fn ipv6_clients_are_quoted_in_forwarded() {
        let mut map = HeaderMap::new();
        prepare_upstream_request(&mut map, "[::1]:4000".parse().unwrap(), false);
        assert_eq!(map[FORWARDED], "for=\"[::1]\";proto=http");
        assert_eq!(map["x-forwarded-for"], "::1");
    }

    #[test]
    fn a_connection_header_naming_a_fencing_header_is_refused() {
        for value in [
            "Fencing-Token",
            "close, fencing-token",
            "keep-alive,DESTINATION",
        ] {
            let map = headers(&[("connection", value)]);
            assert!(refuse_hop_by_hop_fencing_headers(&map).is_err(), "{value}");
        }
        let map = headers(&[("connection", "close, x-fencing-token-ish")]);
        assert!(refuse_hop_by_hop_fencing_headers(&map).is_ok());
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
}
