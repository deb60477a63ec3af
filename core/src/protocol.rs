//! The protocol decisions of one node, without storage: broadcast, when and with whom to sync,
//! and when to announce again while no member is known. Storage and I/O stay with the caller.
//!
//! The engine's gossip task drives it with real time, the transport's messages and foca's
//! member events, and performs its [`Action`]s (a send on QUIC, a batch to the store thread, a
//! sync session over a stream, an announce to the bootstrap addresses). [`crate::node::Node`]
//! drives the same type in memory for the simulator and the model checker, applying delivered
//! changesets to its in-memory replica by the same apply rule as the store
//! ([`crate::apply::apply_changeset`]). So each decision is written once, here, and the model
//! checks the one the engine makes (the sync check's rounds excepted: the model starts its
//! sync sessions itself, and its convergence property ends them at the check's rule).
//!
//! Sync sessions are numbered: the caller reports each one's end with its number
//! ([`Protocol::sync_finished`]). A session that has not ended after
//! [`ProtocolConfig::sync_timeout_ms`] counts as failed (its request or answer may be lost), and
//! a late report of it changes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::broadcast::{Broadcast, BroadcastConfig, BroadcastMsg, Effect, Millis};
use crate::change::Changeset;
use crate::ids::SiteId;
use crate::stats::SplitMix64;
use crate::sync::{Activity, SyncOutcome, SyncScheduler};
use crate::wire::{decode_peer_message, peek_gossip_copy, Limits, PeerMessage, PeerMessageError};

/// How a node's protocol behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProtocolConfig {
    /// Broadcast settings.
    pub broadcast: BroadcastConfig,
    /// Time between two sync rounds (ms, plus up to a quarter of it as jitter); None: this
    /// node starts no sync session by itself (the model checker starts them in every order).
    pub sync_interval_ms: Option<u64>,
    /// A sync session not reported finished after this long counts as failed (ms).
    pub sync_timeout_ms: u64,
    /// First wait before announcing again while no member is known (ms); it doubles up to
    /// `rejoin_max_ms`.
    pub rejoin_first_ms: u64,
    /// Longest wait between two announces while no member is known (ms).
    pub rejoin_max_ms: u64,
    /// Sync checks: how long a round waits for its partner's state hash (ms) before it opens
    /// its session anyway. None: no checks, neither asked nor answered (a round opens its
    /// session at once), as a node of a release without them.
    pub sync_check_wait_ms: Option<u64>,
}

impl Default for ProtocolConfig {
    fn default() -> Self {
        ProtocolConfig {
            broadcast: BroadcastConfig::default(),
            sync_interval_ms: Some(500),
            sync_timeout_ms: 30_000,
            rejoin_first_ms: 1_000,
            rejoin_max_ms: 30_000,
            sync_check_wait_ms: Some(1_000),
        }
    }
}

/// Most changesets one sync round may bring for them to be broadcast again from the node
/// that pulled them ([`Protocol::sync_answered`]).
pub const SYNC_RELAY_MAX: usize = 64;

/// How long a partner that left a sync check unanswered is not asked again (ms): its rounds
/// open their session at once. A node of a release without checks refuses them, and would
/// otherwise cost each round the whole wait.
pub const SYNC_CHECK_SILENT_MS: u64 = 60_000;

/// What the caller must do.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    /// Send a broadcast message to a member.
    Send {
        /// The member.
        to: SiteId,
        /// The message.
        msg: BroadcastMsg,
    },
    /// Send a broadcast message to `count` of the `candidates`, the first ones the caller can
    /// reach cheaply, in their order (optional copies: see [`Effect::SendToSome`]).
    SendToSome {
        /// Members in a random order.
        candidates: Vec<SiteId>,
        /// How many of them.
        count: usize,
        /// The message.
        msg: BroadcastMsg,
    },
    /// A changeset (or part of one) seen for the first time: apply it by the apply rule.
    Deliver(Arc<Changeset>),
    /// Ask `peer` for its state hash before round `session` opens a session (a
    /// `SyncCheck` message carrying `nonce`), and hand its answer to
    /// [`Protocol::sync_check_answered`]. The round is running from now; without an answer
    /// within `sync_check_wait_ms` a later tick opens its session.
    AskSyncCheck {
        /// The round's partner.
        peer: SiteId,
        /// The round's number.
        session: u64,
        /// To be sent back with the answer.
        nonce: u64,
    },
    /// Start sync session `session` with `peer`; report its end with
    /// [`Protocol::sync_finished`].
    StartSync {
        /// The member to pull from.
        peer: SiteId,
        /// The session's number.
        session: u64,
    },
    /// No member is known: announce this node again to the addresses it was told to join
    /// through (and those it remembers).
    Announce,
}

/// The running sync session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Running {
    peer: SiteId,
    session: u64,
    started: Millis,
    /// The round began with a sync check.
    asked: bool,
}

/// What an answer to a sync check did (see [`Protocol::sync_check_answered`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckAnswered {
    /// The hashes were equal: the round ended there, as one that found nothing.
    Spared,
    /// They differ: open the round's session, as for [`Action::StartSync`].
    Session {
        /// The round's partner.
        peer: SiteId,
        /// The round's number.
        session: u64,
    },
    /// No question with this nonce waits (late, repeated, or never asked): nothing to do.
    NotWaiting,
}

/// What a peer's message became (see [`Protocol::receive_message`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceivedMessage {
    /// A SWIM packet, for the membership layer.
    Membership(Vec<u8>),
    /// A broadcast message, handled: who sent it and what to do.
    Broadcast {
        /// The sender named in the message.
        from: SiteId,
        /// What the protocol decided.
        actions: Vec<Action>,
    },
    /// A partner's question before its sync round, for the caller that runs sync sessions
    /// and knows this node's state hash (see [`crate::versions::Bookkeeping::state_hash`]).
    SyncCheck {
        /// To send back with the answer.
        nonce: u64,
    },
    /// The answer to this node's question: equal to this node's state hash, the round would
    /// find nothing.
    SyncCheckAnswer {
        /// The question's nonce.
        nonce: u64,
        /// The partner's state hash.
        hash: u64,
    },
}

/// One node's protocol state (lost in a crash; rebuilt from membership after a restart).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Protocol {
    broadcast: Broadcast,
    /// The members the caller reported up and not down since. Broadcast keeps lists of its own,
    /// which also take in senders it hears from; sync partners and the decision to announce
    /// again come from this set only, as the membership layer sees it.
    members: BTreeSet<SiteId>,
    sync: Option<SyncScheduler>,
    running: Option<Running>,
    /// The running round's check, while it waits for its answer: the question's nonce.
    check: Option<u64>,
    /// Partners that left their last check unanswered, and until when they are not asked.
    silent: BTreeMap<SiteId, Millis>,
    /// Since the last round began, something said this node likely lacks versions (a gap in
    /// its bookkeeping, an announcement of a changeset not seen here, a round that found
    /// something): the next round opens its session without the check, whose round trip
    /// would only delay what it brings.
    gap_likely: bool,
    /// Nonces of the checks (seeded, as every choice here, so a run is a function of its
    /// inputs; the engine seeds it with a random number too).
    nonces: SplitMix64,
    sessions: u64,
    /// While no member is known: when to announce next, and the wait after that.
    rejoin: Option<(Millis, u64)>,
    /// Something sync may have to repair happened since the last tick (see
    /// [`SyncScheduler::activity`]); only kept while this node schedules sync.
    active: bool,
    config: ProtocolConfig,
}

