//! The CRDT store: the only code that opens SQLite.
//!
//! One writer connection runs local transactions (capturing their writes into clocks before
//! COMMIT) and applies remote changesets through core's merge rule in batched transactions; one
//! read-only connection serves queries and changeset extraction. WAL mode, so readers never
//! block the writer.
//!
//! Internal tables (all `__patina_*`):
//! - `sites`: site id per local ordinal (0 = this replica), with each site's head and its
//!   applied and cleared version ranges;
//! - `tables`, `columns`: local ordinals of replicated tables and their non-key columns;
//! - `rows`: one clock per row ever seen (tombstones included): causal length, sentinel origin,
//!   cell clocks;
//! - `changes`: which rows hold clocks of which changeset (site, version), the index that makes
//!   extraction by version range cheap. Kept exact: an origin is removed from it as soon as no
//!   clock of the row refers to it any more, so a version with no entry left is cleared.

pub mod actor;
pub mod backup;
mod capture;
mod clock;
pub mod error;
pub mod guard;
pub mod readers;
pub mod schema;
mod wal;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use patina_core::apply::{apply_changeset, Applied, ApplyFaults, ApplyTarget, PartStep};
use patina_core::change::{Change, Changeset, ChangesetId, Column, RowChange, SeqSpan};
use patina_core::chunk::Partial;
use patina_core::ids::{CausalLength, ColVersion, DbVersion, Seq, SiteId, SITE_ID_LEN};
use patina_core::merge::{Incoming, MergeDecision, MergeFaults, Origin, RowClock};
use patina_core::pk::PackedPk;
use patina_core::validate::validate_changeset;
use patina_core::value::Value;
use patina_core::versions::{Bookkeeping, SiteVersions};
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, ToSql};

pub use capture::to_value;
use capture::{trigger_sql, Capture, RowWrite};
use clock::{ColOrd, SiteOrd, SiteTable};
pub use error::{ChangeError, SchemaError, StoreError};
use guard::{Interrupt, Stopped};
use schema::{quote_ident, Affinity, TableDef};

/// Parameters of one statement.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Params {
    /// No parameters.
    #[default]
    None,
    /// `?`, `?1` ... in order.
    Positional(Vec<Value>),
    /// `:name`, `@name`, `$name`; a name given without its prefix matches any of them.
    Named(Vec<(String, Value)>),
}

/// One SQL statement with its parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    /// The SQL text (one statement).
    pub sql: String,
    /// Its parameters.
    pub params: Params,
}

impl Statement {
    /// A statement without parameters.
    pub fn new(sql: impl Into<String>) -> Self {
        Statement {
            sql: sql.into(),
            params: Params::None,
        }
    }

    /// A statement with positional parameters.
    pub fn with_params(sql: impl Into<String>, params: Vec<Value>) -> Self {
        Statement {
            sql: sql.into(),
            params: Params::Positional(params),
        }
    }
}

/// What a committed local transaction did.
#[derive(Debug, Clone)]
pub struct TxOutcome {
    /// The db_version it was given; None if it changed no replicated row.
    pub version: Option<DbVersion>,
    /// Rows affected, per statement.
    pub rows_affected: Vec<usize>,
    /// Time each statement took.
    pub statement_times: Vec<std::time::Duration>,
    /// The changeset to broadcast; None if it changed nothing.
    pub changeset: Option<Changeset>,
}

/// What applying one remote changeset did.
#[derive(Debug)]
pub enum ApplyOutcome {
    /// Merged: `changes_won` changes won (changed a clock), `rows_changed` rows changed data.
    Applied {
        /// Changes that won the merge.
        changes_won: usize,
        /// Rows whose data changed.
        rows_changed: usize,
        /// Those rows.
        changed: Vec<RowChange>,
    },
    /// A part of a large changeset, kept (in the database) until the other parts arrive.
    Buffered,
    /// Already applied here (or our own): nothing done.
    AlreadyApplied,
    /// Refused; nothing of it was applied, the rest of the batch was.
    Rejected(StoreError),
}

/// Result rows of a read-only query.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryRows {
    /// Column names.
    pub columns: Vec<String>,
    /// Rows, each a value per column.
    pub rows: Vec<Vec<Value>>,
}

/// Where a store lives and what it holds.
#[derive(Debug, Clone, Default)]
pub struct StoreConfig {
    /// Database file.
    pub path: PathBuf,
    /// Schema files or folders of `.sql` files.
    pub schema_paths: Vec<PathBuf>,
    /// Cap on the database and its write-ahead log, bytes (a quarter for the WAL, see
    /// `store::wal`); writes past it fail cleanly. None: no cap.
    pub max_db_bytes: Option<u64>,
    /// Largest encoded changeset a local transaction may produce (None: 64 MiB); a larger
    /// transaction is refused with [`StoreError::TransactionTooLarge`] and nothing is committed.
    /// (Changesets larger than a message travel in parts, see `patina_core::chunk`.)
    pub changeset_bytes_max: Option<usize>,
    /// Most bytes of parts of incomplete remote changesets kept at once (None: 256 MiB).
    pub parts_bytes_max: Option<u64>,
}

/// A replicated table as the store uses it.
#[derive(Debug, Clone)]
struct Table {
    def: TableDef,
    ord: u32,
    /// Column indexes of the primary key, in key order.
    pk: Vec<usize>,
    /// Ordinal of each column (None for key columns).
    col_ords: Vec<Option<ColOrd>>,
    col_by_name: HashMap<String, usize>,
    col_by_ord: HashMap<ColOrd, usize>,
    affinities: Vec<Affinity>,
}

impl Table {
    fn pack_pk(&self, row: &[Value]) -> Result<PackedPk, StoreError> {
        let values: Vec<Value> = self.pk.iter().map(|&i| row[i].clone()).collect();
        PackedPk::pack(&values)
            .map_err(|e| StoreError::Corrupt(format!("table {}: {e}", self.def.name)))
    }

    fn non_pk_ords(&self) -> impl Iterator<Item = ColOrd> + '_ {
        self.col_ords.iter().flatten().copied()
    }

    fn pk_where(&self, first_param: usize) -> String {
        self.pk
            .iter()
            .enumerate()
            .map(|(n, &i)| {
                format!(
                    "{} = ?{}",
                    quote_ident(&self.def.columns[i].name),
                    first_param + n
                )
            })
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// Checks that SQLite would store `value` in column `idx` exactly as given: no conversion
    /// by affinity (which would make replicas compare different values), no STRICT refusal.
    fn check_type(&self, idx: usize, value: &Value) -> Result<(), ChangeError> {
        let col = &self.def.columns[idx];
        let wrong = |detail: String| ChangeError::WrongType {
            table: self.def.name.clone(),
            column: col.name.clone(),
            detail,
        };
        let numeric_text = |s: &str| {
            let t = s.trim();
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b))
                && t.parse::<f64>().is_ok()
        };
        let integral_real = |r: f64| r.fract() == 0.0 && r.abs() < 9.2e18;
        let ok = match (&value, self.affinities[idx]) {
            (Value::Null, _) => !col.not_null,
            (_, Affinity::Blob) => true,
            (Value::Blob(_), _) => !self.def.strict,
            (Value::Text(_), Affinity::Text) => true,
            (Value::Text(s), _) => !self.def.strict && !numeric_text(s),
            (Value::Integer(_) | Value::Real(_), Affinity::Text) => false,
            (Value::Integer(_), Affinity::Integer | Affinity::Numeric) => true,
            (Value::Integer(_), Affinity::Real) => false,
            (Value::Real(r), Affinity::Integer | Affinity::Numeric) => {
                !integral_real(*r) && !self.def.strict
            }
            (Value::Real(_), Affinity::Real) => true,
        };
        if ok {
            Ok(())
        } else {
            Err(wrong(format!(
                "{} value does not fit declared type {:?}{}",
                value.type_name(),
                col.decl_type,
                if col.not_null { " NOT NULL" } else { "" }
            )))
        }
    }
}

/// A row clock to store, with the clock it replaces.
struct ClockWrite<'a> {
    table_ord: u32,
    pk: &'a PackedPk,
    clock: &'a RowClock<ColOrd>,
    before: &'a RowClock<ColOrd>,
}

/// The changes of one changeset to one row, each with its column ordinal (None: sentinel).
type RowChanges<'a> = Vec<(&'a Change, Option<ColOrd>)>;

/// A row touched by a local transaction.
struct LocalRow {
    clock: RowClock<ColOrd>,
    before: RowClock<ColOrd>,
    /// The row's values after the transaction (None once deleted).
    values: Option<Vec<Value>>,
}

