//! Where a release is downloaded, verified and unpacked, and who the staging folder belongs to.
//!
//! - **The agent** (the service user, or whoever runs a plain install): in
//!   `<staging>/_update/download-*`, a folder of its own; nobody else may write the staging folder.
//! - **root** (`sudo estafeta update`, a .deb install): never under the staging folder. That
//!   folder belongs to the service user, who could rename, replace or link anything in it between
//!   root's signature check and `dpkg -i` (or make root create and hand over files elsewhere
//!   through a planted link). root works in a fresh `estafeta-update-*` folder it creates, mode
//!   0700, in `TMPDIR` when set, else in [`ROOT_WORK_PARENT`] (made by root, mode 0755). That
//!   parent is checked first: every folder of its real path must be root's and writable by no one
//!   else, unless sticky (`/tmp`): in a sticky folder others cannot rename or delete root's
//!   entries, and the new folder's name is random and made with `mkdir`, which never follows a
//!   planted link. So every path below it names what root put there.
//!
//! The .deb's trial runs as the service user, who cannot enter a 0700 folder: its copy of the
//! executable goes to a second fresh folder in the same parent, root's and mode 0755 (readable,
//! not writable, by the service user). That is why the default parent is not `/tmp`: hardened
//! machines mount it `noexec` (the CIS benchmarks ask for it), and the trial could not start;
//! `/var/lib` holds dpkg's own maintainer scripts, which it runs.

use std::path::Path;
#[cfg(unix)]
use std::path::PathBuf;

use anyhow::{Context as _, bail};

/// The prefix of root's working folders.
pub const ROOT_PREFIX: &str = "estafeta-update-";
/// Where root's working folders go when `TMPDIR` is not set (`sudo` does not pass it on).
pub const ROOT_WORK_PARENT: &str = "/var/lib/estafeta-update";

/// Whether this process runs as root (effective uid 0). Never on Windows, where an elevated
/// prompt writes a folder only SYSTEM and Administrators may write.
pub fn is_root() -> bool {
    #[cfg(unix)]
    {
        rustix::process::geteuid().is_root()
    }
    #[cfg(not(unix))]
    {
        false
    }
}

/// A fresh folder for one download (removed when dropped): root's private folder when root, else
/// `<staging>/_update/download-*`.
pub fn download_dir(staging: &Path, tmpdir: Option<&Path>) -> anyhow::Result<tempfile::TempDir> {
    if is_root() {
        return private_dir(0o700, tmpdir);
    }
    let parent = staging.join("_update");
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("could not create {}", parent.display()))?;
    tempfile::Builder::new()
        .prefix("download-")
        .tempdir_in(&parent)
        .with_context(|| format!("could not create a folder in {}", parent.display()))
}

/// A fresh root-owned folder, mode 0755, for the copy of the executable a .deb's trial runs as
/// the service user.
pub fn trial_dir(tmpdir: Option<&Path>) -> anyhow::Result<tempfile::TempDir> {
    private_dir(0o755, tmpdir)
}

#[cfg(unix)]
fn private_dir(mode: u32, tmpdir: Option<&Path>) -> anyhow::Result<tempfile::TempDir> {
    let parent = root_parent(
        tmpdir.map(|d| d.as_os_str().to_owned()),
        Path::new(ROOT_WORK_PARENT),
    )?;
    private_dir_in(&parent, mode)
}

/// A fresh folder of root's in `parent` (already checked), mode 0700, then `mode`.
#[cfg(unix)]
fn private_dir_in(parent: &Path, mode: u32) -> anyhow::Result<tempfile::TempDir> {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let dir = tempfile::Builder::new()
        .prefix(ROOT_PREFIX)
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(parent)
        .with_context(|| format!("could not create a folder in {}", parent.display()))?;
    // The umask could only have narrowed 0700; widen to 0755 only once the folder is known ours.
    let meta = std::fs::symlink_metadata(dir.path())?;
    if !meta.is_dir() || meta.uid() != 0 || meta.mode() & 0o077 != 0 {
        bail!(
            "{} is not a private folder of root's right after its creation; nothing was downloaded",
            dir.path().display()
        );
    }
    if mode != 0o700 {
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode))?;
    }
    Ok(dir)
}

#[cfg(not(unix))]
fn private_dir(_mode: u32, _tmpdir: Option<&Path>) -> anyhow::Result<tempfile::TempDir> {
    bail!("only root works in a private folder")
}

/// The folder root's working folders go in: `tmpdir` as it is, or `default`, created (mode
/// 0755: the .deb's trial must get through it) when missing; either checked by [`safe_parent`].
#[cfg(unix)]
fn root_parent(tmpdir: Option<std::ffi::OsString>, default: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    if let Some(dir) = tmpdir {
        return safe_parent(Path::new(&dir));
    }
    match std::fs::DirBuilder::new().mode(0o755).create(default) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(err) => {
            return Err(
                anyhow::Error::new(err).context(format!("could not create {}", default.display()))
            );
        }
    }
    let real = safe_parent(default)?;
    // Whatever the umask was: the service user must get through to a .deb trial's copy.
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o755))?;
    Ok(real)
}

