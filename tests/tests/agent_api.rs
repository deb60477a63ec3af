//! The agent's HTTP API on loopback, in process: Corrosion-compatible shapes and status codes,
//! bad input that leaves the node working, the bearer token, the in-flight limit, the body
//! limit, schema reload through the admin socket, and restart on the same data folder.

use std::time::Duration;

use patina::agent::Agent;
use patina::config::Config;
use patina::http::client::{request, request_stream, Method, StatusCode, Target};
use patina_tests::reload;
use serde_json::{json, Value as Json};

/// A statement that never ends on its own.
const RUNAWAY: &str =
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) SELECT count(*) FROM c";

const SCHEMA: &str = "CREATE TABLE hosts (id INTEGER PRIMARY KEY, name TEXT NOT NULL DEFAULT '', zone TEXT, cert BLOB);";

fn config(dir: &tempfile::TempDir) -> Config {
    std::fs::create_dir_all(dir.path().join("schema")).unwrap();
    std::fs::write(dir.path().join("schema/hosts.sql"), SCHEMA).unwrap();
    let mut config = Config::default();
    config.db.path = dir.path().join("state.db");
    config.db.schema_paths = vec![dir.path().join("schema")];
    config.api.addr = "127.0.0.1:0".parse().unwrap();
    config.admin.path = dir.path().join("admin.sock");
    config.gossip.addr = "127.0.0.1:0".parse().unwrap();
    config
}

async fn call(agent: &Agent, path: &str, body: Json) -> (StatusCode, Json) {
    call_raw(
        agent,
        Method::POST,
        path,
        None,
        serde_json::to_vec(&body).unwrap(),
    )
    .await
}

async fn call_raw(
    agent: &Agent,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, Json) {
    let (status, bytes) = request(&Target::Tcp(agent.api_addr()), method, path, token, body)
        .await
        .unwrap();
    let json = if path.starts_with("/v1/queries") && status == StatusCode::OK {
        Json::Array(
            bytes
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .map(|l| serde_json::from_slice(l).unwrap())
                .collect(),
        )
    } else {
        serde_json::from_slice(&bytes).unwrap_or(Json::Null)
    };
    (status, json)
}

async fn row_count(agent: &Agent) -> i64 {
    let (status, lines) = call(agent, "/v1/queries", json!("SELECT count(*) FROM hosts")).await;
    assert_eq!(status, StatusCode::OK);
    lines[1]["row"][1][0].as_i64().unwrap()
}

