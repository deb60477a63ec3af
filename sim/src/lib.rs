//! patina-sim: a deterministic simulator of Patina's broadcast.
//!
//! Thousands of `patina_core::broadcast::Broadcast` state machines (the code production runs)
//! exchange messages in one thread, in virtual time, over a seeded network: per-pair latency
//! from the 19-region WAN model (data/wan-regions.csv) or a uniform latency, optional loss. The
//! same seed gives the same run, event for event.
//!
//! Modules:
//! - [`network`]: latency models (WAN regions, uniform), node placement, loss.
//! - this file: the event loop ([`Simulation`]) and its report ([`Report`]).

pub mod network;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::Arc;

use patina_core::broadcast::{Broadcast, BroadcastConfig, BroadcastMsg, Effect, Millis};
use patina_core::change::{Changeset, ChangesetId};
use patina_core::ids::{DbVersion, SiteId};
use patina_core::wire::{encode_peer_message, PeerMessage};

use network::Network;

/// A scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Number of nodes.
    pub nodes: usize,
    /// Writes, each on a node chosen at random.
    pub writes: usize,
    /// Virtual time between writes (µs).
    pub write_interval_us: u64,
    /// Peers each node knows (its partial view); the broadcast tree forms over these links.
    pub view_size: usize,
    /// Broadcast settings (the production defaults unless changed).
    pub broadcast: BroadcastConfig,
    /// Broadcast tick (ms).
    pub tick_ms: u64,
    /// Seed of everything random: placement, views, loss, writers.
    pub seed: u64,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            nodes: 100,
            writes: 20,
            write_interval_us: 100_000,
            view_size: 12,
            broadcast: BroadcastConfig::default(),
            tick_ms: 10,
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
    /// Messages sent per change per node.
    pub sends_per_change_per_node: f64,
    /// Bytes sent per change per node (encoded peer messages).
    pub bytes_per_change_per_node: f64,
    /// Events processed.
    pub events: u64,
}

impl Report {
    /// The p-th percentile (0..=1) of time-to-all over writes that reached everyone.
    pub fn percentile_ms(&self, p: f64) -> Option<f64> {
        let mut done: Vec<f64> = self.time_to_all_ms.iter().flatten().copied().collect();
        if done.is_empty() {
            return None;
        }
        done.sort_by(f64::total_cmp);
        Some(done[((done.len() - 1) as f64 * p).round() as usize])
    }
}

/// Deterministic generator (SplitMix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
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
    /// A node's broadcast tick.
    Tick { node: usize },
    /// A write on a node.
    Write { node: usize, write: usize },
}

fn site(i: usize) -> SiteId {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
    SiteId(id)
}

