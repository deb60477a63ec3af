//! Local transactions: running the user's statements, capturing their writes into row clocks and the changes index, and committing a new db version.

use super::*;
use patina_core::wire::VALUE_BYTES_MAX;

use std::sync::atomic::Ordering;

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
            // Stopped at its deadline; the capture stops it too once its writes outgrow what
            // it could commit (see `local_transaction`).
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
                (Err(_), _) if store.capture_over.load(Ordering::Relaxed) => {
                    Err(StoreError::WritesTooLarge {
                        limit: store.capture_bytes_max(),
                    })
                }
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

    /// What a local transaction's captured writes may hold in memory before it is stopped:
    /// twice the changeset it may commit (an update also keeps the old values it changed, and
    /// a row written again is captured again). Without it a statement writing many rows
    /// held them all, and as much again in the write-ahead log, until its deadline.
    pub(super) fn capture_bytes_max(&self) -> usize {
        self.changeset_bytes_max.saturating_mul(2)
    }

    /// Wraps `body` in BEGIN IMMEDIATE ... COMMIT with capture on; turns what it captured into
    /// clocks and a changeset before COMMIT. Rolls everything back on any error.
    pub(super) fn local_transaction(
        &mut self,
        body: impl FnOnce(&mut Store) -> Result<Vec<usize>, StoreError>,
    ) -> Result<TxOutcome, StoreError> {
        self.settle()?;
        self.wal.ensure_room(&self.writer)?;
        self.statements.run(Sql::BeginImmediate)?;
        self.stale_entries_open.clear();
        self.index_open.clear();
        self.clock_cache_open.clear();
        // User statements may not make a value, or a record, larger than a transaction may
        // write: SQLite would build it in one step of its program, where no deadline stops it,
        // before the check below refused it. The store's own writes (remote rows of any size
        // their writers' nodes accepted) keep the cap SQLite had.
        let capture_max = self.capture_bytes_max();
        let uncapped = match self
            .capture
            .start(&mut self.writer, capture_max)
            .and_then(|()| {
                query::cap_values(&self.writer, query::read_cap(self.changeset_bytes_max))
            }) {
            Ok(uncapped) => uncapped,
            Err(e) => {
                let _ = self.capture.stop(&mut self.writer);
                let _ = self.writer.execute_batch("ROLLBACK");
                return Err(e.into());
            }
        };
        let result = body(self);
        let result = match query::cap_values(&self.writer, uncapped as usize) {
            Ok(_) => result,
            Err(e) => result.and(Err(e.into())),
        };
        let (mut writes, capture_error) = self.capture.stop(&mut self.writer);
        let result = result.and_then(|rows_affected| {
            if let Some(e) = capture_error {
                return Err(StoreError::Corrupt(e));
            }
            // The last statement may have ended before the interrupt took effect: what it
            // wrote past the limit was not captured, so it must not commit.
            if self.capture_over.load(Ordering::Relaxed) {
                return Err(StoreError::WritesTooLarge { limit: capture_max });
            }
            let changeset = self.record_local_writes(&mut writes)?;
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
            let deferred = self.index_pending.len()
                + self.index_open.len()
                + self.stale_entries.len()
                + self.stale_entries_open.len();
            let flushed = deferred >= INDEX_BATCH;
            if flushed {
                self.write_deferred_entries()?;
            } else if self.index_pending.is_empty() {
                if let Some((_, since, _, _)) = self.index_open.first() {
                    // From this commit on the index lacks entries until the next flush; a
                    // stop before it leaves this row, and the next open puts them back.
                    let mut mark = self.statements.get(Sql::MarkUnindexed)?;
                    mark.int(*since as i64);
                    mark.execute()?;
                }
            }
            self.statements.run(Sql::Commit)?;
            Ok((rows_affected, changeset, flushed))
        });
        match result {
            Ok((rows_affected, changeset, flushed)) => {
                // Remote merges' entries this transaction made stale: never to be written.
                if !self.merged_pending.is_empty() {
                    for entry in &self.stale_entries_open {
                        self.merged_pending.remove(entry);
                    }
                }
                if flushed {
                    self.index_pending.clear();
                    self.index_open.clear();
                    self.stale_entries.clear();
                    self.stale_entries_open.clear();
                } else {
                    self.index_pending.append(&mut self.index_open);
                    self.stale_entries.append(&mut self.stale_entries_open);
                }
                // Drained, not taken: the vector's room serves the next transaction.
                for (table_ord, pk, clock) in self.clock_cache_open.drain(..) {
                    self.clock_cache.put(table_ord, pk, clock);
                }
                self.capture.recycle(writes);
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
                self.index_open.clear();
                self.clock_cache_open.clear();
                Err(e)
            }
        }
    }

    /// Writes the deferred changes-index work of committed local writes and of the open
    /// transaction, inside it (the caller forgets it once it commits): the entries of new
    /// origins, less those already superseded again, and the deletes of stale entries, less
    /// those never written; then clears the unindexed mark.
    fn write_deferred_entries(&mut self) -> Result<(), StoreError> {
        // Hashed with foldhash: with SipHash these sets were 4% of a ten-row update.
        let stale: FastSet<&IndexEntry> = self
            .stale_entries
            .iter()
            .chain(&self.stale_entries_open)
            .collect();
        // Only to leave out the deletes of entries never written: none to leave out if none.
        let fresh: FastSet<&IndexEntry> = if stale.is_empty() {
            FastSet::default()
        } else {
            self.index_pending.iter().chain(&self.index_open).collect()
        };
        let inserts: Vec<(SiteOrd, u64, u32, &PackedPk)> = self
            .index_pending
            .iter()
            .chain(&self.index_open)
            .filter(|e| !stale.contains(e))
            .map(|(site, version, table_ord, pk)| (*site, *version, *table_ord, pk))
            .collect();
        insert_index_entries(&mut self.statements, &inserts)?;
        for entry in stale.iter().filter(|e| !fresh.contains(*e)) {
            delete_index_entry(&mut self.statements, entry)?;
        }
        self.statements.run(Sql::ClearUnindexed)?;
        Ok(())
    }

    /// Writes the deferred changes-index entries and remote sites' versions (see
    /// `remote::VERSIONS_BATCH`) in a transaction of their own: at close, so the next open has
    /// nothing to put back or fetch again.
    pub(super) fn flush_deferred(&mut self) -> Result<(), StoreError> {
        if self.index_pending.is_empty()
            && self.stale_entries.is_empty()
            && self.versions_unsaved.is_empty()
            && self.merged_pending.is_empty()
        {
            return Ok(());
        }
        self.settle()?;
        self.statements.run(Sql::BeginImmediate)?;
        self.index_open.clear();
        self.stale_entries_open.clear();
        let book = std::mem::take(&mut self.book);
        let unsaved = std::mem::take(&mut self.versions_unsaved);
        let written = self
            .write_deferred_entries()
            .and_then(|()| {
                unsaved
                    .iter()
                    .try_for_each(|site| self.write_site_versions(&book, *site))
            })
            .and_then(|()| self.write_merged_entries())
            .and_then(|()| {
                self.statements.run(Sql::ClearUnsavedMark)?;
                Ok(self.statements.run(Sql::Commit).map(drop)?)
            });
        self.book = book;
        self.versions_unsaved = unsaved;
        match written {
            Ok(()) => {
                self.index_pending.clear();
                self.stale_entries.clear();
                self.versions_unsaved.clear();
                self.batches_unsaved = 0;
                self.merged_pending.clear();
                Ok(())
            }
            Err(e) => {
                let _ = self.writer.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// Runs one statement of a local transaction; on failure SQLite's message and whether the
    /// statement is at fault (see [`error::is_client_fault`]).
    pub(super) fn execute_user(&mut self, statement: &Statement) -> Result<usize, (String, bool)> {
        let classify = |e: rusqlite::Error| (e.to_string(), error::is_client_fault(&e));
        // The store's own cache for one statement whose parameters all resolve. Every other
        // case (several statements, none, a miscount, an unknown name, every error of
        // preparing) goes through rusqlite below, which reports it in its own words.
        if let Some(mut stmt) = self.statements.user(&statement.sql) {
            let bound = match &statement.params {
                Params::None => stmt.parameter_count() == 0,
                Params::Positional(values) => {
                    let fits = stmt.parameter_count() == values.len();
                    if fits {
                        for value in values {
                            stmt.value(value);
                        }
                    }
                    fits
                }
                Params::Named(values) => {
                    let indexes: Option<Vec<_>> = values
                        .iter()
                        .map(|(name, _)| stmt.named_index(name))
                        .collect();
                    if let Some(indexes) = &indexes {
                        // An empty map too: its statement's parameters all run as NULL.
                        stmt.by_name();
                        for (index, (_, value)) in indexes.iter().zip(values) {
                            stmt.value_at(*index, value);
                        }
                    }
                    indexes.is_some()
                }
            };
            if bound {
                if let Some(e) = stmt.binding_error() {
                    return Err((e.to_string(), true));
                }
                return stmt.execute().map_err(classify);
            }
        }
        // Not through rusqlite's statement cache: it holds the store's own statements too,
        // prepared outside user mode with the authorizer's leave, and a user statement of the
        // same text would be handed one of those and run past the authorizer. (Trimmed as
        // the cache trims, so error offsets are unchanged.)
        let mut stmt = self
            .writer
            .prepare(statement.sql.trim())
            .map_err(classify)?;
        bind(&mut stmt, &statement.params).map_err(|e| (e, true))?;
        stmt.raw_execute().map_err(classify)
    }

    /// Turns captured writes (drained) into clock rows and the changeset of this transaction.
    pub(super) fn record_local_writes(
        &mut self,
        writes: &mut Vec<capture::CapturedWrite>,
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
        // A transaction's writes mostly go to one table: looked up when the table changes.
        let mut last_table: Option<Arc<Table>> = None;
        for w in writes.drain(..) {
            let table = match &last_table {
                Some(t) if t.ord == w.table_ord => t.clone(),
                _ => {
                    let t = self.table_by_ord(w.table_ord)?.clone();
                    last_table = Some(t.clone());
                    t
                }
            };
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
                RowWrite::Update { new, old_changed } => {
                    let new_pk = table.pack_pk(&new)?;
                    // Key columns have no ordinal.
                    if old_changed
                        .iter()
                        .any(|(i, _)| matches!(table.col_ords.get(*i), Some(None)))
                    {
                        let mut old = new.clone();
                        for (i, value) in old_changed {
                            old[i] = value;
                        }
                        let old_pk = table.pack_pk(&old)?;
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
                        for (i, _) in &old_changed {
                            if let Some(Some(ord)) = table.col_ords.get(*i) {
                                row.clock.local_update(*ord, origin);
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
        let mut changes =
            Vec::with_capacity(rows.values().map(|row| 1 + row.clock.cells.len()).sum());
        let mine = |o: &Origin| o.site == origin.site && o.version == version;
        let mut last_table: Option<&Arc<Table>> = None;
        for ((table_ord, pk), row) in rows.iter_mut() {
            let table = match last_table {
                Some(t) if t.ord == *table_ord => t,
                _ => {
                    let t = self.table_by_ord(*table_ord)?;
                    last_table = Some(t);
                    t
                }
            };
            let cl = row.clock.cl;
            refuse_oversized(&table.name, "(primary key)", pk.as_bytes().len())?;
            if let Some(s) = row.clock.sentinel.as_mut().filter(|s| mine(s)) {
                s.seq = Seq(seq);
                changes.push(Change {
                    table: table.name.clone(),
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
                // Each column is visited once and the captured values serve nothing else: moved.
                let value = row
                    .values
                    .as_mut()
                    .map(|v| std::mem::replace(&mut v[idx], Value::Null))
                    .unwrap_or(Value::Null);
                let bytes = match &value {
                    Value::Text(t) => t.len(),
                    Value::Blob(b) => b.len(),
                    _ => 0,
                };
                refuse_oversized(&table.name, &table.column_names[idx], bytes)?;
                changes.push(Change {
                    table: table.name.clone(),
                    pk: pk.clone(),
                    column: Column::Name(table.column_names[idx].clone()),
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
        // one: no head to persist. Their index entries wait for a batch (`INDEX_BATCH`).
        self.write_row_clocks(&writes, IndexWrites::Deferred)?;
        drop(writes);
        self.clock_cache_open.extend(
            rows.into_iter()
                .map(|((table_ord, pk), row)| (table_ord, pk, row.clock)),
        );
        Ok(Some(Changeset::whole(
            ChangesetId {
                site: self.site,
                version,
            },
            changes,
        )))
    }

    pub(super) fn touch<'r>(
        &mut self,
        rows: &'r mut BTreeMap<(u32, PackedPk), LocalRow>,
        table: &Table,
        pk: PackedPk,
    ) -> Result<&'r mut LocalRow, StoreError> {
        use std::collections::btree_map::Entry;
        Ok(match rows.entry((table.ord, pk)) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                // Taken, not cloned: the transaction's commit puts the new clock back, and
                // after a rollback the stored one is read again.
                let clock = match self.clock_cache.take(table.ord, &e.key().1) {
                    Some(clock) => clock,
                    None => self.stored_row_clock(table.ord, &e.key().1)?,
                };
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

    /// Persists row clocks, with multi-row statements, and adds their new origins to the
    /// changes index; the entries of origins they no longer refer to are deleted. Both now or
    /// in a later batch (`index`). Returns true if an entry of this replica's own changesets
    /// was deleted now (the caller must then make sure the head is persisted, see
    /// [`Store::persist_head`]).
    pub(super) fn write_row_clocks(
        &mut self,
        rows: &[ClockWrite<'_>],
        index: IndexWrites,
    ) -> Result<bool, StoreError> {
        let mut removed_own = false;
        if index == IndexWrites::Now {
            // A remote merge: the cache must not keep the clocks it replaces.
            for row in rows {
                self.clock_cache.forget(row.table_ord, row.pk);
            }
        }
        for row in rows {
            // Raised before the write: a rollback leaves it above the stored keys, which only
            // costs reads; below them it would skip a clock that exists.
            // A table without a bound reads every clock: nothing to raise.
            if let Some(max) = self.clock_key_max.get_mut(&row.table_ord) {
                if max.as_ref().is_none_or(|max| row.pk > max) {
                    *max = Some(row.pk.clone());
                }
            }
        }
        // The statement borrows its blobs (`Bound::blob`): a chunk's blobs are encoded into
        // one buffer first (kept from one transaction to the next: taken here, put back
        // below), each row's sentinel and cells at the offsets noted, then bound from it.
        let mut blob = std::mem::take(&mut self.clock_blob);
        let mut ends = std::mem::take(&mut self.clock_blob_ends);
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            blob.clear();
            ends.clear();
            for row in chunk {
                if let Some(origin) = &row.clock.sentinel {
                    clock::encode_sentinel_into(&mut blob, origin, &self.sites);
                }
                ends.push(blob.len());
                clock::encode_cells_into(&mut blob, &row.clock.cells, &self.sites);
                ends.push(blob.len());
            }
            let mut stmt = self.statements.get(Sql::Clocks(chunk.len()))?;
            let mut start = 0;
            for (row, ends) in chunk.iter().zip(ends.chunks_exact(2)) {
                stmt.int(row.table_ord.into())
                    .blob(row.pk.as_bytes())
                    .int(row.clock.cl.get() as i64);
                if row.clock.sentinel.is_some() {
                    stmt.blob(&blob[start..ends[0]]);
                } else {
                    stmt.null();
                }
                stmt.blob(&blob[ends[0]..ends[1]]);
                start = ends[1];
            }
            stmt.execute()?;
        }
        // A statement's rows of a wide table may have grown it far; only a small one is kept.
        if blob.capacity() <= CLOCK_BLOB_KEPT_MAX {
            self.clock_blob = blob;
        }
        self.clock_blob_ends = ends;
        let (mut old, mut new) = std::mem::take(&mut self.origins_scratch);
        for row in rows {
            row.before.origins_into(&mut old);
            row.clock.origins_into(&mut new);
            for (site, version) in sorted_difference(&old, &new) {
                let entry = (
                    self.site_ord(site)?,
                    version.get(),
                    row.table_ord,
                    row.pk.clone(),
                );
                match index {
                    IndexWrites::Deferred => self.stale_entries_open.push(entry),
                    IndexWrites::Now => {
                        if *site == self.site {
                            removed_own = true;
                            // Deferred still, the entry is not in the table: the batch that
                            // would write it must leave it out (kept here until the caller
                            // commits, see `Store::apply_changesets`).
                            if self.index_pending.contains(&entry) {
                                self.stale_entries_open.push(entry.clone());
                            }
                        }
                        // Added by an earlier changeset of this batch, or an earlier batch and
                        // not written yet: no longer to be written. (Deleted below all the
                        // same, should the table hold it too.)
                        self.merged_entries_open.remove(&entry);
                        if self.merged_pending.contains(&entry) {
                            self.merged_superseded_open.push(entry.clone());
                        }
                        delete_index_entry(&mut self.statements, &entry)?;
                    }
                }
            }
            for (site, version) in sorted_difference(&new, &old) {
                let site = self.site_ord(site)?;
                match index {
                    IndexWrites::Deferred => {
                        self.index_open
                            .push((site, version.get(), row.table_ord, row.pk.clone()))
                    }
                    IndexWrites::Now => {
                        self.merged_entries_open.insert((
                            site,
                            version.get(),
                            row.table_ord,
                            row.pk.clone(),
                        ));
                    }
                }
            }
        }
        self.origins_scratch = (old, new);
        Ok(removed_own)
    }

    /// Writes, in key order, the index entries of remote merges not written yet (those of committed batches,
    /// less what the open transaction superseded, and the open batch's); the caller forgets
    /// them once it commits.
    pub(super) fn write_merged_entries(&mut self) -> Result<(), StoreError> {
        let superseded: FastSet<&IndexEntry> = self.merged_superseded_open.iter().collect();
        let mut entries: Vec<(SiteOrd, u64, u32, &PackedPk)> = self
            .merged_pending
            .iter()
            .filter(|e| !superseded.contains(e))
            .chain(&self.merged_entries_open)
            .map(|(site, version, table_ord, pk)| (*site, *version, *table_ord, pk))
            .collect();
        entries.sort_unstable();
        entries.dedup();
        insert_index_entries(&mut self.statements, &entries)?;
        Ok(())
    }

    /// Stores this replica's head. Not done per transaction: at open the head is the larger of
    /// the stored one and the highest own version in the changes index (with the entries a
    /// crash left unwritten put back first, see [`rebuild_unindexed`]), which holds every
    /// local version until a later local write supersedes it. Only a remote merge can remove the
    /// entries of the newest local version without adding a newer one, so merges call this
    /// before such a removal commits; versions are never reused.
    pub(super) fn persist_head(&mut self) -> Result<(), StoreError> {
        if self.head_persisted < self.db_version {
            let mut stmt = self.statements.get(Sql::OwnHead)?;
            stmt.int(self.db_version.get() as i64);
            stmt.execute()?;
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
        let mut register = self.statements.get(Sql::RegisterSite)?;
        register.int(ord.into()).blob(&site.0);
        register.execute()?;
        Ok(self.sites.push(site))
    }
}
/// A changes-index entry: (site ordinal, version, table ordinal, primary key).
pub(super) type IndexEntry = (SiteOrd, u64, u32, PackedPk);

/// The most capacity of the clock rows' encoding buffer kept from one write to the next (see
/// `Store::write_row_clocks`): a statement's 64 rows of a narrow table take a few KiB.
const CLOCK_BLOB_KEPT_MAX: usize = 64 * 1024;

/// Deferred changes-index work of local writes (entries to add, stale entries to delete)
/// written together, in the local transaction that brings its amount to this. Writing it in
/// each transaction put the index's B-tree pages in every commit beside the data's and the
/// clocks' (a third of a one-row write's time); a batch touches a few pages once. Until then
/// extraction takes the entries to add from memory, and a stop without a flush leaves the
/// `__patina_unindexed` mark for the next open to put them back (see `rebuild_unindexed`).
pub(super) const INDEX_BATCH: usize = 64;

/// When [`Store::write_row_clocks`] writes the changes-index entries of a transaction.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum IndexWrites {
    /// Remote merges: stale entries deleted in this transaction, new ones kept in memory and
    /// written with the sites' versions (`remote::VERSIONS_BATCH`, `Store::write_merged_entries`),
    /// in multi-row statements. The own entries they supersede that are still deferred are
    /// listed as stale, so the local batch leaves them out.
    Now,
    /// In a later batch (local writes; see [`INDEX_BATCH`]).
    Deferred,
}

/// Inserts changes-index entries with multi-row statements.
pub(super) fn insert_index_entries(
    statements: &mut Statements,
    entries: &[(SiteOrd, u64, u32, &PackedPk)],
) -> Result<(), StoreError> {
    for chunk in entries.chunks(ROWS_PER_STATEMENT) {
        let mut stmt = statements.get(Sql::IndexEntries(chunk.len()))?;
        for (site, version, table_ord, pk) in chunk {
            bind_entry(&mut stmt, *site, *version, *table_ord, pk);
        }
        stmt.execute()?;
    }
    Ok(())
}

/// Deletes one changes-index entry.
fn delete_index_entry(statements: &mut Statements, entry: &IndexEntry) -> Result<(), StoreError> {
    let (site, version, table_ord, pk) = entry;
    let mut stmt = statements.get(Sql::DeleteIndexEntry)?;
    bind_entry(&mut stmt, *site, *version, *table_ord, pk);
    stmt.execute()?;
    Ok(())
}

/// Binds a changes-index entry's four columns, in the table's order.
fn bind_entry<'s>(
    stmt: &mut Bound<'s>,
    site: SiteOrd,
    version: u64,
    table_ord: u32,
    pk: &'s PackedPk,
) {
    stmt.int(site.into())
        .int(version as i64)
        .int(table_ord.into())
        .blob(pk.as_bytes());
}

/// Puts back the changes-index entries a stop without a flush left unwritten, if the
/// `__patina_unindexed` mark says some may be missing: every origin of this replica (site
/// ordinal 0) from the marked version on that a row clock refers to. Only local writes defer
/// their entries, and they only ever add versions above the mark. Runs inside the caller's
/// transaction; reads every row clock (a crash's price, paid once at the next open). Returns
/// the entries it found (present already or put back), None if nothing was marked.
pub(super) fn rebuild_unindexed(
    conn: &Connection,
    statements: &mut Statements,
) -> Result<Option<usize>, StoreError> {
    // Databases (and backups) written before the mark existed have no such table.
    let marked: bool = conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_schema WHERE type = 'table' AND name = '__patina_unindexed'",
        [],
        |r| r.get(0),
    )?;
    if !marked {
        return Ok(None);
    }
    let since: Option<i64> = conn.query_row(
        "SELECT min(since) FROM __patina_unindexed WHERE id = 0",
        [],
        |r| r.get(0),
    )?;
    let Some(since) = since else {
        return Ok(None);
    };
    let since = since.max(0) as u64;
    let found = scan_origins(conn, |site, version| site == 0 && version >= since)?;
    let entries: Vec<(SiteOrd, u64, u32, &PackedPk)> = found
        .iter()
        .map(|(site, version, table_ord, pk)| (*site, *version, *table_ord, pk))
        .collect();
    insert_index_entries(statements, &entries)?;
    statements.run(Sql::ClearUnindexed)?;
    Ok(Some(entries.len()))
}

/// The origins every row clock holds that `wanted(site ordinal, version)` picks, as
/// changes-index entries (site, version, tbl, pk), each once. Reads every row clock: the
/// rebuilds after a crash use it.
pub(super) fn scan_origins(
    conn: &Connection,
    mut wanted: impl FnMut(u64, u64) -> bool,
) -> Result<Vec<IndexEntry>, StoreError> {
    let mut found = Vec::new();
    let mut stmt = conn.prepare("SELECT tbl, pk, sentinel, cells FROM __patina_rows")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let table_ord: u32 = row.get(0)?;
        let sentinel: Option<Vec<u8>> = row.get(2)?;
        let cells: Vec<u8> = row.get(3)?;
        let mut picked: Vec<(u64, u64)> = Vec::new();
        clock::for_each_origin(sentinel.as_deref(), &cells, |site, version| {
            if !picked.contains(&(site, version)) && wanted(site, version) {
                picked.push((site, version));
            }
        })?;
        if !picked.is_empty() {
            let pk = PackedPk::from_bytes(row.get(1)?)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            for (site, version) in picked {
                let site = SiteOrd::try_from(site)
                    .map_err(|_| StoreError::Corrupt(format!("site ordinal {site}")))?;
                found.push((site, version, table_ord, pk.clone()));
            }
        }
    }
    Ok(found)
}

/// The items of `a` not in `b`, both sorted and without duplicates.
fn sorted_difference<'a, T: Ord>(a: &'a [T], b: &'a [T]) -> impl Iterator<Item = &'a T> + 'a {
    let mut rest = b;
    a.iter().filter(move |item| {
        while let Some((first, tail)) = rest.split_first() {
            if first < *item {
                rest = tail;
            } else {
                break;
            }
        }
        rest.first() != Some(*item)
    })
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

/// Refuses a value, or a row's key, larger than peers decode ([`VALUE_BYTES_MAX`]): committed
/// here, it would never replicate.
fn refuse_oversized(table: &str, column: &str, bytes: usize) -> Result<(), StoreError> {
    if bytes > VALUE_BYTES_MAX {
        return Err(StoreError::ValueTooLarge {
            table: table.to_string(),
            column: column.to_string(),
            bytes,
            limit: VALUE_BYTES_MAX,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{sorted_difference, CLOCK_BLOB_KEPT_MAX};
    use crate::store::{Params, Statement, Store, StoreConfig};
    use patina_core::value::Value;

    #[test]
    fn the_clock_rows_buffer_of_a_wide_write_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let schema = dir.path().join("schema.sql");
        let columns: String = (0..500).map(|i| format!(", c{i} TEXT")).collect();
        std::fs::write(
            &schema,
            format!("CREATE TABLE wide (id INTEGER PRIMARY KEY NOT NULL{columns});"),
        )
        .unwrap();
        let mut store = Store::open(&StoreConfig {
            path: dir.path().join("db"),
            schema_paths: vec![schema],
            max_db_bytes: None,
            changeset_bytes_max: None,
            parts_bytes_max: None,
        })
        .unwrap();
        let insert = |id: i64, columns: usize| Statement {
            sql: format!(
                "INSERT INTO wide (id{}) VALUES (?1{})",
                (0..columns).map(|i| format!(", c{i}")).collect::<String>(),
                ", 'x'".repeat(columns)
            ),
            params: Params::Positional(vec![Value::Integer(id)]),
        };
        // 64 rows of 500 cells: one statement's clock rows, encoded together.
        let wide: Vec<Statement> = (0..64).map(|id| insert(id, 500)).collect();
        store.transact(&wide).unwrap();
        assert!(
            store.clock_blob.capacity() <= CLOCK_BLOB_KEPT_MAX,
            "{} bytes kept",
            store.clock_blob.capacity()
        );
        // A narrow write's buffer is kept for the next one.
        store.transact(&[insert(100, 2)]).unwrap();
        assert!(store.clock_blob.capacity() > 0);
    }

    #[test]
    fn sorted_difference_keeps_what_the_other_side_lacks() {
        let diff = |a: &[u32], b: &[u32]| sorted_difference(a, b).copied().collect::<Vec<_>>();
        assert_eq!(diff(&[1, 3, 5, 7], &[2, 3, 7, 9]), vec![1, 5]);
        assert_eq!(diff(&[2, 3, 7, 9], &[1, 3, 5, 7]), vec![2, 9]);
        assert_eq!(diff(&[1, 2], &[]), vec![1, 2]);
        assert_eq!(diff(&[], &[1, 2]), Vec::<u32>::new());
        assert_eq!(diff(&[4], &[4]), Vec::<u32>::new());
    }
}
