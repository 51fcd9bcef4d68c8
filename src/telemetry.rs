//! Tracing set-up: log lines on stderr, filtered by `RUST_LOG` or the config's `log_level`
//! (default `info`), as text for people or as one JSON object per line for log pipelines. The
//! filter is reloadable, so a SIGHUP can change the log level of a running server.

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event, its fields at the top level.
    Json,
}

/// A config file's `log_level`: `EnvFilter` directives (`warn`, `info,fencegate::proxy=debug`),
/// checked when the config is read so that a typo is a config error, not a silent default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLevel(String);

/// Why a `log_level` was refused.
#[derive(Debug, thiserror::Error)]
pub enum LogLevelError {
    #[error("must not be empty (try \"info\")")]
    Empty,
    #[error(
        "`{0}` is not a level (trace, debug, info, warn, error, off); a target takes one, as in `{0}=debug`"
    )]
    NotALevel(String),
    #[error("{0}")]
    Directive(#[from] tracing_subscriber::filter::ParseError),
}

impl LogLevel {
    /// Checks `directives` the way the filter will read them.
    pub fn parse(directives: &str) -> Result<LogLevel, LogLevelError> {
        if directives.trim().is_empty() {
            return Err(LogLevelError::Empty);
        }
        // A bare word is a target at every level to `EnvFilter`, so a misspelt level (`wran`)
        // would silence everything else; a bare word must be a level.
        if let Some(word) = directives.split(',').map(str::trim).find(|directive| {
            !directive.is_empty() && !directive.contains(['=', '[', ':']) && !is_level(directive)
        }) {
            return Err(LogLevelError::NotALevel(word.to_owned()));
        }
        EnvFilter::builder().parse(directives)?;
        Ok(LogLevel(directives.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_level(word: &str) -> bool {
    ["trace", "debug", "info", "warn", "error", "off"]
        .iter()
        .any(|level| word.eq_ignore_ascii_case(level))
}

/// What decides the log level: `RUST_LOG` when it is set (the environment wins over the file,
/// as everywhere else), else the config's `log_level`, else `info`.
#[derive(Debug)]
struct Installed {
    filter: reload::Handle<EnvFilter, Registry>,
    rust_log: Option<String>,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

/// Installs the global subscriber. A second call (as in tests) keeps the first.
pub fn init(format: LogFormat, level: Option<&LogLevel>) {
    let rust_log = std::env::var(EnvFilter::DEFAULT_ENV).ok();
    let (filter, handle) = reload::Layer::new(filter(rust_log.as_deref(), level));
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let lines = match format {
        // Colour codes only help a person at a terminal; they corrupt files and log pipelines.
        LogFormat::Text => lines.with_ansi(std::io::stderr().is_terminal()).boxed(),
        LogFormat::Json => lines
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .boxed(),
    };
    if tracing_subscriber::registry()
        .with(filter)
        .with(lines)
        .try_init()
        .is_ok()
    {
        let _ = INSTALLED.set(Installed {
            filter: handle,
            rust_log,
        });
    }
}

/// What [`set_level`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LevelChange {
    /// The new filter is in force.
    Applied,
    /// `RUST_LOG` is set and keeps deciding; the file's `log_level` waits for a restart without it.
    RustLogWins,
    /// No subscriber of ours is installed (a library user, a test).
    NotInstalled,
}

/// Replaces the running filter with the one `level` (or the default) describes, unless `RUST_LOG`
/// decides it.
pub fn set_level(level: Option<&LogLevel>) -> LevelChange {
    let Some(installed) = INSTALLED.get() else {
        return LevelChange::NotInstalled;
    };
    if installed.rust_log.is_some() {
        return LevelChange::RustLogWins;
    }
    match installed.filter.reload(filter(None, level)) {
        Ok(()) => LevelChange::Applied,
        Err(_) => LevelChange::NotInstalled,
    }
}

/// The filter: `RUST_LOG`, else `level`, else `info`. The migrations crate logs every
/// migration's whole SQL at DEBUG, the schema included; that stays at INFO unless the directives
/// name it.
fn filter(rust_log: Option<&str>, level: Option<&LogLevel>) -> EnvFilter {
    let directives = rust_log.or(level.map(LogLevel::as_str));
    let mut filter = directives
        .and_then(|directives| EnvFilter::try_new(directives).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    if !directives.is_some_and(|directives| directives.contains("rusqlite_migration"))
        && let Ok(quiet) = "rusqlite_migration=info".parse()
    {
        filter = filter.add_directive(quiet);
    }
    filter
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_keeps_the_migrations_sql_out_unless_asked_for() {
        assert!(
            filter(Some("debug"), None)
                .to_string()
                .contains("rusqlite_migration=info")
        );
        assert!(
            filter(None, None)
                .to_string()
                .contains("rusqlite_migration=info")
        );
        let asked = filter(Some("debug,rusqlite_migration=debug"), None).to_string();
        assert!(!asked.contains("rusqlite_migration=info"), "{asked}");
    }

    #[test]
    fn rust_log_wins_over_the_files_log_level_which_wins_over_info() {
        let warn = LogLevel::parse("warn").unwrap();
        let default_level = |filter: EnvFilter| {
            filter
                .to_string()
                .split(',')
                .find(|directive| !directive.contains('='))
                .map(str::to_owned)
        };
        assert_eq!(
            default_level(filter(Some("debug"), Some(&warn))).as_deref(),
            Some("debug")
        );
        assert_eq!(
            default_level(filter(None, Some(&warn))).as_deref(),
            Some("warn")
        );
        assert_eq!(default_level(filter(None, None)).as_deref(), Some("info"));
    }

    #[test]
    fn a_log_level_that_is_not_a_filter_is_refused_with_the_reason() {
        assert!(LogLevel::parse("info,fencegate::proxy=debug").is_ok());
        assert!(matches!(LogLevel::parse(""), Err(LogLevelError::Empty)));
        assert!(matches!(
            LogLevel::parse("fencegate=loud"),
            Err(LogLevelError::Directive(_))
        ));
        let refused = LogLevel::parse("wran").unwrap_err();
        assert!(
            refused.to_string().contains("`wran` is not a level"),
            "{refused}"
        );
        assert!(LogLevel::parse("WARN,fencegate::access=off").is_ok());
    }
}
