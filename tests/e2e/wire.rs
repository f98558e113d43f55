//! What crosses the network (issue 20): the real agent delivers a record holding a canary to
//! the central system through a recording TCP proxy ([`estafeta_e2e::wire`]). Over TLS the
//! canary must not be in the captured bytes; in clear it must be (so the check can fail), and
//! the landed row holds the canary either way. `GET /v1/status` says which it was.

use std::time::Duration;

use estafeta_e2e::wire::Recorder;
use estafeta_e2e::{Agent, log_tail, pg, status_with, unique_name, wait_drained};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Delivers one record holding `canary` to PostgreSQL at `url` (the proxy) and returns the
/// sink's `connection` from `GET /v1/status` once it was delivered.
async fn deliver_through(url: &str, canary: &str) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let agent_id = unique_name("wire");
    let env = [
        ("CENTRAL_DATABASE_URL", url),
        ("AGENT_ID", agent_id.as_str()),
        ("CRONTAB", "* * * * * *"),
        ("RETRY_BASE_SECS", "1"),
        ("RETRY_MAX_SECS", "1"),
    ];
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;
    let (code, answer) = agent
        .post("create", "patient", &json!({"id": canary, "name": canary}))
        .await;
    assert_eq!(code, StatusCode::ACCEPTED, "{answer}");
    wait_drained(&agent, Duration::from_secs(30)).await;
    let landed: i64 = pg()
        .await
        .query_one(
            "SELECT count(*) FROM estafeta_records WHERE agent_id = $1 AND payload::text LIKE '%' || $2 || '%'",
            &[&agent_id, &canary],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        landed,
        1,
        "the record landed once\n{}",
        log_tail(&agent, 30)
    );
    let status = status_with(&agent, None).await;
    let sink = status["sinks"]
        .as_array()
        .and_then(|all| all.iter().find(|s| s["sink"] == "database"))
        .cloned()
        .unwrap_or_else(|| panic!("no database sink in the status: {status}"));
    agent.terminate();
    sink["connection"].clone()
}

#[tokio::test]
async fn a_canary_crosses_the_wire_to_postgresql_only_without_tls() {
    let proxy = Recorder::start("127.0.0.1:5432".parse().unwrap()).await;
    let port = proxy.addr().port();

    let canary = unique_name("cnryTlsPg");
    let connection = deliver_through(
        &format!("postgres://postgres@127.0.0.1:{port}/test?sslmode=require"),
        &canary,
    )
    .await;
    assert!(
        !proxy.captured().is_empty(),
        "the agent went through the proxy"
    );
    assert!(
        !proxy.saw(&canary),
        "with sslmode=require the record crossed the wire in clear"
    );
    assert_eq!(connection["tls"], true, "{connection}");
    assert_eq!(connection["observed"], true, "{connection}");

    let canary = unique_name("cnryClearPg");
    let connection = deliver_through(
        &format!("postgres://postgres@127.0.0.1:{port}/test?sslmode=disable"),
        &canary,
    )
    .await;
    assert!(
        proxy.saw(&canary),
        "with sslmode=disable the canary should be on the wire: the capture does not work"
    );
    assert_eq!(connection["tls"], false, "{connection}");
}
