//! What crosses the network (issue 20): the real agent delivers a record holding a canary to
//! the central system through a recording TCP proxy ([`estafeta_e2e::wire`]). Over TLS the
//! canary must not be in the captured bytes; in clear it must be (so the check can fail), and
//! the landed row holds the canary either way. `GET /v1/status` says which it was. The same for
//! a client posting to the agent's own ingest API with and without `INGEST_TLS_CERT`.

use std::time::Duration;

use estafeta_e2e::mariadb_server::{MariaDb, ServerTls};
use estafeta_e2e::nats_server::{NatsServer, NatsServerSettings};
use estafeta_e2e::pki::Pki;
use estafeta_e2e::wire::Recorder;
use estafeta_e2e::{Agent, log_tail, pg, run_cli, status_with, unique_name, wait_drained};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Delivers one record holding `canary` to the sink `sink` that `env` configures (through the
/// proxy) and returns that sink's `connection` from `GET /v1/status` once it was delivered.
async fn deliver_through(env: &[(&str, &str)], sink: &str, canary: &str) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let mut env = env.to_vec();
    env.extend([
        ("CRONTAB", "* * * * * *"),
        ("RETRY_BASE_SECS", "1"),
        ("RETRY_MAX_SECS", "1"),
    ]);
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;
    let (code, answer) = agent
        .post("create", "patient", &json!({"id": canary, "name": canary}))
        .await;
    assert_eq!(code, StatusCode::ACCEPTED, "{answer}");
    let drained = tokio::time::timeout(
        Duration::from_secs(40),
        wait_drained(&agent, Duration::from_secs(30)),
    )
    .await;
    assert!(drained.is_ok(), "not delivered\n{}", log_tail(&agent, 30));
    let status = status_with(&agent, None).await;
    let found = status["sinks"]
        .as_array()
        .and_then(|all| all.iter().find(|s| s["sink"] == sink))
        .cloned()
        .unwrap_or_else(|| panic!("no {sink} sink in the status: {status}"));
    agent.terminate();
    // check-config says the same, after its own probe.
    let check = run_cli(dir.path(), &env, &["check-config"]).await;
    let said = String::from_utf8_lossy(&check.stdout).into_owned();
    let line = said
        .lines()
        .find(|l| l.starts_with(&format!("sink {sink}: reachable; ")))
        .unwrap_or_else(|| panic!("check-config does not say how {sink} is reached:\n{said}"));
    let described = found["connection"]["description"].as_str().unwrap_or("?");
    assert!(
        line.ends_with(described),
        "check-config ({line}) and the status ({described}) disagree"
    );
    found["connection"].clone()
}

/// With TLS: the agent's traffic went through the proxy, the canary did not, and the status
/// says TLS (and `also`: `verified` or `observed`).
fn assert_sealed(proxy: &Recorder, canary: &str, connection: &Value, what: &str, also: &str) {
    assert!(
        !proxy.captured().is_empty(),
        "the agent went through the proxy"
    );
    assert!(!proxy.saw(canary), "{what}");
    assert_eq!(connection["tls"], true, "{connection}");
    assert_eq!(connection[also], true, "{connection}");
}

/// In clear: the canary is on the wire (else the capture proves nothing) and the status says so.
fn assert_in_clear(proxy: &Recorder, canary: &str, connection: &Value, what: &str) {
    assert!(proxy.saw(canary), "{what}");
    assert_eq!(connection["tls"], false, "{connection}");
}

