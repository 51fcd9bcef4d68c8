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
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

pub mod http1;
mod limits;
mod live;
mod rewound;

pub use http1::{ClientBody, ClientBodyError, ClientRequest};

use crate::admin::{self, AdminState, Readiness};
use crate::cluster::lease::{LeaseLoop, LeaseSettings};
use crate::cluster::{Ownership, ShardMap};
use crate::config::ClusterConfig;
use crate::config::{Config, Limits};
use crate::gate::{Gate, IDLE_EVICTION};
use crate::metrics::Metrics;
use crate::proxy::placement::ClusterPlane;
use crate::proxy::{
    DataPlane, Origin, ProxyBody, RequestLimits, TlsClientFiles, UpstreamClient, request_id,
};
use crate::store::{LastStop, PrunePlan, Reader, WriterGuard};
use crate::tls::{ClientIdentity, ServerTls};
use limits::{HeadDeadline, RequestPhase};
use live::{Fixed, Live, Pruning};
pub use live::{Reloaded, Reloader};
use rewound::Rewound;

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
    /// One listener per data-plane thread, all on `data_addr` (SO_REUSEPORT: the kernel spreads
    /// connections over them).
    data_listeners: Vec<std::net::TcpListener>,
    /// Held until the server stops, so that no second fencegate joins the data port.
    _port_claim: PortClaim,
    data_addr: SocketAddr,
    admin_listener: TcpListener,
    admin_addr: SocketAddr,
    /// `[tls]`: the data plane serves HTTPS only.
    data_tls: Option<Arc<ServerTls>>,
    /// `[admin_tls]`: the admin plane serves HTTPS only.
    admin_tls: Option<Arc<ServerTls>>,
    /// The data plane, routes, limits and retention, as reloads change them.
    live: Arc<Live>,
    reloader: Reloader,
    gate: Gate,
    admin: AdminState,
    /// Cluster mode's parts; `None` on a single node.
    cluster: Option<RunningCluster>,
    writer: WriterGuard,
    shutdown_grace: Duration,
    limits: Limits,
}

/// What cluster mode runs beside the planes: the lease loop, the deadline watch and the peer
/// plane.
#[derive(Debug)]
struct RunningCluster {
    ownership: Arc<Ownership>,
    lease: LeaseLoop,
    peer_listener: TcpListener,
    /// `[cluster.peer_tls]`: the peer plane serves HTTPS only.
    peer_tls: Option<Arc<ServerTls>>,
}

/// Cluster mode's parts, before the gate exists.
struct Joined {
    ownership: Arc<Ownership>,
    connection: crate::store::postgres::Connection,
    settings: LeaseSettings,
    secret: Option<String>,
    peer_listener: TcpListener,
}

/// Joins the cluster in `cluster.url`: binds the peer plane first (a start that fails on a port in
/// use changes nothing), then opens the shared store and a reader of it.
async fn join_cluster(
    cluster: &ClusterConfig,
    in_doubt_grace: Duration,
) -> anyhow::Result<(crate::store::SharedStore, WriterGuard, Reader, Joined)> {
    let peer_listener = TcpListener::bind(cluster.peer_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (cluster.peer_listen)",
                cluster.peer_listen
            )
        })?;
    let map = ShardMap::new(cluster.shards);
    let ownership = Arc::new(Ownership::new(
        cluster.replica.clone(),
        map,
        safety_margin(cluster.lease_ttl),
    ));
    // One exchange with PostgreSQL may take a third of a lease: a renewal that takes longer
    // would leave too little of the lease to matter.
    let connection = crate::store::postgres::Connection::new(
        &cluster.url,
        &cluster.replica,
        cluster.lease_ttl / 3,
    )?;
    let (store, writer) =
        crate::store::postgres::open(connection.clone(), map, Arc::clone(&ownership)).await?;
    let url = cluster.url.clone();
    // The reader's client is blocking: opened off the async threads.
    let reader = tokio::task::spawn_blocking(move || Reader::open(std::path::Path::new(&url)))
        .await
        .context("opening the PostgreSQL reader failed")??;
    tracing::info!(
        replica = %cluster.replica, shards = cluster.shards, lease_ttl = ?cluster.lease_ttl,
        peer = %cluster.peer_advertise, "joined the cluster"
    );
    let joined = Joined {
        ownership,
        connection,
        settings: LeaseSettings {
            peer: cluster.peer_advertise.clone(),
            lease_ttl: cluster.lease_ttl,
            max_clock_drift: cluster.max_clock_drift,
            in_doubt_grace,
        },
        secret: cluster.secret.clone(),
        peer_listener,
    };
    Ok((store, writer, reader, joined))
}

