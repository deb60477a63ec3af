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
    let png = report.cdf_png();
    assert_eq!(&png[1..4], b"PNG");
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
