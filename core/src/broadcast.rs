//! Broadcast of changesets: a Plumtree-style epidemic broadcast tree, sans IO.
//!
//! Each node keeps its peers in two sets. *Eager* peers receive every new changeset in full at
//! once; *lazy* peers only receive its id, batched ("I have"). The first copy of a changeset
//! that arrives makes its sender an eager peer; a duplicate makes the sender lazy and tells it
//! so (*prune*). The eager links thus shrink to a spanning tree, so most nodes send each
//! changeset once or twice. When an id is announced but its payload does not follow within
//! `graft_timeout_ms`, the node asks an announcer for it (*graft*), which also repairs the tree.
//!
//! Inputs are method calls with the current time; outputs are [`Effect`]s for the caller to
//! perform. Peer selection uses a seeded generator owned by the state machine, so a run is a
//! function of its inputs and seed. Every collection is bounded (see [`BroadcastConfig`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use crate::change::{Changeset, PartId};
use crate::ids::SiteId;

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
    /// Eager peers kept (the tree's out-degree before pruning). 1..=32.
    pub eager_peers_max: usize,
    /// Lazy peers kept in the active view; every one of them is told about every changeset
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
    /// Eager links a node keeps however many duplicates arrive: pruning every redundant link
    /// leaves a minimal, deep tree; a little redundancy makes it shallower. 0..=eager_peers_max.
    pub eager_keep_min: usize,
}

impl Default for BroadcastConfig {
    fn default() -> Self {
        BroadcastConfig {
            eager_peers_max: 4,
            lazy_peers_max: 8,
            graft_timeout_ms: 80,
            seen_max: 65_536,
            cache_max: 4_096,
            missing_max: 16_384,
            ihave_batch_max: 256,
            eager_keep_min: 0,
        }
    }
}

/// A broadcast message between two nodes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BroadcastMsg {
    /// A changeset in full (eager push).
    Gossip(Arc<Changeset>),
    /// Ids the sender has (lazy push).
    IHave(Vec<PartId>),
    /// "Send me these, and make me an eager peer."
    Graft(Vec<PartId>),
    /// "Stop pushing to me eagerly."
    Prune,
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
}

/// Broadcast state of one node.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Broadcast {
    me: SiteId,
    config: BroadcastConfig,
    rng: u64,
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
    stats: BroadcastStats,
}

