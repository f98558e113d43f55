//! The store handle: opening (with recovery), staging through the writer thread, and the
//! delivery API the batcher uses (`next_batch`, `ack`, `fail`, `dead`, `release`), plus the
//! read-only views the CLI and the status page use.

use chrono::{DateTime, TimeZone, Utc};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::layout;
use crate::record::{State, compact_json, validate_name};
use crate::writer::{self, Message, Prepared, Reply, StageRequest, Writer};
use crate::*;

/// How many stage requests may wait for the writer before callers block on the queue.
const QUEUE_DEPTH: usize = 16 * 1024;
/// Notes a sink's latest success (`?1` sink, `?2` RFC 3339 time): in `ack` and `note_sink_result`.
const NOTE_SUCCESS_SQL: &str = "INSERT INTO sinks (name, last_success_at) VALUES (?1, ?2)
     ON CONFLICT(name) DO UPDATE SET last_success_at = excluded.last_success_at";
/// Client idempotency keys are remembered this long.
const CLIENT_KEY_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// State shared by the handle and the writer thread.
pub(crate) struct Shared {
    pub root: PathBuf,
    pub state_dir: PathBuf,
    pub failed_dir: PathBuf,
    pub opts: Options,
    poisoned: Mutex<Option<String>>,
    is_poisoned: AtomicBool,
    blocked: Mutex<Option<String>>,
    #[cfg(feature = "fault-injection")]
    pub fail_next_sync: AtomicBool,
    #[cfg(feature = "fault-injection")]
    pub fail_next_index: AtomicBool,
}

impl Shared {
    pub fn poisoned(&self) -> Option<String> {
        if !self.is_poisoned.load(Ordering::Acquire) {
            return None;
        }
        lock(&self.poisoned).clone()
    }

    pub fn poison(&self, reason: String) {
        let mut p = lock(&self.poisoned);
        if p.is_none() {
            *p = Some(reason);
        }
        self.is_poisoned.store(true, Ordering::Release);
    }

    /// Sets why staging refuses writes (`None`: it accepts them), logging each change once:
    /// a WARN with the reason when writes start being refused, an INFO when they resume.
    pub fn set_blocked(&self, reason: Option<String>) {
        let mut blocked = lock(&self.blocked);
        match (&*blocked, &reason) {
            (None, Some(why)) => tracing::warn!(
                reason = %why,
                "Staging refuses new writes (HTTP 507); delivery goes on and writes resume by themselves when there is room."
            ),
            (Some(_), None) => tracing::info!("Staging accepts writes again."),
            _ => {}
        }
        *blocked = reason;
    }
}

/// Locks a mutex, recovering from a panic in another holder: the data behind these mutexes
/// (a SQLite connection, a string) stays consistent because SQLite rolls back on its own.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Inner {
    shared: Arc<Shared>,
    /// This process's lease-owner name, and its owner file (locked while we live).
    owner: String,
    _owner_lock: std::fs::File,
    db: Mutex<Connection>,
    tx: Mutex<Option<SyncSender<Message>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        lock(&self.tx).take();
        if let Some(handle) = lock(&self.writer).take() {
            let _ = handle.join();
        }
        crate::leases::unregister(&self.shared.state_dir, &self.owner);
    }
}

/// A handle on one staging folder. Cheap to clone; all clones share one writer thread.
#[derive(Clone)]
pub struct Staging {
    inner: Arc<Inner>,
}

pub(crate) fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn ms_to_rfc3339(ms: i64) -> String {
    layout::rfc3339(Utc.timestamp_millis_opt(ms).single().unwrap_or_default())
}

impl Staging {
    /// Opens (creating if needed) the store, repairs what a crash left, rebuilds a missing or
    /// corrupt index from the folder.
    pub fn open(opts: Options) -> Result<(Staging, OpenReport), StoreError> {
        Self::open_inner(opts, false)
    }

    /// Rebuilds the index from the folder alone. Stop the daemon first: a running process
    /// keeps using the index it opened.
    pub fn reindex(opts: Options) -> Result<OpenReport, StoreError> {
        let (_store, report) = Self::open_inner(opts, true)?;
        Ok(report)
    }

