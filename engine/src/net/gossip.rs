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

use std::collections::{BTreeMap, HashMap};
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

use crate::net::membership::{MemberEvent, Membership};
use crate::net::sync::{pull, PullReport, SyncError};
use crate::net::transport::{Channel, Received, Transport};
use crate::store::actor::StoreHandle;
use patina_core::protocol::{Action, Protocol, ReceivedMessage};
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
    /// The sync checks this node asks and answers.
    pub sync_checks: SyncChecks,
}

/// How long a sync round waits for its partner's answer to the check before it opens the
/// session anyway: a few round trips across the world, and far within the protocol's session
/// timeout (`sync_timeout_ms`, 30 s), which the session that follows still has to fit in.
const SYNC_CHECK_WAIT: Duration = Duration::from_secs(1);

/// How long a partner that left a check unanswered is not asked again (its rounds open their
/// session at once): a node of a release without checks refuses them, and would cost each
/// round the wait.
const SYNC_CHECK_SILENT_FOR: Duration = Duration::from_secs(60);

/// Sync checks: before a round, the partner is asked for its state hash
/// (`Bookkeeping::state_hash`), and the round ends there when it equals this node's. Kept in
/// the gossip task, which asks, matches the answer and ends the round itself: a round that
/// ends at the check makes no task, channel or timer of its own.
#[derive(Debug)]
pub struct SyncChecks {
    /// Off (`gossip.sync_check = false`): neither asks nor answers, as a node of a release
    /// without checks.
    enabled: bool,
    /// Questions waiting for their answer, by nonce (random, so an answer is matched by it
    /// alone, whatever address it comes from). At most the running round's.
    waiting: HashMap<u64, WaitingCheck>,
    /// Partners that left the last check unanswered, and until when they are not asked.
    silent: HashMap<SocketAddr, Instant>,
}

/// A round waiting for its partner's answer.
#[derive(Debug, Clone, Copy)]
struct WaitingCheck {
    session: u64,
    partner: SocketAddr,
    /// This node's state hash when it asked.
    own_hash: u64,
    asked: Instant,
}

impl SyncChecks {
    /// Checks asked and answered, or neither.
    pub fn new(enabled: bool) -> SyncChecks {
        SyncChecks {
            enabled,
            waiting: HashMap::new(),
            silent: HashMap::new(),
        }
    }

    /// The nonce of a question for `partner`, now waiting, unless checks are off or the
    /// partner left the last one unanswered lately.
    fn ask(
        &mut self,
        partner: SocketAddr,
        session: u64,
        own_hash: u64,
        now: Instant,
    ) -> Option<u64> {
        if !self.enabled {
            return None;
        }
        if let Some(until) = self.silent.get(&partner) {
            if now < *until {
                return None;
            }
            self.silent.remove(&partner);
        }
        let nonce: u64 = rand::random();
        self.waiting.insert(
            nonce,
            WaitingCheck {
                session,
                partner,
                own_hash,
                asked: now,
            },
        );
        Some(nonce)
    }

    /// The round an answer is for, if it still waits.
    fn answered(&mut self, nonce: u64) -> Option<WaitingCheck> {
        self.waiting.remove(&nonce)
    }

    /// When the first unanswered question gives up.
    fn next_deadline(&self) -> Option<Instant> {
        self.waiting
            .values()
            .map(|w| w.asked + SYNC_CHECK_WAIT)
            .min()
    }

    /// The rounds whose partner did not answer in time: no longer waiting, and their
    /// partners not asked for a while.
    fn expired(&mut self, now: Instant) -> Vec<WaitingCheck> {
        let mut gone = Vec::new();
        self.waiting.retain(|_, w| {
            let keep = now < w.asked + SYNC_CHECK_WAIT;
            if !keep {
                gone.push(*w);
            }
            keep
        });
        if !gone.is_empty() {
            self.silent.retain(|_, until| *until > now);
            for w in &gone {
                self.silent.insert(w.partner, now + SYNC_CHECK_SILENT_FOR);
            }
        }
        gone
    }
}

/// Sleeps until `at`, or forever without one (a `select!` branch that never fires).
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
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
            let check_due = self.sync_checks.next_deadline();
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
                // A partner that did not answer the check: the round opens its session.
                _ = sleep_until_some(check_due) => {
                    let now = Instant::now();
                    for check in self.sync_checks.expired(now) {
                        self.spawn_pull(check.session, check.partner, check.asked, &sync_done);
                    }
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
                                report.changesets,
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
                    Action::Deliver(_) | Action::StartSync { .. } | Action::Announce => {}
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
                if self.sync_checks.enabled {
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
                let Some(check) = self.sync_checks.answered(nonce) else {
                    return;
                };
                if hash == check.own_hash {
                    // The partner's versions are those this node had when it asked: nothing
                    // there that this node lacks now. The round ends as one that found
                    // nothing.
                    actions.extend(self.protocol.sync_answered(now, check.session, 0, &[]));
                    snapshot.sync_rounds += 1;
                    snapshot.sync_spared += 1;
                    // Published at once, as a session's end is: an idle node's tick may be a
                    // second away, and what counts rounds (health, loadgen's timeline) would
                    // see them late.
                    self.snapshot.send_replace(snapshot.clone());
                } else {
                    self.spawn_pull(check.session, check.partner, check.asked, done);
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
        self.membership
            .prefer_warm(&mut packets, |addr| transport.is_warm(addr));
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

    /// Starts sync session `session` with `peer` as a task of its own; its outcome comes back
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
        if !self.transport.is_connected(addr) {
            snapshot.cold_sends.sync += 1;
        }
        // The check first: the partner answers with its state hash, and a round between two
        // nodes that have applied the same versions (most rounds of a cluster that has
        // converged) ends there, with two datagrams instead of a session: a session is a
        // stream each way, a request to each store thread and the QUIC packets that carry
        // them, 0.7-1.1 ms of CPU between the two (bench `sync_round_cost`) against 0.05-0.2
        // for the check. A partner that does not answer in time (lost,
        // or a node without checks, which refuses the message) gets the session as before.
        let asked = Instant::now();
        let own_hash = self.store.state_hash();
        match self.sync_checks.ask(addr, session, own_hash, asked) {
            Some(nonce) => {
                self.transport.send(
                    addr,
                    Channel::Datagram,
                    Bytes::from(encode_peer_message(
                        self.cluster,
                        &PeerMessage::SyncCheck { nonce },
                    )),
                );
            }
            None => self.spawn_pull(session, addr, asked, done),
        }
    }

    /// Runs round `session`'s session with `addr` as a task of its own; its outcome comes back
    /// through `done`. The round began at `began` (its check is part of its time).
    fn spawn_pull(
        &self,
        session: u64,
        addr: SocketAddr,
        began: Instant,
        done: &mpsc::Sender<SyncDone>,
    ) {
        let (transport, store, done) = (self.transport.clone(), self.store.clone(), done.clone());
        let (cluster, limits) = (self.cluster, self.limits);
        let metrics = self.metrics.clone();
        // A pull ends before the protocol gives up on it, so two never overlap and every
        // session is counted once, as done or failed.
        let limit = Duration::from_millis(self.protocol.config().sync_timeout_ms * 9 / 10)
            .saturating_sub(began.elapsed());
        crate::logging::spawn(async move {
            let started = Instant::now();
            let result =
                tokio::time::timeout(limit, pull(&transport, addr, &store, cluster, &limits))
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
                    let outcome = pull(&transport, addr, &store, cluster, &limits)
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
    std::fs::read_to_string(path)
        .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
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
