//! Bad input gets a typed error and loses nothing: schemas that break a rule, non-additive
//! schema changes, remote changes for unknown tables or columns, wrong types, malformed bytes,
//! a full database. Also: durability across reopen and additive schema evolution.

use patina::store::{
    ApplyOutcome, ChangeError, SchemaError, Statement, Store, StoreConfig, StoreError,
};
use patina_core::change::{Change, Changeset, ChangesetId, Column};
use patina_core::ids::{CausalLength, ColVersion, DbVersion, Seq, SiteId};
use patina_core::pk::PackedPk;
use patina_core::validate::InvalidChange;
use patina_core::value::Value;
use patina_core::wire::{changeset_to_bytes, decode_changeset, DecodeError, Limits};

const SCHEMA: &str = "
CREATE TABLE hosts (id INTEGER PRIMARY KEY, name TEXT NOT NULL DEFAULT '', port INTEGER, load REAL);
CREATE TABLE strict_kv (k TEXT NOT NULL PRIMARY KEY, n INTEGER) STRICT;
";

fn config(dir: &tempfile::TempDir, schema: &str) -> StoreConfig {
    let path = dir.path().join("schema.sql");
    std::fs::write(&path, schema).unwrap();
    StoreConfig {
        path: dir.path().join("db.sqlite"),
        schema_paths: vec![path],
        max_db_bytes: None,
        changeset_bytes_max: None,
        parts_bytes_max: None,
    }
}

fn rows(store: &Store, sql: &str) -> Vec<Vec<Value>> {
    store.query(&Statement::new(sql)).unwrap().rows
}

fn change(table: &str, pk: i64, column: Option<&str>, value: Value, cl: u64, seq: u32) -> Change {
    Change {
        table: table.into(),
        pk: PackedPk::pack(&[Value::Integer(pk)]).unwrap(),
        column: column.map_or(Column::Sentinel, |c| Column::Name(c.into())),
        value,
        col_version: ColVersion(1),
        cl: CausalLength(cl),
        seq: Seq(seq),
    }
}

fn remote(version: u64, changes: Vec<Change>) -> Changeset {
    Changeset::whole(
        ChangesetId {
            site: SiteId([7; 16]),
            version: DbVersion(version),
        },
        changes,
    )
}

fn rejected(outcome: &ApplyOutcome) -> &ChangeError {
    match outcome {
        ApplyOutcome::Rejected(StoreError::Change { source, .. }) => source,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn schema_rule_violations_name_table_and_rule_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        &dir,
        "CREATE TABLE ok (id INTEGER PRIMARY KEY); CREATE TABLE bad (id INTEGER PRIMARY KEY, email TEXT UNIQUE);",
    );
    match Store::open(&cfg) {
        Err(StoreError::Schema(SchemaError::Rule { table, rule })) => {
            assert_eq!(table, "bad");
            assert!(rule.contains("UNIQUE"), "{rule}");
        }
        other => panic!("expected a rule error, got {other:?}"),
    }
    // A good schema opens the same file afterwards; the refused one created no table.
    let store = Store::open(&config(&dir, SCHEMA)).unwrap();
    assert_eq!(
        store.table_names(),
        vec!["hosts".to_string(), "strict_kv".to_string()]
    );
    assert!(Store::open(&StoreConfig {
        schema_paths: vec![dir.path().join("missing.sql")],
        ..cfg
    })
    .is_err_and(|e| matches!(e, StoreError::Schema(SchemaError::Read { .. }))));
}

#[test]
fn non_additive_schema_change_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&config(&dir, SCHEMA)).unwrap();
    store
        .transact(&[Statement::new(
            "INSERT INTO hosts (id, name) VALUES (1, 'a')",
        )])
        .unwrap();
    let err = store
        .apply_schema_sql(
            "CREATE TABLE hosts (id INTEGER PRIMARY KEY, name BLOB, port INTEGER, load REAL);",
        )
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Schema(SchemaError::NotAdditive { .. })),
        "{err}"
    );
    assert_eq!(
        rows(&store, "SELECT id, name FROM hosts"),
        vec![vec![1.into(), "a".into()]]
    );
    // A partly good change (new table + a bad one) is refused whole.
    let err = store
        .apply_schema_sql(&format!(
            "{SCHEMA} CREATE TABLE extra (id INTEGER PRIMARY KEY); CREATE TABLE worse (x TEXT);"
        ))
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Schema(SchemaError::Rule { .. })),
        "{err}"
    );
    assert_eq!(store.table_names().len(), 2);
    store
        .transact(&[Statement::new("UPDATE hosts SET name = 'b'")])
        .unwrap();
}

