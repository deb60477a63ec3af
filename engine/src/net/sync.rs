//! Anti-entropy sync sessions over QUIC bidirectional streams (the protocol is in
//! `patina_core::sync`).
//!
//! A session: the client sends one frame, its sync state; the server answers with one frame per
//! changeset the client lacks (at most `versions_max` per session; one larger than `part_bytes`
//! goes in several frames, one part each: see `patina_core::chunk`), then an empty frame. A frame
//! is a 4-byte little-endian length and that many bytes. Every read has a size limit and a
//! timeout; a malformed request ends the session and harms nothing else.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use patina_core::change::Changeset;
use patina_core::chunk;
use patina_core::wire::{
    changeset_to_bytes, decode_changeset, decode_sync_state, encode_sync_state, Limits,
    SYNC_REQUEST_BYTES_MAX,
};

use crate::net::transport::{Session, Transport};
use crate::store::actor::StoreHandle;

/// How long a session may wait for the other side at any step.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Changesets handed to the store at once while pulling.
const APPLY_BATCH: usize = 256;
/// Bytes a round may bring for its changesets to be broadcast again (as well as at most
/// [`patina_core::protocol::SYNC_RELAY_MAX`] of them): honest peers send parts of 64 KiB.
const RELAY_BYTES_MAX: u64 = 4 << 20;
/// Bytes of received frames held before they are handed to the store, whatever their count:
/// a peer may send frames of up to the message limit (16 MiB), and 256 of those were held.
const APPLY_BATCH_BYTES: usize = 8 << 20;

/// Why a session failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The peer could not be reached.
    #[error("peer unreachable")]
    Unreachable,
    /// The stream failed or timed out.
    #[error("stream: {0}")]
    Stream(String),
    /// The peer sent something malformed or too large.
    #[error("bad frame: {0}")]
    Bad(String),
    /// The local store is gone.
    #[error("store unavailable")]
    Store,
}

async fn read_frame(recv: &mut quinn::RecvStream, max: usize) -> Result<Vec<u8>, SyncError> {
    let stream_err = |e: String| SyncError::Stream(e);
    let mut len = [0u8; 4];
    tokio::time::timeout(STEP_TIMEOUT, recv.read_exact(&mut len))
        .await
        .map_err(|_| stream_err("timed out".into()))?
        .map_err(|e| stream_err(e.to_string()))?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(SyncError::Bad(format!("frame of {len} bytes, over {max}")));
    }
    let mut buf = vec![0u8; len];
    tokio::time::timeout(STEP_TIMEOUT, recv.read_exact(&mut buf))
        .await
        .map_err(|_| stream_err("timed out".into()))?
        .map_err(|e| stream_err(e.to_string()))?;
    Ok(buf)
}

async fn write_frame(send: &mut quinn::SendStream, bytes: &[u8]) -> Result<(), SyncError> {
    let mut frame = Vec::with_capacity(4 + bytes.len());
    frame.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    frame.extend_from_slice(bytes);
    tokio::time::timeout(STEP_TIMEOUT, send.write_all(&frame))
        .await
        .map_err(|_| SyncError::Stream("timed out".into()))?
        .map_err(|e| SyncError::Stream(e.to_string()))
}

/// Bytes of changesets a session reads from the store at a time: each chunk is one request to
/// the store thread, the next asked while one is sent (two in memory at most). Read whole, the
/// answer to a peer lacking 10,000 large versions held the store thread (and every write
/// behind it) until all were read, and all of them in memory.
pub const SERVE_CHUNK_BYTES: usize = 1 << 20;

/// What bounds the sessions a node serves.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// Decoding limits of the request.
    pub limits: Limits,
    /// Most changesets one session carries.
    pub versions_max: u64,
    /// Changesets larger than this go in parts.
    pub part_bytes: usize,
    /// Longest a session is served, whatever the peer reads: a pull gives up sooner (the
    /// protocol's `sync_timeout_ms`, 30 s by default), and a peer that reads each frame just
    /// within [`STEP_TIMEOUT`] would otherwise keep one of the node's few serving slots for as
    /// long as it liked (`gossip.sync_serve_ms_max`).
    pub time_max: Duration,
}

