//! Cluster mode against a real PostgreSQL that each test starts in a temporary directory
//! (`tests/common/postgres.rs`). Without PostgreSQL installed these tests pass after printing that
//! they were skipped; with `FENCEGATE_CLUSTER_REQUIRED` set (CI) a missing server fails them.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::postgres::Postgres;
use fencegate::audit::{Reason, Rejection};
use fencegate::cluster::clock::BootInstant;
use fencegate::cluster::{Ownership, ShardMap};
use fencegate::route::ResourceKey;
use fencegate::store::postgres::{self, Connection};
use fencegate::store::{Advance, SharedStore, StoreError, Via, WriterGuard};
use fencegate::token::FencingToken;

use common::cluster::SHARDS;

fn token(value: u64) -> FencingToken {
    FencingToken::new(value)
}

fn key(name: &str) -> ResourceKey {
    ResourceKey::new(name)
}

/// A replica's store, holding the leases of `shards` (granted in the database and in memory)
/// under epoch 1.
async fn replica(
    pg: &Postgres,
    name: &str,
    shards: &[u32],
) -> (SharedStore, WriterGuard, Arc<Ownership>) {
    replica_at(pg, &pg.url(), name, shards).await
}

/// As [`replica`], reaching the server at `url`.
async fn replica_at(
    pg: &Postgres,
    url: &str,
    name: &str,
    shards: &[u32],
) -> (SharedStore, WriterGuard, Arc<Ownership>) {
    let ownership = Arc::new(Ownership::new(
        name.into(),
        ShardMap::new(SHARDS),
        Duration::from_millis(100),
    ));
    let connection = Connection::new(url, name, Duration::from_secs(2)).unwrap();
    let (store, guard) = postgres::open(connection, ShardMap::new(SHARDS), Arc::clone(&ownership))
        .await
        .unwrap();
    for &shard in shards {
        pg.query(&format!(
            "UPDATE leases SET owner = '{name}', epoch = epoch + 1, expires_at = now() + interval '1 hour' WHERE shard = {shard}"
        ));
        let epoch: i64 = pg
            .query(&format!("SELECT epoch FROM leases WHERE shard = {shard}"))
            .trim()
            .parse()
            .unwrap();
        ownership.grant(
            shard,
            epoch,
            BootInstant::now() + Duration::from_secs(3600),
            None,
        );
    }
    (store, guard, ownership)
}

fn rejection(resource: &str) -> Rejection {
    Rejection {
        at: SystemTime::now(),
        resource: key(resource),
        reason: Reason::Stale,
        token: Some(token(1)),
        highest: Some(token(2)),
        method: "PUT".into(),
        path: format!("/{resource}"),
        client: "127.0.0.1:1".into(),
        request_id: None,
        identity: Some("spiffe://test/leader".into()),
    }
}

fn all_shards() -> Vec<u32> {
    (0..SHARDS).collect()
}

#[tokio::test]
async fn advances_are_durable_and_never_lower_and_the_history_names_the_replica() {
    let Some(pg) = Postgres::start() else { return };
    let (store, guard, _) = replica(&pg, "fg-1", &all_shards()).await;
    assert_eq!(store.load(&key("w")).await.unwrap().highest, None);
    let first = store
        .advance(&key("w"), token(5), Via::Write)
        .await
        .unwrap();
    assert!(matches!(first, Advance::Raised { from: None, .. }));
    let lower = store
        .advance(&key("w"), token(3), Via::Write)
        .await
        .unwrap();
    assert!(matches!(lower, Advance::AlreadyAt { highest, .. } if highest == token(5)));
    let big = store
        .advance(&key("big"), token(u64::MAX - 1), Via::Fence)
        .await
        .unwrap();
    assert!(matches!(big, Advance::Raised { .. }));
    let reset = store
        .reset(&key("w"), token(2), "runaway".into())
        .await
        .unwrap();
    assert_eq!(reset.from, Some(token(5)));
    store.record_rejection(rejection("w")).await.unwrap();
    guard.close(fencegate::store::LastStop::Clean).await;

    assert_eq!(
        pg.query("SELECT highest FROM resources WHERE resource = 'w'")
            .trim(),
        "2"
    );
    assert_eq!(
        pg.query("SELECT highest FROM resources WHERE resource = 'big'")
            .trim(),
        ((u64::MAX - 1) as i64).to_string(),
        "the u64 bit pattern, as in SQLite"
    );
    assert_eq!(
        pg.query(
            "SELECT via, from_token, to_token, replica FROM epochs WHERE resource = 'w' ORDER BY id"
        ),
        "write||5|fg-1\nreset|5|2|fg-1\n"
    );
    assert_eq!(
        pg.query("SELECT reason, replica FROM rejections"),
        "stale|fg-1\n"
    );
}

