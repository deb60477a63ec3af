//! Bounded model checks of the replication protocol (breadth-first, every behaviour up to a
//! depth, one thread so the counts are exact). Each real-protocol scenario must satisfy every
//! property, with its count of unique states pinned: a change to the protocol that changes the
//! explored behaviour shows up here. Each deliberate bug must be caught.
//!
//! `cargo run -p patina-model --release -- check` runs deeper searches.

use std::time::Instant;

use patina_core::merge::MergeFaults;
use patina_core::node::NodeFaults;
use patina_model::{check_bfs, scenarios, Scenario};
use stateright::Checker;

/// Depth and unique states of the parts scenario (every changeset in parts of one change).
/// Depth 10 holds too (hundreds of thousands of unique states, half a minute): too slow for
/// every test run.
const PARTS_DEPTH: usize = 9;
const PARTS_UNIQUE: usize = 112_527;

/// Checks `scenario` to `depth`, asserts every property and the unique state count.
fn holds(scenario: Scenario, depth: usize, unique_states: usize) {
    let name = scenario.name;
    let start = Instant::now();
    let checker = check_bfs(scenario, depth);
    println!(
        "{name}: depth {depth}, {} states, {} unique, {:.1} s",
        checker.state_count(),
        checker.unique_state_count(),
        start.elapsed().as_secs_f64()
    );
    checker.assert_properties();
    assert_eq!(checker.unique_state_count(), unique_states, "{name}");
}

/// Checks `scenario` to `depth` and asserts the checker finds a counterexample to `property`.
fn caught(scenario: Scenario, depth: usize, property: &'static str) {
    let name = scenario.name;
    let checker = check_bfs(scenario, depth);
    let path = checker
        .discovery(property)
        .unwrap_or_else(|| panic!("{name}: the checker missed the bug ({property})"));
    println!(
        "{name}: {property} violated after {} steps",
        path.into_actions().len()
    );
}

#[test]
fn two_nodes_with_conflicts_deletes_and_a_crash_converge() {
    holds(scenarios::conflicts_with_crash(), 9, 143_722);
}

#[test]
fn three_nodes_on_a_lossy_network_converge() {
    holds(scenarios::three_nodes(), 9, 191_926);
}

#[test]
fn three_nodes_over_kept_links_converge() {
    // Depth 9 holds too (about a million unique states, a minute): too slow for every test run.
    holds(scenarios::kept_links(), 7, 58_206);
}

#[test]
fn four_nodes_converge() {
    holds(scenarios::four_nodes(), 7, 104_295);
}

#[test]
fn equal_concurrent_inserts_converge() {
    holds(
        scenarios::equal_concurrent_inserts(NodeFaults::default()),
        14,
        174_383,
    );
}

#[test]
fn an_update_against_a_resurrect_converges() {
    holds(
        scenarios::update_against_resurrect(NodeFaults::default()),
        11,
        226_036,
    );
}

#[test]
fn a_lost_write_is_repaired_by_sync() {
    holds(
        scenarios::two_writes_lossy(NodeFaults::default()),
        12,
        181_428,
    );
}

#[test]
fn catches_a_missing_site_tiebreak() {
    let faults = NodeFaults {
        merge: MergeFaults {
            no_site_tiebreak: true,
            ..MergeFaults::default()
        },
        ..NodeFaults::default()
    };
    caught(
        scenarios::equal_concurrent_inserts(faults),
        8,
        "strong eventual consistency",
    );
}

#[test]
fn catches_zeroed_clocks_on_resurrect() {
    let faults = NodeFaults {
        merge: MergeFaults {
            demote_on_resurrect: true,
            ..MergeFaults::default()
        },
        ..NodeFaults::default()
    };
    caught(
        scenarios::update_against_resurrect(faults),
        8,
        "strong eventual consistency",
    );
}

#[test]
fn catches_sync_that_skips_a_gap() {
    let faults = NodeFaults {
        sync_skips_gaps: true,
        ..NodeFaults::default()
    };
    caught(scenarios::two_writes_lossy(faults), 8, "convergence");
}

#[test]
fn catches_a_sync_check_that_hashes_only_heads() {
    // A write lost below a later one leaves the two nodes with the same heads: a check that
    // hashed only heads would spare the round that brings it.
    let faults = NodeFaults {
        check_hashes_heads_only: true,
        ..NodeFaults::default()
    };
    caught(scenarios::two_writes_lossy(faults), 8, "convergence");
}

#[test]
fn changesets_in_parts_converge() {
    holds(
        scenarios::parts(NodeFaults::default()),
        PARTS_DEPTH,
        PARTS_UNIQUE,
    );
}

#[test]
fn catches_a_part_that_marks_its_changeset_applied() {
    let faults = NodeFaults {
        part_marks_applied: true,
        ..NodeFaults::default()
    };
    caught(scenarios::parts(faults), 8, "convergence");
}
