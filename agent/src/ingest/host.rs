//! The `Host` check in front of every route, the first thing a request meets.
//!
//! A web page open in the workstation's browser can make it send requests to `127.0.0.1:8787`;
//! through DNS rebinding (`rebind.attacker.example` first resolving to the attacker's server,
//! then to 127.0.0.1) it can even read the answers, because the browser then counts the agent
//! as the attacker's own origin. What such a request cannot hide is the name it was sent to: the
//! browser puts `rebind.attacker.example` in `Host`. So every route, the status page and the
//! probes included, answers only to the names this agent really has:
//! - `localhost`, any `127.0.0.0/8` address and `[::1]` (IPv4-mapped loopback too);
//! - the address of `INGEST_ADDR` itself, written as an IP (with `0.0.0.0` or `[::]` that
//!   literal only: an IP address cannot be rebound, so this admits no page);
//! - each name in `INGEST_ALLOWED_HOSTS` (exact, case-insensitive; IP addresses allowed), for
//!   clients on other machines or a name in the hosts file;
//!
//! with or without a port. Anything else is answered `421 host_not_allowed`; a request with no
//! `Host`, several, or one that is not a host name gets `400 invalid_host` (RFC 9112, 3.2). Both
//! answers stage nothing and say nothing about the agent's state or its allowed names, since a
//! rebinding page can read them. `/healthz` and `/readyz` are checked too: a probe on the same
//! machine sends `Host: 127.0.0.1:PORT`, which passes, and keeping them checked means no route
//! needs an exception to reason about.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::IngestState;
use super::error::ApiError;
use crate::config::Config;
use crate::hostname::canonical_host;

/// Longest part of a refused `Host` repeated in the answer, in characters.
const MAX_SHOWN_HOST_CHARS: usize = 100;

/// Set after the first refusal, which is logged at WARN (later ones at DEBUG: a page could
/// send thousands).
static WARNED: AtomicBool = AtomicBool::new(false);

/// The middleware: refuses a request whose `Host` (or absolute-form target) names another host.
pub async fn check_host(
    State(state): State<IngestState>,
    request: Request,
    next: Next,
) -> Response {
    match refusal(state.config(), request.headers(), request.uri()) {
        None => next.run(request).await,
        Some(err) => {
            if WARNED.swap(true, Ordering::Relaxed) {
                tracing::debug!(status = err.status.as_u16(), reason = %err.message, "Refused a request for another host.");
            } else {
                tracing::warn!(status = err.status.as_u16(), reason = %err.message, "Refused a request for another host (a web page trying DNS rebinding, or a client using a name missing from INGEST_ALLOWED_HOSTS); later ones are logged at DEBUG.");
            }
            err.into_response()
        }
    }
}

/// Why a request with these headers and target may not be answered, if it may not.
fn refusal(config: &Config, headers: &HeaderMap, uri: &Uri) -> Option<ApiError> {
    let mut values = headers.get_all(header::HOST).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        let why = if headers.contains_key(header::HOST) {
            "the request carries more than one Host header"
        } else {
            "the request has no Host header"
        };
        return Some(invalid(config, why));
    };
    let Ok(text) = value.to_str() else {
        return Some(invalid(config, "the Host header is not ASCII text"));
    };
    let allowed =
        |host: &str| host_allowed(host, config.ingest_addr.ip(), &config.ingest_allowed_hosts);
    if split_port(text).and_then(canonical_host).is_none() {
        return Some(invalid(
            config,
            &format!("the Host header {:?} is not a host name", shown(text)),
        ));
    }
    if !allowed(text) {
        return Some(not_allowed(text));
    }
    // An absolute-form target (`GET http://name/ HTTP/1.1`) names the host too, and wins over
    // `Host` for some servers: it must be one of ours as well.
    if let Some(authority) = uri.authority()
        && !allowed(authority.host())
    {
        return Some(not_allowed(authority.host()));
    }
    None
}

fn invalid(config: &Config, why: &str) -> ApiError {
    ApiError::bad_request(
        "invalid_host",
        format!(
            "{why}; send exactly one Host header naming this agent, such as Host: 127.0.0.1:{}",
            config.ingest_addr.port()
        ),
    )
}

fn not_allowed(host: &str) -> ApiError {
    ApiError::new(
        StatusCode::MISDIRECTED_REQUEST,
        "host_not_allowed",
        format!(
            "this agent does not answer to Host {:?}: it answers only to localhost, 127.0.0.1, [::1], its INGEST_ADDR and the names in INGEST_ALLOWED_HOSTS, so that web pages cannot reach it through DNS rebinding; if clients reach this agent by that name, add the name to INGEST_ALLOWED_HOSTS (comma-separated, without port) and restart it",
            shown(host)
        ),
    )
}

