//! The agent: the running node. One OS thread owns the [`Store`] (the only writer) and takes
//! requests from a bounded channel; the HTTP API and the admin socket run on tokio and talk to
//! it through a [`StoreHandle`]. Queries go to a pool of read-only connections and never wait
//! for writes.

mod counters;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use patina_core::ids::SiteId;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::config::GossipConfig;
use crate::http::api;
use crate::http::serve::{serve, ServeLimits};
use crate::metrics::{NodeMetrics, StoreMetrics};
use crate::net::addrs::HostPort;
use crate::net::gossip::{remembered_members, GossipSnapshot, GossipTask};
use crate::net::membership::{Actor, Membership};
use crate::net::tls::{NodeTls, TlsError};
use crate::net::transport::{TlsMode, Transport, TransportConfig, TransportError};
use crate::store::actor::{spawn_store, AppliedEvent, StoreHandle};
use crate::store::readers::ReaderPool;
use crate::store::{Store, StoreConfig, StoreError};
use patina_core::broadcast::Millis;
use patina_core::change::Changeset;
use patina_core::protocol::Protocol;
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
/// Commits' changed rows kept for slow `/v1/updates` streams (past this they are cut off).
const ROW_CHANGES_CAPACITY: usize = 1024;

/// How long commits gather before the WAL is checkpointed, off the commit path (sooner once the
/// WAL holds 1,000 pages, SQLite's own rule, or half its share of a capped database). Each
/// checkpoint syncs the WAL and the database file, and the next commit syncs the restarted
/// WAL's header on the store thread: with one every 200 ms, 300 agents writing ten rows a
/// second spent 34% of their CPU in the kernel (22% at 2 s). At 2 s, 800 agents sharing a
/// machine, each receiving a write every half second, met their checkpoints every fifth
/// write: 31 of 200 writes took over 350 ms to reach every node. At 30 s (Litestream's own
/// default is a minute; the WAL of such a node holds a few hundred frames at most), with each
/// node's checkpoints at a phase of its own (`store::wal`), one write did, and four with the
/// WAL alone synced every [`WAL_SYNC_EVERY`] meanwhile, as it now is (BENCHMARKS).
const CHECKPOINT_EVERY: Duration = Duration::from_secs(30);

/// How often the checkpointer syncs the WAL while commits wait for a checkpoint: the most a
/// power loss or an OS crash can take back under `synchronous = NORMAL`, as the 2 s checkpoints
/// allowed before (a killed process loses nothing: its writes are in the OS's files).
const WAL_SYNC_EVERY: Duration = Duration::from_secs(2);

/// Applied events kept for slow listeners (they skip ahead past this).
const APPLIED_EVENTS_CAPACITY: usize = 4096;

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
    /// The store thread, asked at shutdown to write what it left waiting.
    store: StoreHandle,
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
        let wal_commits = store.checkpoint_in_background()?;
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
            crate::store::read_cap(config.db.transaction_bytes_max),
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
                value_bytes_max: crate::store::read_cap(config.db.transaction_bytes_max),
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
            header_timeout: Duration::from_millis(
                config.api.header_timeout_ms.min(config.api.idle_timeout_ms),
            ),
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
                    counters::Counters {
                        store: node_metrics.store.clone(),
                        queue: handle.clone(),
                        gossip: gossip_snapshot.clone(),
                    },
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
            store: handle.clone(),
            gossip: gossip_snapshot.clone(),
            db_path: config.db.path.clone(),
            control: gossip_control,
            subs: admin_subs,
            backup_running: Default::default(),
            backup_time_max: Duration::from_millis(config.admin.backup_timeout_ms),
        });
        let admin_task =
            crate::logging::spawn(serve(admin, admin_router, api_limits, shutdown_rx.clone()));
        // Started last: nothing after it can fail and leave the thread running.
        let checkpoints_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let checkpointer = crate::store::spawn_checkpointer(
            &config.db.path,
            CHECKPOINT_EVERY,
            WAL_SYNC_EVERY,
            wal_commits.clone(),
            checkpoints_stop.clone(),
        )?;
        let mut stop = shutdown_rx;
        tasks.push(crate::logging::spawn(async move {
            let _ = stop.wait_for(|stop| *stop).await;
            checkpoints_stop.store(true, Ordering::Relaxed);
            wal_commits.wake();
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
            store: handle,
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

    /// The gossip snapshots as they are published, to read a counter without copying the
    /// member list (a sampler of hundreds of agents).
    pub fn gossip_watch(&self) -> watch::Receiver<GossipSnapshot> {
        self.gossip.clone()
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
        // The store thread ends only once every handle is gone, after the process may have
        // exited: the changes-index entries and versions it left waiting are written now, so
        // the next start has nothing to put back (it would, from every row clock, after a
        // crash) or to fetch again.
        if let Err(e) = self.store.flush_deferred().await {
            tracing::warn!("changes index left for the next start to rebuild: {e}");
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
    let cluster = config.cluster_id;
    let serve_limits = crate::net::sync::ServeLimits {
        limits: Limits {
            changeset_bytes_max: config.message_bytes_max,
            ..Limits::default()
        },
        versions_max: config.sync_versions_max,
        part_bytes: config.part_bytes,
        time_max: Duration::from_millis(config.sync_serve_ms_max),
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
                if let Err(e) = crate::net::sync::serve(session, store, cluster, serve_limits).await
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
            sealed_datagrams: config.sealed_datagrams,
            sealed_kept_max_age_ms: config.sealed_kept_max_age_ms,
            ..TransportConfig::default()
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
        membership: {
            let mut membership =
                Membership::new(me, seed, Duration::from_millis(config.swim_probe_period_ms));
            membership.set_members_max(config.members_max);
            membership
        },
        protocol: {
            let mut protocol = Protocol::new(site, config.protocol(), Millis(0), seed);
            // The sync checks' nonces from a random seed: one a peer could foresee from the
            // site id would let it answer rounds meant for another.
            protocol.reseed_nonces(rand::random());
            protocol
        },
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
        limits: Limits {
            changeset_bytes_max: config.message_bytes_max,
            ..Limits::default()
        },
        shutdown,
        snapshot,
        sync_pulls: Default::default(),
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
