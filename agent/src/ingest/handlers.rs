//! The ingest API's handlers. `POST /v1/records/{action}/{entity}` checks, in this order (after
//! the `Host` check in front of every route, `super::host`): the token (401), shutdown (503),
//! the names (400), the optional headers (400), the content type (415), the body size (413,
//! never buffering more than `MAX_BODY_BYTES`), the JSON syntax (400), the body's shape (400)
//! and each entity's JSON Schema (422), the last three through the one intake (`crate::intake`)
//! that every other way in shares; only then does it stage,
//! all records of a request in one all-or-nothing call that returns once they are durable.
//! A refused request stages nothing.

use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use estafeta_staging::{ClientKey, StageError, Staged};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::IngestState;
use super::access::check_token;
use super::error::ApiError;
use crate::intake::{Intake, IntakeError, IntakeErrorKind, KeyFrom, Records};

/// Header carrying the client's idempotency key.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Header carrying the record key (otherwise the entity's key field of the payload).
pub const RECORD_KEY: &str = "x-record-key";
/// Header set on an answer that repeats the first answer to an idempotency key.
pub const REPLAYED: &str = "idempotent-replayed";
/// Longest `Idempotency-Key` accepted, in bytes.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// `POST /v1/records/{action}/{entity}`.
pub async fn post_records(
    State(state): State<IngestState>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let response = match stage_request(&state, path, &headers, body).await {
        Ok(response) => response,
        Err(err) => err.into_response(),
    };
    state.metrics().record_request(response.status().as_u16());
    response
}

async fn stage_request(
    state: &IngestState,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    check_token(state, headers)?;
    if state.is_shutting_down() {
        return Err(ApiError::shutting_down());
    }
    let Path((action, entity)) = path.map_err(|err| {
        ApiError::bad_request(
            "invalid_name",
            format!(
                "{err}; use /v1/records/<action>/<entity> with names from a-z, 0-9, '_' and '-'"
            ),
        )
    })?;
    Intake::check_names(&action, &entity).map_err(from_intake)?;
    let client_key = header_text(headers, IDEMPOTENCY_KEY)?;
    if let Some(key) = &client_key
        && (key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN)
    {
        return Err(ApiError::bad_request(
            "invalid_header",
            format!(
                "the Idempotency-Key header must have 1 to {MAX_IDEMPOTENCY_KEY_LEN} characters"
            ),
        ));
    }
    let record_key = header_text(headers, RECORD_KEY)?;
    check_content_type(headers)?;
    let limit = state.config().max_body_bytes;
    let timeout = state.config().ingest_body_timeout;
    let bytes = tokio::time::timeout(timeout, read_body(headers, body, limit))
        .await
        .map_err(|_| body_timeout(timeout))??;

    let key = match &record_key {
        Some(key) => KeyFrom::Given(Some(key.clone())),
        None => KeyFrom::KeyField,
    };
    let Records { records, is_array } = state
        .intake()
        .records(&action, &entity, &bytes, &key)
        .map_err(from_intake)?;

    let client_key = client_key.map(|key| ClientKey {
        fingerprint: fingerprint(&action, &entity, record_key.as_deref(), &bytes),
        key,
    });
    let store = state.store().clone();
    // The request waits for its group commit without holding a thread: the writer wakes it.
    let (durable, answer) = tokio::sync::oneshot::channel();
    store
        .stage_batch_then(records, client_key, move |staged| {
            let _ = durable.send(staged);
        })
        .map_err(ApiError::from_stage)?;
    let staged = answer
        .await
        .map_err(|_| ApiError::from_stage(StageError::Closed))?
        .map_err(ApiError::from_stage)?;

    let replayed = matches!(staged, Staged::Replayed(_));
    if !replayed {
        state.metrics().add_staged(staged.receipts().len() as u64);
        state.notify_write();
    }
    tracing::debug!(
        %action, %entity, records = staged.receipts().len(), replayed,
        "Request staged."
    );
    let receipts = staged.receipts();
    let body = match (is_array, receipts) {
        (false, [receipt]) => serde_json::json!({
            "id": receipt.id,
            "seq": receipt.seq,
            "path": receipt.path,
        }),
        _ => serde_json::json!({
            "ids": receipts.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            "seqs": receipts.iter().map(|r| r.seq).collect::<Vec<_>>(),
        }),
    };
    let mut response = (StatusCode::ACCEPTED, Json(body)).into_response();
    if replayed {
        response
            .headers_mut()
            .insert(REPLAYED, HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// An optional header as text; 400 when it is not visible ASCII.
fn header_text(headers: &HeaderMap, name: &'static str) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(name) else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(text) => Ok(Some(text.trim().to_owned())),
        Err(_) => Err(ApiError::bad_request(
            "invalid_header",
            format!("the {name} header must be printable ASCII text"),
        )),
    }
}

/// `Content-Type` must be `application/json`, parameters such as `charset` allowed.
fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let media_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .map(|value| value.split(';').next().unwrap_or_default().trim());
    match media_type {
        Some(media_type) if media_type.eq_ignore_ascii_case("application/json") => Ok(()),
        Some(other) => Err(unsupported_media_type(&format!("the body is {other:?}"))),
        None => Err(unsupported_media_type("the Content-Type header is missing")),
    }
}

fn unsupported_media_type(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        format!("{what}; send JSON with the header 'Content-Type: application/json'"),
    )
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!(
            "the body is larger than {limit} bytes (MAX_BODY_BYTES); split the records into smaller requests"
        ),
    )
}

