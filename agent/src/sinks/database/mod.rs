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
//! - A batch carries runs: consecutive records of one order key (entity and key; the keyless
//!   records of an entity share one), in sequence order. It goes in one transaction (PostgreSQL
//!   may split it over two connections by order key, a run never over two transactions), its
//!   rows inserted and applied in sequence order, so a key's rows land in the order they were
//!   staged. When the database refuses a row's data (a constraint, type or length error), that
//!   record becomes dead with the database's message, the later records of its key in the
//!   batch are neither inserted nor applied but answered `Skipped` (they must not overtake it;
//!   the batcher gives them back untouched), and the other keys are delivered. Anything else
//!   (connection refused or lost, timeouts, deadlocks, too many connections, a missing grant)
//!   retries the whole batch on a fresh connection: when in doubt, retry, since a retry loses
//!   nothing and a dead letter needs a person.
//! - Each sink keeps one connection (PostgreSQL: one or two), opened lazily and reopened after
//!   a failure, behind a tokio `Mutex`; batches of one sink are sequential anyway.
//! - Drivers: tokio-postgres and mysql_async, not sqlx, whose SQLite driver would link a second
//!   SQLite library next to rusqlite's (the staging index) and fail to build; rusqlite for the
//!   SQLite sink, on `spawn_blocking`.
//! - Apply mode ([`super::apply`]): with `apply_dir`, a record whose (entity, action) has a
//!   statement file is also applied to the real tables, in the same transaction as its landing
//!   row and only when that row is new (the unique idempotency key is the marker), so a replay
//!   never applies twice. A record the statement cannot take (a missing payload field, found
//!   before anything is sent) or that the database refuses (a constraint, a type) is dead, and
//!   the rest of its key's run skipped, like a refused landing row.
//! - URLs are shown redacted ([`crate::redact::url`]) and driver messages scrubbed of the
//!   password. A refused row is dead with the database's error class and the names of the
//!   objects involved (table, column, constraint) as its summary; the database's own message
//!   and detail, which quote values (`Key (record_key)=(…) already exists`, `Failing row
//!   contains (…)`), go only into the dead-letter file. A transient error keeps the message
//!   only for classes whose messages name objects, never values (connection, authorization,
//!   a missing table or grant, resources, shutdown, deadlocks).

use std::fmt;
use std::sync::Arc;

use super::Sink;
use crate::db::apply::ApplyStatements;
use crate::redact;

mod landing;
pub mod mysql;
pub mod postgres;
pub mod sqlite;

use crate::db::Dialect;
pub use landing::{BATCH_TIMEOUT, CONNECT_TIMEOUT, LANDING_TABLE};

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
    /// The landing key (`idempotency_key` column) template (`idempotency_key`,
    /// `CENTRAL_DATABASE_IDEMPOTENCY_KEY`); `None`: the record's id.
    pub idempotency_key: Option<crate::sinks::record_template::RecordTemplate>,
    /// PostgreSQL: connections a batch is spread over by order key (1 or 2, `connections` in
    /// the TOML). Two use a second core of the server; one halves what a fleet takes from the server's
    /// `max_connections`.
    pub connections: usize,
    /// PostgreSQL: a transaction-mode pooler (PgBouncer `pool_mode = transaction`) sits between
    /// the agent and the server (`transaction_pooling` in the TOML), so consecutive
    /// transactions of one connection may run on different server connections: the sink then
    /// keeps no prepared statement from one transaction to the next (docs/SCALING.md).
    pub transaction_pooling: bool,
}

tokio::task_local! {
    /// The agents that staged the records of the batch being delivered, one per record in
    /// batch order, when that is not this process: `estafeta relay` writes the messages of many
    /// agents through one sink, each row with the `agent_id` its message carries, and one batch
    /// mixing agents goes in one COPY or insert (not one transaction per run of an agent). A
    /// task-local rather than a field of `Delivery` or a parameter of `Sink::deliver`, so the
    /// staging format and the other sinks stay as they are. PostgreSQL and MariaDB read it
    /// (the relay refuses SQLite), through [`landing::LandingRow::agent_id`].
    pub static ORIGIN_AGENTS: Arc<[String]>;
}

/// The agent that staged the `index`-th record of the batch, when [`ORIGIN_AGENTS`] says.
pub(crate) fn origin_agent(index: usize) -> Option<String> {
    ORIGIN_AGENTS
        .try_with(|agents| agents.get(index).cloned())
        .ok()
        .flatten()
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
            .field("idempotency_key", &self.idempotency_key)
            .finish()
    }
}

/// Builds the sink for `config.url`'s scheme. Checks the URL; connects to nothing.
pub fn build(name: impl Into<String>, config: DatabaseSinkConfig) -> anyhow::Result<Arc<dyn Sink>> {
    let name = name.into();
    Ok(match Dialect::of(&config.url)? {
        Dialect::Postgres => Arc::new(postgres::PostgresSink::new(name, config)?),
        Dialect::Mysql => Arc::new(mysql::MysqlSink::new(name, config)?),
        Dialect::Sqlite => Arc::new(sqlite::SqliteSink::new(name, config)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_debug_hides_the_password() {
        let config = DatabaseSinkConfig {
            url: "postgres://u:hunter2@h/db".to_owned(),
            agent_id: "a".to_owned(),
            apply: None,
            idempotency_key: None,
            connections: DEFAULT_CONNECTIONS,
            transaction_pooling: false,
        };
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
