//! Sync requests: a node's per-site heads and gaps.

use super::*;

/// Most sites in a sync request.
pub const SYNC_SITES_MAX: usize = 100_000;
/// Most gap ranges per site in a sync request.
pub const SYNC_GAPS_MAX: usize = 100_000;
/// The largest sync request [`encode_sync_state`] makes (a varint takes at most 10 bytes): the
/// limit a server reads a request with. The message limit would not do: set low
/// (`gossip.message_bytes_max` may be 64 KiB), it refused the requests of a node with a few
/// thousand gaps, so that node's anti-entropy stopped.
pub const SYNC_REQUEST_BYTES_MAX: usize =
    3 + 10 + SYNC_SITES_MAX * (SITE_ID_LEN + 10 + 10) + SYNC_GAPS_MAX * 20;

/// Encodes a sync request (a node's [`crate::sync::SyncState`]), within what
/// [`decode_sync_state`] accepts: at most [`SYNC_SITES_MAX`] sites and [`SYNC_GAPS_MAX`] gap
/// ranges in all. Sent whole, a larger request was refused by every peer, and anti-entropy
/// stopped for good.
///
/// A node with more gaps (versions heard of that exist nowhere, changesets it refused) shares
/// the request fairly among its sites with gaps: a site with fewer than an equal share asks
/// for all of them, and what it leaves goes to the others. Half of a site's share is always its
/// latest gaps, the likeliest a recent loss; the other half is a window over its older gaps
/// that moves with `round` (the node's sync session count), so that every gap is asked for
/// within a bounded number of rounds. The peer takes the gaps left out for versions held and
/// sends nothing for them this round; the head is the node's own, so nothing it holds comes
/// again.
pub fn encode_sync_state(cluster: u16, state: &crate::sync::SyncState, round: u64) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    out.extend_from_slice(&cluster.to_le_bytes());
    let sites = state.sites.len().min(SYNC_SITES_MAX);
    let taken = || state.sites.iter().take(sites);
    let counts: Vec<usize> = taken().map(|(_, (_, needs))| needs.len()).collect();
    let shares = gap_shares(&counts);
    put_varint(&mut out, sites as u64);
    for ((site, (head, needs)), share) in taken().zip(shares) {
        let (older, latest) = gaps_asked(needs, share, round);
        out.extend_from_slice(&site.0);
        put_varint(&mut out, head.get());
        put_varint(&mut out, (older.len() + latest.len()) as u64);
        for (a, b) in older.iter().chain(latest) {
            put_varint(&mut out, *a);
            put_varint(&mut out, b.saturating_sub(*a));
        }
    }
    out
}

/// How many gaps each site (with `counts` gaps) may ask for: all when they fit in
/// [`SYNC_GAPS_MAX`], else a max-min fair share of it. Every site with gaps gets at least one,
/// as there are no more sites than [`SYNC_GAPS_MAX`].
fn gap_shares(counts: &[usize]) -> Vec<usize> {
    if counts.iter().sum::<usize>() <= SYNC_GAPS_MAX {
        return counts.to_vec();
    }
    let mut fewest_first: Vec<usize> = (0..counts.len()).filter(|i| counts[*i] > 0).collect();
    fewest_first.sort_by_key(|i| counts[*i]);
    let mut shares = vec![0; counts.len()];
    let (mut left, sites) = (SYNC_GAPS_MAX, fewest_first.len());
    for (served, i) in fewest_first.into_iter().enumerate() {
        let share = counts[i].min(left / (sites - served));
        shares[i] = share;
        left -= share;
    }
    shares
}

/// Gap ranges of one site, inclusive, in order.
type Gaps = [(u64, u64)];

/// The gaps of one site a request asks for when it may hold `share` of them: all when they
/// fit, else a window over the older ones (moved by `round`) and the latest, both in order.
fn gaps_asked(needs: &Gaps, share: usize, round: u64) -> (&Gaps, &Gaps) {
    if needs.len() <= share {
        return (&[], needs);
    }
    let latest = share - share / 2;
    let (older, latest) = needs.split_at(needs.len() - latest);
    let window = share / 2;
    if window == 0 {
        return (&[], latest);
    }
    // Windows counted back from the newest of the older gaps; the oldest is a full window.
    let windows = older.len().div_ceil(window) as u64;
    let back = (round % windows) as usize;
    let start = older.len().saturating_sub((back + 1) * window);
    (&older[start..(start + window).min(older.len())], latest)
}

