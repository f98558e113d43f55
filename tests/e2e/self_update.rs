//! Issue 7, self-update with rollback: the real binary, copied into a temporary install folder
//! (never target/debug/estafeta itself), checks a release server on 127.0.0.1 every second
//! (`UPDATE_CRONTAB`) while a backlog waits for a central API that is down:
//! - a newer version (the same build, stamped with the next patch version, zipsign-signed):
//!   installed, tried, handed over in the same process (exec, same PID), `/v1/status` reports it,
//!   and the backlog staged before the update is delivered once the API is back;
//! - an archive signed with another key, and a good one with no public key configured: refused,
//!   the executable unchanged, the old version still running and delivering, the archive not
//!   downloaded again by the checks that follow;
//! - a version that crashes at start (an executable that exits 70 at once, signed like a good
//!   one), and one that never gets ready (it sleeps; `UPDATE_HEALTH_SECS=3`): rolled back, the
//!   previous executable restored byte for byte, same PID, backlog delivered, version skipped;
//! - `estafeta update --check` and `estafeta update` run by hand over a stopped plain install.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use estafeta_e2e::{
    Agent, FlakyHttpServer, ReleaseServer, estafeta_bin, free_port, log_tail, next_patch,
    public_key_base64, restamp, run_cli, signed_archive, signing_key, wait_drained,
};
use serde_json::{Value, json};

const CURRENT: &str = env!("CARGO_PKG_VERSION");
const BACKLOG: usize = 12;

/// A temporary install: `<dir>/bin/estafeta`, a copy of the built binary.
struct Install {
    dir: tempfile::TempDir,
    exe: PathBuf,
    original: Vec<u8>,
}

fn install() -> Install {
    let dir = tempfile::Builder::new()
        .prefix("estafeta-e2e-update-")
        .tempdir()
        .unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let exe = bin.join("estafeta");
    std::fs::copy(estafeta_bin(), &exe).unwrap();
    let original = std::fs::read(&exe).unwrap();
    Install { dir, exe, original }
}

fn archive_name(version: &str) -> String {
    format!("estafeta-{version}-{}.tar.gz", estafeta_e2e::host_target())
}

/// Starts the installed copy with the sink down, stages the backlog, and returns them.
async fn start_with_backlog(
    install: &Install,
    releases: &ReleaseServer,
    public_key: Option<&str>,
    health_secs: &str,
    extra_env: &[(String, String)],
) -> (Agent, FlakyHttpServer) {
    let sink = FlakyHttpServer::start().await;
    sink.down().await;
    let mut env = vec![
        ("CENTRAL_API_URL".to_owned(), sink.url()),
        ("CRONTAB".to_owned(), "* * * * * *".to_owned()),
        ("RETRY_MAX_SECS".to_owned(), "1".to_owned()),
        ("UPDATE_URL".to_owned(), releases.url("manifest.json")),
        ("UPDATE_CRONTAB".to_owned(), "* * * * * *".to_owned()),
        ("UPDATE_HEALTH_SECS".to_owned(), health_secs.to_owned()),
        ("SHUTDOWN_GRACE_SECS".to_owned(), "3".to_owned()),
    ];
    env.extend(extra_env.iter().cloned());
    if let Some(key) = public_key {
        env.push(("UPDATE_PUBLIC_KEY".to_owned(), key.to_owned()));
    }
    let mut agent = Agent::spec(install.dir.path())
        .program(&install.exe, &["run"])
        .envs(env)
        .spawn();
    agent.wait_ready(Duration::from_secs(30)).await;
    for i in 0..BACKLOG {
        let (code, body) = agent
            .post("create", "patient", &json!({"id": format!("p{i}"), "n": i}))
            .await;
        assert_eq!(code.as_u16(), 202, "{body}");
    }
    (agent, sink)
}

/// `/v1/status` now.
async fn status_of(agent: &Agent) -> Value {
    wait_for(agent, Duration::from_secs(10), |_| true).await
}

