//! The batcher against a real staging store in a temporary folder and a scripted in-test sink:
//! outcomes become acks, retries and dead letters; per-key order holds; a down sink is not
//! hammered; dry run keeps everything pending; the daemon's per-sink task flushes after a
//! write, delivers on its `CRONTAB` tick, and gives its lease back when shutdown outlasts the
//! delivery. The task's tests run on tokio's paused time with the batcher's clock following it,
//! so each timing claim is checked exactly (a write wakes it in milliseconds, not at the next
//! `MAX_SLEEP` wake-up) instead of by sleeping.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use estafeta::batcher::{Batcher, Clock, MAX_SLEEP, WRITE_DEBOUNCE, flush_once};
use estafeta::config::Config;
use estafeta::ingest::IngestState;
use estafeta::sinks::{BoxFuture, Outcome, Refusal, Sink};
use estafeta_staging::{Delivery, ListFilter, NewRecord, Options, RecordInfo, Staging, State};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const SINK: &str = "test";

fn test_config(root: &std::path::Path) -> Config {
    Config {
        // Long backoff: a retried record stays out of the next cycles of a test.
        retry_base: Duration::from_secs(60),
        retry_max: Duration::from_secs(600),
        ..Config::for_tests(root)
    }
}

fn open_store(dir: &tempfile::TempDir) -> Staging {
    let mut options = Options::new(dir.path()).with_sinks([SINK]);
    options.min_free_bytes = 0;
    Staging::open(options).expect("store opens").0
}

/// Stages `(action, key, fate)` records of entity `patient`; returns their seqs.
fn stage(store: &Staging, records: &[(&str, &str, &str)]) -> Vec<u64> {
    records
        .iter()
        .map(|(action, key, fate)| {
            let payload = serde_json::json!({ "id": key, "fate": fate }).to_string();
            let record = NewRecord::new(*action, "patient", Some((*key).to_owned()), &payload)
                .expect("valid record");
            store.stage(record).expect("staged").seq
        })
        .collect()
}

/// One batch as the sink saw it: (key, seq) per record.
type Batch = Vec<(Option<String>, u64)>;

/// A sink whose answer for each record is the payload's `fate`: `ok`, `retry`, `retry-later`
/// (with a one-hour `Retry-After`) or `dead`, keeping the sink contract on runs: after a record
/// of a key that is not delivered, the rest of that key in the batch is `Skipped`, not
/// attempted. With `whole_batch_fails` (or while `down` is set), it answers `Retry` for every
/// record instead, as a database sink does when its transaction fails. Remembers every batch it was handed and
/// every record it attempted.
#[derive(Default)]
struct ScriptSink {
    batches: Mutex<Vec<Batch>>,
    attempted: Mutex<Vec<u64>>,
    whole_batch_fails: bool,
    /// Switchable `whole_batch_fails`: an outage that ends.
    down: AtomicBool,
    calls: AtomicUsize,
    /// Delivery takes this long (to test shutdown).
    delay: Option<Duration>,
    /// A staging folder whose segment files are counted at each delivery.
    watch: Option<std::path::PathBuf>,
    segments_seen: Mutex<Vec<usize>>,
}

impl ScriptSink {
    fn batches(&self) -> Vec<Batch> {
        self.batches.lock().expect("lock").clone()
    }

    fn attempted(&self) -> Vec<u64> {
        self.attempted.lock().expect("lock").clone()
    }
}

/// The segment files under a staging folder (`action/entity/yyyy/mm/dd/*.jsonl`).
fn segment_files(root: &std::path::Path) -> usize {
    fn walk(dir: &std::path::Path, count: &mut usize) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('_') {
                continue; // _state, _dead, _damaged: not segments
            }
            if path.is_dir() {
                walk(&path, count);
            } else if path.extension().is_some_and(|e| e == "jsonl") {
                *count += 1;
            }
        }
    }
    let mut count = 0;
    walk(root, &mut count);
    count
}