impl Protocol {
    /// A node that knows no member yet; `now` starts its timers.
    pub fn new(me: SiteId, config: ProtocolConfig, now: Millis, seed: u64) -> Protocol {
        let protocol = Protocol {
            broadcast: Broadcast::new(me, config.broadcast, seed),
            members: BTreeSet::new(),
            sync: config
                .sync_interval_ms
                .map(|interval| SyncScheduler::new(interval, now, seed)),
            running: None,
            check: None,
            silent: BTreeMap::new(),
            gap_likely: false,
            nonces: SplitMix64::new(seed ^ 0x5eed_c0de_c4ec_0000),
            sessions: 0,
            rejoin: Some((now.plus(config.rejoin_first_ms), config.rejoin_first_ms)),
            active: false,
            config,
        };
        protocol.debug_check();
        protocol
    }

    /// The broadcast state machine (read-only: counters, kept links, neighbours).
    pub fn broadcast(&self) -> &Broadcast {
        &self.broadcast
    }

    /// Broadcast counters since the last call (the model drops them from its states).
    pub fn take_stats(&mut self) -> crate::broadcast::BroadcastStats {
        self.broadcast.take_stats()
    }

    /// True while broadcast has announcements or grafts waiting: tick at the busy rate.
    pub fn has_pending(&self) -> bool {
        self.broadcast.has_pending()
    }

    /// The settings this protocol runs with.
    pub fn config(&self) -> &ProtocolConfig {
        &self.config
    }

    /// A member joined.
    pub fn peer_up(&mut self, peer: SiteId) {
        if peer != self.broadcast.me() {
            self.members.insert(peer);
            self.rejoin = None;
            // A member back from a partition or a restart may hold what this node lacks.
            self.note_activity();
        }
        self.broadcast.peer_up(peer);
        self.debug_check();
    }

    /// A member left or failed.
    pub fn peer_down(&mut self, peer: SiteId) {
        self.members.remove(&peer);
        self.silent.remove(&peer);
        self.broadcast.peer_down(peer);
        self.debug_check();
    }

    /// A changeset committed here (large ones leave in parts). It leaves no gap here, so it
    /// does not bring a backed-off sync round in: sync pulls what this node lacks.
    pub fn local_commit(&mut self, changeset: Arc<Changeset>) -> Vec<Action> {
        let effects = self.broadcast.local_commit(changeset);
        self.debug_check();
        actions(effects)
    }

    /// A broadcast message from a peer.
    pub fn receive(&mut self, now: Millis, from: SiteId, msg: BroadcastMsg) -> Vec<Action> {
        // An announcement of a changeset not seen here means one is going round: if its
        // delivery fails here (no announcer answers a graft), sync is what brings it, so it
        // must not be backed off. An announcement of what this node has is no sign of
        // anything: lazy peers announce every write to every node, nearly always after the
        // tree delivered it.
        // A delivery is no sign of a gap either (it arrived): while a cluster writes every node delivers
        // every write, and counting each as a likely gap kept every node syncing at the full
        // rate, for nothing (a tenth of the CPU of 800 agents writing on this machine, and a
        // third of their p99). It only shortens the back-off ([`Activity::Delivering`]); a
        // delivery that skips versions is reported by the caller
        // ([`Protocol::versions_missing`]).
        let announced = matches!(&msg, BroadcastMsg::IHave(ids)
            if ids.iter().any(|id| !self.broadcast.has_seen(id)));
        let effects = self.broadcast.receive(now, from, msg);
        let delivered = effects.iter().any(|e| matches!(e, Effect::Deliver(_)));
        if let Some(sync) = &mut self.sync {
            if announced {
                sync.activity(now, Activity::GapLikely);
                self.gap_likely = true;
            } else if delivered {
                sync.activity(now, Activity::Delivering);
            }
        }
        self.debug_check();
        actions(effects)
    }

    /// A copy of a changeset known by its part id alone (the changes not decoded): what
    /// [`Protocol::receive`] does with a copy of one seen before, or `None` if it was not seen
    /// (see [`crate::broadcast::Broadcast::receive_seen_copy`]). Such a copy is no sign for sync
    /// either way, as in `receive`.
    pub fn receive_seen_copy(
        &mut self,
        from: SiteId,
        kept: bool,
        part: &crate::change::PartId,
    ) -> Option<Vec<Action>> {
        let effects = self.broadcast.receive_seen_copy(from, kept, part)?;
        self.debug_check();
        Some(actions(effects))
    }

    /// A peer's message as it arrived, in bytes: a SWIM packet is handed back for the
    /// membership layer; a broadcast message is handled. A copy of a changeset seen before is
    /// known from its head ([`peek_gossip_copy`]) and its changes are never decoded (five of
    /// the six copies of each write a node receives); anything else is decoded whole and goes
    /// to [`Protocol::receive`]. So a seen copy whose changes are malformed counts as a
    /// duplicate, not as refused: it can do no more than a well-formed duplicate (a prune, a
    /// demoted link), which any member could send, and its head names a changeset this node
    /// holds. Otherwise the effects are those of decoding and `receive` (the proptest
    /// `receiving_bytes_is_decoding_and_receiving` holds the two paths to that).
    pub fn receive_message(
        &mut self,
        now: Millis,
        bytes: &[u8],
        cluster: u16,
        limits: &Limits,
    ) -> Result<ReceivedMessage, PeerMessageError> {
        if let Some(copy) = peek_gossip_copy(bytes, cluster, limits) {
            if let Some(actions) = self.receive_seen_copy(copy.from, copy.kept, &copy.part) {
                return Ok(ReceivedMessage::Broadcast {
                    from: copy.from,
                    actions,
                });
            }
        }
        Ok(match decode_peer_message(bytes, cluster, limits)? {
            PeerMessage::Membership(packet) => ReceivedMessage::Membership(packet),
            PeerMessage::Broadcast { from, msg } => ReceivedMessage::Broadcast {
                from,
                actions: self.receive(now, from, msg),
            },
            PeerMessage::SyncCheck { nonce } => ReceivedMessage::SyncCheck { nonce },
            PeerMessage::SyncCheckAnswer { nonce, hash } => {
                ReceivedMessage::SyncCheckAnswer { nonce, hash }
            }
        })
    }

