//! Errors of the store. Each says whether the input was at fault (bad SQL, bad schema, a bad
//! remote change) or the database (I/O, corruption); in every case nothing was committed.

use patina_core::validate::InvalidChange;

/// Why a schema file was refused.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// A schema file or folder could not be read.
    #[error("cannot read schema {path}: {source}")]
    Read {
        /// The path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The schema SQL itself does not run.
    #[error("schema SQL error: {0}")]
    Sql(String),
    /// A table breaks one of the rules a replicated table must follow.
    #[error("table {table}: {rule}")]
    Rule {
        /// The table.
        table: String,
        /// The rule broken, in words.
        rule: String,
    },
    /// A schema object other than a table or an index.
    #[error("{kind} {name}: schema files may only create tables and indexes")]
    Unsupported {
        /// "view", "trigger", ...
        kind: String,
        /// Its name.
        name: String,
    },
    /// A change that is not additive (dropped or changed column, changed index, dropped table).
    #[error("table {table}: non-additive schema change: {detail}")]
    NotAdditive {
        /// The table.
        table: String,
        /// What changed.
        detail: String,
    },
}

/// Why a remote change was refused. The whole changeset it belongs to is refused with it.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// A rule every honest changeset follows is broken.
    #[error(transparent)]
    Invalid(#[from] InvalidChange),
    /// The table is not in this node's schema.
    #[error("unknown table {0:?}")]
    UnknownTable(String),
    /// The column is not in the table (or is a primary-key column).
    #[error("unknown column {column:?} in table {table}")]
    UnknownColumn {
        /// The table.
        table: String,
        /// The column.
        column: String,
    },
    /// The primary key has the wrong number of columns.
    #[error("table {table}: primary key has {got} columns, expected {expected}")]
    PkArity {
        /// The table.
        table: String,
        /// Columns received.
        got: usize,
        /// Columns of the table's key.
        expected: usize,
    },
    /// The value's type does not fit the column (SQLite would convert or refuse it).
    #[error("table {table}, column {column}: {detail}")]
    WrongType {
        /// The table.
        table: String,
        /// The column.
        column: String,
        /// What is wrong.
        detail: String,
    },
}

/// Any error of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed (I/O, full disk, corruption, busy).
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A schema was refused.
    #[error("schema: {0}")]
    Schema(#[from] SchemaError),
    /// A statement of a transaction failed; nothing of the transaction was committed.
    #[error("statement {index}: {message}")]
    Statement {
        /// Index of the failing statement in the transaction.
        index: usize,
        /// SQLite's message.
        message: String,
        /// True when the statement itself is at fault (bad SQL, a constraint, a type, a
        /// refused operation, wrong parameters); false when the node is (I/O, a full disk).
        client_fault: bool,
    },
    /// A statement ran past its deadline and was stopped; nothing of it was kept.
    #[error("statement stopped after running past its deadline of {0:?}")]
    DeadlinePassed(std::time::Duration),
    /// The client went away and its statement was stopped.
    #[error("statement stopped: the client went away")]
    Cancelled,
    /// Every read connection stayed busy until the request's deadline.
    #[error("all {0} query connections stayed busy until the deadline")]
    ReadersBusy(usize),
    /// A transaction whose changeset would be too large to replicate; nothing was committed.
    #[error("transaction too large to replicate: its changes encode to {bytes} bytes, over the limit of {limit}; split it")]
    TransactionTooLarge {
        /// Encoded size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// A local transaction's writes grew past what it may hold before committing (twice
    /// `db.transaction_bytes_max`); it was stopped and nothing was committed.
    #[error("transaction too large: its writes held over {limit} bytes before they could commit (twice db.transaction_bytes_max); it was stopped and nothing was written: split it")]
    WritesTooLarge {
        /// The limit.
        limit: usize,
    },
    /// A value, or a row's key, larger than any peer accepts
    /// ([`patina_core::wire::VALUE_BYTES_MAX`]); nothing was committed.
    #[error("a value of {bytes} bytes in {table}.{column} is over the limit of {limit} bytes that peers accept; nothing was written")]
    ValueTooLarge {
        /// The table.
        table: String,
        /// The column, or the key's columns.
        column: String,
        /// The value's size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// No room to buffer another part of a large remote changeset; nothing was buffered (sync
    /// brings the part again later).
    #[error("buffer of changeset parts full: {bytes} bytes held, limit {limit}")]
    PartsBufferFull {
        /// Bytes of parts held.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// The write-ahead log is over its share of `db.max_db_bytes` and readers still use it;
    /// nothing was written. Writes resume once they let go (queries end by their deadline).
    #[error("database full: the write-ahead log holds {bytes} bytes, over its share of {limit} bytes of db.max_db_bytes, and readers still use it")]
    WalFull {
        /// Bytes in the WAL.
        bytes: u64,
        /// Its share of the cap.
        limit: u64,
    },
    /// A transaction with no statements.
    #[error("empty transaction")]
    EmptyTransaction,
    /// A query that would write.
    #[error("statement is not read-only")]
    NotReadOnly,
    /// A query that failed to prepare or run.
    #[error("query: {0}")]
    Query(String),
    /// A remote changeset was refused; nothing of it was applied.
    #[error("changeset from {site} version {version}: {source}")]
    Change {
        /// Author site (hex).
        site: String,
        /// Author version.
        version: u64,
        /// Why.
        source: ChangeError,
    },
    /// The store's own metadata is unreadable (corruption or a foreign database).
    #[error("corrupt metadata: {0}")]
    Corrupt(String),
    /// A backup or restore could not use a file (it exists, a folder is missing, no space).
    #[error("{0}")]
    Backup(String),
}

impl StoreError {
    /// True when the request is at fault (an HTTP 4xx), false when the node is.
    pub fn is_client_fault(&self) -> bool {
        match self {
            StoreError::Statement { client_fault, .. } => *client_fault,
            StoreError::TransactionTooLarge { .. }
            | StoreError::WritesTooLarge { .. }
            | StoreError::ValueTooLarge { .. }
            | StoreError::EmptyTransaction
            | StoreError::NotReadOnly
            | StoreError::Backup(_)
            | StoreError::Query(_) => true,
            _ => false,
        }
    }
}

/// Whether a failed statement is the fault of what was sent rather than of the node: SQLite's
/// codes for bad SQL, constraints, types, refused operations and parameters.
pub fn is_client_fault(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode as C;
    match e {
        rusqlite::Error::SqliteFailure(f, _) => matches!(
            f.code,
            C::Unknown // SQLITE_ERROR: syntax errors, missing tables and columns
                | C::ConstraintViolation
                | C::TypeMismatch
                | C::AuthorizationForStatementDenied
                | C::ParameterOutOfRange
                | C::TooBig
        ),
        rusqlite::Error::InvalidParameterCount(..)
        | rusqlite::Error::InvalidParameterName(_)
        | rusqlite::Error::SqlInputError { .. }
        | rusqlite::Error::MultipleStatement
        | rusqlite::Error::ExecuteReturnedResults
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::ToSqlConversionFailure(_) => true,
        _ => false,
    }
}
