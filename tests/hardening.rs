//! Hostile clients: every limit cuts its attack off while other clients are still served, and
//! neither a smuggled request nor a runaway token gets past fencegate (SECURITY.md).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{RecordingUpstream, TestApp, raw_request, standard_routes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

async fn app_with(settings: &str) -> (RecordingUpstream, TestApp) {
    let upstream = RecordingUpstream::start().await;
    let app = TestApp::spawn(&format!("{settings}\n{}", standard_routes(&upstream.url()))).await;
    (upstream, app)
}

/// Reads until the server closes the connection; returns how long that took, or `None` if it
/// was still open after `patience`.
async fn closed_within(stream: &mut TcpStream, patience: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buffer = [0u8; 4096];
    loop {
        match tokio::time::timeout(
            patience.saturating_sub(started.elapsed()),
            stream.read(&mut buffer),
        )
        .await
        {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// A well-behaved client: a fenced PUT with the current token is answered 200, quickly.
async fn still_served(app: &TestApp) {
    let started = Instant::now();
    let response = app.put("/wallets/ok", 1, "fine").await;
    assert_eq!(response.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_slowloris_head_is_cut_off_at_the_header_read_timeout_on_both_planes() {
    let (_upstream, app) =
        app_with("header_read_timeout = \"400ms\"\nidle_timeout = \"30s\"").await;
    for addr in [app.addr, app.admin_addr] {
        let mut attacker = TcpStream::connect(addr).await.unwrap();
        attacker
            .write_all(b"PUT /wallets/1 HTTP/1.1\r\n")
            .await
            .unwrap();
        let (mut reader, mut writer) = attacker.into_split();
        let trickle = tokio::spawn(async move {
            // One header byte every 100 ms: never a whole head.
            for _ in 0..50 {
                if writer.write_all(b"x").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        still_served(&app).await;
        let started = Instant::now();
        let mut buffer = [0u8; 1024];
        let outcome = tokio::time::timeout(Duration::from_secs(3), reader.read(&mut buffer)).await;
        assert!(
            matches!(outcome, Ok(Ok(0) | Err(_))),
            "{addr}: the slow head was not cut off: {outcome:?}"
        );
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{:?}",
            started.elapsed()
        );
        trickle.abort();
    }
    still_served(&app).await;
}

#[tokio::test]
async fn an_idle_connection_waits_for_the_idle_timeout_not_the_header_timeout() {
    let (_upstream, app) =
        app_with("header_read_timeout = \"300ms\"\nidle_timeout = \"1500ms\"").await;
    let mut idle = TcpStream::connect(app.addr).await.unwrap();
    // Silent for longer than the header timeout: still open, since no head has begun.
    assert_eq!(
        closed_within(&mut idle, Duration::from_millis(800)).await,
        None
    );
    idle.write_all(
        common::raw("GET", "/wallets/1", &[])
            .replace("connection: close", "connection: keep-alive")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = vec![0u8; 4096];
    let n = idle.read(&mut answer).await.unwrap();
    assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 200"));
    // Then idle again: closed by the idle timeout, while others are served.
    still_served(&app).await;
    let closed = closed_within(&mut idle, Duration::from_secs(4)).await;
    assert!(
        closed.is_some_and(|after| after >= Duration::from_millis(1000)),
        "{closed:?}"
    );
}

#[tokio::test]
async fn oversized_heads_and_too_many_headers_are_refused_with_431() {
    let (upstream, app) = app_with("max_header_size = \"8KiB\"\nmax_headers = 20").await;
    let big = format!("x-big: {}", "a".repeat(16 * 1024));
    let (status, _, body) = raw_request(
        app.addr,
        &common::raw("PUT", "/wallets/1", &["fencing-token: 1", &big]),
    )
    .await;
    assert_eq!(status, 431);
    assert_problem_type(&body, "head-too-large");
    let many: Vec<String> = (0..30).map(|i| format!("x-h{i}: {i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let (status, _, body) = raw_request(app.addr, &common::raw("GET", "/wallets/1", &many)).await;
    assert_eq!(status, 431);
    assert_problem_type(&body, "head-too-large");
    assert!(
        upstream.arrivals().is_empty(),
        "nothing reached the upstream"
    );
    still_served(&app).await;
}

fn assert_problem_type(body: &str, slug: &str) {
    let problem: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(problem["type"], format!("urn:fencegate:problem:{slug}"));
}

#[tokio::test]
async fn connections_beyond_max_connections_wait_until_one_closes() {
    let (_upstream, app) = app_with("max_connections = 2\nidle_timeout = \"30s\"").await;
    let held: Vec<TcpStream> = vec![
        TcpStream::connect(app.addr).await.unwrap(),
        TcpStream::connect(app.addr).await.unwrap(),
    ];
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = TcpStream::connect(app.addr).await.unwrap(); // sits in the backlog
    third
        .write_all(common::raw("GET", "/wallets/1", &[]).as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    let early =
        tokio::time::timeout(Duration::from_millis(400), third.read_to_end(&mut answer)).await;
    assert!(early.is_err(), "served beyond the limit: {answer:?}");
    drop(held);
    tokio::time::timeout(Duration::from_secs(3), third.read_to_end(&mut answer))
        .await
        .expect("served once a connection closed")
        .unwrap();
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
        "{answer:?}"
    );
}

/// A listener whose accept queue is full and never drained: connecting to it hangs.
fn black_hole() -> (
    SocketAddr,
    tokio::net::TcpListener,
    Vec<std::net::TcpStream>,
) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    let listener = socket.listen(0).unwrap();
    let fillers = (0..4)
        .filter_map(|_| {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()
        })
        .collect();
    (addr, listener, fillers)
}

#[tokio::test]
async fn an_upstream_that_never_accepts_is_a_502_after_the_connect_timeout() {
    let (hole, _listener, _fillers) = black_hole();
    let app = TestApp::spawn(&format!(
        "upstream_connect_timeout = \"300ms\"\nupstream_timeout = \"20s\"\n{}",
        standard_routes(&format!("http://{hole}"))
    ))
    .await;
    let started = Instant::now();
    let response = app.put("/wallets/1", 1, "x").await;
    assert_eq!(response.status(), 502);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_endless_body_is_cut_off_at_max_body_while_others_are_served() {
    let (upstream, app) = app_with("max_body = \"64KiB\"").await;
    let mut flood = TcpStream::connect(app.addr).await.unwrap();
    flood
        .write_all(
            b"PUT /wallets/flood HTTP/1.1\r\nhost: fencegate\r\nfencing-token: 1\r\n\
              transfer-encoding: chunked\r\n\r\n",
        )
        .await
        .unwrap();
    let (_reader, mut writer) = flood.into_split();
    // Chunks for ever, until fencegate stops reading and closes the connection.
    let pump = tokio::spawn(async move {
        let chunk = format!("1000\r\n{}\r\n", "z".repeat(0x1000));
        while writer.write_all(chunk.as_bytes()).await.is_ok() {}
    });
    still_served(&app).await;
    tokio::time::timeout(Duration::from_secs(5), pump)
        .await
        .expect("the endless body was cut off")
        .unwrap();
    still_served(&app).await;
    for arrival in upstream.arrivals() {
        assert!(
            arrival.body.len() <= 64 * 1024,
            "{} bytes reached the upstream",
            arrival.body.len()
        );
    }
}

#[tokio::test]
async fn a_drip_fed_body_is_cut_off_at_the_upstream_timeout_and_the_next_leader_then_writes() {
    let (_upstream, app) =
        app_with("upstream_timeout = \"500ms\"\nin_doubt_grace = \"200ms\"").await;
    let mut dripper = TcpStream::connect(app.addr).await.unwrap();
    // Promises 1,000 bytes, sends a few, then holds its write open.
    dripper
        .write_all(
            b"PUT /wallets/ok HTTP/1.1\r\nhost: fencegate\r\nfencing-token: 1\r\n\
              content-length: 1000\r\n\r\nthe first bytes",
        )
        .await
        .unwrap();
    still_served(&app).await; // the same token is not held up by it
    let started = Instant::now();
    let next_leader = app.put("/wallets/ok", 2, "new epoch").await;
    assert_eq!(next_leader.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the newer token waited {:?}",
        started.elapsed()
    );
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), dripper.read_to_end(&mut answer))
        .await
        .expect("the dripping connection was answered and closed")
        .unwrap();
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 504"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

/// Requests that frame their body two ways, hoping that fencegate and the upstream split the byte
/// stream differently and that a zombie's write hidden in a body reaches the upstream unchecked.
/// fencegate re-frames every request it forwards, so the upstream only ever sees requests that
/// fencegate itself parsed and fenced: here, only the leader's token.
#[tokio::test]
async fn smuggled_requests_never_reach_the_upstream_unfenced() {
    let (upstream, app) = app_with("").await;
    assert_eq!(app.put("/wallets/1", 5, "leader").await.status(), 200);
    let zombie = "PUT /wallets/1 HTTP/1.1\r\nhost: fencegate\r\nfencing-token: 1\r\n\
                  content-length: 6\r\nconnection: close\r\n\r\nzombie";
    let leader = "PUT /wallets/1 HTTP/1.1\r\nhost: fencegate\r\nfencing-token: 5\r\n";
    let attempts = [
        // CL.TE: Content-Length covers only the empty chunk; the zombie follows.
        format!("{leader}content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n{zombie}"),
        // TE.CL: the chunk holds the zombie; Content-Length says the body ends before it.
        format!(
            "{leader}transfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n{:x}\r\n{zombie}\r\n0\r\n\r\n",
            zombie.len()
        ),
        // Obfuscated or doubled Transfer-Encoding.
        format!("{leader}transfer-encoding: xchunked\r\n\r\n0\r\n\r\n{zombie}"),
        format!(
            "{leader}transfer-encoding: chunked\r\ntransfer-encoding: identity\r\n\r\n0\r\n\r\n{zombie}"
        ),
        format!("{leader}transfer-encoding : chunked\r\n\r\n0\r\n\r\n{zombie}"),
        // Two different lengths.
        format!("{leader}content-length: 0\r\ncontent-length: 44\r\n\r\n{zombie}"),
        // A bare LF, and a line folded onto the token header.
        format!("{leader}content-length: 0\n\n{zombie}"),
        "PUT /wallets/1 HTTP/1.1\r\nhost: fencegate\r\nfencing-token: 1\r\n 5\r\ncontent-length: 0\r\n\r\n"
            .to_owned(),
    ];
    let mut accepted = 1; // the leader's first write
    for attempt in &attempts {
        let answered =
            tokio::time::timeout(Duration::from_secs(5), raw_request(app.addr, attempt)).await;
        let (status, _, _) = answered.expect("fencegate answered and closed");
        assert!(
            [200, 400, 409, 501].contains(&status),
            "{status} for {attempt:?}"
        );
        accepted += usize::from(status == 200);
    }
    // One upstream request per accepted leader's request, and nothing else. A zombie's bytes may
    // arrive as the body of the leader's request (TE.CL): that is data, framed by fencegate as
    // one chunked body, never a request of its own.
    assert_eq!(upstream.arrivals().len(), accepted);
    for arrival in upstream.arrivals() {
        assert_eq!(arrival.token, Some(5), "{arrival:?}");
    }
    still_served(&app).await;
}

/// A client that sends the largest token fences every leader out for ever; a route's
/// `max_token_jump` refuses it (audited), and the resource keeps its real leader.
#[tokio::test]
async fn a_token_jump_beyond_max_token_jump_is_refused_audited_and_changes_nothing() {
    let upstream = RecordingUpstream::start().await;
    let app = TestApp::spawn(&format!(
        "[[routes]]\npath = \"/wallets/{{id}}\"\nupstream = \"{}\"\nresource = \"wallet:{{id}}\"\nmax_token_jump = 1000\n",
        upstream.url()
    ))
    .await;
    assert_eq!(app.put("/wallets/1", 5, "leader").await.status(), 200);
    let runaway = app.put("/wallets/1", u64::MAX, "fences everyone").await;
    assert_eq!(runaway.status(), 422);
    assert_eq!(runaway.headers()["fencing-token-highest"], "5");
    common::problem(runaway).await;
    assert_eq!(
        app.put("/wallets/1", 1005, "next leader").await.status(),
        200
    );
    assert_eq!(app.put("/wallets/1", 2006, "too far").await.status(), 422);

    let jumps: Vec<_> = app
        .rejections()
        .into_iter()
        .filter(|(reason, ..)| reason == "jump")
        .collect();
    assert_eq!(jumps.len(), 2, "{jumps:?}");
    let forwarded: Vec<_> = upstream.arrivals().iter().map(|a| a.token).collect();
    assert_eq!(forwarded, [Some(5), Some(1005)]);
}

/// The size of the data in the server's database: a compacted copy, so that what is measured is
/// rows and indexes, not WAL frames or free pages.
async fn stopped_database_size(app: TestApp) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.db");
    let conn = rusqlite::Connection::open_with_flags(
        &app.db_path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    conn.execute_batch(&format!("VACUUM INTO '{}'", copy.display()))
        .unwrap();
    drop(conn);
    app.stop().await;
    std::fs::metadata(&copy).unwrap().len()
}

#[tokio::test]
async fn hostile_names_cannot_grow_the_database_or_the_audit_log_past_a_bound() {
    const REQUESTS: u64 = 300;
    let (_, baseline) = app_with("").await;
    baseline.put("/wallets/1", 1, "").await;
    let empty = stopped_database_size(baseline).await;

    // Names of 30 KiB, as in the report that found 500 of them growing the database by 50 MiB.
    let (upstream, app) = app_with("").await;
    app.put("/wallets/1", 1, "").await;
    for i in 0..REQUESTS {
        let name = format!("{i}{}", "n".repeat(30 * 1024));
        assert_eq!(
            app.put(&format!("/wallets/{name}"), 1, "").await.status(),
            414
        );
    }
    assert_eq!(upstream.arrivals().len(), 1);
    let after_long_names = stopped_database_size(app).await;
    assert!(
        after_long_names <= empty + 8 * 1024,
        "refused names grew the database from {empty} to {after_long_names} bytes"
    );

    // The largest names that are accepted, each a new resource and then a zombie's audited 409.
    let (_, app) = app_with("").await;
    app.put("/wallets/1", 1, "").await;
    for i in 0..REQUESTS {
        let name = format!("{i:03}{}", "n".repeat(512 - "wallet:".len() - 3));
        let path = format!("/wallets/{name}");
        assert_eq!(app.put(&path, 2, "").await.status(), 200);
        assert_eq!(app.put(&path, 1, "").await.status(), 409);
    }
    let full = stopped_database_size(app).await;
    let per_request = (full - empty) / REQUESTS;
    let (_, app) = app_with("").await;
    app.put("/wallets/1", 1, "").await;
    for i in 0..REQUESTS {
        let path = format!("/wallets/{}", 1000 + i);
        assert_eq!(app.put(&path, 2, "").await.status(), 200);
        assert_eq!(app.put(&path, 1, "").await.status(), 409);
    }
    let typical = (stopped_database_size(app).await - empty) / REQUESTS;
    assert!(
        typical < 1024,
        "a typical name cost {typical} bytes of database"
    );
    // A resource row, its first epoch row and one audit row, each carrying a 512-byte name (and
    // the audit row a 512-byte path), with their index entries: README states these figures.
    assert!(
        per_request < 6 * 1024,
        "each hostile name cost {per_request} bytes of database"
    );
}

/// A chunked body fencegate cannot decode exactly — a size of more than sixteen hex digits, an
/// empty size, a bare LF, control bytes in an extension — never reaches the upstream as a whole
/// request: fencegate stops forwarding it and closes the connection, so nothing after it is
/// read as a request of its own.
#[tokio::test]
async fn malformed_chunked_bodies_never_reach_the_upstream_whole() {
    let (upstream, app) = app_with("").await;
    let zombie = "PUT /wallets/1 HTTP/1.1\r\nhost: fencegate\r\nfencing-token: 1\r\ncontent-length: 0\r\n\r\n";
    let bodies = [
        "11111111111111111\r\nx\r\n0\r\n\r\n",
        "\r\nx\r\n0\r\n\r\n",
        "1\nx\r\n0\r\n\r\n",
        "1;ext=\x01\r\nx\r\n0\r\n\r\n",
        "1\r\nxy0\r\n\r\n",
    ];
    for body in bodies {
        let text = format!(
            "PUT /wallets/2 HTTP/1.1\r\nhost: fencegate\r\nfencing-token: 5\r\n\
             transfer-encoding: chunked\r\n\r\n{body}{zombie}"
        );
        let answered = tokio::time::timeout(Duration::from_secs(5), raw_request(app.addr, &text))
            .await
            .expect("fencegate answered and closed");
        assert_ne!(answered.0, 200, "{body:?}");
    }
    assert!(upstream.arrivals().is_empty(), "{:?}", upstream.arrivals());
    still_served(&app).await;
}
