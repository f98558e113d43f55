//! Configuration: `.env` (or `--env-file`), then the process environment, then the optional TOML
//! file named by `CONFIG_FILE` (environment overrides the file; `${VAR}` in the file's strings
//! reads the environment). Everything is parsed and validated here, before the store is opened
//! or a port is bound, and every mistake is reported at once as (key, value, what was expected),
//! secrets redacted. With nothing configured the agent still runs: staging in `./staging`, the
//! ingest API on loopback and an embedded SQLite file `./central.db` as the central database.
//!
//! Precedence, lowest first: built-in defaults, the TOML file's `[agent]` table, `.env`, the
//! process environment. An empty value (`KEY=`) counts as not set, so a copied `.env.example`
//! never hides a value from the file. The `api` and `database` sinks the environment defines
//! (`CENTRAL_API_*`, `CENTRAL_DATABASE_URL`) override the file's sinks of the same name field by
//! field, keeping the file's HTTP routes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::redact::url as redact_url;
use crate::sinks::apply::ApplyStatements;
use crate::sinks::database::{DatabaseSinkConfig, Dialect};
use crate::sinks::http::{HttpRoute, HttpSinkConfig};
use crate::sinks::nats::{NatsSinkConfig, Retention, StreamSettings};

/// Default ingest address: loopback only.
pub const DEFAULT_INGEST_ADDR: &str = "127.0.0.1:8787";
/// Default batcher schedule: every minute.
pub const DEFAULT_CRONTAB: &str = "* * * * *";
/// Default largest request body, in bytes: 10 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 10 * 1024 * 1024;
/// `INGEST_BODY_TIMEOUT_SECS` default: how long a client may take to send its request body.
pub const DEFAULT_INGEST_BODY_TIMEOUT_SECS: u64 = 30;
/// Shortest `INGEST_TOKEN` accepted, in characters, when `INGEST_ADDR` is not a loopback address
/// (the token is then all that stands between the network and the records).
pub const MIN_INGEST_TOKEN_CHARS: usize = 32;
/// Default records per flush cycle and sink.
pub const DEFAULT_MAX_RECORDS: usize = 100_000;
/// Default records per batch handed to a sink.
pub const DEFAULT_BATCH_SIZE: usize = 500;
/// Default `STAGING_AREA_PATH`, relative to the working directory.
pub const DEFAULT_STAGING_AREA_PATH: &str = "staging";
/// The central database used when no sink is configured anywhere.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://central.db";
/// Default `LOG_RETENTION_DAYS`: a month of daily log files.
pub const DEFAULT_LOG_RETENTION_DAYS: u64 = 30;
/// Default `LOG_LEVEL`.
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// Default first retry delay, in seconds.
pub const DEFAULT_RETRY_BASE_SECS: u64 = 1;
/// Default longest retry delay, in seconds.
pub const DEFAULT_RETRY_MAX_SECS: u64 = 300;
/// Default time a stop waits for the flush in flight, in seconds.
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 10;
/// Default HTTP request timeout, in seconds.
pub const DEFAULT_API_TIMEOUT_SECS: u64 = 10;
/// Default records of different keys an HTTP sink sends at once.
pub const DEFAULT_API_CONCURRENCY: usize = 8;
/// Largest accepted HTTP sink concurrency.
pub const MAX_CONCURRENCY: usize = 1024;
/// `AGENT_ID` when the host name cannot be found.
pub const DEFAULT_AGENT_ID: &str = "estafeta";
/// Longest accepted `AGENT_ID`, in bytes.
pub const MAX_AGENT_ID_LEN: usize = 128;
/// Name of the sink `CENTRAL_DATABASE_URL` defines (and of the embedded default).
pub const DATABASE_SINK: &str = "database";
/// Name of the sink `CENTRAL_API_URL` defines.
pub const API_SINK: &str = "api";
/// Name of the sink `CENTRAL_NATS_URL` defines.
pub const NATS_SINK: &str = "nats";
/// Payload field holding the record key when the entity names none.
pub const DEFAULT_KEY_FIELD: &str = "id";

/// Every flat key, in the order `.env.example` and `check-config` list them.
pub const KEYS: &[&str] = &[
    "CRONTAB",
    "TZ",
    "STAGING_AREA_PATH",
    "IS_ABSOLUTE_STAGING_AREA_PATH",
    "FAILED_DIR",
    "INBOX_PATH",
    "STAGING_MAX_BYTES",
    "STAGING_MIN_FREE_BYTES",
    "MIN_FREE_DISK_MB",
    "KEEP_DELIVERED_DAYS",
    "INGEST_ADDR",
    "INGEST_TOKEN",
    "INGEST_TOKEN_FILE",
    "INGEST_ALLOWED_HOSTS",
    "MAX_BODY_BYTES",
    "INGEST_BODY_TIMEOUT_SECS",
    "FLUSH_ON_WRITE",
    "MAX_RECORDS",
    "BATCH_SIZE",
    "DRY_RUN",
    "RETRY_BASE_SECS",
    "RETRY_MAX_SECS",
    "SHUTDOWN_GRACE_SECS",
    "AGENT_ID",
    "HEARTBEAT_SECS",
    "LOG_DIR",
    "LOG_RETENTION_DAYS",
    "LOG_LEVEL",
    "CENTRAL_DATABASE_URL",
    "CENTRAL_API_URL",
    "CENTRAL_API_TOKEN",
    "CENTRAL_API_TIMEOUT_SECS",
    "CENTRAL_API_VERIFY_TLS",
    "CENTRAL_API_CA_FILE",
    "CENTRAL_API_CONCURRENCY",
    "CENTRAL_API_HEARTBEAT_PATH",
    "CENTRAL_NATS_URL",
    "CENTRAL_NATS_TOKEN",
    "CENTRAL_NATS_SUBJECT",
    "CENTRAL_NATS_TIMEOUT_SECS",
    "CENTRAL_NATS_CREATE_STREAM",
    "CENTRAL_NATS_STREAM",
    "UPDATE_URL",
    "UPDATE_CRONTAB",
    "UPDATE_PUBLIC_KEY",
    "UPDATE_HEALTH_SECS",
    "UPDATE_ALLOW_HTTP",
    "UPDATE_CA_FILE",
    "CONFIG_FILE",
];

/// The `CENTRAL_API_*` keys other than the URL.
const API_KEYS: &[&str] = &[
    "CENTRAL_API_TOKEN",
    "CENTRAL_API_TIMEOUT_SECS",
    "CENTRAL_API_VERIFY_TLS",
    "CENTRAL_API_CA_FILE",
    "CENTRAL_API_CONCURRENCY",
    "CENTRAL_API_HEARTBEAT_PATH",
];

/// The `CENTRAL_NATS_*` keys other than the URL.
const NATS_KEYS: &[&str] = &[
    "CENTRAL_NATS_TOKEN",
    "CENTRAL_NATS_SUBJECT",
    "CENTRAL_NATS_TIMEOUT_SECS",
    "CENTRAL_NATS_CREATE_STREAM",
    "CENTRAL_NATS_STREAM",
];

/// The effective configuration of one agent.
#[derive(Clone)]
pub struct Config {
    /// Where the values came from (`.env` path, TOML path), for logs and `check-config`.
    pub sources: Vec<String>,
    /// `CRONTAB`: the batcher's schedule, 5 fields or 6 with seconds.
    pub crontab: String,
    /// `TZ`: the time zone `CRONTAB` is read in; `None`: the machine's local time.
    pub tz: Option<crate::timezone::Zone>,
    /// `STAGING_AREA_PATH` resolved with `IS_ABSOLUTE_STAGING_AREA_PATH`.
    pub staging_path: PathBuf,
    /// `FAILED_DIR`: dead letters; `None`: `<staging>/_failed`.
    pub failed_dir: Option<PathBuf>,
    /// `INBOX_PATH`: a drop folder in the staging layout whose files are adopted; `None`: none.
    pub inbox_path: Option<PathBuf>,
    /// `STAGING_MAX_BYTES`: largest total staging size; `None`: no limit.
    pub staging_max_bytes: Option<u64>,
    /// `MIN_FREE_DISK_MB` or `STAGING_MIN_FREE_BYTES`: refuse writes below this free disk space.
    pub staging_min_free_bytes: u64,
    /// `KEEP_DELIVERED_DAYS`: keep delivered records this long (default 0).
    pub keep_delivered: Duration,
    /// `INGEST_ADDR`.
    pub ingest_addr: SocketAddr,
    /// `INGEST_TOKEN`, or the content of the file `INGEST_TOKEN_FILE` names: the bearer token
    /// the ingest API requires, when set. At least [`MIN_INGEST_TOKEN_CHARS`] characters when
    /// `INGEST_ADDR` is not loopback.
    pub ingest_token: Option<String>,
    /// `INGEST_ALLOWED_HOSTS`: host names (or addresses) the ingest API answers to besides
    /// `localhost`, `127.0.0.0/8`, `[::1]` and the `INGEST_ADDR` address; lowercase, without
    /// port or brackets. Default: none.
    pub ingest_allowed_hosts: Vec<String>,
    /// `MAX_BODY_BYTES`.
    pub max_body_bytes: usize,
    /// `INGEST_BODY_TIMEOUT_SECS`: a request body not received in full by then gets 408.
    pub ingest_body_timeout: Duration,
    /// `FLUSH_ON_WRITE`: deliver right after staging, without waiting for the tick.
    pub flush_on_write: bool,
    /// `MAX_RECORDS`: records per flush cycle and sink.
    pub max_records: usize,
    /// `BATCH_SIZE`: records per batch handed to a sink.
    pub batch_size: usize,
    /// `DRY_RUN`: build and log every request, deliver nothing, keep everything pending.
    pub dry_run: bool,
    /// `RETRY_BASE_SECS` / `RETRY_MAX_SECS`: exponential backoff bounds.
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// `SHUTDOWN_GRACE_SECS`: how long a stop waits for the flush in flight.
    pub shutdown_grace: Duration,
    /// `AGENT_ID`: this agent's name in the central tables (default: the host name).
    pub agent_id: String,
    /// `HEARTBEAT_SECS`: how often the agent reports its state to the sinks that take
    /// heartbeats (default 60 s; zero: never).
    pub heartbeat: Duration,
    /// `LOG_DIR`: daily log files; `None`: stderr only.
    pub log_dir: Option<PathBuf>,
    /// `LOG_RETENTION_DAYS`: how many daily log files `LOG_DIR` keeps (default 30; 0: all).
    pub log_retention_days: u64,
    /// `LOG_LEVEL`: a tracing filter such as `info` or `estafeta=debug`.
    pub log_level: String,
    /// Sinks, from `CENTRAL_DATABASE_URL`, `CENTRAL_API_*` and `[[sinks]]` in the TOML file.
    pub sinks: Vec<SinkConfig>,
    /// Routing rules, first match wins; no match: every sink.
    pub routes: Vec<Route>,
    /// Per-entity settings (`[entities.NAME]`).
    pub entities: BTreeMap<String, EntityConfig>,
    /// SQL sources (`[[sources]]`): queries polled on a schedule.
    pub sql_sources: Vec<crate::sources::SourceConfig>,
    /// Self-update: `UPDATE_URL`, `UPDATE_CRONTAB`, `UPDATE_PUBLIC_KEY`, `UPDATE_HEALTH_SECS`,
    /// `UPDATE_ALLOW_HTTP`, `UPDATE_CA_FILE`.
    pub update: crate::update::UpdateConfig,
}

