//! The one guarantee: per resource, the upstream sees tokens that never decrease, and a new token
//! reaches it only after every older request has been answered.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{RecordingUpstream, TestApp, spawn_slow_put, standard_routes};

async fn setup(extra: &str) -> (RecordingUpstream, TestApp) {
    let upstream = RecordingUpstream::start().await;
    let app = TestApp::spawn(&format!("{extra}\n{}", standard_routes(&upstream.url()))).await;
    (upstream, app)
}

fn arrival_of(upstream: &RecordingUpstream, token: u64) -> common::Arrival {
    upstream
        .arrivals()
        .into_iter()
        .find(|a| a.token == Some(token))
        .unwrap_or_else(|| panic!("token {token} never reached the upstream"))
}

#[tokio::test]
async fn newer_token_reaches_upstream_only_after_the_slow_older_write_is_answered() {
    let (upstream, app) = setup("").await;
    let app = Arc::new(app);
    let old = spawn_slow_put(&app, "/wallets/1", 1, Duration::from_millis(500));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let new = app.put("/wallets/1", 2, "token 2").await;
    assert_eq!(new.status(), 200);
    assert_eq!(
        old.await.unwrap(),
        200,
        "the older write, already forwarded, completes"
    );

    let (first, second) = (arrival_of(&upstream, 1), arrival_of(&upstream, 2));
    assert!(
        second.arrived >= first.answered.unwrap(),
        "token 2 arrived before token 1 was answered"
    );
    assert!(
        upstream.violations().is_empty(),
        "{:?}",
        upstream.violations()
    );
}

