//! The admin API on the unix socket: membership, rejoin, reconcile, subscriptions, backups, log filters, reload.

use super::*;

/// What the admin socket's routes reach.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// The store thread.
    pub store: StoreHandle,
    /// Membership and gossip counters.
    pub gossip: tokio::sync::watch::Receiver<GossipSnapshot>,
    /// The database file (backups read it on a connection of their own).
    pub db_path: std::path::PathBuf,
    /// Requests to the gossip task (membership states, rejoin, reconcile).
    pub control: tokio::sync::mpsc::Sender<crate::net::gossip::GossipControl>,
    /// The subscription thread.
    pub subs: SubsHandle,
    /// A backup is being written. One at a time: each holds a read snapshot for its whole
    /// copy, and the WAL cannot be reset behind one, so several at once would hold it (and,
    /// under `db.max_db_bytes`, writes) for as long as they all take.
    pub backup_running: Arc<std::sync::atomic::AtomicBool>,
    /// Longest a backup runs (`admin.backup_timeout_ms`).
    pub backup_time_max: std::time::Duration,
}

/// The admin API on the unix socket: `POST /reload`, `GET /members`, `GET /membership-states`,
/// `POST /rejoin`, `POST /sync/reconcile`, `GET /subs`, `GET /subs/{id}`, `POST /backup`,
/// `GET /log`, `POST /log/set`, `POST /log/reset`.
pub fn admin_router(state: AdminState) -> Router {
    let state = Arc::new(state);
    Router::new()
        .route("/reload", post(reload))
        .route("/members", get(members))
        .route("/membership-states", get(membership_states))
        .route("/rejoin", post(rejoin))
        .route("/sync/reconcile", post(reconcile))
        .route("/subs", get(subs_list))
        .route("/subs/{id}", get(subs_info))
        .route("/backup", post(backup))
        .route("/log", get(log_show))
        .route("/log/set", post(log_set))
        .route("/log/reset", post(log_reset))
        .with_state(state)
}

/// Sends a request to the gossip task and waits (bounded) for its answer.
pub(super) async fn ask_gossip<T>(
    state: &AdminState,
    make: impl FnOnce(tokio::sync::oneshot::Sender<T>) -> crate::net::gossip::GossipControl,
) -> Result<T, Response> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let unavailable = || {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the gossip task is not running",
        )
    };
    state
        .control
        .send(make(reply))
        .await
        .map_err(|_| unavailable())?;
    match tokio::time::timeout(Duration::from_secs(60), answer).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(_)) => Err(unavailable()),
        Err(_) => Err(error(StatusCode::GATEWAY_TIMEOUT, "no answer within 60 s")),
    }
}

pub(super) async fn membership_states(State(state): State<Arc<AdminState>>) -> Response {
    match ask_gossip(&state, crate::net::gossip::GossipControl::States).await {
        Ok(states) => axum::Json(crate::http::types::MembershipStatesResponse {
            members: states
                .into_iter()
                .map(
                    |(actor, state, incarnation)| crate::http::types::MemberState {
                        site_id: actor.site_id().to_hex(),
                        addr: actor.addr.to_string(),
                        state: state.to_string(),
                        incarnation,
                        started_ms: actor.bump,
                    },
                )
                .collect(),
        })
        .into_response(),
        Err(response) => response,
    }
}

pub(super) async fn rejoin(State(state): State<Arc<AdminState>>) -> Response {
    match ask_gossip(&state, crate::net::gossip::GossipControl::Rejoin).await {
        Ok(announced_to) => {
            axum::Json(crate::http::types::RejoinResponse { announced_to }).into_response()
        }
        Err(response) => response,
    }
}

pub(super) async fn reconcile(
    State(state): State<Arc<AdminState>>,
    axum::Json(request): axum::Json<crate::http::types::ReconcileRequest>,
) -> Response {
    let answer = ask_gossip(&state, |reply| {
        crate::net::gossip::GossipControl::Reconcile {
            peer: request.peer,
            reply,
        }
    })
    .await;
    match answer {
        Ok(Ok((peer, report, took))) => axum::Json(crate::http::types::ReconcileResponse {
            peer: peer.to_string(),
            changesets: report.changesets,
            bytes_received: report.bytes_received,
            seconds: took.as_secs_f64(),
        })
        .into_response(),
        // A peer that is not a member or not an address is the request's fault; a session
        // that failed is the peer's.
        Ok(Err(e)) if e.starts_with("sync with") => error(StatusCode::BAD_GATEWAY, e),
        Ok(Err(e)) => error(StatusCode::BAD_REQUEST, e),
        Err(response) => response,
    }
}

