//! The apply decision, written once: what a replica does with a remote changeset (or a part of
//! one). The in-memory node (`node::Node`, which the model checker and the simulator run) and
//! the engine's SQLite store both call [`apply_changeset`] with their own storage behind
//! [`ApplyTarget`], so the rule the model checks is the rule the agents run.
//!
//! The rule: a changeset of our own, or one bookkeeping already has, is skipped; a part is kept
//! until the parts cover the changeset, which is then applied whole (a whole copy arriving by
//! another path makes the kept parts moot); a whole changeset is merged all or nothing, then
//! recorded as applied, or as cleared when it holds no change.

use crate::change::{Changeset, ChangesetId};
use crate::ids::SiteId;
use crate::versions::Bookkeeping;

/// What keeping a part did.
#[derive(Debug)]
pub enum PartStep<R> {
    /// The parts now cover the changeset: here it is, whole.
    Complete(Changeset),
    /// Kept (or nothing new); more parts are needed.
    Buffered,
    /// Refused (a bad part, no room); nothing was kept.
    Rejected(R),
}

/// A replica's storage, as the apply decision uses it. `Rejection` refuses one changeset (the
/// others of a batch go on); `Error` fails the whole attempt (I/O).
pub trait ApplyTarget {
    /// Why one changeset was refused.
    type Rejection;
    /// What stops everything.
    type Error;
    /// What a merge reports.
    type Merged;

    /// Keeps a part of a large changeset.
    fn keep_part(&mut self, part: &Changeset) -> Result<PartStep<Self::Rejection>, Self::Error>;
    /// Forgets kept parts of a changeset that arrived whole.
    fn forget_parts(&mut self, id: ChangesetId) -> Result<(), Self::Error>;
    /// Validates and merges a whole changeset, all or nothing: Ok(Err(rejection)) when it was
    /// refused and nothing of it was written.
    fn merge(
        &mut self,
        whole: &Changeset,
    ) -> Result<Result<Self::Merged, Self::Rejection>, Self::Error>;
}

/// What became of one remote changeset.
#[derive(Debug)]
pub enum Applied<M, R> {
    /// Merged now, and recorded in bookkeeping.
    Merged(ChangesetId, M),
    /// A part, kept until the others arrive.
    Buffered,
    /// Our own, or already applied: nothing done.
    Known,
    /// Refused; nothing of it was applied.
    Rejected(R),
}

/// Deliberate bugs of the apply path, for the model checker's tests. All off by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ApplyFaults {
    /// The first part of a large changeset marks the whole changeset applied, so its other
    /// parts are skipped as known.
    pub part_marks_applied: bool,
}

/// Applies one remote changeset (or part) to `target` by the rule above, recording it in
/// `book` (`me` is this replica's site).
pub fn apply_changeset<T: ApplyTarget>(
    target: &mut T,
    me: SiteId,
    book: &mut Bookkeeping,
    changeset: &Changeset,
    faults: ApplyFaults,
) -> Result<Applied<T::Merged, T::Rejection>, T::Error> {
    let id = changeset.id;
    if id.site == me || book.contains(id) {
        return Ok(Applied::Known);
    }
    let assembled;
    let whole = if changeset.is_whole() {
        target.forget_parts(id)?;
        changeset
    } else {
        match target.keep_part(changeset)? {
            PartStep::Complete(whole) => {
                assembled = whole;
                &assembled
            }
            PartStep::Buffered => {
                if faults.part_marks_applied {
                    book.mark_applied(id);
                }
                return Ok(Applied::Buffered);
            }
            PartStep::Rejected(why) => return Ok(Applied::Rejected(why)),
        }
    };
    Ok(match target.merge(whole)? {
        Ok(merged) => {
            if whole.is_cleared() {
                book.mark_cleared(id);
            } else {
                book.mark_applied(id);
            }
            Applied::Merged(id, merged)
        }
        Err(why) => Applied::Rejected(why),
    })
}
