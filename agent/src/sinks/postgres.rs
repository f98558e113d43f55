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
//! The connection is plain TCP (`NoTls`): TLS to PostgreSQL (tokio-postgres-rustls) is future
//! work, so point this sink at a database on a trusted network or through a tunnel. A URL asking
//! for `sslmode=require` fails to connect rather than going out in clear.

use anyhow::Context as _;
use estafeta_staging::Delivery;
use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls};

use super::database::{
    BATCH_TIMEOUT, CONNECT_TIMEOUT, DatabaseSinkConfig, Failure, LandingRow, Migration, Rows,
    dry_run_lines,
};
use super::{BoxFuture, Outcome, Sink, database, error_chain, redact_url, scrub, url_secrets};

/// Schema changes, in order.
const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "0001_landing",
    sql: include_str!("../../../sql/postgres/0001_landing.sql"),
}];

const SCHEMA_MIGRATIONS_SQL: &str = include_str!("../../../sql/postgres/schema_migrations.sql");
const INSERT_SQL: &str = include_str!("../../../sql/postgres/insert_records.sql");
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
    secrets: Vec<String>,
    client: Mutex<Option<Client>>,
}

impl PostgresSink {
    /// Checks the URL; connects to nothing.
    pub fn new(name: impl Into<String>, config: DatabaseSinkConfig) -> anyhow::Result<Self> {
        let shown = redact_url(&config.url);
        let secrets = url_secrets(&config.url);
        let mut pg: tokio_postgres::Config = config.url.parse().map_err(|err| {
            anyhow::anyhow!(
                "the PostgreSQL URL {shown:?} is not valid: {}; expected postgres://user:password@host:5432/database",
                scrub(format!("{err}"), &secrets)
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
            client: Mutex::new(None),
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

    /// Delivers the rows on the sink's connection, (re)connecting first when needed. `Err`
    /// means: retry the whole batch.
    async fn deliver_rows(
        &self,
        slot: &mut Option<Client>,
        rows: &[LandingRow],
    ) -> Result<Vec<Outcome>, String> {
        let client = match slot {
            Some(client) if !client.is_closed() => client,
            _ => {
                *slot = None;
                let mut client = self.connect().await?;
                self.migrate(&mut client).await?;
                slot.insert(client)
            }
        };
        match self.insert(client, rows.iter()).await {
            Ok(()) => Ok(vec![Outcome::Delivered; rows.len()]),
            Err(Failure::Transient(error)) => Err(error),
            Err(Failure::Row(error)) => {
                tracing::debug!(sink = %self.name, error = %error, "A row was refused; inserting the batch row by row.");
                self.insert_row_by_row(client, rows).await
            }
        }
    }

    /// Inserts `rows` in one statement and one transaction.
    async fn insert<'r>(
        &self,
        client: &mut Client,
        rows: impl Iterator<Item = &'r LandingRow> + Clone,
    ) -> Result<(), Failure> {
        let tx = client
            .transaction()
            .await
            .map_err(|err| self.failure(err))?;
        self.execute_insert(&tx, rows).await?;
        tx.commit().await.map_err(|err| self.failure(err))
    }

    async fn execute_insert<'r>(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        rows: impl Iterator<Item = &'r LandingRow> + Clone,
    ) -> Result<(), Failure> {
        let keys: Vec<&str> = rows.clone().map(|r| r.idempotency_key.as_str()).collect();
        let seqs: Vec<i64> = rows.clone().map(|r| r.seq).collect();
        let actions: Vec<&str> = rows.clone().map(|r| r.action.as_str()).collect();
        let entities: Vec<&str> = rows.clone().map(|r| r.entity.as_str()).collect();
        let record_keys: Vec<Option<&str>> =
            rows.clone().map(|r| r.record_key.as_deref()).collect();
        let payloads: Vec<&str> = rows.clone().map(|r| r.payload.as_str()).collect();
        let staged: Vec<chrono::DateTime<chrono::Utc>> = rows.map(|r| r.staged_at).collect();
        tx.execute(
            INSERT_SQL,
            &[
                &self.agent_id,
                &keys,
                &seqs,
                &actions,
                &entities,
                &record_keys,
                &payloads,
                &staged,
            ],
        )
        .await
        .map(|_| ())
        .map_err(|err| self.failure(err))
    }

    /// One transaction, one savepoint per row: refused rows are dead, the rest delivered.
    async fn insert_row_by_row(
        &self,
        client: &mut Client,
        rows: &[LandingRow],
    ) -> Result<Vec<Outcome>, String> {
        let transient = |err| self.failure(err).message();
        let mut tx = client.transaction().await.map_err(transient)?;
        let mut outcomes = Vec::with_capacity(rows.len());
        for row in rows {
            let savepoint = tx.savepoint("estafeta_row").await.map_err(transient)?;
            match self.execute_insert(&savepoint, std::iter::once(row)).await {
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

    /// Sorts an error (module documentation) and words it without the password.
    fn failure(&self, err: tokio_postgres::Error) -> Failure {
        let message = match err.as_db_error() {
            Some(db) => {
                let mut text = format!("PostgreSQL {}: {}", db.code().code(), db.message());
                if let Some(detail) = db.detail() {
                    text.push_str(" (");
                    text.push_str(detail);
                    text.push(')');
                }
                text
            }
            None => error_chain(&err),
        };
        let message = scrub(message, &self.secrets);
        match err.code().map(|c| c.code()) {
            Some(code)
                if ["22", "23", "54"]
                    .iter()
                    .any(|class| code.starts_with(class)) =>
            {
                Failure::Row(message)
            }
            _ => Failure::Transient(message),
        }
    }
}

impl Sink for PostgresSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn deliver<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(async move {
            let rows = Rows::new(batch);
            if rows.rows.is_empty() {
                return rows.finish(Vec::new());
            }
            let mut slot = self.client.lock().await;
            let result =
                tokio::time::timeout(BATCH_TIMEOUT, self.deliver_rows(&mut slot, &rows.rows)).await;
            let outcomes =
                database::outcomes_or_retry(&self.name, rows.rows.len(), result, || *slot = None);
            rows.finish(outcomes)
        })
    }

    fn dry_run(&self, batch: &[Delivery]) -> Vec<String> {
        dry_run_lines(&self.shown, batch)
    }

    fn probe(&self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            let client = self.connect().await.map_err(anyhow::Error::msg)?;
            client
                .simple_query("SELECT 1")
                .await
                .map_err(|err| anyhow::anyhow!(self.failure(err).message()))
                .with_context(|| format!("PostgreSQL at {} answered with an error", self.shown))?;
            Ok(())
        })
    }
}
