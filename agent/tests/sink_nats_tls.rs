//! The JetStream sink's TLS and authentication (issue 20) against real nats-servers started by
//! each test (tests/src/nats_server.rs: own config, free loopback port, killed on drop) with a
//! throw-away PKI (tests/src/pki.rs): `tls://` verified with the right CA delivers; a CA that
//! signed nothing, a name mismatch, `tls_required` against a server without TLS, a missing client
//! certificate and a wrong NKey seed deliver nothing and say why; the settings' mistakes are
//! configuration errors. A `.creds` file (operator → account → user JWTs made by the test, as nsc
//! would) authenticates; a user of an unknown account does not. Needs the Debian packages nats-server and openssl
//! (scripts/install-deps); a missing one fails the test.

mod common;
#[allow(dead_code)]
#[path = "../../tests/src/nats_server.rs"]
mod nats_server;
#[allow(dead_code)]
#[path = "../../tests/src/pki.rs"]
mod pki;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{agent_id, delivery};
use estafeta::sinks::nats::{NatsSink, NatsSinkConfig, Retention, StreamSettings};
use estafeta::sinks::{Outcome, Sink};
use estafeta_staging::Delivery;
use nats_server::{NatsServer, NatsServerSettings};
use pki::Pki;

const STREAM: &str = "TLSTEST";

/// A sink that creates its stream (`STREAM`, capturing `estafeta.>`) on connection.
fn config(url: String) -> NatsSinkConfig {
    NatsSinkConfig {
        url,
        subject: "estafeta.{entity}.{action}".into(),
        timeout: Duration::from_secs(3),
        agent_id: agent_id(),
        stream: Some(StreamSettings {
            name: STREAM.into(),
            subjects: vec!["estafeta.>".into()],
            retention: Retention::Limits,
            replicas: 1,
            duplicate_window: None,
        }),
        ..Default::default()
    }
}

