//! The store's own statements on the writer (transaction control, row clocks, the changes
//! index, its mark, a site's bookkeeping), prepared once and stepped directly.
//!
//! Why not rusqlite's statement cache, as for the user's statements and the remote merges' row
//! writes: a cached statement is found by hashing its SQL (a multi-row statement's runs to
//! kilobytes), and on its way back it is hashed again, its key reallocated and its bindings
//! cleared, about 2,000 instructions a statement with rusqlite's binding; a one-row local write
//! runs three of these (BEGIN, its clock row, COMMIT). Their SQL is fixed, so a statement is
//! found here by its place in a table, and bound and stepped through SQLite's own calls.
//!
//! The one module of the workspace that may use `unsafe` (the workspace denies it): rusqlite's
//! `Statement` borrows its connection, so the store cannot keep one beside the connection it
//! owns, and these are kept as SQLite's own handles instead. The process-wide limit on
//! SQLite's memory ([`limit_sqlite_memory`]), which rusqlite does not wrap, is set here too.

#![allow(unsafe_code)]

use std::ffi::CStr;
use std::marker::PhantomData;
use std::os::raw::c_int;
use std::ptr::NonNull;

use patina_core::value::Value;
use rusqlite::ffi;
use rusqlite::Connection;

use super::FastMap;

/// Caps the memory SQLite allocates in this process, all connections together, at `bytes`
/// (0: no cap): past it an allocation fails and the statement making it fails with "out of
/// memory", which SQLite recovers from. Each value a connection makes is capped already
/// (`SQLITE_LIMIT_LENGTH`), but a result row may hold up to 2,000 such values.
///
/// SQLite enforces the limit only while it keeps memory statistics, on by default in the
/// bundled build and turned on here too, which works when called before SQLite initializes
/// (the agent command calls this before it opens anything); a build with statistics off
/// and already initialized would ignore the limit.
pub fn limit_sqlite_memory(bytes: u64) {
    let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
    // SAFETY: SQLITE_CONFIG_MEMSTATUS takes one int; sqlite3_config refuses (SQLITE_MISUSE,
    // ignored) once SQLite is initialized, and is called here from the one thread that runs
    // before any other touches SQLite. sqlite3_hard_heap_limit64 takes a plain integer and
    // may be called at any time from any thread (it takes SQLite's memory mutex).
    unsafe {
        ffi::sqlite3_config(ffi::SQLITE_CONFIG_MEMSTATUS, 1 as c_int);
        ffi::sqlite3_hard_heap_limit64(bytes);
    }
}

/// Rows per multi-row statement ([`Sql::Clocks`], [`Sql::IndexEntries`]).
pub(super) const ROWS_PER_STATEMENT: usize = 64;

/// One of the store's own statements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Sql {
    BeginImmediate,
    Commit,
    /// Row clocks written over any stored one, (tbl, pk, cl, sentinel, cells) for each of
    /// 1..=[`ROWS_PER_STATEMENT`] rows. REPLACE: `__patina_rows` has no other index and no
    /// trigger, so replacing a row is updating it, and costs SQLite less than an upsert's DO
    /// UPDATE, which reads the row it then rewrites.
    Clocks(usize),
    /// Changes-index entries, (site, version, tbl, pk) for each of 1..=[`ROWS_PER_STATEMENT`].
    IndexEntries(usize),
    /// One changes-index entry deleted: site, version, tbl, pk.
    DeleteIndexEntry,
    /// The mark that the index lacks this replica's entries from a version on: since.
    MarkUnindexed,
    ClearUnindexed,
    /// A row's stored clock: tbl, pk; the row is cl, sentinel, cells.
    RowClock,
    /// A site's versions: head, applied, cleared, ord.
    SiteVersions,
    /// This replica's head: head.
    OwnHead,
    /// The mark (`__patina_unindexed` row 1) that the file may lack versions and index
    /// entries of remote merges, from the first batch whose own wait to the one that writes
    /// them.
    SetUnsavedMark,
    ClearUnsavedMark,
    /// A site's registration, when the first changeset of a site new here comes: ord, site_id.
    RegisterSite,
}

/// Statements of fixed SQL, the first places of [`Statements::slots`].
const FIXED: [Sql; 11] = [
    Sql::BeginImmediate,
    Sql::Commit,
    Sql::DeleteIndexEntry,
    Sql::MarkUnindexed,
    Sql::ClearUnindexed,
    Sql::RowClock,
    Sql::SiteVersions,
    Sql::OwnHead,
    Sql::SetUnsavedMark,
    Sql::ClearUnsavedMark,
    Sql::RegisterSite,
];

