//! MariaDB / MySQL database sink, with mysql_async (see [`super::database`] for the landing
//! table and the rules every database sink follows). `mysql://` and `mariadb://` URLs both work.
//!
//! Every new connection runs `sql/mysql/session.sql`: strict mode, so a value that does not fit
//! is an error rather than a silently cut row, and UTC. A batch is one transaction in which one
//! prepared `INSERT … ON DUPLICATE KEY UPDATE idempotency_key = idempotency_key` runs per row
//! (not `INSERT IGNORE`, which would downgrade bad values to warnings). InnoDB undoes only the
//! failing statement on a data error, so a refused row (SQLSTATE class 22 or 23, or codes such as
//! 1406 too long, 1366 bad value, 1452 foreign key, 4025 / 3819 CHECK) becomes dead (logged by
//! its code, the server's message, which quotes values, kept in the dead letter) while the other
//! rows of the transaction commit. Any other error (1213
//! deadlock, 1205 lock wait, 1040 too many connections, a lost connection, a missing grant)
//! retries the whole batch on a new connection. Connections, and their TLS (`ssl-mode`,
//! `ssl-ca`, `ssl-cert`, `ssl-key` in the URL), come from [`crate::db::mysql`]; after each new
//! connection the sink records what it negotiated, for [`Sink::transport`].
//!
//! One round trip per row would cap a flush at a few thousand rows a second on a LAN, so the
//! rows of a batch go as multi-row statements of the same insert ([`CHUNK_MAX_ROWS`] rows or
//! [`CHUNK_MAX_BYTES`] of payload at most, far under the servers' smallest default
//! `max_allowed_packet`), in batch (sequence) order. InnoDB undoes a failing statement as a
//! whole, so when a chunk is refused for its data, its rows are sent again one by one in the
//! same transaction and only the offending ones become dead.
//!
//! A batch carries runs of a key (several records of one entity and key, or the keyless records
//! of an entity), applied in sequence order in the batch's one transaction. Once a record is
//! refused for good (dead), the later records of its key in the batch are not inserted nor
//! applied — they stay out of the later chunks and statements — and are answered `Skipped`, so
//! none overtakes it; other keys go on.
//!
//! Heartbeats ([`crate::heartbeat`]) are upserted into `estafeta_agents` on the same connection;
//! that table and the `estafeta_fleet` view come from `sql/mysql/agents.sql`, applied by the
//! first heartbeat under the migration lock (not by the migrations).
//!
//! Apply mode ([`super::apply`]): a record with a statement file runs under a savepoint: the
//! landing insert, and only when it added the row (affected rows 1, not 0 for a replay, so the
//! connection never asks for `CLIENT_FOUND_ROWS`) the record's statement; a refused statement
//! rolls back to the savepoint, undoing the landing row too, and the record alone is dead (the
//! rest of its key's run skipped).
//! Numbers that are not integers are sent as their exact JSON text and converted by the server.

use crate::sinks::record_template::RecordTemplate;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use estafeta_staging::Delivery;
use mysql_async::prelude::Queryable;

use mysql_async::{Conn, Params, Statement, Transaction, TxOpts, Value};
use tokio::sync::Mutex;

use super::DatabaseSinkConfig;
use super::landing;
use super::landing::{
    ApplyRow, BATCH_TIMEOUT, Failure, LandingRow, Migration, Rows, Stopped, dry_run_lines,
};
use crate::db::apply::{ApplyStatements, Bound};
use crate::db::mysql::MysqlTarget;
use crate::redact::Secrets;
use crate::sinks::{BoxFuture, Outcome, Refusal, Sink, error_chain};

/// Schema changes, in order.
const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "0001_landing",
    sql: include_str!("../../../../sql/mysql/0001_landing.sql"),
}];

const SESSION_SQL: &str = include_str!("../../../../sql/mysql/session.sql");
const SCHEMA_MIGRATIONS_SQL: &str = include_str!("../../../../sql/mysql/schema_migrations.sql");
const INSERT_SQL: &str = include_str!("../../../../sql/mysql/insert_record.sql");
const AGENTS_SQL: &str = include_str!("../../../../sql/mysql/agents.sql");
const UPSERT_AGENT_SQL: &str = include_str!("../../../../sql/mysql/upsert_agent.sql");
const APPLIED_SQL: &str = "SELECT version FROM estafeta_schema_migrations";
const RECORD_MIGRATION_SQL: &str =
    "INSERT IGNORE INTO estafeta_schema_migrations (version, name) VALUES (?, ?)";
