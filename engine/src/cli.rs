//! The `patina` command line.
//!
//! `patina agent` runs a node. `exec`, `query` talk to a running node's HTTP API, `reload` to
//! its admin socket. `patina db ...` works directly on a node's database file with no agent
//! running: a transaction, a query, the replication state, the changesets of a site.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use patina_core::ids::{DbVersion, SiteId};

use hyper::Method;

use crate::config::Config;
use crate::http::client::{self, Target};
use crate::http::types::{
    parse_ndjson, ApiStatement, DigestResponse, ErrorResponse, ExecResponse, ExecResult,
    MembersResponse, QueryEvent, SqlParam, SqlValue, SyncStateResponse,
};
use crate::store::{Statement, Store, StoreConfig};

/// Patina: SQLite replicated to every node, with no leader.
#[derive(Debug, Parser)]
#[command(name = "patina", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node (built-in defaults without a config file).
    Agent {
        /// Config file (TOML); any key can also be set by a `PATINA_<TABLE>__<KEY>`
        /// environment variable (e.g. `PATINA_API__ADDR`), which wins over the file.
        #[arg(short, long, env = "PATINA_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Run SQL statements as one transaction through a node's API.
    Exec {
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        statement: StatementArgs,
        /// SQL statements, each one argument (one only with --param).
        #[arg(required = true)]
        sql: Vec<String>,
    },
    /// Run one read-only statement through a node's API; prints rows tab-separated.
    Query {
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        statement: StatementArgs,
        /// The SQL.
        sql: String,
    },
    /// Subscribe to a query: prints its rows, then every change as it happens (NDJSON, one
    /// event per line), until interrupted; re-attaches from the last change after a cut-off
    /// or a restart of the node, and fails only when it cannot.
    Subscribe {
        #[command(flatten)]
        api: ApiArgs,
        /// The SELECT to follow (omit with --id).
        sql: Option<String>,
        /// Re-attach to an existing subscription by id instead.
        #[arg(long)]
        id: Option<String>,
        /// Resume after this change id (prints the changes since, then live ones).
        #[arg(long)]
        from: Option<u64>,
        /// Leave out the current rows.
        #[arg(long)]
        skip_rows: bool,
    },
    /// Ask a node whether it is healthy (`GET /v1/health`): prints the answer, exits 0 when the
    /// node answers 200 and non-zero otherwise (for container health checks).
    Health {
        #[command(flatten)]
        api: ApiArgs,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 5.0)]
        timeout: f64,
    },
    /// Write a consistent snapshot of a running node's database to FILE (a path on the node's
    /// host, which must not exist), without stopping its writes.
    Backup {
        #[command(flatten)]
        admin: AdminArgs,
        /// The backup file.
        file: PathBuf,
    },
    /// Install a backup as the database of a stopped node, under a new site id (so it never
    /// writes under the identity of the node the backup came from), unless --keep-site-id.
    Restore {
        /// The backup file.
        file: PathBuf,
        /// The node's config file, for its database path (and admin socket, to make sure it is
        /// stopped).
        #[arg(short, long, env = "PATINA_CONFIG")]
        config: Option<PathBuf>,
        /// The database file instead of the config's.
        #[arg(long)]
        db: Option<PathBuf>,
        /// Keep the backup's site id: only when the node it came from is gone for good, this
        /// one replaces it, and it wrote nothing after the backup that reached other nodes
        /// (those version numbers would be reused, and skipped by the peers that hold them).
        #[arg(long)]
        keep_site_id: bool,
        /// Replace an existing database.
        #[arg(long)]
        force: bool,
    },
    /// Make a running node re-read its schema files (additive changes only).
    Reload {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// The log filter of a running node.
    #[command(subcommand)]
    Log(LogCommand),
    /// Anti-entropy state of a running node.
    #[command(subcommand)]
    Sync(SyncCommand),
    /// Cluster membership, as a running node sees it.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// The subscriptions of a running node.
    #[command(subcommand)]
    Subs(SubsCommand),
    /// Work directly on a node's database file (no agent needed).
    #[command(subcommand)]
    Db(DbCommand),
    /// Certificates for the gossip transport.
    #[command(subcommand)]
    Tls(TlsCommand),
}