/// One sink.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Unique name: `database` and `api` for the ones from `.env`.
    pub name: String,
    pub kind: SinkKind,
}

#[derive(Debug, Clone)]
pub enum SinkKind {
    Http(crate::sinks::http::HttpSinkConfig),
    /// `postgres://`, `mysql://` or `sqlite://` URL.
    Database(crate::sinks::database::DatabaseSinkConfig),
    /// NATS JetStream: `nats://` or `tls://` URL.
    Nats(crate::sinks::nats::NatsSinkConfig),
}

/// Which sinks get the records of an (action, entity); `None` matches any.
#[derive(Debug, Clone)]
pub struct Route {
    pub action: Option<String>,
    pub entity: Option<String>,
    pub sinks: Vec<String>,
}

/// Settings of one entity.
#[derive(Debug, Clone, Default)]
pub struct EntityConfig {
    /// Payload field holding the record key (default `id`).
    pub key_field: Option<String>,
    /// JSON Schema every payload of this entity must satisfy (HTTP 422 otherwise).
    pub schema: Option<serde_json::Value>,
}

// By hand, so `{:?}` of a config never prints the ingest token (sinks redact themselves).
impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("sources", &self.sources)
            .field("crontab", &self.crontab)
            .field("tz", &self.tz)
            .field("staging_path", &self.staging_path)
            .field("failed_dir", &self.failed_dir)
            .field("inbox_path", &self.inbox_path)
            .field("staging_max_bytes", &self.staging_max_bytes)
            .field("staging_min_free_bytes", &self.staging_min_free_bytes)
            .field("keep_delivered", &self.keep_delivered)
            .field("ingest_addr", &self.ingest_addr)
            .field("ingest_token", &self.ingest_token.as_ref().map(|_| "***"))
            .field("ingest_allowed_hosts", &self.ingest_allowed_hosts)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("ingest_body_timeout", &self.ingest_body_timeout)
            .field("flush_on_write", &self.flush_on_write)
            .field("max_records", &self.max_records)
            .field("batch_size", &self.batch_size)
            .field("dry_run", &self.dry_run)
            .field("retry_base", &self.retry_base)
            .field("retry_max", &self.retry_max)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("agent_id", &self.agent_id)
            .field("heartbeat", &self.heartbeat)
            .field("log_dir", &self.log_dir)
            .field("log_retention_days", &self.log_retention_days)
            .field("log_level", &self.log_level)
            .field("sinks", &self.sinks)
            .field("routes", &self.routes)
            .field("entities", &self.entities.keys().collect::<Vec<_>>())
            .field(
                "sql_sources",
                &self.sql_sources.iter().map(|s| &s.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// One configuration mistake: the key (as the user wrote it), the value (redacted when
/// secret) and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `CRONTAB`, `[agent] crontab`, `sinks[1].url`, `--env-file`, …
    pub key: String,
    /// The value as shown to people: secrets are `***`, URL passwords hidden.
    pub value: Option<String>,
    /// What was expected, or what to do.
    pub expected: String,
    /// `expected` continues a sentence (`KEY=value listens beyond …`) instead of following a
    /// colon.
    sentence: bool,
}

impl Problem {
    /// `KEY=value: expected`.
    pub fn new(key: impl Into<String>, value: Option<String>, expected: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            value,
            expected: expected.into(),
            sentence: false,
        }
    }

    /// `KEY=value sentence`.
    fn sentence(key: impl Into<String>, value: String, rest: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            value: Some(value),
            expected: rest.into(),
            sentence: true,
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.value, self.sentence) {
            (Some(value), true) => write!(f, "{}={} {}", self.key, quote(value), self.expected),
            (Some(value), false) => write!(f, "{}={}: {}", self.key, quote(value), self.expected),
            (None, _) => write!(f, "{}: {}", self.key, self.expected),
        }
    }
}

/// Quotes a value when it would be hard to read bare (spaces, quotes, empty).
fn quote(value: &str) -> String {
    let plain = !value.is_empty()
        && value
            .chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && c != '"' && c != '\'');
    if plain {
        value.to_owned()
    } else {
        format!("{value:?}")
    }
}

/// Every mistake found in the configuration, one per line.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", lines(.problems))]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

fn lines(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// One flat key as loaded, for `check-config`: value shown redacted, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub key: String,
    pub value: String,
    /// `default`, `.env`, `environment` or `CONFIG_FILE`.
    pub origin: String,
}

/// What loading found: every flat key with its origin, and the configuration or its mistakes.
#[derive(Debug)]
pub struct Inspection {
    pub settings: Vec<Setting>,
    pub result: Result<Config, ConfigError>,
}

impl Config {
    /// Loads `.env` (the working directory's, or `env_file`), the process environment and the
    /// TOML file named by `CONFIG_FILE`. The process environment is read, never changed.
    pub fn load(env_file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_from(env_file, &process_env())
    }

    /// [`Config::load`] with `process_env` standing in for the process environment.
    pub fn load_from(
        env_file: Option<&Path>,
        process_env: &BTreeMap<String, String>,
    ) -> Result<Config, ConfigError> {
        Self::inspect(&working_dir(), env_file, process_env).result
    }

    /// Loads with `cwd` as the working directory (the default `.env` and relative paths are
    /// found there) and reports where every flat key came from.
    pub fn inspect(
        cwd: &Path,
        env_file: Option<&Path>,
        process_env: &BTreeMap<String, String>,
    ) -> Inspection {
        Loader::new(cwd).run(env_file, process_env)
    }

    /// Sink names, in configuration order.
    pub fn sink_names(&self) -> Vec<String> {
        self.sinks.iter().map(|s| s.name.clone()).collect()
    }

    /// The sinks the records of (action, entity) go to: the first matching route's, else all.
    pub fn route(&self, action: &str, entity: &str) -> Vec<String> {
        self.routes
            .iter()
            .find(|r| {
                r.action.as_deref().is_none_or(|a| a == action)
                    && r.entity.as_deref().is_none_or(|e| e == entity)
            })
            .map(|r| r.sinks.clone())
            .unwrap_or_else(|| self.sink_names())
    }

    /// The payload field holding the record key of `entity` (default `id`).
    pub fn key_field(&self, entity: &str) -> &str {
        self.entities
            .get(entity)
            .and_then(|e| e.key_field.as_deref())
            .unwrap_or(DEFAULT_KEY_FIELD)
    }

    /// The dead-letter folder: `FAILED_DIR` or `<staging>/_failed`.
    pub fn failed_dir(&self) -> PathBuf {
        self.failed_dir
            .clone()
            .unwrap_or_else(|| self.staging_path.join("_failed"))
    }

    /// How to open the staging store.
    pub fn staging_options(&self) -> estafeta_staging::Options {
        let mut options =
            estafeta_staging::Options::new(&self.staging_path).with_sinks(self.sink_names());
        options.failed_dir = self.failed_dir.clone();
        options.max_bytes = self.staging_max_bytes;
        options.min_free_bytes = self.staging_min_free_bytes;
        options.keep_delivered = self.keep_delivered;
        options
    }

    /// The effective configuration as (key, shown value): secrets are `***`, passwords inside
    /// URLs are `***`.
    pub fn redacted(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        let mut push = |key: &str, value: String| out.push((key.to_owned(), value));
        push("CRONTAB", self.crontab.clone());
        push(
            "TZ",
            self.tz
                .as_ref()
                .map(|tz| tz.name().to_owned())
                .unwrap_or_else(|| "(local time)".into()),
        );
        push("STAGING_AREA_PATH", self.staging_path.display().to_string());
        push("FAILED_DIR", self.failed_dir().display().to_string());
        push(
            "INBOX_PATH",
            self.inbox_path
                .as_ref()
                .map_or_else(|| "(none)".to_owned(), |p| p.display().to_string()),
        );
        push(
            "STAGING_MAX_BYTES",
            self.staging_max_bytes
                .map(|b| b.to_string())
                .unwrap_or_else(|| "(no limit)".into()),
        );
        push(
            "MIN_FREE_DISK_MB",
            format!(
                "{} ({} bytes; STAGING_MIN_FREE_BYTES is the same setting)",
                self.staging_min_free_bytes >> 20,
                self.staging_min_free_bytes
            ),
        );
        push(
            "KEEP_DELIVERED_DAYS",
            (self.keep_delivered.as_secs() / 86_400).to_string(),
        );
        push("INGEST_ADDR", self.ingest_addr.to_string());
        push("INGEST_TOKEN", shown_secret(self.ingest_token.as_deref()));
        push(
            "INGEST_ALLOWED_HOSTS",
            if self.ingest_allowed_hosts.is_empty() {
                "(none: localhost, 127.0.0.1, [::1] and INGEST_ADDR only)".into()
            } else {
                self.ingest_allowed_hosts.join(",")
            },
        );
        push("MAX_BODY_BYTES", self.max_body_bytes.to_string());
        push("INGEST_BODY_TIMEOUT_SECS", secs(self.ingest_body_timeout));
        push("FLUSH_ON_WRITE", self.flush_on_write.to_string());
        push("MAX_RECORDS", self.max_records.to_string());
        push("BATCH_SIZE", self.batch_size.to_string());
        push("DRY_RUN", self.dry_run.to_string());
        push("RETRY_BASE_SECS", secs(self.retry_base));
        push("RETRY_MAX_SECS", secs(self.retry_max));
        push("SHUTDOWN_GRACE_SECS", secs(self.shutdown_grace));
        push("AGENT_ID", self.agent_id.clone());
        push("HEARTBEAT_SECS", secs(self.heartbeat));
        push(
            "LOG_DIR",
            self.log_dir
                .as_ref()
                .map(|d| d.display().to_string())
                .unwrap_or_else(|| "(stderr only)".into()),
        );
        push("LOG_RETENTION_DAYS", self.log_retention_days.to_string());
        push("LOG_LEVEL", self.log_level.clone());
        push(
            "UPDATE_URL",
            self.update
                .url
                .as_deref()
                .map_or_else(|| "(updates off)".to_owned(), redact_url),
        );
        push(
            "UPDATE_CRONTAB",
            self.update
                .crontab
                .clone()
                .unwrap_or_else(|| "(no automatic checks)".into()),
        );
        push(
            "UPDATE_PUBLIC_KEY",
            format!(
                "{} key(s) configured, {} built in",
                self.update.keys.len(),
                crate::update::keys::all(&[]).len()
            ),
        );
        push("UPDATE_HEALTH_SECS", secs(self.update.health));
        push("UPDATE_ALLOW_HTTP", self.update.allow_http.to_string());
        push(
            "UPDATE_CA_FILE",
            self.update
                .ca_file
                .as_ref()
                .map_or_else(|| "(not set)".to_owned(), |p| p.display().to_string()),
        );
        for sink in &self.sinks {
            let key = |field: &str| format!("sinks.{}.{field}", sink.name);
            match &sink.kind {
                SinkKind::Database(db) => {
                    push(&key("type"), "database".into());
                    push(&key("url"), redact_url(&db.url));
                    if let Some(apply) = &db.apply {
                        let files: Vec<String> = apply
                            .statements()
                            .map(|s| format!("{}.{}", s.entity, s.action))
                            .collect();
                        push(
                            &key("apply_dir"),
                            format!("{} ({})", apply.dir.display(), files.join(", ")),
                        );
                    }
                }
                SinkKind::Http(http) => {
                    push(&key("type"), "http".into());
                    push(&key("url"), redact_url(&http.url));
                    push(&key("token"), shown_secret(http.token.as_deref()));
                    push(&key("timeout_secs"), secs(http.timeout));
                    push(&key("verify_tls"), http.verify_tls.to_string());
                    push(
                        &key("ca_file"),
                        http.ca_file
                            .as_ref()
                            .map(|p| p.display().to_string())
                            .unwrap_or_else(|| "(not set)".into()),
                    );
                    push(&key("concurrency"), http.concurrency.to_string());
                    for (i, route) in http.routes.iter().enumerate() {
                        push(&key(&format!("routes[{i}]")), describe_http_route(route));
                    }
                }
                SinkKind::Nats(nats) => {
                    push(&key("type"), "nats".into());
                    push(&key("url"), redact_url(&nats.url));
                    push(&key("token"), shown_secret(nats.token.as_deref()));
                    push(&key("subject"), nats.subject.clone());
                    push(&key("timeout_secs"), secs(nats.timeout));
                    push(&key("create_stream"), nats.stream.is_some().to_string());
                    if let Some(stream) = &nats.stream {
                        push(&key("stream"), stream.name.clone());
                        push(&key("stream_subjects"), stream.subjects.join(", "));
                        push(&key("retention"), stream.retention.as_str().into());
                        push(&key("replicas"), stream.replicas.to_string());
                        push(
                            &key("duplicate_window_secs"),
                            stream
                                .duplicate_window
                                .map(secs)
                                .unwrap_or_else(|| "(server default, 120)".into()),
                        );
                    }
                }
            }
        }
        for (i, route) in self.routes.iter().enumerate() {
            push(
                &format!("routes[{i}]"),
                format!(
                    "action={} entity={} -> {}",
                    route.action.as_deref().unwrap_or("*"),
                    route.entity.as_deref().unwrap_or("*"),
                    route.sinks.join(", ")
                ),
            );
        }
        for (name, entity) in &self.entities {
            push(
                &format!("entities.{name}.key_field"),
                entity
                    .key_field
                    .clone()
                    .unwrap_or_else(|| DEFAULT_KEY_FIELD.into()),
            );
            if entity.schema.is_some() {
                push(&format!("entities.{name}.schema"), "(JSON Schema)".into());
            }
        }
        out
    }
}

