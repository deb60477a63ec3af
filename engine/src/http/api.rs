//! The HTTP API, compatible with Corrosion's v1: `/v1/transactions`, `/v1/queries`,
//! `/v1/health`, `/v1/table_stats`, `/v1/updates/{table}`, `/v1/subscriptions`; an optional
//! bearer token; a limit on requests in flight (503 past it; health is exempt, and a stream
//! gives its slot back once it has started and counts against `streams_max` instead); a body
//! size limit (413 past it). And the admin router served on the local unix socket.
//!
//! Every statement has a deadline (`?timeout=` seconds, else `api.statement_timeout_ms`),
//! enforced while it runs; a query is also stopped when its client leaves. The request and
//! answer shapes are in [`crate::http::types`].

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
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_stream::StreamExt as _;

use crate::config::ApiConfig;
use crate::http::types::{
    ApiStatement, ChangeType, DigestResponse, ErrorResponse, ExecResponse, ExecResult,
    HealthResponse, Member, MembersResponse, NotifyEvent, QueryEvent, SiteSyncState, SqlValue,
    SyncStateResponse, TableDigest, TableStatsRequest, TableStatsResponse,
};
use crate::net::gossip::GossipSnapshot;
use crate::store::actor::{StoreHandle, TxError};
use crate::store::readers::ReaderPool;
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
    streams: Arc<Semaphore>,
    streams_max: usize,
    statement_timeout: Duration,
    body_bytes_max: usize,
    gossip: tokio::sync::watch::Receiver<GossipSnapshot>,
    row_changes: tokio::sync::broadcast::Sender<Arc<Vec<RowChange>>>,
    subs: SubsHandle,
    shutdown: tokio::sync::watch::Receiver<bool>,
    metrics: Arc<crate::metrics::NodeMetrics>,
    health_slots: Arc<Semaphore>,
}

/// Health checks answered at once; more get 503 at once.
const HEALTH_CHECKS_MAX: usize = 8;

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
    /// Where request latencies and stream cut-offs are counted.
    pub metrics: Arc<crate::metrics::NodeMetrics>,
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
            metrics,
        } = feeds;
        Arc::new(ApiState {
            store,
            readers,
            site,
            bearer_token: config.authz.bearer_token.clone(),
            in_flight: Arc::new(Semaphore::new(config.concurrency_limit)),
            streams: Arc::new(Semaphore::new(config.streams_max)),
            streams_max: config.streams_max,
            statement_timeout: Duration::from_millis(config.statement_timeout_ms),
            body_bytes_max: config.body_bytes_max,
            gossip,
            row_changes,
            subs,
            shutdown,
            metrics,
            health_slots: Arc::new(Semaphore::new(HEALTH_CHECKS_MAX)),
        })
    }

    /// The deadline of a request's statements.
    fn deadline(&self, param: &TimeoutParam, start: Instant) -> Instant {
        let timeout = param
            .timeout
            .filter(|t| t.is_finite() && *t > 0.0)
            .map_or(self.statement_timeout, |t| {
                Duration::from_secs_f64(t.min(24.0 * 3600.0))
            });
        start + timeout
    }

    /// A slot for a long-lived stream, or the 503 to answer.
    fn stream_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        self.streams.clone().try_acquire_owned().map_err(|_| {
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("too many open streams ({})", self.streams_max),
            )
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
        .route(
            "/v1/subscriptions/{id}",
            get(resubscribe).delete(unsubscribe),
        )
        .route("/v1/sync/digest", get(digest))
        .route("/v1/sync/state", get(sync_state))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(DefaultBodyLimit::max(limit))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            observe_latency,
        ))
        .with_state(state)
}

/// Observes each request's time from arrival to its answer's head, by route template (never
/// the raw path: ids would make the label set unbounded), method and status.
async fn observe_latency(
    State(state): State<Arc<ApiState>>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    // Only the methods the API serves: any other would add a label value per request.
    let method = match *request.method() {
        axum::http::Method::GET => "GET",
        axum::http::Method::POST => "POST",
        axum::http::Method::DELETE => "DELETE",
        axum::http::Method::HEAD => "HEAD",
        _ => "other",
    }
    .to_string();
    let response = next.run(request).await;
    state
        .metrics
        .api_request_seconds
        .get_or_create(&vec![
            ("route", route),
            ("method", method),
            ("status", response.status().as_u16().to_string()),
        ])
        .observe(started.elapsed().as_secs_f64());
    response
}

