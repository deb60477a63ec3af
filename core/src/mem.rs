//! An in-memory replica: the merge rule over plain maps, with local writes that produce
//! changesets exactly as the SQLite store does. The model checker and the simulator use it as
//! their store, and the tests use it as the reference the SQLite store must agree with.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::change::{Change, Changeset, ChangesetId, Column};
use crate::ids::{ColVersion, DbVersion, Seq, SiteId};
use crate::merge::{Incoming, MergeDecision, MergeFaults, Origin, RowClock};
use crate::pk::PackedPk;
use crate::value::Value;

/// Row key: table name and packed primary key.
pub type RowKey = (Arc<str>, PackedPk);

/// One row: its clock and the values of the cells the clock has.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct MemRow {
    /// The clock.
    pub clock: RowClock<String>,
    /// Values by column, exactly the columns of `clock.cells`.
    pub values: BTreeMap<String, Value>,
}

/// A replica held in memory.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MemReplica {
    /// This replica's site id.
    pub site: SiteId,
    /// Version of the last local write.
    pub db_version: DbVersion,
    /// Every row ever seen, tombstones included.
    pub rows: BTreeMap<RowKey, MemRow>,
    /// Deliberate faults of the merge rule (all off by default).
    pub faults: MergeFaults,
}

impl MemReplica {
    /// An empty replica.
    pub fn new(site: SiteId) -> Self {
        MemReplica {
            site,
            db_version: DbVersion(0),
            rows: BTreeMap::new(),
            faults: MergeFaults::default(),
        }
    }

    /// Merges one change of the changeset `id`; returns what the rule decided.
    pub fn apply_change(&mut self, id: ChangesetId, change: &Change) -> MergeDecision {
        let row = self
            .rows
            .entry((change.table.clone(), change.pk.clone()))
            .or_default();
        let column = change.column.name().map(str::to_owned);
        let incoming = Incoming {
            cl: change.cl,
            is_sentinel: column.is_none(),
            col_version: change.col_version,
            value: &change.value,
            origin: Origin {
                site: id.site,
                version: id.version,
                seq: change.seq,
            },
        };
        let values = &row.values;
        let decision = row
            .clock
            .merge::<std::convert::Infallible>(
                column.as_ref(),
                &incoming,
                || {
                    Ok(column
                        .as_ref()
                        .and_then(|c| values.get(c))
                        .cloned()
                        .unwrap_or(Value::Null))
                },
                self.faults,
            )
            .unwrap_or_else(|never| match never {});
        if decision == MergeDecision::Delete
            || (decision.resurrects() && !self.faults.demote_on_resurrect)
        {
            row.values.clear();
        }
        if matches!(
            decision,
            MergeDecision::Cell | MergeDecision::ResurrectWithCell
        ) {
            if let Some(c) = column {
                row.values.insert(c, change.value.clone());
            }
        }
        decision
    }

    /// Merges a whole changeset; returns how many changes won.
    pub fn apply_changeset(&mut self, changeset: &Changeset) -> usize {
        changeset
            .changes
            .iter()
            .filter(|c| self.apply_change(changeset.id, c) != MergeDecision::Noop)
            .count()
    }

    fn local_origin(&mut self) -> Origin {
        Origin {
            site: self.site,
            version: self.db_version.next(),
            seq: Seq(0),
        }
    }

    /// Inserts (or replaces) a row; `values` are its non-key columns.
    pub fn insert(
        &mut self,
        table: &str,
        pk: PackedPk,
        values: BTreeMap<String, Value>,
    ) -> Changeset {
        let origin = self.local_origin();
        let row = self.rows.entry((Arc::from(table), pk.clone())).or_default();
        row.clock.local_insert(values.keys().cloned(), origin);
        row.values = values;
        self.commit(vec![(Arc::from(table), pk)])
    }

    /// Sets one column of a live row; None if the row is not live or the value is unchanged.
    pub fn update(
        &mut self,
        table: &str,
        pk: PackedPk,
        column: &str,
        value: Value,
    ) -> Option<Changeset> {
        let origin = self.local_origin();
        let row = self.rows.get_mut(&(Arc::from(table), pk.clone()))?;
        if !row.clock.cl.is_live() || row.values.get(column) == Some(&value) {
            return None;
        }
        row.clock.local_update(column.to_owned(), origin);
        row.values.insert(column.to_owned(), value);
        Some(self.commit(vec![(Arc::from(table), pk)]))
    }

    /// Deletes a live row; None if it is not live.
    pub fn delete(&mut self, table: &str, pk: PackedPk) -> Option<Changeset> {
        let origin = self.local_origin();
        let row = self.rows.get_mut(&(Arc::from(table), pk.clone()))?;
        if !row.clock.cl.is_live() {
            return None;
        }
        row.clock.local_delete(origin);
        row.values.clear();
        Some(self.commit(vec![(Arc::from(table), pk)]))
    }

