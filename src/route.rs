//! Routing: which upstream a request goes to and which resource it is fenced under.
//!
//! The resource is computed here from the configured route and the request path only, never from
//! anything else the client sends. To make the resource fencegate computes the one the upstream
//! writes, [`normalise_path`] first refuses every path that an upstream could read as a different
//! path (dot segments, encoded separators, empty segments, malformed escapes) and decodes the rest
//! once, exactly as the upstream will.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use http::Method;
use percent_encoding::percent_decode_str;

use crate::proxy::Upstream;

/// The name of a fenced resource, such as `wallet:42`. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceKey(Arc<str>);

impl ResourceKey {
    /// Wraps a resource name; names come from a route's template or from the database.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        Self(name.into())
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a request path was refused before routing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the request target must be an absolute path starting with /")]
    NotAbsolute,
    #[error("the path has an empty segment (//), which upstreams may merge into another path")]
    EmptySegment,
    #[error("the path has a `.` or `..` segment, which upstreams may resolve to another path")]
    DotSegment,
    #[error(
        "a path segment contains an encoded `/` or a `\\`, which upstreams may split differently"
    )]
    EncodedSeparator,
    #[error("the path has a malformed percent-escape")]
    MalformedEscape,
    #[error("the path does not decode to UTF-8 text without control characters")]
    NotText,
}

/// Checks a request path and returns it percent-decoded, segment by segment.
///
/// The decoded form is what routing matches against, so `/%77allets/1` reaches the `/wallets/{id}`
/// route just as it reaches the upstream's wallet handler.
///
/// ```
/// use fencegate::route::{PathError, normalise_path};
///
/// assert_eq!(normalise_path("/%77allets/1").as_deref(), Ok("/wallets/1"));
/// assert_eq!(normalise_path("/wallets/%2e%2e/admin"), Err(PathError::DotSegment));
/// assert_eq!(normalise_path("/wallets/a%2Fb"), Err(PathError::EncodedSeparator));
/// ```
pub fn normalise_path(raw: &str) -> Result<String, PathError> {
    let rest = raw.strip_prefix('/').ok_or(PathError::NotAbsolute)?;
    let mut decoded = String::with_capacity(raw.len());
    let mut segments = rest.split('/').peekable();
    while let Some(segment) = segments.next() {
        decoded.push('/');
        // A trailing slash (`/dir/`) is an ordinary path; an empty segment anywhere else is not.
        if segment.is_empty() {
            if segments.peek().is_none() {
                break;
            }
            return Err(PathError::EmptySegment);
        }
        decoded.push_str(&decode_segment(segment)?);
    }
    Ok(decoded)
}

fn decode_segment(raw: &str) -> Result<Cow<'_, str>, PathError> {
    if raw.contains('\\') {
        return Err(PathError::EncodedSeparator);
    }
    check_escapes(raw)?;
    let segment = percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| PathError::NotText)?;
    if segment.contains(['/', '\\']) {
        return Err(PathError::EncodedSeparator);
    }
    if segment == "." || segment == ".." {
        return Err(PathError::DotSegment);
    }
    if segment.chars().any(char::is_control) {
        return Err(PathError::NotText);
    }
    Ok(segment)
}

/// `percent_decode_str` passes a stray `%` through unchanged; an upstream might instead reject it or
/// decode it differently, so only well-formed escapes are accepted.
fn check_escapes(raw: &str) -> Result<(), PathError> {
    let bytes = raw.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(PathError::MalformedEscape)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return Err(PathError::MalformedEscape);
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    Ok(())
}

/// The methods a route fences when the config does not say.
pub const DEFAULT_FENCED_METHODS: [Method; 4] =
    [Method::POST, Method::PUT, Method::PATCH, Method::DELETE];

/// How a route treats one request's fencing token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fencing {
    /// A write: the token is required and checked.
    Required,
    /// A read on a `fence_reads` route: a token, when sent, is checked; none is also fine.
    IfPresent,
    /// A read: passed through unchecked.
    Off,
}