    fn open_inner(opts: Options, force_rebuild: bool) -> Result<(Staging, OpenReport), StoreError> {
        for sink in &opts.sinks {
            if sink.is_empty() || sink.contains(',') {
                return Err(StoreError::UnknownSink(sink.clone()));
            }
        }
        let root = opts.root.clone();
        let state_dir = root.join(layout::STATE_DIR);
        let failed_dir = opts
            .failed_dir
            .clone()
            .unwrap_or_else(|| root.join(layout::FAILED_DIR));
        for d in [&root, &state_dir, &failed_dir] {
            layout::create_dir_durable(d).map_err(|e| StoreError::io("create folder", d, e))?;
            layout::make_private(d).map_err(|e| {
                StoreError::io("make private (mode 0700, it holds patient data)", d, e)
            })?;
        }
        let shared = Arc::new(Shared {
            root: root.clone(),
            state_dir: state_dir.clone(),
            failed_dir,
            opts,
            poisoned: Mutex::new(None),
            is_poisoned: AtomicBool::new(false),
            blocked: Mutex::new(None),
            #[cfg(feature = "fault-injection")]
            fail_next_sync: AtomicBool::new(false),
            #[cfg(feature = "fault-injection")]
            fail_next_index: AtomicBool::new(false),
        });
        let mut seq_file = writer::open_seq_file(&state_dir)
            .map_err(|e| StoreError::io("open", state_dir.join("seq"), e))?;

        let mut report = OpenReport::default();
        let index_path = state_dir.join("index.sqlite3");
        let marker = state_dir.join("rebuild-index");
        let reason = if force_rebuild {
            Some("rebuild requested (reindex)".to_string())
        } else if marker.exists() {
            Some("an earlier run found the index damaged".to_string())
        } else if !index_path.exists() {
            // A new store has no index yet and nothing to rebuild it from: not worth a warning.
            let fresh = writer::read_seq(&mut seq_file).unwrap_or(0) == 0
                && crate::layout::walk_day_files(&root)
                    .map(|f| f.is_empty())
                    .unwrap_or(false);
            (!fresh).then(|| "index missing".to_string())
        } else {
            match crate::index::open(&index_path, true) {
                Ok(conn) => crate::index::check(&conn).err(),
                Err(e) => Some(e.to_string()),
            }
        };
        let db = if let Some(reason) = reason {
            seq_file
                .lock()
                .map_err(|e| StoreError::io("lock", state_dir.join("seq"), e))?;
            let result = (|| {
                crate::recover::set_aside_index(&index_path)?;
                let conn = crate::index::open(&index_path, true)?;
                crate::recover::recover(&shared, &conn, &mut seq_file, &mut report)?;
                crate::dead::apply_dead_letters(&shared, &conn)?;
                Ok::<_, StoreError>(conn)
            })();
            let _ = seq_file.unlock();
            let conn = result?;
            let _ = std::fs::remove_file(&marker);
            report.index_rebuilt = true;
            report.rebuild_reason = Some(reason);
            conn
        } else {
            let conn = crate::index::open(&index_path, true)?;
            seq_file
                .lock()
                .map_err(|e| StoreError::io("lock", state_dir.join("seq"), e))?;
            let result = crate::recover::recover(&shared, &conn, &mut seq_file, &mut report);
            let _ = seq_file.unlock();
            result?;
            conn
        };
        for sink in &shared.opts.sinks {
            db.execute("INSERT OR IGNORE INTO sinks (name) VALUES (?1)", [sink])?;
        }
        crate::checkpoints::restore(&db, &state_dir)?;
        // Opening read the whole index (quick_check, recovery) through SQLite's page cache, up
        // to 2 MB that an idle agent would keep for nothing: give it back.
        db.execute_batch("PRAGMA shrink_memory")?;
        let (owner, owner_lock) = crate::leases::register(&state_dir)?;
        report.leases_released = crate::leases::release_orphaned(&db, &state_dir, &owner)?;

        let writer_conn = crate::index::open(&index_path, false)?;
        let (tx, rx) = mpsc::sync_channel(QUEUE_DEPTH);
        let w = Writer::new(shared.clone(), writer_conn, seq_file);
        let handle = std::thread::Builder::new()
            .name("estafeta-staging-writer".into())
            .spawn(move || w.run(rx))
            .map_err(|e| StoreError::io("start writer thread for", &root, e))?;
        let store = Staging {
            inner: Arc::new(Inner {
                shared,
                owner,
                _owner_lock: owner_lock,
                db: Mutex::new(db),
                tx: Mutex::new(Some(tx)),
                writer: Mutex::new(Some(handle)),
            }),
        };
        Ok((store, report))
    }

