//! Measuring a cluster of real nodes through their HTTP APIs only, as an application sees it:
//! every node streams `/v1/updates/<table>` to loadgen, loadgen writes one row at a time on
//! random nodes at a set rate, and a write has reached a node when that node's stream names
//! the row. Every time is read on loadgen's own clock, from just before the write request.
//!
//! The nodes need a replicated table with a text primary key (by default
//! `CREATE TABLE loadgen (id TEXT NOT NULL PRIMARY KEY, at INTEGER NOT NULL DEFAULT 0);`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use patina::http::client::{request, request_stream, Method, StatusCode, Target};
use patina::http::types::{ApiStatement, HealthResponse, NotifyEvent, SqlParam, SqlValue};

use crate::{bar, Report};

/// The table loadgen writes to unless told otherwise, and its schema.
pub const TABLE: &str = "loadgen";
/// [`TABLE`]'s schema, for nodes loadgen configures itself.
pub const SCHEMA: &str =
    "CREATE TABLE loadgen (id TEXT NOT NULL PRIMARY KEY, at INTEGER NOT NULL DEFAULT 0);";

/// A measurement over nodes' APIs.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// Writes to make, each on a random node.
    pub writes: usize,
    /// Writes per second.
    pub rate: f64,
    /// Seed of the writers' choice.
    pub seed: u64,
    /// Give up on a write this long after the last one.
    pub settle: Duration,
    /// The table written to (a text primary key named `id`).
    pub table: String,
    /// Bearer token of the APIs.
    pub token: Option<String>,
    /// Longest wait for every node to see every other before the writes.
    pub formation_timeout: Duration,
    /// Show progress bars.
    pub progress: bool,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            writes: 20,
            rate: 10.0,
            seed: 1,
            settle: Duration::from_secs(30),
            table: TABLE.into(),
            token: None,
            formation_timeout: Duration::from_secs(60),
            progress: false,
        }
    }
}

/// (members, p99 replication lag in seconds) from a node's health.
async fn health(api: SocketAddr, token: Option<&str>) -> Option<(u64, f64)> {
    let target = Target::Tcp(api);
    let call = request(&target, Method::GET, "/v1/health", token, Vec::new());
    let (_, body) = tokio::time::timeout(Duration::from_secs(2), call)
        .await
        .ok()?
        .ok()?;
    match serde_json::from_slice(&body).ok()? {
        HealthResponse::Response {
            members, p99_lag, ..
        } => Some((members, p99_lag)),
        HealthResponse::Error(_) => None,
    }
}

