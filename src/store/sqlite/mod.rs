//! The embedded store: one SQLite file, served by one process.
//!
//! One writer thread owns the database connection. Callers send it commands over a bounded channel
//! and await a reply; the thread takes every command that is waiting, runs the writes among them
//! in one transaction and answers each caller only after that transaction's commit is on disk
//! (group commit). With `synchronous=FULL` in WAL mode one fsync therefore makes a whole batch of
//! epoch advances and audit rows durable, however many requests produced them.

mod reader;
mod schema;
mod writer;

use std::io::{Read, Seek, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::queue::QueuedStore;
use super::{LastStop, StoreError, WriterGuard};
use crate::token::FencingToken;

pub use reader::SqliteReader;
pub use schema::CURRENT_VERSION;

/// What the lock file holds while a server runs, and after one stopped cleanly. Anything else
/// (an older version's empty file, a torn write) counts as an unclean stop: the safe side.
const SERVING: &[u8] = b"serving\n";
const STOPPED_CLEANLY: &[u8] = b"stopped cleanly\n";

/// The single-server lock of a database: `<database>.lock`, held while the writer runs.
#[derive(Debug)]
struct LockFile {
    file: std::fs::File,
    path: PathBuf,
}

impl LockFile {
    /// Takes the lock of the database at `path`, reads how the previous server stopped, and
    /// marks the database as served (so a crash from now on reads as an unclean stop).
    fn take(path: &Path) -> Result<(LockFile, LastStop), StoreError> {
        let new_database = !path.exists();
        let mut lock = path.as_os_str().to_owned();
        lock.push(".lock");
        let lock = LockFile {
            file: std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(&lock)
                .map_err(|e| lock_error(&PathBuf::from(&lock), e))?,
            path: PathBuf::from(lock),
        };
        match lock.file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::InUse {
                    path: path.to_owned(),
                    lock: lock.path,
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(lock_error(&lock.path, e)),
        }
        let last_stop = if new_database || lock.holds(STOPPED_CLEANLY)? {
            LastStop::Clean
        } else {
            LastStop::Unclean
        };
        lock.write(SERVING).map_err(|e| lock_error(&lock.path, e))?;
        Ok((lock, last_stop))
    }

    fn holds(&self, expected: &[u8]) -> Result<bool, StoreError> {
        let mut content = Vec::new();
        (&self.file)
            .read_to_end(&mut content)
            .map_err(|e| lock_error(&self.path, e))?;
        Ok(content == expected)
    }

    /// Replaces the content and makes it durable: a clean-stop mark that a power loss could
    /// leave behind while the database says otherwise would be worse than none.
    fn write(&self, content: &[u8]) -> std::io::Result<()> {
        self.file.set_len(0)?;
        (&self.file).seek(SeekFrom::Start(0))?;
        (&self.file).write_all(content)?;
        self.file.sync_data()
    }

    /// Records that this server stopped cleanly. A failure only costs the next start the
    /// in-doubt wait, so it is logged, not raised.
    fn mark_clean_stop(&self) {
        if let Err(e) = self.write(STOPPED_CLEANLY) {
            tracing::warn!(lock = %self.path.display(), error = %e, "cannot record the clean stop; the next start waits in_doubt_grace before new tokens");
        }
    }
}

fn lock_error(lock: &Path, source: std::io::Error) -> StoreError {
    StoreError::LockFile {
        lock: lock.to_owned(),
        cause: Arc::new(source),
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Sqlite(Arc::new(e))
    }
}

/// The embedded store's handle: commands queued for its writer thread.
#[derive(Debug)]
pub struct SqliteStore;

impl SqliteStore {
    /// Opens (or creates) the database, applies pending migrations and starts the writer thread.
    /// The returned guard stops the thread, after it has flushed, when closed or dropped.
    /// Only one process at a time may serve a database: the writer holds an exclusive lock on
    /// `<database>.lock` for as long as it runs (the kernel releases it if the process dies).
    /// The guard tells how the previous server stopped ([`WriterGuard::last_stop`]).
    pub fn open(path: &Path) -> Result<(super::SharedStore, WriterGuard), StoreError> {
        let directory = match path.parent() {
            Some(parent) if parent.as_os_str().is_empty() => Path::new("."),
            Some(parent) => parent,
            None => Path::new("/"),
        };
        if !directory.is_dir() {
            return Err(StoreError::NoDirectory {
                path: path.to_owned(),
            });
        }
        let (lock, last_stop) = LockFile::take(path)?;
        let conn = schema::open(path)?;
        let (store, commands, receiver) = QueuedStore::new();
        let guard = writer::spawn(conn, lock, last_stop, receiver, commands)?;
        Ok((Arc::new(store), guard))
    }
}

/// Tokens are `u64`, SQLite integers `i64`: store the bit pattern, compare only in Rust.
fn token_to_sql(token: FencingToken) -> i64 {
    token.get() as i64
}

fn token_from_sql(value: i64) -> FencingToken {
    FencingToken::new(value as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Reason;
    use crate::audit::Rejection;
    use crate::route::ResourceKey;
    use crate::store::{Advance, Via};
    use std::time::SystemTime;

    fn key(name: &str) -> ResourceKey {
        ResourceKey::new(name)
    }

    fn token(value: u64) -> FencingToken {
        FencingToken::new(value)
    }

    #[tokio::test]
    async fn advance_is_durable_across_reopen_and_never_lowers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fg.db");
        {
            let (store, guard) = SqliteStore::open(&path).unwrap();
            assert_eq!(store.load(&key("w")).await.unwrap().highest, None);
            let first = store
                .advance(&key("w"), token(5), Via::Write)
                .await
                .unwrap();
            assert!(matches!(first, Advance::Raised { from: None, .. }));
            let lower = store
                .advance(&key("w"), token(3), Via::Write)
                .await
                .unwrap();
            assert!(matches!(lower, Advance::AlreadyAt { highest, .. } if highest == token(5)));
            let higher = store
                .advance(&key("w"), token(9), Via::Fence)
                .await
                .unwrap();
            assert!(matches!(higher, Advance::Raised { from: Some(from), .. } if from == token(5)));
            guard.close(LastStop::Unclean).await;
        }
        let (store, _guard) = SqliteStore::open(&path).unwrap();
        assert_eq!(store.load(&key("w")).await.unwrap().highest, Some(token(9)));
    }

    #[tokio::test]
    async fn advance_all_raises_every_resource_or_none() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _guard) = SqliteStore::open(&dir.path().join("fg.db")).unwrap();
        store
            .advance(&key("b"), token(5), Via::Write)
            .await
            .unwrap();
        let both = vec![key("a"), key("b")];
        let refused = store
            .advance_all(both.clone(), token(3), Via::Write)
            .await
            .unwrap();
        assert_eq!(refused.refused_by, Some(1));
        assert_eq!(refused.durable(0).highest, None);
        assert_eq!(refused.raised_from(0), None);
        assert_eq!(
            store.load(&key("a")).await.unwrap().highest,
            None,
            "nothing written"
        );
        let raised = store.advance_all(both, token(7), Via::Write).await.unwrap();
        assert_eq!(raised.refused_by, None);
        assert_eq!(raised.raised_from(0), Some(None));
        assert_eq!(raised.raised_from(1), Some(Some(token(5))));
        for name in ["a", "b"] {
            assert_eq!(
                store.load(&key(name)).await.unwrap().highest,
                Some(token(7))
            );
        }
        let same = store
            .advance_all(vec![key("a"), key("b")], token(7), Via::Write)
            .await
            .unwrap();
        assert_eq!(
            (same.refused_by, same.raised_from(0)),
            (None, None),
            "already there"
        );
    }

    #[tokio::test]
    async fn only_a_recorded_clean_stop_reads_as_clean() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fg.db");
        let reopen = || SqliteStore::open(&path).unwrap().1;

        let guard = reopen();
        assert_eq!(guard.last_stop(), LastStop::Clean, "a new database");
        guard.close(LastStop::Clean).await;
        let guard = reopen();
        assert_eq!(guard.last_stop(), LastStop::Clean);
        guard.close(LastStop::Unclean).await;
        let guard = reopen();
        assert_eq!(guard.last_stop(), LastStop::Unclean);
        drop(guard); // dropped without a close: not known to be clean
        let reopened = (0..500).find_map(|_| match SqliteStore::open(&path) {
            Err(StoreError::InUse { .. }) => {
                // The writer thread lets go of the lock once it has flushed.
                std::thread::sleep(std::time::Duration::from_millis(10));
                None
            }
            opened => Some(opened.unwrap().1),
        });
        assert_eq!(reopened.unwrap().last_stop(), LastStop::Unclean);
    }

    #[test]
    fn a_killed_server_leaves_its_lock_file_saying_it_was_serving() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fg.db");
        std::fs::write(&path, b"").unwrap(); // an existing database with no lock file yet
        let (lock, last_stop) = LockFile::take(&path).unwrap();
        assert_eq!(last_stop, LastStop::Unclean, "no record of a clean stop");
        assert_eq!(std::fs::read(&lock.path).unwrap(), SERVING);
        drop(lock); // what the kernel does for a killed process: the mark stays
        let (lock, last_stop) = LockFile::take(&path).unwrap();
        assert_eq!(last_stop, LastStop::Unclean);
        lock.mark_clean_stop();
        drop(lock);
        assert_eq!(LockFile::take(&path).unwrap().1, LastStop::Clean);
    }

    #[tokio::test]
    async fn tokens_above_i64_max_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _guard) = SqliteStore::open(&dir.path().join("fg.db")).unwrap();
        store
            .advance(&key("big"), token(u64::MAX - 1), Via::Write)
            .await
            .unwrap();
        let below = store
            .advance(&key("big"), token(1 << 63), Via::Write)
            .await
            .unwrap();
        assert!(
            matches!(below, Advance::AlreadyAt { highest, .. } if highest == token(u64::MAX - 1))
        );
        assert_eq!(
            store.load(&key("big")).await.unwrap().highest,
            Some(token(u64::MAX - 1))
        );
    }

    #[tokio::test]
    async fn reset_lowers_the_token_and_every_answer_is_numbered_in_commit_order() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _guard) = SqliteStore::open(&dir.path().join("fg.db")).unwrap();
        let raised = store
            .advance(&key("w"), token(100), Via::Write)
            .await
            .unwrap();
        let reset = store
            .reset(&key("w"), token(3), "runaway leader".into())
            .await
            .unwrap();
        assert_eq!(reset.from, Some(token(100)));
        assert!(reset.durable.seq > raised.durable(token(100)).seq);
        let loaded = store.load(&key("w")).await.unwrap();
        assert_eq!(loaded, reset.durable);
    }

    #[tokio::test]
    async fn concurrent_commands_all_get_answers() {
        let dir = tempfile::tempdir().unwrap();
        let (store, guard) = SqliteStore::open(&dir.path().join("fg.db")).unwrap();
        let mut tasks = Vec::new();
        for i in 0..200u64 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let resource = key(&format!("r{}", i % 10));
                store
                    .advance(&resource, token(i), Via::Write)
                    .await
                    .unwrap();
                store
                    .record_rejection(Rejection {
                        at: SystemTime::now(),
                        resource,
                        reason: Reason::Stale,
                        token: Some(token(0)),
                        highest: Some(token(i)),
                        method: "PUT".into(),
                        path: "/x".into(),
                        client: "127.0.0.1:1".into(),
                        request_id: None,
                        identity: None,
                    })
                    .await
                    .unwrap();
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        for r in 0..10u64 {
            let highest = store.load(&key(&format!("r{r}"))).await.unwrap().highest;
            assert_eq!(highest, Some(token(190 + r)));
        }
        guard.close(LastStop::Unclean).await;
        assert!(matches!(store.ping().await, Err(StoreError::Closed)));
    }
}