#[derive(Debug, Subcommand)]
enum LogCommand {
    /// Print the filter in force.
    Show {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Replace the filter (`RUST_LOG` syntax, e.g. `info,patina::net::gossip=debug`) until the node
    /// restarts or `log reset`.
    Set {
        #[command(flatten)]
        admin: AdminArgs,
        /// The filter.
        filter: String,
    },
    /// Put back the filter the node started with.
    Reset {
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Debug, Subcommand)]
enum SyncCommand {
    /// Print the convergence digest (equal on converged nodes).
    Digest {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Print this node's sync state: per site, the head heard of and the versions needed.
    Generate {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Pull what this node lacks from one member now (its site id or gossip address).
    Reconcile {
        #[command(flatten)]
        admin: AdminArgs,
        /// The member: site id (hex) or gossip address (IP:port).
        peer: String,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// List the live members (site id and gossip address).
    Members {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Every member SWIM knows, down ones included, with its state and incarnation.
    MembershipStates {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Announce this node again to its bootstrap entries (names resolved again) and the
    /// members it remembers, as after a long partition.
    Rejoin {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum SubsCommand {
    /// Every subscription of a running node.
    List {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// One subscription.
    Info {
        #[command(flatten)]
        admin: AdminArgs,
        /// Its id.
        id: String,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum TlsCommand {
    /// Certificate authority of a cluster.
    #[command(subcommand)]
    Ca(TlsGenerate),
    /// A node certificate for a gossip IP, signed by the CA.
    Server {
        #[command(subcommand)]
        action: TlsServer,
    },
    /// A client-only certificate, signed by the CA.
    Client {
        #[command(subcommand)]
        action: TlsClient,
    },
}

#[derive(Debug, Subcommand)]
enum TlsGenerate {
    /// Write ca.pem and ca.key.
    Generate {
        /// Output folder.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum TlsServer {
    /// Write server.pem and server.key for the node at `ip`.
    Generate {
        /// The node's gossip IP (or DNS name).
        ip: String,
        /// The CA key.
        #[arg(long, default_value = "ca.key")]
        ca_key: PathBuf,
        /// Output folder.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum TlsClient {
    /// Write client.pem and client.key.
    Generate {
        /// The CA key.
        #[arg(long, default_value = "ca.key")]
        ca_key: PathBuf,
        /// Output folder.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
}

/// Writes a PEM pair as `<out>/<name>.pem` and `<out>/<name>.key` (the key readable by its
/// owner only).
fn write_pair(
    out: &std::path::Path,
    name: &str,
    pair: &crate::net::tls::PemPair,
) -> Result<(), Box<dyn std::error::Error>> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join(format!("{name}.pem")), &pair.cert_pem)?;
    let mut key = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(out.join(format!("{name}.key")))?;
    std::io::Write::write_all(&mut key, pair.key_pem.as_bytes())?;
    println!("wrote {0}/{name}.pem and {0}/{name}.key", out.display());
    Ok(())
}

/// Where a node's API is and how to authenticate: given, or read from its config file.
#[derive(Debug, Args)]
struct ApiArgs {
    /// The node's API: host:port, [v6]:port or http://host:port; a host name is resolved
    /// [default: api.addr of --config, else 127.0.0.1:8080].
    #[arg(long)]
    api: Option<String>,
    /// Bearer token, if the node requires one [default: api.authz.bearer_token of --config].
    #[arg(long, env = "PATINA_TOKEN")]
    token: Option<String>,
    /// The node's config file, for its API address and token.
    #[arg(short, long, env = "PATINA_CONFIG")]
    config: Option<PathBuf>,
}

impl ApiArgs {
    /// The API target and the token to send.
    fn resolve(
        &self,
        rt: &tokio::runtime::Runtime,
    ) -> Result<(Target, Option<String>), Box<dyn std::error::Error>> {
        let config = self
            .config
            .as_deref()
            .map(|path| Config::load_with_env(Some(path), crate::config::environment()))
            .transpose()?;
        let token = self.token.clone().or_else(|| {
            config
                .as_ref()
                .and_then(|c| c.api.authz.bearer_token.clone())
        });
        let api = match (&self.api, &config) {
            (Some(api), _) => api.clone(),
            (None, Some(config)) => reachable(config.api.addr).to_string(),
            (None, None) => "127.0.0.1:8080".to_owned(),
        };
        Ok((rt.block_on(Target::resolve_api(&api))?, token))
    }
}

/// A listening address as a client on the same host reaches it: a wildcard becomes loopback.
fn reachable(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

/// Parameters and deadline of `exec` and `query`.
#[derive(Debug, Args)]
struct StatementArgs {
    /// A positional parameter, in order; JSON (42, 1.5, null, "text", [1,2] for a blob) or
    /// else plain text.
    #[arg(long = "param")]
    params: Vec<String>,
    /// Seconds the statements may run before the node stops them (at most, and by default,
    /// the node's `api.statement_timeout_ms`).
    #[arg(long)]
    timeout: Option<u64>,
}

impl StatementArgs {
    fn statement(&self, sql: String) -> ApiStatement {
        if self.params.is_empty() {
            return ApiStatement::Simple(sql);
        }
        let params = self
            .params
            .iter()
            .map(|p| serde_json::from_str(p).unwrap_or_else(|_| SqlParam::Text(p.clone())))
            .collect();
        ApiStatement::WithParams(sql, params)
    }

    fn path(&self, route: &str) -> String {
        match self.timeout {
            Some(t) => format!("{route}?timeout={t}"),
            None => route.to_owned(),
        }
    }
}

/// The admin socket: given, or read from the node's config file.
#[derive(Debug, Args)]
struct AdminArgs {
    /// The node's admin socket [default: admin.path of --config, else patina-data/admin.sock].
    #[arg(long)]
    admin: Option<PathBuf>,
    /// The node's config file, for its admin socket.
    #[arg(short, long, env = "PATINA_CONFIG")]
    config: Option<PathBuf>,
}

impl AdminArgs {
    fn target(&self) -> Result<Target, Box<dyn std::error::Error>> {
        Ok(Target::Unix(match (&self.admin, &self.config) {
            (Some(path), _) => path.clone(),
            (None, Some(config)) => {
                Config::load_with_env(Some(config), crate::config::environment())?
                    .admin
                    .path
            }
            (None, None) => crate::config::AdminConfig::default().path,
        }))
    }
}

#[derive(Debug, Args)]
struct DbArgs {
    /// The database file (created if missing).
    #[arg(long, default_value = "patina-data/state.db")]
    db: PathBuf,
    /// Schema files or folders of .sql files, applied (additively) on open.
    #[arg(long = "schema")]
    schema: Vec<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum DbCommand {
    /// Run statements as one transaction and print its version and rows affected.
    Exec {
        #[command(flatten)]
        args: DbArgs,
        /// SQL statements, each one argument, all in one transaction.
        #[arg(required = true)]
        sql: Vec<String>,
    },
    /// Run one read-only statement and print the rows, tab-separated.
    Query {
        #[command(flatten)]
        args: DbArgs,
        /// The SQL.
        sql: String,
    },
    /// Print this replica's site id, db_version, and per-site heads and needs.
    State {
        #[command(flatten)]
        args: DbArgs,
    },
    /// Print the changesets of a site (default: this replica) in a version range.
    Changes {
        #[command(flatten)]
        args: DbArgs,
        /// Site id, 32 hex digits.
        #[arg(long)]
        site: Option<String>,
        /// First version.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// Last version (default: the site's head).
        #[arg(long)]
        to: Option<u64>,
        /// Most changesets to print.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Opens a database for a `patina db` command, refusing one an agent runs on: opening it as a
/// store would write to it behind the agent's back (schema, the changes-index rebuild).
fn open(args: &DbArgs) -> Result<(Store, std::fs::File), Box<dyn std::error::Error>> {
    if let Some(parent) = args.db.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let lock = crate::store::backup::lock_database(&args.db)?;
    let store = Store::open(&StoreConfig {
        path: args.db.clone(),
        schema_paths: args.schema.clone(),
        max_db_bytes: None,
        changeset_bytes_max: None,
        parts_bytes_max: None,
    })?;
    Ok((store, lock))
}

fn runtime() -> Result<tokio::runtime::Runtime, std::io::Error> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// Sends one request; the body on success, else an error naming the status and the
/// node's message.
fn api_call(
    rt: &tokio::runtime::Runtime,
    target: &Target,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> Result<bytes::Bytes, Box<dyn std::error::Error>> {
    let (status, bytes) = rt.block_on(client::request(target, method, path, token, body))?;
    if status.is_success() {
        return Ok(bytes);
    }
    let message = serde_json::from_slice::<ErrorResponse>(&bytes)
        .map(|e| e.error)
        .or_else(|_| {
            serde_json::from_slice::<ExecResponse>(&bytes).map(|r| {
                r.results
                    .into_iter()
                    .find_map(|r| match r {
                        ExecResult::Error { error } => Some(error),
                        ExecResult::Execute { .. } => None,
                    })
                    .unwrap_or_default()
            })
        })
        .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).trim().to_owned());
    Err(format!("{status}: {message}").into())
}

/// `GET path` on the admin socket.
fn admin_get(admin: &AdminArgs, path: &str) -> Result<bytes::Bytes, Box<dyn std::error::Error>> {
    api_call(
        &runtime()?,
        &admin.target()?,
        Method::GET,
        path,
        None,
        Vec::new(),
    )
}

/// How long `patina subscribe` keeps trying to re-attach before it gives up.
const RESUME_FOR: std::time::Duration = std::time::Duration::from_secs(60);

/// Prints a subscription's lines as they come. When the stream ends or is cut off (the node
/// restarted, the subscriber was too slow), re-attaches by id from the last change id seen,
/// with a growing pause, for up to [`RESUME_FOR`]; fails only when it cannot resume (the
/// subscription or its history is gone, or the node stays away).
async fn follow_subscription(
    target: &Target,
    token: Option<&str>,
    first: (Method, String, Vec<u8>),
    from: Option<u64>,
) -> Result<(), Box<dyn std::error::Error>> {
    use std::io::Write;
    let mut request = first;
    let mut id: Option<String> = None;
    let mut last = from;
    let mut failing_since: Option<std::time::Instant> = None;
    let mut pause = std::time::Duration::from_millis(100);
    loop {
        let (method, path, body) = request.clone();
        match client::request_stream_with_headers(target, method, &path, token, body).await {
            Ok((status, headers, mut stream)) if status.is_success() => {
                failing_since = None;
                pause = std::time::Duration::from_millis(100);
                if let Some(header) = headers.get("corro-query-id").and_then(|v| v.to_str().ok()) {
                    if id.is_none() {
                        eprintln!("subscription {header}");
                    }
                    id = Some(header.to_owned());
                }
                let mut pending = Vec::new();
                let mut gone = None;
                while let Some(chunk) = stream.recv().await {
                    pending.extend_from_slice(&chunk);
                    while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = pending.drain(..=end).collect();
                        match serde_json::from_slice::<QueryEvent>(&line) {
                            Ok(QueryEvent::EndOfQuery { change_id, .. }) => {
                                last = change_id.or(last);
                            }
                            Ok(QueryEvent::Change(_, _, _, change_id)) => last = Some(change_id),
                            // A slow subscriber is told where to resume; anything else ends it.
                            Ok(QueryEvent::Error(e)) if !e.contains("resume with from=") => {
                                gone = Some(e);
                            }
                            _ => {}
                        }
                        let mut out = std::io::stdout().lock();
                        out.write_all(&line)?;
                        out.flush()?;
                    }
                }
                if let Some(e) = gone {
                    return Err(format!("the subscription ended: {e}").into());
                }
            }
            Ok((status, _, mut stream)) => {
                let mut text = Vec::new();
                while let Some(chunk) = stream.recv().await {
                    text.extend_from_slice(&chunk);
                }
                let message = format!("{status}: {}", String::from_utf8_lossy(&text).trim());
                // A node that is up and refuses (unknown id, bad SQL) will not change its mind.
                if status.is_client_error() {
                    return Err(message.into());
                }
                eprintln!("{message}");
            }
            Err(e) => eprintln!("{e}"),
        }
        let Some(sub) = &id else {
            return Err("the subscription ended before the node named it".into());
        };
        let since = *failing_since.get_or_insert_with(std::time::Instant::now);
        if since.elapsed() > RESUME_FOR {
            return Err(format!("could not re-attach to {sub} for {RESUME_FOR:?}").into());
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_secs(5));
        // Cut before the rows were all printed: start over with the rows (a new columns line
        // says so); after them, go on from the last change printed.
        let path = match last {
            Some(from) => {
                eprintln!("re-attaching to {sub} from change {from}");
                format!("/v1/subscriptions/{sub}?from={from}")
            }
            None => {
                eprintln!("re-attaching to {sub}: the rows again");
                format!("/v1/subscriptions/{sub}")
            }
        };
        request = (Method::GET, path, Vec::new());
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.command {
        Command::Agent { config } => {
            let config = Config::load_with_env(config.as_deref(), crate::config::environment())?;
            crate::logging::init(&config.log)?;
            // Process-wide: set here, where one agent has the process to itself.
            crate::store::limit_sqlite_memory(config.db.sqlite_memory_max);
            runtime()?.block_on(crate::agent::run(config))?;
        }
        Command::Exec {
            api,
            statement,
            sql,
        } => {
            if !statement.params.is_empty() && sql.len() != 1 {
                return Err("--param needs exactly one statement".into());
            }
            let rt = runtime()?;
            let (target, token) = api.resolve(&rt)?;
            let statements: Vec<ApiStatement> =
                sql.into_iter().map(|s| statement.statement(s)).collect();
            let body = api_call(
                &rt,
                &target,
                Method::POST,
                &statement.path("/v1/transactions"),
                token.as_deref(),
                serde_json::to_vec(&statements)?,
            )?;
            let out: ExecResponse = serde_json::from_slice(&body)?;
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Command::Health { api, timeout } => {
            let rt = runtime()?;
            let (target, token) = api.resolve(&rt)?;
            let wait = std::time::Duration::from_secs_f64(timeout.clamp(0.001, 3600.0));
            let answer = rt.block_on(async {
                let request = client::request(
                    &target,
                    Method::GET,
                    "/v1/health",
                    token.as_deref(),
                    Vec::new(),
                );
                tokio::time::timeout(wait, request).await
            });
            let (status, body) = answer.map_err(|_| format!("no answer within {timeout} s"))??;
            println!("{}", String::from_utf8_lossy(&body).trim());
            if !status.is_success() {
                return Err(format!("not healthy: {status}").into());
            }
        }
        Command::Query {
            api,
            statement,
            sql,
        } => {
            let rt = runtime()?;
            let (target, token) = api.resolve(&rt)?;
            let body = api_call(
                &rt,
                &target,
                Method::POST,
                &statement.path("/v1/queries"),
                token.as_deref(),
                serde_json::to_vec(&statement.statement(sql))?,
            )?;
            for event in parse_ndjson::<QueryEvent>(&body)? {
                match event {
                    QueryEvent::Columns(names) => println!("{}", names.join("\t")),
                    QueryEvent::Row(_, values) => println!(
                        "{}",
                        values
                            .iter()
                            .map(SqlValue::render)
                            .collect::<Vec<_>>()
                            .join("\t")
                    ),
                    QueryEvent::Error(e) => return Err(format!("query failed: {e}").into()),
                    _ => {}
                }
            }
        }
        Command::Subscribe {
            api,
            sql,
            id,
            from,
            skip_rows,
        } => {
            let mut query = vec![format!("skip_rows={skip_rows}")];
            query.extend(from.map(|f| format!("from={f}")));
            let query = query.join("&");
            let (method, path, body) = match (id, sql) {
                (Some(id), None) => (
                    Method::GET,
                    format!("/v1/subscriptions/{id}?{query}"),
                    vec![],
                ),
                (None, Some(sql)) => (
                    Method::POST,
                    format!("/v1/subscriptions?{query}"),
                    serde_json::to_vec(&ApiStatement::Simple(sql))?,
                ),
                _ => return Err("give the SQL or --id, not both".into()),
            };
            let rt = runtime()?;
            let (target, token) = api.resolve(&rt)?;
            rt.block_on(follow_subscription(
                &target,
                token.as_deref(),
                (method, path, body),
                from,
            ))?;
        }
        Command::Tls(TlsCommand::Ca(TlsGenerate::Generate { out })) => {
            write_pair(&out, "ca", &crate::net::tls::generate_ca()?)?;
        }
        Command::Tls(TlsCommand::Server {
            action: TlsServer::Generate { ip, ca_key, out },
        }) => {
            let ca_key = std::fs::read_to_string(&ca_key)?;
            write_pair(
                &out,
                "server",
                &crate::net::tls::generate_signed(&ca_key, &[ip], crate::net::tls::CertUse::Node)?,
            )?;
        }
        Command::Tls(TlsCommand::Client {
            action: TlsClient::Generate { ca_key, out },
        }) => {
            let ca_key = std::fs::read_to_string(&ca_key)?;
            write_pair(
                &out,
                "client",
                &crate::net::tls::generate_signed(&ca_key, &[], crate::net::tls::CertUse::Client)?,
            )?;
        }
        Command::Sync(SyncCommand::Reconcile { admin, peer, json }) => {
            let body = api_call(
                &runtime()?,
                &admin.target()?,
                Method::POST,
                "/sync/reconcile",
                None,
                serde_json::to_vec(&crate::http::types::ReconcileRequest { peer })?,
            )?;
            let out: crate::http::types::ReconcileResponse = serde_json::from_slice(&body)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!(
                    "pulled {} changesets ({} bytes) from {} in {:.3} s",
                    out.changesets, out.bytes_received, out.peer, out.seconds
                );
            }
        }
        Command::Sync(command) => {
            let (api, path) = match &command {
                SyncCommand::Digest { api } => (api, "/v1/sync/digest"),
                SyncCommand::Generate { api } => (api, "/v1/sync/state"),
                SyncCommand::Reconcile { .. } => unreachable!("matched above"),
            };
            let rt = runtime()?;
            let (target, token) = api.resolve(&rt)?;
            let body = api_call(
                &rt,
                &target,
                Method::GET,
                path,
                token.as_deref(),
                Vec::new(),
            )?;
            let pretty = match command {
                SyncCommand::Digest { .. } => {
                    serde_json::to_string_pretty(&serde_json::from_slice::<DigestResponse>(&body)?)
                }
                SyncCommand::Generate { .. } => serde_json::to_string_pretty(
                    &serde_json::from_slice::<SyncStateResponse>(&body)?,
                ),
                SyncCommand::Reconcile { .. } => unreachable!("matched above"),
            }?;
            println!("{pretty}");
        }
        Command::Cluster(ClusterCommand::Members { admin, json }) => {
            let body = admin_get(&admin, "/members")?;
            let out: MembersResponse = serde_json::from_slice(&body)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                for member in out.members {
                    println!("{}\t{}", member.site_id, member.addr);
                }
            }
        }
        Command::Cluster(ClusterCommand::MembershipStates { admin, json }) => {
            let body = admin_get(&admin, "/membership-states")?;
            let out: crate::http::types::MembershipStatesResponse = serde_json::from_slice(&body)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                for m in out.members {
                    println!(
                        "{}\t{}\t{}\tincarnation {}",
                        m.site_id, m.addr, m.state, m.incarnation
                    );
                }
            }
        }
        Command::Cluster(ClusterCommand::Rejoin { admin, json }) => {
            let body = api_call(
                &runtime()?,
                &admin.target()?,
                Method::POST,
                "/rejoin",
                None,
                Vec::new(),
            )?;
            let out: crate::http::types::RejoinResponse = serde_json::from_slice(&body)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!("announced to {}", out.announced_to.join(", "));
            }
        }
        Command::Subs(SubsCommand::List { admin, json }) => {
            let body = admin_get(&admin, "/subs")?;
            let out: crate::http::types::SubscriptionsResponse = serde_json::from_slice(&body)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                for sub in out.subscriptions {
                    println!(
                        "{}\t{} rows\tchange {}\t{} subscribers\t{}",
                        sub.id, sub.rows, sub.last_change_id, sub.subscribers, sub.sql
                    );
                }
            }
        }
        Command::Subs(SubsCommand::Info { admin, id, json }) => {
            let body = admin_get(&admin, &format!("/subs/{id}"))?;
            let out: crate::http::types::SubscriptionInfo = serde_json::from_slice(&body)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!("id\t{}\nhash\t{}\nsql\t{}\ncolumns\t{}\nrows\t{}\nlast change id\t{}\nsubscribers\t{}\nidle\t{}",
                    out.id, out.hash, out.sql, out.columns.join(", "), out.rows, out.last_change_id, out.subscribers,
                    out.idle_s.map_or("no (someone listens)".to_string(), |s| format!("{s:.1} s")));
            }
        }
        Command::Backup { admin, file } => {
            // The node writes the file: a relative path means the caller's folder.
            let path = std::path::absolute(&file)?;
            let body = api_call(
                &runtime()?,
                &admin.target()?,
                Method::POST,
                "/backup",
                None,
                serde_json::to_vec(&crate::http::types::BackupRequest {
                    path: path.display().to_string(),
                })?,
            )?;
            let out: crate::http::types::BackupResponse = serde_json::from_slice(&body)?;
            println!(
                "backup of site {} written to {} ({} bytes, {:.3} s)",
                out.site_id, out.path, out.bytes, out.seconds
            );
        }
        Command::Restore {
            file,
            config,
            db,
            keep_site_id,
            force,
        } => {
            let node = Config::load_with_env(config.as_deref(), crate::config::environment())?;
            let db = db.unwrap_or(node.db.path.clone());
            // A node still running on this database would keep its open files: refuse.
            let admin = Target::Unix(node.admin.path.clone());
            let running = runtime()?.block_on(async {
                let probe = client::request(&admin, Method::GET, "/members", None, Vec::new());
                matches!(
                    tokio::time::timeout(std::time::Duration::from_secs(2), probe).await,
                    Ok(Ok(_))
                )
            });
            if running {
                return Err(format!(
                    "the node is running (its admin socket {} answers): stop it first",
                    node.admin.path.display()
                )
                .into());
            }
            if db.exists() && !force {
                return Err(format!(
                    "{} exists: pass --force to replace it with the backup",
                    db.display()
                )
                .into());
            }
            let out = crate::store::backup::restore(&file, &db, keep_site_id)?;
            if out.site == out.backup_site {
                println!(
                    "restored {} to {} under the backup's site id {}",
                    file.display(),
                    db.display(),
                    out.site
                );
            } else {
                println!(
                    "restored {} to {} under the new site id {} (the backup's {} is now a remote site)",
                    file.display(),
                    db.display(),
                    out.site,
                    out.backup_site
                );
            }
        }
        Command::Log(command) => {
            let (admin, path, body) = match command {
                LogCommand::Show { admin } => (admin, "/log", None),
                LogCommand::Set { admin, filter } => (
                    admin,
                    "/log/set",
                    Some(crate::http::types::LogFilter { filter }),
                ),
                LogCommand::Reset { admin } => (admin, "/log/reset", None),
            };
            let method = if path == "/log" {
                Method::GET
            } else {
                Method::POST
            };
            let body = match body {
                Some(b) => serde_json::to_vec(&b)?,
                None => Vec::new(),
            };
            let out = api_call(&runtime()?, &admin.target()?, method, path, None, body)?;
            let out: crate::http::types::LogFilter = serde_json::from_slice(&out)?;
            println!("log filter: {}", out.filter);
        }
        Command::Reload { admin } => {
            api_call(
                &runtime()?,
                &admin.target()?,
                Method::POST,
                "/reload",
                None,
                Vec::new(),
            )?;
            println!("schema reloaded");
        }
        Command::Db(DbCommand::Exec { args, sql }) => {
            let (mut store, _lock) = open(&args)?;
            let statements: Vec<Statement> = sql.into_iter().map(Statement::new).collect();
            let out = store.transact(&statements)?;
            match out.version {
                Some(v) => println!("version {v}"),
                None => println!("no change"),
            }
            for (i, n) in out.rows_affected.iter().enumerate() {
                println!("statement {i}: {n} rows affected");
            }
        }
        Command::Db(DbCommand::Query { args, sql }) => {
            let (store, _lock) = open(&args)?;
            let rows = store.query(&Statement::new(sql))?;
            println!("{}", rows.columns.join("\t"));
            for row in rows.rows {
                println!(
                    "{}",
                    row.iter()
                        .map(|v| SqlValue::from(v).render())
                        .collect::<Vec<_>>()
                        .join("\t")
                );
            }
        }
        Command::Db(DbCommand::State { args }) => {
            let (store, _lock) = open(&args)?;
            println!("site {}", store.site_id());
            println!("db_version {}", store.db_version());
            for (site, versions) in store.bookkeeping().iter() {
                let needs: Vec<String> = versions
                    .needs()
                    .iter()
                    .map(|(a, b)| format!("{a}..={b}"))
                    .collect();
                println!(
                    "{site} head {} applied_ranges {} needs [{}]",
                    versions.head,
                    versions.applied.range_count(),
                    needs.join(", ")
                );
            }
        }
        Command::Db(DbCommand::Changes {
            args,
            site,
            from,
            to,
            limit,
        }) => {
            let (store, _lock) = open(&args)?;
            let site = match site {
                Some(hex) => SiteId::from_hex(&hex)?,
                None => store.site_id(),
            };
            let head = store
                .bookkeeping()
                .site(&site)
                .map(|s| s.head)
                .unwrap_or_default();
            let to = DbVersion(to.unwrap_or(head.get()));
            for cs in store.changesets(site, DbVersion(from), to, limit)? {
                println!(
                    "changeset {} v{} ({} changes)",
                    cs.id.site,
                    cs.id.version,
                    cs.changes.len()
                );
                for c in &cs.changes {
                    println!(
                        "  #{} {} {:?} {} = {} (col_version {}, cl {})",
                        c.seq,
                        c.table,
                        c.pk,
                        c.column.name().unwrap_or("<row>"),
                        SqlValue::from(&c.value).render(),
                        c.col_version,
                        c.cl
                    );
                }
            }
        }
    }
    Ok(())
}
