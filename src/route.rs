//! Routing: which upstream a request goes to and which resource it is fenced under.
//!
//! The resource is computed here from the configured route and the request path only, never from
//! anything else the client sends. To make the resource fencegate computes the one the upstream
//! writes, [`normalise_path`] first refuses every path that an upstream could read as a different
//! path (dot segments, encoded separators, empty segments, malformed escapes) and decodes the rest
//! once, exactly as the upstream will.
//!
//! A route fences more than the path it matches: [`RouteTable::collection_conflict`] finds a
//! request on a collection whose members another resource owns, [`destination`] reads the second
//! path of a COPY or MOVE, and [`methods`] says which methods can change state at all.

pub mod allow;
pub mod destination;
pub mod methods;
pub mod request_parts;

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use http::Method;
use percent_encoding::percent_decode_str;
use smallvec::SmallVec;

use crate::profile::{Profile, RequestHead};
use crate::proxy::Upstream;
pub use allow::Allow;
use request_parts::{PartError, RequestPart};

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
///
/// A path with nothing to decode is returned as it is, without a copy: that is nearly every
/// request's.
pub fn normalise_path(raw: &str) -> Result<Cow<'_, str>, PathError> {
    let rest = raw.strip_prefix('/').ok_or(PathError::NotAbsolute)?;
    if is_plain(rest.as_bytes()) {
        return Ok(Cow::Borrowed(raw));
    }
    normalise_segments(raw, rest)
}

/// `normalise_path` segment by segment: `rest` is `raw` after its leading `/`.
fn normalise_segments<'a>(raw: &'a str, rest: &'a str) -> Result<Cow<'a, str>, PathError> {
    let mut decodes = false;
    for segment in decoded_segments(rest) {
        decodes |= matches!(segment?, Cow::Owned(_));
    }
    if !decodes {
        return Ok(Cow::Borrowed(raw));
    }
    let mut decoded = String::with_capacity(raw.len());
    for segment in decoded_segments(rest) {
        decoded.push('/');
        decoded.push_str(&segment?);
    }
    Ok(Cow::Owned(decoded))
}

/// Whether a path after its leading `/` is its own normal form, judged in one pass over its
/// bytes: visible ASCII with nothing escaped (no `%`, no `\\`), no empty segment but a trailing
/// one, no dot segment. Nearly every request's path is; the others go through
/// [`decoded_segments`], which refuses or decodes them (and is ten times the work).
fn is_plain(rest: &[u8]) -> bool {
    let mut segments = rest.split(|&b| b == b'/').peekable();
    while let Some(segment) = segments.next() {
        let plain = match segment {
            b"" => segments.peek().is_none(),
            b"." | b".." => false,
            _ => segment
                .iter()
                .all(|&b| matches!(b, b'!'..=b'~') && b != b'%' && b != b'\\'),
        };
        if !plain {
            return false;
        }
    }
    true
}

/// The segments of a path after its leading `/`, each decoded. A trailing slash (`/dir/`) is an
/// ordinary path, whose last segment is empty; an empty segment anywhere else is refused.
fn decoded_segments(rest: &str) -> impl Iterator<Item = Result<Cow<'_, str>, PathError>> {
    let mut segments = rest.split('/').peekable();
    std::iter::from_fn(move || {
        let segment = segments.next()?;
        Some(match segment {
            "" if segments.peek().is_none() => Ok(Cow::Borrowed("")),
            "" => Err(PathError::EmptySegment),
            _ => decode_segment(segment),
        })
    })
}

fn decode_segment(raw: &str) -> Result<Cow<'_, str>, PathError> {
    if raw.contains('\\') {
        return Err(PathError::EncodedSeparator);
    }
    let segment = if raw.contains('%') {
        check_escapes(raw)?;
        percent_decode_str(raw)
            .decode_utf8()
            .map_err(|_| PathError::NotText)?
    } else {
        // Nothing escaped, nearly every segment: it is its own decoding, and the decoder's
        // machinery is skipped.
        Cow::Borrowed(raw)
    };
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

/// How a route treats one request's fencing token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fencing {
    /// A write: the token is required and checked.
    Required,
    /// An unfenced method on a `fence_reads` route: a token, when sent, is checked; none is also
    /// fine.
    IfPresent,
    /// An unfenced method: passed through unchecked.
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
    #[error("{0}")]
    Placeholder(String),
}

