//! A crashed node's way back, with real processes: N `patina agent` processes on loopback,
//! every one written to continuously through its API; one is killed with SIGKILL mid-burst and
//! restarted on its data folder and addresses after `--down-s` (long enough for the others to
//! declare it down). Reports the seconds until the restarted node
//! lists every member (and every other node lists it), until it accepts writes again, and,
//! after the writes stop, until all nodes hold identical rows; and checks that no acknowledged
//! write was lost.
//!
//! `cargo run --release -p patina-bench --bin restart -- [--nodes 3] [--patina target/release/patina]
//! [--before-s 2] [--after-s 3]`

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use patina::http::client::{request, Method, StatusCode, Target};
use patina::http::types::{parse_ndjson, ApiStatement, HealthResponse, QueryEvent, SqlValue};
use patina_tests::procs::AgentProcess;

/// A crashed node's way back: agent processes all written to, one SIGKILLed and restarted.
#[derive(clap::Parser)]
struct Args {
    /// Agent processes (2 at least).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(2..))]
    nodes: u16,
    /// The agent binary.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/patina"))]
    patina: PathBuf,
    /// Seconds of writing before the kill.
    #[arg(long, default_value_t = 2.0)]
    before_s: f64,
    /// Seconds the killed node stays down.
    #[arg(long, default_value_t = 5.0)]
    down_s: f64,
    /// Seconds of writing after the restart.
    #[arg(long, default_value_t = 3.0)]
    after_s: f64,
}

fn parse_args() -> Args {
    <Args as clap::Parser>::parse()
}

async fn members(api: SocketAddr) -> Option<u64> {
    let (status, body) = request(&Target::Tcp(api), Method::GET, "/v1/health", None, vec![])
        .await
        .ok()?;
    match serde_json::from_slice(&body).ok()? {
        HealthResponse::Response { members, .. } if status == StatusCode::OK => Some(members),
        _ => None,
    }
}

async fn digest(api: SocketAddr) -> Option<bytes::Bytes> {
    let (status, body) = request(
        &Target::Tcp(api),
        Method::GET,
        "/v1/sync/digest",
        None,
        vec![],
    )
    .await
    .ok()?;
    (status == StatusCode::OK).then_some(body)
}

async fn insert(api: SocketAddr, key: &str) -> bool {
    let statement = ApiStatement::WithParams(
        "INSERT INTO kv (k, v) VALUES (?, 'x')".into(),
        vec![patina::http::types::SqlParam::Text(key.into())],
    );
    matches!(
        request(
            &Target::Tcp(api),
            Method::POST,
            "/v1/transactions",
            None,
            serde_json::to_vec(&[statement]).unwrap(),
        )
        .await,
        Ok((StatusCode::OK, _))
    )
}

async fn keys(api: SocketAddr) -> Vec<String> {
    let body = serde_json::to_vec(&ApiStatement::from("SELECT k FROM kv")).unwrap();
    let (_, out) = request(&Target::Tcp(api), Method::POST, "/v1/queries", None, body)
        .await
        .unwrap();
    parse_ndjson::<QueryEvent>(&out)
        .unwrap()
        .into_iter()
        .filter_map(|e| match e {
            QueryEvent::Row(_, mut v) => match v.pop() {
                Some(SqlValue::Text(k)) => Some(k),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// Polls `check` every 10 ms for up to 120 s; the time it took, or None.
async fn until<F, Fut>(mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(120) {
        if check().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = parse_args();
    // KEEP=1 keeps the data folders and agent logs (PATINA_TEST_LOG sets their level).
    let root = tempfile::Builder::new()
        .prefix("patina-restart-")
        .tempdir()
        .unwrap();
    let dir = root.path().to_path_buf();
    let _root = if std::env::var_os("KEEP").is_some() {
        println!("data and logs kept in {}", root.keep().display());
        None
    } else {
        Some(root)
    };
    let mut nodes: Vec<AgentProcess> = Vec::new();
    for i in 0..args.nodes {
        let bootstrap: Vec<SocketAddr> = nodes.first().map(|n| n.gossip).into_iter().collect();
        nodes.push(AgentProcess::start(
            &args.patina,
            &dir.join(format!("n{i}")),
            &bootstrap,
        ));
    }
    let n = args.nodes as u64;
    for node in &nodes {
        let api = node.api;
        until(|| async move { members(api).await == Some(n) })
            .await
            .expect("the cluster formed");
    }
    // Writers, one per node, each one write at a time; the acknowledged keys are kept.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for (w, node) in nodes.iter().enumerate() {
        let (api, stop) = (node.api, stop.clone());
        writers.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("w{w}-{i}");
                i += 1;
                if insert(api, &key).await {
                    acknowledged.push(key);
                } else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            acknowledged
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(args.before_s)).await;
    let last = nodes.len() - 1;
    nodes[last].crash();
    // Down long enough for the others to declare it down, as after a real crash.
    tokio::time::sleep(Duration::from_secs_f64(args.down_s)).await;
    // No bootstrap on restart: it rejoins through the members it remembers.
    nodes[last].restart(&args.patina, &[]);
    let restarted = nodes[last].api;
    let sees_all = until(|| async move { members(restarted).await == Some(n) }).await;
    let others: Vec<SocketAddr> = nodes[..last].iter().map(|n| n.api).collect();
    let seen_by_all = until(|| {
        let others = others.clone();
        async move {
            for api in others {
                if members(api).await != Some(n) {
                    return false;
                }
            }
            true
        }
    })
    .await;
    let writes_again = until(|| async move { insert(restarted, "probe").await }).await;
    tokio::time::sleep(Duration::from_secs_f64(args.after_s)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acknowledged = Vec::new();
    for w in writers {
        acknowledged.extend(w.await.unwrap());
    }
    let stopped = Instant::now();
    let apis: Vec<SocketAddr> = nodes.iter().map(|n| n.api).collect();
    let converged = until(|| {
        let apis = apis.clone();
        async move {
            let first = digest(apis[0]).await;
            for api in &apis[1..] {
                if digest(*api).await != first {
                    return false;
                }
            }
            first.is_some()
        }
    })
    .await;
    let converged_after_stop = converged.map(|_| stopped.elapsed());
    let mut lost = 0;
    for api in &apis {
        let present: std::collections::HashSet<String> = keys(*api).await.into_iter().collect();
        lost += acknowledged
            .iter()
            .filter(|k| !present.contains(*k))
            .count();
    }
    let s = |d: Option<Duration>| {
        d.map_or("never (120 s)".into(), |d| {
            format!("{:.2} s", d.as_secs_f64())
        })
    };
    println!(
        "{} agent processes of {}; node {last} killed with SIGKILL while {} writers wrote, \
         restarted {} s later",
        args.nodes,
        args.patina.display(),
        args.nodes,
        args.down_s
    );
    println!(
        "restarted node lists every member:  {} after its start",
        s(sees_all)
    );
    println!(
        "every other node lists it:          {} after that",
        s(seen_by_all)
    );
    println!(
        "restarted node accepts writes:       {} after that",
        s(writes_again)
    );
    println!(
        "identical rows on all nodes:         {} after the writes stopped",
        s(converged_after_stop)
    );
    println!(
        "acknowledged writes: {}, missing on some node: {lost}",
        acknowledged.len()
    );
}
