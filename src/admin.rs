//! The admin plane: health and readiness for orchestrators.
//!
//! `/healthz` answers while the process is up; `/readyz` answers 200 only while the database
//! writer responds and the data plane is accepting connections.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::problem;
use crate::store::Store;

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
    pub store: Store,
    pub readiness: Arc<Readiness>,
}

/// The admin router.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
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
    .map(axum::body::Body::new)
}

fn up(ok: bool) -> &'static str {
    if ok { "up" } else { "down" }
}
