//! The real binary's life: it refuses to start on a bad config, its highest tokens survive
//! `kill -9` mid-storm (after a restart every lower token is rejected), and SIGTERM drains.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::RecordingUpstream;
use common::binary::{put, serve_command, start_binary};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn highest_tokens_survive_kill_9_and_lower_tokens_are_rejected_after_restart() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fencegate.db");
    let client = reqwest::Client::new();
    const RESOURCES: usize = 6;

    let mut proxy = start_binary(&upstream.url(), &db).await;
    // Advance every resource a few times and confirm each advance was acknowledged.
    for resource in 0..RESOURCES {
        for token in [1, 10, 100 + resource as u64] {
            assert_eq!(
                put(&client, proxy.addr, resource, token).await,
                Some((200, token))
            );
        }
    }
    // Then a storm of advances that is still running when the process is killed.
    let addr = proxy.addr;
    let storm: Vec<_> = (0..RESOURCES)
        .map(|resource| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut acknowledged = 0;
                for token in 1_000.. {
                    match put(&client, addr, resource, token).await {
                        Some((200, _)) => acknowledged = token,
                        _ => break,
                    }
                }
                acknowledged
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.child.kill().unwrap(); // SIGKILL: no shutdown, no flush
    proxy.child.wait().unwrap();
    let mut acknowledged = HashMap::new();
    for (resource, task) in storm.into_iter().enumerate() {
        acknowledged.insert(resource, task.await.unwrap());
    }
    assert!(
        acknowledged.values().any(|t| *t >= 1_000),
        "the storm got going before the kill"
    );

    let proxy = start_binary(&upstream.url(), &db).await;
    let seen_upstream = Arc::new(upstream.arrivals());
    for resource in 0..RESOURCES {
        let path = format!("/crash/{resource}");
        let forwarded = seen_upstream
            .iter()
            .filter(|a| a.target == path)
            .filter_map(|a| a.token)
            .max()
            .unwrap();
        assert!(forwarded >= acknowledged[&resource]);
        for lower in [0, 1, 10, forwarded - 1] {
            let (status, highest) = put(&client, proxy.addr, resource, lower).await.unwrap();
            assert_eq!(
                status, 409,
                "resource {resource}: token {lower} after restart"
            );
            assert!(
                highest >= forwarded,
                "highest {highest} forgot forwarded token {forwarded}"
            );
        }
        let (status, _) = put(&client, proxy.addr, resource, forwarded + 1)
            .await
            .unwrap();
        assert_eq!(status, 200, "the next leader still gets through");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut proxy = start_binary(&upstream.url(), &dir.path().join("fencegate.db")).await;
    let client = reqwest::Client::new();
    let url = format!("http://{}/crash/slow", proxy.addr);
    let slow = tokio::spawn(async move {
        client
            .put(url)
            .header("fencing-token", "1")
            .header(common::DELAY_HEADER, "500")
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let pid = proxy.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert_eq!(
        slow.await.unwrap().unwrap(),
        200,
        "the in-flight request completes"
    );
    let status = tokio::task::spawn_blocking(move || proxy.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status}");
}

#[test]
fn bad_config_stops_start_up_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "[[routes]]\npath = \"/a/{id}\"\nupstream = \"http://127.0.0.1:1\"\nresource = \"a:{nope}\"\n",
    )
    .unwrap();
    let output = serve_command(&config, &dir.path().join("never-created.db"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("routes[0].resource: uses {nope}, which path /a/{id} does not capture"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("never-created.db").exists(),
        "nothing is opened before the config is valid"
    );
}

#[test]
fn exposed_admin_plane_without_a_token_refuses_to_start() {
    let output = Command::new(env!("CARGO_BIN_EXE_fencegate"))
        .args([
            "serve",
            "--upstream",
            "http://127.0.0.1:1",
            "--admin-listen",
            "0.0.0.0:0",
        ])
        .env_remove("FENCEGATE_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("admin_listen: 0.0.0.0:0 is not a loopback address")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_plane_serves_on_worker_threads_threads_each_with_its_own_listener() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fencegate.db");
    let config = common::binary::write_config(&upstream.url(), &db, "worker_threads = 3");
    let proxy = common::binary::start(serve_command(&config, &db)).await;
    // A thread takes its name when it first runs, which on a loaded machine can be after the
    // server is ready (its listener is bound and queues connections before that).
    let mut names = Vec::new();
    for _ in 0..200 {
        names = data_thread_wakeups(proxy.child.id()).into_keys().collect();
        names.sort();
        if names.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(names, ["fg-data-0", "fg-data-1", "fg-data-2"]);
    // Connections spread over the threads' listeners (SO_REUSEPORT): every thread wakes up to
    // serve some of them, and every one is served and fenced alike.
    let before = data_thread_wakeups(proxy.child.id());
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    for token in 1..=48 {
        assert_eq!(put(&client, proxy.addr, 0, token).await, Some((200, token)));
    }
    assert_eq!(put(&client, proxy.addr, 0, 3).await, Some((409, 48)));
    let after = data_thread_wakeups(proxy.child.id());
    for (thread, woken) in &after {
        assert!(
            woken > &before[thread],
            "{thread} served none of 49 connections: {before:?} -> {after:?}"
        );
    }
}

#[test]
fn a_data_port_held_by_another_listener_refuses_start_up() {
    // A listener without SO_REUSEPORT (another program, or an older fencegate) holds the port:
    // fencegate's listeners cannot join it, so two servers never split one port's connections.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fencegate.db");
    let config = common::binary::write_config("http://127.0.0.1:9", &db, "");
    let output = Command::new(env!("CARGO_BIN_EXE_fencegate"))
        .args(["serve", "--admin-listen", "127.0.0.1:0", "--listen"])
        .arg(held.local_addr().unwrap().to_string())
        .arg("--config")
        .arg(&config)
        .arg("--db")
        .arg(&db)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot listen on"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_fencegate_cannot_join_the_data_port_of_a_running_one() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let first_db = dir.path().join("first.db");
    let first = start_binary(&upstream.url(), &first_db).await;
    // Another database, the same data port: its listeners could join the first's SO_REUSEPORT
    // group and serve half the connections under tokens the first never sees.
    let second_db = dir.path().join("second.db");
    let config = common::binary::write_config(&upstream.url(), &second_db, "");
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_fencegate"))
            .args(["serve", "--admin-listen", "127.0.0.1:0", "--listen"])
            .arg(first.addr.to_string())
            .arg("--config")
            .arg(&config)
            .arg("--db")
            .arg(&second_db)
            .output()
            .map(|output| (output, first))
    })
    .await
    .unwrap()
    .unwrap();
    let (output, first) = output;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("another fencegate already serves"),
        "{stderr}"
    );
    // The first still serves every connection.
    let client = reqwest::Client::new();
    assert_eq!(put(&client, first.addr, 0, 1).await, Some((200, 1)));
}

/// Each data-plane thread's voluntary context switches: an idle current-thread runtime sleeps in
/// epoll until a connection of its own wakes it.
fn data_thread_wakeups(pid: u32) -> HashMap<String, u64> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| {
            let path = task.ok()?.path();
            let name = std::fs::read_to_string(path.join("comm")).ok()?;
            let name = name.trim().to_owned();
            let status = std::fs::read_to_string(path.join("status")).ok()?;
            let switches = status
                .lines()
                .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))?
                .trim()
                .parse()
                .ok()?;
            name.starts_with("fg-data-").then_some((name, switches))
        })
        .collect()
}

