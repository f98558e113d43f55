//! PostgreSQL over TLS with libpq's URL parameters, against real servers: the machine's
//! PostgreSQL on 127.0.0.1:5432 (ssl = on with Debian's snakeoil certificate,
//! `scripts/start-services`) and throw-away clusters started here (`tests/src/pg_cluster.rs`)
//! with certificates from a throw-away CA (`tests/src/pki.rs`). Never skipped: a missing
//! server or binary fails with what to install.
//!
//! Each protection is checked by what the server saw (`pg_stat_ssl` for the sink's own
//! backend) and by what landed (`estafeta_records`), not by the sink's word.

mod common;

#[path = "../../tests/src/pg_cluster.rs"]
#[allow(dead_code)]
mod pg_cluster;
#[path = "../../tests/src/pki.rs"]
#[allow(dead_code)]
mod pki;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::{agent_id, delivery, ids};
use estafeta::sinks::database::{self, DatabaseSinkConfig};
use estafeta::sinks::{Outcome, Sink};
use pg_cluster::{PgCluster, ServerTls};
use tokio_postgres::{Client, NoTls};

/// A connection for checking what the server saw, in clear over loopback.
async fn checker(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|err| panic!("cannot connect to PostgreSQL at {url}: {err}"));
    tokio::spawn(connection);
    client
}

fn sink_at(url: &str, agent: &str) -> anyhow::Result<Arc<dyn Sink>> {
    database::build(
        "central",
        DatabaseSinkConfig {
            url: url.to_owned(),
            agent_id: agent.to_owned(),
            apply: None,
            idempotency_key: None,
            connections: 1,
            transaction_pooling: false,
        },
    )
}

