//! Patient data at rest (contract 7, safe by default): the staging folder is private whatever
//! existed before, and once every sink has a record and cleanup ran, its key and payload are in
//! no file under the folder — not in the index, its free pages or its WAL.

use estafeta_staging::*;
use std::path::Path;

const CANARY_KEY: &str = "MRN-CANARY-7f3a9c";
const CANARY_TEXT: &str = "Paciente Canario da Silva 5d81e2";

/// Leases and acknowledges every pending record of the sink `db`.
fn deliver_all(store: &Staging) {
    loop {
        let batch = store.next_batch("db", 100).unwrap();
        if batch.is_empty() {
            break;
        }
        let seqs: Vec<u64> = batch.iter().map(|d| d.envelope.seq).collect();
        store.ack("db", &seqs).unwrap();
    }
}

fn files_containing(root: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap_or_default();
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    found.push(path.display().to_string());
                }
            }
        }
    }
    found
}

#[test]
fn after_delivery_and_cleanup_no_file_holds_the_key_or_the_payload() {
    let dir = tempfile::tempdir().unwrap();
    let store = Staging::open(Options::new(dir.path()).with_sinks(["db"]))
        .unwrap()
        .0;
    // Enough records that the index spans many pages, as in a day's work.
    for i in 0..500 {
        let key = if i == 250 {
            CANARY_KEY.to_owned()
        } else {
            format!("k{i}")
        };
        let payload = if i == 250 {
            format!(r#"{{"nome":"{CANARY_TEXT}"}}"#)
        } else {
            format!(r#"{{"nome":"outro {i}","pad":"{}"}}"#, "x".repeat(200))
        };
        store
            .stage(NewRecord::new("create", "patient", Some(key), &payload).unwrap())
            .unwrap();
    }
    assert!(!files_containing(dir.path(), CANARY_KEY.as_bytes()).is_empty());
    deliver_all(&store);
    // A segment is sealed once its writer has been idle for a second.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let report = store.cleanup().unwrap();
    assert!(report.segments_deleted > 0, "{report:?}");
    for needle in [CANARY_KEY, CANARY_TEXT] {
        assert_eq!(
            files_containing(dir.path(), needle.as_bytes()),
            Vec::<String>::new(),
            "{needle:?} is still on disk after delivery and cleanup"
        );
    }
}

#[cfg(unix)]
#[test]
fn a_staging_folder_made_beforehand_becomes_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("staging");
    for d in [root.clone(), root.join("_state"), root.join("_failed")] {
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let _store = Staging::open(Options::new(&root).with_sinks(["db"])).unwrap();
    for d in [root.clone(), root.join("_state"), root.join("_failed")] {
        let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", d.display());
    }
}

// ---- Encryption at rest (issue 23) ----

const CANARY_CLIENT_KEY: &str = "idem-CANARY-41c0de";

fn sealed_options(root: &Path, keys: &std::sync::Arc<Keyring>) -> Options {
    Options::new(root)
        .with_sinks(["db"])
        .with_keys(keys.clone())
}

/// Fails the test when any file under `root` holds a canary, naming the files and the step.
fn assert_no_canary(root: &Path, step: &str) {
    for needle in [CANARY_KEY, CANARY_TEXT, CANARY_CLIENT_KEY] {
        let found = files_containing(root, needle.as_bytes());
        assert!(
            found.is_empty(),
            "{step}: {needle:?} is in clear in {found:?}"
        );
    }
}

/// Stages the canary (under a client key) among other records, with a sealing store.
fn stage_canary(store: &Staging) -> u64 {
    for i in 0..50 {
        let payload = format!(r#"{{"nome":"outro {i}","pad":"{}"}}"#, "x".repeat(200));
        store
            .stage(NewRecord::new("create", "patient", Some(format!("k{i}")), &payload).unwrap())
            .unwrap();
    }
    let rec = NewRecord::new(
        "create",
        "patient",
        Some(CANARY_KEY.to_owned()),
        &format!(r#"{{"nome":"{CANARY_TEXT}"}}"#),
    )
    .unwrap();
    let ck = ClientKey {
        key: CANARY_CLIENT_KEY.to_owned(),
        fingerprint: "fp".to_owned(),
    };
    store.stage_batch(vec![rec], Some(ck)).unwrap().receipts()[0].seq
}

#[test]
fn with_a_key_no_file_ever_holds_the_key_or_the_payload_and_the_holder_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let keys = std::sync::Arc::new(Keyring::generate());
    let store = Staging::open(sealed_options(root, &keys)).unwrap().0;
    let seq = stage_canary(&store);
    assert_no_canary(root, "staged");
    // Whoever has the key reads it back: the record, its key and the listing.
    let (env, info) = store.get(&seq.to_string()).unwrap();
    assert!(env.payload.get().contains(CANARY_TEXT));
    assert_eq!(env.key.as_deref(), Some(CANARY_KEY));
    assert_eq!(env.client_key.as_deref(), Some(CANARY_CLIENT_KEY));
    assert_eq!(info.key.as_deref(), Some(CANARY_KEY));
    let listed = store.list(&ListFilter::default()).unwrap();
    assert!(listed.iter().any(|r| r.key.as_deref() == Some(CANARY_KEY)));
    let file = Staging::read_file_with_keys(&info.path, Some(&keys)).unwrap();
    assert!(file.iter().any(|e| e.payload.get().contains(CANARY_TEXT)));
    // Without the key, the same file is refused, not misread or called damaged.
    assert!(matches!(
        Staging::read_file(&info.path),
        Err(StoreError::KeyNeeded { .. })
    ));
    // The same client key is still recognised (its hash is in the index).
    let again = NewRecord::new(
        "create",
        "patient",
        Some(CANARY_KEY.to_owned()),
        &format!(r#"{{"nome":"{CANARY_TEXT}"}}"#),
    )
    .unwrap();
    let replay = store
        .stage_batch(
            vec![again],
            Some(ClientKey {
                key: CANARY_CLIENT_KEY.to_owned(),
                fingerprint: "fp".to_owned(),
            }),
        )
        .unwrap();
    assert!(matches!(replay, Staged::Replayed(_)));

    // A server answer that quotes the payload: a retry, then a dead letter.
    let answer = format!("HTTP 422: {{\"nome\":\"{CANARY_TEXT}\",\"key\":\"{CANARY_KEY}\"}}");
    let mut batch = Vec::new();
    while !batch.iter().any(|d: &Delivery| d.envelope.seq == seq) {
        batch = store.next_batch("db", 1000).unwrap();
        let others: Vec<u64> = batch
            .iter()
            .map(|d| d.envelope.seq)
            .filter(|s| *s != seq)
            .collect();
        store.ack("db", &others).unwrap();
    }
    let leased = batch.into_iter().find(|d| d.envelope.seq == seq).unwrap();
    assert!(leased.envelope.payload.get().contains(CANARY_TEXT));
    store.fail("db", seq, &answer, chrono::Utc::now()).unwrap();
    assert_no_canary(root, "failed once");
    assert_eq!(
        store.status().unwrap().sinks[0].last_error.as_deref(),
        Some(answer.as_str())
    );
    let letter = store.dead("db", seq, &answer).unwrap();
    assert_no_canary(root, "dead-lettered");
    let read = Staging::dead_letter_with_keys(&letter, Some(&keys)).unwrap();
    assert_eq!(read.reason, answer);
    assert!(read.record.payload.get().contains(CANARY_TEXT));
    let listed = store.dead_letters(None).unwrap();
    assert_eq!(listed[0].key.as_deref(), Some(CANARY_KEY));
    assert_eq!(listed[0].reason, answer);
    assert!(matches!(
        Staging::dead_letter(&letter),
        Err(StoreError::KeyNeeded { .. })
    ));

    // Requeued, delivered, cleaned up.
    store.requeue("db", seq).unwrap();
    assert_no_canary(root, "requeued");
    let batch = store.next_batch("db", 10).unwrap();
    assert_eq!(batch.len(), 1);
    store.ack("db", &[seq]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    store.cleanup().unwrap();
    assert_no_canary(root, "delivered and cleaned up");
    drop(store);
    // A rebuild of the index from the sealed folder keeps the index free of them too.
    Staging::reindex(sealed_options(root, &keys)).unwrap();
    assert_no_canary(root, "reindexed");
}

/// Every file under `root` with a digest of its bytes (crc32 and length: a change to any byte
/// shows, and no dependency is needed).
fn checksums(root: &Path) -> std::collections::BTreeMap<String, (u32, usize)> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path.clone());
                out.insert(format!("{}/", path.display()), (0, 0));
            } else {
                let bytes = std::fs::read(&path).unwrap();
                out.insert(
                    path.display().to_string(),
                    (crc32fast::hash(&bytes), bytes.len()),
                );
            }
        }
    }
    out
}

