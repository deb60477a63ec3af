//! The figures other parts of a node already keep (the store thread's counters and queue, the
//! gossip task's snapshot), read when `/metrics` is scraped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use tokio::sync::watch;

use crate::metrics::{by, emit, one, StoreMetrics};
use crate::net::gossip::GossipSnapshot;
use crate::store::actor::StoreHandle;

/// The counters and gauges kept elsewhere (the store thread, the gossip task), read at scrape.
#[derive(Debug)]
pub(super) struct Counters {
    pub(super) store: Arc<StoreMetrics>,
    pub(super) queue: StoreHandle,
    pub(super) gossip: watch::Receiver<GossipSnapshot>,
}

impl Collector for Counters {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter as C, Gauge as G};
        let s = &self.store;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        let gossip = self.gossip.borrow().clone();
        let b = gossip.broadcast;
        let e = &mut encoder;
        emit(
            e,
            "patina_build_info",
            "The running build (value 1)",
            G,
            &[(
                vec![("version", env!("CARGO_PKG_VERSION").to_string())],
                1.0,
            )],
        )?;
        emit(
            e,
            "patina_changesets_committed",
            "Local transactions that changed rows",
            C,
            &one(load(&s.committed_changesets)),
        )?;
        emit(
            e,
            "patina_changes_committed",
            "Changes in local transactions",
            C,
            &one(load(&s.committed_changes)),
        )?;
        emit(
            e,
            "patina_changesets_applied",
            "Remote changesets merged",
            C,
            &one(load(&s.applied_changesets)),
        )?;
        emit(
            e,
            "patina_changes_applied",
            "Remote changes that won the merge",
            C,
            &one(load(&s.applied_changes_won)),
        )?;
        emit(
            e,
            "patina_changesets_rejected",
            "Remote changesets refused",
            C,
            &one(load(&s.apply_rejected)),
        )?;
        emit(
            e,
            "patina_apply_failed",
            "Batches of remote changesets whose transaction failed (full disk, I/O)",
            C,
            &one(load(&s.apply_failed)),
        )?;
        emit(
            e,
            "patina_changeset_parts_buffered",
            "Parts of large remote changesets kept until the rest arrive",
            C,
            &one(load(&s.parts_buffered)),
        )?;
        emit(
            e,
            "patina_apply_batches",
            "Remote batches applied",
            C,
            &one(load(&s.apply_batches)),
        )?;
        emit(
            e,
            "patina_apply_lag_seconds",
            "Time the last remote batch waited for the store (see patina_store_queue_wait_seconds)",
            G,
            &one(load(&s.apply_lag_us_last) / 1e6),
        )?;
        emit(
            e,
            "patina_gaps",
            "Versions heard of but not applied",
            G,
            &one(load(&s.gaps)),
        )?;
        emit(
            e,
            "patina_unreplicated_tables",
            "Replicated tables whose rows from before they became replicated still lack clocks (a backfill owed; retried every minute)",
            G,
            &one(load(&s.unreplicated_tables)),
        )?;
        emit(
            e,
            "patina_members",
            "Live members besides this node",
            G,
            &one(gossip.members.len() as f64),
        )?;
        emit(
            e,
            "patina_broadcast_sent",
            "Broadcast messages sent, by kind",
            C,
            &by(
                "kind",
                &[
                    ("gossip", b.gossip_sent as f64),
                    ("first_hop", gossip.first_hop.0 as f64),
                    ("ihave", b.ihave_sent as f64),
                    ("graft", b.grafts_sent as f64),
                    ("prune", b.prunes_sent as f64),
                    ("ping", b.pings_sent as f64),
                ],
            ),
        )?;
        emit(
            e,
            "patina_kept_links",
            "Kept links: asked of near members, of random members, and served to members",
            G,
            &by(
                "kind",
                &[
                    ("near", gossip.kept_links.0 as f64),
                    ("far", gossip.kept_links.1 as f64),
                    ("served", gossip.kept_links.2 as f64),
                ],
            ),
        )?;
        emit(
            e,
            "patina_broadcast_received",
            "Changesets received by broadcast for the first time",
            C,
            &one(b.delivered as f64),
        )?;
        emit(
            e,
            "patina_broadcast_duplicates",
            "Changesets received again",
            C,
            &one(b.duplicates as f64),
        )?;
        emit(
            e,
            "patina_broadcast_dropped",
            "Messages or changesets dropped under load (left to sync)",
            C,
            &by(
                "where",
                &[
                    ("transport", gossip.transport_dropped as f64),
                    ("store_queue", gossip.apply_dropped as f64),
                ],
            ),
        )?;
        emit(
            e,
            "patina_transport_sent",
            "Messages handed to QUIC",
            C,
            &one(gossip.transport_sent as f64),
        )?;
        let (sealed_sent, sealed_opened, sealed_refused, sealed_unknown) = gossip.sealed_datagrams;
        emit(
            e,
            "patina_sealed_datagrams",
            "Datagrams sealed with keys of the peer's connection, beside QUIC: sent, opened, refused (forged, replayed, or under a key this node does not know), and notices from a peer that lost a key (it restarted; that connection then uses QUIC datagrams)",
            C,
            &by(
                "what",
                &[
                    ("sent", sealed_sent as f64),
                    ("opened", sealed_opened as f64),
                    ("refused", sealed_refused as f64),
                    ("peer_lost_key", sealed_unknown as f64),
                    ("sent_without_connection", gossip.sealed_kept.1 as f64),
                ],
            ),
        )?;
        emit(
            e,
            "patina_sealed_kept_keys",
            "Sealed keys of connections closed for idleness, kept to send datagrams to their peers without a new handshake",
            G,
            &one(gossip.sealed_kept.0 as f64),
        )?;
        emit(
            e,
            "patina_swim_packets_fitted",
            "SWIM packets cut to fit one sealed datagram for a member held under a kept key only, so as not to wait for a handshake (the updates left out lose one transmission)",
            C,
            &one(gossip.swim_fitted as f64),
        )?;
        emit(
            e,
            "patina_handshakes_resumed",
            "QUIC handshakes peers resumed with a session ticket of this node",
            C,
            &one(gossip.handshakes_resumed as f64),
        )?;
        emit(e, "patina_handshake_failures", "QUIC handshakes refused or failed (peers without a certificate of the cluster CA among them)", C, &one(gossip.handshake_failures as f64))?;
        emit(
            e,
            "patina_member_updates_refused",
            "SWIM member updates left out, and SWIM packets refused for their sender: another cluster's, at an address no member can have, with a start time over a day ahead, or new beyond gossip.members_max",
            C,
            &one(gossip.members_refused as f64),
        )?;
        emit(
            e,
            "patina_peer_messages_refused",
            "Malformed or foreign peer messages",
            C,
            &one(gossip.refused as f64),
        )?;
        emit(
            e,
            "patina_sync_rounds",
            "Anti-entropy rounds, by result: a session run, spared by the check (the partner held the same versions), failed",
            C,
            &by(
                "result",
                &[
                    ("ok", (gossip.sync_rounds - gossip.sync_spared) as f64),
                    ("spared", gossip.sync_spared as f64),
                    ("failed", gossip.sync_failures as f64),
                ],
            ),
        )?;
        emit(
            e,
            "patina_connections_open",
            "Pooled QUIC connections",
            G,
            &one(gossip.connections_open as f64),
        )?;
        emit(
            e,
            "patina_store_queue_size",
            "Requests waiting for the store thread",
            G,
            &one(self.queue.queue_len() as f64),
        )?;
        Ok(())
    }
}
