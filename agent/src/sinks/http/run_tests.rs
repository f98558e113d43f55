//! Runs of a key through the HTTP sink, against a loopback server that logs when each request
//! arrives and when it is answered, counts the requests in flight, answers chosen records 503 or
//! 422 and can take its time: a key's records go one after another in seq order, a failure
//! holds back the rest of its key only, many keys fill the concurrency and never exceed it, the
//! longest run starts first.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;

use super::*;
use crate::sinks::test_delivery;

/// What the server saw, in order: a request arriving or being answered, by Idempotency-Key.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Arrived(String),
    Answered(String),
}

#[derive(Default)]
struct Server {
    events: Mutex<Vec<Event>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// Status to answer, by Idempotency-Key (200 for the others).
    answers: Mutex<HashMap<String, u16>>,
    latency: Duration,
}

impl Server {
    fn events(&self) -> Vec<Event> {
        lock(&self.events).clone()
    }

    /// The ids of the requests received, in arrival order.
    fn arrivals(&self) -> Vec<String> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Arrived(id) => Some(id),
                Event::Answered(_) => None,
            })
            .collect()
    }

    fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }
}

async fn answer(State(server): State<Arc<Server>>, request: Request) -> StatusCode {
    let id = request
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    lock(&server.events).push(Event::Arrived(id.clone()));
    let now = server.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    server.max_in_flight.fetch_max(now, Ordering::SeqCst);
    tokio::time::sleep(server.latency).await;
    let status = lock(&server.answers).get(&id).copied().unwrap_or(200);
    server.in_flight.fetch_sub(1, Ordering::SeqCst);
    // Logged before the answer leaves: the sink cannot have seen it earlier.
    lock(&server.events).push(Event::Answered(id));
    StatusCode::from_u16(status).expect("a test status")
}

