//! The agent's configuration: a TOML file whose every key has a built-in default, so a plain
//! `patina agent` starts a working single node in `./patina-data` with the API on 127.0.0.1.
//!
//! Unknown keys are refused (a typo must not be silently ignored) and every bounded knob is
//! checked; errors name the key.

pub use crate::logging::{LogConfig, LogFormat};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use patina_core::broadcast::BroadcastConfig;
use patina_core::node::NodeConfig;
use patina_core::protocol::ProtocolConfig;
use serde::Deserialize;

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key or a value of the wrong type (the message
    /// names the key and the line).
    #[error("config {path}: {message}")]
    Parse {
        /// The path.
        path: String,
        /// The parser's message.
        message: String,
    },
    /// A value is outside its bounds.
    #[error("config key {key}: {message}")]
    Invalid {
        /// The key, dotted.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Environment variables that override a config key start with this.
const ENV_PREFIX: &str = "PATINA_";

/// The process's environment as UTF-8 pairs; a variable that is not UTF-8 is none of ours.
pub fn environment() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect()
}

/// Sets the key a `PATINA_<TABLE>__<KEY>` variable names in `table`.
fn set_key(table: &mut toml::Table, name: &str, value: toml::Value) -> Result<(), ConfigError> {
    let bad = |message: String| ConfigError::Parse {
        path: format!("environment variable {name}"),
        message,
    };
    let path: Vec<String> = name[ENV_PREFIX.len()..]
        .split("__")
        .map(str::to_lowercase)
        .collect();
    if path.iter().any(String::is_empty) {
        return Err(bad(
            "expected PATINA_<TABLE>__<KEY>, e.g. PATINA_API__ADDR".into()
        ));
    }
    let (key, tables) = path.split_last().expect("split gives at least one part");
    let mut at = table;
    for part in tables {
        at = match at
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        {
            toml::Value::Table(t) => t,
            _ => return Err(bad(format!("{part} is a value, not a table"))),
        };
    }
    at.insert(key.clone(), value);
    Ok(())
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[db]`: where the data lives.
    pub db: DbConfig,
    /// `[api]`: the HTTP API.
    pub api: ApiConfig,
    /// `[admin]`: the local admin socket.
    pub admin: AdminConfig,
    /// `[gossip]`: membership and broadcast between nodes.
    pub gossip: GossipConfig,
    /// `[telemetry]`: metrics.
    pub telemetry: TelemetryConfig,
    /// `[subscriptions]`: SQL subscriptions.
    pub subscriptions: SubscriptionsConfig,
    /// `[log]`: the agent's log.
    pub log: LogConfig,
}

/// `[subscriptions]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubscriptionsConfig {
    /// Subscriptions this node keeps; more get 503. 1..=100,000.
    pub max_subscriptions: usize,
    /// Changes kept per subscription for resuming by change id. 1..=10,000,000.
    pub history_len: u64,
    /// Events buffered per subscriber before a slow one is cut off. 16..=1,000,000.
    pub subscriber_buffer: usize,
    /// Rows one subscription may hold, and one pass of its query may return; a subscription
    /// past it is refused (400) or, later, ended. 1..=100,000,000.
    pub rows_max: usize,
    /// Longest one pass of a subscription's query may run (the initial query, or the pass
    /// after a commit), in ms; past it the subscription is refused or ended, so no
    /// subscription holds the others up for longer. 10..=600,000.
    pub pass_timeout_ms: u64,
    /// A subscription nobody has listened to for this long is removed, in ms (clients resume
    /// within it by change id). 1,000..=604,800,000.
    pub idle_timeout_ms: u64,
}

impl Default for SubscriptionsConfig {
    fn default() -> Self {
        SubscriptionsConfig {
            max_subscriptions: 1000,
            history_len: 10_000,
            subscriber_buffer: 4096,
            rows_max: 100_000,
            pass_timeout_ms: 2_000,
            idle_timeout_ms: 300_000,
        }
    }
}

/// `[telemetry]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Where Prometheus metrics are served (`GET /metrics`); off when absent.
    pub prometheus_addr: Option<SocketAddr>,
}

/// `[gossip]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GossipConfig {
    /// Listen address (UDP, QUIC); `0.0.0.0:port` or `[::]:port` binds every interface.
    pub addr: SocketAddr,
    /// The address peers reach this node at, as `host:port` (a name is resolved once at
    /// start). Default: `addr`, or for a wildcard `addr` the local address on the route to the
    /// first bootstrap peer. Needed behind NAT or port mapping.
    pub external_addr: Option<String>,
    /// Nodes to join through, as `host:port` (IPs or DNS names; a name with several records
    /// stands for all of them). Resolved at start and again while no member is known; the
    /// members remembered from the last run are added.
    pub bootstrap: Vec<String>,
    /// Nodes of different clusters ignore each other.
    pub cluster_id: u16,
    /// No certificate checks. Needed explicitly unless the address is loopback.
    pub plaintext: bool,
    /// `[gossip.tls]`: certificates for mutual TLS.
    pub tls: Option<GossipTlsConfig>,
    /// Broadcast tick: how often "I have" batches leave and grafts are checked (ms). 1..=1000.
    pub tick_ms: u64,
    /// Eager peers of the optional Plumtree tree (its fan-out before pruning; 0: no tree, the
    /// kept links carry everything). 0..=32.
    pub eager_peers_max: usize,
    /// Lazy peers of the optional tree, each told about every changeset ("I have") so lost
    /// pushes are grafted; other members stay passive until an active peer fails. 0..=64.
    pub lazy_peers_max: usize,
    /// Kept links this node asks of the members with the lowest round-trip time (found by
    /// probes): every changeset floods a region within milliseconds. 0..=16.
    pub near_peers: usize,
    /// Kept links this node asks of members picked at random: the long links that take a
    /// changeset to every region in about one hop. 0..=16.
    pub far_peers: usize,
    /// Members this node sends its own changesets to directly: its kept links, then members
    /// picked at random among those it can reach without a handshake, at most one member in
    /// 16. In a large cluster this saves the spread a hop (0: the kept links only). 0..=256.
    pub origin_fanout: usize,
    /// Time between round-trip probes during the first round, over `probe_sample` members (ms;
    /// 100 times longer afterwards; 0: no probes, so no near links). 0..=60,000.
    pub probe_interval_ms: u64,
    /// Members measured by the first round of probes, among which the near peers are chosen
    /// (later rounds add one at a time). 1..=1,024.
    pub probe_sample: usize,
    /// Wait for an announced changeset before asking for it (ms). 1..=60,000.
    pub graft_timeout_ms: u64,
    /// Messages queued per peer before the oldest is dropped. 16..=1,000,000.
    pub send_queue_len_max: usize,
    /// Largest message accepted from a peer (bytes). 64 KiB..=256 MiB.
    pub message_bytes_max: usize,
    /// Changesets larger than this travel in parts of about this size, in broadcast and sync
    /// (bytes). 1 KiB..=message_bytes_max / 2.
    pub part_bytes: usize,
    /// Bytes per second this node may send to peers, all together. 64 KiB..=10 GiB.
    pub send_bytes_per_sec_max: u64,
    /// Messages being written to peers at once. 1..=65,536.
    pub send_in_flight_max: usize,
    /// Anti-entropy: time between sync rounds with one peer (ms, plus up to 25% jitter). 10..=600,000.
    pub sync_interval_ms: u64,
    /// Anti-entropy: most changesets one sync session carries. 1..=1,000,000.
    pub sync_versions_max: u64,
    /// Anti-entropy: sessions this node serves at once. 1..=256.
    pub sync_sessions_max: usize,
    /// Anti-entropy: longest a session is served, whatever the peer reads (ms). A peer of
    /// this release gives up on a session after 27 s; one that reads each frame just within
    /// the 10 s step timeout would otherwise keep one of the few serving slots as long as it
    /// liked. 1,000..=3,600,000.
    pub sync_serve_ms_max: u64,
    /// SWIM: time between two probes of a member (ms). Each probe goes to the next member in
    /// a shuffled round, so it usually needs a new QUIC connection (a handshake, about 1.5 ms
    /// of CPU for both ends): many agents on one machine (loadgen) need a longer period.
    /// Failure detection takes a few periods. 100..=60,000.
    pub swim_probe_period_ms: u64,
    /// SWIM: member identities held at most, alive and down. Beyond, members new to this
    /// node are refused (counted in `patina_member_updates_refused`), so a faulty or hostile
    /// member cannot grow every node's member list without bound. 2..=1,000,000.
    pub members_max: usize,
    /// QUIC connections pooled at most; the least recently active are closed beyond.
    /// 4..=65,536.
    pub connections_max: usize,
    /// A pooled connection with no traffic either way for this long is closed, and opened
    /// again when needed (ms). 1,000..=3,600,000.
    pub connection_idle_ms: u64,
    /// Datagrams (broadcast changesets, SWIM packets) to peers that offer it travel sealed
    /// with keys exported from the peer's QUIC connection, beside QUIC instead of in it: no
    /// acknowledgement per datagram, about half the packets of a write. Off, every datagram
    /// is a QUIC datagram (as before, and as with a peer that does not offer it).
    pub sealed_datagrams: bool,
    /// How long the sealed keys of a connection closed for idleness are kept, so that
    /// datagrams to that peer (SWIM probes, mostly) go sealed without a new handshake (ms from
    /// the connection's handshake; 0: not kept). 0..=86,400,000.
    pub sealed_kept_max_age_ms: u64,
    /// Before a sync round, ask the partner for a hash of the versions it holds, and end the
    /// round there when it equals this node's (two datagrams instead of a session); answer
    /// other nodes' checks. Off, every round is a session and checks go unanswered (as with a
    /// node of an earlier release).
    pub sync_check: bool,
}