    /// Sync session `session` was answered with `brought` changesets (or parts), already
    /// applied; `changesets` holds them, in the order received, when they are at most
    /// [`SYNC_RELAY_MAX`] (otherwise it may be empty). Ends the session (if it is the running
    /// one; see [`Protocol::sync_finished`]) and returns what to send.
    ///
    /// What broadcast had delivered already (a round that raced a changeset still spreading)
    /// is no find: such a round counts as having found nothing new, or a writing cluster
    /// would keep every node syncing at the full rate. What broadcast had not delivered is a
    /// sign that the broadcast missed this node, and likely its neighbours too (a healed
    /// partition, a flood that lost its way): from a small round, broadcast passes those on,
    /// so they reach the others within a broadcast's time instead of one sync round per node
    /// (anti-entropy feeding the epidemic again). A larger round is a catch-up (a node back
    /// from a long absence), whose changesets the others hold already: it counts as a find,
    /// and nothing is passed on.
    pub fn sync_answered(
        &mut self,
        now: Millis,
        session: u64,
        brought: usize,
        changesets: &[Arc<Changeset>],
    ) -> Vec<Action> {
        let small = brought <= SYNC_RELAY_MAX;
        let mut found = !small;
        let mut effects = Vec::new();
        if small {
            for changeset in changesets {
                if !self.broadcast.has_seen(&changeset.part_id()) {
                    found = true;
                    effects.extend(self.broadcast.relay(changeset.clone()));
                }
            }
        }
        if self.running.is_some_and(|r| r.session == session) {
            let outcome = if found {
                SyncOutcome::Received
            } else {
                SyncOutcome::NothingNew
            };
            self.end_sync(now, outcome);
        }
        self.debug_check();
        actions(effects)
    }

    /// The caller's bookkeeping has a new gap: versions of a site below one it applied that
    /// it lacks (their delivery was lost, or is late). Sync is what repairs it, so a round
    /// backed off for quiet comes back within an interval.
    pub fn versions_missing(&mut self) {
        self.note_activity();
        // Not for a member up, which brings rounds in too: in a forming cluster members come
        // up all the time, and most rounds would lose their check.
        self.gap_likely = self.sync.is_some();
        self.debug_check();
    }

    fn note_activity(&mut self) {
        if self.sync.is_some() {
            self.active = true;
        }
    }

    /// The earliest time something is due here: a broadcast timer, a sync round or its
    /// timeout, an announce. The caller need not tick before it (nor before the next input)
    /// unless [`Protocol::has_pending`].
    pub fn next_due(&self) -> Millis {
        if self.active {
            // The next tick brings a backed-off sync round in.
            return Millis(0);
        }
        // With no member, no round can start (the scheduler keeps its due time until one
        // comes up, which is an input anyway): only the announces are due.
        let sync = self
            .sync
            .as_ref()
            .filter(|_| !self.members.is_empty())
            .and_then(|s| s.next_at());
        let timeout = self
            .running
            .map(|r| r.started.plus(self.config.sync_timeout_ms));
        let check = self
            .running
            .filter(|_| self.check.is_some())
            .zip(self.check_wait_ms())
            .map(|(r, wait)| r.started.plus(wait));
        let rejoin = match (self.rejoin, self.members.is_empty()) {
            (Some((at, _)), _) => Some(at),
            // The first tick with no member schedules the announces.
            (None, true) => Some(Millis(0)),
            (None, false) => None,
        };
        [sync, timeout, check, rejoin]
            .into_iter()
            .flatten()
            .fold(self.broadcast.next_due(), Millis::min)
    }

    /// Time passes: broadcast flushes announcements and grafts, a sync round starts when one
    /// is due, and a node that knows no member announces itself again when its wait is over.
    pub fn tick(&mut self, now: Millis) -> Vec<Action> {
        let mut out = actions(self.broadcast.tick(now));
        if std::mem::take(&mut self.active) {
            if let Some(sync) = &mut self.sync {
                sync.activity(now, Activity::GapLikely);
            }
        }
        if let Some(running) = self.running {
            if now >= running.started.plus(self.config.sync_timeout_ms) {
                self.end_sync(now, SyncOutcome::Failed);
            } else if self.check.is_some()
                && self
                    .check_wait_ms()
                    .is_some_and(|wait| now >= running.started.plus(wait))
            {
                // Unanswered: a lost datagram, or a partner without checks (which would
                // leave every question unanswered). The round opens its session, and the
                // partner is not asked again for a while.
                self.check = None;
                self.silent.retain(|_, until| *until > now);
                if self.members.contains(&running.peer) {
                    self.silent
                        .insert(running.peer, now.plus(SYNC_CHECK_SILENT_MS));
                }
                out.push(Action::StartSync {
                    peer: running.peer,
                    session: running.session,
                });
            }
        }
        if let Some(sync) = &mut self.sync {
            if sync.is_due(now) {
                let members: Vec<SiteId> = self.members.iter().copied().collect();
                let mut neighbours = self.broadcast.neighbours();
                neighbours.retain(|site| self.members.contains(site));
                if let Some(peer) = sync.due_preferring(now, &neighbours, &members) {
                    self.sessions += 1;
                    let session = self.sessions;
                    let action = self.open_round(now, peer, session);
                    self.running = Some(Running {
                        peer,
                        session,
                        started: now,
                        asked: matches!(action, Action::AskSyncCheck { .. }),
                    });
                    out.push(action);
                }
            }
        }
        if !self.members.is_empty() {
            self.rejoin = None;
        } else {
            match self.rejoin {
                None => {
                    self.rejoin = Some((
                        now.plus(self.config.rejoin_first_ms),
                        self.config.rejoin_first_ms,
                    ))
                }
                Some((at, wait)) if now >= at => {
                    let next = (wait * 2).min(self.config.rejoin_max_ms);
                    self.rejoin = Some((now.plus(next), next));
                    out.push(Action::Announce);
                }
                Some(_) => {}
            }
        }
        self.debug_check();
        out
    }

    /// How round `session`, just started with `peer`, begins: with the check (the partner is
    /// asked for its state hash, and a round between two nodes that applied the same
    /// versions, most rounds of a cluster that has converged, ends at the answer, two
    /// datagrams instead of a session), or with its session when checks are off or the
    /// partner left its last question unanswered lately.
    fn open_round(&mut self, now: Millis, peer: SiteId, session: u64) -> Action {
        let silent = self.silent.get(&peer).is_some_and(|until| now < *until);
        let gap_likely = std::mem::take(&mut self.gap_likely);
        if self.config.sync_check_wait_ms.is_none() || silent || gap_likely {
            return Action::StartSync { peer, session };
        }
        self.silent.remove(&peer);
        let nonce = self.nonces.next_u64();
        self.check = Some(nonce);
        Action::AskSyncCheck {
            peer,
            session,
            nonce,
        }
    }

