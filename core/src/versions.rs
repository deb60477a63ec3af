//! Per-site version bookkeeping: which changesets of each site this replica has applied, the
//! highest it has heard of, and which are known to be cleared. Needs are the gaps.
//!
//! Versions are kept as compact range sets: after convergence a site's applied set is a single
//! range `1..=head`, however many versions it wrote.

use std::collections::BTreeMap;

use crate::change::ChangesetId;
use crate::ids::{DbVersion, SiteId};

/// A set of u64 stored as disjoint, non-adjacent inclusive ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct RangeSet {
    /// start -> end (inclusive). Invariant: ranges are disjoint and never touch.
    ranges: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// True if `v` is in the set.
    pub fn contains(&self, v: u64) -> bool {
        self.ranges
            .range(..=v)
            .next_back()
            .is_some_and(|(_, &end)| end >= v)
    }

    /// Adds one value. Returns false if it was already present.
    pub fn insert(&mut self, v: u64) -> bool {
        if self.contains(v) {
            return false;
        }
        self.insert_range(v, v);
        true
    }

    /// Adds every value of `start..=end` (nothing if start > end).
    pub fn insert_range(&mut self, mut start: u64, mut end: u64) {
        if start > end {
            return;
        }
        // Absorb a range that starts before us and reaches us (or touches us).
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back() {
            if e.saturating_add(1) >= start {
                start = s;
                end = end.max(e);
                self.ranges.remove(&s);
            }
        }
        // Absorb every range that starts inside us or right after us.
        loop {
            let next = self
                .ranges
                .range(start..)
                .next()
                .map(|(&s, &e)| (s, e))
                .filter(|&(s, _)| s <= end.saturating_add(1));
            match next {
                Some((s, e)) => {
                    end = end.max(e);
                    self.ranges.remove(&s);
                }
                None => break,
            }
        }
        self.ranges.insert(start, end);
    }

    /// The ranges, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(&s, &e)| (s, e))
    }

    /// The ranges that hold a value of `start..=end`, in order (not clipped to it), found
    /// from `start` by the map's order rather than by a scan from the first range.
    pub fn iter_within(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let before = self
            .ranges
            .range(..start)
            .next_back()
            .filter(|&(_, &e)| e >= start);
        let from = (start <= end).then(|| self.ranges.range(start..=end));
        before
            .into_iter()
            .chain(from.into_iter().flatten())
            .map(|(&s, &e)| (s, e))
    }

    /// Number of ranges (a measure of fragmentation, not of values).
    pub fn range_count(&self) -> usize {
        self.ranges.len()
    }

    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Largest value, if any.
    pub fn max(&self) -> Option<u64> {
        self.ranges.values().next_back().copied()
    }

    /// Number of values (at most `u64::MAX`: the set `0..=u64::MAX` has one more).
    pub fn count(&self) -> u64 {
        self.count_within(0, u64::MAX)
    }

    /// Number of values in `start..=end` (0 if start > end; at most `u64::MAX`), without
    /// listing them or the gaps.
    pub fn count_within(&self, start: u64, end: u64) -> u64 {
        if start > end {
            return 0;
        }
        let first = self
            .ranges
            .range(..start)
            .next_back()
            .map(|(&s, &e)| (s, e));
        first
            .into_iter()
            .chain(self.ranges.range(start..=end).map(|(&s, &e)| (s, e)))
            .filter(|&(_, e)| e >= start)
            .map(|(s, e)| (e.min(end) - s.max(start)).saturating_add(1))
            .fold(0, u64::saturating_add)
    }

    /// The ranges of `start..=end` that are NOT in the set.
    pub fn gaps(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut gaps = Vec::new();
        if start > end {
            return gaps;
        }
        let mut cursor = start;
        // A range that starts before `start` may cover its beginning.
        let first = self
            .ranges
            .range(..start)
            .next_back()
            .map(|(&s, &e)| (s, e));
        // From `start` on by the map's order, not by a scan from the first range: a sync
        // request's gaps are many calls on the same set.
        for (s, e) in first
            .into_iter()
            .chain(self.ranges.range(start..).map(|(&s, &e)| (s, e)))
        {
            if s > end {
                break;
            }
            if s > cursor {
                gaps.push((cursor, s - 1));
            }
            if e >= cursor {
                match e.checked_add(1) {
                    Some(next) => cursor = next,
                    None => return gaps,
                }
            }
            if cursor > end {
                return gaps;
            }
        }
        if cursor <= end {
            gaps.push((cursor, end));
        }
        gaps
    }
}