#[test]
fn remote_changes_for_unknown_tables_columns_and_wrong_types_are_rejected_alone() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&config(&dir, SCHEMA)).unwrap();
    let good = remote(
        1,
        vec![
            change("hosts", 1, None, Value::Null, 1, 0),
            change("hosts", 1, Some("name"), "web".into(), 1, 1),
        ],
    );
    let batch = vec![
        remote(2, vec![change("nope", 1, None, Value::Null, 1, 0)]),
        remote(3, vec![change("hosts", 2, Some("nope"), 1.into(), 1, 0)]),
        remote(4, vec![change("hosts", 2, Some("id"), 1.into(), 1, 0)]),
        remote(5, vec![change("strict_kv", 2, Some("n"), 1.into(), 1, 0)]),
        remote(6, vec![change("hosts", 2, Some("port"), "80".into(), 1, 0)]),
        remote(7, vec![change("hosts", 2, Some("name"), 5.into(), 1, 0)]),
        remote(8, vec![change("hosts", 2, Some("name"), Value::Null, 1, 0)]),
        remote(9, vec![change("hosts", 2, Some("load"), 3.into(), 1, 0)]),
        remote(10, vec![change("hosts", 2, Some("name"), "x".into(), 2, 0)]),
        remote(11, vec![change("hosts", 2, None, 1.into(), 1, 0)]),
        remote(12, vec![change("hosts", 2, None, Value::Null, 0, 0)]),
        remote(
            13,
            vec![
                change("hosts", 2, None, Value::Null, 1, 0),
                change("hosts", 3, None, Value::Null, 1, 0),
            ],
        ),
        // A valid change followed by an invalid one in the same changeset: nothing of it lands.
        remote(
            14,
            vec![
                change("hosts", 9, None, Value::Null, 1, 0),
                change("hosts", 9, Some("port"), " 8.5e1 ".into(), 1, 1),
            ],
        ),
        good.clone(),
    ];
    let before = store.clock_snapshot().unwrap();
    let outcomes = store.apply_changesets(&batch).unwrap();
    assert!(matches!(rejected(&outcomes[0]), ChangeError::UnknownTable(t) if t == "nope"));
    assert!(
        matches!(rejected(&outcomes[1]), ChangeError::UnknownColumn { column, .. } if column == "nope")
    );
    assert!(
        matches!(rejected(&outcomes[2]), ChangeError::UnknownColumn { column, .. } if column == "id")
    );
    // strict_kv's key is TEXT: an integer key is the wrong type.
    assert!(
        matches!(rejected(&outcomes[3]), ChangeError::WrongType { column, .. } if column == "k")
    );
    // Text that SQLite would turn into a number, a number into text, NULL into NOT NULL, an
    // integer into a REAL column: each would store something other than what was sent.
    for (i, outcome) in outcomes.iter().enumerate().take(8).skip(4) {
        assert!(
            matches!(rejected(outcome), ChangeError::WrongType { .. }),
            "{i}: {outcome:?}"
        );
    }
    assert!(matches!(
        rejected(&outcomes[8]),
        ChangeError::Invalid(InvalidChange::CellOnDeletedRow { .. })
    ));
    assert!(matches!(
        rejected(&outcomes[9]),
        ChangeError::Invalid(InvalidChange::SentinelWithValue { .. })
    ));
    assert!(matches!(
        rejected(&outcomes[10]),
        ChangeError::Invalid(InvalidChange::ZeroCausalLength { .. })
    ));
    assert!(matches!(
        rejected(&outcomes[11]),
        ChangeError::Invalid(InvalidChange::DuplicateSeq { .. })
    ));
    assert!(matches!(
        rejected(&outcomes[12]),
        ChangeError::WrongType { .. }
    ));
    // Text that is not a number stays text in an INTEGER column, so it is accepted as sent.
    let kept = remote(
        15,
        vec![
            change("hosts", 4, None, Value::Null, 1, 0),
            change("hosts", 4, Some("port"), "eighty".into(), 1, 1),
        ],
    );
    assert!(matches!(
        store.apply_changesets(&[kept]).unwrap()[0],
        ApplyOutcome::Applied { .. }
    ));
    assert_eq!(
        rows(&store, "SELECT typeof(port) FROM hosts WHERE id = 4"),
        vec![vec!["text".into()]]
    );
    assert!(matches!(
        outcomes[13],
        ApplyOutcome::Applied {
            changes_won: 2,
            rows_changed: 1,
            ..
        }
    ));
    // Only the good changeset left a trace.
    assert_eq!(
        rows(&store, "SELECT id, name FROM hosts WHERE id != 4"),
        vec![vec![1.into(), "web".into()]]
    );
    assert_eq!(store.clock_snapshot().unwrap().len(), before.len() + 2);
    let book = store.bookkeeping().site(&SiteId([7; 16])).unwrap();
    assert!(book.applied.contains(1));
    assert!(!book.applied.contains(2) && !book.applied.contains(14));
    // Refused changesets can come back corrected later.
    let fixed = remote(
        14,
        vec![
            change("hosts", 9, None, Value::Null, 1, 0),
            change("hosts", 9, Some("port"), 80.into(), 1, 1),
        ],
    );
    assert!(matches!(
        store.apply_changesets(&[fixed]).unwrap()[0],
        ApplyOutcome::Applied { .. }
    ));
}

