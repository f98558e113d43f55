//! PostgreSQL database sink, with tokio-postgres (see [`super::database`] for the landing table
//! and the rules every database sink follows).
//!
//! A batch is one `INSERT … SELECT FROM UNNEST($arrays) ON CONFLICT (idempotency_key) DO
//! NOTHING` in one transaction: one round trip whatever the batch size, and a statement text
//! that never depends on the data. When PostgreSQL refuses the data (SQLSTATE classes 22 data
//! exception, 23 integrity constraint, 54 program limit: a value too long, a `\u0000` that
//! jsonb cannot hold), the batch is sent again row by row, each row under a savepoint, so only
//! the offending records become dead. Every other error (class 08 connection, 40001 / 40P01
//! serialization and deadlock, 53 resources such as too many connections, 57 shutdown, a
//! missing table or grant, a lost socket) retries the batch on a new connection.
//!
//! Heartbeats ([`crate::heartbeat`]) are upserted into `estafeta_agents` on the first of the
//! two connections; that table and the `estafeta_fleet` view come from
//! `sql/postgres/agents.sql`, applied by the first heartbeat (not by the migrations), so a user
//! who may only insert records still delivers them.
//!
//! Apply mode ([`super::apply`]) runs each batch in one explicit transaction: the same insert
//! with `RETURNING idempotency_key` tells which records are new, and each new record's statement
//! runs next, prepared with every parameter typed `text`. A batch in apply mode is not split
//! over two connections, so one transaction covers it. A refused row or statement sends the batch
//! row by row under savepoints, as above.
//!
//! The connection is plain TCP (`NoTls`): TLS to PostgreSQL (tokio-postgres-rustls) is future
//! work, so point this sink at a database on a trusted network or through a tunnel. A URL asking
//! for `sslmode=require` fails to connect rather than going out in clear.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use estafeta_staging::Delivery;
use tokio::sync::Mutex;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, GenericClient, NoTls, Statement};

use super::DatabaseSinkConfig;
use super::landing;
use super::landing::{
    ApplyRow, BATCH_TIMEOUT, CONNECT_TIMEOUT, Failure, LandingRow, Migration, Rows, dry_run_lines,
};
use crate::db::apply::{ApplyStatements, Bound};
use crate::redact::{self, Secrets};
use crate::sinks::{BoxFuture, Outcome, Refusal, Sink, error_chain};

/// Schema changes, in order.
const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "0001_landing",
    sql: include_str!("../../../../sql/postgres/0001_landing.sql"),
}];

const SCHEMA_MIGRATIONS_SQL: &str = include_str!("../../../../sql/postgres/schema_migrations.sql");
const INSERT_SQL: &str = include_str!("../../../../sql/postgres/insert_records.sql");
const AGENTS_SQL: &str = include_str!("../../../../sql/postgres/agents.sql");
const UPSERT_AGENT_SQL: &str = include_str!("../../../../sql/postgres/upsert_agent.sql");
const INSERT_RETURNING_SQL: &str =
    include_str!("../../../../sql/postgres/insert_records_returning.sql");
const APPLIED_SQL: &str = "SELECT version FROM estafeta_schema_migrations";
const RECORD_MIGRATION_SQL: &str =
    "INSERT INTO estafeta_schema_migrations (version, name) VALUES ($1, $2) ON CONFLICT DO NOTHING";
/// Serializes migrations of agents starting together (`hashtext('estafeta_migrations')` would
/// do too; a constant is plainer).
const MIGRATION_LOCK_SQL: &str = "SELECT pg_advisory_xact_lock(7300210457120913)";

/// Delivers records into a PostgreSQL landing table.
pub struct PostgresSink {
    name: String,
    agent_id: String,
    config: tokio_postgres::Config,
    /// The URL with its password hidden, for messages.
    shown: String,
    secrets: Secrets,
    /// Two connections: a large batch is split in halves inserted side by side (see `deliver`).
    clients: [Mutex<Option<Connection>>; 2],
    /// Whether `sql/postgres/agents.sql` ran (on any connection of this process).
    agents_ready: AtomicBool,
    /// Apply mode: the statement files.
    apply: Option<Arc<ApplyStatements>>,
    /// 1 or 2 (`connections`): with 1, batches are never split and the second slot stays empty.
    connections: usize,
}

