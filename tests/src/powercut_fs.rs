//! A FUSE file system, held in memory by the test process, that forgets on a simulated power cut
//! whatever was not fsync'd. A SIGKILL leaves the kernel's page cache alone, so every `write()`
//! survives it and fsync is never put to the test; [`ForgetfulFs::power_cut`] is the power
//! failure (after LazyFS, "When Amnesia Strikes", VLDB 2024). Built on `fuser` (pure-Rust mount).
//!
//! # Model: strict POSIX durability
//!
//! - Every inode has a *current* state (what the mount shows) and a *durable* state (what the disk
//!   holds after a cut). Only regular files and directories exist: symlinks, hard links and
//!   special files are refused (EPERM).
//! - A file's durable content becomes its current content on `fsync` or `fdatasync` of that file
//!   (FUSE `FSYNC`; an `O_SYNC` write sends one too). A new file's durable content is empty.
//! - A directory's durable entries become its current entries on `fsync` of that directory (FUSE
//!   `FSYNCDIR`), and only that directory's. A file written and fsync'd whose directory was not
//!   fsync'd is gone after a cut; a rename or an unlink is undone unless the directories it
//!   touched were fsync'd after it.
//! - A cut unmounts, sets every file's content to its durable content and every directory's
//!   entries to its durable entries, drops the inodes no durable entry reaches from the root (a
//!   directory reached twice keeps its first name only), and mounts again. With a seed it also
//!   tears the most recent unsynced write ([`ForgetfulFs::power_cut`]).
//!
//! # Why a real remount
//!
//! The kernel caches names, attributes and pages of a FUSE mount; after a revert it would go on
//! showing what was forgotten. Unmounting and mounting again starts the kernel afresh, as a
//! reboot does. The mount uses neither the writeback cache (so each `write()` reaches this file
//! system at once, and "written but not synced" is ours to forget) nor `direct_io` (SQLite maps
//! its `-shm` file shared and writable, which `direct_io` refuses); pages written through a
//! mapping arrive as plain writes.
//!
//! # Not simulated
//!
//! - A disk that lies about flushes: here a completed fsync is durable for good.
//! - Reordering or loss inside a synced file, or of any unsynced write but the last (the tear).
//! - Metadata durability: mode, owner and times are durable at once (a simplification); sizes
//!   follow the content. No extended attributes (ENOSYS), no `syncfs`.
//! - Locks: `flock`/`fcntl` locks are deliberately not implemented here, so the kernel keeps them
//!   locally and `File::try_lock` works as on a local disk.
//!
//! # Caution: no shared writable mappings from the test process
//!
//! The server is a thread of the test process. `munmap` of a dirty shared mapping of a file on
//! the mount waits for the server to take the pages while holding the process's memory-map lock,
//! which the server's allocator may need to grow its heap: a deadlock (seen with SQLite's `-shm`).
//! Let child processes map files (the agent, a `python3` with sqlite3); in the test process, open
//! SQLite with `PRAGMA locking_mode=EXCLUSIVE`, which keeps the WAL index in heap memory.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};
use std::{fs, io};

use fuser::{
    AccessFlags, BackgroundSession, BsdFileFlags, Config, Errno, FileAttr, FileHandle, FileType,
    Filesystem, FopenFlags, Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

/// The mount's source in /proc/self/mountinfo.
const FS_NAME: &str = "estafeta-powercut";
/// Free space statfs reports, in bytes (64 GiB), so the agent's free-disk check passes.
const REPORTED_FREE_BYTES: u64 = 64 << 30;
/// Block size statfs and stat report, in bytes.
const BLOCK_SIZE: u32 = 4096;
/// How long the kernel may cache names and attributes: every change goes through the kernel,
/// and a cut remounts, so a short cache is safe.
const TTL: Duration = Duration::from_secs(1);
const ROOT: u64 = 1;

/// What a [`ForgetfulFs::power_cut`] forgot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Surviving files whose content went back to what was last fsync'd.
    pub files_reverted: usize,
    /// Bytes of file content the cut lost: past the durable length or different from it, plus
    /// the whole content of dropped files. Bytes a tear kept are not counted.
    pub bytes_forgotten: u64,
    /// Directory entries the revert took away or brought back (created, removed or renamed
    /// since their directory's last fsync; a name now naming another inode counts twice), plus
    /// second names of a directory reached twice.
    pub entries_forgotten: usize,
    /// Inodes no durable entry reaches from the root any more, dropped.
    pub inodes_dropped: usize,
    /// The torn write, when a seed was given and the most recent unsynced write could tear.
    pub tear: Option<Tear>,
}