/// Binds a core value as an SQLite value without copying.
/// A borrowed value bound as an SQLite parameter.
#[derive(Debug)]
pub struct SqlValue<'a>(pub &'a Value);

impl ToSql for SqlValue<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self.0 {
            Value::Null => ValueRef::Null,
            Value::Integer(i) => ValueRef::Integer(*i),
            Value::Real(r) => ValueRef::Real(*r),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

/// Default cap on a local transaction's encoded changeset.
pub const DEFAULT_CHANGESET_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Default cap on the parts of incomplete remote changesets kept at once.
pub const DEFAULT_PARTS_BYTES_MAX: u64 = 256 * 1024 * 1024;

const INTERNAL_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS __patina_sites (
  ord INTEGER PRIMARY KEY,
  site_id BLOB NOT NULL UNIQUE,
  head INTEGER NOT NULL DEFAULT 0,
  applied BLOB NOT NULL DEFAULT x'',
  cleared BLOB NOT NULL DEFAULT x''
);
CREATE TABLE IF NOT EXISTS __patina_tables (ord INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS __patina_columns (
  tbl INTEGER NOT NULL, ord INTEGER NOT NULL, name TEXT NOT NULL, PRIMARY KEY (tbl, ord)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS __patina_rows (
  tbl INTEGER NOT NULL, pk BLOB NOT NULL, cl INTEGER NOT NULL, sentinel BLOB, cells BLOB NOT NULL,
  PRIMARY KEY (tbl, pk)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS __patina_changes (
  site INTEGER NOT NULL, version INTEGER NOT NULL, tbl INTEGER NOT NULL, pk BLOB NOT NULL,
  PRIMARY KEY (site, version, tbl, pk)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS __patina_parts (
  site BLOB NOT NULL, version INTEGER NOT NULL, first_seq INTEGER NOT NULL,
  end_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL, bytes BLOB NOT NULL,
  PRIMARY KEY (site, version, first_seq)
) WITHOUT ROWID;
";

/// A replica's database.
#[derive(Debug)]
pub struct Store {
    writer: Connection,
    reader: Connection,
    capture: Capture,
    /// Stops a local transaction's statements at their deadline.
    interrupt: Interrupt,
    site: SiteId,
    db_version: DbVersion,
    /// The head stored in `__patina_sites` (see [`Store::persist_head`]).
    head_persisted: DbVersion,
    sites: SiteTable,
    book: Bookkeeping,
    tables: BTreeMap<String, Arc<Table>>,
    table_names: HashMap<u32, String>,
    changeset_bytes_max: usize,
    /// Coverage of the remote changesets held in parts in `__patina_parts`.
    partials: BTreeMap<ChangesetId, Partial>,
    parts_bytes: u64,
    parts_bytes_max: u64,
    /// The WAL's share of `max_db_bytes`, checked before every write transaction.
    wal: wal::WalBudget,
}

impl Store {
    /// Opens (or creates) a store and brings its schema up to the schema files.
    pub fn open(config: &StoreConfig) -> Result<Store, StoreError> {
        let mut writer = Connection::open(&config.path)?;
        writer.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000;
             PRAGMA recursive_triggers = ON; PRAGMA foreign_keys = OFF;",
        )?;
        let wal = wal::WalBudget::install(&mut writer, config.max_db_bytes)?;
        writer.set_prepared_statement_cache_capacity(256);
        writer.execute_batch(INTERNAL_SCHEMA)?;
        let site_row: Option<Vec<u8>> = writer
            .query_row(
                "SELECT site_id FROM __patina_sites WHERE ord = 0",
                [],
                |r| r.get(0),
            )
            .optional()?;
        if site_row.is_none() {
            // SQLite's randomness is seeded from the OS: no RNG crate needed for 16 bytes.
            writer.execute(
                "INSERT INTO __patina_sites (ord, site_id) VALUES (0, randomblob(?1))",
                [SITE_ID_LEN as i64],
            )?;
        }
        let capture = Capture::default();
        capture.install(&mut writer)?;
        let interrupt = Interrupt::install(&mut writer)?;
        let reader = Connection::open_with_flags(
            &config.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_URI,
        )?;
        reader.execute_batch("PRAGMA busy_timeout = 5000;")?;
        reader.set_prepared_statement_cache_capacity(64);
        let mut store = Store {
            writer,
            reader,
            capture,
            interrupt,
            site: SiteId::default(),
            db_version: DbVersion(0),
            head_persisted: DbVersion(0),
            sites: SiteTable::default(),
            book: Bookkeeping::new(),
            tables: BTreeMap::new(),
            table_names: HashMap::new(),
            changeset_bytes_max: config
                .changeset_bytes_max
                .unwrap_or(DEFAULT_CHANGESET_BYTES_MAX),
            partials: BTreeMap::new(),
            parts_bytes: 0,
            parts_bytes_max: config.parts_bytes_max.unwrap_or(DEFAULT_PARTS_BYTES_MAX),
            wal,
        };
        store.load_state()?;
        store.apply_schema_files(&config.schema_paths)?;
        Ok(store)
    }

    /// This replica's site id.
    pub fn site_id(&self) -> SiteId {
        self.site
    }

    /// The db_version of this replica's last local write.
    pub fn db_version(&self) -> DbVersion {
        self.db_version
    }

    /// Version bookkeeping of every known site.
    pub fn bookkeeping(&self) -> &Bookkeeping {
        &self.book
    }

    /// Leaves WAL checkpoints to [`spawn_checkpointer`]: a checkpoint on the commit path
    /// copies pages into the database file and syncs it, which made every few hundredth commit
    /// take milliseconds longer.
    pub fn checkpoint_in_background(&mut self) -> Result<(), StoreError> {
        self.wal.checkpoint_elsewhere();
        Ok(())
    }

    /// Bytes in the write-ahead log after the last commit.
    pub fn wal_bytes(&self) -> u64 {
        self.wal.bytes()
    }

    /// Records that a remote changeset exists that this store could not apply (refused, or
    /// its transaction failed: a full disk, an I/O error): it counts as a gap until sync
    /// brings it again and it applies, so health tells a node that is falling behind.
    pub fn note_unapplied(&mut self, id: ChangesetId) {
        if id.site != self.site && !self.book.contains(id) {
            self.book.heard(id.site, id.version);
        }
    }

    /// Names of the replicated tables.
    pub fn table_names(&self) -> Vec<String> {
        self.tables.keys().cloned().collect()
    }

    /// Reloads sites, bookkeeping and tables from the database (after open, or a rollback).
    fn load_state(&mut self) -> Result<(), StoreError> {
        let mut sites = SiteTable::default();
        let mut book = Bookkeeping::new();
        {
            let mut stmt = self.writer.prepare(
                "SELECT ord, site_id, head, applied, cleared FROM __patina_sites ORDER BY ord",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let ord: i64 = row.get(0)?;
                if ord != sites.len() as i64 {
                    return Err(StoreError::Corrupt(format!(
                        "site ordinals not dense at {ord}"
                    )));
                }
                let id = SiteId::from_slice(&row.get::<_, Vec<u8>>(1)?)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                sites.push(id);
                let head = DbVersion(row.get::<_, i64>(2)? as u64);
                let mut versions = SiteVersions {
                    applied: clock::decode_ranges(&row.get::<_, Vec<u8>>(3)?)?,
                    cleared: clock::decode_ranges(&row.get::<_, Vec<u8>>(4)?)?,
                    head,
                };
                if ord == 0 {
                    let indexed: Option<i64> = self.writer.query_row(
                        "SELECT max(version) FROM __patina_changes WHERE site = 0",
                        [],
                        |r| r.get(0),
                    )?;
                    self.head_persisted = head;
                    let head = head.max(DbVersion(indexed.unwrap_or(0) as u64));
                    // Our own versions are always all applied: 1..=head.
                    versions.applied.insert_range(1, head.get());
                    versions.head = head;
                    self.db_version = head;
                }
                book.set_site(id, versions);
            }
        }
        self.site = sites.site(0)?;
        self.sites = sites;
        self.book = book;
        self.load_partials()?;
        self.tables.clear();
        self.table_names.clear();
        let registered: Vec<(u32, String)> = {
            let mut stmt = self
                .writer
                .prepare("SELECT ord, name FROM __patina_tables ORDER BY ord")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        for (ord, name) in registered {
            let sql: String = self.writer.query_row(
                "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = ?1",
                [&name],
                |r| r.get(0),
            )?;
            let def = schema::introspect_table(&self.writer, &name, &sql)?;
            let table = self.build_table(def, ord)?;
            self.table_names.insert(ord, name.clone());
            self.tables.insert(name, Arc::new(table));
        }
        Ok(())
    }

    fn build_table(&self, def: TableDef, ord: u32) -> Result<Table, StoreError> {
        let mut stmt = self
            .writer
            .prepare("SELECT ord, name FROM __patina_columns WHERE tbl = ?1")?;
        let known: HashMap<String, ColOrd> = stmt
            .query_map([ord], |r| Ok((r.get(1)?, r.get(0)?)))?
            .collect::<Result<_, _>>()?;
        let pk = def.pk_columns();
        let mut col_ords = Vec::new();
        let mut col_by_ord = HashMap::new();
        for (i, col) in def.columns.iter().enumerate() {
            if col.pk_position > 0 {
                col_ords.push(None);
                continue;
            }
            let ord = *known.get(&col.name).ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "table {}: column {} has no ordinal",
                    def.name, col.name
                ))
            })?;
            col_ords.push(Some(ord));
            col_by_ord.insert(ord, i);
        }
        Ok(Table {
            col_by_name: def
                .columns
                .iter()
                .enumerate()
                .map(|(i, c)| (c.name.clone(), i))
                .collect(),
            affinities: def
                .columns
                .iter()
                .map(|c| Affinity::of(&c.decl_type, def.strict))
                .collect(),
            def,
            ord,
            pk,
            col_ords,
            col_by_ord,
        })
    }

    /// Reads the schema files and applies them: new tables, new columns, new indexes. Anything
    /// else is refused with nothing changed. Tables already replicated but absent from the files
    /// stay replicated (schema changes are additive only).
    pub fn apply_schema_files(&mut self, paths: &[PathBuf]) -> Result<(), StoreError> {
        let files = schema::read_schema_files(paths)?;
        let sql: String = files
            .iter()
            .map(|(_, s)| s.as_str())
            .collect::<Vec<_>>()
            .join(";\n");
        self.apply_schema_sql(&sql)
    }

    /// [`Store::apply_schema_files`] from SQL text.
    pub fn apply_schema_sql(&mut self, sql: &str) -> Result<(), StoreError> {
        let desired = schema::parse_schema(sql)?;
        self.writer.execute_batch("BEGIN IMMEDIATE")?;
        let result = self.migrate(&desired);
        let result = result.and_then(|backfill| {
            self.writer.execute_batch("COMMIT")?;
            Ok(backfill)
        });
        match result {
            Ok(backfill) => {
                self.load_state()?;
                self.install_triggers()?;
                if !backfill.is_empty() {
                    self.backfill(&backfill)?;
                }
                Ok(())
            }
            Err(e) => {
                let _ = self.writer.execute_batch("ROLLBACK");
                self.load_state()?;
                Err(e)
            }
        }
    }

    /// Applies the schema inside the open transaction; returns tables whose pre-existing rows
    /// need clocks.
    fn migrate(&mut self, desired: &BTreeMap<String, TableDef>) -> Result<Vec<String>, StoreError> {
        let mut backfill = Vec::new();
        for (name, def) in desired {
            let existing_sql: Option<String> = self
                .writer
                .query_row(
                    "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = ?1",
                    [name],
                    |r| r.get(0),
                )
                .optional()?;
            let registered = self.tables.contains_key(name);
            let table_ord = match &existing_sql {
                Some(sql) => {
                    let existing = schema::introspect_table(&self.writer, name, sql)?;
                    let plan = schema::migration(&existing, def)?;
                    for (_, alter) in &plan.add_columns {
                        self.writer.execute_batch(alter)?;
                    }
                    for index in &plan.add_indexes {
                        self.writer.execute_batch(index)?;
                    }
                    if !registered {
                        backfill.push(name.clone());
                    }
                    self.register_table(name)?
                }
                None => {
                    self.writer.execute_batch(&def.sql)?;
                    for index in def.indexes.values() {
                        self.writer.execute_batch(index)?;
                    }
                    self.register_table(name)?
                }
            };
            // Column ordinals are assigned once and never reused, in declaration order.
            for col in def.columns.iter().filter(|c| c.pk_position == 0) {
                let known: Option<i64> = self
                    .writer
                    .query_row(
                        "SELECT ord FROM __patina_columns WHERE tbl = ?1 AND name = ?2",
                        params![table_ord, col.name],
                        |r| r.get(0),
                    )
                    .optional()?;
                if known.is_none() {
                    self.writer.execute(
                        "INSERT INTO __patina_columns (tbl, ord, name)
                         SELECT ?1, coalesce(max(ord) + 1, 0), ?2 FROM __patina_columns WHERE tbl = ?1",
                        params![table_ord, col.name],
                    )?;
                }
            }
        }
        Ok(backfill)
    }

    fn register_table(&mut self, name: &str) -> Result<u32, StoreError> {
        self.writer.execute(
            "INSERT OR IGNORE INTO __patina_tables (name) VALUES (?1)",
            [name],
        )?;
        Ok(self.writer.query_row(
            "SELECT ord FROM __patina_tables WHERE name = ?1",
            [name],
            |r| r.get(0),
        )?)
    }

    fn install_triggers(&mut self) -> Result<(), StoreError> {
        for table in self.tables.values() {
            let cols: Vec<String> = table.def.columns.iter().map(|c| c.name.clone()).collect();
            self.writer
                .execute_batch(&trigger_sql(&table.def.name, table.ord, &cols))?;
        }
        let mut st = self.capture.lock();
        st.writable_tables = self.tables.keys().cloned().collect();
        Ok(())
    }

    /// Gives clocks to rows that existed before their table became replicated, as one local
    /// transaction of this replica.
    fn backfill(&mut self, tables: &[String]) -> Result<(), StoreError> {
        self.local_transaction(|store| {
            let mut writes = Vec::new();
            for name in tables {
                let table = &store.tables[name];
                let mut stmt = store
                    .writer
                    .prepare(&format!("SELECT * FROM main.{}", quote_ident(name)))?;
                let ncols = table.def.columns.len();
                let mut rows = stmt.query([])?;
                while let Some(row) = rows.next()? {
                    let new = (0..ncols)
                        .map(|i| row.get_ref(i).map(capture::to_value))
                        .collect::<Result<Vec<_>, _>>()?;
                    writes.push(capture::CapturedWrite {
                        table_ord: table.ord,
                        write: RowWrite::Insert { new },
                    });
                }
            }
            store.capture.lock().writes = writes;
            Ok(Vec::new())
        })
        .map(|_| ())
    }

    /// Runs statements as one local transaction, all or nothing, and records the clocks of
    /// every row they changed in the same SQLite transaction.
    pub fn transact(&mut self, statements: &[Statement]) -> Result<TxOutcome, StoreError> {
        self.transact_until(statements, None)
    }

    /// [`Store::transact`] whose statements are stopped (and the transaction rolled back) if
    /// they are still running at `deadline`: no statement holds the writer past it.
    pub fn transact_until(
        &mut self,
        statements: &[Statement],
        deadline: Option<std::time::Instant>,
    ) -> Result<TxOutcome, StoreError> {
        if statements.is_empty() {
            return Err(StoreError::EmptyTransaction);
        }
        let mut statement_times = Vec::with_capacity(statements.len());
        let started = std::time::Instant::now();
        let mut out = self.local_transaction(|store| {
            let mut rows_affected = Vec::with_capacity(statements.len());
            store.interrupt.arm(deadline, None);
            let mut result = Ok(());
            for (index, statement) in statements.iter().enumerate() {
                let start = std::time::Instant::now();
                match store.execute_user(statement) {
                    Ok(n) => {
                        statement_times.push(start.elapsed());
                        rows_affected.push(n);
                    }
                    Err((message, client_fault)) => {
                        result = Err(StoreError::Statement {
                            index,
                            message,
                            client_fault,
                        });
                        break;
                    }
                }
            }
            // Disarmed before COMMIT or ROLLBACK, which must never be interrupted.
            store.interrupt.disarm();
            match (result, store.interrupt.stopped()) {
                (Err(_), Some(Stopped::Deadline)) => Err(StoreError::DeadlinePassed(
                    deadline.map_or(started.elapsed(), |d| d.saturating_duration_since(started)),
                )),
                (Err(e), _) => Err(e),
                (Ok(()), _) => Ok(rows_affected),
            }
        })?;
        out.statement_times = statement_times;
        Ok(out)
    }

    /// Wraps `body` in BEGIN IMMEDIATE ... COMMIT with capture on; turns what it captured into
    /// clocks and a changeset before COMMIT. Rolls everything back on any error.
    fn local_transaction(
        &mut self,
        body: impl FnOnce(&mut Store) -> Result<Vec<usize>, StoreError>,
    ) -> Result<TxOutcome, StoreError> {
        self.wal.ensure_room(&self.writer)?;
        self.writer.execute_batch("BEGIN IMMEDIATE")?;
        {
            let mut st = self.capture.lock();
            st.user_mode = true;
            st.writes.clear();
            st.error = None;
        }
        let result = body(self);
        let (writes, capture_error) = {
            let mut st = self.capture.lock();
            st.user_mode = false;
            (std::mem::take(&mut st.writes), st.error.take())
        };
        let result = result.and_then(|rows_affected| {
            if let Some(e) = capture_error {
                return Err(StoreError::Corrupt(e));
            }
            let changeset = self.record_local_writes(writes)?;
            if let Some(cs) = &changeset {
                let bytes = patina_core::wire::changeset_to_bytes(cs).len();
                if bytes > self.changeset_bytes_max {
                    return Err(StoreError::TransactionTooLarge {
                        bytes,
                        limit: self.changeset_bytes_max,
                    });
                }
            }
            self.writer.execute_batch("COMMIT")?;
            Ok((rows_affected, changeset))
        });
        match result {
            Ok((rows_affected, changeset)) => {
                if let Some(cs) = &changeset {
                    self.db_version = cs.id.version;
                    self.book.mark_applied(cs.id);
                }
                Ok(TxOutcome {
                    version: changeset.as_ref().map(|c| c.id.version),
                    rows_affected,
                    statement_times: Vec::new(),
                    changeset,
                })
            }
            Err(e) => {
                let _ = self.writer.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// Runs one statement of a local transaction; on failure SQLite's message and whether the
    /// statement is at fault (see [`error::is_client_fault`]).
    fn execute_user(&mut self, statement: &Statement) -> Result<usize, (String, bool)> {
        let classify = |e: rusqlite::Error| (e.to_string(), error::is_client_fault(&e));
        let mut stmt = self
            .writer
            .prepare_cached(&statement.sql)
            .map_err(classify)?;
        bind(&mut stmt, &statement.params).map_err(|e| (e, true))?;
        stmt.raw_execute().map_err(classify)
    }

    /// Turns captured writes into clock rows and the changeset of this transaction.
    fn record_local_writes(
        &mut self,
        writes: Vec<capture::CapturedWrite>,
    ) -> Result<Option<Changeset>, StoreError> {
        if writes.is_empty() {
            return Ok(None);
        }
        let version = self.db_version.next();
        let origin = Origin {
            site: self.site,
            version,
            seq: Seq(0),
        };
        let mut rows: BTreeMap<(u32, PackedPk), LocalRow> = BTreeMap::new();
        for w in writes {
            let table = self.table_by_ord(w.table_ord)?.clone();
            match w.write {
                RowWrite::Insert { new } => {
                    let row = self.touch(&mut rows, &table, table.pack_pk(&new)?)?;
                    row.clock.local_insert(table.non_pk_ords(), origin);
                    row.values = Some(new);
                }
                RowWrite::Delete { old } => {
                    let row = self.touch(&mut rows, &table, table.pack_pk(&old)?)?;
                    delete_local(row, origin);
                }
                RowWrite::Update { old, new } => {
                    let old_pk = table.pack_pk(&old)?;
                    let new_pk = table.pack_pk(&new)?;
                    if old_pk != new_pk {
                        // A key change is a delete of the old key and an insert of the new one,
                        // with fresh clocks for every cell (crdt-spec.md section 7).
                        delete_local(self.touch(&mut rows, &table, old_pk)?, origin);
                        let row = self.touch(&mut rows, &table, new_pk)?;
                        row.clock.local_insert(table.non_pk_ords(), origin);
                        row.values = Some(new);
                        continue;
                    }
                    let row = self.touch(&mut rows, &table, new_pk)?;
                    if !row.clock.cl.is_live() {
                        // Data without a clock (written behind our back): adopt it as an insert.
                        row.clock.local_insert(table.non_pk_ords(), origin);
                    } else {
                        for (i, ord) in table.col_ords.iter().enumerate() {
                            if let Some(ord) = ord {
                                if old[i] != new[i] {
                                    row.clock.local_update(*ord, origin);
                                }
                            }
                        }
                    }
                    row.values = Some(new);
                }
            }
        }
        rows.retain(|_, row| row.clock != row.before);
        if rows.is_empty() {
            return Ok(None);
        }
        // Number the changes in (table, key, column) order, so a changeset is 0..n-1.
        let mut seq = 0u32;
        let mut changes = Vec::new();
        let mine = |o: &Origin| o.site == origin.site && o.version == version;
        for ((table_ord, pk), row) in rows.iter_mut() {
            let table = self.table_by_ord(*table_ord)?;
            let cl = row.clock.cl;
            if let Some(s) = row.clock.sentinel.as_mut().filter(|s| mine(s)) {
                s.seq = Seq(seq);
                changes.push(Change {
                    table: table.def.name.clone(),
                    pk: pk.clone(),
                    column: Column::Sentinel,
                    value: Value::Null,
                    col_version: ColVersion(cl.get()),
                    cl,
                    seq: Seq(seq),
                });
                seq += 1;
            }
            for (ord, cell) in row.clock.cells.iter_mut().filter(|(_, c)| mine(&c.origin)) {
                cell.origin.seq = Seq(seq);
                let idx = table.col_by_ord[ord];
                let value = row
                    .values
                    .as_ref()
                    .map(|v| v[idx].clone())
                    .unwrap_or(Value::Null);
                changes.push(Change {
                    table: table.def.name.clone(),
                    pk: pk.clone(),
                    column: Column::Name(table.def.columns[idx].name.clone()),
                    value,
                    col_version: cell.col_version,
                    cl,
                    seq: Seq(seq),
                });
                seq += 1;
            }
        }
        let writes: Vec<ClockWrite<'_>> = rows
            .iter()
            .map(|((table_ord, pk), row)| ClockWrite {
                table_ord: *table_ord,
                pk,
                clock: &row.clock,
                before: &row.before,
            })
            .collect();
        // Local writes only remove own entries of versions they supersede: no head to persist.
        self.write_row_clocks(&writes)?;
        Ok(Some(Changeset::whole(
            ChangesetId {
                site: self.site,
                version,
            },
            changes,
        )))
    }

    fn touch<'r>(
        &self,
        rows: &'r mut BTreeMap<(u32, PackedPk), LocalRow>,
        table: &Table,
        pk: PackedPk,
    ) -> Result<&'r mut LocalRow, StoreError> {
        use std::collections::btree_map::Entry;
        Ok(match rows.entry((table.ord, pk)) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let clock = load_row_clock(&self.writer, &self.sites, table.ord, &e.key().1)?;
                e.insert(LocalRow {
                    before: clock.clone(),
                    clock,
                    values: None,
                })
            }
        })
    }

