//! THE table of flat configuration keys: for each key its name, its section, its default (as
//! people see it), whether its value is secret, and one line of docs. Everything that lists keys
//! reads this table: the unknown-key check of the TOML `[agent]` table, `check-config`'s
//! defaults and redaction, and the test that holds `.env.example`, the README's configuration
//! table and the installers' env files to it. Each default is written once, as a constant here
//! (or in the module that owns the setting) that both the parser and the table use.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use crate::redact::url as redact_url;

/// Default `INGEST_ADDR`: loopback only.
pub const DEFAULT_INGEST_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8787));
/// Default `CRONTAB`: every minute.
pub const DEFAULT_CRONTAB: &str = "* * * * *";
/// Default `IS_ABSOLUTE_STAGING_AREA_PATH`: a relative staging path is taken from the working
/// directory.
pub const DEFAULT_IS_ABSOLUTE_STAGING_AREA_PATH: bool = false;
/// Default `KEEP_DELIVERED_DAYS`: delivered records are deleted at once.
pub const DEFAULT_KEEP_DELIVERED_DAYS: u64 = 0;
/// Default largest request body, in bytes: 10 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 10 * 1024 * 1024;
/// `INGEST_BODY_TIMEOUT_SECS` default: how long a client may take to send its request body.
pub const DEFAULT_INGEST_BODY_TIMEOUT_SECS: u64 = 30;
/// Shortest `INGEST_TOKEN` accepted, in characters, when `INGEST_ADDR` is not a loopback address
/// (the token is then all that stands between the network and the records).
pub const MIN_INGEST_TOKEN_CHARS: usize = 32;
/// Default `INGEST_ALLOW_PLAINTEXT`: a non-loopback `INGEST_ADDR` needs `INGEST_TLS_CERT`.
pub const DEFAULT_INGEST_ALLOW_PLAINTEXT: bool = false;
/// Default `FLUSH_ON_WRITE`: deliver right after a write.
pub const DEFAULT_FLUSH_ON_WRITE: bool = true;
/// Default records per flush cycle and sink.
pub const DEFAULT_MAX_RECORDS: usize = 100_000;
/// Default records per batch handed to a sink.
pub const DEFAULT_BATCH_SIZE: usize = 500;
/// Records a database sink takes at once: larger than [`DEFAULT_BATCH_SIZE`], because a
/// database applies a batch in one transaction whose cost barely grows with its rows (a drain of
/// 200,000 records to PostgreSQL: 15,000–17,000 records/s with batches of 500, 34,000–35,000
/// with 2,000, BENCHMARKS.md), while HTTP and NATS batches stay small: an API that answers slowly
/// must not hold a large lease for minutes.
pub const DEFAULT_DATABASE_BATCH_SIZE: usize = 2000;
/// Default `DRY_RUN`: deliver for real.
pub const DEFAULT_DRY_RUN: bool = false;
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
/// Default `HEARTBEAT_SECS`: how often the agent reports its state to the sinks that take
/// heartbeats.
pub const DEFAULT_HEARTBEAT_SECS: u64 = 60;
/// Default HTTP request timeout, in seconds.
pub const DEFAULT_API_TIMEOUT_SECS: u64 = 10;
/// Default `CENTRAL_API_VERIFY_TLS` (and `verify_tls` of an HTTP sink): check certificates.
pub const DEFAULT_VERIFY_TLS: bool = true;
/// Default records of different keys an HTTP sink sends at once.
pub const DEFAULT_API_CONCURRENCY: usize = 8;
/// Largest accepted HTTP sink concurrency.
pub const MAX_CONCURRENCY: usize = 1024;
/// Default `CENTRAL_NATS_CREATE_STREAM` (and `create_stream` of a NATS sink): the stream must
/// exist.
pub const DEFAULT_CREATE_STREAM: bool = false;
/// Default `UPDATE_ALLOW_HTTP`: a clear-text update URL to another machine is refused.
pub const DEFAULT_UPDATE_ALLOW_HTTP: bool = false;
/// Default `RELAY_ADDR`: `/metrics` and `/healthz` on loopback.
pub const DEFAULT_RELAY_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8788));
/// Default `RELAY_BATCH`: messages one partition fetches, writes in one go and acknowledges.
pub const DEFAULT_RELAY_BATCH: u64 = 256;
/// Largest `RELAY_BATCH` (JetStream's own cap on a pull request is far above; this bounds
/// the relay's memory per partition).
pub const MAX_RELAY_BATCH: usize = 10_000;
/// Default `RELAY_ACK_WAIT_SECS`.
pub const DEFAULT_RELAY_ACK_WAIT_SECS: u64 = 30;
/// Default `RELAY_CONSUMER`: the durable consumers are `<this>` (no partitions) or
/// `<this>-p<k>`.
pub const DEFAULT_RELAY_CONSUMER: &str = "estafeta-relay";
/// Default `RELAY_DEAD_LETTER_DIR`, relative to the working directory.
pub const DEFAULT_RELAY_DEAD_LETTER_DIR: &str = "relay-dead-letters";

