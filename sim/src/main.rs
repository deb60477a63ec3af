//! `patina-sim`: runs one scenario and prints its seed and report.
//!
//! `cargo run --release -p patina-sim -- --nodes 10000 --writes 100 --model wan [--latency-ms 100]
//! [--loss 0.01] [--seed 1] [--view 12] [--eager 4] [--lazy 4] [--sync-ms 500 | --no-sync]
//! [--partition-ms 0..3000] [--crash-share 0.05] [--crash-down-ms 2000]`

use std::time::Instant;

use patina_sim::network::Network;
use patina_sim::{run, Scenario};

fn main() {
    let mut scenario = Scenario::default();
    let mut model = String::from("wan");
    let mut latency_ms = 100.0;
    let mut loss = 0.0;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().expect("a value after the flag");
        match a.as_str() {
            "--nodes" => scenario.nodes = value().parse().expect("--nodes N"),
            "--writes" => scenario.writes = value().parse().expect("--writes N"),
            "--seed" => scenario.seed = value().parse().expect("--seed N"),
            "--view" => scenario.view_size = value().parse().expect("--view N"),
            "--eager" => scenario.broadcast.eager_peers_max = value().parse().expect("--eager N"),
            "--lazy" => scenario.broadcast.lazy_peers_max = value().parse().expect("--lazy N"),
            "--near" => scenario.broadcast.near_peers = value().parse().expect("--near N"),
            "--far" => scenario.broadcast.far_peers = value().parse().expect("--far N"),
            "--probe-sample" => {
                scenario.broadcast.probe_sample = value().parse().expect("--probe-sample N")
            }
            "--probe-ms" => {
                scenario.broadcast.probe_interval_ms = value().parse().expect("--probe-ms N")
            }
            "--warmup-ms" => scenario.warmup_ms = value().parse().expect("--warmup-ms N"),
            "--model" => model = value(),
            "--latency-ms" => latency_ms = value().parse().expect("--latency-ms X"),
            "--loss" => loss = value().parse().expect("--loss X"),
            "--sync-ms" => scenario.sync_interval_ms = Some(value().parse().expect("--sync-ms N")),
            "--no-sync" => scenario.sync_interval_ms = None,
            "--partition-ms" => {
                let v = value();
                let (a, b) = v.split_once("..").expect("--partition-ms FROM..TO");
                scenario.partition_ms = Some((
                    a.parse().expect("--partition-ms FROM..TO"),
                    b.parse().expect("--partition-ms FROM..TO"),
                ));
            }
            "--crash-share" => scenario.crash_share = value().parse().expect("--crash-share X"),
            "--crash-down-ms" => {
                scenario.crash_down_ms = value().parse().expect("--crash-down-ms N")
            }
            other => panic!("unknown argument {other}"),
        }
    }
    let network = match model.as_str() {
        "wan" => Network::wan(scenario.nodes, loss, scenario.seed),
        "uniform" => Network::uniform(scenario.nodes, latency_ms, loss),
        other => panic!("unknown model {other} (wan, uniform)"),
    };
    println!(
        "seed {} nodes {} writes {} model {model} loss {loss}",
        scenario.seed, scenario.nodes, scenario.writes
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