    pub fn root(&self) -> &Path {
        &self.inner.shared.root
    }

    /// The dead-letter folder.
    pub fn failed_dir(&self) -> &Path {
        &self.inner.shared.failed_dir
    }

    /// Sinks records are routed to by default.
    pub fn sinks(&self) -> Vec<String> {
        self.inner.shared.opts.sinks.clone()
    }

    /// Test hook: the next segment flush fails as if the disk had reported an error.
    #[cfg(feature = "fault-injection")]
    #[doc(hidden)]
    pub fn inject_sync_failure(&self) {
        self.inner
            .shared
            .fail_next_sync
            .store(true, Ordering::SeqCst);
    }

    /// Test hook: the next group's lines reach the disk but its index commit fails, as on a
    /// disk that fills up between the two.
    #[cfg(feature = "fault-injection")]
    #[doc(hidden)]
    pub fn inject_index_failure(&self) {
        self.inner
            .shared
            .fail_next_index
            .store(true, Ordering::SeqCst);
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    pub(crate) fn db(&self) -> MutexGuard<'_, Connection> {
        lock(&self.inner.db)
    }

    /// Stages one record; returns once it is on stable storage. Blocking.
    pub fn stage(&self, record: NewRecord) -> Result<Receipt, StageError> {
        let staged = self.stage_batch(vec![record], None)?;
        Ok(staged.receipts()[0].clone())
    }

