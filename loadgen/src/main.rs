//! `loadgen`: measure how fast a write reaches every node.
//!
//! ```text
//! cargo run --release -p loadgen -- live --nodes 100 --writes 100 --rate 10 --latency wan
//! cargo run --release -p loadgen -- sim --nodes 10000 --writes 100 --latency uniform:100
//! cargo build --release -p patina -p loadgen && target/release/loadgen procs --nodes 50
//! target/release/loadgen remote --apis 10.0.0.1:8080,10.0.0.2:8080 --writes 100 --rate 5
//! ```

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use loadgen::procs::{run_procs, sibling_binary, ProcsOptions};
use loadgen::remote::{run_remote, wait_formation, RemoteOptions};
use loadgen::{run_live, run_sim, Latency, Options, Report};

/// Hundreds of agents share this process, each with its own store thread: glibc's allocator
/// serves them from a few shared arenas whose locks they contend for, and it returns and
/// re-faults heap pages as connections come and go (both showed in profiles of 800 agents).
/// mimalloc keeps a heap per thread (built without transparent huge pages, which held 2.3 MiB
/// per agent).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "Measures how fast a write reaches every node of a Patina cluster"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Real agents in this process: SQLite, QUIC with mutual TLS, SWIM, broadcast, sync.
    Live(Common),
    /// The same scenario on the deterministic simulator.
    Sim(Common),
    /// Nodes that run elsewhere, through their HTTP APIs only: streams `/v1/updates/<table>`
    /// from every node, writes on random nodes, times each write on this clock.
    Remote(RemoteArgs),
    /// N real `patina agent` processes on this machine (configs, ports and certificates made
    /// here, removed after, also when interrupted), measured as `remote` does.
    Procs(ProcsArgs),
}

/// What `remote` and `procs` share.
#[derive(Args)]
struct Measure {
    /// Writes to make, each on a random node.
    #[arg(long, default_value_t = 100)]
    writes: usize,
    /// Writes per second.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Seed of the writers' choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seconds to wait for the last write to spread.
    #[arg(long, default_value_t = 30)]
    settle_s: u64,
    /// The table to write (a text primary key `id`; see `loadgen::remote::SCHEMA`).
    #[arg(long, default_value = loadgen::remote::TABLE)]
    table: String,
    /// Bearer token of the APIs.
    #[arg(long, env = "PATINA_API__AUTHZ__BEARER_TOKEN")]
    token: Option<String>,
    /// Longest wait for every node to count every node before the writes (s).
    #[arg(long, default_value_t = 120)]
    formation_timeout_s: u64,
    /// Where to write the raw figures.
    #[arg(long, default_value = "loadgen-report.json")]
    json: PathBuf,
    /// Where to write the latency CDF plot (SVG).
    #[arg(long, alias = "png", default_value = "loadgen-cdf.svg")]
    plot: PathBuf,
}

impl Measure {
    fn options(&self) -> Result<RemoteOptions, String> {
        if self.rate <= 0.0 || self.writes == 0 {
            return Err("--rate and --writes must be positive".into());
        }
        Ok(RemoteOptions {
            writes: self.writes,
            rate: self.rate,
            seed: self.seed,
            settle: Duration::from_secs(self.settle_s),
            table: self.table.clone(),
            token: self.token.clone(),
            formation_timeout: Duration::from_secs(self.formation_timeout_s),
            progress: true,
        })
    }
}

#[derive(Args)]
struct RemoteArgs {
    /// The nodes' API addresses (host:port), comma-separated, or a file with one per line
    /// (`#` starts a comment).
    #[arg(long)]
    apis: String,
    /// What the network between the nodes is, for the report (loadgen does not change it).
    #[arg(long, default_value = "as deployed")]
    latency: String,
    #[command(flatten)]
    measure: Measure,
}

#[derive(Args)]
struct ProcsArgs {
    /// Agent processes to start.
    #[arg(long, default_value_t = 20)]
    nodes: usize,
    /// The patina binary [default: the one next to loadgen].
    #[arg(long)]
    patina: Option<PathBuf>,
    /// SWIM probe period of every agent (ms); default: 10 ms per node, at least 1 s.
    #[arg(long)]
    swim_probe_ms: Option<u64>,
    /// Seconds between formation and the idle measurement and writes.
    #[arg(long, default_value_t = 5)]
    warmup_s: u64,
    /// Agents send every datagram as a QUIC one, not sealed beside QUIC (to compare).
    #[arg(long)]
    no_sealed: bool,
    #[command(flatten)]
    measure: Measure,
}

