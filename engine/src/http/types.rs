//! The shapes of the v1 API, written once: the server writes them, the CLI and the tests read
//! them. They follow what Corrosion's published client (`corro-api-types`) sends and parses.
//!
//! JSON values map to SQLite values as null, integer, real, text; a blob is an array of byte
//! values (0..=255), both ways. In parameters a boolean binds as 0 or 1, and any other JSON
//! (an object, an array that is not bytes) binds as its JSON text.

use patina_core::value::Value;
use serde::{Deserialize, Serialize};
use serde_json::Map;

use crate::store::{Params, Statement};

/// A statement in one of the four forms the API accepts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ApiStatement {
    /// `"SELECT 1"`
    Simple(String),
    /// `["SELECT ?", [1]]`
    WithParams(String, Vec<SqlParam>),
    /// `["SELECT :a", {"a": 1}]` (names with or without their `:`, `@` or `$`)
    WithNamedParams(String, Map<String, serde_json::Value>),
    /// `{"query": "...", "params": [..]}` or `{"query": "...", "named_params": {..}}`
    Verbose {
        /// The SQL.
        query: String,
        /// Positional parameters.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        params: Option<Vec<SqlParam>>,
        /// Named parameters.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        named_params: Option<Map<String, serde_json::Value>>,
    },
}

impl From<&str> for ApiStatement {
    fn from(sql: &str) -> Self {
        ApiStatement::Simple(sql.to_owned())
    }
}

/// A parameter value as clients send it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SqlParam {
    /// NULL
    Null,
    /// Bound as 0 or 1.
    Bool(bool),
    /// INTEGER
    Integer(i64),
    /// REAL
    Real(f64),
    /// TEXT
    Text(String),
    /// BLOB, as an array of bytes.
    Blob(Vec<u8>),
    /// Any other JSON, bound as its text.
    Json(serde_json::Value),
}

impl SqlParam {
    fn into_value(self) -> Value {
        match self {
            SqlParam::Null => Value::Null,
            SqlParam::Bool(b) => Value::Integer(i64::from(b)),
            SqlParam::Integer(i) => Value::Integer(i),
            SqlParam::Real(r) => Value::Real(r),
            SqlParam::Text(s) => Value::Text(s),
            SqlParam::Blob(b) => Value::Blob(b),
            SqlParam::Json(j) => Value::Text(j.to_string()),
        }
    }
}

impl From<Value> for SqlParam {
    fn from(v: Value) -> Self {
        match v {
            Value::Null => SqlParam::Null,
            Value::Integer(i) => SqlParam::Integer(i),
            Value::Real(r) => SqlParam::Real(r),
            Value::Text(s) => SqlParam::Text(s),
            Value::Blob(b) => SqlParam::Blob(b),
        }
    }
}

fn named(values: Map<String, serde_json::Value>) -> Result<Params, String> {
    values
        .into_iter()
        .map(|(name, v)| {
            let param: SqlParam =
                serde_json::from_value(v).map_err(|e| format!("parameter {name}: {e}"))?;
            Ok((name, param.into_value()))
        })
        .collect::<Result<_, String>>()
        .map(Params::Named)
}

fn positional(values: Vec<SqlParam>) -> Params {
    Params::Positional(values.into_iter().map(SqlParam::into_value).collect())
}

impl ApiStatement {
    /// The SQL text.
    pub fn sql(&self) -> &str {
        match self {
            ApiStatement::Simple(sql)
            | ApiStatement::WithParams(sql, _)
            | ApiStatement::WithNamedParams(sql, _)
            | ApiStatement::Verbose { query: sql, .. } => sql,
        }
    }

    /// The store's statement; refuses SQL with a NUL byte (SQLite would stop reading there
    /// and run a prefix of what was sent) and both kinds of parameters at once.
    pub fn into_statement(self) -> Result<Statement, String> {
        if self.sql().contains('\0') {
            return Err("the SQL text contains a NUL byte".into());
        }
        Ok(match self {
            ApiStatement::Simple(sql) => Statement::new(sql),
            ApiStatement::WithParams(sql, p) => Statement {
                sql,
                params: positional(p),
            },
            ApiStatement::WithNamedParams(sql, p) => Statement {
                sql,
                params: named(p)?,
            },
            ApiStatement::Verbose {
                query,
                params,
                named_params,
            } => match (params, named_params) {
                (Some(_), Some(_)) => return Err("give params or named_params, not both".into()),
                (Some(p), None) => Statement {
                    sql: query,
                    params: positional(p),
                },
                (None, Some(p)) => Statement {
                    sql: query,
                    params: named(p)?,
                },
                (None, None) => Statement::new(query),
            },
        })
    }
}

