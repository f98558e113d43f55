//! `estafeta retry`: lists dead letters and, with `--send`, delivers them now, in sequence
//! order, printing what the sink answered for each (the old `retry_failed.py --send`).
//!
//! `--send` takes each chosen dead letter back from the store already leased to this process
//! ([`Staging::requeue_leased`]), so a daemon running beside it can neither take the record
//! nor send a later record of its key before it; then sends it through a sink built from the
//! same configuration as the daemon's, and settles the answer the way a flush cycle does
//! ([`crate::batcher::deliver_leased`]): delivered, pending again after a transient failure,
//! or a dead letter again (a new file) after a refusal. If this process dies mid-send, its
//! lease is given back at once and the daemon sends the record again (idempotently).
//! Without `--send` it only lists, and changes nothing.
//!
//! Source rows that could not become records (`<failed>/_refused/<source>/`) are dead letters
//! too: listed after the records, with their reason. `--send` runs a row that was read whole
//! through its source's mapping again, as the configuration is now (a map file or schema fixed
//! since), and stages its record ([`crate::sources::replay`]); a row set aside for a value
//! that could not be read is only listed, with the `estafeta sources reset` that reads it again.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;
use estafeta_staging::{DeadLetterFile, REFUSED_DIR, RefusedRow, Staging, StoreError};

use crate::batcher::Settle;
use crate::config::Config;
use crate::sinks::Sink;

use super::table::shorten;
use super::{EXIT_FAILURE, EXIT_OK, open_store, runtime, usage, write_stdout};

/// The arguments of `estafeta retry`.
#[derive(Debug, Args)]
pub struct RetryArgs {
    /// Dead-letter folder (default FAILED_DIR, or <staging>/_failed).
    #[arg(long, value_name = "D")]
    pub dir: Option<PathBuf>,
    /// One dead-letter file.
    #[arg(long, value_name = "F", conflicts_with = "dir")]
    pub file: Option<PathBuf>,
    /// Deliver them now, one by one, and print what the sink answered (without it, only list
    /// what would be sent). Works with the daemon running or stopped; ignores DRY_RUN, as the
    /// old `retry_failed.py --send` did.
    #[arg(long)]
    pub send: bool,
    /// Move into DIR the dead-letter file of each record actually delivered (with --send).
    #[arg(long, value_name = "DIR", requires = "send")]
    pub move_ok: Option<PathBuf>,
    /// At most N dead letters.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Show every field of each dead letter.
    #[arg(long)]
    pub verbose: bool,
}

/// A dead-letter file as `retry` reads it: where it is and what the store read in it.
struct Letter {
    path: PathBuf,
    file: DeadLetterFile,
}

/// A refused source row as `retry` reads it.
struct Refused {
    path: PathBuf,
    row: RefusedRow,
}