/// Serializes migrations of agents starting together; waits up to 30 s.
const LOCK_SQL: &str = "SELECT GET_LOCK('estafeta_migrations', 30)";
const UNLOCK_SQL: &str = "DO RELEASE_LOCK('estafeta_migrations')";
/// Apply mode: set before each applied record (a savepoint of the same name replaces the last).
const SAVEPOINT_SQL: &str = "SAVEPOINT estafeta_row";
const ROLLBACK_TO_SAVEPOINT_SQL: &str = "ROLLBACK TO SAVEPOINT estafeta_row";

/// Most rows one multi-row insert carries (8 parameters each).
const CHUNK_MAX_ROWS: usize = 256;
/// Most payload bytes one multi-row insert carries; a larger row goes alone. MySQL 5.7's and
/// MariaDB's smallest default `max_allowed_packet` is 4 MiB; a single row is bounded by the
/// agent's `MAX_BODY_BYTES` as before.
const CHUNK_MAX_BYTES: usize = 1024 * 1024;
/// The row placeholder of `INSERT_SQL`, repeated for a multi-row insert.
const ROW_PLACEHOLDERS: &str = "(?, ?, ?, ?, ?, ?, ?, ?)";

/// Server error codes that mean "this row's data", beyond SQLSTATE classes 22 and 23 (some of
/// them report the generic HY000).
const ROW_ERROR_CODES: &[u16] = &[
    1048, // column cannot be null
    1062, // duplicate entry (another unique key)
    1264, // out of range
    1265, // data truncated
    1292, // incorrect value (dates, numbers)
    1366, // incorrect string / integer value
    1367, // illegal value
    1406, // data too long
    1451, 1452, // foreign key
    1690, // value out of range
    3140, // invalid JSON text (MySQL)
    3819, // check constraint violated (MySQL)
    4025, // check constraint failed (MariaDB, JSON_VALID)
];

/// Delivers records into a MariaDB / MySQL landing table.
pub struct MysqlSink {
    name: String,
    agent_id: String,
    target: MysqlTarget,
    /// What the last connection negotiated (TLS or not).
    observed: crate::tls::Observed,
    /// The URL with its password hidden, for messages.
    shown: String,
    secrets: Secrets,
    conn: Mutex<Option<Conn>>,
    /// Whether `sql/mysql/agents.sql` ran (on any connection of this process).
    agents_ready: AtomicBool,
    /// Apply mode: the statement files.
    apply: Option<Arc<ApplyStatements>>,
    /// The landing key's template; `None`: the record's id.
    landing_key: Option<RecordTemplate>,
}

impl MysqlSink {
    /// Checks the URL; connects to nothing.
    pub fn new(name: impl Into<String>, config: DatabaseSinkConfig) -> anyhow::Result<Self> {
        let name = name.into();
        // Apply mode tells a new landing row (1 affected row) from a replay (0); with
        // CLIENT_FOUND_ROWS a replay would count 1 too.
        let target =
            MysqlTarget::parse(&config.url)?.with_opts(|opts| opts.client_found_rows(false));
        for warning in target.warnings() {
            tracing::warn!(sink = %name, url = %target.shown(), "{warning}");
        }
        let shown = target.shown().to_owned();
        let secrets = target.secrets().clone();
        let observed = crate::tls::Observed::new(target.transport());
        Ok(Self {
            name,
            agent_id: config.agent_id,
            target,
            observed,
            shown,
            secrets,
            conn: Mutex::new(None),
            agents_ready: AtomicBool::new(false),
            apply: config.apply,
            landing_key: config.idempotency_key,
        })
    }

    async fn connect(&self) -> Result<Conn, String> {
        let (mut conn, tls) = landing::connect_within(&self.shown, self.target.connect())
            .await?
            .map_err(|err| {
                format!(
                    "cannot connect to {}: {}",
                    self.shown,
                    err.message(|err| self.failure(err).message())
                )
            })?;
        self.observed.connected(tls, tls && self.target.verifies());
        conn.query_drop(SESSION_SQL)
            .await
            .map_err(|err| self.failure(err).message())?;
        Ok(conn)
    }

