//! A stateright model of Patina's replication protocol, driven by the code that ships.
//!
//! Each actor wraps one `patina_core::node::Node`: the same `Broadcast` state machine, sync
//! functions (`SyncState::of`, `versions_to_send`), bookkeeping and merge rule the engine runs,
//! over the in-memory store `MemReplica`. The checker explores every interleaving of a few local
//! writes (conflicting writes, deletes, re-inserts of one row), broadcast traffic, sync sessions
//! with any peer at any time, message loss, duplication and reordering, and crashes that keep
//! only what a node had written to disk.
//!
//! Time: broadcast needs a clock for grafts. A node handles messages at time 0 and ticks at
//! [`TICK_AT`], one graft timeout later, so an id announced but not received is grafted at the
//! next tick, once; sync repairs whatever is lost after that. Keeping time out of the state keeps
//! the state space finite.
//!
//! Properties (see [`properties`]):
//! - "strong eventual consistency": two nodes that applied the same changesets hold the same
//!   rows and clocks, always;
//! - "convergence": from every reachable state, sync rounds between every pair (fair delivery,
//!   no more loss) make all nodes identical, and every acknowledged write is then held by every
//!   node or beaten by a later write under the merge rule;
//! - "acknowledged writes survive": a node that acknowledged a write still holds it (or
//!   something that beats it), across crashes;
//! - "bookkeeping never claims a version it has not applied".

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use patina_core::broadcast::{BroadcastConfig, Millis};
use patina_core::change::Changeset;
use patina_core::mem::MemReplica;
use patina_core::node::{Durable, Node, NodeConfig, NodeFaults, NodeMsg, Output};
use patina_core::protocol::ProtocolConfig;
use patina_core::sync::SyncState;
use patina_core::{PackedPk, SiteId, Value};
use stateright::actor::{
    model_timeout, Actor, ActorModel, ActorModelState, Id, LossyNetwork, Network, Out,
};
use stateright::{Checker, Expectation, Model};

/// The one table of the model.
pub const TABLE: &str = "t";
/// The one non-key column.
pub const COLUMN: &str = "v";
/// Graft timeout in the model's broadcast configuration.
pub const GRAFT_TIMEOUT_MS: u64 = 1;
/// The time at which nodes tick (messages arrive at time 0).
pub const TICK_AT: Millis = Millis(GRAFT_TIMEOUT_MS);

/// A local write of the scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Write {
    /// Insert (or replace) row `.0` with value `.1`.
    Insert(i64, &'static str),
    /// Insert (or replace) row `.0` giving only its key: the value column keeps its default.
    InsertKey(i64),
    /// Set row `.0`'s value to `.1` if the row is live here.
    Update(i64, &'static str),
    /// Delete row `.0` if it is live here.
    Delete(i64),
}

impl Write {
    /// Runs the write; None if it changed nothing (e.g. an update of a row not live here).
    pub fn run(self, replica: &mut MemReplica) -> Option<Changeset> {
        let pk = |row: i64| PackedPk::pack(&[Value::Integer(row)]).expect("one integer");
        match self {
            Write::Insert(row, value) => Some(replica.insert(
                TABLE,
                pk(row),
                BTreeMap::from([(COLUMN.to_string(), Value::from(value))]),
            )),
            Write::InsertKey(row) => Some(replica.insert(TABLE, pk(row), BTreeMap::new())),
            Write::Update(row, value) => replica.update(TABLE, pk(row), COLUMN, Value::from(value)),
            Write::Delete(row) => replica.delete(TABLE, pk(row)),
        }
    }
}

/// What to check: the nodes' scripts, the network, crashes, and deliberate bugs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scenario {
    /// Name, for reports.
    pub name: &'static str,
    /// One script of local writes per node (2 to 4 nodes).
    pub scripts: Vec<Vec<Write>>,
    /// Messages may be lost.
    pub lossy: bool,
    /// Nodes that may be down at once (each may crash and restart any number of times).
    pub crashes: usize,
    /// Deliberate protocol bugs (all off for the real protocol).
    pub faults: NodeFaults,
    /// Broadcast over kept links (each node asks every other for one, as the agents' far
    /// links) instead of the Plumtree tree.
    pub kept_links: bool,
    /// Every changeset leaves in parts of one change each (broadcast and sync), as large ones
    /// do in the agents.
    pub parts: bool,
}