fn fate(delivery: &Delivery) -> Outcome {
    let payload: serde_json::Value =
        serde_json::from_str(delivery.envelope.payload.get()).expect("JSON payload");
    match payload["fate"].as_str() {
        Some("retry") => Outcome::Retry {
            error: "HTTP 503".into(),
            retry_after: None,
        },
        Some("retry-later") => Outcome::Retry {
            error: "HTTP 429".into(),
            retry_after: Some(Duration::from_secs(3600)),
        },
        Some("dead") => Outcome::Dead {
            reason: Refusal::new("HTTP 400 Bad Request", "bad record: the answer echoes it"),
        },
        _ => Outcome::Delivered,
    }
}

impl Sink for ScriptSink {
    fn name(&self) -> &str {
        SINK
    }

    fn transport(&self) -> estafeta::tls::Transport {
        // In memory: nothing crosses a network.
        estafeta::tls::Transport::local()
    }

    fn deliver<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if let Some(delay) = self.delay {
                tokio::time::sleep(delay).await;
            }
            if let Some(root) = &self.watch {
                let count = segment_files(root);
                self.segments_seen.lock().expect("lock").push(count);
            }
            self.batches.lock().expect("lock").push(
                batch
                    .iter()
                    .map(|d| (d.envelope.key.clone(), d.envelope.seq))
                    .collect(),
            );
            if self.whole_batch_fails || self.down.load(Ordering::SeqCst) {
                return vec![
                    Outcome::Retry {
                        error: "PostgreSQL 08006 connection failure".into(),
                        retry_after: None,
                    };
                    batch.len()
                ];
            }
            let mut stopped = std::collections::HashSet::new();
            let mut attempted = self.attempted.lock().expect("lock");
            batch
                .iter()
                .map(|d| {
                    let key = (d.envelope.entity.clone(), d.envelope.key.clone());
                    if stopped.contains(&key) {
                        return Outcome::Skipped;
                    }
                    attempted.push(d.envelope.seq);
                    let outcome = fate(d);
                    if outcome != Outcome::Delivered {
                        stopped.insert(key);
                    }
                    outcome
                })
                .collect()
        })
    }

    fn dry_run(&self, batch: &[Delivery]) -> Vec<String> {
        batch
            .iter()
            .map(|d| {
                format!(
                    "would send seq {} to /{}",
                    d.envelope.seq, d.envelope.entity
                )
            })
            .collect()
    }

    fn probe(&self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

fn records_by_seq(store: &Staging) -> HashMap<u64, RecordInfo> {
    let filter = ListFilter {
        include_delivered: true,
        ..ListFilter::default()
    };
    store
        .list(&filter)
        .expect("list")
        .into_iter()
        .map(|r| (r.seq, r))
        .collect()
}

fn sink_state(info: &RecordInfo) -> &estafeta_staging::SinkState {
    info.sinks
        .iter()
        .find(|s| s.sink == SINK)
        .expect("record routed to the test sink")
}

#[tokio::test]
async fn outcomes_become_acks_retries_and_dead_letters() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open_store(&dir);
    let config = test_config(dir.path());
    let seqs = stage(
        &store,
        &[
            ("create", "a", "ok"),
            ("create", "b", "retry"),
            ("create", "c", "dead"),
            ("create", "d", "ok"),
            ("create", "e", "retry-later"),
        ],
    );
    let sink = Arc::new(ScriptSink::default());
    let dyn_sink: Arc<dyn Sink> = sink.clone();
    let before = Utc::now();
    let report = flush_once(&store, &dyn_sink, &config, 1000)
        .await
        .expect("flush");
    assert_eq!(
        (
            report.delivered,
            report.retried,
            report.dead,
            report.dry_run
        ),
        (2, 2, 1, 0)
    );
    assert_eq!(report.sink, SINK);
    assert_eq!(sink.calls.load(Ordering::SeqCst), 1);

    let status = store.status().expect("status");
    let sink_status = status
        .sinks
        .iter()
        .find(|s| s.sink == SINK)
        .expect("sink status");
    assert_eq!(sink_status.pending + sink_status.in_flight, 2);
    assert_eq!(sink_status.dead, 1);
    assert!(sink_status.last_success_at.is_some());
    assert!(sink_status.last_failure_at.is_some());

    let records = records_by_seq(&store);
    for seq in [seqs[0], seqs[3]] {
        assert!(
            records
                .get(&seq)
                .is_none_or(|r| sink_state(r).state == State::Delivered),
            "seq {seq} delivered"
        );
    }
    // Backoff for a first failure: between 50% and 100% of RETRY_BASE (60 s).
    let retried = sink_state(&records[&seqs[1]]);
    assert_eq!((retried.state, retried.attempts), (State::Pending, 1));
    assert_eq!(retried.last_error.as_deref(), Some("HTTP 503"));
    let at = next_attempt(retried);
    assert!(at >= before + chrono::Duration::seconds(29), "{at}");
    assert!(at <= Utc::now() + chrono::Duration::seconds(61), "{at}");
    // The server's Retry-After wins over the backoff.
    let later = next_attempt(sink_state(&records[&seqs[4]]));
    assert!(later >= before + chrono::Duration::seconds(3590), "{later}");

    assert_eq!(sink_state(&records[&seqs[2]]).state, State::Dead);
    let dead = store.dead_letters(None).expect("dead letters");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].seq, seqs[2]);
    // The dead letter keeps the whole answer; the status never shows it.
    assert_eq!(
        dead[0].reason,
        "HTTP 400 Bad Request: bad record: the answer echoes it"
    );
    assert!(dead[0].path.exists());
    assert_eq!(sink_status.last_error.as_deref(), Some("HTTP 503"));

    // Nothing is due now: a second cycle sends nothing.
    let report = flush_once(&store, &dyn_sink, &config, 1000)
        .await
        .expect("flush");
    assert_eq!((report.delivered, report.retried, report.dead), (0, 0, 0));
    assert_eq!(sink.calls.load(Ordering::SeqCst), 1);
}