    /// Applies the migrations this database lacks, under a named lock. MySQL commits DDL at
    /// once, so each migration must be safe to run twice (`IF NOT EXISTS`). When every migration
    /// is already recorded (a DBA may have run `sql/mysql/` by hand), no DDL is sent: the agent's
    /// user then needs only SELECT on `estafeta_schema_migrations` and INSERT, UPDATE on
    /// `estafeta_records` (`ON DUPLICATE KEY UPDATE` asks for UPDATE).
    async fn migrate(&self, conn: &mut Conn) -> Result<(), String> {
        if let Ok(applied) = conn.query::<i64, _>(APPLIED_SQL).await
            && MIGRATIONS.iter().all(|m| applied.contains(&m.version))
        {
            return Ok(());
        }
        let fail = |err| {
            format!(
                "cannot prepare the landing table at {}: {}",
                self.shown,
                self.failure(err).message()
            )
        };
        let locked: Option<Option<i64>> = conn.query_first(LOCK_SQL).await.map_err(fail)?;
        if locked.flatten() != Some(1) {
            return Err(format!(
                "another agent holds the migration lock at {} for over 30 s",
                self.shown
            ));
        }
        let result = async {
            conn.query_drop(SCHEMA_MIGRATIONS_SQL).await?;
            let applied: Vec<i64> = conn.query(APPLIED_SQL).await?;
            for migration in MIGRATIONS {
                if applied.contains(&migration.version) {
                    continue;
                }
                conn.query_drop(migration.sql).await?;
                conn.exec_drop(RECORD_MIGRATION_SQL, (migration.version, migration.name))
                    .await?;
                tracing::info!(sink = %self.name, migration = migration.name, "Database migration applied.");
            }
            Ok::<(), mysql_async::Error>(())
        }
        .await;
        // The lock also ends with the connection, which an error drops.
        let unlocked = conn.query_drop(UNLOCK_SQL).await;
        result.and(unlocked).map_err(fail)
    }

