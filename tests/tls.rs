//! TLS on every hop and who may write: the admin and data planes over HTTPS with ALPN, client
//! certificates, certificates swapped on disk or on SIGHUP without a restart, a broken new pair
//! that leaves the old one serving, handshakes that never finish or are garbage, `fencegate fence`
//! speaking HTTPS, routes' `allow` lists and bearer tokens, and `https://` upstreams verified (a
//! refused certificate is a 502 naming the cause). The peer plane's TLS is in `cluster.rs`.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::binary::{Proxy, serve_command, start_serving, write_config};
use common::certs::{Ca, HttpsUpstream, Issued, tls_connect, tls_exchange, tls_get};
use tokio::io::AsyncReadExt;

/// A server with `[admin_tls]` (`extra` lines after the table: its `client_ca`, or another
/// table), once its admin plane answers `/readyz` over HTTPS (with a client certificate the test
/// CA signed, whenever `extra` is set, for an admin plane that may require one).
async fn start_with_admin_tls(dir: &Path, server: &Issued, ca: &Ca, extra: &str) -> Proxy {
    let settings = format!(
        "header_read_timeout = \"500ms\"\n[admin_tls]\ncert = {:?}\nkey = {:?}\n{extra}\n",
        server.cert, server.key
    );
    let db = dir.join("fg.db");
    let config = write_config("http://127.0.0.1:9", &db, &settings);
    let proxy = start_serving(serve_command(&config, &db)).await;
    let client = (!extra.is_empty()).then(|| ca.client(dir, "ready-check"));
    for _ in 0..200 {
        let seen = tls_get(proxy.admin, &ca.pem, client.as_ref(), &[], "/readyz").await;
        if seen.is_ok_and(|seen| seen.answer.starts_with("HTTP/1.1 200")) {
            return proxy;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the admin plane never answered over HTTPS");
}

fn fence(proxy: &Proxy, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fencegate"))
        .arg("fence")
        .arg("--admin")
        .arg(format!("https://{}", proxy.admin))
        .args(args)
        .env_remove("FENCEGATE_ADMIN_CA")
        .output()
        .unwrap()
}

/// Waits up to `within` for the admin plane to present `expected`.
async fn presents(proxy: &Proxy, ca: &Ca, expected: &Issued, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(seen) = tls_get(proxy.admin, &ca.pem, None, &[], "").await
            && seen.certificate == expected.der
        {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_admin_plane_serves_https_only_with_alpn_and_fence_speaks_it() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "test-ca");
    let server = ca.server(dir.path(), "admin");
    let proxy = start_with_admin_tls(dir.path(), &server, &ca, "").await;

    let h2 = tls_get(proxy.admin, &ca.pem, None, &[b"h2", b"http/1.1"], "")
        .await
        .unwrap();
    assert_eq!(h2.alpn.as_deref(), Some(&b"h2"[..]), "h2 is preferred");
    assert_eq!(h2.certificate, server.der);
    let http1 = tls_get(proxy.admin, &ca.pem, None, &[b"http/1.1"], "/readyz")
        .await
        .unwrap();
    assert_eq!(http1.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert!(http1.answer.starts_with("HTTP/1.1 200"), "{}", http1.answer);

    // Plain HTTP gets no HTTP answer: the plane serves HTTPS only.
    let plain = reqwest::Client::new()
        .get(format!("http://{}/readyz", proxy.admin))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");

    let fenced = fence(
        &proxy,
        &["--admin-ca", server_ca(&ca), "--create", "wallet:1", "7"],
    );
    assert!(
        fenced.status.success(),
        "{}",
        String::from_utf8_lossy(&fenced.stderr)
    );
    assert!(String::from_utf8_lossy(&fenced.stdout).contains("highest token is now 7"));

    // Without the CA the server's certificate is not trusted, and the command says so.
    let untrusted = fence(&proxy, &["--create", "wallet:1", "8"]);
    assert_eq!(untrusted.status.code(), Some(1));
    let said = String::from_utf8_lossy(&untrusted.stderr).to_lowercase();
    assert!(
        said.contains("certificate") && said.contains("issuer"),
        "{said}"
    );
}

fn server_ca(ca: &Ca) -> &str {
    ca.pem.to_str().unwrap()
}

#[tokio::test]
async fn with_client_ca_only_a_client_certificate_that_ca_signed_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "test-ca");
    let server = ca.server(dir.path(), "admin");
    let client_ca = format!("client_ca = {:?}", ca.pem);
    let proxy = start_with_admin_tls(dir.path(), &server, &ca, &client_ca).await;

    let operator = ca.client(dir.path(), "operator");
    let seen = tls_get(proxy.admin, &ca.pem, Some(&operator), &[], "/readyz")
        .await
        .unwrap();
    assert!(seen.answer.starts_with("HTTP/1.1 200"), "{}", seen.answer);

    // No certificate: the handshake (or the first read after it, in TLS 1.3) fails.
    let anonymous = tls_get(proxy.admin, &ca.pem, None, &[], "/readyz").await;
    assert!(
        anonymous.is_err() || anonymous.as_ref().is_ok_and(|s| s.answer.is_empty()),
        "served without a client certificate"
    );
    // A certificate from another CA is refused too.
    let stranger_ca = Ca::new(dir.path(), "stranger-ca");
    let stranger = stranger_ca.client(dir.path(), "stranger");
    let refused = tls_get(proxy.admin, &ca.pem, Some(&stranger), &[], "/readyz").await;
    assert!(
        refused.is_err() || refused.as_ref().is_ok_and(|s| s.answer.is_empty()),
        "served a client certificate of another CA"
    );

    let (cert, key) = (
        operator.cert.to_str().unwrap(),
        operator.key.to_str().unwrap(),
    );
    let fenced = fence(
        &proxy,
        &[
            "--admin-ca",
            server_ca(&ca),
            "--admin-cert",
            cert,
            "--admin-key",
            key,
            "--create",
            "wallet:2",
            "3",
        ],
    );
    assert!(
        fenced.status.success(),
        "{}",
        String::from_utf8_lossy(&fenced.stderr)
    );
}

#[tokio::test]
async fn a_certificate_swapped_on_disk_or_on_sighup_is_served_and_a_broken_one_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "test-ca");
    let first = ca.server(dir.path(), "first");
    let proxy = start_with_admin_tls(dir.path(), &first, &ca, "").await;
    assert!(presents(&proxy, &ca, &first, Duration::ZERO).await);

    // Swapped on disk: served within the check interval, no signal, no restart.
    let second = ca.server(dir.path(), "second");
    replace(&second, &first);
    assert!(
        presents(&proxy, &ca, &second, Duration::from_secs(10)).await,
        "the new certificate was never served"
    );

    // A broken pair (a key that is not the certificate's) is logged and the old one stays.
    let third = ca.server(dir.path(), "third");
    std::fs::copy(&third.cert, &first.cert).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !proxy.logged("do not load") {
        assert!(
            Instant::now() < deadline,
            "the broken pair was not reported"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(presents(&proxy, &ca, &second, Duration::ZERO).await);
    let hangup = |proxy: &Proxy| {
        let sent = Command::new("kill")
            .args(["-HUP", &proxy.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    };
    hangup(&proxy);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(presents(&proxy, &ca, &second, Duration::ZERO).await);

    // Mended and reloaded with SIGHUP: the third pair serves.
    std::fs::copy(&third.key, &first.key).unwrap();
    hangup(&proxy);
    assert!(
        presents(&proxy, &ca, &third, Duration::from_secs(5)).await,
        "SIGHUP did not load the mended pair"
    );
}

/// Overwrites `into`'s files with `from`'s, the key first: a reader between the two writes sees
/// a mismatched pair and must keep the old one.
fn replace(from: &Issued, into: &Issued) {
    std::fs::copy(&from.key, &into.key).unwrap();
    std::fs::copy(&from.cert, &into.cert).unwrap();
}

#[tokio::test]
async fn a_handshake_that_never_finishes_is_cut_off_at_header_read_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "test-ca");
    let server = ca.server(dir.path(), "both");
    // Both planes over TLS, with one certificate.
    let data_tls = format!("[tls]\ncert = {:?}\nkey = {:?}", server.cert, server.key);
    let proxy = start_with_admin_tls(dir.path(), &server, &ca, &data_tls).await;
    for plane in [proxy.admin, proxy.addr] {
        for opening in [
            &b""[..],
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            b"GET / HTTP/1.1\r\n",
        ] {
            let mut tcp = tokio::net::TcpStream::connect(plane).await.unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut tcp, opening)
                .await
                .unwrap();
            let started = Instant::now();
            let mut rest = Vec::new();
            let closed =
                tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await;
            assert!(closed.is_ok(), "{plane} {opening:?}: still open after 5 s");
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "{plane} {opening:?}: closed only after {:?}",
                started.elapsed()
            );
        }
        // The plane still completes handshakes.
        let seen = tls_get(plane, &ca.pem, None, &[], "").await.unwrap();
        assert_eq!(seen.certificate, server.der, "{plane}");
    }
}

