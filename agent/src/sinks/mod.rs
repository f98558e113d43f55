//! Sinks: where staged records are delivered. Each sink takes a batch leased from the store
//! (at most one record per (entity, key), so a batch has no internal order to keep), delivers
//! it, and answers one [`Outcome`] per record; the batcher turns outcomes into ack / fail / dead.
//!
//! - [`http`]: one request per record, `Idempotency-Key` header, reqwest with rustls.
//! - [`database`]: a landing table `estafeta_records` with a unique idempotency key, on
//!   PostgreSQL ([`postgres`]), MariaDB / MySQL ([`mysql`]) or SQLite ([`sqlite`]); with
//!   [`apply`] mode, records are also applied to the real tables by statement files.
//! - [`nats`]: NATS JetStream, one message per record with `Nats-Msg-Id`, async-nats.
//!
//! [`build`] turns the configured sinks into `Arc<dyn Sink>`s; it checks every URL but connects
//! to nothing, so the agent starts (and stages) while the central side is down.
//! [`redact_url`] hides passwords in URLs before they reach a log line or an error.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use estafeta_staging::Delivery;

/// A boxed future, so sinks can live behind `dyn Sink`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What happened to one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The sink has it (or already had it: a resend is not an error).
    Delivered,
    /// A transient failure: connection refused or lost, timeout, HTTP 408/425/429/5xx,
    /// deadlock. `retry_after` is the server's own hint (HTTP `Retry-After`), if any.
    Retry {
        error: String,
        retry_after: Option<Duration>,
    },
    /// A permanent failure: the record goes to the dead letters with this reason.
    Dead { reason: String },
}

/// A destination for records.
pub trait Sink: Send + Sync {
    /// The sink's name, as routes and the store know it.
    fn name(&self) -> &str;
    /// Delivers `batch`; returns exactly one outcome per record, in the same order.
    fn deliver<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Outcome>>;
    /// Describes what `deliver` would send, one line per record, for `DRY_RUN`.
    fn dry_run(&self, batch: &[Delivery]) -> Vec<String>;
    /// Tries to reach the sink (for `check-config` and `/readyz`).
    fn probe(&self) -> BoxFuture<'_, anyhow::Result<()>>;
    /// Sends a heartbeat ([`crate::heartbeat`]); `None` when this sink does not take them
    /// (the default).
    fn heartbeat<'a>(
        &'a self,
        beat: &'a crate::heartbeat::Heartbeat,
    ) -> BoxFuture<'a, Option<anyhow::Result<()>>> {
        let _ = beat;
        Box::pin(async { None })
    }
}

pub mod apply;
pub mod database;
pub mod http;
pub mod mysql;
pub mod nats;
pub mod postgres;
pub mod sqlite;

use crate::config::{SinkConfig, SinkKind};

/// Builds every configured sink, in order. Connects to nothing: database sinks connect on their
/// first delivery or probe. Fails on a duplicate name or an unusable URL, TLS file or route.
pub fn build(configs: &[SinkConfig]) -> anyhow::Result<Vec<Arc<dyn Sink>>> {
    let mut names = BTreeSet::new();
    let mut sinks = Vec::with_capacity(configs.len());
    for config in configs {
        if !names.insert(config.name.as_str()) {
            anyhow::bail!(
                "two sinks are named {:?}; give each sink a unique name",
                config.name
            );
        }
        let sink: Arc<dyn Sink> = match &config.kind {
            SinkKind::Http(http) => Arc::new(
                http::HttpSink::new(config.name.clone(), http.clone())
                    .with_context(|| format!("sink {:?}", config.name))?,
            ),
            SinkKind::Database(db) => database::build(config.name.clone(), db.clone())
                .with_context(|| format!("sink {:?}", config.name))?,
            SinkKind::Nats(nats) => Arc::new(
                nats::NatsSink::new(config.name.clone(), nats.clone())
                    .with_context(|| format!("sink {:?}", config.name))?,
            ),
        };
        sinks.push(sink);
    }
    Ok(sinks)
}

/// Query parameters whose values are secrets (compared without case).
const SECRET_PARAMS: &[&str] = &[
    "password",
    "pass",
    "passwd",
    "pwd",
    "sslpassword",
    "token",
    "access_token",
    "api_key",
    "apikey",
    "secret",
];

