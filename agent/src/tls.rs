//! TLS for every connection the agent opens to a central system (PostgreSQL, MySQL/MariaDB,
//! NATS, HTTP) and for the ingest API: one place that loads certificates, builds rustls
//! configurations and says, for `check-config` and `/v1/status`, how a connection is protected.
//!
//! Rules shared by every sink (each driver maps its own URL parameters onto [`Verify`]):
//! - Trust: a CA file given by the user is the only trust anchor of that connection; without
//!   one, the operating system's trust store (where a hospital installs its internal CA) and
//!   the bundled Mozilla roots (`webpki-roots`, for a machine whose store is empty).
//! - Safe default: a host that is not loopback gets TLS verified against the host name unless
//!   the URL says otherwise ([`default_verify`]); clear text to such a host is allowed only
//!   when asked for, and logged as a WARN by the sink at start.
//! - rustls with the `ring` provider (already linked through reqwest and async-nats): no
//!   OpenSSL, the same behaviour on Debian and Windows.

use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientConfig, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::Serialize;

/// How much of the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Chain to a trusted root and the host name (libpq `verify-full`, MySQL `VERIFY_IDENTITY`,
    /// NATS `tls://`, HTTPS).
    Full,
    /// Chain to a trusted root, any host name (libpq `verify-ca`, MySQL `VERIFY_CA`).
    ChainOnly,
    /// Encrypted, certificate not checked (libpq `require`, MySQL `REQUIRED`): protects against
    /// someone listening, not against someone in the middle.
    Nothing,
}

/// The client's own certificate and key, for servers that authenticate clients by certificate.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// The rustls provider every connection uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Whether `host` (a name, an IP address with or without brackets, or a Unix socket folder)
/// never leaves this machine. Only such hosts may default to clear text.
pub fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.starts_with('/') || host.starts_with('@') {
        // No host (the driver's Unix socket) or a socket path.
        return true;
    }
    if host.eq_ignore_ascii_case("localhost") || host.to_ascii_lowercase().ends_with(".localhost") {
        return true;
    }
    host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The verification a connection gets when its URL does not say: [`Verify::Full`] beyond
/// loopback, `None` (the driver's own default, clear text allowed) on loopback.
pub fn default_verify(host: &str) -> Option<Verify> {
    (!is_loopback(host)).then_some(Verify::Full)
}

/// Reads every certificate of a PEM file (a CA bundle or a certificate chain).
pub fn certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read the certificate file {}", path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} is not a PEM certificate file", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!(
            "{} holds no certificate (expected PEM blocks \"-----BEGIN CERTIFICATE-----\")",
            path.display()
        );
    }
    Ok(certs)
}

/// Reads a client certificate chain and its private key (PEM: PKCS#8, PKCS#1 or SEC1).
pub fn identity(cert: &Path, key: &Path) -> anyhow::Result<Identity> {
    let chain = certificates(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|err| {
        anyhow::anyhow!(
            "cannot read the private key {}: {err}; expected a PEM private key",
            key.display()
        )
    })?;
    Ok(Identity { chain, key })
}

/// The roots a connection trusts: only `ca_file`'s certificates when given, else the
/// operating system's store plus the bundled Mozilla roots.
pub fn roots(ca_file: Option<&Path>) -> anyhow::Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in certificates(path)? {
                store.add(cert).with_context(|| {
                    format!(
                        "{} holds a certificate rustls cannot use as a CA",
                        path.display()
                    )
                })?;
            }
        }
        None => {
            // A store that cannot be read in part still gives the certificates it could read;
            // the bundled roots are always there.
            let native = rustls_native_certs::load_native_certs();
            for err in &native.errors {
                tracing::debug!(error = %err, "Skipping part of the system trust store.");
            }
            store.add_parsable_certificates(native.certs);
            store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
    }
    Ok(store)
}

/// A rustls client configuration for one connection.
pub fn client_config(
    verify: Verify,
    ca_file: Option<&Path>,
    identity: Option<Identity>,
) -> anyhow::Result<ClientConfig> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .context("the TLS provider offers no protocol version")?;
    let verifier: Arc<dyn ServerCertVerifier> = match verify {
        Verify::Full | Verify::ChainOnly => {
            let full = WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots(ca_file)?),
                Arc::clone(&provider),
            )
            .build()
            .context("cannot build the certificate verifier")?;
            if verify == Verify::Full {
                full
            } else {
                Arc::new(ChainOnly(full))
            }
        }
        Verify::Nothing => Arc::new(Unchecked {
            provider,
            only: None,
        }),
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match identity {
        Some(Identity { chain, key }) => builder
            .with_client_auth_cert(chain, key)
            .context("the client certificate and key do not match or cannot be used")?,
        None => builder.with_no_client_auth(),
    };
    Ok(config)
}

/// libpq's `verify-ca`: the chain must reach a trusted root; the name is not compared.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A client configuration that accepts exactly one certificate, byte for byte, whatever its
/// names and issuer: for this machine's commands talking to the agent's own HTTPS API on
/// loopback, where the certificate names the machine on the network (see `api_tls`).
pub fn pinned_config(only: CertificateDer<'static>) -> anyhow::Result<ClientConfig> {
    let provider = provider();
    Ok(ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .context("the TLS provider offers no protocol version")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Unchecked {
            provider,
            only: Some(only),
        }))
        .with_no_client_auth())
}

