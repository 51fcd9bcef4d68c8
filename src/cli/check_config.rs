//! `fencegate check-config`: validate a config and show what it would serve.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::serve::ADMIN_TOKEN_ENV;
use crate::config::{Config, ConfigError, Overrides};
use crate::profile::Profile;
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
            // A reader that stops early (`| head`) closes the pipe: not an error, and no panic.
            let _ = std::io::stdout()
                .lock()
                .write_all(describe(&config).as_bytes());
            ExitCode::SUCCESS
        }
        // Reading and parsing errors name the file themselves.
        Err(e @ (ConfigError::Read { .. } | ConfigError::Syntax { .. })) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{}: {e}", args.file.display());
            ExitCode::FAILURE
        }
    }
}

/// The widest setting label, so that no value runs into its key.
const KEY_WIDTH: usize = 25;

/// What a plane serves, by its TLS table.
fn serves(tls: &Option<crate::tls::TlsFiles>) -> String {
    match tls {
        None => "plain HTTP".to_owned(),
        Some(tls) => match &tls.client_ca {
            None => format!("HTTPS with {}", tls.cert.display()),
            Some(ca) => format!(
                "HTTPS with {}, client certificates from {} required",
                tls.cert.display(),
                ca.display()
            ),
        },
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
        (
            "listen",
            format!("{} ({})", config.listen, serves(&config.tls)),
        ),
        (
            "admin_listen",
            format!(
                "{} ({}; admin token {token})",
                config.admin_listen,
                serves(&config.admin_tls)
            ),
        ),
        ("database", config.database.display().to_string()),
        (
            "peer plane",
            config.cluster.as_ref().map_or_else(
                || "none (single node)".to_owned(),
                |cluster| {
                    format!(
                        "{} ({}; advertised as {})",
                        cluster.peer_listen,
                        serves(&cluster.peer_tls),
                        cluster.peer_advertise
                    )
                },
            ),
        ),
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
        (
            "max_resource_len",
            format!("{} bytes", config.max_resource_len),
        ),
        (
            "max_inspect_body",
            format!("{} bytes", config.max_inspect_body),
        ),
        (
            "max_resources_per_request",
            config.max_resources_per_request.to_string(),
        ),
        ("shutdown_grace", duration(config.shutdown_grace)),
        (
            "audit retention",
            format!(
                "{} or {} rows per reason, pruned every {}",
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
        (
            "access_log",
            if config.access_log { "on" } else { "off" }.to_owned(),
        ),
        (
            "log_level",
            config.log_level.as_ref().map_or_else(
                || "info (RUST_LOG, when set, wins)".to_owned(),
                |level| format!("{} (RUST_LOG, when set, wins)", level.as_str()),
            ),
        ),
    ];
    let mut text = String::new();
    for (key, value) in settings {
        let _ = writeln!(text, "{key:<width$}  {value}", width = KEY_WIDTH);
    }
    let _ = writeln!(text, "routes (the first match wins):");
    let routes = config.routes.routes();
    for (index, route) in routes.iter().enumerate() {
        let _ = writeln!(text, "{}", describe_route(index, route));
    }
    for warning in warnings(config) {
        let _ = writeln!(text, "warning: {warning}");
    }
    text
}

/// Route tables that work, but not the way an operator may think: collections that one route
/// matches above another route's paths, routes whose resources nest, and placeholders in an older
/// router's syntax. `serve` logs them too.
pub fn warnings(config: &Config) -> Vec<String> {
    let routes = config.routes.routes();
    let mut warnings: Vec<String> = config
        .routes
        .collection_overlaps()
        .into_iter()
        .map(|overlap| {
            format!(
                "routes[{}] ({}) matches {}, a collection above the paths of routes[{}] ({}); \
                 fenced requests on it are refused with 409 (reason collection), since they \
                 could change resources that routes[{}] fences",
                overlap.outer,
                routes[overlap.outer].path(),
                overlap.example,
                overlap.inner,
                routes[overlap.inner].path(),
                overlap.inner,
            )
        })
        .collect();
    for (index, route) in routes.iter().enumerate() {
        if route.takes_bearer_tokens() && config.tls.is_none() {
            warnings.push(format!(
                "routes[{index}] ({}) takes bearer tokens (allow_bearer_sha256) on a data plane \
                 without [tls]: the tokens cross the network in clear text",
                route.path()
            ));
        }
    }
    for (index, route) in routes.iter().enumerate() {
        // matchit 0.7's `:id` and `*rest` are literal text in 0.8: the route would match only a
        // path spelled that way.
        let legacy = route.path().split('/').find(|segment| {
            segment.len() > 1 && (segment.starts_with(':') || segment.starts_with('*'))
        });
        if let Some(segment) = legacy {
            let name = &segment[1..];
            let placeholder = if segment.starts_with('*') {
                format!("{{*{name}}}")
            } else {
                format!("{{{name}}}")
            };
            warnings.push(format!(
                "routes[{index}] ({}) has the segment {segment}, which matches only the literal text \
                 {segment}; to capture a segment write {placeholder}",
                route.path()
            ));
        }
        if route.nests_resources() {
            warnings.push(format!(
                "routes[{index}] ({}) gives every sub-path a resource of its own ({}); a request \
                 on a collection path (ending in /) is refused with 409 (reason collection), but \
                 storage that deletes or moves a directory named without its trailing slash can \
                 still change the resources below it: prefer a resource per top-level segment",
                route.path(),
                route.resource_template()
            ));
        }
    }
    warnings
}

fn describe_route(index: usize, route: &Route) -> String {
    let unfenced: Vec<&str> = route
        .unfenced_methods()
        .iter()
        .map(|m| m.as_str())
        .collect();
    let fenced = match route.profile() {
        Some(profile @ Profile::Keys(_)) => format!(
            "by the {} profile: every call that changes a key (docs/storage.md)",
            profile.name()
        ),
        _ if unfenced.is_empty() => "every method".to_owned(),
        _ => format!("every method but {}", unfenced.join(",")),
    };
    let mut line = format!(
        "  [{index}] {} -> {}  resource {}  fenced {fenced}",
        route.path(),
        route.upstream(),
        route.resource_template(),
    );
    if route.fence_reads() {
        line.push_str(" (and reads that carry a token)");
    }
    if let Some(jump) = route.max_token_jump() {
        let _ = write!(line, "  max_token_jump {jump}");
    }
    if let Some(profile @ Profile::WebDav) = route.profile() {
        let _ = write!(line, "  profile {}", profile.name());
    }
    if route.preserves_host() {
        line.push_str("  Host forwarded unchanged");
    }
    if *route.token_header() != crate::token::FENCING_TOKEN {
        let _ = write!(line, "  token in {}", route.token_header());
    }
    if let Some(allow) = route.allow() {
        let mut who = allow.identity_names().to_vec();
        if allow.takes_bearer_tokens() {
            who.push("holders of an allowed bearer token".to_owned());
        }
        let who = if who.is_empty() {
            "nobody".to_owned()
        } else {
            who.join(", ")
        };
        let _ = write!(line, "  written only by {who}");
    }
    line
}
