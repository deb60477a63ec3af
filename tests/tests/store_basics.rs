//! The store on real SQLite: local transactions, capture, extraction and remote apply between
//! two replicas, and the bad-input paths.

use patina::store::{ApplyOutcome, Params, Statement, Store, StoreConfig, StoreError};
use patina_core::{DbVersion, Value};

const SCHEMA: &str = "
CREATE TABLE hosts (id INTEGER PRIMARY KEY, name TEXT NOT NULL DEFAULT '', cpu REAL, tags BLOB);
CREATE TABLE kv (k TEXT NOT NULL, n INTEGER NOT NULL, v ANY, PRIMARY KEY (k, n)) STRICT, WITHOUT ROWID;
";

fn open(dir: &tempfile::TempDir, name: &str) -> Store {
    Store::open(&config(dir, name)).unwrap()
}

/// The configuration [`open`] uses (SCHEMA written beside the database), for tests that
/// change a limit.
fn config(dir: &tempfile::TempDir, name: &str) -> StoreConfig {
    let schema = dir.path().join("schema.sql");
    std::fs::write(&schema, SCHEMA).unwrap();
    StoreConfig {
        path: dir.path().join(name),
        schema_paths: vec![schema],
        max_db_bytes: None,
        changeset_bytes_max: None,
        parts_bytes_max: None,
    }
}

fn rows(store: &Store, sql: &str) -> Vec<Vec<Value>> {
    store.query(&Statement::new(sql)).unwrap().rows
}

/// Everything `from` has, sent to `to`.
fn sync(from: &Store, to: &mut Store) {
    let mut all = Vec::new();
    for (site, versions) in from.bookkeeping().iter() {
        all.extend(
            from.changesets(*site, DbVersion(1), versions.head, usize::MAX)
                .unwrap(),
        );
    }
    for outcome in to.apply_changesets(&all).unwrap() {
        assert!(!matches!(outcome, ApplyOutcome::Rejected(_)), "{outcome:?}");
    }
}

#[test]
fn local_write_replicates_and_converges() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = open(&dir, "a.db");
    let mut b = open(&dir, "b.db");
    let out = a
        .transact(&[
            Statement::with_params(
                "INSERT INTO hosts (id, name, cpu) VALUES (?, ?, ?)",
                vec![1.into(), "web".into(), 0.5.into()],
            ),
            Statement::new("INSERT INTO kv (k, n, v) VALUES ('x', 1, 'hello'), ('x', 2, 42)"),
        ])
        .unwrap();
    assert_eq!(out.version, Some(DbVersion(1)));
    assert_eq!(out.rows_affected, vec![1, 2]);
    let cs = out.changeset.unwrap();
    // 1 sentinel + 3 cells for hosts, 2 * (1 sentinel + 1 cell) for kv.
    assert_eq!(cs.changes.len(), 8);
    let seqs: Vec<u32> = cs.changes.iter().map(|c| c.seq.get()).collect();
    assert_eq!(seqs, (0..8).collect::<Vec<_>>());
    // Extraction gives back exactly what the transaction produced.
    let extracted = a
        .changesets(a.site_id(), DbVersion(1), DbVersion(1), 10)
        .unwrap();
    assert_eq!(extracted, vec![cs.clone()]);

    sync(&a, &mut b);
    assert_eq!(
        rows(&b, "SELECT * FROM hosts"),
        rows(&a, "SELECT * FROM hosts")
    );
    assert_eq!(
        rows(&b, "SELECT * FROM kv ORDER BY n"),
        rows(&a, "SELECT * FROM kv ORDER BY n")
    );

    // Conflicting updates on both sides, then exchange both ways.
    a.transact(&[Statement::new(
        "UPDATE hosts SET name = 'from-a' WHERE id = 1",
    )])
    .unwrap();
    b.transact(&[Statement::new(
        "UPDATE hosts SET name = 'from-b', cpu = 2.0 WHERE id = 1",
    )])
    .unwrap();
    sync(&a, &mut b);
    sync(&b, &mut a);
    assert_eq!(
        rows(&a, "SELECT * FROM hosts"),
        rows(&b, "SELECT * FROM hosts")
    );
    assert_eq!(a.clock_snapshot().unwrap(), b.clock_snapshot().unwrap());
    // Equal versions: the greater value wins ('from-b' > 'from-a').
    assert_eq!(
        rows(&a, "SELECT name, cpu FROM hosts"),
        vec![vec!["from-b".into(), 2.0.into()]]
    );

    // Delete on one side, update on the other: the delete wins (higher causal length).
    a.transact(&[Statement::new("DELETE FROM hosts WHERE id = 1")])
        .unwrap();
    b.transact(&[Statement::new("UPDATE hosts SET cpu = 9.0 WHERE id = 1")])
        .unwrap();
    sync(&a, &mut b);
    sync(&b, &mut a);
    assert!(rows(&a, "SELECT * FROM hosts").is_empty());
    assert!(rows(&b, "SELECT * FROM hosts").is_empty());
    assert_eq!(a.clock_snapshot().unwrap(), b.clock_snapshot().unwrap());

    // Re-insert resurrects with causal length 3.
    b.transact(&[Statement::new(
        "INSERT INTO hosts (id, name) VALUES (1, 'back')",
    )])
    .unwrap();
    sync(&b, &mut a);
    assert_eq!(
        rows(&a, "SELECT id, name FROM hosts"),
        vec![vec![1.into(), "back".into()]]
    );
    assert_eq!(a.clock_snapshot().unwrap(), b.clock_snapshot().unwrap());
}

#[test]
fn reapplying_own_or_known_changesets_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = open(&dir, "a.db");
    let mut b = open(&dir, "b.db");
    let cs = a
        .transact(&[Statement::new(
            "INSERT INTO hosts (id, name) VALUES (1, 'x')",
        )])
        .unwrap()
        .changeset
        .unwrap();
    assert!(matches!(
        a.apply_changesets(std::slice::from_ref(&cs)).unwrap()[0],
        ApplyOutcome::AlreadyApplied
    ));
    assert!(matches!(
        b.apply_changesets(std::slice::from_ref(&cs)).unwrap()[0],
        ApplyOutcome::Applied { .. }
    ));
    let snapshot = b.clock_snapshot().unwrap();
    assert!(matches!(
        b.apply_changesets(&[cs]).unwrap()[0],
        ApplyOutcome::AlreadyApplied
    ));
    assert_eq!(b.clock_snapshot().unwrap(), snapshot);
    assert_eq!(b.db_version(), DbVersion(0));
}

