//! Checks of values that are more than parsing: URLs, files that must be readable, JSON
//! Schemas that must compile, names, and the ingest API's exposure rule.

use std::net::SocketAddr;
use std::path::Path;

use super::keys::{MAX_CONCURRENCY, MIN_INGEST_TOKEN_CHARS};

/// How to make a token, for messages.
pub(super) const GENERATE_TOKEN: &str = "`estafeta token` (or `openssl rand -hex 32`)";

/// Why the ingest API may not listen on `addr` with `token`, when it may not: beyond loopback
/// it needs a token of at least [`MIN_INGEST_TOKEN_CHARS`] characters. The loader reports it
/// (so `check-config` does), and the daemon checks again before it binds, for a `Config` built
/// in code.
pub fn ingest_exposure_problem(addr: SocketAddr, token: Option<&str>) -> Option<String> {
    if addr.ip().is_loopback() {
        return None;
    }
    match token.map(|t| t.chars().count()) {
        None => Some(format!(
            "listens beyond this machine but INGEST_TOKEN is empty: set INGEST_TOKEN to a random secret of at least {MIN_INGEST_TOKEN_CHARS} characters, made with {GENERATE_TOKEN}, or listen on 127.0.0.1"
        )),
        Some(n) if n < MIN_INGEST_TOKEN_CHARS => Some(format!(
            "listens beyond this machine but INGEST_TOKEN has only {n} characters: beyond loopback it must have at least {MIN_INGEST_TOKEN_CHARS}; make one with {GENERATE_TOKEN}, or listen on 127.0.0.1"
        )),
        Some(_) => None,
    }
}

/// Why the ingest API may not listen on `addr` in clear text, when it may not: beyond loopback
/// records and the token would cross the network readable by anyone on it, so it needs
/// `INGEST_TLS_CERT` (or the explicit `INGEST_ALLOW_PLAINTEXT=true`). Checked by the loader and
/// again by the daemon before it binds.
pub fn ingest_plaintext_problem(
    addr: SocketAddr,
    tls: bool,
    allow_plaintext: bool,
) -> Option<String> {
    if addr.ip().is_loopback() || tls || allow_plaintext {
        return None;
    }
    Some(
        "listens beyond this machine without TLS: records (patient data) and INGEST_TOKEN would cross the network in clear text. Set INGEST_TLS_CERT and INGEST_TLS_KEY to serve HTTPS, or listen on 127.0.0.1, or set INGEST_ALLOW_PLAINTEXT=true to accept clear text on purpose"
            .into(),
    )
}

pub(super) fn check_concurrency(n: usize) -> Result<(), String> {
    if (1..=MAX_CONCURRENCY).contains(&n) {
        Ok(())
    } else {
        Err(format!(
            "expected a whole number from 1 to {MAX_CONCURRENCY}"
        ))
    }
}

pub(super) fn check_http_url(url: &str) -> Result<(), String> {
    const EXPECTED: &str =
        "expected an http:// or https:// URL such as https://central.example/api";
    match reqwest::Url::parse(url) {
        Ok(parsed) if matches!(parsed.scheme(), "http" | "https") && parsed.host().is_some() => {
            Ok(())
        }
        Ok(_) => Err(EXPECTED.into()),
        Err(err) => Err(format!("{EXPECTED} ({err})")),
    }
}

/// `postgres://`, `postgresql://`, `mysql://`, `mariadb://` or `sqlite://PATH`.
pub(super) fn check_database_url(url: &str) -> Result<(), String> {
    const EXPECTED: &str = "expected postgres://user@host/db, postgresql://…, mysql://user@host/db, mariadb://… or sqlite://PATH";
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(EXPECTED.into());
    };
    match scheme.to_ascii_lowercase().as_str() {
        "sqlite" => {
            if rest.trim().is_empty() {
                Err("expected sqlite://PATH with a file path, such as sqlite://central.db".into())
            } else {
                Ok(())
            }
        }
        "postgres" | "postgresql" | "mysql" | "mariadb" => match reqwest::Url::parse(url) {
            Ok(parsed) if parsed.host().is_some() => Ok(()),
            Ok(_) => Err(format!("{EXPECTED}: the host is missing")),
            Err(err) => Err(format!("{EXPECTED} ({err})")),
        },
        _ => Err(EXPECTED.into()),
    }
}

pub(super) fn check_readable(path: &Path) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(_) => Err("expected a file, found a folder".into()),
        Err(err) => Err(format!("expected a readable file: {err}")),
    }
}

/// Reads a JSON Schema file and checks that it compiles.
pub(super) fn read_schema(path: &Path) -> Result<serde_json::Value, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|err| format!("expected a readable JSON Schema file: {err}"))?;
    let schema: serde_json::Value = serde_json::from_str(&text)
        .map_err(|err| format!("expected a JSON Schema, but the file is not valid JSON: {err}"))?;
    jsonschema::validator_for(&schema)
        .map_err(|err| format!("expected a valid JSON Schema: {err}"))?;
    Ok(schema)
}

pub(super) fn invalid_reason(err: estafeta_staging::StageError) -> String {
    match err {
        estafeta_staging::StageError::Invalid(reason) => format!("expected a valid name: {reason}"),
        other => other.to_string(),
    }
}
