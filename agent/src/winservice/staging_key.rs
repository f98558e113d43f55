//! The staging key of a packaged Windows install: `staging.key` beside the env file, which the
//! MSI's template names with `STAGING_KEY_FILE`, written by the service at its first start (the
//! MSI cannot run our code at install, so the first start is the install's last step). The
//! file is protected with DPAPI in machine scope (estafeta-staging's key_protect.rs) and
//! inherits the data folder's narrowed access list, because it is written after the narrowing.
//!
//! A key is made only when none is there and the staging folder holds nothing sealed
//! (`_state/sealed-with`): a lost key is never papered over with a new one; the agent then
//! refuses to start and names the key id it needs.

use std::path::{Path, PathBuf};

use estafeta_staging::Keyring;

/// The key file's name in the data folder.
pub const KEY_FILE_NAME: &str = "staging.key";

/// What [`prepare`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum StagingKey {
    Made(PathBuf),
    Kept,
    /// The folder holds sealed data and the key is missing: nothing was written.
    Missing(PathBuf),
}

/// Makes `<data>/staging.key` when missing and nothing in `<data>/staging` is sealed.
pub fn prepare(data_dir: &Path) -> anyhow::Result<StagingKey> {
    let path = data_dir.join(KEY_FILE_NAME);
    if path.exists() {
        return Ok(StagingKey::Kept);
    }
    if data_dir
        .join("staging")
        .join("_state")
        .join("sealed-with")
        .exists()
    {
        return Ok(StagingKey::Missing(path));
    }
    Keyring::generate()
        .save(&path, false)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(StagingKey::Made(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_made_once_and_never_over_sealed_data() {
        let dir = tempfile::tempdir().expect("temp dir");
        let made = prepare(dir.path()).expect("prepare");
        let path = dir.path().join(KEY_FILE_NAME);
        assert_eq!(made, StagingKey::Made(path.clone()));
        let first = std::fs::read(&path).expect("key");
        Keyring::load(&path).expect("a key file the agent opens");
        assert_eq!(prepare(dir.path()).expect("again"), StagingKey::Kept);
        assert_eq!(std::fs::read(&path).expect("key"), first, "never replaced");

        // The key is lost but the folder holds sealed data: no new key.
        std::fs::remove_file(&path).expect("remove");
        let state = dir.path().join("staging").join("_state");
        std::fs::create_dir_all(&state).expect("state");
        std::fs::write(
            state.join("sealed-with"),
            r#"{"keys":["k-0011223344556677"]}"#,
        )
        .expect("marker");
        assert_eq!(
            prepare(dir.path()).expect("prepare"),
            StagingKey::Missing(path.clone())
        );
        assert!(!path.exists());
    }
}
