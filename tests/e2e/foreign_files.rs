//! Contract 2 for other programs' files: the running agent adopts JSON files written straight
//! into its staging tree the way the RHP backend's `save_local_stage` wrote them
//! (`<action>/<entity>/<yyyy>/<mm>/<dd>/<timestamp>.json`, raw payload, no envelope), in
//! timestamp order, removes them, and delivers them like any posted record; a file that is not
//! JSON moves to `_failed/` beside the reason.

use std::path::Path;
use std::time::Duration;

use estafeta_e2e::{Agent, FlakyHttpServer, log_tail, status, wait_drained};
use serde_json::{Value, json};

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
