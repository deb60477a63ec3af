//! Changes and changesets: what a transaction did, in the form that is broadcast, synced and
//! merged.

use crate::ids::{CausalLength, ColVersion, DbVersion, Seq, SiteId};
use crate::pk::PackedPk;
use crate::value::Value;

/// Which part of a row a change is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Column {
    /// The row itself: its causal length (insert, delete, re-insert). Carries no value.
    Sentinel,
    /// One non-primary-key column, by name.
    Name(String),
}

impl Column {
    /// The column's name, or None for the sentinel.
    pub fn name(&self) -> Option<&str> {
        match self {
            Column::Sentinel => None,
            Column::Name(n) => Some(n),
        }
    }
}

/// One cell (or row sentinel) written by one changeset.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Change {
    /// Table name.
    pub table: String,
    /// The row's primary key.
    pub pk: PackedPk,
    /// The column written, or the sentinel.
    pub column: Column,
    /// The new value (NULL for the sentinel).
    pub value: Value,
    /// The cell's version within the row's causal length (the sentinel carries the causal length).
    pub col_version: ColVersion,
    /// The row's causal length when the change was read.
    pub cl: CausalLength,
    /// Position within the changeset.
    pub seq: Seq,
}

/// Global identity of a changeset: its author and the author's db_version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChangesetId {
    /// The site that committed the transaction.
    pub site: SiteId,
    /// The author's db_version of that transaction.
    pub version: DbVersion,
}

/// All changes of one transaction, the unit of broadcast, sync and bookkeeping.
///
/// A changeset read back later may hold fewer changes than were written: cells overwritten by a
/// later write are no longer served. One with no changes at all is a "cleared" marker: the
/// version exists, and everything it wrote has been overwritten.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Changeset {
    /// Author and version.
    pub id: ChangesetId,
    /// The changes, ordered by seq.
    pub changes: Vec<Change>,
}

impl Changeset {
    /// True when the changeset carries no changes (every write in it was overwritten).
    pub fn is_cleared(&self) -> bool {
        self.changes.is_empty()
    }

    /// The rows this changeset touches, in (table, key) order: deleted when it carries an even
    /// causal length for the row, upserted otherwise.
    pub fn rows(&self) -> Vec<RowChange> {
        let mut rows: std::collections::BTreeMap<(&str, &PackedPk), bool> =
            std::collections::BTreeMap::new();
        for change in &self.changes {
            let deleted = rows
                .entry((change.table.as_str(), &change.pk))
                .or_insert(false);
            *deleted |= change.column == Column::Sentinel && !change.cl.is_live();
        }
        rows.into_iter()
            .map(|((table, pk), deleted)| RowChange {
                table: table.to_owned(),
                pk: pk.clone(),
                deleted,
            })
            .collect()
    }
}

/// A row whose data a commit changed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RowChange {
    /// Table name.
    pub table: String,
    /// Primary key.
    pub pk: PackedPk,
    /// True if the row is now deleted; false if inserted or updated.
    pub deleted: bool,
}
