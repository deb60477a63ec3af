//! Remote changesets: the store's side of the one apply rule (core::apply), merging a whole changeset, checked before any of it is written.

use super::*;

/// Remote batches whose sites' versions (head, applied, cleared) and new changes-index entries
/// stay in memory before one writes them, with its own, to `__patina_sites` and
/// `__patina_changes`. Written in every batch, they were two rows and two WAL frames of each
/// commit (a quarter of a one-changeset batch's instructions, the way broadcast delivers most
/// changesets). A crash loses at most these batches' versions and entries, together, never
/// their rows: the file's versions lag its rows, and the next open puts them back from the row
/// clocks (`Store::recover_unsaved_remote`). A clean stop writes both.
pub(super) const VERSIONS_BATCH: usize = 64;

/// Index entries of remote merges kept waiting at most (about 100 bytes each); more, and the
/// batch that brings them there writes them with the versions.
const MERGED_PENDING_MAX: usize = 4096;

impl Store {
    /// After a stop that left remote versions and index entries unwritten (the mark says so):
    /// every origin a row clock holds of a remote version the file does not count as applied
    /// was merged here, so that version is marked applied again and the entry written. Versions
    /// all of whose changes were overwritten since hold no clock; sync fetches them again.
    /// Reads every row clock (a crash's price, paid once at the next open). Returns the
    /// versions put back, None if nothing was marked.
    pub(super) fn recover_unsaved_remote(&mut self) -> Result<Option<usize>, StoreError> {
        let marked: bool = self.writer.query_row(
            "SELECT count(*) > 0 FROM __patina_unindexed WHERE id = 1",
            [],
            |r| r.get(0),
        )?;
        if !marked {
            return Ok(None);
        }
        self.statements.run(Sql::BeginImmediate)?;
        // What the book was, should the write fail: versions marked applied in memory but
        // not in the file would be served as cleared (they have no index entries).
        let book_before = self.book.clone();
        let recovered = (|| {
            let (sites, book) = (&self.sites, &self.book);
            // An ordinal too large for the site table names no site: skipped, as no version of
            // it can be marked applied.
            let found = local::scan_origins(&self.writer, |ord, version| {
                let Ok(ord) = SiteOrd::try_from(ord) else {
                    return false;
                };
                let applied = sites.site(ord).is_ok_and(|site| {
                    book.contains(ChangesetId {
                        site,
                        version: DbVersion(version),
                    })
                });
                ord != 0 && !applied
            })?;
            let entries: Vec<(SiteOrd, u64, u32, &PackedPk)> = found
                .iter()
                .map(|(ord, version, table_ord, pk)| (*ord, *version, *table_ord, pk))
                .collect();
            local::insert_index_entries(&mut self.statements, &entries)?;
            let mut book = std::mem::take(&mut self.book);
            let mut touched = BTreeSet::new();
            let mut versions = 0;
            for (ord, version, _, _) in &found {
                let site = self.sites.site(*ord)?;
                let id = ChangesetId {
                    site,
                    version: DbVersion(*version),
                };
                if book.mark_applied(id) {
                    versions += 1;
                }
                touched.insert(site);
            }
            let written = touched
                .iter()
                .try_for_each(|site| self.write_site_versions(&book, *site));
            self.book = book;
            written?;
            self.statements.run(Sql::ClearUnsavedMark)?;
            self.statements.run(Sql::Commit)?;
            Ok(versions)
        })();
        match recovered {
            Ok(versions) => Ok(Some(versions)),
            Err(e) => {
                let _ = self.writer.execute_batch("ROLLBACK");
                self.book = book_before;
                self.reload_after_rollback();
                Err(e)
            }
        }
    }

    /// Writes `site`'s versions from `book` to `__patina_sites`.
    pub(super) fn write_site_versions(
        &mut self,
        book: &Bookkeeping,
        site: SiteId,
    ) -> Result<(), StoreError> {
        let ord = self.ensure_site(site)?;
        let empty = SiteVersions::default();
        let versions = book.site(&site).unwrap_or(&empty);
        let (applied, cleared) = (
            clock::encode_ranges(&versions.applied),
            clock::encode_ranges(&versions.cleared),
        );
        let mut stmt = self.statements.get(Sql::SiteVersions)?;
        stmt.int(versions.head.get() as i64)
            .blob(&applied)
            .blob(&cleared)
            .int(ord.into());
        stmt.execute()?;
        Ok(())
    }