/// Why a route could not be built from its configuration. The config layer adds the key name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("{0}")]
    Path(String),
    #[error("uses {{{placeholder}}}, which path {path} does not capture")]
    UnknownPlaceholder { placeholder: String, path: String },
    #[error("has an unclosed or empty {{}} placeholder")]
    MalformedTemplate,
    #[error("must not be empty")]
    Empty,
}

/// One configured route: a path template, its upstream, and how its resource is named.
#[derive(Debug)]
pub struct Route {
    path: String,
    resource_template: String,
    matcher: matchit::Router<()>,
    upstream: Upstream,
    resource: ResourceTemplate,
    fenced_methods: Vec<Method>,
    fence_reads: bool,
    max_token_jump: Option<u64>,
}

/// The settings of a route other than its templates, already validated by the config layer.
#[derive(Debug, Clone)]
pub struct RoutePolicy {
    pub fenced_methods: Vec<Method>,
    pub fence_reads: bool,
    pub max_token_jump: Option<u64>,
}

impl Route {
    /// Builds a route; fails when the path template is invalid or the resource template names a
    /// capture the path does not have.
    pub fn new(
        path: &str,
        upstream: Upstream,
        resource: &str,
        policy: RoutePolicy,
    ) -> Result<Self, RouteError> {
        let matcher = build_matcher(path)?;
        let captures = captures_of(path);
        let template = ResourceTemplate::parse(resource, &captures, path)?;
        Ok(Self {
            path: path.to_owned(),
            resource_template: resource.to_owned(),
            matcher,
            upstream,
            resource: template,
            fenced_methods: policy.fenced_methods,
            fence_reads: policy.fence_reads,
            max_token_jump: policy.max_token_jump,
        })
    }

    /// The path template, as configured.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The resource template, as configured.
    pub fn resource_template(&self) -> &str {
        &self.resource_template
    }

    /// The methods whose requests must carry a current token.
    pub fn fenced_methods(&self) -> &[Method] {
        &self.fenced_methods
    }

    /// Whether reads that carry a token are fenced too.
    pub fn fence_reads(&self) -> bool {
        self.fence_reads
    }

    /// Where matching requests are forwarded.
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// The most a token may exceed the resource's highest, if limited.
    pub fn max_token_jump(&self) -> Option<u64> {
        self.max_token_jump
    }

    /// How this route treats a request with `method`.
    pub fn fencing_for(&self, method: &Method) -> Fencing {
        if self.fenced_methods.contains(method) {
            Fencing::Required
        } else if self.fence_reads {
            Fencing::IfPresent
        } else {
            Fencing::Off
        }
    }

    fn resolve(&self, decoded_path: &str) -> Option<ResourceKey> {
        let matched = self.matcher.at(decoded_path).ok()?;
        Some(self.resource.render(|name| {
            matched
                .params
                .iter()
                .find(|(key, _)| *key == name)
                .map_or("", |(_, value)| value)
        }))
    }
}

/// matchit renames a route's parameters to the letters `a` to `z` and panics past them; the fuzzer
/// found that a template with 26 parameters crashed start-up. Every parameter opens with a `{`, so
/// counting them keeps below the limit whatever matchit counts.
const MAX_PARAMETERS: usize = 25;

/// A catch-all such as `/{*rest}` does not match its own bare prefix (`/`) in matchit, but an
/// operator who writes one means "everything below here", so the prefix is registered too.
fn build_matcher(path: &str) -> Result<matchit::Router<()>, RouteError> {
    if !path.starts_with('/') {
        return Err(RouteError::Path("must start with /".into()));
    }
    if path.matches('{').count() > MAX_PARAMETERS {
        return Err(RouteError::Path(format!(
            "has more than {MAX_PARAMETERS} `{{`; a path template holds at most {MAX_PARAMETERS} parameters"
        )));
    }
    let mut matcher = matchit::Router::new();
    matcher
        .insert(path, ())
        .map_err(|e| RouteError::Path(e.to_string()))?;
    if let Some(open) = path.rfind("{*")
        && path.ends_with('}')
        && path[..open].ends_with('/')
    {
        matcher
            .insert(&path[..open], ())
            .map_err(|e| RouteError::Path(e.to_string()))?;
    }
    Ok(matcher)
}

