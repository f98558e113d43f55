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
/// Largest `CENTRAL_NATS_PARTITIONS`.
pub const MAX_PARTITIONS: u32 = 1024;
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
    /// Several servers (a cluster) separated by commas: the client connects to one of them
    /// and moves to another when it fails.
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
    /// `CENTRAL_NATS_PARTITIONS`: 0 (the default) publishes on the template's subject; N > 0
    /// appends one more token, `.p<k>` with k = [`partition_of`] the record's order key, so
    /// that `estafeta relay` processes can share a stream by partition without breaking
    /// per-key order (every record of a key is in one partition). At most [`MAX_PARTITIONS`].
    pub partitions: u32,
}

// By hand, so `{:?}` never prints the token or a password in the URL.
impl fmt::Debug for NatsSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsSinkConfig")
            .field("url", &shown_nats_urls(&self.url))
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
            .field("partitions", &self.partitions)
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

/// The partition of a record's order key (entity and key; a keyless record's entity alone) among
/// `partitions` (> 0): FNV-1a (64 bits) of `entity`, a 0xFF byte (which UTF-8 never holds, so
/// `("ab", "c")` and `("a", "bc")` differ), and the key, modulo `partitions`. Written out here
/// rather than taken from std's `Hasher`, whose output may change between Rust releases: agents
/// and relays of different versions must agree on it forever.
pub fn partition_of(entity: &str, key: Option<&str>, partitions: u32) -> u32 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    let mut eat = |byte: u8| {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(PRIME);
    };
    entity.bytes().for_each(&mut eat);
    if let Some(key) = key {
        eat(0xff);
        key.bytes().for_each(&mut eat);
    }
    u32::try_from(hash % u64::from(partitions.max(1))).expect("below a u32")
}

/// Checks `CENTRAL_NATS_PARTITIONS`: 0 (off) to [`MAX_PARTITIONS`].
pub fn parse_partitions(text: &str) -> Result<u32, String> {
    match text.trim().parse::<u32>() {
        Ok(n) if n <= MAX_PARTITIONS => Ok(n),
        _ => Err(format!(
            "expected a whole number from 0 (no partition token) to {MAX_PARTITIONS}"
        )),
    }
}

/// The subjects a stream needs for `template` published over `partitions` (0: none): the
/// template's subjects, plus one `*` token for the partition.
pub fn stream_subject(template: &str, partitions: u32) -> String {
    let subject = default_stream_subject(template);
    if partitions > 0 {
        format!("{subject}.*")
    } else {
        subject
    }
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

/// The servers of a NATS URL setting: one URL, or several separated by commas (the servers of
/// a cluster: `nats://10.0.0.1:4222,nats://10.0.0.2:4222`), each trimmed.
pub fn split_nats_urls(text: &str) -> Vec<&str> {
    text.split(',').map(str::trim).collect()
}

/// A NATS URL setting as it may be shown: each server's URL redacted on its own (so one
/// server's password cannot swallow the next server's address), joined by commas.
pub fn shown_nats_urls(text: &str) -> String {
    split_nats_urls(text)
        .into_iter()
        .map(redact::url)
        .collect::<Vec<_>>()
        .join(",")
}

/// Checks a NATS URL setting: one or more comma-separated URLs, each `nats://` or `tls://`, a
/// host, at most a port. The client has one set of credentials for every server, so servers
/// that carry credentials in their URL must all carry the same.
pub fn check_nats_url(url: &str) -> Result<(), String> {
    let parts = split_nats_urls(url);
    let mut userinfo: Option<(String, Option<String>)> = None;
    for (i, part) in parts.iter().enumerate() {
        let named = |e: String| {
            if parts.len() > 1 {
                format!(
                    "server {} of {} ({}): {e}",
                    i + 1,
                    parts.len(),
                    redact::url(part)
                )
            } else {
                e
            }
        };
        if part.is_empty() {
            return Err(named(
                "expected a URL between the commas, as in nats://10.0.0.1:4222,nats://10.0.0.2:4222"
                    .into(),
            ));
        }
        let parsed = check_one_nats_url(part).map_err(named)?;
        if !parsed.username().is_empty() {
            let this = (
                parsed.username().to_owned(),
                parsed.password().map(str::to_owned),
            );
            match &userinfo {
                Some(first) if *first != this => {
                    return Err(named(
                        "carries other credentials than an earlier server: the client uses one set for every server of the list; write the same in each URL, or use token, nkey_file or creds_file".into(),
                    ));
                }
                _ => userinfo = Some(this),
            }
        }
    }
    Ok(())
}

/// Checks one NATS URL: `nats://` or `tls://`, a host, at most a port.
fn check_one_nats_url(url: &str) -> Result<Url, String> {
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
    Ok(parsed)
}