    /// Delivers the rows on the sink's connection, (re)connecting first when needed. `Err`
    /// means: retry the whole batch.
    async fn deliver_rows(
        &self,
        slot: &mut Option<Conn>,
        rows: &[LandingRow<'_>],
    ) -> Result<Vec<Outcome>, String> {
        // Unlike tokio-postgres, nothing tells a mysql_async connection that the server
        // dropped it (wait_timeout, a restart): ask, rather than fail the batch once.
        if let Some(conn) = slot.as_mut()
            && conn.ping().await.is_err()
        {
            *slot = None;
        }
        let conn = match slot {
            Some(conn) => conn,
            None => {
                let mut conn = self.connect().await?;
                self.migrate(&mut conn).await?;
                slot.insert(conn)
            }
        };
        let transient = |err| self.failure(err).message();
        let mut tx = conn
            .start_transaction(TxOpts::default())
            .await
            .map_err(transient)?;
        let statement = tx.prep(INSERT_SQL).await.map_err(transient)?;
        let mut outcomes = Vec::with_capacity(rows.len());
        let mut stopped = Stopped::default();
        if rows.iter().all(|row| row.apply.is_none()) {
            for chunk in chunks(rows) {
                // Rows behind a refused record of their key stay out of the insert.
                let live: Vec<&LandingRow<'_>> =
                    chunk.iter().filter(|r| !stopped.holds(r)).collect();
                if live.len() > 1 {
                    match tx
                        .exec_drop(multi_row_insert(live.len()), self.chunk_params(&live))
                        .await
                    {
                        Ok(()) => {
                            outcomes.extend(chunk.iter().map(|row| {
                                if stopped.holds(row) {
                                    Outcome::Skipped
                                } else {
                                    Outcome::Delivered
                                }
                            }));
                            continue;
                        }
                        Err(err) => match self.failure(err) {
                            // InnoDB undid the whole statement: find the offending rows below.
                            Failure::Row(_) => {}
                            Failure::Transient(error) => return Err(error),
                        },
                    }
                }
                for row in chunk {
                    let outcome = if stopped.holds(row) {
                        Outcome::Skipped
                    } else {
                        self.insert_row(&mut tx, &statement, row).await?
                    };
                    if matches!(outcome, Outcome::Dead { .. }) {
                        stopped.stop(row);
                    }
                    outcomes.push(outcome);
                }
            }
            tx.commit().await.map_err(transient)?;
            return Ok(outcomes);
        }
        for row in rows {
            let outcome = if stopped.holds(row) {
                Outcome::Skipped
            } else if let Some(apply) = &row.apply {
                match self.insert_and_apply(&mut tx, &statement, row, apply).await {
                    Ok(()) => Outcome::Delivered,
                    Err(Failure::Row(reason)) => Outcome::Dead { reason },
                    Err(Failure::Transient(error)) => return Err(error),
                }
            } else {
                self.insert_row(&mut tx, &statement, row).await?
            };
            if matches!(outcome, Outcome::Dead { .. }) {
                stopped.stop(row);
            }
            outcomes.push(outcome);
        }
        tx.commit().await.map_err(transient)?;
        Ok(outcomes)
    }

    /// Inserts one row; a refusal of its data makes it dead. `Err` means: retry the batch.
    async fn insert_row(
        &self,
        tx: &mut Transaction<'_>,
        statement: &Statement,
        row: &LandingRow<'_>,
    ) -> Result<Outcome, String> {
        match tx.exec_drop(statement, self.params(row)).await {
            Ok(()) => Ok(Outcome::Delivered),
            Err(err) => match self.failure(err) {
                // InnoDB undid this statement only; the transaction goes on.
                Failure::Row(reason) => Ok(Outcome::Dead { reason }),
                Failure::Transient(error) => Err(error),
            },
        }
    }

    /// Upserts `beat` into `estafeta_agents`, creating the table and view first if needed.
    async fn send_heartbeat(
        &self,
        beat: &crate::sinks::heartbeat::Heartbeat,
    ) -> Result<(), String> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_mut()
            && conn.ping().await.is_err()
        {
            *slot = None;
        }
        if slot.is_none() {
            let mut conn = self.connect().await?;
            self.migrate(&mut conn).await?;
            *slot = Some(conn);
        }
        let conn = slot.as_mut().expect("connected just above");
        let fail = |err| {
            format!(
                "heartbeat to {}: {}",
                self.shown,
                self.failure(err).message()
            )
        };
        if !self.agents_ready.load(Ordering::Acquire) {
            let locked: Option<Option<i64>> = conn.query_first(LOCK_SQL).await.map_err(fail)?;
            if locked.flatten() != Some(1) {
                return Err(format!(
                    "another agent holds the migration lock at {} for over 30 s",
                    self.shown
                ));
            }
            let created = conn.query_drop(AGENTS_SQL).await;
            let unlocked = conn.query_drop(UNLOCK_SQL).await;
            created.and(unlocked).map_err(fail)?;
            self.agents_ready.store(true, Ordering::Release);
        }
        let sinks = serde_json::to_string(&beat.sinks).map_err(|err| err.to_string())?;
        let params = Params::Positional(vec![
            Value::from(beat.agent_id.as_str()),
            Value::from(beat.hostname.as_str()),
            Value::from(beat.version.as_str()),
            Value::from(beat.started_at.as_str()),
            Value::from(beat.sent_at.as_str()),
            Value::from(beat.records_pending),
            Value::from(beat.oldest_pending_age_secs),
            Value::from(beat.dead_letters),
            Value::from(beat.disk_free_bytes),
            Value::from(beat.staging_blocked.as_deref()),
            Value::from(beat.last_error.as_deref()),
            Value::from(sinks.as_str()),
        ]);
        conn.exec_drop(UPSERT_AGENT_SQL, params).await.map_err(fail)
    }

    /// Apply mode, one record: under a savepoint, the landing row and, when the row is new,
    /// the record's statement.
    async fn insert_and_apply(
        &self,
        tx: &mut Transaction<'_>,
        insert: &Statement,
        row: &LandingRow<'_>,
        apply: &ApplyRow,
    ) -> Result<(), Failure> {
        let transient = |err| Failure::Transient(self.failure(err).message());
        tx.query_drop(SAVEPOINT_SQL).await.map_err(transient)?;
        tx.exec_drop(insert, self.params(row))
            .await
            .map_err(|err| self.failure(err))?;
        if tx.affected_rows() == 0 {
            // Delivered, and applied, before: a replay.
            return Ok(());
        }
        let statement = tx
            .prep(apply.statement.sql.as_str())
            .await
            .map_err(|err| Failure::Transient(apply.context(self.failure(err).message())))?;
        let values: Vec<Value> = apply
            .values
            .iter()
            .map(|value| match value {
                Bound::Null => Value::NULL,
                Bound::Bool(b) => Value::Int(i64::from(*b)),
                Bound::Int(n) => Value::Int(*n),
                Bound::Number(text) | Bound::Text(text) | Bound::Json(text) => {
                    Value::Bytes(text.clone().into_bytes())
                }
            })
            .collect();
        match tx.exec_drop(&statement, Params::Positional(values)).await {
            Ok(()) => Ok(()),
            Err(err) => match self.failure(err) {
                Failure::Row(reason) => {
                    // Undo the landing row with the refused statement.
                    tx.query_drop(ROLLBACK_TO_SAVEPOINT_SQL)
                        .await
                        .map_err(transient)?;
                    Err(Failure::Row(reason.map(|m| apply.context(m))))
                }
                Failure::Transient(error) => Err(Failure::Transient(apply.context(error))),
            },
        }
    }

