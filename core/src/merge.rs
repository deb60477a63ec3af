//! The merge rule (crdt-spec.md section 4), and the per-row clock it updates.
//!
//! Every replica keeps, per row, a [`RowClock`]: the causal length, which changeset set it (the
//! sentinel), and per column the version and origin of the value it holds. [`decide`] is the one
//! pure function that says what an incoming change does to such a row; [`RowClock::apply`]
//! performs it. The SQLite store, the simulator and the model all go through these two.
//!
//! Each cell's effective version is the tuple `(cl, col_version, value, origin)`, compared
//! lexicographically with the value order of [`crate::value`]; the origin starts with the author
//! site id, so ties break on the site as crdt-spec.md asks, and then on the author's version and
//! seq, which makes the order strict on any two distinct changes. Merging is "keep the max",
//! which is commutative, associative and idempotent, and the clock metadata converges as well as
//! the visible data.
//!
//! Deliberate deviation from cr-sqlite: when a row comes back to life at a higher causal length,
//! the cells of its earlier incarnation are dropped, not kept at version 0 ("zeroed"). Keeping
//! them made the result depend on whether a replica saw the tombstone in between (dropped) or
//! not (zeroed), and zeroed clocks needed a new local version to propagate through relays.
//! Every incarnation starts with a local insert that writes every column, so nothing the
//! current incarnation wrote is lost.

use std::collections::BTreeMap;

use crate::ids::{CausalLength, ColVersion, DbVersion, Seq, SiteId};
use crate::value::Value;

/// Where a clock came from: the changeset that wrote it, and the position in that changeset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Origin {
    /// Author site.
    pub site: SiteId,
    /// Author's db_version.
    pub version: DbVersion,
    /// Position in the changeset.
    pub seq: Seq,
}

/// The clock of one cell: its version at the row's current causal length, and its origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CellClock {
    /// Write counter of the column within the current causal length. 0 after a remote
    /// resurrect demoted the cell (its value predates the current incarnation of the row).
    pub col_version: ColVersion,
    /// The changeset that wrote the value.
    pub origin: Origin,
}

/// What the receiving replica holds for the row a change touches, as [`decide`] needs it.
#[derive(Debug, Clone, Copy)]
pub struct LocalRow {
    /// The row's causal length here (0 if never seen).
    pub cl: CausalLength,
    /// Origin of the sentinel that set `cl`; None when `cl` was inferred from a cell change.
    pub sentinel: Option<Origin>,
    /// For a cell change: the clock of that cell here, if any.
    pub cell: Option<(ColVersion, Origin)>,
}

/// The parts of an incoming change that [`decide`] looks at.
#[derive(Debug, Clone, Copy)]
pub struct Incoming<'a> {
    /// The row's causal length at the author.
    pub cl: CausalLength,
    /// True for the row sentinel, false for a cell.
    pub is_sentinel: bool,
    /// The cell's version (ignored for the sentinel).
    pub col_version: ColVersion,
    /// The cell's value (ignored for the sentinel).
    pub value: &'a Value,
    /// The changeset that wrote it, and the position in it.
    pub origin: Origin,
}

/// What an incoming change does to a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MergeDecision {
    /// The change loses or is already known: nothing changes, no clock, no data.
    Noop,
    /// A higher even causal length: the row is deleted and its cells dropped.
    Delete,
    /// A sentinel at the current causal length with a greater origin: only the row clock changes.
    SentinelClock,
    /// A sentinel with a higher odd causal length: the row comes (back) to life with no cells;
    /// cells of an earlier incarnation are dropped and its columns read as their defaults.
    Resurrect,
    /// A cell with a higher odd causal length: as [`MergeDecision::Resurrect`], then the cell is
    /// written.
    ResurrectWithCell,
    /// A cell that wins at the current causal length: the cell is written.
    Cell,
}

impl MergeDecision {
    /// True when the decision changes the row's data (not only its clock).
    pub fn changes_data(self) -> bool {
        !matches!(self, MergeDecision::Noop | MergeDecision::SentinelClock)
    }

    /// True when the row's data must be rebuilt from defaults (a new incarnation).
    pub fn resurrects(self) -> bool {
        matches!(
            self,
            MergeDecision::Resurrect | MergeDecision::ResurrectWithCell
        )
    }
}

/// Switches that break the merge rule on purpose, so tests (and the model) can show that the
/// proofs catch each of them. All off in production.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MergeFaults {
    /// When versions and values tie, keep the local cell instead of comparing origins
    /// (cr-sqlite's default without its site tie-break).
    pub no_site_tiebreak: bool,
    /// On a resurrect, keep the cells of the earlier incarnation at version 0 instead of
    /// dropping them (cr-sqlite's "zeroed clocks").
    pub demote_on_resurrect: bool,
}

