//! TLS to MySQL / MariaDB (issue 20), against real servers: a throw-away MariaDB started by the
//! test with certificates made by the test (tests/src/mariadb_server.rs, tests/src/pki.rs),
//! and the shared MariaDB on 127.0.0.1:3306 (`scripts/start-services`), which has no TLS.
//! Each test starts its own server (they start in parallel) and runs its cases in sequence
//! against it; every message names its case. Never skipped: a missing `mariadbd` or `openssl`
//! fails with what to install.

mod common;

#[path = "../../tests/src/mariadb_server.rs"]
mod mariadb_server;
#[path = "../../tests/src/pki.rs"]
mod pki;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use common::{agent_id, delivery};
use estafeta::sinks::database::{self, DatabaseSinkConfig};
use estafeta::sinks::{Outcome, Sink};
use mariadb_server::{MariaDb, ServerTls};
use pki::Pki;

fn sink_at(url: &str, agent: &str) -> anyhow::Result<Arc<dyn Sink>> {
    database::build(
        "central",
        DatabaseSinkConfig {
            url: url.to_owned(),
            agent_id: agent.to_owned(),
            apply: None,
            idempotency_key: None,
            connections: database::DEFAULT_CONNECTIONS,
            transaction_pooling: false,
        },
    )
}

/// Delivers two records to `url` as a new agent; returns the outcomes and the agent id.
async fn deliver(case: &str, url: &str) -> (Vec<Outcome>, String, Arc<dyn Sink>) {
    let agent = agent_id();
    let sink = sink_at(url, &agent).unwrap_or_else(|err| panic!("{case}: the URL {url}: {err:#}"));
    let batch = vec![
        delivery("create", "patient", Some("p1"), r#"{"nome":"Ana"}"#),
        delivery("create", "patient", Some("p2"), r#"{"nome":"Rui"}"#),
    ];
    (sink.deliver(&batch).await, agent, sink)
}

fn retry_error(case: &str, outcomes: &[Outcome]) -> String {
    match outcomes.first() {
        Some(Outcome::Retry { error, .. }) => error.clone(),
        other => panic!("{case}: expected a retry with an error, got {other:?}"),
    }
}

/// Rows of `agent` in the throw-away server's landing table.
fn landed(db: &MariaDb, agent: &str) -> usize {
    // The agent id is a UUID made by the test: safe to quote.
    match db.try_sql(&format!(
        "SELECT count(*) FROM test.estafeta_records WHERE agent_id = '{agent}'"
    )) {
        Ok(out) => out.trim().parse().expect("a count"),
        // No sink ever got as far as creating it.
        Err(err) if err.contains("1146") => 0,
        Err(err) => panic!("counting rows: {err}"),
    }
}

/// TLS handshakes the server completed (its own counter).
fn handshakes(db: &MariaDb) -> u64 {
    let out = db.sql("SHOW GLOBAL STATUS LIKE 'Ssl_finished_accepts'");
    out.split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn server_with(dir: &Path, pki: &Pki, cert: &pki::Pair) -> MariaDb {
    let db = MariaDb::start(
        &dir.join("server"),
        Some(ServerTls {
            cert: &cert.cert,
            key: &cert.key,
            ca: &pki.ca(),
        }),
    );
    db.sql(
        "CREATE DATABASE IF NOT EXISTS test;
         CREATE USER 'estafeta'@'%';
         GRANT ALL ON test.* TO 'estafeta'@'%';
         CREATE USER 'certuser'@'%' REQUIRE SUBJECT '/CN=certuser';
         GRANT ALL ON test.* TO 'certuser'@'%';",
    );
    db
}

#[tokio::test]
async fn verified_tls_delivers_and_a_wrong_ca_or_a_missing_client_certificate_delivers_nothing() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let pki = Pki::new(&dir.path().join("pki"), "ca");
    let other = Pki::new(&dir.path().join("other"), "other");
    let server_cert = pki.server("server");
    let client = pki.client("certuser", "certuser");
    let db = server_with(dir.path(), &pki, &server_cert);
    let port = db.port;
    let ca = pki.ca();
    let ca = ca.display();

    // VERIFY_IDENTITY with the CA that signed the server's certificate: rows land, encrypted.
    let case = "VERIFY_IDENTITY, right CA";
    let before = handshakes(&db);
    let url =
        format!("mysql://estafeta@127.0.0.1:{port}/test?ssl-mode=VERIFY_IDENTITY&ssl-ca={ca}");
    let (outcomes, agent, sink) = deliver(case, &url).await;
    assert_eq!(outcomes, vec![Outcome::Delivered; 2], "{case}");
    assert_eq!(landed(&db, &agent), 2, "{case}: rows in estafeta_records");
    assert!(
        handshakes(&db) > before,
        "{case}: the server completed a TLS handshake"
    );
    let transport = sink.transport();
    assert!(
        transport.tls && transport.verified && transport.observed,
        "{case}: {transport:?}"
    );
    assert_eq!(transport.setting, "ssl-mode=VERIFY_IDENTITY", "{case}");

    // The same with the default: loopback + ssl-ca and no ssl-mode is VERIFY_IDENTITY.
    let case = "ssl-ca alone";
    let url = format!("mariadb://estafeta@localhost:{port}/test?ssl_ca={ca}");
    let (outcomes, agent, sink) = deliver(case, &url).await;
    assert_eq!(outcomes, vec![Outcome::Delivered; 2], "{case}");
    assert_eq!(landed(&db, &agent), 2, "{case}");
    assert!(sink.transport().verified, "{case}: {:?}", sink.transport());

    // A CA that signed nothing: nothing lands, and the error says why.
    let case = "VERIFY_IDENTITY, wrong CA";
    let url = format!(
        "mysql://estafeta@127.0.0.1:{port}/test?ssl-mode=VERIFY_IDENTITY&ssl-ca={}",
        other.ca().display()
    );
    let (outcomes, agent, sink) = deliver(case, &url).await;
    let error = retry_error(case, &outcomes);
    assert!(
        error.contains("not signed by the CA in ssl-ca=") && error.contains("UnknownIssuer"),
        "{case}: {error}"
    );
    assert_eq!(landed(&db, &agent), 0, "{case}");
    assert!(!sink.transport().observed, "{case}: never connected");
    let probe = format!("{:#}", sink.probe().await.unwrap_err());
    assert!(probe.contains("UnknownIssuer"), "{case}, probe: {probe}");

    // REQUIRED: encrypted, no check (the wrong CA does not matter).
    let case = "REQUIRED";
    let url = format!("mysql://estafeta@127.0.0.1:{port}/test?ssl-mode=REQUIRED");
    let (outcomes, agent, sink) = deliver(case, &url).await;
    assert_eq!(outcomes, vec![Outcome::Delivered; 2], "{case}");
    assert_eq!(landed(&db, &agent), 2, "{case}");
    let transport = sink.transport();
    assert!(
        transport.tls && !transport.verified,
        "{case}: {transport:?}"
    );

    // PREFERRED against a server with TLS: TLS.
    let case = "PREFERRED (default on loopback)";
    let url = format!("mysql://estafeta@127.0.0.1:{port}/test");
    let (outcomes, _, sink) = deliver(case, &url).await;
    assert_eq!(outcomes, vec![Outcome::Delivered; 2], "{case}");
    let transport = sink.transport();
    assert!(
        transport.tls && transport.observed && !transport.verified,
        "{case}: {transport:?}"
    );

    // A user that must present a certificate: with ssl-cert / ssl-key it delivers...
    let case = "client certificate";
    let url = format!(
        "mysql://certuser@127.0.0.1:{port}/test?ssl-mode=VERIFY_IDENTITY&ssl-ca={ca}&ssl-cert={}&ssl-key={}",
        client.cert.display(),
        client.key.display()
    );
    let (outcomes, agent, _) = deliver(case, &url).await;
    assert_eq!(outcomes, vec![Outcome::Delivered; 2], "{case}");
    assert_eq!(landed(&db, &agent), 2, "{case}");
    // ...and without them it is refused, saying what to give.
    let case = "client certificate missing";
    let url =
        format!("mysql://certuser@127.0.0.1:{port}/test?ssl-mode=VERIFY_IDENTITY&ssl-ca={ca}");
    let (outcomes, agent, _) = deliver(case, &url).await;
    let error = retry_error(case, &outcomes);
    assert!(
        error.contains("1045") && error.contains("ssl-cert"),
        "{case}: {error}"
    );
    assert_eq!(landed(&db, &agent), 0, "{case}");
    // A certificate of another CA is refused too.
    let case = "client certificate of another CA";
    let stranger = other.client("stranger", "certuser");
    let url = format!(
        "mysql://certuser@127.0.0.1:{port}/test?ssl-mode=VERIFY_IDENTITY&ssl-ca={ca}&ssl-cert={}&ssl-key={}",
        stranger.cert.display(),
        stranger.key.display()
    );
    let (outcomes, agent, _) = deliver(case, &url).await;
    retry_error(case, &outcomes);
    assert_eq!(landed(&db, &agent), 0, "{case}");

    // A key that does not belong to the certificate: a start error naming both files.
    let case = "mismatched key";
    let url = format!(
        "mysql://certuser@127.0.0.1:{port}/test?ssl-mode=VERIFY_IDENTITY&ssl-ca={ca}&ssl-cert={}&ssl-key={}",
        client.cert.display(),
        server_cert.key.display()
    );
    let err = format!("{:#}", sink_at(&url, "x").err().expect(case));
    assert!(
        err.contains("ssl-cert=") && err.contains("do not match"),
        "{case}: {err}"
    );

    // A SQL source over VERIFY_IDENTITY reads rows.
    let case = "source";
    let url =
        format!("mysql://estafeta@127.0.0.1:{port}/test?ssl-mode=VERIFY_IDENTITY&ssl-ca={ca}");
    let rows = estafeta::sources::query::fetch(
        &url,
        "SELECT VARIABLE_VALUE AS cipher FROM information_schema.SESSION_STATUS WHERE VARIABLE_NAME = 'SSL_CIPHER'",
        &BTreeMap::new(),
    )
    .await
    .unwrap_or_else(|err| panic!("{case}: {err:#}"))
    .rows;
    assert_eq!(rows.len(), 1, "{case}: {rows:?}");
    let cipher = rows[0][0].1.as_str().unwrap_or_default().to_owned();
    assert!(
        !cipher.is_empty(),
        "{case}: the source's session is encrypted: {rows:?}"
    );
    let url = format!(
        "mysql://estafeta@127.0.0.1:{port}/test?ssl-mode=VERIFY_IDENTITY&ssl-ca={}",
        other.ca().display()
    );
    let err = format!(
        "{:#}",
        estafeta::sources::query::fetch(&url, "SELECT 1", &BTreeMap::new())
            .await
            .unwrap_err()
    );
    assert!(err.contains("UnknownIssuer"), "{case}, wrong CA: {err}");
    drop(db);
}

#[tokio::test]
async fn verify_ca_accepts_a_certificate_for_another_name_and_verify_identity_refuses_it() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let pki = Pki::new(&dir.path().join("pki"), "ca");
    let named = pki.server_named("elsewhere", "db.elsewhere.example");
    let db = server_with(dir.path(), &pki, &named);
    let (port, ca) = (db.port, pki.ca());
    let ca = ca.display();

    let case = "VERIFY_IDENTITY, name mismatch";
    let url =
        format!("mysql://estafeta@127.0.0.1:{port}/test?ssl-mode=VERIFY_IDENTITY&ssl-ca={ca}");
    let (outcomes, agent, _) = deliver(case, &url).await;
    let error = retry_error(case, &outcomes);
    assert!(
        error.contains("not valid for the host 127.0.0.1") && error.contains("VERIFY_CA"),
        "{case}: {error}"
    );
    assert_eq!(landed(&db, &agent), 0, "{case}");

    let case = "VERIFY_CA, name mismatch";
    let url = format!("mysql://estafeta@127.0.0.1:{port}/test?ssl-mode=VERIFY_CA&ssl-ca={ca}");
    let (outcomes, agent, sink) = deliver(case, &url).await;
    assert_eq!(outcomes, vec![Outcome::Delivered; 2], "{case}");
    assert_eq!(landed(&db, &agent), 2, "{case}");
    let transport = sink.transport();
    assert!(transport.tls && transport.verified, "{case}: {transport:?}");
    // A second batch on a new connection (the remembered name).
    sink.probe()
        .await
        .unwrap_or_else(|err| panic!("{case}, second connection: {err:#}"));

    // `estafeta fleet` connects through the same code: a heartbeat over VERIFY_CA, read back.
    let case = "fleet over VERIFY_CA";
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let beat = estafeta::sinks::heartbeat::Heartbeat {
        agent_id: agent.clone(),
        hostname: "ward-3".into(),
        version: "test".into(),
        sent_at: now.clone(),
        started_at: now,
        records_pending: 0,
        oldest_pending_age_secs: None,
        dead_letters: 0,
        disk_free_bytes: None,
        staging_blocked: None,
        last_error: None,
        sinks: Vec::new(),
    };
    sink.heartbeat(&beat)
        .await
        .expect("a database sink takes heartbeats")
        .unwrap_or_else(|err| panic!("{case}, heartbeat: {err:#}"));
    let fleet = estafeta::fleet::load(&url)
        .await
        .unwrap_or_else(|err| panic!("{case}: {err:#}"));
    assert!(fleet.iter().any(|row| row.agent_id == agent), "{case}");
    let wrong =
        format!("mysql://estafeta@127.0.0.1:{port}/test?ssl-mode=VERIFY_IDENTITY&ssl-ca={ca}");
    let err = format!("{:#}", estafeta::fleet::load(&wrong).await.unwrap_err());
    assert!(
        err.contains("not valid for the host"),
        "{case}, name mismatch: {err}"
    );

    let case = "VERIFY_CA, wrong CA";
    let other = Pki::new(&dir.path().join("other"), "other");
    let url = format!(
        "mysql://estafeta@127.0.0.1:{port}/test?ssl-mode=VERIFY_CA&ssl-ca={}",
        other.ca().display()
    );
    let (outcomes, agent, _) = deliver(case, &url).await;
    let error = retry_error(case, &outcomes);
    assert!(error.contains("UnknownIssuer"), "{case}: {error}");
    assert_eq!(landed(&db, &agent), 0, "{case}");
    drop(db);
}

/// The shared MariaDB on 3306 has no TLS (`have_ssl` DISABLED).
#[tokio::test]
async fn a_server_without_tls_is_refused_when_tls_is_required_and_used_in_clear_when_preferred() {
    let case = "REQUIRED, server without TLS";
    let url = "mysql://root@127.0.0.1:3306/test?ssl-mode=REQUIRED";
    let (outcomes, agent, sink) = deliver(case, url).await;
    let error = retry_error(case, &outcomes);
    assert!(error.contains("does not support TLS"), "{case}: {error}");
    assert!(!sink.transport().observed, "{case}");

    let case = "PREFERRED, server without TLS";
    let url = "mysql://root@127.0.0.1:3306/test?ssl-mode=PREFERRED";
    let (outcomes, _, sink) = deliver(case, url).await;
    assert_eq!(
        outcomes,
        vec![Outcome::Delivered; 2],
        "{case} (is the shared MariaDB running? scripts/start-services)"
    );
    let transport = sink.transport();
    assert!(
        !transport.tls && transport.observed,
        "{case}: recorded as clear text: {transport:?}"
    );
    assert_eq!(
        transport.describe(),
        "clear text (ssl-mode=PREFERRED)",
        "{case}"
    );
    let _ = agent;
}

#[test]
fn the_drivers_require_ssl_is_a_clean_error_not_a_panic() {
    for url in [
        "mysql://root@127.0.0.1:3306/test?require_ssl=true",
        "mysql://root@db.hospital.example/test?require_ssl=true&verify_ca=false",
    ] {
        let result = std::panic::catch_unwind(|| sink_at(url, "x").err());
        let err = result
            .unwrap_or_else(|_| panic!("{url}: building the sink panicked"))
            .unwrap_or_else(|| panic!("{url}: refused"));
        assert!(format!("{err:#}").contains("ssl-mode"), "{url}: {err:#}");
    }
    let err = format!(
        "{:#}",
        sink_at("mysql://root@127.0.0.1:3306/test?ssl-mode=sometimes", "x")
            .err()
            .expect("an invalid ssl-mode is refused")
    );
    assert!(err.contains("ssl-mode=sometimes"), "{err}");
}

/// `ssl-mode=DISABLED` beyond loopback: one WARN when the sink is built, naming the sink and the
/// URL without its password.
#[test]
fn clear_text_beyond_loopback_is_one_warning_at_start() {
    #[derive(Clone, Default)]
    struct Lines(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let lines = Lines::default();
    let writer = lines.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        sink_at(
            "mysql://app:s3cret@db.hospital.example/central?ssl-mode=DISABLED",
            "x",
        )
        .expect("DISABLED is allowed");
        sink_at(
            "mysql://app:s3cret@127.0.0.1/central?ssl-mode=DISABLED",
            "x",
        )
        .expect("DISABLED is allowed");
    });
    let text = String::from_utf8(lines.0.lock().expect("lock").clone()).expect("UTF-8");
    let warnings: Vec<&str> = text.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "{text}");
    assert!(
        warnings[0].contains("central")
            && warnings[0].contains("db.hospital.example")
            && warnings[0].contains("clear text"),
        "{text}"
    );
    assert!(!text.contains("s3cret"), "{text}");
}