/// An open connection, migrated, with the batch insert prepared on it.
struct Connection {
    client: Client,
    /// `INSERT_SQL`, prepared once when the connection opens: each batch is then one round trip
    /// (Bind, Execute) that PostgreSQL neither parses nor plans again, instead of two (Parse and
    /// Describe, then Bind and Execute). If the table changes under it (a DBA adds a column),
    /// PostgreSQL plans it again; an error from it is transient, so the batch is retried on a
    /// new connection (`a_column_added_under_a_running_agent_changes_nothing`).
    insert: Statement,
}

/// Which insert [`PostgresSink::execute_insert`] runs.
enum Insert<'a> {
    /// `INSERT_SQL`, prepared on the connection.
    Prepared(&'a Statement),
    /// `INSERT_RETURNING_SQL` (apply mode), which says which records are new.
    Returning,
}

/// Apply statements prepared on the current connection, by file, for one batch.
type Prepared = HashMap<PathBuf, tokio_postgres::Statement>;

/// A batch of at least this many rows is split over both connections. A batch holds at most
/// one record per key (the store leases only the oldest undelivered record of each key), so
/// its halves can be inserted at the same time without reordering any key, and PostgreSQL
/// parses and indexes them on two cores instead of one. Smaller batches gain nothing from it.
const SPLIT_MIN_ROWS: usize = 64;

impl PostgresSink {
    /// Checks the URL; connects to nothing.
    pub fn new(name: impl Into<String>, config: DatabaseSinkConfig) -> anyhow::Result<Self> {
        let shown = redact::url(&config.url);
        let secrets = Secrets::of(&config.url);
        let mut pg: tokio_postgres::Config = config.url.parse().map_err(|err: tokio_postgres::Error| {
            anyhow::anyhow!(
                "the PostgreSQL URL {shown:?} is not valid: {}; expected postgres://user:password@host:5432/database",
                secrets.scrub(&err.to_string())
            )
        })?;
        pg.connect_timeout(CONNECT_TIMEOUT);
        if pg.get_application_name().is_none() {
            pg.application_name("estafeta");
        }
        Ok(Self {
            name: name.into(),
            agent_id: config.agent_id,
            config: pg,
            shown,
            secrets,
            clients: [Mutex::new(None), Mutex::new(None)],
            agents_ready: AtomicBool::new(false),
            apply: config.apply,
            connections: config.connections,
        })
    }