/// No request is admitted this close to a lease's deadline: a sixth of the lease (1 s of the
/// default 6 s), the longest a replica may stall between its lease check and the last byte of a
/// request leaving the host.
fn safety_margin(lease_ttl: Duration) -> Duration {
    lease_ttl / 6
}

impl App {
    /// Binds both listeners, then opens the database. In that order: a start that fails on a port
    /// in use must neither create the database nor leave it marked as served (which would make
    /// the next start hold every token back for `in_doubt_grace`).
    pub async fn build(config: Config) -> anyhow::Result<App> {
        let threads = config
            .worker_threads
            .or_else(|| std::thread::available_parallelism().ok().map(usize::from))
            .unwrap_or(1);
        let (data_listeners, port_claim) = bind_data_listeners(config.listen, threads)
            .with_context(|| format!("cannot listen on {} (listen)", config.listen))?;
        let admin_listener = TcpListener::bind(config.admin_listen)
            .await
            .with_context(|| format!("cannot listen on {} (admin_listen)", config.admin_listen))?;
        let data_addr = data_listeners[0].local_addr()?;
        let admin_addr = admin_listener.local_addr()?;
        let metrics = Metrics::new();
        let (store, writer, reader, cluster) = match &config.cluster {
            None => {
                let (store, writer) = crate::store::sqlite::SqliteStore::open(&config.database)?;
                let reader = match Reader::open(&config.database) {
                    Ok(reader) => reader,
                    Err(e) => {
                        // Nothing was served: the database stops as it was found.
                        let previous = writer.last_stop();
                        writer.close(previous).await;
                        return Err(e.into());
                    }
                };
                (store, writer, reader, None)
            }
            Some(cluster) => {
                let (store, writer, reader, joined) =
                    join_cluster(cluster, config.in_doubt_grace).await?;
                (store, writer, reader, Some(joined))
            }
        };
        let last_stop = writer.last_stop();
        if last_stop == LastStop::Unclean {
            tracing::warn!(
                in_doubt_grace = ?config.in_doubt_grace,
                "the previous server on this database did not stop cleanly; requests it forwarded may still reach the upstream, so new tokens wait in_doubt_grace after start-up"
            );
        }
        let mut gate = Gate::new(
            store.clone(),
            config.in_doubt_grace,
            Arc::clone(&metrics),
            last_stop,
        );
        if let Some(joined) = &cluster {
            gate = gate.with_others_in_doubt(Arc::clone(&joined.ownership) as _);
        }
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
        let running = Fixed::of(&config);
        let cluster_plane = cluster.as_ref().map(|joined| {
            Arc::new(ClusterPlane::new(
                Arc::clone(&joined.ownership),
                joined.secret.clone(),
                config
                    .cluster
                    .as_ref()
                    .and_then(|c| c.peer_tls.as_ref())
                    .map(peer_client_files),
            ))
        });
        let mut plane = DataPlane::new(
            config.routes,
            limits,
            gate.clone(),
            store.clone(),
            upstream,
            Arc::clone(&metrics),
        )
        .with_access_log(config.access_log);
        if let Some(cluster_plane) = &cluster_plane {
            plane = plane.with_cluster(Arc::clone(cluster_plane));
        }
        let pruning = Pruning {
            retention: config.retention,
            interval: config.audit_prune_interval,
        };
        let live = Live::new(plane, config.limits, pruning);
        let load_tls = |key: &str, files: &Option<crate::tls::TlsFiles>| match files {
            Some(files) => ServerTls::load(files.clone())
                .map(|tls| Some(Arc::new(tls)))
                .context(key.to_owned()),
            None => Ok(None),
        };
        let data_tls = load_tls("tls", &config.tls)?;
        let admin_tls = load_tls("admin_tls", &config.admin_tls)?;
        let peer_tls = load_tls(
            "cluster.peer_tls",
            &config.cluster.as_ref().and_then(|c| c.peer_tls.clone()),
        )?;
        let peer_client_tls = match config.cluster.as_ref().and_then(|c| c.peer_tls.as_ref()) {
            None => None,
            Some(peer_tls) => {
                let tls = peer_client_files(peer_tls)
                    .client_config()
                    .context("cluster.peer_tls")?;
                Some(Arc::new(tls))
            }
        };
        let reloader = Reloader::new(
            Arc::clone(&live),
            running,
            gate.clone(),
            store.clone(),
            Arc::clone(&metrics),
            cluster_plane,
            planes_tls(&data_tls, &admin_tls, &peer_tls),
        );
        let cluster = cluster.map(|joined| {
            let lease = LeaseLoop::new(
                joined.connection,
                Arc::clone(&joined.ownership),
                gate.clone(),
                joined.settings,
                Arc::clone(&metrics),
            );
            RunningCluster {
                ownership: joined.ownership,
                lease,
                peer_listener: joined.peer_listener,
                peer_tls: peer_tls.clone(),
            }
        });
        Ok(App {
            data_addr,
            data_listeners,
            _port_claim: port_claim,
            admin_addr,
            admin_listener,
            data_tls,
            admin_tls,
            live,
            reloader,
            gate: gate.clone(),
            admin: AdminState {
                store,
                reader,
                gate,
                metrics,
                readiness: Arc::new(Readiness::default()),
                token: config.admin_token,
                max_resource_len: config.max_resource_len,
                cluster: cluster.as_ref().map(|c| Arc::clone(&c.ownership)),
                cluster_secret: config.cluster.as_ref().and_then(|c| c.secret.clone()),
                peer_client_tls,
            },
            cluster,
            writer,
            shutdown_grace: config.shutdown_grace,
            limits: config.limits,
        })
    }

