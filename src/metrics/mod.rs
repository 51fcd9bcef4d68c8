//! Prometheus metrics, served by the admin plane at `/metrics`.
//!
//! What every forwarded request records lives in per-thread [`shards`], summed when scraped; the
//! rarer counters are prometheus-client's, created up front and kept as handles, so recording is
//! an atomic add: no label lookup, no allocation per request.

mod shards;

pub use shards::use_shard;

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::audit::Reason;
use crate::store::Via;

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX)
        })
}

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = [(&'static str, &'static str); 1];

/// fencegate's metrics. Share one instance (behind an `Arc`) between the planes.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Forwarded requests, upstream calls in flight and their latency.
    hot: Arc<shards::Shards>,
    rejected: [Counter; Reason::ALL.len()],
    advances: [Counter; 3],
    resident: Gauge,
    pruned: Counter,
    upstream_failures: Family<FailureLabels, Counter>,
    reload_success: Gauge,
    reload_time: Gauge,
    cluster: ClusterMetrics,
}

/// Cluster mode's metrics; they stay at zero on a single node.
#[derive(Debug)]
struct ClusterMetrics {
    shards_owned: Gauge,
    acquired: Counter,
    failovers: Counter,
    handoffs: Counter,
    lost: Counter,
    peer_forwarded: Counter,
    renewal: Histogram,
}

/// A failed upstream call's route (its path template), status answered and cause.
type FailureLabels = [(&'static str, String); 3];

/// The commit fencegate was built from (`build.rs`), or `unknown` outside a git checkout.
const COMMIT: &str = match option_env!("FENCEGATE_COMMIT") {
    Some(commit) => commit,
    None => "unknown",
};

impl Metrics {
    /// Registers every metric, all at zero.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("fencegate");
        let hot = Arc::new(shards::Shards::new());
        registry.register(
            "requests_forwarded",
            "Requests forwarded upstream, by whether they were fenced",
            shards::Forwarded(Arc::clone(&hot)),
        );
        let rejected = Family::<Labels, Counter>::default();
        registry.register(
            "requests_rejected",
            "Fenced requests refused and audited, by reason",
            rejected.clone(),
        );
        let advances = Family::<Labels, Counter>::default();
        registry.register(
            "epoch_advances",
            "Changes of a resource's highest token, by what caused them",
            advances.clone(),
        );
        registry.register(
            "upstream_in_flight",
            "Requests forwarded upstream and not yet answered",
            shards::InFlight(Arc::clone(&hot)),
        );
        registry.register(
            "upstream_response_seconds",
            "Time from forwarding a request to the upstream's response head",
            shards::Latency(Arc::clone(&hot)),
        );
        let resident = Gauge::default();
        registry.register(
            "resources_resident",
            "Resources whose fencing state is held in memory",
            resident.clone(),
        );
        let pruned = Counter::default();
        registry.register(
            "audit_rows_pruned",
            "Audit-log rows deleted by retention",
            pruned.clone(),
        );
        let upstream_failures = Family::<FailureLabels, Counter>::default();
        registry.register(
            "upstream_failures",
            "Requests answered 502 or 504 because the upstream failed, by route, status and cause",
            upstream_failures.clone(),
        );
        let build_info = Family::<[(&'static str, &'static str); 2], Gauge>::default();
        registry.register(
            "build_info",
            "1, labelled with the version and the commit fencegate was built from",
            build_info.clone(),
        );
        build_info
            .get_or_create(&[("version", env!("CARGO_PKG_VERSION")), ("commit", COMMIT)])
            .set(1);
        let reload_success = Gauge::default();
        registry.register(
            "config_last_reload_success",
            "1 if the last config load (the start, or a SIGHUP reload) was applied, 0 if it failed",
            reload_success.clone(),
        );
        reload_success.set(1);
        let reload_time = Gauge::default();
        registry.register(
            "config_last_reload_timestamp_seconds",
            "When the config was last loaded or a reload attempted, in seconds since the Unix epoch",
            reload_time.clone(),
        );
        reload_time.set(unix_now());
        let cluster = ClusterMetrics {
            shards_owned: Gauge::default(),
            acquired: Counter::default(),
            failovers: Counter::default(),
            handoffs: Counter::default(),
            lost: Counter::default(),
            peer_forwarded: Counter::default(),
            renewal: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
        };
        cluster.register(&mut registry);
        let label = |family: &Family<Labels, Counter>, key, value| {
            family.get_or_create(&[(key, value)]).clone()
        };
        Arc::new(Self {
            hot,
            rejected: Reason::ALL.map(|reason| label(&rejected, "reason", reason.as_str())),
            advances: [Via::Write, Via::Fence, Via::Reset]
                .map(|via| label(&advances, "via", via.as_str())),
            resident,
            pruned,
            upstream_failures,
            reload_success,
            reload_time,
            cluster,
            registry,
        })
    }

    /// This replica now holds `count` shards.
    pub fn shards_owned(&self, count: usize) {
        self.cluster
            .shards_owned
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// A free shard was acquired.
    pub fn shard_acquired(&self) {
        self.cluster.acquired.inc();
    }

    /// A shard whose owner's lease had run out was taken over: a failover.
    pub fn shard_taken_over(&self) {
        self.cluster.acquired.inc();
        self.cluster.failovers.inc();
    }

    /// This replica drained a shard and released it for its next owner.
    pub fn shard_handed_over(&self) {
        self.cluster.handoffs.inc();
    }

    /// A lease this replica held was taken over by another before it could renew it.
    pub fn lease_lost(&self) {
        self.cluster.lost.inc();
    }

    /// A lease renewal round trip took `elapsed`.
    pub fn lease_renewed(&self, elapsed: Duration) {
        self.cluster.renewal.observe(elapsed.as_secs_f64());
    }

    /// A request was forwarded to the owner of its shard over the peer plane.
    pub fn peer_forwarded(&self) {
        self.cluster.peer_forwarded.inc();
    }

    /// A request was answered `status` (502 or 504) because its upstream failed with `cause`.
    pub fn upstream_failed(&self, route: &str, status: u16, cause: &'static str) {
        self.upstream_failures
            .get_or_create(&[
                ("route", route.to_owned()),
                ("status", status.to_string()),
                ("cause", cause.to_owned()),
            ])
            .inc();
    }

    /// A SIGHUP reload was applied (`true`) or refused.
    pub fn reloaded(&self, applied: bool) {
        self.reload_success.set(i64::from(applied));
        self.reload_time.set(unix_now());
    }

    /// A request was forwarded upstream.
    pub fn forwarded(&self, fenced: bool) {
        self.hot.forwarded(fenced);
    }

    /// A fenced request was refused and audited.
    pub fn rejected(&self, reason: Reason) {
        self.rejected[reason as usize].inc();
    }

    /// A resource's highest token changed.
    pub fn advanced(&self, via: Via) {
        self.advances[via as usize].inc();
    }

    /// Counts a request as in flight upstream until the returned guard is dropped, and then
    /// records how long it took.
    pub fn upstream_call(&self) -> UpstreamCall<'_> {
        self.hot.call_started();
        UpstreamCall {
            metrics: self,
            started: std::time::Instant::now(),
        }
    }

    /// Retention deleted `rows` audit rows.
    pub fn pruned(&self, rows: usize) {
        self.pruned.inc_by(rows as u64);
    }

    /// Renders every metric in the OpenMetrics text format, after recording `resident`.
    pub fn render(&self, resident: usize) -> String {
        self.resident
            .set(i64::try_from(resident).unwrap_or(i64::MAX));
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

impl ClusterMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "cluster_shards_owned",
            "Shards whose lease this replica holds",
            self.shards_owned.clone(),
        );
        registry.register(
            "cluster_lease_acquisitions",
            "Shard leases this replica acquired (free, handed over, or taken over)",
            self.acquired.clone(),
        );
        registry.register(
            "cluster_failovers",
            "Shards this replica took over after their owner's lease ran out",
            self.failovers.clone(),
        );
        registry.register(
            "cluster_handoffs",
            "Shards this replica drained and released for their next owner",
            self.handoffs.clone(),
        );
        registry.register(
            "cluster_leases_lost",
            "Leases taken over by another replica before this one renewed them",
            self.lost.clone(),
        );
        registry.register(
            "cluster_peer_forwarded",
            "Requests forwarded to their shard's owner over the peer plane",
            self.peer_forwarded.clone(),
        );
        registry.register(
            "cluster_lease_renewal_seconds",
            "Round trip of one lease renewal to PostgreSQL",
            self.renewal.clone(),
        );
    }
}

