//! Local transactions: running the user's statements, capturing their writes into row clocks and the changes index, and committing a new db version.

use super::*;

impl Store {
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
    pub(super) fn local_transaction(
        &mut self,
        body: impl FnOnce(&mut Store) -> Result<Vec<usize>, StoreError>,
    ) -> Result<TxOutcome, StoreError> {
        self.wal.ensure_room(&self.writer)?;
        exec_cached(&self.writer, "BEGIN IMMEDIATE")?;
        self.stale_entries_open.clear();
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
            // The exact size needs the whole encoding: only when the cheap upper bound is over.
            if let Some(cs) = changeset
                .as_ref()
                .filter(|cs| patina_core::chunk::estimate_bytes(cs) > self.changeset_bytes_max)
            {
                let bytes = patina_core::wire::changeset_to_bytes(cs).len();
                if bytes > self.changeset_bytes_max {
                    return Err(StoreError::TransactionTooLarge {
                        bytes,
                        limit: self.changeset_bytes_max,
                    });
                }
            }
            let flushed =
                self.stale_entries.len() + self.stale_entries_open.len() >= STALE_ENTRIES_BATCH;
            if flushed {
                self.delete_stale_entries()?;
            }
            exec_cached(&self.writer, "COMMIT")?;
            Ok((rows_affected, changeset, flushed))
        });
        match result {
            Ok((rows_affected, changeset, flushed)) => {
                if flushed {
                    self.stale_entries.clear();
                    self.stale_entries_open.clear();
                } else {
                    self.stale_entries.append(&mut self.stale_entries_open);
                }
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
                // Those entries are current again; a flush's deletes were rolled back too.
                self.stale_entries_open.clear();
                Err(e)
            }
        }
    }

    /// Deletes the stale changes-index entries of committed local writes and of the open
    /// transaction, inside it (the caller forgets them once it commits).
    fn delete_stale_entries(&mut self) -> Result<(), StoreError> {
        let mut stmt = self.writer.prepare_cached(
            "DELETE FROM __patina_changes WHERE site = ?1 AND version = ?2 AND tbl = ?3 AND pk = ?4",
        )?;
        for (site, version, table_ord, pk) in
            self.stale_entries.iter().chain(&self.stale_entries_open)
        {
            stmt.execute(params![site, *version as i64, table_ord, pk.as_bytes()])?;
        }
        Ok(())
    }

    /// Runs one statement of a local transaction; on failure SQLite's message and whether the
    /// statement is at fault (see [`error::is_client_fault`]).
    pub(super) fn execute_user(&mut self, statement: &Statement) -> Result<usize, (String, bool)> {
        let classify = |e: rusqlite::Error| (e.to_string(), error::is_client_fault(&e));
        let mut stmt = self
            .writer
            .prepare_cached(&statement.sql)
            .map_err(classify)?;
        bind(&mut stmt, &statement.params).map_err(|e| (e, true))?;
        stmt.raw_execute().map_err(classify)
    }

    /// Turns captured writes into clock rows and the changeset of this transaction.
    pub(super) fn record_local_writes(
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
        // Local writes only remove entries of versions they supersede, never the newest own
        // one: no head to persist.
        self.write_row_clocks(&writes, Superseded::Later)?;
        Ok(Some(Changeset::whole(
            ChangesetId {
                site: self.site,
                version,
            },
            changes,
        )))
    }

    pub(super) fn touch<'r>(
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

    pub(super) fn table_by_ord(&self, ord: u32) -> Result<&Arc<Table>, StoreError> {
        self.table_names
            .get(&ord)
            .and_then(|n| self.tables.get(n))
            .ok_or_else(|| StoreError::Corrupt(format!("unknown table ordinal {ord}")))
    }

    /// Persists row clocks and adds their new origins to the changes index, with multi-row
    /// statements; the entries of origins they no longer refer to are deleted now or later
    /// (`superseded`). Returns true if an entry of this replica's own changesets was deleted
    /// now (the caller must then make sure the head is persisted, see [`Store::persist_head`]).
    pub(super) fn write_row_clocks(
        &mut self,
        rows: &[ClockWrite<'_>],
        superseded: Superseded,
    ) -> Result<bool, StoreError> {
        let mut removed_own = false;
        let mut index_inserts: Vec<(SiteOrd, u64, u32, &PackedPk)> = Vec::new();
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let mut stmt = self
                .writer
                .prepare_cached(multi_row_sql(MultiRow::Clocks, chunk.len()))?;
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
                let entry = (
                    self.site_ord(site)?,
                    version.get(),
                    row.table_ord,
                    row.pk.clone(),
                );
                match superseded {
                    Superseded::Later => self.stale_entries_open.push(entry),
                    Superseded::DeleteNow => {
                        removed_own |= *site == self.site;
                        let (site, version, table_ord, pk) = entry;
                        self.writer
                            .prepare_cached(
                                "DELETE FROM __patina_changes WHERE site = ?1 AND version = ?2 AND tbl = ?3 AND pk = ?4",
                            )?
                            .execute(params![site, version as i64, table_ord, pk.as_bytes()])?;
                    }
                }
            }
            for (site, version) in new.difference(&old) {
                index_inserts.push((self.site_ord(site)?, version.get(), row.table_ord, row.pk));
            }
        }
        for chunk in index_inserts.chunks(ROWS_PER_STATEMENT) {
            let mut stmt = self
                .writer
                .prepare_cached(multi_row_sql(MultiRow::Index, chunk.len()))?;
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
    pub(super) fn persist_head(&mut self) -> Result<(), StoreError> {
        if self.head_persisted < self.db_version {
            self.writer
                .prepare_cached("UPDATE __patina_sites SET head = ?1 WHERE ord = 0")?
                .execute([self.db_version.get() as i64])?;
            self.head_persisted = self.db_version;
        }
        Ok(())
    }

    pub(super) fn site_ord(&self, site: &SiteId) -> Result<SiteOrd, StoreError> {
        self.sites
            .ord(site)
            .ok_or_else(|| StoreError::Corrupt(format!("site {site} not registered")))
    }

    /// Registers a site inside the open transaction (a rollback is followed by a reload).
    pub(super) fn ensure_site(&mut self, site: SiteId) -> Result<SiteOrd, StoreError> {
        if let Some(ord) = self.sites.ord(&site) {
            return Ok(ord);
        }
        let ord = self.sites.len() as SiteOrd;
        self.writer
            .prepare_cached("INSERT INTO __patina_sites (ord, site_id) VALUES (?1, ?2)")?
            .execute(params![ord, &site.0[..]])?;
        Ok(self.sites.push(site))
    }
}
/// A changes-index entry: (site ordinal, version, table ordinal, primary key).
pub(super) type IndexEntry = (SiteOrd, u64, u32, PackedPk);

