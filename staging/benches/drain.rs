//! The store's own drain ceiling, by key shape: a backlog of 1 KB records is leased in batches
//! of 500 and settled as delivered, with no sink in between, for keys unique / 200 / 4 / 1 /
//! none (one entity). It isolates what leasing and settling cost per shape: a store that leased
//! one record per key per batch needed one round trip per record of a hot key; runs make every
//! shape cost about the same. Also the same backlog after an outage: every key's head failed
//! once and its later records were given back, then the sink came back (`retry_now`).
//!
//! Run: `cargo bench -p estafeta-staging --bench drain` (`DRAIN_BENCH_RECORDS`, default 50000).

use estafeta_staging::*;
use std::time::Instant;

const BATCH: usize = 500;

fn open(root: &std::path::Path) -> Staging {
    let mut opts = Options::new(root).with_sinks(["db"]);
    opts.min_free_bytes = 0;
    Staging::open(opts).unwrap().0
}

/// Stages `n` records whose key is given by `key(i)`.
fn stage(store: &Staging, n: usize, key: impl Fn(usize) -> Option<String>) {
    let filler = "x".repeat(1024 - 80);
    for start in (0..n).step_by(250) {
        let records = (start..(start + 250).min(n))
            .map(|i| {
                let body = format!(r#"{{"n":{i},"nome":"Maria da Silva","obs":"{filler}"}}"#);
                NewRecord::new("update", "patient", key(i), &body).unwrap()
            })
            .collect();
        store.stage_batch(records, None).unwrap();
    }
}

/// Every key's head fails once; the rest of each run is given back, as the batcher does.
fn outage(store: &Staging) {
    let past = chrono::Utc::now() - chrono::Duration::seconds(1);
    loop {
        let batch = store.next_batch("db", BATCH).unwrap();
        if batch.is_empty() {
            break;
        }
        let mut seen = std::collections::HashSet::new();
        let mut settlement = Settlement::default();
        for d in &batch {
            if seen.insert((d.envelope.entity.clone(), d.envelope.key.clone())) {
                settlement.retries.push(Retry {
                    seq: d.envelope.seq,
                    error: "cannot connect".into(),
                    // Far in the future: the key is held back until the sink comes back.
                    at: past + chrono::Duration::hours(1),
                });
            } else {
                settlement.give_back.push(d.envelope.seq);
            }
        }
        store.settle("db", settlement).unwrap();
    }
    store.retry_now("db").unwrap();
}

/// Leases and acknowledges everything; returns records/s.
fn drain(store: &Staging, n: usize) -> f64 {
    let start = Instant::now();
    let mut done = 0;
    loop {
        let batch = store.next_batch("db", BATCH).unwrap();
        if batch.is_empty() {
            break;
        }
        done += batch.len();
        let seqs: Vec<u64> = batch.iter().map(|d| d.envelope.seq).collect();
        store.ack("db", &seqs).unwrap();
    }
    assert_eq!(done, n, "every record drained once");
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    // `cargo test --benches` runs this with `--bench` absent: keep that run short.
    let quick = !std::env::args().any(|a| a == "--bench");
    let n: usize = std::env::var("DRAIN_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 2_000 } else { 50_000 });
    type Shape = (&'static str, fn(usize) -> Option<String>);
    let shapes: [Shape; 5] = [
        ("unique keys", |i| Some(format!("k{i}"))),
        ("200 keys", |i| Some(format!("k{}", i % 200))),
        ("4 keys", |i| Some(format!("k{}", i % 4))),
        ("1 key", |_| Some("k".to_owned())),
        ("keyless", |_| None),
    ];
    println!("drain of {n} records, batches of {BATCH}, lease + ack only (no sink):");
    for (name, key) in shapes {
        for after_outage in [false, true] {
            let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
            let store = open(dir.path());
            stage(&store, n, key);
            if after_outage {
                outage(&store);
            }
            let rate = drain(&store, n);
            let history = if after_outage {
                "after an outage"
            } else {
                "fresh"
            };
            println!("  {name:<12} {history:<16} {rate:>10.0} records/s");
        }
    }
}
