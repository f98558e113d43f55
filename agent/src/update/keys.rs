//! The ed25519 public keys release archives must be signed with (zipsign). Built in
//! ([`BUILTIN_PUBLIC_KEYS`], empty in this source tree: a release build sets it) and/or
//! configured with `UPDATE_PUBLIC_KEY`: base64 keys separated by commas, or the path of a file
//! holding them (base64 text, or the 32 raw bytes `zipsign gen-key` writes). Several keys allow a
//! rotation: an archive signed by any of them is accepted.
//!
//! With no key at all, updates are REFUSED: self_update's `verify_signature` returns success when
//! given no key, so [`verify`] checks that itself before calling it.

use std::path::Path;

use anyhow::{Context as _, bail};
use base64::Engine as _;

/// Keys built into this binary, base64, comma separated. Empty: only `UPDATE_PUBLIC_KEY` counts.
pub const BUILTIN_PUBLIC_KEYS: &str = "";

/// One ed25519 public key.
pub type Key = self_update::VerifyingKey;

/// Reads `UPDATE_PUBLIC_KEY`: base64 keys (comma separated) or a file holding them.
pub fn parse(text: &str, cwd: &Path) -> Result<Vec<Key>, String> {
    let text = text.trim();
    let path = cwd.join(text);
    if !text.is_empty() && path.is_file() {
        let bytes = std::fs::read(&path)
            .map_err(|err| format!("could not read the key file {}: {err}", path.display()))?;
        if bytes.len() == 32 {
            let mut key = [0u8; 32];
            key.copy_from_slice(&bytes);
            return Ok(vec![key]);
        }
        let text = String::from_utf8(bytes).map_err(|_| {
            format!(
                "the key file {} is neither 32 raw bytes nor base64 text",
                path.display()
            )
        })?;
        return parse_base64(&text);
    }
    parse_base64(text)
}

fn parse_base64(text: &str) -> Result<Vec<Key>, String> {
    let mut keys = Vec::new();
    for part in text
        .split([',', '\n'])
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(part)
            .map_err(|_| format!("{part:?} is not base64; expected an ed25519 public key (32 bytes, 44 base64 characters) or a key file's path"))?;
        let key: Key = bytes.try_into().map_err(|b: Vec<u8>| {
            format!(
                "{part:?} decodes to {} bytes; expected an ed25519 public key: 32 bytes, 44 base64 characters",
                b.len()
            )
        })?;
        keys.push(key);
    }
    Ok(keys)
}

/// The built-in keys followed by the configured ones.
pub fn all(configured: &[Key]) -> Vec<Key> {
    let mut keys = parse_base64(BUILTIN_PUBLIC_KEYS).unwrap_or_default();
    keys.extend_from_slice(configured);
    keys
}

/// Checks the archive's zipsign signature against `keys`; refuses when there is no key.
pub fn verify(archive: &Path, keys: &[Key]) -> anyhow::Result<()> {
    if keys.is_empty() {
        bail!(
            "no public key to check the release signature with, so the update is refused; set UPDATE_PUBLIC_KEY to the release signing key (base64, or the path of the .pub file `zipsign gen-key` wrote)"
        );
    }
    self_update::verify_signature(archive, keys).with_context(|| {
        format!(
            "the signature of {} does not match UPDATE_PUBLIC_KEY, so the update is refused; ask whoever publishes the releases which key signs them, and do not install this file",
            archive.file_name().unwrap_or_default().to_string_lossy()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_base64_or_files_and_none_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert_eq!(parse(&key, dir.path()).unwrap(), vec![[7u8; 32]]);
        assert_eq!(
            parse(&format!("{key}, {key}"), dir.path()).unwrap().len(),
            2
        );
        std::fs::write(dir.path().join("release.pub"), [9u8; 32]).unwrap();
        assert_eq!(parse("release.pub", dir.path()).unwrap(), vec![[9u8; 32]]);
        assert!(parse("not base64!", dir.path()).is_err());
        assert!(parse("AAAA", dir.path()).unwrap_err().contains("32"));
        let archive = dir.path().join("a.tar.gz");
        std::fs::write(&archive, b"anything").unwrap();
        let refused = verify(&archive, &[]).unwrap_err().to_string();
        assert!(refused.contains("UPDATE_PUBLIC_KEY"), "{refused}");
        assert!(verify(&archive, &[[7u8; 32]]).is_err());
    }
}