/// `AGENT_ID` when the host name cannot be found.
pub const DEFAULT_AGENT_ID: &str = "estafeta";
/// Longest accepted `AGENT_ID`, in bytes.
pub const MAX_AGENT_ID_LEN: usize = 128;

/// The part of `.env.example` (and of `check-config`'s reading) a key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Batcher,
    Staging,
    Ingest,
    Delivery,
    Logs,
    CentralDatabase,
    CentralApi,
    CentralNats,
    Update,
    ConfigFile,
    /// `estafeta relay` (the central-side consumer).
    Relay,
}

/// A key's value when it is not set, as people see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultValue {
    /// No value; the text says what that means (`(none)`, `(local time)`, …).
    Unset(&'static str),
    /// No value, and then `url` stands in when no sink is configured anywhere.
    WhenNoSink(&'static str),
    Text(&'static str),
    Flag(bool),
    Number(u64),
    /// A size in bytes: written in MiB in the example files when it is a whole number of them.
    Bytes(u64),
    Addr(SocketAddr),
}

impl DefaultValue {
    /// The value as written after `KEY=` in `.env.example` and the installers' env files
    /// (quoted when it holds spaces; empty when there is none).
    pub fn env_line_value(&self) -> String {
        match self.value() {
            Some(value) if value.contains(char::is_whitespace) => format!("\"{value}\""),
            Some(value) => value,
            None => String::new(),
        }
    }

    /// The value a user would write for the default, when there is one (`10MiB`, `true`).
    pub fn value(&self) -> Option<String> {
        match *self {
            DefaultValue::Unset(_) | DefaultValue::WhenNoSink(_) => None,
            DefaultValue::Text(text) => Some(text.to_owned()),
            DefaultValue::Flag(flag) => Some(flag.to_string()),
            DefaultValue::Number(n) => Some(n.to_string()),
            DefaultValue::Bytes(bytes) if bytes > 0 && bytes % (1 << 20) == 0 => {
                Some(format!("{}MiB", bytes >> 20))
            }
            DefaultValue::Bytes(bytes) => Some(bytes.to_string()),
            DefaultValue::Addr(addr) => Some(addr.to_string()),
        }
    }

    /// What `check-config` shows for the key when it is not set (sizes in bytes).
    pub fn shown(&self) -> String {
        match *self {
            DefaultValue::Unset(meaning) => meaning.to_owned(),
            DefaultValue::WhenNoSink(url) => format!("({url} when no sink is configured)"),
            DefaultValue::Bytes(bytes) => bytes.to_string(),
            _ => self.value().unwrap_or_default(),
        }
    }
}

/// How a key's value may be shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrecy {
    Plain,
    /// A URL: shown with its password hidden.
    Url,
    /// Never shown: `***`.
    Secret,
}

/// One flat key.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    pub name: &'static str,
    pub section: Section,
    pub default: DefaultValue,
    pub secrecy: Secrecy,
    /// One line saying what the key does.
    pub doc: &'static str,
}

const fn key(
    name: &'static str,
    section: Section,
    default: DefaultValue,
    doc: &'static str,
) -> Key {
    Key {
        name,
        section,
        default,
        secrecy: Secrecy::Plain,
        doc,
    }
}

