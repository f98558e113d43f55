//! Contract 2 for other programs' files: the running agent adopts JSON files written straight
//! into its staging tree the way the RHP backend's `save_local_stage` wrote them
//! (`<action>/<entity>/<yyyy>/<mm>/<dd>/<timestamp>.json`, raw payload, no envelope), in
//! timestamp order, removes them, and delivers them like any posted record; a file that is not
//! JSON moves to `_failed/` beside the reason. And the same from a drop folder (`INBOX_PATH`):
//! 1,000 files written by a script that writes exactly as the seed's `save_local_stage` did,
//! while the agent runs, land once each in PostgreSQL, in write order per key.

use std::path::Path;
use std::time::Duration;

use estafeta_e2e::{
    Agent, FlakyHttpServer, PG_URL, log_tail, pg, status, unique_name, wait_drained,
};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Instant;

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_written_in_the_seed_layout_are_adopted_in_timestamp_order_and_delivered() {
    let server = FlakyHttpServer::start_with_seed(11).await;
    let dir = tempfile::tempdir().unwrap();
    let url = server.url();
    let env = [
        ("CENTRAL_API_URL", url.as_str()),
        ("CRONTAB", "* * * * * *"),
    ];
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;

    let day = dir.path().join("staging/create/patient/2026/11/23");
    // Written newest first, so adoption order can only come from the names' timestamps.
    let versions = [
        (
            "20261123101500000003.json",
            json!({"id": "p1", "nome": "Maria", "v": 3}),
        ),
        (
            "20261123101500000002.json",
            json!({"id": "p1", "nome": "Maria", "v": 2}),
        ),
        (
            "20261123101500000001.json",
            json!({"id": "p1", "nome": "Maria", "v": 1}),
        ),
    ];
    for (name, payload) in &versions {
        // json.dump's spacing, as the seed wrote it.
        write(
            &day.join(name),
            &serde_json::to_string_pretty(payload).unwrap(),
        );
    }
    let broken = day.join("20261123101500000004.json");
    write(&broken, r#"{"id": "p2", "nome": "#);

    let requests = server.wait_for_requests(3, Duration::from_secs(30)).await;
    let drained = wait_drained(&agent, Duration::from_secs(30)).await;
    let delivered: Vec<Value> = requests.iter().map(|r| r.json()).collect();
    assert_eq!(
        delivered,
        vec![
            versions[2].1.clone(),
            versions[1].1.clone(),
            versions[0].1.clone()
        ],
        "adopted in timestamp order and delivered as written; agent log:\n{}",
        log_tail(&agent, 40)
    );
    for r in &requests {
        assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/patient"));
    }
    let seqs: Vec<u64> = requests.iter().map(|r| r.seq().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "seqs {seqs:?}");

    // The adopted files are gone; the broken one waits in _failed with its parse error.
    for (name, _) in &versions {
        assert!(!day.join(name).exists(), "{name} should have been removed");
    }
    assert!(!broken.exists());
    let failed = dir
        .path()
        .join("staging/_failed/create/patient/2026/11/23/20261123101500000004.json");
    assert_eq!(
        std::fs::read_to_string(&failed).unwrap(),
        r#"{"id": "p2", "nome": "#,
        "the broken file is kept byte for byte"
    );
    let reason = std::fs::read_to_string(failed.with_extension("json.error.txt")).unwrap();
    assert!(reason.to_lowercase().contains("json"), "{reason}");
    assert_eq!(drained["records_pending"], 0, "{drained}");
    assert_eq!(status(&agent).await["sinks"][0]["dead"], 0);
    agent.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_files_dropped_in_the_inbox_land_once_each_in_write_order_per_key() {
    const FILES: usize = 1000;
    const KEYS: usize = 20;
    let agent_id = unique_name("inbox");
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    let env = [
        ("INBOX_PATH", "inbox"),
        ("CENTRAL_DATABASE_URL", PG_URL),
        ("AGENT_ID", agent_id.as_str()),
        ("CRONTAB", "* * * * * *"),
    ];
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/save_local_stage.py");
    let written = tokio::process::Command::new("python3")
        .arg(&script)
        .arg(&inbox)
        .arg(FILES.to_string())
        .arg(KEYS.to_string())
        .status()
        .await
        .expect("python3 runs the seed's writer");
    assert!(written.success(), "{} failed", script.display());

    let client = pg().await;
    let deadline = Instant::now() + Duration::from_secs(90);
    let rows = loop {
        let rows = client
            .query(
                "SELECT payload FROM estafeta_records WHERE agent_id = $1 ORDER BY id",
                &[&agent_id],
            )
            .await
            .unwrap_or_default();
        if rows.len() >= FILES || Instant::now() >= deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        rows.len(),
        FILES,
        "files landed; agent log:\n{}",
        log_tail(&agent, 40)
    );
    let mut per_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for row in &rows {
        let payload: Value = row.get(0);
        assert!(payload["nome"].as_str().unwrap().starts_with("Conceição "));
        per_key
            .entry(payload["id"].as_str().unwrap().to_owned())
            .or_default()
            .push(payload["n"].as_i64().unwrap());
    }
    assert_eq!(per_key.len(), KEYS);
    let mut all: Vec<i64> = per_key.values().flatten().copied().collect();
    all.sort_unstable();
    assert_eq!(
        all,
        (0..FILES as i64).collect::<Vec<_>>(),
        "each file exactly once"
    );
    for (key, ns) in &per_key {
        assert!(
            ns.windows(2).all(|w| w[0] < w[1]),
            "{key} landed out of write order: {ns:?}"
        );
    }
    // The inbox is emptied as files are adopted.
    let left = walk_files(&inbox);
    assert!(left.is_empty(), "files left in the inbox: {left:?}");
    agent.terminate();
}

fn walk_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk_files(&path));
        } else {
            out.push(path);
        }
    }
    out
}