/// One request in flight upstream; see [`Metrics::upstream_call`].
#[derive(Debug)]
pub struct UpstreamCall<'a> {
    metrics: &'a Metrics,
    started: std::time::Instant,
}

impl UpstreamCall<'_> {
    /// When the call began.
    pub fn started(&self) -> std::time::Instant {
        self.started
    }

    /// The elapsed time so far.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

impl Drop for UpstreamCall<'_> {
    fn drop(&mut self) {
        self.metrics.hot.call_ended(self.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines()
            .find(|line| line.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
    }

    #[test]
    fn counters_render_with_their_labels() {
        let metrics = Metrics::new();
        metrics.forwarded(true);
        metrics.forwarded(true);
        metrics.rejected(Reason::Stale);
        metrics.advanced(Via::Reset);
        let call = metrics.upstream_call();
        let text = metrics.render(7);
        assert!(line(&text, "fencegate_requests_forwarded_total{fenced=\"true\"}").ends_with(" 2"));
        assert!(line(&text, "fencegate_requests_rejected_total{reason=\"stale\"}").ends_with(" 1"));
        assert!(line(&text, "fencegate_requests_rejected_total{reason=\"jump\"}").ends_with(" 0"));
        assert!(line(&text, "fencegate_epoch_advances_total{via=\"reset\"}").ends_with(" 1"));
        assert!(line(&text, "fencegate_upstream_in_flight ").ends_with(" 1"));
        assert!(line(&text, "fencegate_resources_resident ").ends_with(" 7"));
        drop(call);
        let text = metrics.render(7);
        assert!(line(&text, "fencegate_upstream_in_flight ").ends_with(" 0"));
        assert!(line(&text, "fencegate_upstream_response_seconds_count").ends_with(" 1"));
    }
}
