//! Sync requests: a node's per-site heads and gaps.

use super::*;

/// Most sites in a sync request.
pub const SYNC_SITES_MAX: usize = 100_000;
/// Most gap ranges per site in a sync request.
pub const SYNC_GAPS_MAX: usize = 100_000;

/// Encodes a sync request (a node's [`crate::sync::SyncState`]).
pub fn encode_sync_state(cluster: u16, state: &crate::sync::SyncState) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    out.extend_from_slice(&cluster.to_le_bytes());
    put_varint(&mut out, state.sites.len() as u64);
    for (site, (head, needs)) in &state.sites {
        out.extend_from_slice(&site.0);
        put_varint(&mut out, head.get());
        put_varint(&mut out, needs.len() as u64);
        for (a, b) in needs {
            put_varint(&mut out, *a);
            put_varint(&mut out, b.saturating_sub(*a));
        }
    }
    out
}

/// Decodes a sync request from untrusted bytes.
pub fn decode_sync_state(
    bytes: &[u8],
    cluster: u16,
    limits: &Limits,
) -> Result<crate::sync::SyncState, PeerMessageError> {
    let mut r = Reader::for_cluster(bytes, cluster, limits)?;
    let mut state = crate::sync::SyncState::default();
    let n = r.count("site count", SYNC_SITES_MAX, SITE_ID_LEN + 2)?;
    for _ in 0..n {
        let site = SiteId::from_slice(r.take(SITE_ID_LEN, "site id")?)
            .map_err(|_| DecodeError::Truncated("site id"))?;
        let head = DbVersion(r.varint()?);
        let gaps = r.count("gap count", SYNC_GAPS_MAX, 2)?;
        let mut needs = Vec::with_capacity(gaps);
        for _ in 0..gaps {
            let a = r.varint()?;
            let b = a
                .checked_add(r.varint()?)
                .ok_or(DecodeError::Range("gap"))?;
            if b > head.get() || a == 0 {
                return Err(DecodeError::Range("gap outside 1..=head").into());
            }
            needs.push((a, b));
        }
        state.sites.insert(site, (head, needs));
    }
    if !r.bytes.is_empty() {
        return Err(DecodeError::Trailing(r.bytes.len()).into());
    }
    Ok(state)
}

#[cfg(test)]
mod sync_wire_tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sync_state_round_trips_and_refuses_bad_input() {
        let mut state = crate::sync::SyncState::default();
        state
            .sites
            .insert(SiteId([1; 16]), (DbVersion(100), vec![(3, 4), (50, 100)]));
        state.sites.insert(SiteId([2; 16]), (DbVersion(0), vec![]));
        let bytes = encode_sync_state(9, &state);
        assert_eq!(
            decode_sync_state(&bytes, 9, &Limits::default()),
            Ok(state.clone())
        );
        assert_eq!(
            decode_sync_state(&bytes, 8, &Limits::default()),
            Err(PeerMessageError::OtherCluster(9))
        );
        for len in 0..bytes.len() {
            assert!(decode_sync_state(&bytes[..len], 9, &Limits::default()).is_err());
        }
        // A gap beyond the head is absurd.
        state
            .sites
            .insert(SiteId([3; 16]), (DbVersion(5), vec![(1, u64::MAX)]));
        assert!(decode_sync_state(&encode_sync_state(9, &state), 9, &Limits::default()).is_err());
    }

    proptest! {
        #[test]
        fn sync_state_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let mut framed = vec![FORMAT_VERSION, 9, 0];
            framed.extend_from_slice(&bytes);
            let _ = decode_sync_state(&framed, 9, &Limits::default());
        }
    }
}
