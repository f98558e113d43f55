//! Damage tests: stage records into several small segment files, close the store, damage the
//! folder (cut a file, garble bytes, delete or corrupt the index, leave a torn tail), reopen,
//! and check that exactly the expected records survive and the damage is set aside with a reason.

use estafeta_staging::*;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const RECORDS: u64 = 24;
const KEYS: u64 = 4;

thread_local! {
    /// The keys of a test run sealed (encryption at rest), `None` in the plain run.
    static KEY_RING: std::cell::RefCell<Option<Arc<Keyring>>> = const { std::cell::RefCell::new(None) };
}

fn keys() -> Option<Arc<Keyring>> {
    KEY_RING.with(|k| k.borrow().clone())
}

/// Every damage test runs twice: on a plain folder and on a sealed one (issue 23: damage is
/// handled the same with encryption on).
macro_rules! plain_and_sealed {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn plain() {
                super::$name()
            }
            #[test]
            fn sealed() {
                super::KEY_RING.with(|k| {
                    *k.borrow_mut() = Some(std::sync::Arc::new(super::Keyring::generate()))
                });
                super::$name()
            }
        }
    )*};
}

plain_and_sealed!(
    a_newest_segment_cut_mid_record_keeps_every_record_before_the_cut,
    garbled_bytes_in_a_sealed_segment_set_aside_only_that_record,
    a_deleted_index_is_rebuilt_and_dead_letters_stay_dead,
    a_corrupt_index_is_set_aside_and_rebuilt,
    a_torn_tail_is_cut_on_open_and_every_complete_record_survives,
    a_synced_but_unindexed_record_is_recovered_and_its_seq_never_reused,
    reindex_gives_the_same_pending_set_as_before,
);

fn options(root: &Path) -> Options {
    let mut opts = Options::new(root).with_sinks(["db"]);
    opts.min_free_bytes = 0;
    opts.segment_max_bytes = 2 * 1024;
    opts.keys = keys();
    opts
}

fn open(root: &Path) -> (Staging, OpenReport) {
    Staging::open(options(root)).unwrap()
}

fn key_of(i: u64) -> String {
    format!("k{}", i % KEYS)
}

/// Stages `RECORDS` records of ~400 bytes, keys round robin, one at a time; returns their seqs.
fn stage_all(root: &Path) -> BTreeSet<u64> {
    let (store, _) = open(root);
    let mut seqs = BTreeSet::new();
    for i in 0..RECORDS {
        let payload = format!(r#"{{"i":{i},"pad":"{}"}}"#, "x".repeat(200));
        let rec = NewRecord::new("create", "patient", Some(key_of(i)), &payload).unwrap();
        seqs.insert(store.stage(rec).unwrap().seq);
    }
    if keys().is_some() {
        for seg in segments(root) {
            let bytes = fs::read(&seg).unwrap();
            assert!(
                !bytes.windows(20).any(|w| w == [b'x'; 20]),
                "the sealed run wrote a payload in clear in {}",
                seg.display()
            );
        }
    }
    seqs
}

/// One line of a segment file.
#[derive(Debug, Clone)]
struct Line {
    offset: u64,
    len: u64,
    seq: u64,
    key: String,
}

fn lines_of(path: &Path) -> Vec<Line> {
    let bytes = fs::read(path).unwrap();
    let mut out = Vec::new();
    let mut offset = 0u64;
    for line in bytes.split_inclusive(|b| *b == b'\n') {
        let env = testing::decode_line(&line[..line.len() - 1], keys().as_deref()).unwrap();
        out.push(Line {
            offset,
            len: line.len() as u64,
            seq: env.seq,
            key: env.key.unwrap(),
        });
        offset += line.len() as u64;
    }
    out
}

/// Every segment file under `root` (skipping the store's own `_` folders), oldest first.
fn segments(root: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with('_') {
                continue;
            }
            if entry.file_type().unwrap().is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "jsonl") {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, &mut out);
    out.sort_by_key(|p| lines_of(p).first().map(|l| l.seq).unwrap_or(u64::MAX));
    out
}

/// Delivers and acknowledges everything deliverable; returns the seqs in delivery order,
/// checking per-key order on the way.
fn drain(store: &Staging) -> Vec<u64> {
    let mut order = Vec::new();
    let mut last_of_key: BTreeMap<Option<String>, u64> = BTreeMap::new();
    loop {
        let batch = store.next_batch("db", 1000).unwrap();
        if batch.is_empty() {
            break;
        }
        let seqs: Vec<u64> = batch.iter().map(|d| d.envelope.seq).collect();
        for d in &batch {
            let last = last_of_key.insert(d.envelope.key.clone(), d.envelope.seq);
            assert!(
                last.is_none_or(|l| l < d.envelope.seq),
                "record {} of key {:?} delivered after {:?}",
                d.envelope.seq,
                d.envelope.key,
                last
            );
        }
        store.ack("db", &seqs).unwrap();
        order.extend(seqs);
    }
    let distinct: BTreeSet<u64> = order.iter().copied().collect();
    assert_eq!(distinct.len(), order.len(), "a record was delivered twice");
    order
}