fn captures_of(path: &str) -> Vec<String> {
    path.split('{')
        .skip(1)
        .filter_map(|after| after.split_once('}'))
        .map(|(name, _)| name.trim_start_matches('*').to_owned())
        .collect()
}

/// A resource name with `{capture}` placeholders, checked against the path template once.
#[derive(Debug)]
struct ResourceTemplate {
    parts: Vec<Part>,
    /// The key itself when the template has no placeholders, shared by every request.
    fixed: Option<ResourceKey>,
}

#[derive(Debug)]
enum Part {
    Literal(String),
    Capture(String),
}

impl ResourceTemplate {
    fn parse(source: &str, captures: &[String], path: &str) -> Result<Self, RouteError> {
        if source.is_empty() {
            return Err(RouteError::Empty);
        }
        let mut parts = Vec::new();
        let mut rest = source;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_owned()));
            }
            let (name, after) = rest[open + 1..]
                .split_once('}')
                .ok_or(RouteError::MalformedTemplate)?;
            if name.is_empty() || name.contains('{') {
                return Err(RouteError::MalformedTemplate);
            }
            if !captures.iter().any(|c| c == name) {
                return Err(RouteError::UnknownPlaceholder {
                    placeholder: name.to_owned(),
                    path: path.to_owned(),
                });
            }
            parts.push(Part::Capture(name.to_owned()));
            rest = after;
        }
        if rest.contains('}') {
            return Err(RouteError::MalformedTemplate);
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_owned()));
        }
        let fixed = match parts.as_slice() {
            [Part::Literal(only)] => Some(ResourceKey::new(only.as_str())),
            _ => None,
        };
        Ok(Self { parts, fixed })
    }

    fn render<'p>(&self, capture: impl Fn(&str) -> &'p str) -> ResourceKey {
        if let Some(fixed) = &self.fixed {
            return fixed.clone();
        }
        let mut name = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(text) => name.push_str(text),
                Part::Capture(key) => name.push_str(capture(key)),
            }
        }
        ResourceKey::new(name)
    }
}

/// The routes in configuration order; the first that matches wins.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<Route>,
}

/// A request resolved to its route and resource.
#[derive(Debug)]
pub struct Resolved<'a> {
    pub route: &'a Route,
    pub resource: ResourceKey,
}

impl RouteTable {
    /// A table of routes, tried in this order.
    pub fn new(routes: Vec<Route>) -> Self {
        Self { routes }
    }