/// How long a sync round waits for its partner's answer to the check before it opens the
/// session anyway: a few round trips across the world, and far within the protocol's session
/// timeout (`sync_timeout_ms`, 30 s), which the session that follows still has to fit in.
pub const SYNC_CHECK_WAIT_MS: u64 = 1_000;

impl Default for GossipConfig {
    fn default() -> Self {
        // The protocol's defaults are core's, written once there (the simulator and the model
        // start from the same ones).
        let protocol = ProtocolConfig::default();
        let broadcast = protocol.broadcast;
        let node = NodeConfig::default();
        GossipConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 8787)),
            external_addr: None,
            bootstrap: Vec::new(),
            cluster_id: 0,
            plaintext: false,
            tls: None,
            tick_ms: 10,
            eager_peers_max: broadcast.eager_peers_max,
            lazy_peers_max: broadcast.lazy_peers_max,
            graft_timeout_ms: broadcast.graft_timeout_ms,
            near_peers: broadcast.near_peers,
            far_peers: broadcast.far_peers,
            origin_fanout: broadcast.origin_fanout,
            probe_interval_ms: broadcast.probe_interval_ms,
            probe_sample: broadcast.probe_sample,
            send_queue_len_max: 4096,
            message_bytes_max: 16 * 1024 * 1024,
            part_bytes: broadcast.part_bytes,
            send_bytes_per_sec_max: 16 * 1024 * 1024,
            send_in_flight_max: 256,
            sync_interval_ms: protocol.sync_interval_ms.unwrap_or(500),
            sync_versions_max: node.sync_versions_max,
            sync_sessions_max: 4,
            sync_serve_ms_max: 60_000,
            swim_probe_period_ms: 1_000,
            members_max: crate::net::membership::MEMBERS_MAX_DEFAULT,
            connections_max: 128,
            connection_idle_ms: 20_000,
            sealed_datagrams: true,
            sealed_kept_max_age_ms: 3_600_000,
            sync_check: true,
        }
    }
}

