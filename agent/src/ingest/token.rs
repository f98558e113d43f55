//! New ingest tokens: 32 bytes from the operating system's random source, as 64 lowercase hex
//! characters (twice [`crate::config::MIN_INGEST_TOKEN_CHARS`], and safe in an env file and an
//! `Authorization` header). `estafeta token` prints one; the Windows service writes one into
//! its data folder at first start (`crate::winservice`); the .deb's postinst makes the same
//! kind from `/dev/urandom`.

use std::io::Write as _;
use std::path::Path;

use anyhow::Context as _;

/// Random bytes in a token.
pub const TOKEN_BYTES: usize = 32;
/// The file, beside the env file, where packaged installs keep the token
/// (`INGEST_TOKEN_FILE`).
pub const TOKEN_FILE_NAME: &str = "ingest-token";

/// A new random token.
pub fn generate() -> anyhow::Result<String> {
    let mut bytes = [0u8; TOKEN_BYTES];
    getrandom::fill(&mut bytes)
        .map_err(|err| anyhow::anyhow!("{err}"))
        .context("the operating system gave no random bytes for a token")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes a new token to `path` when no file is there (an existing one, however written, is
/// kept: clients already hold it). Returns whether it wrote one. On Unix the file is 0600; on
/// Windows it takes the access list of its folder, which the service narrows to SYSTEM and
/// Administrators. Written beside under a temporary name and moved into place, so a crash never
/// leaves a half-written token.
pub fn write_if_missing(path: &Path) -> anyhow::Result<bool> {
    if path.exists() {
        return Ok(false);
    }
    let token = generate()?;
    let tmp = path.with_extension("new");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options
        .open(&tmp)
        .with_context(|| format!("could not write {}", tmp.display()))?;
    file.write_all(format!("{token}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("could not write {}", tmp.display()))?;
    drop(file);
    if path.exists() {
        let _ = std::fs::remove_file(&tmp);
        return Ok(false);
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("could not move {} into place", tmp.display()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_64_hex_characters_and_differ() {
        let a = generate().expect("token");
        let b = generate().expect("token");
        assert_eq!(a.len(), 2 * TOKEN_BYTES);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(a, b);
    }

    #[test]
    fn an_existing_token_file_is_kept() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(TOKEN_FILE_NAME);
        assert!(write_if_missing(&path).expect("write"));
        let first = std::fs::read_to_string(&path).expect("read");
        assert_eq!(first.trim().len(), 2 * TOKEN_BYTES);
        assert!(!write_if_missing(&path).expect("keep"));
        assert_eq!(std::fs::read_to_string(&path).expect("read"), first);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
