//! Foreign files: JSON payloads written straight into the staging tree exactly as the seed's
//! `save_local_stage` writes them (`<action>/<entity>/<YYYY>/<MM>/<DD>/<YYYYmmddHHMMSSffffff>.json`
//! in local time, `json.dump` text) are adopted in timestamp order and removed; a file still
//! being written waits; an invalid one moves to `_failed/` with the parse error beside it.

use chrono::{DateTime, Local};
use estafeta_staging::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

const QUIET: Duration = Duration::from_secs(2);

fn open(root: &Path) -> Staging {
    let mut opts = Options::new(root).with_sinks(["db"]);
    opts.min_free_bytes = 0;
    Staging::open(opts).unwrap().0
}

fn admit(_action: &str, _entity: &str, v: &serde_json::Value) -> Result<Admission, String> {
    Ok(Admission {
        key: v.get("id").map(|x| x.to_string()),
        sinks: None,
    })
}

fn adopt(store: &Staging) -> AdoptReport {
    store.adopt_foreign(&admit, QUIET).unwrap()
}

/// Where the seed's `save_local_stage(entity, action, data)` puts a file written at `t`.
fn seed_path(root: &Path, action: &str, entity: &str, t: DateTime<Local>) -> PathBuf {
    root.join(action)
        .join(entity)
        .join(t.format("%Y").to_string())
        .join(t.format("%m").to_string())
        .join(t.format("%d").to_string())
        .join(format!("{}.json", t.format("%Y%m%d%H%M%S%6f")))
}

/// Python's `json.dump({"nome": nome, "id": id, "versao": versao}, f)`: `", "` and `": "`
/// separators, non-ASCII escaped (`ensure_ascii=True`).
fn py_dump(nome: &str, id: u32, versao: u32) -> String {
    let nome: String = nome
        .chars()
        .map(|c| {
            if c.is_ascii() {
                c.to_string()
            } else {
                format!("\\u{:04x}", c as u32)
            }
        })
        .collect();
    format!(r#"{{"nome": "{nome}", "id": {id}, "versao": {versao}}}"#)
}

/// Writes a file as the seed does and sets its modification time.
fn write_seed(path: &Path, content: &str, modified: SystemTime) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, content).unwrap();
    set_mtime(path, modified);
}

fn set_mtime(path: &Path, modified: SystemTime) {
    fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(modified)
        .unwrap();
}

fn an_hour_ago() -> SystemTime {
    SystemTime::now() - Duration::from_secs(3600)
}

/// Delivers (and acknowledges) everything deliverable; returns the envelopes in order.
fn drain(store: &Staging) -> Vec<Envelope> {
    let mut out = Vec::new();
    loop {
        let batch = store.next_batch("db", 100).unwrap();
        if batch.is_empty() {
            return out;
        }
        let seqs: Vec<u64> = batch.iter().map(|d| d.envelope.seq).collect();
        store.ack("db", &seqs).unwrap();
        out.extend(batch.into_iter().map(|d| d.envelope));
    }
}

fn versao(env: &Envelope) -> u64 {
    let v: serde_json::Value = serde_json::from_str(env.payload.get()).unwrap();
    v["versao"].as_u64().unwrap()
}