#[tokio::test]
async fn a_deposed_replica_can_neither_raise_nor_lower_a_token_nor_write_an_audit_row() {
    let Some(pg) = Postgres::start() else { return };
    let (store, _guard, ownership) = replica(&pg, "fg-1", &all_shards()).await;
    let resource = "wallet:1";
    store
        .advance(&key(resource), token(5), Via::Write)
        .await
        .unwrap();
    let shard = ownership.map().shard_of(resource);
    // Another replica takes the lease over; fg-1's memory still says it holds it.
    pg.query(&format!(
        "UPDATE leases SET owner = 'fg-2', epoch = epoch + 1 WHERE shard = {shard}"
    ));
    assert!(ownership.epoch_for_write(shard).is_some());
    let raise = store.advance(&key(resource), token(9), Via::Write).await;
    assert!(
        matches!(raise, Err(StoreError::NotOwner { shard: s }) if s == shard),
        "{raise:?}"
    );
    let lower = store.reset(&key(resource), token(1), "zombie".into()).await;
    assert!(
        matches!(lower, Err(StoreError::NotOwner { .. })),
        "{lower:?}"
    );
    let audit = store.record_rejection(rejection(resource)).await;
    assert!(
        matches!(audit, Err(StoreError::NotOwner { .. })),
        "{audit:?}"
    );
    let both = store
        .advance_all(vec![key(resource), key("elsewhere")], token(9), Via::Write)
        .await;
    assert!(matches!(both, Err(StoreError::NotOwner { .. })), "{both:?}");
    assert_eq!(
        pg.query(&format!(
            "SELECT highest FROM resources WHERE resource = '{resource}'"
        ))
        .trim(),
        "5"
    );
    assert_eq!(pg.query("SELECT count(*) FROM rejections").trim(), "0");
    // The writes of shards it still holds go on, in the same batch or not.
    let other = (0..100)
        .map(|i| format!("other:{i}"))
        .find(|name| ownership.map().shard_of(name) != shard)
        .unwrap();
    store
        .advance(&key(&other), token(3), Via::Write)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_shard_held_only_in_memory_writes_nothing() {
    let Some(pg) = Postgres::start() else { return };
    let (store, _guard, ownership) = replica(&pg, "fg-1", &[]).await;
    let shard = ownership.map().shard_of("w");
    let advance = store.advance(&key("w"), token(1), Via::Write).await;
    assert!(
        matches!(advance, Err(StoreError::NotOwner { .. })),
        "not held at all: {advance:?}"
    );
    // Granted in memory under an epoch the database never gave it.
    ownership.grant(
        shard,
        42,
        BootInstant::now() + Duration::from_secs(60),
        None,
    );
    let advance = store.advance(&key("w"), token(1), Via::Write).await;
    assert!(
        matches!(advance, Err(StoreError::NotOwner { .. })),
        "{advance:?}"
    );
    assert_eq!(pg.query("SELECT count(*) FROM resources").trim(), "0");
}

#[tokio::test]
async fn postgres_over_tls_is_verified_and_a_plain_or_unverified_connection_is_refused() {
    let Some(mut pg) = Postgres::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ca = common::certs::Ca::new(dir.path(), "pg-ca");
    let server = ca.server(dir.path(), "postgres");
    pg.require_tls(&server.cert, &server.key);
    let connect = |url: String| async move {
        Connection::new(&url, "fg-1", Duration::from_secs(2))
            .unwrap()
            .connect()
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    };

    let plain = connect(pg.url()).await.expect_err("plain TCP is refused");
    assert!(plain.contains("pg_hba.conf"), "{plain}");
    let unverified = connect(format!("{}?sslmode=verify-full", pg.url()))
        .await
        .expect_err("a server certificate no trusted CA signed is refused");
    assert!(unverified.contains("UnknownIssuer"), "{unverified}");

    let verified = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.url(),
        ca.pem.display()
    );
    let (store, guard, _) = replica_at(&pg, &verified, "fg-1", &all_shards()).await;
    store
        .advance(&key("w"), token(5), Via::Write)
        .await
        .unwrap();
    guard.close(fencegate::store::LastStop::Clean).await;
    let highest = tokio::task::spawn_blocking(move || {
        let reader = fencegate::store::Reader::open(std::path::Path::new(&verified)).unwrap();
        reader.resource("w").unwrap().map(|row| row.highest)
    })
    .await
    .unwrap();
    assert_eq!(highest, Some(5), "operators read over TLS too");
}

#[tokio::test]
async fn the_shard_count_is_fixed_when_the_cluster_is_created() {
    let Some(pg) = Postgres::start() else { return };
    let (_store, _guard, _) = replica(&pg, "fg-1", &[]).await;
    let ownership = Arc::new(Ownership::new(
        "fg-2".into(),
        ShardMap::new(16),
        Duration::ZERO,
    ));
    let connection = Connection::new(&pg.url(), "fg-2", Duration::from_secs(2)).unwrap();
    let refused = postgres::open(connection, ShardMap::new(16), ownership).await;
    let error = refused.expect_err("16 shards refused").to_string();
    assert!(error.contains("created with 8 shards"), "{error}");
    assert!(error.contains("shards = 8"), "{error}");
}

