//! The agent: the running node. One OS thread owns the [`Store`] (the only writer) and takes
//! requests from a bounded channel; the HTTP API and the admin socket run on tokio and talk to
//! it through a [`StoreHandle`]. Queries go to a pool of read-only connections and never wait
//! for writes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use patina_core::ids::{DbVersion, SiteId};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::net::addrs::HostPort;
use crate::http::api;
use crate::config::Config;
use crate::config::GossipConfig;
use crate::net::gossip::{remembered_members, GossipSnapshot, GossipTask};
use crate::http::serve::{serve, ServeLimits};
use crate::net::membership::{Actor, Membership};
use crate::metrics::{NodeMetrics, StoreMetrics};
use crate::store::{
    ApplyOutcome, Digest, Reader, Statement, Store, StoreConfig, StoreError, TxOutcome,
};
use crate::net::tls::{NodeTls, TlsError};
use crate::net::transport::{TlsMode, Transport, TransportConfig, TransportError};
use patina_core::broadcast::{Broadcast, BroadcastConfig};
use patina_core::change::{Changeset, RowChange};
use patina_core::sync::{versions_to_send, SyncScheduler, SyncState};
use patina_core::wire::Limits;
use std::sync::atomic::Ordering;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The store could not be opened (bad schema, unreadable file...).
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// TLS files could not be used.
    #[error("gossip tls: {0}")]
    Tls(#[from] TlsError),
    /// The subscriptions could not be loaded.
    #[error("subscriptions: {0}")]
    Subs(#[from] crate::subs::SubsError),
    /// The gossip endpoint could not be set up.
    #[error("gossip transport: {0}")]
    Transport(#[from] TransportError),
    /// A gossip address could not be used (a bad entry, a name that does not resolve, a
    /// wildcard bind with nothing to advertise).
    #[error("{0}")]
    Address(String),
    /// A socket or folder could not be set up.
    #[error("{what}: {source}")]
    Io {
        /// What was being set up.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

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

/// Commits' changed rows kept for slow `/v1/updates` streams (past this they are cut off).
const ROW_CHANGES_CAPACITY: usize = 1024;

/// How often the WAL is checkpointed, off the commit path.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);

/// Applied events kept for slow listeners (they skip ahead past this).
const APPLIED_EVENTS_CAPACITY: usize = 4096;

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
        reply: oneshot::Sender<Result<Digest, StoreError>>,
    },
    SyncServe {
        state: SyncState,
        versions_max: u64,
        reply: oneshot::Sender<Vec<Changeset>>,
    },
}

/// The way to the store thread. Cheap to clone.
#[derive(Debug, Clone)]
pub struct StoreHandle {
    tx: mpsc::Sender<StoreRequest>,
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
            StoreRequest::SyncServe { .. } => "SyncServe",
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

    /// This node's sync state (heads and needs per site).
    pub async fn sync_state(&self) -> Option<SyncState> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(StoreRequest::SyncState { reply }).await.ok()?;
        rx.await.ok()
    }

    /// The store's convergence digest.
    pub async fn digest(&self) -> Option<Result<Digest, StoreError>> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(StoreRequest::Digest { reply }).await.ok()?;
        rx.await.ok()
    }

    /// The changesets a peer with `state` lacks, at most `versions_max` versions.
    pub async fn sync_serve(&self, state: SyncState, versions_max: u64) -> Option<Vec<Changeset>> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(StoreRequest::SyncServe {
                state,
                versions_max,
                reply,
            })
            .await
            .ok()?;
        rx.await.ok()
    }

    /// Requests waiting in the queue.
    pub fn queue_len(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

fn spawn_store(
    mut store: Store,
    schema_paths: Vec<PathBuf>,
    queue_len: usize,
    commits: mpsc::Sender<Arc<Changeset>>,
    applied: tokio::sync::broadcast::Sender<AppliedEvent>,
    node_metrics: Arc<NodeMetrics>,
    row_changes: tokio::sync::broadcast::Sender<Arc<Vec<RowChange>>>,
) -> StoreHandle {
    let metrics = node_metrics.store.clone();
    let (tx, mut rx) = mpsc::channel::<StoreRequest>(queue_len);
    let span = tracing::Span::current();
    std::thread::Builder::new()
        .name("patina-store".into())
        .spawn(move || {
            let _in_node = span.enter();
            while let Some(request) = rx.blocking_recv() {
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
                        });
                    }
                    StoreRequest::SyncState { reply } => {
                        let _ = reply.send(SyncState::of(store.bookkeeping()));
                    }
                    StoreRequest::Digest { reply } => {
                        let _ = reply.send(store.digest());
                    }
                    StoreRequest::SyncServe {
                        state,
                        versions_max,
                        reply,
                    } => {
                        let mut out = Vec::new();
                        for (site, first, last) in
                            versions_to_send(store.bookkeeping(), &state, versions_max)
                        {
                            match store.changesets(
                                site,
                                DbVersion(first),
                                DbVersion(last),
                                usize::MAX,
                            ) {
                                Ok(found) => out.extend(found),
                                Err(e) => tracing::warn!("sync: reading changesets of {site}: {e}"),
                            }
                        }
                        let _ = reply.send(out);
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
            }
            tracing::debug!("store thread stopped");
        })
        .expect("spawning a thread only fails when the OS is out of resources");
    StoreHandle { tx }
}

