//! Configuration: one typed [`Config`], loaded and fully validated before anything binds.
//!
//! Layering: the TOML file, then `FENCEGATE_*` environment variables, then flags (clap reads the
//! environment variables for the flags that have them, so both arrive here as [`Overrides`]).
//! Every error names the key that is wrong and what would be right.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Method;
use serde::Deserialize;

use crate::profile::keys::{self, KeyMap};
use crate::profile::{KeyApi, PROFILE_NAMES, Profile, couchdb, s3, webdav};
use crate::proxy::Upstream;
use crate::route::methods::{self, DEFAULT_UNFENCED_METHODS};
use crate::route::{Allow, Route, RoutePolicy, RouteTable};
use crate::store::Retention;
use crate::telemetry::LogLevel;
use crate::tls::TlsFiles;

/// Where the data plane listens unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Where the admin plane listens unless told otherwise.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
/// The SQLite file, relative to the working directory.
pub const DEFAULT_DATABASE: &str = "fencegate.db";
/// How long an upstream may take to answer before the client gets 504.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a torn-down upstream request keeps newer tokens back: the upstream may still apply it.
pub const DEFAULT_IN_DOUBT_GRACE: Duration = Duration::from_secs(1);
/// The largest request body forwarded: 16 MiB.
pub const DEFAULT_MAX_BODY: u64 = 16 * 1024 * 1024;
/// How long a graceful shutdown waits for in-flight requests.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Audit-log rows older than this are pruned: 30 days.
pub const DEFAULT_AUDIT_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);
/// At most this many audit-log rows are kept *per reason*: with the five reasons recorded today, a
/// million rows at most, as before retention kept reasons apart (README gives the bytes a row
/// costs).
pub const DEFAULT_AUDIT_MAX_ROWS: u64 = 200_000;
/// How often retention looks for audit-log rows to prune.
pub const DEFAULT_AUDIT_PRUNE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a client may take from the first byte of a request head to its end (slowloris).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may wait for its next request before it is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest request head (request line and headers): 32 KiB.
pub const DEFAULT_MAX_HEADER_SIZE: u64 = 32 * 1024;
/// The most header fields in one request.
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// The most open connections per plane; more wait in the listen backlog.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// How long opening a connection to an upstream may take before the client gets 502.
pub const DEFAULT_UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The most data-plane worker threads one may ask for; more than this is a typo, not a machine.
pub const MAX_WORKER_THREADS: usize = 1024;
/// The longest resource name, in bytes, that a request may render; a longer one is refused with
/// 414 before the gate, so no client can make the database or the audit log grow by name length.
pub const DEFAULT_MAX_RESOURCE_LEN: usize = 512;
/// The most `max_resource_len` may be set to: resource names are keys, not documents.
pub const MAX_MAX_RESOURCE_LEN: usize = 8192;
/// The most of a request body read before the gate, where a profile names resources from it.
pub const DEFAULT_MAX_INSPECT_BODY: u64 = 1024 * 1024;
/// The most resources one request may change (a bulk write, a transaction): each is a gate to pass
/// and a permit to hold.
pub const DEFAULT_MAX_RESOURCES_PER_REQUEST: usize = 1000;
/// The resource of the catch-all route that `--upstream` makes without a config file.
pub const DEFAULT_RESOURCE: &str = "default";

/// The admin bearer token. Never shown by `Debug` or in logs.
#[derive(Clone)]
pub struct AdminToken(String);

impl AdminToken {
    /// Whether `presented` is this token, compared in time independent of where they differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let expected = self.0.as_bytes();
        let mut difference = expected.len() ^ presented.len();
        for (i, byte) in expected.iter().enumerate() {
            difference |= usize::from(byte ^ presented.get(i).copied().unwrap_or(0));
        }
        difference == 0
    }
}

impl PartialEq for AdminToken {
    fn eq(&self, other: &AdminToken) -> bool {
        self.matches(other.0.as_bytes())
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// What one client may cost either plane. Every field is configurable; see README.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_header_size: usize,
    pub max_headers: usize,
    pub max_connections: usize,
}

/// The validated configuration of `fencegate serve`.
#[derive(Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub database: PathBuf,
    pub admin_token: Option<AdminToken>,
    pub upstream_timeout: Duration,
    pub upstream_connect_timeout: Duration,
    pub limits: Limits,
    pub in_doubt_grace: Duration,
    pub max_body: u64,
    /// The longest resource name, in bytes, a request may render (admin calls too).
    pub max_resource_len: usize,
    /// The most of a body a profile reads before the gate.
    pub max_inspect_body: u64,
    /// The most resources one request may change.
    pub max_resources_per_request: usize,
    pub shutdown_grace: Duration,
    /// How much of the audit log to keep.
    pub retention: Retention,
    pub audit_prune_interval: Duration,
    /// Threads of the async runtime that serves both planes; `None` means one per CPU core.
    pub worker_threads: Option<usize>,
    /// One log line per data-plane request (`access_log`, `--access-log`).
    pub access_log: bool,
    /// What is logged (`log_level`); `RUST_LOG`, when set, wins.
    pub log_level: Option<LogLevel>,
    /// Cluster mode: `Some` when `database` is a `postgres://` URL.
    pub cluster: Option<ClusterConfig>,
    /// `[tls]`: the data plane serves HTTPS only (and, with `client_ca`, requires client
    /// certificates). The files were loaded once to check them.
    pub tls: Option<TlsFiles>,
    /// `[admin_tls]`: the same for the admin plane.
    pub admin_tls: Option<TlsFiles>,
    pub routes: RouteTable,
}

/// The default number of shards a new cluster is created with.
pub const DEFAULT_SHARDS: u32 = 64;
/// The default lease time: a crashed replica's shards move after about this plus `in_doubt_grace`.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(6);
/// The default clock-rate error the lease timing tolerates: 1%.
pub const DEFAULT_MAX_CLOCK_DRIFT: f64 = 0.01;
/// The default peer-plane address.
pub const DEFAULT_PEER_LISTEN: &str = "127.0.0.1:8181";
/// The environment variable that holds the cluster secret (never a file or a flag).
pub const CLUSTER_SECRET_ENV: &str = "FENCEGATE_CLUSTER_SECRET";

