//! Leases and their owners. A lease is one row of `leases` per leased batch (its seqs as a JSON
//! array): taking a batch is one insert, settling it one read and one delete, whatever the
//! batch size. While a lease lasts, its records hold their keys back as records in flight.
//!
//! A lease normally ends when its deliverer acks, fails or releases the records, or when its
//! time runs out. A deliverer that was killed never does the first, and waiting out the time
//! (minutes) would stall the first record of every key in its batch. So every process that
//! opens the store registers itself as an owner: `_state/owners/<owner>.lock`, locked for as
//! long as the process lives. Leases whose owner's file is no longer locked belong to a dead
//! process and are given back at once.

use rusqlite::{Connection, params};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::StoreError;
use crate::layout;

fn owners_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("owners")
}

/// Registers this process as a lease owner; the returned file must stay open (and locked).
pub fn register(state_dir: &Path) -> Result<(String, File), StoreError> {
    let dir = owners_dir(state_dir);
    layout::create_dir_durable(&dir).map_err(|e| StoreError::io("create folder", &dir, e))?;
    let owner = format!("{}-{}", std::process::id(), uuid::Uuid::now_v7().simple());
    let path = dir.join(format!("{owner}.lock"));
    let file = layout::private_file()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| StoreError::io("create", &path, e))?;
    file.try_lock()
        .map_err(|e| StoreError::io("lock", &path, std::io::Error::other(e.to_string())))?;
    Ok((owner, file))
}

/// Removes this process's owner file (on a clean close).
pub fn unregister(state_dir: &Path, owner: &str) {
    let _ = std::fs::remove_file(owners_dir(state_dir).join(format!("{owner}.lock")));
}

/// Does any process other than `me` have the store open now?
pub fn others_alive(state_dir: &Path, me: &str) -> bool {
    let Ok(entries) = std::fs::read_dir(owners_dir(state_dir)) else {
        return false;
    };
    entries.flatten().any(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        name.strip_suffix(".lock")
            .is_some_and(|owner| owner != me && !is_dead(state_dir, owner))
    })
}

/// Is the process that registered `owner` gone?
fn is_dead(state_dir: &Path, owner: &str) -> bool {
    let path = owners_dir(state_dir).join(format!("{owner}.lock"));
    match File::open(&path) {
        Ok(f) => match f.try_lock() {
            Ok(()) => {
                let _ = f.unlock();
                true
            }
            Err(_) => false,
        },
        Err(_) => true,
    }
}

/// Records `seqs` (a JSON array) as leased to `owner` for `sink` until `until` (unix ms).
pub(crate) fn take(
    conn: &Connection,
    sink: &str,
    owner: &str,
    until: i64,
    seqs_json: &str,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO leases (sink, owner, lease_until, seqs) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![sink, owner, until, seqs_json])?;
    Ok(())
}

/// The records of `sink` under a lease that lasts beyond `now`, whoever holds it. Leases that
/// have run out are deleted on the way: their records are simply deliverable again.
pub(crate) fn held(conn: &Connection, sink: &str, now: i64) -> Result<HashSet<u64>, StoreError> {
    conn.prepare_cached("DELETE FROM leases WHERE lease_until <= ?1")?
        .execute(params![now])?;
    let mut held = HashSet::new();
    let mut stmt = conn.prepare_cached("SELECT seqs FROM leases WHERE sink = ?1")?;
    let mut rows = stmt.query(params![sink])?;
    while let Some(row) = rows.next()? {
        held.extend(parse_seqs(row.get_ref(0)?.as_str().unwrap_or_default()));
    }
    Ok(held)
}

