//! Logging: `tracing` to stderr and, when `LOG_DIR` is set, to a daily file
//! (`<LOG_DIR>/estafeta.YYYY-MM-DD.log`) written by a background thread that blocks instead of
//! dropping lines when it falls behind. The filter comes from `LOG_LEVEL`. Keep the returned
//! [`Guard`] alive until the process ends: dropping it flushes the file.

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
        Some(dir) => match open_appender(dir) {
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
        .parse(level)
        .unwrap_or_else(|_| EnvFilter::new(crate::config::DEFAULT_LOG_LEVEL))
}

fn open_appender(dir: &std::path::Path) -> std::io::Result<RollingFileAppender> {
    std::fs::create_dir_all(dir)?;
    RollingFileAppender::builder()
        .rotation(Rotation::DAILY)
        .filename_prefix(LOG_FILE_PREFIX)
        .filename_suffix("log")
        .build(dir)
        .map_err(std::io::Error::other)
}
