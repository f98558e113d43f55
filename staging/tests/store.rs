//! Behaviour of the store through its public API: staging, per-key order, leases, dead letters,
//! cleanup, reopening, limits and permissions.

use estafeta_staging::*;
use std::path::Path;
use std::time::Duration;

fn open(dir: &Path) -> Staging {
    Staging::open(Options::new(dir).with_sinks(["db"]))
        .unwrap()
        .0
}

fn rec(action: &str, entity: &str, key: Option<&str>, payload: &str) -> NewRecord {
    NewRecord::new(action, entity, key.map(String::from), payload).unwrap()
}

fn seqs(batch: &[Delivery]) -> Vec<u64> {
    batch.iter().map(|d| d.envelope.seq).collect()
}

#[test]
fn staged_record_is_readable_json_under_action_entity_date() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let r = store
        .stage(rec(
            "create",
            "patient",
            Some("42"),
            "{ \"nome\": \"Ana Lúcia\", \"peso\": 61.50 }",
        ))
        .unwrap();
    assert_eq!(r.seq, 1);
    let rel = r
        .path
        .strip_prefix(dir.path())
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let parts: Vec<&str> = rel.split('/').collect();
    assert_eq!(parts[0..2], ["create", "patient"]);
    assert_eq!(parts[2].len(), 4);
    assert!(parts[5].ends_with(".jsonl"), "{rel}");
    let text = std::fs::read_to_string(&r.path).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(line["id"], r.id.as_str());
    assert_eq!(line["seq"], 1);
    assert_eq!(line["key"], "42");
    assert_eq!(line["v"], 1);
    assert!(line["staged_at"].as_str().unwrap().ends_with('Z'));
    assert!(
        text.contains(r#""payload":{"nome":"Ana Lúcia","peso":61.50}"#),
        "{text}"
    );
}

#[test]
fn per_key_order_holds_back_only_the_same_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let a1 = store
        .stage(rec("create", "patient", Some("a"), "{}"))
        .unwrap()
        .seq;
    let a2 = store
        .stage(rec("delete", "patient", Some("a"), "{}"))
        .unwrap()
        .seq;
    let b1 = store
        .stage(rec("update", "patient", Some("b"), "{}"))
        .unwrap()
        .seq;
    let a3 = store
        .stage(rec("create", "patient", Some("a"), "{}"))
        .unwrap()
        .seq;

    // A batch carries runs: every record of key a, in order, with b's between them.
    let batch = store.next_batch("db", 10).unwrap();
    assert_eq!(seqs(&batch), vec![a1, a2, b1, a3]);
    // Leased: a second deliverer gets nothing.
    assert!(store.next_batch("db", 10).unwrap().is_empty());
    // The sink delivered b1; a1 failed, so a2 and a3 were not attempted and go back untouched.
    store
        .settle(
            "db",
            Settlement {
                delivered: vec![b1],
                retries: vec![Retry {
                    seq: a1,
                    error: "HTTP 503".to_owned(),
                    at: chrono::Utc::now() + chrono::Duration::hours(1),
                }],
                give_back: vec![a2, a3],
                ..Settlement::default()
            },
        )
        .unwrap();
    // a1 in backoff holds back a2 and a3, nothing else is pending.
    assert!(store.next_batch("db", 10).unwrap().is_empty());
    let attempts = |seq: u64| store.get(&seq.to_string()).unwrap().1.sinks[0].attempts;
    assert_eq!((attempts(a1), attempts(a2), attempts(a3)), (1, 0, 0));
    store
        .fail(
            "db",
            a1,
            "503",
            chrono::Utc::now() - chrono::Duration::seconds(1),
        )
        .unwrap();
    // The limit cuts a run, never reorders it.
    assert_eq!(seqs(&store.next_batch("db", 2).unwrap()), vec![a1, a2]);
    assert!(
        store.next_batch("db", 10).unwrap().is_empty(),
        "a3 waits behind a2 in flight"
    );
    store.ack("db", &[a1]).unwrap();
    store.release("db", &[a2]).unwrap();
    assert_eq!(seqs(&store.next_batch("db", 10).unwrap()), vec![a2, a3]);
}

