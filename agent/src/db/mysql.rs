//! Connecting to MySQL / MariaDB, with TLS: the one place the MySQL sink, the SQL sources and
//! `estafeta fleet` turn a `mysql://` / `mariadb://` URL into a connection.
//!
//! The URL takes the MySQL client's TLS options (`ssl-mode`, `ssl-ca`, `ssl-cert`, `ssl-key`;
//! `ssl_mode` and the other underscore spellings too). They are taken out of the URL before
//! mysql_async parses the rest, and mapped onto [`crate::tls`]'s rules:
//! - `DISABLED` clear text; `PREFERRED` TLS when the server offers it, else clear text (the
//!   connection is then recorded as clear); `REQUIRED` TLS, certificate not checked;
//!   `VERIFY_CA` TLS, chain checked; `VERIFY_IDENTITY` TLS, chain and host name checked.
//! - No `ssl-mode`: `VERIFY_IDENTITY` beyond loopback (or whenever `ssl-ca` is given),
//!   `PREFERRED` on loopback (the MySQL client's default).
//! - mysql_async's own `require_ssl`, `verify_ca`, `verify_identity` and `built_in_roots` are
//!   refused with a message naming `ssl-mode`: one way to say it, and never the driver's
//!   unverified defaults by accident.
//!
//! Two gaps of mysql_async 0.36 are closed here:
//! - Its rustls verifier skips the name check by looking for "NotValidForName" in the error
//!   text, which rustls 0.23 no longer writes, so its `skip_domain_validation` never skips.
//!   `VERIFY_CA` therefore connects once with the full check; when only the name fails (the
//!   chain was checked first), it connects again verifying against a name the certificate holds,
//!   which is still the chain check `VERIFY_CA` asks for. The name is remembered.
//! - Its client keys must be PKCS#1 RSA; a PKCS#8 RSA key (what `openssl req -newkey rsa`
//!   writes) is unwrapped to PKCS#1 here. EC keys cannot be used by the driver: a clear error.
//!
//! Trust: `ssl-ca` is the only anchor when given; else the operating system's store (handed
//! to the driver as DER certificates) plus the bundled Mozilla roots, as [`crate::tls::roots`].

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context as _;
use mysql_async::prelude::Queryable as _;
use mysql_async::{ClientIdentity, Conn, Opts, OptsBuilder, SslOpts};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::redact::{self, Secrets};
use crate::tls::{self, Transport, Verify};

/// The MySQL client's `--ssl-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SslMode {
    Disabled,
    Preferred,
    Required,
    VerifyCa,
    VerifyIdentity,
}

impl SslMode {
    fn parse(value: &str) -> Option<Self> {
        Some(
            match value.to_ascii_uppercase().replace('-', "_").as_str() {
                "DISABLED" => Self::Disabled,
                "PREFERRED" => Self::Preferred,
                "REQUIRED" => Self::Required,
                "VERIFY_CA" => Self::VerifyCa,
                "VERIFY_IDENTITY" => Self::VerifyIdentity,
                _ => return None,
            },
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Disabled => "DISABLED",
            Self::Preferred => "PREFERRED",
            Self::Required => "REQUIRED",
            Self::VerifyCa => "VERIFY_CA",
            Self::VerifyIdentity => "VERIFY_IDENTITY",
        }
    }

    /// The certificate check, for modes that use TLS.
    fn verify(self) -> Option<Verify> {
        match self {
            Self::Disabled => None,
            Self::Preferred | Self::Required => Some(Verify::Nothing),
            Self::VerifyCa => Some(Verify::ChainOnly),
            Self::VerifyIdentity => Some(Verify::Full),
        }
    }
}

/// mysql_async's own TLS parameters, refused (module documentation).
const DRIVER_TLS_PARAMS: &[&str] = &[
    "require_ssl",
    "verify_ca",
    "verify_identity",
    "built_in_roots",
];

/// A MySQL server and how to reach it: parsed once, connected many times.
pub struct MysqlTarget {
    /// Without TLS: `DISABLED`, and `PREFERRED` against a server without TLS.
    clear: Opts,
    /// With TLS (every mode but `DISABLED`). One `Opts` keeps mysql_async's TLS connector
    /// (built once per `SslOpts`) across connections.
    secure: Option<Opts>,
    /// `VERIFY_CA`: the options verifying against a name the server's certificate holds.
    by_name: Mutex<Option<Opts>>,
    mode: SslMode,
    /// How the mode was chosen, for [`Transport::setting`].
    setting: String,
    ca: Option<PathBuf>,
    has_identity: bool,
    host: String,
    shown: String,
    secrets: Secrets,
    warnings: Vec<String>,
}