fn batch() -> Vec<estafeta_staging::Delivery> {
    vec![
        delivery("upsert", "patient", Some("p/1"), r#"{"nome":"Ana"}"#),
        delivery("create", "event", None, r#"[1]"#),
    ]
}

/// How many of `batch`'s records are in the landing table (0 when it does not exist).
async fn landed(client: &Client, batch: &[estafeta_staging::Delivery]) -> i64 {
    let exists: bool = client
        .query_one("SELECT to_regclass('estafeta_records') IS NOT NULL", &[])
        .await
        .expect("to_regclass")
        .get(0);
    if !exists {
        return 0;
    }
    client
        .query_one(
            "SELECT count(*) FROM estafeta_records WHERE idempotency_key = ANY($1)",
            &[&ids(batch)],
        )
        .await
        .expect("count rows")
        .get(0)
}

/// `pg_stat_ssl.ssl` of every backend with this application name.
async fn ssl_of(client: &Client, application: &str) -> Vec<bool> {
    client
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = $1",
            &[&application],
        )
        .await
        .expect("pg_stat_ssl")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Every outcome is a retry (nothing delivered, nothing dead); the errors.
fn retries(outcomes: &[Outcome]) -> Vec<String> {
    outcomes
        .iter()
        .map(|o| match o {
            Outcome::Retry { error, .. } => error.clone(),
            other => panic!("expected a retry, got {other:?}"),
        })
        .collect()
}

/// A throw-away CA, a server certificate for loopback signed by it, and a client
/// certificate for the user `postgres`; `other` is a CA that signed nothing here.
struct Certs {
    _dir: tempfile::TempDir,
    ca: std::path::PathBuf,
    other_ca: std::path::PathBuf,
    server: pki::Pair,
    client: pki::Pair,
}

fn certs() -> Certs {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let pki = pki::Pki::new(&dir.path().join("ca"), "ca");
    let other = pki::Pki::new(&dir.path().join("other"), "other");
    Certs {
        ca: pki.ca(),
        other_ca: other.ca(),
        server: pki.server("server"),
        client: pki.client("client", "postgres"),
        _dir: dir,
    }
}

/// The cluster the TLS cases use: TLS with the throw-away CA's server certificate; database
/// `certdb` only by client certificate, everything else trusted (TLS or not).
const HBA: &str =
    "local all all trust\nhostssl certdb all 127.0.0.1/32 cert\nhost all all 127.0.0.1/32 trust\n";

fn tls_cluster(certs: &Certs) -> PgCluster {
    PgCluster::start(
        Some(&ServerTls {
            cert: certs.server.cert.clone(),
            key: certs.server.key.clone(),
            client_ca: Some(certs.ca.clone()),
        }),
        HBA,
    )
}

#[tokio::test]
async fn verify_full_with_the_right_ca_delivers_over_tls_and_a_wrong_ca_or_name_delivers_nothing() {
    let certs = certs();
    let cluster = tls_cluster(&certs);
    let check = checker(&cluster.url("postgres", "")).await;

    // verify-full with the CA that signed the server's certificate: delivered, over TLS.
    let url = cluster.url(
        "postgres",
        &format!("?sslmode=verify-full&sslrootcert={}", certs.ca.display()),
    );
    let sink = sink_at(&url, &agent_id()).expect("a valid URL");
    let before = sink.transport();
    assert!(
        before.tls && before.verified && !before.observed,
        "{before:?}"
    );
    let good = batch();
    assert_eq!(sink.deliver(&good).await, vec![Outcome::Delivered; 2]);
    assert_eq!(landed(&check, &good).await, 2);
    assert_eq!(
        ssl_of(&check, "estafeta").await,
        vec![true],
        "the sink's backend uses TLS"
    );
    let after = sink.transport();
    assert!(after.tls && after.verified && after.observed, "{after:?}");
    assert_eq!(
        after.describe(),
        "TLS, verified (sslmode=verify-full)",
        "{after:?}"
    );
    drop(sink);

    // A CA that did not sign the server's certificate: nothing delivered, and why.
    for mode in ["verify-full", "verify-ca", "require"] {
        let url = cluster.url(
            "postgres",
            &format!("?sslmode={mode}&sslrootcert={}", certs.other_ca.display()),
        );
        let sink = sink_at(&url, &agent_id()).expect("a valid URL");
        let refused = batch();
        for error in retries(&sink.deliver(&refused).await) {
            assert!(
                error.contains(&format!(
                    "not signed by the CA in sslrootcert={}",
                    certs.other_ca.display()
                )) && error.contains("UnknownIssuer"),
                "{mode}: {error}"
            );
        }
        assert_eq!(landed(&check, &refused).await, 0, "{mode}");
        assert!(!sink.transport().observed, "{mode}: never connected");
    }

    // A name the certificate does not hold (db.example.invalid, connected at 127.0.0.1 by
    // hostaddr): verify-ca accepts it, verify-full refuses it.
    let named = |mode: &str| {
        format!(
            "postgres://postgres@db.example.invalid:{}/postgres?hostaddr=127.0.0.1&sslmode={mode}&sslrootcert={}",
            cluster.port,
            certs.ca.display()
        )
    };
    let sink = sink_at(&named("verify-full"), &agent_id()).expect("a valid URL");
    let refused = batch();
    for error in retries(&sink.deliver(&refused).await) {
        assert!(
            error.contains("not valid for the name db.example.invalid")
                && error.contains("sslmode=verify-ca"),
            "{error}"
        );
    }
    assert_eq!(landed(&check, &refused).await, 0);
    let sink = sink_at(&named("verify-ca"), &agent_id()).expect("a valid URL");
    let good = batch();
    assert_eq!(sink.deliver(&good).await, vec![Outcome::Delivered; 2]);
    assert_eq!(landed(&check, &good).await, 2);
    let t = sink.transport();
    assert!(t.tls && t.verified && t.observed, "{t:?}");

    // sslmode=disable to the same server: clear text, and pg_stat_ssl says so (the check above
    // can tell the difference).
    let check_clear = checker(&cluster.url("postgres", "")).await;
    let url = cluster.url(
        "postgres",
        "?sslmode=disable&application_name=estafeta-clear",
    );
    let sink = sink_at(&url, &agent_id()).expect("a valid URL");
    assert_eq!(sink.deliver(&batch()).await, vec![Outcome::Delivered; 2]);
    assert_eq!(ssl_of(&check_clear, "estafeta-clear").await, vec![false]);
    assert!(!sink.transport().tls);
    drop(cluster);
}

#[tokio::test]
async fn client_certificate_authentication_works_and_without_it_the_server_refuses() {
    let certs = certs();
    let cluster = tls_cluster(&certs);
    {
        let admin = checker(&cluster.url("postgres", "")).await;
        admin
            .batch_execute("CREATE DATABASE certdb")
            .await
            .expect("CREATE DATABASE");
    }
    let base = format!("?sslmode=verify-full&sslrootcert={}", certs.ca.display());

    // Without a client certificate: refused by pg_hba's `cert`, nothing delivered.
    let sink = sink_at(&cluster.url("certdb", &base), &agent_id()).expect("a valid URL");
    let refused = batch();
    for error in retries(&sink.deliver(&refused).await) {
        assert!(
            error.contains("28000") && error.contains("certificate"),
            "{error}"
        );
    }

    // With it (CN=postgres): delivered.
    let url = cluster.url(
        "certdb",
        &format!(
            "{base}&sslcert={}&sslkey={}",
            certs.client.cert.display(),
            certs.client.key.display()
        ),
    );
    let sink = sink_at(&url, &agent_id()).expect("a valid URL");
    let good = batch();
    assert_eq!(sink.deliver(&good).await, vec![Outcome::Delivered; 2]);
    // Read back over the same kind of connection (certdb admits only certificates).
    let (client, connection) = estafeta::db::postgres_tls::PgTls::from_url(&url)
        .expect("the URL")
        .connect()
        .await
        .expect("a connection with the client certificate");
    tokio::spawn(connection);
    assert_eq!(landed(&client, &good).await, 2);
    assert_eq!(landed(&client, &refused).await, 0);

    // A key others may read is refused at start, as libpq does.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&certs.client.key, std::fs::Permissions::from_mode(0o644))
        .expect("chmod");
    let err = format!("{:#}", sink_at(&url, &agent_id()).err().expect("refused"));
    assert!(err.contains("chmod 600"), "{err}");
    drop(cluster);
}

#[tokio::test]
async fn a_source_reads_rows_over_verify_full() {
    let certs = certs();
    let cluster = tls_cluster(&certs);
    let url = cluster.url(
        "postgres",
        &format!(
            "?sslmode=verify-full&sslrootcert={}&application_name=estafeta-source",
            certs.ca.display()
        ),
    );
    let rows = estafeta::sources::query::fetch(
        &url,
        "SELECT ssl, 'ok' AS word FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        &BTreeMap::new(),
    )
    .await
    .expect("rows")
    .rows;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0][0],
        ("ssl".to_owned(), serde_json::Value::Bool(true))
    );
    // The wrong CA: no rows, and why.
    let url = cluster.url(
        "postgres",
        &format!(
            "?sslmode=verify-full&sslrootcert={}",
            certs.other_ca.display()
        ),
    );
    let err = format!(
        "{:#}",
        estafeta::sources::query::fetch(&url, "SELECT 1 AS one", &BTreeMap::new())
            .await
            .expect_err("refused")
    );
    assert!(err.contains("UnknownIssuer"), "{err}");
    drop(cluster);
}

