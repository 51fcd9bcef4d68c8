//! Cluster mode on the data plane: which replica serves a fenced request.
//!
//! A request is gated on the replica that holds the lease of its resources' shard. Any other
//! replica forwards it there over the peer plane, one hop at most: the owner never forwards a
//! request that came over the peer plane again. A shard with no live owner (its owner died and
//! the lease has not run out yet, or it is being handed over) makes the request wait, up to the
//! upstream timeout, for the lease loop to find one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::HeaderValue;
use smallvec::{SmallVec, smallvec};
use tokio::time::Instant;

use super::upstream::{TlsClientFiles, Upstream};
pub(super) use crate::cluster::ownership::Admission;
use crate::cluster::ownership::NotAdmitted;
use crate::cluster::{Ownership, Shard};
use crate::problem::ProxyError;
use crate::route::ResourceKey;

/// The data plane's part of cluster mode, shared by every thread and both planes.
#[derive(Debug)]
pub struct ClusterPlane {
    ownership: Arc<Ownership>,
    /// The cluster secret, sent to peers and required from them.
    secret: Option<String>,
    /// This replica's name, for `Fencegate-Replica`.
    replica: HeaderValue,
    /// Peer URLs parsed once.
    peers: Mutex<HashMap<String, Arc<Upstream>>>,
    /// `[cluster.peer_tls]`: what an `https://` peer is verified against (the cluster's CA), and
    /// the certificate this replica presents to it.
    peer_tls: Option<TlsClientFiles>,
}

/// The terms a request is served under: one for almost every request (one resource, or two in
/// one shard), kept inline so that placing it allocates nothing.
pub(super) type Admissions = SmallVec<[Admission; 1]>;

/// Where a fenced request is served.
#[derive(Debug)]
pub(super) enum Placed {
    /// Here: the admissions hold this replica's terms for the request's shards.
    Here(Admissions),
    /// At the replica that owns the shard: its name and peer plane.
    Owner(String, Arc<Upstream>),
}

/// Why a request cannot be placed yet, or at all.
enum Unplaced {
    /// No live owner right now: wait for the lease loop.
    Wait(Shard),
    Refused(ProxyError),
}

impl ClusterPlane {
    pub fn new(
        ownership: Arc<Ownership>,
        secret: Option<String>,
        peer_tls: Option<TlsClientFiles>,
    ) -> Self {
        let replica = HeaderValue::from_str(ownership.replica())
            .unwrap_or_else(|_| HeaderValue::from_static("unnamed"));
        Self {
            ownership,
            secret,
            replica,
            peers: Mutex::new(HashMap::new()),
            peer_tls,
        }
    }

    pub fn replica(&self) -> &HeaderValue {
        &self.replica
    }

    pub fn secret(&self) -> Option<&str> {
        self.secret.as_deref()
    }

    /// Whether `sent` is the cluster secret (compared in constant time). Without a secret (a
    /// loopback-only peer plane) anything passes.
    pub fn authenticates(&self, sent: Option<&HeaderValue>) -> bool {
        crate::cluster::secret_matches(self.secret.as_deref(), sent.map(HeaderValue::as_bytes))
    }

    /// Where a request that changes `resources` is served, waiting up to `wait` for a shard
    /// without a live owner. `from_peer`: it came over the peer plane, so it is served here or
    /// not at all.
    pub(super) async fn place(
        &self,
        resources: &[&ResourceKey],
        from_peer: bool,
        wait: Duration,
    ) -> Result<Placed, ProxyError> {
        let give_up = Instant::now() + wait;
        loop {
            // Registered before looking, so that a change in between is not missed.
            let changed = self.ownership.changed();
            tokio::pin!(changed);
            match self.try_place(resources, from_peer) {
                Ok(placed) => return Ok(placed),
                Err(Unplaced::Refused(error)) => return Err(error),
                Err(Unplaced::Wait(shard)) => {
                    tokio::select! {
                        () = &mut changed => {}
                        // The view is refreshed each lease round; look again now and then even
                        // if nothing wakes us.
                        () = tokio::time::sleep(Duration::from_millis(100)) => {}
                        () = tokio::time::sleep_until(give_up) => {
                            return Err(ProxyError::NoOwner { shard });
                        }
                    }
                }
            }
        }
    }

    /// [`ClusterPlane::place`] when it needs no wait, as almost every request does: then the
    /// answer comes without the waiting future (and its allocation) on the hot path.
    pub(super) fn place_now(
        &self,
        resources: &[&ResourceKey],
        from_peer: bool,
    ) -> Option<Result<Placed, ProxyError>> {
        match self.try_place(resources, from_peer) {
            Ok(placed) => Some(Ok(placed)),
            Err(Unplaced::Refused(error)) => Some(Err(error)),
            Err(Unplaced::Wait(_)) => None,
        }
    }

