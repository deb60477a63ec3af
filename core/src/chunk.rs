//! Large changesets in parts: split by seq so that every part fits one message, and reassembled
//! before anything is applied, so a transaction still applies all at once.
//!
//! A part covers a span of seqs (see [`SeqSpan`]); the spans of the parts of one split tile
//! `0..=last`. Parts may come from different senders, or from extractions made at different
//! times: a sender no longer serves cells that were overwritten, so two parts can disagree on
//! `last` (a later extraction ends earlier). A changeset is complete once its parts cover
//! `0..=min(last)`: every seq past the smallest `last` was overwritten at some replica by a write
//! that will reach this one too, so leaving it out changes no outcome.

use std::collections::BTreeMap;

use crate::change::{Change, Changeset, ChangesetId, SeqSpan};
use crate::ids::Seq;
use crate::versions::RangeSet;

/// Bytes a change may take in a part, counted generously (names are repeated per change).
pub fn change_bytes_estimate(change: &Change) -> usize {
    let value = match &change.value {
        crate::value::Value::Text(t) => t.len(),
        crate::value::Value::Blob(b) => b.len(),
        _ => 9,
    };
    change.table.len()
        + change.pk.as_bytes().len()
        + change.column.name().map_or(0, str::len)
        + value
        + 48
}

/// Bytes a part takes beyond its changes, counted generously.
const PART_HEADER_BYTES: usize = 64;

/// An upper bound on the encoded size of a changeset, as [`split`] counts it.
pub fn estimate_bytes(changeset: &Changeset) -> usize {
    PART_HEADER_BYTES
        + changeset
            .changes
            .iter()
            .map(change_bytes_estimate)
            .sum::<usize>()
}

/// Splits a changeset into parts of at most about `bytes_max` encoded bytes each (a single change
/// larger than that gets a part of its own). A changeset that fits is returned whole.
pub fn split(changeset: &Changeset, bytes_max: usize) -> Vec<Changeset> {
    let header = PART_HEADER_BYTES;
    if estimate_bytes(changeset) <= bytes_max {
        return vec![changeset.clone()];
    }
    let mut parts = Vec::new();
    let mut current: Vec<Change> = Vec::new();
    let mut current_bytes = header;
    let mut start = changeset.span.start;
    for change in &changeset.changes {
        let bytes = change_bytes_estimate(change);
        if !current.is_empty() && current_bytes + bytes > bytes_max {
            let end = current.last().map(|c| c.seq).unwrap_or(start);
            parts.push(Changeset {
                id: changeset.id,
                span: SeqSpan {
                    start,
                    end,
                    last: changeset.span.last,
                },
                changes: std::mem::take(&mut current),
                committed_at: changeset.committed_at,
            });
            start = Seq(end.get() + 1);
            current_bytes = header;
        }
        current_bytes += bytes;
        current.push(change.clone());
    }
    parts.push(Changeset {
        id: changeset.id,
        span: SeqSpan {
            start,
            end: changeset.span.end,
            last: changeset.span.last,
        },
        changes: current,
        committed_at: changeset.committed_at,
    });
    parts
}

/// The parts of one changeset received so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Partial {
    covered: RangeSet,
    last: Option<Seq>,
    changes: BTreeMap<Seq, Change>,
    committed_at: crate::change::CommitTime,
}

impl Partial {
    /// Nothing received yet.
    pub fn new() -> Partial {
        Partial::default()
    }

    /// Records that a part with `span` arrived (without keeping its changes: the store keeps
    /// those itself). Returns false if the span added nothing new.
    pub fn cover(&mut self, span: SeqSpan) -> bool {
        let last = self.last.map_or(span.last, |l| l.min(span.last));
        let grew = self.last != Some(last)
            || !self
                .covered
                .gaps(u64::from(span.start.get()), u64::from(span.end.get()))
                .is_empty();
        self.last = Some(last);
        self.covered
            .insert_range(u64::from(span.start.get()), u64::from(span.end.get()));
        grew
    }