/// One configured route: a path template, its upstream, and how its resource is named.
#[derive(Debug)]
pub struct Route {
    path: String,
    resource_template: String,
    matcher: matchit::Router<()>,
    upstream: Upstream,
    resource: ResourceTemplate,
    /// The path template segment by segment, for finding the collections above its paths.
    shape: Vec<Segment>,
    unfenced_methods: Vec<Method>,
    fence_reads: bool,
    max_token_jump: Option<u64>,
    profile: Option<Profile>,
    preserve_host: bool,
    token_header: http::HeaderName,
    allow: Option<Allow>,
}

/// The settings of a route other than its templates, already validated by the config layer.
#[derive(Debug, Clone)]
pub struct RoutePolicy {
    /// Methods passed through without a token; only methods that cannot change state.
    pub unfenced_methods: Vec<Method>,
    pub fence_reads: bool,
    pub max_token_jump: Option<u64>,
    /// The storage API whose requests the route reads for their resources, if any.
    pub profile: Option<Profile>,
    /// Whether the upstream gets the client's `Host` header rather than its own authority.
    pub preserve_host: bool,
    /// The header leaders send their token in (`Fencing-Token` unless the route says otherwise).
    pub token_header: http::HeaderName,
    /// Who may send fenced requests (`allow`, `allow_bearer_sha256`); `None`: anyone.
    pub allow: Option<Allow>,
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
        let template = match &policy.profile {
            // The profile names resources from the request; the route's path stands for the
            // route in answers and audit rows about requests the profile cannot attribute.
            Some(Profile::Keys(_)) => ResourceTemplate::fixed(path),
            _ => ResourceTemplate::parse(resource, &captures, path)?,
        };
        Ok(Self {
            path: path.to_owned(),
            resource_template: resource.to_owned(),
            matcher,
            upstream,
            resource: template,
            shape: shape_of(path),
            unfenced_methods: policy.unfenced_methods,
            fence_reads: policy.fence_reads,
            max_token_jump: policy.max_token_jump,
            profile: policy.profile,
            preserve_host: policy.preserve_host,
            token_header: policy.token_header,
            allow: policy.allow,
        })
    }

    /// Who may send this route's fenced requests; `None`: anyone who reaches the data plane.
    pub fn allow(&self) -> Option<&Allow> {
        self.allow.as_ref()
    }

    /// Whether `Authorization` carries fencegate's own bearer token on this route, never to be
    /// forwarded.
    pub fn takes_bearer_tokens(&self) -> bool {
        self.allow.as_ref().is_some_and(Allow::takes_bearer_tokens)
    }

    /// The header this route's leaders send their token in.
    pub fn token_header(&self) -> &http::HeaderName {
        &self.token_header
    }

    /// Whether the upstream gets the client's `Host` header unchanged (`preserve_host`).
    pub fn preserves_host(&self) -> bool {
        self.preserve_host
    }

    /// The storage profile that names this route's resources, if any.
    pub fn profile(&self) -> Option<&Profile> {
        self.profile.as_ref()
    }

    /// The path template, as configured.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The resource template, as configured.
    pub fn resource_template(&self) -> &str {
        &self.resource_template
    }

    /// The methods passed through without a token; every other method is fenced.
    pub fn unfenced_methods(&self) -> &[Method] {
        &self.unfenced_methods
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
        if !self.unfenced_methods.contains(method) {
            Fencing::Required
        } else if self.fence_reads {
            Fencing::IfPresent
        } else {
            Fencing::Off
        }
    }

    /// Whether the resource template names the catch-all capture, so that the route gives every
    /// path below one of its paths a resource of its own (`/files/{*path}` → `file:{path}`).
    pub fn nests_resources(&self) -> bool {
        let Some(Segment::CatchAll(name)) = self.shape.last() else {
            return false;
        };
        self.resource.uses(name)
    }

    /// Whether some path this route matches lies strictly below `segments`, the decoded segments
    /// of a path without its trailing slash. The check is on the template's shape, so it holds
    /// whatever the upstream stores: `/wallets` is above `/wallets/{id}` even with no wallet yet.
    pub fn lies_below(&self, segments: &[&str]) -> bool {
        segments.len() < self.required_segments()
            && segments
                .iter()
                .zip(&self.shape)
                .all(|(segment, shape)| shape.matches(segment))
    }

    /// One example of each collection above this route's paths, shallowest first (`/`, then
    /// `/wallets` for `/wallets/{id}`), with a placeholder's segment spelled `x`.
    fn collections_above(&self) -> impl Iterator<Item = String> + '_ {
        (0..self.required_segments()).map(|depth| {
            let segments: Vec<&str> = self.shape[..depth]
                .iter()
                .map(|segment| match segment {
                    Segment::Literal(literal) => literal.as_str(),
                    Segment::Param(_) | Segment::CatchAll(_) => "x",
                })
                .collect();
            format!("/{}", segments.join("/"))
        })
    }

    /// What resource this route gives the paths strictly below `segments` (the decoded segments of
    /// a path without its trailing slash), if it matches any of them.
    fn resource_below(&self, segments: &[&str]) -> Below {
        let depth = segments.len();
        for (index, segment) in segments.iter().enumerate() {
            match self.shape.get(index) {
                None => return Below::Nothing,
                Some(Segment::CatchAll(_)) => break,
                Some(shape) if !shape.matches(segment) => return Below::Nothing,
                Some(_) => {}
            }
        }
        let catch_all_from = self
            .shape
            .iter()
            .position(|segment| matches!(segment, Segment::CatchAll(_)));
        if self.shape.len() <= depth && catch_all_from.is_none() {
            return Below::Nothing;
        }
        // Captures at or past `depth` (and a catch-all, which takes the rest) differ from one
        // path below to the next; captures above it are fixed by `segments`.
        let varies = self.shape.iter().enumerate().any(|(index, segment)| {
            let name = match segment {
                Segment::Literal(_) => return false,
                Segment::Param(name) | Segment::CatchAll(name) => name,
            };
            (index >= depth || matches!(segment, Segment::CatchAll(_))) && self.resource.uses(name)
        });
        if varies {
            return Below::Varies;
        }
        // One path below, filled in with `x` where the template has a placeholder; when the
        // template matches no such path (a placeholder with a prefix), assume the worst.
        let mut sample: Vec<&str> = segments.to_vec();
        sample.extend(self.shape.iter().skip(depth).map(|segment| match segment {
            Segment::Literal(literal) => literal.as_str(),
            Segment::Param(_) | Segment::CatchAll(_) => "x",
        }));
        if sample.len() == depth {
            sample.push("x");
        }
        match self.resolve(&format!("/{}", sample.join("/"))) {
            Some((resource, _)) => Below::One(resource),
            None => Below::Varies,
        }
    }

    /// Whether this route matches every path below `segments`: its catch-all starts at or above
    /// them, and its literal segments before that match theirs.
    fn takes_everything_below(&self, segments: &[&str]) -> bool {
        let Some(from) = self
            .shape
            .iter()
            .position(|segment| matches!(segment, Segment::CatchAll(_)))
        else {
            return false;
        };
        from <= segments.len()
            && segments
                .iter()
                .zip(&self.shape[..from])
                .all(|(segment, shape)| shape.matches(segment))
    }

    /// How many segments every path of this route has at least.
    fn required_segments(&self) -> usize {
        self.shape
            .iter()
            .take_while(|segment| !matches!(segment, Segment::CatchAll(_)))
            .count()
    }

    /// Whether the resource template reads the query, a header or the body.
    pub fn reads_request(&self) -> bool {
        self.resource.reads_request()
    }

    /// Whether the resource template reads the body (`{body.…}`, `{body64.…}`).
    pub fn reads_body(&self) -> bool {
        self.resource.reads_body()
    }

    /// The resource of a request on this route whose template reads the request; `body` is empty
    /// unless [`Route::reads_body`].
    pub fn resource_for_request(
        &self,
        head: &RequestHead<'_>,
        body: &[u8],
    ) -> Result<ResourceKey, PartError> {
        let matched = self.matcher.at(without_trailing_slash(head.path));
        let capture = |name: &str| {
            matched.as_ref().map_or("", |matched| {
                matched
                    .params
                    .iter()
                    .find(|(key, _)| *key == name)
                    .map_or("", |(_, value)| value)
            })
        };
        self.resource
            .render_with(capture, |part| part.value(head, body))
    }

    /// The resource of a path that matches, and the value of its catch-all capture if it has one.
    fn resolve(&self, match_path: &str) -> Option<(ResourceKey, Option<bool>)> {
        let matched = self.matcher.at(match_path).ok()?;
        let capture = |name: &str| {
            matched
                .params
                .iter()
                .find(|(key, _)| *key == name)
                .map_or("", |(_, value)| value)
        };
        let catch_all_empty = match self.shape.last() {
            Some(Segment::CatchAll(name)) => Some(capture(name).is_empty()),
            _ => None,
        };
        Some((self.resource.render(capture), catch_all_empty))
    }
}

