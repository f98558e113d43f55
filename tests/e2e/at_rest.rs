//! Encryption at rest (issue 23), through the real binary: with `STAGING_KEY_FILE` set (a key
//! made by `estafeta key generate`), a canary payload and record key are staged over HTTP,
//! delivered to the API (which receives them in clear), refused for good once (a dead letter
//! whose reason echoes the payload), requeued, delivered and cleaned up; a scan of every byte
//! under the staging folder, repeated all along, never finds them. `estafeta show` and
//! `estafeta ls` show them to whoever has the key. Without the key, or with another one, the
//! agent refuses to start, names the key it needs, and changes no file (checksums before and
//! after).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use estafeta_e2e::{Agent, FlakyHttpServer, log_tail, run_cli, sink_status, wait_status};
use reqwest::StatusCode;
use serde_json::json;

const OK_KEY: &str = "MRN-cnryRestOk-80412";
const OK_TEXT: &str = "cnryRestOk Maria Aparecida";
const DEAD_KEY: &str = "MRN-cnryRestDead-31977";
const DEAD_TEXT: &str = "cnryRestDead Joao Batista";
/// The unique part of each canary: what the scan looks for.
const NEEDLES: &[&str] = &["cnryRestOk", "cnryRestDead", OK_KEY, DEAD_KEY];

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// `grep -ra` of every canary under `dir`: the files that hold one, and which.
fn scan(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for path in files(dir) {
        // A file removed between the listing and the read (cleanup, a WAL checkpoint) is fine.
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        for needle in NEEDLES {
            if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                found.push(format!("{needle} in {}", path.display()));
            }
        }
    }
    found
}

/// Every file and folder under `dir` with the SHA-256 of its bytes, its length and its mode.
fn checksums(dir: &Path) -> BTreeMap<PathBuf, (Vec<u8>, u64, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                todo.push(path.clone());
                out.insert(path, (Vec::new(), 0, meta.permissions().mode()));
            } else {
                let bytes = std::fs::read(&path).unwrap();
                out.insert(
                    path,
                    (
                        <sha2::Sha256 as sha2::Digest>::digest(&bytes).to_vec(),
                        bytes.len() as u64,
                        meta.permissions().mode(),
                    ),
                );
            }
        }
    }
    out
}

