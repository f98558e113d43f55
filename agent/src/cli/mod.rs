//! The command line: one binary, `estafeta run` for the daemon and the offline tools beside it
//! (`stage`, `ls`, `show`, `status`, `flush`, `retry`, `reindex`, `check-config`, `update`,
//! `version`, `token`, `key`),
//! and `service`, the Windows service entry point.
//! The tools open the staging store directly; the daemon may be running at the same time.
//! This module holds the clap definition, the dispatch, the exit codes and how errors are
//! reported; each command (or family) lives in its own file with its arguments struct.
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

mod check_config;
mod fleet;
mod flush;
mod key;
mod ls;
mod reindex;
mod relay;
mod retry;
mod run;
mod service;
mod show;
mod sources;
mod stage;
mod status;
mod table;
mod update;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use estafeta_staging::{StageError, Staging};

use crate::config::{Config, ConfigError};

pub use check_config::{CheckConfigArgs, PROBE_TIMEOUT};
pub use fleet::FleetArgs;
pub use flush::FlushArgs;
pub use key::{KeyArgs, KeyCommand};
pub use ls::LsArgs;
pub use relay::RelayArgs;
pub use retry::RetryArgs;
pub use service::ServiceArgs;
pub use show::ShowArgs;
pub use sources::{SourcesArgs, SourcesCommand};
pub use stage::StageArgs;
pub use status::StatusArgs;
pub use update::UpdateArgs;

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

/// The commands. Those without arguments are unit variants; the others carry their clap
/// arguments struct, defined beside the command's code.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: ingest API, batcher and sinks, until SIGINT or SIGTERM.
    Run,
    /// Stage a JSON object (or an array of objects, all or nothing) from FILE or stdin.
    Stage(StageArgs),
    /// List staged records (or dead letters with --failed), oldest first.
    Ls(LsArgs),
    /// Show one record (by id, sequence number, or a segment or dead-letter file) as JSON.
    Show(ShowArgs),
    /// Pending, dead and last results per sink and per action/entity; disk free; version.
    Status(StatusArgs),
    /// Deliver what is pending now, once, and print what happened per sink.
    Flush(FlushArgs),
    /// List dead letters; with --send, deliver them now in sequence order and print what the
    /// sink answered for each.
    Retry(RetryArgs),
    /// Rebuild the staging index from the folder (stop the daemon first).
    Reindex,
    /// The SQL sources: checkpoint, last run, rows read in the last cycle, last error.
    Sources(SourcesArgs),
    /// Print the effective configuration (secrets hidden), every mistake, and whether each
    /// sink answers.
    CheckConfig(CheckConfigArgs),
    /// The fleet's last heartbeats in a central database: one line per agent, flagged STALE,
    /// BACKLOG or DEAD. Reads no local configuration.
    Fleet(FleetArgs),
    /// Check UPDATE_URL's release manifest and install a newer version: signature and signed
    /// version checked, tried, rolled back if it does not report ready within
    /// UPDATE_HEALTH_SECS. A plain install replaces its executable (stop the agent first, or let
    /// UPDATE_CRONTAB do it); a .deb or MSI install is handed to dpkg / msiexec (run it as an
    /// administrator).
    Update(UpdateArgs),
    /// Print the version.
    Version,
    /// Print a new random token for INGEST_TOKEN (64 hex characters from the operating
    /// system's random source).
    Token,
    /// Encryption at rest: `generate PATH` a new key file for STAGING_KEY_FILE, `rotate` to a
    /// new key, `prune` the keys nothing uses any more.
    Key(KeyArgs),
    /// The central side: read what agents published to JetStream (durable consumers, one per
    /// partition) and write it into the PostgreSQL or MariaDB of CENTRAL_DATABASE_URL, each
    /// message acknowledged after its row is committed.
    Relay(RelayArgs),
    /// Run as the Windows service `Estafeta` (started by Windows, not from a console). Its env
    /// file is --env-file or %ProgramData%\Estafeta\estafeta.env, created from
    /// estafeta.env.default beside the executable when missing.
    Service(ServiceArgs),
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
        Command::CheckConfig(CheckConfigArgs { offline }) => {
            check_config::check_config(env_file, offline)
        }
        Command::Fleet(FleetArgs {
            database,
            stale_minutes,
            backlog_minutes,
            json,
        }) => fleet::fleet(&database, stale_minutes, backlog_minutes, json),
        Command::Service(ServiceArgs { prepare_only }) => service::service(env_file, prepare_only),
        Command::Key(KeyArgs {
            command: KeyCommand::Generate { path },
        }) => key::generate(&path),
        command => {
            let config = Config::load(env_file)?;
            match command {
                Command::Run => run::run_daemon(config),
                Command::Update(UpdateArgs {
                    check,
                    allow_downgrade,
                }) => update::update(config, env_file, check, allow_downgrade),
                Command::Stage(StageArgs {
                    action,
                    entity,
                    file,
                    key,
                }) => stage::stage(&config, &action, &entity, file.as_deref(), key),
                Command::Ls(LsArgs {
                    failed,
                    action,
                    entity,
                    limit,
                    json,
                }) => ls::ls(&config, failed, action, entity, limit, json),
                Command::Show(ShowArgs { target }) => show::show(&config, &target),
                Command::Status(StatusArgs { json }) => status::status(&config, json),
                Command::Flush(args) => flush::flush(config, args),
                Command::Retry(args) => retry::retry(&config, args),
                Command::Reindex => reindex::reindex(&config),
                Command::Relay(args) => relay::relay(config, args),
                Command::Key(KeyArgs { command }) => match command {
                    KeyCommand::Rotate => key::rotate(&config),
                    KeyCommand::Prune => key::prune(&config),
                    KeyCommand::Export { path } => key::export(&config, &path),
                    KeyCommand::Generate { .. } => unreachable!("handled above"),
                },
                Command::Sources(SourcesArgs { command, json }) => match command {
                    None => sources::sources(&config, json),
                    Some(SourcesCommand::Reset { name, to }) => {
                        sources::reset_source(&config, &name, to.as_deref())
                    }
                },
                Command::Version
                | Command::Token
                | Command::CheckConfig(_)
                | Command::Fleet(_)
                | Command::Service(_) => {
                    unreachable!("handled above")
                }
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
