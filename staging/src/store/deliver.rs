//! The delivery API the batcher uses: leases of runs of each key (`next_batch`, `next_batch_ahead`,
//! `probe_batch`), and the settlement of a delivered batch in one transaction (`settle`: acks,
//! transient failures with their retry time, dead letters written by `dead.rs`, records given
//! back untouched), requeue of dead letters, and each sink's last result.
//!
//! A lease walks the sink's deliveries in sequence order and takes every deliverable record
//! whose order key (entity and key; keyless records of an entity share one) has no earlier
//! record still owed that is not deliverable: so a batch carries runs of consecutive records of
//! a key, and a key whose head is in flight, in backoff or dead (the hold-back) gives nothing.
//! The walk reads only the `deliveries` table; what it costs beyond the batch itself is the
//! rows of held-back keys it steps over, so a look-ahead lease (`next_batch_ahead`, taken while
//! the batch before it travels) bounds its walk instead of stepping over a whole backlog held
//! by the batch in flight.
//!
//! Bookkeeping is per batch: a lease is one walk plus four statements (the live leases read,
//! the expired ones dropped, one `leases` row written, the records' places read), a settlement one
//! transaction of a dozen statements at most plus one durable file per dead letter, whatever
//! the batch size. Sets of records go to SQLite as one JSON array bound to a parameter
//! (`json_each`), not as one statement per record.

use chrono::{DateTime, TimeZone, Utc};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use std::path::PathBuf;

use crate::layout;
use crate::*;

use super::{Staging, now_ms};

/// Notes a sink's latest success (`?1` sink, `?2` RFC 3339 time): in `ack` and `note_sink_result`.
const NOTE_SUCCESS_SQL: &str = "INSERT INTO sinks (name, last_success_at) VALUES (?1, ?2)
     ON CONFLICT(name) DO UPDATE SET last_success_at = excluded.last_success_at";

/// Notes a sink's latest failure (`?1` sink, `?2` RFC 3339 time, `?3` the error).
const NOTE_FAILURE_SQL: &str =
    "INSERT INTO sinks (name, last_failure_at, last_error) VALUES (?1, ?2, ?3)
     ON CONFLICT(name) DO UPDATE SET last_failure_at = excluded.last_failure_at,
                                     last_error = excluded.last_error";

impl Staging {
    /// Leases the oldest deliverable records for `sink`, up to `limit`, in sequence order: runs
    /// of consecutive records of each order key, from each key's earliest undelivered record.
    pub fn next_batch(&self, sink: &str, limit: usize) -> Result<Vec<Delivery>, StoreError> {
        self.lease(sink, limit, Walk::Complete)
    }

    /// The batch to send after `in_flight`, a batch of `sink` this deliverer holds and is
    /// sending now, on the same ordered channel: the records `in_flight` holds count as already
    /// taken, so the runs they started continue here. The caller must give back, unsent, the
    /// records of every key that `in_flight` did not deliver whole. The walk stops after
    /// stepping over a few batches' worth of rows, so an empty answer proves nothing.
    pub fn next_batch_ahead(
        &self,
        sink: &str,
        limit: usize,
        in_flight: &[u64],
    ) -> Result<Vec<Delivery>, StoreError> {
        self.lease(sink, limit, Walk::Ahead(in_flight))
    }

