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
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower::ServiceExt;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

mod limits;

use crate::admin::{self, AdminState, Readiness};
use crate::config::{Config, Limits};
use crate::gate::{Gate, IDLE_EVICTION};
use crate::metrics::Metrics;
use crate::proxy::{DataPlane, RequestLimits, UpstreamClient};
use crate::store::{LastStop, PrunePlan, Reader, Retention, Store, WriterGuard};
use limits::{HeadDeadline, RequestPhase};

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
    limits: Limits,
    retention: Retention,
    prune_interval: Duration,
}

impl App {
    /// Opens the database and binds both listeners.
    pub async fn build(config: Config) -> anyhow::Result<App> {
        let (store, writer) = Store::open(&config.database)?;
        let reader = Reader::open(&config.database)?;
        let metrics = Metrics::new();
        let last_stop = writer.last_stop();
        if last_stop == LastStop::Unclean {
            tracing::warn!(
                in_doubt_grace = ?config.in_doubt_grace,
                "the previous server on this database did not stop cleanly; requests it forwarded may still reach the upstream, so new tokens wait in_doubt_grace after start-up"
            );
        }
        let gate = Gate::new(
            store.clone(),
            config.in_doubt_grace,
            Arc::clone(&metrics),
            last_stop,
        );
        let upstream = UpstreamClient::new(
            config.upstream_timeout,
            config.upstream_connect_timeout,
            config.max_body,
        );
        let limits = RequestLimits {
            max_resource_len: config.max_resource_len,
            max_inspect_body: config.max_inspect_body,
            max_resources_per_request: config.max_resources_per_request,
        };
        let plane = DataPlane::new(
            config.routes,
            limits,
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
                max_resource_len: config.max_resource_len,
            },
            writer,
            shutdown_grace: config.shutdown_grace,
            limits: config.limits,
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
        let router = admin::router(self.admin.clone());
        let admin = tokio::spawn(serve_plane(
            self.admin_listener,
            self.limits,
            move |_client, phase| admin_service(router.clone(), phase),
            stop.clone(),
            self.shutdown_grace,
        ));
        let plane = self.plane;
        self.admin.readiness.set_data_plane(true);
        let data = tokio::spawn(serve_plane(
            self.data_listener,
            self.limits,
            move |client, phase| data_plane_service(Arc::clone(&plane), client, phase),
            stop.clone(),
            self.shutdown_grace,
        ));
        shutdown.await;
        self.admin.readiness.set_data_plane(false);
        stop.cancel();
        data.await.context("the data plane task failed")?;
        admin.await.context("the admin plane task failed")?;
        evictor.await.context("the eviction task failed")?;
        pruner.await.context("the audit pruning task failed")?;
        // Clean only if nothing this server forwarded can still be applied upstream: then the
        // next server need not hold new tokens back at start-up.
        let this_stop = if self.gate.anything_in_doubt() {
            LastStop::Unclean
        } else {
            LastStop::Clean
        };
        self.writer.close(this_stop).await;
        tracing::info!("fencegate stopped");
        Ok(())
    }
}

/// Serves one plane: accepts while fewer than `max_connections` are open (the rest wait in the
/// listen backlog), applies the limits to every connection, and at `stop` drains for up to
/// `grace`.
async fn serve_plane<S, B>(
    listener: TcpListener,
    limits: Limits,
    service_for: impl Fn(SocketAddr, Arc<RequestPhase>) -> S,
    stop: CancellationToken,
    grace: Duration,
) where
    S: hyper::service::Service<http::Request<Incoming>, Response = http::Response<B>>
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let builder = connection_builder(limits);
    let graceful = GracefulShutdown::new();
    let open = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&open).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break, // never closed
            },
            () = stop.cancelled() => break,
        };
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, client)) => {
                    let phase = Arc::new(RequestPhase::default());
                    let io = HeadDeadline::new(stream, limits.header_read_timeout, Arc::clone(&phase));
                    let service = service_for(client, phase);
                    let connection = builder.serve_connection(TokioIo::new(io), service).into_owned();
                    let connection = graceful.watch(connection);
                    tokio::spawn(async move {
                        if let Err(e) = connection.await {
                            tracing::debug!(error = %e, %client, "connection ended with an error");
                        }
                        drop(permit);
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
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("in-flight requests drained"),
        () = tokio::time::sleep(grace) => tracing::warn!(?grace, "shutdown grace elapsed with requests still in flight"),
    }
}

/// hyper's connection settings from the limits. hyper's header read timer starts as soon as a
/// connection is ready for its next request, so it is the idle timeout; the head deadline from
/// the first byte is [`HeadDeadline`]'s.
fn connection_builder(limits: Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.idle_timeout)
        // The read buffer: a head that does not fit is answered 431.
        .max_buf_size(limits.max_header_size)
        .max_headers(limits.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_size).unwrap_or(u32::MAX))
        .max_concurrent_streams(Some(
            u32::try_from(limits.max_headers.max(100)).unwrap_or(100),
        ))
        .keep_alive_interval(Some(limits.idle_timeout))
        .keep_alive_timeout(limits.header_read_timeout);
    builder
}

/// The admin router, with its requests marked for the head deadline.
fn admin_service(
    router: axum::Router,
    phase: Arc<RequestPhase>,
) -> TowerToHyperService<
    impl tower::Service<
        http::Request<Incoming>,
        Response = axum::response::Response,
        Error = Infallible,
        Future = impl Send,
    > + Clone,
> {
    TowerToHyperService::new(tower::service_fn(move |request| {
        let in_request = phase.begin();
        let router = router.clone();
        async move {
            let response = router.oneshot(request).await;
            drop(in_request);
            response
        }
    }))
}

/// The data plane's layers, in one place: request ids, then the proxy itself. There is no
/// tower-http `TraceLayer` here: its span and response-body wrapper cost 7% of the hot path's
/// throughput (bench/run.sh), for request lines that were only ever logged at DEBUG; the proxy
/// logs its own refusals and failures, and each response at DEBUG.
fn data_plane_service(
    plane: Arc<DataPlane>,
    client: SocketAddr,
    phase: Arc<RequestPhase>,
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
            let in_request = phase.begin();
            async move {
                let response = plane.handle(request, client).await;
                drop(in_request);
                Ok::<_, Infallible>(response)
            }
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

/// Retention: at start-up and then every `interval`, plans what `retention` no longer keeps (on
/// a read-only connection) and deletes it in small batches with pauses between them.
async fn prune_audit_log(
    admin: AdminState,
    retention: Retention,
    interval: Duration,
    stop: CancellationToken,
) {
    loop {
        let reader = admin.reader.clone();
        match tokio::task::spawn_blocking(move || reader.prune_plan(retention)).await {
            Ok(Ok(plan)) => {
                tokio::select! {
                    () = prune_in_batches(&admin, plan) => {}
                    () = stop.cancelled() => return,
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "planning the audit log's pruning failed; retrying later")
            }
            Err(e) => {
                tracing::warn!(error = %e, "the audit log's pruning planner failed; retrying later")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = stop.cancelled() => return,
        }
    }
}

async fn prune_in_batches(admin: &AdminState, plan: PrunePlan) {
    let mut pruned = 0;
    loop {
        match admin.store.prune(plan.clone(), PRUNE_BATCH).await {
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
        tokio::time::sleep(PRUNE_PAUSE).await;
    }
    if pruned > 0 {
        tracing::info!(rows = pruned, "audit log pruned");
    }
}
