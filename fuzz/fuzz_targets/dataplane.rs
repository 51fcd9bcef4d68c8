//! The whole data plane, in-process: a real fencegate (both planes, SQLite and all) in front of a
//! storage server that checks the contract, fed raw bytes over TCP. Any panic aborts the process
//! (a finding); so does storage seeing a fenced write whose token is lower than one it already
//! received, and a connection that neither answers nor closes within five seconds.
#![no_main]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fencegate::config::{Config, Overrides};
use fencegate::server::App;
use http::Method;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::signal::unix::{Signal, SignalKind, signal};

struct Harness {
    runtime: Runtime,
    data: SocketAddr,
    _dir: tempfile::TempDir,
    _broken_pipes: Signal,
}

/// The highest fenced token storage has received, plus one (0: none yet).
static HIGHEST_SEEN: AtomicU64 = AtomicU64::new(0);

static HARNESS: LazyLock<Harness> = LazyLock::new(|| {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        std::process::abort(); // a panic in any task is a finding, not a dropped connection
    }));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let dir = tempfile::tempdir().expect("a scratch directory");
    // A Rust binary ignores SIGPIPE before `main`; libFuzzer's `main` does not, so a write to a
    // socket the peer has closed would kill the fuzzer (it did, nine minutes into a long run).
    // Taking the signal through tokio replaces the default action, as in the fencegate binary.
    let broken_pipes = runtime
        .block_on(async { signal(SignalKind::pipe()) })
        .expect("a SIGPIPE handler");
    let data = runtime.block_on(async {
        let storage = start_storage().await;
        let config = format!(
            r#"
upstream_timeout = "2s"
header_read_timeout = "1s"
idle_timeout = "2s"
in_doubt_grace = "200ms"
max_body = "64KiB"

[[routes]]
path = "/{{*rest}}"
upstream = "http://{storage}"
resource = "all"
max_token_jump = 1000000
"#
        );
        let overrides = Overrides {
            listen: Some("127.0.0.1:0".into()),
            admin_listen: Some("127.0.0.1:0".into()),
            database: Some(dir.path().join("fuzz.db")),
            ..Overrides::default()
        };
        let config = Config::from_toml(&config, Path::new("fuzz.toml"), overrides).expect("valid");
        let app = App::build(config).await.expect("fencegate starts");
        let data = app.data_addr();
        tokio::spawn(app.run_until_stopped(std::future::pending()));
        data
    });
    Harness {
        runtime,
        data,
        _dir: dir,
        _broken_pipes: broken_pipes,
    }
});

/// Storage that answers 200 to everything and aborts if a fenced write goes backwards.
async fn start_storage() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let addr = listener.local_addr().expect("an address");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |request: http::Request<hyper::body::Incoming>| async move {
                        check_order(&request);
                        Ok::<_, Infallible>(http::Response::new(http_body_util::Empty::<
                            bytes::Bytes,
                        >::new()))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn check_order(request: &http::Request<hyper::body::Incoming>) {
    let fenced =
        [Method::POST, Method::PUT, Method::PATCH, Method::DELETE].contains(request.method());
    let token = request
        .headers()
        .get("fencing-token")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let (true, Some(token)) = (fenced, token) {
        let seen = HIGHEST_SEEN.fetch_max(token.saturating_add(1), Ordering::SeqCst);
        assert!(
            seen <= token.saturating_add(1),
            "storage got token {token} after {}",
            seen - 1
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let harness = &*HARNESS;
    harness.runtime.block_on(async {
        let Ok(mut stream) = TcpStream::connect(harness.data).await else {
            return;
        };
        if stream.write_all(data).await.is_err() || stream.shutdown().await.is_err() {
            return;
        }
        let mut answer = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
        assert!(
            read.is_ok(),
            "fencegate neither answered nor closed within 5 s"
        );
    });
});