#[tokio::test]
async fn transactions_and_queries_have_corrosion_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&config(&dir)).await.unwrap();
    let (status, out) = call(
        &agent,
        "/v1/transactions",
        json!([
            "INSERT INTO hosts (id, name) VALUES (1, 'web-1')",
            ["INSERT INTO hosts (id, name, cert) VALUES (?, ?, ?)", [2, "web-2", [1, 2, 255]]],
            ["UPDATE hosts SET zone = :zone WHERE id = 1", {"zone": "ams"}],
            {"query": "UPDATE hosts SET zone = ? WHERE id = 2", "params": ["fra"]},
        ]),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(out["version"], json!(1));
    assert_eq!(out["actor_id"], json!(agent.site_id().to_hex()));
    let results = out["results"].as_array().unwrap();
    assert_eq!(results.len(), 4);
    assert!(results
        .iter()
        .all(|r| r["rows_affected"] == json!(1) && r["time"].is_f64()));
    assert!(out["time"].is_f64());

    let (status, lines) = call(
        &agent,
        "/v1/queries",
        json!([
            "SELECT id, name, zone, cert FROM hosts WHERE id >= ? ORDER BY id",
            [1]
        ]),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(lines[0], json!({"columns": ["id", "name", "zone", "cert"]}));
    assert_eq!(lines[1], json!({"row": [1, [1, "web-1", "ams", null]]}));
    assert_eq!(
        lines[2],
        json!({"row": [2, [2, "web-2", "fra", [1, 2, 255]]]})
    );
    assert!(lines[3]["eoq"]["time"].is_f64());
    assert_eq!(lines.as_array().unwrap().len(), 4);

    // A transaction that changes nothing takes no version.
    let (status, out) = call(
        &agent,
        "/v1/transactions",
        json!(["UPDATE hosts SET zone = 'ams' WHERE id = 1"]),
    )
    .await;
    assert_eq!(
        (status, out["version"].clone()),
        (StatusCode::OK, Json::Null)
    );

    let (status, health) = call_raw(&agent, Method::GET, "/v1/health", None, vec![]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(health["response"]["gaps"], json!(0));
    assert_eq!(health["response"]["members"], json!(1));
    let (status, stats) = call(
        &agent,
        "/v1/table_stats",
        json!({"tables": ["hosts", "nope"]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        stats,
        json!({"total_row_count": 2, "invalid_tables": ["nope"]})
    );
    agent.shutdown().await;
}

#[tokio::test]
async fn bad_input_gets_the_right_status_and_the_node_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir);
    cfg.api.body_bytes_max = 64 * 1024;
    let agent = Agent::start(&cfg).await.unwrap();
    call(
        &agent,
        "/v1/transactions",
        json!(["INSERT INTO hosts (id) VALUES (1)"]),
    )
    .await;

    let cases: Vec<(&str, Vec<u8>, StatusCode)> = vec![
        (
            "/v1/transactions",
            b"{not json".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        ("/v1/transactions", b"[]".to_vec(), StatusCode::BAD_REQUEST),
        (
            "/v1/transactions",
            b"[{\"query\": 5}]".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/transactions",
            br#"[{"query": "SELECT ?", "params": [1], "named_params": {}}]"#.to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        // The SQL text may not hide a second statement behind a NUL byte.
        (
            "/v1/transactions",
            b"[\"INSERT INTO hosts (id) VALUES (2)\\u0000; DELETE FROM hosts\"]".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        // A failing statement is the request's fault: 400 with the error in the results, and
        // nothing of the transaction committed.
        (
            "/v1/transactions",
            br#"["INSERT INTO hosts (id) VALUES (2)", "INSERT INTO nope VALUES (1)"]"#.to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/transactions",
            br#"["INSERT INTO hosts (id) VALUES (1)"]"#.to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/transactions",
            br#"["DROP TABLE hosts"]"#.to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/transactions",
            br#"[["INSERT INTO hosts (id) VALUES (?)", [1, 2]]]"#.to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/transactions",
            br#"["SELECT 1"]"#.to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/queries",
            br#""DELETE FROM hosts""#.to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/queries",
            br#""SELEKT 1""#.to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/queries",
            b"[1, 2, 3]".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        ("/v1/table_stats", b"{}".to_vec(), StatusCode::BAD_REQUEST),
        // What would leave a pooled read connection changed, or reach other files.
        (
            "/v1/queries",
            br#""BEGIN""#.to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/queries",
            br#""SAVEPOINT s""#.to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/queries",
            br#""PRAGMA cache_size = 1""#.to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/queries",
            br#""PRAGMA writable_schema = ON""#.to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/queries",
            br#""ATTACH '/etc/hostname' AS other""#.to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/transactions",
            vec![b' '; 200 * 1024],
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
    ];
    for (path, body, expected) in cases {
        let (status, out) = call_raw(&agent, Method::POST, path, None, body.clone()).await;
        assert_eq!(
            status,
            expected,
            "{path} {} -> {out}",
            String::from_utf8_lossy(&body[..body.len().min(80)])
        );
        if path == "/v1/transactions" && out.get("results").is_some() {
            assert!(out["results"][0]["error"].is_string(), "{out}");
        } else if expected != StatusCode::PAYLOAD_TOO_LARGE {
            assert!(out["error"].is_string(), "{path}: {out}");
        }
    }
    assert_eq!(row_count(&agent).await, 1);
    let (status, _) = call(
        &agent,
        "/v1/transactions",
        json!(["INSERT INTO hosts (id) VALUES (3)"]),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // Every read connection sees the new row: none was left pinned to an old snapshot.
    for _ in 0..8 {
        assert_eq!(row_count(&agent).await, 2);
    }
    let (status, _) = call_raw(&agent, Method::GET, "/v1/nope", None, vec![]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    agent.shutdown().await;
}

#[tokio::test]
async fn bearer_token_is_required_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir);
    cfg.api.authz.bearer_token = Some("s3cret".into());
    let agent = Agent::start(&cfg).await.unwrap();
    let body = br#"["INSERT INTO hosts (id) VALUES (1)"]"#.to_vec();
    for token in [None, Some("wrong")] {
        let (status, _) = call_raw(
            &agent,
            Method::POST,
            "/v1/transactions",
            token,
            body.clone(),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let (status, _) = call_raw(
        &agent,
        Method::POST,
        "/v1/transactions",
        Some("s3cret"),
        body,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // Health answers without the token: load balancers and orchestrator probes have none.
    let (status, _) = call_raw(&agent, Method::GET, "/v1/health", None, Vec::new()).await;
    assert_eq!(status, StatusCode::OK);
    agent.shutdown().await;
}

#[tokio::test]
async fn requests_past_the_in_flight_limit_get_503_and_streams_do_not_hold_slots() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir);
    cfg.api.concurrency_limit = 1;
    cfg.api.streams_max = 1;
    let agent = Agent::start(&cfg).await.unwrap();
    // An open stream takes the only stream slot, not the request slot.
    let (status, stream) = request_stream(
        &Target::Tcp(agent.api_addr()),
        Method::POST,
        "/v1/updates/hosts",
        None,
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::OK);
    let (status, out) = call(
        &agent,
        "/v1/transactions",
        json!(["INSERT INTO hosts (id) VALUES (1)"]),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    let (status, out) = call_raw(&agent, Method::POST, "/v1/updates/hosts", None, vec![]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{out}");
    assert!(out["error"].as_str().unwrap().contains("streams"), "{out}");

    // A query that runs until its deadline holds the only request slot meanwhile: other
    // requests get 503 at once, health still answers, and the slot comes back after it.
    let api = agent.api_addr();
    let runaway = tokio::spawn(async move {
        request(
            &Target::Tcp(api),
            Method::POST,
            "/v1/queries?timeout=1.5",
            None,
            serde_json::to_vec(&json!(RUNAWAY)).unwrap(),
        )
        .await
        .unwrap()
    });
    // Well inside its 1.5 s: the runaway is running and holds the slot.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, out) = call(&agent, "/v1/queries", json!("SELECT 1")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{out}");
    let (status, _) = call_raw(&agent, Method::GET, "/v1/health", None, vec![]).await;
    assert_eq!(status, StatusCode::OK, "health is exempt from the limit");
    let (status, body) = runaway.await.unwrap();
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT);
    assert!(String::from_utf8_lossy(&body).contains("deadline"));
    let (status, _) = call(&agent, "/v1/queries", json!("SELECT 1")).await;
    assert_eq!(status, StatusCode::OK);

    // Closing the stream frees its slot (the server notices the closed connection).
    drop(stream);
    let mut freed = false;
    for _ in 0..500 {
        let (status, _again) = request_stream(
            &Target::Tcp(agent.api_addr()),
            Method::POST,
            "/v1/updates/hosts",
            None,
            vec![],
        )
        .await
        .unwrap();
        if status == StatusCode::OK {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(freed, "the stream slot was never released");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_transaction_is_stopped_at_its_deadline_and_writes_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&config(&dir)).await.unwrap();
    let api = agent.api_addr();
    let runaway = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let answer = request(
            &Target::Tcp(api),
            Method::POST,
            "/v1/transactions?timeout=3",
            None,
            serde_json::to_vec(&json!([RUNAWAY])).unwrap(),
        )
        .await
        .unwrap();
        (answer, started.elapsed())
    });
    // While it holds the writer, health says so within about a second instead of hanging.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, out) = tokio::time::timeout(
        Duration::from_secs(5),
        call_raw(&agent, Method::GET, "/v1/health", None, vec![]),
    )
    .await
    .expect("health answers while the store is busy");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{out}");
    let ((status, body), took) = tokio::time::timeout(Duration::from_secs(10), runaway)
        .await
        .expect("the runaway transaction was never stopped")
        .unwrap();
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT);
    assert!(String::from_utf8_lossy(&body).contains("deadline"));
    assert!(took < Duration::from_secs(6), "stopped after {took:?}");
    // The writer is free: writes go on, at once.
    let (status, out) = call(
        &agent,
        "/v1/transactions?timeout=1",
        json!(["INSERT INTO hosts (id) VALUES (1)"]),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    let (status, _) = call_raw(&agent, Method::GET, "/v1/health", None, vec![]).await;
    assert_eq!(status, StatusCode::OK);
    agent.shutdown().await;
}

/// `?timeout=` shortens a request's deadline but cannot lengthen it past
/// `api.statement_timeout_ms`: a client asking for ten minutes is stopped at the node's limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cannot_lengthen_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir);
    cfg.api.statement_timeout_ms = 500;
    let agent = Agent::start(&cfg).await.unwrap();
    for path in ["/v1/queries?timeout=600", "/v1/transactions?timeout=600"] {
        let body = if path.starts_with("/v1/queries") {
            json!(RUNAWAY)
        } else {
            json!([RUNAWAY])
        };
        let (status, out) = tokio::time::timeout(Duration::from_secs(10), call(&agent, path, body))
            .await
            .expect("the node's own deadline did not stop it");
        assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{path}: {out}");
    }
    agent.shutdown().await;
}

/// The digest reads every row and clock on the store's thread: it has a statement's deadline,
/// so an operator's request on a large database cannot hold the writer past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_stops_at_its_deadline_and_writes_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&config(&dir)).await.unwrap();
    let (status, out) = call(
        &agent,
        "/v1/transactions",
        json!([
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c LIMIT 100000) \
                INSERT INTO hosts (id, name) SELECT x, 'host-' || x FROM c"
        ]),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    let (status, out) = call_raw(
        &agent,
        Method::GET,
        "/v1/sync/digest?timeout=0.01",
        None,
        vec![],
    )
    .await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{out}");
    let (status, out) = call(
        &agent,
        "/v1/transactions",
        json!(["INSERT INTO hosts (id) VALUES (0)"]),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    let (status, out) = call_raw(&agent, Method::GET, "/v1/sync/digest", None, vec![]).await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(out["tables"]["hosts"]["rows"], json!(100_001));
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_queries_give_their_connections_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir);
    cfg.api.query_connections = 2;
    cfg.api.statement_timeout_ms = 600_000;
    let agent = Agent::start(&cfg).await.unwrap();
    // More runaway queries than connections, with a deadline far away; their clients leave.
    let mut clients = Vec::new();
    for _ in 0..3 {
        let api = agent.api_addr();
        clients.push(tokio::spawn(async move {
            request(
                &Target::Tcp(api),
                Method::POST,
                "/v1/queries?timeout=600",
                None,
                serde_json::to_vec(&json!(RUNAWAY)).unwrap(),
            )
            .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for client in &clients {
        client.abort();
    }
    // Their statements stop when the clients are gone: a new query gets a connection.
    let (status, out) = tokio::time::timeout(
        Duration::from_secs(10),
        call(
            &agent,
            "/v1/queries?timeout=3",
            json!("SELECT count(*) FROM hosts"),
        ),
    )
    .await
    .expect("the query answered");
    assert_eq!(status, StatusCode::OK, "{out}");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_sent_connections_are_closed_and_connections_are_capped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir);
    cfg.api.idle_timeout_ms = 300;
    cfg.api.connections_max = 2;
    let agent = Agent::start(&cfg).await.unwrap();
    let api = agent.api_addr();
    // Reads until the server closes the connection; the time it took.
    async fn closed_after(mut stream: tokio::net::TcpStream) -> Duration {
        let started = std::time::Instant::now();
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
                Ok(Ok(_)) => continue,
                Err(_) => panic!("the connection stayed open 10 s"),
            }
        }
    }
    let idle = tokio::net::TcpStream::connect(api).await.unwrap();
    let mut half = tokio::net::TcpStream::connect(api).await.unwrap();
    half.write_all(b"POST /v1/queries HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Two are open: a third is closed at once, without waiting for the idle timeout.
    let third = tokio::net::TcpStream::connect(api).await.unwrap();
    assert!(closed_after(third).await < Duration::from_millis(250));
    assert!(closed_after(idle).await < Duration::from_secs(5));
    assert!(closed_after(half).await < Duration::from_secs(5));
    // Slots come back: the API answers.
    let (status, _) = call_raw(&agent, Method::GET, "/v1/health", None, vec![]).await;
    assert_eq!(status, StatusCode::OK);
    agent.shutdown().await;
}

/// A request head sent slowly is cut at the header timeout, much shorter than the idle
/// timeout that keeps a quiet kept-alive connection (HTTP/1.1 and HTTP/2) open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_head_is_cut_long_before_an_idle_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir);
    cfg.api.idle_timeout_ms = 60_000;
    cfg.api.header_timeout_ms = 300;
    let agent = Agent::start(&cfg).await.unwrap();
    let api = agent.api_addr();
    // A kept-alive HTTP/1.1 connection after one answered request.
    let mut kept = tokio::net::TcpStream::connect(api).await.unwrap();
    kept.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = kept.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // An HTTP/2 connection that sent its preface and settings, then nothing.
    let mut h2 = tokio::net::TcpStream::connect(api).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    // A head that never ends, a byte now and then.
    let mut slow = tokio::net::TcpStream::connect(api).await.unwrap();
    let started = std::time::Instant::now();
    let mut cut = None;
    for byte in b"POST /v1/queries HTTP/1.1\r\nHost: x\r\nX-Slow: "
        .iter()
        .cycle()
        .take(200)
    {
        if slow.write_all(&[*byte]).await.is_err() {
            cut = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        match tokio::time::timeout(Duration::from_millis(1), slow.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                cut = Some(started.elapsed());
                break;
            }
            _ => {}
        }
    }
    let cut = cut.expect("a head sent for 10 s was never cut");
    assert!(cut < Duration::from_secs(5), "cut after {cut:?}");
    // The quiet ones are still open: reading finds no end of stream.
    let still_open = |stream: &mut tokio::net::TcpStream| {
        let mut probe = [0u8; 256];
        matches!(stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    };
    // HTTP/2: the server's settings frames first.
    let _ = tokio::time::timeout(Duration::from_millis(200), h2.read(&mut buf)).await;
    assert!(
        still_open(&mut kept),
        "the kept-alive connection was closed"
    );
    assert!(still_open(&mut h2), "the HTTP/2 connection was closed");
    kept.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let n = kept.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    drop((kept, h2));
    agent.shutdown().await;
}

/// A request whose head announces a body that never comes holds its in-flight slot only
/// until the header timeout: the client gets 408 and the slot serves the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_that_never_arrives_gets_408_and_frees_its_slot() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir);
    cfg.api.concurrency_limit = 1;
    cfg.api.idle_timeout_ms = 60_000;
    cfg.api.header_timeout_ms = 500;
    let agent = Agent::start(&cfg).await.unwrap();
    let mut stalled = tokio::net::TcpStream::connect(agent.api_addr())
        .await
        .unwrap();
    stalled
        .write_all(
            b"POST /v1/transactions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n[\"INSERT",
        )
        .await
        .unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stalled.read(&mut answer))
        .await
        .expect("no answer 10 s after the body stopped")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("header_timeout_ms"), "{answer}");
    let (status, out) = call(
        &agent,
        "/v1/transactions",
        json!(["INSERT INTO hosts (id) VALUES (1)"]),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(row_count(&agent).await, 1);
    // A large body arriving steadily but slower than the header timeout (256 KiB over about
    // 2 s, at 128 KiB/s) gets in: every 64 KiB received buys a second.
    let body = serde_json::to_vec(&json!([format!(
        "INSERT INTO hosts (id, name) VALUES (2, '{}')",
        "x".repeat(256 * 1024)
    )]))
    .unwrap();
    let mut steady = tokio::net::TcpStream::connect(agent.api_addr())
        .await
        .unwrap();
    let head = format!(
        "POST /v1/transactions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    steady.write_all(head.as_bytes()).await.unwrap();
    for chunk in body.chunks(16 * 1024) {
        steady.write_all(chunk).await.unwrap();
        tokio::time::sleep(Duration::from_millis(125)).await;
    }
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), steady.read(&mut answer))
        .await
        .expect("no answer to the whole body")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(row_count(&agent).await, 2);
    agent.shutdown().await;
}

/// A statement may not make a value larger than a transaction may write (and never less than
/// the 4 MiB a peer may have written): SQLite would otherwise build any value up to 1 GB in
/// one step of its program, where no deadline stops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_cannot_make_a_value_larger_than_a_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir);
    cfg.db.transaction_bytes_max = 1 << 20;
    let agent = Agent::start(&cfg).await.unwrap();
    // Unrefused, an answer is megabytes: only its size goes in the message.
    let size = |out: &Json| out.to_string().len();
    let (status, out) = call(&agent, "/v1/queries", json!("SELECT zeroblob(5000000)")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{} bytes", size(&out));
    assert!(out["error"].as_str().unwrap().contains("too big"), "{out}");
    let (status, out) = call(
        &agent,
        "/v1/transactions",
        json!(["INSERT INTO hosts (id, name) VALUES (1, printf('%.*c', 5000000, 'x'))"]),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{out}");
    assert!(
        out["results"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("too big")),
        "{out}"
    );
    // Up to 4 MiB whatever the transaction size: a peer may have written it.
    let (status, out) = call(
        &agent,
        "/v1/queries",
        json!("SELECT length(zeroblob(4000000))"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(out[1]["row"][1][0], json!(4000000));
    // Nor may a row of many values, each under the cap, hold more than it together: eight
    // 3 MB blobs would be 24 MB to copy and about 100 MB of JSON.
    let many = format!("SELECT {}", ["randomblob(3000000)"; 8].join(", "));
    let (status, out) = call(&agent, "/v1/queries", json!(many)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{} bytes", size(&out));
    assert!(
        out["error"]
            .as_str()
            .unwrap()
            .contains("a result row of 24000000 bytes is over the limit of 4194304"),
        "{out}"
    );
    let (status, out) = call(
        &agent,
        "/v1/queries",
        json!("SELECT randomblob(1000000), randomblob(1000000)"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{} bytes", size(&out));
    assert_eq!(row_count(&agent).await, 0);
    agent.shutdown().await;
}

#[tokio::test]
async fn health_thresholds_answer_503() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&config(&dir)).await.unwrap();
    let (status, _) = call_raw(
        &agent,
        Method::GET,
        "/v1/health?gaps=0&queue_size=10",
        None,
        vec![],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call_raw(&agent, Method::GET, "/v1/health?p99_lag=-1", None, vec![]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, _) = call_raw(
        &agent,
        Method::GET,
        "/v1/health?p99_lag=-1&failure_status=500",
        None,
        vec![],
    )
    .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    // A node alone (it counts itself): healthy only if one member is enough.
    let (status, body) = call_raw(&agent, Method::GET, "/v1/health?members=2", None, vec![]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body:?}");
    let (status, _) = call_raw(&agent, Method::GET, "/v1/health?members=1", None, vec![]).await;
    assert_eq!(status, StatusCode::OK);
    agent.shutdown().await;
}

/// Rows a table had before it became replicated get clocks in a backfill. When that cannot be
/// made (here, over the transaction cap), the node still starts, and its health names the
/// table whose rows no peer gets, until a start with room makes the backfill.
#[tokio::test]
async fn health_names_a_table_whose_older_rows_are_not_replicated() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir);
    let legacy = "CREATE TABLE legacy (id INTEGER PRIMARY KEY, v TEXT);";
    let db = rusqlite::Connection::open(&cfg.db.path).unwrap();
    db.execute_batch(legacy).unwrap();
    for id in 0..100 {
        db.execute(
            "INSERT INTO legacy VALUES (?1, ?2)",
            rusqlite::params![id, "x".repeat(1024)],
        )
        .unwrap();
    }
    drop(db);
    std::fs::write(dir.path().join("schema/legacy.sql"), legacy).unwrap();
    // 100 KiB of rows, over the smallest transaction cap.
    cfg.db.transaction_bytes_max = 64 * 1024;
    let agent = Agent::start(&cfg).await.unwrap();
    let (status, health) = call_raw(&agent, Method::GET, "/v1/health", None, vec![]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        health["response"]["unreplicated_tables"],
        json!(["legacy"]),
        "{health}"
    );
    agent.shutdown().await;

    cfg.db.transaction_bytes_max = 1 << 20;
    let agent = Agent::start(&cfg).await.unwrap();
    let (status, health) = call_raw(&agent, Method::GET, "/v1/health", None, vec![]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        health["response"].get("unreplicated_tables").is_none(),
        "{health}"
    );
    agent.shutdown().await;
}

#[tokio::test]
async fn reload_adds_tables_and_restart_keeps_rows() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir);
    let agent = Agent::start(&cfg).await.unwrap();
    let site = agent.site_id();
    call(
        &agent,
        "/v1/transactions",
        json!(["INSERT INTO hosts (id, name) VALUES (1, 'a')"]),
    )
    .await;
    std::fs::write(
        dir.path().join("schema/zones.sql"),
        "CREATE TABLE zones (name TEXT NOT NULL PRIMARY KEY, region TEXT);",
    )
    .unwrap();
    let (status, error) = reload(&agent).await;
    assert_eq!(status, StatusCode::OK, "{error}");
    let (status, out) = call(
        &agent,
        "/v1/transactions",
        json!(["INSERT INTO zones VALUES ('ams', 'eu')"]),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    // A bad schema file is refused by reload and changes nothing.
    std::fs::write(
        dir.path().join("schema/zz_bad.sql"),
        "CREATE TABLE bad (x TEXT);",
    )
    .unwrap();
    let (status, error) = reload(&agent).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error.contains("bad"), "{error}");
    std::fs::remove_file(dir.path().join("schema/zz_bad.sql")).unwrap();
    agent.shutdown().await;

    let agent = Agent::start(&cfg).await.unwrap();
    assert_eq!(agent.site_id(), site);
    assert_eq!(row_count(&agent).await, 1);
    let (status, out) = call(
        &agent,
        "/v1/transactions",
        json!(["INSERT INTO zones VALUES ('fra', 'eu')"]),
    )
    .await;
    assert_eq!((status, out["version"].clone()), (StatusCode::OK, json!(3)));
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_health_checks_does_not_crowd_writes_out_of_the_store_queue() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir);
    cfg.api.store_queue_len = 16;
    cfg.api.authz.bearer_token = Some("s3cret".into());
    let agent = Agent::start(&cfg).await.unwrap();
    let api = agent.api_addr();
    // The store is busy for a second...
    let runaway = tokio::spawn(async move {
        request(
            &Target::Tcp(api),
            Method::POST,
            "/v1/transactions?timeout=1",
            Some("s3cret"),
            serde_json::to_vec(&json!([RUNAWAY])).unwrap(),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ...while anyone, without a token, sends many health checks at once.
    let mut checks = Vec::new();
    for _ in 0..64 {
        checks.push(tokio::spawn(async move {
            request(&Target::Tcp(api), Method::GET, "/v1/health", None, vec![]).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A write still finds room in the queue and runs once the store is free.
    let (status, out) = request(
        &Target::Tcp(api),
        Method::POST,
        "/v1/transactions?timeout=10",
        Some("s3cret"),
        serde_json::to_vec(&json!(["INSERT INTO hosts (id) VALUES (1)"])).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&out));
    let _ = runaway.await;
    for check in checks {
        let _ = check.await;
    }
    agent.shutdown().await;
}

/// A store that cannot open (a schema file that is not SQL) fails the agent's start with the
/// store's reason, and leaves the folder to an agent with a good schema.
#[tokio::test]
async fn an_agent_whose_store_cannot_open_fails_to_start_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dir);
    std::fs::write(dir.path().join("schema/hosts.sql"), "CREATE TABLE hosts (").unwrap();
    let error = match Agent::start(&config).await {
        Ok(_) => panic!("an agent started with a schema that is not SQL"),
        Err(e) => e.to_string(),
    };
    assert!(
        error.contains("hosts.sql") && error.contains("incomplete input"),
        "{error}"
    );
    std::fs::write(dir.path().join("schema/hosts.sql"), SCHEMA).unwrap();
    let agent = Agent::start(&config).await.unwrap();
    assert_eq!(row_count(&agent).await, 0);
    agent.shutdown().await;
}