/// Route `outer` matches `example`, a collection above the paths of route `inner`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlap {
    pub outer: usize,
    pub inner: usize,
    pub example: String,
}

/// The resource a route gives the paths below a collection.
#[derive(Debug, PartialEq, Eq)]
enum Below {
    /// The route matches no path below it.
    Nothing,
    /// Every path below it that the route matches has this resource.
    One(ResourceKey),
    /// Paths below it have resources of their own.
    Varies,
}

/// One segment of a path template.
#[derive(Debug)]
enum Segment {
    Literal(String),
    /// `{name}`, or any segment that holds a placeholder (named after its first): it matches at
    /// least the segments the placeholder can, which keeps the collection checks on the safe side.
    Param(String),
    /// `{*name}`: the rest of the path, which is always the last segment.
    CatchAll(String),
}

impl Segment {
    fn matches(&self, segment: &str) -> bool {
        match self {
            Segment::Literal(literal) => literal == segment,
            Segment::Param(_) | Segment::CatchAll(_) => true,
        }
    }
}

fn shape_of(path: &str) -> Vec<Segment> {
    let path = without_trailing_slash(path);
    path.strip_prefix('/')
        .unwrap_or(path)
        .split('/')
        .filter(|segment| !segment.is_empty())
        .map(|segment| match segment.strip_prefix("{*") {
            Some(rest) => Segment::CatchAll(rest.trim_end_matches('}').to_owned()),
            None if segment.contains('{') => {
                Segment::Param(captures_of(segment).into_iter().next().unwrap_or_default())
            }
            None => Segment::Literal(segment.to_owned()),
        })
        .collect()
}

