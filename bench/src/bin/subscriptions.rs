//! Subscription figures with real agents on loopback.
//!
//! Latency: three nodes; a subscriber on node 1 follows `SELECT k, v FROM kv`; writes on node 0,
//! one at a time; for each, the time from sending the write to node 0 until the change event
//! arrives on node 1's stream.
//!
//! Fan-out: one node with S subscriptions, each a different filter (`WHERE n = i`), every one
//! with a reader attached; W transactions each update one row of every filter group; the tool
//! times the whole run and counts the events delivered.
//!
//! `cargo run --release -p patina-bench --bin subscriptions -- [--writes 1000] [--subs 1000] [--fanout-writes 200]`

use std::time::Instant;

use patina_tests::percentile;

use patina::http::client::{request_stream_with_headers, Method, Target};
use patina_tests::{exec, start_cluster_with, Ndjson};
use serde_json::json;

async fn open(agent: &patina::agent::Agent, sql: &str) -> Ndjson {
    let (status, _, rx) = request_stream_with_headers(
        &Target::Tcp(agent.api_addr()),
        Method::POST,
        "/v1/subscriptions",
        None,
        serde_json::to_vec(&json!(sql)).unwrap(),
    )
    .await
    .unwrap();
    assert!(status.is_success(), "{status}");
    Ndjson::new(rx)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (mut writes, mut subs, mut fanout_writes) = (1000usize, 1000usize, 200usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().and_then(|v| v.parse().ok()).expect("a number");
        match a.as_str() {
            "--writes" => writes = value(),
            "--subs" => subs = value(),
            "--fanout-writes" => fanout_writes = value(),
            other => panic!("unknown argument {other}"),
        }
    }

    // Latency, remote write to event.
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let agents = start_cluster_with(&dirs, None, |c| c.telemetry.prometheus_addr = None).await;
    let mut stream = open(&agents[1], "SELECT k, v FROM kv").await;
    stream.take(2).await;
    let mut samples = Vec::with_capacity(writes);
    for i in 0..writes {
        let sent = Instant::now();
        exec(
            &agents[0],
            &format!("INSERT INTO kv (k, v) VALUES ('k{i}', 'v')"),
        )
        .await;
        let event = stream.next().await.expect("an event");
        samples.push(sent.elapsed());
        assert_eq!(event["change"][3], json!(i + 1), "{event}");
    }
    samples.sort();
    println!(
        "remote write -> subscription event (3 nodes, {writes} writes): p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        percentile(&samples, 0.5).as_secs_f64() * 1e3,
        percentile(&samples, 0.9).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3,
        percentile(&samples, 1.0).as_secs_f64() * 1e3,
    );
    drop(stream);
    for agent in agents {
        agent.shutdown().await;
    }

    // Fan-out: many subscriptions on one node.
    let dirs: Vec<_> = (0..1).map(|_| tempfile::tempdir().unwrap()).collect();
    let agents = start_cluster_with(&dirs, None, |c| {
        c.telemetry.prometheus_addr = None;
        c.api.concurrency_limit = 4096;
        c.subscriptions.max_subscriptions = subs.max(1);
    })
    .await;
    let agent = &agents[0];
    let values: Vec<String> = (0..subs).map(|i| format!("('row{i}', 'v', {i})")).collect();
    exec(
        agent,
        &format!("INSERT INTO kv (k, v, n) VALUES {}", values.join(", ")),
    )
    .await;
    let started = Instant::now();
    let (event_tx, mut events) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
    for i in 0..subs {
        let mut s = open(agent, &format!("SELECT k, v FROM kv WHERE n = {i}")).await;
        s.take(3).await;
        let tx = event_tx.clone();
        tokio::spawn(async move {
            while s.next().await.is_some() {
                if tx.send((i, Instant::now())).is_err() {
                    return;
                }
            }
        });
    }
    println!(
        "{subs} subscriptions created in {:.2} s",
        started.elapsed().as_secs_f64()
    );

    // Narrow: each transaction changes the row of one subscription; every subscription's
    // matcher still looks at the changed key. Write, then wait for that one event.
    let mut samples = Vec::with_capacity(fanout_writes);
    for w in 0..fanout_writes {
        let target = (w * 7919) % subs;
        let sent = Instant::now();
        exec(
            agent,
            &format!("UPDATE kv SET v = 'n{w}' WHERE n = {target}"),
        )
        .await;
        loop {
            let (i, at) = events.recv().await.expect("an event");
            if i == target {
                samples.push(at - sent);
                break;
            }
        }
    }
    samples.sort();
    println!(
        "{subs} subscriptions, a write changing one of them: write -> event p50 {:.2} ms, p99 {:.2} ms ({fanout_writes} writes)",
        percentile(&samples, 0.5).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3,
    );

    // Wide: each transaction changes one row of every subscription.
    let rounds = (fanout_writes / 10).max(1);
    let started = Instant::now();
    for w in 0..rounds {
        exec(agent, &format!("UPDATE kv SET v = 'w{w}'")).await;
        for _ in 0..subs {
            events.recv().await.expect("an event");
        }
    }
    let total = started.elapsed();
    println!(
        "{subs} subscriptions, {rounds} transactions each changing one row of every subscription: {} events in {:.2} s = {:.0} events/s, {:.2} ms per transaction",
        rounds * subs,
        total.as_secs_f64(),
        (rounds * subs) as f64 / total.as_secs_f64(),
        total.as_secs_f64() * 1e3 / rounds as f64,
    );
    for agent in agents {
        agent.shutdown().await;
    }
}