fn describe_http_route(route: &HttpRoute) -> String {
    let mut text = format!(
        "entity={} action={}",
        route.entity.as_deref().unwrap_or("*"),
        route.action.as_deref().unwrap_or("*")
    );
    if let Some(method) = &route.method {
        text.push_str(&format!(" method={method}"));
    }
    if let Some(path) = &route.path {
        text.push_str(&format!(" path={path}"));
    }
    for name in route.headers.keys() {
        // Header values may be API keys: names only.
        text.push_str(&format!(" header {name}=***"));
    }
    text
}

fn shown_secret(secret: Option<&str>) -> String {
    match secret {
        Some(_) => "***".into(),
        None => "(not set)".into(),
    }
}

fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{}", d.as_secs())
    } else {
        format!("{s}")
    }
}

/// The process environment as text (variables that are not UTF-8 are read lossily).
pub fn process_env() -> BTreeMap<String, String> {
    std::env::vars_os()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .collect()
}

fn working_dir() -> PathBuf {
    std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."))
}

/// Whether a flat key holds a secret, shown as `***`.
fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_uppercase();
    key.ends_with("TOKEN") || key.contains("PASSWORD") || key.contains("SECRET")
}

/// A value as it may be shown: secrets hidden, URL passwords hidden.
fn shown(key: &str, value: &str) -> String {
    if is_secret(key) {
        "***".into()
    } else if key.to_ascii_uppercase().ends_with("URL") {
        redact_url(value)
    } else {
        value.to_owned()
    }
}

/// Where a flat value came from.
#[derive(Debug, Clone)]
enum Origin {
    Default,
    EnvFile,
    Environment,
    ConfigFile,
}

impl Origin {
    fn as_str(&self) -> &'static str {
        match self {
            Origin::Default => "default",
            Origin::EnvFile => ".env",
            Origin::Environment => "environment",
            Origin::ConfigFile => "CONFIG_FILE",
        }
    }

    /// The key as the user wrote it.
    fn label(&self, key: &str) -> String {
        match self {
            Origin::ConfigFile => format!("[agent] {}", key.to_ascii_lowercase()),
            _ => key.to_owned(),
        }
    }
}

#[derive(Debug, Clone)]
struct Raw {
    value: String,
    origin: Origin,
}

/// The TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    /// Flat keys in lowercase (checked by hand, to name the unknown ones).
    #[serde(default)]
    agent: BTreeMap<String, toml::Value>,
    #[serde(default)]
    sinks: Vec<FileSink>,
    #[serde(default)]
    routes: Vec<FileRoute>,
    #[serde(default)]
    entities: BTreeMap<String, FileEntity>,
    #[serde(default)]
    sources: Vec<crate::sources::FileSource>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum FileSinkType {
    Http,
    Database,
    Nats,
}

impl FileSinkType {
    fn as_str(self) -> &'static str {
        match self {
            FileSinkType::Http => "http",
            FileSinkType::Database => "database",
            FileSinkType::Nats => "nats",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSink {
    name: String,
    #[serde(rename = "type")]
    kind: FileSinkType,
    url: String,
    token: Option<String>,
    timeout_secs: Option<f64>,
    verify_tls: Option<bool>,
    ca_file: Option<PathBuf>,
    concurrency: Option<usize>,
    #[serde(default)]
    routes: Vec<FileHttpRoute>,
    /// http: where heartbeats go, `PUT {url}/{heartbeat_path}` (`{agent_id}` allowed).
    heartbeat_path: Option<String>,
    /// nats: subject template (default `estafeta.{entity}.{action}`).
    subject: Option<String>,
    /// nats: create the stream when it does not exist (default false).
    create_stream: Option<bool>,
    /// nats: the stream's name (default `ESTAFETA`), with `create_stream`.
    stream: Option<String>,
    /// nats: the stream's subjects (default: the template with `*` for placeholders).
    stream_subjects: Option<Vec<String>>,
    /// nats: `limits` (default), `interest` or `workqueue`.
    retention: Option<String>,
    /// nats: stream replicas, 1 to 5 (default 1).
    replicas: Option<usize>,
    /// nats: the stream's duplicate window in seconds (default: the server's, 120).
    duplicate_window_secs: Option<f64>,
    /// Database sinks: folder of `<entity>.<action>.sql` apply statements (apply mode),
    /// relative to the TOML file.
    apply_dir: Option<PathBuf>,
    connections: Option<usize>,
}

impl FileSink {
    /// The optional fields that are set, with the sink types they apply to.
    fn typed_fields(&self) -> Vec<(&'static str, bool, &'static [FileSinkType])> {
        use FileSinkType::{Database, Http, Nats};
        vec![
            ("token", self.token.is_some(), &[Http, Nats]),
            ("timeout_secs", self.timeout_secs.is_some(), &[Http, Nats]),
            ("verify_tls", self.verify_tls.is_some(), &[Http]),
            ("ca_file", self.ca_file.is_some(), &[Http]),
            ("concurrency", self.concurrency.is_some(), &[Http]),
            ("routes", !self.routes.is_empty(), &[Http]),
            ("heartbeat_path", self.heartbeat_path.is_some(), &[Http]),
            ("subject", self.subject.is_some(), &[Nats]),
            ("create_stream", self.create_stream.is_some(), &[Nats]),
            ("stream", self.stream.is_some(), &[Nats]),
            ("stream_subjects", self.stream_subjects.is_some(), &[Nats]),
            ("retention", self.retention.is_some(), &[Nats]),
            ("replicas", self.replicas.is_some(), &[Nats]),
            (
                "duplicate_window_secs",
                self.duplicate_window_secs.is_some(),
                &[Nats],
            ),
            ("apply_dir", self.apply_dir.is_some(), &[Database]),
            ("connections", self.connections.is_some(), &[Database]),
        ]
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHttpRoute {
    entity: Option<String>,
    action: Option<String>,
    method: Option<String>,
    path: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRoute {
    action: Option<String>,
    entity: Option<String>,
    sinks: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntity {
    key_field: Option<String>,
    schema: Option<PathBuf>,
}

/// HTTP methods a route may use.
const METHODS: &[&str] = &["POST", "PUT", "PATCH", "DELETE", "GET"];

struct Loader {
    cwd: PathBuf,
    problems: Vec<Problem>,
    sources: Vec<String>,
    /// Flat keys, highest precedence already applied.
    raw: BTreeMap<&'static str, Raw>,
    /// `.env` plus the process environment, for `${VAR}` (empty values kept).
    vars: BTreeMap<String, String>,
}

impl Loader {
    fn new(cwd: &Path) -> Self {
        Self {
            cwd: cwd.to_path_buf(),
            problems: Vec::new(),
            sources: Vec::new(),
            raw: BTreeMap::new(),
            vars: BTreeMap::new(),
        }
    }

    fn problem(
        &mut self,
        key: impl Into<String>,
        value: Option<String>,
        expected: impl Into<String>,
    ) {
        self.problems.push(Problem::new(key, value, expected));
    }

    fn run(
        mut self,
        env_file: Option<&Path>,
        process_env: &BTreeMap<String, String>,
    ) -> Inspection {
        let dotenv = self.read_env_file(env_file);
        for (key, value) in &dotenv {
            self.vars.insert(key.clone(), value.clone());
        }
        for (key, value) in process_env {
            self.vars.insert(key.clone(), value.clone());
        }
        for key in KEYS {
            if let Some(value) = process_env.get(*key).filter(|v| !v.trim().is_empty()) {
                self.set(key, value, Origin::Environment);
            } else if let Some(value) = dotenv.get(*key).filter(|v| !v.trim().is_empty()) {
                self.set(key, value, Origin::EnvFile);
            }
        }
        if self.raw.keys().any(|k| process_env.contains_key(*k)) {
            self.sources.push("environment".into());
        }
        let (file, file_dir) = self.read_config_file();
        for (key, value) in &file.agent {
            self.agent_key(key, value);
        }
        let settings = self.settings(process_env);
        let config = self.build(file, &file_dir, process_env);
        let result = if self.problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError {
                problems: self.problems,
            })
        };
        Inspection { settings, result }
    }

    fn set(&mut self, key: &'static str, value: &str, origin: Origin) {
        self.raw.insert(
            key,
            Raw {
                value: value.trim().to_owned(),
                origin,
            },
        );
    }

    /// Reads `.env` without touching the process environment.
    fn read_env_file(&mut self, env_file: Option<&Path>) -> BTreeMap<String, String> {
        let (path, explicit) = match env_file {
            Some(path) => (self.cwd.join(path), true),
            None => (self.cwd.join(".env"), false),
        };
        let mut values = BTreeMap::new();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound && !explicit => return values,
            Err(err) => {
                self.problem(
                    "--env-file",
                    Some(path.display().to_string()),
                    format!("expected a readable .env file: {err}"),
                );
                return values;
            }
        };
        self.sources.push(format!(".env {}", path.display()));
        let text = quote_unquoted_spaces(&text);
        for item in dotenvy::from_read_iter(std::io::Cursor::new(text.into_bytes())) {
            match item {
                Ok((key, value)) => {
                    values.insert(key, value);
                }
                // The line may hold a secret: say only that it is wrong.
                Err(dotenvy::Error::LineParse(_, index)) => self.problem(
                    format!(".env {}", path.display()),
                    None,
                    format!(
                        "a line could not be read (near character {index}); expected KEY=value, with quotes closed on the line where they open"
                    ),
                ),
                Err(err) => {
                    self.problem(
                        format!(".env {}", path.display()),
                        None,
                        format!("could not be read: {}", io_reason(&err)),
                    );
                    break;
                }
            }
        }
        values
    }

    /// Reads and parses `CONFIG_FILE`, with `${VAR}` substituted. Returns the file and its folder.
    fn read_config_file(&mut self) -> (FileConfig, PathBuf) {
        let Some(raw) = self.raw.get("CONFIG_FILE").cloned() else {
            return (FileConfig::default(), self.cwd.clone());
        };
        let label = raw.origin.label("CONFIG_FILE");
        let path = self.cwd.join(&raw.value);
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.cwd.clone());
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) => {
                self.problem(
                    label,
                    Some(raw.value.clone()),
                    format!("expected a readable TOML file: {err}"),
                );
                return (FileConfig::default(), dir);
            }
        };
        self.sources.push(format!("CONFIG_FILE {}", path.display()));
        // First pass on the text itself, so unknown keys and wrong types come with a line.
        if let Err(err) = toml::from_str::<FileConfig>(&text) {
            let line = err
                .span()
                .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
            let at = line.map(|l| format!("line {l}: ")).unwrap_or_default();
            self.problem(
                label,
                Some(raw.value.clone()),
                format!("{at}{}", err.message().trim()),
            );
            return (FileConfig::default(), dir);
        }
        let mut table: toml::Table = match toml::from_str(&text) {
            Ok(table) => table,
            Err(err) => {
                self.problem(label, Some(raw.value.clone()), err.message().to_owned());
                return (FileConfig::default(), dir);
            }
        };
        let before = self.problems.len();
        for (key, value) in table.iter_mut() {
            self.substitute(key, value);
        }
        if self.problems.len() > before {
            return (FileConfig::default(), dir);
        }
        match toml::Value::Table(table).try_into::<FileConfig>() {
            Ok(file) => (file, dir),
            Err(err) => {
                self.problem(label, Some(raw.value.clone()), err.message().to_owned());
                (FileConfig::default(), dir)
            }
        }
    }