#[test]
fn primary_key_arity_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&config(&dir, SCHEMA)).unwrap();
    let mut bad = change("hosts", 1, None, Value::Null, 1, 0);
    bad.pk = PackedPk::pack(&[Value::Integer(1), Value::Integer(2)]).unwrap();
    let outcomes = store.apply_changesets(&[remote(1, vec![bad])]).unwrap();
    assert!(matches!(
        rejected(&outcomes[0]),
        ChangeError::PkArity {
            got: 2,
            expected: 1,
            ..
        }
    ));
}

#[test]
fn malformed_bytes_are_decode_errors() {
    let cs = remote(
        1,
        vec![change("hosts", 1, Some("name"), "héllo".into(), 1, 0)],
    );
    let bytes = changeset_to_bytes(&cs);
    let limits = Limits::default();
    assert_eq!(decode_changeset(&bytes, &limits).unwrap(), cs);
    // Truncated anywhere.
    assert!(decode_changeset(&bytes[..bytes.len() - 1], &limits).is_err());
    // A short site id: the input ends inside it.
    assert_eq!(
        decode_changeset(&bytes[..10], &limits),
        Err(DecodeError::Truncated("site id"))
    );
    // Invalid UTF-8 in a text value.
    let mut bad = bytes.clone();
    let at = bad.windows(2).position(|w| w == "é".as_bytes()).unwrap();
    bad[at] = 0xff;
    assert_eq!(
        decode_changeset(&bad, &limits),
        Err(DecodeError::InvalidUtf8("text value"))
    );
    // Oversized.
    let big = remote(
        1,
        vec![change(
            "hosts",
            1,
            Some("name"),
            "x".repeat(100).into(),
            1,
            0,
        )],
    );
    let small = Limits {
        value_bytes_max: 64,
        ..Limits::default()
    };
    assert!(matches!(
        decode_changeset(&changeset_to_bytes(&big), &small),
        Err(DecodeError::TooLarge { .. })
    ));
    assert!(SiteId::from_slice(&[1; 8]).is_err());
}

/// Inserts rows holding `blob` until a write fails (the store's size cap): how many were
/// written, and the failure.
fn fill_until_full(store: &mut Store, blob: &str) -> (usize, StoreError) {
    for i in 0..200usize {
        let stmt = Statement::with_params(
            "INSERT INTO hosts (id, name) VALUES (?, ?)",
            vec![(i as i64).into(), blob.into()],
        );
        if let Err(e) = store.transact(&[stmt]) {
            return (i, e);
        }
    }
    panic!("the size cap was never hit");
}

#[test]
fn a_full_database_fails_cleanly_and_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        max_db_bytes: Some(256 * 1024),
        ..config(&dir, SCHEMA)
    };
    let mut store = Store::open(&cfg).unwrap();
    let blob = "x".repeat(4000);
    let (written, err) = fill_until_full(&mut store, &blob);
    assert!(err.to_string().contains("full"), "{err}");
    // Nothing of the failed transaction: exactly `written` rows and versions.
    assert_eq!(store.db_version(), DbVersion(written as u64));
    assert_eq!(
        rows(&store, "SELECT count(*) FROM hosts"),
        vec![vec![(written as i64).into()]]
    );
    // Remote changesets fail the same way, as an error for the batch, with nothing applied.
    let big: Vec<Changeset> = (0..50)
        .map(|v| {
            remote(
                v + 1,
                vec![
                    change("hosts", 1000 + v as i64, None, Value::Null, 1, 0),
                    change(
                        "hosts",
                        1000 + v as i64,
                        Some("name"),
                        blob.clone().into(),
                        1,
                        1,
                    ),
                ],
            )
        })
        .collect();
    assert!(store.apply_changesets(&big).is_err());
    assert!(store.bookkeeping().site(&SiteId([7; 16])).is_none());
    // Freeing space makes it usable again.
    store
        .transact(&[Statement::new("DELETE FROM hosts WHERE id < 10")])
        .unwrap();
    store
        .transact(&[Statement::new("INSERT INTO hosts (id) VALUES (5000)")])
        .unwrap();
}