pub(super) async fn subs_list(State(state): State<Arc<AdminState>>) -> Response {
    match state.subs.list().await {
        Ok(subscriptions) => {
            axum::Json(crate::http::types::SubscriptionsResponse { subscriptions }).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

pub(super) async fn subs_info(
    State(state): State<Arc<AdminState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    match state.subs.list().await {
        Ok(all) => match all.into_iter().find(|s| s.id == id) {
            Some(info) => axum::Json(info).into_response(),
            None => error(StatusCode::NOT_FOUND, format!("no subscription {id}")),
        },
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

pub(super) async fn members(State(state): State<Arc<AdminState>>) -> Response {
    let members = state
        .gossip
        .borrow()
        .members
        .iter()
        .map(|(site, addr)| Member {
            site_id: site.to_hex(),
            addr: addr.to_string(),
        })
        .collect();
    axum::Json(MembersResponse { members }).into_response()
}

/// An online backup on a read connection of its own (see [`crate::store::backup`]): writes go
/// on meanwhile. A second one while one runs is refused with 409.
pub(super) async fn backup(
    State(state): State<Arc<AdminState>>,
    axum::Json(request): axum::Json<crate::http::types::BackupRequest>,
) -> Response {
    let to = std::path::PathBuf::from(&request.path);
    if !to.is_absolute() {
        return error(
            StatusCode::BAD_REQUEST,
            "the backup path must be absolute (it is a path on the node's host)",
        );
    }
    if state
        .backup_running
        .swap(true, std::sync::atomic::Ordering::AcqRel)
    {
        return error(
            StatusCode::CONFLICT,
            "a backup is running: one at a time (each holds a read snapshot while it copies)",
        );
    }
    let (db, running) = (state.db_path.clone(), state.backup_running.clone());
    let time_max = state.backup_time_max;
    // Cleared when the copy ends, however it ends, also when the client leaves first (the
    // copy goes on).
    let done = tokio::task::spawn_blocking(move || {
        struct Ends(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Ends {
            fn drop(&mut self) {
                self.0.store(false, std::sync::atomic::Ordering::Release);
            }
        }
        let _ends = Ends(running);
        crate::store::backup::backup(&db, &to, time_max)
    })
    .await;
    match done {
        Ok(Ok(report)) => {
            tracing::info!(
                "backup of {} bytes written to {} in {:.3} s",
                report.bytes,
                report.path.display(),
                report.elapsed.as_secs_f64()
            );
            axum::Json(crate::http::types::BackupResponse {
                path: report.path.display().to_string(),
                bytes: report.bytes,
                site_id: report.site.to_hex(),
                seconds: report.elapsed.as_secs_f64(),
            })
            .into_response()
        }
        Ok(Err(StoreError::DeadlinePassed(time_max))) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the backup ran past admin.backup_timeout_ms ({time_max:?}) and was stopped; \
                 its partial file was removed"
            ),
        ),
        Ok(Err(e)) => error(store_status(&e), e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

pub(super) fn log_answer(result: Result<String, crate::logging::LogError>) -> Response {
    match result {
        Ok(filter) => axum::Json(crate::http::types::LogFilter { filter }).into_response(),
        Err(e @ crate::logging::LogError::BadFilter(_)) => error(StatusCode::BAD_REQUEST, e),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

pub(super) async fn log_show() -> Response {
    log_answer(crate::logging::current().ok_or(crate::logging::LogError::NoControl))
}

pub(super) async fn log_set(
    axum::Json(request): axum::Json<crate::http::types::LogFilter>,
) -> Response {
    log_answer(crate::logging::set(&request.filter))
}

pub(super) async fn log_reset() -> Response {
    log_answer(crate::logging::reset())
}

pub(super) async fn reload(State(state): State<Arc<AdminState>>) -> Response {
    match state.store.reload().await {
        Ok(()) => axum::Json(json!({ "reloaded": true })).into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}