    /// Replaces `${VAR}` in every string under `value` with the environment's VAR.
    fn substitute(&mut self, path: &str, value: &mut toml::Value) {
        match value {
            toml::Value::String(text) if text.contains("${") => match expand(text, &self.vars) {
                Ok(expanded) => *text = expanded,
                Err(expected) => self.problem(path, Some(text.clone()), expected),
            },
            toml::Value::Array(items) => {
                for (i, item) in items.iter_mut().enumerate() {
                    self.substitute(&format!("{path}[{i}]"), item);
                }
            }
            toml::Value::Table(table) => {
                for (key, item) in table.iter_mut() {
                    self.substitute(&format!("{path}.{key}"), item);
                }
            }
            _ => {}
        }
    }

    /// A flat key from the file's `[agent]` table; the environment wins over it.
    fn agent_key(&mut self, key: &str, value: &toml::Value) {
        let upper = key.to_ascii_uppercase();
        let known = KEYS
            .iter()
            .find(|k| **k == upper && **k != "CONFIG_FILE" && key == key.to_ascii_lowercase());
        let Some(known) = known else {
            self.problem(
                format!("[agent] {key}"),
                None,
                format!(
                    "unknown key; expected one of: {}",
                    KEYS.iter()
                        .filter(|k| **k != "CONFIG_FILE")
                        .map(|k| k.to_ascii_lowercase())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            return;
        };
        let text = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            _ => {
                self.problem(
                    format!("[agent] {key}"),
                    None,
                    "expected a string, a number or true/false",
                );
                return;
            }
        };
        if !self.raw.contains_key(known) && !text.trim().is_empty() {
            self.set(known, &text, Origin::ConfigFile);
        }
    }

    fn settings(&self, process_env: &BTreeMap<String, String>) -> Vec<Setting> {
        KEYS.iter()
            .map(|key| match self.raw.get(key) {
                Some(raw) => Setting {
                    key: (*key).to_owned(),
                    value: shown(key, &raw.value),
                    origin: raw.origin.as_str().to_owned(),
                },
                None => Setting {
                    key: (*key).to_owned(),
                    value: match *key {
                        "AGENT_ID" => default_agent_id(process_env),
                        "INGEST_TOKEN" if self.raw.contains_key("INGEST_TOKEN_FILE") => {
                            "(read from INGEST_TOKEN_FILE)".into()
                        }
                        _ => default_shown(key),
                    },
                    origin: Origin::Default.as_str().to_owned(),
                },
            })
            .collect()
    }

    /// Parses `key` with `parse`, or gives `default` when it is not set. A bad value is
    /// recorded as a problem and `default` stands in so the rest can still be checked.
    fn parse<T>(
        &mut self,
        key: &'static str,
        default: T,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> T {
        self.parse_opt(key, parse).unwrap_or(default)
    }

    fn parse_opt<T>(
        &mut self,
        key: &'static str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Option<T> {
        let raw = self.raw.get(key)?.clone();
        match parse(&raw.value) {
            Ok(value) => Some(value),
            Err(expected) => {
                self.problem(
                    raw.origin.label(key),
                    Some(shown(key, &raw.value)),
                    expected,
                );
                None
            }
        }
    }

    fn text(&self, key: &str) -> Option<String> {
        self.raw.get(key).map(|r| r.value.clone())
    }

    fn label(&self, key: &str) -> String {
        self.raw
            .get(key)
            .map(|r| r.origin.label(key))
            .unwrap_or_else(|| key.to_owned())
    }

    fn build(
        &mut self,
        file: FileConfig,
        file_dir: &Path,
        process_env: &BTreeMap<String, String>,
    ) -> Config {
        let crontab = self.parse("CRONTAB", DEFAULT_CRONTAB.to_owned(), |v| {
            validate_crontab(v).map(|()| v.to_owned())
        });
        let tz = self.parse_opt("TZ", parse_tz).flatten();

        let is_absolute = self.parse("IS_ABSOLUTE_STAGING_AREA_PATH", false, parse_bool);
        let staging_text = self
            .text("STAGING_AREA_PATH")
            .unwrap_or_else(|| DEFAULT_STAGING_AREA_PATH.into());
        let staging_given = PathBuf::from(&staging_text);
        if is_absolute && !staging_given.is_absolute() {
            self.problem(
                self.label("STAGING_AREA_PATH"),
                Some(staging_text.clone()),
                "expected an absolute path because IS_ABSOLUTE_STAGING_AREA_PATH is true; give a full path or set IS_ABSOLUTE_STAGING_AREA_PATH=false",
            );
        }
        // As the seed did: a relative path is taken from the working directory.
        let staging_path = if is_absolute {
            staging_given
        } else {
            self.cwd.join(staging_given)
        };
        let failed_dir = self.text("FAILED_DIR").map(|d| self.cwd.join(d));
        let inbox_path = self.text("INBOX_PATH").map(|d| self.cwd.join(d));
        let staging_max_bytes = self.parse_opt("STAGING_MAX_BYTES", |v| {
            parse_size(v).and_then(|b| {
                if b == 0 {
                    Err("expected a size above 0 (leave it empty for no limit)".into())
                } else {
                    Ok(b)
                }
            })
        });
        // Two spellings of one setting: MIN_FREE_DISK_MB (whole megabytes, the host guard's
        // name) and STAGING_MIN_FREE_BYTES (any size, for tests on small disks).
        let min_free_bytes = self.parse_opt("STAGING_MIN_FREE_BYTES", parse_size);
        let min_free_mb = self.parse_opt("MIN_FREE_DISK_MB", |v| {
            parse_u64(v, "a whole number of megabytes (MiB), such as 256").and_then(|mb| {
                mb.checked_mul(1024 * 1024)
                    .ok_or_else(|| "expected a number of megabytes below 2^44".to_owned())
            })
        });
        if let (Some(bytes), Some(mb)) = (min_free_bytes, min_free_mb)
            && bytes != mb
        {
            self.problem(
                self.label("MIN_FREE_DISK_MB"),
                self.text("MIN_FREE_DISK_MB"),
                format!("the same limit as STAGING_MIN_FREE_BYTES ({bytes} bytes), which says otherwise; set only one of the two"),
            );
        }
        let staging_min_free_bytes = min_free_mb
            .or(min_free_bytes)
            .unwrap_or(estafeta_staging::DEFAULT_MIN_FREE_BYTES);
        let keep_days = self.parse("KEEP_DELIVERED_DAYS", 0u64, |v| {
            parse_u64(
                v,
                "a whole number of days (0 deletes delivered records at once)",
            )
        });
        let ingest_addr = self.parse(
            "INGEST_ADDR",
            SocketAddr::from((Ipv4Addr::LOCALHOST, 8787)),
            parse_addr,
        );
        let ingest_token = self.ingest_token();
        let ingest_allowed_hosts = self
            .parse_opt("INGEST_ALLOWED_HOSTS", parse_allowed_hosts)
            .unwrap_or_default();
        let max_body_bytes = self.parse("MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES, |v| {
            parse_size(v).and_then(|b| positive_usize(b, "a size above 0 such as 10MiB"))
        });
        let ingest_body_timeout = self.parse(
            "INGEST_BODY_TIMEOUT_SECS",
            Duration::from_secs(DEFAULT_INGEST_BODY_TIMEOUT_SECS),
            |v| parse_secs(v, false),
        );
        let flush_on_write = self.parse("FLUSH_ON_WRITE", true, parse_bool);
        let max_records = self.parse("MAX_RECORDS", DEFAULT_MAX_RECORDS, |v| {
            parse_u64(v, "a whole number above 0")
                .and_then(|n| positive_usize(n, "a whole number above 0"))
        });
        let batch_size = self.parse("BATCH_SIZE", DEFAULT_BATCH_SIZE, |v| {
            parse_u64(v, "a whole number above 0")
                .and_then(|n| positive_usize(n, "a whole number above 0"))
        });
        let dry_run = self.parse("DRY_RUN", false, parse_bool);
        let retry_base = self.parse(
            "RETRY_BASE_SECS",
            Duration::from_secs(DEFAULT_RETRY_BASE_SECS),
            |v| parse_secs(v, false),
        );
        let retry_max = self.parse(
            "RETRY_MAX_SECS",
            Duration::from_secs(DEFAULT_RETRY_MAX_SECS),
            |v| parse_secs(v, false),
        );
        if retry_base > retry_max {
            self.problem(
                self.label("RETRY_MAX_SECS"),
                Some(secs(retry_max)),
                format!("expected at least RETRY_BASE_SECS ({})", secs(retry_base)),
            );
        }
        let shutdown_grace = self.parse(
            "SHUTDOWN_GRACE_SECS",
            Duration::from_secs(DEFAULT_SHUTDOWN_GRACE_SECS),
            |v| parse_secs(v, true),
        );
        let agent_id = self
            .parse_opt("AGENT_ID", |v| validate_agent_id(v).map(|()| v.to_owned()))
            .unwrap_or_else(|| default_agent_id(process_env));
        let heartbeat = self.parse(
            "HEARTBEAT_SECS",
            Duration::from_secs(crate::heartbeat::DEFAULT_HEARTBEAT_SECS),
            |v| parse_secs(v, true),
        );
        let log_dir = self.text("LOG_DIR").map(|d| self.cwd.join(d));
        let log_retention_days =
            self.parse("LOG_RETENTION_DAYS", DEFAULT_LOG_RETENTION_DAYS, |v| {
                parse_u64(v, "a whole number of days (0 keeps every log file)")
            });
        let log_level = self.parse("LOG_LEVEL", DEFAULT_LOG_LEVEL.to_owned(), |v| {
            validate_log_level(v).map(|()| v.to_owned())
        });

        if let Some(problem) = ingest_exposure_problem(ingest_addr, ingest_token.as_deref()) {
            self.problems.push(Problem::sentence(
                self.label("INGEST_ADDR"),
                ingest_addr.to_string(),
                problem,
            ));
        }

        let update = self.update_config();
        let sinks = self.sinks(&file.sinks, file_dir, &agent_id);
        let names: BTreeSet<&str> = sinks.iter().map(|s| s.name.as_str()).collect();
        let routes = self.routes(&file.routes, &names);
        let entities = self.entities(file.entities, file_dir);
        let sql_sources = crate::sources::load(&file.sources, file_dir, &mut self.problems);

        Config {
            sources: if self.sources.is_empty() {
                vec!["embedded defaults".into()]
            } else {
                self.sources.clone()
            },
            crontab,
            tz,
            staging_path,
            failed_dir,
            inbox_path,
            staging_max_bytes,
            staging_min_free_bytes,
            keep_delivered: Duration::from_secs(keep_days.saturating_mul(86_400)),
            ingest_addr,
            ingest_token,
            ingest_allowed_hosts,
            max_body_bytes,
            ingest_body_timeout,
            flush_on_write,
            max_records,
            batch_size,
            dry_run,
            retry_base,
            retry_max,
            shutdown_grace,
            agent_id,
            heartbeat,
            log_dir,
            log_retention_days,
            log_level,
            sinks,
            routes,
            entities,
            sql_sources,
            update,
        }
    }

    /// `INGEST_TOKEN`, or the content of the file `INGEST_TOKEN_FILE` names (one line, spaces
    /// around it dropped): packaged installs keep a generated token there, readable by the
    /// service and administrators only. Both set: they must agree.
    fn ingest_token(&mut self) -> Option<String> {
        let given = self.text("INGEST_TOKEN");
        let Some(file) = self.raw.get("INGEST_TOKEN_FILE").cloned() else {
            return given;
        };
        let label = file.origin.label("INGEST_TOKEN_FILE");
        let path = self.cwd.join(&file.value);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) => {
                self.problem(
                    label,
                    Some(file.value),
                    format!(
                        "could not read the token file ({err}); run this as a user allowed to read it (root, or the service's user: sudo -u estafeta …), or write a token into it with {GENERATE_TOKEN}"
                    ),
                );
                return given;
            }
        };
        let token = text.trim();
        if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            self.problem(
                label,
                Some(file.value),
                format!(
                    "expected the file to hold one token on one line (it is empty or holds spaces); write one with {GENERATE_TOKEN}"
                ),
            );
            return given;
        }
        if let Some(given) = &given
            && given != token
        {
            self.problem(
                self.label("INGEST_TOKEN"),
                Some("***".into()),
                format!(
                    "differs from the token in INGEST_TOKEN_FILE={}; set only one of the two",
                    file.value
                ),
            );
        }
        Some(token.to_owned())
    }

    fn update_config(&mut self) -> crate::update::UpdateConfig {
        let url = self.parse_opt("UPDATE_URL", |v| check_http_url(v).map(|()| v.to_owned()));
        let crontab = self.parse_opt("UPDATE_CRONTAB", |v| {
            validate_crontab(v).map(|()| v.to_owned())
        });
        if crontab.is_some() && url.is_none() && !self.raw.contains_key("UPDATE_URL") {
            self.problem(
                self.label("UPDATE_CRONTAB"),
                self.text("UPDATE_CRONTAB"),
                "checks need UPDATE_URL (the release manifest's URL); set it, or leave UPDATE_CRONTAB empty",
            );
        }
        let cwd = self.cwd.clone();
        let keys = self
            .parse_opt("UPDATE_PUBLIC_KEY", |v| crate::update::keys::parse(v, &cwd))
            .unwrap_or_default();
        let health = self.parse(
            "UPDATE_HEALTH_SECS",
            Duration::from_secs(crate::update::DEFAULT_HEALTH_SECS),
            |v| parse_secs(v, false),
        );
        // Refused at check time, not here: a clear-text UPDATE_URL must not stop the agent (nor
        // fail the trial of the version that brings this rule); its checks fail and say why.
        let allow_http = self.parse("UPDATE_ALLOW_HTTP", false, parse_bool);
        let ca_file = self.text("UPDATE_CA_FILE").map(|p| self.cwd.join(p));
        if let Some(ca) = &ca_file
            && let Err(expected) = check_readable(ca)
        {
            self.problem(
                self.label("UPDATE_CA_FILE"),
                Some(ca.display().to_string()),
                expected,
            );
        }
        crate::update::UpdateConfig {
            url,
            crontab,
            keys,
            health,
            allow_http,
            ca_file,
        }
    }

    fn sinks(
        &mut self,
        file_sinks: &[FileSink],
        file_dir: &Path,
        agent_id: &str,
    ) -> Vec<SinkConfig> {
        let mut sinks: Vec<SinkConfig> = Vec::new();
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        // (sink name, key, folder): loaded once the URL is final (CENTRAL_DATABASE_URL may
        // change the dialect).
        let mut apply_dirs: Vec<(String, String, PathBuf)> = Vec::new();
        for (i, sink) in file_sinks.iter().enumerate() {
            let at = format!("sinks[{i}]");
            if let Err(err) = estafeta_staging::validate_name("sink", &sink.name) {
                self.problem(
                    format!("{at}.name"),
                    Some(sink.name.clone()),
                    invalid_reason(err),
                );
            }
            if let Some(first) = seen.get(&sink.name) {
                self.problem(
                    format!("{at}.name"),
                    Some(sink.name.clone()),
                    format!("expected a unique sink name; sinks[{first}] is already called that"),
                );
                continue;
            }
            seen.insert(sink.name.clone(), i);
            for (field, set, types) in sink.typed_fields() {
                if set && !types.contains(&sink.kind) {
                    let applies = types
                        .iter()
                        .map(|t| t.as_str())
                        .collect::<Vec<_>>()
                        .join(" and ");
                    self.problem(
                        format!("{at}.{field}"),
                        None,
                        format!(
                            "applies to {applies} sinks only; remove it from this {} sink",
                            sink.kind.as_str()
                        ),
                    );
                }
            }
            let kind = match sink.kind {
                FileSinkType::Nats => SinkKind::Nats(self.file_nats_sink(&at, sink, agent_id)),
                FileSinkType::Database => {
                    if let Err(expected) = check_database_url(&sink.url) {
                        self.problem(format!("{at}.url"), Some(redact_url(&sink.url)), expected);
                    }
                    if let Some(dir) = &sink.apply_dir {
                        apply_dirs.push((
                            sink.name.clone(),
                            format!("{at}.apply_dir"),
                            file_dir.join(dir),
                        ));
                    }
                    let connections = match sink.connections {
                        None => crate::sinks::database::DEFAULT_CONNECTIONS,
                        Some(n @ 1..=2) => n,
                        Some(n) => {
                            self.problem(
                                format!("{at}.connections"),
                                Some(n.to_string()),
                                "expected 1 or 2 (connections a PostgreSQL batch is spread over)",
                            );
                            crate::sinks::database::DEFAULT_CONNECTIONS
                        }
                    };
                    SinkKind::Database(DatabaseSinkConfig {
                        url: sink.url.clone(),
                        agent_id: agent_id.to_owned(),
                        apply: None,
                        connections,
                    })
                }
                FileSinkType::Http => {
                    if let Err(expected) = check_http_url(&sink.url) {
                        self.problem(format!("{at}.url"), Some(redact_url(&sink.url)), expected);
                    }
                    let timeout = match sink.timeout_secs {
                        Some(t) => match secs_from_f64(t, false) {
                            Ok(d) => d,
                            Err(expected) => {
                                self.problem(
                                    format!("{at}.timeout_secs"),
                                    Some(t.to_string()),
                                    expected,
                                );
                                Duration::from_secs(DEFAULT_API_TIMEOUT_SECS)
                            }
                        },
                        None => Duration::from_secs(DEFAULT_API_TIMEOUT_SECS),
                    };
                    let concurrency = sink.concurrency.unwrap_or(DEFAULT_API_CONCURRENCY);
                    if let Err(expected) = check_concurrency(concurrency) {
                        self.problem(
                            format!("{at}.concurrency"),
                            Some(concurrency.to_string()),
                            expected,
                        );
                    }
                    let ca_file = sink.ca_file.as_ref().map(|p| file_dir.join(p));
                    if let Some(ca) = &ca_file
                        && let Err(expected) = check_readable(ca)
                    {
                        self.problem(
                            format!("{at}.ca_file"),
                            Some(ca.display().to_string()),
                            expected,
                        );
                    }
                    let mut routes = Vec::new();
                    for (j, route) in sink.routes.iter().enumerate() {
                        routes.push(self.http_route(&format!("{at}.routes[{j}]"), route));
                    }
                    if let Some(path) = &sink.heartbeat_path
                        && let Err(expected) = crate::sinks::http::check_heartbeat_path(path)
                    {
                        self.problem(format!("{at}.heartbeat_path"), Some(path.clone()), expected);
                    }
                    SinkKind::Http(HttpSinkConfig {
                        url: sink.url.clone(),
                        token: sink.token.clone().filter(|t| !t.is_empty()),
                        timeout,
                        verify_tls: sink.verify_tls.unwrap_or(true),
                        ca_file,
                        routes,
                        concurrency,
                        heartbeat_path: sink.heartbeat_path.clone(),
                    })
                }
            };
            sinks.push(SinkConfig {
                name: sink.name.clone(),
                kind,
            });
        }
        self.env_database_sink(&mut sinks, agent_id);
        for (name, at, dir) in apply_dirs {
            self.apply_statements(&mut sinks, &name, &at, &dir);
        }
        self.env_api_sink(&mut sinks);
        self.env_nats_sink(&mut sinks, agent_id);
        if sinks.is_empty() {
            sinks.push(SinkConfig {
                name: DATABASE_SINK.into(),
                kind: SinkKind::Database(DatabaseSinkConfig {
                    url: DEFAULT_DATABASE_URL.into(),
                    agent_id: agent_id.to_owned(),
                    apply: None,
                    connections: crate::sinks::database::DEFAULT_CONNECTIONS,
                }),
            });
        }
        sinks
    }

    fn http_route(&mut self, at: &str, route: &FileHttpRoute) -> HttpRoute {
        let method = route.method.as_ref().map(|m| m.to_ascii_uppercase());
        if let Some(m) = &method
            && !METHODS.contains(&m.as_str())
        {
            self.problem(
                format!("{at}.method"),
                Some(m.clone()),
                format!("expected one of {}", METHODS.join(", ")),
            );
        }
        for (field, name) in [("entity", &route.entity), ("action", &route.action)] {
            if let Some(name) = name
                && name != "*"
                && let Err(err) = estafeta_staging::validate_name(field, name)
            {
                self.problem(
                    format!("{at}.{field}"),
                    Some(name.clone()),
                    invalid_reason(err),
                );
            }
        }
        if let Some(path) = &route.path
            && !path.starts_with('/')
        {
            self.problem(
                format!("{at}.path"),
                Some(path.clone()),
                "expected a path starting with '/', such as /{entity}/{key}",
            );
        }
        HttpRoute {
            entity: route.entity.clone().filter(|e| e != "*"),
            action: route.action.clone().filter(|a| a != "*"),
            method,
            path: route.path.clone(),
            headers: route.headers.clone(),
        }
    }

    /// Apply mode: reads and checks the statement files of sink `name` for its final URL's
    /// dialect; each bad file is a problem naming it.
    fn apply_statements(&mut self, sinks: &mut [SinkConfig], name: &str, at: &str, dir: &Path) {
        let Some(SinkConfig {
            kind: SinkKind::Database(db),
            ..
        }) = sinks.iter_mut().find(|s| s.name == name)
        else {
            return;
        };
        // A bad URL is reported on its own.
        let Ok(dialect) = Dialect::of(&db.url) else {
            return;
        };
        match ApplyStatements::load(dir, dialect) {
            Ok(statements) => db.apply = Some(Arc::new(statements)),
            Err(problems) => {
                for problem in problems {
                    self.problem(at, Some(dir.display().to_string()), problem);
                }
            }
        }
    }

    /// `CENTRAL_DATABASE_URL`: the `database` sink (overriding the file's, if it has one).
    fn env_database_sink(&mut self, sinks: &mut Vec<SinkConfig>, agent_id: &str) {
        let Some(url) = self.text("CENTRAL_DATABASE_URL") else {
            return;
        };
        if let Err(expected) = check_database_url(&url) {
            self.problem(
                self.label("CENTRAL_DATABASE_URL"),
                Some(redact_url(&url)),
                expected,
            );
        }
        match sinks.iter_mut().find(|s| s.name == DATABASE_SINK) {
            Some(SinkConfig {
                kind: SinkKind::Database(db),
                ..
            }) => db.url = url,
            Some(_) => self.problem(
                self.label("CENTRAL_DATABASE_URL"),
                Some(redact_url(&url)),
                "the CONFIG_FILE already has an http sink named \"database\"; rename that sink",
            ),
            None => sinks.push(SinkConfig {
                name: DATABASE_SINK.into(),
                kind: SinkKind::Database(DatabaseSinkConfig {
                    url,
                    agent_id: agent_id.to_owned(),
                    apply: None,
                    connections: crate::sinks::database::DEFAULT_CONNECTIONS,
                }),
            }),
        }
    }

    /// `CENTRAL_API_*`: the `api` sink (overriding the file's, field by field, if it has one).
    fn env_api_sink(&mut self, sinks: &mut Vec<SinkConfig>) {
        let url = self.text("CENTRAL_API_URL");
        if let Some(url) = &url
            && let Err(expected) = check_http_url(url)
        {
            self.problem(
                self.label("CENTRAL_API_URL"),
                Some(redact_url(url)),
                expected,
            );
        }
        let token = self.text("CENTRAL_API_TOKEN");
        let timeout = self.parse_opt("CENTRAL_API_TIMEOUT_SECS", |v| parse_secs(v, false));
        let verify_tls = self.parse_opt("CENTRAL_API_VERIFY_TLS", parse_bool);
        let ca_file = self.text("CENTRAL_API_CA_FILE").map(|p| self.cwd.join(p));
        if let Some(ca) = &ca_file
            && let Err(expected) = check_readable(ca)
        {
            self.problem(
                self.label("CENTRAL_API_CA_FILE"),
                Some(ca.display().to_string()),
                expected,
            );
        }
        let concurrency = self.parse_opt("CENTRAL_API_CONCURRENCY", |v| {
            parse_u64(v, "a whole number from 1 to 1024")
                .and_then(|n| {
                    usize::try_from(n).map_err(|_| "expected a whole number from 1 to 1024".into())
                })
                .and_then(|n| check_concurrency(n).map(|()| n))
        });
        let heartbeat_path = self.text("CENTRAL_API_HEARTBEAT_PATH");
        if let Some(path) = &heartbeat_path
            && let Err(expected) = crate::sinks::http::check_heartbeat_path(path)
        {
            self.problem(
                self.label("CENTRAL_API_HEARTBEAT_PATH"),
                Some(path.clone()),
                expected,
            );
        }
        let existing = sinks.iter_mut().find(|s| s.name == API_SINK);
        match existing {
            Some(SinkConfig {
                kind: SinkKind::Http(http),
                ..
            }) => {
                if let Some(url) = url {
                    http.url = url;
                }
                if token.is_some() {
                    http.token = token;
                }
                if let Some(timeout) = timeout {
                    http.timeout = timeout;
                }
                if let Some(verify) = verify_tls {
                    http.verify_tls = verify;
                }
                if ca_file.is_some() {
                    http.ca_file = ca_file;
                }
                if let Some(concurrency) = concurrency {
                    http.concurrency = concurrency;
                }
                if heartbeat_path.is_some() {
                    http.heartbeat_path = heartbeat_path;
                }
            }
            Some(_) => {
                if let Some(key) = std::iter::once("CENTRAL_API_URL")
                    .chain(API_KEYS.iter().copied())
                    .find(|k| self.raw.contains_key(*k))
                {
                    self.problem(
                        self.label(key),
                        None,
                        "the CONFIG_FILE already has a database sink named \"api\"; rename that sink",
                    );
                }
            }
            None => match url {
                Some(url) => sinks.push(SinkConfig {
                    name: API_SINK.into(),
                    kind: SinkKind::Http(HttpSinkConfig {
                        url,
                        token,
                        timeout: timeout.unwrap_or(Duration::from_secs(DEFAULT_API_TIMEOUT_SECS)),
                        verify_tls: verify_tls.unwrap_or(true),
                        ca_file,
                        routes: Vec::new(),
                        concurrency: concurrency.unwrap_or(DEFAULT_API_CONCURRENCY),
                        heartbeat_path,
                    }),
                }),
                None => {
                    // Only keys that show intent: the defaults may well be uncommented.
                    for key in ["CENTRAL_API_TOKEN", "CENTRAL_API_CA_FILE"] {
                        if let Some(raw) = self.raw.get(key).cloned() {
                            self.problems.push(Problem::sentence(
                                raw.origin.label(key),
                                shown(key, &raw.value),
                                "is set but CENTRAL_API_URL is empty: set CENTRAL_API_URL or remove this key",
                            ));
                        }
                    }
                }
            },
        }
    }

    /// A `type = "nats"` sink of the file.
    fn file_nats_sink(&mut self, at: &str, sink: &FileSink, agent_id: &str) -> NatsSinkConfig {
        if let Err(expected) = crate::sinks::nats::check_nats_url(&sink.url) {
            self.problem(format!("{at}.url"), Some(redact_url(&sink.url)), expected);
        }
        let timeout = match sink.timeout_secs {
            Some(t) => secs_from_f64(t, false).unwrap_or_else(|expected| {
                self.problem(format!("{at}.timeout_secs"), Some(t.to_string()), expected);
                Duration::from_secs(crate::sinks::nats::DEFAULT_NATS_TIMEOUT_SECS)
            }),
            None => Duration::from_secs(crate::sinks::nats::DEFAULT_NATS_TIMEOUT_SECS),
        };
        let subject = sink
            .subject
            .clone()
            .unwrap_or_else(|| crate::sinks::nats::DEFAULT_SUBJECT.into());
        if let Err(expected) = crate::sinks::nats::check_subject_template(&subject) {
            self.problem(format!("{at}.subject"), Some(subject.clone()), expected);
        }
        let create = sink.create_stream.unwrap_or(false);
        if !create {
            for (field, set) in [
                ("stream", sink.stream.is_some()),
                ("stream_subjects", sink.stream_subjects.is_some()),
                ("retention", sink.retention.is_some()),
                ("replicas", sink.replicas.is_some()),
                (
                    "duplicate_window_secs",
                    sink.duplicate_window_secs.is_some(),
                ),
            ] {
                if set {
                    self.problem(
                        format!("{at}.{field}"),
                        None,
                        "is used only to create the stream: set create_stream = true, or remove it",
                    );
                }
            }
        }
        let stream = create.then(|| {
            let name = sink
                .stream
                .clone()
                .unwrap_or_else(|| crate::sinks::nats::DEFAULT_STREAM.into());
            if let Err(expected) = crate::sinks::nats::check_stream_name(&name) {
                self.problem(format!("{at}.stream"), Some(name.clone()), expected);
            }
            let subjects = sink
                .stream_subjects
                .clone()
                .unwrap_or_else(|| vec![crate::sinks::nats::default_stream_subject(&subject)]);
            if subjects.is_empty() || subjects.iter().any(|s| s.trim().is_empty()) {
                self.problem(
                    format!("{at}.stream_subjects"),
                    Some(format!("{subjects:?}")),
                    "expected at least one subject, such as \"estafeta.>\"",
                );
            }
            let retention = match &sink.retention {
                Some(text) => Retention::parse(text).unwrap_or_else(|expected| {
                    self.problem(format!("{at}.retention"), Some(text.clone()), expected);
                    Retention::Limits
                }),
                None => Retention::Limits,
            };
            let replicas = sink.replicas.unwrap_or(1);
            if !(1..=crate::sinks::nats::MAX_REPLICAS).contains(&replicas) {
                self.problem(
                    format!("{at}.replicas"),
                    Some(replicas.to_string()),
                    format!(
                        "expected 1 to {} (at most the cluster's server count)",
                        crate::sinks::nats::MAX_REPLICAS
                    ),
                );
            }
            let duplicate_window = sink.duplicate_window_secs.and_then(|t| {
                secs_from_f64(t, false)
                    .map_err(|expected| {
                        self.problem(
                            format!("{at}.duplicate_window_secs"),
                            Some(t.to_string()),
                            expected,
                        )
                    })
                    .ok()
            });
            StreamSettings {
                name,
                subjects,
                retention,
                replicas,
                duplicate_window,
            }
        });
        NatsSinkConfig {
            url: sink.url.clone(),
            token: sink.token.clone().filter(|t| !t.is_empty()),
            subject,
            timeout,
            agent_id: agent_id.to_owned(),
            stream,
        }
    }

    /// `CENTRAL_NATS_*`: the `nats` sink (overriding the file's, field by field, if it has one).
    fn env_nats_sink(&mut self, sinks: &mut Vec<SinkConfig>, agent_id: &str) {
        let url = self.text("CENTRAL_NATS_URL");
        if let Some(url) = &url
            && let Err(expected) = crate::sinks::nats::check_nats_url(url)
        {
            self.problem(
                self.label("CENTRAL_NATS_URL"),
                Some(redact_url(url)),
                expected,
            );
        }
        let token = self.text("CENTRAL_NATS_TOKEN");
        let subject = self.parse_opt("CENTRAL_NATS_SUBJECT", |v| {
            crate::sinks::nats::check_subject_template(v).map(|()| v.to_owned())
        });
        let timeout = self.parse_opt("CENTRAL_NATS_TIMEOUT_SECS", |v| parse_secs(v, false));
        let create_stream = self.parse_opt("CENTRAL_NATS_CREATE_STREAM", parse_bool);
        let stream_name = self.parse_opt("CENTRAL_NATS_STREAM", |v| {
            crate::sinks::nats::check_stream_name(v).map(|()| v.to_owned())
        });
        match sinks.iter_mut().find(|s| s.name == NATS_SINK) {
            Some(SinkConfig {
                kind: SinkKind::Nats(nats),
                ..
            }) => {
                if let Some(url) = url {
                    nats.url = url;
                }
                if token.is_some() {
                    nats.token = token;
                }
                if let Some(subject) = subject {
                    // The stream's default subjects follow the template.
                    if let Some(stream) = &mut nats.stream
                        && stream.subjects
                            == [crate::sinks::nats::default_stream_subject(&nats.subject)]
                    {
                        stream.subjects =
                            vec![crate::sinks::nats::default_stream_subject(&subject)];
                    }
                    nats.subject = subject;
                }
                if let Some(timeout) = timeout {
                    nats.timeout = timeout;
                }
                match (create_stream, &mut nats.stream) {
                    (Some(false), _) => nats.stream = None,
                    (Some(true), None) => {
                        nats.stream = Some(default_stream(&nats.subject, stream_name.clone()));
                    }
                    _ => {}
                }
                if let (Some(name), Some(stream)) = (stream_name, &mut nats.stream) {
                    stream.name = name;
                }
            }
            Some(_) => {
                if let Some(key) = std::iter::once("CENTRAL_NATS_URL")
                    .chain(NATS_KEYS.iter().copied())
                    .find(|k| self.raw.contains_key(*k))
                {
                    self.problem(
                        self.label(key),
                        None,
                        "the CONFIG_FILE already has a sink named \"nats\" of another type; rename that sink",
                    );
                }
            }
            None => match url {
                Some(url) => {
                    let subject =
                        subject.unwrap_or_else(|| crate::sinks::nats::DEFAULT_SUBJECT.into());
                    let stream = create_stream
                        .unwrap_or(false)
                        .then(|| default_stream(&subject, stream_name));
                    sinks.push(SinkConfig {
                        name: NATS_SINK.into(),
                        kind: SinkKind::Nats(NatsSinkConfig {
                            url,
                            token,
                            subject,
                            timeout: timeout.unwrap_or(Duration::from_secs(
                                crate::sinks::nats::DEFAULT_NATS_TIMEOUT_SECS,
                            )),
                            agent_id: agent_id.to_owned(),
                            stream,
                        }),
                    });
                }
                None => {
                    if let Some(raw) = self.raw.get("CENTRAL_NATS_TOKEN").cloned() {
                        self.problems.push(Problem::sentence(
                            raw.origin.label("CENTRAL_NATS_TOKEN"),
                            shown("CENTRAL_NATS_TOKEN", &raw.value),
                            "is set but CENTRAL_NATS_URL is empty: set CENTRAL_NATS_URL or remove this key",
                        ));
                    }
                }
            },
        }
    }

    fn routes(&mut self, file_routes: &[FileRoute], names: &BTreeSet<&str>) -> Vec<Route> {
        let mut routes = Vec::new();
        for (i, route) in file_routes.iter().enumerate() {
            let at = format!("routes[{i}]");
            for (field, name) in [("action", &route.action), ("entity", &route.entity)] {
                if let Some(name) = name
                    && name != "*"
                    && let Err(err) = estafeta_staging::validate_name(field, name)
                {
                    self.problem(
                        format!("{at}.{field}"),
                        Some(name.clone()),
                        invalid_reason(err),
                    );
                }
            }
            if route.sinks.is_empty() {
                self.problem(
                    format!("{at}.sinks"),
                    Some("[]".into()),
                    "expected at least one sink name",
                );
            }
            for sink in &route.sinks {
                if !names.contains(sink.as_str()) {
                    self.problem(
                        format!("{at}.sinks"),
                        Some(sink.clone()),
                        format!(
                            "expected the name of a configured sink: {}",
                            names.iter().copied().collect::<Vec<_>>().join(", ")
                        ),
                    );
                }
            }
            routes.push(Route {
                action: route.action.clone().filter(|a| a != "*"),
                entity: route.entity.clone().filter(|e| e != "*"),
                sinks: route.sinks.clone(),
            });
        }
        routes
    }

    fn entities(
        &mut self,
        file_entities: BTreeMap<String, FileEntity>,
        file_dir: &Path,
    ) -> BTreeMap<String, EntityConfig> {
        let mut entities = BTreeMap::new();
        for (name, entity) in file_entities {
            let at = format!("entities.{name}");
            if let Err(err) = estafeta_staging::validate_name("entity", &name) {
                self.problem(at.clone(), None, invalid_reason(err));
            }
            if let Some(field) = &entity.key_field
                && field.trim().is_empty()
            {
                self.problem(
                    format!("{at}.key_field"),
                    Some(field.clone()),
                    "expected a payload field name such as id",
                );
            }
            let schema = entity.schema.as_ref().and_then(|path| {
                let path = file_dir.join(path);
                match read_schema(&path) {
                    Ok(schema) => Some(schema),
                    Err(expected) => {
                        self.problem(
                            format!("{at}.schema"),
                            Some(path.display().to_string()),
                            expected,
                        );
                        None
                    }
                }
            });
            entities.insert(
                name,
                EntityConfig {
                    key_field: entity.key_field.filter(|f| !f.trim().is_empty()),
                    schema,
                },
            );
        }
        entities
    }
}