#[test]
fn failed_statement_rolls_back_everything() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = open(&dir, "a.db");
    let err = a
        .transact(&[
            Statement::new("INSERT INTO hosts (id, name) VALUES (1, 'x')"),
            Statement::new("INSERT INTO nope VALUES (1)"),
        ])
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Statement { index: 1, .. }),
        "{err}"
    );
    assert!(rows(&a, "SELECT * FROM hosts").is_empty());
    assert!(a.clock_snapshot().unwrap().is_empty());
    assert_eq!(a.db_version(), DbVersion(0));
    // The next transaction starts clean, at version 1 and seq 0.
    let out = a
        .transact(&[Statement::new("INSERT INTO hosts (id) VALUES (2)")])
        .unwrap();
    assert_eq!(out.version, Some(DbVersion(1)));
    assert_eq!(out.changeset.unwrap().changes[0].seq.get(), 0);
}

#[test]
fn named_params_and_statement_guards() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = open(&dir, "a.db");
    a.transact(&[Statement {
        sql: "INSERT INTO hosts (id, name) VALUES (:id, :name)".into(),
        params: Params::Named(vec![("id".into(), 5.into()), (":name".into(), "n".into())]),
    }])
    .unwrap();
    assert_eq!(
        rows(&a, "SELECT id, name FROM hosts"),
        vec![vec![5.into(), "n".into()]]
    );
    // Names left out run as NULL, as `/v1/queries` runs them, even when none is given.
    for params in [vec![("id".into(), 6.into())], vec![]] {
        a.transact(&[Statement {
            sql: "INSERT INTO hosts (id, cpu) VALUES (coalesce(:id, 7), :cpu)".into(),
            params: Params::Named(params),
        }])
        .unwrap();
    }
    assert_eq!(
        rows(&a, "SELECT id, cpu FROM hosts WHERE id > 5 ORDER BY id"),
        vec![vec![6.into(), Value::Null], vec![7.into(), Value::Null]]
    );
    for bad in [
        "CREATE TABLE x (id INTEGER PRIMARY KEY)",
        "DROP TABLE hosts",
        "PRAGMA synchronous = OFF",
        "COMMIT",
        "DELETE FROM __patina_rows",
        "ATTACH DATABASE ':memory:' AS x",
    ] {
        assert!(
            a.transact(&[Statement::new(bad)]).is_err(),
            "{bad} was accepted"
        );
    }
    assert_eq!(rows(&a, "SELECT count(*) FROM hosts"), vec![vec![3.into()]]);
    assert!(matches!(
        a.query(&Statement::new("DELETE FROM hosts")),
        Err(StoreError::NotReadOnly)
    ));
    assert!(matches!(
        a.query(&Statement::new("SELEC 1")),
        Err(StoreError::Query(_))
    ));
    assert!(matches!(a.transact(&[]), Err(StoreError::EmptyTransaction)));
}

/// The store's own statements that stay in rusqlite's cache were prepared outside user mode,
/// with the authorizer's leave: a user statement of the very same text must still be refused
/// (it was once handed the cached one, and ran).
#[test]
fn a_user_statement_with_the_text_of_an_internal_one_is_still_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = open(&dir, "a.db");
    let mut b = open(&dir, "b.db");
    a.transact(&[Statement::new("INSERT INTO hosts (id) VALUES (1)")])
        .unwrap();
    // Registering a's site on b runs the store's own INSERT into `__patina_sites`.
    sync(&a, &mut b);
    for sql in [
        "INSERT INTO __patina_sites (ord, site_id) VALUES (?1, ?2)",
        "  INSERT INTO __patina_sites (ord, site_id) VALUES (?1, ?2)\n",
    ] {
        let hostile = Statement::with_params(sql, vec![100.into(), Value::Blob(vec![7; 16])]);
        match b.transact(&[hostile]) {
            Err(StoreError::Statement { message, .. }) => {
                assert!(message.contains("not authorized"), "{message}")
            }
            other => panic!("{sql:?} was not refused: {other:?}"),
        }
    }
    drop(b);
    // Nothing was written: the store opens again and still knows two sites.
    let b = open(&dir, "b.db");
    assert_eq!(b.bookkeeping().iter().count(), 2);
}

fn cl_of(store: &Store, table: &str, id: i64) -> u64 {
    let pk = patina_core::PackedPk::pack(&[Value::Integer(id)]).unwrap();
    store.clock_snapshot().unwrap()[&(table.to_string(), pk)]
        .cl
        .get()
}

/// crdt-spec.md section 8: the clocks local writes leave.
#[test]
fn local_write_semantics() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = open(&dir, "a.db");
    a.transact(&[Statement::new(
        "INSERT INTO hosts (id, name, cpu) VALUES (1, 'a', 1.0)",
    )])
    .unwrap();
    // An update to an equal value writes no clock and takes no version.
    let same = a
        .transact(&[Statement::new("UPDATE hosts SET name = 'a' WHERE id = 1")])
        .unwrap();
    assert_eq!((same.version, same.rows_affected.clone()), (None, vec![1]));
    // An update bumps only the changed columns.
    let cs = a
        .transact(&[Statement::new(
            "UPDATE hosts SET name = 'b', cpu = 1.0 WHERE id = 1",
        )])
        .unwrap()
        .changeset
        .unwrap();
    assert_eq!(cs.changes.len(), 1);
    assert_eq!(
        (cs.changes[0].column.name(), cs.changes[0].col_version.get()),
        (Some("name"), 2)
    );
    // delete -> insert -> delete: cl 2 -> 3 -> 4.
    a.transact(&[Statement::new("DELETE FROM hosts WHERE id = 1")])
        .unwrap();
    assert_eq!(cl_of(&a, "hosts", 1), 2);
    a.transact(&[Statement::new("INSERT INTO hosts (id) VALUES (1)")])
        .unwrap();
    assert_eq!(cl_of(&a, "hosts", 1), 3);
    a.transact(&[Statement::new("DELETE FROM hosts WHERE id = 1")])
        .unwrap();
    assert_eq!(cl_of(&a, "hosts", 1), 4);
    // A key change: a tombstone for the old key, a live row with fresh clocks for the new one.
    a.transact(&[Statement::new(
        "INSERT INTO hosts (id, name) VALUES (2, 'k')",
    )])
    .unwrap();
    let cs = a
        .transact(&[Statement::new("UPDATE hosts SET id = 3 WHERE id = 2")])
        .unwrap()
        .changeset
        .unwrap();
    assert_eq!(cl_of(&a, "hosts", 2), 2);
    assert_eq!(cl_of(&a, "hosts", 3), 1);
    assert!(cs
        .changes
        .iter()
        .any(|c| c.column.name() == Some("name") && c.value == Value::from("k")));
    // REPLACE over a live row is delete + insert: cl + 2, fresh cells.
    a.transact(&[Statement::new(
        "INSERT OR REPLACE INTO hosts (id, name) VALUES (3, 'r')",
    )])
    .unwrap();
    assert_eq!(cl_of(&a, "hosts", 3), 3);
    // An upsert that updates is an update.
    let cs = a
        .transact(&[Statement::new("INSERT INTO hosts (id, name) VALUES (3, 'u') ON CONFLICT (id) DO UPDATE SET name = excluded.name")])
        .unwrap()
        .changeset
        .unwrap();
    assert_eq!(cs.changes.len(), 1);
    // DELETE without WHERE (SQLite's truncate optimisation) is captured row by row.
    a.transact(&[Statement::new("INSERT INTO hosts (id) VALUES (10), (11)")])
        .unwrap();
    let out = a.transact(&[Statement::new("DELETE FROM hosts")]).unwrap();
    assert_eq!(out.rows_affected, vec![3]);
    assert_eq!(out.changeset.unwrap().changes.len(), 3);
    // All writes of one transaction share its version, with seq 0..k-1.
    let cs = a
        .transact(&[
            Statement::new("INSERT INTO hosts (id, name) VALUES (20, 'x')"),
            Statement::new("INSERT INTO kv (k, n, v) VALUES ('a', 1, x'00')"),
            Statement::new("UPDATE hosts SET cpu = 3.5 WHERE id = 20"),
        ])
        .unwrap()
        .changeset
        .unwrap();
    let seqs: Vec<u32> = cs.changes.iter().map(|c| c.seq.get()).collect();
    assert_eq!(seqs, (0..cs.changes.len() as u32).collect::<Vec<_>>());
    // Re-applying a replica's own changesets to itself changes nothing.
    let before = a.clock_snapshot().unwrap();
    let version = a.db_version();
    let own = a
        .changesets(a.site_id(), DbVersion(1), version, usize::MAX)
        .unwrap();
    assert!(a
        .apply_changesets(&own)
        .unwrap()
        .iter()
        .all(|o| matches!(o, ApplyOutcome::AlreadyApplied)));
    assert_eq!(
        (a.clock_snapshot().unwrap(), a.db_version()),
        (before, version)
    );
}

