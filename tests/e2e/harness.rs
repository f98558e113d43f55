//! The harness's own tests: the helpers work against the real databases, the flaky server
//! misbehaves as asked, and an `Agent` child is started, probed, stopped and killed (a fake
//! agent stands in for `estafeta`: this test executable, re-run with only that test selected
//! and `ESTAFETA_E2E_FAKE_AGENT` set, which makes the test serve as the agent instead).

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::Path;
use axum::routing::{get, post};
use estafeta_e2e::{Agent, FlakyHttpServer, free_port, mysql, pg, unique_name};
use mysql_async::prelude::Queryable;
use reqwest::StatusCode;
use serde_json::{Value, json};

#[tokio::test]
async fn real_databases_answer() {
    let table = unique_name("harness");
    assert!(
        table.starts_with("harness_") && table.len() <= 63,
        "{table}"
    );
    assert_ne!(table, unique_name("harness"));

    let client = pg().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, doc jsonb)"
        ))
        .await
        .unwrap();
    client
        .execute(
            &format!("INSERT INTO {table} VALUES ($1, $2)"),
            &[&1i64, &json!({"name": "Ana"})],
        )
        .await
        .unwrap();
    let row = client
        .query_one(&format!("SELECT doc FROM {table} WHERE id = 1"), &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, Value>(0), json!({"name": "Ana"}));
    client
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();

    let mut conn = mysql().await;
    conn.query_drop(format!(
        "CREATE TABLE {table} (id BIGINT PRIMARY KEY, name TEXT)"
    ))
    .await
    .unwrap();
    conn.exec_drop(format!("INSERT INTO {table} VALUES (?, ?)"), (1, "Ana"))
        .await
        .unwrap();
    let name: Option<String> = conn
        .query_first(format!("SELECT name FROM {table} WHERE id = 1"))
        .await
        .unwrap();
    assert_eq!(name.as_deref(), Some("Ana"));
    conn.query_drop(format!("DROP TABLE {table}"))
        .await
        .unwrap();
    conn.disconnect().await.unwrap();
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// Sends `n` requests with keys `k0..`; returns the statuses.
async fn send_keys(client: &reqwest::Client, url: &str, n: usize) -> Vec<u16> {
    let mut statuses = Vec::new();
    for i in 0..n {
        let answer = client
            .post(format!("{url}/patients?tenant=3"))
            .header("Idempotency-Key", format!("k{i}"))
            .header("X-Estafeta-Seq", i.to_string())
            .json(&json!({"i": i}))
            .send()
            .await
            .unwrap();
        statuses.push(answer.status().as_u16());
    }
    statuses
}

#[tokio::test]
async fn flaky_server_records_and_misbehaves() {
    let server = FlakyHttpServer::start_with_seed(7).await;
    let client = http();
    let url = server.url();

    // 503 for about half the requests, the same ones for the same seed.
    server.fail_fraction(0.5);
    let statuses = send_keys(&client, &url, 40).await;
    let failed = statuses.iter().filter(|&&s| s == 503).count();
    assert!((10..=30).contains(&failed), "{failed} of 40 failed");
    assert_eq!(failed + statuses.iter().filter(|&&s| s == 200).count(), 40);
    let twin = FlakyHttpServer::start_with_seed(7).await;
    twin.fail_fraction(0.5);
    assert_eq!(send_keys(&client, &twin.url(), 40).await, statuses);

    let requests = server.requests();
    assert_eq!(requests.len(), 40);
    let r = &requests[3];
    assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/patients"));
    assert_eq!(r.query.as_deref(), Some("tenant=3"));
    assert_eq!((r.idempotency_key(), r.seq()), (Some("k3"), Some(3)));
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    assert_eq!(r.json(), json!({"i": 3}));
    assert_eq!(r.status, statuses[3]);
    assert_eq!(server.succeeded().len(), 40 - failed);

    // A fixed status for one path; the others behave.
    server.behave();
    server.status_for("/bad", 422);
    let bad = client.post(format!("{url}/bad")).send().await.unwrap();
    assert_eq!(bad.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let good = client.post(format!("{url}/good")).send().await.unwrap();
    assert_eq!(good.status(), StatusCode::OK);

    // Every attempt of a key counts.
    server.clear_requests();
    for _ in 0..3 {
        client
            .put(format!("{url}/p/1"))
            .header("Idempotency-Key", "dup")
            .send()
            .await
            .unwrap();
    }
    assert_eq!(server.count_by_idempotency_key().get("dup"), Some(&3));

    // A stall outlasts the client's timeout.
    server.stall(1.0, Duration::from_secs(2));
    let started = Instant::now();
    let err = client
        .get(format!("{url}/slow"))
        .timeout(Duration::from_millis(200))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(server.requests().last().unwrap().stalled);

    // Down cuts a request in flight and the idle pooled connections, and refuses new ones.
    server.stall(1.0, Duration::from_secs(30));
    let in_flight = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move { client.get(format!("{url}/in-flight")).send().await }
    });
    server.wait_for_requests(5, Duration::from_secs(5)).await;
    let started = Instant::now();
    server.down().await;
    assert!(!server.is_up());
    assert!(in_flight.await.unwrap().is_err());
    assert!(started.elapsed() < Duration::from_secs(5));
    let err = client.get(format!("{url}/x")).send().await.unwrap_err();
    assert!(err.is_connect(), "{err}");
    assert!(std::net::TcpStream::connect(server.addr()).is_err());

    // Up again on the same port.
    server.behave();
    server.up().await;
    let back = client.get(format!("{url}/x")).send().await.unwrap();
    assert_eq!(back.status(), StatusCode::OK);
    assert_eq!(server.url(), url);
}

