//! The CRDT store: the only code that opens SQLite.
//!
//! One writer connection runs local transactions (capturing their writes into clocks before
//! COMMIT) and applies remote changesets through core's merge rule in batched transactions; one
//! read-only connection serves queries and changeset extraction. WAL mode, so readers never
//! block the writer.
//!
//! Internal tables (all `__patina_*`):
//! - `sites`: site id per local ordinal (0 = this replica), with each site's head and its
//!   applied and cleared version ranges (a remote site's written every
//!   `remote::VERSIONS_BATCH` batches and at close, with the merges' index entries: the
//!   file's may lag its rows, never lead);
//! - `tables`, `columns`: local ordinals of replicated tables and their non-key columns;
//! - `rows`: one clock per row ever seen (tombstones included): causal length, sentinel origin,
//!   cell clocks;
//! - `changes`: which rows hold clocks of which changeset (site, version), the index that makes
//!   extraction by version range cheap. Every origin a row's clock refers to has its entry.
//!   An entry whose origin no clock of the row refers to any more is stale: a remote merge
//!   removes it in its own transaction, a local write in a batch with later ones (see
//!   `local::INDEX_BATCH`; a crash may leave up to a batch of them for good).
//!   Extraction reads each row's clock and takes only what carries the version, so a stale
//!   entry yields nothing and a version whose entries are all stale comes back cleared.
//!   Local writes add their entries in that batch too, not in their own commit: until then
//!   extraction reads them from memory, and `unindexed` marks that the file lacks some.
//!   Remote merges' entries wait in memory too, and go to the file with the sites' versions
//!   (`remote::VERSIONS_BATCH`); after a crash the next open puts both back from the row
//!   clocks (`Store::recover_unsaved_remote`);
//! - `backfill`: tables registered with rows already in them whose rows still need clocks,
//!   written with the registration and deleted with the clocks (see `Store::backfill`), so a
//!   backfill that fails or is cut off by a crash is made at the next open;
//! - `unindexed`: row 0 present from the first commit whose entries wait to the batch that
//!   writes them; an open that finds it (the process stopped without closing the store) puts
//!   the entries back from the row clocks before anything reads the index. Row 1: the same for
//!   remote versions and their entries, put back once the state is loaded.
//!
//! This file holds the types, opening and loading; each concern has its own file: `migrate`,
//! `local` (local transactions), `remote` (remote apply), `parts`, `extract`, `digest`,
//! `query`, `rows` (helpers both write paths share), `wal`; and the store thread (`actor`),
//! the query pool (`readers`), backups (`backup`).

pub mod actor;
pub mod backup;
mod capture;
mod clock;
mod digest;
pub mod error;
mod extract;
pub mod guard;
mod local;
mod migrate;
mod parts;
mod prepared;
mod query;
pub mod readers;
mod remote;
mod rows;
pub mod schema;
mod wal;

pub use digest::Digest;
pub use extract::ClockSnapshot;
use local::{ClockWrite, IndexWrites};
pub use prepared::limit_sqlite_memory;
use prepared::{Bound, MergeWrite, Sql, Statements, ROWS_PER_STATEMENT};
use query::bind;
pub use query::Reader;
pub(crate) use query::{cap_values, read_cap};
use rows::{delete_row, load_row_clock, read_cell, read_row, upsert_row, ClockCache};
pub use wal::{spawn_checkpointer, WalCommits};

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
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
use capture::{Capture, RowWrite};
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

/// A hash map for the write path's lookups (table and column ordinals, site ordinals, recent
/// row clocks): std's SipHash was a measurable part of a local write. foldhash is seeded per
/// process but makes no promise against crafted keys; the one map keyed by what clients choose
/// (primary keys, in the clock cache) holds at most 1,024 entries, so collisions cost little.
pub(crate) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
/// A set hashed with foldhash (see [`FastMap`]).
pub(crate) type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;