fn next_attempt(state: &estafeta_staging::SinkState) -> DateTime<Utc> {
    let at = state.next_attempt_at.as_deref().expect("next attempt set");
    DateTime::parse_from_rfc3339(at)
        .expect("RFC 3339")
        .with_timezone(&Utc)
}

#[tokio::test]
async fn records_of_one_key_are_delivered_in_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open_store(&dir);
    let config = test_config(dir.path());
    let seqs = stage(
        &store,
        &[
            ("create", "k1", "ok"),
            ("create", "k2", "ok"),
            ("update", "k1", "ok"),
            ("delete", "k1", "ok"),
            ("update", "k2", "ok"),
            ("create", "k1", "ok"),
        ],
    );
    let sink = Arc::new(ScriptSink::default());
    let dyn_sink: Arc<dyn Sink> = sink.clone();
    let report = flush_once(&store, &dyn_sink, &config, 1000)
        .await
        .expect("flush");
    assert_eq!(report.delivered, 6);

    let batches = sink.batches();
    // The whole backlog in one round trip: runs of each key, in sequence order.
    assert_eq!(batches.len(), 1, "{batches:?}");
    let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for batch in &batches {
        let in_batch: Vec<u64> = batch.iter().map(|(_, seq)| *seq).collect();
        assert!(in_batch.is_sorted(), "a batch in sequence order: {batch:?}");
        for (key, seq) in batch {
            seen.entry(key.clone().expect("keyed"))
                .or_default()
                .push(*seq);
        }
    }
    assert_eq!(seen["k1"], vec![seqs[0], seqs[2], seqs[3], seqs[5]]);
    assert_eq!(seen["k2"], vec![seqs[1], seqs[4]]);
    assert_eq!(store.status().expect("status").records_pending, 0);
}

