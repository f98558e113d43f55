//! A release server for the self-update tests: an in-process HTTP server on 127.0.0.1 serving
//! a manifest and zipsign-signed `.tar.gz` archives ([`ReleaseServer`]), plus what a release
//! pipeline does: stamp a built binary with a newer version ([`restamp`]), pack and sign an
//! archive with its signed `VERSION` file ([`release_archive`]; [`signed_archive`] packs any
//! files, such as an archive published before versions were signed), and a test CA with a
//! certificate for 127.0.0.1 ([`test_certificates`]) for an HTTPS release server.

use std::collections::HashMap;
use std::io::{Cursor, Write as _};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use sha2::Digest as _;
use zipsign_api::SigningKey;

/// What starts the version stamp inside the `estafeta` binary (agent/src/version.rs).
pub const STAMP_PREFIX: &[u8] = b"ESTAFETA-VERSION-STAMP:";

/// The running machine's Rust target, as the agent's self_update names it.
pub fn host_target() -> String {
    format!("{}-unknown-linux-gnu", std::env::consts::ARCH)
}

/// A version before `version`: patch − 1, or the previous minor's `.999`, or the previous major's
/// `.999.999`.
pub fn previous_version(version: &str) -> String {
    let parts: Vec<u64> = version
        .split('.')
        .map(|p| p.parse().expect("a numeric version"))
        .collect();
    match (parts[0], parts[1], parts[2]) {
        (major, minor, patch) if patch > 0 => format!("{major}.{minor}.{}", patch - 1),
        (major, minor, _) if minor > 0 => format!("{major}.{}.999", minor - 1),
        (major, _, _) => format!("{}.999.999", major - 1),
    }
}

/// The version after `version` (patch + 1).
pub fn next_patch(version: &str) -> String {
    let mut parts: Vec<u64> = version
        .split('.')
        .map(|p| p.parse().expect("a numeric version"))
        .collect();
    parts[2] += 1;
    format!("{}.{}.{}", parts[0], parts[1], parts[2])
}

/// A copy of `binary` whose version stamp says `new` instead of `old`: the same, tested build,
/// reporting the release's version, as a release pipeline stamps it.
///
/// # Panics
/// When the stamp with `old` is not found exactly once.
pub fn restamp(binary: &[u8], old: &str, new: &str) -> Vec<u8> {
    let mut needle = STAMP_PREFIX.to_vec();
    needle.extend_from_slice(old.as_bytes());
    needle.push(0);
    let hits: Vec<usize> = binary
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle.as_slice())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "the version stamp {old} appears {} times",
        hits.len()
    );
    assert!(new.len() + STAMP_PREFIX.len() < 64);
    let mut out = binary.to_vec();
    let at = hits[0] + STAMP_PREFIX.len();
    out[at..at + 64 - STAMP_PREFIX.len()].fill(0);
    out[at..at + new.len()].copy_from_slice(new.as_bytes());
    out
}

/// A signing key from a seed byte (reproducible test keys).
pub fn signing_key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// The public key of `key`, base64 (the `UPDATE_PUBLIC_KEY` format).
pub fn public_key_base64(key: &SigningKey) -> String {
    base64::engine::general_purpose::STANDARD.encode(key.verifying_key().to_bytes())
}

/// A `.tar.gz` holding `files` (name, bytes, mode), signed by `key` for the file name `name`
/// (zipsign binds the signature to it).
pub fn signed_archive(name: &str, files: &[(&str, &[u8], u32)], key: &SigningKey) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    {
        let mut tar = tar::Builder::new(&mut gz);
        for (file, bytes, mode) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(*mode);
            header.set_cksum();
            tar.append_data(&mut header, file, *bytes)
                .expect("adding to the tar");
        }
        tar.finish().expect("finishing the tar");
    }
    gz.flush().expect("flushing the gzip stream");
    let unsigned = gz.finish().expect("finishing the gzip stream");
    let mut signed = Cursor::new(Vec::new());
    zipsign_api::sign::copy_and_sign_tar(
        &mut Cursor::new(unsigned),
        &mut signed,
        std::slice::from_ref(key),
        Some(name.as_bytes()),
    )
    .expect("signing the archive");
    signed.into_inner()
}

/// What a release pipeline publishes: `files` and a `VERSION` file saying `version`, at the top
/// of a `.tar.gz` signed by `key` for the file name `name`. The agent takes the version from
/// that signed file, never from the (unsigned) manifest.
pub fn release_archive(
    name: &str,
    version: &str,
    files: &[(&str, &[u8], u32)],
    key: &SigningKey,
) -> Vec<u8> {
    let version_file = format!("{version}\n");
    let mut all: Vec<(&str, &[u8], u32)> = vec![("VERSION", version_file.as_bytes(), 0o644)];
    all.extend_from_slice(files);
    signed_archive(name, &all, key)
}

/// A CA and a certificate for 127.0.0.1 signed by it, in `dir`: `ca.pem`, `server.pem`,
/// `server.key` ([`crate::pki`]).
///
/// # Panics
/// When openssl is missing or fails.
pub fn test_certificates(dir: &std::path::Path) {
    crate::pki::Pki::new(dir, "ca").server("server");
}

/// The lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

type Files = Arc<Mutex<HashMap<String, Vec<u8>>>>;
/// Requests answered with a file, by path.
type Served = Arc<Mutex<HashMap<String, usize>>>;

/// Serves files by path (404 for the rest) on 127.0.0.1. Dropping it stops it.
pub struct ReleaseServer {
    addr: SocketAddr,
    files: Files,
    served: Served,
    task: tokio::task::JoinHandle<()>,
}

impl ReleaseServer {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the release server");
        let addr = listener.local_addr().expect("its address");
        let files: Files = Arc::default();
        let served: Served = Arc::default();
        let app = Router::new()
            .fallback(serve)
            .with_state((files.clone(), served.clone()));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        ReleaseServer {
            addr,
            files,
            served,
            task,
        }
    }

    /// How many times `/<path>` was served (downloads of an archive, checks of the manifest).
    pub fn served(&self, path: &str) -> usize {
        let served = self.served.lock().unwrap();
        served.get(&format!("/{path}")).copied().unwrap_or(0)
    }

    /// `http://127.0.0.1:<port>/<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{path}", self.addr)
    }

    /// Serves `bytes` at `/<path>` from now on.
    pub fn put(&self, path: &str, bytes: Vec<u8>) {
        self.files.lock().unwrap().insert(format!("/{path}"), bytes);
    }

    /// Publishes `version` with one binary asset (archive bytes, served beside the manifest).
    pub fn publish_binary(&self, version: &str, archive_name: &str, archive: Vec<u8>) {
        let manifest = serde_json::json!({
            "version": version,
            "assets": [{
                "target": host_target(),
                "kind": "binary",
                "url": archive_name,
                "sha256": sha256_hex(&archive),
            }],
        });
        self.put(archive_name, archive);
        self.put("manifest.json", manifest.to_string().into_bytes());
    }
}

impl Drop for ReleaseServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(State((files, served)): State<(Files, Served)>, uri: Uri) -> Response {
    match files.lock().unwrap().get(uri.path()) {
        Some(bytes) => {
            *served
                .lock()
                .unwrap()
                .entry(uri.path().to_owned())
                .or_default() += 1;
            bytes.clone().into_response()
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}