fn batch() -> Vec<Delivery> {
    let key = uuid::Uuid::now_v7().to_string();
    (0..3)
        .map(|i| {
            delivery(
                "create",
                "patient",
                Some(&key),
                &format!(r#"{{"name":"canary-{i}"}}"#),
            )
        })
        .collect()
}

/// Delivers one batch; `Ok` when every record was delivered, else the first error.
async fn deliver(sink: &NatsSink) -> Result<(), String> {
    let batch = batch();
    let outcomes = sink.deliver(&batch).await;
    for outcome in outcomes {
        match outcome {
            Outcome::Delivered => {}
            Outcome::Retry { error, .. } => return Err(error),
            other => return Err(format!("{other:?}")),
        }
    }
    Ok(())
}

/// Messages in `STREAM`, read by a client of the test's own (the sink's view is not trusted);
/// 0 when the stream was never created.
async fn stored(options: async_nats::ConnectOptions, url: &str) -> u64 {
    let client = options
        .connect(url)
        .await
        .unwrap_or_else(|err| panic!("the test's own client cannot connect to {url}: {err}"));
    let js = async_nats::jetstream::new(client);
    match js.get_stream(STREAM).await {
        Ok(mut stream) => stream.info().await.expect("stream info").state.messages,
        Err(_) => 0,
    }
}

/// The test's own client options for a TLS server signed by `ca`.
fn tls_checker(ca: &Path) -> async_nats::ConnectOptions {
    async_nats::ConnectOptions::new()
        .require_tls(true)
        .add_root_certificates(ca.to_path_buf())
}

struct Site {
    _dir: tempfile::TempDir,
    pki: Pki,
    other: Pki,
    root: PathBuf,
}

fn site() -> Site {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().to_path_buf();
    let pki = Pki::new(&root.join("pki"), "ca");
    let other = Pki::new(&root.join("other"), "other");
    Site {
        _dir: dir,
        pki,
        other,
        root,
    }
}

#[tokio::test]
async fn tls_url_with_the_right_ca_delivers_verified_and_a_wrong_ca_delivers_nothing() {
    let site = site();
    let server_pair = site.pki.server("server");
    let server = NatsServer::start(
        &site.root.join("nats"),
        &NatsServerSettings {
            tls: Some((server_pair.cert.clone(), server_pair.key.clone())),
            ..Default::default()
        },
    );
    let url = server.url("tls", "127.0.0.1");

    // A CA that signed nothing: not one record reaches the server, and the error says why.
    let wrong = NatsSink::new(
        "nats",
        NatsSinkConfig {
            ca_file: Some(site.other.ca()),
            ..config(url.clone())
        },
    )
    .expect("a valid sink");
    let err = deliver(&wrong).await.expect_err("a wrong CA must refuse");
    assert!(
        err.contains("UnknownIssuer") && err.contains("not signed by the CA in ca_file="),
        "{err}"
    );
    assert!(!wrong.transport().observed, "{:?}", wrong.transport());
    // Without a CA file: the system's store does not know the test CA either.
    let system = NatsSink::new("nats", config(url.clone())).expect("a valid sink");
    let err = deliver(&system)
        .await
        .expect_err("an unknown CA must refuse");
    assert!(
        err.contains("UnknownIssuer") && err.contains("CENTRAL_NATS_CA_FILE"),
        "{err}"
    );
    assert_eq!(stored(tls_checker(&site.pki.ca()), &url).await, 0);

    // The right CA: delivered, and the stream holds the three messages.
    let right = NatsSink::new(
        "nats",
        NatsSinkConfig {
            ca_file: Some(site.pki.ca()),
            ..config(url.clone())
        },
    )
    .expect("a valid sink");
    assert_eq!(right.transport().setting, "tls://");
    deliver(&right)
        .await
        .expect("verified delivery over tls://");
    assert_eq!(stored(tls_checker(&site.pki.ca()), &url).await, 3);
    let transport = right.transport();
    assert!(
        transport.tls && transport.verified && transport.observed,
        "{transport:?}"
    );

    // A server whose certificate (signed by the right CA) names another host is refused.
    let named = site.pki.server_named("named", "nats.elsewhere.example");
    let elsewhere = NatsServer::start(
        &site.root.join("nats-named"),
        &NatsServerSettings {
            tls: Some((named.cert.clone(), named.key.clone())),
            ..Default::default()
        },
    );
    let mismatch = NatsSink::new(
        "nats",
        NatsSinkConfig {
            ca_file: Some(site.pki.ca()),
            ..config(elsewhere.url("tls", "127.0.0.1"))
        },
    )
    .expect("a valid sink");
    let err = deliver(&mismatch)
        .await
        .expect_err("a name mismatch must refuse");
    assert!(err.contains("does not name the host"), "{err}");
    drop(elsewhere);

    // A loopback nats:// with no setting: the server asks for TLS, the transport says so.
    let asked = NatsSink::new(
        "nats",
        NatsSinkConfig {
            ca_file: Some(site.pki.ca()),
            ..config(server.url("nats", "localhost"))
        },
    )
    .expect("a valid sink");
    assert!(!asked.transport().tls, "{:?}", asked.transport());
    deliver(&asked)
        .await
        .expect("delivery when the server asks for TLS");
    let transport = asked.transport();
    assert!(
        transport.tls && transport.verified && transport.observed,
        "{transport:?}"
    );
    assert_eq!(stored(tls_checker(&site.pki.ca()), &url).await, 6);
}

#[tokio::test]
async fn tls_required_on_nats_url_never_falls_back_to_clear_text() {
    let site = site();
    let server = NatsServer::start(&site.root.join("nats"), &NatsServerSettings::default());
    let url = server.url("nats", "127.0.0.1");
    let required = NatsSink::new(
        "nats",
        NatsSinkConfig {
            tls_required: Some(true),
            ca_file: Some(site.pki.ca()),
            ..config(url.clone())
        },
    )
    .expect("a valid sink");
    assert!(required.transport().tls);
    let err = deliver(&required)
        .await
        .expect_err("TLS required against a clear-text server must refuse");
    assert!(
        err.contains("TLS is required") && err.contains("nothing was sent in clear"),
        "{err}"
    );
    assert_eq!(
        stored(async_nats::ConnectOptions::new(), &url).await,
        0,
        "nothing may reach a server without TLS"
    );

    // The control: the same server takes the records when TLS is not required, so the check
    // above can fail.
    let clear = NatsSink::new(
        "nats",
        NatsSinkConfig {
            tls_required: Some(false),
            ..config(url.clone())
        },
    )
    .expect("a valid sink");
    deliver(&clear)
        .await
        .expect("clear-text delivery on loopback");
    assert_eq!(stored(async_nats::ConnectOptions::new(), &url).await, 3);
    let transport = clear.transport();
    assert!(!transport.tls && transport.observed, "{transport:?}");
}

#[tokio::test]
async fn client_certificate_is_required_by_a_verifying_server() {
    let site = site();
    let server_pair = site.pki.server("server");
    let client_pair = site.pki.client("client", "estafeta");
    let server = NatsServer::start(
        &site.root.join("nats"),
        &NatsServerSettings {
            tls: Some((server_pair.cert.clone(), server_pair.key.clone())),
            verify_clients_with: Some(site.pki.ca()),
            ..Default::default()
        },
    );
    let url = server.url("tls", "127.0.0.1");
    let checker = || {
        tls_checker(&site.pki.ca())
            .add_client_certificate(client_pair.cert.clone(), client_pair.key.clone())
    };

    let without = NatsSink::new(
        "nats",
        NatsSinkConfig {
            ca_file: Some(site.pki.ca()),
            ..config(url.clone())
        },
    )
    .expect("a valid sink");
    let err = deliver(&without)
        .await
        .expect_err("no client certificate must be refused");
    assert!(err.contains("client_cert and client_key"), "{err}");
    eprintln!("without a client certificate: {err}");
    assert_eq!(stored(checker(), &url).await, 0);

    let with = NatsSink::new(
        "nats",
        NatsSinkConfig {
            ca_file: Some(site.pki.ca()),
            client_cert: Some(client_pair.cert.clone()),
            client_key: Some(client_pair.key.clone()),
            ..config(url.clone())
        },
    )
    .expect("a valid sink");
    deliver(&with)
        .await
        .expect("delivery with the client certificate");
    assert_eq!(stored(checker(), &url).await, 3);
}

#[tokio::test]
async fn nkey_authentication_works_and_a_wrong_seed_is_refused() {
    let site = site();
    let user = nkeys::KeyPair::new_user();
    let stranger = nkeys::KeyPair::new_user();
    let server = NatsServer::start(
        &site.root.join("nats"),
        &NatsServerSettings {
            nkey_users: vec![user.public_key()],
            ..Default::default()
        },
    );
    let url = server.url("nats", "127.0.0.1");
    let seed_file = |name: &str, pair: &nkeys::KeyPair| {
        let path = site.root.join(name);
        std::fs::write(&path, format!("{}\n", pair.seed().expect("a seed"))).expect("seed file");
        path
    };
    let good = seed_file("good.nk", &user);
    let bad = seed_file("bad.nk", &stranger);
    let checker = || async_nats::ConnectOptions::new().nkey(user.seed().expect("a seed"));

    let wrong = NatsSink::new(
        "nats",
        NatsSinkConfig {
            nkey_file: Some(bad),
            ..config(url.clone())
        },
    )
    .expect("a valid sink");
    let err = deliver(&wrong)
        .await
        .expect_err("a wrong seed must be refused");
    assert!(err.contains("NKey seed"), "{err}");
    eprintln!("wrong NKey seed: {err}");
    let stranger_seed = stranger.seed().expect("a seed");
    assert!(!err.contains(&stranger_seed), "the seed leaked: {err}");
    assert_eq!(stored(checker(), &url).await, 0);

    let right = NatsSink::new(
        "nats",
        NatsSinkConfig {
            nkey_file: Some(good),
            ..config(url.clone())
        },
    )
    .expect("a valid sink");
    deliver(&right).await.expect("delivery with the NKey");
    assert_eq!(stored(checker(), &url).await, 3);
}

/// Loads the flat keys `env` (as the agent would read them) and returns the configuration
/// error, or `None` when it loads.
fn config_error(env: &[(&str, String)]) -> Option<String> {
    let dir = tempfile::tempdir().expect("temp dir");
    let env: BTreeMap<String, String> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    estafeta::config::Config::inspect(dir.path(), None, &env)
        .result
        .err()
        .map(|err| format!("{err:#}"))
}

#[test]
fn mistakes_in_the_nats_security_settings_are_configuration_errors() {
    let site = site();
    let url = (
        "CENTRAL_NATS_URL",
        "tls://nats.hospital.example:4222".to_owned(),
    );
    let missing = site.root.join("missing.creds").display().to_string();

    let err = config_error(&[url.clone(), ("CENTRAL_NATS_CREDS_FILE", missing.clone())])
        .expect("a missing creds file is an error");
    assert!(err.contains("CENTRAL_NATS_CREDS_FILE"), "{err}");
    let err = config_error(&[url.clone(), ("CENTRAL_NATS_NKEY_FILE", missing.clone())])
        .expect("a missing seed file is an error");
    assert!(err.contains("CENTRAL_NATS_NKEY_FILE"), "{err}");

    let seed = site.root.join("user.nk");
    std::fs::write(&seed, nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
    let err = config_error(&[
        url.clone(),
        ("CENTRAL_NATS_NKEY_FILE", seed.display().to_string()),
        ("CENTRAL_NATS_TOKEN", "s3cret-token".to_owned()),
    ])
    .expect("two authentication methods are an error");
    assert!(
        err.contains("token") && err.contains("nkey_file") && !err.contains("s3cret-token"),
        "{err}"
    );

    let client = site.pki.client("client", "estafeta");
    let err = config_error(&[
        url.clone(),
        (
            "CENTRAL_NATS_CLIENT_CERT",
            client.cert.display().to_string(),
        ),
    ])
    .expect("a certificate without its key is an error");
    assert!(err.contains("CENTRAL_NATS_CLIENT_KEY"), "{err}");

    let err = config_error(&[
        url.clone(),
        ("CENTRAL_NATS_TLS_REQUIRED", "false".to_owned()),
    ])
    .expect("tls:// with tls_required=false is an error");
    assert!(err.contains("CENTRAL_NATS_TLS_REQUIRED"), "{err}");

    assert_eq!(
        config_error(&[
            url.clone(),
            ("CENTRAL_NATS_NKEY_FILE", seed.display().to_string()),
            ("CENTRAL_NATS_CA_FILE", site.pki.ca().display().to_string()),
        ]),
        None
    );

    // A file that is there but holds no seed or no credentials: refused when the sink is
    // built (at start), without showing the file's content.
    let junk = site.root.join("junk");
    std::fs::write(&junk, "not-a-secret-but-not-a-seed\n").unwrap();
    for config in [
        NatsSinkConfig {
            nkey_file: Some(junk.clone()),
            ..self::config("tls://nats.hospital.example:4222".into())
        },
        NatsSinkConfig {
            creds_file: Some(junk.clone()),
            ..self::config("tls://nats.hospital.example:4222".into())
        },
    ] {
        let err = format!(
            "{:#}",
            NatsSink::new("nats", config).err().expect("refused")
        );
        assert!(
            !err.contains("not-a-secret") && err.contains(&junk.display().to_string()),
            "{err}"
        );
    }

    // Beyond loopback TLS is the default, verified; on loopback the server decides.
    let remote = NatsSink::new("nats", config("nats://nats.hospital.example:4222".into()))
        .expect("a valid sink");
    let transport = remote.transport();
    assert!(transport.tls && transport.verified, "{transport:?}");
    assert!(transport.setting.contains("default beyond loopback"));
    let local =
        NatsSink::new("nats", config("nats://127.0.0.1:4222".into())).expect("a valid sink");
    assert!(!local.transport().tls);
}

/// A NATS JWT (`header.claims.signature`, base64url without padding) signed by `signer`.
fn jwt(claims: serde_json::Value, signer: &nkeys::KeyPair) -> String {
    use base64::Engine as _;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let signed = format!(
        "{}.{}",
        b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#),
        b64(claims.to_string().as_bytes())
    );
    let signature = signer.sign(signed.as_bytes()).expect("signing the JWT");
    format!("{signed}.{}", b64(&signature))
}

/// Decentralised authentication as `nsc` sets it up (operator → account → user, each a JWT
/// signed by the one above), without nsc: the server trusts the operator and knows the account
/// (memory resolver); the agent shows the user's `.creds` file (JWT and seed) and signs the
/// server's nonce with it.
#[tokio::test]
async fn a_creds_file_authenticates_and_a_user_of_another_account_does_not() {
    use nkeys::KeyPair;
    use serde_json::json;
    let site = site();
    let now = chrono::Utc::now().timestamp();
    let operator = KeyPair::new_operator();
    let account = KeyPair::new_account();
    let user = KeyPair::new_user();
    // JetStream needs the server's system account.
    let system = KeyPair::new_account();
    let operator_jwt = jwt(
        json!({"jti": "OPERATOR", "iat": now, "iss": operator.public_key(), "sub": operator.public_key(),
               "name": "hospital", "nats": {"type": "operator", "version": 2}}),
        &operator,
    );
    let unlimited = json!({"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
        "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1});
    let account_jwt = jwt(
        json!({"jti": "ACCOUNT", "iat": now, "iss": operator.public_key(), "sub": account.public_key(),
               "name": "estafeta", "nats": {"limits": unlimited, "type": "account", "version": 2}}),
        &operator,
    );
    let system_jwt = jwt(
        json!({"jti": "SYSTEM", "iat": now, "iss": operator.public_key(), "sub": system.public_key(),
               "name": "SYS", "nats": {"limits": {"subs": -1, "data": -1, "payload": -1, "imports": -1,
               "exports": -1, "wildcards": true, "conn": -1, "leaf": -1}, "type": "account", "version": 2}}),
        &operator,
    );
    let creds_for = |user: &KeyPair, signer: &KeyPair| {
        let user_jwt = jwt(
            json!({"jti": "USER", "iat": now, "iss": signer.public_key(), "sub": user.public_key(),
                   "name": "agent", "nats": {"pub": {}, "sub": {}, "subs": -1, "data": -1,
                   "payload": -1, "type": "user", "version": 2}}),
            signer,
        );
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().unwrap()
        )
    };
    let server = NatsServer::start(
        &site.root.join("nats"),
        &NatsServerSettings {
            extra: format!(
                "operator: {operator_jwt:?}\nsystem_account: {}\nresolver: MEMORY\nresolver_preload: {{\n  {}: {account_jwt:?}\n  {}: {system_jwt:?}\n}}\n",
                system.public_key(),
                account.public_key(),
                system.public_key()
            ),
            ..Default::default()
        },
    );
    let url = server.url("nats", "127.0.0.1");

    let good = site.root.join("agent.creds");
    std::fs::write(&good, creds_for(&user, &account)).unwrap();
    let sink = NatsSink::new(
        "nats",
        NatsSinkConfig {
            creds_file: Some(good),
            ..config(url.clone())
        },
    )
    .expect("a sink with a creds file");
    deliver(&sink).await.unwrap_or_else(|err| {
        panic!(
            "the creds file should authenticate: {err}\nserver log:\n{}",
            server.log()
        )
    });

    // A user signed by an account the server does not know.
    let stranger = site.root.join("stranger.creds");
    std::fs::write(
        &stranger,
        creds_for(&KeyPair::new_user(), &KeyPair::new_account()),
    )
    .unwrap();
    let sink = NatsSink::new(
        "nats",
        NatsSinkConfig {
            creds_file: Some(stranger),
            ..config(url)
        },
    )
    .expect("a sink with a creds file");
    let err = deliver(&sink)
        .await
        .expect_err("an unknown account is refused");
    assert!(
        err.to_lowercase().contains("authorization"),
        "the error says the server refused the credentials: {err}"
    );
}
