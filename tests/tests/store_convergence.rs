//! Convergence of real SQLite stores: random writes on 2-5 replicas, random partial, duplicated,
//! reordered and relayed deliveries, then a full exchange: every replica ends with identical
//! rows and identical clock metadata, equal to the in-memory reference replica's. Along the way:
//! rolled-back transactions leave no trace, causal lengths never go down, losing merges change
//! nothing, and the crdt-spec.md scenarios (relays, delete vs update, resurrects) converge.

use std::collections::BTreeMap;

use patina::store::{ApplyOutcome, ClockSnapshot, Statement, Store, StoreConfig};
use patina_core::change::{Changeset, ChangesetId};
use patina_core::ids::{DbVersion, SiteId};
use patina_core::mem::MemReplica;
use patina_core::pk::PackedPk;
use patina_core::value::Value;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

const SCHEMA: &str = "
CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER NOT NULL DEFAULT 0, price REAL);
CREATE TABLE tags (owner TEXT NOT NULL, n INTEGER NOT NULL, label TEXT, data BLOB,
                   PRIMARY KEY (owner, n)) WITHOUT ROWID;
CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL DEFAULT '', score ANY) STRICT;
";

struct Cluster {
    _dir: tempfile::TempDir,
    stores: Vec<Store>,
    /// Every changeset any local transaction produced, in commit order.
    written: Vec<Changeset>,
}

impl Cluster {
    fn new(n: usize) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let schema = dir.path().join("schema.sql");
        std::fs::write(&schema, SCHEMA).unwrap();
        let stores = (0..n)
            .map(|i| {
                Store::open(&StoreConfig {
                    path: dir.path().join(format!("r{i}.db")),
                    schema_paths: vec![schema.clone()],
                    max_db_bytes: None,
                    changeset_bytes_max: None,
                    parts_bytes_max: None,
                })
                .unwrap()
            })
            .collect();
        Cluster {
            _dir: dir,
            stores,
            written: Vec::new(),
        }
    }

    /// Runs a local transaction and checks the transaction laws: a failure leaves no clock and
    /// no version; a success takes exactly the next version; causal lengths never go down.
    fn write(&mut self, replica: usize, statements: &[Statement]) {
        let store = &mut self.stores[replica];
        let clocks_before = store.clock_snapshot().unwrap();
        let version_before = store.db_version();
        match store.transact(statements) {
            Ok(out) => {
                match &out.changeset {
                    Some(cs) => {
                        assert_eq!(cs.id.version, version_before.next());
                        let seqs: Vec<u32> = cs.changes.iter().map(|c| c.seq.get()).collect();
                        assert_eq!(seqs, (0..cs.changes.len() as u32).collect::<Vec<_>>());
                        self.written.push(cs.clone());
                    }
                    None => assert_eq!(store.db_version(), version_before),
                }
                assert_monotone(&clocks_before, &store.clock_snapshot().unwrap());
                assert_cells_match_data(store);
            }
            Err(_) => {
                assert_eq!(
                    store.db_version(),
                    version_before,
                    "failed tx moved db_version"
                );
                assert_eq!(
                    store.clock_snapshot().unwrap(),
                    clocks_before,
                    "failed tx left clocks"
                );
            }
        }
    }

    /// Sends what `from` holds (every site's changesets, relays included) to `to`: only those
    /// picked by `keep`, in an order rotated by `rotate`, some twice, in two batches.
    fn deliver(&mut self, from: usize, to: usize, keep: u64, rotate: usize) {
        let mut batch = all_changesets(&self.stores[from]);
        let mut i = 0;
        batch.retain(|_| {
            i += 1;
            keep >> (i % 64) & 1 == 1
        });
        if !batch.is_empty() {
            let r = rotate % batch.len();
            batch.rotate_left(r);
            let dup = batch[0].clone();
            batch.push(dup);
        }
        let mid = batch.len() / 2;
        let clocks_before = self.stores[to].clock_snapshot().unwrap();
        let version_before = self.stores[to].db_version();
        for part in [&batch[..mid], &batch[mid..]] {
            for outcome in self.stores[to].apply_changesets(part).unwrap() {
                assert!(!matches!(outcome, ApplyOutcome::Rejected(_)), "{outcome:?}");
            }
        }
        assert_monotone(&clocks_before, &self.stores[to].clock_snapshot().unwrap());
        assert_cells_match_data(&self.stores[to]);
        // Merges never take local versions.
        assert_eq!(self.stores[to].db_version(), version_before);
    }

    fn full_exchange(&mut self) {
        for _round in 0..2 {
            for to in 0..self.stores.len() {
                for from in 0..self.stores.len() {
                    if from != to {
                        self.deliver(from, to, u64::MAX, 0);
                    }
                }
            }
        }
    }

    fn assert_converged(&self) {
        let first = &self.stores[0];
        let reference = reference_clocks(&self.written);
        let clocks = first.clock_snapshot().unwrap();
        assert_eq!(
            clocks, reference,
            "store clocks differ from the in-memory reference"
        );
        for (i, other) in self.stores.iter().enumerate().skip(1) {
            for table in ["items", "tags", "notes"] {
                assert_eq!(
                    rows(first, table),
                    rows(other, table),
                    "table {table} differs on replica {i}"
                );
            }
            assert_eq!(
                other.clock_snapshot().unwrap(),
                clocks,
                "clocks differ on replica {i}"
            );
        }
        for store in &self.stores {
            assert_parity(store);
            assert_cells_match_data(store);
        }
    }
}

