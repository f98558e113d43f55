//! Stage throughput and time to acknowledge, with 1 KB payloads:
//! 1, 16 and 64 concurrent stagers × batches of 1 and 256 records, each in clear and sealed
//! (encryption at rest, `STAGING_KEY_FILE`) twice, in the order clear, sealed, sealed, clear
//! with a `sync` before each run, with the sealed/clear ratio of the sums; p99 at a steady
//! 1,000 records/s; and the open time and memory with a large backlog.
//!
//! Run: `cargo bench -p estafeta-staging --bench stage` (set `STAGE_BENCH_BACKLOG=1000000`
//! for the full backlog figure; `STAGE_BENCH_DIR` to measure another disk;
//! `STAGE_BENCH_ONLY=16x256:sealed` for one run alone, under a profiler).

use estafeta_staging::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn payload() -> String {
    // 1 KB of JSON, shaped like a patient record.
    let filler = "x".repeat(1024 - 80);
    format!(r#"{{"id":1,"nome":"Maria da Silva","cpf":"12345678900","obs":"{filler}"}}"#)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn base_dir() -> tempfile::TempDir {
    match std::env::var("STAGE_BENCH_DIR") {
        Ok(d) => tempfile::tempdir_in(d).unwrap(),
        Err(_) => tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap(),
    }
}

fn open(root: &std::path::Path) -> Staging {
    open_with(root, false)
}

/// The store, sealing with a fresh key when `sealed`.
fn open_with(root: &std::path::Path, sealed: bool) -> Staging {
    let mut opts = Options::new(root).with_sinks(["db"]);
    opts.min_free_bytes = 0;
    if sealed {
        opts = opts.with_keys(Arc::new(Keyring::generate()));
    }
    Staging::open(opts).unwrap().0
}

/// Records/s of `stagers` threads staging batches of `batch`; prints a table row.
fn throughput(stagers: usize, batch: usize, duration: Duration, sealed: bool) -> f64 {
    let dir = base_dir();
    let store = open_with(dir.path(), sealed);
    let body = payload();
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..stagers)
        .map(|t| {
            let (store, stop, count, body) =
                (store.clone(), stop.clone(), count.clone(), body.clone());
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                let mut n = 0usize;
                let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (t as u64 + 1);
                while !stop.load(Ordering::Relaxed) {
                    let records = (0..batch)
                        .map(|i| {
                            n += 1;
                            let key = bench_key(t, n + i, &mut rng);
                            NewRecord::new("create", "patient", Some(key), &body).unwrap()
                        })
                        .collect();
                    let t0 = Instant::now();
                    store.stage_batch(records, None).unwrap();
                    lat.push(t0.elapsed());
                    count.fetch_add(batch as u64, Ordering::Relaxed);
                }
                lat
            })
        })
        .collect();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let mut lat: Vec<Duration> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let secs = start.elapsed().as_secs_f64();
    lat.sort();
    let n = count.load(Ordering::Relaxed);
    let rate = n as f64 / secs;
    println!(
        "| {stagers:>3} | {batch:>4} | {:>6} | {:>9.0} | {:>8.2} | {:>8.2} | {:>8.2} |",
        if sealed { "sealed" } else { "clear" },
        rate,
        percentile(&lat, 0.50).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
    rate
}

/// The record key of a stager's `n`th record: one of 1,000 medical record numbers per stager
/// (10 digits, like a prontuário), in no order, as patients come to a desk. With
/// `STAGE_BENCH_KEYS=counter`, the shape of the benchmark's first figures: 5-character keys in
/// counter order, which follow one another in the clear index (cheap, append-like inserts),
/// something no keyed hash in a sealed index can do.
fn bench_key(stager: usize, n: usize, rng: &mut u64) -> String {
    if std::env::var_os("STAGE_BENCH_KEYS").is_some_and(|v| v == "counter") {
        return format!("{stager}-{}", n % 1000);
    }
    // xorshift64: a fixed sequence, the same in every run.
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    format!("{:010}", 4_000_000 + stager as u64 * 1000 + *rng % 1000)
}

/// Waits until the previous run's dirty pages are on disk (`sync`), so runs do not share it.
fn settle_disk() {
    let _ = std::process::Command::new("sync").status();
}