/// `host:port` entries from a comma-separated list or a file, resolved.
fn api_list(apis: &str) -> Result<Vec<std::net::SocketAddr>, String> {
    let text = if std::path::Path::new(apis).is_file() {
        std::fs::read_to_string(apis).map_err(|e| format!("{apis}: {e}"))?
    } else {
        apis.replace(',', "\n")
    };
    let mut out = Vec::new();
    for entry in text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
    {
        if entry.is_empty() {
            continue;
        }
        let mut found =
            std::net::ToSocketAddrs::to_socket_addrs(entry).map_err(|e| format!("{entry}: {e}"))?;
        out.push(found.next().ok_or_else(|| format!("{entry}: no address"))?);
    }
    if out.len() < 2 {
        return Err("--apis needs at least two nodes".into());
    }
    Ok(out)
}

fn write_outputs(report: &Report, json: &std::path::Path, plot: &std::path::Path) {
    print!("{}", report.table());
    let bytes = serde_json::to_vec_pretty(&report.to_json()).expect("JSON");
    if let Err(e) = std::fs::write(json, bytes) {
        eprintln!("loadgen: writing {}: {e}", json.display());
    }
    let title = format!("loadgen: {}", report.title());
    match report.cdf_svg(&title) {
        Ok(svg) => {
            if let Err(e) = std::fs::write(plot, svg) {
                eprintln!("loadgen: writing {}: {e}", plot.display());
            }
        }
        Err(e) => eprintln!("loadgen: drawing the CDF: {e}"),
    }
    println!(
        "raw figures: {}; CDF plot: {}",
        json.display(),
        plot.display()
    );
}

