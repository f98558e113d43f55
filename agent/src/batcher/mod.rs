//! The batcher: moves staged records to the sinks. [`flush_once`] runs one flush cycle of one
//! sink: it leases batches from the store, hands them to the sink and turns each outcome into an
//! ack, a retry with exponential backoff and jitter, or a dead letter. [`Batcher`] runs one task
//! per sink that starts a cycle on each `CRONTAB` tick (missed ticks collapse into one), after
//! writes when `FLUSH_ON_WRITE` is on, and when the store's earliest retry comes due; the first
//! batch a sink answers after it was seen down makes every record waiting in backoff due. A sink's
//! cycles never overlap because its task is one sequential loop. On shutdown the delivery in
//! flight may finish within the grace period and is then settled; otherwise its lease is
//! released and the records stay pending. Per-key order is shared: the store leases runs of a
//! key in sequence order and keeps a key back while one of its records is in flight, in backoff
//! or dead; the sink keeps each run's order and skips the rest of a run after a failure; and
//! settling enforces the skip ([`crate::sinks::hold_back`]), so a failed batch counts one
//! attempt per key. A batch's outcomes settle in one store transaction. The task reads the time of day through a [`Clock`], so
//! tests can run its schedule on tokio's paused time instead of sleeping.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use estafeta_staging::{CleanupReport, Delivery, Staging, StoreError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::crontab::Schedule;
use crate::metrics::{FlushReport, Metrics};
use crate::sinks::{Outcome, Sink};

mod settle;
pub use settle::Settle;
use settle::{Settled, XorShift, behind_failures, settle};

/// After a write notification, wait this long so a burst of writes gives one cycle.
pub const WRITE_DEBOUNCE: Duration = Duration::from_millis(5);
/// The batcher wakes at least this often to re-read the clock (it may have jumped).
pub const MAX_SLEEP: Duration = Duration::from_secs(60);
/// A retry wake-up is never sooner than this after the previous cycle, so a store that
/// reports an already due time cannot make the loop spin.
pub const MIN_WAKEUP_GAP: Duration = Duration::from_secs(1);
/// The daemon's batcher deletes delivered segment files at most this often per sink: cleanup
/// seals the segment being written when it is drained, so doing it after every write-triggered
/// cycle would leave many small files.
pub const CLEANUP_INTERVAL: Duration = Duration::from_secs(30);
/// In a long cycle, the segments delivered whole are deleted every this many batches, beside the
/// deliveries, instead of all at the cycle's end: the disk is freed as a backlog drains (a full
/// disk after an outage takes records again sooner), and the deletions' work and `fsync`s overlap
/// the sink's round trips instead of following the last batch. 8 database batches of 2,000 are
/// 16,000 records, more than a 16 MiB segment of 1 KB records.
const DELETE_DELIVERED_EVERY: usize = 8;

/// Where a sink's task reads the time of day, for its `CRONTAB` ticks and its wake-ups.
///
/// Only the task's schedule reads it. Retry times written to the store, and the store's own idea
/// of what is due, use the machine's clock (the staging store has no other), so a test clock
/// should start near the machine's time when retry wake-ups matter.
#[derive(Debug, Clone, Copy, Default)]
pub enum Clock {
    /// The machine's clock (the daemon). It may jump: the task re-reads it at least every
    /// [`MAX_SLEEP`].
    #[default]
    System,
    /// `start` when made, then moving with tokio's clock: under `tokio::time::pause` (or
    /// `#[tokio::test(start_paused = true)]`) the ticks come exactly when the test advances time,
    /// without waiting for them.
    FollowsTokio {
        start: DateTime<Utc>,
        origin: tokio::time::Instant,
    },
}

impl Clock {
    /// A clock that reads `start` now and then follows tokio's (possibly paused) time.
    pub fn follows_tokio(start: DateTime<Utc>) -> Self {
        Self::FollowsTokio {
            start,
            origin: tokio::time::Instant::now(),
        }
    }