fn all_changesets(store: &Store) -> Vec<Changeset> {
    let mut all = Vec::new();
    for (site, versions) in store.bookkeeping().iter() {
        all.extend(
            store
                .changesets(*site, DbVersion(1), versions.head, usize::MAX)
                .unwrap(),
        );
    }
    all
}

fn rows(store: &Store, table: &str) -> Vec<Vec<Value>> {
    let order = if table == "tags" { "owner, n" } else { "id" };
    store
        .query(&Statement::new(format!(
            "SELECT * FROM {table} ORDER BY {order}"
        )))
        .unwrap()
        .rows
}

/// Causal length per row never decreases; within one causal length no cell version decreases.
fn assert_monotone(
    before: &BTreeMap<(String, PackedPk), ClockSnapshot>,
    after: &BTreeMap<(String, PackedPk), ClockSnapshot>,
) {
    for (key, old) in before {
        let new = after.get(key).expect("a row clock disappeared");
        assert!(new.cl >= old.cl, "cl went down for {key:?}");
        if new.cl == old.cl {
            for (col, (ver, ..)) in &old.cells {
                if let Some((new_ver, ..)) = new.cells.get(col) {
                    assert!(new_ver >= ver, "cell version went down for {key:?}.{col}");
                } else {
                    panic!("cell {col} vanished at equal cl for {key:?}");
                }
            }
        }
    }
}

/// A data row exists exactly when its causal length is odd; even rows have no cells.
fn assert_parity(store: &Store) {
    for ((table, pk), clock) in store.clock_snapshot().unwrap() {
        let key = pk.values();
        let (sql, params) = if table == "tags" {
            ("SELECT count(*) FROM tags WHERE owner = ? AND n = ?", key)
        } else {
            (
                if table == "items" {
                    "SELECT count(*) FROM items WHERE id = ?"
                } else {
                    "SELECT count(*) FROM notes WHERE id = ?"
                },
                key,
            )
        };
        let count = store
            .query(&Statement::with_params(sql, params))
            .unwrap()
            .rows[0][0]
            .clone();
        let expected = Value::Integer(i64::from(clock.cl.is_live()));
        assert_eq!(
            count, expected,
            "parity broken for {table} {pk:?} at cl {}",
            clock.cl
        );
        if !clock.cl.is_live() {
            assert!(clock.cells.is_empty());
        }
    }
}

