//! The daemon (`daemon::run`) on a real loopback listener, driven with reqwest, with an HTTP
//! sink pointed at a small central API in the test: it serves the ingest API, stages durably,
//! delivers right after the write (`FLUSH_ON_WRITE`), refuses an address already in use with a
//! message naming INGEST_ADDR, and stops within the grace period when told to.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, Method, Uri};
use estafeta::config::{Config, SinkConfig, SinkKind};
use estafeta::sinks::http::HttpSinkConfig;
use estafeta_staging::{Options, Staging};

fn test_config(root: &std::path::Path, addr: SocketAddr, central: &str) -> Config {
    Config {
        ingest_addr: addr,
        shutdown_grace: Duration::from_secs(2),
        sinks: vec![SinkConfig {
            name: "api".into(),
            kind: SinkKind::Http(HttpSinkConfig {
                url: central.to_owned(),
                token: None,
                timeout: Duration::from_secs(5),
                verify_tls: true,
                ca_file: None,
                routes: Vec::new(),
                idempotency_key: None,
                lookups: Default::default(),
                concurrency: 4,
                heartbeat_path: None,
            }),
            max_attempts: None,
        }],
        ..Config::for_tests(root)
    }
}

/// Requests the central API received: (method, path, Idempotency-Key).
type Received = Arc<Mutex<Vec<(String, String, Option<String>)>>>;

/// A central API that accepts everything and remembers what it got.
async fn start_central() -> (String, Received) {
    let received: Received = Arc::default();
    let log = received.clone();
    let app = axum::Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap| {
        let log = log.clone();
        async move {
            let key = headers
                .get("idempotency-key")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            log.lock()
                .expect("lock")
                .push((method.to_string(), uri.path().to_owned(), key));
            axum::http::StatusCode::CREATED
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

/// A loopback port that was free a moment ago.
fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address")
}

async fn wait_until_up(client: &reqwest::Client, base: &str) {
    for _ in 0..200 {
        if let Ok(response) = client.get(format!("{base}/healthz")).send().await
            && response.status().is_success()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the daemon did not come up at {base}");
}

#[tokio::test]
async fn daemon_serves_stages_and_stops_within_the_grace_period() {
    let dir = tempfile::tempdir().expect("temp dir");
    let addr = free_addr();
    let (central, received) = start_central().await;
    let config = test_config(dir.path(), addr, &central);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(estafeta::daemon::run(config, async move {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::new();
    let base = format!("http://{addr}");
    wait_until_up(&client, &base).await;

    let response = client
        .post(format!("{base}/v1/records/create/patient"))
        .header("content-type", "application/json")
        .body(r#"{"id": "p-1"}"#)
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status().as_u16(), 202);
    let receipt: serde_json::Value = response.json().await.expect("JSON");
    assert!(receipt["id"].is_string());
    let ready = client
        .get(format!("{base}/readyz"))
        .send()
        .await
        .expect("GET");
    assert_eq!(ready.status().as_u16(), 200);

    // FLUSH_ON_WRITE: delivered without waiting for the (yearly) tick.
    let delivered = tokio::time::timeout(Duration::from_secs(10), async {
        while received.lock().expect("lock").is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(delivered.is_ok(), "the record reached the central API");
    let got = received.lock().expect("lock").clone();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, "POST");
    assert_eq!(got[0].1, "/patient");
    assert_eq!(got[0].2.as_deref(), receipt["id"].as_str());

    // A second daemon on the same address explains what to change.
    let other_dir = tempfile::tempdir().expect("temp dir");
    let err = estafeta::daemon::run(test_config(other_dir.path(), addr, &central), async {})
        .await
        .expect_err("the address is taken");
    let message = format!("{err:#}");
    assert!(message.contains(&addr.to_string()), "{message}");
    assert!(message.contains("INGEST_ADDR"), "{message}");

    let _ = stop.send(());
    let result = tokio::time::timeout(Duration::from_secs(5), daemon)
        .await
        .expect("stops within the grace period")
        .expect("task joins");
    assert!(result.is_ok(), "{result:?}");
    assert!(
        client.get(format!("{base}/healthz")).send().await.is_err(),
        "the listener is closed"
    );

    // The record was delivered; a restart finds nothing pending.
    let mut options = Options::new(dir.path()).with_sinks(["api"]);
    options.min_free_bytes = 0;
    let (store, _) = Staging::open(options).expect("reopen");
    assert_eq!(store.status().expect("status").records_pending, 0);
}
