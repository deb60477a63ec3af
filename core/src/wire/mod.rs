//! Compact binary encoding of changesets, and a decoder for untrusted bytes.
//!
//! Layout (format 1), integers as LEB128 varints unless noted:
//! ```text
//! format: u8 = 1 | site: 16 bytes | version | span: start, end, last (seqs; see SeqSpan)
//! n_tables, then per table: len, UTF-8 bytes
//! n_columns, then per column name: len, UTF-8 bytes
//! n_changes, then per change:
//!   table index | pk len, packed pk | column (0 = sentinel, i + 1 = column name i)
//!   value tag u8 (0 null, 1 integer, 2 real, 3 text, 4 blob) and payload
//!     (integer: zigzag varint; real: 8 bytes little-endian; text, blob: len, bytes)
//!   col_version | cl | seq
//! ```
//! Table and column names are written once per changeset, so a changeset of many rows of one
//! table costs a few bytes per cell beyond the values themselves.
//!
//! The decoder never panics and never allocates more than the input justifies: every length is
//! checked against the bytes that remain and against [`Limits`] before anything is allocated.

use std::collections::BTreeMap;

use crate::change::{Change, Changeset, ChangesetId, Column, CommitTime, PartId, SeqSpan};
use crate::ids::{CausalLength, ColVersion, DbVersion, Seq, SiteId, SITE_ID_LEN};
use crate::pk::{PackedPk, PkError};
use crate::value::Value;

mod changeset;
mod peer;
mod reader;
mod sync;

pub use changeset::*;
pub use peer::*;
use reader::Reader;
pub use sync::*;

/// The format of peer message frames and sync requests (unchanged since the first release, so
/// nodes of both releases keep their membership and sync sessions during a rolling upgrade).
pub const FORMAT_VERSION: u8 = 1;
/// The format of changesets this code writes: [`FORMAT_VERSION_WITHOUT_TIME`] plus the commit
/// time after the version.
pub const CHANGESET_FORMAT: u8 = 2;
/// The changeset format before changesets carried their commit time (still read: parts stored
/// by an older node, peers not yet upgraded).
pub const FORMAT_VERSION_WITHOUT_TIME: u8 = 1;

/// The largest single value (text or blob) or packed primary key a decoder accepts by
/// default, in bytes: every node decodes with it, so a local write must not make a larger one
/// (it would commit here and be refused by every peer).
pub const VALUE_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Bounds on what a decoder accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest encoded changeset, in bytes.
    pub changeset_bytes_max: usize,
    /// Most changes in one changeset.
    pub changes_max: usize,
    /// Largest single value (text or blob) or packed primary key, in bytes.
    pub value_bytes_max: usize,
    /// Longest table or column name, in bytes.
    pub name_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            changeset_bytes_max: 16 * 1024 * 1024,
            changes_max: 250_000,
            value_bytes_max: VALUE_BYTES_MAX,
            name_bytes_max: 1024,
        }
    }
}

/// Why bytes could not be decoded. Always the peer's fault (or corruption); nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ends in the middle of a field.
    #[error("truncated input: {0}")]
    Truncated(&'static str),
    /// A size is over its limit.
    #[error("{what} is {got}, over the limit of {limit}")]
    TooLarge {
        /// Which size.
        what: &'static str,
        /// The size found.
        got: u64,
        /// The limit.
        limit: u64,
    },
    /// Unknown format version byte.
    #[error("unknown changeset format {0}")]
    UnknownFormat(u8),
    /// A varint longer than 10 bytes or over u64.
    #[error("malformed varint")]
    Varint,
    /// A name or text value is not UTF-8.
    #[error("invalid UTF-8 in {0}")]
    InvalidUtf8(&'static str),
    /// Unknown value tag.
    #[error("unknown value tag {0}")]
    ValueTag(u8),
    /// A table or column index points past the name table.
    #[error("{0} index out of range")]
    Index(&'static str),
    /// A number does not fit its field.
    #[error("{0} out of range")]
    Range(&'static str),
    /// A malformed primary key.
    #[error("primary key: {0}")]
    Pk(#[from] PkError),
    /// Bytes left after the changeset.
    #[error("{0} trailing bytes")]
    Trailing(usize),
}
