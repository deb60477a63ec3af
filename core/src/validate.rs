//! Structural checks of a remote changeset that need no schema: the store adds the schema
//! checks (known table, known column, type).

use crate::change::{Changeset, Column};
use crate::value::Value;

/// A change that no honest replica could have produced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidChange {
    /// Changesets start at version 1.
    #[error("changeset version 0 is invalid")]
    ZeroVersion,
    /// Versions are SQLite integers in the store, so at most `i64::MAX`: one above would be
    /// stored as a negative number, out of every version range extraction reads, and served
    /// to peers as an empty changeset.
    #[error(
        "changeset version {version} is above the largest a store keeps ({})",
        i64::MAX
    )]
    VersionTooLarge {
        /// The version.
        version: u64,
    },
    /// Causal lengths start at 1.
    #[error("change {seq}: causal length 0")]
    ZeroCausalLength {
        /// The change's seq.
        seq: u32,
    },
    /// Cells only exist on live rows (odd causal length).
    #[error("change {seq}: cell change at even causal length {cl}")]
    CellOnDeletedRow {
        /// The change's seq.
        seq: u32,
        /// The causal length.
        cl: u64,
    },
    /// The sentinel carries no value.
    #[error("change {seq}: row sentinel with a value")]
    SentinelWithValue {
        /// The change's seq.
        seq: u32,
    },
    /// Two changes of one changeset at the same seq.
    #[error("duplicate seq {seq}")]
    DuplicateSeq {
        /// The seq.
        seq: u32,
    },
    /// Two changes of one changeset to the same cell (or sentinel) of the same row.
    #[error("change {seq}: second change to the same cell")]
    DuplicateCell {
        /// The seq of the second change.
        seq: u32,
    },
}

/// Checks the rules every change of every honest changeset follows.
pub fn validate_changeset(changeset: &Changeset) -> Result<(), InvalidChange> {
    let version = changeset.id.version.get();
    if version == 0 {
        return Err(InvalidChange::ZeroVersion);
    }
    if version > i64::MAX as u64 {
        return Err(InvalidChange::VersionTooLarge { version });
    }
    let mut seqs = std::collections::BTreeSet::new();
    let mut cells = std::collections::BTreeSet::new();
    for change in &changeset.changes {
        let seq = change.seq.get();
        if !seqs.insert(seq) {
            return Err(InvalidChange::DuplicateSeq { seq });
        }
        if !cells.insert((&change.table, &change.pk, &change.column)) {
            return Err(InvalidChange::DuplicateCell { seq });
        }
        if change.cl.get() == 0 {
            return Err(InvalidChange::ZeroCausalLength { seq });
        }
        match change.column {
            Column::Sentinel if !matches!(change.value, Value::Null) => {
                return Err(InvalidChange::SentinelWithValue { seq })
            }
            Column::Name(_) if !change.cl.is_live() => {
                return Err(InvalidChange::CellOnDeletedRow {
                    seq,
                    cl: change.cl.get(),
                })
            }
            _ => {}
        }
    }
    Ok(())
}
