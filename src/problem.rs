//! Errors fencegate answers itself, as `application/problem+json` (RFC 9457).
//!
//! [`ProxyError`] says what went wrong; [`FencingContext`] adds, for a fenced request, the resource,
//! the token and the highest token, both to the body and as the `Fencing-Token-Highest` header,
//! so that a superseded leader learns of it from any answer.

use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;

use crate::route::destination::DestinationError;
use crate::route::{PathError, ResourceKey};
use crate::token::{FENCING_TOKEN_HIGHEST, FencingToken, TokenError};

/// The media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// What went wrong with a request, independent of whether it was fenced.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}")]
    BadPath(#[from] PathError),
    #[error("the {0} header is refused: it could turn this request into another method upstream")]
    MethodOverride(HeaderName),
    #[error("no route matches {path}")]
    NoRoute { path: String },
    #[error(
        "the method {sent} is {registered} in another case; methods are case-sensitive, and storage that upper-cases them would run this one unfenced"
    )]
    MethodCase {
        sent: String,
        registered: &'static str,
    },
    #[error(
        "the Connection header names {0}, which fencegate must pass to the upstream as sent; it is not hop-by-hop"
    )]
    HopByHopFencingHeader(HeaderName),
    #[error(
        "the resource name is {length} bytes, more than max_resource_len ({limit}); use shorter paths"
    )]
    ResourceTooLong { length: usize, limit: usize },
    #[error("{0}")]
    Destination(#[from] DestinationError),
    #[error("{0}")]
    Profile(#[from] crate::profile::ProfileError),
    #[error("the request body could not be read")]
    BodyUnreadable,
    #[error(
        "fencegate cannot name the resources this request changes ({0}); it is refused, not forwarded under a guess"
    )]
    Unattributable(String),
    #[error(
        "{} may not send fenced requests on route {route}; its allow list does not name it",
        identity.as_deref().map_or_else(|| "a client without a certificate identity".to_owned(), |names| format!("the client {names}"))
    )]
    Forbidden {
        identity: Option<String>,
        route: String,
    },
    #[error("the request changes {count} resources, more than max_resources_per_request ({limit})")]
    TooManyResources { count: usize, limit: usize },
    #[error(
        "{path} is a collection above paths that route {below} fences under other resources; an operation on it could change them under this resource's token"
    )]
    Collection { path: String, below: String },
    #[error("{0}")]
    MissingToken(TokenError),
    #[error("{0}")]
    InvalidToken(TokenError),
    #[error(
        "token {token} is lower than the highest token {highest} for this resource; a newer leader exists"
    )]
    Stale {
        token: FencingToken,
        highest: FencingToken,
    },
    #[error(
        "token {token} is more than {limit} above the highest token {highest}; an operator can fence the resource to it"
    )]
    Jump {
        token: FencingToken,
        highest: FencingToken,
        limit: u64,
    },
    #[error("the request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error(
        "fencing state cannot be read or made durable right now; the request was not forwarded"
    )]
    StoreUnavailable,
    #[error("the upstream could not be reached")]
    UpstreamUnreachable,
    #[error("{}", .0.describe())]
    UpstreamTls(crate::proxy::HandshakeFailure),
    #[error("the upstream did not answer within {}", humantime::format_duration(*.0))]
    UpstreamTimeout(Duration),
    #[error(
        "the upstream switched protocols (101), and fencegate does not tunnel other protocols: their writes could not be fenced"
    )]
    UpstreamSwitchedProtocols,
    #[error(
        "no replica serves shard {shard} of this resource right now (its owner is gone and its lease has not run out, or it is being handed over); retry"
    )]
    NoOwner { shard: u32 },
    #[error(
        "the resources of this request are in shards owned by different replicas ({shards}); cluster mode gates a request on one replica, so put them in one shard (fewer shards) or send them apart"
    )]
    SpansReplicas { shards: String },
    #[error(
        "this replica's lease of shard {shard} ran out (or was taken over) while the request was in flight; it was torn down, and may or may not have reached the upstream"
    )]
    LeaseEnded { shard: u32 },
    #[error("the peer plane requires the cluster secret (Fencegate-Cluster-Secret)")]
    PeerUnauthenticated,
    #[error(
        "replica {replica}, which owns this resource's shard, did not answer over the peer plane ({cause}); retry"
    )]
    OwnerUnreachable {
        replica: String,
        cause: &'static str,
    },
}

/// How long a client should wait before retrying a request that found no owner for its shard.
pub const RETRY_AFTER_SECONDS: u32 = 1;

impl ProxyError {
    /// The status this error is answered with.
    pub fn status(&self) -> StatusCode {
        self.kind().0
    }