#[tokio::test]
async fn an_unreachable_postgres_fails_calls_at_once_and_the_store_heals_when_it_returns() {
    let Some(mut pg) = Postgres::start() else {
        return;
    };
    let (store, _guard, _) = replica(&pg, "fg-1", &all_shards()).await;
    store
        .advance(&key("w"), token(1), Via::Write)
        .await
        .unwrap();
    pg.stop_immediately();
    let started = std::time::Instant::now();
    let down = store.advance(&key("w"), token(2), Via::Write).await;
    assert!(down.is_err(), "{down:?}");
    let again = store.advance(&key("w"), token(2), Via::Write).await;
    assert!(
        matches!(again, Err(StoreError::Unavailable { .. })),
        "{again:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "failed closed, not hung"
    );
    pg.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match store.advance(&key("w"), token(2), Via::Write).await {
            Ok(advance) => {
                assert!(matches!(advance, Advance::Raised { .. }));
                break;
            }
            Err(e) => assert!(std::time::Instant::now() < deadline, "never healed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        pg.query("SELECT highest FROM resources WHERE resource = 'w'")
            .trim(),
        "2"
    );
}

use common::cluster::{Replica, put, start_replica, wait_for_owners, write_config};

/// Two replicas, fg-1 and fg-2, on a fresh PostgreSQL in front of a recording upstream, with every
/// shard owned by one of them; `None` (after saying so) without PostgreSQL.
struct TwoReplicas {
    pg: Postgres,
    upstream: common::RecordingUpstream,
    one: Replica,
    two: Replica,
    /// `/v1/cluster` once the shards settled.
    view: serde_json::Value,
    _dir: tempfile::TempDir,
}

async fn two_replicas() -> Option<TwoReplicas> {
    let pg = Postgres::start()?;
    let upstream = common::RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &pg, &upstream.url());
    let one = start_replica(&config, "fg-1").await;
    let two = start_replica(&config, "fg-2").await;
    let view = wait_for_owners(&one, &["fg-1", "fg-2"]).await;
    Some(TwoReplicas {
        pg,
        upstream,
        one,
        two,
        view,
        _dir: dir,
    })
}

#[tokio::test]
async fn any_replica_serves_any_resource_and_the_owner_answers() {
    let Some(TwoReplicas {
        pg,
        upstream,
        one,
        two,
        view,
        _dir,
    }) = two_replicas().await
    else {
        return;
    };
    assert_eq!(view["replicas"].as_array().unwrap().len(), 2, "{view}");
    let client = reqwest::Client::new();
    let mut answered_by = std::collections::BTreeSet::new();
    for id in 0..20 {
        let id = id.to_string();
        // Through either replica, in turn: each token rises, and a zombie is refused everywhere.
        for (token, replica) in [(1, &one), (2, &two), (3, &one)] {
            let response = put(&client, replica, &id, token).await;
            assert_eq!(
                response.status(),
                200,
                "wallet {id} token {token} via {}",
                replica.name
            );
            let owner = response.headers()["fencegate-replica"]
                .to_str()
                .unwrap()
                .to_owned();
            answered_by.insert(owner);
        }
        for replica in [&one, &two] {
            let zombie = put(&client, replica, &id, 2).await;
            assert_eq!(zombie.status(), 409, "wallet {id} via {}", replica.name);
            assert_eq!(zombie.headers()["fencing-token-highest"], "3");
        }
    }
    assert_eq!(
        answered_by.len(),
        2,
        "both replicas own shards: {answered_by:?}"
    );
    assert!(
        upstream.violations().is_empty(),
        "{:?}",
        upstream.violations()
    );
    assert_eq!(upstream.arrivals().len(), 60);
    assert_eq!(pg.query("SELECT count(*) FROM rejections").trim(), "40");
    assert_eq!(
        pg.query("SELECT count(DISTINCT replica) FROM rejections")
            .trim(),
        "2",
        "each zombie was audited by its resource's owner"
    );
    assert_eq!(
        pg.query("SELECT min(highest), max(highest), count(*) FROM resources")
            .trim(),
        "3|3|20"
    );
}

