//! The store thread: one OS thread owns the [`Store`] (the only writer) and takes requests
//! from a bounded channel through a [`StoreHandle`]; local commits leave for broadcast, remote
//! changesets are applied in batches, and each commit's changed rows are announced (to
//! subscriptions and `/v1/updates` streams).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use patina_core::change::{Changeset, RowChange};
use patina_core::ids::{DbVersion, SiteId};
use patina_core::sync::{versions_to_send, SyncState};
use tokio::sync::{mpsc, oneshot};

use super::{ApplyOutcome, Digest, Statement, Store, StoreError, TxOutcome};
use crate::metrics::NodeMetrics;

/// Changesets one [`StoreHandle::changesets`] request reads at most, whatever their size: it
/// bounds the index rows a chunk reads (cleared versions weigh nothing in bytes).
const CHANGESETS_PER_REQUEST: usize = 256;

/// Why a transaction was not run.
#[derive(Debug, thiserror::Error)]
pub enum TxError {
    /// The store refused or failed it; nothing was committed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// It waited past its deadline before the store got to it; it was not run.
    #[error("timed out waiting for the store")]
    TimedOut,
    /// The store queue is full.
    #[error("store queue full")]
    Overloaded,
    /// The store thread is gone (shutting down).
    #[error("store unavailable")]
    Unavailable,
}

/// A remote changeset this node committed, and when.
#[derive(Debug, Clone, Copy)]
pub struct AppliedEvent {
    /// The changeset.
    pub id: patina_core::change::ChangesetId,
    /// When its transaction committed here.
    pub at: Instant,
}

/// A snapshot of the store for health checks and table stats.
#[derive(Debug, Clone)]
pub struct StoreStatus {
    /// This node's site id.
    pub site: SiteId,
    /// Its last local version.
    pub db_version: DbVersion,
    /// Versions of other sites heard of but not applied.
    pub gaps: u64,
    /// Replicated tables.
    pub tables: Vec<String>,
    /// Replicated tables whose older rows still lack clocks (see
    /// [`Store::tables_owed_backfill`]).
    pub tables_owed_backfill: Vec<String>,
}

enum StoreRequest {
    Transact {
        statements: Vec<Statement>,
        deadline: Option<Instant>,
        queued_at: Instant,
        reply: oneshot::Sender<Result<TxOutcome, TxError>>,
    },
    Status {
        reply: oneshot::Sender<StoreStatus>,
    },
    Reload {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Apply {
        changesets: Vec<Arc<Changeset>>,
        queued_at: Instant,
    },
    SyncState {
        reply: oneshot::Sender<SyncState>,
    },
    Digest {
        deadline: Option<std::time::Instant>,
        reply: oneshot::Sender<Result<Digest, StoreError>>,
    },
    SyncPlan {
        state: SyncState,
        versions_max: u64,
        reply: oneshot::Sender<Vec<(SiteId, u64, u64)>>,
    },
    Changesets {
        site: SiteId,
        first: u64,
        last: u64,
        bytes_max: usize,
        reply: oneshot::Sender<Result<Vec<Changeset>, StoreError>>,
    },
    FlushDeferred {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

/// The way to the store thread. Cheap to clone.
#[derive(Debug, Clone)]
pub struct StoreHandle {
    tx: mpsc::Sender<StoreRequest>,
    /// The bookkeeping's state hash as of the last request the thread handled (see
    /// `Bookkeeping::state_hash`): read without a request, to answer a sync check.
    state_hash: Arc<AtomicU64>,
}

impl std::fmt::Debug for StoreRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StoreRequest::Transact { .. } => "Transact",
            StoreRequest::Status { .. } => "Status",
            StoreRequest::Reload { .. } => "Reload",
            StoreRequest::Apply { .. } => "Apply",
            StoreRequest::SyncState { .. } => "SyncState",
            StoreRequest::Digest { .. } => "Digest",
            StoreRequest::SyncPlan { .. } => "SyncPlan",
            StoreRequest::Changesets { .. } => "Changesets",
            StoreRequest::FlushDeferred { .. } => "FlushDeferred",
        })
    }
}

impl StoreHandle {
    /// Runs a transaction; a full queue is refused at once rather than waited on.
    pub async fn transact(
        &self,
        statements: Vec<Statement>,
        timeout: Option<Duration>,
    ) -> Result<TxOutcome, TxError> {
        let (reply, rx) = oneshot::channel();
        let deadline = timeout.map(|t| Instant::now() + t);
        self.tx
            .try_send(StoreRequest::Transact {
                statements,
                deadline,
                queued_at: Instant::now(),
                reply,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => TxError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => TxError::Unavailable,
            })?;
        rx.await.map_err(|_| TxError::Unavailable)?
    }

