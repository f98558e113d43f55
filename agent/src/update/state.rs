//! What the self-update did last, kept in `<staging>/_update/state.json` so `GET /v1/status`,
//! `estafeta status` (which runs without the daemon) and the next start all see it. Written
//! atomically and durably (temporary file, fsync, rename, fsync of the folder). The `update` object of the status is
//! [`UpdateStatus`] plus the running version.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One word for where the self-update stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// No check has run (or `UPDATE_URL` is not set).
    #[default]
    Idle,
    UpToDate,
    /// A newer version is published (and not installed yet).
    Available,
    /// The new version is being tried (the agent restarts for it).
    Installing,
    /// The running version came from an update that reported healthy.
    Updated,
    /// The new version did not report healthy in time; the previous one was put back.
    RolledBack,
    /// The archive's signature did not verify, or there is no key: nothing was installed.
    Refused,
    /// The check or the download failed; tried again at the next check.
    Failed,
}

/// The status's `update` object.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UpdateStatus {
    pub state: State,
    /// The running version (filled in when shown).
    #[serde(default)]
    pub current: String,
    /// RFC 3339 time of the last check of the manifest.
    pub last_check: Option<String>,
    /// The newer version the manifest offers, if any.
    pub available: Option<String>,
    /// What happened, in a sentence (the error and what to do, after a failure).
    pub message: Option<String>,
    /// A version that was rolled back: automatic checks skip it (`estafeta update` tries again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<String>,
    /// The sha256 of an archive whose signature was refused: automatic checks do not download
    /// the same archive again (a re-signed one has another digest; `estafeta update` tries it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_sha256: Option<String>,
}

/// The state file under a staging folder.
pub fn path(staging: &Path) -> PathBuf {
    staging.join("_update").join("state.json")
}

/// The last saved status (default when none), with `current` set to the running version.
pub fn load(staging: &Path) -> UpdateStatus {
    let mut status: UpdateStatus = imp::read(staging)
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    status.current = crate::version::current().to_owned();
    // A state file written before messages were redacted may quote UPDATE_URL whole.
    status.message = status.message.map(|m| crate::redact::text(&m));
    status
}

/// Saves the status (atomically). Errors are logged, not returned: a status that could not be
/// written never stops an update or the agent.
pub fn save(staging: &Path, status: &UpdateStatus) {
    if let Err(err) = try_save(staging, status) {
        tracing::warn!(error = %format!("{err:#}"), "Could not save the self-update status.");
    }
}

fn try_save(staging: &Path, status: &UpdateStatus) -> anyhow::Result<()> {
    imp::write(staging, &serde_json::to_vec_pretty(status)?)
}

/// Largest state file read, in bytes.
const MAX_STATE_BYTES: u64 = 1024 * 1024;

/// `sudo estafeta update` (a .deb install) runs as root and writes this file inside the service
/// user's staging folder, so nothing it does there may follow a name that user controls: the
/// staging folder is opened without following a link (as root), `_update` and `state.json` never
/// through one, every file is created relative to the opened folder with `O_EXCL | O_NOFOLLOW`,
/// given to the staging folder's owner with `fchown` on the open handle (so the agent can still
/// write it), then renamed into place (a rename replaces a planted link, never follows it). A
/// planted `_update -> /etc/cron.d` makes the write fail; it hands nothing over. Reads take only a
/// regular file (`O_NONBLOCK`: a planted FIFO cannot stall `estafeta status`).
#[cfg(unix)]
mod imp {
    use std::io::{Read as _, Write as _};
    use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
    use std::path::Path;
    use std::sync::atomic::{AtomicU64, Ordering};

    use anyhow::Context as _;
    use rustix::fs::{Mode, OFlags};
    use rustix::io::Errno;

    const DIR: &str = "_update";
    const FILE: &str = "state.json";

    fn open_dir(
        at: impl AsFd,
        name: impl rustix::path::Arg,
        follow: bool,
    ) -> rustix::io::Result<OwnedFd> {
        let mut flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        if !follow {
            flags |= OFlags::NOFOLLOW;
        }
        rustix::fs::openat(at, name, flags, Mode::empty())
    }

    /// The staging folder; as root, not through a link.
    fn open_staging(staging: &Path) -> anyhow::Result<OwnedFd> {
        let follow = !crate::update::workdir::is_root();
        open_dir(rustix::fs::CWD, staging, follow).map_err(|err| explain(err, staging))
    }

    fn explain(err: Errno, path: &Path) -> anyhow::Error {
        if err == Errno::LOOP || err == Errno::NOTDIR {
            anyhow::anyhow!(
                "{} is a symbolic link or not a folder; the self-update never follows a link there (whoever may write the folder could point it anywhere): remove it, the agent creates {DIR} again",
                path.display()
            )
        } else {
            anyhow::Error::new(std::io::Error::from(err))
                .context(format!("could not open {}", path.display()))
        }
    }