/// What SQLite's pre-update hook hands the capture in the cases it handles apart: a row stored
/// before its table gained a column (the old record lacks it: the hook must give the column's
/// default, or every update of such a row would look like a write of that column too), and a
/// key change in a WITHOUT ROWID table.
#[test]
fn capture_reads_added_columns_defaults_and_without_rowid_key_changes() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = open(&dir, "a.db");
    let mut b = open(&dir, "b.db");
    a.transact(&[
        Statement::new("INSERT INTO hosts (id, name) VALUES (1, 'a')"),
        Statement::new("INSERT INTO kv (k, n, v) VALUES ('x', 1, 'one')"),
    ])
    .unwrap();
    let widened = SCHEMA.replace("tags BLOB)", "tags BLOB, zone TEXT NOT NULL DEFAULT 'eu')");
    a.apply_schema_sql(&widened).unwrap();
    b.apply_schema_sql(&widened).unwrap();
    let cs = a
        .transact(&[Statement::new("UPDATE hosts SET name = 'b' WHERE id = 1")])
        .unwrap()
        .changeset
        .unwrap();
    let columns: Vec<_> = cs.changes.iter().map(|c| c.column.name()).collect();
    assert_eq!(columns, vec![Some("name")]);
    // Deleting the old row reads its default too; the delete is captured as one.
    a.transact(&[Statement::new(
        "INSERT INTO hosts (id, name) VALUES (2, 'c')",
    )])
    .unwrap();
    let cs = a
        .transact(&[Statement::new("DELETE FROM hosts WHERE id = 1")])
        .unwrap()
        .changeset
        .unwrap();
    assert_eq!(cs.changes.len(), 1, "{cs:?}");

    let cs = a
        .transact(&[Statement::new("UPDATE kv SET n = 9 WHERE k = 'x'")])
        .unwrap()
        .changeset
        .unwrap();
    // The old key's tombstone; the new key's sentinel and its one cell.
    assert_eq!(cs.changes.len(), 3, "{cs:?}");
    sync(&a, &mut b);
    for sql in [
        "SELECT k, n, v FROM kv ORDER BY k, n",
        "SELECT id, name, zone FROM hosts ORDER BY id",
    ] {
        assert_eq!(rows(&a, sql), rows(&b, sql), "{sql}");
    }
    assert_eq!(
        rows(&b, "SELECT k, n, v FROM kv"),
        vec![vec!["x".into(), 9.into(), "one".into()]]
    );
    assert_eq!(
        rows(&b, "SELECT id, name, zone FROM hosts"),
        vec![vec![2.into(), "c".into(), "eu".into()]]
    );
}