/// Rows of this agent's records in PostgreSQL's landing table holding `canary`.
async fn pg_rows(agent_id: &str, canary: &str) -> i64 {
    pg().await
        .query_one(
            "SELECT count(*) FROM estafeta_records WHERE agent_id = $1 AND payload::text LIKE '%' || $2 || '%'",
            &[&agent_id, &canary],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_canary_crosses_the_wire_to_postgresql_only_without_tls() {
    let proxy = Recorder::start("127.0.0.1:5432".parse().unwrap()).await;
    let port = proxy.addr().port();

    let agent_id = unique_name("wire");
    let canary = unique_name("cnryTlsPg");
    let url = format!("postgres://postgres@127.0.0.1:{port}/test?sslmode=require");
    let env = [
        ("CENTRAL_DATABASE_URL", url.as_str()),
        ("AGENT_ID", &agent_id),
    ];
    let connection = deliver_through(&env, "database", &canary).await;
    assert_eq!(
        pg_rows(&agent_id, &canary).await,
        1,
        "the record landed once"
    );
    assert_sealed(
        &proxy,
        &canary,
        &connection,
        "with sslmode=require the record crossed the wire in clear",
        "observed",
    );

    let canary = unique_name("cnryClearPg");
    let url = format!("postgres://postgres@127.0.0.1:{port}/test?sslmode=disable");
    let env = [
        ("CENTRAL_DATABASE_URL", url.as_str()),
        ("AGENT_ID", &agent_id),
    ];
    let connection = deliver_through(&env, "database", &canary).await;
    assert_eq!(
        pg_rows(&agent_id, &canary).await,
        1,
        "the record landed once"
    );
    assert_in_clear(
        &proxy,
        &canary,
        &connection,
        "with sslmode=disable the canary should be on the wire: the capture does not work",
    );
}

#[tokio::test]
async fn a_canary_crosses_the_wire_to_mariadb_only_without_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"), "ca");
    let cert = pki.server("server");
    let db = MariaDb::start(
        &dir.path().join("server"),
        Some(ServerTls {
            cert: &cert.cert,
            key: &cert.key,
            ca: &pki.ca(),
        }),
    );
    db.sql(
        "CREATE DATABASE IF NOT EXISTS test;
         CREATE USER 'estafeta'@'%';
         GRANT ALL ON test.* TO 'estafeta'@'%';",
    );
    let proxy = Recorder::start(format!("127.0.0.1:{}", db.port).parse().unwrap()).await;
    let port = proxy.addr().port();
    let rows = |canary: &str| {
        db.sql(&format!(
            "SELECT count(*) FROM test.estafeta_records WHERE payload LIKE '%{canary}%'"
        ))
        .trim()
        .to_owned()
    };

    let canary = unique_name("cnryTlsMy");
    let url = format!(
        "mysql://estafeta@127.0.0.1:{port}/test?ssl-mode=VERIFY_IDENTITY&ssl-ca={}",
        pki.ca().display()
    );
    let connection = deliver_through(
        &[("CENTRAL_DATABASE_URL", url.as_str())],
        "database",
        &canary,
    )
    .await;
    assert_eq!(rows(&canary), "1", "the record landed once");
    assert_sealed(
        &proxy,
        &canary,
        &connection,
        "with ssl-mode=VERIFY_IDENTITY the record crossed the wire in clear",
        "verified",
    );

    let canary = unique_name("cnryClearMy");
    // prefer_socket=false: on loopback the driver would move to the server's Unix socket,
    // around the proxy.
    let url =
        format!("mysql://estafeta@127.0.0.1:{port}/test?ssl-mode=DISABLED&prefer_socket=false");
    let connection = deliver_through(
        &[("CENTRAL_DATABASE_URL", url.as_str())],
        "database",
        &canary,
    )
    .await;
    assert_eq!(rows(&canary), "1", "the record landed once");
    assert_in_clear(
        &proxy,
        &canary,
        &connection,
        "with ssl-mode=DISABLED the canary should be on the wire: the capture does not work",
    );
}

#[tokio::test]
async fn a_canary_crosses_the_wire_to_nats_only_without_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"), "ca");
    let cert = pki.server("server");
    let with_tls = NatsServer::start(
        &dir.path().join("tls"),
        &NatsServerSettings {
            tls: Some((cert.cert.clone(), cert.key.clone())),
            ..Default::default()
        },
    );
    let in_clear = NatsServer::start(&dir.path().join("clear"), &NatsServerSettings::default());
    let stream = [
        ("CENTRAL_NATS_CREATE_STREAM", "true"),
        ("CENTRAL_NATS_STREAM", "WIRE"),
    ];

    let proxy = Recorder::start(with_tls.addr()).await;
    let canary = unique_name("cnryTlsNats");
    let url = format!("tls://127.0.0.1:{}", proxy.addr().port());
    let ca = pki.ca().display().to_string();
    let mut env = vec![
        ("CENTRAL_NATS_URL", url.as_str()),
        ("CENTRAL_NATS_CA_FILE", ca.as_str()),
    ];
    env.extend(stream);
    let connection = deliver_through(&env, "nats", &canary).await;
    assert_sealed(
        &proxy,
        &canary,
        &connection,
        "over tls:// the record crossed the wire in clear",
        "verified",
    );

    let proxy = Recorder::start(in_clear.addr()).await;
    let canary = unique_name("cnryClearNats");
    let url = format!("nats://127.0.0.1:{}", proxy.addr().port());
    let mut env = vec![("CENTRAL_NATS_URL", url.as_str())];
    env.extend(stream);
    let connection = deliver_through(&env, "nats", &canary).await;
    assert_in_clear(
        &proxy,
        &canary,
        &connection,
        "over nats:// without TLS the canary should be on the wire: the capture does not work",
    );
}

