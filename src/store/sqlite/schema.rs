//! Opening the database: durability settings and migrations.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;
use rusqlite_migration::{M, Migrations};

use super::StoreError;

/// How long a statement waits for a lock held by another process (an operator's read-only
/// `fencegate audit`, say) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The schema history, oldest first. Append only: a released migration is never edited.
const MIGRATIONS: [&str; 6] = [
    include_str!("../../../migrations/0001_resources.sql"),
    include_str!("../../../migrations/0002_rejections.sql"),
    include_str!("../../../migrations/0003_epochs.sql"),
    include_str!("../../../migrations/0004_rejections_by_time.sql"),
    include_str!("../../../migrations/0005_rejections_reasons.sql"),
    include_str!("../../../migrations/0006_rejections_identity.sql"),
];

fn migrations() -> Migrations<'static> {
    Migrations::new(MIGRATIONS.iter().map(|sql| M::up(sql)).collect())
}

/// The schema version (SQLite's `user_version`, which the migrations keep) of a database that is
/// fully migrated.
pub const CURRENT_VERSION: i64 = MIGRATIONS.len() as i64;

/// Opens the database for writing: WAL journaling with `synchronous=FULL`, so a commit is on disk
/// (and survives power loss) before it returns, then migrates it to the current schema.
pub(super) fn open(path: &Path) -> Result<Connection, StoreError> {
    let open_error = |cause| StoreError::Open {
        path: path.to_owned(),
        cause: Arc::new(cause),
    };
    // SQLite reports a file it may not read or write only as "unable to open database file";
    // the operating system says why.
    if path.exists()
        && let Err(cause) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
    {
        return Err(StoreError::Access {
            path: path.to_owned(),
            cause: Arc::new(cause),
        });
    }
    let mut conn = Connection::open(path).map_err(open_error)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_error)?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(open_error)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::NotWal {
            path: path.to_owned(),
            mode,
        });
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(open_error)?;
    // A database another process keeps locked would fail every fenced write; refuse to start
    // (before migrating, which would fail on the same lock with a less helpful error).
    conn.execute_batch("BEGIN IMMEDIATE; COMMIT;")
        .map_err(|cause| StoreError::Locked {
            path: path.to_owned(),
            cause: Arc::new(cause),
        })?;
    migrations()
        .to_latest(&mut conn)
        .map_err(|cause| StoreError::Migrate {
            path: path.to_owned(),
            cause: Arc::new(cause),
        })?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_valid() {
        assert!(migrations().validate().is_ok());
    }

    #[test]
    fn opened_database_is_wal_with_full_sync() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open(&dir.path().join("fg.db")).unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        assert_eq!(sync, 2, "2 is FULL");
    }

    #[test]
    fn a_file_that_is_not_a_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fg.db");
        std::fs::write(
            &path,
            b"this is not an sqlite database, not even close to one........",
        )
        .unwrap();
        assert!(open(&path).is_err());
    }
}