    /// The time of day.
    pub fn now(&self) -> DateTime<Utc> {
        match self {
            Self::System => Utc::now(),
            Self::FollowsTokio { start, origin } => {
                let elapsed =
                    chrono::Duration::from_std(origin.elapsed()).unwrap_or(chrono::TimeDelta::MAX);
                *start + elapsed
            }
        }
    }
}

/// Why a flush cycle stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CycleEnd {
    /// Nothing deliverable is left.
    Drained,
    /// `limit` records were handled.
    Limit,
    /// Every outcome of a batch was a retry: the sink is down; don't hammer it.
    SinkDown,
    /// One batch was logged (`DRY_RUN`); the same records would come back.
    DryRun,
    /// Shutdown.
    Cancelled,
}

/// What the daemon's task gives a cycle: shutdown (once `token` fires, the delivery in flight
/// gets `grace` to finish), and the metrics that follow the drain batch by batch, so the drain
/// rate moves during a long cycle.
struct Stop<'a> {
    token: &'a CancellationToken,
    grace: Duration,
    metrics: &'a Metrics,
}

/// Adds a settled batch to the cycle's report, and to the daemon's drain rate.
fn count(report: &mut FlushReport, settled: &Settled, daemon: Option<&Stop<'_>>) {
    report.add(settled);
    if let Some(daemon) = daemon {
        daemon.metrics.add_progress(&report.sink, settled.delivered);
    }
}

/// Runs one flush cycle of `sink`: batches until nothing is deliverable or `limit` records.
pub async fn flush_once(
    store: &Staging,
    sink: &Arc<dyn Sink>,
    config: &Config,
    limit: usize,
) -> anyhow::Result<FlushReport> {
    let mut rng = XorShift::from_clock();
    let (report, _) = flush_cycle(store, sink, config, limit, None, true, false, &mut rng).await?;
    Ok(report)
}

/// Delivers records the caller leased itself ([`Staging::requeue_leased`], for `estafeta retry
/// --send`) through `sink`, and settles them as a flush cycle settles a batch (backoff,
/// `max_attempts`, dead letters, hold-back): what becomes of a record does not depend on who
/// sent it. Returns what became of each record, in the batch's order.
pub async fn deliver_leased(
    store: &Staging,
    sink: &Arc<dyn Sink>,
    config: &Config,
    batch: Vec<Delivery>,
) -> anyhow::Result<Vec<Settle>> {
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    let mut rng = XorShift::from_clock();
    let outcomes = sink.deliver(&batch).await;
    let settled = settle(store, sink.name(), config, batch, outcomes, &mut rng).await?;
    Ok(settled.records)
}

/// What `sink` would send for up to `limit` deliverable records, one text per record (for
/// `estafeta flush --dry-run --show-payload`): the records are leased so the preview shows
/// exactly what a cycle would take, then given back untouched, nothing sent or counted.
pub async fn preview(
    store: &Staging,
    sink: &Arc<dyn Sink>,
    limit: usize,
) -> anyhow::Result<Vec<String>> {
    let name = sink.name().to_owned();
    let batch = lease(store, &name, limit.max(1)).await?;
    let shown = batch.iter().map(|d| sink.preview(d)).collect();
    let seqs: Vec<u64> = batch.iter().map(|d| d.envelope.seq).collect();
    if !seqs.is_empty() {
        release(store, &name, seqs).await?;
    }
    Ok(shown)
}

