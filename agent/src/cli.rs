//! The command line: one binary, `estafeta run` for the daemon and the offline tools beside it
//! (`stage`, `ls`, `show`, `status`, `flush`, `retry`, `reindex`, `check-config`, `update`,
//! `version`, `token`),
//! and `service`, the Windows service entry point.
//! The tools open the staging store directly; the daemon may be running at the same time.
//!
//! Exit codes:
//!
//! | code | meaning |
//! | ---- | ------- |
//! | 0 | success |
//! | 1 | runtime failure (the store, a sink or the disk failed; a record was not found) |
//! | 2 | usage or configuration error (bad arguments, a configuration mistake, bad input to `stage`) |
//! | 3 | `check-config` found a sink it could not reach |
//! | 4 | staging is full or refuses writes (`stage`) |

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use estafeta_staging::{ListFilter, StageError, Staging, StoreError};
use serde_json::{Value, json};

use crate::config::{Config, ConfigError};

/// Success.
pub const EXIT_OK: u8 = 0;
/// A runtime failure.
pub const EXIT_FAILURE: u8 = 1;
/// A usage or configuration error.
pub const EXIT_USAGE: u8 = 2;
/// `check-config` could not reach a sink.
pub const EXIT_UNREACHABLE: u8 = 3;
/// Staging is full or refuses writes.
pub const EXIT_REFUSED: u8 = 4;

/// How long `check-config` waits for each sink to answer.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest error text shown in a table cell, in characters.
const MAX_CELL_CHARS: usize = 60;

/// Offline-first store-and-forward agent: stages every write on local disk, then delivers it
/// to the central database and APIs when they are reachable.
#[derive(Debug, Parser)]
#[command(name = "estafeta", version = crate::version::current(), about, propagate_version = true)]
pub struct Cli {
    /// Read this .env file instead of ./.env (it must exist). The installed service uses
    /// /etc/estafeta/estafeta.env (Linux) or %ProgramData%\Estafeta\estafeta.env (Windows).
    #[arg(long, global = true, value_name = "PATH", env = "ESTAFETA_ENV_FILE")]
    pub env_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: ingest API, batcher and sinks, until SIGINT or SIGTERM.
    Run,
    /// Stage a JSON object (or an array of objects, all or nothing) from FILE or stdin.
    Stage {
        /// What happened: create, update, delete, upsert, … ([a-z0-9_-]).
        action: String,
        /// What it happened to: patient, attendance, … ([a-z0-9_-]).
        entity: String,
        /// JSON file to read; `-` or nothing reads stdin.
        file: Option<PathBuf>,
        /// Record key (default: the entity's key field in the payload, `id` unless configured).
        #[arg(long, value_name = "K")]
        key: Option<String>,
    },
    /// List staged records (or dead letters with --failed), oldest first.
    Ls {
        /// List dead letters instead of pending records.
        #[arg(long)]
        failed: bool,
        #[arg(long, value_name = "A")]
        action: Option<String>,
        #[arg(long, value_name = "E")]
        entity: Option<String>,
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// One JSON object per line: id, seq, action, entity, key, state, attempts, last_error, path.
        #[arg(long)]
        json: bool,
    },
    /// Show one record (by id, sequence number, or a segment or dead-letter file) as JSON.
    Show {
        #[arg(value_name = "ID|SEQ|PATH")]
        target: String,
    },
    /// Pending, dead and last results per sink and per action/entity; disk free; version.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Deliver what is pending now, once, and print what happened per sink.
    Flush {
        /// Only this sink.
        #[arg(long, value_name = "S")]
        sink: Option<String>,
        /// At most N records per sink (default MAX_RECORDS).
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
    },
    /// List dead letters to requeue; with --send, put them back in line in sequence order.
    Retry {
        /// Dead-letter folder (default FAILED_DIR, or <staging>/_failed).
        #[arg(long, value_name = "D")]
        dir: Option<PathBuf>,
        /// One dead-letter file.
        #[arg(long, value_name = "F", conflicts_with = "dir")]
        file: Option<PathBuf>,
        /// Requeue for real (without it, only list what would be requeued).
        #[arg(long)]
        send: bool,
        /// Copy each requeued dead-letter file into DIR first.
        #[arg(long, value_name = "DIR")]
        move_ok: Option<PathBuf>,
        /// At most N dead letters.
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// Show every field of each dead letter.
        #[arg(long)]
        verbose: bool,
    },
    /// Rebuild the staging index from the folder (stop the daemon first).
    Reindex,
    /// The SQL sources: checkpoint, last run, rows read in the last cycle, last error.
    Sources {
        #[command(subcommand)]
        command: Option<SourcesCommand>,
        /// One JSON object per source.
        #[arg(long)]
        json: bool,
    },
    /// Print the effective configuration (secrets hidden), every mistake, and whether each
    /// sink answers.
    CheckConfig {
        /// Do not try to reach the sinks.
        #[arg(long)]
        offline: bool,
    },
    /// The fleet's last heartbeats in a central database: one line per agent, flagged STALE,
    /// BACKLOG or DEAD. Reads no local configuration.
    Fleet {
        /// postgres://…, mysql://… (MariaDB too) or sqlite://PATH: the central database the
        /// agents' heartbeats reach.
        #[arg(long, value_name = "URL")]
        database: String,
        /// Flag agents not heard from for more than this many minutes.
        #[arg(long, value_name = "N", default_value_t = 10)]
        stale_minutes: u64,
        /// Flag agents whose oldest pending record is older than this many minutes.
        #[arg(long, value_name = "N", default_value_t = 30)]
        backlog_minutes: u64,
        /// One JSON object per agent and line, with its flags.
        #[arg(long)]
        json: bool,
    },
    /// Check UPDATE_URL's release manifest and install a newer version: signature and signed
    /// version checked, tried, rolled back if it does not report ready within
    /// UPDATE_HEALTH_SECS. A plain install replaces its executable (stop the agent first, or let
    /// UPDATE_CRONTAB do it); a .deb or MSI install is handed to dpkg / msiexec (run it as an
    /// administrator).
    Update {
        /// Only say whether a newer version is available; change nothing.
        #[arg(long)]
        check: bool,
        /// Also install an older signed version than the running one (going back on purpose).
        /// The archive's signed version must still be the one the manifest offers.
        #[arg(long, conflicts_with = "check")]
        allow_downgrade: bool,
    },
    /// Print the version.
    Version,
    /// Print a new random token for INGEST_TOKEN (64 hex characters from the operating
    /// system's random source).
    Token,
    /// Run as the Windows service `Estafeta` (started by Windows, not from a console). Its env
    /// file is --env-file or %ProgramData%\Estafeta\estafeta.env, created from
    /// estafeta.env.default beside the executable when missing.
    Service {
        /// Only create the data folder and the env file when missing, then exit.
        #[arg(long)]
        prepare_only: bool,
    },
}

