//! The admin plane: health, metrics, and the operator's view of fencing state.
//!
//! Reads (`/v1/resources`, `/v1/rejections`, `/v1/epochs`) run on the store's read-only
//! [`Reader`], off the async threads, and never touch the writer. `fence` and `reset` go through
//! the [`Gate`], exactly like a write carrying a token, so they keep the ordering guarantee.
//!
//! Every error is problem+json. A bad query parameter, path segment or body field gets 400 naming
//! it; unknown and repeated parameters count as bad, because a misspelt filter that is silently
//! ignored would show an operator the wrong rows.

mod owner;
mod params;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use serde_json::json;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnFailure, TraceLayer};

use crate::config::AdminToken;
use crate::gate::{Gate, Refusal};
use crate::metrics::{self, Metrics};
use crate::problem::{self, FencingContext, ProxyError, Rejected};
use crate::route::ResourceKey;
use crate::store::{
    EpochQuery, Page, ReadError, Reader, RejectionQuery, ResourceQuery, ResourceRow, SharedStore,
};
use crate::token::{FENCING_TOKEN_HIGHEST, FencingToken};

use params::{Body as JsonBody, Params};

/// How long `/readyz` waits for the database writer before calling the process unready.
const READY_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Whether the data plane is currently accepting connections.
#[derive(Debug, Default)]
pub struct Readiness {
    data_plane: AtomicBool,
}

impl Readiness {
    /// Records whether the data plane accepts connections.
    pub fn set_data_plane(&self, serving: bool) {
        self.data_plane.store(serving, Ordering::Release);
    }

    fn data_plane(&self) -> bool {
        self.data_plane.load(Ordering::Acquire)
    }
}

/// What the admin handlers share.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub store: SharedStore,
    pub reader: Reader,
    pub gate: Gate,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    /// When set, every call but the health probes needs it as a bearer token.
    pub token: Option<AdminToken>,
    /// The longest resource name accepted, as on the data plane (`max_resource_len`).
    pub max_resource_len: usize,
    /// Cluster mode: this replica's view of the cluster; `None` on a single node.
    pub cluster: Option<Arc<crate::cluster::Ownership>>,
    /// Cluster mode: the secret that relayed calls carry to the owner's peer plane.
    pub cluster_secret: Option<String>,
    /// Cluster mode with `[cluster.peer_tls]`: how a relayed call speaks TLS to the owner's peer
    /// plane (the cluster's CA trusted, this replica's peer certificate presented).
    pub peer_client_tls: Option<Arc<rustls::ClientConfig>>,
}

pub use owner::{PEER_ADMIN_PREFIX, peer_authenticated};

/// The admin router, with request ids and tracing like the data plane.
pub fn router(state: AdminState) -> Router {
    let guarded = Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/resources", get(list_resources))
        .route("/v1/resources/{resource}", get(get_resource))
        .route("/v1/resources/{resource}/fence", post(fence))
        .route("/v1/resources/{resource}/reset", post(reset))
        .route("/v1/rejections", get(rejections))
        .route("/v1/epochs", get(epochs))
        .route("/v1/cluster", get(cluster))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_bearer_token,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(guarded)
        .fallback(unknown_path)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                .layer(
                    TraceLayer::new_for_http()
                        // An upstream's own 5xx is the upstream's news, not fencegate's error; the
                        // failures fencegate causes (502, 504, 503) log their own lines.
                        .on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG)),
                )
                .layer(PropagateRequestIdLayer::x_request_id()),
        )
        .with_state(state)
}

