//! `estafeta-release`: what a release pipeline does, for the package checks of
//! `scripts/package-deb` (the e2e tests call `estafeta_e2e::release` directly).
//!
//! ```text
//! estafeta-release restamp IN OUT VERSION
//!     copy the estafeta binary IN to OUT with its version stamp set to VERSION
//! estafeta-release publish --out DIR --version V --kind deb|binary --key-seed N [--sign-seed M] FILE
//!     pack FILE and a VERSION file saying V into a zipsign-signed .tar.gz in DIR (the signed
//!     version the agent checks), write DIR/manifest.json offering V for this machine's target,
//!     and print the public key of seed N (the UPDATE_PUBLIC_KEY); with --sign-seed M the archive
//!     is signed by another key (a bad signature)
//! ```
//! Test keys come from a seed byte: they are for tests on loopback only, never for releases.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use estafeta_e2e::release;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("restamp") if args.len() == 4 => {
            restamp(Path::new(&args[1]), Path::new(&args[2]), &args[3])
        }
        Some("publish") => publish(&args[1..]),
        _ => bail!(
            "usage: estafeta-release restamp IN OUT VERSION | publish --out DIR --version V --kind deb|binary --key-seed N [--sign-seed M] FILE"
        ),
    }
}

fn restamp(from: &Path, to: &Path, version: &str) -> anyhow::Result<()> {
    let binary = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    let stamped = release::restamp(&binary, env!("CARGO_PKG_VERSION"), version);
    std::fs::write(to, stamped).with_context(|| format!("writing {}", to.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

fn publish(args: &[String]) -> anyhow::Result<()> {
    let (mut out, mut version, mut kind, mut key_seed, mut sign_seed, mut file) =
        (None, None, None, None, None, None);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .with_context(|| format!("{arg} needs a value"))
        };
        match arg.as_str() {
            "--out" => out = Some(PathBuf::from(value()?)),
            "--version" => version = Some(value()?),
            "--kind" => kind = Some(value()?),
            "--key-seed" => key_seed = Some(value()?.parse::<u8>().context("--key-seed")?),
            "--sign-seed" => sign_seed = Some(value()?.parse::<u8>().context("--sign-seed")?),
            other if !other.starts_with("--") && file.is_none() => {
                file = Some(PathBuf::from(other));
            }
            other => bail!("unexpected argument {other}"),
        }
    }
    let out = out.context("--out DIR is required")?;
    let version = version.context("--version is required")?;
    let kind = kind.context("--kind deb|binary is required")?;
    let key_seed = key_seed.context("--key-seed is required")?;
    let file = file.context("the file to publish is required")?;
    let inner_name = match kind.as_str() {
        "binary" => "estafeta".to_owned(),
        "deb" => file
            .file_name()
            .context("the package has no file name")?
            .to_string_lossy()
            .into_owned(),
        other => bail!("--kind {other}: expected deb or binary"),
    };
    let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
    let archive_name = format!("estafeta-{version}-{kind}.tar.gz");
    let signer = release::signing_key(sign_seed.unwrap_or(key_seed));
    let archive = release::release_archive(
        &archive_name,
        &version,
        &[(&inner_name, &bytes, 0o755)],
        &signer,
    );
    std::fs::create_dir_all(&out)?;
    let manifest = serde_json::json!({
        "version": version,
        "assets": [{
            "target": release::host_target(),
            "kind": kind,
            "url": archive_name,
            "sha256": release::sha256_hex(&archive),
        }],
    });
    std::fs::write(out.join(&archive_name), archive)?;
    std::fs::write(out.join("manifest.json"), manifest.to_string())?;
    println!(
        "{}",
        release::public_key_base64(&release::signing_key(key_seed))
    );
    Ok(())
}
