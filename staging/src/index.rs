//! The SQLite index: which records exist, where their bytes are, and their delivery state per
//! sink. It is a cache of the folder plus delivery state; `reindex` rebuilds it from the folder.

use rusqlite::{Connection, OpenFlags, params};
use std::path::Path;
use std::time::Duration;

/// How long a connection waits for another process's write before giving up. Long, because a
/// reader must never fail with "database is locked" while the daemon flushes.
const BUSY_TIMEOUT: Duration = Duration::from_secs(60);

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS segments (
    id          INTEGER PRIMARY KEY,
    path        TEXT NOT NULL UNIQUE,      -- relative to the staging root, '/' separated
    indexed_len INTEGER NOT NULL,          -- bytes of the file the index has read
    sealed      INTEGER NOT NULL DEFAULT 0,-- no process appends to it any more
    deleting    INTEGER NOT NULL DEFAULT 0 -- cleanup decided to delete it
);
CREATE TABLE IF NOT EXISTS records (
    seq          INTEGER PRIMARY KEY,
    id           TEXT NOT NULL UNIQUE,
    segment_id   INTEGER NOT NULL,
    offset       INTEGER NOT NULL,
    len          INTEGER NOT NULL,
    action       TEXT NOT NULL,
    entity       TEXT NOT NULL,
    key          TEXT,
    staged_at    TEXT NOT NULL,
    sinks        TEXT NOT NULL,            -- comma-separated sink names
    open_sinks   INTEGER NOT NULL,         -- sinks that have not confirmed it yet
    delivered_at INTEGER                   -- unix seconds, when the last sink confirmed it
);
-- A segment's records (cleanup forgets them together), and those of its records still owed to
-- a sink. The second is partial: an ack that closes a record's last sink removes one entry,
-- where indexes on (segment_id, open_sinks) and (open_sinks, seq) moved two entries each, about
-- half the cost of the ack's update of the record. `migrate` drops those of older versions.
-- Queries of owed records say `open_sinks > 0` word for word, so SQLite may use the partial one.
CREATE INDEX IF NOT EXISTS records_of_segment ON records(segment_id);
CREATE INDEX IF NOT EXISTS records_owed ON records(segment_id) WHERE open_sinks > 0;
CREATE TABLE IF NOT EXISTS deliveries (
    sink        TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    entity      TEXT NOT NULL,
    okey        TEXT NOT NULL,             -- 'k:' || key, or '' for keyless records
    state       TEXT NOT NULL,             -- pending | dead (delivered rows are deleted); in_flight from older versions
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_at     INTEGER NOT NULL DEFAULT 0,-- unix ms: not before
    lease_until INTEGER NOT NULL DEFAULT 0,-- unix ms: in_flight lease end (older versions; see leases)
    lease_owner TEXT,                      -- the process holding that lease (older versions)
    last_error  TEXT,
    PRIMARY KEY (sink, seq)
) WITHOUT ROWID;
-- No index by order key: the lease walks the sink's deliveries in sequence order (the primary
-- key) and holds keys back in memory. An index on (sink, entity, okey, seq) cost a b-tree page
-- per record staged and per record acked (keys, and sealed stores' keyed hashes, are in no
-- order, so each touched a page of its own): about 40 % of a settlement. `migrate` drops the
-- one older versions made.
-- Leases: the records a deliverer holds while it sends them, one row per leased batch (their
-- seqs as a JSON array), never a write per record. Marking each delivery row in flight cost a
-- row rewrite per record, about a tenth of a flush's CPU. A leased record stays 'pending' in
-- `deliveries`; while its lease lasts it holds its key back as an in-flight record does.
-- A lease is ephemeral: it ends at its settlement, at `lease_until`, or when its owner's
-- process is gone (leases.rs). Older versions marked `deliveries.state = 'in_flight'` instead;
-- such rows are still read, and given back when their owner is gone.
CREATE TABLE IF NOT EXISTS leases (
    id          INTEGER PRIMARY KEY,
    sink        TEXT NOT NULL,
    owner       TEXT NOT NULL,             -- the process holding the lease (see leases.rs)
    lease_until INTEGER NOT NULL,          -- unix ms
    seqs        TEXT NOT NULL              -- JSON array of the leased records' seqs
);
-- No index by seq alone either: a record's deliveries are found by the primary key, for each
-- sink its `records.sinks` names (`sinks_json`). Such an index cost an entry written per record
-- staged and one deleted per record delivered, a third of a delivery row's own b-tree work.
-- `migrate` drops the one older versions made.
CREATE TABLE IF NOT EXISTS client_keys (
    key         TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    receipts    TEXT NOT NULL,             -- JSON array of receipts, the first answer
    created_at  INTEGER NOT NULL,          -- unix seconds of the records' staged_at
    records     INTEGER                    -- records the request staged (see client_keys.rs)
);
-- Sources' checkpoints and last runs. `checkpoint` (JSON text, NULL before the first row;
-- sealed text when the store seals, since it may be a record key) is
-- advanced with the records that carry it (`insert_record`); `checkpoint_seq` is the seq of
-- the record that set it, so re-reading older records after a crash never moves it back.
CREATE TABLE IF NOT EXISTS sources (
    name            TEXT PRIMARY KEY,
    checkpoint      TEXT,
    checkpoint_seq  INTEGER NOT NULL DEFAULT 0,
    last_run_at     TEXT,
    last_rows       INTEGER,
    last_error      TEXT
);
CREATE TABLE IF NOT EXISTS sinks (
    name            TEXT PRIMARY KEY,
    last_success_at TEXT,
    last_failure_at TEXT,
    last_error      TEXT
);
"#;

