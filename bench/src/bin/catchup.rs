//! Anti-entropy figures with real agents on loopback: how fast a new, empty node catches up with
//! a node holding R rows (written in transactions of 1,000 rows), and how many bytes a converged
//! pair exchanges per second when idle (SWIM plus sync rounds).
//!
//! With `--heal N`: N nodes are split into two halves, both write (conflicting writes
//! included), and the tool times how long after the heal every node's digest is equal.
//!
//! With `--per-tx N` the rows are written N per transaction (a large transaction travels in
//! parts), and once caught up, one more transaction of N rows is timed from the source's commit
//! until the peer applied it (broadcast, in parts).
//!
//! `cargo run --release -p patina-bench --bin catchup -- [--rows 100000] [--per-tx 1000] [--heal 20]`

use std::time::{Duration, Instant};

use patina::agent::Agent;
use patina::config::Config;
use patina::http::client::{request, Method, Target};
use patina_tests::{digest, exec};

const SCHEMA: &str = "CREATE TABLE kv (k INTEGER PRIMARY KEY, v TEXT, n INTEGER);";

fn config(dir: &std::path::Path, bootstrap: Vec<std::net::SocketAddr>) -> Config {
    let mut config = patina_tests::node_config_with(dir, &bootstrap, SCHEMA);
    config.telemetry.prometheus_addr = None;
    config
}

async fn count(agent: &Agent) -> u64 {
    let (_, out) = request(
        &Target::Tcp(agent.api_addr()),
        Method::POST,
        "/v1/queries",
        None,
        b"\"SELECT count(*) FROM kv\"".to_vec(),
    )
    .await
    .unwrap();
    let line = out.split(|b| *b == b'\n').nth(1).unwrap();
    let json: serde_json::Value = serde_json::from_slice(line).unwrap();
    json["row"][1][0].as_u64().unwrap()
}

/// How fast a new node catches up with a big database, or a partition heals.
#[derive(clap::Parser)]
struct Args {
    /// Rows in the source's database.
    #[arg(long, default_value_t = 100_000)]
    rows: u64,
    /// Rows per transaction while filling it.
    #[arg(long, default_value_t = 1_000)]
    per_tx: u64,
    /// Instead: N nodes, a partition that heals.
    #[arg(long)]
    heal: Option<usize>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Args { rows, per_tx, heal } = clap::Parser::parse();
    if let Some(nodes) = heal {
        return measure_heal(nodes).await;
    }
    let root = tempfile::tempdir().unwrap();
    let source = Agent::start(&config(&root.path().join("source"), vec![]))
        .await
        .unwrap();
    let started = Instant::now();
    for chunk in 0..rows.div_ceil(per_tx) {
        let values: Vec<String> = (chunk * per_tx..((chunk + 1) * per_tx).min(rows))
            .map(|i| format!("({i}, 'value-{i}', {})", i % 97))
            .collect();
        exec(
            &source,
            &format!("INSERT INTO kv (k, v, n) VALUES {}", values.join(", ")),
        )
        .await;
    }
    println!(
        "wrote {rows} rows in {:.2} s",
        started.elapsed().as_secs_f64()
    );

    let joined = Instant::now();
    let fresh = Agent::start(&config(
        &root.path().join("fresh"),
        vec![source.gossip_addr()],
    ))
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let n = count(&fresh).await;
        if n == rows {
            break;
        }
        assert!(Instant::now() < deadline, "catch-up stalled at {n} rows");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = joined.elapsed().as_secs_f64();
    println!("new empty node caught up {rows} rows in {secs:.2} s: {:.0} rows/s (sync sessions: {}, changesets: {})", rows as f64 / secs, fresh.gossip().sync_rounds, fresh.gossip().sync_received);

