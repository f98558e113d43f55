//! [`FlakyHttpServer`]: an in-process HTTP API (axum on 127.0.0.1) standing in for a central
//! API. It records every request and misbehaves on demand: 503 for a fraction of requests,
//! stalls (answering 200, or a chosen status, after the stall), a slow answer to everything, a
//! fixed status (and body) per path, or down (listener closed, connections cut) and up again.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::cuttable::{Connections, CuttableListener};

/// One request as the server received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// Position in [`FlakyHttpServer::requests`] (arrival order since the last clear).
    pub index: usize,
    pub method: String,
    /// The path, without the query.
    pub path: String,
    pub query: Option<String>,
    /// Header names in lower case, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The status the server chose to answer (a stalled request answers it after the stall,
    /// if the client still listens and the server is not down by then).
    pub status: u16,
    pub stalled: bool,
    pub received: Instant,
}

impl RecordedRequest {
    /// The first value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `Idempotency-Key` header.
    pub fn idempotency_key(&self) -> Option<&str> {
        self.header("idempotency-key")
    }

    /// The `X-Estafeta-Seq` header as a number.
    pub fn seq(&self) -> Option<u64> {
        self.header("x-estafeta-seq")?.parse().ok()
    }

    /// The body parsed as JSON.
    ///
    /// # Panics
    /// When it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "request {} {} has no JSON body ({e}): {:?}",
                self.method,
                self.path,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Whether the answer was 2xx and not stalled: the request took effect.
    pub fn succeeded(&self) -> bool {
        (200..300).contains(&self.status) && !self.stalled
    }
}

/// How the server misbehaves.
#[derive(Debug, Clone, Default)]
struct Behaviour {
    fail_fraction: f64,
    /// What the failing fraction answers (`None`: 503).
    fail_status: Option<u16>,
    stall_fraction: f64,
    stall_for: Duration,
    /// What a stalled request answers after its stall (`None`: 200).
    stall_status: Option<u16>,
    /// Every request waits this long before its answer (a slow server, not a stall).
    delay: Duration,
    fixed: HashMap<String, Fixed>,
}

/// A fixed answer for one path.
#[derive(Debug, Clone)]
struct Fixed {
    status: u16,
    body: Option<Value>,
}