/// The changes index of a store's file: (site ordinal, version), in order.
fn index_entries(dir: &tempfile::TempDir, name: &str) -> Vec<(i64, i64)> {
    let conn = rusqlite::Connection::open_with_flags(
        dir.path().join(name),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut stmt = conn
        .prepare("SELECT site, version FROM __patina_changes ORDER BY site, version")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[test]
fn superseded_index_entries_go_in_batches_and_a_rolled_back_write_keeps_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Store::open(&StoreConfig {
        changeset_bytes_max: Some(4096),
        ..config(&dir, "a.db")
    })
    .unwrap();
    let write = |a: &mut Store, sql: &str| a.transact(&[Statement::new(sql)]).unwrap();
    write(&mut a, "INSERT INTO hosts (id, name) VALUES (1, 'one')");
    write(&mut a, "INSERT INTO hosts (id, name) VALUES (2, 'two')");
    // Deleting row 1 supersedes version 1 there, but the transaction is refused after its
    // clocks were written (too large) and rolled back: version 1's entry must stay.
    let err = a
        .transact(&[
            Statement::new("DELETE FROM hosts WHERE id = 1"),
            Statement::new("INSERT INTO hosts (id, tags) VALUES (3, randomblob(5000))"),
        ])
        .unwrap_err();
    assert!(
        matches!(err, StoreError::TransactionTooLarge { .. }),
        "{err}"
    );
    // 100 updates of one cell of row 2: each makes the version before it stale there.
    for i in 0..100 {
        write(&mut a, &format!("UPDATE hosts SET cpu = {i} WHERE id = 2"));
    }
    assert_eq!(a.db_version(), DbVersion(102));
    // While it runs, the file's index does not pile up an entry per update: stale entries
    // go in batches (and entries superseded before their batch are never written).
    let entries = index_entries(&dir, "a.db");
    assert!(
        entries.len() < 70,
        "{} index entries: stale ones are not deleted",
        entries.len()
    );
    // What extraction gives is the same whether a stale entry is deleted yet or not.
    let site = a.site_id();
    let all = a
        .changesets(site, DbVersion(1), DbVersion(102), usize::MAX)
        .unwrap();
    assert_eq!(all.len(), 102);
    assert!(!all[0].changes.is_empty(), "version 1 lost its entry");
    assert!(all[2..101].iter().all(|cs| cs.changes.is_empty()));
    assert_eq!(all[101].changes.len(), 1);
    let mut b = open(&dir, "b.db");
    sync(&a, &mut b);
    let table = "SELECT id, name, cpu FROM hosts ORDER BY id";
    assert_eq!(rows(&a, table), rows(&b, table));
    assert_eq!(rows(&b, table).len(), 2);
    // Closed (which writes what waits), the index holds versions 1 and 2 (the rows'
    // sentinels) and 102.
    drop(a);
    let entries = index_entries(&dir, "a.db");
    assert!(entries.contains(&(0, 1)) && entries.contains(&(0, 2)) && entries.contains(&(0, 102)));
}

/// A batch of remote changesets writes its new changes-index entries at its end, in one
/// statement: an entry a later changeset of the same batch superseded must not be among them.
#[test]
fn a_remote_batch_writes_no_index_entry_it_superseded_itself() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = open(&dir, "a.db");
    let mut b = open(&dir, "b.db");
    // Each changeset as written (not extracted later, which would find 2..10 cleared).
    let mut batch = Vec::new();
    let mut write = |sql: String| {
        let out = a.transact(&[Statement::new(sql)]).unwrap();
        batch.push(out.changeset.unwrap());
    };
    write("INSERT INTO hosts (id, name) VALUES (1, 'one')".into());
    for i in 0..10 {
        write(format!("UPDATE hosts SET cpu = {i} WHERE id = 1"));
    }
    for outcome in b.apply_changesets(&batch).unwrap() {
        assert!(
            matches!(outcome, ApplyOutcome::Applied { .. }),
            "{outcome:?}"
        );
    }
    let table = "SELECT id, name, cpu FROM hosts ORDER BY id";
    assert_eq!(rows(&a, table), rows(&b, table));
    // Version 1 still holds the row's sentinel and name, 11 its cpu; 2..10 were superseded
    // inside the batch.
    let site = a.site_id();
    let served = b
        .changesets(site, DbVersion(1), DbVersion(11), usize::MAX)
        .unwrap();
    assert_eq!(served.len(), 11);
    assert!(served[1..10].iter().all(|cs| cs.changes.is_empty()));
    drop(b);
    let versions: Vec<i64> = index_entries(&dir, "b.db")
        .into_iter()
        .map(|(_, version)| version)
        .collect();
    assert_eq!(versions, [1, 11], "stale index entries written");
}

/// Rows of the `__patina_unindexed` mark in a store's file.
fn unindexed_marks(dir: &tempfile::TempDir, name: &str) -> i64 {
    let conn = rusqlite::Connection::open_with_flags(
        dir.path().join(name),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    conn.query_row("SELECT count(*) FROM __patina_unindexed", [], |r| r.get(0))
        .unwrap()
}

/// Rows `ids` of `hosts` inserted on `store`, one local transaction each.
fn insert_hosts(store: &mut Store, ids: std::ops::RangeInclusive<i64>) {
    for id in ids {
        store
            .transact(&[Statement::new(format!(
                "INSERT INTO hosts (id, name) VALUES ({id}, 'h{id}')"
            ))])
            .unwrap();
    }
}

/// The head `site` has in a store's file (`__patina_sites`), None if it has no row there.
fn stored_head(dir: &tempfile::TempDir, name: &str, site: patina_core::SiteId) -> Option<i64> {
    let conn = rusqlite::Connection::open_with_flags(
        dir.path().join(name),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    conn.query_row(
        "SELECT head FROM __patina_sites WHERE site_id = ?1",
        [&site.0[..]],
        |r| r.get(0),
    )
    .ok()
}

#[test]
fn remote_versions_reach_the_file_in_batches_and_a_crash_or_reload_loses_no_row() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = open(&dir, "a.db");
    let site = a.site_id();
    insert_hosts(&mut a, 1..=3);
    let first = a
        .changesets(site, DbVersion(1), DbVersion(3), usize::MAX)
        .unwrap();
    let mut b = open(&dir, "b.db");
    // One batch per changeset, as broadcast delivers them.
    for changeset in &first {
        b.apply_changesets(std::slice::from_ref(changeset)).unwrap();
    }
    let head = |b: &Store| b.bookkeeping().site(&site).map(|v| v.head.get());
    assert_eq!(head(&b), Some(3));
    // The site is registered at once (extraction needs its ordinal); its versions and the
    // merges' index entries wait.
    assert_eq!(stored_head(&dir, "b.db", site), Some(0));
    assert!(index_entries(&dir, "b.db").is_empty());
    // Extraction serves them all the same.
    let mut c = open(&dir, "c.db");
    sync(&b, &mut c);
    assert_eq!(rows(&c, "SELECT id FROM hosts ORDER BY id").len(), 3);
    drop(c);
    // A schema reload reads the versions back from the file: those not written yet stay.
    b.apply_schema_sql(&format!(
        "{SCHEMA} CREATE TABLE extra (id INTEGER PRIMARY KEY);"
    ))
    .unwrap();
    assert_eq!(
        head(&b),
        Some(3),
        "a reload forgot the versions not written yet"
    );

    // A crash: no close. The rows are in the file, their versions and index entries not yet,
    // and a mark says so: the next open puts them back from the row clocks, with no peer to
    // ask (a's versions might be nowhere else by then).
    std::mem::forget(b);
    assert_eq!(stored_head(&dir, "b.db", site), Some(0));
    assert!(index_entries(&dir, "b.db").is_empty());
    let mut b = open(&dir, "b.db");
    assert_eq!(rows(&b, "SELECT id FROM hosts ORDER BY id").len(), 3);
    assert_eq!(
        head(&b),
        Some(3),
        "the crash lost versions whose rows it kept"
    );
    assert_eq!(stored_head(&dir, "b.db", site), Some(3));
    assert_eq!(index_entries(&dir, "b.db"), vec![(1, 1), (1, 2), (1, 3)]);
    for outcome in b.apply_changesets(&first).unwrap() {
        assert!(
            matches!(outcome, ApplyOutcome::AlreadyApplied),
            "{outcome:?}"
        );
    }
    // A sync from b serves the rows, not three cleared versions.
    let mut d = open(&dir, "d.db");
    sync(&b, &mut d);
    assert_eq!(rows(&d, "SELECT id FROM hosts ORDER BY id").len(), 3);

    // Enough batches write the versions without a close.
    let mut written_after = None;
    for id in 4..=200 {
        insert_hosts(&mut a, id..=id);
        let next = a
            .changesets(site, DbVersion(id as u64), DbVersion(id as u64), 1)
            .unwrap();
        b.apply_changesets(&next).unwrap();
        if stored_head(&dir, "b.db", site).unwrap_or(0) > 3 {
            written_after = Some(id);
            break;
        }
    }
    let written_after = written_after.expect("versions never written in 198 batches");
    assert_eq!(stored_head(&dir, "b.db", site), Some(written_after));
    // With the entries of the same batches.
    assert_eq!(
        index_entries(&dir, "b.db").len(),
        written_after as usize,
        "versions written without their entries"
    );
    // A clean close writes the rest.
    a.transact(&[Statement::new("INSERT INTO hosts (id) VALUES (1000)")])
        .unwrap();
    let last = a.db_version();
    b.apply_changesets(&a.changesets(site, last, last, 1).unwrap())
        .unwrap();
    assert_eq!(stored_head(&dir, "b.db", site), Some(written_after));
    drop(b);
    assert_eq!(stored_head(&dir, "b.db", site), Some(last.get() as i64));
}

#[test]
fn remote_entries_superseded_before_they_are_written_are_never_written() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = open(&dir, "a.db");
    let site = a.site_id();
    let mut b = open(&dir, "b.db");
    // A transaction on a, delivered to b as broadcast would: a batch of its own.
    let write_and_deliver = |a: &mut Store, b: &mut Store, sql: &[&str]| {
        let statements: Vec<Statement> = sql.iter().map(|s| Statement::new(*s)).collect();
        a.transact(&statements).unwrap();
        let v = a.db_version();
        b.apply_changesets(&a.changesets(site, v, v, 1).unwrap())
            .unwrap();
    };
    write_and_deliver(
        &mut a,
        &mut b,
        &["INSERT INTO hosts (id, name) VALUES (1, 'x')"],
    );
    // Version 2 takes every cell and the sentinel of row 1 from version 1: its entry is stale
    // before it reaches the file.
    write_and_deliver(
        &mut a,
        &mut b,
        &[
            "DELETE FROM hosts WHERE id = 1",
            "INSERT INTO hosts (id, name) VALUES (1, 'y')",
        ],
    );
    // Version 3 on a row b then writes itself, all of its columns.
    write_and_deliver(
        &mut a,
        &mut b,
        &["INSERT INTO hosts (id, name) VALUES (2, 'z')"],
    );
    b.transact(&[
        Statement::new("DELETE FROM hosts WHERE id = 2"),
        Statement::new("INSERT INTO hosts (id, name, cpu, tags) VALUES (2, 'w', 1, x'00')"),
    ])
    .unwrap();
    assert!(index_entries(&dir, "b.db").is_empty());
    // A clean close writes what waits: version 2's entry, not 1's nor 3's (b's own write's
    // entry, at its ordinal 0, goes with its local batch).
    drop(b);
    let a_ord = 1;
    let entries: Vec<(i64, i64)> = index_entries(&dir, "b.db")
        .into_iter()
        .filter(|(s, _)| *s == a_ord)
        .collect();
    assert_eq!(entries, vec![(a_ord, 2)]);
    let b = open(&dir, "b.db");
    let served = b
        .changesets(site, DbVersion(1), DbVersion(3), usize::MAX)
        .unwrap();
    let sizes: Vec<usize> = served.iter().map(|cs| cs.changes.len()).collect();
    assert_eq!(sizes, vec![0, 4, 0], "versions 1 and 3 are cleared on b");
}