/// Serves one session a peer opened, within `serve.time_max`.
pub async fn serve(
    session: Session,
    store: StoreHandle,
    cluster: u16,
    serve: ServeLimits,
) -> Result<usize, SyncError> {
    tokio::time::timeout(
        serve.time_max,
        serve_session(
            session,
            store,
            cluster,
            serve.limits,
            serve.versions_max,
            serve.part_bytes,
        ),
    )
    .await
    .map_err(|_| SyncError::Stream(format!("session over {:?}", serve.time_max)))?
}

async fn serve_session(
    mut session: Session,
    store: StoreHandle,
    cluster: u16,
    limits: Limits,
    versions_max: u64,
    part_bytes: usize,
) -> Result<usize, SyncError> {
    let request = read_frame(&mut session.recv, SYNC_REQUEST_BYTES_MAX).await?;
    let state =
        decode_sync_state(&request, cluster, &limits).map_err(|e| SyncError::Bad(e.to_string()))?;
    let plan = store
        .sync_plan(state, versions_max)
        .await
        .ok_or(SyncError::Store)?;
    let mut served = 0;
    let mut ranges = plan.into_iter();
    // The chunk to read: a site and the versions left of one of the plan's ranges.
    let mut at = ranges.next();
    // The read of `at`, asked while the chunk before it was being sent (two chunks in memory
    // at most; one at a time cost a tenth of a catch-up's speed).
    let mut asked = None;
    while let Some((site, first, last)) = at {
        let reply = match asked.take() {
            Some(reply) => reply,
            None => store
                .ask_changesets(site, first, last, SERVE_CHUNK_BYTES)
                .await
                .ok_or(SyncError::Store)?,
        };
        let chunk = match reply.await.map_err(|_| SyncError::Store)? {
            Ok(chunk) => chunk,
            Err(e) => {
                tracing::warn!("sync: reading changesets of {site}: {e}");
                Vec::new()
            }
        };
        // What is left of this range after the chunk, else the next range.
        at = match chunk.last().map(|c| c.id.version.get().checked_add(1)) {
            Some(Some(after)) if after <= last => Some((site, after, last)),
            _ => ranges.next(),
        };
        if let Some((site, first, last)) = at {
            asked = Some(
                store
                    .ask_changesets(site, first, last, SERVE_CHUNK_BYTES)
                    .await
                    .ok_or(SyncError::Store)?,
            );
        }
        for changeset in &chunk {
            if chunk::estimate_bytes(changeset) <= part_bytes {
                write_frame(&mut session.send, &changeset_to_bytes(changeset)).await?;
            } else {
                for part in chunk::split(changeset, part_bytes) {
                    write_frame(&mut session.send, &changeset_to_bytes(&part)).await?;
                }
            }
        }
        served += chunk.len();
    }
    write_frame(&mut session.send, &[]).await?;
    let _ = session.send.finish();
    Ok(served)
}

/// What one pull brought.
#[derive(Debug, Clone, Default)]
pub struct PullReport {
    /// Changesets received.
    pub changesets: usize,
    /// What was received (changesets or parts, in order), when at most
    /// [`patina_core::protocol::SYNC_RELAY_MAX`]: broadcast passes on what it had not seen
    /// (`Protocol::sync_answered`). Empty after a larger round.
    pub received: Vec<Arc<Changeset>>,
    /// Bytes sent (the request, framed).
    pub bytes_sent: u64,
    /// Bytes received (all frames).
    pub bytes_received: u64,
}

