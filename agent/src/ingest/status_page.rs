//! The status page for the hospital IT team, on the ingest port: `GET /` is a small HTML
//! shell, `/assets/status.js` and `/assets/status.css` are compiled into the binary, so the
//! page works offline and loads nothing from elsewhere. The script reads `GET /v1/status` and
//! `GET /v1/dead-letters` every 5 seconds and draws what is pending per sink and per entity,
//! how fast each sink drains and when it will be empty ("not draining" when it is not),
//! the oldest pending age, dead letters with their reasons and a Requeue button, the last
//! delivery of each sink, free disk, memory, version and update state.
//!
//! The shell holds no data, so it needs no token; the script asks for `INGEST_TOKEN` when the
//! API answers 401 and keeps it in the tab's `sessionStorage` only. The answers forbid framing
//! (clickjacking the Requeue button) and any script, style or connection but this agent's own
//! (Content-Security-Policy). Text from the records and the sinks' errors is only ever set as
//! text, never as HTML.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

const PAGE: &str = include_str!("status_page/index.html");
const SCRIPT: &str = include_str!("status_page/status.js");
const STYLE: &str = include_str!("status_page/status.css");

/// Only this agent's own script, style and API; no frames, no plugins, no inline code.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `GET /`.
pub async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

/// `GET /assets/status.js`.
pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /assets/status.css`.
pub async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}