    fn table_by_ord(&self, ord: u32) -> Result<&Arc<Table>, StoreError> {
        self.table_names
            .get(&ord)
            .and_then(|n| self.tables.get(n))
            .ok_or_else(|| StoreError::Corrupt(format!("unknown table ordinal {ord}")))
    }

    /// Persists row clocks and keeps the changes index exact, with multi-row statements.
    /// Returns true if an index entry of this replica's own changesets was removed (the caller
    /// must then make sure the head is persisted, see [`Store::persist_head`]).
    fn write_row_clocks(&self, rows: &[ClockWrite<'_>]) -> Result<bool, StoreError> {
        const ROWS_PER_STATEMENT: usize = 64;
        let mut removed_own = false;
        let mut index_inserts: Vec<(SiteOrd, u64, u32, &PackedPk)> = Vec::new();
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO __patina_rows (tbl, pk, cl, sentinel, cells) VALUES {}
                 ON CONFLICT (tbl, pk) DO UPDATE SET cl = excluded.cl, sentinel = excluded.sentinel,
                 cells = excluded.cells",
                vec!["(?, ?, ?, ?, ?)"; chunk.len()].join(", ")
            );
            let mut stmt = self.writer.prepare_cached(&sql)?;
            for (n, row) in chunk.iter().enumerate() {
                let at = n * 5;
                stmt.raw_bind_parameter(at + 1, row.table_ord)?;
                stmt.raw_bind_parameter(at + 2, row.pk.as_bytes())?;
                stmt.raw_bind_parameter(at + 3, row.clock.cl.get() as i64)?;
                stmt.raw_bind_parameter(
                    at + 4,
                    clock::encode_sentinel(&row.clock.sentinel, &self.sites),
                )?;
                stmt.raw_bind_parameter(
                    at + 5,
                    clock::encode_cells(&row.clock.cells, &self.sites),
                )?;
            }
            stmt.raw_execute()?;
        }
        for row in rows {
            let old = row.before.origins();
            let new = row.clock.origins();
            for (site, version) in old.difference(&new) {
                removed_own |= *site == self.site;
                self.writer
                    .prepare_cached(
                        "DELETE FROM __patina_changes WHERE site = ?1 AND version = ?2 AND tbl = ?3 AND pk = ?4",
                    )?
                    .execute(params![self.site_ord(site)?, version.get() as i64, row.table_ord, row.pk.as_bytes()])?;
            }
            for (site, version) in new.difference(&old) {
                index_inserts.push((self.site_ord(site)?, version.get(), row.table_ord, row.pk));
            }
        }
        for chunk in index_inserts.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT OR IGNORE INTO __patina_changes (site, version, tbl, pk) VALUES {}",
                vec!["(?, ?, ?, ?)"; chunk.len()].join(", ")
            );
            let mut stmt = self.writer.prepare_cached(&sql)?;
            for (n, (site, version, table_ord, pk)) in chunk.iter().enumerate() {
                let at = n * 4;
                stmt.raw_bind_parameter(at + 1, site)?;
                stmt.raw_bind_parameter(at + 2, *version as i64)?;
                stmt.raw_bind_parameter(at + 3, table_ord)?;
                stmt.raw_bind_parameter(at + 4, pk.as_bytes())?;
            }
            stmt.raw_execute()?;
        }
        Ok(removed_own)
    }

    /// Stores this replica's head. Not done per transaction: at open the head is the larger of
    /// the stored one and the highest own version in the changes index, which holds every local
    /// version until a later local write supersedes it. Only a remote merge can remove the
    /// entries of the newest local version without adding a newer one, so merges call this
    /// before such a removal commits; versions are never reused.
    fn persist_head(&mut self) -> Result<(), StoreError> {
        if self.head_persisted < self.db_version {
            self.writer
                .prepare_cached("UPDATE __patina_sites SET head = ?1 WHERE ord = 0")?
                .execute([self.db_version.get() as i64])?;
            self.head_persisted = self.db_version;
        }
        Ok(())
    }

    fn site_ord(&self, site: &SiteId) -> Result<SiteOrd, StoreError> {
        self.sites
            .ord(site)
            .ok_or_else(|| StoreError::Corrupt(format!("site {site} not registered")))
    }

    /// Registers a site inside the open transaction (a rollback is followed by a reload).
    fn ensure_site(&mut self, site: SiteId) -> Result<SiteOrd, StoreError> {
        if let Some(ord) = self.sites.ord(&site) {
            return Ok(ord);
        }
        let ord = self.sites.len() as SiteOrd;
        self.writer
            .prepare_cached("INSERT INTO __patina_sites (ord, site_id) VALUES (?1, ?2)")?
            .execute(params![ord, &site.0[..]])?;
        Ok(self.sites.push(site))
    }

    /// Applies remote changesets in one SQLite transaction, each through the merge rule and each
    /// all-or-nothing (a savepoint per changeset): a bad changeset is refused alone. Returns one
    /// outcome per changeset, in order.
    pub fn apply_changesets<C: std::borrow::Borrow<Changeset>>(
        &mut self,
        batch: &[C],
    ) -> Result<Vec<ApplyOutcome>, StoreError> {
        self.wal.ensure_room(&self.writer)?;
        self.writer.execute_batch("BEGIN IMMEDIATE")?;
        let mut book = self.book.clone();
        let mut touched_sites = BTreeSet::new();
        let mut outcomes = Vec::with_capacity(batch.len());
        let result = (|| {
            for changeset in batch {
                let site = self.site;
                // The rule Node follows too (core::apply): skip, keep a part, or merge whole.
                let applied = apply_changeset(
                    &mut *self,
                    site,
                    &mut book,
                    changeset.borrow(),
                    ApplyFaults::default(),
                )?;
                outcomes.push(match applied {
                    Applied::Merged(id, (changes_won, changed)) => {
                        touched_sites.insert(id.site);
                        ApplyOutcome::Applied {
                            changes_won,
                            rows_changed: changed.len(),
                            changed,
                        }
                    }
                    Applied::Buffered => ApplyOutcome::Buffered,
                    Applied::Known => ApplyOutcome::AlreadyApplied,
                    Applied::Rejected(e) => ApplyOutcome::Rejected(e),
                });
            }
            for site in &touched_sites {
                let versions = book.site(site).cloned().unwrap_or_default();
                let ord = self.ensure_site(*site)?;
                self.writer
                    .prepare_cached("UPDATE __patina_sites SET head = ?1, applied = ?2, cleared = ?3 WHERE ord = ?4")?
                    .execute(params![
                        versions.head.get() as i64,
                        clock::encode_ranges(&versions.applied),
                        clock::encode_ranges(&versions.cleared),
                        ord
                    ])?;
            }
            self.writer.execute_batch("COMMIT")?;
            Ok(())
        })();
        match result {
            Ok(()) => {
                self.book = book;
                Ok(outcomes)
            }
            Err(e) => {
                let _ = self.writer.execute_batch("ROLLBACK");
                self.load_state()?;
                Err(e)
            }
        }
    }

    /// Reads the coverage of the parts held in `__patina_parts` (not their bytes).
    fn load_partials(&mut self) -> Result<(), StoreError> {
        self.partials.clear();
        self.parts_bytes = 0;
        let mut stmt = self.writer.prepare(
            "SELECT site, version, first_seq, end_seq, last_seq, length(bytes) FROM __patina_parts",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let site = SiteId::from_slice(&row.get::<_, Vec<u8>>(0)?)
                .map_err(|e| StoreError::Corrupt(format!("part site: {e}")))?;
            let id = ChangesetId {
                site,
                version: DbVersion(row.get::<_, i64>(1)? as u64),
            };
            let seq = |i: usize| -> Result<Seq, StoreError> {
                u32::try_from(row.get::<_, i64>(i)?)
                    .map(Seq)
                    .map_err(|_| StoreError::Corrupt("part seq out of range".into()))
            };
            let span = SeqSpan {
                start: seq(2)?,
                end: seq(3)?,
                last: seq(4)?,
            };
            self.partials.entry(id).or_default().cover(span);
            self.parts_bytes += row.get::<_, i64>(5)? as u64;
        }
        Ok(())
    }

    /// Keeps a part of a large changeset in `__patina_parts` (inside the open transaction).
    /// Returns the whole changeset, read back from its parts, once they cover it; the parts are
    /// deleted then.
    fn buffer_part(&mut self, part: &Changeset) -> Result<Option<Changeset>, StoreError> {
        validate_changeset(part).map_err(|e| StoreError::Change {
            site: part.id.site.to_hex(),
            version: part.id.version.get(),
            source: e.into(),
        })?;
        let mut partial = self.partials.get(&part.id).cloned().unwrap_or_default();
        if !partial.cover(part.span) {
            return Ok(None);
        }
        let bytes = patina_core::wire::changeset_to_bytes(part);
        if self.parts_bytes + bytes.len() as u64 > self.parts_bytes_max {
            return Err(StoreError::PartsBufferFull {
                bytes: self.parts_bytes,
                limit: self.parts_bytes_max,
            });
        }
        let replaced: Option<i64> = self
            .writer
            .prepare_cached(
                "SELECT length(bytes) FROM __patina_parts WHERE site = ?1 AND version = ?2 AND first_seq = ?3",
            )?
            .query_row(
                params![&part.id.site.0[..], part.id.version.get() as i64, part.span.start.get()],
                |r| r.get(0),
            )
            .optional()?;
        self.writer
            .prepare_cached(
                "INSERT OR REPLACE INTO __patina_parts (site, version, first_seq, end_seq, last_seq, bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                &part.id.site.0[..],
                part.id.version.get() as i64,
                part.span.start.get(),
                part.span.end.get(),
                part.span.last.get(),
                bytes
            ])?;
        self.parts_bytes = self.parts_bytes + bytes.len() as u64 - replaced.map_or(0, |n| n as u64);
        if !partial.is_complete() {
            self.partials.insert(part.id, partial);
            return Ok(None);
        }
        // Complete: read every part back and assemble.
        let limits = patina_core::wire::Limits {
            changeset_bytes_max: usize::MAX,
            changes_max: usize::MAX,
            ..patina_core::wire::Limits::default()
        };
        let mut whole = Partial::new();
        {
            let mut stmt = self.writer.prepare_cached(
                "SELECT bytes FROM __patina_parts WHERE site = ?1 AND version = ?2 ORDER BY first_seq",
            )?;
            let mut rows =
                stmt.query(params![&part.id.site.0[..], part.id.version.get() as i64])?;
            while let Some(row) = rows.next()? {
                let blob: &[u8] = row.get_ref(0)?.as_blob().map_err(rusqlite::Error::from)?;
                let stored = patina_core::wire::decode_changeset(blob, &limits)
                    .map_err(|e| StoreError::Corrupt(format!("stored part: {e}")))?;
                whole.add(&stored);
            }
        }
        self.drop_parts(part.id)?;
        whole
            .assemble(part.id)
            .map(Some)
            .ok_or_else(|| StoreError::Corrupt("stored parts do not cover their changeset".into()))
    }

    /// Deletes the parts held of a changeset (it arrived whole, or was assembled).
    fn drop_parts(&mut self, id: ChangesetId) -> Result<(), StoreError> {
        let freed: i64 = self
            .writer
            .prepare_cached(
                "SELECT coalesce(sum(length(bytes)), 0) FROM __patina_parts WHERE site = ?1 AND version = ?2",
            )?
            .query_row(params![&id.site.0[..], id.version.get() as i64], |r| r.get(0))?;
        self.writer
            .prepare_cached("DELETE FROM __patina_parts WHERE site = ?1 AND version = ?2")?
            .execute(params![&id.site.0[..], id.version.get() as i64])?;
        self.parts_bytes = self.parts_bytes.saturating_sub(freed as u64);
        self.partials.remove(&id);
        Ok(())
    }

    /// Changesets held in parts, waiting for the rest, and the bytes their parts take.
    pub fn partials(&self) -> (usize, u64) {
        (self.partials.len(), self.parts_bytes)
    }

    /// Merges one changeset inside the open savepoint; returns (changes won, rows changed).
    fn apply_one(&mut self, changeset: &Changeset) -> Result<(usize, Vec<RowChange>), StoreError> {
        let reject = |source: ChangeError| StoreError::Change {
            site: changeset.id.site.to_hex(),
            version: changeset.id.version.get(),
            source,
        };
        validate_changeset(changeset).map_err(|e| reject(e.into()))?;
        // Check everything against the schema before writing anything.
        let mut groups: BTreeMap<(&str, &PackedPk), RowChanges<'_>> = BTreeMap::new();
        for change in &changeset.changes {
            let table = self
                .tables
                .get(&change.table)
                .ok_or_else(|| reject(ChangeError::UnknownTable(change.table.clone())))?;
            let pk_values = change.pk.values();
            if pk_values.len() != table.pk.len() {
                return Err(reject(ChangeError::PkArity {
                    table: table.def.name.clone(),
                    got: pk_values.len(),
                    expected: table.pk.len(),
                }));
            }
            for (value, &idx) in pk_values.iter().zip(&table.pk) {
                table.check_type(idx, value).map_err(reject)?;
            }
            let col_ord = match &change.column {
                Column::Sentinel => None,
                Column::Name(name) => {
                    let unknown = || {
                        reject(ChangeError::UnknownColumn {
                            table: table.def.name.clone(),
                            column: name.clone(),
                        })
                    };
                    let idx = *table.col_by_name.get(name).ok_or_else(unknown)?;
                    let ord = table.col_ords[idx].ok_or_else(unknown)?;
                    table.check_type(idx, &change.value).map_err(reject)?;
                    Some(ord)
                }
            };
            groups
                .entry((change.table.as_str(), &change.pk))
                .or_default()
                .push((change, col_ord));
        }
        self.ensure_site(changeset.id.site)?;
        let mut changes_won = 0;
        let mut changed = Vec::new();
        let mut clock_writes: Vec<(u32, &PackedPk, RowClock<ColOrd>, RowClock<ColOrd>)> =
            Vec::new();
        for ((table_name, pk), changes) in groups {
            let table = self.tables[table_name].clone();
            let before = load_row_clock(&self.writer, &self.sites, table.ord, pk)?;
            let mut clock = before.clone();
            let mut writes: BTreeMap<usize, &Value> = BTreeMap::new();
            let mut deleted = false;
            let mut ensure_row = false;
            let mut data_changed = false;
            let pk_values = pk.values();
            for (change, col_ord) in changes {
                let incoming = Incoming {
                    cl: change.cl,
                    is_sentinel: col_ord.is_none(),
                    col_version: change.col_version,
                    value: &change.value,
                    origin: Origin {
                        site: changeset.id.site,
                        version: changeset.id.version,
                        seq: change.seq,
                    },
                };
                let idx = col_ord.map(|o| table.col_by_ord[&o]);
                let was_live = clock.cl.is_live();
                let decision = clock.merge(
                    col_ord.as_ref(),
                    &incoming,
                    || read_cell(&self.writer, &table, idx.unwrap_or(0), &pk_values),
                    MergeFaults::default(),
                )?;
                if decision != MergeDecision::Noop {
                    changes_won += 1;
                }
                data_changed |= decision.changes_data();
                if decision == MergeDecision::Delete || (decision.resurrects() && was_live) {
                    // A new incarnation (or none): the old row's data goes, defaults come back.
                    deleted = true;
                    writes.clear();
                }
                ensure_row |= decision.resurrects();
                if matches!(
                    decision,
                    MergeDecision::ResurrectWithCell | MergeDecision::Cell
                ) {
                    if let Some(i) = idx {
                        writes.insert(i, &change.value);
                    }
                }
            }
            if clock == before {
                continue;
            }
            if data_changed {
                changed.push(RowChange {
                    table: table.def.name.clone(),
                    pk: pk.clone(),
                    deleted: !clock.cl.is_live(),
                });
                if deleted || !clock.cl.is_live() {
                    let sql = format!(
                        "DELETE FROM main.{} WHERE {}",
                        quote_ident(&table.def.name),
                        table.pk_where(1)
                    );
                    let mut stmt = self.writer.prepare_cached(&sql)?;
                    let binds: Vec<SqlValue<'_>> = pk_values.iter().map(SqlValue).collect();
                    stmt.execute(rusqlite::params_from_iter(binds))?;
                }
                if clock.cl.is_live() && (ensure_row || !writes.is_empty()) {
                    upsert_row(&self.writer, &table, &pk_values, &writes)?;
                }
            }
            clock_writes.push((table.ord, pk, clock, before));
        }
        let writes: Vec<ClockWrite<'_>> = clock_writes
            .iter()
            .map(|(table_ord, pk, clock, before)| ClockWrite {
                table_ord: *table_ord,
                pk,
                clock,
                before,
            })
            .collect();
        if self.write_row_clocks(&writes)? {
            self.persist_head()?;
        }
        Ok((changes_won, changed))
    }

    /// Reads back the changesets of `site` with versions in `start..=end`, at most `limit` of
    /// them, from the read connection. Versions applied here whose changes were all overwritten
    /// come back as cleared (empty) changesets; versions not applied here are skipped.
    pub fn changesets(
        &self,
        site: SiteId,
        start: DbVersion,
        end: DbVersion,
        limit: usize,
    ) -> Result<Vec<Changeset>, StoreError> {
        let (Some(site_ord), Some(versions)) = (self.sites.ord(&site), self.book.site(&site))
        else {
            return Ok(Vec::new());
        };
        let mut by_version: BTreeMap<u64, Vec<(u32, Vec<u8>)>> = BTreeMap::new();
        {
            let mut stmt = self.reader.prepare_cached(
                "SELECT version, tbl, pk FROM __patina_changes WHERE site = ?1 AND version BETWEEN ?2 AND ?3
                 ORDER BY version, tbl, pk",
            )?;
            let mut rows = stmt.query(params![
                site_ord,
                start.get() as i64,
                end.get().min(i64::MAX as u64) as i64
            ])?;
            while let Some(row) = rows.next()? {
                let version = row.get::<_, i64>(0)? as u64;
                if !by_version.contains_key(&version) && by_version.len() >= limit {
                    break;
                }
                by_version
                    .entry(version)
                    .or_default()
                    .push((row.get(1)?, row.get(2)?));
            }
        }
        let mut out = Vec::new();
        // Walk the applied versions in range, up to the limit, filling in cleared ones.
        'ranges: for (a, b) in versions.applied.iter() {
            let (a, b) = (a.max(start.get()), b.min(end.get()));
            if a > b {
                continue;
            }
            let mut v = a;
            loop {
                if out.len() >= limit {
                    break 'ranges;
                }
                // Skip quickly over a long run of cleared versions is not needed: the limit bounds it.
                let changes = match by_version.remove(&v) {
                    Some(rows) => self.read_changes(site, v, &rows)?,
                    None => Vec::new(),
                };
                out.push(Changeset::whole(
                    ChangesetId {
                        site,
                        version: DbVersion(v),
                    },
                    changes,
                ));
                if v == b {
                    break;
                }
                v += 1;
            }
        }
        Ok(out)
    }

    fn read_changes(
        &self,
        site: SiteId,
        version: u64,
        rows: &[(u32, Vec<u8>)],
    ) -> Result<Vec<Change>, StoreError> {
        let mut changes = Vec::new();
        let mine = |o: &Origin| o.site == site && o.version.get() == version;
        for (table_ord, pk_bytes) in rows {
            let table = self.table_by_ord(*table_ord)?;
            let pk = PackedPk::from_bytes(pk_bytes.clone())
                .map_err(|e| StoreError::Corrupt(format!("stored primary key: {e}")))?;
            let clock = load_row_clock(&self.reader, &self.sites, table.ord, &pk)?;
            if let Some(s) = clock.sentinel.filter(|s| mine(s)) {
                changes.push(Change {
                    table: table.def.name.clone(),
                    pk: pk.clone(),
                    column: Column::Sentinel,
                    value: Value::Null,
                    col_version: ColVersion(clock.cl.get()),
                    cl: clock.cl,
                    seq: s.seq,
                });
            }
            let cells: Vec<_> = clock
                .cells
                .iter()
                .filter(|(_, c)| mine(&c.origin))
                .collect();
            if cells.is_empty() {
                continue;
            }
            let values = read_row(&self.reader, table, &pk.values())?;
            for (ord, cell) in cells {
                let idx = table.col_by_ord[ord];
                changes.push(Change {
                    table: table.def.name.clone(),
                    pk: pk.clone(),
                    column: Column::Name(table.def.columns[idx].name.clone()),
                    value: values
                        .as_ref()
                        .map(|v| v[idx].clone())
                        .unwrap_or(Value::Null),
                    col_version: cell.col_version,
                    cl: clock.cl,
                    seq: cell.origin.seq,
                });
            }
        }
        changes.sort_by_key(|c| c.seq);
        Ok(changes)
    }

    /// Runs one read-only statement on the read connection.
    pub fn query(&self, statement: &Statement) -> Result<QueryRows, StoreError> {
        collect_query(&self.reader, statement)
    }

    /// Every row clock of every replicated table, in a form that is equal on two replicas
    /// exactly when their clock metadata has converged: (table, pk) -> (cl, sentinel author,
    /// cells by name -> (version, author)). Local db_versions and ordinals are left out.
    pub fn clock_snapshot(
        &self,
    ) -> Result<BTreeMap<(String, PackedPk), ClockSnapshot>, StoreError> {
        let mut out = BTreeMap::new();
        let mut stmt = self
            .reader
            .prepare("SELECT tbl, pk, cl, sentinel, cells FROM __patina_rows")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let table = self.table_by_ord(row.get(0)?)?;
            let pk = PackedPk::from_bytes(row.get(1)?)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let sentinel: Option<Vec<u8>> = row.get(3)?;
            let cells: Vec<u8> = row.get(4)?;
            let clock = clock::decode_row_clock(
                row.get::<_, i64>(2)? as u64,
                sentinel.as_deref(),
                &cells,
                &self.sites,
            )?;
            out.insert(
                (table.def.name.clone(), pk),
                ClockSnapshot {
                    cl: clock.cl,
                    sentinel: clock.sentinel.map(|o| (o.site, o.version, o.seq)),
                    cells: clock
                        .cells
                        .iter()
                        .map(|(ord, c)| {
                            (
                                table.def.columns[table.col_by_ord[ord]].name.clone(),
                                (c.col_version, c.origin.site, c.origin.version, c.origin.seq),
                            )
                        })
                        .collect(),
                },
            );
        }
        Ok(out)
    }

    /// A cheap fingerprint for comparing nodes: per table, its row count and a hash of its rows
    /// in key order; and a hash of every row clock. Two converged nodes have equal digests.
    pub fn digest(&self) -> Result<Digest, StoreError> {
        let mut tables = BTreeMap::new();
        for (name, table) in &self.tables {
            let order: Vec<String> = table
                .pk
                .iter()
                .map(|&i| quote_ident(&table.def.columns[i].name))
                .collect();
            let sql = format!(
                "SELECT * FROM main.{} ORDER BY {}",
                quote_ident(name),
                order.join(", ")
            );
            let mut stmt = self.reader.prepare(&sql)?;
            let n = table.def.columns.len();
            let mut rows = stmt.query([])?;
            let mut hash = Fnv::new();
            let mut count = 0u64;
            while let Some(row) = rows.next()? {
                count += 1;
                for i in 0..n {
                    hash.value(&capture::to_value(row.get_ref(i)?));
                }
            }
            tables.insert(name.clone(), (count, hash.finish()));
        }
        let mut clocks = Fnv::new();
        for ((table, pk), clock) in self.clock_snapshot()? {
            clocks.bytes(table.as_bytes());
            clocks.bytes(pk.as_bytes());
            clocks.bytes(format!("{clock:?}").as_bytes());
        }
        Ok(Digest {
            tables,
            clocks: clocks.finish(),
        })
    }

    /// Path-independent description of the database file, for logs.
    pub fn path(&self) -> Option<&Path> {
        self.writer.path().map(Path::new)
    }
}