/// `estafeta sources …`.
#[derive(Debug, Subcommand)]
pub enum SourcesCommand {
    /// Rewind a source on purpose: its next cycle reads from the start (the initial load
    /// again), or from just after VALUE. Records already staged are not touched.
    Reset {
        /// The source's name.
        name: String,
        /// The checkpoint to go back to: `1500`, or a JSON array with one value per
        /// checkpoint column (`'["2026-11-01T00:00:00Z", 0]'`).
        #[arg(long, value_name = "VALUE")]
        to: Option<String>,
    },
}

/// Bad input on the command line (not a clap error): exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

fn usage(message: impl Into<String>) -> anyhow::Error {
    UsageError(message.into()).into()
}

/// Parses the arguments, runs the command and returns its exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return ExitCode::from(if err.use_stderr() {
                EXIT_USAGE
            } else {
                EXIT_OK
            });
        }
    };
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            report(&err);
            ExitCode::from(exit_code(&err))
        }
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<u8> {
    let env_file = cli.env_file.as_deref();
    match cli.command {
        Command::Version => {
            write_stdout(&format!("estafeta {}\n", crate::version::current()));
            Ok(EXIT_OK)
        }
        Command::Token => {
            write_stdout(&format!("{}\n", crate::ingest::token::generate()?));
            Ok(EXIT_OK)
        }
        Command::CheckConfig { offline } => check_config(env_file, offline),
        Command::Fleet {
            database,
            stale_minutes,
            backlog_minutes,
            json,
        } => fleet(&database, stale_minutes, backlog_minutes, json),
        Command::Service { prepare_only } => service(env_file, prepare_only),
        command => {
            let config = Config::load(env_file)?;
            match command {
                Command::Run => run_daemon(config),
                Command::Update {
                    check,
                    allow_downgrade,
                } => update(config, env_file, check, allow_downgrade),
                Command::Stage {
                    action,
                    entity,
                    file,
                    key,
                } => stage(&config, &action, &entity, file.as_deref(), key),
                Command::Ls {
                    failed,
                    action,
                    entity,
                    limit,
                    json,
                } => ls(&config, failed, action, entity, limit, json),
                Command::Show { target } => show(&config, &target),
                Command::Status { json } => status(&config, json),
                Command::Flush { sink, limit } => flush(config, sink, limit),
                Command::Retry {
                    dir,
                    file,
                    send,
                    move_ok,
                    limit,
                    verbose,
                } => retry(&config, dir, file, send, move_ok, limit, verbose),
                Command::Reindex => reindex(&config),
                Command::Sources { command, json } => match command {
                    None => sources(&config, json),
                    Some(SourcesCommand::Reset { name, to }) => {
                        reset_source(&config, &name, to.as_deref())
                    }
                },
                Command::Version
                | Command::Token
                | Command::CheckConfig { .. }
                | Command::Fleet { .. }
                | Command::Service { .. } => {
                    unreachable!("handled above")
                }
            }
        }
    }
}

