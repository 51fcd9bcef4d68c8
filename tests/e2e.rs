//! End to end against real storage that nobody here wrote: nginx's WebDAV module, etcd's JSON
//! gateway, PouchDB Server (the CouchDB API) and s3s-fs (S3, checking SigV4, driven by boto3);
//! and the docs' token recipes against the lock services they name (etcd, ZooKeeper).
//! All are opt-in: `cargo test` skips them (they are `#[ignore]`), and
//! `cargo test --test e2e -- --ignored` runs them. A server that is not installed is skipped with a
//! loud message on stderr, unless `FENCEGATE_E2E_REQUIRED` is set (as in CI), when it fails.
//! `.ci/run` installs them all (`apt-get install nginx etcd-server`, `npm install -g
//! pouchdb-server`, `cargo install s3s-fs@0.14.1 --features binary --locked`, `pip install boto3`,
//! `apt-get install zookeeper`, `pip install kazoo requests`).

mod common;

use std::collections::HashMap;
use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::TestApp;
use serde_json::{Value, json};

/// A server process that is killed when the test ends, however it ends.
struct Server {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The installed `binary`, or `None` after saying loudly that the test is skipped; `install` is
/// how to install it.
fn installed(binary: &str, install: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let cargo_bin = std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo/bin"));
    let found = std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .chain(cargo_bin)
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_file());
    if found.is_none() {
        let message = format!(
            "SKIPPED: `{binary}` is not installed, so this end-to-end test did not run. \
             Install it with `{install}`."
        );
        assert!(
            std::env::var_os("FENCEGATE_E2E_REQUIRED").is_none(),
            "{message} (FENCEGATE_E2E_REQUIRED is set)"
        );
        // Written to the real stderr, not through the test harness, which would swallow it.
        let _ = writeln!(
            std::io::stderr(),
            "\n{}\n{message}\n{}\n",
            "!".repeat(72),
            "!".repeat(72)
        );
    }
    found
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_until_listening(addr: SocketAddr, child: &mut Child, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{name} exited with {status} before listening");
        }
        assert!(Instant::now() < deadline, "{name} did not listen on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `command` (its output dropped) as the server `name`, and waits until it listens on
/// `addr`; the server owns `dir` for as long as it runs.
fn spawn_server(
    mut command: Command,
    addr: SocketAddr,
    dir: tempfile::TempDir,
    name: &str,
) -> Server {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until_listening(addr, &mut child, name);
    Server {
        child,
        addr,
        _dir: dir,
    }
}

/// nginx with WebDAV PUT on a temporary root; its access log records each request's token.
fn start_nginx(binary: &Path) -> Server {
    start_nginx_with(binary, tempfile::tempdir().unwrap(), "")
}

/// The same nginx serving HTTPS only, with `server` (which must be in `dir`, since nginx runs
/// there) as its certificate.
fn start_nginx_https(
    binary: &Path,
    dir: tempfile::TempDir,
    server: &common::certs::Issued,
    h2: bool,
) -> Server {
    let tls = format!(
        " ssl{};\n        ssl_certificate {};\n        ssl_certificate_key {}",
        if h2 { " http2" } else { "" },
        server.cert.display(),
        server.key.display()
    );
    start_nginx_with(binary, dir, &tls)
}

/// nginx in `dir`, `listen_extra` appended to its `listen` directive (before the semicolon).
fn start_nginx_with(binary: &Path, dir: tempfile::TempDir, listen_extra: &str) -> Server {
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let d = dir.path().display();
    let config = format!(
        r#"
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format fence '$request_method $uri $http_fencing_token $status $server_protocol';
    access_log {d}/access.log fence;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen {addr}{listen_extra};
        root {d}/root;
        location / {{
            dav_methods PUT DELETE MKCOL COPY MOVE;
            create_full_put_path on;
        }}
    }}
}}
"#
    );
    let conf = dir.path().join("nginx.conf");
    std::fs::write(&conf, config).unwrap();
    let mut command = Command::new(binary);
    command
        .arg("-p")
        .arg(dir.path())
        .arg("-e")
        .arg(dir.path().join("error.log"))
        .arg("-c")
        .arg(&conf);
    spawn_server(command, addr, dir, "nginx")
}

/// A one-member etcd cluster on free ports with a temporary data directory.
fn start_etcd(binary: &Path) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let client: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let peer = format!("http://127.0.0.1:{}", free_port());
    let mut command = Command::new(binary);
    command
        .args(["--name", "e2e", "--data-dir"])
        .arg(dir.path().join("data"))
        .args(["--listen-client-urls", &format!("http://{client}")])
        .args(["--advertise-client-urls", &format!("http://{client}")])
        .args(["--listen-peer-urls", &peer])
        .args(["--initial-advertise-peer-urls", &peer])
        .args(["--initial-cluster", &format!("e2e={peer}")]);
    spawn_server(command, client, dir, "etcd")
}

/// One line of nginx's access log: (method, uri, token, status).
fn nginx_log(server: &Server) -> Vec<(String, String, Option<u64>, u16)> {
    let text = std::fs::read_to_string(server._dir.path().join("access.log")).unwrap_or_default();
    text.lines()
        .map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            (
                fields[0].to_owned(),
                fields[1].to_owned(),
                fields[2].parse().ok(),
                fields[3].parse().unwrap(),
            )
        })
        .collect()
}

fn webdav_routes(nginx: &Server) -> String {
    format!(
        "[[routes]]\npath = \"/files/{{*path}}\"\nupstream = \"http://{}\"\nresource = \"file:{{path}}\"\n",
        nginx.addr
    )
}

