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

mod workers;

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
    // Only plans queries (prepares them, runs none).
    let reader = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    reader.execute_batch("PRAGMA busy_timeout = 5000;")?;
    let storage = Connection::open(path)?;
    storage.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
         CREATE TABLE IF NOT EXISTS subs (
           id TEXT PRIMARY KEY, sql TEXT NOT NULL, hash TEXT NOT NULL UNIQUE,
           last_change_id INTEGER NOT NULL, next_row_id INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS sub_rows (
           sub TEXT NOT NULL, identity BLOB NOT NULL, row_id INTEGER NOT NULL, vals BLOB NOT NULL,
           PRIMARY KEY (sub, identity)) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS sub_changes (
           sub TEXT NOT NULL, change_id INTEGER NOT NULL, kind INTEGER NOT NULL,
           row_id INTEGER NOT NULL, vals BLOB NOT NULL,
           PRIMARY KEY (sub, change_id)) WITHOUT ROWID;",
    )?;
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

/// A subscription's query, rewritten.
#[derive(Debug, Clone)]
struct Plan {
    /// The query with the key columns appended, ORDER BY and LIMIT kept (the initial rows).
    ordered_sql: String,
    /// The same without ORDER BY and LIMIT (the whole result).
    full_sql: String,
    /// Per table of the FROM clause: its table, key arity, and the query restricted to
    /// changed keys of that table.
    aliases: Vec<AliasPlan>,
    /// Columns a client sees (the key columns come after them).
    visible: usize,
    /// Total key columns appended.
    key_columns: usize,
}

#[derive(Debug, Clone)]
struct AliasPlan {
    table: String,
    /// Where this alias's key sits among the appended key columns.
    key_start: usize,
    key_len: usize,
    restricted_sql: String,
}