/// The cap covers the write-ahead log too: a reader that keeps an old snapshot stops
/// checkpoints, and every commit then grows the WAL; past the WAL's share writes are refused,
/// nothing is lost, and they resume once the reader lets go.
#[test]
fn a_pinned_reader_cannot_grow_the_wal_past_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let cap: u64 = 512 * 1024;
    let cfg = StoreConfig {
        max_db_bytes: Some(cap),
        ..config(&dir, SCHEMA)
    };
    let mut store = Store::open(&cfg).unwrap();
    // As in the agent: checkpoints come from another thread, here none at all.
    store.checkpoint_in_background().unwrap();
    let blob = "x".repeat(3000);
    let update = |i: usize| {
        Statement::with_params(
            "INSERT OR REPLACE INTO hosts (id, name, port) VALUES (1, ?, ?)",
            vec![blob.clone().into(), (i as i64).into()],
        )
    };
    store.transact(&[update(0)]).unwrap();
    let pinned = rusqlite::Connection::open(&cfg.path).unwrap();
    pinned.execute_batch("BEGIN").unwrap();
    let _: i64 = pinned
        .query_row("SELECT count(*) FROM hosts", [], |r| r.get(0))
        .unwrap();
    let files = || {
        let size = |name: &str| std::fs::metadata(dir.path().join(name)).map_or(0, |m| m.len());
        size("db.sqlite") + size("db.sqlite-wal")
    };
    let mut written = 1;
    let refused = loop {
        assert!(
            written < 2000,
            "the WAL grew to {} bytes unrefused",
            files()
        );
        match store.transact(&[update(written)]) {
            Ok(_) => written += 1,
            Err(e) => break e,
        }
    };
    assert!(matches!(refused, StoreError::WalFull { .. }), "{refused}");
    assert!(refused.to_string().contains("full"), "{refused}");
    // Over by at most one transaction's frames (a few pages).
    assert!(files() <= cap + 64 * 1024, "{} bytes on disk", files());
    // Remote changesets wait the same way, with nothing applied.
    assert!(store
        .apply_changesets(&[remote(1, vec![change("hosts", 9, None, Value::Null, 1, 0)])])
        .is_err());
    assert!(store.bookkeeping().site(&SiteId([7; 16])).is_none());
    drop(pinned);
    store.transact(&[update(written)]).unwrap();
    assert_eq!(store.db_version(), DbVersion(written as u64 + 1));
    assert_eq!(
        rows(&store, "SELECT port FROM hosts WHERE id = 1"),
        vec![vec![(written as i64).into()]]
    );
    assert!(
        store.wal_bytes() <= cap / 4,
        "{} bytes in the WAL",
        store.wal_bytes()
    );
    assert!(files() <= cap + 64 * 1024, "{} bytes on disk", files());
}

#[test]
fn reopen_keeps_rows_clocks_versions_and_site() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir, SCHEMA);
    let (site, clocks) = {
        let mut store = Store::open(&cfg).unwrap();
        store
            .transact(&[Statement::new(
                "INSERT INTO hosts (id, name) VALUES (1, 'a'), (2, 'b')",
            )])
            .unwrap();
        store
            .transact(&[Statement::new("DELETE FROM hosts WHERE id = 2")])
            .unwrap();
        store
            .apply_changesets(&[remote(3, vec![change("hosts", 7, None, Value::Null, 1, 0)])])
            .unwrap();
        (store.site_id(), store.clock_snapshot().unwrap())
    };
    let mut store = Store::open(&cfg).unwrap();
    assert_eq!(store.site_id(), site);
    assert_eq!(store.db_version(), DbVersion(2));
    assert_eq!(store.clock_snapshot().unwrap(), clocks);
    let remote_site = store.bookkeeping().site(&SiteId([7; 16])).unwrap();
    assert_eq!(remote_site.needs(), vec![(1, 2)]);
    let out = store
        .transact(&[Statement::new("UPDATE hosts SET name = 'c' WHERE id = 1")])
        .unwrap();
    assert_eq!(out.version, Some(DbVersion(3)));
}

