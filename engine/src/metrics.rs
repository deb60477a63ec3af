//! Prometheus metrics of one node, served on their own address (`[telemetry]
//! prometheus_addr`) in the OpenMetrics text format.
//!
//! Built on `prometheus-client`, the Prometheus project's Rust client: a registry is a value,
//! not process-global state, so every agent in a process (loadgen runs hundreds, the tests
//! several) keeps and serves its own figures. Latencies are histograms observed where they
//! happen ([`NodeMetrics`]); counters the store thread and the gossip task already keep are
//! read at scrape time (the agent's collector, handed to [`router`]), as are process figures from
//! `/proc/self`.
//!
//! The names are documented in the README (Metrics).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// Counters kept by the store thread.
#[derive(Debug, Default)]
pub struct StoreMetrics {
    /// Local transactions that changed something.
    pub committed_changesets: AtomicU64,
    /// Changes in them.
    pub committed_changes: AtomicU64,
    /// Remote changesets merged.
    pub applied_changesets: AtomicU64,
    /// Remote changes that won the merge.
    pub applied_changes_won: AtomicU64,
    /// Remote changesets refused.
    pub apply_rejected: AtomicU64,
    /// Batches of remote changesets whose transaction failed (a full disk, I/O).
    pub apply_failed: AtomicU64,
    /// Parts of large remote changesets kept until the rest arrive.
    pub parts_buffered: AtomicU64,
    /// Remote batches applied.
    pub apply_batches: AtomicU64,
    /// How long the last remote batch waited for the store (µs).
    pub apply_lag_us_last: AtomicU64,
    /// Versions of other sites heard of but not applied.
    pub gaps: AtomicU64,
    /// Remote batches with a changeset that arrived with versions of its site missing before
    /// it (the rule of `core::node::Node`: a version past the site's head plus one).
    pub gaps_opened: AtomicU64,
    /// Replicated tables whose older rows still lack clocks (an owed backfill that failed).
    pub unreplicated_tables: AtomicU64,
}

/// Labels as (name, value) pairs.
pub type Labels = Vec<(&'static str, String)>;

type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// Buckets from 50 µs to about 100 s, doubling: API calls, store waits and applies live
/// between tens of microseconds and seconds.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 22))
}

/// Replication lag buckets, 1 ms to about 4 minutes.
fn lag_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 18))
}

/// The histograms and event counters of one node, observed where things happen. Cheap to
/// clone handles out of; every handle is shared.
#[derive(Debug)]
pub struct NodeMetrics {
    /// Store counters (read at scrape time).
    pub store: Arc<StoreMetrics>,
    /// `patina_api_request_duration_seconds{route, method, status}`: request to answer head.
    pub api_request_seconds: HistogramFamily,
    /// `patina_store_queue_wait_seconds{kind}`: time a request waited for the store thread
    /// (`transaction` or `apply`).
    pub store_queue_wait_seconds: HistogramFamily,
    /// Its two series, looked up once: observed for every local transaction and every remote
    /// batch, where a lookup built its label set (a vector and a string) each time.
    store_queue_wait_by_kind: [(&'static str, Histogram); 2],
    /// `patina_apply_batch_duration_seconds`: one batch of remote changesets merged.
    pub apply_batch_seconds: Histogram,
    /// `patina_sync_session_duration_seconds{result}`: one anti-entropy pull.
    pub sync_session_seconds: HistogramFamily,
    /// `patina_replication_lag_seconds`: origin's commit (its wall clock) to applied here.
    pub replication_lag_seconds: Histogram,
    /// `patina_subscriber_cutoffs_total{stream}`: streams ended because their reader fell behind.
    pub subscriber_cutoffs: Family<Labels, Counter>,
    /// Recent replication lags (when observed, seconds), for the health's p99.
    recent_lags: std::sync::Mutex<std::collections::VecDeque<(std::time::Instant, f64)>>,
    registry: std::sync::Mutex<Option<Registry>>,
}

/// Lags kept for the health's p99: at most this many...
const RECENT_LAGS_MAX: usize = 4096;
/// ...and none older than this.
const RECENT_LAGS_AGE: std::time::Duration = std::time::Duration::from_secs(300);

/// This host's wall clock as a changeset's commit time.
pub fn commit_time_now() -> patina_core::change::CommitTime {
    patina_core::change::CommitTime(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_millis().max(1) as u64),
    )
}

impl NodeMetrics {
    /// Fresh metrics around the store's counters.
    pub fn new(store: Arc<StoreMetrics>) -> NodeMetrics {
        let store_queue_wait_seconds: HistogramFamily =
            Family::new_with_constructor(latency_histogram);
        let series = |kind: &'static str| {
            let histogram = store_queue_wait_seconds
                .get_or_create(&vec![("kind", kind.to_string())])
                .clone();
            (kind, histogram)
        };
        let store_queue_wait_by_kind = [series("transaction"), series("apply")];
        NodeMetrics {
            store,
            api_request_seconds: Family::new_with_constructor(latency_histogram),
            store_queue_wait_seconds,
            store_queue_wait_by_kind,
            apply_batch_seconds: latency_histogram(),
            sync_session_seconds: Family::new_with_constructor(latency_histogram),
            replication_lag_seconds: lag_histogram(),
            subscriber_cutoffs: Family::default(),
            recent_lags: std::sync::Mutex::new(std::collections::VecDeque::new()),
            registry: std::sync::Mutex::new(None),
        }
    }

