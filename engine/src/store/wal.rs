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

/// Shortest time between two background checkpoints, however urgent.
const CHECKPOINT_GAP_MIN: Duration = Duration::from_millis(200);
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
    /// Tells that thread a commit came.
    commits: WalCommits,
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
        let commits = WalCommits::default();
        // Half the WAL's share, so the background checkpoint comes before a write would have to
        // empty the WAL on the commit path.
        if let Some(limit) = limit {
            let half_share = (limit / page_size / 2).max(1);
            commits
                .0
                .urgent_frames
                .store(half_share.min(AUTO_CHECKPOINT_PAGES), Ordering::Relaxed);
        }
        let (seen, auto, committed) = (pages.clone(), auto_checkpoint.clone(), commits.clone());
        writer.wal_hook(Some(
            move |wal: &mut rusqlite::hooks::Wal, frames: std::ffi::c_int| {
                let frames = frames.max(0) as u64;
                seen.store(frames, Ordering::Relaxed);
                committed.committed(frames);
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
            commits,
            page_size,
            limit,
            retry_at: std::cell::Cell::new(None),
        })
    }

    /// Stops checkpointing on the commit path: the agent does it on a thread of its own,
    /// which the returned signal wakes.
    pub(super) fn checkpoint_elsewhere(&self) -> WalCommits {
        self.auto_checkpoint.store(false, Ordering::Relaxed);
        self.commits.clone()
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

/// Commits the checkpointer has not seen yet: the writer's WAL hook raises a flag, the
/// checkpointer sleeps until it is raised. An idle store's checkpointer never wakes (it woke
/// five times a second, for nothing, in each of a thousand idle agents). A WAL past
/// [`AUTO_CHECKPOINT_PAGES`] frames (SQLite's own rule), or past half the WAL's share of a
/// capped database, cuts the checkpointer's wait short.
#[derive(Debug, Clone, Default)]
pub struct WalCommits(Arc<WalCommitsInner>);

#[derive(Debug, Default)]
struct WalCommitsInner {
    /// WAL frames past which a checkpoint is urgent (0: [`AUTO_CHECKPOINT_PAGES`]).
    urgent_frames: AtomicU64,
    state: std::sync::Mutex<WalCommitsState>,
    wake: std::sync::Condvar,
    /// Lock-free fast path of the hook: set while `pending` is known to be true.
    raised: AtomicBool,
    /// Lock-free fast path of the hook: set while `urgent` is known to be true.
    raised_urgent: AtomicBool,
    /// See [`WalCommits::wal_syncs`].
    wal_syncs: AtomicU64,
}

#[derive(Debug, Default)]
struct WalCommitsState {
    /// A commit came since the checkpointer last looked.
    pending: bool,
    /// The WAL is long (or the agent stops): checkpoint without waiting out the interval.
    urgent: bool,
}

impl WalCommits {
    /// A commit came, leaving `frames` in the WAL (called by the WAL hook, on the commit path:
    /// atomic swaps only, unless a flag was down).
    fn committed(&self, frames: u64) {
        let first = !self.0.raised.swap(true, Ordering::AcqRel);
        let urgent_frames = match self.0.urgent_frames.load(Ordering::Relaxed) {
            0 => AUTO_CHECKPOINT_PAGES,
            n => n,
        };
        let urgent = frames >= urgent_frames && !self.0.raised_urgent.swap(true, Ordering::AcqRel);
        if first || urgent {
            self.raise(urgent);
        }
    }

    /// Wakes the checkpointer (after setting its stop flag, so it stops at once).
    pub fn wake(&self) {
        self.0.raised.store(true, Ordering::Release);
        self.0.raised_urgent.store(true, Ordering::Release);
        self.raise(true);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WalCommitsState> {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn raise(&self, urgent: bool) {
        let mut state = self.lock();
        state.pending = true;
        state.urgent |= urgent;
        self.0.wake.notify_all();
    }

    /// Waits until a commit (or [`WalCommits::wake`]) came since the last wait, and lowers
    /// the flag. True if none had come yet: the store was idle.
    fn wait(&self) -> bool {
        let mut state = self.lock();
        let idle = !state.pending;
        while !state.pending {
            state = self.0.wake.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.pending = false;
        self.0.raised.store(false, Ordering::Release);
        idle
    }

    /// Sleeps for `interval`, less if the checkpoint becomes urgent; lowers the urgency. True
    /// if it was urgent.
    fn sleep(&self, interval: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + interval;
        let mut state = self.lock();
        while !state.urgent {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            state = self
                .0
                .wake
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let urgent = std::mem::take(&mut state.urgent);
        self.0.raised_urgent.store(false, Ordering::Release);
        urgent
    }

    /// Times the checkpointer synced the WAL between checkpoints.
    pub fn wal_syncs(&self) -> u64 {
        self.0.wal_syncs.load(Ordering::Relaxed)
    }
}

/// Starts the thread that checkpoints the WAL of the database at `path` off the commit path
/// (see [`Store::checkpoint_in_background`]): after a commit, a passive checkpoint once
/// `every` has passed ([`gathering`]: commits in between share it; sooner if the WAL grows
/// past [`AUTO_CHECKPOINT_PAGES`] frames), which never blocks the writer or readers; nothing
/// while no commit comes; one more when `stop` turns true (the caller then calls
/// [`WalCommits::wake`]).
///
/// Meanwhile it syncs the WAL file every `sync_every`. Under `synchronous = NORMAL` SQLite
/// syncs the WAL only at checkpoints, and a power loss or an OS crash takes back every commit
/// since the last sync: with checkpoints far apart that would be as long, and a local write
/// already sent to peers could come back under the same version with other contents. A sync
/// of the WAL alone costs no checkpoint, no database-file sync and no WAL restart.
pub fn spawn_checkpointer(
    path: &Path,
    every: std::time::Duration,
    sync_every: std::time::Duration,
    commits: WalCommits,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, StoreError> {
    let conn = Connection::open(path)?;
    let mut wal_path = path.as_os_str().to_owned();
    wal_path.push("-wal");
    let wal_path = std::path::PathBuf::from(wal_path);
    let sync_wal = move |commits: &WalCommits| {
        // The file SQLite writes (its data reaches the disk whichever handle asks); gone only
        // if no connection holds the database open, and then nothing waits in it.
        match std::fs::File::open(&wal_path).and_then(|wal| wal.sync_data()) {
            Ok(()) => {
                commits.0.wal_syncs.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("syncing the WAL failed: {e}"),
        }
    };
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
            loop {
                let was_idle = commits.wait();
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let due = std::time::Instant::now() + gathering(every, was_idle, rand::random());
                // The syncs at a phase of this node's own too (every node's first commit after
                // a quiet spell comes at the same instant).
                let mut step = gathering(sync_every, was_idle, rand::random());
                loop {
                    let left = due.saturating_duration_since(std::time::Instant::now());
                    if commits.sleep(left.min(step)) || left <= step {
                        // Checkpoint now (which syncs the WAL first).
                        break;
                    }
                    sync_wal(&commits);
                    step = sync_every;
                }
                checkpoint(&conn);
                // A WAL that readers keep from restarting stays long, and every commit would
                // make the next checkpoint urgent: at most one per CHECKPOINT_GAP_MIN then.
                if !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(CHECKPOINT_GAP_MIN.min(every));
                }
            }
            checkpoint(&conn);
        })
        .map_err(|e| StoreError::Corrupt(format!("starting the checkpoint thread: {e}")))
}

/// How long the checkpointer gathers commits before a checkpoint: `every` while commits keep
/// coming, and a random part of it (`unit` in 0..1, an eighth at least) after the first commit
/// of an idle spell. Every node of a cluster commits a write within milliseconds of the
/// others: with the whole interval each time, every node's checkpoint came at the same
/// instant, interval after interval for as long as the cluster wrote, with their file syncs
/// and the WAL restarts they leave to the next commit, a wave that slowed the writes it met
/// on agents sharing a machine or a disk (800 of them: 685 ms to every node against 200).
/// Spread, each write meets a few nodes' checkpoints instead. (At a 2 s interval spreading
/// cost more than it saved: every write then met a fifth of the nodes' syncs, which the
/// kernel no longer grouped.)
fn gathering(every: Duration, was_idle: bool, unit: f64) -> Duration {
    if was_idle {
        every.mul_f64(unit.clamp(0.0, 1.0)).max(every / 8)
    } else {
        every
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// A WAL database with a table `t`, its writer, and a checkpointer running on it.
    struct Checkpointed {
        path: std::path::PathBuf,
        writer: Connection,
        commits: WalCommits,
        stop: Arc<AtomicBool>,
        thread: std::thread::JoinHandle<()>,
        _budget: WalBudget,
        _dir: tempfile::TempDir,
    }

    impl Checkpointed {
        fn start(every: Duration, sync_every: Duration) -> Checkpointed {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("db.sqlite");
            let mut writer = Connection::open(&path).unwrap();
            writer
                .execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (x INTEGER);")
                .unwrap();
            let budget = WalBudget::install(&mut writer, None).unwrap();
            let commits = budget.checkpoint_elsewhere();
            let stop = Arc::new(AtomicBool::new(false));
            let thread =
                spawn_checkpointer(&path, every, sync_every, commits.clone(), stop.clone())
                    .unwrap();
            Checkpointed {
                path,
                writer,
                commits,
                stop,
                thread,
                _budget: budget,
                _dir: dir,
            }
        }

        /// Rows of `t` in the database file (read as an immutable file, which ignores the WAL).
        fn rows_in_file(&self) -> i64 {
            let uri = format!("file:{}?immutable=1", self.path.display());
            let conn = Connection::open_with_flags(
                uri,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_URI,
            )
            .unwrap();
            conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                .unwrap_or(0)
        }

        /// Stops the checkpointer, which must end at once.
        fn stop(self) {
            self.stop.store(true, Ordering::Relaxed);
            self.commits.wake();
            let started = Instant::now();
            self.thread.join().unwrap();
            assert!(started.elapsed() < Duration::from_secs(2));
        }
    }

    /// Commits wait long for their checkpoint; the WAL holding them is synced meanwhile, at
    /// the sync period, so a power loss takes back no more than that; the checkpoint still
    /// waits its interval, and a stop still ends the thread at once.
    #[test]
    fn the_wal_is_synced_while_commits_gather_for_a_checkpoint() {
        let db = Checkpointed::start(Duration::from_secs(60), Duration::from_millis(50));
        db.writer.execute("INSERT INTO t VALUES (1)", []).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while db.commits.wal_syncs() < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            db.commits.wal_syncs() >= 3,
            "the WAL was not synced while waiting"
        );
        assert_eq!(db.rows_in_file(), 0, "checkpointed before its interval");
        db.stop();
    }

    #[test]
    fn after_an_idle_spell_a_checkpoint_gathers_a_random_part_of_the_interval() {
        let every = Duration::from_secs(2);
        assert_eq!(gathering(every, false, 0.1), every);
        // Spread over the interval (an eighth at least), not at its end.
        let waits: Vec<Duration> = (0..=100)
            .map(|i| gathering(every, true, i as f64 / 100.0))
            .collect();
        assert!(waits.iter().all(|w| *w >= every / 8 && *w <= every));
        assert_eq!(waits[50], every / 2);
        assert_eq!(gathering(every, true, 7.0), every);
    }
    use std::time::{Duration, Instant};

    #[test]
    fn the_checkpointer_sleeps_until_a_commit_comes() {
        let commits = WalCommits::default();
        let waiter = {
            let commits = commits.clone();
            std::thread::spawn(move || commits.wait())
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(!waiter.is_finished(), "woke with no commit");
        commits.committed(1);
        waiter.join().unwrap();
        // The flag went down with that wait; commits in a row raise it once.
        commits.committed(2);
        commits.committed(3);
        let started = Instant::now();
        commits.wait();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(!commits.lock().pending);
        // A short WAL waits out the interval; a long one cuts the wait short.
        let started = Instant::now();
        commits.sleep(Duration::from_millis(200));
        assert!(started.elapsed() >= Duration::from_millis(200));
        commits.committed(AUTO_CHECKPOINT_PAGES);
        let started = Instant::now();
        commits.sleep(Duration::from_secs(30));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a long WAL waited"
        );
        assert!(!commits.lock().urgent);
    }

    /// The data of a commit reaches the database file through the checkpointer, and the
    /// checkpointer stops when told.
    #[test]
    fn a_commit_is_checkpointed_in_the_background_and_the_thread_stops_when_told() {
        let db = Checkpointed::start(Duration::from_millis(10), Duration::from_secs(2));
        // The table itself was created before the checkpointer started: give it a commit.
        db.writer.execute("INSERT INTO t VALUES (1)", []).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while db.rows_in_file() != 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            db.rows_in_file(),
            1,
            "the commit never reached the database file"
        );
        db.stop();
    }
}
