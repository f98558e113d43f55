//! Self-update with rollback: the real binary, copied into a temporary install folder
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
//! - `estafeta update --check` and `estafeta update` run by hand over a stopped plain install;
//! - a malicious update server and a compromised service account (THREATS.md; contract 7, safe
//!   by default): an old signed archive offered as 99.0.0 (signed as an older version, or from
//!   before signed versions) is refused and never run; an older version installs only with
//!   `--allow-downgrade`; root, updating for a service user (uid 65534) who planted
//!   `_update -> victim`, leaves the victim as it was, and works only in a fresh 0700 folder of
//!   its own, never in that user's `_update`; clear-text http:// to another machine is refused
//!   until `UPDATE_ALLOW_HTTP=true`; an HTTPS release server with an internal CA works once
//!   `UPDATE_CA_FILE` names it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use estafeta_e2e::release::{previous_version, release_archive, test_certificates};
use estafeta_e2e::{
    Agent, FlakyHttpServer, ReleaseServer, estafeta_bin, free_port, log_tail, next_patch,
    public_key_base64, restamp, run_cli, sha256_hex, signed_archive, signing_key, wait_drained,
};
use serde_json::{Value, json};

const CURRENT: &str = env!("CARGO_PKG_VERSION");
const BACKLOG: usize = 12;

/// A temporary install: `<dir>/bin/estafeta`, a copy of the built binary. Every process the tests
/// start gets `TMPDIR=<dir>/tmp`, so root's working folders (`/var/lib/estafeta-update` by
/// default, see agent/src/update/workdir.rs) stay inside the test.
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
    std::fs::create_dir(dir.path().join("tmp")).unwrap();
    Install { dir, exe, original }
}

impl Install {
    /// `TMPDIR` for the processes of this install.
    fn tmpdir(&self) -> (String, String) {
        (
            "TMPDIR".to_owned(),
            self.dir.path().join("tmp").display().to_string(),
        )
    }
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
    env.push(install.tmpdir());
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
    let archive = release_archive(
        &name,
        &new_version,
        &[("estafeta", &new_binary, 0o755)],
        &key,
    );
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
            release_archive(
                &name,
                &new_version,
                &[("estafeta", &new_binary, 0o755)],
                &signer,
            ),
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
            release_archive(&name, &new_version, &[("estafeta", broken, 0o755)], &key),
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
            .envs([install.tmpdir()])
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
        release_archive(
            &name,
            &new_version,
            &[("estafeta", &new_binary, 0o755)],
            &key,
        ),
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
            ("TMPDIR", install.tmpdir().1),
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
        release_archive(
            &name,
            &new_version,
            &[("estafeta", &new_binary, 0o755)],
            &key,
        ),
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

/// The environment of `estafeta update` run by hand over `install` (no agent running): its
/// staging folder, a free port, the release server and the key.
fn cli_env(install: &Install, url: &str, key: &str) -> Vec<(String, String)> {
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
        (
            "INGEST_ADDR".to_owned(),
            format!("127.0.0.1:{}", free_port()),
        ),
        // A sink, so the trial (possibly another user) writes no central.db in the install.
        (
            "CENTRAL_API_URL".to_owned(),
            "http://127.0.0.1:9/api".to_owned(),
        ),
        ("UPDATE_URL".to_owned(), url.to_owned()),
        ("UPDATE_PUBLIC_KEY".to_owned(), key.to_owned()),
        ("UPDATE_HEALTH_SECS".to_owned(), "30".to_owned()),
    ]);
    env
}