#[test]
fn deferred_index_entries_are_served_and_a_crash_does_not_lose_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = open(&dir, "a.db");
    let site = a.site_id();
    insert_hosts(&mut a, 1..=10);
    // Fewer writes than a batch: their entries are not in the file yet, and the mark says so.
    assert!(
        index_entries(&dir, "a.db").is_empty(),
        "entries were written per commit"
    );
    assert_eq!(unindexed_marks(&dir, "a.db"), 1);
    // Extraction serves them all the same.
    let served = a
        .changesets(site, DbVersion(1), DbVersion(10), usize::MAX)
        .unwrap();
    assert_eq!(served.len(), 10);
    // A sentinel and three cells each.
    let sizes = |served: &[patina_core::Changeset]| -> Vec<usize> {
        served.iter().map(|cs| cs.changes.len()).collect()
    };
    assert_eq!(sizes(&served), vec![4; 10]);
    // A schema reload re-reads the head from the file: the deferred versions count.
    a.apply_schema_sql(&format!(
        "{SCHEMA} CREATE TABLE extra (id INTEGER PRIMARY KEY);"
    ))
    .unwrap();
    assert_eq!(a.db_version(), DbVersion(10));

    // A crash: no close, so nothing flushes the entries.
    std::mem::forget(a);
    let mut a = open(&dir, "a.db");
    assert_eq!(a.db_version(), DbVersion(10), "versions would be reused");
    assert_eq!(unindexed_marks(&dir, "a.db"), 0);
    assert_eq!(index_entries(&dir, "a.db").len(), 10);
    let served = a
        .changesets(site, DbVersion(1), DbVersion(10), usize::MAX)
        .unwrap();
    assert_eq!(
        sizes(&served),
        vec![4; 10],
        "a version came back empty after the crash"
    );
    let mut b = open(&dir, "b.db");
    sync(&a, &mut b);
    assert_eq!(rows(&b, "SELECT id FROM hosts").len(), 10);
    let out = a
        .transact(&[Statement::new("UPDATE hosts SET cpu = 1 WHERE id = 1")])
        .unwrap();
    assert_eq!(out.version, Some(DbVersion(11)));
    // A clean close writes what is deferred: nothing left to rebuild.
    drop(a);
    assert_eq!(unindexed_marks(&dir, "a.db"), 0);
    assert!(index_entries(&dir, "a.db").contains(&(0, 11)));
}

/// Long enough for any backup of a test's database.
const BACKUP_TIME_MAX: std::time::Duration = std::time::Duration::from_secs(600);

/// A backup still running at its deadline is stopped: no backup file, no partial one, and
/// the database goes on (its snapshot's hold on the WAL ends with it).
#[test]
fn a_backup_past_its_deadline_is_stopped_and_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = open(&dir, "a.db");
    // Thousands of rows: SQLite asks the handler only after a thousand steps of one statement,
    // and each table is copied by a statement of its own (about five steps a row).
    let rows: Vec<String> = (1..=5_000).map(|id| format!("({id}, 'h{id}')")).collect();
    a.transact(&[Statement::new(format!(
        "INSERT INTO hosts (id, name) VALUES {}",
        rows.join(", ")
    ))])
    .unwrap();
    let copy = dir.path().join("a.backup");
    let stopped =
        patina::store::backup::backup(&dir.path().join("a.db"), &copy, std::time::Duration::ZERO);
    assert!(
        matches!(stopped, Err(StoreError::DeadlinePassed(_))),
        "{stopped:?}"
    );
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("a.backup"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    a.transact(&[Statement::new(
        "INSERT INTO hosts (id, name) VALUES (5001, 'h5001')",
    )])
    .unwrap();
    patina::store::backup::backup(&dir.path().join("a.db"), &copy, BACKUP_TIME_MAX).unwrap();
    drop(a);
}