/// Waits until every node's health counts every node (or `timeout`); returns how many did and
/// when the last one did.
pub async fn wait_formation(
    apis: &[SocketAddr],
    token: Option<&str>,
    timeout: Duration,
    progress: bool,
) -> (usize, Option<Instant>) {
    let n = apis.len() as u64;
    let settling = bar(progress, apis.len(), "membership");
    let deadline = Instant::now() + timeout;
    loop {
        let mut settled = 0;
        for api in apis {
            if health(*api, token).await.map(|(members, _)| members) == Some(n) {
                settled += 1;
            }
        }
        settling.set_position(settled as u64);
        if settled == apis.len() {
            settling.finish_and_clear();
            return (settled, Some(Instant::now()));
        }
        if Instant::now() >= deadline {
            settling.finish_and_clear();
            return (settled, None);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// When each write reached each node, by the write's row id.
type Arrivals = Arc<Mutex<HashMap<String, Vec<Option<Instant>>>>>;

/// Follows one node's `/v1/updates/<table>` stream and records the rows it names; returns
/// why the stream ended, if it ended before the run did (the node cut a reader that fell
/// behind, or went away): that node's later deliveries are unknown, not lost.
async fn follow(
    i: usize,
    api: SocketAddr,
    options: RemoteOptions,
    arrivals: Arrivals,
    ready: tokio::sync::oneshot::Sender<Result<(), String>>,
) -> Option<String> {
    let path = format!("/v1/updates/{}", options.table);
    let answer = request_stream(
        &Target::Tcp(api),
        Method::POST,
        &path,
        options.token.as_deref(),
        Vec::new(),
    )
    .await;
    let mut body = match answer {
        Ok((StatusCode::OK, body)) => {
            let _ = ready.send(Ok(()));
            body
        }
        Ok((status, _)) => {
            let _ = ready.send(Err(format!("{api}: {path} answered {status}")));
            return None;
        }
        Err(e) => {
            let _ = ready.send(Err(format!("{api}: {e}")));
            return None;
        }
    };
    let mut buffer: Vec<u8> = Vec::new();
    while let Some(chunk) = body.recv().await {
        let at = Instant::now();
        buffer.extend_from_slice(&chunk);
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            let pk = match serde_json::from_slice(&line) {
                Ok(NotifyEvent::Notify(_, pk)) => pk,
                Ok(NotifyEvent::Error(e)) => return Some(format!("node {i} ({api}): {e}")),
                Err(_) => continue,
            };
            let Some(SqlValue::Text(id)) = pk.into_iter().next() else {
                continue;
            };
            let mut map = arrivals.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(slot) = map.get_mut(&id) {
                slot[i].get_or_insert(at);
            }
        }
    }
    Some(format!("node {i} ({api}): its stream ended"))
}

/// Measures the nodes whose APIs are `apis`; the report's mode is `mode`.
pub async fn run_remote(apis: &[SocketAddr], options: &RemoteOptions, mode: &str) -> Report {
    let started = Instant::now();
    let n = apis.len();
    let arrivals: Arrivals = Arc::new(Mutex::new(HashMap::new()));
    let mut followers = Vec::new();
    for (i, api) in apis.iter().enumerate() {
        let (ready, is_ready) = tokio::sync::oneshot::channel();
        followers.push(tokio::spawn(follow(
            i,
            *api,
            options.clone(),
            arrivals.clone(),
            ready,
        )));
        match is_ready.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("following node {i}: {e}"),
            Err(_) => panic!("following node {i}: the task ended"),
        }
    }
    // Row ids unique to this run, so runs on one fleet never mistake each other's writes.
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    let mut rng = patina_core::stats::SplitMix64::new(options.seed);
    let writing = bar(options.progress, options.writes, "writing");
    let interval = Duration::from_secs_f64(1.0 / options.rate.max(0.001));
    let write_phase = Instant::now();
    let mut writes: Vec<(String, Instant)> = Vec::with_capacity(options.writes);
    let sql = format!("INSERT INTO {} (id) VALUES (?)", options.table);
    for w in 0..options.writes {
        tokio::time::sleep_until((write_phase + interval * w as u32).into()).await;
        let writer = rng.below(n as u64) as usize;
        let id = format!("lg-{run}-{}-{w}", options.seed);
        arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), vec![None; n]);
        let body = serde_json::to_vec(&[ApiStatement::WithParams(
            sql.clone(),
            vec![SqlParam::Text(id.clone())],
        )])
        .expect("JSON");
        let sent = Instant::now();
        let (status, out) = request(
            &Target::Tcp(apis[writer]),
            Method::POST,
            "/v1/transactions",
            options.token.as_deref(),
            body,
        )
        .await
        .unwrap_or_else(|e| panic!("writing on node {writer}: {e}"));
        assert_eq!(
            status,
            StatusCode::OK,
            "writing on node {writer}: {}",
            String::from_utf8_lossy(&out)
        );
        writes.push((id, sent));
        writing.inc(1);
    }
    writing.finish_and_clear();
    crate::wait_until_spread(options.progress, options.writes * n, options.settle, || {
        let map = arrivals.lock().unwrap_or_else(|e| e.into_inner());
        map.values().map(|v| v.iter().flatten().count()).sum()
    })
    .await;
    let mut streams_lost = Vec::new();
    for follower in followers {
        if follower.is_finished() {
            if let Ok(Some(why)) = follower.await {
                streams_lost.push(why);
            }
        } else {
            follower.abort();
        }
    }
    // What the nodes measured themselves: their p99 lag from the writers' commit times.
    let mut node_lags = Vec::new();
    for api in apis {
        if let Some((_, lag)) = health(*api, options.token.as_deref()).await {
            node_lags.push(lag * 1e3);
        }
    }
    let map = arrivals.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut report = Report {
        mode: mode.into(),
        nodes: n,
        node_p99_lag_ms: node_lags.iter().copied().reduce(f64::max),
        streams_lost,
        ..Report::default()
    };
    for (id, sent) in &writes {
        report.record_write(*sent, &map[id]);
    }
    report.delivery_ms.sort_by(f64::total_cmp);
    report.wall_s = started.elapsed().as_secs_f64();
    report
}
