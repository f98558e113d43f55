//! Self-update with rollback. A release manifest on any web server (`UPDATE_URL`, `https://`
//! unless it is this machine or `UPDATE_ALLOW_HTTP=true`; see [`manifest`] and [`http`]) is
//! checked by `estafeta update [--check]` and, on `UPDATE_CRONTAB`, by the running daemon. Its
//! archive is downloaded into memory and must carry a zipsign ed25519 signature made with one of
//! the public keys ([`keys`]): with no key, or a bad signature, the update is refused and logged,
//! and nothing changes. **What is verified is what is used**: the signature is checked on the
//! bytes in memory, and the one file installed is unpacked from those same bytes ([`archive`]),
//! in a folder nobody else may write ([`workdir`]: root never works under the service user's
//! staging folder). **Versions are signed**: the archive's own `VERSION` file must match the
//! manifest's version and be strictly newer than the running one (older only with
//! `estafeta update --allow-downgrade`), so an old signed archive offered as a new version is
//! refused.
//!
//! **Who rolls back.** A new version that crashes in `main` cannot roll itself back, so the old
//! process does it ([`trial`]): the daemon drains as on SIGTERM (releasing the port; the staging
//! folder is untouched and the records stay pending), keeps its executable as `<exe>.previous`,
//! puts the new one in place (`self_replace`), starts it as a trial child and waits up to
//! `UPDATE_HEALTH_SECS` for its `/readyz` and its `/v1/status` to report the new version. Then it
//! stops the trial and hands over: on Unix it `exec`s the new executable, so the PID stays the
//! same for systemd (`Type=notify`); elsewhere it starts it and exits. If the trial dies or is not
//! ready in time, the previous executable is put back, an ERROR says why, that version is skipped
//! by later automatic checks, and the daemon runs the old version again.
//!
//! A .deb or MSI install ([`install`]) is updated by its package manager instead, from
//! `estafeta update` run by an administrator; the daemon only reports that a version is available.
//! A .deb's executable is tried before dpkg installs the package ([`package`]).
//! The state of all this is [`state::UpdateStatus`], shown by `/v1/status` and `estafeta status`.

pub mod archive;
pub mod http;
pub mod install;
pub mod keys;
pub mod manifest;
pub mod package;
pub mod state;
pub mod trial;
pub mod workdir;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use manifest::{AssetKind, Manifest};
pub use state::{State, UpdateStatus};

/// Default `UPDATE_HEALTH_SECS`.
pub const DEFAULT_HEALTH_SECS: u64 = 60;
/// How long reading the manifest may take.
pub const MANIFEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long downloading an archive may take.
pub const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(300);
/// Largest archive accepted.
pub const MAX_ARCHIVE_BYTES: u64 = 512 * 1024 * 1024;

/// The self-update settings.
#[derive(Debug, Clone)]
pub struct UpdateConfig {
    /// `UPDATE_URL`: the manifest; `None`: updates are off.
    pub url: Option<String>,
    /// `UPDATE_CRONTAB`: when the daemon checks; `None`: only `estafeta update`.
    pub crontab: Option<String>,
    /// `UPDATE_PUBLIC_KEY`, parsed (the built-in keys are added when checking).
    pub keys: Vec<keys::Key>,
    /// `UPDATE_HEALTH_SECS`.
    pub health: Duration,
    /// `UPDATE_ALLOW_HTTP`: clear-text `http://` to another machine is accepted.
    pub allow_http: bool,
    /// `UPDATE_CA_FILE`: extra CA certificate(s), PEM, for the manifest and the archives.
    pub ca_file: Option<PathBuf>,
    /// `TMPDIR` of the process: where root works when set (see [`workdir`]).
    pub tmpdir: Option<PathBuf>,
    /// This process is the trial of a new version ([`trial::TRIAL_ENV`] set by its parent):
    /// it never updates itself.
    pub trial: bool,
}

/// What the update steps need of the agent's configuration: the `UPDATE_*` settings and the few
/// other values they touch (the staging folder that keeps `_update/`, the time zone of
/// `UPDATE_CRONTAB`, and the ingest API a new version is checked through). Built by
/// `Config::update_context`, so the update path needs nothing of how configuration is loaded.
#[derive(Clone)]
pub struct Context {
    pub update: UpdateConfig,
    pub staging_path: PathBuf,
    pub tz: Option<crate::timezone::Zone>,
    pub ingest_addr: std::net::SocketAddr,
    pub ingest_token: Option<String>,
    /// `INGEST_TLS_CERT`, for the trial's health checks over HTTPS.
    pub ingest_tls_cert: Option<PathBuf>,
    pub shutdown_grace: Duration,
}