/// The SQLite store as the apply rule (`core::apply`) sees it: parts kept in `__patina_parts`,
/// each whole changeset merged in a savepoint of the batch's transaction.
impl ApplyTarget for Store {
    type Rejection = StoreError;
    type Error = StoreError;
    type Merged = (usize, Vec<RowChange>);

    fn keep_part(&mut self, part: &Changeset) -> Result<PartStep<StoreError>, StoreError> {
        match self.buffer_part(part) {
            Ok(Some(whole)) => Ok(PartStep::Complete(whole)),
            Ok(None) => Ok(PartStep::Buffered),
            Err(e @ (StoreError::Change { .. } | StoreError::PartsBufferFull { .. })) => {
                Ok(PartStep::Rejected(e))
            }
            Err(e) => Err(e),
        }
    }

    fn forget_parts(&mut self, id: ChangesetId) -> Result<(), StoreError> {
        if self.partials.contains_key(&id) {
            self.drop_parts(id)?;
        }
        Ok(())
    }

    fn merge(
        &mut self,
        whole: &Changeset,
    ) -> Result<Result<(usize, Vec<RowChange>), StoreError>, StoreError> {
        self.writer.execute_batch("SAVEPOINT changeset")?;
        match self.apply_one(whole) {
            Ok(merged) => {
                self.writer.execute_batch("RELEASE changeset")?;
                Ok(Ok(merged))
            }
            Err(e @ StoreError::Change { .. }) => {
                self.writer
                    .execute_batch("ROLLBACK TO changeset; RELEASE changeset")?;
                Ok(Err(e))
            }
            Err(e) => Err(e),
        }
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

/// A read-only connection for queries; the API keeps a few, so reads never wait for writes.
#[derive(Debug)]
pub struct Reader {
    conn: Connection,
    interrupt: Interrupt,
}

impl Reader {
    /// Opens a read-only connection to a store's database file.
    pub fn open(path: &Path) -> Result<Reader, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_URI,
        )?;
        conn.execute_batch("PRAGMA busy_timeout = 5000;")?;
        conn.set_prepared_statement_cache_capacity(64);
        let mut conn = conn;
        guard::install_read_only(&mut conn)?;
        let interrupt = Interrupt::install(&mut conn)?;
        Ok(Reader { conn, interrupt })
    }