/// What the admin socket's routes reach.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// The store thread.
    pub store: StoreHandle,
    /// Membership and gossip counters.
    pub gossip: tokio::sync::watch::Receiver<GossipSnapshot>,
    /// The database file (backups read it on a connection of their own).
    pub db_path: std::path::PathBuf,
    /// Requests to the gossip task (membership states, rejoin, reconcile).
    pub control: tokio::sync::mpsc::Sender<crate::net::gossip::GossipControl>,
    /// The subscription thread.
    pub subs: SubsHandle,
}

/// The admin API on the unix socket: `POST /reload`, `GET /members`, `GET /membership-states`,
/// `POST /rejoin`, `POST /sync/reconcile`, `GET /subs`, `GET /subs/{id}`, `POST /backup`,
/// `GET /log`, `POST /log/set`, `POST /log/reset`.
pub fn admin_router(state: AdminState) -> Router {
    let state = Arc::new(state);
    Router::new()
        .route("/reload", post(reload))
        .route("/members", get(members))
        .route("/membership-states", get(membership_states))
        .route("/rejoin", post(rejoin))
        .route("/sync/reconcile", post(reconcile))
        .route("/subs", get(subs_list))
        .route("/subs/{id}", get(subs_info))
        .route("/backup", post(backup))
        .route("/log", get(log_show))
        .route("/log/set", post(log_set))
        .route("/log/reset", post(log_reset))
        .with_state(state)
}

/// Sends a request to the gossip task and waits (bounded) for its answer.
async fn ask_gossip<T>(
    state: &AdminState,
    make: impl FnOnce(tokio::sync::oneshot::Sender<T>) -> crate::net::gossip::GossipControl,
) -> Result<T, Response> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let unavailable = || {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the gossip task is not running",
        )
    };
    state
        .control
        .send(make(reply))
        .await
        .map_err(|_| unavailable())?;
    match tokio::time::timeout(Duration::from_secs(60), answer).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(_)) => Err(unavailable()),
        Err(_) => Err(error(StatusCode::GATEWAY_TIMEOUT, "no answer within 60 s")),
    }
}

async fn membership_states(State(state): State<Arc<AdminState>>) -> Response {
    match ask_gossip(&state, crate::net::gossip::GossipControl::States).await {
        Ok(states) => axum::Json(crate::http::types::MembershipStatesResponse {
            members: states
                .into_iter()
                .map(
                    |(actor, state, incarnation)| crate::http::types::MemberState {
                        site_id: actor.site_id().to_hex(),
                        addr: actor.addr.to_string(),
                        state: state.to_string(),
                        incarnation,
                        started_ms: actor.bump,
                    },
                )
                .collect(),
        })
        .into_response(),
        Err(response) => response,
    }
}

async fn rejoin(State(state): State<Arc<AdminState>>) -> Response {
    match ask_gossip(&state, crate::net::gossip::GossipControl::Rejoin).await {
        Ok(announced_to) => {
            axum::Json(crate::http::types::RejoinResponse { announced_to }).into_response()
        }
        Err(response) => response,
    }
}

async fn reconcile(
    State(state): State<Arc<AdminState>>,
    axum::Json(request): axum::Json<crate::http::types::ReconcileRequest>,
) -> Response {
    let answer = ask_gossip(&state, |reply| {
        crate::net::gossip::GossipControl::Reconcile {
            peer: request.peer,
            reply,
        }
    })
    .await;
    match answer {
        Ok(Ok((peer, report, took))) => axum::Json(crate::http::types::ReconcileResponse {
            peer: peer.to_string(),
            changesets: report.changesets,
            bytes_received: report.bytes_received,
            seconds: took.as_secs_f64(),
        })
        .into_response(),
        // A peer that is not a member or not an address is the request's fault; a session
        // that failed is the peer's.
        Ok(Err(e)) if e.starts_with("sync with") => error(StatusCode::BAD_GATEWAY, e),
        Ok(Err(e)) => error(StatusCode::BAD_REQUEST, e),
        Err(response) => response,
    }
}

