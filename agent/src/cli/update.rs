//! `estafeta update`: checks UPDATE_URL's signed manifest and installs a newer version, or asks
//! the running agent to do it when it holds the port the trial needs.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;

use crate::config::Config;

use super::{EXIT_OK, runtime, write_stdout};

/// The arguments of `estafeta update`.
#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// Only say whether a newer version is available; change nothing.
    #[arg(long)]
    pub check: bool,
    /// Also install an older signed version than the running one (going back on purpose).
    /// The archive's signed version must still be the one the manifest offers.
    #[arg(long, conflicts_with = "check")]
    pub allow_downgrade: bool,
}

/// `POST /v1/update` to the running agent, on loopback when it listens on a wildcard address
/// (its `Host` check admits that), with `INGEST_TOKEN` (or `INGEST_TOKEN_FILE`'s) when set.
async fn ask_daemon_to_update(config: &Config) -> anyhow::Result<()> {
    // https:// trusting INGEST_TLS_CERT when the API is served over TLS.
    let (base, client) = crate::api_tls::local_client(
        crate::ingest::local_addr(config.ingest_addr),
        config.ingest_tls.as_ref().map(|tls| tls.cert.as_path()),
        Duration::from_secs(10),
    )?;
    let mut request = client
        .post(format!("{base}/v1/update"))
        .header(crate::ingest::access::REQUESTED_BY, "estafeta");
    if let Some(token) = &config.ingest_token {
        request = request.bearer_auth(token);
    }
    let answer = request.send().await.with_context(|| {
        format!(
            "could not reach the agent on {} (INGEST_ADDR)",
            config.ingest_addr
        )
    })?;
    let code = answer.status();
    if code != reqwest::StatusCode::ACCEPTED {
        let body = answer.text().await.unwrap_or_default();
        anyhow::bail!(
            "the agent on {} answered {code} to POST /v1/update: {body}; is it the same agent (same INGEST_ADDR, INGEST_TOKEN and UPDATE_URL)?",
            config.ingest_addr
        );
    }
    Ok(())
}

/// `estafeta update [--check | --allow-downgrade]`.
pub(super) fn update(
    config: Config,
    env_file: Option<&Path>,
    check_only: bool,
    allow_downgrade: bool,
) -> anyhow::Result<u8> {
    use crate::update::{AssetKind, Handover, install};
    // Run as root for a package install, a daily log file created now would belong to root and
    // the service (user `estafeta`) could no longer append to it: log to the terminal instead.
    let _guard = if crate::logging::dir_owned_by_other(&config) {
        crate::logging::init_stderr(&config.log_level);
        None
    } else {
        Some(crate::logging::init(&config))
    };
    let current = crate::version::current();
    let context = config.update_context();
    let checked = crate::update::check(&context)?;
    let offered = checked.manifest.version.clone();
    // Only a strictly newer version, unless asked for an older one on purpose. Either way the
    // archive's signed VERSION decides (`update::prepare`); the manifest's is only a hint.
    let downgrade = allow_downgrade && !checked.newer && offered != current;
    if !checked.newer && !downgrade {
        write_stdout(&format!(
            "estafeta {current} is up to date (the manifest offers {offered})\n"
        ));
        return Ok(EXIT_OK);
    }
    if check_only {
        write_stdout(&format!(
            "version {offered} is available (running {current}); `estafeta update` installs it\n"
        ));
        return Ok(EXIT_OK);
    }
    let exe = crate::update::current_exe()?;
    let kind = install::detect(&exe);
    let agent_runs = std::net::TcpStream::connect_timeout(
        &crate::ingest::local_addr(config.ingest_addr),
        Duration::from_secs(1),
    )
    .is_ok();
    if kind == AssetKind::Binary && agent_runs && downgrade {
        anyhow::bail!(
            "an agent runs on {}, and it never installs an older version; stop it, then run `estafeta update --allow-downgrade` again",
            config.ingest_addr
        );
    }
    if kind == AssetKind::Binary && agent_runs {
        // The running agent holds the port the trial needs: it does the update itself.
        runtime()?.block_on(ask_daemon_to_update(&config))?;
        write_stdout(&format!(
            "version {offered} is available; the agent running on {} is installing it now (drain, trial, hand-over or rollback); follow it with `estafeta status` (line \"update:\")\n",
            config.ingest_addr
        ));
        return Ok(EXIT_OK);
    }
    let prepared = crate::update::prepare(&context, &checked.manifest, kind, downgrade)?;
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    if let Some(file) = env_file {
        args.push("--env-file".into());
        args.push(file.as_os_str().to_owned());
    }
    args.push("run".into());
    match kind {
        AssetKind::Binary => {
            let stop = tokio_util::sync::CancellationToken::new();
            let (handover, message) = runtime()?.block_on(crate::update::takeover_with_message(
                &context, prepared, args, &stop,
            ));
            match handover {
                Handover::Exec(_) => {
                    write_stdout(&format!("{message}\nstart the agent again to run it\n"));
                    Ok(EXIT_OK)
                }
                Handover::Resume => Err(anyhow::anyhow!(message)),
            }
        }
        AssetKind::Deb => {
            use crate::update::package::{PackageOutcome, update_deb};
            match runtime()?.block_on(update_deb(&context, &prepared, args))? {
                PackageOutcome::Installed(message) => {
                    crate::update::state::record_updated(&config.staging_path, &message);
                    write_stdout(&format!("{message}\n"));
                    Ok(EXIT_OK)
                }
                PackageOutcome::RolledBack(message) => Err(anyhow::anyhow!(message)),
            }
        }
        AssetKind::Msi => {
            install::install_package(kind, &prepared.file)?;
            let message = format!(
                "version {offered} was handed to the package manager ({}); check `estafeta status` once the service is back",
                kind.as_str()
            );
            crate::update::state::record_updated(&config.staging_path, &message);
            write_stdout(&format!("{message}\n"));
            Ok(EXIT_OK)
        }
    }
}