/// A value in an answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SqlValue {
    /// NULL
    Null,
    /// INTEGER
    Integer(i64),
    /// REAL
    Real(f64),
    /// TEXT
    Text(String),
    /// BLOB, as an array of bytes.
    Blob(Vec<u8>),
}

impl From<Value> for SqlValue {
    fn from(v: Value) -> Self {
        match v {
            Value::Null => SqlValue::Null,
            Value::Integer(i) => SqlValue::Integer(i),
            Value::Real(r) => SqlValue::Real(r),
            Value::Text(s) => SqlValue::Text(s),
            Value::Blob(b) => SqlValue::Blob(b),
        }
    }
}

impl From<&Value> for SqlValue {
    fn from(v: &Value) -> Self {
        SqlValue::from(v.clone())
    }
}

impl SqlValue {
    /// The store's value.
    pub fn into_value(self) -> Value {
        match self {
            SqlValue::Null => Value::Null,
            SqlValue::Integer(i) => Value::Integer(i),
            SqlValue::Real(r) => Value::Real(r),
            SqlValue::Text(s) => Value::Text(s),
            SqlValue::Blob(b) => Value::Blob(b),
        }
    }

    /// As the CLI prints it in a tab-separated row.
    pub fn render(&self) -> String {
        match self {
            SqlValue::Null => "NULL".into(),
            SqlValue::Integer(i) => i.to_string(),
            SqlValue::Real(r) => r.to_string(),
            SqlValue::Text(s) => s.clone(),
            SqlValue::Blob(b) => format!(
                "x'{}'",
                b.iter().map(|x| format!("{x:02x}")).collect::<String>()
            ),
        }
    }
}

/// The answer of `POST /v1/transactions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecResponse {
    /// One per statement; on failure a single error.
    pub results: Vec<ExecResult>,
    /// Seconds from receiving the request to answering it.
    pub time: f64,
    /// The version this node gave the transaction; none when nothing changed or it failed.
    #[serde(default)]
    pub version: Option<u64>,
    /// This node's site id (hex).
    #[serde(default)]
    pub actor_id: Option<String>,
}

/// One statement's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ExecResult {
    /// It ran.
    Execute {
        /// Rows it changed.
        rows_affected: usize,
        /// Seconds it took.
        time: f64,
    },
    /// It failed (and the transaction with it).
    Error {
        /// Why.
        error: String,
    },
}

/// The body of every error answer outside a stream: `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// Why.
    pub error: String,
}

/// The kind of a subscription change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeType {
    /// A row entered the result.
    Insert,
    /// A row of the result changed.
    Update,
    /// A row left the result.
    Delete,
}

/// One NDJSON line of `/v1/queries` and `/v1/subscriptions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueryEvent {
    /// `{"columns": [..]}`, first.
    Columns(Vec<String>),
    /// `{"row": [row_id, [values]]}`, one per row.
    Row(u64, Vec<SqlValue>),
    /// `{"eoq": {"time": s, "change_id": n}}` after the rows (the change id for subscriptions).
    #[serde(rename = "eoq")]
    EndOfQuery {
        /// Seconds the query took.
        time: f64,
        /// For subscriptions: the change the rows are current to.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        change_id: Option<u64>,
    },
    /// `{"change": ["insert"|"update"|"delete", row_id, [values], change_id]}`.
    Change(ChangeType, u64, Vec<SqlValue>, u64),
    /// `{"error": "..."}`: the stream ends after it.
    Error(String),
}

/// One NDJSON line of `/v1/updates/{table}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyEvent {
    /// `{"notify": ["update"|"delete", [pk values]]}`.
    Notify(ChangeType, Vec<SqlValue>),
    /// `{"error": "..."}`: the stream ends after it.
    Error(String),
}