/// Cluster mode's settings (`[cluster]`, `--replica`, `--peer-listen`, `--peer-advertise`).
#[derive(Clone, PartialEq)]
pub struct ClusterConfig {
    /// The shared PostgreSQL (`database`).
    pub url: String,
    /// This replica's name: unique and stable.
    pub replica: String,
    pub peer_listen: SocketAddr,
    /// How the other replicas reach this one's peer plane.
    pub peer_advertise: String,
    pub shards: u32,
    pub lease_ttl: Duration,
    /// As a fraction: 0.01 for `1%`.
    pub max_clock_drift: f64,
    /// Authenticates the peer plane (`FENCEGATE_CLUSTER_SECRET`).
    pub secret: Option<String>,
    /// `[cluster.peer_tls]`: the peer plane's certificate and key, which this replica also
    /// presents to the others; with `client_ca`, the CA every replica's certificate comes from,
    /// required of connecting replicas and trusted for the replicas it connects to.
    pub peer_tls: Option<TlsFiles>,
}

impl fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("replica", &self.replica)
            .field("peer_listen", &self.peer_listen)
            .field("peer_advertise", &self.peer_advertise)
            .field("shards", &self.shards)
            .field("lease_ttl", &self.lease_ttl)
            .field("max_clock_drift", &self.max_clock_drift)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("peer_tls", &self.peer_tls)
            .finish_non_exhaustive()
    }
}

/// The PostgreSQL URL `database` names, if it names one (cluster mode).
pub fn postgres_url(database: &Path) -> Option<&str> {
    database
        .to_str()
        .filter(|text| text.starts_with("postgres://") || text.starts_with("postgresql://"))
}

/// Values from flags and the environment; each one, when present, wins over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    /// Without a file: one catch-all route to this URL. With a file: replaces every route's upstream.
    pub upstream: Option<String>,
    pub database: Option<PathBuf>,
    pub admin_token: Option<String>,
    /// `--access-log`: on, whatever the file says.
    pub access_log: bool,
    pub replica: Option<String>,
    pub peer_listen: Option<String>,
    pub peer_advertise: Option<String>,
    /// `FENCEGATE_CLUSTER_SECRET`.
    pub cluster_secret: Option<String>,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{key}: {problem}")]
    Invalid { key: String, problem: String },
    #[error("no routes: pass --upstream URL, or --config FILE with at least one [[routes]] entry")]
    NoRoutes,
}

fn invalid(key: impl Into<String>, problem: impl fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.to_string(),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    admin_listen: Option<String>,
    database: Option<PathBuf>,
    admin_token: Option<String>,
    upstream_timeout: Option<String>,
    upstream_connect_timeout: Option<String>,
    header_read_timeout: Option<String>,
    idle_timeout: Option<String>,
    max_header_size: Option<Size>,
    max_headers: Option<usize>,
    max_connections: Option<usize>,
    in_doubt_grace: Option<String>,
    max_body: Option<Size>,
    max_resource_len: Option<usize>,
    max_inspect_body: Option<Size>,
    max_resources_per_request: Option<usize>,
    shutdown_grace: Option<String>,
    audit_max_age: Option<String>,
    audit_max_rows: Option<u64>,
    audit_prune_interval: Option<String>,
    worker_threads: Option<usize>,
    access_log: Option<bool>,
    log_level: Option<String>,
    cluster: Option<FileCluster>,
    tls: Option<FileTls>,
    admin_tls: Option<FileTls>,
    #[serde(default)]
    routes: Vec<FileRoute>,
}

/// `[tls]`, `[admin_tls]`: one plane's TLS.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

/// `[cluster]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCluster {
    replica: Option<String>,
    peer_listen: Option<String>,
    peer_advertise: Option<String>,
    shards: Option<u32>,
    lease_ttl: Option<String>,
    max_clock_drift: Option<String>,
    /// `[cluster.peer_tls]`: the peer plane serves HTTPS, and replicas speak it to each other.
    peer_tls: Option<FileTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRoute {
    path: String,
    upstream: String,
    resource: String,
    unfenced_methods: Option<Vec<String>>,
    /// Replaced by `unfenced_methods`; read only to say so.
    fenced_methods: Option<toml::Value>,
    #[serde(default)]
    fence_reads: bool,
    max_token_jump: Option<u64>,
    /// A storage API to read requests with: `webdav`, `s3`, `couchdb`, `etcd-v3`.
    profile: Option<String>,
    /// Forward the client's `Host` unchanged; the default is the profile's (`true` for `s3`).
    preserve_host: Option<bool>,
    /// The header leaders send their token in; `Fencing-Token` by default.
    token_header: Option<String>,
    /// `[[routes.keys]]`: key prefixes to resources, for a profile route.
    #[serde(default)]
    keys: Vec<FileKeys>,
    /// The client certificate identities that may send fenced requests.
    allow: Option<Vec<String>>,
    /// SHA-256 digests (hex) of the bearer tokens that may send fenced requests.
    allow_bearer_sha256: Option<Vec<String>>,
    /// For an `https://` upstream: a CA bundle trusted besides the system's roots.
    upstream_ca: Option<PathBuf>,
    /// For an `https://` upstream that wants mTLS: the certificate fencegate presents, and its key.
    upstream_cert: Option<PathBuf>,
    upstream_key: Option<PathBuf>,
}

/// One `[[routes.keys]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKeys {
    prefix: String,
    resource: String,
}

/// `max_body = 1048576` and `max_body = "16MiB"` both work.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Size {
    Bytes(u64),
    Text(String),
}

impl Config {
    /// Loads `file` (if any) and applies `overrides`.
    pub fn load(file: Option<&Path>, overrides: Overrides) -> Result<Config, ConfigError> {
        let parsed = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                parse_file(&text, path)?
            }
            None => FileConfig::default(),
        };
        build(parsed, file.is_some(), overrides)
    }

    /// Parses configuration text as if read from `origin` (used by tests and `check-config`).
    pub fn from_toml(
        text: &str,
        origin: &Path,
        overrides: Overrides,
    ) -> Result<Config, ConfigError> {
        build(parse_file(text, origin)?, true, overrides)
    }
}