/// The stream `create_stream = true` makes when nothing else is said: `ESTAFETA` (or `name`),
/// capturing the template's subjects, limits retention, one replica, the server's window.
fn default_stream(subject: &str, name: Option<String>) -> StreamSettings {
    StreamSettings {
        name: name.unwrap_or_else(|| crate::sinks::nats::DEFAULT_STREAM.into()),
        subjects: vec![crate::sinks::nats::default_stream_subject(subject)],
        retention: Retention::Limits,
        replicas: 1,
        duplicate_window: None,
    }
}

/// The value `check-config` shows for a key that is not set.
fn default_shown(key: &str) -> String {
    match key {
        "CRONTAB" => DEFAULT_CRONTAB.into(),
        "TZ" => "(local time)".into(),
        "STAGING_AREA_PATH" => DEFAULT_STAGING_AREA_PATH.into(),
        "IS_ABSOLUTE_STAGING_AREA_PATH" => "false".into(),
        "FAILED_DIR" => "(<staging>/_failed)".into(),
        "INBOX_PATH" => "(none)".into(),
        "STAGING_MAX_BYTES" => "(no limit)".into(),
        "STAGING_MIN_FREE_BYTES" => estafeta_staging::DEFAULT_MIN_FREE_BYTES.to_string(),
        "MIN_FREE_DISK_MB" => (estafeta_staging::DEFAULT_MIN_FREE_BYTES >> 20).to_string(),
        "KEEP_DELIVERED_DAYS" => "0".into(),
        "INGEST_ADDR" => DEFAULT_INGEST_ADDR.into(),
        "INGEST_ALLOWED_HOSTS" => "(none)".into(),
        "MAX_BODY_BYTES" => DEFAULT_MAX_BODY_BYTES.to_string(),
        "INGEST_BODY_TIMEOUT_SECS" => DEFAULT_INGEST_BODY_TIMEOUT_SECS.to_string(),
        "FLUSH_ON_WRITE" => "true".into(),
        "MAX_RECORDS" => DEFAULT_MAX_RECORDS.to_string(),
        "BATCH_SIZE" => DEFAULT_BATCH_SIZE.to_string(),
        "DRY_RUN" => "false".into(),
        "RETRY_BASE_SECS" => DEFAULT_RETRY_BASE_SECS.to_string(),
        "RETRY_MAX_SECS" => DEFAULT_RETRY_MAX_SECS.to_string(),
        "SHUTDOWN_GRACE_SECS" => DEFAULT_SHUTDOWN_GRACE_SECS.to_string(),
        "HEARTBEAT_SECS" => crate::heartbeat::DEFAULT_HEARTBEAT_SECS.to_string(),
        "LOG_DIR" => "(stderr only)".into(),
        "LOG_RETENTION_DAYS" => DEFAULT_LOG_RETENTION_DAYS.to_string(),
        "LOG_LEVEL" => DEFAULT_LOG_LEVEL.into(),
        "CENTRAL_DATABASE_URL" => format!("({DEFAULT_DATABASE_URL} when no sink is configured)"),
        "CENTRAL_API_TIMEOUT_SECS" => DEFAULT_API_TIMEOUT_SECS.to_string(),
        "CENTRAL_API_VERIFY_TLS" => "true".into(),
        "CENTRAL_API_CONCURRENCY" => DEFAULT_API_CONCURRENCY.to_string(),
        "CENTRAL_NATS_SUBJECT" => crate::sinks::nats::DEFAULT_SUBJECT.into(),
        "CENTRAL_NATS_TIMEOUT_SECS" => crate::sinks::nats::DEFAULT_NATS_TIMEOUT_SECS.to_string(),
        "CENTRAL_NATS_CREATE_STREAM" => "false".into(),
        "CENTRAL_NATS_STREAM" => crate::sinks::nats::DEFAULT_STREAM.into(),
        "UPDATE_URL" => "(updates off)".into(),
        "UPDATE_CRONTAB" => "(no automatic checks)".into(),
        "UPDATE_PUBLIC_KEY" => "(none: updates are refused)".into(),
        "UPDATE_HEALTH_SECS" => crate::update::DEFAULT_HEALTH_SECS.to_string(),
        "UPDATE_ALLOW_HTTP" => "false".into(),
        _ => "(not set)".into(),
    }
}