/// The answer of `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthResponse {
    /// The node's figures.
    Response {
        /// Versions this node knows exist and has not applied.
        gaps: u64,
        /// Cluster size as this node sees it, itself included.
        members: u64,
        /// 99th percentile of replication lag, seconds.
        p99_lag: f64,
        /// Requests waiting for the store.
        queue_size: u64,
        /// Replicated tables whose rows from before they became replicated have not been
        /// given clocks yet, so no peer gets them (the backfill failed: over the transaction
        /// cap, or the store at its size cap; it is tried again every minute and at every
        /// start). Not in Corrosion's answer; left out when empty, so the answer has
        /// Corrosion's shape.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        unreplicated_tables: Vec<String>,
    },
    /// The node cannot tell.
    Error(String),
}

/// The body of `POST /v1/table_stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableStatsRequest {
    /// Tables to count.
    pub tables: Vec<String>,
}

/// The answer of `POST /v1/table_stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableStatsResponse {
    /// Rows in the valid tables together.
    pub total_row_count: u64,
    /// Names that are not replicated tables.
    pub invalid_tables: Vec<String>,
}

/// One member in the admin socket's `GET /members`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// Site id (hex).
    pub site_id: String,
    /// Gossip address.
    pub addr: String,
}

/// The answer of the admin socket's `GET /members`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MembersResponse {
    /// Live members, this node excluded.
    pub members: Vec<Member>,
}

/// One table in `GET /v1/sync/digest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableDigest {
    /// Live rows.
    pub rows: u64,
    /// Hash of the rows (hex).
    pub hash: String,
}

/// The answer of `GET /v1/sync/digest`: equal on converged nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestResponse {
    /// Per replicated table.
    pub tables: std::collections::BTreeMap<String, TableDigest>,
    /// Hash of every clock (hex).
    pub clocks: String,
}

/// One site in `GET /v1/sync/state`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteSyncState {
    /// The highest version of the site this node heard of.
    pub head: u64,
    /// Version ranges (inclusive) it has not applied.
    pub needs: Vec<(u64, u64)>,
}

/// The answer of `GET /v1/sync/state`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncStateResponse {
    /// This node's site id (hex).
    pub actor_id: String,
    /// Per site (hex).
    pub sites: std::collections::BTreeMap<String, SiteSyncState>,
}

