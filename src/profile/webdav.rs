//! WebDAV (RFC 4918): the path names the resource, and two things beyond it change state.
//!
//! - **`Destination`.** COPY and MOVE write a second path, named in a header. It is routed like a
//!   path, must reach the same upstream, and its resource is fenced beside the source's; the header
//!   is rewritten to the upstream's own URL for exactly the path that was fenced.
//! - **Collections.** A request on `/wallets/` changes every member below it. It is refused when
//!   another resource owns a path below it (see [`RouteTable::collection_conflict`]).
//!
//! Every path route behaves this way, with or without a profile: a plain file server may speak
//! WebDAV without saying so. `profile = "webdav"` adds what only WebDAV servers need: its
//! read-only methods (PROPFIND, REPORT, SEARCH) are the route's default `unfenced_methods`.

use http::header::HeaderName;
use http::{HeaderMap, HeaderValue, Method};

use crate::route::destination::{self, DestinationError};
use crate::route::{self, Resolved, ResourceKey, RouteTable};

/// The header naming the second path of a COPY or MOVE.
pub const DESTINATION: HeaderName = HeaderName::from_static("destination");

/// The methods a `profile = "webdav"` route passes without a token unless its `unfenced_methods`
/// says otherwise: HTTP's reads and WebDAV's (RFC 4918 9.1, RFC 3253 3.6, RFC 5323 2).
pub const UNFENCED_METHODS: [&str; 6] = ["GET", "HEAD", "OPTIONS", "PROPFIND", "REPORT", "SEARCH"];

/// [`UNFENCED_METHODS`] as methods.
pub fn unfenced_methods() -> Vec<Method> {
    UNFENCED_METHODS
        .iter()
        .filter_map(|name| Method::from_bytes(name.as_bytes()).ok())
        .collect()
}

/// The Destination of a COPY or MOVE, routed: a second resource the request changes.
#[derive(Debug)]
pub struct Destination<'a> {
    pub resolved: Resolved<'a>,
    /// Normalised, as routing saw it.
    pub path: String,
    /// The header to send upstream: the upstream's absolute URL of the fenced path.
    pub rewritten: HeaderValue,
}

/// The request's `Destination`, routed, if it has one; `authority` is the host the client
/// addressed, which an absolute destination must name.
pub fn destination<'r, 'a>(
    routes: &'r RouteTable,
    source: &Resolved<'_>,
    headers: &HeaderMap,
    authority: impl FnOnce() -> Option<&'a str>,
) -> Result<Option<Destination<'r>>, DestinationError> {
    if crate::header_maps::lacks(headers, &DESTINATION) {
        return Ok(None);
    }
    let mut values = headers.get_all(DESTINATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(DestinationError::Repeated);
    }
    let value = value.to_str().map_err(|_| DestinationError::NotAUrl)?;
    let raw = destination::destination_path(value, authority())?;
    let path = route::normalise_path(raw).map_err(DestinationError::Path)?;
    let mut resolved = routes
        .resolve(&path)
        .ok_or_else(|| DestinationError::NoRoute(raw.to_owned()))?;
    // Copying or moving a collection makes the destination one, whatever its spelling.
    resolved.names_collection |= source.names_collection;
    if resolved.route.upstream() != source.route.upstream() {
        return Err(DestinationError::OtherUpstream {
            destination: resolved.route.upstream().to_string(),
            source_upstream: source.route.upstream().to_string(),
        });
    }
    let rewritten = HeaderValue::from_str(&resolved.route.upstream().absolute_url(raw))
        .map_err(|_| DestinationError::NotAUrl)?;
    Ok(Some(Destination {
        resolved,
        path: path.into_owned(),
        rewritten,
    }))
}

/// A request on a collection above other resources' paths, at its own path or at its
/// Destination: the collection's path, the path below it that another resource owns, and the
/// resource the refusal is audited under.
#[derive(Debug)]
pub struct CollectionConflict {
    pub path: String,
    pub below: String,
    pub resource: ResourceKey,
}

/// The first collection conflict of a request at `path` (and its destination), if any.
pub fn collection_conflict(
    routes: &RouteTable,
    method: &Method,
    path: &str,
    source: &Resolved<'_>,
    destination: Option<&Destination<'_>>,
) -> Option<CollectionConflict> {
    let targets =
        std::iter::once((path, source)).chain(destination.map(|d| (d.path.as_str(), &d.resolved)));
    for (path, resolved) in targets {
        if let Some(below) = routes.collection_conflict(path, resolved, method) {
            return Some(CollectionConflict {
                path: path.to_owned(),
                below: below.path().to_owned(),
                resource: resolved.resource.clone(),
            });
        }
    }
    None
}
