//! What the self-update did last, kept in `<staging>/_update/state.json` so `GET /v1/status`,
//! `estafeta status` (which runs without the daemon) and the next start all see it. Written
//! atomically and durably (temporary file, fsync, rename, fsync of the folder). The `update`
//! object of the status is [`UpdateStatus`] plus the running version.

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
    let mut status: UpdateStatus = std::fs::read(path(staging))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    status.current = crate::version::current().to_owned();
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
    use anyhow::Context as _;
    use std::io::Write as _;
    let file = path(staging);
    let dir = file.parent().expect("the state file has a folder");
    if !dir.is_dir() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        super::trial::sync_dir(staging);
    }
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(&serde_json::to_vec_pretty(status)?)?;
    tmp.as_file().sync_all()?;
    tmp.persist(&file)?;
    // The rename is durable only once the folder is: without this a power cut brings back the
    // previous state (or none), e.g. forgets that an archive's signature was refused.
    super::trial::sync_dir(dir);
    same_owner_as_staging(staging, &[dir, &file]);
    Ok(())
}

/// `sudo estafeta update` (a .deb install) runs as root: the folder and the file it creates are
/// given to the staging folder's owner, so the agent (user `estafeta`) can still write them.
#[cfg(unix)]
fn same_owner_as_staging(staging: &Path, paths: &[&Path]) {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(owner) = std::fs::metadata(staging) else {
        return;
    };
    for path in paths {
        if std::fs::metadata(path).is_ok_and(|m| m.uid() != owner.uid() || m.gid() != owner.gid()) {
            // Only root may give a file away; anyone else keeps it as it is.
            let _ = std::os::unix::fs::chown(path, Some(owner.uid()), Some(owner.gid()));
        }
    }
}

#[cfg(not(unix))]
fn same_owner_as_staging(_staging: &Path, _paths: &[&Path]) {}

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
    fn the_state_round_trips_and_root_gives_it_to_the_staging_owner() {
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
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt as _;
            // Only meaningful as root (CI and the .deb's `sudo estafeta update`).
            if std::fs::metadata(&staging).unwrap().uid() == 0 {
                std::os::unix::fs::chown(&staging, Some(65534), Some(65534)).unwrap();
                save(&staging, &loaded);
                let meta = std::fs::metadata(path(&staging)).unwrap();
                assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
                let folder = std::fs::metadata(staging.join("_update")).unwrap();
                assert_eq!(folder.uid(), 65534);
            }
        }
    }
}
