//! Who may call a route, after the `Host` check ([`super::host`]): the bearer token
//! (`INGEST_TOKEN`, compared in constant time) for every route that stages or reads records, and
//! the same-origin check for the routes that change state from a browser (requeue a dead
//! letter, start an update), so a page on another site cannot make the browser send them.

use axum::http::{HeaderMap, StatusCode, header};
use sha2::{Digest, Sha256};

use super::IngestState;
use super::error::ApiError;

/// The header a state-changing request must carry, with the value `estafeta`.
pub const REQUESTED_BY: &str = "x-requested-by";

/// Checks `Authorization: Bearer <INGEST_TOKEN>` when a token is configured.
pub(crate) fn check_token(state: &IngestState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = state.config().ingest_token.as_deref() else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            let (scheme, token) = value.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    match given {
        Some(given) if constant_time_eq(given.as_bytes(), expected.as_bytes()) => Ok(()),
        _ => Err(ApiError::unauthorized()),
    }
}

/// Refuses a state-changing request a browser may have been tricked into sending.
pub(crate) fn check_same_origin(headers: &HeaderMap) -> Result<(), ApiError> {
    let forbidden = |why: &str| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "cross_site_refused",
            format!(
                "{why}; use the status page served by this agent, or send the request from a script with the header 'X-Requested-By: estafeta'"
            ),
        )
    };
    let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
    if text(REQUESTED_BY) != Some("estafeta") {
        return Err(forbidden("the header X-Requested-By: estafeta is missing"));
    }
    if let Some(site) = text("sec-fetch-site")
        && !matches!(site, "same-origin" | "none")
    {
        return Err(forbidden(&format!(
            "the browser says this request comes from another site (Sec-Fetch-Site: {site})"
        )));
    }
    let host = text(header::HOST.as_str()).unwrap_or("");
    if let Some(origin) = text(header::ORIGIN.as_str()) {
        let origin_host = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .unwrap_or(origin);
        if !origin_host.eq_ignore_ascii_case(host) {
            return Err(forbidden(&format!(
                "the request comes from {origin}, not from this agent's page"
            )));
        }
    }
    Ok(())
}

/// Compares the digests of both sides so neither the content nor the length of the token
/// shows in the time taken.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let a = Sha256::digest(a);
    let b = Sha256::digest(b);
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares_content() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }
}
