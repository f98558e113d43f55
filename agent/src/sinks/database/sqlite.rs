//! SQLite database sink, with rusqlite on `spawn_blocking` (see [`super::database`] for the
//! landing table and the rules every database sink follows). It is the central sink of an agent
//! started with no configuration.
//!
//! `sqlite://./central.db` and `sqlite://central.db` are relative to the working directory at
//! start (resolved once, so a later change of directory does not move the database);
//! `sqlite:///abs/path.db` is absolute. The file and its folder are created when missing. WAL
//! mode, `synchronous=FULL` (a delivered record is acknowledged and may leave staging, so it must
//! survive a power cut; WAL's usual `NORMAL` may lose the last commits) and a busy timeout for
//! other readers and writers of the file.
//!
//! Heartbeats ([`crate::heartbeat`]) are upserted into `estafeta_agents` (table and
//! `estafeta_fleet` view from `sql/sqlite/agents.sql`) on a connection of their own.
//!
//! A batch is one `BEGIN IMMEDIATE` transaction running one prepared `INSERT … ON CONFLICT
//! (idempotency_key) DO NOTHING` per row, in batch (sequence) order: in-process statements cost
//! no round trip. A batch carries runs of a key (several records of one entity and key, or the
//! keyless records of an entity), so rows of one key land in sequence order. A row that breaks
//! a CHECK (SQLite enforces no VARCHAR length, so the schema checks the same limits as the other
//! dialects, and `json_valid`) fails alone, since SQLite's default ABORT undoes only the failing
//! statement, and becomes dead; the later records of its key in the batch are then not inserted
//! but answered `Skipped` (they must not overtake it), while other keys go on. Anything else
//! (busy or locked past the timeout, a full disk, an I/O error, a read-only file) retries the
//! whole batch with the file reopened.
//!
//! Apply mode ([`super::apply`]): a record with a statement file runs under a savepoint: the
//! landing insert and, when it added the row (a replay adds none), the record's statement; a
//! refused statement rolls back to the savepoint, so the record alone is dead and the rest of
//! its key's run is skipped.

use crate::sinks::record_template::RecordTemplate;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use estafeta_staging::Delivery;
use rusqlite::{Connection, ErrorCode, TransactionBehavior, params};
use tokio::sync::Mutex;

use super::DatabaseSinkConfig;
use super::landing::{
    ApplyRow, BATCH_TIMEOUT, Failure, LandingRow, Migration, Rows, Stopped, dry_run_lines,
    retry_all,
};
use crate::db::apply::{ApplyStatements, Bound};
use crate::db::sqlite_path;
use crate::sinks::{BoxFuture, Outcome, Refusal, Sink};

/// How long a statement waits for another writer of the file before giving up (busy).
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Schema changes, in order.
const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "0001_landing",
    sql: include_str!("../../../../sql/sqlite/0001_landing.sql"),
}];

const SCHEMA_MIGRATIONS_SQL: &str = include_str!("../../../../sql/sqlite/schema_migrations.sql");
const INSERT_SQL: &str = include_str!("../../../../sql/sqlite/insert_record.sql");
const AGENTS_SQL: &str = include_str!("../../../../sql/sqlite/agents.sql");
const UPSERT_AGENT_SQL: &str = include_str!("../../../../sql/sqlite/upsert_agent.sql");
const APPLIED_SQL: &str = "SELECT version FROM estafeta_schema_migrations";
const RECORD_MIGRATION_SQL: &str =
    "INSERT OR IGNORE INTO estafeta_schema_migrations (version, name) VALUES (?1, ?2)";

/// Delivers records into a landing table in a SQLite file.
pub struct SqliteSink {
    name: String,
    agent_id: Arc<str>,
    path: Arc<Path>,
    /// `sqlite://` and the resolved path, for messages.
    shown: String,
    /// Taken out while a batch runs on the blocking pool, put back after.
    conn: Mutex<Option<Connection>>,
    /// Apply mode: the statement files.
    apply: Option<Arc<ApplyStatements>>,
    /// The landing key's template; `None`: the record's id.
    landing_key: Option<RecordTemplate>,
}

impl SqliteSink {
    /// Resolves the path; opens nothing.
    pub fn new(name: impl Into<String>, config: DatabaseSinkConfig) -> anyhow::Result<Self> {
        let path = sqlite_path(&config.url)?;
        let path = std::path::absolute(&path).with_context(|| {
            format!(
                "cannot resolve the SQLite path {} against the working directory",
                path.display()
            )
        })?;
        Ok(Self {
            name: name.into(),
            agent_id: config.agent_id.into(),
            shown: format!("sqlite://{}", path.display()),
            path: path.into(),
            conn: Mutex::new(None),
            apply: config.apply,
            landing_key: config.idempotency_key,
        })
    }
}