    /// Numbers this transaction's clocks in (table, key, column) order, as the SQLite store does,
    /// and returns its changeset.
    fn commit(&mut self, mut keys: Vec<RowKey>) -> Changeset {
        keys.sort();
        keys.dedup();
        let version = self.db_version.next();
        self.db_version = version;
        let id = ChangesetId {
            site: self.site,
            version,
        };
        let mut seq = 0;
        for key in &keys {
            if let Some(row) = self.rows.get_mut(key) {
                let mine = |o: &Origin| o.site == id.site && o.version == version;
                if let Some(s) = row.clock.sentinel.as_mut().filter(|s| mine(s)) {
                    s.seq = Seq(seq);
                    seq += 1;
                }
                for cell in row.clock.cells.values_mut().filter(|c| mine(&c.origin)) {
                    cell.origin.seq = Seq(seq);
                    seq += 1;
                }
            }
        }
        self.changeset(id)
    }

    /// What this replica holds of changeset `id` (its surviving changes, by seq). Empty if
    /// everything it wrote was overwritten, or if it never reached this replica.
    pub fn changeset(&self, id: ChangesetId) -> Changeset {
        let mine = |o: &Origin| o.site == id.site && o.version == id.version;
        let mut changes = Vec::new();
        for ((table, pk), row) in &self.rows {
            if let Some(s) = row.clock.sentinel.filter(|s| mine(s)) {
                changes.push(Change {
                    table: table.clone(),
                    pk: pk.clone(),
                    column: Column::Sentinel,
                    value: Value::Null,
                    col_version: ColVersion(row.clock.cl.get()),
                    cl: row.clock.cl,
                    seq: s.seq,
                });
            }
            for (col, cell) in row.clock.cells.iter().filter(|(_, c)| mine(&c.origin)) {
                changes.push(Change {
                    table: table.clone(),
                    pk: pk.clone(),
                    column: Column::Name(col.as_str().into()),
                    value: row.values.get(col).cloned().unwrap_or(Value::Null),
                    col_version: cell.col_version,
                    cl: row.clock.cl,
                    seq: cell.origin.seq,
                });
            }
        }
        changes.sort_by_key(|c| c.seq);
        Changeset::whole(id, changes)
    }

    /// True when merging `change` of changeset `id` here would change nothing: this replica
    /// holds that change, or something the merge rule ranks above it.
    pub fn dominates(&self, id: ChangesetId, change: &Change) -> bool {
        let key = (change.table.clone(), change.pk.clone());
        let mut row = MemReplica {
            site: self.site,
            db_version: self.db_version,
            rows: self
                .rows
                .get(&key)
                .map(|r| BTreeMap::from([(key.clone(), r.clone())]))
                .unwrap_or_default(),
            faults: self.faults,
        };
        row.apply_change(id, change) == MergeDecision::Noop
    }

    /// The rows a user would see: live rows and their cell values.
    pub fn visible(&self) -> BTreeMap<RowKey, BTreeMap<String, Value>> {
        self.rows
            .iter()
            .filter(|(_, r)| r.clock.cl.is_live())
            .map(|(k, r)| (k.clone(), r.values.clone()))
            .collect()
    }

    /// Every change this replica's state amounts to (its sentinels and cells, each with its
    /// origin): merging them into another replica merges this whole state.
    pub fn state_changes(&self) -> Vec<(ChangesetId, Change)> {
        let mut ids: Vec<ChangesetId> = self
            .rows
            .values()
            .flat_map(|r| r.clock.origins())
            .map(|(site, version)| ChangesetId { site, version })
            .collect();
        ids.sort();
        ids.dedup();
        ids.into_iter()
            .flat_map(|id| self.changeset(id).changes.into_iter().map(move |c| (id, c)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pk(n: i64) -> PackedPk {
        PackedPk::pack(&[Value::Integer(n)]).unwrap()
    }

    #[test]
    fn local_writes_replicate() {
        let mut a = MemReplica::new(SiteId([1; 16]));
        let mut b = MemReplica::new(SiteId([2; 16]));
        let cs1 = a.insert("t", pk(1), [("x".to_owned(), Value::from(1))].into());
        let cs2 = a.update("t", pk(1), "x", Value::from(2)).unwrap();
        assert_eq!(cs2.changes.len(), 1);
        // Version 1 is now only its sentinel: its cell was overwritten by version 2.
        assert_eq!(a.changeset(cs1.id).changes.len(), 1);
        b.apply_changeset(&cs2);
        b.apply_changeset(&cs1);
        assert_eq!(a.visible(), b.visible());
        assert_eq!(a.rows, b.rows);
        let cs3 = b.delete("t", pk(1)).unwrap();
        a.apply_changeset(&cs3);
        assert!(a.visible().is_empty());
        assert_eq!(a.rows, b.rows);
    }
}