/// `estafeta fleet`: the `estafeta_fleet` view as a table (or JSON lines).
fn fleet(
    database: &str,
    stale_minutes: u64,
    backlog_minutes: u64,
    json: bool,
) -> anyhow::Result<u8> {
    let rows = runtime()?.block_on(crate::fleet::load(database))?;
    let stale = i64::try_from(stale_minutes.saturating_mul(60)).unwrap_or(i64::MAX);
    let backlog = i64::try_from(backlog_minutes.saturating_mul(60)).unwrap_or(i64::MAX);
    let mut out = String::new();
    if json {
        for row in &rows {
            let mut value = serde_json::to_value(row).context("writing a fleet row as JSON")?;
            value["flags"] = serde_json::json!(row.flags(stale, backlog));
            out.push_str(&value.to_string());
            out.push('\n');
        }
        write_stdout(&out);
        return Ok(EXIT_OK);
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.agent_id.clone(),
                r.hostname.clone(),
                r.version.clone(),
                format!("{} ago", age(r.seen_secs_ago)),
                r.records_pending.to_string(),
                r.oldest_pending_age_secs
                    .map(age)
                    .unwrap_or_else(|| "-".into()),
                r.dead_letters.to_string(),
                r.disk_free_bytes
                    .and_then(|b| u64::try_from(b).ok())
                    .map(bytes)
                    .unwrap_or_else(|| "-".into()),
                {
                    let flags = r.flags(stale, backlog);
                    if flags.is_empty() {
                        "ok".into()
                    } else {
                        flags.join(",")
                    }
                },
                r.last_error
                    .as_deref()
                    .map(|e| shorten(e, 60))
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "AGENT",
            "HOST",
            "VERSION",
            "SEEN",
            "PENDING",
            "OLDEST_PENDING",
            "DEAD",
            "DISK_FREE",
            "FLAGS",
            "LAST_ERROR",
        ],
        &cells,
    ));
    let flagged = rows
        .iter()
        .filter(|r| !r.flags(stale, backlog).is_empty())
        .count();
    out.push_str(&format!(
        "{} agent(s), {flagged} flagged (STALE: not seen for {stale_minutes} min; BACKLOG: oldest pending over {backlog_minutes} min; DEAD: dead letters)\n",
        rows.len()
    ));
    write_stdout(&out);
    Ok(EXIT_OK)
}

fn report(err: &anyhow::Error) {
    if let Some(config) = err.downcast_ref::<ConfigError>() {
        eprintln!(
            "estafeta: the configuration has {} problem{}:",
            config.problems.len(),
            if config.problems.len() == 1 { "" } else { "s" }
        );
        for problem in &config.problems {
            eprintln!("  {problem}");
        }
        eprintln!("Run `estafeta check-config` to see the effective configuration.");
    } else {
        eprintln!("estafeta: {err:#}");
    }
}

/// The exit code for an error, by its type.
fn exit_code(err: &anyhow::Error) -> u8 {
    if err.downcast_ref::<ConfigError>().is_some() || err.downcast_ref::<UsageError>().is_some() {
        return EXIT_USAGE;
    }
    match err.downcast_ref::<StageError>() {
        Some(StageError::Full(_) | StageError::Poisoned(_) | StageError::Closed) => EXIT_REFUSED,
        Some(StageError::Invalid(_) | StageError::UnknownSink(..) | StageError::Conflict(_)) => {
            EXIT_USAGE
        }
        _ => EXIT_FAILURE,
    }
}

/// Writes to stdout; a closed pipe (`estafeta ls | head`) is not an error.
fn write_stdout(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("could not start the async runtime")
}

fn open_store(config: &Config) -> anyhow::Result<Staging> {
    let (store, _report) = Staging::open(config.staging_options()).with_context(|| {
        format!(
            "could not open the staging folder {}",
            config.staging_path.display()
        )
    })?;
    Ok(store)
}

// ---------------------------------------------------------------------------------------------
// run

