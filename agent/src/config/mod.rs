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
//!
//! The parts: [`keys`] is the table of flat keys (defaults, secrecy, docs); `loader` gathers and
//! parses them; `env` reads `.env`; `file` reads the TOML file; `sinks` and `nats` build the sink
//! configurations; `parse` and `checks` judge single values; `show` is `check-config`'s view.
//! Sinks, sources and updates own their configuration types; this module only fills them in.

mod checks;
mod env;
mod file;
pub mod keys;
mod loader;
mod nats;
mod parse;
mod raw;
pub mod relay;
mod show;
mod sinks;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use self::checks::{ingest_exposure_problem, ingest_plaintext_problem};
pub use self::keys::{
    DEFAULT_AGENT_ID, DEFAULT_API_CONCURRENCY, DEFAULT_API_TIMEOUT_SECS, DEFAULT_BATCH_SIZE,
    DEFAULT_CREATE_STREAM, DEFAULT_CRONTAB, DEFAULT_DATABASE_URL, DEFAULT_DRY_RUN,
    DEFAULT_FLUSH_ON_WRITE, DEFAULT_HEARTBEAT_SECS, DEFAULT_INGEST_ADDR,
    DEFAULT_INGEST_BODY_TIMEOUT_SECS, DEFAULT_IS_ABSOLUTE_STAGING_AREA_PATH,
    DEFAULT_KEEP_DELIVERED_DAYS, DEFAULT_LOG_LEVEL, DEFAULT_LOG_RETENTION_DAYS,
    DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_RECORDS, DEFAULT_RETRY_BASE_SECS, DEFAULT_RETRY_MAX_SECS,
    DEFAULT_SHUTDOWN_GRACE_SECS, DEFAULT_STAGING_AREA_PATH, DEFAULT_UPDATE_ALLOW_HTTP,
    DEFAULT_VERIFY_TLS, KEY_TABLE, KEYS, MAX_AGENT_ID_LEN, MAX_CONCURRENCY, MIN_INGEST_TOKEN_CHARS,
};
pub use self::parse::{parse_bool, parse_size};
use self::raw::Loader;
pub use crate::crontab::validate_crontab;
pub use crate::problem::Problem;
pub use crate::sinks::{SinkConfig, SinkKind};

/// Name of the sink `CENTRAL_DATABASE_URL` defines (and of the embedded default).
pub const DATABASE_SINK: &str = "database";
/// Name of the sink `CENTRAL_API_URL` defines.
pub const API_SINK: &str = "api";
/// Name of the sink `CENTRAL_NATS_URL` defines.
pub const NATS_SINK: &str = "nats";
/// Payload field holding the record key when the entity names none.
pub use crate::intake::rules::{DEFAULT_KEY_FIELD, EntityConfig, Route, Rules};

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
    /// `STAGING_KEY_FILE`: the key file that seals the staging folder; `None`: no encryption.
    pub staging_key_file: Option<PathBuf>,
    /// Its keys, read when the configuration is loaded (a key file that cannot be used is a
    /// configuration problem, reported with the others).
    pub staging_keys: Option<std::sync::Arc<estafeta_staging::Keyring>>,
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
    /// `INGEST_TLS_CERT` and `INGEST_TLS_KEY`: the API is served over HTTPS only.
    pub ingest_tls: Option<IngestTls>,
    /// `INGEST_ALLOW_PLAINTEXT`: a non-loopback `INGEST_ADDR` may serve clear HTTP.
    pub ingest_allow_plaintext: bool,
    /// `FLUSH_ON_WRITE`: deliver right after staging, without waiting for the tick.
    pub flush_on_write: bool,
    /// `MAX_RECORDS`: records per flush cycle and sink.
    pub max_records: usize,
    /// `BATCH_SIZE`: records per batch handed to an HTTP or NATS sink.
    pub batch_size: usize,
    /// `DATABASE_BATCH_SIZE`: records per batch handed to a database sink (one transaction).
    pub database_batch_size: usize,
    /// `DRY_RUN`: build and log every request, deliver nothing, keep everything pending.
    pub dry_run: bool,
    /// `RETRY_BASE_SECS` / `RETRY_MAX_SECS`: exponential backoff bounds.
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// `SHUTDOWN_GRACE_SECS`: how long a stop waits for the flush in flight.
    pub shutdown_grace: Duration,
    /// `AGENT_ID`: this agent's name in the central tables (default: the host name).
    pub agent_id: String,
    /// This machine's name for heartbeats (`/etc/hostname`, `HOSTNAME`, `COMPUTERNAME`;
    /// `unknown`), read with the rest of the configuration.
    pub hostname: String,
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
    /// `RELAY_*`: `estafeta relay`'s own settings (the agent ignores them).
    pub relay: relay::RelaySettings,
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
            .field("staging_key_file", &self.staging_key_file)
            .field("inbox_path", &self.inbox_path)
            .field("staging_max_bytes", &self.staging_max_bytes)
            .field("staging_min_free_bytes", &self.staging_min_free_bytes)
            .field("keep_delivered", &self.keep_delivered)
            .field("ingest_addr", &self.ingest_addr)
            .field("ingest_token", &self.ingest_token.as_ref().map(|_| "***"))
            .field("ingest_allowed_hosts", &self.ingest_allowed_hosts)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("ingest_body_timeout", &self.ingest_body_timeout)
            .field("ingest_tls", &self.ingest_tls)
            .field("ingest_allow_plaintext", &self.ingest_allow_plaintext)
            .field("flush_on_write", &self.flush_on_write)
            .field("max_records", &self.max_records)
            .field("batch_size", &self.batch_size)
            .field("database_batch_size", &self.database_batch_size)
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