impl GossipConfig {
    /// The protocol state machine's settings: core's defaults with this section's values.
    pub fn protocol(&self) -> ProtocolConfig {
        let defaults = ProtocolConfig::default();
        ProtocolConfig {
            broadcast: BroadcastConfig {
                eager_peers_max: self.eager_peers_max,
                lazy_peers_max: self.lazy_peers_max,
                graft_timeout_ms: self.graft_timeout_ms,
                near_peers: self.near_peers,
                far_peers: self.far_peers,
                origin_fanout: self.origin_fanout,
                probe_interval_ms: self.probe_interval_ms,
                probe_sample: self.probe_sample,
                part_bytes: self.part_bytes,
                ..defaults.broadcast
            },
            sync_interval_ms: Some(self.sync_interval_ms),
            sync_check_wait_ms: self.sync_check.then_some(SYNC_CHECK_WAIT_MS),
            ..defaults
        }
    }
}

/// `[gossip.tls]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GossipTlsConfig {
    /// This node's certificate (PEM), signed by the cluster CA.
    pub cert_file: PathBuf,
    /// Its private key (PEM).
    pub key_file: PathBuf,
    /// The cluster CA certificate (PEM).
    pub ca_file: PathBuf,
    /// The DNS name every node's certificate carries, checked instead of the peer's IP: lets
    /// one node certificate serve every node (a Kubernetes Secret, a Compose volume) where
    /// addresses are not known in advance. Default: the peer's IP must be in its certificate.
    pub server_name: Option<String>,
}

