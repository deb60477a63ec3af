//! `patina-sim`: runs one scenario and prints its seed and report.
//!
//! `cargo run --release -p patina-sim -- --nodes 10000 --writes 100 --model wan [--latency-ms 100]
//! [--loss 0.01] [--seed 1] [--view 12] [--eager 4] [--lazy 4] [--sync-ms 500 | --no-sync] [--no-sync-check]
//! [--partition-ms 0..3000] [--crash-share 0.05] [--crash-down-ms 2000]`

use std::time::Instant;

use patina_sim::network::Network;
use patina_sim::{run, Scenario};

/// Runs one scenario of the simulator and prints its seed and report. Unset options keep the
/// scenario's defaults (those of the production configuration).
#[derive(clap::Parser)]
#[command(name = "patina-sim")]
struct Args {
    /// Nodes.
    #[arg(long)]
    nodes: Option<usize>,
    /// Writes, each on a random node that is up.
    #[arg(long)]
    writes: Option<usize>,
    /// Seed of everything random.
    #[arg(long)]
    seed: Option<u64>,
    /// Peers each node knows (default: every other).
    #[arg(long)]
    view: Option<usize>,
    /// Eager broadcast peers.
    #[arg(long)]
    eager: Option<usize>,
    /// Lazy broadcast peers.
    #[arg(long)]
    lazy: Option<usize>,
    /// Kept links to the nearest peers.
    #[arg(long)]
    near: Option<usize>,
    /// Kept links to random far peers.
    #[arg(long)]
    far: Option<usize>,
    /// Peers probed for round-trip times per round.
    #[arg(long)]
    probe_sample: Option<usize>,
    /// Members a node's own changesets go to directly at most (its kept links, then random
    /// members; at most one in 16).
    #[arg(long)]
    origin_fanout: Option<usize>,
    /// Time between probe rounds (ms).
    #[arg(long)]
    probe_ms: Option<u64>,
    /// Virtual time before the first write (ms).
    #[arg(long)]
    warmup_ms: Option<u64>,
    /// Latency model.
    #[arg(long, value_enum, default_value = "wan")]
    model: LatencyModel,
    /// One-way latency of the uniform model (ms).
    #[arg(long, default_value_t = 100.0)]
    latency_ms: f64,
    /// Share of messages lost (0..=1).
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Time between sync rounds of one node (ms).
    #[arg(long, conflicts_with = "no_sync")]
    sync_ms: Option<u64>,
    /// No anti-entropy sync.
    #[arg(long)]
    no_sync: bool,
    /// Every sync round opens a session, with no check before it.
    #[arg(long)]
    no_sync_check: bool,
    /// Cut the cluster in two halves from FROM to TO (ms after the first write): FROM..TO.
    #[arg(long, value_parser = parse_span)]
    partition_ms: Option<(u64, u64)>,
    /// Share of nodes that crash during the writes (0..=1).
    #[arg(long)]
    crash_share: Option<f64>,
    /// How long a crashed node stays down (ms).
    #[arg(long)]
    crash_down_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LatencyModel {
    /// Nodes placed in regions with measured inter-region latencies.
    Wan,
    /// The same latency between every pair.
    Uniform,
}

fn parse_span(text: &str) -> Result<(u64, u64), String> {
    let (from, to) = text
        .split_once("..")
        .ok_or_else(|| format!("{text}: expected FROM..TO"))?;
    let ms = |v: &str| v.parse::<u64>().map_err(|e| format!("{v}: {e}"));
    Ok((ms(from)?, ms(to)?))
}

fn main() {
    let args = <Args as clap::Parser>::parse();
    let mut scenario = Scenario::default();
    let set = |slot: &mut usize, value: Option<usize>| {
        if let Some(v) = value {
            *slot = v;
        }
    };
    set(&mut scenario.nodes, args.nodes);
    set(&mut scenario.writes, args.writes);
    set(&mut scenario.view_size, args.view);
    set(&mut scenario.broadcast.eager_peers_max, args.eager);
    set(&mut scenario.broadcast.lazy_peers_max, args.lazy);
    set(&mut scenario.broadcast.near_peers, args.near);
    set(&mut scenario.broadcast.far_peers, args.far);
    set(&mut scenario.broadcast.probe_sample, args.probe_sample);
    set(&mut scenario.broadcast.origin_fanout, args.origin_fanout);
    scenario.seed = args.seed.unwrap_or(scenario.seed);
    scenario.broadcast.probe_interval_ms = args
        .probe_ms
        .unwrap_or(scenario.broadcast.probe_interval_ms);
    scenario.warmup_ms = args.warmup_ms.unwrap_or(scenario.warmup_ms);
    if args.no_sync {
        scenario.sync_interval_ms = None;
    } else if let Some(ms) = args.sync_ms {
        scenario.sync_interval_ms = Some(ms);
    }
    scenario.sync_check = !args.no_sync_check;
    scenario.partition_ms = args.partition_ms.or(scenario.partition_ms);
    scenario.crash_share = args.crash_share.unwrap_or(scenario.crash_share);
    scenario.crash_down_ms = args.crash_down_ms.unwrap_or(scenario.crash_down_ms);
    let (model, loss) = (args.model, args.loss);
    let network = match model {
        LatencyModel::Wan => Network::wan(scenario.nodes, loss, scenario.seed),
        LatencyModel::Uniform => Network::uniform(scenario.nodes, args.latency_ms, loss),
    };
    println!(
        "seed {} nodes {} writes {} model {} loss {loss}",
        scenario.seed,
        scenario.nodes,
        scenario.writes,
        format!("{model:?}").to_lowercase()
    );
    let started = Instant::now();
    let report = run(&scenario, &network);
    let covered = report.coverage.iter().filter(|c| **c == 1.0).count();
    println!(
        "time to all nodes: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {covered}/{} writes reached every node",
        report.percentile_ms(0.5).unwrap_or(f64::NAN),
        report.percentile_ms(0.9).unwrap_or(f64::NAN),
        report.percentile_ms(0.99).unwrap_or(f64::NAN),
        report.percentile_ms(1.0).unwrap_or(f64::NAN),
        report.coverage.len()
    );
    println!(
        "per-node delivery: p50 {:.1} ms, p99 {:.1} ms",
        report.delivery_percentile_ms(0.5).unwrap_or(f64::NAN),
        report.delivery_percentile_ms(0.99).unwrap_or(f64::NAN),
    );
    println!(
        "broadcast: sends per change per node {:.2}, bytes per change per node {:.0}",
        report.sends_per_change_per_node, report.bytes_per_change_per_node,
    );
    println!(
        "sync: {:.1} messages and {:.0} bytes per node over {:.1} s after the first write; {} deliveries made by sync; {:.1} upkeep messages (probes, kept-link requests) per node in all",
        report.sync_sends_per_node,
        report.sync_bytes_per_node,
        report.duration_ms / 1000.0,
        report.repaired_by_sync,
        report.upkeep_sends_per_node,
    );
    println!(
        "{} events in {:.2} s wall",
        report.events,
        started.elapsed().as_secs_f64()
    );
}
