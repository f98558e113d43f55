//! Patient data at rest (contract 7, safe by default): the staging folder is private whatever
//! existed before, and once every sink has a record and cleanup ran, its key and payload are in
//! no file under the folder — not in the index, its free pages or its WAL.

use estafeta_staging::*;
use std::path::Path;

const CANARY_KEY: &str = "MRN-CANARY-7f3a9c";
const CANARY_TEXT: &str = "Paciente Canario da Silva 5d81e2";

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
    loop {
        let batch = store.next_batch("db", 100).unwrap();
        if batch.is_empty() {
            break;
        }
        let seqs: Vec<u64> = batch.iter().map(|d| d.envelope.seq).collect();
        store.ack("db", &seqs).unwrap();
    }
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
