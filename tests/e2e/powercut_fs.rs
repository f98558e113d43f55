//! The power-cut file system (`estafeta_e2e::powercut_fs`) forgets exactly what strict POSIX lets
//! a power cut forget: file content not fsync'd, directory entries whose directory was not
//! fsync'd (creations, renames, unlinks, whole trees), with an optional torn last write; and it
//! serves SQLite in WAL mode (in a killed python3 child) and the kernel's own flock locks. Each test mounts it in a fresh
//! temporary directory and fails, saying why, when FUSE cannot mount (scripts/install-deps).

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use estafeta_e2e::powercut_fs::{CutReport, ForgetfulFs};
use rusqlite::Connection;

/// A mount in its own temporary directory; the mount goes first when dropped (field order).
struct Mounted {
    fs: ForgetfulFs,
    _dir: tempfile::TempDir,
}

impl Mounted {
    fn new() -> Mounted {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let fs = ForgetfulFs::mount(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        Mounted { fs, _dir: dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.fs.mountpoint().join(name)
    }

    fn cut(&mut self, tear: Option<u64>) -> CutReport {
        self.fs
            .power_cut(tear)
            .unwrap_or_else(|e| panic!("power cut: {e}"))
    }
}

/// Creates (or truncates) `path` with `bytes`, fsync'ing the file when `sync`.
fn write_file(path: &Path, bytes: &[u8], sync: bool) {
    let mut f = File::create(path).unwrap();
    f.write_all(bytes).unwrap();
    if sync {
        f.sync_all().unwrap();
    }
}

fn append(path: &Path, bytes: &[u8]) {
    OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap()
        .write_all(bytes)
        .unwrap();
}

/// fsync of a directory: FUSE FSYNCDIR.
fn fsync_dir(path: &Path) {
    File::open(path).unwrap().sync_all().unwrap();
}

#[test]
fn synced_data_survives_a_cut_and_an_unsynced_append_does_not() {
    let mut m = Mounted::new();
    let log = m.path("log");
    write_file(&log, b"durable-part", true);
    fsync_dir(m.fs.mountpoint());
    append(&log, b"+lost-tail");
    assert_eq!(fs::read(&log).unwrap(), b"durable-part+lost-tail");
    assert_eq!(m.fs.unsynced_bytes(), 10);

    let report = m.cut(None);
    assert_eq!(fs::read(&log).unwrap(), b"durable-part");
    assert_eq!(fs::metadata(&log).unwrap().len(), 12);
    let expected = CutReport {
        files_reverted: 1,
        bytes_forgotten: 10,
        ..CutReport::default()
    };
    assert_eq!(report, expected);
    assert_eq!(m.fs.unsynced_bytes(), 0);
}

#[test]
fn a_write_past_the_end_reads_zeros_and_an_unsynced_truncate_is_undone() {
    let mut m = Mounted::new();
    let data = m.path("data");
    write_file(&data, b"abc", true);
    fsync_dir(m.fs.mountpoint());
    let f = OpenOptions::new().write(true).open(&data).unwrap();
    f.write_at(b"z", 6).unwrap();
    assert_eq!(fs::read(&data).unwrap(), b"abc\0\0\0z");
    f.sync_data().unwrap();
    f.set_len(1).unwrap();
    drop(f);
    assert_eq!(fs::read(&data).unwrap(), b"a");

    m.cut(None);
    assert_eq!(fs::read(&data).unwrap(), b"abc\0\0\0z");
}

#[test]
fn a_synced_file_is_gone_after_a_cut_unless_its_directory_was_synced() {
    let mut m = Mounted::new();
    write_file(
        &m.path("orphan"),
        b"synced, but nothing names it durably",
        true,
    );
    let report = m.cut(None);
    assert!(
        !m.path("orphan").exists(),
        "no fsync of the directory, no file"
    );
    assert_eq!((report.entries_forgotten, report.inodes_dropped), (1, 1));

    write_file(&m.path("kept"), b"named durably", true);
    fsync_dir(m.fs.mountpoint());
    let report = m.cut(None);
    assert_eq!(fs::read(m.path("kept")).unwrap(), b"named durably");
    assert_eq!(report, CutReport::default());
}

#[test]
fn renames_and_unlinks_are_undone_without_a_directory_fsync() {
    let mut m = Mounted::new();
    let root = m.fs.mountpoint().to_owned();
    let (a, sub) = (m.path("a.txt"), m.path("sub"));
    let b = sub.join("b.txt");
    fs::create_dir(&sub).unwrap();
    write_file(&a, b"A", true);
    fsync_dir(&root);

    fs::rename(&a, &b).unwrap();
    let report = m.cut(None);
    assert!(a.exists() && !b.exists(), "an unsynced rename is undone");
    assert_eq!(report.entries_forgotten, 2);

    fs::rename(&a, &b).unwrap();
    fsync_dir(&root);
    fsync_dir(&sub);
    m.cut(None);
    assert!(!a.exists(), "both directories synced: the old name is gone");
    assert_eq!(fs::read(&b).unwrap(), b"A");

    fs::remove_file(&b).unwrap();
    assert!(!b.exists());
    m.cut(None);
    assert_eq!(fs::read(&b).unwrap(), b"A", "an unsynced unlink is undone");

    // Replacing a file by renaming a synced temporary over it: durable only with the dir fsync.
    let tmp = sub.join("b.txt.tmp");
    write_file(&tmp, b"B", true);
    fs::rename(&tmp, &b).unwrap();
    m.cut(None);
    assert_eq!(fs::read(&b).unwrap(), b"A");
    assert!(!tmp.exists());
    write_file(&tmp, b"B", true);
    fs::rename(&tmp, &b).unwrap();
    fsync_dir(&sub);
    m.cut(None);
    assert_eq!(fs::read(&b).unwrap(), b"B");
    assert_eq!(fs::read_dir(&sub).unwrap().count(), 1);
}

#[test]
fn a_torn_append_keeps_a_strict_prefix_chosen_by_the_seed() {
    let mut m = Mounted::new();
    let log = m.path("log");
    let synced = b"0123456789".repeat(10);
    let tail: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8 + 1).collect();
    write_file(&log, &synced, true);
    fsync_dir(m.fs.mountpoint());

    let mut kept_by_seed = Vec::new();
    for seed in [1, 2, 3, 4, 5, 6, 7, 8, 1] {
        append(&log, &tail);
        let report = m.cut(Some(seed));
        let tear = report
            .tear
            .clone()
            .unwrap_or_else(|| panic!("seed {seed}: no tear in {report:?}"));
        assert_eq!(
            (tear.path.as_path(), tear.offset, tear.len),
            (Path::new("log"), 100, 4096)
        );
        assert!(
            tear.kept < tear.len,
            "a tear keeps a strict prefix: {tear:?}"
        );
        let kept = tear.kept as usize;
        assert_eq!(
            fs::read(&log).unwrap(),
            [&synced[..], &tail[..kept]].concat(),
            "seed {seed}"
        );
        assert_eq!(report.bytes_forgotten, 4096 - tear.kept);
        kept_by_seed.push(kept);
        // Back to the synced content for the next seed.
        let f = OpenOptions::new().write(true).open(&log).unwrap();
        f.set_len(100).unwrap();
        f.sync_all().unwrap();
    }
    assert_eq!(
        kept_by_seed[0], kept_by_seed[8],
        "the same seed tears the same way"
    );
    kept_by_seed.sort_unstable();
    kept_by_seed.dedup();
    assert!(
        kept_by_seed.len() > 1,
        "seeds gave one length only: {kept_by_seed:?}"
    );

    // A write past the durable end (a hole before it) does not tear.
    OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .write_at(b"far", 200)
        .unwrap();
    let report = m.cut(Some(1));
    assert_eq!(report.tear, None);
    assert_eq!(fs::read(&log).unwrap(), synced);
}

/// The child's part of the SQLite tests: commits one-row transactions into a new WAL database
/// with the given `synchronous`, checkpointing every 50 pages, says so, then waits to be killed.
/// A child process, because SQLite maps its `-shm` file shared and writable, which the test
/// process must not do on the mount (see the module doc of `powercut_fs`).
const SQLITE_CHILD: &str = r#"
import sqlite3, sys
db, synchronous, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
conn = sqlite3.connect(db, isolation_level=None)
assert conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
conn.execute("PRAGMA synchronous=" + synchronous)
conn.execute("PRAGMA wal_autocheckpoint=50")
conn.execute("CREATE TABLE rows (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")
for i in range(1, rows + 1):
    conn.execute("INSERT INTO rows (id, body) VALUES (?, ?)", (i, bytes([i % 256]) * 1000))
print("committed", rows, flush=True)
sys.stdin.read()
"#;

/// Commits `rows` rows in a python3 child (its sqlite3 module), then SIGKILLs it.
fn commit_rows_then_kill(db: &Path, synchronous: &str, rows: u32) {
    let mut child = Command::new("python3")
        .args(["-c", SQLITE_CHILD])
        .arg(db)
        .args([synchronous, &rows.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run python3 ({e}): needs python3 with sqlite3"));
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(
        line.trim(),
        format!("committed {rows}"),
        "the python3 child failed (stderr above)"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// After a cut: `PRAGMA integrity_check`, and the rows' (count, max id).
fn reopen_and_check(db: &Path) -> (String, u32, u32) {
    let conn = Connection::open(db).unwrap();
    // Exclusive locking keeps the WAL index in heap memory: no -shm mapping in this process.
    let mode: String = conn
        .pragma_update_and_check(None, "locking_mode", "EXCLUSIVE", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "exclusive");
    let integrity: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    let (count, max) = conn
        .query_row("SELECT count(*), coalesce(max(id), 0) FROM rows", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap_or_else(|e| panic!("the table is gone after the cut: {e}"));
    (integrity, count, max)
}

#[test]
fn sqlite_wal_with_synchronous_full_keeps_every_commit_through_a_cut() {
    let mut m = Mounted::new();
    let db = m.path("central.db");
    commit_rows_then_kill(&db, "FULL", 300);
    let report = m.cut(Some(7));
    assert_eq!(
        reopen_and_check(&db),
        ("ok".to_owned(), 300, 300),
        "after {report:?}"
    );
}

#[test]
fn sqlite_wal_with_synchronous_normal_stays_consistent_through_a_cut() {
    let mut m = Mounted::new();
    let db = m.path("central.db");
    commit_rows_then_kill(&db, "NORMAL", 300);
    let report = m.cut(Some(7));
    assert!(
        report.bytes_forgotten > 0,
        "NORMAL leaves the WAL's tail unsynced: {report:?}"
    );
    let (integrity, count, max) = reopen_and_check(&db);
    assert_eq!(integrity, "ok");
    assert_eq!(
        count, max,
        "the surviving commits are a prefix of the committed ones"
    );
    assert!(count <= 300);
}

#[test]
fn flock_works_on_the_mount_and_free_space_is_large() {
    let m = Mounted::new();
    let path = m.path("lock");
    let first = File::create(&path).unwrap();
    first.try_lock().expect("the first lock");
    let second = File::open(&path).unwrap();
    assert!(matches!(second.try_lock(), Err(TryLockError::WouldBlock)));
    // Unlock rather than close: a child forked meanwhile by another test holds the open file
    // (and so its flock) until it execs.
    first.unlock().unwrap();
    second
        .try_lock()
        .expect("the lock is free once its holder unlocked");

    let out = Command::new("stat")
        .args(["-f", "-c", "%a %S"])
        .arg(m.fs.mountpoint())
        .output();
    let out = out.expect("stat -f");
    let text = String::from_utf8_lossy(&out.stdout);
    let free: u64 = text
        .split_whitespace()
        .map(|n| n.parse::<u64>().unwrap())
        .product();
    assert!(free >= 1 << 30, "statfs reports {free} bytes free ({text})");
}

#[test]
fn an_unsynced_directory_tree_vanishes_with_its_synced_file() {
    let mut m = Mounted::new();
    let deep = m.path("a/b/c");
    fs::create_dir_all(&deep).unwrap();
    write_file(
        &deep.join("record"),
        b"synced file, unsynced directories",
        true,
    );
    let report = m.cut(None);
    assert!(!m.path("a").exists());
    assert_eq!(fs::read_dir(m.fs.mountpoint()).unwrap().count(), 0);
    assert_eq!(report.inodes_dropped, 4, "a, b, c and the file: {report:?}");
}

#[test]
fn a_busy_mount_refuses_the_cut_and_forgets_nothing() {
    let mut m = Mounted::new();
    let path = m.path("open");
    let mut open = File::create(&path).unwrap();
    open.write_all(b"x").unwrap();
    let err =
        m.fs.power_cut(None)
            .expect_err("an open file keeps the mount busy");
    assert_eq!(err.kind(), ErrorKind::ResourceBusy, "{err}");
    assert!(
        err.to_string()
            .contains(&m.fs.mountpoint().display().to_string()),
        "{err}"
    );
    assert_eq!(
        fs::read(&path).unwrap(),
        b"x",
        "still mounted, nothing forgotten"
    );

    drop(open);
    m.cut(None);
    assert!(!path.exists());
}