fn output(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_staging_folder_never_holds_the_canary_and_is_left_untouched_without_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let staging = dir.path().join("staging");
    let keys_dir = dir.path().join("keys");
    std::fs::create_dir(&keys_dir).unwrap();
    let key_file = keys_dir.join("staging.key");
    let key_text = key_file.display().to_string();

    // estafeta key generate: a new 0600 file, never over an existing one.
    let made = run_cli(dir.path(), &[], &["key", "generate", &key_text]).await;
    assert!(made.status.success(), "{}", output(&made));
    let key_id = String::from_utf8_lossy(&made.stdout)
        .split_whitespace()
        .nth(2)
        .unwrap()
        .to_owned();
    assert!(key_id.starts_with("k-"), "{}", output(&made));
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let before = std::fs::read(&key_file).unwrap();
    let again = run_cli(dir.path(), &[], &["key", "generate", &key_text]).await;
    assert_eq!(again.status.code(), Some(2), "{}", output(&again));
    assert!(
        output(&again).contains("exists already"),
        "{}",
        output(&again)
    );
    assert_eq!(std::fs::read(&key_file).unwrap(), before);

    // The API refuses the dead canary's key for good, echoing the payload in its answer.
    let api = FlakyHttpServer::start_with_seed(23).await;
    api.respond_for(
        &format!("/patient/{DEAD_KEY}"),
        422,
        json!({"error": "refused", "echo": DEAD_TEXT, "key": DEAD_KEY}),
    );
    let url = api.url();
    let env = [
        ("CENTRAL_API_URL", url.as_str()),
        ("CENTRAL_API_TIMEOUT_SECS", "1"),
        ("CRONTAB", "* * * * * *"),
        ("RETRY_BASE_SECS", "1"),
        ("RETRY_MAX_SECS", "2"),
        ("STAGING_KEY_FILE", key_text.as_str()),
    ];

    // The scan runs all along, from before the first write to the end.
    let stop = Arc::new(AtomicBool::new(false));
    let scanner = {
        let (stop, staging) = (stop.clone(), staging.clone());
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut scans = 0u32;
            while !stop.load(Ordering::Relaxed) {
                seen.extend(scan(&staging));
                scans += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            (seen, scans)
        })
    };

    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;
    // An update goes to PUT /patient/<key>: the refused path.
    for (key, text) in [(OK_KEY, OK_TEXT), (DEAD_KEY, DEAD_TEXT)] {
        let (code, answer) = agent
            .post("update", "patient", &json!({"id": key, "nome": text}))
            .await;
        assert_eq!(
            code,
            StatusCode::ACCEPTED,
            "{answer}\n{}",
            log_tail(&agent, 30)
        );
    }
    let dead_seq = 2u64;
    wait_status(
        &agent,
        Duration::from_secs(20),
        "one record delivered and the other a dead letter",
        |s| sink_status(s, "api")["dead"] == 1 && s["records_pending"] == 1,
    )
    .await;
    // The API received the plain record.
    assert!(
        api.succeeded()
            .iter()
            .any(|r| r.json().to_string().contains(OK_TEXT)),
        "the API did not receive the plain record"
    );

    // Whoever has the key reads it: show by sequence number, the dead letter file, ls.
    let shown = run_cli(dir.path(), &env, &["show", &dead_seq.to_string()]).await;
    assert!(shown.status.success(), "{}", output(&shown));
    let text = output(&shown);
    assert!(
        text.contains(DEAD_TEXT) && text.contains(DEAD_KEY),
        "{text}"
    );
    let listed = run_cli(dir.path(), &env, &["ls", "--failed"]).await;
    assert!(listed.status.success(), "{}", output(&listed));
    assert!(output(&listed).contains(DEAD_KEY), "{}", output(&listed));
    let letter = files(&staging.join("_failed"))
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .expect("a dead-letter file");
    let shown = run_cli(dir.path(), &env, &["show", &letter.display().to_string()]).await;
    assert!(shown.status.success(), "{}", output(&shown));
    assert!(output(&shown).contains(DEAD_TEXT), "{}", output(&shown));
    assert!(output(&shown).contains("echo"), "{}", output(&shown));
    // `estafeta retry` opens sealed dead letters with the key (a listing: nothing changes).
    let retry = run_cli(dir.path(), &env, &["retry", "--verbose"]).await;
    assert!(retry.status.success(), "{}", output(&retry));
    assert!(
        output(&retry).contains(&format!("seq={dead_seq}")) && !output(&retry).contains("skipped"),
        "{}",
        output(&retry)
    );

    // The API is fixed; the dead letter is requeued, delivered and cleaned up.
    api.clear_status_for(&format!("/patient/{DEAD_KEY}"));
    let requeued = agent
        .client()
        .post(agent.url(&format!("/v1/dead-letters/api/{dead_seq}/requeue")))
        .header("X-Requested-By", "estafeta")
        .send()
        .await
        .unwrap();
    assert_eq!(requeued.status(), StatusCode::OK);
    wait_status(
        &agent,
        Duration::from_secs(20),
        "the requeued record delivered",
        |s| s["records_pending"] == 0 && sink_status(s, "api")["dead"] == 0,
    )
    .await;
    assert!(
        api.succeeded()
            .iter()
            .any(|r| r.json().to_string().contains(DEAD_TEXT)),
        "the API did not receive the requeued record"
    );
    // Cleanup: the daemon's segment closes when it stops; a flush then deletes it.
    agent.terminate();
    agent.wait(Duration::from_secs(15)).await;
    let flushed = run_cli(dir.path(), &env, &["flush"]).await;
    assert!(flushed.status.success(), "{}", output(&flushed));
    let segments: Vec<PathBuf> = files(&staging)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    assert!(segments.is_empty(), "not cleaned up: {segments:?}");
    agent.restart();
    agent.wait_ready(Duration::from_secs(20)).await;

    // Something left waiting, so the folder has a record to protect: the API is down.
    api.down().await;
    let (code, answer) = agent
        .post("update", "patient", &json!({"id": OK_KEY, "nome": OK_TEXT}))
        .await;
    assert_eq!(code, StatusCode::ACCEPTED, "{answer}");
    agent.terminate();
    agent.wait(Duration::from_secs(15)).await;

    stop.store(true, Ordering::Relaxed);
    let (seen, scans) = scanner.join().unwrap();
    assert!(scans > 10, "the scan ran only {scans} times");
    assert!(
        seen.is_empty(),
        "canaries in clear under the staging folder: {:?}",
        seen.into_iter().collect::<std::collections::BTreeSet<_>>()
    );

    let sealed = checksums(&staging);

    // Without the key: refused, naming the key, nothing changed.
    let mut plain_env: Vec<(&str, &str)> = env.to_vec();
    plain_env.retain(|(k, _)| *k != "STAGING_KEY_FILE");
    let mut keyless = Agent::start(dir.path(), &plain_env);
    let status = keyless.wait(Duration::from_secs(20)).await;
    assert!(
        !status.success(),
        "the agent started over a sealed folder without its key"
    );
    let stderr = keyless.stderr();
    assert!(stderr.contains(&key_id), "{stderr}");
    assert!(stderr.contains("STAGING_KEY_FILE"), "{stderr}");
    assert_eq!(
        checksums(&staging),
        sealed,
        "a start without the key changed the folder"
    );
    let ls = run_cli(dir.path(), &plain_env, &["ls"]).await;
    assert!(!ls.status.success(), "{}", output(&ls));
    assert_eq!(
        checksums(&staging),
        sealed,
        "`ls` without the key changed the folder"
    );

    // With another key: the same, an error and not "damage".
    let other = keys_dir.join("other.key");
    let made = run_cli(
        dir.path(),
        &[],
        &["key", "generate", &other.display().to_string()],
    )
    .await;
    assert!(made.status.success(), "{}", output(&made));
    let mut wrong_env = plain_env.clone();
    let other_text = other.display().to_string();
    wrong_env.push(("STAGING_KEY_FILE", other_text.as_str()));
    let mut wrong = Agent::start(dir.path(), &wrong_env);
    let status = wrong.wait(Duration::from_secs(20)).await;
    assert!(!status.success(), "the agent started with a wrong key");
    assert!(wrong.stderr().contains(&key_id), "{}", wrong.stderr());
    assert_eq!(
        checksums(&staging),
        sealed,
        "a start with a wrong key changed the folder"
    );
    assert!(!staging.join("_failed/_damaged").exists());

    // With the key it starts again, and the waiting record is still there to deliver.
    let mut back = Agent::start(dir.path(), &env);
    back.wait_ready(Duration::from_secs(20)).await;
    let shown = run_cli(dir.path(), &env, &["ls"]).await;
    assert!(output(&shown).contains(OK_KEY), "{}", output(&shown));
    assert!(scan(&staging).is_empty(), "{:?}", scan(&staging));
    back.terminate();
    back.wait(Duration::from_secs(15)).await;
}

