//! How much latency fencegate adds to a same-token write (the hot path), measured against calling
//! the same upstream directly in the same run. Run it with `bench/latency.sh`.
//!
//! Each party has its own runtime: a minimal upstream that answers 200 at once, fencegate with
//! its production configuration, and a single keep-alive client. Requests are sequential, so the
//! figures are per-request latencies, not throughput under load (see issue 5 for that).

use std::convert::Infallible;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fencegate::config::{Config, Overrides};
use fencegate::server::App;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

fn main() {
    let requests: usize = std::env::var("BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let upstream = start_upstream();
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_fencegate(upstream, &dir.path().join("bench.db"));

    let client_runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (direct, fenced, unfenced) = client_runtime.block_on(async {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let direct = format!("http://{upstream}/wallets/1");
        let through = format!("http://{proxy}/wallets/1");
        // The first write with token 1 is a durable epoch advance; warm-up takes it out of the figures.
        for url in [&direct, &through] {
            measure(&client, url, "PUT", requests / 10).await;
        }
        let direct = measure(&client, &direct, "PUT", requests).await;
        let fenced = measure(&client, &through, "PUT", requests).await;
        let unfenced = measure(&client, &through, "GET", requests).await;
        (direct, fenced, unfenced)
    });
    report(requests, &direct, &fenced, &unfenced);
}

async fn measure(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    url: &str,
    method: &str,
    count: usize,
) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let request = Request::builder()
            .method(method)
            .uri(url)
            .header("fencing-token", "1")
            .body(Full::new(Bytes::from_static(b"{\"balance\":120}")))
            .unwrap();
        let started = Instant::now();
        let response = client.request(request).await.expect("request succeeds");
        assert!(
            response.status().is_success(),
            "status {}",
            response.status()
        );
        response.into_body().collect().await.unwrap();
        samples.push(started.elapsed());
    }
    samples.sort();
    samples
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn report(requests: usize, direct: &[Duration], fenced: &[Duration], unfenced: &[Duration]) {
    let mut table = String::from(
        "| path | p50 µs | p99 µs | p99.9 µs | p50 ratio to direct | p99 ratio to direct |\n|---|---|---|---|---|---|\n",
    );
    let mut json = Vec::new();
    for (name, samples) in [
        ("direct to upstream", direct),
        ("fencegate, fenced PUT (current token)", fenced),
        ("fencegate, unfenced GET", unfenced),
    ] {
        let (p50, p99, p999) = (
            percentile(samples, 0.50),
            percentile(samples, 0.99),
            percentile(samples, 0.999),
        );
        let ratio50 = micros(p50) / micros(percentile(direct, 0.50));
        let ratio99 = micros(p99) / micros(percentile(direct, 0.99));
        table.push_str(&format!(
            "| {name} | {:.0} | {:.0} | {:.0} | {ratio50:.2} | {ratio99:.2} |\n",
            micros(p50),
            micros(p99),
            micros(p999)
        ));
        json.push(serde_json::json!({
            "path": name, "p50_us": micros(p50), "p99_us": micros(p99), "p999_us": micros(p999),
            "p50_ratio_to_direct": ratio50, "p99_ratio_to_direct": ratio99,
        }));
    }
    let added = micros(percentile(fenced, 0.50)) - micros(percentile(direct, 0.50));
    let summary = format!(
        "{requests} sequential requests per path, one keep-alive connection.\n\n{table}\nA same-token write adds {added:.0} µs at the median over calling the upstream directly.\n"
    );
    println!("{summary}");
    let results = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/results");
    std::fs::create_dir_all(&results).unwrap();
    std::fs::write(results.join("latency.md"), summary).unwrap();
    let document =
        serde_json::json!({ "requests": requests, "added_p50_us": added, "paths": json });
    std::fs::write(
        results.join("latency.json"),
        serde_json::to_string_pretty(&document).unwrap(),
    )
    .unwrap();
}

/// An upstream that answers 200 at once, on its own thread and runtime.
fn start_upstream() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        |request: Request<hyper::body::Incoming>| async move {
                            request.into_body().collect().await.ok();
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    });
    addr
}

/// fencegate on its own multi-threaded runtime, as `fencegate serve` runs it.
fn start_fencegate(upstream: std::net::SocketAddr, db: &Path) -> std::net::SocketAddr {
    let overrides = Overrides {
        listen: Some("127.0.0.1:0".into()),
        admin_listen: Some("127.0.0.1:0".into()),
        database: Some(db.to_owned()),
        ..Overrides::default()
    };
    let config = format!(
        "[[routes]]\npath = \"/wallets/{{id}}\"\nupstream = \"http://{upstream}\"\nresource = \"wallet:{{id}}\"\n"
    );
    let config = Config::from_toml(&config, Path::new("bench.toml"), overrides).unwrap();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let app = App::build(config).await.unwrap();
            sender.send(app.data_addr()).unwrap();
            app.run_until_stopped(std::future::pending()).await.unwrap();
        });
    });
    receiver.recv().unwrap()
}
