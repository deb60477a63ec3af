//! Real clusters in process, on loopback: membership with foca, broadcast over QUIC. A write on
//! one node is readable on every node; a restarted node keeps its rows and rejoins without a
//! bootstrap list; a stranger without a certificate from the cluster CA cannot join or inject.
//! Every wait is bounded.

use std::time::{Duration, Instant};

use patina::agent::Agent;
use patina::http::client::{request, request_stream, Method, StatusCode, Target};
use patina::net::tls::generate_ca;
use patina_tests::{
    admin, exec, node_config, rows, start_cluster, start_cluster_with, wait_for, wait_members,
    with_tls, WAIT,
};
use serde_json::{json, Value as Json};

/// A bare QUIC endpoint on loopback, without TLS, that opens sync sessions by hand (agents
/// started with `node_config` are plaintext too); the receiver of what it is sent, held as
/// long as the endpoint is used.
fn plaintext_peer() -> (
    patina::net::transport::Transport,
    tokio::sync::mpsc::Receiver<patina::net::transport::Received>,
) {
    use patina::net::transport::{TlsMode, Transport, TransportConfig};
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let transport = Transport::bind(
        "127.0.0.1:0".parse().unwrap(),
        &TlsMode::Plaintext,
        TransportConfig::default(),
        tx,
    )
    .unwrap();
    (transport, rx)
}

