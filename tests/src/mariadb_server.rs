//! A throw-away MariaDB server for TLS tests: `mariadb-install-db` into a temporary folder, then
//! `mariadbd` on a free port of 127.0.0.1 with the certificates a test made ([`crate::pki`]),
//! its socket in the same folder. Dropping the [`MariaDb`] kills that one process (its PID) and
//! removes the folder, also when the test panics. The shared MariaDB of
//! `scripts/start-services` is never touched.
//!
//! Standard library only, so agent tests can include this file with `#[path]` (the agent's
//! tests do not depend on this crate).
//!
//! Needs the Debian package mariadb-server (installed by scripts/install-deps); a missing
//! binary fails the test saying so.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running throw-away server.
pub struct MariaDb {
    child: Child,
    dir: PathBuf,
    pub port: u16,
}

/// The server's TLS files (`--ssl-cert`, `--ssl-key`, `--ssl-ca`).
pub struct ServerTls<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
    pub ca: &'a Path,
}

fn tool(names: &[&str]) -> PathBuf {
    for name in names {
        for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin"] {
            let path = Path::new(dir).join(name);
            if path.exists() {
                return path;
            }
        }
    }
    panic!(
        "this test needs {} (Debian package mariadb-server; run scripts/install-deps)",
        names.join(" or ")
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

impl MariaDb {
    /// Installs a data folder in `dir` (created; removed on drop) and starts the server with
    /// `tls` (or without TLS). Waits until it accepts connections (at most 60 s).
    pub fn start(dir: &Path, tls: Option<ServerTls<'_>>) -> Self {
        let install = tool(&["mariadb-install-db", "mysql_install_db"]);
        let server = tool(&["mariadbd", "mysqld"]);
        let data = dir.join("data");
        std::fs::create_dir_all(&data).expect("creating the MariaDB folder");
        // mariadb-install-db has been seen to fail once in a while on a loaded machine (its
        // bootstrap server); a fresh folder and another try, the first failure printed.
        let mut attempt = 1;
        loop {
            let out = Command::new(&install)
                .arg("--no-defaults")
                .arg(format!("--datadir={}", data.display()))
                .args([
                    "--user=root",
                    "--auth-root-authentication-method=socket",
                    "--skip-test-db",
                    "--skip-name-resolve",
                ])
                .output()
                .unwrap_or_else(|err| panic!("running {}: {err}", install.display()));
            if out.status.success() {
                break;
            }
            let said = format!(
                "{} failed (attempt {attempt}): {}{}",
                install.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(attempt < 3, "{said}");
            eprintln!("{said}");
            attempt += 1;
            let _ = std::fs::remove_dir_all(&data);
            std::fs::create_dir_all(&data).expect("creating the MariaDB folder");
        }
        let port = free_port();
        let mut command = Command::new(&server);
        command
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", dir.join("mariadb.sock").display()))
            .arg(format!("--pid-file={}", dir.join("mariadb.pid").display()))
            .arg(format!("--log-error={}", dir.join("error.log").display()))
            .arg(format!("--port={port}"))
            .args([
                "--bind-address=127.0.0.1",
                "--user=root",
                "--skip-name-resolve",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=16M",
                "--innodb-log-file-size=8M",
                "--performance-schema=OFF",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(tls) = &tls {
            command
                .arg(format!("--ssl-cert={}", tls.cert.display()))
                .arg(format!("--ssl-key={}", tls.key.display()))
                .arg(format!("--ssl-ca={}", tls.ca.display()));
        }
        let child = command
            .spawn()
            .unwrap_or_else(|err| panic!("starting {}: {err}", server.display()));
        let mut db = Self {
            child,
            dir: dir.to_path_buf(),
            port,
        };
        db.wait_ready();
        db
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("mariadbd exited at start ({status}): {}", self.error_log());
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && self.error_log().contains("ready for connections")
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "mariadbd did not start in 60 s: {}",
                self.error_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server's error log (start-up problems, refused TLS files).
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    /// Runs SQL as root over the server's socket with the `mariadb` client; returns its
    /// output (tab-separated, no headers).
    ///
    /// # Panics
    /// When the SQL fails.
    pub fn sql(&self, sql: &str) -> String {
        self.try_sql(sql)
            .unwrap_or_else(|err| panic!("{sql}: {err}"))
    }

    /// [`MariaDb::sql`], the server's error as `Err`.
    pub fn try_sql(&self, sql: &str) -> Result<String, String> {
        let client = tool(&["mariadb", "mysql"]);
        let out = Command::new(&client)
            .arg("--no-defaults")
            .arg(format!(
                "--socket={}",
                self.dir.join("mariadb.sock").display()
            ))
            .args(["--user=root", "--batch", "--skip-column-names", "-e", sql])
            .output()
            .unwrap_or_else(|err| panic!("running {}: {err}", client.display()));
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        // This server only, by its PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
