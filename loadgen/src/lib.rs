//! loadgen: how long a write takes to reach every node of a cluster.
//!
//! `live` starts N real agents in this process (real SQLite, real QUIC with mutual TLS, real
//! SWIM and broadcast), each with its own QUIC endpoint on loopback and its own database;
//! emulates WAN latency in user space (the transport delays each message by the latency from
//! the sender's region to the receiver's, from the 19-region model, or by a uniform latency,
//! plus optional loss); drives writes at a set rate on random nodes; and records when each node
//! applied each write. `sim` runs the same scenario on the deterministic simulator.
//!
//! `remote` measures nodes that run elsewhere through their HTTP APIs only ([`remote`]), and
//! `procs` starts real `patina agent` processes on this machine and measures them the same
//! way ([`procs`]).
//!
//! All produce a [`Report`]: time to all nodes per write, per-node delivery, coverage, sends
//! and bytes per change per node, and (live) CPU and memory per node; printed as a table,
//! written as JSON, and plotted as a latency CDF (PNG).
// json! of the report nests deeper than the default limit.
#![recursion_limit = "256"]

pub mod plot;
pub mod procs;
pub mod remote;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use patina::agent::Agent;
use patina::config::Config;
use patina::http::client::{request, Method, StatusCode, Target};
use patina_core::change::ChangesetId;
use patina_core::ids::DbVersion;
use patina_core::stats::percentile;
use patina_sim::network::Network;
use serde_json::{json, Value as Json};

/// Latency between nodes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Latency {
    /// The 19-region WAN model (nodes placed by region weight).
    Wan,
    /// The same one-way latency between every pair (ms).
    Uniform(f64),
    /// Loopback as it is.
    None,
}

/// A scenario, for either mode.
#[derive(Debug, Clone)]
pub struct Options {
    /// Nodes.
    pub nodes: usize,
    /// Writes to make.
    pub writes: usize,
    /// Writes per second.
    pub rate: f64,
    /// Latency model.
    pub latency: Latency,
    /// Share of messages lost (0..1).
    pub loss: f64,
    /// Mutual TLS between nodes (live).
    pub tls: bool,
    /// Sealed datagrams between agents (live; the agent's default), or QUIC ones.
    pub sealed_datagrams: bool,
    /// Seed (placement, writers, simulator).
    pub seed: u64,
    /// Give up on a write this long after the last one.
    pub settle: Duration,
    /// Wait after membership settles, before the writes (live): round-trip probes choose the
    /// near peers meanwhile.
    pub warmup: Duration,
    /// SWIM probe period of every agent (ms, live).
    pub swim_probe_ms: u64,
    /// How long an agent keeps an unused connection (ms, live); `None`: the agent's default.
    pub connection_idle_ms: Option<u64>,
    /// Anti-entropy sync interval of every agent (ms, live).
    pub sync_interval_ms: u64,
    /// Kept links every agent asks of its nearest members (live); `None`: the agent's default.
    pub near_peers: Option<usize>,
    /// Kept links every agent asks of random members (live); `None`: the agent's default.
    pub far_peers: Option<usize>,
    /// Members every agent sends its own changesets to directly (live); `None`: the agent's
    /// default.
    pub origin_fanout: Option<usize>,
    /// Show progress bars.
    pub progress: bool,
}

/// The sync interval loadgen gives its agents (ms): fewer, larger sync rounds than the agent's
/// default, because at hundreds of nodes per core sync competes with the broadcast being
/// measured. Sync still repairs loss.
pub const DEFAULT_SYNC_INTERVAL_MS: u64 = 2_000;

/// The SWIM probe period loadgen gives its agents: 10 ms per node, at least 1 s (the agent's
/// default). A probe usually goes to a member not talked to recently, so it costs a QUIC
/// handshake (about 1.5 ms of CPU for both ends): with every agent on this machine, the
/// period must grow with their number or handshakes alone take the cores. On a real fleet
/// each node pays only its own probes, and 1 s is cheap.
pub fn default_swim_probe_ms(nodes: usize) -> u64 {
    (nodes as u64 * 10).max(1_000)
}

