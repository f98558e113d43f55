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
//! **Where root works.** The package was downloaded, verified and unpacked from the same bytes
//! in root's own 0700 folder ([`super::workdir`]); `dpkg-deb -x`, the executable kept for a
//! rollback and `dpkg -i` all use that folder, which no other user may write, so the package
//! installed is the one verified. The trial's copy of the executable sits in a second root-owned
//! folder (0755) the service user may read and run but not change; nothing is created in, or
//! handed over from, the service user's staging folder. Before any of it, the package's own
//! `Version` (its control file) must be the archive's signed `VERSION`: dpkg installs what the
//! control file says.
//!
//! An MSI install is handed to `msiexec` ([`super::install`]); Windows Installer rolls the whole
//! upgrade back itself when the service does not reach "running" (see `installer/README.md`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio_util::sync::CancellationToken;

use super::Context;
use super::trial::{self, TrialSpec};
use super::{Prepared, Refused, State, state};

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
    config: &Context,
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
    let run_as = super::workdir::run_as(staging)?;
    // The download stays in root's private folder (a service user able to swap the package
    // between its check and `dpkg -i` could gain root); the trial runs a copy of the executable
    // that user may read but not change.
    let (candidate, _trial_dir) =
        copy_for_trial(&unpacked, run_as, config.update.tmpdir.as_deref())?;
    let spec = config.trial_spec(exe.clone(), args, run_as);

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

/// The executable the trial runs: `exe` itself when it runs as this process; otherwise a copy,
/// mode 0755, in a fresh root-owned folder (mode 0755) that `run_as` may read but not write,
/// since `exe` sits in root's 0700 folder.
fn copy_for_trial(
    exe: &Path,
    run_as: Option<(u32, u32)>,
    tmpdir: Option<&Path>,
) -> anyhow::Result<(PathBuf, Option<tempfile::TempDir>)> {
    if run_as.is_none() {
        return Ok((exe.to_owned(), None));
    }
    let dir = super::workdir::trial_dir(tmpdir)?;
    let copy = copy_into(exe, dir.path())?;
    Ok((copy, Some(dir)))
}

/// Copies `exe` to `<dir>/estafeta`, a new file, mode 0755.
fn copy_into(exe: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let copy = dir.join("estafeta");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o755);
    let mut out = options
        .open(&copy)
        .with_context(|| format!("could not create {}", copy.display()))?;
    let mut from =
        std::fs::File::open(exe).with_context(|| format!("could not read {}", exe.display()))?;
    std::io::copy(&mut from, &mut out)
        .and_then(|_| out.sync_all())
        .with_context(|| format!("could not copy {} for the trial", exe.display()))?;
    #[cfg(unix)]
    {
        // Whatever the umask: the service user must be able to run it.
        use std::os::unix::fs::PermissionsExt as _;
        out.set_permissions(std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(copy)
}

/// Refuses a package whose control file's `Version` (what dpkg installs) is not the archive's
/// signed `VERSION`: `1:0.2.0-1` and `0.2.0~rc.1-1` are `0.2.0` and `0.2.0-rc.1`.
pub fn check_control_version(deb: &Path, signed: &semver::Version) -> anyhow::Result<()> {
    let output = Command::new("dpkg-deb")
        .arg("-f")
        .arg(deb)
        .arg("Version")
        .output()
        .context("could not run dpkg-deb (is this a Debian system?)")?;
    if !output.status.success() {
        bail!(
            "dpkg-deb -f {} Version failed ({}): {}; the package is damaged or not a .deb",
            deb.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let control = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    match upstream_version(&control) {
        Some(v) if v == *signed => Ok(()),
        _ => Err(Refused(format!(
            "the package's control file says version {control:?} but the archive's signed VERSION says {signed}; refused (dpkg would install the former)"
        ))
        .into()),
    }
}

/// The upstream part of a Debian version, as semver.
fn upstream_version(debian: &str) -> Option<semver::Version> {
    let no_epoch = debian.split_once(':').map_or(debian, |(_, v)| v);
    let upstream = no_epoch.rsplit_once('-').map_or(no_epoch, |(v, _)| v);
    semver::Version::parse(&upstream.replace('~', "-")).ok()
}

fn systemd_runs() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// Frees the ingest port and the store for the trial: stops the systemd service when it runs;
/// refuses when some other agent holds the port. Returns whether the service was stopped.
fn stop_running_agent(config: &Context) -> anyhow::Result<bool> {
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
    let client = trial::health_client(spec)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_versions_compare_by_their_upstream_part() {
        let v = |s: &str| semver::Version::parse(s).unwrap();
        assert_eq!(upstream_version("0.2.0-1"), Some(v("0.2.0")));
        assert_eq!(upstream_version("1:0.2.0-3"), Some(v("0.2.0")));
        assert_eq!(upstream_version("0.2.0~rc.1-1"), Some(v("0.2.0-rc.1")));
        assert_eq!(upstream_version("0.2.0"), Some(v("0.2.0")));
        assert_eq!(upstream_version("latest"), None);
    }

    #[test]
    fn the_control_files_version_must_be_the_signed_one() {
        if Command::new("dpkg-deb").arg("--version").output().is_err() {
            eprintln!("skipped: no dpkg-deb");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("DEBIAN")).unwrap();
        std::fs::write(
            tree.join("DEBIAN/control"),
            "Package: estafeta-test\nVersion: 0.2.0-1\nArchitecture: all\nMaintainer: t <t@example.invalid>\nDescription: test\n",
        )
        .unwrap();
        let deb = dir.path().join("estafeta-test_0.2.0-1_all.deb");
        let built = Command::new("dpkg-deb")
            .args(["--root-owner-group", "-b"])
            .arg(&tree)
            .arg(&deb)
            .output()
            .unwrap();
        assert!(built.status.success(), "{built:?}");
        let v = |s: &str| semver::Version::parse(s).unwrap();
        check_control_version(&deb, &v("0.2.0")).unwrap();
        let err = check_control_version(&deb, &v("99.0.0")).unwrap_err();
        assert!(err.downcast_ref::<Refused>().is_some(), "{err:#}");

        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt as _;
            let folder = dir.path().join("trial");
            std::fs::create_dir(&folder).unwrap();
            let copy = copy_into(&deb, &folder).unwrap();
            let meta = std::fs::symlink_metadata(&copy).unwrap();
            assert_eq!(meta.mode() & 0o7777, 0o755);
            assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(&deb).unwrap());
            assert!(
                copy_into(&deb, &folder).is_err(),
                "never over a file already there"
            );
        }
    }
}
