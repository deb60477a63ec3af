//! Corrosion's own client (`corro-client` 0.2.0-alpha.0, HTTP/2 with prior knowledge over one
//! kept-alive connection) driving a cluster of real `patina agent` processes: what an
//! application written against Corrosion does, unchanged.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use corro_api_types::sqlite::ChangeType;
use corro_api_types::{
    ChangeId, ExecResult, HealthResponse, RowId, SqliteParam, SqliteValue, Statement,
    TypedNotifyEvent, TypedQueryEvent,
};
use corro_client::sub::SubscriptionStream;
use corro_client::{CorrosionApiClient, Error};
use futures::StreamExt;

const SCHEMA: &str =
    "CREATE TABLE kv (k TEXT NOT NULL PRIMARY KEY, v TEXT, n INTEGER NOT NULL DEFAULT 0);";
const WAIT: Duration = Duration::from_secs(30);

/// The agent binary: `PATINA_BIN`, else the workspace's debug build, built once here.
fn patina_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("PATINA_BIN") {
            return PathBuf::from(bin);
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "-p", "patina", "--bin", "patina"])
            .current_dir(&root)
            .env_remove("CARGO_TARGET_DIR")
            .status()
            .expect("running cargo to build the agent");
        assert!(status.success(), "building the agent failed");
        root.join("target/debug/patina")
    })
    .clone()
}

/// One `patina agent` process, killed when dropped.
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