/// What one replica knows of one site's changesets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct SiteVersions {
    /// Versions applied here (their changes merged, or known cleared).
    pub applied: RangeSet,
    /// Applied versions known to hold no live change (all overwritten). Subset of `applied`.
    pub cleared: RangeSet,
    /// Highest version of this site heard of (applied or announced). At least `applied.max()`.
    pub head: DbVersion,
}

impl SiteVersions {
    /// Versions in `1..=head` not applied yet.
    pub fn needs(&self) -> Vec<(u64, u64)> {
        self.applied.gaps(1, self.head.get())
    }

    /// How many versions [`Self::needs`] lists.
    pub fn missing(&self) -> u64 {
        let head = self.head.get();
        head - self.applied.count_within(1, head)
    }
}

impl SiteVersions {
    /// This site's share of [`Bookkeeping::state_hash`]: a hash of the site, its head and the
    /// versions applied in `1..=head` (what a sync request says of it), or 0 for a site of
    /// which nothing is known, which a sync request leaves out.
    fn state_term(&self, site: &SiteId) -> u64 {
        let head = self.head.get();
        let applied = self
            .applied
            .iter()
            .map(|(a, b)| (a.max(1), b.min(head)))
            .filter(|(a, b)| a <= b);
        if head == 0 {
            return 0;
        }
        let (hi, lo) = site.0.split_at(8);
        let mut h = mix(STATE_HASH_SEED ^ u64::from_le_bytes(hi.try_into().unwrap_or_default()));
        h = mix(h ^ u64::from_le_bytes(lo.try_into().unwrap_or_default()));
        h = mix(h ^ head);
        for (a, b) in applied {
            h = mix(mix(h ^ a) ^ b);
        }
        h
    }
}

/// Where every site's term of the state hash starts (an arbitrary odd constant).
const STATE_HASH_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// A 64-bit mixing function (splitmix64's finalizer): fixed here rather than borrowed from a
/// hasher, because two nodes compare what it gives, whatever Rust each was built with.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Version bookkeeping for every site this replica knows, its own included.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Bookkeeping {
    sites: BTreeMap<SiteId, SiteVersions>,
    /// The sum of every site's [`SiteVersions::missing`], kept as sites change: the store reads
    /// it after every applied batch (a gauge), and summing it there walked every site, with a
    /// list of gaps each, once per changeset delivered. (u128: a peer may claim any head.)
    missing: u128,
    /// Every site's [`SiteVersions::state_term`], combined by XOR and kept as sites change
    /// (see [`Bookkeeping::state_hash`]).
    state_hash: u64,
}

impl Bookkeeping {
    /// Empty bookkeeping.
    pub fn new() -> Self {
        Self::default()
    }

    /// True if the changeset was applied here.
    pub fn contains(&self, id: ChangesetId) -> bool {
        self.sites
            .get(&id.site)
            .is_some_and(|s| s.applied.contains(id.version.get()))
    }

    /// Records that a changeset was applied. Returns false if it already was.
    pub fn mark_applied(&mut self, id: ChangesetId) -> bool {
        self.change_site(id.site, |site| {
            site.head = site.head.max(id.version);
            site.applied.insert(id.version.get())
        })
    }

    /// Changes one site (created empty if unknown), keeping the missing count.
    fn change_site<T>(&mut self, site: SiteId, change: impl FnOnce(&mut SiteVersions) -> T) -> T {
        let entry = self.sites.entry(site).or_default();
        let before = entry.missing();
        let term_before = entry.state_term(&site);
        let out = change(entry);
        self.missing = self.missing - u128::from(before) + u128::from(entry.missing());
        self.state_hash ^= term_before ^ entry.state_term(&site);
        out
    }

    /// A fingerprint of what a sync request from this replica would say (every site's head
    /// and the versions applied up to it; see `sync::SyncState::of`), kept as sites change.
    /// Two replicas with the same one have applied the same versions (but for a chance of
    /// about 2^-64), so a sync round between them would find nothing: a node compares it with
    /// its partner's before a round, and spares the session when they agree.
    pub fn state_hash(&self) -> u64 {
        self.state_hash
    }

