//! The writer under concurrent stagers: a disk or index failure strikes while many requests
//! wait in one group commit, and an `Idempotency-Key` comes back while its first request is
//! still being written. Whatever happens, the store after a restart holds exactly the records
//! whose senders were told they were staged, each readable, and one key stages one record.

use estafeta_staging::*;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Barrier, Mutex};

const THREADS: usize = 8;

fn open(dir: &Path) -> Staging {
    Staging::open(Options::new(dir).with_sinks(["db"]))
        .unwrap()
        .0
}

fn rec(key: &str, payload: &str) -> NewRecord {
    NewRecord::new("create", "patient", Some(key.to_owned()), payload).unwrap()
}

/// Stagers write as fast as they can; after `before_failure` acknowledgements the next disk
/// flush (or index commit) fails. Returns the acknowledged ids and the count of refused writes.
fn stage_until_poisoned(
    dir: &Path,
    inject: fn(&Staging),
    before_failure: usize,
) -> BTreeSet<String> {
    let store = open(dir);
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let injected = Arc::new(std::sync::Once::new());
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (store, acked, injected) = (store.clone(), acked.clone(), injected.clone());
            std::thread::spawn(move || {
                for n in 0.. {
                    // Batches of 1 to 3 records, so groups mix request sizes.
                    let records = (0..1 + n % 3)
                        .map(|i| {
                            rec(
                                &format!("k{}", (t + n + i) % 5),
                                &format!(r#"{{"t":{t},"n":{n},"i":{i}}}"#),
                            )
                        })
                        .collect();
                    match store.stage_batch(records, None) {
                        Ok(staged) => {
                            let mut acked = acked.lock().unwrap();
                            acked.extend(staged.receipts().iter().map(|r| r.id.clone()));
                            if acked.len() >= before_failure {
                                injected.call_once(|| inject(&store));
                            }
                        }
                        Err(StageError::Poisoned(_)) => return,
                        Err(other) => panic!("unexpected error: {other}"),
                    }
                    assert!(n < 100_000, "the injected failure never happened");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= before_failure);
    acked
}

fn after_restart(dir: &Path) -> BTreeSet<String> {
    let store = open(dir);
    let listed = store.list(&ListFilter::default()).unwrap();
    // Sequence numbers stay unique and the store takes writes again.
    let seqs: BTreeSet<u64> = listed.iter().map(|r| r.seq).collect();
    assert_eq!(seqs.len(), listed.len());
    // Every record the index lists is readable from its segment file.
    for record in &listed {
        let (envelope, _) = store
            .get(&record.id)
            .unwrap_or_else(|e| panic!("record {} unreadable: {e}", record.id));
        assert_eq!(envelope.id, record.id);
    }
    store.stage(rec("k0", "{}")).unwrap();
    listed.into_iter().map(|r| r.id).collect()
}

#[test]
fn a_failed_fsync_under_concurrent_stagers_keeps_exactly_the_acknowledged_records() {
    for round in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let acked =
            stage_until_poisoned(dir.path(), Staging::inject_sync_failure, 200 + round * 150);
        assert_eq!(after_restart(dir.path()), acked, "round {round}");
    }
}

#[test]
fn a_failed_index_commit_under_concurrent_stagers_keeps_exactly_the_acknowledged_records() {
    for round in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let acked =
            stage_until_poisoned(dir.path(), Staging::inject_index_failure, 200 + round * 150);
        assert_eq!(after_restart(dir.path()), acked, "round {round}");
    }
}

#[test]
fn one_idempotency_key_sent_at_once_by_many_stages_one_record() {
    const KEYS: usize = 60;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let barrier = Arc::new(Barrier::new(THREADS));
    let answers = Arc::new(Mutex::new(HashMap::<usize, Vec<Staged>>::new()));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (store, barrier, answers) = (store.clone(), barrier.clone(), answers.clone());
            std::thread::spawn(move || {
                for k in 0..KEYS {
                    // Unrelated writes keep groups in flight while the key arrives.
                    if t % 2 == 1 {
                        store
                            .stage(rec("other", &format!(r#"{{"t":{t},"k":{k}}}"#)))
                            .unwrap();
                    }
                    barrier.wait();
                    let staged = store
                        .stage_batch(
                            vec![rec(&format!("p{k}"), r#"{"same":"body"}"#)],
                            Some(ClientKey {
                                key: format!("request-{k}"),
                                fingerprint: "fp".into(),
                            }),
                        )
                        .unwrap();
                    answers.lock().unwrap().entry(k).or_default().push(staged);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let answers = answers.lock().unwrap();
    for k in 0..KEYS {
        let all = &answers[&k];
        assert_eq!(all.len(), THREADS);
        let new: Vec<_> = all.iter().filter(|s| matches!(s, Staged::New(_))).collect();
        assert_eq!(new.len(), 1, "key {k}: exactly one request stages: {all:?}");
        for staged in all {
            assert_eq!(
                staged.receipts(),
                new[0].receipts(),
                "key {k}: every answer is the first"
            );
        }
    }
    drop(answers);
    let listed = store.list(&ListFilter::default()).unwrap();
    let keyed = listed
        .iter()
        .filter(|r| r.key.as_deref().is_some_and(|k| k.starts_with('p')));
    assert_eq!(keyed.count(), KEYS);
}
