//! The optional Plumtree tree: moving peers between the eager, lazy and passive sets.

use super::*;

impl Broadcast {
    pub(super) fn pick(
        &mut self,
        from: &BTreeSet<SiteId>,
        exclude: &BTreeSet<SiteId>,
    ) -> Option<SiteId> {
        let candidates: Vec<SiteId> = from.difference(exclude).copied().collect();
        if candidates.is_empty() {
            return None;
        }
        let i = (self.next_random() % candidates.len() as u64) as usize;
        Some(candidates[i])
    }

    /// A tree link found redundant stops being eager; it stays in the active view as a lazy
    /// link while there is room, else it waits in the passive set.
    pub(super) fn demote(&mut self, peer: SiteId) {
        if !self.eager.remove(&peer) {
            return;
        }
        if self.lazy.len() < self.config.lazy_peers_max {
            self.lazy.insert(peer);
        } else {
            self.passive.insert(peer);
        }
    }

    pub(super) fn make_eager(&mut self, peer: SiteId) {
        self.lazy.remove(&peer);
        self.passive.remove(&peer);
        self.eager.insert(peer);
    }
}
