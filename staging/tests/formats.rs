//! The store reads its own files back by path (`Staging::read_file` for a segment,
//! `Staging::dead_letter` for a dead letter), checking the format version first: a file written
//! by a newer Estafeta is refused with `StoreError::NewerFormat`, a file of another kind with
//! `StoreError::NotStagingFile`, a changed line with `StoreError::Damaged`.

use estafeta_staging::*;
use std::path::{Path, PathBuf};

fn open(dir: &Path) -> Staging {
    Staging::open(Options::new(dir).with_sinks(["db"]))
        .unwrap()
        .0
}

fn rec(key: &str, payload: &str) -> NewRecord {
    NewRecord::new("create", "patient", Some(key.to_owned()), payload).unwrap()
}

/// A copy of `from` at `to` with `from`'s text passed through `edit`.
fn edited_copy(from: &Path, to: &Path, edit: impl Fn(&str) -> String) -> PathBuf {
    let text = std::fs::read_to_string(from).unwrap();
    std::fs::write(to, edit(&text)).unwrap();
    to.to_path_buf()
}

#[test]
fn a_segment_reads_back_as_its_records_in_file_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let first = store.stage(rec("a", r#"{"n": 1}"#)).unwrap();
    let second = store.stage(rec("b", r#"{"n": 2}"#)).unwrap();
    assert_eq!(
        first.path, second.path,
        "one segment per action, entity and day"
    );

    let records = Staging::read_file(&first.path).unwrap();
    let ids: Vec<&str> = records.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, vec![first.id.as_str(), second.id.as_str()]);
    assert_eq!(records[1].payload.get(), r#"{"n":2}"#);
    assert_eq!(records[0].v, FORMAT_VERSION);
}

#[test]
fn a_dead_letter_reads_back_with_its_record_sink_reason_and_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let staged = store.stage(rec("a", r#"{"n": 1}"#)).unwrap();
    store.next_batch("db", 10).unwrap();
    let path = store
        .dead("db", staged.seq, "HTTP 422: cpf inválido")
        .unwrap();

    let letter = Staging::dead_letter(&path).unwrap();
    assert_eq!(letter.sink, "db");
    assert_eq!(letter.reason, "HTTP 422: cpf inválido");
    assert_eq!(letter.attempts, 1);
    assert_eq!(letter.record.id, staged.id);
    assert_eq!(letter.record.seq, staged.seq);
    assert!(letter.segment.ends_with(".jsonl"), "{}", letter.segment);
    assert!(!letter.failed_at.is_empty());
}

#[test]
fn a_segment_of_a_newer_format_is_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let staged = store.stage(rec("a", r#"{"n": 1}"#)).unwrap();
    let newer = FORMAT_VERSION + 1;
    let copy = edited_copy(&staged.path, &dir.path().join("newer.jsonl"), |text| {
        text.replace(
            &format!(r#"{{"v":{FORMAT_VERSION},"#),
            &format!(r#"{{"v":{newer},"#),
        )
    });

    match Staging::read_file(&copy) {
        Err(
            err @ StoreError::NewerFormat {
                found, supported, ..
            },
        ) => {
            assert_eq!((found, supported), (newer, FORMAT_VERSION));
            let message = err.to_string();
            assert!(message.contains("newer Estafeta"), "{message}");
            assert!(message.contains("estafeta update"), "{message}");
        }
        other => panic!("expected NewerFormat, got {other:?}"),
    }
}

#[test]
fn a_dead_letter_of_a_newer_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let staged = store.stage(rec("a", r#"{"n": 1}"#)).unwrap();
    store.next_batch("db", 10).unwrap();
    let path = store.dead("db", staged.seq, "refused").unwrap();
    let newer = FORMAT_VERSION + 1;
    let copy = edited_copy(&path, &dir.path().join("newer.json"), |text| {
        text.replace(
            &format!(r#""v": {FORMAT_VERSION},"#),
            &format!(r#""v": {newer},"#),
        )
    });

    assert!(
        matches!(
            Staging::dead_letter(&copy),
            Err(StoreError::NewerFormat { found, .. }) if found == newer
        ),
        "{:?}",
        Staging::dead_letter(&copy)
    );
}

#[test]
fn files_of_another_kind_are_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let staged = store.stage(rec("a", r#"{"n": 1}"#)).unwrap();
    let notes = dir.path().join("notes.txt");
    std::fs::write(&notes, "not a record\n").unwrap();
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();

    for path in [&notes, &empty] {
        assert!(
            matches!(
                Staging::read_file(path),
                Err(StoreError::NotStagingFile {
                    expected: "segment",
                    ..
                })
            ),
            "{path:?}: {:?}",
            Staging::read_file(path)
        );
    }
    // A segment is not a dead letter, and a dead letter is not a segment.
    assert!(matches!(
        Staging::dead_letter(&staged.path),
        Err(StoreError::NotStagingFile {
            expected: "dead letter",
            ..
        })
    ));
    store.next_batch("db", 10).unwrap();
    let letter = store.dead("db", staged.seq, "refused").unwrap();
    assert!(matches!(
        Staging::read_file(&letter),
        Err(StoreError::NotStagingFile { .. })
    ));
}

#[test]
fn a_changed_line_is_damaged_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let staged = store.stage(rec("a", r#"{"n": 1}"#)).unwrap();
    let copy = edited_copy(&staged.path, &dir.path().join("changed.jsonl"), |text| {
        text.replace(r#""n":1"#, r#""n":7"#)
    });

    assert!(
        matches!(Staging::read_file(&copy), Err(StoreError::Damaged { .. })),
        "{:?}",
        Staging::read_file(&copy)
    );
}