/// `url` with its password and secret query parameters replaced by `***`:
/// `postgres://user:pw@host/db?password=x` → `postgres://user:***@host/db?password=***`.
/// In a NATS URL a user without a password is a token: `nats://tok@host` → `nats://***@host`.
/// It errs on the side of hiding: text that merely looks like a password is hidden too.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    // The user info ends at the last '@' before the query: an unencoded '@' or '/' in a
    // password must not leave part of it visible.
    let before_query = rest.find(['?', '#']).unwrap_or(rest.len());
    let (head, tail) = rest.split_at(before_query);
    let head = match head.rfind('@') {
        Some(at) => {
            let (userinfo, host) = head.split_at(at);
            match userinfo.find(':') {
                Some(colon) => format!("{}:***{host}", &userinfo[..colon]),
                None if is_nats_scheme(scheme) => format!("***{host}"),
                None => head.to_owned(),
            }
        }
        None => head.to_owned(),
    };
    let tail = redact_params(tail);
    if scheme.is_empty() {
        // A `key=value key=value` connection string.
        return redact_params(&head) + &tail;
    }
    format!("{scheme}{head}{tail}")
}

/// `nats://`, `tls://` (NATS over TLS), any case.
fn is_nats_scheme(scheme: &str) -> bool {
    let scheme = scheme.trim_end_matches("://").to_ascii_lowercase();
    matches!(scheme.as_str(), "nats" | "tls")
}

/// Replaces the values of [`SECRET_PARAMS`] in `key=value` pairs separated by `&`, `;`, `?`,
/// `#` or spaces.
fn redact_params(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        let end = rest.find(['&', ';', '?', '#', ' ']).unwrap_or(rest.len());
        let (pair, after) = rest.split_at(end);
        match pair.split_once('=') {
            Some((key, _)) if SECRET_PARAMS.iter().any(|s| key.eq_ignore_ascii_case(s)) => {
                out.push_str(key);
                out.push_str("=***");
            }
            _ => out.push_str(pair),
        }
        let mut chars = after.chars();
        if let Some(sep) = chars.next() {
            out.push(sep);
        }
        rest = chars.as_str();
    }
    out
}

/// The secrets found in `url` (password, secret query parameters), as written and
/// percent-decoded, for [`scrub`].
pub(crate) fn url_secrets(url: &str) -> Vec<String> {
    let mut secrets = Vec::new();
    if let Ok(parsed) = reqwest::Url::parse(url) {
        if let Some(password) = parsed.password() {
            secrets.push(password.to_owned());
        }
        for (key, value) in parsed.query_pairs() {
            if SECRET_PARAMS.iter().any(|s| key.eq_ignore_ascii_case(s)) {
                secrets.push(value.into_owned());
            }
        }
    }
    let decoded: Vec<String> = secrets.iter().map(|s| percent_decode(s)).collect();
    secrets.extend(decoded);
    secrets.retain(|s| !s.is_empty());
    secrets.sort();
    secrets.dedup();
    // Longest first, so a secret containing another is hidden whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets
}

/// `message` with every secret replaced by `***`: a last guard for driver messages, which
/// should not echo a password but are not ours to trust.
pub(crate) fn scrub(message: String, secrets: &[String]) -> String {
    secrets.iter().fold(message, |message, secret| {
        if message.contains(secret.as_str()) {
            message.replace(secret.as_str(), "***")
        } else {
            message
        }
    })
}

/// `err` and its causes on one line, skipping a cause its parent already spells out.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

pub(crate) fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_url_hides_the_password_and_secret_parameters() {
        assert_eq!(
            redact_url("postgres://user:pw@host:5432/db"),
            "postgres://user:***@host:5432/db"
        );
        assert_eq!(
            redact_url("mysql://root:p/a@ss@host/db?password=x&ssl=true"),
            "mysql://root:***@host/db?password=***&ssl=true"
        );
        assert_eq!(redact_url("mysql://root@host/db"), "mysql://root@host/db");
        assert_eq!(redact_url("sqlite://./central.db"), "sqlite://./central.db");
        assert_eq!(
            redact_url("host=db user=u password=secret"),
            "host=db user=u password=***"
        );
        assert_eq!(
            redact_url("https://api.example/v1?token=abc#x"),
            "https://api.example/v1?token=***#x"
        );
        assert_eq!(redact_url("nats://tok@h:4222"), "nats://***@h:4222");
        assert_eq!(redact_url("tls://u:pw@h:4222"), "tls://u:***@h:4222");
        assert_eq!(redact_url("nats://h:4222"), "nats://h:4222");
    }

    #[test]
    fn scrub_hides_raw_and_decoded_passwords() {
        let secrets = url_secrets("postgres://u:p%40ss%2Fword@h/db?sslpassword=zz9");
        let msg = scrub(
            "failed for p@ss/word and p%40ss%2Fword and zz9".to_owned(),
            &secrets,
        );
        assert_eq!(msg, "failed for *** and *** and ***");
    }
}
