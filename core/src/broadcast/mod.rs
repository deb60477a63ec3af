//! Broadcast of changesets, sans IO: flooding over *kept links* chosen for latency (the
//! default), and optionally a Plumtree-style epidemic broadcast tree.
//!
//! The tree: each node keeps its peers in two sets. *Eager* peers receive every new changeset in full at
//! once; *lazy* peers only receive its id, batched ("I have"). The first copy of a changeset
//! that arrives makes its sender an eager peer; a duplicate makes the sender lazy and tells it
//! so (*prune*). The eager links thus shrink to a spanning tree, so most nodes send each
//! changeset once or twice. When an id is announced but its payload does not follow within
//! `graft_timeout_ms`, the node asks an announcer for it (*graft*), which also repairs the tree.
//!
//! A pure tree is deep: every changeset of every author follows the same tree, so the path from
//! one author to some node crosses the tree twice over long links. So each node also asks a
//! few members to push every changeset to it over *kept* links that duplicates never prune:
//! its *near* peers (lowest round-trip time, measured by its own probes, so on a WAN mostly its
//! own region) and a few *far* peers picked at random. Because every node chooses who feeds it,
//! every node has that many ways in. A changeset floods the author's region within
//! milliseconds, crosses to most regions in one long hop over one of the region's many far
//! links, then floods each region: time to all nodes comes close to the largest one-way
//! latency from the author. The tree is then optional, and off by default: measured, it only
//! added messages (docs/BENCHMARKS.md).
//!
//! Inputs are method calls with the current time; outputs are [`Effect`]s for the caller to
//! perform. Peer selection uses a seeded generator owned by the state machine, so a run is a
//! function of its inputs and seed. Every collection is bounded (see [`BroadcastConfig`]).
//!
//! This file holds the state, its inputs and the message handling; `seen.rs` the dedup cache,
//! `links.rs` the kept links and round-trip probes, `tree.rs` the optional tree's peer sets.

use crate::stats::SplitMix64;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use crate::change::{Changeset, PartId};
use crate::ids::SiteId;

mod links;
mod seen;
mod tree;

/// Milliseconds on the caller's monotonic clock (virtual time in the simulator and the model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Millis(pub u64);

impl Millis {
    /// This time plus `ms`.
    pub fn plus(self, ms: u64) -> Millis {
        Millis(self.0.saturating_add(ms))
    }
}

/// Tunables, each with its unit and a bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BroadcastConfig {
    /// Eager peers of the tree (its out-degree before pruning; 0: no tree, the kept links carry
    /// everything). 0..=32.
    pub eager_peers_max: usize,
    /// Lazy peers of the tree's active view; every one of them is told about every changeset
    /// ("I have", batched per tick). Members beyond eager + lazy wait in a passive set and
    /// replace active peers that fail (HyParView's idea), so traffic per node stays bounded
    /// however large the cluster. 0..=64.
    pub lazy_peers_max: usize,
    /// Wait after an announcement before grafting (ms).
    pub graft_timeout_ms: u64,
    /// Changeset ids remembered for deduplication.
    pub seen_max: usize,
    /// Changesets kept to answer grafts.
    pub cache_max: usize,
    /// Ids announced but not received, tracked at most.
    pub missing_max: usize,
    /// Ids per "I have" message.
    pub ihave_batch_max: usize,
    /// Kept links asked of the members with the lowest measured round-trip time. 0..=16.
    pub near_peers: usize,
    /// Kept links asked of members picked at random: the long links. 0..=16.
    pub far_peers: usize,
    /// Time between round-trip probes (ms) while fewer than `probe_sample` members are
    /// measured; [`PROBE_SLOW_FACTOR`] times longer afterwards (refreshing). 0: no probes.
    pub probe_interval_ms: u64,
    /// Members in the first probe round (a random sample; all of them if fewer), among which
    /// the near peers are chosen. Later rounds probe the near peers again and
    /// [`PROBE_SLOW_NEW`] more random members. Each member probed for the first time usually
    /// costs a QUIC handshake. 1..=1,024.
    pub probe_sample: usize,
    /// A changeset committed here whose encoding is larger (estimated) leaves in parts of at
    /// most this many bytes, each broadcast as its own message (`chunk::split`); receivers
    /// apply it once they hold every part. The engine's `gossip.part_bytes`.
    pub part_bytes: usize,
    /// Members a changeset committed here goes to directly (its kept links, then members
    /// picked at random), at most one member in [`ORIGIN_FANOUT_SHARE`]; not for changesets
    /// in parts, nor with the tree on (`eager_peers_max` > 0). 0..=256.
    pub origin_fanout: usize,
}

