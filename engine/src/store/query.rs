//! Read-only queries: the reader connection, running a statement with a deadline, binding parameters.

use super::*;

impl Store {
    /// Runs one read-only statement on the read connection.
    pub fn query(&self, statement: &Statement) -> Result<QueryRows, StoreError> {
        collect_query(&self.reader, statement, read_cap(self.changeset_bytes_max))
    }
}
/// A read-only connection for queries; the API keeps a few, so reads never wait for writes.
#[derive(Debug)]
pub struct Reader {
    conn: Connection,
    interrupt: Interrupt,
    /// The cap on each value it reads or makes, and on each result row.
    value_bytes_max: usize,
}

/// Caps every text or blob value `conn` makes (stored or computed: `zeroblob`, `printf`,
/// `group_concat`), and every record it builds (a sorter's, a temporary table's), at `bytes`:
/// SQLite refuses a larger one with "string or blob too big" before it allocates it. SQLite's
/// own default is 1 GB, and a result column is made in one step of its program, so no
/// deadline stops a statement asking for one. Returns the cap it replaced.
pub(crate) fn cap_values(conn: &Connection, bytes: usize) -> rusqlite::Result<i32> {
    let bytes = i32::try_from(bytes).unwrap_or(i32::MAX);
    conn.set_limit(rusqlite::limits::Limit::SQLITE_LIMIT_LENGTH, bytes)
}

/// The value cap of the connections queries run on: what a transaction may write, and never
/// below what a peer may have written (a node set to smaller transactions still reads every
/// value it stores).
pub(crate) fn read_cap(transaction_bytes_max: usize) -> usize {
    transaction_bytes_max.max(patina_core::wire::VALUE_BYTES_MAX)
}

/// Runs `statement` on `conn`, handing each row to `on_row`. A row whose values hold more than
/// `row_bytes_max` bytes together is refused before it is copied: the cap on each value does
/// not bound a row of many (each up to the cap, and its answer several times that as JSON).
pub(super) fn query_each(
    conn: &Connection,
    statement: &Statement,
    row_bytes_max: usize,
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
        let mut bytes = 0usize;
        for i in 0..columns.len() {
            bytes += match row.get_ref(i)? {
                ValueRef::Text(t) | ValueRef::Blob(t) => t.len(),
                _ => 8,
            };
        }
        if bytes > row_bytes_max {
            return Err(StoreError::Query(format!(
                "a result row of {bytes} bytes is over the limit of {row_bytes_max} bytes \
                 (db.transaction_bytes_max, at least 4 MiB)"
            )));
        }
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
pub(super) fn query_error(e: rusqlite::Error) -> StoreError {
    if error::is_client_fault(&e) {
        StoreError::Query(e.to_string())
    } else {
        StoreError::Sqlite(e)
    }
}

pub(super) fn collect_query(
    conn: &Connection,
    statement: &Statement,
    row_bytes_max: usize,
) -> Result<QueryRows, StoreError> {
    let mut columns = Vec::new();
    let mut rows = Vec::new();
    query_each(
        conn,
        statement,
        row_bytes_max,
        |c| columns = c.to_vec(),
        |r| {
            rows.push(r);
            true
        },
    )?;
    Ok(QueryRows { columns, rows })
}

pub(super) fn bind(stmt: &mut rusqlite::Statement<'_>, params: &Params) -> Result<(), String> {
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

impl Reader {
    /// Opens a read-only connection to a store's database file; no value it reads or makes,
    /// and no result row, may be over `value_bytes_max` bytes (see [`cap_values`]).
    pub fn open(path: &Path, value_bytes_max: usize) -> Result<Reader, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_URI,
        )?;
        conn.execute_batch("PRAGMA busy_timeout = 5000;")?;
        conn.set_prepared_statement_cache_capacity(64);
        cap_values(&conn, value_bytes_max)?;
        let mut conn = conn;
        guard::install_read_only(&mut conn)?;
        let interrupt = Interrupt::install(&mut conn)?;
        Ok(Reader {
            conn,
            interrupt,
            value_bytes_max,
        })
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
        let result = query_each(
            &self.conn,
            statement,
            self.value_bytes_max,
            on_columns,
            on_row,
        );
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