/// Opens (creating if needed) the file, sets it up and applies the missing migrations.
fn open(path: &Path) -> Result<Connection, String> {
    let shown = path.display();
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|err| format!("cannot create the folder {}: {err}", parent.display()))?;
    }
    // The landing table holds whole payloads: a new file is made 0600 before SQLite opens it, and
    // SQLite gives its `-wal` and `-shm` files the database file's mode.
    if let Err(err) = estafeta_staging::private_file()
        .write(true)
        .create_new(true)
        .open(path)
        && err.kind() != std::io::ErrorKind::AlreadyExists
    {
        return Err(format!("cannot create the SQLite database {shown}: {err}"));
    }
    let fail = |err: rusqlite::Error| format!("cannot open the SQLite database {shown}: {err}");
    let mut conn = Connection::open(path).map_err(fail)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(fail)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .map_err(fail)?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(path = %shown, journal_mode = %mode, "The SQLite sink could not switch to WAL mode.");
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(fail)?;

    let fail = |err: rusqlite::Error| format!("cannot prepare the landing table in {shown}: {err}");
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(fail)?;
    tx.execute_batch(SCHEMA_MIGRATIONS_SQL).map_err(fail)?;
    let applied: Vec<i64> = {
        let mut statement = tx.prepare(APPLIED_SQL).map_err(fail)?;
        statement
            .query_map([], |row| row.get(0))
            .map_err(fail)?
            .collect::<Result<_, _>>()
            .map_err(fail)?
    };
    for migration in MIGRATIONS {
        if applied.contains(&migration.version) {
            continue;
        }
        tx.execute_batch(migration.sql).map_err(fail)?;
        tx.execute(
            RECORD_MIGRATION_SQL,
            params![migration.version, migration.name],
        )
        .map_err(fail)?;
        tracing::info!(path = %shown, migration = migration.name, "Database migration applied.");
    }
    tx.commit().map_err(fail)?;
    Ok(conn)
}