    /// Observes how long a request waited for the store thread.
    pub fn queue_wait(&self, kind: &'static str, waited: std::time::Duration) {
        match self
            .store_queue_wait_by_kind
            .iter()
            .find(|(k, _)| *k == kind)
        {
            Some((_, histogram)) => histogram.observe(waited.as_secs_f64()),
            None => self
                .store_queue_wait_seconds
                .get_or_create(&vec![("kind", kind.to_string())])
                .observe(waited.as_secs_f64()),
        }
    }

    /// Records the lag of a remote changeset applied now, when its commit time is known. A
    /// clock behind the author's gives a negative figure: counted as 0.
    pub fn replicated(&self, committed_at: patina_core::change::CommitTime) {
        if !committed_at.is_known() {
            return;
        }
        let lag = (commit_time_now().0.saturating_sub(committed_at.0)) as f64 / 1000.0;
        self.replication_lag_seconds.observe(lag);
        let now = std::time::Instant::now();
        let mut recent = self.recent_lags.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() >= RECENT_LAGS_MAX {
            recent.pop_front();
        }
        recent.push_back((now, lag));
    }

    /// The 99th percentile of the replication lags of the last five minutes (at most the last
    /// 4,096), seconds; 0 when none was observed.
    pub fn p99_lag(&self) -> f64 {
        let now = std::time::Instant::now();
        let mut recent = self.recent_lags.lock().unwrap_or_else(|e| e.into_inner());
        while recent
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > RECENT_LAGS_AGE)
        {
            recent.pop_front();
        }
        let mut lags: Vec<f64> = recent.iter().map(|(_, lag)| *lag).collect();
        drop(recent);
        if lags.is_empty() {
            return 0.0;
        }
        lags.sort_by(f64::total_cmp);
        patina_core::stats::percentile(&lags, 0.99).unwrap_or(0.0)
    }

    /// Counts a stream cut off because its reader fell behind.
    pub fn cutoff(&self, stream: &'static str) {
        self.subscriber_cutoffs
            .get_or_create(&vec![("stream", stream.to_string())])
            .inc();
    }

    /// Builds the registry that serves these metrics with the scrape-time counters.
    fn install(&self, counters: Box<dyn Collector>) {
        let mut registry = Registry::default();
        registry.register(
            "patina_api_request_duration_seconds",
            "HTTP API requests, from arrival to the answer's head, by route, method and status",
            self.api_request_seconds.clone(),
        );
        registry.register(
            "patina_store_queue_wait_seconds",
            "Time a request waited for the store thread, by kind (transaction, apply)",
            self.store_queue_wait_seconds.clone(),
        );
        registry.register(
            "patina_apply_batch_duration_seconds",
            "Time to merge one batch of remote changesets",
            self.apply_batch_seconds.clone(),
        );
        registry.register(
            "patina_sync_session_duration_seconds",
            "Anti-entropy pulls from one peer, by result (ok, failed)",
            self.sync_session_seconds.clone(),
        );
        registry.register(
            "patina_replication_lag_seconds",
            "Origin's commit (its wall clock) to applied here, per remote changeset",
            self.replication_lag_seconds.clone(),
        );
        registry.register(
            "patina_subscriber_cutoffs",
            "Streams ended because their reader fell behind, by stream (subscription, updates)",
            self.subscriber_cutoffs.clone(),
        );
        registry.register_collector(counters);
        registry.register_collector(Box::new(ProcessCollector));
        *self.registry.lock().unwrap_or_else(|e| e.into_inner()) = Some(registry);
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Some(registry) = self
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            let _ = prometheus_client::encoding::text::encode(&mut out, registry);
        }
        out
    }
}