#[test]
fn keyless_records_are_ordered_per_entity() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let p1 = store.stage(rec("create", "log", None, "{}")).unwrap().seq;
    let p2 = store.stage(rec("create", "log", None, "{}")).unwrap().seq;
    let q1 = store.stage(rec("create", "exam", None, "{}")).unwrap().seq;
    let p3 = store.stage(rec("create", "log", None, "{}")).unwrap().seq;
    // One run per entity: log's three in order, exam's one.
    assert_eq!(
        seqs(&store.next_batch("db", 10).unwrap()),
        vec![p1, p2, q1, p3]
    );
    store.release("db", &[p1, p2, q1, p3]).unwrap();
    // A failure of log's first holds back log's others, not exam's.
    assert_eq!(seqs(&store.next_batch("db", 1).unwrap()), vec![p1]);
    store
        .fail(
            "db",
            p1,
            "503",
            chrono::Utc::now() + chrono::Duration::hours(1),
        )
        .unwrap();
    assert_eq!(seqs(&store.next_batch("db", 10).unwrap()), vec![q1]);
}

#[test]
fn dead_letter_is_readable_and_requeue_keeps_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let a1 = store
        .stage(rec("create", "patient", Some("a"), r#"{"n":1}"#))
        .unwrap()
        .seq;
    let a2 = store
        .stage(rec("update", "patient", Some("a"), r#"{"n":2}"#))
        .unwrap()
        .seq;
    let b1 = store
        .stage(rec("create", "patient", Some("b"), r#"{"n":3}"#))
        .unwrap()
        .seq;
    assert_eq!(seqs(&store.next_batch("db", 10).unwrap()), vec![a1, a2, b1]);
    let path = store.dead("db", a1, "HTTP 400: cpf inválido").unwrap();
    store.release("db", &[a2]).unwrap();
    store.ack("db", &[b1]).unwrap();
    assert!(path.starts_with(dir.path().join("_failed/create/patient")));
    let letter: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(letter["reason"], "HTTP 400: cpf inválido");
    assert_eq!(letter["sink"], "db");
    assert_eq!(letter["record"]["seq"], a1);
    assert_eq!(letter["record"]["payload"]["n"], 1);
    // The dead head holds back a2.
    assert!(store.next_batch("db", 10).unwrap().is_empty());
    let dead = store.dead_letters(None).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].seq, a1);
    store.requeue("db", a1).unwrap();
    assert!(!path.exists());
    assert_eq!(seqs(&store.next_batch("db", 10).unwrap()), vec![a1, a2]);
}

/// `retry --send`'s requeue: the dead record comes back leased to the caller, never pending, so
/// no other deliverer's lease can take it or the later records of its key while it travels; a
/// second requeue of it is refused, and so is the requeue of a dead record that is not the
/// first its key owes. Fails if `requeue_leased` left the record pending (the lease below would
/// take it) or did not check the head.
#[test]
fn a_dead_letter_requeued_leased_is_held_by_its_sender_and_keeps_key_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let a1 = store
        .stage(rec("create", "patient", Some("a"), r#"{"n":1}"#))
        .unwrap()
        .seq;
    let a2 = store
        .stage(rec("update", "patient", Some("a"), r#"{"n":2}"#))
        .unwrap()
        .seq;
    let b1 = store
        .stage(rec("create", "patient", Some("b"), r#"{"n":3}"#))
        .unwrap()
        .seq;
    let b2 = store
        .stage(rec("update", "patient", Some("b"), r#"{"n":4}"#))
        .unwrap()
        .seq;
    assert_eq!(
        seqs(&store.next_batch("db", 10).unwrap()),
        vec![a1, a2, b1, b2]
    );
    let letter = store.dead("db", a1, "HTTP 422").unwrap();
    store.release("db", &[a2, b1]).unwrap();
    // b2 is dead although b1 is still owed (only a tool can do that): not a head.
    store.dead("db", b2, "HTTP 422").unwrap();

    let delivery = store.requeue_leased("db", a1).unwrap();
    assert_eq!(delivery.envelope.seq, a1);
    assert_eq!(delivery.attempts, 0);
    assert_eq!(delivery.envelope.payload.get(), r#"{"n":1}"#);
    assert!(!letter.exists(), "the dead letter is removed");
    // Another deliverer's lease: neither a1 (leased) nor a2 (behind it) can be taken.
    assert_eq!(seqs(&store.next_batch("db", 10).unwrap()), vec![b1]);
    let again = store.requeue_leased("db", a1).unwrap_err();
    assert!(matches!(again, StoreError::NotFound(_)), "{again}");
    let not_head = store.requeue_leased("db", b2).unwrap_err();
    assert!(
        matches!(not_head, StoreError::NotHead { earlier, .. } if earlier == b1),
        "{not_head}"
    );
    assert_eq!(store.dead_letters(None).unwrap().len(), 1, "b2 stays dead");
    // Settled by its sender like any leased record: then a2 may go.
    store.ack("db", &[a1]).unwrap();
    assert_eq!(seqs(&store.next_batch("db", 10).unwrap()), vec![a2]);
}

/// Older versions kept an index of deliveries by order key, which cost a b-tree page per
/// record staged and acked, one by seq alone (an entry per record staged and per record
/// delivered), and indexes of records on (segment_id, open_sinks) and
/// (open_sinks, seq), which moved two entries each per ack. Opening their store drops them and
/// makes the partial index of owed records; the store still holds keys back, and delivered
/// records leave the owed count and their segment is cleaned up.
#[test]
fn the_indexes_of_older_versions_are_replaced_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let index = dir.path().join("_state").join("index.sqlite3");
    let list = |conn: &rusqlite::Connection| -> Vec<String> {
        conn.prepare(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL ORDER BY name",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
    };
    {
        let store = open(dir.path());
        store
            .stage(rec("create", "patient", Some("a"), "{}"))
            .unwrap();
        store
            .stage(rec("update", "patient", Some("a"), "{}"))
            .unwrap();
    }
    let conn = rusqlite::Connection::open(&index).unwrap();
    conn.execute_batch(
        "CREATE INDEX deliveries_by_key ON deliveries(sink, entity, okey, seq);
         CREATE INDEX IF NOT EXISTS deliveries_by_seq ON deliveries(seq);
         DROP INDEX records_owed;
         DROP INDEX records_of_segment;
         CREATE INDEX records_by_segment ON records(segment_id, open_sinks);
         CREATE INDEX records_open ON records(open_sinks, seq);",
    )
    .unwrap();
    drop(conn);
    let store = open(dir.path());
    let conn = rusqlite::Connection::open(&index).unwrap();
    assert_eq!(
        list(&conn),
        ["records_of_segment", "records_owed"],
        "the indexes after opening an older version's store"
    );
    let plan: String = conn
        .query_row(
            "EXPLAIN QUERY PLAN SELECT COUNT(*) FROM records WHERE segment_id = 1 AND open_sinks > 0",
            [],
            |r| r.get(3),
        )
        .unwrap();
    assert!(plan.contains("records_owed"), "plan: {plan}");
    assert_eq!(seqs(&store.next_batch("db", 10).unwrap()), vec![1, 2]);
    store.ack("db", &[1, 2]).unwrap();
    let owed: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM records WHERE open_sinks > 0",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(owed, 0, "acked records are still counted as owed");
}

/// Older versions leased a batch by marking each delivery row in flight; this one keeps one
/// `leases` row per batch. Opening a store an older version left with rows in flight: those of
/// a process that is gone are given back at once (not after their lease time), those of a live
/// one hold their key back until their time runs out; status and record details say which.
#[test]
fn the_in_flight_rows_of_an_older_version_are_still_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let index = dir.path().join("_state").join("index.sqlite3");
    {
        let store = open(dir.path());
        for key in ["gone", "gone", "alive", "alive"] {
            store
                .stage(rec("update", "patient", Some(key), "{}"))
                .unwrap();
        }
    }
    // A live owner is one whose owner file is locked: this test holds one.
    let owners = dir.path().join("_state").join("owners");
    let alive = std::fs::File::create(owners.join("1-alive.lock")).unwrap();
    alive.try_lock().unwrap();
    let far = 4_102_444_800_000i64; // 2100-01-01, in unix ms
    let conn = rusqlite::Connection::open(&index).unwrap();
    conn.execute(
        "UPDATE deliveries SET state = 'in_flight', lease_until = ?1, lease_owner = '2-gone' WHERE seq = 1",
        [far],
    )
    .unwrap();
    conn.execute(
        "UPDATE deliveries SET state = 'in_flight', lease_until = ?1, lease_owner = '1-alive' WHERE seq = 3",
        [far],
    )
    .unwrap();
    drop(conn);

    let store = open(dir.path());
    let status = store.status().unwrap();
    let db = status.sinks.iter().find(|s| s.sink == "db").unwrap();
    assert_eq!((db.pending, db.in_flight), (3, 1), "{db:?}");
    assert_eq!(store.get("3").unwrap().1.state, State::InFlight);
    assert_eq!(store.get("1").unwrap().1.state, State::Pending);
    // The dead owner's record goes first in its key; the live owner's key waits.
    assert_eq!(seqs(&store.next_batch("db", 10).unwrap()), vec![1, 2]);
    store.ack("db", &[1, 2]).unwrap();
    assert!(store.next_batch("db", 10).unwrap().is_empty());
}

/// The writer's commits are copied from the index's WAL into the index file by a thread of its
/// own, soon after they happen, not inside a later commit once the WAL holds 1,000 pages. Seen
/// from outside: a copy of the index file alone (no WAL) holds the records within seconds,
/// although fifty small records are far below SQLite's own threshold. Fails without
/// wal_checkpointer.rs (the copy holds no record).
#[test]
fn the_writers_commits_are_checkpointed_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let index = dir.path().join("_state").join("index.sqlite3");
    let store = open(dir.path());
    for group in 0..5 {
        let batch = (0..10)
            .map(|i| rec("create", "patient", Some(&format!("{group}-{i}")), "{}"))
            .collect();
        store.stage_batch(batch, None).unwrap();
    }
    let copy = dir.path().join("index-file-alone.sqlite3");
    let in_file_alone = || -> Option<i64> {
        // The copy may catch a checkpoint half-written: that read is not counted.
        std::fs::copy(&index, &copy).ok()?;
        let conn = rusqlite::Connection::open(&copy).ok()?;
        conn.query_row("SELECT COUNT(*) FROM records", [], |r| r.get(0))
            .ok()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut seen = None;
    while std::time::Instant::now() < deadline {
        seen = in_file_alone();
        if seen == Some(50) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        seen,
        Some(50),
        "records in the index file without its WAL, 10 s after they were staged"
    );
}

/// A crash between a requeue's commit and the removal of its letter (or between a letter and
/// the commit of its death) leaves a letter whose record is pending again. Reopening removes
/// it, so the record is not listed as refused after it was delivered, and a letter still dead
/// in the index stays. Fails without `dead::remove_stale_letters` at open.
#[test]
fn a_dead_letter_a_crash_left_behind_its_requeue_is_removed_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let a = store
        .stage(rec("create", "patient", Some("a"), r#"{"n":1}"#))
        .unwrap()
        .seq;
    let b = store
        .stage(rec("create", "patient", Some("b"), r#"{"n":2}"#))
        .unwrap()
        .seq;
    assert_eq!(seqs(&store.next_batch("db", 10).unwrap()), vec![a, b]);
    let stale = store.dead("db", a, "HTTP 422: exame sem código").unwrap();
    let kept = store.dead("db", b, "HTTP 422: cpf inválido").unwrap();
    // The requeue committed, then the crash came before its letter was gone: the same bytes
    // are back in place, the index says pending, and the record is then delivered.
    let letter = std::fs::read(&stale).unwrap();
    store.requeue("db", a).unwrap();
    std::fs::write(&stale, &letter).unwrap();
    assert_eq!(seqs(&store.next_batch("db", 10).unwrap()), vec![a]);
    store.ack("db", &[a]).unwrap();
    assert!(stale.exists(), "the stale letter is back in place");
    assert_eq!(
        store.dead_letters(None).unwrap().len(),
        1,
        "a letter whose death the index does not hold is not listed"
    );
    drop(store);

    let (store, report) = Staging::open(Options::new(dir.path()).with_sinks(["db"])).unwrap();
    assert_eq!(report.stale_dead_letters_removed, 1);
    assert!(!stale.exists(), "the stale letter is still there");
    assert!(
        kept.exists(),
        "a letter the index holds as dead was removed"
    );
    let listed: Vec<u64> = store
        .dead_letters(None)
        .unwrap()
        .iter()
        .map(|d| d.seq)
        .collect();
    assert_eq!(listed, vec![b]);
    store.requeue("db", b).unwrap();
    assert_eq!(seqs(&store.next_batch("db", 10).unwrap()), vec![b]);
}

#[test]
fn records_leave_the_disk_only_when_every_sink_has_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = Staging::open(Options::new(dir.path()).with_sinks(["api", "db"]))
        .unwrap()
        .0;
    let r = store
        .stage(rec("create", "patient", Some("1"), "{}"))
        .unwrap();
    assert_eq!(seqs(&store.next_batch("api", 10).unwrap()), vec![r.seq]);
    store.ack("api", &[r.seq]).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    store.cleanup().unwrap();
    assert!(r.path.exists(), "deleted before the db sink had it");
    assert_eq!(seqs(&store.next_batch("db", 10).unwrap()), vec![r.seq]);
    store.ack("db", &[r.seq]).unwrap();
    let report = store.cleanup().unwrap();
    assert_eq!(report.segments_deleted, 1);
    assert!(!r.path.exists());
    assert!(!dir.path().join("create").exists(), "empty folders pruned");
    assert_eq!(store.status().unwrap().records_pending, 0);
}

#[test]
fn a_batch_is_all_or_nothing_and_sequences_increase() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let bad = vec![
        rec("create", "patient", None, "{}"),
        NewRecord {
            action: "create".into(),
            entity: "../etc".into(),
            key: None,
            payload: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
            sinks: None,
        },
    ];
    assert!(matches!(
        store.stage_batch(bad, None),
        Err(StageError::Invalid(_))
    ));
    assert_eq!(store.status().unwrap().records_pending, 0);
    let ok = (0..5)
        .map(|i| rec("create", "patient", Some(&i.to_string()), "{}"))
        .collect();
    let staged = store.stage_batch(ok, None).unwrap();
    let got: Vec<u64> = staged.receipts().iter().map(|r| r.seq).collect();
    assert_eq!(got, vec![1, 2, 3, 4, 5]);
}

#[test]
fn client_key_replays_the_first_answer_and_refuses_another_body() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let key = |fp: &str| {
        Some(ClientKey {
            key: "k1".into(),
            fingerprint: fp.into(),
        })
    };
    let first = store
        .stage_batch(vec![rec("create", "patient", None, "{}")], key("a"))
        .unwrap();
    assert!(matches!(first, Staged::New(_)));
    let again = store
        .stage_batch(vec![rec("create", "patient", None, "{}")], key("a"))
        .unwrap();
    assert_eq!(again, Staged::Replayed(first.receipts().to_vec()));
    let other = store.stage_batch(vec![rec("create", "patient", None, "{}")], key("b"));
    assert!(matches!(other, Err(StageError::Conflict(_))));
    assert_eq!(store.status().unwrap().records_pending, 1);
}

#[test]
fn reopen_keeps_pending_records_and_sequence() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        for i in 0..3 {
            store
                .stage(rec("create", "patient", Some(&i.to_string()), "{}"))
                .unwrap();
        }
    }
    let (store, report) = Staging::open(Options::new(dir.path()).with_sinks(["db"])).unwrap();
    assert!(!report.index_rebuilt);
    assert_eq!(store.status().unwrap().records_pending, 3);
    assert_eq!(
        store
            .stage(rec("create", "patient", None, "{}"))
            .unwrap()
            .seq,
        4
    );
}

#[test]
fn size_limit_refuses_with_full_and_stages_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = Options::new(dir.path()).with_sinks(["db"]);
    opts.max_bytes = Some(4096);
    opts.min_free_bytes = 0;
    let store = Staging::open(opts).unwrap().0;
    let big = format!("{{\"x\":\"{}\"}}", "a".repeat(1000));
    let mut accepted = 0;
    let err = loop {
        match store.stage(rec("create", "patient", None, &big)) {
            Ok(_) => accepted += 1,
            Err(e) => break e,
        }
        assert!(accepted < 10, "limit never reached");
    };
    assert!(matches!(err, StageError::Full(_)), "{err}");
    assert_eq!(store.status().unwrap().records_pending, accepted);
    assert!(store.status().unwrap().staging_blocked.is_some());
    // Deliver everything: space comes back and staging resumes by itself.
    loop {
        let b = store.next_batch("db", 100).unwrap();
        if b.is_empty() {
            break;
        }
        store.ack("db", &seqs(&b)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(1100));
    store.cleanup().unwrap();
    store.stage(rec("create", "patient", None, &big)).unwrap();
}

#[cfg(unix)]
#[test]
fn staging_folders_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("staging");
    let store = open(&root);
    let r = store.stage(rec("create", "patient", None, "{}")).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&root), 0o700);
    assert_eq!(mode(r.path.parent().unwrap()), 0o700);
    assert_eq!(mode(&r.path), 0o600);
    assert_eq!(mode(&root.join("_state/index.sqlite3")), 0o600);
}

#[test]
fn a_failed_fsync_poisons_the_store_and_acknowledges_nothing() {
    a_failed_write_poisons_the_store_and_leaves_nothing_behind(Staging::inject_sync_failure);
}

#[test]
fn a_failed_index_commit_cuts_the_lines_it_refused() {
    // The lines were written and synced, then the index (on a disk that just filled up)
    // refused them: the sender is told "not staged", so a restart must not deliver them.
    a_failed_write_poisons_the_store_and_leaves_nothing_behind(Staging::inject_index_failure);
}

fn a_failed_write_poisons_the_store_and_leaves_nothing_behind(inject: fn(&Staging)) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let kept = store
        .stage(rec("create", "patient", Some("1"), "{}"))
        .unwrap();
    inject(&store);
    let err = store
        .stage(rec("create", "patient", Some("2"), r#"{"lost":true}"#))
        .unwrap_err();
    assert!(matches!(err, StageError::Poisoned(_)), "{err}");
    // Every later write fails too, with a message that says what to do.
    let later = store
        .stage(rec("create", "patient", Some("3"), "{}"))
        .unwrap_err();
    assert!(later.to_string().contains("restart estafeta"), "{later}");
    assert!(store.status().unwrap().staging_blocked.is_some());
    drop(store);
    // After a restart only the acknowledged record is there; the failed one was cut off.
    let store = open(dir.path());
    let all = store.list(&ListFilter::default()).unwrap();
    assert_eq!(
        all.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![kept.seq]
    );
    assert!(
        !std::fs::read_to_string(&kept.path)
            .unwrap()
            .contains("lost")
    );
    store
        .stage(rec("create", "patient", Some("4"), "{}"))
        .unwrap();
}

#[test]
fn a_probe_ignores_backoff_and_retry_now_wakes_the_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let a = store
        .stage(rec("create", "patient", Some("a"), "{}"))
        .unwrap()
        .seq;
    let b = store
        .stage(rec("create", "patient", Some("b"), "{}"))
        .unwrap()
        .seq;
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    assert_eq!(seqs(&store.next_batch("db", 10).unwrap()), vec![a, b]);
    store.fail("db", a, "connection refused", later).unwrap();
    store.fail("db", b, "connection refused", later).unwrap();
    assert!(store.next_batch("db", 10).unwrap().is_empty());
    // The probe takes only the oldest waiting head, leased like any batch.
    assert_eq!(seqs(&store.probe_batch("db").unwrap()), vec![a]);
    assert_eq!(seqs(&store.probe_batch("db").unwrap()), vec![b]);
    assert!(
        store.probe_batch("db").unwrap().is_empty(),
        "both are leased now"
    );
    store.ack("db", &[a]).unwrap();
    store.fail("db", b, "connection refused", later).unwrap();
    // The sink answered: the backlog is due at once, without waiting out its backoff.
    assert_eq!(store.retry_now("db").unwrap(), 1);
    assert_eq!(seqs(&store.next_batch("db", 10).unwrap()), vec![b]);
}

#[test]
fn a_source_checkpoint_advances_with_its_records_and_survives_losing_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    assert_eq!(store.source_checkpoint("monitor").unwrap(), None);
    let page = |from: u32| -> Vec<NewRecord> {
        (from..from + 3)
            .map(|i| {
                rec(
                    "create",
                    "exam",
                    Some(&i.to_string()),
                    &format!("{{\"id\":{i}}}"),
                )
            })
            .collect()
    };
    let mark = |checkpoint: &str| SourceMark {
        name: "monitor".into(),
        checkpoint: checkpoint.into(),
    };
    store.stage_from_source(page(1), mark("3")).unwrap();
    store.stage_from_source(page(4), mark("6")).unwrap();
    assert_eq!(
        store.source_checkpoint("monitor").unwrap().as_deref(),
        Some("6")
    );
    // Only the last record of each commit carries the mark, in the file a person can read.
    let text =
        std::fs::read_to_string(store.list(&Default::default()).unwrap()[0].path.clone()).unwrap();
    assert_eq!(
        text.matches(r#""source":{"name":"monitor","checkpoint":"#)
            .count(),
        2,
        "{text}"
    );
    store.note_source_run("monitor", 3, None).unwrap();
    drop(store);

    // The index is a cache of the folder: rebuilt from the segments, the checkpoint is back.
    Staging::reindex(Options::new(dir.path()).with_sinks(["db"])).unwrap();
    let store = open(dir.path());
    assert_eq!(
        store.source_checkpoint("monitor").unwrap().as_deref(),
        Some("6")
    );

    // A reset on purpose is not undone by the older records.
    store.reset_source("monitor", Some("2")).unwrap();
    drop(store);
    let store = open(dir.path());
    let sources = store.sources().unwrap();
    assert_eq!(sources.len(), 1);
    assert_eq!(sources[0].checkpoint.as_deref(), Some("2"));
    store.reset_source("monitor", None).unwrap();
    assert_eq!(store.source_checkpoint("monitor").unwrap(), None);
}

#[test]
fn a_source_checkpoint_survives_cleanup_of_its_segments_and_a_rebuilt_index() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let records = vec![rec("create", "exam", Some("1"), "{\"id\":1}")];
    let mark = SourceMark {
        name: "monitor".into(),
        checkpoint: "[1]".into(),
    };
    store.stage_from_source(records, mark).unwrap();
    let batch = store.next_batch("db", 10).unwrap();
    store.ack("db", &seqs(&batch)).unwrap();
    drop(store);
    // Reopened, the segment is no longer active: cleanup deletes it, mark and all.
    let store = open(dir.path());
    assert_eq!(store.cleanup().unwrap().segments_deleted, 1);
    drop(store);
    Staging::reindex(Options::new(dir.path()).with_sinks(["db"])).unwrap();
    let store = open(dir.path());
    assert_eq!(
        store.source_checkpoint("monitor").unwrap().as_deref(),
        Some("[1]"),
        "a rebuilt index without the segment must not send the source back to its start"
    );
}

#[test]
fn refused_rows_are_listed_with_their_files_and_removed_only_under_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let a = store
        .refuse_source_row(
            "exames",
            "[3]",
            "code \"URINA\" has no mapping",
            serde_json::json!({"id": 3}),
            true,
        )
        .unwrap();
    store
        .refuse_source_row(
            "outra",
            "[9]",
            "unreadable",
            serde_json::json!({"id": 9}),
            false,
        )
        .unwrap();
    let listed = store.refused_row_files(None).unwrap();
    assert_eq!(listed.len(), 2);
    let (path, row) = listed.iter().find(|(_, r)| r.source == "exames").unwrap();
    assert_eq!(path, &a);
    assert!(row.replayable);
    assert_eq!(row.reason, "code \"URINA\" has no mapping");
    assert!(
        !listed
            .iter()
            .any(|(_, r)| r.source == "outra" && r.replayable)
    );
    assert_eq!(store.refused_row_files(Some(1)).unwrap().len(), 1);
    // Only a refused row's own file goes.
    let elsewhere = dir.path().join("x.json");
    std::fs::write(&elsewhere, "{}").unwrap();
    assert!(store.remove_refused_row(&elsewhere).is_err());
    assert!(elsewhere.exists());
    store.remove_refused_row(&a).unwrap();
    assert!(!a.exists());
    assert_eq!(store.refused_row_files(None).unwrap().len(), 1);
    // A file written before `replayable` existed reads as not replayable.
    let old: estafeta_staging::RefusedRow = serde_json::from_str(
        r#"{"source": "s", "checkpoint": "[1]", "reason": "r", "refused_at": "2026-01-01T00:00:00Z", "row": {}}"#,
    )
    .unwrap();
    assert!(!old.replayable);
}
