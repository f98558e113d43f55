//! Updating a .deb install from `estafeta update` (run as root): **tried before installed**.
//!
//! A package manager replaces the executable itself, so the plain install's "replace, try, put
//! back" ([`super::trial`]) cannot wrap it. Instead the executable is unpacked from the verified
//! package (`dpkg-deb -x`) and tried first, exactly as a plain install's new version is: the
//! running service is stopped (systemd), the candidate runs `run` with the agent's own
//! configuration, as the staging folder's owner (so every file it writes stays the service's),
//! and must answer `/readyz` and report its version on `/v1/status` within
//! `UPDATE_HEALTH_SECS`. Only then is the package handed to `dpkg -i`; if the trial fails, nothing
//! is installed, the version is recorded as rolled back (automatic checks skip it) and the
//! service is started again on the version it had.
//!
//! After `dpkg -i` the package scripts start the service (when systemd runs it); it must report
//! the new version healthy within `UPDATE_HEALTH_SECS` again, or the previous executable, kept
//! before `dpkg -i`, is copied back and the service restarted on it (dpkg's database then names
//! the new version: reinstall the previous .deb to make them agree; the message says so).
//! Staged records are never touched: the store's format is read by every newer version.
//!
//! An MSI install is handed to `msiexec` ([`super::install`]); Windows Installer rolls the whole
//! upgrade back itself when the service does not reach "running" (see `installer/README.md`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio_util::sync::CancellationToken;

use super::trial::{self, TrialSpec};
use super::{Prepared, State, state};
use crate::config::Config;

/// The systemd unit the .deb installs.
pub const SERVICE: &str = "estafeta";

/// How a package update ended.
pub enum PackageOutcome {
    /// Installed, and (under systemd) the service reported the new version healthy.
    Installed(String),
    /// The new version failed its trial or its start: the version that ran before runs again.
    RolledBack(String),
}

/// Tries the .deb's executable, then installs the package with dpkg (see the module doc).
pub async fn update_deb(
    config: &Config,
    prepared: &Prepared,
    args: Vec<std::ffi::OsString>,
) -> anyhow::Result<PackageOutcome> {
    let staging = &config.staging_path;
    let version = prepared.version.clone();
    let from = crate::version::current().to_owned();
    let exe = super::current_exe()?;
    let work = prepared
        .file
        .parent()
        .context("the downloaded package has no folder")?;
    let unpacked = unpack_deb(&prepared.file, &work.join("root"))?;
    let run_as = staging_owner_if_other(staging);
    // The download stays root's (a service user able to swap the package between its check and
    // `dpkg -i` could gain root); the trial runs a copy of the executable that user may read.
    let (candidate, _trial_dir) = copy_for_trial(&unpacked, staging, run_as)?;
    let spec = TrialSpec {
        exe: exe.clone(),
        args,
        addr: config.ingest_addr,
        token: config.ingest_token.clone(),
        health: config.update.health,
        grace: config.shutdown_grace,
        run_as,
    };

    let service_was_running = stop_running_agent(config)?;
    state::update(staging, |s| {
        s.state = State::Installing;
        s.message = Some(format!("trying version {version} (running {from})"));
    });
    tracing::info!(%version, candidate = %candidate.display(), run_as = ?spec.run_as, "Trying the package's executable before installing the package.");
    let stop = CancellationToken::new();
    if let Err(why) = trial::run_trial(&candidate, &version, &spec, &stop).await {
        let message = format!(
            "version {version} was not installed: its trial failed ({why:#}); {from} stays installed and automatic checks skip {version} (`estafeta update` tries it again)"
        );
        state::record_rolled_back(staging, &version, &message);
        if service_was_running {
            start_service();
        }
        return Ok(PackageOutcome::RolledBack(message));
    }

    // Kept for the (unlikely) case where the same executable that passed the trial does not
    // come back healthy once the package scripts start it.
    let previous = work.join("previous");
    trial::atomic_copy(&exe, &previous)
        .context("could not keep the installed executable for a rollback")?;
    if let Err(err) = super::install::install_package(super::AssetKind::Deb, &prepared.file) {
        if service_was_running {
            start_service();
        }
        return Err(err);
    }
    if !service_was_running || !systemd_runs() {
        return Ok(PackageOutcome::Installed(format!(
            "updated from {from} to {version} with dpkg after a healthy trial; start the agent to run it"
        )));
    }
    match wait_healthy(&spec, &version).await {
        Ok(()) => Ok(PackageOutcome::Installed(format!(
            "updated from {from} to {version} with dpkg; the service reported the new version ready"
        ))),
        Err(why) => {
            systemctl("stop");
            trial::atomic_copy(&previous, &exe).with_context(|| {
                format!(
                    "version {version} did not come back healthy ({why:#}) AND the previous executable could not be put back; reinstall the previous .deb"
                )
            })?;
            start_service();
            let message = format!(
                "version {version} was installed but the service did not report it ready ({why:#}); the previous executable ({from}) was put back and the service restarted. dpkg still lists {version}: reinstall the previous .deb to make it agree"
            );
            state::record_rolled_back(staging, &version, &message);
            Ok(PackageOutcome::RolledBack(message))
        }
    }
}