/// A pool of read-only connections; at most `size` queries run at once.
#[derive(Debug)]
pub struct ReaderPool {
    path: PathBuf,
    idle: std::sync::Mutex<Vec<Reader>>,
    permits: Arc<tokio::sync::Semaphore>,
    size: usize,
}

impl ReaderPool {
    fn new(path: PathBuf, size: usize) -> ReaderPool {
        ReaderPool {
            path,
            idle: std::sync::Mutex::new(Vec::new()),
            permits: Arc::new(tokio::sync::Semaphore::new(size)),
            size,
        }
    }

    /// Waits for a free slot until `deadline`, then runs `f` with a reader on a blocking
    /// thread. A reader that comes back with a transaction open is closed, never reused: the
    /// next query must not see an old snapshot.
    pub async fn with_reader<T: Send + 'static>(
        self: &Arc<Self>,
        deadline: Instant,
        f: impl FnOnce(&Reader) -> T + Send + 'static,
    ) -> Result<T, StoreError> {
        let permit = tokio::time::timeout_at(
            tokio::time::Instant::from_std(deadline),
            self.permits.clone().acquire_owned(),
        )
        .await
        .map_err(|_| StoreError::ReadersBusy(self.size))?
        .expect("the pool's semaphore is never closed");
        let pool = self.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let reader = pool.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let reader = match reader {
                Some(r) => r,
                None => Reader::open(&pool.path)?,
            };
            let out = f(&reader);
            if reader.is_clean() {
                pool.idle
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(reader);
            } else {
                tracing::warn!("a query connection came back inside a transaction: closed");
            }
            Ok(out)
        })
        .await
        .expect("query closures do not panic")
    }
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    api_addr: SocketAddr,
    gossip_addr: SocketAddr,
    gossip: watch::Receiver<GossipSnapshot>,
    applied: tokio::sync::broadcast::Sender<AppliedEvent>,
    metrics_addr: Option<SocketAddr>,
    faults: Arc<crate::net::transport::Faults>,
    admin_path: PathBuf,
    site: SiteId,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// Held for the agent's life (see [`crate::store::backup::lock_database`]).
    _db_lock: std::fs::File,
}

impl Agent {
    /// Opens the store and starts the API and the admin socket. With `api.addr` port 0 the
    /// OS picks a port: see [`Agent::api_addr`].
    pub async fn start(config: &Config) -> Result<Agent, AgentError> {
        // Every line the node logs, from any of its tasks and threads, carries its site id
        // (recorded once the store is open): many agents can share one process and one log.
        let span = tracing::info_span!("node", site = tracing::field::Empty);
        tracing::Instrument::instrument(Agent::start_in_span(config, span.clone()), span).await
    }

