//! The HTTP API, compatible with Corrosion's v1: `/v1/transactions`, `/v1/queries`,
//! `/v1/health`, `/v1/table_stats`, `/v1/updates/{table}`, `/v1/subscriptions`; an optional
//! bearer token; a limit on requests in flight (503 past it; health is exempt, and a stream
//! gives its slot back once it has started and counts against `streams_max` instead); a body
//! size limit (413 past it). And the admin router served on the local unix socket.
//!
//! Every statement has a deadline (`api.statement_timeout_ms`, or shorter: `?timeout=` seconds),
//! enforced while it runs; a query is also stopped when its client leaves. The request and
//! answer shapes are in [`crate::http::types`].
//!
//! This file holds the shared state, the router, the middleware and the error shapes; each
//! route family has its own file (`transactions`, `queries`, `health`, `subscriptions`, `sync`)
//! and the admin socket's routes are in `admin`.

mod admin;
mod health;
mod queries;
mod subscriptions;
mod sync;
mod transactions;

pub use admin::{admin_router, AdminState};
use health::{health, table_stats};
use queries::queries;
use subscriptions::{resubscribe, subscribe, unsubscribe, updates};
use sync::{digest, sync_state};
use transactions::transactions;

use std::future::Future as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes, HttpBody};
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
    /// A request's body must have arrived whole this long after its head.
    body_timeout: Duration,
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
            body_timeout: Duration::from_millis(config.header_timeout_ms),
            gossip,
            row_changes,
            subs,
            shutdown,
            metrics,
            health_slots: Arc::new(Semaphore::new(HEALTH_CHECKS_MAX)),
        })
    }

    /// The deadline of a request's statements: `?timeout=` may shorten
    /// `api.statement_timeout_ms`, never lengthen it (else any client could hold the writer, or
    /// a reader and with it the WAL's checkpoints, for as long as it asked).
    fn deadline(&self, param: &TimeoutParam, start: Instant) -> Instant {
        let timeout = param
            .timeout
            .filter(|t| t.is_finite() && *t > 0.0)
            .map_or(self.statement_timeout, |t| {
                Duration::from_secs_f64(t.min(self.statement_timeout.as_secs_f64()))
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
    if request.body().is_end_stream() {
        return next.run(request).await;
    }
    let late = Arc::new(AtomicBool::new(false));
    let deadline = Box::pin(tokio::time::sleep(state.body_timeout));
    let request = request.map(|inner| {
        Body::new(DeadlineBody {
            inner,
            deadline,
            late: late.clone(),
        })
    });
    let response = next.run(request).await;
    if late.load(Ordering::Relaxed) {
        return error(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {:?} of its head (api.header_timeout_ms) \
                 plus a second per 64 KiB received",
                state.body_timeout
            ),
        );
    }
    response
}

/// A request body's deadline grows by a second for every this many bytes that arrive: a large
/// body on a slow link still gets in, a trickle does not hold its slot for long.
const BODY_BYTES_PER_SECOND_MIN: f64 = 64.0 * 1024.0;

/// A request body that must arrive whole by a deadline. Without one, a client that sends a
/// head announcing a body and then nothing would hold its in-flight slot (and its
/// connection, which counts as busy) for as long as it keeps the connection open: the
/// handlers' deadlines start once the body is in. Past the deadline the next read fails, the
/// handler's extractor gives up and [`guard`] answers 408.
struct DeadlineBody {
    inner: Body,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    late: Arc<AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
struct BodyLate;

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        if let std::task::Poll::Ready(frame) = std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            if let Some(data) = frame.as_ref().and_then(|f| f.as_ref().ok()?.data_ref()) {
                let more = Duration::from_secs_f64(data.len() as f64 / BODY_BYTES_PER_SECOND_MIN);
                let at = this.deadline.deadline() + more;
                this.deadline.as_mut().reset(at);
            }
            return std::task::Poll::Ready(frame);
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            this.late.store(true, Ordering::Relaxed);
            return std::task::Poll::Ready(Some(Err(axum::Error::new(BodyLate))));
        }
        std::task::Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
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

/// One NDJSON line.
fn ndjson_line(value: &impl Serialize) -> Bytes {
    let mut line = serde_json::to_vec(value).expect("API shapes always serialize");
    line.push(b'\n');
    Bytes::from(line)
}

fn ndjson_response(body: Body) -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(body)
        .expect("static headers are valid")
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
