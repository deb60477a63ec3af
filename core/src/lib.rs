//! patina-core: the sans-IO heart of Patina.
//!
//! Everything here is deterministic and free of I/O: no sockets, no SQLite, no clock, no global
//! randomness. The engine drives it with real I/O; the simulator and the model checker drive the
//! same code in memory.
//!
//! Modules:
//! - [`ids`]: newtypes for site ids, db versions, column versions, causal lengths, sequence numbers.
//! - [`value`]: SQLite values and their total order (the merge tie-break).
//! - [`pk`]: canonical packing of primary-key tuples into bytes.
//! - [`broadcast`]: Plumtree-style broadcast of changesets (eager push, lazy announce, graft, prune).
//! - [`change`]: changes and changesets, identified by (author site, author db_version).
//! - [`chunk`]: large changesets split by seq into parts that fit a message, and reassembled.
//! - [`merge`]: the merge rule ([`merge::decide`]) and the per-row clock it updates.
//! - [`mem`]: an in-memory replica over the merge rule (the model's and the tests' reference).
//! - [`protocol`]: one node's protocol decisions without storage (broadcast, sync scheduling,
//!   rejoin): what the engine's gossip task drives.
//! - [`node`]: a whole node without I/O: [`protocol`] over an in-memory store, what the
//!   simulator and the model checker run.
//! - [`versions`]: per-site bookkeeping of applied versions as compact range sets; needs, heads.
//! - [`wire`]: compact binary encoding of changesets and a bounded decoder for untrusted bytes.
//! - [`sync`]: anti-entropy sync: the state nodes exchange, what a peer owes, when to sync.
//! - [`validate`]: structural checks of a remote changeset before it reaches a store.

pub mod apply;
pub mod broadcast;
pub mod change;
pub mod chunk;
pub mod ids;
pub mod mem;
pub mod merge;
pub mod node;
pub mod pk;
pub mod protocol;
pub mod stats;
pub mod sync;
pub mod validate;
pub mod value;
pub mod versions;
pub mod wire;

pub use change::{Change, Changeset, ChangesetId, Column, PartId, SeqSpan};
pub use ids::{CausalLength, ColVersion, DbVersion, Seq, SiteId};
pub use merge::{
    decide, CellClock, Incoming, LocalRow, MergeDecision, MergeFaults, Origin, RowClock,
};
pub use pk::PackedPk;
pub use value::Value;
pub use versions::{Bookkeeping, RangeSet, SiteVersions};