    /// The status code and the problem `type` slug and `title`.
    fn kind(&self) -> (StatusCode, &'static str, &'static str) {
        use ProxyError::*;
        match self {
            BadPath(_) => (
                StatusCode::BAD_REQUEST,
                "bad-path",
                "Ambiguous request path",
            ),
            MethodOverride(_) => (
                StatusCode::BAD_REQUEST,
                "method-override",
                "Method override refused",
            ),
            NoRoute { .. } => (StatusCode::NOT_FOUND, "no-route", "No route"),
            MethodCase { .. } => (
                StatusCode::BAD_REQUEST,
                "method-case",
                "Method in the wrong case",
            ),
            HopByHopFencingHeader(_) => (
                StatusCode::BAD_REQUEST,
                "hop-by-hop-fencing-header",
                "Fencing header named as hop-by-hop",
            ),
            ResourceTooLong { .. } => (
                StatusCode::URI_TOO_LONG,
                "resource-too-long",
                "Resource name too long",
            ),
            Destination(_) => (
                StatusCode::BAD_REQUEST,
                "bad-destination",
                "Destination refused",
            ),
            Profile(_) => (
                StatusCode::BAD_REQUEST,
                "bad-body",
                "Request body not as the storage API expects",
            ),
            BodyUnreadable => (
                StatusCode::BAD_REQUEST,
                "body-unreadable",
                "Request body unreadable",
            ),
            Unattributable(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "unattributable",
                "Request not attributable to resources",
            ),
            Forbidden { .. } => (
                StatusCode::FORBIDDEN,
                "forbidden",
                "Client not allowed to write here",
            ),
            TooManyResources { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-many-resources",
                "Request changes too many resources",
            ),
            Collection { .. } => (
                StatusCode::CONFLICT,
                "collection",
                "Operation on a collection of other resources",
            ),
            MissingToken(_) => (
                StatusCode::PRECONDITION_REQUIRED,
                "missing-token",
                "Fencing token required",
            ),
            InvalidToken(_) => (
                StatusCode::BAD_REQUEST,
                "invalid-token",
                "Invalid fencing token",
            ),
            Stale { .. } => (StatusCode::CONFLICT, "stale-token", "Stale fencing token"),
            Jump { .. } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "token-jump",
                "Fencing token jump too large",
            ),
            BodyTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "body-too-large",
                "Request body too large",
            ),
            StoreUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "store-unavailable",
                "Fencing state unavailable",
            ),
            UpstreamUnreachable => (
                StatusCode::BAD_GATEWAY,
                "upstream-unreachable",
                "Upstream unreachable",
            ),
            UpstreamTls(_) => (
                StatusCode::BAD_GATEWAY,
                "upstream-tls",
                "Upstream TLS handshake failed",
            ),
            UpstreamTimeout(_) => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream-timeout",
                "Upstream timed out",
            ),
            UpstreamSwitchedProtocols => (
                StatusCode::BAD_GATEWAY,
                "upstream-switched-protocols",
                "Upstream switched protocols",
            ),
            NoOwner { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "no-owner",
                "No replica serves this shard right now",
            ),
            SpansReplicas { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "spans-replicas",
                "Request spans shards of different replicas",
            ),
            LeaseEnded { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "lease-ended",
                "Shard lease ended mid-request",
            ),
            OwnerUnreachable { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "owner-unreachable",
                "Shard owner unreachable",
            ),
            PeerUnauthenticated => (
                StatusCode::UNAUTHORIZED,
                "peer-unauthenticated",
                "Cluster secret required",
            ),
        }
    }
}

/// The fencing facts about a fenced request, attached to every answer to it.
#[derive(Debug, Clone)]
pub struct FencingContext {
    pub resource: ResourceKey,
    /// The token the request carried, when it parsed.
    pub token: Option<FencingToken>,
    /// The resource's highest token; `None` if the resource was never seen.
    pub highest: Option<FencingToken>,
}

/// An error answer, ready to become a response.
#[derive(Debug)]
pub struct Rejected {
    pub error: ProxyError,
    pub fencing: Option<FencingContext>,
}

impl From<ProxyError> for Rejected {
    fn from(error: ProxyError) -> Self {
        Self {
            error,
            fencing: None,
        }
    }
}

#[derive(Serialize)]
struct Body<'a> {
    r#type: String,
    title: &'a str,
    status: u16,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    resource: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    highest: Option<u64>,
    /// For a bad query parameter or body field: its name.
    #[serde(skip_serializing_if = "Option::is_none")]
    parameter: Option<&'a str>,
}

/// The problem `type` URI for a slug.
fn problem_type(slug: &str) -> String {
    format!("urn:fencegate:problem:{slug}")
}

