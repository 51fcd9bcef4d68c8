//! Shared helpers: an in-process fencegate on port 0 with a fresh database, a recording upstream,
//! and a raw HTTP/1.1 client for request targets that URL libraries would normalise away.

#![allow(dead_code, unreachable_pub)] // Each test binary uses a different subset.

pub mod binary;
pub mod certs;
pub mod cluster;
pub mod faults;
pub mod postgres;
pub mod scripted;
pub mod tcp_fault;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fencegate::config::{Config, Overrides};
use fencegate::server::App;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A request header the recording upstream obeys: sleep this many milliseconds before answering.
pub const DELAY_HEADER: &str = "x-test-delay-ms";

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub method: String,
    /// The path and query, as received.
    pub target: String,
    pub token: Option<u64>,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub arrived: Instant,
    pub answered: Option<Instant>,
    /// When the request's handler was dropped unanswered (its proxy tore the connection down).
    pub torn_down: Option<Instant>,
}

#[derive(Debug, Default)]
struct Log {
    arrivals: Vec<Arrival>,
    /// Per path, the tokens of requests received and not yet answered.
    in_flight: HashMap<String, Vec<u64>>,
    max_in_flight: HashMap<String, usize>,
    violations: Vec<String>,
}

type Hook = Arc<dyn Fn(&Arrival) + Send + Sync>;

/// An upstream that records every request and checks the contract's consequence: when a request
/// with token t arrives for a path, no request with a lower token for that path is unanswered.
#[derive(Clone)]
pub struct RecordingUpstream {
    pub addr: SocketAddr,
    log: Arc<Mutex<Log>>,
    hook: Arc<Mutex<Option<Hook>>>,
}

