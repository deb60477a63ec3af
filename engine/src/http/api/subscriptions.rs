//! `POST /v1/updates/{table}` and the subscription routes: streams of row changes.

use super::*;

/// Queues a data line of a stream for its client, keeping the channel's last slot for the
/// error line that ends a stream cut off: false (nothing queued) when only that slot is left,
/// that is when the client does not read. Without the kept slot the error line would find the
/// channel full too, and the stream would end looking complete.
fn queue_line(lines: &tokio::sync::mpsc::Sender<Bytes>, line: Bytes) -> bool {
    // The stream's task is the channel's only sender: room seen here cannot shrink before
    // the send.
    lines.capacity() > 1 && lines.try_send(line).is_ok()
}

/// `POST /v1/updates/{table}`: one NDJSON line per row of `table` changed by any later commit,
/// local or remote: `{"notify":["update"|"delete",[pk values]]}`. A consumer too slow to keep
/// up gets an error line and the stream ends (it can reconnect and re-read the table). The
/// answer carries a `corro-query-id` header, as Corrosion's client requires.
pub(super) async fn updates(
    State(state): State<Arc<ApiState>>,
    axum::extract::Path(table): axum::extract::Path<String>,
) -> Response {
    let Some(status) = state.store.status().await else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "store unavailable");
    };
    if !status.tables.contains(&table) {
        return error(
            StatusCode::NOT_FOUND,
            format!("no replicated table {table}"),
        );
    }
    let slot = match state.stream_slot() {
        Ok(slot) => slot,
        Err(e) => return e.into_response(),
    };
    let mut changes = state.row_changes.subscribe();
    let mut shutdown = state.shutdown.clone();
    let metrics = state.metrics.clone();
    let (lines, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    tokio::spawn(async move {
        loop {
            let batch = tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => return,
                _ = lines.closed() => return,
                batch = changes.recv() => batch,
            };
            let batch = match batch {
                Ok(batch) => batch,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    metrics.cutoff("updates");
                    let _ = lines.try_send(ndjson_line(&NotifyEvent::Error(format!(
                        "consumer too slow: {n} commits skipped"
                    ))));
                    return;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            for row in batch.iter().filter(|r| *r.table == *table) {
                let kind = if row.deleted {
                    ChangeType::Delete
                } else {
                    ChangeType::Update
                };
                let pk = row.pk.values().iter().map(SqlValue::from).collect();
                if !queue_line(&lines, ndjson_line(&NotifyEvent::Notify(kind, pk))) {
                    // The client does not read: cut it off rather than buffer without bound.
                    metrics.cutoff("updates");
                    let _ = lines
                        .try_send(ndjson_line(&NotifyEvent::Error("consumer too slow".into())));
                    return;
                }
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .header("corro-query-id", crate::subs::random_uuid())
        .body(stream_body(rx, slot))
        .expect("static headers are valid")
}

/// Query string of the subscription endpoints.
#[derive(Debug, Deserialize, Default)]
pub(super) struct SubscriptionParams {
    /// Leave the current rows out (columns, then eoq, then changes).
    #[serde(default)]
    skip_rows: bool,
    /// Resume after this change id: the changes since, then live ones.
    from: Option<u64>,
}

/// `POST /v1/subscriptions`: one SELECT; the query stream (columns, rows, eoq with change_id),
/// then change events. Identical SQL attaches to the same subscription.
pub(super) async fn subscribe(
    State(state): State<Arc<ApiState>>,
    Query(params): Query<SubscriptionParams>,
    body: Bytes,
) -> Response {
    let statement = match parse_statement(&body) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    if !matches!(statement.params, Params::None) {
        return error(
            StatusCode::BAD_REQUEST,
            "parameters are not supported in subscriptions: write the values into the SQL",
        );
    }
    let slot = match state.stream_slot() {
        Ok(slot) => slot,
        Err(e) => return e.into_response(),
    };
    let attached = state
        .subs
        .subscribe(statement.sql, params.skip_rows, params.from);
    match within_statement_timeout(&state, attached).await {
        Ok(attached) => subscription_stream(&state, attached, slot),
        Err(busy) => busy,
    }
}

/// `GET /v1/subscriptions/{id}`: re-attach to a subscription (`from` to resume).
pub(super) async fn resubscribe(
    State(state): State<Arc<ApiState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    Query(params): Query<SubscriptionParams>,
) -> Response {
    let slot = match state.stream_slot() {
        Ok(slot) => slot,
        Err(e) => return e.into_response(),
    };
    let attached = state.subs.attach(id, params.skip_rows, params.from);
    match within_statement_timeout(&state, attached).await {
        Ok(attached) => subscription_stream(&state, attached, slot),
        Err(busy) => busy,
    }
}

/// The subscription's answer (its first rows, or the changes to replay), or a 503 once the
/// statement timeout has passed: the rows wait for a query thread, behind the heavy queries
/// of other subscriptions, and the request holds a stream slot meanwhile.
async fn within_statement_timeout(
    state: &ApiState,
    attached: impl std::future::Future<Output = Result<Attached, SubsError>>,
) -> Result<Result<Attached, SubsError>, Response> {
    tokio::time::timeout(state.statement_timeout, attached)
        .await
        .map_err(|_| {
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the subscription's rows did not come within {:?}: its query is waiting behind others; try again",
                    state.statement_timeout
                ),
            )
        })
}

/// `DELETE /v1/subscriptions/{id}`: removes a subscription; its subscribers' streams end.
pub(super) async fn unsubscribe(
    State(state): State<Arc<ApiState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    match state.subs.remove(id.clone()).await {
        Ok(()) => axum::Json(json!({ "deleted": id })).into_response(),
        Err(e @ SubsError::Unknown(_)) => error(StatusCode::NOT_FOUND, e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

pub(super) fn change_line(event: &ChangeEvent) -> Bytes {
    ndjson_line(&QueryEvent::Change(
        event.kind,
        event.row_id,
        event.values.iter().map(SqlValue::from).collect(),
        event.change_id,
    ))
}

pub(super) fn subscription_stream(
    state: &ApiState,
    attached: Result<Attached, SubsError>,
    slot: tokio::sync::OwnedSemaphorePermit,
) -> Response {
    let mut attached = match attached {
        Ok(a) => a,
        Err(e @ (SubsError::BadQuery(_) | SubsError::TooCostly(_))) => {
            return error(StatusCode::BAD_REQUEST, e)
        }
        Err(e @ SubsError::Unknown(_)) => return error(StatusCode::NOT_FOUND, e),
        Err(e @ SubsError::TooMany(_)) => return error(StatusCode::SERVICE_UNAVAILABLE, e),
        Err(e @ (SubsError::Resume(_) | SubsError::Ended(_))) => {
            // An error event, never a silent gap: the stream says why and ends.
            return ndjson_response(Body::from(ndjson_line(&QueryEvent::Error(e.to_string()))));
        }
        Err(e @ SubsError::Internal(_)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let start = Instant::now();
    // Everything known now leaves as one chunk: columns, rows and eoq, or the replayed changes.
    let mut head = Vec::new();
    let mut push = |event: &QueryEvent| {
        serde_json::to_writer(&mut head, event).expect("API shapes always serialize");
        head.push(b'\n');
    };
    // A resumed stream carries changes only, as Corrosion's client expects when it re-attaches
    // by itself after a cut (it would hand a second columns line to the application).
    if !attached.resumed {
        push(&QueryEvent::Columns(attached.columns.clone()));
    }
    for (row_id, values) in attached.rows.take().unwrap_or_default() {
        push(&QueryEvent::Row(
            row_id,
            values.into_iter().map(SqlValue::from).collect(),
        ));
    }
    if !attached.resumed {
        push(&QueryEvent::EndOfQuery {
            time: start.elapsed().as_secs_f64(),
            change_id: Some(attached.change_id),
        });
    }
    for event in &attached.replay {
        push(&QueryEvent::Change(
            event.kind,
            event.row_id,
            event.values.iter().map(SqlValue::from).collect(),
            event.change_id,
        ));
    }
    let (lines, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    let mut shutdown = state.shutdown.clone();
    let mut last = attached.change_id;
    let mut live = attached.live;
    let metrics = state.metrics.clone();
    tokio::spawn(async move {
        if lines.send(Bytes::from(head)).await.is_err() {
            return;
        }
        loop {
            let event = tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => return,
                _ = lines.closed() => return,
                event = live.recv() => event,
            };
            let event = match event {
                Ok(event) => event,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    metrics.cutoff("subscription");
                    let _ = lines
                        .send(ndjson_line(&QueryEvent::Error(format!(
                            "subscriber too slow: {n} changes dropped; resume with from={last}"
                        ))))
                        .await;
                    return;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    let _ = lines
                        .send(ndjson_line(&QueryEvent::Error(
                            "the subscription was removed (deleted, unused for its idle \
                             timeout, too costly to keep, or its columns changed with the \
                             schema; the node's log says which); subscribe again"
                                .into(),
                        )))
                        .await;
                    return;
                }
            };
            if event.change_id <= last {
                continue;
            }
            last = event.change_id;
            if !queue_line(&lines, change_line(&event)) {
                // The client does not read: cut it off rather than buffer without bound.
                metrics.cutoff("subscription");
                let _ = lines.try_send(ndjson_line(&QueryEvent::Error(format!(
                    "subscriber too slow; resume with from={}",
                    last - 1
                ))));
                return;
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .header("corro-query-id", attached.id)
        .header("corro-query-hash", attached.hash)
        .body(stream_body(rx, slot))
        .expect("static headers are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that stops reading fills its stream's queue; the cut-off's error line must still
    /// fit, or the stream would end as if complete. (Through HTTP the queue fills only once
    /// the sockets' buffers are full, which no test can size reliably: checked here.)
    #[test]
    fn a_full_stream_queue_keeps_a_slot_for_the_error_line() {
        let (lines, mut rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let mut queued = 0;
        while queue_line(&lines, Bytes::from_static(b"change\n")) {
            queued += 1;
            assert!(queued <= 4, "the queue never filled");
        }
        assert_eq!(queued, 3, "data took the last slot");
        lines
            .try_send(Bytes::from_static(b"error\n"))
            .expect("the error line found the queue full");
        drop(lines);
        let mut last = None;
        while let Ok(line) = rx.try_recv() {
            last = Some(line);
        }
        assert_eq!(last.as_deref(), Some(&b"error\n"[..]));
    }
}
