//! The HTTP sink's configuration (`CENTRAL_API_*` or a `[[sinks]]` entry with `type = "http"`)
//! and the checks of its path templates, which configuration runs at load time.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::redact;
use crate::sinks::record_template::RecordTemplate;

use super::BodyTemplate;

/// Placeholders a route's path template may use.
pub(super) const PLACEHOLDERS: &[&str] = &["entity", "action", "key", "id"];
/// Placeholders the heartbeat path may use.
const HEARTBEAT_PLACEHOLDERS: &[&str] = &["agent_id"];

/// `CENTRAL_API_*` or a `[[sinks]]` entry with `type = "http"`.
#[derive(Clone)]
pub struct HttpSinkConfig {
    /// Base URL: create → `POST {url}/{entity}`, update/upsert → `PUT {url}/{entity}/{key}`,
    /// delete → `DELETE {url}/{entity}/{key}`.
    pub url: String,
    /// Sent as `Authorization: Bearer <token>`.
    pub token: Option<String>,
    pub timeout: Duration,
    /// `false` only when explicitly disabled (`CENTRAL_API_VERIFY_TLS=false`).
    pub verify_tls: bool,
    /// Extra CA certificate (PEM) to trust.
    pub ca_file: Option<PathBuf>,
    /// Per (entity, action) overrides of method, path and headers.
    pub routes: Vec<HttpRoute>,
    /// The `Idempotency-Key` template of records whose route sets none (`idempotency_key`,
    /// `CENTRAL_API_IDEMPOTENCY_KEY`); `None`: the record's id.
    pub idempotency_key: Option<RecordTemplate>,
    /// Maps and catalogs its body templates may read (`maps`, `catalogs`).
    pub lookups: Arc<crate::lookups::Lookups>,
    /// Most requests in flight at once (`CENTRAL_API_CONCURRENCY`): records of different keys
    /// go in parallel, a key's records one after another.
    pub concurrency: usize,
    /// Heartbeats go as `PUT {url}/{heartbeat_path}` (a template with `{agent_id}`); none
    /// when unset, since an API that does not expect them would answer 404 every minute.
    pub heartbeat_path: Option<String>,
}

// By hand, so `{:?}` of a config never prints the token or a password in the URL.
impl fmt::Debug for HttpSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpSinkConfig")
            .field("url", &redact::url(&self.url))
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("timeout", &self.timeout)
            .field("verify_tls", &self.verify_tls)
            .field("ca_file", &self.ca_file)
            .field("routes", &self.routes)
            .field("idempotency_key", &self.idempotency_key)
            .field("concurrency", &self.concurrency)
            .field("heartbeat_path", &self.heartbeat_path)
            .finish()
    }
}

/// An override for one (entity, action); `None` matches any.
#[derive(Clone)]
pub struct HttpRoute {
    pub entity: Option<String>,
    pub action: Option<String>,
    pub method: Option<String>,
    /// Path template appended to the base URL: `{entity}`, `{action}`, `{key}`, `{id}`.
    pub path: Option<String>,
    pub headers: BTreeMap<String, String>,
    /// The `Idempotency-Key` of this route's records (see [`RecordTemplate`]).
    pub idempotency_key: Option<RecordTemplate>,
    /// The body of this route's requests, instead of the record's JSON.
    pub body: Option<Arc<BodyTemplate>>,
}

// By hand: header values may be secrets (an API key), so only their names are shown.
impl fmt::Debug for HttpRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpRoute")
            .field("entity", &self.entity)
            .field("action", &self.action)
            .field("method", &self.method)
            .field("path", &self.path)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("idempotency_key", &self.idempotency_key)
            .field("body", &self.body)
            .finish()
    }
}

/// Rejects unknown or unclosed placeholders, so a typo fails at start rather than per record.
pub(super) fn check_template(template: &str, allowed: &[&str]) -> anyhow::Result<()> {
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .with_context(|| format!("path {template:?} has an unclosed '{{'"))?;
        let name = &after[..close];
        if !allowed.contains(&name) {
            let names: Vec<String> = allowed.iter().map(|n| format!("{{{n}}}")).collect();
            bail!(
                "path {template:?} uses {{{name}}}; the placeholders are {}",
                names.join(", ")
            );
        }
        rest = &after[close + 1..];
    }
    Ok(())
}

/// Checks a heartbeat path template (`CENTRAL_API_HEARTBEAT_PATH`, `heartbeat_path`); the
/// error says what was expected.
pub fn check_heartbeat_path(template: &str) -> Result<(), String> {
    check_template(template, HEARTBEAT_PLACEHOLDERS)
        .map_err(|e| format!("expected a URL path; {e}"))
}
