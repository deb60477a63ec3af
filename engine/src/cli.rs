//! The `patina` command line.
//!
//! `patina agent` runs a node. `exec`, `query` talk to a running node's HTTP API, `reload` to
//! its admin socket. `patina db ...` works directly on a node's database file with no agent
//! running: a transaction, a query, the replication state, the changesets of a site.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use patina_core::ids::{DbVersion, SiteId};
use patina_core::value::Value;

use hyper::Method;

use crate::client::{self, Target};
use crate::config::Config;
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
        /// Config file (TOML).
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Run SQL statements as one transaction through a node's API.
    Exec {
        #[command(flatten)]
        api: ApiArgs,
        /// SQL statements, each one argument.
        #[arg(required = true)]
        sql: Vec<String>,
    },
    /// Run one read-only statement through a node's API; prints rows tab-separated.
    Query {
        #[command(flatten)]
        api: ApiArgs,
        /// The SQL.
        sql: String,
    },
    /// Subscribe to a query: prints its rows, then every change as it happens (NDJSON, one
    /// event per line), until interrupted.
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
    /// Make a running node re-read its schema files (additive changes only).
    Reload {
        /// The node's admin socket.
        #[arg(long, default_value = "patina-data/admin.sock")]
        admin: PathBuf,
    },
    /// Anti-entropy state of a running node.
    #[command(subcommand)]
    Sync(SyncCommand),
    /// Cluster membership, as a running node sees it.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Work directly on a node's database file (no agent needed).
    #[command(subcommand)]
    Db(DbCommand),
    /// Certificates for the gossip transport.
    #[command(subcommand)]
    Tls(TlsCommand),
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
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// List the live members (site id and gossip address).
    Members {
        /// The node's admin socket.
        #[arg(long, default_value = "patina-data/admin.sock")]
        admin: PathBuf,
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
    pair: &crate::tls::PemPair,
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

#[derive(Debug, Args)]
struct ApiArgs {
    /// The node's API address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    api: std::net::SocketAddr,
    /// Bearer token, if the node requires one.
    #[arg(long, env = "PATINA_TOKEN")]
    token: Option<String>,
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

fn open(args: &DbArgs) -> Result<Store, Box<dyn std::error::Error>> {
    if let Some(parent) = args.db.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    Ok(Store::open(&StoreConfig {
        path: args.db.clone(),
        schema_paths: args.schema.clone(),
        max_db_bytes: None,
        changeset_bytes_max: None,
        parts_bytes_max: None,
    })?)
}

fn runtime() -> Result<tokio::runtime::Runtime, std::io::Error> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// Prints an API response: pretty JSON on success, the error on stderr and failure otherwise.
fn api_call(
    target: Target,
    path: &str,
    token: Option<&str>,
    body: serde_json::Value,
) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let (status, bytes) = runtime()?.block_on(client::request(
        &target,
        Method::POST,
        path,
        token,
        serde_json::to_vec(&body)?,
    ))?;
    if !status.is_success() {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&bytes).trim()).into());
    }
    Ok(if path == "/v1/queries" {
        serde_json::Value::Array(
            bytes
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .map(serde_json::from_slice)
                .collect::<Result<_, _>>()?,
        )
    } else {
        serde_json::from_slice(&bytes)?
    })
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.command {
        Command::Agent { config } => {
            let config = match config {
                Some(path) => Config::load(&path)?,
                None => Config::default(),
            };
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .init();
            runtime()?.block_on(crate::agent::run(config))?;
        }
        Command::Exec { api, sql } => {
            let out = api_call(
                Target::Tcp(api.api),
                "/v1/transactions",
                api.token.as_deref(),
                serde_json::json!(sql),
            )?;
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Command::Query { api, sql } => {
            let lines = api_call(
                Target::Tcp(api.api),
                "/v1/queries",
                api.token.as_deref(),
                serde_json::json!(sql),
            )?;
            for line in lines.as_array().into_iter().flatten() {
                if let Some(columns) = line.get("columns").and_then(|c| c.as_array()) {
                    println!(
                        "{}",
                        columns
                            .iter()
                            .map(|c| c.as_str().unwrap_or_default().to_owned())
                            .collect::<Vec<_>>()
                            .join("\t")
                    );
                } else if let Some(row) = line
                    .get("row")
                    .and_then(|r| r.get(1))
                    .and_then(|r| r.as_array())
                {
                    println!(
                        "{}",
                        row.iter().map(render_json).collect::<Vec<_>>().join("\t")
                    );
                } else if let Some(e) = line.get("error") {
                    return Err(format!("query failed: {e}").into());
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
                    serde_json::to_vec(&serde_json::json!(sql))?,
                ),
                _ => return Err("give the SQL or --id, not both".into()),
            };
            runtime()?.block_on(async {
                let (status, headers, mut body) = client::request_stream_with_headers(
                    &Target::Tcp(api.api),
                    method,
                    &path,
                    api.token.as_deref(),
                    body,
                )
                .await?;
                if !status.is_success() {
                    let mut text = Vec::new();
                    while let Some(chunk) = body.recv().await {
                        text.extend_from_slice(&chunk);
                    }
                    return Err(
                        format!("{status}: {}", String::from_utf8_lossy(&text).trim()).into(),
                    );
                }
                if let Some(id) = headers.get("corro-query-id").and_then(|v| v.to_str().ok()) {
                    eprintln!("subscription {id}");
                }
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                while let Some(chunk) = body.recv().await {
                    out.write_all(&chunk)?;
                    out.flush()?;
                }
                Ok::<(), Box<dyn std::error::Error>>(())
            })?;
        }
        Command::Tls(TlsCommand::Ca(TlsGenerate::Generate { out })) => {
            write_pair(&out, "ca", &crate::tls::generate_ca()?)?;
        }
        Command::Tls(TlsCommand::Server {
            action: TlsServer::Generate { ip, ca_key, out },
        }) => {
            let ca_key = std::fs::read_to_string(&ca_key)?;
            write_pair(
                &out,
                "server",
                &crate::tls::generate_signed(&ca_key, &[ip], crate::tls::CertUse::Node)?,
            )?;
        }
        Command::Tls(TlsCommand::Client {
            action: TlsClient::Generate { ca_key, out },
        }) => {
            let ca_key = std::fs::read_to_string(&ca_key)?;
            write_pair(
                &out,
                "client",
                &crate::tls::generate_signed(&ca_key, &[], crate::tls::CertUse::Client)?,
            )?;
        }
        Command::Sync(command) => {
            let (api, path) = match command {
                SyncCommand::Digest { api } => (api, "/v1/sync/digest"),
                SyncCommand::Generate { api } => (api, "/v1/sync/state"),
            };
            let (status, body) = runtime()?.block_on(client::request(
                &Target::Tcp(api.api),
                Method::GET,
                path,
                api.token.as_deref(),
                Vec::new(),
            ))?;
            if !status.is_success() {
                return Err(format!("{status}: {}", String::from_utf8_lossy(&body)).into());
            }
            let out: serde_json::Value = serde_json::from_slice(&body)?;
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Command::Cluster(ClusterCommand::Members { admin }) => {
            let (status, body) = runtime()?.block_on(client::request(
                &Target::Unix(admin),
                Method::GET,
                "/members",
                None,
                Vec::new(),
            ))?;
            if !status.is_success() {
                return Err(format!("{status}: {}", String::from_utf8_lossy(&body)).into());
            }
            let out: serde_json::Value = serde_json::from_slice(&body)?;
            for member in out["members"].as_array().into_iter().flatten() {
                println!(
                    "{}\t{}",
                    member["site_id"].as_str().unwrap_or_default(),
                    member["addr"].as_str().unwrap_or_default()
                );
            }
        }
        Command::Reload { admin } => {
            api_call(
                Target::Unix(admin),
                "/reload",
                None,
                serde_json::Value::Null,
            )?;
            println!("schema reloaded");
        }
        Command::Db(DbCommand::Exec { args, sql }) => {
            let mut store = open(&args)?;
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
            let store = open(&args)?;
            let rows = store.query(&Statement::new(sql))?;
            println!("{}", rows.columns.join("\t"));
            for row in rows.rows {
                println!("{}", row.iter().map(render).collect::<Vec<_>>().join("\t"));
            }
        }
        Command::Db(DbCommand::State { args }) => {
            let store = open(&args)?;
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
            let store = open(&args)?;
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
                        render(&c.value),
                        c.col_version,
                        c.cl
                    );
                }
            }
        }
    }
    Ok(())
}

fn render_json(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "NULL".into(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn render(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::Integer(i) => i.to_string(),
        Value::Real(r) => r.to_string(),
        Value::Text(s) => s.clone(),
        Value::Blob(b) => format!(
            "x'{}'",
            b.iter().map(|x| format!("{x:02x}")).collect::<String>()
        ),
    }
}