    /// The routes, in order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The first route whose template matches the already-normalised path.
    pub fn resolve(&self, decoded_path: &str) -> Option<Resolved<'_>> {
        self.routes.iter().find_map(|route| {
            route
                .resolve(decoded_path)
                .map(|resource| Resolved { route, resource })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream() -> Upstream {
        "http://127.0.0.1:5984".parse().unwrap()
    }

    fn policy() -> RoutePolicy {
        RoutePolicy {
            fenced_methods: DEFAULT_FENCED_METHODS.to_vec(),
            fence_reads: false,
            max_token_jump: None,
        }
    }

    fn route(path: &str, resource: &str) -> Route {
        Route::new(path, upstream(), resource, policy()).unwrap()
    }

    fn resource_of(table: &RouteTable, raw: &str) -> Option<String> {
        let path = normalise_path(raw).unwrap();
        table.resolve(&path).map(|r| r.resource.to_string())
    }

    #[test]
    fn plain_paths_normalise_to_themselves() {
        for path in [
            "/",
            "/wallets/1",
            "/a/b/c/",
            "/files/report.v2.txt",
            "/x/...",
            "/x/.hidden",
        ] {
            assert_eq!(normalise_path(path).as_deref(), Ok(path));
        }
    }

    #[test]
    fn escapes_decode_once() {
        assert_eq!(
            normalise_path("/%77allets/a%20b").as_deref(),
            Ok("/wallets/a b")
        );
        assert_eq!(normalise_path("/w/%2561").as_deref(), Ok("/w/%61"));
        assert_eq!(normalise_path("/w/caf%C3%A9").as_deref(), Ok("/w/café"));
    }

    #[test]
    fn dot_segments_are_refused_in_every_spelling() {
        for path in [
            "/a/./b",
            "/a/../b",
            "/..",
            "/a/%2e",
            "/a/%2E%2e/b",
            "/a/.%2e",
            "/a/%2e./",
        ] {
            assert_eq!(normalise_path(path), Err(PathError::DotSegment), "{path}");
        }
    }

    #[test]
    fn encoded_separators_are_refused() {
        for path in ["/a/b%2Fc", "/a/b%2fc", "/a/b%5Cc", "/a/b%5cc", "/a\\b"] {
            assert_eq!(
                normalise_path(path),
                Err(PathError::EncodedSeparator),
                "{path}"
            );
        }
    }

    #[test]
    fn other_ambiguous_paths_are_refused() {
        assert_eq!(normalise_path("a/b"), Err(PathError::NotAbsolute));
        assert_eq!(normalise_path("*"), Err(PathError::NotAbsolute));
        assert_eq!(normalise_path("/a//b"), Err(PathError::EmptySegment));
        assert_eq!(normalise_path("//a"), Err(PathError::EmptySegment));
        assert_eq!(normalise_path("/a/%zz"), Err(PathError::MalformedEscape));
        assert_eq!(normalise_path("/a/100%"), Err(PathError::MalformedEscape));
        assert_eq!(normalise_path("/a/%ff"), Err(PathError::NotText));
        assert_eq!(normalise_path("/a/%00"), Err(PathError::NotText));
        assert_eq!(normalise_path("/a/%0a"), Err(PathError::NotText));
    }

    #[test]
    fn resource_is_rendered_from_captures() {
        let table = RouteTable::new(vec![
            route("/wallets/{id}", "wallet:{id}"),
            route("/users/{user}/docs/{*doc}", "doc:{user}:{doc}"),
            route("/{*rest}", "default"),
        ]);
        assert_eq!(
            resource_of(&table, "/wallets/42").as_deref(),
            Some("wallet:42")
        );
        assert_eq!(
            resource_of(&table, "/%77allets/4%32").as_deref(),
            Some("wallet:42")
        );
        assert_eq!(
            resource_of(&table, "/users/ann/docs/a/b.txt").as_deref(),
            Some("doc:ann:a/b.txt")
        );
        assert_eq!(
            resource_of(&table, "/wallets/42/extra").as_deref(),
            Some("default")
        );
        assert_eq!(resource_of(&table, "/").as_deref(), Some("default"));
    }

    #[test]
    fn first_matching_route_wins_in_config_order() {
        let table = RouteTable::new(vec![
            route("/{*rest}", "everything"),
            route("/wallets/{id}", "wallet:{id}"),
        ]);
        assert_eq!(
            resource_of(&table, "/wallets/1").as_deref(),
            Some("everything")
        );
    }

    #[test]
    fn unmatched_path_resolves_to_nothing() {
        let table = RouteTable::new(vec![route("/wallets/{id}", "wallet:{id}")]);
        assert_eq!(resource_of(&table, "/other"), None);
        assert_eq!(resource_of(&table, "/wallets/"), None);
    }

    #[test]
    fn catch_all_also_matches_its_bare_prefix() {
        let table = RouteTable::new(vec![route("/files/{*path}", "file:{path}")]);
        assert_eq!(resource_of(&table, "/files/").as_deref(), Some("file:"));
        assert_eq!(
            resource_of(&table, "/files/a/b").as_deref(),
            Some("file:a/b")
        );
    }

    #[test]
    fn placeholder_the_path_does_not_capture_is_an_error() {
        let err = Route::new("/a/{id}", upstream(), "x:{nope}", policy()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "uses {nope}, which path /a/{id} does not capture"
        );
    }

    #[test]
    fn malformed_templates_are_errors() {
        for resource in ["x:{id", "x:{}", "x:id}", ""] {
            assert!(
                Route::new("/a/{id}", upstream(), resource, policy()).is_err(),
                "{resource}"
            );
        }
        assert!(Route::new("a/{id}", upstream(), "x", policy()).is_err());
        assert!(Route::new("/a/{id", upstream(), "x", policy()).is_err());
    }

    #[test]
    fn a_path_with_too_many_parameters_is_an_error_not_a_panic() {
        let path = |n: usize| (0..n).map(|i| format!("/{{p{i}}}")).collect::<String>();
        assert!(Route::new(&path(25), upstream(), "x:{p24}", policy()).is_ok());
        let err = Route::new(&path(26), upstream(), "x", policy()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "has more than 25 `{`; a path template holds at most 25 parameters"
        );
    }

    #[test]
    fn fencing_follows_method_and_fence_reads() {
        let plain = route("/a", "a");
        assert_eq!(plain.fencing_for(&Method::PUT), Fencing::Required);
        assert_eq!(plain.fencing_for(&Method::DELETE), Fencing::Required);
        assert_eq!(plain.fencing_for(&Method::GET), Fencing::Off);
        let reads = RoutePolicy {
            fence_reads: true,
            ..policy()
        };
        let fenced_reads = Route::new("/a", upstream(), "a", reads).unwrap();
        assert_eq!(fenced_reads.fencing_for(&Method::GET), Fencing::IfPresent);
    }

    mod properties {
        use super::*;
        use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
        use proptest::prelude::*;

        /// A segment an upstream reads as itself: any text but separators, controls and dots.
        fn segment() -> impl Strategy<Value = String> {
            r"[^/\\\p{Cc}]{1,12}".prop_filter("not a dot segment", |s| s != "." && s != "..")
        }

        /// Pieces that are often trouble in a request path, raw or encoded.
        fn piece() -> impl Strategy<Value = &'static str> {
            prop::sample::select(vec![
                "a", "7", "/", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "\\", "%", "%2",
                "%zz", "%25", "%00", "%0a", "%c3%a9", "%ff", "é", "~", ";", "{", "}",
            ])
        }

        proptest! {
            /// Routing sees exactly what the upstream decodes, however the client encoded it.
            #[test]
            fn encoded_segments_normalise_to_their_decoded_text(
                segments in prop::collection::vec(segment(), 1..6),
                encode_all in any::<bool>(),
            ) {
                let raw: String = segments
                    .iter()
                    .map(|s| if encode_all { utf8_percent_encode(s, NON_ALPHANUMERIC).to_string() } else { s.replace('%', "%25") })
                    .map(|s| format!("/{s}"))
                    .collect();
                let expected: String = segments.iter().map(|s| format!("/{s}")).collect();
                prop_assert_eq!(normalise_path(&raw), Ok(expected));
            }

            /// Whatever passes is a plain path: no empty, dot or control-bearing segment is left
            /// for an upstream to resolve differently.
            #[test]
            fn an_accepted_path_has_no_segment_an_upstream_could_reinterpret(
                pieces in prop::collection::vec(piece(), 0..12),
            ) {
                let raw = format!("/{}", pieces.concat());
                if let Ok(path) = normalise_path(&raw) {
                    let body = path.strip_prefix('/').unwrap();
                    let body = body.strip_suffix('/').unwrap_or(body);
                    for segment in body.split('/').filter(|_| !body.is_empty()) {
                        prop_assert!(!segment.is_empty(), "{raw:?} -> {path:?}");
                        prop_assert!(segment != "." && segment != "..", "{raw:?} -> {path:?}");
                        prop_assert!(!segment.contains('\\'), "{raw:?} -> {path:?}");
                        prop_assert!(!segment.chars().any(char::is_control), "{raw:?} -> {path:?}");
                    }
                }
            }
        }
    }
}
