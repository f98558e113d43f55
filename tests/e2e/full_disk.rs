//! A full disk (contract 6: 507 and nothing acknowledged lost; contract 1, durable before
//! acknowledged), on a real small filesystem: the staging folder is an 8 MiB tmpfs this test mounts
//! (it needs root or CAP_SYS_ADMIN, and fails saying so otherwise). With the central API down,
//! records are posted until intake answers `507 staging_full` with a JSON message and
//! `Retry-After`; while blocked, `/v1/status` says why (`staging_blocked`) and `/readyz` answers
//! 503, and further posts stage nothing. When the API comes back, every record acknowledged before
//! is delivered exactly once in per-key order, delivery deletes the delivered segment files (the
//! filesystem's free space grows back), and intake answers 202 again by itself, with the 507
//! answers still counted in the status.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use estafeta_e2e::{
    Agent, FlakyHttpServer, Staged, check_http_deliveries, log_tail, record_files, status,
    wait_drained, wait_status,
};
use serde_json::{Value, json};

/// A tmpfs mounted for the test; unmounted when dropped, even while panicking.
struct TmpfsMount {
    path: PathBuf,
}

impl TmpfsMount {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it) on `path`.
    ///
    /// # Panics
    /// When `mount` fails, saying that the test needs root or CAP_SYS_ADMIN.
    fn mount(path: &Path, size: &str) -> TmpfsMount {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(path)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run mount(8) ({e}): this test needs util-linux's mount, root or CAP_SYS_ADMIN")
            });
        assert!(
            out.status.success(),
            "mount -t tmpfs on {} failed ({}): {}\nthis test mounts a small tmpfs for staging and needs root or CAP_SYS_ADMIN",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        TmpfsMount {
            path: path.to_owned(),
        }
    }

    /// Free bytes of the filesystem (statvfs).
    fn free_bytes(&self) -> u64 {
        let out = Command::new("stat")
            .args(["-f", "-c", "%a %S"])
            .arg(&self.path)
            .output()
            .expect("stat -f");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut it = text.split_whitespace().map(|n| n.parse::<u64>().unwrap());
        it.next().unwrap() * it.next().unwrap()
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Busy (a process still holds a file): detach it now, the kernel frees it later.
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// About 16 KiB of text, so that a few hundred records fill the filesystem.
fn payload(n: usize) -> Value {
    json!({
        "id": format!("k{:02}", n % 20),
        "n": n,
        "notes": format!("{n:06}-").repeat(2_300),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_507_loses_nothing_and_resumes_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let staging = dir.path().join("staging");
    // Declared before the agent: dropped (unmounted) after the agent is killed.
    let mount = TmpfsMount::mount(&staging, "8m");
    let free_at_start = mount.free_bytes();
    assert!(
        free_at_start > 7 << 20,
        "an empty 8 MiB tmpfs: {free_at_start}"
    );

    let server = FlakyHttpServer::start_with_seed(4).await;
    server.down().await;
    let url = server.url();
    let min_free = (3u64 << 20).to_string();
    let env = [
        ("CENTRAL_API_URL", url.as_str()),
        ("CENTRAL_API_TIMEOUT_SECS", "1"),
        ("CRONTAB", "* * * * * *"),
        ("RETRY_BASE_SECS", "1"),
        ("RETRY_MAX_SECS", "2"),
        ("STAGING_MIN_FREE_BYTES", min_free.as_str()),
    ];
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;
    let client = agent.client().clone();
    let records_url = agent.url("/v1/records/create/patient");

    // Post until the disk is full. Each 202 is a record the agent owes the API.
    let mut staged: Vec<Staged> = Vec::new();
    let mut full: Option<(Value, Option<String>)> = None;
    for n in 0..2_000 {
        let body = payload(n);
        let answer = client
            .post(&records_url)
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("post {n}: {e}\n{}", log_tail(&agent, 40)));
        let code = answer.status().as_u16();
        let retry_after = answer
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let answer: Value = answer.json().await.unwrap();
        match code {
            202 => staged.push(Staged {
                id: answer["id"].as_str().unwrap().to_owned(),
                seq: answer["seq"].as_u64().unwrap(),
                action: "create".into(),
                entity: "patient".into(),
                key: body["id"].as_str().unwrap().to_owned(),
                payload: body,
                path: None,
            }),
            507 => {
                full = Some((answer, retry_after));
                break;
            }
            other => panic!(
                "post {n} answered {other} before the disk was full: {answer}\n{}",
                log_tail(&agent, 40)
            ),
        }
    }
    let (answer, retry_after) = full.unwrap_or_else(|| {
        panic!(
            "2,000 records of 16 KiB never filled an 8 MiB tmpfs: no 507 (free now {} bytes)",
            mount.free_bytes()
        )
    });
    assert!(
        staged.len() >= 50,
        "only {} records before 507: the limit should be the disk",
        staged.len()
    );
    assert_eq!(answer["error"], "staging_full", "{answer}");
    let message = answer["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("free") && message.contains("safe") && message.contains("resumes"),
        "the message says the disk is short of space, staged records are safe and staging resumes: {message}"
    );
    assert_eq!(retry_after.as_deref(), Some("5"), "507 carries Retry-After");
    let acknowledged = staged.len();
    eprintln!(
        "full disk: 507 after {acknowledged} records; {} bytes free of {free_at_start}",
        mount.free_bytes()
    );

    // While blocked: status says why, /readyz is 503, more posts stage nothing.
    let blocked = status(&agent).await;
    let reason = blocked["staging_blocked"].as_str().unwrap_or_else(|| {
        panic!("status must say staging is blocked: {blocked}");
    });
    assert!(reason.contains("free"), "{reason}");
    assert_eq!(blocked["records_pending"], acknowledged, "{blocked}");
    let ready = client.get(agent.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 503, "/readyz while full");
    for n in 0..5 {
        let answer = client
            .post(&records_url)
            .json(&payload(10_000 + n))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status().as_u16(), 507, "still full");
    }
    let still = status(&agent).await;
    assert_eq!(still["records_pending"], acknowledged, "{still}");
    assert_eq!(still["ingest"]["records_staged"], acknowledged, "{still}");
    assert!(server.requests().is_empty(), "the API was down");
    let free_when_full = mount.free_bytes();

    // The API comes back: everything acknowledged is delivered, exactly once, in key order.
    server.up().await;
    wait_drained(&agent, Duration::from_secs(120)).await;
    let report = check_http_deliveries(&server.requests(), &staged, true)
        .unwrap_or_else(|problems| panic!("{problems}\nagent log tail:\n{}", log_tail(&agent, 60)));
    assert_eq!(report.succeeded, acknowledged, "{report:?}");

    // Delivery frees space: the delivered segment files are deleted.
    let freed = wait_status(
        &agent,
        Duration::from_secs(30),
        "delivered segments to be deleted",
        |s| {
            s["bytes_staged"].as_u64().is_some_and(|b| b < 1 << 20)
                && s["staging_blocked"].is_null()
        },
    )
    .await;
    let free_after = mount.free_bytes();
    let du = Command::new("du")
        .arg("-ab")
        .arg(&staging)
        .output()
        .unwrap();
    eprintln!(
        "full disk: after delivery:\n{}",
        String::from_utf8_lossy(&du.stdout)
    );
    assert!(
        free_after > free_when_full + (1 << 20),
        "delivery should give the space back: {free_when_full} bytes free when full, {free_after} after\n{freed}"
    );

    // Intake resumes by itself (no restart, no command).
    let deadline = Instant::now() + Duration::from_secs(30);
    let resumed = loop {
        let body = payload(20_000);
        let answer = client.post(&records_url).json(&body).send().await.unwrap();
        let code = answer.status().as_u16();
        let answer: Value = answer.json().await.unwrap();
        if code == 202 {
            break Staged {
                id: answer["id"].as_str().unwrap().to_owned(),
                seq: answer["seq"].as_u64().unwrap(),
                action: "create".into(),
                entity: "patient".into(),
                key: body["id"].as_str().unwrap().to_owned(),
                payload: body,
                path: None,
            };
        }
        assert_eq!(code, 507, "{answer}");
        assert!(
            Instant::now() < deadline,
            "intake still answers 507 30 s after delivery freed {} bytes: {answer}",
            free_after
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    staged.push(resumed);
    let after = status(&agent).await;
    assert!(after["staging_blocked"].is_null(), "{after}");
    let refusals = after["ingest"]["requests"]["507"].as_u64().unwrap_or(0);
    assert!(
        refusals >= 6,
        "the status keeps count of the 507 answers: {after}"
    );
    let ready = client.get(agent.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 200, "/readyz after resuming");
    wait_drained(&agent, Duration::from_secs(30)).await;
    check_http_deliveries(&server.requests(), &staged, true)
        .unwrap_or_else(|problems| panic!("{problems}\nagent log tail:\n{}", log_tail(&agent, 60)));
    assert!(
        !log_tail(&agent, 400).contains("panicked"),
        "{}",
        log_tail(&agent, 60)
    );
    let files = record_files(&staging);
    eprintln!(
        "full disk: {acknowledged} acknowledged before 507, {} answers 507, all delivered once; {} files left, {free_after} bytes free after delivery",
        refusals,
        files.len()
    );
    drop(agent);
    drop(mount);
}

/// The same with no free-space margin (`STAGING_MIN_FREE_BYTES=0`) on a 4 MiB tmpfs: the disk
/// really runs out (ENOSPC in the segment or the SQLite index). The first refused write answers
/// a JSON error (`507 staging_full`, or `503 staging_stopped` when a write failed), never a 202,
/// and the agent keeps running. This documents a limit found here: on a disk that is really
/// full, the agent can neither deliver (marking a record delivered needs index space) nor
/// restart (opening the index needs space). So the test plays the operator and frees space
/// (remounts the tmpfs at 16 MiB), restarts the agent, and checks that every record acknowledged
/// before is delivered and intake answers 202 again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_really_runs_out_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let staging = dir.path().join("staging");
    let mount = TmpfsMount::mount(&staging, "4m");
    let server = FlakyHttpServer::start_with_seed(14).await;
    server.down().await;
    let url = server.url();
    let env = [
        ("CENTRAL_API_URL", url.as_str()),
        ("CENTRAL_API_TIMEOUT_SECS", "1"),
        ("CRONTAB", "* * * * * *"),
        ("RETRY_BASE_SECS", "1"),
        ("RETRY_MAX_SECS", "2"),
        ("STAGING_MIN_FREE_BYTES", "0"),
    ];
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;
    let client = agent.client().clone();
    let records_url = agent.url("/v1/records/create/patient");
    let mut staged: Vec<Staged> = Vec::new();
    let mut refusal = None;
    for n in 0..2_000 {
        let body = payload(n);
        let answer = client.post(&records_url).json(&body).send().await.unwrap();
        let code = answer.status().as_u16();
        let answer: Value = answer.json().await.unwrap_or(Value::Null);
        if code == 202 {
            staged.push(Staged {
                id: answer["id"].as_str().unwrap().to_owned(),
                seq: answer["seq"].as_u64().unwrap(),
                action: "create".into(),
                entity: "patient".into(),
                key: body["id"].as_str().unwrap().to_owned(),
                payload: body,
                path: None,
            });
        } else {
            refusal = Some((code, answer));
            break;
        }
    }
    let (code, answer) = refusal.expect("2,000 records of 16 KiB never filled a 4 MiB tmpfs");
    eprintln!(
        "ENOSPC: {} acknowledged, then {code} {answer}; {} bytes free",
        staged.len(),
        mount.free_bytes()
    );
    assert!(
        (code == 507 && answer["error"] == "staging_full")
            || (code == 503 && answer["error"] == "staging_stopped"),
        "a full disk answers 507 staging_full or 503 staging_stopped, got {code}: {answer}"
    );
    assert!(answer["message"].is_string(), "{answer}");
    for n in 0..3 {
        let again = client
            .post(&records_url)
            .json(&payload(5_000 + n))
            .send()
            .await
            .unwrap();
        assert_ne!(again.status().as_u16(), 202, "still no room");
    }
    assert!(agent.try_wait().is_none(), "the agent still runs");
    let before = status(&agent).await;
    assert_eq!(before["records_pending"], staged.len(), "{before}");

    // The operator frees space; the agent is restarted as the README says for staging_stopped.
    server.up().await;
    let out = Command::new("mount")
        .args(["-o", "remount,size=16m"])
        .arg(&staging)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent.restart();
    agent.wait_ready(Duration::from_secs(20)).await;
    wait_drained(&agent, Duration::from_secs(60)).await;
    let report = check_http_deliveries(&server.requests(), &staged, false)
        .unwrap_or_else(|problems| panic!("{problems}\nagent log tail:\n{}", log_tail(&agent, 60)));
    let answer = client
        .post(&records_url)
        .json(&payload(9_999))
        .send()
        .await
        .unwrap();
    assert_eq!(
        answer.status().as_u16(),
        202,
        "intake after space was freed"
    );
    eprintln!(
        "ENOSPC: {} acknowledged records all delivered after space was freed; {report:?}",
        staged.len()
    );
    drop(agent);
    drop(mount);
}
