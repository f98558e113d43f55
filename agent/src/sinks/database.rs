//! Database sinks: every record becomes one row of a landing table, `estafeta_records`, in the
//! central PostgreSQL ([`super::postgres`]), MariaDB / MySQL ([`super::mysql`]) or SQLite
//! ([`super::sqlite`]) database, chosen by the URL's scheme in [`build`].
//!
//! ```text
//! estafeta_records
//!   idempotency_key  the record's id (UUIDv7), UNIQUE: a resend inserts nothing (contract 4)
//!   agent_id         the agent that staged it          seq         its sequence number
//!   action, entity   as staged                          record_key  the key, or NULL
//!   payload          jsonb / JSON / TEXT (json_valid)  staged_at   when it was staged (UTC)
//!   delivered_at     default now()
//! ```
//!
//! - The schema lives in `sql/<dialect>/NNNN_*.sql`, compiled in with `include_str!` and applied
//!   on the first connection, under a lock, with the applied versions kept in
//!   `estafeta_schema_migrations`. Statements live in `sql/<dialect>/` too; values are always
//!   bound parameters.
//! - A batch goes in one transaction. When the database refuses a row's data (a constraint,
//!   type or length error), that record alone becomes dead with the database's message and the
//!   others are delivered. Anything else (connection refused or lost, timeouts, deadlocks, too
//!   many connections, a missing grant) retries the whole batch on a fresh connection: when in
//!   doubt, retry, since a retry loses nothing and a dead letter needs a person.
//! - Each sink keeps one connection, opened lazily and reopened after a failure, behind a tokio
//!   `Mutex`; batches of one sink are sequential anyway.
//! - Drivers: tokio-postgres and mysql_async, not sqlx, whose SQLite driver would link a second
//!   SQLite library next to rusqlite's (the staging index) and fail to build; rusqlite for the
//!   SQLite sink, on `spawn_blocking`.
//! - Apply mode ([`super::apply`]): with `apply_dir`, a record whose (entity, action) has a
//!   statement file is also applied to the real tables, in the same transaction as its landing
//!   row and only when that row is new (the unique idempotency key is the marker), so a replay
//!   never applies twice. A record the statement cannot take (a missing payload field) or that
//!   the database refuses (a constraint, a type) is dead alone, like a refused landing row.
//! - URLs are shown redacted ([`crate::redact::url`]) and driver messages scrubbed of the
//!   password. A refused row is dead with the database's error class and the names of the
//!   objects involved (table, column, constraint) as its summary; the database's own message
//!   and detail, which quote values (`Key (record_key)=(…) already exists`, `Failing row
//!   contains (…)`), go only into the dead-letter file. A transient error keeps the message
//!   only for classes whose messages name objects, never values (connection, authorization,
//!   a missing table or grant, resources, shutdown, deadlocks).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use estafeta_staging::Delivery;

use super::apply::{ApplyStatements, Bound, Lookup, Statement};
use super::{Outcome, Refusal, Sink};
use crate::redact;

/// Name of the landing table.
pub const LANDING_TABLE: &str = "estafeta_records";

/// Longest wait for a connection (and its migrations), in seconds.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Longest time one batch may take, connection included; past it, the batch is retried.
pub const BATCH_TIMEOUT: Duration = Duration::from_secs(120);

/// `CENTRAL_DATABASE_URL` or a `[[sinks]]` entry with `type = "database"`.
#[derive(Clone)]
pub struct DatabaseSinkConfig {
    /// `postgres://…`, `mysql://…` (MariaDB too) or `sqlite://PATH`.
    pub url: String,
    /// This agent's id, written with every row (`AGENT_ID`, default the host name).
    pub agent_id: String,
    /// Apply mode (`apply_dir`): the statement files, read and parsed at start; `None`: the
    /// landing table only.
    pub apply: Option<Arc<ApplyStatements>>,
    /// PostgreSQL: connections a batch is spread over (1 or 2, `connections` in the TOML).
    /// Two use a second core of the server; one halves what a fleet takes from the server's
    /// `max_connections`.
    pub connections: usize,
}

/// Connections a PostgreSQL sink uses unless the TOML says otherwise.
pub const DEFAULT_CONNECTIONS: usize = 2;

// By hand, so `{:?}` never prints the password in the URL.
impl fmt::Debug for DatabaseSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseSinkConfig")
            .field("url", &redact::url(&self.url))
            .field("agent_id", &self.agent_id)
            .field("apply_dir", &self.apply.as_ref().map(|a| a.dir.clone()))
            .finish()
    }
}

/// The database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    Mysql,
    Sqlite,
}

