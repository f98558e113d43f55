//! `estafeta-soak`: the long versions of the crash loop, long outage and flapping sink
//! scenarios, against the real `estafeta` binary beside it (`scripts/soak` builds both in
//! release and runs this). The scenarios are the same code the CI tests run small
//! (`estafeta_e2e::reliability`); here the counts and durations are flags. It prints one
//! summary table (Markdown) and exits 1 if any scenario found a problem: a record lost, applied
//! twice, out of order, memory that grew, a sink hammered. The crash loop's clients retry with
//! the same `Idempotency-Key` until answered (`estafeta-load --retry`), and "lost" and "applied
//! twice" are counted both by the agent's record id and by the client's own identity of each
//! record (payload `id` and `n`).

use std::time::{Duration, Instant};

use clap::Parser;
use estafeta_e2e::powercut::{PowerCutParams, PowerCutReport, power_cut_cycles};
use estafeta_e2e::reliability::{
    CrashParams, CrashReport, FlapParams, FlapReport, OutageParams, OutageReport, crash_loop,
    flapping, long_outage,
};

/// Long reliability run: crash loop, long outage and flapping sink, with counts as flags.
#[derive(Debug, Parser)]
#[command(name = "estafeta-soak")]
struct Args {
    /// SIGKILL + restart cycles of the crash loop (0 skips it).
    #[arg(long, default_value_t = 50)]
    cycles: usize,
    /// Power cuts (contract 1, durable before acknowledged): load → SIGKILL → forget what was
    /// not fsync'd → remount → restart, with the staging folder on the power-cut file system
    /// (0 skips it; needs root and FUSE).
    #[arg(long, default_value_t = 100)]
    power_cuts: usize,
    /// Records posted during the outage of PostgreSQL and the API (0 skips it).
    #[arg(long, default_value_t = 200_000)]
    records: usize,
    /// Minutes the API flaps (0 skips it).
    #[arg(long, default_value_t = 5.0)]
    flap_minutes: f64,
    /// Load process of the crash loop: connections and requests per second in all.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Records per request of the crash loop's load.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Seed of the random kill times, failures and workloads.
    #[arg(long, default_value_t = 2026)]
    seed: u64,
    /// Power cuts with encryption at rest on (`STAGING_KEY_FILE`).
    #[arg(long)]
    sealed: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(run(args))
}