    async fn start_in_span(config: &Config, span: tracing::Span) -> Result<Agent, AgentError> {
        let io = |what: String| move |source| AgentError::Io { what, source };
        for dir in [config.db.path.parent(), config.admin.path.parent()]
            .into_iter()
            .flatten()
        {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
            }
        }
        // The default schema folder is created so a plain `patina agent` starts anywhere.
        for schema in &config.db.schema_paths {
            if !schema.exists() && schema.extension().is_none() {
                std::fs::create_dir_all(schema)
                    .map_err(io(format!("creating {}", schema.display())))?;
            }
        }
        // One agent per database: a second one (or `patina restore`) on the same file is
        // refused while this one runs; the lock goes with the process, also when it crashes.
        let db_lock = crate::store::backup::lock_database(&config.db.path)?;
        let mut store = Store::open(&StoreConfig {
            path: config.db.path.clone(),
            schema_paths: config.db.schema_paths.clone(),
            max_db_bytes: config.db.max_db_bytes,
            changeset_bytes_max: Some(config.db.transaction_bytes_max),
            parts_bytes_max: Some(config.db.parts_bytes_max),
        })?;
        store.checkpoint_in_background()?;
        let site = store.site_id();
        span.record("site", tracing::field::display(site));
        let (commits_tx, commits_rx) = mpsc::channel(COMMITS_QUEUE_LEN);
        let (applied, _) = tokio::sync::broadcast::channel(APPLIED_EVENTS_CAPACITY);
        let node_metrics = Arc::new(NodeMetrics::new(Arc::new(StoreMetrics::default())));
        let (row_changes, _) = tokio::sync::broadcast::channel(ROW_CHANGES_CAPACITY);
        let handle = spawn_store(
            store,
            config.db.schema_paths.clone(),
            config.api.store_queue_len,
            commits_tx,
            applied.clone(),
            node_metrics.clone(),
            row_changes.clone(),
        );
        let readers = Arc::new(ReaderPool::new(
            config.db.path.clone(),
            config.api.query_connections,
        ));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let subs = crate::subs::spawn(
            &config.db.path,
            &sibling_file(&config.db.path, ".subscriptions"),
            crate::subs::SubsConfig {
                max_subscriptions: config.subscriptions.max_subscriptions,
                history_len: config.subscriptions.history_len,
                subscriber_buffer: config.subscriptions.subscriber_buffer,
                rows_max: config.subscriptions.rows_max,
                pass_timeout: Duration::from_millis(config.subscriptions.pass_timeout_ms),
                idle_timeout: Duration::from_millis(config.subscriptions.idle_timeout_ms),
            },
            row_changes.subscribe(),
            shutdown_rx.clone(),
        )?;
        let admin_subs = subs.clone();

        let (gossip_snapshot_tx, gossip_snapshot) = watch::channel(GossipSnapshot::default());
        let gossip_task = start_gossip(
            &config.gossip,
            site,
            sibling_file(&config.db.path, ".members"),
            handle.clone(),
            commits_rx,
            shutdown_rx.clone(),
            gossip_snapshot_tx,
        )
        .await?;
        let mut gossip_task = gossip_task;
        gossip_task.metrics = Some(node_metrics.clone());
        let gossip_control = gossip_task.control_tx.clone();
        let gossip_addr = gossip_task.advertised;
        let faults = gossip_task.transport.faults();
        start_sync_server(
            &gossip_task.transport,
            handle.clone(),
            &config.gossip,
            shutdown_rx.clone(),
        );
        let gossip_join = crate::logging::spawn(gossip_task.run());

        let listener = tokio::net::TcpListener::bind(config.api.addr)
            .await
            .map_err(io(format!("binding the API on {}", config.api.addr)))?;
        let api_addr = listener
            .local_addr()
            .map_err(io("reading the API address".into()))?;
        let router = api::router(api::ApiState::new(
            handle.clone(),
            readers,
            site,
            api::ApiFeeds {
                gossip: gossip_snapshot.clone(),
                row_changes,
                subs,
                shutdown: shutdown_rx.clone(),
                metrics: node_metrics.clone(),
            },
            &config.api,
        ));
        let api_limits = ServeLimits {
            connections_max: config.api.connections_max,
            idle_timeout: Duration::from_millis(config.api.idle_timeout_ms),
            header_timeout: Duration::from_millis(config.api.header_timeout_ms),
        };
        let api_task =
            crate::logging::spawn(serve(listener, router, api_limits, shutdown_rx.clone()));