/// A sync request as a session's first frame: its length, then the encoded state.
fn sync_request_frame(state: &patina_core::sync::SyncState) -> Vec<u8> {
    let body = patina_core::wire::encode_sync_state(0, state, 0);
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend(body);
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_one_node_is_readable_on_all() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let ca = generate_ca().unwrap();
    let agents = start_cluster(&dirs, Some(&ca)).await;
    for (i, writer) in agents.iter().enumerate() {
        exec(
            writer,
            &format!("INSERT INTO kv (k, v) VALUES ('from-{i}', 'hello')"),
        )
        .await;
    }
    for agent in &agents {
        wait_for("every write on every node", || async {
            rows(agent, "SELECT k FROM kv").await.len() == 3
        })
        .await;
    }
    // Conflicting writes to one row (concurrent or not, depending on timing) end the same
    // everywhere.
    exec(
        &agents[0],
        "UPDATE kv SET v = 'zero', n = 1 WHERE k = 'from-0'",
    )
    .await;
    exec(
        &agents[1],
        "UPDATE kv SET v = 'one', n = 2 WHERE k = 'from-0'",
    )
    .await;
    exec(&agents[2], "UPDATE kv SET v = 'two' WHERE k = 'from-0'").await;
    let query = "SELECT k, v, n FROM kv WHERE k = 'from-0'";
    wait_for(
        "the conflict resolved the same way on every node",
        || async {
            let first = rows(&agents[0], query).await;
            rows(&agents[1], query).await == first
                && rows(&agents[2], query).await == first
                && first.len() == 1
        },
    )
    .await;
    // Metrics count what happened: each node committed one changeset locally and merged the
    // others' (3 inserts, then 3 conflicting updates).
    async fn metrics(agent: &Agent) -> String {
        let (status, text) = request(
            &Target::Tcp(agent.metrics_addr().unwrap()),
            Method::GET,
            "/metrics",
            None,
            vec![],
        )
        .await
        .unwrap();
        assert_eq!(status, StatusCode::OK);
        String::from_utf8(text.to_vec()).unwrap()
    }
    fn value(text: &str, name: &str) -> f64 {
        text.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .and_then(|l| l.split(' ').nth(1))
            .unwrap()
            .parse()
            .unwrap()
    }
    for agent in &agents {
        wait_for("every remote changeset counted", || async {
            value(&metrics(agent).await, "patina_changesets_applied_total") == 4.0
        })
        .await;
        let text = metrics(agent).await;
        assert_eq!(
            value(&text, "patina_changesets_committed_total"),
            2.0,
            "{text}"
        );
        assert_eq!(value(&text, "patina_members"), 2.0);
        assert!(text.contains("patina_broadcast_sent_total{kind=\"gossip\"}"));
        // Both other members are this node's random (far) kept links once the request left.
        assert!(text.contains("patina_kept_links{kind=\"far\"} 2"), "{text}");
        // Latencies as histograms: this node's own write through the API, the merge of the
        // others' batches (the store waits below).
        for line in [
            "patina_api_request_duration_seconds_count{route=\"/v1/transactions\",method=\"POST\",status=\"200\"} ",
            "patina_apply_batch_duration_seconds_count ",
            "patina_build_info{version=",
            "process_resident_memory_bytes ",
        ] {
            assert!(text.lines().any(|l| l.starts_with(line)), "no {line} in {text}");
        }
        // The store's two waits are observed, not only listed (their series exist from the
        // start, at zero).
        for kind in ["transaction", "apply"] {
            let name = format!("patina_store_queue_wait_seconds_count{{kind=\"{kind}\"}}");
            assert!(value(&text, &name) >= 1.0, "{name} in {text}");
        }
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
    }
    let (status, members) = admin(&agents[0], Method::GET, "/members", Json::Null).await;
    assert_eq!(status, StatusCode::OK);
    let mut sites: Vec<String> = members["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["site_id"].as_str().unwrap().to_owned())
        .collect();
    sites.sort();
    let mut expected: Vec<String> = agents[1..].iter().map(|a| a.site_id().to_hex()).collect();
    expected.sort();
    assert_eq!(sites, expected);
    let (status, health) = request(
        &Target::Tcp(agents[0].api_addr()),
        Method::GET,
        "/v1/health",
        None,
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_slice::<Json>(&health).unwrap()["response"]["members"],
        json!(3)
    );
    for agent in agents {
        agent.shutdown().await;
    }
}

/// `/v1/updates/{table}` on one node streams the rows changed by writes on other nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_stream_notifies_remote_changes() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let agents = start_cluster(&dirs, None).await;
    let (status, _) = request(
        &Target::Tcp(agents[1].api_addr()),
        Method::POST,
        "/v1/updates/nope",
        None,
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, mut stream) = request_stream(
        &Target::Tcp(agents[1].api_addr()),
        Method::POST,
        "/v1/updates/kv",
        None,
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::OK);
    exec(
        &agents[0],
        "INSERT INTO kv (k, v) VALUES ('a', '1'), ('b', '2')",
    )
    .await;
    exec(&agents[0], "DELETE FROM kv WHERE k = 'a'").await;
    let mut lines: Vec<Json> = Vec::new();
    let mut buffer = Vec::new();
    let deadline = Instant::now() + WAIT;
    let mut updated_locally = false;
    while lines.len() < 4 && Instant::now() < deadline {
        if lines.len() == 3 && !updated_locally {
            // A local write shows up on the same stream.
            exec(&agents[1], "UPDATE kv SET v = '3' WHERE k = 'b'").await;
            updated_locally = true;
        }
        let Ok(Some(chunk)) = tokio::time::timeout(Duration::from_secs(5), stream.recv()).await
        else {
            break;
        };
        buffer.extend_from_slice(&chunk);
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            lines.push(serde_json::from_slice(&line).unwrap());
        }
    }
    assert_eq!(
        lines,
        vec![
            json!({"notify": ["update", ["a"]]}),
            json!({"notify": ["update", ["b"]]}),
            json!({"notify": ["delete", ["a"]]}),
            json!({"notify": ["update", ["b"]]}),
        ]
    );
    for agent in agents {
        agent.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_each_write_and_all_converge() {
    let dirs: Vec<_> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    let agents = start_cluster(&dirs, None).await;
    for round in 0..4 {
        for (i, writer) in agents.iter().enumerate() {
            exec(
                writer,
                &format!("INSERT INTO kv (k, v) VALUES ('{round}-{i}', 'x')"),
            )
            .await;
        }
    }
    for agent in &agents {
        wait_for("20 rows on every node", || async {
            rows(agent, "SELECT k FROM kv").await.len() == 20
        })
        .await;
    }
    for agent in agents {
        agent.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_keeps_its_rows_and_rejoins_without_bootstrap() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut agents = start_cluster(&dirs, None).await;
    exec(
        &agents[0],
        "INSERT INTO kv (k, v) VALUES ('before', 'restart')",
    )
    .await;
    for agent in &agents {
        wait_for("the first write everywhere", || async {
            rows(agent, "SELECT k FROM kv").await.len() == 1
        })
        .await;
    }
    let stopped = agents.pop().unwrap();
    let site = stopped.site_id();
    stopped.shutdown().await;
    wait_for("the others to see the leave", || async {
        agents[0].gossip().members.len() == 1
    })
    .await;

    // Same data folder, no bootstrap list: it rejoins through the members it remembered.
    let restarted = Agent::start(&node_config(dirs[2].path(), &[]))
        .await
        .unwrap();
    assert_eq!(restarted.site_id(), site);
    assert_eq!(
        rows(&restarted, "SELECT k FROM kv").await,
        vec![json!(["before"])]
    );
    wait_members(&[&agents[0], &agents[1], &restarted], 3).await;
    exec(
        &agents[0],
        "INSERT INTO kv (k, v) VALUES ('after', 'restart')",
    )
    .await;
    wait_for("the new write on the restarted node", || async {
        rows(&restarted, "SELECT k FROM kv").await.len() == 2
    })
    .await;
    for agent in agents.into_iter().chain([restarted]) {
        agent.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_without_a_cluster_certificate_cannot_join_or_inject() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let ca = generate_ca().unwrap();
    let agents = start_cluster(&dirs, Some(&ca)).await;
    let other_ca = generate_ca().unwrap();
    let stranger_dir = tempfile::tempdir().unwrap();
    let stranger_config = with_tls(
        node_config(stranger_dir.path(), &[agents[0].gossip_addr()]),
        stranger_dir.path(),
        &other_ca,
    );
    let stranger = Agent::start(&stranger_config).await.unwrap();
    let plain_dir = tempfile::tempdir().unwrap();
    let plain = Agent::start(&node_config(plain_dir.path(), &[agents[0].gossip_addr()]))
        .await
        .unwrap();
    exec(&stranger, "INSERT INTO kv (k, v) VALUES ('injected', 'x')").await;
    exec(
        &plain,
        "INSERT INTO kv (k, v) VALUES ('injected-plain', 'x')",
    )
    .await;
    // Give them time to try; the cluster's own traffic keeps flowing meanwhile.
    exec(&agents[0], "INSERT INTO kv (k, v) VALUES ('legit', 'x')").await;
    wait_for("the legitimate write", || async {
        rows(&agents[1], "SELECT k FROM kv").await.len() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for agent in &agents {
        assert_eq!(agent.gossip().members.len(), 1, "a stranger joined");
        assert_eq!(
            rows(agent, "SELECT k FROM kv").await,
            vec![json!(["legit"])]
        );
    }
    assert!(stranger.gossip().members.is_empty());
    for agent in agents.into_iter().chain([stranger, plain]) {
        agent.shutdown().await;
    }
}

/// Anti-entropy: a node that was down while rows changed gets every one of them after it
/// restarts, though broadcast never sent them to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_was_down_catches_up_by_sync() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut agents = start_cluster(&dirs, None).await;
    let stopped = agents.pop().unwrap();
    stopped.shutdown().await;
    wait_for("the others to see the leave", || async {
        agents[0].gossip().members.len() == 1
    })
    .await;
    // 10,000 rows changed while it was down: 20 transactions of 500 rows on two nodes, then
    // a delete of 500 of them.
    for i in 0..20 {
        let values: Vec<String> = (0..500).map(|j| format!("('{i}-{j}', 'v')")).collect();
        exec(
            &agents[i % 2],
            &format!("INSERT INTO kv (k, v) VALUES {}", values.join(", ")),
        )
        .await;
    }
    exec(&agents[0], "DELETE FROM kv WHERE k LIKE '3-%'").await;
    let restarted = Agent::start(&node_config(dirs[2].path(), &[]))
        .await
        .unwrap();
    wait_for("the restarted node to catch up", || async {
        rows(&restarted, "SELECT count(*) FROM kv").await == vec![json!([9500])]
    })
    .await;
    let all = "SELECT k, v, n FROM kv ORDER BY k";
    assert_eq!(rows(&restarted, all).await, rows(&agents[0], all).await);
    assert!(restarted.gossip().sync_received > 0);
    for agent in agents.into_iter().chain([restarted]) {
        agent.shutdown().await;
    }
}

/// Sync rounds between nodes that hold the same versions end at the check (the partner's state
/// hash equals this node's), with no session; a node that lacks something still gets a session
/// (the catch-up test above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_between_nodes_holding_the_same_versions_end_at_the_check() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let agents = start_cluster_with(&dirs, None, |config| {
        config.gossip.sync_interval_ms = 300;
    })
    .await;
    exec(&agents[0], "INSERT INTO kv (k, v) VALUES ('one', 'v')").await;
    for agent in &agents {
        wait_for("the write everywhere", || async {
            rows(agent, "SELECT count(*) FROM kv").await == vec![json!([1])]
        })
        .await;
    }
    // Rounds that began before the write was everywhere may still run a session.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before: Vec<u64> = agents.iter().map(|a| a.gossip().sync_spared).collect();
    let failures: Vec<u64> = agents.iter().map(|a| a.gossip().sync_failures).collect();
    for (agent, spared) in agents.iter().zip(&before) {
        wait_for("three rounds spared by the check", || async {
            agent.gossip().sync_spared >= spared + 3
        })
        .await;
    }
    // (Sessions are not counted against them: on a loaded machine an answer may come after
    // the second's wait, and that partner then gets sessions for a minute, as it should.)
    for (agent, failures) in agents.iter().zip(&failures) {
        assert_eq!(agent.gossip().sync_failures, *failures);
    }
    // The versions are still the same everywhere.
    patina_tests::assert_same_digest(&agents).await;
    for agent in agents {
        agent.shutdown().await;
    }
}

/// A partner that leaves sync checks unanswered (`gossip.sync_check = false`, as a node of a
/// release without them) gets sessions: rounds with it wait for the answer once, then open
/// their session at once; rounds between the other two are still spared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_that_leaves_the_check_unanswered_gets_sessions() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let silent = dirs[2].path().to_path_buf();
    let agents = start_cluster_with(&dirs, None, |config| {
        config.gossip.sync_interval_ms = 300;
        if config.db.path.starts_with(&silent) {
            config.gossip.sync_check = false;
        }
    })
    .await;
    exec(&agents[2], "INSERT INTO kv (k, v) VALUES ('silent', 'v')").await;
    exec(&agents[0], "INSERT INTO kv (k, v) VALUES ('asking', 'v')").await;
    for agent in &agents {
        wait_for("both writes everywhere", || async {
            rows(agent, "SELECT count(*) FROM kv").await == vec![json!([2])]
        })
        .await;
    }
    let sessions = |agent: &Agent| {
        let g = agent.gossip();
        g.sync_rounds - g.sync_spared
    };
    let before: Vec<u64> = agents.iter().map(sessions).collect();
    for (i, agent) in agents.iter().enumerate() {
        wait_for("sessions with the silent node, and its own", || async {
            sessions(agent) >= before[i] + 2
        })
        .await;
    }
    // The two that ask spare their rounds with each other; the silent one never asks.
    for agent in &agents[..2] {
        wait_for("a round spared", || async {
            agent.gossip().sync_spared > 0
        })
        .await;
    }
    assert_eq!(agents[2].gossip().sync_spared, 0);
    assert_eq!(agents[2].gossip().sync_failures, 0);
    patina_tests::assert_same_digest(&agents).await;
    for agent in agents {
        agent.shutdown().await;
    }
}