impl Key {
    const fn secret(mut self) -> Key {
        self.secrecy = Secrecy::Secret;
        self
    }

    const fn url(mut self) -> Key {
        self.secrecy = Secrecy::Url;
        self
    }
}

use DefaultValue::{Addr, Bytes, Flag, Number, Text, Unset, WhenNoSink};
use Section::*;

const NOT_SET: DefaultValue = Unset("(not set)");

/// Every flat key, in the order `check-config` lists them. One line per key, so it reads as a
/// table.
#[rustfmt::skip]
pub const KEY_TABLE: &[Key] = &[
    key("CRONTAB", Batcher, Text(DEFAULT_CRONTAB), "Schedule of the batch delivery: 5 cron fields, or 6 with seconds first, or @hourly."),
    key("TZ", Batcher, Unset("(local time)"), "IANA time zone CRONTAB is read in; empty: the machine's local time."),
    key("STAGING_AREA_PATH", Staging, Text(DEFAULT_STAGING_AREA_PATH), "Folder where every write is kept until delivered."),
    key("IS_ABSOLUTE_STAGING_AREA_PATH", Staging, Flag(DEFAULT_IS_ABSOLUTE_STAGING_AREA_PATH), "true: STAGING_AREA_PATH must be a full path; false: relative to the working directory."),
    key("FAILED_DIR", Staging, Unset("(<staging>/_failed)"), "Dead letters (records a sink refused for good)."),
    key("STAGING_KEY_FILE", Staging, Unset("(no encryption)"), "Key file (`estafeta key generate`): seals everything staged from then on (AES-256-GCM)."),
    key("INBOX_PATH", Staging, Unset("(none)"), "Drop folder other programs write into, in the staging layout."),
    key("STAGING_MAX_BYTES", Staging, Unset("(no limit)"), "Largest total size of staged records."),
    key("STAGING_MIN_FREE_BYTES", Staging, Bytes(estafeta_staging::DEFAULT_MIN_FREE_BYTES), "MIN_FREE_DISK_MB in any unit; set only one of the two."),
    key("MIN_FREE_DISK_MB", Staging, Number(estafeta_staging::DEFAULT_MIN_FREE_BYTES >> 20), "Refuse new writes (HTTP 507) below this free disk space, in MiB."),
    key("KEEP_DELIVERED_DAYS", Staging, Number(DEFAULT_KEEP_DELIVERED_DAYS), "Keep delivered records on disk this many days."),
    key("INGEST_ADDR", Ingest, Addr(DEFAULT_INGEST_ADDR), "Address the ingest API listens on; beyond loopback it needs INGEST_TOKEN."),
    key("INGEST_TOKEN", Ingest, NOT_SET, "Bearer token clients must send.").secret(),
    key("INGEST_TOKEN_FILE", Ingest, NOT_SET, "A file holding the ingest token instead (one line)."),
    key("INGEST_ALLOWED_HOSTS", Ingest, Unset("(none)"), "Host names the API answers to besides localhost and INGEST_ADDR."),
    key("MAX_BODY_BYTES", Ingest, Bytes(DEFAULT_MAX_BODY_BYTES as u64), "Largest request body accepted (HTTP 413 above it)."),
    key("INGEST_BODY_TIMEOUT_SECS", Ingest, Number(DEFAULT_INGEST_BODY_TIMEOUT_SECS), "Seconds a client may take to send a request body (HTTP 408 after)."),
    key("INGEST_TLS_CERT", Ingest, NOT_SET, "Certificate chain (PEM) of the ingest API: with INGEST_TLS_KEY it is served over HTTPS only."),
    key("INGEST_TLS_KEY", Ingest, NOT_SET, "Private key (PEM) of INGEST_TLS_CERT."),
    key("INGEST_ALLOW_PLAINTEXT", Ingest, Flag(DEFAULT_INGEST_ALLOW_PLAINTEXT), "true: allow a non-loopback INGEST_ADDR without TLS (records and token cross the network in clear)."),
    key("FLUSH_ON_WRITE", Delivery, Flag(DEFAULT_FLUSH_ON_WRITE), "Deliver right after a write instead of waiting for the next tick."),
    key("MAX_RECORDS", Delivery, Number(DEFAULT_MAX_RECORDS as u64), "Records per flush cycle and sink."),
    key("BATCH_SIZE", Delivery, Number(DEFAULT_BATCH_SIZE as u64), "Records handed to an HTTP or NATS sink at once."),
    key("DATABASE_BATCH_SIZE", Delivery, Number(DEFAULT_DATABASE_BATCH_SIZE as u64), "Records handed to a database sink at once (one transaction)."),
    key("DRY_RUN", Delivery, Flag(DEFAULT_DRY_RUN), "Build and log every request, deliver nothing, keep everything pending."),
    key("RETRY_BASE_SECS", Delivery, Number(DEFAULT_RETRY_BASE_SECS), "First retry delay, in seconds."),
    key("RETRY_MAX_SECS", Delivery, Number(DEFAULT_RETRY_MAX_SECS), "Longest retry delay, in seconds."),
    key("SHUTDOWN_GRACE_SECS", Delivery, Number(DEFAULT_SHUTDOWN_GRACE_SECS), "How long a stop waits for the flush in flight."),
    key("AGENT_ID", Delivery, Unset("(the host name)"), "This agent's name in the central tables."),
    key("HEARTBEAT_SECS", Delivery, Number(DEFAULT_HEARTBEAT_SECS), "How often the agent reports its state to the sinks that take heartbeats; 0: never."),
    key("LOG_DIR", Logs, Unset("(stderr only)"), "Folder for daily log files."),
    key("LOG_RETENTION_DAYS", Logs, Number(DEFAULT_LOG_RETENTION_DAYS), "Daily log files kept in LOG_DIR; 0: all."),
    key("LOG_LEVEL", Logs, Text(DEFAULT_LOG_LEVEL), "A level, or tracing directives such as info,estafeta=debug."),
    key("CENTRAL_DATABASE_URL", CentralDatabase, WhenNoSink(DEFAULT_DATABASE_URL), "The database sink: postgres://, mysql:// or sqlite:// URL.").url(),
    key("CENTRAL_DATABASE_IDEMPOTENCY_KEY", CentralDatabase, Unset("(the record's id)"), "Template of the landing table's unique key, such as sol-{payload.CodSolicitacao}: a record staged again under the same business key lands once."),
    key("CENTRAL_DATABASE_MAX_ATTEMPTS", CentralDatabase, Unset("(retry forever)"), "After this many transient failures a record of the database sink becomes a dead letter (\"gave up after N attempts: …\"); unset: retry forever."),
    key("CENTRAL_API_URL", CentralApi, NOT_SET, "The api sink's base URL.").url(),
    key("CENTRAL_API_TOKEN", CentralApi, NOT_SET, "Sent to the API as Authorization: Bearer <token>.").secret(),
    key("CENTRAL_API_TIMEOUT_SECS", CentralApi, Number(DEFAULT_API_TIMEOUT_SECS), "Timeout of each API request."),
    key("CENTRAL_API_VERIFY_TLS", CentralApi, Flag(DEFAULT_VERIFY_TLS), "false accepts any certificate (tests only)."),
    key("CENTRAL_API_CA_FILE", CentralApi, NOT_SET, "Extra CA certificate (PEM) to trust."),
    key("CENTRAL_API_CONCURRENCY", CentralApi, Number(DEFAULT_API_CONCURRENCY as u64), "Requests in flight at once, each for a different key; a key's records go one after another."),
    key("CENTRAL_API_IDEMPOTENCY_KEY", CentralApi, Unset("(the record's id)"), "Template of the Idempotency-Key header, such as sol-{payload.CodSolicitacao}: a record staged again under the same business key is a resend to the API."),
    key("CENTRAL_API_HEARTBEAT_PATH", CentralApi, NOT_SET, "Where heartbeats go: PUT {CENTRAL_API_URL}{path}."),
    key("CENTRAL_API_MAX_ATTEMPTS", CentralApi, Unset("(retry forever)"), "After this many transient failures a record of the api sink becomes a dead letter (\"gave up after N attempts: …\"); unset: retry forever."),
    key("CENTRAL_NATS_URL", CentralNats, NOT_SET, "The nats sink: nats:// or tls:// URL of a JetStream server; several comma-separated for a cluster.").url(),
    key("CENTRAL_NATS_TOKEN", CentralNats, NOT_SET, "NATS token authentication.").secret(),
    key("CENTRAL_NATS_SUBJECT", CentralNats, Text(crate::sinks::nats::DEFAULT_SUBJECT), "Subject template: {entity}, {action}, {agent}."),
    key("CENTRAL_NATS_TIMEOUT_SECS", CentralNats, Number(crate::sinks::nats::DEFAULT_NATS_TIMEOUT_SECS), "Connection timeout and the wait for each publish acknowledgement."),
    key("CENTRAL_NATS_CREATE_STREAM", CentralNats, Flag(DEFAULT_CREATE_STREAM), "true: create CENTRAL_NATS_STREAM if it does not exist."),
    key("CENTRAL_NATS_STREAM", CentralNats, Text(crate::sinks::nats::DEFAULT_STREAM), "Name of the stream CENTRAL_NATS_CREATE_STREAM creates."),
    key("CENTRAL_NATS_TLS_REQUIRED", CentralNats, Unset("(true beyond loopback)"), "true: TLS (verified) even on nats://, whatever the server says; false beyond loopback logs a WARN."),
    key("CENTRAL_NATS_CA_FILE", CentralNats, NOT_SET, "CA certificate(s) (PEM) that alone are trusted for the NATS server; unset: the system's store and bundled roots."),
    key("CENTRAL_NATS_CLIENT_CERT", CentralNats, NOT_SET, "Client certificate (PEM) for servers that verify clients (mTLS); needs CENTRAL_NATS_CLIENT_KEY."),
    key("CENTRAL_NATS_CLIENT_KEY", CentralNats, NOT_SET, "Private key (PEM) of CENTRAL_NATS_CLIENT_CERT."),
    key("CENTRAL_NATS_CREDS_FILE", CentralNats, NOT_SET, "A .creds file (user JWT and NKey seed) to authenticate with."),
    key("CENTRAL_NATS_NKEY_FILE", CentralNats, NOT_SET, "A file holding a user NKey seed (SU...) to authenticate with."),
    key("CENTRAL_NATS_PARTITIONS", CentralNats, Number(0), "0: subjects as the template says; N: one more token .p0 to .p(N-1) by a hash of the record's key, for relays sharing the stream (the relays' CENTRAL_NATS_PARTITIONS must be the same)."),
    key("CENTRAL_NATS_MAX_ATTEMPTS", CentralNats, Unset("(retry forever)"), "After this many transient failures a record of the nats sink becomes a dead letter (\"gave up after N attempts: …\"); unset: retry forever."),
    key("UPDATE_URL", Update, Unset("(updates off)"), "Release manifest URL; empty: updates off.").url(),
    key("UPDATE_CRONTAB", Update, Unset("(no automatic checks)"), "When the running agent checks UPDATE_URL."),
    key("UPDATE_PUBLIC_KEY", Update, Unset("(none: updates are refused)"), "ed25519 public key(s) release archives are signed with."),
    key("UPDATE_HEALTH_SECS", Update, Number(crate::update::DEFAULT_HEALTH_SECS), "Seconds a new version has to report ready before it is rolled back."),
    key("UPDATE_ALLOW_HTTP", Update, Flag(DEFAULT_UPDATE_ALLOW_HTTP), "true: accept a clear-text http:// UPDATE_URL to another machine."),
    key("UPDATE_CA_FILE", Update, NOT_SET, "Extra CA certificate(s) trusted for update downloads."),
    key("CONFIG_FILE", ConfigFile, NOT_SET, "TOML file with several sinks, routes and per-entity settings."),
    key("RELAY_ADDR", Relay, Addr(DEFAULT_RELAY_ADDR), "estafeta relay: address of its /metrics (estafeta_relay_*) and /healthz."),
    key("RELAY_BATCH", Relay, Number(DEFAULT_RELAY_BATCH), "estafeta relay: messages a partition fetches, writes in one go and acknowledges after the commit (also max_ack_pending)."),
    key("RELAY_ACK_WAIT_SECS", Relay, Number(DEFAULT_RELAY_ACK_WAIT_SECS), "estafeta relay: JetStream redelivers a message a relay has not acknowledged in this time (a dead relay's batch)."),
    key("RELAY_CONSUMER", Relay, Text(DEFAULT_RELAY_CONSUMER), "estafeta relay: name of the durable consumers (NAME, or NAME-p<k> per partition)."),
    key("RELAY_PARTITIONS", Relay, Unset("(all of CENTRAL_NATS_PARTITIONS)"), "estafeta relay: the partitions this relay consumes, such as 0-3 or 0,2; --partitions overrides."),
    key("RELAY_DEAD_LETTER_DIR", Relay, Text(DEFAULT_RELAY_DEAD_LETTER_DIR), "estafeta relay: folder of the messages the database refused for good (one JSON file each, with the reason)."),
];

