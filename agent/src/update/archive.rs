//! What a verified release archive holds, read from its signed bytes in memory.
//!
//! ```text
//! estafeta-0.2.0-x86_64-unknown-linux-gnu.tar.gz   (zipsign-signed as a whole)
//! ├── VERSION      0.2.0 — the release's version, signed with the rest
//! └── estafeta     (binary), or one .deb, or one .msi
//! ```
//!
//! **The version is the signed `VERSION` file, not the manifest's.** The manifest is not
//! signed: a server could offer an old, genuinely signed archive as "99.0.0" and have it
//! installed and run. So the manifest's version is only a hint: the archive's `VERSION` must say
//! the same, and be strictly newer than the running version (older only with
//! `estafeta update --allow-downgrade`). An archive without `VERSION` (one published before this
//! rule) proves no version and is refused. Only top-level regular files are read; anything else
//! in the archive is ignored, and nothing is unpacked but the one file installed.

use std::io::Read as _;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context as _, bail};

use super::{AssetKind, Refused};

/// The file at the top of every release archive that holds its version.
pub const VERSION_FILE: &str = "VERSION";
/// Longest `VERSION` file read, in bytes.
const MAX_VERSION_BYTES: u64 = 256;

/// The release taken out of an archive.
#[derive(Debug)]
pub struct Unpacked {
    /// From the signed `VERSION` file.
    pub version: semver::Version,
    /// The executable, `.deb` or `.msi`, written into the caller's folder.
    pub file: PathBuf,
}

/// Reads `signed` (a `.tar.gz`, the part its signature covers), published as `name`: its
/// `VERSION` and the one file of `kind`, written into `into`. A missing or unreadable `VERSION`
/// is a [`Refused`] error.
pub fn unpack(signed: &[u8], name: &str, kind: AssetKind, into: &Path) -> anyhow::Result<Unpacked> {
    let exe_name = format!("estafeta{}", std::env::consts::EXE_SUFFIX);
    let mut version: Option<String> = None;
    let mut file: Option<PathBuf> = None;
    let mut tar = tar::Archive::new(flate2::read::MultiGzDecoder::new(signed));
    let entries = tar
        .entries()
        .with_context(|| format!("could not read the archive {name}"))?;
    for entry in entries {
        let mut entry = entry.with_context(|| format!("could not read the archive {name}"))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path()?.into_owned();
        let mut parts = path.components().filter(|c| *c != Component::CurDir);
        let (Some(Component::Normal(file_name)), None) = (parts.next(), parts.next()) else {
            continue;
        };
        let file_name = file_name.to_string_lossy().into_owned();
        if file_name == VERSION_FILE {
            if version.is_some() {
                bail!(Refused(format!(
                    "the archive {name} holds {VERSION_FILE} twice; refused"
                )));
            }
            let mut text = String::new();
            (&mut entry)
                .take(MAX_VERSION_BYTES)
                .read_to_string(&mut text)
                .map_err(|_| {
                    Refused(format!(
                        "the {VERSION_FILE} file of {name} is not text; refused"
                    ))
                })?;
            version = Some(text);
            continue;
        }
        let wanted = match kind {
            AssetKind::Binary => file_name == exe_name,
            AssetKind::Deb | AssetKind::Msi => Path::new(&file_name)
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case(kind.as_str())),
        };
        if !wanted {
            continue;
        }
        if file.is_some() {
            bail!(
                "the archive {name} must hold exactly one {} at its top level",
                what(kind)
            );
        }
        let target = into.join(&file_name);
        let mut out = create_new(&target, kind == AssetKind::Binary)?;
        std::io::copy(&mut entry, &mut out)
            .with_context(|| format!("could not unpack {file_name} from {name}"))?;
        out.sync_all()
            .with_context(|| format!("could not write {}", target.display()))?;
        file = Some(target);
    }
    let Some(text) = version else {
        bail!(Refused(format!(
            "the archive {name} holds no {VERSION_FILE} file, so its version is not signed and it is refused (an archive published before signed versions: publish it again with {VERSION_FILE}, see the README's \"Updates\", or install it by hand)"
        )));
    };
    let version = semver::Version::parse(text.trim()).map_err(|_| {
        Refused(format!(
            "the {VERSION_FILE} file of {name} says {:?}, which is not a semver version; refused",
            text.trim()
        ))
    })?;
    let Some(file) = file else {
        bail!(
            "the archive {name} holds no {} at its top level",
            what(kind)
        );
    };
    Ok(Unpacked { version, file })
}