#[tokio::test]
async fn a_killed_replicas_shards_move_to_the_survivor_after_its_lease_and_the_grace() {
    let Some(TwoReplicas {
        pg,
        upstream,
        one,
        mut two,
        view: _,
        _dir,
    }) = two_replicas().await
    else {
        return;
    };
    let client = reqwest::Client::new();
    for id in 0..16 {
        assert_eq!(put(&client, &one, &id.to_string(), 5).await.status(), 200);
    }
    two.proxy.child.kill().unwrap();
    let killed = std::time::Instant::now();
    two.proxy.child.wait().unwrap();
    wait_for_owners(&one, &["fg-1"]).await;
    let moved = killed.elapsed();
    // Every wallet is served again, with its highest token intact.
    for id in 0..16 {
        let id = id.to_string();
        let response = put(&client, &one, &id, 6).await;
        assert_eq!(response.status(), 200, "wallet {id}");
        assert_eq!(
            put(&client, &one, &id, 5).await.status(),
            409,
            "wallet {id}"
        );
    }
    assert!(
        moved >= Duration::from_millis(900),
        "not before the lease ran out: {moved:?}"
    );
    assert!(moved < Duration::from_secs(10), "{moved:?}");
    assert_eq!(
        pg.query("SELECT count(*) > 0 FROM lease_history WHERE kind = 'takeover' AND owner = 'fg-1' AND previous = 'fg-2'").trim(),
        "t"
    );
    assert!(
        upstream.violations().is_empty(),
        "{:?}",
        upstream.violations()
    );
}

/// A replica stopped (SIGSTOP) in the middle of a request until its lease has run out sends
/// nothing more of it when it wakes, whichever of its threads the kernel runs first: the deadline
/// watcher (another thread) may not have ended the term yet, so each write checks it itself.
#[tokio::test]
async fn a_replica_woken_past_its_lease_sends_nothing_more_of_a_request() {
    use common::scripted::ScriptedUpstream;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::oneshot;

    let Some(pg) = Postgres::start() else { return };
    // The upstream never says `100 Continue`: fencegate sends the head at once and holds the body
    // for a second, in which the replica is stopped.
    let (head_tx, head_rx) = oneshot::channel::<String>();
    let (rest_tx, rest_rx) = oneshot::channel::<Vec<u8>>();
    let channels = Arc::new(Mutex::new(Some((head_tx, rest_tx))));
    let upstream = ScriptedUpstream::start(move |mut peer| {
        let channels = channels.lock().unwrap().take();
        async move {
            let Some((head_tx, rest_tx)) = channels else {
                return;
            };
            let Some(head) = peer.head().await else {
                return;
            };
            let _ = head_tx.send(head);
            let _ = rest_tx.send(peer.rest(Duration::from_secs(10)).await);
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &pg, &upstream.url());
    let replica = start_replica(&config, "fg-1").await;
    wait_for_owners(&replica, &["fg-1"]).await;

    let mut client = tokio::net::TcpStream::connect(replica.proxy.addr)
        .await
        .unwrap();
    client
        .write_all(
            b"PUT /w/1 HTTP/1.1\r\nHost: fg\r\nFencing-Token: 1\r\nContent-Length: 1\r\n\
              Expect: 100-continue\r\n\r\nx",
        )
        .await
        .unwrap();
    let head = tokio::time::timeout(Duration::from_secs(10), head_rx)
        .await
        .expect("the head reached the upstream")
        .unwrap();
    assert!(head.starts_with("PUT /w/1 "), "{head}");
    // Stopped for three leases (1 s each): the lease runs out, and the body's second of waiting
    // for `100 Continue` with it.
    let pid = replica.proxy.child.id().to_string();
    Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    Command::new("kill").args(["-CONT", &pid]).status().unwrap();

    let rest = tokio::time::timeout(Duration::from_secs(15), rest_rx)
        .await
        .expect("fencegate closed the upstream connection")
        .unwrap();
    assert!(
        rest.is_empty(),
        "the body left the replica after its lease ran out: {:?}",
        String::from_utf8_lossy(&rest)
    );
    // Read to the problem's end (an interim `100 Continue` may come first).
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = [0; 4096];
        while !String::from_utf8_lossy(&answer).contains("lease-ended") {
            match client.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(read) => answer.extend_from_slice(&chunk[..read]),
            }
        }
    })
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.contains(" 503 "), "{answer}");
    assert!(answer.contains("lease-ended"), "{answer}");
}

#[tokio::test]
async fn a_replica_that_stops_hands_its_shards_over_cleanly() {
    let Some(TwoReplicas {
        pg,
        upstream,
        one,
        mut two,
        view: _,
        _dir,
    }) = two_replicas().await
    else {
        return;
    };
    let client = reqwest::Client::new();
    for id in 0..16 {
        assert_eq!(put(&client, &two, &id.to_string(), 5).await.status(), 200);
    }
    let pid = two.proxy.child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = two.proxy.child.wait().unwrap();
    assert!(
        status.success(),
        "{status:?}: {:#?}",
        two.proxy.log.lock().unwrap()
    );
    wait_for_owners(&one, &["fg-1"]).await;
    assert_eq!(
        pg.query("SELECT count(*) FROM lease_history WHERE kind = 'takeover'")
            .trim(),
        "0",
        "every shard was released, none taken over"
    );
    assert!(
        pg.query("SELECT count(*) FROM lease_history WHERE kind = 'release' AND previous = 'fg-2'")
            .trim()
            .parse::<u32>()
            .unwrap()
            > 0
    );
    for id in 0..16 {
        assert_eq!(put(&client, &one, &id.to_string(), 6).await.status(), 200);
    }
    assert!(
        upstream.violations().is_empty(),
        "{:?}",
        upstream.violations()
    );
}