    // One more transaction of `per_tx` rows, live: commit on the source, applied on the peer.
    let values: Vec<String> = (rows..rows + per_tx)
        .map(|i| format!("({i}, 'value-{i}', {})", i % 97))
        .collect();
    let sent = Instant::now();
    exec(
        &source,
        &format!("INSERT INTO kv (k, v, n) VALUES {}", values.join(", ")),
    )
    .await;
    let committed = sent.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(600);
    while count(&fresh).await != rows + per_tx {
        assert!(
            Instant::now() < deadline,
            "the live transaction never arrived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!(
        "live transaction of {per_tx} rows: committed in {committed:.3} s, on the peer {:.3} s after the request",
        sent.elapsed().as_secs_f64()
    );

    // Idle traffic of the converged pair.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sum = |f: fn(&patina::net::gossip::GossipSnapshot) -> u64| -> u64 {
        [&source, &fresh].iter().map(|a| f(&a.gossip())).sum()
    };
    let (messages, rounds, bytes) = (
        sum(|g| g.transport_sent),
        sum(|g| g.sync_rounds),
        sum(|g| g.sync_bytes),
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (rounds, bytes) = (
        sum(|g| g.sync_rounds) - rounds,
        sum(|g| g.sync_bytes) - bytes,
    );
    println!(
        "idle converged pair, 10 s: {} sync rounds, {:.1} bytes per round; {} other messages (SWIM)",
        rounds,
        bytes as f64 / rounds.max(1) as f64,
        sum(|g| g.transport_sent) - messages
    );
    source.shutdown().await;
    fresh.shutdown().await;
}

async fn measure_heal(nodes: usize) {
    let root = tempfile::tempdir().unwrap();
    let mut agents: Vec<Agent> = Vec::new();
    for i in 0..nodes {
        let bootstrap = agents
            .first()
            .map(|a| vec![a.gossip_addr()])
            .unwrap_or_default();
        agents.push(
            Agent::start(&config(&root.path().join(format!("n{i}")), bootstrap))
                .await
                .unwrap(),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while agents.iter().any(|a| a.gossip().members.len() + 1 != nodes) {
        assert!(Instant::now() < deadline, "cluster did not form");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    exec(
        &agents[0],
        "INSERT INTO kv (k, v, n) VALUES (0, 'shared', 0)",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (left, right) = agents.split_at(nodes / 2);
    let left_addrs: Vec<_> = left.iter().map(|a| a.gossip_addr()).collect();
    let right_addrs: Vec<_> = right.iter().map(|a| a.gossip_addr()).collect();
    for a in left {
        a.faults().cut_off(right_addrs.iter().copied());
    }
    for a in right {
        a.faults().cut_off(left_addrs.iter().copied());
    }
    let cut = Instant::now();
    for i in 0..40u64 {
        exec(
            &left[i as usize % left.len()],
            &format!(
                "INSERT INTO kv (k, v, n) VALUES ({}, 'left', {i})",
                1000 + i
            ),
        )
        .await;
        exec(
            &right[i as usize % right.len()],
            &format!(
                "INSERT INTO kv (k, v, n) VALUES ({}, 'right', {i})",
                2000 + i
            ),
        )
        .await;
    }
    exec(&left[0], "UPDATE kv SET v = 'left', n = 1 WHERE k = 0").await;
    exec(&right[0], "UPDATE kv SET v = 'right', n = 2 WHERE k = 0").await;
    // Keep the halves apart for 10 s in all, long enough for SWIM to declare the other side down.
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(cut.elapsed())).await;
    let down: usize = agents
        .iter()
        .map(|a| nodes - 1 - a.gossip().members.len())
        .sum::<usize>()
        / nodes;
    for a in &agents {
        a.faults().heal();
    }
    let healed = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let first = digest(&agents[0]).await;
        let mut equal = true;
        for a in &agents[1..] {
            equal &= digest(a).await == first;
        }
        if equal {
            break;
        }
        assert!(Instant::now() < deadline, "no convergence after the heal");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "{nodes} nodes, halves apart {:.1} s (each node saw about {down} peers down), 82 writes: every digest equal {:.2} s after the heal",
        healed.duration_since(cut).as_secs_f64(),
        healed.elapsed().as_secs_f64()
    );
    for agent in agents {
        agent.shutdown().await;
    }
}