/// `/a/b/` and `/a/b` name one entry on every file-like storage, so routing sees both as `/a/b`:
/// otherwise `MKCOL /wallets/9/` would fall to a catch-all route's resource, not `wallet:9`.
fn without_trailing_slash(path: &str) -> &str {
    match path.strip_suffix('/') {
        Some(stripped) if !stripped.is_empty() => stripped,
        _ => path,
    }
}

/// The number of non-empty segments of `path`: what `split('/')` and a filter would count, in
/// one pass over the bytes, for the check every fenced request goes through.
fn segment_count(path: &str) -> usize {
    let mut previous = b'/';
    let mut count = 0;
    for &byte in path.as_bytes() {
        if previous == b'/' && byte != b'/' {
            count += 1;
        }
        previous = byte;
    }
    count
}

/// matchit renames a route's parameters to the letters `a` to `z` and panics past them; the fuzzer
/// found that a template with 26 parameters crashed start-up. Every parameter opens with a `{`, so
/// counting them keeps below the limit whatever matchit counts.
const MAX_PARAMETERS: usize = 25;

/// A catch-all such as `/{*rest}` does not match its own bare prefix (`/`) in matchit, but an
/// operator who writes one means "everything below here", so the prefix is registered too. Paths
/// are matched without their trailing slash (see [`without_trailing_slash`]), and so is the
/// template.
fn build_matcher(path: &str) -> Result<matchit::Router<()>, RouteError> {
    if !path.starts_with('/') {
        return Err(RouteError::Path("must start with /".into()));
    }
    if path.matches('{').count() > MAX_PARAMETERS {
        return Err(RouteError::Path(format!(
            "has more than {MAX_PARAMETERS} `{{`; a path template holds at most {MAX_PARAMETERS} parameters"
        )));
    }
    let path = without_trailing_slash(path);
    let mut matcher = matchit::Router::new();
    matcher
        .insert(path, ())
        .map_err(|e| RouteError::Path(e.to_string()))?;
    if let Some(open) = path.rfind("{*")
        && path.ends_with('}')
        && path[..open].ends_with('/')
    {
        matcher
            .insert(without_trailing_slash(&path[..open]), ())
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
    /// A value from the query, a header or the body: see [`request_parts`].
    Request(RequestPart),
}

impl ResourceTemplate {
    /// A template that is the literal `text`.
    fn fixed(text: &str) -> Self {
        Self {
            parts: vec![Part::Literal(text.to_owned())],
            fixed: Some(ResourceKey::new(text)),
        }
    }

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
            if let Some(part) = RequestPart::parse(name) {
                parts.push(Part::Request(part.map_err(RouteError::Placeholder)?));
                rest = after;
                continue;
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

    /// Whether the template names the capture `name`.
    fn uses(&self, name: &str) -> bool {
        self.parts
            .iter()
            .any(|part| matches!(part, Part::Capture(used) if used == name))
    }

    /// The resource as the path alone names it; a part that reads the request renders empty
    /// here, and [`Route::resource_for_request`] renders it in full.
    fn render<'p>(&self, capture: impl Fn(&str) -> &'p str) -> ResourceKey {
        if let Some(fixed) = &self.fixed {
            return fixed.clone();
        }
        self.render_with(capture, |_| Ok(String::new()))
            .unwrap_or_else(|_| ResourceKey::new(""))
    }

    fn render_with<'p>(
        &self,
        capture: impl Fn(&str) -> &'p str,
        request: impl Fn(&RequestPart) -> Result<String, PartError>,
    ) -> Result<ResourceKey, PartError> {
        // Put together on the stack and copied once into the key's own allocation: a `String`
        // grown part by part cost an allocation, a reallocation and a copy more per request.
        let mut name = SmallVec::<[u8; 128]>::new();
        for part in &self.parts {
            match part {
                Part::Literal(text) => name.extend_from_slice(text.as_bytes()),
                Part::Capture(key) => name.extend_from_slice(capture(key).as_bytes()),
                Part::Request(part) => name.extend_from_slice(request(part)?.as_bytes()),
            }
        }
        // Whole `str`s put end to end: always valid UTF-8, so the name is borrowed as it is.
        Ok(ResourceKey::new(&*String::from_utf8_lossy(&name)))
    }

    fn reads_request(&self) -> bool {
        self.parts
            .iter()
            .any(|part| matches!(part, Part::Request(_)))
    }

    fn reads_body(&self) -> bool {
        self.parts
            .iter()
            .any(|part| matches!(part, Part::Request(part) if part.reads_body()))
    }
}