/// How much longer the interval between probes is once `probe_sample` members are measured.
pub const PROBE_SLOW_FACTOR: u64 = 100;

/// Random members in each probe round after the first (besides the near peers): the near set
/// keeps improving, slowly, and follows members that join later.
pub const PROBE_SLOW_NEW: usize = 1;

/// How often a node repeats its kept-link requests (ms): a request lost, or a peer restarted,
/// costs a link for at most this long.
pub const KEEP_REFRESH_MS: u64 = 10_000;

/// A changeset committed here goes directly to at most one member in this many (see
/// [`BroadcastConfig::origin_fanout`]): at most 1/16 of a send per change per node more.
pub const ORIGIN_FANOUT_SHARE: usize = 16;

/// Members offered per send asked for when the first hop is widened: the caller may skip
/// some (the engine skips members a datagram would need a handshake for, about five in six
/// of them among 1,000 agents on one machine, `loadgen live`).
pub const ORIGIN_CANDIDATES_PER_SEND: usize = 16;

/// Kept links a node serves at most (requests beyond are ignored; the asker has others).
pub const CHILDREN_MAX: usize = 64;

impl Default for BroadcastConfig {
    fn default() -> Self {
        BroadcastConfig {
            eager_peers_max: 0,
            lazy_peers_max: 0,
            graft_timeout_ms: 80,
            seen_max: 65_536,
            cache_max: 4_096,
            missing_max: 16_384,
            ihave_batch_max: 256,
            near_peers: 4,
            far_peers: 2,
            probe_interval_ms: 50,
            probe_sample: 32,
            part_bytes: 64 * 1024,
            origin_fanout: 48,
        }
    }
}

/// A broadcast message between two nodes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BroadcastMsg {
    /// A changeset in full (eager push over a tree link).
    Gossip(Arc<Changeset>),
    /// A changeset in full over a kept link (the receiver asked for every changeset): a
    /// duplicate arriving this way is expected and prunes nothing.
    KeptGossip(Arc<Changeset>),
    /// "Push every changeset to me over a kept link" (until a [`BroadcastMsg::Prune`], or
    /// until the request is not repeated for three refresh periods).
    Keep,
    /// Ids the sender has (lazy push).
    IHave(Vec<PartId>),
    /// "Send me these, and make me an eager peer."
    Graft(Vec<PartId>),
    /// "Stop pushing to me eagerly."
    Prune,
    /// Round-trip probe carrying the sender's clock (ms), echoed by [`BroadcastMsg::Pong`].
    Ping(u64),
    /// Answer to a probe: the clock value it carried.
    Pong(u64),
}

impl BroadcastMsg {
    /// Overlay upkeep (round-trip probes and kept-link requests), as opposed to the messages
    /// that carry or announce changes: what a cost per change leaves out.
    pub fn is_upkeep(&self) -> bool {
        matches!(
            self,
            BroadcastMsg::Ping(_) | BroadcastMsg::Pong(_) | BroadcastMsg::Keep
        )
    }
}

/// What the caller must do.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Effect {
    /// Send a message to a peer.
    Send {
        /// The peer.
        to: SiteId,
        /// The message.
        msg: BroadcastMsg,
    },
    /// Send a message to `count` of the `candidates` (in their order; fewer if the caller
    /// cannot reach enough of them cheaply). Optional copies: the kept links carry the
    /// changeset anyway. Not in [`BroadcastStats::gossip_sent`]: the caller counts them.
    SendToSome {
        /// Members in a random order.
        candidates: Vec<SiteId>,
        /// How many of them.
        count: usize,
        /// The message.
        msg: BroadcastMsg,
    },
    /// A changeset seen for the first time: apply it to the store.
    Deliver(Arc<Changeset>),
}

/// Counters, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct BroadcastStats {
    /// Changesets received for the first time.
    pub delivered: u64,
    /// Changesets received again.
    pub duplicates: u64,
    /// Gossip messages sent.
    pub gossip_sent: u64,
    /// "I have" messages sent.
    pub ihave_sent: u64,
    /// Grafts sent.
    pub grafts_sent: u64,
    /// Prunes sent.
    pub prunes_sent: u64,
    /// Probes sent.
    pub pings_sent: u64,
    /// Changesets sync brought that broadcast had not, broadcast again from here.
    pub relayed: u64,
}