/// `dir`'s real path, once every folder on it is root's and writable by no one else (or sticky,
/// like `/tmp`): then nobody but root can move anything root creates in it.
#[cfg(unix)]
pub fn safe_parent(dir: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    let real = std::fs::canonicalize(dir)
        .with_context(|| format!("root's working folder {} cannot be read", dir.display()))?;
    for folder in real.ancestors() {
        let meta = std::fs::symlink_metadata(folder)
            .with_context(|| format!("could not read {}", folder.display()))?;
        let writable_by_others = meta.mode() & 0o022 != 0;
        let sticky = meta.mode() & 0o1000 != 0;
        if !meta.is_dir() || meta.uid() != 0 || (writable_by_others && !sticky) {
            bail!(
                "root's working folder {} is not safe for an update: {} {}; unset TMPDIR (to use {ROOT_WORK_PARENT}) or point it at a folder only root may write",
                dir.display(),
                folder.display(),
                if meta.uid() != 0 {
                    format!("belongs to uid {}", meta.uid())
                } else {
                    format!("may be written by others (mode {:o})", meta.mode() & 0o7777)
                }
            );
        }
    }
    Ok(real)
}

/// The staging folder's owner (uid, gid). As root, the folder itself, not a link: its name sits
/// in a folder the service user may write (`/var/lib/estafeta`), so a link there could make root
/// act for another owner, or as root in someone else's folder.
#[cfg(unix)]
pub fn staging_owner(staging: &Path) -> anyhow::Result<(u32, u32)> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = if is_root() {
        std::fs::symlink_metadata(staging)
    } else {
        std::fs::metadata(staging)
    }
    .with_context(|| format!("could not read the staging folder {}", staging.display()))?;
    if !meta.is_dir() {
        bail!(
            "the staging folder {} is {}; as root, estafeta update acts only on the folder itself: set STAGING_AREA_PATH to its real path",
            staging.display(),
            if meta.file_type().is_symlink() {
                "a symbolic link"
            } else {
                "not a folder"
            }
        );
    }
    Ok((meta.uid(), meta.gid()))
}

/// Who a trial runs as: the staging folder's owner when root runs it for someone else (the .deb's
/// `estafeta`), so root runs nothing in that user's folder and every file the trial writes stays
/// the service's; `None`: as this process.
#[cfg(unix)]
pub fn run_as(staging: &Path) -> anyhow::Result<Option<(u32, u32)>> {
    // No staging folder yet: nobody else's folder to act in (the trial creates it).
    if !is_root()
        || std::fs::symlink_metadata(staging)
            .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
    {
        return Ok(None);
    }
    let (uid, gid) = staging_owner(staging)?;
    Ok((uid != 0).then_some((uid, gid)))
}

#[cfg(not(unix))]
pub fn run_as(_staging: &Path) -> anyhow::Result<Option<(u32, u32)>> {
    Ok(None)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

    #[test]
    fn roots_folders_are_private_and_its_parent_must_be_roots() {
        if !is_root() {
            eprintln!("skipped: only meaningful as root");
            return;
        }
        let parent = tempfile::tempdir().unwrap();
        assert!(
            safe_parent(parent.path()).is_ok(),
            "a 0700 folder of root's"
        );
        std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = safe_parent(parent.path()).unwrap_err().to_string();
        assert!(err.contains("may be written by others"), "{err}");
        std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(safe_parent(parent.path()).is_ok(), "sticky, like /tmp");
        std::os::unix::fs::chown(parent.path(), Some(65534), None).unwrap();
        let err = safe_parent(&parent.path().join("."))
            .unwrap_err()
            .to_string();
        assert!(err.contains("belongs to uid 65534"), "{err}");
        std::os::unix::fs::chown(parent.path(), Some(0), None).unwrap();
        std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o700)).unwrap();

        let owner_mode = |path: &Path| {
            let meta = std::fs::symlink_metadata(path).unwrap();
            (meta.uid(), meta.mode() & 0o7777)
        };
        let made = parent.path().join("made/here");
        std::fs::create_dir(parent.path().join("made")).unwrap();
        let made_real = root_parent(None, &made).unwrap();
        assert_eq!(made_real, std::fs::canonicalize(&made).unwrap());
        assert_eq!(owner_mode(&made), (0, 0o755));
        let given = root_parent(Some(parent.path().into()), &made).unwrap();
        assert_eq!(given, std::fs::canonicalize(parent.path()).unwrap());
        let dir = private_dir_in(&made, 0o700).unwrap();
        assert_eq!(owner_mode(dir.path()), (0, 0o700));
        assert!(
            dir.path()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(ROOT_PREFIX)
        );
        let trial = private_dir_in(&made, 0o755).unwrap();
        assert_eq!(owner_mode(trial.path()), (0, 0o755));

        let staging = tempfile::tempdir().unwrap();
        std::os::unix::fs::chown(staging.path(), Some(65534), Some(65534)).unwrap();
        assert_eq!(run_as(staging.path()).unwrap(), Some((65534, 65534)));
        assert_eq!(run_as(&staging.path().join("not-yet")).unwrap(), None);
        let link = staging.path().with_extension("link");
        std::os::unix::fs::symlink(staging.path(), &link).unwrap();
        let err = run_as(&link).unwrap_err().to_string();
        std::fs::remove_file(&link).unwrap();
        assert!(err.contains("symbolic link"), "{err}");
    }
}
