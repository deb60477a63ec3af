//! The threads that run subscriptions' queries, so that no subscription waits on another's.
//!
//! The manager thread owns every subscription's rows and storage and never runs a query of
//! its own: it hands each query to these threads and applies the answer when it comes back.
//! Each subscription has at most one query out at a time (answers apply in the order the data
//! changed); changes that arrive meanwhile wait, merged, for the next one.
//!
//! Two lanes: a query whose cost is not known yet (a new subscription's first rows) or whose
//! subscription's last query took longer than [`QUICK`] is heavy; the rest are quick. One
//! thread runs only quick queries, the other heavy ones first and quick ones when no heavy one
//! waits. So a costly subscription (up to `pass_timeout` per query) delays the costly ones
//! only; the others keep a thread of their own. Both threads start with the first query:
//! a node without subscriptions has none.

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

/// Which thread may run a query.
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
struct Queues {
    quick: VecDeque<Job>,
    heavy: VecDeque<Job>,
    stop: bool,
}

/// The two query threads and their queues.
pub(super) struct Workers {
    shared: Arc<(Mutex<Queues>, Condvar)>,
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

    /// Queues a job; its answer arrives as [`Command::Done`].
    pub(super) fn submit(&mut self, job: Job) -> Result<(), SubsError> {
        if !self.started {
            self.start()?;
        }
        let (queues, ready) = &*self.shared;
        let mut queues = queues.lock().unwrap_or_else(|e| e.into_inner());
        match job.lane {
            Lane::Quick => queues.quick.push_back(job),
            Lane::Heavy => queues.heavy.push_back(job),
        }
        ready.notify_all();
        Ok(())
    }

    fn start(&mut self) -> Result<(), SubsError> {
        for lane in [Lane::Quick, Lane::Heavy] {
            let mut worker = Worker::open(&self.db, self.config)?;
            let shared = self.shared.clone();
            let answers = self.answers.clone();
            let span = tracing::Span::current();
            let name = match lane {
                Lane::Quick => "patina-subs-quick",
                Lane::Heavy => "patina-subs-heavy",
            };
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    let _in_node = span.enter();
                    while let Some(job) = next_job(&shared, lane) {
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
        }
        self.started = true;
        Ok(())
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        let (queues, ready) = &*self.shared;
        queues.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        ready.notify_all();
    }
}

/// Waits for a job this lane's thread may run; None once stopped.
fn next_job(shared: &(Mutex<Queues>, Condvar), lane: Lane) -> Option<Job> {
    let (queues, ready) = shared;
    let mut queues = queues.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if queues.stop {
            return None;
        }
        let job = match lane {
            Lane::Quick => queues.quick.pop_front(),
            Lane::Heavy => queues
                .heavy
                .pop_front()
                .or_else(|| queues.quick.pop_front()),
        };
        if job.is_some() {
            return job;
        }
        queues = ready.wait(queues).unwrap_or_else(|e| e.into_inner());
    }
}

/// A query thread's read-only connection to the replicated database.
struct Worker {
    reader: Connection,
    /// Stops a query at its deadline.
    interrupt: Interrupt,
    config: SubsConfig,
    /// Arities of the TEMP key tables created so far.
    key_tables: std::collections::BTreeSet<usize>,
}

impl Worker {
    fn open(db: &Path, config: SubsConfig) -> Result<Worker, SubsError> {
        let mut reader = Connection::open_with_flags(
            db,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        let interrupt = Interrupt::install(&mut reader)?;
        reader.execute_batch("PRAGMA busy_timeout = 5000;")?;
        // Each subscription runs one restricted query per table it reads: keep them prepared.
        reader.set_prepared_statement_cache_capacity((config.max_subscriptions * 2 + 16).min(8192));
        Ok(Worker {
            reader,
            interrupt,
            config,
            key_tables: Default::default(),
        })
    }

    fn run(&mut self, job: Job) -> Done {
        let started = Instant::now();
        let found = job
            .queries
            .iter()
            .map(|query| self.query(&job, query))
            .collect();
        Done {
            sub: job.sub,
            found,
            took: started.elapsed(),
        }
    }

    /// Runs one query; rows as (identity, visible values). One returning more than `rows_max`
    /// rows or running past `pass_timeout` is stopped: TooCostly.
    fn query(&mut self, job: &Job, query: &Query) -> Result<FoundRows, SubsError> {
        if let Some((arity, keys)) = &query.keys {
            self.fill_keys(*arity, keys)?;
        }
        let SubsConfig {
            rows_max,
            pass_timeout,
            ..
        } = self.config;
        self.interrupt
            .arm(Some(Instant::now() + pass_timeout), None);
        let result = (|| {
            let mut stmt = self.reader.prepare_cached(&query.sql)?;
            let width = job.visible + job.key_columns;
            let mut rows = stmt.query([])?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
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
        if self.key_tables.insert(arity) {
            let cols: Vec<String> = (0..arity).map(|j| format!("c{j}")).collect();
            self.reader.execute_batch(&format!(
                "CREATE TEMP TABLE IF NOT EXISTS __patina_keys_{arity} ({})",
                cols.join(", ")
            ))?;
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
        Ok(())
    }
}
