//! PostgreSQL database sink, with tokio-postgres (see [`super::database`] for the landing table
//! and the rules every database sink follows).
//!
//! A batch carries runs of a key (several records of one entity and key; the keyless records of
//! an entity share one order key), in sequence order. Each part of it ([`split`]) goes in one
//! transaction, in that order:
//!
//! - The fast path is one binary COPY (`sql/postgres/copy_records.sql`, [`copy`]) straight into
//!   `estafeta_records`: nothing to parse but the payloads, no arrays to unpack, no plan; COPY
//!   is one transaction of its own, all or nothing.
//! - When the COPY fails on the idempotency key's unique violation (a resend after a crash or an
//!   expired lease: some rows are there already), it was rolled back as a whole, and the part
//!   takes the exactly-once path: in one transaction, binary COPY into the connection's
//!   temporary `estafeta_incoming`, then `INSERT INTO estafeta_records … SELECT … ORDER BY seq
//!   ON CONFLICT (idempotency_key) DO NOTHING`. A resend never lands twice and is `Delivered`.
//! - When PostgreSQL refuses the data (SQLSTATE classes 22 data exception, 23 integrity
//!   constraint other than that duplicate, 54 program limit: a value too long, a `\u0000` that
//!   jsonb cannot hold), the part is sent again row by row in sequence order, each row under a
//!   savepoint, so only the offending records become dead; the later records of a dead record's
//!   key are then not inserted but answered `Skipped` (they must not overtake it), while the
//!   other keys are delivered.
//! - Every other error (class 08 connection, 40001 / 40P01 serialization and deadlock, 53
//!   resources such as too many connections, 57 shutdown, a missing table or grant, a lost
//!   socket) retries the part on a new connection.
//!
//! With `connections = 2`, a batch of [`SPLIT_MIN_ROWS`] rows or more is split over both
//! connections by order key ([`split`]): whole runs go to one connection or the other, balancing
//! the row counts, so PostgreSQL parses and indexes on two cores while no key's run is ever
//! spread over two transactions (which could commit out of order). A batch of one hot key stays
//! on one connection.
//!
//! Heartbeats ([`crate::heartbeat`]) are upserted into `estafeta_agents` on the first of the
//! two connections; that table and the `estafeta_fleet` view come from
//! `sql/postgres/agents.sql`, applied by the first heartbeat (not by the migrations), so a user
//! who may only insert records still delivers them.
//!
//! Apply mode ([`super::apply`]) runs each batch in one explicit transaction, never split: the
//! exactly-once path's insert with `RETURNING idempotency_key` tells which records are new, and
//! each new record's statement runs next, in sequence order, prepared with every parameter typed
//! `text` and pipelined (all sent before the first answer is awaited: one round trip per batch,
//! not per record). A refused row or statement sends the batch row by row under savepoints, as above:
//! the refused record is dead and the rest of its key's run skipped, neither landed nor applied.
//!
//! With `transaction_pooling` (PgBouncer in `pool_mode = transaction` in between), a connection
//! of the sink is a client of the pooler, and each of its transactions may run on another server
//! connection: a statement prepared in one transaction may be missing (or, under the same name,
//! be another client's) in the next. The sink then prepares nothing at connect, and every
//! statement is prepared, run and closed inside one transaction. It sends no COPY either: a
//! COPY that fails server-side while its data is still coming makes PgBouncer (1.18 in Debian
//! 12, up to 1.25) lose track of the server connection (pgbouncer/pgbouncer#1470). A part goes
//! in one `INSERT … SELECT FROM UNNEST … ON CONFLICT DO NOTHING` (`sql/postgres/insert_records.sql`)
//! instead, which a resend cannot fail (apply mode: the same with `RETURNING`); a refused row
//! sends the part row by row, as above. In both modes, what runs outside a transaction uses
//! unnamed statements (`query_typed`) or the simple protocol, the temporary `estafeta_incoming`
//! is created and used inside one transaction, and the migrations' advisory lock is
//! transaction-scoped; no session state (SET, LISTEN, session advisory locks) is used.
//!
//! TLS follows libpq's URL parameters (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`), read and
//! connected by [`crate::db::postgres_tls`], the same code as the sources and `estafeta fleet`:
//! `verify-full` by default beyond loopback, never clear text when the URL asks for TLS, and a
//! WARN at start for `sslmode=disable` to a host beyond loopback.

use crate::sinks::record_template::RecordTemplate;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use estafeta_staging::Delivery;
use tokio::sync::Mutex;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, Statement};

