//! The HTTP API, compatible with Corrosion's v1: `/v1/transactions`, `/v1/queries`,
//! `/v1/health`, `/v1/table_stats`; an optional bearer token; a limit on requests in flight
//! (503 past it); a body size limit (413 past it). And the admin router served on the local
//! unix socket (`POST /reload`).
//!
//! JSON values map to SQLite values as null, integer, real, text; a blob is a JSON array of
//! byte values (0..=255), both ways; booleans are written as 0 and 1.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use patina_core::ids::SiteId;
use patina_core::value::Value;
use serde::Deserialize;
use serde_json::{json, Map, Value as Json};
use tokio::sync::Semaphore;

use crate::agent::{ReaderPool, StoreHandle, TxError};
use crate::config::ApiConfig;
use crate::gossip::GossipSnapshot;
use crate::store::{Params, Statement, StoreError};
use crate::subs::{Attached, ChangeEvent, SubsError, SubsHandle};
use patina_core::change::RowChange;

/// What the handlers share.
#[derive(Debug)]
pub struct ApiState {
    store: StoreHandle,
    readers: Arc<ReaderPool>,
    site: SiteId,
    bearer_token: Option<String>,
    in_flight: Arc<Semaphore>,
    body_bytes_max: usize,
    gossip: tokio::sync::watch::Receiver<GossipSnapshot>,
    row_changes: tokio::sync::broadcast::Sender<Arc<Vec<RowChange>>>,
    subs: SubsHandle,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

/// The parts of the agent the API reads from, besides the store.
#[derive(Debug)]
pub struct ApiFeeds {
    /// Membership and gossip counters.
    pub gossip: tokio::sync::watch::Receiver<GossipSnapshot>,
    /// Rows changed by each commit.
    pub row_changes: tokio::sync::broadcast::Sender<Arc<Vec<RowChange>>>,
    /// The subscription thread.
    pub subs: SubsHandle,
    /// Stop signal.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

impl ApiState {
    /// State for the router.
    pub fn new(
        store: StoreHandle,
        readers: Arc<ReaderPool>,
        site: SiteId,
        feeds: ApiFeeds,
        config: &ApiConfig,
    ) -> Arc<ApiState> {
        let ApiFeeds {
            gossip,
            row_changes,
            subs,
            shutdown,
        } = feeds;
        Arc::new(ApiState {
            store,
            readers,
            site,
            bearer_token: config.authz.bearer_token.clone(),
            in_flight: Arc::new(Semaphore::new(config.concurrency_limit)),
            body_bytes_max: config.body_bytes_max,
            gossip,
            row_changes,
            subs,
            shutdown,
        })
    }
}

/// The v1 API.
pub fn router(state: Arc<ApiState>) -> Router {
    let limit = state.body_bytes_max;
    Router::new()
        .route("/v1/transactions", post(transactions))
        .route("/v1/queries", post(queries))
        .route("/v1/health", get(health))
        .route("/v1/table_stats", post(table_stats))
        .route("/v1/updates/{table}", post(updates))
        .route("/v1/subscriptions", post(subscribe))
        .route("/v1/subscriptions/{id}", get(resubscribe))
        .route("/v1/sync/digest", get(digest))
        .route("/v1/sync/state", get(sync_state))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// The admin API on the unix socket: `POST /reload`, `GET /members`.
pub fn admin_router(
    store: StoreHandle,
    gossip: tokio::sync::watch::Receiver<GossipSnapshot>,
) -> Router {
    Router::new()
        .route("/reload", post(reload))
        .with_state(store)
        .merge(
            Router::new()
                .route("/members", get(members))
                .with_state(gossip),
        )
}

async fn members(State(gossip): State<tokio::sync::watch::Receiver<GossipSnapshot>>) -> Response {
    let members: Vec<Json> = gossip
        .borrow()
        .members
        .iter()
        .map(|(site, addr)| json!({ "site_id": site.to_hex(), "addr": addr.to_string() }))
        .collect();
    axum::Json(json!({ "members": members })).into_response()
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, axum::Json(json!({ "error": message.to_string() }))).into_response()
}

/// Bearer token, then the in-flight limit.
async fn guard(State(state): State<Arc<ApiState>>, request: Request, next: Next) -> Response {
    if let Some(token) = &state.bearer_token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(token.as_str()) {
            return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
        }
    }
    let Ok(permit) = state.in_flight.clone().try_acquire_owned() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many requests in flight",
        );
    };
    let response = next.run(request).await;
    let streaming = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == b"application/x-ndjson");
    if !streaming {
        return response;
    }
    // A stream keeps its slot until it ends, so open streams count against the limit too.
    let (parts, body) = response.into_parts();
    let body = tokio_stream::StreamExt::map(body.into_data_stream(), move |chunk| {
        let _slot = &permit;
        chunk
    });
    Response::from_parts(parts, Body::from_stream(body))
}

