//! Where subscriptions' queries run, so that a costly subscription holds up only the costly
//! ones.
//!
//! The manager thread owns every subscription's rows and storage. Each subscription has at
//! most one query out at a time (answers apply in the order the data changed); changes that
//! arrive meanwhile wait, merged, for the next one. Two lanes: a query whose cost is not known
//! or may be large (a new subscription's first rows, a whole-result reconcile, the rows in
//! order for a subscriber attaching) or whose subscription's last query took longer than
//! [`QUICK`] is heavy, and runs on a thread of its own ([`Workers`]); the rest are quick and
//! run at once on the manager thread, on a connection of its own ([`Worker`]), as a change
//! notice arrives. So quick subscriptions see each change with no hand-off, and a heavy query
//! (up to `pass_timeout` each) delays only other heavy ones. The heavy thread starts with the
//! first subscription: a node without subscriptions has none.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use patina_core::value::Value;
use rusqlite::{Connection, OpenFlags};
use tokio::sync::mpsc;

use super::{pack, Command, FoundRows, SubsConfig, SubsError};
use crate::store::guard::{Interrupt, Stopped};
use crate::store::{to_value, SqlValue};

/// A subscription whose last query took longer than this is heavy.
pub(super) const QUICK: Duration = Duration::from_millis(50);

/// Where a query runs: on the manager thread at once, or on the heavy thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lane {
    Quick,
    Heavy,
}

/// One query of a job; `keys` fill the TEMP table the restricted queries read (the key
/// arity and each changed key's values).
#[derive(Debug)]
pub(super) struct Query {
    pub sql: String,
    pub keys: Option<(usize, Vec<Vec<Value>>)>,
}

/// The queries of one subscription, run in order on one thread.
#[derive(Debug)]
pub(super) struct Job {
    /// The subscription's id.
    pub sub: String,
    pub lane: Lane,
    pub queries: Vec<Query>,
    /// Run the queries in one read transaction, so their answers agree.
    pub one_snapshot: bool,
    /// Visible columns, then key columns, of every row.
    pub visible: usize,
    pub key_columns: usize,
}

/// A job's answer: the rows of each query, in order, or why it failed.
#[derive(Debug)]
pub(super) struct Done {
    pub sub: String,
    pub found: Result<Vec<FoundRows>, SubsError>,
    pub took: Duration,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    stop: bool,
}

/// The heavy thread and its queue.
pub(super) struct Workers {
    shared: Arc<(Mutex<Queue>, Condvar)>,
    db: PathBuf,
    config: SubsConfig,
    /// Answers go back on the manager's own channel; weak, so that the manager still ends
    /// when the node drops its handles.
    answers: mpsc::WeakSender<Command>,
    started: bool,
}

impl Workers {
    pub(super) fn new(db: &Path, config: SubsConfig, answers: mpsc::WeakSender<Command>) -> Self {
        Workers {
            shared: Arc::default(),
            db: db.to_path_buf(),
            config,
            answers,
            started: false,
        }
    }

    /// A connection for the quick lane, run by the caller.
    pub(super) fn open_inline(&self) -> Result<Worker, SubsError> {
        Worker::open(&self.db, self.config)
    }

    /// Queues a heavy job; its answer arrives as [`Command::Done`].
    pub(super) fn submit(&mut self, job: Job) -> Result<(), SubsError> {
        if !self.started {
            let mut worker = Worker::open(&self.db, self.config)?;
            let shared = self.shared.clone();
            let answers = self.answers.clone();
            let span = tracing::Span::current();
            std::thread::Builder::new()
                .name("patina-subs-heavy".into())
                .spawn(move || {
                    let _in_node = span.enter();
                    while let Some(job) = next_job(&shared) {
                        let done = worker.run(job);
                        let Some(answers) = answers.upgrade() else {
                            return;
                        };
                        if answers.blocking_send(Command::Done(done)).is_err() {
                            return;
                        }
                    }
                })
                .map_err(|e| SubsError::Internal(format!("starting a query thread: {e}")))?;
            self.started = true;
        }
        let (queue, ready) = &*self.shared;
        queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .jobs
            .push_back(job);
        ready.notify_one();
        Ok(())
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        let (queue, ready) = &*self.shared;
        queue.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        ready.notify_all();
    }
}

/// Waits for a job; None once stopped.
fn next_job(shared: &(Mutex<Queue>, Condvar)) -> Option<Job> {
    let (queue, ready) = shared;
    let mut queue = queue.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if queue.stop {
            return None;
        }
        if let Some(job) = queue.jobs.pop_front() {
            return Some(job);
        }
        queue = ready.wait(queue).unwrap_or_else(|e| e.into_inner());
    }
}

/// A read-only connection to the replicated database that runs jobs.
pub(super) struct Worker {
    reader: Connection,
    /// Stops a query at its deadline.
    interrupt: Interrupt,
    config: SubsConfig,
    /// Arities of the TEMP key tables created so far.
    key_tables: std::collections::BTreeSet<usize>,
    /// The keys the TEMP table of that arity holds now, if known. Every subscription reading
    /// a changed table queries the same changed keys, one after another: filled once, not
    /// once per subscription (a thousand fills per change, before).
    filled: Option<(usize, Vec<Vec<Value>>)>,
}

