//! `estafeta relay`: the central-side consumer ([`crate::relay`]) until SIGINT or SIGTERM.

use clap::Args;

use crate::config::Config;

use super::{EXIT_FAILURE, EXIT_OK, runtime, usage};

/// The arguments of `estafeta relay`.
#[derive(Debug, Args)]
pub struct RelayArgs {
    /// The partitions this relay consumes, such as 0-3 or 0,2 (overrides RELAY_PARTITIONS);
    /// default: all of CENTRAL_NATS_PARTITIONS.
    #[arg(long, value_name = "LIST")]
    pub partitions: Option<String>,
}

pub(super) fn relay(config: Config, args: RelayArgs) -> anyhow::Result<u8> {
    let chosen = match args.partitions.as_deref() {
        Some(text) => Some(
            crate::config::relay::parse_partition_list(text)
                .map_err(|expected| usage(format!("--partitions {text:?}: {expected}")))?,
        ),
        None => None,
    };
    let _guard = crate::logging::init(&config);
    let runtime = runtime()?;
    let result = runtime.block_on(async {
        let stop = tokio_util::sync::CancellationToken::new();
        let on_signal = stop.clone();
        let signal = shutdown_signal()?;
        tokio::spawn(async move {
            signal.await;
            tracing::info!("Stopping the relay; a batch not yet acknowledged will be redelivered.");
            on_signal.cancel();
        });
        crate::relay::run(config, chosen, stop).await
    });
    match result {
        Ok(()) => Ok(EXIT_OK),
        Err(err) => {
            tracing::error!(error = %format!("{err:#}"), "The relay stopped with an error.");
            eprintln!("estafeta relay: {err:#}");
            Ok(EXIT_FAILURE)
        }
    }
}

/// SIGINT or SIGTERM (Ctrl-C elsewhere).
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}