#[test]
fn a_backup_with_deferred_entries_restores_under_a_new_identity_with_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = open(&dir, "a.db");
    let old_site = a.site_id();
    for id in 1..=5 {
        a.transact(&[Statement::new(format!(
            "INSERT INTO hosts (id, name) VALUES ({id}, 'h{id}')"
        ))])
        .unwrap();
    }
    // Taken while `a` runs, with its entries deferred: the copy carries the mark.
    let copy = dir.path().join("a.backup");
    patina::store::backup::backup(&dir.path().join("a.db"), &copy, BACKUP_TIME_MAX).unwrap();
    assert_eq!(unindexed_marks(&dir, "a.backup"), 1);
    patina::store::backup::restore(&copy, &dir.path().join("c.db"), false).unwrap();
    let c = open(&dir, "c.db");
    assert_ne!(c.site_id(), old_site);
    // The entries belong to the old identity, whose five versions the copy holds; the new
    // identity has written nothing.
    assert_eq!(c.db_version(), DbVersion(0));
    let served = c
        .changesets(old_site, DbVersion(1), DbVersion(5), usize::MAX)
        .unwrap();
    let sizes: Vec<usize> = served.iter().map(|cs| cs.changes.len()).collect();
    assert_eq!(sizes, vec![4; 5]);
    drop(a);
}

/// A restore installs what it checked, whatever an earlier restore cut off left beside the
/// staging file (a WAL there was replayed onto the new copy), into a folder that need not
/// exist yet, and replaces a database with its WAL whole: nothing of the old one is left.
#[test]
fn a_restore_installs_what_it_checked_whatever_an_earlier_one_left() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = open(&dir, "a.db");
    a.transact(&[Statement::new(
        "INSERT INTO hosts (id, name) VALUES (1, 'one')",
    )])
    .unwrap();
    let copy = dir.path().join("a.backup");
    patina::store::backup::backup(&dir.path().join("a.db"), &copy, BACKUP_TIME_MAX).unwrap();
    drop(a);

    // Into a folder that does not exist, with junk where a cut-off restore stages.
    let target = dir.path().join("new/c.db");
    std::fs::create_dir_all(dir.path().join("new")).unwrap();
    for junk in [
        "c.db.restoring-wal",
        "c.db.restoring-journal",
        "c.db.restoring",
    ] {
        std::fs::write(dir.path().join("new").join(junk), b"not a journal").unwrap();
    }
    let first = patina::store::backup::restore(&copy, &target, false).unwrap();
    let fresh = dir.path().join("fresh/c.db");
    patina::store::backup::restore(&copy, &fresh, true).unwrap();
    let names = |folder: &str| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir.path().join(folder))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(names("new"), ["c.db", "c.db.lock"]);
    assert_eq!(names("fresh"), ["c.db", "c.db.lock"]);

    // Again over the first, which has a WAL and subscriptions: replaced whole.
    let name = |n: &str| dir.path().join("new").join(n);
    let mut c = Store::open(&StoreConfig {
        path: target.clone(),
        ..config(&dir, "unused.db")
    })
    .unwrap();
    assert_eq!(c.site_id(), first.site);
    c.transact(&[Statement::new(
        "INSERT INTO hosts (id, name) VALUES (2, 'two')",
    )])
    .unwrap();
    drop(c);
    std::fs::write(name("c.db.subscriptions"), b"x").unwrap();
    let second = patina::store::backup::restore(&copy, &target, false).unwrap();
    assert_ne!(second.site, first.site);
    assert_eq!(names("new"), ["c.db", "c.db.lock"]);
    let c = Store::open(&StoreConfig {
        path: target.clone(),
        ..config(&dir, "unused.db")
    })
    .unwrap();
    assert_eq!(c.site_id(), second.site);
    assert_eq!(
        rows(&c, "SELECT id FROM hosts ORDER BY id"),
        vec![vec![1.into()]],
        "the backup's rows, not the replaced database's"
    );
    drop(c);

    // From a copy of a running database's file and WAL, with a valid WAL of another
    // database where the restore stages: what the check read, WAL included, is installed,
    // and nothing else.
    let mut b = open(&dir, "b.db");
    b.transact(&[Statement::new(
        "INSERT INTO hosts (id, name) VALUES (7, 'seven')",
    )])
    .unwrap();
    let wal = dir.path().join("b.db-wal");
    assert!(
        std::fs::metadata(&wal).unwrap().len() > 0,
        "the row is in the WAL"
    );
    std::fs::copy(dir.path().join("b.db"), dir.path().join("copy.db")).unwrap();
    std::fs::copy(&wal, dir.path().join("copy.db-wal")).unwrap();
    std::fs::copy(&wal, name("c.db.restoring-wal")).unwrap();
    let third = patina::store::backup::restore(&dir.path().join("copy.db"), &target, true).unwrap();
    assert_eq!(third.site, b.site_id());
    drop(b);
    assert_eq!(names("new"), ["c.db", "c.db.lock"]);
    let c = Store::open(&StoreConfig {
        path: target,
        ..config(&dir, "unused.db")
    })
    .unwrap();
    assert_eq!(
        rows(&c, "SELECT id FROM hosts ORDER BY id"),
        vec![vec![7.into()]]
    );
}

#[test]
fn a_remote_merge_superseding_a_deferred_entry_leaves_no_stale_entry() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = open(&dir, "a.db");
    let mut b = open(&dir, "b.db");
    a.transact(&[Statement::new(
        "INSERT INTO hosts (id, name) VALUES (1, 'one')",
    )])
    .unwrap();
    a.transact(&[Statement::new(
        "INSERT INTO hosts (id, name) VALUES (2, 'two')",
    )])
    .unwrap();
    sync(&a, &mut b);
    // b deletes row 1: every origin of a's version 1 there is superseded, while a still
    // holds that version's entry in memory.
    b.transact(&[Statement::new("DELETE FROM hosts WHERE id = 1")])
        .unwrap();
    sync(&b, &mut a);
    assert_eq!(rows(&a, "SELECT id FROM hosts"), vec![vec![Value::from(2)]]);
    drop(a);
    let entries = index_entries(&dir, "a.db");
    assert!(
        !entries.contains(&(0, 1)),
        "a superseded version kept its entry: {entries:?}"
    );
    assert!(entries.contains(&(0, 2)), "{entries:?}");
}

