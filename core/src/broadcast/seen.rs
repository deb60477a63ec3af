//! The dedup cache: ids seen (so a changeset is delivered once) and recent changesets kept to
//! answer grafts. Both bounded, oldest out first.

use std::sync::Arc;

use super::Broadcast;
use crate::change::{Changeset, PartId};

impl Broadcast {
    /// Records an id as seen; false if it already was.
    pub(super) fn remember(&mut self, id: PartId) -> bool {
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

    pub(super) fn cache(&mut self, changeset: &Arc<Changeset>) {
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
}