impl Sql {
    /// Its place in [`Statements::slots`].
    fn slot(self) -> usize {
        if let Sql::Clocks(rows) | Sql::IndexEntries(rows) = self {
            // Out of range, it would name another statement's place.
            assert!((1..=ROWS_PER_STATEMENT).contains(&rows), "{rows} rows");
        }
        match self {
            Sql::Clocks(rows) => FIXED.len() + rows - 1,
            Sql::IndexEntries(rows) => FIXED.len() + ROWS_PER_STATEMENT + rows - 1,
            fixed => FIXED
                .iter()
                .position(|f| *f == fixed)
                .expect("listed in FIXED"),
        }
    }

    fn text(self) -> &'static str {
        match self {
            Sql::BeginImmediate => "BEGIN IMMEDIATE",
            Sql::Commit => "COMMIT",
            Sql::Clocks(rows) => multi_row_sql(0, rows),
            Sql::IndexEntries(rows) => multi_row_sql(1, rows),
            Sql::DeleteIndexEntry => {
                "DELETE FROM __patina_changes WHERE site = ?1 AND version = ?2 AND tbl = ?3 AND pk = ?4"
            }
            Sql::MarkUnindexed => {
                "INSERT OR REPLACE INTO __patina_unindexed (id, since) VALUES (0, ?1)"
            }
            Sql::ClearUnindexed => "DELETE FROM __patina_unindexed WHERE id = 0",
            Sql::RowClock => {
                "SELECT cl, sentinel, cells FROM __patina_rows WHERE tbl = ?1 AND pk = ?2"
            }
            Sql::SiteVersions => {
                "UPDATE __patina_sites SET head = ?1, applied = ?2, cleared = ?3 WHERE ord = ?4"
            }
            Sql::OwnHead => "UPDATE __patina_sites SET head = ?1 WHERE ord = 0",
            Sql::SetUnsavedMark => {
                "INSERT OR REPLACE INTO __patina_unindexed (id, since) VALUES (1, 0)"
            }
            Sql::ClearUnsavedMark => "DELETE FROM __patina_unindexed WHERE id = 1",
            Sql::RegisterSite => "INSERT INTO __patina_sites (ord, site_id) VALUES (?1, ?2)",
        }
    }
}

/// The SQL of the multi-row statements (0: clocks, 1: index entries) for `rows` rows, built
/// once per process.
fn multi_row_sql(kind: usize, rows: usize) -> &'static str {
    static SQL: std::sync::OnceLock<[Vec<String>; 2]> = std::sync::OnceLock::new();
    let all = SQL.get_or_init(|| {
        let build = |head: &str, tuple: &str| -> Vec<String> {
            (1..=ROWS_PER_STATEMENT)
                .map(|n| format!("{head} {}", vec![tuple; n].join(", ")))
                .collect()
        };
        [
            build(
                "INSERT OR REPLACE INTO __patina_rows (tbl, pk, cl, sentinel, cells) VALUES",
                "(?, ?, ?, ?, ?)",
            ),
            build(
                "INSERT OR IGNORE INTO __patina_changes (site, version, tbl, pk) VALUES",
                "(?, ?, ?, ?)",
            ),
        ]
    });
    &all[kind][rows - 1]
}

/// The store's statements on one connection, each prepared the first time it is used.
///
/// They must be finalized before the connection closes (SQLite refuses to close a connection
/// with live statements, and rusqlite then leaks it): the store declares this field before
/// `writer`, and fields drop in declaration order.
pub(super) struct Statements {
    db: *mut ffi::sqlite3,
    /// By [`Sql::slot`].
    slots: Vec<Option<Prepared>>,
    /// The user's statements of local transactions, by their SQL (see [`Statements::user`]).
    user: FastMap<Box<str>, Prepared>,
    /// Remote merges' row writes (see [`Statements::row_write`]).
    row_writes: FastMap<MergeWrite, Prepared>,
    /// Statements prepared so far (see [`Statements::compiled`]).
    prepared: u64,
}

/// A remote merge's write of one row, whose SQL the caller builds from the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum MergeWrite {
    /// The key and a set of columns written: table ordinal, the columns' indexes as a bit set
    /// (tables of up to 128 columns).
    Upsert(u32, u128),
    /// A row deleted by key: table ordinal.
    Delete(u32),
}

/// Row writes kept at most: the sets of columns peers write are few in practice, but nothing
/// bounds them (a table of n columns has 2^n).
pub(super) const ROW_WRITES_MAX: usize = 1024;