    /// A handle that applies a new configuration while the server runs (SIGHUP).
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
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
            self.live.pruning(),
            stop.clone(),
        ));
        let router = admin::router(self.admin.clone());
        let peer_tls = self.cluster.as_ref().and_then(|c| c.peer_tls.clone());
        let certificates: Vec<_> = planes_tls(&self.data_tls, &self.admin_tls, &peer_tls)
            .into_iter()
            .map(|(plane, tls)| tokio::spawn(tls.watch(plane, CERTIFICATE_CHECK_INTERVAL)))
            .collect();
        let admin = tokio::spawn(serve_plane(
            self.admin_listener,
            self.admin_tls.clone(),
            self.limits,
            Arc::new(Semaphore::new(self.limits.max_connections)),
            move |_client, phase| admin_service(router.clone(), phase),
            stop.clone(),
            self.shutdown_grace,
        ));
        let data = spawn_data_threads(
            self.data_listeners,
            &self.live,
            self.data_tls.clone(),
            self.limits.max_connections,
            &stop,
            self.shutdown_grace,
        )?;
        if self.cluster.is_some() {
            self.live.set_peer_admin(live::PeerAdmin {
                router: admin::router(self.admin.clone()),
                secret: self.admin.cluster_secret.clone(),
            });
        }
        let mut cluster = self.cluster.map(|cluster| {
            start_cluster(
                cluster,
                &self.live,
                self.limits.max_connections,
                &stop,
                self.shutdown_grace,
            )
        });
        self.admin.readiness.set_data_plane(true);
        shutdown.await;
        if let Some(cluster) = &mut cluster {
            // Shards first, while the planes still serve: each is drained and released, so its
            // next owner opens it at once, and requests for it are forwarded there meanwhile.
            cluster.leave().await;
        }
        self.admin.readiness.set_data_plane(false);
        stop.cancel();
        if let Some(cluster) = cluster {
            cluster.stopped().await;
        }
        for thread in data {
            thread
                .await
                .context("a data-plane thread ended without a word")?
                .context("a data-plane thread failed")?;
        }
        admin.await.context("the admin plane task failed")?;
        certificates.iter().for_each(tokio::task::JoinHandle::abort);
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

