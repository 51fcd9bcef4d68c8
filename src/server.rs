//! The application: binds both planes, serves them, and shuts them down in order.
//!
//! Built from a validated [`Config`] with [`App::build`], which binds the sockets (so tests can
//! bind port 0 and ask for the address), then run with [`App::run_until_stopped`], which takes
//! the shutdown signal as a future. Shutdown stops accepting, drains in-flight requests for up to
//! `shutdown_grace`, then flushes the database writer.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

use crate::admin::{self, AdminState, Readiness};
use crate::config::Config;
use crate::gate::{Gate, IDLE_EVICTION};
use crate::metrics::Metrics;
use crate::proxy::{DataPlane, UpstreamClient};
use crate::store::{Reader, Retention, Store, WriterGuard};

/// How often idle resources are looked for and evicted from memory.
const EVICTION_INTERVAL: Duration = Duration::from_secs(15);

/// Audit rows deleted per prune transaction: small, so that the writer's group commits wait for
/// at most a few milliseconds of pruning.
const PRUNE_BATCH: usize = 1000;

/// The pause between two prune batches, which bounds pruning to a small share of the writer.
const PRUNE_PAUSE: Duration = Duration::from_millis(10);

/// A built, bound, not yet running fencegate.
#[derive(Debug)]
pub struct App {
    data_listener: TcpListener,
    data_addr: SocketAddr,
    admin_listener: TcpListener,
    admin_addr: SocketAddr,
    plane: Arc<DataPlane>,
    gate: Gate,
    admin: AdminState,
    writer: WriterGuard,
    shutdown_grace: Duration,
    retention: Retention,
    prune_interval: Duration,
}

impl App {
    /// Opens the database and binds both listeners.
    pub async fn build(config: Config) -> anyhow::Result<App> {
        let (store, writer) = Store::open(&config.database)?;
        let reader = Reader::open(&config.database)?;
        let metrics = Metrics::new();
        let gate = Gate::new(store.clone(), config.in_doubt_grace, Arc::clone(&metrics));
        let upstream = UpstreamClient::new(config.upstream_timeout, config.max_body);
        let plane = DataPlane::new(
            config.routes,
            gate.clone(),
            store.clone(),
            upstream,
            Arc::clone(&metrics),
        );
        let data_listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {} (listen)", config.listen))?;
        let admin_listener = TcpListener::bind(config.admin_listen)
            .await
            .with_context(|| format!("cannot listen on {} (admin_listen)", config.admin_listen))?;
        Ok(App {
            data_addr: data_listener.local_addr()?,
            data_listener,
            admin_addr: admin_listener.local_addr()?,
            admin_listener,
            plane: Arc::new(plane),
            gate: gate.clone(),
            admin: AdminState {
                store,
                reader,
                gate,
                metrics,
                readiness: Arc::new(Readiness::default()),
                token: config.admin_token,
            },
            writer,
            shutdown_grace: config.shutdown_grace,
            retention: config.retention,
            prune_interval: config.audit_prune_interval,
        })
    }

    /// The data plane's bound address.
    pub fn data_addr(&self) -> SocketAddr {
        self.data_addr
    }

    /// The admin plane's bound address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Serves both planes until `shutdown` completes, then drains and flushes.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let stop = CancellationToken::new();
        tracing::info!(data = %self.data_addr(), admin = %self.admin_addr(), "fencegate serving");
        let evictor = tokio::spawn(evict_idle_resources(self.gate.clone(), stop.clone()));
        let pruner = tokio::spawn(prune_audit_log(
            self.admin.clone(),
            self.retention,
            self.prune_interval,
            stop.clone(),
        ));
        let admin = tokio::spawn(
            axum::serve(self.admin_listener, admin::router(self.admin.clone()))
                .with_graceful_shutdown(stop.clone().cancelled_owned())
                .into_future(),
        );
        let data = tokio::spawn(serve_data_plane(
            self.data_listener,
            self.plane,
            self.admin.readiness.clone(),
            stop.clone(),
            self.shutdown_grace,
        ));
        shutdown.await;
        stop.cancel();
        data.await.context("the data plane task failed")?;
        admin
            .await
            .context("the admin plane task failed")?
            .context("the admin plane failed")?;
        evictor.await.context("the eviction task failed")?;
        pruner.await.context("the audit pruning task failed")?;
        self.writer.close().await;
        tracing::info!("fencegate stopped");
        Ok(())
    }
}

async fn serve_data_plane(
    listener: TcpListener,
    plane: Arc<DataPlane>,
    readiness: Arc<Readiness>,
    stop: CancellationToken,
    grace: Duration,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // A timer lets hyper enforce its header read timeout against slow clients.
    builder.http1().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    readiness.set_data_plane(true);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, client)) => {
                    let service = data_plane_service(Arc::clone(&plane), client);
                    let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                    let connection = graceful.watch(connection);
                    tokio::spawn(async move {
                        if let Err(e) = connection.await {
                            tracing::debug!(error = %e, %client, "connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = stop.cancelled() => break,
        }
    }
    readiness.set_data_plane(false);
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("in-flight requests drained"),
        () = tokio::time::sleep(grace) => tracing::warn!(?grace, "shutdown grace elapsed with requests still in flight"),
    }
}

/// The data plane's layers, in one place: request ids, then the proxy itself. There is no
/// tower-http `TraceLayer` here: its span and response-body wrapper cost 7% of the hot path's
/// throughput (bench/run.sh), for request lines that were only ever logged at DEBUG; the proxy
/// logs its own refusals and failures, and each response at DEBUG.
fn data_plane_service(
    plane: Arc<DataPlane>,
    client: SocketAddr,
) -> TowerToHyperService<
    impl tower::Service<
        http::Request<Incoming>,
        Response = http::Response<
            impl hyper::body::Body<
                Data = bytes::Bytes,
                Error = impl Into<Box<dyn std::error::Error + Send + Sync>>,
            > + Send
            + 'static,
        >,
        Error = Infallible,
        Future = impl Send,
    > + Clone,
> {
    let service = ServiceBuilder::new()
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(PropagateRequestIdLayer::x_request_id())
        .service_fn(move |request| {
            let plane = Arc::clone(&plane);
            async move { Ok::<_, Infallible>(plane.handle(request, client).await) }
        });
    TowerToHyperService::new(service)
}

async fn evict_idle_resources(gate: Gate, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(EVICTION_INTERVAL) => {
                let evicted = gate.evict_idle(IDLE_EVICTION);
                if evicted > 0 {
                    tracing::debug!(evicted, resident = gate.resident(), "idle resources evicted");
                }
            }
            () = stop.cancelled() => return,
        }
    }
}

/// Retention: at start-up and then every `interval`, deletes audit rows past `retention` in small
/// batches with pauses between them, until none are left.
async fn prune_audit_log(
    admin: AdminState,
    retention: Retention,
    interval: Duration,
    stop: CancellationToken,
) {
    loop {
        let mut pruned = 0;
        loop {
            match admin.store.prune(retention, PRUNE_BATCH).await {
                Ok(rows) => {
                    pruned += rows;
                    admin.metrics.pruned(rows);
                    if rows < PRUNE_BATCH {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "pruning the audit log failed; retrying later");
                    break;
                }
            }
            tokio::select! {
                () = tokio::time::sleep(PRUNE_PAUSE) => {}
                () = stop.cancelled() => return,
            }
        }
        if pruned > 0 {
            tracing::info!(rows = pruned, "audit log pruned");
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = stop.cancelled() => return,
        }
    }
}
