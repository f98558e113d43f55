//! Installing a new executable over a plain install and trying it, with the old process as the
//! supervisor. The old process has already drained (like SIGTERM: intake closed, the flush in
//! flight settled, the port and the store released). Here it keeps a copy of its executable as
//! `<exe>.previous`, puts the new one in place with `self_replace` (an atomic rename on Unix),
//! starts it as a trial child (`ESTAFETA_UPDATE_TRIAL=1`, without systemd's notify variables),
//! and waits for its `/readyz` to answer 200 and its `/v1/status` to report the new version
//! within `UPDATE_HEALTH_SECS`. Healthy: the trial is stopped and the caller hands over to the
//! new executable. Dead or not ready in time: the trial is killed and `<exe>.previous` is copied
//! back over the executable (temporary file, fsync, rename), and the caller runs the old version
//! again. The old process does this, not the new one, because a new version that crashes in
//! `main` cannot roll itself back.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio_util::sync::CancellationToken;

/// Set in the trial child's environment; it then runs no update checks of its own.
pub const TRIAL_ENV: &str = "ESTAFETA_UPDATE_TRIAL";

/// How to start and judge the trial.
pub struct TrialSpec {
    /// The installed executable (replaced, then restored on failure).
    pub exe: PathBuf,
    /// The trial's arguments (`run`, with `--env-file` when the agent was given one).
    pub args: Vec<OsString>,
    /// Where the trial's ingest API listens.
    pub addr: SocketAddr,
    pub token: Option<String>,
    /// `INGEST_TLS_CERT`: the API answers HTTPS with this certificate (issue 20).
    pub tls_cert: Option<PathBuf>,
    /// `UPDATE_HEALTH_SECS`.
    pub health: Duration,
    /// How long the healthy trial may take to stop.
    pub grace: Duration,
    /// Unix user and group the trial runs as: the staging folder's owner when `estafeta update`
    /// runs as root for a package install, so the files the trial writes stay the service's.
    pub run_as: Option<(u32, u32)>,
}

/// How the trial ended.
pub enum Outcome {
    /// The new version reported ready; it is in place and the trial is stopped.
    Healthy,
    /// It was not; the previous executable is back in place. The reason, for the logs.
    RolledBack(String),
}

/// `<exe>.previous`: the copy kept for the rollback.
pub fn previous_path(exe: &Path) -> PathBuf {
    let mut name = exe.file_name().unwrap_or_default().to_os_string();
    name.push(".previous");
    exe.with_file_name(name)
}

/// Copies `from` to `to` through a temporary file in `to`'s folder, fsync'd, then renamed over.
pub fn atomic_copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    let dir = to.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".estafeta-update-")
        .tempfile_in(dir)
        .with_context(|| format!("could not create a file in {}", dir.display()))?;
    std::fs::copy(from, tmp.path()).with_context(|| {
        format!(
            "could not copy {} to {}",
            from.display(),
            tmp.path().display()
        )
    })?;
    std::fs::File::open(tmp.path())
        .and_then(|f| f.sync_all())
        .with_context(|| format!("could not flush {}", tmp.path().display()))?;
    tmp.persist(to)
        .with_context(|| format!("could not move the copy into {}", to.display()))?;
    sync_dir(dir);
    Ok(())
}

/// fsyncs a folder, so a file created or renamed in it survives a power cut (best effort:
/// the data itself was already synced by the caller).
pub(super) fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// Installs `new` over `spec.exe`, tries it, and keeps it or puts the previous one back.
/// An error means nothing was changed (the copy or the replacement failed).
pub async fn install_and_try(
    new: &Path,
    version: &str,
    spec: &TrialSpec,
    stop: &CancellationToken,
) -> anyhow::Result<Outcome> {
    let previous = previous_path(&spec.exe);
    atomic_copy(&spec.exe, &previous)
        .context("could not keep the running executable for a rollback")?;
    self_replace::self_replace(new).with_context(|| {
        format!(
            "could not replace {} (is its folder writable by the agent?)",
            spec.exe.display()
        )
    })?;
    if let Ok(f) = std::fs::File::open(&spec.exe) {
        let _ = f.sync_all();
    }
    sync_dir(spec.exe.parent().unwrap_or(Path::new(".")));
    tracing::info!(version, exe = %spec.exe.display(), previous = %previous.display(), health_secs = spec.health.as_secs_f64(), "New version in place; starting it as a trial.");
    match run_trial(&spec.exe, version, spec, stop).await {
        Ok(()) => Ok(Outcome::Healthy),
        Err(why) => {
            let why = format!("{why:#}");
            atomic_copy(&previous, &spec.exe).with_context(|| {
                format!(
                    "the new version failed ({why}) AND the previous executable could not be put back; copy {} over {} by hand",
                    previous.display(),
                    spec.exe.display()
                )
            })?;
            Ok(Outcome::RolledBack(why))
        }
    }
}