/// Data agrees with clocks: in a live row, a column without a cell clock holds its default
/// (a new incarnation starts from defaults; nothing of an earlier one shows through).
fn assert_cells_match_data(store: &Store) {
    let defaults: BTreeMap<&str, Value> = [
        ("name", Value::Null),
        ("qty", Value::Integer(0)),
        ("price", Value::Null),
        ("label", Value::Null),
        ("data", Value::Null),
        ("body", Value::from("")),
        ("score", Value::Null),
    ]
    .into();
    for ((table, pk), clock) in store.clock_snapshot().unwrap() {
        if !clock.cl.is_live() {
            continue;
        }
        let sql = format!(
            "SELECT * FROM {table} WHERE {}",
            key_where(if table == "tags" { 1 } else { 0 })
        );
        let result = store
            .query(&Statement::with_params(sql, pk.values()))
            .unwrap();
        let row = &result.rows[0];
        for (i, column) in result.columns.iter().enumerate() {
            if let Some(default) = defaults.get(column.as_str()) {
                if !clock.cells.contains_key(column) {
                    assert_eq!(
                        &row[i], default,
                        "{table} {pk:?}.{column} has no cell but is not the default"
                    );
                }
            }
        }
    }
}

/// The clocks the in-memory reference replica ends with after every written changeset.
fn reference_clocks(written: &[Changeset]) -> BTreeMap<(String, PackedPk), ClockSnapshot> {
    let mut mem = MemReplica::new(SiteId([0xff; 16]));
    for cs in written {
        mem.apply_changeset(cs);
    }
    mem.rows
        .into_iter()
        .map(|(key, row)| {
            let snapshot = ClockSnapshot {
                cl: row.clock.cl,
                sentinel: row.clock.sentinel.map(|o| (o.site, o.version, o.seq)),
                cells: row
                    .clock
                    .cells
                    .iter()
                    .map(|(c, clk)| {
                        (
                            c.clone(),
                            (
                                clk.col_version,
                                clk.origin.site,
                                clk.origin.version,
                                clk.origin.seq,
                            ),
                        )
                    })
                    .collect(),
            };
            ((key.0.to_string(), key.1), snapshot)
        })
        .collect()
}

#[derive(Debug, Clone)]
enum Op {
    Insert {
        replica: usize,
        table: u8,
        key: i64,
        a: u8,
        b: u8,
        replace: bool,
    },
    Update {
        replica: usize,
        table: u8,
        key: i64,
        second: bool,
        v: u8,
    },
    Delete {
        replica: usize,
        table: u8,
        key: i64,
    },
    ChangeKey {
        replica: usize,
        table: u8,
        from: i64,
        to: i64,
    },
    FailingTx {
        replica: usize,
        table: u8,
        key: i64,
    },
    Deliver {
        from: usize,
        to: usize,
        keep: u64,
        rotate: usize,
    },
}

fn key_params(table: u8, key: i64) -> Vec<Value> {
    if table == 1 {
        vec![
            Value::from(["a", "b"][(key % 2) as usize]),
            Value::Integer(key / 2),
        ]
    } else {
        vec![Value::Integer(key)]
    }
}

fn key_where(table: u8) -> &'static str {
    if table == 1 {
        "owner = ? AND n = ?"
    } else {
        "id = ?"
    }
}

fn table_name(table: u8) -> &'static str {
    ["items", "tags", "notes"][table as usize]
}

/// A value for the first or second written column of a table, with mixed storage classes.
fn column_value(table: u8, second: bool, v: u8) -> (&'static str, Value) {
    let v = v as usize;
    match (table, second) {
        (0, false) => (
            "name",
            [
                Value::Null,
                Value::from("x"),
                Value::from("y"),
                Value::from("z"),
            ][v % 4]
                .clone(),
        ),
        (0, true) => (
            "price",
            [
                Value::Null,
                Value::Real(0.5),
                Value::Real(-2.0),
                Value::Real(1e9),
            ][v % 4]
                .clone(),
        ),
        (1, false) => (
            "label",
            [
                Value::Null,
                Value::from("l1"),
                Value::from("l2"),
                Value::from(""),
            ][v % 4]
                .clone(),
        ),
        (1, true) => (
            "data",
            [
                Value::Null,
                Value::Blob(vec![]),
                Value::Blob(vec![1]),
                Value::Blob(vec![2, 3]),
            ][v % 4]
                .clone(),
        ),
        (_, false) => (
            "body",
            [
                Value::from(""),
                Value::from("b1"),
                Value::from("b2"),
                Value::from("é"),
            ][v % 4]
                .clone(),
        ),
        (_, true) => (
            "score",
            [
                Value::Null,
                Value::Integer(7),
                Value::Real(2.5),
                Value::from("s"),
                Value::Blob(vec![9]),
            ][v % 5]
                .clone(),
        ),
    }
}