/// A write the cut left half done: the first `kept` of its `len` bytes reached the disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tear {
    /// The file, relative to the mountpoint.
    pub path: PathBuf,
    /// Where the write started in the file.
    pub offset: u64,
    /// The write's length.
    pub len: u64,
    /// The bytes kept, `0 ≤ kept < len`: a strict prefix (a whole write is no tear).
    pub kept: u64,
}

/// The mounted forgetful file system. Dropping it unmounts (lazily if busy), never panics.
pub struct ForgetfulFs {
    mountpoint: PathBuf,
    tree: Arc<Mutex<Tree>>,
    session: Option<BackgroundSession>,
}

impl ForgetfulFs {
    /// Mounts an empty file system (root directory 0755, owned as `mountpoint` is) on the
    /// existing directory `mountpoint`. Fails saying what is missing (the device /dev/fuse,
    /// fusermount3 from Debian's fuse3, root) and how to install it.
    pub fn mount(mountpoint: &Path) -> io::Result<ForgetfulFs> {
        let meta = fs::metadata(mountpoint).map_err(|e| {
            let mountpoint = mountpoint.display();
            io::Error::new(e.kind(), format!("power-cut mountpoint {mountpoint}: {e}"))
        })?;
        let mountpoint = mountpoint.canonicalize()?;
        let tree = Arc::new(Mutex::new(Tree::new(meta.uid(), meta.gid())));
        let session = Some(spawn(&mountpoint, &tree)?);
        Ok(ForgetfulFs {
            mountpoint,
            tree,
            session,
        })
    }

    /// The directory the file system is mounted on (canonical).
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Makes every fsync (of a file or a folder) answer `delay` after its data became durable,
    /// as a workstation's disk does (5–20 ms for a spinning disk). A process killed meanwhile
    /// dies with its data on disk and its answer never given: the window in which a client's
    /// request is staged but unanswered, which a retrying client then sends again. The file
    /// system serves one request at a time, so the delay also slows everything else, as a busy
    /// disk would.
    pub fn set_sync_delay(&self, delay: Duration) {
        lock(&self.tree).sync_delay = delay;
    }

    /// Cuts the power: unmounts (every process using the mount must be gone: a busy mount is an
    /// error of kind `ResourceBusy` naming it, and the mount stays as it was), forgets what was
    /// not fsync'd (module doc), and mounts again on the same directory.
    ///
    /// With `tear: Some(seed)` the most recent write not yet fsync'd, across all files, is torn:
    /// a prefix of it, `0 ≤ kept < len` bytes chosen from the seed, lands on top of the durable
    /// content, as a disk half-way through writing it would leave. Only when that write starts
    /// inside the durable content or right at its end (an append); a write past the durable end
    /// (which would leave a hole), or to a file the cut drops, tears nothing. The kernel sends one
    /// `write()` as several page-sized writes, so unsynced writes of a file that each start where
    /// the previous one ended count as one write.
    pub fn power_cut(&mut self, tear: Option<u64>) -> io::Result<CutReport> {
        self.detach()?;
        let report = lock(&self.tree).power_cut(tear);
        self.session = Some(spawn(&self.mountpoint, &self.tree)?);
        Ok(report)
    }

    /// Bytes written since the last fsync of their file, over all files (diagnostics).
    pub fn unsynced_bytes(&self) -> u64 {
        let tree = lock(&self.tree);
        tree.inodes
            .values()
            .filter_map(|i| i.as_file())
            .map(|f| f.unsynced)
            .sum()
    }

    /// Unmounts. A busy mount is an error, and then detached lazily as drop does.
    pub fn unmount(mut self) -> io::Result<()> {
        self.detach()
    }