/// A start that fails because a port is taken touches no database: a new one is not created,
/// and one that was stopped cleanly stays so (the next start need not hold tokens back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_fails_on_a_port_in_use_leaves_the_database_as_it_was() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let config = common::binary::write_config(&upstream.url(), &dir.path().join("x.db"), "");
    let failed_start = |db: &std::path::Path, taken_plane: &str| {
        let (listen, admin) = match taken_plane {
            "--listen" => (port.as_str(), "127.0.0.1:0"),
            _ => ("127.0.0.1:0", port.as_str()),
        };
        let output = Command::new(env!("CARGO_BIN_EXE_fencegate"))
            .args([
                "serve",
                "--listen",
                listen,
                "--admin-listen",
                admin,
                "--config",
            ])
            .arg(&config)
            .arg("--db")
            .arg(db)
            .output()
            .unwrap();
        assert!(!output.status.success(), "started on a taken port");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };

    let fresh = dir.path().join("fresh.db");
    let stderr = failed_start(&fresh, "--listen");
    assert_eq!(
        stderr.matches("cannot listen on").count(),
        1,
        "said once: {stderr}"
    );
    assert!(!fresh.exists(), "a failed start created the database");

    let used = dir.path().join("used.db");
    let mut proxy = start_binary(&upstream.url(), &used).await;
    assert_eq!(
        put(&reqwest::Client::new(), proxy.addr, 1, 4).await,
        Some((200, 4))
    );
    let pid = proxy.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert!(proxy.child.wait().unwrap().success());
    let lock = dir.path().join("used.db.lock");
    let cleanly = std::fs::read(&lock).unwrap();
    for flag in ["--listen", "--admin-listen"] {
        let stderr = failed_start(&used, flag);
        assert!(stderr.contains("cannot listen on"), "{stderr}");
        assert_eq!(
            std::fs::read(&lock).unwrap(),
            cleanly,
            "a failed start ({flag}) changed how the last stop is recorded"
        );
    }
}

