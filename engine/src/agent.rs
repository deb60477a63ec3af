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

use crate::api;
use crate::config::Config;
use crate::store::{Reader, Statement, Store, StoreConfig, StoreError, TxOutcome};

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The store could not be opened (bad schema, unreadable file...).
    #[error("store: {0}")]
    Store(#[from] StoreError),
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
        reply: oneshot::Sender<Result<TxOutcome, TxError>>,
    },
    Status {
        reply: oneshot::Sender<StoreStatus>,
    },
    Reload {
        reply: oneshot::Sender<Result<(), StoreError>>,
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

    /// Re-reads the schema files.
    pub async fn reload(&self) -> Result<(), TxError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(StoreRequest::Reload { reply })
            .await
            .map_err(|_| TxError::Unavailable)?;
        Ok(rx.await.map_err(|_| TxError::Unavailable)??)
    }

    /// Requests waiting in the queue.
    pub fn queue_len(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

fn spawn_store(mut store: Store, schema_paths: Vec<PathBuf>, queue_len: usize) -> StoreHandle {
    let (tx, mut rx) = mpsc::channel::<StoreRequest>(queue_len);
    std::thread::Builder::new()
        .name("patina-store".into())
        .spawn(move || {
            while let Some(request) = rx.blocking_recv() {
                match request {
                    StoreRequest::Transact {
                        statements,
                        deadline,
                        reply,
                    } => {
                        let result = if deadline.is_some_and(|d| Instant::now() > d) {
                            Err(TxError::TimedOut)
                        } else {
                            store.transact(&statements).map_err(TxError::from)
                        };
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
                    StoreRequest::Reload { reply } => {
                        let _ = reply.send(store.apply_schema_files(&schema_paths));
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
}

impl ReaderPool {
    fn new(path: PathBuf, size: usize) -> ReaderPool {
        ReaderPool {
            path,
            idle: std::sync::Mutex::new(Vec::new()),
            permits: Arc::new(tokio::sync::Semaphore::new(size)),
        }
    }

    /// Waits for a free slot, then runs `f` with a reader on a blocking thread.
    pub async fn with_reader<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Reader) -> T + Send + 'static,
    ) -> Result<T, StoreError> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
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
            pool.idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(reader);
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
    admin_path: PathBuf,
    site: SiteId,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Agent {
    /// Opens the store and starts the API and the admin socket. With `api.addr` port 0 the
    /// OS picks a port: see [`Agent::api_addr`].
    pub async fn start(config: &Config) -> Result<Agent, AgentError> {
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
        let store = Store::open(&StoreConfig {
            path: config.db.path.clone(),
            schema_paths: config.db.schema_paths.clone(),
            max_db_bytes: config.db.max_db_bytes,
        })?;
        let site = store.site_id();
        let handle = spawn_store(
            store,
            config.db.schema_paths.clone(),
            config.api.store_queue_len,
        );
        let readers = Arc::new(ReaderPool::new(
            config.db.path.clone(),
            config.api.query_connections,
        ));
        let (shutdown, shutdown_rx) = watch::channel(false);

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
            &config.api,
        ));
        let mut rx = shutdown_rx.clone();
        let api_task = tokio::spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|stop| *stop).await;
            };
            if let Err(e) = axum::serve(listener, router)
                .with_graceful_shutdown(stop)
                .await
            {
                tracing::error!("API server failed: {e}");
            }
        });

        let admin_path = config.admin.path.clone();
        let _ = std::fs::remove_file(&admin_path);
        let admin = tokio::net::UnixListener::bind(&admin_path).map_err(io(format!(
            "binding the admin socket {}",
            admin_path.display()
        )))?;
        let admin_router = api::admin_router(handle);
        let mut rx = shutdown_rx;
        let admin_task = tokio::spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|stop| *stop).await;
            };
            if let Err(e) = axum::serve(admin, admin_router)
                .with_graceful_shutdown(stop)
                .await
            {
                tracing::error!("admin server failed: {e}");
            }
        });
        tracing::info!(%api_addr, site = %site, "agent started");
        Ok(Agent {
            api_addr,
            admin_path,
            site,
            shutdown,
            tasks: vec![api_task, admin_task],
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

/// Runs an agent until Ctrl-C or SIGTERM.
pub async fn run(config: Config) -> Result<(), AgentError> {
    let agent = Agent::start(&config).await?;
    println!(
        "patina agent: API on http://{}, site {}",
        agent.api_addr(),
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
