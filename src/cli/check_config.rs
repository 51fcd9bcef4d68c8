//! `fencegate check-config`: validate a config and show what it would serve.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::serve::ADMIN_TOKEN_ENV;
use crate::config::{Config, Overrides};
use crate::route::Route;

/// Flags of `fencegate check-config`.
#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// The TOML config file to check.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

/// Prints the settings and routes `file` would serve with, or the precise error.
pub fn run(args: &CheckConfigArgs) -> ExitCode {
    // The admin token may come from the environment, as it would for `serve`.
    let overrides = Overrides {
        admin_token: std::env::var(ADMIN_TOKEN_ENV).ok(),
        ..Overrides::default()
    };
    match Config::load(Some(&args.file), overrides) {
        Ok(config) => {
            print!("{}", describe(&config));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: {e}", args.file.display());
            ExitCode::FAILURE
        }
    }
}

/// The configuration as an operator reads it: settings, then routes in match order.
pub fn describe(config: &Config) -> String {
    let duration = |d| humantime::format_duration(d).to_string();
    let token = if config.admin_token.is_some() {
        "set"
    } else {
        "not set"
    };
    let settings = [
        ("listen", config.listen.to_string()),
        (
            "admin_listen",
            format!("{} (admin token {token})", config.admin_listen),
        ),
        ("database", config.database.display().to_string()),
        ("upstream_timeout", duration(config.upstream_timeout)),
        (
            "upstream_connect_timeout",
            duration(config.upstream_connect_timeout),
        ),
        (
            "header_read_timeout",
            duration(config.limits.header_read_timeout),
        ),
        ("idle_timeout", duration(config.limits.idle_timeout)),
        (
            "max_header_size",
            format!("{} bytes", config.limits.max_header_size),
        ),
        ("max_headers", config.limits.max_headers.to_string()),
        (
            "max_connections",
            format!("{} per plane", config.limits.max_connections),
        ),
        ("in_doubt_grace", duration(config.in_doubt_grace)),
        ("max_body", format!("{} bytes", config.max_body)),
        ("shutdown_grace", duration(config.shutdown_grace)),
        (
            "audit retention",
            format!(
                "{} or {} rows, pruned every {}",
                duration(config.retention.max_age),
                config.retention.max_rows,
                duration(config.audit_prune_interval)
            ),
        ),
        (
            "worker_threads",
            config
                .worker_threads
                .map_or_else(|| "one per CPU core".to_owned(), |n| n.to_string()),
        ),
    ];
    let mut text = String::new();
    for (key, value) in settings {
        let _ = writeln!(text, "{key:<22}{value}");
    }
    let _ = writeln!(text, "routes (the first match wins):");
    for (index, route) in config.routes.routes().iter().enumerate() {
        let _ = writeln!(text, "{}", describe_route(index, route));
    }
    text
}

fn describe_route(index: usize, route: &Route) -> String {
    let methods: Vec<&str> = route.fenced_methods().iter().map(|m| m.as_str()).collect();
    let mut line = format!(
        "  [{index}] {} -> {}  resource {}  fenced {}",
        route.path(),
        route.upstream(),
        route.resource_template(),
        methods.join(",")
    );
    if route.fence_reads() {
        line.push_str(" (and reads that carry a token)");
    }
    if let Some(jump) = route.max_token_jump() {
        let _ = write!(line, "  max_token_jump {jump}");
    }
    line
}