fn arb_op(n: usize) -> impl Strategy<Value = Op> {
    let r = 0..n;
    prop_oneof![
        4 => (r.clone(), 0u8..3, 0i64..4, any::<u8>(), any::<u8>(), any::<bool>())
            .prop_map(|(replica, table, key, a, b, replace)| Op::Insert { replica, table, key, a, b, replace }),
        4 => (r.clone(), 0u8..3, 0i64..4, any::<bool>(), any::<u8>())
            .prop_map(|(replica, table, key, second, v)| Op::Update { replica, table, key, second, v }),
        2 => (r.clone(), 0u8..3, 0i64..4).prop_map(|(replica, table, key)| Op::Delete { replica, table, key }),
        1 => (r.clone(), 0u8..3, 0i64..4, 0i64..4)
            .prop_map(|(replica, table, from, to)| Op::ChangeKey { replica, table, from, to }),
        1 => (r.clone(), 0u8..3, 0i64..4).prop_map(|(replica, table, key)| Op::FailingTx { replica, table, key }),
        4 => (r.clone(), r, any::<u64>(), any::<usize>())
            .prop_map(|(from, to, keep, rotate)| Op::Deliver { from, to, keep, rotate }),
    ]
}

fn insert_statement(table: u8, key: i64, a: u8, b: u8, replace: bool) -> Statement {
    let (ca, va) = column_value(table, false, a);
    let (cb, vb) = column_value(table, true, b);
    let keys = if table == 1 { "owner, n" } else { "id" };
    let marks = if table == 1 { "?, ?" } else { "?" };
    let verb = if replace {
        "INSERT OR REPLACE"
    } else {
        "INSERT"
    };
    let mut params = key_params(table, key);
    params.extend([va, vb]);
    Statement::with_params(
        format!(
            "{verb} INTO {} ({keys}, {ca}, {cb}) VALUES ({marks}, ?, ?)",
            table_name(table)
        ),
        params,
    )
}

fn run(cluster: &mut Cluster, op: &Op) {
    match *op {
        Op::Insert {
            replica,
            table,
            key,
            a,
            b,
            replace,
        } => {
            cluster.write(replica, &[insert_statement(table, key, a, b, replace)]);
        }
        Op::Update {
            replica,
            table,
            key,
            second,
            v,
        } => {
            let (col, value) = column_value(table, second, v);
            let mut params = vec![value];
            params.extend(key_params(table, key));
            let sql = format!(
                "UPDATE {} SET {col} = ? WHERE {}",
                table_name(table),
                key_where(table)
            );
            cluster.write(replica, &[Statement::with_params(sql, params)]);
        }
        Op::Delete {
            replica,
            table,
            key,
        } => {
            let sql = format!(
                "DELETE FROM {} WHERE {}",
                table_name(table),
                key_where(table)
            );
            cluster.write(
                replica,
                &[Statement::with_params(sql, key_params(table, key))],
            );
        }
        Op::ChangeKey {
            replica,
            table,
            from,
            to,
        } => {
            // Fails (and must leave nothing) when `to` exists.
            let stmt = if table == 1 {
                let mut p = key_params(1, to);
                p.extend(key_params(1, from));
                Statement::with_params(
                    "UPDATE tags SET owner = ?, n = ? WHERE owner = ? AND n = ?",
                    p,
                )
            } else {
                Statement::with_params(
                    format!("UPDATE {} SET id = ? WHERE id = ?", table_name(table)),
                    vec![to.into(), from.into()],
                )
            };
            cluster.write(replica, &[stmt]);
        }
        Op::FailingTx {
            replica,
            table,
            key,
        } => {
            cluster.write(
                replica,
                &[
                    insert_statement(table, key + 10, 1, 1, true),
                    Statement::new("INSERT INTO missing VALUES (1)"),
                ],
            );
        }
        Op::Deliver {
            from,
            to,
            keep,
            rotate,
        } => {
            if from != to {
                cluster.deliver(from, to, keep, rotate);
            }
        }
    }
}

