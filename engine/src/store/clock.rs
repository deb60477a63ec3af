//! How row clocks and version sets are stored in SQLite.
//!
//! A row clock is one row of `__patina_rows`: the causal length as a column, the sentinel origin
//! and the cell clocks packed as varints in two blobs. Sites appear in blobs as small local
//! ordinals (`__patina_sites.ord`), columns as ordinals of `__patina_columns`; both are local to
//! this database and never travel.

use std::collections::BTreeMap;

use patina_core::ids::{CausalLength, ColVersion, DbVersion, Seq, SiteId};
use patina_core::merge::{CellClock, Origin, RowClock};
use patina_core::versions::RangeSet;
use patina_core::wire::{put_varint, take_varint};

use super::error::StoreError;

/// Local ordinal of a site; 0 is this replica.
pub type SiteOrd = u32;
/// Local ordinal of a column within its table.
pub type ColOrd = u32;

/// Two-way map between site ids and their local ordinals.
#[derive(Debug, Default, Clone)]
pub struct SiteTable {
    ids: Vec<SiteId>,
    ords: super::FastMap<SiteId, SiteOrd>,
}

impl SiteTable {
    /// Adds a site at the next ordinal (the caller persists it).
    pub fn push(&mut self, site: SiteId) -> SiteOrd {
        let ord = self.ids.len() as SiteOrd;
        self.ids.push(site);
        self.ords.insert(site, ord);
        ord
    }

    /// The ordinal of a known site.
    pub fn ord(&self, site: &SiteId) -> Option<SiteOrd> {
        // Ordinal 0 is this replica, the origin of every cell a local write encodes: a
        // comparison instead of a hash.
        if self.ids.first() == Some(site) {
            return Some(0);
        }
        self.ords.get(site).copied()
    }

    /// The site of an ordinal.
    pub fn site(&self, ord: SiteOrd) -> Result<SiteId, StoreError> {
        self.ids
            .get(ord as usize)
            .copied()
            .ok_or_else(|| StoreError::Corrupt(format!("unknown site ordinal {ord}")))
    }

    /// Number of sites.
    pub fn len(&self) -> usize {
        self.ids.len()
    }
}

fn put_origin(out: &mut Vec<u8>, origin: &Origin, sites: &SiteTable) {
    // Origins always name a site already registered by the caller.
    put_varint(out, u64::from(sites.ord(&origin.site).unwrap_or(u32::MAX)));
    put_varint(out, origin.version.get());
    put_varint(out, u64::from(origin.seq.get()));
}

fn take_origin(input: &mut &[u8], sites: &SiteTable) -> Result<Origin, StoreError> {
    let corrupt = || StoreError::Corrupt("truncated clock blob".into());
    let ord = take_varint(input).ok_or_else(corrupt)?;
    let version = take_varint(input).ok_or_else(corrupt)?;
    let seq = take_varint(input).ok_or_else(corrupt)?;
    Ok(Origin {
        site: sites.site(u32::try_from(ord).map_err(|_| corrupt())?)?,
        version: DbVersion(version),
        seq: Seq(u32::try_from(seq).map_err(|_| corrupt())?),
    })
}

/// Encodes the sentinel origin (None stays NULL in the database).
pub fn encode_sentinel(origin: &Option<Origin>, sites: &SiteTable) -> Option<Vec<u8>> {
    origin.as_ref().map(|o| {
        let mut out = Vec::with_capacity(8);
        encode_sentinel_into(&mut out, o, sites);
        out
    })
}

/// Appends the encoding of a (present) sentinel origin to `out`.
pub fn encode_sentinel_into(out: &mut Vec<u8>, origin: &Origin, sites: &SiteTable) {
    put_origin(out, origin, sites);
}

/// Encodes the cell clocks.
pub fn encode_cells(cells: &BTreeMap<ColOrd, CellClock>, sites: &SiteTable) -> Vec<u8> {
    let mut out = Vec::with_capacity(cells.len() * 8);
    encode_cells_into(&mut out, cells, sites);
    out
}

/// Appends the encoding of the cell clocks to `out` (what [`encode_cells`] returns), so that
/// a caller writing many rows can reuse one buffer.
pub fn encode_cells_into(
    out: &mut Vec<u8>,
    cells: &BTreeMap<ColOrd, CellClock>,
    sites: &SiteTable,
) {
    for (col, clock) in cells {
        put_varint(out, u64::from(*col));
        put_varint(out, clock.col_version.get());
        put_origin(out, &clock.origin, sites);
    }
}

