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

/// Writes `dir/config.toml` (everything under `dir`, [`crate::SCHEMA`], loopback ports chosen
/// by the OS, `extra` appended to the `[gossip]` table) and the schema file.
pub fn write_config(dir: &Path, bootstrap: &[SocketAddr], extra_gossip: &str) -> PathBuf {
    std::fs::create_dir_all(dir.join("schema")).expect("creating the data folder");
    std::fs::write(dir.join("schema/schema.sql"), crate::SCHEMA).expect("writing the schema");
    let bootstrap: Vec<String> = bootstrap.iter().map(|a| format!("\"{a}\"")).collect();
    let config = format!(
        "[db]\npath = \"{0}/state.db\"\nschema_paths = [\"{0}/schema\"]\n\
         [api]\naddr = \"127.0.0.1:0\"\n[admin]\npath = \"{0}/admin.sock\"\n\
         [gossip]\naddr = \"127.0.0.1:0\"\nbootstrap = [{1}]\n{2}\n",
        dir.display(),
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
        let config = write_config(dir, bootstrap, "sync_interval_ms = 200");
        AgentProcess::start_with_config(binary, dir, &config)
    }

    /// Starts the agent on an existing config file.
    pub fn start_with_config(binary: &Path, dir: &Path, config: &Path) -> AgentProcess {
        let mut child = Command::new(binary)
            .args(["agent", "-c"])
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
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