/// How many records of each sink are pending under a lease that lasts beyond `now`: in flight.
/// Counted here, lease by lease and record by record through the primary key, never by a join
/// that SQLite might plan as a scan of every delivery with each lease's array inside.
pub(crate) fn pending_leased(
    conn: &Connection,
    now: i64,
) -> Result<HashMap<String, i64>, StoreError> {
    let leases: Vec<(String, String)> = conn
        .prepare_cached("SELECT sink, seqs FROM leases WHERE lease_until > ?1")?
        .query_map(params![now], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut pending = conn.prepare_cached(
        "SELECT 1 FROM deliveries WHERE sink = ?1 AND seq = ?2 AND state = 'pending'",
    )?;
    let mut counts: HashMap<String, i64> = HashMap::new();
    for (sink, seqs) in leases {
        let mut n = 0;
        for seq in parse_seqs(&seqs) {
            n += i64::from(pending.exists(params![sink, seq as i64])?);
        }
        *counts.entry(sink).or_default() += n;
    }
    Ok(counts)
}

/// Is record `seq` of `sink` under a lease that lasts beyond `now`?
pub(crate) fn holds(conn: &Connection, sink: &str, seq: u64, now: i64) -> rusqlite::Result<bool> {
    conn.prepare_cached(
        "SELECT 1 FROM leases l, json_each(l.seqs) j
          WHERE l.sink = ?1 AND l.lease_until > ?2 AND j.value = ?3",
    )?
    .exists(params![sink, now, seq as i64])
}

/// Ends `owner`'s leases of `settled` records of `sink`: a lease left with no record is
/// deleted, one that still holds some keeps only those.
pub(crate) fn end(
    conn: &Connection,
    sink: &str,
    owner: &str,
    settled: &HashSet<u64>,
) -> Result<(), StoreError> {
    let leases: Vec<(i64, String)> = conn
        .prepare_cached("SELECT id, seqs FROM leases WHERE sink = ?1 AND owner = ?2")?
        .query_map(params![sink, owner], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for (id, seqs) in leases {
        let seqs = parse_seqs(&seqs);
        let left: Vec<u64> = seqs
            .iter()
            .copied()
            .filter(|s| !settled.contains(s))
            .collect();
        if left.is_empty() {
            conn.prepare_cached("DELETE FROM leases WHERE id = ?1")?
                .execute(params![id])?;
        } else if left.len() < seqs.len() {
            let left = serde_json::to_string(&left).expect("numbers serialize");
            conn.prepare_cached("UPDATE leases SET seqs = ?2 WHERE id = ?1")?
                .execute(params![id, left])?;
        }
    }
    Ok(())
}

/// A lease's seqs. The index writes them; anything unreadable counts as no record (the lease
/// then holds nothing back, and its records are sent again, which delivery tolerates).
fn parse_seqs(json: &str) -> Vec<u64> {
    serde_json::from_str(json).unwrap_or_default()
}

/// Gives back the leases of dead processes; returns how many records became pending again.
pub fn release_orphaned(conn: &Connection, state_dir: &Path, me: &str) -> Result<u64, StoreError> {
    // Owners of `leases` rows, and of delivery rows an older version marked in flight.
    let owners: Vec<String> = conn
        .prepare(
            "SELECT owner FROM leases WHERE owner != ?1
             UNION
             SELECT lease_owner FROM deliveries
              WHERE state = 'in_flight' AND lease_owner IS NOT NULL AND lease_owner != ?1",
        )?
        .query_map([me], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut released = 0;
    for owner in owners {
        if !is_dead(state_dir, &owner) {
            continue;
        }
        let held: i64 = conn.query_row(
            "SELECT COALESCE(SUM(json_array_length(seqs)), 0) FROM leases WHERE owner = ?1",
            params![owner],
            |r| r.get(0),
        )?;
        conn.execute("DELETE FROM leases WHERE owner = ?1", params![owner])?;
        released += held as u64;
        released += conn.execute(
            "UPDATE deliveries SET state = 'pending', lease_until = 0, lease_owner = NULL
              WHERE state = 'in_flight' AND lease_owner = ?1",
            params![owner],
        )? as u64;
        tracing::info!(owner = %owner, "Released the leases of a deliverer that is no longer running.");
    }
    // Owner files left by processes that died: nothing refers to them any more.
    if let Ok(entries) = std::fs::read_dir(owners_dir(state_dir)) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(owner) = name.strip_suffix(".lock")
                && owner != me
                && is_dead(state_dir, owner)
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    Ok(released)
}
