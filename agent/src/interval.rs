//! Intervals as people write them in the TOML file (`every`, `debounce`): `"10s"`, `"500ms"`,
//! `"5m"`, `"1h"`, or `hh:mm:ss` the way seed 004's services wrote theirs (`"00:00:05"`). Below
//! both `config` and `sources`, which read and show them.

use std::time::Duration;

/// What [`parse_interval`] accepts, for error messages.
pub const INTERVAL_FORMS: &str = "a duration such as \"10s\", \"500ms\", \"5m\", \"1h\", or hh:mm:ss as in seed 004 (\"00:00:05\", \"23:00:05\")";

/// An interval (`every`, `debounce`): a whole number with `ms`, `s`, `m` (or `min`) or `h`, or
/// `hh:mm:ss` the way seed 004's `Interval` settings were written (.NET `TimeSpan` text;
/// hours may pass 23, minutes and seconds are below 60). Zero is refused: an interval of
/// nothing would spin.
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let expected = || format!("expected {INTERVAL_FORMS}, above zero");
    let text = text.trim();
    let duration = if text.contains(':') {
        let parts: Vec<&str> = text.split(':').collect();
        let [h, m, s] = parts[..] else {
            return Err(expected());
        };
        let number = |part: &str, max: u64| -> Option<u64> {
            let ok = !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
            part.parse::<u64>().ok().filter(|n| ok && *n < max)
        };
        let (h, m, s) = match (number(h, 1_000_000), number(m, 60), number(s, 60)) {
            (Some(h), Some(m), Some(s)) => (h, m, s),
            _ => return Err(expected()),
        };
        Duration::from_secs(h * 3600 + m * 60 + s)
    } else {
        let digits = text
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("{}; a bare number has no unit", expected()))?;
        let n: u64 = text[..digits].parse().map_err(|_| expected())?;
        match text[digits..].trim() {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" | "min" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            _ => return Err(expected()),
        }
    };
    if duration.is_zero() {
        return Err(expected());
    }
    Ok(duration)
}

/// An interval as people write it: `00:00:05` from whole seconds, `250ms` below a second.
pub fn show_interval(d: Duration) -> String {
    if d.subsec_nanos() != 0 {
        return format!("{}ms", d.as_millis());
    }
    let s = d.as_secs();
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_accept_units_and_the_seeds_hh_mm_ss() {
        assert_eq!(parse_interval("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_interval("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_interval("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_interval("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_interval("00:00:05"), Ok(Duration::from_secs(5)));
        assert_eq!(
            parse_interval("23:00:05"),
            Ok(Duration::from_secs(23 * 3600 + 5))
        );
        assert_eq!(
            parse_interval("48:30:00"),
            Ok(Duration::from_secs(48 * 3600 + 1800))
        );
        for bad in [
            "00:00:00",
            "0s",
            "00:60:00",
            "00:00:61",
            "5",
            "1:2",
            "00:00:05.5",
            "-1:00:00",
            "10 seconds",
            "",
        ] {
            let err = parse_interval(bad).unwrap_err();
            assert!(
                err.contains("00:00:05") && err.contains("10s"),
                "{bad:?}: {err}"
            );
        }
        assert!(parse_interval("5").unwrap_err().contains("no unit"));
    }
}
