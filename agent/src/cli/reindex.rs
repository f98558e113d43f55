//! `estafeta reindex`: rebuilds the staging index from the folder (the daemon stopped).

use anyhow::Context as _;
use estafeta_staging::Staging;

use crate::config::Config;

use super::{EXIT_OK, write_stdout};

pub(super) fn reindex(config: &Config) -> anyhow::Result<u8> {
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