    async fn connect(&self) -> Result<Client, String> {
        let (client, connection) =
            tokio::time::timeout(CONNECT_TIMEOUT, self.config.connect(NoTls))
                .await
                .map_err(|_| {
                    format!(
                        "connecting to {} timed out after {CONNECT_TIMEOUT:?}",
                        self.shown
                    )
                })?
                .map_err(|err| {
                    format!(
                        "cannot connect to {}: {}",
                        self.shown,
                        self.failure(err).message()
                    )
                })?;
        let name = self.name.clone();
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(sink = %name, error = %err, "PostgreSQL connection closed.");
            }
        });
        Ok(client)
    }

    /// Applies the migrations this database lacks, in one transaction under an advisory lock.
    /// When every migration is already recorded (a DBA may have run `sql/postgres/` by hand),
    /// no DDL is sent: the agent's user then needs only SELECT on `estafeta_schema_migrations`
    /// and INSERT on `estafeta_records`.
    async fn migrate(&self, client: &mut Client) -> Result<(), String> {
        if let Ok(rows) = client.query(APPLIED_SQL, &[]).await {
            let applied: Vec<i64> = rows.iter().map(|row| row.get(0)).collect();
            if MIGRATIONS.iter().all(|m| applied.contains(&m.version)) {
                return Ok(());
            }
        }
        let fail = |err| {
            format!(
                "cannot prepare the landing table at {}: {}",
                self.shown,
                self.failure(err).message()
            )
        };
        let tx = client.transaction().await.map_err(fail)?;
        tx.batch_execute(MIGRATION_LOCK_SQL).await.map_err(fail)?;
        tx.batch_execute(SCHEMA_MIGRATIONS_SQL)
            .await
            .map_err(fail)?;
        let applied: Vec<i64> = tx
            .query(APPLIED_SQL, &[])
            .await
            .map_err(fail)?
            .iter()
            .map(|row| row.get(0))
            .collect();
        for migration in MIGRATIONS {
            if applied.contains(&migration.version) {
                continue;
            }
            tx.batch_execute(migration.sql).await.map_err(fail)?;
            tx.execute(RECORD_MIGRATION_SQL, &[&migration.version, &migration.name])
                .await
                .map_err(fail)?;
            tracing::info!(sink = %self.name, migration = migration.name, "Database migration applied.");
        }
        tx.commit().await.map_err(fail)
    }

    /// The slot's connection, opening (connect, migrate, prepare) a new one when it has none
    /// or its connection is closed.
    async fn open<'s>(
        &self,
        slot: &'s mut Option<Connection>,
    ) -> Result<&'s mut Connection, String> {
        if slot.as_ref().is_some_and(|c| !c.client.is_closed()) {
            return Ok(slot.as_mut().expect("checked just above"));
        }
        *slot = None;
        let mut client = self.connect().await?;
        self.migrate(&mut client).await?;
        let insert = client.prepare(INSERT_SQL).await.map_err(|err| {
            format!(
                "cannot prepare the insert into the landing table at {}: {}",
                self.shown,
                self.failure(err).message()
            )
        })?;
        Ok(slot.insert(Connection { client, insert }))
    }

    /// Delivers the rows on the sink's connection, (re)connecting first when needed. `Err`
    /// means: retry the whole batch.
    async fn deliver_rows(
        &self,
        slot: &mut Option<Connection>,
        rows: &[LandingRow],
    ) -> Result<Vec<Outcome>, String> {
        let conn = self.open(slot).await?;
        if self.apply.is_some() {
            return self.deliver_applied(conn, rows).await;
        }
        let insert = Insert::Prepared(&conn.insert);
        match self.execute_insert(&conn.client, insert, rows.iter()).await {
            Ok(_) => Ok(vec![Outcome::Delivered; rows.len()]),
            Err(Failure::Transient(error)) => Err(error),
            Err(Failure::Row(refusal)) => {
                tracing::debug!(sink = %self.name, error = %refusal.summary, "A row was refused; inserting the batch row by row.");
                self.insert_row_by_row(conn, rows).await
            }
        }
    }

    /// Apply mode: the batch in one transaction, landing rows and apply statements; row by row
    /// when the database refuses a row or a statement.
    async fn deliver_applied(
        &self,
        conn: &mut Connection,
        rows: &[LandingRow],
    ) -> Result<Vec<Outcome>, String> {
        let transient = |err| self.failure(err).message();
        let tx = conn.client.transaction().await.map_err(transient)?;
        let mut prepared = Prepared::new();
        match self.insert_and_apply(&tx, rows, &mut prepared).await {
            Ok(()) => {
                tx.commit().await.map_err(transient)?;
                Ok(vec![Outcome::Delivered; rows.len()])
            }
            Err(Failure::Transient(error)) => Err(error),
            Err(Failure::Row(refusal)) => {
                tracing::debug!(sink = %self.name, error = %refusal.summary, "A row or apply statement was refused; delivering the batch row by row.");
                tx.rollback().await.map_err(transient)?;
                self.insert_row_by_row(conn, rows).await
            }
        }
    }

    /// Inserts the landing rows, then applies each record the insert added (a record it did
    /// not add was delivered, and applied, before).
    async fn insert_and_apply(
        &self,
        tx: &impl GenericClient,
        rows: &[LandingRow],
        prepared: &mut Prepared,
    ) -> Result<(), Failure> {
        let added = self
            .execute_insert(tx, Insert::Returning, rows.iter())
            .await?
            .unwrap_or_default();
        for row in rows {
            if let Some(apply) = &row.apply
                && added.contains(&row.idempotency_key)
            {
                self.apply(tx, apply, prepared).await?;
            }
        }
        Ok(())
    }

    /// Runs one record's apply statement, every parameter bound as text.
    async fn apply(
        &self,
        tx: &impl GenericClient,
        apply: &ApplyRow,
        prepared: &mut Prepared,
    ) -> Result<(), Failure> {
        let in_file = |failure: Failure| failure.map(|m| apply.context(m));
        let file = &apply.statement.file;
        let statement = match prepared.get(file) {
            Some(statement) => statement.clone(),
            None => {
                let types = vec![Type::TEXT; apply.statement.params.len()];
                let statement = tx
                    .prepare_typed(&apply.statement.sql, &types)
                    .await
                    .map_err(|err| in_file(self.failure(err)))?;
                prepared.insert(file.clone(), statement.clone());
                statement
            }
        };
        let values: Vec<Option<String>> = apply.values.iter().map(Bound::as_pg_text).collect();
        let params: Vec<&(dyn ToSql + Sync)> =
            values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        tx.execute(&statement, &params)
            .await
            .map(|_| ())
            .map_err(|err| in_file(self.failure(err)))
    }

    /// Delivers one part of a batch on one of the sink's connections.
    async fn deliver_part(
        &self,
        slot: &Mutex<Option<Connection>>,
        rows: &[LandingRow],
    ) -> Vec<Outcome> {
        if rows.is_empty() {
            return Vec::new();
        }
        let mut slot = slot.lock().await;
        let result = tokio::time::timeout(BATCH_TIMEOUT, self.deliver_rows(&mut slot, rows)).await;
        landing::outcomes_or_retry(&self.name, rows.len(), result, || *slot = None)
    }

    /// Inserts `rows` in one statement (outside a transaction, PostgreSQL runs it as one
    /// transaction of its own: no BEGIN and COMMIT round trips around it). With
    /// [`Insert::Returning`], also returns the idempotency keys it added (a key already in the
    /// table is skipped).
    async fn execute_insert<'r>(
        &self,
        tx: &impl GenericClient,
        insert: Insert<'_>,
        rows: impl Iterator<Item = &'r LandingRow> + Clone,
    ) -> Result<Option<HashSet<String>>, Failure> {
        let keys: Vec<&str> = rows.clone().map(|r| r.idempotency_key.as_str()).collect();
        let seqs: Vec<i64> = rows.clone().map(|r| r.seq).collect();
        let actions: Vec<&str> = rows.clone().map(|r| r.action.as_str()).collect();
        let entities: Vec<&str> = rows.clone().map(|r| r.entity.as_str()).collect();
        let record_keys: Vec<Option<&str>> =
            rows.clone().map(|r| r.record_key.as_deref()).collect();
        let payloads: Vec<&str> = rows.clone().map(|r| r.payload.as_str()).collect();
        let staged: Vec<chrono::DateTime<chrono::Utc>> = rows.map(|r| r.staged_at).collect();
        let params: [&(dyn ToSql + Sync); 8] = [
            &self.agent_id,
            &keys,
            &seqs,
            &actions,
            &entities,
            &record_keys,
            &payloads,
            &staged,
        ];
        match insert {
            Insert::Returning => tx
                .query(INSERT_RETURNING_SQL, &params)
                .await
                .map(|added| Some(added.iter().map(|row| row.get(0)).collect()))
                .map_err(|err| self.failure(err)),
            Insert::Prepared(statement) => tx
                .execute(statement, &params)
                .await
                .map(|_| None)
                .map_err(|err| self.failure(err)),
        }
    }

    /// One transaction, one savepoint per row: refused rows are dead, the rest delivered.
    async fn insert_row_by_row(
        &self,
        conn: &mut Connection,
        rows: &[LandingRow],
    ) -> Result<Vec<Outcome>, String> {
        let transient = |err| self.failure(err).message();
        let mut tx = conn.client.transaction().await.map_err(transient)?;
        let mut outcomes = Vec::with_capacity(rows.len());
        let mut prepared = Prepared::new();
        for row in rows {
            let savepoint = tx.savepoint("estafeta_row").await.map_err(transient)?;
            let result = if self.apply.is_some() {
                self.insert_and_apply(&savepoint, std::slice::from_ref(row), &mut prepared)
                    .await
            } else {
                let insert = Insert::Prepared(&conn.insert);
                self.execute_insert(&savepoint, insert, std::iter::once(row))
                    .await
                    .map(|_| ())
            };
            match result {
                Ok(()) => {
                    savepoint.commit().await.map_err(transient)?;
                    outcomes.push(Outcome::Delivered);
                }
                Err(Failure::Row(reason)) => {
                    savepoint.rollback().await.map_err(transient)?;
                    outcomes.push(Outcome::Dead { reason });
                }
                Err(Failure::Transient(error)) => return Err(error),
            }
        }
        tx.commit().await.map_err(transient)?;
        Ok(outcomes)
    }

    /// Upserts `beat` into `estafeta_agents`, creating the table and view first if needed.
    async fn send_heartbeat(
        &self,
        beat: &crate::sinks::heartbeat::Heartbeat,
    ) -> Result<(), String> {
        // The first connection, which every batch uses (a large one uses the second too).
        let mut slot = self.clients[0].lock().await;
        let client = &mut self.open(&mut slot).await?.client;
        let fail = |err| {
            format!(
                "heartbeat to {}: {}",
                self.shown,
                self.failure(err).message()
            )
        };
        if !self.agents_ready.load(Ordering::Acquire) {
            let tx = client.transaction().await.map_err(fail)?;
            tx.batch_execute(MIGRATION_LOCK_SQL).await.map_err(fail)?;
            tx.batch_execute(AGENTS_SQL).await.map_err(fail)?;
            tx.commit().await.map_err(fail)?;
            self.agents_ready.store(true, Ordering::Release);
        }
        let time = |text: &str| {
            DateTime::parse_from_rfc3339(text)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|err| format!("heartbeat time {text:?}: {err}"))
        };
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let sinks = serde_json::to_string(&beat.sinks).map_err(|err| err.to_string())?;
        client
            .execute(
                UPSERT_AGENT_SQL,
                &[
                    &beat.agent_id,
                    &beat.hostname,
                    &beat.version,
                    &time(&beat.started_at)?,
                    &time(&beat.sent_at)?,
                    &count(beat.records_pending),
                    &beat.oldest_pending_age_secs,
                    &count(beat.dead_letters),
                    &beat.disk_free_bytes.map(count),
                    &beat.staging_blocked,
                    &beat.last_error,
                    &sinks,
                ],
            )
            .await
            .map_err(fail)?;
        Ok(())
    }

    /// Sorts an error (module documentation) and words it without the password: a refused
    /// row by its SQLSTATE and the objects involved, with PostgreSQL's message and detail
    /// (which quote the row's values) kept for the dead letter only.
    fn failure(&self, err: tokio_postgres::Error) -> Failure {
        let Some(db) = err.as_db_error() else {
            return Failure::Transient(self.secrets.scrub(&error_chain(&err)));
        };
        let code = db.code().code();
        let mut summary = format!("PostgreSQL {code}");
        if let Some(name) = sqlstate_name(code) {
            summary.push(' ');
            summary.push_str(name);
        }
        let objects: Vec<String> = [
            ("table", db.table()),
            ("column", db.column()),
            ("constraint", db.constraint()),
        ]
        .into_iter()
        .filter_map(|(what, name)| name.map(|name| format!("{what} {name}")))
        .collect();
        if !objects.is_empty() {
            summary.push_str(&format!(" ({})", objects.join(", ")));
        }
        if ROW_CLASSES.iter().any(|class| code.starts_with(class)) {
            let mut answer = db.message().to_owned();
            if let Some(detail) = db.detail() {
                answer.push_str(" (");
                answer.push_str(detail);
                answer.push(')');
            }
            return Failure::Row(Refusal::new(
                self.secrets.scrub(&summary),
                &self.secrets.scrub(&answer),
            ));
        }
        let text = if NAMING_CLASSES.iter().any(|class| code.starts_with(class)) {
            format!("{summary}: {}", db.message())
        } else {
            summary
        };
        Failure::Transient(self.secrets.scrub(&text))
    }
}

