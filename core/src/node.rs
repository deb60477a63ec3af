//! A whole replica without I/O: the in-memory store ([`MemReplica`] and its [`Bookkeeping`])
//! driven by the [`Protocol`] the engine runs. The simulator runs thousands of these; the model
//! checker explores every interleaving of a few.
//!
//! This is a driver of [`Protocol`] like the engine's gossip task, with maps where the engine
//! has SQLite and messages where it has QUIC streams: delivered changesets go through the one
//! apply rule ([`apply_changeset`]), a sync session is a [`NodeMsg::SyncRequest`] answered with
//! [`versions_to_send`] and the changesets read back from the replica, and a round's sync
//! check is a [`NodeMsg::SyncCheck`] answered with the replica's state hash.

use std::sync::Arc;

use crate::apply::{apply_changeset, Applied, ApplyFaults, ApplyTarget, PartStep};
use crate::broadcast::{BroadcastMsg, Millis};
use crate::change::{Changeset, ChangesetId};
use crate::chunk::{PartOutcome, Reassembly};
use crate::ids::{DbVersion, SiteId};
use crate::mem::MemReplica;
use crate::merge::MergeFaults;
use crate::protocol::{Action, CheckAnswered, Protocol, ProtocolConfig};
use crate::sync::{versions_to_send, SyncState};
use crate::validate::validate_changeset;
use crate::versions::Bookkeeping;

/// The in-memory replica and its parts buffer, as the apply rule sees them.
struct MemTarget<'a> {
    replica: &'a mut MemReplica,
    parts: &'a mut Reassembly,
}

impl ApplyTarget for MemTarget<'_> {
    type Rejection = ();
    type Error = std::convert::Infallible;
    type Merged = ();

    fn keep_part(&mut self, part: &Changeset) -> Result<PartStep<()>, Self::Error> {
        Ok(match self.parts.add(part) {
            PartOutcome::Complete(whole) => PartStep::Complete(whole),
            PartOutcome::Buffered => PartStep::Buffered,
            PartOutcome::Dropped => PartStep::Rejected(()),
        })
    }

    fn forget_parts(&mut self, id: ChangesetId) -> Result<(), Self::Error> {
        self.parts.forget(&id);
        Ok(())
    }

    fn merge(&mut self, whole: &Changeset) -> Result<Result<(), ()>, Self::Error> {
        if validate_changeset(whole).is_err() {
            return Ok(Err(()));
        }
        self.replica.apply_changeset(whole);
        Ok(Ok(()))
    }
}

/// A message between two nodes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NodeMsg {
    /// Broadcast traffic.
    Broadcast(BroadcastMsg),
    /// "This is what I have": the start of sync session `.0` (0 for sessions the caller starts
    /// itself, as the model does).
    SyncRequest(u64, SyncState),
    /// The changesets the requester of session `.0` lacked.
    SyncReply(u64, Vec<Arc<Changeset>>),
    /// A sync check: "what is your state hash?", with the question's nonce.
    SyncCheck(u64),
    /// The answer to the check with nonce `.0`: the answering node's state hash.
    SyncCheckAnswer(u64, u64),
}

/// What the caller must do.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Output {
    /// Send a message to a peer.
    Send {
        /// The peer.
        to: SiteId,
        /// The message.
        msg: NodeMsg,
    },
    /// A remote changeset was applied here (for latency and coverage reports).
    Applied(ChangesetId),
}

/// Deliberate protocol bugs, for tests that show the checker finds them. All off by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct NodeFaults {
    /// Faults of the merge rule.
    pub merge: MergeFaults,
    /// Sync requests claim every version up to the head (the needs are left out), so a version
    /// that broadcast lost below a later one is never asked for again.
    pub sync_skips_gaps: bool,
    /// The first part of a large changeset marks the whole changeset applied, so its other
    /// parts are skipped as known (a bug of the apply path).
    pub part_marks_applied: bool,
    /// The sync check's hash covers each site's head only, not the versions applied below
    /// it, so a node that lacks a version below its head looks equal to one that has it.
    pub check_hashes_heads_only: bool,
}