/// Broadcast state of one node.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Broadcast {
    me: SiteId,
    config: BroadcastConfig,
    rng: SplitMix64,
    eager: BTreeSet<SiteId>,
    lazy: BTreeSet<SiteId>,
    /// Known members outside the active view.
    passive: BTreeSet<SiteId>,
    seen: BTreeSet<PartId>,
    seen_order: VecDeque<PartId>,
    cache: BTreeMap<PartId, Arc<Changeset>>,
    cache_order: VecDeque<PartId>,
    /// Announced, not received: when to graft next, and who announced it.
    missing: BTreeMap<PartId, (Millis, Vec<SiteId>)>,
    /// Ids waiting to be announced, per lazy peer.
    pending_ihave: BTreeMap<SiteId, Vec<PartId>>,
    /// Smoothed round-trip time per member (ms), from probes.
    rtt_ms: BTreeMap<SiteId, u64>,
    /// Members asked to feed us over kept links: the nearest measured ones.
    near: BTreeSet<SiteId>,
    /// Members asked to feed us over kept links: random ones.
    far: BTreeSet<SiteId>,
    /// Members that asked us for kept links, and when they last asked.
    children: BTreeMap<SiteId, Millis>,
    /// Kept-link requests and releases waiting for the next tick.
    pending_keep: BTreeSet<SiteId>,
    pending_release: BTreeSet<SiteId>,
    next_keep_refresh_at: Millis,
    /// Members left to probe in this round.
    probe_queue: VecDeque<SiteId>,
    /// Probes sent at the fast interval: at most `probe_sample`, however often members come
    /// and go (a member that flaps must not restart the first round).
    fast_probes: usize,
    /// Breaks round-trip ties between members differently on every node, so that equally near
    /// members share the load of kept links.
    salt: u64,
    next_probe_at: Millis,
    stats: BroadcastStats,
}