fn start(bin: &Path, dir: &Path, bootstrap: Option<SocketAddr>) -> Node {
    std::fs::create_dir_all(dir.join("schema")).unwrap();
    std::fs::write(dir.join("schema/kv.sql"), SCHEMA).unwrap();
    let bootstrap = bootstrap.map(|a| format!("\"{a}\"")).unwrap_or_default();
    std::fs::write(
        dir.join("config.toml"),
        format!(
            "[db]\npath = \"{0}/state.db\"\nschema_paths = [\"{0}/schema\"]\n[api]\naddr = \"127.0.0.1:0\"\n\
             [admin]\npath = \"{0}/admin.sock\"\n[gossip]\naddr = \"127.0.0.1:0\"\nbootstrap = [{bootstrap}]\n\
             sync_interval_ms = 200\n",
            dir.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(bin)
        .args(["agent", "-c"])
        .arg(dir.join("config.toml"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // "patina agent: API on http://A, gossip on G, site S"
    let mut line = String::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    while !line.starts_with("patina agent:") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "the agent exited");
    }
    let after = |tag: &str| -> SocketAddr {
        line.split(tag)
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    Node {
        api: after("http://"),
        gossip: after("gossip on "),
        child,
    }
}

/// A cluster of `n` agents that all see each other.
async fn cluster(dir: &Path, n: usize) -> Vec<Node> {
    let bin = patina_bin();
    let mut nodes: Vec<Node> = Vec::new();
    for i in 0..n {
        let bootstrap = nodes.first().map(|a| a.gossip);
        nodes.push(start(&bin, &dir.join(format!("n{i}")), bootstrap));
    }
    let http = h2_client();
    for node in &nodes {
        wait_for("every member", || async {
            health(&http, node.api).await.is_some_and(
                |h| matches!(h, HealthResponse::Response { members, .. } if members == n as i64),
            )
        })
        .await;
    }
    nodes
}

fn h2_client() -> reqwest::Client {
    reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap()
}

async fn health(http: &reqwest::Client, api: SocketAddr) -> Option<HealthResponse> {
    let response = http
        .get(format!("http://{api}/v1/health"))
        .send()
        .await
        .ok()?;
    response.json().await.ok()
}

async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn next<T, S>(stream: &mut S) -> T
where
    S: futures::Stream<Item = T> + Unpin,
{
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("an event within the wait")
        .expect("the stream goes on")
}

async fn kv(client: &CorrosionApiClient, sql: &str) -> Vec<(String, Option<String>)> {
    let mut rows = Vec::new();
    let mut stream = client
        .query_typed::<(String, Option<String>)>(&Statement::Simple(sql.into()), None)
        .await
        .unwrap();
    while let Some(event) = stream.next().await {
        match event.unwrap() {
            TypedQueryEvent::Row(_, row) => rows.push(row),
            TypedQueryEvent::EndOfQuery { .. } => break,
            TypedQueryEvent::Columns(_) => {}
            other => panic!("unexpected event {other:?}"),
        }
    }
    rows
}

fn text(s: &str) -> SqliteParam {
    SqliteParam::Text(s.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_queries_and_errors_through_corro_client() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), 2).await;
    let a = CorrosionApiClient::new(nodes[0].api).unwrap();
    let b = CorrosionApiClient::new(nodes[1].api).unwrap();

    // Every statement form, in one transaction, with a deadline.
    let out = a
        .execute(
            &[
                Statement::Simple("INSERT INTO kv (k, v) VALUES ('a', '1')".into()),
                Statement::WithParams(
                    "INSERT INTO kv (k, v) VALUES (?, ?)".into(),
                    vec![text("b"), text("2")],
                ),
                Statement::WithNamedParams(
                    "INSERT INTO kv (k, v) VALUES (:k, :v)".into(),
                    [
                        (":k".to_string(), text("c")),
                        ("v".to_string(), SqliteParam::Null),
                    ]
                    .into_iter()
                    .collect(),
                ),
                Statement::Verbose {
                    query: "UPDATE kv SET n = ? WHERE k = ?".into(),
                    params: Some(vec![SqliteParam::Integer(7), text("a")]),
                    named_params: None,
                },
            ],
            Some(5),
        )
        .await
        .unwrap();
    assert_eq!(out.results.len(), 4);
    for result in &out.results {
        assert!(
            matches!(
                result,
                ExecResult::Execute {
                    rows_affected: 1,
                    ..
                }
            ),
            "{result:?}"
        );
    }
    assert_eq!(out.version, Some(1));
    assert!(out.actor_id.is_some());

    // Typed rows, with and without parameters, and untyped values.
    assert_eq!(
        kv(&a, "SELECT k, v FROM kv ORDER BY k").await,
        vec![
            ("a".to_string(), Some("1".to_string())),
            ("b".to_string(), Some("2".to_string())),
            ("c".to_string(), None),
        ]
    );
    let mut stream = a
        .query(
            &Statement::WithParams("SELECT k, n FROM kv WHERE k = ?".into(), vec![text("a")]),
            Some(5),
        )
        .await
        .unwrap();
    assert_eq!(
        next(&mut stream).await.unwrap(),
        TypedQueryEvent::Columns(vec!["k".into(), "n".into()])
    );
    assert_eq!(
        next(&mut stream).await.unwrap(),
        TypedQueryEvent::Row(
            RowId(1),
            vec![SqliteValue::Text("a".into()), SqliteValue::Integer(7)]
        )
    );
    assert!(matches!(
        next(&mut stream).await.unwrap(),
        TypedQueryEvent::EndOfQuery { .. }
    ));

    // The other node has the rows.
    wait_for("replication to b", || async {
        kv(&b, "SELECT k, v FROM kv ORDER BY k").await.len() == 3
    })
    .await;

    // The error shapes the client parses.
    match a
        .execute(
            &[Statement::Simple("INSERT INTO nope VALUES (1)".into())],
            None,
        )
        .await
    {
        Err(Error::ResponseError(message)) => assert!(message.contains("nope"), "{message}"),
        other => panic!("a bad statement: {other:?}"),
    }
    match a
        .execute(
            &[Statement::Simple(
                "INSERT INTO kv (k, v) VALUES ('a', 'dup')".into(),
            )],
            None,
        )
        .await
    {
        Err(Error::ResponseError(message)) => assert!(message.contains("UNIQUE"), "{message}"),
        other => panic!("a constraint violation: {other:?}"),
    }
    match a.query(&Statement::Simple("SELEC 1".into()), None).await {
        Err(Error::ResponseError(message)) => assert!(message.contains("syntax"), "{message}"),
        Err(other) => panic!("bad SQL on /v1/queries: {other:?}"),
        Ok(_) => panic!("bad SQL on /v1/queries was accepted"),
    }
    match a
        .query(&Statement::Simple("DELETE FROM kv".into()), None)
        .await
    {
        Err(Error::ResponseError(_)) => {}
        Err(other) => panic!("a write on /v1/queries: {other:?}"),
        Ok(_) => panic!("a write on /v1/queries was accepted"),
    }
    assert_eq!(
        kv(&a, "SELECT k, v FROM kv").await.len(),
        3,
        "nothing was lost"
    );

    // Health over HTTP/2, in the client's own type.
    let http = h2_client();
    match health(&http, nodes[0].api).await {
        Some(HealthResponse::Response { members, gaps, .. }) => {
            assert_eq!(members, 2);
            assert_eq!(gaps, 0);
        }
        other => panic!("health: {other:?}"),
    }
}

async fn change(
    stream: &mut SubscriptionStream<(String, Option<String>)>,
) -> (ChangeType, RowId, (String, Option<String>), ChangeId) {
    match next(stream).await.unwrap() {
        TypedQueryEvent::Change(kind, row, values, id) => (kind, row, values, id),
        other => panic!("expected a change, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_and_updates_through_corro_client() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), 2).await;
    let a = CorrosionApiClient::new(nodes[0].api).unwrap();
    let b = CorrosionApiClient::new(nodes[1].api).unwrap();
    a.execute(
        &[Statement::Simple(
            "INSERT INTO kv (k, v) VALUES ('x', '0')".into(),
        )],
        None,
    )
    .await
    .unwrap();

    let sql = Statement::Simple("SELECT k, v FROM kv".into());
    let mut sub = a
        .subscribe_typed::<(String, Option<String>)>(&sql, false, None)
        .await
        .unwrap();
    let id = sub.id();
    assert!(sub.hash().is_some(), "the corro-query-hash header");
    assert_eq!(
        next(&mut sub).await.unwrap(),
        TypedQueryEvent::Columns(vec!["k".into(), "v".into()])
    );
    assert_eq!(
        next(&mut sub).await.unwrap(),
        TypedQueryEvent::Row(RowId(1), ("x".into(), Some("0".into())))
    );
    let start = match next(&mut sub).await.unwrap() {
        TypedQueryEvent::EndOfQuery {
            change_id: Some(id),
            ..
        } => id,
        other => panic!("expected eoq with a change id, got {other:?}"),
    };

    let mut updates = a.updates_typed::<Vec<SqliteValue>>("kv").await.unwrap();

    // Writes on the other node reach the subscription as contiguous changes.
    // Each write waits for the one before it to reach the subscription: two
    // changesets that arrive together are applied in one batch, and the
    // subscription then reports their combined effect (an insert of 'y' with
    // '2').
    let on_b = |sql: &str| {
        let statements = [Statement::Simple(sql.into())];
        let b = &b;
        async move { b.execute(&statements, None).await.unwrap() }
    };
    on_b("INSERT INTO kv (k, v) VALUES ('y', '1')").await;
    let (kind, row_y, values, c1) = change(&mut sub).await;
    assert_eq!(
        (kind, values),
        (ChangeType::Insert, ("y".into(), Some("1".into())))
    );
    assert_eq!(c1, ChangeId(start.0 + 1));
    on_b("UPDATE kv SET v = '2' WHERE k = 'y'").await;
    let (kind, row, values, c2) = change(&mut sub).await;
    assert_eq!(
        (kind, row, values),
        (ChangeType::Update, row_y, ("y".into(), Some("2".into())))
    );
    assert_eq!(c2, ChangeId(c1.0 + 1));
    on_b("DELETE FROM kv WHERE k = 'x'").await;
    let (kind, row, values, c3) = change(&mut sub).await;
    assert_eq!(
        (kind, row, values),
        (ChangeType::Delete, RowId(1), ("x".into(), Some("0".into())))
    );
    assert_eq!(c3, ChangeId(c2.0 + 1));

    // /v1/updates saw the same rows change, by primary key.
    let mut notified = Vec::new();
    while notified.len() < 3 {
        match next(&mut updates).await.unwrap() {
            TypedNotifyEvent::Notify(kind, pk) => notified.push((kind, pk)),
            TypedNotifyEvent::Error(e) => panic!("updates: {e}"),
        }
    }
    assert_eq!(
        notified,
        vec![
            (ChangeType::Update, vec![SqliteValue::Text("y".into())]),
            (ChangeType::Update, vec![SqliteValue::Text("y".into())]),
            (ChangeType::Delete, vec![SqliteValue::Text("x".into())]),
        ]
    );

    // Re-attach by id from a change id: the changes after it, then live ones.
    let mut again = a
        .subscription_typed::<(String, Option<String>)>(id, false, Some(c1))
        .await
        .unwrap();
    assert_eq!(change(&mut again).await.3, c2);
    assert_eq!(change(&mut again).await.3, c3);
    b.execute(
        &[Statement::Simple(
            "INSERT INTO kv (k, v) VALUES ('z', '3')".into(),
        )],
        None,
    )
    .await
    .unwrap();
    let (kind, _, values, c4) = change(&mut again).await;
    assert_eq!(
        (kind, values),
        (ChangeType::Insert, ("z".into(), Some("3".into())))
    );
    assert_eq!(c4, ChangeId(c3.0 + 1));
    assert_eq!(change(&mut sub).await.3, c4, "the first subscriber too");

    // The same SQL attaches to the same subscription.
    let same = a
        .subscribe_typed::<(String, Option<String>)>(&sql, true, None)
        .await
        .unwrap();
    assert_eq!(same.id(), id);
}