/// How a node behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeConfig {
    /// Broadcast, sync scheduling, rejoin.
    pub protocol: ProtocolConfig,
    /// Most changesets one sync reply carries.
    pub sync_versions_max: u64,
    /// Changesets held in parts at once.
    pub partials_max: usize,
    /// Deliberate bugs (tests only).
    pub faults: NodeFaults,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            protocol: ProtocolConfig::default(),
            sync_versions_max: 10_000,
            partials_max: 64,
            faults: NodeFaults::default(),
        }
    }
}

/// What survives a crash: the database (data, clocks, bookkeeping). Broadcast state does not.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Durable {
    /// Rows and clocks.
    pub replica: MemReplica,
    /// Applied versions.
    pub book: Bookkeeping,
}

/// One node.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Node {
    /// Data, clocks and bookkeeping.
    pub durable: Durable,
    /// Protocol state: broadcast, sync scheduling (lost in a crash).
    pub protocol: Protocol,
    /// Parts of large changesets (lost in a crash here; the engine keeps them in SQLite).
    pub parts: Reassembly,
    config: NodeConfig,
}

impl Node {
    /// A node with an empty replica and no peers.
    pub fn new(site: SiteId, config: NodeConfig, seed: u64) -> Node {
        let mut replica = MemReplica::new(site);
        replica.faults = config.faults.merge;
        Node::restart(
            Durable {
                replica,
                book: Bookkeeping::new(),
            },
            config,
            seed,
        )
    }

    /// A node back from a crash: its durable state, fresh protocol state, no peers yet (its
    /// clock starts at zero again).
    pub fn restart(durable: Durable, config: NodeConfig, seed: u64) -> Node {
        Node {
            protocol: Protocol::new(durable.replica.site, config.protocol, Millis(0), seed),
            parts: Reassembly::new(config.partials_max),
            durable,
            config,
        }
    }

    /// This node's site.
    pub fn site(&self) -> SiteId {
        self.durable.replica.site
    }

    /// A member joined.
    pub fn peer_up(&mut self, peer: SiteId) {
        self.protocol.peer_up(peer);
    }

    /// A member left or failed.
    pub fn peer_down(&mut self, peer: SiteId) {
        self.protocol.peer_down(peer);
    }

    /// Runs a local write against the replica (`write` returns its changeset, or None if it
    /// changed nothing), records the version and broadcasts the changeset. Returns the
    /// changeset as committed.
    pub fn write(
        &mut self,
        write: impl FnOnce(&mut MemReplica) -> Option<Changeset>,
    ) -> (Option<Arc<Changeset>>, Vec<Output>) {
        let Some(changeset) = write(&mut self.durable.replica) else {
            return (None, Vec::new());
        };
        let changeset = Arc::new(changeset);
        self.durable.book.mark_applied(changeset.id);
        let actions = self.protocol.local_commit(changeset.clone());
        (Some(changeset), self.outputs(actions))
    }