/// SQLSTATE classes that mean "this row's data": 22 data exception, 23 integrity constraint,
/// 54 program limit (a value too long, a `\u0000` jsonb cannot hold).
const ROW_CLASSES: &[&str] = &["22", "23", "54"];

/// SQLSTATE classes whose messages name objects (tables, columns, roles, databases), never a
/// row's values, so they are shown: 08 connection, 0A not supported, 25 transaction state, 28
/// authorization, 3D catalog, 40 rollback (deadlock, serialization), 42 syntax or access rule
/// (a missing table or grant), 53 resources, 55 object state (locks), 57 operator intervention.
/// Other classes (such as P0, a trigger's `RAISE`) are shown by code only.
const NAMING_CLASSES: &[&str] = &["08", "0A", "25", "28", "3D", "40", "42", "53", "55", "57"];

/// A short name for the SQLSTATEs a delivery meets, or for their class.
fn sqlstate_name(code: &str) -> Option<&'static str> {
    let name = match code {
        "23505" => "unique violation",
        "23503" => "foreign key violation",
        "23502" => "not null violation",
        "23514" => "check violation",
        "23P01" => "exclusion violation",
        "22001" => "value too long",
        "22003" => "numeric value out of range",
        "22007" => "invalid datetime format",
        "22008" => "datetime field overflow",
        "22021" => "invalid byte sequence",
        "22P02" => "invalid text representation",
        "22P05" => "untranslatable character",
        "40001" => "serialization failure",
        "40P01" => "deadlock detected",
        "42501" => "insufficient privilege",
        "42703" => "undefined column",
        "42P01" => "undefined table",
        "53300" => "too many connections",
        "57014" => "query canceled",
        "57P01" => "admin shutdown",
        "P0001" => "raise exception",
        _ => match code.get(..2)? {
            "08" => "connection exception",
            "22" => "data exception",
            "23" => "integrity constraint violation",
            "28" => "invalid authorization",
            "40" => "transaction rollback",
            "42" => "syntax error or access rule violation",
            "53" => "insufficient resources",
            "54" => "program limit exceeded",
            "57" => "operator intervention",
            _ => return None,
        },
    };
    Some(name)
}

