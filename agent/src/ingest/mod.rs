//! The ingest HTTP API (axum): local applications `POST` records, which are staged durably
//! before the 202 answer; plus status, health, readiness, Prometheus metrics and the OpenAPI
//! document, and the status page for people (`GET /`) with its dead-letter requeue. [`router`] builds the routes over an [`IngestState`]; the daemon serves it.
//! Every route, the unknown ones included, is behind the `Host` check of [`host`] (DNS
//! rebinding).

pub mod access;
pub mod dead_letters;
mod error;
pub mod handlers;
pub mod host;
pub mod openapi;
mod serve;
mod state;
pub mod status_page;
pub mod token;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::{get, post};

pub use crate::metrics::Metrics;
pub use error::ApiError;
pub use serve::serve;
pub use state::IngestState;

/// The address a client on this machine uses for the API listening on `bind`: `bind` itself, or
/// loopback when it is a wildcard (`0.0.0.0` cannot be connected to on Windows, and it is no
/// name a client should send as `Host`).
pub fn local_addr(bind: std::net::SocketAddr) -> std::net::SocketAddr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    match bind.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, bind.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, bind.port()).into(),
        _ => bind,
    }
}

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
        // Last added, so it runs first, before any handler or fallback reads the request.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            host::check_host,
        ))
        .with_state(state)
}
