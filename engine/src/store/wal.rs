//! The write-ahead log's share of `db.max_db_bytes`.
//!
//! SQLite's `max_page_count` bounds the database's pages, not the WAL beside it: while a
//! reader keeps an old snapshot, every commit appends frames that cannot be checkpointed, and
//! the WAL grew to 11.5 MB beside a 36 KB database under a 256 KiB cap. So the cap is split: a
//! quarter for the WAL, the rest for the database. SQLite's WAL hook tells the writer how many
//! frames the WAL holds after each commit; a write that would start with the WAL over its share
//! first tries to empty it (a TRUNCATE checkpoint, which succeeds once no reader needs it) and
//! is refused as "full" if it cannot. The files can exceed the cap by at most one
//! transaction's frames.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;

use super::StoreError;

/// WAL size kept on disk after a reset when there is no cap (SQLite keeps its largest size
/// otherwise).
const UNCAPPED_WAL_KEPT_BYTES: u64 = 64 * 1024 * 1024;
/// Frames after which the hook checkpoints when nobody else does (SQLite's own default).
const AUTO_CHECKPOINT_PAGES: u64 = 1000;
/// How long a write over the WAL's share waits for readers to let go of it.
const CHECKPOINT_WAIT: Duration = Duration::from_millis(20);
/// After a checkpoint found readers in the way, attempts during this long do not wait for them
/// (so a long query does not cost every write 20 ms of the store thread).
const RETRY_AFTER: Duration = Duration::from_millis(250);
/// The writer's busy timeout outside that wait (as set when the store opens).
const WRITER_BUSY_TIMEOUT: Duration = Duration::from_millis(5000);

/// The writer's view of the WAL: frames it holds, and the most it may hold.
#[derive(Debug)]
pub(super) struct WalBudget {
    /// Frames in the WAL after the last commit (SQLite's WAL hook).
    pages: Arc<AtomicU64>,
    /// True until the agent checkpoints on a thread of its own.
    auto_checkpoint: Arc<AtomicBool>,
    page_size: u64,
    /// The WAL's share of the cap, bytes; None without a cap.
    limit: Option<u64>,
    /// Until when writes are refused without another checkpoint attempt.
    retry_at: std::cell::Cell<Option<std::time::Instant>>,
}

impl WalBudget {
    /// Splits `max_db_bytes` between the database (SQLite's `max_page_count`) and the WAL, and
    /// installs the hook on the writer. Replaces SQLite's automatic checkpoint (which is itself a
    /// WAL hook) with the same rule, until [`WalBudget::checkpoint_elsewhere`].
    pub(super) fn install(
        writer: &mut Connection,
        max_db_bytes: Option<u64>,
    ) -> Result<WalBudget, StoreError> {
        let page_size: i64 = writer.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let page_size = page_size.max(512) as u64;
        let limit = max_db_bytes.map(|bytes| (bytes / 4).max(4 * page_size));
        if let (Some(bytes), Some(wal)) = (max_db_bytes, limit) {
            let db_pages = (bytes.saturating_sub(wal) / page_size).max(1);
            writer.execute_batch(&format!("PRAGMA max_page_count = {db_pages}"))?;
        }
        // Applied by the connection that resets the WAL, the writer.
        writer.execute_batch(&format!(
            "PRAGMA journal_size_limit = {}",
            limit.unwrap_or(UNCAPPED_WAL_KEPT_BYTES)
        ))?;
        let pages = Arc::new(AtomicU64::new(0));
        let auto_checkpoint = Arc::new(AtomicBool::new(true));
        let (seen, auto) = (pages.clone(), auto_checkpoint.clone());
        writer.wal_hook(Some(
            move |wal: &mut rusqlite::hooks::Wal, frames: std::ffi::c_int| {
                let frames = frames.max(0) as u64;
                seen.store(frames, Ordering::Relaxed);
                if auto.load(Ordering::Relaxed) && frames >= AUTO_CHECKPOINT_PAGES {
                    // As SQLite's own hook: a checkpoint that cannot finish now is no error of
                    // the commit, which has happened.
                    let _ = wal.checkpoint();
                }
                Ok(())
            },
        ))?;
        Ok(WalBudget {
            pages,
            auto_checkpoint,
            page_size,
            limit,
            retry_at: std::cell::Cell::new(None),
        })
    }

    /// Stops checkpointing on the commit path: the agent does it on a thread of its own.
    pub(super) fn checkpoint_elsewhere(&self) {
        self.auto_checkpoint.store(false, Ordering::Relaxed);
    }

    /// Bytes in the WAL after the last commit (or the last checkpoint made here).
    pub(super) fn bytes(&self) -> u64 {
        self.pages.load(Ordering::Relaxed) * self.page_size
    }

    /// Called before a write transaction: Ok if the WAL is within its share or could be emptied,
    /// [`StoreError::WalFull`] if readers still need it. Outside a transaction.
    pub(super) fn ensure_room(&self, writer: &Connection) -> Result<(), StoreError> {
        let Some(limit) = self.limit else {
            return Ok(());
        };
        if self.bytes() <= limit {
            return Ok(());
        }
        let now = std::time::Instant::now();
        let backing_off = self.retry_at.get().is_some_and(|at| now < at);
        writer.busy_timeout(if backing_off {
            Duration::ZERO
        } else {
            CHECKPOINT_WAIT
        })?;
        let result = writer.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
        });
        writer.busy_timeout(WRITER_BUSY_TIMEOUT)?;
        let (busy, frames) = result?;
        if busy == 0 {
            self.pages.store(frames.max(0) as u64, Ordering::Relaxed);
        }
        let bytes = self.bytes();
        if bytes <= limit {
            self.retry_at.set(None);
            return Ok(());
        }
        if !backing_off {
            self.retry_at.set(Some(now + RETRY_AFTER));
        }
        Err(StoreError::WalFull { bytes, limit })
    }
}

/// Starts the thread that checkpoints the WAL of the database at `path` off the commit path
/// (see [`Store::checkpoint_in_background`]): a passive checkpoint every `every`, which never
/// blocks the writer or readers and costs nothing when no commit came since; one more when
/// `stop` turns true.
pub fn spawn_checkpointer(
    path: &Path,
    every: std::time::Duration,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, StoreError> {
    let conn = Connection::open(path)?;
    // (The WAL's size kept on disk is the writer's setting: the writer resets it.)
    conn.execute_batch("PRAGMA busy_timeout = 5000;")?;
    let checkpoint = |conn: &Connection| {
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!("WAL checkpoint failed: {e}");
        }
    };
    std::thread::Builder::new()
        .name("patina-checkpoint".into())
        .spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(every);
                checkpoint(&conn);
            }
            checkpoint(&conn);
        })
        .map_err(|e| StoreError::Corrupt(format!("starting the checkpoint thread: {e}")))
}
