//! The HTTP sink against a local axum server that answers each entity its own way: 201, 503
//! with `Retry-After`, 429 with a date, 400 with a long body, a redirect, a stall past the
//! client's timeout.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use common::{Count, closed_port, delivery};
use estafeta::sinks::http::{HttpRoute, HttpSink, HttpSinkConfig};
use estafeta::sinks::{Outcome, Refusal, Sink};

const TOKEN: &str = "tok-Sup3rSecret";

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    /// Raw path and query, as sent.
    target: String,
    headers: HeaderMap,
    body: Bytes,
    status: u16,
}

#[derive(Default)]
struct Server {
    seen: Mutex<Vec<Seen>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

impl Server {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("not poisoned").clone()
    }

    /// The request that carried `id` as its Idempotency-Key (the last one).
    fn by_key(&self, id: &str) -> Seen {
        self.seen()
            .into_iter()
            .rev()
            .find(|s| {
                s.headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    == Some(id)
            })
            .unwrap_or_else(|| panic!("no request carried Idempotency-Key {id}"))
    }

    /// Distinct idempotency keys among `ids` that got a 2xx: what an idempotent API stored.
    fn stored(&self, ids: &[String]) -> usize {
        let seen = self.seen();
        ids.iter()
            .filter(|id| {
                seen.iter().any(|s| {
                    (200..300).contains(&s.status)
                        && s.headers
                            .get("idempotency-key")
                            .and_then(|v| v.to_str().ok())
                            == Some(id.as_str())
                })
            })
            .count()
    }
}

/// Answers by the entity, the path segment after `/api/v1/`.
async fn answer(State(server): State<Arc<Server>>, request: Request) -> Response {
    let method = request.method().to_string();
    let target = request
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let headers = request.headers().clone();
    let body = axum::body::to_bytes(request.into_body(), usize::MAX)
        .await
        .unwrap_or_default();
    let entity = target
        .strip_prefix("/api/v1/")
        .and_then(|rest| rest.split(['/', '?']).next())
        .unwrap_or("")
        .to_owned();

    let now = server.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    server.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let response = match entity.as_str() {
        "busy" => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "7")],
            "try later",
        )
            .into_response(),
        "throttled" => {
            let at = (chrono::Utc::now() + chrono::Duration::seconds(30))
                .format("%a, %d %b %Y %H:%M:%S GMT")
                .to_string();
            (StatusCode::TOO_MANY_REQUESTS, [(header::RETRY_AFTER, at)]).into_response()
        }
        "early" => StatusCode::from_u16(425)
            .expect("425 is a status")
            .into_response(),
        "flaky" => StatusCode::BAD_GATEWAY.into_response(),
        "bad" => (
            StatusCode::BAD_REQUEST,
            format!("missing field nome{}", "!".repeat(1000)),
        )
            .into_response(),
        "conflict" => (StatusCode::CONFLICT, "").into_response(),
        "moved" => (
            StatusCode::MOVED_PERMANENTLY,
            [(header::LOCATION, "/api/v1/patient")],
        )
            .into_response(),
        "slow" => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            StatusCode::CREATED.into_response()
        }
        "paced" => {
            tokio::time::sleep(Duration::from_millis(150)).await;
            StatusCode::NO_CONTENT.into_response()
        }
        "" => StatusCode::NOT_FOUND.into_response(),
        _ => (StatusCode::CREATED, "{\"ok\":true}").into_response(),
    };
    server.in_flight.fetch_sub(1, Ordering::SeqCst);
    server.seen.lock().expect("not poisoned").push(Seen {
        method,
        target,
        headers,
        body,
        status: response.status().as_u16(),
    });
    response
}

/// Starts the server; returns its state and its base URL (`http://127.0.0.1:PORT/api/v1`).
async fn start() -> (Arc<Server>, String) {
    let server = Arc::new(Server::default());
    let app = Router::new()
        .fallback(answer)
        .with_state(Arc::clone(&server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the test server");
    let addr = listener.local_addr().expect("a local address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (server, format!("http://{addr}/api/v1"))
}

fn config(url: &str) -> HttpSinkConfig {
    HttpSinkConfig {
        url: url.to_owned(),
        token: Some(TOKEN.to_owned()),
        timeout: Duration::from_secs(5),
        verify_tls: true,
        ca_file: None,
        routes: Vec::new(),
        idempotency_key: None,
        lookups: Default::default(),
        concurrency: 4,
        heartbeat_path: None,
    }
}

fn sink(config: HttpSinkConfig) -> HttpSink {
    HttpSink::new("api", config).expect("a valid HTTP sink config")
}

fn header<'a>(seen: &'a Seen, name: &str) -> &'a str {
    seen.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("header {name} missing"))
}

