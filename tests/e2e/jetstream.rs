//! The JetStream sink against the real NATS server (127.0.0.1:4222, JetStream on). Each test
//! uses a stream and subjects of its own ([`TestStream`]) and deletes the stream at the end.
//!
//! - Every acknowledged record is one message, with `Nats-Msg-Id` = record id, the record as
//!   staged in the body, and per key in seq order; check-config reaches the sink; the token
//!   never shows.
//! - `create_stream = true` creates the stream with the template's subjects.
//! - A resend after SIGKILL is dropped by the stream: with the server's acks held back by a
//!   proxy, the stream stores every record while the agent still has them pending; the agent
//!   is killed, restarted, publishes them again and the stream still holds each once.
//! - An outage (connection refused, then a connection cut while connected) piles records up
//!   as pending and they drain once the server is back, each once and in key order.
//! - No stream for the subject: retried (not dead) until the stream exists.
//! - Too large for the server's max_payload or the stream's max_msg_size: that record alone
//!   is dead, with the reason; the others are delivered.

use std::time::{Duration, Instant};

use estafeta_e2e::{
    Agent, NATS_ADDR, NATS_URL, TcpProxy, TestStream, check_stream_deliveries, log_tail,
    mixed_plan, nats, post_plan, run_cli, sink_status, status, wait_drained, wait_status,
};
use serde_json::json;

/// The agent's environment for a NATS sink at `url` publishing under `stream`'s prefix.
fn nats_env(url: &str, stream: &TestStream) -> Vec<(String, String)> {
    vec![
        ("CENTRAL_NATS_URL".into(), url.into()),
        ("CENTRAL_NATS_SUBJECT".into(), stream.template()),
        ("CENTRAL_NATS_TIMEOUT_SECS".into(), "2".into()),
        ("CRONTAB".into(), "* * * * * *".into()),
        ("RETRY_BASE_SECS".into(), "1".into()),
        ("RETRY_MAX_SECS".into(), "2".into()),
    ]
}

fn as_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// The next heartbeat on `beats`, as JSON.
async fn next_beat(beats: &mut async_nats::Subscriber, agent: &Agent) -> serde_json::Value {
    use futures_util::StreamExt as _;
    let message = tokio::time::timeout(Duration::from_secs(10), beats.next())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no heartbeat within 10 s; agent log tail:\n{}",
                log_tail(agent, 30)
            )
        })
        .expect("the subscription is open");
    serde_json::from_slice(&message.payload).expect("a JSON heartbeat")
}

