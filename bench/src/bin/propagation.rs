//! Write-to-remote-commit latency and broadcast cost of real agents (SQLite, QUIC, SWIM) in one
//! process on loopback.
//!
//! For each write (round-robin over writers, one at a time) it records the time from sending
//! the HTTP request to the writer until each other node has committed the changeset, and from
//! the writer's answer (the acknowledged write) to the same. At the end it prints percentiles
//! and the broadcast messages sent per change per node.
//!
//! `cargo run --release -p patina-bench --bin propagation -- --nodes 3 --writes 2000 [--tls] [--writers 1]`

use std::collections::HashMap;
use std::time::{Duration, Instant};

use patina_tests::percentile;

use patina::agent::Agent;
use patina::http::client::{request, Method, StatusCode, Target};
use patina::net::tls::generate_ca;
use patina_core::change::ChangesetId;
use patina_core::ids::DbVersion;

/// Time from a write on one node until every node applied it, in process.
#[derive(clap::Parser)]
struct Args {
    /// Nodes.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Writes measured.
    #[arg(long, default_value_t = 1000)]
    writes: usize,
    /// Nodes writing (round robin), at most every node.
    #[arg(long, default_value_t = 1)]
    writers: usize,
    /// Mutual TLS between the nodes.
    #[arg(long)]
    tls: bool,
}

fn parse_args() -> Args {
    let mut args = <Args as clap::Parser>::parse();
    args.writers = args.writers.clamp(1, args.nodes);
    args
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{name:<44} n={:<6} p50={:.3} ms  p90={:.3} ms  p99={:.3} ms  max={:.3} ms",
        samples.len(),
        ms(percentile(&samples, 0.5)),
        ms(percentile(&samples, 0.9)),
        ms(percentile(&samples, 0.99)),
        ms(*samples.last().unwrap_or(&Duration::ZERO))
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = parse_args();
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .init();
    }
    let root = tempfile::tempdir().unwrap();
    let ca = generate_ca().unwrap();
    let mut agents: Vec<Agent> = Vec::new();
    for i in 0..args.nodes {
        let dir = root.path().join(format!("node{i}"));
        let bootstrap: Vec<_> = agents
            .first()
            .map(|a| vec![a.gossip_addr()])
            .unwrap_or_default();
        let mut config = patina_tests::node_config_with(
            &dir,
            &bootstrap,
            "CREATE TABLE kv (k INTEGER PRIMARY KEY, v TEXT);",
        );
        config.telemetry.prometheus_addr = None;
        if args.tls {
            config = patina_tests::with_tls(config, &dir, &ca);
        }
        agents.push(Agent::start(&config).await.unwrap());
    }
    let formed = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last_print = Instant::now();
    while agents
        .iter()
        .any(|a| a.gossip().members.len() + 1 != args.nodes)
    {
        assert!(Instant::now() < deadline, "cluster did not form");
        if std::env::var_os("PROPAGATION_VERBOSE").is_some()
            && last_print.elapsed() > Duration::from_millis(1000)
        {
            let counts: Vec<(usize, usize)> = agents
                .iter()
                .map(|a| (a.gossip().members.len(), a.gossip().foca_members))
                .collect();
            let failures: u64 = agents.iter().map(|a| a.gossip().handshake_failures).sum();
            let dropped: u64 = agents.iter().map(|a| a.gossip().transport_dropped).sum();
            println!(
                "{:>6.1} s members seen: {counts:?} handshake failures {failures} dropped {dropped}",
                formed.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "{} nodes formed in {:.0} ms (tls: {})",
        args.nodes,
        formed.elapsed().as_secs_f64() * 1000.0,
        args.tls
    );
    // Warm up connections so the first writes do not pay for QUIC handshakes.
    for (i, agent) in agents.iter().enumerate() {
        let body = format!(
            "[\"INSERT INTO kv (k, v) VALUES ({}, 'warm')\"]",
            -(i as i64) - 1
        );
        request(
            &Target::Tcp(agent.api_addr()),
            Method::POST,
            "/v1/transactions",
            None,
            body.into_bytes(),
        )
        .await
        .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let sends_before: u64 = agents.iter().map(broadcast_sends).sum();
    let mut receivers: Vec<_> = agents.iter().map(|a| a.subscribe_applied()).collect();
    let mut from_request = Vec::new();
    let mut from_ack = Vec::new();
    let mut to_all = Vec::new();
    for w in 0..args.writes {
        let writer = w % args.writers;
        let body = format!("[\"INSERT INTO kv (k, v) VALUES ({w}, 'value-{w}')\"]");
        let sent = Instant::now();
        let (status, out) = request(
            &Target::Tcp(agents[writer].api_addr()),
            Method::POST,
            "/v1/transactions",
            None,
            body.into_bytes(),
        )
        .await
        .unwrap();
        let acked = Instant::now();
        assert_eq!(status, StatusCode::OK);
        let version: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let id = ChangesetId {
            site: agents[writer].site_id(),
            version: DbVersion(version["version"].as_u64().unwrap()),
        };
        let mut last = acked;
        let mut seen: HashMap<usize, Instant> = HashMap::new();
        for (i, rx) in receivers.iter_mut().enumerate() {
            if i == writer {
                continue;
            }
            let at = loop {
                match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
                    Ok(Ok(event)) if event.id == id => break event.at,
                    Ok(Ok(_)) => continue,
                    Ok(Err(e)) => panic!("applied events lost: {e}"),
                    Err(_) => panic!("write {w} never reached node {i}"),
                }
            };
            seen.insert(i, at);
            from_request.push(at.saturating_duration_since(sent));
            from_ack.push(at.saturating_duration_since(acked));
            last = last.max(at);
        }
        to_all.push(last.saturating_duration_since(sent));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sends_after: u64 = agents.iter().map(broadcast_sends).sum();
    report("request sent -> committed on another node", from_request);
    report("write acknowledged -> committed on another node", from_ack);
    report("request sent -> committed on all nodes", to_all);
    println!(
        "broadcast messages per change per node: {:.2} ({} messages, {} writes, {} nodes)",
        (sends_after - sends_before) as f64 / args.writes as f64 / args.nodes as f64,
        sends_after - sends_before,
        args.writes,
        args.nodes
    );
    for agent in agents {
        agent.shutdown().await;
    }
}

fn broadcast_sends(agent: &Agent) -> u64 {
    let gossip = agent.gossip();
    let s = gossip.broadcast;
    // The widened first hop's copies are counted by the gossip task, not in core's stats.
    s.gossip_sent + gossip.first_hop.0 + s.ihave_sent + s.grafts_sent + s.prunes_sent
}