use super::DatabaseSinkConfig;
use super::landing;
use super::landing::{
    BATCH_TIMEOUT, CONNECT_TIMEOUT, Failure, LandingRow, Migration, Rows, dry_run_lines,
};
use crate::db::apply::ApplyStatements;
use crate::db::postgres_tls::{ConnectError, PgTls};
use crate::redact::{self, Secrets};
use crate::sinks::{BoxFuture, Outcome, Sink};

mod copy;
mod deliver;
mod errors;

/// Schema changes, in order.
const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "0001_landing",
    sql: include_str!("../../../../../sql/postgres/0001_landing.sql"),
}];

const SCHEMA_MIGRATIONS_SQL: &str =
    include_str!("../../../../../sql/postgres/schema_migrations.sql");
const INSERT_SQL: &str = include_str!("../../../../../sql/postgres/insert_records.sql");
const AGENTS_SQL: &str = include_str!("../../../../../sql/postgres/agents.sql");
const UPSERT_AGENT_SQL: &str = include_str!("../../../../../sql/postgres/upsert_agent.sql");
const INSERT_RETURNING_SQL: &str =
    include_str!("../../../../../sql/postgres/insert_records_returning.sql");
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
    /// The connection settings, TLS included, and what the last connection negotiated.
    pg: PgTls,
    /// The URL with its password hidden, for messages.
    shown: String,
    secrets: Secrets,
    /// Two connections: a large batch is split by order key over both ([`split`]).
    clients: [Mutex<Option<Connection>>; 2],
    /// Whether `sql/postgres/agents.sql` ran (on any connection of this process).
    agents_ready: AtomicBool,
    /// Apply mode: the statement files.
    apply: Option<Arc<ApplyStatements>>,
    /// The landing key's template; `None`: the record's id.
    landing_key: Option<RecordTemplate>,
    /// 1 or 2 (`connections`): with 1, batches are never split and the second slot stays empty.
    connections: usize,
    /// A transaction-mode pooler is in between: no statement outlives its transaction.
    transaction_pooling: bool,
}

/// An open connection, migrated, with the batch's statements prepared on it: each batch then
/// costs no Parse and Describe round trip. If the table changes under them (a DBA adds a
/// column), PostgreSQL plans them again; an error from that is transient, so the batch is
/// retried on a new connection (`a_column_added_under_a_running_agent_changes_nothing`).
struct Connection {
    client: Client,
    /// `copy::COPY_RECORDS_SQL`: the fast path; `None` under transaction pooling.
    copy: Option<Statement>,
    /// `INSERT_SQL`: the row-by-row path; `None` under transaction pooling.
    insert: Option<Statement>,
}

/// A batch of at least this many rows is split over both connections ([`split`]). Smaller
/// batches gain nothing from it.
const SPLIT_MIN_ROWS: usize = 64;