fn drained_set(store: &Staging) -> BTreeSet<u64> {
    drain(store).into_iter().collect()
}

/// The files under `<root>/_failed/_damaged/`, parsed.
fn damaged_files(root: &Path) -> Vec<(PathBuf, serde_json::Value)> {
    let dir = root.join("_failed/_damaged");
    let Ok(entries) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<(PathBuf, serde_json::Value)> = entries
        .map(|e| e.unwrap().path())
        .map(|p| {
            let v = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
            (p, v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The seq a `_damaged` file's reason names ("... (record seq N, ...").
fn seq_named_in(reason: &str) -> u64 {
    let after = reason
        .split("record seq ")
        .nth(1)
        .unwrap_or_else(|| panic!("no record seq in {reason:?}"));
    after
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn next_seq_after_reopen(root: &Path) -> u64 {
    let (store, _) = open(root);
    store
        .stage(NewRecord::new("create", "patient", None, "{}").unwrap())
        .unwrap()
        .seq
}

fn a_newest_segment_cut_mid_record_keeps_every_record_before_the_cut() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let all = stage_all(root);
    let segs = segments(root);
    assert!(
        segs.len() >= 3,
        "expected several segment files, got {segs:?}"
    );
    let newest = segs.last().unwrap();
    let lines = lines_of(newest);
    assert!(
        lines.len() >= 3,
        "newest segment holds only {} lines",
        lines.len()
    );
    let cut_at = lines[1].offset + lines[1].len / 2;
    fs::OpenOptions::new()
        .write(true)
        .open(newest)
        .unwrap()
        .set_len(cut_at)
        .unwrap();
    let cut: BTreeSet<u64> = lines[1..].iter().map(|l| l.seq).collect();

    let (store, report) = open(root);
    assert!(!report.index_rebuilt, "{report:?}");
    // Every record from the cut on was indexed before, so each is reported as moved aside.
    assert_eq!(report.moved_aside.len(), cut.len(), "{report:?}");
    for m in &report.moved_aside {
        assert_eq!(&m.from, newest);
        assert!(m.to.starts_with(root.join("_failed/_damaged")), "{m:?}");
        assert!(m.to.exists(), "{m:?}");
        assert!(m.reason.contains("cut"), "{m:?}");
    }
    let damaged = damaged_files(root);
    let named: BTreeSet<u64> = damaged
        .iter()
        .map(|(_, v)| seq_named_in(v["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(named, cut, "the _damaged files name the cut records");
    for (path, v) in &damaged {
        let reason = v["reason"].as_str().unwrap();
        assert!(reason.contains("cut to"), "{}: {reason}", path.display());
    }
    // The half record is cut off the file; the records before it stay byte for byte.
    assert_eq!(fs::metadata(newest).unwrap().len(), lines[1].offset);

    let expected: BTreeSet<u64> = all.difference(&cut).copied().collect();
    assert_eq!(drained_set(&store), expected);
    assert!(store.list(&ListFilter::default()).unwrap().is_empty());
    drop(store);
    // Sequence numbers of lost records are never handed out again.
    assert_eq!(next_seq_after_reopen(root), RECORDS + 1);
}

fn garbled_bytes_in_a_sealed_segment_set_aside_only_that_record() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let all = stage_all(root);
    let segs = segments(root);
    assert!(segs.len() >= 3);
    let oldest = &segs[0];
    let lines = lines_of(oldest);
    let victim = lines[1].clone();
    let later_same_key: Vec<u64> = all
        .iter()
        .copied()
        .filter(|s| *s > victim.seq && key_of(*s - 1) == victim.key)
        .collect();
    assert!(!later_same_key.is_empty());
    let mut bytes = fs::read(oldest).unwrap();
    let mid = (victim.offset + victim.len / 2) as usize;
    for b in &mut bytes[mid..mid + 3] {
        *b = if *b == b'#' { b'%' } else { b'#' };
    }
    fs::write(oldest, &bytes).unwrap();

    let (store, report) = open(root);
    assert!(!report.index_rebuilt, "{report:?}");
    assert!(report.moved_aside.is_empty(), "{report:?}");
    let delivered = drained_set(&store);
    let expected: BTreeSet<u64> = all.iter().copied().filter(|s| *s != victim.seq).collect();
    assert_eq!(delivered, expected);
    for s in &later_same_key {
        assert!(
            delivered.contains(s),
            "later record {s} of the damaged key held back"
        );
    }
    let damaged = damaged_files(root);
    assert_eq!(damaged.len(), 1, "{damaged:?}");
    let reason = damaged[0].1["reason"].as_str().unwrap();
    assert!(reason.contains("checksum mismatch"), "{reason}");
    assert_eq!(seq_named_in(reason), victim.seq);
    assert!(damaged[0].1["bytes"].as_str().unwrap().contains("###"));
    // Set aside, not dead: it is no dead letter and no longer listed as pending.
    assert!(store.dead_letters(None).unwrap().is_empty());
    assert!(store.list(&ListFilter::default()).unwrap().is_empty());
}

/// Stages, leases the first record of every key (the first four: keys alternate), kills the head of key k0, closes, damages the index
/// with `damage`, reopens and checks the rebuild: every record is deliverable again, the dead
/// one is still dead (holding back its key) until requeued.
fn index_rebuild_scenario(damage: impl FnOnce(&Path)) -> (OpenReport, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let all = stage_all(root);
    let dead_seq = {
        let (store, _) = open(root);
        let heads: Vec<u64> = store
            .next_batch("db", 4)
            .unwrap()
            .iter()
            .map(|d| d.envelope.seq)
            .collect();
        assert_eq!(heads, vec![1, 2, 3, 4]);
        store.dead("db", 1, "HTTP 400: cpf inválido").unwrap();
        1
    };
    damage(&root.join("_state"));

    let (store, report) = open(root);
    assert!(report.index_rebuilt, "{report:?}");
    assert_eq!(report.records_recovered, RECORDS, "{report:?}");
    assert!(report.moved_aside.is_empty(), "{report:?}");
    let dead: Vec<(u64, String)> = store
        .dead_letters(None)
        .unwrap()
        .into_iter()
        .map(|d| (d.seq, d.sink))
        .collect();
    assert_eq!(dead, vec![(dead_seq, "db".to_string())]);
    let dead_listed: Vec<u64> = store
        .list(&ListFilter {
            dead_only: true,
            ..ListFilter::default()
        })
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(
        dead_listed,
        vec![dead_seq],
        "the rebuilt index knows the dead letter"
    );
    let sinks = store.status().unwrap().sinks;
    assert_eq!(sinks.iter().map(|s| s.dead).sum::<u64>(), 1);

    // The dead head holds back its own key only; the leases of the old index are gone.
    let held: BTreeSet<u64> = all
        .iter()
        .copied()
        .filter(|s| key_of(*s - 1) == key_of(dead_seq - 1))
        .collect();
    let first = drained_set(&store);
    assert_eq!(first, all.difference(&held).copied().collect());
    store.requeue("db", dead_seq).unwrap();
    let second: Vec<u64> = drain(&store);
    assert_eq!(second, held.iter().copied().collect::<Vec<_>>());
    drop(store);
    assert_eq!(next_seq_after_reopen(root), RECORDS + 1);
    (report, dir)
}

fn index_files(state_dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(state_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("index.sqlite3")
        })
        .collect()
}

fn a_deleted_index_is_rebuilt_and_dead_letters_stay_dead() {
    let (report, _dir) = index_rebuild_scenario(|state| {
        let files = index_files(state);
        assert!(!files.is_empty());
        for f in files {
            fs::remove_file(f).unwrap();
        }
    });
    assert_eq!(report.rebuild_reason.as_deref(), Some("index missing"));
}

fn a_corrupt_index_is_set_aside_and_rebuilt() {
    let (report, dir) = index_rebuild_scenario(|state| {
        let index = state.join("index.sqlite3");
        let mut f = fs::OpenOptions::new().write(true).open(&index).unwrap();
        let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 13) as u8).collect();
        f.write_all(&garbage).unwrap();
        f.sync_all().unwrap();
    });
    let reason = report.rebuild_reason.unwrap();
    assert_ne!(reason, "index missing");
    // The corrupt index is kept for a person to look at, not deleted.
    let aside: Vec<PathBuf> = index_files(&dir.path().join("_state"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("set-aside"))
        .collect();
    assert!(!aside.is_empty(), "the corrupt index was not kept aside");
}

fn a_torn_tail_is_cut_on_open_and_every_complete_record_survives() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let all = stage_all(root);
    let segs = segments(root);
    let newest = segs.last().unwrap();
    let before = fs::read(newest).unwrap();
    let last = lines_of(newest).pop().unwrap();
    let half = &before[last.offset as usize..(last.offset + last.len / 2) as usize];
    fs::OpenOptions::new()
        .append(true)
        .open(newest)
        .unwrap()
        .write_all(half)
        .unwrap();

    let (store, report) = open(root);
    assert_eq!(report.torn_tails_repaired, 1, "{report:?}");
    assert!(!report.index_rebuilt, "{report:?}");
    assert!(report.moved_aside.is_empty(), "{report:?}");
    assert_eq!(report.records_recovered, 0, "{report:?}");
    assert_eq!(
        fs::read(newest).unwrap(),
        before,
        "the file is back to its complete lines"
    );
    assert_eq!(drained_set(&store), all);
}

/// Makes a valid segment line for `seq` from an existing line, as a crashed writer would have
/// left it: written and synced, but never indexed.
fn forge_line(template: &[u8], old_seq: u64, seq: u64) -> Vec<u8> {
    let mut env = testing::decode_line(&template[..template.len() - 1], keys().as_deref()).unwrap();
    assert_eq!(env.seq, old_seq);
    env.seq = seq;
    env.id = format!("{}{:x}", &env.id[..env.id.len() - 4], 0xf000 + seq);
    testing::encode_line(&env, keys().as_deref())
}

fn a_synced_but_unindexed_record_is_recovered_and_its_seq_never_reused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut all = stage_all(root);
    let segs = segments(root);
    let newest = segs.last().unwrap();
    let bytes = fs::read(newest).unwrap();
    let last = lines_of(newest).pop().unwrap();
    let template = &bytes[last.offset as usize..(last.offset + last.len) as usize];
    let forged = forge_line(template, last.seq, RECORDS + 1);
    fs::OpenOptions::new()
        .append(true)
        .open(newest)
        .unwrap()
        .write_all(&forged)
        .unwrap();
    all.insert(RECORDS + 1);

    let (store, report) = open(root);
    assert_eq!(report.records_recovered, 1, "{report:?}");
    assert_eq!(report.torn_tails_repaired, 0, "{report:?}");
    assert!(report.moved_aside.is_empty(), "{report:?}");
    assert_eq!(drained_set(&store), all);
    drop(store);
    assert_eq!(next_seq_after_reopen(root), RECORDS + 2);
}

fn reindex_gives_the_same_pending_set_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let all = stage_all(root);
    let segs = segments(root);
    assert!(segs.len() >= 3);
    // Deliver exactly the records of the two oldest segments, so cleanup deletes them.
    let delivered: BTreeSet<u64> = segs[..2]
        .iter()
        .flat_map(|p| lines_of(p).into_iter().map(|l| l.seq))
        .collect();
    let (before, dead_before) = {
        let (store, _) = open(root);
        let mut acked = BTreeSet::new();
        loop {
            let batch: Vec<u64> = store
                .next_batch("db", 1000)
                .unwrap()
                .iter()
                .map(|d| d.envelope.seq)
                .collect();
            let (mine, rest): (Vec<u64>, Vec<u64>) =
                batch.into_iter().partition(|s| delivered.contains(s));
            store.release("db", &rest).unwrap();
            if mine.is_empty() {
                break;
            }
            store.ack("db", &mine).unwrap();
            acked.extend(mine);
        }
        assert_eq!(acked, delivered);
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let cleaned = store.cleanup().unwrap();
        assert_eq!(cleaned.segments_deleted, 2, "{cleaned:?}");
        // One dead letter and a few leases, which a rebuild turns back into pending.
        let heads: Vec<u64> = store
            .next_batch("db", 3)
            .unwrap()
            .iter()
            .map(|d| d.envelope.seq)
            .collect();
        store.dead("db", heads[0], "HTTP 422").unwrap();
        let list = |dead_only| -> Vec<(u64, Option<String>, String)> {
            store
                .list(&ListFilter {
                    dead_only,
                    ..ListFilter::default()
                })
                .unwrap()
                .into_iter()
                .map(|r| (r.seq, r.key, r.id))
                .collect()
        };
        (list(false), list(true))
    };
    let pending: BTreeSet<u64> = before.iter().map(|r| r.0).collect();
    assert_eq!(pending, all.difference(&delivered).copied().collect());

    let report = Staging::reindex(options(root)).unwrap();
    assert!(report.index_rebuilt, "{report:?}");
    assert!(report.moved_aside.is_empty(), "{report:?}");
    let (store, reopen) = open(root);
    assert!(!reopen.index_rebuilt, "{reopen:?}");
    let after: Vec<(u64, Option<String>, String)> = store
        .list(&ListFilter::default())
        .unwrap()
        .into_iter()
        .map(|r| (r.seq, r.key, r.id))
        .collect();
    assert_eq!(after, before, "pending set changed by reindex");
    let dead_after: Vec<(u64, Option<String>, String)> = store
        .list(&ListFilter {
            dead_only: true,
            ..ListFilter::default()
        })
        .unwrap()
        .into_iter()
        .map(|r| (r.seq, r.key, r.id))
        .collect();
    assert_eq!(dead_after, dead_before);
    drop(store);
    assert_eq!(next_seq_after_reopen(root), RECORDS + 1);
}