impl Scenario {
    /// The node configuration every actor uses.
    pub fn node_config(&self) -> NodeConfig {
        let broadcast = if self.kept_links {
            // The agents' default without the tree; near links need measured distance,
            // which the model's clocks do not have, so every link is a far one.
            BroadcastConfig {
                eager_peers_max: 0,
                lazy_peers_max: 0,
                near_peers: 0,
                far_peers: 3,
                probe_interval_ms: 0,
                ..BroadcastConfig::default()
            }
        } else {
            BroadcastConfig {
                // One eager peer, the rest lazy: with 3 nodes both the push path and the
                // announce-and-graft path carry writes.
                eager_peers_max: 1,
                lazy_peers_max: 3,
                graft_timeout_ms: GRAFT_TIMEOUT_MS,
                near_peers: 0,
                far_peers: 0,
                probe_interval_ms: 0,
                ..BroadcastConfig::default()
            }
        };
        let mut config = NodeConfig {
            protocol: ProtocolConfig {
                broadcast,
                // The model starts sync sessions itself, with every peer in every order (a
                // timer per peer), which covers any choice the scheduler could make.
                sync_interval_ms: None,
                ..ProtocolConfig::default()
            },
            faults: self.faults,
            ..NodeConfig::default()
        };
        if self.parts {
            // Below any one change's size: one change per part.
            config.protocol.broadcast.part_bytes = 1;
        }
        config
    }

    /// The stateright model of this scenario.
    pub fn into_model(self) -> ActorModel<PatinaActor, Scenario, ()> {
        let config = self.node_config();
        let nodes = self.scripts.len();
        let actors: Vec<PatinaActor> = self
            .scripts
            .iter()
            .enumerate()
            .map(|(index, script)| PatinaActor {
                index,
                nodes,
                script: script.clone(),
                config,
            })
            .collect();
        let lossy = if self.lossy {
            LossyNetwork::Yes
        } else {
            LossyNetwork::No
        };
        let crashes = self.crashes;
        let model = ActorModel::new(self, ())
            .actors(actors)
            // Unordered and duplicating: any message may arrive any number of times, in any
            // order; with `lossy`, also never.
            .init_network(Network::new_unordered_duplicating([]))
            .lossy_network(lossy)
            .max_crashes(crashes)
            .property(
                Expectation::Always,
                "strong eventual consistency",
                |_, state| properties::strong_eventual_consistency(state),
            )
            .property(Expectation::Always, "convergence", |model, state| {
                properties::converges_under_fair_sync(&model.cfg, state)
            })
            .property(
                Expectation::Always,
                "acknowledged writes survive",
                |_, state| properties::acknowledged_writes_survive(state),
            )
            .property(
                Expectation::Always,
                "bookkeeping never claims a version it has not applied",
                |_, state| properties::bookkeeping_is_truthful(state),
            )
            .property(
                Expectation::Sometimes,
                "every write made",
                |model, state| {
                    state
                        .actor_states
                        .iter()
                        .zip(&model.cfg.scripts)
                        .all(|(s, script)| s.next_write == script.len())
                },
            );
        if crashes == 0 {
            return model;
        }
        model.property(
            Expectation::Sometimes,
            "a node restarted from what it stored",
            |_, state| state.actor_states.iter().any(|s| s.restarted),
        )
    }
}

/// The site of node `index`.
pub fn site(index: usize) -> SiteId {
    SiteId([index as u8 + 1; 16])
}

fn index_of(site: SiteId) -> usize {
    usize::from(site.0[0]) - 1
}

/// One node's state in the model.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeState {
    /// The core node.
    pub node: Node,
    /// Next write of the script.
    pub next_write: usize,
    /// The writes this node acknowledged, as committed.
    pub acked: Vec<Arc<Changeset>>,
    /// This node came back from a crash (with what it had stored).
    pub restarted: bool,
}

/// What survives a crash: the database and the script position.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Stored {
    /// Rows, clocks, bookkeeping.
    pub durable: Durable,
    /// Next write of the script.
    pub next_write: usize,
    /// The writes acknowledged.
    pub acked: Vec<Arc<Changeset>>,
}