    /// The store's status.
    pub async fn status(&self) -> Option<StoreStatus> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(StoreRequest::Status { reply }).await.ok()?;
        rx.await.ok()
    }

    /// The store's status, asked only if the queue has room now (health must never wait for
    /// a slot that writes need).
    pub async fn status_if_room(&self) -> Option<StoreStatus> {
        let (reply, rx) = oneshot::channel();
        self.tx.try_send(StoreRequest::Status { reply }).ok()?;
        rx.await.ok()
    }

    /// Writes what the store left waiting (local writes' changes-index entries, remote sites'
    /// versions; see `Store`'s `Drop`): a stopping agent asks for it, since nothing waits for
    /// the store thread to end.
    pub async fn flush_deferred(&self) -> Result<(), TxError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(StoreRequest::FlushDeferred { reply })
            .await
            .map_err(|_| TxError::Unavailable)?;
        Ok(rx.await.map_err(|_| TxError::Unavailable)??)
    }

    /// Re-reads the schema files.
    pub async fn reload(&self) -> Result<(), TxError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(StoreRequest::Reload { reply })
            .await
            .map_err(|_| TxError::Unavailable)?;
        Ok(rx.await.map_err(|_| TxError::Unavailable)??)
    }

    /// Hands remote changesets to the store to merge, without waiting. False if the queue is
    /// full (the changesets are dropped; anti-entropy sync brings them later).
    pub fn apply(&self, changesets: Vec<Arc<Changeset>>) -> bool {
        self.tx
            .try_send(StoreRequest::Apply {
                changesets,
                queued_at: Instant::now(),
            })
            .is_ok()
    }

    /// Hands remote changesets to the store, waiting for room in the queue (sync uses this:
    /// it must not lose what it fetched). False if the store is gone.
    pub async fn apply_wait(&self, changesets: Vec<Arc<Changeset>>) -> bool {
        self.tx
            .send(StoreRequest::Apply {
                changesets,
                queued_at: Instant::now(),
            })
            .await
            .is_ok()
    }

    /// The state hash of this node's versions as the store thread last left them: a sync
    /// partner with the same one has nothing this node lacks (see
    /// `patina_core::versions::Bookkeeping::state_hash`).
    pub fn state_hash(&self) -> u64 {
        self.state_hash.load(Ordering::Acquire)
    }

    /// This node's sync state (heads and needs per site).
    pub async fn sync_state(&self) -> Option<SyncState> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(StoreRequest::SyncState { reply }).await.ok()?;
        rx.await.ok()
    }

    /// The store's convergence digest, stopped at `deadline` if still running then.
    pub async fn digest(
        &self,
        deadline: Option<std::time::Instant>,
    ) -> Option<Result<Digest, StoreError>> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(StoreRequest::Digest { deadline, reply })
            .await
            .ok()?;
        rx.await.ok()
    }

    /// The versions a peer with `state` lacks, at most `versions_max`, as (site, first, last)
    /// ranges: what a sync session serves, read a chunk at a time
    /// ([`StoreHandle::ask_changesets`]).
    pub async fn sync_plan(
        &self,
        state: SyncState,
        versions_max: u64,
    ) -> Option<Vec<(SiteId, u64, u64)>> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(StoreRequest::SyncPlan {
                state,
                versions_max,
                reply,
            })
            .await
            .ok()?;
        rx.await.ok()
    }

    /// Asks for the changesets of `site` from version `first` to `last` this node holds, in
    /// order, stopped once they come to `bytes_max` (at least one, however large); the answer
    /// comes by the receiver. A request of its own per chunk, so that serving a peer that
    /// lacks much holds the store thread, and memory, for a chunk at a time, with the node's
    /// own writes in between; asked before it is awaited, so that a session sending one chunk
    /// has the next read meanwhile.
    pub async fn ask_changesets(
        &self,
        site: SiteId,
        first: u64,
        last: u64,
        bytes_max: usize,
    ) -> Option<oneshot::Receiver<Result<Vec<Changeset>, StoreError>>> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(StoreRequest::Changesets {
                site,
                first,
                last,
                bytes_max,
                reply,
            })
            .await
            .ok()?;
        Some(rx)
    }

    /// Requests waiting in the queue.
    pub fn queue_len(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

/// True if a changeset of the batch comes with versions of its site missing before it: past
/// the head bookkeeping knows (or an earlier changeset of the batch brings) plus one.
fn skips_versions(book: &patina_core::versions::Bookkeeping, batch: &[Arc<Changeset>]) -> bool {
    let head_of = |site: &SiteId| book.site(site).map_or(0, |v| v.head.get());
    // Broadcast hands most changesets over alone: no map for those.
    if let [changeset] = batch {
        return changeset.id.version.get() > head_of(&changeset.id.site).saturating_add(1);
    }
    let mut heads: crate::store::FastMap<SiteId, u64> = Default::default();
    batch.iter().any(|changeset| {
        let id = changeset.id;
        let head = heads.entry(id.site).or_insert_with(|| head_of(&id.site));
        let skipped = id.version.get() > (*head).saturating_add(1);
        *head = (*head).max(id.version.get());
        skipped
    })
}

pub(crate) fn spawn_store(
    mut store: Store,
    schema_paths: Vec<PathBuf>,
    queue_len: usize,
    commits: mpsc::Sender<Arc<Changeset>>,
    applied: tokio::sync::broadcast::Sender<AppliedEvent>,
    node_metrics: Arc<NodeMetrics>,
    row_changes: tokio::sync::broadcast::Sender<Arc<Vec<RowChange>>>,
) -> StoreHandle {
    let metrics = node_metrics.store.clone();
    metrics
        .unreplicated_tables
        .store(store.tables_owed_backfill().len() as u64, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel::<StoreRequest>(queue_len);
    let state_hash = Arc::new(AtomicU64::new(store.bookkeeping().state_hash()));
    let published = state_hash.clone();
    let span = tracing::Span::current();
    std::thread::Builder::new()
        .name("patina-store".into())
        .spawn(move || {
            let _in_node = span.enter();
            while let Some(request) = rx.blocking_recv() {
                // A reload a failed rollback left owed (see `Store::settle`): made before
                // reads too, which wait for it, not only before the next write.
                if let Err(e) = store.reload_if_owed() {
                    tracing::warn!(
                        "reloading the store's state failed (tried again at the next request): {e}"
                    );
                }
                match request {
                    StoreRequest::Transact {
                        statements,
                        deadline,
                        queued_at,
                        reply,
                    } => {
                        node_metrics.queue_wait("transaction", queued_at.elapsed());
                        let result = if deadline.is_some_and(|d| Instant::now() > d) {
                            Err(TxError::TimedOut)
                        } else {
                            store
                                .transact_until(&statements, deadline)
                                .map_err(TxError::from)
                        };
                        if let Ok(TxOutcome {
                            changeset: Some(changeset),
                            ..
                        }) = &result
                        {
                            metrics.committed_changesets.fetch_add(1, Ordering::Relaxed);
                            let _ = row_changes.send(Arc::new(changeset.rows()));
                            metrics
                                .committed_changes
                                .fetch_add(changeset.changes.len() as u64, Ordering::Relaxed);
                            // Broadcast at once; a full queue only delays it until sync. It
                            // carries this host's clock, for the receivers' lag figures.
                            let mut outgoing = changeset.clone();
                            outgoing.committed_at = crate::metrics::commit_time_now();
                            if commits.try_send(Arc::new(outgoing)).is_err() {
                                tracing::warn!("broadcast queue full: changeset left to sync");
                            }
                        }
                        let _ = reply.send(result);
                    }
                    StoreRequest::Status { reply } => {
                        let _ = reply.send(StoreStatus {
                            site: store.site_id(),
                            db_version: store.db_version(),
                            gaps: store.bookkeeping().gap_count(),
                            tables: store.table_names(),
                            tables_owed_backfill: store.tables_owed_backfill().to_vec(),
                        });
                    }
                    StoreRequest::SyncState { reply } => {
                        let _ = reply.send(SyncState::of(store.bookkeeping()));
                        // A backfill owed since a failure is retried when due by writes and
                        // applies, and here, so that a node with neither makes it too: its
                        // sync rounds come every few seconds, and nothing waits on this
                        // request's answer but the round, unlike a health check's.
                        store.backfill_if_due();
                    }
                    StoreRequest::Digest { deadline, reply } => {
                        let _ = reply.send(store.digest_until(deadline));
                    }
                    StoreRequest::FlushDeferred { reply } => {
                        let _ = reply.send(store.flush_deferred());
                    }
                    StoreRequest::SyncPlan {
                        state,
                        versions_max,
                        reply,
                    } => {
                        let _ =
                            reply.send(versions_to_send(store.bookkeeping(), &state, versions_max));
                    }
                    StoreRequest::Changesets {
                        site,
                        first,
                        last,
                        bytes_max,
                        reply,
                    } => {
                        let _ = reply.send(store.changesets_within(
                            site,
                            DbVersion(first),
                            DbVersion(last),
                            CHANGESETS_PER_REQUEST,
                            bytes_max,
                        ));
                    }
                    StoreRequest::Reload { reply } => {
                        let _ = reply.send(store.apply_schema_files(&schema_paths));
                    }
                    StoreRequest::Apply {
                        changesets,
                        queued_at,
                    } => {
                        metrics
                            .apply_lag_us_last
                            .store(queued_at.elapsed().as_micros() as u64, Ordering::Relaxed);
                        node_metrics.queue_wait("apply", queued_at.elapsed());
                        metrics.apply_batches.fetch_add(1, Ordering::Relaxed);
                        if skips_versions(store.bookkeeping(), &changesets) {
                            metrics.gaps_opened.fetch_add(1, Ordering::Relaxed);
                        }
                        let apply_started = Instant::now();
                        let applied_batch = store.apply_changesets(&changesets);
                        node_metrics
                            .apply_batch_seconds
                            .observe(apply_started.elapsed().as_secs_f64());
                        match applied_batch {
                            Ok(outcomes) => {
                                let at = Instant::now();
                                let mut changed_rows = Vec::new();
                                for (outcome, changeset) in outcomes.into_iter().zip(&changesets) {
                                    match outcome {
                                        ApplyOutcome::Rejected(e) => {
                                            metrics.apply_rejected.fetch_add(1, Ordering::Relaxed);
                                            store.note_unapplied(changeset.id);
                                            tracing::warn!("remote changeset refused: {e}")
                                        }
                                        ApplyOutcome::Applied {
                                            changes_won,
                                            changed,
                                            ..
                                        } => {
                                            changed_rows.extend(changed);
                                            metrics
                                                .applied_changesets
                                                .fetch_add(1, Ordering::Relaxed);
                                            metrics
                                                .applied_changes_won
                                                .fetch_add(changes_won as u64, Ordering::Relaxed);
                                            let _ = applied.send(AppliedEvent {
                                                id: changeset.id,
                                                at,
                                            });
                                            node_metrics.replicated(changeset.committed_at);
                                        }
                                        ApplyOutcome::Buffered => {
                                            metrics.parts_buffered.fetch_add(1, Ordering::Relaxed);
                                        }
                                        ApplyOutcome::AlreadyApplied => {}
                                    }
                                }
                                if !changed_rows.is_empty() {
                                    let _ = row_changes.send(Arc::new(changed_rows));
                                }
                            }
                            Err(e) => {
                                metrics.apply_failed.fetch_add(1, Ordering::Relaxed);
                                for changeset in &changesets {
                                    store.note_unapplied(changeset.id);
                                }
                                tracing::error!(
                                    "applying {} remote changesets failed: {e}",
                                    changesets.len()
                                )
                            }
                        }
                        metrics
                            .gaps
                            .store(store.bookkeeping().gap_count(), Ordering::Relaxed);
                    }
                }
                // After every request, whatever it changed (a request that changed nothing
                // stores the same hash again).
                published.store(store.bookkeeping().state_hash(), Ordering::Release);
                metrics
                    .unreplicated_tables
                    .store(store.tables_owed_backfill().len() as u64, Ordering::Relaxed);
            }
            tracing::debug!("store thread stopped");
        })
        .expect("spawning a thread only fails when the OS is out of resources");
    StoreHandle { tx, state_hash }
}

#[cfg(test)]
mod tests {
    use super::*;
    use patina_core::change::ChangesetId;
    use patina_core::versions::Bookkeeping;

    fn changeset(site: u8, version: u64) -> Arc<Changeset> {
        let id = ChangesetId {
            site: SiteId([site; 16]),
            version: DbVersion(version),
        };
        Arc::new(Changeset::whole(id, Vec::new()))
    }

    // A batch skips versions when one of its changesets lies past its site's head plus one,
    // counting the heads the batch's earlier changesets bring; a lone changeset (the common
    // case, checked without a map) follows the same rule.
    #[test]
    fn a_batch_skips_versions_past_the_head_plus_one() {
        let mut book = Bookkeeping::new();
        book.heard(SiteId([1; 16]), DbVersion(3));
        assert!(!skips_versions(&book, &[changeset(1, 4)]));
        assert!(skips_versions(&book, &[changeset(1, 5)]));
        assert!(!skips_versions(&book, &[changeset(2, 1)]));
        assert!(skips_versions(&book, &[changeset(2, 2)]));
        assert!(!skips_versions(
            &book,
            &[changeset(1, 4), changeset(1, 5), changeset(2, 1)]
        ));
        assert!(skips_versions(&book, &[changeset(1, 4), changeset(2, 2)]));
        assert!(skips_versions(&book, &[changeset(1, 5), changeset(1, 4)]));
        book.heard(SiteId([1; 16]), DbVersion(u64::MAX));
        assert!(!skips_versions(&book, &[changeset(1, u64::MAX)]));
    }
}
