//! A throw-away PostgreSQL cluster for the TLS tests: `initdb` in a temporary folder, started
//! with `pg_ctl` on a free loopback port, with or without TLS (a server certificate from
//! [`crate::pki`]-made files) and the `pg_hba.conf` the test gives. The binaries come from
//! /usr/lib/postgresql/*/bin (Debian package postgresql, installed by scripts/install-deps);
//! initdb refuses to run as root, so as root everything runs as the `postgres` OS user on a
//! folder it owns. The [`PgCluster`] guard stops the server (`pg_ctl stop -m immediate`) and
//! removes the folder when dropped, even when the test panics.
//!
//! Only the standard library and tempfile, so the agent's own tests can include it by path.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

/// TLS settings of a cluster: the server's certificate and key, and the CA its clients'
/// certificates must chain to (`ssl_ca_file`, for `cert` authentication).
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// A running cluster; dropping it stops the server and removes its folder.
pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

/// The newest /usr/lib/postgresql/*/bin that has initdb.
fn bin_dir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!(
            "this test needs PostgreSQL's server binaries (initdb, pg_ctl) in /usr/lib/postgresql/*/bin; install the Debian package postgresql (scripts/install-deps)"
        )
    })
}

fn is_root() -> bool {
    // The folder /proc/self belongs to the process's effective user.
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// `program args…`, as the `postgres` OS user when running as root; panics with its output
/// when it fails.
fn run(program: &Path, args: &[&str]) {
    let mut command = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    let out = command
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run {}: {err}", program.display()));
    assert!(
        out.status.success(),
        "{} {args:?} failed: {}{}",
        program.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

impl PgCluster {
    /// A new cluster (superuser `postgres`, no password) listening on 127.0.0.1 only, TLS on
    /// when `tls` is given, with `hba` as its whole pg_hba.conf. The certificate files are
    /// copied into the cluster's folder (the server needs them readable by its user, the key
    /// 0600).
    pub fn start(tls: Option<&ServerTls>, hba: &str) -> Self {
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("estafeta-pg-")
            .tempdir()
            .expect("a temporary folder");
        let data = dir.path().join("data");
        let mut conf = format!(
            "listen_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\nshared_buffers = 16MB\nmax_connections = 30\n",
            dir.path().display()
        );
        if let Some(tls) = tls {
            let copy = |from: &Path, name: &str| {
                let to = dir.path().join(name);
                std::fs::copy(from, &to)
                    .unwrap_or_else(|err| panic!("copying {}: {err}", from.display()));
                to
            };
            let cert = copy(&tls.cert, "server.pem");
            let key = copy(&tls.key, "server.key");
            conf.push_str(&format!(
                "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
                cert.display(),
                key.display()
            ));
            if let Some(ca) = &tls.client_ca {
                let ca = copy(ca, "client-ca.pem");
                conf.push_str(&format!("ssl_ca_file = '{}'\n", ca.display()));
            }
        } else {
            conf.push_str("ssl = off\n");
        }
        if is_root() {
            let out = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .output()
                .expect("chown");
            assert!(out.status.success(), "chown: {out:?}");
        }
        let data_arg = data.to_str().expect("a UTF-8 temporary path");
        run(
            &bin.join("initdb"),
            &[
                "-D",
                data_arg,
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        );
        // initdb made the files as the postgres user; root (the test) may write them.
        let port = free_port();
        conf.push_str(&format!("port = {port}\n"));
        let postgresql_conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&postgresql_conf).expect("postgresql.conf");
        text.push_str(&conf);
        std::fs::write(&postgresql_conf, text).expect("writing postgresql.conf");
        std::fs::write(data.join("pg_hba.conf"), hba).expect("writing pg_hba.conf");
        let cluster = Self { dir, bin, port };
        let log = cluster.dir.path().join("server.log");
        run(
            &cluster.bin.join("pg_ctl"),
            &[
                "-D",
                data_arg,
                "-l",
                log.to_str().expect("UTF-8"),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
        cluster
    }

    /// `postgres://postgres@127.0.0.1:PORT/DB` followed by `query` (e.g. `?sslmode=require`).
    pub fn url(&self, database: &str, query: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{database}{query}",
            self.port
        )
    }

    /// The server's log so far (for a failing assertion).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let mut command = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"])
                .arg(self.bin.join("pg_ctl"));
            c
        } else {
            Command::new(self.bin.join("pg_ctl"))
        };
        let _ = command
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
        // The TempDir removes the folder next.
    }
}