/// The model's timers.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Timer {
    /// Make the next write of the script.
    Write,
    /// Broadcast tick: flush announcements, graft missing ids.
    Tick,
    /// Start a sync session with this peer.
    Sync(usize),
}

/// A model actor: one core node and its script.
#[derive(Debug, Clone)]
pub struct PatinaActor {
    index: usize,
    nodes: usize,
    script: Vec<Write>,
    config: NodeConfig,
}

impl PatinaActor {
    fn send(&self, outputs: Vec<Output>, o: &mut Out<Self>) {
        for output in outputs {
            if let Output::Send { to, msg } = output {
                o.send(Id::from(index_of(to)), msg);
            }
        }
    }

    fn save(state: &NodeState, o: &mut Out<Self>) {
        o.save(Stored {
            durable: state.node.durable.clone(),
            next_write: state.next_write,
            acked: state.acked.clone(),
        });
    }

    /// Runs `step` on a copy of the state; keeps it only if something changed, so no-op
    /// events stay no-ops for the checker. Broadcast counters are dropped: they only grow
    /// and would make every state unique.
    fn step(
        &self,
        state: &mut Cow<NodeState>,
        o: &mut Out<Self>,
        step: impl FnOnce(&mut NodeState) -> Vec<Output>,
    ) {
        let mut next = (**state).clone();
        let outputs = step(&mut next);
        next.node.protocol.take_stats();
        let durable_changed = next.node.durable != state.node.durable;
        if next != **state {
            if durable_changed || next.next_write != state.next_write {
                Self::save(&next, o);
            }
            *state.to_mut() = next;
        }
        self.send(outputs, o);
    }
}

impl Actor for PatinaActor {
    type Msg = NodeMsg;
    type State = NodeState;
    type Timer = Timer;
    type Storage = Stored;
    type Random = ();

    fn on_start(&self, _id: Id, storage: &Option<Stored>, o: &mut Out<Self>) -> NodeState {
        let (mut node, next_write, acked) = match storage {
            Some(stored) => (
                Node::restart(stored.durable.clone(), self.config, 0),
                stored.next_write,
                stored.acked.clone(),
            ),
            None => (Node::new(site(self.index), self.config, 0), 0, Vec::new()),
        };
        for peer in (0..self.nodes).filter(|p| *p != self.index) {
            node.peer_up(site(peer));
            o.set_timer(Timer::Sync(peer), model_timeout());
        }
        if next_write < self.script.len() {
            o.set_timer(Timer::Write, model_timeout());
        }
        o.set_timer(Timer::Tick, model_timeout());
        NodeState {
            node,
            next_write,
            acked,
            restarted: storage.is_some(),
        }
    }

    fn on_msg(
        &self,
        _id: Id,
        state: &mut Cow<NodeState>,
        src: Id,
        msg: NodeMsg,
        o: &mut Out<Self>,
    ) {
        self.step(state, o, |s| {
            let mut outputs = s.node.receive(Millis(0), site(usize::from(src)), msg);
            // An empty sync reply says nothing: leave it out.
            outputs.retain(|out| {
                !matches!(out, Output::Send { msg: NodeMsg::SyncReply(_, v), .. } if v.is_empty())
            });
            outputs
        });
    }

    fn on_timeout(&self, _id: Id, state: &mut Cow<NodeState>, timer: &Timer, o: &mut Out<Self>) {
        match timer {
            Timer::Write => {
                let write = self.script[state.next_write];
                self.step(state, o, |s| {
                    s.next_write += 1;
                    let (committed, outputs) = s.node.write(|r| write.run(r));
                    s.acked.extend(committed);
                    outputs
                });
                if state.next_write < self.script.len() {
                    o.set_timer(Timer::Write, model_timeout());
                }
            }
            Timer::Tick => {
                self.step(state, o, |s| s.node.tick(TICK_AT));
                o.set_timer(Timer::Tick, model_timeout());
            }
            Timer::Sync(peer) => {
                o.send(Id::from(*peer), state.node.sync_request());
                o.set_timer(Timer::Sync(*peer), model_timeout());
            }
        }
    }
}