fn parse_file(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Syntax {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

fn build(
    mut file: FileConfig,
    from_file: bool,
    overrides: Overrides,
) -> Result<Config, ConfigError> {
    let database = overrides
        .database
        .clone()
        .or(file.database.take())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATABASE));
    let in_doubt_grace = duration(
        "in_doubt_grace",
        file.in_doubt_grace.clone(),
        DEFAULT_IN_DOUBT_GRACE,
    )?;
    let cluster = cluster(&database, file.cluster.take(), &overrides)?;
    let limits = limits(&file)?;
    let listen = address("listen", overrides.listen.or(file.listen), DEFAULT_LISTEN)?;
    let admin_listen = address(
        "admin_listen",
        overrides.admin_listen.or(file.admin_listen),
        DEFAULT_ADMIN_LISTEN,
    )?;
    let admin_token = match overrides.admin_token.clone().or(file.admin_token) {
        Some(token) if token.trim().is_empty() => {
            return Err(invalid("admin_token", "must not be empty"));
        }
        Some(token) => Some(AdminToken(token)),
        None => None,
    };
    if admin_token.is_none() && !admin_listen.ip().is_loopback() {
        return Err(invalid(
            "admin_listen",
            format!(
                "{admin_listen} is not a loopback address, and no admin_token is set; \
                 set admin_token (or FENCEGATE_ADMIN_TOKEN) before exposing the admin plane"
            ),
        ));
    }
    let routes = routes(file.routes, from_file, overrides.upstream.as_deref())?;
    let tls = tls_files("tls", file.tls)?;
    check_allow_has_client_certificates(&routes, tls.as_ref())?;
    Ok(Config {
        listen,
        admin_listen,
        database,
        admin_token,
        upstream_timeout: duration(
            "upstream_timeout",
            file.upstream_timeout,
            DEFAULT_UPSTREAM_TIMEOUT,
        )?,
        upstream_connect_timeout: positive_duration(
            "upstream_connect_timeout",
            file.upstream_connect_timeout,
            DEFAULT_UPSTREAM_CONNECT_TIMEOUT,
        )?,
        limits,
        in_doubt_grace,
        max_body: size("max_body", file.max_body, DEFAULT_MAX_BODY)?,
        max_resource_len: count(
            "max_resource_len",
            file.max_resource_len,
            DEFAULT_MAX_RESOURCE_LEN,
            MAX_MAX_RESOURCE_LEN,
        )?,
        max_inspect_body: size(
            "max_inspect_body",
            file.max_inspect_body,
            DEFAULT_MAX_INSPECT_BODY,
        )?,
        max_resources_per_request: count(
            "max_resources_per_request",
            file.max_resources_per_request,
            DEFAULT_MAX_RESOURCES_PER_REQUEST,
            100_000,
        )?,
        shutdown_grace: duration(
            "shutdown_grace",
            file.shutdown_grace,
            DEFAULT_SHUTDOWN_GRACE,
        )?,
        retention: Retention {
            max_age: positive(duration(
                "audit_max_age",
                file.audit_max_age,
                DEFAULT_AUDIT_MAX_AGE,
            )?)
            .ok_or_else(|| invalid("audit_max_age", "must be longer than 0s"))?,
            max_rows: match file.audit_max_rows {
                Some(0) => return Err(invalid("audit_max_rows", "must be at least 1")),
                rows => rows.unwrap_or(DEFAULT_AUDIT_MAX_ROWS),
            },
        },
        audit_prune_interval: positive(duration(
            "audit_prune_interval",
            file.audit_prune_interval,
            DEFAULT_AUDIT_PRUNE_INTERVAL,
        )?)
        .ok_or_else(|| invalid("audit_prune_interval", "must be longer than 0s"))?,
        worker_threads: match file.worker_threads {
            Some(1..=MAX_WORKER_THREADS) | None => file.worker_threads,
            Some(threads) => {
                return Err(invalid(
                    "worker_threads",
                    format!("{threads} is not a thread count from 1 to {MAX_WORKER_THREADS}"),
                ));
            }
        },
        access_log: overrides.access_log || file.access_log.unwrap_or(false),
        log_level: file
            .log_level
            .as_deref()
            .map(LogLevel::parse)
            .transpose()
            .map_err(|problem| invalid("log_level", problem))?,
        cluster,
        tls,
        admin_tls: tls_files("admin_tls", file.admin_tls)?,
        routes,
    })
}

/// A plane's TLS table, checked by loading it: a file that is missing, unreadable or not the
/// pair it claims to be stops the start (or the reload) with the reason.
fn tls_files(key: &str, table: Option<FileTls>) -> Result<Option<TlsFiles>, ConfigError> {
    let Some(table) = table else {
        return Ok(None);
    };
    let files = TlsFiles {
        cert: table.cert,
        key: table.key,
        client_ca: table.client_ca,
    };
    crate::tls::ServerTls::load(files.clone()).map_err(|error| invalid(key, error))?;
    Ok(Some(files))
}