    /// A message from a peer. `now` drives broadcast timers.
    pub fn receive(&mut self, now: Millis, from: SiteId, msg: NodeMsg) -> Vec<Output> {
        match msg {
            NodeMsg::Broadcast(msg) => {
                let actions = self.protocol.receive(now, from, msg);
                self.outputs(actions)
            }
            NodeMsg::SyncRequest(session, state) => {
                vec![Output::Send {
                    to: from,
                    msg: NodeMsg::SyncReply(session, self.sync_reply(&state)),
                }]
            }
            NodeMsg::SyncReply(session, changesets) => {
                let mut out = Vec::new();
                for changeset in &changesets {
                    if let Some(id) = self.apply(changeset) {
                        out.push(Output::Applied(id));
                    }
                }
                // A late answer to a session that timed out ends nothing (the protocol checks
                // the number), but what it brought is passed on all the same.
                let session = if self.protocol.running_sync() == Some((from, session)) {
                    session
                } else {
                    u64::MAX
                };
                let relayed =
                    self.protocol
                        .sync_answered(now, session, changesets.len(), &changesets);
                out.extend(self.outputs(relayed));
                out
            }
            NodeMsg::SyncCheck(nonce) if self.protocol.answers_sync_checks() => {
                vec![Output::Send {
                    to: from,
                    msg: NodeMsg::SyncCheckAnswer(nonce, self.sync_check_hash()),
                }]
            }
            // A node without checks leaves the question unanswered, as the engine's does.
            NodeMsg::SyncCheck(_) => Vec::new(),
            NodeMsg::SyncCheckAnswer(nonce, hash) => {
                let own = self.sync_check_hash();
                match self.protocol.sync_check_answered(now, nonce, hash, own) {
                    CheckAnswered::Session { peer, session } => {
                        self.outputs(vec![Action::StartSync { peer, session }])
                    }
                    CheckAnswered::Spared | CheckAnswered::NotWaiting => Vec::new(),
                }
            }
        }
    }

    /// The hash this node answers sync checks with, and compares answers to: its
    /// bookkeeping's state hash ([`Bookkeeping::state_hash`]), as the engine's store publishes.
    pub fn sync_check_hash(&self) -> u64 {
        if !self.config.faults.check_hashes_heads_only {
            return self.durable.book.state_hash();
        }
        let mut heads_only = Bookkeeping::default();
        for (site, head) in self.durable.book.heads() {
            heads_only.heard(site, head);
        }
        heads_only.state_hash()
    }

    /// Time passes: broadcast flushes announcements and grafts, a sync round starts when due.
    pub fn tick(&mut self, now: Millis) -> Vec<Output> {
        let actions = self.protocol.tick(now);
        self.outputs(actions)
    }

    /// The request that starts a sync session with a peer (session 0: one the caller starts
    /// itself, not the protocol's schedule).
    pub fn sync_request(&self) -> NodeMsg {
        self.sync_request_for(0)
    }

    fn sync_request_for(&self, session: u64) -> NodeMsg {
        let mut state = SyncState::of(&self.durable.book);
        if self.config.faults.sync_skips_gaps {
            for (_, needs) in state.sites.values_mut() {
                needs.clear();
            }
        }
        NodeMsg::SyncRequest(session, state)
    }

    /// What this node sends a peer whose state is `state`.
    pub fn sync_reply(&self, state: &SyncState) -> Vec<Arc<Changeset>> {
        let mut out = Vec::new();
        for (site, first, last) in
            versions_to_send(&self.durable.book, state, self.config.sync_versions_max)
        {
            for version in first..=last {
                let id = ChangesetId {
                    site,
                    version: DbVersion(version),
                };
                if self.durable.book.contains(id) {
                    // In parts when large, as the engine's sync sessions send them.
                    let whole = self.durable.replica.changeset(id);
                    let part_bytes = self.config.protocol.broadcast.part_bytes;
                    if crate::chunk::estimate_bytes(&whole) <= part_bytes {
                        out.push(Arc::new(whole));
                    } else {
                        out.extend(
                            crate::chunk::split(&whole, part_bytes)
                                .into_iter()
                                .map(Arc::new),
                        );
                    }
                }
            }
        }
        out
    }

    /// Applies a remote changeset (or a part of one) by the rule the store follows too
    /// ([`apply_changeset`]); returns its id if it was applied now.
    pub fn apply(&mut self, changeset: &Changeset) -> Option<ChangesetId> {
        let faults = ApplyFaults {
            part_marks_applied: self.config.faults.part_marks_applied,
        };
        let me = self.site();
        let mut target = MemTarget {
            replica: &mut self.durable.replica,
            parts: &mut self.parts,
        };
        match apply_changeset(&mut target, me, &mut self.durable.book, changeset, faults) {
            Ok(Applied::Merged(id, ())) => Some(id),
            Ok(_) => None,
            Err(never) => match never {},
        }
    }

