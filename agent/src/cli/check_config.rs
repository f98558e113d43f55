//! `estafeta check-config`: the effective configuration (secrets hidden) with each value's
//! origin, every mistake, and whether each sink answers.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;

use crate::config::Config;

use super::{EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, runtime, usage, write_stdout};

/// How long `check-config` waits for each sink to answer.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The arguments of `estafeta check-config`.
#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// Do not try to reach the sinks.
    #[arg(long)]
    pub offline: bool,
}

pub(super) fn check_config(env_file: Option<&Path>, offline: bool) -> anyhow::Result<u8> {
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
    for source in &config.sql_sources {
        out.push_str(&format!(
            "source {}: {}; {}\n",
            source.name,
            source.describe(),
            crate::sources::transport::of(&source.url).describe()
        ));
    }
    write_stdout(&out);
    let sinks = crate::sinks::build(&config.sinks)
        .map_err(|err| usage(format!("the sinks are misconfigured: {err:#}")))?;
    if offline {
        let mut out = String::new();
        for sink in &sinks {
            out.push_str(&format!(
                "sink {}: {}\n",
                sink.name(),
                sink.transport().describe()
            ));
        }
        out.push_str("configuration OK (sinks not contacted: --offline)\n");
        write_stdout(&out);
        return Ok(EXIT_OK);
    }
    let (results, sources) = runtime()?
        .block_on(async { tokio::join!(probe_all(&sinks), prepare_all(&config.sql_sources)) });
    let mut code = EXIT_OK;
    let mut out = String::new();
    let mut refused = false;
    for (name, what, result) in sources {
        use crate::sources::query::Unprepared;
        match result {
            Ok(()) => out.push_str(&format!("source {name}: {what} prepared on its database\n")),
            Err(Unprepared::Unreachable(err)) => {
                out.push_str(&format!("source {name}: UNREACHABLE: {err}\n"));
                code = EXIT_UNREACHABLE;
            }
            Err(Unprepared::Refused(err)) => {
                out.push_str(&format!(
                    "source {name}: {what} REFUSED by its database: {err}; fix the file\n"
                ));
                refused = true;
            }
        }
    }
    for (name, result) in results {
        // After the probe, the connection's protection is what was negotiated.
        let connection = sinks
            .iter()
            .find(|s| s.name() == name)
            .map_or_else(|| "unknown".into(), |s| s.transport().describe());
        match result {
            Ok(()) => out.push_str(&format!("sink {name}: reachable; {connection}\n")),
            Err(err) => {
                out.push_str(&format!(
                    "sink {name}: UNREACHABLE: {err:#}\n  connection: {connection}\n"
                ));
                code = EXIT_UNREACHABLE;
            }
        }
    }
    if refused {
        out.push_str("configuration refused: a source's SQL does not prepare on its database\n");
        write_stdout(&out);
        return Ok(EXIT_USAGE);
    }
    out.push_str(if code == EXIT_OK {
        "configuration OK; every sink and source answered\n"
    } else {
        "configuration OK, but a sink or source did not answer (records are staged and wait for it)\n"
    });
    write_stdout(&out);
    Ok(code)
}

/// Prepares every source's query (and `after_stage` statement) on its database, at once:
/// (source, which file, result).
async fn prepare_all(
    sources: &[crate::sources::SourceConfig],
) -> Vec<(
    String,
    String,
    Result<(), crate::sources::query::Unprepared>,
)> {
    let mut tasks = tokio::task::JoinSet::new();
    let mut index = 0;
    for source in sources {
        let mut files = vec![(source.query_path.clone(), source.sql.clone())];
        if let Some(after) = &source.after_stage {
            files.push((after.path.clone(), after.sql.clone()));
        }
        for (path, sql) in files {
            let (name, url) = (source.name.clone(), source.url.clone());
            tasks.spawn(async move {
                let result = crate::sources::query::prepare(&url, &sql).await;
                (index, name, format!("query {}", path.display()), result)
            });
            index += 1;
        }
    }
    let mut results: Vec<_> = tasks.join_all().await;
    results.sort_by_key(|(index, ..)| *index);
    results
        .into_iter()
        .map(|(_, name, what, result)| (name, what, result))
        .collect()
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