/// A replicated table as the store uses it.
#[derive(Debug, Clone)]
struct Table {
    def: TableDef,
    /// `def.name` and each column's name (by column index), shared by every change built.
    name: Arc<str>,
    column_names: Vec<Arc<str>>,
    ord: u32,
    /// Column indexes of the primary key, in key order.
    pk: Vec<usize>,
    /// Ordinal of each column (None for key columns).
    col_ords: Vec<Option<ColOrd>>,
    col_by_name: HashMap<String, usize>,
    col_by_ord: FastMap<ColOrd, usize>,
    affinities: Vec<Affinity>,
}

impl Table {
    fn pack_pk(&self, row: &[Value]) -> Result<PackedPk, StoreError> {
        PackedPk::pack_iter(self.pk.iter().map(|&i| &row[i]))
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

/// The changes of one changeset to one row, each with its column ordinal (None: sentinel).
type RowChanges<'a> = Vec<(&'a Change, Option<ColOrd>)>;

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
CREATE TABLE IF NOT EXISTS __patina_unindexed (id INTEGER PRIMARY KEY, since INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS __patina_backfill (tbl INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS __patina_parts (
  site BLOB NOT NULL, version INTEGER NOT NULL, first_seq INTEGER NOT NULL,
  end_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL, bytes BLOB NOT NULL,
  PRIMARY KEY (site, version, first_seq)
) WITHOUT ROWID;
";

/// A replica's database.
#[derive(Debug)]
pub struct Store {
    /// The store's own statements on the writer, prepared once. Declared before `writer`:
    /// they must be finalized before it closes, and fields drop in declaration order.
    statements: Statements,
    writer: Connection,
    reader: Connection,
    capture: Capture,
    /// The capture's flag: a local transaction's writes outgrew what it may commit.
    capture_over: Arc<std::sync::atomic::AtomicBool>,
    /// Stops a local transaction's statements at their deadline.
    interrupt: Interrupt,
    site: SiteId,
    db_version: DbVersion,
    /// The head stored in `__patina_sites` (see [`Store::persist_head`]).
    head_persisted: DbVersion,
    sites: SiteTable,
    book: Bookkeeping,
    tables: BTreeMap<String, Arc<Table>>,
    table_names: FastMap<u32, String>,
    changeset_bytes_max: usize,
    /// Coverage of the remote changesets held in parts in `__patina_parts`.
    partials: BTreeMap<ChangesetId, Partial>,
    /// When each of `partials` last received a part, by `parts_received` (see
    /// `Store::buffer_part`: a full buffer drops the one that received a part least recently).
    partials_touched: FastMap<ChangesetId, u64>,
    /// Parts received so far (this process): the clock of `partials_touched`.
    parts_received: u64,
    parts_bytes: u64,
    parts_bytes_max: u64,
    /// The WAL's share of `max_db_bytes`, checked before every write transaction.
    wal: wal::WalBudget,
    /// Changes-index entries that committed local writes made stale, not deleted yet.
    stale_entries: Vec<local::IndexEntry>,
    /// The same, made stale by the local transaction still open.
    stale_entries_open: Vec<local::IndexEntry>,
    /// Changes-index entries of committed local writes, not written yet (see
    /// `local::INDEX_BATCH`); extraction reads them from here.
    index_pending: Vec<local::IndexEntry>,
    /// The same, of the local transaction still open.
    index_open: Vec<local::IndexEntry>,
    /// Remote sites whose versions (head, applied, cleared) in `book` are ahead of
    /// `__patina_sites`: written every `remote::VERSIONS_BATCH` batches, and at close.
    versions_unsaved: BTreeSet<SiteId>,
    /// Remote batches committed since the versions were last written.
    batches_unsaved: usize,
    /// Changes-index entries the remote merges of the open batch added: written with the
    /// versions (see `remote::VERSIONS_BATCH`), else kept in `merged_pending` once it commits.
    merged_entries_open: FastSet<local::IndexEntry>,
    /// Changes-index entries of committed remote batches, not written yet: written with the
    /// versions, and lost with them in a crash; extraction reads them from here.
    merged_pending: FastSet<local::IndexEntry>,
    /// Entries of `merged_pending` the open transaction superseded, forgotten once it commits.
    merged_superseded_open: Vec<local::IndexEntry>,
    /// Clocks of rows local transactions wrote lately (see [`ClockCache`]).
    clock_cache: ClockCache,
    /// Per table, the greatest key with a clock row (or above it: a rolled-back write may have
    /// raised it); None when the table has none. A key above it has no clock to read. (A
    /// shared key, not a copy of its bytes: raising it is most inserts' lot.)
    clock_key_max: FastMap<u32, Option<PackedPk>>,
    /// The clocks the open local transaction wrote, for the cache once it commits.
    clock_cache_open: Vec<(u32, PackedPk, RowClock<ColOrd>)>,
    /// Room kept from one write to the next (see `Store::write_row_clocks`): the encoded clock
    /// blobs of a statement's rows and where each row's end, and a row's origins before and
    /// after.
    clock_blob: Vec<u8>,
    clock_blob_ends: Vec<usize>,
    origins_scratch: (RowOrigins, RowOrigins),
    /// A reload of the state above after a rollback failed, so it may not match the file (a
    /// site or table the rolled-back transaction added in memory only): nothing writes until
    /// a reload succeeds (see [`Store::settle`]).
    reload_owed: bool,
    /// Reloads still to fail on purpose (see [`Store::fail_next_reloads`]).
    reload_failures: u32,
    /// Tables a committed schema change registered whose existing rows still need clocks:
    /// the reload after its COMMIT failed, so [`Store::settle`] backfills them after its own.
    backfill_owed: Vec<String>,
    /// When the owed backfill failed last, when to try it again (each try reads the tables
    /// whole).
    backfill_retry_at: Option<std::time::Instant>,
}

/// How long an owed backfill that failed waits before the next try.
const BACKFILL_RETRY: std::time::Duration = std::time::Duration::from_secs(60);

/// Tables whose merge writes `Store::warm_statements` prepares at most: two statements each,
/// a quarter of the row writes the store keeps, past which they would all be let go again.
const WARM_TABLES_MAX: usize = prepared::ROW_WRITES_MAX / 8;

/// A row clock's origins (see `RowClock::origins_into`).
type RowOrigins = Vec<(SiteId, DbVersion)>;

impl Drop for Store {
    /// Writes the deferred index entries and versions, so the next open has nothing to rebuild
    /// or fetch again; if that fails the mark stays and the next open rebuilds the entries
    /// (and sync fetches the versions again).
    fn drop(&mut self) {
        if let Err(e) = self.flush_deferred() {
            tracing::warn!("changes index left for the next open to rebuild, versions for sync to fetch again: {e}");
        }
    }
}

impl Store {
    /// Opens (or creates) a store and brings its schema up to the schema files.
    pub fn open(config: &StoreConfig) -> Result<Store, StoreError> {
        let mut writer = Connection::open(&config.path)?;
        writer.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000;
             PRAGMA foreign_keys = OFF;",
        )?;
        // Declared after `writer`: dropped before it, should open fail below.
        let mut statements = Statements::new(&writer);
        // Before the size cap is installed: a store stopped at its cap must still open.
        let started = std::time::Instant::now();
        writer.execute_batch("BEGIN IMMEDIATE")?;
        match local::rebuild_unindexed(&writer, &mut statements) {
            Ok(rebuilt) => {
                writer.execute_batch("COMMIT")?;
                if let Some(entries) = rebuilt {
                    tracing::warn!(
                        entries,
                        ms = started.elapsed().as_millis() as u64,
                        "changes index rebuilt after a stop that left it behind"
                    );
                }
            }
            Err(e) => {
                let _ = writer.execute_batch("ROLLBACK");
                return Err(e);
            }
        }
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
            statements,
            writer,
            reader,
            capture_over: capture.over(),
            capture,
            interrupt,
            site: SiteId::default(),
            db_version: DbVersion(0),
            head_persisted: DbVersion(0),
            sites: SiteTable::default(),
            book: Bookkeeping::new(),
            tables: BTreeMap::new(),
            table_names: FastMap::default(),
            changeset_bytes_max: config
                .changeset_bytes_max
                .unwrap_or(DEFAULT_CHANGESET_BYTES_MAX),
            partials: BTreeMap::new(),
            partials_touched: FastMap::default(),
            parts_received: 0,
            parts_bytes: 0,
            parts_bytes_max: config.parts_bytes_max.unwrap_or(DEFAULT_PARTS_BYTES_MAX),
            wal,
            stale_entries: Vec::new(),
            stale_entries_open: Vec::new(),
            index_pending: Vec::new(),
            versions_unsaved: BTreeSet::new(),
            batches_unsaved: 0,
            index_open: Vec::new(),
            merged_entries_open: FastSet::default(),
            merged_pending: FastSet::default(),
            merged_superseded_open: Vec::new(),
            clock_cache: ClockCache::default(),
            clock_key_max: FastMap::default(),
            clock_cache_open: Vec::new(),
            clock_blob: Vec::new(),
            clock_blob_ends: Vec::new(),
            origins_scratch: (Vec::new(), Vec::new()),
            reload_owed: false,
            reload_failures: 0,
            backfill_owed: Vec::new(),
            backfill_retry_at: None,
        };
        store.load_state()?;
        store.load_owed_backfills()?;
        // Backfills owed (by this schema change or by an earlier run's) are made by the
        // `settle` below, after the recovery of unsaved remote versions.
        store.migrate_schema_files(&config.schema_paths, false)?;
        // Should this fail (a store at its size cap), the versions stay unapplied here: sync
        // fetches them again, and their merge writes the entries (see `apply_one`).
        let started = std::time::Instant::now();
        match store.recover_unsaved_remote() {
            Ok(Some(versions)) => tracing::warn!(
                versions,
                ms = started.elapsed().as_millis() as u64,
                "remote versions put back after a stop that left them unwritten"
            ),
            Ok(None) => {}
            Err(e) => tracing::warn!("remote versions left for sync to fetch again: {e}"),
        }
        // Should that have left a reload owed, one more try now; else the first write's. Then
        // the backfills owed, if any (a failure is logged, and retried a minute later).
        if let Err(e) = store.settle() {
            tracing::warn!(
                "reloading the store's state failed (retried before the next write): {e}"
            );
        }
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
    /// The returned signal is what [`spawn_checkpointer`] waits on.
    pub fn checkpoint_in_background(&mut self) -> Result<WalCommits, StoreError> {
        Ok(self.wal.checkpoint_elsewhere())
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

    /// Replicated tables whose rows from before they became replicated still lack clocks:
    /// their backfill failed (over the transaction cap, a store at its size cap) and is tried
    /// again a minute later and at every open. Until it is made, those rows reach no peer.
    pub fn tables_owed_backfill(&self) -> &[String] {
        &self.backfill_owed
    }

    /// Names of the replicated tables.
    pub fn table_names(&self) -> Vec<String> {
        self.tables.keys().cloned().collect()
    }

    /// Reloads the state after a rollback. If that fails too the store owes a reload, which
    /// every later write makes first: the caller reports its own failure, the first cause.
    fn reload_after_rollback(&mut self) {
        if let Err(e) = self.load_state() {
            tracing::error!("reloading the store's state after a rollback failed (retried before the next write): {e}");
            self.reload_owed = true;
        }
    }

    /// Makes the reload a failed one owes, if it owes one; until it succeeds, writes fail.
    /// Then tries the backfill a schema change owes, if any and if due: its failure (a table
    /// too large for one transaction) is logged and tried again a minute later, and the write
    /// goes on.
    fn settle(&mut self) -> Result<(), StoreError> {
        self.reload_if_owed()?;
        self.backfill_if_due();
        Ok(())
    }

    /// Tries the backfill a schema change owes, if any and if due (a minute after the last
    /// failure). The store thread calls this at every sync request too, so a node with no
    /// writes still makes it once the cause is gone.
    pub(crate) fn backfill_if_due(&mut self) {
        if self.backfill_owed.is_empty() || self.reload_owed {
            return;
        }
        if self
            .backfill_retry_at
            .is_none_or(|at| std::time::Instant::now() >= at)
        {
            if let Err(e) = self.backfill_owed() {
                tracing::warn!("rows of a newly replicated table still lack clocks (tried again in {BACKFILL_RETRY:?}): {e}");
            }
        }
    }

    /// Makes the reload a failed one owes, if it owes one. The store thread calls this before
    /// every request, so a quiet node's reads (extraction, the digest) do not wait for a write.
    pub(crate) fn reload_if_owed(&mut self) -> Result<(), StoreError> {
        if self.reload_owed {
            self.load_state()?;
            self.install_capture();
            self.reload_owed = false;
        }
        Ok(())
    }

    /// Owes a backfill to every table the file marks as still owed one (a backfill that
    /// failed, or that a crash cut off, since the table was registered). The schema change
    /// that follows at open makes it.
    fn load_owed_backfills(&mut self) -> Result<(), StoreError> {
        let owed: Vec<u32> = self
            .writer
            .prepare("SELECT tbl FROM __patina_backfill ORDER BY tbl")?
            .query_map([], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        for ord in owed {
            let Some(name) = self.table_names.get(&ord) else {
                return Err(StoreError::Corrupt(format!(
                    "a backfill is owed to table ordinal {ord}, which is not registered"
                )));
            };
            if !self.backfill_owed.contains(name) {
                self.backfill_owed.push(name.clone());
            }
        }
        Ok(())
    }

    /// Gives clocks to the rows of the tables a committed schema change left without them. A
    /// failure is tried again [`BACKFILL_RETRY`] later at the soonest, whoever asks first: each
    /// try reads the tables, and a table too large fails the same way every time.
    fn backfill_owed(&mut self) -> Result<(), StoreError> {
        if self.backfill_owed.is_empty() {
            return Ok(());
        }
        let tables = std::mem::take(&mut self.backfill_owed);
        let result = self.backfill(&tables);
        if result.is_err() {
            self.backfill_owed = tables;
            self.backfill_retry_at = Some(std::time::Instant::now() + BACKFILL_RETRY);
        } else {
            self.backfill_retry_at = None;
        }
        result
    }

    /// Reads of the store's state (extraction, the digest) wait while a reload is owed: the
    /// state may name a site or table the file does not have, or miss one it has.
    fn refuse_while_reload_owed(&self) -> Result<(), StoreError> {
        if self.reload_owed {
            return Err(StoreError::Sqlite(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
                Some("the store's state is being reloaded after a failed rollback".into()),
            )));
        }
        Ok(())
    }

    /// How many times SQLite has compiled one of the store's own statements on the writer
    /// (tests: a write that compiles none found every statement it ran warm).
    #[doc(hidden)]
    pub fn statements_compiled(&self) -> u64 {
        self.statements.compiled()
    }

    /// Fault injection for tests: the next `count` reloads of the state fail, as an I/O error
    /// while reading the file would make them.
    #[doc(hidden)]
    pub fn fail_next_reloads(&mut self, count: u32) {
        self.reload_failures = count;
    }

    /// Reloads sites, bookkeeping and tables from the database (at open, after a rollback or a
    /// schema change, or when a reload is owed), keeping from memory what is ahead of the
    /// file: versions not written yet, and the heads other sites were heard at.
    fn load_state(&mut self) -> Result<(), StoreError> {
        if self.reload_failures > 0 {
            self.reload_failures -= 1;
            return Err(StoreError::Sqlite(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
                Some("reload failed on purpose (fail_next_reloads)".into()),
            )));
        }
        self.clock_cache.clear();
        self.clock_key_max.clear();
        self.statements.forget_row_writes();
        // Versions committed but not written yet (see `versions_unsaved`) are ahead of the
        // file: kept from memory, or a reload after a failed batch would forget them.
        let unsaved: Vec<(SiteId, SiteVersions)> = self
            .versions_unsaved
            .iter()
            .filter_map(|site| Some((*site, self.book.site(site)?.clone())))
            .collect();
        // The heads other sites were heard at are knowledge, not the file's state: a version
        // heard of but not applied (a batch that failed, `note_unapplied`) must stay a gap
        // after a reload, or health would stop counting it.
        let old_self = self.site;
        let heard: Vec<(SiteId, DbVersion)> = self
            .book
            .iter()
            .filter(|(site, versions)| **site != old_self && versions.head.get() > 0)
            .map(|(site, versions)| (*site, versions.head))
            .collect();
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
                    // Entries not written yet count too (a reload after a rolled-back batch).
                    let pending = self.index_pending.iter().map(|e| e.1).max().unwrap_or(0);
                    let head = head
                        .max(DbVersion(indexed.unwrap_or(0) as u64))
                        .max(DbVersion(pending));
                    // Our own versions are always all applied: 1..=head.
                    versions.applied.insert_range(1, head.get());
                    versions.head = head;
                    self.db_version = head;
                }
                book.set_site(id, versions);
            }
        }
        self.site = sites.site(0)?;
        for (site, versions) in unsaved {
            if site != self.site && sites.ord(&site).is_some() {
                book.set_site(site, versions);
            }
        }
        for (site, head) in heard {
            if site != self.site {
                book.heard(site, head);
            }
        }
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
        // Assigned whole or not at all: a table without an entry always reads.
        let mut bounds = FastMap::default();
        let mut greatest = self
            .writer
            .prepare("SELECT max(pk) FROM __patina_rows WHERE tbl = ?1")?;
        for ord in self.table_names.keys() {
            let max: Option<Vec<u8>> = greatest.query_row([ord], |r| r.get(0))?;
            match max.map(PackedPk::from_bytes) {
                None => {
                    bounds.insert(*ord, None);
                }
                Some(Ok(max)) => {
                    bounds.insert(*ord, Some(max));
                }
                // Not a key this store wrote: no bound, that table's clocks are always read.
                Some(Err(_)) => {}
            }
        }
        drop(greatest);
        self.clock_key_max = bounds;
        Ok(())
    }

    /// Prepares the statements a write runs after a schema change (open applies the schema
    /// files, so this runs at every open too), so that the first write after either does not
    /// compile them while a cluster waits for it: a store's first remote apply ran 751k
    /// instructions against 58k for the next, and a cluster's first write is the first of every
    /// node it reaches (docs/BENCHMARKS.md, issue 21). Fresh: those prepared before the change
    /// are let go, since SQLite would compile them again at their next run. The fixed ones, the
    /// one-row clock write, and each table's whole-row merge and delete (for the first
    /// [`WARM_TABLES_MAX`] tables). Best effort: a statement that fails to prepare here fails
    /// again, with its error, where it is used.
    fn warm_statements(&mut self) {
        self.statements.forget_store_statements();
        let _ = self.statements.prepare_common();
        for table in self.tables.values().take(WARM_TABLES_MAX) {
            let _ = rows::prepare_row_writes(&mut self.statements, table);
        }
    }

    /// The stored clock of a row, or the empty one without reading when its key is above every
    /// key the table has a clock for (new rows with growing keys: most inserts). A table without
    /// a bound (a reload that failed half-way) always reads.
    fn stored_row_clock(
        &mut self,
        table_ord: u32,
        pk: &PackedPk,
    ) -> Result<RowClock<ColOrd>, StoreError> {
        match self.clock_key_max.get(&table_ord) {
            Some(max) if max.as_ref().is_none_or(|max| pk > max) => Ok(RowClock::default()),
            _ => {
                let mut stmt = self.statements.get(Sql::RowClock)?;
                stmt.int(table_ord.into()).blob(pk.as_bytes());
                let sites = &self.sites;
                stmt.query_row(|row| {
                    let cl = row.int(0) as u64;
                    clock::decode_row_clock(cl, row.blob(1), row.blob(2).unwrap_or(&[]), sites)
                })?
                .unwrap_or_else(|| Ok(RowClock::default()))
            }
        }
    }

    /// Path-independent description of the database file, for logs.
    pub fn path(&self) -> Option<&Path> {
        self.writer.path().map(Path::new)
    }
}