impl RecordingUpstream {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = Self {
            addr: listener.local_addr().unwrap(),
            log: Arc::default(),
            hook: Arc::default(),
        };
        let serving = upstream.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let upstream = serving.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let upstream = upstream.clone();
                        async move { Ok::<_, Infallible>(upstream.answer(request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        upstream
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Runs `hook` on every arrival, before the upstream answers.
    pub fn on_arrival(&self, hook: impl Fn(&Arrival) + Send + Sync + 'static) {
        *self.hook.lock().unwrap() = Some(Arc::new(hook));
    }

    async fn answer(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = request.into_parts();
        let token = parts
            .headers
            .get("fencing-token")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let path = parts.uri.path().to_owned();
        let mut arrival = Arrival {
            method: parts.method.to_string(),
            target: parts
                .uri
                .path_and_query()
                .map_or("/".into(), |pq| pq.to_string()),
            token,
            headers: parts.headers.clone(),
            body: Bytes::new(),
            arrived: Instant::now(),
            answered: None,
            torn_down: None,
        };
        let index = self.arrive(&path, &arrival);
        // If the caller goes away first (fencegate killed mid-request), hyper drops this future:
        // the request is then no longer in flight here.
        let mut abandoned = Abandoned {
            upstream: self,
            path: &path,
            token,
            index,
            armed: true,
        };
        arrival.body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let hook = self.hook.lock().unwrap().clone();
        if let Some(hook) = hook {
            hook(&arrival);
        }
        let delay = parts
            .headers
            .get(DELAY_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        abandoned.armed = false;
        self.leave(&path, index, arrival.body.clone(), token);
        Response::builder()
            .header("x-upstream", "recording")
            .header("connection", "x-upstream-hop")
            .header("x-upstream-hop", "must not reach the client")
            .body(Full::new(arrival.body))
            .unwrap()
    }

    fn arrive(&self, path: &str, arrival: &Arrival) -> usize {
        let mut log = self.log.lock().unwrap();
        let in_flight = log.in_flight.entry(path.to_owned()).or_default();
        if let Some(token) = arrival.token
            && let Some(older) = in_flight.iter().find(|t| **t < token)
        {
            let violation = format!("{path}: token {token} arrived while {older} was in flight");
            log.violations.push(violation);
        }
        let in_flight = log.in_flight.entry(path.to_owned()).or_default();
        in_flight.push(arrival.token.unwrap_or(0));
        let count = in_flight.len();
        let max = log.max_in_flight.entry(path.to_owned()).or_default();
        *max = (*max).max(count);
        log.arrivals.push(arrival.clone());
        log.arrivals.len() - 1
    }

    fn leave(&self, path: &str, index: usize, body: Bytes, token: Option<u64>) {
        let mut log = self.log.lock().unwrap();
        Self::no_longer_in_flight(&mut log, path, token);
        log.arrivals[index].body = body;
        log.arrivals[index].answered = Some(Instant::now());
    }

    fn no_longer_in_flight(log: &mut Log, path: &str, token: Option<u64>) {
        let in_flight = log.in_flight.entry(path.to_owned()).or_default();
        if let Some(position) = in_flight.iter().position(|t| *t == token.unwrap_or(0)) {
            in_flight.remove(position);
        }
    }

    pub fn arrivals(&self) -> Vec<Arrival> {
        self.log.lock().unwrap().arrivals.clone()
    }

    pub fn violations(&self) -> Vec<String> {
        self.log.lock().unwrap().violations.clone()
    }

    pub fn max_in_flight(&self, path: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .max_in_flight
            .get(path)
            .copied()
            .unwrap_or(0)
    }
}

/// Takes a request off the in-flight list when its handler is dropped before answering.
struct Abandoned<'a> {
    upstream: &'a RecordingUpstream,
    path: &'a str,
    token: Option<u64>,
    index: usize,
    armed: bool,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut log = self.upstream.log.lock().unwrap();
            RecordingUpstream::no_longer_in_flight(&mut log, self.path, self.token);
            log.arrivals[self.index].torn_down = Some(Instant::now());
        }
    }
}

/// One audit-log row: (reason, token, highest, method, path).
pub type AuditRow = (String, Option<i64>, Option<i64>, String, String);

/// A running in-process fencegate.
pub struct TestApp {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub db_path: PathBuf,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    _dir: Option<tempfile::TempDir>,
}

/// Routes used by most tests: wallets by id, fenced reads for accounts, a catch-all default.
pub fn standard_routes(upstream: &str) -> String {
    format!(
        r#"
[[routes]]
path = "/wallets/{{id}}"
upstream = "{upstream}"
resource = "wallet:{{id}}"

[[routes]]
path = "/accounts/{{id}}"
upstream = "{upstream}"
resource = "account:{{id}}"
fence_reads = true

[[routes]]
path = "/{{*rest}}"
upstream = "{upstream}"
resource = "default"
"#
    )
}

impl TestApp {
    /// Starts fencegate with `config` (TOML; listen addresses and database are filled in).
    pub async fn spawn(config: &str) -> TestApp {
        let dir = tempfile::tempdir().unwrap();
        let db_path = dir.path().join("fencegate.db");
        let mut app = Self::spawn_with_db(config, &db_path).await;
        app._dir = Some(dir);
        app
    }

    pub async fn spawn_with_db(config: &str, db_path: &Path) -> TestApp {
        let overrides = Overrides {
            listen: Some("127.0.0.1:0".into()),
            admin_listen: Some("127.0.0.1:0".into()),
            database: Some(db_path.to_owned()),
            ..Overrides::default()
        };
        let config = Config::from_toml(config, Path::new("test.toml"), overrides).unwrap();
        let app = App::build(config).await.unwrap();
        let (addr, admin_addr) = (app.data_addr(), app.admin_addr());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));
        TestApp {
            addr,
            admin_addr,
            db_path: db_path.to_owned(),
            client: reqwest::Client::new(),
            stop: Some(stop),
            task: Some(task),
            _dir: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// An admin-plane URL.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr)
    }