    /// Stages records all-or-nothing; returns once they are on stable storage. Blocking.
    pub fn stage_batch(
        &self,
        records: Vec<NewRecord>,
        client_key: Option<ClientKey>,
    ) -> Result<Staged, StageError> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.stage_batch_then(records, client_key, move |staged| {
            let _ = reply.send(staged);
        })?;
        answer.recv().map_err(|_| StageError::Closed)?
    }

    /// The same without waiting: checks the records, queues them for the writer and returns.
    /// `when_durable` gets the answer on the writer thread once the records are on stable
    /// storage (or failed); it must only hand it over (a channel send), never block. An error
    /// returned here means nothing was queued. Blocks only while the writer's queue is full.
    /// This is what an async server uses, so that a request waiting for its flush holds no
    /// thread.
    pub fn stage_batch_then(
        &self,
        records: Vec<NewRecord>,
        client_key: Option<ClientKey>,
        when_durable: impl FnOnce(Result<Staged, StageError>) + Send + 'static,
    ) -> Result<(), StageError> {
        self.queue(records, client_key, None, Reply::new(when_durable))
    }

    /// Stages the records a source read from a database and advances the source's checkpoint
    /// in the same commit: after a crash at any moment, either both are there or neither is,
    /// so no row is skipped and none is staged twice. Blocking.
    pub fn stage_from_source(
        &self,
        records: Vec<NewRecord>,
        mark: SourceMark,
    ) -> Result<Staged, StageError> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.queue(
            records,
            None,
            Some(mark),
            Reply::new(move |staged| {
                let _ = reply.send(staged);
            }),
        )?;
        answer.recv().map_err(|_| StageError::Closed)?
    }

    fn queue(
        &self,
        records: Vec<NewRecord>,
        client_key: Option<ClientKey>,
        source: Option<SourceMark>,
        reply: Reply,
    ) -> Result<(), StageError> {
        if records.is_empty() {
            return Err(StageError::Invalid(
                "nothing to stage: the batch is empty".into(),
            ));
        }
        if let Some(reason) = self.inner.shared.poisoned() {
            return Err(StageError::Poisoned(reason));
        }
        let prepared = records
            .into_iter()
            .map(|r| self.prepare(r))
            .collect::<Result<Vec<_>, _>>()?;
        let sender = lock(&self.inner.tx).clone().ok_or(StageError::Closed)?;
        sender
            .send(Message::Stage(Box::new(StageRequest {
                records: prepared,
                client_key,
                source,
                reply,
            })))
            .map_err(|_| StageError::Closed)
    }

    fn prepare(&self, r: NewRecord) -> Result<Prepared, StageError> {
        validate_name("action", &r.action)?;
        validate_name("entity", &r.entity)?;
        if let Some(k) = &r.key {
            if k.is_empty() || k.len() > MAX_KEY_LEN {
                return Err(StageError::Invalid(format!(
                    "record key must be 1 to {MAX_KEY_LEN} bytes, got {}",
                    k.len()
                )));
            }
            if k.chars().any(|c| c.is_control()) {
                return Err(StageError::Invalid(
                    "record key must not contain control characters".into(),
                ));
            }
        }
        let known = &self.inner.shared.opts.sinks;
        let sinks = match r.sinks {
            Some(s) if !s.is_empty() => {
                for name in &s {
                    if !known.contains(name) {
                        return Err(StageError::UnknownSink(name.clone(), known.join(", ")));
                    }
                }
                s
            }
            _ => known.clone(),
        };
        if sinks.is_empty() {
            return Err(StageError::Invalid(
                "no sink is configured, so the record could never be delivered".into(),
            ));
        }
        let raw = r.payload.get();
        let payload = if raw
            .bytes()
            .any(|b| matches!(b, b'\n' | b'\r' | b'\t' | b' '))
        {
            serde_json::value::RawValue::from_string(compact_json(raw))
                .map_err(|e| StageError::Invalid(format!("payload is not valid JSON: {e}")))?
        } else {
            r.payload
        };
        Ok(Prepared {
            action: r.action,
            entity: r.entity,
            key: r.key,
            payload,
            sinks,
        })
    }

    /// Leases the oldest deliverable records for `sink`: per (entity, key), only the earliest
    /// undelivered record. Records come back in sequence order.
    pub fn next_batch(&self, sink: &str, limit: usize) -> Result<Vec<Delivery>, StoreError> {
        self.lease(sink, limit, false)
    }

    /// Leases the single oldest head record of `sink` even if it waits in backoff: a probe of
    /// whether a sink that was down is back, sent on a schedule tick.
    pub fn probe_batch(&self, sink: &str) -> Result<Vec<Delivery>, StoreError> {
        self.lease(sink, 1, true)
    }

    /// The sink is back: every record of `sink` waiting in backoff becomes due now.
    /// Returns how many were waiting.
    pub fn retry_now(&self, sink: &str) -> Result<u64, StoreError> {
        let n = self.db().execute(
            "UPDATE deliveries SET next_at = 0 WHERE sink = ?1 AND state = 'pending' AND next_at > ?2",
            params![sink, now_ms()],
        )?;
        Ok(n as u64)
    }

    fn lease(
        &self,
        sink: &str,
        limit: usize,
        ignore_backoff: bool,
    ) -> Result<Vec<Delivery>, StoreError> {
        let now = now_ms();
        let due_by = if ignore_backoff { i64::MAX } else { now };
        let lease_until = now + self.inner.shared.opts.lease.as_millis() as i64;
        let leased: Vec<(u64, u32, i64, i64, String)> = {
            let mut db = self.db();
            // A lease promises nothing to anyone: if a power cut loses it, its records are
            // simply pending again and are sent again (delivery is idempotent). So its commit
            // does not wait for the disk; the next durable commit (an ack) syncs it along.
            with_relaxed_sync(&mut db, |db| {
                let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let rows = {
                    let mut stmt = tx.prepare_cached(
                        "SELECT d.seq, d.attempts, r.offset, r.len, s.path
                       FROM deliveries d
                       JOIN records r ON r.seq = d.seq
                       JOIN segments s ON s.id = r.segment_id
                      WHERE d.sink = ?1
                        AND ((d.state = 'pending' AND d.next_at <= ?4)
                          OR (d.state = 'in_flight' AND d.lease_until <= ?2))
                        AND NOT EXISTS (SELECT 1 FROM deliveries e
                                         WHERE e.sink = d.sink AND e.entity = d.entity
                                           AND e.okey = d.okey AND e.seq < d.seq)
                      ORDER BY d.seq
                      LIMIT ?3",
                    )?;
                    stmt.query_map(params![sink, now, limit as i64, due_by], |r| {
                        Ok((
                            r.get::<_, i64>(0)? as u64,
                            r.get::<_, i64>(1)? as u32,
                            r.get::<_, i64>(2)?,
                            r.get::<_, i64>(3)?,
                            r.get::<_, String>(4)?,
                        ))
                    })?
                    .collect::<Result<Vec<_>, _>>()?
                };
                {
                    let mut upd = tx.prepare_cached(
                    "UPDATE deliveries SET state = 'in_flight', lease_until = ?1, lease_owner = ?4
                      WHERE sink = ?2 AND seq = ?3",
                )?;
                    for (seq, ..) in &rows {
                        upd.execute(params![lease_until, sink, *seq as i64, self.inner.owner])?;
                    }
                }
                tx.commit()?;
                Ok(rows)
            })?
        };
        let mut out = Vec::with_capacity(leased.len());
        // Records of one batch mostly share a few segments: open each once.
        let mut files: std::collections::HashMap<String, std::fs::File> = Default::default();
        for (seq, attempts, offset, len, rel) in leased {
            let path = self.root().join(&rel);
            let read = match files.entry(rel) {
                std::collections::hash_map::Entry::Occupied(mut e) => {
                    crate::segment::read_record_from(e.get_mut(), &path, offset as u64, len as u64)
                }
                std::collections::hash_map::Entry::Vacant(v) => match std::fs::File::open(&path) {
                    Ok(f) => crate::segment::read_record_from(
                        v.insert(f),
                        &path,
                        offset as u64,
                        len as u64,
                    ),
                    Err(e) => Err(format!("cannot open {}: {e}", path.display())),
                },
            };
            match read {
                Ok(envelope) if envelope.seq == seq => out.push(Delivery {
                    envelope,
                    sink: sink.to_string(),
                    attempts,
                    path,
                }),
                Ok(envelope) => {
                    let reason = format!(
                        "index points at record {} but the file holds record {} there",
                        seq, envelope.seq
                    );
                    crate::dead::move_damaged_record(self, seq, &path, &reason)?;
                }
                Err(reason) => crate::dead::move_damaged_record(self, seq, &path, &reason)?,
            }
        }
        Ok(out)
    }

    /// The sink confirmed these records.
    pub fn ack(&self, sink: &str, seqs: &[u64]) -> Result<(), StoreError> {
        let now = Utc::now().timestamp();
        let mut db = self.db();
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut del =
                tx.prepare_cached("DELETE FROM deliveries WHERE sink = ?1 AND seq = ?2")?;
            let mut upd = tx.prepare_cached(
                "UPDATE records SET open_sinks = open_sinks - 1,
                        delivered_at = CASE WHEN open_sinks = 1 THEN ?2 ELSE delivered_at END
                  WHERE seq = ?1 AND open_sinks > 0",
            )?;
            for seq in seqs {
                if del.execute(params![sink, *seq as i64])? > 0 {
                    upd.execute(params![*seq as i64, now])?;
                }
            }
            // An ack is the sink's latest success: noted in the same commit (one sync, not two).
            tx.prepare_cached(NOTE_SUCCESS_SQL)?
                .execute(params![sink, layout::rfc3339(Utc::now())])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// A transient failure: try again at `retry_at`.
    pub fn fail(
        &self,
        sink: &str,
        seq: u64,
        error: &str,
        retry_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.db().execute(
            "UPDATE deliveries SET state = 'pending', attempts = attempts + 1, next_at = ?1,
                    lease_until = 0, last_error = ?2
              WHERE sink = ?3 AND seq = ?4 AND state != 'dead'",
            params![retry_at.timestamp_millis(), error, sink, seq as i64],
        )?;
        Ok(())
    }

    /// A permanent failure: writes the dead letter and returns its path.
    pub fn dead(&self, sink: &str, seq: u64, reason: &str) -> Result<PathBuf, StoreError> {
        crate::dead::kill(self, sink, seq, reason)
    }

    /// Gives back leased records untouched (shutdown, dry run).
    pub fn release(&self, sink: &str, seqs: &[u64]) -> Result<(), StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE deliveries SET state = 'pending', lease_until = 0
                  WHERE sink = ?1 AND seq = ?2 AND state = 'in_flight'",
            )?;
            for seq in seqs {
                stmt.execute(params![sink, *seq as i64])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// When the earliest record in backoff (or an expiring lease) for `sink` becomes
    /// deliverable again, if any.
    pub fn next_wakeup(&self, sink: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        let now = now_ms();
        let at: Option<i64> = self.db().query_row(
            "SELECT MIN(t) FROM (
                SELECT MIN(next_at) AS t FROM deliveries WHERE sink = ?1 AND state = 'pending' AND next_at > ?2
                UNION ALL
                SELECT MIN(lease_until) FROM deliveries WHERE sink = ?1 AND state = 'in_flight')",
            params![sink, now],
            |r| r.get(0),
        )?;
        Ok(at.and_then(|ms| Utc.timestamp_millis_opt(ms).single()))
    }

    /// Every source the index knows, by name.
    pub fn sources(&self) -> Result<Vec<SourceState>, StoreError> {
        let db = self.db();
        let mut stmt = db.prepare(
            "SELECT name, checkpoint, last_run_at, last_rows, last_error FROM sources ORDER BY name",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok(SourceState {
                    name: r.get(0)?,
                    checkpoint: r.get(1)?,
                    last_run_at: r.get(2)?,
                    last_rows: r.get::<_, Option<i64>>(3)?.map(|n| n as u64),
                    last_error: r.get(4)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// One source's checkpoint (JSON text), `None` before its first row.
    pub fn source_checkpoint(&self, name: &str) -> Result<Option<String>, StoreError> {
        let checkpoint = self
            .db()
            .query_row(
                "SELECT checkpoint FROM sources WHERE name = ?1",
                [name],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()?;
        Ok(checkpoint.flatten())
    }

    /// Rewinds a source on purpose: to `to` (JSON text), or to the start (`None`), so that
    /// its next cycle reads again from there. Records staged before are not touched.
    pub fn reset_source(&self, name: &str, to: Option<&str>) -> Result<(), StoreError> {
        let mut db = self.db();
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // The seq of the newest record, so that re-reading older records after a crash
        // cannot undo the reset.
        let newest: i64 = tx.query_row("SELECT COALESCE(MAX(seq), 0) FROM records", [], |r| {
            r.get(0)
        })?;
        tx.execute(
            "INSERT INTO sources (name, checkpoint, checkpoint_seq) VALUES (?1, ?2, ?3)
             ON CONFLICT(name) DO UPDATE SET checkpoint = excluded.checkpoint,
                 checkpoint_seq = MAX(sources.checkpoint_seq, excluded.checkpoint_seq)",
            params![name, to, newest],
        )?;
        tx.commit()?;
        // Kept outside the index too, so that rebuilding the index does not undo it.
        crate::checkpoints::save(&db, &self.inner.shared.state_dir)?;
        Ok(())
    }

    /// Notes a source's cycle for `estafeta sources`: rows read, and the error if it failed.
    pub fn note_source_run(
        &self,
        name: &str,
        rows: u64,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        self.db().execute(
            "INSERT INTO sources (name, last_run_at, last_rows, last_error) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(name) DO UPDATE SET last_run_at = excluded.last_run_at,
                 last_rows = excluded.last_rows, last_error = excluded.last_error",
            params![name, layout::rfc3339(Utc::now()), rows as i64, error],
        )?;
        Ok(())
    }

    /// Records the outcome of a delivery attempt for `status` (last success / failure).
    pub fn note_sink_result(&self, sink: &str, error: Option<&str>) -> Result<(), StoreError> {
        let now = layout::rfc3339(Utc::now());
        let db = self.db();
        match error {
            None => db.execute(NOTE_SUCCESS_SQL, params![sink, now])?,
            Some(err) => db.execute(
                "INSERT INTO sinks (name, last_failure_at, last_error) VALUES (?1, ?2, ?3)
                 ON CONFLICT(name) DO UPDATE SET last_failure_at = excluded.last_failure_at,
                                                 last_error = excluded.last_error",
                params![sink, now, err],
            )?,
        };
        Ok(())
    }

    /// Puts a dead record back in line with its original sequence number.
    pub fn requeue(&self, sink: &str, seq: u64) -> Result<(), StoreError> {
        crate::dead::requeue(self, sink, seq)
    }

    /// Dead letters, oldest first.
    pub fn dead_letters(&self, limit: Option<usize>) -> Result<Vec<DeadLetter>, StoreError> {
        crate::dead::list(self.failed_dir(), limit)
    }

    /// Records, oldest first.
    pub fn list(&self, filter: &ListFilter) -> Result<Vec<RecordInfo>, StoreError> {
        let db = self.db();
        let mut stmt = db.prepare(
            "SELECT r.seq FROM records r
              WHERE (?1 IS NULL OR r.action = ?1) AND (?2 IS NULL OR r.entity = ?2)
                AND (?3 OR r.open_sinks > 0)
                AND (NOT ?4 OR r.seq IN (SELECT seq FROM deliveries WHERE state = 'dead'))
                AND r.sinks != ''
              ORDER BY r.seq LIMIT ?5",
        )?;
        let limit = filter.limit.map(|l| l as i64).unwrap_or(-1);
        let seqs = stmt
            .query_map(
                params![
                    filter.action,
                    filter.entity,
                    filter.include_delivered,
                    filter.dead_only,
                    limit
                ],
                |r| r.get::<_, i64>(0),
            )?
            .collect::<Result<Vec<_>, _>>()?;
        seqs.into_iter()
            .map(|seq| info_of(&db, self.root(), seq as u64))
            .collect()
    }

    /// A record by id or sequence number (decimal).
    pub fn get(&self, id_or_seq: &str) -> Result<(Envelope, RecordInfo), StoreError> {
        let info = {
            let db = self.db();
            let seq: Option<i64> = match id_or_seq.parse::<u64>() {
                Ok(seq) => Some(seq as i64),
                Err(_) => db
                    .query_row("SELECT seq FROM records WHERE id = ?1", [id_or_seq], |r| {
                        r.get(0)
                    })
                    .optional()?,
            };
            let seq = seq.ok_or_else(|| StoreError::NotFound(id_or_seq.to_string()))?;
            info_of(&db, self.root(), seq as u64)?
        };
        let (offset, len): (i64, i64) = self.db().query_row(
            "SELECT offset, len FROM records WHERE seq = ?1",
            [info.seq as i64],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let env = crate::segment::read_record(&info.path, offset as u64, len as u64).map_err(
            |reason| StoreError::Damaged {
                what: info.id.clone(),
                reason,
            },
        )?;
        Ok((env, info))
    }

    pub fn status(&self) -> Result<Status, StoreError> {
        crate::status::status(self)
    }

    /// Why staging refuses writes right now, if it does.
    /// Whether the index answers a query: the cheap check behind a readiness probe (`status`
    /// counts every pending record, which takes seconds with a backlog of millions).
    pub fn ping(&self) -> Result<(), StoreError> {
        self.db()
            .query_row("SELECT COUNT(*) FROM sinks", [], |_| Ok(()))?;
        Ok(())
    }

    pub fn blocked_reason(&self) -> Option<String> {
        if let Some(p) = self.inner.shared.poisoned() {
            return Some(format!("staging stopped after a failed disk flush: {p}"));
        }
        lock(&self.inner.shared.blocked).clone()
    }

    /// Deletes segment files every sink has confirmed; frees space.
    pub fn cleanup(&self) -> Result<CleanupReport, StoreError> {
        // Ask our writer to close drained segments first (no lock held while waiting).
        if let Some(sender) = lock(&self.inner.tx).clone() {
            let (reply, done) = mpsc::sync_channel(1);
            if sender.send(Message::SealDrained(reply)).is_ok() {
                let _ = done.recv();
            }
        }
        let released = {
            let db = self.db();
            crate::leases::release_orphaned(&db, &self.inner.shared.state_dir, &self.inner.owner)?
        };
        let mut report = crate::recover::cleanup(self, CLIENT_KEY_TTL)?;
        report.leases_released = released;
        if report.bytes_freed > 0 {
            self.inner.shared.set_blocked(None);
        }
        Ok(report)
    }

    /// Adopts JSON files written into the tree in the old seed layout; `admit` gives each
    /// record's key and sinks, or refuses it (the file is then set aside).
    pub fn adopt_foreign(
        &self,
        admit: crate::adopt::Admit<'_>,
        quiet: Duration,
    ) -> Result<AdoptReport, StoreError> {
        crate::adopt::adopt(self, self.root(), "adopt", admit, quiet)
    }

    /// The same for an inbox folder outside the store (`INBOX_PATH`) where other programs drop
    /// files in the same layout; each is removed once staged.
    pub fn adopt_inbox(
        &self,
        inbox: &Path,
        admit: crate::adopt::Admit<'_>,
        quiet: Duration,
    ) -> Result<AdoptReport, StoreError> {
        crate::adopt::adopt(self, inbox, "inbox", admit, quiet)
    }
}

/// Builds a record's listing from the index.
pub(crate) fn info_of(db: &Connection, root: &Path, seq: u64) -> Result<RecordInfo, StoreError> {
    let (id, action, entity, key, staged_at, sinks, rel): (
        String,
        String,
        String,
        Option<String>,
        String,
        String,
        String,
    ) = db
        .query_row(
            "SELECT r.id, r.action, r.entity, r.key, r.staged_at, r.sinks, s.path
               FROM records r JOIN segments s ON s.id = r.segment_id WHERE r.seq = ?1",
            [seq as i64],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ))
            },
        )
        .optional()?
        .ok_or_else(|| StoreError::NotFound(seq.to_string()))?;
    let mut stmt = db.prepare_cached(
        "SELECT sink, state, attempts, last_error, next_at, lease_until FROM deliveries WHERE seq = ?1",
    )?;
    let mut open: Vec<SinkState> = stmt
        .query_map([seq as i64], |r| {
            let state = State::from_db(&r.get::<_, String>(1)?);
            let next_at: i64 = r.get(4)?;
            let lease_until: i64 = r.get(5)?;
            let lease_expired = state == State::InFlight && lease_until <= now_ms();
            Ok(SinkState {
                sink: r.get(0)?,
                state: if lease_expired { State::Pending } else { state },
                attempts: r.get::<_, i64>(2)? as u32,
                last_error: r.get(3)?,
                next_attempt_at: (state == State::Pending && next_at > now_ms())
                    .then(|| ms_to_rfc3339(next_at)),
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let open_names: BTreeSet<String> = open.iter().map(|s| s.sink.clone()).collect();
    for sink in sinks.split(',').filter(|s| !s.is_empty()) {
        if !open_names.contains(sink) {
            open.push(SinkState {
                sink: sink.to_string(),
                state: State::Delivered,
                attempts: 0,
                last_error: None,
                next_attempt_at: None,
            });
        }
    }
    open.sort_by(|a, b| a.sink.cmp(&b.sink));
    let rank = |s: State| match s {
        State::Dead => 0,
        State::Pending => 1,
        State::InFlight => 2,
        State::Delivered => 3,
    };
    let state = open
        .iter()
        .map(|s| s.state)
        .min_by_key(|s| rank(*s))
        .unwrap_or(State::Delivered);
    let attempts = open.iter().map(|s| s.attempts).max().unwrap_or(0);
    let last_error = open.iter().find_map(|s| s.last_error.clone());
    Ok(RecordInfo {
        id,
        seq,
        action,
        entity,
        key,
        staged_at,
        path: root.join(rel),
        state,
        attempts,
        last_error,
        sinks: open,
    })
}

/// Runs `f` with `synchronous` turned down to NORMAL on the store's durable connection, for
/// commits whose loss in a power cut costs a resend, never a record. FULL is restored after,
/// whatever `f` returned.
fn with_relaxed_sync<T>(
    db: &mut Connection,
    f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    db.pragma_update(None, "synchronous", "NORMAL")?;
    let result = f(db);
    db.pragma_update(None, "synchronous", "FULL")?;
    result
}
