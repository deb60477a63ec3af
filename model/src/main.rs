//! `patina-model`: deeper model checks than `cargo test` runs, and stateright's Explorer.
//!
//! ```text
//! cargo run -p patina-model --release -- check                      # every scenario, DFS depth 11
//! cargo run -p patina-model --release -- check conflicts-with-crash --depth 16
//! cargo run -p patina-model --release -- check three-nodes --bfs --depth 10
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
    /// Depth-first (or breadth-first) search to a depth; prints states explored and any
    /// property violated.
    Check {
        /// Scenario name, or "all".
        #[arg(default_value = "all")]
        scenario: String,
        /// Steps from the initial state.
        #[arg(long, default_value_t = 11)]
        depth: usize,
        /// Checker threads (counts are exact with 1).
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Breadth-first instead of depth-first: finds the shortest path to a violation, but
        /// keeps every state of its frontier (about 10 KB each), so it reaches less deep in
        /// the same memory (depth 10 of three-nodes: 730,906 states, 27 s). Depth-first keeps
        /// the current path and the fingerprints of visited states (a state first reached by a
        /// long path is not expanded again from a shorter one).
        #[arg(long)]
        bfs: bool,
        /// The default; kept for scripts written when breadth-first was.
        #[arg(long, hide = true, conflicts_with = "bfs")]
        dfs: bool,
        /// Stop with a report once the process holds this much memory (MiB); default: three
        /// quarters of the memory available at start. A breadth-first search keeps every
        /// state of its frontier: deep ones outgrow any machine.
        #[arg(long)]
        max_memory_mib: Option<u64>,
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

/// Resident memory of this process, MiB (Linux; 0 elsewhere).
fn resident_mib() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|statm| statm.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096 / (1024 * 1024))
}

/// Three quarters of the memory available now, MiB (8 GiB where it cannot be read).
fn default_memory_limit_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(8192, |kib| kib / 1024 * 3 / 4)
}

/// Waits for a check to finish, or stops it with a report of how far it got once the process
/// holds `limit_mib`: Err(report).
fn finish<C: Checker<ActorModel<PatinaActor, Scenario, ()>>>(
    checker: C,
    name: &str,
    search: &str,
    limit_mib: u64,
    start: Instant,
) -> Result<C, String> {
    while !checker.is_done() {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let held = resident_mib();
        if held >= limit_mib {
            let violated: Vec<&str> = checker
                .model()
                .properties()
                .into_iter()
                .filter(|p| p.expectation != Expectation::Sometimes)
                .filter(|p| checker.discovery(p.name).is_some())
                .map(|p| p.name)
                .collect();
            return Err(format!(
                "{name}: {search} stopped at the memory limit ({held} MiB of {limit_mib}) after \
                 {:.1} s: {} states, {} unique, depth {} reached; {}. Raise --max-memory-mib, \
                 lower --depth, or search depth-first (without --bfs).",
                start.elapsed().as_secs_f64(),
                checker.state_count(),
                checker.unique_state_count(),
                checker.max_depth(),
                if violated.is_empty() {
                    "no property violated so far".to_string()
                } else {
                    format!("violated so far: {}", violated.join(", "))
                },
            ));
        }
    }
    Ok(checker.join())
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
            bfs,
            dfs: _,
            max_memory_mib,
        } => find(&scenario).map(|list| {
            let limit = max_memory_mib.unwrap_or_else(default_memory_limit_mib);
            let mut failed = false;
            for scenario in list {
                let name = scenario.name;
                let start = Instant::now();
                let builder = scenario
                    .into_model()
                    .checker()
                    .threads(threads)
                    .target_max_depth(depth);
                let ok = if !bfs {
                    finish(builder.spawn_dfs(), name, "DFS", limit, start)
                        .map(|checker| report(checker, name, "DFS", depth, start))
                } else {
                    finish(builder.spawn_bfs(), name, "BFS", limit, start)
                        .map(|checker| report(checker, name, "BFS", depth, start))
                };
                match ok {
                    Ok(ok) => failed |= !ok,
                    Err(stopped) => {
                        println!("{stopped}");
                        // A failure already found outranks the stop.
                        std::process::exit(if failed { 1 } else { 3 });
                    }
                }
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
