//! How the NATS sink's connection is protected and who it says it is (issue 20): whether TLS
//! is required (`tls://`, `tls_required`, or the default beyond loopback), the rustls
//! configuration [`crate::tls`] builds (the project's trust rules, the CA file, the client
//! certificate), and the one authentication method (token, user and password in the URL, NKey
//! seed file, `.creds` file).
//!
//! Everything is read and checked when the sink is built, at start: a CA file that is not one,
//! an NKey file without a seed or two authentication methods stop the agent with a
//! configuration error, instead of failing every delivery later. Secrets (token, password,
//! seed) go into the sink's [`Secrets`] and never into a message.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use async_nats::ConnectOptions;

use super::NatsSinkConfig;
use crate::redact::{Secrets, percent_decode};
use crate::tls::{Observed, Transport, Verify};

/// How the sink authenticates.
#[derive(Clone)]
pub(super) enum Auth {
    None,
    Token(String),
    UserPassword(String, String),
    /// An NKey seed (`SU…`), read from `nkey_file` at start.
    NKey(String),
    /// A `.creds` file (JWT and seed), read again at each connection so a renewed file is used.
    Creds(PathBuf),
}

/// The connection's TLS and authentication, built from the configuration.
pub(super) struct Security {
    pub auth: Auth,
    /// TLS before anything else is sent after the server's INFO, whatever the INFO says; a
    /// server that does not answer TLS is refused, never used in clear (no stripping).
    pub tls_required: bool,
    /// The rustls configuration of every TLS connection (also when the server asks for TLS on
    /// a loopback `nats://`), so the trust rules are the project's.
    pub tls: rustls::ClientConfig,
    /// What the last connection negotiated, for `Sink::transport`.
    pub observed: Observed,
    /// `ca_file` as given, for error messages.
    pub ca_file: Option<PathBuf>,
    /// The servers' hosts (comma-separated), for error messages.
    pub host: String,
    /// Secrets to scrub from every message (token, password, seed).
    pub secrets: Secrets,
}

impl Security {
    /// Reads `config`: `urls` are the servers' URLs as configured (credentials still in them;
    /// several for a cluster, at least one), `shown` the setting with them hidden. One client
    /// serves every server, so the rules apply to the list as a whole: TLS is required for all
    /// when any URL is `tls://` or any host is beyond loopback.
    pub fn new(
        config: &NatsSinkConfig,
        urls: &[reqwest::Url],
        shown: &str,
    ) -> anyhow::Result<Self> {
        let Some(first) = urls.first() else {
            bail!("the NATS URL {shown:?} names no server");
        };
        let hosts: Vec<&str> = urls
            .iter()
            .map(|url| url.host_str().unwrap_or_default())
            .collect();
        let host = hosts.join(", ");
        let scheme_tls = urls.iter().any(|url| url.scheme() == "tls");
        let loopback = hosts.iter().all(|host| crate::tls::is_loopback(host));
        let (tls_required, setting) = match (scheme_tls, config.tls_required) {
            (true, Some(false)) => bail!(
                "the NATS URL {shown:?} is tls:// but tls_required is false: tls:// always uses TLS; remove tls_required (CENTRAL_NATS_TLS_REQUIRED) or use nats://"
            ),
            (true, _) => (true, "tls://".to_owned()),
            (false, Some(true)) => (true, "nats://, tls_required=true".to_owned()),
            (false, Some(false)) => {
                if !loopback {
                    tracing::warn!(
                        url = %shown,
                        "NATS tls_required is false for a host beyond this machine: records (patient data) and credentials may cross the network in clear text. Use tls:// or remove tls_required=false (CENTRAL_NATS_TLS_REQUIRED)."
                    );
                }
                (false, "nats://, tls_required=false".to_owned())
            }
            (false, None) if !loopback => (
                true,
                "nats://, TLS required (default beyond loopback)".to_owned(),
            ),
            (false, None) => (
                false,
                "nats:// on loopback, TLS only if the server asks".to_owned(),
            ),
        };
        let identity = match (&config.client_cert, &config.client_key) {
            (Some(cert), Some(key)) => Some(
                crate::tls::identity(cert, key)
                    .context("the NATS client certificate (client_cert, client_key)")?,
            ),
            (None, None) => None,
            _ => bail!(
                "a NATS client certificate needs both client_cert and client_key (CENTRAL_NATS_CLIENT_CERT and CENTRAL_NATS_CLIENT_KEY); set both or neither"
            ),
        };
        // The server's name is always checked: `tls://` is verify-full in every NATS client.
        let tls = crate::tls::client_config(Verify::Full, config.ca_file.as_deref(), identity)
            .context("the NATS TLS settings")?;
        let configured = if tls_required {
            Transport::tls(Verify::Full, setting)
        } else {
            Transport::clear(setting)
        };

        // check_nats_url made sure that every URL with credentials carries the same ones.
        let with_credentials = urls
            .iter()
            .find(|url| !url.username().is_empty())
            .unwrap_or(first);
        let (auth, secrets) = auth(config, with_credentials, shown)?;
        Ok(Self {
            auth,
            tls_required,
            tls,
            observed: Observed::new(configured),
            ca_file: config.ca_file.clone(),
            host,
            secrets,
        })
    }