impl Context {
    /// How a new version is tried: run as `run_as` with `args`, checked through this agent's
    /// ingest address and token for `UPDATE_HEALTH_SECS`, stopped within the grace period.
    pub(crate) fn trial_spec(
        &self,
        exe: PathBuf,
        args: Vec<std::ffi::OsString>,
        run_as: Option<(u32, u32)>,
    ) -> trial::TrialSpec {
        trial::TrialSpec {
            exe,
            args,
            addr: self.ingest_addr,
            token: self.ingest_token.clone(),
            tls_cert: self.ingest_tls_cert.clone(),
            health: self.update.health,
            grace: self.shutdown_grace,
            run_as,
        }
    }
}

// By hand, so `{:?}` never prints the ingest token.
impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("update", &self.update)
            .field("staging_path", &self.staging_path)
            .field("ingest_addr", &self.ingest_addr)
            .field("ingest_token", &self.ingest_token.as_ref().map(|_| "***"))
            .finish_non_exhaustive()
    }
}

impl Default for UpdateConfig {
    fn default() -> Self {
        Self {
            url: None,
            crontab: None,
            keys: Vec::new(),
            health: Duration::from_secs(DEFAULT_HEALTH_SECS),
            allow_http: false,
            ca_file: None,
            tmpdir: None,
            trial: false,
        }
    }
}

/// The signature did not verify, there was no key, or the signed version is not the one offered
/// or not newer: refused, nothing installed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// A verified, unpacked release waiting to be installed. Its folder is removed when dropped.
pub struct Prepared {
    /// The archive's signed version (the manifest's, which must be the same).
    pub version: String,
    pub kind: AssetKind,
    /// The executable, `.deb` or `.msi`.
    pub file: PathBuf,
    _dir: tempfile::TempDir,
}

/// What a check found.
pub struct Checked {
    pub manifest: Manifest,
    /// The manifest's version is strictly newer than the running one.
    pub newer: bool,
}

fn url(config: &Context) -> anyhow::Result<&str> {
    config.update.url.as_deref().ok_or_else(|| {
        anyhow::anyhow!(
            "UPDATE_URL is not set; set it to the release manifest's URL (https://…/manifest.json)"
        )
    })
}

/// A download folder older than this is a leftover: the process that made it was killed, or
/// `exec`'d the version it held (which skips destructors). Far longer than a download and trial.
const STALE_DOWNLOAD: Duration = Duration::from_secs(3600);

/// Removes the leftover download folders under `<staging>/_update` (each holds an unpacked
/// executable, tens of MB). Best effort: a folder that cannot be removed now is tried again at
/// the next check. Not as root: root's downloads are never there (see [`workdir`]), and root
/// removes nothing by path in the service user's folder.
fn remove_stale_downloads(staging: &std::path::Path) {
    if !workdir::is_root() {
        remove_stale_downloads_in(staging);
    }
}

fn remove_stale_downloads_in(staging: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(staging.join("_update")) else {
        return;
    };
    for entry in entries.flatten() {
        let stale = entry.file_name().to_string_lossy().starts_with("download-")
            && entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > STALE_DOWNLOAD);
        if stale {
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => {
                    tracing::debug!(path = %entry.path().display(), "Removed a leftover update download.")
                }
                Err(err) => {
                    tracing::warn!(path = %entry.path().display(), error = %err, "Could not remove a leftover update download; will try again at the next check.")
                }
            }
        }
    }
}

/// Logs and records that `version` was not installed because of `err`; the message, for the
/// caller to return.
fn not_installed(staging: &std::path::Path, version: &str, err: &anyhow::Error) -> String {
    let message = format!("version {version} was not installed: {err:#}");
    tracing::error!("{message}");
    state::update(staging, |s| {
        s.state = State::Failed;
        s.message = Some(message.clone());
    });
    message
}

