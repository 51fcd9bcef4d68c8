//! Faults, with the real binary: `kill -9` mid-storm again and again, a stalled or killed
//! upstream, a database that cannot be written, and databases that must stop start-up.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::RecordingUpstream;
use common::binary::{
    Proxy, put, serve_command, start, start_binary, start_binary_with, write_config,
};

/// What the clients of one crash round were told.
#[derive(Default)]
struct Told {
    /// Per resource, the highest token answered 200.
    acknowledged: HashMap<usize, u64>,
    /// How many writes were answered 200.
    writes: usize,
    /// The request ids of every 409.
    conflicts: Vec<String>,
}

/// A fenced PUT with a request id: the status, if there was an answer.
async fn put_with_id(
    client: &reqwest::Client,
    addr: SocketAddr,
    resource: usize,
    token: u64,
    id: &str,
) -> Option<u16> {
    client
        .put(format!("http://{addr}/crash/{resource}"))
        .header("fencing-token", token.to_string())
        .header("x-request-id", id)
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// For every resource, a leader advancing its token on each write and a zombie writing token 0,
/// until the server stops answering.
fn storm(
    addr: SocketAddr,
    round: u64,
    resources: usize,
    told: Arc<Mutex<Told>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for resource in 0..resources {
        let (leader, leader_told) = (client.clone(), Arc::clone(&told));
        tasks.push(tokio::spawn(async move {
            for step in 1.. {
                let token = round * 1_000_000 + step;
                match put_with_id(
                    &leader,
                    addr,
                    resource,
                    token,
                    &format!("lead-{round}-{resource}-{step}"),
                )
                .await
                {
                    Some(200) => {
                        let mut told = leader_told.lock().unwrap();
                        told.acknowledged.insert(resource, token);
                        told.writes += 1;
                    }
                    Some(_) => {}
                    None => return,
                }
            }
        }));
        let (zombie, zombie_told) = (client.clone(), Arc::clone(&told));
        tasks.push(tokio::spawn(async move {
            for step in 1.. {
                let id = format!("zombie-{round}-{resource}-{step}");
                match put_with_id(&zombie, addr, resource, 0, &id).await {
                    Some(409) => zombie_told.lock().unwrap().conflicts.push(id),
                    Some(_) => {}
                    None => return,
                }
            }
        }));
    }
    tasks
}

fn durable_highest(db: &Path) -> HashMap<String, u64> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut statement = conn
        .prepare("SELECT resource, highest FROM resources")
        .unwrap();
    statement
        .query_map([], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)? as u64))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn audited_request_ids(db: &Path) -> HashSet<String> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut statement = conn
        .prepare("SELECT request_id FROM rejections WHERE request_id IS NOT NULL")
        .unwrap();
    statement
        .query_map([], |row| row.get::<_, String>(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn kill(proxy: &mut Proxy, signal: &str) {
    let pid = proxy.child.id().to_string();
    assert!(
        Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap()
            .success()
    );
}

/// `FENCEGATE_CRASH_ROUNDS` (default 20) rounds of: start, storm, `kill -9` at a random moment,
/// then check the database the dead process left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_never_loses_an_acknowledged_token_or_an_audit_row() {
    let rounds: u64 = std::env::var("FENCEGATE_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20);
    let seed = std::env::var("FENCEGATE_PROPERTY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("kill -9 rounds: {rounds}, seed {seed} (rerun with FENCEGATE_PROPERTY_SEED={seed})");
    let mut random = fastrand::Rng::with_seed(seed);
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fencegate.db");
    const RESOURCES: usize = 4;
    let (mut acknowledged_total, mut conflicts_total) = (0, 0);
    for round in 1..=rounds {
        // Each restart follows a kill, so new tokens wait out the grace first: keep it short.
        let mut proxy = start_binary_with(&upstream.url(), &db, "in_doubt_grace = \"100ms\"").await;
        let told = Arc::new(Mutex::new(Told::default()));
        let tasks = storm(proxy.addr, round, RESOURCES, Arc::clone(&told));
        tokio::time::sleep(Duration::from_millis(random.u64(20..300))).await;
        kill(&mut proxy, "-KILL");
        proxy.child.wait().unwrap();
        for task in tasks {
            task.await.unwrap();
        }

        let told = told.lock().unwrap();
        let highest = durable_highest(&db);
        let forwarded = upstream.arrivals();
        for resource in 0..RESOURCES {
            let path = format!("/crash/{resource}");
            let durable = highest
                .get(&format!("crash:{resource}"))
                .copied()
                .unwrap_or(0);
            if let Some(&acked) = told.acknowledged.get(&resource) {
                assert!(
                    durable >= acked,
                    "round {round}: {path} acknowledged {acked}, durable {durable}"
                );
            }
            let sent = forwarded
                .iter()
                .filter(|a| a.target == path)
                .filter_map(|a| a.token)
                .max()
                .unwrap_or(0);
            assert!(
                durable >= sent,
                "round {round}: {path} forwarded {sent}, durable {durable}"
            );
        }
        let audited = audited_request_ids(&db);
        for id in &told.conflicts {
            assert!(
                audited.contains(id),
                "round {round}: 409 {id} has no audit row"
            );
        }
        acknowledged_total += told.writes;
        conflicts_total += told.conflicts.len();
    }
    assert!(
        upstream.violations().is_empty(),
        "{:?}",
        upstream.violations()
    );
    assert!(
        acknowledged_total > 0 && conflicts_total > 0,
        "the storms got going"
    );
    println!("checked {acknowledged_total} acknowledged writes and {conflicts_total} audited 409s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_new_tokens_wait_out_the_in_doubt_grace_and_after_sigterm_they_do_not() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fencegate.db");
    let grace = Duration::from_millis(1500);
    let settings = "in_doubt_grace = \"1500ms\"";
    let client = reqwest::Client::new();
    let mut proxy = start_binary_with(&upstream.url(), &db, settings).await;
    assert_eq!(put(&client, proxy.addr, 0, 1).await, Some((200, 1)));

    // Killed: what it forwarded last may still be applied upstream, so the next server holds
    // new tokens back for the grace (counted from its start, a little before it is ready).
    kill(&mut proxy, "-KILL");
    proxy.child.wait().unwrap();
    let mut proxy = start_binary_with(&upstream.url(), &db, settings).await;
    let started = Instant::now();
    assert_eq!(put(&client, proxy.addr, 0, 2).await, Some((200, 2)));
    let waited = started.elapsed();
    assert!(
        waited >= grace / 2,
        "after kill -9 the next token waited only {waited:?}"
    );

    // Stopped cleanly with nothing in flight: the next server has nothing to wait for.
    kill(&mut proxy, "-TERM");
    assert!(proxy.child.wait().unwrap().success());
    let mut proxy = start_binary_with(&upstream.url(), &db, settings).await;
    let started = Instant::now();
    assert_eq!(put(&client, proxy.addr, 0, 3).await, Some((200, 3)));
    let waited = started.elapsed();
    assert!(
        waited < grace / 2,
        "after SIGTERM the next token waited {waited:?}"
    );
    kill(&mut proxy, "-TERM");
    proxy.child.wait().unwrap();
    assert!(
        upstream.violations().is_empty(),
        "{:?}",
        upstream.violations()
    );
}

/// A SIGTERM that finds a request still waiting on its upstream after `shutdown_grace` is not a
/// clean stop: the upstream may yet apply that request, so the next server holds the resource's
/// next token back for `in_doubt_grace`, exactly as after `kill -9`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_with_a_request_stuck_upstream_past_shutdown_grace_is_not_a_clean_stop() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fencegate.db");
    let grace = Duration::from_millis(1500);
    let settings =
        "in_doubt_grace = \"1500ms\"\nshutdown_grace = \"200ms\"\nupstream_timeout = \"30s\"";
    let client = reqwest::Client::new();
    let mut proxy = start_binary_with(&upstream.url(), &db, settings).await;
    assert_eq!(put(&client, proxy.addr, 0, 1).await, Some((200, 1)));
    // Token 2 reaches the upstream, which takes ten seconds to answer.
    let stuck = {
        let client = client.clone();
        let url = format!("http://{}/crash/0", proxy.addr);
        tokio::spawn(async move {
            client
                .put(url)
                .header("fencing-token", "2")
                .header(common::DELAY_HEADER, "10000")
                .send()
                .await
        })
    };
    let arrived = Instant::now();
    while upstream.arrivals().len() < 2 {
        assert!(
            arrived.elapsed() < Duration::from_secs(5),
            "token 2 never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    kill(&mut proxy, "-TERM");
    let status = tokio::task::spawn_blocking(move || proxy.child.wait().unwrap())
        .await
        .unwrap();
    assert!(
        status.success(),
        "a stop past its grace still exits 0: {status:?}"
    );
    let _ = stuck.await;

    let mut proxy = start_binary_with(&upstream.url(), &db, settings).await;
    let started = Instant::now();
    assert_eq!(put(&client, proxy.addr, 0, 3).await, Some((200, 3)));
    let waited = started.elapsed();
    assert!(
        waited >= grace / 2,
        "a stop with a request in doubt was recorded as clean: token 3 waited only {waited:?}"
    );
    kill(&mut proxy, "-TERM");
    proxy.child.wait().unwrap();
}

/// Storage behind an "upstream" process that a test can stop or kill (a second fencegate), behind
/// the fencegate under test, configured with `front_settings`. Returns storage, the scratch
/// directory, the upstream process and the front one.
async fn chain(front_settings: &str) -> (RecordingUpstream, tempfile::TempDir, Proxy, Proxy) {
    let storage = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let upstream = start_binary(&storage.url(), &dir.path().join("upstream.db")).await;
    let front = start_binary_with(
        &format!("http://{}", upstream.addr),
        &dir.path().join("front.db"),
        front_settings,
    )
    .await;
    (storage, dir, upstream, front)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upstream_is_a_504_in_bounded_time_and_no_lower_token_follows() {
    let (storage, _dir, mut stalled, front) =
        chain("upstream_timeout = \"500ms\"\nin_doubt_grace = \"300ms\"").await;
    let client = reqwest::Client::new();
    assert_eq!(put(&client, front.addr, 1, 1).await, Some((200, 1)));

    kill(&mut stalled, "-STOP");
    let started = Instant::now();
    let (status, _) = put(&client, front.addr, 1, 2).await.unwrap();
    assert_eq!(status, 504);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        put(&client, front.addr, 1, 1).await,
        Some((409, 2)),
        "the old leader stays fenced"
    );

    kill(&mut stalled, "-CONT");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(put(&client, front.addr, 1, 3).await, Some((200, 3)));
    assert_eq!(put(&client, front.addr, 1, 2).await, Some((409, 3)));
    let tokens: Vec<u64> = storage.arrivals().iter().filter_map(|a| a.token).collect();
    assert!(
        tokens.windows(2).all(|w| w[0] <= w[1]),
        "storage saw {tokens:?}"
    );
    assert!(
        storage.violations().is_empty(),
        "{:?}",
        storage.violations()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_killed_mid_request_is_a_502_and_no_lower_token_follows() {
    let (storage, _dir, mut upstream, front) = chain("upstream_timeout = \"10s\"").await;
    let client = reqwest::Client::new();
    let url = format!("http://{}/crash/1", front.addr);
    let in_flight = tokio::spawn(
        client
            .put(&url)
            .header("fencing-token", "5")
            .header(common::DELAY_HEADER, "3000")
            .send(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    kill(&mut upstream, "-KILL");
    let killed = Instant::now();
    let answer = in_flight.await.unwrap().unwrap();
    assert_eq!(answer.status(), 502);
    assert!(
        killed.elapsed() < Duration::from_secs(2),
        "{:?}",
        killed.elapsed()
    );
    for lower in [0, 4] {
        assert_eq!(put(&client, front.addr, 1, lower).await, Some((409, 5)));
    }
    assert!(storage.arrivals().iter().all(|a| a.token == Some(5)));
}

/// Starts the binary with SIGXFSZ ignored, so that a file-size limit makes writes fail with EFBIG
/// (as on a full disk) instead of killing the process.
async fn start_with_file_size_limit_possible(upstream: &str, db: &Path) -> Proxy {
    let serve = serve_command(&write_config(upstream, db, ""), db);
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg("trap '' XFSZ; exec \"$0\" \"$@\"")
        .arg(serve.get_program())
        .args(serve.get_args());
    start(command).await
}

fn limit_file_size(proxy: &Proxy, limit: &str) {
    let status = Command::new("prlimit")
        .args([
            "--pid",
            &proxy.child.id().to_string(),
            &format!("--fsize={limit}:"),
        ])
        .status()
        .expect("prlimit (util-linux) is installed");
    assert!(status.success());
}

/// From outside, a database that cannot be written looks like this: a new epoch and an
/// unauditable rejection fail closed with 503 problem+json, while the current leader (no disk on
/// its path) and reads go on. `/crash/1` is at token 7. Returns how many requests the upstream
/// had received by then.
async fn assert_fails_closed(
    client: &reqwest::Client,
    addr: SocketAddr,
    upstream: &RecordingUpstream,
) -> usize {
    let advance = client
        .put(format!("http://{addr}/crash/2"))
        .header("fencing-token", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(advance.status(), 503);
    assert_eq!(
        advance.headers()["content-type"],
        "application/problem+json"
    );
    let zombie = put(client, addr, 1, 3).await.unwrap();
    assert_eq!(
        zombie.0, 503,
        "a rejection that cannot be audited is not a 409"
    );
    assert_eq!(
        put(client, addr, 1, 7).await,
        Some((200, 7)),
        "the current leader needs no disk"
    );
    let read = client
        .get(format!("http://{addr}/crash/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200, "reads keep working");
    upstream.arrivals().len()
}

/// Once the fault is fixed, service resumes by itself, and nothing refused had been forwarded.
async fn assert_recovers(
    client: &reqwest::Client,
    addr: SocketAddr,
    upstream: &RecordingUpstream,
    forwarded_before: usize,
) {
    assert_eq!(
        put(client, addr, 2, 1).await,
        Some((200, 1)),
        "service resumes"
    );
    assert_eq!(put(client, addr, 1, 3).await, Some((409, 7)));
    assert!(
        upstream.arrivals()[..forwarded_before]
            .iter()
            .all(|a| a.target != "/crash/2")
    );
}

/// Running as root, a read-only file would still be written; a file-size limit makes every write
/// fail as a full disk does, for this process only, and needs no privileges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_cannot_be_written_fails_closed_with_503_and_recovers() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fencegate.db");
    let proxy = start_with_file_size_limit_possible(&upstream.url(), &db).await;
    let client = reqwest::Client::new();
    assert_eq!(put(&client, proxy.addr, 1, 7).await, Some((200, 7)));

    let wal_size = std::fs::metadata(db.with_extension("db-wal"))
        .unwrap()
        .len();
    limit_file_size(&proxy, &wal_size.to_string());
    let forwarded_before = assert_fails_closed(&client, proxy.addr, &upstream).await;

    limit_file_size(&proxy, "unlimited");
    assert_recovers(&client, proxy.addr, &upstream, forwarded_before).await;
    drop(proxy);
    assert_eq!(durable_highest(&db)["crash:2"], 1);
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` if this process may not mount (not root, no user namespace).
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        mounted.then_some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Writes zeros to `path` until the filesystem is full.
fn fill(path: &Path) {
    use std::io::Write;
    let mut filler = std::fs::File::create(path).unwrap();
    let block = vec![0u8; 64 * 1024];
    while filler
        .write_all(&block)
        .and_then(|()| filler.sync_data())
        .is_ok()
    {}
}

/// The same with a real full filesystem: the database on a 4 MiB tmpfs that another file fills.
/// Mounting needs root (as in CI); elsewhere the test says so and stops, unless
/// `FENCEGATE_MOUNT_REQUIRED` is set, in which case it fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_filesystem_fails_closed_with_503_and_recovers_once_space_is_freed() {
    let Some(tmpfs) = Tmpfs::mount("4m") else {
        assert!(
            std::env::var_os("FENCEGATE_MOUNT_REQUIRED").is_none(),
            "cannot mount a tmpfs, and FENCEGATE_MOUNT_REQUIRED is set"
        );
        eprintln!(
            "SKIPPED: cannot mount a tmpfs here (needs root); the file-size-limit test covers the same path"
        );
        return;
    };
    let upstream = RecordingUpstream::start().await;
    let db = tmpfs.path().join("fencegate.db");
    let proxy = start_binary(&upstream.url(), &db).await;
    let client = reqwest::Client::new();
    assert_eq!(put(&client, proxy.addr, 1, 7).await, Some((200, 7)));

    let filler = tmpfs.path().join("filler");
    fill(&filler);
    let forwarded_before = assert_fails_closed(&client, proxy.addr, &upstream).await;

    std::fs::remove_file(&filler).unwrap();
    assert_recovers(&client, proxy.addr, &upstream, forwarded_before).await;
    drop(proxy);
    assert_eq!(durable_highest(&db)["crash:2"], 1);
}

fn serve_and_wait(db: &Path, dir: &Path) -> std::process::Output {
    let config = write_config("http://127.0.0.1:1", &dir.join("settings.db"), "");
    serve_command(&config, db).output().unwrap()
}

#[test]
fn a_corrupt_database_stops_start_up_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fencegate.db");
    std::fs::write(
        &db,
        b"this is not an SQLite database, whatever its name says".repeat(100),
    )
    .unwrap();
    let output = serve_and_wait(&db, dir.path());
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("is not a database"), "{stderr}");
}

#[test]
fn a_database_another_process_keeps_locked_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fencegate.db");
    let holder = rusqlite::Connection::open(&db).unwrap();
    holder.pragma_update(None, "journal_mode", "WAL").unwrap();
    holder
        .execute_batch("CREATE TABLE held (x); BEGIN IMMEDIATE; INSERT INTO held VALUES (1);")
        .unwrap();
    let output = serve_and_wait(&db, dir.path());
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("is locked for writing by another process"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_database_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fencegate.db");
    let _first = start_binary("http://127.0.0.1:1", &db).await;
    let output = serve_and_wait(&db, dir.path());
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("is in use by another `fencegate serve`"),
        "{stderr}"
    );
}
