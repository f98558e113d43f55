//! PostgreSQL connections with libpq's TLS settings, for the PostgreSQL sink, the SQL sources
//! and `estafeta fleet`: one place that reads `sslmode`, `sslrootcert`, `sslcert` and `sslkey`
//! from a `postgres://` URL with libpq's meaning, and connects through rustls
//! ([`crate::tls`]).
//!
//! tokio-postgres' own URL parser knows only `sslmode=disable|prefer|require` and no
//! certificate parameter, so those four are taken out of the URL here ([`split_ssl_params`])
//! and the rest is left to `tokio_postgres::Config`, whose `ssl_mode` is then set from ours:
//! `Require` for `require`, `verify-ca` and `verify-full` (tokio-postgres then never falls back
//! to clear text), `Prefer` for `allow` / `prefer`, `Disable` for `disable`.
//!
//! The connector ([`MakeRustls`]) is ours, over tokio-rustls, rather than the
//! `tokio-postgres-rustls` crate: it is fifty lines, needs no crate beyond those already in
//! the tree, uses [`crate::tls::client_config`] (the project's one set of verifiers), words
//! handshake failures for a person, and records whether the handshake happened, so
//! `sslmode=prefer` that ended in clear text is reported as such ([`crate::tls::Observed`]).
//!
//! Where this differs from libpq, on purpose:
//! - No `sslmode` and a host beyond loopback: `verify-full` against the system's trust store
//!   (libpq: `prefer`). Loopback keeps libpq's `prefer`.
//! - `verify-ca` / `verify-full` without `sslrootcert`: the system's trust store and the bundled
//!   Mozilla roots (libpq: `~/.postgresql/root.crt`, an error when missing).
//! - `allow` is treated as `prefer` (TLS first, clear text if the server has none).
//! - No channel binding (SCRAM-SHA-256-PLUS): plain SCRAM-SHA-256 over the TLS session.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use anyhow::Context as _;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::{Host, SslMode as PgSslMode};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use tokio_postgres::{Client, Connection, Socket};

use crate::tls::{self, Observed, Transport, Verify};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    /// Treated as [`SslMode::Prefer`].
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> anyhow::Result<Self> {
        Ok(match value {
            "disable" => Self::Disable,
            "allow" => Self::Allow,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => anyhow::bail!(
                "sslmode={other:?} is not a libpq sslmode; expected disable, allow, prefer, require, verify-ca or verify-full"
            ),
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Allow => "allow",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    /// Whether clear text is refused.
    fn requires_tls(self) -> bool {
        matches!(self, Self::Require | Self::VerifyCa | Self::VerifyFull)
    }
}

/// `sslrootcert`: a CA file, or `system` (the operating system's trust store, libpq 16).
#[derive(Debug, Clone, PartialEq, Eq)]
enum RootCert {
    File(PathBuf),
    System,
}

/// The libpq TLS parameters taken out of a URL.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SslParams {
    pub sslmode: Option<String>,
    pub sslrootcert: Option<String>,
    pub sslcert: Option<String>,
    pub sslkey: Option<String>,
}

/// Splits `postgres://…?sslmode=…&sslrootcert=…` into the URL without libpq's TLS parameters
/// (for tokio-postgres) and those parameters, percent-decoded. A later repetition of a
/// parameter wins, as in libpq.
pub fn split_ssl_params(url: &str) -> (String, SslParams) {
    let mut params = SslParams::default();
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), params);
    };
    let mut kept = Vec::new();
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match key {
            "sslmode" => &mut params.sslmode,
            "sslrootcert" => &mut params.sslrootcert,
            "sslcert" => &mut params.sslcert,
            "sslkey" => &mut params.sslkey,
            _ => {
                kept.push(pair);
                continue;
            }
        };
        *slot = Some(percent_decode(value));
    }
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    (url, params)
}

/// `%2F` → `/`; anything malformed is kept as written.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = text.get(i + 1..i + 3)
            && let Ok(byte) = u8::from_str_radix(hex, 16)
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A PostgreSQL URL read with libpq's TLS settings, ready to connect (any number of times).
pub struct PgTls {
    config: tokio_postgres::Config,
    mode: SslMode,
    /// `None`: no certificate check (or no TLS).
    verify: Option<Verify>,
    /// The rustls configuration; `None` with `sslmode=disable`.
    tls: Option<Arc<ClientConfig>>,
    rootcert: Option<RootCert>,
    /// Every host (and `hostaddr`) is loopback.
    loopback: bool,
    /// What the last connection negotiated.
    observed: Arc<Observed>,
}