/// Reads the manifest and records the check (blocking).
pub fn check(config: &Context) -> anyhow::Result<Checked> {
    let staging = &config.staging_path;
    remove_stale_downloads(staging);
    let current = crate::version::current();
    let result = url(config).and_then(|u| {
        let client = http::Client::new(&config.update)?;
        manifest::fetch(&client, u, MANIFEST_TIMEOUT)
    });
    match result {
        Ok(manifest) => {
            let newer = manifest::is_newer(current, &manifest.version);
            state::update(staging, |s| {
                s.last_check = Some(state::now());
                s.available = newer.then(|| manifest.version.clone());
                // A refusal or a rollback of that version, and "updated", stay readable until
                // something new happens.
                if newer && !matches!(s.state, State::RolledBack | State::Refused) {
                    s.state = State::Available;
                    s.message = Some(format!(
                        "version {} is available (running {current})",
                        manifest.version
                    ));
                } else if !newer && s.state != State::Updated {
                    s.state = State::UpToDate;
                    s.message = Some(format!(
                        "up to date (running {current}, the manifest offers {})",
                        manifest.version
                    ));
                }
            });
            Ok(Checked { manifest, newer })
        }
        Err(err) => {
            let message = shown_error(config, &err);
            state::update(staging, |s| {
                s.last_check = Some(state::now());
                s.state = State::Failed;
                s.message = Some(message.clone());
            });
            Err(anyhow::anyhow!(message))
        }
    }
}

/// Downloads, checks the digest, the signature and the signed version, and unpacks the asset of
/// `kind` (blocking). A refusal is a [`Refused`] error; every failure is recorded in the state
/// and logged. `allow_downgrade`: an older signed version is accepted (`estafeta update
/// --allow-downgrade`; never the daemon's checks).
pub fn prepare(
    config: &Context,
    manifest: &Manifest,
    kind: AssetKind,
    allow_downgrade: bool,
) -> anyhow::Result<Prepared> {
    let result = try_prepare(config, manifest, kind, allow_downgrade);
    if let Err(err) = &result {
        let message = shown_error(config, err);
        let refused = err.downcast_ref::<Refused>().is_some();
        if refused {
            tracing::error!(version = %manifest.version, error = %message, "Update refused.");
        } else {
            tracing::error!(version = %manifest.version, error = %message, "Update failed; trying again at the next check.");
        }
        let asset = manifest.asset(self_update::get_target(), kind);
        state::update(&config.staging_path, |s| {
            s.state = if refused {
                State::Refused
            } else {
                State::Failed
            };
            if refused {
                s.refused_sha256 = asset.map(|a| a.sha256.to_ascii_lowercase());
            }
            s.message = Some(message);
        });
    }
    result.map_err(|err| {
        let message = shown_error(config, &err);
        match err.downcast_ref::<Refused>() {
            Some(_) => anyhow::Error::new(Refused(message)),
            None => anyhow::anyhow!(message),
        }
    })
}

/// `err` with its causes on one line, as it leaves the process (state file, log, CLI), with
/// `UPDATE_URL`'s user, password and secret parameters hidden: the manifest's and the relative
/// assets' URLs carry them, and an error may quote those URLs.
fn shown_error(config: &Context, err: &anyhow::Error) -> String {
    crate::redact::Secrets::of(config.update.url.as_deref().unwrap_or_default())
        .scrub(&format!("{err:#}"))
}

fn try_prepare(
    config: &Context,
    manifest: &Manifest,
    kind: AssetKind,
    allow_downgrade: bool,
) -> anyhow::Result<Prepared> {
    let target = self_update::get_target();
    let asset = manifest.asset(target, kind).ok_or_else(|| {
        anyhow::anyhow!(
            "the manifest of version {} has no {} asset for {target}; publish one or install it by hand",
            manifest.version,
            kind.as_str()
        )
    })?;
    let name = asset
        .url
        .split(['?', '#'])
        .next()
        .and_then(|u| u.rsplit('/').next())
        .filter(|n| n.ends_with(".tar.gz") && !n.contains(".."))
        .ok_or_else(|| anyhow::anyhow!("asset URL {} does not name a .tar.gz file; assets are zipsign-signed .tar.gz archives", crate::redact::url(&asset.url)))?;
    let bytes = http::Client::new(&config.update)?
        .get(&asset.url, MAX_ARCHIVE_BYTES, DOWNLOAD_TIMEOUT)
        .context("could not download the release archive")?;
    let digest = sha256_hex(&bytes);
    if !digest.eq_ignore_ascii_case(&asset.sha256) {
        bail!(
            "{} has sha256 {digest} but the manifest says {}; the download was damaged or the manifest is stale, so nothing was installed",
            crate::redact::url(&asset.url),
            asset.sha256
        );
    }
    // From here on only these bytes are read: no file that anyone could change between the
    // check and the install (zipsign binds the signature to the archive's file name too).
    let signed = keys::verify(name, &bytes, &keys::all(&config.update.keys))
        .map_err(|err| anyhow::Error::new(Refused(format!("{err:#}"))))?;
    drop(bytes);
    let dir = workdir::download_dir(&config.staging_path, config.update.tmpdir.as_deref())?;
    let unpacked = archive::unpack(&signed, name, kind, dir.path())?;
    archive::judge(
        &manifest.version,
        &unpacked.version,
        crate::version::current(),
        allow_downgrade,
    )?;
    if kind == AssetKind::Deb {
        package::check_control_version(&unpacked.file, &unpacked.version)?;
    }
    tracing::info!(version = %unpacked.version, kind = kind.as_str(), "Release downloaded; its signature and its signed version check out.");
    Ok(Prepared {
        version: unpacked.version.to_string(),
        kind,
        file: unpacked.file,
        _dir: dir,
    })
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The running executable's path (refuses the `… (deleted)` path left by an earlier rollback).
pub fn current_exe() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("could not find the running executable")?;
    if !exe.is_file() {
        bail!(
            "the running executable {} was replaced on disk since it started; restart the agent, then update",
            exe.display()
        );
    }
    Ok(exe)
}

