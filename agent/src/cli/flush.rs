//! `estafeta flush`: delivers what is pending now, once, and prints what happened per sink.
//! With `--dry-run` it delivers nothing (as `DRY_RUN=true` would); with `--show-payload` as
//! well it prints, per record, the request it would send, body included.
//!
//! Why the payload is shown by a command and not by a `DRY_RUN_SHOW_PAYLOAD` key: the daemon's
//! logs (and `LOG_DIR`'s daily files, kept for weeks and often shipped elsewhere) never carry
//! payload text, which here is patient data; a key left on after a test would write every
//! record into them. A command prints to the terminal of the person who asked, once, and
//! leaves nothing behind; it is what the old `BEMSOFT_DRY_RUN=1` gave an integration engineer
//! checking a transformation: the payload on the console.

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
    /// Deliver nothing: build each request and log it, as DRY_RUN=true does; everything stays
    /// pending.
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run: print each request in full to stdout (method, URL, headers with the
    /// token hidden, body). Nothing is sent, counted or logged.
    #[arg(long, requires = "dry_run")]
    pub show_payload: bool,
}

pub(super) fn flush(mut config: Config, args: FlushArgs) -> anyhow::Result<u8> {
    let FlushArgs {
        sink: only,
        limit,
        dry_run,
        show_payload,
    } = args;
    config.dry_run |= dry_run;
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
    if show_payload {
        for sink in &sinks {
            match runtime.block_on(crate::batcher::preview(&store, sink, limit)) {
                Ok(requests) => {
                    for request in &requests {
                        out.push_str(&format!(
                            "--- sink {}: would send\n{request}\n",
                            sink.name()
                        ));
                    }
                    out.push_str(&format!(
                        "{}: dry run, {} request(s) shown, nothing sent\n",
                        sink.name(),
                        requests.len()
                    ));
                }
                Err(err) => {
                    out.push_str(&format!("{}: failed: {err:#}\n", sink.name()));
                    code = EXIT_FAILURE;
                }
            }
        }
        write_stdout(&out);
        return Ok(code);
    }
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