        let mut tasks = vec![api_task, gossip_join];
        let metrics_addr = match config.telemetry.prometheus_addr {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(io(format!("binding metrics on {addr}")))?;
                let bound = listener
                    .local_addr()
                    .map_err(io("reading the metrics address".into()))?;
                let router = crate::metrics::router(
                    node_metrics.clone(),
                    handle.clone(),
                    gossip_snapshot.clone(),
                );
                let mut rx = shutdown_rx.clone();
                tasks.push(crate::logging::spawn(async move {
                    let stop = async move {
                        let _ = rx.wait_for(|stop| *stop).await;
                    };
                    if let Err(e) = axum::serve(listener, router)
                        .with_graceful_shutdown(stop)
                        .await
                    {
                        tracing::error!("metrics server failed: {e}");
                    }
                }));
                Some(bound)
            }
            None => None,
        };
        let admin_path = config.admin.path.clone();
        let _ = std::fs::remove_file(&admin_path);
        let admin = tokio::net::UnixListener::bind(&admin_path).map_err(io(format!(
            "binding the admin socket {}",
            admin_path.display()
        )))?;
        let admin_router = api::admin_router(api::AdminState {
            store: handle,
            gossip: gossip_snapshot.clone(),
            db_path: config.db.path.clone(),
            control: gossip_control,
            subs: admin_subs,
        });
        let admin_task =
            crate::logging::spawn(serve(admin, admin_router, api_limits, shutdown_rx.clone()));
        // Started last: nothing after it can fail and leave the thread running.
        let checkpoints_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let checkpointer = crate::store::spawn_checkpointer(
            &config.db.path,
            CHECKPOINT_EVERY,
            checkpoints_stop.clone(),
        )?;
        let mut stop = shutdown_rx;
        tasks.push(crate::logging::spawn(async move {
            let _ = stop.wait_for(|stop| *stop).await;
            checkpoints_stop.store(true, Ordering::Relaxed);
            let _ = tokio::task::spawn_blocking(move || checkpointer.join()).await;
        }));
        tracing::info!(%api_addr, %gossip_addr, site = %site, "agent started");
        Ok(Agent {
            api_addr,
            gossip_addr,
            gossip: gossip_snapshot,
            applied,
            admin_path,
            site,
            shutdown,
            metrics_addr,
            faults,
            tasks: {
                tasks.push(admin_task);
                tasks
            },
            _db_lock: db_lock,
        })
    }

    /// The address the API listens on.
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// This node's site id.
    pub fn site_id(&self) -> SiteId {
        self.site
    }

    /// The transport's fault injector, for tests: loss, cut-offs, delay.
    pub fn faults(&self) -> Arc<crate::net::transport::Faults> {
        self.faults.clone()
    }

    /// The address metrics are served on, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The address the gossip endpoint listens on.
    pub fn gossip_addr(&self) -> SocketAddr {
        self.gossip_addr
    }

    /// Events for every remote changeset this node commits from now on.
    pub fn subscribe_applied(&self) -> tokio::sync::broadcast::Receiver<AppliedEvent> {
        self.applied.subscribe()
    }

    /// The latest gossip snapshot: members and broadcast counters.
    pub fn gossip(&self) -> GossipSnapshot {
        self.gossip.borrow().clone()
    }

    /// The admin socket.
    pub fn admin_path(&self) -> &Path {
        &self.admin_path
    }

    /// Stops serving, waits for in-flight requests, and lets the store thread finish.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        let _ = std::fs::remove_file(&self.admin_path);
    }
}

/// Serves the sync sessions peers open, at most `sync_sessions_max` at once.
fn start_sync_server(
    transport: &Transport,
    store: StoreHandle,
    config: &GossipConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let (tx, mut sessions) = mpsc::channel(config.sync_sessions_max);
    transport.set_session_handler(tx);
    let permits = Arc::new(tokio::sync::Semaphore::new(config.sync_sessions_max));
    let (cluster, versions_max, part_bytes) = (
        config.cluster_id,
        config.sync_versions_max,
        config.part_bytes,
    );
    let limits = Limits {
        changeset_bytes_max: config.message_bytes_max,
        ..Limits::default()
    };
    crate::logging::spawn(async move {
        loop {
            let session = tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => return,
                session = sessions.recv() => session,
            };
            let Some(session) = session else { return };
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let store = store.clone();
            crate::logging::spawn(async move {
                let _permit = permit;
                let from = session.from;
                if let Err(e) =
                    crate::net::sync::serve(session, store, cluster, limits, versions_max, part_bytes)
                        .await
                {
                    tracing::debug!(%from, "sync session refused or failed: {e}");
                }
            });
        }
    });
}

/// Longest wait for the system resolver on one name.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Local commits waiting for the gossip task.
const COMMITS_QUEUE_LEN: usize = 16_384;

/// A file next to the database: `state.db.members` (members remembered across restarts, so a
/// restarted node rejoins on its own), `state.db.subscriptions` (subscriptions and their
/// history).
fn sibling_file(db_path: &Path, suffix: &str) -> PathBuf {
    let mut name = db_path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(suffix);
    db_path.with_file_name(name)
}