/// Why a connection could not be made.
#[derive(Debug)]
pub enum ConnectError {
    /// The driver's error (the server's, or the network's), for the caller to word.
    Driver(mysql_async::Error),
    /// A TLS problem, worded with what to do next.
    Tls(String),
}

impl MysqlTarget {
    /// Parses `url` (checking the TLS files: a missing `ssl-ca` is an error here, at start).
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let shown = redact::url(url);
        let secrets = Secrets::of(url);
        // mysql_async knows only `mysql://`; `mariadb://` is the same protocol.
        let url = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("mariadb") => {
                format!("mysql://{rest}")
            }
            _ => url.to_owned(),
        };
        let (rest, tls_params) = take_tls_params(&url, &shown)?;
        let opts = Opts::from_url(&rest).map_err(|err| {
            anyhow::anyhow!(
                "the MySQL URL {shown:?} is not valid: {}; expected mysql://user:password@host:3306/database",
                secrets.scrub(&err.to_string())
            )
        })?;
        let host = opts.ip_or_hostname().to_owned();
        let get = |key: &str| {
            tls_params
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        let ca = get("ssl-ca").map(PathBuf::from);
        let (mode, setting) = match get("ssl-mode") {
            Some(value) => {
                let mode = SslMode::parse(value).ok_or_else(|| {
                    anyhow::anyhow!(
                        "ssl-mode={value} in the MySQL URL {shown} is not a mode; use DISABLED, PREFERRED, REQUIRED, VERIFY_CA or VERIFY_IDENTITY"
                    )
                })?;
                (mode, format!("ssl-mode={}", mode.name()))
            }
            None if ca.is_some() => (
                SslMode::VerifyIdentity,
                "ssl-mode=VERIFY_IDENTITY (default with ssl-ca)".to_owned(),
            ),
            None => match tls::default_verify(&host) {
                Some(_) => (
                    SslMode::VerifyIdentity,
                    "ssl-mode=VERIFY_IDENTITY (default beyond loopback)".to_owned(),
                ),
                None => (
                    SslMode::Preferred,
                    "ssl-mode=PREFERRED (default on loopback)".to_owned(),
                ),
            },
        };
        let mut warnings = Vec::new();
        if mode == SslMode::Disabled && !tls::is_loopback(&host) {
            warnings.push(format!(
                "ssl-mode=DISABLED: records go to {shown} in clear text across the network; use ssl-mode=VERIFY_IDENTITY (the default) unless the network itself is protected"
            ));
        }
        if ca.is_some() && mode < SslMode::VerifyCa {
            warnings.push(format!(
                "ssl-ca is not used with ssl-mode={} ({shown}): no certificate is checked; use ssl-mode=VERIFY_CA or VERIFY_IDENTITY to check it",
                mode.name()
            ));
        }
        let identity = match (get("ssl-cert"), get("ssl-key")) {
            (Some(cert), Some(key)) => Some(client_identity(Path::new(cert), Path::new(key))?),
            (None, None) => None,
            (Some(_), None) | (None, Some(_)) => anyhow::bail!(
                "the MySQL URL {shown} gives only one of ssl-cert and ssl-key; a client certificate needs both"
            ),
        };
        let has_identity = identity.is_some();
        let secure = match mode.verify() {
            None => None,
            Some(verify) => {
                let mut ssl = SslOpts::default().with_client_identity(identity);
                ssl = match verify {
                    // The name check is made by connecting again (module documentation).
                    Verify::Full | Verify::ChainOnly => ssl,
                    Verify::Nothing => ssl.with_danger_accept_invalid_certs(true),
                };
                ssl = match (&ca, verify) {
                    (Some(ca), Verify::Full | Verify::ChainOnly) => {
                        let certs = tls::certificates(ca)
                            .with_context(|| format!("ssl-ca in the MySQL URL {shown}"))?;
                        ssl.with_root_certs(der_buffers(certs).map(Into::into).collect())
                            .with_disable_built_in_roots(true)
                    }
                    // The bundled roots stay on in the driver; the system's are added.
                    (None, Verify::Full | Verify::ChainOnly) => ssl.with_root_certs(
                        der_buffers(system_certificates()).map(Into::into).collect(),
                    ),
                    (_, Verify::Nothing) => ssl,
                };
                // A Unix socket would silently carry the session without TLS.
                let prefer_socket = mode == SslMode::Preferred;
                Some(Opts::from(
                    OptsBuilder::from_opts(opts.clone())
                        .ssl_opts(ssl)
                        .prefer_socket(prefer_socket),
                ))
            }
        };
        Ok(Self {
            clear: opts,
            secure,
            by_name: Mutex::new(None),
            mode,
            setting,
            ca,
            has_identity,
            host,
            shown,
            secrets,
            warnings,
        })
    }

    /// Changes the options of every connection (e.g. `client_found_rows`).
    pub fn with_opts(mut self, change: impl Fn(OptsBuilder) -> OptsBuilder) -> Self {
        self.clear = Opts::from(change(OptsBuilder::from_opts(self.clear)));
        self.secure = self
            .secure
            .map(|opts| Opts::from(change(OptsBuilder::from_opts(opts))));
        self
    }

    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// The URL with its password hidden.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    pub fn secrets(&self) -> &Secrets {
        &self.secrets
    }

    /// What the settings ask for, before any connection.
    pub fn transport(&self) -> Transport {
        match self.mode.verify() {
            None => Transport::clear(self.setting.clone()),
            Some(verify) => Transport::tls(verify, self.setting.clone()),
        }
    }

    /// Start-up warnings (clear text beyond loopback, an unused `ssl-ca`), to log once.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Whether a connection with TLS checked the server's certificate.
    pub fn verifies(&self) -> bool {
        matches!(self.mode, SslMode::VerifyCa | SslMode::VerifyIdentity)
    }

    /// Connects, with TLS as the mode says. Returns the connection and whether its session is
    /// encrypted (asked of the server: `Ssl_cipher`).
    pub async fn connect(&self) -> Result<(Conn, bool), ConnectError> {
        let conn = match (&self.secure, self.mode) {
            (None, _) => Conn::new(self.clear.clone())
                .await
                .map_err(ConnectError::Driver)?,
            (Some(secure), SslMode::Preferred) => match Conn::new(secure.clone()).await {
                Ok(conn) => conn,
                Err(mysql_async::Error::Driver(
                    mysql_async::DriverError::NoClientSslFlagFromServer,
                )) => {
                    tracing::debug!(url = %self.shown, "The MySQL server offers no TLS; ssl-mode=PREFERRED connects in clear text.");
                    Conn::new(self.clear.clone())
                        .await
                        .map_err(ConnectError::Driver)?
                }
                Err(err) => return Err(self.explain(err)),
            },
            (Some(secure), SslMode::VerifyCa) => self.connect_chain_only(secure).await?,
            (Some(secure), _) => Conn::new(secure.clone())
                .await
                .map_err(|err| self.explain(err))?,
        };
        let mut conn = conn;
        let cipher: Option<(String, String)> = conn
            .query_first("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
            .await
            .map_err(ConnectError::Driver)?;
        let tls = cipher.is_some_and(|(_, value)| !value.is_empty());
        if !tls && self.mode >= SslMode::Required {
            // Never clear text when the settings ask for TLS (e.g. a `socket=` URL).
            let _ = conn.disconnect().await;
            return Err(ConnectError::Tls(format!(
                "the session with {} is not encrypted although ssl-mode={} asks for TLS (a Unix socket?); connect over TCP",
                self.shown,
                self.mode.name()
            )));
        }
        Ok((conn, tls))
    }

    /// `VERIFY_CA` (module documentation).
    async fn connect_chain_only(&self, secure: &Opts) -> Result<Conn, ConnectError> {
        let known = self
            .by_name
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(opts) = known {
            return Conn::new(opts).await.map_err(|err| self.explain(err));
        }
        let err = match Conn::new(secure.clone()).await {
            Ok(conn) => return Ok(conn),
            Err(err) => err,
        };
        let Some(rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForNameContext { presented, .. },
        )) = find_rustls(&err)
        else {
            return Err(self.explain(err));
        };
        let Some(name) = presented.iter().find_map(|p| usable_name(p)) else {
            return Err(ConnectError::Tls(format!(
                "the server's certificate at {} names no host or address the check can use ({}); use ssl-mode=REQUIRED, or give the server a certificate with a subjectAltName",
                self.shown,
                presented.join(", ")
            )));
        };
        let ssl = secure
            .ssl_opts()
            .cloned()
            .unwrap_or_default()
            .with_danger_tls_hostname_override(Some(name));
        let opts = Opts::from(OptsBuilder::from_opts(secure.clone()).ssl_opts(ssl));
        let conn = Conn::new(opts.clone())
            .await
            .map_err(|err| self.explain(err))?;
        *self.by_name.lock().unwrap_or_else(|p| p.into_inner()) = Some(opts);
        Ok(conn)
    }

    /// Words a TLS failure with what to do next; other errors go back as they are.
    fn explain(&self, err: mysql_async::Error) -> ConnectError {
        let (shown, mode) = (&self.shown, self.mode.name());
        if let mysql_async::Error::Driver(mysql_async::DriverError::NoClientSslFlagFromServer) =
            &err
        {
            return ConnectError::Tls(format!(
                "the server at {shown} does not support TLS, and ssl-mode={mode} asks for it; turn TLS on at the server (ssl_cert, ssl_key), or use ssl-mode=PREFERRED to allow clear text"
            ));
        }
        if let mysql_async::Error::Server(server) = &err
            && server.code == 1045
            && self.secure.is_some()
            && !self.has_identity
        {
            return ConnectError::Tls(self.secrets.scrub(&format!(
                "MySQL 1045 ({}): {}; if this user must present a certificate (REQUIRE X509 / SUBJECT / ISSUER), give ssl-cert and ssl-key in the URL",
                server.state, server.message
            )));
        }
        let Some(tls_err) = find_rustls(&err) else {
            return ConnectError::Driver(err);
        };
        let anchor = match &self.ca {
            Some(ca) => format!("the CA in ssl-ca={}", ca.display()),
            None => "a CA of the system's trust store".to_owned(),
        };
        use rustls::CertificateError as C;
        let message = match tls_err {
            rustls::Error::InvalidCertificate(C::UnknownIssuer) => format!(
                "the server's certificate at {shown} is not signed by {anchor} (UnknownIssuer); give the CA that signed it in ssl-ca, or ssl-mode=REQUIRED to encrypt without verifying"
            ),
            rustls::Error::InvalidCertificate(C::NotValidForName)
            | rustls::Error::InvalidCertificate(C::NotValidForNameContext { .. }) => format!(
                "the server's certificate is not valid for the host {} of {shown} ({tls_err}); connect by a name the certificate holds, or use ssl-mode=VERIFY_CA to check the chain only",
                self.host
            ),
            rustls::Error::InvalidCertificate(_) => format!(
                "the server's certificate at {shown} was refused ({tls_err}); renew it, or give the CA that signed it in ssl-ca"
            ),
            rustls::Error::AlertReceived(alert) => format!(
                "the server at {shown} ended the TLS handshake ({alert:?}); if it asks for a client certificate, give ssl-cert and ssl-key"
            ),
            other => format!("TLS with {shown} failed: {other} (ssl-mode={mode})"),
        };
        ConnectError::Tls(self.secrets.scrub(&message))
    }
}