/// Decodes a sync request from untrusted bytes: at most [`SYNC_SITES_MAX`] sites and
/// [`SYNC_GAPS_MAX`] gap ranges in all.
pub fn decode_sync_state(
    bytes: &[u8],
    cluster: u16,
    limits: &Limits,
) -> Result<crate::sync::SyncState, PeerMessageError> {
    let mut r = Reader::for_cluster(bytes, cluster, limits)?;
    let mut state = crate::sync::SyncState::default();
    let n = r.count("site count", SYNC_SITES_MAX, SITE_ID_LEN + 2)?;
    // Gap ranges in all, as the encoder keeps them: each costs 16 bytes decoded against two
    // on the wire, and a request of the size servers read could hold millions.
    let mut gaps_left = SYNC_GAPS_MAX;
    for _ in 0..n {
        let site = SiteId::from_slice(r.take(SITE_ID_LEN, "site id")?)
            .map_err(|_| DecodeError::Truncated("site id"))?;
        let head = DbVersion(r.varint()?);
        let gaps = r.count("gap count", gaps_left, 2)?;
        gaps_left -= gaps;
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

    /// A node with more gaps than a request may carry sends each site with gaps a fair share
    /// of them (at its first round, its latest), under its own head: the request decodes, and
    /// a peer holding every version sends those gaps' versions and nothing the node holds.
    /// Sent whole, every peer refused it. A site with few gaps asks for them all, and leaves
    /// the rest of the request to the others.
    #[test]
    fn a_request_with_more_gaps_than_peers_accept_is_cut_to_fit() {
        let many = SYNC_GAPS_MAX + 500;
        let mut state = crate::sync::SyncState::default();
        // Site 1: every other version missing, more gap ranges than a request may hold.
        let needs: Vec<(u64, u64)> = (1..=many as u64).map(|i| (2 * i, 2 * i)).collect();
        let head = 2 * many as u64 + 1;
        state
            .sites
            .insert(SiteId([1; 16]), (DbVersion(head), needs.clone()));
        // Site 2, after it: one gap.
        state
            .sites
            .insert(SiteId([2; 16]), (DbVersion(9), vec![(4, 5)]));
        let bytes = encode_sync_state(9, &state, 0);
        let decoded = decode_sync_state(&bytes, 9, &Limits::default()).expect("fits");
        // Site 2's one gap leaves the rest of the request to site 1.
        let share = SYNC_GAPS_MAX - 1;
        let latest = &needs[needs.len() - share..];
        assert_eq!(
            decoded.sites[&SiteId([1; 16])],
            (DbVersion(head), latest.to_vec())
        );
        assert_eq!(
            decoded.sites[&SiteId([2; 16])],
            (DbVersion(9), vec![(4, 5)])
        );

        // A peer with every version of both sites sends the kept gaps' versions only.
        let mut server = crate::versions::Bookkeeping::new();
        for (site, top) in [(1, head), (2, 9)] {
            for v in 1..=top {
                server.mark_applied(crate::change::ChangesetId {
                    site: SiteId([site; 16]),
                    version: DbVersion(v),
                });
            }
        }
        let sent = crate::sync::versions_to_send(&server, &decoded, u64::MAX);
        let of_site = |s: u8| -> Vec<(u64, u64)> {
            sent.iter()
                .filter(|(site, _, _)| *site == SiteId([s; 16]))
                .map(|(_, a, b)| (*a, *b))
                .collect()
        };
        assert_eq!(of_site(1), latest);
        assert_eq!(of_site(2), [(4, 5)]);
    }

    /// Over the gap cap, the older gaps a request asks for move with the round: every gap is
    /// asked for within a bounded number of rounds, and the latest in every round. Asking
    /// for the latest alone left the oldest unasked for good.
    #[test]
    fn every_gap_over_the_cap_is_asked_for_within_a_few_rounds() {
        let many = 2 * SYNC_GAPS_MAX + 3;
        let needs: Vec<(u64, u64)> = (1..=many as u64).map(|i| (2 * i, 2 * i)).collect();
        let head = DbVersion(2 * many as u64 + 1);
        let mut state = crate::sync::SyncState::default();
        state.sites.insert(SiteId([1; 16]), (head, needs.clone()));
        let latest = &needs[needs.len() - SYNC_GAPS_MAX / 2..];
        // The older gaps fill three windows of half the cap and start a fourth: four rounds
        // cover them.
        let mut asked = std::collections::BTreeSet::new();
        for round in 0..4 {
            let bytes = encode_sync_state(9, &state, round);
            let decoded = decode_sync_state(&bytes, 9, &Limits::default()).expect("fits");
            let (got_head, got) = &decoded.sites[&SiteId([1; 16])];
            assert_eq!(*got_head, head);
            assert_eq!(got.len(), SYNC_GAPS_MAX, "round {round} uses the whole cap");
            assert!(got.windows(2).all(|w| w[0] < w[1]), "in order, no repeat");
            assert_eq!(&got[got.len() - latest.len()..], latest, "round {round}");
            asked.extend(got.iter().copied());
        }
        assert_eq!(asked.len(), many, "every gap asked for in four rounds");
        // The fifth round starts again from the newest window.
        assert_eq!(
            encode_sync_state(9, &state, 4),
            encode_sync_state(9, &state, 0)
        );
    }

    /// Over the cap, the request is shared max-min fairly: a site with few gaps asks for all
    /// of them, the rest is split among the others, and the whole cap is used.
    #[test]
    fn a_site_with_few_gaps_leaves_its_unused_share_to_the_others() {
        let cap = SYNC_GAPS_MAX;
        assert_eq!(gap_shares(&[3, 0, 7]), [3, 0, 7], "under the cap: all");
        let shares = gap_shares(&[1, 3 * cap, cap / 2, 0]);
        assert_eq!(shares, [1, cap / 2, (cap - 1) / 2, 0]);
        assert_eq!(shares.iter().sum::<usize>(), cap);
        // As many sites as the cap, each with two gaps: one each.
        assert!(gap_shares(&vec![2; cap]).iter().all(|s| *s == 1));
    }

    /// A request with more gap ranges in all than the encoder makes is refused, though each
    /// site's are within the cap: decoded, a request of the size servers read could hold
    /// millions of them.
    #[test]
    fn a_request_with_too_many_gaps_in_all_is_refused() {
        let per_site = SYNC_GAPS_MAX / 2 + 1;
        let mut bytes = vec![FORMAT_VERSION, 9, 0];
        put_varint(&mut bytes, 2);
        for site in [1u8, 2] {
            bytes.extend_from_slice(&[site; 16]);
            put_varint(&mut bytes, 2 * per_site as u64);
            put_varint(&mut bytes, per_site as u64);
            for i in 0..per_site as u64 {
                put_varint(&mut bytes, 2 * i + 1);
                put_varint(&mut bytes, 0);
            }
        }
        assert!(decode_sync_state(&bytes, 9, &Limits::default()).is_err());
        // One site's worth of them decodes.
        let one_site = 3 + 1 + (bytes.len() - 4) / 2;
        let mut first = bytes[..one_site].to_vec();
        first[3] = 1;
        assert!(decode_sync_state(&first, 9, &Limits::default()).is_ok());
    }

    /// The largest request the encoder can make fits the limit servers read requests with.
    #[test]
    fn the_largest_request_fits_the_request_limit() {
        let mut state = crate::sync::SyncState::default();
        for i in 0..SYNC_SITES_MAX as u64 - 1 {
            let mut site = [0xff; 16];
            site[..8].copy_from_slice(&i.to_le_bytes());
            state
                .sites
                .insert(SiteId(site), (DbVersion(u64::MAX), vec![]));
        }
        let gaps = (0..SYNC_GAPS_MAX as u64 * 2)
            .map(|i| (u64::MAX / 2 + 2 * i, u64::MAX - 1))
            .collect();
        state
            .sites
            .insert(SiteId([0xfe; 16]), (DbVersion(u64::MAX), gaps));
        let bytes = encode_sync_state(9, &state, 0);
        assert!(bytes.len() <= SYNC_REQUEST_BYTES_MAX, "{}", bytes.len());
    }

    #[test]
    fn sync_state_round_trips_and_refuses_bad_input() {
        let mut state = crate::sync::SyncState::default();
        state
            .sites
            .insert(SiteId([1; 16]), (DbVersion(100), vec![(3, 4), (50, 100)]));
        state.sites.insert(SiteId([2; 16]), (DbVersion(0), vec![]));
        let bytes = encode_sync_state(9, &state, 0);
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
        assert!(
            decode_sync_state(&encode_sync_state(9, &state, 0), 9, &Limits::default()).is_err()
        );
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
