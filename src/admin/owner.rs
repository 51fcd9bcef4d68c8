//! Cluster mode: a fence or reset must go through the gate of the replica that owns the
//! resource's shard (only its writes are conditional on the shard's lease, and only its gate
//! orders the resource's requests). An admin call that arrives at another replica is relayed to
//! the owner over the peer plane, as `/.fencegate/admin/…` with the cluster secret, and the owner's
//! answer comes back as it was.

use axum::body::{Body, Bytes};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderMap, Method, Request, StatusCode};
use axum::response::Response;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::AdminState;
use crate::problem;
use crate::route::ResourceKey;

/// The prefix under which the peer plane serves the owner's admin calls.
pub const PEER_ADMIN_PREFIX: &str = "/.fencegate/admin";

/// The header that carries the cluster secret (as on the data plane's peer hop).
const CLUSTER_SECRET: &str = "fencegate-cluster-secret";

/// How long the owner may take to answer a relayed call (a fence waits for older writes to drain).
const RELAY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Sends a relayed call with `client` and reads the owner's whole answer.
async fn send<C>(
    client: Client<C, Full<Bytes>>,
    request: Request<Full<Bytes>>,
) -> Result<Response, String>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let response = client.request(request).await.map_err(|e| e.to_string())?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Response::from_parts(parts, Body::from(body)))
}

/// Relays `action` (`fence` or `reset`) on `resource` to the replica that owns its shard, if that
/// is another replica; `None` if this replica serves it (it owns the shard, or nobody does and the
/// local gate answers 503).
pub(super) async fn relay_if_elsewhere(
    state: &AdminState,
    resource: &ResourceKey,
    action: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Option<Response> {
    let ownership = state.cluster.as_ref()?;
    let shard = ownership.map().shard_of(resource.as_str());
    if ownership.epoch_for_write(shard).is_some() {
        return None;
    }
    let (owner, peer) = ownership.owner_elsewhere(shard)?;
    let target = format!(
        "{}{PEER_ADMIN_PREFIX}/v1/resources/{}/{action}",
        peer.trim_end_matches('/'),
        percent_encoding::utf8_percent_encode(
            resource.as_str(),
            percent_encoding::NON_ALPHANUMERIC
        )
    );
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(&target)
        .header(CONTENT_TYPE, "application/json");
    if let Some(authorization) = headers.get(AUTHORIZATION) {
        request = request.header(AUTHORIZATION, authorization);
    }
    if let Some(secret) = &state.cluster_secret {
        request = request.header(CLUSTER_SECRET, secret.as_str());
    }
    let request = match request.body(Full::new(body.clone())) {
        Ok(request) => request,
        Err(e) => return Some(unreachable(&owner, &e.to_string())),
    };
    tracing::info!(%resource, shard, %owner, action, "admin call relayed to the shard's owner");
    let sent = async {
        match &state.peer_client_tls {
            None => send(Client::builder(TokioExecutor::new()).build_http(), request).await,
            Some(tls) => {
                let connector = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(rustls::ClientConfig::clone(tls))
                    .https_or_http()
                    .enable_http1()
                    .build();
                send(
                    Client::builder(TokioExecutor::new()).build(connector),
                    request,
                )
                .await
            }
        }
    };
    let answer = tokio::time::timeout(RELAY_TIMEOUT, sent).await;
    Some(match answer {
        Ok(Ok(response)) => response,
        Ok(Err(cause)) => unreachable(&owner, &cause),
        Err(_) => unreachable(&owner, "no answer within 60s"),
    })
}

/// Whether `headers` carry the cluster secret (constant-time); without a configured secret (a
/// loopback-only peer plane) anything passes.
pub fn peer_authenticated(secret: Option<&str>, headers: &HeaderMap) -> bool {
    crate::cluster::secret_matches(secret, headers.get(CLUSTER_SECRET).map(|v| v.as_bytes()))
}

fn unreachable(owner: &str, cause: &str) -> Response {
    let mut response = problem::response(
        StatusCode::SERVICE_UNAVAILABLE,
        "owner-unreachable",
        "Shard owner unreachable",
        format!(
            "replica {owner} owns this resource's shard and did not answer over the peer plane ({cause}); retry"
        ),
    )
    .map(Body::new);
    response.headers_mut().insert(
        axum::http::header::RETRY_AFTER,
        axum::http::HeaderValue::from(problem::RETRY_AFTER_SECONDS),
    );
    response
}