#[tokio::test]
async fn same_token_writes_run_concurrently() {
    let (upstream, app) = setup("").await;
    let app = Arc::new(app);
    app.put("/wallets/1", 1, "").await;
    let started = Instant::now();
    let writes: Vec<_> = (0..4)
        .map(|_| spawn_slow_put(&app, "/wallets/1", 1, Duration::from_millis(400)))
        .collect();
    for write in writes {
        assert_eq!(write.await.unwrap(), 200);
    }
    assert_eq!(
        upstream.max_in_flight("/wallets/1"),
        4,
        "all four were at the upstream at once"
    );
    assert!(
        started.elapsed() < Duration::from_millis(1_200),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn first_writes_of_a_new_token_overlap_once_the_old_drain() {
    let (upstream, app) = setup("").await;
    let app = Arc::new(app);
    let old = spawn_slow_put(&app, "/wallets/1", 1, Duration::from_millis(300));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let new: Vec<_> = (0..3)
        .map(|_| spawn_slow_put(&app, "/wallets/1", 2, Duration::from_millis(300)))
        .collect();
    assert_eq!(old.await.unwrap(), 200);
    for write in new {
        assert_eq!(write.await.unwrap(), 200);
    }
    assert_eq!(upstream.max_in_flight("/wallets/1"), 3);
    assert!(
        upstream.violations().is_empty(),
        "{:?}",
        upstream.violations()
    );
}

#[tokio::test]
async fn request_superseded_while_waiting_gets_409_and_is_never_forwarded() {
    let (upstream, app) = setup("").await;
    let app = Arc::new(app);
    let old = spawn_slow_put(&app, "/wallets/1", 1, Duration::from_millis(500));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let middle = {
        let app = app.clone();
        tokio::spawn(async move {
            let response = app.put("/wallets/1", 2, "").await;
            (
                response.status(),
                response.headers()["fencing-token-highest"]
                    .to_str()
                    .unwrap()
                    .to_owned(),
            )
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let newest = app.put("/wallets/1", 3, "").await;
    assert_eq!(newest.status(), 200);
    assert_eq!(
        middle.await.unwrap(),
        (reqwest::StatusCode::CONFLICT, "3".to_owned())
    );
    assert_eq!(old.await.unwrap(), 200);

    let tokens: Vec<_> = upstream.arrivals().iter().map(|a| a.token).collect();
    assert_eq!(tokens, vec![Some(1), Some(3)]);
    assert_eq!(app.rejections()[0].0, "stale");
}

#[tokio::test]
async fn torn_down_request_keeps_newer_tokens_back_for_the_in_doubt_grace() {
    let (upstream, app) = setup("upstream_timeout = \"200ms\"\nin_doubt_grace = \"700ms\"").await;
    let timed_out = app
        .slow_put("/wallets/1", 1, Duration::from_millis(1_500))
        .await;
    assert_eq!(timed_out.status(), 504);
    let torn_down_at = Instant::now();

    assert_eq!(app.put("/wallets/1", 2, "").await.status(), 200);
    let waited = arrival_of(&upstream, 2)
        .arrived
        .duration_since(torn_down_at);
    assert!(
        waited >= Duration::from_millis(650),
        "token 2 went upstream after only {waited:?}"
    );
}

#[tokio::test]
async fn same_token_is_not_held_back_by_a_torn_down_request() {
    let (_upstream, app) = setup("upstream_timeout = \"200ms\"\nin_doubt_grace = \"5s\"").await;
    assert_eq!(
        app.slow_put("/wallets/1", 1, Duration::from_millis(1_000))
            .await
            .status(),
        504
    );
    let started = Instant::now();
    assert_eq!(app.put("/wallets/1", 1, "").await.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// Many leaders and zombies over several resources, with elections as they go and random upstream
/// delays. Whatever the interleaving, every resource's upstream sees non-decreasing tokens, never a
/// newer token while an older one is unanswered, and every forwarded request gets its upstream's
/// answer back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn property_upstream_order_never_decreases_under_elections_and_zombies() {
    let seeds: Vec<u64> = match std::env::var("FENCEGATE_PROPERTY_SEED") {
        Ok(seed) => vec![seed.parse().expect("FENCEGATE_PROPERTY_SEED is a number")],
        Err(_) => vec![1, 2, 3, fastrand::u64(..)],
    };
    for seed in seeds {
        println!("property seed {seed} (rerun with FENCEGATE_PROPERTY_SEED={seed})");
        run_property_round(seed).await;
    }
}

const RESOURCES: usize = 4;
const CLIENTS: u64 = 24;
const REQUESTS_PER_CLIENT: usize = 20;

async fn run_property_round(seed: u64) {
    let upstream = RecordingUpstream::start().await;
    let config = format!(
        "in_doubt_grace = \"1s\"\n[[routes]]\npath = \"/r/{{id}}\"\nupstream = \"{}\"\nresource = \"r:{{id}}\"\n",
        upstream.url()
    );
    let app = Arc::new(TestApp::spawn(&config).await);
    let epochs: Arc<Vec<AtomicU64>> = Arc::new((0..RESOURCES).map(|_| AtomicU64::new(1)).collect());

    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (app, epochs) = (app.clone(), epochs.clone());
            tokio::spawn(async move {
                let mut rng =
                    fastrand::Rng::with_seed(seed.wrapping_mul(1_000).wrapping_add(client));
                let mut outcomes = Vec::new();
                for _ in 0..REQUESTS_PER_CLIENT {
                    let resource = rng.usize(..RESOURCES);
                    let token = match rng.u8(..100) {
                        // An election: this client becomes the newest leader.
                        0..=9 => epochs[resource].fetch_add(1, Ordering::SeqCst) + 1,
                        // A zombie: a leader from some earlier generation wakes up.
                        10..=34 => rng.u64(0..=epochs[resource].load(Ordering::SeqCst)),
                        _ => epochs[resource].load(Ordering::SeqCst),
                    };
                    let delay = rng.u64(0..25);
                    let response = app
                        .client
                        .put(app.url(&format!("/r/{resource}")))
                        .header("fencing-token", token.to_string())
                        .header(common::DELAY_HEADER, delay.to_string())
                        .send()
                        .await
                        .unwrap();
                    let status = response.status().as_u16();
                    let highest: u64 = response.headers()["fencing-token-highest"]
                        .to_str()
                        .unwrap()
                        .parse()
                        .unwrap();
                    let answered_by_upstream = response.headers().contains_key("x-upstream");
                    outcomes.push((resource, token, status, highest, answered_by_upstream));
                }
                outcomes
            })
        })
        .collect();

    let mut forwarded = 0;
    let mut max_forwarded: HashMap<usize, u64> = HashMap::new();
    for client in clients {
        for (resource, token, status, highest, answered_by_upstream) in client.await.unwrap() {
            match status {
                200 => {
                    assert!(answered_by_upstream, "a 200 must be the upstream's answer");
                    assert!(highest >= token);
                    forwarded += 1;
                    let max = max_forwarded.entry(resource).or_default();
                    *max = (*max).max(token);
                }
                409 => assert!(
                    highest > token,
                    "409 must name a higher token ({token} vs {highest})"
                ),
                other => panic!("seed {seed}: unexpected status {other} for token {token}"),
            }
        }
    }

    assert!(
        upstream.violations().is_empty(),
        "seed {seed}: {:?}",
        upstream.violations()
    );
    let arrivals = upstream.arrivals();
    assert_eq!(
        arrivals.len(),
        forwarded,
        "seed {seed}: every forwarded request was answered"
    );
    for resource in 0..RESOURCES {
        let path = format!("/r/{resource}");
        let tokens: Vec<u64> = arrivals
            .iter()
            .filter(|a| a.target == path)
            .filter_map(|a| a.token)
            .collect();
        assert!(
            tokens.windows(2).all(|w| w[0] <= w[1]),
            "seed {seed}: {path} saw {tokens:?}"
        );
        let durable = common::durable_highest(&app.db_path, &format!("r:{resource}")).unwrap_or(0);
        assert!(durable >= max_forwarded.get(&resource).copied().unwrap_or(0));
    }
}

/// The hot path needs no disk: with SQLite's write lock held by someone else, writes with the
/// current token still go straight through, while a higher token waits until it can be made
/// durable and only then reaches the upstream.
#[tokio::test]
async fn current_token_writes_go_through_while_the_database_is_locked() {
    let (upstream, app) = setup("").await;
    let app = Arc::new(app);
    assert_eq!(app.put("/wallets/1", 1, "").await.status(), 200);

    let locker = rusqlite::Connection::open(&app.db_path).unwrap();
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let newer = spawn_slow_put(&app, "/wallets/1", 2, Duration::ZERO);
    let started = Instant::now();
    for _ in 0..20 {
        assert_eq!(app.put("/wallets/1", 1, "").await.status(), 200);
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !newer.is_finished(),
        "token 2 cannot be durable while the database is locked"
    );
    assert!(upstream.arrivals().iter().all(|a| a.token == Some(1)));

    locker.execute_batch("COMMIT").unwrap();
    assert_eq!(newer.await.unwrap(), 200);
    assert_eq!(common::durable_highest(&app.db_path, "wallet:1"), Some(2));
}

/// What an upstream that answers before reading the body saw, per token: when the request
/// arrived and when its body had been read to the end.
#[derive(Debug, Default)]
struct EarlyLog {
    arrived: HashMap<u64, Instant>,
    body_done: HashMap<u64, Instant>,
}

/// An upstream that answers 201 as soon as it has the head, and reads the body afterwards (as
/// storage that decides from the headers does).
async fn early_answering_upstream() -> (String, Arc<std::sync::Mutex<EarlyLog>>) {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let log = Arc::new(std::sync::Mutex::new(EarlyLog::default()));
    let serving = Arc::clone(&log);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let log = Arc::clone(&serving);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |request: http::Request<hyper::body::Incoming>| {
                        let log = Arc::clone(&log);
                        async move {
                            let token: u64 = request.headers()["fencing-token"]
                                .to_str()
                                .unwrap()
                                .parse()
                                .unwrap();
                            log.lock().unwrap().arrived.insert(token, Instant::now());
                            tokio::spawn(async move {
                                let _ = request.into_body().collect().await;
                                log.lock().unwrap().body_done.insert(token, Instant::now());
                            });
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .status(201)
                                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                                    .unwrap(),
                            )
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (url, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_stays_in_flight_until_its_body_is_sent_even_after_an_early_answer() {
    let (url, log) = early_answering_upstream().await;
    let app = TestApp::spawn(&standard_routes(&url)).await;
    let (chunks, receiver) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(4);
    let body = reqwest::Body::wrap_stream(tokio_stream::wrappers::ReceiverStream::new(receiver));
    chunks.send(Ok("old leader, part 1".into())).await.unwrap();
    let old = app
        .client
        .put(app.url("/wallets/1"))
        .header("fencing-token", "1")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(old.status(), 201, "answered before its body was sent");
    let newer = {
        let (client, url) = (app.client.clone(), app.url("/wallets/1"));
        tokio::spawn(async move {
            client
                .put(url)
                .header("fencing-token", "2")
                .body("new leader")
                .send()
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !log.lock().unwrap().arrived.contains_key(&2),
        "token 2 forwarded while token 1's body was still streaming"
    );
    let last_part_sent = Instant::now();
    chunks.send(Ok("old leader, part 2".into())).await.unwrap();
    drop(chunks);
    assert_eq!(newer.await.unwrap().status(), 201);
    {
        let log = log.lock().unwrap();
        assert!(
            log.arrived[&2] >= last_part_sent,
            "token 2 was forwarded before token 1's body was complete: {log:?}"
        );
    }
    // The upstream reads token 1's body in a task of its own, so it may record the end later.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !log.lock().unwrap().body_done.contains_key(&1) {
        assert!(
            Instant::now() < deadline,
            "token 1's body never reached the upstream whole"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn an_upstream_that_switches_protocols_is_refused_with_502() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = [0u8; 4096];
                let _ = stream.read(&mut head).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n")
                    .await;
                tokio::time::sleep(Duration::from_secs(5)).await;
            });
        }
    });
    let app = TestApp::spawn(&standard_routes(&url)).await;
    let response = app.put("/wallets/1", 1, "").await;
    assert_eq!(response.status(), 502);
    assert_eq!(response.headers()["fencing-token-highest"], "1");
    let problem = common::problem(response).await;
    assert_eq!(
        problem["type"],
        "urn:fencegate:problem:upstream-switched-protocols"
    );
    // The upstream answered, so nothing is in doubt: the next token is forwarded at once.
    let started = Instant::now();
    let next = app.put("/wallets/1", 2, "").await;
    assert_eq!(next.status(), 502);
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "held back as if in doubt"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_busy_resource_does_not_stall_the_others() {
    let upstream = RecordingUpstream::start().await;
    let app = Arc::new(TestApp::spawn(&standard_routes(&upstream.url())).await);
    assert_eq!(app.put("/wallets/busy", 1, "").await.status(), 200);
    // Forty slow writes hold the busy wallet (and a share of every data-plane thread) ...
    let slow: Vec<_> = (0..40)
        .map(|_| spawn_slow_put(&app, "/wallets/busy", 1, Duration::from_millis(1500)))
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ... while other wallets, new tokens included, go through at once.
    let started = Instant::now();
    for token in 1..=20 {
        assert_eq!(app.put("/wallets/other", token, "").await.status(), 200);
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(1000),
        "20 writes on another wallet took {took:?} behind a busy one"
    );
    for write in slow {
        assert_eq!(write.await.unwrap(), 200);
    }
}