impl ConnectError {
    /// The message, a driver error worded by `word` (each caller has its own).
    pub fn message(self, word: impl FnOnce(mysql_async::Error) -> String) -> String {
        match self {
            Self::Driver(err) => word(err),
            Self::Tls(message) => message,
        }
    }
}

/// The rustls error behind a driver error, if any. `io::Error::source` skips the error it
/// wraps, so that one is looked into by hand.
fn find_rustls(err: &mysql_async::Error) -> Option<&rustls::Error> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(err) = next {
        if let Some(found) = err.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(found) = inner.downcast_ref::<rustls::Error>()
        {
            return Some(found);
        }
        next = err.source();
    }
    None
}

/// A name from rustls-webpki's list of the names a certificate presents (`DnsName("db.x")`,
/// `IpAddress(10.0.0.5)`), usable as the name to verify against.
fn usable_name(presented: &str) -> Option<String> {
    if let Some(dns) = presented
        .strip_prefix("DnsName(\"")
        .and_then(|s| s.strip_suffix("\")"))
    {
        // A wildcard matches any one label.
        let name = match dns.strip_prefix("*.") {
            Some(rest) => format!("estafeta.{rest}"),
            None => dns.to_owned(),
        };
        return rustls::pki_types::ServerName::try_from(name.as_str())
            .is_ok()
            .then_some(name);
    }
    let ip = presented
        .strip_prefix("IpAddress(")
        .and_then(|s| s.strip_suffix(')'))?;
    ip.parse::<std::net::IpAddr>().ok().map(|ip| ip.to_string())
}