use std::process::Command;

// ---------------------------------------------------------------------------------------------
// The fault test: a seeded schedule of crashes, pauses, partitions and restarts under load
// (`tests/common/faults.rs`).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a minute of faults against real PostgreSQL; CI runs it (`cargo test --test cluster -- --ignored`)"]
async fn faults_on_a_seeded_schedule_never_break_the_ordering_guarantee() {
    use common::faults::{self, Cluster, LEASE_TTL, Rng};
    use common::tcp_fault::Mode;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let Some(mut pg) = Postgres::start() else {
        return;
    };
    let seconds: u64 = std::env::var("FENCEGATE_CLUSTER_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let seed: u64 = std::env::var("FENCEGATE_CLUSTER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_261_202);
    let upstream = common::RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::new(&pg, &upstream, dir.path(), 4).await;
    for slot in 0..3 {
        cluster.start(slot, &pg).await;
    }
    wait_for_owners(
        cluster.replicas[0].as_ref().unwrap(),
        &["fg-1", "fg-2", "fg-3"],
    )
    .await;

    let answers = Arc::new(Mutex::new(Vec::new()));
    let running = Arc::new(AtomicBool::new(true));
    let workload = faults::spawn_workload(
        Arc::clone(&cluster.addresses),
        Arc::clone(&answers),
        Arc::clone(&running),
        seed,
    );
    let mut rng = Rng::new(seed);
    let started = std::time::Instant::now();
    let end = Duration::from_secs(seconds);
    let mut log = Vec::new();
    let mut added_fourth = false;
    let mut round = 0_u64;
    while started.elapsed() + Duration::from_secs(6) < end {
        tokio::time::sleep(rng.millis(1000, 2500)).await;
        let running_slots = cluster.running();
        let slot = running_slots[rng.below(running_slots.len() as u64) as usize];
        let at = started.elapsed();
        // Every kind in turn (a cut from PostgreSQL three times a cycle: it is the fault whose
        // owner tears its requests down just before the takeover), the replica and the timing
        // drawn from the seed.
        match round % 9 {
            0 => {
                cluster.stop(slot, "-KILL");
                tokio::time::sleep(rng.millis(200, 1500)).await;
                cluster.start(slot, &pg).await;
                log.push(format!("{at:?}: kill -9 fg-{} and restart", slot + 1));
            }
            1 => {
                let pause = LEASE_TTL.mul_f64(2.0 + rng.below(100) as f64 / 100.0);
                cluster.signal(slot, "-STOP");
                tokio::time::sleep(pause).await;
                cluster.signal(slot, "-CONT");
                log.push(format!("{at:?}: SIGSTOP fg-{} for {pause:?}", slot + 1));
            }
            2 => {
                let pause = LEASE_TTL / 5;
                cluster.signal(slot, "-STOP");
                tokio::time::sleep(pause).await;
                cluster.signal(slot, "-CONT");
                log.push(format!(
                    "{at:?}: SIGSTOP fg-{} for {pause:?} (its leases survive)",
                    slot + 1
                ));
            }
            3 | 7 | 8 => {
                let mode = if rng.below(2) == 0 {
                    Mode::BlackHole
                } else {
                    Mode::Reset
                };
                cluster.set_link(slot, mode);
                tokio::time::sleep(LEASE_TTL * 2).await;
                cluster.set_link(slot, Mode::Pass);
                log.push(format!(
                    "{at:?}: fg-{} cut from PostgreSQL ({mode:?}) for {:?}",
                    slot + 1,
                    LEASE_TTL * 2
                ));
            }
            4 => {
                tokio::task::block_in_place(|| pg.restart());
                log.push(format!("{at:?}: PostgreSQL restarted (immediate shutdown)"));
            }
            5 => {
                let status = cluster.stop(slot, "-TERM");
                log.push(format!(
                    "{at:?}: SIGTERM fg-{} (exit {status:?}) and restart",
                    slot + 1
                ));
                cluster.start(slot, &pg).await;
            }
            _ if !added_fourth => {
                cluster.start(3, &pg).await;
                added_fourth = true;
                log.push(format!("{at:?}: fg-4 joined"));
            }
            _ => {
                cluster.stop(3, "-TERM");
                added_fourth = false;
                log.push(format!("{at:?}: fg-4 left (SIGTERM)"));
            }
        }
        round += 1;
    }
    tokio::time::sleep(end.saturating_sub(started.elapsed())).await;
    running.store(false, Ordering::Relaxed);
    for task in workload {
        let _ = task.await;
    }
    // Answers still on their way settle before the books are closed.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let durable: std::collections::HashMap<usize, u64> = pg
        .query("SELECT resource, highest FROM resources")
        .lines()
        .filter_map(|line| {
            let (name, highest) = line.split_once('|')?;
            Some((
                name.strip_prefix("wallet:")?.parse().ok()?,
                highest.parse().ok()?,
            ))
        })
        .collect();
    let answers = answers.lock().unwrap().clone();
    let report = faults::check(&upstream, &answers, &durable);
    let history = pg.query("SELECT kind, count(*) FROM lease_history GROUP BY kind ORDER BY kind");
    eprintln!(
        "fault test, seed {seed}, {seconds} s:\n  faults:\n    {}\n  lease history: {}\n  {report:#?}",
        log.join("\n    "),
        history.replace('\n', ", ")
    );
    assert!(
        report.violations.is_empty(),
        "{} violations: {:#?}",
        report.violations.len(),
        &report.violations[..report.violations.len().min(20)]
    );
    assert!(report.acknowledged > 1000, "the cluster served: {report:?}");
    assert!(round >= 9, "every kind of fault ran: {log:?}");
}

