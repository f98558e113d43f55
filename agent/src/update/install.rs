//! How this copy was installed, which decides how an update is installed: a plain install (any
//! folder the agent may write) replaces its own executable; a .deb install (`/usr/bin/estafeta`
//! listed in dpkg's `/var/lib/dpkg/info/estafeta.list`) hands the verified package to
//! `dpkg -i`; an MSI install (`estafeta.env.default`, which only the MSI ships, beside
//! `estafeta.exe`) hands it to `msiexec /i`. Packages are installed by `estafeta update` run by
//! an administrator (root, or an elevated prompt): the service itself runs unprivileged and
//! sandboxed (the .deb's unit has `NoNewPrivileges` and `ProtectSystem=strict`), so it only
//! checks, downloads, verifies and reports.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use super::manifest::AssetKind;

/// dpkg's list of the files of the `estafeta` package.
pub const DPKG_LIST: &str = "/var/lib/dpkg/info/estafeta.list";

/// The env file template the MSI installs beside the executable (its presence marks an MSI
/// install; the Windows service copies it to `estafeta.env` when that file is missing).
pub const DEFAULT_ENV_FILE_NAME: &str = "estafeta.env.default";

/// What kind of install the executable at `exe` belongs to.
pub fn detect(exe: &Path) -> AssetKind {
    detect_with(exe, Path::new(DPKG_LIST))
}

/// [`detect`] with dpkg's list at `dpkg_list` (for tests).
pub fn detect_with(exe: &Path, dpkg_list: &Path) -> AssetKind {
    if let Ok(list) = std::fs::read_to_string(dpkg_list)
        && list.lines().any(|l| Path::new(l.trim()) == exe)
    {
        return AssetKind::Deb;
    }
    let template = exe
        .parent()
        .unwrap_or(Path::new("."))
        .join(DEFAULT_ENV_FILE_NAME);
    if cfg!(windows) && template.is_file() {
        return AssetKind::Msi;
    }
    AssetKind::Binary
}

/// The command that installs a verified package.
pub fn package_command(kind: AssetKind, package: &Path) -> anyhow::Result<std::process::Command> {
    let mut cmd;
    match kind {
        AssetKind::Deb => {
            cmd = std::process::Command::new("dpkg");
            // Unattended: an env file the administrator edited is kept (confold) and a new
            // default of one never edited is taken (confdef), instead of dpkg stopping to ask
            // on a terminal nobody watches.
            cmd.args(["--force-confdef", "--force-confold", "-i"])
                .arg(package);
        }
        AssetKind::Msi => {
            cmd = std::process::Command::new("msiexec");
            let log: PathBuf = package.with_extension("install.log");
            cmd.arg("/i")
                .arg(package)
                .args(["/qn", "/norestart", "/l*v"])
                .arg(log);
        }
        AssetKind::Binary => {
            bail!("a plain install replaces its executable; no package to hand over")
        }
    }
    Ok(cmd)
}

/// Runs the package manager on the package and waits for it.
pub fn install_package(kind: AssetKind, package: &Path) -> anyhow::Result<()> {
    let mut cmd = package_command(kind, package)?;
    let status = cmd
        .status()
        .with_context(|| format!("could not run {cmd:?}"))?;
    if !status.success() {
        bail!(
            "{cmd:?} failed ({status}); run `estafeta update` as an administrator (root, or an elevated prompt), and read the package manager's messages above"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dpkg_listed_binary_is_a_deb_install() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("estafeta.list");
        std::fs::write(&list, "/.\n/usr\n/usr/bin\n/usr/bin/estafeta\n").unwrap();
        assert_eq!(
            detect_with(Path::new("/usr/bin/estafeta"), &list),
            AssetKind::Deb
        );
        assert_eq!(
            detect_with(Path::new("/opt/estafeta/estafeta"), &list),
            AssetKind::Binary
        );
        assert_eq!(
            detect_with(Path::new("/usr/bin/estafeta"), &dir.path().join("none")),
            AssetKind::Binary
        );
        let cmd = package_command(
            AssetKind::Deb,
            Path::new("/tmp/x/estafeta_0.2.0-1_amd64.deb"),
        )
        .unwrap();
        assert_eq!(
            format!("{cmd:?}"),
            r#""dpkg" "--force-confdef" "--force-confold" "-i" "/tmp/x/estafeta_0.2.0-1_amd64.deb""#
        );
    }
}