#[tokio::test]
#[ignore = "needs nginx; run with --ignored"]
async fn nginx_webdav_wallet_story() {
    let Some(binary) = installed("nginx", "apt-get install nginx") else {
        return;
    };
    let nginx = start_nginx(&binary);
    let app = TestApp::spawn(&webdav_routes(&nginx)).await;
    // fencegate forwards the path unchanged, so nginx stores it under its root as is.
    let on_disk = nginx._dir.path().join("root/files/wallets/1");

    let opening = app.put("/files/wallets/1", 1, "100").await;
    assert_eq!(opening.status(), 201, "nginx creates the file");
    let new_leader = app.put("/files/wallets/1", 2, "120").await;
    assert_eq!(new_leader.status(), 204, "nginx overwrites it");
    let zombie = app.put("/files/wallets/1", 1, "150").await;
    assert_eq!(zombie.status(), 409);
    assert_eq!(zombie.headers()["fencing-token-highest"], "2");

    assert_eq!(std::fs::read_to_string(&on_disk).unwrap(), "120");
    let reasons: Vec<String> = app.rejections().into_iter().map(|r| r.0).collect();
    assert_eq!(reasons, ["stale"]);
    let tokens: Vec<Option<u64>> = nginx_log(&nginx).into_iter().map(|l| l.2).collect();
    assert_eq!(
        tokens,
        [Some(1), Some(2)],
        "the zombie's write never reached nginx"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nginx; run with --ignored"]
async fn nginx_webdav_storm_of_old_and_new_writers() {
    let Some(binary) = installed("nginx", "apt-get install nginx") else {
        return;
    };
    let nginx = start_nginx(&binary);
    let app = Arc::new(TestApp::spawn(&webdav_routes(&nginx)).await);
    let files = ["a", "b", "c", "d"];
    let mut writers = Vec::new();
    for (f, file) in files.iter().enumerate() {
        for writer in 0..40u64 {
            let app = Arc::clone(&app);
            let path = format!("/files/storm/{file}");
            let (token, pause) = storm_writer(f, writer);
            writers.push(tokio::spawn(async move {
                tokio::time::sleep(pause).await;
                let body = format!("token={token} writer={writer}");
                let status = app.put(&path, token, &body).await.status().as_u16();
                (path, token, status)
            }));
        }
    }
    let mut accepted: HashMap<String, Vec<u64>> = HashMap::new();
    for writer in writers {
        let (path, token, status) = writer.await.unwrap();
        assert!(
            matches!(status, 201 | 204 | 409),
            "{path} token {token}: {status}"
        );
        if status != 409 {
            accepted.entry(path).or_default().push(token);
        }
    }

    assert_storm_landed_in_order(&nginx, &files, accepted);
    let stale = app.rejections().len();
    assert!(stale > 0, "the storm had zombies in it");
}

/// The token and start delay of writer `writer` of file number `file` in a storm. Tokens mostly
/// rise over time, with old leaders mixed in: each writer's token is its wave plus a random lag
/// of up to three generations.
fn storm_writer(file: usize, writer: u64) -> (u64, Duration) {
    let token = (writer / 4 + 3).saturating_sub(fastrand::u64(0..=3));
    let pause = Duration::from_millis(fastrand::u64(0..30) + writer * 2 + file as u64);
    (token, pause)
}

/// The storm's outcome in nginx's files and access log: each file holds the highest accepted
/// token's write, nginx saw each file's tokens in order, and exactly the accepted writes.
fn assert_storm_landed_in_order(
    nginx: &Server,
    files: &[&str],
    mut accepted: HashMap<String, Vec<u64>>,
) {
    let log = nginx_log(nginx);
    for file in files {
        let path = format!("/files/storm/{file}");
        let mut tokens = accepted.remove(&path).unwrap_or_default();
        let highest = *tokens.iter().max().expect("some write was accepted");
        let disk = std::fs::read_to_string(nginx._dir.path().join(format!("root{path}")));
        assert!(
            disk.unwrap().starts_with(&format!("token={highest} ")),
            "{file} on disk is not from the highest accepted token {highest}"
        );
        let seen: Vec<u64> = log
            .iter()
            .filter(|line| line.1 == path)
            .map(|line| line.2.unwrap())
            .collect();
        assert!(
            seen.windows(2).all(|w| w[0] <= w[1]),
            "nginx saw {file}'s tokens out of order: {seen:?}"
        );
        let mut seen_sorted = seen.clone();
        seen_sorted.sort_unstable();
        tokens.sort_unstable();
        assert_eq!(
            seen_sorted, tokens,
            "nginx saw exactly the accepted writes, no stale one"
        );
    }
}

/// fencegate serving HTTPS with a certificate of `ca`, in front of nginx serving HTTPS with
/// another: `/files/…` verifies nginx against `ca` (`upstream_ca`), `/untrusted/…` against the
/// system's roots alone.
struct TlsBothSides {
    nginx: Server,
    app: TestApp,
    ca: common::certs::Ca,
}

async fn tls_on_both_sides(binary: &Path, h2: bool) -> TlsBothSides {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::certs::Ca::new(dir.path(), "e2e-ca");
    let storage = ca.server(dir.path(), "nginx");
    let front = ca.server(dir.path(), "fencegate");
    let config = format!(
        "[tls]\ncert = {:?}\nkey = {:?}\n\
         [[routes]]\npath = \"/files/{{*path}}\"\nupstream = \"https://localhost:{{port}}\"\n\
         resource = \"file:{{path}}\"\nupstream_ca = {:?}\n\
         [[routes]]\npath = \"/untrusted/{{*path}}\"\nupstream = \"https://localhost:{{port}}\"\n\
         resource = \"untrusted:{{path}}\"\n",
        front.cert, front.key, ca.pem
    );
    let nginx = start_nginx_https(binary, dir, &storage, h2);
    let config = config.replace("{port}", &nginx.addr.port().to_string());
    let app = TestApp::spawn(&config).await;
    TlsBothSides { nginx, app, ca }
}

/// A PUT over HTTPS to fencegate: its status and the whole answer.
async fn https_put(app: &TestApp, ca: &Path, path: &str, token: u64, body: &str) -> (u16, String) {
    let request = format!(
        "PUT {path} HTTP/1.1\r\nHost: localhost\r\nFencing-Token: {token}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = common::certs::tls_exchange(app.addr, ca, None, &[b"http/1.1"], &request)
        .await
        .unwrap()
        .answer;
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|status| status.parse().ok())
        .unwrap_or(0);
    (status, answer)
}

#[tokio::test]
#[ignore = "needs nginx; run with --ignored"]
async fn nginx_https_wallet_story_with_tls_on_both_sides() {
    let Some(binary) = installed("nginx", "apt-get install nginx") else {
        return;
    };
    let TlsBothSides { nginx, app, ca } = tls_on_both_sides(&binary, false).await;
    let on_disk = nginx._dir.path().join("root/files/wallets/1");

    let (opening, answer) = https_put(&app, &ca.pem, "/files/wallets/1", 1, "100").await;
    assert_eq!(opening, 201, "nginx creates the file over HTTPS: {answer}");
    let (new_leader, _) = https_put(&app, &ca.pem, "/files/wallets/1", 2, "120").await;
    assert_eq!(new_leader, 204);
    let (zombie, answer) = https_put(&app, &ca.pem, "/files/wallets/1", 1, "150").await;
    assert_eq!(zombie, 409, "{answer}");
    assert!(
        answer.to_lowercase().contains("fencing-token-highest: 2"),
        "{answer}"
    );
    assert_eq!(std::fs::read_to_string(&on_disk).unwrap(), "120");
    let tokens: Vec<Option<u64>> = nginx_log(&nginx).into_iter().map(|l| l.2).collect();
    assert_eq!(
        tokens,
        [Some(1), Some(2)],
        "the zombie's write never reached nginx"
    );

    // nginx's certificate is not from a root the system trusts: without upstream_ca, a 502 that
    // says so, and nothing reaches it.
    let (untrusted, answer) = https_put(&app, &ca.pem, "/untrusted/x", 1, "x").await;
    assert_eq!(untrusted, 502, "{answer}");
    assert!(answer.contains("unknown issuer"), "{answer}");
    assert_eq!(nginx_log(&nginx).len(), 2);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nginx; run with --ignored"]
async fn nginx_https_storm_of_old_and_new_writers_with_tls_on_both_sides() {
    https_storm(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nginx; run with --ignored"]
async fn nginx_http2_storm_of_old_and_new_writers_with_tls_on_both_sides() {
    https_storm(true).await;
}

/// The storm of old and new writers through TLS on both sides; nginx offers `h2` if `h2`, and
/// must then be spoken to in HTTP/2.
async fn https_storm(h2: bool) {
    let Some(binary) = installed("nginx", "apt-get install nginx") else {
        return;
    };
    let TlsBothSides { nginx, app, ca } = tls_on_both_sides(&binary, h2).await;
    let (app, ca) = (Arc::new(app), Arc::new(ca.pem.clone()));
    let files = ["a", "b", "c", "d"];
    let mut writers = Vec::new();
    for (f, file) in files.iter().enumerate() {
        for writer in 0..40u64 {
            let (app, ca) = (Arc::clone(&app), Arc::clone(&ca));
            let path = format!("/files/storm/{file}");
            let (token, pause) = storm_writer(f, writer);
            writers.push(tokio::spawn(async move {
                tokio::time::sleep(pause).await;
                let body = format!("token={token} writer={writer}");
                let (status, answer) = https_put(&app, &ca, &path, token, &body).await;
                (path, token, status, answer)
            }));
        }
    }
    let mut accepted: HashMap<String, Vec<u64>> = HashMap::new();
    for writer in writers {
        let (path, token, status, answer) = writer.await.unwrap();
        assert!(
            matches!(status, 201 | 204 | 409),
            "{path} token {token}: {answer}"
        );
        if status != 409 {
            accepted.entry(path).or_default().push(token);
        }
    }
    let protocol = if h2 { "HTTP/2.0" } else { "HTTP/1.1" };
    let access_log = std::fs::read_to_string(nginx._dir.path().join("access.log")).unwrap();
    assert!(
        access_log.lines().all(|line| line.ends_with(protocol)),
        "nginx was not spoken to in {protocol}:\n{access_log}"
    );
    assert_storm_landed_in_order(&nginx, &files, accepted);
    assert!(!app.rejections().is_empty(), "the storm had zombies in it");
}

/// The layout of deploy/examples/fencegate.toml in front of nginx: a resource per wallet, and a
/// catch-all under `default`.
fn wallet_routes(nginx: &Server) -> String {
    format!(
        r#"
[[routes]]
path = "/wallets/{{id}}"
upstream = "http://{addr}"
resource = "wallet:{{id}}"

[[routes]]
path = "/{{*rest}}"
upstream = "http://{addr}"
resource = "default"
"#,
        addr = nginx.addr
    )
}

/// Every file under nginx's root and its bytes, for "nothing changed" checks.
fn files_on_disk(nginx: &Server) -> Vec<(String, Vec<u8>)> {
    fn walk(dir: &Path, root: &Path, found: &mut Vec<(String, Vec<u8>)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.strip_prefix(root).unwrap().display().to_string();
            if path.is_dir() {
                found.push((format!("{name}/"), Vec::new()));
                walk(&path, root, found);
            } else {
                found.push((name, std::fs::read(&path).unwrap()));
            }
        }
    }
    let root = nginx._dir.path().join("root");
    let mut found = Vec::new();
    walk(&root, &root, &mut found);
    found.sort();
    found
}

/// A WebDAV request through fencegate, with `headers` as (name, value) pairs; returns the status.
async fn webdav(app: &TestApp, method: &str, path: &str, headers: &[(&str, &str)]) -> u16 {
    let mut request = app.client.request(
        reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
        app.url(path),
    );
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap().status().as_u16()
}

#[tokio::test]
#[ignore = "needs nginx; run with --ignored"]
async fn nginx_webdav_a_zombie_changes_nothing_through_any_path_a_request_can_take() {
    let Some(binary) = installed("nginx", "apt-get install nginx") else {
        return;
    };
    let nginx = start_nginx(&binary);
    let app = TestApp::spawn(&wallet_routes(&nginx)).await;
    let host = app.addr.to_string();
    assert_eq!(app.put("/wallets/1", 2, "leader: 120").await.status(), 201);
    assert_eq!(app.put("/wallets/2", 2, "leader: 80").await.status(), 201);
    // The zombie holds token 1. Under the catch-all, `default` has never seen a token, so the
    // zombie may write scratch files there: they are its to write.
    assert_eq!(app.put("/scratch", 1, "zombie: 150").await.status(), 201);
    assert_eq!(app.put("/scratch-dir/x", 1, "zombie").await.status(), 201);
    let before = files_on_disk(&nginx);

    let absolute = format!("http://{host}/wallets/1");
    /// A request a zombie tries: method, path, extra headers, and the status fencegate answers.
    type Attempt<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, u16);
    let attempts: Vec<Attempt<'_>> = vec![
        // 1. COPY/MOVE onto a wallet through Destination, in every spelling.
        ("COPY", "/scratch", vec![("destination", "/wallets/1")], 409),
        (
            "COPY",
            "/scratch",
            vec![("destination", absolute.as_str())],
            409,
        ),
        (
            "COPY",
            "/scratch",
            vec![("destination", "/wallets/%31")],
            409,
        ),
        (
            "COPY",
            "/scratch",
            vec![("destination", "/wallets//1")],
            400,
        ),
        ("MOVE", "/scratch", vec![("destination", "/wallets/1")], 409),
        (
            "MOVE",
            "/scratch",
            vec![("destination", absolute.as_str())],
            409,
        ),
        (
            "COPY",
            "/scratch-dir/",
            vec![("destination", "/wallets/")],
            409,
        ),
        // 2. Collection operations above the wallets.
        ("DELETE", "/wallets/", vec![], 409),
        ("DELETE", "/wallets", vec![], 409),
        (
            "MOVE",
            "/wallets/",
            vec![("destination", "/elsewhere/")],
            409,
        ),
        ("DELETE", "/", vec![], 409),
        // 2b. A wallet named as a collection is the wallet's resource.
        ("DELETE", "/wallets/1/", vec![], 409),
    ];
    for (method, path, headers, expected) in &attempts {
        let mut headers = headers.clone();
        headers.push(("fencing-token", "1"));
        let status = webdav(&app, method, path, &headers).await;
        assert_eq!(status, *expected, "{method} {path} {headers:?}");
    }
    // 3. Write methods without a token.
    for method in [
        "MKCOL",
        "PROPPATCH",
        "COPY",
        "MOVE",
        "LOCK",
        "DELETE",
        "PUT",
    ] {
        let path = if method == "MKCOL" {
            "/wallets/9/"
        } else {
            "/wallets/1"
        };
        let headers = [("destination", "/scratch2")];
        assert_eq!(
            webdav(&app, method, path, &headers).await,
            428,
            "{method} without a token"
        );
    }
    // 4. The method in another case.
    for method in ["put", "Put", "pAtCh", "delete", "move"] {
        let headers = [("fencing-token", "2"), ("destination", "/scratch2")];
        assert_eq!(
            webdav(&app, method, "/wallets/1", &headers).await,
            400,
            "{method}"
        );
    }
    // 5. Asking fencegate to strip the token on the way.
    let stripped = [("fencing-token", "2"), ("connection", "Fencing-Token")];
    assert_eq!(webdav(&app, "PUT", "/wallets/1", &stripped).await, 400);

    assert_eq!(
        files_on_disk(&nginx),
        before,
        "every file as the leader and the zombie left it"
    );
    assert_eq!(
        std::fs::read_to_string(nginx._dir.path().join("root/wallets/1")).unwrap(),
        "leader: 120"
    );
    let reasons: Vec<String> = app.rejections().into_iter().map(|r| r.0).collect();
    assert!(reasons.iter().any(|r| r == "stale") && reasons.iter().any(|r| r == "collection"));
    app.stop().await;
}

#[tokio::test]
#[ignore = "needs nginx; run with --ignored"]
async fn nginx_webdav_the_leaders_copy_move_mkcol_and_delete_still_work() {
    let Some(binary) = installed("nginx", "apt-get install nginx") else {
        return;
    };
    let nginx = start_nginx(&binary);
    let app = TestApp::spawn(&wallet_routes(&nginx)).await;
    let root = nginx._dir.path().join("root");
    assert_eq!(app.put("/wallets/1", 3, "120").await.status(), 201);

    // COPY onto a new wallet: both resources pass their gates, and the new one is at 3 after.
    let token = [("fencing-token", "3"), ("destination", "/wallets/2")];
    // nginx answers a COPY or MOVE 204 whether or not the destination existed.
    assert!(matches!(
        webdav(&app, "COPY", "/wallets/1", &token).await,
        201 | 204
    ));
    assert_eq!(
        std::fs::read_to_string(root.join("wallets/2")).unwrap(),
        "120"
    );
    assert_eq!(app.put("/wallets/2", 2, "zombie").await.status(), 409);

    // MOVE, with the absolute URL a WebDAV client sends.
    let absolute = format!("http://{}/wallets/3", app.addr);
    let token = [("fencing-token", "3"), ("destination", absolute.as_str())];
    assert!(matches!(
        webdav(&app, "MOVE", "/wallets/2", &token).await,
        201 | 204
    ));
    assert!(!root.join("wallets/2").exists());
    assert_eq!(
        std::fs::read_to_string(root.join("wallets/3")).unwrap(),
        "120"
    );

    // MKCOL of a member, then DELETE of it, with the member's own token.
    let token = [("fencing-token", "1")];
    assert_eq!(webdav(&app, "MKCOL", "/wallets/9/", &token).await, 201);
    assert!(root.join("wallets/9").is_dir());
    assert_eq!(
        webdav(&app, "DELETE", "/wallets/3", &[("fencing-token", "3")]).await,
        204
    );
    assert!(!root.join("wallets/3").exists());
    // Outside the wallets, the catch-all's own collections are the leader's to manage.
    let token = [("fencing-token", "1")];
    assert_eq!(webdav(&app, "MKCOL", "/archive/", &token).await, 201);
    assert_eq!(webdav(&app, "DELETE", "/archive/", &token).await, 204);
    app.stop().await;
}

/// Calls etcd's JSON gateway directly (not through fencegate).
async fn etcd_call(etcd: &Server, call: &str, body: Value) -> Value {
    reqwest::Client::new()
        .post(format!("http://{}/v3/kv/{call}", etcd.addr))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The value of `key` at `revision` (0: the latest), decoded.
async fn etcd_value(etcd: &Server, key: &str, revision: i64) -> Option<String> {
    let answer = etcd_call(
        etcd,
        "range",
        json!({"key": BASE64.encode(key), "revision": revision}),
    )
    .await;
    let value = answer["kvs"][0]["value"].as_str()?;
    Some(String::from_utf8(BASE64.decode(value).unwrap()).unwrap())
}

async fn etcd_revision(etcd: &Server) -> i64 {
    let answer = etcd_call(etcd, "range", json!({"key": BASE64.encode("-")})).await;
    answer["header"]["revision"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// A fenced put through fencegate's catch-all route (the `default` resource).
async fn put_through(app: &TestApp, key: &str, value: &str, token: u64) -> u16 {
    app.client
        .post(app.url("/v3/kv/put"))
        .header("fencing-token", token.to_string())
        .json(&json!({"key": BASE64.encode(key), "value": BASE64.encode(value)}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn fencegate_before_etcd(etcd: &Server) -> TestApp {
    // Every write is a POST to one path, with the key in the body: one resource for the whole
    // keyspace. A route per key prefix is not possible, because routes see only the path.
    TestApp::spawn(&format!(
        "[[routes]]\npath = \"/{{*rest}}\"\nupstream = \"http://{}\"\nresource = \"default\"\n",
        etcd.addr
    ))
    .await
}

#[tokio::test]
#[ignore = "needs etcd; run with --ignored"]
async fn etcd_json_gateway_wallet_story() {
    let Some(binary) = installed("etcd", "apt-get install etcd-server") else {
        return;
    };
    let etcd = start_etcd(&binary);
    let app = fencegate_before_etcd(&etcd).await;
    assert_eq!(put_through(&app, "wallet", "100", 1).await, 200);
    assert_eq!(put_through(&app, "wallet", "120", 2).await, 200);
    assert_eq!(put_through(&app, "wallet", "150", 1).await, 409);
    assert_eq!(etcd_value(&etcd, "wallet", 0).await.as_deref(), Some("120"));
    let rejections = app.rejections();
    assert_eq!(rejections.len(), 1);
    assert_eq!((rejections[0].1, rejections[0].2), (Some(1), Some(2)));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd; run with --ignored"]
async fn etcd_json_gateway_storm_applies_no_stale_write() {
    let Some(binary) = installed("etcd", "apt-get install etcd-server") else {
        return;
    };
    let etcd = start_etcd(&binary);
    let app = Arc::new(fencegate_before_etcd(&etcd).await);
    let start = etcd_revision(&etcd).await;
    let writers: Vec<_> = (0..120u64)
        .map(|writer| {
            let app = Arc::clone(&app);
            let token = (writer / 10 + 3).saturating_sub(fastrand::u64(0..=3));
            let pause = Duration::from_millis(fastrand::u64(0..20) + writer * 2);
            tokio::spawn(async move {
                tokio::time::sleep(pause).await;
                let value = format!("token={token} writer={writer}");
                (token, put_through(&app, "storm", &value, token).await)
            })
        })
        .collect();
    let mut accepted = Vec::new();
    for writer in writers {
        let (token, status) = writer.await.unwrap();
        assert!(matches!(status, 200 | 409), "token {token}: {status}");
        if status == 200 {
            accepted.push(token);
        }
    }
    let end = etcd_revision(&etcd).await;
    assert_eq!(
        end - start,
        accepted.len() as i64,
        "one etcd revision per accepted write: no stale write was applied"
    );
    let mut history = Vec::new();
    for revision in start + 1..=end {
        let value = etcd_value(&etcd, "storm", revision).await.unwrap();
        let token: u64 = value["token=".len()..]
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        history.push(token);
    }
    assert!(
        history.windows(2).all(|w| w[0] <= w[1]),
        "etcd applied tokens out of order: {history:?}"
    );
    assert_eq!(history.last(), accepted.iter().max());
    assert!(!app.rejections().is_empty(), "the storm had zombies in it");
}

/// fencegate with the etcd-v3 profile: wallets and orders are keyspaces led independently.
async fn fencegate_with_etcd_profile(etcd: &Server) -> TestApp {
    TestApp::spawn(&format!(
        r#"
[[routes]]
path = "/v3/{{*rest}}"
upstream = "http://{}"
profile = "etcd-v3"
resource = "etcd:{{key}}"
[[routes.keys]]
prefix = "/wallets/"
resource = "wallet:{{segment}}"
[[routes.keys]]
prefix = "/orders/"
resource = "orders"
"#,
        etcd.addr
    ))
    .await
}

/// An etcd call through fencegate with `token`; returns the status.
async fn call_through(app: &TestApp, call: &str, token: u64, body: Value) -> u16 {
    app.client
        .post(app.url(&format!("/v3/{call}")))
        .header("fencing-token", token.to_string())
        .json(&body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn b64(text: &str) -> String {
    BASE64.encode(text)
}

#[tokio::test]
#[ignore = "needs etcd; run with --ignored"]
async fn etcd_profile_two_keyspaces_and_a_zombie_that_tries_every_write() {
    let Some(binary) = installed("etcd", "apt-get install etcd-server") else {
        return;
    };
    let etcd = start_etcd(&binary);
    let app = fencegate_with_etcd_profile(&etcd).await;
    // Two leaders, of two keyspaces, each at its own epoch: neither fences the other out.
    let put = |key: &str, value: &str| json!({"key": b64(key), "value": b64(value)});
    assert_eq!(
        call_through(&app, "kv/put", 7, put("/wallets/1/balance", "120")).await,
        200
    );
    assert_eq!(
        call_through(&app, "kv/put", 3, put("/orders/9", "paid")).await,
        200
    );
    assert_eq!(
        call_through(&app, "kv/put", 7, put("/wallets/2/balance", "80")).await,
        200
    );
    let revision = etcd_revision(&etcd).await;

    // The wallets' old leader (token 6) tries every state-changing endpoint.
    let zombie: Vec<(&str, Value, u16)> = vec![
        ("kv/put", put("/wallets/1/balance", "150"), 409),
        (
            "kv/deleterange",
            json!({"key": b64("/wallets/1/balance")}),
            409,
        ),
        (
            "kv/deleterange",
            json!({"key": b64("/wallets/1/"), "range_end": b64("/wallets/10")}),
            409,
        ),
        // A range over several wallets, or everything: nobody's to fence.
        (
            "kv/deleterange",
            json!({"key": b64("/wallets/"), "range_end": b64("/wallets0")}),
            422,
        ),
        (
            "kv/deleterange",
            json!({"key": "AA==", "range_end": "AA=="}),
            422,
        ),
        (
            "kv/txn",
            json!({"success": [{"requestPut": {"key": b64("/wallets/2/balance"), "value": b64("0")}}]}),
            409,
        ),
        (
            "kv/txn",
            json!({"compare": [], "failure": [{"request_delete_range": {"key": b64("/wallets/2/balance")}}]}),
            409,
        ),
        // A transaction over two keyspaces passes both gates or neither: orders is at 3, so 6 is
        // a new orders epoch, but wallets refuse it, and orders must not be raised.
        (
            "kv/txn",
            json!({"success": [
                {"request_put": {"key": b64("/orders/9"), "value": b64("refunded")}},
                {"request_put": {"key": b64("/wallets/1/balance"), "value": b64("0")}}
            ]}),
            409,
        ),
        ("kv/compaction", json!({"revision": revision}), 422),
        ("lease/revoke", json!({"ID": 1}), 422),
        ("auth/enable", json!({}), 422),
    ];
    for (call, body, expected) in &zombie {
        assert_eq!(
            call_through(&app, call, 6, body.clone()).await,
            *expected,
            "{call} {body}"
        );
    }
    // Reads and lease grants change no key: they pass with any token or none.
    assert_eq!(
        call_through(
            &app,
            "kv/range",
            0,
            json!({"key": b64("/wallets/1/balance")})
        )
        .await,
        200
    );
    assert_eq!(
        call_through(&app, "lease/grant", 0, json!({"TTL": 60})).await,
        200
    );

    // etcd, read directly, holds what the current leaders wrote, and nothing else happened.
    assert_eq!(
        etcd_value(&etcd, "/wallets/1/balance", 0).await.as_deref(),
        Some("120")
    );
    assert_eq!(
        etcd_value(&etcd, "/wallets/2/balance", 0).await.as_deref(),
        Some("80")
    );
    assert_eq!(
        etcd_value(&etcd, "/orders/9", 0).await.as_deref(),
        Some("paid")
    );
    assert_eq!(
        etcd_revision(&etcd).await,
        revision,
        "no write reached etcd"
    );
    // The orders leader was not fenced out by the refused two-keyspace transaction.
    assert_eq!(
        call_through(&app, "kv/put", 3, put("/orders/9", "shipped")).await,
        200
    );
    assert_eq!(
        etcd_value(&etcd, "/orders/9", 0).await.as_deref(),
        Some("shipped")
    );
    let reasons: Vec<(String, String)> = app.rejected_resources();
    assert!(reasons.contains(&("wallet:1".into(), "stale".into())));
    assert!(reasons.contains(&("/v3/{*rest}".into(), "unattributable".into())));
    app.stop().await;
}

#[tokio::test]
#[ignore = "needs etcd; run with --ignored"]
async fn etcd_profile_leaders_write_transactions_and_member_deletes() {
    let Some(binary) = installed("etcd", "apt-get install etcd-server") else {
        return;
    };
    let etcd = start_etcd(&binary);
    let app = fencegate_with_etcd_profile(&etcd).await;
    let txn = json!({
        "compare": [{"key": b64("/wallets/1/balance"), "target": "VERSION", "version": "0"}],
        "success": [
            {"request_put": {"key": b64("/wallets/1/balance"), "value": b64("100")}},
            {"request_put": {"key": b64("/orders/1"), "value": b64("opened")}}
        ]
    });
    assert_eq!(call_through(&app, "kv/txn", 4, txn).await, 200);
    assert_eq!(
        etcd_value(&etcd, "/wallets/1/balance", 0).await.as_deref(),
        Some("100")
    );
    assert_eq!(
        etcd_value(&etcd, "/orders/1", 0).await.as_deref(),
        Some("opened")
    );
    // The member's whole subtree, as `etcdctl del --prefix /wallets/1/` sends it.
    let subtree = json!({"key": b64("/wallets/1/"), "range_end": b64("/wallets/10")});
    assert_eq!(call_through(&app, "kv/deleterange", 4, subtree).await, 200);
    assert_eq!(etcd_value(&etcd, "/wallets/1/balance", 0).await, None);
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// CouchDB, through PouchDB Server

/// PouchDB Server in memory on a free port, with the database `bank` created on it directly.
async fn start_couchdb(binary: &Path) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut command = Command::new(binary);
    command
        .args(["--in-memory", "--host", "127.0.0.1", "--port"])
        .arg(addr.port().to_string())
        .current_dir(dir.path());
    let server = spawn_server(command, addr, dir, "pouchdb-server");
    let created = couch_direct(&server, "PUT", "/bank", None).await;
    assert_eq!(created.0, 201, "{:?}", created.1);
    server
}

/// A call straight to the storage, not through fencegate: (status, body).
async fn couch_direct(
    server: &Server,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    couch_call(
        &reqwest::Client::new(),
        &format!("http://{}{path}", server.addr),
        method,
        None,
        &[],
        body,
    )
    .await
}

async fn couch_call(
    client: &reqwest::Client,
    url: &str,
    method: &str,
    token: Option<u64>,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = client.request(reqwest::Method::from_bytes(method.as_bytes()).unwrap(), url);
    if let Some(token) = token {
        request = request.header("fencing-token", token.to_string());
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

/// fencegate with the couchdb profile: wallets and orders are documents of one database, led
/// independently.
async fn fencegate_with_couchdb_profile(couchdb: &Server) -> TestApp {
    TestApp::spawn(&format!(
        r#"
[[routes]]
path = "/{{*rest}}"
upstream = "http://{}"
profile = "couchdb"
resource = "couch:{{db}}/{{doc}}"
[[routes.keys]]
prefix = "wallet:"
resource = "wallet:{{segment}}"
[[routes.keys]]
prefix = "order:"
resource = "orders"
"#,
        couchdb.addr
    ))
    .await
}

/// Every document of `bank` with its revision and body, read from the storage directly.
async fn couch_documents(couchdb: &Server) -> Vec<Value> {
    let (status, all) =
        couch_direct(couchdb, "GET", "/bank/_all_docs?include_docs=true", None).await;
    assert_eq!(status, 200);
    all["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["doc"].clone())
        .collect()
}

#[tokio::test]
#[ignore = "needs pouchdb-server; run with --ignored"]
async fn couchdb_profile_two_keyspaces_and_a_zombie_that_tries_every_write() {
    let Some(binary) = installed("pouchdb-server", "npm install -g pouchdb-server") else {
        return;
    };
    let couchdb = start_couchdb(&binary).await;
    let app = fencegate_with_couchdb_profile(&couchdb).await;
    let call = |method: &'static str,
                path: &'static str,
                token: u64,
                headers: &'static [(&'static str, &'static str)],
                body: Option<Value>| {
        let (client, url) = (app.client.clone(), app.url(path));
        async move { couch_call(&client, &url, method, Some(token), headers, body).await }
    };
    // The wallets' leader (7) and the orders' leader (3), each at its own epoch.
    let (status, wallet) = call(
        "PUT",
        "/bank/wallet:1",
        7,
        &[],
        Some(json!({"balance": 120})),
    )
    .await;
    assert_eq!(status, 201, "{wallet}");
    let (status, _) = call(
        "POST",
        "/bank",
        7,
        &[],
        Some(json!({"_id": "wallet:2", "balance": 80})),
    )
    .await;
    assert_eq!(status, 201);
    let (status, bulk) = call(
        "POST",
        "/bank/_bulk_docs",
        3,
        &[],
        Some(json!({"docs": [{"_id": "order:9", "state": "paid"}, {"_id": "order:10", "state": "open"}]})),
    )
    .await;
    assert_eq!(status, 201, "{bulk}");
    let rev = wallet["rev"].as_str().unwrap().to_owned();
    let before = couch_documents(&couchdb).await;
    let (_, info) = couch_direct(&couchdb, "GET", "/bank", None).await;

    // The wallets' old leader (6) tries every state-changing endpoint of the profile's table.
    let rev_query: &'static str = Box::leak(format!("/bank/wallet:1?rev={rev}").into_boxed_str());
    let attachment: &'static str =
        Box::leak(format!("/bank/wallet:1/receipt.txt?rev={rev}").into_boxed_str());
    // (method, path, headers, body, expected status)
    type Attempt = (
        &'static str,
        &'static str,
        &'static [(&'static str, &'static str)],
        Option<Value>,
        u16,
    );
    let attempts: Vec<Attempt> = vec![
        (
            "PUT",
            "/bank/wallet:1",
            &[],
            Some(json!({"_rev": rev, "balance": 150})),
            409,
        ),
        ("DELETE", rev_query, &[], None, 409),
        (
            "PUT",
            attachment,
            &[("content-type", "text/plain")],
            None,
            409,
        ),
        (
            "POST",
            "/bank",
            &[],
            Some(json!({"_id": "wallet:1", "balance": 0})),
            409,
        ),
        (
            "POST",
            "/bank/_bulk_docs",
            &[],
            Some(json!({"docs": [{"_id": "wallet:2", "balance": 0}]})),
            409,
        ),
        (
            "POST",
            "/bank/_bulk_docs",
            &[],
            Some(
                json!({"new_edits": false, "docs": [{"_id": "wallet:1", "_rev": "9-x", "balance": 0}]}),
            ),
            409,
        ),
        // Two keyspaces in one request: orders would take 6 as a new epoch, wallets refuse it,
        // and the request is refused whole.
        (
            "POST",
            "/bank/_bulk_docs",
            &[],
            Some(json!({"docs": [{"_id": "order:11"}, {"_id": "wallet:1"}]})),
            409,
        ),
        (
            "COPY",
            "/bank/order:9",
            &[("destination", "wallet:1")],
            None,
            409,
        ),
        (
            "POST",
            "/bank/_bulk_docs",
            &[],
            Some(json!({"docs": [{"balance": 0}]})),
            422,
        ),
        ("POST", "/bank", &[], Some(json!({"balance": 0})), 422),
        (
            "POST",
            "/bank/_purge",
            &[],
            Some(json!({"wallet:1": [rev]})),
            422,
        ),
        ("POST", "/bank/_compact", &[], None, 422),
        ("POST", "/bank/_view_cleanup", &[], None, 422),
        ("PUT", "/bank/_security", &[], Some(json!({})), 422),
        ("PUT", "/bank/_revs_limit", &[], Some(json!(1)), 422),
        (
            "POST",
            "/bank/_index",
            &[],
            Some(json!({"index": {"fields": ["balance"]}})),
            422,
        ),
        (
            "PUT",
            "/bank/_design/app/_update/f/wallet:1",
            &[],
            None,
            422,
        ),
        ("DELETE", "/bank", &[], None, 422),
        ("PUT", "/other", &[], None, 422),
        (
            "POST",
            "/_replicate",
            &[],
            Some(json!({"source": "bank", "target": "copy", "create_target": true})),
            422,
        ),
    ];
    for (method, path, headers, body, expected) in attempts {
        let (status, answer) = call(method, path, 6, headers, body.clone()).await;
        assert_eq!(status, expected, "{method} {path} {body:?}: {answer}");
    }
    // Reads pass with any token, or none.
    let (status, _) = couch_call(
        &app.client,
        &app.url("/bank/_all_docs"),
        "POST",
        None,
        &[],
        Some(json!({"keys": ["wallet:1"]})),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = call(
        "POST",
        "/bank/_find",
        0,
        &[],
        Some(json!({"selector": {"balance": {"$gt": 0}}})),
    )
    .await;
    assert_eq!(status, 200);

    // The storage, read directly, holds what the leaders wrote, byte for byte, and nothing else
    // happened to it.
    assert_eq!(couch_documents(&couchdb).await, before);
    let (_, after) = couch_direct(&couchdb, "GET", "/bank", None).await;
    assert_eq!(
        after["update_seq"], info["update_seq"],
        "no write reached the storage"
    );
    let (status, _) = couch_direct(&couchdb, "GET", "/copy", None).await;
    assert_eq!(status, 404, "no replication ran");

    // The orders leader was not fenced out by the refused two-keyspace request.
    let (status, _) = call(
        "POST",
        "/bank/_bulk_docs",
        3,
        &[],
        Some(json!({"docs": [{"_id": "order:11", "state": "open"}]})),
    )
    .await;
    assert_eq!(status, 201);
    let reasons = app.rejected_resources();
    assert!(reasons.contains(&("wallet:1".into(), "stale".into())));
    // Every refusal names the resource that refused it: the two-keyspace request's is wallet:1.
    let stale: Vec<&str> = reasons
        .iter()
        .filter(|(_, reason)| reason == "stale")
        .map(|(r, _)| r.as_str())
        .collect();
    assert_eq!(
        stale.iter().filter(|r| **r == "wallet:1").count(),
        7,
        "{reasons:?}"
    );
    assert_eq!(stale.len(), 8, "{reasons:?}");
    assert!(reasons.contains(&("/{*rest}".into(), "unattributable".into())));
    app.stop().await;
}

#[tokio::test]
#[ignore = "needs pouchdb-server; run with --ignored"]
async fn couchdb_profile_leaders_write_in_bulk_copy_and_delete() {
    let Some(binary) = installed("pouchdb-server", "npm install -g pouchdb-server") else {
        return;
    };
    let couchdb = start_couchdb(&binary).await;
    let app = fencegate_with_couchdb_profile(&couchdb).await;
    let url = |path: &str| app.url(path);
    // A new leader's first write, in bulk over 100 wallets, raises all of them at once.
    let docs: Vec<Value> = (0..100)
        .map(|i| json!({"_id": format!("wallet:{i}"), "balance": i}))
        .collect();
    let (status, answer) = couch_call(
        &app.client,
        &url("/bank/_bulk_docs"),
        "POST",
        Some(5),
        &[],
        Some(json!({"docs": docs})),
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(couch_documents(&couchdb).await.len(), 100);
    for i in [0, 42, 99] {
        assert_eq!(
            common::durable_highest(&app.db_path, &format!("wallet:{i}")),
            Some(5)
        );
    }
    // COPY is fenced under its destination; DELETE under its document.
    let (status, answer) = couch_call(
        &app.client,
        &url("/bank/wallet:1"),
        "COPY",
        Some(5),
        &[("destination", "wallet:archive")],
        None,
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    let (_, copied) = couch_direct(&couchdb, "GET", "/bank/wallet:archive", None).await;
    assert_eq!(copied["balance"], 1);
    let rev = copied["_rev"].as_str().unwrap();
    let (status, _) = couch_call(
        &app.client,
        &url(&format!("/bank/wallet:archive?rev={rev}")),
        "DELETE",
        Some(5),
        &[],
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = couch_direct(&couchdb, "GET", "/bank/wallet:archive", None).await;
    assert_eq!(status, 404);
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// S3, through s3s-fs, with boto3 signing every request (SigV4)

/// s3s-fs on a free port over a temporary directory, with the bucket `bank`.
fn start_s3(binary: &Path) -> Server {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("bank")).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut command = Command::new(binary);
    command
        .args(["--host", "127.0.0.1", "--port"])
        .arg(addr.port().to_string())
        .args(["--access-key", "AK", "--secret-key", "SK"])
        .arg(dir.path());
    spawn_server(command, addr, dir, "s3s-fs")
}

/// Whether boto3 can be imported, or `false` after saying loudly that the test is skipped.
fn boto3_installed() -> bool {
    python_modules_installed("boto3", "pip install boto3")
}

/// Runs `calls` with boto3 (tests/support/s3_client.py): through fencegate, or straight to the
/// storage for those marked `direct`. Returns each call's (status, body).
async fn boto3(app: &TestApp, s3: &Server, calls: &[Value]) -> Vec<(u16, Value)> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("calls.json");
    std::fs::write(&file, serde_json::to_vec(calls).unwrap()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/s3_client.py");
    let mut command = Command::new("python3");
    command
        .arg(script)
        .arg(format!("http://{}", app.addr))
        .arg(format!("http://{}", s3.addr))
        .arg(&file);
    // fencegate serves on this test's runtime: wait for the client off it.
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "boto3 failed: {}",
        String::from_utf8_lossy(&output.stderr[output.stderr.len().saturating_sub(3000)..])
    );
    let results: Vec<Value> = serde_json::from_slice(&output.stdout).unwrap();
    // One result per call, so that callers zipping calls with results check every one.
    assert_eq!(results.len(), calls.len(), "boto3 answered every call");
    results
        .into_iter()
        .map(|r| (r["status"].as_u64().unwrap() as u16, r["body"].clone()))
        .collect()
}

fn s3_call(call: &str, token: Option<u64>, params: Value) -> Value {
    json!({"call": call, "token": token, "params": params})
}

/// fencegate with the s3 profile: wallets and orders are key prefixes of one bucket, led
/// independently.
async fn fencegate_with_s3_profile(s3: &Server) -> TestApp {
    TestApp::spawn(&format!(
        r#"
[[routes]]
path = "/{{*rest}}"
upstream = "http://{}"
profile = "s3"
resource = "s3:{{bucket}}/{{key}}"
[[routes.keys]]
prefix = "wallets/"
resource = "wallet:{{segment}}"
[[routes.keys]]
prefix = "orders/"
resource = "orders"
"#,
        s3.addr
    ))
    .await
}

#[tokio::test]
#[ignore = "needs s3s-fs and boto3; run with --ignored"]
async fn s3_profile_two_keyspaces_and_a_zombie_that_tries_every_write() {
    let install = "cargo install s3s-fs@0.14.1 --features binary --locked";
    let Some(binary) = installed("s3s-fs", install) else {
        return;
    };
    if !boto3_installed() {
        return;
    }
    let s3 = start_s3(&binary);
    let app = fencegate_with_s3_profile(&s3).await;
    let put = |key: &str, body: &str, token: u64| {
        s3_call(
            "put_object",
            Some(token),
            json!({"Bucket": "bank", "Key": key, "Body": body}),
        )
    };
    // The leaders write, signed by boto3: every signature holds through fencegate.
    let leaders = [
        put("wallets/1/balance", "120", 7),
        put("wallets/2/balance", "80", 7),
        put("orders/9", "paid", 3),
        s3_call(
            "create_multipart_upload",
            Some(7),
            json!({"Bucket": "bank", "Key": "wallets/1/statement"}),
        ),
    ];
    let mut leaders = leaders.to_vec();
    leaders[3]["save"] = json!("upload");
    leaders.extend([
        s3_call("upload_part", Some(7), json!({"Bucket": "bank", "Key": "wallets/1/statement", "UploadId": "$upload", "PartNumber": 1, "Body": "part one"})),
    ]);
    for (i, (status, body)) in boto3(&app, &s3, &leaders).await.into_iter().enumerate() {
        assert_eq!(status, 200, "leader call {i}: {body}");
    }

    // The wallets' old leader (6) tries every state-changing call of the profile's table.
    let zombie = vec![
        (put("wallets/1/balance", "150", 6), 409),
        (
            s3_call(
                "delete_object",
                Some(6),
                json!({"Bucket": "bank", "Key": "wallets/2/balance"}),
            ),
            409,
        ),
        (
            s3_call(
                "delete_objects",
                Some(6),
                json!({"Bucket": "bank", "Delete": {"Objects": [{"Key": "wallets/1/balance"}]}}),
            ),
            409,
        ),
        // Two keyspaces in one request: refused whole, orders not raised.
        (
            s3_call(
                "delete_objects",
                Some(6),
                json!({"Bucket": "bank", "Delete": {"Objects": [{"Key": "orders/9"}, {"Key": "wallets/2/balance"}]}}),
            ),
            409,
        ),
        (
            s3_call(
                "copy_object",
                Some(6),
                json!({"Bucket": "bank", "Key": "wallets/1/balance", "CopySource": "bank/orders/9"}),
            ),
            409,
        ),
        (
            s3_call(
                "put_object_tagging",
                Some(6),
                json!({"Bucket": "bank", "Key": "wallets/1/balance", "Tagging": {"TagSet": [{"Key": "k", "Value": "v"}]}}),
            ),
            409,
        ),
        (
            s3_call(
                "create_multipart_upload",
                Some(6),
                json!({"Bucket": "bank", "Key": "wallets/2/balance"}),
            ),
            409,
        ),
        (
            s3_call(
                "upload_part",
                Some(6),
                json!({"Bucket": "bank", "Key": "wallets/1/statement", "UploadId": "$upload", "PartNumber": 1, "Body": "forged"}),
            ),
            409,
        ),
        (
            s3_call(
                "complete_multipart_upload",
                Some(6),
                json!({"Bucket": "bank", "Key": "wallets/1/statement", "UploadId": "$upload", "MultipartUpload": {"Parts": [{"PartNumber": 1, "ETag": "\"x\""}]}}),
            ),
            409,
        ),
        (
            s3_call(
                "abort_multipart_upload",
                Some(6),
                json!({"Bucket": "bank", "Key": "wallets/1/statement", "UploadId": "$upload"}),
            ),
            409,
        ),
        (
            s3_call("create_bucket", Some(6), json!({"Bucket": "other"})),
            422,
        ),
        (
            s3_call("delete_bucket", Some(6), json!({"Bucket": "bank"})),
            422,
        ),
        (
            s3_call(
                "put_bucket_versioning",
                Some(6),
                json!({"Bucket": "bank", "VersioningConfiguration": {"Status": "Enabled"}}),
            ),
            422,
        ),
    ];
    let mut calls = leaders[3..4].to_vec();
    calls[0]["call"] = json!("list_multipart_uploads");
    calls[0]["params"] = json!({"Bucket": "bank"});
    calls[0]["token"] = Value::Null;
    // Re-read the leader's upload id, so that the zombie can name it.
    calls.push(s3_call(
        "create_multipart_upload",
        Some(7),
        json!({"Bucket": "bank", "Key": "wallets/1/statement"}),
    ));
    calls[1]["save"] = json!("upload");
    calls.extend(zombie.iter().map(|(call, _)| call.clone()));
    let results = boto3(&app, &s3, &calls).await;
    for ((call, expected), (status, body)) in zombie.iter().zip(&results[2..]) {
        assert_eq!(status, expected, "{call}: {body}");
    }

    // The storage, read directly (not through fencegate), holds what the leaders wrote.
    let direct = |call: &str, params: Value| {
        let mut call = s3_call(call, None, params);
        call["direct"] = json!(true);
        call
    };
    let get = |key: &str| direct("get_object", json!({"Bucket": "bank", "Key": key}));
    let results = boto3(
        &app,
        &s3,
        &[
            get("wallets/1/balance"),
            get("wallets/2/balance"),
            get("orders/9"),
            direct("list_objects_v2", json!({"Bucket": "bank"})),
        ],
    )
    .await;
    let bodies: Vec<Value> = results.into_iter().map(|(_, body)| body).collect();
    assert_eq!(
        bodies,
        [
            json!("120"),
            json!("80"),
            json!("paid"),
            json!(["orders/9", "wallets/1/balance", "wallets/2/balance"])
        ]
    );
    let reasons = app.rejected_resources();
    assert!(
        reasons.contains(&("wallet:2".into(), "stale".into())),
        "{reasons:?}"
    );
    assert!(reasons.contains(&("/{*rest}".into(), "unattributable".into())));
    // The orders leader was not fenced out by the refused two-keyspace delete.
    let results = boto3(&app, &s3, &[put("orders/9", "shipped", 3)]).await;
    assert_eq!(results[0].0, 200);
    app.stop().await;
}

/// The compose file's storage, outside Docker: deploy/examples/nginx-webdav.conf as it is (only
/// its port and data directory moved), under a master that runs its workers as an unprivileged
/// user, as the nginx image does. A data directory owned by root, as a new named volume is,
/// refuses every PUT (the bug compose had); owned by the workers' user, as compose's
/// `storage-init` leaves it, the PUT through fencegate lands.
#[tokio::test]
#[ignore = "needs nginx and root; run with --ignored"]
async fn the_compose_storage_config_writes_once_its_volume_belongs_to_the_workers() {
    let Some(binary) = installed("nginx", "apt-get install nginx") else {
        return;
    };
    if !Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout == b"0\n")
    {
        eprintln!("SKIPPED: needs root, to run nginx's workers as another user");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    // The workers must reach their files through the scratch directory.
    run("chmod", &["755", &d.to_string()]);
    let data = dir.path().join("data");
    let body_temp = dir.path().join("body");
    std::fs::create_dir(&data).unwrap();
    std::fs::create_dir(&body_temp).unwrap();
    // The image's temp directories belong to its worker user; so does this one.
    run(
        "chown",
        &["nobody:nogroup", &body_temp.display().to_string()],
    );
    let port = free_port();
    let server_block = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/examples/nginx-webdav.conf"
    ))
    .unwrap()
    .replace("listen 80;", &format!("listen 127.0.0.1:{port};"))
    .replace("root /srv/data;", &format!("root {};", data.display()));
    let config = format!(
        "daemon off;\nuser nobody nogroup;\nworker_processes 1;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\nevents {{ worker_connections 64; }}\n\
         http {{\n access_log off;\n client_body_temp_path {};\n{server_block}\n}}\n",
        body_temp.display()
    );
    std::fs::write(dir.path().join("nginx.conf"), config).unwrap();
    let mut command = Command::new(&binary);
    command
        .arg("-p")
        .arg(dir.path())
        .arg("-e")
        .arg(dir.path().join("error.log"))
        .arg("-c")
        .arg(dir.path().join("nginx.conf"));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let nginx = spawn_server(command, addr, dir, "nginx");
    let app = TestApp::spawn(&webdav_routes(&nginx)).await;

    let root_owned = app.put("/files/wallets/1", 1, "100").await;
    assert_eq!(
        root_owned.status(),
        500,
        "a root-owned volume refuses the workers"
    );
    run(
        "chown",
        &["-R", "nobody:nogroup", &data.display().to_string()],
    );
    let owned = app.put("/files/wallets/1", 1, "100").await;
    assert_eq!(owned.status(), 201);
    assert_eq!(
        std::fs::read_to_string(data.join("files/wallets/1")).unwrap(),
        "100"
    );
    app.stop().await;
}

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program).args(args).status().unwrap();
    assert!(status.success(), "{program} {args:?}");
}

/// The code block of docs/tokens.md that begins with `opening`, up to its closing fence.
fn docs_recipe(opening: &str) -> String {
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/tokens.md")).unwrap();
    let start = docs.find(opening).expect("the recipe is in docs/tokens.md");
    let end = start + docs[start..].find("\n```").unwrap();
    docs[start..end].to_owned()
}

/// fencegate with one route, `/wallets/{id}` to `wallet:{id}`, before an upstream that records
/// what arrives.
async fn fencegate_before_a_recording_upstream() -> (common::RecordingUpstream, TestApp) {
    let upstream = common::RecordingUpstream::start().await;
    let app = TestApp::spawn(&format!(
        "[[routes]]\npath = \"/wallets/{{id}}\"\nupstream = \"{}\"\nresource = \"wallet:{{id}}\"\n",
        upstream.url()
    ))
    .await;
    (upstream, app)
}

/// docs/tokens.md's etcd recipe, run verbatim (only the fencegate address and the body file
/// changed): two holders of the lock in turn write through fencegate with `ETCD_LOCK_REV` as
/// their token, and the second one's token is the higher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd and etcdctl; run with --ignored"]
async fn the_docs_etcd_lock_recipe_gives_rising_tokens_that_fencegate_accepts() {
    let Some(etcd) = installed("etcd", "apt-get install etcd-server") else {
        return;
    };
    let Some(etcdctl) = installed("etcdctl", "apt-get install etcd-client") else {
        return;
    };
    let recipe = docs_recipe("etcdctl lock ");
    let etcd = start_etcd(&etcd);
    let (upstream, app) = fencegate_before_a_recording_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("wallet.json"), "{\"balance\":100}").unwrap();
    let script = recipe
        .replace("http://fencegate:8080", &format!("http://{}", app.addr))
        .replacen("etcdctl", &etcdctl.display().to_string(), 1);
    let run = || {
        let output = Command::new("sh")
            .arg("-c")
            .arg(&script)
            .current_dir(dir.path())
            .env("ETCDCTL_API", "3")
            .env("ETCDCTL_ENDPOINTS", format!("http://{}", etcd.addr))
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{script}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    run();
    run();
    let tokens: Vec<Option<u64>> = upstream.arrivals().iter().map(|a| a.token).collect();
    assert_eq!(tokens.len(), 2, "{tokens:?}");
    assert!(tokens[0].is_some() && tokens[1] > tokens[0], "{tokens:?}");
    assert_eq!(upstream.arrivals()[1].body, "{\"balance\":100}");
    app.stop().await;
}

/// ZooKeeper standalone on a free loopback port, from Debian's `zookeeper` package (its jar
/// names its own dependencies), with a temporary data directory.
fn start_zookeeper(jar: &Path) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = dir.path().join("zoo.cfg");
    std::fs::write(
        &config,
        format!(
            "tickTime=500\ndataDir={}\nclientPort={}\nclientPortAddress=127.0.0.1\nadmin.enableServer=false\n",
            dir.path().join("data").display(),
            addr.port()
        ),
    )
    .unwrap();
    let mut command = Command::new("java");
    command
        .arg("-cp")
        .arg(jar)
        .arg("org.apache.zookeeper.server.ZooKeeperServerMain")
        .arg(&config);
    spawn_server(command, addr, dir, "zookeeper")
}

/// Whether Python can import `modules`, or `false` after saying loudly that the test is skipped.
fn python_modules_installed(modules: &str, install: &str) -> bool {
    let found = Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !found {
        let message =
            format!("SKIPPED: python3 cannot import {modules}; install them with `{install}`.");
        assert!(
            std::env::var_os("FENCEGATE_E2E_REQUIRED").is_none(),
            "{message} (FENCEGATE_E2E_REQUIRED is set)"
        );
        let _ = writeln!(std::io::stderr(), "\n{message}\n");
    }
    found
}

/// docs/tokens.md's ZooKeeper recipe, run verbatim (only the ZooKeeper and fencegate addresses
/// changed) by two candidates: the second waits, watching the first's znode, while the first
/// leads; once the first steps down (its session closed), the second leads and writes with a
/// higher `czxid`, which fencegate forwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs ZooKeeper (Debian's zookeeper package), java and python3 with kazoo and requests; run with --ignored"]
async fn the_docs_zookeeper_election_recipe_gives_rising_tokens_that_fencegate_accepts() {
    let jar = Path::new("/usr/share/java/zookeeper.jar");
    if !jar.is_file() {
        let _ = installed("zookeeper.jar", "apt-get install zookeeper");
        return;
    }
    if !python_modules_installed("kazoo, requests", "pip install kazoo requests") {
        return;
    }
    let recipe = docs_recipe("# kazoo");
    let zookeeper = start_zookeeper(jar);
    let (upstream, app) = fencegate_before_a_recording_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("wallet.json"), "{\"balance\":100}").unwrap();
    // After the recipe: lead until the test says to step down, then close the session (which
    // removes the ephemeral znode at once, as a crash would after the session timeout).
    let script = format!(
        "{}\nimport os, time\nwhile not os.path.exists(\"step-down\"):\n    time.sleep(0.02)\nzk.stop()\nzk.close()\n",
        recipe
            .replace("zk:2181", &zookeeper.addr.to_string())
            .replace("http://fencegate:8080", &format!("http://{}", app.addr))
    );
    let candidate = |name: &str| {
        let workdir = dir.path().join(name);
        std::fs::create_dir(&workdir).unwrap();
        std::fs::copy(dir.path().join("wallet.json"), workdir.join("wallet.json")).unwrap();
        let child = Command::new("python3")
            .arg("-c")
            .arg(&script)
            .current_dir(&workdir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        (workdir, child)
    };
    let arrivals = |count: usize| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while upstream.arrivals().len() < count {
            assert!(Instant::now() < deadline, "no write {count} arrived");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let (first_dir, mut first) = candidate("first");
    arrivals(1);
    let (second_dir, second) = candidate("second");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        upstream.arrivals().len(),
        1,
        "the second candidate wrote while the first still led"
    );
    std::fs::write(first_dir.join("step-down"), "").unwrap();
    assert!(first.wait().unwrap().success());
    arrivals(2);
    std::fs::write(second_dir.join("step-down"), "").unwrap();
    let output = second.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tokens: Vec<Option<u64>> = upstream.arrivals().iter().map(|a| a.token).collect();
    assert!(tokens[0].is_some() && tokens[1] > tokens[0], "{tokens:?}");
    assert_eq!(upstream.arrivals()[1].body, "{\"balance\":100}");
    app.stop().await;
}