/// A transaction far larger than a part travels in parts: by broadcast to the live nodes, by sync
/// to one that was down, and applies all at once on each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_transaction_travels_in_parts() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let small_parts = |config: &mut patina::config::Config| config.gossip.part_bytes = 4096;
    let mut agents = start_cluster_with(&dirs, None, small_parts).await;
    let stopped = agents.pop().unwrap();
    stopped.shutdown().await;
    wait_for("the others to see the leave", || async {
        agents[0].gossip().members.len() == 1
    })
    .await;
    // 3,000 rows with 100-byte values: about 450 KB of changes, over a hundred parts.
    let values: Vec<String> = (0..3000)
        .map(|i| format!("('big-{i}', '{}')", "x".repeat(100)))
        .collect();
    exec(
        &agents[0],
        &format!("INSERT INTO kv (k, v) VALUES {}", values.join(", ")),
    )
    .await;
    let count = "SELECT count(*) FROM kv";
    wait_for("the live peer to assemble the parts", || async {
        rows(&agents[1], count).await == vec![json!([3000])]
    })
    .await;
    let mut config = node_config(dirs[2].path(), &[]);
    small_parts(&mut config);
    let restarted = Agent::start(&config).await.unwrap();
    wait_for("the restarted node to catch up", || async {
        rows(&restarted, count).await == vec![json!([3000])]
    })
    .await;
    let digest = patina_tests::digest(&agents[0]).await;
    assert_eq!(patina_tests::digest(&agents[1]).await, digest);
    assert_eq!(patina_tests::digest(&restarted).await, digest);
    // Both received parts, not one message: the buffered-parts counter moved on each.
    for agent in [&agents[1], &restarted] {
        let (status, text) = request(
            &Target::Tcp(agent.metrics_addr().unwrap()),
            Method::GET,
            "/metrics",
            None,
            vec![],
        )
        .await
        .unwrap();
        assert_eq!(status, StatusCode::OK);
        let text = String::from_utf8(text.to_vec()).unwrap();
        let buffered: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("patina_changeset_parts_buffered_total "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(buffered >= 100.0, "{buffered} parts buffered");
    }
    for agent in agents.into_iter().chain([restarted]) {
        agent.shutdown().await;
    }
}