/// The merge rule. `local_value` is asked for the local value of the cell only when the
/// versions tie; it is the only way the rule reads row data, so the store loads values lazily.
///
/// A row is an epoch (its causal length) and, for the current epoch only, a register per
/// column. Epochs compare first; within an epoch each register keeps the max of
/// `(col_version, value, origin)`, and the sentinel the max origin. That is a lexicographic
/// product of total orders and a pointwise max: merge is a join, so it is commutative,
/// associative and idempotent for any changes, and metadata converges with the data.
pub fn decide<E>(
    local: &LocalRow,
    incoming: &Incoming<'_>,
    local_value: impl FnOnce() -> Result<Value, E>,
) -> Result<MergeDecision, E> {
    decide_with_faults(local, incoming, local_value, MergeFaults::default())
}

/// [`decide`] with deliberate faults.
pub fn decide_with_faults<E>(
    local: &LocalRow,
    incoming: &Incoming<'_>,
    local_value: impl FnOnce() -> Result<Value, E>,
    faults: MergeFaults,
) -> Result<MergeDecision, E> {
    use std::cmp::Ordering::*;
    Ok(match incoming.cl.cmp(&local.cl) {
        // A change to an older incarnation: that incarnation's cells are gone everywhere.
        Less => MergeDecision::Noop,
        _ if incoming.cl.get() == 0 => MergeDecision::Noop,
        Greater if !incoming.cl.is_live() => MergeDecision::Delete,
        Greater if incoming.is_sentinel => MergeDecision::Resurrect,
        Greater => MergeDecision::ResurrectWithCell,
        Equal if incoming.is_sentinel => {
            // A sentinel inferred from a cell (None) always yields to the real one.
            let wins = match local.sentinel {
                None => true,
                Some(o) => !faults.no_site_tiebreak && incoming.origin > o,
            };
            if wins {
                MergeDecision::SentinelClock
            } else {
                MergeDecision::Noop
            }
        }
        // A cell at a tombstone's causal length: the row is deleted, cells do not exist.
        Equal if !incoming.cl.is_live() => MergeDecision::Noop,
        Equal => match local.cell {
            None => MergeDecision::Cell,
            Some((version, origin)) => {
                let mut ord = incoming.col_version.cmp(&version);
                if ord == Equal {
                    ord = incoming.value.cmp(&local_value()?);
                }
                if ord == Equal && !faults.no_site_tiebreak {
                    ord = incoming.origin.cmp(&origin);
                }
                if ord == Greater {
                    MergeDecision::Cell
                } else {
                    MergeDecision::Noop
                }
            }
        },
    })
}

/// The clock of one row: causal length, sentinel origin and per-column cell clocks.
/// `C` names a column (a name in memory, a small ordinal in the SQLite store).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RowClock<C: Ord> {
    /// Causal length (0 = never seen).
    pub cl: CausalLength,
    /// The changeset whose sentinel set `cl`; None when `cl` came from a cell change (the
    /// sentinel of that incarnation has not arrived yet) or `cl` is 0.
    pub sentinel: Option<Origin>,
    /// Cell clocks of the current incarnation. Empty whenever `cl` is even.
    pub cells: BTreeMap<C, CellClock>,
}

impl<C: Ord> Default for RowClock<C> {
    fn default() -> Self {
        RowClock {
            cl: CausalLength(0),
            sentinel: None,
            cells: BTreeMap::new(),
        }
    }
}

impl<C: Ord + Clone> RowClock<C> {
    /// The view of this row [`decide`] needs, for a change to `column` (None: the sentinel).
    pub fn local_row(&self, column: Option<&C>) -> LocalRow {
        LocalRow {
            cl: self.cl,
            sentinel: self.sentinel,
            cell: column
                .and_then(|c| self.cells.get(c))
                .map(|clk| (clk.col_version, clk.origin)),
        }
    }

    /// Merges one incoming change to `column` (None: the sentinel): decides, then applies.
    pub fn merge<E>(
        &mut self,
        column: Option<&C>,
        incoming: &Incoming<'_>,
        local_value: impl FnOnce() -> Result<Value, E>,
        faults: MergeFaults,
    ) -> Result<MergeDecision, E> {
        let decision = decide_with_faults(&self.local_row(column), incoming, local_value, faults)?;
        self.apply(decision, column, incoming, faults);
        Ok(decision)
    }