/// Starts `exe` as a trial child and waits for it to be ready at `version`; stops it either way.
/// `spec.exe` is not touched: a package update tries the executable unpacked from the package
/// before the package manager installs anything.
pub async fn run_trial(
    exe: &Path,
    version: &str,
    spec: &TrialSpec,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let mut command = tokio::process::Command::new(exe);
    #[cfg(unix)]
    if let Some((uid, gid)) = spec.run_as {
        // std drops root's supplementary groups too when it changes the user.
        command.uid(uid).gid(gid);
    }
    let mut child = command
        .args(&spec.args)
        .env(TRIAL_ENV, version)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("could not start {}", exe.display()))?;
    let client = health_client(spec)?;
    let deadline = Instant::now() + spec.health;
    let result = loop {
        if let Some(status) = child.try_wait().context("waiting for the trial")? {
            break Err(anyhow::anyhow!(
                "the new version exited at start ({status})"
            ));
        }
        if stop.is_cancelled() {
            break Err(anyhow::anyhow!("a stop was requested during the trial"));
        }
        match probe(&client, spec, version).await {
            Ok(()) => break Ok(()),
            Err(last) if Instant::now() >= deadline => {
                break Err(anyhow::anyhow!(
                    "the new version did not report ready within UPDATE_HEALTH_SECS={} (last answer: {last})",
                    spec.health.as_secs()
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    };
    stop_child(
        &mut child,
        if result.is_ok() {
            spec.grace
        } else {
            Duration::from_secs(2)
        },
    )
    .await;
    result
}

/// The base URL and client of the health checks: no proxy (the agent is on this machine),
/// short timeouts, `https://` trusting `INGEST_TLS_CERT` when the API is served over TLS.
pub fn health_client(spec: &TrialSpec) -> anyhow::Result<(String, reqwest::Client)> {
    crate::api_tls::local_client(spec.addr, spec.tls_cert.as_deref(), Duration::from_secs(2))
        .context("could not build the HTTP client for the health check")
}

/// Ready (`/readyz` 200) and running `version` (`/v1/status`).
pub async fn probe(
    (base, client): &(String, reqwest::Client),
    spec: &TrialSpec,
    version: &str,
) -> anyhow::Result<()> {
    let ready = client.get(format!("{base}/readyz")).send().await?;
    if !ready.status().is_success() {
        bail!("/readyz answered {}", ready.status());
    }
    let mut request = client.get(format!("{base}/v1/status"));
    if let Some(token) = &spec.token {
        request = request.bearer_auth(token);
    }
    let status: serde_json::Value = request.send().await?.error_for_status()?.json().await?;
    match status.get("version").and_then(|v| v.as_str()) {
        Some(v) if v == version => Ok(()),
        other => bail!("/v1/status reports version {other:?}, expected {version}"),
    }
}

/// Asks the child to stop (SIGTERM: it drains), then kills it after `grace`.
async fn stop_child(child: &mut tokio::process::Child, grace: Duration) {
    if let Some(pid) = child.id() {
        terminate(pid);
    }
    if tokio::time::timeout(grace + Duration::from_secs(5), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

#[cfg(unix)]
fn terminate(pid: u32) {
    // The child is not reaped yet (we hold it), so the pid is still our child's.
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
}

#[cfg(not(unix))]
fn terminate(_pid: u32) {
    // No SIGTERM: `stop_child` kills it after the grace period. Nothing is lost (records are on
    // disk; a resend is idempotent).
}
