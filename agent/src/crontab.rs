//! Cron expressions as every schedule in the agent takes them (`CRONTAB`, `UPDATE_CRONTAB`, a
//! source's `schedule`): checked once, here, at the bottom of the module graph.

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
}
