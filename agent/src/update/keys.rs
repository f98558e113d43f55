//! The ed25519 public keys release archives must be signed with (zipsign). Built in
//! ([`BUILTIN_PUBLIC_KEYS`], empty in this source tree: a release build sets it) and/or
//! configured with `UPDATE_PUBLIC_KEY`: base64 keys separated by commas, or the path of a file
//! holding them (base64 text, or the 32 raw bytes `zipsign gen-key` writes). Several keys allow a
//! rotation: an archive signed by any of them is accepted.
//!
//! With no key at all, updates are REFUSED ([`verify`] checks that first: self_update's
//! `verify_signature`, used before, returned success when given no key).

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

/// Checks the zipsign signature of the archive `bytes`, published as `name` (zipsign binds the
/// signature to the file name), against `keys`; refuses when there is no key. Returns the signed
/// part, the `.tar.gz` without its signature block: exactly the bytes the signature covers, so
/// what is unpacked is what was verified (never a file read again after the check).
pub fn verify(name: &str, bytes: &[u8], keys: &[Key]) -> anyhow::Result<Vec<u8>> {
    use std::io::Cursor;
    if keys.is_empty() {
        bail!(
            "no public key to check the release signature with, so the update is refused; set UPDATE_PUBLIC_KEY to the release signing key (base64, or the path of the .pub file `zipsign gen-key` wrote)"
        );
    }
    let refused = || {
        format!(
            "the signature of {name} does not match UPDATE_PUBLIC_KEY, so the update is refused; ask whoever publishes the releases which key signs them, and do not install this file"
        )
    };
    let keys = zipsign_api::verify::collect_keys(keys.iter().copied().map(Ok))
        .map_err(anyhow::Error::new)
        .with_context(refused)?;
    zipsign_api::verify::verify_tar(&mut Cursor::new(bytes), &keys, Some(name.as_bytes()))
        .map_err(anyhow::Error::new)
        .with_context(refused)?;
    let mut signed = Cursor::new(Vec::with_capacity(bytes.len()));
    zipsign_api::unsign::copy_and_unsign_tar(&mut Cursor::new(bytes), &mut signed)
        .map_err(anyhow::Error::new)
        .with_context(refused)?;
    Ok(signed.into_inner())
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
        let refused = verify("a.tar.gz", b"anything", &[])
            .unwrap_err()
            .to_string();
        assert!(refused.contains("UPDATE_PUBLIC_KEY"), "{refused}");
        let refused = format!(
            "{:#}",
            verify("a.tar.gz", b"anything", &[[7u8; 32]]).unwrap_err()
        );
        assert!(refused.contains("does not match"), "{refused}");
    }
}
