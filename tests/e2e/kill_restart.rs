//! Proves contracts 1, 3 and 4 across crashes: with a slow central API (every answer after
//! 300 ms) and 300 acknowledged records, the agent is SIGKILLed several times while deliveries
//! are in flight and restarted on the same staging folder; in the end every acknowledged
//! record was applied, nothing else was, and per key records took effect in seq order.
//!
//! Delivery is at-least-once on the wire: a request the server received (and applied, here
//! when it arrives) whose answer never reached the killed agent is sent again after the
//! restart, and the server dedupes by `Idempotency-Key`. So the assertions are: every
//! acknowledged id was applied at least once; the set of applied ids is exactly the
//! acknowledged set; per key the first applications come in seq order (a resend repeats, in
//! seq order, records of a key's batch that were sent but not settled when the agent died). Also: SIGTERM with deliveries in flight exits 0 within the
//! grace period, and what it left is delivered after the next start.

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use estafeta_e2e::{
    Agent, FlakyHttpServer, Rng, Staged, check_http_deliveries, log_tail, mixed_plan, post_plan,
    status, wait_drained,
};
use serde_json::{Value, json};

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

/// One load client's view: what each 202 acknowledged, and the payload numbers it sent whose
/// answer never came (the agent died first): those may or may not have been staged.
#[derive(Default)]
struct Load {
    acked: Vec<Staged>,
    unanswered: BTreeSet<u64>,
    refused: usize,
}