impl PgTls {
    /// Reads `url`: an invalid `sslmode`, a missing or unreadable `sslrootcert`, `sslcert` or
    /// `sslkey` is an error here, at start, not at the first connection. The error never
    /// holds the password.
    pub fn from_url(url: &str) -> anyhow::Result<Self> {
        let shown = crate::redact::url(url);
        let secrets = crate::redact::Secrets::of(url);
        let (rest, params) = split_ssl_params(url);
        let config: tokio_postgres::Config =
            rest.parse().map_err(|err: tokio_postgres::Error| {
                anyhow::anyhow!(
                    "the PostgreSQL URL {shown:?} is not valid: {}; expected postgres://user:password@host:5432/database",
                    secrets.scrub(&err.to_string())
                )
            })?;
        Self::settings(config, params)
            .with_context(|| format!("the TLS settings of the PostgreSQL URL {shown}"))
    }

    fn settings(mut config: tokio_postgres::Config, params: SslParams) -> anyhow::Result<Self> {
        let loopback = config.get_hosts().iter().all(|host| match host {
            Host::Tcp(name) => tls::is_loopback(name),
            // A Unix socket (the variant exists on Unix only) never leaves the machine.
            #[allow(unreachable_patterns)]
            _ => true,
        }) && config.get_hostaddrs().iter().all(|ip| ip.is_loopback());
        let rootcert = params.sslrootcert.as_deref().map(|value| {
            if value == "system" {
                RootCert::System
            } else {
                RootCert::File(PathBuf::from(value))
            }
        });
        let explicit = params.sslmode.as_deref().map(SslMode::parse).transpose()?;
        let mode = match explicit {
            Some(mode) => mode,
            // libpq 16: the system store makes verify-full the default.
            None if rootcert == Some(RootCert::System) => SslMode::VerifyFull,
            None if !loopback => SslMode::VerifyFull,
            None => SslMode::Prefer,
        };
        if rootcert == Some(RootCert::System) && mode != SslMode::VerifyFull {
            anyhow::bail!(
                "sslrootcert=system may not be used with the weak sslmode={} (libpq refuses it too: the system's trust store holds public CAs, so only the host name ties the certificate to your server); use sslmode=verify-full",
                mode.as_str()
            );
        }
        let ca_file = match &rootcert {
            Some(RootCert::File(path)) => Some(path.as_path()),
            _ => None,
        };
        // libpq: with a root certificate given, require (and prefer) check the chain.
        let verify = match mode {
            SslMode::Disable => None,
            SslMode::Allow | SslMode::Prefer | SslMode::Require => {
                ca_file.map(|_| Verify::ChainOnly)
            }
            SslMode::VerifyCa => Some(Verify::ChainOnly),
            SslMode::VerifyFull => Some(Verify::Full),
        };
        let identity = match (&params.sslcert, &params.sslkey) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                check_key_permissions(Path::new(key))?;
                Some(tls::identity(Path::new(cert), Path::new(key))?)
            }
            (Some(_), None) => anyhow::bail!(
                "sslcert is given without sslkey; give both (the client certificate and its private key)"
            ),
            (None, Some(_)) => anyhow::bail!(
                "sslkey is given without sslcert; give both (the client certificate and its private key)"
            ),
        };
        let tls = if mode == SslMode::Disable {
            None
        } else {
            let mut client =
                tls::client_config(verify.unwrap_or(Verify::Nothing), ca_file, identity)?;
            // PostgreSQL 17's ALPN name (libpq 17 sends it; older servers ignore it).
            client.alpn_protocols = vec![b"postgresql".to_vec()];
            Some(Arc::new(client))
        };
        config.ssl_mode(match mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Allow | SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => PgSslMode::Require,
        });
        let configured =
            configured_transport(mode, explicit.is_some(), loopback, verify, &rootcert);
        Ok(Self {
            config,
            mode,
            verify,
            tls,
            rootcert,
            loopback,
            observed: Arc::new(Observed::new(configured)),
        })
    }

    /// The connection settings (without the TLS ones), to set a timeout or an application name.
    pub fn config_mut(&mut self) -> &mut tokio_postgres::Config {
        &mut self.config
    }

    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// `sslmode=disable` to a host beyond loopback: patient data crosses the network in clear
    /// (the sink logs a WARN at start). An explicit `prefer` beyond loopback is not flagged
    /// here; `transport()` shows whether its connections ended in clear text.
    pub fn clear_beyond_loopback(&self) -> bool {
        !self.loopback && self.mode == SslMode::Disable
    }

    /// The configured protection before any connection; what the last connection negotiated
    /// after one.
    pub fn transport(&self) -> Transport {
        self.observed.transport()
    }

    /// Connects with the URL's TLS settings; the caller spawns the returned connection.
    pub async fn connect(
        &self,
    ) -> Result<(Client, Connection<Socket, RustlsStream<Socket>>), ConnectError> {
        let used = Arc::new(AtomicBool::new(false));
        let maker = MakeRustls {
            config: self.tls.clone(),
            used: Arc::clone(&used),
            rootcert: self.rootcert_text(),
        };
        match self.config.connect(maker).await {
            Ok((client, connection)) => {
                let tls = used.load(Ordering::Acquire);
                // tokio-postgres' Require never goes on without TLS; checked again because a
                // clear-text connection here would be a leak.
                if self.mode.requires_tls() && !tls {
                    return Err(ConnectError::Tls(format!(
                        "the connection was made without TLS although sslmode={} forbids it; not used",
                        self.mode.as_str()
                    )));
                }
                self.observed.connected(tls, self.verify.is_some());
                Ok((client, connection))
            }
            Err(err) => Err(self.explain(err)),
        }
    }

    fn rootcert_text(&self) -> Option<String> {
        match &self.rootcert {
            Some(RootCert::File(path)) => Some(path.display().to_string()),
            _ => None,
        }
    }

    /// A TLS failure worded for a person; any other error as tokio-postgres gave it.
    fn explain(&self, err: tokio_postgres::Error) -> ConnectError {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
        while let Some(cause) = source {
            if let Some(handshake) = cause.downcast_ref::<HandshakeError>() {
                return ConnectError::Tls(handshake.0.clone());
            }
            source = cause.source();
        }
        if crate::redact::error_chain(&err).contains("server does not support TLS") {
            return ConnectError::Tls(format!(
                "the server does not support TLS (it answered the TLS request with \"no\": ssl = off in its postgresql.conf) and sslmode={} forbids clear text; turn ssl on at the server (ssl = on, ssl_cert_file, ssl_key_file), or use sslmode=disable only on a trusted network",
                self.mode.as_str()
            ));
        }
        ConnectError::Postgres(err)
    }
}

