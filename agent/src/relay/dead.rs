//! The relay's dead letters: a message the database refused for good (a constraint, a type,
//! apply mode's missing field) or that is not an Estafeta record is written, whole and with
//! the reason, to one JSON file in `RELAY_DEAD_LETTER_DIR` before it is acknowledged. It holds
//! patient data: the folder is 0700 and each file 0600 (Unix), whatever the umask, and the file
//! is fsync'd before the message is acknowledged, since the stream may then drop it.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde_json::json;

/// What is known of one refused message.
pub(super) struct DeadLetter<'a> {
    pub stream: &'a str,
    pub stream_seq: u64,
    pub subject: &'a str,
    /// The record id, when the body could be read.
    pub id: Option<&'a str>,
    /// The whole reason (may quote the payload: it stays in this file).
    pub reason: &'a str,
    pub payload: &'a [u8],
}

/// Writes `letter` under `dir` as `<stream>-<stream seq, 20 digits>.json` (names sort in stream
/// order); returns the file's path.
pub(super) fn write(dir: &Path, letter: &DeadLetter<'_>) -> std::io::Result<PathBuf> {
    create_private_dir(dir)?;
    let path = dir.join(format!("{}-{:020}.json", letter.stream, letter.stream_seq));
    let body = match serde_json::from_slice::<serde_json::Value>(letter.payload) {
        Ok(value) => value,
        Err(_) => json!(String::from_utf8_lossy(letter.payload)),
    };
    let text = serde_json::to_vec_pretty(&json!({
        "stream": letter.stream,
        "stream_seq": letter.stream_seq,
        "subject": letter.subject,
        "id": letter.id,
        "reason": letter.reason,
        "message": body,
    }))
    .map_err(std::io::Error::other)?;
    let tmp = path.with_extension("json.tmp");
    let mut file = private_file(&tmp)?;
    file.write_all(&text)?;
    file.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    // The rename is durable only once the folder is.
    std::fs::File::open(dir)?.sync_all()?;
    Ok(path)
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    // A folder that existed before keeps its mode otherwise.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}

#[cfg(unix)]
fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_is_private_and_names_its_reason() {
        let dir = tempfile::tempdir().expect("temp dir");
        let folder = dir.path().join("dead");
        let path = write(
            &folder,
            &DeadLetter {
                stream: "ESTAFETA",
                stream_seq: 42,
                subject: "estafeta.patient.create",
                id: Some("id-1"),
                reason: "PostgreSQL 23514 check violation",
                payload: br#"{"id":"id-1"}"#,
            },
        )
        .expect("written");
        assert!(path.ends_with("ESTAFETA-00000000000000000042.json"));
        let text = std::fs::read_to_string(&path).expect("readable");
        assert!(
            text.contains("23514") && text.contains("\"id-1\""),
            "{text}"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode =
                |p: &Path| std::fs::metadata(p).expect("exists").permissions().mode() & 0o777;
            assert_eq!((mode(&folder), mode(&path)), (0o700, 0o600));
        }
    }
}