fn fail(message: String) -> ! {
    eprintln!("loadgen: {message}");
    std::process::exit(2);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

fn run_against_nodes(mode: &Mode) {
    match mode {
        Mode::Remote(args) => {
            let apis = api_list(&args.apis).unwrap_or_else(|e| fail(e));
            let options = args.measure.options().unwrap_or_else(|e| fail(e));
            let mut report = runtime().block_on(async {
                let (settled, _) = wait_formation(
                    &apis,
                    options.token.as_deref(),
                    options.formation_timeout,
                    true,
                )
                .await;
                let mut report = run_remote(&apis, &options, "remote").await;
                report.settled_nodes = Some(settled);
                report
            });
            report.options = serde_json::json!({
                "mode": "remote", "nodes": apis.len(), "writes": options.writes,
                "rate": options.rate, "seed": options.seed, "latency": args.latency,
                "table": options.table, "settle_s": args.measure.settle_s,
            });
            write_outputs(&report, &args.measure.json, &args.measure.plot);
        }
        Mode::Procs(args) => {
            if args.nodes < 2 {
                fail("--nodes must be at least 2".into());
            }
            let binary = args
                .patina
                .clone()
                .or_else(sibling_binary)
                .unwrap_or_else(|| {
                    fail("no patina binary next to loadgen: build it (cargo build --release -p patina) or pass --patina".into())
                });
            let remote = args.measure.options().unwrap_or_else(|e| fail(e));
            let options = ProcsOptions {
                nodes: args.nodes,
                binary,
                swim_probe_ms: args
                    .swim_probe_ms
                    .unwrap_or_else(|| loadgen::default_swim_probe_ms(args.nodes)),
                warmup: Duration::from_secs(args.warmup_s),
                sealed_datagrams: !args.no_sealed,
                remote,
            };
            let mut report = runtime().block_on(run_procs(&options));
            report.options = serde_json::json!({
                "mode": "procs", "nodes": options.nodes, "writes": options.remote.writes,
                "rate": options.remote.rate, "seed": options.remote.seed,
                "latency": "loopback (none added)", "swim_probe_ms": options.swim_probe_ms,
                "settle_s": args.measure.settle_s, "warmup_s": args.warmup_s,
                "patina": options.binary.display().to_string(),
                "sealed_datagrams": options.sealed_datagrams,
            });
            write_outputs(&report, &args.measure.json, &args.measure.plot);
        }
        Mode::Live(_) | Mode::Sim(_) => unreachable!("handled by main"),
    }
}

#[derive(Args)]
struct Common {
    /// Nodes.
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Writes to make, each on a random node.
    #[arg(long, default_value_t = 100)]
    writes: usize,
    /// Writes per second.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Latency: "wan" (19-region model), "uniform:MS" (one way) or "none".
    #[arg(long, default_value = "wan")]
    latency: String,
    /// Share of messages lost (0..1).
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Plaintext QUIC instead of mutual TLS (live).
    #[arg(long)]
    no_tls: bool,
    /// Agents send every datagram as a QUIC one, not sealed beside QUIC (live; to compare).
    #[arg(long)]
    no_sealed: bool,
    /// Seed of placement, writers and the simulator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seconds to wait for the last write to spread.
    #[arg(long, default_value_t = 30)]
    settle_s: u64,
    /// Seconds between membership settling and the first write (live): round-trip probes
    /// choose each node's near peers meanwhile.
    #[arg(long, default_value_t = 15)]
    warmup_s: u64,
    /// SWIM probe period of every agent (ms, live); default: 10 ms per node, at least 1 s
    /// (each probe usually costs a QUIC handshake, and the agents share this machine).
    #[arg(long)]
    swim_probe_ms: Option<u64>,
    /// How long every agent keeps an unused connection (ms, live); default: the agent's.
    #[arg(long)]
    connection_idle_ms: Option<u64>,
    /// Anti-entropy sync interval of every agent (ms, live).
    #[arg(long, default_value_t = loadgen::DEFAULT_SYNC_INTERVAL_MS)]
    sync_interval_ms: u64,
    /// Kept links every agent asks of its nearest members (live); default: the agent's.
    #[arg(long)]
    near_peers: Option<usize>,
    /// Kept links every agent asks of random members (live); default: the agent's.
    #[arg(long)]
    far_peers: Option<usize>,
    /// Members every agent sends its own changesets to directly (live); default: the agent's.
    #[arg(long)]
    origin_fanout: Option<usize>,
    /// Where to write the raw figures.
    #[arg(long, default_value = "loadgen-report.json")]
    json: PathBuf,
    /// Where to write the latency CDF plot (SVG).
    #[arg(long, alias = "png", default_value = "loadgen-cdf.svg")]
    plot: PathBuf,
}

fn options(c: &Common) -> Result<Options, String> {
    let latency = match c.latency.as_str() {
        "wan" => Latency::Wan,
        "none" => Latency::None,
        other => match other.strip_prefix("uniform:").map(str::parse::<f64>) {
            Some(Ok(ms)) if ms >= 0.0 => Latency::Uniform(ms),
            _ => {
                return Err(format!(
                    "--latency {other}: expected wan, none or uniform:MS"
                ))
            }
        },
    };
    if !(0.0..1.0).contains(&c.loss) {
        return Err("--loss must be in 0..1".into());
    }
    if c.nodes < 2 || c.rate <= 0.0 {
        return Err("--nodes must be at least 2 and --rate positive".into());
    }
    Ok(Options {
        nodes: c.nodes,
        writes: c.writes,
        rate: c.rate,
        latency,
        loss: c.loss,
        tls: !c.no_tls,
        sealed_datagrams: !c.no_sealed,
        seed: c.seed,
        settle: Duration::from_secs(c.settle_s),
        warmup: Duration::from_secs(c.warmup_s),
        swim_probe_ms: c
            .swim_probe_ms
            .unwrap_or_else(|| loadgen::default_swim_probe_ms(c.nodes)),
        connection_idle_ms: c.connection_idle_ms,
        sync_interval_ms: c.sync_interval_ms,
        near_peers: c.near_peers,
        far_peers: c.far_peers,
        origin_fanout: c.origin_fanout,
        progress: true,
    })
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let (common, live) = match &cli.mode {
        Mode::Live(c) => (c, true),
        Mode::Sim(c) => (c, false),
        other => return run_against_nodes(other),
    };
    let options = match options(common) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(2);
        }
    };
    println!("seed {}", options.seed);
    let mut report = if live {
        runtime().block_on(run_live(&options))
    } else {
        run_sim(&options)
    };
    report.options = serde_json::json!({
        "mode": if live { "live" } else { "sim" }, "nodes": options.nodes,
        "writes": options.writes, "rate": options.rate, "seed": options.seed,
        "latency": common.latency, "loss": options.loss, "tls": options.tls,
        "sealed_datagrams": options.sealed_datagrams,
        "settle_s": common.settle_s, "warmup_s": common.warmup_s,
        "swim_probe_ms": options.swim_probe_ms, "sync_interval_ms": options.sync_interval_ms,
        "near_peers": options.near_peers, "far_peers": options.far_peers,
        "origin_fanout": options.origin_fanout,
    });
    write_outputs(&report, &common.json, &common.plot);
}