#[test]
fn seed_files_are_adopted_in_timestamp_order_and_the_invalid_and_unfinished_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let store = open(root);
    let base = Local::now() - chrono::Duration::hours(1);
    let at = |ms: i64| base + chrono::Duration::milliseconds(ms);

    // Five versions of patient 7, interleaved across the create/ and update/ folders, so the
    // order of paths (create/ before update/) differs from the order of timestamps.
    let plan = [
        ("create", 0),
        ("update", 1),
        ("create", 2),
        ("update", 3),
        ("update", 4),
    ];
    let mut valid = Vec::new();
    for (i, (action, versao)) in plan.iter().enumerate() {
        let path = seed_path(root, action, "patient", at(i as i64 * 1000 + 123));
        write_seed(&path, &py_dump("Ana Lúcia", 7, *versao), an_hour_ago());
        valid.push((path, action.to_string(), *versao));
    }
    // Not JSON (a comma missing), written long ago.
    let invalid = seed_path(root, "create", "patient", at(1500));
    write_seed(&invalid, r#"{"nome": "Bob" "id": 8}"#, an_hour_ago());
    // Still being written right now: a valid prefix.
    let unfinished = seed_path(root, "update", "patient", Local::now());
    let full = py_dump("Carla", 7, 5);
    write_seed(&unfinished, &full[..full.len() / 2], SystemTime::now());

    let report = adopt(&store);
    assert_eq!(report.adopted, 5, "{report:?}");
    assert_eq!(report.waiting, 1, "{report:?}");
    assert_eq!(report.moved_aside.len(), 1, "{report:?}");

    // Adopted files are gone from the tree; the unfinished one is left alone.
    for (path, ..) in &valid {
        assert!(!path.exists(), "{} was not removed", path.display());
    }
    assert!(unfinished.exists());

    // The invalid file moved under _failed/ at the same relative place, with the parse error.
    let moved = &report.moved_aside[0];
    assert_eq!(moved.from, invalid);
    let rel = invalid.strip_prefix(root).unwrap();
    assert_eq!(moved.to, root.join("_failed").join(rel));
    assert!(!invalid.exists());
    assert_eq!(
        fs::read_to_string(&moved.to).unwrap(),
        r#"{"nome": "Bob" "id": 8}"#
    );
    let mut note = moved.to.clone().into_os_string();
    note.push(".error.txt");
    let error = fs::read_to_string(&note).unwrap();
    assert!(error.contains("not valid JSON"), "{error}");
    assert!(error.contains("line 1 column"), "{error}");
    // The moved file is no dead letter of a record.
    assert!(store.dead_letters(None).unwrap().is_empty());

    // Staged in timestamp order: sequence numbers follow the file names' timestamps.
    let listed = store.list(&ListFilter::default()).unwrap();
    assert_eq!(listed.len(), 5);
    for (info, (_, action, versao_want)) in listed.iter().zip(&valid) {
        let (env, _) = store.get(&info.seq.to_string()).unwrap();
        assert_eq!(&env.action, action);
        assert_eq!(env.entity, "patient");
        assert_eq!(env.key.as_deref(), Some("7"));
        assert_eq!(versao(&env), *versao_want as u64, "seq {}", env.seq);
        let want = py_dump("Ana Lúcia", 7, *versao_want);
        let want: serde_json::Value = serde_json::from_str(&want).unwrap();
        let got: serde_json::Value = serde_json::from_str(env.payload.get()).unwrap();
        assert_eq!(got, want);
        assert_eq!(got["nome"], "Ana Lúcia");
    }
    // And per-key delivery follows it: one key, one run, oldest version first.
    let delivered = drain(&store);
    assert_eq!(
        delivered.iter().map(versao).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4]
    );
    let last_seq = delivered.last().unwrap().seq;

    // Nothing changed, nothing adopted: the unfinished file still waits.
    let again = adopt(&store);
    assert_eq!((again.adopted, again.waiting), (0, 1), "{again:?}");

    // The writer finishes; once the file has been quiet long enough it is adopted, after the
    // versions before it.
    fs::write(&unfinished, &full).unwrap();
    assert_eq!(
        adopt(&store).adopted,
        0,
        "adopted while it might still change"
    );
    set_mtime(&unfinished, SystemTime::now() - QUIET * 2);
    let late = adopt(&store);
    assert_eq!((late.adopted, late.waiting), (1, 0), "{late:?}");
    assert!(late.moved_aside.is_empty());
    assert!(!unfinished.exists());
    let delivered = drain(&store);
    assert_eq!(delivered.len(), 1);
    assert_eq!(versao(&delivered[0]), 5);
    assert!(delivered[0].seq > last_seq);
    assert_eq!(delivered[0].action, "update");

    let none = adopt(&store);
    assert_eq!((none.adopted, none.waiting), (0, 0), "{none:?}");
    assert!(store.list(&ListFilter::default()).unwrap().is_empty());
}

#[test]
fn adopting_twice_never_stages_a_file_twice() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let store = open(root);
    let base = Local::now() - chrono::Duration::minutes(10);
    let files: Vec<(PathBuf, String)> = (0..3u32)
        .map(|i| {
            let path = seed_path(
                root,
                "create",
                "exam",
                base + chrono::Duration::seconds(i as i64),
            );
            let content = py_dump("Exame", 100 + i, i);
            write_seed(&path, &content, an_hour_ago());
            (path, content)
        })
        .collect();
    assert_eq!(adopt(&store).adopted, 3);
    let first: Vec<(u64, String)> = store
        .list(&ListFilter::default())
        .unwrap()
        .into_iter()
        .map(|r| (r.seq, r.id))
        .collect();
    assert_eq!(first.len(), 3);

    // A second scan finds nothing left to adopt.
    let second = adopt(&store);
    assert_eq!((second.adopted, second.waiting), (0, 0), "{second:?}");

    // A crash after staging but before the removal leaves the same files in place: scanning
    // again removes them without staging them again.
    for (path, content) in &files {
        write_seed(path, content, an_hour_ago());
    }
    adopt(&store);
    for (path, _) in &files {
        assert!(!path.exists(), "{} left behind", path.display());
    }
    let after: Vec<(u64, String)> = store
        .list(&ListFilter::default())
        .unwrap()
        .into_iter()
        .map(|r| (r.seq, r.id))
        .collect();
    assert_eq!(after, first, "a file was staged twice");
    assert_eq!(drain(&store).len(), 3);
}

#[test]
fn a_file_still_being_written_holds_back_later_files_to_keep_their_order() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let store = open(root);
    let base = Local::now() - chrono::Duration::minutes(5);
    // The seed names a file when it opens it: an earlier name can finish writing later.
    let slow = seed_path(root, "create", "patient", base);
    let fast = seed_path(
        root,
        "update",
        "patient",
        base + chrono::Duration::milliseconds(5),
    );
    let slow_full = py_dump("Davi", 9, 0);
    write_seed(&slow, &slow_full[..10], SystemTime::now());
    write_seed(&fast, &py_dump("Davi", 9, 1), an_hour_ago());

    let report = adopt(&store);
    assert_eq!((report.adopted, report.waiting), (0, 1), "{report:?}");
    assert!(
        fast.exists(),
        "a later file overtook an unfinished earlier one"
    );

    write_seed(&slow, &slow_full, an_hour_ago());
    let report = adopt(&store);
    assert_eq!((report.adopted, report.waiting), (2, 0), "{report:?}");
    let order: Vec<u64> = drain(&store).iter().map(versao).collect();
    assert_eq!(order, vec![0, 1]);
}
