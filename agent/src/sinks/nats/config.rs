//! The JetStream sink's configuration (`CENTRAL_NATS_*` or a `[[sinks]]` entry with
//! `type = "nats"`): subjects, the stream's settings, and the checks configuration runs at load
//! time.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream;
use reqwest::Url;

use crate::redact;

/// Default subject template.
pub const DEFAULT_SUBJECT: &str = "estafeta.{entity}.{action}";
/// Default stream name when `create_stream = true`.
pub const DEFAULT_STREAM: &str = "ESTAFETA";
/// Default timeout of the connection and of each publish acknowledgement, in seconds.
pub const DEFAULT_NATS_TIMEOUT_SECS: u64 = 10;
/// Largest accepted stream replica count (JetStream's own limit).
pub const MAX_REPLICAS: usize = 5;
/// Placeholders a subject template may use.
const PLACEHOLDERS: &[&str] = &["entity", "action", "agent"];
/// JetStream's deduplication header, carrying the record's id.
pub(super) const MSG_ID_HEADER: &str = "Nats-Msg-Id";
/// Header carrying the record's sequence number.
pub(super) const SEQ_HEADER: &str = "Estafeta-Seq";
/// Header carrying the agent id.
pub(super) const AGENT_HEADER: &str = "Estafeta-Agent";
/// Heartbeats go to `<this>.<agent>` (core NATS; see [`crate::heartbeat`]).
pub const HEARTBEAT_SUBJECT_PREFIX: &str = "estafeta_heartbeat";

/// `CENTRAL_NATS_*` or a `[[sinks]]` entry with `type = "nats"`.
#[derive(Clone, Default)]
pub struct NatsSinkConfig {
    /// `nats://host:4222`, optionally with `user:password@` or `token@`; `tls://` for TLS.
    pub url: String,
    /// Token authentication (overrides a token in the URL).
    pub token: Option<String>,
    /// Subject template: `{entity}`, `{action}`, `{agent}`.
    pub subject: String,
    /// Connection timeout and the wait for each publish acknowledgement.
    pub timeout: Duration,
    /// This agent's id (`AGENT_ID`): the `Estafeta-Agent` header, `agent_id` and `{agent}`.
    pub agent_id: String,
    /// `Some` when `create_stream = true`.
    pub stream: Option<StreamSettings>,
    /// `tls_required` (`CENTRAL_NATS_TLS_REQUIRED`): TLS on `nats://` whatever the server's
    /// INFO says. `None`: required beyond loopback, the server decides on loopback.
    pub tls_required: Option<bool>,
    /// `ca_file` (`CENTRAL_NATS_CA_FILE`): the only CA trusted for the server's certificate;
    /// `None`: the system's trust store and the bundled roots.
    pub ca_file: Option<PathBuf>,
    /// `client_cert` and `client_key` (`CENTRAL_NATS_CLIENT_CERT`, `CENTRAL_NATS_CLIENT_KEY`):
    /// the client certificate (PEM chain) and its key, for servers with `verify: true`.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// `creds_file` (`CENTRAL_NATS_CREDS_FILE`): a `.creds` file (user JWT and NKey seed).
    pub creds_file: Option<PathBuf>,
    /// `nkey_file` (`CENTRAL_NATS_NKEY_FILE`): a file holding a user NKey seed (`SU…`).
    pub nkey_file: Option<PathBuf>,
}

// By hand, so `{:?}` never prints the token or a password in the URL.
impl fmt::Debug for NatsSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsSinkConfig")
            .field("url", &redact::url(&self.url))
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("subject", &self.subject)
            .field("timeout", &self.timeout)
            .field("agent_id", &self.agent_id)
            .field("stream", &self.stream)
            .field("tls_required", &self.tls_required)
            .field("ca_file", &self.ca_file)
            .field("client_cert", &self.client_cert)
            .field("client_key", &self.client_key)
            .field("creds_file", &self.creds_file)
            .field("nkey_file", &self.nkey_file)
            .finish()
    }
}