#[tokio::test]
async fn actions_map_to_methods_and_paths_with_the_key_encoded() {
    let (server, url) = start().await;
    let sink = sink(config(&url));
    let batch = vec![
        delivery("create", "patient", Some("p1"), "{}"),
        delivery("update", "patient", Some("a/b c?d"), "{}"),
        delivery("upsert", "patient", Some("p3"), "{}"),
        delivery("delete", "patient", Some("p4"), "{}"),
        delivery("delete", "patient", None, "{}"),
        delivery("update", "patient", None, "{}"),
        delivery("deactivate", "user", Some("u1"), "{}"),
    ];
    let outcomes = sink.deliver(&batch).await;
    assert_eq!(outcomes, vec![Outcome::Delivered; batch.len()]);
    let expected = [
        ("POST", "/api/v1/patient"),
        ("PUT", "/api/v1/patient/a%2Fb%20c%3Fd"),
        ("PUT", "/api/v1/patient/p3"),
        ("DELETE", "/api/v1/patient/p4"),
        ("POST", "/api/v1/patient/delete"),
        ("POST", "/api/v1/patient/update"),
        ("POST", "/api/v1/user"),
    ];
    for (record, (method, target)) in batch.iter().zip(expected) {
        let seen = server.by_key(&record.envelope.id);
        assert_eq!(
            (seen.method.as_str(), seen.target.as_str()),
            (method, target),
            "{}",
            record.envelope.action
        );
    }
}

#[tokio::test]
async fn requests_carry_the_contract_headers_and_the_payload_bytes() {
    let (server, url) = start().await;
    let sink = sink(config(&url));
    // Spacing and key order are the client's: the body must be these bytes exactly.
    let payload = r#"{"nome": "João",   "b":1,"a":[ 2 ]}"#;
    let batch = vec![
        delivery("create", "patient", Some("p1"), payload),
        delivery("delete", "patient", Some("p1"), payload),
    ];
    assert_eq!(sink.deliver(&batch).await, vec![Outcome::Delivered; 2]);
    for record in &batch {
        let seen = server.by_key(&record.envelope.id);
        assert_eq!(header(&seen, "idempotency-key"), record.envelope.id);
        assert_eq!(header(&seen, "authorization"), format!("Bearer {TOKEN}"));
        assert_eq!(
            header(&seen, "x-estafeta-seq"),
            record.envelope.seq.to_string()
        );
        assert_eq!(header(&seen, "x-estafeta-action"), record.envelope.action);
        assert_eq!(header(&seen, "content-type"), "application/json");
        assert_eq!(&seen.body[..], payload.as_bytes(), "{} body", seen.method);
    }
}

#[tokio::test]
async fn answers_are_sorted_into_delivered_retry_and_dead() {
    let (_server, url) = start().await;
    let sink = sink(config(&url));
    let batch = vec![
        delivery("create", "patient", Some("1"), "{}"),
        delivery("create", "busy", Some("2"), "{}"),
        delivery("create", "throttled", Some("3"), "{}"),
        delivery("create", "early", Some("4"), "{}"),
        delivery("create", "flaky", Some("5"), "{}"),
        delivery("create", "bad", Some("6"), "{}"),
        delivery("create", "conflict", Some("7"), "{}"),
        delivery("create", "moved", Some("8"), "{}"),
    ];
    let outcomes = sink.deliver(&batch).await;
    assert_eq!(outcomes.len(), batch.len());
    assert_eq!(outcomes[0], Outcome::Delivered);

    assert!(
        matches!(&outcomes[1], Outcome::Retry { error, retry_after: Some(d) }
            if *d == Duration::from_secs(7) && error == "HTTP 503 Service Unavailable"),
        "{:?}",
        outcomes[1]
    );
    assert!(
        matches!(&outcomes[2], Outcome::Retry { retry_after: Some(d), .. }
            if *d > Duration::from_secs(20) && *d <= Duration::from_secs(30)),
        "{:?}",
        outcomes[2]
    );
    assert!(
        matches!(&outcomes[3], Outcome::Retry { error, retry_after: None } if error.starts_with("HTTP 425")),
        "{:?}",
        outcomes[3]
    );
    assert!(
        matches!(&outcomes[4], Outcome::Retry { error, .. } if error.starts_with("HTTP 502")),
        "{:?}",
        outcomes[4]
    );

    match &outcomes[5] {
        Outcome::Dead { reason } => {
            // Shown: the status alone. Kept for the dead letter: the start of the answer.
            assert_eq!(reason.summary, "HTTP 400 Bad Request", "{reason:?}");
            assert!(
                reason
                    .detail
                    .starts_with("HTTP 400 Bad Request: missing field nome"),
                "{reason:?}"
            );
            let body = reason
                .detail
                .split_once(": ")
                .map(|(_, b)| b)
                .unwrap_or_default();
            assert_eq!(
                body.len(),
                512,
                "the dead letter keeps the first 512 bytes of the body"
            );
        }
        other => panic!("400 should be dead, got {other:?}"),
    }
    assert_eq!(
        outcomes[6],
        Outcome::Dead {
            reason: Refusal::ours("HTTP 409 Conflict")
        }
    );
    assert!(
        matches!(&outcomes[7], Outcome::Dead { reason } if reason.summary.starts_with("HTTP 301")),
        "{:?}",
        outcomes[7]
    );
}