#[tokio::test]
async fn a_retried_record_holds_back_its_own_key_only() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open_store(&dir);
    let config = test_config(dir.path());
    let seqs = stage(
        &store,
        &[
            ("create", "k1", "retry"),
            ("create", "k2", "ok"),
            ("update", "k1", "ok"),
            ("update", "k2", "ok"),
        ],
    );
    let sink = Arc::new(ScriptSink::default());
    let dyn_sink: Arc<dyn Sink> = sink.clone();
    let report = flush_once(&store, &dyn_sink, &config, 1000)
        .await
        .expect("flush");
    assert_eq!((report.delivered, report.retried), (2, 1));
    // k1's update came in the same batch, behind k1's create, and was given back unattempted.
    assert_eq!(sink.batches().len(), 1);
    assert!(
        !sink.attempted().contains(&seqs[2]),
        "k1's update waits for k1's create"
    );
    let records = records_by_seq(&store);
    assert_eq!(sink_state(&records[&seqs[2]]).state, State::Pending);
    assert_eq!(sink_state(&records[&seqs[2]]).attempts, 0);
    // And it stays behind the create in backoff: the next cycle sends nothing.
    let report = flush_once(&store, &dyn_sink, &config, 1000)
        .await
        .expect("flush");
    assert_eq!((report.delivered, report.retried), (0, 0));
    assert_eq!(sink.batches().len(), 1);
}

#[tokio::test]
async fn a_hot_key_is_pipelined_and_a_failure_stops_what_was_leased_ahead() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open_store(&dir);
    let mut config = test_config(dir.path());
    config.batch_size = 2;
    // One key, six versions: batches of two, each leased while the one before it travels.
    let fates = ["ok", "ok", "ok", "retry", "ok", "ok"];
    let records: Vec<(&str, &str, &str)> = fates.iter().map(|f| ("update", "k1", *f)).collect();
    let seqs = stage(&store, &records);
    let sink = Arc::new(ScriptSink::default());
    let dyn_sink: Arc<dyn Sink> = sink.clone();
    let report = flush_once(&store, &dyn_sink, &config, 1000)
        .await
        .expect("flush");
    assert_eq!((report.delivered, report.retried), (3, 1));
    // The 4th failed; the 5th and 6th, leased ahead while the 3rd and 4th travelled, were
    // never sent, and carry no attempt.
    assert_eq!(sink.attempted(), seqs[..4].to_vec());
    let handed: Vec<u64> = sink
        .batches()
        .concat()
        .into_iter()
        .map(|(_, s)| s)
        .collect();
    assert_eq!(
        handed,
        seqs[..4].to_vec(),
        "nothing of k1 handed after its failure"
    );
    let records = records_by_seq(&store);
    for seq in &seqs[4..] {
        let state = sink_state(&records[seq]);
        assert_eq!(
            (state.state, state.attempts),
            (State::Pending, 0),
            "seq {seq}"
        );
    }
}

#[tokio::test]
async fn a_failed_batch_counts_one_attempt_per_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open_store(&dir);
    let config = test_config(dir.path());
    let seqs = stage(
        &store,
        &[
            ("create", "k1", "ok"),
            ("create", "k2", "ok"),
            ("update", "k1", "ok"),
            ("update", "k1", "ok"),
            ("update", "k2", "ok"),
        ],
    );
    // A sink whose transaction failed answers Retry for every record of the batch.
    let sink = Arc::new(ScriptSink {
        whole_batch_fails: true,
        ..ScriptSink::default()
    });
    let dyn_sink: Arc<dyn Sink> = sink.clone();
    let report = flush_once(&store, &dyn_sink, &config, 1000)
        .await
        .expect("flush");
    assert_eq!((report.delivered, report.retried), (0, 2));
    let records = records_by_seq(&store);
    let attempts: Vec<u32> = seqs
        .iter()
        .map(|seq| sink_state(&records[seq]).attempts)
        .collect();
    // The head of each key was tried; the records behind it were not, and carry no attempt
    // (their backoff must not grow for a failure that was not theirs).
    assert_eq!(attempts, vec![1, 1, 0, 0, 0]);
    for seq in &seqs[2..] {
        assert_eq!(sink_state(&records[seq]).next_attempt_at, None, "seq {seq}");
    }
}