/// Unpacks `deb` into `into` and returns its `usr/bin/estafeta`.
fn unpack_deb(deb: &Path, into: &Path) -> anyhow::Result<PathBuf> {
    let output = Command::new("dpkg-deb")
        .arg("-x")
        .arg(deb)
        .arg(into)
        .output()
        .context("could not run dpkg-deb (is this a Debian system?)")?;
    if !output.status.success() {
        bail!(
            "dpkg-deb -x {} failed ({}): {}; the package is damaged or not a .deb",
            deb.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let exe = into.join("usr/bin/estafeta");
    if !exe.is_file() {
        bail!(
            "{} holds no usr/bin/estafeta; it is not an estafeta package",
            deb.display()
        );
    }
    Ok(exe)
}

/// A copy of `exe` in a folder of its own under `<staging>/_update`, given to `run_as`.
fn copy_for_trial(
    exe: &Path,
    staging: &Path,
    run_as: Option<(u32, u32)>,
) -> anyhow::Result<(PathBuf, tempfile::TempDir)> {
    let dir = tempfile::Builder::new()
        .prefix("trial-")
        .tempdir_in(staging.join("_update"))
        .context("could not create the trial's folder under the staging folder's _update")?;
    let copy = dir.path().join("estafeta");
    std::fs::copy(exe, &copy).with_context(|| format!("could not copy {}", exe.display()))?;
    #[cfg(unix)]
    if let Some((uid, gid)) = run_as {
        for path in [dir.path(), copy.as_path()] {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).with_context(|| {
                format!("could not give {} to the service user", path.display())
            })?;
        }
    }
    #[cfg(not(unix))]
    let _ = run_as;
    Ok((copy, dir))
}

/// The staging folder's owner, when it is not the user running this command (root updating a
/// .deb install whose service runs as `estafeta`).
#[cfg(unix)]
fn staging_owner_if_other(staging: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt as _;
    let owner = std::fs::metadata(staging).ok()?;
    // /proc/self belongs to the process's effective user.
    let me = std::fs::metadata("/proc/self").ok()?;
    (owner.uid() != me.uid()).then(|| (owner.uid(), owner.gid()))
}

#[cfg(not(unix))]
fn staging_owner_if_other(_staging: &Path) -> Option<(u32, u32)> {
    None
}

fn systemd_runs() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// Frees the ingest port and the store for the trial: stops the systemd service when it runs;
/// refuses when some other agent holds the port. Returns whether the service was stopped.
fn stop_running_agent(config: &Config) -> anyhow::Result<bool> {
    let busy = || {
        std::net::TcpStream::connect_timeout(&config.ingest_addr, Duration::from_secs(1)).is_ok()
    };
    let running = systemd_runs()
        && Command::new("systemctl")
            .args(["is-active", "--quiet", SERVICE])
            .status()
            .is_ok_and(|s| s.success());
    if running {
        tracing::info!("Stopping the estafeta service for the trial (it drains as on SIGTERM).");
        if !systemctl("stop") {
            bail!(
                "`systemctl stop {SERVICE}` failed; stop the service, then run `estafeta update` again"
            );
        }
    }
    if busy() {
        bail!(
            "an agent still listens on {}; stop it (systemctl stop {SERVICE}, or the process you started), then run `estafeta update` again: the new version is tried on that address before it is installed",
            config.ingest_addr
        );
    }
    Ok(running)
}

fn systemctl(verb: &str) -> bool {
    Command::new("systemctl")
        .args([verb, SERVICE])
        .status()
        .is_ok_and(|s| s.success())
}

fn start_service() {
    if !systemctl("start") {
        tracing::error!(
            "Could not start the estafeta service again; start it by hand: systemctl start {SERVICE}"
        );
    }
}

/// Waits until the service answers `/readyz` and reports `version`, for `UPDATE_HEALTH_SECS`.
async fn wait_healthy(spec: &TrialSpec, version: &str) -> anyhow::Result<()> {
    let client = trial::health_client()?;
    let deadline = Instant::now() + spec.health;
    loop {
        match trial::probe(&client, spec, version).await {
            Ok(()) => return Ok(()),
            Err(last) if Instant::now() >= deadline => {
                return Err(last.context(format!(
                    "not ready within UPDATE_HEALTH_SECS={}",
                    spec.health.as_secs()
                )));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}
