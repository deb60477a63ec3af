//! `GET /v1/health` and `POST /v1/table_stats`.

use super::*;

#[derive(Debug, Deserialize)]
pub(super) struct HealthParams {
    gaps: Option<u64>,
    p99_lag: Option<f64>,
    queue_size: Option<usize>,
    /// Fewest members (counting this node, as the answer's `members` does) for a healthy
    /// answer: `?members=2` makes a node that never joined, or lost every peer, unhealthy.
    members: Option<u64>,
    failure_status: Option<u16>,
}

/// How long health waits for the store thread before it calls the store stuck.
pub(super) const HEALTH_STORE_WAIT: Duration = Duration::from_secs(1);

pub(super) async fn health(
    State(state): State<Arc<ApiState>>,
    Query(params): Query<HealthParams>,
) -> Response {
    // Health needs no token and skips the in-flight limit, so it has a small limit of its own:
    // a flood of health checks must not fill the store queue that writes need.
    let Ok(_health_slot) = state.health_slots.clone().try_acquire_owned() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("more than {HEALTH_CHECKS_MAX} health checks in flight"),
        );
    };
    let status = match tokio::time::timeout(HEALTH_STORE_WAIT, state.store.status_if_room()).await {
        Ok(Some(status)) => status,
        Ok(None) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the store queue is full or the store is gone",
            )
        }
        Err(_) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the store did not answer within {HEALTH_STORE_WAIT:?} ({} requests queued)",
                    state.store.queue_len()
                ),
            )
        }
    };
    let queue_size = state.store.queue_len();
    // From the commit times broadcast changesets carry (0 on a node that has applied none
    // in the last five minutes).
    let p99_lag = state.metrics.p99_lag();
    let members = state.gossip.borrow().members.len() as u64 + 1;
    let healthy = params.gaps.is_none_or(|max| status.gaps <= max)
        && params.p99_lag.is_none_or(|max| p99_lag <= max)
        && params.queue_size.is_none_or(|max| queue_size <= max)
        && params.members.is_none_or(|min| members >= min);
    let code = if healthy {
        StatusCode::OK
    } else {
        params
            .failure_status
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
    };
    (
        code,
        axum::Json(HealthResponse::Response {
            gaps: status.gaps,
            members,
            p99_lag,
            queue_size: queue_size as u64,
            unreplicated_tables: status.tables_owed_backfill,
        }),
    )
        .into_response()
}

pub(super) async fn table_stats(State(state): State<Arc<ApiState>>, body: Bytes) -> Response {
    let start = Instant::now();
    let request: TableStatsRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"tables\": [..]}}: {e}"),
            )
        }
    };
    let Some(status) = state.store.status().await else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "store unavailable");
    };
    let (valid, invalid_tables): (Vec<String>, Vec<String>) = request
        .tables
        .into_iter()
        .partition(|t| status.tables.contains(t));
    let deadline = state.deadline(&TimeoutParam { timeout: None }, start);
    let counted = state
        .readers
        .with_reader(deadline, move |reader| {
            valid
                .iter()
                .map(|t| reader.count_rows(t, deadline))
                .sum::<Result<u64, _>>()
        })
        .await;
    match counted {
        Ok(Ok(total_row_count)) => axum::Json(TableStatsResponse {
            total_row_count,
            invalid_tables,
        })
        .into_response(),
        Ok(Err(e)) | Err(e) => error(store_status(&e), e),
    }
}
