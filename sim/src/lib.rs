//! patina-sim: a deterministic simulator of Patina's replication.
//!
//! Thousands of `patina_core::node::Node`s (the broadcast state machine, the sync functions and
//! scheduler, bookkeeping and the merge rule that production runs, over an in-memory store)
//! exchange messages in one thread, in virtual time, over a seeded network: per-pair latency
//! from the 19-region WAN model (data/wan-regions.csv) or a uniform latency, optional loss, a
//! partition that cuts the cluster in two for a while, and nodes that crash and restart with
//! only what they stored. The same seed gives the same run, event for event.
//!
//! Modules:
//! - [`network`]: latency models (WAN regions, uniform), node placement, loss.
//! - this file: the event loop ([`run`]) and its report ([`Report`]).

pub mod network;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use patina_core::broadcast::{BroadcastConfig, Millis};
use patina_core::change::ChangesetId;
use patina_core::ids::SiteId;
use patina_core::node::{Node, NodeConfig, NodeMsg, Output};
use patina_core::protocol::ProtocolConfig;
use patina_core::stats::{percentile, SplitMix64};
use patina_core::wire::{changeset_to_bytes, encode_peer_message, encode_sync_state, PeerMessage};
use patina_core::{PackedPk, Value};

use network::Network;

/// A scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Number of nodes.
    pub nodes: usize,
    /// Writes, each on a node chosen at random (among those up).
    pub writes: usize,
    /// Virtual time between writes (µs).
    pub write_interval_us: u64,
    /// Peers each node knows (at least; links are made symmetric); the overlay forms over these.
    /// `usize::MAX` (the default): every node knows every other, as SWIM gives the agents.
    /// Partial views keep 10,000-node runs in memory.
    pub view_size: usize,
    /// Broadcast settings (the production defaults unless changed).
    pub broadcast: BroadcastConfig,
    /// Broadcast tick (ms).
    pub tick_ms: u64,
    /// Anti-entropy: time between sync rounds of one node (ms, plus jitter); None: no sync.
    pub sync_interval_ms: Option<u64>,
    /// Sync checks before each round's session (the engine's `gossip.sync_check`, on by
    /// default): a round whose partner answers with this node's state hash ends there.
    pub sync_check: bool,
    /// Cut the cluster in two halves (even and odd nodes) from `.0` to `.1` (virtual ms after
    /// the first write).
    pub partition_ms: Option<(u64, u64)>,
    /// Share of nodes that crash during the writes (0..=1), each down for `crash_down_ms`.
    pub crash_share: f64,
    /// How long a crashed node stays down (ms).
    pub crash_down_ms: u64,
    /// Virtual time before the first write (ms): membership is known from the start, this is
    /// for round-trip probes to find near peers.
    pub warmup_ms: u64,
    /// Give up this long after the last write (ms of virtual time).
    pub settle_ms: u64,
    /// Seed of everything random: placement, views, loss, writers, crashes.
    pub seed: u64,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            nodes: 100,
            writes: 20,
            write_interval_us: 100_000,
            view_size: usize::MAX,
            broadcast: BroadcastConfig::default(),
            tick_ms: 10,
            sync_interval_ms: Some(500),
            sync_check: true,
            partition_ms: None,
            crash_share: 0.0,
            crash_down_ms: 2_000,
            warmup_ms: 10_000,
            settle_ms: 60_000,
            seed: 1,
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Per write: virtual ms until every node had it (None if some never did).
    pub time_to_all_ms: Vec<Option<f64>>,
    /// Per write: share of nodes that got it.
    pub coverage: Vec<f64>,
    /// Every (write, node) delivery delay in ms, sorted (the per-node delivery distribution).
    pub delivery_ms: Vec<f64>,
    /// Broadcast messages sent per change per node (from the first write on).
    pub sends_per_change_per_node: f64,
    /// Bytes of broadcast messages per change per node (encoded peer messages).
    pub bytes_per_change_per_node: f64,
    /// Sync messages (checks and their answers, requests and replies) sent per node from the
    /// first write on.
    pub sync_sends_per_node: f64,
    /// Overlay upkeep messages (round-trip probes and answers, kept-link requests) sent per
    /// node over the whole run, warm-up included.
    pub upkeep_sends_per_node: f64,
    /// Bytes of sync messages per node from the first write on.
    pub sync_bytes_per_node: f64,
    /// Deliveries made by sync rather than broadcast.
    pub repaired_by_sync: u64,
    /// Virtual ms from the first write until the last delivery.
    pub duration_ms: f64,
    /// Events processed.
    pub events: u64,
}

