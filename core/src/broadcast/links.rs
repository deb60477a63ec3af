//! Kept links and round-trip probes: which members a node asks to feed it (the nearest it
//! measured, and a few at random), refreshing and releasing them, and whom to probe next.

use super::*;

impl Broadcast {
    /// The near links become the `near_peers` measured members with the lowest round-trip
    /// time; ties are broken by a hash salted per node.
    pub(super) fn choose_near(&mut self) {
        let salt = self.salt;
        let tie = |p: &SiteId| {
            let mut h = salt;
            for chunk in p.0.chunks(8) {
                let mut word = [0u8; 8];
                word[..chunk.len()].copy_from_slice(chunk);
                h = (h ^ u64::from_le_bytes(word)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                h ^= h >> 29;
            }
            h
        };
        let mut by_rtt: Vec<(u64, u64, SiteId)> =
            self.rtt_ms.iter().map(|(p, r)| (*r, tie(p), *p)).collect();
        by_rtt.sort();
        // Keep the current near peers that are still measured; fill up from the nearest; then
        // swap the worst for a better one only by a clear margin, so that measurement noise
        // does not churn the links.
        let mut chosen: Vec<(u64, u64, SiteId)> = by_rtt
            .iter()
            .filter(|(_, _, p)| self.near.contains(p))
            .copied()
            .collect();
        chosen.truncate(self.config.near_peers);
        for candidate in &by_rtt {
            if chosen.len() >= self.config.near_peers {
                break;
            }
            if !chosen.contains(candidate) {
                chosen.push(*candidate);
            }
        }
        chosen.sort();
        for candidate in &by_rtt {
            let Some(worst) = chosen.last().copied() else {
                break;
            };
            if chosen.contains(candidate) {
                continue;
            }
            let margin = (worst.0 / 5).max(2);
            if candidate.0 + margin > worst.0 {
                break;
            }
            chosen.pop();
            chosen.push(*candidate);
            chosen.sort();
        }
        let chosen: BTreeSet<SiteId> = chosen.into_iter().map(|(_, _, p)| p).collect();
        for peer in chosen.difference(&self.near).copied().collect::<Vec<_>>() {
            if !self.far.contains(&peer) {
                self.ask_keep(peer);
            }
        }
        for peer in self.near.difference(&chosen).copied().collect::<Vec<_>>() {
            if !self.far.contains(&peer) {
                self.release(peer);
            }
        }
        self.near = chosen;
    }

    pub(super) fn ask_keep(&mut self, peer: SiteId) {
        self.pending_release.remove(&peer);
        self.pending_keep.insert(peer);
    }

    pub(super) fn release(&mut self, peer: SiteId) {
        // A request not sent yet is simply dropped.
        if !self.pending_keep.remove(&peer) {
            self.pending_release.insert(peer);
        }
    }

    /// A changeset over a kept link we no longer want (our release was lost, or crossed it):
    /// release it again. `author` wrote the changeset.
    pub(super) fn release_stale_parent(
        &mut self,
        from: SiteId,
        kept: bool,
        author: SiteId,
        effects: &mut Vec<Effect>,
    ) {
        // A changeset straight from its author is a widened first hop
        // (`BroadcastConfig::origin_fanout`), not a link.
        if kept
            && from != author
            && !self.near.contains(&from)
            && !self.far.contains(&from)
            && !self.children.contains_key(&from)
        {
            effects.push(Effect::Send {
                to: from,
                msg: BroadcastMsg::Prune,
            });
            self.stats.prunes_sent += 1;
        }
    }

    /// True while the first probe round runs: fewer than `probe_sample` fast probes sent and
    /// fewer members measured than there are (up to the sample).
    pub(super) fn probing_fast(&self, members: usize) -> bool {
        self.fast_probes < self.config.probe_sample
            && self.rtt_ms.len() < self.config.probe_sample.min(members)
    }

    /// The next member to probe: the first round goes over a random sample of the members, later
    /// ones over the near peers and a few more random members.
    pub(super) fn probe_target(&mut self) -> Option<SiteId> {
        // Rounds over a random sample of the members (new members join the current round),
        // the near peers always included so their times stay fresh: constant work per probe,
        // and probes alone never make a node talk to every member of a large cluster at once
        // (each new partner costs a QUIC handshake and a pooled connection).
        if self.probe_queue.is_empty() {
            let mut round: Vec<SiteId> = self.members().into_iter().collect();
            let sample = if self.probing_fast(round.len()) {
                self.config.probe_sample - self.fast_probes
            } else {
                PROBE_SLOW_NEW
            };
            for i in (1..round.len()).rev() {
                let j = (self.next_random() % (i as u64 + 1)) as usize;
                round.swap(i, j);
            }
            round.retain(|p| !self.near.contains(p));
            round.truncate(sample);
            round.extend(self.near.iter().copied());
            self.probe_queue = round.into();
        }
        while let Some(peer) = self.probe_queue.pop_front() {
            if self.eager.contains(&peer)
                || self.lazy.contains(&peer)
                || self.passive.contains(&peer)
            {
                return Some(peer);
            }
        }
        None
    }
}
