//! The pool of read-only connections that serves queries: they never wait for writes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use super::{Reader, StoreError};

/// A pool of read-only connections; at most `size` queries run at once.
#[derive(Debug)]
pub struct ReaderPool {
    path: PathBuf,
    idle: std::sync::Mutex<Vec<Reader>>,
    permits: Arc<tokio::sync::Semaphore>,
    size: usize,
    value_bytes_max: usize,
}

impl ReaderPool {
    /// A pool of `size` connections, none reading or making a value over `value_bytes_max` bytes.
    pub(crate) fn new(path: PathBuf, size: usize, value_bytes_max: usize) -> ReaderPool {
        ReaderPool {
            path,
            idle: std::sync::Mutex::new(Vec::new()),
            permits: Arc::new(tokio::sync::Semaphore::new(size)),
            size,
            value_bytes_max,
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
                None => Reader::open(&pool.path, pool.value_bytes_max)?,
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