/// The refused rows under `dir/_refused/<source>/`, oldest first; unreadable files skipped.
fn refused_files(dir: &Path, keys: Option<&estafeta_staging::Keyring>) -> Vec<Refused> {
    let mut out = Vec::new();
    let Ok(sources) = std::fs::read_dir(dir.join(REFUSED_DIR)) else {
        return out;
    };
    for source in sources.flatten() {
        let Ok(files) = std::fs::read_dir(source.path()) else {
            continue;
        };
        for path in files.flatten().map(|f| f.path()) {
            if path.extension().is_some_and(|e| e == "json") {
                match RefusedRow::read_with_keys(&path, keys) {
                    Ok(row) => out.push(Refused { path, row }),
                    Err(err) => eprintln!("skipped: {err}"),
                }
            }
        }
    }
    out.sort_by(|a, b| (&a.row.refused_at, &a.path).cmp(&(&b.row.refused_at, &b.path)));
    out
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

/// What became of the chosen dead letters, for the summary line.
#[derive(Default)]
struct Tally {
    delivered: usize,
    dead_again: usize,
    pending: usize,
    not_sent: usize,
    /// Delivered, but `--move-ok` could not move the file.
    unmoved: usize,
}

pub(super) fn retry(config: &Config, args: RetryArgs) -> anyhow::Result<u8> {
    let RetryArgs {
        dir,
        file,
        send,
        move_ok,
        limit,
        verbose,
    } = args;
    let mut letters = Vec::new();
    let files = match &file {
        Some(file) => vec![file.clone()],
        None => {
            let dir = dir.clone().unwrap_or_else(|| config.failed_dir());
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
    let mut refused = match (&file, &dir) {
        (None, dir) => refused_files(
            &dir.clone().unwrap_or_else(|| config.failed_dir()),
            config.staging_keys.as_deref(),
        ),
        (Some(_), _) => Vec::new(),
    };
    for path in files {
        match Staging::dead_letter_with_keys(&path, config.staging_keys.as_deref()) {
            Ok(letter) => letters.push(Letter { path, file: letter }),
            // A file given by name must be a dead letter or a refused source row; one met in a
            // folder is skipped.
            Err(err @ StoreError::NotStagingFile { .. }) if file.is_some() => {
                match RefusedRow::read_with_keys(&path, config.staging_keys.as_deref()) {
                    Ok(row) => refused.push(Refused { path, row }),
                    Err(_) => return Err(usage(err.to_string())),
                }
            }
            Err(err) if file.is_some() => return Err(err.into()),
            Err(err) => eprintln!("skipped: {err}"),
        }
    }
    // Sequence order: a key's earlier record must be delivered before its later ones.
    letters
        .sort_by(|a, b| (a.file.record.seq, &a.file.sink).cmp(&(b.file.record.seq, &b.file.sink)));
    if let Some(limit) = limit {
        letters.truncate(limit);
        refused.truncate(limit.saturating_sub(letters.len()));
    }
    if !send {
        for letter in &letters {
            let line = describe_letter(letter, verbose, true);
            write_stdout(&format!("would send {line}\n"));
        }
        for item in &refused {
            let line = describe_refused(item, verbose, true);
            if item.row.replayable {
                write_stdout(&format!("would stage again {line}\n"));
            } else {
                write_stdout(&format!("cannot replay {line}\n"));
            }
        }
        write_stdout(&format!(
            "{} dead letter(s) would be sent; run again with --send to deliver them now\n",
            letters.len()
        ));
        if !refused.is_empty() {
            let replayable = refused.iter().filter(|r| r.row.replayable).count();
            write_stdout(&format!(
                "{} refused source row(s) under {REFUSED_DIR}/: --send runs the {replayable} read whole through their source's mapping again and stages their records; the others need the value fixed in the database, then `estafeta sources reset <source> --to <checkpoint before>`\n",
                refused.len()
            ));
        }
        return Ok(EXIT_OK);
    }
    crate::logging::restrict_new_files();
    let _guard = crate::logging::init(config);
    let store = open_store(config)?;
    let runtime = runtime()?;
    let mut code = EXIT_OK;
    if !letters.is_empty() || refused.is_empty() {
        code = send_letters(
            config,
            &store,
            &runtime,
            &letters,
            move_ok.as_deref(),
            verbose,
        )?;
    }
    if !refused.is_empty() {
        let replayed = send_refused(
            config,
            &store,
            &runtime,
            &refused,
            move_ok.as_deref(),
            verbose,
        )?;
        code = code.max(replayed);
    }
    Ok(code)
}

/// `--send` for refused source rows: each run through its source's mapping again and staged.
fn send_refused(
    config: &Config,
    store: &Staging,
    runtime: &tokio::runtime::Runtime,
    refused: &[Refused],
    move_ok: Option<&Path>,
    verbose: bool,
) -> anyhow::Result<u8> {
    use crate::sources::replay::{Replayed, replay};
    let intake = crate::intake::Intake::new(config.rules())?;
    let mut staged = 0usize;
    for item in refused {
        let line = describe_refused(item, verbose, false);
        let Some(source) = config
            .sql_sources
            .iter()
            .find(|s| s.name == item.row.source)
        else {
            eprintln!(
                "not replayed {line}: no source named {:?} is configured; configure it or move the file away",
                item.row.source
            );
            continue;
        };
        let staged_move = match move_ok
            .map(|dir| Move::prepare(&item.path, dir))
            .transpose()
        {
            Ok(m) => m,
            Err(err) => {
                eprintln!(
                    "not replayed {line}: could not copy it into the --move-ok folder: {err}"
                );
                continue;
            }
        };
        let result = runtime.block_on(replay(store, &intake, source, &item.path, &item.row));
        match result {
            Ok(Replayed::Staged { seq }) => {
                staged += 1;
                let moved = match staged_move.map(|m| m.finish(&item.path)) {
                    Some(Ok(target)) => format!("; moved to {}", target.display()),
                    Some(Err(err)) => {
                        eprintln!("staged {line}, but its file could not be moved: {err}");
                        String::new()
                    }
                    None => String::new(),
                };
                write_stdout(&format!(
                    "staged again {line} as seq={seq}; the daemon (or `estafeta flush`) delivers it{moved}\n"
                ));
            }
            other => {
                if let Some(m) = staged_move {
                    m.abandon();
                }
                match other {
                    Ok(Replayed::RefusedAgain(reason)) => {
                        write_stdout(&format!("refused again {line}\n  reason: {reason}\n"))
                    }
                    Ok(Replayed::NotReplayable(why)) => {
                        write_stdout(&format!("not replayed {line}: {why}\n"))
                    }
                    Ok(Replayed::Staged { .. }) => unreachable!("handled above"),
                    Err(err) => eprintln!("not replayed {line}: {err:#}"),
                }
            }
        }
    }
    write_stdout(&format!(
        "staged again {staged} of {} refused source row(s)\n",
        refused.len()
    ));
    Ok(if staged == refused.len() {
        EXIT_OK
    } else {
        EXIT_FAILURE
    })
}

fn describe_refused(item: &Refused, verbose: bool, reason_too: bool) -> String {
    let RefusedRow {
        source,
        checkpoint,
        reason,
        refused_at,
        ..
    } = &item.row;
    let mut line = format!("refused row source={source} checkpoint={checkpoint}");
    if verbose {
        line.push_str(&format!(
            "\n  file: {}\n  refused at: {refused_at}\n  reason: {reason}",
            item.path.display()
        ));
    } else if reason_too {
        line.push_str(&format!(": {}", shorten(reason, 100)));
    }
    line
}

/// `--send`: each letter in turn, taken back leased, delivered, settled and reported.
fn send_letters(
    config: &Config,
    store: &Staging,
    runtime: &tokio::runtime::Runtime,
    letters: &[Letter],
    move_ok: Option<&Path>,
    verbose: bool,
) -> anyhow::Result<u8> {
    // The daemon's own sinks: built from the same configuration by the same code.
    let sinks = crate::sinks::build(&config.sinks)
        .map_err(|err| usage(format!("the sinks are misconfigured: {err:#}")))?;
    let mut tally = Tally::default();
    for letter in letters {
        // The old refusal is not repeated beside the new answer (--verbose shows it).
        let line = describe_letter(letter, verbose, false);
        let Some(sink) = sinks.iter().find(|s| s.name() == letter.file.sink) else {
            eprintln!(
                "not sent {line}: no sink named {:?} is configured (configured: {}); configure it or move the file away",
                letter.file.sink,
                config.sink_names().join(", ")
            );
            tally.not_sent += 1;
            continue;
        };
        // The file goes into DIR before the record is taken back (that removes the store's
        // letter): a DIR that cannot take it stops this item before anything changed.
        let staged_move = match move_ok
            .map(|dir| Move::prepare(&letter.path, dir))
            .transpose()
        {
            Ok(staged) => staged,
            Err(err) => {
                eprintln!(
                    "not sent {line}: could not copy it into {}: {err}",
                    move_ok.map(|d| d.display().to_string()).unwrap_or_default()
                );
                tally.not_sent += 1;
                continue;
            }
        };
        let result = send_one(runtime, store, sink, config, letter);
        match result {
            Ok(Settle::Delivered) => {
                tally.delivered += 1;
                let moved = match staged_move {
                    Some(staged) => match staged.finish(&letter.path) {
                        Ok(target) => format!("; moved to {}", target.display()),
                        Err(err) => {
                            tally.unmoved += 1;
                            eprintln!("delivered {line}, but its file could not be moved: {err}");
                            String::new()
                        }
                    },
                    None => String::new(),
                };
                write_stdout(&format!("delivered {line}{moved}\n"));
            }
            other => {
                if let Some(staged) = staged_move {
                    staged.abandon();
                }
                match other {
                    Ok(Settle::Dead { summary, path }) => {
                        tally.dead_again += 1;
                        write_stdout(&format!(
                            "refused again {line}\n  sink answered: {summary}\n  dead letter again: {}\n",
                            path.display()
                        ));
                    }
                    Ok(Settle::Retry { error }) => {
                        tally.pending += 1;
                        write_stdout(&format!(
                            "not delivered {line}\n  sink answered: {error}\n  it stays pending: the daemon (or `estafeta flush`) tries again with backoff\n"
                        ));
                    }
                    Ok(Settle::GivenBack) => {
                        tally.pending += 1;
                        write_stdout(&format!("not attempted {line}: it stays pending\n"));
                    }
                    Ok(Settle::Delivered) => unreachable!("handled above"),
                    Err(err) => {
                        tally.not_sent += 1;
                        eprintln!("not sent {line}: {err:#}");
                    }
                }
            }
        }
    }
    let mut summary = format!(
        "delivered {} of {} dead letter(s)",
        tally.delivered,
        letters.len()
    );
    for (n, what) in [
        (tally.dead_again, "refused again (dead letters again)"),
        (
            tally.pending,
            "still pending (retried by the daemon or `estafeta flush`)",
        ),
        (tally.not_sent, "not sent"),
    ] {
        if n > 0 {
            summary.push_str(&format!(", {n} {what}"));
        }
    }
    if tally.delivered > 0 {
        summary.push_str("; records of their keys that waited behind them go with the daemon's next cycle (or `estafeta flush`)");
    }
    write_stdout(&format!("{summary}\n"));
    Ok(if tally.delivered == letters.len() && tally.unmoved == 0 {
        EXIT_OK
    } else {
        EXIT_FAILURE
    })
}

/// Takes one dead letter back leased to this process and delivers it through `sink`.
fn send_one(
    runtime: &tokio::runtime::Runtime,
    store: &Staging,
    sink: &Arc<dyn Sink>,
    config: &Config,
    letter: &Letter,
) -> anyhow::Result<Settle> {
    let delivery = store.requeue_leased(&letter.file.sink, letter.file.record.seq)?;
    let mut results = runtime.block_on(crate::batcher::deliver_leased(
        store,
        sink,
        config,
        vec![delivery],
    ))
    // The send may have happened: the lease is given back when this process ends, and the
    // daemon (or `estafeta flush`) sends the record again, idempotently.
    .context("it may have been sent, but its result could not be recorded; it stays pending and is sent again (idempotently) by the daemon or `estafeta flush`")?;
    Ok(results.pop().unwrap_or(Settle::GivenBack))
}

fn describe_letter(letter: &Letter, verbose: bool, reason_too: bool) -> String {
    let DeadLetterFile {
        sink,
        reason,
        attempts,
        failed_at,
        record,
        ..
    } = &letter.file;
    let mut line = format!(
        "seq={} sink={sink} {}/{} key={}",
        record.seq,
        record.action,
        record.entity,
        record.key.as_deref().unwrap_or("-")
    );
    if verbose {
        line.push_str(&format!(
            "\n  id: {}\n  file: {}\n  attempts: {attempts}\n  failed at: {failed_at}\n  reason: {reason}",
            record.id,
            letter.path.display(),
        ));
    } else if reason_too {
        line.push_str(&format!(": {}", shorten(reason, 100)));
    }
    line
}

/// `--move-ok`: a dead-letter file copied into DIR under a temporary name before its record is
/// sent, then given its own name once the record is delivered, or removed if it is not. The
/// copy comes first because taking the record back removes the store's file.
struct Move {
    partial: PathBuf,
    dir: PathBuf,
    name: String,
}

impl Move {
    fn prepare(file: &Path, dir: &Path) -> std::io::Result<Move> {
        std::fs::create_dir_all(dir)?;
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "dead-letter.json".into());
        // Not `.json`: a DIR that is also read by `retry --dir` never takes it for a letter.
        let partial = dir.join(format!(".{name}.partial"));
        std::fs::copy(file, &partial)?;
        Ok(Move {
            partial,
            dir: dir.to_path_buf(),
            name,
        })
    }

    /// The record was delivered: the copy takes its name (never overwriting: a clash gets a
    /// suffix), and a source file outside the store (the store's own is gone already) is
    /// removed, so the file is moved.
    fn finish(self, source: &Path) -> std::io::Result<PathBuf> {
        let mut target = self.dir.join(&self.name);
        let mut n = 1;
        while target.exists() {
            target = self.dir.join(format!("{}.{n}", self.name));
            n += 1;
        }
        std::fs::rename(&self.partial, &target)?;
        match std::fs::remove_file(source) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err),
            _ => {}
        }
        Ok(target)
    }

    /// The record was not delivered: the copy goes; the dead letter stays (or is new).
    fn abandon(self) {
        let _ = std::fs::remove_file(&self.partial);
    }
}
