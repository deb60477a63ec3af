//! The gossip task: the engine's driver of the node's protocol state machine
//! ([`patina_core::protocol::Protocol`], the one the simulator and the model checker drive
//! too). It owns the membership shell (foca) and the protocol, feeds them the transport's
//! messages, local commits from the store thread, foca's timers and a tick, and performs the
//! protocol's actions: sends on QUIC, changesets to the store thread in batches (where the
//! apply rule runs), sync sessions, announces while no member is known.
//!
//! Order of work in each turn: handle one input (plus whatever else is already waiting in the
//! inbox, up to a bound), then drain membership (packets out, member events into the
//! protocol), hand the changesets to deliver to the store, then perform the sends.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use patina_core::broadcast::{BroadcastMsg, BroadcastStats, Millis};
use patina_core::change::Changeset;
use patina_core::ids::SiteId;
use patina_core::wire::{encode_peer_message, Limits, PeerMessage};
use tokio::sync::{mpsc, watch};

use crate::net::membership::{MemberEvent, Membership, Reach};
use crate::net::sync::{pull, PullReport, SyncError};
use crate::net::transport::{Channel, Received, Transport};
use crate::store::actor::StoreHandle;
use patina_core::protocol::{Action, CheckAnswered, Protocol, ReceivedMessage};
use patina_core::sync::SyncOutcome;

/// What the gossip task reports, refreshed every tick.
#[derive(Debug, Clone, Default)]
pub struct GossipSnapshot {
    /// Live members (not counting this node); shared, replaced when membership changes.
    pub members: Arc<BTreeMap<SiteId, SocketAddr>>,
    /// Broadcast counters.
    pub broadcast: BroadcastStats,
    /// Kept links this node asked for: (near, far); and how many members it feeds.
    pub kept_links: (usize, usize, usize),
    /// Changesets dropped because the store queue was full.
    pub apply_dropped: u64,
    /// Peer messages refused (malformed, other cluster).
    pub refused: u64,
    /// Members as foca counts them.
    pub foca_members: usize,
    /// Member updates and SWIM packets refused (another cluster's, unusable address, bump
    /// from the future, beyond `gossip.members_max`).
    pub members_refused: u64,
    /// How many times slower than configured SWIM runs on this loaded node (1 when healthy;
    /// see [`Membership::slowdown`]).
    pub swim_slowdown: u32,
    /// Transport: messages sent.
    pub transport_sent: u64,
    /// Transport: bytes of the messages sent.
    pub transport_bytes: u64,
    /// Transport: messages dropped (full queue, failed send, unreachable peer).
    pub transport_dropped: u64,
    /// Transport: handshakes refused or failed.
    pub handshake_failures: u64,
    /// Transport: connections this node opened (handshakes it started).
    pub connections_opened: u64,
    /// Transport: handshakes peers resumed with a ticket of this node (no certificates checked
    /// again, no signatures).
    pub handshakes_resumed: u64,
    /// Transport: connections pooled now (at the last check of idle ones).
    pub connections_open: u64,
    /// Transport: connections closed for being idle or over the cap.
    pub connections_closed_idle: u64,
    /// Transport: sealed datagrams sent, opened, refused, and notices of keys a peer lost
    /// ([`super::sealed`]).
    pub sealed_datagrams: (u64, u64, u64, u64),
    /// Transport: sealed keys of closed connections kept now, and datagrams sent under them
    /// with no connection (see `Transport::is_warm`).
    pub sealed_kept: (u64, u64),
    /// Messages sent to a peer with no pooled connection (each needs a handshake), by what
    /// sent them: SWIM, round-trip probes, kept-link requests and releases, changesets and
    /// tree messages, sync sessions.
    pub cold_sends: ColdSends,
    /// Copies of this node's own changesets sent straight to members beyond its kept links
    /// (core's `origin_fanout`), and copies asked for but not sent: too few of the members
    /// offered could take a datagram at once (no connection or kept key, a message waiting
    /// for them, the send budget spent).
    pub first_hop: (u64, u64),
    /// Sync rounds that completed (those spared by a sync check among them).
    pub sync_rounds: u64,
    /// Sync rounds that ended at the check, with no session: the partner's state hash was
    /// this node's.
    pub sync_spared: u64,
    /// SWIM packets cut to fit one sealed datagram for a member held under a kept key only
    /// (`Membership::fit_updates`), so as not to wait for a handshake (one queued behind an
    /// earlier message to the same member still waits).
    pub swim_fitted: u64,
    /// Sync rounds that failed.
    pub sync_failures: u64,
    /// Changesets received by sync.
    pub sync_received: u64,
    /// Bytes of sync sessions this node started (requests and answers).
    pub sync_bytes: u64,
}