impl Broadcast {
    /// A node with no peers. `seed` drives peer selection.
    pub fn new(me: SiteId, config: BroadcastConfig, seed: u64) -> Self {
        Broadcast {
            me,
            config,
            rng: seed ^ 0x9e37_79b9_7f4a_7c15,
            eager: BTreeSet::new(),
            lazy: BTreeSet::new(),
            passive: BTreeSet::new(),
            seen: BTreeSet::new(),
            seen_order: VecDeque::new(),
            cache: BTreeMap::new(),
            cache_order: VecDeque::new(),
            missing: BTreeMap::new(),
            pending_ihave: BTreeMap::new(),
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

    /// Current eager peers.
    pub fn eager_peers(&self) -> &BTreeSet<SiteId> {
        &self.eager
    }

    /// Current lazy peers.
    pub fn lazy_peers(&self) -> &BTreeSet<SiteId> {
        &self.lazy
    }

    /// Ids announced but not yet received.
    pub fn missing_count(&self) -> usize {
        self.missing.len()
    }

    /// SplitMix64: small, seedable, good enough to pick peers.
    fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A peer joined: it becomes eager while there is room, then lazy, then passive.
    pub fn peer_up(&mut self, peer: SiteId) {
        if peer == self.me
            || self.eager.contains(&peer)
            || self.lazy.contains(&peer)
            || self.passive.contains(&peer)
        {
            return;
        }
        if self.eager.len() < self.config.eager_peers_max {
            self.eager.insert(peer);
        } else if self.lazy.len() < self.config.lazy_peers_max {
            self.lazy.insert(peer);
        } else {
            // Reservoir sampling: the active view stays a uniform sample of all members, so
            // every node sits in about as many views as it has, whatever the join order.
            let active = (self.config.eager_peers_max + self.config.lazy_peers_max) as u64;
            let known = (self.eager.len() + self.lazy.len() + self.passive.len() + 1) as u64;
            if self.next_random() % known < active {
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
        self.eager.remove(&peer);
        self.lazy.remove(&peer);
        self.passive.remove(&peer);
        self.pending_ihave.remove(&peer);
        for (_, announcers) in self.missing.values_mut() {
            announcers.retain(|p| *p != peer);
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

    fn pick(&mut self, from: &BTreeSet<SiteId>, exclude: &BTreeSet<SiteId>) -> Option<SiteId> {
        let candidates: Vec<SiteId> = from.difference(exclude).copied().collect();
        if candidates.is_empty() {
            return None;
        }
        let i = (self.next_random() % candidates.len() as u64) as usize;
        Some(candidates[i])
    }

    /// Records an id as seen; false if it already was.
    fn remember(&mut self, id: PartId) -> bool {
        if !self.seen.insert(id) {
            return false;
        }
        self.seen_order.push_back(id);
        while self.seen_order.len() > self.config.seen_max {
            if let Some(old) = self.seen_order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }

    fn cache(&mut self, changeset: &Arc<Changeset>) {
        if self.config.cache_max == 0 {
            return;
        }
        self.cache.insert(changeset.part_id(), changeset.clone());
        self.cache_order.push_back(changeset.part_id());
        while self.cache_order.len() > self.config.cache_max {
            if let Some(old) = self.cache_order.pop_front() {
                self.cache.remove(&old);
            }
        }
    }

    /// True if the part was seen (delivered or committed here) recently.
    pub fn has_seen(&self, id: &PartId) -> bool {
        self.seen.contains(id)
    }

    /// True while announcements wait to be sent or announced ids wait for their graft: the
    /// caller should tick soon.
    pub fn has_pending(&self) -> bool {
        !self.pending_ihave.is_empty() || !self.missing.is_empty()
    }

    /// Marks a changeset as known without broadcasting it (e.g. it came by sync).
    pub fn mark_seen(&mut self, id: PartId) {
        self.remember(id);
        self.missing.remove(&id);
    }

    /// A changeset committed here: push it to eager peers, announce it to lazy ones.
    pub fn local_commit(&mut self, changeset: Arc<Changeset>) -> Vec<Effect> {
        let mut effects = Vec::new();
        if self.remember(changeset.part_id()) {
            self.forward(&changeset, None, &mut effects);
        }
        effects
    }

    fn forward(
        &mut self,
        changeset: &Arc<Changeset>,
        from: Option<SiteId>,
        effects: &mut Vec<Effect>,
    ) {
        self.cache(changeset);
        for peer in self.eager.iter().filter(|p| Some(**p) != from) {
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

    /// A message from a peer.
    pub fn receive(&mut self, now: Millis, from: SiteId, msg: BroadcastMsg) -> Vec<Effect> {
        let mut effects = Vec::new();
        if from == self.me {
            return effects;
        }
        match msg {
            BroadcastMsg::Gossip(changeset) => {
                if self.remember(changeset.part_id()) {
                    self.stats.delivered += 1;
                    self.missing.remove(&changeset.part_id());
                    effects.push(Effect::Deliver(changeset.clone()));
                    self.make_eager(from);
                    self.forward(&changeset, Some(from), &mut effects);
                } else {
                    // A second copy: this link is redundant, make it lazy on both ends.
                    self.stats.duplicates += 1;
                    if self.eager.len() > self.config.eager_keep_min && self.eager.remove(&from) {
                        self.lazy.insert(from);
                        effects.push(Effect::Send {
                            to: from,
                            msg: BroadcastMsg::Prune,
                        });
                        self.stats.prunes_sent += 1;
                    }
                }
            }
            BroadcastMsg::IHave(ids) => {
                // Links are symmetric: whoever announces to us is in our view too.
                if !self.eager.contains(&from) && !self.lazy.contains(&from) {
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
                if self.eager.remove(&from) {
                    self.lazy.insert(from);
                }
            }
        }
        effects
    }

    fn make_eager(&mut self, peer: SiteId) {
        self.lazy.remove(&peer);
        self.passive.remove(&peer);
        self.eager.insert(peer);
    }

    /// Time passes: flush batched announcements and graft what did not arrive in time.
    pub fn tick(&mut self, now: Millis) -> Vec<Effect> {
        let mut effects = Vec::new();
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
mod tests {
    use super::*;
    use crate::change::ChangesetId;
    use crate::ids::DbVersion;

    fn site(n: u8) -> SiteId {
        SiteId([n; 16])
    }

    fn changeset(author: u8, version: u64) -> Arc<Changeset> {
        Arc::new(Changeset::whole(
            ChangesetId {
                site: site(author),
                version: DbVersion(version),
            },
            Vec::new(),
        ))
    }

    /// Runs N nodes, fully connected, with a fixed latency, until quiet. Returns deliveries per
    /// node and messages sent.
    fn simulate(n: u8, writes: u64, drop_every: Option<u64>) -> (Vec<BTreeSet<ChangesetId>>, u64) {
        let config = BroadcastConfig::default();
        let mut nodes: Vec<Broadcast> = (0..n)
            .map(|i| Broadcast::new(site(i), config, u64::from(i)))
            .collect();
        for a in 0..n {
            for b in 0..n {
                nodes[a as usize].peer_up(site(b));
            }
        }
        let mut delivered: Vec<BTreeSet<ChangesetId>> = vec![BTreeSet::new(); n as usize];
        // (arrival time, seq, to, from, msg)
        let mut in_flight: BTreeMap<(u64, u64), (u8, u8, BroadcastMsg)> = BTreeMap::new();
        let mut seq = 0u64;
        let mut sent = 0u64;
        let mut now = 0u64;
        let mut push = |in_flight: &mut BTreeMap<(u64, u64), (u8, u8, BroadcastMsg)>,
                        now: u64,
                        from: u8,
                        effects: Vec<Effect>,
                        delivered: &mut BTreeSet<ChangesetId>| {
            for e in effects {
                match e {
                    Effect::Send { to, msg } => {
                        seq += 1;
                        sent += 1;
                        if drop_every.is_some_and(|k| seq.is_multiple_of(k)) {
                            continue;
                        }
                        in_flight.insert((now + 10, seq), (to.0[0], from, msg));
                    }
                    Effect::Deliver(cs) => {
                        delivered.insert(cs.id);
                    }
                }
            }
        };
        for w in 0..writes {
            let author = (w % u64::from(n)) as u8;
            let cs = changeset(author, w + 1);
            delivered[author as usize].insert(cs.id);
            let effects = nodes[author as usize].local_commit(cs);
            push(
                &mut in_flight,
                now,
                author,
                effects,
                &mut delivered[author as usize],
            );
            now += 5;
        }
        for _ in 0..10_000 {
            if in_flight.is_empty()
                && nodes
                    .iter()
                    .all(|n| n.missing_count() == 0 && n.pending_ihave.is_empty())
            {
                break;
            }
            now += 1;
            while let Some((&(at, s), _)) = in_flight.iter().next() {
                if at > now {
                    break;
                }
                let (to, from, msg) = in_flight.remove(&(at, s)).unwrap();
                let effects = nodes[to as usize].receive(Millis(now), site(from), msg);
                push(
                    &mut in_flight,
                    now,
                    to,
                    effects,
                    &mut delivered[to as usize],
                );
            }
            for i in 0..n {
                let effects = nodes[i as usize].tick(Millis(now));
                push(&mut in_flight, now, i, effects, &mut delivered[i as usize]);
            }
        }
        (delivered, sent)
    }

    #[test]
    fn every_write_reaches_every_node() {
        let (delivered, _) = simulate(12, 40, None);
        for d in &delivered {
            assert_eq!(d.len(), 40);
        }
    }

    #[test]
    fn grafts_repair_lost_pushes() {
        // Every 7th message is lost: lazy announcements and grafts make up for it.
        let (delivered, _) = simulate(12, 40, Some(7));
        for d in &delivered {
            assert_eq!(d.len(), 40);
        }
    }

    #[test]
    fn duplicates_prune_the_tree() {
        let mut a = Broadcast::new(site(1), BroadcastConfig::default(), 1);
        a.peer_up(site(2));
        a.peer_up(site(3));
        let cs = changeset(9, 1);
        let first = a.receive(Millis(0), site(2), BroadcastMsg::Gossip(cs.clone()));
        assert!(first.contains(&Effect::Deliver(cs.clone())));
        let second = a.receive(Millis(1), site(3), BroadcastMsg::Gossip(cs));
        assert_eq!(
            second,
            vec![Effect::Send {
                to: site(3),
                msg: BroadcastMsg::Prune
            }]
        );
        assert!(a.lazy_peers().contains(&site(3)));
        assert_eq!(a.stats().duplicates, 1);
    }

    #[test]
    fn a_missing_id_is_grafted_after_the_timeout() {
        let config = BroadcastConfig::default();
        let mut a = Broadcast::new(site(1), config, 1);
        a.peer_up(site(2));
        let id = changeset(9, 1).part_id();
        assert!(a
            .receive(Millis(0), site(2), BroadcastMsg::IHave(vec![id]))
            .is_empty());
        assert!(a.tick(Millis(config.graft_timeout_ms - 1)).is_empty());
        let effects = a.tick(Millis(config.graft_timeout_ms));
        assert_eq!(
            effects,
            vec![Effect::Send {
                to: site(2),
                msg: BroadcastMsg::Graft(vec![id])
            }]
        );
        // The peer answers the graft from its cache.
        let mut b = Broadcast::new(site(2), config, 2);
        b.peer_up(site(1));
        b.local_commit(changeset(9, 1));
        let answer = b.receive(Millis(90), site(1), BroadcastMsg::Graft(vec![id]));
        assert!(
            matches!(&answer[0], Effect::Send { msg: BroadcastMsg::Gossip(cs), .. } if cs.part_id() == id)
        );
    }

    #[test]
    fn bounded_memory() {
        let config = BroadcastConfig {
            seen_max: 10,
            cache_max: 5,
            missing_max: 3,
            ..BroadcastConfig::default()
        };
        let mut a = Broadcast::new(site(1), config, 1);
        a.peer_up(site(2));
        for v in 1..100 {
            a.local_commit(changeset(1, v));
            a.receive(
                Millis(v),
                site(2),
                BroadcastMsg::IHave(vec![changeset(7, v).part_id()]),
            );
        }
        assert!(a.seen.len() <= 10 && a.cache.len() <= 5 && a.missing.len() <= 3);
    }

    #[test]
    fn sends_per_change_stay_small() {
        let n = 20u8;
        let writes = 100u64;
        let (delivered, sent) = simulate(n, writes, None);
        assert!(delivered.iter().all(|d| d.len() == writes as usize));
        let per_change_per_node = sent as f64 / writes as f64 / f64::from(n);
        eprintln!("{n} nodes, {writes} writes: {per_change_per_node:.2} sends per change per node");
        // A spanning tree needs n - 1 pushes per change; lazy announcements add a little.
        assert!(per_change_per_node < 6.0, "{per_change_per_node}");
    }

    #[test]
    fn a_kept_minimum_of_eager_links_is_never_pruned() {
        let config = BroadcastConfig {
            eager_keep_min: 2,
            ..BroadcastConfig::default()
        };
        let mut a = Broadcast::new(site(1), config, 1);
        for p in 2..=4 {
            a.peer_up(site(p));
        }
        let cs = changeset(9, 1);
        a.receive(Millis(0), site(2), BroadcastMsg::Gossip(cs.clone()));
        // Duplicates from the other two: one link is pruned, then the minimum holds.
        let first = a.receive(Millis(1), site(3), BroadcastMsg::Gossip(cs.clone()));
        assert!(first.contains(&Effect::Send {
            to: site(3),
            msg: BroadcastMsg::Prune
        }));
        let second = a.receive(Millis(2), site(4), BroadcastMsg::Gossip(cs));
        assert!(second.is_empty(), "{second:?}");
        assert_eq!(a.eager_peers().len(), 2);
    }
}