/// Opens (creating) the index. `durable`: synchronous=FULL (deliveries, cleanup); otherwise
/// NORMAL, used only by the writer, whose records are already fsync'd in their segment and
/// re-read from it after a power cut.
pub fn open(path: &Path, durable: bool) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", if durable { "FULL" } else { "NORMAL" })?;
    // The WAL grows with a burst and SQLite keeps its size afterwards; cut it back to 4 MiB
    // at each checkpoint, so a drained agent does not hold the burst's disk space.
    conn.pragma_update(None, "journal_size_limit", 4 * 1024 * 1024)?;
    // Rows of delivered records (their keys) are zeroed when deleted, not left in free pages
    // for anyone who copies the file; cleanup also truncates the WAL (recover::cleanup).
    conn.pragma_update(None, "secure_delete", "ON")?;
    conn.execute_batch(SCHEMA)?;
    migrate(&conn)?;
    #[cfg(unix)]
    restrict_permissions(path);
    Ok(conn)
}

/// Brings an index written by an older version up to the current schema.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let has_records: bool = conn.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('client_keys') WHERE name = 'records'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )?;
    if !has_records {
        conn.execute_batch("ALTER TABLE client_keys ADD COLUMN records INTEGER")?;
    }
    // Made by earlier versions (see SCHEMA); a downgrade makes them again, which is harmless.
    conn.execute_batch(
        "DROP INDEX IF EXISTS deliveries_by_key;
         DROP INDEX IF EXISTS records_by_segment;
         DROP INDEX IF EXISTS records_open;
         DROP INDEX IF EXISTS deliveries_by_seq;",
    )?;
    Ok(())
}

#[cfg(unix)]
fn restrict_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600));
    }
}

/// Checks the index can be trusted; the error says why not.
pub fn check(conn: &Connection) -> Result<(), String> {
    let verdict: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    if verdict != "ok" {
        return Err(format!("integrity check failed: {verdict}"));
    }
    conn.query_row("SELECT COUNT(*) FROM segments", [], |r| r.get::<_, i64>(0))
        .map_err(|e| e.to_string())?;
    Ok(())
}

pub fn meta_get(conn: &Connection, k: &str) -> rusqlite::Result<Option<String>> {
    use rusqlite::OptionalExtension;
    conn.query_row("SELECT v FROM meta WHERE k = ?1", [k], |r| r.get(0))
        .optional()
}

pub fn meta_set(conn: &Connection, k: &str, v: &str) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO meta (k, v) VALUES (?1, ?2) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
        params![k, v],
    )?;
    Ok(())
}

/// Ordering group of a record: its key, or the whole entity for keyless records.
/// A record's sinks (`records.sinks`, comma separated) as a JSON array, for
/// `sink IN (SELECT value FROM json_each(?))`: with `seq = ?`, a primary-key lookup per sink.
pub(crate) fn sinks_json(sinks: &str) -> String {
    let names: Vec<&str> = sinks.split(',').filter(|s| !s.is_empty()).collect();
    serde_json::to_string(&names).expect("strings serialize")
}

pub fn order_key(key: Option<&str>) -> String {
    match key {
        Some(k) => format!("k:{k}"),
        None => String::new(),
    }
}