/// libpq's `require`: any certificate (or, pinned, exactly `only`); the handshake's signatures
/// are still checked, so the session is encrypted to whoever holds the certificate's key.
#[derive(Debug)]
struct Unchecked {
    provider: Arc<CryptoProvider>,
    only: Option<CertificateDer<'static>>,
}

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.only {
            Some(only) if only.as_ref() != end_entity.as_ref() => Err(rustls::Error::General(
                "the server answered with a certificate other than the one expected (another program on that address?)".into(),
            )),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// How a sink's connection is protected, for `check-config`, `status` and `/v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Transport {
    /// Encrypted with TLS.
    pub tls: bool,
    /// The server's certificate was checked against trusted roots (and, with `verify-full` /
    /// `VERIFY_IDENTITY` / `tls://` / HTTPS, its name).
    pub verified: bool,
    /// The setting that decided it, as the user wrote it or as the default chose it, e.g.
    /// `sslmode=verify-full (default beyond loopback)`, `ssl-mode=DISABLED`, `tls://`,
    /// `https, verify_tls=false`, `local file`.
    pub setting: String,
    /// `true` once a connection was made with this protection; `false` while it is only
    /// what the settings ask for (`sslmode=prefer` may still end in clear text).
    pub observed: bool,
}

impl Transport {
    pub fn clear(setting: impl Into<String>) -> Self {
        Self {
            tls: false,
            verified: false,
            setting: setting.into(),
            observed: false,
        }
    }

    pub fn tls(verify: Verify, setting: impl Into<String>) -> Self {
        Self {
            tls: true,
            verified: verify != Verify::Nothing,
            setting: setting.into(),
            observed: false,
        }
    }

    /// What the settings cannot tell (an ODBC driver whose encryption lives in its own
    /// configuration file): `setting` says where to look.
    pub fn unknown(setting: impl Into<String>) -> Self {
        Self::clear(format!("{UNKNOWN}{}", setting.into()))
    }

    /// A local file (SQLite): nothing crosses a network.
    pub fn local() -> Self {
        Self::clear("local file")
    }

    /// For `/v1/status`: the fields and the line a person reads.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "tls": self.tls,
            "verified": self.verified,
            "setting": self.setting,
            "observed": self.observed,
            "description": self.describe(),
        })
    }

    /// One line: `TLS, verified (sslmode=verify-full)`, `clear text (sslmode=disable)`.
    pub fn describe(&self) -> String {
        if let Some(where_) = self.setting.strip_prefix(UNKNOWN) {
            return format!("encryption not known ({where_})");
        }
        let what = match (self.tls, self.verified) {
            (true, true) => "TLS, verified",
            (true, false) => "TLS, NOT verified",
            (false, _) if self.setting == "local file" => "no network",
            (false, _) => "clear text",
        };
        let when = if self.observed {
            ""
        } else {
            ", not yet connected"
        };
        format!("{what} ({}{when})", self.setting)
    }
}

/// The start of [`Transport::setting`] when the settings cannot tell.
const UNKNOWN: &str = "unknown: ";

/// What a sink last connected with, shared between its connection code and its status.
#[derive(Debug)]
pub struct Observed {
    configured: Transport,
    last: Mutex<Option<Transport>>,
}

impl Observed {
    pub fn new(configured: Transport) -> Self {
        Self {
            configured,
            last: Mutex::new(None),
        }
    }

    /// Records what a connection just negotiated (e.g. `prefer` ended in clear text).
    pub fn connected(&self, tls: bool, verified: bool) {
        let mut seen = self.configured.clone();
        seen.tls = tls;
        seen.verified = tls && verified;
        seen.observed = true;
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(seen);
    }

    /// The last connection's protection, or the configured one before any connection.
    pub fn transport(&self) -> Transport {
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| self.configured.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_recognised_and_others_are_not() {
        for host in [
            "localhost",
            "127.0.0.1",
            "127.8.9.10",
            "::1",
            "[::1]",
            "",
            "/var/run/postgresql",
            "db.localhost",
        ] {
            assert!(is_loopback(host), "{host:?} is loopback");
        }
        for host in [
            "db.hospital.local",
            "10.0.0.5",
            "192.168.1.2",
            "::2",
            "localhost.evil.com",
            "0.0.0.0",
        ] {
            assert!(!is_loopback(host), "{host:?} is not loopback");
            assert_eq!(default_verify(host), Some(Verify::Full));
        }
        assert_eq!(default_verify("127.0.0.1"), None);
    }

    #[test]
    fn a_missing_or_empty_ca_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.pem");
        let err = format!("{:#}", roots(Some(&missing)).unwrap_err());
        assert!(err.contains("cannot read the certificate file"), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = format!("{:#}", roots(Some(&empty)).unwrap_err());
        assert!(err.contains("holds no certificate"), "{err}");
    }

    #[test]
    fn the_default_roots_are_never_empty() {
        assert!(!roots(None).unwrap().is_empty());
        for verify in [Verify::Full, Verify::ChainOnly, Verify::Nothing] {
            client_config(verify, None, None).unwrap();
        }
    }

    #[test]
    fn a_transport_says_what_it_is() {
        let t = Transport::tls(Verify::Full, "sslmode=verify-full");
        assert_eq!(
            t.describe(),
            "TLS, verified (sslmode=verify-full, not yet connected)"
        );
        let seen = Observed::new(Transport::tls(Verify::Full, "sslmode=prefer"));
        seen.connected(false, false);
        assert_eq!(seen.transport().describe(), "clear text (sslmode=prefer)");
        assert_eq!(
            Transport::local().describe(),
            "no network (local file, not yet connected)"
        );
    }
}
