//! The delivery API the batcher uses: leases of the deliverable heads of each key
//! (`next_batch`, `probe_batch`), acknowledgements, transient failures with their retry time,
//! dead letters (written by `dead.rs`) and their requeue, and each sink's last result.

use chrono::{DateTime, TimeZone, Utc};
use rusqlite::{Connection, TransactionBehavior, params};
use std::path::PathBuf;

use crate::layout;
use crate::*;

use super::{Staging, now_ms};

/// Notes a sink's latest success (`?1` sink, `?2` RFC 3339 time): in `ack` and `note_sink_result`.
const NOTE_SUCCESS_SQL: &str = "INSERT INTO sinks (name, last_success_at) VALUES (?1, ?2)
     ON CONFLICT(name) DO UPDATE SET last_success_at = excluded.last_success_at";

impl Staging {
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