/// A problem+json response with the given status, slug, title and detail.
pub fn response(
    status: StatusCode,
    slug: &str,
    title: &str,
    detail: String,
) -> Response<Full<Bytes>> {
    render(status, slug, title, detail, None, None)
}

/// 400 for a bad query parameter, path segment or body field, named in `parameter` both in the
/// detail and as a member of its own, so that scripts need not parse prose.
pub fn bad_parameter(parameter: &str, problem: &str) -> Response<Full<Bytes>> {
    render(
        StatusCode::BAD_REQUEST,
        "bad-parameter",
        "Bad parameter",
        format!("{parameter}: {problem}"),
        None,
        Some(parameter),
    )
}

/// The value sent as `Fencing-Token-Highest` (and `highest`): a never-seen resource reports 0,
/// since no token is lower than that.
fn highest_value(highest: Option<FencingToken>) -> u64 {
    highest.map_or(0, FencingToken::get)
}

thread_local! {
    /// The last `Fencing-Token-Highest` value this thread made, and its number.
    static LAST_HIGHEST: std::cell::RefCell<Option<(u64, HeaderValue)>> =
        const { std::cell::RefCell::new(None) };
}

/// The `Fencing-Token-Highest` header value for `highest`. A leader writes many times with one
/// token, so the thread's last value is shared (a reference count) when the number repeats: made
/// afresh, a value is an allocation and a number formatted on every answer.
pub fn highest_header(highest: Option<FencingToken>) -> HeaderValue {
    let number = highest_value(highest);
    LAST_HIGHEST.with_borrow_mut(|last| match last {
        Some((made, value)) if *made == number => value.clone(),
        _ => {
            let value = HeaderValue::from(number);
            *last = Some((number, value.clone()));
            value
        }
    })
}

impl Rejected {
    /// The error as a problem+json response.
    pub fn into_response(self) -> Response<Full<Bytes>> {
        let (status, slug, title) = self.error.kind();
        let mut response = render(
            status,
            slug,
            title,
            self.error.to_string(),
            self.fencing.as_ref(),
            None,
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(
                http::header::RETRY_AFTER,
                HeaderValue::from(RETRY_AFTER_SECONDS),
            );
        }
        response
    }
}

fn render(
    status: StatusCode,
    slug: &str,
    title: &str,
    detail: String,
    fencing: Option<&FencingContext>,
    parameter: Option<&str>,
) -> Response<Full<Bytes>> {
    let body = Body {
        r#type: problem_type(slug),
        title,
        status: status.as_u16(),
        detail,
        resource: fencing.map(|f| f.resource.as_str()),
        token: fencing.and_then(|f| f.token).map(FencingToken::get),
        highest: fencing.map(|f| highest_value(f.highest)),
        parameter,
    };
    // Serialising this struct of strings and integers cannot fail.
    let json = serde_json::to_vec(&body).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(json)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    if let Some(fencing) = fencing {
        headers.insert(FENCING_TOKEN_HIGHEST, highest_header(fencing.highest));
    }
    response
}

/// `error` and its sources: clients' own messages (tokio-postgres's "error connecting to server",
/// hyper's "client error (Connect)") leave the reason to their sources.
pub(crate) fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn the_highest_header_names_each_token_even_when_the_last_repeats() {
        let values: Vec<_> = [Some(5), Some(5), Some(6), None, Some(6)]
            .into_iter()
            .map(|highest| highest_header(highest.map(FencingToken::new)))
            .collect();
        assert_eq!(values, ["5", "5", "6", "0", "6"]);
    }

    #[tokio::test]
    async fn stale_rejection_renders_every_contract_field() {
        let rejected = Rejected {
            error: ProxyError::Stale {
                token: FencingToken::new(1),
                highest: FencingToken::new(2),
            },
            fencing: Some(FencingContext {
                resource: ResourceKey::new("wallet:1"),
                token: Some(FencingToken::new(1)),
                highest: Some(FencingToken::new(2)),
            }),
        };
        let response = rejected.into_response();
        assert_eq!(response.status(), StatusCode::CONFLICT);
        assert_eq!(response.headers()[CONTENT_TYPE], PROBLEM_JSON);
        assert_eq!(response.headers()[FENCING_TOKEN_HIGHEST], "2");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["type"], "urn:fencegate:problem:stale-token");
        assert_eq!(json["status"], 409);
        assert_eq!(json["resource"], "wallet:1");
        assert_eq!(json["token"], 1);
        assert_eq!(json["highest"], 2);
        assert!(json["title"].is_string() && json["detail"].is_string());
    }

    #[test]
    fn errors_without_fencing_context_carry_no_fencing_fields() {
        let response = Rejected::from(ProxyError::NoRoute { path: "/x".into() }).into_response();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert!(!response.headers().contains_key(FENCING_TOKEN_HIGHEST));
    }
}