/// The protection the settings ask for, and the words that say which setting decided it.
fn configured_transport(
    mode: SslMode,
    explicit: bool,
    loopback: bool,
    verify: Option<Verify>,
    rootcert: &Option<RootCert>,
) -> Transport {
    let mut setting = format!("sslmode={}", mode.as_str());
    if !explicit {
        setting.push_str(match (mode, rootcert) {
            (SslMode::VerifyFull, Some(RootCert::System)) => " (default with sslrootcert=system)",
            (_, _) if loopback => " (default on loopback)",
            _ => " (default beyond loopback)",
        });
    }
    match mode {
        SslMode::Disable => Transport::clear(setting),
        // TLS only if the server offers it: not promised until a connection shows it.
        SslMode::Allow | SslMode::Prefer => {
            setting.push_str(", TLS if the server offers it");
            Transport::clear(setting)
        }
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
            if mode == SslMode::Require && verify.is_some() {
                setting.push_str(" with sslrootcert (checked as verify-ca)");
            }
            Transport::tls(verify.unwrap_or(Verify::Nothing), setting)
        }
    }
}

/// libpq refuses a private key others can read: 0600 when the user owns it, 0640 when root
/// does (a key shared with a service group).
fn check_key_permissions(key: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::metadata(key).map_err(|err| {
            anyhow::anyhow!(
                "cannot read the private key {} (sslkey): {err}",
                key.display()
            )
        })?;
        let allowed = if meta.uid() == 0 { 0o640 } else { 0o600 };
        if meta.mode() & 0o777 & !allowed != 0 {
            anyhow::bail!(
                "the private key {} (sslkey) has group or world access (mode {:o}); libpq refuses such a key and so does estafeta: chmod 600 {}",
                key.display(),
                meta.mode() & 0o777,
                key.display()
            );
        }
    }
    #[cfg(not(unix))]
    let _ = key;
    Ok(())
}

