//! Large transactions in parts: a changeset split by seq is kept in the database part by part,
//! survives a restart half-received, and applies all at once when the last part arrives, in any
//! order, with duplicates, from extractions made at different times. The buffer is bounded.

use patina::store::{ApplyOutcome, Statement, Store, StoreConfig, StoreError};
use patina_core::chunk::split;
use patina_core::Changeset;

const SCHEMA: &str =
    "CREATE TABLE kv (k TEXT NOT NULL PRIMARY KEY, v TEXT, n INTEGER NOT NULL DEFAULT 0);";

fn open_with(dir: &tempfile::TempDir, name: &str, parts_bytes_max: Option<u64>) -> Store {
    let schema = dir.path().join("schema.sql");
    std::fs::write(&schema, SCHEMA).unwrap();
    Store::open(&StoreConfig {
        path: dir.path().join(name),
        schema_paths: vec![schema],
        max_db_bytes: None,
        changeset_bytes_max: None,
        parts_bytes_max,
    })
    .unwrap()
}

fn open(dir: &tempfile::TempDir, name: &str) -> Store {
    open_with(dir, name, None)
}

/// One transaction of `rows` rows, each with a 100-byte value: about 150 bytes per row.
fn big_transaction(store: &mut Store, rows: usize, tag: &str) -> Changeset {
    let values: Vec<String> = (0..rows)
        .map(|i| format!("('{tag}{i}', '{}')", "x".repeat(100)))
        .collect();
    store
        .transact(&[Statement::new(format!(
            "INSERT INTO kv (k, v) VALUES {}",
            values.join(", ")
        ))])
        .unwrap()
        .changeset
        .unwrap()
}

fn count(store: &Store) -> i64 {
    match store
        .query(&Statement::new("SELECT count(*) FROM kv"))
        .unwrap()
        .rows[0][0]
    {
        patina_core::Value::Integer(n) => n,
        ref other => panic!("count: {other:?}"),
    }
}

#[test]
fn parts_in_any_order_survive_a_restart_and_apply_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = open(&dir, "a.db");
    let cs = big_transaction(&mut a, 2000, "k");
    let mut parts = split(&cs, 8 * 1024);
    assert!(parts.len() > 20, "{} parts", parts.len());
    // A fixed shuffle: reversed, then every third part moved to the front.
    parts.reverse();
    let (front, back): (Vec<_>, Vec<_>) =
        parts.into_iter().enumerate().partition(|(i, _)| i % 3 == 0);
    let parts: Vec<Changeset> = front.into_iter().chain(back).map(|(_, p)| p).collect();
    let half = parts.len() / 2;

    let mut b = open(&dir, "b.db");
    // First half, with every part twice: all buffered, nothing visible.
    let doubled: Vec<&Changeset> = parts[..half].iter().flat_map(|p| [p, p]).collect();
    let outcomes = b.apply_changesets(&doubled).unwrap();
    assert!(outcomes.iter().all(|o| matches!(o, ApplyOutcome::Buffered)));
    assert_eq!(count(&b), 0);
    assert!(!b.bookkeeping().contains(cs.id));
    assert_eq!(b.partials().0, 1);

    // Restart with half the parts held.
    drop(b);
    let mut b = open(&dir, "b.db");
    assert_eq!(b.partials().0, 1);
    let held = b.partials().1;
    assert!(held > 0);

    // The rest, one batch per part: the last one applies the whole changeset.
    let rest = &parts[half..];
    for (i, part) in rest.iter().enumerate() {
        let outcome = b.apply_changesets(&[part]).unwrap().remove(0);
        if i + 1 < rest.len() {
            assert!(matches!(outcome, ApplyOutcome::Buffered), "{outcome:?}");
            assert_eq!(count(&b), 0);
        } else {
            assert!(
                matches!(
                    outcome,
                    ApplyOutcome::Applied {
                        rows_changed: 2000,
                        ..
                    }
                ),
                "{outcome:?}"
            );
        }
    }
    assert_eq!(count(&b), 2000);
    assert!(b.bookkeeping().contains(cs.id));
    assert_eq!(b.partials(), (0, 0));
    assert_eq!(a.digest().unwrap(), b.digest().unwrap());
    // A part arriving after the whole is already applied.
    assert!(matches!(
        b.apply_changesets(&[&parts[0]]).unwrap()[0],
        ApplyOutcome::AlreadyApplied
    ));
}

#[test]
fn parts_of_extractions_made_at_different_times_complete_the_changeset() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = open(&dir, "a.db");
    let first = big_transaction(&mut a, 600, "k");
    let early = split(&first, 4096);
    // Overwrite the rows at the end of the transaction: a later extraction no longer serves
    // their cells and ends at a smaller seq.
    let late_tx = a
        .transact(&[Statement::new(
            "UPDATE kv SET v = 'later', n = 1 WHERE k IN ('k598', 'k599')",
        )])
        .unwrap()
        .changeset
        .unwrap();
    let extracted = a
        .changesets(a.site_id(), first.id.version, first.id.version, 1)
        .unwrap()
        .remove(0);
    assert!(extracted.span.last < first.span.last);
    let late = split(&extracted, 4096);

    let mut b = open(&dir, "b.db");
    // The first half from the early split, the rest from the late one.
    let half = early.len() / 2;
    let mut batch: Vec<&Changeset> = early[..half].iter().collect();
    let start = early[half].span.start;
    batch.extend(late.iter().filter(|p| p.span.end >= start));
    batch.push(&late_tx);
    let outcomes = b.apply_changesets(&batch).unwrap();
    assert!(outcomes
        .iter()
        .all(|o| !matches!(o, ApplyOutcome::Rejected(_))));
    assert_eq!(count(&b), 600);
    assert_eq!(a.digest().unwrap(), b.digest().unwrap());
    assert_eq!(b.partials(), (0, 0));
}