fn steady_rate(rate: u64, duration: Duration) {
    let dir = base_dir();
    let store = open(dir.path());
    let body = payload();
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now();
    let mut lat = Vec::new();
    let mut next = start;
    let mut i = 0u64;
    while start.elapsed() < duration {
        let now = Instant::now();
        if now < next {
            std::thread::sleep(next - now);
        }
        i += 1;
        let r = NewRecord::new("create", "patient", Some((i % 500).to_string()), &body).unwrap();
        let t0 = Instant::now();
        store.stage(r).unwrap();
        lat.push(t0.elapsed());
        next += interval;
    }
    lat.sort();
    println!(
        "steady {rate} records/s for {:?}: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms ({} records)",
        duration,
        percentile(&lat, 0.50).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        lat.len()
    );
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn backlog(n: u64) {
    let dir = base_dir();
    {
        let store = open(dir.path());
        let body = payload();
        let mut staged = 0;
        while staged < n {
            let batch = 1000.min(n - staged);
            let records = (0..batch)
                .map(|i| {
                    NewRecord::new(
                        "create",
                        "patient",
                        Some(((staged + i) % 50_000).to_string()),
                        &body,
                    )
                    .unwrap()
                })
                .collect();
            store.stage_batch(records, None).unwrap();
            staged += batch;
        }
    }
    let rss_before = rss_kib();
    let t0 = Instant::now();
    let store = open(dir.path());
    let open_time = t0.elapsed();
    let t1 = Instant::now();
    let batch = store.next_batch("db", 500).unwrap();
    let first_batch = t1.elapsed();
    let status = store.status().unwrap();
    println!(
        "backlog {n}: open {:.0} ms, first next_batch(500) {:.1} ms ({} records), status pending {}, RSS {} MiB (before open {} MiB)",
        open_time.as_secs_f64() * 1e3,
        first_batch.as_secs_f64() * 1e3,
        batch.len(),
        status.records_pending,
        rss_kib() / 1024,
        rss_before / 1024
    );
}

/// `STAGE_BENCH_ONLY=STAGERSxBATCH:clear|sealed` (e.g. `16x256:sealed`): that run alone, for a
/// profiler (docs/PROFILES.md).
fn only_one(spec: &str, d: Duration) {
    let parsed = spec.split_once(':').and_then(|(shape, mode)| {
        let (stagers, batch) = shape.split_once('x')?;
        Some((stagers.parse().ok()?, batch.parse().ok()?, mode == "sealed"))
    });
    let (stagers, batch, sealed) =
        parsed.unwrap_or_else(|| panic!("STAGE_BENCH_ONLY={spec}: expected e.g. 16x256:sealed"));
    throughput(stagers, batch, d, sealed);
}

fn main() {
    // `cargo test --benches` runs this with `--bench` absent: keep that run short.
    let quick = !std::env::args().any(|a| a == "--bench");
    let secs = if quick { 0.3 } else { 3.0 };
    let d = Duration::from_secs_f64(secs);
    println!("| stagers | batch | at rest | records/s | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|---|");
    if let Ok(only) = std::env::var("STAGE_BENCH_ONLY") {
        return only_one(&only, d);
    }
    let mut ratios = Vec::new();
    for stagers in [1, 16, 64] {
        for batch in [1, 256] {
            // Clear, sealed, sealed, clear, each after the disk has written back the run
            // before: whichever goes second otherwise pays for the first one's writeback.
            let (mut clear, mut sealed) = (0.0, 0.0);
            for sealed_run in [false, true, true, false] {
                settle_disk();
                let rate = throughput(stagers, batch, d, sealed_run);
                if sealed_run {
                    sealed += rate;
                } else {
                    clear += rate;
                }
            }
            ratios.push((stagers, batch, sealed / clear));
        }
    }
    for (stagers, batch, ratio) in ratios {
        println!("sealed/clear, {stagers} stagers × batches of {batch}: {ratio:.2}");
    }
    steady_rate(
        1000,
        if quick {
            Duration::from_millis(300)
        } else {
            Duration::from_secs(10)
        },
    );
    let n = std::env::var("STAGE_BENCH_BACKLOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 2_000 } else { 100_000 });
    backlog(n);
}
