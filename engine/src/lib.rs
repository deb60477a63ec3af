//! patina: the Patina node.
//!
//! Modules:
//! - [`store`]: the CRDT store over SQLite, the only code that opens a database. Local
//!   transactions with change capture, remote changeset apply through core's merge rule,
//!   changeset extraction, read-only queries, schema files.
//! - [`addrs`]: `host:port` entries (IPs or DNS names), resolution, the advertised address.
//! - [`config`]: the agent's TOML configuration, with built-in defaults.
//! - [`agent`]: the running node: the store thread, the reader pool, the API and admin servers.
//! - [`api`]: the HTTP API (Corrosion-compatible v1) and the admin routes.
//! - [`client`]: a small HTTP client for the CLI (TCP or the admin unix socket).
//! - [`logging`]: the log subscriber (text or JSON) and its filter, changeable while running.
//! - [`membership`]: SWIM through foca: identities, timers, member events.
//! - [`gossip`]: the task that drives membership, the broadcast core and the transport.
//! - [`metrics`]: Prometheus text exposition of store and gossip counters.
//! - [`sync`]: anti-entropy sync sessions over QUIC bidirectional streams.
//! - [`tls`]: cluster CA and node certificates (rcgen), mutual-TLS settings (rustls).
//! - [`transport`]: QUIC endpoint (quinn): pooled connections, bounded per-peer send queues.
//! - [`cli`]: the `patina` command line.
//!
//! The protocol itself (merge rule, changesets, version bookkeeping, wire format) lives in
//! `patina-core`; this crate only does I/O around it.

pub mod addrs;
pub mod agent;
pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod gossip;
pub mod http;
pub mod logging;
pub mod membership;
pub mod metrics;
pub mod store;
pub mod subs;
pub mod sync;
pub mod tls;
pub mod transport;