/// `.env` text with every unquoted value that holds spaces (`CRONTAB=*/5 * * * * # note`) or
/// backslashes (`FAILED_DIR=C:\Estafeta\failed`, a Windows path) single-quoted, comment
/// dropped, as python-dotenv (the seeds' reader) reads it: literally. dotenvy refuses the first
/// and reads `\` in the second as an escape. Lines inside a multi-line quoted value are left
/// alone.
fn quote_unquoted_spaces(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut open: Option<char> = None;
    for line in text.split_inclusive('\n') {
        let (body, newline) = match line.strip_suffix('\n') {
            Some(body) => (body, "\n"),
            None => (line, ""),
        };
        if let Some(quote) = open {
            if !count_quotes(body, quote).is_multiple_of(2) {
                open = None;
            }
            out.push_str(line);
            continue;
        }
        let trimmed = body.trim_start();
        let rest = trimmed.strip_prefix("export ").unwrap_or(trimmed);
        let Some((key, value)) = rest.split_once('=') else {
            out.push_str(line);
            continue;
        };
        let value = value.trim();
        match value.chars().next() {
            Some(quote @ ('"' | '\'')) => {
                if count_quotes(&value[1..], quote).is_multiple_of(2) {
                    open = Some(quote);
                }
                out.push_str(line);
            }
            _ => {
                let value = match value.find(" #") {
                    Some(comment) => value[..comment].trim_end(),
                    None => value,
                };
                if is_env_name(key.trim())
                    && (value.contains(char::is_whitespace) || value.contains('\\'))
                    && !value.contains('\'')
                    && !trimmed.starts_with('#')
                {
                    out.push_str(&format!("{}='{value}'{newline}", key.trim()));
                } else {
                    out.push_str(line);
                }
            }
        }
    }
    out
}