/// User statements kept at most; all are finalized when one more comes (SQL that varies with
/// every request, such as values written into its text, is prepared each time anyway).
const USER_STATEMENTS_MAX: usize = 256;

// The statements belong to one connection, which moves between threads with its owner
// (rusqlite's `Connection` is `Send`) and is only ever used by one thread at a time, the same
// one that steps these.
unsafe impl Send for Statements {}

impl std::fmt::Debug for Statements {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Statements").finish_non_exhaustive()
    }
}

impl Statements {
    /// The statements of `conn`, none prepared yet. The owner must drop them before `conn`
    /// closes, and use them on the thread that uses `conn` (a safe function all the same, so
    /// that no other module needs `unsafe`: its two callers, `Store` and the backup's
    /// re-identification, keep both in one owner, statements declared first).
    pub(super) fn new(conn: &Connection) -> Statements {
        // SAFETY: the handle is only used for statements finalized before the connection
        // closes (see the type's doc).
        let db = unsafe { conn.handle() };
        Statements {
            db,
            slots: (0..FIXED.len() + 2 * ROWS_PER_STATEMENT)
                .map(|_| None)
                .collect(),
            user: FastMap::default(),
            row_writes: FastMap::default(),
            prepared: 0,
        }
    }

    /// A remote merge's row write, prepared from `sql` the first time its key comes. Formatting
    /// the SQL for every merged row was a quarter of a one-row changeset's apply, and finding
    /// it in rusqlite's cache and binding through it about 2,000 instructions more.
    pub(super) fn row_write(
        &mut self,
        key: MergeWrite,
        sql: impl FnOnce() -> String,
    ) -> rusqlite::Result<Bound<'_>> {
        let stmt = match self.row_writes.get(&key) {
            Some(prepared) => prepared.0,
            None => {
                let prepared = Prepared::new(self.db, &sql())?;
                self.prepared += 1;
                if self.row_writes.len() >= ROW_WRITES_MAX {
                    self.row_writes.clear();
                }
                self.row_writes.entry(key).or_insert(prepared).0
            }
        };
        Ok(self.bound(stmt))
    }

    /// Lets go of the row writes (the schema was reloaded: a table's columns may differ).
    pub(super) fn forget_row_writes(&mut self) {
        self.row_writes.clear();
    }

    /// Lets go of the store's own statements and the row writes after a schema change: a
    /// statement prepared before it would be compiled again by its next run, which
    /// [`Statements::prepare_common`] is to spare the first write. The user's are kept: SQLite
    /// prepares them again as it needs.
    pub(super) fn forget_store_statements(&mut self) {
        self.slots.iter_mut().for_each(|slot| *slot = None);
        self.row_writes.clear();
    }

    /// A user's statement, prepared the first time its SQL comes (with whatever authorizer
    /// and hooks the connection has then, as rusqlite's cache would). None when the SQL does
    /// not prepare as exactly one statement (an error, none, several): the caller then goes
    /// through rusqlite, which reports those cases with its own errors. The user's SQL is
    /// found by one fast hash here, where rusqlite's cache hashes it twice and clears the
    /// bindings (about 1,900 instructions a statement with its binding).
    pub(super) fn user(&mut self, sql: &str) -> Option<Bound<'_>> {
        let stmt = match self.user.get(sql) {
            Some(prepared) => prepared.0,
            None => {
                let prepared = Prepared::single(self.db, sql)?;
                self.prepared += 1;
                if self.user.len() >= USER_STATEMENTS_MAX {
                    self.user.clear();
                }
                self.user.entry(sql.into()).or_insert(prepared).0
            }
        };
        Some(self.bound(stmt))
    }

    /// The statement, ready to bind: every one of its parameters, in order, before
    /// [`Bound::execute`] or [`Bound::query_row`].
    pub(super) fn get(&mut self, sql: Sql) -> rusqlite::Result<Bound<'_>> {
        let slot = &mut self.slots[sql.slot()];
        let stmt = match slot {
            Some(prepared) => prepared.0,
            None => {
                let prepared = Prepared::new(self.db, sql.text())?;
                self.prepared += 1;
                slot.insert(prepared).0
            }
        };
        Ok(self.bound(stmt))
    }

    /// `stmt` (one of these statements), ready to bind from its first parameter.
    fn bound(&mut self, stmt: NonNull<ffi::sqlite3_stmt>) -> Bound<'_> {
        Bound {
            db: self.db,
            stmt,
            next: 1,
            failed: ffi::SQLITE_OK,
            by_name: false,
            _statements: PhantomData,
        }
    }

    /// Prepares every statement of fixed SQL and the one-row clock write, unless prepared
    /// already.
    pub(super) fn prepare_common(&mut self) -> rusqlite::Result<()> {
        for sql in FIXED.into_iter().chain([Sql::Clocks(1)]) {
            self.get(sql)?;
        }
        Ok(())
    }

    /// How many times SQLite compiled one of these statements: each first preparation, and
    /// each preparation again of a live one (SQLite does that at a run after a schema change
    /// or a new authorizer). Goes down when statements are let go: compare it across calls
    /// that keep them (tests).
    pub(super) fn compiled(&self) -> u64 {
        let live = self.slots.iter().flatten();
        let live = live
            .chain(self.row_writes.values())
            .chain(self.user.values());
        self.prepared
            + live
                // SAFETY: a live statement of this connection; reading a counter changes nothing.
                .map(|p| unsafe {
                    ffi::sqlite3_stmt_status(p.0.as_ptr(), ffi::SQLITE_STMTSTATUS_REPREPARE, 0)
                } as u64)
                .sum::<u64>()
    }

    /// Runs a statement without parameters.
    pub(super) fn run(&mut self, sql: Sql) -> rusqlite::Result<usize> {
        self.get(sql)?.execute()
    }
}

