//! Row-level SQLite helpers shared by local writes and remote apply: a row's clock, its cells, and upserts.

use super::*;

pub(super) fn load_row_clock(
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
pub(super) fn read_row(
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
pub(super) fn read_cell(
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

/// Deletes one row by key.
pub(super) fn delete_row(
    statements: &mut Statements,
    table: &Table,
    pk: &[Value],
) -> Result<(), StoreError> {
    let mut stmt = statements.row_write(MergeWrite::Delete(table.ord), || delete_sql(table))?;
    for value in pk {
        stmt.value(value);
    }
    stmt.execute()?;
    Ok(())
}

/// Inserts the row if absent (key + defaults + `writes`), else sets the `writes` columns.
pub(super) fn upsert_row(
    conn: &Connection,
    statements: &mut Statements,
    table: &Table,
    pk: &[Value],
    writes: &BTreeMap<usize, &Value>,
) -> Result<(), StoreError> {
    let mask = column_mask(writes.keys().copied());
    let values = pk.iter().chain(writes.values().copied());
    match mask {
        Some(mask) => {
            let mut stmt = statements.row_write(MergeWrite::Upsert(table.ord, mask), || {
                upsert_sql(table, writes.keys().copied())
            })?;
            for value in values {
                stmt.value(value);
            }
            stmt.execute()?;
        }
        // Wider tables than a mask holds: formatted each time, through rusqlite's cache.
        None => {
            let mut stmt = conn.prepare_cached(&upsert_sql(table, writes.keys().copied()))?;
            for (n, value) in values.enumerate() {
                stmt.raw_bind_parameter(n + 1, SqlValue(value))?;
            }
            stmt.raw_execute()?;
        }
    }
    Ok(())
}

/// Prepares `table`'s merge write of a whole row (every column: what a remote insert
/// writes) and its delete by key, unless prepared already (see `Store::warm_statements`).
pub(super) fn prepare_row_writes(
    statements: &mut Statements,
    table: &Table,
) -> rusqlite::Result<()> {
    let columns = || (0..table.def.columns.len()).filter(|i| !table.pk.contains(i));
    if let Some(mask) = column_mask(columns()) {
        statements.row_write(MergeWrite::Upsert(table.ord, mask), || {
            upsert_sql(table, columns())
        })?;
    }
    statements.row_write(MergeWrite::Delete(table.ord), || delete_sql(table))?;
    Ok(())
}

/// The set of column indexes as the bits of a [`MergeWrite::Upsert`] key; None past 128.
fn column_mask(mut columns: impl Iterator<Item = usize>) -> Option<u128> {
    columns.try_fold(0u128, |mask, i| {
        1u128.checked_shl(i as u32).map(|bit| mask | bit)
    })
}

fn delete_sql(table: &Table) -> String {
    format!(
        "DELETE FROM main.{} WHERE {}",
        quote_ident(&table.def.name),
        table.pk_where(1)
    )
}

/// `INSERT ... ON CONFLICT DO UPDATE` of the key and the columns `writes` (indexes, ascending).
fn upsert_sql(table: &Table, writes: impl Iterator<Item = usize>) -> String {
    let cols: Vec<String> = table
        .pk
        .iter()
        .copied()
        .chain(writes)
        .map(|i| quote_ident(&table.def.columns[i].name))
        .collect();
    let placeholders: Vec<String> = (1..=cols.len()).map(|i| format!("?{i}")).collect();
    let conflict: Vec<&str> = cols[..table.pk.len()].iter().map(String::as_str).collect();
    let action = if cols.len() == table.pk.len() {
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
    format!(
        "INSERT INTO main.{} ({}) VALUES ({}) ON CONFLICT ({}) DO {}",
        quote_ident(&table.def.name),
        cols.join(", "),
        placeholders.join(", "),
        conflict.join(", "),
        action
    )
}

/// Clocks of rows recently written by local transactions, so writing such a row again skips
/// reading its clock back. Holds only committed clocks equal to the stored ones: filled after
/// a local COMMIT, an entry forgotten when a remote merge writes its row, emptied when the
/// store reloads its state, and when full (a bound, not an LRU: rewriting the hot rows fills
/// it again at once). Emptying keeps the maps' memory: a stream of inserts of new rows fills
/// and empties it over and over, and growing the maps again each time was most of its cost.
#[derive(Debug, Default)]
pub(super) struct ClockCache {
    tables: FastMap<u32, FastMap<PackedPk, RowClock<ColOrd>>>,
    rows: usize,
}

/// Rows a [`ClockCache`] holds at most.
pub(super) const CLOCK_CACHE_ROWS: usize = 1024;

impl ClockCache {
    /// Removes and returns the clock of a row, if held.
    pub(super) fn take(&mut self, table_ord: u32, pk: &PackedPk) -> Option<RowClock<ColOrd>> {
        let clock = self.tables.get_mut(&table_ord)?.remove(pk)?;
        self.rows -= 1;
        Some(clock)
    }

    pub(super) fn put(&mut self, table_ord: u32, pk: PackedPk, clock: RowClock<ColOrd>) {
        if self.rows >= CLOCK_CACHE_ROWS {
            self.empty();
        }
        if self
            .tables
            .entry(table_ord)
            .or_default()
            .insert(pk, clock)
            .is_none()
        {
            self.rows += 1;
        }
    }

    pub(super) fn forget(&mut self, table_ord: u32, pk: &PackedPk) {
        if let Some(table) = self.tables.get_mut(&table_ord) {
            if table.remove(pk).is_some() {
                self.rows -= 1;
            }
        }
    }

    /// Drops every entry and the maps' memory (a reload: tables may have gone).
    pub(super) fn clear(&mut self) {
        self.tables = FastMap::default();
        self.rows = 0;
    }

    /// Drops every entry, keeping each table's map for the next ones (at most the room of
    /// [`CLOCK_CACHE_ROWS`] entries per table written to).
    fn empty(&mut self) {
        for table in self.tables.values_mut() {
            table.clear();
        }
        self.rows = 0;
    }
}
