//! A client's `Idempotency-Key` survives whatever its records survive: a crash between the
//! segment fsync and the index commit, a lost index, `reindex`. A retry then gets the first
//! answer and nothing is staged twice; a request a crash cut in part is staged whole, once.

use estafeta_staging::*;
use std::path::Path;
use std::time::Duration;

fn opts(dir: &Path) -> Options {
    Options::new(dir).with_sinks(["db"])
}

fn open(dir: &Path) -> (Staging, OpenReport) {
    Staging::open(opts(dir)).unwrap()
}

fn request() -> Vec<NewRecord> {
    vec![
        NewRecord::new("create", "patient", Some("42".into()), r#"{"n":1}"#).unwrap(),
        NewRecord::new("create", "patient", Some("42".into()), r#"{"n":2}"#).unwrap(),
        NewRecord::new("create", "exam", Some("7".into()), r#"{"n":3}"#).unwrap(),
    ]
}

fn key() -> Option<ClientKey> {
    Some(ClientKey {
        key: "req-1".into(),
        fingerprint: "body-digest".into(),
    })
}

fn index(dir: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(dir.join("_state/index.sqlite3")).unwrap()
}

fn pending(store: &Staging) -> u64 {
    store.status().unwrap().records_pending
}

#[test]
fn a_retry_after_the_index_was_lost_gets_the_first_answer() {
    let dir = tempfile::tempdir().unwrap();
    let first = {
        let (store, _) = open(dir.path());
        store.stage_batch(request(), key()).unwrap()
    };
    assert!(matches!(first, Staged::New(_)));
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(dir.path().join(format!("_state/index.sqlite3{suffix}")));
    }
    let (store, report) = open(dir.path());
    assert!(report.index_rebuilt);
    let again = store.stage_batch(request(), key()).unwrap();
    assert_eq!(again, Staged::Replayed(first.receipts().to_vec()));
    assert_eq!(pending(&store), 3);
    // Another body under the same key is still a conflict, not a new request.
    let mut other = request();
    other.pop();
    let conflict = store.stage_batch(
        other,
        Some(ClientKey {
            key: "req-1".into(),
            fingerprint: "another body".into(),
        }),
    );
    assert!(
        matches!(conflict, Err(StageError::Conflict(_))),
        "{conflict:?}"
    );
}

#[test]
fn a_retry_after_a_crash_between_the_segment_fsync_and_the_index_commit_gets_the_first_answer() {
    let dir = tempfile::tempdir().unwrap();
    let first = {
        let (store, _) = open(dir.path());
        store.stage_batch(request(), key()).unwrap()
    };
    // The state a crash leaves when the lines were fsync'd but the index transaction that
    // numbered them (records, deliveries, the client key) never reached the disk.
    {
        let db = index(dir.path());
        db.execute_batch(
            "DELETE FROM deliveries; DELETE FROM records; DELETE FROM client_keys;
             UPDATE segments SET indexed_len = 0;",
        )
        .unwrap();
    }
    let (store, report) = open(dir.path());
    assert!(!report.index_rebuilt);
    assert_eq!(report.records_recovered, 3);
    let again = store.stage_batch(request(), key()).unwrap();
    assert_eq!(again, Staged::Replayed(first.receipts().to_vec()));
    assert_eq!(pending(&store), 3);
}

#[test]
fn reindex_brings_keys_back_with_their_lifetime_counted_from_staged_at() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = open(dir.path());
        store.stage_batch(request(), key()).unwrap();
    }
    let created_at = |dir: &Path| -> i64 {
        index(dir)
            .query_row(
                "SELECT created_at FROM client_keys WHERE key = 'req-1'",
                [],
                |r| r.get(0),
            )
            .unwrap()
    };
    let before = created_at(dir.path());
    std::thread::sleep(Duration::from_millis(1100));
    let report = Staging::reindex(opts(dir.path())).unwrap();
    assert!(report.index_rebuilt);
    assert_eq!(
        created_at(dir.path()),
        before,
        "a rebuild must not extend the key's life"
    );
}

#[test]
fn a_request_a_crash_cut_in_part_is_set_aside_and_its_retry_stages_it_whole_once() {
    let dir = tempfile::tempdir().unwrap();
    let first = {
        let (store, _) = open(dir.path());
        store.stage_batch(request(), key()).unwrap()
    };
    // The crash came before the request was answered: the exam segment's line (the third
    // record) never reached the disk, and neither did the index.
    let exam = &first.receipts()[2].path;
    std::fs::OpenOptions::new()
        .write(true)
        .open(exam)
        .unwrap()
        .set_len(0)
        .unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(dir.path().join(format!("_state/index.sqlite3{suffix}")));
    }
    let (store, report) = open(dir.path());
    let cut: Vec<_> = report
        .moved_aside
        .iter()
        .filter(|m| m.reason.contains("cut before it was answered"))
        .collect();
    assert_eq!(cut.len(), 2, "{:?}", report.moved_aside);
    assert_eq!(
        pending(&store),
        0,
        "a part of an unanswered request must not be delivered"
    );
    let retry = store.stage_batch(request(), key()).unwrap();
    let Staged::New(receipts) = &retry else {
        panic!("the retry must stage the request: {retry:?}");
    };
    assert_eq!(receipts.len(), 3);
    assert!(
        receipts[0].seq > first.receipts()[2].seq,
        "sequence numbers are never reused"
    );
    assert_eq!(pending(&store), 3);
    // And the retry's own answer is remembered.
    assert_eq!(
        store.stage_batch(request(), key()).unwrap(),
        Staged::Replayed(receipts.clone())
    );
}
