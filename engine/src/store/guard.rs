//! What keeps one statement from holding a connection: a deadline and a "the client left"
//! check, enforced while SQLite runs (its progress handler), and the authorizer that keeps the
//! API's read connections read-only and unchanged by what they run.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::Connection;

/// SQLite virtual-machine steps between two checks of a deadline (a few microseconds).
const PROGRESS_STEPS: i32 = 1000;

/// Why a statement was interrupted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// It ran past its deadline.
    Deadline,
    /// The client that asked for it went away.
    Cancelled,
}

type CancelCheck = Box<dyn Fn() -> bool + Send>;

#[derive(Default)]
struct Armed {
    deadline: Option<Instant>,
    cancelled: Option<CancelCheck>,
}

/// The interrupt of one connection: armed around a statement, checked by SQLite's progress
/// handler, which stops the statement (SQLITE_INTERRUPT) when the deadline passes or the
/// cancel check says so.
#[derive(Clone, Default)]
pub struct Interrupt {
    armed: Arc<Mutex<Armed>>,
    /// 0: not stopped; 1: deadline; 2: cancelled.
    stopped: Arc<AtomicU8>,
}

impl std::fmt::Debug for Interrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interrupt")
            .field("stopped", &self.stopped())
            .finish()
    }
}

impl Interrupt {
    /// Installs the progress handler on `conn`.
    pub fn install(conn: &mut Connection) -> rusqlite::Result<Interrupt> {
        let interrupt = Interrupt::default();
        let handler = interrupt.clone();
        conn.progress_handler(PROGRESS_STEPS, Some(move || handler.should_stop()))?;
        Ok(interrupt)
    }

    /// Arms it until [`Interrupt::disarm`]: a deadline and/or a cancel check.
    pub fn arm(&self, deadline: Option<Instant>, cancelled: Option<CancelCheck>) {
        self.stopped.store(0, Ordering::Relaxed);
        *self.armed.lock().unwrap_or_else(|e| e.into_inner()) = Armed {
            deadline,
            cancelled,
        };
    }

    /// Nothing stops statements any more.
    pub fn disarm(&self) {
        *self.armed.lock().unwrap_or_else(|e| e.into_inner()) = Armed::default();
    }

    /// Why the last armed statement was stopped, if it was.
    pub fn stopped(&self) -> Option<Stopped> {
        match self.stopped.load(Ordering::Relaxed) {
            1 => Some(Stopped::Deadline),
            2 => Some(Stopped::Cancelled),
            _ => None,
        }
    }

    fn should_stop(&self) -> bool {
        let armed = self.armed.lock().unwrap_or_else(|e| e.into_inner());
        let why = if armed.deadline.is_some_and(|d| Instant::now() >= d) {
            1
        } else if armed.cancelled.as_ref().is_some_and(|c| c()) {
            2
        } else {
            return false;
        };
        self.stopped.store(why, Ordering::Relaxed);
        true
    }
}

/// PRAGMAs a query may run: they describe the schema and change nothing (their argument is a
/// table or index name, never a setting).
const READABLE_PRAGMAS: &[&str] = &[
    "table_info",
    "table_xinfo",
    "table_list",
    "index_list",
    "index_info",
    "index_xinfo",
    "foreign_key_list",
    "collation_list",
    "function_list",
    "data_version",
];

/// Installs the authorizer of the API's read connections: one read-only statement that
/// leaves the connection as it found it. Refused: writes of any kind, transaction control and
/// savepoints (a pinned read transaction keeps an old snapshot and stops WAL checkpoints),
/// ATTACH and DETACH (they open any file the agent can read), and every PRAGMA but the
/// schema-describing ones above.
pub fn install_read_only(conn: &mut Connection) -> rusqlite::Result<()> {
    conn.authorizer(Some(|ctx: AuthContext<'_>| match ctx.action {
        AuthAction::Select
        | AuthAction::Read { .. }
        | AuthAction::Function { .. }
        | AuthAction::Recursive => Authorization::Allow,
        AuthAction::Pragma { pragma_name, .. }
            if READABLE_PRAGMAS
                .iter()
                .any(|p| p.eq_ignore_ascii_case(pragma_name)) =>
        {
            Authorization::Allow
        }
        _ => Authorization::Deny,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const RUNAWAY: &str =
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) SELECT count(*) FROM c";

    #[test]
    fn a_runaway_statement_stops_at_its_deadline_and_the_connection_is_reusable() {
        let mut conn = Connection::open_in_memory().unwrap();
        let interrupt = Interrupt::install(&mut conn).unwrap();
        interrupt.arm(Some(Instant::now() + Duration::from_millis(50)), None);
        let err = conn
            .query_row(RUNAWAY, [], |r| r.get::<_, i64>(0))
            .unwrap_err();
        assert_eq!(
            err.sqlite_error_code(),
            Some(rusqlite::ErrorCode::OperationInterrupted)
        );
        assert_eq!(interrupt.stopped(), Some(Stopped::Deadline));
        interrupt.disarm();
        assert_eq!(
            conn.query_row("SELECT 2", [], |r| r.get::<_, i64>(0))
                .unwrap(),
            2
        );
    }

    #[test]
    fn a_cancelled_statement_stops() {
        let mut conn = Connection::open_in_memory().unwrap();
        let interrupt = Interrupt::install(&mut conn).unwrap();
        let gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = gone.clone();
        interrupt.arm(None, Some(Box::new(move || flag.load(Ordering::Relaxed))));
        let setter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            gone.store(true, Ordering::Relaxed);
        });
        assert!(conn.query_row(RUNAWAY, [], |r| r.get::<_, i64>(0)).is_err());
        setter.join().unwrap();
        assert_eq!(interrupt.stopped(), Some(Stopped::Cancelled));
    }

    #[test]
    fn the_read_only_authorizer_refuses_what_would_change_the_connection() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (a INTEGER PRIMARY KEY)")
            .unwrap();
        install_read_only(&mut conn).unwrap();
        for refused in [
            "BEGIN",
            "SAVEPOINT s",
            "ATTACH 'other.db' AS o",
            "PRAGMA cache_size = 1",
            "PRAGMA writable_schema = ON",
            "PRAGMA busy_timeout = 1",
            "PRAGMA mmap_size = 1",
            "INSERT INTO t VALUES (1)",
            "DELETE FROM t",
            "CREATE TABLE u (a)",
        ] {
            assert!(conn.prepare(refused).is_err(), "{refused} was accepted");
        }
        for allowed in [
            "SELECT * FROM t",
            "PRAGMA table_info(t)",
            "SELECT name FROM pragma_table_info('t')",
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c LIMIT 3) SELECT x FROM c",
        ] {
            conn.prepare(allowed)
                .unwrap_or_else(|e| panic!("{allowed} was refused: {e}"));
        }
        assert!(conn.is_autocommit());
    }
}
