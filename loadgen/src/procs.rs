//! N real `patina agent` processes on this machine, as an operator would run them: one
//! config file, data folder and pair of loopback ports each, mutual TLS with one certificate
//! for the name `patina`, each node joining through the first and one other. Measured through
//! their APIs ([`crate::remote`]), plus memory and CPU per process from `/proc`.
//!
//! The processes die with loadgen: at the end of the run, on a panic, and on SIGINT, SIGTERM
//! or SIGHUP (the signal handler kills them and removes their folder before exiting).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use patina_tests::procs::AgentProcess;

use crate::remote::{run_remote, wait_formation, RemoteOptions};
use crate::{bar, Report};

/// What to start.
#[derive(Debug, Clone)]
pub struct ProcsOptions {
    /// Agent processes.
    pub nodes: usize,
    /// The `patina` binary.
    pub binary: PathBuf,
    /// SWIM probe period of every agent (ms).
    pub swim_probe_ms: u64,
    /// Wait after formation, before measuring idle cost and writing.
    pub warmup: Duration,
    /// Sealed datagrams between agents (their default); off writes `sealed_datagrams = false`
    /// in each agent's config (which an agent older than the setting refuses).
    pub sealed_datagrams: bool,
    /// The measurement.
    pub remote: RemoteOptions,
}

/// The `patina` next to this executable (cargo puts both in `target/<profile>/`).
pub fn sibling_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let candidate = exe.parent()?.join("patina");
    candidate.is_file().then_some(candidate)
}

/// Pids of the running agents and their folder, for the signal handler.
#[derive(Debug, Default)]
struct Running {
    pids: Vec<u32>,
    root: Option<PathBuf>,
}

/// Kills the agents and removes their folder when loadgen is told to stop.
fn on_signal_clean_up(running: Arc<Mutex<Running>>) {
    use tokio::signal::unix::{signal, SignalKind};
    tokio::spawn(async move {
        let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) else {
            return;
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
            _ = hup.recv() => {}
        }
        let running = running.lock().unwrap_or_else(|e| e.into_inner());
        // std can only kill a Child it owns, and the agents are owned by the run being cut
        // short: kill(1) by pid.
        let _ = std::process::Command::new("kill")
            .arg("-KILL")
            .args(running.pids.iter().map(u32::to_string))
            .status();
        // An agent still starting is not in the list yet; its command line names its config
        // under the run's folder.
        if let Some(root) = &running.root {
            let _ = std::process::Command::new("pkill")
                .arg("-KILL")
                .arg("-f")
                .arg(root.as_os_str())
                .status();
        }
        if let Some(root) = &running.root {
            let _ = std::fs::remove_dir_all(root);
        }
        eprintln!(
            "loadgen: interrupted; {} agents killed, their folder removed",
            running.pids.len()
        );
        std::process::exit(130);
    });
}

/// (resident bytes, CPU seconds) of a process, from /proc.
fn usage(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name and state,
    // in USER_HZ ticks, which Linux fixes at 100 per second for /proc.
    (rss_kib * 1024, (ticks(11) + ticks(12)) as f64 / 100.0)
}

fn total_usage(agents: &[AgentProcess]) -> (u64, f64) {
    agents
        .iter()
        .map(|a| usage(a.child.id()))
        .fold((0, 0.0), |(m, c), (m2, c2)| (m + m2, c + c2))
}

fn write_node(
    dir: &Path,
    tls: &Path,
    bootstrap: &[SocketAddr],
    swim_probe_ms: u64,
    sealed_datagrams: bool,
) -> PathBuf {
    std::fs::create_dir_all(dir.join("schema")).expect("a node folder");
    std::fs::write(
        dir.join("schema/loadgen.sql"),
        crate::remote::SCHEMA.to_string() + "\n",
    )
    .expect("the schema");
    let bootstrap: Vec<String> = bootstrap.iter().map(|a| format!("\"{a}\"")).collect();
    let config = format!(
        "[db]\npath = \"{0}/state.db\"\nschema_paths = [\"{0}/schema\"]\n\
         [api]\naddr = \"127.0.0.1:0\"\nquery_connections = 1\n[admin]\npath = \"{0}/admin.sock\"\n\
         [gossip]\naddr = \"127.0.0.1:0\"\nbootstrap = [{1}]\nsync_interval_ms = 2000\n\
         swim_probe_period_ms = {2}\n{4}\
         [gossip.tls]\ncert_file = \"{3}/node.pem\"\nkey_file = \"{3}/node.key\"\n\
         ca_file = \"{3}/ca.pem\"\nserver_name = \"patina\"\n",
        dir.display(),
        bootstrap.join(", "),
        swim_probe_ms,
        tls.display(),
        if sealed_datagrams {
            ""
        } else {
            "sealed_datagrams = false\n"
        },
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, config).expect("a config file");
    path
}