/// Starts a server answering after `latency`, `answers` by id; returns it and its base URL.
async fn start(latency: Duration, answers: &[(&str, u16)]) -> (Arc<Server>, String) {
    let server = Arc::new(Server {
        latency,
        answers: Mutex::new(
            answers
                .iter()
                .map(|(id, status)| ((*id).to_owned(), *status))
                .collect(),
        ),
        ..Server::default()
    });
    let app = Router::new()
        .fallback(answer)
        .with_state(Arc::clone(&server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the test server");
    let addr = listener.local_addr().expect("a local address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (server, format!("http://{addr}/api"))
}

fn sink(url: &str, concurrency: usize) -> HttpSink {
    HttpSink::new(
        "api",
        HttpSinkConfig {
            url: url.to_owned(),
            token: None,
            timeout: Duration::from_secs(10),
            verify_tls: true,
            ca_file: None,
            routes: Vec::new(),
            idempotency_key: None,
            lookups: Default::default(),
            concurrency,
            heartbeat_path: None,
        },
    )
    .expect("a valid config")
}

/// `per_key` records of each of `keys` (`None`: keyless), interleaved as a busy store stages
/// them: the first of every key, then the second of every key, … Ids are `id-<seq>`.
fn interleaved(keys: &[Option<&str>], per_key: usize) -> Vec<Delivery> {
    let mut batch = Vec::new();
    for _ in 0..per_key {
        for key in keys {
            let seq = batch.len() as u64 + 1;
            let entity = if key.is_some() { "patient" } else { "audit" };
            batch.push(test_delivery(seq, "update", entity, *key, "{}"));
        }
    }
    batch
}

/// The ids of `batch`'s records of `key`, in seq order.
fn ids_of(batch: &[Delivery], key: Option<&str>) -> Vec<String> {
    batch
        .iter()
        .filter(|d| d.envelope.key.as_deref() == key)
        .map(|d| d.envelope.id.clone())
        .collect()
}

#[tokio::test]
async fn a_keys_records_are_sent_one_after_another_in_seq_order() {
    let (server, url) = start(Duration::from_millis(20), &[]).await;
    let keys = [Some("a"), Some("b"), None];
    let batch = interleaved(&keys, 5);
    // More workers than keys: nothing but the order rule keeps a key's records apart.
    let outcomes = sink(&url, 8).deliver(&batch).await;
    assert_eq!(outcomes, vec![Outcome::Delivered; batch.len()]);

    let events = server.events();
    for key in keys {
        let ids = ids_of(&batch, key);
        let arrived: Vec<String> = server
            .arrivals()
            .into_iter()
            .filter(|id| ids.contains(id))
            .collect();
        assert_eq!(arrived, ids, "key {key:?} arrived out of seq order");
        for pair in ids.windows(2) {
            let answered = events
                .iter()
                .position(|e| *e == Event::Answered(pair[0].clone()));
            let next = events
                .iter()
                .position(|e| *e == Event::Arrived(pair[1].clone()));
            assert!(
                answered < next,
                "key {key:?}: {} was sent before {} was answered: {events:?}",
                pair[1],
                pair[0]
            );
        }
    }
    assert_eq!(
        server.max_in_flight(),
        keys.len(),
        "the keys went in parallel"
    );
}

#[tokio::test]
async fn after_a_failure_the_rest_of_its_key_is_skipped_unsent_while_other_keys_go_on() {
    // Keys a, b, c and ".", which cannot be a path segment: its first record is dead here,
    // before any request.
    let keys = [Some("a"), Some("b"), Some("c"), Some(".")];
    let batch = interleaved(&keys, 4);
    let a = ids_of(&batch, Some("a"));
    let b = ids_of(&batch, Some("b"));
    let c = ids_of(&batch, Some("c"));
    let dot = ids_of(&batch, Some("."));
    let (server, url) = start(Duration::from_millis(5), &[(&a[1], 503), (&b[2], 422)]).await;
    let outcomes = sink(&url, 4).deliver(&batch).await;

    let outcome_of = |id: &str| {
        let i = batch
            .iter()
            .position(|d| d.envelope.id == id)
            .expect("an id of the batch");
        outcomes[i].clone()
    };
    let kind = |id: &str| match outcome_of(id) {
        Outcome::Delivered => "delivered",
        Outcome::Retry { .. } => "retry",
        Outcome::Dead { .. } => "dead",
        Outcome::Skipped => "skipped",
    };
    let kinds = |ids: &[String]| ids.iter().map(|id| kind(id)).collect::<Vec<_>>();
    assert_eq!(kinds(&a), ["delivered", "retry", "skipped", "skipped"]);
    assert_eq!(kinds(&b), ["delivered", "delivered", "dead", "skipped"]);
    assert_eq!(kinds(&c), ["delivered"; 4]);
    assert_eq!(kinds(&dot), ["dead", "skipped", "skipped", "skipped"]);
    assert!(
        matches!(outcome_of(&a[1]), Outcome::Retry { error, .. } if error.starts_with("HTTP 503")),
        "{outcomes:?}"
    );

    let arrived = server.arrivals();
    let mut expected: Vec<String> = [&a[..2], &b[..3], &c[..]].concat();
    expected.sort();
    let mut sent = arrived.clone();
    sent.sort();
    assert_eq!(
        sent, expected,
        "exactly the records up to each key's failure were sent, once"
    );
}

#[tokio::test]
async fn many_keys_fill_the_concurrency_and_one_key_goes_one_request_at_a_time() {
    let latency = Duration::from_millis(50);
    let (server, url) = start(latency, &[]).await;
    let keys: Vec<String> = (0..8).map(|k| format!("k{k}")).collect();
    let keys: Vec<Option<&str>> = keys.iter().map(|k| Some(k.as_str())).collect();
    let batch = interleaved(&keys, 5);
    let started = Instant::now();
    let outcomes = sink(&url, 8).deliver(&batch).await;
    let elapsed = started.elapsed();
    assert_eq!(outcomes, vec![Outcome::Delivered; 40]);
    assert_eq!(server.max_in_flight(), 8, "8 keys fill a concurrency of 8");
    // About 5 × 50 ms; one at a time would be 40 × 50 ms.
    assert!(elapsed < latency * 20, "40 records took {elapsed:?}");

    let (server, url) = start(Duration::from_millis(5), &[]).await;
    let one_key = interleaved(&[Some("hot")], 10);
    let outcomes = sink(&url, 8).deliver(&one_key).await;
    assert_eq!(outcomes, vec![Outcome::Delivered; 10]);
    assert_eq!(server.max_in_flight(), 1, "one key: one request at a time");
    assert_eq!(server.arrivals(), ids_of(&one_key, Some("hot")));
}

#[tokio::test]
async fn the_concurrency_is_never_exceeded() {
    let (server, url) = start(Duration::from_millis(10), &[]).await;
    let keys: Vec<String> = (0..20).map(|k| format!("k{k}")).collect();
    let keys: Vec<Option<&str>> = keys.iter().map(|k| Some(k.as_str())).collect();
    let batch = interleaved(&keys, 3);
    let outcomes = sink(&url, 4).deliver(&batch).await;
    assert_eq!(outcomes, vec![Outcome::Delivered; 60]);
    assert_eq!(server.max_in_flight(), 4);
    assert_eq!(server.arrivals().len(), 60);
}

#[tokio::test]
async fn the_longest_run_starts_first() {
    let (server, url) = start(Duration::ZERO, &[]).await;
    // Two single records, then a key of three: with one worker, the run of three goes first,
    // else it would run alone at the end of a batch while the other workers idle.
    let batch = vec![
        test_delivery(1, "update", "patient", Some("s1"), "{}"),
        test_delivery(2, "update", "patient", Some("s2"), "{}"),
        test_delivery(3, "update", "patient", Some("hot"), "{}"),
        test_delivery(4, "update", "patient", Some("hot"), "{}"),
        test_delivery(5, "update", "patient", Some("hot"), "{}"),
    ];
    let outcomes = sink(&url, 1).deliver(&batch).await;
    assert_eq!(outcomes, vec![Outcome::Delivered; 5]);
    assert_eq!(server.arrivals(), ["id-3", "id-4", "id-5", "id-1", "id-2"]);
}