    fn try_place(&self, resources: &[&ResourceKey], from_peer: bool) -> Result<Placed, Unplaced> {
        let map = self.ownership.map();
        if let [resource] = resources {
            // One resource, one shard: the common case, without collecting shards.
            let shard = map.shard_of(resource.as_str());
            if let Ok(admission) = self.ownership.admit(shard) {
                return Ok(Placed::Here(smallvec![admission]));
            }
        }
        let mut shards: Vec<Shard> = resources
            .iter()
            .map(|resource| map.shard_of(resource.as_str()))
            .collect();
        shards.sort_unstable();
        shards.dedup();
        let mut admissions = Admissions::with_capacity(shards.len());
        let mut missing = None;
        for &shard in &shards {
            match self.ownership.admit(shard) {
                Ok(admission) => admissions.push(admission),
                Err(why) => {
                    missing = Some((shard, why));
                    break;
                }
            }
        }
        let Some((shard, why)) = missing else {
            return Ok(Placed::Here(admissions));
        };
        drop(admissions);
        if from_peer {
            // One hop only: the replica that forwarded it will retry once told.
            return Err(Unplaced::Refused(ProxyError::NoOwner { shard }));
        }
        if why == NotAdmitted::Ending {
            return Err(Unplaced::Wait(shard));
        }
        let mut owner: Option<(String, String)> = None;
        for &shard in &shards {
            match (self.ownership.owner_elsewhere(shard), &owner) {
                (None, _) => return Err(Unplaced::Wait(shard)),
                (Some(found), Some(first)) if found.0 != first.0 => {
                    return Err(Unplaced::Refused(ProxyError::SpansReplicas {
                        shards: describe(&shards),
                    }));
                }
                (Some(found), _) => owner = Some(found),
            }
        }
        match owner {
            Some((replica, peer)) => self
                .peer(&peer)
                .map(|peer| Placed::Owner(replica, peer))
                .ok_or(Unplaced::Wait(shard)),
            None => Err(Unplaced::Wait(shard)),
        }
    }

    /// The peer plane at `url`, parsed once.
    fn peer(&self, url: &str) -> Option<Arc<Upstream>> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(peer) = peers.get(url) {
            return Some(Arc::clone(peer));
        }
        let parsed = url
            .parse::<Upstream>()
            .and_then(|peer| match &self.peer_tls {
                _ if !peer.is_https() => Ok(peer),
                Some(files) => peer.peer_with_tls_files(files.clone()),
                None => peer.peer_with_tls_files(TlsClientFiles::default()),
            });
        match parsed {
            Ok(peer) => {
                let peer = Arc::new(peer);
                peers.insert(url.to_owned(), Arc::clone(&peer));
                Some(peer)
            }
            Err(e) => {
                tracing::error!(peer = url, error = %e, "a replica advertises a peer URL that cannot be used");
                None
            }
        }
    }
}

/// Runs `work` (the upstream exchange of a request served here) unless one of the terms it was
/// admitted under ends first: then it is dropped (its upstream connection torn down, its permits
/// left in doubt) and the shard is returned, for a 503. On a single node there are no admissions
/// and `work` simply runs.
pub(super) async fn until_term_ends<T>(
    admissions: &[Admission],
    work: impl Future<Output = T>,
) -> Result<T, Shard> {
    let many = match admissions {
        [] => return Ok(work.await),
        // The common case, without the allocations of the general one.
        [one] => {
            return tokio::select! {
                biased;
                () = one.term_ended() => Err(one.shard),
                done = work => Ok(done),
            };
        }
        many => many,
    };
    let mut ended: Vec<_> = many
        .iter()
        .map(|admission| (admission.shard, Box::pin(admission.term_ended())))
        .collect();
    let any_ended = std::future::poll_fn(|cx| {
        for (shard, ended) in &mut ended {
            if ended.as_mut().poll(cx).is_ready() {
                return std::task::Poll::Ready(*shard);
            }
        }
        std::task::Poll::Pending
    });
    tokio::select! {
        // Checked first: a term that ended while the request waited in the gate sends nothing.
        biased;
        shard = any_ended => Err(shard),
        done = work => Ok(done),
    }
}

/// The client address a request over the peer plane carries (`Fencegate-Client`).
pub(super) fn peer_client(value: Option<&HeaderValue>) -> Option<SocketAddr> {
    value?.to_str().ok()?.parse().ok()
}