/// Takes `ssl-mode`, `ssl-ca`, `ssl-cert`, `ssl-key` (any spelling) out of the URL's query;
/// refuses mysql_async's own TLS parameters.
fn take_tls_params(url: &str, shown: &str) -> anyhow::Result<(String, Vec<(String, String)>)> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), Vec::new()));
    };
    let (mut kept, mut taken) = (Vec::new(), Vec::new());
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = redact::percent_decode(key).to_ascii_lowercase();
        if DRIVER_TLS_PARAMS.contains(&name.as_str()) {
            anyhow::bail!(
                "the MySQL URL {shown} uses {name}, the driver's own TLS setting; write ssl-mode instead: ssl-mode=VERIFY_IDENTITY (encrypted, certificate and name checked), VERIFY_CA, REQUIRED (encrypted, not checked) or DISABLED"
            );
        }
        let canonical = name.replace('_', "-");
        if matches!(
            canonical.as_str(),
            "ssl-mode" | "ssl-ca" | "ssl-cert" | "ssl-key"
        ) {
            if taken.iter().any(|(k, _)| k == &canonical) {
                anyhow::bail!("the MySQL URL {shown} gives {canonical} twice");
            }
            taken.push((canonical, redact::percent_decode(value)));
        } else {
            kept.push(pair);
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, taken))
}

