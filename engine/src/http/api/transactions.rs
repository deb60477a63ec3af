//! `POST /v1/transactions`: statements run in one local transaction on the store thread.

use super::*;

pub(super) async fn transactions(
    State(state): State<Arc<ApiState>>,
    Query(param): Query<TimeoutParam>,
    body: Bytes,
) -> Response {
    let start = Instant::now();
    let deadline = state.deadline(&param, start);
    let parsed: Vec<ApiStatement> = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("expected a JSON array of statements: {e}"),
            )
        }
    };
    if parsed.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "empty transaction: give at least one statement",
        );
    }
    let statements = match parsed
        .into_iter()
        .map(ApiStatement::into_statement)
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let result = state
        .store
        .transact(statements, Some(deadline.saturating_duration_since(start)))
        .await;
    let failed = |status: StatusCode, message: String| {
        (
            status,
            axum::Json(ExecResponse {
                results: vec![ExecResult::Error { error: message }],
                time: start.elapsed().as_secs_f64(),
                version: None,
                actor_id: Some(state.site.to_hex()),
            }),
        )
            .into_response()
    };
    match result {
        Ok(out) => axum::Json(ExecResponse {
            results: out
                .rows_affected
                .iter()
                .zip(&out.statement_times)
                .map(|(n, t)| ExecResult::Execute {
                    rows_affected: *n,
                    time: t.as_secs_f64(),
                })
                .collect(),
            time: start.elapsed().as_secs_f64(),
            version: out.version.map(|v| v.get()),
            actor_id: Some(state.site.to_hex()),
        })
        .into_response(),
        Err(e @ TxError::Overloaded) => failed(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e @ TxError::Unavailable) => failed(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e @ TxError::TimedOut) => failed(StatusCode::REQUEST_TIMEOUT, e.to_string()),
        Err(TxError::Store(e)) => {
            let message = match &e {
                StoreError::Statement { message, .. } => message.clone(),
                other => other.to_string(),
            };
            failed(store_status(&e), message)
        }
    }
}
