//! `estafeta flush`: delivers what is pending now, once, and prints what happened per sink.

use clap::Args;

use crate::config::Config;

use super::{EXIT_FAILURE, EXIT_OK, open_store, runtime, usage, write_stdout};

/// The arguments of `estafeta flush`.
#[derive(Debug, Args)]
pub struct FlushArgs {
    /// Only this sink.
    #[arg(long, value_name = "S")]
    pub sink: Option<String>,
    /// At most N records per sink (default MAX_RECORDS).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
}

pub(super) fn flush(
    config: Config,
    only: Option<String>,
    limit: Option<usize>,
) -> anyhow::Result<u8> {
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
