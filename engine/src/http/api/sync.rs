//! `GET /v1/sync/digest` and `GET /v1/sync/state`: what tests and operators compare between nodes.

use super::*;

/// `GET /v1/sync/digest`: row counts and hashes per table and a hash of all clocks; equal on
/// converged nodes. It reads every row on the store's thread, so it has a statement's deadline.
pub(super) async fn digest(
    State(state): State<Arc<ApiState>>,
    Query(param): Query<TimeoutParam>,
) -> Response {
    let deadline = state.deadline(&param, Instant::now());
    match state.store.digest(Some(deadline)).await {
        Some(Ok(d)) => axum::Json(DigestResponse {
            tables: d
                .tables
                .iter()
                .map(|(t, (rows, hash))| {
                    let digest = TableDigest {
                        rows: *rows,
                        hash: format!("{hash:016x}"),
                    };
                    (t.clone(), digest)
                })
                .collect(),
            clocks: format!("{:016x}", d.clocks),
        })
        .into_response(),
        Some(Err(e)) => error(store_status(&e), e),
        None => error(StatusCode::SERVICE_UNAVAILABLE, "store unavailable"),
    }
}

/// `GET /v1/sync/state`: per site, the head this node heard of and the versions it still needs.
pub(super) async fn sync_state(State(state): State<Arc<ApiState>>) -> Response {
    let Some(sync) = state.store.sync_state().await else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "store unavailable");
    };
    axum::Json(SyncStateResponse {
        actor_id: state.site.to_hex(),
        sites: sync
            .sites
            .into_iter()
            .map(|(site, (head, needs))| {
                let site_state = SiteSyncState {
                    head: head.get(),
                    needs,
                };
                (site.to_hex(), site_state)
            })
            .collect(),
    })
    .into_response()
}