#[tokio::test]
async fn operators_read_the_cluster_from_any_replica_and_from_the_command_line() {
    let Some(TwoReplicas {
        pg,
        upstream: _upstream,
        one,
        two,
        view: _,
        _dir,
    }) = two_replicas().await
    else {
        return;
    };
    let client = reqwest::Client::new();
    assert_eq!(put(&client, &one, "7", 4).await.status(), 200);
    assert_eq!(put(&client, &two, "7", 3).await.status(), 409);
    // Every replica's admin plane reads the shared tables.
    for replica in [&one, &two] {
        let rejections: serde_json::Value =
            reqwest::get(format!("http://{}/v1/rejections", replica.proxy.admin))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
        assert_eq!(
            rejections["rejections"][0]["resource"], "wallet:7",
            "{rejections}"
        );
        let resource: serde_json::Value = reqwest::get(format!(
            "http://{}/v1/resources/wallet:7",
            replica.proxy.admin
        ))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
        assert_eq!(resource["highest"], 4, "{resource}");
    }
    // The command line reads a postgres:// database as it reads a file.
    let url = pg.url();
    let cli = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_fencegate"))
                .args(&args)
                .env_remove("FENCEGATE_DB")
                .output()
                .unwrap()
        })
    };
    let audit = cli(vec![
        "audit".into(),
        "--db".into(),
        url.clone(),
        "--format".into(),
        "json".into(),
    ])
    .await
    .unwrap();
    assert!(
        audit.status.success(),
        "{}",
        String::from_utf8_lossy(&audit.stderr)
    );
    let audit = String::from_utf8(audit.stdout).unwrap();
    assert!(
        audit.contains("\"wallet:7\"") && audit.contains("\"stale\""),
        "{audit}"
    );
    let epochs = cli(vec![
        "epochs".into(),
        "--db".into(),
        url.clone(),
        "--format".into(),
        "csv".into(),
    ])
    .await
    .unwrap();
    assert!(
        epochs.status.success(),
        "{}",
        String::from_utf8_lossy(&epochs.stderr)
    );
    assert!(
        String::from_utf8(epochs.stdout)
            .unwrap()
            .contains("wallet:7,4,")
    );
    let history = cli(vec!["history".into(), "--db".into(), url.clone()])
        .await
        .unwrap();
    assert!(
        history.status.success(),
        "{}",
        String::from_utf8_lossy(&history.stderr)
    );
    // A database that is not a cluster is refused with a reason.
    let other = cli(vec![
        "audit".into(),
        "--db".into(),
        format!("postgres://fencegate@{}/template1", pg.addr),
    ])
    .await
    .unwrap();
    assert_eq!(other.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&other.stderr).contains("not a fencegate cluster"),
        "{}",
        String::from_utf8_lossy(&other.stderr)
    );
    // Single-node fencegate has no cluster to show.
    let cluster = reqwest::get(format!("http://{}/v1/cluster", one.proxy.admin))
        .await
        .unwrap();
    assert_eq!(cluster.status(), 200);
}

#[tokio::test]
async fn a_fence_sent_to_any_replica_goes_through_the_owners_gate() {
    let Some(TwoReplicas {
        pg,
        upstream: _upstream,
        one,
        two,
        view: _,
        _dir,
    }) = two_replicas().await
    else {
        return;
    };
    let client = reqwest::Client::new();
    for (id, replica) in (0..8).flat_map(|id| [(id, &one), (id + 100, &two)]) {
        let fenced = client
            .post(format!(
                "http://{}/v1/resources/wallet:{id}/fence",
                replica.proxy.admin
            ))
            .json(&serde_json::json!({ "token": 9 }))
            .send()
            .await
            .unwrap();
        assert_eq!(fenced.status(), 200, "wallet:{id} via {}", replica.name);
        // The fence holds on every replica: the old leader is refused wherever it writes.
        for other in [&one, &two] {
            assert_eq!(put(&client, other, &id.to_string(), 8).await.status(), 409);
        }
        assert_eq!(
            put(&client, replica, &id.to_string(), 9).await.status(),
            200
        );
    }
    // Each fence was made by the replica that owns the resource's shard, whoever received it.
    let fences = pg.query("SELECT resource, replica FROM epochs WHERE via = 'fence'");
    let owners: std::collections::BTreeSet<&str> = fences
        .lines()
        .filter_map(|line| line.split_once('|'))
        .map(|(_, r)| r)
        .collect();
    assert_eq!(fences.lines().count(), 16, "{fences}");
    assert_eq!(owners.len(), 2, "{fences}");
    let view = common::cluster::cluster_view(&one).await;
    for line in fences.lines() {
        let (resource, replica) = line.split_once('|').unwrap();
        let shard = fencegate::cluster::ShardMap::new(SHARDS).shard_of(resource);
        assert_eq!(
            view["shards"][shard as usize]["owner"], replica,
            "{resource}"
        );
    }
}