/// One metric: (name, help, type, samples by label set).
pub(crate) type Sample = (Labels, f64);

pub(crate) fn emit(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: &[Sample],
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    if let [(labels, value)] = samples {
        if labels.is_empty() {
            // No labels: `name value`, not `name{} value`.
            return match kind {
                MetricType::Counter if value.fract() != 0.0 => {
                    ConstCounter::new(*value).encode(metric)
                }
                MetricType::Counter => ConstCounter::new(*value as u64).encode(metric),
                _ => ConstGauge::new(*value).encode(metric),
            };
        }
    }
    for (labels, value) in samples {
        let family = metric.encode_family(labels)?;
        match kind {
            MetricType::Counter if value.fract() != 0.0 => {
                ConstCounter::new(*value).encode(family)?
            }
            MetricType::Counter => ConstCounter::new(*value as u64).encode(family)?,
            _ => ConstGauge::new(*value).encode(family)?,
        }
    }
    Ok(())
}

pub(crate) fn one(value: f64) -> Vec<Sample> {
    vec![(Vec::new(), value)]
}

pub(crate) fn by(label: &'static str, values: &[(&str, f64)]) -> Vec<Sample> {
    values
        .iter()
        .map(|(v, x)| (vec![(label, v.to_string())], *x))
        .collect()
}

/// Resident memory, CPU time, open files and threads of this process, from /proc/self.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |name: &str| -> Option<f64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        };
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
        let e = &mut encoder;
        if let Some(kib) = field("VmRSS:") {
            emit(
                e,
                "process_resident_memory_bytes",
                "Resident memory",
                MetricType::Gauge,
                &one(kib * 1024.0),
            )?;
        }
        if let (Some(user), Some(system)) = (ticks(11), ticks(12)) {
            // USER_HZ: Linux fixes it at 100 for /proc.
            emit(
                e,
                "process_cpu_seconds",
                "User and system CPU time",
                MetricType::Counter,
                &one((user + system) / 100.0),
            )?;
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            emit(
                e,
                "process_open_fds",
                "Open file descriptors",
                MetricType::Gauge,
                &one(dir.count() as f64),
            )?;
        }
        if let Some(threads) = field("Threads:") {
            emit(
                e,
                "process_threads",
                "Threads",
                MetricType::Gauge,
                &one(threads),
            )?;
        }
        Ok(())
    }
}

/// The `/metrics` route over `metrics`, with `counters`: the figures other parts keep, read at
/// scrape time.
pub fn router(metrics: Arc<NodeMetrics>, counters: impl Collector + 'static) -> Router {
    metrics.install(Box::new(counters));
    Router::new()
        .route("/metrics", get(serve_metrics))
        .with_state(metrics)
}

async fn serve_metrics(State(metrics): State<Arc<NodeMetrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.render(),
    )
}
