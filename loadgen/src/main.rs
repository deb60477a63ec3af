//! `loadgen`: measure how fast a write reaches every node.
//!
//! ```text
//! cargo run --release -p loadgen -- live --nodes 100 --writes 100 --rate 10 --latency wan
//! cargo run --release -p loadgen -- sim --nodes 10000 --writes 100 --latency uniform:100
//! ```

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use loadgen::{run_live, run_sim, Latency, Options};

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
    /// Where to write the raw figures.
    #[arg(long, default_value = "loadgen-report.json")]
    json: PathBuf,
    /// Where to write the latency CDF plot.
    #[arg(long, default_value = "loadgen-cdf.png")]
    png: PathBuf,
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
        seed: c.seed,
        settle: Duration::from_secs(c.settle_s),
        warmup: Duration::from_secs(c.warmup_s),
        swim_probe_ms: c
            .swim_probe_ms
            .unwrap_or_else(|| loadgen::default_swim_probe_ms(c.nodes)),
        connection_idle_ms: c.connection_idle_ms,
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
    };
    let options = match options(common) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(2);
        }
    };
    println!("seed {}", options.seed);
    let report = if live {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(run_live(&options))
    } else {
        run_sim(&options)
    };
    print!("{}", report.table());
    let json = serde_json::to_vec_pretty(&report.to_json()).expect("JSON");
    if let Err(e) = std::fs::write(&common.json, json) {
        eprintln!("loadgen: writing {}: {e}", common.json.display());
    }
    if let Err(e) = std::fs::write(&common.png, report.cdf_png()) {
        eprintln!("loadgen: writing {}: {e}", common.png.display());
    }
    println!(
        "raw figures: {}; CDF plot: {}",
        common.json.display(),
        common.png.display()
    );
}
