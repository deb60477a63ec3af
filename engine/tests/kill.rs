//! Real processes. Durability: a node killed with SIGKILL in the middle of a write burst and
//! restarted on its data folder has every write it acknowledged, and the cluster converges.
//! And `patina subscribe` prints a subscription's events as they happen.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use patina::client::{request, Method, StatusCode, Target};
use serde_json::{json, Value as Json};

/// A running `patina agent` process, killed when dropped.
struct Node {
    child: Child,
    api: SocketAddr,
    gossip: SocketAddr,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path, bootstrap: Option<SocketAddr>) -> Node {
    std::fs::create_dir_all(dir.join("schema")).unwrap();
    std::fs::write(
        dir.join("schema/kv.sql"),
        "CREATE TABLE kv (k TEXT NOT NULL PRIMARY KEY, v TEXT);",
    )
    .unwrap();
    let bootstrap = bootstrap.map(|a| format!("\"{a}\"")).unwrap_or_default();
    let config = format!(
        "[db]\npath = \"{0}/state.db\"\nschema_paths = [\"{0}/schema\"]\n[api]\naddr = \"127.0.0.1:0\"\n[admin]\npath = \"{0}/admin.sock\"\n[gossip]\naddr = \"127.0.0.1:0\"\nbootstrap = [{bootstrap}]\nsync_interval_ms = 200\n",
        dir.display()
    );
    std::fs::write(dir.join("config.toml"), config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_patina"))
        .args(["agent", "-c"])
        .arg(dir.join("config.toml"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // "patina agent: API on http://A, gossip on G, site S"
    let mut line = String::new();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    while !line.starts_with("patina agent:") {
        line.clear();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "the agent exited before announcing itself"
        );
    }
    let api = line
        .split("http://")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap()
        .parse()
        .unwrap();
    let gossip = line
        .split("gossip on ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap()
        .parse()
        .unwrap();
    Node { child, api, gossip }
}

async fn exec(node: &Node, sql: &str) -> bool {
    let body = serde_json::to_vec(&json!([sql])).unwrap();
    matches!(
        request(
            &Target::Tcp(node.api),
            Method::POST,
            "/v1/transactions",
            None,
            body
        )
        .await,
        Ok((StatusCode::OK, _))
    )
}

async fn get(node: &Node, path: &str) -> Option<Json> {
    let (status, body) = request(&Target::Tcp(node.api), Method::GET, path, None, vec![])
        .await
        .ok()?;
    (status == StatusCode::OK)
        .then(|| serde_json::from_slice(&body).ok())
        .flatten()
}

async fn keys(node: &Node) -> Vec<String> {
    let body = serde_json::to_vec(&json!("SELECT k FROM kv ORDER BY k")).unwrap();
    let (_, out) = request(
        &Target::Tcp(node.api),
        Method::POST,
        "/v1/queries",
        None,
        body,
    )
    .await
    .unwrap();
    out.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(|l| serde_json::from_slice::<Json>(l).ok())
        .filter_map(|l| l.get("row").map(|r| r[1][0].as_str().unwrap().to_owned()))
        .collect()
}

async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_burst_loses_no_acknowledged_write() {
    let root = tempfile::tempdir().unwrap();
    let a = start(&root.path().join("a"), None);
    let b = start(&root.path().join("b"), Some(a.gossip));
    let mut c = start(&root.path().join("c"), Some(a.gossip));
    for node in [&a, &b, &c] {
        wait_for("membership", || async {
            get(node, "/v1/health")
                .await
                .is_some_and(|h| h["response"]["members"] == json!(3))
        })
        .await;
    }
    // A burst of writes to c from another task; c is killed in the middle of it.
    let c_api = c.api;
    let (hundred_tx, hundred) = tokio::sync::oneshot::channel();
    let burst = tokio::spawn(async move {
        let mut acknowledged = Vec::new();
        let mut hundred_tx = Some(hundred_tx);
        for i in 0..5000 {
            if acknowledged.len() == 100 {
                if let Some(tx) = hundred_tx.take() {
                    let _ = tx.send(());
                }
            }
            let key = format!("k{i:04}");
            let body = serde_json::to_vec(&json!([format!(
                "INSERT INTO kv (k, v) VALUES ('{key}', 'x')"
            )]))
            .unwrap();
            match request(
                &Target::Tcp(c_api),
                Method::POST,
                "/v1/transactions",
                None,
                body,
            )
            .await
            {
                Ok((StatusCode::OK, _)) => acknowledged.push(key),
                _ => break,
            }
        }
        acknowledged
    });
    hundred.await.unwrap();
    c.child.kill().unwrap(); // SIGKILL, with the burst still writing
    c.child.wait().unwrap();
    let acknowledged = burst.await.unwrap();
    assert!(
        acknowledged.len() >= 100 && acknowledged.len() < 5000,
        "kill did not land mid-burst: {}",
        acknowledged.len()
    );
    // Writes elsewhere while c is down.
    assert!(exec(&a, "INSERT INTO kv (k, v) VALUES ('while-down', 'y')").await);

    let killed_at = Instant::now();
    drop(c);
    let c = start(&root.path().join("c"), None);
    let present = keys(&c).await;
    for key in &acknowledged {
        assert!(
            present.contains(key),
            "acknowledged write {key} lost by the crash"
        );
    }
    wait_for("the cluster to converge", || async {
        let d = get(&a, "/v1/sync/digest").await;
        d.is_some()
            && d == get(&b, "/v1/sync/digest").await
            && d == get(&c, "/v1/sync/digest").await
    })
    .await;
    println!(
        "restarted node converged {:.2} s after the kill; {} writes acknowledged before it",
        killed_at.elapsed().as_secs_f64(),
        acknowledged.len()
    );
    assert!(keys(&a).await.contains(&"while-down".to_string()));
    assert!(keys(&c).await.contains(&"while-down".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patina_subscribe_prints_changes_as_they_happen() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), None);
    assert!(exec(&node, "INSERT INTO kv (k, v) VALUES ('a', '1')").await);
    let mut child = Command::new(env!("CARGO_BIN_EXE_patina"))
        .args([
            "subscribe",
            "--api",
            &node.api.to_string(),
            "SELECT k, v FROM kv",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let next = || -> Json {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("a line from patina subscribe");
        serde_json::from_str(&line).unwrap()
    };
    assert_eq!(next(), json!({"columns": ["k", "v"]}));
    assert_eq!(next(), json!({"row": [1, ["a", "1"]]}));
    assert_eq!(next()["eoq"]["change_id"], json!(0));
    assert!(exec(&node, "UPDATE kv SET v = '2' WHERE k = 'a'").await);
    assert_eq!(next(), json!({"change": ["update", 1, ["a", "2"], 1]}));
    let _ = child.kill();
    let _ = child.wait();
}