    /// Records that a changeset was applied and holds no live change.
    pub fn mark_cleared(&mut self, id: ChangesetId) {
        self.mark_applied(id);
        if let Some(site) = self.sites.get_mut(&id.site) {
            site.cleared.insert(id.version.get());
        }
    }

    /// Records that `site` has reached at least `version` (e.g. from a peer's heads).
    pub fn heard(&mut self, site: SiteId, version: DbVersion) {
        self.change_site(site, |entry| entry.head = entry.head.max(version));
    }

    /// One site's state.
    pub fn site(&self, site: &SiteId) -> Option<&SiteVersions> {
        self.sites.get(site)
    }

    /// Replaces one site's state (used when loading from disk).
    pub fn set_site(&mut self, site: SiteId, versions: SiteVersions) {
        self.change_site(site, |entry| *entry = versions);
    }

    /// Every site, in site order.
    pub fn iter(&self) -> impl Iterator<Item = (&SiteId, &SiteVersions)> {
        self.sites.iter()
    }

    /// Every site's head.
    pub fn heads(&self) -> BTreeMap<SiteId, DbVersion> {
        self.sites.iter().map(|(s, v)| (*s, v.head)).collect()
    }

    /// Every site's needs, sites without needs left out.
    pub fn needs(&self) -> BTreeMap<SiteId, Vec<(u64, u64)>> {
        self.sites
            .iter()
            .map(|(s, v)| (*s, v.needs()))
            .filter(|(_, n)| !n.is_empty())
            .collect()
    }

    /// Number of versions missing over all sites (at most `u64::MAX`).
    pub fn gap_count(&self) -> u64 {
        u64::try_from(self.missing).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn ranges_merge_and_gaps() {
        let mut set = RangeSet::new();
        set.insert(5);
        set.insert(3);
        set.insert(4);
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![(3, 5)]);
        set.insert_range(8, 10);
        assert_eq!(set.gaps(1, 12), vec![(1, 2), (6, 7), (11, 12)]);
        set.insert_range(1, 20);
        assert_eq!(set.range_count(), 1);
        assert!(set.gaps(1, 20).is_empty());
        assert!(!set.insert(7));
        set.insert(u64::MAX);
        assert!(set.contains(u64::MAX));
        assert_eq!(set.gaps(19, u64::MAX), vec![(21, u64::MAX - 1)]);
    }

    #[test]
    fn counts_saturate_at_the_extremes() {
        let mut set = RangeSet::new();
        set.insert_range(0, u64::MAX);
        assert_eq!(set.count(), u64::MAX);
        assert_eq!(set.count_within(1, u64::MAX), u64::MAX);
        assert_eq!(set.count_within(5, 4), 0);
    }

    #[test]
    fn needs_are_gaps_below_head() {
        let site = SiteId([9; 16]);
        let mut book = Bookkeeping::new();
        let id = |v| ChangesetId {
            site,
            version: DbVersion(v),
        };
        book.mark_applied(id(1));
        book.mark_applied(id(4));
        book.heard(site, DbVersion(6));
        assert_eq!(book.site(&site).unwrap().needs(), vec![(2, 3), (5, 6)]);
        assert_eq!(book.gap_count(), 4);
        book.mark_cleared(id(2));
        assert!(book.contains(id(2)));
        assert!(book.site(&site).unwrap().cleared.contains(2));
    }

    /// One change of a proptest's list: an apply, a cleared version, a head heard or a site
    /// loaded.
    fn change(book: &mut Bookkeeping, site: u8, op: u8, version: u64) {
        let site = SiteId([site; 16]);
        let id = ChangesetId {
            site,
            version: DbVersion(version),
        };
        match op {
            0 => {
                book.mark_applied(id);
            }
            1 => book.mark_cleared(id),
            2 => book.heard(site, DbVersion(version)),
            _ => {
                let mut loaded = SiteVersions {
                    head: DbVersion(version),
                    ..Default::default()
                };
                loaded.applied.insert_range(1, version / 2);
                book.set_site(site, loaded);
            }
        }
    }