/// Waits until `check` holds, for at most five seconds.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let started = std::time::Instant::now();
    while !check().await {
        assert!(started.elapsed() < Duration::from_secs(5), "never: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// SIGHUP reloads the config file: a new route serves at once, a request in flight across the
/// reload finishes on the route it started with, a connection opened before it goes on, a key
/// that only a restart changes is named in the log, and a broken file changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_routes_without_dropping_a_connection_and_a_bad_config_changes_nothing() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fencegate.db");
    let mut proxy = common::binary::start_binary(&upstream.url(), &db).await;
    let config = db.with_extension("toml");
    let client = reqwest::Client::new();
    let put_to = |path: &str, token: u64| {
        client
            .put(format!("http://{}{path}", proxy.addr))
            .header("fencing-token", token.to_string())
            .send()
    };
    assert_eq!(put_to("/crash/1", 1).await.unwrap().status(), 200);
    assert_eq!(put_to("/orders/1", 1).await.unwrap().status(), 404);
    let in_flight = {
        let request = client
            .put(format!("http://{}/crash/2", proxy.addr))
            .header("fencing-token", "5")
            .header(common::DELAY_HEADER, "1500");
        tokio::spawn(request.send())
    };
    eventually("the slow request reached the upstream", async || {
        upstream.arrivals().len() == 2
    })
    .await;

    let original = std::fs::read_to_string(&config).unwrap();
    let grown = format!(
        "in_doubt_grace = \"7s\"\n{original}\n[[routes]]\npath = \"/orders/{{id}}\"\nupstream = \"{}\"\nresource = \"order:{{id}}\"\n",
        upstream.url()
    );
    std::fs::write(&config, grown).unwrap();
    hup(&proxy);
    eventually("the new route serves", async || {
        put_to("/orders/1", 3).await.unwrap().status() == 200
    })
    .await;
    let finished = in_flight.await.unwrap().unwrap();
    assert_eq!(
        finished.status(),
        200,
        "the request in flight across the reload"
    );
    assert!(proxy.logged("config reloaded"));
    assert!(
        proxy.logged("in_doubt_grace"),
        "a key only a restart changes is named: {:?}",
        proxy.log.lock().unwrap()
    );

    std::fs::write(&config, "routes = [[[ not toml").unwrap();
    hup(&proxy);
    eventually("the failed reload is logged", async || {
        proxy.logged("config reload failed")
    })
    .await;
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "SIGHUP ended the server"
    );
    let metrics = reqwest::get(format!("http://{}/metrics", proxy.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("fencegate_config_last_reload_success 0"),
        "{metrics}"
    );
    assert_eq!(put_to("/orders/2", 1).await.unwrap().status(), 200);
    assert_eq!(put_to("/crash/1", 2).await.unwrap().status(), 200);

    let pid = proxy.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert!(proxy.child.wait().unwrap().success());
    let arrived: Vec<String> = upstream
        .arrivals()
        .iter()
        .map(|a| a.target.clone())
        .collect();
    assert_eq!(
        arrived,
        ["/crash/1", "/crash/2", "/orders/1", "/orders/2", "/crash/1"]
    );
}

/// The config's `log_level` is reloaded with the rest: at `warn` the access log (INFO) goes
/// quiet, back at `info` it speaks again; `RUST_LOG` is not set, so the file decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_changes_the_log_level() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fencegate.db");
    let at = |level: &str, grace: &str| {
        common::binary::write_config(
            &upstream.url(),
            &db,
            &format!("access_log = true\nlog_level = \"{level}\"\nin_doubt_grace = \"{grace}\""),
        )
    };
    let config = at("info", "5s");
    let mut serve = serve_command(&config, &db);
    serve.env_remove("RUST_LOG");
    let proxy = common::binary::start(serve).await;
    let client = reqwest::Client::new();
    let put_and_wait = async |id: u32| {
        let response = client
            .put(format!("http://{}/crash/{id}", proxy.addr))
            .header("fencing-token", "1")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    };
    let access_line = |id: u32| format!("/crash/{id}");
    put_and_wait(1).await;
    eventually("the access log speaks at info", async || {
        proxy.logged(&access_line(1))
    })
    .await;

    // A restart-only key changes too, so that the reload leaves a WARN line to wait for.
    at("warn", "6s");
    hup(&proxy);
    eventually("the reload at warn is logged", async || {
        proxy.logged("only change at a restart")
    })
    .await;
    put_and_wait(2).await;
    at("info", "7s");
    hup(&proxy);
    eventually("the reload at info is logged", async || {
        proxy.logged("config reloaded routes=")
    })
    .await;
    put_and_wait(3).await;
    eventually("the access log speaks at info again", async || {
        proxy.logged(&access_line(3))
    })
    .await;
    assert!(
        !proxy.logged(&access_line(2)),
        "an INFO line was logged at warn: {:?}",
        proxy.log.lock().unwrap()
    );
}

/// Sends SIGHUP to the server.
fn hup(proxy: &common::binary::Proxy) {
    let pid = proxy.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
}

/// A database fencegate cannot use is named with the reason, once: a missing directory (and
/// where else the path can come from), a path that is not a file it can read and write.
#[test]
fn an_unusable_database_path_is_explained_once() {
    let dir = tempfile::tempdir().unwrap();
    let serve = |db: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_fencegate"))
            .args(["serve", "--upstream", "http://127.0.0.1:1"])
            .args([
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--db",
            ])
            .arg(db)
            .output()
            .unwrap()
    };
    let missing = serve(&dir.path().join("no/such/dir/fencegate.db"));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr.contains("does not exist") && stderr.contains("FENCEGATE_DB"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(".lock"),
        "the lock file is not the problem: {stderr}"
    );
    assert!(!dir.path().join("no").exists());

    let directory = dir.path().join("a-directory.db");
    std::fs::create_dir(&directory).unwrap();
    let output = serve(&directory);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(stderr.matches("os error").count(), 1, "{stderr}");
    assert!(stderr.contains("for reading and writing"), "{stderr}");
}