    /// How long a check waits for its answer: at most half the session timeout, so that an
    /// unanswered one still leaves its session time (a wait as long as the timeout would fail
    /// every round with a partner that never answers, and never mark it silent).
    fn check_wait_ms(&self) -> Option<u64> {
        self.config
            .sync_check_wait_ms
            .map(|wait| wait.min(self.config.sync_timeout_ms / 2))
    }

    /// True if the running round began with a sync check (a driver counting the round's
    /// messages to cold members counts its session's separately, or not).
    pub fn running_sync_asked(&self) -> bool {
        self.running.is_some_and(|r| r.asked)
    }

    /// A seed for the sync checks' nonces alone (the engine gives a random one: a nonce
    /// guessed from earlier ones could answer a round for its partner); the other choices
    /// stay a function of the seed given at creation.
    pub fn reseed_nonces(&mut self, seed: u64) {
        self.nonces = SplitMix64::new(seed);
    }

    /// True if this node answers its partners' sync checks (it asks them too).
    pub fn answers_sync_checks(&self) -> bool {
        self.config.sync_check_wait_ms.is_some()
    }

    /// The answer to the running round's check: the partner's state hash `partner_hash` and
    /// this node's `own_hash` now ([`crate::versions::Bookkeeping::state_hash`]). Equal, the
    /// partner holds exactly the versions this node holds, so its session would bring
    /// nothing (versions only accrue: a hash this node had at any time since it asked would
    /// do as well), and the round ends as one that found nothing. Otherwise its session
    /// opens. The answer is matched by its nonce alone, whoever sent it.
    pub fn sync_check_answered(
        &mut self,
        now: Millis,
        nonce: u64,
        partner_hash: u64,
        own_hash: u64,
    ) -> CheckAnswered {
        let answered = match self.running {
            Some(running) if self.check == Some(nonce) => {
                self.check = None;
                if partner_hash == own_hash {
                    self.end_sync(now, SyncOutcome::NothingNew);
                    CheckAnswered::Spared
                } else {
                    CheckAnswered::Session {
                        peer: running.peer,
                        session: running.session,
                    }
                }
            }
            _ => CheckAnswered::NotWaiting,
        };
        self.debug_check();
        answered
    }

    /// Sync session `session` ended (see [`SyncScheduler::finished`] for how the outcome
    /// sets the next round). A session that already timed out (or any other number) changes
    /// nothing.
    pub fn sync_finished(&mut self, now: Millis, session: u64, outcome: SyncOutcome) {
        if self.running.is_some_and(|r| r.session == session) {
            self.end_sync(now, outcome);
        }
        self.debug_check();
    }

    /// The sync session running now, if any: (peer, number).
    pub fn running_sync(&self) -> Option<(SiteId, u64)> {
        self.running.map(|r| (r.peer, r.session))
    }

    /// When the running round began (its check included), if one runs: its session must end
    /// within `sync_timeout_ms` of this.
    pub fn running_sync_since(&self) -> Option<Millis> {
        self.running.map(|r| r.started)
    }

    fn end_sync(&mut self, now: Millis, outcome: SyncOutcome) {
        self.running = None;
        self.check = None;
        // A round that found something (a catch-up in several rounds, a healed partition)
        // likely has a next one that finds more.
        self.gap_likely |= outcome == SyncOutcome::Received;
        if let Some(sync) = &mut self.sync {
            sync.finished(now, outcome);
        }
    }

    /// Invariants after every input (debug builds: the simulator and the model check them in
    /// every state they reach).
    fn debug_check(&self) {
        debug_assert!(
            self.running.is_none() || self.sync.is_some(),
            "a sync session runs only when this node schedules them"
        );
        debug_assert!(
            self.running.is_none_or(|r| r.session <= self.sessions),
            "a running session has a number already given out"
        );
        debug_assert!(
            self.check.is_none() || self.running.is_some(),
            "a check waits only for the running round"
        );
        debug_assert!(
            self.silent.keys().all(|site| self.members.contains(site)),
            "a partner left silent is not a member"
        );
        debug_assert!(
            self.rejoin.is_none() || self.members.is_empty(),
            "announces are scheduled only while no member is known"
        );
        debug_assert!(
            !self.gap_likely || self.sync.is_some(),
            "a gap is noted only for a node that schedules sync"
        );
        debug_assert!(
            !self.active || self.sync.is_some(),
            "activity is noted only for a node that schedules sync"
        );
    }
}

