//! `estafeta-sink-server`: a minimal, fast HTTP server for benchmarking Estafeta's HTTP sink.
//!
//! It answers `200 OK` with an empty body to every request (any method, any path), after reading
//! the body, and counts the requests, the distinct `Idempotency-Key` headers and the requests
//! without one. `--latency-ms N` holds each answer N ms, as a central API across a WAN would
//! (a timer, not a worker thread: a thousand requests can wait at once), and the most requests
//! it held at once is counted too. `GET /__count` answers those counts as JSON without being counted itself, so a
//! script can wait for the server to be up and check the counts. On SIGTERM or SIGINT it prints
//! the counts as one JSON line on stdout and exits:
//!
//! ```text
//! {"requests":100000,"distinct_idempotency_keys":100000,"without_idempotency_key":0,"body_bytes":...,"latency_ms":20,"max_in_flight":8}
//! ```
//!
//! It does no work per request beyond that, so a flush to it measures the agent's HTTP sink,
//! not the server. `scripts/bench-compare` runs it on loopback.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use clap::Parser;
use serde_json::json;

/// HTTP sink server for benchmarks: 200 to everything, counts requests and Idempotency-Keys.
#[derive(Debug, Parser)]
#[command(name = "estafeta-sink-server")]
struct Args {
    /// Address to listen on (port 0: any free port, printed on stderr).
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: SocketAddr,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Milliseconds to wait before answering each request (0: answer at once).
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
}

#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    without_key: AtomicU64,
    body_bytes: AtomicU64,
    /// How long each answer waits (`--latency-ms`).
    latency_ms: u64,
    /// Requests read and not yet answered, and the most at once: how many requests the agent
    /// keeps in flight.
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    /// Distinct Idempotency-Keys (the agent sends the record's id: a UUID).
    keys: Mutex<HashSet<Box<str>>>,
}

impl Counts {
    fn json(&self) -> serde_json::Value {
        json!({
            "requests": self.requests.load(Ordering::Relaxed),
            "distinct_idempotency_keys": self.keys.lock().expect("poisoned").len(),
            "without_idempotency_key": self.without_key.load(Ordering::Relaxed),
            "body_bytes": self.body_bytes.load(Ordering::Relaxed),
            "latency_ms": self.latency_ms,
            "max_in_flight": self.max_in_flight.load(Ordering::Relaxed),
        })
    }
}

async fn accept(State(counts): State<Arc<Counts>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    counts.requests.fetch_add(1, Ordering::Relaxed);
    counts
        .body_bytes
        .fetch_add(body.len() as u64, Ordering::Relaxed);
    match headers.get("idempotency-key").and_then(|v| v.to_str().ok()) {
        Some(key) => {
            let mut keys = counts.keys.lock().expect("poisoned");
            if !keys.contains(key) {
                keys.insert(key.into());
            }
        }
        None => {
            counts.without_key.fetch_add(1, Ordering::Relaxed);
        }
    }
    let now = counts.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
    counts.max_in_flight.fetch_max(now, Ordering::Relaxed);
    if counts.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(counts.latency_ms)).await;
    }
    counts.in_flight.fetch_sub(1, Ordering::Relaxed);
    StatusCode::OK
}

async fn count(State(counts): State<Arc<Counts>>) -> impl IntoResponse {
    axum::Json(counts.json())
}

async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let counts = Arc::new(Counts {
            latency_ms: args.latency_ms,
            ..Counts::default()
        });
        let app = Router::new()
            .route("/__count", get(count))
            .fallback(accept)
            .with_state(counts.clone());
        let listener = tokio::net::TcpListener::bind(args.addr)
            .await
            .with_context(|| format!("cannot listen on {}", args.addr))?;
        eprintln!(
            "estafeta-sink-server: listening on {}",
            listener.local_addr()?
        );
        axum::serve(listener, app)
            .with_graceful_shutdown(stop_signal())
            .await?;
        println!("{}", counts.json());
        Ok(())
    })
}