/// Why an admin call failed; each becomes a problem+json answer.
#[derive(Debug, thiserror::Error)]
enum AdminError {
    #[error("this call needs the header Authorization: Bearer <admin token>")]
    Unauthorized,
    #[error("the bearer token sent is not the admin token")]
    WrongToken,
    #[error("reset is disabled: it lowers fencing tokens, so it needs an admin token configured")]
    ResetDisabled,
    #[error("{parameter}: {problem}")]
    BadParameter { parameter: String, problem: String },
    #[error("resource {0:?} has never been seen")]
    UnknownResource(String),
    #[error("the fencing state could not be read: {0}")]
    Read(#[from] ReadError),
    #[error("the read stopped unexpectedly: {0}")]
    ReadAborted(String),
    #[error("{}", .0.error)]
    Proxy(Rejected),
}

impl AdminError {
    fn bad(parameter: impl Into<String>, problem: impl Into<String>) -> Self {
        AdminError::BadParameter {
            parameter: parameter.into(),
            problem: problem.into(),
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let detail = self.to_string();
        let response = match self {
            AdminError::Unauthorized | AdminError::WrongToken => {
                let mut response = problem::response(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "Unauthorized",
                    detail,
                );
                response.headers_mut().insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"fencegate\""),
                );
                response
            }
            AdminError::ResetDisabled => problem::response(
                StatusCode::FORBIDDEN,
                "reset-disabled",
                "Reset disabled",
                detail,
            ),
            AdminError::BadParameter { parameter, problem } => {
                problem::bad_parameter(&parameter, &problem)
            }
            AdminError::UnknownResource(_) => problem::response(
                StatusCode::NOT_FOUND,
                "unknown-resource",
                "Unknown resource",
                detail,
            ),
            AdminError::Read(_) | AdminError::ReadAborted(_) => {
                tracing::error!(error = %detail, "admin read failed");
                problem::response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store-unavailable",
                    "Fencing state unavailable",
                    detail,
                )
            }
            AdminError::Proxy(rejected) => rejected.into_response(),
        };
        response.map(Body::new)
    }
}

async fn require_bearer_token(
    State(state): State<AdminState>,
    request: Request,
    next: Next,
) -> Response {
    match &state.token {
        Some(token) => match bearer(request.headers()) {
            Some(presented) if token.matches(presented) => next.run(request).await,
            presented => {
                tracing::warn!(
                    path = request.uri().path(),
                    "admin call without a valid token"
                );
                let error = match presented {
                    None => AdminError::Unauthorized,
                    Some(_) => AdminError::WrongToken,
                };
                error.into_response()
            }
        },
        _ => next.run(request).await,
    }
}

/// The credentials of an `Authorization: Bearer …` header; the scheme is case-insensitive.
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(AUTHORIZATION)?.as_bytes();
    let (scheme, credentials) = value.split_at(value.iter().position(|b| *b == b' ')?);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| credentials.trim_ascii())
}

async fn healthz() -> impl IntoResponse {
    axum::Json(json!({ "status": "ok" }))
}

#[tracing::instrument(skip_all)]
async fn readyz(State(state): State<AdminState>) -> Response {
    let database = matches!(
        tokio::time::timeout(READY_PROBE_TIMEOUT, state.store.ping()).await,
        Ok(Ok(()))
    );
    let data_plane = state.readiness.data_plane();
    if database && data_plane {
        return axum::Json(json!({ "status": "ready" })).into_response();
    }
    let detail = format!("database: {}, data plane: {}", up(database), up(data_plane));
    problem::response(
        StatusCode::SERVICE_UNAVAILABLE,
        "not-ready",
        "Not ready",
        detail,
    )
    .map(Body::new)
}