/// Runs batches of `sink` until nothing is deliverable, `limit` records or shutdown. With
/// `wake_backlog` (the daemon's task, when the sink was last seen down), the first batch the
/// sink answers makes every record waiting in backoff due at once, so the backlog drains in
/// this cycle instead of key by key as each retry time comes.
#[allow(clippy::too_many_arguments)]
async fn flush_cycle(
    store: &Staging,
    sink: &Arc<dyn Sink>,
    config: &Config,
    limit: usize,
    stop: Option<&Stop<'_>>,
    cleanup: bool,
    wake_backlog: bool,
    rng: &mut XorShift,
) -> anyhow::Result<(FlushReport, CycleEnd)> {
    let mut wake_backlog = wake_backlog;
    let name = sink.name().to_owned();
    let mut report = FlushReport {
        sink: name.clone(),
        ..FlushReport::default()
    };
    let mut remaining = limit;
    let batch_size = if sink.applies_in_one_transaction() {
        config.database_batch_size
    } else {
        config.batch_size
    }
    .max(1);
    // A three-stage pipeline, so that the store's work overlaps the sink's round trip: while
    // one batch travels to the sink, the batch before it is settled (acked) and the batch after
    // it is leased. Per-key order holds: a record stays in flight until it is settled, and a
    // record in flight keeps the later records of its key out of every other deliverer's batch.
    // The batch leased ahead may continue the runs of the batch travelling (batches of one sink
    // go out one after another, so they arrive in order), and before it is sent, the records of
    // every key the batch before it did not deliver whole go back unsent (`behind_failures`):
    // a hot key keeps the pipeline full without anything overtaking a failure.
    let mut prefetched: Option<Vec<Delivery>> = None;
    let mut unsettled: Option<(Vec<Delivery>, Vec<Outcome>)> = None;
    // Deletion of delivered segments running beside the pipeline (one at a time), and the
    // batches since the last one started. Not when delivered records are kept for days: nothing
    // this cycle delivers is old enough, and the periodic cleanup deletes the rest.
    let mut deleting: Option<tokio::task::JoinHandle<Result<CleanupReport, StoreError>>> = None;
    let mut batches_since_delete = 0usize;
    let delete_as_it_goes = config.keep_delivered.is_zero();
    let result: anyhow::Result<CycleEnd> = async {
        loop {
            if remaining == 0 {
                return Ok(CycleEnd::Limit);
            }
            if stop.is_some_and(|stop| stop.token.is_cancelled()) {
                return Ok(CycleEnd::Cancelled);
            }
            let batch = match prefetched.take() {
                // Leased while the batch before it travelled, it may continue that batch's runs:
                // the records of a key that batch did not deliver whole go back unsent.
                Some(batch) => {
                    let (batch, behind) = match &unsettled {
                        Some((before, outcomes)) => behind_failures(before, outcomes, batch),
                        None => (batch, Vec::new()),
                    };
                    if !behind.is_empty() {
                        release(store, &name, behind).await?;
                    }
                    if batch.is_empty() {
                        continue;
                    }
                    batch
                }
                None => {
                    // Nothing was leased ahead: settle the batch in flight first, since it may
                    // be what holds the next records of its keys back.
                    if let Some((batch, outcomes)) = unsettled.take() {
                        let settled = settle(store, &name, config, batch, outcomes, rng).await?;
                        count(&mut report, &settled, stop);
                    }
                    lease(store, &name, batch_size.min(remaining)).await?
                }
            };
            if batch.is_empty() {
                return Ok(CycleEnd::Drained);
            }
            remaining = remaining.saturating_sub(batch.len());
            let seqs: Vec<u64> = batch.iter().map(|d| d.envelope.seq).collect();
            debug!(sink = %name, records = batch.len(), "Batch leased.");

            if config.dry_run {
                for line in sink.dry_run(&batch) {
                    info!(sink = %name, "DRY_RUN: {line}");
                }
                release(store, &name, seqs).await?;
                report.dry_run += batch.len() as u64;
                return Ok(CycleEnd::DryRun);
            }

            let deliver = async {
                match stop {
                    None => Some(sink.deliver(&batch).await),
                    Some(stop) => {
                        let mut deliver = sink.deliver(&batch);
                        tokio::select! {
                            outcomes = &mut deliver => Some(outcomes),
                            () = stop.token.cancelled() => {
                                info!(sink = %name, records = batch.len(), grace_secs = stop.grace.as_secs_f64(), "Shutting down; waiting for the delivery in flight.");
                                tokio::time::timeout(stop.grace, &mut deliver).await.ok()
                            }
                        }
                    }
                }
            };
            let previous = unsettled.take();
            let settle_previous = async {
                match previous {
                    Some((batch, outcomes)) => {
                        settle(store, &name, config, batch, outcomes, rng).await.map(Some)
                    }
                    None => Ok(None),
                }
            };
            let next_want = batch_size.min(remaining);
            let in_flight = seqs.clone();
            let prefetch = async {
                if next_want == 0 {
                    return Ok(Vec::new());
                }
                lease_ahead(store, &name, next_want, in_flight).await
            };
            let (settled, outcomes, next) = tokio::join!(settle_previous, deliver, prefetch);
            // An empty look-ahead proves nothing: the batch in flight held back the later
            // records of its keys, so the next iteration leases again once it is settled.
            let next_failed = next.is_err();
            prefetched = next.ok().filter(|next| !next.is_empty());
            let Some(outcomes) = outcomes else {
                warn!(sink = %name, records = seqs.len(), "The delivery in flight did not finish within the grace period; its records stay pending and will be sent again.");
                release(store, &name, seqs).await?;
                if let Some(settled) = settled? {
                    count(&mut report, &settled, stop);
                }
                return Ok(CycleEnd::Cancelled);
            };
            unsettled = Some((batch, outcomes));
            if let Some(settled) = settled? {
                count(&mut report, &settled, stop);
            }
            if delete_as_it_goes {
                batches_since_delete += 1;
                if deleting.as_ref().is_some_and(|task| task.is_finished()) {
                    note_cleanup(deleted(deleting.take().expect("checked")).await);
                }
                if deleting.is_none() && batches_since_delete >= DELETE_DELIVERED_EVERY {
                    batches_since_delete = 0;
                    let store = store.clone();
                    deleting = Some(tokio::task::spawn_blocking(move || {
                        store.delete_delivered()
                    }));
                }
            }
            if next_failed {
                anyhow::bail!("could not lease the next batch from the staging store");
            }
            let (_, outcomes) = unsettled.as_ref().expect("just set");
            let retried = outcomes.iter().any(|o| matches!(o, Outcome::Retry { .. }));
            let answered = outcomes
                .iter()
                .any(|o| matches!(o, Outcome::Delivered | Outcome::Dead { .. }));
            if answered && wake_backlog {
                // The sink is back. The records that waited out the outage in backoff each
                // have their own retry time (jittered, up to RETRY_MAX_SECS); left to them,
                // a backlog over many keys would drain key by key as the times come. The batch
                // just answered is still in flight, so a failure of its own keeps its backoff.
                wake_backlog = false;
                let woken = {
                    let name = name.clone();
                    blocking(store, move |store| store.retry_now(&name)).await?
                };
                if woken > 0 {
                    info!(sink = %name, records = woken, "The sink answered again; delivering the records that waited in backoff.");
                }
            }
            if retried && !answered {
                let (batch, outcomes) = unsettled.take().expect("just set");
                let settled = settle(store, &name, config, batch, outcomes, rng).await?;
                count(&mut report, &settled, stop);
                warn!(
                    sink = %name, records = settled.retried,
                    error = settled.first_error.as_deref().unwrap_or_default(),
                    "Sink unavailable; the records stay pending and will be retried with backoff."
                );
                return Ok(CycleEnd::SinkDown);
            }
        }
    }
    .await;
    // Settle the last batch delivered, and give back a batch leased ahead but not sent.
    let last = match unsettled.take() {
        Some((batch, outcomes)) => settle(store, &name, config, batch, outcomes, rng)
            .await
            .map(|settled| count(&mut report, &settled, stop)),
        None => Ok(()),
    };
    release_prefetched(store, &name, prefetched.take()).await;
    if let Some(task) = deleting.take() {
        note_cleanup(deleted(task).await);
    }
    let end = result?;
    last?;

    if cleanup {
        note_cleanup(blocking(store, |store| store.cleanup()).await);
    }
    if report.delivered + report.retried + report.dead > 0 {
        info!(
            sink = %name, delivered = report.delivered, retried = report.retried,
            dead = report.dead, "Flush completed."
        );
    }
    Ok((report, end))
}

