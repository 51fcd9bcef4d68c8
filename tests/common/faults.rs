//! The cluster fault test's parts (`tests/cluster.rs`): a cluster whose replicas each reach
//! PostgreSQL through a fault proxy, a seeded workload of leaders, same-token writers and zombies,
//! and the checker that reads the recording upstream's log.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::RecordingUpstream;
use super::cluster::{Replica, free_port, start_replica_with, write_config_with};
use super::postgres::Postgres;
use super::tcp_fault::{Mode, TcpFault};

pub const LEASE_TTL: Duration = Duration::from_millis(1500);
pub const IN_DOUBT_GRACE: Duration = Duration::from_millis(500);
const RESOURCES: usize = 100;

/// xorshift64*: a fixed, seedable sequence, so a failing schedule can be replayed.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from))
    }
}

/// One answer a client got.
#[derive(Debug, Clone)]
pub struct Answer {
    pub resource: usize,
    pub token: u64,
    /// `None`: no answer (timeout, connection error).
    pub status: Option<u16>,
    pub answered: Instant,
}

/// The cluster under test: replicas by slot, each behind its own fault proxy to PostgreSQL.
pub struct Cluster {
    pub config: std::path::PathBuf,
    pub faults: Vec<TcpFault>,
    pub replicas: Vec<Option<Replica>>,
    pub peer_ports: Vec<u16>,
    /// What clients pick from.
    pub addresses: Arc<RwLock<Vec<Option<SocketAddr>>>>,
}

impl Cluster {
    pub async fn new(
        pg: &Postgres,
        upstream: &RecordingUpstream,
        dir: &std::path::Path,
        slots: usize,
    ) -> Cluster {
        let ttl = format!("{}ms", LEASE_TTL.as_millis());
        let grace = format!("{}ms", IN_DOUBT_GRACE.as_millis());
        let config = write_config_with(dir, pg, &upstream.url(), &ttl, &grace);
        let mut faults = Vec::new();
        for _ in 0..slots {
            faults.push(TcpFault::start(pg.addr).await);
        }
        Cluster {
            config,
            faults,
            replicas: (0..slots).map(|_| None).collect(),
            peer_ports: (0..slots).map(|_| free_port()).collect(),
            addresses: Arc::new(RwLock::new(vec![None; slots])),
        }
    }

    pub fn name(slot: usize) -> String {
        format!("fg-{}", slot + 1)
    }

    pub async fn start(&mut self, slot: usize, pg: &Postgres) {
        let url = pg.url_via(self.faults[slot].addr);
        let replica = start_replica_with(
            &self.config,
            &Self::name(slot),
            self.peer_ports[slot],
            Some(&url),
        )
        .await;
        self.addresses.write().unwrap()[slot] = Some(replica.proxy.addr);
        self.replicas[slot] = Some(replica);
    }

    fn pid(&self, slot: usize) -> Option<String> {
        self.replicas[slot]
            .as_ref()
            .map(|r| r.proxy.child.id().to_string())
    }

    pub fn signal(&self, slot: usize, signal: &str) {
        if let Some(pid) = self.pid(slot) {
            std::process::Command::new("kill")
                .args([signal, &pid])
                .status()
                .unwrap();
        }
    }

    /// Takes the replica out of the clients' list and kills it (`-KILL`) or stops it
    /// (`-TERM`, waiting for the clean exit).
    pub fn stop(&mut self, slot: usize, signal: &str) -> Option<std::process::ExitStatus> {
        self.addresses.write().unwrap()[slot] = None;
        let mut replica = self.replicas[slot].take()?;
        std::process::Command::new("kill")
            .args([signal, &replica.proxy.child.id().to_string()])
            .status()
            .unwrap();
        replica.proxy.child.wait().ok()
    }

    pub fn running(&self) -> Vec<usize> {
        (0..self.replicas.len())
            .filter(|s| self.replicas[*s].is_some())
            .collect()
    }

    pub fn set_link(&self, slot: usize, mode: Mode) {
        self.faults[slot].set(mode);
    }
}