/// Cluster mode while the server runs: the lease loop, the deadline watch and the peer plane.
struct ClusterTasks {
    leave: CancellationToken,
    lease: tokio::task::JoinHandle<()>,
    deadlines: tokio::task::JoinHandle<()>,
    peer: tokio::task::JoinHandle<()>,
}

impl ClusterTasks {
    /// Hands every shard over (the lease loop returns once none is held, or the shutdown grace
    /// has passed), then stops the deadline watch. The peer plane goes on serving until `stop`,
    /// with the data plane: [`ClusterTasks::stopped`] waits for it.
    async fn leave(&mut self) {
        self.leave.cancel();
        let _ = (&mut self.lease).await;
        self.deadlines.abort();
    }

    /// Waits for the peer plane to drain, after `stop`.
    async fn stopped(self) {
        let _ = self.peer.await;
    }
}

fn start_cluster(
    cluster: RunningCluster,
    live: &Arc<Live>,
    max_connections: usize,
    stop: &CancellationToken,
    grace: Duration,
) -> ClusterTasks {
    let leave = CancellationToken::new();
    let lease = tokio::spawn(cluster.lease.run(leave.clone(), grace));
    let ownership = Arc::clone(&cluster.ownership);
    let deadlines = tokio::spawn(async move { ownership.watch_deadlines().await });
    let peer = tokio::spawn(serve_data_connections(
        cluster.peer_listener,
        Arc::clone(live),
        cluster.peer_tls,
        Arc::new(Semaphore::new(max_connections)),
        stop.clone(),
        grace,
        Origin::Peer,
    ));
    ClusterTasks {
        leave,
        lease,
        deadlines,
        peer,
    }
}

/// `threads` listeners on `addr` with SO_REUSEPORT, the first binding the port (port 0 picks
/// one) and the rest joining it; the kernel spreads connections over them evenly. A port held by
/// a listener without SO_REUSEPORT is refused as in use. A second fencegate by the same user could
/// still join the group and take half of the port's connections, each server enforcing tokens the
/// other never sees: [`PortClaim`] refuses that.
fn bind_data_listeners(
    addr: SocketAddr,
    threads: usize,
) -> std::io::Result<(Vec<std::net::TcpListener>, PortClaim)> {
    let first = reuse_port_listener(addr)?;
    let bound = first.local_addr()?;
    let claim = PortClaim::take(bound)?;
    let mut listeners = vec![first];
    for _ in 1..threads {
        listeners.push(reuse_port_listener(bound)?);
    }
    Ok((listeners, claim))
}

/// This process's claim on a data port: an abstract Unix socket named after the address. Abstract
/// names live in the network namespace, as ports do, and vanish with the process however it ends
/// (kill -9 included), so a second server on the same port in the same namespace fails to start.
#[derive(Debug)]
struct PortClaim {
    _socket: Option<std::os::unix::net::UnixListener>,
}

impl PortClaim {
    #[cfg(target_os = "linux")]
    fn take(addr: SocketAddr) -> std::io::Result<PortClaim> {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("fencegate-data-{addr}");
        let claim = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        std::os::unix::net::UnixListener::bind_addr(&claim)
            .map(|socket| PortClaim {
                _socket: Some(socket),
            })
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AddrInUse => std::io::Error::new(
                    e.kind(),
                    format!("another fencegate already serves the data plane on {addr}"),
                ),
                _ => e,
            })
    }

    /// Abstract Unix sockets are Linux's; elsewhere (a developer's laptop) there is no claim.
    #[cfg(not(target_os = "linux"))]
    fn take(_addr: SocketAddr) -> std::io::Result<PortClaim> {
        Ok(PortClaim { _socket: None })
    }
}

