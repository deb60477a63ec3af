//! Surviving faults: partitions, message loss. Every node ends with the same digest (rows and
//! clocks), because anti-entropy sync repairs whatever broadcast lost. Waits are bounded.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use patina::agent::Agent;
use patina_tests::{digest, exec, rows, start_cluster, wait_for};

async fn all_digests_equal(agents: &[Agent]) -> bool {
    let first = digest(&agents[0]).await;
    for agent in &agents[1..] {
        if digest(agent).await != first {
            return false;
        }
    }
    true
}

/// A 10-node cluster split into two halves; both halves write, including conflicting writes to
/// the same rows; after the heal every node's digest is equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healed_partition_converges() {
    let dirs: Vec<_> = (0..10).map(|_| tempfile::tempdir().unwrap()).collect();
    let agents = start_cluster(&dirs, None).await;
    exec(
        &agents[0],
        "INSERT INTO kv (k, v) VALUES ('shared', 'before')",
    )
    .await;
    wait_for("the first write everywhere", || async {
        let mut all = true;
        for a in &agents {
            all &= rows(a, "SELECT k FROM kv").await.len() == 1;
        }
        all
    })
    .await;

    let (left, right) = agents.split_at(5);
    let addrs = |side: &[Agent]| {
        side.iter()
            .map(|a| a.gossip_addr())
            .collect::<BTreeSet<SocketAddr>>()
    };
    let (left_addrs, right_addrs) = (addrs(left), addrs(right));
    for a in left {
        a.faults().cut_off(right_addrs.iter().copied());
    }
    for a in right {
        a.faults().cut_off(left_addrs.iter().copied());
    }
    for round in 0..5 {
        exec(
            &left[round % 5],
            &format!("INSERT INTO kv (k, v) VALUES ('left-{round}', 'l')"),
        )
        .await;
        exec(
            &right[round % 5],
            &format!("INSERT INTO kv (k, v) VALUES ('right-{round}', 'r')"),
        )
        .await;
    }
    exec(
        &left[0],
        "UPDATE kv SET v = 'left wins?', n = 1 WHERE k = 'shared'",
    )
    .await;
    exec(
        &right[0],
        "UPDATE kv SET v = 'right wins?', n = 2 WHERE k = 'shared'",
    )
    .await;
    wait_for("right-0 on right[1]", || async {
        rows(&right[1], "SELECT k FROM kv WHERE k = 'right-0'")
            .await
            .len()
            == 1
    })
    .await;
    exec(&right[1], "DELETE FROM kv WHERE k = 'right-0'").await;
    // While cut, the halves differ.
    wait_for("the left half to agree", || async {
        rows(&left[4], "SELECT k FROM kv").await.len() == 6
    })
    .await;
    assert_eq!(
        rows(&left[4], "SELECT k FROM kv WHERE k LIKE 'right-%'")
            .await
            .len(),
        0
    );

    for a in &agents {
        a.faults().heal();
    }
    wait_for("every digest equal after the heal", || {
        all_digests_equal(&agents)
    })
    .await;
    assert_eq!(rows(&agents[7], "SELECT k FROM kv").await.len(), 10);
    for agent in agents {
        agent.shutdown().await;
    }
}

/// 5% of all messages lost during a write burst: every write still reaches every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_survives_five_percent_loss() {
    let dirs: Vec<_> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    let agents = start_cluster(&dirs, None).await;
    for a in &agents {
        a.faults().drop_per_mille.store(50, Ordering::Relaxed);
    }
    for i in 0..100 {
        exec(
            &agents[i % 5],
            &format!("INSERT INTO kv (k, v) VALUES ('w{i}', 'x')"),
        )
        .await;
    }
    // Loss goes on while the cluster repairs itself.
    wait_for("all 100 writes on every node", || async {
        let mut all = true;
        for a in &agents {
            all &= rows(a, "SELECT k FROM kv").await.len() == 100;
        }
        all
    })
    .await;
    let dropped: u64 = agents.iter().map(|a| a.gossip().transport_dropped).sum();
    assert!(
        dropped > 0,
        "no message was dropped: the test tested nothing"
    );
    for a in &agents {
        a.faults().heal();
    }
    wait_for("equal digests", || all_digests_equal(&agents)).await;
    for agent in agents {
        agent.shutdown().await;
    }
}

/// A node whose disk is full fails every remote apply: its health must say it is falling
/// behind (gaps), not report a healthy node with no gaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_apply_reports_gaps() {
    use patina::http::client::{request, Method, StatusCode, Target};
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let full_db = dirs[1].path().join("state.db");
    let agents = patina_tests::start_cluster_with(&dirs, None, |config| {
        if config.db.path == full_db {
            config.db.max_db_bytes = Some(256 * 1024);
        }
    })
    .await;
    let blob = "x".repeat(4000);
    for i in 0..120 {
        exec(
            &agents[0],
            &format!("INSERT INTO kv (k, v) VALUES ('{i}', '{blob}')"),
        )
        .await;
    }
    let health = |query: &'static str| {
        let api = agents[1].api_addr();
        async move {
            let (status, body) = request(&Target::Tcp(api), Method::GET, query, None, vec![])
                .await
                .unwrap();
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            (status, json["response"]["gaps"].as_u64().unwrap_or(0))
        }
    };
    wait_for("the full node to report gaps", || async {
        health("/v1/health").await.1 > 0
    })
    .await;
    let (status, gaps) = health("/v1/health?gaps=0").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "gaps {gaps}");
    for agent in agents {
        agent.shutdown().await;
    }
}