/// Messages that needed a new connection, by sender (see [`GossipSnapshot::cold_sends`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct ColdSends {
    /// SWIM packets.
    pub swim: u64,
    /// Round-trip probes and their answers.
    pub probes: u64,
    /// Kept-link requests and releases.
    pub links: u64,
    /// Changesets, announcements, grafts.
    pub changes: u64,
    /// Sync sessions this node started.
    pub sync: u64,
    /// The SWIM packets among them, by kind (see [`crate::net::membership::SWIM_KINDS`]).
    pub swim_by_kind: [u64; crate::net::membership::SWIM_KINDS.len()],
}

/// The address each broadcast sender was last heard from (for members SWIM does not know yet).
/// Written for every broadcast message received: hashed with foldhash, where a search of an
/// ordered map of hundreds of sites was about 1% of a writing cluster's CPU.
type PeerAddrs = crate::store::FastMap<SiteId, SocketAddr>;

/// What a reconcile reports: the address pulled from, the session, how long it took.
pub type Reconciled = Result<(SocketAddr, PullReport, Duration), String>;

/// Requests of the admin socket to the gossip task.
#[derive(Debug)]
pub enum GossipControl {
    /// Every member SWIM knows: (identity, state, incarnation).
    States(tokio::sync::oneshot::Sender<Vec<(crate::net::membership::Actor, &'static str, u64)>>),
    /// Announce again to the bootstrap entries (names resolved again) and remembered members,
    /// whatever the membership; answers what was announced to.
    Rejoin(tokio::sync::oneshot::Sender<Vec<String>>),
    /// One anti-entropy pull now from `peer` (a site id in hex, or a gossip address).
    Reconcile {
        /// The member.
        peer: String,
        /// The outcome.
        reply: tokio::sync::oneshot::Sender<Reconciled>,
    },
}

/// Everything the gossip task needs.
#[derive(Debug)]
pub struct GossipTask {
    /// This node's site.
    pub site: SiteId,
    /// Cluster id.
    pub cluster: u16,
    /// Membership shell.
    pub membership: Membership,
    /// The protocol state machine: broadcast, sync scheduling, rejoin.
    pub protocol: Protocol,
    /// QUIC endpoint.
    pub transport: Transport,
    /// Messages from peers.
    pub inbox: mpsc::Receiver<Received>,
    /// Changesets committed here.
    pub commits: mpsc::Receiver<Arc<Changeset>>,
    /// The store thread.
    pub store: StoreHandle,
    /// Addresses to announce to at start, and again while no member is known (bootstrap plus
    /// remembered members).
    pub announce_to: Vec<SocketAddr>,
    /// The configured bootstrap entries; names among them are resolved again while no member
    /// is known (a Kubernetes pod's name has no record until it runs).
    pub bootstrap: Vec<crate::net::addrs::HostPort>,
    /// The address peers reach this node at (this node's identity in membership).
    pub advertised: SocketAddr,
    /// Where sync sessions are timed.
    pub metrics: Option<Arc<crate::metrics::NodeMetrics>>,
    /// Requests of the admin socket.
    pub control: mpsc::Receiver<GossipControl>,
    /// The way to send them (cloned out before the task runs).
    pub control_tx: mpsc::Sender<GossipControl>,
    /// Where live members are remembered across restarts.
    pub members_file: PathBuf,
    /// Hash of what the members file holds, once this task wrote it.
    pub members_file_hash: Option<u64>,
    /// Broadcast tick (ms).
    pub tick_ms: u64,
    /// Decode limits for peer messages.
    pub limits: Limits,
    /// Stop signal.
    pub shutdown: watch::Receiver<bool>,
    /// Snapshot output.
    pub snapshot: watch::Sender<GossipSnapshot>,
    /// Sync sessions opened with each peer: which window of its older gaps a node over the
    /// request's gap cap asks that peer for (`encode_sync_state`). The session number would
    /// not do: the scheduler picks peers in a cycle, so a peer's sessions can all fall on the
    /// same window, and a version only that peer holds would never be asked of it.
    pub sync_pulls: BTreeMap<SiteId, u64>,
}

/// How a sync session ended, for the gossip task.
#[derive(Debug)]
struct SyncDone {
    session: u64,
    result: Result<PullReport, SyncError>,
}

/// Least time between two rewrites of the members file.
const MEMBERS_FILE_INTERVAL: Duration = Duration::from_secs(1);

/// Longest wait for the system resolver when bootstrap names are looked up again.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest time between two ticks of an idle node: the counters it publishes (health,
/// metrics) are at most this old.
const IDLE_TICK_MAX: Duration = Duration::from_secs(1);

/// Most inbox messages handled in one turn, so local commits and timers are never starved.
const INBOX_BATCH_MAX: usize = 512;

impl GossipTask {
    /// Runs until shutdown; then leaves the cluster and closes the transport.
    pub async fn run(mut self) {
        let start = Instant::now();
        let now_ms = |at: Instant| Millis(at.duration_since(start).as_millis() as u64);
        let own = [self.transport.local_addr(), self.advertised];
        self.announce_to.retain(|addr| !own.contains(addr));
        let (resolved_tx, mut resolved) = mpsc::channel::<Vec<SocketAddr>>(1);
        let mut resolving = false;
        for addr in &self.announce_to {
            self.membership.announce(*addr, self.cluster);
        }
        // An announce is one packet: if it is lost (the bootstrap node not up yet, a
        // handshake timing out on a loaded machine), foca never learns a member and never
        // retries by itself. So while this node knows no member, the protocol asks for
        // announces again, waiting twice as long each time, up to a bound.
        // Ticks every `tick_ms` while broadcast has announcements to send or ids to graft;
        // otherwise only when the protocol has something due (a sync round, a round-trip
        // probe, a kept-link refresh), and at least every IDLE_TICK_MAX for the counters: an
        // idle node woke ten times a second for nothing.
        let busy_tick = Duration::from_millis(self.tick_ms);
        let mut last_tick = Instant::now();
        let mut peer_addrs = PeerAddrs::default();
        let mut snapshot = GossipSnapshot::default();
        let mut actions: Vec<Action> = Vec::new();
        // The members file is rewritten at most once per interval: at startup in a large
        // cluster every node hears of hundreds of members within seconds.
        let mut members_dirty = self.flush_membership(Instant::now(), &mut snapshot);
        let mut members_written = Instant::now() - MEMBERS_FILE_INTERVAL;
        let (sync_done, mut sync_results) = mpsc::channel::<SyncDone>(4);
        let mut gaps_seen = 0u64;
        loop {
            // A remote changeset that skipped versions of its site (a delivery lost or late),
            // counted by the store thread by `Node`'s rule, brings sync back from its quiet
            // back-off.
            if let Some(metrics) = &self.metrics {
                let gaps = metrics
                    .store
                    .gaps_opened
                    .load(std::sync::atomic::Ordering::Relaxed);
                if gaps > gaps_seen {
                    self.protocol.versions_missing();
                }
                gaps_seen = gaps;
            }
            let timer_due = self
                .membership
                .next_deadline()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
            let tick_due = if self.protocol.has_pending() {
                last_tick + busy_tick
            } else {
                let due = self
                    .protocol
                    .next_due()
                    .0
                    .saturating_sub(now_ms(last_tick).0);
                // (max, then min: `clamp` would panic if `tick_ms` were above a second.)
                last_tick + Duration::from_millis(due).max(busy_tick).min(IDLE_TICK_MAX)
            };
            tokio::select! {
                _ = self.shutdown.changed() => break,
                received = self.inbox.recv() => {
                    let Some(received) = received else { break };
                    let now = Instant::now();
                    self.handle(now_ms(now), received, &mut peer_addrs, &mut actions, &mut snapshot, &sync_done);
                    for _ in 0..INBOX_BATCH_MAX {
                        match self.inbox.try_recv() {
                            Ok(r) => self.handle(now_ms(now), r, &mut peer_addrs, &mut actions, &mut snapshot, &sync_done),
                            Err(_) => break,
                        }
                    }
                }
                commit = self.commits.recv() => {
                    let Some(changeset) = commit else { break };
                    // Large ones leave in parts (the broadcast core splits them).
                    actions.extend(self.protocol.local_commit(changeset));
                }
                _ = tokio::time::sleep_until(timer_due.into()) => {
                    self.membership.handle_timers(Instant::now());
                }
                Some(control) = self.control.recv() => {
                    self.handle_control(control, &resolved_tx);
                }
                Some(addrs) = resolved.recv() => {
                    resolving = false;
                    for addr in addrs {
                        if !own.contains(&addr) && !self.announce_to.contains(&addr) {
                            tracing::info!("bootstrap: a name now resolves to {addr}");
                            self.announce_to.push(addr);
                            if self.membership.members().is_empty() {
                                self.membership.announce(addr, self.cluster);
                            }
                        }
                    }
                }
                Some(SyncDone { session, result }) = sync_results.recv() => {
                    match result {
                        Ok(report) => {
                            // Ends the round (a find only if broadcast had not delivered it);
                            // what broadcast had not goes on by broadcast.
                            actions.extend(self.protocol.sync_answered(
                                now_ms(Instant::now()),
                                session,
                                report.brought_for_relay(),
                                &report.received,
                            ));
                            snapshot.sync_rounds += 1;
                            snapshot.sync_received += report.changesets as u64;
                            snapshot.sync_bytes += report.bytes_sent + report.bytes_received;
                        }
                        Err(e) => {
                            snapshot.sync_failures += 1;
                            tracing::debug!("sync round failed: {e}");
                            self.protocol.sync_finished(now_ms(Instant::now()), session, SyncOutcome::Failed);
                        }
                    }
                    // Published at once: an idle node's tick may be a second away.
                    self.snapshot.send_replace(snapshot.clone());
                }
                _ = tokio::time::sleep_until(tick_due.into()) => {
                    let now = Instant::now();
                    last_tick = now;
                    for action in self.protocol.tick(now_ms(now)) {
                        match action {
                            Action::AskSyncCheck { peer, session, nonce } => {
                                self.ask_sync_check(now_ms(now), peer, session, nonce, &mut snapshot);
                            }
                            Action::StartSync { peer, session } => {
                                self.start_sync(now_ms(now), peer, session, &sync_done, &mut snapshot);
                            }
                            Action::Announce => {
                                if !(self.announce_to.is_empty() && self.bootstrap.is_empty()) {
                                    tracing::debug!("no member known: announcing again to {} addresses", self.announce_to.len());
                                    for addr in &self.announce_to {
                                        self.membership.announce(*addr, self.cluster);
                                    }
                                    if !resolving && self.bootstrap.iter().any(|entry| entry.literal().is_none()) {
                                        resolving = true;
                                        let (entries, done) = (self.bootstrap.clone(), resolved_tx.clone());
                                        crate::logging::spawn(async move {
                                            let addrs = crate::net::addrs::resolve_all(&entries, RESOLVE_TIMEOUT).await;
                                            let _ = done.send(addrs).await;
                                        });
                                    }
                                }
                            }
                            other => actions.push(other),
                        }
                    }
                    if members_dirty && now >= members_written + MEMBERS_FILE_INTERVAL {
                        self.remember_members();
                        members_dirty = false;
                        members_written = now;
                    }
                    let broadcast = self.protocol.broadcast();
                    snapshot.broadcast = broadcast.stats();
                    snapshot.kept_links = (
                        broadcast.near_peers().len(),
                        broadcast.far_peers().len(),
                        broadcast.kept_children().count(),
                    );
                    snapshot.foca_members = self.membership.foca_member_count();
                    snapshot.members_refused = self.membership.refused();
                    snapshot.swim_slowdown = self.membership.slowdown();
                    let transport = self.transport.stats();
                    snapshot.transport_sent = transport.sent.load(std::sync::atomic::Ordering::Relaxed);
                    snapshot.transport_bytes = transport.sent_bytes.load(std::sync::atomic::Ordering::Relaxed);
                    snapshot.transport_dropped = transport.dropped.load(std::sync::atomic::Ordering::Relaxed);
                    snapshot.handshake_failures =
                        transport.handshake_failures.load(std::sync::atomic::Ordering::Relaxed);
                    snapshot.connections_opened =
                        transport.connections_opened.load(std::sync::atomic::Ordering::Relaxed);
                    snapshot.handshakes_resumed =
                        transport.handshakes_resumed.load(std::sync::atomic::Ordering::Relaxed);
                    snapshot.connections_open =
                        transport.connections_open.load(std::sync::atomic::Ordering::Relaxed);
                    snapshot.connections_closed_idle =
                        transport.connections_closed_idle.load(std::sync::atomic::Ordering::Relaxed);
                    snapshot.sealed_datagrams = (
                        transport.sealed_sent.load(std::sync::atomic::Ordering::Relaxed),
                        transport.sealed_received.load(std::sync::atomic::Ordering::Relaxed),
                        transport.sealed_refused.load(std::sync::atomic::Ordering::Relaxed),
                        transport.sealed_unknown.load(std::sync::atomic::Ordering::Relaxed),
                    );
                    snapshot.sealed_kept = (
                        transport.sealed_keys_kept.load(std::sync::atomic::Ordering::Relaxed),
                        transport.sealed_sent_kept.load(std::sync::atomic::Ordering::Relaxed),
                    );
                    self.snapshot.send_replace(snapshot.clone());
                }
            }
            members_dirty |= self.flush_membership(Instant::now(), &mut snapshot);
            // Changesets to apply go to the store before anything is forwarded: the store
            // thread commits while this task encodes and queues the sends.
            let batch: Vec<Arc<Changeset>> = actions
                .iter()
                .filter_map(|action| match action {
                    Action::Deliver(changeset) => Some(changeset.clone()),
                    _ => None,
                })
                .collect();
            if !batch.is_empty() {
                let n = batch.len() as u64;
                if !self.store.apply(batch) {
                    // Anti-entropy sync repairs what is dropped here (broadcast has seen it:
                    // it will not come again), so it must not wait for a backed-off round.
                    snapshot.apply_dropped += n;
                    self.protocol.versions_missing();
                }
            }
            for action in actions.drain(..) {
                match action {
                    Action::Send { to, msg } => {
                        self.send_broadcast(to, msg, &peer_addrs, &mut snapshot);
                    }
                    Action::SendToSome {
                        candidates,
                        count,
                        msg,
                    } => {
                        // Optional copies (the kept links carry the changeset anyway): only
                        // as datagrams that leave at once, on a pooled connection or under a
                        // kept key. A handshake would cost more CPU than the hop they save and
                        // arrive a round trip late; a queued copy could connect later.
                        let bytes = Bytes::from(encode_peer_message(
                            self.cluster,
                            &PeerMessage::Broadcast {
                                from: self.site,
                                msg,
                            },
                        ));
                        let mut sent: Vec<SocketAddr> = Vec::with_capacity(count);
                        for to in &candidates {
                            if sent.len() == count {
                                break;
                            }
                            let Some(addr) = self.peer_addr(to, &peer_addrs) else {
                                continue;
                            };
                            if !sent.contains(&addr)
                                && self
                                    .transport
                                    .send_datagram_without_handshake(addr, bytes.clone())
                            {
                                sent.push(addr);
                            }
                        }
                        snapshot.first_hop.0 += sent.len() as u64;
                        snapshot.first_hop.1 += (count - sent.len()) as u64;
                    }
                    // Delivered above; sync and announces come only from ticks.
                    Action::Deliver(_)
                    | Action::StartSync { .. }
                    | Action::AskSyncCheck { .. }
                    | Action::Announce => {}
                }
            }
        }
        if members_dirty {
            self.remember_members();
        }
        self.membership.leave();
        self.flush_membership(Instant::now(), &mut snapshot);
        // Give the goodbye packets a moment to leave before the endpoint closes.
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.transport.close().await;
    }

    fn peer_addr(&self, to: &SiteId, peer_addrs: &PeerAddrs) -> Option<SocketAddr> {
        self.membership
            .addr_of(to)
            .or_else(|| peer_addrs.get(to).copied())
    }

    /// Sends one broadcast message, counting it among the cold sends if it needs a handshake.
    fn send_broadcast(
        &self,
        to: SiteId,
        msg: BroadcastMsg,
        peer_addrs: &PeerAddrs,
        snapshot: &mut GossipSnapshot,
    ) {
        let Some(addr) = self.peer_addr(&to, peer_addrs) else {
            return;
        };
        let channel = broadcast_channel(&msg);
        let cold = &mut snapshot.cold_sends;
        let cold_count = match &msg {
            BroadcastMsg::Ping(_) | BroadcastMsg::Pong(_) => &mut cold.probes,
            BroadcastMsg::Keep | BroadcastMsg::Prune => &mut cold.links,
            _ => &mut cold.changes,
        };
        let bytes = encode_peer_message(
            self.cluster,
            &PeerMessage::Broadcast {
                from: self.site,
                msg,
            },
        );
        // Warm or not is found by the send itself: a lookup of its own before it was 1.3% of
        // a writing cluster's CPU (800 agents).
        if !self.transport.send(addr, channel, Bytes::from(bytes)) {
            *cold_count += 1;
        }
    }

    fn handle(
        &mut self,
        now: Millis,
        received: Received,
        peer_addrs: &mut PeerAddrs,
        actions: &mut Vec<Action>,
        snapshot: &mut GossipSnapshot,
        done: &mpsc::Sender<SyncDone>,
    ) {
        // Seen copies are known from their heads, not decoded (see `receive_message`).
        match self
            .protocol
            .receive_message(now, &received.bytes, self.cluster, &self.limits)
        {
            Ok(ReceivedMessage::Membership(packet)) => self.membership.handle_packet(&packet),
            Ok(ReceivedMessage::SyncCheck { nonce }) => {
                if self.protocol.answers_sync_checks() {
                    // Answered from the hash the store thread last published: no request to it.
                    let answer = PeerMessage::SyncCheckAnswer {
                        nonce,
                        hash: self.store.state_hash(),
                    };
                    self.transport.send(
                        received.from,
                        Channel::Datagram,
                        Bytes::from(encode_peer_message(self.cluster, &answer)),
                    );
                }
            }
            Ok(ReceivedMessage::SyncCheckAnswer { nonce, hash }) => {
                // Only from the round's partner: the nonce alone would let any member that
                // learned it (or guessed it) answer for the partner.
                let partner = self
                    .protocol
                    .running_sync()
                    .and_then(|(peer, _)| self.membership.addr_of(&peer))
                    .map(crate::net::addrs::canonical);
                if partner != Some(crate::net::addrs::canonical(received.from)) {
                    tracing::debug!(from = %received.from, "a sync check answer not from the round's partner");
                    return;
                }
                // Compared with the hash the store thread last published, which lags what is
                // queued for it: versions only accrue, so a partner equal to it holds nothing
                // this node lacks now.
                let own = self.store.state_hash();
                match self.protocol.sync_check_answered(now, nonce, hash, own) {
                    CheckAnswered::Spared => {
                        snapshot.sync_rounds += 1;
                        snapshot.sync_spared += 1;
                        // Published at once, as a session's end is: an idle node's tick may be
                        // a second away, and what counts rounds (health, loadgen's timeline)
                        // would see them late.
                        self.snapshot.send_replace(snapshot.clone());
                    }
                    CheckAnswered::Session { peer, session } => {
                        self.start_sync(now, peer, session, done, snapshot);
                    }
                    CheckAnswered::NotWaiting => {}
                }
            }
            Ok(ReceivedMessage::Broadcast {
                from,
                actions: found,
            }) => {
                peer_addrs.insert(from, received.from);
                actions.extend(found);
            }
            Err(e) => {
                snapshot.refused += 1;
                tracing::debug!(from = %received.from, "refused peer message: {e}");
            }
        }
    }

    /// Sends SWIM's packets and applies its member events; true if membership changed.
    fn flush_membership(&mut self, now: Instant, snapshot: &mut GossipSnapshot) -> bool {
        let (mut packets, events) = self.membership.drain(now);
        let transport = &self.transport;
        // (This runs after every inbox batch; most drain no packet, and need no framing.)
        let framing = if packets.is_empty() {
            0
        } else {
            encode_peer_message(self.cluster, &PeerMessage::Membership(Vec::new())).len()
        };
        // Gossip goes to a member that takes the whole packet without a handshake, else cut.
        self.membership.prefer_warm(&mut packets, |addr, len| {
            if transport.is_connected(addr) {
                return Reach::Whole;
            }
            match transport.kept_datagram_room(addr) {
                Some(room) if len + framing <= room => Reach::Whole,
                Some(_) => Reach::Cut,
                None => Reach::Cold,
            }
        });
        // A packet for a member reachable only under a kept key is cut to one sealed datagram
        // rather than wait for a handshake (see `Membership::fit_updates`).
        for (addr, packet) in packets.iter_mut() {
            let Some(room) = transport.kept_datagram_room(*addr) else {
                continue;
            };
            if let Some(fitted) = Membership::fit_updates(packet, room.saturating_sub(framing)) {
                *packet = fitted;
                snapshot.swim_fitted += 1;
            }
        }
        // A cold member counted once per flush: an answer to an announce may be several
        // packets, sent over the one connection the first opens.
        let mut counted_cold: Vec<SocketAddr> = Vec::new();
        for (addr, packet) in packets {
            if !self.transport.is_warm(addr) && !counted_cold.contains(&addr) {
                counted_cold.push(addr);
                snapshot.cold_sends.swim += 1;
                if let Some(kind) = crate::net::membership::packet_kind(&packet) {
                    snapshot.cold_sends.swim_by_kind[kind] += 1;
                }
            }
            let bytes = encode_peer_message(self.cluster, &PeerMessage::Membership(packet));
            // SWIM is built for lost packets (indirect probes, suspicion before a member is
            // declared down); a packet larger than a datagram goes on a stream.
            self.transport
                .send(addr, Channel::Datagram, Bytes::from(bytes));
        }
        if events.is_empty() {
            return false;
        }
        for event in events {
            match event {
                MemberEvent::Up { site, .. } => self.protocol.peer_up(site),
                MemberEvent::Down { site } => self.protocol.peer_down(site),
            }
        }
        snapshot.members = Arc::new(
            self.membership
                .members()
                .iter()
                .map(|(site, addr)| (*site, *addr))
                .collect(),
        );
        self.snapshot.send_replace(snapshot.clone());
        true
    }

    /// Asks `peer` for its state hash before round `session` opens a session (the sync check,
    /// `Protocol::sync_check_answered`): a round between two nodes that have applied the same
    /// versions (most rounds of a cluster that has converged) ends at the answer, two datagrams
    /// instead of a session. A session is a stream each way, a request to each store thread
    /// and the QUIC packets that carry them, 0.7-1.1 ms of CPU between the two (bench
    /// `sync_round_cost`) against 0.05-0.2 for the check. The partner's gossip task answers
    /// from the hash its store thread last published, without asking it.
    fn ask_sync_check(
        &mut self,
        now: Millis,
        peer: SiteId,
        session: u64,
        nonce: u64,
        snapshot: &mut GossipSnapshot,
    ) {
        let Some(addr) = self.membership.addr_of(&peer) else {
            self.protocol
                .sync_finished(now, session, SyncOutcome::Failed);
            return;
        };
        if !self.transport.is_connected(addr) {
            snapshot.cold_sends.sync += 1;
        }
        self.transport.send(
            addr,
            Channel::Datagram,
            Bytes::from(encode_peer_message(
                self.cluster,
                &PeerMessage::SyncCheck { nonce },
            )),
        );
    }

    /// Runs sync session `session` with `peer` as a task of its own; its outcome comes back
    /// through `done` with the session's number.
    fn start_sync(
        &mut self,
        now: Millis,
        peer: SiteId,
        session: u64,
        done: &mpsc::Sender<SyncDone>,
        snapshot: &mut GossipSnapshot,
    ) {
        let Some(addr) = self.membership.addr_of(&peer) else {
            self.protocol
                .sync_finished(now, session, SyncOutcome::Failed);
            return;
        };
        // A round that asked first counted its cold send with the question.
        if !self.protocol.running_sync_asked() && !self.transport.is_connected(addr) {
            snapshot.cold_sends.sync += 1;
        }
        let (transport, store, done) = (self.transport.clone(), self.store.clone(), done.clone());
        let (cluster, limits) = (self.cluster, self.limits);
        let metrics = self.metrics.clone();
        if self.sync_pulls.len() > 2 * self.membership.members().len() + 16 {
            // Members that left: their counts go (a returning one starts again at its first
            // window, which is as good as any).
            let members = self.membership.members();
            self.sync_pulls.retain(|site, _| members.contains_key(site));
        }
        let pulls = self.sync_pulls.entry(peer).or_insert(0);
        let round = *pulls;
        *pulls += 1;
        // A pull ends before the protocol gives up on it, so two never overlap and every
        // session is counted once, as done or failed. The round's check, if it had one, is
        // part of its time.
        let began = self.protocol.running_sync_since().unwrap_or(now);
        let limit = Duration::from_millis(
            (self.protocol.config().sync_timeout_ms * 9 / 10)
                .saturating_sub(now.0.saturating_sub(began.0)),
        );
        crate::logging::spawn(async move {
            let started = Instant::now();
            let result = tokio::time::timeout(
                limit,
                pull(&transport, addr, &store, cluster, &limits, round),
            )
            .await
            .unwrap_or_else(|_| Err(SyncError::Stream(format!("session over {limit:?}"))));
            if let Some(metrics) = metrics {
                let outcome = if result.is_ok() { "ok" } else { "failed" };
                metrics
                    .sync_session_seconds
                    .get_or_create(&vec![("result", outcome.to_string())])
                    .observe(started.elapsed().as_secs_f64());
            }
            let _ = done.send(SyncDone { session, result }).await;
        });
    }

    /// Answers a request of the admin socket.
    fn handle_control(&mut self, control: GossipControl, resolved: &mpsc::Sender<Vec<SocketAddr>>) {
        match control {
            GossipControl::States(reply) => {
                let _ = reply.send(self.membership.states());
            }
            GossipControl::Rejoin(reply) => {
                for addr in &self.announce_to {
                    self.membership.announce(*addr, self.cluster);
                }
                let mut told: Vec<String> =
                    self.announce_to.iter().map(|a| a.to_string()).collect();
                let names: Vec<_> = self
                    .bootstrap
                    .iter()
                    .filter(|entry| entry.literal().is_none())
                    .cloned()
                    .collect();
                if !names.is_empty() {
                    told.extend(names.iter().map(|n| format!("{n} (resolving)")));
                    let done = resolved.clone();
                    crate::logging::spawn(async move {
                        let addrs = crate::net::addrs::resolve_all(&names, RESOLVE_TIMEOUT).await;
                        let _ = done.send(addrs).await;
                    });
                }
                tracing::info!("rejoin asked: announcing to {}", told.join(", "));
                let _ = reply.send(told);
            }
            GossipControl::Reconcile { peer, reply } => {
                let target = match SiteId::from_hex(&peer) {
                    Ok(site) => self
                        .membership
                        .addr_of(&site)
                        .ok_or_else(|| format!("{peer} is not a live member")),
                    Err(_) => crate::net::addrs::HostPort::parse(&peer).and_then(|hp| {
                        hp.literal()
                            .ok_or_else(|| format!("{peer}: give a site id or a member's IP:port"))
                    }),
                };
                let addr = match target {
                    Ok(addr) => addr,
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return;
                    }
                };
                let (transport, store) = (self.transport.clone(), self.store.clone());
                let (cluster, limits) = (self.cluster, self.limits);
                crate::logging::spawn(async move {
                    let started = Instant::now();
                    // An operator's pull asks for the latest gaps (round 0); the scheduled
                    // rounds move through the older ones.
                    let outcome = pull(&transport, addr, &store, cluster, &limits, 0)
                        .await
                        .map(|report| (addr, report, started.elapsed()))
                        .map_err(|e| format!("sync with {addr}: {e}"));
                    // The pull only queued what it fetched; a status request goes through the
                    // same queue after it, so once it answers the rows are committed and the
                    // operator who asked sees them.
                    let _ = store.status().await;
                    let _ = reply.send(outcome);
                });
            }
        }
    }

    /// Writes the live members next to the database, for the next start.
    fn remember_members(&mut self) {
        // In site order, so the same members make the same text.
        let mut members: Vec<(&SiteId, &SocketAddr)> = self.membership.members().iter().collect();
        members.sort_unstable();
        let remembered: String = members.iter().map(|(_, a)| format!("{a}\n")).collect();
        // Membership events come and go (a member renamed, down and up again) far more often
        // than the set of addresses changes: rewrite the file only when its text would change.
        let hash = {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            remembered.hash(&mut hasher);
            hasher.finish()
        };
        if self.members_file_hash == Some(hash) {
            return;
        }
        match std::fs::write(&self.members_file, remembered) {
            Ok(()) => self.members_file_hash = Some(hash),
            Err(e) => tracing::warn!(
                "cannot remember members in {}: {e}",
                self.members_file.display()
            ),
        }
    }
}

/// Reads the members remembered by an earlier run.
pub fn remembered_members(path: &std::path::Path) -> Vec<SocketAddr> {
    use std::io::Read;
    // The file holds one address a member: a file far larger is not one this node wrote.
    const MEMBERS_FILE_BYTES_MAX: u64 = 16 << 20;
    let mut text = String::new();
    let read = std::fs::File::open(path)
        .and_then(|file| file.take(MEMBERS_FILE_BYTES_MAX).read_to_string(&mut text));
    if read.is_err() {
        return Vec::new();
    }
    text.lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter(crate::net::membership::member_address)
        .collect()
}

/// The channel of a broadcast message. Changesets and what upkeeps the overlay go as
/// datagrams: every node has several kept links in (a lost copy is one of several), a lost
/// announcement is followed by the next, kept-link requests and round-trip probes repeat, and
/// anti-entropy sync repairs the rest. A datagram costs about 30% less CPU at both ends than a
/// stream of its own, and the per-node cost of a write is mostly these messages. Grafts and
/// prunes are one-off requests: streams.
fn broadcast_channel(msg: &BroadcastMsg) -> Channel {
    match msg {
        BroadcastMsg::Gossip(_)
        | BroadcastMsg::KeptGossip(_)
        | BroadcastMsg::IHave(_)
        | BroadcastMsg::Keep
        | BroadcastMsg::Ping(_)
        | BroadcastMsg::Pong(_) => Channel::Datagram,
        BroadcastMsg::Graft(_) | BroadcastMsg::Prune => Channel::Stream,
    }
}
