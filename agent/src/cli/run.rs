//! `estafeta run`: the daemon until SIGINT or SIGTERM, and the hand-over to a new version an
//! update prepared (`exec` on Unix, so the service manager sees the same process).

use std::path::{Path, PathBuf};

use crate::config::Config;

use super::{EXIT_FAILURE, EXIT_OK, runtime};

pub(super) fn run_daemon(config: Config) -> anyhow::Result<u8> {
    crate::logging::restrict_new_files();
    let guard = crate::logging::init(&config);
    let runtime = runtime()?;
    // The arguments this process was started with: a trial child and the handover use them.
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let result: anyhow::Result<Option<PathBuf>> = runtime.block_on(async {
        // Registered before anything else so an early SIGTERM is a clean stop, not a kill.
        let signal = imp::shutdown_signal()?;
        let stop = tokio_util::sync::CancellationToken::new();
        let on_signal = stop.clone();
        tokio::spawn(async move {
            signal.await;
            on_signal.cancel();
        });
        loop {
            let until = stop.clone();
            let exit =
                crate::daemon::run_until(config.clone(), until.cancelled_owned(), true, None)
                    .await?;
            let crate::daemon::Exit::Update(prepared) = exit else {
                return Ok(None);
            };
            match crate::update::takeover(&config.update_context(), prepared, args.clone(), &stop)
                .await
            {
                crate::update::Handover::Exec(exe) => return Ok(Some(exe)),
                crate::update::Handover::Resume if stop.is_cancelled() => return Ok(None),
                crate::update::Handover::Resume => {
                    tracing::info!("Starting the running version again.");
                }
            }
        }
    });
    drop(runtime);
    match result {
        Ok(None) => Ok(EXIT_OK),
        Ok(Some(exe)) => {
            tracing::info!(exe = %exe.display(), "Handing over to the new version.");
            drop(guard);
            Ok(hand_over(&exe, &args))
        }
        Err(err) => {
            tracing::error!(error = %format!("{err:#}"), "Estafeta stopped with an error.");
            Ok(EXIT_FAILURE)
        }
    }
}

/// Replaces this process with the new executable (Unix `exec`: same PID, so systemd's
/// `Type=notify` sees the same main process). Returns only when that failed.
#[cfg(unix)]
fn hand_over(exe: &Path, args: &[std::ffi::OsString]) -> u8 {
    use std::os::unix::process::CommandExt as _;
    let err = std::process::Command::new(exe).args(args).exec();
    eprintln!(
        "estafeta: could not start the new version {}: {err}; start the agent again",
        exe.display()
    );
    EXIT_FAILURE
}

/// Elsewhere: starts the new executable and exits (not checked on Windows; see
/// installer/README.md).
#[cfg(not(unix))]
fn hand_over(exe: &Path, args: &[std::ffi::OsString]) -> u8 {
    match std::process::Command::new(exe).args(args).spawn() {
        Ok(_) => EXIT_OK,
        Err(err) => {
            eprintln!(
                "estafeta: could not start the new version {}: {err}; start the agent again",
                exe.display()
            );
            EXIT_FAILURE
        }
    }
}

#[cfg(unix)]
mod imp {
    use std::future::Future;

    use anyhow::Context as _;
    use tokio::signal::unix::{SignalKind, signal};

    /// Resolves on the first SIGINT or SIGTERM. Call inside the runtime.
    pub fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
        let mut interrupt =
            signal(SignalKind::interrupt()).context("could not listen for SIGINT")?;
        let mut terminate =
            signal(SignalKind::terminate()).context("could not listen for SIGTERM")?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => tracing::info!(signal = "SIGINT", "Stop requested."),
                _ = terminate.recv() => tracing::info!(signal = "SIGTERM", "Stop requested."),
            }
        })
    }
}

#[cfg(not(unix))]
mod imp {
    use std::future::Future;

    /// Resolves on the first Ctrl-C (or the service manager's stop, which sends one).
    pub fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
        Ok(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                tracing::info!(signal = "ctrl-c", "Stop requested.");
            } else {
                // Without a signal handler the only stop left is the process being killed.
                std::future::pending::<()>().await;
            }
        })
    }
}

// ---------------------------------------------------------------------------------------------