#[test]
fn additive_schema_changes_and_backfill() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir, SCHEMA);
    // A plain table with rows, in the file before Patina manages it.
    rusqlite::Connection::open(&cfg.path)
        .unwrap()
        .execute_batch("CREATE TABLE legacy (id INTEGER PRIMARY KEY, v TEXT); INSERT INTO legacy VALUES (1, 'a'), (2, 'b');")
        .unwrap();
    let mut store = Store::open(&cfg).unwrap();
    store
        .transact(&[Statement::new(
            "INSERT INTO hosts (id, name) VALUES (1, 'a')",
        )])
        .unwrap();
    // Reloading the same schema changes nothing.
    store.apply_schema_sql(SCHEMA).unwrap();
    assert_eq!(store.db_version(), DbVersion(1));

    let v2 = format!(
        "{}
         CREATE TABLE strict_kv (k TEXT NOT NULL PRIMARY KEY, n INTEGER) STRICT;
         CREATE TABLE legacy (id INTEGER PRIMARY KEY, v TEXT);
         CREATE INDEX hosts_zone ON hosts (zone);",
        "CREATE TABLE hosts (id INTEGER PRIMARY KEY, name TEXT NOT NULL DEFAULT '', port INTEGER, load REAL,
                             zone TEXT NOT NULL DEFAULT 'eu');"
    );
    store.apply_schema_sql(&v2).unwrap();
    // Existing rows read the new column's default; the legacy rows got clocks as version 2.
    assert_eq!(
        rows(&store, "SELECT id, zone FROM hosts"),
        vec![vec![1.into(), "eu".into()]]
    );
    assert_eq!(store.db_version(), DbVersion(2));
    let backfill = store
        .changesets(store.site_id(), DbVersion(2), DbVersion(2), 1)
        .unwrap();
    assert_eq!(
        backfill[0].changes.len(),
        4,
        "2 legacy rows: a sentinel and a cell each"
    );
    let zone_write = store
        .transact(&[Statement::new("UPDATE hosts SET zone = 'us' WHERE id = 1")])
        .unwrap()
        .changeset
        .unwrap();

    // A replica on the new schema converges; one still on the old schema refuses the new column
    // and accepts it after its own reload.
    let new_dir = tempfile::tempdir().unwrap();
    let mut new_replica = Store::open(&config(&new_dir, &v2)).unwrap();
    let all = store
        .changesets(store.site_id(), DbVersion(1), DbVersion(3), 10)
        .unwrap();
    for outcome in new_replica.apply_changesets(&all).unwrap() {
        assert!(
            matches!(outcome, ApplyOutcome::Applied { .. }),
            "{outcome:?}"
        );
    }
    assert_eq!(
        new_replica.clock_snapshot().unwrap(),
        store.clock_snapshot().unwrap()
    );
    assert_eq!(
        rows(&new_replica, "SELECT * FROM legacy ORDER BY id"),
        rows(&store, "SELECT * FROM legacy ORDER BY id")
    );

    let old_dir = tempfile::tempdir().unwrap();
    let mut old_replica = Store::open(&config(&old_dir, SCHEMA)).unwrap();
    let outcomes = old_replica
        .apply_changesets(std::slice::from_ref(&zone_write))
        .unwrap();
    assert!(
        matches!(rejected(&outcomes[0]), ChangeError::UnknownColumn { column, .. } if column == "zone")
    );
    old_replica.apply_schema_sql(&v2).unwrap();
    let outcomes = old_replica.apply_changesets(&all).unwrap();
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, ApplyOutcome::Applied { .. })),
        "{outcomes:?}"
    );
    assert_eq!(
        rows(&old_replica, "SELECT id, zone FROM hosts"),
        vec![vec![1.into(), "us".into()]]
    );
}

/// A remote version above what SQLite's integers hold is refused: it was applied, and once in
/// the file it read back as a negative number, outside every range extraction asks for, so the
/// node would serve it to peers as an empty changeset. The largest that fits applies and is
/// served whole.
#[test]
fn a_remote_version_beyond_the_stores_integers_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&config(&dir, SCHEMA)).unwrap();
    let too_large = remote(1 << 63, vec![change("hosts", 1, None, Value::Null, 1, 0)]);
    let outcomes = store.apply_changesets(&[too_large]).unwrap();
    assert!(
        matches!(
            rejected(&outcomes[0]),
            ChangeError::Invalid(InvalidChange::VersionTooLarge { version }) if *version == 1 << 63
        ),
        "{outcomes:?}"
    );
    assert!(rows(&store, "SELECT id FROM hosts").is_empty());

    let largest = i64::MAX as u64;
    let fits = remote(largest, vec![change("hosts", 2, None, Value::Null, 1, 0)]);
    let outcomes = store.apply_changesets(&[fits]).unwrap();
    assert!(
        matches!(outcomes[0], ApplyOutcome::Applied { .. }),
        "{outcomes:?}"
    );
    let served = store
        .changesets(SiteId([7; 16]), DbVersion(largest), DbVersion(largest), 1)
        .unwrap();
    assert_eq!(served.len(), 1);
    assert_eq!(served[0].changes.len(), 1, "served whole, not as cleared");
}