/// Stale changes-index entries of local writes deleted together, in the transaction that
/// brings their number to this. Deleting each in its own writer's transaction wrote a fourth
/// B-tree page per commit (an update supersedes an older version, whose entries lie elsewhere
/// in the index than the new ones); a batch touches a few pages once.
pub(super) const STALE_ENTRIES_BATCH: usize = 64;

/// What [`Store::write_row_clocks`] does with the index entries of superseded origins.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Superseded {
    /// Delete them in this transaction (remote merges).
    DeleteNow,
    /// Leave them for a later batch (local writes; see [`STALE_ENTRIES_BATCH`]).
    Later,
}

/// Runs a statement without parameters through the statement cache: BEGIN and COMMIT were
/// parsed again on every transaction.
pub(super) fn exec_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.raw_execute().map(|_| ())
}

/// Rows per multi-row statement of [`Store::write_row_clocks`].
const ROWS_PER_STATEMENT: usize = 64;

/// The two multi-row statements of [`Store::write_row_clocks`].
#[derive(Clone, Copy)]
enum MultiRow {
    /// Upserts of row clocks.
    Clocks,
    /// Inserts into the changes index.
    Index,
}

/// The SQL of a multi-row statement for `rows` rows (1..=[`ROWS_PER_STATEMENT`]), built once
/// per process: formatting it on every transaction was a measurable part of a one-row write.
fn multi_row_sql(kind: MultiRow, rows: usize) -> &'static str {
    static SQL: std::sync::OnceLock<[Vec<String>; 2]> = std::sync::OnceLock::new();
    let all = SQL.get_or_init(|| {
        let build = |head: &str, tuple: &str, tail: &str| -> Vec<String> {
            (1..=ROWS_PER_STATEMENT)
                .map(|n| format!("{head} {}{tail}", vec![tuple; n].join(", ")))
                .collect()
        };
        [
            build(
                "INSERT INTO __patina_rows (tbl, pk, cl, sentinel, cells) VALUES",
                "(?, ?, ?, ?, ?)",
                " ON CONFLICT (tbl, pk) DO UPDATE SET cl = excluded.cl, \
                 sentinel = excluded.sentinel, cells = excluded.cells",
            ),
            build(
                "INSERT OR IGNORE INTO __patina_changes (site, version, tbl, pk) VALUES",
                "(?, ?, ?, ?)",
                "",
            ),
        ]
    });
    &all[kind as usize][rows - 1]
}

/// A row clock to store, with the clock it replaces.
pub(super) struct ClockWrite<'a> {
    pub(super) table_ord: u32,
    pub(super) pk: &'a PackedPk,
    pub(super) clock: &'a RowClock<ColOrd>,
    pub(super) before: &'a RowClock<ColOrd>,
}

/// A row touched by a local transaction.
pub(super) struct LocalRow {
    clock: RowClock<ColOrd>,
    before: RowClock<ColOrd>,
    /// The row's values after the transaction (None once deleted).
    values: Option<Vec<Value>>,
}

pub(super) fn delete_local(row: &mut LocalRow, origin: Origin) {
    if !row.clock.cl.is_live() {
        // Data without a clock (written behind our back): it was live, so its delete is even.
        row.clock.cl = CausalLength(row.clock.cl.get() + 1);
    }
    row.clock.local_delete(origin);
    row.values = None;
}
