//! TLS on the admin plane (`[admin_tls]`): HTTPS with ALPN, client certificates, certificates
//! swapped on disk or on SIGHUP without a restart, a broken new pair that leaves the old one
//! serving, a handshake that never finishes, and `fencegate fence` speaking HTTPS.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::binary::{Proxy, serve_command, start_serving, write_config};
use common::certs::{Ca, Issued, tls_connect, tls_exchange, tls_get};
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

#[test]
fn check_config_names_the_tls_file_that_does_not_load_and_says_what_each_plane_serves() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "test-ca");
    let server = ca.server(dir.path(), "admin");
    let other = ca.server(dir.path(), "other");
    let check = |cert: &Path, key: &Path| {
        let config = dir.path().join("fg.toml");
        std::fs::write(
            &config,
            format!(
                "[admin_tls]\ncert = {cert:?}\nkey = {key:?}\nclient_ca = {:?}\n\
                 [[routes]]\npath = \"/{{*rest}}\"\nupstream = \"http://127.0.0.1:9\"\nresource = \"r\"\n",
                ca.pem
            ),
        )
        .unwrap();
        Command::new(env!("CARGO_BIN_EXE_fencegate"))
            .arg("check-config")
            .arg(&config)
            .output()
            .unwrap()
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

/// A fenced PUT of `/crash/{id}` with `token`, as raw HTTP/1.1.
fn fenced_put(id: &str, token: u64) -> String {
    format!(
        "PUT /crash/{id} HTTP/1.1\r\nHost: localhost\r\nFencing-Token: {token}\r\n\
         Content-Length: 2\r\nConnection: close\r\n\r\nok"
    )
}

#[tokio::test]
async fn the_data_plane_fences_writes_over_https_and_h2_and_serves_no_plain_http() {
    let upstream = common::RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "test-ca");
    let server = ca.server(dir.path(), "data");
    let db = dir.path().join("fg.db");
    let settings = format!(
        "header_read_timeout = \"500ms\"\n[tls]\ncert = {:?}\nkey = {:?}\n",
        server.cert, server.key
    );
    let config = write_config(&upstream.url(), &db, &settings);
    let proxy = common::binary::start(serve_command(&config, &db)).await;

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
    let tls = tls_connect(proxy.addr, &ca.pem, None, &[b"h2", b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let request = http::Request::put("https://localhost/crash/w")
        .header("fencing-token", "6")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"ok")))
        .unwrap();
    let answer = sender.send_request(request).await.unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["fencing-token-highest"], "6");

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
}