    /// Runs one read-only statement, calling `on_columns` once and `on_row` per row until it
    /// returns false. Errors before the first row (bad SQL, a write) come back as `Err`. The
    /// statement is stopped when `deadline` passes or `cancelled` says the client left.
    pub fn query_each(
        &self,
        statement: &Statement,
        deadline: Option<std::time::Instant>,
        cancelled: Option<Box<dyn Fn() -> bool + Send>>,
        on_columns: impl FnOnce(&[String]),
        on_row: impl FnMut(Vec<Value>) -> bool,
    ) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        self.interrupt.arm(deadline, cancelled);
        let result = query_each(&self.conn, statement, on_columns, on_row);
        self.interrupt.disarm();
        match (result, self.interrupt.stopped()) {
            (Err(_), Some(Stopped::Deadline)) => Err(StoreError::DeadlinePassed(
                deadline.map_or(started.elapsed(), |d| d.saturating_duration_since(started)),
            )),
            (Err(_), Some(Stopped::Cancelled)) => Err(StoreError::Cancelled),
            (result, _) => result,
        }
    }

    /// True when the connection is as a pool wants it back: no transaction left open.
    pub fn is_clean(&self) -> bool {
        self.conn.is_autocommit()
    }

    /// Number of rows of a table.
    pub fn count_rows(&self, table: &str, deadline: std::time::Instant) -> Result<u64, StoreError> {
        let sql = format!("SELECT count(*) FROM main.{}", quote_ident(table));
        self.interrupt.arm(Some(deadline), None);
        let result = self.conn.query_row(&sql, [], |r| r.get::<_, i64>(0));
        self.interrupt.disarm();
        match (result, self.interrupt.stopped()) {
            (Err(_), Some(Stopped::Deadline)) => Err(StoreError::DeadlinePassed(
                deadline.saturating_duration_since(std::time::Instant::now()),
            )),
            (result, _) => Ok(result? as u64),
        }
    }
}