    /// An admin GET, with `token` as the bearer token if given.
    pub async fn admin_get(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut request = self.client.get(self.admin_url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.unwrap()
    }

    /// An admin POST of `body` as JSON, with `token` as the bearer token if given.
    pub async fn admin_post(
        &self,
        path: &str,
        body: serde_json::Value,
        token: Option<&str>,
    ) -> reqwest::Response {
        let mut request = self.client.post(self.admin_url(path)).json(&body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.unwrap()
    }

    /// An admin GET that must answer 200 with JSON.
    pub async fn admin_json(&self, path: &str, token: Option<&str>) -> serde_json::Value {
        let response = self.admin_get(path, token).await;
        assert_eq!(response.status(), 200, "GET {path}");
        response.json().await.unwrap()
    }

    /// A fenced PUT of `body` to `path` with `token`.
    pub async fn put(&self, path: &str, token: u64, body: &str) -> reqwest::Response {
        self.client
            .put(self.url(path))
            .header("fencing-token", token.to_string())
            .body(body.to_owned())
            .send()
            .await
            .unwrap()
    }

    /// Sends `method` to `path` with `token` as the raw `Fencing-Token` value, if any.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
    ) -> reqwest::Response {
        let mut request = self.client.request(method, self.url(path));
        if let Some(token) = token {
            request = request.header("fencing-token", token);
        }
        request.send().await.unwrap()
    }

    /// Like [`TestApp::put`], with the upstream told to take `delay` before answering.
    pub async fn slow_put(&self, path: &str, token: u64, delay: Duration) -> reqwest::Response {
        self.client
            .put(self.url(path))
            .header("fencing-token", token.to_string())
            .header(DELAY_HEADER, delay.as_millis().to_string())
            .body(format!("token {token}"))
            .send()
            .await
            .unwrap()
    }

    /// Signals shutdown and waits for the drain and the final flush.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    /// The audit log, oldest first.
    pub fn rejections(&self) -> Vec<AuditRow> {
        let conn = rusqlite::Connection::open_with_flags(
            &self.db_path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let mut statement = conn
            .prepare("SELECT reason, token, highest, method, path FROM rejections ORDER BY id")
            .unwrap();
        statement
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    /// The audit log's (resource, reason) pairs, oldest first.
    pub fn rejected_resources(&self) -> Vec<(String, String)> {
        let conn = rusqlite::Connection::open_with_flags(
            &self.db_path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let mut statement = conn
            .prepare("SELECT resource, reason FROM rejections ORDER BY id")
            .unwrap();
        statement
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    /// The epoch history, oldest first: (resource, from, to, via).
    pub fn epochs(&self) -> Vec<(String, Option<i64>, i64, String)> {
        let conn = rusqlite::Connection::open_with_flags(
            &self.db_path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let mut statement = conn
            .prepare("SELECT resource, from_token, to_token, via FROM epochs ORDER BY id")
            .unwrap();
        statement
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }
}

/// Starts a slow fenced PUT in the background; the task yields its status code.
pub fn spawn_slow_put(
    app: &Arc<TestApp>,
    path: &str,
    token: u64,
    delay: Duration,
) -> JoinHandle<u16> {
    let (app, path) = (Arc::clone(app), path.to_owned());
    tokio::spawn(async move { app.slow_put(&path, token, delay).await.status().as_u16() })
}

/// The durable highest token of `resource` in the database at `db_path`, read by a separate
/// connection exactly as a restarted fencegate would read it.
pub fn durable_highest(db_path: &Path, resource: &str) -> Option<u64> {
    let conn =
        rusqlite::Connection::open_with_flags(db_path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .ok()?;
    conn.query_row(
        "SELECT highest FROM resources WHERE resource = ?1",
        [resource],
        |r| r.get::<_, i64>(0),
    )
    .ok()
    .map(|v| v as u64)
}

/// A raw HTTP/1.1 exchange, for request targets and headers that client libraries rewrite.
/// Returns the status code, the lower-cased response headers and the body.
pub async fn raw_request(
    addr: SocketAddr,
    request: &str,
) -> (u16, HashMap<String, String>, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

/// A raw request with the given method, target and extra header lines, closing the connection.
pub fn raw(method: &str, target: &str, headers: &[&str]) -> String {
    let mut text = format!(
        "{method} {target} HTTP/1.1\r\nhost: fencegate.test\r\nconnection: close\r\ncontent-length: 0\r\n"
    );
    for header in headers {
        text.push_str(header);
        text.push_str("\r\n");
    }
    text.push_str("\r\n");
    text
}

/// Parses a problem+json body.
pub async fn problem(response: reqwest::Response) -> serde_json::Value {
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json",
        "fencegate's own errors are problem+json"
    );
    response.json().await.unwrap()
}

/// A loopback port that refuses every connection: bound but never listening, so it stays ours
/// (no parallel test can take it) for as long as this value lives.
pub struct ClosedPort {
    pub addr: SocketAddr,
    _socket: tokio::net::TcpSocket,
}

pub fn closed_port() -> ClosedPort {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    ClosedPort {
        addr: socket.local_addr().unwrap(),
        _socket: socket,
    }
}