/// The buffer is bounded. Full, it drops the parts of the changeset that received one least
/// recently to make room: parts that never complete (a peer's made-up changesets, or parts
/// whose others were lost) no longer fill it for good, which refused every large changeset
/// after them. A changeset whose own parts fill it is refused; a whole copy replaces parts.
#[test]
fn a_full_parts_buffer_drops_the_stalest_changeset_and_a_whole_copy_replaces_parts() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = open(&dir, "a.db");
    let one = big_transaction(&mut a, 300, "a");
    let two = big_transaction(&mut a, 300, "b");
    let one_parts = split(&one, 4096);
    let two_parts = split(&two, 4096);

    // Room for two parts only.
    let size = |p: &Changeset| patina_core::wire::changeset_to_bytes(p).len() as u64;
    let room = size(&one_parts[0]) + size(&one_parts[1]) + 1;
    let mut b = open_with(&dir, "b.db", Some(room));
    let outcomes = b
        .apply_changesets(&[&one_parts[0], &one_parts[1], &two_parts[0]])
        .unwrap();
    assert!(
        outcomes.iter().all(|o| matches!(o, ApplyOutcome::Buffered)),
        "{outcomes:?}"
    );
    // The first changeset's parts made room for the second's.
    assert_eq!(b.partials().0, 1);
    assert!(b.partials().1 < room);
    // The second's parts fill the buffer alone: the third is refused, and nothing of the
    // second is dropped for it.
    let outcomes = b.apply_changesets(&[&two_parts[1], &two_parts[2]]).unwrap();
    assert!(
        matches!(outcomes[0], ApplyOutcome::Buffered),
        "{outcomes:?}"
    );
    assert!(
        matches!(
            outcomes[1],
            ApplyOutcome::Rejected(StoreError::PartsBufferFull { .. })
        ),
        "{outcomes:?}"
    );
    assert_eq!(b.partials().0, 1);

    // Whole copies, arriving by another path, apply and free the parts.
    for whole in [&one, &two] {
        assert!(matches!(
            b.apply_changesets(&[whole]).unwrap()[0],
            ApplyOutcome::Applied { .. }
        ));
    }
    assert_eq!(count(&b), 600);
    assert_eq!(a.digest().unwrap(), b.digest().unwrap());
    assert_eq!(b.partials(), (0, 0));

    // After a restart the parts held come back as received before any new one: they are
    // the first dropped.
    let three = big_transaction(&mut a, 300, "c");
    let four = big_transaction(&mut a, 300, "d");
    let three_parts = split(&three, 4096);
    let four_parts = split(&four, 4096);
    b.apply_changesets(&[&three_parts[0]]).unwrap();
    drop(b);
    let mut b = open_with(&dir, "b.db", Some(room));
    assert_eq!(b.partials().0, 1);
    let outcomes = b
        .apply_changesets(&[&four_parts[0], &four_parts[1]])
        .unwrap();
    assert!(
        outcomes.iter().all(|o| matches!(o, ApplyOutcome::Buffered)),
        "{outcomes:?}"
    );
    assert_eq!(b.partials().0, 1, "three's part made room");
    for whole in [&three, &four] {
        assert!(matches!(
            b.apply_changesets(&[whole]).unwrap()[0],
            ApplyOutcome::Applied { .. }
        ));
    }
    assert_eq!(a.digest().unwrap(), b.digest().unwrap());
}

#[test]
fn a_bad_part_is_refused_and_harms_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = open(&dir, "a.db");
    let cs = big_transaction(&mut a, 200, "k");
    let mut parts = split(&cs, 4096);
    // Two changes with the same seq in one part.
    let mut bad = parts[1].clone();
    let dup = bad.changes[0].clone();
    bad.changes.push(dup);
    let mut b = open(&dir, "b.db");
    let outcomes = b.apply_changesets(&[&parts[0], &bad]).unwrap();
    assert!(matches!(outcomes[0], ApplyOutcome::Buffered));
    assert!(matches!(
        outcomes[1],
        ApplyOutcome::Rejected(StoreError::Change { .. })
    ));
    // A part for an unknown table completes the changeset, which is then refused whole: its
    // parts are dropped, nothing is applied, and a good copy applies later.
    let last = parts.len() - 1;
    parts[last].changes[0].table = "nope".into();
    let outcomes = b.apply_changesets(&parts[1..]).unwrap();
    assert!(matches!(
        outcomes.last().unwrap(),
        ApplyOutcome::Rejected(StoreError::Change { .. })
    ));
    assert_eq!(count(&b), 0);
    assert_eq!(b.partials(), (0, 0));
    assert!(matches!(
        b.apply_changesets(&[&cs]).unwrap()[0],
        ApplyOutcome::Applied { .. }
    ));
    assert_eq!(a.digest().unwrap(), b.digest().unwrap());
}
