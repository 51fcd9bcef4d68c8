//! What a reload (SIGHUP) changes while fencegate serves, and how the data-plane threads see it.
//!
//! A reload builds a new [`DataPlane`] (routes, request limits, upstream timeouts) around the same
//! gate, store and metrics, and swaps it in. Each data-plane thread keeps its own copy and
//! remakes it only when the version moved, so a request pays one atomic load for the check and
//! clones an `Arc` no other thread touches. A request keeps the plane it started with until it
//! ends: a reload never changes the route, resource or upstream of a request in flight. The
//! gate is the same object before and after, so the ordering guarantee spans reloads.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

use crate::config::{AdminToken, Config, Limits};
use crate::gate::Gate;
use crate::metrics::Metrics;
use crate::proxy::placement::ClusterPlane;
use crate::proxy::{DataPlane, RequestLimits, UpstreamClient};
use crate::store::{Retention, SharedStore};
use crate::tls::ServerTls;

/// How often, and by which rule, the audit log is pruned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Pruning {
    pub(super) retention: Retention,
    pub(super) interval: Duration,
}

/// The reloadable state, shared by every thread.
#[derive(Debug)]
pub(super) struct Live {
    plane: Mutex<Arc<DataPlane>>,
    /// Bumped by every reload, after `plane` was replaced.
    version: AtomicU64,
    /// The limits new data-plane connections get.
    limits: Mutex<Limits>,
    pruning: watch::Sender<Pruning>,
    /// Cluster mode: the admin calls other replicas relay to this one, served on the peer plane.
    peer_admin: std::sync::OnceLock<PeerAdmin>,
}

/// The admin router as the peer plane serves it, behind the cluster secret.
#[derive(Clone)]
pub(super) struct PeerAdmin {
    pub(super) router: axum::Router,
    pub(super) secret: Option<String>,
}

impl std::fmt::Debug for PeerAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerAdmin").finish_non_exhaustive()
    }
}

thread_local! {
    /// This thread's copy of the data plane: which `Live` it came from, at which version.
    static PLANE: RefCell<Option<(usize, u64, Arc<DataPlane>)>> = const { RefCell::new(None) };
}

impl Live {
    pub(super) fn new(plane: DataPlane, limits: Limits, pruning: Pruning) -> Arc<Live> {
        Arc::new(Live {
            plane: Mutex::new(Arc::new(plane)),
            version: AtomicU64::new(0),
            limits: Mutex::new(limits),
            pruning: watch::Sender::new(pruning),
            peer_admin: std::sync::OnceLock::new(),
        })
    }

    /// Sets the admin router the peer plane serves (once, at start-up).
    pub(super) fn set_peer_admin(&self, admin: PeerAdmin) {
        let _ = self.peer_admin.set(admin);
    }

    pub(super) fn peer_admin(&self) -> Option<&PeerAdmin> {
        self.peer_admin.get()
    }

    /// The current data plane, as this thread's own copy (its upstream pool is thread-local).
    pub(super) fn plane(&self) -> Arc<DataPlane> {
        let id = self as *const Live as usize;
        let version = self.version.load(Ordering::Acquire);
        PLANE.with(|cell| {
            let mut cached = cell.borrow_mut();
            match &*cached {
                Some((cached_id, cached_version, plane))
                    if *cached_id == id && *cached_version == version =>
                {
                    Arc::clone(plane)
                }
                _ => {
                    let plane = Arc::new(self.template().for_thread());
                    *cached = Some((id, version, Arc::clone(&plane)));
                    plane
                }
            }
        })
    }

