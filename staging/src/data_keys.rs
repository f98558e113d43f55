//! The data keys of sealed segments, kept apart from the segments so that a delivered segment
//! is destroyed by forgetting its key (crypto-shredding).
//!
//! `_state/data-keys` is a file of fixed-size text slots, one per live sealed segment:
//! `<data key id> <key id> <wrapped data key> <segment path>`, padded with spaces to
//! [`SLOT_LEN`] bytes. A sealed line names its data key by id (`"dkid"`), never holds it. When
//! a segment file is deleted (cleanup, or a deletion a crash interrupted), its slot is
//! overwritten in place with spaces and flushed: from then on the segment's bytes (a leftover
//! in free disk space, a copy in a backup) cannot be opened, even with the key file. Blank
//! slots are reused, so the file stays as small as the number of live segments.
//!
//! Order of writes, so a crash never leaves a line without its key: the segment file is
//! created, then its slot is written and flushed, then its first line; the file is deleted
//! before its slot is blanked (a crash between the two leaves a slot whose file is gone, which
//! [`DataKeySlots::sweep`] blanks at the next open). Writers take an exclusive lock on the file
//! (several processes may stage into one folder); readers need none, because a slot is flushed
//! before any line names it.
//!
//! Overwriting in place destroys the old bytes on the usual Linux and Windows file systems
//! (ext4, XFS, NTFS); copy-on-write file systems (btrfs, ZFS) and flash translation layers may
//! keep old blocks, which full-disk encryption covers. Dead letters keep their own data key
//! inside their file (one file each: deleting it is all there is to forget).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

/// The file under `_state/`.
pub const FILE: &str = "data-keys";
/// Bytes per slot, newline included: room for the longest segment path (two 64-character
/// names, the date folders and the file name).
pub const SLOT_LEN: usize = 512;

/// One slot's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub dkid: String,
    pub kid: String,
    pub wrapped: String,
    /// The segment's path relative to the staging root, `/`-separated.
    pub segment: String,
}

impl Slot {
    fn encode(&self) -> Result<Vec<u8>, std::io::Error> {
        let text = format!(
            "{} {} {} {}",
            self.dkid, self.kid, self.wrapped, self.segment
        );
        if text.len() >= SLOT_LEN || text.contains('\n') {
            return Err(std::io::Error::other(format!(
                "a data key slot cannot hold the segment path {} ({} bytes with the key; a slot holds {})",
                self.segment,
                text.len(),
                SLOT_LEN - 1
            )));
        }
        let mut bytes = text.into_bytes();
        bytes.resize(SLOT_LEN - 1, b' ');
        bytes.push(b'\n');
        Ok(bytes)
    }

    /// A slot's text, or `None` for a blank (shredded or never used) or unreadable slot.
    fn decode(bytes: &[u8]) -> Option<Slot> {
        let text = std::str::from_utf8(bytes).ok()?.trim_end();
        let mut parts = text.splitn(4, ' ');
        let (dkid, kid, wrapped, segment) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        (!dkid.is_empty() && kid.starts_with("k-") && !segment.is_empty()).then(|| Slot {
            dkid: dkid.into(),
            kid: kid.into(),
            wrapped: wrapped.into(),
            segment: segment.into(),
        })
    }
}

const BLANK: [u8; SLOT_LEN] = {
    let mut b = [b' '; SLOT_LEN];
    b[SLOT_LEN - 1] = b'\n';
    b
};

/// `_state/data-keys` of one staging folder.
#[derive(Debug)]
pub struct DataKeySlots {
    path: PathBuf,
    /// Serializes this process's writers; the file lock serializes processes.
    write: Mutex<()>,
    /// Data key id → (key id, wrapped data key), as last read.
    cache: RwLock<HashMap<String, (String, String)>>,
}