proptest! {
    #![proptest_config(Config { cases: 256, rng_seed: RngSeed::Fixed(0xc0ffee), failure_persistence: None, ..Config::default() })]

    // Strong eventual consistency on SQLite: after any history and a full exchange, every
    // replica holds identical rows and identical clocks, equal to the reference replica.
    #[test]
    fn replicas_converge_after_any_delivery((n, ops) in (2usize..=5).prop_flat_map(|n| (Just(n), proptest::collection::vec(arb_op(n), 1..40)))) {
        let mut cluster = Cluster::new(n);
        for op in &ops {
            run(&mut cluster, op);
        }
        cluster.full_exchange();
        cluster.assert_converged();

        // Losing merges change nothing, on a fresh replica fed newest-first.
        let dir = tempfile::tempdir().unwrap();
        let schema = dir.path().join("schema.sql");
        std::fs::write(&schema, SCHEMA).unwrap();
        let mut fresh = Store::open(&StoreConfig { path: dir.path().join("fresh.db"), schema_paths: vec![schema], ..StoreConfig::default() }).unwrap();
        for cs in cluster.written.iter().rev() {
            let clocks = fresh.clock_snapshot().unwrap();
            let data: Vec<_> = ["items", "tags", "notes"].iter().map(|t| rows(&fresh, t)).collect();
            let outcome = fresh.apply_changesets(std::slice::from_ref(cs)).unwrap().remove(0);
            if let ApplyOutcome::Applied { changes_won: 0, .. } = outcome {
                prop_assert_eq!(fresh.clock_snapshot().unwrap(), clocks);
                let after: Vec<_> = ["items", "tags", "notes"].iter().map(|t| rows(&fresh, t)).collect();
                prop_assert_eq!(after, data);
            }
            prop_assert_eq!(fresh.db_version(), DbVersion(0));
        }
        prop_assert_eq!(fresh.clock_snapshot().unwrap(), cluster.stores[0].clock_snapshot().unwrap());
        // Everything again: all already applied.
        for outcome in fresh.apply_changesets(&cluster.written).unwrap() {
            prop_assert!(matches!(outcome, ApplyOutcome::AlreadyApplied));
        }
    }
}

// ---- crdt-spec.md scenarios, deterministic ----

fn exec(cluster: &mut Cluster, replica: usize, sql: &str) {
    cluster.write(replica, &[Statement::new(sql)]);
}

fn item_rows(cluster: &Cluster, replica: usize) -> Vec<Vec<Value>> {
    rows(&cluster.stores[replica], "items")
}

#[test]
fn delete_concurrent_with_update_deletes() {
    let mut c = Cluster::new(2);
    exec(&mut c, 0, "INSERT INTO items (id, name) VALUES (1, 'a')");
    c.deliver(0, 1, u64::MAX, 0);
    exec(&mut c, 0, "DELETE FROM items WHERE id = 1");
    exec(
        &mut c,
        1,
        "UPDATE items SET name = 'b', qty = 5 WHERE id = 1",
    );
    c.full_exchange();
    c.assert_converged();
    assert!(item_rows(&c, 0).is_empty());
}

