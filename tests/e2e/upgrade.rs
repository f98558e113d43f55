//! Restart and upgrade (contract 2, inspectable staging, across versions): a staging folder written
//! by an earlier build of this version (envelope `"v":1`, committed under
//! `tests/fixtures/staging-v1`, see its README) is opened by the current binary, and every record
//! it holds is delivered exactly once, with its original id, seq and payload, in per-key order.

use std::path::{Path, PathBuf};
use std::time::Duration;

use estafeta_e2e::{
    Agent, FlakyHttpServer, Staged, check_http_deliveries, json_lines, log_tail, wait_drained,
};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staging_folder_of_format_v1_is_delivered() {
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/staging-v1");
    let expected: Vec<Staged> = json_lines(&std::fs::read(fixture.join("expected.jsonl")).unwrap())
        .into_iter()
        .map(|v| Staged {
            id: v["id"].as_str().unwrap().to_owned(),
            seq: v["seq"].as_u64().unwrap(),
            action: v["action"].as_str().unwrap().to_owned(),
            entity: v["entity"].as_str().unwrap().to_owned(),
            key: v["key"].as_str().unwrap().to_owned(),
            payload: v["payload"].clone(),
            path: None,
        })
        .collect();
    assert_eq!(expected.len(), 10, "the fixture holds 10 records");
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture.join("staging"), &dir.path().join("staging"));

    let server = FlakyHttpServer::start_with_seed(8).await;
    let url = server.url();
    let env = [
        ("CENTRAL_API_URL", url.as_str()),
        ("CRONTAB", "* * * * * *"),
    ];
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;
    let drained = wait_drained(&agent, Duration::from_secs(30)).await;
    let report = check_http_deliveries(&server.requests(), &expected, true)
        .unwrap_or_else(|problems| panic!("{problems}\nagent log tail:\n{}", log_tail(&agent, 40)));
    assert_eq!(report.succeeded, 10, "{report:?}\n{drained}");
    // New records continue the fixture's sequence.
    let (code, body) = agent
        .post("create", "patient", &serde_json::json!({"id": "k9"}))
        .await;
    assert_eq!(code.as_u16(), 202, "{body}");
    assert!(body["seq"].as_u64().unwrap() > 10, "{body}");
    eprintln!("upgrade: 10 records of the v1 fixture delivered once each, in key order");
}