impl Worker {
    fn open(db: &Path, config: SubsConfig) -> Result<Worker, SubsError> {
        let mut reader = Connection::open_with_flags(
            db,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        let interrupt = Interrupt::install(&mut reader)?;
        reader.execute_batch("PRAGMA busy_timeout = 5000;")?;
        crate::store::cap_values(&reader, config.value_bytes_max)?;
        // Each subscription runs one restricted query per table it reads: keep them prepared.
        reader.set_prepared_statement_cache_capacity((config.max_subscriptions * 2 + 16).min(8192));
        Ok(Worker {
            reader,
            interrupt,
            config,
            key_tables: Default::default(),
            filled: None,
        })
    }

    pub(super) fn run(&mut self, job: Job) -> Done {
        let started = Instant::now();
        let found = if job.one_snapshot {
            self.in_one_snapshot(&job)
        } else {
            job.queries
                .iter()
                .map(|query| self.query(&job, query))
                .collect()
        };
        Done {
            sub: job.sub,
            found,
            took: started.elapsed(),
        }
    }

    /// The job's queries inside one read transaction.
    fn in_one_snapshot(&mut self, job: &Job) -> Result<Vec<FoundRows>, SubsError> {
        self.reader.execute_batch("BEGIN")?;
        let found = job
            .queries
            .iter()
            .map(|query| self.query(job, query))
            .collect();
        // A read transaction: ending it cannot lose anything.
        let _ = self.reader.execute_batch("COMMIT");
        found
    }

    /// Runs one query; rows as (identity, visible values). One returning more than `rows_max`
    /// rows or running past `pass_timeout` is stopped: TooCostly.
    fn query(&mut self, job: &Job, query: &Query) -> Result<FoundRows, SubsError> {
        let SubsConfig {
            rows_max,
            pass_timeout,
            value_bytes_max,
            ..
        } = self.config;
        // SQLite refuses a value over the cap (`cap_values`) as too big.
        let too_big = |e: rusqlite::Error| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::TooBig) => SubsError::TooCostly(format!(
                "the query makes a value over {value_bytes_max} bytes (db.transaction_bytes_max)"
            )),
            _ => SubsError::from(e),
        };
        // Armed before the changed keys go in: a bulk write's keys count against the pass's
        // time too, and a pass past it ends as too costly, not as a thread held.
        self.interrupt
            .arm(Some(Instant::now() + pass_timeout), None);
        let result = (|| {
            if let Some((arity, keys)) = &query.keys {
                self.fill_keys(*arity, keys)?;
            }
            let mut stmt = self.reader.prepare_cached(&query.sql)?;
            let width = job.visible + job.key_columns;
            let mut rows = stmt.query([])?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().map_err(too_big)? {
                // A schema reload that added a column re-prepares the query at its first
                // step, and `*` takes the new column in: the key columns would be read from
                // the wrong places, and every row would change identity.
                let columns = row.as_ref().column_count();
                if columns != width {
                    return Err(SubsError::Ended(format!(
                        "the subscription's columns changed with the schema ({} columns, now {}): subscribe again",
                        job.visible,
                        columns.saturating_sub(job.key_columns)
                    )));
                }
                if out.len() >= rows_max {
                    return Err(SubsError::TooCostly(format!(
                        "the query returns more than {rows_max} rows (subscriptions.rows_max)"
                    )));
                }
                let mut values = Vec::with_capacity(width);
                for i in 0..width {
                    values.push(to_value(row.get_ref(i)?));
                }
                let keys = values.split_off(job.visible);
                out.push((pack(&keys), values));
            }
            Ok(out)
        })();
        self.interrupt.disarm();
        match (result, self.interrupt.stopped()) {
            (Err(_), Some(Stopped::Deadline)) => Err(SubsError::TooCostly(format!(
                "the query runs longer than {pass_timeout:?} (subscriptions.pass_timeout_ms)"
            ))),
            (result, _) => result,
        }
    }

    /// Puts the changed keys into the TEMP table the restricted queries join.
    fn fill_keys(&mut self, arity: usize, keys: &[Vec<Value>]) -> Result<(), SubsError> {
        if !self.reader.is_autocommit() {
            // A transaction left open (its COMMIT failed) may yet roll the table back.
            self.filled = None;
        }
        if matches!(&self.filled, Some((held, filled)) if *held == arity && filled == keys) {
            return Ok(());
        }
        // Unknown until the fill below is whole (the deadline may stop it midway).
        self.filled = None;
        if !self.key_tables.contains(&arity) {
            let cols: Vec<String> = (0..arity).map(|j| format!("c{j}")).collect();
            self.reader.execute_batch(&format!(
                "CREATE TEMP TABLE IF NOT EXISTS __patina_keys_{arity} ({})",
                cols.join(", ")
            ))?;
            // Only once made: the pass's deadline may stop the statement.
            self.key_tables.insert(arity);
        }
        self.reader
            .execute(&format!("DELETE FROM temp.__patina_keys_{arity}"), [])?;
        let marks = vec!["?"; arity].join(", ");
        let mut insert = self.reader.prepare_cached(&format!(
            "INSERT INTO temp.__patina_keys_{arity} VALUES ({marks})"
        ))?;
        for values in keys {
            let binds: Vec<SqlValue<'_>> = values.iter().map(SqlValue).collect();
            insert.execute(rusqlite::params_from_iter(binds))?;
        }
        self.filled = Some((arity, keys.to_vec()));
        Ok(())
    }
}
