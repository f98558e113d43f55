//! Logging: `tracing` to stderr and, when `LOG_DIR` is set, to a daily file
//! (`<LOG_DIR>/estafeta.YYYY-MM-DD.log`) written by a background thread that blocks instead of
//! dropping lines when it falls behind. The filter comes from `LOG_LEVEL`. Keep the returned
//! [`Guard`] alive until the process ends: dropping it flushes the file.
//!
//! `LOG_LEVEL=debug` or `trace` raises Estafeta's own lines only: the libraries below it log,
//! at those levels, request URLs with their user info (hyper, reqwest), SQL parameters — payloads
//! and record keys — (tokio-postgres, mysql_async) and connection details, so every other target
//! stays at INFO unless a directive names it (`LOG_LEVEL=debug,hyper=debug`, on purpose and
//! knowing that it logs data). Estafeta's own lines, at any level, carry no secret, payload
//! or record key (records are named by seq and id).

use std::io::IsTerminal as _;

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_appender::rolling::{RollingFileAppender, Rotation};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::Config;

/// File name prefix of the daily log files.
pub const LOG_FILE_PREFIX: &str = "estafeta";

/// Flushes the log file when dropped.
#[must_use = "dropping the guard stops writing the log file"]
pub struct Guard {
    _file: Option<WorkerGuard>,
}

/// Starts logging for `config`. Safe to call twice (the second call changes nothing). A log
/// folder that cannot be created is reported on stderr and logging goes on to stderr alone.
pub fn init(config: &Config) -> Guard {
    let mut file_error = None;
    let (file_writer, guard) = match &config.log_dir {
        Some(dir) => match open_appender(dir, config.log_retention_days) {
            Ok(appender) => {
                let (writer, guard) = NonBlockingBuilder::default()
                    .lossy(false)
                    .thread_name("estafeta-log")
                    .finish(appender);
                (Some(writer), Some(guard))
            }
            Err(err) => {
                file_error = Some(format!(
                    "could not open the log folder {}: {err}; logging to stderr only",
                    dir.display()
                ));
                (None, None)
            }
        },
        None => (None, None),
    };
    let file_layer = file_writer.map(|writer| {
        tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(writer)
    });
    let stderr_layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = tracing_subscriber::registry()
        .with(filter(&config.log_level))
        .with(stderr_layer)
        .with(file_layer)
        .try_init();
    if let Some(message) = file_error {
        tracing::warn!("{message}");
    }
    Guard { _file: guard }
}

/// Stderr-only logging at `level`, for the short CLI commands.
/// Whether `LOG_DIR` exists and belongs to another user than this process's (root running
/// `estafeta update` for the service user's folders).
pub fn dir_owned_by_other(config: &Config) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt as _;
        let Some(dir) = &config.log_dir else {
            return false;
        };
        match (std::fs::metadata(dir), std::fs::metadata("/proc/self")) {
            (Ok(dir), Ok(me)) => dir.uid() != me.uid(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = config;
        false
    }
}

pub fn init_stderr(level: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter(level))
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

fn filter(level: &str) -> EnvFilter {
    EnvFilter::builder()
        .parse(directives(level))
        .unwrap_or_else(|_| EnvFilter::new(crate::config::DEFAULT_LOG_LEVEL))
}

/// Estafeta's own targets, which a bare `debug` / `trace` level applies to.
const OWN_TARGETS: &[&str] = &["estafeta", "estafeta_staging"];

/// `LOG_LEVEL` as tracing directives: a bare `debug` or `trace` becomes `info` for every
/// target but Estafeta's own (see the module documentation); directives naming a target are
/// kept as written.
fn directives(level: &str) -> String {
    let parts: Vec<&str> = level
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    let (bare, targeted): (Vec<&str>, Vec<&str>) =
        parts.iter().partition(|d| !d.contains(['=', '[', ':']));
    let Some(default) = bare.last() else {
        return level.to_owned();
    };
    if !(default.eq_ignore_ascii_case("debug") || default.eq_ignore_ascii_case("trace")) {
        return level.to_owned();
    }
    let mut out = vec!["info".to_owned()];
    for own in OWN_TARGETS {
        let named = targeted.iter().any(|d| {
            d.strip_prefix(own)
                .is_some_and(|rest| rest.starts_with(['=', '[']))
        });
        if !named {
            out.push(format!("{own}={default}"));
        }
    }
    out.extend(targeted.iter().map(|d| (*d).to_owned()));
    out.join(",")
}

/// The daily file appender, in a folder made private (0700: the lines name records by seq and
/// id, and errors name hosts). Files this process creates are 0600 through its umask (see
/// [`restrict_new_files`]); files an earlier version left readable are narrowed here. The
/// appender deletes all but the newest `retention_days` files at start and at each new day.
fn open_appender(
    dir: &std::path::Path,
    retention_days: u64,
) -> std::io::Result<RollingFileAppender> {
    std::fs::create_dir_all(dir)?;
    estafeta_staging::make_private(dir)?;
    narrow_old_files(dir);
    let mut builder = RollingFileAppender::builder()
        .rotation(Rotation::DAILY)
        .filename_prefix(LOG_FILE_PREFIX)
        .filename_suffix("log");
    if retention_days > 0 {
        builder = builder.max_log_files(usize::try_from(retention_days).unwrap_or(usize::MAX));
    }
    builder.build(dir).map_err(std::io::Error::other)
}

/// Makes this process's new files private (umask 077 on Unix: files 0600, folders 0700), for the
/// daemon and `flush`, which create log files and may create the embedded SQLite database.
/// Not for `update`: dpkg and its maintainer scripts inherit the umask.
pub fn restrict_new_files() {
    #[cfg(unix)]
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

/// Log files an earlier version created 0644 become 0600 (best effort: a file this user does not
/// own is left as it is).
fn narrow_old_files(dir: &std::path::Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let ours = name
                .to_str()
                .is_some_and(|n| n.starts_with(LOG_FILE_PREFIX));
            let open = entry
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o077 != 0);
            if ours && open {
                let _ =
                    std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o600));
            }
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_debug_or_trace_level_raises_estafeta_only() {
        assert_eq!(
            directives("trace"),
            "info,estafeta=trace,estafeta_staging=trace"
        );
        assert_eq!(
            directives("debug,hyper=debug"),
            "info,estafeta=debug,estafeta_staging=debug,hyper=debug"
        );
        assert_eq!(
            directives("trace,estafeta=debug"),
            "info,estafeta_staging=trace,estafeta=debug"
        );
        for kept in ["info", "warn,estafeta=trace", "off", "info,estafeta=debug"] {
            assert_eq!(directives(kept), kept);
        }
    }
}