    proptest! {
        // The range set behaves exactly like a set of integers, and stays canonical.
        #[test]
        fn range_set_matches_btreeset(ops in proptest::collection::vec((0u64..64, 0u64..4), 0..40)) {
            let mut set = RangeSet::new();
            let mut model = BTreeSet::new();
            for (start, len) in ops {
                set.insert_range(start, start + len);
                model.extend(start..=start + len);
            }
            for v in 0..72 {
                prop_assert_eq!(set.contains(v), model.contains(&v));
            }
            prop_assert_eq!(set.count(), model.len() as u64);
            let ranges: Vec<_> = set.iter().collect();
            for w in ranges.windows(2) {
                prop_assert!(w[0].1 + 1 < w[1].0, "ranges touch: {:?}", w);
            }
            let gaps: BTreeSet<u64> = set.gaps(0, 71).into_iter().flat_map(|(s, e)| s..=e).collect();
            let expected: BTreeSet<u64> = (0..72).filter(|v| !model.contains(v)).collect();
            prop_assert_eq!(gaps, expected);
            for (start, end) in [(0, 71), (3, 9), (10, 10), (9, 3), (40, 200)] {
                let within = model.iter().filter(|&&v| v >= start && v <= end).count() as u64;
                prop_assert_eq!(set.count_within(start, end), within);
            }
        }

        // The missing count kept as sites change is the sum of the gaps listed, whatever the
        // order of applies, cleared versions, heads heard and sites loaded.
        #[test]
        fn gap_count_is_the_sum_of_the_needs(ops in proptest::collection::vec((0u8..3, 0u8..4, 0u64..24), 0..60)) {
            let mut book = Bookkeeping::new();
            for (site, op, version) in ops {
                change(&mut book, site, op, version);
                let listed: u64 = book
                    .iter()
                    .flat_map(|(_, v)| v.needs())
                    .map(|(s, e)| e - s + 1)
                    .sum();
                prop_assert_eq!(book.gap_count(), listed);
            }
        }

        // The state hash kept as sites change is the one made afresh from every site, after
        // every kind of change; and two replicas have the same hash exactly when their sync
        // requests would say the same (no collision turns up in these small cases).
        #[test]
        fn the_state_hash_follows_what_a_sync_request_says(
            ops in proptest::collection::vec((0u8..2, 0u8..3, 0u8..4, 0u64..12), 0..60)
        ) {
            let mut books = [Bookkeeping::new(), Bookkeeping::new()];
            for (which, site, op, version) in ops {
                let book = &mut books[usize::from(which)];
                // Version 0 is never applied: validation refuses a changeset with it.
                if op < 2 && version == 0 {
                    continue;
                }
                change(book, site, op, version);
                let afresh = book.iter().fold(0, |h, (site, v)| h ^ v.state_term(site));
                prop_assert_eq!(book.state_hash(), afresh);
                let same_request =
                    crate::sync::SyncState::of(&books[0]).sites.into_iter().filter(|(_, (head, _))| head.get() > 0).collect::<Vec<_>>()
                        == crate::sync::SyncState::of(&books[1]).sites.into_iter().filter(|(_, (head, _))| head.get() > 0).collect::<Vec<_>>();
                prop_assert_eq!(books[0].state_hash() == books[1].state_hash(), same_request);
                // What a round spared by equal hashes would have brought: nothing, either way.
                if books[0].state_hash() == books[1].state_hash() {
                    for (server, client) in [(0, 1), (1, 0)] {
                        let client = crate::sync::SyncState::of(&books[client]);
                        prop_assert!(crate::sync::versions_to_send(&books[server], &client, u64::MAX).is_empty());
                    }
                }
            }
        }
    }

    #[test]
    fn replicas_that_applied_the_same_versions_in_any_order_agree() {
        let (a, b) = (SiteId([1; 16]), SiteId([2; 16]));
        let id = |site, v| ChangesetId {
            site,
            version: DbVersion(v),
        };
        let mut one = Bookkeeping::new();
        let mut other = Bookkeeping::new();
        for v in [1, 2, 3] {
            one.mark_applied(id(a, v));
        }
        one.mark_applied(id(b, 1));
        other.mark_applied(id(b, 1));
        for v in [3, 1, 2] {
            other.mark_applied(id(a, v));
        }
        assert_eq!(one.state_hash(), other.state_hash());
        assert_ne!(one.state_hash(), 0);
        // Heard of a version not applied: a need, so no longer the same request.
        other.heard(a, DbVersion(4));
        assert_ne!(one.state_hash(), other.state_hash());
        // A site known only by name (head 0) is left out of a request, and of the hash.
        let before = one.state_hash();
        one.heard(SiteId([9; 16]), DbVersion(0));
        assert_eq!(one.state_hash(), before);
    }
}