#[test]
fn without_the_key_or_with_a_wrong_one_a_sealed_folder_is_refused_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let keys = std::sync::Arc::new(Keyring::generate());
    {
        let store = Staging::open(sealed_options(root, &keys)).unwrap().0;
        let seq = stage_canary(&store);
        store.dead("db", seq, "HTTP 422").unwrap();
    }
    // What an open would repair if it went ahead: a torn tail (a crash mid-write) and a
    // garbled line, so "nothing changed" proves the open stopped before recovery.
    let seg = {
        let store = Staging::open(sealed_options(root, &keys)).unwrap().0;
        store.get("1").unwrap().1.path
    };
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes.extend_from_slice(b"{\"v\":1,\"id\":\"torn");
    bytes[40] ^= 0x01;
    std::fs::write(&seg, &bytes).unwrap();
    let before = checksums(root);

    let Err(err) = Staging::open(Options::new(root).with_sinks(["db"])) else {
        panic!("a sealed folder opened without its key");
    };
    let text = err.to_string();
    assert!(matches!(err, StoreError::KeyNeeded { .. }), "{err:?}");
    assert!(text.contains(keys.current_id()), "{text}");
    assert!(text.contains("STAGING_KEY_FILE"), "{text}");
    assert_eq!(
        checksums(root),
        before,
        "an open without the key changed the folder"
    );

    let wrong = std::sync::Arc::new(Keyring::generate());
    let Err(err) = Staging::open(sealed_options(root, &wrong)) else {
        panic!("a sealed folder opened with a wrong key");
    };
    assert!(matches!(err, StoreError::KeyNeeded { .. }), "{err:?}");
    assert!(err.to_string().contains(keys.current_id()), "{err}");
    assert_eq!(
        checksums(root),
        before,
        "an open with a wrong key changed the folder"
    );
    assert!(Staging::reindex(Options::new(root).with_sinks(["db"])).is_err());
    assert_eq!(
        checksums(root),
        before,
        "a reindex without the key changed the folder"
    );

    // With the key, the same folder opens: the torn tail is cut and the garbled line set
    // aside as damage, as in a plain folder.
    let (_store, report) = Staging::open(sealed_options(root, &keys)).unwrap();
    assert_eq!(report.torn_tails_repaired, 1, "{report:?}");
}

