//! Recovery and cleanup: making the index agree with the folder after a crash (index the
//! records a dead process wrote but never indexed, cut torn tails, set damaged lines aside),
//! and deleting segment files once every sink has their records.
//!
//! Recovery runs under the sequence lock, so no writer of any process appends while it reads
//! tails. Cleanup needs no lock: it only deletes sealed segments, which nobody appends to.

use chrono::Utc;
use rusqlite::{Connection, TransactionBehavior, params};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::api_types::{CleanupReport, MovedAside, OpenReport};
use crate::error::StoreError;
use crate::layout;
use crate::store::{Shared, Staging};

/// Moves a damaged or stale index (and its WAL files) aside, keeping it for a person to look at.
pub fn set_aside_index(index_path: &Path) -> Result<(), StoreError> {
    if !index_path.exists() {
        for suffix in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(with_suffix(index_path, suffix));
        }
        return Ok(());
    }
    let stamp = Utc::now().format("%Y%m%dT%H%M%SZ");
    for suffix in ["", "-wal", "-shm"] {
        let from = with_suffix(index_path, suffix);
        if from.exists() {
            let to = with_suffix(index_path, &format!(".set-aside-{stamp}{suffix}"));
            std::fs::rename(&from, &to).map_err(|e| StoreError::io("move aside", &from, e))?;
        }
    }
    Ok(())
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

struct SegmentRow {
    id: i64,
    indexed_len: u64,
    sealed: bool,
    deleting: bool,
}

fn segment_rows(conn: &Connection) -> Result<HashMap<String, SegmentRow>, StoreError> {
    let mut stmt = conn.prepare("SELECT path, id, indexed_len, sealed, deleting FROM segments")?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                SegmentRow {
                    id: r.get(1)?,
                    indexed_len: r.get::<_, i64>(2)? as u64,
                    sealed: r.get::<_, i64>(3)? != 0,
                    deleting: r.get::<_, i64>(4)? != 0,
                },
            ))
        })?
        .collect::<Result<HashMap<_, _>, _>>()?;
    Ok(rows)
}

/// Is another live process appending to this segment? (It holds the file's lock.)
fn locked_by_other(path: &Path) -> bool {
    match File::open(path) {
        Ok(f) => match f.try_lock_shared() {
            Ok(()) => {
                let _ = f.unlock();
                false
            }
            Err(_) => true,
        },
        Err(_) => false,
    }
}

/// Brings the index in line with the folder. Caller holds the sequence lock.
pub fn recover(
    shared: &Shared,
    conn: &Connection,
    seq_file: &mut File,
    report: &mut OpenReport,
) -> Result<(), StoreError> {
    let root = &shared.root;
    let mut rows = segment_rows(conn)?;

    // Deletions a crash interrupted: finish them.
    for (rel, row) in rows.iter().filter(|(_, r)| r.deleting) {
        let path = root.join(rel);
        layout::remove_file_durable(&path).map_err(|e| StoreError::io("remove", &path, e))?;
        forget_data_key(shared, rel);
        forget_segment(conn, row.id)?;
    }
    rows.retain(|_, r| !r.deleting);

    let files = layout::walk_day_files(root)
        .map_err(|e| StoreError::io("list the segment files under", root, e))?;
    let mut on_disk = std::collections::HashSet::new();
    for path in files {
        if path.extension().and_then(|e| e.to_str()) != Some(layout::SEGMENT_EXT) {
            continue; // foreign files are adopted separately
        }
        let rel = layout::rel_string(root, &path);
        let size = match std::fs::metadata(&path) {
            Ok(m) => m.len(),
            // Deleted by another process's cleanup since we listed it: all delivered.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(StoreError::io("read", &path, e)),
        };
        on_disk.insert(rel.clone());
        let live = locked_by_other(&path);
        let tx = conn.unchecked_transaction()?;
        match rows.get(&rel) {
            Some(row) if size == row.indexed_len => {
                if !row.sealed && !live {
                    tx.execute("UPDATE segments SET sealed = 1 WHERE id = ?1", [row.id])?;
                }
            }
            Some(_) if live => {} // its writer indexes what it writes
            Some(row) if size > row.indexed_len => {
                index_tail(shared, &tx, &path, row.id, row.indexed_len, true, report)?;
            }
            Some(row) => {
                truncated_segment(shared, &tx, &path, row.id, size, report)?;
            }
            None if live => {} // just created by a running writer, which indexes it
            None => {
                tx.execute(
                    "INSERT INTO segments (path, indexed_len, sealed) VALUES (?1, 0, 0)",
                    [&rel],
                )?;
                let id = tx.last_insert_rowid();
                index_tail(shared, &tx, &path, id, 0, true, report)?;
            }
        }
        tx.commit()?;
    }

    // Segments the index knows but the folder lost: their records are gone.
    for (rel, row) in &rows {
        if on_disk.contains(rel) {
            continue;
        }
        let lost: i64 = conn.query_row(
            "SELECT COUNT(*) FROM records WHERE segment_id = ?1 AND open_sinks > 0",
            [row.id],
            |r| r.get(0),
        )?;
        if lost > 0 {
            tracing::error!(segment = %rel, records = lost, "A segment file with undelivered records is missing from the staging folder.");
            report.moved_aside.push(MovedAside {
                from: root.join(rel),
                to: PathBuf::new(),
                reason: format!("segment file missing with {lost} undelivered records"),
            });
        }
        forget_segment(conn, row.id)?;
    }

    // Requests a crash cut before they were answered: set aside, so a retry stages them whole.
    crate::client_keys::set_aside_cut_requests(shared, conn, report)?;

    // The counter never goes back, even if its file lost an update in a power cut.
    let from_file = crate::writer::read_seq(seq_file).unwrap_or(0);
    let from_index: i64 = conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM records", [], |r| {
        r.get(0)
    })?;
    let from_meta: u64 = crate::index::meta_get(conn, "max_seq")?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let max = from_file.max(from_index as u64).max(from_meta);
    if max != from_file {
        crate::writer::write_seq(seq_file, max)
            .map_err(|e| StoreError::io("write", shared.state_dir.join("seq"), e))?;
    }
    Ok(())
}

