//! The self-update's HTTP client: the manifest and the archives.
//!
//! - **`https://` by default.** A clear-text `http://` URL (`UPDATE_URL`, an asset's `url`, or
//!   a redirect) is refused unless it names this machine (`127.0.0.0/8`, `::1`, `localhost`:
//!   no network to cross) or `UPDATE_ALLOW_HTTP=true`. Signatures protect what is installed
//!   either way, but on clear text the hospital network could hide every update from the agents
//!   or watch which versions they run. There is no silent fallback from https to http.
//! - **Certificates** are verified against the Mozilla roots compiled into the binary plus
//!   `UPDATE_CA_FILE` (PEM; an intranet's own CA), as `CENTRAL_API_CA_FILE` does for the HTTP
//!   sink.
//! - Blocking (reqwest's `blocking` client): called from blocking threads only.

use std::io::Read as _;
use std::time::Duration;

use anyhow::{Context as _, bail};

use super::UpdateConfig;
use crate::redact::url as redact_url;

/// Redirects followed, at most.
pub const MAX_REDIRECTS: usize = 5;
/// How long connecting may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether `url` may be read: `https://`, or `http://` to this machine or with `allow_http`.
/// The error says what to do.
pub fn check_url(url: &str, allow_http: bool) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|err| {
        format!(
            "{} is not a URL ({err}); expected https://…",
            redact_url(url)
        )
    })?;
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if allow_http || is_loopback(&parsed) => Ok(()),
        "http" => Err(format!(
            "{} is clear-text http:// to another machine, refused: use https:// (add the server's CA with UPDATE_CA_FILE if it is an internal one), or set UPDATE_ALLOW_HTTP=true to accept that the network can see and hold back updates (signatures still protect what is installed)",
            redact_url(url)
        )),
        other => Err(format!(
            "{} uses {other}://; expected https://",
            redact_url(url)
        )),
    }
}

/// `127.0.0.0/8`, `::1` (also as `::ffff:127.x.y.z`) and `localhost`.
fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    match host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
    {
        Ok(std::net::IpAddr::V4(ip)) => ip.is_loopback(),
        Ok(std::net::IpAddr::V6(ip)) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
}

/// The client of one check or download.
pub struct Client {
    inner: reqwest::blocking::Client,
    allow_http: bool,
}

impl Client {
    /// Builds it from the `UPDATE_*` settings (reads `UPDATE_CA_FILE`).
    pub fn new(config: &UpdateConfig) -> anyhow::Result<Self> {
        let allow_http = config.allow_http;
        let mut builder = reqwest::blocking::Client::builder()
            .user_agent(format!("estafeta/{}", crate::version::current()))
            .connect_timeout(CONNECT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= MAX_REDIRECTS {
                    attempt.error(format!("more than {MAX_REDIRECTS} redirects"))
                } else if let Err(why) = check_url(attempt.url().as_str(), allow_http) {
                    attempt.error(format!("redirected: {why}"))
                } else {
                    attempt.follow()
                }
            }));
        if let Some(path) = &config.ca_file {
            let pem = std::fs::read(path).with_context(|| {
                format!(
                    "cannot read UPDATE_CA_FILE {}; check the path",
                    path.display()
                )
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).with_context(|| {
                format!("UPDATE_CA_FILE {} is not a PEM certificate", path.display())
            })?;
            if certs.is_empty() {
                bail!(
                    "UPDATE_CA_FILE {} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)",
                    path.display()
                );
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let inner = builder
            .build()
            .context("could not build the HTTP client of the self-update")?;
        Ok(Self { inner, allow_http })
    }

    /// Reads `url` whole, at most `max_bytes`, within `timeout`.
    pub fn get(&self, url: &str, max_bytes: u64, timeout: Duration) -> anyhow::Result<Vec<u8>> {
        check_url(url, self.allow_http).map_err(anyhow::Error::msg)?;
        let shown = redact_url(url);
        let mut response = self
            .inner
            .get(url)
            .timeout(timeout)
            .send()
            .map_err(reqwest::Error::without_url)
            .with_context(|| format!("could not reach {shown}"))?;
        let status = response.status();
        if !status.is_success() {
            bail!("{shown} answered {status}");
        }
        if response.content_length().is_some_and(|n| n > max_bytes) {
            bail!("{shown} is larger than {max_bytes} bytes; refused");
        }
        let mut body = Vec::new();
        (&mut response)
            .take(max_bytes + 1)
            .read_to_end(&mut body)
            .with_context(|| format!("could not read {shown}"))?;
        if body.len() as u64 > max_bytes {
            bail!("{shown} is larger than {max_bytes} bytes; refused");
        }
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clear_text_is_refused_beyond_this_machine_unless_allowed() {
        for ok in [
            "https://updates.example/manifest.json",
            "http://127.0.0.1:8080/manifest.json",
            "http://127.1.2.3/m.json",
            "http://[::1]:9/m.json",
            "http://localhost/m.json",
        ] {
            assert_eq!(check_url(ok, false), Ok(()), "{ok}");
        }
        for refused in [
            "http://updates.example/manifest.json",
            "http://0.0.0.0:9/m.json",
            "http://192.0.2.1/m.json",
            "http://localhost.example/m.json",
        ] {
            let why = check_url(refused, false).unwrap_err();
            assert!(why.contains("UPDATE_ALLOW_HTTP"), "{refused}: {why}");
            assert_eq!(check_url(refused, true), Ok(()), "{refused}");
        }
        assert!(check_url("ftp://updates.example/m.json", true).is_err());
        assert!(check_url("not a url", true).is_err());
        let hidden = check_url("http://user:secret@updates.example/m.json", false).unwrap_err();
        assert!(!hidden.contains("secret"), "{hidden}");
    }
}
