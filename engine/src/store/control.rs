//! The writer's transaction-control statements (BEGIN IMMEDIATE, COMMIT), prepared once at open
//! and stepped directly.
//!
//! Why not rusqlite's statement cache, as every other statement: a cached statement is found by
//! hashing its SQL, and on its way back it is hashed again, its key reallocated and its
//! bindings cleared, about 1,200 instructions a statement; every write transaction, local or a
//! batch of remote changesets, runs these two (5% of a one-row local write). They take no
//! parameters and read no table, so a prepared one never changes: stepping it is all there is.
//!
//! The one module of the workspace that may use `unsafe` (the workspace denies it): rusqlite's
//! `Statement` borrows its connection, so the store cannot keep one beside the connection it
//! owns, and these are kept as SQLite's own handles instead.

#![allow(unsafe_code)]

use std::ffi::CStr;
use std::ptr::NonNull;

use rusqlite::ffi;
use rusqlite::Connection;

/// One transaction-control statement of the writer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Control {
    BeginImmediate,
    Commit,
}

impl Control {
    const ALL: [Control; 2] = [Control::BeginImmediate, Control::Commit];

    fn sql(self) -> &'static CStr {
        match self {
            Control::BeginImmediate => c"BEGIN IMMEDIATE",
            Control::Commit => c"COMMIT",
        }
    }
}

/// The prepared statements of [`Control`], owned by the store beside its writer connection.
///
/// They must be finalized before the connection closes (SQLite refuses to close a connection
/// with live statements, and rusqlite then leaks it): the store declares this field before
/// `writer`, and fields drop in declaration order.
pub(super) struct ControlStatements {
    db: *mut ffi::sqlite3,
    /// In the order of [`Control::ALL`].
    statements: [Prepared; 2],
}

// The statements belong to the writer connection, which moves between threads with the store
// (rusqlite's `Connection` is `Send`) and is only ever used by one thread at a time, the same
// one that steps these.
unsafe impl Send for ControlStatements {}

impl std::fmt::Debug for ControlStatements {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlStatements").finish_non_exhaustive()
    }
}

impl ControlStatements {
    /// Prepares every control statement on `conn`.
    pub(super) fn prepare(conn: &Connection) -> rusqlite::Result<ControlStatements> {
        // SAFETY: the handle is only used for the calls below and, later, for statements
        // finalized before the connection closes (see the type's doc).
        let db = unsafe { conn.handle() };
        // A failure drops (finalizes) what was prepared before it.
        let [begin, commit] = Control::ALL;
        let statements = [Prepared::new(db, begin)?, Prepared::new(db, commit)?];
        Ok(ControlStatements { db, statements })
    }

    /// Runs one control statement on the writer.
    pub(super) fn run(&self, control: Control) -> rusqlite::Result<()> {
        let stmt = self.statements[control as usize].0.as_ptr();
        // SAFETY: `stmt` is a live statement of `db` (finalized only on drop).
        unsafe {
            let rc = ffi::sqlite3_step(stmt);
            // Reset at once: a COMMIT whose step failed would otherwise stay "running" and keep
            // the transaction from ending; the reset's own code repeats the step's error.
            ffi::sqlite3_reset(stmt);
            if rc == ffi::SQLITE_DONE || rc == ffi::SQLITE_ROW {
                Ok(())
            } else {
                Err(error_of(self.db, rc))
            }
        }
    }
}

/// One prepared statement, finalized when dropped.
struct Prepared(NonNull<ffi::sqlite3_stmt>);

impl Prepared {
    fn new(db: *mut ffi::sqlite3, control: Control) -> rusqlite::Result<Prepared> {
        let mut stmt = std::ptr::null_mut();
        // SAFETY: `db` is an open connection, the SQL a NUL-terminated literal.
        let rc = unsafe {
            ffi::sqlite3_prepare_v3(
                db,
                control.sql().as_ptr(),
                -1,
                ffi::SQLITE_PREPARE_PERSISTENT,
                &mut stmt,
                std::ptr::null_mut(),
            )
        };
        match (rc, NonNull::new(stmt)) {
            (ffi::SQLITE_OK, Some(stmt)) => Ok(Prepared(stmt)),
            // SQLite hands back no statement for SQL without one: not the case of these.
            (ffi::SQLITE_OK, None) => Err(error_of(db, ffi::SQLITE_MISUSE)),
            (rc, _) => Err(error_of(db, rc)),
        }
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        // SAFETY: prepared by `Prepared::new`, finalized once, here.
        unsafe { ffi::sqlite3_finalize(self.0.as_ptr()) };
    }
}

/// The error SQLite reports for `rc` on `db`, as rusqlite builds it: the connection's message
/// when it is about this error, else SQLite's text for the code.
fn error_of(db: *mut ffi::sqlite3, rc: std::os::raw::c_int) -> rusqlite::Error {
    // SAFETY: `db` is open; the message is copied before any other call on it.
    let message = unsafe {
        let text = if ffi::sqlite3_extended_errcode(db) == rc {
            ffi::sqlite3_errmsg(db)
        } else {
            ffi::sqlite3_errstr(rc)
        };
        (!text.is_null()).then(|| CStr::from_ptr(text).to_string_lossy().into_owned())
    };
    rusqlite::Error::SqliteFailure(ffi::Error::new(rc), message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_statements_run_transactions_and_report_errors() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (x INTEGER)").unwrap();
        let control = ControlStatements::prepare(&conn).unwrap();
        control.run(Control::BeginImmediate).unwrap();
        conn.execute("INSERT INTO t VALUES (1)", []).unwrap();
        control.run(Control::Commit).unwrap();
        control.run(Control::BeginImmediate).unwrap();
        conn.execute("INSERT INTO t VALUES (2)", []).unwrap();
        conn.execute_batch("ROLLBACK").unwrap();
        let rows: i64 = conn
            .query_row("SELECT sum(x) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 1);
        // COMMIT outside a transaction: SQLite's error, with its message.
        match control.run(Control::Commit) {
            Err(rusqlite::Error::SqliteFailure(e, Some(message))) => {
                assert_eq!(e.code, rusqlite::ErrorCode::Unknown);
                assert!(message.contains("no transaction is active"), "{message}");
            }
            other => panic!("expected SQLite's error, got {other:?}"),
        }
        // BEGIN inside a transaction: refused, and the open one is still there to commit.
        control.run(Control::BeginImmediate).unwrap();
        assert!(control.run(Control::BeginImmediate).is_err());
        conn.execute("INSERT INTO t VALUES (4)", []).unwrap();
        control.run(Control::Commit).unwrap();
        let rows: i64 = conn
            .query_row("SELECT sum(x) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 5);
        drop(control);
        conn.close().expect("no statement left open");
    }
}