    /// Unmounts and waits for the session's thread, then checks that no FUSE mount is left.
    fn detach(&mut self) -> io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        if let Err(e) = run_unmount(&self.mountpoint, false) {
            self.session = Some(session);
            return Err(e);
        }
        // The kernel ends the session's thread with ENODEV (unmounted) or, when it aborts the
        // connection first, ECONNABORTED: either way the session is over, as asked (the check
        // below still refuses a mount that stayed).
        match session.join() {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
            Err(e) => return Err(e),
        }
        if fuse_mounted_at(&self.mountpoint)? {
            let mountpoint = self.mountpoint.display();
            return Err(io::Error::other(format!(
                "{mountpoint} is still a FUSE mount"
            )));
        }
        Ok(())
    }
}

impl Drop for ForgetfulFs {
    fn drop(&mut self) {
        if self.session.is_some() && self.detach().is_err() {
            // Busy: detach it from the tree now; the kernel ends it when its last user goes, and
            // the session's thread (dropped, not joined) serves that user until then.
            let _ = run_unmount(&self.mountpoint, true);
            self.session = None;
        }
    }
}

fn lock(tree: &Mutex<Tree>) -> MutexGuard<'_, Tree> {
    tree.lock().unwrap_or_else(PoisonError::into_inner)
}

fn spawn(mountpoint: &Path, tree: &Arc<Mutex<Tree>>) -> io::Result<BackgroundSession> {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(FS_NAME.into()),
        MountOption::DefaultPermissions,
        MountOption::RW,
    ];
    let server = Server {
        tree: Arc::clone(tree),
    };
    fuser::spawn_mount(server, mountpoint, &config).map_err(|e| mount_error(mountpoint, e))
}

/// The mount's error, with what is missing on this machine and how to install it.
fn mount_error(mountpoint: &Path, err: io::Error) -> io::Error {
    let mut missing = Vec::new();
    if !Path::new("/dev/fuse").exists() {
        missing
            .push("the device /dev/fuse (`modprobe fuse`; a container needs --device /dev/fuse)");
    }
    let on_path = |cmd: &str| {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path).any(|dir| dir.join(cmd).is_file())
    };
    if !on_path("fusermount3") {
        missing.push("fusermount3 (Debian package fuse3: run scripts/install-deps)");
    }
    // /proc/self belongs to the effective user.
    if fs::metadata("/proc/self").map_or(0, |m| m.uid()) != 0 {
        missing.push("root (others need read and write on /dev/fuse and the setuid fusermount3)");
    }
    let missing = if missing.is_empty() {
        "/dev/fuse, fusermount3 and root are all here".to_owned()
    } else {
        format!("missing {}", missing.join("; "))
    };
    let mountpoint = mountpoint.display();
    let message =
        format!("cannot mount the power-cut FUSE file system on {mountpoint}: {err}; {missing}");
    io::Error::new(err.kind(), message)
}

/// [`unmount_once`], retried for about a second while the mount is busy: a process forked by
/// another thread (another test, say) holds copies of this process's open files until it execs.
fn run_unmount(mountpoint: &Path, lazy: bool) -> io::Result<()> {
    let mut pause = Duration::from_millis(10);
    loop {
        match unmount_once(mountpoint, lazy) {
            Err(e) if e.kind() == io::ErrorKind::ResourceBusy && pause < Duration::from_secs(1) => {
                std::thread::sleep(pause);
                pause *= 2;
            }
            other => return other,
        }
    }
}

/// `fusermount3 -u` (`-z`: lazily), or util-linux's `umount` where fusermount3 is missing.
fn unmount_once(mountpoint: &Path, lazy: bool) -> io::Result<()> {
    let run = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .arg("--")
            .arg(mountpoint)
            .output()
    };
    let out = match run("fusermount3", if lazy { &["-u", "-z"] } else { &["-u"] }) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            run("umount", if lazy { &["-l"] } else { &[] })?
        }
        other => other?,
    };
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mountpoint = mountpoint.display();
    let message = format!(
        "cannot unmount the power-cut file system on {mountpoint}: {}",
        stderr.trim()
    );
    if !stderr.contains("busy") {
        return Err(io::Error::other(message));
    }
    Err(io::Error::new(
        io::ErrorKind::ResourceBusy,
        format!(
            "{message}; it is busy: a process still has a file, a mapping or its working \
             directory in it. End every process using it, and drop the test's own files and \
             SQLite connections, before power_cut"
        ),
    ))
}