/// Which connection each row goes to (0 or 1), split by order key: a key's whole run goes to
/// one connection, the runs in turn, largest first, to the one with fewer rows so far (ties to
/// the first), so both carry about as many rows while no run is split over two transactions.
/// Each connection inserts its rows in batch (sequence) order.
fn split(rows: &[LandingRow<'_>]) -> Vec<usize> {
    let mut runs: Vec<Vec<usize>> = Vec::new();
    let mut by_key: std::collections::HashMap<(&str, Option<&str>), usize> = Default::default();
    for (index, row) in rows.iter().enumerate() {
        let run = *by_key.entry(row.order_key()).or_insert_with(|| {
            runs.push(Vec::new());
            runs.len() - 1
        });
        runs[run].push(index);
    }
    // Stable: runs of the same length keep their batch order.
    runs.sort_by_key(|run| std::cmp::Reverse(run.len()));
    let mut part = vec![0; rows.len()];
    let mut sizes = [0usize; 2];
    for run in runs {
        let to = usize::from(sizes[1] < sizes[0]);
        sizes[to] += run.len();
        for index in run {
            part[index] = to;
        }
    }
    part
}

impl PostgresSink {
    /// Checks the URL; connects to nothing.
    pub fn new(name: impl Into<String>, config: DatabaseSinkConfig) -> anyhow::Result<Self> {
        let shown = redact::url(&config.url);
        let secrets = Secrets::of(&config.url);
        let name = name.into();
        let mut pg = PgTls::from_url(&config.url)?;
        if pg.clear_beyond_loopback() {
            tracing::warn!(
                sink = %name,
                url = %shown,
                "sslmode=disable to a host beyond loopback: records cross the network in clear text; use sslmode=verify-full (the default) unless this network is trusted."
            );
        }
        let pg_config = pg.config_mut();
        pg_config.connect_timeout(CONNECT_TIMEOUT);
        if pg_config.get_application_name().is_none() {
            pg_config.application_name("estafeta");
        }
        Ok(Self {
            name,
            agent_id: config.agent_id,
            pg,
            shown,
            secrets,
            clients: [Mutex::new(None), Mutex::new(None)],
            agents_ready: AtomicBool::new(false),
            apply: config.apply,
            landing_key: config.idempotency_key,
            connections: config.connections,
            transaction_pooling: config.transaction_pooling,
        })
    }

    async fn connect(&self) -> Result<Client, String> {
        let (client, connection) = landing::connect_within(&self.shown, self.pg.connect())
            .await?
            .map_err(|err| {
                let why = match err {
                    ConnectError::Tls(text) => self.secrets.scrub(&text),
                    ConnectError::Postgres(err) => self.failure(err).message(),
                };
                format!("cannot connect to {}: {why}", self.shown)
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
        // Unnamed (query_typed): nothing left prepared on a server connection a pooler may lend
        // to another client.
        if let Ok(rows) = client.query_typed(APPLIED_SQL, &[]).await {
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
        if self.transaction_pooling {
            return Ok(slot.insert(Connection {
                client,
                copy: None,
                insert: None,
            }));
        }
        let prepare = |err| {
            format!(
                "cannot prepare the insert into the landing table at {}: {}",
                self.shown,
                self.failure(err).message()
            )
        };
        let copy = client
            .prepare(copy::COPY_RECORDS_SQL)
            .await
            .map_err(prepare)?;
        let insert = client.prepare(INSERT_SQL).await.map_err(prepare)?;
        Ok(slot.insert(Connection {
            client,
            copy: Some(copy),
            insert: Some(insert),
        }))
    }

    /// Delivers one part of a batch on one of the sink's connections.
    async fn deliver_part(
        &self,
        slot: &Mutex<Option<Connection>>,
        rows: &[LandingRow<'_>],
    ) -> Vec<Outcome> {
        if rows.is_empty() {
            return Vec::new();
        }
        let mut slot = slot.lock().await;
        let result = tokio::time::timeout(BATCH_TIMEOUT, self.deliver_rows(&mut slot, rows)).await;
        landing::outcomes_or_retry(&self.name, rows.len(), result, || *slot = None)
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
        // One transaction, so the upsert's statement is prepared, run and closed on one server
        // connection even behind a transaction pooler.
        let tx = client.transaction().await.map_err(fail)?;
        let create = !self.agents_ready.load(Ordering::Acquire);
        if create {
            tx.batch_execute(MIGRATION_LOCK_SQL).await.map_err(fail)?;
            tx.batch_execute(AGENTS_SQL).await.map_err(fail)?;
        }
        let time = |text: &str| {
            DateTime::parse_from_rfc3339(text)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|err| format!("heartbeat time {text:?}: {err}"))
        };
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let sinks = serde_json::to_string(&beat.sinks).map_err(|err| err.to_string())?;
        tx.execute(
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
        tx.commit().await.map_err(fail)?;
        if create {
            self.agents_ready.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Sorts an error ([`errors::classify`]).
    fn failure(&self, err: tokio_postgres::Error) -> Failure {
        errors::classify(&self.secrets, err)
    }
}

impl Sink for PostgresSink {
    fn applies_in_one_transaction(&self) -> bool {
        true
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn deliver<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(async move {
            let mut rows = Rows::new(batch, self.apply.as_deref(), self.landing_key.as_ref());
            if rows.rows.is_empty() {
                return rows.finish(Vec::new());
            }
            // Apply mode keeps a batch in one transaction.
            if self.connections < 2 || self.apply.is_some() || rows.rows.len() < SPLIT_MIN_ROWS {
                let outcomes = self.deliver_part(&self.clients[0], &rows.rows).await;
                return rows.finish(outcomes);
            }
            let landing = std::mem::take(&mut rows.rows);
            let count = landing.len();
            let part = split(&landing);
            let mut parts: [Vec<LandingRow<'_>>; 2] = Default::default();
            for (row, &to) in landing.into_iter().zip(&part) {
                parts[to].push(row);
            }
            let (first, second) = tokio::join!(
                self.deliver_part(&self.clients[0], &parts[0]),
                self.deliver_part(&self.clients[1], &parts[1])
            );
            // Back in batch order: each part's outcomes are in its rows' order.
            let mut parted = [first.into_iter(), second.into_iter()];
            let outcomes: Vec<Outcome> = part
                .iter()
                .map(|&from| {
                    parted[from].next().unwrap_or_else(|| Outcome::Retry {
                        error: "the database sink lost track of this record".to_owned(),
                        retry_after: None,
                    })
                })
                .collect();
            debug_assert_eq!(outcomes.len(), count);
            rows.finish(outcomes)
        })
    }

    fn dry_run(&self, batch: &[Delivery]) -> Vec<String> {
        dry_run_lines(
            &self.shown,
            self.apply.as_deref(),
            self.landing_key.as_ref(),
            batch,
        )
    }

    fn heartbeat<'a>(
        &'a self,
        beat: &'a crate::sinks::heartbeat::Heartbeat,
    ) -> BoxFuture<'a, Option<anyhow::Result<()>>> {
        Box::pin(async move { Some(self.send_heartbeat(beat).await.map_err(anyhow::Error::msg)) })
    }

    fn transport(&self) -> crate::tls::Transport {
        self.pg.transport()
    }

    fn probe(&self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            let mut client = self.connect().await.map_err(anyhow::Error::msg)?;
            client
                .simple_query("SELECT 1")
                .await
                .map_err(|err| anyhow::anyhow!(self.failure(err).message()))
                .with_context(|| format!("PostgreSQL at {} answered with an error", self.shown))?;
            // Apply mode: every statement must prepare (its tables and columns exist, its
            // casts make sense), so a mistake shows here rather than as retries. In a
            // transaction rolled back at the end, so each statement is closed on the server
            // connection it was prepared on, even behind a transaction pooler.
            let tx = client
                .transaction()
                .await
                .map_err(|err| anyhow::anyhow!(self.failure(err).message()))?;
            for statement in self.apply.iter().flat_map(|a| a.statements()) {
                let types = vec![Type::TEXT; statement.params.len()];
                tx.prepare_typed(&statement.sql, &types)
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
            tx.rollback()
                .await
                .map_err(|err| anyhow::anyhow!(self.failure(err).message()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::test_delivery;

    /// A batch of `keys` (entity `patient`, `None` for keyless), in this order.
    fn rows(keys: &[Option<&str>]) -> Vec<LandingRow<'static>> {
        let batch: Vec<Delivery> = keys
            .iter()
            .enumerate()
            .map(|(i, key)| test_delivery(i as u64 + 1, "update", "patient", *key, "{}"))
            .collect();
        Rows::new(&batch, None, None)
            .rows
            .into_iter()
            .map(LandingRow::into_owned)
            .collect()
    }

    /// Checks that no order key has rows on both connections; the row count of each.
    fn check(rows: &[LandingRow<'_>], part: &[usize]) -> [usize; 2] {
        assert_eq!(part.len(), rows.len());
        let mut owner = std::collections::HashMap::new();
        let mut sizes = [0; 2];
        for (row, &to) in rows.iter().zip(part) {
            let first = *owner.entry(row.order_key()).or_insert(to);
            assert_eq!(first, to, "the run of {:?} is split", row.order_key());
            sizes[to] += 1;
        }
        sizes
    }

    #[test]
    fn a_big_batch_of_few_keys_keeps_every_run_on_one_connection() {
        // 1,000 rows of three hot keys and keyless ones, interleaved as a backlog would be.
        let keys: Vec<Option<&str>> = (0..1000)
            .map(|i| match i % 10 {
                0..=4 => Some("a"),
                5..=7 => Some("b"),
                8 => Some("c"),
                _ => None,
            })
            .collect();
        let rows = rows(&keys);
        let part = split(&rows);
        // a (500) on one side; b (300), c (100) and the keyless (100) on the other.
        assert_eq!(check(&rows, &part), [500, 500]);
        // Every key's rows keep their order inside their part (indices only grow).
        assert_eq!(part[0], 0);
        assert_eq!(part[5], 1);
    }

    #[test]
    fn one_hot_key_stays_on_one_connection_and_distinct_keys_are_balanced() {
        let one = rows(&vec![Some("hot"); 200]);
        assert_eq!(check(&one, &split(&one)), [200, 0]);

        let names: Vec<String> = (0..101).map(|i| format!("k{i}")).collect();
        let keys: Vec<Option<&str>> = names.iter().map(|k| Some(k.as_str())).collect();
        let distinct = rows(&keys);
        assert_eq!(check(&distinct, &split(&distinct)), [51, 50]);
    }
}