/// Waits until the stream holds at least `min` messages and the count has not changed for
/// 3 s (or, once it holds `min`, until 30 s have passed: with acks held back the agent keeps
/// probing, and each probe may store one more message); returns it.
async fn wait_settled(stream: &TestStream, min: u64, agent: &Agent) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = (u64::MAX, Instant::now());
    loop {
        let n = stream.state().await.messages;
        if n != last.0 {
            last = (n, Instant::now());
        } else if n >= min && last.1.elapsed() >= Duration::from_secs(3) {
            return n;
        }
        if n >= min && Instant::now() >= deadline {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "the stream {} did not settle at {min} messages or more (last {n}); agent log tail:\n{}",
            stream.name,
            log_tail(agent, 40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_is_one_message_with_its_id_in_key_order() {
    let stream = TestStream::create("deliver", None).await;
    let dir = tempfile::tempdir().unwrap();
    // The server has no authorization: it ignores the token, which must never show.
    let secret = "e2e-sekret-7f3a";
    let mut env = nats_env(NATS_URL, &stream);
    env.push(("CENTRAL_NATS_TOKEN".into(), secret.into()));
    let env = as_refs(&env);
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;

    let plan = mixed_plan(20, 10, 11);
    let staged = post_plan(&agent, "patient", &plan, 8, 3).await;
    assert_eq!(staged.len(), 200);
    wait_drained(&agent, Duration::from_secs(30)).await;

    let messages = stream.messages().await;
    assert_eq!(messages.len(), 200, "one message per record");
    check_stream_deliveries(&messages, &staged, &stream.prefix)
        .unwrap_or_else(|problems| panic!("{problems}\nagent log tail:\n{}", log_tail(&agent, 40)));
    let after = status(&agent).await;
    assert!(
        sink_status(&after, "nats")["last_success_at"].is_string(),
        "{after}"
    );

    let out = run_cli(dir.path(), &env, &["check-config"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "check-config reaches the sink: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("sink nats: reachable"), "{stdout}");
    assert!(stdout.contains("CENTRAL_NATS_TOKEN"), "{stdout}");
    assert!(
        !stdout.contains(secret),
        "check-config shows the token: {stdout}"
    );
    assert!(
        !agent.stderr().contains(secret),
        "the log shows the token:\n{}",
        agent.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_stream_makes_the_stream_with_the_template_subjects() {
    let stream = TestStream::expect("create").await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = nats_env(NATS_URL, &stream);
    env.push(("CENTRAL_NATS_CREATE_STREAM".into(), "true".into()));
    env.push(("CENTRAL_NATS_STREAM".into(), stream.name.clone()));
    let env = as_refs(&env);

    // check-config connects and creates the stream, then finds it.
    let out = run_cli(dir.path(), &env, &["check-config"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let config = stream.config().await;
    assert_eq!(config.subjects, vec![format!("{}.*.*", stream.prefix)]);
    assert_eq!(config.num_replicas, 1);

    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;
    let staged = post_plan(&agent, "visit", &mixed_plan(5, 4, 5), 4, 9).await;
    wait_drained(&agent, Duration::from_secs(30)).await;
    let messages = stream.messages().await;
    check_stream_deliveries(&messages, &staged, &stream.prefix)
        .unwrap_or_else(|problems| panic!("{problems}\nagent log tail:\n{}", log_tail(&agent, 40)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_after_sigkill_is_dropped_by_the_stream() {
    let stream = TestStream::create("dedupe", None).await;
    let proxy = TcpProxy::start(NATS_ADDR).await;
    let dir = tempfile::tempdir().unwrap();
    let env = nats_env(&proxy.url(), &stream);
    let env = as_refs(&env);
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;

    // A first record opens the connection through the proxy.
    let first = post_plan(&agent, "patient", &mixed_plan(1, 1, 1), 1, 1).await;
    wait_drained(&agent, Duration::from_secs(20)).await;

    // The server's answers (acks included) are held back: the stream stores the records but
    // the agent never hears so, and keeps them pending.
    proxy.freeze(true);
    let plan: Vec<_> = mixed_plan(25, 2, 21)
        .into_iter()
        .map(|mut p| {
            p.key = format!("d{}", p.key);
            p.n += 100;
            p
        })
        .collect();
    let held = post_plan(&agent, "patient", &plan, 5, 2).await;
    assert_eq!(held.len(), 50);
    // A batch carries runs of a key's records, pipelined on the connection, so a key's two
    // records can both be stored without an ack. How many go out depends on how many were
    // staged when each batch was leased (once acks time out the sink counts as down and is
    // only probed), so wait for the count to settle.
    let stored = wait_settled(&stream, 2, &agent).await;
    assert!(
        (2..=1 + 50).contains(&stored),
        "the stream holds {stored} messages: more than were staged"
    );
    let before = status(&agent).await;
    assert_eq!(
        before["records_pending"], 50,
        "the agent must still hold every record it has no ack for: {before}"
    );

    let exit = agent.kill9();
    assert!(!exit.success(), "{exit}");
    proxy.freeze(false);
    agent.restart();
    agent.wait_ready(Duration::from_secs(20)).await;
    let drained = wait_drained(&agent, Duration::from_secs(30)).await;
    assert_eq!(drained["records_pending"], 0);

    // The records the stream already had were published again (the agent could only settle
    // them on an ack) and dropped as duplicates.
    let mut all = first;
    all.extend(held);
    let messages = stream.messages().await;
    assert_eq!(messages.len(), 51, "each record once");
    check_stream_deliveries(&messages, &all, &stream.prefix)
        .unwrap_or_else(|problems| panic!("{problems}\nagent log tail:\n{}", log_tail(&agent, 60)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_wait_through_an_outage_and_drain_once_nats_is_back() {
    let stream = TestStream::create("outage", None).await;
    let proxy = TcpProxy::start(NATS_ADDR).await;
    proxy.down();
    let dir = tempfile::tempdir().unwrap();
    let env = nats_env(&proxy.url(), &stream);
    let env = as_refs(&env);
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;

    // 1. Connection refused from the start.
    let mut staged = post_plan(&agent, "patient", &mixed_plan(10, 10, 7), 6, 4).await;
    let piled = wait_status(
        &agent,
        Duration::from_secs(10),
        "a refused connection to NATS",
        |s| sink_status(s, "nats")["last_error"].is_string(),
    )
    .await;
    let error = sink_status(&piled, "nats")["last_error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        error.contains("cannot connect to nats://127.0.0.1:"),
        "the status says NATS cannot be reached: {error}"
    );
    assert_eq!(piled["records_pending"], 100, "{piled}");
    assert_eq!(sink_status(&piled, "nats")["dead"], 0, "{piled}");
    assert_eq!(stream.state().await.messages, 0);

    proxy.up().await;
    let up = Instant::now();
    wait_drained(&agent, Duration::from_secs(20)).await;
    eprintln!(
        "jetstream outage 1: drained {:?} after NATS came back",
        up.elapsed()
    );
    assert_eq!(stream.state().await.messages, 100);

    // 2. The connection is cut while the agent is connected.
    proxy.down();
    let more: Vec<_> = mixed_plan(10, 5, 8)
        .into_iter()
        .map(|mut p| {
            p.n += 1_000;
            p
        })
        .collect();
    staged.extend(post_plan(&agent, "patient", &more, 4, 6).await);
    wait_status(
        &agent,
        Duration::from_secs(15),
        "a failed attempt while NATS is cut off",
        |s| {
            s["records_pending"] == 50
                && sink_status(s, "nats")["last_failure_at"]
                    != sink_status(&piled, "nats")["last_failure_at"]
        },
    )
    .await;
    assert_eq!(stream.state().await.messages, 100, "nothing got through");

    proxy.up().await;
    let up = Instant::now();
    wait_drained(&agent, Duration::from_secs(30)).await;
    eprintln!(
        "jetstream outage 2: drained {:?} after NATS came back",
        up.elapsed()
    );
    let messages = stream.messages().await;
    assert_eq!(messages.len(), 150);
    check_stream_deliveries(&messages, &staged, &stream.prefix)
        .unwrap_or_else(|problems| panic!("{problems}\nagent log tail:\n{}", log_tail(&agent, 60)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_stream_records_are_retried_until_one_exists() {
    let stream = TestStream::expect("nostream").await;
    let dir = tempfile::tempdir().unwrap();
    let env = nats_env(NATS_URL, &stream);
    let env = as_refs(&env);

    let out = run_cli(dir.path(), &env, &["check-config"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(3),
        "no stream: unreachable: {stdout}"
    );
    assert!(stdout.contains("no JetStream stream captures"), "{stdout}");

    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;
    let staged = post_plan(&agent, "patient", &mixed_plan(3, 3, 2), 3, 2).await;
    let waiting = wait_status(
        &agent,
        Duration::from_secs(10),
        "a publish that found no stream",
        |s| sink_status(s, "nats")["last_error"].is_string(),
    )
    .await;
    let error = sink_status(&waiting, "nats")["last_error"]
        .as_str()
        .unwrap();
    assert!(error.contains("no JetStream stream captures"), "{error}");
    assert_eq!(sink_status(&waiting, "nats")["dead"], 0, "{waiting}");
    assert_eq!(waiting["records_pending"], 9, "{waiting}");

    let js = nats().await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: stream.name.clone(),
        subjects: vec![format!("{}.>", stream.prefix)],
        ..Default::default()
    })
    .await
    .expect("creating the stream");
    wait_drained(&agent, Duration::from_secs(20)).await;
    check_stream_deliveries(&stream.messages().await, &staged, &stream.prefix)
        .unwrap_or_else(|problems| panic!("{problems}\nagent log tail:\n{}", log_tail(&agent, 40)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_too_large_is_a_dead_letter_and_the_others_go_through() {
    let stream = TestStream::expect("toolarge").await;
    let js = nats().await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: stream.name.clone(),
        subjects: vec![format!("{}.>", stream.prefix)],
        max_message_size: 4_096,
        ..Default::default()
    })
    .await
    .expect("creating the stream");
    let max_payload = js.client().server_info().max_payload;
    let dir = tempfile::tempdir().unwrap();
    let env = nats_env(NATS_URL, &stream);
    let env = as_refs(&env);
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;

    let post = |key: &str, filler: usize| {
        let body = json!({"id": key, "notes": "x".repeat(filler)});
        let agent = &agent;
        async move {
            let (code, answer) = agent.post("create", "exam", &body).await;
            assert_eq!(code, 202, "{answer}");
            answer["id"].as_str().unwrap().to_owned()
        }
    };
    let small = post("small", 10).await;
    // Over the stream's max_msg_size (4 KiB) but under the server's max_payload.
    let over_stream = post("over-stream", 8_000).await;
    // Over the server's max_payload (1 MiB by default).
    let over_server = post("over-server", max_payload + 1).await;

    let done = wait_status(
        &agent,
        Duration::from_secs(20),
        "two dead letters and one delivery",
        |s| sink_status(s, "nats")["dead"] == 2 && sink_status(s, "nats")["pending"] == 0,
    )
    .await;
    assert_eq!(
        done["records_pending"], 2,
        "the dead records stay on disk: {done}"
    );

    let out = run_cli(dir.path(), &env, &["ls", "--failed", "--json"]).await;
    let dead = estafeta_e2e::json_lines(&out.stdout);
    assert_eq!(dead.len(), 2, "{dead:?}");
    let reason = |id: &str| {
        dead.iter()
            .find(|d| d["id"] == id)
            .and_then(|d| d["last_error"].as_str())
            .unwrap_or_else(|| panic!("{id} is not a dead letter: {dead:?}"))
            .to_owned()
    };
    let stream_reason = reason(&over_stream);
    assert!(
        stream_reason.contains("max_msg_size"),
        "the reason says what to change: {stream_reason}"
    );
    let server_reason = reason(&over_server);
    assert!(
        server_reason.contains("max_payload"),
        "the reason says what to change: {server_reason}"
    );

    let messages = stream.messages().await;
    assert_eq!(messages.len(), 1, "only the small record is in the stream");
    assert_eq!(messages[0].msg_id.as_deref(), Some(small.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_report_the_backlog_and_keep_the_agent_id_across_restarts() {
    // Subjects no stream captures: the records wait, and the heartbeat says why.
    let stream = TestStream::expect("beat").await;
    let agent_id = format!("ws.{}", stream.prefix);
    let subject = format!("estafeta_heartbeat.ws_{}", stream.prefix);
    let js = nats().await;
    let mut beats = js
        .client()
        .subscribe(subject.clone())
        .await
        .expect("subscribing to the heartbeats");
    let dir = tempfile::tempdir().unwrap();
    let mut env = nats_env(NATS_URL, &stream);
    env.push(("HEARTBEAT_SECS".into(), "0.5".into()));
    env.push(("AGENT_ID".into(), agent_id.clone()));
    let env = as_refs(&env);
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;
    post_plan(&agent, "patient", &mixed_plan(3, 2, 4), 2, 4).await;
    wait_status(&agent, Duration::from_secs(10), "a failed publish", |s| {
        sink_status(s, "nats")["last_error"].is_string()
    })
    .await;

    // Beats sent before the first failure may show no error yet: wait for one that does.
    let mut beat = next_beat(&mut beats, &agent).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while beat["last_error"].is_null() && Instant::now() < deadline {
        beat = next_beat(&mut beats, &agent).await;
    }
    assert_eq!(beat["agent_id"], agent_id.as_str(), "{beat}");
    assert_eq!(beat["version"], env!("CARGO_PKG_VERSION"), "{beat}");
    assert!(
        beat["hostname"].as_str().is_some_and(|h| !h.is_empty()),
        "{beat}"
    );
    assert_eq!(beat["records_pending"], 6, "{beat}");
    assert_eq!(beat["dead_letters"], 0, "{beat}");
    assert!(
        beat["disk_free_bytes"].as_u64().is_some_and(|b| b > 0),
        "{beat}"
    );
    assert!(beat["oldest_pending_age_secs"].as_i64().is_some(), "{beat}");
    assert!(
        beat["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("no JetStream stream captures")),
        "{beat}"
    );
    let sinks = beat["sinks"].as_array().expect("sinks");
    assert_eq!(sinks.len(), 1, "{beat}");
    assert_eq!(sinks[0]["sink"], "nats");
    assert_eq!(
        sinks[0]["pending"].as_u64().unwrap() + sinks[0]["in_flight"].as_u64().unwrap(),
        6,
        "{beat}"
    );
    let started = beat["started_at"].clone();

    // After a crash and a restart: the same agent id, a new start time.
    agent.kill9();
    agent.restart();
    agent.wait_ready(Duration::from_secs(20)).await;
    let mut beat = next_beat(&mut beats, &agent).await;
    while beat["started_at"] == started {
        beat = next_beat(&mut beats, &agent).await;
    }
    assert_eq!(beat["agent_id"], agent_id.as_str(), "{beat}");
    assert_eq!(beat["records_pending"], 6, "{beat}");
}
