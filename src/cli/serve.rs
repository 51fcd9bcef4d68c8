//! `fencegate serve`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::config::{Config, ConfigError, Overrides};
use crate::server::{App, Reloader};
use crate::shutdown;
use crate::telemetry::{self, LevelChange, LogLevel};

/// The environment variable that holds the admin token (kept out of flags, so it is not visible in
/// the process list).
pub const ADMIN_TOKEN_ENV: &str = "FENCEGATE_ADMIN_TOKEN";

/// Flags of `fencegate serve`; each also reads a `FENCEGATE_*` environment variable.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// TOML config file.
    #[arg(long, env = "FENCEGATE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data-plane address [default: 127.0.0.1:8080].
    #[arg(long, env = "FENCEGATE_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Admin-plane address [default: 127.0.0.1:9090].
    #[arg(long, env = "FENCEGATE_ADMIN_LISTEN", value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// Without --config: one catch-all route to URL, resource `default`. With it: every route's upstream.
    #[arg(long, env = "FENCEGATE_UPSTREAM", value_name = "URL")]
    pub upstream: Option<String>,
    /// SQLite database file [default: fencegate.db], or a postgres:// URL: cluster mode.
    #[arg(long, env = "FENCEGATE_DB", value_name = "FILE|URL")]
    pub db: Option<PathBuf>,
    /// Cluster mode: this replica's name, unique and stable [default: the host name].
    #[arg(long, env = "FENCEGATE_REPLICA", value_name = "NAME")]
    pub replica: Option<String>,
    /// Cluster mode: the peer plane's address [default: 127.0.0.1:8181].
    #[arg(long, env = "FENCEGATE_PEER_LISTEN", value_name = "ADDR")]
    pub peer_listen: Option<String>,
    /// Cluster mode: how the other replicas reach the peer plane [default: http:// + peer listen].
    #[arg(long, env = "FENCEGATE_PEER_ADVERTISE", value_name = "URL")]
    pub peer_advertise: Option<String>,
    /// Log one line per data-plane request (also `access_log = true` in the file).
    #[arg(long, env = "FENCEGATE_ACCESS_LOG")]
    pub access_log: bool,
}

impl ServeArgs {
    /// Loads and validates the configuration these flags describe.
    pub fn load_config(&self) -> Result<Config, ConfigError> {
        let overrides = Overrides {
            listen: self.listen.clone(),
            admin_listen: self.admin_listen.clone(),
            upstream: self.upstream.clone(),
            database: self.db.clone(),
            admin_token: std::env::var(ADMIN_TOKEN_ENV).ok(),
            access_log: self.access_log,
            replica: self.replica.clone(),
            peer_listen: self.peer_listen.clone(),
            peer_advertise: self.peer_advertise.clone(),
            cluster_secret: std::env::var(crate::config::CLUSTER_SECRET_ENV).ok(),
        };
        Config::load(self.config.as_deref(), overrides)
    }
}

/// Runs the server until SIGINT or SIGTERM, reloading `args`' config file on SIGHUP. This
/// runtime, of one worker, serves the admin plane and the background tasks; the data plane runs
/// on threads of its own (`worker_threads`, one per core by default), each with its own runtime
/// (see `server`).
pub fn run(config: Config, args: ServeArgs) -> ExitCode {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(1);
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("fencegate: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    for warning in super::check_config::warnings(&config) {
        tracing::warn!("{warning}");
    }
    let result = runtime.block_on(async {
        // Listened for before anything is bound: SIGHUP's default action would end the process.
        let hangups = shutdown::hangups()?;
        let app = App::build(config).await?;
        let reloads = tokio::spawn(reload_on_hangup(hangups, args, app.reloader()));
        let served = app.run_until_stopped(shutdown::signal()).await;
        reloads.abort();
        served
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fencegate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// On every SIGHUP, reads the config again (file, environment, the same flags) and applies it;
/// a config that does not load or validate is logged with its error and changes nothing.
async fn reload_on_hangup(
    mut hangups: tokio::signal::unix::Signal,
    args: ServeArgs,
    reloader: Reloader,
) {
    while hangups.recv().await.is_some() {
        match args.load_config() {
            Ok(config) => {
                // First, so that what this reload logs already follows the new level.
                apply_log_level(config.log_level.as_ref());
                for warning in super::check_config::warnings(&config) {
                    tracing::warn!("{warning}");
                }
                let reloaded = reloader.apply(config);
                if !reloaded.restart_needed.is_empty() {
                    tracing::warn!(
                        keys = %reloaded.restart_needed.join(", "),
                        "config reloaded, but these keys only change at a restart; their running values stay"
                    );
                }
                for (plane, error) in &reloaded.tls_failed {
                    tracing::error!(plane, %error, "TLS files do not load; the previous certificate stays");
                }
                tracing::info!(routes = reloaded.routes, "config reloaded");
            }
            Err(e) => {
                reloader.refused();
                tracing::error!(error = %e, "config reload failed; the running config stays");
            }
        }
    }
}

/// Puts a reloaded `log_level` in force, or says why it is not.
fn apply_log_level(level: Option<&LogLevel>) {
    match telemetry::set_level(level) {
        LevelChange::Applied | LevelChange::NotInstalled => {}
        LevelChange::RustLogWins if level.is_some() => tracing::warn!(
            "log_level is not applied: RUST_LOG is set and decides what is logged until a restart without it"
        ),
        LevelChange::RustLogWins => {}
    }
}
