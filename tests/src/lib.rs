//! Shared harness for the integration tests: in-process agents on loopback, their
//! configuration, and bounded waits. The tests themselves live in tests/.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use patina::agent::Agent;
use patina::config::{Config, GossipTlsConfig};
use patina::http::client::{request, Method, StatusCode, Target};
use patina::http::types::{parse_ndjson, ApiStatement, QueryEvent};
use patina::net::tls::{generate_signed, CertUse, PemPair};
use serde_json::Value as Json;

pub mod netns;
pub mod procs;

/// The schema of the cluster tests.
pub const SCHEMA: &str =
    "CREATE TABLE kv (k TEXT NOT NULL PRIMARY KEY, v TEXT, n INTEGER NOT NULL DEFAULT 0);";
/// The longest any wait in a test lasts.
pub const WAIT: Duration = Duration::from_secs(30);

/// A node's configuration: everything under `dir`, every port chosen by the OS, [`SCHEMA`].
pub fn node_config(dir: &Path, bootstrap: &[SocketAddr]) -> Config {
    node_config_with(dir, bootstrap, SCHEMA)
}

/// [`node_config`] with another schema.
pub fn node_config_with(dir: &Path, bootstrap: &[SocketAddr], schema: &str) -> Config {
    std::fs::create_dir_all(dir.join("schema")).unwrap();
    std::fs::write(dir.join("schema/schema.sql"), schema).unwrap();
    let mut config = Config::default();
    config.db.path = dir.join("state.db");
    config.db.schema_paths = vec![dir.join("schema")];
    config.api.addr = "127.0.0.1:0".parse().unwrap();
    config.admin.path = dir.join("admin.sock");
    config.gossip.addr = "127.0.0.1:0".parse().unwrap();
    config.gossip.bootstrap = bootstrap.iter().map(|a| a.to_string()).collect();
    config.telemetry.prometheus_addr = Some("127.0.0.1:0".parse().unwrap());
    config
}

/// Adds mutual TLS with a certificate signed by `ca`.
pub fn with_tls(mut config: Config, dir: &Path, ca: &PemPair) -> Config {
    let node = generate_signed(&ca.key_pem, &["127.0.0.1".to_string()], CertUse::Node).unwrap();
    std::fs::write(dir.join("node.pem"), &node.cert_pem).unwrap();
    std::fs::write(dir.join("node.key"), &node.key_pem).unwrap();
    std::fs::write(dir.join("ca.pem"), &ca.cert_pem).unwrap();
    config.gossip.tls = Some(GossipTlsConfig {
        cert_file: dir.join("node.pem"),
        key_file: dir.join("node.key"),
        ca_file: dir.join("ca.pem"),
        server_name: None,
    });
    config
}

/// Runs one statement as a transaction through the API; panics unless it succeeds.
pub async fn exec(agent: &Agent, sql: &str) {
    let body = serde_json::to_vec(&[ApiStatement::from(sql)]).unwrap();
    let (status, out) = request(
        &Target::Tcp(agent.api_addr()),
        Method::POST,
        "/v1/transactions",
        None,
        body,
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&out));
}

/// The rows of a query through the API.
pub async fn rows(agent: &Agent, sql: &str) -> Vec<Json> {
    let body = serde_json::to_vec(&ApiStatement::from(sql)).unwrap();
    let (status, out) = request(
        &Target::Tcp(agent.api_addr()),
        Method::POST,
        "/v1/queries",
        None,
        body,
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&out));
    parse_ndjson::<QueryEvent>(&out)
        .unwrap()
        .into_iter()
        .filter_map(|event| match event {
            QueryEvent::Row(_, values) => Some(serde_json::to_value(values).unwrap()),
            _ => None,
        })
        .collect()
}

/// The convergence digest through the API.
pub async fn digest(agent: &Agent) -> Json {
    let (status, out) = request(
        &Target::Tcp(agent.api_addr()),
        Method::GET,
        "/v1/sync/digest",
        None,
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::OK);
    serde_json::from_slice(&out).unwrap()
}

