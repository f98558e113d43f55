//! HTTPS for the ingest API (`INGEST_TLS_CERT`, `INGEST_TLS_KEY`), and how this machine's own
//! commands (`estafeta status`, `estafeta update`, the update trial) reach an API served that
//! way. A module of its own below `config`, `ingest` and `update`, which all use it.
//!
//! - The listener: rustls with the project's provider ([`crate::tls::provider`]), ALPN
//!   `http/1.1` (the ingest server speaks HTTP/1.1 only), the certificate chain and key read
//!   once at start (a mistake stops the start with the file named).
//! - The local client connects to loopback, where the certificate's names (the machine's name
//!   on the hospital network) rarely hold: it trusts exactly the certificate in
//!   `INGEST_TLS_CERT` (the end-entity certificate, byte for byte) instead of a name. That is
//!   stronger than a CA check for this one server, and works whatever names the certificate
//!   holds.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use tokio_rustls::TlsAcceptor;

/// The TLS acceptor of the ingest listener.
pub fn acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    let crate::tls::Identity {
        chain,
        key: private,
    } = crate::tls::identity(cert, key)
        .context("the ingest API's certificate (INGEST_TLS_CERT, INGEST_TLS_KEY)")?;
    let mut config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .context("the TLS provider offers no protocol version")?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .with_context(|| {
            format!(
                "INGEST_TLS_KEY={} is not the private key of INGEST_TLS_CERT={} (or cannot be used)",
                key.display(),
                cert.display()
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The base URL and HTTP client this machine's commands use for the running agent's API at
/// `addr` (already made reachable: loopback for a wildcard bind): `https://` trusting only the
/// certificate in `tls_cert` when set, else `http://`.
pub fn local_client(
    addr: std::net::SocketAddr,
    tls_cert: Option<&Path>,
    timeout: std::time::Duration,
) -> anyhow::Result<(String, reqwest::Client)> {
    let builder = reqwest::Client::builder().no_proxy().timeout(timeout);
    match tls_cert {
        None => Ok((
            format!("http://{addr}"),
            builder.build().context("could not build the HTTP client")?,
        )),
        Some(cert) => Ok((
            format!("https://{addr}"),
            builder
                .use_preconfigured_tls(pinned(cert)?)
                .build()
                .context("could not build the HTTPS client")?,
        )),
    }
}

/// A client configuration that accepts only the first certificate of `cert_file`.
fn pinned(cert_file: &Path) -> anyhow::Result<rustls::ClientConfig> {
    let first = crate::tls::certificates(cert_file)
        .context("INGEST_TLS_CERT")?
        .remove(0);
    crate::tls::pinned_config(first)
}
