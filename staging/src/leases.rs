//! Lease owners. A lease normally ends when its deliverer acks, fails or releases the records,
//! or when its time runs out. A deliverer that was killed never does the first, and waiting out
//! the time (minutes) would stall the first record of every key in its batch. So every process
//! that opens the store registers itself as an owner: `_state/owners/<owner>.lock`, locked for as
//! long as the process lives. Leases whose owner's file is no longer locked belong to a dead
//! process and are given back at once.

use rusqlite::{Connection, params};
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

/// Gives back the leases of dead processes; returns how many records became pending again.
pub fn release_orphaned(conn: &Connection, state_dir: &Path, me: &str) -> Result<u64, StoreError> {
    let owners: Vec<String> = {
        let mut stmt = conn.prepare(
            "SELECT DISTINCT lease_owner FROM deliveries
              WHERE state = 'in_flight' AND lease_owner IS NOT NULL AND lease_owner != ?1",
        )?;
        stmt.query_map([me], |r| r.get(0))?
            .collect::<Result<_, _>>()?
    };
    let mut released = 0;
    for owner in owners {
        if !is_dead(state_dir, &owner) {
            continue;
        }
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