/// The daemon's checks: on `UPDATE_CRONTAB`, and whenever `trigger` is notified
/// (`POST /v1/update`, which does not skip a version that was rolled back). A verified
/// plain-install release is sent to `takeover` (the daemon then drains and [`takeover`] tries
/// it); for a package install the state only says a version is available.
pub async fn run_checks(
    config: Arc<Context>,
    cancel: CancellationToken,
    takeover: mpsc::Sender<Prepared>,
    trigger: Arc<tokio::sync::Notify>,
) {
    let schedule = match config.update.crontab.as_deref() {
        None => None,
        Some(crontab) => match crate::crontab::Schedule::new(crontab, config.tz.clone()) {
            Ok(s) => Some(s),
            Err(err) => {
                tracing::error!(error = %format!("{err:#}"), "UPDATE_CRONTAB is not valid; no automatic update checks.");
                None
            }
        },
    };
    if schedule.is_some() {
        tracing::info!(crontab = ?config.update.crontab, url = ?config.update.url.as_deref().map(crate::redact::url), "Automatic update checks on.");
        if let Some(Err(why)) = config
            .update
            .url
            .as_deref()
            .map(|u| http::check_url(u, config.update.allow_http))
        {
            tracing::error!(
                "UPDATE_URL is refused, so every update check fails: {}",
                crate::redact::text(&why)
            );
        }
    }
    loop {
        let wait = schedule
            .as_ref()
            .and_then(|s| s.next_after(chrono::Utc::now()))
            .map(|next| (next - chrono::Utc::now()).to_std().unwrap_or_default());
        let automatic = tokio::select! {
            () = cancel.cancelled() => return,
            () = trigger.notified() => false,
            () = async {
                match wait {
                    Some(wait) => tokio::time::sleep(wait).await,
                    None => std::future::pending().await,
                }
            } => true,
        };
        let cfg = config.clone();
        let found = tokio::task::spawn_blocking(move || scheduled_check(&cfg, automatic)).await;
        if let Ok(Some(prepared)) = found {
            if takeover.send(prepared).await.is_ok() {
                // The daemon drains now; this task ends with it.
                cancel.cancelled().await;
            }
            return;
        }
    }
}

fn scheduled_check(config: &Context, automatic: bool) -> Option<Prepared> {
    let checked = match check(config) {
        Ok(c) => c,
        Err(err) => {
            tracing::warn!(error = %format!("{err:#}"), "Update check failed; trying again at the next check.");
            return None;
        }
    };
    if !checked.newer {
        return None;
    }
    let version = &checked.manifest.version;
    let saved = state::load(&config.staging_path);
    if automatic && saved.rejected.as_deref() == Some(version.as_str()) {
        tracing::debug!(%version, "Skipping a version that was rolled back; `estafeta update` tries it again.");
        return None;
    }
    let exe = current_exe().ok()?;
    let kind = install::detect(&exe);
    if kind != AssetKind::Binary {
        let message = format!(
            "version {version} is available; this is a {} install: run `estafeta update` as an administrator to install it with the package manager",
            kind.as_str()
        );
        tracing::info!("{message}");
        state::update(&config.staging_path, |s| s.message = Some(message));
        return None;
    }
    // A refused signature does not change by downloading the same archive again: skip it until
    // the manifest offers another archive (or someone runs `estafeta update`), so that a hospital
    // link does not carry the same refused download at every check.
    if let (Some(asset), Some(refused)) = (
        checked.manifest.asset(self_update::get_target(), kind),
        saved.refused_sha256.as_deref(),
    ) && automatic
        && asset.sha256.eq_ignore_ascii_case(refused)
    {
        tracing::debug!(%version, "Skipping an archive whose signature was refused; `estafeta update` tries it again.");
        return None;
    }
    prepare(config, &checked.manifest, kind, false).ok()
}