impl Dialect {
    /// Reads the scheme: `postgres://`, `postgresql://`, `mysql://`, `mariadb://`, `sqlite:`.
    pub fn of(url: &str) -> anyhow::Result<Self> {
        let scheme = url
            .split_once(':')
            .map(|(s, _)| s.to_ascii_lowercase())
            .unwrap_or_default();
        match scheme.as_str() {
            "postgres" | "postgresql" => Ok(Dialect::Postgres),
            "mysql" | "mariadb" => Ok(Dialect::Mysql),
            "sqlite" => Ok(Dialect::Sqlite),
            _ => anyhow::bail!(
                "the database URL {:?} is not one Estafeta can use; expected postgres://user@host/db, \
                 mysql://user@host/db (MariaDB too) or sqlite://PATH",
                redact::url(url)
            ),
        }
    }
}

/// Builds the sink for `config.url`'s scheme. Checks the URL; connects to nothing.
pub fn build(name: impl Into<String>, config: DatabaseSinkConfig) -> anyhow::Result<Arc<dyn Sink>> {
    let name = name.into();
    Ok(match Dialect::of(&config.url)? {
        Dialect::Postgres => Arc::new(super::postgres::PostgresSink::new(name, config)?),
        Dialect::Mysql => Arc::new(super::mysql::MysqlSink::new(name, config)?),
        Dialect::Sqlite => Arc::new(super::sqlite::SqliteSink::new(name, config)?),
    })
}

/// One schema change, applied once per database.
pub(crate) struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

/// One row for the landing table.
#[derive(Debug, Clone)]
pub(crate) struct LandingRow {
    pub idempotency_key: String,
    pub seq: i64,
    pub action: String,
    pub entity: String,
    pub record_key: Option<String>,
    /// The payload's JSON text, as staged.
    pub payload: String,
    pub staged_at: DateTime<Utc>,
    /// Apply mode: the statement that applies this record and its parameter values.
    pub apply: Option<ApplyRow>,
}

/// The statement that applies one record, with its bound values.
#[derive(Debug, Clone)]
pub(crate) struct ApplyRow {
    pub statement: Arc<Statement>,
    pub values: Vec<Bound>,
}

impl ApplyRow {
    /// `message` (a database error of the statement) with the statement's file named.
    pub fn context(&self, message: String) -> String {
        format!("{message} (applying {})", self.statement.file.display())
    }
}

impl LandingRow {
    /// The row for one record, or why the record cannot be a row (or cannot be applied).
    fn from_delivery(delivery: &Delivery, apply: Option<&ApplyStatements>) -> Result<Self, String> {
        let envelope = &delivery.envelope;
        let seq = i64::try_from(envelope.seq)
            .map_err(|_| format!("seq {} does not fit a signed 64-bit column", envelope.seq))?;
        let staged_at = DateTime::parse_from_rfc3339(&envelope.staged_at)
            .map_err(|err| {
                format!(
                    "staged_at {:?} is not an RFC 3339 time: {err}",
                    envelope.staged_at
                )
            })?
            .with_timezone(&Utc);
        let apply = match apply.map(|a| a.lookup(&envelope.entity, &envelope.action)) {
            None | Some(Lookup::NotApplied) => None,
            Some(Lookup::Missing(reason)) => return Err(reason),
            Some(Lookup::Statement(statement)) => Some(ApplyRow {
                values: statement.bind(&envelope.payload)?,
                statement: Arc::clone(statement),
            }),
        };
        Ok(Self {
            idempotency_key: envelope.id.clone(),
            seq,
            action: envelope.action.clone(),
            entity: envelope.entity.clone(),
            record_key: envelope.key.clone(),
            payload: envelope.payload.get().to_owned(),
            staged_at,
            apply,
        })
    }
}

/// A batch as rows, remembering which records could not become rows.
pub(crate) struct Rows {
    /// Outcomes already known (records that cannot be rows); `None` for rows.
    slots: Vec<Option<Outcome>>,
    pub rows: Vec<LandingRow>,
}

impl Rows {
    pub fn new(batch: &[Delivery], apply: Option<&ApplyStatements>) -> Self {
        let mut slots = Vec::with_capacity(batch.len());
        let mut rows = Vec::with_capacity(batch.len());
        for delivery in batch {
            match LandingRow::from_delivery(delivery, apply) {
                Ok(row) => {
                    rows.push(row);
                    slots.push(None);
                }
                Err(reason) => slots.push(Some(Outcome::Dead {
                    reason: Refusal::ours(reason),
                })),
            }
        }
        Self { slots, rows }
    }

