//! The merge rule (crdt-spec.md section 4), and the per-row clock it updates.
//!
//! Every replica keeps, per row, a [`RowClock`]: the causal length, which changeset set it (the
//! sentinel), and per column the version and origin of the value it holds. [`decide`] is the one
//! pure function that says what an incoming change does to such a row; [`RowClock::apply`]
//! performs it. The SQLite store, the simulator and the model all go through these two.
//!
//! Each cell's effective version is the tuple `(cl, col_version, value, site)`, compared
//! lexicographically with the value order of [`crate::value`]. It is a total order, so merging is
//! "keep the max", which is commutative, associative and idempotent, and because the site id is
//! always the last tie-break the clock metadata converges as well as the visible data.

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
    /// Author of the sentinel that set `cl`; None when `cl` was inferred from a cell change.
    pub sentinel_site: Option<SiteId>,
    /// For a cell change: the clock of that cell here, if any.
    pub cell: Option<(ColVersion, SiteId)>,
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
    /// Author site.
    pub site: SiteId,
}

/// What an incoming change does to a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MergeDecision {
    /// The change loses or is already known: nothing changes, no clock, no data.
    Noop,
    /// A higher even causal length: the row is deleted and its cells dropped.
    Delete,
    /// A sentinel at the current causal length from a greater site: only the row clock changes.
    SentinelClock,
    /// A sentinel with a higher odd causal length: the row comes (back) to life, cells held from
    /// an earlier incarnation are demoted to version 0.
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
}

/// Switches that break the merge rule on purpose, so tests can show that the proofs catch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MergeFaults {
    /// Do not compare site ids when versions and values tie (cr-sqlite's default).
    pub no_site_tiebreak: bool,
    /// Do not compare values when versions tie.
    pub no_value_tiebreak: bool,
}

/// The merge rule. `local_value` is asked for the local value of the cell only when the versions
/// tie; it is the only way the rule reads row data, so the store loads values lazily.
pub fn decide<E>(
    local: &LocalRow,
    incoming: &Incoming<'_>,
    local_value: impl FnOnce() -> Result<Value, E>,
) -> Result<MergeDecision, E> {
    decide_with_faults(local, incoming, local_value, MergeFaults::default())
}

