//! DNS rebinding and local tokens (contract 7, safe by default; the web page and the other local
//! user of THREATS.md), against the real binary. A web page that
//! rebinds its own name to 127.0.0.1 makes the browser send `Host: rebind.attacker.example`; the
//! agent must neither stage what it sends (no record, nothing delivered) nor show it anything
//! (dead letters with their keys and the server's echo, the status, the metrics), on any route.
//! The agent's own names (`localhost:PORT`, `127.0.0.1:PORT`) and a name listed in
//! `INGEST_ALLOWED_HOSTS` are answered. A public `INGEST_ADDR` with a short token refuses to
//! start, saying how to make a good one; a token kept in `INGEST_TOKEN_FILE` (as the packages
//! keep it) is required by the API. The requests are written by hand so that `Host` is exactly
//! what a rebinding browser sends.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use estafeta_e2e::{
    Agent, FlakyHttpServer, body_value, free_port, log_tail, run_cli, sink_status, wait_status,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ATTACKER: &str = "rebind.attacker.example";

/// One HTTP/1.1 request with exactly the given `Host` (none when `None`): status and body.
async fn send(
    addr: SocketAddr,
    method: &str,
    target: &str,
    host: Option<&str>,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Value) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    let mut head = format!("{method} {target} HTTP/1.1\r\nConnection: close\r\n");
    if let Some(host) = host {
        head.push_str(&format!("Host: {host}\r\n"));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(head.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer))
        .await
        .expect("an answer within 30 s")
        .expect("read the answer");
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, body_value(body.as_bytes()))
}

/// A record POSTed with `host`.
async fn post_as(agent: &Agent, host: &str, id: &str, extra: &[(&str, &str)]) -> (u16, Value) {
    let mut headers = vec![("Content-Type", "application/json")];
    headers.extend_from_slice(extra);
    send(
        agent.addr(),
        "POST",
        "/v1/records/create/patient",
        Some(host),
        &headers,
        &json!({"id": id, "name": "Forjado"}).to_string(),
    )
    .await
}

fn assert_refused(what: &str, (status, body): &(u16, Value)) {
    assert_eq!(*status, 421, "{what}: {body}");
    assert_eq!(body["error"], "host_not_allowed", "{what}: {body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(ATTACKER) && message.contains("INGEST_ALLOWED_HOSTS"),
        "{what}: the message names the Host and what admits it: {message}"
    );
}

