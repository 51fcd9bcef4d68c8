//! Tracing set-up: log lines on stderr, filtered by `RUST_LOG` (default `info`), as text for people
//! or as one JSON object per line for log pipelines.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event, its fields at the top level.
    Json,
}

/// Installs the global subscriber. A second call (as in tests) keeps the first.
pub fn init(format: LogFormat) {
    let filter = filter(std::env::var(EnvFilter::DEFAULT_ENV).ok().as_deref());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        // Colour codes only help a person at a terminal; they corrupt files and log pipelines.
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
}

/// `RUST_LOG`'s filter (default `info`). The migrations crate logs every migration's whole SQL at
/// DEBUG, the schema included; that stays at INFO unless `RUST_LOG` names it.
fn filter(rust_log: Option<&str>) -> EnvFilter {
    let mut filter = rust_log
        .and_then(|directives| EnvFilter::try_new(directives).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    if !rust_log.is_some_and(|directives| directives.contains("rusqlite_migration"))
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
            filter(Some("debug"))
                .to_string()
                .contains("rusqlite_migration=info")
        );
        assert!(filter(None).to_string().contains("rusqlite_migration=info"));
        let asked = filter(Some("debug,rusqlite_migration=debug")).to_string();
        assert!(!asked.contains("rusqlite_migration=info"), "{asked}");
    }
}