    /// The batch's outcomes, given one outcome per row in row order (`rows` may have been
    /// moved out meanwhile).
    pub fn finish(self, row_outcomes: Vec<Outcome>) -> Vec<Outcome> {
        debug_assert_eq!(
            row_outcomes.len(),
            self.slots.iter().filter(|s| s.is_none()).count()
        );
        let mut row_outcomes = row_outcomes.into_iter();
        self.slots
            .into_iter()
            .map(|slot| {
                slot.or_else(|| row_outcomes.next())
                    .unwrap_or_else(|| Outcome::Retry {
                        error: "the database sink lost track of this record".to_owned(),
                        retry_after: None,
                    })
            })
            .collect()
    }
}

/// How a database error is sorted.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Not about one row's data: retry the whole batch, on a new connection. The text is
    /// safe to log (see the module documentation).
    Transient(String),
    /// The database refused this row's data: the record is dead, the others go on.
    Row(Refusal),
}

impl Failure {
    /// The text to log and show: a row's refusal by its summary only.
    pub fn message(self) -> String {
        match self {
            Failure::Transient(m) => m,
            Failure::Row(refusal) => refusal.summary,
        }
    }

    /// With `f` applied to every text (adding context such as the statement file).
    pub fn map(self, f: impl Fn(String) -> String) -> Failure {
        match self {
            Failure::Transient(m) => Failure::Transient(f(m)),
            Failure::Row(refusal) => Failure::Row(refusal.map(f)),
        }
    }
}

/// Every row retried with `error`, logged once for the batch.
/// Turns a batch attempt bounded by [`BATCH_TIMEOUT`] into outcomes: on an error or a
/// timeout every row is retried and `reset` drops the connection, so the next batch reconnects.
pub(crate) fn outcomes_or_retry(
    sink: &str,
    rows: usize,
    attempt: Result<Result<Vec<Outcome>, String>, tokio::time::error::Elapsed>,
    reset: impl FnOnce(),
) -> Vec<Outcome> {
    match attempt {
        Ok(Ok(outcomes)) => outcomes,
        Ok(Err(error)) => {
            reset();
            retry_all(sink, rows, error)
        }
        Err(_) => {
            reset();
            retry_all(
                sink,
                rows,
                format!("the batch took longer than {BATCH_TIMEOUT:?}"),
            )
        }
    }
}

pub(crate) fn retry_all(sink: &str, rows: usize, error: String) -> Vec<Outcome> {
    tracing::warn!(sink = %sink, records = rows, error = %error, "Database delivery failed; the batch will be retried.");
    vec![
        Outcome::Retry {
            error,
            retry_after: None,
        };
        rows
    ]
}

/// `DRY_RUN` lines: what would be inserted, without the payload.
/// In apply mode, each line also says which statement file would apply the record, or why
/// the record would be dead.
pub(crate) fn dry_run_lines(
    shown_url: &str,
    apply: Option<&ApplyStatements>,
    batch: &[Delivery],
) -> Vec<String> {
    batch
        .iter()
        .map(|d| {
            let e = &d.envelope;
            let mut line = format!(
                "INSERT INTO {LANDING_TABLE} at {shown_url} idempotency_key={} seq={} entity={} action={} ({} bytes)",
                e.id,
                e.seq,
                e.entity,
                e.action,
                e.payload.get().len()
            );
            match LandingRow::from_delivery(d, apply) {
                Ok(LandingRow {
                    apply: Some(apply), ..
                }) => {
                    line.push_str(&format!(
                        " then apply {} ({} parameters)",
                        apply.statement.file.display(),
                        apply.values.len()
                    ));
                }
                Ok(_) => {}
                Err(reason) => line.push_str(&format!(" would be dead: {reason}")),
            }
            line
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dialect_follows_the_scheme() {
        assert_eq!(
            Dialect::of("postgres://u@h/db").ok(),
            Some(Dialect::Postgres)
        );
        assert_eq!(
            Dialect::of("PostgreSQL://u@h/db").ok(),
            Some(Dialect::Postgres)
        );
        assert_eq!(Dialect::of("mariadb://u@h/db").ok(), Some(Dialect::Mysql));
        assert_eq!(
            Dialect::of("sqlite:///tmp/x.db").ok(),
            Some(Dialect::Sqlite)
        );
        let err = Dialect::of("oracle://u:hunter2@h/db").expect_err("unknown scheme");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn config_debug_hides_the_password() {
        let config = DatabaseSinkConfig {
            url: "postgres://u:hunter2@h/db".to_owned(),
            agent_id: "a".to_owned(),
            apply: None,
            connections: DEFAULT_CONNECTIONS,
        };
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
