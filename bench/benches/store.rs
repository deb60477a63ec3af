//! Hot paths of the store: a local write against the same write on a plain SQLite table,
//! remote changeset apply at several batch sizes, changeset extraction, and the wire codec.
//!
//! Run: `cargo bench -p patina-bench` (figures go to docs/BENCHMARKS.md).

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use patina::store::Statement;
use patina_core::change::{Change, Changeset, ChangesetId, Column};
use patina_core::ids::{CausalLength, ColVersion, DbVersion, Seq, SiteId};
use patina_core::pk::PackedPk;
use patina_core::value::Value;
use patina_core::wire::{changeset_to_bytes, decode_changeset, Limits};

use patina_bench::store_fixture::{
    open_plain as plain_sqlite, open_store as store, row, to_sql, INSERT,
};

/// One transaction inserting `rows_per_tx` new rows (or updating one column of existing ones).
fn local_write(c: &mut Criterion) {
    let mut group = c.benchmark_group("local_write");
    group
        .measurement_time(Duration::from_secs(4))
        .sample_size(30);
    for rows_per_tx in [1usize, 10] {
        group.throughput(Throughput::Elements(rows_per_tx as u64));
        group.bench_with_input(
            BenchmarkId::new("plain_sqlite_insert", rows_per_tx),
            &rows_per_tx,
            |b, &n| {
                let dir = tempfile::tempdir().unwrap();
                let conn = plain_sqlite(&dir);
                let mut next = 0i64;
                b.iter(|| {
                    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
                    {
                        let mut stmt = conn.prepare_cached(INSERT).unwrap();
                        for _ in 0..n {
                            next += 1;
                            stmt.execute(rusqlite::params_from_iter(row(next).iter().map(to_sql)))
                                .unwrap();
                        }
                    }
                    conn.execute_batch("COMMIT").unwrap();
                });
            },
        );
        group.bench_with_input(
            BenchmarkId::new("store_insert", rows_per_tx),
            &rows_per_tx,
            |b, &n| {
                let dir = tempfile::tempdir().unwrap();
                let mut store = store(&dir, "store.db");
                let mut next = 0i64;
                b.iter(|| {
                    let statements: Vec<Statement> = (0..n)
                        .map(|_| {
                            next += 1;
                            Statement::with_params(INSERT, row(next))
                        })
                        .collect();
                    store.transact(&statements).unwrap();
                });
            },
        );
        group.bench_with_input(
            BenchmarkId::new("plain_sqlite_update", rows_per_tx),
            &rows_per_tx,
            |b, &n| {
                let dir = tempfile::tempdir().unwrap();
                let conn = plain_sqlite(&dir);
                for id in 1..=1000 {
                    conn.execute(
                        INSERT,
                        rusqlite::params_from_iter(row(id).iter().map(to_sql)),
                    )
                    .unwrap();
                }
                let mut tick = 0i64;
                b.iter(|| {
                    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
                    {
                        let mut stmt = conn
                            .prepare_cached("UPDATE items SET qty = ?1 WHERE id = ?2")
                            .unwrap();
                        for _ in 0..n {
                            tick += 1;
                            stmt.execute((tick, tick % 1000 + 1)).unwrap();
                        }
                    }
                    conn.execute_batch("COMMIT").unwrap();
                });
            },
        );
        group.bench_with_input(
            BenchmarkId::new("store_update", rows_per_tx),
            &rows_per_tx,
            |b, &n| {
                let dir = tempfile::tempdir().unwrap();
                let mut store = store(&dir, "store.db");
                let seed: Vec<Statement> = (1..=1000)
                    .map(|id| Statement::with_params(INSERT, row(id)))
                    .collect();
                store.transact(&seed).unwrap();
                let mut tick = 0i64;
                b.iter(|| {
                    let statements: Vec<Statement> = (0..n)
                        .map(|_| {
                            tick += 1;
                            Statement::with_params(
                                "UPDATE items SET qty = ?1 WHERE id = ?2",
                                vec![tick.into(), (tick % 1000 + 1).into()],
                            )
                        })
                        .collect();
                    store.transact(&statements).unwrap();
                });
            },
        );
    }
    group.finish();
}

