//! Value parsers of the flat keys: each turns text into a value or says what was expected,
//! in words meant for the person editing the file.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use super::keys::{DEFAULT_AGENT_ID, MAX_AGENT_ID_LEN};

/// `TZ`: an IANA name; a file path such as `:/etc/localtime` means the machine's local time.
pub(super) fn parse_tz(text: &str) -> Result<Option<crate::timezone::Zone>, String> {
    use crate::timezone::Zone;
    let name = text.trim().trim_start_matches(':');
    if name.starts_with('/') {
        // glibc's `TZ=:/usr/share/zoneinfo/Area/City` form: use the name after `zoneinfo/`.
        return Ok(name
            .split_once("zoneinfo/")
            .and_then(|(_, zone)| Zone::named(zone)));
    }
    Zone::named(name).map(Some).ok_or_else(|| {
        "expected an IANA time zone name such as America/Sao_Paulo or UTC (from the system's time zone database, /usr/share/zoneinfo; install the tzdata package if it is missing)".to_string()
    })
}

/// `true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off`, any case.
pub fn parse_bool(text: &str) -> Result<bool, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err("expected true or false (also 1/0, yes/no)".into()),
    }
}

/// A size in bytes: `1048576`, `500MB` (powers of 1000), `2GiB` (powers of 1024), `1.5GB`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    const EXPECTED: &str = "expected a size in bytes, such as 1048576, 500MB or 2GiB";
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number = number.replace('_', "");
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "ki" | "kib" => 1 << 10,
        "mi" | "mib" => 1 << 20,
        "gi" | "gib" => 1 << 30,
        "ti" | "tib" => 1 << 40,
        _ => return Err(EXPECTED.into()),
    };
    if number.is_empty() {
        return Err(EXPECTED.into());
    }
    if let Ok(whole) = number.parse::<u64>() {
        return whole
            .checked_mul(multiplier)
            .ok_or_else(|| EXPECTED.to_string());
    }
    let fraction: f64 = number.parse().map_err(|_| EXPECTED.to_string())?;
    let bytes = fraction * multiplier as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(EXPECTED.into());
    }
    Ok(bytes.round() as u64)
}

pub(super) fn parse_u64(text: &str, what: &str) -> Result<u64, String> {
    text.trim()
        .replace('_', "")
        .parse::<u64>()
        .map_err(|_| format!("expected {what}"))
}

pub(super) fn positive_usize(n: u64, what: &str) -> Result<usize, String> {
    match usize::try_from(n) {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("expected {what}")),
    }
}

/// Seconds, whole or fractional; zero allowed only when `zero_ok`.
pub(super) fn parse_secs(text: &str, zero_ok: bool) -> Result<Duration, String> {
    let value: f64 = text.trim().parse().map_err(|_| expected_secs(zero_ok))?;
    secs_from_f64(value, zero_ok)
}

pub(super) fn secs_from_f64(value: f64, zero_ok: bool) -> Result<Duration, String> {
    if !value.is_finite() || value < 0.0 || (value == 0.0 && !zero_ok) || value > 1e9 {
        return Err(expected_secs(zero_ok));
    }
    Ok(Duration::from_secs_f64(value))
}

pub(super) fn expected_secs(zero_ok: bool) -> String {
    if zero_ok {
        "expected a number of seconds, 0 or more, such as 10".into()
    } else {
        "expected a number of seconds above 0, such as 10 or 0.5".into()
    }
}

/// `INGEST_ALLOWED_HOSTS`: host names or IP addresses separated by commas, kept as the `Host`
/// check compares them (lowercase, IPv6 without brackets).
pub(super) fn parse_allowed_hosts(text: &str) -> Result<Vec<String>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            crate::hostname::canonical_host(entry).ok_or_else(|| {
                format!(
                    "{entry:?} is not a host name or an IP address; expected names or addresses separated by commas, without scheme, port or wildcard (any port is accepted), such as estafeta.hospital.local,10.0.0.5"
                )
            })
        })
        .collect()
}

/// `INGEST_ADDR`: `IP:PORT`, or `localhost:PORT`.
pub(super) fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Some(port) = text.strip_prefix("localhost:")
        && let Ok(port) = port.parse::<u16>()
    {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    Err("expected IP:PORT such as 127.0.0.1:8787 (or [::1]:8787)".into())
}

pub(super) fn validate_agent_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_AGENT_ID_LEN || id.chars().any(char::is_control) {
        Err(format!(
            "expected a name of 1 to {MAX_AGENT_ID_LEN} characters without control characters"
        ))
    } else {
        Ok(())
    }
}

/// `/etc/hostname`, else `HOSTNAME` / `COMPUTERNAME`, else `estafeta`.
pub(super) fn default_agent_id(env: &BTreeMap<String, String>) -> String {
    crate::hostname::machine_names(env)
        .find(|name| validate_agent_id(name).is_ok())
        .unwrap_or_else(|| DEFAULT_AGENT_ID.to_owned())
}

/// `LOG_LEVEL`: a level (`info`) or tracing directives (`info,estafeta=debug`).
pub(super) fn validate_log_level(text: &str) -> Result<(), String> {
    const LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];
    const EXPECTED: &str = "expected trace, debug, info, warn, error or off, or directives such as info,estafeta=debug";
    for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = match directive.rsplit_once('=') {
            Some((_, level)) => level,
            // A bare word is a level unless it is clearly a target path.
            None if directive.contains("::") || directive.contains('[') => continue,
            None => directive,
        };
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(EXPECTED.into());
        }
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(text)
        .map(|_| ())
        .map_err(|err| format!("{EXPECTED} ({err})"))
}

/// A duration as the keys write it: whole seconds, or a fraction when it has one.
pub(super) fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{}", d.as_secs())
    } else {
        format!("{s}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_accept_bytes_and_suffixes() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1.5 kib"), Ok(1536));
        assert_eq!(parse_size("10_000"), Ok(10_000));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("MB").is_err());
        assert!(parse_size("-1").is_err());
    }

    #[test]
    fn booleans_accept_the_usual_spellings() {
        for yes in ["true", "TRUE", "1", "yes", "On"] {
            assert_eq!(parse_bool(yes), Ok(true), "{yes}");
        }
        for no in ["false", "False", "0", "no", "OFF"] {
            assert_eq!(parse_bool(no), Ok(false), "{no}");
        }
        assert!(parse_bool("sim").is_err());
    }

    #[test]
    fn tz_accepts_names_and_local_paths() {
        use crate::timezone::Zone;
        assert_eq!(parse_tz("UTC"), Ok(Zone::named("UTC")));
        assert_eq!(
            parse_tz(":/usr/share/zoneinfo/America/Sao_Paulo"),
            Ok(Zone::named("America/Sao_Paulo"))
        );
        assert!(Zone::named("America/Sao_Paulo").is_some());
        assert_eq!(parse_tz(":/etc/localtime"), Ok(None));
        assert!(parse_tz("Mars/Olympus").is_err());
    }

    #[test]
    fn log_levels_are_checked() {
        assert!(validate_log_level("info").is_ok());
        assert!(validate_log_level("warn,estafeta=debug").is_ok());
        assert!(validate_log_level("verbose").is_err());
        assert!(validate_log_level("estafeta=loud").is_err());
    }
}
