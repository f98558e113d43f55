//! Proves contracts 2 and 5 through a central outage, as the README's worked example tells it:
//! with the central API refusing connections, 100 posted records pile up in the staging folder,
//! `estafeta ls --json` (run beside the daemon) lists them as pending and `cat` on the file a
//! 202 answer named shows each record as JSON; once the API is back on the same port, the next
//! tick drains them, each delivered exactly once.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use estafeta_e2e::{
    Agent, FlakyHttpServer, check_http_deliveries, json_lines, log_tail, mixed_plan, post_plan,
    run_cli, sink_status, status, wait_drained, wait_status,
};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_pile_up_while_the_api_is_down_and_drain_on_the_next_tick() {
    let server = FlakyHttpServer::start_with_seed(3).await;
    server.down().await;
    let dir = tempfile::tempdir().unwrap();
    let url = server.url();
    let env = [
        ("CENTRAL_API_URL", url.as_str()),
        ("CENTRAL_API_TIMEOUT_SECS", "1"),
        ("CRONTAB", "* * * * * *"),
        ("RETRY_BASE_SECS", "1"),
        ("RETRY_MAX_SECS", "2"),
    ];
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;

    // 100 records over 10 keys: 10 per key, singles and arrays.
    let plan = mixed_plan(10, 10, 42);
    let staged = post_plan(&agent, "patient", &plan, 8, 5).await;
    assert_eq!(staged.len(), 100);

    // They pile up: the agent tried (connection refused) and keeps them pending.
    let piled = wait_status(
        &agent,
        Duration::from_secs(10),
        "a failed attempt to reach the API",
        |s| sink_status(s, "api")["last_error"].is_string(),
    )
    .await;
    let api = sink_status(&piled, "api");
    assert_eq!(piled["records_pending"], 100, "{piled}");
    assert_eq!(
        api["pending"].as_u64().unwrap() + api["in_flight"].as_u64().unwrap(),
        100
    );
    let error = api["last_error"].as_str().unwrap();
    assert!(
        error.to_lowercase().contains("connect"),
        "the status should say the API cannot be reached: {error}"
    );

    // `estafeta ls --json` beside the running daemon lists all 100 as pending.
    let out = run_cli(dir.path(), &env, &["ls", "--json"]).await;
    assert!(
        out.status.success(),
        "estafeta ls --json failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = json_lines(&out.stdout);
    let listed_ids: BTreeSet<&str> = listed.iter().filter_map(|l| l["id"].as_str()).collect();
    let staged_ids: BTreeSet<&str> = staged.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(
        listed_ids, staged_ids,
        "ls --json lists exactly the posted records"
    );
    for line in &listed {
        assert_eq!(line["state"], "pending", "{line}");
        assert_eq!(line["entity"], "patient", "{line}");
        let s = staged.iter().find(|s| s.id == line["id"]).unwrap();
        assert_eq!(line["seq"], s.seq, "{line}");
        assert_eq!(line["action"], s.action.as_str(), "{line}");
        assert_eq!(line["key"], s.key.as_str(), "{line}");
        let path = line["path"].as_str().expect("ls gives the file");
        assert!(
            std::path::Path::new(path).starts_with(dir.path().join("staging")),
            "{path} is under the staging folder"
        );
    }
    assert!(
        listed.iter().any(|l| l["attempts"].as_u64() >= Some(1)),
        "the failed attempts show in ls: {listed:?}"
    );

    // `cat` on the file each single-record 202 named shows that record, payload included.
    let singles: Vec<_> = staged.iter().filter(|s| s.path.is_some()).collect();
    assert!(!singles.is_empty());
    for s in &singles {
        let path = s.path.as_ref().unwrap();
        let cat = std::process::Command::new("cat")
            .arg(path)
            .output()
            .unwrap();
        assert!(cat.status.success(), "cat {}", path.display());
        let lines = json_lines(&cat.stdout);
        let record = lines
            .iter()
            .find(|l| l["id"] == s.id.as_str())
            .unwrap_or_else(|| panic!("cat {} does not show record {}", path.display(), s.id));
        assert_eq!(record["seq"], s.seq);
        assert_eq!(record["action"], s.action.as_str());
        assert_eq!(record["key"], s.key.as_str());
        assert_eq!(record["payload"], s.payload, "cat {}", path.display());
    }
    assert!(server.requests().is_empty(), "the API was down");

    // The API comes back on the same port; the next tick drains everything.
    server.up().await;
    let up = Instant::now();
    let drained = wait_drained(&agent, Duration::from_secs(15)).await;
    let took = up.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "the pile should drain within a tick or two of the API coming back (retry delays are at most 2 s), took {took:?}\n{drained}"
    );
    let report = check_http_deliveries(&server.requests(), &staged, true)
        .unwrap_or_else(|problems| panic!("{problems}\nagent log tail:\n{}", log_tail(&agent, 60)));
    assert_eq!(report.requests, 100, "one request per record: {report:?}");
    let after = status(&agent).await;
    assert!(
        sink_status(&after, "api")["last_success_at"].is_string(),
        "{after}"
    );
    let out = run_cli(dir.path(), &env, &["ls", "--json"]).await;
    assert_eq!(
        json_lines(&out.stdout),
        Vec::<Value>::new(),
        "nothing is left"
    );
    eprintln!("outage: 100 records drained {took:?} after the API came back");
}
