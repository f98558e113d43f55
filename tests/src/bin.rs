//! Finding the `estafeta` binary under test (building it once if needed) and free loopback ports.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Name of the binary under test.
pub const BIN_NAME: &str = "estafeta";

/// The directory cargo puts binaries of the current profile in (`target/debug`): the test
/// executable runs from `target/debug/deps`, one level below, as in ripgrep's tests.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the path of the test executable");
    let deps = exe.parent().expect("the test executable's directory");
    let dir = if deps.ends_with("deps") {
        deps.parent().expect("the profile directory above deps")
    } else {
        deps
    };
    dir.to_path_buf()
}

/// The `estafeta` binary beside the test executable. Cargo only builds binaries of the tested
/// package, so when it is missing this runs `cargo build -p estafeta --bin estafeta` once (for
/// the same profile and target directory), and panics if the binary is still not there.
pub fn estafeta_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = profile_dir();
        let bin = dir.join(format!("{BIN_NAME}{}", std::env::consts::EXE_SUFFIX));
        if !bin.is_file() {
            build_estafeta(&dir);
        }
        assert!(
            bin.is_file(),
            "the {BIN_NAME} binary is missing at {} even after `cargo build -p estafeta --bin estafeta`",
            bin.display()
        );
        bin
    })
    .clone()
}

/// Builds the binary into `dir` (`<target>/<profile>` or `<target>/<triple>/<profile>`).
fn build_estafeta(dir: &Path) {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root above tests/");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args(["build", "-p", "estafeta", "--bin", BIN_NAME]);
    let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
    if profile != "debug" {
        cmd.args(["--profile", profile]);
    }
    let parent = dir
        .parent()
        .expect("the directory above the profile directory");
    if parent.join("CACHEDIR.TAG").is_file() {
        cmd.arg("--target-dir").arg(parent);
    } else if let Some(root) = parent.parent().filter(|r| r.join("CACHEDIR.TAG").is_file()) {
        let triple = parent.file_name().expect("the target triple directory");
        cmd.arg("--target")
            .arg(triple)
            .arg("--target-dir")
            .arg(root);
    }
    eprintln!("{BIN_NAME} binary missing: running {cmd:?}");
    match cmd.status() {
        Ok(status) if status.success() => {}
        Ok(status) => panic!("`cargo build -p estafeta --bin {BIN_NAME}` failed: {status}"),
        Err(e) => panic!("could not run cargo to build {BIN_NAME}: {e}"),
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (the OS picked it for a listener that is
/// closed on return). Another process may take it in between; tests only race with each other.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}