/// A peer that opens sync sessions with garbage, absurd or oversized requests gets nothing and
/// harms nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_sync_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&node_config(dir.path(), &[])).await.unwrap();
    exec(&agent, "INSERT INTO kv (k, v) VALUES ('a', 'b')").await;
    let (hostile, _inbox) = plaintext_peer();
    let requests: Vec<Vec<u8>> = vec![
        vec![5, 0, 0, 0, 1, 2, 3, 4, 5],   // five bytes of garbage
        (u32::MAX).to_le_bytes().to_vec(), // a frame claiming 4 GiB
        {
            // a well-formed state with a gap beyond its head
            let mut state = patina_core::sync::SyncState::default();
            state.sites.insert(
                agent.site_id(),
                (patina_core::DbVersion(1), vec![(1, 1 << 60)]),
            );
            sync_request_frame(&state)
        },
        vec![1, 0, 0], // a truncated length
    ];
    for request in requests {
        let (mut send, mut recv) = hostile
            .open_session(agent.gossip_addr())
            .await
            .expect("session");
        let _ = send.write_all(&request).await;
        let _ = send.finish();
        let answer = tokio::time::timeout(Duration::from_secs(15), recv.read_to_end(1 << 20))
            .await
            .expect("the node hung");
        // Either the stream is reset or it ends without a single changeset.
        if let Ok(bytes) = answer {
            assert!(
                bytes.is_empty(),
                "a hostile request got {} bytes",
                bytes.len()
            );
        }
    }
    assert_eq!(rows(&agent, "SELECT k FROM kv").await, vec![json!(["a"])]);
    hostile.close().await;
    agent.shutdown().await;
}