    fn outputs(&mut self, actions: Vec<Action>) -> Vec<Output> {
        let mut out = Vec::with_capacity(actions.len());
        for action in actions {
            match action {
                Action::Send { to, msg } => out.push(Output::Send {
                    to,
                    msg: NodeMsg::Broadcast(msg),
                }),
                // Every member costs the same here: the first `count`.
                Action::SendToSome {
                    candidates,
                    count,
                    msg,
                } => out.extend(candidates.into_iter().take(count).map(|to| Output::Send {
                    to,
                    msg: NodeMsg::Broadcast(msg.clone()),
                })),
                Action::Deliver(changeset) => {
                    let id = changeset.id;
                    let head = self.durable.book.site(&id.site).map_or(0, |v| v.head.get());
                    if let Some(id) = self.apply(&changeset) {
                        out.push(Output::Applied(id));
                    }
                    if id.version.get() > head + 1 {
                        // Versions between the site's last one and this one are missing here.
                        self.protocol.versions_missing();
                    }
                }
                Action::StartSync { peer, session } => out.push(Output::Send {
                    to: peer,
                    msg: self.sync_request_for(session),
                }),
                Action::AskSyncCheck { peer, nonce, .. } => out.push(Output::Send {
                    to: peer,
                    msg: NodeMsg::SyncCheck(nonce),
                }),
                // Membership is given to this node by its caller: nothing to announce to.
                Action::Announce => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pk::PackedPk;
    use crate::value::Value;

    fn site(n: u8) -> SiteId {
        SiteId([n; 16])
    }

    fn pk(n: i64) -> PackedPk {
        PackedPk::pack(&[Value::Integer(n)]).unwrap()
    }

    /// Delivers every message until none is left, at time 0.
    fn run(nodes: &mut [Node], queue: Vec<(SiteId, Output)>, drop_broadcast: bool) {
        deliver_all(nodes, queue, drop_broadcast, Millis(0));
    }

    /// Delivers every message until none is left, at `now`; returns the messages delivered.
    fn deliver_all(
        nodes: &mut [Node],
        mut queue: Vec<(SiteId, Output)>,
        drop_broadcast: bool,
        now: Millis,
    ) -> Vec<NodeMsg> {
        let mut delivered = Vec::new();
        while let Some((from, output)) = queue.pop() {
            let Output::Send { to, msg } = output else {
                continue;
            };
            if drop_broadcast && matches!(msg, NodeMsg::Broadcast(_)) {
                continue;
            }
            delivered.push(msg.clone());
            assert!(delivered.len() < 100_000, "no quiescence");
            let node = nodes.iter_mut().find(|n| n.site() == to).unwrap();
            let out = node.receive(now, from, msg);
            queue.extend(out.into_iter().map(|o| (to, o)));
        }
        delivered
    }

    fn cluster(n: u8) -> Vec<Node> {
        let mut nodes: Vec<Node> = (0..n)
            .map(|i| Node::new(site(i), NodeConfig::default(), u64::from(i)))
            .collect();
        for a in 0..n {
            for b in 0..n {
                if a != b {
                    nodes[a as usize].peer_up(site(b));
                }
            }
        }
        nodes
    }

    /// Node 0 inserts a row, and its broadcast reaches every node.
    fn insert_everywhere(nodes: &mut [Node]) {
        let values = [("v".to_string(), Value::from("a"))].into_iter().collect();
        let (_, out) = nodes[0].write(|r| Some(r.insert("t", pk(1), values)));
        run(
            nodes,
            out.into_iter().map(|o| (site(0), o)).collect(),
            false,
        );
    }

    /// Ticks `nodes[i]` at `now` and delivers everything that follows; returns the
    /// messages delivered.
    fn tick_and_run(nodes: &mut [Node], i: usize, now: u64) -> Vec<NodeMsg> {
        let queue = nodes[i]
            .tick(Millis(now))
            .into_iter()
            .map(|o| (site(i as u8), o))
            .collect();
        deliver_all(nodes, queue, false, Millis(now))
    }

    #[test]
    fn a_round_between_equal_replicas_ends_at_the_check_and_an_unequal_one_syncs() {
        let mut nodes = cluster(2);
        insert_everywhere(&mut nodes);
        let is_request = |m: &NodeMsg| matches!(m, NodeMsg::SyncRequest(..));
        let is_check = |m: &NodeMsg| matches!(m, NodeMsg::SyncCheck(_));
        // Both hold the write: rounds end at the check, with no request (after the first check:
        // the write's delivery may have raced a session).
        let mut checks = 0;
        for now in (0..10_000).step_by(10) {
            let sent = tick_and_run(&mut nodes, 1, now);
            assert!(
                checks == 0 || !sent.iter().any(is_request),
                "a session at {now} ms"
            );
            checks += sent.iter().filter(|m| is_check(m)).count();
        }
        assert!(checks > 1, "{checks} checks in 10 s");
        // A write whose broadcast is lost: node 1's next round finds a different hash, and its
        // session brings the write.
        let (written, out) = nodes[0].write(|r| r.update("t", pk(1), "v", Value::from("b")));
        run(
            &mut nodes,
            out.into_iter().map(|o| (site(0), o)).collect(),
            true,
        );
        let id = written.unwrap().id;
        let mut requested = false;
        for now in (10_000..30_000).step_by(10) {
            requested |= tick_and_run(&mut nodes, 1, now).iter().any(is_request);
            if nodes[1].durable.book.contains(id) {
                break;
            }
        }
        assert!(requested && nodes[1].durable.book.contains(id));
        assert_eq!(
            nodes[0].durable.replica.visible(),
            nodes[1].durable.replica.visible()
        );
    }

    #[test]
    fn broadcast_reaches_everyone_and_sync_repairs_what_it_lost() {
        let mut nodes = cluster(3);
        insert_everywhere(&mut nodes);
        assert!(nodes.iter().all(|n| n.durable.replica.visible().len() == 1));
        // Lost broadcast: only sync brings the second write.
        let (written, out) = nodes[1].write(|r| r.update("t", pk(1), "v", Value::from("b")));
        let id = written.map(|cs| cs.id);
        run(
            &mut nodes,
            out.into_iter().map(|o| (site(1), o)).collect(),
            true,
        );
        assert!(!nodes[2].durable.book.contains(id.unwrap()));
        let request = nodes[2].sync_request();
        let reply = nodes[1].receive(Millis(0), site(2), request);
        run(
            &mut nodes,
            reply.into_iter().map(|o| (site(1), o)).collect(),
            false,
        );
        assert!(nodes[2].durable.book.contains(id.unwrap()));
        assert_eq!(
            nodes[2].durable.replica.visible(),
            nodes[1].durable.replica.visible()
        );
    }

    #[test]
    fn sync_that_skips_gaps_never_asks_for_a_lost_version() {
        let faulty = NodeConfig {
            faults: NodeFaults {
                sync_skips_gaps: true,
                ..NodeFaults::default()
            },
            ..NodeConfig::default()
        };
        for (config, repaired) in [(NodeConfig::default(), true), (faulty, false)] {
            let mut a = Node::new(site(0), config, 0);
            let mut b = Node::new(site(1), config, 1);
            let values = |v: &str| [("v".to_string(), Value::from(v))].into_iter().collect();
            let (_, _) = a.write(|r| Some(r.insert("t", pk(1), values("a"))));
            let (_, _) = a.write(|r| Some(r.insert("t", pk(2), values("b"))));
            // b got version 2 only.
            let v2 = a.durable.replica.changeset(ChangesetId {
                site: site(0),
                version: DbVersion(2),
            });
            b.apply(&v2);
            let reply = a.sync_reply(match &b.sync_request() {
                NodeMsg::SyncRequest(_, state) => state,
                _ => unreachable!(),
            });
            for cs in reply {
                b.apply(&cs);
            }
            assert_eq!(
                b.durable.replica.visible().len() == 2,
                repaired,
                "{config:?}"
            );
        }
    }
}