/// With a cluster secret, the peer plane serves only replicas that send it: a client (or a zombie)
/// that reaches a replica's peer port directly can neither write through it, nor pass itself off
/// as another client, nor fence or reset a resource through the relayed admin calls.
#[tokio::test]
async fn the_peer_plane_serves_only_callers_that_send_the_cluster_secret() {
    const SECRET: &str = "a-cluster-secret";
    let Some(pg) = Postgres::start() else {
        return;
    };
    let upstream = common::RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &pg, &upstream.url());
    let one = common::cluster::start_replica_with_secret(&config, "fg-1", SECRET).await;
    let two = common::cluster::start_replica_with_secret(&config, "fg-2", SECRET).await;
    common::cluster::wait_for_owners(&one, &["fg-1", "fg-2"]).await;
    let client = reqwest::Client::new();
    // The replicas relay to each other with the secret: every write through either one lands.
    for id in 0..8 {
        for replica in [&one, &two] {
            let token = if replica.name == "fg-1" { 1 } else { 2 };
            let answer = put(&client, replica, &id.to_string(), token).await;
            assert_eq!(answer.status(), 200, "wallet {id} via {}", replica.name);
        }
    }
    let refused = |answer: reqwest::Response, what: &str| {
        let what = what.to_owned();
        async move {
            assert_eq!(answer.status(), 401, "{what}");
            let problem: serde_json::Value = answer.json().await.unwrap();
            assert_eq!(
                problem["type"], "urn:fencegate:problem:peer-unauthenticated",
                "{what}: {problem}"
            );
        }
    };
    for replica in [&one, &two] {
        let peer = format!("http://127.0.0.1:{}", replica.peer_port);
        for secret in [None, Some("a-cluster-secreT"), Some("")] {
            let what = format!("{secret:?} via {}'s peer plane", replica.name);
            let mut write = client
                .put(format!("{peer}/w/0"))
                .header("fencing-token", "3")
                .header("fencegate-client", "10.9.9.9:1")
                .body("zombie");
            let mut fence = client
                .post(format!(
                    "{peer}/.fencegate/admin/v1/resources/wallet:0/fence"
                ))
                .json(&serde_json::json!({ "token": 99 }));
            let mut reset = client.post(format!(
                "{peer}/.fencegate/admin/v1/resources/wallet:1/reset"
            ));
            if let Some(secret) = secret {
                write = write.header("fencegate-cluster-secret", secret);
                fence = fence.header("fencegate-cluster-secret", secret);
                reset = reset.header("fencegate-cluster-secret", secret);
            }
            refused(write.send().await.unwrap(), &format!("a write, {what}")).await;
            refused(fence.send().await.unwrap(), &format!("a fence, {what}")).await;
            refused(reset.send().await.unwrap(), &format!("a reset, {what}")).await;
        }
    }
    assert_eq!(
        upstream.arrivals().len(),
        16,
        "only the writes through the data planes"
    );
    assert_eq!(
        pg.query("SELECT min(highest), max(highest), count(*) FROM resources")
            .trim(),
        "2|2|8",
        "no token was raised or reset over the peer plane"
    );
}