impl PullReport {
    /// The count `Protocol::sync_answered` judges the round by: the changesets received when
    /// `received` holds them all (a small round, whose news broadcast passes on), else more
    /// than [`patina_core::protocol::SYNC_RELAY_MAX`] (a catch-up, a find with nothing passed
    /// on). A round of few but large changesets keeps none to relay (`RELAY_BYTES_MAX`): given
    /// as small with an empty list, it would count as having found nothing.
    pub fn brought_for_relay(&self) -> usize {
        if self.received.len() >= self.changesets {
            self.changesets
        } else {
            self.changesets
                .max(patina_core::protocol::SYNC_RELAY_MAX + 1)
        }
    }
}

/// Pulls from one peer what this node lacks. `round` (the sessions opened with this peer) picks
/// which of its older gaps a request asks for when they are more than one request holds.
pub async fn pull(
    transport: &Transport,
    peer: SocketAddr,
    store: &StoreHandle,
    cluster: u16,
    limits: &Limits,
    round: u64,
) -> Result<PullReport, SyncError> {
    let state = store.sync_state().await.ok_or(SyncError::Store)?;
    let (mut send, mut recv) = transport
        .open_session(peer)
        .await
        .ok_or(SyncError::Unreachable)?;
    let request = encode_sync_state(cluster, &state, round);
    write_frame(&mut send, &request).await?;
    let _ = send.finish();
    let mut report = PullReport {
        bytes_sent: request.len() as u64 + 4,
        ..PullReport::default()
    };
    let mut batch: Vec<Arc<Changeset>> = Vec::new();
    let mut batch_bytes = 0;
    loop {
        let frame = read_frame(&mut recv, limits.changeset_bytes_max).await?;
        report.bytes_received += frame.len() as u64 + 4;
        if frame.is_empty() {
            break;
        }
        batch_bytes += frame.len();
        let changeset =
            Arc::new(decode_changeset(&frame, limits).map_err(|e| SyncError::Bad(e.to_string()))?);
        report.changesets += 1;
        // A round's changesets are kept to broadcast again only while few and small: kept
        // after their apply, 64 frames of the 16 MiB a peer may send were 1 GiB.
        if report.changesets <= patina_core::protocol::SYNC_RELAY_MAX
            && report.bytes_received <= RELAY_BYTES_MAX
        {
            report.received.push(changeset.clone());
        } else {
            report.received.clear();
        }
        batch.push(changeset);
        if batch.len() >= APPLY_BATCH || batch_bytes >= APPLY_BATCH_BYTES {
            batch_bytes = 0;
            if !store.apply_wait(std::mem::take(&mut batch)).await {
                return Err(SyncError::Store);
            }
        }
    }
    if !batch.is_empty() && !store.apply_wait(batch).await {
        return Err(SyncError::Store);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use patina_core::protocol::SYNC_RELAY_MAX;

    fn changeset(version: u64) -> Arc<Changeset> {
        Arc::new(Changeset::whole(
            patina_core::change::ChangesetId {
                site: patina_core::SiteId([1; 16]),
                version: patina_core::DbVersion(version),
            },
            Vec::new(),
        ))
    }

    /// A round of few changesets that were too large to keep for relaying is judged as a
    /// catch-up (a find), not as a small round with nothing new in it.
    #[test]
    fn a_round_kept_whole_is_small_and_one_kept_without_its_changesets_is_a_catch_up() {
        let small = PullReport {
            changesets: 3,
            received: (1..=3).map(changeset).collect(),
            ..PullReport::default()
        };
        assert_eq!(small.brought_for_relay(), 3);
        let large_bytes = PullReport {
            changesets: 3,
            ..PullReport::default()
        };
        assert_eq!(large_bytes.brought_for_relay(), SYNC_RELAY_MAX + 1);
        let many = PullReport {
            changesets: 500,
            ..PullReport::default()
        };
        assert_eq!(many.brought_for_relay(), 500);
        assert_eq!(PullReport::default().brought_for_relay(), 0);
    }
}