/// A table that becomes replicated with rows in it is registered in one transaction and its
/// rows get clocks in the next. When that second one does not commit (a backfill over the
/// changeset cap, a crash), the rows are still owed clocks at the next start: before, the
/// table counted as registered and was never backfilled, so its rows were never sent to a peer.
/// A backfill that cannot be made does not keep the store from opening.
#[test]
fn rows_owed_clocks_by_a_backfill_that_did_not_commit_get_them_at_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let schema = format!("{SCHEMA}\nCREATE TABLE legacy (id INTEGER PRIMARY KEY, v TEXT);");
    let mut cfg = config(&dir, &schema);
    rusqlite::Connection::open(&cfg.path)
        .unwrap()
        .execute_batch(
            "CREATE TABLE legacy (id INTEGER PRIMARY KEY, v TEXT);
             INSERT INTO legacy VALUES (1, 'a'), (2, 'b');",
        )
        .unwrap();
    // The backfill's changeset is over a tiny cap: the store opens, its rows still owed
    // clocks, at this open and the next.
    cfg.changeset_bytes_max = Some(16);
    for _ in 0..2 {
        let store = Store::open(&cfg).unwrap();
        assert_eq!(store.db_version(), DbVersion(0), "nothing backfilled");
        assert_eq!(store.tables_owed_backfill(), ["legacy"], "and it says so");
        assert_eq!(
            rows(&store, "SELECT count(*) FROM legacy"),
            vec![vec![2.into()]]
        );
    }

    // With room, the next open gives the rows their clocks, once.
    cfg.changeset_bytes_max = None;
    let store = Store::open(&cfg).unwrap();
    assert_eq!(store.db_version(), DbVersion(1));
    assert!(store.tables_owed_backfill().is_empty());
    let backfill = store
        .changesets(store.site_id(), DbVersion(1), DbVersion(1), 1)
        .unwrap();
    assert_eq!(
        backfill[0].changes.len(),
        4,
        "2 legacy rows: a sentinel and a cell each"
    );
    drop(store);
    let store = Store::open(&cfg).unwrap();
    assert_eq!(store.db_version(), DbVersion(1), "backfilled once");
    drop(store);

    // The same when a reload of the schema at run time fails to backfill and the process
    // then stops.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir, SCHEMA);
    drop(Store::open(&cfg).unwrap());
    rusqlite::Connection::open(&cfg.path)
        .unwrap()
        .execute_batch(
            "CREATE TABLE legacy (id INTEGER PRIMARY KEY, v TEXT);
             INSERT INTO legacy VALUES (1, 'a'), (2, 'b');",
        )
        .unwrap();
    cfg.changeset_bytes_max = Some(16);
    let mut store = Store::open(&cfg).unwrap();
    std::fs::write(&cfg.schema_paths[0], &schema).unwrap();
    let refused = store.apply_schema_files(&cfg.schema_paths).unwrap_err();
    assert!(
        matches!(refused, StoreError::TransactionTooLarge { .. }),
        "{refused}"
    );
    drop(store);
    cfg.changeset_bytes_max = None;
    let store = Store::open(&cfg).unwrap();
    assert_eq!(store.db_version(), DbVersion(1));
    assert_eq!(
        store
            .changesets(store.site_id(), DbVersion(1), DbVersion(1), 1)
            .unwrap()[0]
            .changes
            .len(),
        4
    );
}

/// The head is not stored on every transaction: a reopen finds it from the changes index. When a
/// remote merge overwrites everything the newest local version wrote, the head must have been
/// stored, or a reopened node would hand out that version again.
#[test]
fn reopen_never_reuses_a_version_after_a_remote_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir, SCHEMA);
    {
        let mut store = Store::open(&cfg).unwrap();
        store
            .transact(&[Statement::new(
                "INSERT INTO hosts (id, name) VALUES (1, 'a')",
            )])
            .unwrap();
        store
            .transact(&[Statement::new("UPDATE hosts SET port = 80 WHERE id = 1")])
            .unwrap();
        // A remote write of the same cell at a higher version: version 2 no longer holds a clock.
        let mut overwrite = change("hosts", 1, Some("port"), 8080.into(), 1, 0);
        overwrite.col_version = ColVersion(5);
        let outcomes = store
            .apply_changesets(&[remote(1, vec![overwrite])])
            .unwrap();
        assert!(matches!(
            outcomes[0],
            ApplyOutcome::Applied { changes_won: 1, .. }
        ));
        let v2 = store
            .changesets(store.site_id(), DbVersion(2), DbVersion(2), 1)
            .unwrap();
        assert!(v2[0].is_cleared());
    }
    let mut store = Store::open(&cfg).unwrap();
    assert_eq!(store.db_version(), DbVersion(2));
    let out = store
        .transact(&[Statement::new("UPDATE hosts SET name = 'b' WHERE id = 1")])
        .unwrap();
    assert_eq!(out.version, Some(DbVersion(3)));
}