/// A session that serves more than one chunk (`net::sync::SERVE_CHUNK_BYTES`: the store reads
/// a sync answer a chunk at a time, so that it is never held, nor memory filled, by the whole
/// of it) still sends every version once, in order, a cleared one included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_answer_of_several_chunks_sends_every_version_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&node_config(dir.path(), &[])).await.unwrap();
    let big = "x".repeat(200_000);
    for i in 1..=12 {
        exec(
            &agent,
            &format!("INSERT INTO kv (k, v) VALUES ('{i}', '{big}')"),
        )
        .await;
    }
    // Version 13 deletes version 5's only row: version 5 is served cleared.
    exec(&agent, "DELETE FROM kv WHERE k = '5'").await;
    assert!(12 * big.len() > 2 * patina::net::sync::SERVE_CHUNK_BYTES);

    let (peer, _inbox) = plaintext_peer();
    let (mut send, mut recv) = peer
        .open_session(agent.gossip_addr())
        .await
        .expect("session");
    // A peer that has nothing.
    let request = sync_request_frame(&patina_core::sync::SyncState::default());
    send.write_all(&request).await.unwrap();
    let _ = send.finish();
    let answer = tokio::time::timeout(Duration::from_secs(30), recv.read_to_end(64 << 20))
        .await
        .expect("the node hung")
        .expect("the answer");

    // Frames (a length, then a changeset or one of its parts), ended by an empty one.
    let limits = patina_core::wire::Limits::default();
    let mut versions: Vec<u64> = Vec::new();
    let mut rest = answer.as_slice();
    loop {
        let (len, tail) = rest.split_at(4);
        let len = u32::from_le_bytes(len.try_into().unwrap()) as usize;
        if len == 0 {
            assert!(tail.is_empty(), "bytes after the last frame");
            break;
        }
        let changeset = patina_core::wire::decode_changeset(&tail[..len], &limits).unwrap();
        assert_eq!(changeset.id.site, agent.site_id());
        let version = changeset.id.version.get();
        if versions.last() != Some(&version) {
            versions.push(version);
        }
        if version == 5 {
            assert!(changeset.changes.is_empty(), "version 5 is cleared");
        }
        rest = &tail[len..];
    }
    assert_eq!(versions, (1..=13).collect::<Vec<_>>());
    peer.close().await;
    agent.shutdown().await;
}