/// The start of a client's `Host`, to repeat in an answer.
fn shown(host: &str) -> String {
    host.chars().take(MAX_SHOWN_HOST_CHARS).collect()
}

/// Whether a `Host` value (`name`, `name:port`, `[v6]`, `[v6]:port`) names this agent: a loopback
/// name or address, `bind` (the `INGEST_ADDR` address) or one of `extra` (canonical, as
/// [`canonical_host`] makes them).
pub fn host_allowed(host: &str, bind: IpAddr, extra: &[String]) -> bool {
    let Some(name) = split_port(host).and_then(canonical_host) else {
        return false;
    };
    if name == "localhost" {
        return true;
    }
    if let Ok(ip) = name.parse::<IpAddr>()
        && (ip.to_canonical().is_loopback() || ip == bind)
    {
        return true;
    }
    extra.contains(&name)
}

/// The host part of a `Host` value, without its port; `None` when the port is not a number or
/// an IPv6 address is not in brackets.
fn split_port(value: &str) -> Option<&str> {
    let (host, port) = if value.starts_with('[') {
        let end = value.find(']')?;
        value.split_at(end + 1)
    } else {
        match value.rfind(':') {
            Some(colon) => value.split_at(colon),
            None => (value, ""),
        }
    };
    let port_ok = port.is_empty()
        || port.strip_prefix(':').is_some_and(|digits| {
            (1..=5).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit())
        });
    (port_ok && !host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback_only(host: &str) -> bool {
        host_allowed(host, IpAddr::from([127, 0, 0, 1]), &[])
    }

    #[test]
    fn loopback_names_and_addresses_pass_with_or_without_a_port() {
        for host in [
            "127.0.0.1:8787",
            "127.0.0.1",
            "127.8.9.10:1",
            "localhost:8787",
            "LOCALHOST",
            "localhost.",
            "[::1]:8787",
            "[::1]",
            "[0:0:0:0:0:0:0:1]:80",
            "[::ffff:127.0.0.1]:8787",
        ] {
            assert!(loopback_only(host), "{host}");
        }
    }

    #[test]
    fn other_names_and_malformed_hosts_are_refused() {
        for host in [
            "rebind.attacker.example",
            "rebind.attacker.example:8787",
            "evil.example:8787",
            "10.0.0.5:8787",
            "localhost.evil.example",
            "evil.localhost",
            "127.0.0.1.nip.io:8787",
            "[::2]:80",
            "::1",
            "[::1",
            "localhost:",
            "localhost:http",
            "localhost:123456",
            "user@localhost",
            "localhost/x",
            "0.0.0.0:8787",
            "",
        ] {
            assert!(!loopback_only(host), "{host}");
        }
    }

    #[test]
    fn the_bind_address_and_the_allowed_names_pass() {
        let extra = vec![
            "estafeta.hospital.local".to_owned(),
            "10.0.0.5".to_owned(),
            "fe80::1".to_owned(),
        ];
        let bind = IpAddr::from([192, 168, 1, 20]);
        for host in [
            "192.168.1.20:8787",
            "Estafeta.Hospital.Local:8787",
            "estafeta.hospital.local.",
            "10.0.0.5",
            "[fe80::1]:8787",
            "localhost:8787",
        ] {
            assert!(host_allowed(host, bind, &extra), "{host}");
        }
        for host in [
            "hospital.local",
            "x.estafeta.hospital.local",
            "10.0.0.6",
            "192.168.1.21",
        ] {
            assert!(!host_allowed(host, bind, &extra), "{host}");
        }
        // A wildcard bind admits its own literal (what a client of `INGEST_ADDR` sends), never
        // a name.
        let any = IpAddr::from([0, 0, 0, 0]);
        assert!(host_allowed("0.0.0.0:8787", any, &[]));
        assert!(!host_allowed("rebind.attacker.example", any, &[]));
    }

    #[test]
    fn canonical_hosts_are_lowercase_names_and_plain_addresses() {
        assert_eq!(
            canonical_host("Estafeta.Local.").as_deref(),
            Some("estafeta.local")
        );
        assert_eq!(canonical_host("[FE80::0001]").as_deref(), Some("fe80::1"));
        assert_eq!(canonical_host("fe80::1").as_deref(), Some("fe80::1"));
        assert_eq!(canonical_host("10.0.0.5").as_deref(), Some("10.0.0.5"));
        for bad in [
            "",
            "host:8787",
            "*.hospital.local",
            "http://x",
            "a b",
            "a..b",
            ".",
        ] {
            assert_eq!(canonical_host(bad), None, "{bad}");
        }
    }
}
