//! patina: the Patina node.
//!
//! Modules:
//! - [`store`]: the CRDT store over SQLite, the only code that opens a database. Local
//!   transactions with change capture, remote changeset apply through core's merge rule,
//!   changeset extraction, read-only queries, schema files.
//! - [`cli`]: the `patina` command line.
//!
//! The protocol itself (merge rule, changesets, version bookkeeping, wire format) lives in
//! `patina-core`; this crate only does I/O around it.

pub mod cli;
pub mod store;
