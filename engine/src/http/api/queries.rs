//! `POST /v1/queries`: a read on a pooled read-only connection, streamed as NDJSON in chunks.

use super::*;

/// What the reader thread hands the query handler.
#[derive(Debug)]
pub(super) enum QueryChunk {
    /// The statement failed before anything was sent: answer with an error status.
    Failed(StoreError),
    /// Lines, more to come.
    More(Bytes),
    /// The last lines (eoq or an error line).
    Last(Bytes),
}

/// A query answer's lines are gathered into chunks of about this size...
pub(super) const QUERY_CHUNK_BYTES: usize = 16 * 1024;

/// ...or sent when the oldest waiting line is this old, so a slow query's rows still flow.
pub(super) const QUERY_CHUNK_DELAY: Duration = Duration::from_millis(20);

/// Chunks in flight between the reader thread and the connection.
pub(super) const QUERY_CHUNKS_QUEUED: usize = 4;

/// Gathers NDJSON lines on the reader thread and hands them over in chunks, so a short answer
/// leaves in one write and a long one in few, never a write per row.
pub(super) struct ChunkWriter {
    tx: tokio::sync::mpsc::Sender<QueryChunk>,
    buffer: Vec<u8>,
    since: Option<Instant>,
    sent: bool,
    /// A chunk was dropped (the client left, or did not read until the deadline): nothing
    /// more may be sent, least of all an eoq after missing rows.
    gave_up: bool,
    deadline: Instant,
}

/// Runs a query on a reader thread, streaming its lines through `tx`.
pub(super) fn run_query(
    reader: &crate::store::Reader,
    statement: &Statement,
    start: Instant,
    deadline: Instant,
    tx: tokio::sync::mpsc::Sender<QueryChunk>,
) {
    let left = tx.clone();
    let out = std::cell::RefCell::new(ChunkWriter {
        tx,
        buffer: Vec::with_capacity(4096),
        since: None,
        sent: false,
        gave_up: false,
        deadline,
    });
    let mut row_id = 0u64;
    let result = reader.query_each(
        statement,
        Some(deadline),
        Some(Box::new(move || left.is_closed())),
        |columns| {
            out.borrow_mut()
                .line(&QueryEvent::Columns(columns.to_vec()))
        },
        |row| {
            row_id += 1;
            let mut out = out.borrow_mut();
            out.line(&QueryEvent::Row(
                row_id,
                row.into_iter().map(SqlValue::from).collect(),
            ));
            out.maybe_flush()
        },
    );
    let mut out = out.into_inner();
    match result {
        Err(e) if !out.sent => {
            // Nothing sent yet, so the queue has room: this never waits.
            let _ = out.tx.try_send(QueryChunk::Failed(e));
        }
        // Rows were lost: the answer must not end like a complete one (the connection side
        // aborts a body that ends without its last chunk).
        _ if out.gave_up => {}
        Err(e) => {
            out.line(&QueryEvent::Error(e.to_string()));
            out.send(true);
        }
        Ok(()) => {
            out.line(&QueryEvent::EndOfQuery {
                time: start.elapsed().as_secs_f64(),
                change_id: None,
            });
            out.send(true);
        }
    }
}

pub(super) async fn queries(
    State(state): State<Arc<ApiState>>,
    Query(param): Query<TimeoutParam>,
    body: Bytes,
) -> Response {
    let start = Instant::now();
    let deadline = state.deadline(&param, start);
    let statement = match parse_statement(&body) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<QueryChunk>(QUERY_CHUNKS_QUEUED);
    let readers = state.readers.clone();
    // The query runs on its own task: if this handler is dropped (the client left), the
    // channel closes and the statement is stopped at its next progress check.
    let task = tokio::spawn(async move {
        readers
            .with_reader(deadline, move |reader| {
                run_query(reader, &statement, start, deadline, tx)
            })
            .await
    });
    match rx.recv().await {
        Some(QueryChunk::Failed(e)) => error(store_status(&e), e),
        // The whole answer in one body: one write with the head.
        Some(QueryChunk::Last(bytes)) => ndjson_response(Body::from(bytes)),
        Some(QueryChunk::More(first)) => {
            // Forwarded until the last chunk; a body that ends without it ends with an error,
            // so the client sees a broken answer (HTTP/1.1: no final chunk; HTTP/2: a reset
            // stream), never a short one that looks complete.
            let (body_tx, body_rx) = tokio::sync::mpsc::channel(QUERY_CHUNKS_QUEUED);
            tokio::spawn(async move {
                let mut next = Some(first);
                while let Some(bytes) = next.take() {
                    if body_tx.send(Ok(bytes)).await.is_err() {
                        return;
                    }
                    // The client leaving closes the body: drop `rx` at once, so the query
                    // stops at its next progress check instead of at its deadline.
                    let chunk = tokio::select! {
                        _ = body_tx.closed() => return,
                        chunk = rx.recv() => chunk,
                    };
                    match chunk {
                        Some(QueryChunk::More(b)) => next = Some(b),
                        Some(QueryChunk::Last(b)) => {
                            let _ = body_tx.send(Ok(b)).await;
                            return;
                        }
                        Some(QueryChunk::Failed(_)) | None => break,
                    }
                }
                let _ = body_tx
                    .send(Err(std::io::Error::other("the query stopped mid-answer")))
                    .await;
            });
            ndjson_response(Body::from_stream(
                tokio_stream::wrappers::ReceiverStream::new(body_rx),
            ))
        }
        None => match task.await {
            Ok(Err(e)) => error(store_status(&e), e),
            _ => error(StatusCode::INTERNAL_SERVER_ERROR, "query failed"),
        },
    }
}

impl ChunkWriter {
    fn line(&mut self, event: &QueryEvent) {
        serde_json::to_writer(&mut self.buffer, event).expect("API shapes always serialize");
        self.buffer.push(b'\n');
        self.since.get_or_insert_with(Instant::now);
    }

    /// Sends the buffer if it is big or old enough; false when the client is gone or the
    /// deadline passed while it was not reading.
    fn maybe_flush(&mut self) -> bool {
        let due = self.buffer.len() >= QUERY_CHUNK_BYTES
            || self.since.is_some_and(|t| t.elapsed() >= QUERY_CHUNK_DELAY);
        !due || self.send(false)
    }

    fn send(&mut self, last: bool) -> bool {
        if self.gave_up {
            return false;
        }
        let bytes = Bytes::from(std::mem::take(&mut self.buffer));
        self.since = None;
        self.sent = true;
        let mut chunk = if last {
            QueryChunk::Last(bytes)
        } else {
            QueryChunk::More(bytes)
        };
        // Never block the reader on a client that does not read: poll, bounded by the
        // deadline, and give the connection back when it passes.
        loop {
            match self.tx.try_send(chunk) {
                Ok(()) => return true,
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                    self.gave_up = true;
                    return false;
                }
                Err(tokio::sync::mpsc::error::TrySendError::Full(c)) => {
                    if Instant::now() >= self.deadline {
                        self.gave_up = true;
                        return false;
                    }
                    chunk = c;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
}