#[tokio::test]
async fn a_sink_that_is_down_is_not_hammered() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open_store(&dir);
    let mut config = test_config(dir.path());
    config.batch_size = 2;
    let records: Vec<(&str, String, &str)> = (0..6)
        .map(|i| ("create", format!("k{i}"), "retry"))
        .collect();
    let records: Vec<(&str, &str, &str)> = records
        .iter()
        .map(|(a, k, f)| (*a, k.as_str(), *f))
        .collect();
    stage(&store, &records);
    let sink = Arc::new(ScriptSink::default());
    let dyn_sink: Arc<dyn Sink> = sink.clone();
    let report = flush_once(&store, &dyn_sink, &config, 1000)
        .await
        .expect("flush");
    assert_eq!((report.delivered, report.retried), (0, 2));
    assert_eq!(sink.calls.load(Ordering::SeqCst), 1);
    assert_eq!(store.status().expect("status").records_pending, 6);
}

/// After an outage the records that waited in backoff go with the first batch the sink answers,
/// not each at its own retry time: keys that failed all through a long outage (retry times
/// 30-60 s away) drain in the cycle that finds the sink back. And the wake comes once per
/// outage: a record the sink keeps failing while it takes the others keeps its backoff, not
/// tried again at every write. Fails without the wake in `flush_cycle` (keys a and b wait out
/// their backoff) and with a wake after every answered batch (c is tried at each write).
#[tokio::test]
async fn the_first_answer_after_an_outage_wakes_the_backlog_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open_store(&dir);
    let mut config = test_config(dir.path());
    config.retry_base = Duration::from_millis(100);
    config.retry_max = Duration::from_secs(60);
    let config = Arc::new(config);
    let sink = Arc::new(ScriptSink::default());
    sink.down.store(true, Ordering::SeqCst);
    let dyn_sink: Arc<dyn Sink> = sink.clone();

    // Early in a long outage: keys a and b, and c, which the sink will refuse for a while
    // (a transient answer) even once it is back. Eleven failed attempts each: 30-60 s of backoff.
    let early = stage(
        &store,
        &[
            ("create", "a", "ok"),
            ("update", "a", "ok"),
            ("create", "b", "ok"),
            ("create", "c", "retry"),
        ],
    );
    for attempt in 1..=11 {
        flush_once(&store, &dyn_sink, &config, usize::MAX)
            .await
            .expect("flush");
        if attempt < 11 {
            store.retry_now(SINK).expect("retry now");
        }
    }
    // Late in the outage: key d, tried once (retry in 50-100 ms).
    let late = stage(&store, &[("create", "d", "ok")]);
    flush_once(&store, &dyn_sink, &config, usize::MAX)
        .await
        .expect("flush");
    let records = records_by_seq(&store);
    assert_eq!(sink_state(&records[&early[3]]).attempts, 11);
    assert_eq!(sink_state(&records[&late[0]]).attempts, 1);

    // The sink is back; the daemon's task finds it when d's retry time comes.
    sink.down.store(false, Ordering::SeqCst);
    let (writes, rx) = tokio::sync::watch::channel(0u64);
    let metrics = Arc::new(estafeta::ingest::Metrics::default());
    let batcher = Batcher::new(store.clone(), config.clone(), metrics, Some(rx)).expect("batcher");
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    batcher.spawn(&[dyn_sink], &tracker, &cancel, Duration::from_secs(1));
    let delivered = |store: &Staging, seqs: &[u64]| {
        let records = records_by_seq(store);
        seqs.iter()
            .all(|seq| sink_state(&records[seq]).state == State::Delivered)
    };
    let all_but_c = [early[0], early[1], early[2], late[0]];
    assert!(
        within(Duration::from_secs(10), || delivered(&store, &all_but_c)).await,
        "keys a and b still wait out their backoff after the sink answered for d: {:?}",
        sink.batches()
    );
    assert_eq!(
        sink_state(&records_by_seq(&store)[&early[3]]).attempts,
        12,
        "c is tried once with the woken backlog"
    );

    // The sink takes new records while c keeps failing: c waits for its own retry time.
    for i in 0..5 {
        let key = format!("e{i}");
        let seqs = stage(&store, &[("create", key.as_str(), "ok")]);
        writes.send_modify(|n| *n += 1);
        assert!(
            within(Duration::from_secs(10), || delivered(&store, &seqs)).await,
            "record {key} not delivered after its write (c tried again alone made the sink look down)"
        );
    }
    assert_eq!(
        sink_state(&records_by_seq(&store)[&early[3]]).attempts,
        12,
        "c was tried again without waiting for its retry time: woken by an answered batch"
    );
    cancel.cancel();
    tracker.close();
    let stopped = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    assert!(stopped.is_ok(), "the batcher stops on cancel");
}