impl Sink for PostgresSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn deliver<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(async move {
            let rows = Rows::new(batch, self.apply.as_deref());
            if rows.rows.is_empty() {
                return rows.finish(Vec::new());
            }
            // Apply mode keeps a batch in one transaction.
            let (first, second) = if self.connections > 1
                && self.apply.is_none()
                && rows.rows.len() >= SPLIT_MIN_ROWS
            {
                rows.rows.split_at(rows.rows.len() / 2)
            } else {
                (&rows.rows[..], &[][..])
            };
            let (mut outcomes, rest) = tokio::join!(
                self.deliver_part(&self.clients[0], first),
                self.deliver_part(&self.clients[1], second)
            );
            outcomes.extend(rest);
            rows.finish(outcomes)
        })
    }

    fn dry_run(&self, batch: &[Delivery]) -> Vec<String> {
        dry_run_lines(&self.shown, self.apply.as_deref(), batch)
    }

    fn heartbeat<'a>(
        &'a self,
        beat: &'a crate::sinks::heartbeat::Heartbeat,
    ) -> BoxFuture<'a, Option<anyhow::Result<()>>> {
        Box::pin(async move { Some(self.send_heartbeat(beat).await.map_err(anyhow::Error::msg)) })
    }

    fn probe(&self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            let client = self.connect().await.map_err(anyhow::Error::msg)?;
            client
                .simple_query("SELECT 1")
                .await
                .map_err(|err| anyhow::anyhow!(self.failure(err).message()))
                .with_context(|| format!("PostgreSQL at {} answered with an error", self.shown))?;
            // Apply mode: every statement must prepare (its tables and columns exist, its
            // casts make sense), so a mistake shows here rather than as retries.
            for statement in self.apply.iter().flat_map(|a| a.statements()) {
                let types = vec![Type::TEXT; statement.params.len()];
                client
                    .prepare_typed(&statement.sql, &types)
                    .await
                    .map_err(|err| anyhow::anyhow!(self.failure(err).message()))
                    .with_context(|| {
                        format!(
                            "the apply statement {} does not prepare at {}; fix the file or the tables",
                            statement.file.display(),
                            self.shown
                        )
                    })?;
            }
            Ok(())
        })
    }
}
