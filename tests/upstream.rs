//! The upstream client against what real storage sends, scripted byte by byte on raw TCP:
//! chunked bodies both ways with trailers, a close mid-body, early and interim answers,
//! `Expect: 100-continue`, keep-alive limits, idle connections the upstream closed, slow-loris
//! upstreams and a body far larger than memory should hold.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::scripted::{Peer, ScriptedUpstream, header};
use common::{TestApp, standard_routes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// fencegate with one data-plane thread (so one upstream pool) and `settings`.
async fn app(upstream: &ScriptedUpstream, settings: &str) -> TestApp {
    let config = format!(
        "worker_threads = 1\n{settings}\n{}",
        standard_routes(&upstream.url())
    );
    TestApp::spawn(&config).await
}

/// Answers every request on the connection with `response`, reading any Content-Length body.
async fn answer_each(mut peer: Peer, response: &'static [u8]) {
    while let Some(head) = peer.head().await {
        if let Some(length) = header(&head, "content-length") {
            peer.body(length.parse().unwrap()).await;
        }
        peer.send(response).await;
    }
}

#[tokio::test]
async fn a_chunked_answer_with_trailers_streams_through_and_the_connection_is_reused() {
    let upstream = ScriptedUpstream::start(|peer| {
        answer_each(
            peer,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: checksum\r\n\r\n\
              5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nChecksum: abc\r\n\r\n",
        )
    })
    .await;
    let app = app(&upstream, "").await;
    for _ in 0..3 {
        let response = app.client.get(app.url("/wallets/1")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "hello world");
    }
    assert_eq!(upstream.connections(), 1, "one keep-alive connection");
}

#[tokio::test]
async fn a_body_of_unknown_length_goes_upstream_chunked_and_whole() {
    let received = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&received);
    let upstream = ScriptedUpstream::start(move |mut peer| {
        let log = Arc::clone(&log);
        async move {
            let head = peer.head().await.unwrap();
            assert_eq!(header(&head, "transfer-encoding"), Some("chunked"));
            assert_eq!(header(&head, "content-length"), None);
            *log.lock().unwrap() = peer.chunked().await;
            peer.send(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
                .await;
        }
    })
    .await;
    let app = app(&upstream, "").await;
    let parts: Vec<Result<Vec<u8>, std::io::Error>> = vec![
        Ok(b"old ".to_vec()),
        Ok(vec![]),
        Ok(b"balance: 100".to_vec()),
    ];
    let body = reqwest::Body::wrap_stream(tokio_stream::iter(parts));
    let response = app
        .client
        .put(app.url("/wallets/1"))
        .header("fencing-token", "1")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(*received.lock().unwrap(), b"old balance: 100");
}

#[tokio::test]
async fn an_upstream_that_closes_mid_body_cuts_the_answer_and_the_next_request_gets_a_new_connection()
 {
    let upstream = ScriptedUpstream::start(|mut peer| async move {
        if peer.index == 0 {
            peer.head().await;
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
                .await;
            return; // closes with 90 bytes owed
        }
        answer_each(peer, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    })
    .await;
    let mut app = app(&upstream, "").await;
    // The head may or may not have been flushed before the cut: either way the client never
    // gets what looks like a whole answer.
    let whole = match app.client.get(app.url("/wallets/1")).send().await {
        Ok(cut) => cut.bytes().await.is_ok(),
        Err(_) => false,
    };
    assert!(!whole, "a body cut short must not look whole");
    // fencegate closes the client's connection after a broken answer; a new client reconnects.
    app.client = reqwest::Client::new();
    let next = app.put("/wallets/1", 1, "x").await;
    assert_eq!(next.status(), 200);
    assert_eq!(next.text().await.unwrap(), "ok");
    assert_eq!(upstream.connections(), 2);
}

#[tokio::test]
async fn interim_answers_are_skipped_and_bodiless_answers_keep_the_connection() {
    let upstream = ScriptedUpstream::start(|mut peer| async move {
        while let Some(head) = peer.head().await {
            let answer: &[u8] = if head.starts_with("HEAD") {
                b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
            } else if head.contains("/204 ") {
                b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"
            } else {
                b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\nETag: \"1\"\r\n\r\n"
            };
            peer.send(answer).await;
        }
    })
    .await;
    let app = app(&upstream, "").await;
    let head = app.client.head(app.url("/wallets/1")).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], "1000");
    let no_content = app.client.get(app.url("/x/204")).send().await.unwrap();
    assert_eq!(no_content.status(), 204);
    let not_modified = app.client.get(app.url("/x/304")).send().await.unwrap();
    assert_eq!(not_modified.status(), 304);
    assert_eq!(not_modified.headers()["etag"], "\"1\"");
    assert_eq!(upstream.connections(), 1, "no body was waited for");
}

/// The header lines of a raw answer, lower-cased, in order.
fn header_lines(answer: &str) -> Vec<String> {
    let head = answer.split("\r\n\r\n").next().unwrap_or_default();
    head.split("\r\n")
        .skip(1)
        .map(str::to_ascii_lowercase)
        .collect()
}

