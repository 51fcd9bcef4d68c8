//! `fencegate fence`: fence a resource through the admin API of a running fencegate.
//!
//! It never writes the database itself: the server's gate must see the fence, both to refuse older
//! writes at once and to drain the ones in flight before it answers.

use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Value, json};

use super::serve::ADMIN_TOKEN_ENV;
use super::sources::ConfigFile;
use crate::token::FencingToken;

/// Flags of `fencegate fence`.
#[derive(Debug, Args)]
pub struct FenceArgs {
    /// The admin plane's base URL [default: http://127.0.0.1:9090].
    #[arg(long, env = "FENCEGATE_ADMIN_URL", value_name = "URL")]
    pub admin: Option<String>,
    /// A CA certificate (PEM) to trust for an https:// admin plane, besides the system's roots.
    #[arg(long, env = "FENCEGATE_ADMIN_CA", value_name = "FILE")]
    pub admin_ca: Option<std::path::PathBuf>,
    /// A client certificate (PEM) for an admin plane that requires one (with --admin-key).
    #[arg(long, value_name = "FILE", requires = "admin_key")]
    pub admin_cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "admin_cert")]
    pub admin_key: Option<std::path::PathBuf>,
    /// The admin bearer token; prefer the environment variable, which the process list does not
    /// show.
    #[arg(long, env = ADMIN_TOKEN_ENV, value_name = "T", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// How long to wait for the answer; a fence waits for older in-flight writes to drain.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub config: ConfigFile,
    /// Fence a resource fencegate has never seen (no write, no fence yet): a new leader may
    /// fence before its first write. Without it such a fence is refused, as a misspelt name
    /// would otherwise fence nothing that any leader writes.
    #[arg(long)]
    pub create: bool,
    /// The resource to fence, as fencegate names it (for example wallet:42).
    pub resource: String,
    /// The new leader's token.
    pub token: FencingToken,
}

/// Why a fence did not complete.
#[derive(Debug, thiserror::Error)]
enum FenceError {
    #[error("--admin {0:?} is not an http:// or https:// URL such as http://127.0.0.1:9090")]
    BadUrl(String),
    #[error("{0}")]
    Tls(crate::tls::TlsError),
    #[error("{0}")]
    Config(crate::config::ConfigError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot reach the admin plane at {url}: {}", crate::problem::with_causes(.source))]
    Unreachable {
        url: String,
        source: hyper_util::client::legacy::Error,
    },
    #[error("the admin plane at {url} did not answer within {}", humantime::format_duration(*.timeout))]
    Timeout { url: String, timeout: Duration },
    #[error("the admin plane's answer was cut off: {0}")]
    Body(hyper::Error),
    #[error("refused ({status}): {detail}")]
    Refused { status: StatusCode, detail: String },
    #[error(
        "resource {0:?} has never been seen (no write, no fence): check the name as fencegate renders it (`fencegate epochs`), or pass --create to fence it anyway"
    )]
    Unknown(String),
}

/// Calls `POST /v1/resources/{resource}/fence` and reports the outcome.
pub fn run(args: &FenceArgs) -> ExitCode {
    match fence(args) {
        Ok(highest) => {
            println!("fenced {}: highest token is now {highest}", args.resource);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fencegate fence: {e}");
            match e {
                // An unusable command line, as README's exit statuses say.
                FenceError::BadUrl(_) | FenceError::Config(_) | FenceError::Tls(_) => {
                    ExitCode::from(2)
                }
                _ => ExitCode::FAILURE,
            }
        }
    }
}

fn fence(args: &FenceArgs) -> Result<u64, FenceError> {
    let base = args
        .config
        .admin_url(args.admin.as_ref())
        .map_err(FenceError::Config)?;
    let url = fence_url(&base, &args.resource)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(FenceError::Runtime)?;
    if !args.create {
        let resource_url = resource_url(&base, &args.resource)?;
        let (status, body) = runtime.block_on(call(args, Method::GET, &resource_url))?;
        match status {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Err(FenceError::Unknown(args.resource.clone())),
            status => return Err(refused(status, &body)),
        }
    }
    let (status, body) = runtime.block_on(call(args, Method::POST, &url))?;
    let answer: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    match (status, answer["highest"].as_u64()) {
        (StatusCode::OK, Some(highest)) => Ok(highest),
        _ => Err(refused(status, &body)),
    }
}

/// A refusal, with the problem document's detail if the body is one.
fn refused(status: StatusCode, body: &[u8]) -> FenceError {
    let answer: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    FenceError::Refused {
        status,
        detail: answer["detail"]
            .as_str()
            .map_or_else(|| String::from_utf8_lossy(body).into_owned(), str::to_owned),
    }
}

/// The fence URL for `resource` under the admin base URL; the resource is one path segment, so
/// every character but letters and digits is percent-encoded.
fn fence_url(base: &str, resource: &str) -> Result<Uri, FenceError> {
    let url = resource_url(base, resource)?;
    format!("{url}/fence")
        .parse()
        .map_err(|_| FenceError::BadUrl(base.to_owned()))
}

/// The admin URL of `resource`, one percent-encoded path segment.
fn resource_url(base: &str, resource: &str) -> Result<Uri, FenceError> {
    let base_ok = base.parse::<Uri>().is_ok_and(|uri| {
        matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some()
    });
    if !base_ok {
        return Err(FenceError::BadUrl(base.to_owned()));
    }
    let resource = utf8_percent_encode(resource, NON_ALPHANUMERIC);
    format!("{}/v1/resources/{resource}", base.trim_end_matches('/'))
        .parse()
        .map_err(|_| FenceError::BadUrl(base.to_owned()))
}

async fn call(
    args: &FenceArgs,
    method: Method,
    url: &Uri,
) -> Result<(StatusCode, Bytes), FenceError> {
    let identity = args.admin_cert.as_deref().zip(args.admin_key.as_deref());
    let tls =
        crate::tls::client_config(args.admin_ca.as_deref(), identity).map_err(FenceError::Tls)?;
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    let client = Client::builder(TokioExecutor::new()).build::<_, Full<Bytes>>(connector);
    let body = match method {
        Method::POST => json!({ "token": args.token.get() }).to_string(),
        _ => String::new(),
    };
    let mut request = Request::builder()
        .method(method)
        .uri(url.clone())
        .header(CONTENT_TYPE, "application/json");
    if let Some(token) = &args.admin_token {
        request = request.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request
        .body(Full::new(Bytes::from(body)))
        .map_err(|_| FenceError::BadUrl(url.to_string()))?;
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|source| FenceError::Unreachable {
                url: url.to_string(),
                source,
            })?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(FenceError::Body)?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(args.timeout, exchange)
        .await
        .map_err(|_| FenceError::Timeout {
            url: url.to_string(),
            timeout: args.timeout,
        })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resource_is_one_encoded_segment() {
        let url = fence_url("http://127.0.0.1:9090/", "files/a b:1").unwrap();
        assert_eq!(
            url.to_string(),
            "http://127.0.0.1:9090/v1/resources/files%2Fa%20b%3A1/fence"
        );
    }

    #[test]
    fn only_http_and_https_urls_are_taken() {
        assert!(fence_url("https://127.0.0.1:9090", "r").is_ok());
        for bad in ["ftp://x:9090", "127.0.0.1:9090", "not a url", ""] {
            assert!(
                matches!(fence_url(bad, "r"), Err(FenceError::BadUrl(_))),
                "{bad}"
            );
        }
    }
}