/// Calls `each` with the (site ordinal, version) of every origin in a row clock's stored
/// parts, without resolving sites (sentinel first, then cells in column order).
pub fn for_each_origin(
    sentinel: Option<&[u8]>,
    mut cells: &[u8],
    mut each: impl FnMut(u64, u64),
) -> Result<(), StoreError> {
    let corrupt = || StoreError::Corrupt("truncated clock blob".into());
    let mut origin = |input: &mut &[u8]| -> Result<(), StoreError> {
        let site = take_varint(input).ok_or_else(corrupt)?;
        let version = take_varint(input).ok_or_else(corrupt)?;
        take_varint(input).ok_or_else(corrupt)?;
        each(site, version);
        Ok(())
    };
    if let Some(mut blob) = sentinel {
        origin(&mut blob)?;
    }
    while !cells.is_empty() {
        take_varint(&mut cells).ok_or_else(corrupt)?;
        take_varint(&mut cells).ok_or_else(corrupt)?;
        origin(&mut cells)?;
    }
    Ok(())
}

/// Rebuilds a row clock from its stored parts.
pub fn decode_row_clock(
    cl: u64,
    sentinel: Option<&[u8]>,
    mut cells: &[u8],
    sites: &SiteTable,
) -> Result<RowClock<ColOrd>, StoreError> {
    let corrupt = || StoreError::Corrupt("truncated clock blob".into());
    let sentinel = match sentinel {
        Some(mut blob) => Some(take_origin(&mut blob, sites)?),
        None => None,
    };
    let mut map = BTreeMap::new();
    while !cells.is_empty() {
        let col = take_varint(&mut cells).ok_or_else(corrupt)?;
        let ver = take_varint(&mut cells).ok_or_else(corrupt)?;
        let origin = take_origin(&mut cells, sites)?;
        map.insert(
            ColOrd::try_from(col).map_err(|_| corrupt())?,
            CellClock {
                col_version: ColVersion(ver),
                origin,
            },
        );
    }
    Ok(RowClock {
        cl: CausalLength(cl),
        sentinel,
        cells: map,
    })
}

/// Encodes a range set as varint pairs (start, length - 1).
pub fn encode_ranges(set: &RangeSet) -> Vec<u8> {
    let mut out = Vec::new();
    for (start, end) in set.iter() {
        put_varint(&mut out, start);
        put_varint(&mut out, end - start);
    }
    out
}

/// Decodes [`encode_ranges`].
pub fn decode_ranges(mut blob: &[u8]) -> Result<RangeSet, StoreError> {
    let corrupt = || StoreError::Corrupt("truncated version ranges".into());
    let mut set = RangeSet::new();
    while !blob.is_empty() {
        let start = take_varint(&mut blob).ok_or_else(corrupt)?;
        let span = take_varint(&mut blob).ok_or_else(corrupt)?;
        set.insert_range(start, start.checked_add(span).ok_or_else(corrupt)?);
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_clock_round_trip() {
        let mut sites = SiteTable::default();
        let a = SiteId([1; 16]);
        let b = SiteId([2; 16]);
        sites.push(a);
        sites.push(b);
        let origin = |site, v, s| Origin {
            site,
            version: DbVersion(v),
            seq: Seq(s),
        };
        let mut clock: RowClock<ColOrd> = RowClock::default();
        clock.local_insert([0, 3], origin(a, 5, 0));
        clock.local_update(3, origin(b, 900, 2));
        let sentinel = encode_sentinel(&clock.sentinel, &sites);
        let cells = encode_cells(&clock.cells, &sites);
        let back = decode_row_clock(clock.cl.get(), sentinel.as_deref(), &cells, &sites).unwrap();
        assert_eq!(back, clock);
        assert!(decode_row_clock(1, None, &cells[..cells.len() - 1], &sites).is_err());
    }

    #[test]
    fn ranges_round_trip() {
        let mut set = RangeSet::new();
        set.insert_range(1, 10);
        set.insert(20);
        set.insert_range(1 << 40, (1 << 40) + 5);
        assert_eq!(decode_ranges(&encode_ranges(&set)).unwrap(), set);
    }
}