/// Crash loop under load (bounded CI version): 6 clients post continuously (each its own keys,
/// creates then updates) while the agent is SIGKILLed 10 times at random moments — during
/// intake, staging and delivery — and restarted, and the central API answers 503 to 20% of
/// requests. At the end every acknowledged record was applied (at least once on the wire, once
/// in effect by its Idempotency-Key), per key in seq order; the only other records that reached
/// the API are ones whose answer the client never got.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_under_concurrent_load_loses_nothing_acknowledged() {
    const CYCLES: usize = 10;
    const CLIENTS: u64 = 6;
    // Bounded load, so the drain through a 20%-failing API stays short on any machine: each
    // client paces itself and stops after this many records.
    const PER_CLIENT: u64 = 500;
    const PACE: Duration = Duration::from_millis(25);
    let started = Instant::now();
    let server = FlakyHttpServer::start_with_seed(11).await;
    server.fail_fraction(0.2);
    server.delay_all(Duration::from_millis(20));
    let dir = tempfile::tempdir().unwrap();
    let url = server.url();
    let env = [
        ("CENTRAL_API_URL", url.as_str()),
        ("CENTRAL_API_TIMEOUT_SECS", "1"),
        ("CRONTAB", "* * * * * *"),
        ("RETRY_BASE_SECS", "1"),
        ("RETRY_MAX_SECS", "1"),
    ];
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;
    let records_url = agent.url("/v1/records");
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let stop = stop.clone();
        let records_url = records_url.clone();
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap();
            let mut load = Load::default();
            let mut n: u64 = 0;
            while !stop.load(Ordering::Relaxed) && n < PER_CLIENT {
                n += 1;
                tokio::time::sleep(PACE).await;
                let key = format!("c{c}-k{}", n % 7);
                let action = if n <= 7 { "create" } else { "update" };
                let number = c * 1_000_000 + n;
                let body = json!({"id": key, "n": number, "name": format!("Paciente {number}")});
                let sent = http
                    .post(format!("{records_url}/{action}/patient"))
                    .json(&body)
                    .send()
                    .await;
                let answer = match sent {
                    Ok(r) => Some((r.status().as_u16(), r.json::<Value>().await)),
                    Err(_) => None,
                };
                match answer {
                    Some((202, Ok(a))) => load.acked.push(Staged {
                        id: a["id"].as_str().unwrap().to_owned(),
                        seq: a["seq"].as_u64().unwrap(),
                        action: action.to_owned(),
                        entity: "patient".to_owned(),
                        key,
                        payload: body,
                        path: None,
                    }),
                    Some((code, _)) if code < 500 && code != 202 => {
                        panic!("client {c}: record {number} answered {code}")
                    }
                    // The agent died under the request (or answered 503 while stopping):
                    // not acknowledged; it may or may not be staged.
                    _ => {
                        load.unanswered.insert(number);
                        load.refused += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            load
        }));
    }

    let mut rng = Rng::new(2026);
    for cycle in 1..=CYCLES {
        tokio::time::sleep(Duration::from_millis(200 + rng.below(800) as u64)).await;
        let exit = agent.kill9();
        assert_eq!(exit.signal(), Some(libc::SIGKILL), "cycle {cycle}: {exit}");
        tokio::time::sleep(Duration::from_millis(rng.below(300) as u64)).await;
        agent.restart();
        agent.wait_ready(Duration::from_secs(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut staged = Vec::new();
    let mut unanswered = BTreeSet::new();
    let mut refused = 0;
    for client in clients {
        let load = client.await.unwrap();
        staged.extend(load.acked);
        unanswered.extend(load.unanswered);
        refused += load.refused;
    }
    assert!(
        staged.len() > 100,
        "only {} records acknowledged",
        staged.len()
    );
    // The API keeps failing 20% of requests while the backlog drains.
    wait_drained(&agent, Duration::from_secs(300)).await;

    // Requests for records nobody acknowledged: only records whose answer was lost.
    let acked: BTreeSet<&str> = staged.iter().map(|s| s.id.as_str()).collect();
    let requests = server.requests();
    let mut strays = BTreeSet::new();
    for r in &requests {
        if r.idempotency_key().is_some_and(|id| !acked.contains(id)) {
            let n = r.json()["n"].as_u64().unwrap_or(u64::MAX);
            assert!(
                unanswered.contains(&n),
                "request #{} carries record n={n}, which no client sent without an answer",
                r.index
            );
            strays.insert(n);
        }
    }
    let ours: Vec<_> = requests
        .iter()
        .filter(|r| r.idempotency_key().is_some_and(|id| acked.contains(id)))
        .cloned()
        .collect();
    let report = check_http_deliveries(&ours, &staged, false)
        .unwrap_or_else(|problems| panic!("{problems}\nagent log tail:\n{}", log_tail(&agent, 80)));
    let applied: BTreeSet<&str> = ours
        .iter()
        .filter(|r| r.succeeded())
        .filter_map(|r| r.idempotency_key())
        .collect();
    assert_eq!(applied, acked, "every acknowledged record applied");
    eprintln!(
        "crash loop: {CYCLES} SIGKILLs under load from {CLIENTS} clients in {:?}; {} acknowledged, 0 lost, 0 applied twice in effect ({} resends deduped by Idempotency-Key), {} requests unanswered by a dying agent ({} of them staged and delivered anyway); {report:?}",
        started.elapsed(),
        staged.len(),
        report.resent,
        refused,
        strays.len()
    );
}

/// Retrying clients after a crash, the deterministic case (contract 4, idempotent delivery on the
/// way in): a client repeats a request with the same `Idempotency-Key` after the agent lost its
/// index (deleted, as a damaged disk or a careless clean-up would) and after `estafeta reindex`: it
/// gets the first answer (same id and seq, `Idempotent-Replayed`), and the record is staged and
/// delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_request_gets_its_first_answer_after_the_index_is_lost_or_rebuilt() {
    let server = FlakyHttpServer::start_with_seed(17).await;
    // Down at first, so the record stays staged (and pending) through the restarts.
    server.down().await;
    let dir = tempfile::tempdir().unwrap();
    let url = server.url();
    let env = [
        ("CENTRAL_API_URL", url.as_str()),
        ("CRONTAB", "* * * * * *"),
        ("RETRY_BASE_SECS", "0.2"),
        ("RETRY_MAX_SECS", "0.5"),
    ];
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;
    let body = json!({"id": "p-1", "nome": "Ana"});
    let post = |agent: &Agent| {
        agent
            .client()
            .post(agent.url("/v1/records/create/patient"))
            .header("Idempotency-Key", "k1")
            .json(&body)
            .send()
    };
    let first = post(&agent).await.unwrap();
    assert_eq!(first.status(), 202);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["seq"], 1, "{first}");

    let index = dir.path().join("staging/_state/index.sqlite3");
    for round in ["index deleted", "estafeta reindex"] {
        agent.terminate();
        agent.wait(Duration::from_secs(10)).await;
        if round == "index deleted" {
            for suffix in ["", "-wal", "-shm"] {
                let mut p = index.clone().into_os_string();
                p.push(suffix);
                let _ = std::fs::remove_file(p);
            }
        } else {
            let out = estafeta_e2e::run_cli(dir.path(), &env, &["reindex"]).await;
            assert!(out.status.success(), "reindex: {out:?}");
        }
        agent.restart();
        agent.wait_ready(Duration::from_secs(20)).await;
        let again = post(&agent).await.unwrap();
        assert_eq!(again.status(), 202, "{round}");
        assert_eq!(
            again
                .headers()
                .get("idempotent-replayed")
                .and_then(|v| v.to_str().ok()),
            Some("true"),
            "{round}: the retry must be answered as a replay"
        );
        let again: Value = again.json().await.unwrap();
        assert_eq!(
            (&again["id"], &again["seq"]),
            (&first["id"], &first["seq"]),
            "{round}"
        );
        assert_eq!(status(&agent).await["records_pending"], 1, "{round}");
    }

    server.up().await;
    wait_drained(&agent, Duration::from_secs(30)).await;
    let applied: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.succeeded())
        .filter_map(|r| r.idempotency_key().map(str::to_owned))
        .collect();
    assert_eq!(applied, vec![first["id"].as_str().unwrap().to_owned()]);
}