/// A transaction whose changeset could not be replicated (over the size every node accepts) is
/// refused whole, with an error that says to split it.
#[test]
fn a_transaction_too_large_to_replicate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        changeset_bytes_max: Some(64 * 1024),
        parts_bytes_max: None,
        ..config(&dir, SCHEMA)
    };
    let mut store = Store::open(&cfg).unwrap();
    let big = "x".repeat(1000);
    let statements: Vec<Statement> = (0..100)
        .map(|i| {
            Statement::with_params(
                "INSERT INTO hosts (id, name) VALUES (?, ?)",
                vec![i.into(), big.clone().into()],
            )
        })
        .collect();
    let err = store.transact(&statements).unwrap_err();
    assert!(
        matches!(err, StoreError::TransactionTooLarge { limit: 65536, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("split it"));
    assert_eq!(store.db_version(), DbVersion(0));
    assert_eq!(
        rows(&store, "SELECT count(*) FROM hosts"),
        vec![vec![0.into()]]
    );
    // The same rows in smaller transactions go through.
    for chunk in statements.chunks(10) {
        store.transact(chunk).unwrap();
    }
    assert_eq!(
        rows(&store, "SELECT count(*) FROM hosts"),
        vec![vec![100.into()]]
    );
}

/// A value larger than peers decode (`VALUE_BYTES_MAX`) would commit here and be refused by
/// every other node, so it never replicates: the transaction is refused whole instead, computed
/// values and keys alike. A value at the limit is written, and its changeset decodes.
#[test]
fn a_value_larger_than_peers_accept_is_refused() {
    use patina_core::wire::VALUE_BYTES_MAX;
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&config(&dir, SCHEMA)).unwrap();
    let over = (VALUE_BYTES_MAX + 1) as i64;
    for sql in [
        format!("INSERT INTO hosts (id, name) VALUES (1, printf('%.*c', {over}, 'x'))"),
        format!("INSERT INTO strict_kv (k, n) VALUES (printf('%.*c', {over}, 'k'), 1)"),
    ] {
        let err = store.transact(&[Statement::new(sql)]).unwrap_err();
        assert!(
            matches!(err, StoreError::ValueTooLarge { bytes, limit, .. }
                if bytes > VALUE_BYTES_MAX && limit == VALUE_BYTES_MAX),
            "{err}"
        );
        assert!(err.is_client_fault());
    }
    // Far over: SQLite refuses to build it (the writer's cap while user statements run, the
    // transaction limit), instead of building 100 MB for the check above to refuse.
    let err = store
        .transact(&[Statement::new(
            "INSERT INTO hosts (id, name) VALUES (3, printf('%.*c', 100000000, 'x'))",
        )])
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Statement { message, client_fault: true, .. }
            if message.contains("too big")),
        "{err}"
    );
    store
        .transact(&[Statement::new(
            "INSERT INTO hosts (id, name) VALUES (2, 'small')",
        )])
        .unwrap();
    let err = store
        .transact(&[Statement::new(format!(
            "UPDATE hosts SET name = printf('%.*c', {over}, 'y') WHERE id = 2"
        ))])
        .unwrap_err();
    assert!(err.to_string().contains("hosts.name"), "{err}");
    assert_eq!(store.db_version(), DbVersion(1));
    assert_eq!(
        rows(&store, "SELECT id, length(name) FROM hosts"),
        vec![vec![2.into(), 5.into()]]
    );
    let at = VALUE_BYTES_MAX as i64;
    let out = store
        .transact(&[Statement::new(format!(
            "UPDATE hosts SET name = printf('%.*c', {at}, 'y') WHERE id = 2"
        ))])
        .unwrap();
    let version = out.version.unwrap();
    let site = store.site_id();
    let changesets = store.changesets(site, version, version, 1).unwrap();
    let bytes = changeset_to_bytes(&changesets[0]);
    decode_changeset(&bytes, &Limits::default()).expect("a value at the limit decodes");
}