/// Whether /proc/self/mountinfo lists a FUSE mount on `path`.
fn fuse_mounted_at(path: &Path) -> io::Result<bool> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    let unescape = |s: &str| {
        s.replace("\\040", " ")
            .replace("\\011", "\t")
            .replace("\\134", "\\")
    };
    Ok(info.lines().any(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let fstype = fields.iter().skip_while(|f| **f != "-").nth(1);
        fields
            .get(4)
            .is_some_and(|m| Path::new(&unescape(m)) == path)
            && fstype.is_some_and(|t| t.starts_with("fuse"))
    }))
}

/// The whole file system: inodes by number, never reused (the kernel may still name old ones).
#[derive(Debug)]
struct Tree {
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
    /// Counts writes, so a cut can find the most recent one.
    write_seq: u64,
    /// How long an fsync takes after its data is durable ([`ForgetfulFs::set_sync_delay`]).
    sync_delay: Duration,
}

#[derive(Debug)]
struct Inode {
    body: Body,
    perm: u16,
    uid: u32,
    gid: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
    /// Names in current directory entries.
    links: u32,
    /// Names in durable directory entries: an unlinked inode a cut would bring back stays.
    durable_links: u32,
    /// Open file handles: an unlinked open file stays readable.
    open: u32,
}

#[derive(Debug)]
enum Body {
    File(FileBody),
    Dir(DirBody),
}

#[derive(Debug, Default)]
struct FileBody {
    current: Vec<u8>,
    durable: Vec<u8>,
    /// Bytes written since the last fsync.
    unsynced: u64,
    /// The last write since the last fsync, with those it continues, kept for a tear:
    /// (sequence, offset, bytes).
    last_write: Option<(u64, u64, Vec<u8>)>,
}

/// A directory's entries: name → inode.
type Entries = BTreeMap<OsString, u64>;

#[derive(Debug, Default)]
struct DirBody {
    current: Entries,
    durable: Entries,
    parent: u64,
}

impl Inode {
    fn new(body: Body, perm: u16, uid: u32, gid: u32) -> Inode {
        let now = SystemTime::now();
        let (atime, mtime, ctime) = (now, now, now);
        Inode {
            body,
            perm,
            uid,
            gid,
            atime,
            mtime,
            ctime,
            links: 1,
            durable_links: 0,
            open: 0,
        }
    }

    fn as_file(&self) -> Option<&FileBody> {
        match &self.body {
            Body::File(f) => Some(f),
            Body::Dir(_) => None,
        }
    }

    fn as_dir(&self) -> Option<&DirBody> {
        match &self.body {
            Body::Dir(d) => Some(d),
            Body::File(_) => None,
        }
    }

    fn kind(&self) -> FileType {
        match self.body {
            Body::File(_) => FileType::RegularFile,
            Body::Dir(_) => FileType::Directory,
        }
    }
}

impl Tree {
    fn new(uid: u32, gid: u32) -> Tree {
        let root = Body::Dir(DirBody {
            parent: ROOT,
            ..DirBody::default()
        });
        let inodes = HashMap::from([(ROOT, Inode::new(root, 0o755, uid, gid))]);
        Tree {
            inodes,
            next_ino: ROOT + 1,
            write_seq: 0,
            sync_delay: Duration::ZERO,
        }
    }