    /// Adds a part of the changeset, changes and all. Returns false if it added nothing new.
    pub fn add(&mut self, part: &Changeset) -> bool {
        let grew = self.cover(part.span);
        if part.committed_at.is_known() {
            self.committed_at = part.committed_at;
        }
        for change in &part.changes {
            self.changes
                .entry(change.seq)
                .or_insert_with(|| change.clone());
        }
        grew
    }

    /// True once the parts cover every seq up to the smallest `last` heard.
    pub fn is_complete(&self) -> bool {
        self.last
            .is_some_and(|last| self.covered.gaps(0, u64::from(last.get())).is_empty())
    }

    /// The whole changeset, once complete (None before).
    pub fn assemble(self, id: ChangesetId) -> Option<Changeset> {
        if !self.is_complete() {
            return None;
        }
        let last = self.last?;
        let changes: Vec<Change> = self
            .changes
            .into_values()
            .filter(|c| c.seq <= last)
            .collect();
        Some(Changeset {
            id,
            span: SeqSpan::whole(last),
            changes,
            committed_at: self.committed_at,
        })
    }
}

/// An in-memory reassembly buffer with a bound on the changesets it holds in parts, for replicas
/// without a database (the simulator, the model). The store keeps its parts in SQLite instead.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reassembly {
    partials: BTreeMap<ChangesetId, Partial>,
    partials_max: usize,
}

/// What one part did to the buffer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PartOutcome {
    /// The changeset is complete: apply it.
    Complete(Changeset),
    /// Kept, waiting for more parts.
    Buffered,
    /// Nothing new, or no room: dropped (sync will bring it again).
    Dropped,
}

impl Reassembly {
    /// An empty buffer holding at most `partials_max` incomplete changesets.
    pub fn new(partials_max: usize) -> Reassembly {
        Reassembly {
            partials: BTreeMap::new(),
            partials_max,
        }
    }

    /// Adds a part (a whole changeset passes straight through).
    pub fn add(&mut self, part: &Changeset) -> PartOutcome {
        let outcome = self.add_part(part);
        debug_assert!(
            self.partials.len() <= self.partials_max
                && self.partials.values().all(|p| !p.is_complete()),
            "the parts buffer lost its bound or kept a complete changeset"
        );
        outcome
    }

    fn add_part(&mut self, part: &Changeset) -> PartOutcome {
        if part.is_whole() {
            self.partials.remove(&part.id);
            return PartOutcome::Complete(part.clone());
        }
        if !self.partials.contains_key(&part.id) && self.partials.len() >= self.partials_max {
            return PartOutcome::Dropped;
        }
        let partial = self.partials.entry(part.id).or_default();
        if !partial.add(part) {
            return PartOutcome::Dropped;
        }
        if partial.is_complete() {
            let partial = self.partials.remove(&part.id).unwrap_or_default();
            return match partial.assemble(part.id) {
                Some(whole) => PartOutcome::Complete(whole),
                None => PartOutcome::Dropped,
            };
        }
        PartOutcome::Buffered
    }

    /// Forgets the parts of a changeset that arrived whole by another path.
    pub fn forget(&mut self, id: &ChangesetId) {
        self.partials.remove(id);
    }

    /// Changesets held in parts.
    pub fn len(&self) -> usize {
        self.partials.len()
    }