#[derive(Debug, Deserialize)]
struct TimeoutParam {
    timeout: Option<f64>,
}

/// A statement as Corrosion's API accepts it.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StatementJson {
    Sql(String),
    WithParams(String, ParamsJson),
    Verbose {
        query: String,
        #[serde(default)]
        params: Option<Vec<Json>>,
        #[serde(default)]
        named_params: Option<Map<String, Json>>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ParamsJson {
    Positional(Vec<Json>),
    Named(Map<String, Json>),
}

fn json_to_value(v: &Json) -> Result<Value, String> {
    Ok(match v {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Integer(i64::from(*b)),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Value::Integer(i),
            None => Value::Real(n.as_f64().ok_or("number out of range")?),
        },
        Json::String(s) => Value::Text(s.clone()),
        Json::Array(items) => Value::Blob(
            items
                .iter()
                .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
                .collect::<Option<Vec<u8>>>()
                .ok_or("an array parameter must be a blob: bytes 0..=255")?,
        ),
        Json::Object(_) => return Err("objects are not SQL values".into()),
    })
}

fn value_to_json(v: &Value) -> Json {
    match v {
        Value::Null => Json::Null,
        Value::Integer(i) => json!(i),
        Value::Real(r) => json!(r),
        Value::Text(s) => json!(s),
        Value::Blob(b) => json!(b),
    }
}

fn positional(values: &[Json]) -> Result<Params, String> {
    Ok(Params::Positional(
        values.iter().map(json_to_value).collect::<Result<_, _>>()?,
    ))
}

fn named(values: &Map<String, Json>) -> Result<Params, String> {
    Ok(Params::Named(
        values
            .iter()
            .map(|(k, v)| Ok((k.clone(), json_to_value(v)?)))
            .collect::<Result<_, String>>()?,
    ))
}

impl StatementJson {
    fn into_statement(self) -> Result<Statement, String> {
        Ok(match self {
            StatementJson::Sql(sql) => Statement::new(sql),
            StatementJson::WithParams(sql, ParamsJson::Positional(p)) => Statement {
                sql,
                params: positional(&p)?,
            },
            StatementJson::WithParams(sql, ParamsJson::Named(p)) => Statement {
                sql,
                params: named(&p)?,
            },
            StatementJson::Verbose {
                query,
                params,
                named_params,
            } => match (params, named_params) {
                (Some(_), Some(_)) => return Err("give params or named_params, not both".into()),
                (Some(p), None) => Statement {
                    sql: query,
                    params: positional(&p)?,
                },
                (None, Some(p)) => Statement {
                    sql: query,
                    params: named(&p)?,
                },
                (None, None) => Statement::new(query),
            },
        })
    }
}

fn timeout(param: &TimeoutParam) -> Option<Duration> {
    param
        .timeout
        .filter(|t| t.is_finite() && *t > 0.0)
        .map(Duration::from_secs_f64)
}