/// Logs what a deletion of delivered segments did, or why it could not (it is tried again).
fn note_cleanup(result: anyhow::Result<CleanupReport>) {
    match result {
        Ok(cleanup) if cleanup.segments_deleted > 0 => debug!(
            segments = cleanup.segments_deleted,
            bytes = cleanup.bytes_freed,
            "Delivered segment files deleted."
        ),
        Ok(_) => {}
        Err(err) => warn!(
            error = format!("{err:#}"),
            "Could not delete delivered segment files; will try again after the next flush."
        ),
    }
}

/// The result of a deletion started with `spawn_blocking` beside the pipeline.
async fn deleted(
    task: tokio::task::JoinHandle<Result<CleanupReport, StoreError>>,
) -> anyhow::Result<CleanupReport> {
    Ok(task.await.context("a staging task panicked")??)
}

/// Leases the next batch of `sink` (up to `want` records).
async fn lease(store: &Staging, sink: &str, want: usize) -> anyhow::Result<Vec<Delivery>> {
    let sink = sink.to_owned();
    blocking(store, move |store| store.next_batch(&sink, want)).await
}

/// Leases the batch after `in_flight`, the one being sent (see `Staging::next_batch_ahead`).
async fn lease_ahead(
    store: &Staging,
    sink: &str,
    want: usize,
    in_flight: Vec<u64>,
) -> anyhow::Result<Vec<Delivery>> {
    let sink = sink.to_owned();
    blocking(store, move |store| {
        store.next_batch_ahead(&sink, want, &in_flight)
    })
    .await
}