fn up(ok: bool) -> &'static str {
    if ok { "up" } else { "down" }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let text = state.metrics.render(state.gate.resident());
    ([(CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response()
}

async fn list_resources(
    State(state): State<AdminState>,
    RawQuery(query): RawQuery,
) -> Result<Response, AdminError> {
    let mut params = Params::parse(query.as_deref(), &["prefix", "after", "limit"])?;
    let query = ResourceQuery {
        prefix: params.take("prefix"),
        exact: None,
        after: params.take("after"),
        limit: params.limit()?,
    };
    let page = read(move || state.reader.resources(&query)).await?;
    Ok(listing("resources", page))
}

async fn get_resource(
    State(state): State<AdminState>,
    resource: Result<Path<String>, PathRejection>,
) -> Result<Response, AdminError> {
    let resource = resource_name(resource, state.max_resource_len)?;
    let row = read({
        let resource = resource.clone();
        move || state.reader.resource(&resource)
    })
    .await?;
    let row: ResourceRow = row.ok_or(AdminError::UnknownResource(resource))?;
    Ok(axum::Json(row).into_response())
}

/// `POST /v1/resources/{resource}/fence {"token": N}`: returns once N is durable and every older
/// in-flight write has drained.
async fn fence(
    State(state): State<AdminState>,
    headers: HeaderMap,
    resource: Result<Path<String>, PathRejection>,
    body: Bytes,
) -> Result<Response, AdminError> {
    let resource = ResourceKey::new(resource_name(resource, state.max_resource_len)?.as_str());
    if let Some(answer) =
        owner::relay_if_elsewhere(&state, &resource, "fence", &headers, &body).await
    {
        return Ok(answer);
    }
    let mut body = JsonBody::parse(&body, &["token"])?;
    let token = body.token()?;
    match state
        .gate
        .fence(&resource, token, request_id(&headers))
        .await
    {
        Ok(highest) => Ok(fenced_answer(&resource, highest, json!({}))),
        Err(refusal) => Err(refused(resource, token, refusal)),
    }
}

/// `POST /v1/resources/{resource}/reset {"token": N, "reason": "…"}`: sets the highest token to
/// N even if lower. Only with an admin token configured: lowering a token undoes fencing.
async fn reset(
    State(state): State<AdminState>,
    headers: HeaderMap,
    resource: Result<Path<String>, PathRejection>,
    body: Bytes,
) -> Result<Response, AdminError> {
    if state.token.is_none() {
        return Err(AdminError::ResetDisabled);
    }
    let resource = ResourceKey::new(resource_name(resource, state.max_resource_len)?.as_str());
    if let Some(answer) =
        owner::relay_if_elsewhere(&state, &resource, "reset", &headers, &body).await
    {
        return Ok(answer);
    }
    let mut body = JsonBody::parse(&body, &["token", "reason"])?;
    let token = body.token()?;
    let reason = body.reason()?;
    match state
        .gate
        .reset(&resource, token, &reason, request_id(&headers))
        .await
    {
        Ok(reset) => Ok(fenced_answer(
            &resource,
            token,
            json!({ "from": reset.from.map(FencingToken::get), "reason": reason }),
        )),
        Err(refusal) => Err(refused(resource, token, refusal)),
    }
}

async fn rejections(
    State(state): State<AdminState>,
    RawQuery(query): RawQuery,
) -> Result<Response, AdminError> {
    let mut params = Params::parse(
        query.as_deref(),
        &["resource", "reason", "since", "after", "limit"],
    )?;
    let query = RejectionQuery {
        resource: params.take("resource"),
        reason: params.reason()?,
        since: params.since()?,
        after: params.id_cursor()?,
        limit: params.limit()?,
    };
    let page = read(move || state.reader.rejections(&query)).await?;
    Ok(listing("rejections", page))
}

async fn epochs(
    State(state): State<AdminState>,
    RawQuery(query): RawQuery,
) -> Result<Response, AdminError> {
    let mut params = Params::parse(query.as_deref(), &["resource", "after", "limit"])?;
    let query = EpochQuery {
        resource: params.take("resource"),
        after: params.id_cursor()?,
        limit: params.limit()?,
    };
    let page = read(move || state.reader.epochs(&query)).await?;
    Ok(listing("epochs", page))
}

/// `GET /v1/cluster`: the replicas and who owns each shard, as this replica's lease loop last read
/// them from PostgreSQL; 404 on a single node.
async fn cluster(State(state): State<AdminState>) -> Response {
    match &state.cluster {
        Some(ownership) => axum::Json(&*ownership.view()).into_response(),
        None => problem::response(
            StatusCode::NOT_FOUND,
            "not-a-cluster",
            "Not a cluster",
            "this fencegate runs on a single node (its database is a file); cluster mode needs a postgres:// database".to_owned(),
        )
        .map(Body::new),
    }
}

async fn unknown_path() -> Response {
    problem::response(
        StatusCode::NOT_FOUND,
        "not-found",
        "Not found",
        "no admin call has this path".to_owned(),
    )
    .map(Body::new)
}

async fn method_not_allowed() -> Response {
    problem::response(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        "this admin call does not take this method".to_owned(),
    )
    .map(Body::new)
}

/// Runs a blocking read on the blocking pool.
async fn read<T: Send + 'static>(
    query: impl FnOnce() -> Result<T, ReadError> + Send + 'static,
) -> Result<T, AdminError> {
    tokio::task::spawn_blocking(query)
        .await
        .map_err(|e| AdminError::ReadAborted(e.to_string()))?
        .map_err(AdminError::from)
}

/// `{"<name>": [rows], "next": cursor-or-null}`.
fn listing<T: Serialize>(name: &str, page: Page<T>) -> Response {
    let mut body = serde_json::Map::new();
    body.insert(name.to_owned(), json!(page.rows));
    body.insert("next".to_owned(), json!(page.next));
    axum::Json(body).into_response()
}

/// The resource named by a percent-encoded path segment, held to the data plane's limits: no
/// name an operator fences or resets can be one the data plane would refuse to route.
fn resource_name(
    resource: Result<Path<String>, PathRejection>,
    max_len: usize,
) -> Result<String, AdminError> {
    match resource {
        Ok(Path(name)) if name.is_empty() => Err(AdminError::bad("resource", "must not be empty")),
        Ok(Path(name)) if name.len() > max_len => Err(AdminError::bad(
            "resource",
            format!(
                "is {} bytes, more than max_resource_len ({max_len})",
                name.len()
            ),
        )),
        Ok(Path(name)) if name.chars().any(char::is_control) => Err(AdminError::bad(
            "resource",
            "must not contain control characters",
        )),
        Ok(Path(name)) => Ok(name),
        Err(e) => Err(AdminError::bad("resource", e.body_text())),
    }
}

/// `{"resource", "highest", …extra}` with the `Fencing-Token-Highest` header, as for any answer
/// about a fenced resource.
fn fenced_answer(
    resource: &ResourceKey,
    highest: FencingToken,
    extra: serde_json::Value,
) -> Response {
    let mut body = json!({ "resource": resource.as_str(), "highest": highest.get() });
    if let (Some(body), serde_json::Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
    let mut response = axum::Json(body).into_response();
    response
        .headers_mut()
        .insert(FENCING_TOKEN_HIGHEST, HeaderValue::from(highest.get()));
    response
}

/// A fence or reset the gate refused: 409 for a stale token, 503 when the store failed.
fn refused(resource: ResourceKey, token: FencingToken, refusal: Refusal) -> AdminError {
    let (error, highest) = match refusal {
        Refusal::Stale { highest } => (ProxyError::Stale { token, highest }, Some(highest)),
        Refusal::Jump { highest, limit } => (
            ProxyError::Jump {
                token,
                highest,
                limit,
            },
            Some(highest),
        ),
        Refusal::NotDurable | Refusal::Store(_) => {
            tracing::error!(error = %refusal, %resource, "admin call not completed");
            (ProxyError::StoreUnavailable, None)
        }
    };
    AdminError::Proxy(Rejected {
        error,
        fencing: Some(FencingContext {
            resource,
            token: Some(token),
            highest,
        }),
    })
}

fn request_id(headers: &HeaderMap) -> &str {
    headers
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
}