/// Quote characters in `text` that are not escaped with a backslash.
fn count_quotes(text: &str, quote: char) -> usize {
    let mut count = 0;
    let mut escaped = false;
    for c in text.chars() {
        if escaped {
            escaped = false;
        } else if c == '\\' && quote == '"' {
            escaped = true;
        } else if c == quote {
            count += 1;
        }
    }
    count
}

fn is_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

/// `${VAR}` replaced by VAR's value; an unset VAR is an error naming it.
fn expand(text: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err("expected ${NAME} with a closing brace".into());
        };
        let name = &after[..end];
        let valid = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(format!(
                "expected ${{NAME}} with NAME made of A-Z, 0-9 and '_', found ${{{name}}}"
            ));
        }
        match vars.get(name) {
            Some(value) => out.push_str(value),
            None => {
                return Err(format!(
                    "environment variable {name} is not set; set it in .env or the environment, or remove ${{{name}}}"
                ));
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Checks a cron expression: 5 fields, or 6 with seconds first (or a nickname like `@hourly`).
pub fn validate_crontab(expr: &str) -> Result<(), String> {
    let expr = expr.trim();
    if !expr.starts_with('@') {
        let fields = expr.split_whitespace().count();
        if fields != 5 && fields != 6 {
            return Err(format!(
                "expected 5 cron fields (or 6 with seconds), found {fields}"
            ));
        }
    }
    croner::Cron::new(expr)
        .with_seconds_optional()
        .parse()
        .map(|_| ())
        .map_err(|err| {
            format!(
                "expected a cron expression such as \"*/5 * * * *\" (minute hour day month weekday): {err}"
            )
        })
}

/// `TZ`: an IANA name; a file path such as `:/etc/localtime` means the machine's local time.
fn parse_tz(text: &str) -> Result<Option<crate::timezone::Zone>, String> {
    use crate::timezone::Zone;
    let name = text.trim().trim_start_matches(':');
    if name.starts_with('/') {
        // glibc's `TZ=:/usr/share/zoneinfo/Area/City` form: use the name after `zoneinfo/`.
        return Ok(name
            .split_once("zoneinfo/")
            .and_then(|(_, zone)| Zone::named(zone)));
    }
    Zone::named(name).map(Some).ok_or_else(|| {
        "expected an IANA time zone name such as America/Sao_Paulo or UTC (from the system's time zone database, /usr/share/zoneinfo; install the tzdata package if it is missing)".to_string()
    })
}

/// `true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off`, any case.
pub fn parse_bool(text: &str) -> Result<bool, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err("expected true or false (also 1/0, yes/no)".into()),
    }
}