/// A remote changeset inserting one row: its sentinel and three cells (4 changes).
fn remote_insert(site: SiteId, version: u64) -> Changeset {
    let id = version as i64;
    let pk = PackedPk::pack(&[Value::Integer(id)]).unwrap();
    let cell = |seq: u32, column: Option<&str>, value: Value| Change {
        table: "items".into(),
        pk: pk.clone(),
        column: column.map_or(Column::Sentinel, |c| Column::Name(c.into())),
        value,
        col_version: ColVersion(1),
        cl: CausalLength(1),
        seq: Seq(seq),
    };
    let values = row(id);
    Changeset::whole(
        ChangesetId {
            site,
            version: DbVersion(version),
        },
        vec![
            cell(0, None, Value::Null),
            cell(1, Some("name"), values[1].clone()),
            cell(2, Some("qty"), values[2].clone()),
            cell(3, Some("price"), values[3].clone()),
        ],
    )
}

/// Remote apply: batches of 1, 100 and 10,000 changes (single-row inserts of 4 changes, and
/// for batch 1 a single-cell update), throughput in changes per second.
fn remote_apply(c: &mut Criterion) {
    let mut group = c.benchmark_group("remote_apply");
    group
        .measurement_time(Duration::from_secs(5))
        .sample_size(10);
    let site = SiteId([9; 16]);
    for changes_per_batch in [1usize, 100, 10_000] {
        group.throughput(Throughput::Elements(changes_per_batch as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(changes_per_batch),
            &changes_per_batch,
            |b, &n| {
                b.iter_custom(|iters| {
                    let dir = tempfile::tempdir().unwrap();
                    let mut target = store(&dir, "target.db");
                    let mut version = 0u64;
                    let batches: Vec<Vec<Changeset>> = (0..iters)
                        .map(|_| {
                            if n == 1 {
                                // A single change: one cell of a new row, which it creates.
                                version += 1;
                                let mut cs = remote_insert(site, version);
                                cs.changes.retain(|c| c.seq == Seq(1));
                                vec![cs]
                            } else {
                                (0..n / 4)
                                    .map(|_| {
                                        version += 1;
                                        remote_insert(site, version)
                                    })
                                    .collect()
                            }
                        })
                        .collect();
                    let start = Instant::now();
                    for batch in &batches {
                        target.apply_changesets(batch).unwrap();
                    }
                    start.elapsed()
                });
            },
        );
    }
    group.finish();
}

/// Extraction of 100 one-row changesets from a store holding 10,000.
fn extraction(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut source = store(&dir, "source.db");
    let site = SiteId([9; 16]);
    let all: Vec<Changeset> = (1..=10_000).map(|v| remote_insert(site, v)).collect();
    source.apply_changesets(&all).unwrap();
    let mut group = c.benchmark_group("extract");
    group
        .measurement_time(Duration::from_secs(4))
        .sample_size(20);
    group.throughput(Throughput::Elements(400));
    group.bench_function("100_changesets_of_4_changes", |b| {
        let mut start = 1u64;
        b.iter(|| {
            let out = source
                .changesets(site, DbVersion(start), DbVersion(start + 99), 100)
                .unwrap();
            assert_eq!(out.len(), 100);
            start = (start + 100) % 9_900 + 1;
        });
    });
    group.finish();
}

/// Opening a store of 100,000 rows whose last local writes' changes-index entries were still
/// deferred when its process died (the open puts them back from every row clock), against
/// opening the same store closed cleanly.
fn reopen(c: &mut Criterion) {
    let template = tempfile::tempdir().unwrap();
    let rows = 100_000i64;
    {
        let mut source = store(&template, "store.db");
        for first in (1..=rows - 10).step_by(1_000) {
            let last = (first + 999).min(rows - 10);
            let statements: Vec<Statement> = (first..=last)
                .map(|id| Statement::with_params(INSERT, row(id)))
                .collect();
            source.transact(&statements).unwrap();
        }
        // Closed cleanly: nothing deferred.
    }
    let clean = template.path().join("clean");
    std::fs::create_dir(&clean).unwrap();
    for file in ["store.db", "schema.sql"] {
        std::fs::copy(template.path().join(file), clean.join(file)).unwrap();
    }
    {
        let mut source = store(&template, "store.db");
        for id in rows - 9..=rows {
            source
                .transact(&[Statement::with_params(INSERT, row(id))])
                .unwrap();
        }
        // A crash: the last ten writes' entries are deferred, the mark is in the file.
        std::mem::forget(source);
    }
    let crashed = template.path().join("crashed");
    std::fs::create_dir(&crashed).unwrap();
    for file in ["store.db", "store.db-wal", "schema.sql"] {
        std::fs::copy(template.path().join(file), crashed.join(file)).unwrap();
    }
    let mut group = c.benchmark_group("reopen_100k_rows");
    group
        .measurement_time(Duration::from_secs(10))
        .sample_size(10);
    let batches = rows as u64 / 1_000;
    for (name, from, head) in [
        ("closed_cleanly", clean, batches),
        ("after_a_crash", crashed, batches + 10),
    ] {
        group.bench_function(name, |b| {
            b.iter_batched(
                || {
                    let dir = tempfile::tempdir().unwrap();
                    for entry in std::fs::read_dir(&from).unwrap() {
                        let entry = entry.unwrap();
                        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
                    }
                    dir
                },
                |dir| {
                    let reopened = store(&dir, "store.db");
                    assert_eq!(reopened.db_version(), DbVersion(head));
                    (reopened, dir)
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

/// Wire encoding and decoding of a 100-row changeset (400 changes).
fn wire(c: &mut Criterion) {
    let site = SiteId([9; 16]);
    let changes: Vec<Change> = (1..=100)
        .flat_map(|v| remote_insert(site, v).changes)
        .enumerate()
        .map(|(i, mut ch)| {
            ch.seq = Seq(i as u32);
            ch
        })
        .collect();
    // The span must cover all 400 seqs, or decoding refuses the changes past the first row's.
    let big = Changeset::whole(remote_insert(site, 1).id, changes);
    let bytes = changeset_to_bytes(&big);
    let mut group = c.benchmark_group("wire");
    group.throughput(Throughput::Elements(big.changes.len() as u64));
    group.bench_function("encode_400_changes", |b| {
        b.iter(|| changeset_to_bytes(&big))
    });
    group.bench_function("decode_400_changes", |b| {
        b.iter_batched(
            || bytes.clone(),
            |bytes| decode_changeset(&bytes, &Limits::default()).unwrap(),
            BatchSize::SmallInput,
        )
    });
    group.finish();
    println!("wire: 400 changes encode to {} bytes", bytes.len());

    // A broadcast copy of a one-row write as a node receives it: decoded whole (what every
    // copy cost before), or read to its head only (what a copy already seen costs now).
    let copy = patina_core::wire::encode_peer_message(
        1,
        &patina_core::wire::PeerMessage::Broadcast {
            from: SiteId([2; 16]),
            msg: patina_core::broadcast::BroadcastMsg::Gossip(std::sync::Arc::new(remote_insert(
                site, 7,
            ))),
        },
    );
    let limits = Limits::default();
    let mut group = c.benchmark_group("wire");
    group.bench_function("gossip_copy_decode_whole", |b| {
        b.iter(|| patina_core::wire::decode_peer_message(&copy, 1, &limits).unwrap())
    });
    group.bench_function("gossip_copy_peek_head", |b| {
        b.iter(|| patina_core::wire::peek_gossip_copy(&copy, 1, &limits).unwrap())
    });
    group.finish();
}

/// What metrics add to one write through the API: the request histogram with its route,
/// method and status labels (as the API's middleware builds them) and the store queue wait.
/// Compare with `local_write` and with a whole API write (docs/BENCHMARKS.md).
fn metrics_per_write(c: &mut Criterion) {
    let metrics = patina::metrics::NodeMetrics::new(Default::default());
    c.bench_function("metrics_per_write", |b| {
        b.iter(|| {
            metrics
                .api_request_seconds
                .get_or_create(&vec![
                    ("route", "/v1/transactions".to_string()),
                    ("method", "POST".to_string()),
                    ("status", 200u16.to_string()),
                ])
                .observe(0.000_4);
            metrics.queue_wait("transaction", Duration::from_micros(12));
        })
    });
}

criterion_group!(
    benches,
    local_write,
    remote_apply,
    extraction,
    reopen,
    wire,
    metrics_per_write
);
criterion_main!(benches);