async fn subs_list(State(state): State<Arc<AdminState>>) -> Response {
    match state.subs.list().await {
        Ok(subscriptions) => {
            axum::Json(crate::http::types::SubscriptionsResponse { subscriptions }).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

async fn subs_info(
    State(state): State<Arc<AdminState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    match state.subs.list().await {
        Ok(all) => match all.into_iter().find(|s| s.id == id) {
            Some(info) => axum::Json(info).into_response(),
            None => error(StatusCode::NOT_FOUND, format!("no subscription {id}")),
        },
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

async fn members(State(state): State<Arc<AdminState>>) -> Response {
    let members = state
        .gossip
        .borrow()
        .members
        .iter()
        .map(|(site, addr)| Member {
            site_id: site.to_hex(),
            addr: addr.to_string(),
        })
        .collect();
    axum::Json(MembersResponse { members }).into_response()
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (
        status,
        axum::Json(ErrorResponse {
            error: message.to_string(),
        }),
    )
        .into_response()
}

/// The status of a store error: 4xx when the request is at fault.
fn store_status(e: &StoreError) -> StatusCode {
    match e {
        StoreError::DeadlinePassed(_) => StatusCode::REQUEST_TIMEOUT,
        StoreError::ReadersBusy(_) => StatusCode::SERVICE_UNAVAILABLE,
        // Passes once the readers holding the WAL end, by their deadline at the latest.
        StoreError::WalFull { .. } => StatusCode::SERVICE_UNAVAILABLE,
        // The client is gone; nobody reads this.
        StoreError::Cancelled => StatusCode::REQUEST_TIMEOUT,
        e if e.is_client_fault() => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Bearer token, then the in-flight limit. Health is exempt from both: probes of load
/// balancers and orchestrators carry no token, and it must answer when the node is busiest.
/// A request holds its slot until its answer has started; a stream then runs on a slot of
/// `streams_max` instead, so open streams never starve plain requests.
async fn guard(State(state): State<Arc<ApiState>>, request: Request, next: Next) -> Response {
    if request.uri().path() == "/v1/health" {
        return next.run(request).await;
    }
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
    let Ok(_permit) = state.in_flight.clone().try_acquire_owned() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many requests in flight",
        );
    };
    next.run(request).await
}

#[derive(Debug, Deserialize)]
struct TimeoutParam {
    /// Seconds.
    timeout: Option<f64>,
}

/// An error answer not yet rendered (small to pass around).
#[derive(Debug)]
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error(self.0, self.1)
    }
}

fn parse_statement(body: &[u8]) -> Result<Statement, ApiError> {
    serde_json::from_slice::<ApiStatement>(body)
        .map_err(|e| format!("expected one statement: {e}"))
        .and_then(ApiStatement::into_statement)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))
}

async fn transactions(
    State(state): State<Arc<ApiState>>,
    Query(param): Query<TimeoutParam>,
    body: Bytes,
) -> Response {
    let start = Instant::now();
    let deadline = state.deadline(&param, start);
    let parsed: Vec<ApiStatement> = match serde_json::from_slice(&body) {
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
        .map(ApiStatement::into_statement)
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let result = state
        .store
        .transact(statements, Some(deadline.saturating_duration_since(start)))
        .await;
    let failed = |status: StatusCode, message: String| {
        (
            status,
            axum::Json(ExecResponse {
                results: vec![ExecResult::Error { error: message }],
                time: start.elapsed().as_secs_f64(),
                version: None,
                actor_id: Some(state.site.to_hex()),
            }),
        )
            .into_response()
    };
    match result {
        Ok(out) => axum::Json(ExecResponse {
            results: out
                .rows_affected
                .iter()
                .zip(&out.statement_times)
                .map(|(n, t)| ExecResult::Execute {
                    rows_affected: *n,
                    time: t.as_secs_f64(),
                })
                .collect(),
            time: start.elapsed().as_secs_f64(),
            version: out.version.map(|v| v.get()),
            actor_id: Some(state.site.to_hex()),
        })
        .into_response(),
        Err(e @ TxError::Overloaded) => failed(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e @ TxError::Unavailable) => failed(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e @ TxError::TimedOut) => failed(StatusCode::REQUEST_TIMEOUT, e.to_string()),
        Err(TxError::Store(e)) => {
            let message = match &e {
                StoreError::Statement { message, .. } => message.clone(),
                other => other.to_string(),
            };
            failed(store_status(&e), message)
        }
    }
}

/// One NDJSON line.
fn ndjson_line(value: &impl Serialize) -> Bytes {
    let mut line = serde_json::to_vec(value).expect("API shapes always serialize");
    line.push(b'\n');
    Bytes::from(line)
}

/// What the reader thread hands the query handler.
#[derive(Debug)]
enum QueryChunk {
    /// The statement failed before anything was sent: answer with an error status.
    Failed(StoreError),
    /// Lines, more to come.
    More(Bytes),
    /// The last lines (eoq or an error line).
    Last(Bytes),
}

/// A query answer's lines are gathered into chunks of about this size...
const QUERY_CHUNK_BYTES: usize = 16 * 1024;
/// ...or sent when the oldest waiting line is this old, so a slow query's rows still flow.
const QUERY_CHUNK_DELAY: Duration = Duration::from_millis(20);
/// Chunks in flight between the reader thread and the connection.
const QUERY_CHUNKS_QUEUED: usize = 4;

/// Gathers NDJSON lines on the reader thread and hands them over in chunks, so a short answer
/// leaves in one write and a long one in few, never a write per row.
struct ChunkWriter {
    tx: tokio::sync::mpsc::Sender<QueryChunk>,
    buffer: Vec<u8>,
    since: Option<Instant>,
    sent: bool,
    /// A chunk was dropped (the client left, or did not read until the deadline): nothing
    /// more may be sent, least of all an eoq after missing rows.
    gave_up: bool,
    deadline: Instant,
}

impl ChunkWriter {
    fn line(&mut self, event: &QueryEvent) {
        serde_json::to_writer(&mut self.buffer, event).expect("API shapes always serialize");
        self.buffer.push(b'\n');
        self.since.get_or_insert_with(Instant::now);
    }

    /// Sends the buffer if it is big or old enough; false when the client is gone or the
    /// deadline passed while it was not reading.
    fn maybe_flush(&mut self) -> bool {
        let due = self.buffer.len() >= QUERY_CHUNK_BYTES
            || self.since.is_some_and(|t| t.elapsed() >= QUERY_CHUNK_DELAY);
        !due || self.send(false)
    }

    fn send(&mut self, last: bool) -> bool {
        if self.gave_up {
            return false;
        }
        let bytes = Bytes::from(std::mem::take(&mut self.buffer));
        self.since = None;
        self.sent = true;
        let mut chunk = if last {
            QueryChunk::Last(bytes)
        } else {
            QueryChunk::More(bytes)
        };
        // Never block the reader on a client that does not read: poll, bounded by the
        // deadline, and give the connection back when it passes.
        loop {
            match self.tx.try_send(chunk) {
                Ok(()) => return true,
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                    self.gave_up = true;
                    return false;
                }
                Err(tokio::sync::mpsc::error::TrySendError::Full(c)) => {
                    if Instant::now() >= self.deadline {
                        self.gave_up = true;
                        return false;
                    }
                    chunk = c;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
}

/// Runs a query on a reader thread, streaming its lines through `tx`.
fn run_query(
    reader: &crate::store::Reader,
    statement: &Statement,
    start: Instant,
    deadline: Instant,
    tx: tokio::sync::mpsc::Sender<QueryChunk>,
) {
    let left = tx.clone();
    let out = std::cell::RefCell::new(ChunkWriter {
        tx,
        buffer: Vec::with_capacity(4096),
        since: None,
        sent: false,
        gave_up: false,
        deadline,
    });
    let mut row_id = 0u64;
    let result = reader.query_each(
        statement,
        Some(deadline),
        Some(Box::new(move || left.is_closed())),
        |columns| {
            out.borrow_mut()
                .line(&QueryEvent::Columns(columns.to_vec()))
        },
        |row| {
            row_id += 1;
            let mut out = out.borrow_mut();
            out.line(&QueryEvent::Row(
                row_id,
                row.into_iter().map(SqlValue::from).collect(),
            ));
            out.maybe_flush()
        },
    );
    let mut out = out.into_inner();
    match result {
        Err(e) if !out.sent => {
            // Nothing sent yet, so the queue has room: this never waits.
            let _ = out.tx.try_send(QueryChunk::Failed(e));
        }
        // Rows were lost: the answer must not end like a complete one (the connection side
        // aborts a body that ends without its last chunk).
        _ if out.gave_up => {}
        Err(e) => {
            out.line(&QueryEvent::Error(e.to_string()));
            out.send(true);
        }
        Ok(()) => {
            out.line(&QueryEvent::EndOfQuery {
                time: start.elapsed().as_secs_f64(),
                change_id: None,
            });
            out.send(true);
        }
    }
}

fn ndjson_response(body: Body) -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(body)
        .expect("static headers are valid")
}

async fn queries(
    State(state): State<Arc<ApiState>>,
    Query(param): Query<TimeoutParam>,
    body: Bytes,
) -> Response {
    let start = Instant::now();
    let deadline = state.deadline(&param, start);
    let statement = match parse_statement(&body) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<QueryChunk>(QUERY_CHUNKS_QUEUED);
    let readers = state.readers.clone();
    // The query runs on its own task: if this handler is dropped (the client left), the
    // channel closes and the statement is stopped at its next progress check.
    let task = tokio::spawn(async move {
        readers
            .with_reader(deadline, move |reader| {
                run_query(reader, &statement, start, deadline, tx)
            })
            .await
    });
    match rx.recv().await {
        Some(QueryChunk::Failed(e)) => error(store_status(&e), e),
        // The whole answer in one body: one write with the head.
        Some(QueryChunk::Last(bytes)) => ndjson_response(Body::from(bytes)),
        Some(QueryChunk::More(first)) => {
            // Forwarded until the last chunk; a body that ends without it ends with an error,
            // so the client sees a broken answer (HTTP/1.1: no final chunk; HTTP/2: a reset
            // stream), never a short one that looks complete.
            let (body_tx, body_rx) = tokio::sync::mpsc::channel(QUERY_CHUNKS_QUEUED);
            tokio::spawn(async move {
                let mut next = Some(first);
                while let Some(bytes) = next.take() {
                    if body_tx.send(Ok(bytes)).await.is_err() {
                        return;
                    }
                    // The client leaving closes the body: drop `rx` at once, so the query
                    // stops at its next progress check instead of at its deadline.
                    let chunk = tokio::select! {
                        _ = body_tx.closed() => return,
                        chunk = rx.recv() => chunk,
                    };
                    match chunk {
                        Some(QueryChunk::More(b)) => next = Some(b),
                        Some(QueryChunk::Last(b)) => {
                            let _ = body_tx.send(Ok(b)).await;
                            return;
                        }
                        Some(QueryChunk::Failed(_)) | None => break,
                    }
                }
                let _ = body_tx
                    .send(Err(std::io::Error::other("the query stopped mid-answer")))
                    .await;
            });
            ndjson_response(Body::from_stream(
                tokio_stream::wrappers::ReceiverStream::new(body_rx),
            ))
        }
        None => match task.await {
            Ok(Err(e)) => error(store_status(&e), e),
            _ => error(StatusCode::INTERNAL_SERVER_ERROR, "query failed"),
        },
    }
}

#[derive(Debug, Deserialize)]
struct HealthParams {
    gaps: Option<u64>,
    p99_lag: Option<f64>,
    queue_size: Option<usize>,
    failure_status: Option<u16>,
}

/// How long health waits for the store thread before it calls the store stuck.
const HEALTH_STORE_WAIT: Duration = Duration::from_secs(1);

async fn health(
    State(state): State<Arc<ApiState>>,
    Query(params): Query<HealthParams>,
) -> Response {
    // Health needs no token and skips the in-flight limit, so it has a small limit of its own:
    // a flood of health checks must not fill the store queue that writes need.
    let Ok(_health_slot) = state.health_slots.clone().try_acquire_owned() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("more than {HEALTH_CHECKS_MAX} health checks in flight"),
        );
    };
    let status = match tokio::time::timeout(HEALTH_STORE_WAIT, state.store.status_if_room()).await {
        Ok(Some(status)) => status,
        Ok(None) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the store queue is full or the store is gone",
            )
        }
        Err(_) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the store did not answer within {HEALTH_STORE_WAIT:?} ({} requests queued)",
                    state.store.queue_len()
                ),
            )
        }
    };
    let queue_size = state.store.queue_len();
    // From the commit times broadcast changesets carry (0 on a node that has applied none
    // in the last five minutes).
    let p99_lag = state.metrics.p99_lag();
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
    let members = state.gossip.borrow().members.len() as u64 + 1;
    (
        code,
        axum::Json(HealthResponse::Response {
            gaps: status.gaps,
            members,
            p99_lag,
            queue_size: queue_size as u64,
        }),
    )
        .into_response()
}