impl Report {
    /// The p-th percentile (0..=1) of time-to-all over writes that reached everyone.
    pub fn percentile_ms(&self, p: f64) -> Option<f64> {
        let mut done: Vec<f64> = self.time_to_all_ms.iter().flatten().copied().collect();
        done.sort_by(f64::total_cmp);
        percentile(&done, p)
    }

    /// The p-th percentile (0..=1) of per-node delivery delays.
    pub fn delivery_percentile_ms(&self, p: f64) -> Option<f64> {
        percentile(&self.delivery_ms, p)
    }

    /// True when every write reached every node.
    pub fn complete(&self) -> bool {
        self.coverage.iter().all(|c| *c == 1.0)
    }
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// A message arrives.
    Deliver {
        to: usize,
        from: usize,
        msg_id: usize,
    },
    /// A node's tick: broadcast flushes, a sync round when one is due.
    Tick { node: usize },
    /// A write on a node.
    Write { write: usize },
    /// A node crashes (loses everything but its durable state).
    Crash { node: usize },
    /// A crashed node starts again.
    Restart { node: usize },
}

fn site(i: usize) -> SiteId {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
    SiteId(id)
}

fn node_seed(scenario: &Scenario, i: usize) -> u64 {
    scenario.seed ^ (i as u64).wrapping_mul(0x5851_f42d_4c95_7f2d)
}

/// Bytes a message takes on the wire (the engine's encodings).
fn wire_bytes(from: SiteId, msg: &NodeMsg) -> usize {
    match msg {
        NodeMsg::Broadcast(msg) => encode_peer_message(
            0,
            &PeerMessage::Broadcast {
                from,
                msg: msg.clone(),
            },
        )
        .len(),
        NodeMsg::SyncRequest(_, state) => encode_sync_state(0, state, 0).len() + 4,
        NodeMsg::SyncCheck(nonce) => {
            encode_peer_message(0, &PeerMessage::SyncCheck { nonce: *nonce }).len()
        }
        NodeMsg::SyncCheckAnswer(nonce, hash) => encode_peer_message(
            0,
            &PeerMessage::SyncCheckAnswer {
                nonce: *nonce,
                hash: *hash,
            },
        )
        .len(),
        NodeMsg::SyncReply(_, changesets) => {
            4 + changesets
                .iter()
                .map(|cs| changeset_to_bytes(cs).len() + 4)
                .sum::<usize>()
        }
    }
}