    /// True when no changeset is held in parts.
    pub fn is_empty(&self) -> bool {
        self.partials.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::Column;
    use crate::ids::{CausalLength, ColVersion, DbVersion, SiteId};
    use crate::pk::PackedPk;
    use crate::value::Value;
    use proptest::prelude::*;

    fn changeset(n: u32, value_len: usize) -> Changeset {
        let id = ChangesetId {
            site: SiteId([1; 16]),
            version: DbVersion(3),
        };
        let changes = (0..n)
            .map(|i| Change {
                table: "t".into(),
                pk: PackedPk::pack(&[Value::Integer(i64::from(i))]).unwrap(),
                column: Column::Name("v".into()),
                value: Value::Text("x".repeat(value_len)),
                col_version: ColVersion(1),
                cl: CausalLength(1),
                seq: Seq(i),
            })
            .collect();
        Changeset::whole(id, changes)
    }

    #[test]
    fn a_small_changeset_stays_whole() {
        let cs = changeset(10, 10);
        assert_eq!(split(&cs, 1 << 20), vec![cs]);
    }

    #[test]
    fn parts_tile_the_span_and_fit_the_limit() {
        let cs = changeset(1000, 100);
        let parts = split(&cs, 8 * 1024);
        assert!(parts.len() > 10);
        let mut next = 0;
        for part in &parts {
            assert_eq!(part.span.start.get(), next);
            assert!(part.span.is_valid() && !part.is_whole());
            assert!(part.changes.iter().all(|c| part.span.contains(c.seq)));
            assert!(crate::wire::changeset_to_bytes(part).len() <= 8 * 1024);
            next = part.span.end.get() + 1;
        }
        assert_eq!(next, 1000);
    }

    #[test]
    fn a_change_larger_than_the_limit_gets_its_own_part() {
        let cs = changeset(3, 4000);
        let parts = split(&cs, 1000);
        assert_eq!(parts.len(), 3);
        assert!(parts.iter().all(|p| p.changes.len() == 1));
    }

    #[test]
    fn parts_with_a_smaller_last_complete_earlier() {
        let cs = changeset(10, 10);
        let mut partial = Partial::new();
        let mut first = cs.clone();
        first.span = SeqSpan {
            start: Seq(0),
            end: Seq(4),
            last: Seq(9),
        };
        first.changes.truncate(5);
        assert!(partial.add(&first));
        assert!(!partial.is_complete());
        // A later extraction: seqs 7..=9 were overwritten meanwhile, so it ends at 6.
        let mut second = cs.clone();
        second.span = SeqSpan {
            start: Seq(5),
            end: Seq(6),
            last: Seq(6),
        };
        second.changes = cs.changes[5..7].to_vec();
        assert!(partial.add(&second));
        let whole = partial.assemble(cs.id).unwrap();
        assert!(whole.is_whole());
        assert_eq!(whole.changes, cs.changes[..7].to_vec());
    }

    #[test]
    fn the_buffer_is_bounded() {
        let mut buffer = Reassembly::new(1);
        let a = split(&changeset(100, 100), 2048);
        let mut b = a.clone();
        for part in &mut b {
            part.id.version = DbVersion(4);
        }
        assert_eq!(buffer.add(&a[0]), PartOutcome::Buffered);
        assert_eq!(buffer.add(&b[0]), PartOutcome::Dropped);
        assert_eq!(buffer.add(&a[0]), PartOutcome::Dropped);
        assert_eq!(buffer.len(), 1);
    }

    proptest! {
        #[test]
        fn any_order_and_duplicates_reassemble_the_changeset(
            n in 1u32..200,
            value_len in 0usize..300,
            bytes_max in 200usize..4000,
            order in proptest::collection::vec(any::<prop::sample::Index>(), 0..400),
        ) {
            let cs = changeset(n, value_len);
            let parts = split(&cs, bytes_max);
            let mut buffer = Reassembly::new(4);
            let mut done = None;
            // Deliver in a random order with repeats, then everything once more.
            let picks = order.iter().map(|i| i.index(parts.len())).chain(0..parts.len());
            for i in picks {
                if let PartOutcome::Complete(whole) = buffer.add(&parts[i]) {
                    done = Some(whole);
                    break;
                }
            }
            prop_assert_eq!(done, Some(cs));
            prop_assert!(buffer.is_empty());
        }
    }
}
