//! Dead letters over HTTP, for the status page and for scripts: `GET /v1/dead-letters` lists
//! them with their reasons, `POST /v1/dead-letters/{sink}/{seq}/requeue` puts one back in line
//! (the same as `estafeta retry --send` for one record) and wakes the batcher. Source rows
//! that could not become records are listed too, under `refused_rows`, with their reason and
//! whether `estafeta retry --send` can stage them again (`replayable`).
//!
//! The requeue (and `POST /v1/update`, which uses the same guard) changes state, so besides the token (when `INGEST_TOKEN` is set) it is guarded
//! against cross-site requests, because a browser on the same workstation can be made to send
//! requests to `127.0.0.1:8787` by any web page it opens:
//! - the request must carry `X-Requested-By: estafeta`: an HTML form cannot set a header, and a
//!   cross-origin `fetch` with one needs a CORS preflight this server never approves;
//! - an `Origin` header, when present, must be this server's own origin, and a browser's
//!   `Sec-Fetch-Site` must be `same-origin` or `none`.
//!
//! A DNS rebinding page (evil.example resolving to 127.0.0.1) is same-origin with itself; it is
//! refused before any of this, by the `Host` check every route has (`super::host`).

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use estafeta_staging::StoreError;
use serde::Deserialize;
use serde_json::json;

use super::IngestState;
use super::access::{check_same_origin, check_token};
use super::error::ApiError;

/// Most dead letters one `GET /v1/dead-letters` returns.
pub const MAX_LISTED: usize = 1000;

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    limit: Option<usize>,
}

/// `GET /v1/dead-letters?limit=N`: the oldest dead letters first (at most 1000, default 100),
/// and the total count per sink from the index.
pub async fn list(
    State(state): State<IngestState>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    check_token(&state, &headers)?;
    let Query(query) = query.map_err(|err| {
        ApiError::bad_request(
            "invalid_query",
            format!(
                "{}; expected ?limit=N with N from 1 to {MAX_LISTED}",
                err.body_text()
            ),
        )
    })?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=MAX_LISTED).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("limit={limit} is out of range; expected 1 to {MAX_LISTED}"),
        ));
    }
    let store = state.store().clone();
    let (letters, refused) = tokio::task::spawn_blocking(move || {
        Ok::<_, estafeta_staging::StoreError>((
            store.dead_letters(Some(limit))?,
            store.refused_row_files(Some(limit))?,
        ))
    })
    .await
    .map_err(|err| ApiError::internal(format!("dead-letter task failed: {err}")))?
    .map_err(|err| ApiError::internal(format!("could not read the dead letters: {err}")))?;
    // The row itself stays in its file (patient data, like a dead letter's payload).
    let refused: Vec<_> = refused
        .into_iter()
        .map(|(path, row)| {
            json!({
                "source": row.source,
                "checkpoint": row.checkpoint,
                "reason": row.reason,
                "refused_at": row.refused_at,
                "replayable": row.replayable,
                "path": path,
            })
        })
        .collect();
    let letters: Vec<_> = letters
        .into_iter()
        .map(|l| {
            json!({
                "sink": l.sink,
                "seq": l.seq,
                "id": l.id,
                "action": l.action,
                "entity": l.entity,
                "key": l.key,
                "reason": l.reason,
                "attempts": l.attempts,
                "failed_at": l.failed_at,
                "path": l.path,
            })
        })
        .collect();
    Ok(Json(json!({ "dead_letters": letters, "refused_rows": refused })).into_response())
}

/// `POST /v1/dead-letters/{sink}/{seq}/requeue`.
pub async fn requeue(
    State(state): State<IngestState>,
    path: Result<Path<(String, u64)>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_token(&state, &headers)?;
    check_same_origin(&headers)?;
    let Path((sink, seq)) = path.map_err(|err| {
        ApiError::bad_request(
            "invalid_path",
            format!(
                "{}; expected /v1/dead-letters/<sink>/<seq>/requeue",
                err.body_text()
            ),
        )
    })?;
    let store = state.store().clone();
    let (sink_for_task, answer_sink) = (sink.clone(), sink);
    let result = tokio::task::spawn_blocking(move || store.requeue(&sink_for_task, seq))
        .await
        .map_err(|err| ApiError::internal(format!("requeue task failed: {err}")))?;
    match result {
        Ok(()) => {
            tracing::info!(sink = %answer_sink, seq, "Dead letter requeued from the HTTP API.");
            state.notify_write();
            Ok((
                StatusCode::OK,
                Json(json!({ "requeued": { "sink": answer_sink, "seq": seq } })),
            )
                .into_response())
        }
        Err(StoreError::NotFound(what)) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no dead letter {what}; list them with GET /v1/dead-letters"),
        )),
        Err(err) => Err(ApiError::internal(format!(
            "could not requeue: {err}; check estafeta's log"
        ))),
    }
}
