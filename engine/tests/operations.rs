//! What an operator does to a running `patina agent` process: its log as JSON lines carrying
//! the node's site id, the log filter changed and put back through the admin socket, and a
//! peer without the cluster's certificate logged once, not once per attempt.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use patina_tests::procs::{write_config, AgentProcess, Ports};
use serde_json::Value as Json;

fn patina() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_patina"))
}

/// Starts an agent whose log level comes from its config (no RUST_LOG), `extra` appended to
/// its config file.
fn start(dir: &Path, extra: &str) -> AgentProcess {
    let config = write_config(dir, Ports::default(), &[], extra);
    let mut command = Command::new(patina());
    command.env_remove("RUST_LOG");
    AgentProcess::start_command(command, dir, &config)
}

fn admin(dir: &Path) -> PathBuf {
    dir.join("admin.sock")
}

/// `patina log <args> --admin <socket>`: (success, stdout + stderr).
fn log_command(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(patina())
        .arg("log")
        .args(args)
        .arg("--admin")
        .arg(admin(dir))
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn log_lines(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("agent.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn json_log_lines_carry_the_site_and_the_filter_changes_while_running() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("a");
    let agent = start(&dir, "\n[log]\nformat = \"json\"\nfilter = \"info\"\n");
    wait_until("a log line", || !log_lines(&dir).is_empty());
    let lines: Vec<Json> = log_lines(&dir)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect();
    assert!(
        lines.iter().any(|l| l["spans"][0]["name"] == "node"
            && l["spans"][0]["site"]
                .as_str()
                .is_some_and(|s| s.len() == 32)),
        "no line names the node's site: {lines:?}"
    );
    assert_eq!(
        log_command(&dir, &["show"]),
        (true, "log filter: info\n".into())
    );
    assert_eq!(
        log_command(&dir, &["set", "debug,patina::net::gossip=trace"]),
        (true, "log filter: debug,patina::net::gossip=trace\n".into())
    );
    // The new filter is in force: an API connection is logged at debug level.
    let health = Command::new(patina())
        .args(["health", "--api", &agent.api.to_string()])
        .output()
        .unwrap();
    assert!(health.status.success());
    wait_until("a debug line", || {
        log_lines(&dir)
            .iter()
            .any(|l| l.contains("\"level\":\"DEBUG\""))
    });
    let (ok, said) = log_command(&dir, &["set", "patina=notalevel"]);
    assert!(!ok && said.contains("400"), "{said}");
    assert_eq!(
        log_command(&dir, &["reset"]),
        (true, "log filter: info\n".into())
    );
}

#[test]
fn a_peer_without_the_cluster_certificate_is_logged_once_per_interval() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("a");
    std::fs::create_dir_all(&dir).unwrap();
    let ca = patina::net::tls::generate_ca().unwrap();
    let node = patina::net::tls::generate_signed(
        &ca.key_pem,
        &["127.0.0.1".to_string()],
        patina::net::tls::CertUse::Node,
    )
    .unwrap();
    for (name, text) in [
        ("ca.pem", &ca.cert_pem),
        ("node.pem", &node.cert_pem),
        ("node.key", &node.key_pem),
    ] {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let tls = format!(
        "[gossip.tls]\ncert_file = \"{0}/node.pem\"\nkey_file = \"{0}/node.key\"\nca_file = \"{0}/ca.pem\"\n",
        dir.display()
    );
    let agent = start(&dir, &tls);

    // A stranger: a certificate of another CA, trying again and again.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let failures = runtime.block_on(async {
        let other = patina::net::tls::generate_ca().unwrap();
        let pair = patina::net::tls::generate_signed(
            &other.key_pem,
            &["127.0.0.1".to_string()],
            patina::net::tls::CertUse::Node,
        )
        .unwrap();
        let stranger_tls =
            patina::net::tls::NodeTls::from_pem(&pair.cert_pem, &pair.key_pem, &other.cert_pem)
                .unwrap();
        let (tx, _rx) = tokio::sync::mpsc::channel(16);
        let stranger = patina::net::transport::Transport::bind(
            "127.0.0.1:0".parse().unwrap(),
            &patina::net::transport::TlsMode::Mutual(stranger_tls),
            patina::net::transport::TransportConfig::default(),
            tx,
        )
        .unwrap();
        let failures = || {
            stranger
                .stats()
                .handshake_failures
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        for _ in 0..4 {
            let before = failures();
            stranger.send(
                agent.gossip,
                patina::net::transport::Channel::Stream,
                bytes::Bytes::from_static(b"let me in"),
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while failures() == before && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let n = failures();
        stranger.close().await;
        n
    });
    assert_eq!(failures, 4, "the stranger did not try four times");
    wait_until("the refusal in the log", || {
        log_lines(&dir)
            .iter()
            .any(|l| l.contains("refused a TLS handshake"))
    });
    std::thread::sleep(Duration::from_millis(300));
    let refusals = log_lines(&dir)
        .iter()
        .filter(|l| l.contains("refused a TLS handshake"))
        .count();
    assert_eq!(refusals, 1, "{:?}", log_lines(&dir));
}

/// SQLite's memory in an agent process is capped (`db.sqlite_memory_max`): a query whose one
/// row holds two 20 MB values, each under the value cap and the row under the row cap, needs
/// more than the 32 MiB this agent allows, fails with "out of memory", and the node goes on
/// writing and reading. Without the cap the same query is answered, with the two values.
#[test]
fn a_query_past_the_sqlite_memory_cap_fails_and_the_node_goes_on() {
    use patina::http::client::{request, Method, StatusCode, Target};
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("a");
    let config = write_config(&dir, Ports::default(), &[], "");
    let mut command = Command::new(patina());
    command.env("PATINA_DB__SQLITE_MEMORY_MAX", (32u64 << 20).to_string());
    let agent = AgentProcess::start_command(command, &dir, &config);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let call = |path: &str, body: Json| {
        let body = serde_json::to_vec(&body).unwrap();
        runtime.block_on(async {
            let (status, out) = request(&Target::Tcp(agent.api), Method::POST, path, None, body)
                .await
                .unwrap();
            (
                status,
                String::from_utf8_lossy(&out[..out.len().min(300)]).into_owned(),
            )
        })
    };
    let (status, out) = call(
        "/v1/queries",
        serde_json::json!("SELECT randomblob(20000000), randomblob(20000000)"),
    );
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{out}");
    assert!(out.contains("out of memory"), "{out}");
    let (status, out) = call(
        "/v1/transactions",
        serde_json::json!(["INSERT INTO kv (k, v) VALUES ('a', 'b')"]),
    );
    assert_eq!(status, StatusCode::OK, "{out}");
    let (status, out) = call("/v1/queries", serde_json::json!("SELECT v FROM kv"));
    assert_eq!(status, StatusCode::OK, "{out}");
    assert!(out.contains("\"b\""), "{out}");
}