#[tokio::test]
async fn an_answers_headers_reach_the_client_once_each_beside_the_proxys_own() {
    let upstream = ScriptedUpstream::start(|mut peer| async move {
        while let Some(head) = peer.head().await {
            if let Some(length) = header(&head, "content-length") {
                peer.body(length.parse().unwrap()).await;
            }
            let host = header(&head, "host").unwrap().to_owned();
            // Headers the proxy reads or changes: the upstream's id is kept, its
            // Fencing-Token-Highest replaced, its absolute Location made the client's path.
            let handled = if head.contains("/handled ") {
                format!(
                    "X-Request-Id: upstream-id\r\nFencing-Token-Highest: 999\r\n\
                     Location: http://{host}/wallets/new\r\n"
                )
            } else {
                String::new()
            };
            let answer = format!(
                "HTTP/1.1 201 Created\r\nServer: storage\r\nSet-Cookie: a=1\r\n\
                 Connection: keep-alive, X-Hop\r\nX-Hop: private\r\nKeep-Alive: timeout=5\r\n\
                 set-cookie: b=2\r\nDate: Tue, 01 Dec 2026 00:00:00 GMT\r\n{handled}\
                 Content-Length: 2\r\n\r\nok"
            );
            peer.send(answer.as_bytes()).await;
        }
    })
    .await;
    let app = app(&upstream, "").await;
    let mut answers = Vec::new();
    for (path, token) in [("/wallets/plain", 3), ("/wallets/handled", 4)] {
        // Read raw: a client library folds repeated headers into one map.
        let request = common::raw("PUT", path, &[&format!("fencing-token: {token}")]);
        let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        let answer = String::from_utf8(answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 201 ") && answer.ends_with("ok"),
            "{answer}"
        );
        answers.push(answer);
    }
    let plain = header_lines(&answers[0]);
    let handled = header_lines(&answers[1]);
    let count = |lines: &[String], name: &str| {
        lines
            .iter()
            .filter(|line| line.starts_with(&format!("{name}:")))
            .count()
    };
    for lines in [&plain, &handled] {
        let cookies: Vec<_> = lines
            .iter()
            .filter(|line| line.starts_with("set-cookie:"))
            .collect();
        assert_eq!(cookies, ["set-cookie: a=1", "set-cookie: b=2"], "{lines:?}");
        assert!(lines.contains(&"server: storage".to_owned()), "{lines:?}");
        assert!(
            lines.contains(&"date: tue, 01 dec 2026 00:00:00 gmt".to_owned()),
            "the upstream's date, not another: {lines:?}"
        );
        for name in [
            "date",
            "content-length",
            "x-request-id",
            "fencing-token-highest",
        ] {
            assert_eq!(count(lines, name), 1, "one {name}: {lines:?}");
        }
        for name in ["x-hop", "keep-alive"] {
            assert_eq!(count(lines, name), 0, "{name} is hop-by-hop: {lines:?}");
        }
        assert!(lines.contains(&"content-length: 2".to_owned()), "{lines:?}");
    }
    assert!(
        plain.contains(&"fencing-token-highest: 3".to_owned()),
        "{plain:?}"
    );
    assert!(
        handled.contains(&"fencing-token-highest: 4".to_owned()),
        "{handled:?}"
    );
    assert!(
        handled.contains(&"x-request-id: upstream-id".to_owned()),
        "{handled:?}"
    );
    assert!(
        handled.contains(&"location: /wallets/new".to_owned()),
        "{handled:?}"
    );
}

