//! The `Destination` header of WebDAV's COPY and MOVE (RFC 4918 §10.3): a second path that a
//! request writes, which must be fenced like the first.
//!
//! The header is either a path (`/wallets/1`) or an absolute URL on the same server
//! (`http://fencegate.internal/wallets/1`). Anything else is refused rather than guessed at: a URL
//! on another server, a query or fragment, or a value that is not a URL at all.

use http::Uri;

use super::PathError;

/// Why a `Destination` header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DestinationError {
    #[error("the Destination header is present more than once")]
    Repeated,
    #[error("the Destination header is not a path or an http(s) URL")]
    NotAUrl,
    #[error(
        "the Destination header names another server ({named}) than this request ({host}); fencegate cannot fence a write there"
    )]
    OtherServer { named: String, host: String },
    #[error("the Destination header has a query or a fragment, which upstreams read differently")]
    QueryOrFragment,
    #[error("the Destination path: {0}")]
    Path(#[from] PathError),
    #[error("no route matches the Destination path {0}")]
    NoRoute(String),
    #[error(
        "the Destination path routes to another upstream ({destination}) than the request ({source_upstream}); a copy between upstreams cannot be fenced as one write"
    )]
    OtherUpstream {
        destination: String,
        source_upstream: String,
    },
}

/// The path a `Destination` value names, exactly as sent (still percent-encoded), for
/// [`super::normalise_path`] and for the upstream. `host` is the request's own authority (its
/// `Host` header, or the `:authority` of HTTP/2); an absolute URL must name it.
///
/// ```
/// use fencegate::route::destination::{DestinationError, destination_path};
///
/// assert_eq!(destination_path("/wallets/1", Some("fg:8080")), Ok("/wallets/1"));
/// assert_eq!(destination_path("http://FG:8080/wallets/%31", Some("fg:8080")), Ok("/wallets/%31"));
/// assert!(matches!(
///     destination_path("http://elsewhere/wallets/1", Some("fg:8080")),
///     Err(DestinationError::OtherServer { .. })
/// ));
/// ```
pub fn destination_path<'a>(
    value: &'a str,
    host: Option<&str>,
) -> Result<&'a str, DestinationError> {
    if value.contains(['?', '#']) {
        return Err(DestinationError::QueryOrFragment);
    }
    if value.starts_with('/') {
        return Ok(value);
    }
    let uri: Uri = value.parse().map_err(|_| DestinationError::NotAUrl)?;
    let (scheme, authority) = match (uri.scheme_str(), uri.authority()) {
        (Some(scheme), Some(authority)) => (scheme.to_ascii_lowercase(), authority.as_str()),
        _ => return Err(DestinationError::NotAUrl),
    };
    let default_port = match scheme.as_str() {
        "http" => ":80",
        "https" => ":443",
        _ => return Err(DestinationError::NotAUrl),
    };
    let same_server = host.is_some_and(|host| {
        let strip = |name: &str| {
            let lower = name.to_ascii_lowercase();
            lower
                .strip_suffix(default_port)
                .map(str::to_owned)
                .unwrap_or(lower)
        };
        !authority.contains('@') && strip(authority) == strip(host)
    });
    if !same_server {
        return Err(DestinationError::OtherServer {
            named: authority.to_owned(),
            host: host.unwrap_or("none").to_owned(),
        });
    }
    // `scheme://authority` is followed by the path exactly as sent; an empty one is the root.
    let after_authority = &value[value.find("://").map_or(0, |i| i + 3) + authority.len()..];
    if after_authority.is_empty() {
        return Ok("/");
    }
    if !after_authority.starts_with('/') {
        return Err(DestinationError::NotAUrl);
    }
    Ok(after_authority)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: Option<&str> = Some("fencegate.internal:8080");

    #[test]
    fn a_path_or_a_url_on_this_server_names_its_path_as_sent() {
        assert_eq!(destination_path("/wallets/1", HOST), Ok("/wallets/1"));
        assert_eq!(destination_path("/wallets//1", HOST), Ok("/wallets//1"));
        assert_eq!(
            destination_path("http://fencegate.internal:8080/wallets/%31", HOST),
            Ok("/wallets/%31")
        );
        assert_eq!(
            destination_path("HTTP://FenceGate.Internal:8080/a", HOST),
            Ok("/a")
        );
        assert_eq!(
            destination_path("http://fencegate.internal:8080", HOST),
            Ok("/")
        );
        assert_eq!(
            destination_path("http://fg/x", Some("fg:80")),
            Ok("/x"),
            "the default port is the same server"
        );
    }

    #[test]
    fn other_servers_and_ambiguous_values_are_refused() {
        for (value, expected) in [
            ("http://other:8080/wallets/1", "other"),
            ("http://user@fencegate.internal:8080/a", "other"),
            ("ftp://fencegate.internal:8080/a", "url"),
            ("wallets/1", "url"),
            ("", "url"),
            ("/wallets/1?x=1", "query"),
            ("/wallets/1#top", "query"),
            ("http://fencegate.internal:8080/a?b", "query"),
        ] {
            let error = destination_path(value, HOST).unwrap_err();
            let kind = match error {
                DestinationError::OtherServer { .. } => "other",
                DestinationError::NotAUrl => "url",
                DestinationError::QueryOrFragment => "query",
                other => panic!("{value:?}: {other:?}"),
            };
            assert_eq!(kind, expected, "{value:?}");
        }
        assert!(matches!(
            destination_path("http://fencegate.internal:8080/a", None),
            Err(DestinationError::OtherServer { .. })
        ));
    }
}