/// Inserts the rows in one transaction. `Err` means: retry the whole batch.
fn insert(
    conn: &mut Connection,
    agent_id: &str,
    rows: &[LandingRow<'_>],
) -> Result<Vec<Outcome>, String> {
    let transient = |err| failure(err).message();
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(transient)?;
    let mut outcomes = Vec::with_capacity(rows.len());
    let mut stopped = Stopped::default();
    {
        let mut statement = tx.prepare_cached(INSERT_SQL).map_err(transient)?;
        for row in rows {
            if stopped.holds(row) {
                // Behind a refused record of its key: not inserted, not applied.
                outcomes.push(Outcome::Skipped);
                continue;
            }
            let staged_at = row
                .staged_at
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            if row.apply.is_some() {
                tx.execute_batch(SAVEPOINT_SQL).map_err(transient)?;
            }
            let result = statement
                .execute(params![
                    row.idempotency_key,
                    agent_id,
                    row.seq,
                    row.action,
                    row.entity,
                    row.record_key,
                    row.payload,
                    staged_at,
                ])
                .map_err(failure)
                .and_then(|added| match &row.apply {
                    // Not added: delivered, and applied, before (a replay).
                    Some(apply) if added > 0 => apply_row(&tx, apply),
                    _ => Ok(()),
                });
            if row.apply.is_some() {
                match &result {
                    Ok(()) => tx.execute_batch(RELEASE_SQL).map_err(transient)?,
                    Err(Failure::Row(_)) => tx.execute_batch(ROLLBACK_SQL).map_err(transient)?,
                    Err(Failure::Transient(_)) => {}
                }
            }
            match result {
                Ok(()) => outcomes.push(Outcome::Delivered),
                // ABORT undid this statement only (and a savepoint the rest of the record);
                // the transaction goes on.
                Err(Failure::Row(reason)) => {
                    stopped.stop(row);
                    outcomes.push(Outcome::Dead { reason });
                }
                Err(Failure::Transient(error)) => return Err(error),
            }
        }
    }
    tx.commit().map_err(transient)?;
    Ok(outcomes)
}

const SAVEPOINT_SQL: &str = "SAVEPOINT estafeta_row";
const RELEASE_SQL: &str = "RELEASE estafeta_row";
const ROLLBACK_SQL: &str = "ROLLBACK TO estafeta_row; RELEASE estafeta_row";

/// Runs one record's apply statement.
fn apply_row(conn: &Connection, apply: &ApplyRow) -> Result<(), Failure> {
    let in_file = |failure: Failure| failure.map(|m| apply.context(m));
    let mut statement = conn
        .prepare_cached(&apply.statement.sql)
        .map_err(|err| in_file(failure(err)))?;
    let values = apply.values.iter().map(|value| {
        use rusqlite::types::Value;
        match value {
            Bound::Null => Value::Null,
            Bound::Bool(b) => Value::Integer(i64::from(*b)),
            Bound::Int(n) => Value::Integer(*n),
            Bound::Number(text) => text
                .parse::<f64>()
                .map_or_else(|_| Value::Text(text.clone()), Value::Real),
            Bound::Text(text) | Bound::Json(text) => Value::Text(text.clone()),
        }
    });
    statement
        .execute(rusqlite::params_from_iter(values))
        .map(|_| ())
        .map_err(|err| in_file(failure(err)))
}

/// A refused row's data (constraint, type, size) or anything else. A refusal is shown by its
/// kind; SQLite's message (a trigger's `RAISE` may quote values) is kept for the dead letter.
fn failure(err: rusqlite::Error) -> Failure {
    let message = format!("SQLite: {err}");
    let kind = match &err {
        rusqlite::Error::SqliteFailure(failure, _) => match failure.extended_code {
            275 => "CHECK constraint failed",
            787 => "FOREIGN KEY constraint failed",
            1299 => "NOT NULL constraint failed",
            1555 | 2067 => "UNIQUE constraint failed",
            1811 => "refused by a trigger",
            _ => "",
        },
        _ => "",
    };
    match err.sqlite_error_code() {
        Some(
            code @ (ErrorCode::ConstraintViolation | ErrorCode::TypeMismatch | ErrorCode::TooBig),
        ) => {
            let summary = if kind.is_empty() {
                format!("SQLite {code:?}")
            } else {
                format!("SQLite {code:?}: {kind}")
            };
            Failure::Row(Refusal {
                summary,
                detail: message,
            })
        }
        _ => Failure::Transient(message),
    }
}

impl Sink for SqliteSink {
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
            let mut slot = self.conn.lock().await;
            let conn = slot.take();
            let path = Arc::clone(&self.path);
            let agent_id = Arc::clone(&self.agent_id);
            // The blocking task may outlive this call (a timeout): it owns its rows.
            let landing: Vec<LandingRow<'static>> = std::mem::take(&mut rows.rows)
                .into_iter()
                .map(LandingRow::into_owned)
                .collect();
            let count = landing.len();
            let work = tokio::task::spawn_blocking(move || {
                let mut conn = match conn {
                    Some(conn) => conn,
                    None => match open(&path) {
                        Ok(conn) => conn,
                        Err(error) => return (None, Err(error)),
                    },
                };
                let result = insert(&mut conn, &agent_id, &landing);
                // A failed batch reopens the file next time.
                (result.is_ok().then_some(conn), result)
            });
            let outcomes = match tokio::time::timeout(BATCH_TIMEOUT, work).await {
                Ok(Ok((conn, result))) => {
                    *slot = conn;
                    match result {
                        Ok(outcomes) => outcomes,
                        Err(error) => retry_all(&self.name, count, error),
                    }
                }
                Ok(Err(join)) => {
                    retry_all(&self.name, count, format!("the SQLite task failed: {join}"))
                }
                // The blocking task runs on; its connection closes when it ends.
                Err(_) => retry_all(
                    &self.name,
                    count,
                    format!("the batch took longer than {BATCH_TIMEOUT:?}"),
                ),
            };
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
        Box::pin(async move {
            let path = Arc::clone(&self.path);
            let shown = self.shown.clone();
            let beat = beat.clone();
            let sent = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                let conn = open(&path).map_err(anyhow::Error::msg)?;
                let fail = || format!("heartbeat to {shown}");
                conn.execute_batch(AGENTS_SQL).with_context(fail)?;
                let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
                conn.execute(
                    UPSERT_AGENT_SQL,
                    params![
                        beat.agent_id,
                        beat.hostname,
                        beat.version,
                        beat.started_at,
                        beat.sent_at,
                        count(beat.records_pending),
                        beat.oldest_pending_age_secs,
                        count(beat.dead_letters),
                        beat.disk_free_bytes.map(count),
                        beat.staging_blocked,
                        beat.last_error,
                        serde_json::to_string(&beat.sinks)?,
                    ],
                )
                .with_context(fail)?;
                Ok(())
            })
            .await;
            Some(
                sent.context("the SQLite heartbeat task failed")
                    .and_then(|r| r),
            )
        })
    }

    fn transport(&self) -> crate::tls::Transport {
        crate::tls::Transport::local()
    }

    fn probe(&self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            let path = Arc::clone(&self.path);
            let shown = self.shown.clone();
            let apply = self.apply.clone();
            // Opening is connecting: it creates the file and folder, as a delivery would.
            tokio::task::spawn_blocking(move || {
                let conn = open(&path).map_err(anyhow::Error::msg)?;
                conn.query_row("SELECT 1", [], |row| row.get::<_, i64>(0))
                    .with_context(|| format!("SQLite at {shown} answered with an error"))?;
                // Apply mode: every statement must prepare (its tables and columns exist).
                for statement in apply.iter().flat_map(|a| a.statements()) {
                    conn.prepare(&statement.sql).with_context(|| {
                        format!(
                            "the apply statement {} does not prepare in {shown}; fix the file or the tables",
                            statement.file.display()
                        )
                    })?;
                }
                Ok(())
            })
            .await
            .context("the SQLite probe task failed")?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(seq: u64, action: &str, payload: &str) -> Delivery {
        crate::sinks::test_delivery(seq, action, "usuario", Some(&format!("k{seq}")), payload)
    }

    #[tokio::test]
    async fn apply_mode_applies_each_record_once_and_refuses_alone() {
        let dir = tempfile::tempdir().expect("temp dir");
        let apply = dir.path().join("apply");
        std::fs::create_dir(&apply).expect("mkdir");
        std::fs::write(
            apply.join("usuario.upsert.sql"),
            "INSERT INTO usuario (matricula, nome, ativo, n) VALUES (:matricula, :nome, :ativo, 1)
             ON CONFLICT (matricula) DO UPDATE SET nome = excluded.nome, n = n + 1;",
        )
        .expect("write");
        let db = dir.path().join("central.db");
        let conn = Connection::open(&db).expect("open");
        conn.execute_batch(
            "CREATE TABLE usuario (matricula TEXT PRIMARY KEY, nome TEXT NOT NULL CHECK (length(nome) <= 10),
                                   ativo INTEGER NOT NULL, n INTEGER NOT NULL)",
        )
        .expect("create");
        let statements = ApplyStatements::load(&apply, crate::db::Dialect::Sqlite).expect("loads");
        let sink = SqliteSink::new(
            "database",
            DatabaseSinkConfig {
                url: format!("sqlite://{}", db.display()),
                agent_id: "a".to_owned(),
                apply: Some(Arc::new(statements)),
                idempotency_key: None,
                connections: crate::sinks::database::DEFAULT_CONNECTIONS,
                transaction_pooling: false,
            },
        )
        .expect("sink");
        let batch = [
            delivery(
                1,
                "upsert",
                r#"{"matricula":"A","nome":"Ana","ativo":true}"#,
            ),
            delivery(
                2,
                "upsert",
                r#"{"matricula":"B","nome":"Nome longo demais","ativo":true}"#,
            ),
            delivery(3, "upsert", r#"{"matricula":"C","ativo":false}"#),
            delivery(
                4,
                "upsert",
                r#"{"matricula":"A","nome":"Ana Maria","ativo":true}"#,
            ),
            delivery(5, "delete", r#"{"matricula":"A"}"#),
        ];
        let outcomes = sink.deliver(&batch).await;
        assert_eq!(outcomes[0], Outcome::Delivered);
        assert!(
            matches!(&outcomes[1], Outcome::Dead { reason } if reason.summary.contains("CHECK") && reason.summary.contains("usuario.upsert.sql") && !reason.summary.contains("Nome longo")),
            "{outcomes:?}"
        );
        assert!(
            matches!(&outcomes[2], Outcome::Dead { reason } if reason.summary.contains("\"nome\" is missing")),
            "{outcomes:?}"
        );
        assert_eq!(outcomes[3], Outcome::Delivered);
        assert!(
            matches!(&outcomes[4], Outcome::Dead { reason } if reason.summary.contains("usuario.delete.sql")),
            "{outcomes:?}"
        );
        // A replay of the same records applies nothing again.
        let again = sink.deliver(&batch[..1]).await;
        assert_eq!(again, [Outcome::Delivered]);
        let rows: Vec<(String, String, i64, i64)> = conn
            .prepare("SELECT matricula, nome, ativo, n FROM usuario")
            .expect("prepare")
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(rows, [("A".to_owned(), "Ana Maria".to_owned(), 1, 2)]);
        let landed: i64 = conn
            .query_row("SELECT count(*) FROM estafeta_records", [], |r| r.get(0))
            .expect("count");
        assert_eq!(
            landed, 2,
            "the refused record's landing row was rolled back"
        );
    }
}