#[tokio::test]
async fn the_upstreams_keep_alive_limit_is_respected() {
    // Like nginx's keepalive_requests = 2: the second answer says close, then the socket closes.
    let upstream = ScriptedUpstream::start(|mut peer| async move {
        for served in 1..=2 {
            if peer.head().await.is_none() {
                return;
            }
            let answer: &[u8] = if served == 2 {
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            };
            peer.send(answer).await;
        }
    })
    .await;
    let app = app(&upstream, "").await;
    for token in 1..=5 {
        let response = app.put("/wallets/1", token, "x").await;
        assert_eq!(response.status(), 200, "request {token}");
    }
    assert_eq!(upstream.connections(), 3);
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_while_idle_is_replaced_without_an_error() {
    // Node's keep-alive timeout, shortened: one answer, then the idle connection is closed.
    let upstream = ScriptedUpstream::start(|mut peer| async move {
        if let Some(head) = peer.head().await {
            if let Some(length) = header(&head, "content-length") {
                peer.body(length.parse().unwrap()).await;
            }
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let app = app(&upstream, "").await;
    for token in 1..=3 {
        let response = app.put("/wallets/1", token, "x").await;
        assert_eq!(response.status(), 200, "write {token} after an idle close");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(upstream.connections(), 3);
}

/// A raw client request with `Expect: 100-continue`: sends the head, waits for fencegate's
/// `100 Continue` (at most `patience`), then the body. Returns the final answer's status line.
async fn put_expecting_continue(app: &TestApp, token: u64, body: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "PUT /wallets/1 HTTP/1.1\r\nhost: fg\r\nfencing-token: {token}\r\nexpect: 100-continue\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut chunk = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut chunk)).await;
    if let Ok(Ok(read)) = read {
        seen.extend_from_slice(&chunk[..read]);
    }
    if seen.starts_with(b"HTTP/1.1 100") {
        stream.write_all(body.as_bytes()).await.unwrap();
        seen.clear();
        stream.read_to_end(&mut seen).await.unwrap();
    }
    let text = String::from_utf8_lossy(&seen).into_owned();
    text.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn expect_100_continue_holds_the_body_for_the_upstreams_go_ahead() {
    let received = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&received);
    let upstream = ScriptedUpstream::start(move |mut peer| {
        let log = Arc::clone(&log);
        async move {
            let head = peer.head().await.unwrap();
            assert_eq!(header(&head, "expect"), Some("100-continue"));
            peer.send(b"HTTP/1.1 100 Continue\r\n\r\n").await;
            let body = peer.body(5).await;
            *log.lock().unwrap() = body;
            peer.send(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
                .await;
        }
    })
    .await;
    let app = app(&upstream, "").await;
    assert_eq!(
        put_expecting_continue(&app, 1, "hello").await,
        "HTTP/1.1 201 Created"
    );
    assert_eq!(*received.lock().unwrap(), b"hello");
}

#[tokio::test]
async fn a_final_answer_to_expect_100_continue_means_the_body_is_never_sent() {
    let leaked = Arc::new(Mutex::new(0usize));
    let log = Arc::clone(&leaked);
    let upstream = ScriptedUpstream::start(move |mut peer| {
        let log = Arc::clone(&log);
        async move {
            peer.head().await.unwrap();
            peer.send(b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 0\r\n\r\n")
                .await;
            let mut rest = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(2), peer.stream.read_to_end(&mut rest))
                    .await;
            *log.lock().unwrap() = rest.len();
        }
    })
    .await;
    let app = app(&upstream, "in_doubt_grace = \"1s\"").await;
    assert_eq!(
        put_expecting_continue(&app, 1, "hello").await,
        "HTTP/1.1 417 Expectation Failed"
    );
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(
        *leaked.lock().unwrap(),
        0,
        "no body byte reached the upstream"
    );
}

#[tokio::test]
async fn a_slow_loris_upstream_is_cut_off_at_the_upstream_timeout() {
    let upstream = ScriptedUpstream::start(|mut peer| async move {
        peer.head().await;
        if peer.index == 0 {
            // The head, one byte every 300 ms: never complete within the timeout.
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" {
                peer.send(&[*byte]).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        } else {
            // A head at once, then a body that stops.
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst bytes")
                .await;
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    })
    .await;
    let app = app(&upstream, "upstream_timeout = \"1s\"").await;
    let started = Instant::now();
    let response = app.put("/wallets/1", 1, "x").await;
    assert_eq!(response.status(), 504);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    let started = Instant::now();
    let stalled = app.client.get(app.url("/wallets/2")).send().await.unwrap();
    assert_eq!(stalled.status(), 200);
    assert!(
        stalled.bytes().await.is_err(),
        "the stalled body is cut off"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_gibibyte_streams_through_in_constant_memory() {
    const SIZE: u64 = 1 << 30;
    let received = Arc::new(Mutex::new(0u64));
    let log = Arc::clone(&received);
    let upstream = ScriptedUpstream::start(move |mut peer| {
        let log = Arc::clone(&log);
        async move {
            let head = peer.head().await.unwrap();
            let length = header(&head, "content-length").map(|l| l.parse().unwrap());
            *log.lock().unwrap() = match length {
                Some(length) => {
                    peer.discard(length).await;
                    length
                }
                None => peer.chunked_length().await,
            };
            peer.send(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
                .await;
        }
    })
    .await;
    let app = app(&upstream, "max_body = \"2GiB\"\nupstream_timeout = \"60s\"").await;
    let before = peak_rss_kib();
    let block = bytes::Bytes::from(vec![7u8; 1 << 20]);
    let blocks = (0..SIZE >> 20).map(move |_| Ok::<_, std::io::Error>(block.clone()));
    let body = reqwest::Body::wrap_stream(tokio_stream::iter(blocks));
    let response = app
        .client
        .put(app.url("/wallets/1"))
        .header("fencing-token", "1")
        .header("content-length", SIZE.to_string())
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(*received.lock().unwrap(), SIZE);
    let grown = peak_rss_kib().saturating_sub(before);
    assert!(
        grown < 64 * 1024,
        "peak RSS grew by {grown} KiB for a 1 GiB body"
    );
}

/// This process's peak resident set (VmHWM), in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}