async fn run(args: Args) -> std::process::ExitCode {
    let started = Instant::now();
    let mut crash: Option<CrashReport> = None;
    let mut cuts: Option<PowerCutReport> = None;
    let mut outage: Option<OutageReport> = None;
    let mut flap: Option<FlapReport> = None;
    if args.cycles > 0 {
        eprintln!("soak: crash loop, {} SIGKILLs…", args.cycles);
        let report = crash_loop(&CrashParams {
            cycles: args.cycles,
            kill_after: (Duration::from_millis(300), Duration::from_millis(2_000)),
            connections: args.connections,
            rate: args.rate,
            batch: args.batch,
            keys: 20,
            fail_fraction: 0.2,
            drain_timeout: Duration::from_secs(600),
            seed: args.seed,
        })
        .await;
        eprintln!("soak: crash loop done: {report:?}");
        crash = Some(report);
    }
    if args.power_cuts > 0 {
        eprintln!("soak: {} power cuts…", args.power_cuts);
        let report = power_cut_cycles(&PowerCutParams {
            cycles: args.power_cuts,
            cut_after: (Duration::from_millis(300), Duration::from_millis(2_000)),
            connections: 6,
            rate: args.rate,
            batch: args.batch,
            keys: 8,
            fail_fraction: 0.2,
            tear_every: 3,
            sync_delay: Duration::from_millis(5),
            drain_timeout: Duration::from_secs(600),
            seed: args.seed,
            sealed: args.sealed,
        })
        .await;
        eprintln!("soak: power cuts done: {report:?}");
        cuts = Some(report);
    }
    if args.records > 0 {
        eprintln!("soak: outage, {} records…", args.records);
        let report = long_outage(&OutageParams {
            records: args.records,
            batch: 256,
            keys: 2_000,
            api_concurrency: 64,
            drain_timeout: Duration::from_secs(1_800),
            // The CI test's bound (16 MiB, explained in tests/e2e/reliability.rs) for 200,000
            // records; a longer run gets the same bound, so a slow leak shows more clearly.
            rss_slack_kib: 16 * 1024,
        })
        .await;
        eprintln!("soak: outage done: {report:?}");
        outage = Some(report);
    }
    if args.flap_minutes > 0.0 {
        eprintln!("soak: flapping API, {} min…", args.flap_minutes);
        let report = flapping(&FlapParams {
            duration: Duration::from_secs_f64(args.flap_minutes * 60.0),
            phase: Duration::from_secs(4),
            keys: 20,
            per_key: (args.flap_minutes * 200.0).ceil() as usize,
            seed: args.seed,
        })
        .await;
        eprintln!("soak: flapping done: {report:?}");
        flap = Some(report);
    }
    let problems = print_table(
        &args,
        crash.as_ref(),
        cuts.as_ref(),
        outage.as_ref(),
        flap.as_ref(),
        started,
    );
    if problems == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

/// Prints the summary table and every problem; returns how many problems there were.
fn print_table(
    args: &Args,
    crash: Option<&CrashReport>,
    cuts: Option<&PowerCutReport>,
    outage: Option<&OutageReport>,
    flap: Option<&FlapReport>,
    started: Instant,
) -> usize {
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut problems: Vec<String> = Vec::new();
    let mut peak_rss = 0u64;
    if let Some(c) = crash {
        rows.push((
            "Crash loop: SIGKILL cycles survived".into(),
            format!("{} of {}", c.cycles, args.cycles),
        ));
        rows.push((
            "Crash loop: records acknowledged (load process)".into(),
            format!(
                "{} ({} more given up on without an answer; {} of those applied)",
                c.acknowledged,
                c.unanswered,
                c.pg.unacknowledged.max(c.api.unacknowledged)
            ),
        ));
        rows.push((
            "Crash loop: client resends / replayed answers / requests given up".into(),
            format!(
                "{} / {} / {} (same body and Idempotency-Key until answered)",
                c.retries, c.replayed, c.gave_up
            ),
        ));
        rows.push((
            "Crash loop: lost by record id (PostgreSQL / API)".into(),
            format!("{} / {}", c.pg.lost, c.api.lost),
        ));
        rows.push((
            "Crash loop: applied twice by record id (PostgreSQL / API)".into(),
            format!(
                "{} / {} ({} API resends after a SIGKILL, deduplicated by Idempotency-Key)",
                c.pg.doubled, c.api.doubled, c.api.resent
            ),
        ));
        rows.push((
            "Crash loop: lost by client record, payload id and n (PostgreSQL / API)".into(),
            format!("{} / {}", c.business_lost_pg, c.business_lost_api),
        ));
        rows.push((
            "Crash loop: applied twice by client record, payload id and n (PostgreSQL / API)"
                .into(),
            format!("{} / {}", c.applied_twice_pg, c.applied_twice_api),
        ));
        rows.push((
            "Crash loop: drain after the last restart".into(),
            format!("{:.1} s", c.drain_secs),
        ));
        peak_rss = peak_rss.max(c.peak_rss_kib);
        problems.extend(c.problems.iter().map(|p| format!("crash loop: {p}")));
    }
    if let Some(c) = cuts {
        rows.push((
            "Power cuts: cycles survived (torn writes)".into(),
            format!("{} of {} ({} torn)", c.cycles, args.power_cuts, c.tears),
        ));
        rows.push((
            "Power cuts: forgotten (unsynced bytes / directory entries)".into(),
            format!("{} / {}", c.bytes_forgotten, c.entries_forgotten),
        ));
        rows.push((
            "Power cuts: records acknowledged (retrying clients)".into(),
            format!(
                "{} ({} given up; load: {})",
                c.acknowledged, c.unanswered, c.load_summary
            ),
        ));
        rows.push((
            "Power cuts: lost / applied twice / out of order, by client record (PostgreSQL; API)"
                .into(),
            format!(
                "{} / {} / {}; {} / {} / {}",
                c.pg.lost,
                c.pg.applied_twice,
                c.pg.disorder,
                c.api.lost,
                c.api.applied_twice,
                c.api.disorder
            ),
        ));
        rows.push((
            "Power cuts: source rows / dead letters kept / requeued".into(),
            format!("{} / {} / {}", c.source_rows, c.rejected, c.requeued),
        ));
        problems.extend(c.problems.iter().map(|p| format!("power cuts: {p}")));
    }
    if let Some(o) = outage {
        rows.push((
            "Outage: records staged while PostgreSQL and the API refused".into(),
            format!("{} in {:.1} s", o.records, o.ingest_secs),
        ));
        rows.push((
            "Outage: agent VmRSS after 10% / 50% / peak after 10%".into(),
            format!(
                "{} KiB / {} KiB / {} KiB",
                o.rss_first_tenth_kib, o.rss_half_kib, o.rss_max_kib
            ),
        ));
        for (sink, label) in [("database", "PostgreSQL"), ("api", "API")] {
            rows.push((
                format!("Outage: drain throughput, {label}"),
                format!(
                    "{:.0} records/s ({:.1} s)",
                    o.throughput(sink),
                    o.drain_secs.get(sink).copied().unwrap_or(f64::NAN)
                ),
            ));
        }
        rows.push((
            "Outage: lost / applied twice (PostgreSQL / API)".into(),
            format!(
                "{} / {} and {} / {}",
                o.pg.lost, o.pg.doubled, o.api.lost, o.api.doubled
            ),
        ));
        peak_rss = peak_rss.max(o.rss_max_kib);
        problems.extend(o.problems.iter().map(|p| format!("outage: {p}")));
    }
    if let Some(f) = flap {
        let worst = f
            .down
            .iter()
            .map(|d| d.attempts as f64 / d.bound.max(1) as f64)
            .fold(0.0, f64::max);
        let attempts: u64 = f.down.iter().map(|d| d.attempts).sum();
        let bound: u64 = f.down.iter().map(|d| d.bound).sum();
        rows.push((
            "Flapping: phases / records".into(),
            format!("{} / {}", f.phases, f.records),
        ));
        rows.push((
            "Flapping: attempts while down / backoff bound".into(),
            format!(
                "{attempts} / {bound} over {} down phases (worst phase at {:.0}% of its bound)",
                f.down.len(),
                worst * 100.0
            ),
        ));
        rows.push((
            "Flapping: lost / applied twice".into(),
            format!(
                "{} / {} ({} resends after a cut)",
                f.api.lost, f.api.doubled, f.api.resent
            ),
        ));
        problems.extend(f.problems.iter().map(|p| format!("flapping: {p}")));
    }
    rows.push(("Peak agent VmRSS".into(), format!("{peak_rss} KiB")));
    rows.push((
        "Problems".into(),
        if problems.is_empty() {
            "none".into()
        } else {
            problems.len().to_string()
        },
    ));
    rows.push((
        "Duration".into(),
        format!("{:.0} s", started.elapsed().as_secs_f64()),
    ));
    println!();
    println!("| Figure | Value |");
    println!("| --- | --- |");
    for (k, v) in rows {
        println!("| {k} | {v} |");
    }
    for p in &problems {
        println!("PROBLEM: {p}");
    }
    problems.len()
}
