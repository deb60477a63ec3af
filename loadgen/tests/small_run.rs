//! A small live run: 20 real nodes, a few writes over an emulated 5 ms network; every write
//! reaches every node and the report, its JSON and its plot are produced. No timing asserted.

use std::time::Duration;

use loadgen::{run_live, run_sim, Latency, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_nodes_every_write_reaches_every_node() {
    let options = Options {
        nodes: 20,
        writes: 5,
        rate: 20.0,
        latency: Latency::Uniform(5.0),
        settle: Duration::from_secs(60),
        warmup: Duration::from_secs(2),
        ..Options::default()
    };
    let report = run_live(&options).await;
    assert!(report.complete(), "{}", report.table());
    assert_eq!(report.time_to_all_ms.len(), 5);
    assert_eq!(report.delivery_ms.len(), 5 * 20);
    let json = report.to_json();
    assert_eq!(json["nodes"], 20);
    assert_eq!(json["writes"], 5);
    assert!(report.table().contains("time to all nodes"));
    let cost = report.write_cpu.expect("a live run measures a write's CPU");
    assert!(cost.cores >= 1 && cost.all_nodes_ms >= 0.0, "{cost:?}");
    assert!(report.table().contains("CPU per write"));
    assert_eq!(json["write_cpu"]["cores"], cost.cores);
    // The write phase's timeline: a sample per step, in order, each write placed in it.
    let timeline = report
        .timeline
        .as_ref()
        .expect("a live run samples its write phase");
    assert!(!timeline.at_ms.is_empty());
    assert!(timeline.at_ms.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(timeline.cpu_cores.len(), timeline.at_ms.len());
    assert_eq!(timeline.sync_rounds.len(), timeline.at_ms.len());
    assert_eq!(timeline.writes_at_ms.len(), 5);
    assert!(timeline.writes_at_ms.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(
        json["timeline"]["at_ms"].as_array().map(Vec::len),
        Some(timeline.at_ms.len())
    );
    assert!(report.table().contains("busiest half second"));
    let svg = report.cdf_svg(&report.title()).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("time to all nodes (per write) (n = 5)"));
}

#[test]
fn the_same_scenario_on_the_simulator() {
    let options = Options {
        nodes: 200,
        writes: 10,
        latency: Latency::Wan,
        ..Options::default()
    };
    let report = run_sim(&options);
    assert!(report.complete(), "{}", report.table());
    assert_eq!(report.mode, "sim");
}

/// Nodes measured through their APIs only: three in-process agents stand in for a fleet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_nodes_measured_through_their_apis() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let schema = format!("{}\n{}", patina_tests::SCHEMA, loadgen::remote::SCHEMA);
    let agents = patina_tests::start_cluster_with(&dirs, None, |config| {
        std::fs::write(config.db.schema_paths[0].join("schema.sql"), &schema).unwrap();
    })
    .await;
    let apis: Vec<_> = agents.iter().map(|a| a.api_addr()).collect();
    let options = loadgen::remote::RemoteOptions {
        writes: 6,
        rate: 30.0,
        ..Default::default()
    };
    let (settled, formed) =
        loadgen::remote::wait_formation(&apis, None, Duration::from_secs(30), false).await;
    assert_eq!((settled, formed.is_some()), (3, true));
    let report = loadgen::remote::run_remote(&apis, &options, "remote").await;
    assert!(report.complete(), "{}", report.table());
    assert_eq!(report.delivery_ms.len(), 6 * 3);
    for agent in agents {
        agent.shutdown().await;
    }
}

/// `loadgen procs` on three real agent processes, when the agent binary was built beside
/// this test (as `cargo test --workspace` does); they are gone afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_agent_processes_measured_and_stopped() {
    let exe = std::env::current_exe().unwrap();
    let binary = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("patina");
    if !binary.is_file() {
        eprintln!(
            "skipped: no agent binary at {} (cargo build -p patina)",
            binary.display()
        );
        return;
    }
    let options = loadgen::procs::ProcsOptions {
        nodes: 3,
        binary,
        swim_probe_ms: 1_000,
        warmup: Duration::ZERO,
        sealed_datagrams: true,
        remote: loadgen::remote::RemoteOptions {
            writes: 5,
            rate: 20.0,
            ..Default::default()
        },
    };
    let report = loadgen::procs::run_procs(&options).await;
    assert!(report.complete(), "{}", report.table());
    assert_eq!(report.settled_nodes, Some(3));
    assert!(
        report.memory_per_node_mib.unwrap() > 1.0,
        "{}",
        report.table()
    );
    // Gone afterwards: no agent of the run left, no run folder.
    let left = std::process::Command::new("pgrep")
        .args(["-f", "loadgen-procs-"])
        .output()
        .unwrap();
    assert!(
        left.stdout.is_empty(),
        "agents left: {:?}",
        String::from_utf8_lossy(&left.stdout)
    );
    let folders = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("loadgen-procs-")
        })
        .count();
    assert_eq!(folders, 0);
}