/// One key of a `[[sources]]` block in the TOML file (no environment variable sets these).
#[derive(Debug, Clone, Copy)]
pub struct SourceKey {
    pub name: &'static str,
    /// The default as people see it.
    pub default: &'static str,
    pub doc: &'static str,
}

const fn source_key(name: &'static str, default: &'static str, doc: &'static str) -> SourceKey {
    SourceKey { name, default, doc }
}

/// Every key of a `[[sources]]` block, in the order the README's source table lists them. A
/// test holds it to the keys the TOML parser accepts.
#[rustfmt::skip]
pub const SOURCE_KEY_TABLE: &[SourceKey] = &[
    source_key("name", "(required)", "The source's name, [a-z0-9_-]; its checkpoint is kept under it."),
    source_key("url", "(required)", "postgres://, mysql:// (MariaDB too), sqlite:// or odbc:<connection string>."),
    source_key("query", "(required)", "The SELECT, a .sql file relative to the TOML file's folder."),
    source_key("schedule", "(one of schedule or every)", "Cron expression, read in TZ like CRONTAB."),
    source_key("every", "(one of schedule or every)", "Interval between cycles: \"10s\", \"500ms\", \"5m\", \"1h\" or hh:mm:ss (\"00:00:05\")."),
    source_key("enabled", "true", "false keeps the source configured but not run."),
    source_key("max_records", "(no cap)", "Most rows one cycle reads (seed 004's MaxRecords); the rest waits for the next cycle."),
    source_key("page_size", "max_records, else 1000", "Rows per query (:limit); a cycle reads pages while they come back full, up to max_records."),
    source_key("entity", "(required)", "Entity of the records made from the rows."),
    source_key("action", "(one of action or action_column)", "create, update, upsert or delete."),
    source_key("action_column", "(one of action or action_column)", "Column whose value is each row's action."),
    source_key("key", "(none)", "Column whose value is the record key (per-key order)."),
    source_key("checkpoint", "(required)", "Column (or columns) the query sorts by: \"id\" or [\"updated_at\", \"id\"]."),
    source_key("debounce", "(none)", "With debounce_column: rows younger than this wait (\"00:01:00\", \"60s\")."),
    source_key("debounce_secs", "(none)", "The same as debounce, in whole seconds."),
    source_key("debounce_column", "(none)", "Timestamp column saying when a row was written."),
    source_key("time_zone", "UTC", "IANA zone in which times without a zone (timestamp, DATETIME) were written, such as America/Sao_Paulo."),
    source_key("group_by", "(none)", "Consecutive rows sharing this column become one record."),
    source_key("items", "items", "Name of a group's array of rows."),
    source_key("after_stage", "(none)", "A .sql statement run once per row after its page is staged, with the row's columns as :<column> (marks queue rows taken; must be idempotent)."),
    source_key("params", "(none)", "Constant query parameters, such as { dias_sem_transito = 30 }, bound as :dias_sem_transito (as text: cast where a number is needed)."),
    source_key("each", "(none)", "Makes the block a template: one source per item, each item's {variables} filled in and bound as :<variable>."),
    source_key("maps", "(none)", "Mapping files for enrich, { exames = \"tests_map.json\" } (JSON objects of codes, relative to the TOML file, read at start)."),
    source_key("catalogs", "(none)", "Catalogs an API serves for enrich: { tests = { url = \"https://…/tests\", key = \"supportTestId\", token_env = \"API_TOKEN\", ttl_secs = 3600 } }."),
    source_key("enrich", "(none)", "Columns added to each row before it becomes a record: { column = \"{{ map('exames', row.codigo) }}\" }; a code with no mapping sets the row aside."),
];