fn reuse_port_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)?.into_std()
}

/// The data plane, thread per core: one OS thread per listener, each with a current-thread
/// runtime of its own that accepts, serves and forwards its connections, with no work stealing
/// and no handoff between threads. The gate and the store are shared. Each thread's receiver
/// says when it has drained and stopped.
fn spawn_data_threads(
    listeners: Vec<std::net::TcpListener>,
    live: &Arc<Live>,
    tls: Option<Arc<ServerTls>>,
    max_connections: usize,
    stop: &CancellationToken,
    grace: Duration,
) -> anyhow::Result<Vec<tokio::sync::oneshot::Receiver<anyhow::Result<()>>>> {
    let mut threads = Vec::with_capacity(listeners.len());
    let open = Arc::new(Semaphore::new(max_connections));
    for (index, listener) in listeners.into_iter().enumerate() {
        let live = Arc::clone(live);
        let tls = tls.clone();
        let open = Arc::clone(&open);
        let stop = stop.clone();
        let (done, stopped) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("fg-data-{index}"))
            .spawn(move || {
                crate::metrics::use_shard(index + 1);
                let served = serve_data_thread(listener, live, tls, open, stop, grace);
                let _ = done.send(served);
            })
            .context("cannot start a data-plane thread")?;
        threads.push(stopped);
    }
    Ok(threads)
}

fn serve_data_thread(
    listener: std::net::TcpListener,
    live: Arc<Live>,
    tls: Option<Arc<ServerTls>>,
    open: Arc<Semaphore>,
    stop: CancellationToken,
    grace: Duration,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a data-plane runtime")?;
    // A token of this thread's own, cancelled with the server's: each connection asks it whether
    // the server is stopping twice per request, and `is_cancelled` takes the token's lock. One
    // token shared by every thread put that lock's cache line between the cores on every request.
    let stop = stop.child_token();
    runtime.block_on(async move {
        let listener = TcpListener::from_std(listener)?;
        serve_data_connections(listener, live, tls, open, stop, grace, Origin::Client).await;
        Ok(())
    })
}