/// A peer that asks for a large answer and then reads it slower than the node serves (each
/// read within the 10 s step timeout) is cut off at `gossip.sync_serve_ms_max`: the node's
/// only serving slot is free again, and the next peer gets its whole answer. Without the cap
/// such a peer held a slot for as long as it liked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_session_read_too_slowly_is_cut_at_the_serve_cap() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = node_config(dir.path(), &[]);
    cfg.gossip.sync_serve_ms_max = 1_000;
    cfg.gossip.sync_sessions_max = 1;
    let agent = Agent::start(&cfg).await.unwrap();
    let big = "x".repeat(200_000);
    for i in 1..=20 {
        exec(
            &agent,
            &format!("INSERT INTO kv (k, v) VALUES ('{i}', '{big}')"),
        )
        .await;
    }
    let (peer, _inbox) = plaintext_peer();
    // A peer that has nothing; the answer (4 MB) is larger than a stream's flow-control
    // window, so the node waits on the reader.
    let request = sync_request_frame(&patina_core::sync::SyncState::default());
    // Frames read (after the answer's first bytes, `read`) until the stream ends or fails;
    // whether the empty last frame came.
    let read_answer = |mut recv: quinn::RecvStream, read: Vec<u8>| async move {
        let answer = tokio::time::timeout(Duration::from_secs(30), recv.read_to_end(64 << 20))
            .await
            .expect("the node hung");
        let Ok(answer) = answer else {
            return (0, false);
        };
        let answer = [read, answer].concat();
        let (mut frames, mut rest) = (0, answer.as_slice());
        while rest.len() >= 4 {
            let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
            if len == 0 {
                return (frames, rest.len() == 4);
            }
            if rest.len() < 4 + len {
                break;
            }
            frames += 1;
            rest = &rest[4 + len..];
        }
        (frames, false)
    };

    let (mut send, mut recv) = peer
        .open_session(agent.gossip_addr())
        .await
        .expect("session");
    send.write_all(&request).await.unwrap();
    let _ = send.finish();
    let mut first = [0u8; 4];
    recv.read_exact(&mut first)
        .await
        .expect("the answer starts");
    // Three times the cap, well within the step timeout.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, whole) = read_answer(recv, first.to_vec()).await;
    assert!(!whole, "a session read this slowly was served to its end");

    // The slot is free: the next peer, which lacks only the last version (a small answer,
    // well within the cap), gets it whole, in parts, and the answer's end.
    let mut lacks_one = patina_core::sync::SyncState::default();
    lacks_one.sites.insert(
        agent.site_id(),
        (patina_core::DbVersion(20), vec![(20, 20)]),
    );
    let (mut send, recv) = peer
        .open_session(agent.gossip_addr())
        .await
        .expect("session");
    send.write_all(&sync_request_frame(&lacks_one))
        .await
        .unwrap();
    let _ = send.finish();
    let (frames, whole) = read_answer(recv, Vec::new()).await;
    assert!(whole && frames >= 2, "{frames} frames, whole: {whole}");
    peer.close().await;
    agent.shutdown().await;
}

