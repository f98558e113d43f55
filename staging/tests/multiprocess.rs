//! Several processes on one staging folder at once: two child processes (this test binary run
//! again as `child_stager`) and the parent stage concurrently while the parent reads `status`
//! and `list`; no sequence number is handed out twice, no acknowledged record is lost or
//! indexed twice, and no reader ever fails with "database is locked".

use estafeta_staging::*;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const DIR_VAR: &str = "ESTAFETA_TEST_CHILD_DIR";
const COUNT_VAR: &str = "ESTAFETA_TEST_CHILD_COUNT";
const NAME_VAR: &str = "ESTAFETA_TEST_CHILD_NAME";
const PER_CHILD: u64 = 300;
const PARENT_RECORDS: u64 = 200;

fn options(root: &Path) -> Options {
    let mut opts = Options::new(root).with_sinks(["db"]);
    opts.min_free_bytes = 0;
    opts.segment_max_bytes = 16 * 1024;
    opts
}

/// Run by the parent as a child process: stages the records it is told to from two threads
/// and prints `ACK <seq> <id>` for each acknowledged one.
#[test]
#[ignore = "run as a child process by several_processes_stage_at_once_without_loss_or_duplicates"]
fn child_stager() {
    let (Ok(dir), Ok(count)) = (std::env::var(DIR_VAR), std::env::var(COUNT_VAR)) else {
        return; // run by hand without a parent: nothing to do
    };
    let count: u64 = count.parse().unwrap();
    let name = std::env::var(NAME_VAR).unwrap_or_else(|_| "child".into());
    let (store, _) = Staging::open(options(Path::new(&dir))).unwrap();
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let store = store.clone();
            let name = name.clone();
            s.spawn(move || {
                for i in (t..count).step_by(2) {
                    let key = format!("{name}-{}", i % 5);
                    let payload = format!(r#"{{"from":"{name}","i":{i}}}"#);
                    let rec = NewRecord::new("create", "patient", Some(key), &payload).unwrap();
                    let r = store.stage(rec).unwrap();
                    println!("ACK {} {}", r.seq, r.id);
                }
            });
        }
    });
}

