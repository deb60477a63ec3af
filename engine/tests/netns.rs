//! What crosses a network: five hosts with their own addresses (network namespaces joined by
//! veth pairs on a bridge, made by the test), a real `patina agent` on each binding 0.0.0.0
//! with mutual TLS, joined through the name `seed` and advertising its host's address. One
//! host is cut off (link down) while every host writes, and brought back: all converge.
//!
//! Needs root (CI has it, and sets PATINA_REQUIRE_NETNS so it cannot skip); elsewhere it says
//! why it is skipped and passes.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use patina_tests::netns::Lab;
use patina_tests::procs::AgentProcess;

const HOSTS: usize = 5;
const CUT: usize = HOSTS;

fn patina() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_patina"))
}

/// `patina <args>` run inside host `i` (the API listens on the host's own loopback).
fn cli(lab: &Lab, i: usize, args: &[&str]) -> Output {
    lab.command(i, patina())
        .args(args)
        .output()
        .expect("running patina in a namespace")
}

fn exec(lab: &Lab, i: usize, sql: &str) {
    let out = cli(lab, i, &["exec", "--api", "127.0.0.1:8080", sql]);
    assert!(
        out.status.success(),
        "write on host{i}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The keys host `i` holds, or None when its API does not answer.
fn keys(lab: &Lab, i: usize) -> Option<Vec<String>> {
    let out = cli(
        lab,
        i,
        &[
            "query",
            "--api",
            "127.0.0.1:8080",
            "SELECT k FROM kv ORDER BY k",
        ],
    );
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .map(str::to_owned)
            .collect()
    })
}

fn members(lab: &Lab, i: usize, dir: &Path) -> Vec<String> {
    let admin = dir.join("admin.sock");
    let out = cli(
        lab,
        i,
        &["cluster", "members", "--admin", admin.to_str().unwrap()],
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn wait(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn hosts_on_their_own_addresses_join_by_name_and_a_host_cut_off_converges() {
    let lab = match Lab::new(HOSTS, &[("seed", 1)]) {
        Ok(lab) => lab,
        // CI sets PATINA_REQUIRE_NETNS: there a missing lab is a failure, not a skip.
        Err(why) if std::env::var_os("PATINA_REQUIRE_NETNS").is_some() => {
            panic!("PATINA_REQUIRE_NETNS is set and {why}")
        }
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let root = tempfile::tempdir().unwrap();
    let tls = root.path().join("tls");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(patina())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let tls_dir = tls.to_str().unwrap();
    run(&["tls", "ca", "generate", "--out", tls_dir]);
    let ca_key = tls.join("ca.key");
    // One certificate for the name every node checks: the hosts' addresses are not in it.
    run(&[
        "tls",
        "server",
        "generate",
        "patina",
        "--ca-key",
        ca_key.to_str().unwrap(),
        "--out",
        tls_dir,
    ]);

    let mut agents = Vec::new();
    for i in 1..=HOSTS {
        let dir = root.path().join(format!("host{i}"));
        std::fs::create_dir_all(dir.join("schema")).unwrap();
        std::fs::write(dir.join("schema/schema.sql"), patina_tests::SCHEMA).unwrap();
        // Host 2 says its address itself; the others find it on their route to the seed.
        let external = if i == 2 {
            format!("external_addr = \"host{i}:8787\"\n")
        } else {
            String::new()
        };
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[db]\npath = \"{0}/state.db\"\nschema_paths = [\"{0}/schema\"]\n\
                 [api]\naddr = \"127.0.0.1:8080\"\n[admin]\npath = \"{0}/admin.sock\"\n\
                 [gossip]\naddr = \"0.0.0.0:8787\"\nbootstrap = [\"seed:8787\"]\n{external}\
                 sync_interval_ms = 200\nswim_probe_period_ms = 300\n\
                 [gossip.tls]\ncert_file = \"{1}/server.pem\"\nkey_file = \"{1}/server.key\"\n\
                 ca_file = \"{1}/ca.pem\"\nserver_name = \"patina\"\n",
                dir.display(),
                tls_dir
            ),
        )
        .unwrap();
        let agent = AgentProcess::start_command(lab.command(i, patina()), &dir, &config);
        // It advertises its host's own address, not the wildcard it binds.
        assert_eq!(agent.gossip.to_string(), format!("{}:8787", lab.addr(i)));
        agents.push(agent);
    }
    for (i, agent) in agents.iter().enumerate() {
        wait(
            "every host to see every other",
            Duration::from_secs(30),
            || {
                let seen = members(&lab, i + 1, &agent.dir);
                (1..=HOSTS).filter(|j| *j != i + 1).all(|j| {
                    seen.iter()
                        .any(|l| l.contains(&format!("{}:8787", lab.addr(j))))
                })
            },
        );
    }

    // Host 5 loses its link while every host writes.
    lab.set_link(CUT, false);
    let mut expected = Vec::new();
    for i in 1..=HOSTS {
        for n in 0..3 {
            let key = format!("h{i}-{n}");
            exec(
                &lab,
                i,
                &format!("INSERT INTO kv (k, v) VALUES ('{key}', 'x')"),
            );
            expected.push(key);
        }
    }
    expected.sort();
    wait(
        "the connected hosts to converge",
        Duration::from_secs(30),
        || (1..CUT).all(|i| keys(&lab, i).map(|k| k.len()) == Some(expected.len() - 3)),
    );
    // Long enough for the others to declare it down (a few SWIM periods).
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        keys(&lab, CUT).map(|k| k.len()),
        Some(3),
        "the cut host got writes"
    );

    lab.set_link(CUT, true);
    wait(
        "every host to hold every write",
        Duration::from_secs(60),
        || (1..=HOSTS).all(|i| keys(&lab, i).as_ref() == Some(&expected)),
    );
    drop(agents);
}
