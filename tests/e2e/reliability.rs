//! The crash loop, long outage and flapping sink scenarios in their bounded CI versions: the same
//! code `scripts/soak` runs long (`estafeta_e2e::reliability`), with small counts here. Each prints
//! its figures.

use std::time::{Duration, Instant};

use estafeta_e2e::reliability::{
    CrashParams, FlapParams, OutageParams, crash_loop, flapping, long_outage,
};

/// Long outage: 200,000 records (arrays of 256 over 2,000 keys) while PostgreSQL and the API
/// refuse connections; VmRSS flat; then the backlog drains once, in key order, at both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_outage_of_postgres_and_the_api_keeps_memory_flat_and_drains_in_order() {
    let started = Instant::now();
    let report = long_outage(&OutageParams {
        records: 200_000,
        batch: 256,
        keys: 2_000,
        api_concurrency: 64,
        drain_timeout: Duration::from_secs(240),
        rss_slack_kib: RSS_SLACK_KIB,
    })
    .await;
    eprintln!(
        "long outage: {} records posted in {:.1} s; VmRSS {} KiB after the first 20,000, {} KiB after 100,000, at most {} KiB after; drained PostgreSQL in {:.1} s ({:.0} records/s), the API in {:.1} s ({:.0} records/s); total {:?}",
        report.records,
        report.ingest_secs,
        report.rss_first_tenth_kib,
        report.rss_half_kib,
        report.rss_max_kib,
        report
            .drain_secs
            .get("database")
            .copied()
            .unwrap_or(f64::NAN),
        report.throughput("database"),
        report.drain_secs.get("api").copied().unwrap_or(f64::NAN),
        report.throughput("api"),
        started.elapsed()
    );
    assert!(
        report.problems.is_empty(),
        "{} problem(s):\n{}",
        report.problems.len(),
        report.problems.join("\n")
    );
    assert_eq!((report.pg.lost, report.pg.doubled), (0, 0));
    assert_eq!((report.api.lost, report.api.doubled), (0, 0));
}

/// How much the agent's VmRSS may grow between 20,000 and 200,000 records staged during the
/// outage: 16 MiB. Measured on the 2-core CI VM, debug build: 34,796 → 41,192 KiB,
/// 37,060 → 43,772 KiB and 30,596 → 40,548 KiB; release build (`scripts/soak`): 26,372 →
/// 35,264 KiB. So 6.5 to 9.7 MiB of growth, varying from run to run, which is not yet pinned
/// down: the SQLite index's page cache (2 MiB per connection), the WAL-index mapping, the
/// allocator's per-thread arenas and the stacks of blocking-pool threads all grow at first and
/// level off (the test also prints VmRSS at 100,000 records, to tell that from a leak).
/// Keeping the records themselves in memory would cost at least their id, key and payload,
/// about 150 bytes each: 27 MiB for the 180,000 records in between. So the bound tells "flat"
/// from "holds the backlog in memory", though not from a leak of a few dozen bytes a record.
const RSS_SLACK_KIB: u64 = 16 * 1024;

/// Flapping sink: about 70 s of the API flapping between up, refusing, stalling and 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_api_gets_everything_once_in_order_and_is_not_hammered() {
    let report = flapping(&FlapParams {
        duration: Duration::from_secs(60),
        phase: Duration::from_secs(4),
        keys: 20,
        per_key: 40,
        seed: 77,
    })
    .await;
    for d in &report.down {
        eprintln!(
            "  {:?} {:.1} s: {} attempts (bound {})",
            d.phase, d.secs, d.attempts, d.bound
        );
    }
    eprintln!(
        "flapping: {} records, {} phases, {} requests, {} resends after cuts, drained {:.1} s after the last phase",
        report.records, report.phases, report.requests, report.api.resent, report.drain_secs
    );
    assert!(
        report.problems.is_empty(),
        "{} problem(s):\n{}",
        report.problems.len(),
        report.problems.join("\n")
    );
    assert_eq!((report.api.lost, report.api.doubled), (0, 0));
}

/// Crash loop with the separate load process: 10 SIGKILLs while `estafeta-load --retry` posts
/// from 6 clients that retry with the same `Idempotency-Key` until answered, and writes down
/// what was acknowledged. Nothing acknowledged is lost and nothing is applied twice, counted by
/// the agent's record id and by the client's own identity of each record (payload id and n):
/// a request staged just before a SIGKILL and retried must be answered with its first receipts,
/// not staged again. The rate (240 requests of 4 records a second) is what makes a SIGKILL
/// land often enough between a request's fsync and its answer: with the bug where a client's
/// `Idempotency-Key` was lost in a crash (it was forgotten when the crash came before the index
/// commit), 5 of 8 runs found doubles at this rate, 1 of 3 at 60 requests a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_fed_by_a_separate_load_process_loses_nothing_acknowledged() {
    let report = crash_loop(&CrashParams {
        cycles: 10,
        kill_after: (Duration::from_millis(300), Duration::from_millis(1_200)),
        connections: 6,
        rate: 240.0,
        batch: 4,
        keys: 20,
        fail_fraction: 0.2,
        drain_timeout: Duration::from_secs(120),
        seed: 2026,
    })
    .await;
    eprintln!(
        "crash loop (load process): {} SIGKILLs, {} acknowledged, {} client retries, {} replayed answers, {} requests given up ({} records unanswered); by record id: lost {}/{} (PostgreSQL/API), applied twice {}/{}, {} API resends after a kill; by client record (payload id, n): lost {}/{}, applied twice {}/{}; drained in {:.1} s, peak VmRSS {} KiB; load: {}",
        report.cycles,
        report.acknowledged,
        report.retries,
        report.replayed,
        report.gave_up,
        report.unanswered,
        report.pg.lost,
        report.api.lost,
        report.pg.doubled,
        report.api.doubled,
        report.api.resent,
        report.business_lost_pg,
        report.business_lost_api,
        report.applied_twice_pg,
        report.applied_twice_api,
        report.drain_secs,
        report.peak_rss_kib,
        report.load_summary
    );
    assert!(
        report.problems.is_empty(),
        "{} problem(s):\n{}",
        report.problems.len(),
        report.problems.join("\n")
    );
    assert_eq!(report.cycles, 10);
    assert_eq!((report.pg.lost, report.pg.doubled), (0, 0));
    assert_eq!((report.api.lost, report.api.doubled), (0, 0));
    assert_eq!(
        (report.applied_twice_pg, report.applied_twice_api),
        (0, 0),
        "client records applied twice (PostgreSQL, API)"
    );
    assert_eq!(
        (report.business_lost_pg, report.business_lost_api),
        (0, 0),
        "acknowledged client records lost (PostgreSQL, API)"
    );
}