    fn params(&self, row: &LandingRow<'_>) -> Params {
        Params::Positional(self.values(row))
    }

    /// The parameters of a multi-row insert: each row's, in order.
    fn chunk_params(&self, rows: &[&LandingRow]) -> Params {
        Params::Positional(rows.iter().flat_map(|row| self.values(row)).collect())
    }

    fn values(&self, row: &LandingRow<'_>) -> Vec<Value> {
        let t = row.staged_at.naive_utc();
        use chrono::{Datelike as _, Timelike as _};
        let staged_at = Value::Date(
            // Years beyond u16 cannot come from an RFC 3339 string.
            u16::try_from(t.year()).unwrap_or(0),
            t.month() as u8,
            t.day() as u8,
            t.hour() as u8,
            t.minute() as u8,
            t.second() as u8,
            t.nanosecond() / 1_000 % 1_000_000,
        );
        vec![
            Value::from(&*row.idempotency_key),
            Value::from(row.agent_id(&self.agent_id)),
            Value::from(row.seq),
            Value::from(&*row.action),
            Value::from(&*row.entity),
            Value::from(row.record_key.as_deref()),
            Value::from(&*row.payload),
            staged_at,
        ]
    }

    /// Sorts an error (module documentation) and words it without the password: a refused
    /// row by its error code and SQLSTATE, with the server's message (which quotes values:
    /// `Duplicate entry '…' for key …`) kept for the dead letter only.
    fn failure(&self, err: mysql_async::Error) -> Failure {
        match err {
            mysql_async::Error::Server(server) => {
                let mut summary = format!("MySQL {} ({})", server.code, server.state);
                if let Some(name) = error_name(server.code) {
                    summary.push(' ');
                    summary.push_str(name);
                }
                let row = server.state.starts_with("22")
                    || server.state.starts_with("23")
                    || ROW_ERROR_CODES.contains(&server.code);
                if row {
                    Failure::Row(Refusal::new(
                        self.secrets.scrub(&summary),
                        &self.secrets.scrub(&server.message),
                    ))
                } else if NAMING_ERROR_CODES.contains(&server.code) {
                    Failure::Transient(
                        self.secrets
                            .scrub(&format!("{summary}: {}", server.message)),
                    )
                } else {
                    Failure::Transient(self.secrets.scrub(&summary))
                }
            }
            other => Failure::Transient(self.secrets.scrub(&error_chain(&other))),
        }
    }
}

/// Server errors whose messages name objects (users, databases, tables, columns), never a
/// row's values, so they are shown; any other error is shown by its code and SQLSTATE only.
const NAMING_ERROR_CODES: &[u16] = &[
    1040, // too many connections
    1044, 1045, // access denied
    1049, // unknown database
    1053, // server shutdown
    1054, // unknown column
    1129, // host blocked
    1142, 1143, // command denied
    1146, // table does not exist
    1203, // max_user_connections
    1205, // lock wait timeout
    1213, // deadlock
    1226, // resource limit
    1290, 1792, 1836, // read-only
    1461, // too many prepared statements
    1927, // connection killed
];

/// A short name for the server errors a delivery meets.
fn error_name(code: u16) -> Option<&'static str> {
    Some(match code {
        1048 => "column cannot be null",
        1062 => "duplicate entry",
        1264 | 1690 => "value out of range",
        1265 => "data truncated",
        1292 | 1366 | 1367 => "incorrect value",
        1406 => "data too long",
        1451 | 1452 => "foreign key constraint fails",
        3140 => "invalid JSON text",
        3819 | 4025 => "check constraint violated",
        1205 => "lock wait timeout",
        1213 => "deadlock",
        1040 => "too many connections",
        _ => return None,
    })
}