/// `estafeta key rotate`: after a restart, new segments are sealed with the new key; the old
/// key stays in the file, and `estafeta key prune` keeps it while its records wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_seals_new_segments_and_the_old_one_stays_while_used() {
    let dir = tempfile::tempdir().unwrap();
    let staging = dir.path().join("staging");
    let key_file = dir.path().join("staging.key");
    let key_text = key_file.display().to_string();
    let made = run_cli(dir.path(), &[], &["key", "generate", &key_text]).await;
    assert!(made.status.success(), "{}", output(&made));
    let old = String::from_utf8_lossy(&made.stdout)
        .split_whitespace()
        .nth(2)
        .unwrap()
        .to_owned();
    // An API that refuses connections: the records wait, so the old key stays in use.
    let env = [
        ("STAGING_KEY_FILE", key_text.as_str()),
        ("CENTRAL_API_URL", "http://127.0.0.1:9"),
    ];
    let post_one = |n: u32| async move { json!({"id": format!("k{n}"), "n": n}) };
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;
    let (code, _) = agent.post("create", "patient", &post_one(1).await).await;
    assert_eq!(code, StatusCode::ACCEPTED);
    agent.terminate();
    agent.wait(Duration::from_secs(15)).await;

    let rotated = run_cli(dir.path(), &env, &["key", "rotate"]).await;
    assert!(rotated.status.success(), "{}", output(&rotated));
    let new = String::from_utf8_lossy(&rotated.stdout)
        .split_whitespace()
        .nth(2)
        .unwrap()
        .to_owned();
    assert_ne!(new, old);
    agent.restart();
    agent.wait_ready(Duration::from_secs(20)).await;
    let (code, _) = agent.post("create", "patient", &post_one(2).await).await;
    assert_eq!(code, StatusCode::ACCEPTED);
    agent.terminate();
    agent.wait(Duration::from_secs(15)).await;

    let kids: Vec<String> = files(&staging)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    assert!(
        kids.iter()
            .any(|l| l.contains(&format!("\"kid\":\"{old}\""))),
        "{kids:?}"
    );
    assert!(
        kids.iter()
            .any(|l| l.contains(&format!("\"kid\":\"{new}\""))),
        "{kids:?}"
    );
    let pruned = run_cli(dir.path(), &env, &["key", "prune"]).await;
    assert!(pruned.status.success(), "{}", output(&pruned));
    assert!(
        output(&pruned).contains("dropped: none"),
        "{}",
        output(&pruned)
    );
    let file = std::fs::read_to_string(&key_file).unwrap();
    assert!(file.contains(&old) && file.contains(&new), "{file}");
    // Both records read back with the rotated key file.
    let listed = run_cli(dir.path(), &env, &["ls"]).await;
    assert!(listed.status.success(), "{}", output(&listed));
    assert!(
        output(&listed).contains("k1") && output(&listed).contains("k2"),
        "{}",
        output(&listed)
    );
}