/// Why a connection failed.
#[derive(Debug)]
pub enum ConnectError {
    /// TLS: the server's certificate, its name, a server without TLS; worded for a person.
    Tls(String),
    /// Anything else (network, authentication, …), as tokio-postgres reports it.
    Postgres(tokio_postgres::Error),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tls(text) => f.write_str(text),
            Self::Postgres(err) => f.write_str(&crate::redact::error_chain(err)),
        }
    }
}

impl std::error::Error for ConnectError {}

/// A handshake failure, already worded.
#[derive(Debug)]
pub struct HandshakeError(String);

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HandshakeError {}

/// tokio-postgres' TLS hook: one per connection attempt, recording whether TLS was used.
pub struct MakeRustls {
    config: Option<Arc<ClientConfig>>,
    used: Arc<AtomicBool>,
    rootcert: Option<String>,
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = HandshakeError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, HandshakeError> {
        // The name is checked when the handshake starts: tokio-postgres asks for a connector
        // even for a Unix socket (domain ""), where no handshake follows.
        Ok(RustlsConnect {
            config: self.config.clone(),
            used: Arc::clone(&self.used),
            domain: domain.to_owned(),
            rootcert: self.rootcert.clone(),
        })
    }
}

pub struct RustlsConnect {
    config: Option<Arc<ClientConfig>>,
    used: Arc<AtomicBool>,
    domain: String,
    rootcert: Option<String>,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = HandshakeError;
    type Future = Pin<Box<dyn Future<Output = Result<RustlsStream<S>, HandshakeError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let config = self.config.ok_or_else(|| {
                HandshakeError("TLS was asked for although sslmode=disable".to_owned())
            })?;
            let bare = self.domain.trim_start_matches('[').trim_end_matches(']');
            let name = ServerName::try_from(bare.to_owned()).map_err(|_| {
                HandshakeError(format!(
                    "{:?} is not a host name or IP address TLS can check a certificate against",
                    self.domain
                ))
            })?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await
                .map_err(|err| HandshakeError(handshake_message(&err, bare, self.rootcert)))?;
            self.used.store(true, Ordering::Release);
            Ok(RustlsStream(tls))
        })
    }
}

/// Words a failed handshake: what is wrong and what to do.
fn handshake_message(err: &io::Error, host: &str, rootcert: Option<String>) -> String {
    use rustls::{AlertDescription, CertificateError, Error};
    let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
        return format!("the TLS handshake with {host} failed: {err}");
    };
    match tls {
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => match rootcert {
            Some(file) => format!(
                "the server's certificate is not signed by the CA in sslrootcert={file} (UnknownIssuer); give the CA that signed it, or sslmode=require to encrypt without verifying"
            ),
            None => "the server's certificate is not signed by a CA this machine trusts (UnknownIssuer; checked against the system trust store and the bundled Mozilla roots); give the CA that signed it with sslrootcert=/path/ca.pem (or install it in the system trust store), or sslmode=require to encrypt without verifying".to_owned(),
        },
        Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!(
            "the server's certificate is not valid for the name {host} ({tls}); connect with a name the certificate holds, or sslmode=verify-ca to check only that a trusted CA signed it"
        ),
        Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => format!("the server's certificate has expired ({tls}); renew it at the server"),
        Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => format!(
            "the server's certificate is not valid yet ({tls}); check this machine's clock and the certificate's dates"
        ),
        Error::AlertReceived(
            AlertDescription::CertificateRequired
            | AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown,
        ) => format!(
            "the server refused this client's certificate ({tls}); give a client certificate its ssl_ca_file trusts with sslcert and sslkey"
        ),
        other => format!("the TLS handshake with {host} failed: {other}"),
    }
}

