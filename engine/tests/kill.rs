//! Real processes. Durability: a node killed with SIGKILL in the middle of a write burst and
//! restarted on its data folder has every write it acknowledged, and the cluster converges.
//! A node killed while the others write to it, and restarted on its data folder and addresses
//! after they declared it down, is back within seconds. And `patina subscribe` prints a
//! subscription's events as they happen, and goes on across a restart of the node. A backup
//! taken while a node writes, restored onto a fresh host, joins under a new identity and
//! converges.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use patina_tests::procs::AgentProcess;

use patina::http::client::{request, Method, StatusCode, Target};
use serde_json::{json, Value as Json};

type Node = AgentProcess;

fn patina() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_patina"))
}

fn start(dir: &Path, bootstrap: Option<SocketAddr>) -> Node {
    let bootstrap: Vec<SocketAddr> = bootstrap.into_iter().collect();
    AgentProcess::start(patina(), dir, &bootstrap)
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
    c.crash(); // SIGKILL, with the burst still writing
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

async fn members(node: &Node) -> Option<Json> {
    get(node, "/v1/health")
        .await
        .map(|h| h["response"]["members"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_node_declared_down_is_back_within_seconds() {
    let root = tempfile::tempdir().unwrap();
    let a = start(&root.path().join("a"), None);
    let b = start(&root.path().join("b"), Some(a.gossip));
    let mut c = start(&root.path().join("c"), Some(a.gossip));
    for node in [&a, &b, &c] {
        wait_for("membership", || async {
            members(node).await == Some(json!(3))
        })
        .await;
    }
    // Writes on a keep its pushes to c flowing, so that a's connection to c has streams
    // waiting on the dead process once c is killed.
    let a_api = a.api;
    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writer = tokio::spawn({
        let writing = writing.clone();
        async move {
            let mut i = 0;
            while writing.load(std::sync::atomic::Ordering::Relaxed) {
                let body = serde_json::to_vec(&json!([format!(
                    "INSERT INTO kv (k, v) VALUES ('w{i}', 'x')"
                )]))
                .unwrap();
                let _ = request(
                    &Target::Tcp(a_api),
                    Method::POST,
                    "/v1/transactions",
                    None,
                    body,
                )
                .await;
                i += 1;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.crash();
    wait_for("a to declare c down", || async {
        members(&a).await == Some(json!(2))
    })
    .await;
    // Restarted on its data folder and addresses, with no bootstrap: it rejoins through the
    // members it remembers. Before stalled sends closed their connection, a's pushes to c
    // waited on the dead connection until quinn's idle timeout (40 s).
    c.restart(patina(), &[]);
    let restarted = Instant::now();
    let deadline = restarted + Duration::from_secs(10);
    loop {
        if members(&c).await == Some(json!(3)) && members(&a).await == Some(json!(3)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted node was still cut off 10 s after its start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "restarted node back in the cluster {:.2} s after its start",
        restarted.elapsed().as_secs_f64()
    );
    writing.store(false, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    wait_for("the cluster to converge", || async {
        let d = get(&a, "/v1/sync/digest").await;
        d.is_some()
            && d == get(&b, "/v1/sync/digest").await
            && d == get(&c, "/v1/sync/digest").await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patina_subscribe_prints_changes_as_they_happen() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = start(dir.path(), None);
    assert!(exec(&node, "INSERT INTO kv (k, v) VALUES ('a', '1')").await);
    let mut child = Command::new(patina())
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
    // The node crashes and comes back: the command re-attaches from its last change id and
    // goes on, instead of exiting.
    node.restart(patina(), &[]);
    assert!(exec(&node, "UPDATE kv SET v = '3' WHERE k = 'a'").await);
    assert_eq!(next(), json!({"change": ["update", 1, ["a", "3"], 2]}));
    assert!(
        child.try_wait().unwrap().is_none(),
        "patina subscribe exited after the node's restart"
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// `patina <args>`, which must succeed; its standard output.
fn cli(args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(patina()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "patina {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_during_writes_restores_onto_a_fresh_host_under_a_new_identity() {
    let root = tempfile::tempdir().unwrap();
    let a = start(&root.path().join("a"), None);
    let b = start(&root.path().join("b"), Some(a.gossip));
    // a keeps writing while its backup is taken.
    let a_api = a.api;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut written = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let body = serde_json::to_vec(&json!([format!(
                    "INSERT INTO kv (k, v) VALUES ('w{written:05}', 'x')"
                )]))
                .unwrap();
                let answer = request(
                    &Target::Tcp(a_api),
                    Method::POST,
                    "/v1/transactions",
                    None,
                    body,
                )
                .await;
                assert!(
                    matches!(answer, Ok((StatusCode::OK, _))),
                    "a write failed during the backup"
                );
                written += 1;
            }
            written
        }
    });
    wait_for("writes under way", || async { keys(&a).await.len() >= 50 }).await;
    let backup = root.path().join("a-backup.db");
    let said = cli(&[
        "backup".as_ref(),
        "--admin".as_ref(),
        a.dir.join("admin.sock").as_os_str(),
        backup.as_os_str(),
    ]);
    assert!(said.contains("written to"), "{said}");

    // A fresh host: its config, the backup restored into its data folder, then started.
    let c_dir = root.path().join("c");
    let c_config = patina_tests::procs::write_config(
        &c_dir,
        patina_tests::procs::Ports::default(),
        &[a.gossip],
        "sync_interval_ms = 200",
    );
    let said = cli(&[
        "restore".as_ref(),
        backup.as_os_str(),
        "-c".as_ref(),
        c_config.as_os_str(),
    ]);
    assert!(said.contains("new site id"), "{said}");
    // What was restored is a's data, before c has talked to anyone.
    let restored = cli(&[
        "db".as_ref(),
        "query".as_ref(),
        "--db".as_ref(),
        c_dir.join("state.db").as_os_str(),
        "SELECT count(*) FROM kv".as_ref(),
    ]);
    let restored_rows: usize = restored.lines().nth(1).unwrap().trim().parse().unwrap();
    assert!(restored_rows >= 50, "{restored}");
    // Restoring again over it needs --force.
    let again = Command::new(patina())
        .args([
            "restore".as_ref(),
            backup.as_os_str(),
            "-c".as_ref(),
            c_config.as_os_str(),
        ])
        .output()
        .unwrap();
    assert!(!again.status.success());
    let c = AgentProcess::start_with_config(patina(), &c_dir, &c_config);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.await.unwrap();
    let site = |node: &Node| {
        let node = node.api;
        async move {
            let (_, body) = request(
                &Target::Tcp(node),
                Method::GET,
                "/v1/sync/state",
                None,
                vec![],
            )
            .await
            .unwrap();
            serde_json::from_slice::<Json>(&body).unwrap()["actor_id"].clone()
        }
    };
    assert_ne!(
        site(&c).await,
        site(&a).await,
        "the restored node kept a's identity"
    );
    assert!(exec(&c, "INSERT INTO kv (k, v) VALUES ('from-c', 'x')").await);
    for node in [&a, &b, &c] {
        wait_for("every write on every node", || async {
            keys(node).await.len() == written + 1
        })
        .await;
    }
}

/// `patina db` opens a database as a store, which writes to it (its schema, putting back
/// changes-index entries a crash left unwritten): on a database an agent runs on it would do so
/// behind the agent's back, so it refuses, and works once the agent is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patina_db_refuses_a_database_an_agent_runs_on() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("a");
    let mut a = start(&dir, None);
    assert!(exec(&a, "INSERT INTO kv (k, v) VALUES ('x', 'y')").await);
    let state = |db: &Path| {
        Command::new(patina())
            .args([
                "db".as_ref(),
                "state".as_ref(),
                "--db".as_ref(),
                db.as_os_str(),
            ])
            .output()
            .unwrap()
    };
    let refused = state(&dir.join("state.db"));
    assert!(!refused.status.success(), "patina db ran beside the agent");
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("in use"), "{said}");
    a.crash();
    drop(a);
    let after = state(&dir.join("state.db"));
    assert!(
        after.status.success(),
        "{}",
        String::from_utf8_lossy(&after.stderr)
    );
}

/// A node stopped with SIGTERM writes the changes-index entries its last local writes left
/// waiting (`store::local::INDEX_BATCH`): its next start has nothing to put back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_with_sigterm_leaves_no_index_to_rebuild() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("a");
    let mut a = start(&dir, None);
    for i in 0..3 {
        assert!(exec(&a, &format!("INSERT INTO kv (k, v) VALUES ('k{i}', 'v')")).await);
    }
    let sent = Command::new("kill")
        .args(["-TERM", &a.child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while a.child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the agent did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let db = rusqlite::Connection::open_with_flags(
        dir.join("state.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let count = |sql: &str| -> i64 { db.query_row(sql, [], |r| r.get(0)).unwrap() };
    assert_eq!(
        count("SELECT count(*) FROM __patina_unindexed"),
        0,
        "the stop left the index for the next start to rebuild"
    );
    assert_eq!(
        count("SELECT count(DISTINCT version) FROM __patina_changes WHERE site = 0"),
        3
    );
}