/// A request to `agent`'s admin socket: its status and body (`Null` when not JSON).
pub async fn admin(agent: &Agent, method: Method, path: &str, body: Json) -> (StatusCode, Json) {
    let body = if body.is_null() {
        vec![]
    } else {
        serde_json::to_vec(&body).unwrap()
    };
    let (status, out) = request(
        &Target::Unix(agent.admin_path().to_path_buf()),
        method,
        path,
        None,
        body,
    )
    .await
    .unwrap();
    (status, serde_json::from_slice(&out).unwrap_or(Json::Null))
}

/// Asks `agent` to re-read its schema files (the admin socket's `/reload`): the status, and
/// the error message if any.
pub async fn reload(agent: &Agent) -> (StatusCode, String) {
    let (status, body) = admin(agent, Method::POST, "/reload", Json::Null).await;
    (
        status,
        body["error"].as_str().unwrap_or_default().to_string(),
    )
}

/// Asserts that every agent's convergence digest is the first one's.
pub async fn assert_same_digest(agents: &[Agent]) {
    let first = digest(&agents[0]).await;
    for agent in &agents[1..] {
        assert_eq!(digest(agent).await, first);
    }
}

/// Polls `check` until it holds or [`WAIT`] passes; panics with `what` on timeout.
pub async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Waits until every agent sees `n` members, itself included.
pub async fn wait_members(agents: &[&Agent], n: usize) {
    for agent in agents {
        wait_for("membership", || async {
            agent.gossip().members.len() + 1 == n
        })
        .await;
    }
}

/// Starts one agent per folder, each joining through the first, and waits for membership.
pub async fn start_cluster(dirs: &[tempfile::TempDir], tls: Option<&PemPair>) -> Vec<Agent> {
    start_cluster_with(dirs, tls, |_| {}).await
}

/// [`start_cluster`], with `adjust` applied to every node's configuration.
pub async fn start_cluster_with(
    dirs: &[tempfile::TempDir],
    tls: Option<&PemPair>,
    adjust: impl Fn(&mut Config),
) -> Vec<Agent> {
    let mut agents: Vec<Agent> = Vec::new();
    for dir in dirs {
        let bootstrap: Vec<SocketAddr> = agents
            .first()
            .map(|a| vec![a.gossip_addr()])
            .unwrap_or_default();
        let mut config = node_config(dir.path(), &bootstrap);
        if let Some(ca) = tls {
            config = with_tls(config, dir.path(), ca);
        }
        adjust(&mut config);
        agents.push(Agent::start(&config).await.unwrap());
    }
    let refs: Vec<&Agent> = agents.iter().collect();
    wait_members(&refs, agents.len()).await;
    agents
}

/// An NDJSON response read line by line.
#[derive(Debug)]
pub struct Ndjson {
    rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    buffer: Vec<u8>,
}

impl Ndjson {
    /// Wraps a streamed body.
    pub fn new(rx: tokio::sync::mpsc::Receiver<bytes::Bytes>) -> Ndjson {
        Ndjson {
            rx,
            buffer: Vec::new(),
        }
    }

    /// The next line, or None when the stream ended or nothing came within [`WAIT`].
    pub async fn next(&mut self) -> Option<Json> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                return Some(serde_json::from_slice(&line).expect("a JSON line"));
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(chunk)) => self.buffer.extend_from_slice(&chunk),
                _ => return None,
            }
        }
    }

    /// The next `n` lines; panics if the stream ends or stalls first.
    pub async fn take(&mut self, n: usize) -> Vec<Json> {
        let mut lines = Vec::with_capacity(n);
        for _ in 0..n {
            match self.next().await {
                Some(line) => lines.push(line),
                None => panic!("stream ended after {lines:?}"),
            }
        }
        lines
    }
}

/// Resident memory (MiB) and CPU time (user + system, s) of this process, from /proc; zeros
/// where /proc cannot be read.
pub fn process_usage() -> (f64, f64) {
    let rss_mib = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0);
    // utime and stime, fields 14 and 15, in clock ticks (100 per second on Linux).
    let cpu_s = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1;
            let fields: Vec<&str> = after.split_whitespace().collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / 100.0)
        })
        .unwrap_or(0.0);
    (rss_mib, cpu_s)
}

/// The sample at quantile `p` (0..=1) of sorted samples (the workspace's one rule,
/// [`patina_core::stats::percentile`]); zero when empty.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    patina_core::stats::percentile(sorted, p).unwrap_or(Duration::ZERO)
}