impl DataKeySlots {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join(FILE),
            write: Mutex::new(()),
            cache: RwLock::new(HashMap::new()),
        }
    }

    /// The key id and wrapped data key of `dkid`, reading the file again when it is not known
    /// yet (another process may have added it).
    pub fn lookup(&self, dkid: &str) -> std::io::Result<Option<(String, String)>> {
        if let Some(hit) = self
            .cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(dkid)
        {
            return Ok(Some(hit.clone()));
        }
        let slots = match std::fs::read(&self.path) {
            Ok(bytes) => parse(&bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        cache.clear();
        for (_, s) in slots {
            cache.insert(s.dkid, (s.kid, s.wrapped));
        }
        Ok(cache.get(dkid).cloned())
    }

    /// Writes `slot` (into a blank slot, or at the end) and flushes it.
    pub fn add(&self, slot: &Slot) -> std::io::Result<()> {
        let bytes = slot.encode()?;
        self.locked(|file, slots, len| {
            let blank = (0..len / SLOT_LEN).find(|i| !slots.iter().any(|(at, _)| at == i));
            let at = blank.unwrap_or(len / SLOT_LEN);
            file.seek(SeekFrom::Start((at * SLOT_LEN) as u64))?;
            file.write_all(&bytes)?;
            file.sync_data()
        })?;
        self.cache
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(slot.dkid.clone(), (slot.kid.clone(), slot.wrapped.clone()));
        Ok(())
    }

    /// Blanks the slots of the segments `gone` says are gone; returns how many.
    fn blank_where(&self, gone: impl Fn(&Slot) -> bool) -> std::io::Result<usize> {
        let mut blanked = Vec::new();
        self.locked(|file, slots, _| {
            for (at, slot) in slots {
                if gone(slot) {
                    file.seek(SeekFrom::Start((at * SLOT_LEN) as u64))?;
                    file.write_all(&BLANK)?;
                    blanked.push(slot.dkid.clone());
                }
            }
            if blanked.is_empty() {
                Ok(())
            } else {
                file.sync_data()
            }
        })?;
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        for dkid in &blanked {
            cache.remove(dkid);
        }
        Ok(blanked.len())
    }

    /// Forgets the data key of the segment `rel` (after its file was deleted).
    pub fn shred(&self, rel: &str) -> std::io::Result<usize> {
        self.blank_where(|s| s.segment == rel)
    }

    /// Forgets the data keys whose segment file is no longer under `root` (a deletion a crash
    /// interrupted between the file and its slot).
    pub fn sweep(&self, root: &Path) -> std::io::Result<usize> {
        if !self.path.exists() {
            return Ok(0);
        }
        self.blank_where(|s| !root.join(&s.segment).exists())
    }

    /// The key ids of the live slots (for `estafeta key prune`).
    pub fn kids(&self) -> std::io::Result<Vec<String>> {
        match std::fs::read(&self.path) {
            Ok(bytes) => Ok(parse(&bytes).into_iter().map(|(_, s)| s.kid).collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Runs `f` on the file, opened and locked, with its slots as read under the lock and its
    /// length rounded down to whole slots (a slot torn by a crash at the end is overwritten).
    fn locked<T>(
        &self,
        f: impl FnOnce(&mut File, &[(usize, Slot)], usize) -> std::io::Result<T>,
    ) -> std::io::Result<T> {
        let _guard = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let mut file = crate::layout::private_file()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.path)?;
        file.lock()?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let len = bytes.len() - bytes.len() % SLOT_LEN;
        let slots = parse(&bytes[..len]);
        let done = f(&mut file, &slots, len)?;
        if bytes.is_empty() {
            // Made just now (or empty): its name must be on disk too, or a power cut takes
            // the file, and with it the keys of segments whose lines survived.
            if let Some(dir) = self.path.parent() {
                crate::layout::sync_dir(dir)?;
            }
        }
        Ok(done)
        // The lock goes with the file.
    }
}

/// Every readable slot with its index.
fn parse(bytes: &[u8]) -> Vec<(usize, Slot)> {
    bytes
        .chunks_exact(SLOT_LEN)
        .enumerate()
        .filter_map(|(i, chunk)| Slot::decode(chunk).map(|s| (i, s)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(dkid: &str, segment: &str) -> Slot {
        Slot {
            dkid: dkid.into(),
            kid: "k-0011223344556677".into(),
            wrapped: "d3JhcHBlZA".into(),
            segment: segment.into(),
        }
    }

    #[test]
    fn slots_are_added_found_shredded_in_place_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let slots = DataKeySlots::new(dir.path());
        slots
            .add(&slot("a1", "create/p/2026/12/06/a.jsonl"))
            .unwrap();
        slots
            .add(&slot("b2", "create/p/2026/12/06/b.jsonl"))
            .unwrap();
        let file = dir.path().join(FILE);
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 2 * SLOT_LEN as u64);
        // Another process (a fresh reader) finds them.
        let other = DataKeySlots::new(dir.path());
        assert_eq!(
            other.lookup("b2").unwrap(),
            Some(("k-0011223344556677".into(), "d3JhcHBlZA".into()))
        );

        assert_eq!(slots.shred("create/p/2026/12/06/a.jsonl").unwrap(), 1);
        let bytes = std::fs::read(&file).unwrap();
        assert_eq!(&bytes[..SLOT_LEN], &BLANK[..], "overwritten in place");
        assert!(!String::from_utf8_lossy(&bytes).contains("a1 "));
        assert_eq!(slots.lookup("a1").unwrap(), None);
        assert_eq!(DataKeySlots::new(dir.path()).lookup("a1").unwrap(), None);

        // The blank slot is reused: the file does not grow.
        slots
            .add(&slot("c3", "create/p/2026/12/06/c.jsonl"))
            .unwrap();
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 2 * SLOT_LEN as u64);
        assert!(slots.lookup("c3").unwrap().is_some());
    }

    #[test]
    fn sweep_forgets_the_keys_of_segments_that_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("_state");
        std::fs::create_dir(&state).unwrap();
        std::fs::write(dir.path().join("live.jsonl"), b"").unwrap();
        let slots = DataKeySlots::new(&state);
        slots.add(&slot("live", "live.jsonl")).unwrap();
        slots.add(&slot("gone", "gone.jsonl")).unwrap();
        assert_eq!(slots.sweep(dir.path()).unwrap(), 1);
        assert!(slots.lookup("live").unwrap().is_some());
        assert_eq!(DataKeySlots::new(&state).lookup("gone").unwrap(), None);
    }

    #[test]
    fn a_torn_last_slot_is_ignored_and_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let slots = DataKeySlots::new(dir.path());
        slots.add(&slot("a1", "a.jsonl")).unwrap();
        let file = dir.path().join(FILE);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&file)
            .unwrap();
        f.write_all(b"half a sl").unwrap();
        drop(f);
        slots.add(&slot("b2", "b.jsonl")).unwrap();
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 2 * SLOT_LEN as u64);
        assert!(
            DataKeySlots::new(dir.path())
                .lookup("b2")
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn a_path_too_long_for_a_slot_is_an_error_not_a_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let slots = DataKeySlots::new(dir.path());
        let long = "x".repeat(SLOT_LEN);
        assert!(slots.add(&slot("a1", &long)).is_err());
    }
}
