//! A cluster of real `fencegate serve` replicas on one PostgreSQL ([`super::postgres`]), for the
//! cluster tests: a shared config, replicas started on free ports, and a wait for the shards to
//! settle.

use std::process::Command;
use std::time::Duration;

use super::binary::{Proxy, start};
use super::postgres::Postgres;

/// Shards of every test cluster.
pub const SHARDS: u32 = 8;

/// A lease short enough for tests to see failovers in seconds.
const LEASE_TTL: &str = "1s";
const IN_DOUBT_GRACE: &str = "300ms";

pub struct Replica {
    pub name: String,
    pub proxy: Proxy,
    /// The peer plane's port.
    pub peer_port: u16,
}

/// The config every replica of a test cluster shares: 8 shards, short leases, one route.
pub fn write_config(dir: &std::path::Path, pg: &Postgres, upstream: &str) -> std::path::PathBuf {
    write_config_with(dir, pg, upstream, LEASE_TTL, IN_DOUBT_GRACE)
}

/// As [`write_config`], with this `lease_ttl` and `in_doubt_grace`.
pub fn write_config_with(
    dir: &std::path::Path,
    pg: &Postgres,
    upstream: &str,
    lease_ttl: &str,
    in_doubt_grace: &str,
) -> std::path::PathBuf {
    let path = dir.join("cluster.toml");
    std::fs::write(
        &path,
        format!(
            "database = \"{}\"\nin_doubt_grace = \"{in_doubt_grace}\"\nupstream_timeout = \"5s\"\n\
             [cluster]\nshards = {SHARDS}\nlease_ttl = \"{lease_ttl}\"\n\
             [[routes]]\npath = \"/w/{{id}}\"\nupstream = \"{upstream}\"\nresource = \"wallet:{{id}}\"\n",
            pg.url()
        ),
    )
    .unwrap();
    path
}

pub async fn start_replica(config: &std::path::Path, name: &str) -> Replica {
    start_replica_with(config, name, free_port(), None).await
}

/// Starts replica `name` with its peer plane on `peer_port` (a restarted replica keeps its own),
/// reaching PostgreSQL at `database` if given (through a fault proxy, say) instead of the
/// config's.
pub async fn start_replica_with(
    config: &std::path::Path,
    name: &str,
    peer_port: u16,
    database: Option<&str>,
) -> Replica {
    let command = replica_command(config, name, peer_port, database);
    start_command(command, name, peer_port).await
}

/// Starts replica `name` with `FENCEGATE_CLUSTER_SECRET` set to `secret`.
pub async fn start_replica_with_secret(
    config: &std::path::Path,
    name: &str,
    secret: &str,
) -> Replica {
    let peer_port = free_port();
    let mut command = replica_command(config, name, peer_port, None);
    command.env("FENCEGATE_CLUSTER_SECRET", secret);
    start_command(command, name, peer_port).await
}

async fn start_command(command: Command, name: &str, peer_port: u16) -> Replica {
    Replica {
        name: name.to_owned(),
        proxy: start(command).await,
        peer_port,
    }
}

/// `fencegate serve` as replica `name` of the cluster `config` describes.
fn replica_command(
    config: &std::path::Path,
    name: &str,
    peer_port: u16,
    database: Option<&str>,
) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fencegate"));
    command
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .arg("--config")
        .arg(config)
        .args(["--replica", name])
        .args(["--peer-listen", &format!("127.0.0.1:{peer_port}")]);
    if let Some(database) = database {
        command.args(["--db", database]);
    }
    command
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub async fn cluster_view(replica: &Replica) -> serde_json::Value {
    reqwest::get(format!("http://{}/v1/cluster", replica.proxy.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Waits until every shard has an owner among `names`, each of them owning at least one.
pub async fn wait_for_owners(replica: &Replica, names: &[&str]) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let view = cluster_view(replica).await;
        let owners: Vec<&str> = view["shards"]
            .as_array()
            .map(|shards| shards.iter().filter_map(|s| s["owner"].as_str()).collect())
            .unwrap_or_default();
        let settled = owners.len() == SHARDS as usize
            && owners.iter().all(|owner| names.contains(owner))
            && names.iter().all(|name| owners.contains(name));
        if settled {
            return view;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "shards never settled on {names:?}: {view}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn put(
    client: &reqwest::Client,
    replica: &Replica,
    id: &str,
    token: u64,
) -> reqwest::Response {
    client
        .put(format!("http://{}/w/{id}", replica.proxy.addr))
        .header("fencing-token", token.to_string())
        .body("x")
        .send()
        .await
        .unwrap()
}