#[tokio::test]
async fn require_against_a_server_without_tls_delivers_nothing_and_prefer_says_clear_text() {
    let cluster = PgCluster::start(
        None,
        "local all all trust\nhost all all 127.0.0.1/32 trust\n",
    );
    let check = checker(&cluster.url("postgres", "")).await;
    let sink = sink_at(&cluster.url("postgres", "?sslmode=require"), &agent_id()).expect("URL");
    let refused = batch();
    for error in retries(&sink.deliver(&refused).await) {
        assert!(
            error.contains("the server does not support TLS")
                && error.contains("sslmode=require forbids clear text"),
            "{error}"
        );
    }
    assert_eq!(landed(&check, &refused).await, 0);

    // prefer (the loopback default) goes on in clear, and the transport says so after.
    let sink = sink_at(&cluster.url("postgres", ""), &agent_id()).expect("URL");
    assert!(!sink.transport().observed);
    assert_eq!(sink.deliver(&batch()).await, vec![Outcome::Delivered; 2]);
    let t = sink.transport();
    assert!(t.observed && !t.tls, "{t:?}");
    assert_eq!(
        t.describe(),
        "clear text (sslmode=prefer (default on loopback), TLS if the server offers it)"
    );
    drop(cluster);
}

/// The machine's PostgreSQL (ssl = on, Debian's snakeoil certificate for `localhost`).
const LOCAL: &str = "postgres://postgres@127.0.0.1:5432/test";

#[tokio::test]
async fn the_local_server_require_delivers_over_tls_and_verify_full_refuses_its_certificate() {
    let check = checker(LOCAL).await;
    let application = format!("estafeta-tls-{}", agent_id());
    let sink = sink_at(
        &format!("{LOCAL}?sslmode=require&application_name={application}"),
        &agent_id(),
    )
    .expect("URL");
    let good = batch();
    assert_eq!(sink.deliver(&good).await, vec![Outcome::Delivered; 2]);
    assert_eq!(landed(&check, &good).await, 2);
    assert_eq!(ssl_of(&check, &application).await, vec![true]);
    let t = sink.transport();
    assert!(t.tls && !t.verified && t.observed, "{t:?}");

    // No sslrootcert: the system's trust store, which did not sign the snakeoil certificate
    // (or, where the store links it, a certificate for `localhost` reached as 127.0.0.1).
    let sink = sink_at(&format!("{LOCAL}?sslmode=verify-full"), &agent_id()).expect("URL");
    let refused = batch();
    for error in retries(&sink.deliver(&refused).await) {
        assert!(
            error.contains("UnknownIssuer") || error.contains("not valid for the name 127.0.0.1"),
            "{error}"
        );
        eprintln!("verify-full against the local server: {error}");
    }
    assert_eq!(landed(&check, &refused).await, 0);
}

#[test]
fn bad_tls_settings_are_errors_when_the_sink_is_built() {
    let err = |url: &str| format!("{:#}", sink_at(url, "a").err().expect(url));
    let e = err("postgres://u:hunter2@db.example/x?sslmode=verify-fullest");
    assert!(e.contains("not a libpq sslmode"), "{e}");
    assert!(!e.contains("hunter2"), "{e}");
    let e = err("postgres://u@db.example/x?sslrootcert=/nonexistent/ca.pem");
    assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("bad.key");
    let cert = dir.path().join("c.pem");
    std::fs::write(&key, "not a key").unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let pki = pki::Pki::new(dir.path(), "ca");
    std::fs::copy(pki.ca(), &cert).unwrap();
    let e = err(&format!(
        "postgres://u@db.example/x?sslcert={}&sslkey={}",
        cert.display(),
        key.display()
    ));
    assert!(e.contains("cannot read the private key"), "{e}");
}