#[tokio::test]
async fn a_server_stalling_past_the_timeout_is_retried() {
    let (_server, url) = start().await;
    let sink = sink(HttpSinkConfig {
        timeout: Duration::from_millis(300),
        ..config(&url)
    });
    let started = Instant::now();
    let outcomes = sink
        .deliver(&[delivery("create", "slow", Some("1"), "{}")])
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the timeout was not honoured"
    );
    assert!(
        matches!(&outcomes[..], [Outcome::Retry { error, retry_after: None }] if error.contains("timed out")),
        "{outcomes:?}"
    );
}

#[tokio::test]
async fn the_first_matching_route_sets_method_path_and_headers() {
    let (server, url) = start().await;
    let routes = vec![
        HttpRoute {
            entity: Some("patient".to_owned()),
            action: Some("delete".to_owned()),
            method: Some("POST".to_owned()),
            path: Some("/patient/{key}/remove?by={action}&rid={id}".to_owned()),
            headers: BTreeMap::from([("X-Api-Key".to_owned(), "k-123".to_owned())]),
            idempotency_key: None,
            body: None,
        },
        HttpRoute {
            entity: None,
            action: Some("delete".to_owned()),
            method: Some("PATCH".to_owned()),
            path: None,
            headers: BTreeMap::new(),
            idempotency_key: None,
            body: None,
        },
    ];
    let sink = sink(HttpSinkConfig {
        routes,
        idempotency_key: None,
        lookups: Default::default(),
        ..config(&url)
    });
    let batch = vec![
        delivery("delete", "patient", Some("x y"), "{}"),
        delivery("delete", "visit", Some("v1"), "{}"),
        delivery("create", "patient", Some("p1"), "{}"),
    ];
    assert_eq!(sink.deliver(&batch).await, vec![Outcome::Delivered; 3]);

    let first = server.by_key(&batch[0].envelope.id);
    assert_eq!(first.method, "POST");
    assert_eq!(
        first.target,
        format!(
            "/api/v1/patient/x%20y/remove?by=delete&rid={}",
            batch[0].envelope.id
        )
    );
    assert_eq!(header(&first, "x-api-key"), "k-123");
    assert_eq!(
        header(&first, "idempotency-key"),
        batch[0].envelope.id,
        "routes keep the idempotency key"
    );

    let second = server.by_key(&batch[1].envelope.id);
    assert_eq!(
        (second.method.as_str(), second.target.as_str()),
        ("PATCH", "/api/v1/visit/v1")
    );
    assert!(second.headers.get("x-api-key").is_none());

    let third = server.by_key(&batch[2].envelope.id);
    assert_eq!(
        (third.method.as_str(), third.target.as_str()),
        ("POST", "/api/v1/patient")
    );
}