/// A remote batch fails (the database is full) and so does the reload of the store's state
/// after its rollback: the store owes that reload, makes it before its next write, and refuses
/// to write while it cannot. Before, the next writes ran on the rolled-back batch's state (its
/// new site known in memory only), and the site's versions never reached the file.
#[test]
fn a_failed_reload_after_a_rollback_is_made_before_the_next_write() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        max_db_bytes: Some(256 * 1024),
        ..config(&dir, SCHEMA)
    };
    let mut store = Store::open(&cfg).unwrap();
    let blob = "x".repeat(4000);
    fill_until_full(&mut store, &blob);
    // A batch from a site this store has never seen, too large for what is left.
    let big: Vec<Changeset> = (0..50)
        .map(|v| {
            remote(
                v + 1,
                vec![change(
                    "hosts",
                    1000 + v as i64,
                    Some("name"),
                    blob.clone().into(),
                    1,
                    0,
                )],
            )
        })
        .collect();
    store.fail_next_reloads(4);
    let err = store.apply_changesets(&big).unwrap_err();
    assert!(
        err.to_string().contains("full"),
        "the batch's own failure: {err}"
    );
    // The store thread marks a failed batch's versions as gaps, for health.
    for changeset in &big {
        store.note_unapplied(changeset.id);
    }
    assert_eq!(store.bookkeeping().gap_count(), 50);
    // While the reload owed fails, every kind of write is refused and nothing of it is kept;
    // extraction waits too.
    let small = remote(
        1,
        vec![change("hosts", 1000, Some("name"), "n".into(), 1, 0)],
    );
    let err = store
        .apply_changesets(std::slice::from_ref(&small))
        .unwrap_err();
    assert!(err.to_string().contains("on purpose"), "{err}");
    let err = store.apply_schema_sql(SCHEMA).unwrap_err();
    assert!(err.to_string().contains("on purpose"), "{err}");
    let err = store
        .transact(&[Statement::new("DELETE FROM hosts WHERE id < 50")])
        .unwrap_err();
    assert!(err.to_string().contains("on purpose"), "{err}");
    let err = store
        .changesets(store.site_id(), DbVersion(1), DbVersion(1), 1)
        .unwrap_err();
    assert!(err.to_string().contains("reloaded"), "{err}");
    // Then it succeeds, and writes go on.
    store
        .transact(&[Statement::new("DELETE FROM hosts WHERE id < 50")])
        .unwrap();
    assert!(matches!(
        store.apply_changesets(&[small]).unwrap()[0],
        ApplyOutcome::Applied { .. }
    ));
    // The reload kept the versions heard of and not applied: still gaps.
    assert_eq!(store.bookkeeping().gap_count(), 49);
    drop(store);
    let store = Store::open(&cfg).unwrap();
    let site = SiteId([7; 16]);
    assert!(
        store.bookkeeping().contains(ChangesetId {
            site,
            version: DbVersion(1)
        }),
        "the new site's version did not reach the file"
    );
    assert_eq!(
        rows(&store, "SELECT name FROM hosts WHERE id = 1000"),
        vec![vec![Value::Text("n".into())]]
    );
    let served = store
        .changesets(site, DbVersion(1), DbVersion(1), 10)
        .unwrap();
    assert_eq!(served.len(), 1);
    assert_eq!(served[0].changes.len(), 1, "{served:?}");
}

/// A statement writing row after row holds every row's capture in memory (and the rows in the
/// write-ahead log) until it ends: it is stopped once the captured writes hold twice what the
/// transaction may commit, not left to run until its deadline and be refused at COMMIT.
/// A transaction writing one row again and again within that keeps working.
#[test]
fn a_transaction_whose_writes_outgrow_what_it_may_commit_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let limit = 256 * 1024;
    let cfg = StoreConfig {
        changeset_bytes_max: Some(limit),
        ..config(&dir, SCHEMA)
    };
    let mut store = Store::open(&cfg).unwrap();
    store
        .transact(&[Statement::new("INSERT INTO hosts (id) VALUES (1)")])
        .unwrap();
    let version = store.db_version();
    // 100,000 rows of 1,000 bytes: 100 MB captured if nothing stopped it.
    let runaway = Statement::new(
        "WITH RECURSIVE c(x) AS (SELECT 2 UNION ALL SELECT x+1 FROM c LIMIT 100000) \
         INSERT INTO hosts (id, name) SELECT x, printf('%.1000c', 'a') FROM c",
    );
    let err = store.transact(&[runaway]).unwrap_err();
    assert!(
        matches!(err, StoreError::WritesTooLarge { limit: l } if l == 2 * limit),
        "{err}"
    );
    assert!(err.is_client_fault());
    assert_eq!(store.db_version(), version);
    assert_eq!(
        rows(&store, "SELECT count(*) FROM hosts"),
        vec![vec![1.into()]]
    );
    // The same row rewritten 100 times (captured 100 times, committed once): well within.
    let again: Vec<Statement> = (0..100)
        .map(|i| {
            Statement::with_params(
                "UPDATE hosts SET name = ? WHERE id = 1",
                vec![format!("{i:0>2000}").into()],
            )
        })
        .collect();
    store.transact(&again).unwrap();
    assert_eq!(store.db_version(), DbVersion(version.get() + 1));
    // Rows with large values (1 MB together, twice the cap), each written in a transaction of
    // its own. Deleting them all commits: a delete captures the key alone. Updating one small
    // column of them all holds every row it writes whole, 1 MB: refused, to be split.
    for id in 10..20 {
        store
            .transact(&[Statement::with_params(
                "INSERT INTO hosts (id, name) VALUES (?, ?)",
                vec![id.into(), "y".repeat(100_000).into()],
            )])
            .unwrap();
    }
    let err = store
        .transact(&[Statement::new("UPDATE hosts SET port = 1 WHERE id >= 10")])
        .unwrap_err();
    assert!(matches!(err, StoreError::WritesTooLarge { .. }), "{err}");
    store
        .transact(&[Statement::new(
            "UPDATE hosts SET port = 1 WHERE id BETWEEN 10 AND 13",
        )])
        .unwrap();
    store
        .transact(&[Statement::new("DELETE FROM hosts WHERE id >= 10")])
        .unwrap();
    assert_eq!(
        rows(&store, "SELECT count(*) FROM hosts"),
        vec![vec![1.into()]]
    );
}