/// A slow or stalled client (for example one that announced a body and never sent it) gets 408
/// after `INGEST_BODY_TIMEOUT_SECS`, so that it cannot hold a connection and its buffer forever.
fn body_timeout(timeout: Duration) -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "body_timeout",
        format!(
            "the request body was not received within {} seconds (INGEST_BODY_TIMEOUT_SECS); send the whole body at once and try again",
            timeout.as_secs_f64()
        ),
    )
}

/// Reads at most `limit` bytes; a larger body is refused without being buffered whole.
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<axum::body::Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(too_large(limit));
    }
    axum::body::to_bytes(body, limit).await.map_err(|err| {
        let over_limit = {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
            let mut found = false;
            while let Some(current) = source {
                if current.is::<http_body_util::LengthLimitError>() {
                    found = true;
                    break;
                }
                source = current.source();
            }
            found
        };
        if over_limit {
            too_large(limit)
        } else {
            ApiError::bad_request(
                "invalid_body",
                format!("the body could not be read: {err}; send the request again"),
            )
        }
    })
}

/// The same key with another request is a conflict; the fingerprint covers everything that
/// decides what gets staged.
fn fingerprint(action: &str, entity: &str, record_key: Option<&str>, body: &[u8]) -> String {
    let mut hasher = Sha256::new();
    for part in [
        action.as_bytes(),
        entity.as_bytes(),
        record_key.unwrap_or_default().as_bytes(),
    ] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hasher.update(body);
    let digest = hasher.finalize();
    let mut hex = String::with_capacity(2 * digest.len());
    for byte in digest {
        use std::fmt::Write;
        let _ = write!(hex, "{byte:02x}");
    }
    format!("sha256:{hex}")
}

/// The HTTP answer to a refused input: the status and code of its kind, its message as is
/// (a schema violation also says to send the request again).
fn from_intake(err: IntakeError) -> ApiError {
    match err.kind {
        IntakeErrorKind::InvalidName => ApiError::bad_request("invalid_name", err.message),
        IntakeErrorKind::InvalidJson => ApiError::bad_request("invalid_json", err.message),
        IntakeErrorKind::InvalidBody => ApiError::bad_request("invalid_body", err.message),
        IntakeErrorKind::SchemaViolation => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "schema_violation",
            format!("{} and send the request again", err.message),
        ),
    }
}