/// A statement being bound and run; reset when dropped, so none is ever left running.
pub(super) struct Bound<'s> {
    db: *mut ffi::sqlite3,
    stmt: NonNull<ffi::sqlite3_stmt>,
    /// The next parameter's number (SQLite counts from 1).
    next: c_int,
    /// The first binding's failure, reported by the run.
    failed: c_int,
    /// Bound by name ([`Bound::value_at`]): parameters left out stay NULL, as with rusqlite.
    by_name: bool,
    /// One statement of [`Statements`] bound at a time.
    _statements: PhantomData<&'s mut Statements>,
}

impl<'s> Bound<'s> {
    fn record(&mut self, rc: c_int) -> &mut Self {
        if self.failed == ffi::SQLITE_OK {
            self.failed = rc;
        }
        self.next += 1;
        self
    }

    pub(super) fn int(&mut self, value: i64) -> &mut Self {
        // SAFETY: a live statement of this connection.
        let rc = unsafe { ffi::sqlite3_bind_int64(self.stmt.as_ptr(), self.next, value) };
        self.record(rc)
    }

    /// The statement's parameters.
    pub(super) fn parameter_count(&self) -> usize {
        // SAFETY: a live statement.
        unsafe { ffi::sqlite3_bind_parameter_count(self.stmt.as_ptr()) as usize }
    }

    /// The number of the parameter a user names: `:a`, `@a` or `$a` as written, or a name
    /// without its prefix matching any of them (the rule of `query::bind`). None if the
    /// statement has no such parameter.
    pub(super) fn named_index(&self, name: &str) -> Option<c_int> {
        let index = |name: &str| {
            let name = std::ffi::CString::new(name).ok()?;
            // SAFETY: a live statement; a NUL-terminated name.
            let i = unsafe { ffi::sqlite3_bind_parameter_index(self.stmt.as_ptr(), name.as_ptr()) };
            (i > 0).then_some(i)
        };
        if name.starts_with([':', '@', '$']) {
            index(name)
        } else {
            [":", "@", "$"]
                .iter()
                .find_map(|prefix| index(&format!("{prefix}{name}")))
        }
    }

    /// Binds a value to parameter `index` (from [`Bound::named_index`]); the statement then
    /// runs with every parameter not bound so as NULL.
    pub(super) fn value_at(&mut self, index: c_int, value: &'s Value) -> &mut Self {
        // First: the first call to `by_name` clears every binding.
        self.by_name();
        let next = std::mem::replace(&mut self.next, index);
        self.value(value);
        self.next = next;
        self
    }

    /// Bound by name, even with no value at all: every parameter left out runs as NULL.
    pub(super) fn by_name(&mut self) -> &mut Self {
        if !self.by_name {
            // Every `Bound` clears its bindings when dropped, but one leaked (never dropped)
            // would leave its borrowed values bound, and a parameter not named here would
            // read them: cleared here too. (Positional statements rebind every parameter
            // before they run: `check_bound`.)
            // SAFETY: a live statement.
            unsafe { ffi::sqlite3_clear_bindings(self.stmt.as_ptr()) };
        }
        self.by_name = true;
        self
    }

