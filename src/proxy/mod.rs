//! The data plane: one plain async function from a client's request to its response.
//!
//! In order: refuse ambiguous paths and method overrides, route, and then either pass the request
//! through (an unfenced read) or fence it: parse the token, let the [`Gate`] admit it, forward it
//! while holding the gate's permit, and settle the permit once the upstream has answered. Every
//! refusal on fencing grounds is committed to the audit log before the answer goes out.

mod headers;
mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, HeaderName, HeaderValue, TRANSFER_ENCODING};
use http::{Request, Response, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::audit::{self, Reason, Rejection};
use crate::gate::{Gate, Permit, Refusal};
use crate::metrics::Metrics;
use crate::problem::{self, FencingContext, ProxyError, Rejected};
use crate::route::{self, Fencing, ResourceKey, Route, RouteTable};
use crate::store::Store;
use crate::token::{self, FENCING_TOKEN, FENCING_TOKEN_HIGHEST, FencingToken, TokenError};

pub use upstream::{ForwardError, Upstream, UpstreamClient, UpstreamUrlError};

/// A response body: streamed from the upstream, or one of fencegate's own problem documents.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Everything the data plane needs to serve a request.
#[derive(Debug)]
pub struct DataPlane {
    routes: RouteTable,
    gate: Gate,
    store: Store,
    upstream: UpstreamClient,
    metrics: Arc<Metrics>,
}

impl DataPlane {
    /// Assembles the data plane.
    pub fn new(
        routes: RouteTable,
        gate: Gate,
        store: Store,
        upstream: UpstreamClient,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            routes,
            gate,
            store,
            upstream,
            metrics,
        }
    }

    /// Serves one request from `client`. Never fails: every error becomes a problem+json answer.
    pub async fn handle(
        &self,
        request: Request<Incoming>,
        client: SocketAddr,
    ) -> Response<ProxyBody> {
        let body_may_be_unread = has_body(&request) && request.version() <= Version::HTTP_11;
        let method = request.method().clone();
        let response = match self.serve(request, client).await {
            Ok(response) => response.map(Either::Left),
            Err(rejected) => {
                let mut response = rejected.into_response();
                // fencegate answers its own errors without reading the request body, and HTTP/1
                // cannot reuse a connection whose body was left unread: hyper would close it
                // without a word, and the client's next request on it would hit a closed socket.
                // Saying so lets clients reconnect cleanly; a zombie's body is not worth reading.
                if body_may_be_unread {
                    response
                        .headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                }
                response.map(Either::Right)
            }
        };
        tracing::debug!(%method, status = response.status().as_u16(), %client, "answered");
        response
    }

    async fn serve(
        &self,
        request: Request<Incoming>,
        client: SocketAddr,
    ) -> Result<Response<Incoming>, Rejected> {
        let path = route::normalise_path(request.uri().path()).map_err(ProxyError::from)?;
        headers::refuse_method_override(request.headers())?;
        let resolved = self
            .routes
            .resolve(&path)
            .ok_or_else(|| ProxyError::NoRoute {
                path: request.uri().path().to_owned(),
            })?;
        let fenced = match resolved.route.fencing_for(request.method()) {
            Fencing::Required => true,
            Fencing::IfPresent => request.headers().contains_key(FENCING_TOKEN),
            Fencing::Off => false,
        };
        if fenced {
            self.serve_fenced(resolved.route, resolved.resource, request, client)
                .await
        } else {
            self.check_declared_length(&request)?;
            self.forward_unfenced(resolved.route, request, client).await
        }
    }

    async fn forward_unfenced(
        &self,
        route: &Route,
        request: Request<Incoming>,
        client: SocketAddr,
    ) -> Result<Response<Incoming>, Rejected> {
        self.metrics.forwarded(false);
        let _call = self.metrics.upstream_call();
        self.upstream
            .forward(route.upstream(), request, client)
            .await
            .map_err(|e| self.forward_failure(e).into())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(resource = %resource))]
    async fn serve_fenced(
        &self,
        route: &Route,
        resource: ResourceKey,
        request: Request<Incoming>,
        client: SocketAddr,
    ) -> Result<Response<Incoming>, Rejected> {
        let token = match token::from_headers(request.headers()) {
            Ok(token) => token,
            Err(e) => return Err(self.refuse_unparsed(resource, e, &request, client).await),
        };
        if let Err(error) = self.check_declared_length(&request) {
            let highest = self.gate.highest(&resource).await.ok().flatten();
            return Err(fenced(error, resource, Some(token), highest));
        }
        let admitted = self
            .gate
            .admit(
                &resource,
                token,
                route.max_token_jump(),
                request_id(&request),
            )
            .await;
        let permit = match admitted {
            Ok(permit) => permit,
            Err(refusal) => {
                return Err(self
                    .refuse(resource, token, refusal, &request, client)
                    .await);
            }
        };
        self.forward_with(permit, route, resource, token, request, client)
            .await
    }

    /// Forwards while holding the permit. A response head settles it; a failure after the request
    /// may have reached the upstream drops it unsettled, which keeps newer tokens back for the
    /// in-doubt grace.
    async fn forward_with(
        &self,
        permit: Permit,
        route: &Route,
        resource: ResourceKey,
        token: FencingToken,
        request: Request<Incoming>,
        client: SocketAddr,
    ) -> Result<Response<Incoming>, Rejected> {
        self.metrics.forwarded(true);
        let call = self.metrics.upstream_call();
        let forwarded = self
            .upstream
            .forward(route.upstream(), request, client)
            .await;
        drop(call);
        match forwarded {
            Ok(mut response) => {
                let highest = permit.settle();
                response
                    .headers_mut()
                    .insert(FENCING_TOKEN_HIGHEST, problem::highest_header(highest));
                Ok(response)
            }
            Err(e) => {
                let highest = if e.never_sent() {
                    permit.settle()
                } else {
                    let highest = permit.highest();
                    drop(permit);
                    highest
                };
                Err(fenced(
                    self.forward_failure(e),
                    resource,
                    Some(token),
                    highest,
                ))
            }
        }
    }

    /// A missing or malformed token: refused and audited.
    async fn refuse_unparsed(
        &self,
        resource: ResourceKey,
        error: TokenError,
        request: &Request<Incoming>,
        client: SocketAddr,
    ) -> Rejected {
        let (reason, error) = match error {
            TokenError::Missing => (Reason::Missing, ProxyError::MissingToken(error)),
            TokenError::Repeated | TokenError::NotCanonical => {
                (Reason::Invalid, ProxyError::InvalidToken(error))
            }
        };
        let highest = match self.gate.highest(&resource).await {
            Ok(highest) => highest,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the highest token");
                return fenced(ProxyError::StoreUnavailable, resource, None, None);
            }
        };
        let fencing = FencingContext {
            resource,
            token: None,
            highest,
        };
        self.audit(reason, error, fencing, request, client).await
    }

    /// A token the gate refused: stale or a jump is audited; a store failure fails closed.
    async fn refuse(
        &self,
        resource: ResourceKey,
        token: FencingToken,
        refusal: Refusal,
        request: &Request<Incoming>,
        client: SocketAddr,
    ) -> Rejected {
        let (reason, error, highest) = match refusal {
            Refusal::Stale { highest } => {
                (Reason::Stale, ProxyError::Stale { token, highest }, highest)
            }
            Refusal::Jump { highest, limit } => {
                let error = ProxyError::Jump {
                    token,
                    highest,
                    limit,
                };
                (Reason::Jump, error, highest)
            }
            Refusal::NotDurable | Refusal::Store(_) => {
                tracing::error!(error = %refusal, "fenced request not admitted");
                let highest = self.gate.highest(&resource).await.ok().flatten();
                return fenced(ProxyError::StoreUnavailable, resource, Some(token), highest);
            }
        };
        let fencing = FencingContext {
            resource,
            token: Some(token),
            highest: Some(highest),
        };
        self.audit(reason, error, fencing, request, client).await
    }

    /// Commits the rejection to the audit log, then returns the answer. If the log cannot be
    /// written the answer is 503: the request is refused either way, but never unrecorded.
    async fn audit(
        &self,
        reason: Reason,
        error: ProxyError,
        fencing: FencingContext,
        request: &Request<Incoming>,
        client: SocketAddr,
    ) -> Rejected {
        let request_id = Some(request_id(request))
            .filter(|id| !id.is_empty())
            .map(|id| audit::truncated(id, audit::MAX_AUDITED_REQUEST_ID));
        let (token, highest) = (fencing.token, fencing.highest);
        tracing::info!(
            resource = %fencing.resource, %reason, token = token.map(FencingToken::get),
            highest = highest.map(FencingToken::get),
            request_id = request_id.as_deref().unwrap_or(""), "fenced request rejected"
        );
        self.metrics.rejected(reason);
        let rejection = Rejection {
            at: SystemTime::now(),
            resource: fencing.resource.clone(),
            reason,
            token,
            highest,
            method: request.method().to_string(),
            path: audit::truncated(request.uri().path(), audit::MAX_AUDITED_PATH),
            client: client.to_string(),
            request_id,
        };
        let error = match self.store.record_rejection(rejection).await {
            Ok(()) => error,
            Err(e) => {
                tracing::error!(error = %e, "cannot record a rejection in the audit log");
                ProxyError::StoreUnavailable
            }
        };
        Rejected {
            error,
            fencing: Some(fencing),
        }
    }

    /// Refuses a body whose declared length is over `max_body` before anything is forwarded.
    /// Bodies without a length are cut off while streaming instead.
    fn check_declared_length(&self, request: &Request<Incoming>) -> Result<(), ProxyError> {
        let declared = request
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok());
        match declared {
            Some(length) if length > self.upstream.max_body() => Err(ProxyError::BodyTooLarge {
                limit: self.upstream.max_body(),
            }),
            _ => Ok(()),
        }
    }

    fn forward_failure(&self, error: ForwardError) -> ProxyError {
        match error {
            ForwardError::Timeout => {
                tracing::warn!("upstream timed out");
                ProxyError::UpstreamTimeout(self.upstream.timeout())
            }
            ForwardError::BodyTooLarge => ProxyError::BodyTooLarge {
                limit: self.upstream.max_body(),
            },
            e @ (ForwardError::Connect(_) | ForwardError::Exchange(_) | ForwardError::Uri(_)) => {
                tracing::warn!(error = %e, "upstream failed");
                ProxyError::UpstreamUnreachable
            }
        }
    }
}

/// Whether the request declares a body: a non-zero `Content-Length`, or any `Transfer-Encoding`.
fn has_body<B>(request: &Request<B>) -> bool {
    let headers = request.headers();
    headers.contains_key(TRANSFER_ENCODING)
        || headers
            .get(CONTENT_LENGTH)
            .is_some_and(|length| length.as_bytes() != b"0")
}

/// The request's id: the client's `X-Request-Id`, or the one the server's request-id layer made.
/// Empty if neither is there (or it is not visible ASCII).
fn request_id<B>(request: &Request<B>) -> &str {
    request
        .headers()
        .get(X_REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
}

fn fenced(
    error: ProxyError,
    resource: ResourceKey,
    token: Option<FencingToken>,
    highest: Option<FencingToken>,
) -> Rejected {
    Rejected {
        error,
        fencing: Some(FencingContext {
            resource,
            token,
            highest,
        }),
    }
}