    /// Leases the single oldest head record of `sink` even if it waits in backoff: a probe of
    /// whether a sink that was down is back, sent on a schedule tick.
    pub fn probe_batch(&self, sink: &str) -> Result<Vec<Delivery>, StoreError> {
        self.lease(sink, 1, Walk::Probe)
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

    fn lease(&self, sink: &str, limit: usize, walk: Walk<'_>) -> Result<Vec<Delivery>, StoreError> {
        let now = now_ms();
        let lease_until = now + self.inner.shared.opts.lease.as_millis() as i64;
        let max_rows = match walk {
            Walk::Ahead(_) => limit.saturating_mul(AHEAD_WALK_BATCHES),
            Walk::Complete | Walk::Probe => usize::MAX,
        };
        let leased: Vec<(u64, u32, i64, i64, std::sync::Arc<str>)> = {
            let mut db = self.db();
            // A lease promises nothing to anyone: if a power cut loses it, its records are
            // simply pending again and are sent again (delivery is idempotent). So its commit
            // does not wait for the disk; the next durable commit (a settlement) syncs it along.
            with_relaxed_sync(&mut db, |db| {
                let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let leased = crate::leases::held(&tx, sink, now)?;
                let taken = walk_deliverable(&tx, sink, now, limit, max_rows, walk, &leased)?;
                let rows = if taken.is_empty() {
                    Vec::new()
                } else {
                    let (seqs, attempts): (Vec<u64>, Vec<u32>) = taken.into_iter().unzip();
                    let seqs_json = json_array(&seqs);
                    crate::leases::take(&tx, sink, &self.inner.owner, lease_until, &seqs_json)?;
                    let mut places: std::collections::HashMap<u64, (i64, i64, i64)> = tx
                        .prepare_cached(
                            "SELECT seq, offset, len, segment_id FROM records
                              WHERE seq IN (SELECT value FROM json_each(?1))",
                        )?
                        .query_map(params![seqs_json], |r| {
                            Ok((
                                r.get::<_, i64>(0)? as u64,
                                (r.get(1)?, r.get(2)?, r.get(3)?),
                            ))
                        })?
                        .collect::<Result<_, _>>()?;
                    // A batch's records lie in a few segments: each path is read and held once,
                    // not once per record.
                    let mut paths: std::collections::HashMap<i64, Option<std::sync::Arc<str>>> =
                        Default::default();
                    let mut path_of = |id: i64| -> rusqlite::Result<Option<std::sync::Arc<str>>> {
                        if let Some(path) = paths.get(&id) {
                            return Ok(path.clone());
                        }
                        let path = tx
                            .prepare_cached("SELECT path FROM segments WHERE id = ?1")?
                            .query_row([id], |r| r.get::<_, String>(0))
                            .optional()?
                            .map(std::sync::Arc::<str>::from);
                        paths.insert(id, path.clone());
                        Ok(path)
                    };
                    let mut rows = Vec::with_capacity(seqs.len());
                    for (seq, attempts) in seqs.into_iter().zip(attempts) {
                        // A delivery always has its record and its record its segment (they
                        // are written and removed together); one without is skipped rather
                        // than leased blind.
                        let Some((offset, len, segment)) = places.remove(&seq) else {
                            continue;
                        };
                        if let Some(path) = path_of(segment)? {
                            rows.push((seq, attempts, offset, len, path));
                        }
                    }
                    rows
                };
                tx.commit()?;
                Ok(rows)
            })?
        };
        let mut out = Vec::with_capacity(leased.len());
        // Records of one batch mostly share a few segments: open each once.
        let mut files: std::collections::HashMap<std::sync::Arc<str>, std::fs::File> =
            Default::default();
        let keys = self.shared().keys();
        let mut next = 0;
        while next < leased.len() {
            // A run: records of one segment, each starting where the one before ends, read in
            // one call. If the run cannot be read whole, each record is read on its own, so a
            // damaged or missing part costs only its own records, as before.
            let first = next;
            let (_, _, start, first_len, rel) = &leased[first];
            let (start, mut run_len) = (*start, *first_len);
            next += 1;
            while let Some((_, _, offset, len, other)) = leased.get(next) {
                if other != rel || *offset != start + run_len || run_len + len > MAX_RUN_BYTES {
                    break;
                }
                run_len += len;
                next += 1;
            }
            let path = self.root().join(&**rel);
            let file = match files.entry(rel.clone()) {
                std::collections::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
                std::collections::hash_map::Entry::Vacant(v) => match std::fs::File::open(&path) {
                    Ok(f) => Ok(v.insert(f)),
                    Err(e) => Err(format!("cannot open {}: {e}", path.display())),
                },
            };
            let (run, open_error) = match file {
                Ok(f) if next - first > 1 => (
                    crate::segment::read_span(f, &path, start as u64, run_len as u64).ok(),
                    None,
                ),
                Ok(_) => (None, None),
                Err(e) => (None, Some(e)),
            };
            for (seq, attempts, offset, len, _) in &leased[first..next] {
                let (seq, attempts) = (*seq, *attempts);
                let read = match (&run, files.get_mut(rel)) {
                    (Some(run), _) => {
                        let at = (offset - start) as usize;
                        crate::segment::decode_stored(&run[at..at + *len as usize], keys)
                    }
                    (None, Some(f)) => crate::segment::read_record_from(
                        f,
                        &path,
                        *offset as u64,
                        *len as u64,
                        keys,
                    ),
                    (None, None) => Err(crate::segment::LineError::Damaged(
                        open_error.clone().unwrap_or_default(),
                    )),
                };
                match read {
                    Ok(envelope) if envelope.seq == seq => out.push(Delivery {
                        envelope,
                        sink: sink.to_string(),
                        attempts,
                        path: path.clone(),
                    }),
                    Ok(envelope) => {
                        let reason = format!(
                            "index points at record {} but the file holds record {} there",
                            seq, envelope.seq
                        );
                        crate::dead::move_damaged_record(self, seq, &path, &reason)?;
                    }
                    Err(crate::segment::LineError::NeedsKey(kid)) => {
                        // A wrong or missing key is never damage: give the batch back untouched.
                        let mut held: Vec<u64> = out.iter().map(|d| d.envelope.seq).collect();
                        held.push(seq);
                        let _ = self.release(sink, &held);
                        return Err(StoreError::KeyNeeded {
                            what: format!("staged record {seq} in {}", path.display()),
                            kids: kid,
                            why: "that key is not in the key file".into(),
                        });
                    }
                    Err(crate::segment::LineError::Damaged(reason)) => {
                        crate::dead::move_damaged_record(self, seq, &path, &reason)?
                    }
                }
            }
        }
        // A damaged record taken out of a run leaves a gap: the records after it in the batch
        // still follow every earlier record of their key that is owed (the damaged one no
        // longer is), so the runs stay in order.
        Ok(out)
    }

    /// Settles what a sink did with a leased batch, in one durable transaction: dead letters
    /// are written first (each file durable before the index says dead), then acks, retries,
    /// deaths and give-backs. Returns the dead letters' paths, in the order given.
    ///
    /// The letters are written while this transaction holds the index's write lock, so no
    /// other process ever sees a letter whose commit is still to come. A crash between a
    /// letter and the commit leaves a stale letter behind, its record pending again: the next
    /// open removes it ([`crate::dead::remove_stale_letters`]) and the record is sent again.
    pub fn settle(&self, sink: &str, batch: Settlement) -> Result<Vec<PathBuf>, StoreError> {
        let now = Utc::now();
        let mut db = self.db();
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut paths = Vec::with_capacity(batch.dead.len());
        for dead in &batch.dead {
            paths.push(crate::dead::write_letter(
                self,
                sink,
                &dead.delivery,
                dead.delivery.attempts + 1,
                &dead.reason,
            )?);
        }
        if !batch.delivered.is_empty() {
            // Only deliveries still owed count: an ack of an ack (a resend) changes nothing.
            let acked: Vec<u64> = tx
                .prepare_cached(
                    "DELETE FROM deliveries
                      WHERE sink = ?1 AND seq IN (SELECT value FROM json_each(?2))
                  RETURNING seq",
                )?
                .query_map(params![sink, json_array(&batch.delivered)], |r| {
                    r.get::<_, i64>(0).map(|seq| seq as u64)
                })?
                .collect::<Result<_, _>>()?;
            tx.prepare_cached(
                "UPDATE records SET open_sinks = open_sinks - 1,
                        delivered_at = CASE WHEN open_sinks = 1 THEN ?2 ELSE delivered_at END
                  WHERE seq IN (SELECT value FROM json_each(?1)) AND open_sinks > 0",
            )?
            .execute(params![json_array(&acked), now.timestamp()])?;
            // An ack is the sink's latest success: noted in the same commit (one sync, not two).
            tx.prepare_cached(NOTE_SUCCESS_SQL)?
                .execute(params![sink, layout::rfc3339(now)])?;
        }
        if !batch.retries.is_empty() {
            // A server's answer may quote the payload: sealed in the index when the store seals.
            let keys = self.shared().keys();
            let retries: Vec<(u64, i64, String)> = batch
                .retries
                .iter()
                .map(|r| {
                    let error = crate::crypt::seal_opt(keys, &r.error);
                    (r.seq, r.at.timestamp_millis(), error)
                })
                .collect();
            load_settle_rows(&tx, &json_text(&retries))?;
            tx.prepare_cached(
                "UPDATE deliveries SET state = 'pending', attempts = attempts + 1, lease_until = 0,
                        next_at = (SELECT next_at FROM temp.settle_rows r WHERE r.seq = deliveries.seq),
                        last_error = (SELECT error FROM temp.settle_rows r WHERE r.seq = deliveries.seq)
                  WHERE sink = ?1 AND seq IN (SELECT seq FROM temp.settle_rows)
                    AND state != 'dead'",
            )?
            .execute(params![sink])?;
            tx.prepare_cached(NOTE_FAILURE_SQL)?.execute(params![
                sink,
                layout::rfc3339(now),
                retries[0].2
            ])?;
        }
        if !batch.dead.is_empty() {
            let keys = self.shared().keys();
            let dead: Vec<(u64, i64, String)> = batch
                .dead
                .iter()
                .map(|d| {
                    let reason = crate::crypt::seal_opt(keys, &d.reason);
                    (d.delivery.envelope.seq, 0, reason)
                })
                .collect();
            load_settle_rows(&tx, &json_text(&dead))?;
            tx.prepare_cached(
                "UPDATE deliveries SET state = 'dead', attempts = attempts + 1, lease_until = 0,
                        last_error = (SELECT error FROM temp.settle_rows r WHERE r.seq = deliveries.seq)
                  WHERE sink = ?1 AND seq IN (SELECT seq FROM temp.settle_rows)",
            )?
            .execute(params![sink])?;
        }
        // Every record settled here leaves this deliverer's lease; those given back untouched
        // only that: they are pending again, their attempts as they were.
        let settled: std::collections::HashSet<u64> = batch
            .delivered
            .iter()
            .chain(batch.retries.iter().map(|r| &r.seq))
            .chain(batch.dead.iter().map(|d| &d.delivery.envelope.seq))
            .chain(&batch.give_back)
            .copied()
            .collect();
        crate::leases::end(&tx, sink, &self.inner.owner, &settled)?;
        tx.commit()?;
        Ok(paths)
    }

    /// The sink confirmed these records.
    pub fn ack(&self, sink: &str, seqs: &[u64]) -> Result<(), StoreError> {
        self.settle(
            sink,
            Settlement {
                delivered: seqs.to_vec(),
                ..Settlement::default()
            },
        )
        .map(drop)
    }

    /// A transient failure: try again at `retry_at`.
    pub fn fail(
        &self,
        sink: &str,
        seq: u64,
        error: &str,
        retry_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.settle(
            sink,
            Settlement {
                retries: vec![Retry {
                    seq,
                    error: error.to_owned(),
                    at: retry_at,
                }],
                ..Settlement::default()
            },
        )
        .map(drop)
    }

    /// A permanent failure: writes the dead letter and returns its path.
    pub fn dead(&self, sink: &str, seq: u64, reason: &str) -> Result<PathBuf, StoreError> {
        crate::dead::kill(self, sink, seq, reason)
    }

    /// Gives back leased records untouched (shutdown, dry run).
    pub fn release(&self, sink: &str, seqs: &[u64]) -> Result<(), StoreError> {
        self.settle(
            sink,
            Settlement {
                give_back: seqs.to_vec(),
                ..Settlement::default()
            },
        )
        .map(drop)
    }

    /// When the earliest record in backoff (or an expiring lease) for `sink` becomes
    /// deliverable again, if any.
    pub fn next_wakeup(&self, sink: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        let now = now_ms();
        let at: Option<i64> = self.db().query_row(
            "SELECT MIN(t) FROM (
                SELECT MIN(next_at) AS t FROM deliveries WHERE sink = ?1 AND state = 'pending' AND next_at > ?2
                UNION ALL
                SELECT MIN(lease_until) FROM deliveries WHERE sink = ?1 AND state = 'in_flight'
                UNION ALL
                SELECT MIN(lease_until) FROM leases WHERE sink = ?1)",
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
            Some(err) => {
                let err = crate::crypt::seal_opt(self.shared().keys(), err);
                db.execute(NOTE_FAILURE_SQL, params![sink, now, err])?
            }
        };
        Ok(())
    }

