//! What one anti-entropy round costs between agents that hold the same versions (the common
//! round of a cluster that has converged): the CPU of the whole process (both ends) and the
//! bytes the asking node sends and receives, with the sync check (`gossip.sync_check`, the
//! default: a datagram each way, no session when the state hashes agree) and without it (a
//! session on a QUIC stream each time).
//!
//! N agents on loopback each write one row (so the sync state names N sites), converge, then
//! idle for S seconds three times: with sync rounds every `--interval-ms` (backed off as a
//! quiet cluster backs off, up to 8 intervals) and checks, the same without checks, and with
//! no rounds at all (the baseline: SWIM and timers). A round's CPU is the difference to the
//! baseline over the rounds made.
//!
//! `cargo run --release -p patina-bench --bin sync_round_cost -- [--nodes 4] [--seconds 10] [--interval-ms 20]`

use std::time::Duration;

use patina::agent::Agent;
use patina_tests::{exec, rows, wait_for};
use serde_json::json;

/// Agents on loopback (in `dirs`), one row written on each, every row everywhere.
async fn converged_cluster(
    dirs: &[tempfile::TempDir],
    interval_ms: u64,
    sync_check: bool,
) -> Vec<Agent> {
    let nodes = dirs.len();
    let agents = patina_tests::start_cluster_with(dirs, None, |config| {
        config.telemetry.prometheus_addr = None;
        config.gossip.sync_interval_ms = interval_ms;
        config.gossip.sync_check = sync_check;
    })
    .await;
    for (i, agent) in agents.iter().enumerate() {
        exec(
            agent,
            &format!("INSERT INTO kv (k, v) VALUES ('n{i}', 'v')"),
        )
        .await;
    }
    for agent in &agents {
        wait_for("every row everywhere", || async {
            rows(agent, "SELECT count(*) FROM kv").await == vec![json!([nodes])]
        })
        .await;
    }
    agents
}

/// Rounds ended, rounds spared, session bytes, CPU seconds and wall seconds over `seconds`.
async fn measure(agents: &[Agent], seconds: u64) -> (u64, u64, u64, f64) {
    let totals = |agents: &[Agent]| {
        agents.iter().fold((0, 0, 0), |(r, s, b), a| {
            let g = a.gossip();
            (
                r + g.sync_rounds + g.sync_failures,
                s + g.sync_spared,
                b + g.sync_bytes,
            )
        })
    };
    // Let rounds that began before convergence end and the back-off settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (r0, s0, b0) = totals(agents);
    let (_, cpu0) = patina_tests::process_usage();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let (_, cpu1) = patina_tests::process_usage();
    let (r1, s1, b1) = totals(agents);
    (r1 - r0, s1 - s0, b1 - b0, cpu1 - cpu0)
}

/// One sync round's cost between agents that hold the same versions, with and without the
/// sync check.
#[derive(clap::Parser)]
struct Args {
    /// Agents (each writes one row: sites named in a sync request).
    #[arg(long, default_value_t = 4)]
    nodes: usize,
    /// Seconds of each measured window.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Sync interval of every agent (ms).
    #[arg(long, default_value_t = 20)]
    interval_ms: u64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Args {
        nodes,
        seconds,
        interval_ms,
    } = clap::Parser::parse();
    let mut baseline_cpu_per_s = None;
    for (name, interval, check) in [
        ("no rounds (baseline)", 600_000, true),
        ("rounds with the check", interval_ms, true),
        ("rounds without the check", interval_ms, false),
    ] {
        let dirs: Vec<_> = (0..nodes).map(|_| tempfile::tempdir().unwrap()).collect();
        let agents = converged_cluster(&dirs, interval, check).await;
        let (rounds, spared, bytes, cpu) = measure(&agents, seconds).await;
        let cpu_per_s = cpu / seconds as f64;
        match baseline_cpu_per_s {
            None => {
                println!(
                    "{name}: {:.1}% of a core for {nodes} agents, {rounds} rounds",
                    cpu_per_s * 100.0
                );
                baseline_cpu_per_s = Some(cpu_per_s);
            }
            Some(base) => {
                let per_round_us = (cpu_per_s - base) * seconds as f64 / rounds.max(1) as f64 * 1e6;
                println!(
                    "{name}: {rounds} rounds in {seconds} s ({spared} spared by the check), {:.1}% of a core, {per_round_us:.0} µs of CPU per round beyond the baseline, {:.0} session bytes per round",
                    cpu_per_s * 100.0,
                    bytes as f64 / rounds.max(1) as f64
                );
            }
        }
        for agent in agents {
            agent.shutdown().await;
        }
    }
}