/// The routes in configuration order; the first that matches wins.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<Route>,
    /// The most segments any route requires: a path with at least as many lies below no route,
    /// which spares the common request the collection check.
    deepest_required: usize,
}

/// A request resolved to its route and resource.
#[derive(Debug)]
pub struct Resolved<'a> {
    pub route: &'a Route,
    pub resource: ResourceKey,
    /// Whether the path names a collection explicitly: it ends with `/`, or it is the bare prefix
    /// of a catch-all route.
    pub names_collection: bool,
}

impl RouteTable {
    /// How many routes there are.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether there are none (a validated config always has one).
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// A table of routes, tried in this order.
    pub fn new(routes: Vec<Route>) -> Self {
        let deepest_required = routes
            .iter()
            .map(Route::required_segments)
            .max()
            .unwrap_or(0);
        Self {
            routes,
            deepest_required,
        }
    }

    /// The routes, in order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The first route whose template matches the already-normalised path (with or without its
    /// trailing slash: both name one entry).
    pub fn resolve(&self, decoded_path: &str) -> Option<Resolved<'_>> {
        let match_path = without_trailing_slash(decoded_path);
        let trailing_slash = match_path.len() < decoded_path.len() || decoded_path == "/";
        self.routes.iter().find_map(|route| {
            route
                .resolve(match_path)
                .map(|(resource, catch_all_empty)| Resolved {
                    route,
                    resource,
                    names_collection: trailing_slash || catch_all_empty == Some(true),
                })
        })
    }

    /// Every pair of routes where the first matches a collection above the second's paths: a
    /// fenced request there is refused as a collection operation. `check-config` warns of them.
    pub fn collection_overlaps(&self) -> Vec<Overlap> {
        let mut overlaps = Vec::new();
        for (inner, below) in self.routes.iter().enumerate() {
            for (outer, above) in self.routes.iter().enumerate() {
                if outer == inner {
                    continue;
                }
                let example = below
                    .collections_above()
                    .find(|collection| above.matcher.at(collection).is_ok());
                if let Some(example) = example {
                    overlaps.push(Overlap {
                        outer,
                        inner,
                        example,
                    });
                }
            }
        }
        overlaps
    }

    /// The route whose resources a fenced `method` on `resolved` could change although they are
    /// not `resolved`'s resource. Two kinds of path are collections:
    /// - a path above a route's template (`/wallets` above `/wallets/{id}`), with or without a
    ///   trailing slash: the template says a collection must be there;
    /// - a path that names a collection (a trailing slash, or a catch-all's bare prefix): every
    ///   route that matches a path below it with another resource conflicts, the member-per-sub-path
    ///   catch-all and the fallback `/{*rest}` included. MKCOL is the exception: it only creates
    ///   an empty collection.
    ///
    /// `None` when the request changes only its own resource.
    pub fn collection_conflict<'a>(
        &'a self,
        decoded_path: &str,
        resolved: &Resolved<'a>,
        method: &Method,
    ) -> Option<&'a Route> {
        let path = without_trailing_slash(decoded_path);
        let depth = segment_count(path);
        let whole_collection =
            resolved.names_collection && !methods::touches_only_its_target(method);
        if depth >= self.deepest_required && !whole_collection {
            return None;
        }
        let segments: Vec<&str> = path
            .split('/')
            .filter(|segment| !segment.is_empty())
            .collect();
        // A template below the path makes it a collection, even where an earlier route shadows
        // that template: the storage may hold such paths all the same.
        if let Some(route) = self.routes.iter().find(|route| route.lies_below(&segments)) {
            return Some(route);
        }
        if !whole_collection {
            return None;
        }
        for route in &self.routes {
            let conflicts = match route.resource_below(&segments) {
                Below::Nothing => false,
                Below::One(resource) => resource != resolved.resource,
                Below::Varies => true,
            };
            if conflicts {
                return Some(route);
            }
            // A route that matches every path below this one shadows the routes after it there.
            if route.takes_everything_below(&segments) {
                return None;
            }
        }
        None
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
            unfenced_methods: methods::DEFAULT_UNFENCED_METHODS.to_vec(),
            fence_reads: false,
            max_token_jump: None,
            allow: None,
            profile: None,
            preserve_host: false,
            token_header: crate::token::FENCING_TOKEN,
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
    fn a_paths_depth_counts_its_non_empty_segments() {
        for path in [
            "",
            "/",
            "//",
            "/a",
            "a",
            "/a/",
            "/a//b",
            "a/b/c",
            "/wallets/9/",
            "///x",
        ] {
            let by_split = path.split('/').filter(|s| !s.is_empty()).count();
            assert_eq!(segment_count(path), by_split, "{path:?}");
        }
        assert_eq!(segment_count("/a//b/"), 2);
    }

    #[test]
    fn plain_paths_are_recognised_in_one_pass_and_the_others_left_to_decoding() {
        for plain in [
            "",
            "wallets/1",
            "a/b/c/",
            "files/report.v2.txt",
            "x/...",
            "x/.hidden",
            "~u!$&'()*+,;=:@",
        ] {
            assert!(is_plain(plain.as_bytes()), "{plain:?}");
        }
        for other in [
            "a//b", "/", "%41", "a/%2e", ".", "a/..", "a\\b", "é", "a b", "a\tb", "a\u{7f}",
        ] {
            assert!(!is_plain(other.as_bytes()), "{other:?}");
        }
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
            // Nothing decoded, nothing copied.
            assert!(
                matches!(normalise_path(path), Ok(Cow::Borrowed(_))),
                "{path}"
            );
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
        assert_eq!(resource_of(&table, "/wallets"), None);
    }

    #[test]
    fn catch_all_also_matches_its_bare_prefix() {
        let table = RouteTable::new(vec![route("/files/{*path}", "file:{path}")]);
        assert_eq!(resource_of(&table, "/files/").as_deref(), Some("file:"));
        assert_eq!(resource_of(&table, "/files").as_deref(), Some("file:"));
        assert_eq!(
            resource_of(&table, "/files/a/b").as_deref(),
            Some("file:a/b")
        );
    }

    #[test]
    fn a_trailing_slash_names_the_same_resource() {
        let table = RouteTable::new(vec![
            route("/wallets/{id}", "wallet:{id}"),
            route("/files/{*path}", "file:{path}"),
            route("/slashed/{id}/", "slashed:{id}"),
            route("/{*rest}", "default"),
        ]);
        for (path, resource) in [
            ("/wallets/9/", "wallet:9"),
            ("/files/a/b/", "file:a/b"),
            ("/slashed/1", "slashed:1"),
            ("/slashed/1/", "slashed:1"),
        ] {
            assert_eq!(
                resource_of(&table, path).as_deref(),
                Some(resource),
                "{path}"
            );
        }
    }

    fn conflict(table: &RouteTable, method: &str, raw: &str) -> Option<String> {
        let path = normalise_path(raw).unwrap();
        let resolved = table.resolve(&path)?;
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        table
            .collection_conflict(&path, &resolved, &method)
            .map(|route| route.path().to_owned())
    }

    #[test]
    fn a_collection_above_another_routes_paths_conflicts_with_it() {
        let table = RouteTable::new(vec![
            route("/wallets/{id}", "wallet:{id}"),
            route("/users/{user}/docs/{*doc}", "user:{user}"),
            route("/{*rest}", "default"),
        ]);
        for path in ["/", "/wallets", "/wallets/", "/users", "/users/ann/"] {
            assert!(conflict(&table, "DELETE", path).is_some(), "{path}");
            assert!(conflict(&table, "MKCOL", path).is_some(), "{path}");
        }
        for path in [
            "/wallets/1",
            "/wallets/1/x",
            "/users/ann/docs",
            "/users/ann/docs/a/",
            "/other",
            "/walletsx",
        ] {
            assert_eq!(conflict(&table, "DELETE", path), None, "{path}");
        }
        // A named collection conflicts with whatever owns the paths below it: `/wallets/1/x`
        // falls to the fallback route, under `default`.
        assert_eq!(
            conflict(&table, "DELETE", "/wallets/1/").as_deref(),
            Some("/{*rest}")
        );
        assert_eq!(conflict(&table, "MKCOL", "/wallets/1/"), None);
        assert_eq!(
            conflict(&table, "MOVE", "/other/").as_deref(),
            None,
            "everything below /other/ is the fallback's, like /other/ itself"
        );
    }

    #[test]
    fn only_a_resource_named_after_the_catch_all_nests() {
        assert!(route("/files/{*path}", "file:{path}").nests_resources());
        assert!(!route("/files/{*path}", "files").nests_resources());
        assert!(!route("/w/{id}/{*rest}", "w:{id}").nests_resources());
        assert!(!route("/w/{id}", "w:{id}").nests_resources());
    }

    #[test]
    fn overlapping_routes_are_listed_with_an_example() {
        let table = RouteTable::new(vec![
            route("/wallets/{id}", "wallet:{id}"),
            route("/{*rest}", "default"),
        ]);
        assert_eq!(
            table.collection_overlaps(),
            vec![Overlap {
                outer: 1,
                inner: 0,
                example: "/".into()
            }]
        );
        let apart = RouteTable::new(vec![
            route("/wallets/{id}", "wallet:{id}"),
            route("/orders/{id}", "order:{id}"),
        ]);
        assert_eq!(apart.collection_overlaps(), vec![]);
    }

    #[test]
    fn a_collection_of_a_route_that_names_a_resource_per_sub_path_conflicts_with_its_members() {
        let table = RouteTable::new(vec![route("/files/{*path}", "file:{path}")]);
        assert!(conflict(&table, "DELETE", "/files/a/").is_some());
        assert!(conflict(&table, "MOVE", "/files/").is_some());
        assert!(conflict(&table, "COPY", "/files").is_some());
        assert_eq!(conflict(&table, "MKCOL", "/files/a/"), None);
        assert_eq!(conflict(&table, "PUT", "/files/a"), None);
        let shared = RouteTable::new(vec![route("/files/{*path}", "files")]);
        assert_eq!(conflict(&shared, "DELETE", "/files/a/"), None);
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
        for write in [
            "MKCOL",
            "PROPPATCH",
            "COPY",
            "MOVE",
            "LOCK",
            "UNLOCK",
            "FROBNICATE",
        ] {
            let method = Method::from_bytes(write.as_bytes()).unwrap();
            assert_eq!(plain.fencing_for(&method), Fencing::Required, "{write}");
        }
        assert_eq!(plain.fencing_for(&Method::GET), Fencing::Off);
        assert_eq!(plain.fencing_for(&Method::HEAD), Fencing::Off);
        assert_eq!(plain.fencing_for(&Method::OPTIONS), Fencing::Off);
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
                "%zz", "%25", "%00", "%0a", "%c3%a9", "%ff", "é", "~", ";", "{", "}", " ",
                "\u{7f}", "\u{85}", "\t",
            ])
        }

        /// Route templates to draw tables from: nested, overlapping, fallback and member-per-sub-path.
        const TEMPLATES: [(&str, &str); 8] = [
            ("/w/{id}", "w:{id}"),
            ("/w/{id}/d/{*rest}", "wd:{id}:{rest}"),
            ("/w/{id}/e/{*rest}", "we:{id}"),
            ("/a/{*rest}", "a:{rest}"),
            ("/a/b/{id}", "ab:{id}"),
            ("/{x}/b", "xb:{x}"),
            ("/c/{*rest}", "c"),
            ("/{*rest}", "default"),
        ];

        /// The segments paths are made of: every literal of the templates, and one that is none.
        const SEGMENTS: [&str; 6] = ["w", "d", "e", "a", "b", "z"];

        fn table_of(picks: &[usize]) -> RouteTable {
            RouteTable::new(
                picks
                    .iter()
                    .map(|&i| route(TEMPLATES[i].0, TEMPLATES[i].1))
                    .collect(),
            )
        }

        fn path_of(segments: &[usize], collection: bool) -> String {
            let mut path: String = segments
                .iter()
                .map(|&i| format!("/{}", SEGMENTS[i]))
                .collect();
            if path.is_empty() || collection {
                path.push('/');
            }
            path
        }

        /// Every path up to four segments deep strictly below `path`.
        fn below(path: &str) -> Vec<String> {
            let base = without_trailing_slash(path)
                .trim_end_matches('/')
                .to_owned();
            let mut found = vec![];
            let mut frontier = vec![base];
            for _ in 0..4 {
                let mut next = vec![];
                for parent in &frontier {
                    for segment in SEGMENTS {
                        next.push(format!("{parent}/{segment}"));
                    }
                }
                found.extend(next.iter().cloned());
                frontier = next;
            }
            found
        }

        /// Whether WebDAV treats `path` as a collection: it is named as one (a trailing slash,
        /// RFC 4918 §5.2), or a route's template needs a collection there.
        fn is_collection(table: &RouteTable, path: &str) -> bool {
            let stripped = without_trailing_slash(path);
            let segments: Vec<&str> = stripped.split('/').filter(|s| !s.is_empty()).collect();
            path.ends_with('/') || table.routes().iter().any(|r| r.lies_below(&segments))
        }

        /// Every path a request could change under WebDAV's rules: its target (for COPY, only the
        /// destination), and everything below a collection it deletes, moves or copies onto.
        fn changed_paths(
            table: &RouteTable,
            method: &str,
            path: &str,
            destination: Option<&str>,
        ) -> Vec<String> {
            let source_collection = is_collection(table, path);
            let mut changed = vec![];
            if method != "COPY" {
                changed.push(path.to_owned());
                if source_collection && matches!(method, "DELETE" | "MOVE") {
                    changed.extend(below(path));
                }
            }
            if let Some(destination) = destination {
                changed.push(destination.to_owned());
                if source_collection || is_collection(table, destination) {
                    changed.extend(below(destination));
                }
            }
            changed
        }

        /// The resources fencegate fences for the request, as the proxy composes routing: `None`
        /// when it refuses the request as a collection operation (or cannot route it).
        fn fenced_resources(
            table: &RouteTable,
            method: &str,
            path: &str,
            destination: Option<&str>,
        ) -> Option<Vec<ResourceKey>> {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let source = table.resolve(path)?;
            if table.collection_conflict(path, &source, &method).is_some() {
                return None;
            }
            let mut fenced = vec![source.resource.clone()];
            if let Some(destination) = destination {
                let mut target = table.resolve(destination)?;
                target.names_collection |= source.names_collection;
                if table
                    .collection_conflict(destination, &target, &method)
                    .is_some()
                {
                    return None;
                }
                fenced.push(target.resource);
            }
            Some(fenced)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// Whatever fencegate forwards, every path it can change belongs to a resource whose
            /// gate the request passed.
            #[test]
            fn the_fenced_resources_cover_every_path_a_request_can_change(
                picks in prop::sample::subsequence((0..TEMPLATES.len()).collect::<Vec<_>>(), 1..=TEMPLATES.len()).prop_shuffle(),
                method in prop::sample::select(vec!["DELETE", "MOVE", "COPY", "PUT", "MKCOL", "PROPPATCH", "LOCK"]),
                path in (prop::collection::vec(0..SEGMENTS.len(), 0..4), any::<bool>()),
                destination in prop::option::of((prop::collection::vec(0..SEGMENTS.len(), 0..4), any::<bool>())),
            ) {
                let table = table_of(&picks);
                let path = path_of(&path.0, path.1);
                let destination = destination
                    .filter(|_| matches!(method, "MOVE" | "COPY"))
                    .map(|(segments, collection)| path_of(&segments, collection));
                if let Some(fenced) = fenced_resources(&table, method, &path, destination.as_deref()) {
                    for changed in changed_paths(&table, method, &path, destination.as_deref()) {
                        if let Some(owner) = table.resolve(&changed) {
                            prop_assert!(
                                fenced.contains(&owner.resource),
                                "{method} {path} -> {destination:?} changes {changed} ({}) but fences only {fenced:?}",
                                owner.resource
                            );
                        }
                    }
                }
            }
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
                let normalised = normalise_path(&raw);
                prop_assert_eq!(normalised.as_deref(), Ok(expected.as_str()));
            }

            /// The one-pass check agrees with decoding segment by segment: a path it calls plain
            /// is its own normal form.
            #[test]
            fn a_path_judged_plain_is_what_decoding_it_gives(
                pieces in prop::collection::vec(piece(), 0..12),
            ) {
                let raw = format!("/{}", pieces.concat());
                let rest = &raw[1..];
                if is_plain(rest.as_bytes()) {
                    prop_assert_eq!(normalise_segments(&raw, rest), Ok(Cow::Borrowed(raw.as_str())));
                }
                prop_assert_eq!(normalise_path(&raw), normalise_segments(&raw, rest));
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