/// Runs a scenario until every write reached every node, or `settle_ms` after the last write.
pub fn run(scenario: &Scenario, network: &Network) -> Report {
    let n = scenario.nodes;
    let mut rng = SplitMix64::new(scenario.seed);
    let config = NodeConfig {
        protocol: ProtocolConfig {
            broadcast: scenario.broadcast,
            sync_interval_ms: scenario.sync_interval_ms,
            // A lost request or answer (loss, a crashed or cut-off peer) fails the round after
            // two intervals, about when the engine's connection attempt would give up.
            sync_timeout_ms: scenario.sync_interval_ms.unwrap_or(500) * 2,
            // An unanswered check opens the session after half of that, which leaves the
            // session the other half, as the engine's 1 s wait leaves most of its 30 s.
            sync_check_wait_ms: scenario
                .sync_check
                .then_some(scenario.sync_interval_ms.unwrap_or(500)),
            ..ProtocolConfig::default()
        },
        ..NodeConfig::default()
    };
    let mut nodes: Vec<Node> = (0..n)
        .map(|i| Node::new(site(i), config, node_seed(scenario, i)))
        .collect();
    let index: BTreeMap<SiteId, usize> = (0..n).map(|i| (site(i), i)).collect();
    // Partial views: each node knows `view_size` random others, links made symmetric.
    let mut views: Vec<Vec<usize>> = vec![Vec::new(); n];
    if scenario.view_size >= n.saturating_sub(1) {
        // Full membership, as SWIM gives every agent.
        for (i, view) in views.iter_mut().enumerate() {
            view.extend((0..n).filter(|j| *j != i));
        }
    }
    for i in 0..n {
        while views[i].len() < scenario.view_size.min(n - 1) {
            let j = rng.below(n as u64) as usize;
            if j != i && !views[i].contains(&j) {
                views[i].push(j);
                views[j].push(i);
            }
        }
    }
    for (i, view) in views.iter().enumerate() {
        for &j in view {
            nodes[i].peer_up(site(j));
        }
    }
    let mut up = vec![true; n];

    // Virtual time in µs. Events ordered by (time, sequence) for determinism.
    let mut queue: BinaryHeap<Reverse<(u64, u64, Event)>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut messages: Vec<Option<NodeMsg>> = Vec::new();
    let mut push = |queue: &mut BinaryHeap<Reverse<(u64, u64, Event)>>, at: u64, event: Event| {
        seq += 1;
        queue.push(Reverse((at, seq, event)));
    };
    for i in 0..n {
        // Stagger timers so nodes do not all tick or sync at once.
        push(
            &mut queue,
            rng.below(scenario.tick_ms * 1000),
            Event::Tick { node: i },
        );
    }
    let first_write_at = 1_000 + scenario.warmup_ms * 1000;
    let cut = |a: usize, b: usize, now_us: u64| {
        scenario.partition_ms.is_some_and(|(from, to)| {
            (first_write_at + from * 1000..first_write_at + to * 1000).contains(&now_us)
                && a % 2 != b % 2
        })
    };
    for w in 0..scenario.writes {
        push(
            &mut queue,
            first_write_at + w as u64 * scenario.write_interval_us,
            Event::Write { write: w },
        );
    }
    let last_write_at =
        first_write_at + scenario.writes.saturating_sub(1) as u64 * scenario.write_interval_us;
    let crashes = (scenario.crash_share * n as f64).round() as usize;
    for _ in 0..crashes {
        let node = rng.below(n as u64) as usize;
        let at = first_write_at + rng.below(last_write_at - first_write_at + 1);
        push(&mut queue, at, Event::Crash { node });
        push(
            &mut queue,
            at + scenario.crash_down_ms * 1000,
            Event::Restart { node },
        );
    }
    let give_up_at = last_write_at + scenario.settle_ms * 1000;

    let mut written_at: Vec<Option<u64>> = vec![None; scenario.writes];
    let mut reached: Vec<Vec<Option<u64>>> = vec![vec![None; n]; scenario.writes];
    let mut write_of: HashMap<ChangesetId, usize> = HashMap::new();
    let mut missing = (scenario.writes * n) as u64;
    let (mut sends, mut bytes, mut sync_sends, mut sync_bytes) = (0u64, 0u64, 0u64, 0u64);
    let mut repaired_by_sync = 0u64;
    let mut upkeep_sends = 0u64;
    let mut events = 0u64;
    let mut last_delivery_at = first_write_at;
    while let Some(Reverse((now, _, event))) = queue.pop() {
        if now > give_up_at || (missing == 0 && now > last_write_at) {
            break;
        }
        events += 1;
        let now_ms = Millis(now / 1000);
        let mut by_sync = false;
        let (node, outputs) = match event {
            Event::Write { write } => {
                // The writer is a random node that is up.
                let first = rng.below(n as u64) as usize;
                let Some(node) = (0..n).map(|k| (first + k) % n).find(|i| up[*i]) else {
                    continue;
                };
                let key = PackedPk::pack(&[Value::Integer(write as i64)]).expect("one integer");
                let values = BTreeMap::from([("v".to_string(), Value::Integer(write as i64))]);
                let (committed, outputs) =
                    nodes[node].write(|replica| Some(replica.insert("t", key, values)));
                if let Some(changeset) = committed {
                    write_of.insert(changeset.id, write);
                    written_at[write] = Some(now);
                    reached[write][node] = Some(now);
                    missing -= 1;
                }
                (node, outputs)
            }
            Event::Tick { node } => {
                push(
                    &mut queue,
                    now + scenario.tick_ms * 1000,
                    Event::Tick { node },
                );
                if !up[node] {
                    continue;
                }
                (node, nodes[node].tick(now_ms))
            }
            Event::Deliver { to, from, msg_id } => {
                let msg = messages[msg_id]
                    .take()
                    .expect("each message is delivered once");
                if !up[to] || cut(from, to, now) {
                    continue;
                }
                by_sync = matches!(msg, NodeMsg::SyncReply(..));
                (to, nodes[to].receive(now_ms, site(from), msg))
            }
            Event::Crash { node } => {
                up[node] = false;
                continue;
            }
            Event::Restart { node } => {
                let durable = nodes[node].durable.clone();
                nodes[node] = Node::restart(durable, config, node_seed(scenario, node) ^ now);
                for &j in &views[node] {
                    nodes[node].peer_up(site(j));
                }
                up[node] = true;
                continue;
            }
        };
        for output in outputs {
            match output {
                Output::Send { to, msg } => {
                    let to = index[&to];
                    // Costs are counted from the first write on; overlay upkeep (probes and
                    // kept-link requests) over the whole run, warm-up included.
                    match &msg {
                        NodeMsg::Broadcast(b) if b.is_upkeep() => upkeep_sends += 1,
                        _ if now < first_write_at => {}
                        NodeMsg::Broadcast(_) => {
                            sends += 1;
                            bytes += wire_bytes(site(node), &msg) as u64;
                        }
                        _ => {
                            sync_sends += 1;
                            sync_bytes += wire_bytes(site(node), &msg) as u64;
                        }
                    }
                    if network.loses(&mut rng) {
                        continue;
                    }
                    let latency = network.latency_us(node, to, &mut rng);
                    messages.push(Some(msg));
                    push(
                        &mut queue,
                        now + latency,
                        Event::Deliver {
                            to,
                            from: node,
                            msg_id: messages.len() - 1,
                        },
                    );
                }
                Output::Applied(id) => {
                    if let Some(&w) = write_of.get(&id) {
                        if reached[w][node].is_none() {
                            reached[w][node] = Some(now);
                            missing -= 1;
                            repaired_by_sync += u64::from(by_sync);
                            last_delivery_at = last_delivery_at.max(now);
                        }
                    }
                }
            }
        }
    }
    let mut delivery_ms = Vec::new();
    let time_to_all_ms = reached
        .iter()
        .zip(&written_at)
        .map(|(r, at)| {
            let at = (*at)?;
            delivery_ms.extend(r.iter().flatten().map(|t| (t - at) as f64 / 1000.0));
            r.iter()
                .try_fold(0u64, |max, t| t.map(|t| max.max(t)))
                .map(|last| (last - at) as f64 / 1000.0)
        })
        .collect();
    delivery_ms.sort_by(f64::total_cmp);
    let coverage = reached
        .iter()
        .map(|r| r.iter().filter(|t| t.is_some()).count() as f64 / n as f64)
        .collect();
    let per = (scenario.writes.max(1) * n) as f64;
    Report {
        time_to_all_ms,
        coverage,
        delivery_ms,
        sends_per_change_per_node: sends as f64 / per,
        bytes_per_change_per_node: bytes as f64 / per,
        sync_sends_per_node: sync_sends as f64 / n as f64,
        upkeep_sends_per_node: upkeep_sends as f64 / n as f64,
        sync_bytes_per_node: sync_bytes as f64 / n as f64,
        repaired_by_sync,
        duration_ms: (last_delivery_at - first_write_at) as f64 / 1000.0,
        events,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_wan_run_reaches_everyone_and_repeats_exactly() {
        let scenario = Scenario {
            nodes: 200,
            writes: 10,
            ..Scenario::default()
        };
        let network = Network::wan(scenario.nodes, 0.0, scenario.seed);
        let a = run(&scenario, &network);
        assert!(a.coverage.iter().all(|c| *c == 1.0), "{:?}", a.coverage);
        assert!(a.time_to_all_ms.iter().all(Option::is_some));
        let b = run(&scenario, &network);
        assert_eq!(a, b, "the same seed must give the same run");
        let other = run(
            &Scenario {
                seed: 2,
                ..scenario
            },
            &Network::wan(200, 0.0, 2),
        );
        assert_ne!(a, other);
    }

    #[test]
    fn loss_is_repaired_by_grafts() {
        let scenario = Scenario {
            nodes: 100,
            writes: 10,
            sync_interval_ms: None,
            ..Scenario::default()
        };
        let network = Network::uniform(scenario.nodes, 20.0, 0.05);
        let report = run(&scenario, &network);
        assert!(
            report.coverage.iter().all(|c| *c == 1.0),
            "{:?}",
            report.coverage
        );
    }

    #[test]
    fn a_partition_heals_by_sync_with_or_without_checks() {
        let scenario = Scenario {
            nodes: 200,
            writes: 20,
            partition_ms: Some((0, 3_000)),
            ..Scenario::default()
        };
        let network = Network::wan(scenario.nodes, 0.0, scenario.seed);
        let report = run(&scenario, &network);
        assert!(report.complete(), "{:?}", report.coverage);
        // Every write crossed the cut after the heal, by sync or by broadcast.
        assert!(report.percentile_ms(0.0).unwrap() > 1_000.0);
        assert!(report.repaired_by_sync > 0);
        assert_eq!(report, run(&scenario, &network));
        // The same with every round a session: most rounds end at the check, for far fewer
        // bytes, and the cut heals either way.
        let sessions = run(
            &Scenario {
                sync_check: false,
                ..scenario
            },
            &network,
        );
        assert!(sessions.complete());
        assert!(
            report.sync_bytes_per_node * 2.0 < sessions.sync_bytes_per_node,
            "{} bytes with checks, {} without",
            report.sync_bytes_per_node,
            sessions.sync_bytes_per_node
        );
    }

    #[test]
    fn crashed_nodes_catch_up_after_restart() {
        let scenario = Scenario {
            nodes: 200,
            writes: 30,
            crash_share: 0.1,
            crash_down_ms: 1_500,
            ..Scenario::default()
        };
        let network = Network::uniform(scenario.nodes, 30.0, 0.01);
        let report = run(&scenario, &network);
        assert!(report.complete(), "{:?}", report.coverage);
        assert!(report.repaired_by_sync > 0);
    }
}