impl Broadcast {
    /// A node with no peers. `seed` drives peer selection.
    pub fn new(me: SiteId, config: BroadcastConfig, seed: u64) -> Self {
        Broadcast {
            me,
            config,
            rng: SplitMix64::new(seed ^ 0x9e37_79b9_7f4a_7c15),
            eager: BTreeSet::new(),
            lazy: BTreeSet::new(),
            passive: BTreeSet::new(),
            seen: BTreeSet::new(),
            seen_order: VecDeque::new(),
            cache: BTreeMap::new(),
            cache_order: VecDeque::new(),
            missing: BTreeMap::new(),
            pending_ihave: BTreeMap::new(),
            rtt_ms: BTreeMap::new(),
            near: BTreeSet::new(),
            far: BTreeSet::new(),
            children: BTreeMap::new(),
            pending_keep: BTreeSet::new(),
            pending_release: BTreeSet::new(),
            next_keep_refresh_at: Millis(KEEP_REFRESH_MS),
            probe_queue: VecDeque::new(),
            fast_probes: 0,
            salt: seed.rotate_left(17) ^ 0x5851_f42d_4c95_7f2d,
            next_probe_at: Millis(0),
            stats: BroadcastStats::default(),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> BroadcastStats {
        self.stats
    }

    /// Counters so far, resetting them (the model checker keeps them out of its states).
    pub fn take_stats(&mut self) -> BroadcastStats {
        std::mem::take(&mut self.stats)
    }

    /// Current lazy peers.
    pub fn lazy_peers(&self) -> &BTreeSet<SiteId> {
        &self.lazy
    }

    /// Members asked for kept links because they are the nearest measured.
    pub fn near_peers(&self) -> &BTreeSet<SiteId> {
        &self.near
    }

    /// Members asked for kept links at random.
    pub fn far_peers(&self) -> &BTreeSet<SiteId> {
        &self.far
    }

    /// Members this node pushes every changeset to because they asked.
    pub fn kept_children(&self) -> impl Iterator<Item = &SiteId> {
        self.children.keys()
    }

    /// Measured round-trip time to a member (ms).
    pub fn rtt_ms(&self, peer: &SiteId) -> Option<u64> {
        self.rtt_ms.get(peer).copied()
    }

    /// The members this node exchanges changesets with all the time, sorted: its kept links
    /// both ways (near, far, the members it feeds) and its tree peers. Sync prefers them: the
    /// connections are open already.
    pub fn neighbours(&self) -> Vec<SiteId> {
        let mut all: BTreeSet<SiteId> = self.near.union(&self.far).copied().collect();
        all.extend(self.children.keys().copied());
        all.extend(self.eager.iter().copied());
        all.into_iter().collect()
    }

    /// This node's site.
    pub fn me(&self) -> SiteId {
        self.me
    }

    /// Ids announced but not yet received.
    pub fn missing_count(&self) -> usize {
        self.missing.len()
    }

    fn next_random(&mut self) -> u64 {
        self.rng.next_u64()
    }

    /// A peer joined: it becomes eager while there is room, then lazy, then passive.
    pub fn peer_up(&mut self, peer: SiteId) {
        self.add_peer(peer);
        self.debug_check();
    }

    fn add_peer(&mut self, peer: SiteId) {
        if peer == self.me
            || self.eager.contains(&peer)
            || self.lazy.contains(&peer)
            || self.passive.contains(&peer)
        {
            return;
        }
        if !self.probe_queue.is_empty()
            && self.fast_probes + self.probe_queue.len() < self.config.probe_sample
        {
            self.probe_queue.push_back(peer);
        }
        let known = (self.eager.len() + self.lazy.len() + self.passive.len() + 1) as u64;
        // The far links are a uniform sample of the members (reservoir sampling), so they
        // point anywhere in the cluster whatever the join order.
        if self.config.far_peers > 0
            && (self.far.len() < self.config.far_peers
                || self.next_random() % known < self.config.far_peers as u64)
        {
            if self.far.len() >= self.config.far_peers {
                let far = self.far.clone();
                if let Some(out) = self.pick(&far, &BTreeSet::new()) {
                    self.far.remove(&out);
                    self.release(out);
                }
            }
            self.far.insert(peer);
            self.ask_keep(peer);
        }
        if self.eager.len() < self.config.eager_peers_max {
            self.eager.insert(peer);
        } else if self.lazy.len() < self.config.lazy_peers_max {
            self.lazy.insert(peer);
        } else {
            // Reservoir sampling: the active view stays a uniform sample of all members, so
            // every node sits in about as many views as it has, whatever the join order.
            let active = (self.config.eager_peers_max + self.config.lazy_peers_max) as u64;
            if self.config.lazy_peers_max > 0 && self.next_random() % known < active {
                let lazy = self.lazy.clone();
                if let Some(out) = self.pick(&lazy, &BTreeSet::new()) {
                    self.lazy.remove(&out);
                    self.passive.insert(out);
                }
                self.lazy.insert(peer);
            } else {
                self.passive.insert(peer);
            }
        }
    }

    /// A peer left or failed: its place in the active view is refilled.
    pub fn peer_down(&mut self, peer: SiteId) {
        self.remove_peer(peer);
        self.debug_check();
    }

    fn remove_peer(&mut self, peer: SiteId) {
        self.eager.remove(&peer);
        self.lazy.remove(&peer);
        self.passive.remove(&peer);
        self.pending_ihave.remove(&peer);
        self.rtt_ms.remove(&peer);
        self.children.remove(&peer);
        self.pending_keep.remove(&peer);
        self.pending_release.remove(&peer);
        for (_, announcers) in self.missing.values_mut() {
            announcers.retain(|p| *p != peer);
        }
        if self.near.remove(&peer) {
            self.choose_near();
        }
        if self.far.remove(&peer) {
            let members = self.members();
            let taken: BTreeSet<SiteId> = self.far.union(&self.near).copied().collect();
            if let Some(replacement) = self.pick(&members, &taken) {
                self.far.insert(replacement);
                self.ask_keep(replacement);
            }
        }
        // Keep the tree connected: promote a lazy peer (or a passive one) in its place.
        if self.eager.len() < self.config.eager_peers_max {
            let lazy = self.lazy.clone();
            if let Some(promoted) = self.pick(&lazy, &BTreeSet::new()) {
                self.lazy.remove(&promoted);
                self.eager.insert(promoted);
            }
        }
        while self.lazy.len() < self.config.lazy_peers_max {
            let passive = self.passive.clone();
            match self.pick(&passive, &BTreeSet::new()) {
                Some(p) => {
                    self.passive.remove(&p);
                    self.lazy.insert(p);
                }
                None => break,
            }
        }
    }

    /// True while announcements wait to be sent or announced ids wait for their graft: the
    /// caller should tick soon.
    pub fn has_pending(&self) -> bool {
        !self.pending_ihave.is_empty()
            || !self.missing.is_empty()
            || !self.pending_keep.is_empty()
            || !self.pending_release.is_empty()
    }

    /// The earliest time a tick has something to do besides what [`Broadcast::has_pending`]
    /// reports (which is due at once): the next round-trip probe, the next kept-link refresh, the
    /// next graft.
    pub fn next_due(&self) -> Millis {
        let probe = (self.config.probe_interval_ms > 0).then_some(self.next_probe_at);
        let graft = self.missing.values().map(|(due, _)| *due).min();
        [probe, graft]
            .into_iter()
            .flatten()
            .fold(self.next_keep_refresh_at, Millis::min)
    }

    /// A changeset committed here: push it to eager peers, announce it to lazy ones.
    pub fn local_commit(&mut self, changeset: Arc<Changeset>) -> Vec<Effect> {
        let mut effects = Vec::new();
        if crate::chunk::estimate_bytes(&changeset) <= self.config.part_bytes {
            self.commit_part(changeset, true, &mut effects);
        } else {
            // A changeset in parts is not widened: its extra copies would multiply the
            // writer's upload by the parts, and compete with the copies that must arrive.
            for part in crate::chunk::split(&changeset, self.config.part_bytes) {
                self.commit_part(Arc::new(part), false, &mut effects);
            }
        }
        self.debug_check();
        effects
    }

    /// The state machine's invariants, asserted in debug builds at the end of every input
    /// handler, so the model checker and the simulator check them in every state they reach.
    fn debug_check(&self) {
        if !cfg!(debug_assertions) {
            return;
        }
        let me = &self.me;
        let peer_sets = [
            &self.eager,
            &self.lazy,
            &self.passive,
            &self.near,
            &self.far,
        ];
        debug_assert!(
            peer_sets.iter().all(|set| !set.contains(me)) && !self.children.contains_key(me),
            "a node is its own peer"
        );
        debug_assert!(
            self.eager.is_disjoint(&self.lazy)
                && self.eager.is_disjoint(&self.passive)
                && self.lazy.is_disjoint(&self.passive),
            "a member in two of the eager, lazy and passive sets"
        );
        // Not asserted: a bound on the tree's active view. A graft from a member outside it
        // (passive, or not yet known) makes that member eager, so with the optional tree on,
        // eager + lazy can grow past eager_peers_max + lazy_peers_max (found by this check
        // in `sends_per_change_stay_small`; the tree is off by default).
        debug_assert!(
            self.near.len() <= self.config.near_peers && self.far.len() <= self.config.far_peers,
            "more kept links asked for than configured"
        );
        debug_assert!(
            self.children.len() <= CHILDREN_MAX,
            "more kept links given than allowed"
        );
        debug_assert!(
            self.seen.len() == self.seen_order.len() && self.seen.len() <= self.config.seen_max,
            "the dedup memory lost its bound"
        );
        debug_assert!(
            self.cache.len() <= self.config.cache_max,
            "the graft cache lost its bound"
        );
        debug_assert!(
            self.missing.len() <= self.config.missing_max
                && self.missing.keys().all(|id| !self.seen.contains(id)),
            "a missing id is unbounded or already seen"
        );
    }

    /// Broadcasts one changeset committed here, or one part of it; `widen`: see
    /// [`Broadcast::widen_first_hop`].
    fn commit_part(&mut self, changeset: Arc<Changeset>, widen: bool, effects: &mut Vec<Effect>) {
        if self.remember(changeset.part_id()) {
            self.forward(&changeset, None, effects);
            // Our own changes also go up our kept links: a node that nobody asked for kept
            // links (it happens to a few) would otherwise reach nobody.
            let parents: Vec<SiteId> = self.near.union(&self.far).copied().collect();
            let mut sent: BTreeSet<SiteId> =
                self.children.keys().chain(&self.eager).copied().collect();
            for peer in parents {
                if sent.insert(peer) {
                    effects.push(Effect::Send {
                        to: peer,
                        msg: BroadcastMsg::KeptGossip(changeset.clone()),
                    });
                    self.stats.gossip_sent += 1;
                }
            }
            if widen {
                self.widen_first_hop(&changeset, &sent, effects);
            }
        }
    }

    /// A changeset committed here also goes straight to a few more members picked at random,
    /// so that its first hop reaches `origin_fanout` members instead of the kept links' dozen:
    /// in a large cluster that saves a whole hop of the spread (five hops of 100 ms become
    /// four at 1,000 nodes, in the simulator) for a few dozen sends by one node per write. At
    /// most one member in [`ORIGIN_FANOUT_SHARE`] is reached this way, so small clusters, where
    /// the hops are few anyway, send as before (below 16 times the copies the writer sends
    /// already: about 200 members for a writer feeding six). Not with the optional tree: a
    /// receiver would take the tree's copy, arriving after this one, for a redundant link and
    /// prune it.
    fn widen_first_hop(
        &mut self,
        changeset: &Arc<Changeset>,
        sent: &BTreeSet<SiteId>,
        effects: &mut Vec<Effect>,
    ) {
        if self.config.eager_peers_max > 0 {
            return;
        }
        let known = self.eager.len() + self.lazy.len() + self.passive.len();
        let target = self.config.origin_fanout.min(known / ORIGIN_FANOUT_SHARE);
        let count = target.saturating_sub(sent.len());
        if count == 0 {
            return;
        }
        let members = self.members();
        let mut candidates: Vec<SiteId> = members.difference(sent).copied().collect();
        // A random order, of which the caller uses a prefix: the first `count` it can reach
        // cheaply (the engine skips members it has no connection or kept key for).
        let shuffled = candidates.len().min(count * ORIGIN_CANDIDATES_PER_SEND);
        for i in 0..shuffled {
            let j = i + (self.next_random() % (candidates.len() - i) as u64) as usize;
            candidates.swap(i, j);
        }
        candidates.truncate(shuffled);
        // Not counted in `gossip_sent`: the caller counts the copies it sends.
        effects.push(Effect::SendToSome {
            candidates,
            count,
            msg: BroadcastMsg::KeptGossip(changeset.clone()),
        });
    }

    fn forward(
        &mut self,
        changeset: &Arc<Changeset>,
        from: Option<SiteId>,
        effects: &mut Vec<Effect>,
    ) {
        self.cache(changeset);
        for peer in self.children.keys().filter(|p| Some(**p) != from) {
            effects.push(Effect::Send {
                to: *peer,
                msg: BroadcastMsg::KeptGossip(changeset.clone()),
            });
            self.stats.gossip_sent += 1;
        }
        for peer in self
            .eager
            .iter()
            .filter(|p| Some(**p) != from && !self.children.contains_key(p))
        {
            effects.push(Effect::Send {
                to: *peer,
                msg: BroadcastMsg::Gossip(changeset.clone()),
            });
            self.stats.gossip_sent += 1;
        }
        // Announce to every lazy peer: the tree's backup links. A node whose eager links were
        // pruned still hears of every id from its lazy peers and grafts what it lacks.
        for peer in self.lazy.iter().filter(|p| Some(**p) != from) {
            let queue = self.pending_ihave.entry(*peer).or_default();
            if queue.len() < self.config.ihave_batch_max * 4 {
                queue.push(changeset.part_id());
            }
        }
    }

    /// True if this node has seen the changeset (or part) `id` (delivered it, or sent it).
    pub fn has_seen(&self, id: &PartId) -> bool {
        self.seen.contains(id)
    }

    /// A changeset (or part) anti-entropy sync brought, already applied by the caller: if
    /// broadcast has not seen it, it goes on from here as if it had just arrived (to the
    /// members fed by this node), so what the broadcast missed spreads by broadcast again
    /// rather than by one sync round per node. Nodes that hold it drop it as a duplicate.
    pub fn relay(&mut self, changeset: Arc<Changeset>) -> Vec<Effect> {
        let mut effects = Vec::new();
        if self.remember(changeset.part_id()) {
            self.missing.remove(&changeset.part_id());
            self.stats.relayed += 1;
            self.forward(&changeset, None, &mut effects);
        }
        self.debug_check();
        effects
    }

    /// A copy of a changeset (or part) from a peer, known by its part id alone, as a receiver
    /// can read it from a message's first bytes: if this node has seen it, handled as
    /// [`Broadcast::receive`] handles a copy seen before (it needs nothing of the changes), and
    /// `None` otherwise, when the caller decodes the whole message and calls `receive`. Five
    /// of the six copies a node receives of each write are such copies; decoding their changes
    /// only to drop them was a tenth of what handling a message costs.
    pub fn receive_seen_copy(
        &mut self,
        from: SiteId,
        kept: bool,
        part: &PartId,
    ) -> Option<Vec<Effect>> {
        if !self.seen.contains(part) {
            return None;
        }
        let mut effects = Vec::new();
        if from != self.me {
            self.copy_seen(from, kept, part.id.site, &mut effects);
        }
        self.debug_check();
        Some(effects)
    }

    /// A copy of a changeset this node has seen, from `from`, over a kept link or not.
    fn copy_seen(&mut self, from: SiteId, kept: bool, author: SiteId, effects: &mut Vec<Effect>) {
        self.stats.duplicates += 1;
        if kept {
            // Expected: the receiver asked for every changeset over this link.
            self.release_stale_parent(from, true, author, effects);
        } else {
            // A second copy: this tree link is redundant, make it lazy on both ends.
            self.demote(from);
            effects.push(Effect::Send {
                to: from,
                msg: BroadcastMsg::Prune,
            });
            self.stats.prunes_sent += 1;
        }
    }

    /// A message from a peer.
    pub fn receive(&mut self, now: Millis, from: SiteId, msg: BroadcastMsg) -> Vec<Effect> {
        let effects = self.handle_message(now, from, msg);
        self.debug_check();
        effects
    }

    fn handle_message(&mut self, now: Millis, from: SiteId, msg: BroadcastMsg) -> Vec<Effect> {
        let mut effects = Vec::new();
        if from == self.me {
            return effects;
        }
        let kept = matches!(msg, BroadcastMsg::KeptGossip(_));
        match msg {
            BroadcastMsg::Gossip(changeset) | BroadcastMsg::KeptGossip(changeset)
                if self.remember(changeset.part_id()) =>
            {
                self.stats.delivered += 1;
                self.missing.remove(&changeset.part_id());
                effects.push(Effect::Deliver(changeset.clone()));
                // A tree link carries traffic both ways (the tree is shared by all authors);
                // a kept link only the way it was asked for.
                if !kept {
                    self.make_eager(from);
                }
                self.release_stale_parent(from, kept, changeset.id.site, &mut effects);
                self.forward(&changeset, Some(from), &mut effects);
            }
            BroadcastMsg::KeptGossip(changeset) | BroadcastMsg::Gossip(changeset) => {
                self.copy_seen(from, kept, changeset.id.site, &mut effects);
            }
            BroadcastMsg::IHave(ids) => {
                // Links are symmetric: whoever announces to us is in our view too, room
                // permitting.
                if !self.eager.contains(&from)
                    && !self.lazy.contains(&from)
                    && self.lazy.len() < self.config.lazy_peers_max
                {
                    self.passive.remove(&from);
                    self.lazy.insert(from);
                }
                for id in ids {
                    if self.seen.contains(&id) {
                        continue;
                    }
                    if let Some((_, announcers)) = self.missing.get_mut(&id) {
                        if !announcers.contains(&from) && announcers.len() < 8 {
                            announcers.push(from);
                        }
                    } else if self.missing.len() < self.config.missing_max {
                        self.missing
                            .insert(id, (now.plus(self.config.graft_timeout_ms), vec![from]));
                    }
                }
            }
            BroadcastMsg::Graft(ids) => {
                self.make_eager(from);
                for id in ids {
                    if let Some(cs) = self.cache.get(&id) {
                        effects.push(Effect::Send {
                            to: from,
                            msg: BroadcastMsg::Gossip(cs.clone()),
                        });
                        self.stats.gossip_sent += 1;
                    }
                }
            }
            BroadcastMsg::Prune => {
                self.children.remove(&from);
                self.demote(from);
            }
            BroadcastMsg::Keep => {
                if self.children.len() < CHILDREN_MAX || self.children.contains_key(&from) {
                    self.children.insert(from, now);
                }
            }
            BroadcastMsg::Ping(sent_at) => effects.push(Effect::Send {
                to: from,
                msg: BroadcastMsg::Pong(sent_at),
            }),
            BroadcastMsg::Pong(sent_at) => {
                let known = self.eager.contains(&from)
                    || self.lazy.contains(&from)
                    || self.passive.contains(&from);
                // Only plausible answers count: from a member, with a clock value not in our
                // future and at most a minute old.
                if known && sent_at <= now.0 && now.0 - sent_at <= 60_000 {
                    let sample = now.0 - sent_at;
                    let smoothed = match self.rtt_ms.get(&from) {
                        Some(old) => (old * 3 + sample) / 4,
                        None => sample,
                    };
                    self.rtt_ms.insert(from, smoothed);
                    // Choosing again costs a sort of every measured member: only when this
                    // sample can change the choice.
                    let worst = self
                        .near
                        .iter()
                        .filter_map(|p| self.rtt_ms.get(p))
                        .max()
                        .copied()
                        .unwrap_or(0);
                    if self.near.len() < self.config.near_peers
                        || self.near.contains(&from)
                        || smoothed + (worst / 5).max(2) <= worst
                    {
                        self.choose_near();
                    }
                }
            }
        }
        effects
    }

    /// Every member this node knows (active and passive views).
    fn members(&self) -> BTreeSet<SiteId> {
        self.eager
            .iter()
            .chain(&self.lazy)
            .chain(&self.passive)
            .copied()
            .collect()
    }

    /// Time passes: flush batched announcements, graft what did not arrive in time, probe.
    pub fn tick(&mut self, now: Millis) -> Vec<Effect> {
        let effects = self.on_tick(now);
        self.debug_check();
        effects
    }

    fn on_tick(&mut self, now: Millis) -> Vec<Effect> {
        let mut effects = Vec::new();
        if self.config.probe_interval_ms > 0 && now >= self.next_probe_at {
            if let Some(peer) = self.probe_target() {
                effects.push(Effect::Send {
                    to: peer,
                    msg: BroadcastMsg::Ping(now.0),
                });
                self.stats.pings_sent += 1;
            }
            let members = self.eager.len() + self.lazy.len() + self.passive.len();
            let interval = if self.probing_fast(members) {
                self.fast_probes += 1;
                self.config.probe_interval_ms
            } else {
                self.config.probe_interval_ms * PROBE_SLOW_FACTOR
            };
            // Jitter (up to half an interval) keeps nodes from probing in step.
            let jitter = self.next_random() % (interval / 2 + 1);
            self.next_probe_at = now.plus(interval + jitter);
        }
        if now >= self.next_keep_refresh_at {
            // Repeat the requests (a lost one, or a parent that restarted, is healed) and
            // forget children that stopped repeating theirs.
            self.next_keep_refresh_at = now.plus(KEEP_REFRESH_MS);
            let parents: Vec<SiteId> = self.near.union(&self.far).copied().collect();
            for peer in parents {
                self.ask_keep(peer);
            }
            let expiry = now.0.saturating_sub(3 * KEEP_REFRESH_MS);
            self.children.retain(|_, asked| asked.0 >= expiry);
        }
        for peer in std::mem::take(&mut self.pending_keep) {
            effects.push(Effect::Send {
                to: peer,
                msg: BroadcastMsg::Keep,
            });
        }
        for peer in std::mem::take(&mut self.pending_release) {
            effects.push(Effect::Send {
                to: peer,
                msg: BroadcastMsg::Prune,
            });
            self.stats.prunes_sent += 1;
        }
        for (peer, ids) in std::mem::take(&mut self.pending_ihave) {
            if !self.lazy.contains(&peer) && !self.eager.contains(&peer) {
                continue;
            }
            for chunk in ids.chunks(self.config.ihave_batch_max.max(1)) {
                effects.push(Effect::Send {
                    to: peer,
                    msg: BroadcastMsg::IHave(chunk.to_vec()),
                });
                self.stats.ihave_sent += 1;
            }
        }
        let mut grafts: BTreeMap<SiteId, Vec<PartId>> = BTreeMap::new();
        let mut dropped = Vec::new();
        for (id, (due, announcers)) in self.missing.iter_mut() {
            if *due > now {
                continue;
            }
            if announcers.is_empty() {
                dropped.push(*id);
                continue;
            }
            // Ask the first announcer; if that fails too, the next one after another timeout.
            let peer = announcers.remove(0);
            grafts.entry(peer).or_default().push(*id);
            *due = now.plus(self.config.graft_timeout_ms);
        }
        for id in dropped {
            // Nobody left to ask: anti-entropy sync will bring it.
            self.missing.remove(&id);
        }
        for (peer, ids) in grafts {
            self.make_eager(peer);
            effects.push(Effect::Send {
                to: peer,
                msg: BroadcastMsg::Graft(ids),
            });
            self.stats.grafts_sent += 1;
        }
        effects
    }
}

#[cfg(test)]
mod tests;