/// After the daemon drained for `prepared`: installs it, tries it, and says what to do next.
pub enum Handover {
    /// Healthy: run this executable in place of the current process.
    Exec(PathBuf),
    /// Rolled back or failed: run the old version again.
    Resume,
}

/// Installs and tries a prepared plain-install release (see the module doc).
pub async fn takeover(
    config: &Context,
    prepared: Prepared,
    args: Vec<std::ffi::OsString>,
    stop: &CancellationToken,
) -> Handover {
    takeover_with_message(config, prepared, args, stop).await.0
}

/// [`takeover`], with what happened in a sentence (also recorded in the state, when it can be
/// written).
pub async fn takeover_with_message(
    config: &Context,
    prepared: Prepared,
    args: Vec<std::ffi::OsString>,
    stop: &CancellationToken,
) -> (Handover, String) {
    let staging = &config.staging_path;
    let from = crate::version::current().to_owned();
    let version = prepared.version.clone();
    // root (`sudo estafeta update` over a plain install whose staging folder is the service
    // user's) tries the new version as that user, as a .deb update does: root runs nothing in
    // that user's folder.
    let exe_and_user = current_exe().and_then(|exe| Ok((exe, workdir::run_as(staging)?)));
    let (exe, run_as) = match exe_and_user {
        Ok(found) => found,
        Err(err) => {
            return (Handover::Resume, not_installed(staging, &version, &err));
        }
    };
    state::update(staging, |s| {
        s.state = State::Installing;
        s.message = Some(format!("trying version {version} (running {from})"));
    });
    crate::notify::status(&format!("Updating: trying version {version}."));
    let watchdog = crate::notify::spawn_watchdog();
    let spec = config.trial_spec(exe.clone(), args, run_as);
    let outcome = trial::install_and_try(&prepared.file, &version, &spec, stop).await;
    if let Some(w) = watchdog {
        w.abort();
    }
    match outcome {
        Ok(trial::Outcome::Healthy) => {
            let message =
                format!("updated from {from} to {version}; the new version reported ready");
            tracing::info!(previous = %trial::previous_path(&exe).display(), "{message}");
            state::record_updated(staging, &message);
            (Handover::Exec(exe), message)
        }
        Ok(trial::Outcome::RolledBack(why)) => {
            let message = format!(
                "version {version} was rolled back: {why}; {from} runs again and automatic checks skip {version} (`estafeta update` tries it again)"
            );
            state::record_rolled_back(staging, &version, &message);
            (Handover::Resume, message)
        }
        Err(err) => (Handover::Resume, not_installed(staging, &version, &err)),
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn age(path: &std::path::Path, by: Duration) {
        let dir = std::fs::File::open(path).unwrap();
        dir.set_modified(SystemTime::now() - by).unwrap();
    }

    #[test]
    fn only_old_download_folders_are_removed() {
        let staging = tempfile::tempdir().unwrap();
        let update = staging.path().join("_update");
        let (old, fresh) = (update.join("download-old"), update.join("download-new"));
        std::fs::create_dir_all(old.join("unpacked")).unwrap();
        std::fs::write(old.join("estafeta.tar.gz"), b"archive").unwrap();
        std::fs::create_dir_all(&fresh).unwrap();
        std::fs::write(update.join("state.json"), b"{}").unwrap();
        age(&old, Duration::from_secs(2 * 3600));
        age(&update.join("state.json"), Duration::from_secs(2 * 3600));

        remove_stale_downloads_in(staging.path());
        assert!(!old.exists(), "a two-hour-old download is a leftover");
        assert!(fresh.exists(), "a download in progress stays");
        assert!(
            update.join("state.json").exists(),
            "only download folders go"
        );
        remove_stale_downloads_in(&staging.path().join("nothing-here"));
    }
}