fn query_each(
    conn: &Connection,
    statement: &Statement,
    on_columns: impl FnOnce(&[String]),
    mut on_row: impl FnMut(Vec<Value>) -> bool,
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare(&statement.sql).map_err(query_error)?;
    if !stmt.readonly() {
        return Err(StoreError::NotReadOnly);
    }
    bind(&mut stmt, &statement.params).map_err(StoreError::Query)?;
    let columns: Vec<String> = stmt.column_names().map(str::to_owned).collect();
    on_columns(&columns);
    let mut rows = stmt.raw_query();
    while let Some(row) = rows.next().map_err(query_error)? {
        let values = (0..columns.len())
            .map(|i| row.get_ref(i).map(capture::to_value))
            .collect::<Result<Vec<_>, _>>()?;
        if !on_row(values) {
            break;
        }
    }
    Ok(())
}

/// A query's failure: the request's fault (bad SQL, refused, a type) or the node's (I/O,
/// corruption, busy), which answer 400 and 500.
fn query_error(e: rusqlite::Error) -> StoreError {
    if error::is_client_fault(&e) {
        StoreError::Query(e.to_string())
    } else {
        StoreError::Sqlite(e)
    }
}

fn collect_query(conn: &Connection, statement: &Statement) -> Result<QueryRows, StoreError> {
    let mut columns = Vec::new();
    let mut rows = Vec::new();
    query_each(
        conn,
        statement,
        |c| columns = c.to_vec(),
        |r| {
            rows.push(r);
            true
        },
    )?;
    Ok(QueryRows { columns, rows })
}

