//! The ingest HTTP API (axum): local applications `POST` records, which are staged durably
//! before the 202 answer; plus status, health, readiness, Prometheus metrics and the OpenAPI
//! document, and the status page for people (`GET /`) with its dead-letter requeue. [`router`] builds the routes over an [`IngestState`]; the daemon serves it.

pub mod dead_letters;
mod error;
pub mod handlers;
pub mod metrics;
pub mod openapi;
mod serve;
mod state;
pub mod status_page;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};

pub use error::ApiError;
pub use metrics::Metrics;
pub use serve::serve;
pub use state::IngestState;

/// Every route of the ingest API; unknown paths answer 404 and wrong methods 405, both JSON.
pub fn router(state: IngestState) -> Router {
    let limit = state.config().max_body_bytes;
    Router::new()
        .route(
            "/v1/records/{action}/{entity}",
            post(handlers::post_records),
        )
        .route("/v1/status", get(handlers::status))
        .route("/v1/dead-letters", get(dead_letters::list))
        .route(
            "/v1/dead-letters/{sink}/{seq}/requeue",
            post(dead_letters::requeue),
        )
        .route("/", get(status_page::page))
        .route("/assets/status.js", get(status_page::script))
        .route("/assets/status.css", get(status_page::style))
        .route("/v1/update", post(handlers::update))
        .route("/v1/openapi.json", get(handlers::openapi))
        .route("/healthz", get(handlers::healthz))
        .route("/readyz", get(handlers::readyz))
        .route("/metrics", get(handlers::metrics))
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        // The records handler reads the body itself with this same limit; the layer guards
        // any extractor added later.
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}
