//! The ingest API over HTTPS (issue 20, `INGEST_TLS_CERT` / `INGEST_TLS_KEY`) with the real
//! binary and a throw-away PKI (estafeta_e2e::pki): a client trusting the CA posts a record
//! (202), it is delivered; clear HTTP to the same port and a client that does not trust the CA
//! get nothing; a client that never finishes its handshake is disconnected; `estafeta status`
//! reaches the HTTPS API. A non-loopback `INGEST_ADDR` without TLS refuses to start (exit 2,
//! nothing staged) unless `INGEST_ALLOW_PLAINTEXT=true`, which starts with a WARN.

use std::io::Read as _;
use std::time::{Duration, Instant};

use estafeta_e2e::pki::Pki;
use estafeta_e2e::{Agent, free_port, run_cli};
use serde_json::json;

const TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_only_when_a_certificate_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"), "ca");
    let other = Pki::new(&dir.path().join("other"), "other");
    let server = pki.server("server");
    let (cert, key) = (
        server.cert.to_str().unwrap().to_owned(),
        server.key.to_str().unwrap().to_owned(),
    );
    let env = [
        ("INGEST_TLS_CERT", cert.as_str()),
        ("INGEST_TLS_KEY", key.as_str()),
        ("INGEST_BODY_TIMEOUT_SECS", "2"),
    ];
    let mut agent = Agent::spec(dir.path()).envs(env).https(pki.ca()).spawn();
    agent.wait_ready(Duration::from_secs(20)).await;

    // Verified HTTPS: staged (202), then delivered to the default sink.
    let (code, body) = agent
        .post("create", "patient", &json!({"id": 1, "name": "canary"}))
        .await;
    assert_eq!(code.as_u16(), 202, "{body}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, status) = agent.get("/v1/status").await;
        assert_eq!(code.as_u16(), 200, "{status}");
        if status["records_pending"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the record was not delivered: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(dir.path().join("central.db").exists());

    // Clear HTTP to the HTTPS port gets no answer.
    let plain = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let addr = agent.addr();
    let answer = plain.get(format!("http://{addr}/healthz")).send().await;
    assert!(answer.is_err(), "clear HTTP must not be served: {answer:?}");
    // A client that does not trust the certificate refuses it.
    let stranger = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .tls_built_in_root_certs(false)
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(other.ca()).unwrap()).unwrap(),
        )
        .build()
        .unwrap();
    let answer = stranger.get(format!("https://{addr}/healthz")).send().await;
    assert!(answer.is_err(), "an untrusted certificate: {answer:?}");

    // A client that opens a connection and never starts its handshake is dropped after the
    // timeout (2 s here), not held forever.
    let started = Instant::now();
    let mut idle = std::net::TcpStream::connect(addr).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut buf = [0u8; 16];
    let read = idle.read(&mut buf);
    assert!(
        matches!(read, Ok(0))
            || read
                .as_ref()
                .is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::TimedOut),
        "the idle connection must be closed by the agent: {read:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "closed after {:?}",
        started.elapsed()
    );

    // `estafeta status` reaches the running agent over HTTPS, trusting INGEST_TLS_CERT.
    let addr_text = addr.to_string();
    let mut cli_env = env.to_vec();
    cli_env.push(("INGEST_ADDR", addr_text.as_str()));
    let out = run_cli(dir.path(), &cli_env, &["status"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        !stdout.contains("no agent of this staging folder answered"),
        "status must reach the agent over HTTPS: {stdout}"
    );

    // Graceful stop still works over TLS.
    agent.terminate();
    let status = agent.wait(Duration::from_secs(15)).await;
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_address_without_tls_refuses_to_start_unless_waived() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("0.0.0.0:{}", free_port());
    let env = [
        ("INGEST_ADDR", addr.as_str()),
        ("INGEST_TOKEN", TOKEN),
        ("CENTRAL_API_URL", "http://127.0.0.1:9"),
    ];
    let out = run_cli(dir.path(), &env, &["run"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a configuration error: {stderr}"
    );
    for needed in ["INGEST_TLS_CERT", "INGEST_ALLOW_PLAINTEXT", "in clear text"] {
        assert!(stderr.contains(needed), "{needed:?} in: {stderr}");
    }
    assert!(!stderr.contains(TOKEN), "{stderr}");
    assert!(
        !dir.path().join("staging").exists(),
        "nothing was created before refusing"
    );

    // Waived on purpose: it starts, and says what that means.
    let mut agent = Agent::spec(dir.path())
        .envs(env)
        .env("INGEST_ALLOW_PLAINTEXT", "true")
        .spawn();
    agent.wait_ready(Duration::from_secs(20)).await;
    let stderr = agent.stderr();
    assert!(
        stderr.contains("INGEST_ALLOW_PLAINTEXT=true") && stderr.contains("clear HTTP"),
        "{stderr}"
    );
}