/// Replicated tables and their primary-key columns, in key order.
fn replicated_tables(conn: &Connection) -> Result<BTreeMap<String, Vec<String>>, SubsError> {
    let names: Vec<String> = conn
        .prepare("SELECT name FROM __patina_tables")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut out = BTreeMap::new();
    for name in names {
        let mut pk: Vec<(i64, String)> = conn
            .prepare("SELECT pk, name FROM pragma_table_info(?1) WHERE pk > 0")?
            .query_map([&name], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        pk.sort();
        out.insert(
            name.to_lowercase(),
            pk.into_iter().map(|(_, c)| c).collect(),
        );
    }
    Ok(out)
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn unquote(part: &str) -> String {
    let t = part.trim();
    let inner = match (t.chars().next(), t.chars().last()) {
        (Some('"'), Some('"')) | (Some('`'), Some('`')) | (Some('['), Some(']'))
            if t.len() >= 2 =>
        {
            &t[1..t.len() - 1]
        }
        _ => t,
    };
    inner.to_string()
}

const AGGREGATES: [&str; 8] = [
    "count(",
    "sum(",
    "avg(",
    "min(",
    "max(",
    "total(",
    "group_concat(",
    "string_agg(",
];

/// What makes a result change with no commit, matched in the SQL text lowercased and without
/// spaces: randomness, the clock (date functions without a time value mean now), the
/// connection's own counters.
const NONDETERMINISTIC: &[&str] = &[
    "random(",
    "randomblob(",
    "'now'",
    "current_timestamp",
    "current_date",
    "current_time",
    "date()",
    "time()",
    "datetime()",
    "julianday()",
    "unixepoch()",
    "changes(",
    "last_insert_rowid(",
];

/// Rewrites `sql` into a [`Plan`], or says why it cannot be a subscription.
fn plan(sql: &str, tables: &BTreeMap<String, Vec<String>>) -> Result<(Plan, String), SubsError> {
    let bad = |m: String| SubsError::BadQuery(m);
    let dialect = SQLiteDialect {};
    let statements =
        Parser::parse_sql(&dialect, sql).map_err(|e| bad(format!("invalid SQL: {e}")))?;
    let [Statement::Query(query)] = statements.as_slice() else {
        return Err(bad("a subscription is exactly one SELECT statement".into()));
    };
    // Every SELECT after the first is a subquery, wherever it sits (a scalar subquery in the
    // WHERE clause, IN (SELECT ..), EXISTS): a commit to its tables changes the result without
    // touching the keys the matcher restricts its passes to, so it cannot be kept exact.
    let selects = sqlparser::tokenizer::Tokenizer::new(&dialect, sql)
        .tokenize()
        .map_err(|e| bad(format!("invalid SQL: {e}")))?
        .iter()
        .filter(|t| {
            matches!(t, sqlparser::tokenizer::Token::Word(w)
                if w.keyword == sqlparser::keywords::Keyword::SELECT)
        })
        .count();
    if selects > 1 {
        return Err(bad("subqueries are not supported in subscriptions".into()));
    }
    let lowered: String = sql
        .to_lowercase()
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    if let Some(f) = NONDETERMINISTIC.iter().find(|f| lowered.contains(*f)) {
        return Err(bad(format!(
            "{} is not supported in subscriptions: its value changes without a commit",
            f.trim_end_matches('(').trim_matches('\'')
        )));
    }
    let mut query = (**query).clone();
    if query.with.is_some() {
        return Err(bad("WITH is not supported in subscriptions".into()));
    }
    let normalized = query.to_string();
    let SetExpr::Select(select) = query.body.as_mut() else {
        return Err(bad(
            "a subscription is one plain SELECT (no UNION, VALUES...)".into(),
        ));
    };
    let grouped = !matches!(&select.group_by, GroupByExpr::Expressions(e, _) if e.is_empty());
    if select.distinct.is_some() || grouped || select.having.is_some() {
        return Err(bad(
            "DISTINCT, GROUP BY and HAVING are not supported in subscriptions".into(),
        ));
    }
    for item in &select.projection {
        let text = item.to_string().to_lowercase().replace(' ', "");
        if AGGREGATES.iter().any(|a| text.contains(a)) || text.contains(")over") {
            return Err(bad(format!(
                "aggregate and window functions are not supported in subscriptions: {item}"
            )));
        }
    }
    // The tables of the FROM clause, with the name each is known by in the query.
    let mut factors = Vec::new();
    for from in &select.from {
        factors.push(&from.relation);
        factors.extend(from.joins.iter().map(|j| &j.relation));
    }
    if factors.is_empty() {
        return Err(bad("a subscription reads at least one table".into()));
    }
    let mut aliases = Vec::new();
    for factor in factors {
        let TableFactor::Table {
            name, alias, args, ..
        } = factor
        else {
            return Err(bad(format!(
                "only tables can appear in FROM of a subscription, not {factor}"
            )));
        };
        if args.is_some() {
            return Err(bad(format!("table functions are not supported: {factor}")));
        }
        let full = name.to_string();
        let table = unquote(full.rsplit('.').next().unwrap_or(&full));
        let Some(pk) = tables.get(&table.to_lowercase()) else {
            return Err(bad(format!("{table} is not a replicated table")));
        };
        let known_as = alias
            .as_ref()
            .map(|a| a.name.value.clone())
            .unwrap_or_else(|| table.clone());
        aliases.push((table, known_as, pk.clone()));
    }
    // Append every table's key columns to the projection.
    let mut extra = Vec::new();
    let mut key_columns = 0;
    let mut alias_keys = Vec::new();
    for (i, (_, known_as, pk)) in aliases.iter().enumerate() {
        let start = key_columns;
        for (j, col) in pk.iter().enumerate() {
            extra.push(format!(
                "{}.{} AS {}",
                quote(known_as),
                quote(col),
                quote(&format!("__patina_key_{i}_{j}"))
            ));
            key_columns += 1;
        }
        alias_keys.push((start, pk.len()));
    }
    let appended = Parser::parse_sql(&dialect, &format!("SELECT {}", extra.join(", ")))
        .map_err(|e| SubsError::Internal(format!("rewriting: {e}")))?;
    let Some(Statement::Query(appended)) = appended.into_iter().next() else {
        return Err(SubsError::Internal("rewriting: no query".into()));
    };
    let SetExpr::Select(appended) = *appended.body else {
        return Err(SubsError::Internal("rewriting: no select".into()));
    };
    select.projection.extend(appended.projection);
    let ordered_sql = query.to_string();
    query.order_by = None;
    query.limit_clause = None;
    let full_sql = query.to_string();
    let mut plans = Vec::new();
    for (i, (table, known_as, pk)) in aliases.iter().enumerate() {
        let columns: Vec<String> = pk
            .iter()
            .map(|c| format!("{}.{}", quote(known_as), quote(c)))
            .collect();
        let keys: Vec<String> = (0..pk.len()).map(|j| format!("c{j}")).collect();
        let restriction = format!(
            "({}) IN (SELECT {} FROM temp.__patina_keys_{})",
            columns.join(", "),
            keys.join(", "),
            pk.len()
        );
        let restriction = Parser::new(&dialect)
            .try_with_sql(&restriction)
            .and_then(|mut p| p.parse_expr())
            .map_err(|e| SubsError::Internal(format!("rewriting: {e}")))?;
        let mut restricted = query.clone();
        let SetExpr::Select(select) = restricted.body.as_mut() else {
            return Err(SubsError::Internal("rewriting: no select".into()));
        };
        select.selection = Some(match select.selection.take() {
            Some(old) => Expr::BinaryOp {
                left: Box::new(Expr::Nested(Box::new(old))),
                op: BinaryOperator::And,
                right: Box::new(restriction),
            },
            None => restriction,
        });
        plans.push(AliasPlan {
            table: table.to_lowercase(),
            key_start: alias_keys[i].0,
            key_len: alias_keys[i].1,
            restricted_sql: restricted.to_string(),
        });
    }
    Ok((
        Plan {
            ordered_sql,
            full_sql,
            aliases: plans,
            visible: 0,
            key_columns,
        },
        normalized,
    ))
}

fn fnv(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
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

/// Result rows as (identity: the packed key columns, visible values).
type FoundRows = Vec<(Vec<u8>, Vec<Value>)>;

fn pack(values: &[Value]) -> Vec<u8> {
    PackedPk::pack(values)
        .map(|p| p.as_bytes().to_vec())
        .unwrap_or_default()
}

fn unpack(bytes: &[u8]) -> Result<Vec<Value>, SubsError> {
    PackedPk::from_bytes(bytes.to_vec())
        .map(|p| p.values())
        .map_err(|e| SubsError::Internal(format!("stored row: {e}")))
}

/// One subscription: its plan, its rows, its change stream.
struct Matcher {
    id: String,
    hash: String,
    sql: String,
    plan: Plan,
    columns: Vec<String>,
    /// identity (packed key values) -> (row id, visible values)
    rows: HashMap<Vec<u8>, (u64, Vec<Value>)>,
    /// Per alias: that table's key (packed) -> identities of rows it contributes to.
    by_alias: Vec<HashMap<Vec<u8>, BTreeSet<Vec<u8>>>>,
    next_row_id: u64,
    last_change_id: u64,
    live: broadcast::Sender<Arc<ChangeEvent>>,
    /// Since when nobody has listened (None while someone does).
    idle_since: Option<Instant>,
    /// False until its first rows are in (a query thread runs them).
    ready: bool,
    work: Work,
}

impl Matcher {
    /// Subscribers are waiting for its rows (a first or an ordered query is out for them).
    fn waited_on(&self) -> bool {
        !self.work.waiting.is_empty()
            || matches!(self.work.busy, Some(Purpose::First | Purpose::Ordered(_)))
    }

    fn alias_key(&self, alias: usize, identity_values: &[Value]) -> Vec<u8> {
        let a = &self.plan.aliases[alias];
        pack(&identity_values[a.key_start..a.key_start + a.key_len])
    }

    fn index(&mut self, identity: &[u8], add: bool) {
        let Ok(values) = unpack(identity) else { return };
        for alias in 0..self.plan.aliases.len() {
            let key = self.alias_key(alias, &values);
            let entry = self.by_alias[alias].entry(key.clone()).or_default();
            if add {
                entry.insert(identity.to_vec());
            } else {
                entry.remove(identity);
                if entry.is_empty() {
                    self.by_alias[alias].remove(&key);
                }
            }
        }
    }

    /// Diffs `found` (identity -> values) against the held rows among `scope` (None: all held
    /// rows); applies the difference and returns it as events (not yet numbered).
    fn diff(
        &mut self,
        scope: Option<BTreeSet<Vec<u8>>>,
        found: FoundRows,
    ) -> Vec<(ChangeType, u64, Vec<Value>, Vec<u8>)> {
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        for (identity, values) in found {
            seen.insert(identity.clone());
            match self.rows.get_mut(&identity) {
                Some((row_id, old)) => {
                    if *old != values {
                        *old = values.clone();
                        out.push((ChangeType::Update, *row_id, values, identity));
                    }
                }
                None => {
                    self.next_row_id += 1;
                    let row_id = self.next_row_id;
                    self.rows.insert(identity.clone(), (row_id, values.clone()));
                    self.index(&identity, true);
                    out.push((ChangeType::Insert, row_id, values, identity));
                }
            }
        }
        let gone: Vec<Vec<u8>> = match scope {
            Some(scope) => scope.into_iter().filter(|i| !seen.contains(i)).collect(),
            None => self
                .rows
                .keys()
                .filter(|i| !seen.contains(*i))
                .cloned()
                .collect(),
        };
        for identity in gone {
            if let Some((row_id, values)) = self.rows.remove(&identity) {
                self.index(&identity, false);
                out.push((ChangeType::Delete, row_id, values, identity));
            }
        }
        out
    }
}

/// A reply to a subscriber waiting for its subscription.
type Reply = oneshot::Sender<Result<Attached, SubsError>>;

/// A subscriber waiting for rows from the query threads.
struct Waiter {
    skip_rows: bool,
    reply: Reply,
}

/// What the query out for a subscription is for.
enum Purpose {
    /// A new subscription's first rows, in the query's order; its subscribers wait in
    /// `Work::waiting`.
    First,
    /// The whole result, to reconcile with (notices were lost, or after a restart).
    Full,
    /// The rows in the query's order, for these subscribers.
    Ordered(Vec<Waiter>),
    /// The rows of these changed keys (packed, per alias queried, in the order of the
    /// job's queries).
    Keys(Vec<(usize, Vec<Vec<u8>>)>),
}

/// A subscription's dealings with the query threads.
struct Work {
    /// The query out, if any: one at a time, so answers apply in the order the data changed.
    busy: Option<Purpose>,
    /// Its last query took longer than [`workers::QUICK`]: its next ones are heavy.
    slow: bool,
    /// Reconcile with the whole result next.
    full: bool,
    /// Changed keys per alias (packed -> values) not yet queried.
    keys: Vec<BTreeMap<Vec<u8>, Vec<Value>>>,
    /// Subscribers waiting for the rows.
    waiting: Vec<Waiter>,
}

impl Work {
    fn new(aliases: usize) -> Work {
        Work {
            busy: None,
            slow: false,
            full: false,
            keys: vec![BTreeMap::new(); aliases],
            waiting: Vec::new(),
        }
    }
}

struct Manager {
    /// Plans subscriptions (prepares their queries); runs none: the query threads do.
    reader: Connection,
    /// Heavy queries' thread.
    workers: Workers,
    /// Quick queries run here, on the manager thread (None until the first).
    inline: Option<Worker>,
    storage: Connection,
    config: SubsConfig,
    matchers: Vec<Matcher>,
    /// Events stored in the open transaction, sent when it commits.
    pending: Vec<(usize, Vec<Arc<ChangeEvent>>)>,
    /// True while any subscription exists: change notices are forwarded only then.
    any: Arc<std::sync::atomic::AtomicBool>,
}

impl Manager {
    fn note_any(&self) {
        let any = !self.matchers.is_empty();
        self.any.store(any, std::sync::atomic::Ordering::SeqCst);
    }

    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(command) = rx.blocking_recv() {
            match command {
                Command::Changes(first) => {
                    // Merge every notice already queued: one pass for all of them.
                    let mut batches = vec![first];
                    let mut later = None;
                    let mut resync = false;
                    while let Ok(next) = rx.try_recv() {
                        match next {
                            Command::Changes(b) => batches.push(b),
                            Command::Resync => resync = true,
                            other => {
                                later = Some(other);
                                break;
                            }
                        }
                    }
                    if resync {
                        self.resync();
                    } else {
                        self.on_changes(&batches);
                    }
                    if let Some(command) = later {
                        self.handle(command);
                    }
                }
                other => self.handle(other),
            }
            self.note_any();
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Subscribe {
                sql,
                skip_rows,
                from,
                reply,
            } => self.subscribe(&sql, skip_rows, from, reply),
            Command::Attach {
                id,
                skip_rows,
                from,
                reply,
            } => match self.position(&id) {
                Some(index) => self.attach(index, skip_rows, from, reply),
                None => {
                    let _ = reply.send(Err(SubsError::Unknown(id)));
                }
            },
            Command::Changes(batch) => self.on_changes(&[batch]),
            Command::Resync => self.resync(),
            Command::Done(done) => self.on_done(done),
            Command::Collect => self.collect(Instant::now()),
            Command::Remove { id, reply } => {
                let result = match self.position(&id) {
                    Some(index) => self.remove(index, "deleted by a client"),
                    None => Err(SubsError::Unknown(id)),
                };
                let _ = reply.send(result);
            }
            Command::List { reply } => {
                let now = Instant::now();
                let _ = reply.send(
                    self.matchers
                        .iter()
                        .map(|m| crate::http::types::SubscriptionInfo {
                            id: m.id.clone(),
                            hash: m.hash.clone(),
                            sql: m.sql.clone(),
                            columns: m.columns.clone(),
                            rows: m.rows.len(),
                            last_change_id: m.last_change_id,
                            subscribers: m.live.receiver_count(),
                            idle_s: m.idle_since.map(|at| now.duration_since(at).as_secs_f64()),
                        })
                        .collect(),
                );
            }
        }
    }

    /// The connection quick queries run on, opened with the first.
    fn inline_worker(&mut self) -> Result<&mut Worker, SubsError> {
        if self.inline.is_none() {
            self.inline = Some(self.workers.open_inline()?);
        }
        Ok(self.inline.as_mut().expect("opened just now"))
    }

    fn position(&self, id: &str) -> Option<usize> {
        self.matchers.iter().position(|m| m.id == id)
    }

    /// The subscription nobody has listened to for the longest, if any (one still running its
    /// first query is not a candidate).
    fn longest_unused(&self) -> Option<usize> {
        let now = Instant::now();
        self.matchers
            .iter()
            .enumerate()
            .filter(|(_, m)| m.ready && !m.waited_on() && m.live.receiver_count() == 0)
            .min_by_key(|(_, m)| m.idle_since.unwrap_or(now))
            .map(|(index, _)| index)
    }

    /// Removes the subscriptions nobody has listened to for the idle timeout.
    fn collect(&mut self, now: Instant) {
        let idle_timeout = self.config.idle_timeout;
        let mut expired = Vec::new();
        for (index, matcher) in self.matchers.iter_mut().enumerate() {
            if matcher.live.receiver_count() > 0 || matcher.waited_on() {
                matcher.idle_since = None;
                continue;
            }
            let since = *matcher.idle_since.get_or_insert(now);
            if now.duration_since(since) >= idle_timeout {
                expired.push(index);
            }
        }
        for index in expired.into_iter().rev() {
            if let Err(e) = self.remove(index, "nobody listened for the idle timeout") {
                tracing::warn!("subscriptions: collecting failed: {e}");
            }
        }
    }

    /// Forgets a subscription: storage, rows, history; its subscribers' streams end (their
    /// receiver is closed), and those still waiting for rows are told it is gone.
    fn remove(&mut self, index: usize, why: &str) -> Result<(), SubsError> {
        let id = self.matchers[index].id.clone();
        let tx = self.storage.transaction()?;
        for table in ["subs", "sub_rows", "sub_changes"] {
            let column = if table == "subs" { "id" } else { "sub" };
            tx.execute(&format!("DELETE FROM {table} WHERE {column} = ?1"), [&id])?;
        }
        tx.commit()?;
        let matcher = self.matchers.remove(index);
        let mut waiters = matcher.work.waiting;
        if let Some(Purpose::Ordered(more)) = matcher.work.busy {
            waiters.extend(more);
        }
        for waiter in waiters {
            let _ = waiter.reply.send(Err(SubsError::Unknown(id.clone())));
        }
        tracing::info!(subscription = %id, "subscription removed: {why}");
        Ok(())
    }

    /// Checks and plans `sql` against the current schema; returns the plan, the normalized SQL
    /// and the visible column names.
    fn prepare(&mut self, sql: &str) -> Result<(Plan, String, Vec<String>), SubsError> {
        let tables = replicated_tables(&self.reader)?;
        let (mut plan, normalized) = plan(sql, &tables)?;
        // Every table the query reads must be one of its FROM tables (a subquery reading
        // another table would miss that table's changes).
        let read = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
        let recorder = read.clone();
        self.reader
            .authorizer(Some(move |ctx: rusqlite::hooks::AuthContext<'_>| {
                if let rusqlite::hooks::AuthAction::Read { table_name, .. } = ctx.action {
                    if let Ok(mut read) = recorder.lock() {
                        read.insert(table_name.to_lowercase());
                    }
                }
                rusqlite::hooks::Authorization::Allow
            }))?;
        let prepared = self.reader.prepare(&plan.ordered_sql).map(|stmt| {
            (
                stmt.readonly(),
                stmt.column_names().map(str::to_owned).collect::<Vec<_>>(),
            )
        });
        self.reader.authorizer(
            None::<fn(rusqlite::hooks::AuthContext<'_>) -> rusqlite::hooks::Authorization>,
        )?;
        let (readonly, mut columns) =
            prepared.map_err(|e| SubsError::BadQuery(format!("invalid query: {e}")))?;
        if !readonly {
            return Err(SubsError::BadQuery("a subscription must not write".into()));
        }
        let from: BTreeSet<String> = plan.aliases.iter().map(|a| a.table.clone()).collect();
        let read = read
            .lock()
            .map_err(|_| SubsError::Internal("authorizer poisoned".into()))?;
        if let Some(other) = read.iter().find(|t| !from.contains(*t)) {
            return Err(SubsError::BadQuery(format!(
                "the query reads {other} outside its FROM clause (subqueries are not supported)"
            )));
        }
        columns.truncate(columns.len().saturating_sub(plan.key_columns));
        plan.visible = columns.len();
        Ok((plan, normalized, columns))
    }

    /// A new subscription (or a subscriber to the one with the same SQL). A new one's first
    /// rows come from a query thread; `reply` is answered then.
    fn subscribe(&mut self, sql: &str, skip_rows: bool, from: Option<u64>, reply: Reply) {
        let (plan, normalized, columns) = match self.prepare(sql) {
            Ok(planned) => planned,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let hash = fnv(&normalized);
        if let Some(index) = self.matchers.iter().position(|m| m.hash == hash) {
            return self.attach(index, skip_rows, from, reply);
        }
        if from.is_some() {
            let _ = reply.send(Err(SubsError::BadQuery(
                "from needs an existing subscription (GET /v1/subscriptions/{id})".into(),
            )));
            return;
        }
        // Full, with no subscription to make room: refused before any work.
        if self.matchers.len() >= self.config.max_subscriptions && self.longest_unused().is_none() {
            let _ = reply.send(Err(SubsError::TooMany(self.config.max_subscriptions)));
            return;
        }
        let (live, _) = broadcast::channel(self.config.subscriber_buffer);
        let mut work = Work::new(plan.aliases.len());
        work.waiting.push(Waiter { skip_rows, reply });
        self.matchers.push(Matcher {
            id: random_uuid(),
            hash,
            sql: sql.to_string(),
            by_alias: vec![HashMap::new(); plan.aliases.len()],
            plan,
            columns,
            rows: HashMap::new(),
            next_row_id: 0,
            last_change_id: 0,
            live,
            idle_since: None,
            ready: false,
            work,
        });
        self.note_any();
        let index = self.matchers.len() - 1;
        let matcher = &mut self.matchers[index];
        matcher.work.busy = Some(Purpose::First);
        let job = Job {
            sub: matcher.id.clone(),
            // Its cost is not known yet.
            lane: Lane::Heavy,
            // The whole result to hold (ORDER BY and LIMIT shape only the answer), and the
            // answer, from one snapshot.
            queries: vec![
                Query {
                    sql: matcher.plan.full_sql.clone(),
                    keys: None,
                },
                Query {
                    sql: matcher.plan.ordered_sql.clone(),
                    keys: None,
                },
            ],
            one_snapshot: true,
            visible: matcher.plan.visible,
            key_columns: matcher.plan.key_columns,
        };
        if let Err(e) = self.workers.submit(job) {
            let matcher = self.matchers.remove(index);
            for waiter in matcher.work.waiting {
                let _ = waiter.reply.send(Err(e.clone()));
            }
        }
    }

    /// A subscriber to an existing subscription: answered at once when it resumes from a change
    /// id or skips the rows; otherwise once a query thread has read the rows in order.
    fn attach(&mut self, index: usize, skip_rows: bool, from: Option<u64>, reply: Reply) {
        let matcher = &mut self.matchers[index];
        if !matcher.ready {
            if from.is_some() {
                let _ = reply.send(Err(SubsError::BadQuery(format!(
                    "subscription {} has no changes yet (its first query is running)",
                    matcher.id
                ))));
            } else {
                matcher.work.waiting.push(Waiter { skip_rows, reply });
            }
            return;
        }
        match from {
            Some(from) => {
                let _ = reply.send(self.replay(index, from));
            }
            None if skip_rows => {
                let _ = reply.send(Ok(self.attached(index, None, false, Vec::new())));
            }
            None => {
                matcher.work.waiting.push(Waiter { skip_rows, reply });
                self.dispatch(index);
            }
        }
    }

    /// A subscriber resuming after change id `from`: the changes since, from the history.
    fn replay(&mut self, index: usize, from: u64) -> Result<Attached, SubsError> {
        let matcher = &self.matchers[index];
        if from > matcher.last_change_id {
            return Err(SubsError::BadQuery(format!(
                "change id {from} is ahead of this subscription (last {})",
                matcher.last_change_id
            )));
        }
        let oldest: Option<i64> = self
            .storage
            .query_row(
                "SELECT min(change_id) FROM sub_changes WHERE sub = ?1",
                [&matcher.id],
                |r| r.get(0),
            )
            .optional()?
            .flatten();
        let oldest = oldest.map_or(matcher.last_change_id + 1, |o| o as u64);
        if from + 1 < oldest {
            return Err(SubsError::Resume(format!(
                "change id {from} is older than the history kept (changes {oldest} to {}): subscribe again without from",
                matcher.last_change_id
            )));
        }
        let mut replay = Vec::new();
        let mut stmt = self.storage.prepare_cached(
            "SELECT change_id, kind, row_id, vals FROM sub_changes
             WHERE sub = ?1 AND change_id > ?2 ORDER BY change_id",
        )?;
        let mut found = stmt.query(params![matcher.id, from as i64])?;
        while let Some(row) = found.next()? {
            replay.push(Arc::new(ChangeEvent {
                change_id: row.get::<_, i64>(0)? as u64,
                kind: kind_from_code(row.get(1)?),
                row_id: row.get::<_, i64>(2)? as u64,
                values: unpack(&row.get::<_, Vec<u8>>(3)?)?,
            }));
        }
        Ok(self.attached(index, None, true, replay))
    }

    fn attached(
        &self,
        index: usize,
        rows: Option<Vec<(u64, Vec<Value>)>>,
        resumed: bool,
        replay: Vec<Arc<ChangeEvent>>,
    ) -> Attached {
        let matcher = &self.matchers[index];
        Attached {
            id: matcher.id.clone(),
            hash: matcher.hash.clone(),
            columns: matcher.columns.clone(),
            rows,
            resumed,
            replay,
            change_id: matcher.last_change_id,
            live: matcher.live.subscribe(),
        }
    }

    /// Sends a subscription's next query, if it has work and none is out.
    fn dispatch(&mut self, index: usize) {
        let matcher = &mut self.matchers[index];
        let work = &mut matcher.work;
        if work.busy.is_some() || !matcher.ready {
            return;
        }
        let (purpose, queries) = if work.full {
            work.full = false;
            // The whole result covers every changed key.
            work.keys.iter_mut().for_each(BTreeMap::clear);
            let sql = matcher.plan.full_sql.clone();
            (Purpose::Full, vec![Query { sql, keys: None }])
        } else if !work.waiting.is_empty() {
            let sql = matcher.plan.ordered_sql.clone();
            let waiters = std::mem::take(&mut work.waiting);
            (Purpose::Ordered(waiters), vec![Query { sql, keys: None }])
        } else if work.keys.iter().any(|keys| !keys.is_empty()) {
            let mut scope = Vec::new();
            let mut queries = Vec::new();
            for (alias, keys) in work.keys.iter_mut().enumerate() {
                if keys.is_empty() {
                    continue;
                }
                let keys = std::mem::take(keys);
                let plan = &matcher.plan.aliases[alias];
                scope.push((alias, keys.keys().cloned().collect()));
                queries.push(Query {
                    sql: plan.restricted_sql.clone(),
                    keys: Some((plan.key_len, keys.into_values().collect())),
                });
            }
            (Purpose::Keys(scope), queries)
        } else {
            return;
        };
        // Whole results and ordered answers may be large whatever the last pass cost.
        let heavy = work.slow || !matches!(purpose, Purpose::Keys(_));
        let job = Job {
            sub: matcher.id.clone(),
            lane: if heavy { Lane::Heavy } else { Lane::Quick },
            queries,
            one_snapshot: false,
            visible: matcher.plan.visible,
            key_columns: matcher.plan.key_columns,
        };
        work.busy = Some(purpose);
        if job.lane == Lane::Quick {
            match self.inline_worker() {
                Ok(worker) => {
                    let done = worker.run(job);
                    return self.on_done(done);
                }
                Err(e) => {
                    tracing::error!("subscriptions: {e}");
                    self.matchers[index].work.busy = None;
                    self.matchers[index].work.full = true;
                }
            }
            return;
        }
        if let Err(e) = self.workers.submit(job) {
            tracing::error!("subscriptions: {e}");
            if let Some(Purpose::Ordered(waiters)) = self.matchers[index].work.busy.take() {
                for waiter in waiters {
                    let _ = waiter.reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// A query thread's answer: applied to its subscription (unless it was removed meanwhile),
    /// whose next query then goes out.
    fn on_done(&mut self, done: Done) {
        let Some(index) = self.position(&done.sub) else {
            return;
        };
        let matcher = &mut self.matchers[index];
        matcher.work.slow = done.took > workers::QUICK;
        let Some(purpose) = matcher.work.busy.take() else {
            return;
        };
        let result = match purpose {
            Purpose::First => self.first_rows(index, done.found),
            Purpose::Ordered(waiters) => {
                self.ordered_rows(index, done.found, waiters);
                Ok(())
            }
            Purpose::Full => done.found.and_then(|mut found| {
                let found = found.pop().unwrap_or_default();
                self.batch(|manager| {
                    let changes = manager.matchers[index].diff(None, found);
                    manager.emit(index, changes)
                })
            }),
            Purpose::Keys(scopes) => done.found.and_then(|found| {
                self.batch(|manager| {
                    for ((alias, keys), found) in scopes.into_iter().zip(found) {
                        let matcher = &mut manager.matchers[index];
                        let mut scope = BTreeSet::new();
                        for key in &keys {
                            if let Some(ids) = matcher.by_alias[alias].get(key) {
                                scope.extend(ids.iter().cloned());
                            }
                        }
                        let changes = matcher.diff(Some(scope), found);
                        manager.emit(index, changes)?;
                    }
                    Ok(())
                })
            }),
        };
        match result {
            Err(SubsError::TooCostly(why)) => {
                // It cannot be kept exact: it ends, and the others go on.
                if let Some(index) = self.position(&done.sub) {
                    let why = format!("too costly to maintain: {why}");
                    if let Err(e) = self.remove(index, &why) {
                        tracing::error!("subscriptions: removing failed: {e}");
                    }
                }
            }
            Err(e) => {
                tracing::error!(subscription = %done.sub, "subscriptions: applying changes failed: {e}");
                // The changes it carried are not lost: the next query reconciles the whole
                // result. Not at once (a lasting failure would spin): with the next change.
                if let Some(index) = self.position(&done.sub) {
                    self.matchers[index].work.full = true;
                }
                return;
            }
            Ok(()) => {}
        }
        if let Some(index) = self.position(&done.sub) {
            self.dispatch(index);
        }
    }

    /// A new subscription's first rows: the whole result (held, stored) and the rows in the
    /// query's order (the answer), read in one snapshot; then every waiting subscriber is
    /// answered. On failure, or with no room left, it is forgotten and they get the error.
    fn first_rows(
        &mut self,
        index: usize,
        found: Result<Vec<FoundRows>, SubsError>,
    ) -> Result<(), SubsError> {
        let id = self.matchers[index].id.clone();
        let fail = |manager: &mut Manager, e: SubsError| {
            if let Some(index) = manager.position(&id) {
                let matcher = manager.matchers.remove(index);
                for waiter in matcher.work.waiting {
                    let _ = waiter.reply.send(Err(e.clone()));
                }
            }
        };
        let (whole, ordered) = match found {
            Ok(mut found) if found.len() == 2 => {
                let ordered = found.pop().unwrap_or_default();
                (found.pop().unwrap_or_default(), ordered)
            }
            Ok(_) => {
                fail(
                    self,
                    SubsError::Internal("a first query answered wrongly".into()),
                );
                return Ok(());
            }
            Err(e) => {
                fail(self, e);
                return Ok(());
            }
        };
        // Only now, with the new one known to work, an unused one makes room; with none to
        // spare (others were added meanwhile), the new one is refused.
        if self.matchers.len() > self.config.max_subscriptions {
            match self.longest_unused().filter(|&i| i != index) {
                Some(unused) => {
                    if let Err(e) = self.remove(unused, "room for a new subscription") {
                        tracing::warn!("subscriptions: making room failed: {e}");
                    }
                }
                None => {
                    fail(self, SubsError::TooMany(self.config.max_subscriptions));
                    return Ok(());
                }
            }
        }
        let Some(index) = self.position(&id) else {
            return Ok(());
        };
        // The whole result is the starting point, not changes.
        let _ = self.matchers[index].diff(None, whole);
        if let Err(e) = self.store_new(index) {
            fail(self, e);
            return Ok(());
        }
        let matcher = &mut self.matchers[index];
        matcher.ready = true;
        let rows: Vec<(u64, Vec<Value>)> = ordered
            .into_iter()
            .filter_map(|(identity, values)| {
                matcher
                    .rows
                    .get(&identity)
                    .map(|(row_id, _)| (*row_id, values))
            })
            .collect();
        for waiter in std::mem::take(&mut matcher.work.waiting) {
            let rows = (!waiter.skip_rows).then(|| rows.clone());
            let _ = waiter
                .reply
                .send(Ok(self.attached(index, rows, false, Vec::new())));
        }
        Ok(())
    }

    /// Saves a new subscription with its first rows.
    fn store_new(&mut self, index: usize) -> Result<(), SubsError> {
        let matcher = &self.matchers[index];
        let tx = self.storage.transaction()?;
        tx.execute(
            "INSERT INTO subs (id, sql, hash, last_change_id, next_row_id) VALUES (?1, ?2, ?3, 0, ?4)",
            params![matcher.id, matcher.sql, matcher.hash, matcher.next_row_id as i64],
        )?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO sub_rows (sub, identity, row_id, vals) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (identity, (row_id, values)) in &matcher.rows {
                insert.execute(params![matcher.id, identity, *row_id as i64, pack(values)])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The rows in the query's order for subscribers attaching: any difference from the held
    /// rows (a commit not yet announced) becomes events first, so the rows agree with the
    /// stream.
    fn ordered_rows(
        &mut self,
        index: usize,
        found: Result<Vec<FoundRows>, SubsError>,
        waiters: Vec<Waiter>,
    ) {
        let result = found.and_then(|mut found| {
            let found = found.pop().unwrap_or_default();
            let mut stale = Vec::new();
            for (identity, values) in &found {
                if self.matchers[index].rows.get(identity).map(|(_, v)| v) != Some(values) {
                    stale.push((identity.clone(), values.clone()));
                }
            }
            if !stale.is_empty() {
                let scope: BTreeSet<Vec<u8>> = stale.iter().map(|(i, _)| i.clone()).collect();
                self.batch(|manager| {
                    let changes = manager.matchers[index].diff(Some(scope), stale);
                    manager.emit(index, changes)
                })?;
            }
            let matcher = &self.matchers[index];
            Ok(found
                .into_iter()
                .filter_map(|(identity, values)| {
                    matcher.rows.get(&identity).map(|(id, _)| (*id, values))
                })
                .collect::<Vec<_>>())
        });
        for waiter in waiters {
            let _ = waiter.reply.send(match &result {
                Ok(rows) => Ok(self.attached(index, Some(rows.clone()), false, Vec::new())),
                Err(e) => Err(e.clone()),
            });
        }
    }

    /// Runs `body` in one storage transaction; the events it emitted are sent to subscribers
    /// only once that transaction committed (durable before visible).
    fn batch(
        &mut self,
        body: impl FnOnce(&mut Manager) -> Result<(), SubsError>,
    ) -> Result<(), SubsError> {
        self.storage.execute_batch("BEGIN")?;
        match body(self) {
            Ok(()) => {
                self.storage.execute_batch("COMMIT")?;
                for (index, events) in std::mem::take(&mut self.pending) {
                    for event in events {
                        // No subscriber attached is fine: the history keeps it.
                        let _ = self.matchers[index].live.send(event);
                    }
                }
                Ok(())
            }
            Err(e) => {
                let _ = self.storage.execute_batch("ROLLBACK");
                self.pending.clear();
                Err(e)
            }
        }
    }

    /// Numbers the changes and stores them (rows, history, trimmed) inside the open
    /// transaction of [`Manager::batch`], which sends them.
    fn emit(
        &mut self,
        index: usize,
        changes: Vec<(ChangeType, u64, Vec<Value>, Vec<u8>)>,
    ) -> Result<(), SubsError> {
        if changes.is_empty() {
            return Ok(());
        }
        let history_len = self.config.history_len;
        let matcher = &mut self.matchers[index];
        let mut events = Vec::with_capacity(changes.len());
        let db = &self.storage;
        let mut upsert = db.prepare_cached(
            "INSERT OR REPLACE INTO sub_rows (sub, identity, row_id, vals) VALUES (?1, ?2, ?3, ?4)",
        )?;
        let mut delete =
            db.prepare_cached("DELETE FROM sub_rows WHERE sub = ?1 AND identity = ?2")?;
        let mut record = db.prepare_cached(
            "INSERT INTO sub_changes (sub, change_id, kind, row_id, vals) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for (kind, row_id, values, identity) in changes {
            matcher.last_change_id += 1;
            let packed = pack(&values);
            if kind == ChangeType::Delete {
                delete.execute(params![matcher.id, identity])?;
            } else {
                upsert.execute(params![matcher.id, identity, row_id as i64, packed])?;
            }
            record.execute(params![
                matcher.id,
                matcher.last_change_id as i64,
                kind_code(kind),
                row_id as i64,
                packed
            ])?;
            events.push(Arc::new(ChangeEvent {
                kind,
                row_id,
                values,
                change_id: matcher.last_change_id,
            }));
        }
        db.prepare_cached("DELETE FROM sub_changes WHERE sub = ?1 AND change_id <= ?2")?
            .execute(params![
                matcher.id,
                matcher.last_change_id.saturating_sub(history_len) as i64
            ])?;
        db.prepare_cached("UPDATE subs SET last_change_id = ?2, next_row_id = ?3 WHERE id = ?1")?
            .execute(params![
                matcher.id,
                matcher.last_change_id as i64,
                matcher.next_row_id as i64
            ])?;
        self.pending.push((index, events));
        Ok(())
    }

    /// Records the changed keys for every subscription reading their tables, and sends the
    /// queries of those with none out.
    fn on_changes(&mut self, batches: &[Arc<Vec<RowChange>>]) {
        // Changed keys per table, deduplicated across the batches.
        let mut changed: BTreeMap<String, BTreeMap<Vec<u8>, Vec<Value>>> = BTreeMap::new();
        for batch in batches {
            for row in batch.iter() {
                changed
                    .entry(row.table.to_lowercase())
                    .or_default()
                    .insert(row.pk.as_bytes().to_vec(), row.pk.values());
            }
        }
        let mut touched: Vec<String> = Vec::new();
        for matcher in self.matchers.iter_mut() {
            let mut reads = false;
            for (alias, plan) in matcher.plan.aliases.iter().enumerate() {
                if let Some(keys) = changed.get(&plan.table) {
                    let pending = &mut matcher.work.keys[alias];
                    pending.extend(keys.iter().map(|(k, v)| (k.clone(), v.clone())));
                    reads = true;
                }
            }
            if reads {
                touched.push(matcher.id.clone());
            }
        }
        // By id: a quick query runs at once and may end its subscription (indices shift).
        for id in touched {
            if let Some(index) = self.position(&id) {
                self.dispatch(index);
            }
        }
    }

    /// Compares every subscription with the whole data and emits the difference.
    fn resync(&mut self) {
        let ids: Vec<String> = self.matchers.iter().map(|m| m.id.clone()).collect();
        for id in ids {
            if let Some(index) = self.position(&id) {
                self.matchers[index].work.full = true;
                self.dispatch(index);
            }
        }
    }

    /// Loads the stored subscriptions and reconciles them with the data.
    fn load(&mut self) -> Result<(), SubsError> {
        let stored: Vec<(String, String, String, i64, i64)> = self
            .storage
            .prepare("SELECT id, sql, hash, last_change_id, next_row_id FROM subs")?
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<Result<_, _>>()?;
        for (id, sql, hash, last_change_id, next_row_id) in stored {
            let (plan, _, columns) = match self.prepare(&sql) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!("subscription {id} can no longer run ({e}); dropped");
                    continue;
                }
            };
            let (live, _) = broadcast::channel(self.config.subscriber_buffer);
            let mut matcher = Matcher {
                id: id.clone(),
                hash,
                sql,
                by_alias: vec![HashMap::new(); plan.aliases.len()],
                plan,
                columns,
                rows: HashMap::new(),
                next_row_id: next_row_id as u64,
                last_change_id: last_change_id as u64,
                live,
                // Nobody listens yet after a restart: collected unless someone resumes it.
                idle_since: Some(Instant::now()),
                ready: true,
                work: Work::new(0),
            };
            matcher.work = Work::new(matcher.plan.aliases.len());
            let rows: Vec<(Vec<u8>, i64, Vec<u8>)> = self
                .storage
                .prepare("SELECT identity, row_id, vals FROM sub_rows WHERE sub = ?1")?
                .query_map([&id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()?;
            for (identity, row_id, vals) in rows {
                matcher
                    .rows
                    .insert(identity.clone(), (row_id as u64, unpack(&vals)?));
                matcher.index(&identity, true);
            }
            self.matchers.push(matcher);
        }
        self.note_any();
        // Anything committed while subscriptions were not watching becomes events (soon).
        self.resync();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables() -> BTreeMap<String, Vec<String>> {
        BTreeMap::from([
            ("hosts".to_string(), vec!["id".to_string()]),
            ("kv".to_string(), vec!["k".to_string(), "n".to_string()]),
        ])
    }

    #[test]
    fn plans_append_keys_and_restrict_per_table() {
        let (plan, _) = plan(
            "SELECT h.name, kv.v FROM hosts h JOIN kv ON kv.k = h.name WHERE h.id > 3 ORDER BY h.name LIMIT 5",
            &tables(),
        )
        .unwrap();
        assert_eq!(plan.key_columns, 3);
        assert!(plan.ordered_sql.contains("LIMIT 5"), "{}", plan.ordered_sql);
        assert!(!plan.full_sql.contains("LIMIT"), "{}", plan.full_sql);
        assert_eq!(plan.aliases.len(), 2);
        assert!(
            plan.aliases[1].restricted_sql.contains(
                "(\"kv\".\"k\", \"kv\".\"n\") IN (SELECT c0, c1 FROM temp.__patina_keys_2)"
            ),
            "{}",
            plan.aliases[1].restricted_sql
        );
        assert!(
            plan.aliases[0].restricted_sql.contains("(h.id > 3) AND"),
            "{}",
            plan.aliases[0].restricted_sql
        );
    }

    #[test]
    fn unsupported_shapes_are_refused_with_a_reason() {
        for (sql, reason) in [
            ("SELEC * FROM hosts", "invalid SQL"),
            (
                "SELECT * FROM hosts; SELECT * FROM kv",
                "exactly one SELECT",
            ),
            ("INSERT INTO hosts VALUES (1)", "exactly one SELECT"),
            ("SELECT count(*) FROM hosts", "aggregate"),
            ("SELECT DISTINCT name FROM hosts", "DISTINCT"),
            ("SELECT name FROM hosts GROUP BY name", "GROUP BY"),
            (
                "SELECT * FROM hosts UNION SELECT * FROM hosts",
                "subqueries",
            ),
            ("SELECT * FROM other", "not a replicated table"),
            ("SELECT * FROM (SELECT * FROM hosts)", "subqueries"),
            ("SELECT 1", "at least one table"),
            (
                "SELECT a.id FROM hosts a WHERE a.id >= (SELECT max(id) FROM hosts)",
                "subqueries",
            ),
            (
                "SELECT id FROM hosts WHERE id IN (SELECT n FROM kv)",
                "subqueries",
            ),
            (
                "SELECT id FROM hosts WHERE EXISTS (select 1 FROM kv)",
                "subqueries",
            ),
            ("SELECT id, random() FROM hosts", "random"),
            (
                "SELECT id FROM hosts WHERE name < CURRENT_TIMESTAMP",
                "current_timestamp",
            ),
            ("SELECT id, unixepoch( ) FROM hosts", "unixepoch"),
            (
                "SELECT id FROM hosts WHERE date('now') > '2020-01-01'",
                "now",
            ),
        ] {
            let err = plan(sql, &tables()).unwrap_err().to_string();
            assert!(err.contains(reason), "{sql}: {err}");
        }
        // The word in a string is not a subquery.
        plan("SELECT id FROM hosts WHERE name = 'SELECT'", &tables()).unwrap();
    }
}
