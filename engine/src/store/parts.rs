//! Parts of large changesets, kept in `__patina_parts` until they cover the whole changeset (they survive a restart).

use super::*;

impl Store {
    /// Reads the coverage of the parts held in `__patina_parts` (not their bytes).
    pub(super) fn load_partials(&mut self) -> Result<(), StoreError> {
        self.partials.clear();
        self.partials_touched.clear();
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
            // Read back in key order: older runs' parts count as received before any new one.
            self.parts_received += 1;
            self.partials_touched.insert(id, self.parts_received);
            self.parts_bytes += row.get::<_, i64>(5)? as u64;
        }
        Ok(())
    }

    /// Keeps a part of a large changeset in `__patina_parts` (inside the open transaction).
    /// Returns the whole changeset, read back from its parts, once they cover it; the parts are
    /// deleted then.
    ///
    /// When the buffer is full, the parts of the changeset that received one least recently
    /// are dropped to make room (broadcast or sync brings it again), as many as needed; the
    /// part is refused only when this changeset's own parts fill the buffer. Refused instead,
    /// parts that never complete (a peer's made-up changesets, or a changeset whose other
    /// parts were lost for good) filled the buffer for good, and every large changeset after
    /// them was refused on this node, by broadcast and sync alike: both send them in parts.
    pub(super) fn buffer_part(
        &mut self,
        part: &Changeset,
    ) -> Result<Option<Changeset>, StoreError> {
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
        while self.parts_bytes + bytes.len() as u64 > self.parts_bytes_max {
            let touched = |id: &ChangesetId| self.partials_touched.get(id).copied().unwrap_or(0);
            let Some(stalest) = self
                .partials
                .keys()
                .filter(|id| **id != part.id)
                .min_by_key(|id| touched(id))
                .copied()
            else {
                return Err(StoreError::PartsBufferFull {
                    bytes: self.parts_bytes,
                    limit: self.parts_bytes_max,
                });
            };
            tracing::warn!(
                site = %stalest.site,
                version = stalest.version.get(),
                "the buffer of changesets in parts is full: dropped the parts of the one that received a part least recently (it comes again)"
            );
            self.drop_parts(stalest)?;
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
        self.parts_received += 1;
        self.partials_touched.insert(part.id, self.parts_received);
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
    pub(super) fn drop_parts(&mut self, id: ChangesetId) -> Result<(), StoreError> {
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
        self.partials_touched.remove(&id);
        Ok(())
    }

    /// Changesets held in parts, waiting for the rest, and the bytes their parts take.
    pub fn partials(&self) -> (usize, u64) {
        (self.partials.len(), self.parts_bytes)
    }
}