#[test]
fn a_store_at_its_size_cap_still_opens_after_a_crash_left_entries_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = open(&dir, "a.db");
    // Long keys: the entries put back at the next open need pages of their own.
    for n in 0..10 {
        a.transact(&[Statement::with_params(
            "INSERT INTO kv (k, n, v) VALUES (?, ?, 1)",
            vec!["k".repeat(1500).into(), n.into()],
        )])
        .unwrap();
    }
    std::mem::forget(a);
    // Reopened under a cap below its size: it may not grow, yet it must open, with its head.
    let a = Store::open(&StoreConfig {
        max_db_bytes: Some(64 * 1024),
        ..config(&dir, "a.db")
    })
    .unwrap();
    assert_eq!(a.db_version(), DbVersion(10));
    let served = a
        .changesets(a.site_id(), DbVersion(1), DbVersion(10), usize::MAX)
        .unwrap();
    assert!(served.iter().all(|cs| !cs.changes.is_empty()));
}

#[test]
fn a_local_write_builds_on_the_stored_clock_after_a_remote_merge_or_a_rollback() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Store::open(&StoreConfig {
        changeset_bytes_max: Some(4096),
        ..config(&dir, "a.db")
    })
    .unwrap();
    let mut b = open(&dir, "b.db");
    let name_version = |out: patina::store::TxOutcome| -> u64 {
        let cs = out.changeset.unwrap();
        let change = cs
            .changes
            .iter()
            .find(|c| c.column == patina_core::Column::Name("name".into()))
            .unwrap();
        change.col_version.0
    };
    a.transact(&[Statement::new(
        "INSERT INTO hosts (id, name) VALUES (1, 'a1')",
    )])
    .unwrap();
    // Rolled back after its clocks were written (too large): its clock never counts.
    let err = a
        .transact(&[
            Statement::new("UPDATE hosts SET name = 'lost' WHERE id = 1"),
            Statement::new("INSERT INTO hosts (id, tags) VALUES (2, randomblob(5000))"),
        ])
        .unwrap_err();
    assert!(
        matches!(err, StoreError::TransactionTooLarge { .. }),
        "{err}"
    );
    let out = a
        .transact(&[Statement::new("UPDATE hosts SET name = 'a2' WHERE id = 1")])
        .unwrap();
    assert_eq!(name_version(out), 2);
    // b overwrites the cell twice; a merges it and writes it again: on top of b's version.
    sync(&a, &mut b);
    for name in ["b1", "b2"] {
        b.transact(&[Statement::new(format!(
            "UPDATE hosts SET name = '{name}' WHERE id = 1"
        ))])
        .unwrap();
    }
    sync(&b, &mut a);
    let out = a
        .transact(&[Statement::new("UPDATE hosts SET name = 'a3' WHERE id = 1")])
        .unwrap();
    assert_eq!(
        name_version(out),
        5,
        "the write did not build on the merged clock"
    );
    sync(&a, &mut b);
    let table = "SELECT id, name FROM hosts ORDER BY id";
    assert_eq!(rows(&a, table), rows(&b, table));
    assert_eq!(rows(&b, table), vec![vec![1.into(), "a3".into()]]);
}

/// Remote merges build each row write's SQL once per table and set of written columns (a bit
/// set of up to 128 columns, formatted each time beyond): rows of every shape, on a table wider
/// than that, a delete and writes of the same shape to other rows all arrive as written.
#[test]
fn remote_merges_write_rows_of_every_shape_on_a_wide_table() {
    let dir = tempfile::tempdir().unwrap();
    let columns: Vec<String> = (1..=140).map(|i| format!("c{i} INTEGER")).collect();
    let schema = dir.path().join("wide.sql");
    std::fs::write(
        &schema,
        format!(
            "CREATE TABLE wide (id INTEGER PRIMARY KEY, {});",
            columns.join(", ")
        ),
    )
    .unwrap();
    let open_wide = |name: &str| {
        Store::open(&StoreConfig {
            path: dir.path().join(name),
            schema_paths: vec![schema.clone()],
            max_db_bytes: None,
            changeset_bytes_max: None,
            parts_bytes_max: None,
        })
        .unwrap()
    };
    let mut a = open_wide("a.db");
    let mut b = open_wide("b.db");
    let write = |store: &mut Store, sql: &str| {
        store.transact(&[Statement::new(sql)]).unwrap();
    };
    // Every column written (past the 128th: formatted), then one column, then the same
    // column of other rows (the cached statement, other keys), then two columns, a delete.
    write(
        &mut a,
        "INSERT INTO wide (id, c1, c140) VALUES (1, 10, 1400)",
    );
    write(
        &mut a,
        "INSERT INTO wide (id, c1, c140) VALUES (2, 20, 2400)",
    );
    sync(&a, &mut b);
    write(&mut a, "UPDATE wide SET c2 = 2 WHERE id = 1");
    sync(&a, &mut b);
    write(&mut a, "UPDATE wide SET c2 = 3 WHERE id = 2");
    write(&mut a, "INSERT INTO wide (id) VALUES (3)");
    write(&mut a, "UPDATE wide SET c2 = 4 WHERE id = 3");
    write(
        &mut a,
        "UPDATE wide SET c139 = 139, c140 = 140 WHERE id = 3",
    );
    write(&mut a, "UPDATE wide SET c140 = 141 WHERE id = 2");
    write(&mut a, "UPDATE wide SET c1 = 21 WHERE id = 2");
    write(&mut a, "UPDATE wide SET c1 = 5, c2 = 6 WHERE id = 3");
    // Columns 12 and 140 alone: a bit set that wrapped at 128 would give them one statement.
    write(&mut a, "UPDATE wide SET c12 = 12 WHERE id = 2");
    write(&mut a, "UPDATE wide SET c140 = 7 WHERE id = 3");
    sync(&a, &mut b);
    write(&mut a, "DELETE FROM wide WHERE id = 1");
    sync(&a, &mut b);
    let all = "SELECT id, c1, c2, c12, c139, c140 FROM wide ORDER BY id";
    let expected = vec![
        vec![
            2.into(),
            21.into(),
            3.into(),
            12.into(),
            Value::Null,
            141.into(),
        ],
        vec![
            3.into(),
            5.into(),
            6.into(),
            Value::Null,
            139.into(),
            7.into(),
        ],
    ];
    assert_eq!(rows(&a, all), expected);
    assert_eq!(rows(&b, all), expected);
}