/// Inserts one record and its deliveries. Idempotent: a record already indexed (another
/// process rebuilt the index concurrently) is left as it is.
#[allow(clippy::too_many_arguments)]
pub fn insert_record(
    conn: &Connection,
    env: &crate::record::Envelope,
    segment_id: i64,
    offset: u64,
    len: u64,
    keys: Option<&crate::Keyring>,
) -> rusqlite::Result<bool> {
    let sinks = env.sinks.join(",");
    // A sealing store keeps the key's keyed hash: equal keys stay equal (order), and the
    // index says nothing of them without the key file.
    let key = match (keys, &env.key) {
        (Some(k), Some(key)) => Some(k.hash(key)),
        (_, key) => key.clone(),
    };
    let inserted = conn
        .prepare_cached(
            "INSERT OR IGNORE INTO records (seq, id, segment_id, offset, len, action, entity, key, staged_at, sinks, open_sinks)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )?
        .execute(params![
            env.seq as i64,
            env.id,
            segment_id,
            offset as i64,
            len as i64,
            env.action,
            env.entity,
            key,
            env.staged_at,
            sinks,
            env.sinks.len() as i64
        ])?;
    if inserted == 0 {
        return Ok(false);
    }
    let okey = order_key(key.as_deref());
    let mut stmt = conn.prepare_cached(
        "INSERT OR IGNORE INTO deliveries (sink, seq, entity, okey, state) VALUES (?1, ?2, ?3, ?4, 'pending')",
    )?;
    for sink in &env.sinks {
        stmt.execute(params![sink, env.seq as i64, env.entity, okey])?;
    }
    if let Some(mark) = &env.source {
        conn.prepare_cached(
            "INSERT INTO sources (name, checkpoint, checkpoint_seq) VALUES (?1, ?2, ?3)
             ON CONFLICT(name) DO UPDATE SET checkpoint = excluded.checkpoint,
                                             checkpoint_seq = excluded.checkpoint_seq
              WHERE excluded.checkpoint_seq > sources.checkpoint_seq",
        )?
        // A checkpoint may be a record key (a checkpoint column that is the patient's number):
        // sealed in the index when the store seals.
        .execute(params![
            mark.name,
            crate::crypt::seal_opt(keys, &mark.checkpoint),
            env.seq as i64
        ])?;
    }
    Ok(true)
}

/// Every row of `sql`, a query of two columns, as pairs.
fn pairs<A: rusqlite::types::FromSql, B: rusqlite::types::FromSql>(
    conn: &Connection,
    sql: &str,
) -> rusqlite::Result<Vec<(A, B)>> {
    conn.prepare(sql)?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect()
}

/// The first open with keys of an index written without them: every record key, order key and
/// client key still in clear becomes its keyed hash, so that records staged before and after
/// encryption was turned on keep one order per key, and sources' checkpoints are sealed: the
/// index holds no key in clear. From
/// then on the folder needs the key (it is listed in `_state/sealed-with` first).
pub fn hash_keys(
    conn: &Connection,
    keys: &crate::Keyring,
    state_dir: &Path,
) -> Result<(), crate::StoreError> {
    if meta_get(conn, "index_keys")?.as_deref() == Some("hashed") {
        return Ok(());
    }
    crate::sealed_folder::note_current(state_dir, keys)?;
    let tx = rusqlite::Transaction::new_unchecked(conn, rusqlite::TransactionBehavior::Immediate)?;
    let rows: Vec<(i64, String)> =
        pairs(&tx, "SELECT seq, key FROM records WHERE key IS NOT NULL")?;
    let had_keys = !rows.is_empty();
    for (seq, key) in rows {
        let hashed = keys.hash(&key);
        tx.execute(
            "UPDATE records SET key = ?1 WHERE seq = ?2",
            params![hashed, seq],
        )?;
    }
    // Then every keyed delivery's order key, in one pass over the deliveries (one whose record
    // is missing, which no path leaves, keeps its order key rather than failing the open).
    tx.execute(
        "UPDATE deliveries
            SET okey = COALESCE('k:' || (SELECT r.key FROM records r WHERE r.seq = deliveries.seq), okey)
          WHERE okey != ''",
        [],
    )?;
    let clients: Vec<(String, String)> = pairs(&tx, "SELECT key, fingerprint FROM client_keys")?;
    for (key, fingerprint) in clients {
        tx.execute(
            "UPDATE client_keys SET key = ?1, fingerprint = ?2 WHERE key = ?3",
            params![keys.hash(&key), keys.hash(&fingerprint), key],
        )?;
    }
    // Sources' checkpoints may hold record keys too (see insert_record).
    let checkpoints: Vec<(String, String)> = pairs(
        &tx,
        "SELECT name, checkpoint FROM sources WHERE checkpoint IS NOT NULL",
    )?;
    let had_checkpoints = !checkpoints.is_empty();
    for (name, checkpoint) in checkpoints {
        tx.execute(
            "UPDATE sources SET checkpoint = ?1 WHERE name = ?2",
            params![keys.seal_text(&checkpoint), name],
        )?;
    }
    meta_set(&tx, "index_keys", "hashed")?;
    tx.commit()?;
    if had_checkpoints {
        // Their copy outside the index, written before by cleanup or a reset.
        crate::checkpoints::save(conn, state_dir)?;
    }
    if had_keys || had_checkpoints {
        // The clear keys may survive in pages SQLite moved rather than freed (b-tree splits):
        // rewrite the file, then empty the WAL of the frames that held them.
        conn.execute_batch("VACUUM; PRAGMA wal_checkpoint(TRUNCATE);")?;
    }
    Ok(())
}
