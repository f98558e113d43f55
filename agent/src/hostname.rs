//! This machine's name, and host names and IP addresses in the one canonical form the ingest API's `Host` check and
//! `INGEST_ALLOWED_HOSTS` compare them in. At the bottom of the module graph: configuration
//! parses with it, the ingest API checks with it.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};

/// This machine's names, best first: `/etc/hostname`, then `HOSTNAME` and `COMPUTERNAME` from
/// `env` (the process environment, as configuration read it); empty ones left out.
pub fn machine_names(env: &BTreeMap<String, String>) -> impl Iterator<Item = String> + '_ {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .into_iter()
        .chain(
            ["HOSTNAME", "COMPUTERNAME"]
                .iter()
                .filter_map(|k| env.get(*k).map(|v| v.trim().to_owned())),
        )
        .filter(|name| !name.is_empty())
}

/// A host as the check compares it: an IP address in its canonical text (IPv6 without
/// brackets), or a host name in lowercase without a trailing dot. `None` when `name` is
/// neither (a port, a scheme, a path, a wildcard, spaces).
pub fn canonical_host(name: &str) -> Option<String> {
    if let Some(inside) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        return inside.parse::<Ipv6Addr>().ok().map(|ip| ip.to_string());
    }
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Some(ip.to_string());
    }
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let is_name = (1..=253).contains(&name.len())
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    is_name.then_some(name)
}