    pub(super) fn read(staging: &Path) -> Option<Vec<u8>> {
        let staging = open_staging(staging).ok()?;
        let dir = open_dir(&staging, DIR, false).ok()?;
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let file = std::fs::File::from(rustix::fs::openat(&dir, FILE, flags, Mode::empty()).ok()?);
        if !file.metadata().ok()?.is_file() {
            return None;
        }
        let mut bytes = Vec::new();
        file.take(super::MAX_STATE_BYTES)
            .read_to_end(&mut bytes)
            .ok()?;
        Some(bytes)
    }

    pub(super) fn write(staging_path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let update_path = staging_path.join(DIR);
        if !staging_path.exists() {
            // Before the agent ever ran (as the previous version did with `_update`).
            use std::os::unix::fs::DirBuilderExt as _;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(staging_path)
                .with_context(|| format!("could not create {}", staging_path.display()))?;
        }
        let staging = open_staging(staging_path)?;
        let owner = rustix::fs::fstat(&staging)?;
        // Only root gives files away, and only to the folder's owner when that is someone else.
        let give = crate::update::workdir::is_root() && owner.st_uid != 0;
        let give_away = |fd: BorrowedFd<'_>| -> anyhow::Result<()> {
            if give {
                rustix::fs::fchown(
                    fd,
                    Some(rustix::fs::Uid::from_raw(owner.st_uid)),
                    Some(rustix::fs::Gid::from_raw(owner.st_gid)),
                )
                .with_context(|| {
                    format!(
                        "could not give {} to the service user",
                        update_path.display()
                    )
                })?;
            }
            Ok(())
        };
        let dir = match open_dir(&staging, DIR, false) {
            Ok(dir) => dir,
            Err(Errno::NOENT) => {
                match rustix::fs::mkdirat(&staging, DIR, Mode::from_raw_mode(0o700)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(err) => {
                        return Err(anyhow::Error::new(std::io::Error::from(err))
                            .context(format!("could not create {}", update_path.display())));
                    }
                }
                let dir =
                    open_dir(&staging, DIR, false).map_err(|err| explain(err, &update_path))?;
                give_away(dir.as_fd())?;
                let _ = rustix::fs::fsync(&staging);
                dir
            }
            Err(err) => return Err(explain(err, &update_path)),
        };
        let tmp = format!(
            ".{FILE}.{}.{}.tmp",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&dir, tmp.as_str(), flags, Mode::from_raw_mode(0o600))
            .map_err(|err| explain(err, &update_path.join(&tmp)))?;
        let mut file = std::fs::File::from(fd);
        let written = give_away(file.as_fd())
            .and_then(|()| {
                file.write_all(bytes)?;
                file.sync_all()?;
                Ok(())
            })
            .and_then(|()| {
                rustix::fs::renameat(&dir, tmp.as_str(), &dir, FILE).with_context(|| {
                    format!(
                        "could not rename {tmp} to {FILE} in {}",
                        update_path.display()
                    )
                })
            });
        if written.is_err() {
            let _ = rustix::fs::unlinkat(&dir, tmp.as_str(), rustix::fs::AtFlags::empty());
        }
        written?;
        // The rename is durable only once the folder is: without this a power cut brings back the
        // previous state (or none), e.g. forgets that an archive's signature was refused.
        let _ = rustix::fs::fsync(&dir);
        Ok(())
    }
}

/// Windows: `%ProgramData%\Estafeta` is written by SYSTEM and Administrators only (the MSI sets
/// its ACL), so the service and an elevated `estafeta update` act in a folder nobody else writes.
#[cfg(not(unix))]
mod imp {
    use std::io::{Read as _, Write as _};
    use std::path::Path;

    use anyhow::Context as _;

    pub(super) fn read(staging: &Path) -> Option<Vec<u8>> {
        let file = std::fs::File::open(super::path(staging)).ok()?;
        let mut bytes = Vec::new();
        file.take(super::MAX_STATE_BYTES)
            .read_to_end(&mut bytes)
            .ok()?;
        Some(bytes)
    }

    pub(super) fn write(staging: &Path, bytes: &[u8]) -> anyhow::Result<()> {
        let file = super::path(staging);
        let dir = file.parent().expect("the state file has a folder");
        if !dir.is_dir() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            crate::update::trial::sync_dir(staging);
        }
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        tmp.write_all(bytes)?;
        tmp.as_file().sync_all()?;
        tmp.persist(&file)?;
        crate::update::trial::sync_dir(dir);
        Ok(())
    }
}