    fn get(&mut self, ino: u64) -> Result<&mut Inode, Errno> {
        self.inodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    fn file(&mut self, ino: u64) -> Result<&mut FileBody, Errno> {
        match &mut self.get(ino)?.body {
            Body::File(f) => Ok(f),
            Body::Dir(_) => Err(Errno::EISDIR),
        }
    }

    fn dir(&mut self, ino: u64) -> Result<&mut DirBody, Errno> {
        match &mut self.get(ino)?.body {
            Body::Dir(d) => Ok(d),
            Body::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn is_dir(&self, ino: u64) -> bool {
        self.inodes.get(&ino).is_some_and(|i| i.as_dir().is_some())
    }

    fn attr(&self, ino: u64) -> Result<FileAttr, Errno> {
        let node = self.inodes.get(&ino).ok_or(Errno::ENOENT)?;
        let (size, nlink) = match &node.body {
            Body::File(f) => (f.current.len() as u64, node.links),
            // "." and "..", plus each subdirectory's "..": `find` relies on the count.
            Body::Dir(d) => {
                let subdirs = d.current.values().filter(|c| self.is_dir(**c)).count() as u32;
                (
                    BLOCK_SIZE.into(),
                    if node.links == 0 { 0 } else { 2 + subdirs },
                )
            }
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: node.atime,
            mtime: node.mtime,
            ctime: node.ctime,
            crtime: node.ctime,
            kind: node.kind(),
            perm: node.perm,
            nlink,
            uid: node.uid,
            gid: node.gid,
            rdev: 0,
            blksize: BLOCK_SIZE,
            flags: 0,
        })
    }

    fn lookup(&mut self, parent: u64, name: &OsStr) -> Result<FileAttr, Errno> {
        let ino = *self.dir(parent)?.current.get(name).ok_or(Errno::ENOENT)?;
        self.attr(ino)
    }

    /// Creates `body` as `name` in `parent`, in its current entries only.
    fn create(
        &mut self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        body: Body,
        mode: u32,
    ) -> Result<FileAttr, Errno> {
        let ino = self.next_ino;
        let dir = self.dir(parent)?;
        if dir.current.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        dir.current.insert(name.to_owned(), ino);
        self.next_ino += 1;
        let perm = (mode & 0o7777) as u16;
        self.inodes
            .insert(ino, Inode::new(body, perm, req.uid(), req.gid()));
        self.touch(parent, true)?;
        self.attr(ino)
    }

    /// Sets ctime (and mtime when the content changed) to now.
    fn touch(&mut self, ino: u64, content: bool) -> Result<(), Errno> {
        let node = self.get(ino)?;
        node.ctime = SystemTime::now();
        if content {
            node.mtime = node.ctime;
        }
        Ok(())
    }

    /// Errs when `target` may not be replaced (or removed) by a node that is a directory or not.
    fn check_replace(&self, target: u64, by_dir: bool) -> Result<(), Errno> {
        match (self.inodes.get(&target).map(|i| &i.body), by_dir) {
            (Some(Body::Dir(d)), true) if !d.current.is_empty() => Err(Errno::ENOTEMPTY),
            (Some(Body::Dir(_)), false) => Err(Errno::EISDIR),
            (Some(Body::File(_)), true) => Err(Errno::ENOTDIR),
            _ => Ok(()),
        }
    }

    /// unlink (`dir` false) or rmdir (`dir` true): drops the current name.
    fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let ino = *self.dir(parent)?.current.get(name).ok_or(Errno::ENOENT)?;
        self.check_replace(ino, dir)?;
        self.dir(parent)?.current.remove(name);
        self.unlinked(ino)?;
        self.touch(parent, true)
    }

    /// One current name fewer for `ino`.
    fn unlinked(&mut self, ino: u64) -> Result<(), Errno> {
        let node = self.get(ino)?;
        node.links = node.links.saturating_sub(1);
        node.ctime = SystemTime::now();
        self.maybe_free(ino);
        Ok(())
    }

    /// Frees an inode nothing names, now or after a cut, and nobody has open.
    fn maybe_free(&mut self, ino: u64) {
        let Some(node) = self.inodes.get(&ino) else {
            return;
        };
        if ino == ROOT || node.links > 0 || node.durable_links > 0 || node.open > 0 {
            return;
        }
        if let Some(Inode {
            body: Body::Dir(d), ..
        }) = self.inodes.remove(&ino)
        {
            for child in d.durable.into_values() {
                if let Some(c) = self.inodes.get_mut(&child) {
                    c.durable_links = c.durable_links.saturating_sub(1);
                    self.maybe_free(child);
                }
            }
        }
    }

    fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            // EINVAL, not ENOSYS: ENOSYS would make the kernel refuse every flag from then on.
            return Err(Errno::EINVAL);
        }
        let ino = *self.dir(parent)?.current.get(name).ok_or(Errno::ENOENT)?;
        if let Some(&target) = self.dir(newparent)?.current.get(newname) {
            if target == ino {
                return Ok(());
            }
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(Errno::EEXIST);
            }
            self.check_replace(target, self.is_dir(ino))?;
            self.dir(newparent)?.current.remove(newname);
            self.unlinked(target)?;
        }
        self.dir(parent)?.current.remove(name);
        self.dir(newparent)?.current.insert(newname.to_owned(), ino);
        if let Body::Dir(d) = &mut self.get(ino)?.body {
            d.parent = newparent;
        }
        self.touch(ino, false)?;
        self.touch(parent, true)?;
        self.touch(newparent, true)
    }

    fn write(&mut self, ino: u64, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        let start = usize::try_from(offset).map_err(|_| Errno::EFBIG)?;
        let end = start.checked_add(data.len()).ok_or(Errno::EFBIG)?;
        self.write_seq += 1;
        let seq = self.write_seq;
        let f = self.file(ino)?;
        if f.current.len() < end {
            f.current.resize(end, 0); // a write past the end zero-fills the hole
        }
        f.current[start..end].copy_from_slice(data);
        f.unsynced += data.len() as u64;
        // The kernel cuts one write() at page boundaries: a write continuing the last one joins it.
        match &mut f.last_write {
            Some((last_seq, at, bytes)) if *at + bytes.len() as u64 == offset => {
                bytes.extend_from_slice(data);
                *last_seq = seq;
            }
            last => *last = Some((seq, offset, data.to_vec())),
        }
        self.touch(ino, true)?;
        u32::try_from(data.len()).map_err(|_| Errno::EFBIG)
    }

    fn fsync(&mut self, ino: u64) -> Result<(), Errno> {
        let f = self.file(ino)?;
        f.durable.clone_from(&f.current);
        f.unsynced = 0;
        f.last_write = None;
        Ok(())
    }

    /// Makes the directory's current entries durable, counting durable names per inode.
    fn fsyncdir(&mut self, ino: u64) -> Result<(), Errno> {
        let d = self.dir(ino)?;
        let gone: Vec<u64> = changed(&d.durable, &d.current).collect();
        let new: Vec<u64> = changed(&d.current, &d.durable).collect();
        d.durable.clone_from(&d.current);
        for i in new {
            self.get(i)?.durable_links += 1;
        }
        for i in gone {
            if let Some(node) = self.inodes.get_mut(&i) {
                node.durable_links = node.durable_links.saturating_sub(1);
                self.maybe_free(i);
            }
        }
        Ok(())
    }

    /// Forgets what was not synced (see [`ForgetfulFs::power_cut`]).
    fn power_cut(&mut self, tear: Option<u64>) -> CutReport {
        let mut report = CutReport::default();
        let torn = tear.and_then(|seed| self.tear_last_write(seed));
        for node in self.inodes.values_mut() {
            (node.links, node.open) = (0, 0);
            if let Body::Dir(d) = &mut node.body {
                report.entries_forgotten += changed(&d.current, &d.durable).count();
                report.entries_forgotten += changed(&d.durable, &d.current).count();
                d.current.clone_from(&d.durable);
            }
        }
        let reached = self.relink_from_root(&mut report);
        let before = self.inodes.len();
        self.inodes.retain(|ino, node| {
            let Body::File(f) = &mut node.body else {
                return reached.contains(ino);
            };
            if !reached.contains(ino) {
                report.bytes_forgotten += f.current.len() as u64;
                return false;
            }
            if f.current != f.durable {
                report.files_reverted += 1;
                report.bytes_forgotten += forgotten_bytes(&f.current, &f.durable);
                f.current.clone_from(&f.durable);
            }
            (f.unsynced, f.last_write) = (0, None);
            true
        });
        report.inodes_dropped = before - self.inodes.len();
        report.tear = torn.and_then(|(ino, offset, len, kept)| {
            Some(Tear {
                path: self.path_of(ino)?,
                offset,
                len,
                kept,
            })
        });
        report
    }

    /// Lays a seeded prefix of the most recent unsynced write on its file's durable content;
    /// returns (inode, offset, length, kept).
    fn tear_last_write(&mut self, seed: u64) -> Option<(u64, u64, u64, u64)> {
        let last = self.inodes.iter().filter_map(|(ino, node)| {
            let seq = node.as_file()?.last_write.as_ref()?.0;
            Some((seq, *ino))
        });
        let ino = last.max()?.1;
        let Ok(f) = self.file(ino) else { return None };
        let (_, offset, data) = f.last_write.take()?;
        let start = usize::try_from(offset).ok()?;
        if start > f.durable.len() || data.is_empty() {
            return None; // a hole before it, or nothing to tear
        }
        let kept = (splitmix64(seed) % data.len() as u64) as usize;
        if f.durable.len() < start + kept {
            f.durable.resize(start + kept, 0);
        }
        f.durable[start..start + kept].copy_from_slice(&data[..kept]);
        Some((ino, offset, data.len() as u64, kept as u64))
    }

    /// Walks the (reverted) entries from the root: counts links again, sets each directory's
    /// parent, drops a directory's second name; returns the inodes reached.
    fn relink_from_root(&mut self, report: &mut CutReport) -> HashSet<u64> {
        let mut reached = HashSet::from([ROOT]);
        let mut queue = vec![ROOT];
        while let Some(dir) = queue.pop() {
            let entries = self
                .inodes
                .get(&dir)
                .and_then(Inode::as_dir)
                .map(|d| d.current.clone());
            for (name, child) in entries.unwrap_or_default() {
                let is_dir = self.is_dir(child);
                if !self.inodes.contains_key(&child) || (is_dir && reached.contains(&child)) {
                    let d = self.dir(dir).expect("walking a directory");
                    d.current.remove(&name);
                    d.durable.remove(&name);
                    report.entries_forgotten += 1;
                    continue;
                }
                let node = self.get(child).expect("checked above");
                node.links += 1;
                node.durable_links = node.links;
                if let Body::Dir(d) = &mut node.body {
                    d.parent = dir;
                }
                if reached.insert(child) && is_dir {
                    queue.push(child);
                }
            }
        }
        reached
    }

    /// A path of `ino` relative to the root.
    fn path_of(&self, ino: u64) -> Option<PathBuf> {
        let mut stack = vec![(ROOT, PathBuf::new())];
        while let Some((dir, path)) = stack.pop() {
            let Some(d) = self.inodes.get(&dir).and_then(Inode::as_dir) else {
                continue;
            };
            for (name, child) in &d.current {
                if *child == ino {
                    return Some(path.join(name));
                }
                stack.push((*child, path.join(name)));
            }
        }
        None
    }
}