/// Polls `/v1/status` (tolerating the restart's refused connections) until `done` holds.
async fn wait_for(agent: &Agent, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + timeout;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        if let Ok(response) = agent.client().get(agent.url("/v1/status")).send().await
            && let Ok(status) = response.json::<Value>().await
        {
            if done(&status) {
                return status;
            }
            last = status;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!(
        "the status did not get there within {timeout:?}; last: {}\nlog:\n{}",
        last["update"],
        log_tail(agent, 60)
    );
}

/// The backlog is delivered once the API is back: each record at least once.
async fn backlog_delivered(agent: &Agent, sink: &FlakyHttpServer) {
    sink.up().await;
    wait_drained(agent, Duration::from_secs(60)).await;
    let keys = sink.count_by_idempotency_key();
    let delivered: std::collections::BTreeSet<String> = sink
        .succeeded()
        .iter()
        .map(|r| r.json()["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(delivered.len(), BACKLOG, "{delivered:?} {keys:?}");
}

fn same_bytes(path: &Path, expected: &[u8]) -> bool {
    std::fs::read(path).map(|b| b == expected).unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_newer_version_is_installed_and_drains_the_old_backlog() {
    let install = install();
    let releases = ReleaseServer::start().await;
    let key = signing_key(1);
    // A stand-in for systemd's notify socket: what the service manager would be told.
    let notify_path = install.dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let extra = [(
        "NOTIFY_SOCKET".to_owned(),
        notify_path.display().to_string(),
    )];
    let (mut agent, sink) = start_with_backlog(
        &install,
        &releases,
        Some(&public_key_base64(&key)),
        "30",
        &extra,
    )
    .await;
    let pid = agent.pid();
    let new_version = next_patch(CURRENT);
    let new_binary = restamp(&install.original, CURRENT, &new_version);
    let name = archive_name(&new_version);
    let archive = signed_archive(&name, &[("estafeta", &new_binary, 0o755)], &key);
    releases.publish_binary(&new_version, &name, archive);

    // The trial answers on the same port with the new version and state "installing"; the
    // handed-over process says "updated".
    let status = wait_for(&agent, Duration::from_secs(90), |s| {
        s["version"] == new_version.as_str() && s["update"]["state"] == "updated"
    })
    .await;
    let message = status["update"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("updated from {CURRENT} to {new_version}")),
        "{message}"
    );
    assert_eq!(status["update"]["current"], new_version.as_str());
    assert!(agent.try_wait().is_none(), "the agent runs");
    assert_eq!(agent.pid(), pid, "the same process (exec)");
    assert!(
        same_bytes(&install.exe, &new_binary),
        "the new executable is in place"
    );
    let previous = install.exe.with_file_name("estafeta.previous");
    assert!(
        same_bytes(&previous, &install.original),
        "the previous one is kept"
    );
    backlog_delivered(&agent, &sink).await;
    // systemd hears READY=1 from the old process and again after the exec (same PID), never
    // STOPPING=1 (it would kill the service), and nothing from the trial child.
    let mut told = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = notify.recv(&mut buf) {
        told.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    let readies = told.iter().filter(|m| m.contains("READY=1")).count();
    assert_eq!(readies, 2, "{told:?}");
    assert!(!told.iter().any(|m| m.contains("STOPPING=1")), "{told:?}");
    assert!(
        told.iter()
            .any(|m| m.contains("STATUS=Updating: trying version")),
        "{told:?}"
    );
    eprintln!(
        "self_update: {CURRENT} -> {new_version} in place, same pid, {BACKLOG} records delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_signature_or_no_key_is_refused_and_nothing_changes() {
    for (case, configured, signer) in [
        ("bad signature", Some(signing_key(1)), signing_key(2)),
        ("no key", None, signing_key(1)),
    ] {
        let install = install();
        let releases = ReleaseServer::start().await;
        let public = configured.as_ref().map(public_key_base64);
        let (mut agent, sink) =
            start_with_backlog(&install, &releases, public.as_deref(), "30", &[]).await;
        let new_version = next_patch(CURRENT);
        let new_binary = restamp(&install.original, CURRENT, &new_version);
        let name = archive_name(&new_version);
        releases.publish_binary(
            &new_version,
            &name,
            signed_archive(&name, &[("estafeta", &new_binary, 0o755)], &signer),
        );
        let status = wait_for(&agent, Duration::from_secs(60), |s| {
            s["update"]["state"] == "refused"
        })
        .await;
        let message = status["update"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(message.contains("UPDATE_PUBLIC_KEY"), "{case}: {message}");
        assert_eq!(status["version"], CURRENT, "{case}");
        assert!(agent.try_wait().is_none(), "{case}: still running");
        assert!(
            same_bytes(&install.exe, &install.original),
            "{case}: executable unchanged"
        );
        assert!(agent.stderr().contains("Update refused"), "{case}: logged");
        // Checks go on every second, but the refused archive is not downloaded again.
        let checks = releases.served("manifest.json");
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            releases.served("manifest.json") >= checks + 2,
            "{case}: the manifest is still checked"
        );
        assert_eq!(releases.served(&name), 1, "{case}: downloaded once");
        assert_eq!(
            status_of(&agent).await["update"]["state"],
            "refused",
            "{case}"
        );
        backlog_delivered(&agent, &sink).await;
        if case == "no key" {
            // `estafeta update --check` reads the same manifest and changes nothing.
            let env = [("UPDATE_URL", releases.url("manifest.json"))];
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let out = run_cli(install.dir.path(), &env, &["update", "--check"]).await;
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success()
                    && stdout.contains(&format!("version {new_version} is available")),
                "{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        eprintln!("self_update: {case}: refused ({message})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_that_crashes_or_never_gets_ready_is_rolled_back() {
    let cases: [(&str, &[u8], &str, &str); 2] = [
        (
            "crashes at start",
            b"#!/bin/sh\necho 'estafeta (broken release): crashing at start' >&2\nexit 70\n",
            "30",
            "exited at start",
        ),
        (
            "never ready",
            b"#!/bin/sh\nexec sleep 600\n",
            "3",
            "did not report ready within UPDATE_HEALTH_SECS=3",
        ),
    ];
    for (case, broken, health, why) in cases {
        let install = install();
        let releases = ReleaseServer::start().await;
        let key = signing_key(1);
        let (mut agent, sink) = start_with_backlog(
            &install,
            &releases,
            Some(&public_key_base64(&key)),
            health,
            &[],
        )
        .await;
        let pid = agent.pid();
        let new_version = next_patch(CURRENT);
        let name = archive_name(&new_version);
        releases.publish_binary(
            &new_version,
            &name,
            signed_archive(&name, &[("estafeta", broken, 0o755)], &key),
        );
        let status = wait_for(&agent, Duration::from_secs(90), |s| {
            s["update"]["state"] == "rolled_back"
        })
        .await;
        assert_eq!(status["version"], CURRENT, "{case}");
        let message = status["update"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(why), "{case}: {message}");
        assert!(agent.try_wait().is_none(), "{case}: the old version runs");
        assert_eq!(agent.pid(), pid, "{case}");
        assert!(
            same_bytes(&install.exe, &install.original),
            "{case}: the previous executable is restored"
        );
        let log = agent.stderr();
        assert!(
            log.contains("ERROR") && log.contains("was rolled back"),
            "{case}: {}",
            log_tail(&agent, 30)
        );
        backlog_delivered(&agent, &sink).await;
        // Later checks skip the version that failed: still the old one, still running.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let status = wait_for(&agent, Duration::from_secs(10), |_| true).await;
        assert_eq!(status["version"], CURRENT, "{case}");
        assert_eq!(status["update"]["state"], "rolled_back", "{case}");
        eprintln!("self_update: {case}: {new_version} rolled back, {BACKLOG} records delivered");
    }
}

/// Runs the installed copy's CLI in its folder with exactly `env`.
/// Success, stdout, and stdout followed by stderr.
async fn installed_cli(
    install: &Install,
    env: &[(String, String)],
    args: &[&str],
) -> (bool, String, String) {
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(&install.exe)
            .args(args)
            .current_dir(install.dir.path())
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the CLI finished within 120 s")
    .expect("the CLI started");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let all = format!("{stdout}{}", String::from_utf8_lossy(&output.stderr));
    (output.status.success(), stdout, all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn estafeta_update_installs_over_a_stopped_agent() {
    let install = install();
    let releases = ReleaseServer::start().await;
    let key = signing_key(1);
    let new_version = next_patch(CURRENT);
    let new_binary = restamp(&install.original, CURRENT, &new_version);
    let name = archive_name(&new_version);
    releases.publish_binary(
        &new_version,
        &name,
        signed_archive(&name, &[("estafeta", &new_binary, 0o755)], &key),
    );
    let mut env: Vec<(String, String)> = ["PATH", "HOME"]
        .into_iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_owned(), v)))
        .collect();
    let staging = install.dir.path().join("staging");
    env.extend([
        (
            "STAGING_AREA_PATH".to_owned(),
            staging.display().to_string(),
        ),
        (
            "IS_ABSOLUTE_STAGING_AREA_PATH".to_owned(),
            "true".to_owned(),
        ),
        (
            "INGEST_ADDR".to_owned(),
            format!("127.0.0.1:{}", free_port()),
        ),
        ("UPDATE_URL".to_owned(), releases.url("manifest.json")),
        ("UPDATE_PUBLIC_KEY".to_owned(), public_key_base64(&key)),
        ("UPDATE_HEALTH_SECS".to_owned(), "30".to_owned()),
    ]);

    let (ok, _, out) = installed_cli(&install, &env, &["update", "--check"]).await;
    assert!(
        ok && out.contains(&format!("version {new_version} is available")),
        "{out}"
    );
    assert!(
        same_bytes(&install.exe, &install.original),
        "--check changes nothing"
    );

    let (ok, _, out) = installed_cli(&install, &env, &["update"]).await;
    assert!(
        ok && out.contains(&format!("updated from {CURRENT} to {new_version}")),
        "{out}"
    );
    assert!(
        same_bytes(&install.exe, &new_binary),
        "the new executable is in place"
    );
    let previous = install.exe.with_file_name("estafeta.previous");
    assert!(
        same_bytes(&previous, &install.original),
        "the previous one is kept"
    );

    let (ok, version, out) = installed_cli(&install, &env, &["version"]).await;
    assert!(
        ok && version.trim() == format!("estafeta {new_version}"),
        "{out}"
    );
    let (ok, _, out) = installed_cli(&install, &env, &["update"]).await;
    assert!(ok && out.contains("is up to date"), "{out}");
    let (ok, out, _) = installed_cli(&install, &env, &["status", "--json"]).await;
    let status: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(ok, "{out}");
    assert_eq!(status["update"]["state"], "updated", "{}", status["update"]);
    assert_eq!(status["version"], new_version.as_str());
    eprintln!("self_update: `estafeta update` installed {new_version} over a stopped agent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn estafeta_update_asks_a_running_agent_without_update_crontab() {
    let install = install();
    let releases = ReleaseServer::start().await;
    let key = signing_key(1);
    let mut agent = Agent::spec(install.dir.path())
        .program(&install.exe, &["run"])
        .envs([
            ("UPDATE_URL", releases.url("manifest.json")),
            ("UPDATE_PUBLIC_KEY", public_key_base64(&key)),
            ("UPDATE_HEALTH_SECS", "30".to_owned()),
        ])
        .spawn();
    agent.wait_ready(Duration::from_secs(30)).await;
    let pid = agent.pid();
    let new_version = next_patch(CURRENT);
    let new_binary = restamp(&install.original, CURRENT, &new_version);
    let name = archive_name(&new_version);
    releases.publish_binary(
        &new_version,
        &name,
        signed_archive(&name, &[("estafeta", &new_binary, 0o755)], &key),
    );
    let mut env: Vec<(String, String)> = ["PATH", "HOME"]
        .into_iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_owned(), v)))
        .collect();
    env.extend([
        (
            "STAGING_AREA_PATH".to_owned(),
            install.dir.path().join("staging").display().to_string(),
        ),
        (
            "IS_ABSOLUTE_STAGING_AREA_PATH".to_owned(),
            "true".to_owned(),
        ),
        ("INGEST_ADDR".to_owned(), agent.addr().to_string()),
        ("UPDATE_URL".to_owned(), releases.url("manifest.json")),
        ("UPDATE_PUBLIC_KEY".to_owned(), public_key_base64(&key)),
    ]);
    let (ok, _, out) = installed_cli(&install, &env, &["update"]).await;
    assert!(ok && out.contains("is installing it now"), "{out}");
    let status = wait_for(&agent, Duration::from_secs(90), |s| {
        s["version"] == new_version.as_str() && s["update"]["state"] == "updated"
    })
    .await;
    assert_eq!(status["update"]["current"], new_version.as_str());
    assert_eq!(agent.pid(), pid, "the same process (exec)");
    assert!(same_bytes(&install.exe, &new_binary));
    eprintln!(
        "self_update: `estafeta update` asked the running agent, which installed {new_version}"
    );
}