/// Without a token (the default loopback setup), the `Host` check alone keeps a rebinding page
/// out of every route: the forged record is neither staged nor delivered, and the dead letter's
/// key and the server's echo never reach the page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebinding_page_can_neither_stage_nor_read() {
    let server = FlakyHttpServer::start_with_seed(19).await;
    let echo = json!({"error": "cpf_invalido", "echo": "SECRET-CPF-123.456.789-00"});
    server.respond_for("/patient/dead-1", 400, echo);
    let dir = tempfile::tempdir().unwrap();
    let url = server.url();
    let env = [
        ("CENTRAL_API_URL", url.as_str()),
        ("CRONTAB", "* * * * * *"),
        ("RETRY_BASE_SECS", "1"),
        ("RETRY_MAX_SECS", "1"),
    ];
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;
    let port = agent.addr().port();

    // A dead letter for the page to try to read: key dead-1, the server's echo in its reason.
    let (code, body) = agent
        .post("update", "patient", &json!({"id": "dead-1", "cpf": "x"}))
        .await;
    assert_eq!(code.as_u16(), 202, "{body}");
    wait_status(&agent, Duration::from_secs(30), "the dead letter", |s| {
        sink_status(s, "api")["dead"] == 1
    })
    .await;

    // The page's forged record, with and without a port in Host: refused, nothing staged.
    for host in [ATTACKER.to_owned(), format!("{ATTACKER}:{port}")] {
        assert_refused(
            "POST /v1/records",
            &post_as(&agent, &host, "forged", &[]).await,
        );
    }
    // Every read: refused, and nothing of the dead letter in the answer.
    for target in [
        "/v1/dead-letters",
        "/v1/status",
        "/metrics",
        "/",
        "/assets/status.js",
        "/v1/openapi.json",
        "/healthz",
        "/readyz",
        "/nowhere",
    ] {
        let answer = send(agent.addr(), "GET", target, Some(ATTACKER), &[], "").await;
        assert_refused(&format!("GET {target}"), &answer);
        let text = answer.1.to_string();
        assert!(
            !text.contains("dead-1") && !text.contains("SECRET-CPF"),
            "GET {target} showed the dead letter: {text}"
        );
    }
    // Nor can it requeue or trigger an update, even with the header scripts send.
    for target in ["/v1/dead-letters/api/1/requeue", "/v1/update"] {
        let answer = send(
            agent.addr(),
            "POST",
            target,
            Some(ATTACKER),
            &[("X-Requested-By", "estafeta")],
            "",
        )
        .await;
        assert_refused(&format!("POST {target}"), &answer);
    }
    // A request with no Host at all is refused too.
    let (code, body) = send(agent.addr(), "GET", "/v1/status", None, &[], "").await;
    assert_eq!(
        (code, body["error"].as_str()),
        (400, Some("invalid_host")),
        "{body}"
    );

    // The agent's own names are answered: the dead letter is there to be read.
    let (code, letters) = send(
        agent.addr(),
        "GET",
        "/v1/dead-letters",
        Some(&format!("localhost:{port}")),
        &[],
        "",
    )
    .await;
    assert_eq!(code, 200, "{letters}");
    assert_eq!(letters["dead_letters"][0]["key"], "dead-1", "{letters}");
    for (host, id) in [
        (format!("localhost:{port}"), "own-1"),
        (format!("127.0.0.1:{port}"), "own-2"),
    ] {
        let (code, body) = post_as(&agent, &host, id, &[]).await;
        assert_eq!(code, 202, "Host {host}: {body}");
    }
    let s = wait_status(
        &agent,
        Duration::from_secs(30),
        "own records delivered",
        |s| sink_status(s, "api")["pending"] == 0,
    )
    .await;
    assert_eq!(s["records_pending"], 1, "only the dead letter waits: {s}");
    assert_eq!(s["ingest"]["records_staged"], 3, "{s}");
    let delivered: Vec<String> = server
        .requests()
        .iter()
        .map(|r| {
            format!(
                "{} {} {}",
                r.method,
                r.path,
                String::from_utf8_lossy(&r.body)
            )
        })
        .collect();
    assert!(
        delivered.iter().any(|r| r.contains("own-2"))
            && !delivered.iter().any(|r| r.contains("forged")),
        "the forged record never reached the central API: {delivered:?}"
    );
    assert!(
        agent
            .stderr()
            .contains("Refused a request for another host"),
        "the first refusal is logged: {}",
        log_tail(&agent, 20)
    );
}

/// A name in INGEST_ALLOWED_HOSTS (what clients on other machines call this one) is answered,
/// any other is not; the token still applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_in_ingest_allowed_hosts_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let token = "t".repeat(40);
    let env = [
        (
            "INGEST_ALLOWED_HOSTS",
            "estafeta-ws12.hospital.local, 10.0.4.12",
        ),
        ("INGEST_TOKEN", token.as_str()),
        ("CENTRAL_API_URL", "http://127.0.0.1:9"),
    ];
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;
    let port = agent.addr().port();
    let bearer = format!("Bearer {token}");
    let auth = [("Authorization", bearer.as_str())];
    for (host, id) in [
        (format!("ESTAFETA-WS12.hospital.local:{port}"), "ws12"),
        ("10.0.4.12".to_owned(), "by-ip"),
    ] {
        let (code, body) = post_as(&agent, &host, id, &auth).await;
        assert_eq!(code, 202, "Host {host}: {body}");
    }
    let (code, body) = post_as(&agent, "estafeta-ws12.hospital.local", "no-token", &[]).await;
    assert_eq!(code, 401, "{body}");
    for host in [
        "hospital.local",
        "estafeta-ws12.hospital.local.attacker.example",
    ] {
        let (code, body) = post_as(&agent, host, "other", &auth).await;
        assert_eq!(
            (code, body["error"].as_str()),
            (421, Some("host_not_allowed")),
            "{host}: {body}"
        );
    }
    let s = estafeta_e2e::status_with(&agent, Some(&token)).await;
    assert_eq!(s["records_pending"], 2, "{s}");
}

