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
//! A batch is one `BEGIN IMMEDIATE` transaction running one prepared `INSERT … ON CONFLICT
//! (idempotency_key) DO NOTHING` per row: in-process statements cost no round trip. A row that
//! breaks a CHECK (SQLite enforces no VARCHAR length, so the schema checks the same limits as
//! the other dialects, and `json_valid`) fails alone, since SQLite's default ABORT undoes only
//! the failing statement, and becomes dead. Anything else (busy or locked past the timeout, a
//! full disk, an I/O error, a read-only file) retries the whole batch with the file reopened.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use estafeta_staging::Delivery;
use rusqlite::{Connection, ErrorCode, TransactionBehavior, params};
use tokio::sync::Mutex;

use super::database::{
    BATCH_TIMEOUT, DatabaseSinkConfig, Failure, LandingRow, Migration, Rows, dry_run_lines,
    retry_all,
};
use super::{BoxFuture, Outcome, Sink};

/// How long a statement waits for another writer of the file before giving up (busy).
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Schema changes, in order.
const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "0001_landing",
    sql: include_str!("../../../sql/sqlite/0001_landing.sql"),
}];

const SCHEMA_MIGRATIONS_SQL: &str = include_str!("../../../sql/sqlite/schema_migrations.sql");
const INSERT_SQL: &str = include_str!("../../../sql/sqlite/insert_record.sql");
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
        })
    }
}

/// The path in `sqlite://PATH` (or `sqlite:PATH`), without a `?query`.
fn sqlite_path(url: &str) -> anyhow::Result<PathBuf> {
    let rest = url
        .split_once(':')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("sqlite"))
        .map(|(_, rest)| rest.strip_prefix("//").unwrap_or(rest))
        .with_context(|| format!("{url:?} is not a sqlite:// URL"))?;
    let path = rest.split('?').next().unwrap_or_default();
    if path.is_empty() {
        anyhow::bail!(
            "the SQLite URL {url:?} names no file; expected sqlite://./central.db (relative) or sqlite:///var/lib/estafeta/central.db (absolute)"
        );
    }
    Ok(PathBuf::from(path))
}

/// Opens (creating if needed) the file, sets it up and applies the missing migrations.
fn open(path: &Path) -> Result<Connection, String> {
    let shown = path.display();
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|err| format!("cannot create the folder {}: {err}", parent.display()))?;
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
    rows: &[LandingRow],
) -> Result<Vec<Outcome>, String> {
    let transient = |err| failure(err).message();
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(transient)?;
    let mut outcomes = Vec::with_capacity(rows.len());
    {
        let mut statement = tx.prepare_cached(INSERT_SQL).map_err(transient)?;
        for row in rows {
            let staged_at = row
                .staged_at
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            let result = statement.execute(params![
                row.idempotency_key,
                agent_id,
                row.seq,
                row.action,
                row.entity,
                row.record_key,
                row.payload,
                staged_at,
            ]);
            match result {
                Ok(_) => outcomes.push(Outcome::Delivered),
                Err(err) => match failure(err) {
                    // ABORT undid this statement only; the transaction goes on.
                    Failure::Row(reason) => outcomes.push(Outcome::Dead { reason }),
                    Failure::Transient(error) => return Err(error),
                },
            }
        }
    }
    tx.commit().map_err(transient)?;
    Ok(outcomes)
}

/// A refused row's data (constraint, type, size) or anything else.
fn failure(err: rusqlite::Error) -> Failure {
    let message = format!("SQLite: {err}");
    match err.sqlite_error_code() {
        Some(ErrorCode::ConstraintViolation | ErrorCode::TypeMismatch | ErrorCode::TooBig) => {
            Failure::Row(message)
        }
        _ => Failure::Transient(message),
    }
}

impl Sink for SqliteSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn deliver<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(async move {
            let mut rows = Rows::new(batch);
            if rows.rows.is_empty() {
                return rows.finish(Vec::new());
            }
            let mut slot = self.conn.lock().await;
            let conn = slot.take();
            let path = Arc::clone(&self.path);
            let agent_id = Arc::clone(&self.agent_id);
            let landing = std::mem::take(&mut rows.rows);
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
        dry_run_lines(&self.shown, batch)
    }

    fn probe(&self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            let path = Arc::clone(&self.path);
            let shown = self.shown.clone();
            // Opening is connecting: it creates the file and folder, as a delivery would.
            tokio::task::spawn_blocking(move || {
                let conn = open(&path).map_err(anyhow::Error::msg)?;
                conn.query_row("SELECT 1", [], |row| row.get::<_, i64>(0))
                    .with_context(|| format!("SQLite at {shown} answered with an error"))?;
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

    #[test]
    fn sqlite_urls_name_relative_and_absolute_paths() {
        let path = |url: &str| sqlite_path(url).ok();
        assert_eq!(
            path("sqlite://./central.db"),
            Some(PathBuf::from("./central.db"))
        );
        assert_eq!(
            path("sqlite://central.db"),
            Some(PathBuf::from("central.db"))
        );
        assert_eq!(
            path("sqlite:///var/lib/e/c.db"),
            Some(PathBuf::from("/var/lib/e/c.db"))
        );
        assert_eq!(
            path("SQLITE:data/c.db?mode=rwc"),
            Some(PathBuf::from("data/c.db"))
        );
        assert_eq!(path("sqlite://"), None);
    }
}