    /// Binds a value (text and blobs borrowed, see [`Bound::blob`]).
    pub(super) fn value(&mut self, value: &'s Value) -> &mut Self {
        match value {
            Value::Null => self.null(),
            Value::Integer(i) => self.int(*i),
            Value::Real(r) => {
                // SAFETY: a live statement.
                let rc = unsafe { ffi::sqlite3_bind_double(self.stmt.as_ptr(), self.next, *r) };
                self.record(rc)
            }
            Value::Text(text) => self.text(text),
            Value::Blob(blob) => self.blob(blob),
        }
    }

    /// Binds `value`, borrowed (see [`Bound::blob`]).
    pub(super) fn text(&mut self, value: &'s str) -> &mut Self {
        self.bytes(value.as_bytes(), true)
    }

    /// The first binding's failure, as rusqlite reports one.
    pub(super) fn binding_error(&self) -> Option<rusqlite::Error> {
        (self.failed != ffi::SQLITE_OK).then(|| error_of(self.db, self.failed))
    }

    pub(super) fn null(&mut self) -> &mut Self {
        // SAFETY: as above.
        let rc = unsafe { ffi::sqlite3_bind_null(self.stmt.as_ptr(), self.next) };
        self.record(rc)
    }

    /// Binds `value`, borrowed, not copied: SQLite reads it where it is until the statement
    /// is reset and its bindings cleared, which dropping this `Bound` does, and the borrow
    /// outlives this `Bound`. A copy (rusqlite's way) cost each blob or text a malloc, a
    /// memcpy and a free: about 450 instructions a row of a ten-row insert (BENCHMARKS).
    pub(super) fn blob(&mut self, value: &'s [u8]) -> &mut Self {
        self.bytes(value, false)
    }

    /// Binds `value` as text (UTF-8 the caller vouches for) or as a blob, borrowed (see
    /// [`Bound::blob`]).
    fn bytes(&mut self, value: &'s [u8], text: bool) -> &mut Self {
        let (stmt, at) = (self.stmt.as_ptr(), self.next);
        let rc = match c_int::try_from(value.len()) {
            // An empty slice's pointer is dangling: a static empty string (which SQLite may
            // keep) or a zero-length blob says the same safely.
            // SAFETY: a live statement.
            Ok(0) if text => unsafe {
                ffi::sqlite3_bind_text(stmt, at, c"".as_ptr(), 0, ffi::SQLITE_STATIC())
            },
            // SAFETY: as above.
            Ok(0) => unsafe { ffi::sqlite3_bind_zeroblob(stmt, at, 0) },
            // SAFETY: as above; `len` bytes readable at the pointer for `'s`, which outlives
            // this `Bound`, whose drop resets the statement and clears its bindings: SQLite
            // never reads the pointer after that (SQLITE_STATIC: "will not change or go away
            // until the parameter is rebound or cleared"). The shared borrow keeps the bytes
            // unchanged meanwhile.
            Ok(len) => unsafe {
                let data = value.as_ptr();
                if text {
                    ffi::sqlite3_bind_text(stmt, at, data.cast(), len, ffi::SQLITE_STATIC())
                } else {
                    ffi::sqlite3_bind_blob(stmt, at, data.cast(), len, ffi::SQLITE_STATIC())
                }
            },
            Err(_) => ffi::SQLITE_TOOBIG,
        };
        self.record(rc)
    }

    /// A failed binding, or a count of bound parameters other than the statement's.
    fn check_bound(&self) -> rusqlite::Result<()> {
        if self.failed != ffi::SQLITE_OK {
            return Err(error_of(self.db, self.failed));
        }
        if self.by_name {
            return Ok(());
        }
        // SAFETY: a live statement.
        let expected = unsafe { ffi::sqlite3_bind_parameter_count(self.stmt.as_ptr()) };
        let bound = self.next - 1;
        if bound != expected {
            return Err(rusqlite::Error::InvalidParameterCount(
                bound as usize,
                expected as usize,
            ));
        }
        Ok(())
    }

    /// Runs a statement that returns no row; the rows it changed. The same outcomes as
    /// rusqlite's `Statement::raw_execute` (a statement that returns a row is an error).
    pub(super) fn execute(self) -> rusqlite::Result<usize> {
        self.check_bound()?;
        // SAFETY: a live, fully bound statement; reset here and again on drop (harmless).
        unsafe {
            match ffi::sqlite3_step(self.stmt.as_ptr()) {
                ffi::SQLITE_DONE => match ffi::sqlite3_reset(self.stmt.as_ptr()) {
                    ffi::SQLITE_OK => Ok(ffi::sqlite3_changes64(self.db) as usize),
                    rc => Err(error_of(self.db, rc)),
                },
                ffi::SQLITE_ROW => Err(rusqlite::Error::ExecuteReturnedResults),
                rc => Err(error_of(self.db, rc)),
            }
        }
    }