/// Cluster mode's settings, when `database` is a PostgreSQL URL; `[cluster]` or a cluster flag
/// without one is a mistake worth stopping for.
fn cluster(
    database: &Path,
    file: Option<FileCluster>,
    overrides: &Overrides,
) -> Result<Option<ClusterConfig>, ConfigError> {
    let Some(url) = postgres_url(database) else {
        if file.is_some() {
            return Err(invalid(
                "cluster",
                "[cluster] applies only when `database` is a postgres:// URL (cluster mode)",
            ));
        }
        if overrides.replica.is_some()
            || overrides.peer_listen.is_some()
            || overrides.peer_advertise.is_some()
        {
            return Err(invalid(
                "replica",
                "--replica, --peer-listen and --peer-advertise apply only when `database` is a postgres:// URL",
            ));
        }
        return Ok(None);
    };
    let file = file.unwrap_or_default();
    let replica = match overrides.replica.clone().or(file.replica) {
        Some(name) => name,
        None => host_name().ok_or_else(|| {
            invalid(
                "cluster.replica",
                "not set, and the host name cannot be read; set it",
            )
        })?,
    };
    if replica.is_empty()
        || replica.len() > 128
        || !replica
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(invalid(
            "cluster.replica",
            format!("{replica:?} is not 1 to 128 letters, digits, '-', '_' or '.'"),
        ));
    }
    let peer_listen = address(
        "cluster.peer_listen",
        overrides.peer_listen.clone().or(file.peer_listen),
        DEFAULT_PEER_LISTEN,
    )?;
    let peer_tls = tls_files("cluster.peer_tls", file.peer_tls)?;
    // The peer plane speaks HTTPS exactly when `peer_tls` is set.
    let scheme = if peer_tls.is_some() { "https" } else { "http" };
    let peer_advertise = overrides
        .peer_advertise
        .clone()
        .or(file.peer_advertise)
        .unwrap_or_else(|| format!("{scheme}://{peer_listen}"));
    match peer_advertise.parse::<http::Uri>() {
        Ok(uri) if uri.scheme_str() == Some(scheme) && uri.authority().is_some() => {}
        _ => {
            let why = if peer_tls.is_some() {
                "[cluster.peer_tls] is set, so the peer plane serves HTTPS"
            } else {
                "the peer plane serves plain HTTP without [cluster.peer_tls]"
            };
            return Err(invalid(
                "cluster.peer_advertise",
                format!("{peer_advertise:?} is not a {scheme}://host:port URL ({why})"),
            ));
        }
    }
    let shards = match file.shards.unwrap_or(DEFAULT_SHARDS) {
        shards @ 1..=65_536 => shards,
        shards => {
            return Err(invalid(
                "cluster.shards",
                format!("{shards} is not from 1 to 65536"),
            ));
        }
    };
    let lease_ttl = positive_duration("cluster.lease_ttl", file.lease_ttl, DEFAULT_LEASE_TTL)?;
    if lease_ttl < Duration::from_millis(300) {
        return Err(invalid("cluster.lease_ttl", "must be at least 300ms"));
    }
    let max_clock_drift = match file.max_clock_drift {
        None => DEFAULT_MAX_CLOCK_DRIFT,
        Some(text) => percent(&text)
            .filter(|drift| (0.0..=0.2).contains(drift))
            .ok_or_else(|| {
                invalid(
                    "cluster.max_clock_drift",
                    format!("{text:?} is not a percentage from 0% to 20%, such as \"1%\""),
                )
            })?,
    };
    let secret = overrides.cluster_secret.clone().filter(|s| !s.is_empty());
    if secret.is_none() && !peer_listen.ip().is_loopback() {
        return Err(invalid(
            "cluster.peer_listen",
            format!(
                "{peer_listen} is not a loopback address, and {CLUSTER_SECRET_ENV} is not set; \
                 set the cluster secret before exposing the peer plane"
            ),
        ));
    }
    Ok(Some(ClusterConfig {
        url: url.to_owned(),
        replica,
        peer_listen,
        peer_advertise,
        shards,
        lease_ttl,
        max_clock_drift,
        secret,
        peer_tls,
    }))
}

/// `"1%"` or `"0.5 %"` as a fraction.
fn percent(text: &str) -> Option<f64> {
    let number = text.trim().strip_suffix('%')?.trim();
    let value: f64 = number.parse().ok()?;
    value.is_finite().then_some(value / 100.0)
}

fn host_name() -> Option<String> {
    let name = rustix::system::uname();
    let name = name.nodename().to_str().ok()?.trim();
    (!name.is_empty()).then(|| name.to_owned())
}

fn limits(file: &FileConfig) -> Result<Limits, ConfigError> {
    let max_header_size = size(
        "max_header_size",
        file.max_header_size.clone(),
        DEFAULT_MAX_HEADER_SIZE,
    )?;
    // hyper's read buffer, which bounds the head, cannot be smaller than 8 KiB.
    if !(8 * 1024..=1024 * 1024).contains(&max_header_size) {
        return Err(invalid("max_header_size", "must be from 8KiB to 1MiB"));
    }
    Ok(Limits {
        header_read_timeout: positive_duration(
            "header_read_timeout",
            file.header_read_timeout.clone(),
            DEFAULT_HEADER_READ_TIMEOUT,
        )?,
        idle_timeout: positive_duration(
            "idle_timeout",
            file.idle_timeout.clone(),
            DEFAULT_IDLE_TIMEOUT,
        )?,
        max_header_size: usize::try_from(max_header_size).unwrap_or(usize::MAX),
        max_headers: count("max_headers", file.max_headers, DEFAULT_MAX_HEADERS, 10_000)?,
        max_connections: count(
            "max_connections",
            file.max_connections,
            DEFAULT_MAX_CONNECTIONS,
            1_000_000,
        )?,
    })
}

fn count(
    key: &str,
    value: Option<usize>,
    default: usize,
    max: usize,
) -> Result<usize, ConfigError> {
    match value.unwrap_or(default) {
        n if (1..=max).contains(&n) => Ok(n),
        n => Err(invalid(
            key,
            format!("{n} is not a whole number from 1 to {max}"),
        )),
    }
}

fn positive_duration(
    key: &str,
    value: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    positive(duration(key, value, default)?).ok_or_else(|| invalid(key, "must be longer than 0s"))
}

fn address(key: &str, value: Option<String>, default: &str) -> Result<SocketAddr, ConfigError> {
    let text = value.as_deref().unwrap_or(default);
    text.parse().map_err(|_| {
        invalid(
            key,
            format!("{text:?} is not an IP:port address, such as {default}"),
        )
    })
}

fn duration(key: &str, value: Option<String>, default: Duration) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(text) => humantime::parse_duration(&text).map_err(|e| {
            invalid(
                key,
                format!("{text:?} is not a duration such as \"30s\" or \"1m\" ({e})"),
            )
        }),
    }
}

fn positive(duration: Duration) -> Option<Duration> {
    Some(duration).filter(|duration| !duration.is_zero())
}