/// Changes the saved status with `change` and saves it.
pub fn update(staging: &Path, change: impl FnOnce(&mut UpdateStatus)) -> UpdateStatus {
    let mut status = load(staging);
    change(&mut status);
    save(staging, &status);
    status
}

/// Records a finished update: the new version runs (or will, once started) and nothing is
/// offered any more.
pub fn record_updated(staging: &Path, message: &str) {
    update(staging, |s| {
        s.state = State::Updated;
        s.available = None;
        s.message = Some(message.to_owned());
    });
}

/// Records an update given up after its trial or health check: the previous version runs and
/// automatic checks skip `version` (`estafeta update` tries it again). Logs `message` as an error.
pub fn record_rolled_back(staging: &Path, version: &str, message: &str) {
    tracing::error!("{message}");
    update(staging, |s| {
        s.state = State::RolledBack;
        s.rejected = Some(version.to_owned());
        s.message = Some(message.to_owned());
    });
}

/// Now, as RFC 3339 (UTC).
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let staging = dir.path().join("staging");
        std::fs::create_dir_all(&staging).unwrap();
        update(&staging, |s| {
            s.state = State::Refused;
            s.message = Some("why".into());
        });
        let loaded = load(&staging);
        assert_eq!(loaded.state, State::Refused);
        assert_eq!(loaded.current, crate::version::current());
        let json = serde_json::to_value(&loaded).unwrap();
        assert_eq!(json["state"], "refused");
    }

    /// Only meaningful as root (CI and the .deb's `sudo estafeta update`).
    #[cfg(unix)]
    fn staging_of_the_service_user() -> Option<(tempfile::TempDir, PathBuf)> {
        if !crate::update::workdir::is_root() {
            eprintln!("skipped: only meaningful as root");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let staging = dir.path().join("staging");
        std::fs::create_dir_all(&staging).unwrap();
        std::os::unix::fs::chown(&staging, Some(65534), Some(65534)).unwrap();
        Some((dir, staging))
    }

    #[cfg(unix)]
    #[test]
    fn root_gives_what_it_writes_to_the_staging_owner() {
        use std::os::unix::fs::MetadataExt as _;
        let Some((_dir, staging)) = staging_of_the_service_user() else {
            return;
        };
        update(&staging, |s| s.state = State::Available);
        let meta = std::fs::symlink_metadata(path(&staging)).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o777),
            (65534, 65534, 0o600)
        );
        let folder = std::fs::symlink_metadata(staging.join("_update")).unwrap();
        assert_eq!((folder.uid(), folder.mode() & 0o777), (65534, 0o700));
        assert_eq!(load(&staging).state, State::Available);
    }

    #[cfg(unix)]
    #[test]
    fn root_follows_no_link_the_service_user_planted() {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        let Some((dir, staging)) = staging_of_the_service_user() else {
            return;
        };
        // `_update -> victim`: root must neither write into the victim nor hand it over.
        let victim = dir.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink(&victim, staging.join("_update")).unwrap();
        let err = try_save(&staging, &UpdateStatus::default()).unwrap_err();
        assert!(format!("{err:#}").contains("symbolic link"), "{err:#}");
        let meta = std::fs::metadata(&victim).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (0, 0, 0o755)
        );
        assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 0);
        assert_eq!(load(&staging).state, State::Idle);

        // `_update/state.json -> victim file`: replaced by the new file, the victim untouched.
        std::fs::remove_file(staging.join("_update")).unwrap();
        update(&staging, |s| s.state = State::Available);
        let secret = victim.join("secret");
        std::fs::write(&secret, b"{\"state\": \"updated\"}").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::remove_file(path(&staging)).unwrap();
        std::os::unix::fs::symlink(&secret, path(&staging)).unwrap();
        assert_eq!(load(&staging).state, State::Idle, "not read through a link");
        update(&staging, |s| s.state = State::Failed);
        assert_eq!(load(&staging).state, State::Failed);
        assert!(
            !std::fs::symlink_metadata(path(&staging))
                .unwrap()
                .is_symlink()
        );
        let meta = std::fs::metadata(&secret).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o644));
        assert_eq!(std::fs::read(&secret).unwrap(), b"{\"state\": \"updated\"}");

        // The staging folder itself replaced by a link (its parent is the service user's).
        let real = dir.path().join("real");
        std::fs::rename(&staging, &real).unwrap();
        std::os::unix::fs::symlink(&victim, &staging).unwrap();
        assert!(try_save(&staging, &UpdateStatus::default()).is_err());
        assert!(!victim.join("_update").exists());
    }
}