    /// Applies a decision of [`decide`] for `incoming`, a change to `column`.
    pub fn apply(
        &mut self,
        decision: MergeDecision,
        column: Option<&C>,
        incoming: &Incoming<'_>,
        faults: MergeFaults,
    ) {
        match decision {
            MergeDecision::Noop => {}
            MergeDecision::Delete => {
                self.cl = incoming.cl;
                self.sentinel = Some(incoming.origin);
                self.cells.clear();
            }
            MergeDecision::SentinelClock => self.sentinel = Some(incoming.origin),
            MergeDecision::Resurrect | MergeDecision::ResurrectWithCell => {
                self.cl = incoming.cl;
                self.sentinel = (decision == MergeDecision::Resurrect).then_some(incoming.origin);
                if faults.demote_on_resurrect {
                    for clock in self.cells.values_mut() {
                        clock.col_version = ColVersion(0);
                    }
                } else {
                    self.cells.clear();
                }
                if decision == MergeDecision::ResurrectWithCell {
                    self.set_cell(column, incoming);
                }
            }
            MergeDecision::Cell => self.set_cell(column, incoming),
        }
    }

    fn set_cell(&mut self, column: Option<&C>, incoming: &Incoming<'_>) {
        if let Some(c) = column {
            self.cells.insert(
                c.clone(),
                CellClock {
                    col_version: incoming.col_version,
                    origin: incoming.origin,
                },
            );
        }
    }

    /// A local insert of the row with the given non-primary-key columns.
    pub fn local_insert(&mut self, columns: impl IntoIterator<Item = C>, origin: Origin) {
        // A new incarnation starts with no cells (replace over a live row included).
        self.cells.clear();
        self.cl = self.cl.after_local_insert();
        self.sentinel = Some(origin);
        for c in columns {
            self.bump_cell(c, origin);
        }
    }

    /// A local write of one column of a live row.
    pub fn local_update(&mut self, column: C, origin: Origin) {
        self.bump_cell(column, origin);
    }

    fn bump_cell(&mut self, column: C, origin: Origin) {
        let clock = self.cells.entry(column).or_insert(CellClock {
            col_version: ColVersion(0),
            origin,
        });
        clock.col_version = ColVersion(clock.col_version.get() + 1);
        clock.origin = origin;
    }

    /// A local delete of a live row.
    pub fn local_delete(&mut self, origin: Origin) {
        self.cl = self.cl.after_local_delete();
        self.sentinel = Some(origin);
        self.cells.clear();
    }

    /// Every origin this row's clocks refer to (sentinel and cells), deduplicated.
    pub fn origins(&self) -> std::collections::BTreeSet<(SiteId, DbVersion)> {
        self.sentinel
            .iter()
            .chain(self.cells.values().map(|c| &c.origin))
            .map(|o| (o.site, o.version))
            .collect()
    }

    /// [`RowClock::origins`] into `out` (cleared first), sorted: no allocation once `out` has
    /// room, for the write path that compares a row's clock before and after.
    pub fn origins_into(&self, out: &mut Vec<(SiteId, DbVersion)>) {
        out.clear();
        out.extend(
            self.sentinel
                .iter()
                .chain(self.cells.values().map(|c| &c.origin))
                .map(|o| (o.site, o.version)),
        );
        out.sort_unstable();
        out.dedup();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    const A: SiteId = SiteId([1; 16]);
    const B: SiteId = SiteId([2; 16]);

    fn origin(site: SiteId) -> Origin {
        Origin {
            site,
            version: DbVersion(1),
            seq: Seq(0),
        }
    }

    fn cell(cl: u64, ver: u64, value: &Value, site: SiteId) -> Incoming<'_> {
        Incoming {
            cl: CausalLength(cl),
            is_sentinel: false,
            col_version: ColVersion(ver),
            value,
            origin: origin(site),
        }
    }