const KEY_COUNT: usize = KEY_TABLE.len();

const fn key_names() -> [&'static str; KEY_COUNT] {
    let mut names = [""; KEY_COUNT];
    let mut i = 0;
    while i < KEY_COUNT {
        names[i] = KEY_TABLE[i].name;
        i += 1;
    }
    names
}

const KEY_NAMES: [&str; KEY_COUNT] = key_names();

/// Every flat key's name, in the table's order.
pub const KEYS: &[&str] = &KEY_NAMES;

/// The table's entry for `name`.
pub fn find(name: &str) -> Option<&'static Key> {
    KEY_TABLE.iter().find(|key| key.name == name)
}

/// The keys of one section, in the table's order (`CENTRAL_API_URL` first for the API).
pub fn in_section(section: Section) -> impl Iterator<Item = &'static str> {
    KEY_TABLE
        .iter()
        .filter(move |key| key.section == section)
        .map(|key| key.name)
}

/// A flat key's value as it may be shown: secrets hidden, URL passwords hidden. A name outside
/// the table is hidden, to be safe.
pub fn shown(name: &str, value: &str) -> String {
    match find(name).map_or(Secrecy::Secret, |key| key.secrecy) {
        Secrecy::Secret => "***".into(),
        Secrecy::Url => redact_url(value),
        Secrecy::Plain => value.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_uppercase() {
        let mut seen = std::collections::BTreeSet::new();
        for key in KEY_TABLE {
            assert!(seen.insert(key.name), "{} is listed twice", key.name);
            assert!(
                key.name.chars().all(|c| c.is_ascii_uppercase() || c == '_'),
                "{}",
                key.name
            );
            assert!(!key.doc.is_empty(), "{} has no docs", key.name);
        }
        assert_eq!(KEYS.len(), KEY_TABLE.len());
        assert_eq!(KEYS[0], "CRONTAB");
    }

    #[test]
    fn the_source_key_table_lists_exactly_the_keys_the_toml_accepts() {
        #[derive(serde::Deserialize)]
        struct File {
            #[allow(dead_code)]
            sources: Vec<crate::sources::FileSource>,
        }
        // The parser names every key it accepts when it meets one it does not.
        let err = toml::from_str::<File>("[[sources]]\nnot_a_key = 1\n")
            .err()
            .expect("an unknown key is refused")
            .to_string();
        let accepted: std::collections::BTreeSet<&str> =
            err.split('`').skip(3).step_by(2).collect();
        let listed: std::collections::BTreeSet<&str> =
            SOURCE_KEY_TABLE.iter().map(|k| k.name).collect();
        assert_eq!(accepted, listed, "{err}");
    }

    #[test]
    fn secrets_and_url_passwords_are_hidden() {
        assert_eq!(shown("INGEST_TOKEN", "abc"), "***");
        assert_eq!(shown("CENTRAL_NATS_TOKEN", "abc"), "***");
        assert_eq!(
            shown("CENTRAL_DATABASE_URL", "postgres://u:pw@h/db"),
            redact_url("postgres://u:pw@h/db")
        );
        assert!(!shown("CENTRAL_DATABASE_URL", "postgres://u:pw@h/db").contains("pw"));
        assert_eq!(shown("CRONTAB", "* * * * *"), "* * * * *");
        assert_eq!(shown("NOT_A_KEY", "abc"), "***");
    }

    #[test]
    fn sizes_are_written_in_mib_and_shown_in_bytes() {
        let max_body = find("MAX_BODY_BYTES").expect("listed").default;
        assert_eq!(max_body.value().as_deref(), Some("10MiB"));
        assert_eq!(max_body.shown(), "10485760");
        assert_eq!(
            find("CRONTAB").expect("listed").default.env_line_value(),
            "\"* * * * *\""
        );
    }
}