/// Parses an NDJSON body into events of type `T`, skipping blank lines.
pub fn parse_ndjson<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<Vec<T>, String> {
    body.split(|b| *b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .map(|l| {
            serde_json::from_slice(l).map_err(|e| format!("{e}: {}", String::from_utf8_lossy(l)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn statements_in_every_form_parse() {
        let forms = [
            json!("SELECT 1"),
            json!(["SELECT ?, ?", [1, "a"]]),
            json!(["SELECT :a", {"a": 1}]),
            json!({"query": "SELECT ?", "params": [[1, 2]]}),
            json!({"query": "SELECT :a", "named_params": {"a": null}}),
        ];
        for form in forms {
            let s: ApiStatement = serde_json::from_value(form.clone()).unwrap();
            s.into_statement().unwrap_or_else(|e| panic!("{form}: {e}"));
        }
        let both = json!({"query": "SELECT 1", "params": [], "named_params": {}});
        let s: ApiStatement = serde_json::from_value(both).unwrap();
        assert!(s.into_statement().is_err());
        let nul: ApiStatement = serde_json::from_value(json!("SELECT 1;\u{0}DROP")).unwrap();
        assert!(nul.into_statement().unwrap_err().contains("NUL"));
    }

    #[test]
    fn params_bind_as_corrosion_does() {
        let s: ApiStatement =
            serde_json::from_value(json!(["x", [true, 1.5, [1, 2], {"k": 1}, [1, 300]]])).unwrap();
        let Params::Positional(values) = s.into_statement().unwrap().params else {
            panic!("positional")
        };
        assert_eq!(
            values,
            vec![
                Value::Integer(1),
                Value::Real(1.5),
                Value::Blob(vec![1, 2]),
                Value::Text("{\"k\":1}".into()),
                Value::Text("[1,300]".into()),
            ]
        );
    }

    #[test]
    fn events_have_the_wire_shapes() {
        let lines = [
            (
                QueryEvent::Columns(vec!["a".into()]),
                json!({"columns": ["a"]}),
            ),
            (
                QueryEvent::Row(1, vec![SqlValue::Integer(1), SqlValue::Blob(vec![7])]),
                json!({"row": [1, [1, [7]]]}),
            ),
            (
                QueryEvent::EndOfQuery {
                    time: 0.5,
                    change_id: None,
                },
                json!({"eoq": {"time": 0.5}}),
            ),
            (
                QueryEvent::Change(ChangeType::Delete, 2, vec![SqlValue::Null], 9),
                json!({"change": ["delete", 2, [null], 9]}),
            ),
            (QueryEvent::Error("x".into()), json!({"error": "x"})),
        ];
        for (event, wire) in lines {
            assert_eq!(serde_json::to_value(&event).unwrap(), wire);
            assert_eq!(serde_json::from_value::<QueryEvent>(wire).unwrap(), event);
        }
        let health = HealthResponse::Response {
            gaps: 0,
            members: 3,
            p99_lag: 0.0,
            queue_size: 0,
            unreplicated_tables: vec![],
        };
        assert_eq!(
            serde_json::to_value(&health).unwrap(),
            json!({"response": {"gaps": 0, "members": 3, "p99_lag": 0.0, "queue_size": 0}})
        );
    }
}

/// The body of the admin socket's `POST /backup`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupRequest {
    /// Where the node writes the backup (a path on the node's host; must not exist).
    pub path: String,
}

/// The answer of `POST /backup`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupResponse {
    /// The backup file.
    pub path: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// The site id of the node (hex).
    pub site_id: String,
    /// How long it took, in seconds.
    pub seconds: f64,
}

/// The body of the admin socket's `POST /log/set`, and the answer of its log routes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogFilter {
    /// A filter in `RUST_LOG` syntax.
    pub filter: String,
}

/// One member as SWIM sees it, in the admin socket's `GET /membership-states`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberState {
    /// Site id (hex).
    pub site_id: String,
    /// Gossip address.
    pub addr: String,
    /// `alive`, `suspect` or `down`.
    pub state: String,
    /// SWIM incarnation (raised by the member to refute a suspicion).
    pub incarnation: u64,
    /// When this identity of the member started (ms since the epoch; a restart renews it).
    pub started_ms: u64,
}

/// The answer of `GET /membership-states`: every member SWIM knows, down ones included.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MembershipStatesResponse {
    /// The members, this node excluded.
    pub members: Vec<MemberState>,
}

/// The answer of `POST /rejoin`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejoinResponse {
    /// The addresses announced to (bootstrap entries, resolved again, and remembered members).
    pub announced_to: Vec<String>,
}

/// The body of `POST /sync/reconcile`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileRequest {
    /// The member to pull from: its site id (hex) or its gossip address (`host:port`).
    pub peer: String,
}

/// The answer of `POST /sync/reconcile`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReconcileResponse {
    /// The address pulled from.
    pub peer: String,
    /// Changesets received.
    pub changesets: usize,
    /// Bytes received.
    pub bytes_received: u64,
    /// How long the session took, in seconds.
    pub seconds: f64,
}

/// One subscription, in the admin socket's `GET /subs` and `GET /subs/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubscriptionInfo {
    /// Its id (`corro-query-id`).
    pub id: String,
    /// Hash of its SQL (`corro-query-hash`).
    pub hash: String,
    /// The SQL.
    pub sql: String,
    /// Its columns.
    pub columns: Vec<String>,
    /// Rows in its result now.
    pub rows: usize,
    /// The last change id it issued.
    pub last_change_id: u64,
    /// Streams attached now.
    pub subscribers: usize,
    /// Seconds since its last subscriber left (None while someone listens).
    pub idle_s: Option<f64>,
}

/// The answer of `GET /subs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubscriptionsResponse {
    /// Every subscription of the node.
    pub subscriptions: Vec<SubscriptionInfo>,
}