/// A node with many gaps sends a large sync request (here 20,000 gaps, about 80 KB). A node
/// whose message limit is set low (64 KiB) still reads it: requests have a limit of their own,
/// from their format. Read with the message limit, the request was refused, and the asking
/// node's anti-entropy stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_sync_request_is_served_by_a_node_with_a_small_message_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = node_config(dir.path(), &[]);
    cfg.gossip.message_bytes_max = 64 * 1024;
    cfg.gossip.part_bytes = 16 * 1024;
    let agent = Agent::start(&cfg).await.unwrap();
    exec(&agent, "INSERT INTO kv (k, v) VALUES ('1', 'one')").await;
    let (peer, _inbox) = plaintext_peer();
    // A peer that heard of 40,000 versions of the node and lacks every odd one, version 1
    // (the only one the node has) among them.
    let mut state = patina_core::sync::SyncState::default();
    let gaps = (0..20_000u64).map(|i| (2 * i + 1, 2 * i + 1)).collect();
    state
        .sites
        .insert(agent.site_id(), (patina_core::DbVersion(40_000), gaps));
    let request = sync_request_frame(&state);
    let body = request.len() - 4;
    assert!(body > cfg.gossip.message_bytes_max, "{body}");
    let (mut send, mut recv) = peer
        .open_session(agent.gossip_addr())
        .await
        .expect("session");
    send.write_all(&request).await.unwrap();
    let _ = send.finish();
    let answer = tokio::time::timeout(Duration::from_secs(30), recv.read_to_end(1 << 20))
        .await
        .expect("the node hung")
        .unwrap_or_default();
    // Version 1 in one frame, then the empty frame that ends the answer.
    assert!(
        answer.len() > 8,
        "{} bytes: the request was refused",
        answer.len()
    );
    let len = u32::from_le_bytes(answer[..4].try_into().unwrap()) as usize;
    let changeset = patina_core::wire::decode_changeset(
        &answer[4..4 + len],
        &patina_core::wire::Limits::default(),
    )
    .unwrap();
    assert_eq!(changeset.id.version.get(), 1);
    assert_eq!(&answer[4 + len..], [0, 0, 0, 0]);
    peer.close().await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_before_its_bootstrap_node_joins_when_it_comes_up() {
    // An address nothing listens on yet: the first announce to it is lost.
    let bootstrap_addr = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (early_dir, late_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let early = Agent::start(&node_config(early_dir.path(), &[bootstrap_addr]))
        .await
        .unwrap();
    // QUIC retransmits its first packet, so a node that comes up while the handshake is
    // still being tried is reached; the transport gives a handshake up after 5 s.
    tokio::time::sleep(Duration::from_millis(6_500)).await;
    assert!(early.gossip().members.is_empty());
    // The bootstrap node comes up without a bootstrap list of its own: only the early
    // node's renewed announces can bring them together.
    let mut late_config = node_config(late_dir.path(), &[]);
    late_config.gossip.addr = bootstrap_addr;
    let late = Agent::start(&late_config).await.unwrap();
    wait_members(&[&early, &late], 2).await;
    early.shutdown().await;
    late.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_bound_to_every_interface_joins_by_name_and_advertises_its_route() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Agent::start(&node_config(a_dir.path(), &[])).await.unwrap();
    // b binds the wildcard and knows a only by a name.
    let mut b_config = node_config(b_dir.path(), &[]);
    b_config.gossip.addr = "0.0.0.0:0".parse().unwrap();
    b_config.gossip.plaintext = true;
    b_config.gossip.bootstrap = vec![format!("localhost:{}", a.gossip_addr().port())];
    let b = Agent::start(&b_config).await.unwrap();
    // b advertises the address on its route to a, not the wildcard.
    assert_eq!(b.gossip_addr().ip().to_string(), "127.0.0.1");
    assert_ne!(b.gossip_addr().port(), 0);
    wait_members(&[&a, &b], 2).await;
    let b_seen_by_a: Vec<std::net::SocketAddr> = a.gossip().members.values().copied().collect();
    assert_eq!(b_seen_by_a, vec![b.gossip_addr()]);
    exec(&b, "INSERT INTO kv (k, v) VALUES ('from-b', 'x')").await;
    wait_for("b's write on a", || async {
        rows(&a, "SELECT k FROM kv").await == vec![json!(["from-b"])]
    })
    .await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_lag_is_measured_from_the_authors_commit_time() {
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    // Sync would bring the write without its commit time: keep it out of the way.
    let agents = start_cluster_with(&dirs, None, |c| c.gossip.sync_interval_ms = 600_000).await;
    let (a, b) = (&agents[0], &agents[1]);
    async fn health(agent: &Agent, query: &str) -> (StatusCode, Json) {
        let (status, body) = request(
            &Target::Tcp(agent.api_addr()),
            Method::GET,
            &format!("/v1/health{query}"),
            None,
            vec![],
        )
        .await
        .unwrap();
        (status, serde_json::from_slice(&body).unwrap())
    }
    assert_eq!(health(b, "?p99_lag=1").await.1["response"]["p99_lag"], 0.0);
    // Everything a sends now takes 1.5 s to arrive.
    a.faults()
        .set_latency(std::sync::Arc::new(|_| Duration::from_millis(1_500)));
    exec(a, "INSERT INTO kv (k, v) VALUES ('late', 'x')").await;
    wait_for("the write on b", || async {
        rows(b, "SELECT k FROM kv").await == vec![json!(["late"])]
    })
    .await;
    let (status, answer) = health(b, "?p99_lag=1").await;
    let lag = answer["response"]["p99_lag"].as_f64().unwrap();
    assert!((1.5..10.0).contains(&lag), "{answer}");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert_eq!(health(b, "?p99_lag=20").await.0, StatusCode::OK);
    for agent in agents {
        agent.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_socket_shows_members_and_subscriptions_and_reconciles_on_demand() {
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    // Periodic sync out of the way: only an asked-for reconcile pulls.
    let agents = start_cluster_with(&dirs, None, |c| c.gossip.sync_interval_ms = 600_000).await;
    let (a, b) = (&agents[0], &agents[1]);
    let (status, states) = admin(b, Method::GET, "/membership-states", Json::Null).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        states["members"][0]["addr"],
        a.gossip_addr().to_string(),
        "{states}"
    );
    assert_eq!(states["members"][0]["state"], "alive", "{states}");

    // Everything a sends is lost from now on: its write can reach b only by a sync session.
    a.faults()
        .drop_per_mille
        .store(1000, std::sync::atomic::Ordering::Relaxed);
    exec(a, "INSERT INTO kv (k, v) VALUES ('by-sync', 'x')").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rows(b, "SELECT k FROM kv").await.is_empty());
    let (status, pulled) = admin(
        b,
        Method::POST,
        "/sync/reconcile",
        json!({"peer": a.gossip_addr().to_string()}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{pulled}");
    assert_eq!(pulled["changesets"], 1, "{pulled}");
    assert_eq!(rows(b, "SELECT k FROM kv").await, vec![json!(["by-sync"])]);
    let (status, _) = admin(
        b,
        Method::POST,
        "/sync/reconcile",
        json!({"peer": "nobody"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // A subscription with a listener, as operators see it.
    let (status, headers, stream) = patina::http::client::request_stream_with_headers(
        &Target::Tcp(b.api_addr()),
        Method::POST,
        "/v1/subscriptions",
        None,
        serde_json::to_vec(&json!("SELECT k FROM kv")).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::OK);
    let id = headers["corro-query-id"].to_str().unwrap().to_string();
    let (_, listed) = admin(b, Method::GET, "/subs", Json::Null).await;
    let sub = &listed["subscriptions"][0];
    assert_eq!(
        (
            sub["id"].as_str(),
            sub["sql"].as_str(),
            sub["rows"].as_u64(),
            sub["subscribers"].as_u64()
        ),
        (
            Some(id.as_str()),
            Some("SELECT k FROM kv"),
            Some(1),
            Some(1)
        ),
        "{listed}"
    );
    let (status, info) = admin(b, Method::GET, &format!("/subs/{id}"), Json::Null).await;
    assert_eq!((status, &info), (StatusCode::OK, sub));
    assert_eq!(
        admin(b, Method::GET, "/subs/nope", Json::Null).await.0,
        StatusCode::NOT_FOUND
    );
    drop(stream);

    let (status, rejoined) = admin(b, Method::POST, "/rejoin", Json::Null).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        rejoined["announced_to"]
            .as_array()
            .unwrap()
            .contains(&json!(a.gossip_addr().to_string())),
        "{rejoined}"
    );
    for agent in agents {
        agent.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_and_replicate_over_ipv6() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("skipped: this machine has no IPv6 loopback");
        return;
    }
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a_config = node_config(a_dir.path(), &[]);
    a_config.gossip.addr = "[::1]:0".parse().unwrap();
    let a = Agent::start(&a_config).await.unwrap();
    // b binds every interface of both families and joins a by its IPv6 address.
    let mut b_config = node_config(b_dir.path(), &[]);
    b_config.gossip.addr = "[::]:0".parse().unwrap();
    b_config.gossip.plaintext = true;
    b_config.gossip.bootstrap = vec![format!("[::1]:{}", a.gossip_addr().port())];
    let b = Agent::start(&b_config).await.unwrap();
    assert_eq!(b.gossip_addr().ip().to_string(), "::1");
    wait_members(&[&a, &b], 2).await;
    exec(&a, "INSERT INTO kv (k, v) VALUES ('over-v6', 'x')").await;
    wait_for("a's write on b", || async {
        rows(&b, "SELECT k FROM kv").await == vec![json!(["over-v6"])]
    })
    .await;
    a.shutdown().await;
    b.shutdown().await;
}