fn actions(effects: Vec<Effect>) -> Vec<Action> {
    effects
        .into_iter()
        .map(|effect| match effect {
            Effect::Send { to, msg } => Action::Send { to, msg },
            Effect::SendToSome {
                candidates,
                count,
                msg,
            } => Action::SendToSome {
                candidates,
                count,
                msg,
            },
            Effect::Deliver(changeset) => Action::Deliver(changeset),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(n: u8) -> SiteId {
        SiteId([n; 16])
    }

    #[test]
    fn a_node_without_members_is_not_due_again_at_once() {
        // Its sync round stays due (no member to ask): that must not make every tick due.
        let mut p = Protocol::new(site(1), ProtocolConfig::default(), Millis(0), 1);
        for now in [0, 600, 700, 2_000, 5_000] {
            p.tick(Millis(now));
            assert!(p.next_due() > Millis(now), "due again at once at {now} ms");
        }
    }

    /// Ticks every 10 ms from `from` to `to`; every sync round started ends at once with
    /// `outcome`. Returns when the rounds started.
    fn run(p: &mut Protocol, from: u64, to: u64, outcome: SyncOutcome) -> Vec<u64> {
        let mut started = Vec::new();
        for now in (from..to).step_by(10) {
            for (_, session) in syncs(&p.tick(Millis(now))) {
                started.push(now);
                p.sync_finished(Millis(now), session, outcome);
            }
        }
        started
    }

    #[test]
    fn an_announcement_brings_a_backed_off_sync_round_back() {
        let config = ProtocolConfig {
            sync_interval_ms: Some(100),
            ..ProtocolConfig::default()
        };
        let mut p = Protocol::new(site(1), config, Millis(0), 1);
        p.peer_up(site(2));
        let quiet = run(&mut p, 0, 6_000, SyncOutcome::NothingNew);
        let gaps: Vec<u64> = quiet.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(
            gaps.iter().rev().take(3).all(|gap| *gap >= 800),
            "quiet rounds did not back off: {gaps:?}"
        );
        // A peer announces a changeset this node has not seen.
        let announced = crate::change::PartId {
            id: crate::change::ChangesetId {
                site: site(2),
                version: crate::ids::DbVersion(1),
            },
            start: crate::ids::Seq(0),
        };
        // Within an interval and its jitter (a quarter of it at most): counted from the last
        // round's end, which keeps each node's own phase.
        p.receive(Millis(6_000), site(2), BroadcastMsg::IHave(vec![announced]));
        assert!(
            p.next_due() <= Millis(6_000 + 100 + 25),
            "the announcement did not bring the round within an interval"
        );
        let next = run(&mut p, 6_000, 7_000, SyncOutcome::NothingNew);
        assert!(
            next.first().is_some_and(|at| *at <= 6_000 + 100 + 25 + 10),
            "the next round did not come back to the interval: {next:?}"
        );
    }

    #[test]
    fn an_announcement_of_what_this_node_has_leaves_the_back_off() {
        // Lazy peers announce every write to every node, nearly always after the tree
        // delivered it: such an announcement is no sign of a gap, and taking it for one kept
        // a cluster that writes now and then syncing at the full rate.
        let config = ProtocolConfig {
            sync_interval_ms: Some(100),
            ..ProtocolConfig::default()
        };
        let mut p = Protocol::new(site(1), config, Millis(0), 1);
        p.peer_up(site(2));
        let delivered = changeset(site(2), 1);
        let _ = p.receive(Millis(0), site(2), BroadcastMsg::Gossip(delivered.clone()));
        let _ = run(&mut p, 0, 6_000, SyncOutcome::NothingNew);
        let due = p.next_due();
        assert!(due >= Millis(6_000 + 100 + 25), "not backed off: {due:?}");
        p.receive(
            Millis(6_000),
            site(2),
            BroadcastMsg::IHave(vec![delivered.part_id()]),
        );
        let next = run(&mut p, 6_000, 7_000, SyncOutcome::NothingNew);
        assert!(
            next.first().is_some_and(|at| Millis(*at) >= due),
            "an announcement of a delivered changeset brought the round in: {next:?}, due {due:?}"
        );
        // One id it lacks among them is a likely gap.
        let _ = run(&mut p, 7_000, 12_000, SyncOutcome::NothingNew);
        p.receive(
            Millis(12_000),
            site(2),
            BroadcastMsg::IHave(vec![delivered.part_id(), changeset(site(2), 2).part_id()]),
        );
        let next = run(&mut p, 12_000, 13_000, SyncOutcome::NothingNew);
        assert!(
            next.first().is_some_and(|at| *at <= 12_000 + 100 + 25 + 10),
            "an announcement of a missing changeset: {next:?}"
        );
    }

    fn changeset(site: SiteId, version: u64) -> Arc<Changeset> {
        Arc::new(Changeset::whole(
            crate::change::ChangesetId {
                site,
                version: crate::ids::DbVersion(version),
            },
            Vec::new(),
        ))
    }

    #[test]
    fn deliveries_shorten_the_back_off_and_a_skipped_version_ends_it() {
        let config = ProtocolConfig {
            sync_interval_ms: Some(100),
            ..ProtocolConfig::default()
        };
        let mut p = Protocol::new(site(1), config, Millis(0), 1);
        p.peer_up(site(2));
        let _ = run(&mut p, 0, 6_000, SyncOutcome::NothingNew);
        // The cluster writes: deliveries every 50 ms, rounds that find nothing. Rounds come
        // every two intervals (plus jitter), not every one, and not every eight.
        let mut started = Vec::new();
        for (n, now) in (6_000..9_000).step_by(50).enumerate() {
            let _ = p.receive(
                Millis(now),
                site(2),
                BroadcastMsg::KeptGossip(changeset(site(2), n as u64 + 1)),
            );
            for (_, session) in syncs(&p.tick(Millis(now))) {
                started.push(now);
                p.sync_finished(Millis(now), session, SyncOutcome::NothingNew);
            }
        }
        let waits: Vec<u64> = started.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(started.len() >= 8, "rounds while delivering: {started:?}");
        assert!(
            waits.iter().all(|w| (200..=300).contains(w)),
            "rounds while delivering: {waits:?}"
        );
        // Then the writes stop and the back-off grows again; a version skipped ends it.
        let quiet = run(&mut p, 9_000, 15_000, SyncOutcome::NothingNew);
        assert!(quiet.windows(2).last().is_some_and(|w| w[1] - w[0] >= 800));
        p.versions_missing();
        let next = run(&mut p, 15_000, 16_000, SyncOutcome::NothingNew);
        assert!(
            next.first().is_some_and(|at| *at <= 15_000 + 100 + 10),
            "a gap did not bring the next round within the interval: {next:?}"
        );
    }

    fn synced(p: &mut Protocol, changesets: &[Arc<Changeset>]) -> Vec<Action> {
        p.sync_answered(Millis(30), 0, changesets.len(), changesets)
    }

    #[test]
    fn what_a_small_sync_round_brings_is_broadcast_again_once() {
        let mut p = Protocol::new(site(1), ProtocolConfig::default(), Millis(0), 1);
        p.peer_up(site(2));
        p.peer_up(site(3));
        // Site 2 asked this node to feed it (a kept link).
        let _ = p.receive(Millis(10), site(2), BroadcastMsg::Keep);
        let pushed = |actions: &[Action]| -> usize {
            actions
                .iter()
                .filter(|a| matches!(a, Action::Send { to, msg: BroadcastMsg::KeptGossip(_) } if *to == site(2)))
                .count()
        };
        let missed = changeset(site(3), 1);
        assert_eq!(
            pushed(&synced(&mut p, std::slice::from_ref(&missed))),
            1,
            "not passed on"
        );
        assert_eq!(pushed(&synced(&mut p, &[missed])), 0, "passed on twice");
        // Delivered by broadcast already: nothing to pass on.
        let _ = p.receive(
            Millis(20),
            site(3),
            BroadcastMsg::KeptGossip(changeset(site(3), 2)),
        );
        assert_eq!(pushed(&synced(&mut p, &[changeset(site(3), 2)])), 0);
        // A catch-up (more than SYNC_RELAY_MAX at once) is not passed on.
        let many: Vec<Arc<Changeset>> = (10..11 + SYNC_RELAY_MAX as u64)
            .map(|v| changeset(site(3), v))
            .collect();
        assert_eq!(pushed(&synced(&mut p, &many)), 0);
    }

    #[test]
    fn a_round_that_only_races_the_broadcast_finds_nothing() {
        let config = ProtocolConfig {
            sync_interval_ms: Some(100),
            ..ProtocolConfig::default()
        };
        let mut p = Protocol::new(site(1), config, Millis(0), 1);
        p.peer_up(site(2));
        let mut version = 0;
        let mut rounds = Vec::new();
        // Every round brings one changeset broadcast had just delivered: quiet, so it backs
        // off (to the two intervals deliveries allow).
        for now in (0..6_000).step_by(10) {
            for (_, session) in syncs(&p.tick(Millis(now))) {
                version += 1;
                let raced = changeset(site(2), version);
                let _ = p.receive(
                    Millis(now),
                    site(2),
                    BroadcastMsg::KeptGossip(raced.clone()),
                );
                let _ = p.sync_answered(Millis(now), session, 1, &[raced]);
                rounds.push(now);
            }
        }
        let waits: Vec<u64> = rounds.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(
            waits.iter().rev().take(3).all(|w| *w >= 200),
            "a raced round counted as a find: {waits:?}"
        );
        // A round that brings what broadcast never delivered keeps the interval.
        let mut rounds = Vec::new();
        for now in (6_000..9_000).step_by(10) {
            for (_, session) in syncs(&p.tick(Millis(now))) {
                version += 1;
                let _ = p.sync_answered(Millis(now), session, 1, &[changeset(site(2), version)]);
                rounds.push(now);
            }
        }
        let waits: Vec<u64> = rounds.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(
            waits.iter().rev().take(3).all(|w| *w <= 130),
            "a find did not keep the interval: {waits:?}"
        );
    }

    fn syncs(actions: &[Action]) -> Vec<(SiteId, u64)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::StartSync { peer, session }
                | Action::AskSyncCheck { peer, session, .. } => Some((*peer, *session)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn one_sync_session_at_a_time_and_a_lost_one_times_out() {
        let config = ProtocolConfig {
            sync_interval_ms: Some(100),
            sync_timeout_ms: 1_000,
            sync_check_wait_ms: None,
            ..ProtocolConfig::default()
        };
        let mut p = Protocol::new(site(0), config, Millis(0), 7);
        p.peer_up(site(1));
        p.peer_up(site(2));
        let first = syncs(&p.tick(Millis(200)));
        assert_eq!(first.len(), 1);
        let (_, session) = first[0];
        // While it runs, no second session starts.
        assert!(syncs(&p.tick(Millis(400))).is_empty());
        // Its answer never comes: after the timeout it counts as failed, and the next round
        // starts an interval later.
        assert!(syncs(&p.tick(Millis(1_300))).is_empty());
        assert_eq!(p.running_sync(), None);
        let second = syncs(&p.tick(Millis(1_600)));
        assert_eq!(second.len(), 1);
        assert_ne!(second[0].1, session);
        // The late report of the first session changes nothing.
        p.sync_finished(Millis(1_650), session, SyncOutcome::NothingNew);
        assert_eq!(p.running_sync(), Some(second[0]));
        p.sync_finished(Millis(1_700), second[0].1, SyncOutcome::NothingNew);
        assert_eq!(p.running_sync(), None);
    }

    /// The check's nonce and round, if `actions` asks one.
    fn asked(actions: &[Action]) -> Option<(SiteId, u64, u64)> {
        actions.iter().find_map(|a| match a {
            Action::AskSyncCheck {
                peer,
                session,
                nonce,
            } => Some((*peer, *session, *nonce)),
            _ => None,
        })
    }

    /// Ticks from `from` ms, ending every round that opens a session with nothing new, until
    /// one asks a check; returns when, and the check.
    fn first_check(p: &mut Protocol, from: u64) -> (u64, (SiteId, u64, u64)) {
        for ms in (from..from + 60_000).step_by(10) {
            let out = p.tick(Millis(ms));
            if let Some(check) = asked(&out) {
                return (ms, check);
            }
            for (_, session) in syncs(&out) {
                p.sync_finished(Millis(ms), session, SyncOutcome::NothingNew);
            }
        }
        panic!("no check in a minute");
    }

    fn check_config() -> ProtocolConfig {
        ProtocolConfig {
            sync_interval_ms: Some(100),
            sync_timeout_ms: 10_000,
            sync_check_wait_ms: Some(1_000),
            ..ProtocolConfig::default()
        }
    }

    #[test]
    fn a_round_asks_first_and_ends_at_an_equal_answer() {
        let mut p = Protocol::new(site(0), check_config(), Millis(0), 7);
        p.peer_up(site(1));
        let (at, (peer, session, nonce)) = first_check(&mut p, 0);
        assert!(
            at <= 200,
            "the member's arrival brought a round in, with its check"
        );
        assert_eq!(peer, site(1));
        assert_eq!(p.running_sync(), Some((peer, session)));
        // An answer with another nonce is for no round.
        assert_eq!(
            p.sync_check_answered(Millis(at + 10), nonce ^ 1, 5, 5),
            CheckAnswered::NotWaiting
        );
        assert_eq!(
            p.sync_check_answered(Millis(at + 20), nonce, 5, 5),
            CheckAnswered::Spared
        );
        assert_eq!(p.running_sync(), None, "spared: the round ended");
        assert_eq!(
            p.sync_check_answered(Millis(at + 30), nonce, 5, 5),
            CheckAnswered::NotWaiting,
            "answered twice"
        );
        // The next round asks again, with another nonce; a different hash opens its session.
        let (at, next) = first_check(&mut p, at + 40);
        assert_ne!(next.2, nonce);
        assert_eq!(
            p.sync_check_answered(Millis(at), next.2, 5, 6),
            CheckAnswered::Session {
                peer: site(1),
                session: next.1
            }
        );
        assert_eq!(p.running_sync(), Some((site(1), next.1)));
        p.sync_finished(Millis(at + 10), next.1, SyncOutcome::NothingNew);
        assert_eq!(p.running_sync(), None);
    }

    #[test]
    fn a_round_after_a_likely_gap_opens_its_session_without_the_check() {
        let mut p = Protocol::new(site(0), check_config(), Millis(0), 7);
        p.peer_up(site(1));
        let (at, (_, session, nonce)) = first_check(&mut p, 0);
        assert_eq!(
            p.sync_check_answered(Millis(at), nonce, 1, 1),
            CheckAnswered::Spared
        );
        assert_eq!(p.running_sync(), None);
        let _ = session;
        // A gap in the bookkeeping: the next round goes straight to its session, which finds
        // something, so the one after it does too; the third asks again.
        p.versions_missing();
        let mut opened = Vec::new();
        for ms in (at + 10..at + 5_000).step_by(10) {
            let out = p.tick(Millis(ms));
            if let Some((_, session)) = syncs(&out).first().copied() {
                opened.push(asked(&out).is_none());
                let outcome = if opened.len() == 1 {
                    SyncOutcome::Received
                } else {
                    SyncOutcome::NothingNew
                };
                p.sync_finished(Millis(ms), session, outcome);
                if opened.len() == 3 {
                    break;
                }
            }
        }
        assert_eq!(opened, [true, true, false]);
    }

    #[test]
    fn an_unanswered_check_opens_the_session_and_leaves_the_partner_unasked_a_while() {
        let mut p = Protocol::new(site(0), check_config(), Millis(0), 7);
        p.peer_up(site(1));
        let (at, (_, session, nonce)) = first_check(&mut p, 0);
        assert!(syncs(&p.tick(Millis(at + 900))).is_empty(), "still waiting");
        assert!(p.next_due() <= Millis(at + 1_000), "the wait's end is due");
        let opened: Vec<Action> = p
            .tick(Millis(at + 1_000))
            .into_iter()
            .filter(|a| matches!(a, Action::StartSync { .. } | Action::AskSyncCheck { .. }))
            .collect();
        assert_eq!(
            opened,
            vec![Action::StartSync {
                peer: site(1),
                session
            }]
        );
        // The answer comes after all: the session runs already.
        assert_eq!(
            p.sync_check_answered(Millis(at + 1_050), nonce, 5, 5),
            CheckAnswered::NotWaiting
        );
        assert_eq!(p.running_sync(), Some((site(1), session)));
        p.sync_finished(Millis(at + 1_100), session, SyncOutcome::NothingNew);
        // For a minute, the partner's rounds open their session at once...
        let mut rounds = Vec::new();
        let silent_until = at + 1_000 + SYNC_CHECK_SILENT_MS;
        for ms in (at + 1_110..silent_until).step_by(10) {
            for action in p.tick(Millis(ms)) {
                if let Action::StartSync { session, .. } = action {
                    rounds.push(ms);
                    p.sync_finished(Millis(ms), session, SyncOutcome::NothingNew);
                }
                assert!(
                    !matches!(action, Action::AskSyncCheck { .. }),
                    "asked at {ms}"
                );
            }
        }
        assert!(!rounds.is_empty());
        // ... then it is asked again.
        let (again, _) = first_check(&mut p, silent_until);
        assert!(again < silent_until + 2_000, "asked again only at {again}");
    }

    #[test]
    fn a_member_that_leaves_is_forgotten_with_its_silence_and_the_wait_fits_the_timeout() {
        let config = ProtocolConfig {
            // A wait as long as the timeout is cut to half of it.
            sync_timeout_ms: 2_000,
            sync_check_wait_ms: Some(2_000),
            ..check_config()
        };
        let mut p = Protocol::new(site(0), config, Millis(0), 7);
        p.peer_up(site(1));
        let (at, (_, session, _)) = first_check(&mut p, 0);
        assert!(p.running_sync_asked());
        assert!(syncs(&p.tick(Millis(at + 990))).is_empty(), "still waiting");
        let out = p.tick(Millis(at + 1_000));
        assert!(out.contains(&Action::StartSync {
            peer: site(1),
            session
        }));
        assert_eq!(p.running_sync(), Some((site(1), session)));
        assert!(p.silent.contains_key(&site(1)));
        p.peer_down(site(1));
        assert!(p.silent.is_empty());
    }

    #[test]
    fn without_checks_a_round_opens_its_session_and_answers_nothing() {
        let config = ProtocolConfig {
            sync_interval_ms: Some(100),
            sync_check_wait_ms: None,
            ..ProtocolConfig::default()
        };
        let mut p = Protocol::new(site(0), config, Millis(0), 7);
        assert!(!p.answers_sync_checks());
        p.peer_up(site(1));
        let out = p.tick(Millis(200));
        assert!(asked(&out).is_none());
        assert_eq!(syncs(&out).len(), 1);
        assert_eq!(
            p.sync_check_answered(Millis(210), 0, 5, 5),
            CheckAnswered::NotWaiting
        );
    }

    #[test]
    fn only_members_reported_up_count_for_sync_and_rejoin() {
        let config = ProtocolConfig {
            sync_interval_ms: Some(100),
            broadcast: BroadcastConfig {
                // The tree takes senders it hears from into its peer lists.
                eager_peers_max: 2,
                lazy_peers_max: 2,
                ..BroadcastConfig::default()
            },
            ..ProtocolConfig::default()
        };
        let mut p = Protocol::new(site(0), config, Millis(0), 3);
        p.peer_up(site(1));
        assert!(syncs(&p.tick(Millis(200)))
            .iter()
            .all(|(peer, _)| *peer == site(1)));
        p.peer_down(site(1));
        let _ = p.tick(Millis(300));
        // A changeset from a peer membership never reported: broadcast takes it in, but it
        // is no member here, so the node still announces itself and syncs with no one.
        let changeset = Arc::new(Changeset::whole(
            crate::change::ChangesetId {
                site: site(9),
                version: crate::ids::DbVersion(1),
            },
            Vec::new(),
        ));
        let _ = p.receive(Millis(350), site(9), BroadcastMsg::Gossip(changeset));
        p.sync_finished(Millis(360), 1, SyncOutcome::NothingNew);
        let mut announced = false;
        for ms in (400..5_000).step_by(100) {
            let out = p.tick(Millis(ms));
            assert!(syncs(&out).is_empty(), "no sync with a non-member");
            announced |= out.contains(&Action::Announce);
        }
        assert!(announced);
    }

    #[test]
    fn no_sync_without_members_or_without_a_schedule() {
        let mut p = Protocol::new(site(0), ProtocolConfig::default(), Millis(0), 1);
        assert!(syncs(&p.tick(Millis(10_000))).is_empty());
        let unscheduled = ProtocolConfig {
            sync_interval_ms: None,
            ..ProtocolConfig::default()
        };
        let mut p = Protocol::new(site(0), unscheduled, Millis(0), 1);
        p.peer_up(site(1));
        assert!(syncs(&p.tick(Millis(10_000))).is_empty());
    }

    #[test]
    fn a_lonely_node_announces_again_less_and_less_often() {
        let mut p = Protocol::new(site(0), ProtocolConfig::default(), Millis(0), 1);
        let mut announced = Vec::new();
        for ms in (0..70_000).step_by(100) {
            if p.tick(Millis(ms)).contains(&Action::Announce) {
                announced.push(ms);
            }
        }
        assert_eq!(announced, [1_000, 3_000, 7_000, 15_000, 31_000, 61_000]);
        // A member: no more announces; losing it starts the waits over.
        p.peer_up(site(1));
        assert!(!p.tick(Millis(100_000)).contains(&Action::Announce));
        p.peer_down(site(1));
        let mut again = Vec::new();
        for ms in (100_100..104_000).step_by(100) {
            if p.tick(Millis(ms)).contains(&Action::Announce) {
                again.push(ms);
            }
        }
        assert_eq!(again, [101_100, 103_100]);
    }

    // The engine's path for a message in bytes (`receive_message`: a seen copy known from
    // its head, anything else decoded whole) against decoding every message whole and calling
    // `receive`: the same answers and the same state after every step, over copies of seen and
    // unseen changesets, whole or parts, over tree and kept links, from the node itself, other
    // broadcast messages and SWIM packets, with bytes flipped or cut. The one difference
    // allowed: a copy whose head names a changeset already seen while its changes do not
    // decode is a duplicate on the engine's path, where the whole decode refuses it; it must
    // then be exactly what receiving that seen changeset again does.
    mod received_bytes {
        use std::collections::HashMap;

        use proptest::prelude::*;

        use super::*;
        use crate::change::{Change, ChangesetId, Column, PartId, SeqSpan};
        use crate::ids::{CausalLength, ColVersion, DbVersion, Seq};
        use crate::pk::PackedPk;
        use crate::value::Value;
        use crate::wire::encode_peer_message;

        const CLUSTER: u16 = 7;

        /// Changesets of authors 2..=4, versions 1..=3, three changes each (so a flipped byte
        /// often lands in the changes after an intact head); the third version of each author
        /// is sent as two parts.
        fn pool() -> Vec<Arc<Changeset>> {
            let pk = PackedPk::pack(&[Value::Integer(7)]).unwrap();
            let mut out = Vec::new();
            for author in 2..=4u8 {
                for version in 1..=3u64 {
                    let change = |column: Column, value: Value, seq: u32| Change {
                        table: "hosts".into(),
                        pk: pk.clone(),
                        column,
                        value,
                        col_version: ColVersion(version),
                        cl: CausalLength(1),
                        seq: Seq(seq),
                    };
                    let changes = vec![
                        change(Column::Sentinel, Value::Null, 0),
                        change(Column::Name("name".into()), Value::from("web-1"), 1),
                        change(Column::Name("port".into()), Value::Integer(8080), 2),
                    ];
                    let id = ChangesetId {
                        site: site(author),
                        version: DbVersion(version),
                    };
                    if version < 3 {
                        out.push(Arc::new(Changeset::whole(id, changes)));
                        continue;
                    }
                    let (first, second) = changes.split_at(2);
                    for (part, start, end) in [(first, 0, 1), (second, 2, 2)] {
                        let mut cs = Changeset::whole(id, part.to_vec());
                        cs.span = SeqSpan {
                            start: Seq(start),
                            end: Seq(end),
                            last: Seq(2),
                        };
                        out.push(Arc::new(cs));
                    }
                }
            }
            out
        }

        #[derive(Debug, Clone)]
        enum Step {
            /// A message from `from` (1 is the node itself), of `kind`, about pool entry
            /// `entry`, its bytes changed by `damage`, `wait` ms after the last step.
            Message {
                from: u8,
                kind: u8,
                entry: usize,
                damage: Damage,
                wait: u64,
            },
            /// The node's timers run (grafts of announced ids, sync rounds).
            Tick { wait: u64 },
        }

        #[derive(Debug, Clone)]
        enum Damage {
            None,
            /// The byte at this fraction of the message (in 1/256ths) xored with a non-zero.
            Flip(u8, u8),
            /// Cut at this fraction of the message.
            Cut(u8),
        }

        fn step() -> impl Strategy<Value = Step> {
            let damage = prop_oneof![
                3 => Just(Damage::None),
                2 => (any::<u8>(), 1..=255u8).prop_map(|(at, x)| Damage::Flip(at, x)),
                1 => any::<u8>().prop_map(Damage::Cut),
            ];
            prop_oneof![
                9 => (1..=5u8, 0..9u8, 0..12usize, damage, 0..300u64).prop_map(
                    |(from, kind, entry, damage, wait)| Step::Message {
                        from,
                        kind,
                        entry,
                        damage,
                        wait
                    }
                ),
                1 => (0..3_000u64).prop_map(|wait| Step::Tick { wait }),
            ]
        }

        fn message(from: u8, kind: u8, cs: &Arc<Changeset>) -> PeerMessage {
            let ids = vec![cs.part_id()];
            let msg = match kind {
                0 | 1 => BroadcastMsg::Gossip(cs.clone()),
                2 => BroadcastMsg::KeptGossip(cs.clone()),
                3 => BroadcastMsg::IHave(ids),
                4 => BroadcastMsg::Graft(ids),
                5 => BroadcastMsg::Prune,
                6 => BroadcastMsg::Keep,
                7 => BroadcastMsg::Ping(u64::from(from)),
                _ => return PeerMessage::Membership(vec![from, kind, 1, 2]),
            };
            PeerMessage::Broadcast {
                from: site(from),
                msg,
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]
            #[test]
            fn receiving_bytes_is_decoding_and_receiving(
                seed in any::<u64>(),
                steps in proptest::collection::vec(step(), 1..60),
            ) {
                let limits = Limits::default();
                let pool = pool();
                let config = ProtocolConfig {
                    sync_interval_ms: Some(500),
                    ..ProtocolConfig::default()
                };
                let mut engine = Protocol::new(site(1), config, Millis(0), seed);
                for peer in 2..=5 {
                    engine.peer_up(site(peer));
                }
                let mut whole = engine.clone();
                // Every copy the whole decode handed to `receive`, by part id.
                let mut received: HashMap<PartId, Arc<Changeset>> = HashMap::new();
                let mut now = 0;
                for step in steps {
                    match step {
                        Step::Tick { wait } => {
                            now += wait;
                            prop_assert_eq!(engine.tick(Millis(now)), whole.tick(Millis(now)));
                        }
                        Step::Message { from, kind, entry, damage, wait } => {
                            now += wait;
                            let mut bytes = encode_peer_message(CLUSTER, &message(from, kind, &pool[entry]));
                            let at = |frac: u8, len: usize| len * usize::from(frac) / 256;
                            match damage {
                                Damage::None => {}
                                Damage::Flip(frac, x) => {
                                    let i = at(frac, bytes.len());
                                    bytes[i] ^= x;
                                }
                                Damage::Cut(frac) => bytes.truncate(at(frac, bytes.len())),
                            }
                            let got = engine.receive_message(Millis(now), &bytes, CLUSTER, &limits);
                            let expected = match decode_peer_message(&bytes, CLUSTER, &limits) {
                                Ok(PeerMessage::Membership(packet)) => Ok(ReceivedMessage::Membership(packet)),
                                Ok(PeerMessage::SyncCheck { nonce }) => Ok(ReceivedMessage::SyncCheck { nonce }),
                                Ok(PeerMessage::SyncCheckAnswer { nonce, hash }) => Ok(ReceivedMessage::SyncCheckAnswer { nonce, hash }),
                                Ok(PeerMessage::Broadcast { from, msg }) => {
                                    if let BroadcastMsg::Gossip(cs) | BroadcastMsg::KeptGossip(cs) = &msg {
                                        received.insert(cs.part_id(), cs.clone());
                                    }
                                    Ok(ReceivedMessage::Broadcast { from, actions: whole.receive(Millis(now), from, msg) })
                                }
                                Err(refused) => match &got {
                                    Ok(ReceivedMessage::Broadcast { .. }) => {
                                        // Only a seen copy, handled as that copy again.
                                        let copy = peek_gossip_copy(&bytes, CLUSTER, &limits);
                                        prop_assert!(copy.is_some(), "handled bytes the decode refuses ({refused}) and the head does not read");
                                        let copy = copy.unwrap();
                                        let seen = received.get(&copy.part);
                                        prop_assert!(seen.is_some(), "a refused copy of an unseen changeset was handled");
                                        let seen = seen.unwrap().clone();
                                        let msg = if copy.kept {
                                            BroadcastMsg::KeptGossip(seen)
                                        } else {
                                            BroadcastMsg::Gossip(seen)
                                        };
                                        Ok(ReceivedMessage::Broadcast {
                                            from: copy.from,
                                            actions: whole.receive(Millis(now), copy.from, msg),
                                        })
                                    }
                                    _ => Err(refused),
                                },
                            };
                            prop_assert_eq!(got, expected);
                            prop_assert_eq!(&engine, &whole);
                        }
                    }
                }
            }
        }
    }
}
