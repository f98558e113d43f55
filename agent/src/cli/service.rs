//! `estafeta service`: the Windows service entry point, or only its data folder and env file
//! with `--prepare-only`.

use std::path::Path;

use clap::Args;

#[cfg(not(windows))]
use super::usage;
use super::{EXIT_OK, write_stdout};

/// The arguments of `estafeta service`.
#[derive(Debug, Args)]
pub struct ServiceArgs {
    /// Only create the data folder and the env file when missing, then exit.
    #[arg(long)]
    pub prepare_only: bool,
}

/// `estafeta service`: the Windows service, or only its data folder with `--prepare-only`.
pub(super) fn service(env_file: Option<&Path>, prepare_only: bool) -> anyhow::Result<u8> {
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