async fn transactions(
    State(state): State<Arc<ApiState>>,
    Query(param): Query<TimeoutParam>,
    body: Bytes,
) -> Response {
    let start = Instant::now();
    let parsed: Vec<StatementJson> = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("expected a JSON array of statements: {e}"),
            )
        }
    };
    if parsed.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "empty transaction: give at least one statement",
        );
    }
    let statements = match parsed
        .into_iter()
        .map(StatementJson::into_statement)
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match state.store.transact(statements, timeout(&param)).await {
        Ok(out) => {
            let results: Vec<Json> = out
                .rows_affected
                .iter()
                .zip(&out.statement_times)
                .map(|(n, t)| json!({ "rows_affected": n, "time": t.as_secs_f64() }))
                .collect();
            axum::Json(json!({
                "results": results,
                "time": start.elapsed().as_secs_f64(),
                "version": out.version.map(|v| v.get()),
                "actor_id": state.site.to_hex(),
            }))
            .into_response()
        }
        Err(TxError::Overloaded) => error(StatusCode::SERVICE_UNAVAILABLE, TxError::Overloaded),
        Err(TxError::TimedOut) => error(StatusCode::REQUEST_TIMEOUT, TxError::TimedOut),
        Err(e) => {
            let message = match &e {
                TxError::Store(StoreError::Statement { message, .. }) => message.clone(),
                other => other.to_string(),
            };
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                axum::Json(json!({ "results": [{ "error": message }], "time": start.elapsed().as_secs_f64() })),
            )
                .into_response()
        }
    }
}

fn ndjson_line(value: &Json) -> Bytes {
    let mut line = serde_json::to_vec(value).expect("JSON values always serialize");
    line.push(b'\n');
    Bytes::from(line)
}

