//! `estafeta-sink-server`, the stand-in central API of the benchmarks: with `--latency-ms` it
//! holds every answer that long on a timer, not a worker thread, so on one thread twenty
//! requests at once all finish in about one latency; on SIGTERM it prints its counts as one
//! JSON line, with the latency and the most requests it held at once.

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use estafeta_e2e::free_port;

const LATENCY: Duration = Duration::from_millis(300);
const REQUESTS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_holds_answers_on_timers_and_the_counts_say_how_many_at_once() {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut server = Command::new(env!("CARGO_BIN_EXE_estafeta-sink-server"))
        .args(["--addr", &addr, "--threads", "1", "--latency-ms"])
        .arg(LATENCY.as_millis().to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting estafeta-sink-server");

    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while client
        .get(format!("http://{addr}/__count"))
        .send()
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "estafeta-sink-server did not answer at {addr}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let started = Instant::now();
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..REQUESTS {
        let request = client
            .post(format!("http://{addr}/api/patient"))
            .header("Idempotency-Key", format!("id-{i}"))
            .body("{}");
        sends.spawn(async move { request.send().await.map(|r| r.status().as_u16()) });
    }
    while let Some(sent) = sends.join_next().await {
        assert_eq!(sent.expect("a send task").expect("an answer"), 200);
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= LATENCY,
        "answered before the latency: {elapsed:?}"
    );
    // One at a time on the one thread would take 20 latencies.
    assert!(
        elapsed < LATENCY * 4,
        "{REQUESTS} requests at once took {elapsed:?} on one thread"
    );

    rustix::process::kill_process(
        rustix::process::Pid::from_child(&server),
        rustix::process::Signal::TERM,
    )
    .expect("SIGTERM to the server");
    let status = server.wait().expect("the server exits");
    assert!(status.success(), "{status}");
    let mut out = String::new();
    server
        .stdout
        .take()
        .expect("piped stdout")
        .read_to_string(&mut out)
        .expect("reading the counts");
    let counts: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
    assert_eq!(counts["requests"], REQUESTS, "{counts}");
    assert_eq!(counts["distinct_idempotency_keys"], REQUESTS, "{counts}");
    assert_eq!(counts["without_idempotency_key"], 0, "{counts}");
    assert_eq!(counts["latency_ms"], LATENCY.as_millis() as u64, "{counts}");
    // All twenty were held at once, unless a loaded machine was slow to connect some.
    let most = counts["max_in_flight"].as_u64().expect("max_in_flight");
    assert!(
        most >= REQUESTS as u64 / 2 && most <= REQUESTS as u64,
        "{counts}"
    );
}
