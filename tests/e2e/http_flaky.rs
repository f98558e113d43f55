//! Proves contracts 3 and 4 over HTTP against a misbehaving central API: the real `estafeta
//! run` delivers 2,000 records over 50 keys — creates, updates and deletes, posted singly (key
//! in `X-Record-Key` or in `id`) and in JSON arrays — to a server that answers 503 to 30% of
//! requests and stalls past the client's timeout on 5%, and in the end every record was
//! applied exactly once (one 2xx per `Idempotency-Key`), with its method, path, seq and
//! payload, and per key in the staged sequence order.
//!
//! How "applied" is counted: the server applies a request when it answers 2xx. A stalled
//! request sleeps past the agent's timeout and then answers 503, so a request whose client
//! gave up is never applied; every other answer is immediate, well inside the agent's 0.5 s
//! timeout. So a second 2xx for one id would be a real resend of a delivered record.
//!
//! Timings: the brief's 1 s timeout would make this take over a minute, because a batch
//! waits for its slowest request and with 5% stalls almost every batch of 50 keys holds one;
//! the timeout is 0.5 s and retries 0.2 s to 1 s instead.

use std::time::{Duration, Instant};

use estafeta_e2e::{
    Agent, FlakyHttpServer, check_http_deliveries, log_tail, mixed_plan, post_plan, run_cli,
    wait_drained,
};

const KEYS: usize = 50;
const PER_KEY: usize = 40;

/// The stall outlasts the client's timeout; retries stay short so 40 records per key (about
/// 20 failures each) fit in well under a minute.
const API_TIMEOUT_SECS: &str = "0.5";
const STALL: Duration = Duration::from_millis(1_200);
const RETRY_BASE_SECS: &str = "0.2";
const RETRY_MAX_SECS: &str = "1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaky_api_gets_every_record_exactly_once_in_key_order() {
    let started = Instant::now();
    let server = FlakyHttpServer::start_with_seed(2026).await;
    server.fail_fraction(0.30);
    server.stall(0.05, STALL);
    server.stall_status(503);

    let dir = tempfile::tempdir().unwrap();
    let url = server.url();
    let env = [
        ("CENTRAL_API_URL", url.as_str()),
        ("CENTRAL_API_TIMEOUT_SECS", API_TIMEOUT_SECS),
        // A worker per key: the keys go in parallel, a key's records one after another.
        ("CENTRAL_API_CONCURRENCY", "50"),
        ("CRONTAB", "* * * * * *"),
        ("RETRY_BASE_SECS", RETRY_BASE_SECS),
        ("RETRY_MAX_SECS", RETRY_MAX_SECS),
    ];
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;

    let plan = mixed_plan(KEYS, PER_KEY, 7);
    let staged = post_plan(&agent, "patient", &plan, 25, 11).await;
    assert_eq!(staged.len(), KEYS * PER_KEY);
    let posted = started.elapsed();

    let status = wait_drained(&agent, Duration::from_secs(80)).await;
    let drained = started.elapsed();
    assert_eq!(status["sinks"][0]["sink"], "api", "{status}");

    // The CLI, reading the same staging folder, agrees: nothing pending, nothing dead.
    let out = run_cli(dir.path(), &env, &["status", "--json"]).await;
    assert!(
        out.status.success(),
        "estafeta status --json failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli_status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_eq!(cli_status["records_pending"], 0, "{cli_status}");

    let requests = server.requests();
    let report = check_http_deliveries(&requests, &staged, true)
        .unwrap_or_else(|problems| panic!("{problems}\nagent log tail:\n{}", log_tail(&agent, 60)));
    // The server did misbehave, so retries were exercised.
    assert!(
        report.failed > 300 && report.stalled > 20,
        "expected many 503s and stalls: {report:?}"
    );
    eprintln!(
        "http_flaky: {} records posted in {posted:?}, all delivered after {drained:?}; {report:?}",
        staged.len()
    );
    agent.terminate();
    let exit = agent.wait(Duration::from_secs(15)).await;
    assert!(
        exit.success(),
        "SIGTERM should stop the agent cleanly: {exit}"
    );
}