/// `[db]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DbConfig {
    /// Database file.
    pub path: PathBuf,
    /// Schema files or folders of `.sql` files.
    pub schema_paths: Vec<PathBuf>,
    /// Cap on the database file and its write-ahead log together, bytes (a quarter for the
    /// WAL); writes past it fail cleanly. None: no cap.
    pub max_db_bytes: Option<u64>,
    /// Largest local transaction, as its encoded changeset (bytes); larger ones are refused.
    /// 64 KiB..=1 GiB.
    pub transaction_bytes_max: usize,
    /// Bytes of parts of incomplete remote changesets kept at once. 1 MiB..=16 GiB.
    pub parts_bytes_max: u64,
    /// Memory SQLite may allocate in the whole `patina agent` process (every connection's
    /// caches, and what statements build); past it an allocation fails and its statement
    /// with it ("out of memory"), so no query of many large values can take the host's
    /// memory. Set by the agent command only (in-process agents share their host's process).
    /// 0: no limit. 0 or 16 MiB..=1 TiB.
    pub sqlite_memory_max: u64,
}

impl Default for DbConfig {
    fn default() -> Self {
        DbConfig {
            path: PathBuf::from("patina-data/state.db"),
            schema_paths: vec![PathBuf::from("patina-data/schema")],
            max_db_bytes: None,
            transaction_bytes_max: 64 * 1024 * 1024,
            parts_bytes_max: 256 * 1024 * 1024,
            sqlite_memory_max: 1 << 30,
        }
    }
}

/// `[api]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Listen address of the HTTP API.
    pub addr: SocketAddr,
    /// `[api.authz]`.
    pub authz: AuthzConfig,
    /// Requests handled at once; more get 503. 1..=65536.
    pub concurrency_limit: usize,
    /// Largest request body, in bytes; larger get 413. 1 KiB..=1 GiB.
    pub body_bytes_max: usize,
    /// Transactions waiting for the store; more get 503. 1..=1,000,000.
    pub store_queue_len: usize,
    /// Read-only SQLite connections kept for queries. 1..=256.
    pub query_connections: usize,
    /// Deadline of a request's statements, in ms: a statement still running then is stopped
    /// (and its transaction rolled back). A request's `?timeout=` may shorten it, not lengthen
    /// it. 10..=3,600,000.
    pub statement_timeout_ms: u64,
    /// Open connections to the API; more are closed at once (also capped at half the
    /// process's open-file limit). 1..=1,000,000.
    pub connections_max: usize,
    /// A connection with no request in flight and no traffic for this long is closed, in ms;
    /// so is one whose client has taken none of an answer for this long. 100..=3,600,000.
    pub idle_timeout_ms: u64,
    /// An HTTP/1.1 request head, once begun, must be complete within this, in ms; else the
    /// connection is closed. 100..=3,600,000; at most `idle_timeout_ms` in effect (that timer
    /// also runs while a head is awaited). A request's body (HTTP/1.1 and HTTP/2) must then
    /// have arrived whole within as long again, plus a second per 64 KiB received; else the
    /// answer is 408.
    pub header_timeout_ms: u64,
    /// Open streams (subscriptions, `/v1/updates`); more get 503. They do not count against
    /// `concurrency_limit`. 1..=1,000,000.
    pub streams_max: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            authz: AuthzConfig::default(),
            concurrency_limit: 256,
            body_bytes_max: 8 * 1024 * 1024,
            store_queue_len: 1024,
            query_connections: 4,
            statement_timeout_ms: 10_000,
            connections_max: 4096,
            idle_timeout_ms: 60_000,
            header_timeout_ms: 10_000,
            streams_max: 1024,
        }
    }
}

/// `[api.authz]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthzConfig {
    /// When set, every API request needs `Authorization: Bearer <token>`.
    pub bearer_token: Option<String>,
}