fn what(kind: AssetKind) -> String {
    match kind {
        AssetKind::Binary => format!("estafeta{}", std::env::consts::EXE_SUFFIX),
        AssetKind::Deb | AssetKind::Msi => format!(".{}", kind.as_str()),
    }
}

/// A new file (never one already there, never through a link); executable when `exe`.
fn create_new(path: &Path, exe: bool) -> anyhow::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(if exe { 0o755 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = exe;
    options
        .open(path)
        .with_context(|| format!("could not create {}", path.display()))
}

/// Whether the archive's signed `version` may replace `current`, the manifest having offered
/// `offered`: the same version as the manifest's, and strictly newer unless `allow_downgrade`.
pub fn judge(
    offered: &str,
    signed: &semver::Version,
    current: &str,
    allow_downgrade: bool,
) -> Result<(), Refused> {
    if semver::Version::parse(offered).ok().as_ref() != Some(signed) {
        return Err(Refused(format!(
            "the manifest offers version {offered} but the archive's signed {VERSION_FILE} says {signed}; the manifest was changed or another release's archive is offered under its name, so nothing was installed"
        )));
    }
    let current = semver::Version::parse(current)
        .map_err(|_| Refused(format!("the running version {current} is not semver")))?;
    if *signed == current {
        return Err(Refused(format!(
            "the archive's signed version {signed} is the running one; nothing to install"
        )));
    }
    if *signed < current && !allow_downgrade {
        return Err(Refused(format!(
            "the archive's signed version {signed} is older than the running {current}; only a newer version is installed (to go back on purpose: `estafeta update --allow-downgrade`, the agent stopped)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn tar_gz(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        {
            let mut tar = tar::Builder::new(&mut gz);
            for (name, bytes) in files {
                let mut header = tar::Header::new_gnu();
                header.set_size(bytes.len() as u64);
                header.set_mode(0o755);
                header.set_cksum();
                tar.append_data(&mut header, name, *bytes).unwrap();
            }
            tar.finish().unwrap();
        }
        gz.flush().unwrap();
        gz.finish().unwrap()
    }

    #[test]
    fn the_version_comes_from_the_archive_and_must_be_there() {
        let dir = tempfile::tempdir().unwrap();
        let archive = tar_gz(&[
            ("./VERSION", b"0.2.0\n"),
            ("nested/estafeta", b"not this one"),
            ("estafeta", b"the binary"),
        ]);
        let got = unpack(&archive, "a.tar.gz", AssetKind::Binary, dir.path()).unwrap();
        assert_eq!(got.version, semver::Version::new(0, 2, 0));
        assert_eq!(std::fs::read(&got.file).unwrap(), b"the binary");

        let dir = tempfile::tempdir().unwrap();
        let unsigned_version = tar_gz(&[("estafeta", b"old")]);
        let err = unpack(&unsigned_version, "a.tar.gz", AssetKind::Binary, dir.path()).unwrap_err();
        assert!(err.downcast_ref::<Refused>().is_some(), "{err:#}");
        assert!(err.to_string().contains("no VERSION"), "{err:#}");

        let dir = tempfile::tempdir().unwrap();
        let two = tar_gz(&[("VERSION", b"0.2.0"), ("a.deb", b"1"), ("b.deb", b"2")]);
        let err = unpack(&two, "a.tar.gz", AssetKind::Deb, dir.path()).unwrap_err();
        assert!(err.to_string().contains("exactly one .deb"), "{err:#}");

        let dir = tempfile::tempdir().unwrap();
        let bad = tar_gz(&[("VERSION", b"latest"), ("estafeta", b"x")]);
        let err = unpack(&bad, "a.tar.gz", AssetKind::Binary, dir.path()).unwrap_err();
        assert!(err.downcast_ref::<Refused>().is_some(), "{err:#}");
    }

    #[test]
    fn only_the_manifests_version_and_newer_is_taken() {
        let v = |s: &str| semver::Version::parse(s).unwrap();
        assert!(judge("0.2.0", &v("0.2.0"), "0.1.0", false).is_ok());
        let replay = judge("99.0.0", &v("0.1.0"), "0.1.0", true).unwrap_err();
        assert!(
            replay.0.contains("signed VERSION says 0.1.0"),
            "{}",
            replay.0
        );
        assert!(judge("99.0.0", &v("0.0.9"), "0.1.0", true).is_err());
        let older = judge("0.0.9", &v("0.0.9"), "0.1.0", false).unwrap_err();
        assert!(older.0.contains("--allow-downgrade"), "{}", older.0);
        assert!(judge("0.0.9", &v("0.0.9"), "0.1.0", true).is_ok());
        assert!(judge("0.1.0", &v("0.1.0"), "0.1.0", true).is_err());
    }
}
