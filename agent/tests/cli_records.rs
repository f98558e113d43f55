//! The real `estafeta` binary on a real staging folder: `stage`, `ls --json`, `show`, `status`
//! and `retry` without `--send`. Nothing is delivered (no daemon runs), so records stay pending.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

/// A hermetic environment: a sink that is never contacted, no disk-space floor.
const ENV: &[(&str, &str)] = &[
    ("CENTRAL_DATABASE_URL", "sqlite://central.db"),
    ("STAGING_MIN_FREE_BYTES", "0"),
    ("LOG_LEVEL", "warn"),
];

fn estafeta(dir: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_estafeta"))
        .args(args)
        .current_dir(dir)
        .env_clear()
        .envs(ENV.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the estafeta binary runs");
    let mut input = child.stdin.take().expect("stdin is piped");
    if let Some(text) = stdin {
        // A command refusing its arguments may exit before reading stdin: a broken pipe then
        // is the child's choice, and its exit code and output are what the test checks.
        if let Err(err) = input.write_all(text.as_bytes()) {
            assert_eq!(
                err.kind(),
                std::io::ErrorKind::BrokenPipe,
                "write stdin: {err}"
            );
        }
    }
    drop(input);
    child
        .wait_with_output()
        .expect("the estafeta binary finishes")
}

fn ok(output: &Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(
        output.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn staged_records_are_listed_and_shown() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("patient.json");
    std::fs::write(&file, r#"{"id": "p-1", "name": "Ana"}"#).expect("write payload");

    let staged = ok(&estafeta(
        dir.path(),
        &[
            "stage",
            "create",
            "patient",
            file.to_str().expect("utf-8 path"),
        ],
        None,
    ));
    let fields: Vec<&str> = staged.trim().split('\t').collect();
    assert_eq!(fields.len(), 3, "id, seq, path: {staged}");
    let (id, seq) = (fields[0].to_owned(), fields[1].to_owned());

    let batch = ok(&estafeta(
        dir.path(),
        &["stage", "update", "patient", "-", "--key", "p-1"],
        Some(r#"[{"name": "Ana B."}, {"name": "Ana C."}]"#),
    ));
    assert_eq!(batch.lines().count(), 2, "{batch}");

    let listed = ok(&estafeta(dir.path(), &["ls", "--json"], None));
    let rows: Vec<Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(rows.len(), 3, "{listed}");
    assert_eq!(rows[0]["id"], id.as_str());
    assert_eq!(rows[0]["seq"].to_string(), seq);
    assert_eq!(rows[0]["action"], "create");
    assert_eq!(rows[0]["entity"], "patient");
    assert_eq!(rows[0]["key"], "p-1", "the key comes from the id field");
    assert_eq!(rows[0]["state"], "pending");
    for field in ["attempts", "last_error", "path"] {
        assert!(rows[0].get(field).is_some(), "{field} missing: {}", rows[0]);
    }
    assert!(
        rows.iter()
            .skip(1)
            .all(|r| r["key"] == "p-1" && r["action"] == "update")
    );

    let filtered = ok(&estafeta(
        dir.path(),
        &["ls", "--json", "--action", "update", "--limit", "1"],
        None,
    ));
    assert_eq!(filtered.lines().count(), 1, "{filtered}");

    let table = ok(&estafeta(dir.path(), &["ls"], None));
    assert!(table.starts_with("SEQ"), "{table}");
    assert_eq!(table.lines().count(), 4, "{table}");

    for target in [id.as_str(), seq.as_str()] {
        let shown: Value =
            serde_json::from_str(&ok(&estafeta(dir.path(), &["show", target], None)))
                .expect("show prints JSON");
        assert_eq!(shown["envelope"]["id"], id.as_str());
        assert_eq!(shown["envelope"]["payload"]["name"], "Ana");
        assert_eq!(shown["sinks"][0]["sink"], "database");
        assert_eq!(shown["sinks"][0]["state"], "pending");
    }

    let status: Value =
        serde_json::from_str(&ok(&estafeta(dir.path(), &["status", "--json"], None)))
            .expect("status --json prints JSON");
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["sinks"][0]["pending"], 3);

    let missing = estafeta(dir.path(), &["show", "no-such-record"], None);
    assert_eq!(missing.status.code(), Some(1));
}

#[test]
fn bad_input_to_stage_exits_2_and_stages_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (args, input) in [
        (vec!["stage", "create", "patient"], "not json"),
        (vec!["stage", "create", "patient"], r#"[{"id": 1}, 2]"#),
        (vec!["stage", "create", "Bad/Name"], r#"{"id": 1}"#),
    ] {
        let output = estafeta(dir.path(), &args, Some(input));
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?} {input}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let listed = ok(&estafeta(dir.path(), &["ls", "--json"], None));
    assert_eq!(listed, "", "nothing staged");
}

#[test]
fn retry_without_send_lists_nothing_when_there_are_no_dead_letters() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = ok(&estafeta(dir.path(), &["retry"], None));
    assert!(
        output.contains("0 dead letter(s) would be sent"),
        "{output}"
    );
}