async fn queries(State(state): State<Arc<ApiState>>, body: Bytes) -> Response {
    let start = Instant::now();
    let statement = match serde_json::from_slice::<StatementJson>(&body)
        .map_err(|e| format!("expected one statement: {e}"))
        .and_then(StatementJson::into_statement)
    {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    // Lines flow through a bounded channel: a slow client slows the query, never memory.
    let (lines, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let (started, started_rx) = tokio::sync::oneshot::channel::<()>();
    let readers = state.readers.clone();
    let task = async move {
        readers
            .with_reader(move |reader| {
                let mut started = Some(started);
                let mut rowid = 0u64;
                let result = reader.query_each(
                    &statement,
                    |columns| {
                        let _ =
                            lines.blocking_send(Ok(ndjson_line(&json!({ "columns": columns }))));
                        if let Some(s) = started.take() {
                            let _ = s.send(());
                        }
                    },
                    |row| {
                        rowid += 1;
                        let values: Vec<Json> = row.iter().map(value_to_json).collect();
                        lines
                            .blocking_send(Ok(ndjson_line(&json!({ "row": [rowid, values] }))))
                            .is_ok()
                    },
                );
                let last = match &result {
                    Ok(()) => json!({ "eoq": { "time": start.elapsed().as_secs_f64() } }),
                    Err(e) => json!({ "error": e.to_string() }),
                };
                if started.is_none() {
                    let _ = lines.blocking_send(Ok(ndjson_line(&last)));
                }
                result
            })
            .await
    };
    let task = tokio::spawn(task);
    if started_rx.await.is_err() {
        // The statement never produced columns: it failed to prepare, or would write.
        return match task.await {
            Ok(Ok(Err(e))) | Ok(Err(e)) => error(StatusCode::BAD_REQUEST, e),
            _ => error(StatusCode::INTERNAL_SERVER_ERROR, "query failed"),
        };
    }
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .expect("static headers are valid")
}

#[derive(Debug, Deserialize)]
struct HealthParams {
    gaps: Option<u64>,
    p99_lag: Option<f64>,
    queue_size: Option<usize>,
    failure_status: Option<u16>,
}

async fn health(
    State(state): State<Arc<ApiState>>,
    Query(params): Query<HealthParams>,
) -> Response {
    let Some(status) = state.store.status().await else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "store unavailable");
    };
    let queue_size = state.store.queue_len();
    // No replication lag exists yet on a node that only has local writes.
    let p99_lag = 0.0;
    let healthy = params.gaps.is_none_or(|max| status.gaps <= max)
        && params.p99_lag.is_none_or(|max| p99_lag <= max)
        && params.queue_size.is_none_or(|max| queue_size <= max);
    let code = if healthy {
        StatusCode::OK
    } else {
        params
            .failure_status
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
    };
    (
        code,
        axum::Json(json!({ "response": {
            "gaps": status.gaps,
            // Cluster size as this node sees it, itself included.
            "members": state.gossip.borrow().members.len() + 1,
            "p99_lag": p99_lag,
            "queue_size": queue_size,
        }})),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct TableStatsRequest {
    tables: Vec<String>,
}

async fn table_stats(State(state): State<Arc<ApiState>>, body: Bytes) -> Response {
    let request: TableStatsRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"tables\": [..]}}: {e}"),
            )
        }
    };
    let Some(status) = state.store.status().await else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "store unavailable");
    };
    let (valid, invalid): (Vec<String>, Vec<String>) = request
        .tables
        .into_iter()
        .partition(|t| status.tables.contains(t));
    let counted = state
        .readers
        .with_reader(move |reader| {
            valid
                .iter()
                .map(|t| reader.count_rows(t))
                .sum::<Result<u64, _>>()
        })
        .await;
    match counted {
        Ok(Ok(total)) => axum::Json(json!({ "total_row_count": total, "invalid_tables": invalid }))
            .into_response(),
        Ok(Err(e)) | Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// `POST /v1/updates/{table}`: one NDJSON line per row of `table` changed by any later commit,
/// local or remote: `{"notify":["update"|"delete",[pk values]]}`. A consumer too slow to keep
/// up gets an error line and the stream ends (it can reconnect and re-read the table).
async fn updates(
    State(state): State<Arc<ApiState>>,
    axum::extract::Path(table): axum::extract::Path<String>,
) -> Response {
    let Some(status) = state.store.status().await else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "store unavailable");
    };
    if !status.tables.contains(&table) {
        return error(
            StatusCode::NOT_FOUND,
            format!("no replicated table {table}"),
        );
    }
    let mut changes = state.row_changes.subscribe();
    let mut shutdown = state.shutdown.clone();
    let (lines, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(256);
    tokio::spawn(async move {
        loop {
            let batch = tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => return,
                _ = lines.closed() => return,
                batch = changes.recv() => batch,
            };
            let batch = match batch {
                Ok(batch) => batch,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    let _ = lines.try_send(Ok(ndjson_line(
                        &json!({ "error": format!("consumer too slow: {n} commits skipped") }),
                    )));
                    return;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            for row in batch.iter().filter(|r| r.table == table) {
                let kind = if row.deleted { "delete" } else { "update" };
                let pk: Vec<Json> = row.pk.values().iter().map(value_to_json).collect();
                if lines
                    .try_send(Ok(ndjson_line(&json!({ "notify": [kind, pk] }))))
                    .is_err()
                {
                    // The client does not read: cut it off rather than buffer without bound.
                    let _ =
                        lines.try_send(Ok(ndjson_line(&json!({ "error": "consumer too slow" }))));
                    return;
                }
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .expect("static headers are valid")
}

/// Query string of the subscription endpoints.
#[derive(Debug, Deserialize, Default)]
struct SubscriptionParams {
    /// Leave the current rows out (columns, then eoq, then changes).
    #[serde(default)]
    skip_rows: bool,
    /// Resume after this change id: the changes since, then live ones.
    from: Option<u64>,
}

/// `POST /v1/subscriptions`: one SELECT; the query stream (columns, rows, eoq with change_id),
/// then change events. Identical SQL attaches to the same subscription.
async fn subscribe(
    State(state): State<Arc<ApiState>>,
    Query(params): Query<SubscriptionParams>,
    body: Bytes,
) -> Response {
    let statement = match serde_json::from_slice::<StatementJson>(&body)
        .map_err(|e| format!("expected one statement: {e}"))
        .and_then(StatementJson::into_statement)
    {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    if !matches!(statement.params, Params::None) {
        return error(
            StatusCode::BAD_REQUEST,
            "parameters are not supported in subscriptions: write the values into the SQL",
        );
    }
    let attached = state
        .subs
        .subscribe(statement.sql, params.skip_rows, params.from)
        .await;
    subscription_stream(&state, attached)
}

/// `GET /v1/subscriptions/{id}`: re-attach to a subscription (`from` to resume).
async fn resubscribe(
    State(state): State<Arc<ApiState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    Query(params): Query<SubscriptionParams>,
) -> Response {
    let attached = state.subs.attach(id, params.skip_rows, params.from).await;
    subscription_stream(&state, attached)
}

fn change_line(event: &ChangeEvent) -> Bytes {
    let values: Vec<Json> = event.values.iter().map(value_to_json).collect();
    ndjson_line(&json!({
        "change": [event.kind.name(), event.row_id, values, event.change_id]
    }))
}

fn subscription_stream(state: &ApiState, attached: Result<Attached, SubsError>) -> Response {
    let mut attached = match attached {
        Ok(a) => a,
        Err(e @ SubsError::BadQuery(_)) => return error(StatusCode::BAD_REQUEST, e),
        Err(e @ SubsError::Unknown(_)) => return error(StatusCode::NOT_FOUND, e),
        Err(e @ SubsError::TooMany(_)) => return error(StatusCode::SERVICE_UNAVAILABLE, e),
        Err(e @ SubsError::Resume(_)) => {
            // An error event, never a silent gap: the stream says why and ends.
            return Response::builder()
                .header(header::CONTENT_TYPE, "application/x-ndjson")
                .body(Body::from(ndjson_line(&json!({ "error": e.to_string() }))))
                .expect("static headers are valid");
        }
        Err(e @ SubsError::Internal(_)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let start = Instant::now();
    let mut head = vec![ndjson_line(&json!({ "columns": attached.columns }))];
    for (row_id, values) in attached.rows.take().unwrap_or_default() {
        let values: Vec<Json> = values.iter().map(value_to_json).collect();
        head.push(ndjson_line(&json!({ "row": [row_id, values] })));
    }
    if !attached.resumed {
        head.push(ndjson_line(&json!({
            "eoq": { "time": start.elapsed().as_secs_f64(), "change_id": attached.change_id }
        })));
    }
    for event in &attached.replay {
        head.push(change_line(event));
    }
    let (lines, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(256);
    let mut shutdown = state.shutdown.clone();
    let mut last = attached.change_id;
    let mut live = attached.live;
    tokio::spawn(async move {
        for line in head {
            if lines.send(Ok(line)).await.is_err() {
                return;
            }
        }
        loop {
            let event = tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => return,
                _ = lines.closed() => return,
                event = live.recv() => event,
            };
            let event = match event {
                Ok(event) => event,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    let _ = lines
                        .send(Ok(ndjson_line(&json!({
                            "error": format!(
                                "subscriber too slow: {n} changes dropped; resume with from={last}"
                            )
                        }))))
                        .await;
                    return;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            if event.change_id <= last {
                continue;
            }
            last = event.change_id;
            if lines.try_send(Ok(change_line(&event))).is_err() {
                // The client does not read: cut it off rather than buffer without bound.
                let _ = lines.try_send(Ok(ndjson_line(&json!({
                    "error": format!("subscriber too slow; resume with from={}", last - 1)
                }))));
                return;
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .header("corro-query-id", attached.id)
        .header("corro-query-hash", attached.hash)
        .body(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .expect("static headers are valid")
}

/// `GET /v1/sync/digest`: row counts and hashes per table and a hash of all clocks; equal on
/// converged nodes.
async fn digest(State(state): State<Arc<ApiState>>) -> Response {
    match state.store.digest().await {
        Some(Ok(d)) => {
            let tables: Map<String, Json> = d
                .tables
                .iter()
                .map(|(t, (rows, hash))| {
                    (
                        t.clone(),
                        json!({ "rows": rows, "hash": format!("{hash:016x}") }),
                    )
                })
                .collect();
            axum::Json(json!({ "tables": tables, "clocks": format!("{:016x}", d.clocks) }))
                .into_response()
        }
        Some(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        None => error(StatusCode::SERVICE_UNAVAILABLE, "store unavailable"),
    }
}

/// `GET /v1/sync/state`: per site, the head this node heard of and the versions it still needs.
async fn sync_state(State(state): State<Arc<ApiState>>) -> Response {
    let Some(sync) = state.store.sync_state().await else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "store unavailable");
    };
    let sites: Map<String, Json> = sync
        .sites
        .iter()
        .map(|(site, (head, needs))| (site.to_hex(), json!({ "head": head.get(), "needs": needs })))
        .collect();
    axum::Json(json!({ "actor_id": state.site.to_hex(), "sites": sites })).into_response()
}

async fn reload(State(store): State<StoreHandle>) -> Response {
    match store.reload().await {
        Ok(()) => axum::Json(json!({ "reloaded": true })).into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}
