//! `estafeta retry`: lists dead letters and, with `--send`, puts them back in line in sequence
//! order.

use std::path::{Path, PathBuf};

use clap::Args;
use estafeta_staging::{DeadLetterFile, Staging, StoreError};

use crate::config::Config;

use super::table::shorten;
use super::{EXIT_FAILURE, EXIT_OK, open_store, usage, write_stdout};

/// The arguments of `estafeta retry`.
#[derive(Debug, Args)]
pub struct RetryArgs {
    /// Dead-letter folder (default FAILED_DIR, or <staging>/_failed).
    #[arg(long, value_name = "D")]
    pub dir: Option<PathBuf>,
    /// One dead-letter file.
    #[arg(long, value_name = "F", conflicts_with = "dir")]
    pub file: Option<PathBuf>,
    /// Requeue for real (without it, only list what would be requeued).
    #[arg(long)]
    pub send: bool,
    /// Copy each requeued dead-letter file into DIR first.
    #[arg(long, value_name = "DIR")]
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
pub(super) fn retry(
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
        match Staging::dead_letter(&path) {
            Ok(letter) => letters.push(Letter { path, file: letter }),
            // A file given by name must be a dead letter; one met in a folder is skipped.
            Err(err @ StoreError::NotStagingFile { .. }) if file.is_some() => {
                return Err(usage(err.to_string()));
            }
            Err(err) if file.is_some() => return Err(err.into()),
            Err(err) => eprintln!("skipped: {err}"),
        }
    }
    // Sequence order: a key's earlier record must be back in line before its later ones.
    letters
        .sort_by(|a, b| (a.file.record.seq, &a.file.sink).cmp(&(b.file.record.seq, &b.file.sink)));
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
        match store.requeue(&letter.file.sink, letter.file.record.seq) {
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
    } else {
        line.push_str(&format!(": {}", shorten(reason, 100)));
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
