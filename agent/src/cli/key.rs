//! `estafeta key`: the key file of encryption at rest (`STAGING_KEY_FILE`, issue 23).
//!
//! - `generate PATH`: a new key file (0600, never over an existing file);
//! - `rotate`: adds a key to `STAGING_KEY_FILE` that seals everything written after the next
//!   start; the older keys stay, to open what they sealed;
//! - `prune`: drops the keys nothing in the staging folder uses any more (daemon stopped);
//! - `export PATH`: a copy that opens anywhere (without Windows DPAPI), for a backup.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use estafeta_staging::Keyring;

use crate::config::Config;

use super::{EXIT_OK, open_store, usage, write_stdout};

/// The arguments of `estafeta key`.
#[derive(Debug, Args)]
pub struct KeyArgs {
    #[command(subcommand)]
    pub command: KeyCommand,
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Write a new random key file at PATH (mode 0600); then set STAGING_KEY_FILE=PATH. Back
    /// it up apart from the staging folder: what it sealed cannot be read without it.
    Generate {
        #[arg(value_name = "PATH")]
        path: PathBuf,
    },
    /// Add a new key to STAGING_KEY_FILE: segments started after the agent's next start are
    /// sealed with it; the older keys stay until `estafeta key prune` finds them unused.
    Rotate,
    /// Drop from STAGING_KEY_FILE the keys no segment, dead letter or index entry uses any more
    /// (stop the daemon first).
    Prune,
    /// Write a copy of STAGING_KEY_FILE at PATH that opens on any machine (on Windows the key
    /// file itself is protected by DPAPI and opens only on this machine), for a backup kept
    /// apart from the staging folder. Treat the copy as the key itself.
    Export {
        #[arg(value_name = "PATH")]
        path: PathBuf,
    },
}

/// `estafeta key generate PATH`: needs no configuration.
pub(super) fn generate(path: &Path) -> anyhow::Result<u8> {
    let keys = Keyring::generate();
    keys.save(path, false).map_err(|e| usage(e.to_string()))?;
    write_stdout(&format!(
        "wrote key {} to {}\nSet STAGING_KEY_FILE={} to seal everything staged from then on; back the file up apart from the data (losing it loses what it sealed).\n",
        keys.current_id(),
        path.display(),
        path.display()
    ));
    Ok(EXIT_OK)
}

/// The key file the configuration names, and its keys.
fn configured(config: &Config) -> anyhow::Result<(PathBuf, Keyring)> {
    let Some(path) = &config.staging_key_file else {
        return Err(usage(
            "STAGING_KEY_FILE is not set: there is no key to rotate or prune; `estafeta key generate PATH` makes one",
        ));
    };
    let keys = Keyring::load(path).map_err(|e| usage(e.to_string()))?;
    Ok((path.clone(), keys))
}

pub(super) fn rotate(config: &Config) -> anyhow::Result<u8> {
    let (path, mut keys) = configured(config)?;
    let old = keys.ids();
    let new = keys.rotate();
    keys.save(&path, true).map_err(|e| usage(e.to_string()))?;
    write_stdout(&format!(
        "added key {new} to {}; it seals the segments started after the agent's next start (restart it now). Kept: {} (to open what they sealed; `estafeta key prune` drops them once unused).\n",
        path.display(),
        old.join(", ")
    ));
    Ok(EXIT_OK)
}

pub(super) fn prune(config: &Config) -> anyhow::Result<u8> {
    let (path, mut keys) = configured(config)?;
    let store = open_store(config)?;
    let mut needed = store.keys_in_use()?;
    needed.insert(keys.current_id().to_owned());
    // The folder's list first: a crash after it leaves extra keys in the file (harmless),
    // never a folder that asks for a key the file no longer holds.
    store.set_keys_needed(&needed)?;
    let dropped = keys.retain(&needed.iter().cloned().collect::<Vec<_>>());
    if !dropped.is_empty() {
        keys.save(&path, true).map_err(|e| usage(e.to_string()))?;
    }
    write_stdout(&format!(
        "in use: {}; dropped: {}\n",
        needed.into_iter().collect::<Vec<_>>().join(", "),
        if dropped.is_empty() {
            "none".to_owned()
        } else {
            dropped.join(", ")
        }
    ));
    Ok(EXIT_OK)
}

/// `estafeta key export PATH`: a copy of the key file for a backup (0600, a new file).
pub(super) fn export(config: &Config, to: &Path) -> anyhow::Result<u8> {
    let (path, keys) = configured(config)?;
    keys.export(to).map_err(|e| usage(e.to_string()))?;
    write_stdout(&format!(
        "wrote a copy of {} (keys {}) to {}\nIt opens on any machine: keep it offline, apart from the staging folder, like the key itself.\n",
        path.display(),
        keys.ids().join(", "),
        to.display()
    ));
    Ok(EXIT_OK)
}
