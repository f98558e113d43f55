//! `estafeta fleet --database URL`: the fleet as the central database sees it, read from the
//! `estafeta_fleet` view that heartbeats fill (`sql/<dialect>/agents.sql`, `sql/fleet.sql`),
//! with a flag per agent not seen lately, with an old backlog, or with dead letters.
//! PostgreSQL, MariaDB / MySQL and SQLite.

use anyhow::Context as _;
use serde::Serialize;

use crate::db::Dialect;
use crate::redact::{self, Secrets};

const FLEET_SQL: &str = include_str!("../../sql/fleet.sql");

/// One agent's last heartbeat, as the view shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FleetRow {
    pub agent_id: String,
    pub hostname: String,
    pub version: String,
    pub seen_secs_ago: i64,
    pub records_pending: i64,
    pub oldest_pending_age_secs: Option<i64>,
    pub dead_letters: i64,
    pub disk_free_bytes: Option<i64>,
    pub last_error: Option<String>,
}

impl FleetRow {
    /// `STALE` (not seen for `stale_secs`), `BACKLOG` (oldest pending older than
    /// `backlog_secs`), `DEAD` (dead letters).
    pub fn flags(&self, stale_secs: i64, backlog_secs: i64) -> Vec<&'static str> {
        let mut flags = Vec::new();
        if self.seen_secs_ago > stale_secs {
            flags.push("STALE");
        }
        if self
            .oldest_pending_age_secs
            .is_some_and(|a| a > backlog_secs)
        {
            flags.push("BACKLOG");
        }
        if self.dead_letters > 0 {
            flags.push("DEAD");
        }
        flags
    }
}

/// Every agent of the `estafeta_fleet` view at `url`, by agent id.
pub async fn load(url: &str) -> anyhow::Result<Vec<FleetRow>> {
    let shown = redact::url(url);
    let secrets = Secrets::of(url);
    let hint = "; the view appears with the first heartbeat an agent sends there (HEARTBEAT_SECS)";
    match Dialect::of(url)? {
        Dialect::Postgres => {
            // libpq's TLS settings, the same rules as the sink's (crate::db::postgres_tls).
            let mut pg = crate::db::postgres_tls::PgTls::from_url(url)?;
            if pg.clear_beyond_loopback() {
                tracing::warn!(url = %shown, "sslmode=disable to a host beyond loopback: the fleet's rows cross the network in clear text.");
            }
            if pg.config().get_application_name().is_none() {
                pg.config_mut().application_name("estafeta fleet");
            }
            let (client, connection) = pg.connect().await.map_err(|err| {
                anyhow::anyhow!(
                    "cannot connect to {shown}: {}",
                    secrets.scrub(&err.to_string())
                )
            })?;
            tokio::spawn(connection);
            let rows = client.query(FLEET_SQL, &[]).await.map_err(|err| {
                anyhow::anyhow!(
                    "reading estafeta_fleet at {shown}: {}{hint}",
                    secrets.scrub(&crate::sinks::error_chain(&err))
                )
            })?;
            Ok(rows
                .iter()
                .map(|r| FleetRow {
                    agent_id: r.get(0),
                    hostname: r.get(1),
                    version: r.get(2),
                    seen_secs_ago: r.get(3),
                    records_pending: r.get(4),
                    oldest_pending_age_secs: r.get(5),
                    dead_letters: r.get(6),
                    disk_free_bytes: r.get(7),
                    last_error: r.get(8),
                })
                .collect())
        }
        Dialect::Sqlite => {
            let path = crate::db::sqlite_path(url)?;
            let shown = format!("sqlite://{}", path.display());
            tokio::task::spawn_blocking(move || {
                let conn = rusqlite::Connection::open_with_flags(
                    &path,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                )
                .with_context(|| format!("cannot open {shown}"))?;
                let mut statement = conn
                    .prepare(FLEET_SQL)
                    .with_context(|| format!("reading estafeta_fleet at {shown}{hint}"))?;
                let rows = statement
                    .query_map([], |r| {
                        Ok(FleetRow {
                            agent_id: r.get(0)?,
                            hostname: r.get(1)?,
                            version: r.get(2)?,
                            seen_secs_ago: r.get(3)?,
                            records_pending: r.get(4)?,
                            oldest_pending_age_secs: r.get(5)?,
                            dead_letters: r.get(6)?,
                            disk_free_bytes: r.get(7)?,
                            last_error: r.get(8)?,
                        })
                    })?
                    .collect::<Result<Vec<_>, _>>()
                    .with_context(|| format!("reading estafeta_fleet at {shown}"))?;
                Ok(rows)
            })
            .await
            .context("the SQLite task failed")?
        }
        Dialect::Mysql => {
            use mysql_async::prelude::Queryable as _;
            // The sink's connection code: the same ssl-mode, ssl-ca, ssl-cert and ssl-key.
            let target = crate::db::mysql::MysqlTarget::parse(url)?;
            let (mut conn, _tls) = target.connect().await.map_err(|err| {
                anyhow::anyhow!(
                    "cannot connect to {shown}: {}",
                    err.message(|err| secrets.scrub(&crate::sinks::error_chain(&err)))
                )
            })?;
            type Row = (
                String,
                String,
                String,
                i64,
                i64,
                Option<i64>,
                i64,
                Option<i64>,
                Option<String>,
            );
            let rows: Vec<Row> = conn.query(FLEET_SQL).await.map_err(|err| {
                anyhow::anyhow!(
                    "reading estafeta_fleet at {shown}: {}{hint}",
                    secrets.scrub(&crate::sinks::error_chain(&err))
                )
            })?;
            let _ = conn.disconnect().await;
            Ok(rows
                .into_iter()
                .map(|r| FleetRow {
                    agent_id: r.0,
                    hostname: r.1,
                    version: r.2,
                    seen_secs_ago: r.3,
                    records_pending: r.4,
                    oldest_pending_age_secs: r.5,
                    dead_letters: r.6,
                    disk_free_bytes: r.7,
                    last_error: r.8,
                })
                .collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_mark_stale_backlog_and_dead_agents() {
        let row = |seen, oldest, dead| FleetRow {
            agent_id: "a".into(),
            hostname: "h".into(),
            version: "0.1.0".into(),
            seen_secs_ago: seen,
            records_pending: 0,
            oldest_pending_age_secs: oldest,
            dead_letters: dead,
            disk_free_bytes: None,
            last_error: None,
        };
        assert!(row(600, Some(1800), 0).flags(600, 1800).is_empty());
        assert_eq!(row(601, None, 0).flags(600, 1800), vec!["STALE"]);
        assert_eq!(
            row(0, Some(1801), 2).flags(600, 1800),
            vec!["BACKLOG", "DEAD"]
        );
    }
}