/// See [`Store::digest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    /// Per table: (row count, hash of the rows).
    pub tables: BTreeMap<String, (u64, u64)>,
    /// Hash of every row clock.
    pub clocks: u64,
}

/// FNV-1a, 64 bits: a fingerprint, not a defence against forgery.
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn bytes(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        // Length-delimit, so ("ab", "c") and ("a", "bc") differ.
        self.0 ^= bytes.len() as u64;
        self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
    }

    fn value(&mut self, value: &Value) {
        match value {
            Value::Null => self.bytes(&[0]),
            Value::Integer(i) => self.bytes(&[&[1u8][..], &i.to_le_bytes()].concat()),
            Value::Real(r) => self.bytes(&[&[2u8][..], &r.to_bits().to_le_bytes()].concat()),
            Value::Text(t) => self.bytes(&[&[3u8][..], t.as_bytes()].concat()),
            Value::Blob(b) => self.bytes(&[&[4u8][..], b].concat()),
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A row's clock in comparable form (see [`Store::clock_snapshot`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClockSnapshot {
    /// Causal length.
    pub cl: CausalLength,
    /// Origin of the sentinel: (site, version, seq).
    pub sentinel: Option<(SiteId, DbVersion, Seq)>,
    /// Cells by column name: (version, origin site, origin version, origin seq).
    pub cells: BTreeMap<String, (ColVersion, SiteId, DbVersion, Seq)>,
}

fn delete_local(row: &mut LocalRow, origin: Origin) {
    if !row.clock.cl.is_live() {
        // Data without a clock (written behind our back): it was live, so its delete is even.
        row.clock.cl = CausalLength(row.clock.cl.get() + 1);
    }
    row.clock.local_delete(origin);
    row.values = None;
}

fn bind(stmt: &mut rusqlite::Statement<'_>, params: &Params) -> Result<(), String> {
    match params {
        Params::None => {
            if stmt.parameter_count() > 0 {
                return Err(format!(
                    "statement expects {} parameters, got none",
                    stmt.parameter_count()
                ));
            }
        }
        Params::Positional(values) => {
            if stmt.parameter_count() != values.len() {
                return Err(format!(
                    "statement expects {} parameters, got {}",
                    stmt.parameter_count(),
                    values.len()
                ));
            }
            for (i, v) in values.iter().enumerate() {
                stmt.raw_bind_parameter(i + 1, SqlValue(v))
                    .map_err(|e| e.to_string())?;
            }
        }
        Params::Named(values) => {
            for (name, v) in values {
                let index = if name.starts_with([':', '@', '$']) {
                    stmt.parameter_index(name).map_err(|e| e.to_string())?
                } else {
                    [":", "@", "$"]
                        .iter()
                        .find_map(|p| stmt.parameter_index(&format!("{p}{name}")).ok().flatten())
                };
                let index = index.ok_or_else(|| format!("no parameter named {name}"))?;
                stmt.raw_bind_parameter(index, SqlValue(v))
                    .map_err(|e| e.to_string())?;
            }
        }
    }
    Ok(())
}

fn load_row_clock(
    conn: &Connection,
    sites: &SiteTable,
    table_ord: u32,
    pk: &PackedPk,
) -> Result<RowClock<ColOrd>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT cl, sentinel, cells FROM __patina_rows WHERE tbl = ?1 AND pk = ?2",
    )?;
    let row: Option<(i64, Option<Vec<u8>>, Vec<u8>)> = stmt
        .query_row(params![table_ord, pk.as_bytes()], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?;
    match row {
        None => Ok(RowClock::default()),
        Some((cl, sentinel, cells)) => {
            clock::decode_row_clock(cl as u64, sentinel.as_deref(), &cells, sites)
        }
    }
}