/// The inodes of the entries of `a` that `b` lacks or points elsewhere.
fn changed<'a>(a: &'a Entries, b: &'a Entries) -> impl Iterator<Item = u64> + 'a {
    a.iter()
        .filter(|(name, ino)| b.get(*name) != Some(ino))
        .map(|(_, ino)| *ino)
}

/// Bytes of `current` a revert to `durable` loses: past its end or different.
fn forgotten_bytes(current: &[u8], durable: &[u8]) -> u64 {
    let differing = current.iter().zip(durable).filter(|(a, b)| a != b).count();
    (differing + current.len().saturating_sub(durable.len())) as u64
}

/// SplitMix64: a seed spread over 64 bits, so nearby seeds tear at unrelated lengths.
fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The FUSE side: each request locks the tree, applies itself and answers.
struct Server {
    tree: Arc<Mutex<Tree>>,
}

impl Server {
    fn tree(&self) -> MutexGuard<'_, Tree> {
        lock(&self.tree)
    }
}

fn reply_empty(reply: ReplyEmpty, result: Result<(), Errno>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn reply_entry(reply: ReplyEntry, result: Result<FileAttr, Errno>) {
    match result {
        Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn reply_attr(reply: ReplyAttr, result: Result<FileAttr, Errno>) {
    match result {
        Ok(attr) => reply.attr(&TTL, &attr),
        Err(e) => reply.error(e),
    }
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

/// Only what the agent and SQLite use. Left to fuser's defaults: opendir and releasedir (no
/// state), symlink and link (EPERM), xattrs, fallocate, lseek and copy_file_range (ENOSYS: the
/// kernel or libc fall back), and locks (module doc). The kernel applied the umask to `mode`
/// already (no FUSE_DONT_MASK), so `umask` is ignored.
impl Filesystem for Server {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply_entry(reply, self.tree().lookup(parent.0, name));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply_attr(reply, self.tree().attr(ino.0));
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut tree = self.tree();
        let mut apply = || {
            if let Some(size) = size {
                let len = usize::try_from(size).map_err(|_| Errno::EFBIG)?;
                tree.file(ino.0)?.current.resize(len, 0); // durable at the next fsync only
                tree.touch(ino.0, true)?;
            }
            let node = tree.get(ino.0)?;
            node.perm = mode.map_or(node.perm, |m| (m & 0o7777) as u16);
            node.uid = uid.unwrap_or(node.uid);
            node.gid = gid.unwrap_or(node.gid);
            node.atime = atime.map_or(node.atime, time);
            node.mtime = mtime.map_or(node.mtime, time);
            node.ctime = ctime.unwrap_or_else(SystemTime::now);
            tree.attr(ino.0)
        };
        reply_attr(reply, apply());
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            return reply.error(Errno::EPERM); // no fifos, sockets or devices
        }
        let body = Body::File(FileBody::default());
        reply_entry(reply, self.tree().create(req, parent.0, name, body, mode));
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let body = Body::Dir(DirBody {
            parent: parent.0,
            ..DirBody::default()
        });
        reply_entry(reply, self.tree().create(req, parent.0, name, body, mode));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.tree().remove(parent.0, name, false));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.tree().remove(parent.0, name, true));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut tree = self.tree();
        reply_empty(
            reply,
            tree.rename(parent.0, name, newparent.0, newname, flags),
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.tree().get(ino.0) {
            Ok(node) => {
                node.open += 1;
                reply.opened(FileHandle(0), FopenFlags::empty());
            }
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut tree = self.tree();
        let body = Body::File(FileBody::default());
        match tree.create(req, parent.0, name, body, mode) {
            Ok(attr) => {
                tree.get(attr.ino.0).expect("just created").open += 1;
                reply.created(
                    &TTL,
                    &attr,
                    Generation(0),
                    FileHandle(0),
                    FopenFlags::empty(),
                );
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.tree().file(ino.0) {
            Ok(f) => {
                let start = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(f.current.len());
                let end = start.saturating_add(size as usize).min(f.current.len());
                reply.data(&f.current[start..end]);
            }
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.tree().write(ino.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok(); // close() makes nothing durable
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let mut tree = self.tree();
        if let Ok(node) = tree.get(ino.0) {
            node.open = node.open.saturating_sub(1);
            tree.maybe_free(ino.0);
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let (result, delay) = {
            let mut tree = self.tree();
            (tree.fsync(ino.0), tree.sync_delay)
        };
        std::thread::sleep(delay);
        reply_empty(reply, result);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut tree = self.tree();
        let d = match tree.dir(ino.0) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        let mut entries = vec![
            (ino.0, OsString::from(".")),
            (d.parent, OsString::from("..")),
        ];
        entries.extend(d.current.iter().map(|(name, child)| (*child, name.clone())));
        for (i, (child, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            let kind = tree
                .inodes
                .get(&child)
                .map_or(FileType::RegularFile, Inode::kind);
            // The offset is the next entry's; a full buffer ends this answer.
            if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let (result, delay) = {
            let mut tree = self.tree();
            (tree.fsyncdir(ino.0), tree.sync_delay)
        };
        std::thread::sleep(delay);
        reply_empty(reply, result);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (free, files) = (REPORTED_FREE_BYTES / u64::from(BLOCK_SIZE), 1 << 20);
        let used = self.tree().inodes.len() as u64;
        reply.statfs(
            2 * free,
            free,
            free,
            files + used,
            files,
            BLOCK_SIZE,
            255,
            BLOCK_SIZE,
        );
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Only existence: with default_permissions the kernel checks the mode bits (and does
        // not even ask).
        reply_empty(reply, self.tree().get(ino.0).map(|_| ()));
    }
}