fn size(key: &str, value: Option<Size>, default: u64) -> Result<u64, ConfigError> {
    let bytes = match value {
        None => default,
        Some(Size::Bytes(bytes)) => bytes,
        Some(Size::Text(text)) => text
            .parse::<bytesize::ByteSize>()
            .map_err(|_| {
                invalid(
                    key,
                    format!("{text:?} is not a size such as \"16MiB\" or 1048576"),
                )
            })?
            .as_u64(),
    };
    if bytes == 0 {
        return Err(invalid(key, "must be more than 0 bytes"));
    }
    Ok(bytes)
}

fn routes(
    file_routes: Vec<FileRoute>,
    from_file: bool,
    upstream: Option<&str>,
) -> Result<RouteTable, ConfigError> {
    if !from_file || file_routes.is_empty() {
        if from_file {
            return Err(ConfigError::NoRoutes);
        }
        let url = upstream.ok_or(ConfigError::NoRoutes)?;
        let upstream = url
            .parse::<Upstream>()
            .map_err(|e| invalid("--upstream", e))?;
        let policy = RoutePolicy {
            unfenced_methods: DEFAULT_UNFENCED_METHODS.to_vec(),
            fence_reads: false,
            max_token_jump: None,
            profile: None,
            preserve_host: false,
            token_header: crate::token::FENCING_TOKEN,
            allow: None,
        };
        let route = Route::new("/{*rest}", upstream, DEFAULT_RESOURCE, policy)
            .map_err(|e| invalid("--upstream", e))?;
        return Ok(RouteTable::new(vec![route]));
    }
    let routes = file_routes
        .into_iter()
        .enumerate()
        .map(|(index, route)| build_route(index, route, upstream))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RouteTable::new(routes))
}

fn build_route(
    index: usize,
    route: FileRoute,
    upstream_override: Option<&str>,
) -> Result<Route, ConfigError> {
    let key = |field: &str| format!("routes[{index}].{field}");
    let (upstream_key, url) = match upstream_override {
        Some(url) => ("--upstream".to_owned(), url),
        None => (key("upstream"), route.upstream.as_str()),
    };
    let upstream = url
        .parse::<Upstream>()
        .map_err(|e| invalid(&upstream_key, e))?;
    let upstream = upstream_tls(index, &route, upstream)?;
    if route.fenced_methods.is_some() {
        return Err(invalid(
            key("fenced_methods"),
            "was replaced by unfenced_methods: every method except GET, HEAD and OPTIONS is now \
             fenced; list the reads to pass without a token in unfenced_methods instead",
        ));
    }
    let is_webdav = route.profile.as_deref() == Some("webdav");
    let unfenced_methods = match &route.unfenced_methods {
        None if is_webdav => webdav::unfenced_methods(),
        None => DEFAULT_UNFENCED_METHODS.to_vec(),
        Some(names) => unfenced(&key("unfenced_methods"), names)?,
    };
    if route.max_token_jump == Some(0) {
        return Err(invalid(
            key("max_token_jump"),
            "must be at least 1, or left out for no limit",
        ));
    }
    let profile = profile(index, &route)?;
    let preserve_host = route
        .preserve_host
        .unwrap_or_else(|| profile.as_ref().is_some_and(Profile::signs_host));
    let token_header = match route.token_header.as_deref() {
        None => crate::token::FENCING_TOKEN,
        Some(name) => token_header(&key("token_header"), name)?,
    };
    let allow = allow(index, &route, profile.as_ref())?;
    let policy = RoutePolicy {
        unfenced_methods,
        fence_reads: route.fence_reads,
        max_token_jump: route.max_token_jump,
        profile,
        preserve_host,
        token_header,
        allow,
    };
    Route::new(&route.path, upstream, &route.resource, policy).map_err(|e| match e {
        crate::route::RouteError::Path(problem) => {
            invalid(key("path"), format!("{:?} {problem}", route.path))
        }
        other => invalid(key("resource"), other),
    })
}

/// A route's upstream with its `upstream_ca`, `upstream_cert` and `upstream_key`, which are for
/// an `https://` upstream only. The files are loaded here, so a missing or broken one stops the
/// start (or the reload) with its name.
fn upstream_tls(
    index: usize,
    route: &FileRoute,
    upstream: Upstream,
) -> Result<Upstream, ConfigError> {
    let key = |field: &str| format!("routes[{index}].{field}");
    let identity = match (&route.upstream_cert, &route.upstream_key) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
        (Some(_), None) => {
            return Err(invalid(key("upstream_key"), "is needed with upstream_cert"));
        }
        (None, Some(_)) => {
            return Err(invalid(key("upstream_cert"), "is needed with upstream_key"));
        }
    };
    let files = crate::proxy::TlsClientFiles {
        ca: route.upstream_ca.clone(),
        identity,
    };
    if files == crate::proxy::TlsClientFiles::default() {
        return Ok(upstream);
    }
    let field = if route.upstream_ca.is_some() {
        "upstream_ca"
    } else {
        "upstream_cert"
    };
    upstream.with_tls_files(files).map_err(|e| {
        invalid(
            key(field),
            format!("(for {upstream_url}) {e}", upstream_url = route.upstream),
        )
    })
}

/// A route's allow lists: `allow` (certificate names) and `allow_bearer_sha256`. Bearer tokens
/// travel in `Authorization`, which an S3 client signs with SigV4 for the storage: the two
/// cannot share a route.
fn allow(
    index: usize,
    route: &FileRoute,
    profile: Option<&Profile>,
) -> Result<Option<Allow>, ConfigError> {
    let key = |field: &str| format!("routes[{index}].{field}");
    if route.allow.is_none() && route.allow_bearer_sha256.is_none() {
        return Ok(None);
    }
    let identities = match &route.allow {
        Some(names) => allow_list(&key("allow"), names.clone())?,
        None => Vec::new(),
    };
    let mut allow = Allow::identities(identities);
    if let Some(digests) = &route.allow_bearer_sha256 {
        if profile.is_some_and(Profile::signs_host) {
            return Err(invalid(
                key("allow_bearer_sha256"),
                "cannot be used with the s3 profile: S3 clients sign the Authorization header \
                 the bearer token would travel in; use allow with client certificates",
            ));
        }
        allow = allow
            .with_bearer_sha256(digests)
            .map_err(|e| invalid(key("allow_bearer_sha256"), e))?;
    }
    Ok(Some(allow))
}