async fn table_stats(State(state): State<Arc<ApiState>>, body: Bytes) -> Response {
    let start = Instant::now();
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
    let (valid, invalid_tables): (Vec<String>, Vec<String>) = request
        .tables
        .into_iter()
        .partition(|t| status.tables.contains(t));
    let deadline = state.deadline(&TimeoutParam { timeout: None }, start);
    let counted = state
        .readers
        .with_reader(deadline, move |reader| {
            valid
                .iter()
                .map(|t| reader.count_rows(t, deadline))
                .sum::<Result<u64, _>>()
        })
        .await;
    match counted {
        Ok(Ok(total_row_count)) => axum::Json(TableStatsResponse {
            total_row_count,
            invalid_tables,
        })
        .into_response(),
        Ok(Err(e)) | Err(e) => error(store_status(&e), e),
    }
}

/// A long-lived NDJSON answer fed by a task; it holds a stream slot until it ends.
fn stream_body(
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    slot: tokio::sync::OwnedSemaphorePermit,
) -> Body {
    let lines = tokio_stream::wrappers::ReceiverStream::new(rx).map(move |line| {
        let _ = &slot;
        Ok::<_, std::io::Error>(line)
    });
    Body::from_stream(lines)
}

/// `POST /v1/updates/{table}`: one NDJSON line per row of `table` changed by any later commit,
/// local or remote: `{"notify":["update"|"delete",[pk values]]}`. A consumer too slow to keep
/// up gets an error line and the stream ends (it can reconnect and re-read the table). The
/// answer carries a `corro-query-id` header, as Corrosion's client requires.
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
    let slot = match state.stream_slot() {
        Ok(slot) => slot,
        Err(e) => return e.into_response(),
    };
    let mut changes = state.row_changes.subscribe();
    let mut shutdown = state.shutdown.clone();
    let metrics = state.metrics.clone();
    let (lines, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
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
                    metrics.cutoff("updates");
                    let _ = lines.try_send(ndjson_line(&NotifyEvent::Error(format!(
                        "consumer too slow: {n} commits skipped"
                    ))));
                    return;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            for row in batch.iter().filter(|r| r.table == table) {
                let kind = if row.deleted {
                    ChangeType::Delete
                } else {
                    ChangeType::Update
                };
                let pk = row.pk.values().iter().map(SqlValue::from).collect();
                if lines
                    .try_send(ndjson_line(&NotifyEvent::Notify(kind, pk)))
                    .is_err()
                {
                    // The client does not read: cut it off rather than buffer without bound.
                    metrics.cutoff("updates");
                    let _ = lines
                        .try_send(ndjson_line(&NotifyEvent::Error("consumer too slow".into())));
                    return;
                }
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .header("corro-query-id", crate::subs::random_uuid())
        .body(stream_body(rx, slot))
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
    let statement = match parse_statement(&body) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    if !matches!(statement.params, Params::None) {
        return error(
            StatusCode::BAD_REQUEST,
            "parameters are not supported in subscriptions: write the values into the SQL",
        );
    }
    let slot = match state.stream_slot() {
        Ok(slot) => slot,
        Err(e) => return e.into_response(),
    };
    let attached = state
        .subs
        .subscribe(statement.sql, params.skip_rows, params.from)
        .await;
    subscription_stream(&state, attached, slot)
}

/// `GET /v1/subscriptions/{id}`: re-attach to a subscription (`from` to resume).
async fn resubscribe(
    State(state): State<Arc<ApiState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    Query(params): Query<SubscriptionParams>,
) -> Response {
    let slot = match state.stream_slot() {
        Ok(slot) => slot,
        Err(e) => return e.into_response(),
    };
    let attached = state.subs.attach(id, params.skip_rows, params.from).await;
    subscription_stream(&state, attached, slot)
}

/// `DELETE /v1/subscriptions/{id}`: removes a subscription; its subscribers' streams end.
async fn unsubscribe(
    State(state): State<Arc<ApiState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    match state.subs.remove(id.clone()).await {
        Ok(()) => axum::Json(json!({ "deleted": id })).into_response(),
        Err(e @ SubsError::Unknown(_)) => error(StatusCode::NOT_FOUND, e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

fn change_line(event: &ChangeEvent) -> Bytes {
    ndjson_line(&QueryEvent::Change(
        event.kind,
        event.row_id,
        event.values.iter().map(SqlValue::from).collect(),
        event.change_id,
    ))
}

fn subscription_stream(
    state: &ApiState,
    attached: Result<Attached, SubsError>,
    slot: tokio::sync::OwnedSemaphorePermit,
) -> Response {
    let mut attached = match attached {
        Ok(a) => a,
        Err(e @ (SubsError::BadQuery(_) | SubsError::TooCostly(_))) => {
            return error(StatusCode::BAD_REQUEST, e)
        }
        Err(e @ SubsError::Unknown(_)) => return error(StatusCode::NOT_FOUND, e),
        Err(e @ SubsError::TooMany(_)) => return error(StatusCode::SERVICE_UNAVAILABLE, e),
        Err(e @ SubsError::Resume(_)) => {
            // An error event, never a silent gap: the stream says why and ends.
            return ndjson_response(Body::from(ndjson_line(&QueryEvent::Error(e.to_string()))));
        }
        Err(e @ SubsError::Internal(_)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let start = Instant::now();
    // Everything known now leaves as one chunk: columns, rows and eoq, or the replayed changes.
    let mut head = Vec::new();
    let mut push = |event: &QueryEvent| {
        serde_json::to_writer(&mut head, event).expect("API shapes always serialize");
        head.push(b'\n');
    };
    // A resumed stream carries changes only, as Corrosion's client expects when it re-attaches
    // by itself after a cut (it would hand a second columns line to the application).
    if !attached.resumed {
        push(&QueryEvent::Columns(attached.columns.clone()));
    }
    for (row_id, values) in attached.rows.take().unwrap_or_default() {
        push(&QueryEvent::Row(
            row_id,
            values.into_iter().map(SqlValue::from).collect(),
        ));
    }
    if !attached.resumed {
        push(&QueryEvent::EndOfQuery {
            time: start.elapsed().as_secs_f64(),
            change_id: Some(attached.change_id),
        });
    }
    for event in &attached.replay {
        push(&QueryEvent::Change(
            event.kind,
            event.row_id,
            event.values.iter().map(SqlValue::from).collect(),
            event.change_id,
        ));
    }
    let (lines, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    let mut shutdown = state.shutdown.clone();
    let mut last = attached.change_id;
    let mut live = attached.live;
    let metrics = state.metrics.clone();
    tokio::spawn(async move {
        if lines.send(Bytes::from(head)).await.is_err() {
            return;
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
                    metrics.cutoff("subscription");
                    let _ = lines
                        .send(ndjson_line(&QueryEvent::Error(format!(
                            "subscriber too slow: {n} changes dropped; resume with from={last}"
                        ))))
                        .await;
                    return;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    let _ = lines
                        .send(ndjson_line(&QueryEvent::Error(
                            "the subscription was removed (deleted, unused for its idle \
                             timeout, or too costly to keep); subscribe again"
                                .into(),
                        )))
                        .await;
                    return;
                }
            };
            if event.change_id <= last {
                continue;
            }
            last = event.change_id;
            if lines.try_send(change_line(&event)).is_err() {
                // The client does not read: cut it off rather than buffer without bound.
                metrics.cutoff("subscription");
                let _ = lines.try_send(ndjson_line(&QueryEvent::Error(format!(
                    "subscriber too slow; resume with from={}",
                    last - 1
                ))));
                return;
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .header("corro-query-id", attached.id)
        .header("corro-query-hash", attached.hash)
        .body(stream_body(rx, slot))
        .expect("static headers are valid")
}

/// `GET /v1/sync/digest`: row counts and hashes per table and a hash of all clocks; equal on
/// converged nodes.
async fn digest(State(state): State<Arc<ApiState>>) -> Response {
    match state.store.digest().await {
        Some(Ok(d)) => axum::Json(DigestResponse {
            tables: d
                .tables
                .iter()
                .map(|(t, (rows, hash))| {
                    let digest = TableDigest {
                        rows: *rows,
                        hash: format!("{hash:016x}"),
                    };
                    (t.clone(), digest)
                })
                .collect(),
            clocks: format!("{:016x}", d.clocks),
        })
        .into_response(),
        Some(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        None => error(StatusCode::SERVICE_UNAVAILABLE, "store unavailable"),
    }
}

/// `GET /v1/sync/state`: per site, the head this node heard of and the versions it still needs.
async fn sync_state(State(state): State<Arc<ApiState>>) -> Response {
    let Some(sync) = state.store.sync_state().await else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "store unavailable");
    };
    axum::Json(SyncStateResponse {
        actor_id: state.site.to_hex(),
        sites: sync
            .sites
            .into_iter()
            .map(|(site, (head, needs))| {
                let site_state = SiteSyncState {
                    head: head.get(),
                    needs,
                };
                (site.to_hex(), site_state)
            })
            .collect(),
    })
    .into_response()
}

/// An online backup on a read connection of its own (see [`crate::store::backup`]): writes go
/// on meanwhile.
async fn backup(
    State(state): State<Arc<AdminState>>,
    axum::Json(request): axum::Json<crate::http::types::BackupRequest>,
) -> Response {
    let to = std::path::PathBuf::from(&request.path);
    if !to.is_absolute() {
        return error(
            StatusCode::BAD_REQUEST,
            "the backup path must be absolute (it is a path on the node's host)",
        );
    }
    let db = state.db_path.clone();
    let done = tokio::task::spawn_blocking(move || crate::store::backup::backup(&db, &to)).await;
    match done {
        Ok(Ok(report)) => {
            tracing::info!(
                "backup of {} bytes written to {} in {:.3} s",
                report.bytes,
                report.path.display(),
                report.elapsed.as_secs_f64()
            );
            axum::Json(crate::http::types::BackupResponse {
                path: report.path.display().to_string(),
                bytes: report.bytes,
                site_id: report.site.to_hex(),
                seconds: report.elapsed.as_secs_f64(),
            })
            .into_response()
        }
        Ok(Err(e)) => error(store_status(&e), e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

fn log_answer(result: Result<String, crate::logging::LogError>) -> Response {
    match result {
        Ok(filter) => axum::Json(crate::http::types::LogFilter { filter }).into_response(),
        Err(e @ crate::logging::LogError::BadFilter(_)) => error(StatusCode::BAD_REQUEST, e),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

async fn log_show() -> Response {
    log_answer(crate::logging::current().ok_or(crate::logging::LogError::NoControl))
}

async fn log_set(axum::Json(request): axum::Json<crate::http::types::LogFilter>) -> Response {
    log_answer(crate::logging::set(&request.filter))
}

async fn log_reset() -> Response {
    log_answer(crate::logging::reset())
}

async fn reload(State(state): State<Arc<AdminState>>) -> Response {
    match state.store.reload().await {
        Ok(()) => axum::Json(json!({ "reloaded": true })).into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}