fn run_daemon(config: Config) -> anyhow::Result<u8> {
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
                crate::daemon::run_until(config.clone(), until.cancelled_owned(), true).await?;
            let crate::daemon::Exit::Update(prepared) = exit else {
                return Ok(None);
            };
            match crate::update::takeover(&config, prepared, args.clone(), &stop).await {
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

/// `POST /v1/update` to the running agent, on loopback when it listens on a wildcard address
/// (its `Host` check admits that), with `INGEST_TOKEN` (or `INGEST_TOKEN_FILE`'s) when set.
async fn ask_daemon_to_update(config: &Config) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .context("could not build the HTTP client")?;
    let addr = crate::ingest::local_addr(config.ingest_addr);
    let mut request = client
        .post(format!("http://{addr}/v1/update"))
        .header(crate::ingest::dead_letters::REQUESTED_BY, "estafeta");
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
fn update(
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
    let checked = crate::update::check(&config)?;
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
    let prepared = crate::update::prepare(&config, &checked.manifest, kind, downgrade)?;
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
                &config, prepared, args, &stop,
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
            match runtime()?.block_on(update_deb(&config, &prepared, args))? {
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

/// `estafeta service`: the Windows service, or only its data folder with `--prepare-only`.
fn service(env_file: Option<&Path>, prepare_only: bool) -> anyhow::Result<u8> {
    if prepare_only {
        let (path, outcome) = crate::winservice::prepare(env_file)?;
        write_stdout(&match outcome {
            crate::winservice::EnvFile::Created => {
                format!("created {} from the template\n", path.display())
            }
            crate::winservice::EnvFile::Kept => format!("kept {} as it is\n", path.display()),
        });
        return Ok(EXIT_OK);
    }
    #[cfg(windows)]
    {
        crate::winservice::run(env_file)?;
        Ok(EXIT_OK)
    }
    #[cfg(not(windows))]
    {
        Err(usage(
            "`estafeta service` runs the agent as a Windows service; on Linux the systemd unit runs `estafeta run` (systemctl start estafeta), in a console use `estafeta run`",
        ))
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
// stage

fn stage(
    config: &Config,
    action: &str,
    entity: &str,
    file: Option<&Path>,
    key: Option<String>,
) -> anyhow::Result<u8> {
    crate::intake::Intake::check_names(action, entity).map_err(|err| usage(err.message))?;
    let (text, source) = match file {
        None => (read_stdin()?, "stdin".to_owned()),
        Some(path) if path == Path::new("-") => (read_stdin()?, "stdin".to_owned()),
        Some(path) => (
            std::fs::read_to_string(path)
                .map_err(|err| usage(format!("could not read {}: {err}", path.display())))?,
            path.display().to_string(),
        ),
    };
    // The same intake as the HTTP API: splitting, key, routes and the entity's schema.
    let intake = crate::intake::Intake::new(Arc::new(config.clone()))?;
    let key = match key {
        Some(key) => crate::intake::KeyFrom::Given(Some(key)),
        None => crate::intake::KeyFrom::KeyField,
    };
    let records = intake
        .records(action, entity, text.as_bytes(), &key)
        .map_err(|err| usage(format!("{source}: {err}")))?
        .records;
    let store = open_store(config)?;
    let staged = store.stage_batch(records, None)?;
    let mut out = String::new();
    for receipt in staged.receipts() {
        out.push_str(&format!(
            "{}\t{}\t{}\n",
            receipt.id,
            receipt.seq,
            receipt.path.display()
        ));
    }
    write_stdout(&out);
    Ok(EXIT_OK)
}

fn read_stdin() -> anyhow::Result<String> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|err| usage(format!("could not read stdin: {err}")))?;
    Ok(text)
}

// ---------------------------------------------------------------------------------------------
// ls

/// One line of `ls`.
struct Row {
    id: String,
    seq: u64,
    action: String,
    entity: String,
    key: Option<String>,
    state: String,
    attempts: u32,
    last_error: Option<String>,
    path: PathBuf,
    sink: Option<String>,
}

fn ls(
    config: &Config,
    failed: bool,
    action: Option<String>,
    entity: Option<String>,
    limit: Option<usize>,
    as_json: bool,
) -> anyhow::Result<u8> {
    let store = open_store(config)?;
    let rows: Vec<Row> = if failed {
        let mut letters = store.dead_letters(None)?;
        letters.retain(|d| {
            action.as_ref().is_none_or(|a| *a == d.action)
                && entity.as_ref().is_none_or(|e| *e == d.entity)
        });
        if let Some(limit) = limit {
            letters.truncate(limit);
        }
        letters
            .into_iter()
            .map(|d| Row {
                id: d.id,
                seq: d.seq,
                action: d.action,
                entity: d.entity,
                key: d.key,
                state: "dead".into(),
                attempts: d.attempts,
                last_error: Some(d.reason),
                path: d.path,
                sink: Some(d.sink),
            })
            .collect()
    } else {
        let filter = ListFilter {
            action,
            entity,
            limit,
            ..ListFilter::default()
        };
        store
            .list(&filter)?
            .into_iter()
            .map(|r| Row {
                id: r.id,
                seq: r.seq,
                action: r.action,
                entity: r.entity,
                key: r.key,
                state: r.state.as_str().into(),
                attempts: r.attempts,
                last_error: r.last_error,
                path: r.path,
                sink: None,
            })
            .collect()
    };
    let mut out = String::new();
    if as_json {
        for row in &rows {
            let mut line = json!({
                "id": row.id,
                "seq": row.seq,
                "action": row.action,
                "entity": row.entity,
                "key": row.key,
                "state": row.state,
                "attempts": row.attempts,
                "last_error": row.last_error,
                "path": row.path,
            });
            if let Some(sink) = &row.sink {
                line["sink"] = json!(sink);
            }
            out.push_str(&line.to_string());
            out.push('\n');
        }
    } else {
        let mut header = vec!["SEQ", "ID", "ACTION", "ENTITY", "KEY", "STATE", "ATTEMPTS"];
        if failed {
            header.push("SINK");
        }
        header.extend(["LAST_ERROR", "PATH"]);
        let body = rows
            .iter()
            .map(|row| {
                let mut cells = vec![
                    row.seq.to_string(),
                    row.id.clone(),
                    row.action.clone(),
                    row.entity.clone(),
                    row.key.clone().unwrap_or_else(|| "-".into()),
                    row.state.clone(),
                    row.attempts.to_string(),
                ];
                if let Some(sink) = &row.sink {
                    cells.push(sink.clone());
                }
                cells.push(
                    row.last_error
                        .as_deref()
                        .map(|e| shorten(e, MAX_CELL_CHARS))
                        .unwrap_or_else(|| "-".into()),
                );
                cells.push(row.path.display().to_string());
                cells
            })
            .collect::<Vec<_>>();
        out.push_str(&table(&header, &body));
    }
    write_stdout(&out);
    Ok(EXIT_OK)
}

// ---------------------------------------------------------------------------------------------
// sources

fn sources(config: &Config, as_json: bool) -> anyhow::Result<u8> {
    let store = open_store(config)?;
    let states = store.sources()?;
    let mut names: Vec<&str> = config.sql_sources.iter().map(|s| s.name.as_str()).collect();
    // Sources the index knows but the configuration no longer has are shown too.
    for state in &states {
        if !names.contains(&state.name.as_str()) {
            names.push(&state.name);
        }
    }
    let rows: Vec<serde_json::Value> = names
        .iter()
        .map(|name| {
            let state = states
                .iter()
                .find(|s| s.name == *name)
                .cloned()
                .unwrap_or_default();
            let configured = config.sql_sources.iter().find(|s| s.name == *name);
            serde_json::json!({
                "name": name,
                "configured": configured.is_some(),
                "enabled": configured.is_some_and(|s| s.enabled),
                "schedule": configured.map(|s| match &s.when {
                    crate::sources::When::Cron(expr) => expr.clone(),
                    crate::sources::When::Every(every) => format!("every {}s", every.as_secs_f64()),
                }),
                "checkpoint": state.checkpoint,
                "last_run_at": state.last_run_at,
                "last_rows": state.last_rows,
                "last_error": state.last_error,
            })
        })
        .collect();
    if as_json {
        let mut out = String::new();
        for row in &rows {
            out.push_str(&row.to_string());
            out.push('\n');
        }
        write_stdout(&out);
        return Ok(EXIT_OK);
    }
    if rows.is_empty() {
        write_stdout("No sources are configured ([[sources]] in the CONFIG_FILE TOML).\n");
        return Ok(EXIT_OK);
    }
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "-".to_owned(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            let enabled = match (row["configured"].as_bool(), row["enabled"].as_bool()) {
                (Some(false), _) => "not configured",
                (_, Some(true)) => "yes",
                _ => "no",
            };
            vec![
                text(&row["name"]),
                enabled.to_owned(),
                text(&row["schedule"]),
                text(&row["checkpoint"]),
                text(&row["last_run_at"]),
                text(&row["last_rows"]),
                shorten(&text(&row["last_error"]), MAX_CELL_CHARS),
            ]
        })
        .collect();
    write_stdout(&table(
        &[
            "SOURCE",
            "ENABLED",
            "SCHEDULE",
            "CHECKPOINT",
            "LAST RUN",
            "ROWS",
            "LAST ERROR",
        ],
        &body,
    ));
    Ok(EXIT_OK)
}

fn reset_source(config: &Config, name: &str, to: Option<&str>) -> anyhow::Result<u8> {
    let Some(source) = config.sql_sources.iter().find(|s| s.name == name) else {
        return Err(usage(format!(
            "no source is named {name:?}; the configured ones are: {}",
            config
                .sql_sources
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    let checkpoint = match to {
        None => None,
        Some(text) => Some(checkpoint_from_cli(text, source.checkpoint.len()).map_err(usage)?),
    };
    let store = open_store(config)?;
    store.reset_source(name, checkpoint.as_deref())?;
    write_stdout(&match &checkpoint {
        None => format!(
            "Source {name} rewound to the start: its next cycle reads every row again (an initial load).\n"
        ),
        Some(c) => {
            format!("Source {name} rewound to {c}: its next cycle reads the rows after it.\n")
        }
    });
    Ok(EXIT_OK)
}

/// `--to VALUE` as the stored checkpoint: a JSON array with one value per checkpoint column.
fn checkpoint_from_cli(text: &str, columns: usize) -> Result<String, String> {
    let value = serde_json::from_str::<serde_json::Value>(text)
        .unwrap_or_else(|_| serde_json::Value::String(text.to_owned()));
    let values = match value {
        serde_json::Value::Array(values) => values,
        single => vec![single],
    };
    if values.len() != columns {
        return Err(format!(
            "--to {text:?} gives {} value(s) but the source has {columns} checkpoint column(s); give a JSON array such as '[\"2026-11-01T00:00:00Z\", 0]'",
            values.len()
        ));
    }
    Ok(serde_json::Value::Array(values).to_string())
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i == last {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// One line, at most `max` characters (an ellipsis marks the cut).
fn shorten(text: &str, max: usize) -> String {
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() <= max {
        one_line
    } else {
        let mut cut: String = one_line.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

// ---------------------------------------------------------------------------------------------
// show

fn show(config: &Config, target: &str) -> anyhow::Result<u8> {
    let store = open_store(config)?;
    let path = Path::new(target);
    let documents = if path.is_file() {
        show_file(&store, path)?
    } else {
        vec![record_json(&store, target)?]
    };
    let value = if documents.len() == 1 {
        documents.into_iter().next().unwrap_or(Value::Null)
    } else {
        Value::Array(documents)
    };
    let mut text = serde_json::to_string_pretty(&value).context("could not format the record")?;
    text.push('\n');
    write_stdout(&text);
    Ok(EXIT_OK)
}

/// A record as `show` prints it: the envelope and its state for every sink.
fn record_json(store: &Staging, id_or_seq: &str) -> anyhow::Result<Value> {
    let (envelope, info) = store.get(id_or_seq).map_err(|err| match err {
        StoreError::NotFound(what) => anyhow::anyhow!(
            "no record {what} in staging at {}; `estafeta ls` lists the records it holds",
            store.root().display()
        ),
        other => anyhow::Error::new(other),
    })?;
    Ok(json!({
        "envelope": envelope,
        "path": info.path,
        "state": info.state,
        "attempts": info.attempts,
        "last_error": info.last_error,
        "sinks": info.sinks,
    }))
}

/// A dead-letter file (one JSON document with `record`) or a segment file (one record per line).
fn show_file(store: &Staging, path: &Path) -> anyhow::Result<Vec<Value>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("could not read {}", path.display()))?;
    if let Ok(letter) = serde_json::from_str::<Value>(&text)
        && let Some(id) = letter.pointer("/record/id").and_then(Value::as_str)
    {
        let mut record = record_json(store, id)?;
        record["dead_letter"] = json!({
            "file": path,
            "sink": letter.get("sink"),
            "reason": letter.get("reason"),
            "attempts": letter.get("attempts"),
            "failed_at": letter.get("failed_at"),
        });
        return Ok(vec![record]);
    }
    let mut records = Vec::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let id = serde_json::from_str::<Value>(line)
            .ok()
            .and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_owned))
            .ok_or_else(|| {
                usage(format!(
                    "{} line {}: not a staged record (expected a segment or dead-letter file)",
                    path.display(),
                    number + 1
                ))
            })?;
        records.push(record_json(store, &id)?);
    }
    if records.is_empty() {
        return Err(usage(format!("{} holds no record", path.display())));
    }
    Ok(records)
}

// ---------------------------------------------------------------------------------------------
// status

fn status(config: &Config, as_json: bool) -> anyhow::Result<u8> {
    let store = open_store(config)?;
    let status = store.status()?;
    if as_json {
        let mut value = serde_json::to_value(&status).context("could not format the status")?;
        value["version"] = json!(crate::version::current());
        value["agent_id"] = json!(config.agent_id);
        value["update"] = serde_json::to_value(crate::update::state::load(&config.staging_path))
            .context("could not format the update status")?;
        let mut text =
            serde_json::to_string_pretty(&value).context("could not format the status")?;
        text.push('\n');
        write_stdout(&text);
        return Ok(EXIT_OK);
    }
    let mut out = format!(
        "estafeta {} (agent {})\nstaging: {}\nrecords pending: {}, bytes staged: {}, disk free: {}\n",
        crate::version::current(),
        config.agent_id,
        status.root.display(),
        status.records_pending,
        bytes(status.bytes_staged),
        status
            .disk_free_bytes
            .map(bytes)
            .unwrap_or_else(|| "unknown".into()),
    );
    if let Some(reason) = &status.staging_blocked {
        out.push_str(&format!("STAGING REFUSES WRITES: {reason}\n"));
    }
    let update = crate::update::state::load(&config.staging_path);
    if update.last_check.is_some() || update.state != crate::update::State::Idle {
        out.push_str(&format!(
            "update: {} (last check {}{}){}\n",
            serde_json::to_value(update.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            update.last_check.as_deref().unwrap_or("never"),
            update
                .available
                .as_deref()
                .map(|v| format!(", {v} available"))
                .unwrap_or_default(),
            update
                .message
                .as_deref()
                .map(|m| format!(": {}", shorten(m, 200)))
                .unwrap_or_default(),
        ));
    }
    out.push('\n');
    let sink_rows: Vec<Vec<String>> = status
        .sinks
        .iter()
        .map(|s| {
            vec![
                s.sink.clone(),
                s.pending.to_string(),
                s.in_flight.to_string(),
                s.dead.to_string(),
                s.oldest_pending_age_secs
                    .map(age)
                    .unwrap_or_else(|| "-".into()),
                s.last_success_at.clone().unwrap_or_else(|| "-".into()),
                s.last_failure_at.clone().unwrap_or_else(|| "-".into()),
                s.next_attempt_at.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "SINK",
            "PENDING",
            "IN_FLIGHT",
            "DEAD",
            "OLDEST_PENDING",
            "LAST_SUCCESS",
            "LAST_FAILURE",
            "NEXT_ATTEMPT",
        ],
        &sink_rows,
    ));
    for sink in &status.sinks {
        if let Some(error) = &sink.last_error {
            out.push_str(&format!(
                "  {} last error: {}\n",
                sink.sink,
                shorten(error, 200)
            ));
        }
    }
    if !status.groups.is_empty() {
        out.push('\n');
        let group_rows: Vec<Vec<String>> = status
            .groups
            .iter()
            .map(|g| {
                vec![
                    g.action.clone(),
                    g.entity.clone(),
                    g.pending.to_string(),
                    g.dead.to_string(),
                    g.oldest_pending_age_secs
                        .map(age)
                        .unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        out.push_str(&table(
            &["ACTION", "ENTITY", "PENDING", "DEAD", "OLDEST_PENDING"],
            &group_rows,
        ));
    }
    write_stdout(&out);
    Ok(EXIT_OK)
}

/// `3d4h`, `2h5m`, `4m12s`, `9s`.
fn age(secs: i64) -> String {
    let s = secs.max(0);
    let (d, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d{h}h")
    } else if h > 0 {
        format!("{h}h{m}m")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

/// `512 B`, `3.2 MiB`, `41.0 GiB`.
fn bytes(n: u64) -> String {
    const UNITS: &[&str] = &["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64;
    let mut unit = "B";
    for u in UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = u;
    }
    format!("{value:.1} {unit}")
}

// ---------------------------------------------------------------------------------------------
// flush

fn flush(config: Config, only: Option<String>, limit: Option<usize>) -> anyhow::Result<u8> {
    crate::logging::restrict_new_files();
    let _guard = crate::logging::init(&config);
    let sinks = crate::sinks::build(&config.sinks)
        .map_err(|err| usage(format!("the sinks are misconfigured: {err:#}")))?;
    let sinks: Vec<_> = match &only {
        Some(name) => {
            let chosen: Vec<_> = sinks.into_iter().filter(|s| s.name() == name).collect();
            if chosen.is_empty() {
                return Err(usage(format!(
                    "no sink is named {name:?}; configured sinks: {}",
                    config.sink_names().join(", ")
                )));
            }
            chosen
        }
        None => sinks,
    };
    let store = open_store(&config)?;
    let limit = limit.unwrap_or(config.max_records);
    let runtime = runtime()?;
    let mut code = EXIT_OK;
    let mut out = String::new();
    for sink in &sinks {
        match runtime.block_on(crate::batcher::flush_once(&store, sink, &config, limit)) {
            Ok(report) => out.push_str(&format!(
                "{}: delivered {}, retried {}, dead {}{}\n",
                report.sink,
                report.delivered,
                report.retried,
                report.dead,
                if config.dry_run {
                    format!(", dry run {}", report.dry_run)
                } else {
                    String::new()
                }
            )),
            Err(err) => {
                out.push_str(&format!("{}: failed: {err:#}\n", sink.name()));
                code = EXIT_FAILURE;
            }
        }
    }
    write_stdout(&out);
    Ok(code)
}

// ---------------------------------------------------------------------------------------------
// retry

/// A dead-letter file as `retry` reads it.
struct Letter {
    path: PathBuf,
    sink: String,
    seq: u64,
    id: String,
    action: String,
    entity: String,
    key: Option<String>,
    reason: String,
    attempts: Option<u64>,
    failed_at: Option<String>,
}

fn read_letter(path: &Path) -> Result<Letter, String> {
    let text = std::fs::read_to_string(path).map_err(|err| err.to_string())?;
    let doc: Value = serde_json::from_str(&text).map_err(|err| format!("not valid JSON: {err}"))?;
    let text_at = |pointers: &[&str]| {
        pointers
            .iter()
            .find_map(|p| doc.pointer(p).and_then(Value::as_str).map(str::to_owned))
    };
    let sink = text_at(&["/sink"]).ok_or("no \"sink\" field")?;
    let seq = ["/seq", "/record/seq"]
        .iter()
        .find_map(|p| doc.pointer(p).and_then(Value::as_u64))
        .ok_or("no \"seq\" field")?;
    Ok(Letter {
        path: path.to_path_buf(),
        sink,
        seq,
        id: text_at(&["/id", "/record/id"]).unwrap_or_default(),
        action: text_at(&["/action", "/record/action"]).unwrap_or_default(),
        entity: text_at(&["/entity", "/record/entity"]).unwrap_or_default(),
        key: text_at(&["/key", "/record/key"]),
        reason: text_at(&["/reason"]).unwrap_or_default(),
        attempts: doc.get("attempts").and_then(Value::as_u64),
        failed_at: text_at(&["/failed_at"]),
    })
}

/// Every `*.json` under `dir`, skipping the store's own `_…` folders (such as `_damaged`).
fn json_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name();
        if entry.file_type()?.is_dir() {
            if !name.to_string_lossy().starts_with('_') {
                json_files(&path, out)?;
            }
        } else if path.extension().is_some_and(|e| e == "json") {
            out.push(path);
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn retry(
    config: &Config,
    dir: Option<PathBuf>,
    file: Option<PathBuf>,
    send: bool,
    move_ok: Option<PathBuf>,
    limit: Option<usize>,
    verbose: bool,
) -> anyhow::Result<u8> {
    let mut code = EXIT_OK;
    let mut letters = Vec::new();
    let files = match &file {
        Some(file) => vec![file.clone()],
        None => {
            let dir = dir.unwrap_or_else(|| config.failed_dir());
            let mut files = Vec::new();
            match json_files(&dir, &mut files) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound && send => {
                    return Err(usage(format!("no dead-letter folder at {}", dir.display())));
                }
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => {
                    return Err(anyhow::Error::new(err)
                        .context(format!("could not read {}", dir.display())));
                }
            }
            files
        }
    };
    for path in files {
        match read_letter(&path) {
            Ok(letter) => letters.push(letter),
            Err(why) => {
                eprintln!("skipped {}: not a dead letter ({why})", path.display());
                if file.is_some() {
                    return Err(usage(format!(
                        "{} is not a dead letter: {why}",
                        path.display()
                    )));
                }
            }
        }
    }
    // Sequence order: a key's earlier record must be back in line before its later ones.
    letters.sort_by(|a, b| (a.seq, &a.sink).cmp(&(b.seq, &b.sink)));
    if let Some(limit) = limit {
        letters.truncate(limit);
    }
    let store = if send {
        Some(open_store(config)?)
    } else {
        None
    };
    let mut requeued = 0usize;
    for letter in &letters {
        let line = describe_letter(letter, verbose);
        let Some(store) = &store else {
            write_stdout(&format!("would requeue {line}\n"));
            continue;
        };
        if let Some(target) = &move_ok
            && let Err(err) = copy_into(&letter.path, target)
        {
            eprintln!(
                "not requeued {line}: could not copy it into {}: {err}",
                target.display()
            );
            code = EXIT_FAILURE;
            continue;
        }
        match store.requeue(&letter.sink, letter.seq) {
            Ok(()) => {
                requeued += 1;
                write_stdout(&format!("requeued {line}\n"));
            }
            Err(err) => {
                eprintln!("not requeued {line}: {err}");
                code = EXIT_FAILURE;
            }
        }
    }
    let summary = if send {
        format!(
            "requeued {requeued} of {} dead letter(s); the daemon delivers them on its next tick (or run `estafeta flush`)\n",
            letters.len()
        )
    } else {
        format!(
            "{} dead letter(s) would be requeued; run again with --send to requeue them\n",
            letters.len()
        )
    };
    write_stdout(&summary);
    Ok(code)
}

fn describe_letter(letter: &Letter, verbose: bool) -> String {
    let mut line = format!(
        "seq={} sink={} {}/{} key={}",
        letter.seq,
        letter.sink,
        letter.action,
        letter.entity,
        letter.key.as_deref().unwrap_or("-")
    );
    if verbose {
        line.push_str(&format!(
            "\n  id: {}\n  file: {}\n  attempts: {}\n  failed at: {}\n  reason: {}",
            letter.id,
            letter.path.display(),
            letter
                .attempts
                .map(|a| a.to_string())
                .unwrap_or_else(|| "?".into()),
            letter.failed_at.as_deref().unwrap_or("?"),
            letter.reason
        ));
    } else {
        line.push_str(&format!(": {}", shorten(&letter.reason, 100)));
    }
    line
}

/// Copies `file` into `dir` (created if needed), never overwriting: a clash gets a suffix.
fn copy_into(file: &Path, dir: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "dead-letter.json".into());
    let mut target = dir.join(&name);
    let mut n = 1;
    while target.exists() {
        target = dir.join(format!("{name}.{n}"));
        n += 1;
    }
    std::fs::copy(file, &target)?;
    Ok(target)
}

// ---------------------------------------------------------------------------------------------
// reindex

fn reindex(config: &Config) -> anyhow::Result<u8> {
    eprintln!(
        "Rebuilding the index of {} from its folder; stop the daemon first, it keeps the index it opened.",
        config.staging_path.display()
    );
    let report = Staging::reindex(config.staging_options()).with_context(|| {
        format!(
            "could not rebuild the index of {}",
            config.staging_path.display()
        )
    })?;
    let mut out = format!(
        "index rebuilt: {}\nrecords recovered: {}\ntorn tails repaired: {}\n",
        report.rebuild_reason.as_deref().unwrap_or("yes"),
        report.records_recovered,
        report.torn_tails_repaired
    );
    for moved in &report.moved_aside {
        out.push_str(&format!(
            "moved aside {} -> {}: {}\n",
            moved.from.display(),
            moved.to.display(),
            moved.reason
        ));
    }
    write_stdout(&out);
    Ok(EXIT_OK)
}

// ---------------------------------------------------------------------------------------------
// check-config

fn check_config(env_file: Option<&Path>, offline: bool) -> anyhow::Result<u8> {
    let cwd = std::env::current_dir().context("could not read the working directory")?;
    let inspection = Config::inspect(&cwd, env_file, &crate::config::process_env());
    let mut out = String::from("# Effective configuration (secrets hidden); origin in brackets\n");
    let width = inspection
        .settings
        .iter()
        .map(|s| s.key.len())
        .max()
        .unwrap_or(0);
    for setting in &inspection.settings {
        out.push_str(&format!(
            "{:<width$} = {}  [{}]\n",
            setting.key, setting.value, setting.origin
        ));
    }
    let config = match inspection.result {
        Ok(config) => config,
        Err(err) => {
            write_stdout(&out);
            eprintln!(
                "{} problem{}:",
                err.problems.len(),
                if err.problems.len() == 1 { "" } else { "s" }
            );
            for problem in &err.problems {
                eprintln!("  {problem}");
            }
            return Ok(EXIT_USAGE);
        }
    };
    let flat: BTreeMap<&str, ()> = crate::config::KEYS.iter().map(|k| (*k, ())).collect();
    for (key, value) in config.redacted() {
        if !flat.contains_key(key.as_str()) {
            out.push_str(&format!("{key} = {value}\n"));
        }
    }
    out.push_str(&format!("# sources: {}\n", config.sources.join(", ")));
    write_stdout(&out);
    let sinks = crate::sinks::build(&config.sinks)
        .map_err(|err| usage(format!("the sinks are misconfigured: {err:#}")))?;
    if offline {
        write_stdout("configuration OK (sinks not contacted: --offline)\n");
        return Ok(EXIT_OK);
    }
    let results = runtime()?.block_on(probe_all(&sinks));
    let mut code = EXIT_OK;
    let mut out = String::new();
    for (name, result) in results {
        match result {
            Ok(()) => out.push_str(&format!("sink {name}: reachable\n")),
            Err(err) => {
                out.push_str(&format!("sink {name}: UNREACHABLE: {err:#}\n"));
                code = EXIT_UNREACHABLE;
            }
        }
    }
    out.push_str(if code == EXIT_OK {
        "configuration OK; every sink answered\n"
    } else {
        "configuration OK, but a sink did not answer (records are staged and wait for it)\n"
    });
    write_stdout(&out);
    Ok(code)
}

/// Probes every sink at once, each bounded by [`PROBE_TIMEOUT`].
async fn probe_all(sinks: &[Arc<dyn crate::sinks::Sink>]) -> Vec<(String, anyhow::Result<()>)> {
    let mut tasks = tokio::task::JoinSet::new();
    for (index, sink) in sinks.iter().enumerate() {
        let sink = Arc::clone(sink);
        tasks.spawn(async move {
            let result = match tokio::time::timeout(PROBE_TIMEOUT, sink.probe()).await {
                Ok(result) => result,
                Err(_) => Err(anyhow::anyhow!(
                    "no answer within {} s",
                    PROBE_TIMEOUT.as_secs()
                )),
            };
            (index, sink.name().to_owned(), result)
        });
    }
    let mut results = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(result) => results.push(result),
            Err(err) => results.push((
                usize::MAX,
                "?".into(),
                Err(anyhow::anyhow!("probe task failed: {err}")),
            )),
        }
    }
    results.sort_by_key(|(index, _, _)| *index);
    results
        .into_iter()
        .map(|(_, name, result)| (name, result))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn ages_and_sizes_read_well() {
        assert_eq!(age(9), "9s");
        assert_eq!(age(252), "4m12s");
        assert_eq!(age(7500), "2h5m");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 * 1024 * 1024), "3.0 MiB");
    }

    #[test]
    fn tables_align_columns() {
        let text = table(
            &["A", "BB"],
            &[
                vec!["long".into(), "x".into()],
                vec!["s".into(), "y".into()],
            ],
        );
        assert_eq!(text, "A     BB\nlong  x\ns     y\n");
    }
}
