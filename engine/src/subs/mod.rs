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
use matcher::{decode_row, encode_row, pack, FoundRows, Matcher};
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
    /// Largest text or blob value a subscription's query may read or make, in bytes.
    pub value_bytes_max: usize,
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
    /// The subscription cannot go on as it began (its result's columns changed with the
    /// schema): it ends, and its clients subscribe again.
    #[error("{0}")]
    Ended(String),
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
    /// What starts the manager thread, until the first subscription (a node that never has
    /// one runs no thread and holds no connection for them).
    idle: Arc<std::sync::Mutex<Option<Idle>>>,
}

/// A manager not started yet: no subscription was stored, none was asked for.
struct Idle {
    db: std::path::PathBuf,
    path: std::path::PathBuf,
    config: SubsConfig,
    rx: mpsc::Receiver<Command>,
    any: Arc<std::sync::atomic::AtomicBool>,
    span: tracing::Span,
}

impl std::fmt::Debug for Idle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Idle")
    }
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
    /// True until the manager thread starts: then there is no subscription.
    fn idle(&self) -> bool {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Starts the manager thread if it is not running yet.
    fn start(&self) -> Result<(), SubsError> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let Some(waiting) = idle.as_ref() else {
            return Ok(());
        };
        // On failure it stays idle, and the next subscription tries again.
        let (reader, storage) = storage::open(&waiting.db, &waiting.path)?;
        let Some(Idle {
            db,
            config,
            rx,
            any,
            span,
            ..
        }) = idle.take()
        else {
            return Ok(());
        };
        let manager = Manager::new(reader, storage, &db, config, self.tx.downgrade(), any);
        start_manager(manager, rx, span)
    }

    /// Subscribes to `sql` (or attaches to the subscription with the same SQL).
    pub async fn subscribe(
        &self,
        sql: String,
        skip_rows: bool,
        from: Option<u64>,
    ) -> Result<Attached, SubsError> {
        self.start()?;
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
        if self.idle() {
            return Err(SubsError::Unknown(id));
        }
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
        if self.idle() {
            return Err(SubsError::Unknown(id));
        }
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
        if self.idle() {
            return Ok(Vec::new());
        }
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

/// Starts the subscriptions: `db` is the replicated database (read only), `path` the
/// subscriptions' own file. The manager thread starts at once if the file holds
/// subscriptions (they are reconciled with the data), otherwise with the first subscription.
pub fn spawn(
    db: &Path,
    path: &Path,
    config: SubsConfig,
    mut row_changes: broadcast::Receiver<Arc<Vec<RowChange>>>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<SubsHandle, SubsError> {
    let (reader, storage) = storage::open(db, path)?;
    let (tx, rx) = mpsc::channel(1024);
    let any: Arc<std::sync::atomic::AtomicBool> = Arc::default();
    let span = tracing::Span::current();
    let stored: i64 = storage.query_row("SELECT count(*) FROM subs", [], |r| r.get(0))?;
    let idle = if stored > 0 {
        let mut manager = Manager::new(reader, storage, db, config, tx.downgrade(), any.clone());
        manager.load()?;
        start_manager(manager, rx, span)?;
        None
    } else {
        Some(Idle {
            db: db.to_path_buf(),
            path: path.to_path_buf(),
            config,
            rx,
            any: any.clone(),
            span,
        })
    };
    let handle = SubsHandle {
        tx,
        idle: Arc::new(std::sync::Mutex::new(idle)),
    };
    // Collection of subscriptions nobody listens to, a few times per idle timeout (nothing
    // to collect while no subscription exists).
    let collect = handle.tx.clone();
    let mut stop = shutdown.clone();
    let every =
        (config.idle_timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(10));
    let any_to_collect = any.clone();
    crate::logging::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.wait_for(|stop| *stop) => return,
                _ = tokio::time::sleep(every) => {}
            }
            if !any_to_collect.load(std::sync::atomic::Ordering::SeqCst) {
                continue;
            }
            if collect.send(Command::Collect).await.is_err() {
                return;
            }
        }
    });
    // Change notices from the store thread; a lag means some were lost: reconcile all.
    let forward = handle.tx.clone();
    crate::logging::spawn(async move {
        loop {
            let received = tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => return,
                received = row_changes.recv() => received,
            };
            // Nobody to tell: no wake-up of the manager thread for every commit, and nothing
            // to reconcile after a lag. (Set before a new subscription's first query starts,
            // so a commit after that query's snapshot is always forwarded.)
            if !any.load(std::sync::atomic::Ordering::SeqCst) {
                if matches!(received, Err(broadcast::error::RecvError::Closed)) {
                    return;
                }
                continue;
            }
            let command = match received {
                Ok(batch) => Command::Changes(batch),
                Err(broadcast::error::RecvError::Lagged(_)) => Command::Resync,
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if forward.send(command).await.is_err() {
                return;
            }
        }
    });
    Ok(handle)
}