/// `[admin]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Unix socket of the admin API (`patina reload`).
    pub path: PathBuf,
    /// Longest an online backup (`patina backup`) may run before it is stopped and its partial
    /// file removed (ms): its read snapshot keeps the WAL from being reset, so a copy that
    /// went on would let the WAL grow until `db.max_db_bytes` refused writes. (Checked
    /// between the copy's steps: a write that hangs in the disk is not interrupted.)
    /// 1,000..=86,400,000.
    pub backup_timeout_ms: u64,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            path: PathBuf::from("patina-data/admin.sock"),
            backup_timeout_ms: 3_600_000,
        }
    }
}

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// The configuration a node runs with, as containers give it: the file at `path` (none:
    /// the defaults), then every `PATINA_<TABLE>__<KEY>` variable of `env` over it, e.g.
    /// `PATINA_API__ADDR=0.0.0.0:8080` or `PATINA_GOSSIP__BOOTSTRAP='["a:8787"]'` (a value
    /// is read as TOML: numbers, booleans, arrays; anything else as a string). Errors name the
    /// variable or the key.
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let (text, origin) = match path {
            Some(path) => (
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?,
                path.display().to_string(),
            ),
            None => (String::new(), "built-in defaults".to_owned()),
        };
        let mut table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: origin.clone(),
            message: e.to_string(),
        })?;
        // Only PATINA_<TABLE>__<KEY> names are keys: an orchestrator's PATINA_PORT or a
        // script's PATINA_CLUSTER_DIR is none of ours.
        let mut overrides: Vec<(String, String)> = env
            .into_iter()
            .filter(|(name, _)| {
                name.strip_prefix(ENV_PREFIX)
                    .is_some_and(|key| key.contains("__"))
            })
            .collect();
        overrides.sort();
        // A value is read as TOML (numbers, booleans, arrays) where the key wants that, and kept
        // as a string otherwise: a token of digits stays a token.
        let mut typed = Vec::with_capacity(overrides.len());
        for (name, raw) in &overrides {
            let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .filter(|v| !v.is_str());
            set_key(
                &mut table,
                name,
                value.clone().unwrap_or_else(|| raw.clone().into()),
            )?;
            typed.push(value);
        }
        let fits = |table: &toml::Table| {
            toml::Value::Table(table.clone())
                .try_into::<Config>()
                .is_ok()
        };
        if !fits(&table) {
            for ((name, raw), value) in overrides.iter().zip(&typed) {
                if value.is_some() {
                    set_key(&mut table, name, raw.clone().into())?;
                    if !fits(&table) {
                        set_key(&mut table, name, value.clone().expect("checked"))?;
                    }
                }
            }
        }
        let origin = if overrides.is_empty() {
            origin
        } else {
            let names: Vec<&str> = overrides.iter().map(|(n, _)| n.as_str()).collect();
            format!("{origin} with {}", names.join(", "))
        };
        let config: Config =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: origin,
                    message: e.to_string(),
                })?;
        config.check()?;
        Ok(config)
    }

    /// Parses and checks TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        config.check()?;
        Ok(config)
    }

    /// Checks every bound.
    pub fn check(&self) -> Result<(), ConfigError> {
        fn within(key: &'static str, v: usize, lo: usize, hi: usize) -> Result<(), ConfigError> {
            if v < lo || v > hi {
                return Err(ConfigError::Invalid {
                    key,
                    message: format!("{v} is outside {lo}..={hi}"),
                });
            }
            Ok(())
        }
        within(
            "api.concurrency_limit",
            self.api.concurrency_limit,
            1,
            65_536,
        )?;
        within("api.body_bytes_max", self.api.body_bytes_max, 1024, 1 << 30)?;
        within(
            "api.store_queue_len",
            self.api.store_queue_len,
            1,
            1_000_000,
        )?;
        within("api.query_connections", self.api.query_connections, 1, 256)?;
        within(
            "api.statement_timeout_ms",
            self.api.statement_timeout_ms as usize,
            10,
            3_600_000,
        )?;
        within(
            "api.connections_max",
            self.api.connections_max,
            1,
            1_000_000,
        )?;
        within(
            "api.idle_timeout_ms",
            self.api.idle_timeout_ms as usize,
            100,
            3_600_000,
        )?;
        within(
            "api.header_timeout_ms",
            self.api.header_timeout_ms as usize,
            100,
            3_600_000,
        )?;
        within("api.streams_max", self.api.streams_max, 1, 1_000_000)?;
        within("gossip.tick_ms", self.gossip.tick_ms as usize, 1, 1000)?;
        within("gossip.eager_peers_max", self.gossip.eager_peers_max, 0, 32)?;
        within("gossip.lazy_peers_max", self.gossip.lazy_peers_max, 0, 64)?;
        within("gossip.near_peers", self.gossip.near_peers, 0, 16)?;
        within("gossip.far_peers", self.gossip.far_peers, 0, 16)?;
        within(
            "gossip.probe_interval_ms",
            self.gossip.probe_interval_ms as usize,
            0,
            60_000,
        )?;
        within(
            "gossip.graft_timeout_ms",
            self.gossip.graft_timeout_ms as usize,
            1,
            60_000,
        )?;
        within(
            "gossip.send_queue_len_max",
            self.gossip.send_queue_len_max,
            16,
            1_000_000,
        )?;
        within(
            "gossip.message_bytes_max",
            self.gossip.message_bytes_max,
            64 * 1024,
            256 << 20,
        )?;
        within(
            "subscriptions.max_subscriptions",
            self.subscriptions.max_subscriptions,
            1,
            100_000,
        )?;
        within(
            "subscriptions.history_len",
            self.subscriptions.history_len as usize,
            1,
            10_000_000,
        )?;
        within(
            "subscriptions.rows_max",
            self.subscriptions.rows_max,
            1,
            100_000_000,
        )?;
        within(
            "subscriptions.pass_timeout_ms",
            self.subscriptions.pass_timeout_ms as usize,
            10,
            600_000,
        )?;
        // A new subscription's first pass may take its whole budget, and the subscribe
        // request waits for it at most the statement timeout: longer, every costly one 503s.
        if self.subscriptions.pass_timeout_ms > self.api.statement_timeout_ms {
            return Err(ConfigError::Invalid {
                key: "subscriptions.pass_timeout_ms",
                message: format!(
                    "{} is over api.statement_timeout_ms ({}), which a subscribe request waits for its first rows at most",
                    self.subscriptions.pass_timeout_ms, self.api.statement_timeout_ms
                ),
            });
        }
        within(
            "subscriptions.idle_timeout_ms",
            self.subscriptions.idle_timeout_ms as usize,
            1_000,
            604_800_000,
        )?;
        within(
            "subscriptions.subscriber_buffer",
            self.subscriptions.subscriber_buffer,
            16,
            1_000_000,
        )?;
        within(
            "gossip.part_bytes",
            self.gossip.part_bytes,
            1024,
            self.gossip.message_bytes_max / 2,
        )?;
        within(
            "db.transaction_bytes_max",
            self.db.transaction_bytes_max,
            64 * 1024,
            1 << 30,
        )?;
        if self.db.sqlite_memory_max != 0 {
            within(
                "db.sqlite_memory_max",
                self.db.sqlite_memory_max as usize,
                16 << 20,
                1 << 40,
            )?;
        }
        within(
            "db.parts_bytes_max",
            self.db.parts_bytes_max as usize,
            1 << 20,
            16 << 30,
        )?;
        within(
            "gossip.send_bytes_per_sec_max",
            self.gossip.send_bytes_per_sec_max as usize,
            64 * 1024,
            10 << 30,
        )?;
        within(
            "gossip.send_in_flight_max",
            self.gossip.send_in_flight_max,
            1,
            65_536,
        )?;
        within(
            "gossip.sync_interval_ms",
            self.gossip.sync_interval_ms as usize,
            10,
            600_000,
        )?;
        within(
            "gossip.sync_versions_max",
            self.gossip.sync_versions_max as usize,
            1,
            1_000_000,
        )?;
        within(
            "gossip.sync_sessions_max",
            self.gossip.sync_sessions_max,
            1,
            256,
        )?;
        within(
            "gossip.sync_serve_ms_max",
            self.gossip.sync_serve_ms_max as usize,
            1_000,
            3_600_000,
        )?;
        within("gossip.probe_sample", self.gossip.probe_sample, 1, 1_024)?;
        within("gossip.origin_fanout", self.gossip.origin_fanout, 0, 256)?;
        within("gossip.members_max", self.gossip.members_max, 2, 1_000_000)?;
        within(
            "admin.backup_timeout_ms",
            self.admin.backup_timeout_ms as usize,
            1_000,
            86_400_000,
        )?;
        within(
            "gossip.swim_probe_period_ms",
            self.gossip.swim_probe_period_ms as usize,
            100,
            60_000,
        )?;
        within(
            "gossip.connections_max",
            self.gossip.connections_max,
            4,
            65_536,
        )?;
        within(
            "gossip.connection_idle_ms",
            self.gossip.connection_idle_ms as usize,
            1_000,
            3_600_000,
        )?;
        within(
            "gossip.sealed_kept_max_age_ms",
            self.gossip.sealed_kept_max_age_ms as usize,
            0,
            86_400_000,
        )?;
        crate::logging::parse_filter(&self.log.filter).map_err(|message| ConfigError::Invalid {
            key: "log.filter",
            message,
        })?;
        if let Some(external) = &self.gossip.external_addr {
            crate::net::addrs::HostPort::parse(external).map_err(|message| {
                ConfigError::Invalid {
                    key: "gossip.external_addr",
                    message,
                }
            })?;
        }
        for entry in &self.gossip.bootstrap {
            crate::net::addrs::HostPort::parse(entry).map_err(|message| ConfigError::Invalid {
                key: "gossip.bootstrap",
                message,
            })?;
        }
        if let Some(name) = self
            .gossip
            .tls
            .as_ref()
            .and_then(|t| t.server_name.as_ref())
        {
            if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
                return Err(ConfigError::Invalid {
                    key: "gossip.tls.server_name",
                    message: format!("{name:?} is not a DNS name"),
                });
            }
        }
        if self.gossip.plaintext && self.gossip.tls.is_some() {
            return Err(ConfigError::Invalid {
                key: "gossip.plaintext",
                message: "plaintext and [gossip.tls] exclude each other".into(),
            });
        }
        if !self.gossip.plaintext
            && self.gossip.tls.is_none()
            && !self.gossip.addr.ip().is_loopback()
        {
            return Err(ConfigError::Invalid {
                key: "gossip.tls",
                message: format!(
                    "gossip.addr {} is not loopback: give [gossip.tls] cert_file, key_file, ca_file \
                     (patina tls ...), or set gossip.plaintext = true",
                    self.gossip.addr
                ),
            });
        }
        if self.api.authz.bearer_token.as_deref() == Some("") {
            return Err(ConfigError::Invalid {
                key: "api.authz.bearer_token",
                message: "empty token; leave the key out to disable authorization".into(),
            });
        }
        if let Some(bytes) = self.db.max_db_bytes {
            if bytes < 64 * 1024 {
                return Err(ConfigError::Invalid {
                    key: "db.max_db_bytes",
                    message: format!("{bytes} is below the minimum of 65536"),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// A subscription's pass may not be allowed longer than a subscribe request waits for
    /// its first rows: every costly subscription would answer 503.
    #[test]
    fn a_pass_longer_than_the_statement_timeout_is_refused() {
        let mut config = Config::default();
        config.check().unwrap();
        config.subscriptions.pass_timeout_ms = config.api.statement_timeout_ms + 1;
        let err = config.check().unwrap_err().to_string();
        assert!(err.contains("subscriptions.pass_timeout_ms"), "{err}");
        config.api.statement_timeout_ms = config.subscriptions.pass_timeout_ms;
        config.check().unwrap();
    }

    #[test]
    fn environment_variables_override_keys() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "[api]\naddr = \"127.0.0.1:9000\"\nconcurrency_limit = 7\n",
        )
        .unwrap();
        let c = Config::load_with_env(
            Some(&file),
            env(&[
                ("PATINA_API__ADDR", "127.0.0.1:9100"),
                ("PATINA_API__AUTHZ__BEARER_TOKEN", "s3cret"),
                (
                    "PATINA_GOSSIP__BOOTSTRAP",
                    "[\"127.0.0.1:1\", \"127.0.0.1:2\"]",
                ),
                ("PATINA_SUBSCRIPTIONS__ROWS_MAX", "5"),
                ("PATINA_DB__PATH", "/data/state.db"),
                ("PATINA_TOKEN", "not a key"),
                ("PATINA_PORT", "tcp://10.0.0.1:8080"),
                ("PATINA_CLUSTER_DIR", "/tmp/x"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(c.api.addr, SocketAddr::from(([127, 0, 0, 1], 9100)));
        assert_eq!(c.api.concurrency_limit, 7, "the file's other keys stay");
        assert_eq!(c.api.authz.bearer_token.as_deref(), Some("s3cret"));
        assert_eq!(c.db.path, PathBuf::from("/data/state.db"));
        // A value that reads as a number stays a string where the key wants one.
        let digits = Config::load_with_env(
            None,
            env(&[("PATINA_API__AUTHZ__BEARER_TOKEN", "12345678")]),
        )
        .unwrap();
        assert_eq!(digits.api.authz.bearer_token.as_deref(), Some("12345678"));
        assert_eq!(c.gossip.bootstrap.len(), 2);
        assert_eq!(c.subscriptions.rows_max, 5);
        // No file: the defaults, overridden.
        let c = Config::load_with_env(None, env(&[("PATINA_API__STREAMS_MAX", "9")])).unwrap();
        assert_eq!(c.api.streams_max, 9);
        // Errors name the variable.
        for (name, value, named) in [
            ("PATINA_API__ADRESS", "x", "PATINA_API__ADRESS"),
            ("PATINA_API__ADDR", "not an address", "PATINA_API__ADDR"),
            (
                "PATINA_API__CONCURRENCY_LIMIT",
                "0",
                "api.concurrency_limit",
            ),
            ("PATINA_API__", "1", "PATINA_API__"),
        ] {
            let e = Config::load_with_env(None, env(&[(name, value)]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(named), "{name}: {e}");
        }
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("", "test").unwrap();
        assert_eq!(c.api.addr, SocketAddr::from(([127, 0, 0, 1], 8080)));
        assert_eq!(c.db.path, PathBuf::from("patina-data/state.db"));
    }

    #[test]
    fn keys_are_read() {
        let c = Config::parse(
            "[db]\npath = \"/tmp/x.db\"\nschema_paths = [\"a.sql\"]\n[api]\naddr = \"127.0.0.1:9000\"\n[api.authz]\nbearer_token = \"t\"\n",
            "test",
        )
        .unwrap();
        assert_eq!(c.db.schema_paths, vec![PathBuf::from("a.sql")]);
        assert_eq!(c.api.authz.bearer_token.as_deref(), Some("t"));
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::parse("[api]\nadress = \"x\"\n", "test")
            .unwrap_err()
            .to_string();
        assert!(e.contains("adress"), "{e}");
        let e = Config::parse("[api]\naddr = 5\n", "test")
            .unwrap_err()
            .to_string();
        assert!(e.contains("addr"), "{e}");
        let e = Config::parse("[api]\nconcurrency_limit = 0\n", "test")
            .unwrap_err()
            .to_string();
        assert!(e.contains("api.concurrency_limit"), "{e}");
        let e = Config::parse("[dbb]\n", "test").unwrap_err().to_string();
        assert!(e.contains("dbb"), "{e}");
        let e = Config::parse("[gossip]\naddr = \"10.0.0.1:8787\"\n", "test")
            .unwrap_err()
            .to_string();
        assert!(e.contains("gossip.tls"), "{e}");
        let e = Config::parse("[gossip]\nplaintext = true\n[gossip.tls]\ncert_file = \"a\"\nkey_file = \"b\"\nca_file = \"c\"\n", "test")
            .unwrap_err()
            .to_string();
        assert!(e.contains("gossip.plaintext"), "{e}");
        assert!(Config::parse(
            "[gossip]\naddr = \"10.0.0.1:8787\"\nplaintext = true\n",
            "test"
        )
        .is_ok());
        for (key, bad) in [
            ("bootstrap", "[\"node1\"]"),
            ("bootstrap", "[\"node 1:8787\"]"),
            ("external_addr", "\"10.0.0.1\""),
        ] {
            let e = Config::parse(&format!("[gossip]\n{key} = {bad}\n"), "test")
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("gossip.{key}")), "{e}");
        }
        let c = Config::parse(
            "[gossip]\naddr = \"0.0.0.0:8787\"\nexternal_addr = \"node1:8787\"\n\
             bootstrap = [\"node1:8787\", \"[fd00::2]:8787\", \"10.0.0.3:8787\"]\n\
             [gossip.tls]\ncert_file = \"a\"\nkey_file = \"b\"\nca_file = \"c\"\nserver_name = \"patina\"\n",
            "test",
        )
        .unwrap();
        assert_eq!(c.gossip.bootstrap.len(), 3);
        assert_eq!(
            c.gossip.tls.and_then(|t| t.server_name).as_deref(),
            Some("patina")
        );
        for (key, bad) in [
            ("swim_probe_period_ms", "50"),
            ("connections_max", "2"),
            ("connection_idle_ms", "10"),
            ("probe_sample", "0"),
            ("origin_fanout", "257"),
        ] {
            let e = Config::parse(&format!("[gossip]\n{key} = {bad}\n"), "test")
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("gossip.{key}")), "{e}");
        }
        let config = Config::parse(
            "[gossip]\nswim_probe_period_ms = 5000\nconnections_max = 32\nconnection_idle_ms = 60000\nprobe_sample = 64\norigin_fanout = 0\n",
            "test",
        )
        .unwrap();
        assert_eq!(
            (
                config.gossip.swim_probe_period_ms,
                config.gossip.connections_max,
                config.gossip.connection_idle_ms,
                config.gossip.probe_sample,
                config.gossip.origin_fanout,
            ),
            (5_000, 32, 60_000, 64, 0)
        );
    }
}
