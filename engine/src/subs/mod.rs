//! SQL subscriptions: live query results that stream every insert, update and delete.
//!
//! A subscription is one SELECT over replicated tables (filters, projections, joins; ORDER BY
//! and LIMIT shape the initial rows only). Its query is rewritten (with `sqlparser`) to also
//! return the primary key of every table it reads: that tuple is a result row's identity, and
//! each identity gets a row id that stays the same for the life of the row. After each commit
//! (local or remote) the store announces the rows it changed; for every subscription reading
//! one of those tables, the query is run again restricted to the changed keys of that table
//! (`... AND (t.k) IN (changed keys)`), and the difference with the rows it held becomes
//! insert, update and delete events, numbered by contiguous change ids. Identical SQL shares one
//! matcher.
//!
//! One thread (the manager) holds every subscription's rows and a small SQLite file of its own
//! for persistence: each subscription's SQL, rows and the last `history_len` changes, written
//! in one transaction before the events are sent. Quick queries run on the manager thread,
//! costly ones on a thread of their own (`workers`), each with a read-only connection to the
//! database (and TEMP tables for the changed keys), so a costly subscription never holds up
//! the others. After a restart a subscription is reconciled with the data (any
//! change it missed becomes events), so a client resuming from its last change id gets exactly
//! what it missed; one resuming from before the kept history gets an error, never a silent gap.
//! A subscriber that does not keep up is cut off with an error and can resume by change id.
//!
//! Files: this one (the handle, commands, the thread's start), `plan` (query planning),
//! `matcher` (rows and diffs), `manager` (the thread's loop), `storage` (its SQLite file),
//! `workers` (where queries run).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use patina_core::change::RowChange;
use patina_core::pk::PackedPk;
use patina_core::value::Value;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use sqlparser::ast::{BinaryOperator, Expr, GroupByExpr, SetExpr, Statement, TableFactor};
use sqlparser::dialect::SQLiteDialect;
use sqlparser::parser::Parser;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::http::types::ChangeType;
use workers::{Done, Job, Lane, Query, Worker, Workers};

mod manager;
mod matcher;
mod plan;
mod storage;
mod workers;

use manager::{Manager, Purpose, Work};
use matcher::{pack, unpack, FoundRows, Matcher};
use plan::{fnv, plan, replicated_tables, Plan};

/// Bounds and retention.
#[derive(Debug, Clone, Copy)]
pub struct SubsConfig {
    /// Subscriptions one node keeps.
    pub max_subscriptions: usize,
    /// Changes kept per subscription for resuming.
    pub history_len: u64,
    /// Events buffered per subscriber before it is cut off.
    pub subscriber_buffer: usize,
    /// Rows a subscription may hold and a pass may return.
    pub rows_max: usize,
    /// Longest a pass of a subscription's query may run.
    pub pass_timeout: Duration,
    /// A subscription without subscribers this long is removed.
    pub idle_timeout: Duration,
}

/// Why a subscription request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SubsError {
    /// The SQL cannot be a subscription (syntax, a write, an unsupported shape, a table that
    /// is not replicated).
    #[error("{0}")]
    BadQuery(String),
    /// No subscription with that id.
    #[error("no subscription {0}")]
    Unknown(String),
    /// The node holds its maximum of subscriptions.
    #[error("too many subscriptions (limit {0})")]
    TooMany(usize),
    /// Resuming from a change id the history no longer has.
    #[error("{0}")]
    Resume(String),
    /// The query returns more rows, or runs longer, than a subscription may.
    #[error("{0}")]
    TooCostly(String),
    /// Storage failed, or the subscription thread is gone.
    #[error("subscriptions: {0}")]
    Internal(String),
}

impl From<rusqlite::Error> for SubsError {
    fn from(e: rusqlite::Error) -> Self {
        SubsError::Internal(e.to_string())
    }
}

/// How a change kind is stored in the subscriptions file.
fn kind_code(kind: ChangeType) -> i64 {
    match kind {
        ChangeType::Insert => 0,
        ChangeType::Update => 1,
        ChangeType::Delete => 2,
    }
}

fn kind_from_code(code: i64) -> ChangeType {
    match code {
        0 => ChangeType::Insert,
        1 => ChangeType::Update,
        _ => ChangeType::Delete,
    }
}

/// One change of a subscription's result.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeEvent {
    /// Insert, update or delete.
    pub kind: ChangeType,
    /// The row's id in this subscription.
    pub row_id: u64,
    /// The row's values (the last ones, for a delete).
    pub values: Vec<Value>,
    /// Position in the subscription's change stream (contiguous from 1).
    pub change_id: u64,
}

/// A subscriber attached to a subscription: what to send first, then the live events.
#[derive(Debug)]
pub struct Attached {
    /// The subscription's id (a UUID).
    pub id: String,
    /// Hash of its normalized SQL.
    pub hash: String,
    /// Result columns.
    pub columns: Vec<String>,
    /// The current rows (row id, values), unless skipped or resuming.
    pub rows: Option<Vec<(u64, Vec<Value>)>>,
    /// True when resuming from a change id: no rows, no eoq, the changes since.
    pub resumed: bool,
    /// Changes after the requested change id, when resuming.
    pub replay: Vec<Arc<ChangeEvent>>,
    /// The change id the rows or the replay stop at; live events continue after it.
    pub change_id: u64,
    /// Live events (each change id once; older ones may arrive and are skipped by the reader).
    pub live: broadcast::Receiver<Arc<ChangeEvent>>,
}