/// The stream the sink creates when `create_stream = true`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSettings {
    /// Stream name (`stream`, default `ESTAFETA`).
    pub name: String,
    /// Subjects it captures (`stream_subjects`, default: the template with each placeholder
    /// token as `*`).
    pub subjects: Vec<String>,
    pub retention: Retention,
    /// `replicas`, 1 to 5 (default 1).
    pub replicas: usize,
    /// `duplicate_window_secs`; `None`: the server's default (2 minutes).
    pub duplicate_window: Option<Duration>,
}

/// A stream's retention policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Keep messages up to the stream's limits (the default).
    Limits,
    /// Keep a message while a consumer has not acknowledged it.
    Interest,
    /// Keep a message until one consumer acknowledged it.
    WorkQueue,
}

impl Retention {
    /// `limits`, `interest` or `workqueue`.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "limits" => Ok(Retention::Limits),
            "interest" => Ok(Retention::Interest),
            "workqueue" | "work_queue" => Ok(Retention::WorkQueue),
            _ => Err("expected limits, interest or workqueue".into()),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Retention::Limits => "limits",
            Retention::Interest => "interest",
            Retention::WorkQueue => "workqueue",
        }
    }

    pub(super) fn policy(self) -> jetstream::stream::RetentionPolicy {
        match self {
            Retention::Limits => jetstream::stream::RetentionPolicy::Limits,
            Retention::Interest => jetstream::stream::RetentionPolicy::Interest,
            Retention::WorkQueue => jetstream::stream::RetentionPolicy::WorkQueue,
        }
    }
}

/// Checks a subject template: dot-separated tokens, none empty, no whitespace, no wildcard,
/// only known placeholders.
pub fn check_subject_template(template: &str) -> Result<(), String> {
    if template.trim().is_empty() {
        return Err("expected a subject such as estafeta.{entity}.{action}".into());
    }
    for token in template.split('.') {
        if token.is_empty() {
            return Err(
                "a subject cannot have an empty token (two dots, or a dot at either end)".into(),
            );
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("a subject cannot hold spaces or control characters".into());
        }
        if token == "*" || token == ">" {
            return Err(
                "a published subject cannot hold the wildcards * or >; use {entity}, {action} or {agent}"
                    .into(),
            );
        }
        let mut rest = token;
        while let Some(open) = rest.find('{') {
            let after = &rest[open + 1..];
            let Some(close) = after.find('}') else {
                return Err("a '{' is not closed".into());
            };
            let name = &after[..close];
            if !PLACEHOLDERS.contains(&name) {
                return Err(format!(
                    "{{{name}}} is not a placeholder; use {{entity}}, {{action}} or {{agent}}"
                ));
            }
            rest = &after[close + 1..];
        }
        if rest.contains('}') {
            return Err("a '}' has no '{'".into());
        }
    }
    Ok(())
}

/// The subjects a stream needs for `template`: each token holding a placeholder becomes `*`.
pub fn default_stream_subject(template: &str) -> String {
    template
        .split('.')
        .map(|token| if token.contains('{') { "*" } else { token })
        .collect::<Vec<_>>()
        .join(".")
}

/// Checks a stream name: 1 to 255 characters, none of `. * > / \`, spaces or control
/// characters (JetStream's rule).
pub fn check_stream_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 255 {
        return Err("expected a stream name of 1 to 255 characters".into());
    }
    if name
        .chars()
        .any(|c| matches!(c, '.' | '*' | '>' | '/' | '\\') || c.is_whitespace() || c.is_control())
    {
        return Err(
            "a stream name cannot hold '.', '*', '>', '/', '\\', spaces or control characters"
                .into(),
        );
    }
    Ok(())
}

/// Checks a NATS URL: `nats://` or `tls://`, a host, at most a port.
pub fn check_nats_url(url: &str) -> Result<(), String> {
    let parsed = Url::parse(url)
        .map_err(|err| format!("expected a URL such as nats://127.0.0.1:4222 ({err})"))?;
    if !matches!(parsed.scheme(), "nats" | "tls") {
        return Err(format!(
            "expected a nats:// or tls:// URL, found scheme {:?}",
            parsed.scheme()
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("expected a host, as in nats://127.0.0.1:4222".into());
    }
    if !matches!(parsed.path(), "" | "/") || parsed.query().is_some() {
        return Err("expected only scheme, credentials, host and port, as in nats://host:4222 (no path or query)".into());
    }
    Ok(())
}
