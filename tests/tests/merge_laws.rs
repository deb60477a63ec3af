//! The merge rule is a join: commutative, associative, idempotent, for any changes in any
//! order, and losing changes are inert. Checked on core's rule through the in-memory replica;
//! the same rule runs inside the SQLite store (see store_convergence.rs).
//!
//! Each law is also run with a deliberately broken rule, and the test asserts that proptest
//! finds a counterexample: the laws would catch a wrong merge.

use patina_core::change::{Change, ChangesetId, Column};
use patina_core::ids::{CausalLength, ColVersion, DbVersion, Seq, SiteId};
use patina_core::mem::MemReplica;
use patina_core::merge::{MergeDecision, MergeFaults};
use patina_core::pk::PackedPk;
use patina_core::value::Value;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestRunner};

type Op = (ChangesetId, Change);

/// Any valid change to one of two rows of one table with two columns: small ranges, so that
/// equal versions, equal values, equal causal lengths and equal sites all happen often.
fn arb_change() -> impl Strategy<Value = Op> {
    (
        0u8..3,
        1u64..4,
        0i64..2,
        0u8..3,
        1u64..6,
        0u64..3,
        0u8..4,
        0u32..3,
    )
        .prop_map(|(site, version, key, column, cl, ver, value, seq)| {
            let column = match column {
                0 => Column::Sentinel,
                1 => Column::Name("a".into()),
                _ => Column::Name("b".into()),
            };
            let (cl, value) = match column {
                // Sentinels carry no value; cells exist only on live rows (odd cl).
                Column::Sentinel => (cl, Value::Null),
                Column::Name(_) => (
                    cl | 1,
                    [
                        Value::Null,
                        Value::Integer(1),
                        Value::Integer(2),
                        Value::from("x"),
                    ][value as usize]
                        .clone(),
                ),
            };
            let id = ChangesetId {
                site: SiteId([site + 1; 16]),
                version: DbVersion(version),
            };
            let change = Change {
                table: "t".into(),
                pk: PackedPk::pack(&[Value::Integer(key)]).unwrap(),
                column,
                value,
                col_version: ColVersion(ver),
                cl: CausalLength(cl),
                seq: Seq(seq),
            };
            (id, change)
        })
}

fn arb_ops(max: usize) -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(arb_change(), 0..max)
}

fn replica(ops: &[Op], faults: MergeFaults) -> MemReplica {
    let mut r = MemReplica::new(SiteId([0xee; 16]));
    r.faults = faults;
    for (id, c) in ops {
        r.apply_change(*id, c);
    }
    r
}

/// `into` merged with the whole state of `from`.
fn join(into: &MemReplica, from: &MemReplica) -> MemReplica {
    let mut out = into.clone();
    for (id, c) in from.state_changes() {
        out.apply_change(id, &c);
    }
    out
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        rng_seed: RngSeed::Fixed(0x5eed_c0de),
        failure_persistence: None,
        ..Config::default()
    })
}

fn commutative(faults: MergeFaults, cases: u32) -> Result<(), String> {
    runner(cases)
        .run(&(arb_ops(8), arb_change(), arb_change()), |(base, a, b)| {
            let mut ab = replica(&base, faults);
            ab.apply_change(a.0, &a.1);
            ab.apply_change(b.0, &b.1);
            let mut ba = replica(&base, faults);
            ba.apply_change(b.0, &b.1);
            ba.apply_change(a.0, &a.1);
            prop_assert_eq!(&ab.rows, &ba.rows);
            Ok(())
        })
        .map_err(|e| e.to_string())
}

fn associative(faults: MergeFaults, cases: u32) -> Result<(), String> {
    runner(cases)
        .run(&(arb_ops(6), arb_ops(6), arb_ops(6)), |(x, y, z)| {
            let (x, y, z) = (
                replica(&x, faults),
                replica(&y, faults),
                replica(&z, faults),
            );
            let left = join(&join(&x, &y), &z);
            let right = join(&x, &join(&y, &z));
            prop_assert_eq!(&left.rows, &right.rows);
            Ok(())
        })
        .map_err(|e| e.to_string())
}

