//! `fencegate demo`: the split-brain wallet story from the seed documents, played on this machine.
//!
//! An in-process storage server that checks nothing, two leaders of different generations, and
//! two acts: the leaders write straight to storage (the old leader's late write wins: the new
//! leader's update is lost), then through a real fencegate (the old leader gets 409, learns the
//! newer token and steps down). The command exits 0 only if the fenced act came out right, so it
//! doubles as a smoke test of a build.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::get;
use clap::Args;
use http::header::HeaderMap;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::config::{Config, Overrides};
use crate::server::App;
use crate::token::FENCING_TOKEN_HIGHEST;

/// Flags of `fencegate demo` (none yet: it needs no set-up).
#[derive(Debug, Args)]
pub struct DemoArgs {}

/// Plays both acts and reports whether fencing kept the wallet right.
pub fn run(_args: &DemoArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("fencegate demo: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(play()) {
        Ok(()) => {
            println!(
                "\nResult: fenced correctly. The zombie was refused, the wallet holds $120, and the"
            );
            println!("audit log says who was turned away and why.");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("\nResult: NOT fenced correctly: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn play() -> anyhow::Result<()> {
    let storage = Storage::start().await?;
    let http = Http::new();
    println!("fencegate demo: the split-brain wallet\n");
    println!(
        "A wallet holds $100. Leader A (generation 1) adds $50. The network breaks, A goes quiet,"
    );
    println!(
        "and leader B (generation 2) is elected and adds $20. But A was only paused, and when it"
    );
    println!("wakes it still believes it leads. Both started from $100; the right answer is $120.");

    println!("\n--- Act 1: both leaders write straight to the storage ---");
    let act_one = storage.url("/wallets/1");
    http.put(&act_one, None, "100").await?;
    step("storage", "wallet = $100");
    step(
        "leader A (gen 1)",
        "reads $100, then stalls in a long GC pause",
    );
    step("leader B (gen 2)", "is elected, reads $100 and writes $120");
    let b = http.put(&act_one, None, "120").await?;
    step("", &format!("-> {}", b.status));
    step(
        "leader A (gen 1)",
        "wakes, still believes it leads, writes $150",
    );
    let a = http.put(&act_one, None, "150").await?;
    step(
        "",
        &format!("-> {} (the storage cannot tell A is stale)", a.status),
    );
    let unfenced = http.get(&act_one).await?;
    step(
        "storage",
        &format!("wallet = ${unfenced}: B's $20 is lost, A overwrote the new leader (split-brain)"),
    );

    println!("\n--- Act 2: the same leaders, through fencegate ---");
    let dir = tempfile::tempdir().context("cannot create a scratch directory")?;
    let (app, stop, served) = start_fencegate(storage.addr, dir.path()).await?;
    let proxy = format!("http://{}/wallets/2", app.0);
    let admin = format!("http://{}", app.1);
    step(
        "leader A (gen 1)",
        "writes $100 with Fencing-Token: 1 (it leads generation 1)",
    );
    let opening = http.put(&proxy, Some(1), "100").await?;
    step("", &format!("-> {}", opening.status));
    step(
        "leader A (gen 1)",
        "reads $100, then stalls in a long GC pause",
    );
    step(
        "leader B (gen 2)",
        "is elected and fences wallet:2 at its generation",
    );
    let fence = http
        .post(
            &format!("{admin}/v1/resources/wallet%3A2/fence"),
            r#"{"token":2}"#,
        )
        .await?;
    step("", &format!("-> {} {}", fence.status, fence.body.trim()));
    step("leader B (gen 2)", "writes $120 with Fencing-Token: 2");
    let b = http.put(&proxy, Some(2), "120").await?;
    step("", &format!("-> {}", b.status));
    step(
        "leader A (gen 1)",
        "wakes, still believes it leads, writes $150 with Fencing-Token: 1",
    );
    let a = http.put(&proxy, Some(1), "150").await?;
    let told = a.highest.clone().unwrap_or_default();
    step(
        "",
        &format!("-> {}, Fencing-Token-Highest: {told}", a.status),
    );
    if a.status == StatusCode::CONFLICT {
        step(
            "leader A (gen 1)",
            &format!("learns generation {told} exists and steps down"),
        );
    }
    let fenced = storage.value("/wallets/2").unwrap_or_default();
    step("storage", &format!("wallet = ${fenced}"));
    let audit = http
        .get(&format!("{admin}/v1/rejections?resource=wallet%3A2"))
        .await?;
    let rows: serde_json::Value = serde_json::from_str(&audit).context("the audit log answer")?;
    let rejections = rows["rejections"].as_array().cloned().unwrap_or_default();
    for row in &rejections {
        step(
            "audit log",
            &format!(
                "{} {} {} rejected: {} token {} < highest {}",
                row["at"].as_str().unwrap_or(""),
                row["method"].as_str().unwrap_or(""),
                row["path"].as_str().unwrap_or(""),
                row["reason"].as_str().unwrap_or(""),
                row["token"],
                row["highest"]
            ),
        );
    }
    let _ = stop.send(());
    served.await.context("fencegate stopped badly")??;

    if a.status != StatusCode::CONFLICT || told != "2" {
        bail!(
            "the old leader got {} (highest {told:?}), not 409 with highest 2",
            a.status
        );
    }
    if b.status != StatusCode::OK {
        bail!("the new leader's write got {}, not 200", b.status);
    }
    if fenced != "120" {
        bail!("the wallet holds ${fenced}, not $120");
    }
    let stale_row = rejections
        .iter()
        .any(|row| row["reason"] == "stale" && row["token"] == 1 && row["highest"] == 2);
    if !stale_row {
        bail!("the audit log has no row for the old leader's write");
    }
    Ok(())
}

fn step(who: &str, what: &str) {
    println!("  {who:<18} {what}");
}

/// Starts fencegate in this process on free loopback ports, in front of `storage`.
async fn start_fencegate(
    storage: SocketAddr,
    dir: &Path,
) -> anyhow::Result<(
    (SocketAddr, SocketAddr),
    oneshot::Sender<()>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
)> {
    let toml = format!(
        "[[routes]]\npath = \"/wallets/{{id}}\"\nupstream = \"http://{storage}\"\nresource = \"wallet:{{id}}\"\n"
    );
    let overrides = Overrides {
        listen: Some("127.0.0.1:0".into()),
        admin_listen: Some("127.0.0.1:0".into()),
        database: Some(dir.join("fencegate.db")),
        ..Overrides::default()
    };
    let config = Config::from_toml(&toml, Path::new("demo.toml"), overrides)?;
    let app = App::build(config).await?;
    let addrs = (app.data_addr(), app.admin_addr());
    let (stop, stopped) = oneshot::channel::<()>();
    let served = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    Ok((addrs, stop, served))
}

/// Storage that somebody else wrote: it keeps whatever it is sent, and checks no token.
struct Storage {
    addr: SocketAddr,
    values: Values,
}

/// The storage's contents, by path.
type Values = Arc<Mutex<HashMap<String, String>>>;

impl Storage {
    async fn start() -> anyhow::Result<Self> {
        let values = Values::default();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let router = Router::new()
            .route("/wallets/{id}", get(read_wallet).put(write_wallet))
            .with_state(Arc::clone(&values));
        tokio::spawn(async move { axum::serve(listener, router).await });
        Ok(Self { addr, values })
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn value(&self, path: &str) -> Option<String> {
        self.lock().get(path).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.values
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

async fn read_wallet(
    State(values): State<Values>,
    UrlPath(id): UrlPath<String>,
) -> (StatusCode, String) {
    let values = values.lock().unwrap_or_else(|p| p.into_inner());
    match values.get(&format!("/wallets/{id}")) {
        Some(value) => (StatusCode::OK, value.clone()),
        None => (StatusCode::NOT_FOUND, String::new()),
    }
}

async fn write_wallet(
    State(values): State<Values>,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> StatusCode {
    let value = String::from_utf8_lossy(&body).into_owned();
    values
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(format!("/wallets/{id}"), value);
    StatusCode::OK
}

/// What the demo needs of an answer.
struct Answer {
    status: StatusCode,
    highest: Option<String>,
    body: String,
}

/// A small HTTP client for the leaders and the operator.
struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Http {
    fn new() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    async fn put(&self, url: &str, token: Option<u64>, body: &str) -> anyhow::Result<Answer> {
        let mut headers = HeaderMap::new();
        if let Some(token) = token {
            headers.insert("fencing-token", token.into());
        }
        self.send(Method::PUT, url, headers, body).await
    }

    async fn post(&self, url: &str, body: &str) -> anyhow::Result<Answer> {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "application/json".parse()?);
        self.send(Method::POST, url, headers, body).await
    }

    async fn get(&self, url: &str) -> anyhow::Result<String> {
        Ok(self
            .send(Method::GET, url, HeaderMap::new(), "")
            .await?
            .body)
    }

    async fn send(
        &self,
        method: Method,
        url: &str,
        headers: HeaderMap,
        body: &str,
    ) -> anyhow::Result<Answer> {
        let mut request = Request::builder().method(method).uri(url);
        if let Some(map) = request.headers_mut() {
            map.extend(headers);
        }
        let request = request.body(Full::new(Bytes::from(body.to_owned())))?;
        let response = self
            .client
            .request(request)
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        let status = response.status();
        let highest = response
            .headers()
            .get(FENCING_TOKEN_HIGHEST)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let body = response.into_body().collect().await?.to_bytes();
        Ok(Answer {
            status,
            highest,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}