fn set(env: &mut Vec<(String, String)>, key: &str, value: &str) {
    env.retain(|(k, _)| k != key);
    env.push((key.to_owned(), value.to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_signed_archive_offered_as_a_newer_version_is_refused() {
    // The release server is hostile: it offers a genuinely signed but old archive as 99.0.0. The
    // "old release" is a script that leaves a mark if it is ever run (as a trial, for example).
    let old_version = previous_version(CURRENT);
    for case in ["signed as an older version", "from before signed versions"] {
        let install = install();
        let releases = ReleaseServer::start().await;
        let key = signing_key(1);
        let (mut agent, sink) = start_with_backlog(
            &install,
            &releases,
            Some(&public_key_base64(&key)),
            "30",
            &[],
        )
        .await;
        let pid = agent.pid();
        let mark = install.dir.path().join("the-old-release-ran");
        let old = format!("#!/bin/sh\ntouch '{}'\nexec sleep 600\n", mark.display());
        let name = archive_name("99.0.0");
        let files = [("estafeta", old.as_bytes(), 0o755)];
        let archive = if case == "signed as an older version" {
            release_archive(&name, &old_version, &files, &key)
        } else {
            signed_archive(&name, &files, &key)
        };
        releases.publish_binary("99.0.0", &name, archive);
        let status = wait_for(&agent, Duration::from_secs(60), |s| {
            s["update"]["state"] == "refused"
        })
        .await;
        let message = status["update"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let why = if case == "signed as an older version" {
            format!("signed VERSION says {old_version}")
        } else {
            "holds no VERSION file".to_owned()
        };
        assert!(message.contains(&why), "{case}: {message}");
        assert_eq!(status["version"], CURRENT, "{case}");
        assert!(!mark.exists(), "{case}: the old release never ran");
        assert!(
            same_bytes(&install.exe, &install.original),
            "{case}: nothing installed"
        );
        assert!(agent.try_wait().is_none(), "{case}: still running");
        assert_eq!(agent.pid(), pid, "{case}");
        // Automatic checks do not download the refused archive again.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(releases.served(&name), 1, "{case}: downloaded once");
        assert_eq!(
            status_of(&agent).await["update"]["state"],
            "refused",
            "{case}"
        );
        backlog_delivered(&agent, &sink).await;
        eprintln!("self_update: an old archive {case}, offered as 99.0.0: refused ({message})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_signed_version_installs_only_with_allow_downgrade() {
    let install = install();
    let releases = ReleaseServer::start().await;
    let key = signing_key(1);
    let older = previous_version(CURRENT);
    let older_binary = restamp(&install.original, CURRENT, &older);
    let name = archive_name(&older);
    releases.publish_binary(
        &older,
        &name,
        release_archive(&name, &older, &[("estafeta", &older_binary, 0o755)], &key),
    );
    let env = cli_env(
        &install,
        &releases.url("manifest.json"),
        &public_key_base64(&key),
    );
    let (ok, _, out) = installed_cli(&install, &env, &["update"]).await;
    assert!(
        ok && out.contains(&format!("is up to date (the manifest offers {older})")),
        "{out}"
    );
    assert!(
        same_bytes(&install.exe, &install.original),
        "no downgrade without the flag"
    );
    assert_eq!(releases.served(&name), 0, "not even downloaded");

    let (ok, _, out) = installed_cli(&install, &env, &["update", "--allow-downgrade"]).await;
    assert!(
        ok && out.contains(&format!("updated from {CURRENT} to {older}")),
        "{out}"
    );
    assert!(
        same_bytes(&install.exe, &older_binary),
        "the older one in place"
    );
    let (ok, version, out) = installed_cli(&install, &env, &["version"]).await;
    assert!(ok && version.trim() == format!("estafeta {older}"), "{out}");
    eprintln!("self_update: {CURRENT} -> {older} only with --allow-downgrade");
}

/// A plain install that root updates by hand while its staging folder belongs to the service
/// user (uid 65534 here): `<dir>/staging`, 0700, owned by 65534; the install readable by all so
/// the trial can run as that user.
fn install_with_service_staging() -> Install {
    use std::os::unix::fs::PermissionsExt as _;
    assert!(
        is_root(),
        "this test plays root and a service user: run it as root"
    );
    let install = install();
    for dir in [install.dir.path(), install.exe.parent().unwrap()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let staging = install.dir.path().join("staging");
    std::fs::create_dir(&staging).unwrap();
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&staging, Some(65534), Some(65534)).unwrap();
    install
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// (uid, gid, mode) of `path`, not following a link.
fn owner_and_mode(path: &Path) -> (u32, u32, u32) {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::symlink_metadata(path).unwrap();
    (meta.uid(), meta.gid(), meta.mode() & 0o7777)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_follows_no_link_the_service_user_planted_as_update() {
    use std::os::unix::fs::PermissionsExt as _;
    let install = install_with_service_staging();
    let releases = ReleaseServer::start().await;
    let key = signing_key(1);
    let new_version = next_patch(CURRENT);
    let new_binary = restamp(&install.original, CURRENT, &new_version);
    let name = archive_name(&new_version);
    releases.publish_binary(
        &new_version,
        &name,
        release_archive(
            &name,
            &new_version,
            &[("estafeta", &new_binary, 0o755)],
            &key,
        ),
    );
    // The service user plants `_update -> victim`, a folder of root's (think /etc/cron.d).
    let victim = install.dir.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o755)).unwrap();
    let planted = install.dir.path().join("staging/_update");
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    std::os::unix::fs::lchown(&planted, Some(65534), Some(65534)).unwrap();
    let env = cli_env(
        &install,
        &releases.url("manifest.json"),
        &public_key_base64(&key),
    );
    let untouched = |when: &str| {
        assert_eq!(
            owner_and_mode(&victim),
            (0, 0, 0o755),
            "{when}: the victim's owner and mode"
        );
        let entries: Vec<_> = std::fs::read_dir(&victim).unwrap().flatten().collect();
        assert!(
            entries.is_empty(),
            "{when}: nothing written into the victim: {entries:?}"
        );
        assert!(
            std::fs::symlink_metadata(&planted).unwrap().is_symlink(),
            "{when}"
        );
    };

    let (ok, _, out) = installed_cli(&install, &env, &["update", "--check"]).await;
    untouched("update --check");
    assert!(
        ok && out.contains(&format!("version {new_version} is available")),
        "{out}"
    );
    assert!(
        out.contains("symbolic link"),
        "the state could not be saved, and it says why: {out}"
    );

    let (ok, _, out) = installed_cli(&install, &env, &["update"]).await;
    assert!(
        ok && out.contains(&format!("updated from {CURRENT} to {new_version}")),
        "{out}"
    );
    assert!(same_bytes(&install.exe, &new_binary), "{out}");
    untouched("update");
    eprintln!("self_update: root followed no planted _update link; the victim is untouched");
}

/// Paths seen, with their (uid, gid, mode) when first seen.
type Seen = std::collections::BTreeMap<PathBuf, (u32, u32, u32)>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_downloads_and_unpacks_only_in_a_private_folder_of_its_own() {
    use std::os::unix::fs::PermissionsExt as _;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let install = install_with_service_staging();
    let staging = install.dir.path().join("staging");
    // The service user's own `_update` (where its downloads and state go).
    let update_dir = staging.join("_update");
    std::fs::create_dir(&update_dir).unwrap();
    std::fs::set_permissions(&update_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&update_dir, Some(65534), Some(65534)).unwrap();
    let releases = ReleaseServer::start().await;
    let key = signing_key(1);
    let new_version = next_patch(CURRENT);
    let new_binary = restamp(&install.original, CURRENT, &new_version);
    let name = archive_name(&new_version);
    releases.publish_binary(
        &new_version,
        &name,
        release_archive(
            &name,
            &new_version,
            &[("estafeta", &new_binary, 0o755)],
            &key,
        ),
    );
    // root's temporary folder, watched while the update runs.
    let tmp = tempfile::Builder::new()
        .prefix("estafeta-e2e-roottmp-")
        .tempdir()
        .unwrap();
    let mut env = cli_env(
        &install,
        &releases.url("manifest.json"),
        &public_key_base64(&key),
    );
    set(&mut env, "TMPDIR", &tmp.path().display().to_string());

    // Everything that appears, while the update runs, in root's temporary folder and in the
    // service user's `_update` (who could rename, replace or link anything there).
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (seen, done) = (seen.clone(), done.clone());
        let roots = [tmp.path().to_owned(), update_dir.clone()];
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                for root in &roots {
                    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
                        let path = entry.path();
                        if let Ok(meta) = std::fs::symlink_metadata(&path) {
                            use std::os::unix::fs::MetadataExt as _;
                            seen.lock().unwrap().entry(path).or_insert((
                                meta.uid(),
                                meta.gid(),
                                meta.mode(),
                            ));
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let (ok, _, out) = installed_cli(&install, &env, &["update"]).await;
    done.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    assert!(
        ok && out.contains(&format!("updated from {CURRENT} to {new_version}")),
        "{out}"
    );
    assert!(
        same_bytes(&install.exe, &new_binary),
        "the verified bytes are the installed ones"
    );

    let seen = seen.lock().unwrap().clone();
    let private: Vec<_> = seen
        .iter()
        .filter(|(p, _)| p.starts_with(tmp.path()))
        .collect();
    assert!(
        !private.is_empty(),
        "root worked in its temporary folder {}: {seen:?}",
        tmp.path().display()
    );
    for (path, (uid, _, mode)) in &private {
        let name = path.file_name().unwrap().to_string_lossy();
        assert!(
            name.starts_with("estafeta-update-") && *uid == 0 && mode & 0o170777 == 0o040700,
            "root's working folder is a 0700 folder of root's: {} uid {uid} mode {mode:o}",
            path.display()
        );
    }
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "root's working folder is removed"
    );
    for path in seen.keys().filter(|p| p.starts_with(&update_dir)) {
        let name = path.file_name().unwrap().to_string_lossy();
        assert!(
            name == "state.json" || (name.starts_with(".state.json.") && name.ends_with(".tmp")),
            "root downloads, verifies and unpacks nothing in the service user's _update: {}",
            path.display()
        );
    }
    assert_eq!(
        owner_and_mode(&update_dir.join("state.json")),
        (65534, 65534, 0o600),
        "the state root wrote is the service user's"
    );
    eprintln!(
        "self_update: root worked only in {} (0700), nothing of it in the service user's _update",
        private[0].0.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_text_to_another_machine_needs_update_allow_http() {
    let install = install();
    let releases = ReleaseServer::start().await;
    let key = signing_key(1);
    let new_version = next_patch(CURRENT);
    let name = archive_name(&new_version);
    let new_binary = restamp(&install.original, CURRENT, &new_version);
    releases.publish_binary(
        &new_version,
        &name,
        release_archive(
            &name,
            &new_version,
            &[("estafeta", &new_binary, 0o755)],
            &key,
        ),
    );
    // 0.0.0.0 is not a loopback address, yet on Linux a connection to it reaches this machine:
    // a stand-in for a server across the network.
    let url = releases
        .url("manifest.json")
        .replace("127.0.0.1", "0.0.0.0");
    let mut env = cli_env(&install, &url, &public_key_base64(&key));
    let (ok, _, out) = installed_cli(&install, &env, &["update", "--check"]).await;
    assert!(!ok, "clear text to another machine is refused: {out}");
    assert!(
        out.contains("clear-text http://") && out.contains("UPDATE_ALLOW_HTTP=true"),
        "{out}"
    );
    assert_eq!(
        releases.served("manifest.json"),
        0,
        "refused before any request"
    );
    let (ok, out, _) = installed_cli(&install, &env, &["status", "--json"]).await;
    let status: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(ok, "{out}");
    assert_eq!(status["update"]["state"], "failed");
    assert!(
        status["update"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("UPDATE_ALLOW_HTTP")),
        "{}",
        status["update"]
    );

    set(&mut env, "UPDATE_ALLOW_HTTP", "true");
    let (ok, _, out) = installed_cli(&install, &env, &["update", "--check"]).await;
    assert!(
        ok && out.contains(&format!("version {new_version} is available")),
        "{out}"
    );
    assert_eq!(releases.served("manifest.json"), 1);
    eprintln!("self_update: http:// to another machine refused until UPDATE_ALLOW_HTTP=true");
}

/// A static HTTPS server (Python) over a folder, with `server.pem` / `server.key` from its
/// working folder; prints READY, then one line per request, under a lock (`print` writes each
/// argument separately, so two requests answered at once could mix their words on one line).
const HTTPS_FILES: &str = r#"
import functools, http.server, ssl, sys, threading
OUT = threading.Lock()
class H(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        with OUT:
            print("REQUEST", self.path, flush=True)
s = http.server.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), functools.partial(H, directory=sys.argv[2]))
c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
c.load_cert_chain('server.pem', 'server.key')
s.socket = c.wrap_socket(s.socket, server_side=True)
print("READY", flush=True)
s.serve_forever()
"#;

struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_release_server_with_an_internal_ca_is_trusted_through_update_ca_file() {
    let install = install();
    let certs = tempfile::tempdir().unwrap();
    test_certificates(certs.path());
    let files = certs.path().join("releases");
    std::fs::create_dir(&files).unwrap();
    let key = signing_key(1);
    let new_version = next_patch(CURRENT);
    let name = archive_name(&new_version);
    let new_binary = restamp(&install.original, CURRENT, &new_version);
    let archive = release_archive(
        &name,
        &new_version,
        &[("estafeta", &new_binary, 0o755)],
        &key,
    );
    let manifest = json!({
        "version": new_version,
        "assets": [{"target": estafeta_e2e::host_target(), "kind": "binary", "url": name,
                    "sha256": sha256_hex(&archive)}],
    });
    std::fs::write(files.join(&name), &archive).unwrap();
    std::fs::write(files.join("manifest.json"), manifest.to_string()).unwrap();
    std::fs::write(certs.path().join("server.py"), HTTPS_FILES).unwrap();
    let port = free_port();
    let log = certs.path().join("server.log");
    let _server = Child(
        std::process::Command::new("python3")
            .args(["server.py", &port.to_string()])
            .arg(&files)
            .current_dir(certs.path())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("this test needs python3"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("READY")
    {
        assert!(Instant::now() < deadline, "the HTTPS server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = format!("https://127.0.0.1:{port}/manifest.json");
    let mut env = cli_env(&install, &url, &public_key_base64(&key));
    let (ok, _, out) = installed_cli(&install, &env, &["update", "--check"]).await;
    assert!(!ok, "a certificate from an unknown CA is refused: {out}");
    assert!(
        out.to_lowercase().contains("certificate") || out.contains("UnknownIssuer"),
        "{out}"
    );

    set(
        &mut env,
        "UPDATE_CA_FILE",
        &certs.path().join("ca.pem").display().to_string(),
    );
    let (ok, _, out) = installed_cli(&install, &env, &["update", "--check"]).await;
    assert!(
        ok && out.contains(&format!("version {new_version} is available")),
        "{out}"
    );
    let (ok, _, out) = installed_cli(&install, &env, &["update"]).await;
    assert!(
        ok && out.contains(&format!("updated from {CURRENT} to {new_version}")),
        "{out}"
    );
    assert!(same_bytes(&install.exe, &new_binary));
    let served = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        served.contains(&format!("REQUEST /{name}")),
        "downloaded over https: {served}"
    );
    eprintln!("self_update: an HTTPS release server trusted through UPDATE_CA_FILE");
}
