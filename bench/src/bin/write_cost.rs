//! A fixed number of local write transactions, on the store or on a plain SQLite table: the
//! same four cases as the `local_write` group of the `store` bench (insert 1 or 10 new rows,
//! update one column of 1 or 10 rows), but a set count of them, so the CPU work of one write can
//! be counted exactly. Criterion's times move by ±10% between runs on this machine; counted
//! instructions do not:
//!
//! ```text
//! B=target/release/write_cost
//! for n in 1000 3000; do
//!   valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null \
//!     $B --case store-insert --rows 1 --txs $n 2>&1 | grep 'I *refs'
//! done
//! ```
//!
//! (second count - first) / 2000 is the instructions of one transaction, setup left out. The
//! kernel's side of a commit (the WAL write) is not counted; the wall time printed is.
//!
//! `cargo run --release -p patina-bench --bin write_cost -- --case store-insert --rows 10 --txs 5000`

use std::time::Instant;

use patina::store::{Statement, Store};
use patina_bench::store_fixture::{self, open_store, row, to_sql, INSERT};
use patina_core::change::{Change, Changeset, ChangesetId, Column};
use patina_core::ids::{CausalLength, ColVersion, DbVersion, Seq, SiteId};
use patina_core::pk::PackedPk;
use patina_core::value::Value;
use patina_core::wire::{changeset_to_bytes, decode_changeset, Limits};

const UPDATE: &str = "UPDATE items SET qty = ?1 WHERE id = ?2";
/// Rows an update case writes over, round robin (as the `local_write` bench).
const SEEDED_ROWS: i64 = 1000;

/// Which transaction to run.
#[derive(Clone, Copy, clap::ValueEnum)]
enum Case {
    /// New rows through the store.
    StoreInsert,
    /// One column of existing rows through the store.
    StoreUpdate,
    /// New rows on a plain SQLite table.
    PlainInsert,
    /// One column of existing rows on a plain SQLite table.
    PlainUpdate,
    /// Remote changesets as an agent receives them: `--rows` one-row changesets (a sentinel and
    /// three cells each) from another site, built, encoded, decoded and applied in one batch.
    RemoteApply,
    /// The same changesets built and encoded only: subtract it from `remote-apply` to count
    /// decoding and applying alone.
    RemoteEncode,
}

/// Counted local writes: a fixed number of one kind of transaction.
#[derive(clap::Parser)]
struct Args {
    /// The transaction.
    #[arg(long, value_enum)]
    case: Case,
    /// Rows each transaction writes.
    #[arg(long, default_value_t = 1)]
    rows: usize,
    /// Transactions to run (after the setup).
    #[arg(long, default_value_t = 2000)]
    txs: usize,
    /// Plain cases only: give the table TEMP triggers like those the store captured writes with
    /// before SQLite's pre-update hook, calling a function that does nothing with the row, to
    /// count what triggers cost alone (docs/BENCHMARKS.md, issue 21).
    #[arg(long)]
    trigger: bool,
}

fn open_plain(dir: &tempfile::TempDir, trigger: bool) -> rusqlite::Connection {
    let conn = store_fixture::open_plain(dir);
    if trigger {
        conn.create_scalar_function(
            "noop_capture",
            -1,
            rusqlite::functions::FunctionFlags::SQLITE_UTF8,
            |_| Ok(0i64),
        )
        .expect("function");
        conn.execute_batch(
            "CREATE TEMP TRIGGER ins AFTER INSERT ON main.items BEGIN
               SELECT noop_capture(1, 1, NEW.id, NEW.name, NEW.qty, NEW.price); END;
             CREATE TEMP TRIGGER upd AFTER UPDATE ON main.items BEGIN
               SELECT noop_capture(1, 3, OLD.id, OLD.name, OLD.qty, OLD.price,
                                   NEW.id, NEW.name, NEW.qty, NEW.price); END;",
        )
        .expect("triggers");
    }
    conn
}

/// Runs `txs` transactions of `rows` statements each; `statement(n)` is the n-th statement.
fn run_store(store: &mut Store, args: &Args, statement: impl Fn(i64) -> Statement) {
    let mut n = 0i64;
    for _ in 0..args.txs {
        let statements: Vec<Statement> = (0..args.rows)
            .map(|_| {
                n += 1;
                statement(n)
            })
            .collect();
        store.transact(&statements).expect("store write");
    }
}

