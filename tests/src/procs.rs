//! Real `patina agent` processes on loopback, as operators run them: one config file and one
//! data folder each, ports chosen by the OS and read back from the agent's first line.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A running `patina agent` process, killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct AgentProcess {
    /// The process.
    pub child: Child,
    /// Its HTTP API.
    pub api: SocketAddr,
    /// Its gossip (QUIC) address.
    pub gossip: SocketAddr,
    /// Its data folder.
    pub dir: PathBuf,
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where an agent listens; port 0 lets the OS choose.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    /// The HTTP API.
    pub api: SocketAddr,
    /// Gossip (QUIC).
    pub gossip: SocketAddr,
}

impl Default for Ports {
    fn default() -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Ports {
            api: any,
            gossip: any,
        }
    }
}

/// Writes `dir/config.toml` (everything under `dir`, [`crate::SCHEMA`], `ports`, `extra`
/// appended to the `[gossip]` table) and the schema file.
pub fn write_config(
    dir: &Path,
    ports: Ports,
    bootstrap: &[SocketAddr],
    extra_gossip: &str,
) -> PathBuf {
    std::fs::create_dir_all(dir.join("schema")).expect("creating the data folder");
    std::fs::write(dir.join("schema/schema.sql"), crate::SCHEMA).expect("writing the schema");
    let bootstrap: Vec<String> = bootstrap.iter().map(|a| format!("\"{a}\"")).collect();
    let config = format!(
        "[db]\npath = \"{0}/state.db\"\nschema_paths = [\"{0}/schema\"]\n\
         [api]\naddr = \"{1}\"\n[admin]\npath = \"{0}/admin.sock\"\n\
         [gossip]\naddr = \"{2}\"\nbootstrap = [{3}]\n{4}\n",
        dir.display(),
        ports.api,
        ports.gossip,
        bootstrap.join(", "),
        extra_gossip
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, config).expect("writing the config file");
    path
}

impl AgentProcess {
    /// Starts `binary agent -c dir/config.toml` (see [`write_config`]) and waits for its
    /// announcement line. Panics if the agent exits first.
    pub fn start(binary: &Path, dir: &Path, bootstrap: &[SocketAddr]) -> AgentProcess {
        let config = write_config(dir, Ports::default(), bootstrap, "sync_interval_ms = 200");
        AgentProcess::start_with_config(binary, dir, &config)
    }

    /// Kills the process with SIGKILL, as a crash.
    pub fn crash(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the (crashed or stopped) agent again on the same data folder and the same
    /// addresses, as an operator's supervisor restarts a node.
    pub fn restart(&mut self, binary: &Path, bootstrap: &[SocketAddr]) {
        self.crash();
        let ports = Ports {
            api: self.api,
            gossip: self.gossip,
        };
        let config = write_config(&self.dir, ports, bootstrap, "sync_interval_ms = 200");
        let restarted = AgentProcess::start_with_config(binary, &self.dir.clone(), &config);
        // The old value's Drop kills an already dead process: harmless.
        *self = restarted;
    }

    /// Starts the agent on an existing config file.
    pub fn start_with_config(binary: &Path, dir: &Path, config: &Path) -> AgentProcess {
        AgentProcess::start_command(Command::new(binary), dir, config)
    }

    /// Starts `command agent -c config`, where `command` runs the agent binary (possibly
    /// through a wrapper that execs it, such as `ip netns exec`).
    pub fn start_command(mut command: Command, dir: &Path, config: &Path) -> AgentProcess {
        // The agent's log goes to `dir/agent.log` (appended across restarts), at the level of
        // PATINA_TEST_LOG (default warn).
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("agent.log"))
            .expect("opening the agent's log file");
        // A RUST_LOG the caller put on the command wins.
        if !command.get_envs().any(|(k, _)| k == "RUST_LOG") {
            let level = std::env::var("PATINA_TEST_LOG").unwrap_or_else(|_| "warn".into());
            command.env("RUST_LOG", level);
        }
        let program = command.get_program().to_string_lossy().into_owned();
        let mut child = command
            .args(["agent", "-c"])
            .arg(config)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {program}: {e}"));
        // "patina agent: API on http://A, gossip on G, site S"
        let mut line = String::new();
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        while !line.starts_with("patina agent:") {
            line.clear();
            let read = stdout.read_line(&mut line).unwrap_or(0);
            assert!(read > 0, "the agent exited before announcing itself");
        }
        let field = |after: &str| -> SocketAddr {
            line.split(after)
                .nth(1)
                .and_then(|s| s.split(',').next())
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or_else(|| panic!("no address after {after:?} in {line:?}"))
        };
        let api = field("http://");
        let gossip = field("gossip on ");
        AgentProcess {
            child,
            api,
            gossip,
            dir: dir.to_path_buf(),
        }
    }
}