struct Shared {
    behaviour: Mutex<Behaviour>,
    /// xorshift64 state: the fate of request `i` depends only on the seed and `i`.
    rng: Mutex<u64>,
    requests: Mutex<Vec<RecordedRequest>>,
    connections: Connections,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// A number in [0, 1) from the xorshift64 sequence.
    fn draw(&self) -> f64 {
        let mut x = lock(&self.rng);
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        (*x >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// An in-process HTTP server that records requests and fails on demand. Every request draws
/// two pseudo-random numbers from the seed, so a given seed and request order always give the
/// same failures. Precedence: a fixed status for the path, then 503, then a stall, else
/// `200 {"ok":true}`; [`FlakyHttpServer::delay_all`] then delays every answer. Dropping it
/// stops it.
pub struct FlakyHttpServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    serving: Mutex<Option<JoinHandle<()>>>,
}

impl FlakyHttpServer {
    /// Starts on a free port of 127.0.0.1, behaving well, with seed 1.
    pub async fn start() -> Self {
        Self::start_with_seed(1).await
    }

    /// Starts with the given seed for the pseudo-random failures.
    pub async fn start_with_seed(seed: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the flaky server");
        let addr = listener.local_addr().expect("the flaky server's address");
        let shared = Arc::new(Shared {
            behaviour: Mutex::new(Behaviour::default()),
            // xorshift never leaves 0; mix the seed so that small seeds differ at once.
            rng: Mutex::new((seed ^ 0x9E37_79B9_7F4A_7C15).max(1)),
            requests: Mutex::new(Vec::new()),
            connections: Connections::default(),
        });
        let server = FlakyHttpServer {
            addr,
            shared,
            serving: Mutex::new(None),
        };
        server.serve(listener);
        server
    }

    fn serve(&self, listener: TcpListener) {
        let app = Router::new()
            .fallback(handle)
            .layer(DefaultBodyLimit::disable())
            .with_state(self.shared.clone());
        let listener = CuttableListener {
            listener,
            connections: self.shared.connections.clone(),
        };
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("flaky server stopped: {e}");
            }
        });
        *lock(&self.serving) = Some(task);
    }

    /// `http://127.0.0.1:<port>`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answers 503 to this fraction (0.0 to 1.0) of requests.
    pub fn fail_fraction(&self, fraction: f64) {
        lock(&self.shared.behaviour).fail_fraction = fraction;
    }

    /// Makes the failing fraction ([`FlakyHttpServer::fail_fraction`]) answer `status` instead
    /// of 503 (a 500, say).
    pub fn fail_status(&self, status: u16) {
        lock(&self.shared.behaviour).fail_status = Some(status);
    }

    /// Sleeps `duration` before answering this fraction of requests.
    pub fn stall(&self, fraction: f64, duration: Duration) {
        let mut b = lock(&self.shared.behaviour);
        b.stall_fraction = fraction;
        b.stall_for = duration;
    }

    /// Makes a stalled request answer `status` (instead of 200) once its stall is over, so
    /// that a request whose client gave up during the stall never takes effect: with a 5xx
    /// here, [`RecordedRequest::status`] of a stalled request is that 5xx.
    pub fn stall_status(&self, status: u16) {
        lock(&self.shared.behaviour).stall_status = Some(status);
    }

    /// Answers every request only after `delay`: a slow server. Unlike a stall, the request
    /// took effect when it was received (it counts in [`FlakyHttpServer::succeeded`] when its
    /// status is 2xx), whether or not the client is still there to read the answer.
    pub fn delay_all(&self, delay: Duration) {
        lock(&self.shared.behaviour).delay = delay;
    }

    /// Answers `status` to every request for `path` (exact, without the query).
    pub fn status_for(&self, path: &str, status: u16) {
        lock(&self.shared.behaviour)
            .fixed
            .insert(path.to_owned(), Fixed { status, body: None });
    }

    /// Answers `status` with the JSON `body` to every request for `path` (exact, without the
    /// query).
    pub fn respond_for(&self, path: &str, status: u16, body: Value) {
        lock(&self.shared.behaviour).fixed.insert(
            path.to_owned(),
            Fixed {
                status,
                body: Some(body),
            },
        );
    }

    /// Stops answering a fixed status for `path`.
    pub fn clear_status_for(&self, path: &str) {
        lock(&self.shared.behaviour).fixed.remove(path);
    }

    /// Back to answering 200 to everything (the recorded requests stay).
    pub fn behave(&self) {
        *lock(&self.shared.behaviour) = Behaviour::default();
    }

    /// Goes down: closes the listener (new connections are refused) and cuts every open
    /// connection, idle keep-alive ones included.
    pub async fn down(&self) {
        let task = lock(&self.serving).take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
        self.shared.connections.cut_all();
    }

    /// Comes back up on the same port (retrying for a few seconds if the port is still busy).
    ///
    /// # Panics
    /// When the port cannot be bound again.
    pub async fn up(&self) {
        if lock(&self.serving).is_some() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("flaky server: rebinding {}: {e}; retrying", self.addr);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("the flaky server cannot listen on {} again: {e}", self.addr),
            }
        };
        self.serve(listener);
    }

    /// Whether it is up.
    pub fn is_up(&self) -> bool {
        lock(&self.serving).is_some()
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).clone()
    }

    /// Forgets the recorded requests (the pseudo-random sequence goes on).
    pub fn clear_requests(&self) {
        lock(&self.shared.requests).clear();
    }

    /// How many requests carried each `Idempotency-Key` (every attempt counts).
    pub fn count_by_idempotency_key(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for r in lock(&self.shared.requests).iter() {
            if let Some(key) = r.idempotency_key() {
                *counts.entry(key.to_owned()).or_insert(0) += 1;
            }
        }
        counts
    }

    /// The requests that took effect ([`RecordedRequest::succeeded`]), in arrival order.
    pub fn succeeded(&self) -> Vec<RecordedRequest> {
        self.requests()
            .into_iter()
            .filter(RecordedRequest::succeeded)
            .collect()
    }

    /// Waits until at least `n` requests arrived; returns them.
    ///
    /// # Panics
    /// When `timeout` passes first.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<RecordedRequest> {
        let deadline = Instant::now() + timeout;
        loop {
            let requests = self.requests();
            if requests.len() >= n {
                return requests;
            }
            if Instant::now() >= deadline {
                panic!(
                    "the flaky server got {} requests within {timeout:?}, expected at least {n}",
                    requests.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for FlakyHttpServer {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.serving).take() {
            task.abort();
        }
        self.shared.connections.cut_all();
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (fail, stall) = (shared.draw(), shared.draw());
    let behaviour = lock(&shared.behaviour).clone();
    let fixed = behaviour.fixed.get(uri.path());
    let (status, stalled) = if let Some(fixed) = fixed {
        (fixed.status, false)
    } else if fail < behaviour.fail_fraction {
        (behaviour.fail_status.unwrap_or(503), false)
    } else if stall < behaviour.stall_fraction {
        (behaviour.stall_status.unwrap_or(200), true)
    } else {
        (200, false)
    };
    {
        let mut requests = lock(&shared.requests);
        let index = requests.len();
        requests.push(RecordedRequest {
            index,
            method: method.to_string(),
            path: uri.path().to_owned(),
            query: uri.query().map(str::to_owned),
            headers: headers
                .iter()
                .map(|(n, v)| {
                    let value = String::from_utf8_lossy(v.as_bytes()).into_owned();
                    (n.as_str().to_owned(), value)
                })
                .collect(),
            body: body.to_vec(),
            status,
            stalled,
            received: Instant::now(),
        });
    }
    if stalled {
        tokio::time::sleep(behaviour.stall_for).await;
    }
    if !behaviour.delay.is_zero() {
        tokio::time::sleep(behaviour.delay).await;
    }
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = match (fixed.and_then(|f| f.body.clone()), status) {
        (Some(body), _) => body,
        (None, 200..=299) => json!({"ok": true}),
        (None, 503) => json!({"error": "flaky server: service unavailable"}),
        (None, 500) => json!({"error": "flaky server: internal error"}),
        (None, _) => json!({"error": format!("flaky server: fixed status {status}")}),
    };
    (code, axum::Json(body)).into_response()
}