enum Command {
    Subscribe {
        sql: String,
        skip_rows: bool,
        from: Option<u64>,
        reply: oneshot::Sender<Result<Attached, SubsError>>,
    },
    Attach {
        id: String,
        skip_rows: bool,
        from: Option<u64>,
        reply: oneshot::Sender<Result<Attached, SubsError>>,
    },
    Changes(Arc<Vec<RowChange>>),
    /// A query thread's answer.
    Done(Done),
    /// Change notices were lost: reconcile every subscription with the data.
    Resync,
    /// Remove subscriptions nobody listened to for the idle timeout.
    Collect,
    /// Remove one subscription now.
    Remove {
        id: String,
        reply: oneshot::Sender<Result<(), SubsError>>,
    },
    /// Describe every subscription.
    List {
        reply: oneshot::Sender<Vec<crate::http::types::SubscriptionInfo>>,
    },
}

/// The handle the API uses.
#[derive(Debug, Clone)]
pub struct SubsHandle {
    tx: mpsc::Sender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Subscribe { .. } => "Subscribe",
            Command::Attach { .. } => "Attach",
            Command::Changes(_) => "Changes",
            Command::Done(_) => "Done",
            Command::Resync => "Resync",
            Command::Collect => "Collect",
            Command::Remove { .. } => "Remove",
            Command::List { .. } => "List",
        })
    }
}

impl SubsHandle {
    /// Subscribes to `sql` (or attaches to the subscription with the same SQL).
    pub async fn subscribe(
        &self,
        sql: String,
        skip_rows: bool,
        from: Option<u64>,
    ) -> Result<Attached, SubsError> {
        let (reply, rx) = oneshot::channel();
        self.call(
            Command::Subscribe {
                sql,
                skip_rows,
                from,
                reply,
            },
            rx,
        )
        .await
    }

    /// Attaches to an existing subscription.
    pub async fn attach(
        &self,
        id: String,
        skip_rows: bool,
        from: Option<u64>,
    ) -> Result<Attached, SubsError> {
        let (reply, rx) = oneshot::channel();
        self.call(
            Command::Attach {
                id,
                skip_rows,
                from,
                reply,
            },
            rx,
        )
        .await
    }

    /// Removes a subscription: its subscribers' streams end and its id is forgotten.
    pub async fn remove(&self, id: String) -> Result<(), SubsError> {
        let (reply, rx) = oneshot::channel();
        let gone = || SubsError::Internal("the subscription thread stopped".into());
        self.tx
            .send(Command::Remove { id, reply })
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Every subscription, described (for operators).
    pub async fn list(&self) -> Result<Vec<crate::http::types::SubscriptionInfo>, SubsError> {
        let (reply, rx) = oneshot::channel();
        let gone = || SubsError::Internal("the subscription thread stopped".into());
        self.tx
            .send(Command::List { reply })
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }

    async fn call(
        &self,
        command: Command,
        rx: oneshot::Receiver<Result<Attached, SubsError>>,
    ) -> Result<Attached, SubsError> {
        let gone = || SubsError::Internal("the subscription thread stopped".into());
        self.tx.send(command).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

/// Starts the subscription thread: `db` is the replicated database (read only), `path` the
/// subscriptions' own file.
pub fn spawn(
    db: &Path,
    path: &Path,
    config: SubsConfig,
    mut row_changes: broadcast::Receiver<Arc<Vec<RowChange>>>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<SubsHandle, SubsError> {
    let (reader, storage) = storage::open(db, path)?;
    let (tx, rx) = mpsc::channel(1024);
    let mut manager = Manager {
        reader,
        workers: Workers::new(db, config, tx.downgrade()),
        inline: None,
        storage,
        config,
        matchers: Vec::new(),
        pending: Vec::new(),
        any: Arc::default(),
    };
    manager.load()?;
    let any_subscription = manager.any.clone();
    let span = tracing::Span::current();
    std::thread::Builder::new()
        .name("patina-subs".into())
        .spawn(move || {
            let _in_node = span.enter();
            manager.run(rx)
        })
        .map_err(|e| SubsError::Internal(e.to_string()))?;
    // Collection of subscriptions nobody listens to, a few times per idle timeout.
    let collect = tx.clone();
    let mut stop = shutdown.clone();
    let every =
        (config.idle_timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(10));
    crate::logging::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.wait_for(|stop| *stop) => return,
                _ = tokio::time::sleep(every) => {}
            }
            if collect.send(Command::Collect).await.is_err() {
                return;
            }
        }
    });
    // Change notices from the store thread; a lag means some were lost: reconcile all.
    let forward = tx.clone();
    let any = any_subscription;
    crate::logging::spawn(async move {
        loop {
            let received = tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => return,
                received = row_changes.recv() => received,
            };
            let command = match received {
                // Nobody to tell: no wake-up of the manager thread for every commit. (Set
                // before a new subscription's first query starts, so a commit after that
                // query's snapshot is always forwarded.)
                Ok(_) if !any.load(std::sync::atomic::Ordering::SeqCst) => continue,
                Ok(batch) => Command::Changes(batch),
                Err(broadcast::error::RecvError::Lagged(_)) => Command::Resync,
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if forward.send(command).await.is_err() {
                return;
            }
        }
    });
    Ok(SubsHandle { tx })
}

/// A random (version 4) UUID, as Corrosion's clients parse subscription and stream ids.
pub fn random_uuid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}
