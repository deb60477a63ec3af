//! Prometheus metrics, served as text on their own address (`[telemetry] prometheus_addr`).
//! Counters come from the store thread ([`StoreMetrics`]) and the gossip task's snapshot.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::sync::watch;

use crate::agent::StoreHandle;
use crate::gossip::GossipSnapshot;

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
}

struct MetricsState {
    store: Arc<StoreMetrics>,
    queue: StoreHandle,
    gossip: watch::Receiver<GossipSnapshot>,
}

/// The `/metrics` route.
pub fn router(
    store: Arc<StoreMetrics>,
    queue: StoreHandle,
    gossip: watch::Receiver<GossipSnapshot>,
) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(Arc::new(MetricsState {
            store,
            queue,
            gossip,
        }))
}

async fn metrics(State(state): State<Arc<MetricsState>>) -> impl IntoResponse {
    let gossip = state.gossip.borrow().clone();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render(&state.store, &gossip, state.queue.queue_len()),
    )
}

/// The exposition text.
pub fn render(store: &StoreMetrics, gossip: &GossipSnapshot, store_queue: usize) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
    let b = gossip.broadcast;
    metric(
        "patina_changesets_committed_total",
        "counter",
        "Local transactions that changed rows.",
        &[("", load(&store.committed_changesets))],
    );
    metric(
        "patina_changes_committed_total",
        "counter",
        "Changes in local transactions.",
        &[("", load(&store.committed_changes))],
    );
    metric(
        "patina_changesets_applied_total",
        "counter",
        "Remote changesets merged.",
        &[("", load(&store.applied_changesets))],
    );
    metric(
        "patina_changes_applied_total",
        "counter",
        "Remote changes that won the merge.",
        &[("", load(&store.applied_changes_won))],
    );
    metric(
        "patina_changesets_rejected_total",
        "counter",
        "Remote changesets refused.",
        &[("", load(&store.apply_rejected))],
    );
    metric(
        "patina_apply_failed_total",
        "counter",
        "Batches of remote changesets whose transaction failed (full disk, I/O).",
        &[("", load(&store.apply_failed))],
    );
    metric(
        "patina_changeset_parts_buffered_total",
        "counter",
        "Parts of large remote changesets kept until the rest arrive.",
        &[("", load(&store.parts_buffered))],
    );
    metric(
        "patina_apply_batches_total",
        "counter",
        "Remote batches applied.",
        &[("", load(&store.apply_batches))],
    );
    metric(
        "patina_apply_lag_seconds",
        "gauge",
        "Time the last remote batch waited for the store.",
        &[("", load(&store.apply_lag_us_last) / 1e6)],
    );
    metric(
        "patina_gaps",
        "gauge",
        "Versions heard of but not applied.",
        &[("", load(&store.gaps))],
    );
    metric(
        "patina_members",
        "gauge",
        "Live members besides this node.",
        &[("", gossip.members.len() as f64)],
    );
    metric(
        "patina_broadcast_sent_total",
        "counter",
        "Broadcast messages sent, by kind.",
        &[
            ("{kind=\"gossip\"}", b.gossip_sent as f64),
            ("{kind=\"ihave\"}", b.ihave_sent as f64),
            ("{kind=\"graft\"}", b.grafts_sent as f64),
            ("{kind=\"prune\"}", b.prunes_sent as f64),
            ("{kind=\"ping\"}", b.pings_sent as f64),
        ],
    );
    metric(
        "patina_kept_links",
        "gauge",
        "Kept links: asked of near members, of random members, and served to members.",
        &[
            ("{kind=\"near\"}", gossip.kept_links.0 as f64),
            ("{kind=\"far\"}", gossip.kept_links.1 as f64),
            ("{kind=\"served\"}", gossip.kept_links.2 as f64),
        ],
    );
    metric(
        "patina_broadcast_received_total",
        "counter",
        "Changesets received by broadcast for the first time.",
        &[("", b.delivered as f64)],
    );
    metric(
        "patina_broadcast_duplicates_total",
        "counter",
        "Changesets received again.",
        &[("", b.duplicates as f64)],
    );
    metric(
        "patina_broadcast_dropped_total",
        "counter",
        "Messages or changesets dropped under load (left to sync).",
        &[
            ("{where=\"transport\"}", gossip.transport_dropped as f64),
            ("{where=\"store_queue\"}", gossip.apply_dropped as f64),
        ],
    );
    metric(
        "patina_transport_sent_total",
        "counter",
        "Messages handed to QUIC.",
        &[("", gossip.transport_sent as f64)],
    );
    metric(
        "patina_handshake_failures_total",
        "counter",
        "QUIC handshakes refused or failed.",
        &[("", gossip.handshake_failures as f64)],
    );
    metric(
        "patina_peer_messages_refused_total",
        "counter",
        "Malformed or foreign peer messages.",
        &[("", gossip.refused as f64)],
    );
    metric(
        "patina_store_queue_size",
        "gauge",
        "Requests waiting for the store thread.",
        &[("", store_queue as f64)],
    );
    out
}