    fn sentinel(cl: u64, site: SiteId) -> Incoming<'static> {
        Incoming {
            cl: CausalLength(cl),
            is_sentinel: true,
            col_version: ColVersion(cl),
            value: &Value::Null,
            origin: origin(site),
        }
    }

    fn run(local: LocalRow, incoming: Incoming<'_>, value: Value) -> MergeDecision {
        decide::<Infallible>(&local, &incoming, || Ok(value)).unwrap()
    }

    fn live(cl: u64, cell: Option<(u64, SiteId)>) -> LocalRow {
        LocalRow {
            cl: CausalLength(cl),
            sentinel: Some(origin(A)),
            cell: cell.map(|(v, s)| (ColVersion(v), origin(s))),
        }
    }

    #[test]
    fn higher_version_wins_lower_loses() {
        let v = Value::from(1);
        assert_eq!(
            run(live(1, Some((1, A))), cell(1, 2, &v, A), Value::Null),
            MergeDecision::Cell
        );
        assert_eq!(
            run(live(1, Some((3, A))), cell(1, 2, &v, B), Value::Null),
            MergeDecision::Noop
        );
    }

    #[test]
    fn ties_break_on_value_then_site() {
        let big = Value::from(9);
        let small = Value::from(1);
        assert_eq!(
            run(live(1, Some((2, B))), cell(1, 2, &big, A), small.clone()),
            MergeDecision::Cell
        );
        assert_eq!(
            run(live(1, Some((2, A))), cell(1, 2, &small, B), big),
            MergeDecision::Noop
        );
        // Same version, same value: the greater site wins, so metadata converges too.
        assert_eq!(
            run(live(1, Some((2, A))), cell(1, 2, &small, B), small.clone()),
            MergeDecision::Cell
        );
        assert_eq!(
            run(live(1, Some((2, B))), cell(1, 2, &small, A), small.clone()),
            MergeDecision::Noop
        );
        // The identical change again is a no-op (idempotence).
        assert_eq!(
            run(live(1, Some((2, B))), cell(1, 2, &small, B), small.clone()),
            MergeDecision::Noop
        );
    }

    #[test]
    fn causal_length_rules() {
        let v = Value::from(1);
        // Lower cl loses whatever the version.
        assert_eq!(
            run(live(3, None), cell(1, 99, &v, B), Value::Null),
            MergeDecision::Noop
        );
        // Higher even cl deletes.
        assert_eq!(
            run(live(1, Some((5, A))), sentinel(2, A), Value::Null),
            MergeDecision::Delete
        );
        // Higher odd cl resurrects.
        assert_eq!(
            run(live(2, None), sentinel(3, A), Value::Null),
            MergeDecision::Resurrect
        );
        assert_eq!(
            run(live(2, None), cell(3, 1, &v, A), Value::Null),
            MergeDecision::ResurrectWithCell
        );
        // First sight of a row is a resurrect from cl 0.
        let unknown = LocalRow {
            cl: CausalLength(0),
            sentinel: None,
            cell: None,
        };
        assert_eq!(
            run(unknown, cell(1, 1, &v, A), Value::Null),
            MergeDecision::ResurrectWithCell
        );
        // A cell at a tombstone's cl does nothing.
        assert_eq!(
            run(live(2, None), cell(2, 1, &v, B), Value::Null),
            MergeDecision::Noop
        );
        // cl 0 is never valid and never applies.
        assert_eq!(
            run(unknown, sentinel(0, B), Value::Null),
            MergeDecision::Noop
        );
    }

    #[test]
    fn equal_sentinels_tie_break_on_origin() {
        assert_eq!(
            run(live(2, None), sentinel(2, B), Value::Null),
            MergeDecision::SentinelClock
        );
        assert_eq!(
            run(live(2, None), sentinel(2, A), Value::Null),
            MergeDecision::Noop
        );
        let inferred = LocalRow {
            cl: CausalLength(1),
            sentinel: None,
            cell: None,
        };
        assert_eq!(
            run(inferred, sentinel(1, A), Value::Null),
            MergeDecision::SentinelClock
        );
    }

    #[test]
    fn resurrect_drops_cells_and_delete_clears_them() {
        let mut row: RowClock<&str> = RowClock::default();
        row.local_insert(["a", "b"], origin(A));
        assert_eq!(row.cl, CausalLength(1));
        row.local_update("a", origin(A));
        assert_eq!(row.cells["a"].col_version, ColVersion(2));
        let v = Value::from(1);
        let d = row.merge::<Infallible>(
            Some(&"b"),
            &cell(3, 1, &v, B),
            || Ok(Value::Null),
            MergeFaults::default(),
        );
        assert_eq!(d, Ok(MergeDecision::ResurrectWithCell));
        assert_eq!(row.cl, CausalLength(3));
        assert_eq!(row.sentinel, None);
        assert!(!row.cells.contains_key("a"));
        assert_eq!(row.cells["b"].col_version, ColVersion(1));
        row.local_delete(origin(A));
        assert_eq!(row.cl, CausalLength(4));
        assert!(row.cells.is_empty());
        row.local_insert(["a"], origin(A));
        assert_eq!(row.cl, CausalLength(5));
        assert_eq!(row.cells["a"].col_version, ColVersion(1));
    }
}