/// Starts the agents, measures them, stops them.
pub async fn run_procs(options: &ProcsOptions) -> Report {
    let started = Instant::now();
    let running = Arc::new(Mutex::new(Running::default()));
    on_signal_clean_up(running.clone());
    let root = tempfile::Builder::new()
        .prefix("loadgen-procs-")
        .tempdir()
        .expect("a temporary folder");
    running.lock().unwrap_or_else(|e| e.into_inner()).root = Some(root.path().to_path_buf());
    let tls = root.path().join("tls");
    std::fs::create_dir_all(&tls).expect("the tls folder");
    let ca = patina::net::tls::generate_ca().expect("a CA");
    let node = patina::net::tls::generate_signed(
        &ca.key_pem,
        &["patina".to_string()],
        patina::net::tls::CertUse::Node,
    )
    .expect("a node certificate");
    std::fs::write(tls.join("ca.pem"), &ca.cert_pem).expect("ca.pem");
    std::fs::write(tls.join("node.pem"), &node.cert_pem).expect("node.pem");
    std::fs::write(tls.join("node.key"), &node.key_pem).expect("node.key");

    let mut rng = patina_core::stats::SplitMix64::new(options.remote.seed ^ 0x9e37_79b9);
    let mut agents: Vec<AgentProcess> = Vec::with_capacity(options.nodes);
    let starting = bar(options.remote.progress, options.nodes, "starting");
    for i in 0..options.nodes {
        let mut bootstrap = Vec::new();
        if let Some(first) = agents.first() {
            bootstrap.push(first.gossip);
            bootstrap.push(agents[rng.below(agents.len() as u64) as usize].gossip);
            bootstrap.dedup();
        }
        let dir = root.path().join(format!("n{i}"));
        let config = write_node(
            &dir,
            &tls,
            &bootstrap,
            options.swim_probe_ms,
            options.sealed_datagrams,
        );
        let agent = AgentProcess::start_with_config(&options.binary, &dir, &config);
        running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pids
            .push(agent.child.id());
        agents.push(agent);
        starting.inc(1);
    }
    starting.finish_and_clear();
    let last_started = Instant::now();
    let apis: Vec<SocketAddr> = agents.iter().map(|a| a.api).collect();
    let (settled, formed) = wait_formation(
        &apis,
        options.remote.token.as_deref(),
        options.remote.formation_timeout,
        options.remote.progress,
    )
    .await;
    tokio::time::sleep(options.warmup).await;
    // Idle cost over five seconds with nothing written.
    let idle_window = Duration::from_secs(5);
    let (_, idle_cpu_before) = total_usage(&agents);
    tokio::time::sleep(idle_window).await;
    let (idle_rss, idle_cpu_after) = total_usage(&agents);
    let n = options.nodes as f64;
    let (_, cpu_before) = total_usage(&agents);
    let measure_started = Instant::now();
    let mut report = run_remote(&apis, &options.remote, "procs").await;
    let (_, cpu_after) = total_usage(&agents);
    report.settled_nodes = Some(settled);
    report.formation_s = formed.map(|at| at.duration_since(last_started).as_secs_f64());
    report.memory_per_node_mib = Some(idle_rss as f64 / n / (1024.0 * 1024.0));
    report.idle_cpu_per_node =
        Some((idle_cpu_after - idle_cpu_before) / idle_window.as_secs_f64() / n);
    report.cpu_per_node =
        Some((cpu_after - cpu_before) / measure_started.elapsed().as_secs_f64() / n);
    report.swim_probe_ms = Some(options.swim_probe_ms);
    drop(agents);
    running
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pids
        .clear();
    report.wall_s = started.elapsed().as_secs_f64();
    report
}