/// Beyond loopback a short token is refused before anything is opened or bound, by `run` and
/// by `check-config`, with what to do; a token from `estafeta token` is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_address_with_a_short_token_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("0.0.0.0:{}", free_port());
    let short = "0123456789";
    // Clear HTTP on purpose: this test is about the token (ingest_tls.rs covers TLS).
    let env = [
        ("INGEST_ADDR", addr.as_str()),
        ("INGEST_TOKEN", short),
        ("INGEST_ALLOW_PLAINTEXT", "true"),
        ("CENTRAL_API_URL", "http://127.0.0.1:9"),
    ];
    let started = Instant::now();
    let out = run_cli(dir.path(), &env, &["run"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "it fails at once"
    );
    for needed in [
        "INGEST_TOKEN has only 10 characters",
        "at least 32",
        "estafeta token",
    ] {
        assert!(stderr.contains(needed), "{needed:?} in: {stderr}");
    }
    assert!(
        !stderr.contains(short),
        "the token itself is not shown: {stderr}"
    );
    assert!(!dir.path().join("staging").exists(), "nothing was created");
    let check = run_cli(dir.path(), &env, &["check-config", "--offline"]).await;
    assert_eq!(check.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&check.stderr).contains("at least 32"));

    // A generated token is long enough, and it is required.
    let out = run_cli(dir.path(), &[], &["token"]).await;
    assert!(out.status.success());
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(token.len(), 64, "{token}");
    let mut agent = Agent::spec(dir.path())
        .envs(env)
        .env("INGEST_TOKEN", token.as_str())
        .spawn();
    agent.wait_ready(Duration::from_secs(20)).await;
    let (code, body) = agent.post("create", "patient", &json!({"id": 1})).await;
    assert_eq!(
        (code.as_u16(), body["error"].as_str()),
        (401, Some("unauthorized"))
    );
}

/// The packages keep the token in a file (`INGEST_TOKEN_FILE`): the API requires that token,
/// and the CLI, reading the same configuration, finds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_kept_in_ingest_token_file_is_required() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("ingest-token");
    let out = run_cli(dir.path(), &[], &["token"]).await;
    std::fs::write(&token_file, &out.stdout).unwrap();
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let file = token_file.to_str().unwrap();
    let env = [
        ("INGEST_TOKEN_FILE", file),
        ("CENTRAL_API_URL", "http://127.0.0.1:9"),
    ];
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;
    let (code, _) = agent.post("create", "patient", &json!({"id": 1})).await;
    assert_eq!(code.as_u16(), 401);
    let bearer = format!("Bearer {token}");
    let (code, body) = agent
        .post_with(
            "create",
            "patient",
            &json!({"id": 1}),
            &[("Authorization", &bearer)],
        )
        .await;
    assert_eq!(code.as_u16(), 202, "{body}");
    let check = run_cli(dir.path(), &env, &["check-config", "--offline"]).await;
    let shown = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{shown}");
    assert!(
        shown.contains("INGEST_TOKEN_FILE") && !shown.contains(&token),
        "check-config names the file and hides the token: {shown}"
    );
    let unreadable = run_cli(
        dir.path(),
        &[("INGEST_TOKEN_FILE", "missing-token")],
        &["status"],
    )
    .await;
    assert_eq!(unreadable.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unreadable.stderr).contains("could not read the token file"));
}