/// A local write skips reading the clock of a row whose key is above every key its table has
/// a clock for (it can have none). That bound must follow every clock written: a row deleted
/// and then inserted again, once the clock cache has forgotten it, is a new incarnation (causal
/// length 3), not a first insert (1) that peers holding the delete would ignore. The same after
/// a reopen (the bound read back from the file) and for a key a remote merge brought in.
#[test]
fn a_reinsert_below_the_greatest_key_reads_its_tombstone() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = open(&dir, "a.db");
    let mut b = open(&dir, "b.db");
    let exec = |store: &mut Store, sql: &str| {
        store.transact(&[Statement::new(sql)]).unwrap();
    };
    exec(&mut a, "INSERT INTO hosts (id) VALUES (1)");
    exec(&mut a, "DELETE FROM hosts WHERE id = 1");
    // More rows than the clock cache holds, with greater keys: it empties and forgets row 1.
    let many: Vec<Statement> = (2..=1100)
        .map(|id| Statement::with_params("INSERT INTO hosts (id) VALUES (?)", vec![id.into()]))
        .collect();
    a.transact(&many).unwrap();
    exec(&mut a, "INSERT INTO hosts (id) VALUES (1)");
    assert_eq!(cl_of(&a, "hosts", 1), 3);
    // Read back from the file at open.
    exec(&mut a, "DELETE FROM hosts WHERE id = 1");
    drop(a);
    let mut a = open(&dir, "a.db");
    exec(&mut a, "INSERT INTO hosts (id) VALUES (1)");
    assert_eq!(cl_of(&a, "hosts", 1), 5);
    // A key B only has from a remote merge, deleted there: B's own insert of it again.
    exec(&mut a, "INSERT INTO hosts (id) VALUES (5000)");
    exec(&mut a, "DELETE FROM hosts WHERE id = 5000");
    sync(&a, &mut b);
    assert_eq!(cl_of(&b, "hosts", 5000), 2);
    exec(&mut b, "INSERT INTO hosts (id) VALUES (5000)");
    assert_eq!(cl_of(&b, "hosts", 5000), 3);
}

/// A cluster's first write is the first remote apply of every node it reaches: each compiling
/// its statements then made the first write the slowest of a live run (docs/BENCHMARKS.md,
/// issue 21). The store prepares them at open and after a schema change instead, fresh (a
/// statement prepared before a schema change is compiled again at its next run). Counted are
/// the store's own statements and its merges' row writes (`Store::statements_compiled`), which
/// are all a one-row remote insert runs; the rare paths through rusqlite's cache (parts of a
/// large changeset, a tie's cell read) are not.
#[test]
fn a_first_remote_apply_after_open_or_a_schema_change_compiles_none_of_the_stores_statements() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = open(&dir, "a.db");
    let site = a.site_id();
    let mut b = open(&dir, "b.db");
    let deliver = |a: &Store, b: &mut Store, version: u64| -> u64 {
        let changesets = a
            .changesets(site, DbVersion(version), DbVersion(version), usize::MAX)
            .unwrap();
        let before = b.statements_compiled();
        for outcome in b.apply_changesets(&changesets).unwrap() {
            assert!(
                matches!(outcome, ApplyOutcome::Applied { .. }),
                "{outcome:?}"
            );
        }
        b.statements_compiled() - before
    };
    a.transact(&[Statement::new(
        "INSERT INTO hosts (id, name, cpu, tags) VALUES (1, 'web', 0.5, x'01')",
    )])
    .unwrap();
    assert_eq!(deliver(&a, &mut b, 1), 0, "the first apply after open");

    let more = format!("{SCHEMA}\nCREATE TABLE extra (id INTEGER PRIMARY KEY, note TEXT);");
    a.apply_schema_sql(&more).unwrap();
    b.apply_schema_sql(&more).unwrap();
    a.transact(&[Statement::new(
        "INSERT INTO extra (id, note) VALUES (1, 'new table')",
    )])
    .unwrap();
    let version = a.db_version().get();
    assert_eq!(
        deliver(&a, &mut b, version),
        0,
        "the first apply after a schema change, to the new table"
    );
    a.transact(&[Statement::new(
        "INSERT INTO hosts (id, name, cpu, tags) VALUES (2, 'db', 0.25, x'02')",
    )])
    .unwrap();
    assert_eq!(
        deliver(&a, &mut b, version + 1),
        0,
        "and to a table that was there before it"
    );
    assert_eq!(
        rows(&b, "SELECT note FROM extra"),
        vec![vec![Value::from("new table")]]
    );
}

/// A sync answer is read a chunk at a time (`Store::changesets_within`): each chunk stops once
/// its changesets come to the byte budget (at least one, however large), and reading on from
/// after a chunk's last version yields every version once, in order, cleared ones included.
#[test]
fn changesets_read_in_chunks_of_bounded_bytes_cover_every_version_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(&dir, "a.db");
    let big = "x".repeat(100_000);
    for i in 0..8 {
        store
            .transact(&[Statement::with_params(
                "INSERT INTO hosts (id, name) VALUES (?, ?)",
                vec![Value::Integer(i), big.as_str().into()],
            )])
            .unwrap();
    }
    // Version 9 overwrites version 3's only row: version 3 comes back cleared.
    store
        .transact(&[Statement::new("DELETE FROM hosts WHERE id = 2")])
        .unwrap();
    let site = store.site_id();
    let head = store.db_version();
    assert_eq!(head, DbVersion(9));

    let mut chunks = Vec::new();
    let mut next = 1;
    while next <= head.get() {
        let chunk = store
            .changesets_within(site, DbVersion(next), head, usize::MAX, 250_000)
            .unwrap();
        let last = chunk.last().expect("versions left").id.version.get();
        chunks.push(chunk);
        next = last + 1;
    }
    let sizes: Vec<usize> = chunks.iter().map(Vec::len).collect();
    // Three rows of 100 kB cross the 250 kB budget; the cleared version 3 weighs next to
    // nothing, so the first chunk holds four versions; the last, the 100 kB row of version 8
    // and the delete.
    assert_eq!(sizes, [4, 3, 2], "{sizes:?}");
    let versions: Vec<u64> = chunks
        .iter()
        .flatten()
        .map(|c| c.id.version.get())
        .collect();
    assert_eq!(versions, (1..=9).collect::<Vec<_>>());
    let all = store
        .changesets(site, DbVersion(1), head, usize::MAX)
        .unwrap();
    assert_eq!(chunks.concat(), all, "the same changesets as one read");
    assert!(all[2].changes.is_empty(), "version 3 is cleared");

    // A budget below one changeset still reads one.
    let one = store
        .changesets_within(site, DbVersion(1), head, usize::MAX, 1)
        .unwrap();
    assert_eq!(one.len(), 1);
}