#[test]
fn reinsert_after_delete_beats_a_stale_update() {
    let mut c = Cluster::new(3);
    exec(
        &mut c,
        0,
        "INSERT INTO items (id, name, qty) VALUES (1, 'a', 1)",
    );
    c.full_exchange();
    // Replica 1 updates the first incarnation while replica 0 deletes and re-inserts.
    exec(
        &mut c,
        1,
        "UPDATE items SET name = 'stale', qty = 99 WHERE id = 1",
    );
    exec(&mut c, 0, "DELETE FROM items WHERE id = 1");
    exec(
        &mut c,
        0,
        "INSERT INTO items (id, name) VALUES (1, 'fresh')",
    );
    // Replica 2 hears the stale update first, then the re-insert without the delete.
    c.deliver(1, 2, u64::MAX, 0);
    let reinsert = c.written.last().unwrap().clone();
    c.stores[2].apply_changesets(&[reinsert]).unwrap();
    assert_eq!(
        item_rows(&c, 2),
        vec![vec![1.into(), "fresh".into(), 0.into(), Value::Null]]
    );
    c.full_exchange();
    c.assert_converged();
    assert_eq!(
        item_rows(&c, 0),
        vec![vec![1.into(), "fresh".into(), 0.into(), Value::Null]]
    );
}

#[test]
fn cell_before_sentinel_resurrect_converges() {
    let mut c = Cluster::new(3);
    exec(&mut c, 0, "INSERT INTO items (id, name) VALUES (1, 'a')");
    exec(&mut c, 0, "DELETE FROM items WHERE id = 1");
    c.full_exchange();
    exec(&mut c, 0, "INSERT INTO items (id, name) VALUES (1, 'b')");
    exec(&mut c, 0, "UPDATE items SET price = 2.5 WHERE id = 1");
    // Replica 1 gets the later update (a cell at cl 3) before the re-insert (sentinel at cl 3).
    let n = c.written.len();
    let (reinsert, update) = (c.written[n - 2].clone(), c.written[n - 1].clone());
    c.stores[1].apply_changesets(&[update, reinsert]).unwrap();
    c.full_exchange();
    c.assert_converged();
    assert_eq!(
        item_rows(&c, 1),
        vec![vec![1.into(), "b".into(), 0.into(), 2.5.into()]]
    );
}

#[test]
fn equal_writes_at_two_sites_converge_through_a_relay() {
    let mut c = Cluster::new(3);
    exec(&mut c, 0, "INSERT INTO items (id) VALUES (1)");
    c.full_exchange();
    // Same column, same version, same value, different sites: only the site tells them apart.
    exec(&mut c, 0, "UPDATE items SET name = 'same' WHERE id = 1");
    exec(&mut c, 1, "UPDATE items SET name = 'same' WHERE id = 1");
    c.deliver(0, 1, u64::MAX, 0);
    c.deliver(1, 2, u64::MAX, 0);
    c.full_exchange();
    c.assert_converged();
}

#[test]
fn concurrent_deletes_at_the_same_cl_converge() {
    let mut c = Cluster::new(3);
    exec(&mut c, 0, "INSERT INTO items (id) VALUES (1)");
    c.full_exchange();
    exec(&mut c, 0, "DELETE FROM items WHERE id = 1");
    exec(&mut c, 1, "DELETE FROM items WHERE id = 1");
    c.deliver(1, 2, u64::MAX, 0);
    c.deliver(0, 2, u64::MAX, 0);
    c.full_exchange();
    c.assert_converged();
    let snapshot = c.stores[2].clock_snapshot().unwrap();
    let site = snapshot.values().next().unwrap().sentinel.unwrap().0;
    assert_eq!(
        site,
        c.stores[0].site_id().max(c.stores[1].site_id()),
        "the greater site's tombstone wins"
    );
}