/// A route's `allow`: the names a client certificate must carry one of. Names are compared
/// exactly, so one with stray spaces, or a `CN=` with nothing after it, would never match and is
/// refused as the mistake it is.
fn allow_list(key: &str, names: Vec<String>) -> Result<Vec<String>, ConfigError> {
    for name in &names {
        if name.is_empty() || name == "CN=" {
            return Err(invalid(key, "names an empty identity"));
        }
        if name.trim() != name {
            return Err(invalid(
                key,
                format!("{name:?} has spaces around it; certificates' names never do"),
            ));
        }
    }
    Ok(names)
}

/// `allow` needs verified client certificates: without `[tls] client_ca` no request carries an
/// identity, and an allow list would refuse every fenced request (or, worse, be mistaken for
/// protection that is not there).
fn check_allow_has_client_certificates(
    routes: &RouteTable,
    tls: Option<&TlsFiles>,
) -> Result<(), ConfigError> {
    if tls.is_some_and(|tls| tls.client_ca.is_some()) {
        return Ok(());
    }
    let names_identities = |route: &Route| {
        route
            .allow()
            .is_some_and(|allow| !allow.identity_names().is_empty())
    };
    match routes.routes().iter().position(names_identities) {
        None => Ok(()),
        Some(index) => Err(invalid(
            format!("routes[{index}].allow"),
            "needs client certificates: set [tls] cert, key and client_ca so that the data \
             plane verifies who is writing",
        )),
    }
}

/// A route's `token_header`: a header name a client can send end to end. Not a hop-by-hop
/// header (it would not reach the upstream, and `Connection` could strip it), not one that frames
/// or routes the request, and not fencegate's own answer headers.
fn token_header(key: &str, name: &str) -> Result<http::HeaderName, ConfigError> {
    let header = http::HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| invalid(key, format!("{name:?} is not a valid header name")))?;
    const RESERVED: [&str; 15] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
        "content-length",
        "host",
        "expect",
        "destination",
        "x-request-id",
        "fencing-token-highest",
    ];
    if RESERVED.contains(&header.as_str()) {
        return Err(invalid(
            key,
            format!(
                "{name:?} cannot carry a token: it is hop-by-hop, frames or routes the request, or is fencegate's own"
            ),
        ));
    }
    Ok(header)
}

/// A route's `profile`, with its `resource` template over the profile's captures and its
/// `[[routes.keys]]` entries.
fn profile(index: usize, route: &FileRoute) -> Result<Option<Profile>, ConfigError> {
    let key = |field: &str| format!("routes[{index}].{field}");
    let Some(name) = route.profile.as_deref() else {
        if !route.keys.is_empty() {
            return Err(invalid(
                key("keys"),
                "maps keys to resources, which needs a profile such as profile = \"etcd-v3\"",
            ));
        }
        return Ok(None);
    };
    let prefixes: Vec<(String, String)> = route
        .keys
        .iter()
        .map(|keys| (keys.prefix.clone(), keys.resource.clone()))
        .collect();
    let key_map = |captures| {
        KeyMap::with_captures(&route.resource, &prefixes, captures)
            .map_err(|e| invalid(format!("{} or {}", key("resource"), key("keys")), e))
    };
    match name {
        "etcd-v3" => {
            key_map(keys::ETCD_CAPTURES).map(|keys| Some(Profile::Keys(KeyApi::EtcdV3(keys))))
        }
        "couchdb" => {
            key_map(couchdb::CAPTURES).map(|keys| Some(Profile::Keys(KeyApi::CouchDb(keys))))
        }
        "s3" => key_map(s3::CAPTURES).map(|keys| Some(Profile::Keys(KeyApi::S3(keys)))),
        "webdav" if !route.keys.is_empty() => Err(invalid(
            key("keys"),
            "the webdav profile names resources from the path template; it has no keys to map",
        )),
        "webdav" => Ok(Some(Profile::WebDav)),
        other => Err(invalid(
            key("profile"),
            format!(
                "{other:?} is not a storage profile; available: {}",
                PROFILE_NAMES.join(", ")
            ),
        )),
    }
}

