//! The release manifest: one small JSON document on any web server (a hospital intranet has no
//! GitHub), read with the self-update's client ([`super::http`]: `https://` unless it is this
//! machine or `UPDATE_ALLOW_HTTP=true`):
//!
//! ```json
//! {"version": "0.2.0",
//!  "assets": [{"target": "x86_64-unknown-linux-gnu", "kind": "binary",
//!              "url": "estafeta-0.2.0-x86_64-unknown-linux-gnu.tar.gz", "sha256": "…"}]}
//! ```
//!
//! Every asset is a zipsign-signed `.tar.gz`; `kind` says what it holds: `binary` (the
//! `estafeta` executable, for a plain install), `deb` (one `.deb`) or `msi` (one `.msi`). A
//! relative `url` is resolved against the manifest's folder. `sha256` is the archive's digest
//! (transport check, with a clearer error than a failed signature); the signature is the check
//! that matters. The manifest is not signed: its `version` is only a hint, which the archive's
//! signed `VERSION` must confirm ([`super::archive`]).

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

/// Largest manifest accepted, in bytes.
pub const MAX_MANIFEST_BYTES: u64 = 1024 * 1024;

/// What an asset holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AssetKind {
    Binary,
    Deb,
    Msi,
}

impl AssetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AssetKind::Binary => "binary",
            AssetKind::Deb => "deb",
            AssetKind::Msi => "msi",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub version: String,
    #[serde(default)]
    pub assets: Vec<Asset>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Asset {
    pub target: String,
    pub kind: AssetKind,
    pub url: String,
    pub sha256: String,
}

impl Manifest {
    /// Parses a manifest; `url` (where it was read) resolves relative asset URLs.
    pub fn parse(body: &[u8], url: &str) -> anyhow::Result<Manifest> {
        let mut manifest: Manifest = serde_json::from_slice(body).with_context(|| {
            format!("the release manifest at {url} is not the expected JSON ({{\"version\", \"assets\": [{{\"target\", \"kind\", \"url\", \"sha256\"}}]}})")
        })?;
        semver::Version::parse(&manifest.version).with_context(|| {
            format!(
                "the release manifest at {url} gives version {:?}, which is not semver (such as 1.2.3)",
                manifest.version
            )
        })?;
        for asset in &mut manifest.assets {
            asset.url = resolve(url, &asset.url);
            if asset.sha256.len() != 64 || !asset.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                bail!(
                    "the release manifest at {url}: asset {} has sha256 {:?}; expected 64 hex digits",
                    asset.url,
                    asset.sha256
                );
            }
        }
        Ok(manifest)
    }

    /// The asset for this target and kind.
    pub fn asset(&self, target: &str, kind: AssetKind) -> Option<&Asset> {
        self.assets
            .iter()
            .find(|a| a.target == target && a.kind == kind)
    }
}

/// An absolute http(s) URL as is; anything else relative to the manifest's folder.
fn resolve(manifest_url: &str, url: &str) -> String {
    if url.starts_with("http://") || url.starts_with("https://") {
        return url.to_owned();
    }
    match manifest_url.rfind('/') {
        Some(i) => format!("{}{}", &manifest_url[..=i], url.trim_start_matches('/')),
        None => url.to_owned(),
    }
}

/// Fetches and parses the manifest (blocking: call from a blocking task).
pub fn fetch(
    client: &super::http::Client,
    url: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<Manifest> {
    let body = client
        .get(url, MAX_MANIFEST_BYTES, timeout)
        .context("could not read the release manifest; check UPDATE_URL (and UPDATE_CA_FILE for an internal CA) and that the server answers")?;
    Manifest::parse(&body, url)
}

/// Whether `candidate` is strictly newer than `current` (semver order).
pub fn is_newer(current: &str, candidate: &str) -> bool {
    match (
        semver::Version::parse(current),
        semver::Version::parse(candidate),
    ) {
        (Ok(current), Ok(candidate)) => candidate > current,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assets_resolve_and_versions_compare() {
        let body = br#"{"version": "0.2.0", "assets": [
            {"target": "x86_64-unknown-linux-gnu", "kind": "binary", "url": "a.tar.gz", "sha256": "00000000000000000000000000000000000000000000000000000000000000ff"},
            {"target": "x86_64-unknown-linux-gnu", "kind": "deb", "url": "https://other/b.deb.tar.gz", "sha256": "00000000000000000000000000000000000000000000000000000000000000ff"}]}"#;
        let m = Manifest::parse(body, "http://h/rel/manifest.json").unwrap();
        let a = m
            .asset("x86_64-unknown-linux-gnu", AssetKind::Binary)
            .unwrap();
        assert_eq!(a.url, "http://h/rel/a.tar.gz");
        let b = m.asset("x86_64-unknown-linux-gnu", AssetKind::Deb).unwrap();
        assert_eq!(b.url, "https://other/b.deb.tar.gz");
        assert!(m.asset("x86_64-pc-windows-gnu", AssetKind::Msi).is_none());
        assert!(is_newer("0.1.0", "0.1.1"));
        assert!(!is_newer("0.1.0", "0.1.0"));
        assert!(!is_newer("0.2.0", "0.1.9"));
        assert!(Manifest::parse(br#"{"version": "latest"}"#, "x").is_err());
    }
}