/// [`decide`] with deliberate faults, for tests that show a broken rule is caught.
pub fn decide_with_faults<E>(
    local: &LocalRow,
    incoming: &Incoming<'_>,
    local_value: impl FnOnce() -> Result<Value, E>,
    faults: MergeFaults,
) -> Result<MergeDecision, E> {
    use std::cmp::Ordering::*;
    // A sentinel inferred from a cell (None) always yields to the real one.
    let sentinel_wins = || match local.sentinel_site {
        None => true,
        Some(site) => !faults.no_site_tiebreak && incoming.site > site,
    };
    Ok(match incoming.cl.cmp(&local.cl) {
        Less => MergeDecision::Noop,
        _ if incoming.cl.get() == 0 => MergeDecision::Noop,
        Greater if !incoming.cl.is_live() => MergeDecision::Delete,
        Greater if incoming.is_sentinel => MergeDecision::Resurrect,
        Greater => MergeDecision::ResurrectWithCell,
        Equal if incoming.is_sentinel => {
            if sentinel_wins() {
                MergeDecision::SentinelClock
            } else {
                MergeDecision::Noop
            }
        }
        // A cell at a tombstone's causal length: the row is deleted, cells do not exist.
        Equal if !incoming.cl.is_live() => MergeDecision::Noop,
        Equal => match local.cell {
            None => MergeDecision::Cell,
            Some((version, site)) => {
                let by_version = incoming.col_version.cmp(&version);
                let ord = if by_version != Equal || faults.no_value_tiebreak {
                    by_version
                } else {
                    incoming.value.cmp(&local_value()?)
                };
                let ord = if ord == Equal && !faults.no_site_tiebreak {
                    incoming.site.cmp(&site)
                } else {
                    ord
                };
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
    /// Cell clocks. Empty whenever `cl` is even.
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
            sentinel_site: self.sentinel.map(|o| o.site),
            cell: column
                .and_then(|c| self.cells.get(c))
                .map(|clk| (clk.col_version, clk.origin.site)),
        }
    }

    /// Applies a decision of [`decide`] for a change to `column` (None: the sentinel) with the
    /// given causal length, version and origin.
    pub fn apply(
        &mut self,
        decision: MergeDecision,
        column: Option<&C>,
        cl: CausalLength,
        col_version: ColVersion,
        origin: Origin,
    ) {
        match decision {
            MergeDecision::Noop => {}
            MergeDecision::Delete => {
                self.cl = cl;
                self.sentinel = Some(origin);
                self.cells.clear();
            }
            MergeDecision::SentinelClock => self.sentinel = Some(origin),
            MergeDecision::Resurrect | MergeDecision::ResurrectWithCell => {
                self.cl = cl;
                self.sentinel = (decision == MergeDecision::Resurrect).then_some(origin);
                for clock in self.cells.values_mut() {
                    clock.col_version = ColVersion(0);
                }
                if decision == MergeDecision::ResurrectWithCell {
                    self.set_cell(column, col_version, origin);
                }
            }
            MergeDecision::Cell => self.set_cell(column, col_version, origin),
        }
    }

    fn set_cell(&mut self, column: Option<&C>, col_version: ColVersion, origin: Origin) {
        if let Some(c) = column {
            self.cells.insert(
                c.clone(),
                CellClock {
                    col_version,
                    origin,
                },
            );
        }
    }

    /// A local insert of the row with the given non-primary-key columns.
    pub fn local_insert(&mut self, columns: impl IntoIterator<Item = C>, origin: Origin) {
        if self.cl.is_live() {
            // Replace over a live row: the old incarnation's cells are gone.
            self.cells.clear();
        }
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

    fn cell<'a>(cl: u64, ver: u64, value: &'a Value, site: SiteId) -> Incoming<'a> {
        Incoming {
            cl: CausalLength(cl),
            is_sentinel: false,
            col_version: ColVersion(ver),
            value,
            site,
        }
    }

    fn sentinel(cl: u64, site: SiteId) -> Incoming<'static> {
        Incoming {
            cl: CausalLength(cl),
            is_sentinel: true,
            col_version: ColVersion(cl),
            value: &Value::Null,
            site,
        }
    }

    fn run(local: LocalRow, incoming: Incoming<'_>, value: Value) -> MergeDecision {
        decide::<Infallible>(&local, &incoming, || Ok(value)).unwrap()
    }

    fn live(cl: u64, cell: Option<(u64, SiteId)>) -> LocalRow {
        LocalRow {
            cl: CausalLength(cl),
            sentinel_site: Some(A),
            cell: cell.map(|(v, s)| (ColVersion(v), s)),
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
        assert_eq!(
            run(
                LocalRow {
                    cl: CausalLength(0),
                    sentinel_site: None,
                    cell: None
                },
                cell(1, 1, &v, A),
                Value::Null
            ),
            MergeDecision::ResurrectWithCell
        );
        // A cell at a tombstone's cl does nothing.
        assert_eq!(
            run(live(2, None), cell(2, 1, &v, B), Value::Null),
            MergeDecision::Noop
        );
        // cl 0 is never valid and never applies.
        assert_eq!(
            run(live(0, None), sentinel(0, B), Value::Null),
            MergeDecision::Noop
        );
    }

    #[test]
    fn equal_sentinels_tie_break_on_site() {
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
            sentinel_site: None,
            cell: None,
        };
        assert_eq!(
            run(inferred, sentinel(1, A), Value::Null),
            MergeDecision::SentinelClock
        );
    }

    #[test]
    fn resurrect_demotes_cells_and_delete_clears_them() {
        let mut row: RowClock<&str> = RowClock::default();
        row.local_insert(["a", "b"], origin(A));
        assert_eq!(row.cl, CausalLength(1));
        row.local_update("a", origin(A));
        assert_eq!(row.cells["a"].col_version, ColVersion(2));
        row.apply(
            MergeDecision::ResurrectWithCell,
            Some(&"b"),
            CausalLength(3),
            ColVersion(1),
            origin(B),
        );
        assert_eq!(row.cl, CausalLength(3));
        assert_eq!(row.sentinel, None);
        assert_eq!(row.cells["a"].col_version, ColVersion(0));
        assert_eq!(row.cells["b"].col_version, ColVersion(1));
        row.local_delete(origin(A));
        assert_eq!(row.cl, CausalLength(4));
        assert!(row.cells.is_empty());
        row.local_insert(["a"], origin(A));
        assert_eq!(row.cl, CausalLength(5));
        assert_eq!(row.cells["a"].col_version, ColVersion(1));
    }
}