/// A server whose data plane serves HTTPS (`[tls]`, a certificate of `ca`) in front of a
/// recording upstream, with this `header_read_timeout`.
struct DataPlaneTls {
    upstream: common::RecordingUpstream,
    dir: tempfile::TempDir,
    ca: Ca,
    server: Issued,
    proxy: Proxy,
}

async fn start_data_plane_tls(header_read_timeout: &str) -> DataPlaneTls {
    let upstream = common::RecordingUpstream::start().await;
    let settings = format!("header_read_timeout = \"{header_read_timeout}\"");
    let TlsPlane {
        dir,
        ca,
        server,
        proxy,
    } = start_tls_plane(&upstream.url(), &settings).await;
    DataPlaneTls {
        upstream,
        dir,
        ca,
        server,
        proxy,
    }
}

/// A server whose data plane serves HTTPS with a certificate of `ca`, in front of `upstream`,
/// with `settings` above its `[tls]` table.
struct TlsPlane {
    dir: tempfile::TempDir,
    ca: Ca,
    server: Issued,
    proxy: Proxy,
}

async fn start_tls_plane(upstream: &str, settings: &str) -> TlsPlane {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "test-ca");
    let server = ca.server(dir.path(), "data");
    let db = dir.path().join("fg.db");
    let settings = format!(
        "{settings}\n[tls]\ncert = {:?}\nkey = {:?}\n",
        server.cert, server.key
    );
    let config = write_config(upstream, &db, &settings);
    let proxy = common::binary::start(serve_command(&config, &db)).await;
    TlsPlane {
        dir,
        ca,
        server,
        proxy,
    }
}

