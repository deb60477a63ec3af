//! Newtypes for the numbers of the protocol, so a site's db_version is never mixed up with a
//! column version or a causal length.

use std::fmt;

/// Length in bytes of a [`SiteId`].
pub const SITE_ID_LEN: usize = 16;

/// Identity of one replica: 16 random bytes chosen when its database is created, never changed.
/// Ordered bytewise; the order is the last tie-break of the merge rule.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SiteId(pub [u8; SITE_ID_LEN]);

impl SiteId {
    /// Parses a site id from exactly 16 bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, InvalidSiteId> {
        let arr: [u8; SITE_ID_LEN] = bytes
            .try_into()
            .map_err(|_| InvalidSiteId { len: bytes.len() })?;
        Ok(SiteId(arr))
    }

    /// Lower-case hex, 32 characters (the form Corrosion's API calls `actor_id`).
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(SITE_ID_LEN * 2);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// Parses the 32-character hex form.
    pub fn from_hex(hex: &str) -> Result<Self, InvalidSiteId> {
        let invalid = InvalidSiteId { len: hex.len() / 2 };
        if hex.len() != SITE_ID_LEN * 2 || !hex.is_ascii() {
            return Err(invalid);
        }
        let mut out = [0u8; SITE_ID_LEN];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| invalid.clone())?;
        }
        Ok(SiteId(out))
    }
}

impl fmt::Debug for SiteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The first 4 bytes are enough to tell sites apart in logs and test failures.
        write!(f, "SiteId({})", &self.to_hex()[..8])
    }
}

impl fmt::Display for SiteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A site id that is not 16 bytes (or not 32 hex digits).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("site id must be {SITE_ID_LEN} bytes, got {len}")]
pub struct InvalidSiteId {
    /// The length that was given, in bytes.
    pub len: usize,
}

macro_rules! number_newtype {
    ($(#[$doc:meta])* $name:ident($inner:ty)) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub $inner);

        impl $name {
            /// The raw number.
            pub const fn get(self) -> $inner {
                self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

number_newtype!(
    /// A site's transaction counter. Each local write transaction takes the next one; together
    /// with the author's [`SiteId`] it names a changeset across the whole cluster.
    DbVersion(u64)
);
number_newtype!(
    /// Per-cell write counter: every local write of a column bumps it by one.
    ColVersion(u64)
);
number_newtype!(
    /// Causal length of a row: odd means the row exists, even means deleted, 0 means never seen.
    CausalLength(u64)
);
number_newtype!(
    /// Position of a change inside its changeset, from 0.
    Seq(u32)
);

impl DbVersion {
    /// The version after this one.
    pub fn next(self) -> DbVersion {
        DbVersion(self.0 + 1)
    }
}

impl CausalLength {
    /// Odd causal lengths mean the row exists.
    pub fn is_live(self) -> bool {
        self.0 % 2 == 1
    }

    /// The causal length a local insert gives a row that currently has this one: 1 for a new
    /// row, +1 to revive a tombstone, +2 to replace a live row (delete then insert).
    pub fn after_local_insert(self) -> CausalLength {
        match self.0 {
            0 => CausalLength(1),
            n if n % 2 == 0 => CausalLength(n + 1),
            n => CausalLength(n + 2),
        }
    }

    /// The causal length a local delete gives a live row.
    pub fn after_local_delete(self) -> CausalLength {
        if self.is_live() {
            CausalLength(self.0 + 1)
        } else {
            // Deleting a row we only know as a tombstone (or not at all) keeps it deleted; the
            // caller never writes a clock for it.
            self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_id_hex_round_trip() {
        let site = SiteId([0xab; 16]);
        assert_eq!(SiteId::from_hex(&site.to_hex()).unwrap(), site);
        assert!(SiteId::from_hex("abc").is_err());
        assert!(SiteId::from_hex(&"zz".repeat(16)).is_err());
        assert_eq!(SiteId::from_slice(&[1; 15]), Err(InvalidSiteId { len: 15 }));
    }

    #[test]
    fn causal_length_transitions() {
        assert_eq!(CausalLength(0).after_local_insert(), CausalLength(1));
        assert_eq!(CausalLength(2).after_local_insert(), CausalLength(3));
        assert_eq!(CausalLength(3).after_local_insert(), CausalLength(5));
        assert_eq!(CausalLength(1).after_local_delete(), CausalLength(2));
        assert_eq!(CausalLength(2).after_local_delete(), CausalLength(2));
    }
}