impl Default for Options {
    fn default() -> Self {
        Options {
            nodes: 20,
            writes: 20,
            rate: 10.0,
            latency: Latency::Uniform(10.0),
            loss: 0.0,
            tls: true,
            sealed_datagrams: true,
            seed: 1,
            settle: Duration::from_secs(30),
            warmup: Duration::from_secs(15),
            swim_probe_ms: 1_000,
            connection_idle_ms: None,
            sync_interval_ms: DEFAULT_SYNC_INTERVAL_MS,
            near_peers: None,
            far_peers: None,
            origin_fanout: None,
            progress: false,
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// "live" or "sim".
    pub mode: String,
    /// Nodes.
    pub nodes: usize,
    /// Per write: ms until the last node applied it (None if some node never did).
    pub time_to_all_ms: Vec<Option<f64>>,
    /// Per write: ms until 99% of the nodes had applied it (None if fewer ever did). Beside
    /// the time to all it tells a slow wave (the two close) from a few late nodes.
    pub time_to_99_nodes_ms: Vec<Option<f64>>,
    /// Per write: the node (index in start order) that applied it last, if every node did.
    pub last_node: Vec<Option<usize>>,
    /// Every (write, node) delivery delay in ms, sorted.
    pub delivery_ms: Vec<f64>,
    /// Per write: share of nodes that applied it.
    pub coverage: Vec<f64>,
    /// Messages sent per change per node (live: all transport messages during the writes,
    /// SWIM and sync included; sim: broadcast messages).
    pub sends_per_change_per_node: f64,
    /// Bytes sent per change per node (same scope).
    pub bytes_per_change_per_node: f64,
    /// Broadcast messages (pushes, announcements, grafts, prunes; not probes or kept-link
    /// requests) per change per node, the simulator's measure (live only; the simulator's
    /// figure is `sends_per_change_per_node`).
    pub broadcast_sends_per_change_per_node: Option<f64>,
    /// CPU seconds per node per second of the write phase (live).
    pub cpu_per_node: Option<f64>,
    /// CPU seconds per node per second while idle, before the writes (live).
    pub idle_cpu_per_node: Option<f64>,
    /// The same once the writes and the sync rounds they brought in are over (live): a young
    /// cluster's idle load falls as its formation's connections close, so the two differ.
    pub idle_after_cpu_per_node: Option<f64>,
    /// What one write cost the machine beyond idle (live).
    pub write_cpu: Option<WriteCpu>,
    /// Resident memory per node, idle, after the cluster formed (MiB, live).
    pub memory_per_node_mib: Option<f64>,
    /// Nodes that saw every other one before the writes (live).
    pub settled_nodes: Option<usize>,
    /// Seconds from the last node started until every node saw every other (live).
    pub formation_s: Option<f64>,
    /// QUIC connections pooled per node, idle (live).
    pub connections_per_node: Option<f64>,
    /// New QUIC connections (handshakes) per node per second, idle (live).
    pub handshakes_per_node_per_s: Option<f64>,
    /// Share of those handshakes resumed from a session ticket, idle (live).
    pub handshakes_resumed_share: Option<f64>,
    /// SWIM packets cut to one sealed datagram rather than wait for a handshake, per node per
    /// second, idle (live).
    pub swim_fitted_per_node_per_s: Option<f64>,
    /// SWIM packets sent to members without a pooled connection, per node per second by
    /// message kind, idle (live): what the handshakes are for.
    pub idle_cold_swim_per_node_per_s: Vec<(String, f64)>,
    /// The other messages to members without an open connection, per node per second while
    /// idle, by what they were (round-trip probes, kept-link requests, changes, sync).
    pub idle_cold_other_per_node_per_s: Vec<(String, f64)>,
    /// SWIM probe period of the agents (ms, live).
    pub swim_probe_ms: Option<u64>,
    /// Per write, copies its writer sent straight to members beyond its kept links, and copies
    /// it asked for but sent to nobody for lack of members reachable without a handshake
    /// (live; the agents' `gossip.origin_fanout`).
    pub first_hop_per_write: Option<(f64, f64)>,
    /// Sync rounds ended (answered or failed) per node per second: idle, and while writing
    /// (live).
    pub sync_rounds_per_node_per_s: Option<(f64, f64)>,
    /// Share of the write phase's sync rounds that ended at the check, with no session (the
    /// partner held the same versions; live).
    pub sync_spared_share: Option<f64>,
    /// Sync rounds ended per node per second in the busiest half second of the write phase
    /// (live): far above the average, the nodes' rounds come in waves, which slow the writes
    /// they meet.
    pub sync_rounds_busiest_per_node_per_s: Option<f64>,
    /// The write phase in steps of [`TIMELINE_STEP`] (live): what the agents did in each, to
    /// tell what a slow write met.
    pub timeline: Option<Timeline>,
    /// How many times slower than that SWIM ran, on average over the nodes, idle (live; 1 when
    /// no node was overloaded).
    pub idle_swim_slowdown: Option<f64>,
    /// Wall time of the run (s).
    pub wall_s: f64,
    /// The options of the run (seed, rate, nodes, writes, latency model...), as given.
    pub options: Json,
    /// The highest of the nodes' own p99 replication lag after the run (`/v1/health`, from
    /// the writers' commit times; remote and procs runs), ms.
    pub node_p99_lag_ms: Option<f64>,
    /// Nodes whose update stream ended during a remote or procs run, and why: their later
    /// deliveries are unknown (counted as missing), not necessarily lost.
    pub streams_lost: Vec<String>,
    /// Live runs: the nodes that missed some write at the end, with what their gossip state
    /// says (members known, how many others know them, connections, sync rounds): the
    /// evidence for why they were cut off.
    pub stragglers: Vec<String>,
}

/// The CPU one write cost beyond idle, per node and over all nodes, and the least time this
/// machine's cores need for it: agents sharing a machine cannot all have a write sooner than
/// that, whatever the network (BENCHMARKS, "Why live runs of 800-1,000 agents miss the
/// simulator's figures on 2 cores").
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WriteCpu {
    /// CPU per write per node beyond idle (ms).
    pub per_node_ms: f64,
    /// The same over all nodes (ms).
    pub all_nodes_ms: f64,
    /// Cores of the machine.
    pub cores: usize,
}

impl WriteCpu {
    /// From the process's CPU seconds over the write phase (`phase_s` long, `writes` writes)
    /// and its idle CPU per node per second measured before the writes and, if it was, after
    /// them; None without writes.
    ///
    /// Why after as well: at one write every few seconds the writes add less to the phase than
    /// the idle load drifts over it (a cluster formed a minute ago still closes connections
    /// and slows its announces), and an idle figure from before alone turned that drift into
    /// the writes' cost (0.00-1.45 ms per node for one binary). The idle load is taken to move
    /// in a straight line between the two windows, so over the phase it is their mean.
    pub fn measure(
        phase_cpu_s: f64,
        phase_s: f64,
        idle_before_per_node: f64,
        idle_after_per_node: Option<f64>,
        nodes: usize,
        writes: usize,
        cores: usize,
    ) -> Option<WriteCpu> {
        if writes == 0 || nodes == 0 || cores == 0 {
            return None;
        }
        let idle_per_node = match idle_after_per_node {
            Some(after) => (idle_before_per_node + after) / 2.0,
            None => idle_before_per_node,
        };
        let beyond_idle = (phase_cpu_s - idle_per_node * nodes as f64 * phase_s).max(0.0);
        let all_nodes_ms = beyond_idle / writes as f64 * 1000.0;
        Some(WriteCpu {
            per_node_ms: all_nodes_ms / nodes as f64,
            all_nodes_ms,
            cores,
        })
    }

    /// The least wall time the machine's cores need for one write's CPU (ms).
    pub fn floor_ms(&self) -> f64 {
        self.all_nodes_ms / self.cores as f64
    }
}

impl Report {
    /// Time-to-all percentiles over the writes that reached every node.
    pub fn time_to_all(&self, p: f64) -> Option<f64> {
        let mut done: Vec<f64> = self.time_to_all_ms.iter().flatten().copied().collect();
        done.sort_by(f64::total_cmp);
        percentile(&done, p)
    }

    /// True when every write reached every node.
    pub fn complete(&self) -> bool {
        !self.coverage.is_empty() && self.coverage.iter().all(|c| *c >= 1.0)
    }

    /// The report as a table.
    /// "<mode> run, N nodes, W writes".
    pub fn title(&self) -> String {
        format!(
            "{} run, {} nodes, {} writes",
            self.mode,
            self.nodes,
            self.coverage.len()
        )
    }

    pub fn table(&self) -> String {
        let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1} ms"));
        let reached = self.coverage.iter().filter(|c| **c >= 1.0).count();
        let mut out = String::new();
        out.push_str(&format!("{}\n", self.title()));
        out.push_str(&format!(
            "  time to all nodes   p50 {}  p90 {}  p99 {}  max {}\n",
            ms(self.time_to_all(0.5)),
            ms(self.time_to_all(0.9)),
            ms(self.time_to_all(0.99)),
            ms(self.time_to_all(1.0))
        ));
        if self.time_to_99_nodes_ms.iter().any(Option::is_some) {
            let last = self
                .most_often_last()
                .map(|(node, count)| {
                    format!(
                        "; last node most often: node {node}, in {count} of {} writes",
                        self.last_node.iter().flatten().count()
                    )
                })
                .unwrap_or_default();
            out.push_str(&format!(
                "  time to 99% nodes   p50 {}  p90 {}  p99 {}{last}\n",
                ms(self.time_to_99_nodes(0.5)),
                ms(self.time_to_99_nodes(0.9)),
                ms(self.time_to_99_nodes(0.99)),
            ));
        }
        out.push_str(&format!(
            "  per-node delivery   p50 {}  p99 {}\n",
            ms(percentile(&self.delivery_ms, 0.5)),
            ms(percentile(&self.delivery_ms, 0.99))
        ));
        let mean_coverage =
            self.coverage.iter().sum::<f64>() / self.coverage.len().max(1) as f64 * 100.0;
        out.push_str(&format!(
            "  coverage            {reached}/{} writes reached every node ({mean_coverage:.2}% of deliveries)\n",
            self.coverage.len()
        ));
        // Messages and bytes are counted inside the agents: not by remote runs.
        if self.mode == "live" || self.mode == "sim" {
            out.push_str(&format!(
                "  per change per node {:.2} sends, {:.0} bytes\n",
                self.sends_per_change_per_node, self.bytes_per_change_per_node
            ));
        }
        if let Some(broadcast) = self.broadcast_sends_per_change_per_node {
            out.push_str(&format!(
                "  of which broadcast  {broadcast:.2} sends per change per node\n"
            ));
        }
        if let (Some(cpu), Some(idle), Some(mem)) = (
            self.cpu_per_node,
            self.idle_cpu_per_node,
            self.memory_per_node_mib,
        ) {
            let idle = match self.idle_after_cpu_per_node {
                Some(after) => format!(
                    "{:.2}% idle before the writes and {:.2}% after",
                    idle * 100.0,
                    after * 100.0
                ),
                None => format!("{:.2}% idle", idle * 100.0),
            };
            out.push_str(&format!(
                "  per node            {:.2}% of a core while writing, {idle}, {mem:.1} MiB resident (idle)\n",
                cpu * 100.0,
            ));
        }
        if let Some(cost) = self.write_cpu {
            out.push_str(&format!(
                "  CPU per write       {:.2} ms per node beyond idle, {:.0} ms over all nodes: at least {:.0} ms on this machine's {} cores\n",
                cost.per_node_ms,
                cost.all_nodes_ms,
                cost.floor_ms(),
                cost.cores
            ));
        }
        if let (Some(conns), Some(handshakes)) =
            (self.connections_per_node, self.handshakes_per_node_per_s)
        {
            out.push_str(&format!(
                "  connections         {conns:.1} pooled per node, {handshakes:.3} handshakes per node per second (idle){}\n",
                self.handshakes_resumed_share
                    .map(|share| format!(", {:.0}% of them resumed", share * 100.0))
                    .unwrap_or_default()
                    + &self
                        .swim_fitted_per_node_per_s
                        .map(|fitted| format!("; {fitted:.3} SWIM packets per node per second cut to a datagram instead"))
                        .unwrap_or_default()
            ));
        }
        if let Some((sent, short)) = self.first_hop_per_write {
            out.push_str(&format!(
                "  first hop           {sent:.1} copies per write straight to members beyond the writer's kept links, {short:.1} short of warm members\n"
            ));
        }
        if let Some((idle, writing)) = self.sync_rounds_per_node_per_s {
            let busiest = self
                .sync_rounds_busiest_per_node_per_s
                .map(|b| format!(" (busiest half second: {b:.3})"))
                .unwrap_or_default();
            let spared = self
                .sync_spared_share
                .map(|share| format!(", {:.0}% of these spared by the check", share * 100.0))
                .unwrap_or_default();
            out.push_str(&format!(
                "  sync rounds         per node per second: {idle:.3} idle, {writing:.3} while writing{busiest}{spared}\n"
            ));
        }
        if !self.idle_cold_swim_per_node_per_s.is_empty() {
            let kinds = |rates: &[(String, f64)]| -> String {
                rates
                    .iter()
                    .map(|(kind, rate)| format!("{kind} {rate:.3}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let other = if self.idle_cold_other_per_node_per_s.is_empty() {
                String::new()
            } else {
                format!("; other: {}", kinds(&self.idle_cold_other_per_node_per_s))
            };
            out.push_str(&format!(
                "  cold SWIM sends     per node per second (idle): {}{other}\n",
                kinds(&self.idle_cold_swim_per_node_per_s)
            ));
        }
        if let Some(settled) = self.settled_nodes {
            out.push_str(&format!(
                "  membership          {settled}/{} nodes saw every other node before the writes{}{}\n",
                self.nodes,
                self.formation_s
                    .map_or(String::new(), |s| format!(", {s:.1} s after the last start")),
                self.swim_probe_ms
                    .map_or(String::new(), |ms| format!(" (SWIM probe every {ms} ms{})",
                        self.idle_swim_slowdown.map_or(String::new(), |x| format!(", {x:.2} times slower on average when idle"))))
            ));
        }
        out.push_str(&format!("  wall time           {:.1} s\n", self.wall_s));
        if let Some(lag) = self.node_p99_lag_ms {
            out.push_str(&format!(
                "  nodes' own p99 lag  {lag:.1} ms at most (their /v1/health, from the writers' commit times)\n"
            ));
        }
        if !self.streams_lost.is_empty() {
            out.push_str(&format!(
                "  WARNING             {} node streams ended during the run, their later deliveries are unknown: {}\n",
                self.streams_lost.len(),
                self.streams_lost.join("; ")
            ));
        }
        if !self.stragglers.is_empty() {
            out.push_str(&format!(
                "  STRAGGLERS          {} nodes missed writes:\n",
                self.stragglers.len()
            ));
            for line in &self.stragglers {
                out.push_str(&format!("                      {line}\n"));
            }
        }
        if !self.options.is_null() {
            out.push_str(&format!("  options             {}\n", self.options));
        }
        out
    }

    /// The raw figures as JSON.
    pub fn to_json(&self) -> Json {
        json!({
            "mode": self.mode,
            "nodes": self.nodes,
            "writes": self.coverage.len(),
            "time_to_all_ms": self.time_to_all_ms,
            "time_to_all_p50_ms": self.time_to_all(0.5),
            "time_to_all_p90_ms": self.time_to_all(0.9),
            "time_to_all_p99_ms": self.time_to_all(0.99),
            "time_to_all_max_ms": self.time_to_all(1.0),
            "time_to_99_nodes_ms": self.time_to_99_nodes_ms,
            "time_to_99_nodes_p50_ms": self.time_to_99_nodes(0.5),
            "time_to_99_nodes_p90_ms": self.time_to_99_nodes(0.9),
            "time_to_99_nodes_p99_ms": self.time_to_99_nodes(0.99),
            "last_node": self.last_node,
            "delivery_p50_ms": percentile(&self.delivery_ms, 0.5),
            "delivery_p99_ms": percentile(&self.delivery_ms, 0.99),
            "coverage": self.coverage,
            "sends_per_change_per_node": self.sends_per_change_per_node,
            "bytes_per_change_per_node": self.bytes_per_change_per_node,
            "broadcast_sends_per_change_per_node": self.broadcast_sends_per_change_per_node,
            "cpu_per_node": self.cpu_per_node,
            "idle_cpu_per_node": self.idle_cpu_per_node,
            "idle_after_cpu_per_node": self.idle_after_cpu_per_node,
            "write_cpu": self.write_cpu.map(|c| json!({
                "per_node_ms": c.per_node_ms,
                "all_nodes_ms": c.all_nodes_ms,
                "cores": c.cores,
                "floor_ms": c.floor_ms(),
            })),
            "memory_per_node_mib": self.memory_per_node_mib,
            "settled_nodes": self.settled_nodes,
            "formation_s": self.formation_s,
            "connections_per_node": self.connections_per_node,
            "handshakes_per_node_per_s": self.handshakes_per_node_per_s,
            "swim_fitted_per_node_per_s": self.swim_fitted_per_node_per_s,
            "handshakes_resumed_share": self.handshakes_resumed_share,
            "idle_cold_swim_per_node_per_s": self
                .idle_cold_swim_per_node_per_s
                .iter()
                .map(|(kind, rate)| (kind.clone(), json!(rate)))
                .collect::<serde_json::Map<_, _>>(),
            "idle_cold_other_per_node_per_s": self
                .idle_cold_other_per_node_per_s
                .iter()
                .map(|(kind, rate)| (kind.clone(), json!(rate)))
                .collect::<serde_json::Map<_, _>>(),
            "swim_probe_ms": self.swim_probe_ms,
            "first_hop_per_write": self.first_hop_per_write.map(|(sent, short)| json!({"sent": sent, "short": short})),
            "sync_rounds_per_node_per_s": self.sync_rounds_per_node_per_s.map(|(idle, writing)| json!({"idle": idle, "writing": writing, "spared_share_writing": self.sync_spared_share})),
            "sync_rounds_busiest_per_node_per_s": self.sync_rounds_busiest_per_node_per_s,
            "timeline": self.timeline.as_ref().map(Timeline::to_json),
            "idle_swim_slowdown": self.idle_swim_slowdown,
            "wall_s": self.wall_s,
            "options": self.options,
            "node_p99_lag_ms": self.node_p99_lag_ms,
            "streams_lost": self.streams_lost,
        })
    }

    /// Adds one write sent at `sent`, with when each node had it (None: never): its
    /// deliveries, its coverage and, if every node had it, its time to all. Sort
    /// `delivery_ms` once all writes are in.
    pub fn record_write(&mut self, sent: Instant, arrived: &[Option<Instant>]) {
        let delays: Vec<f64> = arrived
            .iter()
            .flatten()
            .map(|t| t.saturating_duration_since(sent).as_secs_f64() * 1e3)
            .collect();
        self.delivery_ms.extend(&delays);
        self.coverage
            .push(delays.len() as f64 / arrived.len().max(1) as f64);
        self.time_to_all_ms.push(
            (delays.len() == arrived.len()).then(|| delays.iter().copied().fold(0.0, f64::max)),
        );
        let mut sorted = delays;
        sorted.sort_by(f64::total_cmp);
        let most = (arrived.len() * 99).div_ceil(100).max(1);
        self.time_to_99_nodes_ms.push(sorted.get(most - 1).copied());
        let complete = arrived.iter().all(Option::is_some);
        self.last_node.push(
            arrived
                .iter()
                .enumerate()
                .filter(|_| complete)
                .filter_map(|(node, t)| t.map(|t| (t, node)))
                .max()
                .map(|(_, node)| node),
        );
    }

    /// Percentiles over the writes of the time until 99% of the nodes had them.
    pub fn time_to_99_nodes(&self, p: f64) -> Option<f64> {
        let mut done: Vec<f64> = self.time_to_99_nodes_ms.iter().flatten().copied().collect();
        done.sort_by(f64::total_cmp);
        percentile(&done, p)
    }

    /// The node that was last most often, and in how many of the writes every node had.
    pub fn most_often_last(&self) -> Option<(usize, usize)> {
        let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
        for node in self.last_node.iter().flatten() {
            *counts.entry(*node).or_default() += 1;
        }
        counts
            .into_iter()
            .max_by_key(|(node, count)| (*count, std::cmp::Reverse(*node)))
    }

    /// An SVG of the CDF of time to all nodes (and of per-node delivery), titled `title`.
    pub fn cdf_svg(&self, title: &str) -> Result<String, String> {
        let all: Vec<f64> = self.time_to_all_ms.iter().flatten().copied().collect();
        plot::cdf_svg(
            title,
            &[
                plot::Series {
                    samples: &all,
                    label: "time to all nodes (per write)",
                    color: plotters::style::RGBColor(200, 40, 40),
                },
                plot::Series {
                    samples: &self.delivery_ms,
                    label: "per-node delivery",
                    color: plotters::style::RGBColor(40, 90, 200),
                },
            ],
        )
    }
}

/// Runs the scenario on the simulator.
pub fn run_sim(options: &Options) -> Report {
    let started = Instant::now();
    let scenario = patina_sim::Scenario {
        nodes: options.nodes,
        writes: options.writes,
        write_interval_us: (1e6 / options.rate.max(0.001)) as u64,
        seed: options.seed,
        settle_ms: options.settle.as_millis() as u64,
        // Every agent knows every member; beyond 2,000 simulated nodes a partial view keeps
        // memory in bounds.
        view_size: if options.nodes > 2_000 {
            64
        } else {
            usize::MAX
        },
        ..patina_sim::Scenario::default()
    };
    let network = match options.latency {
        Latency::Wan => Network::wan(options.nodes, options.loss, options.seed),
        Latency::Uniform(ms) => Network::uniform(options.nodes, ms, options.loss),
        Latency::None => Network::uniform(options.nodes, 0.05, options.loss),
    };
    let report = patina_sim::run(&scenario, &network);
    Report {
        mode: "sim".into(),
        nodes: options.nodes,
        time_to_all_ms: report.time_to_all_ms.clone(),
        delivery_ms: report.delivery_ms.clone(),
        coverage: report.coverage.clone(),
        sends_per_change_per_node: report.sends_per_change_per_node,
        bytes_per_change_per_node: report.bytes_per_change_per_node,
        broadcast_sends_per_change_per_node: None,
        cpu_per_node: None,
        idle_cpu_per_node: None,
        memory_per_node_mib: None,
        settled_nodes: None,
        wall_s: started.elapsed().as_secs_f64(),
        ..Report::default()
    }
}

/// Messages that needed a new connection, summed over the agents.
fn cold_sends(agents: &[Agent]) -> patina::net::gossip::ColdSends {
    agents
        .iter()
        .fold(patina::net::gossip::ColdSends::default(), |mut sum, a| {
            let c = a.gossip().cold_sends;
            sum.swim += c.swim;
            sum.probes += c.probes;
            sum.links += c.links;
            sum.changes += c.changes;
            sum.sync += c.sync;
            for (total, kind) in sum.swim_by_kind.iter_mut().zip(c.swim_by_kind) {
                *total += kind;
            }
            sum
        })
}

/// How many times slower than configured SWIM runs, on average over the agents.
fn mean_swim_slowdown(agents: &[Agent]) -> f64 {
    let total: f64 = agents
        .iter()
        .map(|a| f64::from(a.gossip().swim_slowdown))
        .sum();
    total / agents.len().max(1) as f64
}

/// SWIM's cold sends by message kind, the most frequent first ("ping-req 120, ping 40").
fn swim_kinds(cold: &patina::net::gossip::ColdSends) -> String {
    let mut kinds: Vec<(u64, &str)> = cold
        .swim_by_kind
        .iter()
        .zip(patina::net::membership::SWIM_KINDS)
        .filter(|(n, _)| **n > 0)
        .map(|(n, kind)| (*n, kind))
        .collect();
    kinds.sort_by(|a, b| b.cmp(a));
    kinds
        .iter()
        .map(|(n, kind)| format!("{kind} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Direct copies of the agents' own changesets beyond their kept links: (sent, asked for and
/// not sent), summed over the agents.
fn first_hop(agents: &[Agent]) -> (u64, u64) {
    agents.iter().fold((0, 0), |(sent, short), a| {
        let g = a.gossip();
        (sent + g.first_hop.0, short + g.first_hop.1)
    })
}

/// Broadcast messages a node sent, the simulator's measure: pushes, announcements, grafts and
/// prunes (gossip_sent includes pushes over kept links).
fn broadcast_sent(gossip: &patina::net::gossip::GossipSnapshot) -> u64 {
    let b = gossip.broadcast;
    b.gossip_sent + gossip.first_hop.0 + b.ihave_sent + b.grafts_sent + b.prunes_sent
}

pub(crate) fn bar(progress: bool, len: usize, what: &str) -> indicatif::ProgressBar {
    if !progress {
        return indicatif::ProgressBar::hidden();
    }
    // Bars are drawn on a terminal only: into a log (a CI job, a run in the background, a
    // profiler waiting for the writes) each phase says when it starts instead.
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprintln!("{what} ({len})");
    }
    let bar = indicatif::ProgressBar::new(len as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_string());
    bar
}

/// Polls `reached` (deliveries so far) until it counts `total` or `settle` passes, showing
/// progress.
pub(crate) async fn wait_until_spread(
    progress: bool,
    total: usize,
    settle: Duration,
    mut reached: impl FnMut() -> usize,
) {
    let spreading = bar(progress, total, "spreading");
    let deadline = Instant::now() + settle;
    loop {
        let now_reached = reached();
        spreading.set_position(now_reached as u64);
        if now_reached == total || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    spreading.finish_and_clear();
}

/// The nodes that missed some write (at most 20 described), each with its gossip state.
fn stragglers(
    agents: &[Agent],
    writes: &[(ChangesetId, Instant)],
    arrivals: &HashMap<ChangesetId, Vec<Option<Instant>>>,
) -> Vec<String> {
    let mut known_by: HashMap<SocketAddr, usize> = HashMap::new();
    for agent in agents {
        for addr in agent.gossip().members.values() {
            *known_by.entry(*addr).or_default() += 1;
        }
    }
    let mut out = Vec::new();
    let mut count = 0;
    for (i, agent) in agents.iter().enumerate() {
        let missed = writes
            .iter()
            .filter(|(id, _)| arrivals.get(id).is_none_or(|v| v[i].is_none()))
            .count();
        if missed == 0 {
            continue;
        }
        count += 1;
        if out.len() < 20 {
            let g = agent.gossip();
            out.push(format!(
                "node {i} ({}): missed {missed}/{} writes; knows {} members (foca {}), known by {}; {} connections open, {} opened, {} handshake failures; sync {} ok / {} failed, {} changesets; broadcast delivered {}, {} dropped at the store, {} refused; kept links near {} far {} feeding {}",
                agent.gossip_addr(),
                writes.len(),
                g.members.len(),
                g.foca_members,
                known_by.get(&agent.gossip_addr()).copied().unwrap_or(0),
                g.connections_open,
                g.connections_opened,
                g.handshake_failures,
                g.sync_rounds,
                g.sync_failures,
                g.sync_received,
                g.broadcast.delivered,
                g.apply_dropped,
                g.refused,
                g.kept_links.0,
                g.kept_links.1,
                g.kept_links.2,
            ));
        }
    }
    if count > out.len() {
        out.push(format!("... and {} more", count - out.len()));
    }
    out
}

/// The step of [`Report::timeline`].
pub const TIMELINE_STEP: Duration = Duration::from_millis(100);

/// The window of [`Report::sync_rounds_busiest_per_node_per_s`], in timeline steps.
const BUSIEST_STEPS: usize = 5;

/// What the agents did in each step of the write phase, from their published counters and the
/// process's CPU time (whose clock ticks every 10 ms).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timeline {
    /// When each write was made, ms from the phase's start.
    pub writes_at_ms: Vec<f64>,
    /// Per step: when it ended, ms from the phase's start (a busy machine stretches steps).
    pub at_ms: Vec<f64>,
    /// Per step: CPU time of the process, in cores.
    pub cpu_cores: Vec<f64>,
    /// Per step: sync rounds that ended, over all agents.
    pub sync_rounds: Vec<u64>,
    /// Per step: connections opened (handshakes), over all agents.
    pub handshakes: Vec<u64>,
    /// Per step: messages that needed a new connection, over all agents, by what they were:
    /// SWIM, changes (changesets, announcements, grafts), sync, and the overlay's upkeep
    /// (round-trip probes, kept-link requests).
    pub cold_sends: [Vec<u64>; 4],
}

impl Timeline {
    fn to_json(&self) -> Json {
        json!({
            "step_ms": TIMELINE_STEP.as_millis() as u64,
            "writes_at_ms": self.writes_at_ms,
            "at_ms": self.at_ms,
            "cpu_cores": self.cpu_cores,
            "sync_rounds": self.sync_rounds,
            "handshakes": self.handshakes,
            "cold_swim": self.cold_sends[0],
            "cold_changes": self.cold_sends[1],
            "cold_sync": self.cold_sends[2],
            "cold_upkeep": self.cold_sends[3],
        })
    }

    /// The most sync rounds that ended within [`BUSIEST_STEPS`] steps, per node per second
    /// of those steps.
    fn busiest_sync_per_node_per_s(&self, nodes: usize) -> f64 {
        let steps = BUSIEST_STEPS.min(self.sync_rounds.len());
        (steps..=self.sync_rounds.len())
            .filter(|&end| end > 0)
            .map(|end| {
                let start = end - steps;
                let began = if start == 0 {
                    0.0
                } else {
                    self.at_ms[start - 1]
                };
                let rounds: u64 = self.sync_rounds[start..end].iter().sum();
                rounds as f64 * 1000.0 / (self.at_ms[end - 1] - began).max(1.0)
            })
            .fold(0.0, f64::max)
            / nodes.max(1) as f64
    }
}

/// Samples the agents' counters every [`TIMELINE_STEP`] from `started` until `stop` turns true.
async fn sample_timeline(
    agents: Vec<tokio::sync::watch::Receiver<patina::net::gossip::GossipSnapshot>>,
    started: Instant,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Timeline {
    // Sync rounds, handshakes, then cold sends of each kind.
    let counts = || -> [u64; 6] {
        agents.iter().fold([0; 6], |mut sum, g| {
            let g = g.borrow();
            let cold = &g.cold_sends;
            let now = [
                g.sync_rounds + g.sync_failures,
                g.connections_opened,
                cold.swim,
                cold.changes,
                cold.sync,
                cold.probes + cold.links,
            ];
            for (total, count) in sum.iter_mut().zip(now) {
                *total += count;
            }
            sum
        })
    };
    let mut timeline = Timeline::default();
    let mut tick = tokio::time::interval(TIMELINE_STEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut last = (counts(), patina_tests::process_usage().1, Instant::now());
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        tick.tick().await;
        let now = (counts(), patina_tests::process_usage().1, Instant::now());
        let delta: Vec<u64> = now
            .0
            .iter()
            .zip(last.0)
            .map(|(a, b)| a.saturating_sub(b))
            .collect();
        timeline.sync_rounds.push(delta[0]);
        timeline.handshakes.push(delta[1]);
        for (kind, count) in timeline.cold_sends.iter_mut().zip(&delta[2..]) {
            kind.push(*count);
        }
        timeline
            .cpu_cores
            .push((now.1 - last.1) / (now.2 - last.2).as_secs_f64().max(1e-3));
        timeline
            .at_ms
            .push(now.2.saturating_duration_since(started).as_secs_f64() * 1000.0);
        last = now;
    }
    timeline
}

/// Runs the scenario with real agents in this process.
pub async fn run_live(options: &Options) -> Report {
    let started = Instant::now();
    let root = tempfile::tempdir().expect("a temporary folder");
    let ca = patina::net::tls::generate_ca().expect("a CA");
    let network = match options.latency {
        Latency::Wan => Some(Network::wan(options.nodes, 0.0, options.seed)),
        Latency::Uniform(ms) => Some(Network::uniform(options.nodes, ms, 0.0)),
        Latency::None => None,
    };
    // Start the nodes, each joining through the first and one other random node.
    let mut agents: Vec<Agent> = Vec::with_capacity(options.nodes);
    let starting = bar(options.progress, options.nodes, "starting");
    let mut rng = patina_core::stats::SplitMix64::new(options.seed);
    for i in 0..options.nodes {
        let dir = root.path().join(format!("n{i}"));
        let mut bootstrap = Vec::new();
        if let Some(first) = agents.first() {
            bootstrap.push(first.gossip_addr());
            let other = rng.below(agents.len() as u64) as usize;
            bootstrap.push(agents[other].gossip_addr());
        }
        let mut config: Config = patina_tests::node_config(&dir, &bootstrap);
        config.telemetry.prometheus_addr = None;
        config.gossip.sync_interval_ms = options.sync_interval_ms;
        config.gossip.swim_probe_period_ms = options.swim_probe_ms;
        config.gossip.sealed_datagrams = options.sealed_datagrams;
        if let Some(idle_ms) = options.connection_idle_ms {
            config.gossip.connection_idle_ms = idle_ms;
        }
        if let Some(near) = options.near_peers {
            config.gossip.near_peers = near;
        }
        if let Some(far) = options.far_peers {
            config.gossip.far_peers = far;
        }
        if let Some(fanout) = options.origin_fanout {
            config.gossip.origin_fanout = fanout;
        }
        config.api.query_connections = 1;
        if options.tls {
            config = patina_tests::with_tls(config, &dir, &ca);
        }
        agents.push(Agent::start(&config).await.expect("an agent"));
        starting.inc(1);
    }
    starting.finish_and_clear();
    // Membership: wait until every node sees every other (bounded).
    // Looked up for every message an agent sends (its delay): hashed with foldhash, as the
    // engine's own maps on that path, so the model costs the run little CPU of its own.
    let index: HashMap<SocketAddr, usize, foldhash::fast::RandomState> = agents
        .iter()
        .enumerate()
        .map(|(i, a)| (a.gossip_addr(), i))
        .collect();
    // WAN emulation, from the start (probes measure it): each node delays what it sends by the latency to the destination.
    for (i, agent) in agents.iter().enumerate() {
        if let Some(network) = &network {
            let network = network.clone();
            let index = index.clone();
            agent.faults().set_latency(Arc::new(move |to: SocketAddr| {
                index.get(&to).map_or(Duration::ZERO, |&j| {
                    Duration::from_micros(network.base_latency_us(i, j) as u64)
                })
            }));
        }
        agent.faults().drop_per_mille.store(
            (options.loss * 1000.0).round() as u32,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
    let last_started = Instant::now();
    let settling = bar(options.progress, options.nodes, "membership");
    let deadline = Instant::now() + Duration::from_secs(60 + options.nodes as u64 / 4);
    let mut settled = 0;
    let mut formation_s = None;
    while Instant::now() < deadline {
        settled = agents
            .iter()
            .filter(|a| a.gossip().members.len() + 1 == options.nodes)
            .count();
        settling.set_position(settled as u64);
        let (known, open, opened) = agents.iter().fold((0, 0, 0), |(k, o, h), a| {
            let g = a.gossip();
            (
                k + g.members.len(),
                o + g.connections_open,
                h + g.connections_opened,
            )
        });
        // The details cost a million map inserts a round at 1,000 nodes (a fifth of the CPU
        // while the cluster forms): only for the progress bar that shows them.
        if options.progress {
            let cold = cold_sends(&agents);
            // The node the fewest others know: a node missing from many views is a join that
            // did not spread or a node falsely declared down; a few views each missing a
            // different node is an update that died out.
            let mut known_by: HashMap<SocketAddr, usize> = HashMap::new();
            for agent in &agents {
                for addr in agent.gossip().members.values() {
                    *known_by.entry(*addr).or_default() += 1;
                }
            }
            let least_known = agents
                .iter()
                .map(|a| known_by.get(&a.gossip_addr()).copied().unwrap_or(0))
                .min()
                .unwrap_or(0);
            let slowdown = mean_swim_slowdown(&agents);
            settling.set_message(format!(
                "membership: {:.1}% of members known, least known node in {least_known} views, SWIM slowdown {slowdown:.2}, {:.1} connections per node, {opened} handshakes (cold sends: swim {} [{}] probes {} links {} changes {} sync {})",
                known as f64 * 100.0 / (options.nodes * (options.nodes - 1)).max(1) as f64,
                open as f64 / options.nodes as f64,
                cold.swim, swim_kinds(&cold), cold.probes, cold.links, cold.changes, cold.sync
            ));
        }
        if settled == options.nodes {
            formation_s = Some(last_started.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    settling.finish_and_clear();
    // Round-trip probes find each node's near peers; give them time (the simulator's
    // warm-up does the same).
    tokio::time::sleep(options.warmup).await;
    // Idle cost: two seconds with nothing written.
    let opened =
        |agents: &[Agent]| -> u64 { agents.iter().map(|a| a.gossip().connections_opened).sum() };
    let idle_window = Duration::from_secs(5);
    let (_, idle_cpu_before) = patina_tests::process_usage();
    let resumed =
        |agents: &[Agent]| -> u64 { agents.iter().map(|a| a.gossip().handshakes_resumed).sum() };
    let sync_rounds = |agents: &[Agent]| -> u64 {
        agents
            .iter()
            .map(|a| a.gossip().sync_rounds + a.gossip().sync_failures)
            .sum()
    };
    let sync_idle_before = sync_rounds(&agents);
    let opened_before = opened(&agents);
    let resumed_before = resumed(&agents);
    let cold_before = cold_sends(&agents);
    let swim_fitted =
        |agents: &[Agent]| -> u64 { agents.iter().map(|a| a.gossip().swim_fitted).sum() };
    let fitted_before = swim_fitted(&agents);
    tokio::time::sleep(idle_window).await;
    let (idle_rss, idle_cpu_after) = patina_tests::process_usage();
    let idle_s = idle_window.as_secs_f64();
    let idle_cpu = (idle_cpu_after - idle_cpu_before) / idle_s / options.nodes as f64;
    let idle_opened = opened(&agents) - opened_before;
    let idle_sync =
        (sync_rounds(&agents) - sync_idle_before) as f64 / idle_s / options.nodes as f64;
    let handshakes = idle_opened as f64 / idle_s / options.nodes as f64;
    let idle_fitted = (swim_fitted(&agents) - fitted_before) as f64 / idle_s / options.nodes as f64;
    let handshakes_resumed_share =
        (idle_opened > 0).then(|| (resumed(&agents) - resumed_before) as f64 / idle_opened as f64);
    let cold_after = cold_sends(&agents);
    let idle_slowdown = mean_swim_slowdown(&agents);
    let mut idle_cold_swim: Vec<(String, f64)> = patina::net::membership::SWIM_KINDS
        .iter()
        .enumerate()
        .map(|(i, kind)| {
            let sent = cold_after.swim_by_kind[i] - cold_before.swim_by_kind[i];
            (
                kind.to_string(),
                sent as f64 / idle_s / options.nodes as f64,
            )
        })
        .filter(|(_, rate)| *rate > 0.0)
        .collect();
    idle_cold_swim.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut idle_cold_other: Vec<(String, f64)> = [
        ("probe", cold_after.probes - cold_before.probes),
        ("kept-link", cold_after.links - cold_before.links),
        ("change", cold_after.changes - cold_before.changes),
        ("sync", cold_after.sync - cold_before.sync),
    ]
    .into_iter()
    .map(|(kind, sent)| {
        (
            kind.to_string(),
            sent as f64 / idle_s / options.nodes as f64,
        )
    })
    .filter(|(_, rate)| *rate > 0.0)
    .collect();
    idle_cold_other.sort_by(|a, b| b.1.total_cmp(&a.1));
    let connections = agents
        .iter()
        .map(|a| a.gossip().connections_open as f64)
        .sum::<f64>()
        / options.nodes as f64;

    // Record every apply on every node.
    type Arrivals = Arc<Mutex<HashMap<ChangesetId, Vec<Option<Instant>>>>>;
    let arrivals: Arrivals = Arc::new(Mutex::new(HashMap::new()));
    let n = options.nodes;
    let mut listeners = Vec::new();
    for (i, agent) in agents.iter().enumerate() {
        let mut applied = agent.subscribe_applied();
        let arrivals = arrivals.clone();
        listeners.push(tokio::spawn(async move {
            while let Ok(event) = applied.recv().await {
                let mut map = arrivals.lock().unwrap_or_else(|e| e.into_inner());
                let slot = map.entry(event.id).or_insert_with(|| vec![None; n]);
                slot[i].get_or_insert(event.at);
            }
        }));
    }
    let sent_before: (u64, u64) = agents.iter().fold((0, 0), |(m, b), a| {
        let g = a.gossip();
        (m + g.transport_sent, b + g.transport_bytes)
    });
    let broadcast_before: u64 = agents.iter().map(|a| broadcast_sent(&a.gossip())).sum();
    let first_hop_before = first_hop(&agents);
    let sync_before = sync_rounds(&agents);
    let spared = |agents: &[Agent]| -> u64 { agents.iter().map(|a| a.gossip().sync_spared).sum() };
    let spared_before = spared(&agents);
    let stop_sampling = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (_, cpu_before) = patina_tests::process_usage();
    let write_phase = Instant::now();
    let sampler = tokio::spawn(sample_timeline(
        agents.iter().map(Agent::gossip_watch).collect(),
        write_phase,
        stop_sampling.clone(),
    ));

    // Writes at the set rate on random nodes.
    let writing = bar(options.progress, options.writes, "writing");
    let interval = Duration::from_secs_f64(1.0 / options.rate.max(0.001));
    let mut writes: Vec<(ChangesetId, Instant)> = Vec::with_capacity(options.writes);
    for w in 0..options.writes {
        let due = write_phase + interval * w as u32;
        tokio::time::sleep_until(due.into()).await;
        let writer = rng.below(n as u64) as usize;
        let body = serde_json::to_vec(&json!([format!(
            "INSERT INTO kv (k, v) VALUES ('w{w}', 'loadgen')"
        )]))
        .expect("JSON");
        let sent = Instant::now();
        let (status, out) = request(
            &Target::Tcp(agents[writer].api_addr()),
            Method::POST,
            "/v1/transactions",
            None,
            body,
        )
        .await
        .expect("the writer answers");
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&out));
        let answer: Json = serde_json::from_slice(&out).expect("JSON answer");
        let version = answer["version"].as_u64().expect("a version");
        let id = ChangesetId {
            site: agents[writer].site_id(),
            version: DbVersion(version),
        };
        // The writer has it from its own commit.
        arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id)
            .or_insert_with(|| vec![None; n])[writer]
            .get_or_insert(sent);
        writes.push((id, sent));
        writing.inc(1);
    }
    writing.finish_and_clear();
    // Wait for every write to reach every node, or give up after `settle`.
    wait_until_spread(options.progress, options.writes * n, options.settle, || {
        let map = arrivals.lock().unwrap_or_else(|e| e.into_inner());
        writes
            .iter()
            .map(|(id, _)| map.get(id).map_or(0, |v| v.iter().flatten().count()))
            .sum()
    })
    .await;
    let phase = write_phase.elapsed().as_secs_f64();
    let (_, cpu_after) = patina_tests::process_usage();
    let sent_after: (u64, u64) = agents.iter().fold((0, 0), |(m, b), a| {
        let g = a.gossip();
        (m + g.transport_sent, b + g.transport_bytes)
    });
    let broadcast_after: u64 = agents.iter().map(|a| broadcast_sent(&a.gossip())).sum();
    let first_hop_after = first_hop(&agents);
    let per_write =
        |after: u64, before: u64| (after - before) as f64 / options.writes.max(1) as f64;
    let writing_rounds = sync_rounds(&agents) - sync_before;
    let writing_sync = writing_rounds as f64 / phase / n as f64;
    let sync_spared_share = (writing_rounds > 0)
        .then(|| (spared(&agents) - spared_before) as f64 / writing_rounds as f64);
    stop_sampling.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut timeline = sampler.await.expect("the timeline's sampler");
    timeline.writes_at_ms = writes
        .iter()
        .map(|(_, sent)| sent.duration_since(write_phase).as_secs_f64() * 1000.0)
        .collect();
    for l in listeners {
        l.abort();
    }
    let map = arrivals.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let stragglers = stragglers(&agents, &writes, &map);
    // Idle again once the sync rounds the last write brought in have run (a delivery brings a
    // node's next round within 2.5 intervals), to bound the idle load's drift over the phase.
    let tail =
        (Duration::from_millis(options.sync_interval_ms) * 5 / 2).min(Duration::from_secs(10));
    tokio::time::sleep(tail).await;
    let (_, idle_after_from) = patina_tests::process_usage();
    tokio::time::sleep(idle_window).await;
    let (_, idle_after_to) = patina_tests::process_usage();
    let idle_after = (idle_after_to - idle_after_from) / idle_s / n as f64;
    let mut report = Report {
        mode: "live".into(),
        nodes: n,
        settled_nodes: Some(settled),
        formation_s,
        connections_per_node: Some(connections),
        handshakes_per_node_per_s: Some(handshakes),
        swim_fitted_per_node_per_s: Some(idle_fitted),
        handshakes_resumed_share,
        idle_cold_swim_per_node_per_s: idle_cold_swim,
        idle_cold_other_per_node_per_s: idle_cold_other,
        idle_swim_slowdown: Some(idle_slowdown),
        swim_probe_ms: Some(options.swim_probe_ms),
        sync_rounds_per_node_per_s: Some((idle_sync, writing_sync)),
        sync_spared_share,
        sync_rounds_busiest_per_node_per_s: Some(timeline.busiest_sync_per_node_per_s(n)),
        timeline: Some(timeline),
        first_hop_per_write: Some((
            per_write(first_hop_after.0, first_hop_before.0),
            per_write(first_hop_after.1, first_hop_before.1),
        )),
        memory_per_node_mib: Some(idle_rss / n as f64),
        idle_cpu_per_node: Some(idle_cpu),
        idle_after_cpu_per_node: Some(idle_after),
        cpu_per_node: Some((cpu_after - cpu_before) / phase / n as f64),
        write_cpu: WriteCpu::measure(
            cpu_after - cpu_before,
            phase,
            idle_cpu,
            Some(idle_after),
            n,
            options.writes,
            std::thread::available_parallelism().map_or(1, |c| c.get()),
        ),
        stragglers,
        ..Report::default()
    };
    for (id, sent) in &writes {
        let none = vec![None; n];
        report.record_write(*sent, map.get(id).unwrap_or(&none));
    }
    report.delivery_ms.sort_by(f64::total_cmp);
    let per = (options.writes.max(1) * n) as f64;
    report.sends_per_change_per_node = (sent_after.0 - sent_before.0) as f64 / per;
    report.bytes_per_change_per_node = (sent_after.1 - sent_before.1) as f64 / per;
    report.broadcast_sends_per_change_per_node =
        Some(broadcast_after.saturating_sub(broadcast_before) as f64 / per);
    // All at once: each shutdown waits up to a second for its endpoint to drain.
    let stopping = bar(options.progress, n, "stopping");
    let mut shutdowns = tokio::task::JoinSet::new();
    for agent in agents {
        shutdowns.spawn(agent.shutdown());
    }
    while shutdowns.join_next().await.is_some() {
        stopping.inc(1);
    }
    stopping.finish_and_clear();
    report.wall_s = started.elapsed().as_secs_f64();
    report
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{Report, WriteCpu};

    #[test]
    fn a_write_late_on_one_node_is_told_from_a_slow_wave() {
        // 200 nodes have a write 1..=200 ms after it was sent, but node 17 at 900 ms; a second
        // write never reaches node 3.
        let sent = Instant::now();
        let at = |ms: u64| Some(sent + Duration::from_millis(ms));
        let mut arrived: Vec<Option<Instant>> = (1..=200).map(at).collect();
        arrived[17] = at(900);
        let mut report = Report::default();
        report.record_write(sent, &arrived);
        arrived[3] = None;
        report.record_write(sent, &arrived);
        assert_eq!(report.time_to_all_ms, [Some(900.0), None]);
        // 99% of 200 is the 198th delivery: of 1..=200 less 18 (and 900), 199 ms; less 4 as
        // well for the second write, 200 ms.
        assert_eq!(report.time_to_99_nodes_ms, [Some(199.0), Some(200.0)]);
        assert_eq!(report.last_node, [Some(17), None]);
        assert_eq!(report.most_often_last(), Some((17, 1)));
        assert!(report
            .table()
            .contains("last node most often: node 17, in 1 of 1 writes"));
    }

    #[test]
    fn a_writes_cpu_is_what_the_phase_took_beyond_idle() {
        // 300 nodes idle at 0.1% of a core each (0.3 cores); 40 s of writes took 60 CPU
        // seconds, 12 of them idle: 48 s for 200 writes is 240 ms a write, 0.8 ms per node,
        // 120 ms of 2 cores.
        let cost = WriteCpu::measure(60.0, 40.0, 0.001, None, 300, 200, 2).unwrap();
        assert!((cost.all_nodes_ms - 240.0).abs() < 1e-9, "{cost:?}");
        assert!((cost.per_node_ms - 0.8).abs() < 1e-9, "{cost:?}");
        assert!((cost.floor_ms() - 120.0).abs() < 1e-9, "{cost:?}");
        // Less than idle (noise) is no cost, not a negative one; no writes, no figure.
        assert_eq!(
            WriteCpu::measure(5.0, 40.0, 0.001, None, 300, 200, 2)
                .unwrap()
                .all_nodes_ms,
            0.0
        );
        assert_eq!(WriteCpu::measure(60.0, 40.0, 0.001, None, 300, 0, 2), None);
    }

    #[test]
    fn an_idle_load_that_drifts_over_the_phase_is_not_counted_as_the_writes() {
        // 800 nodes idle at 0.13% of a core each before 10 writes over 50 s, and at 0.07%
        // after them: a young cluster's load falling in a straight line, 0.8 cores on average,
        // 40 CPU seconds of the phase. The writes took 2 s more in all, 200 ms a write.
        let cost = WriteCpu::measure(42.0, 50.0, 0.0013, Some(0.0007), 800, 10, 2).unwrap();
        assert!((cost.all_nodes_ms - 200.0).abs() < 1e-6, "{cost:?}");
        assert!((cost.per_node_ms - 0.25).abs() < 1e-9, "{cost:?}");
        // From the idle figure before the writes alone, the drift hid them entirely.
        let before_only = WriteCpu::measure(42.0, 50.0, 0.0013, None, 800, 10, 2).unwrap();
        assert_eq!(before_only.all_nodes_ms, 0.0);
        let table = Report {
            cpu_per_node: Some(0.00105),
            idle_cpu_per_node: Some(0.0013),
            idle_after_cpu_per_node: Some(0.0007),
            memory_per_node_mib: Some(4.0),
            write_cpu: Some(cost),
            ..Report::default()
        }
        .table();
        assert!(
            table.contains("0.13% idle before the writes and 0.07% after"),
            "{table}"
        );
        assert!(table.contains("0.25 ms per node beyond idle"), "{table}");
    }
}
