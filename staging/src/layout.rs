//! Where things live in the staging folder, and the small file-system helpers that create them
//! with the right permissions (0700 folders, 0600 files on Unix) and make them durable.

use chrono::{DateTime, Datelike, Utc};
use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

/// The store's own bookkeeping folder: the SQLite index and the sequence lock.
pub const STATE_DIR: &str = "_state";
/// Dead letters, unless `FAILED_DIR` moves them.
pub const FAILED_DIR: &str = "_failed";
/// Under the dead-letter folder: damaged lines and files moved aside, with their reasons.
pub const DAMAGED_DIR: &str = "_damaged";
/// Segment files end in this; foreign files (old layout) end in `.json`.
pub const SEGMENT_EXT: &str = "jsonl";

/// `<action>/<entity>/<yyyy>/<mm>/<dd>`, relative to the staging root.
pub fn day_dir(action: &str, entity: &str, at: DateTime<Utc>) -> PathBuf {
    PathBuf::from(action)
        .join(entity)
        .join(format!("{:04}", at.year()))
        .join(format!("{:02}", at.month()))
        .join(format!("{:02}", at.day()))
}

/// `20261123T084106.123456Z-0000000000000042.jsonl`: sorts by time, then by first sequence.
pub fn segment_file_name(at: DateTime<Utc>, first_seq: u64) -> String {
    format!(
        "{}-{:016}.{SEGMENT_EXT}",
        at.format("%Y%m%dT%H%M%S%.6fZ"),
        first_seq
    )
}

/// RFC 3339 UTC with microseconds, as envelopes carry it.
pub fn rfc3339(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// Creates `dir` and its missing parents (0700), fsyncing each parent whose entry changed so
/// the new folders survive a power cut.
pub fn create_dir_durable(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut cur = dir;
    while !cur.exists() {
        missing.push(cur.to_path_buf());
        match cur.parent() {
            Some(p) if !p.as_os_str().is_empty() => cur = p,
            _ => break,
        }
    }
    for d in missing.iter().rev() {
        match private_dir_builder().create(d) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        if let Some(parent) = d.parent() {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

/// Makes an existing folder private (0700 on Unix): a staging folder created beforehand by an
/// installer or a person keeps no group or world access. Fails when that cannot be done (the
/// folder belongs to someone else), so the store never runs in a folder others can read.
pub fn make_private(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir)?.permissions().mode() & 0o7777;
        if mode != 0o700 {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn private_dir_builder() -> fs::DirBuilder {
    #[allow(unused_mut)]
    let mut b = fs::DirBuilder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b
}

/// Open options for a new private file (0600 on Unix).
pub fn private_file() -> OpenOptions {
    #[allow(unused_mut)]
    let mut o = OpenOptions::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    o
}

/// fsync a folder so entries created, renamed or removed in it are durable. A no-op on
/// Windows, where folders cannot be opened for syncing and NTFS journals metadata itself.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        fs::File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Writes `bytes` to `path` atomically and durably: a temporary file, fsync, rename, fsync dir.
pub fn write_file_durable(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_durable(path, bytes, false)
}

/// [`write_file_durable`] over an existing file whose owner the new one keeps (Unix): root
/// replacing the service user's key file must leave a file the service can still read.
pub fn replace_file_keeping_owner(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_durable(path, bytes, true)
}

fn write_durable(path: &Path, bytes: &[u8], keep_owner: bool) -> io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    create_dir_durable(dir)?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = private_file()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        #[cfg(unix)]
        if keep_owner && let Ok(old) = fs::metadata(path) {
            use std::os::unix::fs::MetadataExt;
            std::os::unix::fs::fchown(&f, Some(old.uid()), Some(old.gid())).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot give the new file the owner of the old one (uid {}): {e}; run this as that user or as root",
                        old.uid()
                    ),
                )
            })?;
        }
        #[cfg(not(unix))]
        let _ = keep_owner;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// Removes a file and makes the removal durable. A file already gone is fine.
pub fn remove_file_durable(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    if let Some(dir) = path.parent() {
        match sync_dir(dir) {
            // Another process pruned the emptied folder meanwhile (cleanup, a requeue): the
            // entry went with it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            other => other?,
        }
    }
    Ok(())
}

/// Removes empty day / month / year / entity / action folders above `dir`, up to `root`.
/// Best effort: a folder something else just wrote into stays.
pub fn prune_empty_dirs(root: &Path, dir: &Path) {
    let mut cur = dir.to_path_buf();
    while cur.starts_with(root) && cur != root {
        if fs::remove_dir(&cur).is_err() {
            break;
        }
        match cur.parent() {
            Some(p) => cur = p.to_path_buf(),
            None => break,
        }
    }
}

/// Every file under `root` at exactly `<action>/<entity>/<yyyy>/<mm>/<dd>/<file>`, skipping
/// folders whose names start with `_` or `.` (the store's own). Sorted by path. Folders and
/// files that vanish while we look (another process's cleanup) are simply not listed.
pub fn walk_day_files(root: &Path) -> io::Result<Vec<PathBuf>> {
    let mut level = vec![root.to_path_buf()];
    for _ in 0..5 {
        let mut next = Vec::new();
        for d in &level {
            next.extend(list_dir(d, true)?);
        }
        level = next;
    }
    let mut files = Vec::new();
    for d in level {
        files.extend(list_dir(&d, false)?);
    }
    files.sort();
    Ok(files)
}

/// The sub-folders (`dirs`) or files of `dir`, without the store's own `_`/`.` folders.
fn list_dir(dir: &Path, dirs: bool) -> io::Result<Vec<PathBuf>> {
    let gone = |e: &io::Error| e.kind() == io::ErrorKind::NotFound;
    let mut out = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if gone(&e) => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = match entry {
            Ok(e) => e,
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(e),
        };
        let file_type = match entry.file_type() {
            Ok(t) => t,
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(e),
        };
        let name = entry.file_name();
        let hidden = name.to_string_lossy().starts_with(['_', '.']);
        let wanted = if dirs {
            file_type.is_dir() && !hidden
        } else {
            file_type.is_file()
        };
        if wanted {
            out.push(entry.path());
        }
    }
    Ok(out)
}

/// Splits a day-file path into (action, entity), relative to `root`.
pub fn action_entity_of(root: &Path, file: &Path) -> Option<(String, String)> {
    let rel = file.strip_prefix(root).ok()?;
    let mut parts = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned());
    let action = parts.next()?;
    let entity = parts.next()?;
    Some((action, entity))
}

/// A path relative to `root`, with `/` separators, as the index stores it.
pub fn rel_string(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}