/// Indexes the records of `path` from `from` on. With `repair`, a torn tail is cut and the
/// segment sealed (its writer is gone); otherwise only complete lines are read.
fn index_tail(
    shared: &Shared,
    tx: &Connection,
    path: &Path,
    segment_id: i64,
    from: u64,
    repair: bool,
    report: &mut OpenReport,
) -> Result<(), StoreError> {
    let scan = match crate::segment::scan(path, from, shared.keys()) {
        Ok(scan) => scan,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StoreError::io("read", path, e)),
    };
    if let Some(kid) = scan.needs_key {
        // Not damage: the key is elsewhere. Nothing of this scan is applied.
        return Err(StoreError::KeyNeeded {
            what: format!("staging segment {}", path.display()),
            kids: kid,
            why: "that key was not given".into(),
        });
    }
    for rec in &scan.records {
        if crate::index::insert_record(
            tx,
            &rec.envelope,
            segment_id,
            rec.offset,
            rec.len,
            shared.keys(),
        )? {
            crate::client_keys::recovered(shared, tx, &rec.envelope, path)?;
            report.records_recovered += 1;
        }
    }
    for bad in &scan.damaged {
        let to = crate::dead::write_damaged(shared, path, bad.offset, &bad.bytes, &bad.reason)?;
        report.moved_aside.push(MovedAside {
            from: path.to_path_buf(),
            to,
            reason: format!("line at byte {}: {}", bad.offset, bad.reason),
        });
    }
    let mut len = scan.complete_len;
    if repair && !scan.torn_tail.is_empty() {
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| StoreError::io("open", path, e))?;
        f.set_len(scan.complete_len)
            .and_then(|()| f.sync_all())
            .map_err(|e| StoreError::io("repair torn tail of", path, e))?;
        report.torn_tails_repaired += 1;
        tracing::warn!(segment = %path.display(), bytes = scan.torn_tail.len(), "Cut an incomplete last line left by a crash (it was never acknowledged).");
    } else if !repair {
        len = scan.complete_len;
    }
    tx.execute(
        "UPDATE segments SET indexed_len = MAX(indexed_len, ?1), sealed = ?2 WHERE id = ?3",
        params![len as i64, repair as i64, segment_id],
    )?;
    Ok(())
}

/// A segment shorter than the index says: someone cut it. Records past the cut are set aside
/// (their bytes are gone); a record cut in half is too, and its half line removed.
fn truncated_segment(
    shared: &Shared,
    tx: &Connection,
    path: &Path,
    segment_id: i64,
    size: u64,
    report: &mut OpenReport,
) -> Result<(), StoreError> {
    let mut stmt = tx.prepare(
        "SELECT seq, offset, len FROM records WHERE segment_id = ?1 AND offset + len > ?2 ORDER BY seq",
    )?;
    let cut: Vec<(i64, i64, i64)> = stmt
        .query_map(params![segment_id, size as i64], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?
        .collect::<Result<_, _>>()?;
    let keep_len = cut
        .first()
        .map(|(_, off, _)| *off as u64)
        .unwrap_or(size)
        .min(size);
    for (seq, ..) in &cut {
        let reason =
            format!("the segment file was cut to {size} bytes; this record's bytes are gone");
        let to = crate::dead::set_aside_record(shared, tx, *seq as u64, path, &reason)?;
        report.moved_aside.push(MovedAside {
            from: path.to_path_buf(),
            to,
            reason,
        });
    }
    if keep_len < size {
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| StoreError::io("open", path, e))?;
        f.set_len(keep_len)
            .and_then(|()| f.sync_all())
            .map_err(|e| StoreError::io("repair", path, e))?;
        report.torn_tails_repaired += 1;
    }
    tx.execute(
        "UPDATE segments SET indexed_len = ?1, sealed = 1 WHERE id = ?2",
        params![keep_len as i64, segment_id],
    )?;
    Ok(())
}

