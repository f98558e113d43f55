//! The version this binary reports everywhere (`estafeta version`, `/v1/status`, the logs,
//! heartbeats, the self-update's "strictly newer" rule). It is read from a fixed 64-byte stamp
//! inside the executable, `ESTAFETA-VERSION-STAMP:<semver>` padded with NUL bytes, written at
//! compile time from `CARGO_PKG_VERSION`. Why a stamp and not only `env!`: a release pipeline (and
//! the self-update end-to-end test) can give an already-built, tested binary its release version
//! by rewriting those bytes, without recompiling it and its dependencies; the binary then really
//! reports that version. A stamp that does not hold a valid semver falls back to the compiled one.

use std::sync::OnceLock;

/// What starts the stamp; a patcher finds it followed by the compiled version and a NUL.
pub const STAMP_PREFIX: &str = "ESTAFETA-VERSION-STAMP:";
/// The stamp's size in bytes (prefix, version, NUL padding).
pub const STAMP_LEN: usize = 64;

const fn stamp() -> [u8; STAMP_LEN] {
    let mut out = [0u8; STAMP_LEN];
    let prefix = STAMP_PREFIX.as_bytes();
    let version = env!("CARGO_PKG_VERSION").as_bytes();
    assert!(prefix.len() + version.len() < STAMP_LEN);
    let mut i = 0;
    while i < prefix.len() {
        out[i] = prefix[i];
        i += 1;
    }
    let mut j = 0;
    while j < version.len() {
        out[i + j] = version[j];
        j += 1;
    }
    out
}

#[used]
static STAMP: [u8; STAMP_LEN] = stamp();

/// The version of this binary (the stamp's, else `CARGO_PKG_VERSION`).
pub fn current() -> &'static str {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION.get_or_init(|| {
        // black_box: the compiler must read the bytes in the file, not fold the constant.
        let stamp: &[u8; STAMP_LEN] = std::hint::black_box(&STAMP);
        parse_stamp(stamp).unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned())
    })
}

/// The version in a stamp, when it is valid semver.
pub fn parse_stamp(stamp: &[u8]) -> Option<String> {
    let rest = stamp.get(STAMP_PREFIX.len()..)?;
    let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
    let text = std::str::from_utf8(&rest[..end]).ok()?;
    semver::Version::parse(text).ok()?;
    Some(text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stamp_holds_the_compiled_version() {
        assert_eq!(current(), env!("CARGO_PKG_VERSION"));
        let mut patched = stamp();
        let at = STAMP_PREFIX.len();
        patched[at..].fill(0);
        patched[at..at + 5].copy_from_slice(b"9.8.7");
        assert_eq!(parse_stamp(&patched).as_deref(), Some("9.8.7"));
        patched[at..at + 5].copy_from_slice(b"x.y.z");
        assert_eq!(parse_stamp(&patched), None);
    }
}