fn idempotent(faults: MergeFaults, cases: u32) -> Result<(), String> {
    runner(cases)
        .run(&(arb_ops(8), arb_change()), |(base, c)| {
            let mut once = replica(&base, faults);
            once.apply_change(c.0, &c.1);
            let mut twice = once.clone();
            let second = twice.apply_change(c.0, &c.1);
            prop_assert_eq!(second, MergeDecision::Noop);
            prop_assert_eq!(&once.rows, &twice.rows);
            // Merging a state into itself changes nothing either.
            prop_assert_eq!(&join(&once, &once).rows, &once.rows);
            Ok(())
        })
        .map_err(|e| e.to_string())
}

#[test]
fn merge_is_commutative() {
    commutative(MergeFaults::default(), 3000).unwrap();
}

#[test]
fn merge_is_associative() {
    associative(MergeFaults::default(), 1500).unwrap();
}

#[test]
fn merge_is_idempotent() {
    idempotent(MergeFaults::default(), 3000).unwrap();
}

#[test]
fn commutativity_catches_a_missing_site_tiebreak() {
    let faults = MergeFaults {
        no_site_tiebreak: true,
        ..MergeFaults::default()
    };
    let err = commutative(faults, 3000).expect_err("a rule without site tie-break must fail");
    assert!(err.contains("assertion"), "{err}");
}

#[test]
fn commutativity_catches_zeroed_cells_on_resurrect() {
    let faults = MergeFaults {
        demote_on_resurrect: true,
        ..MergeFaults::default()
    };
    commutative(faults, 3000).expect_err("keeping zeroed cells across a resurrect must fail");
}

// Without the site tie-break the rule is "first arrival wins" on ties: still associative and
// idempotent, which is why commutativity is the law that has to catch it.

proptest! {
    #![proptest_config(Config { cases: 1000, rng_seed: RngSeed::Fixed(7), failure_persistence: None, ..Config::default() })]

    // Any delivery order, with duplicates, gives the same replica (strong eventual consistency).
    #[test]
    fn delivery_order_and_duplicates_do_not_matter(
        (ops, scrambled) in arb_ops(16).prop_flat_map(|ops| {
            // Every op at least once plus random duplicates, in a random permutation.
            let n = ops.len().max(1);
            let dups = proptest::collection::vec(0..n, 0..8);
            (Just(ops.clone()), dups).prop_flat_map(|(ops, dups)| {
                let mut all = ops.clone();
                all.extend(dups.iter().filter_map(|&i| ops.get(i).cloned()));
                (Just(ops), Just(all).prop_shuffle())
            })
        }),
    ) {
        let in_order = replica(&ops, MergeFaults::default());
        let scrambled = replica(&scrambled, MergeFaults::default());
        prop_assert_eq!(&in_order.rows, &scrambled.rows);
    }

    // A change that loses changes nothing: no clock, no value.
    #[test]
    fn losers_are_inert(ops in arb_ops(10), c in arb_change()) {
        let before = replica(&ops, MergeFaults::default());
        let mut after = before.clone();
        if after.apply_change(c.0, &c.1) == MergeDecision::Noop {
            prop_assert_eq!(&before, &after);
        }
    }

    // Causal length never decreases, and within one causal length a cell's version never
    // decreases; the parity invariant holds (cells only on live rows).
    #[test]
    fn merge_is_monotone(ops in arb_ops(16)) {
        let mut r = MemReplica::new(SiteId([0xee; 16]));
        for (id, c) in &ops {
            let before = r.rows.clone();
            r.apply_change(*id, c);
            for (key, row) in &r.rows {
                prop_assert!(row.clock.cl.is_live() || row.clock.cells.is_empty(), "cells on a tombstone");
                prop_assert_eq!(row.clock.cells.len(), row.values.len());
                if let Some(old) = before.get(key) {
                    prop_assert!(row.clock.cl >= old.clock.cl);
                    if row.clock.cl == old.clock.cl {
                        for (col, cell) in &old.clock.cells {
                            prop_assert!(row.clock.cells[col].col_version >= cell.col_version);
                        }
                    }
                }
            }
        }
    }
}