/// Gives back a batch leased ahead that will not be delivered in this cycle. Best effort: if
/// it fails, the lease runs out by itself.
async fn release_prefetched(store: &Staging, sink: &str, batch: Option<Vec<Delivery>>) {
    let Some(batch) = batch.filter(|b| !b.is_empty()) else {
        return;
    };
    let seqs = batch.iter().map(|d| d.envelope.seq).collect();
    if let Err(err) = release(store, sink, seqs).await {
        warn!(sink = %sink, error = format!("{err:#}"), "Could not give back a batch leased ahead; its records wait for the lease to run out.");
    }
}

/// Gives leased records back untouched.
async fn release(store: &Staging, sink: &str, seqs: Vec<u64>) -> anyhow::Result<()> {
    let sink = sink.to_owned();
    blocking(store, move |store| store.release(&sink, &seqs)).await
}

/// Runs a blocking store call off the async workers.
async fn blocking<T, F>(store: &Staging, call: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce(&Staging) -> Result<T, StoreError> + Send + 'static,
{
    let store = store.clone();
    let result = tokio::task::spawn_blocking(move || call(&store))
        .await
        .context("a staging task panicked")?;
    Ok(result?)
}

/// The batchers' wake-up after a write: every intake path (the API, adoption, the SQL sources)
/// bumps it after staging, and each batcher listens ([`Batcher::new`]'s `writes`). A watch
/// channel rather than a `Notify`: a batcher busy flushing when the write lands still sees it
/// afterwards. Does nothing unless `FLUSH_ON_WRITE` is on.
#[derive(Clone)]
pub struct WriteSignal {
    writes: Arc<watch::Sender<u64>>,
    enabled: bool,
}

impl WriteSignal {
    /// A signal that wakes the batchers when `enabled` (`FLUSH_ON_WRITE`).
    pub fn new(enabled: bool) -> Self {
        let (writes, _) = watch::channel(0);
        Self {
            writes: Arc::new(writes),
            enabled,
        }
    }

    /// Tells the batchers that new records are staged.
    pub fn notify(&self) {
        if self.enabled {
            self.writes.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// A receiver that changes after every write, for a batcher.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.writes.subscribe()
    }
}

/// Runs one delivery task per sink until cancelled.
pub struct Batcher {
    store: Staging,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    schedule: Schedule,
    writes: Option<watch::Receiver<u64>>,
    clock: Clock,
}

impl Batcher {
    /// `writes` changes after each staged write ([`WriteSignal::subscribe`]); it is
    /// only listened to when `FLUSH_ON_WRITE` is on.
    pub fn new(
        store: Staging,
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        writes: Option<watch::Receiver<u64>>,
    ) -> anyhow::Result<Self> {
        let schedule = Schedule::new(&config.crontab, config.tz.clone())?;
        let writes = writes.filter(|_| config.flush_on_write);
        Ok(Self {
            store,
            config,
            metrics,
            schedule,
            writes,
            clock: Clock::System,
        })
    }

    /// Reads the time of day from `clock` instead of the machine's (tests: [`Clock::follows_tokio`]).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Starts one task per sink on `tracker`. After `cancel` fires, a delivery in flight gets
    /// `grace` to finish before its records are released.
    pub fn spawn(
        &self,
        sinks: &[Arc<dyn Sink>],
        tracker: &TaskTracker,
        cancel: &CancellationToken,
        grace: Duration,
    ) {
        for sink in sinks {
            let task = SinkTask {
                store: self.store.clone(),
                config: self.config.clone(),
                metrics: self.metrics.clone(),
                schedule: self.schedule.clone(),
                writes: self.writes.clone(),
                clock: self.clock,
                sink: sink.clone(),
                cancel: cancel.clone(),
                grace,
            };
            tracker.spawn(task.run());
        }
    }
}

/// The loop of one sink.
struct SinkTask {
    store: Staging,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    schedule: Schedule,
    writes: Option<watch::Receiver<u64>>,
    clock: Clock,
    sink: Arc<dyn Sink>,
    cancel: CancellationToken,
    grace: Duration,
}

impl SinkTask {
    async fn run(mut self) {
        let name = self.sink.name().to_owned();
        let mut rng = XorShift::from_clock();
        let mut next_tick = self.schedule.next_after(self.clock.now());
        // With FLUSH_ON_WRITE, deliver what an earlier run left right away.
        let mut due = self.writes.is_some();
        // After a cycle that found the sink down (or a dry run), writes do not start cycles;
        // the tick and the retry times still do.
        let mut quiet_writes = false;
        let mut last_cleanup: Option<tokio::time::Instant> = None;
        // Whether the sink was last seen down: then the first batch it answers wakes every
        // record waiting in backoff (see flush_cycle). True at start: records an earlier run
        // left in backoff need not wait out times set before the restart.
        let mut sink_down = true;
        info!(sink = %name, next_tick = ?next_tick, "Batcher started.");
        loop {
            if self.cancel.is_cancelled() {
                break;
            }
            let now = self.clock.now();
            let tick_due = next_tick.is_some_and(|tick| tick <= now);
            if !due && !tick_due {
                let wakeup = if self.config.dry_run {
                    None
                } else {
                    self.next_wakeup(&name).await
                };
                let gap = chrono::Duration::from_std(MIN_WAKEUP_GAP).unwrap_or_default();
                let wakeup = wakeup.map(|at| at.max(now + gap));
                let target = match (next_tick, wakeup) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                let sleep_for = target
                    .map(|at| (at - now).to_std().unwrap_or(Duration::ZERO))
                    .unwrap_or(MAX_SLEEP)
                    .min(MAX_SLEEP);
                let listen = !quiet_writes && self.writes.is_some();
                tokio::select! {
                    biased;
                    () = self.cancel.cancelled() => break,
                    changed = changed(&mut self.writes), if listen => {
                        if changed {
                            tokio::select! {
                                () = self.cancel.cancelled() => break,
                                () = tokio::time::sleep(WRITE_DEBOUNCE) => {}
                            }
                            if let Some(writes) = &mut self.writes {
                                writes.borrow_and_update();
                            }
                            due = true;
                        } else {
                            self.writes = None;
                        }
                    }
                    () = tokio::time::sleep(sleep_for) => {
                        due = wakeup.is_some_and(|at| self.clock.now() >= at);
                    }
                }
                continue;
            }

            let now = self.clock.now();
            let ticked = next_tick.is_some_and(|tick| tick <= now);
            if ticked {
                // Every tick that passed (during a long flush, a suspend) collapses into this cycle.
                next_tick = self.schedule.next_after(now);
            }
            if ticked && !self.config.dry_run {
                match probe_on_tick(&self.store, &self.sink, &self.config, &mut rng).await {
                    Ok(Probe::StillDown) => {
                        due = false;
                        quiet_writes = true;
                        sink_down = true;
                        continue;
                    }
                    Ok(Probe::Back) => sink_down = false,
                    Ok(Probe::NothingWaiting) => {}
                    Err(err) => {
                        warn!(sink = %name, error = format!("{err:#}"), "Could not probe the sink; running the cycle as usual.")
                    }
                }
            }
            due = false;
            if let Some(writes) = &mut self.writes {
                // Writes that landed before this cycle starts are covered by it.
                writes.borrow_and_update();
            }
            let stop = Stop {
                token: &self.cancel,
                grace: self.grace,
                metrics: &self.metrics,
            };
            let cleanup = last_cleanup.is_none_or(|at| at.elapsed() >= CLEANUP_INTERVAL);
            if cleanup {
                last_cleanup = Some(tokio::time::Instant::now());
            }
            let cycle = flush_cycle(
                &self.store,
                &self.sink,
                &self.config,
                self.config.max_records,
                Some(&stop),
                cleanup,
                sink_down,
                &mut rng,
            )
            .await;
            match cycle {
                Ok((report, end)) => {
                    self.metrics.add_flush(&report);
                    quiet_writes = matches!(end, CycleEnd::SinkDown | CycleEnd::DryRun);
                    if end == CycleEnd::SinkDown {
                        sink_down = true;
                    } else if report.delivered + report.dead > 0 {
                        sink_down = false;
                    }
                    if end == CycleEnd::Cancelled {
                        break;
                    }
                }
                Err(err) => {
                    error!(sink = %name, error = format!("{err:#}"), "Flush failed; records stay pending and are tried again at the next tick.");
                    quiet_writes = true;
                }
            }
        }
        info!(sink = %name, "Batcher stopped.");
    }

    async fn next_wakeup(&self, name: &str) -> Option<DateTime<Utc>> {
        let sink = name.to_owned();
        match blocking(&self.store, move |store| store.next_wakeup(&sink)).await {
            Ok(at) => at,
            Err(err) => {
                warn!(sink = %name, error = format!("{err:#}"), "Could not read the next retry time; relying on the schedule.");
                None
            }
        }
    }
}

/// What a tick's probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    /// No record waits in backoff: nothing to probe.
    NothingWaiting,
    /// The probe record was answered (delivered or refused for good): the sink is back, and
    /// every record waiting in backoff is due now.
    Back,
    /// The probe failed again: leave the backoff as it is.
    StillDown,
}

/// On a `CRONTAB` tick, records waiting in backoff would otherwise wait out their retry time
/// (up to `RETRY_MAX_SECS`) even though the central side may be back. One record — the oldest
/// waiting head — is sent at once as a probe; if the sink answers, the whole backlog becomes
/// due and drains in this tick's cycle. A sink that is still down gets one request per tick,
/// never a batch.
async fn probe_on_tick(
    store: &Staging,
    sink: &Arc<dyn Sink>,
    config: &Config,
    rng: &mut XorShift,
) -> anyhow::Result<Probe> {
    let name = sink.name().to_owned();
    let waiting = {
        let name = name.clone();
        blocking(store, move |store| store.next_wakeup(&name)).await?
    };
    if waiting.is_none_or(|at| at <= Utc::now()) {
        return Ok(Probe::NothingWaiting);
    }
    let batch = {
        let name = name.clone();
        blocking(store, move |store| store.probe_batch(&name)).await?
    };
    if batch.is_empty() {
        return Ok(Probe::NothingWaiting);
    }
    let outcomes = sink.deliver(&batch).await;
    let settled = settle(store, &name, config, batch, outcomes, rng).await?;
    if settled.retried > 0 {
        debug!(sink = %name, "Tick probe: the sink is still unavailable.");
        return Ok(Probe::StillDown);
    }
    let woken = {
        let name = name.clone();
        blocking(store, move |store| store.retry_now(&name)).await?
    };
    info!(sink = %name, records = woken, "The sink answered again; delivering the records that waited in backoff.");
    Ok(Probe::Back)
}

/// Waits for the next write; `false` when no more writes can come.
async fn changed(writes: &mut Option<watch::Receiver<u64>>) -> bool {
    match writes {
        Some(writes) => writes.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}