/// Certificates as the driver takes them (its `PathOrBuf` is not exported; `Vec<u8>` converts).
fn der_buffers(certs: Vec<CertificateDer<'static>>) -> impl Iterator<Item = Vec<u8>> {
    certs.into_iter().map(|cert| cert.to_vec())
}

/// The operating system's trust store, only the certificates rustls accepts as roots (the
/// driver fails the whole connection on one it cannot use).
fn system_certificates() -> Vec<CertificateDer<'static>> {
    let native = rustls_native_certs::load_native_certs();
    for err in &native.errors {
        tracing::debug!(error = %err, "Skipping part of the system trust store.");
    }
    native
        .certs
        .into_iter()
        .filter(|cert| rustls::RootCertStore::empty().add(cert.clone()).is_ok())
        .collect()
}

/// The client certificate for the driver: the chain as PEM, the key as PKCS#1 DER.
fn client_identity(cert: &Path, key: &Path) -> anyhow::Result<ClientIdentity> {
    let identity = tls::identity(cert, key).context("ssl-cert / ssl-key in the MySQL URL")?;
    let pkcs1 = match &identity.key {
        PrivateKeyDer::Pkcs1(der) => der.secret_pkcs1_der().to_vec(),
        PrivateKeyDer::Pkcs8(der) => pkcs8_rsa_to_pkcs1(der.secret_pkcs8_der()).ok_or_else(|| {
            anyhow::anyhow!(
                "the private key {} is not an RSA key; the MySQL driver takes only RSA client keys, make one with openssl genrsa",
                key.display()
            )
        })?,
        _ => anyhow::bail!(
            "the private key {} is not an RSA key; the MySQL driver takes only RSA client keys, make one with openssl genrsa",
            key.display()
        ),
    };
    // The pair must belong together: rustls checks, with a message naming the files.
    tls::client_config(Verify::Nothing, None, Some(identity)).with_context(|| {
        format!(
            "ssl-cert={} and ssl-key={} in the MySQL URL",
            cert.display(),
            key.display()
        )
    })?;
    // tls::identity read it as PEM: the driver reads the same text.
    let pem =
        std::fs::read(cert).with_context(|| format!("cannot read ssl-cert={}", cert.display()))?;
    Ok(ClientIdentity::new(pem.into(), pkcs1.into()))
}

/// The PKCS#1 `RSAPrivateKey` inside a PKCS#8 `PrivateKeyInfo` (RFC 5208):
/// `SEQUENCE { INTEGER 0, SEQUENCE { OID rsaEncryption, NULL }, OCTET STRING pkcs1 }`.
/// `None` for any other key.
fn pkcs8_rsa_to_pkcs1(der: &[u8]) -> Option<Vec<u8>> {
    const RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
    let (tag, info, _) = tlv(der)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, _version, rest) = tlv(info)?;
    if tag != 0x02 {
        return None;
    }
    let (tag, algorithm, rest) = tlv(rest)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, oid, _) = tlv(algorithm)?;
    if tag != 0x06 || oid != RSA_ENCRYPTION {
        return None;
    }
    let (tag, key, _) = tlv(rest)?;
    (tag == 0x04).then(|| key.to_vec())
}