    /// Applies remote changesets in one SQLite transaction, each through the merge rule and each
    /// all-or-nothing (checked whole before any of it is written): a bad changeset is refused
    /// alone. Returns one outcome per changeset, in order.
    pub fn apply_changesets<C: std::borrow::Borrow<Changeset>>(
        &mut self,
        batch: &[C],
    ) -> Result<Vec<ApplyOutcome>, StoreError> {
        self.settle()?;
        self.wal.ensure_room(&self.writer)?;
        self.statements.run(Sql::BeginImmediate)?;
        self.stale_entries_open.clear();
        self.merged_entries_open.clear();
        self.merged_superseded_open.clear();
        // Worked on in place (cloning it cost 5% of a busy store thread at 300 sites): a
        // failed batch rolls back and reloads the bookkeeping from the database below.
        let mut book = std::mem::take(&mut self.book);
        // Each site's versions before the batch touched them, to restore should the batch
        // fail and reloading fail too.
        let mut before: BTreeMap<SiteId, Option<SiteVersions>> = BTreeMap::new();
        let mut touched_sites = BTreeSet::new();
        let mut outcomes = Vec::with_capacity(batch.len());
        let result = (|| {
            for changeset in batch {
                let changeset_site = changeset.borrow().id.site;
                before
                    .entry(changeset_site)
                    .or_insert_with(|| book.site(&changeset_site).cloned());
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
            // The versions and the index entries of merges go to the file together, so a
            // crash loses both or neither (see VERSIONS_BATCH); sooner when the entries
            // waiting grow large (a sync catching up), to bound their memory.
            let versions_due = self.batches_unsaved + 1 >= VERSIONS_BATCH
                || self.merged_pending.len() + self.merged_entries_open.len() >= MERGED_PENDING_MAX;
            if versions_due {
                let unsaved = std::mem::take(&mut self.versions_unsaved);
                let written = touched_sites
                    .union(&unsaved)
                    .try_for_each(|site| self.write_site_versions(&book, *site));
                self.versions_unsaved = unsaved;
                written?;
                self.write_merged_entries()?;
                self.statements.run(Sql::ClearUnsavedMark)?;
            } else if self.versions_unsaved.is_empty()
                && self.merged_pending.is_empty()
                && !touched_sites.is_empty()
            {
                // The first batch whose versions wait: a stop before they are written leaves
                // the mark for the next open (see `recover_unsaved_remote`).
                self.statements.run(Sql::SetUnsavedMark)?;
            }
            self.statements.run(Sql::Commit)?;
            Ok(versions_due)
        })();
        match result {
            Ok(versions_due) => {
                self.book = book;
                if versions_due {
                    self.versions_unsaved.clear();
                    self.batches_unsaved = 0;
                    self.merged_pending.clear();
                    self.merged_entries_open.clear();
                } else {
                    for entry in &self.merged_superseded_open {
                        self.merged_pending.remove(entry);
                    }
                    self.merged_pending.extend(self.merged_entries_open.drain());
                    if !touched_sites.is_empty() {
                        self.versions_unsaved.extend(touched_sites);
                        self.batches_unsaved += 1;
                    }
                }
                self.merged_superseded_open.clear();
                // Own entries the merges superseded: deleted already unless still deferred,
                // which the next batch sees to (see `IndexWrites::Now`).
                self.stale_entries.append(&mut self.stale_entries_open);
                Ok(outcomes)
            }
            Err(e) => {
                self.stale_entries_open.clear();
                self.merged_entries_open.clear();
                self.merged_superseded_open.clear();
                let _ = self.writer.execute_batch("ROLLBACK");
                for (site, versions) in before {
                    book.set_site(site, versions.unwrap_or_default());
                }
                self.book = book;
                self.reload_after_rollback();
                Err(e)
            }
        }
    }

    /// Merges one changeset; returns (changes won, rows changed). Every refusal
    /// (`StoreError::Change`) comes before its first write.
    pub(super) fn apply_one(
        &mut self,
        changeset: &Changeset,
    ) -> Result<(usize, Vec<RowChange>), StoreError> {
        let reject = |source: ChangeError| StoreError::Change {
            site: changeset.id.site.to_hex(),
            version: changeset.id.version.get(),
            source,
        };
        validate_changeset(changeset).map_err(|e| reject(e.into()))?;
        // Check everything against the schema before writing anything.
        let mut groups: BTreeMap<(&str, &PackedPk), RowChanges<'_>> = BTreeMap::new();
        let mut checked_key: Option<(&str, &PackedPk)> = None;
        for change in &changeset.changes {
            let table = self
                .tables
                .get(&*change.table)
                .ok_or_else(|| reject(ChangeError::UnknownTable(change.table.to_string())))?;
            // A row's changes come one after another: its key is checked once.
            let key = (&*change.table, &change.pk);
            if checked_key != Some(key) {
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
                checked_key = Some(key);
            }
            let col_ord = match &change.column {
                Column::Sentinel => None,
                Column::Name(name) => {
                    let unknown = || {
                        reject(ChangeError::UnknownColumn {
                            table: table.def.name.clone(),
                            column: name.to_string(),
                        })
                    };
                    let idx = *table.col_by_name.get(&**name).ok_or_else(unknown)?;
                    let ord = table.col_ords[idx].ok_or_else(unknown)?;
                    table.check_type(idx, &change.value).map_err(reject)?;
                    Some(ord)
                }
            };
            groups
                .entry((&*change.table, &change.pk))
                .or_default()
                .push((change, col_ord));
        }
        let site_ord = self.ensure_site(changeset.id.site)?;
        let mut changes_won = 0;
        let mut changed = Vec::new();
        let mut clock_writes: Vec<(u32, &PackedPk, RowClock<ColOrd>, RowClock<ColOrd>)> =
            Vec::new();
        for ((table_name, pk), changes) in groups {
            let table = self.tables[table_name].clone();
            let before = self.stored_row_clock(table.ord, pk)?;
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
                // Nothing changed, yet the clock may hold this very changeset: merged before
                // a crash that lost its versions and index entries (written together, see
                // VERSIONS_BATCH), it comes back by sync, and its entry must be written again.
                let id = changeset.id;
                if clock
                    .sentinel
                    .iter()
                    .chain(clock.cells.values().map(|c| &c.origin))
                    .any(|o| o.site == id.site && o.version == id.version)
                {
                    self.merged_entries_open.insert((
                        site_ord,
                        id.version.get(),
                        table.ord,
                        pk.clone(),
                    ));
                }
                continue;
            }
            if data_changed {
                changed.push(RowChange {
                    table: table.name.clone(),
                    pk: pk.clone(),
                    deleted: !clock.cl.is_live(),
                });
                if deleted || !clock.cl.is_live() {
                    delete_row(&mut self.statements, &table, &pk_values)?;
                }
                if clock.cl.is_live() && (ensure_row || !writes.is_empty()) {
                    upsert_row(
                        &self.writer,
                        &mut self.statements,
                        &table,
                        &pk_values,
                        &writes,
                    )?;
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
        if self.write_row_clocks(&writes, IndexWrites::Now)? {
            self.persist_head()?;
        }
        Ok((changes_won, changed))
    }
}

/// The SQLite store as the apply rule (`core::apply`) sees it: parts kept in `__patina_parts`,
/// each whole changeset checked, then merged, in the batch's transaction.
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
        // No savepoint around it: `apply_one` checks a changeset whole before writing any of
        // it, so a refusal leaves nothing to undo. A savepoint cost a tenth of a one-row
        // changeset's apply (SQLite journals every page the first write in it touches).
        // Should a refusal ever come after a write, the batch fails whole instead (below), and
        // its transaction rolls back: never a changeset half merged.
        let written_before = self.writer.total_changes();
        match self.apply_one(whole) {
            Ok(merged) => Ok(Ok(merged)),
            Err(e @ StoreError::Change { .. }) if self.writer.total_changes() == written_before => {
                Ok(Err(e))
            }
            Err(e) => Err(e),
        }
    }
}
