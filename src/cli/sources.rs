//! Where the commands other than `serve` find the database and the admin plane: a flag or its
//! environment variable first, then the config file that `serve` runs with (`--config`, or
//! `FENCEGATE_CONFIG`), then the default. An operator on a host configured once need not repeat
//! the paths.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use super::serve::ADMIN_TOKEN_ENV;
use crate::config::{Config, ConfigError, DEFAULT_ADMIN_LISTEN, DEFAULT_DATABASE, Overrides};
use crate::store::Reader;

/// `--config`, for commands that read only some settings from it.
#[derive(Debug, Clone, Default, Args)]
pub struct ConfigFile {
    /// The config file `serve` runs with: where the database and the admin plane are, unless a
    /// flag says otherwise.
    #[arg(long, env = "FENCEGATE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl ConfigFile {
    /// The config, if a file was named; validated as `serve` would (the admin token may come
    /// from the environment, as it does for `serve`).
    fn load(&self) -> Result<Option<Config>, ConfigError> {
        let Some(path) = &self.config else {
            return Ok(None);
        };
        let overrides = Overrides {
            admin_token: std::env::var(ADMIN_TOKEN_ENV).ok(),
            ..Overrides::default()
        };
        Config::load(Some(path), overrides).map(Some)
    }

    /// The database: `db` (the flag or `FENCEGATE_DB`), else the config's, else the default.
    pub fn database(&self, db: Option<&PathBuf>) -> Result<PathBuf, ConfigError> {
        if let Some(db) = db {
            return Ok(db.clone());
        }
        Ok(self
            .load()?
            .map_or_else(|| PathBuf::from(DEFAULT_DATABASE), |config| config.database))
    }

    /// Opens the database `db` or the config names, read-only, for `command`; on failure says why
    /// and gives the exit status: 2 for a config that does not load, 1 for a database that cannot
    /// be read.
    pub fn open_reader(
        &self,
        command: &str,
        db: Option<&PathBuf>,
    ) -> Result<Reader, std::process::ExitCode> {
        let db = self.database(db).map_err(|e| {
            eprintln!("fencegate {command}: {e}");
            std::process::ExitCode::from(2)
        })?;
        Reader::open(&db).map_err(|e| {
            eprintln!("fencegate {command}: {e}");
            std::process::ExitCode::FAILURE
        })
    }

    /// The admin plane's base URL: `admin` (the flag or `FENCEGATE_ADMIN_URL`), else the config's
    /// `admin_listen` (its loopback address if it listens on every interface), else the default.
    pub fn admin_url(&self, admin: Option<&String>) -> Result<String, ConfigError> {
        if let Some(admin) = admin {
            return Ok(admin.clone());
        }
        let (scheme, listen) = match self.load()? {
            Some(config) => (
                if config.admin_tls.is_some() {
                    "https"
                } else {
                    "http"
                },
                config.admin_listen,
            ),
            None => (
                "http",
                DEFAULT_ADMIN_LISTEN
                    .parse()
                    .expect("the default admin address is valid"),
            ),
        };
        Ok(format!("{scheme}://{}", reachable(listen)))
    }
}

/// An address a client on this host can connect to: `0.0.0.0` and `[::]` become loopback.
fn reachable(listen: SocketAddr) -> SocketAddr {
    match listen {
        SocketAddr::V4(v4) if v4.ip().is_unspecified() => {
            SocketAddr::from(([127, 0, 0, 1], v4.port()))
        }
        SocketAddr::V6(v6) if v6.ip().is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, v6.port()))
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unspecified_listen_address_is_reached_on_loopback() {
        assert_eq!(
            reachable("0.0.0.0:9090".parse().unwrap()).to_string(),
            "127.0.0.1:9090"
        );
        assert_eq!(
            reachable("[::]:9090".parse().unwrap()).to_string(),
            "[::1]:9090"
        );
        assert_eq!(
            reachable("10.0.0.5:9090".parse().unwrap()).to_string(),
            "10.0.0.5:9090"
        );
    }
}