/// A long cycle deletes the segments it has delivered whole as it goes (every few batches,
/// beside the deliveries), so a drain frees the disk before it ends; the rest go at its end.
#[tokio::test]
async fn a_long_cycle_deletes_delivered_segments_as_it_goes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut options = Options::new(dir.path()).with_sinks([SINK]);
    options.min_free_bytes = 0;
    options.segment_max_bytes = 16 * 1024;
    let store = Staging::open(options).expect("store opens").0;
    let mut config = test_config(dir.path());
    config.batch_size = 25;
    let keys: Vec<String> = (0..1000).map(|i| format!("k{i}")).collect();
    let records: Vec<(&str, &str, &str)> =
        keys.iter().map(|k| ("create", k.as_str(), "ok")).collect();
    stage(&store, &records);
    let at_start = segment_files(dir.path());
    assert!(
        at_start >= 8,
        "the test needs many segments, got {at_start}"
    );

    let sink = Arc::new(ScriptSink {
        delay: Some(Duration::from_millis(10)),
        watch: Some(dir.path().to_owned()),
        ..ScriptSink::default()
    });
    let dyn_sink: Arc<dyn Sink> = sink.clone();
    let report = flush_once(&store, &dyn_sink, &config, usize::MAX)
        .await
        .expect("flush");
    assert_eq!(report.delivered, 1000);
    let seen = sink.segments_seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 40, "one count per batch of 25");
    assert_eq!(seen[0], at_start, "nothing is deleted before the first ack");
    assert!(
        seen.iter().any(|&n| n < at_start / 2),
        "the delivered segments were still on disk while the cycle ran ({at_start} at start, per batch: {seen:?})"
    );
    // At the end only the segment still open for writing is left: the writer closes a drained
    // segment once it has been idle a while (DRAINED_IDLE), and these were staged just now.
    assert_eq!(
        segment_files(dir.path()),
        1,
        "the delivered segments are gone at the end"
    );
    assert_eq!(store.status().expect("status").records_pending, 0);
}

#[tokio::test]
async fn limit_caps_one_cycle() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open_store(&dir);
    let mut config = test_config(dir.path());
    config.batch_size = 2;
    stage(
        &store,
        &[
            ("create", "a", "ok"),
            ("create", "b", "ok"),
            ("create", "c", "ok"),
            ("create", "d", "ok"),
            ("create", "e", "ok"),
        ],
    );
    let sink = Arc::new(ScriptSink::default());
    let dyn_sink: Arc<dyn Sink> = sink.clone();
    let report = flush_once(&store, &dyn_sink, &config, 3)
        .await
        .expect("flush");
    assert_eq!(report.delivered, 3);
    let sizes: Vec<usize> = sink.batches().iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![2, 1]);
    assert_eq!(store.status().expect("status").records_pending, 2);
}

#[tokio::test]
async fn dry_run_delivers_nothing_and_keeps_everything_pending() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open_store(&dir);
    let mut config = test_config(dir.path());
    config.dry_run = true;
    let seqs = stage(
        &store,
        &[
            ("create", "a", "ok"),
            ("create", "b", "ok"),
            ("update", "a", "ok"),
        ],
    );
    let sink = Arc::new(ScriptSink::default());
    let dyn_sink: Arc<dyn Sink> = sink.clone();
    for _ in 0..2 {
        let report = flush_once(&store, &dyn_sink, &config, 1000)
            .await
            .expect("flush");
        // One batch, logged and given back: a, b and a's update behind a's create.
        assert_eq!((report.dry_run, report.delivered), (3, 0));
    }
    assert_eq!(sink.calls.load(Ordering::SeqCst), 0);
    assert_eq!(store.status().expect("status").records_pending, 3);
    let records = records_by_seq(&store);
    for seq in seqs {
        let state = sink_state(&records[&seq]);
        assert_eq!(
            (state.state, state.attempts),
            (State::Pending, 0),
            "seq {seq}"
        );
    }
}

