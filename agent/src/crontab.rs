//! Cron expressions as every schedule in the agent takes them (`CRONTAB`, `UPDATE_CRONTAB`, a
//! source's `schedule`): checked, and read as a [`Schedule`] in a time zone, here, at the bottom
//! of the module graph (the batcher, the sources and the update checks all use it).

use anyhow::Context as _;
use chrono::{DateTime, Utc};

/// Checks a cron expression: 5 fields, or 6 with seconds first (or a nickname like `@hourly`).
pub fn validate_crontab(expr: &str) -> Result<(), String> {
    let expr = expr.trim();
    if !expr.starts_with('@') {
        let fields = expr.split_whitespace().count();
        if fields != 5 && fields != 6 {
            return Err(format!(
                "expected 5 cron fields (or 6 with seconds), found {fields}"
            ));
        }
    }
    croner::Cron::new(expr)
        .with_seconds_optional()
        .parse()
        .map(|_| ())
        .map_err(|err| {
            format!(
                "expected a cron expression such as \"*/5 * * * *\" (minute hour day month weekday): {err}"
            )
        })
}

/// `CRONTAB` read in `TZ` (or the machine's local time).
#[derive(Clone)]
pub struct Schedule {
    cron: croner::Cron,
    tz: Option<crate::timezone::Zone>,
}

impl Schedule {
    /// Parses 5-field cron, or 6 fields with seconds first.
    pub fn new(crontab: &str, tz: Option<crate::timezone::Zone>) -> anyhow::Result<Self> {
        let cron = croner::Cron::new(crontab)
            .with_seconds_optional()
            .parse()
            .with_context(|| {
                format!("CRONTAB {crontab:?} is not a valid cron expression; use 5 fields (minute hour day month weekday) or 6 with seconds first")
            })?;
        Ok(Self { cron, tz })
    }

    /// The first tick strictly after `now`; `None` if the expression never matches again.
    pub fn next_after(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let next = match &self.tz {
            Some(tz) => self
                .cron
                .find_next_occurrence(&now.with_timezone(tz), false)
                .map(|t| t.with_timezone(&Utc)),
            None => self
                .cron
                .find_next_occurrence(&now.with_timezone(&chrono::Local), false)
                .map(|t| t.with_timezone(&Utc)),
        };
        next.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crontab_takes_five_or_six_fields() {
        assert!(validate_crontab("*/5 * * * *").is_ok());
        assert!(validate_crontab("0 */5 * * * *").is_ok());
        assert!(validate_crontab("@hourly").is_ok());
        assert_eq!(
            validate_crontab("*/5 * *"),
            Err("expected 5 cron fields (or 6 with seconds), found 3".to_string())
        );
        assert!(validate_crontab("61 * * * *").is_err());
    }

    #[test]
    fn schedule_accepts_five_and_six_fields() {
        use crate::timezone::Zone;
        let now = DateTime::parse_from_rfc3339("2025-03-01T10:00:30Z")
            .expect("valid time")
            .with_timezone(&Utc);
        let minutely = Schedule::new("* * * * *", Zone::named("UTC")).expect("5 fields");
        assert_eq!(
            minutely.next_after(now).map(|t| t.to_rfc3339()),
            Some("2025-03-01T10:01:00+00:00".to_owned())
        );
        let every_10s = Schedule::new("*/10 * * * * *", Zone::named("UTC")).expect("6 fields");
        assert_eq!(
            every_10s.next_after(now).map(|t| t.to_rfc3339()),
            Some("2025-03-01T10:00:40+00:00".to_owned())
        );
        let sao_paulo = Schedule::new("0 8 * * *", Zone::named("America/Sao_Paulo")).expect("tz");
        assert_eq!(
            sao_paulo.next_after(now).map(|t| t.to_rfc3339()),
            Some("2025-03-01T11:00:00+00:00".to_owned())
        );
        assert!(Schedule::new("not cron", None).is_err());
    }
}