/// A TLS session with a PostgreSQL server.
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // tls-server-end-point needs the hash of the certificate's signature algorithm; not
        // computed, so SCRAM runs without channel binding (tokio-postgres' default `prefer`).
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssl_parameters_are_taken_out_and_the_rest_kept() {
        let (url, params) = split_ssl_params(
            "postgres://u:p@db:5432/x?sslmode=verify-full&application_name=a&sslrootcert=%2Fetc%2Fca.pem&sslcert=/c.pem&sslkey=/k.pem",
        );
        assert_eq!(url, "postgres://u:p@db:5432/x?application_name=a");
        assert_eq!(params.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(params.sslrootcert.as_deref(), Some("/etc/ca.pem"));
        assert_eq!(params.sslcert.as_deref(), Some("/c.pem"));
        assert_eq!(params.sslkey.as_deref(), Some("/k.pem"));
        let (url, params) = split_ssl_params("postgres://u@h/x?sslmode=require");
        assert_eq!(url, "postgres://u@h/x");
        assert_eq!(params.sslmode.as_deref(), Some("require"));
    }

    fn setting(url: &str) -> (SslMode, Transport) {
        let pg = PgTls::from_url(url).unwrap();
        (pg.mode(), pg.transport())
    }

    #[test]
    fn the_default_is_verify_full_beyond_loopback_and_prefer_on_it() {
        let (mode, t) = setting("postgres://u@db.hospital.example/x");
        assert_eq!(mode, SslMode::VerifyFull);
        assert!(t.tls && t.verified, "{t:?}");
        assert_eq!(t.setting, "sslmode=verify-full (default beyond loopback)");
        let (mode, t) = setting("postgres://u@10.1.2.3:5432/x");
        assert_eq!(mode, SslMode::VerifyFull);
        assert!(t.tls && t.verified);
        // Two hosts, one beyond loopback: verified.
        let (mode, _) = setting("postgres://u@localhost,db.hospital.example/x");
        assert_eq!(mode, SslMode::VerifyFull);
        for url in [
            "postgres://u@127.0.0.1/x",
            "postgres://u@localhost:5432/x",
            "postgres://u@[::1]/x",
        ] {
            let (mode, t) = setting(url);
            assert_eq!(mode, SslMode::Prefer, "{url}");
            assert!(!t.tls, "prefer promises nothing before a connection: {t:?}");
            assert!(t.setting.contains("default on loopback"), "{t:?}");
        }
        let pg = PgTls::from_url("postgres://u@127.0.0.1/x").unwrap();
        assert_eq!(pg.config().get_ssl_mode(), PgSslMode::Prefer);
    }

    #[test]
    fn require_and_verify_modes_never_allow_clear_text() {
        for (mode, verified) in [
            ("require", false),
            ("verify-ca", true),
            ("verify-full", true),
        ] {
            let pg = PgTls::from_url(&format!("postgres://u@db.example/x?sslmode={mode}")).unwrap();
            assert_eq!(pg.config().get_ssl_mode(), PgSslMode::Require, "{mode}");
            let t = pg.transport();
            assert!(t.tls, "{mode}");
            assert_eq!(t.verified, verified, "{mode}");
            assert_eq!(t.setting, format!("sslmode={mode}"));
        }
        let pg = PgTls::from_url("postgres://u@db.example/x?sslmode=disable").unwrap();
        assert_eq!(pg.config().get_ssl_mode(), PgSslMode::Disable);
        assert!(pg.clear_beyond_loopback());
        assert!(!pg.transport().tls);
        let pg = PgTls::from_url("postgres://u@127.0.0.1/x?sslmode=disable").unwrap();
        assert!(!pg.clear_beyond_loopback());
        let pg = PgTls::from_url("postgres://u@db.example/x?sslmode=allow").unwrap();
        assert_eq!(pg.config().get_ssl_mode(), PgSslMode::Prefer);
    }

    #[test]
    fn bad_settings_are_errors_at_start_and_say_what_to_do() {
        let err = |url: &str| format!("{:#}", PgTls::from_url(url).err().expect(url));
        let e = err("postgres://u:hunter2@db/x?sslmode=verify_full");
        assert!(
            e.contains("not a libpq sslmode") && e.contains("verify-full"),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "{e}");
        let e = err("postgres://u@db/x?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem");
        assert!(
            e.contains("cannot read the certificate file /nonexistent/ca.pem"),
            "{e}"
        );
        let e = err("postgres://u@db/x?sslmode=require&sslrootcert=system");
        assert!(e.contains("use sslmode=verify-full"), "{e}");
        let e = err("postgres://u@db/x?sslcert=/c.pem");
        assert!(e.contains("without sslkey"), "{e}");
        let (mode, t) = setting("postgres://u@127.0.0.1/x?sslrootcert=system");
        assert_eq!(mode, SslMode::VerifyFull);
        assert!(
            t.setting.contains("default with sslrootcert=system"),
            "{t:?}"
        );
    }
}