#[test]
fn a_key_missing_from_the_key_file_is_never_taken_for_damage() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let keys = std::sync::Arc::new(Keyring::generate());
    {
        let store = Staging::open(sealed_options(root, &keys)).unwrap().0;
        stage_canary(&store);
    }
    // Someone removed the list of keys: the records themselves still say which key they need.
    std::fs::remove_file(root.join("_state/sealed-with")).unwrap();
    let wrong = std::sync::Arc::new(Keyring::generate());
    let store = Staging::open(sealed_options(root, &wrong)).unwrap().0;
    let err = store.next_batch("db", 10).unwrap_err();
    assert!(matches!(err, StoreError::KeyNeeded { .. }), "{err:?}");
    assert!(err.to_string().contains(keys.current_id()), "{err}");
    assert!(
        !root.join("_failed/_damaged").exists(),
        "a record was set aside as damaged for a missing key"
    );
    // Nothing was lost: it is all still pending, and the right key delivers it.
    assert_eq!(store.status().unwrap().records_pending, 51);
    drop(store);
    let store = Staging::open(sealed_options(root, &keys)).unwrap().0;
    assert!(store.get("1").is_ok());
}

#[test]
fn after_a_rotation_new_segments_use_the_new_key_and_old_keys_go_when_nothing_uses_them() {
    let dir = tempfile::tempdir().unwrap();
    // The key file's copies go beside the staging folder, not in it.
    let root = &dir.path().join("staging");
    let mut ring = Keyring::generate();
    let old = ring.current_id().to_owned();
    {
        let keys = std::sync::Arc::new(ring_clone(&ring, dir.path()));
        let store = Staging::open(sealed_options(root, &keys)).unwrap().0;
        store
            .stage(NewRecord::new("create", "patient", Some("a".into()), r#"{"n":1}"#).unwrap())
            .unwrap();
    }
    let new = ring.rotate();
    let keys = std::sync::Arc::new(ring_clone(&ring, dir.path()));
    let store = Staging::open(sealed_options(root, &keys)).unwrap().0;
    let receipt = store
        .stage(NewRecord::new("create", "patient", Some("a".into()), r#"{"n":2}"#).unwrap())
        .unwrap();
    let line = std::fs::read_to_string(&receipt.path).unwrap();
    assert!(line.contains(&format!("\"kid\":\"{new}\"")), "{line}");
    let in_use = store.keys_in_use().unwrap();
    assert_eq!(in_use, [old.clone(), new.clone()].into_iter().collect());
    // The old key still opens the old record, in order with the new one.
    let batch = store.next_batch("db", 10).unwrap();
    assert_eq!(
        batch
            .iter()
            .map(|d| d.envelope.payload.get())
            .collect::<Vec<_>>(),
        vec![r#"{"n":1}"#, r#"{"n":2}"#]
    );
    store.ack("db", &[1, 2]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    store.cleanup().unwrap();
    let in_use = store.keys_in_use().unwrap();
    assert!(!in_use.contains(&old), "{in_use:?}");
    let mut needed = in_use.clone();
    needed.insert(new.clone());
    store.set_keys_needed(&needed).unwrap();
    assert_eq!(
        ring.retain(&needed.into_iter().collect::<Vec<_>>()),
        vec![old]
    );
    drop(store);
    let keys = std::sync::Arc::new(ring_clone(&ring, dir.path()));
    assert!(Staging::open(sealed_options(root, &keys)).is_ok());
}

/// A copy of `ring` through its key file, as a process that loads it would have.
fn ring_clone(ring: &Keyring, dir: &Path) -> Keyring {
    let path = dir.join("copy.key");
    ring.save(&path, true).unwrap();
    Keyring::load(&path).unwrap()
}

#[test]
fn turning_encryption_on_keeps_one_order_per_key_across_plain_and_sealed_records() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    {
        let (store, _) = Staging::open(Options::new(root).with_sinks(["db"])).unwrap();
        store
            .stage(
                NewRecord::new("update", "patient", Some(CANARY_KEY.into()), r#"{"n":1}"#).unwrap(),
            )
            .unwrap();
        // Its first attempt fails: it holds back the later records of its key.
        let batch = store.next_batch("db", 10).unwrap();
        let later = chrono::Utc::now() + chrono::Duration::hours(1);
        store
            .fail("db", batch[0].envelope.seq, "HTTP 503", later)
            .unwrap();
    }
    let keys = std::sync::Arc::new(Keyring::generate());
    let store = Staging::open(sealed_options(root, &keys)).unwrap().0;
    store
        .stage(NewRecord::new("update", "patient", Some(CANARY_KEY.into()), r#"{"n":2}"#).unwrap())
        .unwrap();
    assert!(
        store.next_batch("db", 10).unwrap().is_empty(),
        "the sealed record of the key went before the plain one waiting ahead of it"
    );
    assert_no_canary_in_index(root);
    store.retry_now("db").unwrap();
    let order: Vec<u64> = store
        .next_batch("db", 10)
        .unwrap()
        .iter()
        .map(|d| d.envelope.seq)
        .collect();
    assert_eq!(order, vec![1, 2]);
}

/// The index (and its WAL) holds no record key in clear.
fn assert_no_canary_in_index(root: &Path) {
    let found: Vec<String> = files_containing(&root.join("_state"), CANARY_KEY.as_bytes());
    assert!(found.is_empty(), "{found:?}");
}

/// Crypto-shredding (issue 23): a sealed line names its segment's data key, kept in
/// `_state/data-keys`; when the delivered segment is deleted, that key is overwritten in place.
/// A copy of the segment's bytes (a leftover in free space, a backup) then opens for nobody,
/// not even with the key file; before, the same bytes opened.
#[test]
fn a_deleted_segment_is_crypto_shredded_and_a_copy_of_it_opens_no_more() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let keys = std::sync::Arc::new(Keyring::generate());
    let store = Staging::open(sealed_options(root, &keys)).unwrap().0;
    let seq = stage_canary(&store);
    let segment = walk_segments(root);
    assert_eq!(segment.len(), 1, "{segment:?}");
    let copy = std::fs::read(&segment[0]).unwrap();
    // The canary was staged last: the last line.
    let line = copy
        .split(|b| *b == b'\n')
        .rfind(|l| !l.is_empty())
        .unwrap()
        .to_vec();
    // The line names its data key by id and does not carry it.
    let text = String::from_utf8_lossy(&line).into_owned();
    assert!(
        text.contains("\"dkid\":\"") && !text.contains("\"dk\":\""),
        "{text}"
    );
    let opened = testing::decode_line(&line, Some(&keys)).expect("opens while the segment lives");
    assert_eq!(opened.seq, seq);
    let slots = std::fs::read(root.join("_state").join("data-keys")).unwrap();
    let rel = segment[0]
        .strip_prefix(root)
        .unwrap()
        .to_string_lossy()
        .replace('\\', "/");
    assert!(String::from_utf8_lossy(&slots).contains(&rel));

    // Delivered and cleaned up: the segment goes, and its key with it.
    deliver_all(&store);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(store.cleanup().unwrap().segments_deleted, 1);
    assert!(!segment[0].exists());
    let slots = std::fs::read(root.join("_state").join("data-keys")).unwrap();
    assert!(
        slots.iter().all(|b| *b == b' ' || *b == b'\n'),
        "the slot was not overwritten: {:?}",
        String::from_utf8_lossy(&slots)
    );
    let err = testing::decode_line(&line, Some(&keys)).expect_err("a shredded line must not open");
    assert!(err.contains("not in _state/data-keys"), "{err}");
    // Nor can another process with the key file, over the same folder.
    drop(store);
    let fresh = std::sync::Arc::new(ring_clone(&keys, dir.path()));
    let again = Staging::open(sealed_options(root, &fresh)).unwrap().0;
    let err = testing::decode_line(&line, Some(&fresh)).expect_err("still shredded");
    assert!(err.contains("not in _state/data-keys"), "{err}");
    drop(again);
}

fn walk_segments(root: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if !path.ends_with("_state") && !path.ends_with("_failed") {
                    stack.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "jsonl") {
                found.push(path);
            }
        }
    }
    found
}

/// A source row set aside (`_failed/_refused/`) and a source's note are sealed too: the row is
/// the patient's data as read, and a checkpoint can be a patient's id, so the file is named by
/// its keyed hash. Whoever has the key lists and reads them.
#[test]
fn refused_source_rows_and_source_notes_are_sealed_and_read_back_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let keys = std::sync::Arc::new(Keyring::generate());
    let store = Staging::open(sealed_options(root, &keys)).unwrap().0;
    let checkpoint = format!("[\"{CANARY_KEY}\"]");
    let row = serde_json::json!({ "nome": CANARY_TEXT, "prontuario": CANARY_KEY });
    let path = store
        .refuse_source_row(
            "lab",
            &checkpoint,
            "column obs: unsupported type",
            row,
            true,
        )
        .unwrap();
    store
        .set_source_note(
            "lab",
            Some(format!("{{\"keys\":[\"{CANARY_KEY}\"]}}").as_bytes()),
        )
        .unwrap();
    assert_no_canary(root, "a refused row and a note written");
    let rows = store.refused_rows("lab").unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].checkpoint, checkpoint);
    assert_eq!(rows[0].row["nome"], CANARY_TEXT);
    assert_eq!(
        RefusedRow::read_with_keys(&path, Some(&keys)).unwrap().row["prontuario"],
        CANARY_KEY
    );
    assert!(matches!(
        RefusedRow::read(&path),
        Err(StoreError::KeyNeeded { .. })
    ));
    let note = store.source_note("lab").unwrap().unwrap();
    assert!(String::from_utf8_lossy(&note).contains(CANARY_KEY));
}

/// A source's checkpoint can be a record key (a checkpoint column holding the patient's number):
/// with a key, neither the index (nor its WAL) nor `_state/sources.json` holds it in clear, after
/// staging, delivery and cleanup, or a reset; the store gives it back as it was, also after a
/// reopen, and an index written in clear has its checkpoints sealed when encryption is turned
/// on. Fails with the checkpoint written as it is.
#[test]
fn source_checkpoints_are_sealed_and_read_back_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let keys = std::sync::Arc::new(Keyring::generate());
    let checkpoint = format!("[\"{CANARY_KEY}\"]");
    let mark = |checkpoint: &str| SourceMark {
        name: "lab".to_owned(),
        checkpoint: checkpoint.to_owned(),
    };
    let record = || NewRecord::new("create", "exam", Some("k1".to_owned()), r#"{"a":1}"#).unwrap();

    // Staged in clear first, then encryption turned on: the clear checkpoint gets sealed.
    {
        let store = Staging::open(Options::new(root).with_sinks(["db"]))
            .unwrap()
            .0;
        store
            .stage_from_source(vec![record()], mark(&checkpoint))
            .unwrap();
        deliver_all(&store);
        store.cleanup().unwrap();
        assert!(
            !files_containing(root, CANARY_KEY.as_bytes()).is_empty(),
            "the clear store keeps the checkpoint as it is (else this test proves nothing)"
        );
    }
    let store = Staging::open(sealed_options(root, &keys)).unwrap().0;
    assert_eq!(
        store.source_checkpoint("lab").unwrap().as_deref(),
        Some(checkpoint.as_str())
    );
    // The clear segment stays until its records are delivered and it is cleaned up (below);
    // the index and `_state` hold the checkpoint sealed from this open on.
    assert_no_canary_in_index(root);

    let later = format!("[\"{CANARY_KEY}-2\"]");
    store
        .stage_from_source(vec![record()], mark(&later))
        .unwrap();
    assert_eq!(
        store.source_checkpoint("lab").unwrap().as_deref(),
        Some(later.as_str())
    );
    assert_eq!(
        store.sources().unwrap()[0].checkpoint.as_deref(),
        Some(later.as_str())
    );
    deliver_all(&store);
    store.cleanup().unwrap();
    assert!(root.join("_state/sources.json").exists());
    assert_no_canary(root, "a checkpoint staged, delivered and cleaned up");

    store.reset_source("lab", Some(&checkpoint)).unwrap();
    assert_no_canary(root, "a source reset to a checkpoint");
    drop(store);
    let store = Staging::open(sealed_options(root, &keys)).unwrap().0;
    assert_eq!(
        store.source_checkpoint("lab").unwrap().as_deref(),
        Some(checkpoint.as_str())
    );
}

/// A large sealed group is placed and indexed by each line's predicted length while other
/// threads seal the lines: batches of 300 records alternating two entities (two segments
/// filled side by side), from several stagers at once, all read back whole, by the lease and
/// after a reopen (which rescans the segments against the index).
#[test]
fn large_sealed_batches_over_two_segments_read_back_whole() {
    let dir = tempfile::tempdir().unwrap();
    let keys = std::sync::Arc::new(Keyring::generate());
    let store = Staging::open(sealed_options(dir.path(), &keys)).unwrap().0;
    let payload =
        |t: usize, i: usize| format!(r#"{{"t":{t},"i":{i},"pad":"{}"}}"#, "y".repeat(i % 97));
    std::thread::scope(|scope| {
        for t in 0..4 {
            let store = &store;
            scope.spawn(move || {
                for round in 0..3 {
                    let records = (0..300)
                        .map(|i| {
                            let entity = if i % 2 == 0 { "patient" } else { "attendance" };
                            let key = format!("t{t}-r{round}-{}", i % 7);
                            NewRecord::new("create", entity, Some(key), &payload(t, i)).unwrap()
                        })
                        .collect();
                    let staged = store.stage_batch(records, None).unwrap();
                    assert_eq!(staged.receipts().len(), 300);
                }
            });
        }
    });
    drop(store);
    let (store, report) = Staging::open(sealed_options(dir.path(), &keys)).unwrap();
    assert!(report.moved_aside.is_empty(), "{report:?}");
    assert!(!report.index_rebuilt, "{report:?}");
    assert_eq!(store.list(&ListFilter::default()).unwrap().len(), 3600);
    let mut delivered = 0;
    loop {
        let batch = store.next_batch("db", 500).unwrap();
        if batch.is_empty() {
            break;
        }
        for d in &batch {
            let p: serde_json::Value = serde_json::from_str(d.envelope.payload.get()).unwrap();
            let (t, i) = (
                p["t"].as_u64().unwrap() as usize,
                p["i"].as_u64().unwrap() as usize,
            );
            assert_eq!(
                d.envelope.payload.get(),
                payload(t, i),
                "record {}",
                d.envelope.seq
            );
        }
        delivered += batch.len();
        let seqs: Vec<u64> = batch.iter().map(|d| d.envelope.seq).collect();
        store.ack("db", &seqs).unwrap();
    }
    assert_eq!(
        delivered, 3600,
        "every record leased, none set aside as damaged"
    );
}