fn describe(shards: &[Shard]) -> String {
    shards
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::ShardMap;
    use crate::cluster::clock::BootInstant;
    use crate::cluster::ownership::{ClusterView, ReplicaInfo, ShardInfo};

    fn plane(shards: u32) -> (ClusterPlane, Arc<Ownership>) {
        let ownership = Arc::new(Ownership::new(
            "fg-1".into(),
            ShardMap::new(shards),
            Duration::from_millis(10),
        ));
        (
            ClusterPlane::new(Arc::clone(&ownership), Some("s3cret".into()), None),
            ownership,
        )
    }

    fn hold(ownership: &Ownership, shard: Shard) {
        ownership.grant(shard, 1, BootInstant::now() + Duration::from_secs(60), None);
    }

    fn view_with(owner_of_all: &str, shards: u32) -> ClusterView {
        ClusterView {
            replicas: ["fg-1", "fg-2", "fg-3"]
                .iter()
                .enumerate()
                .map(|(i, name)| ReplicaInfo {
                    replica: (*name).into(),
                    peer: format!("http://127.0.0.{}:8181", i + 1),
                    alive: true,
                    shards: 0,
                })
                .collect(),
            shards: (0..shards)
                .map(|shard| ShardInfo {
                    shard,
                    owner: Some(owner_of_all.into()),
                    epoch: 1,
                })
                .collect(),
        }
    }

    #[tokio::test]
    async fn a_held_shard_is_served_here_and_another_replicas_goes_to_it() {
        let (plane, ownership) = plane(1);
        let resource = ResourceKey::new("w");
        ownership.set_view(view_with("fg-2", 1));
        let placed = plane.place(&[&resource], false, Duration::ZERO).await;
        assert!(
            matches!(&placed, Ok(Placed::Owner(name, peer)) if name == "fg-2" && peer.to_string() == "http://127.0.0.2:8181"),
            "{placed:?}"
        );
        hold(&ownership, 0);
        let placed = plane.place(&[&resource], false, Duration::ZERO).await;
        assert!(
            matches!(&placed, Ok(Placed::Here(a)) if a.len() == 1),
            "{placed:?}"
        );
    }

    #[tokio::test]
    async fn a_request_from_a_peer_is_never_forwarded_again() {
        let (plane, ownership) = plane(1);
        ownership.set_view(view_with("fg-2", 1));
        let placed = plane
            .place(&[&ResourceKey::new("w")], true, Duration::from_secs(5))
            .await;
        assert!(
            matches!(placed, Err(ProxyError::NoOwner { shard: 0 })),
            "{placed:?}"
        );
    }

    #[tokio::test]
    async fn without_an_owner_the_request_waits_then_gets_a_503_or_its_owner() {
        let (plane, ownership) = plane(1);
        let resource = ResourceKey::new("w");
        let started = Instant::now();
        let placed = plane
            .place(&[&resource], false, Duration::from_millis(200))
            .await;
        assert!(
            matches!(placed, Err(ProxyError::NoOwner { .. })),
            "{placed:?}"
        );
        assert!(started.elapsed() >= Duration::from_millis(200));
        let waiting = tokio::spawn(async move {
            plane
                .place(&[&ResourceKey::new("w")], false, Duration::from_secs(5))
                .await
                .map(|placed| matches!(placed, Placed::Here(_)))
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        hold(&ownership, 0);
        assert!(waiting.await.unwrap().unwrap(), "served here once granted");
    }

    #[tokio::test]
    async fn a_request_over_shards_of_two_owners_is_refused() {
        let (plane, ownership) = plane(64);
        let mut view = view_with("fg-2", 64);
        view.shards[1].owner = Some("fg-3".into());
        ownership.set_view(view);
        let map = ownership.map();
        let a = (0..1000)
            .map(|i| ResourceKey::new(format!("a{i}")))
            .find(|r| map.shard_of(r.as_str()) == 0)
            .unwrap();
        let b = (0..1000)
            .map(|i| ResourceKey::new(format!("b{i}")))
            .find(|r| map.shard_of(r.as_str()) == 1)
            .unwrap();
        let placed = plane.place(&[&a, &b], false, Duration::ZERO).await;
        assert!(
            matches!(placed, Err(ProxyError::SpansReplicas { .. })),
            "{placed:?}"
        );
    }

    #[test]
    fn only_the_cluster_secret_authenticates_a_peer() {
        let (plane, _) = plane(1);
        assert!(plane.authenticates(Some(&HeaderValue::from_static("s3cret"))));
        assert!(!plane.authenticates(Some(&HeaderValue::from_static("s3creT"))));
        assert!(!plane.authenticates(Some(&HeaderValue::from_static("s3cret2"))));
        assert!(!plane.authenticates(None));
        assert_eq!(
            peer_client(Some(&HeaderValue::from_static("10.0.0.1:443"))),
            Some("10.0.0.1:443".parse().unwrap())
        );
        assert_eq!(peer_client(Some(&HeaderValue::from_static("nope"))), None);
    }
}
