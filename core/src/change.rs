//! Changes and changesets: what a transaction did, in the form that is broadcast, synced and
//! merged.

use std::sync::Arc;

use crate::ids::{CausalLength, ColVersion, DbVersion, Seq, SiteId};
use crate::pk::PackedPk;
use crate::value::Value;

/// Which part of a row a change is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Column {
    /// The row itself: its causal length (insert, delete, re-insert). Carries no value.
    Sentinel,
    /// One non-primary-key column, by name (shared: every change of a column names it).
    Name(Arc<str>),
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
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Change {
    /// Table name (shared: a changeset's changes name a handful of tables, each many times).
    pub table: Arc<str>,
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

/// The seqs a changeset (or a part of one) covers: `start..=end` of a changeset whose changes
/// end at seq `last`. A part vouches for its whole span: a seq in the span without a change is
/// one the sender no longer serves (overwritten), not one still to come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeqSpan {
    /// First seq covered.
    pub start: Seq,
    /// Last seq covered.
    pub end: Seq,
    /// The changeset's last seq.
    pub last: Seq,
}

impl SeqSpan {
    /// The span of a whole changeset whose last seq is `last`.
    pub fn whole(last: Seq) -> SeqSpan {
        SeqSpan {
            start: Seq(0),
            end: last,
            last,
        }
    }

    /// True when the span covers the whole changeset.
    pub fn is_whole(&self) -> bool {
        self.start.get() == 0 && self.end == self.last
    }

    /// True when `start <= end <= last`.
    pub fn is_valid(&self) -> bool {
        self.start <= self.end && self.end <= self.last
    }

    /// True when `seq` is inside the span.
    pub fn contains(&self, seq: Seq) -> bool {
        self.start <= seq && seq <= self.end
    }
}

/// Identity of one part of a changeset, as broadcast deduplicates it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PartId {
    /// The changeset.
    pub id: ChangesetId,
    /// The part's first seq (0 for a whole changeset).
    pub start: Seq,
}

/// All changes of one transaction, the unit of bookkeeping; a large one travels in parts (see
/// [`crate::chunk`]), each a `Changeset` whose span covers part of the seqs.
///
/// A changeset read back later may hold fewer changes than were written: cells overwritten by a
/// later write are no longer served. A whole one with no changes at all is a "cleared" marker:
/// the version exists, and everything it wrote has been overwritten.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Changeset {
    /// Author and version.
    pub id: ChangesetId,
    /// The seqs this message covers.
    pub span: SeqSpan,
    /// The changes, ordered by seq, each inside `span`.
    pub changes: Vec<Change>,
    /// When the author committed it, by the author's wall clock, if known.
    pub committed_at: CommitTime,
}

/// When a changeset's author committed it: milliseconds since the Unix epoch on the author's
/// wall clock, 0 when unknown (a changeset read back from storage by sync). It only measures
/// replication lag: clocks of different hosts disagree, so it never decides anything, and it
/// is no part of a changeset's identity: two changesets that differ only in it are equal,
/// hash and order alike.
#[derive(Debug, Clone, Copy, Default)]
pub struct CommitTime(pub u64);

impl CommitTime {
    /// Whether the time is known.
    pub fn is_known(self) -> bool {
        self.0 != 0
    }
}

impl PartialEq for CommitTime {
    fn eq(&self, _: &CommitTime) -> bool {
        true
    }
}

impl Eq for CommitTime {}

impl PartialOrd for CommitTime {
    fn partial_cmp(&self, other: &CommitTime) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for CommitTime {
    fn cmp(&self, _: &CommitTime) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}

impl std::hash::Hash for CommitTime {
    fn hash<H: std::hash::Hasher>(&self, _: &mut H) {}
}

impl Changeset {
    /// A whole changeset of `changes` (ordered by seq); its span ends at the highest seq.
    pub fn whole(id: ChangesetId, changes: Vec<Change>) -> Changeset {
        let last = changes.iter().map(|c| c.seq).max().unwrap_or(Seq(0));
        Changeset {
            id,
            span: SeqSpan::whole(last),
            changes,
            committed_at: CommitTime::default(),
        }
    }

    /// True when this covers the whole changeset (not one part of it).
    pub fn is_whole(&self) -> bool {
        self.span.is_whole()
    }

    /// True when the whole changeset carries no changes (every write in it was overwritten).
    pub fn is_cleared(&self) -> bool {
        self.is_whole() && self.changes.is_empty()
    }

    /// The identity broadcast uses for this message.
    pub fn part_id(&self) -> PartId {
        PartId {
            id: self.id,
            start: self.span.start,
        }
    }

    /// The rows this changeset touches, in (table, key) order: deleted when it carries an even
    /// causal length for the row, upserted otherwise.
    pub fn rows(&self) -> Vec<RowChange> {
        let mut rows: std::collections::BTreeMap<(&str, &PackedPk), bool> =
            std::collections::BTreeMap::new();
        for change in &self.changes {
            let deleted = rows.entry((&*change.table, &change.pk)).or_insert(false);
            *deleted |= change.column == Column::Sentinel && !change.cl.is_live();
        }
        rows.into_iter()
            .map(|((table, pk), deleted)| RowChange {
                table: table.into(),
                pk: pk.clone(),
                deleted,
            })
            .collect()
    }
}

/// A row whose data a commit changed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RowChange {
    /// Table name (shared with the changes that name it).
    pub table: Arc<str>,
    /// Primary key.
    pub pk: PackedPk,
    /// True if the row is now deleted; false if inserted or updated.
    pub deleted: bool,
}