/// Runs a scenario to the end (until no message is in flight and every write happened).
pub fn run(scenario: &Scenario, network: &Network) -> Report {
    let n = scenario.nodes;
    let mut rng = Rng::new(scenario.seed);
    let mut nodes: Vec<Broadcast> = (0..n)
        .map(|i| {
            Broadcast::new(
                site(i),
                scenario.broadcast,
                scenario.seed ^ (i as u64).wrapping_mul(0x5851_f42d_4c95_7f2d),
            )
        })
        .collect();
    let index: BTreeMap<SiteId, usize> = (0..n).map(|i| (site(i), i)).collect();
    // Partial views: each node knows `view_size` random others, links made symmetric.
    let mut views: Vec<Vec<usize>> = vec![Vec::new(); n];
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

    // Virtual time in µs. Events ordered by (time, sequence) for determinism.
    let mut queue: BinaryHeap<Reverse<(u64, u64, Event)>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut messages: Vec<Option<BroadcastMsg>> = Vec::new();
    // Deliveries and writes still queued: the run is quiet when this is 0.
    let mut pending = 0u64;
    let mut push = |queue: &mut BinaryHeap<Reverse<(u64, u64, Event)>>,
                    pending: &mut u64,
                    at: u64,
                    event: Event| {
        seq += 1;
        if !matches!(event, Event::Tick { .. }) {
            *pending += 1;
        }
        queue.push(Reverse((at, seq, event)));
    };
    for i in 0..n {
        // Stagger ticks so nodes do not all tick at once.
        push(
            &mut queue,
            &mut pending,
            rng.below(scenario.tick_ms * 1000),
            Event::Tick { node: i },
        );
    }
    for w in 0..scenario.writes {
        let node = rng.below(n as u64) as usize;
        push(
            &mut queue,
            &mut pending,
            1_000 + w as u64 * scenario.write_interval_us,
            Event::Write { node, write: w },
        );
    }
    let mut written_at: Vec<u64> = vec![0; scenario.writes];
    let mut reached: Vec<Vec<Option<u64>>> = vec![vec![None; n]; scenario.writes];
    let write_of = |id: &ChangesetId| id.version.get() as usize - 1;
    let mut sends = 0u64;
    let mut bytes = 0u64;
    let mut events = 0u64;
    let mut last_write_at = 0u64;
    let mut idle_ticks = 0usize;
    while let Some(Reverse((now, _, event))) = queue.pop() {
        events += 1;
        if !matches!(event, Event::Tick { .. }) {
            pending -= 1;
        }
        let (node, effects) = match event {
            Event::Write { node, write } => {
                written_at[write] = now;
                last_write_at = now;
                reached[write][node] = Some(now);
                let changeset = Arc::new(Changeset::whole(
                    ChangesetId {
                        site: site(node),
                        version: DbVersion(write as u64 + 1),
                    },
                    Vec::new(),
                ));
                (node, nodes[node].local_commit(changeset))
            }
            Event::Tick { node } => {
                let effects = nodes[node].tick(Millis(now / 1000));
                // Stop ticking once two whole rounds of ticks found nothing to do: no message
                // in flight, no write to come, no announced id waiting for a graft.
                let quiet = pending == 0 && nodes[node].missing_count() == 0;
                if quiet && now > last_write_at && effects.is_empty() {
                    idle_ticks += 1;
                } else {
                    idle_ticks = 0;
                }
                if idle_ticks < 2 * n {
                    push(
                        &mut queue,
                        &mut pending,
                        now + scenario.tick_ms * 1000,
                        Event::Tick { node },
                    );
                }
                (node, effects)
            }
            Event::Deliver { to, from, msg_id } => {
                let msg = messages[msg_id]
                    .take()
                    .expect("each message is delivered once");
                (to, nodes[to].receive(Millis(now / 1000), site(from), msg))
            }
        };
        for effect in effects {
            match effect {
                Effect::Send { to, msg } => {
                    let to = index[&to];
                    sends += 1;
                    bytes += encode_peer_message(
                        0,
                        &PeerMessage::Broadcast {
                            from: site(node),
                            msg: msg.clone(),
                        },
                    )
                    .len() as u64;
                    if network.loses(&mut rng) {
                        continue;
                    }
                    let latency = network.latency_us(node, to, &mut rng);
                    messages.push(Some(msg));
                    push(
                        &mut queue,
                        &mut pending,
                        now + latency,
                        Event::Deliver {
                            to,
                            from: node,
                            msg_id: messages.len() - 1,
                        },
                    );
                }
                Effect::Deliver(changeset) => {
                    let w = write_of(&changeset.id);
                    if reached[w][node].is_none() {
                        reached[w][node] = Some(now);
                    }
                }
            }
        }
    }
    let time_to_all_ms = reached
        .iter()
        .zip(&written_at)
        .map(|(r, at)| {
            r.iter()
                .try_fold(0u64, |max, t| t.map(|t| max.max(t)))
                .map(|last| (last - at) as f64 / 1000.0)
        })
        .collect();
    let coverage = reached
        .iter()
        .map(|r| r.iter().filter(|t| t.is_some()).count() as f64 / n as f64)
        .collect();
    let per = (scenario.writes.max(1) * n) as f64;
    Report {
        time_to_all_ms,
        coverage,
        sends_per_change_per_node: sends as f64 / per,
        bytes_per_change_per_node: bytes as f64 / per,
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
}
