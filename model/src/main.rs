//! `patina-model`: deeper model checks than `cargo test` runs, and stateright's Explorer.
//!
//! ```text
//! cargo run -p patina-model --release -- check                      # every scenario, depth 12
//! cargo run -p patina-model --release -- check three-nodes --depth 11 --threads 2
//! cargo run -p patina-model --release -- explore conflicts-with-crash   # http://127.0.0.1:3000
//! ```

use std::time::Instant;

use clap::{Parser, Subcommand};
use patina_model::{scenarios, PatinaActor, Scenario};
use stateright::actor::ActorModel;
use stateright::{Checker, Expectation, Model};

#[derive(Parser)]
#[command(
    name = "patina-model",
    about = "Model checks of Patina's replication protocol"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Breadth-first search to a depth; prints states explored and any property violated.
    Check {
        /// Scenario name, or "all".
        #[arg(default_value = "all")]
        scenario: String,
        /// Steps from the initial state.
        #[arg(long, default_value_t = 12)]
        depth: usize,
        /// Checker threads (counts are exact with 1).
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Depth-first instead of breadth-first: keeps only the current path and the
        /// fingerprints of visited states, so it goes deeper in the same memory (a state first
        /// reached by a long path is not expanded again from a shorter one).
        #[arg(long)]
        dfs: bool,
    },
    /// Serves stateright's Explorer web UI to walk the model step by step.
    Explore {
        /// Scenario name.
        #[arg(default_value = "conflicts-with-crash")]
        scenario: String,
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:3000")]
        addr: String,
    },
}

fn find(name: &str) -> Result<Vec<Scenario>, String> {
    let all = scenarios::all();
    if name == "all" {
        return Ok(all);
    }
    let names: Vec<&str> = all.iter().map(|s| s.name).collect();
    let found: Vec<Scenario> = all.iter().filter(|s| s.name == name).cloned().collect();
    if found.is_empty() {
        return Err(format!(
            "unknown scenario {name}; known: {}",
            names.join(", ")
        ));
    }
    Ok(found)
}

/// Prints what a finished check found; false if a property failed.
fn report<C: Checker<ActorModel<PatinaActor, Scenario, ()>>>(
    checker: C,
    name: &str,
    search: &str,
    depth: usize,
    start: Instant,
) -> bool {
    println!(
        "{name}: {search} to depth {depth}: {} states, {} unique, max depth {}, {:.1} s",
        checker.state_count(),
        checker.unique_state_count(),
        checker.max_depth(),
        start.elapsed().as_secs_f64()
    );
    let mut all_ok = true;
    for property in checker.model().properties() {
        let found = checker.discovery(property.name);
        let ok = match property.expectation {
            Expectation::Sometimes => found.is_some(),
            _ => found.is_none(),
        };
        all_ok &= ok;
        println!("  {} {}", if ok { "ok  " } else { "FAIL" }, property.name);
        if let (false, Some(path)) = (ok, found) {
            for action in path.into_actions() {
                println!("      {action:?}");
            }
        }
    }
    all_ok
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check {
            scenario,
            depth,
            threads,
            dfs,
        } => find(&scenario).map(|list| {
            let mut failed = false;
            for scenario in list {
                let name = scenario.name;
                let start = Instant::now();
                let builder = scenario
                    .into_model()
                    .checker()
                    .threads(threads)
                    .target_max_depth(depth);
                let ok = if dfs {
                    report(builder.spawn_dfs().join(), name, "DFS", depth, start)
                } else {
                    report(builder.spawn_bfs().join(), name, "BFS", depth, start)
                };
                failed |= !ok;
            }
            if failed {
                std::process::exit(1);
            }
        }),
        Command::Explore { scenario, addr } => find(&scenario).map(|mut list| {
            let scenario = list.remove(0);
            println!("Explorer for {} on http://{addr}", scenario.name);
            scenario.into_model().checker().serve(addr);
        }),
    };
    if let Err(message) = result {
        eprintln!("patina-model: {message}");
        std::process::exit(2);
    }
}