/// The workload: per resource a leader whose generation rises every few hundred
/// milliseconds, two writers sending its current token, and a zombie resending older ones,
/// each request to a random replica.
pub fn spawn_workload(
    addresses: Arc<RwLock<Vec<Option<SocketAddr>>>>,
    answers: Arc<Mutex<Vec<Answer>>>,
    running: Arc<AtomicBool>,
    seed: u64,
) -> Vec<tokio::task::JoinHandle<()>> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for resource in 0..RESOURCES {
        let generation = Arc::new(std::sync::atomic::AtomicU64::new(1));
        // The leader: raises the generation.
        {
            let (generation, running) = (Arc::clone(&generation), Arc::clone(&running));
            let mut rng = Rng::new(seed ^ (resource as u64 * 7919));
            tasks.push(tokio::spawn(async move {
                while running.load(Ordering::Relaxed) {
                    // Some generations are short, some outlast an outage: a request of an old
                    // generation still in flight when its owner's lease runs out is what the
                    // next owner has to wait for.
                    tokio::time::sleep(rng.millis(200, 3000)).await;
                    generation.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for writer in 0..3_u64 {
            let zombie = writer == 2;
            let (generation, running) = (Arc::clone(&generation), Arc::clone(&running));
            let (addresses, answers, client) =
                (Arc::clone(&addresses), Arc::clone(&answers), client.clone());
            let mut rng = Rng::new(seed ^ (resource as u64 * 104_729 + writer + 1));
            tasks.push(tokio::spawn(async move {
                while running.load(Ordering::Relaxed) {
                    tokio::time::sleep(rng.millis(60, 200)).await;
                    let current = generation.load(Ordering::Relaxed);
                    let token = if zombie {
                        current.saturating_sub(1 + rng.below(3)).max(1)
                    } else {
                        current
                    };
                    let targets: Vec<SocketAddr> = addresses
                        .read()
                        .unwrap()
                        .iter()
                        .flatten()
                        .copied()
                        .collect();
                    if targets.is_empty() {
                        continue;
                    }
                    let target = targets[rng.below(targets.len() as u64) as usize];
                    let sent = client
                        .put(format!("http://{target}/w/{resource}"))
                        .header("fencing-token", token.to_string())
                        // Mostly quick, one in five slow: a slow request is what a
                        // takeover must wait out.
                        .header(
                            super::DELAY_HEADER,
                            if rng.below(5) == 0 {
                                300 + rng.below(600)
                            } else {
                                rng.below(20)
                            }
                            .to_string(),
                        )
                        .body("x")
                        .send()
                        .await;
                    let status = sent.ok().map(|r| r.status().as_u16());
                    answers.lock().unwrap().push(Answer {
                        resource,
                        token,
                        status,
                        answered: Instant::now(),
                    });
                }
            }));
        }
    }
    tasks
}

/// What the checker found, and the counts for the note.
#[derive(Debug, Default)]
pub struct Report {
    pub arrivals: usize,
    pub acknowledged: usize,
    pub refused_stale: usize,
    pub unavailable: usize,
    pub unanswered: usize,
    pub other: BTreeMap<u16, usize>,
    pub torn_down: usize,
    pub violations: Vec<String>,
}

/// The checker, at the upstream, per resource:
/// 1. tokens received never decrease;
/// 2. when token t arrives, every lower-token request was answered, or torn down at least
///    `in_doubt_grace` earlier (less a small allowance for the teardown to reach the upstream);
/// 3. nothing arrives below a token already acknowledged to a client;
/// 4. PostgreSQL's highest is at least every acknowledged token.
pub fn check(
    upstream: &RecordingUpstream,
    answers: &[Answer],
    durable: &HashMap<usize, u64>,
) -> Report {
    let mut report = Report::default();
    let arrivals = upstream.arrivals();
    report.arrivals = arrivals.len();
    report.torn_down = arrivals.iter().filter(|a| a.torn_down.is_some()).count();
    let teardown_allowance = Duration::from_millis(50);
    let mut by_resource: BTreeMap<String, Vec<&super::Arrival>> = BTreeMap::new();
    for arrival in &arrivals {
        by_resource
            .entry(arrival.target.clone())
            .or_default()
            .push(arrival);
    }
    for (target, list) in &by_resource {
        let mut highest_seen = 0;
        for (i, arrival) in list.iter().enumerate() {
            let token = arrival.token.unwrap_or(0);
            if token < highest_seen {
                report.violations.push(format!(
                    "{target}: token {token} arrived after token {highest_seen}"
                ));
            }
            highest_seen = highest_seen.max(token);
            for earlier in &list[..i] {
                if earlier.token.unwrap_or(0) >= token {
                    continue;
                }
                let settled = earlier.answered.is_some_and(|at| at <= arrival.arrived)
                    || earlier.torn_down.is_some_and(|at| {
                        at + IN_DOUBT_GRACE.saturating_sub(teardown_allowance) <= arrival.arrived
                    });
                if !settled {
                    report.violations.push(format!(
                        "{target}: token {token} arrived while token {} (arrived {:?} before) was unanswered and not torn down {:?} earlier",
                        earlier.token.unwrap_or(0),
                        arrival.arrived - earlier.arrived,
                        IN_DOUBT_GRACE
                    ));
                }
            }
        }
    }
    let mut acked: HashMap<usize, Vec<(u64, Instant)>> = HashMap::new();
    for answer in answers {
        match answer.status {
            Some(200) => {
                report.acknowledged += 1;
                acked
                    .entry(answer.resource)
                    .or_default()
                    .push((answer.token, answer.answered));
            }
            Some(409) => report.refused_stale += 1,
            Some(503) => report.unavailable += 1,
            Some(status) => *report.other.entry(status).or_default() += 1,
            None => report.unanswered += 1,
        }
    }
    for (resource, acks) in &acked {
        let target = format!("/w/{resource}");
        let list = by_resource
            .get(&target)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for (token, at) in acks {
            if let Some(late) = list
                .iter()
                .find(|a| a.arrived > *at && a.token.unwrap_or(0) < *token)
            {
                report.violations.push(format!(
                    "{target}: token {} arrived after token {token} had been acknowledged",
                    late.token.unwrap_or(0)
                ));
            }
        }
        let max_acked = acks.iter().map(|(t, _)| *t).max().unwrap_or(0);
        let stored = durable.get(resource).copied().unwrap_or(0);
        if stored < max_acked {
            report.violations.push(format!(
                "{target}: PostgreSQL's highest is {stored}, below the acknowledged token {max_acked}"
            ));
        }
    }
    report
}