fn forget_segment(conn: &Connection, segment_id: i64) -> Result<(), StoreError> {
    // Immediate: it reads before it writes, and a deferred transaction that has read cannot
    // wait for another connection's write lock (SQLite answers "database is locked" at once).
    let tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    // Only records still owed have deliveries (an ack removes the row as it counts the sink
    // off): none in a delivered segment, those of a segment whose file was lost.
    let owed: Vec<(i64, String)> = tx
        .prepare("SELECT seq, sinks FROM records WHERE segment_id = ?1 AND open_sinks > 0")?
        .query_map([segment_id], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for (seq, sinks) in owed {
        tx.execute(
            "DELETE FROM deliveries WHERE sink IN (SELECT value FROM json_each(?2)) AND seq = ?1",
            params![seq, crate::index::sinks_json(&sinks)],
        )?;
    }
    tx.execute("DELETE FROM records WHERE segment_id = ?1", [segment_id])?;
    tx.execute("DELETE FROM segments WHERE id = ?1", [segment_id])?;
    tx.commit()?;
    Ok(())
}

/// Deletes segments every sink has confirmed (and kept long enough), durably and in an order
/// that a crash cannot turn into a redelivery: mark, delete the file, forget the rows.
/// Forgets a deleted segment's data key (crypto-shredding, data_keys.rs). A failure is logged,
/// not returned: the segment is gone already, and the next open's sweep forgets the key.
fn forget_data_key(shared: &Shared, rel: &str) {
    if let Err(e) = shared.data_keys.shred(rel) {
        tracing::warn!(segment = rel, error = %e, "could not forget a deleted segment's data key; the next start will");
    }
}

pub fn cleanup(store: &Staging, client_key_ttl: Duration) -> Result<CleanupReport, StoreError> {
    let shared = store.shared();
    let keep_secs = shared.opts.keep_delivered.as_secs() as i64;
    let now = Utc::now().timestamp();
    let mut report = CleanupReport::default();

    // Segments left unsealed by processes that have exited.
    let unsealed: Vec<(i64, String, i64)> = {
        let db = store.db();
        let mut stmt = db.prepare(
            "SELECT id, path, indexed_len FROM segments WHERE sealed = 0 AND deleting = 0",
        )?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?
    };
    for (id, rel, indexed_len) in unsealed {
        let path = shared.root.join(&rel);
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if size as i64 == indexed_len && !locked_by_other(&path) {
            store
                .db()
                .execute("UPDATE segments SET sealed = 1 WHERE id = ?1", [id])?;
        }
    }

    // Segments every sink has confirmed and kept long enough. The owed test comes first, on
    // its own: a seek in the partial index `records_owed`, so a backlog's segments are passed
    // over without reading their records.
    let done: Vec<(i64, String, i64, i64)> = {
        let db = store.db();
        let mut stmt = db.prepare(
            "SELECT s.id, s.path, s.indexed_len, (SELECT COALESCE(MAX(seq), 0) FROM records WHERE segment_id = s.id)
               FROM segments s
              WHERE s.sealed = 1 AND s.deleting = 0
                AND NOT EXISTS (SELECT 1 FROM records r WHERE r.segment_id = s.id AND r.open_sinks > 0)
                AND NOT EXISTS (SELECT 1 FROM records r WHERE r.segment_id = s.id
                                  AND COALESCE(r.delivered_at, 0) > ?1)",
        )?;
        stmt.query_map([now - keep_secs], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?
        .collect::<Result<_, _>>()?
    };
    if !done.is_empty() {
        // The segments about to go may hold sources' latest checkpoints: keep them first.
        crate::checkpoints::save(&store.db(), &shared.state_dir)?;
    }
    for (id, rel, len, max_seq) in done {
        let path = shared.root.join(&rel);
        {
            let mut db = store.db();
            let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let old: u64 = crate::index::meta_get(&tx, "max_seq")?
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            crate::index::meta_set(&tx, "max_seq", &old.max(max_seq as u64).to_string())?;
            tx.execute("UPDATE segments SET deleting = 1 WHERE id = ?1", [id])?;
            tx.commit()?;
        }
        layout::remove_file_durable(&path).map_err(|e| StoreError::io("remove", &path, e))?;
        forget_data_key(shared, &rel);
        let forgotten: i64 = store.db().query_row(
            "SELECT COUNT(*) FROM records WHERE segment_id = ?1",
            [id],
            |r| r.get(0),
        )?;
        forget_segment(&store.db(), id)?;
        if let Some(dir) = path.parent() {
            layout::prune_empty_dirs(&shared.root, dir);
        }
        report.segments_deleted += 1;
        report.bytes_freed += len as u64;
        report.records_forgotten += forgotten as u64;
    }
    store.db().execute(
        "DELETE FROM client_keys WHERE created_at < ?1",
        [now - client_key_ttl.as_secs() as i64],
    )?;
    if report.segments_deleted > 0 {
        // The WAL still holds old images of the pages the forgotten rows were on (their
        // keys): copy it into the database and cut it to zero bytes. Another connection
        // reading at this moment makes SQLite skip the truncation; the next cleanup does it.
        let _ = store
            .db()
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
    }
    Ok(report)
}