/// The property checks, as plain functions of a model state.
pub mod properties {
    use super::*;

    type State = ActorModelState<PatinaActor>;

    /// The versions a node applied, per site (what sync compares). Which of them a node
    /// also knows to be cleared depends on when it received them, and is only a hint.
    fn applied(durable: &Durable) -> SyncState {
        SyncState::of(&durable.book)
    }

    /// Same applied versions, same rows and clocks (for every pair of nodes).
    pub fn strong_eventual_consistency(state: &State) -> bool {
        let nodes = &state.actor_states;
        nodes.iter().enumerate().all(|(i, a)| {
            nodes[i + 1..].iter().all(|b| {
                let (a, b) = (&a.node.durable, &b.node.durable);
                applied(a) != applied(b) || a.replica.rows == b.replica.rows
            })
        })
    }

    /// Every write a node acknowledged is held by it, or beaten by something it holds.
    pub fn acknowledged_writes_survive(state: &State) -> bool {
        state.actor_states.iter().all(|s| {
            s.acked.iter().all(|cs| {
                s.node.durable.book.contains(cs.id)
                    && cs
                        .changes
                        .iter()
                        .all(|c| s.node.durable.replica.dominates(cs.id, c))
            })
        })
    }

    /// A version in a node's bookkeeping was merged there: each of its changes is held, or
    /// beaten by something held.
    pub fn bookkeeping_is_truthful(state: &State) -> bool {
        let acked: Vec<&Arc<Changeset>> =
            state.actor_states.iter().flat_map(|s| &s.acked).collect();
        state.actor_states.iter().all(|s| {
            acked
                .iter()
                .filter(|cs| s.node.durable.book.contains(cs.id))
                .all(|cs| {
                    cs.changes
                        .iter()
                        .all(|c| s.node.durable.replica.dominates(cs.id, c))
                })
        })
    }

    /// From this state, with no more loss: sync rounds between every ordered pair until
    /// nothing changes (at most one round per node, plus one) make every node identical, and
    /// every acknowledged write is held (or beaten) everywhere. Each round begins with the
    /// engine's sync check: it ends there when the two state hashes are equal
    /// (`Protocol::sync_check_answered`), so a check that spared a round that would have
    /// brought something leaves two nodes apart, and this property false.
    pub fn converges_under_fair_sync(scenario: &Scenario, state: &State) -> bool {
        let config = scenario.node_config();
        let mut nodes: Vec<Node> = state
            .actor_states
            .iter()
            .map(|s| Node::restart(s.node.durable.clone(), config, 0))
            .collect();
        let n = nodes.len();
        for _round in 0..=n {
            let mut changed = false;
            for to in 0..n {
                for from in (0..n).filter(|f| *f != to) {
                    if nodes[to].sync_check_hash() == nodes[from].sync_check_hash() {
                        continue;
                    }
                    let NodeMsg::SyncRequest(_, request) = nodes[to].sync_request() else {
                        unreachable!("sync_request makes a request")
                    };
                    for changeset in nodes[from].sync_reply(&request) {
                        changed |= nodes[to].apply(&changeset).is_some();
                    }
                }
            }
            if !changed {
                break;
            }
        }
        let first = &nodes[0].durable;
        let identical = nodes.iter().all(|node| {
            applied(&node.durable) == applied(first)
                && node.durable.replica.rows == first.replica.rows
        });
        let acked_everywhere = state.actor_states.iter().flat_map(|s| &s.acked).all(|cs| {
            nodes.iter().all(|node| {
                cs.changes
                    .iter()
                    .all(|c| node.durable.replica.dominates(cs.id, c))
            })
        });
        identical && acked_everywhere
    }
}

/// Scenarios `cargo test` checks exhaustively, and deeper ones for `check`.
pub mod scenarios {
    use super::*;

    /// Two nodes write the same row concurrently; one deletes and re-inserts it; messages are
    /// lost, duplicated and reordered; one node may crash and restart.
    pub fn conflicts_with_crash() -> Scenario {
        Scenario {
            name: "conflicts-with-crash",
            scripts: vec![
                vec![
                    Write::Insert(1, "a"),
                    Write::Delete(1),
                    Write::Insert(1, "c"),
                ],
                vec![Write::Insert(1, "b")],
            ],
            lossy: true,
            crashes: 1,
            faults: NodeFaults::default(),
            kept_links: false,
            parts: false,
        }
    }