/// crdt-spec.md's 4-peer relay: C and D share state; B's values lose at D; B resurrects the row;
/// C pulls from B (B's values may now win at C). Every pull order must end identical.
#[test]
fn four_peer_relay_converges() {
    let (a, b, cc, d) = (0, 1, 2, 3);
    let mut c = Cluster::new(4);
    exec(
        &mut c,
        a,
        "INSERT INTO items (id, name, qty) VALUES (1, 'a', 1)",
    );
    c.full_exchange();
    // B writes values that lose at D (D writes the same column more often).
    exec(&mut c, b, "UPDATE items SET name = 'b' WHERE id = 1");
    exec(&mut c, d, "UPDATE items SET name = 'd1' WHERE id = 1");
    exec(&mut c, d, "UPDATE items SET name = 'd2' WHERE id = 1");
    c.deliver(b, d, u64::MAX, 0);
    c.deliver(d, cc, u64::MAX, 0);
    // Meanwhile A deletes, B hears it and resurrects with its own values.
    exec(&mut c, a, "DELETE FROM items WHERE id = 1");
    c.deliver(a, b, u64::MAX, 0);
    exec(
        &mut c,
        b,
        "INSERT INTO items (id, name, qty) VALUES (1, 'b-again', 2)",
    );
    // C pulls from B only; D pulls from C; then everybody from everybody.
    c.deliver(b, cc, u64::MAX, 0);
    c.deliver(cc, d, u64::MAX, 0);
    assert_eq!(item_rows(&c, cc), item_rows(&c, d));
    c.full_exchange();
    c.assert_converged();
    assert_eq!(
        item_rows(&c, a),
        vec![vec![1.into(), "b-again".into(), 2.into(), Value::Null]]
    );
}

#[test]
fn changeset_ids_identify_what_was_written() {
    let mut c = Cluster::new(2);
    exec(
        &mut c,
        0,
        "INSERT INTO items (id, name) VALUES (1, 'a'), (2, 'b')",
    );
    exec(&mut c, 0, "UPDATE items SET name = 'c' WHERE id = 1");
    let site = c.stores[0].site_id();
    let v1 = c.stores[0]
        .changesets(site, DbVersion(1), DbVersion(1), 10)
        .unwrap();
    // Version 1 lost the name cell of row 1 to version 2, and kept everything else.
    assert_eq!(
        v1[0].id,
        ChangesetId {
            site,
            version: DbVersion(1)
        }
    );
    assert_eq!(v1[0].changes.len(), c.written[0].changes.len() - 1);
    // Overwrite everything of version 2: it becomes a cleared (empty) changeset.
    exec(&mut c, 0, "UPDATE items SET name = 'd' WHERE id = 1");
    let v2 = c.stores[0]
        .changesets(site, DbVersion(2), DbVersion(2), 10)
        .unwrap();
    assert!(v2[0].is_cleared());
    c.full_exchange();
    c.assert_converged();
    let book = c.stores[1].bookkeeping().site(&site).unwrap();
    assert!(book.cleared.contains(2));
    assert!(book.needs().is_empty());
}

/// A replica that missed a delete sees the row come back at a higher causal length through a
/// partial changeset (one of its cells was overwritten at the source): the new incarnation starts
/// from defaults, nothing of the old one shows through.
#[test]
fn remote_resurrect_of_a_live_row_starts_from_defaults() {
    let mut c = Cluster::new(2);
    exec(
        &mut c,
        0,
        "INSERT INTO items (id, name, qty, price) VALUES (1, 'old', 5, 1.5)",
    );
    c.deliver(0, 1, u64::MAX, 0);
    exec(&mut c, 0, "DELETE FROM items WHERE id = 1");
    exec(&mut c, 0, "INSERT INTO items (id, qty) VALUES (1, 7)");
    exec(&mut c, 0, "UPDATE items SET name = 'new' WHERE id = 1");
    // Replica 1 gets only the re-insert, as replica 0 serves it now: its name cell is gone.
    let site = c.stores[0].site_id();
    let reinsert = c.stores[0]
        .changesets(site, DbVersion(3), DbVersion(3), 1)
        .unwrap();
    assert!(reinsert[0]
        .changes
        .iter()
        .all(|ch| ch.column.name() != Some("name")));
    c.stores[1].apply_changesets(&reinsert).unwrap();
    assert_cells_match_data(&c.stores[1]);
    assert_eq!(
        item_rows(&c, 1),
        vec![vec![1.into(), Value::Null, 7.into(), Value::Null]]
    );
    c.full_exchange();
    c.assert_converged();
    assert_eq!(
        item_rows(&c, 1),
        vec![vec![1.into(), "new".into(), 7.into(), Value::Null]]
    );
}