/// An HTTP/2 connection to a TLS data plane at `addr`, whose certificate `ca_pem` signed.
async fn h2_client(
    addr: std::net::SocketAddr,
    ca_pem: &Path,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>> {
    let tls = tls_connect(addr, ca_pem, None, &[b"h2", b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    sender
}

#[tokio::test]
async fn garbage_for_a_client_hello_is_refused_at_once_and_large_records_stream_through() {
    // A long head deadline: a refusal must come from the TLS layer, not from the timeout.
    // The directory is kept: the CA's file is read for every connection.
    let DataPlaneTls {
        upstream,
        dir: _dir,
        ca,
        proxy,
        ..
    } = start_data_plane_tls("30s").await;

    let mut noise = vec![0u8; 4096];
    noise.iter_mut().for_each(|byte| *byte = fastrand::u8(..));
    noise[0] = 0x17; // application data before any handshake
    for opening in [
        noise.clone(),
        // A handshake record longer than TLS allows (2^14 + 2048).
        [&b"\x16\x03\x01\xff\xff"[..], &noise[..]].concat(),
        // A ClientHello whose length runs past its record.
        b"\x16\x03\x01\x00\x08\x01\xff\xff\xff\x03\x03\x00\x00".to_vec(),
        // An SSLv2-style hello.
        b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10".to_vec(),
    ] {
        let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        // The server may close while the garbage is still being written.
        let _ = tokio::io::AsyncWriteExt::write_all(&mut tcp, &opening).await;
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(2), tcp.read_to_end(&mut rest)).await;
        assert!(
            closed.is_ok(),
            "{:?}: the connection stayed open",
            &opening[..8]
        );
        assert!(
            !String::from_utf8_lossy(&rest).contains("HTTP/"),
            "garbage got an HTTP answer"
        );
    }

    // A body of 4 MiB crosses in full-size TLS records, and the plane still serves.
    let body = "x".repeat(4 << 20);
    let request = format!(
        "PUT /crash/big HTTP/1.1\r\nHost: localhost\r\nFencing-Token: 1\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let seen = tls_exchange(proxy.addr, &ca.pem, None, &[b"http/1.1"], &request)
        .await
        .unwrap();
    assert!(seen.answer.starts_with("HTTP/1.1 200"), "{}", seen.answer);
    let arrivals = upstream.arrivals();
    assert_eq!(arrivals.len(), 1);
    assert_eq!(arrivals[0].body.len(), 4 << 20);
}

#[test]
fn check_config_names_the_tls_file_that_does_not_load_and_says_what_each_plane_serves() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "test-ca");
    let server = ca.server(dir.path(), "admin");
    let other = ca.server(dir.path(), "other");
    let check = |cert: &Path, key: &Path| {
        check_config(
            dir.path(),
            &format!(
                "[admin_tls]\ncert = {cert:?}\nkey = {key:?}\nclient_ca = {:?}\n\
                 [[routes]]\npath = \"/{{*rest}}\"\nupstream = \"http://127.0.0.1:9\"\nresource = \"r\"\n",
                ca.pem
            ),
        )
    };
    let good = check(&server.cert, &server.key);
    assert!(good.status.success());
    let described = String::from_utf8_lossy(&good.stdout);
    assert!(
        described.contains("HTTPS with") && described.contains("client certificates from"),
        "{described}"
    );
    let missing = check(&server.cert, &dir.path().join("nowhere.key"));
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nowhere.key"));
    let mismatched = check(&server.cert, &other.key);
    assert!(!mismatched.status.success());
    assert!(
        String::from_utf8_lossy(&mismatched.stderr).contains("does not belong"),
        "{}",
        String::from_utf8_lossy(&mismatched.stderr)
    );
}

/// What `fencegate check-config` says of a config file holding `text`, written in `dir`.
fn check_config(dir: &Path, text: &str) -> std::process::Output {
    let config = dir.join("fg.toml");
    std::fs::write(&config, text).unwrap();
    Command::new(env!("CARGO_BIN_EXE_fencegate"))
        .arg("check-config")
        .arg(&config)
        .output()
        .unwrap()
}

/// A fenced PUT of `/crash/{id}` with `token`, as raw HTTP/1.1.
fn fenced_put(id: &str, token: u64) -> String {
    format!(
        "PUT /crash/{id} HTTP/1.1\r\nHost: localhost\r\nFencing-Token: {token}\r\n\
         Content-Length: 2\r\nConnection: close\r\n\r\nok"
    )
}

#[tokio::test]
async fn the_data_plane_fences_writes_over_https_and_h2_and_serves_no_plain_http() {
    let DataPlaneTls {
        upstream,
        dir,
        ca,
        server,
        proxy,
    } = start_data_plane_tls("500ms").await;

    let put = |token| {
        let request = fenced_put("w", token);
        let ca = ca.pem.clone();
        async move {
            tls_exchange(proxy.addr, &ca, None, &[b"http/1.1"], &request)
                .await
                .unwrap()
        }
    };
    let new = put(5).await;
    assert_eq!(new.certificate, server.der);
    assert!(new.answer.starts_with("HTTP/1.1 200"), "{}", new.answer);
    // hyper's server writes the upstream's headers too, which the plain path keeps verbatim.
    let answer = new.answer.to_lowercase();
    assert!(answer.contains("x-upstream: recording"), "{answer}");
    assert!(!answer.contains("x-upstream-hop"), "{answer}");
    let zombie = put(4).await;
    assert!(
        zombie.answer.starts_with("HTTP/1.1 409"),
        "{}",
        zombie.answer
    );
    assert!(
        zombie
            .answer
            .to_lowercase()
            .contains("fencing-token-highest: 5"),
        "{}",
        zombie.answer
    );

    // h2, as ALPN chose it.
    let mut sender = h2_client(proxy.addr, &ca.pem).await;
    let request = http::Request::put("https://localhost/crash/w")
        .header("fencing-token", "6")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"ok")))
        .unwrap();
    let answer = sender.send_request(request).await.unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["fencing-token-highest"], "6");
    assert_eq!(answer.headers()["x-upstream"], "recording");
    assert!(!answer.headers().contains_key("x-upstream-hop"));

    // Plain HTTP gets no HTTP answer, and the zombie's write never reached the storage.
    let plain = reqwest::Client::new()
        .put(format!("http://{}/crash/w", proxy.addr))
        .header("Fencing-Token", "7")
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");
    let tokens: Vec<_> = upstream
        .arrivals()
        .iter()
        .map(|arrival| arrival.token)
        .collect();
    assert_eq!(tokens, vec![Some(5), Some(6)]);

    // A renewed certificate written over the old one is served without a signal.
    let renewed = ca.server(dir.path(), "data-renewed");
    replace(&renewed, &server);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = tls_get(proxy.addr, &ca.pem, None, &[], "").await.unwrap();
        if seen.certificate == renewed.der {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the data plane never served the renewed certificate"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A server on `upstream` whose data plane requires client certificates from `ca`, with a route
/// `/wallets/{id}` that only the wallet leader (by URI SAN) and the billing leader (by CN) may
/// write, a route `/open/{id}` anyone with a certificate may, and an etcd route only the wallet
/// leader may write.
async fn start_with_allow_list(dir: &Path, upstream: &str, ca: &Ca) -> (Proxy, std::path::PathBuf) {
    let server = ca.server(dir, "data");
    let db = dir.join("fg.db");
    let config = dir.join("fg.toml");
    std::fs::write(
        &config,
        format!(
            "[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n\
             [[routes]]\npath = \"/wallets/{{id}}\"\nupstream = \"{upstream}\"\nresource = \"wallet:{{id}}\"\n\
             allow = [\"spiffe://prod/wallet-leader\", \"CN=billing-leader\"]\n\
             [[routes]]\npath = \"/open/{{id}}\"\nupstream = \"{upstream}\"\nresource = \"open:{{id}}\"\n\
             [[routes]]\npath = \"/v3/{{*rest}}\"\nupstream = \"{upstream}\"\nprofile = \"etcd-v3\"\n\
             resource = \"etcd:{{key}}\"\nallow = [\"spiffe://prod/wallet-leader\"]\n",
            server.cert, server.key, ca.pem
        ),
    )
    .unwrap();
    (common::binary::start(serve_command(&config, &db)).await, db)
}

/// The answer to `request` sent over HTTPS with `client`'s certificate; empty if refused.
async fn send_as(proxy: &Proxy, ca: &Ca, client: &Issued, request: String) -> String {
    tls_exchange(proxy.addr, &ca.pem, Some(client), &[b"http/1.1"], &request)
        .await
        .map(|seen| seen.answer)
        .unwrap_or_default()
}

#[tokio::test]
async fn only_the_leaders_a_route_allows_may_write_and_anyone_else_is_refused_and_audited() {
    let upstream = common::RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "leaders-ca");
    let (proxy, db) = start_with_allow_list(dir.path(), &upstream.url(), &ca).await;
    let leader = ca.workload(dir.path(), "wallet-leader", "spiffe://prod/wallet-leader");
    let billing = ca.client(dir.path(), "billing-leader");
    let intruder = ca.workload(dir.path(), "batch-job", "spiffe://prod/batch-job");
    let send = |client, request: String| send_as(&proxy, &ca, client, request);
    let put = |path: &str, token: u64| {
        format!(
            "PUT {path} HTTP/1.1\r\nHost: localhost\r\nFencing-Token: {token}\r\n\
             Content-Length: 2\r\nConnection: close\r\n\r\nok"
        )
    };

    let by_uri = send(&leader, put("/wallets/1", 5)).await;
    assert!(by_uri.starts_with("HTTP/1.1 200"), "{by_uri}");
    let by_cn = send(&billing, put("/wallets/1", 5)).await;
    assert!(by_cn.starts_with("HTTP/1.1 200"), "{by_cn}");

    // A client the CA signed but the route does not name: 403, whatever its token, and the
    // highest token stays where the leaders put it.
    let forbidden = send(&intruder, put("/wallets/1", 9)).await;
    assert!(forbidden.starts_with("HTTP/1.1 403"), "{forbidden}");
    assert!(
        forbidden.contains("application/problem+json"),
        "{forbidden}"
    );
    assert!(forbidden.contains("forbidden"), "{forbidden}");
    assert!(
        forbidden
            .to_lowercase()
            .contains("fencing-token-highest: 5"),
        "{forbidden}"
    );
    assert!(forbidden.contains("spiffe://prod/batch-job"), "{forbidden}");
    // A malformed request is refused as such first (400 before 403, as the contract orders).
    let malformed = send(
        &intruder,
        put("/wallets/1", 9).replace("Host:", "X-HTTP-Method-Override: DELETE\r\nHost:"),
    )
    .await;
    assert!(malformed.starts_with("HTTP/1.1 400"), "{malformed}");
    let still_leader = send(&leader, put("/wallets/1", 5)).await;
    assert!(still_leader.starts_with("HTTP/1.1 200"), "{still_leader}");

    // It may read, and write where no allow list applies.
    let read = send(
        &intruder,
        "GET /wallets/1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".to_owned(),
    )
    .await;
    assert!(read.starts_with("HTTP/1.1 200"), "{read}");
    let open = send(&intruder, put("/open/1", 1)).await;
    assert!(open.starts_with("HTTP/1.1 200"), "{open}");

    // The leader's own stale write is audited with its identity too.
    let stale = send(&leader, put("/wallets/1", 4)).await;
    assert!(stale.starts_with("HTTP/1.1 409"), "{stale}");

    // Through a storage profile: a put names its key's resource, and a range delete cannot be
    // attributed; either way the intruder is refused as forbidden first.
    let etcd = |call: &str| {
        let (endpoint, body) = call.split_once(' ').unwrap();
        format!(
            "POST /v3/kv/{endpoint} HTTP/1.1\r\nHost: localhost\r\nFencing-Token: 3\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len(),
        )
    };
    let etcd_put = r#"put {"key":"L2E=","value":"MQ=="}"#;
    let etcd_sweep = r#"deleterange {"key":"AA==","range_end":"AA=="}"#;
    let leader_put = send(&leader, etcd(etcd_put)).await;
    assert!(leader_put.starts_with("HTTP/1.1 200"), "{leader_put}");
    let intruder_put = send(&intruder, etcd(etcd_put)).await;
    assert!(intruder_put.starts_with("HTTP/1.1 403"), "{intruder_put}");
    let intruder_sweep = send(&intruder, etcd(etcd_sweep)).await;
    assert!(
        intruder_sweep.starts_with("HTTP/1.1 403"),
        "{intruder_sweep}"
    );
    let leader_sweep = send(&leader, etcd(etcd_sweep)).await;
    assert!(leader_sweep.starts_with("HTTP/1.1 422"), "{leader_sweep}");

    // Without a certificate there is no TLS session to send anything on.
    let anonymous = tls_exchange(proxy.addr, &ca.pem, None, &[], &put("/wallets/1", 9)).await;
    assert!(
        anonymous.is_err() || anonymous.as_ref().is_ok_and(|s| s.answer.is_empty()),
        "served without a client certificate"
    );

    let writes: Vec<(String, Option<u64>)> = upstream
        .arrivals()
        .iter()
        .filter(|arrival| arrival.method != "GET")
        .map(|arrival| (arrival.target.clone(), arrival.token))
        .collect();
    assert_eq!(
        writes,
        [
            ("/wallets/1".to_owned(), Some(5)),
            ("/wallets/1".to_owned(), Some(5)),
            ("/wallets/1".to_owned(), Some(5)),
            ("/open/1".to_owned(), Some(1)),
            ("/v3/kv/put".to_owned(), Some(3)),
        ]
    );

    let rejections: serde_json::Value = reqwest::get(format!(
        "http://{}/v1/rejections?resource=wallet:1",
        proxy.admin
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let rows = rejections["rejections"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{rejections}");
    assert_eq!(rows[0]["reason"], "stale");
    assert_eq!(
        rows[0]["identity"],
        "spiffe://prod/wallet-leader, CN=wallet-leader"
    );
    assert_eq!(rows[1]["reason"], "forbidden");
    assert_eq!(rows[1]["identity"], "spiffe://prod/batch-job, CN=batch-job");
    assert_eq!(rows[1]["token"], 9);
    assert_eq!(rows[1]["highest"], 5);

    let forbidden_etcd: serde_json::Value = reqwest::get(format!(
        "http://{}/v1/rejections?reason=forbidden&resource=etcd:/a",
        proxy.admin
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(
        forbidden_etcd["rejections"].as_array().unwrap().len(),
        1,
        "{forbidden_etcd}"
    );

    let audit = Command::new(env!("CARGO_BIN_EXE_fencegate"))
        .args(["audit", "--reason", "forbidden", "--format", "csv", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    let csv = String::from_utf8_lossy(&audit.stdout);
    assert!(
        csv.starts_with(
            "id,at,resource,reason,token,highest,method,client,request_id,path,identity\n"
        ),
        "{csv}"
    );
    assert!(
        csv.contains(",/wallets/1,\"spiffe://prod/batch-job, CN=batch-job\""),
        "{csv}"
    );
    assert!(
        proxy.logged("identity=\"spiffe://prod/batch-job, CN=batch-job\""),
        "the rejection's log line names the client"
    );
}

#[test]
fn an_allow_list_without_client_certificates_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "test-ca");
    let server = ca.server(dir.path(), "data");
    let check = |tls: &str| {
        check_config(
            dir.path(),
            &format!(
                "{tls}\n[[routes]]\npath = \"/w/{{id}}\"\nupstream = \"http://127.0.0.1:9\"\n\
                 resource = \"w:{{id}}\"\nallow = [\"CN=leader\"]\n"
            ),
        )
    };
    let tls = format!("[tls]\ncert = {:?}\nkey = {:?}\n", server.cert, server.key);
    for without_client_ca in ["", tls.as_str()] {
        let refused = check(without_client_ca);
        assert!(!refused.status.success());
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            stderr.contains("routes[0].allow") && stderr.contains("client_ca"),
            "{stderr}"
        );
    }
    let with_client_ca = check(&format!("{tls}client_ca = {:?}\n", ca.pem));
    assert!(
        with_client_ca.status.success(),
        "{}",
        String::from_utf8_lossy(&with_client_ca.stderr)
    );
}

#[tokio::test]
async fn an_https_upstream_is_verified_and_a_refused_certificate_is_a_502_naming_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let storage_ca = Ca::new(dir.path(), "storage-ca");
    let good = HttpsUpstream::start(&storage_ca.server(dir.path(), "good"), None).await;
    let expired =
        HttpsUpstream::start(&storage_ca.expired_server(dir.path(), "expired"), None).await;
    let elsewhere = HttpsUpstream::start(
        &storage_ca.server_named(dir.path(), "elsewhere", "storage.elsewhere"),
        None,
    )
    .await;
    let leaders_ca = Ca::new(dir.path(), "fencegate-ca");
    let mtls = HttpsUpstream::start(
        &storage_ca.server(dir.path(), "mtls"),
        Some(&leaders_ca.pem),
    )
    .await;
    let fencegate = leaders_ca.client(dir.path(), "fencegate");
    let route = |name: &str, upstream: String, extra: String| {
        format!(
            "[[routes]]\npath = \"/{name}/{{id}}\"\nupstream = \"{upstream}\"\nresource = \"{name}:{{id}}\"\n{extra}"
        )
    };
    let ca = format!("upstream_ca = {:?}\n", storage_ca.pem);
    let client_cert = format!(
        "upstream_cert = {:?}\nupstream_key = {:?}\n",
        fencegate.cert, fencegate.key
    );
    let routes = [
        route("good", good.url("localhost"), ca.clone()),
        route("untrusted", good.url("localhost"), String::new()),
        route("expired", expired.url("localhost"), ca.clone()),
        route("misnamed", elsewhere.url("127.0.0.1"), ca.clone()),
        route("mtls", mtls.url("localhost"), format!("{ca}{client_cert}")),
        route("anonymous", mtls.url("localhost"), ca.clone()),
    ]
    .concat();
    let db = dir.path().join("fg.db");
    let config = dir.path().join("fg.toml");
    std::fs::write(&config, &routes).unwrap();
    let proxy = common::binary::start(serve_command(&config, &db)).await;
    let client = reqwest::Client::new();
    let put = |path: &str, token: u64| {
        client
            .put(format!("http://{}{path}", proxy.addr))
            .header("Fencing-Token", token.to_string())
            .body("ok")
            .send()
    };

    for token in [1, 2, 2] {
        let stored = put("/good/1", token).await.unwrap();
        assert_eq!(stored.status(), 200);
        assert_eq!(stored.text().await.unwrap(), "stored");
    }
    assert_eq!(
        good.tokens(),
        [Some("1".into()), Some("2".into()), Some("2".into())]
    );
    assert_eq!(
        good.connections.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the TLS connection is kept alive and reused"
    );
    assert!(
        good.seen
            .lock()
            .unwrap()
            .iter()
            .all(|arrived| arrived.sni.as_deref() == Some("localhost")
                && arrived.version == http::Version::HTTP_11),
        "SNI names the upstream URL's host"
    );

    for (path, cause) in [
        ("/untrusted/1", "unknown issuer"),
        ("/expired/1", "expired"),
        ("/misnamed/1", "does not name the host"),
        ("/anonymous/1", "client certificate"),
    ] {
        let refused = put(path, 1).await.unwrap();
        assert_eq!(refused.status(), 502, "{path}");
        let problem = common::problem(refused).await;
        assert_eq!(problem["type"], "urn:fencegate:problem:upstream-tls");
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.contains(cause), "{path}: {detail}");
    }
    // Nothing reached the storage behind a refused certificate, and a refused handshake sent
    // nothing, so the next token is not held back for the in-doubt grace.
    assert!(expired.tokens().is_empty() && elsewhere.tokens().is_empty());
    let after = tokio::time::timeout(Duration::from_secs(2), put("/expired/1", 2))
        .await
        .expect("a handshake failure leaves nothing in doubt")
        .unwrap();
    assert_eq!(after.status(), 502);

    let with_certificate = put("/mtls/1", 3).await.unwrap();
    assert_eq!(with_certificate.status(), 200);
    assert_eq!(mtls.tokens(), [Some("3".into())]);
}

#[test]
fn upstream_tls_files_are_checked_when_the_config_loads() {
    let dir = tempfile::tempdir().unwrap();
    let check = |upstream: &str, extra: &str| {
        let out = check_config(
            dir.path(),
            &format!(
                "[[routes]]\npath = \"/w/{{id}}\"\nupstream = \"{upstream}\"\nresource = \"w:{{id}}\"\n{extra}"
            ),
        );
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stderr) = check("https://storage.internal:8443", "");
    assert!(ok, "{stderr}");
    let (ok, stderr) = check("http://127.0.0.1:9", "upstream_ca = \"/etc/hosts\"\n");
    assert!(
        !ok && stderr.contains("routes[0].upstream_ca") && stderr.contains("http://"),
        "{stderr}"
    );
    let (ok, stderr) = check(
        "https://storage.internal",
        "upstream_ca = \"/nowhere/ca.pem\"\n",
    );
    assert!(!ok && stderr.contains("/nowhere/ca.pem"), "{stderr}");
    let (ok, stderr) = check(
        "https://storage.internal",
        "upstream_cert = \"/etc/hosts\"\n",
    );
    assert!(!ok && stderr.contains("routes[0].upstream_key"), "{stderr}");
}

/// `printf %s leader-secret | sha256sum`: the digest an operator puts in the config.
const LEADER_SECRET_SHA256: &str =
    "e0aa1af1ca30898fa9196b18eebfdbc6501d87ed33ecd3a4f5f47f29a8e6eae6";

#[tokio::test]
async fn without_mtls_a_route_may_require_a_bearer_token_which_never_reaches_the_storage() {
    let upstream = common::RecordingUpstream::start().await;
    let app = common::TestApp::spawn(&format!(
        "[[routes]]\npath = \"/wallets/{{id}}\"\nupstream = \"{}\"\nresource = \"wallet:{{id}}\"\n\
         allow_bearer_sha256 = [\"{LEADER_SECRET_SHA256}\"]\n",
        upstream.url()
    ))
    .await;
    let put = |token: u64, authorization: Option<&str>| {
        let mut request = app
            .client
            .put(app.url("/wallets/1"))
            .header("Fencing-Token", token.to_string())
            .body("100");
        if let Some(authorization) = authorization {
            request = request.header("Authorization", authorization);
        }
        request.send()
    };
    let stored = put(5, Some("Bearer leader-secret")).await.unwrap();
    assert_eq!(stored.status(), 200);
    for refused in [
        None,
        Some("Bearer guess"),
        Some("Basic bGVhZGVyLXNlY3JldA=="),
    ] {
        let answer = put(9, refused).await.unwrap();
        assert_eq!(answer.status(), 403, "{refused:?}");
        assert_eq!(answer.headers()["fencing-token-highest"], "5");
        let problem = common::problem(answer).await;
        assert_eq!(problem["type"], "urn:fencegate:problem:forbidden");
    }
    // The leader still writes at 5: nobody's refused 9 raised anything. Reads need no token.
    assert_eq!(
        put(5, Some("Bearer leader-secret")).await.unwrap().status(),
        200
    );
    let read = app.client.get(app.url("/wallets/1")).send().await.unwrap();
    assert_eq!(read.status(), 200);

    let arrivals = upstream.arrivals();
    assert_eq!(arrivals.len(), 3);
    assert!(
        arrivals
            .iter()
            .all(|a| !a.headers.contains_key("authorization")),
        "the bearer token is fencegate's, never the storage's"
    );
    let reasons: Vec<String> = app.rejections().into_iter().map(|r| r.0).collect();
    assert_eq!(reasons, ["forbidden", "forbidden", "forbidden"]);
    app.stop().await;
}

#[test]
fn bearer_digests_are_checked_and_refused_where_s3_signs_the_authorization_header() {
    let dir = tempfile::tempdir().unwrap();
    let check = |extra: &str| {
        let out = check_config(
            dir.path(),
            &format!(
                "[[routes]]\npath = \"/w/{{*rest}}\"\nupstream = \"http://127.0.0.1:9\"\n{extra}"
            ),
        );
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stdout, stderr) = check(&format!(
        "resource = \"w\"\nallow_bearer_sha256 = [\"{LEADER_SECRET_SHA256}\"]\n"
    ));
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("written only by holders of an allowed bearer token"),
        "{stdout}"
    );
    assert!(
        stdout.contains("warning:") && stdout.contains("clear text"),
        "{stdout}"
    );
    let (ok, _, stderr) = check("resource = \"w\"\nallow_bearer_sha256 = [\"leader-secret\"]\n");
    assert!(
        !ok && stderr.contains("routes[0].allow_bearer_sha256") && stderr.contains("sha256sum"),
        "{stderr}"
    );
    let (ok, _, stderr) = check(&format!(
        "resource = \"s3:{{bucket}}/{{key}}\"\nprofile = \"s3\"\nallow_bearer_sha256 = [\"{LEADER_SECRET_SHA256}\"]\n"
    ));
    assert!(!ok && stderr.contains("s3 profile"), "{stderr}");
}

#[tokio::test]
async fn an_upstream_that_chooses_h2_gets_http2_and_tokens_still_never_go_back() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "storage-ca");
    let storage = HttpsUpstream::start_with(
        &ca.server(dir.path(), "h2-storage"),
        None,
        true,
        Duration::from_millis(15),
    )
    .await;
    let config = dir.path().join("fg.toml");
    std::fs::write(
        &config,
        format!(
            "max_body = 2097152\n[[routes]]\npath = \"/w/{{id}}\"\nupstream = \"{}\"\n\
             resource = \"w:{{id}}\"\nupstream_ca = {:?}\n",
            storage.url("localhost"),
            ca.pem
        ),
    )
    .unwrap();
    let db = dir.path().join("fg.db");
    let proxy = common::binary::start(serve_command(&config, &db)).await;
    let client = reqwest::Client::new();
    let url = format!("http://{}/w/1", proxy.addr);
    let put = |token: u64, body: Vec<u8>| {
        client
            .put(&url)
            .header("Fencing-Token", token.to_string())
            .body(body)
            .send()
    };

    // A storm: tokens mostly rising, old leaders mixed in, all in flight at once.
    let mut writers = tokio::task::JoinSet::new();
    for n in 0..120u64 {
        let token = (n / 10 + 1).saturating_sub(fastrand::u64(0..=2)).max(1);
        let sent = put(token, b"x".to_vec());
        writers.spawn(async move { (token, sent.await.unwrap().status().as_u16()) });
    }
    let mut accepted = Vec::new();
    for (token, status) in writers.join_all().await {
        assert!(matches!(status, 200 | 409), "token {token}: {status}");
        if status == 200 {
            accepted.push(token);
        }
    }
    let seen = storage.seen.lock().unwrap().clone();
    assert!(
        seen.iter().all(|a| a.version == http::Version::HTTP_2),
        "{seen:?}"
    );
    assert!(seen.iter().all(|a| {
        a.authority
            .as_deref()
            .is_some_and(|h| h.starts_with("localhost:"))
    }));
    let tokens: Vec<u64> = seen
        .iter()
        .map(|a| a.token.as_deref().unwrap().parse().unwrap())
        .collect();
    assert!(
        tokens.windows(2).all(|w| w[0] <= w[1]),
        "the storage saw a token go back: {tokens:?}"
    );
    accepted.sort_unstable();
    let mut sorted = tokens.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted, accepted,
        "the storage saw exactly the accepted writes"
    );
    assert!(accepted.len() < 120, "the storm had zombies in it");

    // Bodies stream over HTTP/2 in full, and the body limit holds.
    let highest = *tokens.last().unwrap();
    let big = put(highest, vec![b'y'; 1 << 20]).await.unwrap();
    assert_eq!(big.status(), 200);
    assert_eq!(
        storage.seen.lock().unwrap().last().unwrap().body_len,
        1 << 20
    );
    let too_big = client
        .put(&url)
        .header("Fencing-Token", highest.to_string())
        .body(reqwest::Body::wrap_stream(tokio_stream::iter(
            (0..3).map(|_| Ok::<_, std::io::Error>(vec![b'z'; 1 << 20])),
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(too_big.status(), 413);
    // One HTTP/2 connection per data-plane thread at most, not one per request.
    assert!(
        storage
            .connections
            .load(std::sync::atomic::Ordering::SeqCst)
            <= 4
    );
}

/// An HTTP/2 client uploading to a storage that answers before it has read the body (nginx's
/// `return 200`) gets its answer at once, and the rest of the body still reaches the storage: the
/// h2 stream stays open for it and its flow-control window keeps being granted.
/// (curl 7.88 busy-loops in this exchange against any h2 server, nginx's own included; a
/// conforming client such as hyper's or nghttp2's does not.)
#[tokio::test]
async fn an_h2_upload_answered_early_by_the_storage_is_answered_and_still_delivered_whole() {
    const LENGTH: usize = 4 * 1024 * 1024;
    let (delivered_tx, delivered) = tokio::sync::oneshot::channel();
    let delivered_tx = std::sync::Arc::new(std::sync::Mutex::new(Some(delivered_tx)));
    let storage = common::scripted::ScriptedUpstream::start(move |mut peer| {
        let delivered_tx = std::sync::Arc::clone(&delivered_tx);
        async move {
            let Some(head) = peer.head().await else {
                return;
            };
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nearly")
                .await;
            let length = common::scripted::header(&head, "content-length")
                .map(|length| length.parse().unwrap());
            let body = match length {
                Some(length) => peer.body(length).await,
                None => peer.chunked().await,
            };
            if let Some(tx) = delivered_tx.lock().unwrap().take() {
                let _ = tx.send(body.len());
            }
        }
    })
    .await;
    let TlsPlane {
        dir: _dir,
        ca,
        proxy,
        ..
    } = start_tls_plane(&storage.url(), "upstream_timeout = \"20s\"").await;
    let mut sender = h2_client(proxy.addr, &ca.pem).await;
    let request = http::Request::put("https://localhost/crash/big")
        .header("fencing-token", "1")
        .header("content-length", LENGTH.to_string())
        .body(http_body_util::Full::new(bytes::Bytes::from(vec![
            7u8;
            LENGTH
        ])))
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .expect("answered before the storage read the body")
        .unwrap();
    assert_eq!(answer.status(), 200);
    let body = http_body_util::BodyExt::collect(answer.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(&body[..], b"early");
    let delivered = tokio::time::timeout(Duration::from_secs(10), delivered)
        .await
        .expect("the rest of the body reached the storage well before the upstream timeout")
        .unwrap();
    assert_eq!(delivered, LENGTH);
}
