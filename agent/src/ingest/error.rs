//! The ingest API's error answer: every failure is JSON `{"error": code, "message": text}`,
//! where `code` is a stable machine-readable word and `message` says what to do about it.
//! Store errors are mapped to HTTP statuses here, in one place.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use estafeta_staging::StageError;

/// Seconds a client is told to wait (`Retry-After`) after a 503 or a 507.
pub const RETRY_AFTER_SECS: u32 = 5;

/// One error answer of the ingest API.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    /// Stable code, such as `invalid_json` or `staging_full`.
    pub code: &'static str,
    /// A sentence for a person: what went wrong and what to do.
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid token is required: send the header 'Authorization: Bearer <INGEST_TOKEN>'",
        )
    }

    pub fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            format!(
                "estafeta is shutting down and accepts no new records; send the request again in {RETRY_AFTER_SECS} seconds"
            ),
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
    }

    /// The answer to a refused stage call. Nothing of a refused call is staged.
    pub fn from_stage(err: StageError) -> Self {
        match err {
            StageError::Invalid(message) => Self::bad_request(
                "invalid_record",
                format!("{message}; fix the request and send it again"),
            ),
            err @ StageError::Full(_) => Self::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "staging_full",
                err.to_string(),
            ),
            err @ StageError::Conflict(_) => Self::new(
                StatusCode::CONFLICT,
                "idempotency_conflict",
                err.to_string(),
            ),
            err @ StageError::UnknownSink(..) => Self::bad_request(
                "unknown_sink",
                format!("{err}; fix the routes in the configuration"),
            ),
            StageError::Closed => Self::shutting_down(),
            err @ StageError::Poisoned(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "staging_stopped",
                err.to_string(),
            ),
            err @ (StageError::Io { .. } | StageError::Store(_)) => {
                tracing::error!(error = %err, "Staging a request failed; nothing of it was acknowledged.");
                Self::internal(format!(
                    "{err}; nothing of this request was staged: check the disk and estafeta's log, then send it again"
                ))
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.code, "message": self.message });
        let mut response = (self.status, Json(body)).into_response();
        let headers = response.headers_mut();
        match self.status {
            StatusCode::UNAUTHORIZED => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::INSUFFICIENT_STORAGE => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
            }
            _ => {}
        }
        response
    }
}