    /// `options` with the TLS settings and the credentials.
    pub async fn apply(&self, options: ConnectOptions) -> Result<ConnectOptions, String> {
        let options = options
            .require_tls(self.tls_required)
            .tls_client_config(self.tls.clone());
        Ok(match &self.auth {
            Auth::None => options,
            Auth::Token(token) => options.token(token.clone()),
            Auth::UserPassword(user, password) => {
                options.user_and_password(user.clone(), password.clone())
            }
            Auth::NKey(seed) => options.nkey(seed.clone()),
            Auth::Creds(path) => options.credentials_file(path).await.map_err(|err| {
                format!(
                    "cannot use the NATS credentials file {} ({}); check that it is readable and holds a user JWT and NKey seed (nsc generate creds)",
                    path.display(),
                    err.kind()
                )
            })?,
        })
    }

    /// What a connection that just succeeded negotiated: TLS when required or when the
    /// server's INFO asked for it, always verified by [`Self::tls`].
    pub fn connected(&self, server_asked_tls: bool) {
        let tls = self.tls_required || server_asked_tls;
        self.observed.connected(tls, tls);
    }

    /// Why a connection failed on TLS, and what to do, from the error's text.
    pub fn tls_hint(&self, chain: &str) -> String {
        let anchor = match &self.ca_file {
            Some(ca) => format!("the CA in ca_file={}", ca.display()),
            None => "a CA this machine trusts (system store or bundled roots)".to_owned(),
        };
        if chain.contains("UnknownIssuer") || chain.contains("BadSignature") {
            format!(
                "the server's certificate is not signed by {anchor} (UnknownIssuer); set ca_file (CENTRAL_NATS_CA_FILE) to the CA that signed it"
            )
        } else if chain.contains("NotValidForName") || chain.contains("not valid for name") {
            format!(
                "the server's certificate does not name the host {:?}; connect with a name the certificate holds, or have it reissued with this one",
                self.host
            )
        } else if chain.contains("Expired") || chain.contains("NotValidYet") {
            "the server's certificate is expired or not yet valid; renew it or check this machine's clock".to_owned()
        } else if chain.contains("CertificateRequired") || chain.contains("BadCertificate") {
            "the server wants a client certificate it accepts; set client_cert and client_key (CENTRAL_NATS_CLIENT_CERT, CENTRAL_NATS_CLIENT_KEY) to one signed by the CA the server trusts".to_owned()
        } else if self.tls_required {
            "TLS is required (tls://, tls_required, or the default beyond loopback) and the TLS handshake failed: check that the server has TLS configured (a tls { } block in nats-server.conf); nothing was sent in clear".to_owned()
        } else {
            "check the server's TLS setup and certificate".to_owned()
        }
    }
}

/// Whether an I/O error of a connection is the TLS handshake failing (rustls' messages).
pub(super) fn is_tls_failure(chain: &str) -> bool {
    [
        "invalid peer certificate",
        "InvalidContentType",
        "corrupt message",
        "received fatal alert",
        "peer is incompatible",
        "peer misbehaved",
        "HandshakeFailure",
    ]
    .iter()
    .any(|sign| chain.contains(sign))
}