/// The ingest API's certificate chain and key (`INGEST_TLS_CERT`, `INGEST_TLS_KEY`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestTls {
    pub cert: PathBuf,
    pub key: PathBuf,
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

    /// The `max_attempts` of sink `name`: after that many transient failures of a record
    /// (counted by the store), it becomes a dead letter. `None`: retry forever.
    pub fn max_attempts(&self, name: &str) -> Option<u32> {
        self.sinks
            .iter()
            .find(|s| s.name == name)
            .and_then(|s| s.max_attempts)
    }

    /// Sink names, in configuration order.
    pub fn sink_names(&self) -> Vec<String> {
        self.sinks.iter().map(|s| s.name.clone()).collect()
    }

    /// What the update steps need of the configuration.
    pub fn update_context(&self) -> crate::update::Context {
        crate::update::Context {
            update: self.update.clone(),
            staging_path: self.staging_path.clone(),
            tz: self.tz.clone(),
            ingest_addr: self.ingest_addr,
            ingest_token: self.ingest_token.clone(),
            ingest_tls_cert: self.ingest_tls.as_ref().map(|tls| tls.cert.clone()),
            shutdown_grace: self.shutdown_grace,
        }
    }

    /// What the intake needs of the configuration: routes, entities and the sinks' names.
    pub fn rules(&self) -> Rules {
        Rules {
            routes: self.routes.clone(),
            entities: self.entities.clone(),
            sinks: self.sink_names(),
        }
    }

    /// The sinks the records of (action, entity) go to: the first matching route's, else all.
    pub fn route(&self, action: &str, entity: &str) -> Vec<String> {
        self.rules().route(action, entity)
    }

    /// The payload field holding the record key of `entity` (default `id`).
    pub fn key_field(&self, entity: &str) -> &str {
        crate::intake::rules::key_field(&self.entities, entity)
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
        options.keys = self.staging_keys.clone();
        options
    }

    /// A configuration for tests, built in code: staging in `staging_dir`, no sinks, the
    /// ingest API on a free loopback port without token, small limits (4 KiB bodies, batches of
    /// 100), a schedule that practically never fires (so deliveries happen only when a test
    /// asks), no heartbeats. Tests change the fields they are about.
    pub fn for_tests(staging_dir: &Path) -> Config {
        Config {
            sources: vec!["test".into()],
            crontab: "0 0 1 1 *".into(),
            tz: None,
            staging_path: staging_dir.to_path_buf(),
            failed_dir: None,
            staging_key_file: None,
            staging_keys: None,
            inbox_path: None,
            staging_max_bytes: None,
            staging_min_free_bytes: 0,
            keep_delivered: Duration::ZERO,
            ingest_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            ingest_token: None,
            ingest_allowed_hosts: Vec::new(),
            max_body_bytes: 4096,
            ingest_body_timeout: Duration::from_secs(DEFAULT_INGEST_BODY_TIMEOUT_SECS),
            ingest_tls: None,
            ingest_allow_plaintext: false,
            flush_on_write: DEFAULT_FLUSH_ON_WRITE,
            max_records: 1000,
            batch_size: 100,
            database_batch_size: 100,
            dry_run: false,
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(5),
            agent_id: "test-agent".into(),
            hostname: "test-host".into(),
            heartbeat: Duration::ZERO,
            log_dir: None,
            log_retention_days: DEFAULT_LOG_RETENTION_DAYS,
            log_level: DEFAULT_LOG_LEVEL.into(),
            sinks: Vec::new(),
            routes: Vec::new(),
            entities: BTreeMap::new(),
            sql_sources: Vec::new(),
            update: Default::default(),
            relay: Default::default(),
        }
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