/// Reads every column of one row, None if absent.
fn read_row(
    conn: &Connection,
    table: &Table,
    pk: &[Value],
) -> Result<Option<Vec<Value>>, StoreError> {
    let sql = format!(
        "SELECT * FROM main.{} WHERE {}",
        quote_ident(&table.def.name),
        table.pk_where(1)
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let binds: Vec<SqlValue<'_>> = pk.iter().map(SqlValue).collect();
    let n = table.def.columns.len();
    Ok(stmt
        .query_row(rusqlite::params_from_iter(binds), |r| {
            (0..n)
                .map(|i| r.get_ref(i).map(capture::to_value))
                .collect::<Result<Vec<_>, _>>()
        })
        .optional()?)
}

/// Reads one cell (the merge rule asks only when versions tie).
fn read_cell(
    conn: &Connection,
    table: &Table,
    idx: usize,
    pk: &[Value],
) -> Result<Value, StoreError> {
    let sql = format!(
        "SELECT {} FROM main.{} WHERE {}",
        quote_ident(&table.def.columns[idx].name),
        quote_ident(&table.def.name),
        table.pk_where(1)
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let binds: Vec<SqlValue<'_>> = pk.iter().map(SqlValue).collect();
    Ok(stmt
        .query_row(rusqlite::params_from_iter(binds), |r| {
            r.get_ref(0).map(capture::to_value)
        })
        .optional()?
        .unwrap_or(Value::Null))
}

/// Inserts the row if absent (key + defaults + `writes`), else sets the `writes` columns.
fn upsert_row(
    conn: &Connection,
    table: &Table,
    pk: &[Value],
    writes: &BTreeMap<usize, &Value>,
) -> Result<(), StoreError> {
    let cols: Vec<String> = table
        .pk
        .iter()
        .chain(writes.keys())
        .map(|&i| quote_ident(&table.def.columns[i].name))
        .collect();
    let placeholders: Vec<String> = (1..=cols.len()).map(|i| format!("?{i}")).collect();
    let conflict: Vec<&str> = cols[..table.pk.len()].iter().map(String::as_str).collect();
    let action = if writes.is_empty() {
        "NOTHING".to_owned()
    } else {
        format!(
            "UPDATE SET {}",
            cols[table.pk.len()..]
                .iter()
                .map(|c| format!("{c} = excluded.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let sql = format!(
        "INSERT INTO main.{} ({}) VALUES ({}) ON CONFLICT ({}) DO {}",
        quote_ident(&table.def.name),
        cols.join(", "),
        placeholders.join(", "),
        conflict.join(", "),
        action
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let binds: Vec<SqlValue<'_>> = pk
        .iter()
        .chain(writes.values().copied())
        .map(SqlValue)
        .collect();
    stmt.execute(rusqlite::params_from_iter(binds))?;
    Ok(())
}