    /// Runs a query for its first row, read by `read`; None if it has none.
    pub(super) fn query_row<T>(
        self,
        read: impl FnOnce(&Row<'_>) -> T,
    ) -> rusqlite::Result<Option<T>> {
        self.check_bound()?;
        // SAFETY: as above.
        match unsafe { ffi::sqlite3_step(self.stmt.as_ptr()) } {
            ffi::SQLITE_ROW => Ok(Some(read(&Row {
                stmt: self.stmt,
                _bound: PhantomData,
            }))),
            ffi::SQLITE_DONE => Ok(None),
            rc => Err(error_of(self.db, rc)),
        }
    }
}

impl Drop for Bound<'_> {
    fn drop(&mut self) {
        // SAFETY: a live statement.
        unsafe {
            // A COMMIT whose step failed would otherwise stay "running" and keep the
            // transaction from ending. The reset's own code repeats the step's error, reported
            // already.
            ffi::sqlite3_reset(self.stmt.as_ptr());
            // Blobs and text are bound borrowed (`Bound::blob`): cleared now, before the
            // borrow ends, SQLite never reads them again. (When they were copies, keeping them
            // held the connection's lookaside slots, and SQLite's own small allocations went
            // to malloc: a one-row update cost 4,000 instructions more.)
            if self.next > 1 || self.by_name {
                ffi::sqlite3_clear_bindings(self.stmt.as_ptr());
            }
        }
    }
}

/// The current row of a query, valid until the statement steps again or is reset.
pub(super) struct Row<'b> {
    stmt: NonNull<ffi::sqlite3_stmt>,
    _bound: PhantomData<&'b ()>,
}

impl Row<'_> {
    /// Column `i` as an integer (SQLite's conversion for other types).
    pub(super) fn int(&self, i: c_int) -> i64 {
        // SAFETY: the statement is on a row (this value's lifetime).
        unsafe { ffi::sqlite3_column_int64(self.stmt.as_ptr(), i) }
    }

    /// Column `i` as bytes, None if NULL; borrowed from SQLite until the row moves on.
    pub(super) fn blob(&self, i: c_int) -> Option<&[u8]> {
        let stmt = self.stmt.as_ptr();
        // SAFETY: on a row (as above); the pointer is read before the length, as SQLite asks,
        // and stays valid while the statement stays on this row, which `&self` ensures.
        unsafe {
            if ffi::sqlite3_column_type(stmt, i) == ffi::SQLITE_NULL {
                return None;
            }
            let data = ffi::sqlite3_column_blob(stmt, i);
            let len = ffi::sqlite3_column_bytes(stmt, i);
            if data.is_null() || len <= 0 {
                return Some(&[]);
            }
            Some(std::slice::from_raw_parts(data.cast::<u8>(), len as usize))
        }
    }
}

/// One prepared statement, finalized when dropped.
struct Prepared(NonNull<ffi::sqlite3_stmt>);

impl Prepared {
    /// `sql`'s first statement prepared on `db`, with the number of bytes of `sql` it took;
    /// no statement when `sql` holds none (only blanks or comments); SQLite's code on error.
    fn first(db: *mut ffi::sqlite3, sql: &str) -> Result<(Option<Prepared>, usize), c_int> {
        let len = c_int::try_from(sql.len()).map_err(|_| ffi::SQLITE_TOOBIG)?;
        let mut stmt = std::ptr::null_mut();
        let mut tail: *const std::os::raw::c_char = std::ptr::null();
        // SAFETY: `db` is an open connection; `len` bytes of SQL at the pointer; the tail
        // SQLite sets points into them.
        let rc = unsafe {
            ffi::sqlite3_prepare_v3(
                db,
                sql.as_ptr().cast(),
                len,
                ffi::SQLITE_PREPARE_PERSISTENT,
                &mut stmt,
                &mut tail,
            )
        };
        // Owned at once, so an error's partial statement (SQLite leaves none) is finalized.
        let prepared = NonNull::new(stmt).map(Prepared);
        if rc != ffi::SQLITE_OK {
            return Err(rc);
        }
        let used = (tail as usize).saturating_sub(sql.as_ptr() as usize);
        Ok((prepared, used.min(sql.len())))
    }

    /// One of the store's own statements, which always holds one.
    fn new(db: *mut ffi::sqlite3, sql: &str) -> rusqlite::Result<Prepared> {
        match Prepared::first(db, sql) {
            Ok((Some(prepared), _)) => Ok(prepared),
            // SQLite hands back no statement for SQL without one: not the case of these.
            Ok((None, _)) => Err(error_of(db, ffi::SQLITE_MISUSE)),
            Err(rc) => Err(error_of(db, rc)),
        }
    }

