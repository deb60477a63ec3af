//! patina: the Patina node.
//!
//! Modules:
//! - [`store`]: the CRDT store over SQLite, the only code that opens a database. Local
//!   transactions with change capture, remote changeset apply through core's merge rule,
//!   changeset extraction, read-only queries, schema files.
//! - [`subs`]: SQL subscriptions (planning, the manager thread, the query threads).
//! - [`net`]: between nodes: `addrs` (host:port entries, the advertised address), `transport`
//!   (QUIC with mutual TLS, pooled connections, bounded per-peer send queues), `tls`,
//!   `membership` (SWIM through foca), `gossip` (the task that drives membership, the
//!   broadcast core and the transport), `sync` (anti-entropy sessions).
//! - [`http`]: the API (Corrosion-compatible v1) and admin routes, serving, the request and
//!   answer shapes, the CLI's client.
//! - [`agent`]: the running node: starts and wires the parts above.
//! - [`config`]: the agent's TOML configuration, with built-in defaults.
//! - [`logging`]: the log subscriber (text or JSON) and its filter, changeable while running.
//! - [`metrics`]: the node's Prometheus metrics (histograms, store counters, process).
//! - [`cli`]: the `patina` command line.
//!
//! The protocol itself (merge rule, changesets, version bookkeeping, wire format) lives in
//! `patina-core`; this crate only does I/O around it.

pub mod agent;
pub mod cli;
pub mod config;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod store;
pub mod subs;

#[cfg(test)]
mod layout_tests;