    /// Puts a dead record back in line with its original sequence number.
    pub fn requeue(&self, sink: &str, seq: u64) -> Result<(), StoreError> {
        crate::dead::requeue(self, sink, seq)
    }

    /// Puts a dead record back in line already leased to this process, for a deliverer that
    /// sends it at once (`estafeta retry --send`), and returns it to be settled like any
    /// leased record. Dead becomes in flight in one transaction, so another deliverer (the
    /// daemon, in another process) can never take the record between the requeue and the send;
    /// and while the lease holds, the later records of its key stay held back behind it, as
    /// they were behind the dead letter. Attempts start again from zero, as with [`requeue`].
    ///
    /// Refused, changing nothing, with [`StoreError::NotFound`] when (sink, seq) is not a dead
    /// record (another process took it first, or it was requeued already), and with
    /// [`StoreError::NotHead`] when an earlier record of its key is still owed to the sink:
    /// sending this one would overtake it. The dead letter is removed after the commit; a crash
    /// in between leaves a stale letter, removed at the next open.
    ///
    /// [`requeue`]: Staging::requeue
    pub fn requeue_leased(&self, sink: &str, seq: u64) -> Result<Delivery, StoreError> {
        let (envelope, info) = self.get(&seq.to_string())?;
        let lease_until = now_ms() + self.inner.shared.opts.lease.as_millis() as i64;
        {
            let mut db = self.db();
            let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
            // The earliest record of its key still owed to the sink, if any: a walk of the
            // sink's earlier deliveries in sequence order (there is no index by key), which
            // stops at the first of the key.
            let earlier: Option<i64> = tx
                .query_row(
                    "SELECT e.seq FROM deliveries d JOIN deliveries e
                        ON e.sink = d.sink AND e.seq < d.seq AND e.entity = d.entity AND e.okey = d.okey
                     WHERE d.sink = ?1 AND d.seq = ?2
                     ORDER BY e.seq LIMIT 1",
                    params![sink, seq as i64],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(earlier) = earlier {
                return Err(StoreError::NotHead {
                    seq,
                    earlier: earlier as u64,
                    sink: sink.to_owned(),
                });
            }
            let changed = tx.execute(
                "UPDATE deliveries SET state = 'pending', attempts = 0, next_at = 0,
                        last_error = NULL
                  WHERE sink = ?1 AND seq = ?2 AND state = 'dead'",
                params![sink, seq as i64],
            )?;
            if changed == 0 {
                return Err(StoreError::NotFound(format!(
                    "{seq} as a dead letter of sink {sink:?}"
                )));
            }
            crate::leases::take(
                &tx,
                sink,
                &self.inner.owner,
                lease_until,
                &json_array(&[seq]),
            )?;
            tx.commit()?;
        }
        let letter = crate::dead::dead_letter_path(self.failed_dir(), &envelope, sink);
        layout::remove_file_durable(&letter).map_err(|e| StoreError::io("remove", &letter, e))?;
        if let Some(dir) = letter.parent() {
            layout::prune_empty_dirs(self.failed_dir(), dir);
        }
        Ok(Delivery {
            envelope,
            sink: sink.to_owned(),
            attempts: 0,
            path: info.path,
        })
    }
}

/// What a sink did with a leased batch, for [`Staging::settle`].
#[derive(Debug, Default)]
pub struct Settlement {
    /// Records the sink has (or already had).
    pub delivered: Vec<u64>,
    /// Transient failures, each tried again at its time (one attempt counted).
    pub retries: Vec<Retry>,
    /// Records the sink refused for good: each gets its dead-letter file.
    pub dead: Vec<Dead>,
    /// Records not attempted (behind an earlier failure of their key, a shutdown, a dry run):
    /// pending again, untouched, no attempt counted.
    pub give_back: Vec<u64>,
}

/// A transient failure of one record.
#[derive(Debug)]
pub struct Retry {
    pub seq: u64,
    /// What happened, by class (no payload text): the delivery's and the sink's last error.
    pub error: String,
    /// Not before this time.
    pub at: DateTime<Utc>,
}

/// A record refused for good.
#[derive(Debug)]
pub struct Dead {
    /// The leased record (its envelope goes into the dead-letter file).
    pub delivery: Delivery,
    /// Everything known about the refusal: it goes into the file and the index.
    pub reason: String,
}

/// How far a lease walks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Walk<'a> {
    /// Until `limit` records or the end: nothing deliverable is missed.
    Complete,
    /// At most [`AHEAD_WALK_BATCHES`] × `limit` rows, stepping over the records of the batch
    /// in flight as if taken (see `next_batch_ahead`).
    Ahead(&'a [u64]),
    /// Like `Complete`, but a record waiting in backoff counts as deliverable.
    Probe,
}

/// A lease reads consecutive records of a segment in one call of at most this many bytes.
const MAX_RUN_BYTES: i64 = 4 << 20;

/// A look-ahead lease steps over at most this many batches' worth of rows: enough to pass the
/// batch in flight and take the next one.
const AHEAD_WALK_BATCHES: usize = 3;

/// Walks `sink`'s deliveries in sequence order and returns (seq, attempts) of up to `limit`
/// deliverable records whose earlier records of the same order key are all taken too.
fn walk_deliverable(
    tx: &Connection,
    sink: &str,
    now: i64,
    limit: usize,
    max_rows: usize,
    walk: Walk<'_>,
    leased: &std::collections::HashSet<u64>,
) -> Result<Vec<(u64, u32)>, StoreError> {
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut stmt = tx.prepare_cached(
        "SELECT seq, entity, okey, state, attempts, next_at, lease_until
           FROM deliveries WHERE sink = ?1 ORDER BY seq",
    )?;
    let mut rows = stmt.query(params![sink])?;
    // Keys are remembered by a hash of (entity, okey), not copied: a collision can only hold
    // an unrelated key back until the next lease, never send a record out of order.
    let hasher = std::collections::hash_map::RandomState::new();
    let mut held_back: std::collections::HashSet<u64> = Default::default();
    let mut taken = Vec::with_capacity(limit.min(4096));
    let passing: std::collections::HashSet<u64> = match walk {
        Walk::Ahead(in_flight) => in_flight.iter().copied().collect(),
        Walk::Complete | Walk::Probe => Default::default(),
    };
    let mut walked = 0usize;
    while taken.len() < limit && walked < max_rows {
        let Some(row) = rows.next()? else { break };
        walked += 1;
        let seq = row.get::<_, i64>(0)? as u64;
        if passing.contains(&seq) {
            continue; // taken by the batch in flight: its key's run goes on
        }
        let group = {
            let mut h = hasher.build_hasher();
            text(row.get_ref(1)?).hash(&mut h);
            text(row.get_ref(2)?).hash(&mut h);
            h.finish()
        };
        if held_back.contains(&group) {
            continue;
        }
        if leased.contains(&seq) {
            held_back.insert(group); // in flight under a lease: its key waits behind it
            continue;
        }
        let deliverable = match text(row.get_ref(3)?) {
            b"pending" => walk == Walk::Probe || row.get::<_, i64>(5)? <= now,
            b"in_flight" => row.get::<_, i64>(6)? <= now, // an older version's lease
            _ => false,                                   // dead: holds its key back
        };
        if deliverable {
            taken.push((seq, row.get::<_, i64>(4)? as u32));
        } else {
            held_back.insert(group);
        }
    }
    Ok(taken)
}

/// The bytes of a TEXT column (the columns read here are `NOT NULL` text).
fn text(value: rusqlite::types::ValueRef<'_>) -> &[u8] {
    match value {
        rusqlite::types::ValueRef::Text(bytes) => bytes,
        _ => b"",
    }
}

/// Fills the connection's scratch table `temp.settle_rows` from a JSON array of
/// `[seq, next_at, error]`, for the updates that set a value per record. (An `UPDATE … FROM
/// json_each(…)` would be planned as a scan of the sink's deliveries with the array inside;
/// `seq IN (SELECT seq FROM temp.settle_rows)` is a primary-key lookup per record.)
fn load_settle_rows(tx: &Connection, rows_json: &str) -> Result<(), StoreError> {
    tx.prepare_cached(
        "CREATE TEMP TABLE IF NOT EXISTS settle_rows
            (seq INTEGER PRIMARY KEY, next_at INTEGER NOT NULL, error TEXT NOT NULL)",
    )?
    .execute([])?;
    tx.prepare_cached("DELETE FROM temp.settle_rows")?
        .execute([])?;
    tx.prepare_cached(
        "INSERT OR REPLACE INTO temp.settle_rows (seq, next_at, error)
         SELECT value ->> 0, value ->> 1, value ->> 2 FROM json_each(?1)",
    )?
    .execute(params![rows_json])?;
    Ok(())
}

/// `[1,2,3]`: a set of sequence numbers for `json_each`.
fn json_array(seqs: &[u64]) -> String {
    json_text(&seqs)
}

fn json_text(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).expect("numbers and strings serialize")
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
