//! How a SQL source's connection is protected, read from its URL, for `check-config`
//! (issue 20: "for every connection, whether it is encrypted and verified").
//!
//! PostgreSQL and MySQL URLs follow the same rules as the database sinks. An ODBC connection
//! string is read the way its driver reads it: SQL Server (`Encrypt`, `TrustServerCertificate`;
//! Microsoft's ODBC Driver 18 encrypts by default, 17 does not), FreeTDS (`Encryption`),
//! psqlODBC (`SSLmode`). Other drivers (Oracle, InterSystems) keep encryption in their own
//! configuration (Oracle: `sqlnet.ora`), which the agent cannot read: "not known", and the
//! README says where to set it.

use crate::tls::{Transport, Verify};

/// The protection a source's URL asks for.
pub fn of(url: &str) -> Transport {
    match super::query::Driver::of(url) {
        Ok(super::query::Driver::Odbc) => odbc(&url["odbc:".len()..]),
        Ok(super::query::Driver::Sqlite) => Transport::local(),
        Ok(super::query::Driver::MySql) => match crate::db::mysql::MysqlTarget::parse(url) {
            Ok(target) => target.transport(),
            Err(err) => Transport::unknown(format!("the URL is not valid: {err}")),
        },
        Ok(super::query::Driver::Postgres) => match crate::db::postgres_tls::PgTls::from_url(url) {
            Ok(pg) => pg.transport(),
            Err(err) => Transport::unknown(format!("the URL is not valid: {err}")),
        },
        Err(err) => Transport::unknown(format!("the URL is not valid: {err}")),
    }
}

/// The protection an `odbc:` connection string asks for.
pub fn odbc(connection_string: &str) -> Transport {
    let attributes = crate::redact::odbc_attributes(connection_string);
    let get = |name: &str| {
        attributes
            .iter()
            .rev()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim_matches(['{', '}']).to_ascii_lowercase())
    };
    let driver = get("Driver").unwrap_or_default();
    let yes = |v: &str| matches!(v, "yes" | "true" | "1" | "mandatory" | "strict");
    if driver.contains("freetds") || driver.contains("tdsodbc") {
        return match get("Encryption").as_deref() {
            Some("require") | Some("strict") => Transport::tls(
                Verify::Nothing,
                "FreeTDS Encryption=require (certificate checked only with `ca file` in freetds.conf)",
            ),
            Some(other) => Transport::clear(format!("FreeTDS Encryption={other}")),
            None => Transport::unknown(
                "FreeTDS: Encryption not in the connection string; see freetds.conf",
            ),
        };
    }
    if driver.contains("sql server") {
        let encrypt = get("Encrypt");
        let strict = encrypt.as_deref() == Some("strict");
        // ODBC Driver 18 and later encrypt unless told not to; 17 and earlier do not.
        let default_on = ["18", "19", "20"].iter().any(|v| driver.contains(v));
        let on = encrypt.as_deref().map_or(default_on, yes);
        let trust = get("TrustServerCertificate").is_some_and(|v| yes(&v));
        let setting = format!(
            "Encrypt={}, TrustServerCertificate={}",
            encrypt
                .as_deref()
                .unwrap_or(if default_on { "(yes)" } else { "(no)" }),
            if trust { "yes" } else { "no" }
        );
        return if !on {
            Transport::clear(setting)
        } else if trust && !strict {
            Transport::tls(Verify::Nothing, setting)
        } else {
            Transport::tls(Verify::Full, setting)
        };
    }
    if driver.contains("postgres") || driver.contains("psqlodbc") {
        return match get("SSLmode").as_deref() {
            Some(mode @ ("verify-full" | "verify-ca")) => {
                Transport::tls(Verify::Full, format!("SSLmode={mode}"))
            }
            Some("require") => Transport::tls(Verify::Nothing, "SSLmode=require"),
            Some(mode) => Transport::clear(format!("SSLmode={mode}")),
            None => Transport::clear("psqlODBC without SSLmode (prefer: TLS only if offered)"),
        };
    }
    Transport::unknown(format!(
        "driver {driver:?} keeps encryption in its own configuration (Oracle: sqlnet.ora); see the README"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn said(s: &str) -> (bool, bool) {
        let t = odbc(s);
        (t.tls, t.verified)
    }

    #[test]
    fn sql_server_strings_say_what_their_driver_does() {
        let d18 = "Driver={ODBC Driver 18 for SQL Server};Server=db;UID=u;PWD={a;b}";
        assert_eq!(
            said(d18),
            (true, true),
            "18 encrypts and verifies by default"
        );
        assert_eq!(
            said(&format!("{d18};TrustServerCertificate=yes")),
            (true, false)
        );
        assert_eq!(said(&format!("{d18};Encrypt=no")), (false, false));
        let d17 = "Driver={ODBC Driver 17 for SQL Server};Server=db";
        assert_eq!(said(d17), (false, false), "17 does not encrypt by default");
        assert_eq!(
            said(&format!("{d17};Encrypt=yes;TrustServerCertificate=no")),
            (true, true)
        );
        assert_eq!(
            said(&format!("{d17};encrypt=Strict;TrustServerCertificate=yes")),
            (true, true)
        );
    }

    #[test]
    fn freetds_postgres_and_other_drivers() {
        assert_eq!(
            said("Driver=FreeTDS;Server=h;Encryption=require"),
            (true, false)
        );
        assert_eq!(
            said("Driver=FreeTDS;Server=h;Encryption=off"),
            (false, false)
        );
        assert_eq!(
            said("Driver={PostgreSQL Unicode};Server=h;SSLmode=verify-full"),
            (true, true)
        );
        assert_eq!(
            said("Driver={PostgreSQL Unicode};Server=h;SSLmode=require"),
            (true, false)
        );
        let oracle = odbc("Driver={Oracle 21 ODBC driver};Dbq=MV");
        assert!(
            oracle.describe().starts_with("encryption not known"),
            "{}",
            oracle.describe()
        );
        assert!(oracle.describe().contains("sqlnet.ora"));
    }
}