/// Posts one record holding `canary` to `base` (the proxy in front of the agent's ingest API).
async fn post_through(client: &reqwest::Client, base: &str, canary: &str) {
    let answer = client
        .post(format!("{base}/v1/records/create/patient"))
        .json(&json!({"id": canary, "name": canary}))
        .send()
        .await
        .unwrap_or_else(|err| panic!("posting through the proxy: {err}"));
    assert_eq!(answer.status(), StatusCode::ACCEPTED);
}

#[tokio::test]
async fn a_canary_crosses_the_wire_to_the_ingest_api_only_without_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"), "ca");
    let server = pki.server("server");
    let (cert, key) = (
        server.cert.display().to_string(),
        server.key.display().to_string(),
    );

    let with_tls = dir.path().join("with-tls");
    std::fs::create_dir(&with_tls).unwrap();
    let mut agent = Agent::spec(&with_tls)
        .envs([
            ("INGEST_TLS_CERT", cert.as_str()),
            ("INGEST_TLS_KEY", key.as_str()),
        ])
        .https(pki.ca())
        .spawn();
    agent.wait_ready(Duration::from_secs(20)).await;
    let proxy = Recorder::start(agent.addr()).await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(pki.ca()).unwrap()).unwrap(),
        )
        .build()
        .unwrap();
    let canary = unique_name("cnryTlsIngest");
    post_through(
        &client,
        &format!("https://127.0.0.1:{}", proxy.addr().port()),
        &canary,
    )
    .await;
    assert!(
        !proxy.captured().is_empty(),
        "the client went through the proxy"
    );
    assert!(
        !proxy.saw(&canary),
        "over HTTPS the record crossed the wire in clear"
    );
    agent.terminate();

    let in_clear = dir.path().join("in-clear");
    std::fs::create_dir(&in_clear).unwrap();
    let mut agent = Agent::start(&in_clear, &[]);
    agent.wait_ready(Duration::from_secs(20)).await;
    let proxy = Recorder::start(agent.addr()).await;
    let canary = unique_name("cnryClearIngest");
    post_through(
        &reqwest::Client::new(),
        &format!("http://127.0.0.1:{}", proxy.addr().port()),
        &canary,
    )
    .await;
    assert!(
        proxy.saw(&canary),
        "over plain HTTP the canary should be on the wire: the capture does not work"
    );
    agent.terminate();
}