    /// `sql` prepared if it is exactly one statement, perhaps followed by blanks and
    /// semicolons; None otherwise (errors included).
    fn single(db: *mut ffi::sqlite3, sql: &str) -> Option<Prepared> {
        let (prepared, used) = Prepared::first(db, sql).ok()?;
        sql.as_bytes()[used..]
            .iter()
            .all(|b| b.is_ascii_whitespace() || *b == b';')
            .then_some(prepared?)
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
fn error_of(db: *mut ffi::sqlite3, rc: c_int) -> rusqlite::Error {
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

    type RowRead = (i64, Option<Vec<u8>>, Option<Vec<u8>>);

    fn sum(conn: &Connection) -> i64 {
        conn.query_row("SELECT coalesce(sum(x), 0) FROM t", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn control_statements_run_transactions_and_report_errors() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (x INTEGER)").unwrap();
        let mut statements = Statements::new(&conn);
        statements.run(Sql::BeginImmediate).unwrap();
        conn.execute("INSERT INTO t VALUES (1)", []).unwrap();
        statements.run(Sql::Commit).unwrap();
        statements.run(Sql::BeginImmediate).unwrap();
        conn.execute("INSERT INTO t VALUES (2)", []).unwrap();
        conn.execute_batch("ROLLBACK").unwrap();
        assert_eq!(sum(&conn), 1);
        // COMMIT outside a transaction: SQLite's error, with its message.
        match statements.run(Sql::Commit) {
            Err(rusqlite::Error::SqliteFailure(e, Some(message))) => {
                assert_eq!(e.code, rusqlite::ErrorCode::Unknown);
                assert!(message.contains("no transaction is active"), "{message}");
            }
            other => panic!("expected SQLite's error, got {other:?}"),
        }
        // BEGIN inside a transaction: refused, and the open one is still there to commit.
        statements.run(Sql::BeginImmediate).unwrap();
        assert!(statements.run(Sql::BeginImmediate).is_err());
        conn.execute("INSERT INTO t VALUES (4)", []).unwrap();
        statements.run(Sql::Commit).unwrap();
        assert_eq!(sum(&conn), 5);
        drop(statements);
        conn.close().expect("no statement left open");
    }

    #[test]
    fn bound_values_are_written_and_read_back_and_miscounts_refused() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(super::super::INTERNAL_SCHEMA).unwrap();
        let mut statements = Statements::new(&conn);
        // Two clock rows in one statement, one with a NULL sentinel and an empty cell list;
        // blobs borrowed from a buffer that must outlive the statement's run (the compiler
        // refuses to change it before then).
        let buffer = vec![7u8, 8, 9];
        let mut stmt = statements.get(Sql::Clocks(2)).unwrap();
        stmt.int(3)
            .blob(b"key-a")
            .int(1)
            .blob(&buffer)
            .blob(b"cells");
        stmt.int(3).blob(b"key-b").int(2).null().blob(&[]);
        assert_eq!(stmt.execute().unwrap(), 2);
        // The run's end cleared the bindings: the buffer may change, and the statement runs
        // again with new values, never the old pointer.
        drop(buffer);
        let other = b"fresh".to_vec();
        let mut stmt = statements.get(Sql::Clocks(1)).unwrap();
        stmt.int(3).blob(b"key-d").int(1).blob(&other).blob(b"c");
        assert_eq!(stmt.execute().unwrap(), 1);
        fn read(statements: &mut Statements, pk: &[u8]) -> Option<RowRead> {
            let mut stmt = statements.get(Sql::RowClock).unwrap();
            stmt.int(3).blob(pk);
            stmt.query_row(|row| {
                (
                    row.int(0),
                    row.blob(1).map(<[u8]>::to_vec),
                    row.blob(2).map(<[u8]>::to_vec),
                )
            })
            .unwrap()
        }
        assert_eq!(
            read(&mut statements, b"key-a"),
            Some((1, Some(vec![7, 8, 9]), Some(b"cells".to_vec())))
        );
        assert_eq!(
            read(&mut statements, b"key-b"),
            Some((2, None, Some(Vec::new())))
        );
        assert_eq!(read(&mut statements, b"key-c"), None);
        assert_eq!(
            read(&mut statements, b"key-d"),
            Some((1, Some(b"fresh".to_vec()), Some(b"c".to_vec())))
        );
        // Too few or too many parameters: refused before the statement runs.
        let mut stmt = statements.get(Sql::OwnHead).unwrap();
        stmt.int(1).int(2);
        match stmt.execute() {
            Err(rusqlite::Error::SqliteFailure(e, _)) => {
                assert_eq!(e.extended_code, ffi::SQLITE_RANGE)
            }
            other => panic!("expected SQLite's range error, got {other:?}"),
        }
        let stmt = statements.get(Sql::DeleteIndexEntry).unwrap();
        assert!(matches!(
            stmt.execute(),
            Err(rusqlite::Error::InvalidParameterCount(0, 4))
        ));
        // A statement that fails leaves nothing running: the same one serves again.
        let mut stmt = statements.get(Sql::Clocks(1)).unwrap();
        stmt.int(3).blob(b"key-c").null().null().blob(b"");
        assert!(stmt.execute().is_err(), "cl is NOT NULL");
        assert_eq!(read(&mut statements, b"key-c"), None);
        drop(statements);
        conn.close().expect("no statement left open");
    }

    #[test]
    fn a_named_parameter_left_out_runs_as_null_even_after_a_leaked_binding() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (x TEXT, y TEXT)")
            .unwrap();
        let mut statements = Statements::new(&conn);
        let sql = "INSERT INTO t VALUES (:x, :y)";
        let (kept_x, kept_y) = (Value::Text("old x".into()), Value::Text("old y".into()));
        {
            let mut stmt = statements.user(sql).unwrap();
            let (x, y) = (
                stmt.named_index(":x").unwrap(),
                stmt.named_index(":y").unwrap(),
            );
            stmt.by_name().value_at(x, &kept_x).value_at(y, &kept_y);
            // Never dropped: its reset and clearing never run, the values stay bound.
            std::mem::forget(stmt);
        }
        let x_only = Value::Text("new x".into());
        let mut stmt = statements.user(sql).unwrap();
        let x = stmt.named_index(":x").unwrap();
        stmt.value_at(x, &x_only);
        assert_eq!(stmt.execute().unwrap(), 1);
        let row: (String, Option<String>) = conn
            .query_row("SELECT x, y FROM t", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap();
        assert_eq!(
            row,
            ("new x".to_string(), None),
            "y must not be the leaked value"
        );
        drop((kept_x, kept_y));
        drop(statements);
        conn.close().expect("no statement left open");
    }

    #[test]
    fn user_statements_are_single_ones_kept_up_to_a_bound() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (x INTEGER)").unwrap();
        let mut statements = Statements::new(&conn);
        let insert = |statements: &mut Statements, sql: &str, value: Value| {
            let mut stmt = statements.user(sql).expect("one statement");
            assert_eq!(stmt.parameter_count(), 1);
            stmt.value(&value);
            stmt.execute()
        };
        assert_eq!(
            insert(
                &mut statements,
                "INSERT INTO t VALUES (?1)",
                Value::Integer(1)
            )
            .unwrap(),
            1
        );
        // Blanks and semicolons after the statement are nothing more.
        insert(
            &mut statements,
            "INSERT INTO t VALUES (?) ; \n",
            Value::Integer(2),
        )
        .unwrap();
        // The value's type is SQLite's to convert, as with rusqlite's binding.
        insert(
            &mut statements,
            "INSERT INTO t VALUES (?1)",
            Value::Text("4".into()),
        )
        .unwrap();
        assert_eq!(sum(&conn), 7);
        // A comment that ends the statement's text is SQLite's to skip.
        assert!(statements.user("SELECT 1 -- a comment").is_some());
        // Several statements, none, a comment after one, bad SQL: left to rusqlite.
        for sql in [
            "INSERT INTO t VALUES (1); INSERT INTO t VALUES (2)",
            "",
            " ; ",
            "-- nothing",
            "INSERT INTO t VALUES (1); -- and a comment",
            "INSERT INTO nowhere VALUES (1)",
            "INSERT INTO t VALUES (",
        ] {
            assert!(statements.user(sql).is_none(), "{sql:?}");
        }
        // A statement that returns a row: refused as rusqlite refuses it.
        let stmt = statements.user("SELECT x FROM t").unwrap();
        assert!(matches!(
            stmt.execute(),
            Err(rusqlite::Error::ExecuteReturnedResults)
        ));
        // Kept up to the bound, then all let go at once.
        for n in 0..USER_STATEMENTS_MAX + 10 {
            let sql = format!("INSERT INTO t SELECT {n} WHERE 0");
            statements.user(&sql).unwrap().execute().unwrap();
            assert!(statements.user.len() <= USER_STATEMENTS_MAX);
        }
        drop(statements);
        conn.close().expect("no statement left open");
    }
}