async fn start_gossip(
    config: &GossipConfig,
    site: SiteId,
    members_file: PathBuf,
    store: StoreHandle,
    commits: mpsc::Receiver<Arc<Changeset>>,
    shutdown: watch::Receiver<bool>,
    snapshot: watch::Sender<GossipSnapshot>,
) -> Result<GossipTask, AgentError> {
    let tls = match &config.tls {
        Some(files) => TlsMode::Mutual(NodeTls {
            server_name: files.server_name.clone(),
            ..NodeTls::from_files(&files.cert_file, &files.key_file, &files.ca_file)?
        }),
        None => {
            if !config.plaintext {
                tracing::warn!(
                    "no [gossip.tls]: gossip runs without certificates on loopback only"
                );
            }
            TlsMode::Plaintext
        }
    };
    let (inbox_tx, inbox) = mpsc::channel(8192);
    let transport = Transport::bind(
        config.addr,
        &tls,
        TransportConfig {
            queue_len_max: config.send_queue_len_max,
            message_bytes_max: config.message_bytes_max,
            send_bytes_per_sec_max: config.send_bytes_per_sec_max,
            send_in_flight_max: config.send_in_flight_max,
            connections_max: config.connections_max,
            connection_idle_ms: config.connection_idle_ms,
        },
        inbox_tx,
    )?;
    let bump = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default();
    let bootstrap: Vec<HostPort> = config
        .bootstrap
        .iter()
        .map(|entry| HostPort::parse(entry))
        .collect::<Result<_, _>>()
        .map_err(AgentError::Address)?;
    let mut announce_to = crate::net::addrs::resolve_all(&bootstrap, RESOLVE_TIMEOUT).await;
    announce_to.extend(remembered_members(&members_file));
    announce_to.sort();
    announce_to.dedup();
    let external = match &config.external_addr {
        Some(entry) => {
            let entry = HostPort::parse(entry).map_err(AgentError::Address)?;
            let found = entry
                .resolve(RESOLVE_TIMEOUT)
                .await
                .map_err(|e| AgentError::Address(format!("gossip.external_addr: {e}")))?;
            Some(*found.first().ok_or_else(|| {
                AgentError::Address(format!("gossip.external_addr {entry} has no address"))
            })?)
        }
        None => None,
    };
    let advertised = crate::net::addrs::advertised(transport.local_addr(), external, &announce_to)
        .map_err(AgentError::Address)?;
    if advertised != transport.local_addr() {
        tracing::info!(
            "gossip bound on {}, advertised as {advertised}",
            transport.local_addr()
        );
    }
    announce_to.retain(|addr| *addr != advertised && *addr != transport.local_addr());
    let me = Actor {
        addr: advertised,
        site: site.0,
        bump,
        cluster: config.cluster_id,
    };
    let seed = u64::from_le_bytes(site.0[..8].try_into().expect("8 bytes")) ^ bump;
    let (control_tx, control) = mpsc::channel(16);
    Ok(GossipTask {
        site,
        cluster: config.cluster_id,
        membership: Membership::new(me, seed, Duration::from_millis(config.swim_probe_period_ms)),
        broadcast: Broadcast::new(
            site,
            BroadcastConfig {
                eager_peers_max: config.eager_peers_max,
                lazy_peers_max: config.lazy_peers_max,
                graft_timeout_ms: config.graft_timeout_ms,
                near_peers: config.near_peers,
                far_peers: config.far_peers,
                probe_interval_ms: config.probe_interval_ms,
                probe_sample: config.probe_sample,
                ..BroadcastConfig::default()
            },
            seed,
        ),
        transport,
        inbox,
        commits,
        store,
        announce_to,
        bootstrap,
        advertised,
        metrics: None,
        control,
        control_tx,
        members_file,
        members_file_hash: None,
        tick_ms: config.tick_ms,
        part_bytes: config.part_bytes,
        limits: Limits {
            changeset_bytes_max: config.message_bytes_max,
            ..Limits::default()
        },
        shutdown,
        snapshot,
        sync: SyncScheduler::new(
            config.sync_interval_ms,
            patina_core::broadcast::Millis(0),
            seed,
        ),
    })
}

/// Runs an agent until Ctrl-C or SIGTERM.
pub async fn run(config: Config) -> Result<(), AgentError> {
    let agent = Agent::start(&config).await?;
    println!(
        "patina agent: API on http://{}, gossip on {}, site {}",
        agent.api_addr(),
        agent.gossip_addr(),
        agent.site_id()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| AgentError::Io {
            what: "installing the SIGTERM handler".into(),
            source,
        })?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    agent.shutdown().await;
    Ok(())
}