#[tokio::test]
async fn retention_prunes_the_shared_audit_log_in_batches() {
    let Some(pg) = Postgres::start() else { return };
    let (store, _guard, _) = replica(&pg, "fg-1", &all_shards()).await;
    for _ in 0..5 {
        store.record_rejection(rejection("w")).await.unwrap();
    }
    let url = pg.url();
    let plan = tokio::task::spawn_blocking(move || {
        let reader = fencegate::store::Reader::open(std::path::Path::new(&url)).unwrap();
        reader.prune_plan(fencegate::store::Retention {
            max_age: Duration::from_secs(86_400),
            max_rows: 2,
        })
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        store.prune(plan.clone(), 2).await.unwrap(),
        2,
        "a batch at most"
    );
    assert_eq!(store.prune(plan, 2).await.unwrap(), 1);
    assert_eq!(pg.query("SELECT count(*) FROM rejections").trim(), "2");
}

/// Raw HTTP/1.1 `PUT /w/{id}` with `token`, closing the connection after the answer.
fn raw_put(id: &str, token: u64) -> String {
    format!(
        "PUT /w/{id} HTTP/1.1\r\nHost: localhost\r\nFencing-Token: {token}\r\n\
         Content-Length: 1\r\nConnection: close\r\n\r\nx"
    )
}

#[tokio::test]
async fn replicas_speak_tls_to_each_other_and_carry_the_client_identity_to_the_owner() {
    use common::certs::{Ca, tls_exchange, tls_get};
    let Some(pg) = Postgres::start() else {
        return;
    };
    let upstream = common::RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "cluster-ca");
    let server = ca.server(dir.path(), "fencegate");
    let leader = ca.client(dir.path(), "leader");
    let intruder = ca.client(dir.path(), "intruder");
    let files = |server: &common::certs::Issued| {
        format!(
            "cert = {:?}\nkey = {:?}\nclient_ca = {:?}\n",
            server.cert, server.key, ca.pem
        )
    };
    let config = dir.path().join("cluster.toml");
    std::fs::write(
        &config,
        format!(
            "database = \"{}\"\nin_doubt_grace = \"300ms\"\nupstream_timeout = \"5s\"\n\
             [tls]\n{data}\
             [cluster]\nshards = {SHARDS}\nlease_ttl = \"1s\"\n\
             [cluster.peer_tls]\n{peer}\
             [[routes]]\npath = \"/w/{{id}}\"\nupstream = \"{}\"\nresource = \"wallet:{{id}}\"\n\
             allow = [\"CN=leader\"]\n",
            pg.url(),
            upstream.url(),
            data = files(&server),
            peer = files(&server),
        ),
    )
    .unwrap();
    let one = start_replica(&config, "fg-1").await;
    let two = start_replica(&config, "fg-2").await;
    let view = wait_for_owners(&one, &["fg-1", "fg-2"]).await;
    assert!(
        view["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["peer"].as_str().unwrap().starts_with("https://")),
        "{view}"
    );

    let send = |replica: &Replica, client, request: String| {
        let (addr, ca) = (replica.proxy.addr, ca.pem.clone());
        async move {
            tls_exchange(addr, &ca, Some(client), &[b"http/1.1"], &request)
                .await
                .map(|seen| seen.answer)
                .unwrap_or_default()
        }
    };
    let mut answered_by = std::collections::BTreeSet::new();
    for id in 0..16 {
        let id = id.to_string();
        for (token, replica) in [(1, &one), (2, &two)] {
            let stored = send(replica, &leader, raw_put(&id, token)).await;
            assert!(
                stored.starts_with("HTTP/1.1 200"),
                "wallet {id} via {}: {stored}",
                replica.name
            );
            let owner = stored
                .lines()
                .find_map(|line| line.strip_prefix("fencegate-replica: "))
                .unwrap()
                .to_owned();
            answered_by.insert(owner);
            // The intruder is refused by the owner, which knows who it is, whichever replica
            // it reached.
            let refused = send(replica, &intruder, raw_put(&id, 9)).await;
            assert!(
                refused.starts_with("HTTP/1.1 403"),
                "wallet {id} via {}: {refused}",
                replica.name
            );
        }
    }
    assert_eq!(
        answered_by.len(),
        2,
        "requests crossed the peer plane: {answered_by:?}"
    );
    assert_eq!(upstream.arrivals().len(), 32);
    assert_eq!(
        pg.query(
            "SELECT count(*), count(DISTINCT replica) FROM rejections \
             WHERE reason = 'forbidden' AND identity = 'CN=intruder'"
        )
        .trim(),
        "32|2",
        "every refusal audited by the resource's owner with the intruder's identity"
    );

    // The peer plane speaks only TLS, and only to a certificate of the cluster's CA.
    let peer = std::net::SocketAddr::from(([127, 0, 0, 1], one.peer_port));
    let plain = reqwest::Client::new()
        .put(format!("http://{peer}/w/1"))
        .header("Fencing-Token", "99")
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(
        plain.is_err(),
        "plain HTTP answered on the peer plane: {plain:?}"
    );
    let anonymous = tls_get(peer, &ca.pem, None, &[], "/w/1").await;
    assert!(
        anonymous.is_err() || anonymous.as_ref().is_ok_and(|s| s.answer.is_empty()),
        "the peer plane served a client without a certificate"
    );

    // An admin fence sent to either replica reaches the owner over the TLS peer plane.
    let client = reqwest::Client::new();
    for replica in [&one, &two] {
        for id in 100..104 {
            let fenced = client
                .post(format!(
                    "http://{}/v1/resources/wallet:{id}/fence",
                    replica.proxy.admin
                ))
                .json(&serde_json::json!({ "token": 5 }))
                .send()
                .await
                .unwrap();
            assert_eq!(fenced.status(), 200, "wallet:{id} via {}", replica.name);
        }
    }
    assert_eq!(
        pg.query("SELECT count(DISTINCT replica) FROM epochs WHERE via = 'fence'")
            .trim(),
        "2"
    );
}