    fn template(&self) -> Arc<DataPlane> {
        Arc::clone(&self.plane.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The limits a connection accepted now is served under.
    pub(super) fn limits(&self) -> Limits {
        *self.limits.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn pruning(&self) -> watch::Receiver<Pruning> {
        self.pruning.subscribe()
    }

    fn replace(&self, plane: DataPlane, limits: Limits, pruning: Pruning) {
        *self.plane.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(plane);
        *self.limits.lock().unwrap_or_else(PoisonError::into_inner) = limits;
        self.version.fetch_add(1, Ordering::Release);
        self.pruning.send_replace(pruning);
    }
}

/// The keys a running server cannot change; a reload that changes them says so and keeps the
/// running value until the next restart.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Fixed {
    listen: std::net::SocketAddr,
    admin_listen: std::net::SocketAddr,
    database: std::path::PathBuf,
    worker_threads: Option<usize>,
    max_connections: usize,
    in_doubt_grace: Duration,
    shutdown_grace: Duration,
    admin_token: Option<AdminToken>,
    /// Cluster mode's settings (`[cluster]`, the peer plane, the secret): its leases and peers
    /// are set up once.
    cluster: Option<crate::config::ClusterConfig>,
    /// Which files each plane's TLS reads (their contents reload; the paths, and turning TLS on
    /// or off, wait for a restart).
    tls: Option<crate::tls::TlsFiles>,
    admin_tls: Option<crate::tls::TlsFiles>,
}

impl Fixed {
    pub(super) fn of(config: &Config) -> Fixed {
        Fixed {
            listen: config.listen,
            admin_listen: config.admin_listen,
            database: config.database.clone(),
            worker_threads: config.worker_threads,
            max_connections: config.limits.max_connections,
            in_doubt_grace: config.in_doubt_grace,
            shutdown_grace: config.shutdown_grace,
            admin_token: config.admin_token.clone(),
            cluster: config.cluster.clone(),
            tls: config.tls.clone(),
            admin_tls: config.admin_tls.clone(),
        }
    }

    /// The names of the keys that differ in `other`.
    fn differences(&self, other: &Fixed) -> Vec<&'static str> {
        let mut keys = Vec::new();
        let mut differ = |key, differs| {
            if differs {
                keys.push(key);
            }
        };
        differ("listen", self.listen != other.listen);
        differ("admin_listen", self.admin_listen != other.admin_listen);
        differ("database", self.database != other.database);
        differ(
            "worker_threads",
            self.worker_threads != other.worker_threads,
        );
        differ(
            "max_connections",
            self.max_connections != other.max_connections,
        );
        differ(
            "in_doubt_grace",
            self.in_doubt_grace != other.in_doubt_grace,
        );
        differ(
            "shutdown_grace",
            self.shutdown_grace != other.shutdown_grace,
        );
        differ("admin_token", self.admin_token != other.admin_token);
        differ("cluster", self.cluster != other.cluster);
        differ("tls", self.tls != other.tls);
        differ("admin_tls", self.admin_tls != other.admin_tls);
        keys
    }
}

/// Applies a new configuration to a running server.
#[derive(Debug, Clone)]
pub struct Reloader {
    live: Arc<Live>,
    running: Arc<Fixed>,
    gate: Gate,
    store: SharedStore,
    metrics: Arc<Metrics>,
    /// Cluster mode's part of the data plane, kept across reloads.
    cluster: Option<Arc<ClusterPlane>>,
    /// The planes' TLS (by plane name), whose files every reload reads again.
    tls: Vec<(&'static str, Arc<ServerTls>)>,
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// How many routes now serve.
    pub routes: usize,
    /// Keys that changed but wait for a restart (the running values stay).
    pub restart_needed: Vec<&'static str>,
    /// Certificates that did not load again: the plane and why (its old certificate stays).
    pub tls_failed: Vec<(&'static str, String)>,
}

impl Reloader {
    pub(super) fn new(
        live: Arc<Live>,
        running: Fixed,
        gate: Gate,
        store: SharedStore,
        metrics: Arc<Metrics>,
        cluster: Option<Arc<ClusterPlane>>,
        tls: Vec<(&'static str, Arc<ServerTls>)>,
    ) -> Reloader {
        Reloader {
            live,
            running: Arc::new(running),
            gate,
            store,
            metrics,
            cluster,
            tls,
        }
    }

    /// Records a reload that could not be applied (the file did not load or validate).
    pub fn refused(&self) {
        self.metrics.reloaded(false);
    }

    /// Swaps in `config`'s routes, limits, upstream timeouts, access log and audit retention.
    /// Requests in flight finish on the routes they started with; new connections get the new
    /// limits.
    pub fn apply(&self, config: Config) -> Reloaded {
        let restart_needed = self.running.differences(&Fixed::of(&config));
        let routes = config.routes.len();
        let mut plane = DataPlane::new(
            config.routes,
            RequestLimits {
                max_resource_len: config.max_resource_len,
                max_inspect_body: config.max_inspect_body,
                max_resources_per_request: config.max_resources_per_request,
            },
            self.gate.clone(),
            self.store.clone(),
            UpstreamClient::new(
                config.upstream_timeout,
                config.upstream_connect_timeout,
                config.max_body,
            ),
            Arc::clone(&self.metrics),
        )
        .with_access_log(config.access_log);
        if let Some(cluster) = &self.cluster {
            plane = plane.with_cluster(Arc::clone(cluster));
        }
        // The connection cap stays (it is the semaphore every thread shares).
        let limits = Limits {
            max_connections: self.running.max_connections,
            ..config.limits
        };
        let pruning = Pruning {
            retention: config.retention,
            interval: config.audit_prune_interval,
        };
        self.live.replace(plane, limits, pruning);
        let tls_failed = self
            .tls
            .iter()
            .filter_map(|(plane, tls)| tls.reload().err().map(|error| (*plane, error.to_string())))
            .collect();
        self.metrics.reloaded(true);
        Reloaded {
            routes,
            restart_needed,
            tls_failed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;

    fn config(cluster: &str) -> Config {
        let text = format!(
            "database = \"postgres://fencegate@127.0.0.1:5432/fg\"\n[cluster]\nreplica = \"fg-1\"\n{cluster}\n\
             [[routes]]\npath = \"/{{*rest}}\"\nupstream = \"http://127.0.0.1:1\"\nresource = \"r\"\n"
        );
        Config::from_toml(&text, std::path::Path::new("fg.toml"), Overrides::default()).unwrap()
    }

    #[test]
    fn a_reload_that_changes_the_cluster_settings_says_they_wait_for_a_restart() {
        let running = Fixed::of(&config("lease_ttl = \"6s\""));
        assert!(
            running
                .differences(&Fixed::of(&config("lease_ttl = \"6s\"")))
                .is_empty()
        );
        assert_eq!(
            running.differences(&Fixed::of(&config("lease_ttl = \"9s\""))),
            vec!["cluster"]
        );
    }
}