/// Set by `agent_starts_answers_stops_and_dies` on the child it starts: the child (this test
/// executable, running that same test) serves as the fake agent instead of testing.
const FAKE: &str = "ESTAFETA_E2E_FAKE_AGENT";

/// The fake agent: serves `/healthz`, `POST /v1/records/{action}/{entity}` and `/env` on
/// `INGEST_ADDR` until killed. Runs in the child only; it never returns, so the child never
/// reports a test result of its own.
async fn serve_as_fake_agent() -> ! {
    let addr = std::env::var("INGEST_ADDR").expect("the harness sets INGEST_ADDR");
    eprintln!("fake agent: listening on {addr}");
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/v1/records/{action}/{entity}",
            post(
                |Path((action, entity)): Path<(String, String)>, Json(body): Json<Value>| async move {
                    (
                        StatusCode::ACCEPTED,
                        Json(json!({"action": action, "entity": entity, "body": body})),
                    )
                },
            ),
        )
        .route(
            "/env",
            get(|| async {
                let env: serde_json::Map<String, Value> = std::env::vars()
                    .map(|(k, v)| (k, Value::String(v)))
                    .collect();
                let cwd = std::env::current_dir().unwrap();
                Json(json!({"cwd": cwd, "env": env}))
            }),
        );
    // Not ready at once, so that `wait_ready` has to poll.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
    axum::serve(listener, app).await.unwrap();
    panic!(
        "fake agent: the server on {addr} stopped; the harness should have killed this process first"
    );
}

#[tokio::test]
async fn agent_starts_answers_stops_and_dies() {
    if std::env::var_os(FAKE).is_some() {
        serve_as_fake_agent().await;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let args = [
        "harness::agent_starts_answers_stops_and_dies",
        "--exact",
        "--nocapture",
    ];
    let mut agent = Agent::spec(dir.path())
        .program(&exe, &args)
        .env(FAKE, "1")
        .env("CENTRAL_API_URL", "http://127.0.0.1:1")
        .spawn();
    agent.wait_ready(Duration::from_secs(20)).await;

    // Only the harness's environment reaches the child, in the given directory.
    let (status, seen) = agent.get("/env").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(seen["cwd"], json!(dir.path()));
    let env = seen["env"].as_object().unwrap();
    let keys: BTreeSet<&str> = env.keys().map(String::as_str).collect();
    let allowed = [
        "PATH",
        "HOME",
        "INGEST_ADDR",
        "STAGING_AREA_PATH",
        "IS_ABSOLUTE_STAGING_AREA_PATH",
        "RUST_BACKTRACE",
        "LOG_LEVEL",
        "CENTRAL_API_URL",
        FAKE,
    ];
    assert!(keys.iter().all(|k| allowed.contains(k)), "{keys:?}");
    assert_eq!(env["INGEST_ADDR"], json!(agent.addr().to_string()));
    assert_eq!(env["STAGING_AREA_PATH"], json!(dir.path().join("staging")));

    let (status, body) = agent
        .post("create", "patient", &json!({"id": 1, "name": "Ana"}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(
        body,
        json!({"action": "create", "entity": "patient", "body": {"id": 1, "name": "Ana"}})
    );
    assert!(
        agent.stderr().contains("fake agent: listening on"),
        "{}",
        agent.stderr()
    );

    // SIGTERM, then a restart on the same port, then SIGKILL.
    let port = agent.addr().port();
    agent.terminate();
    let status = agent.wait(Duration::from_secs(10)).await;
    assert_eq!(status.signal(), Some(libc::SIGTERM));
    agent.restart();
    agent.wait_ready(Duration::from_secs(20)).await;
    assert_eq!(agent.addr().port(), port);
    let pid = agent.pid().unwrap();
    assert_eq!(agent.kill9().signal(), Some(libc::SIGKILL));
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(agent.try_wait().is_some());

    // free_port gives a port that can be bound.
    let port = free_port();
    assert_ne!(port, 0);
    std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
}