/// `unfenced_methods`: only methods that cannot change state, so that no write escapes fencing by
/// a config line. An empty list fences every method, reads included.
fn unfenced(key: &str, names: &[String]) -> Result<Vec<Method>, ConfigError> {
    names
        .iter()
        .map(|name| {
            if !methods::is_safe(name) {
                return Err(invalid(
                    key,
                    format!(
                        "{name:?} can change state (or is not an upper-case method name); only {} may be left unfenced",
                        methods::SAFE_METHODS.join(", ")
                    ),
                ));
            }
            Method::from_bytes(name.as_bytes())
                .map_err(|_| invalid(key, format!("{name:?} is not a method name")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("test.toml"), Overrides::default())
    }

    fn error(text: &str) -> String {
        load(text).unwrap_err().to_string()
    }

    const ROUTE: &str = r#"
[[routes]]
path = "/wallets/{id}"
upstream = "http://127.0.0.1:5984"
resource = "wallet:{id}"
"#;

    #[test]
    fn contract_example_loads_with_its_values() {
        let config = load(
            r#"
listen = "127.0.0.1:8080"
admin_listen = "127.0.0.1:9090"
database = "fencegate.db"
upstream_timeout = "30s"
in_doubt_grace = "1s"
max_body = "16MiB"

[[routes]]
path = "/wallets/{id}"
upstream = "http://127.0.0.1:5984"
resource = "wallet:{id}"
unfenced_methods = ["GET", "HEAD", "OPTIONS"]
fence_reads = false
max_token_jump = 1000000

[[routes]]
path = "/{*rest}"
upstream = "http://127.0.0.1:5984"
resource = "default"
"#,
        )
        .unwrap();
        assert_eq!(config.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(config.max_body, 16 * 1024 * 1024);
        assert_eq!(config.in_doubt_grace, Duration::from_secs(1));
        assert_eq!(config.routes.routes().len(), 2);
        assert_eq!(config.routes.routes()[0].max_token_jump(), Some(1_000_000));
    }

    #[test]
    fn defaults_apply_when_keys_are_absent() {
        let config = load(ROUTE).unwrap();
        assert_eq!(config.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(config.admin_listen, DEFAULT_ADMIN_LISTEN.parse().unwrap());
        assert_eq!(config.database, PathBuf::from(DEFAULT_DATABASE));
        assert_eq!(config.upstream_timeout, DEFAULT_UPSTREAM_TIMEOUT);
        assert_eq!(config.max_body, DEFAULT_MAX_BODY);
        assert_eq!(config.max_resource_len, DEFAULT_MAX_RESOURCE_LEN);
        assert!(config.admin_token.is_none());
        assert_eq!(config.retention.max_age, DEFAULT_AUDIT_MAX_AGE);
        assert_eq!(config.retention.max_rows, DEFAULT_AUDIT_MAX_ROWS);
        assert_eq!(config.audit_prune_interval, DEFAULT_AUDIT_PRUNE_INTERVAL);
        assert_eq!(config.worker_threads, None);
        assert_eq!(
            config.upstream_connect_timeout,
            DEFAULT_UPSTREAM_CONNECT_TIMEOUT
        );
        assert_eq!(
            config.limits,
            Limits {
                header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
                idle_timeout: DEFAULT_IDLE_TIMEOUT,
                max_header_size: 32 * 1024,
                max_headers: DEFAULT_MAX_HEADERS,
                max_connections: DEFAULT_MAX_CONNECTIONS,
            }
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        assert!(error("colour = \"blue\"").contains("unknown field `colour`"));
        let in_route = error(&format!("{ROUTE}shape = 1"));
        assert!(in_route.contains("unknown field `shape`"), "{in_route}");
    }

    #[test]
    fn placeholder_the_path_does_not_capture_names_the_key() {
        let text = ROUTE.replace("wallet:{id}", "wallet:{nope}");
        assert_eq!(
            error(&text),
            "routes[0].resource: uses {nope}, which path /wallets/{id} does not capture"
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            (
                ROUTE.replace("http://127.0.0.1:5984", "not a url"),
                "routes[0].upstream",
            ),
            (
                ROUTE.replace("http://127.0.0.1:5984", "ftp://x"),
                "routes[0].upstream",
            ),
            (
                format!("{ROUTE}upstream_ca = \"/etc/hosts\"\n"),
                "routes[0].upstream_ca",
            ),
            (
                ROUTE.replace("/wallets/{id}", "wallets/{id}"),
                "routes[0].path",
            ),
            (
                format!("upstream_timeout = \"soon\"\n{ROUTE}"),
                "upstream_timeout",
            ),
            (
                format!("in_doubt_grace = \"-1s\"\n{ROUTE}"),
                "in_doubt_grace",
            ),
            (format!("max_body = \"lots\"\n{ROUTE}"), "max_body"),
            (format!("audit_max_age = \"0s\"\n{ROUTE}"), "audit_max_age"),
            (format!("audit_max_rows = 0\n{ROUTE}"), "audit_max_rows"),
            (format!("worker_threads = 0\n{ROUTE}"), "worker_threads"),
            (
                format!("header_read_timeout = \"0s\"\n{ROUTE}"),
                "header_read_timeout",
            ),
            (
                format!("idle_timeout = \"forever\"\n{ROUTE}"),
                "idle_timeout",
            ),
            (format!("max_header_size = 100\n{ROUTE}"), "max_header_size"),
            (
                format!("max_header_size = \"2MiB\"\n{ROUTE}"),
                "max_header_size",
            ),
            (format!("max_headers = 0\n{ROUTE}"), "max_headers"),
            (
                format!("{ROUTE}token_header = \"not a header\"\n"),
                "routes[0].token_header",
            ),
            (
                format!("{ROUTE}token_header = \"Connection\"\n"),
                "routes[0].token_header",
            ),
            (
                format!("{ROUTE}token_header = \"fencing-token-highest\"\n"),
                "routes[0].token_header",
            ),
            (format!("max_connections = 0\n{ROUTE}"), "max_connections"),
            (
                format!("upstream_connect_timeout = \"0ms\"\n{ROUTE}"),
                "upstream_connect_timeout",
            ),
            (format!("worker_threads = 5000\n{ROUTE}"), "worker_threads"),
            (
                format!("audit_prune_interval = \"often\"\n{ROUTE}"),
                "audit_prune_interval",
            ),
            (format!("listen = \"localhost\"\n{ROUTE}"), "listen"),
            (
                format!("{ROUTE}unfenced_methods = [\"get\"]"),
                "routes[0].unfenced_methods",
            ),
            (
                format!("{ROUTE}unfenced_methods = [\"GET\", \"MKCOL\"]"),
                "routes[0].unfenced_methods",
            ),
            (
                format!("{ROUTE}unfenced_methods = [\"FROBNICATE\"]"),
                "routes[0].unfenced_methods",
            ),
            (
                format!("{ROUTE}fenced_methods = [\"PUT\"]"),
                "routes[0].fenced_methods",
            ),
            (format!("max_resource_len = 0\n{ROUTE}"), "max_resource_len"),
            (
                format!("max_resource_len = 100000\n{ROUTE}"),
                "max_resource_len",
            ),
            (
                format!("{ROUTE}max_token_jump = 0"),
                "routes[0].max_token_jump",
            ),
            (format!("log_level = \"loud\"\n{ROUTE}"), "log_level"),
            (format!("log_level = \"\"\n{ROUTE}"), "log_level"),
        ];
        for (text, key) in cases {
            let message = error(&text);
            assert!(message.starts_with(&format!("{key}: ")), "{key}: {message}");
        }
    }

    #[test]
    fn each_profile_names_its_captures_and_s3_preserves_host_by_default() {
        let route = |profile: &str, resource: &str, extra: &str| {
            format!(
                "[[routes]]\npath = \"/{{*rest}}\"\nupstream = \"http://127.0.0.1:9000\"\n\
                 profile = \"{profile}\"\nresource = \"{resource}\"\n{extra}"
            )
        };
        let first = |text: &str| {
            let config = load(text).unwrap();
            let route = &config.routes.routes()[0];
            (route.profile().map(|p| p.name()), route.preserves_host())
        };
        assert_eq!(
            first(&route("s3", "s3:{bucket}/{key}", "")),
            (Some("s3"), true)
        );
        assert_eq!(
            first(&route("s3", "s3:{bucket}/{key}", "preserve_host = false\n")),
            (Some("s3"), false)
        );
        assert_eq!(
            first(&route("couchdb", "doc:{db}/{doc}", "")),
            (Some("couchdb"), false)
        );
        assert_eq!(
            first(&route("webdav", "file:{rest}", "")),
            (Some("webdav"), false)
        );
        assert_eq!(
            first(&route("etcd-v3", "etcd:{key}", "preserve_host = true\n")),
            (Some("etcd-v3"), true)
        );
        for (text, key) in [
            (
                route("s3", "s3:{db}/{key}", ""),
                "routes[0].resource or routes[0].keys",
            ),
            (
                route("couchdb", "doc:{key}", ""),
                "routes[0].resource or routes[0].keys",
            ),
            (route("webdav", "file:{key}", ""), "routes[0].resource"),
            (
                route(
                    "s3",
                    "s3",
                    "[[routes.keys]]\nprefix = \"w/\"\nresource = \"w:{doc}\"\n",
                ),
                "routes[0].resource or routes[0].keys",
            ),
        ] {
            let message = error(&text);
            assert!(message.starts_with(&format!("{key}: ")), "{key}: {message}");
        }
    }

    #[test]
    fn a_profile_route_names_its_resources_from_keys() {
        let etcd = r#"
[[routes]]
path = "/v3/{*rest}"
upstream = "http://127.0.0.1:2379"
profile = "etcd-v3"
resource = "etcd:{key}"
[[routes.keys]]
prefix = "/wallets/"
resource = "wallet:{segment}"
"#;
        let config = load(etcd).unwrap();
        let route = &config.routes.routes()[0];
        assert_eq!(route.profile().map(|p| p.name()), Some("etcd-v3"));
        assert_eq!(config.max_inspect_body, DEFAULT_MAX_INSPECT_BODY);
        assert_eq!(
            config.max_resources_per_request,
            DEFAULT_MAX_RESOURCES_PER_REQUEST
        );
        for (text, key) in [
            (etcd.replace("etcd-v3", "etcd-v2"), "routes[0].profile"),
            (etcd.replace("etcd-v3", "webdav"), "routes[0].keys"),
            (
                etcd.replace("etcd-v3", "couchdb"),
                "routes[0].resource or routes[0].keys",
            ),
            (
                etcd.replace("wallet:{segment}", "wallet:{id}"),
                "routes[0].resource or routes[0].keys",
            ),
            (
                etcd.replace("etcd:{key}", "etcd:{rest}"),
                "routes[0].resource or routes[0].keys",
            ),
            (
                etcd.replace("profile = \"etcd-v3\"\n", "")
                    .replace("etcd:{key}", "etcd"),
                "routes[0].keys",
            ),
            (format!("max_inspect_body = 0\n{etcd}"), "max_inspect_body"),
            (
                format!("max_resources_per_request = 0\n{etcd}"),
                "max_resources_per_request",
            ),
        ] {
            let message = error(&text);
            assert!(message.starts_with(&format!("{key}: ")), "{key}: {message}");
        }
    }

    #[test]
    fn file_without_routes_is_refused() {
        assert!(matches!(
            load("listen = \"127.0.0.1:1\""),
            Err(ConfigError::NoRoutes)
        ));
        assert!(matches!(
            Config::load(None, Overrides::default()),
            Err(ConfigError::NoRoutes)
        ));
    }

    #[test]
    fn upstream_flag_alone_makes_a_catch_all_default_route() {
        let overrides = Overrides {
            upstream: Some("http://127.0.0.1:7000".into()),
            ..Overrides::default()
        };
        let config = Config::load(None, overrides).unwrap();
        let resolved = config.routes.resolve("/any/path").unwrap();
        assert_eq!(resolved.resource.as_str(), DEFAULT_RESOURCE);
        assert_eq!(
            resolved.route.upstream().to_string(),
            "http://127.0.0.1:7000"
        );
    }

    #[test]
    fn flags_override_the_file() {
        let overrides = Overrides {
            listen: Some("127.0.0.1:1234".into()),
            database: Some("other.db".into()),
            upstream: Some("http://127.0.0.1:7000".into()),
            ..Overrides::default()
        };
        let config = Config::from_toml(
            &format!("listen = \"127.0.0.1:1\"\n{ROUTE}"),
            Path::new("t"),
            overrides,
        )
        .unwrap();
        assert_eq!(config.listen.port(), 1234);
        assert_eq!(config.database, PathBuf::from("other.db"));
        assert_eq!(
            config.routes.routes()[0].upstream().to_string(),
            "http://127.0.0.1:7000"
        );
    }

    #[test]
    fn exposed_admin_plane_needs_a_token() {
        let exposed = format!("admin_listen = \"0.0.0.0:9090\"\n{ROUTE}");
        assert!(
            error(&exposed).starts_with("admin_listen: 0.0.0.0:9090 is not a loopback address")
        );
        let with_token = format!("admin_token = \"s3cret\"\n{exposed}");
        let config = load(&with_token).unwrap();
        assert!(
            !format!("{config:?}").contains("s3cret"),
            "the token must not show in Debug"
        );
    }

    #[test]
    fn admin_token_comparison_is_exact() {
        let token = AdminToken("abc".into());
        assert!(token.matches(b"abc"));
        assert!(!token.matches(b"abd"));
        assert!(!token.matches(b"ab"));
        assert!(!token.matches(b"abcd"));
        assert!(!token.matches(b""));
    }
}