/// Runs `manager` on a thread of its own until every handle is gone.
fn start_manager(
    manager: Manager,
    rx: mpsc::Receiver<Command>,
    span: tracing::Span,
) -> Result<(), SubsError> {
    std::thread::Builder::new()
        .name("patina-subs".into())
        .spawn(move || {
            let _in_node = span.enter();
            manager.run(rx)
        })
        .map(|_| ())
        .map_err(|e| SubsError::Internal(e.to_string()))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SubsConfig {
        SubsConfig {
            max_subscriptions: 10,
            history_len: 100,
            subscriber_buffer: 16,
            rows_max: 1_000,
            pass_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(60),
            value_bytes_max: 1 << 20,
        }
    }

    /// A node that never has a subscription runs no manager thread; the first subscription
    /// starts it, and a restart with a stored subscription starts it at once.
    #[test]
    fn the_manager_starts_with_the_first_subscription() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        let file = dir.path().join("state.db.subscriptions");
        Connection::open(&db)
            .unwrap()
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 CREATE TABLE __patina_tables (name TEXT PRIMARY KEY);
                 INSERT INTO __patina_tables VALUES ('kv');
                 CREATE TABLE kv (k TEXT PRIMARY KEY, v TEXT);
                 INSERT INTO kv VALUES ('a', 'x');",
            )
            .unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (changes, _) = broadcast::channel(16);
            let (_stop, stopped) = tokio::sync::watch::channel(false);
            let subs = spawn(&db, &file, config(), changes.subscribe(), stopped.clone()).unwrap();
            assert!(subs.idle());
            // Asking about subscriptions starts nothing.
            assert!(subs.list().await.unwrap().is_empty());
            let unknown = subs.attach("x".into(), false, None).await.unwrap_err();
            assert!(matches!(unknown, SubsError::Unknown(_)), "{unknown:?}");
            assert!(matches!(
                subs.remove("x".into()).await,
                Err(SubsError::Unknown(_))
            ));
            assert!(subs.idle());
            // A start that fails (the file cannot be opened) leaves it idle for the next try.
            std::fs::remove_file(&file).unwrap();
            std::fs::create_dir(&file).unwrap();
            let failed = subs.subscribe("SELECT k FROM kv".into(), false, None).await;
            assert!(matches!(failed, Err(SubsError::Internal(_))), "{failed:?}");
            assert!(subs.idle());
            std::fs::remove_dir(&file).unwrap();
            let attached = subs
                .subscribe("SELECT k FROM kv".into(), false, None)
                .await
                .unwrap();
            assert!(!subs.idle());
            assert_eq!(attached.rows.unwrap().len(), 1);
            assert_eq!(subs.list().await.unwrap().len(), 1);
            drop(subs);
            // The stored subscription is reconciled after a restart: started at once.
            let again = spawn(&db, &file, config(), changes.subscribe(), stopped).unwrap();
            assert!(!again.idle());
            assert_eq!(again.list().await.unwrap()[0].id, attached.id);
        });
    }
}
