//! Proves contracts 1, 3 and 4 across crashes: with a slow central API (every answer after
//! 300 ms) and 300 acknowledged records, the agent is SIGKILLed several times while deliveries
//! are in flight and restarted on the same staging folder; in the end every acknowledged
//! record was applied, nothing else was, and per key records took effect in seq order.
//!
//! Delivery is at-least-once on the wire: a request the server received (and applied, here
//! when it arrives) whose answer never reached the killed agent is sent again after the
//! restart, and the server dedupes by `Idempotency-Key`. So the assertions are: every
//! acknowledged id was applied at least once; the set of applied ids is exactly the
//! acknowledged set; per key the first applications come in seq order and a resend only
//! repeats the record just sent. Also: SIGTERM with deliveries in flight exits 0 within the
//! grace period, and what it left is delivered after the next start.

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use estafeta_e2e::{
    Agent, FlakyHttpServer, check_http_deliveries, log_tail, mixed_plan, post_plan, status,
    wait_drained,
};

const GRACE_SECS: u64 = 3;

/// Waits until the server has received `more` requests beyond `seen`.
///
/// # Panics
/// After 20 s, with the agent's status (stuck leases show as `in_flight`) and log tail.
async fn wait_for_more_requests(agent: &Agent, server: &FlakyHttpServer, seen: usize, more: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = server.requests().len();
        if n >= seen + more {
            return;
        }
        if Instant::now() >= deadline {
            let status = status(agent).await;
            panic!(
                "the API got {} request(s) in 20 s, expected at least {more}; agent status:\n{}\nagent log tail:\n{}",
                n - seen,
                serde_json::to_string_pretty(&status).unwrap_or_default(),
                log_tail(agent, 30)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_in_flight_loses_nothing_and_applies_nothing_twice_in_effect() {
    let started = Instant::now();
    let server = FlakyHttpServer::start_with_seed(6).await;
    server.delay_all(Duration::from_millis(300));
    let dir = tempfile::tempdir().unwrap();
    let url = server.url();
    let grace = GRACE_SECS.to_string();
    let env = [
        ("CENTRAL_API_URL", url.as_str()),
        ("CENTRAL_API_TIMEOUT_SECS", "1"),
        ("CRONTAB", "* * * * * *"),
        ("RETRY_BASE_SECS", "1"),
        ("RETRY_MAX_SECS", "2"),
        ("SHUTDOWN_GRACE_SECS", grace.as_str()),
    ];
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;

    // 300 records over 30 keys, all acknowledged before the first crash.
    let plan = mixed_plan(30, 10, 99);
    let mut staged = post_plan(&agent, "patient", &plan, 10, 13).await;
    assert_eq!(staged.len(), 300);

    // SIGKILL three times while requests are in flight, restarting on the same folder.
    let mut seen = 0;
    for round in 1..=3 {
        wait_for_more_requests(&agent, &server, seen, 12).await;
        // Let the batch get into the 300 ms answers, then crash in the middle of them.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let exit = agent.kill9();
        assert_eq!(exit.signal(), Some(libc::SIGKILL), "round {round}: {exit}");
        agent.restart();
        agent.wait_ready(Duration::from_secs(20)).await;
        seen = server.requests().len();
    }
    wait_drained(&agent, Duration::from_secs(40)).await;
    let after_kills = started.elapsed();

    // SIGTERM with deliveries in flight: a clean exit (code 0) within the grace period.
    let more = mixed_plan(10, 4, 7)
        .into_iter()
        .map(|mut p| {
            p.key = format!("t{}", p.key);
            p.n += 1_000;
            p
        })
        .collect::<Vec<_>>();
    let before = server.requests().len();
    let extra = post_plan(&agent, "patient", &more, 5, 17).await;
    wait_for_more_requests(&agent, &server, before, 1).await;
    let stopping = Instant::now();
    agent.terminate();
    let exit = agent.wait(Duration::from_secs(GRACE_SECS + 5)).await;
    let took = stopping.elapsed();
    assert_eq!(
        exit.code(),
        Some(0),
        "SIGTERM must exit 0: {exit}\n{}",
        log_tail(&agent, 30)
    );
    assert!(
        took <= Duration::from_secs(GRACE_SECS) + Duration::from_millis(1_500),
        "SIGTERM must exit within the grace period ({GRACE_SECS} s), took {took:?}"
    );
    assert!(
        agent.stderr().contains("Estafeta stopped."),
        "{}",
        log_tail(&agent, 30)
    );
    agent.restart();
    agent.wait_ready(Duration::from_secs(20)).await;
    let drained = wait_drained(&agent, Duration::from_secs(30)).await;
    assert_eq!(drained["records_pending"], 0);
    staged.extend(extra);

    // Every acknowledged record applied; nothing else; per key in seq order.
    let requests = server.requests();
    let report = check_http_deliveries(&requests, &staged, false)
        .unwrap_or_else(|problems| panic!("{problems}\nagent log tail:\n{}", log_tail(&agent, 80)));
    let applied: BTreeSet<&str> = requests
        .iter()
        .filter(|r| r.succeeded())
        .filter_map(|r| r.idempotency_key())
        .collect();
    let acknowledged: BTreeSet<&str> = staged.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(applied, acknowledged);
    let last = status(&agent).await;
    assert_eq!(last["records_pending"], 0, "{last}");
    eprintln!(
        "kill_restart: {} records, 3 SIGKILLs drained after {after_kills:?}, SIGTERM took {took:?}, total {:?}; {report:?}",
        staged.len(),
        started.elapsed()
    );
}