fn run_plain(
    conn: &rusqlite::Connection,
    args: &Args,
    sql: &str,
    params: impl Fn(i64) -> Vec<Value>,
) {
    let mut n = 0i64;
    for _ in 0..args.txs {
        conn.execute_batch("BEGIN IMMEDIATE").expect("begin");
        {
            let mut stmt = conn.prepare_cached(sql).expect("prepare");
            for _ in 0..args.rows {
                n += 1;
                stmt.execute(rusqlite::params_from_iter(params(n).iter().map(to_sql)))
                    .expect("plain write");
            }
        }
        conn.execute_batch("COMMIT").expect("commit");
    }
}

/// The wire bytes of a changeset from another site inserting row `version` (4 changes).
fn remote_insert_bytes(version: u64, names: &[&str; 4]) -> Vec<u8> {
    let values = row(version as i64);
    let pk = PackedPk::pack(&values[..1]).expect("pack");
    let changes = (0..4)
        .map(|i| Change {
            table: names[0].into(),
            pk: pk.clone(),
            column: if i == 0 {
                Column::Sentinel
            } else {
                Column::Name(names[i].into())
            },
            value: if i == 0 {
                Value::Null
            } else {
                values[i].clone()
            },
            col_version: ColVersion(1),
            cl: CausalLength(1),
            seq: Seq(i as u32),
        })
        .collect();
    let id = ChangesetId {
        site: SiteId([9; 16]),
        version: DbVersion(version),
    };
    changeset_to_bytes(&Changeset::whole(id, changes))
}

fn run_remote(store: Option<&mut Store>, args: &Args) {
    let names = ["items", "name", "qty", "price"];
    let mut version = 0u64;
    let mut store = store;
    for _ in 0..args.txs {
        let encoded: Vec<Vec<u8>> = (0..args.rows)
            .map(|_| {
                version += 1;
                remote_insert_bytes(version, &names)
            })
            .collect();
        if let Some(store) = store.as_deref_mut() {
            let batch: Vec<Changeset> = encoded
                .iter()
                .map(|bytes| decode_changeset(bytes, &Limits::default()).expect("decode"))
                .collect();
            store.apply_changesets(&batch).expect("apply");
        }
    }
}

fn update_params(n: i64) -> Vec<Value> {
    vec![n.into(), (n % SEEDED_ROWS + 1).into()]
}

fn main() {
    let args: Args = clap::Parser::parse();
    let dir = tempfile::tempdir().expect("temp dir");
    // Each arm stops the clock before its store or connection closes (a close checkpoints).
    let elapsed = match args.case {
        Case::StoreInsert | Case::StoreUpdate => {
            let mut store = open_store(&dir, "store.db");
            let update = matches!(args.case, Case::StoreUpdate);
            if update {
                let seed: Vec<Statement> = (1..=SEEDED_ROWS)
                    .map(|id| Statement::with_params(INSERT, row(id)))
                    .collect();
                store.transact(&seed).expect("seed");
            }
            let started = Instant::now();
            if update {
                run_store(&mut store, &args, |n| {
                    Statement::with_params(UPDATE, update_params(n))
                });
            } else {
                run_store(&mut store, &args, |n| {
                    Statement::with_params(INSERT, row(n))
                });
            }
            started.elapsed()
        }
        Case::RemoteApply | Case::RemoteEncode => {
            let mut store = open_store(&dir, "store.db");
            let started = Instant::now();
            let apply = matches!(args.case, Case::RemoteApply);
            run_remote(apply.then_some(&mut store), &args);
            started.elapsed()
        }
        Case::PlainInsert | Case::PlainUpdate => {
            let conn = open_plain(&dir, args.trigger);
            let update = matches!(args.case, Case::PlainUpdate);
            if update {
                conn.execute_batch("BEGIN").expect("begin");
                for id in 1..=SEEDED_ROWS {
                    conn.execute(
                        INSERT,
                        rusqlite::params_from_iter(row(id).iter().map(to_sql)),
                    )
                    .expect("seed");
                }
                conn.execute_batch("COMMIT").expect("commit");
            }
            let started = Instant::now();
            if update {
                run_plain(&conn, &args, UPDATE, update_params);
            } else {
                run_plain(&conn, &args, INSERT, row);
            }
            started.elapsed()
        }
    };
    println!(
        "{} transactions of {} rows: {:.2} us each",
        args.txs,
        args.rows,
        elapsed.as_secs_f64() * 1e6 / args.txs as f64
    );
}