#[test]
fn several_processes_stage_at_once_without_loss_or_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let (store, _) = Staging::open(options(&root)).unwrap();
    let exe = std::env::current_exe().unwrap();

    let children: Vec<_> = ["alpha", "beta"]
        .iter()
        .map(|name| {
            Command::new(&exe)
                .args(["child_stager", "--exact", "--nocapture", "--ignored"])
                .env(DIR_VAR, &root)
                .env(COUNT_VAR, PER_CHILD.to_string())
                .env(NAME_VAR, name)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();

    // A reader polling status and list the whole time, on the parent's handle, and now and
    // then a fresh handle, as a CLI `ls` or `status` would open one.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let store = store.clone();
        let stop = stop.clone();
        let root = root.clone();
        std::thread::spawn(move || {
            let mut errors = Vec::new();
            let mut reads = 0u64;
            let mut opens = 0u64;
            while !stop.load(Ordering::Acquire) {
                if let Err(e) = store.status() {
                    errors.push(format!("status: {e}"));
                }
                if let Err(e) = store.list(&ListFilter {
                    limit: Some(50),
                    ..ListFilter::default()
                }) {
                    errors.push(format!("list: {e}"));
                }
                reads += 1;
                if reads.is_multiple_of(20) {
                    let mut opts = options(&root);
                    opts.sinks = Vec::new();
                    match Staging::open(opts) {
                        Ok((cli, report)) => {
                            opens += 1;
                            if !report.moved_aside.is_empty() || report.index_rebuilt {
                                errors
                                    .push(format!("a CLI open repaired a live store: {report:?}"));
                            }
                            if let Err(e) = cli.status() {
                                errors.push(format!("CLI status: {e}"));
                            }
                        }
                        Err(e) => errors.push(format!("CLI open: {e}")),
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (errors, reads, opens)
        })
    };

    // The parent stages too, from its own handle.
    let mut acked: BTreeMap<u64, (String, String)> = BTreeMap::new();
    let mut parent_seqs = Vec::new();
    for i in 0..PARENT_RECORDS {
        let payload = format!(r#"{{"from":"parent","i":{i}}}"#);
        let key = format!("parent-{}", i % 5);
        let r = store
            .stage(NewRecord::new("create", "patient", Some(key), &payload).unwrap())
            .unwrap();
        parent_seqs.push(r.seq);
        assert!(
            acked.insert(r.seq, ("parent".into(), r.id)).is_none(),
            "seq {} handed out twice",
            r.seq
        );
    }

    let deadline = Instant::now() + Duration::from_secs(120);
    for (child, name) in children.into_iter().zip(["alpha", "beta"]) {
        let mut child = child;
        let stdout = child.stdout.take().unwrap();
        let mut seqs = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let Some(rest) = line.strip_prefix("ACK ") else {
                continue;
            };
            let (seq, id) = rest.split_once(' ').unwrap();
            let seq: u64 = seq.parse().unwrap();
            seqs.push(seq);
            if let Some(prev) = acked.insert(seq, (name.to_string(), id.to_string())) {
                panic!("seq {seq} acknowledged to {name} and to {}", prev.0);
            }
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(Instant::now() < deadline, "children took too long");
        assert_eq!(seqs.len() as u64, PER_CHILD, "{name} acknowledged too few");
    }
    stop.store(true, Ordering::Release);
    let (errors, reads, opens) = reader.join().unwrap();
    assert!(errors.is_empty(), "reader failures: {errors:#?}");
    assert!(reads > 0 && opens > 0, "the reader never ran");

    let total = PER_CHILD * 2 + PARENT_RECORDS;
    assert_eq!(acked.len() as u64, total, "sequence numbers were reused");
    let mut sorted = parent_seqs.clone();
    sorted.sort();
    assert_eq!(parent_seqs, sorted, "one handle's seqs go up");

    // Every acknowledged record is in the index exactly once, with the id it was given.
    let check = |store: &Staging| {
        let listed = store.list(&ListFilter::default()).unwrap();
        let ids: BTreeMap<u64, String> = listed.iter().map(|r| (r.seq, r.id.clone())).collect();
        assert_eq!(ids.len(), listed.len(), "a record listed twice");
        let want: BTreeMap<u64, String> =
            acked.iter().map(|(s, (_, id))| (*s, id.clone())).collect();
        assert_eq!(ids, want);
    };
    check(&store);
    drop(store);
    let (store, report) = Staging::open(options(&root)).unwrap();
    assert!(!report.index_rebuilt, "{report:?}");
    assert!(report.moved_aside.is_empty(), "{report:?}");
    assert_eq!(report.torn_tails_repaired, 0, "{report:?}");
    check(&store);

    // And each is delivered exactly once, in per-key order.
    let mut delivered = BTreeSet::new();
    let mut last_of_key: BTreeMap<Option<String>, u64> = BTreeMap::new();
    loop {
        let batch = store.next_batch("db", 500).unwrap();
        if batch.is_empty() {
            break;
        }
        let seqs: Vec<u64> = batch.iter().map(|d| d.envelope.seq).collect();
        for d in &batch {
            assert!(delivered.insert(d.envelope.seq), "delivered twice");
            let prev = last_of_key.insert(d.envelope.key.clone(), d.envelope.seq);
            assert!(prev.is_none_or(|p| p < d.envelope.seq));
        }
        store.ack("db", &seqs).unwrap();
    }
    assert_eq!(delivered, acked.keys().copied().collect());
    // The reopened store numbers on after every process's records.
    let next = store
        .stage(NewRecord::new("create", "patient", None, "{}").unwrap())
        .unwrap()
        .seq;
    assert_eq!(next, *acked.keys().last().unwrap() + 1);
}

const RUN_MS_VAR: &str = "ESTAFETA_TEST_DAEMON_MS";

/// Run by the parent as a child process: a busy daemon that stages to many entities,
/// delivers everything and runs cleanup in a loop, so segment files and day folders are
/// deleted all the time. Prints `ROUNDS <n>` at the end.
#[test]
#[ignore = "run as a child process by a_cli_opening_the_store_while_the_daemon_cleans_up_never_fails"]
fn child_daemon() {
    let (Ok(dir), Ok(ms)) = (std::env::var(DIR_VAR), std::env::var(RUN_MS_VAR)) else {
        return;
    };
    let until = Instant::now() + Duration::from_millis(ms.parse().unwrap());
    let mut opts = options(Path::new(&dir));
    opts.segment_max_bytes = 256; // every write starts a new file; the old one is sealed
    let (store, _) = Staging::open(opts).unwrap();
    let mut rounds = 0u64;
    while Instant::now() < until {
        // Each entity comes back only after its segment has been idle long enough to be sealed,
        // deleted and its folders pruned.
        let entity = format!("e{}", rounds % 64);
        let recs = (0..4)
            .map(|i| NewRecord::new("create", &entity, Some(format!("k{i}")), "{}").unwrap())
            .collect();
        store.stage_batch(recs, None).unwrap();
        let mut first = rounds.is_multiple_of(4);
        loop {
            let batch = store.next_batch("db", 1000).unwrap();
            if batch.is_empty() {
                break;
            }
            let seqs: Vec<u64> = batch.iter().map(|d| d.envelope.seq).collect();
            if first {
                // A dead letter written and requeued: files and folders come and go in _failed.
                store.dead("db", seqs[0], "HTTP 400").unwrap();
                store.requeue("db", seqs[0]).unwrap();
                first = false;
            }
            store.ack("db", &seqs).unwrap();
        }
        store.cleanup().unwrap();
        rounds += 1;
    }
    println!("ROUNDS {rounds}");
}

#[test]
fn a_cli_opening_the_store_while_the_daemon_cleans_up_never_fails() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    drop(Staging::open(options(&root)).unwrap());
    let mut daemon = Command::new(std::env::current_exe().unwrap())
        .args(["child_daemon", "--exact", "--nocapture", "--ignored"])
        .env(DIR_VAR, &root)
        .env(RUN_MS_VAR, "4000")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut errors = Vec::new();
    let mut opens = 0u64;
    while daemon.try_wait().unwrap().is_none() {
        let mut opts = options(&root);
        opts.sinks = Vec::new();
        match Staging::open(opts) {
            Ok((cli, _)) => {
                opens += 1;
                if let Err(e) = cli.status() {
                    errors.push(format!("status: {e}"));
                }
                if let Err(e) = cli.list(&ListFilter::default()) {
                    errors.push(format!("list: {e}"));
                }
                if let Err(e) = cli.dead_letters(None) {
                    errors.push(format!("dead_letters: {e}"));
                }
            }
            Err(e) => errors.push(format!("open: {e}")),
        }
    }
    let out = daemon.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "daemon failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ROUNDS "), "{stdout}");
    eprintln!(
        "{}",
        stdout.lines().find(|l| l.starts_with("ROUNDS")).unwrap()
    );
    assert!(opens > 0);
    errors.dedup();
    assert!(
        errors.is_empty(),
        "{} of {} CLI opens failed while the daemon cleaned up: {errors:#?}",
        errors.len(),
        opens + errors.len() as u64
    );
}
