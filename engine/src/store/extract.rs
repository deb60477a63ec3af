//! Reading changesets back by version range (sync answers) and the clocks of rows (tests, tools).

use super::*;

impl Store {
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
        self.changesets_within(site, start, end, limit, usize::MAX)
    }

    /// [`Store::changesets`], stopped once the changesets read come to `bytes_max` (by
    /// [`chunk::estimate_bytes`], an upper bound of their encoding); at least one is read.
    pub fn changesets_within(
        &self,
        site: SiteId,
        start: DbVersion,
        end: DbVersion,
        limit: usize,
        bytes_max: usize,
    ) -> Result<Vec<Changeset>, StoreError> {
        self.refuse_while_reload_owed()?;
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
        // Entries not written to the index yet: of local writes (`local::INDEX_BATCH`) and of
        // remote merges (`remote::VERSIONS_BATCH`). When the query above stopped at the limit,
        // the walk below stops before the version it stopped at: every version up to it that
        // holds an entry is applied, and there are `limit` of them. So only versions whose
        // entries in the file were all read are reached, and these complete them.
        let mut from_memory = false;
        for (_, version, table_ord, pk) in self
            .index_pending
            .iter()
            .chain(&self.merged_pending)
            .filter(|(s, v, _, _)| *s == site_ord && (start.get()..=end.get()).contains(v))
        {
            from_memory = true;
            by_version
                .entry(*version)
                .or_default()
                .push((*table_ord, pk.as_bytes().to_vec()));
        }
        if from_memory {
            // In memory and in the file at once after a merge wrote an entry again.
            for rows in by_version.values_mut() {
                rows.sort_unstable();
                rows.dedup();
            }
        }
        let mut out = Vec::new();
        let mut bytes = 0usize;
        // Walk the applied versions in range, up to the limit, filling in cleared ones.
        'ranges: for (a, b) in versions.applied.iter_within(start.get(), end.get()) {
            let (a, b) = (a.max(start.get()), b.min(end.get()));
            if a > b {
                continue;
            }
            let mut v = a;
            loop {
                if out.len() >= limit || bytes >= bytes_max {
                    break 'ranges;
                }
                // Skip quickly over a long run of cleared versions is not needed: the limit bounds it.
                let changes = match by_version.remove(&v) {
                    Some(rows) => self.read_changes(site, v, &rows)?,
                    None => Vec::new(),
                };
                let changeset = Changeset::whole(
                    ChangesetId {
                        site,
                        version: DbVersion(v),
                    },
                    changes,
                );
                if bytes_max != usize::MAX {
                    bytes = bytes.saturating_add(patina_core::chunk::estimate_bytes(&changeset));
                }
                out.push(changeset);
                if v == b {
                    break;
                }
                v += 1;
            }
        }
        Ok(out)
    }

    pub(super) fn read_changes(
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
                    table: table.name.clone(),
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
                    table: table.name.clone(),
                    pk: pk.clone(),
                    column: Column::Name(table.column_names[idx].clone()),
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

    /// Every row clock of every replicated table, in a form that is equal on two replicas
    /// exactly when their clock metadata has converged: (table, pk) -> (cl, sentinel author,
    /// cells by name -> (version, author)). Local db_versions and ordinals are left out.
    pub fn clock_snapshot(
        &self,
    ) -> Result<BTreeMap<(String, PackedPk), ClockSnapshot>, StoreError> {
        self.refuse_while_reload_owed()?;
        let mut out = BTreeMap::new();
        let mut stmt = self
            .reader
            .prepare("SELECT tbl, pk, cl, sentinel, cells FROM __patina_rows")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let table = self.table_by_ord(row.get(0)?)?;
            let pk = PackedPk::from_bytes(row.get(1)?)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let clock = self.snapshot_of(table, row.get(2)?, row.get_ref(3)?, row.get_ref(4)?)?;
            out.insert((table.def.name.clone(), pk), clock);
        }
        Ok(out)
    }

    /// A stored row clock (`__patina_rows`' cl, sentinel and cells) in comparable form.
    pub(super) fn snapshot_of(
        &self,
        table: &Table,
        cl: i64,
        sentinel: rusqlite::types::ValueRef<'_>,
        cells: rusqlite::types::ValueRef<'_>,
    ) -> Result<ClockSnapshot, StoreError> {
        let not_blob = |e: rusqlite::types::FromSqlError| StoreError::Corrupt(e.to_string());
        let clock = clock::decode_row_clock(
            cl as u64,
            sentinel.as_blob_or_null().map_err(not_blob)?,
            cells.as_blob().map_err(not_blob)?,
            &self.sites,
        )?;
        Ok(ClockSnapshot {
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
        })
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
