//! Read and write latency of the HTTP API as applications see it: separate `patina agent`
//! processes on loopback, one kept-alive connection per node (HTTP/1.1 or HTTP/2 with prior
//! knowledge), requests one after another.
//!
//! For each protocol it measures a point query (`/v1/queries`), a one-row insert
//! (`/v1/transactions`) and, with more than one node, the time from sending a write to node A
//! until polling node B (back to back on B's connection) first returns the row.
//!
//! `cargo run --release -p patina-bench --bin api_latency -- [--nodes 3] [--requests 2000]
//! [--patina target/release/patina] [--proto h1|h2|both]`

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use patina_tests::percentile;
use patina_tests::procs::AgentProcess;
use serde_json::json;

/// Read and write latency of the HTTP API over kept-alive connections.
#[derive(clap::Parser)]
struct Args {
    /// Agent processes.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Requests of each kind.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// The agent binary.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/patina"))]
    patina: PathBuf,
    /// Protocols to measure.
    #[arg(long, value_enum, default_value = "both")]
    proto: ProtoChoice,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ProtoChoice {
    H1,
    H2,
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Proto {
    H1,
    H2,
}

impl ProtoChoice {
    fn protos(self) -> Vec<Proto> {
        match self {
            ProtoChoice::H1 => vec![Proto::H1],
            ProtoChoice::H2 => vec![Proto::H2],
            ProtoChoice::Both => vec![Proto::H1, Proto::H2],
        }
    }
}

/// One kept-alive connection, either protocol.
enum Conn {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Conn {
    async fn open(addr: SocketAddr, proto: Proto) -> Result<Conn, String> {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let io = TokioIo::new(stream);
        Ok(match proto {
            Proto::H1 => {
                let (send, conn) = hyper::client::conn::http1::handshake(io)
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(conn);
                Conn::H1(send)
            }
            Proto::H2 => {
                let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(conn);
                Conn::H2(send)
            }
        })
    }

    /// POSTs `body` to `path` and reads the whole answer.
    async fn post(&mut self, path: &str, body: &serde_json::Value) -> Result<Bytes, String> {
        let request = Request::post(path)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())))
            .unwrap();
        let response = match self {
            Conn::H1(send) => {
                send.ready().await.map_err(|e| e.to_string())?;
                send.send_request(request).await
            }
            Conn::H2(send) => {
                send.ready().await.map_err(|e| e.to_string())?;
                send.send_request(request).await
            }
        }
        .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
        }
        Ok(body)
    }
}

fn summary(name: &str, proto: Proto, nodes: usize, mut samples: Vec<Duration>) {
    samples.sort();
    let ms = |p: f64| percentile(&samples, p).as_secs_f64() * 1000.0;
    println!(
        "{name:<22} {proto:?} nodes={nodes} n={:<5} p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
        samples.len(),
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(1.0)
    );
}

async fn run(args: &Args, proto: Proto, nodes: &[AgentProcess]) -> Result<(), String> {
    let mut a = Conn::open(nodes[0].api, proto).await?;
    let query = json!(["SELECT v FROM kv WHERE k = ?", ["probe"]]);
    a.post(
        "/v1/transactions",
        &json!(["INSERT OR REPLACE INTO kv (k, v) VALUES ('probe', 'x')"]),
    )
    .await?;
    // Warm-up: reader connections opened, statements cached.
    for _ in 0..50 {
        a.post("/v1/queries", &query).await?;
    }
    let mut reads = Vec::with_capacity(args.requests);
    for _ in 0..args.requests {
        let start = Instant::now();
        a.post("/v1/queries", &query).await?;
        reads.push(start.elapsed());
    }
    summary("query", proto, nodes.len(), reads);

    let tag = format!("{proto:?}");
    let mut writes = Vec::with_capacity(args.requests);
    for i in 0..args.requests {
        let start = Instant::now();
        a.post(
            "/v1/transactions",
            &json!([[
                "INSERT INTO kv (k, v) VALUES (?, 'x')",
                [format!("w-{tag}-{i}")]
            ]]),
        )
        .await?;
        writes.push(start.elapsed());
    }
    summary("transaction", proto, nodes.len(), writes);

    if nodes.len() > 1 {
        let mut b = Conn::open(nodes[1].api, proto).await?;
        let rounds = (args.requests / 4).max(50);
        let mut visible = Vec::with_capacity(rounds);
        let mut after_answer = Vec::with_capacity(rounds);
        for i in 0..rounds {
            let key = format!("r-{tag}-{i}");
            let start = Instant::now();
            a.post(
                "/v1/transactions",
                &json!([["INSERT INTO kv (k, v) VALUES (?, 'x')", [key.clone()]]]),
            )
            .await?;
            let answered = start.elapsed();
            let probe = json!(["SELECT count(*) FROM kv WHERE k = ?", [key]]);
            loop {
                let body = b.post("/v1/queries", &probe).await?;
                if body.windows(7).any(|w| w == b"[1,[1]]") {
                    break;
                }
                if start.elapsed() > Duration::from_secs(10) {
                    return Err(format!("write {i} not visible on B after 10 s"));
                }
            }
            visible.push(start.elapsed());
            after_answer.push(start.elapsed() - answered);
        }
        summary("write A -> read on B", proto, nodes.len(), visible);
        summary("A's answer -> read on B", proto, nodes.len(), after_answer);
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let args = <Args as clap::Parser>::parse();
    assert!(
        args.patina.exists(),
        "no agent binary at {} (cargo build --release -p patina, or --patina PATH)",
        args.patina.display()
    );
    let root = tempfile::tempdir().unwrap();
    let mut nodes: Vec<AgentProcess> = Vec::new();
    for i in 0..args.nodes {
        let bootstrap: Vec<SocketAddr> = nodes.first().map(|n| n.gossip).into_iter().collect();
        nodes.push(AgentProcess::start(
            &args.patina,
            &root.path().join(format!("n{i}")),
            &bootstrap,
        ));
    }
    // Wait until every node lists every other.
    let deadline = Instant::now() + Duration::from_secs(30);
    for node in &nodes {
        let mut conn = loop {
            match Conn::open(node.api, Proto::H1).await {
                Ok(c) => break c,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        loop {
            let request = Request::get("/v1/health")
                .header(hyper::header::HOST, "localhost")
                .body(Full::new(Bytes::new()))
                .unwrap();
            let Conn::H1(send) = &mut conn else {
                unreachable!()
            };
            let body = send
                .send_request(request)
                .await
                .unwrap()
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes();
            let health: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            if health["response"]["members"] == json!(args.nodes) {
                break;
            }
            assert!(Instant::now() < deadline, "the cluster did not form");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    println!(
        "{} agent process(es) of {}, {} requests each",
        args.nodes,
        args.patina.display(),
        args.requests
    );
    for proto in args.proto.protos() {
        if let Err(e) = run(&args, proto, &nodes).await {
            println!("{proto:?}: failed: {e}");
        }
    }
}