/// The authentication method: at most one of a token (setting or URL), a user and password in
/// the URL, `nkey_file`, `creds_file`. A token setting overrides a token in the URL (as before
/// issue 20).
fn auth(
    config: &NatsSinkConfig,
    url: &reqwest::Url,
    shown: &str,
) -> anyhow::Result<(Auth, Secrets)> {
    let user = percent_decode(url.username());
    let password = url.password().map(percent_decode);
    let token = config.token.as_ref().filter(|t| !t.is_empty());
    let mut methods: Vec<(&str, Auth)> = Vec::new();
    match (user.is_empty(), password, token) {
        (true, _, None) => {}
        (_, None, Some(token)) => methods.push((
            "a token (token, CENTRAL_NATS_TOKEN)",
            Auth::Token(token.clone()),
        )),
        (false, None, None) => methods.push(("a token in the URL", Auth::Token(user.clone()))),
        (false, Some(password), token) => {
            methods.push((
                "a user and password in the URL",
                Auth::UserPassword(user.clone(), password),
            ));
            if let Some(token) = token {
                methods.push((
                    "a token (token, CENTRAL_NATS_TOKEN)",
                    Auth::Token(token.clone()),
                ));
            }
        }
        (true, Some(_), Some(token)) => methods.push((
            "a token (token, CENTRAL_NATS_TOKEN)",
            Auth::Token(token.clone()),
        )),
    }
    if let Some(path) = &config.nkey_file {
        methods.push((
            "an NKey (nkey_file, CENTRAL_NATS_NKEY_FILE)",
            Auth::NKey(read_seed(path)?),
        ));
    }
    if let Some(path) = &config.creds_file {
        check_creds(path)?;
        methods.push((
            "a credentials file (creds_file, CENTRAL_NATS_CREDS_FILE)",
            Auth::Creds(path.clone()),
        ));
    }
    if methods.len() > 1 {
        let names: Vec<&str> = methods.iter().map(|(name, _)| *name).collect();
        bail!(
            "the NATS sink at {shown:?} has {} authentication methods: {}; keep one",
            names.len(),
            names.join(" and ")
        );
    }
    let auth = methods.pop().map_or(Auth::None, |(_, auth)| auth);
    // As written in each server's URL (percent-encoded) and decoded, and the token or seed.
    let secrets = super::split_nats_urls(&config.url)
        .into_iter()
        .fold(Secrets::default(), |all, part| all.and(&Secrets::of(part)))
        .with(match &auth {
            Auth::None | Auth::Creds(_) => None,
            Auth::Token(token) => Some(token.as_str()),
            Auth::UserPassword(_, password) => Some(password.as_str()),
            Auth::NKey(seed) => Some(seed.as_str()),
        });
    Ok((auth, secrets))
}

/// The NKey seed in `path`: one line `SU…` (a user seed); the file's content is never shown.
fn read_seed(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        anyhow::anyhow!(
            "cannot read the NKey seed file {} (nkey_file, CENTRAL_NATS_NKEY_FILE): {}; check the path and that the agent's user may read it",
            path.display(),
            err.kind()
        )
    })?;
    let seed = text.trim();
    if !seed.starts_with("SU") || nkeys::KeyPair::from_seed(seed).is_err() {
        bail!(
            "{} (nkey_file, CENTRAL_NATS_NKEY_FILE) does not hold a user NKey seed: expected one line starting with SU (made by `nk -gen user`)",
            path.display()
        );
    }
    Ok(seed.to_owned())
}

/// Checks that `path` is a readable `.creds` file (a user JWT and an NKey seed).
fn check_creds(path: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        anyhow::anyhow!(
            "cannot read the NATS credentials file {} (creds_file, CENTRAL_NATS_CREDS_FILE): {}; check the path and that the agent's user may read it",
            path.display(),
            err.kind()
        )
    })?;
    if ConnectOptions::new().credentials(&text).is_err() {
        bail!(
            "{} (creds_file, CENTRAL_NATS_CREDS_FILE) is not a NATS credentials file: expected a user JWT and an NKey seed (made by `nsc generate creds`)",
            path.display()
        );
    }
    Ok(())
}