/// Waits (in paused time, polling every millisecond) until nothing is pending; `false` after
/// `limit`.
/// Whether `done` holds within `limit`, asked every millisecond.
async fn within(limit: Duration, done: impl Fn() -> bool) -> bool {
    tokio::time::timeout(limit, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .is_ok()
}

async fn drained_within(store: &Staging, limit: Duration) -> bool {
    within(limit, || {
        store.status().expect("status").records_pending == 0
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn batcher_flushes_after_a_write_and_stops_on_cancel() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open_store(&dir);
    let config = Arc::new(test_config(dir.path())); // the tick is once a year
    let state = IngestState::new(store.clone(), config.clone()).expect("state");
    let sink = Arc::new(ScriptSink::default());
    let dyn_sink: Arc<dyn Sink> = sink.clone();
    let batcher = Batcher::new(
        store.clone(),
        config.clone(),
        state.metrics().clone(),
        Some(state.subscribe_writes()),
    )
    .expect("batcher")
    .with_clock(Clock::follows_tokio(Utc::now()));
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    batcher.spawn(&[dyn_sink], &tracker, &cancel, Duration::from_secs(1));

    // Paused time only moves once every task waits: after this, the batcher's first cycle
    // (which found nothing) is over and the task sleeps until its next wake-up, MAX_SLEEP away.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sink.calls.load(Ordering::SeqCst), 0);
    stage(&store, &[("create", "a", "ok"), ("create", "b", "ok")]);
    state.notify_write();
    let written = tokio::time::Instant::now();
    assert!(
        drained_within(&store, MAX_SLEEP / 2).await,
        "the write did not wake the batcher: the records wait for its next wake-up"
    );
    let waited = written.elapsed();
    assert!(
        waited >= WRITE_DEBOUNCE && waited < WRITE_DEBOUNCE + Duration::from_millis(50),
        "delivered {waited:?} after the write; expected just after the {WRITE_DEBOUNCE:?} debounce"
    );
    assert_eq!(sink.batches().concat().len(), 2);

    cancel.cancel();
    tracker.close();
    let stopped = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    assert!(stopped.is_ok(), "the batcher stops on cancel");
}

#[tokio::test(start_paused = true)]
async fn shutdown_outlasting_a_delivery_releases_its_records() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open_store(&dir);
    let config = Arc::new(test_config(dir.path()));
    let seqs = stage(&store, &[("create", "a", "ok"), ("create", "b", "ok")]);
    let sink = Arc::new(ScriptSink {
        delay: Some(Duration::from_secs(3600)),
        ..ScriptSink::default()
    });
    let dyn_sink: Arc<dyn Sink> = sink.clone();
    let (_writes, rx) = tokio::sync::watch::channel(0u64);
    let metrics = Arc::new(estafeta::ingest::Metrics::default());
    let batcher = Batcher::new(store.clone(), config, metrics, Some(rx)).expect("batcher");
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    // FLUSH_ON_WRITE: the task delivers what is pending right away.
    batcher.spawn(&[dyn_sink], &tracker, &cancel, Duration::from_millis(200));
    let started = tokio::time::timeout(Duration::from_secs(10), async {
        while sink.calls.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(started.is_ok(), "delivery started");

    cancel.cancel();
    tracker.close();
    let stopped = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    assert!(stopped.is_ok(), "the batcher stops after the grace period");
    let records = records_by_seq(&store);
    for seq in seqs {
        let state = sink_state(&records[&seq]);
        assert_eq!(
            (state.state, state.attempts),
            (State::Pending, 0),
            "seq {seq}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn batcher_delivers_on_the_cron_tick_when_flush_on_write_is_off() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open_store(&dir);
    let mut config = test_config(dir.path());
    config.flush_on_write = false;
    config.crontab = "*/10 * * * * *".into(); // every ten seconds, with the seconds field
    let config = Arc::new(config);
    let sink = Arc::new(ScriptSink::default());
    let dyn_sink: Arc<dyn Sink> = sink.clone();
    let (writes, rx) = tokio::sync::watch::channel(0u64);
    let metrics = Arc::new(estafeta::ingest::Metrics::default());
    // Half a second past a ten-second mark: the next tick is 9.5 s (of paused time) away.
    let now = Utc::now().timestamp();
    let start =
        DateTime::from_timestamp(now - now.rem_euclid(10), 500_000_000).expect("valid time");
    let batcher = Batcher::new(store.clone(), config, metrics.clone(), Some(rx))
        .expect("batcher")
        .with_clock(Clock::follows_tokio(start));
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    batcher.spawn(&[dyn_sink], &tracker, &cancel, Duration::from_secs(1));

    stage(&store, &[("create", "a", "ok"), ("create", "b", "ok")]);
    writes.send_modify(|n| *n += 1); // ignored: FLUSH_ON_WRITE is off
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(
        sink.calls.load(Ordering::SeqCst),
        0,
        "delivered before the tick: the write started a cycle although FLUSH_ON_WRITE is off"
    );
    assert!(
        drained_within(&store, Duration::from_secs(1)).await,
        "the tick 9.5 s after the start did not deliver the records"
    );
    // The cycle's counters are published when the cycle ends (after its cleanup).
    let counted = tokio::time::timeout(Duration::from_secs(5), async {
        while !metrics
            .render(None, None)
            .contains("estafeta_deliveries_total{sink=\"test\",outcome=\"delivered\"} 2")
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(counted.is_ok(), "{}", metrics.render(None, None));
    cancel.cancel();
    tracker.close();
    let stopped = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    assert!(stopped.is_ok(), "the batcher stops on cancel");
}

/// `max_attempts` (BEMSOFT_RETRIES): with 3, a record the sink never takes is attempted three
/// times, then becomes a dead letter that says why, and the later record of its key stays
/// held back behind it, never attempted; unset, the same record is still pending after more
/// failures (retry forever, as before). Fails without the give-up in `settle`.
#[tokio::test]
async fn max_attempts_gives_up_after_n_failures_and_unset_retries_forever() {
    for max_attempts in [Some(3), None] {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = open_store(&dir);
        let config = Config {
            // No backoff: each cycle finds the failed record due again.
            retry_base: Duration::ZERO,
            retry_max: Duration::ZERO,
            sinks: vec![estafeta::sinks::SinkConfig {
                name: SINK.into(),
                kind: estafeta::sinks::SinkKind::Database(
                    estafeta::sinks::database::DatabaseSinkConfig {
                        url: "sqlite://unused.db".into(),
                        agent_id: "test".into(),
                        apply: None,
                        idempotency_key: None,
                        connections: 1,
                        transaction_pooling: false,
                    },
                ),
                max_attempts,
            }],
            ..Config::for_tests(dir.path())
        };
        let seqs = stage(&store, &[("update", "a", "retry"), ("update", "a", "ok")]);
        let sink = Arc::new(ScriptSink::default());
        let dyn_sink: Arc<dyn Sink> = sink.clone();
        for _ in 0..5 {
            flush_once(&store, &dyn_sink, &config, 1000)
                .await
                .expect("flush");
        }
        let records = records_by_seq(&store);
        let head = sink_state(&records[&seqs[0]]);
        match max_attempts {
            Some(n) => {
                assert_eq!((head.state, head.attempts), (State::Dead, n));
                assert_eq!(sink.attempted(), vec![seqs[0]; n as usize]);
                let dead = store.dead_letters(None).expect("dead letters");
                assert_eq!(dead.len(), 1);
                assert_eq!(dead[0].reason, "gave up after 3 attempts: HTTP 503");
                assert_eq!(dead[0].attempts, 3);
            }
            None => {
                assert_eq!((head.state, head.attempts), (State::Pending, 5));
                assert!(store.dead_letters(None).expect("dead letters").is_empty());
            }
        }
        let behind = sink_state(&records[&seqs[1]]);
        assert_eq!((behind.state, behind.attempts), (State::Pending, 0));
        assert!(!sink.attempted().contains(&seqs[1]), "held back behind it");
    }
}