#[tokio::test]
async fn records_go_out_in_parallel_up_to_the_concurrency_in_batch_order() {
    let (server, url) = start().await;
    let sink = sink(HttpSinkConfig {
        concurrency: 3,
        ..config(&url)
    });
    let mut batch: Vec<_> = (0..9)
        .map(|i| delivery("create", "paced", Some(&i.to_string()), "{}"))
        .collect();
    batch.insert(4, delivery("create", "bad", Some("x"), "{}"));
    let started = Instant::now();
    let outcomes = sink.deliver(&batch).await;
    let elapsed = started.elapsed();
    assert_eq!(
        server.max_in_flight.load(Ordering::SeqCst),
        3,
        "at most `concurrency` requests at once"
    );
    assert!(
        elapsed < Duration::from_millis(9 * 150),
        "records were sent one by one ({elapsed:?})"
    );
    for (i, outcome) in outcomes.iter().enumerate() {
        if i == 4 {
            assert!(matches!(outcome, Outcome::Dead { .. }), "{outcome:?}");
        } else {
            assert_eq!(*outcome, Outcome::Delivered, "record {i}");
        }
    }
}

#[tokio::test]
async fn dry_run_describes_each_request_without_sending() {
    let (server, url) = start().await;
    let sink = sink(config(&url));
    let record = delivery("update", "patient", Some("p 1"), r#"{"a":1}"#);
    let lines = sink.dry_run(std::slice::from_ref(&record));
    // The record is named by id and seq; the key in the path is not logged.
    assert_eq!(
        lines,
        vec![format!(
            "PUT {url}/patient/{{key}} Idempotency-Key={} seq={} (7 bytes)",
            record.envelope.id, record.envelope.seq
        )]
    );
    assert!(server.seen().is_empty(), "a dry run sends nothing");
}

#[tokio::test]
async fn probe_takes_any_answer_and_explains_a_refused_connection() {
    let (_server, url) = start().await;
    sink(config(&url))
        .probe()
        .await
        .expect("a 404 still means reachable");

    let down = sink(config(&format!("http://127.0.0.1:{}/api", closed_port())));
    let err = down.probe().await.expect_err("nothing listens there");
    let text = format!("{err:#}");
    assert!(text.contains("cannot reach http://127.0.0.1:"), "{text}");
    assert!(!text.contains(TOKEN), "{text}");
}

#[tokio::test]
async fn bad_tls_settings_fail_at_build_time() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let missing = dir.path().join("missing.pem");
    let err = HttpSink::new(
        "api",
        HttpSinkConfig {
            ca_file: Some(missing.clone()),
            ..config("https://h/")
        },
    )
    .err()
    .expect("a missing CA file");
    assert!(
        format!("{err:#}").contains(&missing.display().to_string()),
        "{err:#}"
    );

    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "hello").expect("write");
    assert!(
        HttpSink::new(
            "api",
            HttpSinkConfig {
                ca_file: Some(not_pem),
                ..config("https://h/")
            }
        )
        .is_err()
    );

    assert!(
        HttpSink::new(
            "api",
            HttpSinkConfig {
                verify_tls: false,
                ..config("https://h/")
            }
        )
        .is_ok()
    );
}

// The shared conformance suite.

fn counter(
    server: &Arc<Server>,
) -> impl Fn(Vec<String>) -> std::pin::Pin<Box<dyn std::future::Future<Output = usize> + Send>> + Sync
{
    let server = Arc::clone(server);
    move |ids| {
        let n = server.stored(&ids);
        Box::pin(async move { n })
    }
}

#[tokio::test]
async fn conformance_batch_lands_once_and_resend_changes_nothing() {
    let (server, url) = start().await;
    let sink = sink(config(&url));
    let count = counter(&server);
    let count: Count<'_> = &count;
    common::assert_batch_lands_once_and_resend_changes_nothing(&sink, count, "patient").await;
}

#[tokio::test]
async fn conformance_only_the_refused_record_is_dead() {
    let (server, url) = start().await;
    let sink = sink(config(&url));
    let count = counter(&server);
    let bad = delivery("create", "bad", Some("1"), "{}");
    let reason =
        common::assert_only_the_refused_record_is_dead(&sink, &count, "patient", bad).await;
    assert!(reason.summary.starts_with("HTTP 400"), "{reason:?}");
}

#[tokio::test]
async fn conformance_unreachable_sink_retries_everything() {
    let url = format!("http://user:pa55word@127.0.0.1:{}/api", closed_port());
    let sink = sink(config(&url));
    let error =
        common::assert_unreachable_sink_retries_everything(&sink, &[TOKEN, "pa55word"]).await;
    assert!(
        error.contains("cannot connect") && error.contains("refused"),
        "{error}"
    );
}