/// One DER tag-length-value: (tag, value, what follows).
fn tlv(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str) -> anyhow::Result<MysqlTarget> {
        MysqlTarget::parse(url)
    }

    #[test]
    fn the_mode_defaults_to_verified_beyond_loopback_and_preferred_on_it() {
        let t = target("mysql://u:pw@db.hospital.local:3306/central").unwrap();
        assert_eq!(t.mode(), SslMode::VerifyIdentity);
        assert_eq!(
            t.transport().setting,
            "ssl-mode=VERIFY_IDENTITY (default beyond loopback)"
        );
        assert!(t.transport().verified);
        let t = target("mariadb://u@127.0.0.1/central").unwrap();
        assert_eq!(t.mode(), SslMode::Preferred);
        assert!(!t.transport().verified);
        assert!(t.warnings().is_empty());
    }

    #[test]
    fn every_spelling_of_ssl_mode_is_read_and_taken_out_of_the_url() {
        for (url, mode) in [
            ("mysql://u@10.0.0.5/db?ssl-mode=disabled", SslMode::Disabled),
            ("mysql://u@10.0.0.5/db?ssl_mode=Required", SslMode::Required),
            (
                "mysql://u@10.0.0.5/db?SSL_MODE=verify_ca&pool_min=1",
                SslMode::VerifyCa,
            ),
            (
                "mysql://u@10.0.0.5/db?pool_min=1&ssl-mode=VERIFY-IDENTITY",
                SslMode::VerifyIdentity,
            ),
            (
                "mysql://u@localhost/db?ssl-mode=PREFERRED",
                SslMode::Preferred,
            ),
        ] {
            assert_eq!(target(url).unwrap().mode(), mode, "{url}");
        }
        let err = target("mysql://u:pw@10.0.0.5/db?ssl-mode=ON")
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("ssl-mode=ON") && err.contains("VERIFY_IDENTITY"),
            "{err}"
        );
        assert!(!err.contains("pw"), "{err}");
    }

    #[test]
    fn clear_text_beyond_loopback_is_warned_about() {
        let t = target("mysql://u:pw@10.0.0.5/db?ssl-mode=DISABLED").unwrap();
        assert!(!t.transport().tls);
        assert_eq!(t.warnings().len(), 1);
        assert!(t.warnings()[0].contains("clear text"), "{:?}", t.warnings());
        assert!(!t.warnings()[0].contains("pw"), "{:?}", t.warnings());
        let t = target("mysql://u@127.0.0.1/db?ssl-mode=DISABLED").unwrap();
        assert!(t.warnings().is_empty());
    }

    #[test]
    fn the_drivers_own_tls_parameters_are_refused_without_a_panic() {
        for param in [
            "require_ssl=true",
            "require_ssl=false",
            "verify_ca=false",
            "verify_identity=false",
            "built_in_roots=false",
        ] {
            let err = target(&format!("mysql://u@10.0.0.5/db?{param}"))
                .err()
                .unwrap_or_else(|| panic!("{param} is refused"))
                .to_string();
            assert!(err.contains("ssl-mode"), "{err}");
        }
    }

    #[test]
    fn a_missing_ca_file_or_half_a_client_certificate_is_a_start_error() {
        let err = format!(
            "{:#}",
            target("mysql://u@10.0.0.5/db?ssl-ca=/nonexistent/ca.pem")
                .err()
                .unwrap()
        );
        assert!(
            err.contains("ssl-ca") && err.contains("/nonexistent/ca.pem"),
            "{err}"
        );
        let err = target("mysql://u@10.0.0.5/db?ssl-cert=/x.pem")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("ssl-key"), "{err}");
    }

    #[test]
    fn presented_names_are_read() {
        assert_eq!(
            usable_name("DnsName(\"db.example\")").as_deref(),
            Some("db.example")
        );
        assert_eq!(
            usable_name("DnsName(\"*.example\")").as_deref(),
            Some("estafeta.example")
        );
        assert_eq!(
            usable_name("IpAddress(10.0.0.5)").as_deref(),
            Some("10.0.0.5")
        );
        assert_eq!(usable_name("DirectoryName"), None);
    }

    #[test]
    fn a_der_length_that_overruns_is_no_key() {
        assert_eq!(pkcs8_rsa_to_pkcs1(&[0x30, 0x82, 0xff, 0xff, 0x02]), None);
        assert_eq!(pkcs8_rsa_to_pkcs1(&[]), None);
    }
}