/// `GET /v1/status`: the store's status with each sink's drain rate and time to empty, the
/// version, the uptime, the ingest counters and each SQL source's health.
pub async fn status(
    State(state): State<IngestState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_token(&state, &headers)?;
    let store = state.store().clone();
    let mut status = tokio::task::spawn_blocking(move || store.status())
        .await
        .map_err(|err| ApiError::internal(format!("status task failed: {err}")))?
        .map_err(|err| ApiError::internal(format!("could not read the staging status: {err}")))?;
    state.metrics().fill_drain(&mut status);
    let mut body = serde_json::to_value(&status)
        .map_err(|err| ApiError::internal(format!("could not write the status: {err}")))?;
    if let Value::Object(map) = &mut body {
        // Each sink's connection: TLS or not, verified or not (issue 20).
        if let Some(Value::Array(sinks)) = map.get_mut("sinks") {
            let transports = state.transports();
            for sink in sinks {
                let found = transports
                    .iter()
                    .find(|(name, _)| sink["sink"].as_str() == Some(name.as_str()));
                if let (Value::Object(entry), Some((_, transport))) = (sink, found) {
                    entry.insert("connection".into(), transport.to_json());
                }
            }
        }
        map.insert("version".into(), crate::version::current().into());
        map.insert("uptime_secs".into(), state.uptime_secs().into());
        map.insert(
            "memory_rss_bytes".into(),
            tokio::task::spawn_blocking(crate::host::own_memory_bytes)
                .await
                .ok()
                .flatten()
                .into(),
        );
        map.insert(
            "min_free_disk_bytes".into(),
            state.config().staging_min_free_bytes.into(),
        );
        map.insert("dry_run".into(), state.config().dry_run.into());
        map.insert("shutting_down".into(), state.is_shutting_down().into());
        map.insert(
            "update".into(),
            serde_json::to_value(crate::update::state::load(&state.config().staging_path))
                .unwrap_or_default(),
        );
        map.insert(
            "ingest".into(),
            serde_json::to_value(state.metrics().ingest_counters()).unwrap_or_default(),
        );
        // Each SQL source's last cycle, totals since start, lag and last error (issue 22).
        map.insert(
            "sources".into(),
            serde_json::to_value(state.sources_health().snapshot(chrono::Utc::now()))
                .unwrap_or_default(),
        );
    }
    Ok(Json(body).into_response())
}

/// `POST /v1/update`: wakes the update task for a check now (see `crate::update`).
pub async fn update(
    State(state): State<IngestState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_token(&state, &headers)?;
    super::access::check_same_origin(&headers)?;
    if state.config().update.url.is_none() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "updates_off",
            "UPDATE_URL is not set; set it to the release manifest's URL and restart the agent",
        ));
    }
    state.update_trigger().notify_one();
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({"status": "checking", "follow": "GET /v1/status, update"})),
    )
        .into_response())
}

/// `GET /healthz`: the process runs.
pub async fn healthz() -> &'static str {
    "ok"
}

/// `GET /readyz`: the store is open, answers, and accepts writes.
pub async fn readyz(State(state): State<IngestState>) -> Response {
    let not_ready = |message: String| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", message).into_response()
    };
    if state.is_shutting_down() {
        return not_ready("estafeta is shutting down".into());
    }
    let store = state.store().clone();
    match tokio::time::timeout(
        Duration::from_secs(5),
        tokio::task::spawn_blocking(move || store.ping().map(|()| store.blocked_reason())),
    )
    .await
    {
        Ok(Ok(Ok(blocked))) => match blocked {
            None => "ready".into_response(),
            Some(reason) => not_ready(format!("staging refuses writes: {reason}")),
        },
        Ok(Ok(Err(err))) => not_ready(format!("the staging store does not answer: {err}")),
        Ok(Err(err)) => not_ready(format!("the status task failed: {err}")),
        Err(_) => not_ready("the staging store did not answer within 5 seconds".into()),
    }
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(state): State<IngestState>) -> Response {
    let store = state.store().clone();
    let status = match tokio::task::spawn_blocking(move || store.status()).await {
        Ok(Ok(status)) => Some(status),
        Ok(Err(err)) => {
            tracing::warn!(error = %err, "Could not read the staging status for /metrics.");
            None
        }
        Err(_) => None,
    };
    let memory = tokio::task::spawn_blocking(crate::host::own_memory_bytes)
        .await
        .ok()
        .flatten();
    let mut text = state.metrics().render(status.as_ref(), memory);
    state.sources_health().render(chrono::Utc::now(), &mut text);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// `GET /v1/openapi.json`.
pub async fn openapi(State(state): State<IngestState>) -> Json<Value> {
    Json(super::openapi::document(state.config().max_body_bytes))
}

/// Any path the API does not have.
pub async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such path; see GET /v1/openapi.json for the paths this API has",
    )
}

/// A known path with a method it does not take.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this path does not take that method; see GET /v1/openapi.json (records are sent with POST)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_depends_on_every_part() {
        let base = fingerprint("create", "patient", None, b"{}");
        assert_eq!(base, fingerprint("create", "patient", None, b"{}"));
        assert_ne!(base, fingerprint("update", "patient", None, b"{}"));
        assert_ne!(base, fingerprint("create", "patients", None, b"{}"));
        assert_ne!(base, fingerprint("create", "patient", Some("1"), b"{}"));
        assert_ne!(base, fingerprint("create", "patient", None, b"{ }"));
        assert!(base.starts_with("sha256:"));
    }
}