/// Splits a batch into the rows of each multi-row insert, in order.
fn chunks<'r, 'a>(rows: &'r [LandingRow<'a>]) -> Vec<&'r [LandingRow<'a>]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, row) in rows.iter().enumerate() {
        let full = i - start == CHUNK_MAX_ROWS || bytes + row.payload.len() > CHUNK_MAX_BYTES;
        if i > start && full {
            out.push(&rows[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += row.payload.len();
    }
    if start < rows.len() {
        out.push(&rows[start..]);
    }
    out
}

/// `INSERT_SQL` with `rows` row placeholders. mysql_async keeps the statements it prepared
/// (an LRU cache per connection), so a batch size seen before costs no extra round trip.
fn multi_row_insert(rows: usize) -> String {
    let (head, tail) = INSERT_SQL
        .split_once(ROW_PLACEHOLDERS)
        .expect("sql/mysql/insert_record.sql has one row of placeholders");
    let mut sql =
        String::with_capacity(head.len() + tail.len() + rows * (ROW_PLACEHOLDERS.len() + 2));
    sql.push_str(head);
    for i in 0..rows {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(ROW_PLACEHOLDERS);
    }
    sql.push_str(tail);
    sql
}

impl Sink for MysqlSink {
    fn applies_in_one_transaction(&self) -> bool {
        true
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn deliver<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(async move {
            let rows = Rows::new(batch, self.apply.as_deref(), self.landing_key.as_ref());
            if rows.rows.is_empty() {
                return rows.finish(Vec::new());
            }
            let mut slot = self.conn.lock().await;
            let result =
                tokio::time::timeout(BATCH_TIMEOUT, self.deliver_rows(&mut slot, &rows.rows)).await;
            let outcomes =
                landing::outcomes_or_retry(&self.name, rows.rows.len(), result, || *slot = None);
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
        self.observed.transport()
    }

    fn probe(&self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            let mut conn = self.connect().await.map_err(anyhow::Error::msg)?;
            conn.query_drop("SELECT 1")
                .await
                .map_err(|err| anyhow::anyhow!(self.failure(err).message()))
                .with_context(|| format!("MySQL at {} answered with an error", self.shown))?;
            // Apply mode: every statement must prepare (its tables and columns exist).
            for statement in self.apply.iter().flat_map(|a| a.statements()) {
                let prepared = conn
                    .prep(statement.sql.as_str())
                    .await
                    .map_err(|err| anyhow::anyhow!(self.failure(err).message()))
                    .with_context(|| {
                        format!(
                            "the apply statement {} does not prepare at {}; fix the file or the tables",
                            statement.file.display(),
                            self.shown
                        )
                    })?;
                let _ = conn.close(prepared).await;
            }
            let _ = conn.disconnect().await;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn row(seq: i64, payload_bytes: usize) -> LandingRow<'static> {
        LandingRow {
            idempotency_key: format!("id-{seq}").into(),
            seq,
            action: "create".into(),
            entity: "patient".into(),
            record_key: None,
            payload: "x".repeat(payload_bytes).into(),
            staged_at: Utc::now(),
            apply: None,
            origin: None,
        }
    }

    fn sizes(rows: &[LandingRow<'_>]) -> Vec<usize> {
        chunks(rows).iter().map(|c| c.len()).collect()
    }

    #[test]
    fn chunks_keep_every_row_in_order_within_the_limits() {
        let rows: Vec<_> = (0..600).map(|i| row(i, 1000)).collect();
        assert_eq!(sizes(&rows), [256, 256, 88]);
        let seqs: Vec<i64> = chunks(&rows).concat().iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (0..600).collect::<Vec<_>>());

        // 300 KB payloads: three fit under the byte limit; a row over it goes alone.
        let rows: Vec<_> = (0..7).map(|i| row(i, 300_000)).collect();
        assert_eq!(sizes(&rows), [3, 3, 1]);
        let rows = vec![row(0, 10), row(1, 2 * CHUNK_MAX_BYTES), row(2, 10)];
        assert_eq!(sizes(&rows), [1, 1, 1]);
        assert!(chunks(&[]).is_empty());
    }

    #[test]
    fn the_multi_row_insert_is_the_landing_insert_with_more_rows() {
        let sql = multi_row_insert(3);
        assert_eq!(sql.matches(ROW_PLACEHOLDERS).count(), 3);
        assert_eq!(sql.matches('?').count(), 24);
        assert!(sql.contains(&format!(
            "{ROW_PLACEHOLDERS}, {ROW_PLACEHOLDERS}, {ROW_PLACEHOLDERS}"
        )));
        assert!(
            sql.trim_end()
                .ends_with("ON DUPLICATE KEY UPDATE idempotency_key = idempotency_key")
        );
        assert_eq!(multi_row_insert(1), INSERT_SQL);
    }
}