/// The data plane on one thread's listener: accepts a connection once fewer than
/// `max_connections` are served (as [`serve_plane`]), serves it with fencegate's own HTTP/1.1
/// server ([`http1`]) — or hyper's HTTP/2 if it opens with h2's preface; with `tls`, hyper's
/// server after the handshake — and at `stop` lets every connection finish its request, for up
/// to `grace`.
async fn serve_data_connections(
    listener: TcpListener,
    live: Arc<Live>,
    tls: Option<Arc<ServerTls>>,
    open: Arc<Semaphore>,
    stop: CancellationToken,
    grace: Duration,
    origin: Origin,
) {
    let connections = TaskTracker::new();
    while let Some((stream, client, permit)) = next_connection(&listener, &open, &stop).await {
        let _ = stream.set_nodelay(true);
        // The limits of the moment the connection is accepted: a reload applies to new ones.
        let limits = live.limits();
        let live = Arc::clone(&live);
        let stop = stop.clone();
        let acceptor = tls.as_ref().map(|tls| tls.acceptor());
        connections.spawn(async move {
            match acceptor {
                None => serve_data_connection(stream, client, live, limits, stop, origin).await,
                Some(acceptor) => {
                    let limit = limits.header_read_timeout;
                    if let Some(io) = handshake(stream, Some(acceptor), limit, client).await {
                        let remote = Remote {
                            address: client,
                            identity: client_identity(&io),
                        };
                        serve_with_hyper(io, remote, live, limits, stop, origin, false).await;
                    }
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    connections.close();
    tokio::select! {
        () = connections.wait() => tracing::info!("in-flight requests drained"),
        () = tokio::time::sleep(grace) => tracing::warn!(?grace, "shutdown grace elapsed with requests still in flight"),
    }
}

/// Accepts the next connection and waits for a slot under `max_connections`; `None` at `stop`.
async fn next_connection(
    listener: &TcpListener,
    open: &Arc<Semaphore>,
    stop: &CancellationToken,
) -> Option<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    let (stream, client) = loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => break accepted,
                Err(e) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = stop.cancelled() => return None,
        }
    };
    let permit = tokio::select! {
        permit = Arc::clone(open).acquire_owned() => permit.ok()?,
        () = stop.cancelled() => return None,
    };
    Some((stream, client, permit))
}

/// One data-plane connection: HTTP/1.1 through [`http1`], handed to hyper if it speaks h2.
async fn serve_data_connection(
    stream: TcpStream,
    client: SocketAddr,
    live: Arc<Live>,
    limits: Limits,
    stop: CancellationToken,
    origin: Origin,
) {
    let settings = http1::Settings {
        head: http1::HeadLimits {
            max_size: limits.max_header_size,
            max_headers: limits.max_headers,
        },
        header_read_timeout: limits.header_read_timeout,
        idle_timeout: limits.idle_timeout,
    };
    let handle = |request| dispatch(&live, request, client, origin);
    match http1::serve(stream, settings, stop.clone(), handle).await {
        http1::Ended::Closed => {}
        http1::Ended::Http2 { stream, read } => {
            serve_with_hyper(
                Rewound::new(read, stream),
                Remote {
                    address: client,
                    identity: None,
                },
                live,
                limits,
                stop,
                origin,
                true,
            )
            .await;
        }
    }
}

/// Where a data- or peer-plane request goes: to the admin router for an admin call another
/// replica relayed over the peer plane, else to the proxy. Inlined: its future is the hot path's
/// whole request future, and returned from a call it was copied on every request (5% of the
/// fenced-PUT throughput, bench/compare.sh).
#[inline(always)]
fn dispatch(
    live: &Live,
    request: ClientRequest,
    client: SocketAddr,
    origin: Origin,
) -> impl Future<Output = http::Response<ProxyBody>> + use<> {
    let admin = (origin == Origin::Peer)
        .then(|| live.peer_admin().cloned())
        .flatten()
        .filter(|_| request.uri().path().starts_with(admin::PEER_ADMIN_PREFIX));
    let plane = live.plane();
    async move {
        match admin {
            Some(admin) => answer_peer_admin(admin, request).await,
            None => answer(plane, request, client, origin).await,
        }
    }
}

/// Answers one request: a request id, then the proxy itself. No tower layers here: the
/// request-id layers and their futures cost 8% of the hot path's throughput (bench/compare.sh),
/// and tower-http's `TraceLayer` 7%, for request lines that were only ever logged at DEBUG; the
/// proxy logs its own refusals and failures, and each response at DEBUG.
async fn answer(
    plane: Arc<DataPlane>,
    mut request: ClientRequest,
    client: SocketAddr,
    origin: Origin,
) -> http::Response<ProxyBody> {
    let id = request_id::ensure(request.headers_mut());
    let mut response = plane.handle(request, client, origin, &id).await;
    request_id::echo(response.headers_mut(), id);
    response
}

/// An admin call another replica relayed to this one, the owner of its resource's shard: checked
/// for the cluster secret, then served by the admin router (whose own bearer check applies too).
async fn answer_peer_admin(
    admin: live::PeerAdmin,
    request: ClientRequest,
) -> http::Response<ProxyBody> {
    use http_body_util::{BodyExt, Either, Full, Limited};
    use tower::ServiceExt as _;
    /// A fence or reset body is a few bytes of JSON.
    const MAX_RELAYED_BODY: usize = 64 * 1024;
    let refuse = |status, slug, title, detail: &str| {
        crate::problem::response(status, slug, title, detail.to_owned()).map(Either::Right)
    };
    if !admin::peer_authenticated(admin.secret.as_deref(), request.headers()) {
        return refuse(
            http::StatusCode::UNAUTHORIZED,
            "peer-unauthenticated",
            "Cluster secret required",
            "the peer plane requires the cluster secret (Fencegate-Cluster-Secret)",
        );
    }
    let (mut parts, body) = (*request).into_parts();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .strip_prefix(admin::PEER_ADMIN_PREFIX)
        .unwrap_or("/")
        .to_owned();
    let Ok(uri) = path_and_query.parse() else {
        return refuse(
            http::StatusCode::BAD_REQUEST,
            "bad-path",
            "Bad path",
            "unreadable relayed path",
        );
    };
    parts.uri = uri;
    let Ok(body) = Limited::new(body, MAX_RELAYED_BODY).collect().await else {
        return refuse(
            http::StatusCode::BAD_REQUEST,
            "body-unreadable",
            "Request body unreadable",
            "the relayed body could not be read",
        );
    };
    let request = http::Request::from_parts(parts, axum::body::Body::from(body.to_bytes()));
    let Ok(response) = admin.router.oneshot(request).await;
    let (parts, body) = response.into_parts();
    match body.collect().await {
        Ok(body) => http::Response::from_parts(parts, Either::Right(Full::new(body.to_bytes()))),
        Err(_) => refuse(
            http::StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            "the admin answer could not be read",
        ),
    }
}

/// Who is at the other end of a data-plane connection.
struct Remote {
    address: SocketAddr,
    /// The names of the certificate the client presented, verified against `client_ca`.
    identity: Option<Arc<ClientIdentity>>,
}

/// The identity of a TLS client's verified certificate; `None` on plain TCP or without one.
fn client_identity(
    io: &Either<TcpStream, tokio_rustls::server::TlsStream<TcpStream>>,
) -> Option<Arc<ClientIdentity>> {
    let Either::Right(tls) = io else {
        return None;
    };
    let end_entity = tls.get_ref().1.peer_certificates()?.first()?;
    ClientIdentity::of_certificate(end_entity)
}

/// A data-plane connection served by hyper: h2 once its preface has been seen on plain TCP
/// (`http2_only`), or a TLS connection, h2 or HTTP/1.1 as ALPN chose; each request carries the
/// client's certificate identity in its extensions. The same head deadline as the admin plane's.
async fn serve_with_hyper<I>(
    io: I,
    remote: Remote,
    live: Arc<Live>,
    limits: Limits,
    stop: CancellationToken,
    origin: Origin,
    http2_only: bool,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let phase = Arc::new(RequestPhase::default());
    let io = HeadDeadline::new(io, limits.header_read_timeout, Arc::clone(&phase));
    let service = hyper::service::service_fn(|request: http::Request<Incoming>| {
        let in_request = phase.begin();
        let mut request = Box::new(request.map(ClientBody::Hyper));
        if let Some(identity) = &remote.identity {
            request.extensions_mut().insert(Arc::clone(identity));
        }
        let answered = dispatch(&live, request, remote.address, origin);
        async move {
            let response = answered.await;
            drop(in_request);
            Ok::<_, Infallible>(with_headers_in_map(response))
        }
    });
    // The admin plane's settings.
    let mut builder = connection_builder(limits);
    if http2_only {
        builder = builder.http2_only();
    }
    let connection = builder.serve_connection(TokioIo::new(io), service);
    let mut connection = std::pin::pin!(connection);
    let served = tokio::select! {
        served = connection.as_mut() => served,
        () = stop.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = served {
        tracing::debug!(error = %e, client = %remote.address, "connection ended with an error");
    }
}

/// An answer whose upstream headers were kept verbatim, for hyper's server, which writes only
/// the map. httparse and `http` accept the same header bytes, so the failure is not expected;
/// it is answered as any other upstream answer fencegate cannot relay, with what the proxy added.
fn with_headers_in_map(mut response: http::Response<ProxyBody>) -> http::Response<ProxyBody> {
    match crate::verbatim::into_map(&mut response) {
        Ok(()) => response,
        Err(invalid) => {
            let mut refused = crate::problem::response(
                http::StatusCode::BAD_GATEWAY,
                "upstream-unreachable",
                "Upstream unreachable",
                invalid.to_string(),
            )
            .map(http_body_util::Either::Right);
            refused
                .headers_mut()
                .extend(std::mem::take(response.headers_mut()));
            refused
        }
    }
}

/// Serves one plane on one listener: accepts a connection, waits until fewer than
/// `max_connections` of the plane's (`open`, shared by every thread of the plane) are being
/// served, applies the limits to it, and at `stop` drains for up to `grace`. A thread accepts its
/// next connection only once the last has a slot, so beyond the limit at most one connection per
/// thread is accepted and waiting; the rest wait in the listen backlog.
async fn serve_plane<S, B>(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    limits: Limits,
    open: Arc<Semaphore>,
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
    loop {
        let (stream, client) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        let permit = tokio::select! {
            permit = Arc::clone(&open).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break, // never closed
            },
            () = stop.cancelled() => break,
        };
        // Answers are written whole, each in one system call: Nagle's algorithm could only hold
        // one back, waiting for an acknowledgement.
        let _ = stream.set_nodelay(true);
        let phase = Arc::new(RequestPhase::default());
        let service = service_for(client, Arc::clone(&phase));
        let acceptor = tls.as_ref().map(|tls| tls.acceptor());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let Some(io) = handshake(stream, acceptor, limits.header_read_timeout, client).await
            else {
                drop(permit);
                return;
            };
            let io = HeadDeadline::new(io, limits.header_read_timeout, phase);
            let connection = builder
                .serve_connection(TokioIo::new(io), service)
                .into_owned();
            if let Err(e) = watcher.watch(connection).await {
                tracing::debug!(error = %e, %client, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("in-flight requests drained"),
        () = tokio::time::sleep(grace) => tracing::warn!(?grace, "shutdown grace elapsed with requests still in flight"),
    }
}

/// What a replica with `[cluster.peer_tls]` trusts and presents when it connects to another's
/// peer plane: the cluster's CA (`client_ca`, besides the system's roots) and its own peer
/// certificate, so that a peer plane requiring client certificates admits it.
fn peer_client_files(peer_tls: &crate::tls::TlsFiles) -> TlsClientFiles {
    TlsClientFiles {
        ca: peer_tls.client_ca.clone(),
        identity: Some((peer_tls.cert.clone(), peer_tls.key.clone())),
    }
}

/// The planes that serve TLS, by name: what a reload re-reads and what is watched on disk.
fn planes_tls(
    data: &Option<Arc<ServerTls>>,
    admin: &Option<Arc<ServerTls>>,
    peer: &Option<Arc<ServerTls>>,
) -> Vec<(&'static str, Arc<ServerTls>)> {
    [("data", data), ("admin", admin), ("peer", peer)]
        .into_iter()
        .filter_map(|(plane, tls)| tls.clone().map(|tls| (plane, tls)))
        .collect()
}

/// How often a plane's certificate files are checked for a change on disk.
const CERTIFICATE_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// The connection as it is served: the TCP stream itself, or TLS over it once the handshake has
/// finished within `limit` (the head deadline: a client that never finishes its handshake holds
/// a connection slot no longer than one that never finishes its request head).
async fn handshake(
    stream: TcpStream,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    limit: Duration,
    client: SocketAddr,
) -> Option<Either<TcpStream, tokio_rustls::server::TlsStream<TcpStream>>> {
    let Some(acceptor) = acceptor else {
        return Some(Either::Left(stream));
    };
    match tokio::time::timeout(limit, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Some(Either::Right(tls)),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, %client, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%client, ?limit, "TLS handshake not finished within header_read_timeout");
            None
        }
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

/// Retention: at start-up, then every `interval` and after every reload, plans what `retention`
/// no longer keeps (on a read-only connection) and deletes it in small batches with pauses
/// between them.
async fn prune_audit_log(
    admin: AdminState,
    mut pruning: tokio::sync::watch::Receiver<Pruning>,
    stop: CancellationToken,
) {
    loop {
        let Pruning {
            retention,
            interval,
        } = *pruning.borrow_and_update();
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
        // A reload's new retention applies at once, not after the old interval.
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = pruning.changed() => {}
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