/// A size in bytes: `1048576`, `500MB` (powers of 1000), `2GiB` (powers of 1024), `1.5GB`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    const EXPECTED: &str = "expected a size in bytes, such as 1048576, 500MB or 2GiB";
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number = number.replace('_', "");
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "ki" | "kib" => 1 << 10,
        "mi" | "mib" => 1 << 20,
        "gi" | "gib" => 1 << 30,
        "ti" | "tib" => 1 << 40,
        _ => return Err(EXPECTED.into()),
    };
    if number.is_empty() {
        return Err(EXPECTED.into());
    }
    if let Ok(whole) = number.parse::<u64>() {
        return whole
            .checked_mul(multiplier)
            .ok_or_else(|| EXPECTED.to_string());
    }
    let fraction: f64 = number.parse().map_err(|_| EXPECTED.to_string())?;
    let bytes = fraction * multiplier as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(EXPECTED.into());
    }
    Ok(bytes.round() as u64)
}

fn parse_u64(text: &str, what: &str) -> Result<u64, String> {
    text.trim()
        .replace('_', "")
        .parse::<u64>()
        .map_err(|_| format!("expected {what}"))
}

fn positive_usize(n: u64, what: &str) -> Result<usize, String> {
    match usize::try_from(n) {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("expected {what}")),
    }
}

/// Seconds, whole or fractional; zero allowed only when `zero_ok`.
fn parse_secs(text: &str, zero_ok: bool) -> Result<Duration, String> {
    let value: f64 = text.trim().parse().map_err(|_| expected_secs(zero_ok))?;
    secs_from_f64(value, zero_ok)
}

fn secs_from_f64(value: f64, zero_ok: bool) -> Result<Duration, String> {
    if !value.is_finite() || value < 0.0 || (value == 0.0 && !zero_ok) || value > 1e9 {
        return Err(expected_secs(zero_ok));
    }
    Ok(Duration::from_secs_f64(value))
}

fn expected_secs(zero_ok: bool) -> String {
    if zero_ok {
        "expected a number of seconds, 0 or more, such as 10".into()
    } else {
        "expected a number of seconds above 0, such as 10 or 0.5".into()
    }
}

/// How to make a token, for messages.
const GENERATE_TOKEN: &str = "`estafeta token` (or `openssl rand -hex 32`)";

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

/// `INGEST_ALLOWED_HOSTS`: host names or IP addresses separated by commas, kept as the `Host`
/// check compares them (lowercase, IPv6 without brackets).
fn parse_allowed_hosts(text: &str) -> Result<Vec<String>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            crate::ingest::host::canonical_host(entry).ok_or_else(|| {
                format!(
                    "{entry:?} is not a host name or an IP address; expected names or addresses separated by commas, without scheme, port or wildcard (any port is accepted), such as estafeta.hospital.local,10.0.0.5"
                )
            })
        })
        .collect()
}

/// `INGEST_ADDR`: `IP:PORT`, or `localhost:PORT`.
fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Some(port) = text.strip_prefix("localhost:")
        && let Ok(port) = port.parse::<u16>()
    {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    Err("expected IP:PORT such as 127.0.0.1:8787 (or [::1]:8787)".into())
}

fn check_concurrency(n: usize) -> Result<(), String> {
    if (1..=MAX_CONCURRENCY).contains(&n) {
        Ok(())
    } else {
        Err(format!(
            "expected a whole number from 1 to {MAX_CONCURRENCY}"
        ))
    }
}

fn check_http_url(url: &str) -> Result<(), String> {
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
fn check_database_url(url: &str) -> Result<(), String> {
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

fn check_readable(path: &Path) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(_) => Err("expected a file, found a folder".into()),
        Err(err) => Err(format!("expected a readable file: {err}")),
    }
}

/// Reads a JSON Schema file and checks that it compiles.
fn read_schema(path: &Path) -> Result<serde_json::Value, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|err| format!("expected a readable JSON Schema file: {err}"))?;
    let schema: serde_json::Value = serde_json::from_str(&text)
        .map_err(|err| format!("expected a JSON Schema, but the file is not valid JSON: {err}"))?;
    jsonschema::validator_for(&schema)
        .map_err(|err| format!("expected a valid JSON Schema: {err}"))?;
    Ok(schema)
}

fn validate_agent_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_AGENT_ID_LEN || id.chars().any(char::is_control) {
        Err(format!(
            "expected a name of 1 to {MAX_AGENT_ID_LEN} characters without control characters"
        ))
    } else {
        Ok(())
    }
}

/// `/etc/hostname`, else `HOSTNAME` / `COMPUTERNAME`, else `estafeta`.
fn default_agent_id(env: &BTreeMap<String, String>) -> String {
    let from_file = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_owned());
    from_file
        .into_iter()
        .chain(
            ["HOSTNAME", "COMPUTERNAME"]
                .iter()
                .filter_map(|k| env.get(*k).map(|v| v.trim().to_owned())),
        )
        .find(|name| validate_agent_id(name).is_ok())
        .unwrap_or_else(|| DEFAULT_AGENT_ID.to_owned())
}

/// `LOG_LEVEL`: a level (`info`) or tracing directives (`info,estafeta=debug`).
fn validate_log_level(text: &str) -> Result<(), String> {
    const LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];
    const EXPECTED: &str = "expected trace, debug, info, warn, error or off, or directives such as info,estafeta=debug";
    for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = match directive.rsplit_once('=') {
            Some((_, level)) => level,
            // A bare word is a level unless it is clearly a target path.
            None if directive.contains("::") || directive.contains('[') => continue,
            None => directive,
        };
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(EXPECTED.into());
        }
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(text)
        .map(|_| ())
        .map_err(|err| format!("{EXPECTED} ({err})"))
}

fn invalid_reason(err: estafeta_staging::StageError) -> String {
    match err {
        estafeta_staging::StageError::Invalid(reason) => format!("expected a valid name: {reason}"),
        other => other.to_string(),
    }
}

fn io_reason(err: &dotenvy::Error) -> String {
    match err {
        dotenvy::Error::Io(io) => io.to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_accept_bytes_and_suffixes() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1.5 kib"), Ok(1536));
        assert_eq!(parse_size("10_000"), Ok(10_000));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("MB").is_err());
        assert!(parse_size("-1").is_err());
    }

    #[test]
    fn booleans_accept_the_usual_spellings() {
        for yes in ["true", "TRUE", "1", "yes", "On"] {
            assert_eq!(parse_bool(yes), Ok(true), "{yes}");
        }
        for no in ["false", "False", "0", "no", "OFF"] {
            assert_eq!(parse_bool(no), Ok(false), "{no}");
        }
        assert!(parse_bool("sim").is_err());
    }

    #[test]
    fn crontab_takes_five_or_six_fields() {
        assert!(validate_crontab("*/5 * * * *").is_ok());
        assert!(validate_crontab("0 */5 * * * *").is_ok());
        assert!(validate_crontab("@hourly").is_ok());
        assert_eq!(
            validate_crontab("*/5 * *"),
            Err("expected 5 cron fields (or 6 with seconds), found 3".to_string())
        );
        assert!(validate_crontab("61 * * * *").is_err());
    }

    #[test]
    fn expand_reads_variables_and_names_the_missing_one() {
        let vars = BTreeMap::from([("A".to_string(), "x".to_string())]);
        assert_eq!(expand("pre-${A}-post", &vars), Ok("pre-x-post".to_string()));
        let err = expand("${MISSING}", &vars).expect_err("unset variable");
        assert!(err.contains("MISSING"), "{err}");
        assert!(expand("${A", &vars).is_err());
    }

    #[test]
    fn unquoted_values_with_spaces_are_read_like_python_dotenv() {
        let text = "CRONTAB=*/5 * * * * # every five minutes\nexport TZ= UTC\nA=\"multi\nB=not a key\"\nC=plain\n# D=a b\n";
        assert_eq!(
            quote_unquoted_spaces(text),
            "CRONTAB='*/5 * * * *'\nexport TZ= UTC\nA=\"multi\nB=not a key\"\nC=plain\n# D=a b\n"
        );
        let parsed: BTreeMap<String, String> = dotenvy::from_read_iter(std::io::Cursor::new(
            quote_unquoted_spaces(text).into_bytes(),
        ))
        .collect::<Result<_, _>>()
        .expect("the quoted text parses");
        assert_eq!(parsed["CRONTAB"], "*/5 * * * *");
        assert_eq!(parsed["A"], "multi\nB=not a key");
        assert_eq!(parsed["TZ"], "UTC");
    }

    #[test]
    fn tz_accepts_names_and_local_paths() {
        use crate::timezone::Zone;
        assert_eq!(parse_tz("UTC"), Ok(Zone::named("UTC")));
        assert_eq!(
            parse_tz(":/usr/share/zoneinfo/America/Sao_Paulo"),
            Ok(Zone::named("America/Sao_Paulo"))
        );
        assert!(Zone::named("America/Sao_Paulo").is_some());
        assert_eq!(parse_tz(":/etc/localtime"), Ok(None));
        assert!(parse_tz("Mars/Olympus").is_err());
    }

    #[test]
    fn log_levels_are_checked() {
        assert!(validate_log_level("info").is_ok());
        assert!(validate_log_level("warn,estafeta=debug").is_ok());
        assert!(validate_log_level("verbose").is_err());
        assert!(validate_log_level("estafeta=loud").is_err());
    }

    #[test]
    fn problems_quote_values_with_spaces() {
        let p = Problem::new("CRONTAB", Some("*/5 * *".into()), "expected 5");
        assert_eq!(p.to_string(), "CRONTAB=\"*/5 * *\": expected 5");
        let p = Problem::sentence("INGEST_ADDR", "0.0.0.0:8787".into(), "listens");
        assert_eq!(p.to_string(), "INGEST_ADDR=0.0.0.0:8787 listens");
    }
}