    /// Two nodes insert the same row with the same value at once: only the site tie-break
    /// orders the two writes.
    pub fn equal_concurrent_inserts(faults: NodeFaults) -> Scenario {
        Scenario {
            name: "equal-concurrent-inserts",
            scripts: vec![vec![Write::Insert(1, "a")], vec![Write::Insert(1, "a")]],
            lossy: false,
            crashes: 0,
            faults,
            kept_links: false,
            parts: false,
        }
    }

    /// One node updates a row while another deletes it and re-inserts it with its key only (the
    /// value column back to its default).
    pub fn update_against_resurrect(faults: NodeFaults) -> Scenario {
        Scenario {
            name: "update-against-resurrect",
            scripts: vec![
                vec![Write::Insert(1, "a"), Write::Delete(1), Write::InsertKey(1)],
                vec![Write::Update(1, "b")],
            ],
            lossy: false,
            crashes: 0,
            faults,
            kept_links: false,
            parts: false,
        }
    }

    /// One node writes two rows in two transactions; the network may lose the first.
    pub fn two_writes_lossy(faults: NodeFaults) -> Scenario {
        Scenario {
            name: "two-writes-lossy",
            scripts: vec![vec![Write::Insert(1, "a"), Write::Insert(2, "b")], vec![]],
            lossy: true,
            crashes: 0,
            faults,
            kept_links: false,
            parts: false,
        }
    }

    /// Four nodes, two of them writing the same row.
    pub fn four_nodes() -> Scenario {
        Scenario {
            name: "four-nodes",
            scripts: vec![
                vec![Write::Insert(1, "a")],
                vec![Write::Insert(1, "b")],
                vec![],
                vec![],
            ],
            lossy: true,
            crashes: 0,
            faults: NodeFaults::default(),
            kept_links: false,
            parts: false,
        }
    }

    /// Two nodes write the same row; every changeset travels in parts (a sentinel and a cell:
    /// two parts per insert); messages are lost, duplicated and reordered. A receiver must
    /// apply a changeset only once it holds every part.
    pub fn parts(faults: NodeFaults) -> Scenario {
        Scenario {
            name: "parts",
            scripts: vec![vec![Write::Insert(1, "a")], vec![Write::Insert(1, "b")]],
            lossy: true,
            crashes: 0,
            faults,
            kept_links: true,
            parts: true,
        }
    }

    /// Every scenario of the real protocol, by name.
    pub fn all() -> Vec<Scenario> {
        vec![
            conflicts_with_crash(),
            three_nodes(),
            four_nodes(),
            equal_concurrent_inserts(NodeFaults::default()),
            update_against_resurrect(NodeFaults::default()),
            two_writes_lossy(NodeFaults::default()),
            kept_links(),
            parts(NodeFaults::default()),
        ]
    }

    /// The three-node scenario over kept links (the agents' default broadcast): the links are
    /// asked for at the first tick, so early writes go up the writer's own links; lossy.
    pub fn kept_links() -> Scenario {
        Scenario {
            name: "kept-links",
            kept_links: true,
            ..three_nodes()
        }
    }

    /// Three nodes: an insert, a concurrent update from another node once the row reached it, and
    /// a delete from the third; lossy network.
    pub fn three_nodes() -> Scenario {
        Scenario {
            name: "three-nodes",
            scripts: vec![
                vec![Write::Insert(1, "a")],
                vec![Write::Update(1, "b")],
                vec![Write::Delete(1)],
            ],
            lossy: true,
            crashes: 0,
            faults: NodeFaults::default(),
            kept_links: false,
            parts: false,
        }
    }
}

/// Runs a breadth-first check of every behaviour up to `depth` steps, on one thread (so the
/// states visited, and their count, are the same on every run), and returns the checker.
pub fn check_bfs(
    scenario: Scenario,
    depth: usize,
) -> impl Checker<ActorModel<PatinaActor, Scenario, ()>> {
    scenario
        .into_model()
        .checker()
        .threads(1)
        .target_max_depth(depth)
        .spawn_bfs()
        .join()
}
