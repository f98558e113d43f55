//! A throw-away nats-server (Debian package nats-server, 2.9) for the TLS and authentication
//! tests: its own config file (TLS, client verification, NKey users, JetStream) in the test's
//! folder, a free loopback port, and a guard that kills the server's PID when dropped, also
//! when the test panics. The shared server on 127.0.0.1:4222 is never touched.
//!
//! Standard library only, so the agent's own tests can include this file with `#[path]`.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What the server's config file says.
#[derive(Default, Clone)]
pub struct NatsServerSettings {
    /// `tls { cert_file, key_file }`: the server's certificate and key.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// `tls { ca_file, verify: true }`: clients must show a certificate signed by this CA.
    pub verify_clients_with: Option<PathBuf>,
    /// `authorization { users = [ { nkey: U… } ] }`: the public NKeys allowed in.
    pub nkey_users: Vec<String>,
    /// More configuration, as written (e.g. `operator` / `resolver` for JWT accounts).
    pub extra: String,
}

/// A running nats-server; killed when dropped.
pub struct NatsServer {
    child: Child,
    pub port: u16,
    log: PathBuf,
}

impl NatsServer {
    /// Starts nats-server with `settings` and JetStream (store in `dir`), on a free loopback
    /// port, and waits until it accepts connections.
    ///
    /// # Panics
    /// When nats-server is not installed (`scripts/install-deps` installs it) or does not
    /// start (its log is in the message).
    pub fn start(dir: &Path, settings: &NatsServerSettings) -> NatsServer {
        std::fs::create_dir_all(dir).expect("creating the nats-server folder");
        let port = free_port();
        let store = dir.join("jetstream");
        let mut conf = format!(
            "listen: \"127.0.0.1:{port}\"\njetstream {{\n  store_dir: {:?}\n  max_memory_store: 64MB\n  max_file_store: 256MB\n}}\n",
            store.display().to_string()
        );
        if let Some((cert, key)) = &settings.tls {
            conf.push_str(&format!(
                "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  timeout: 2\n",
                cert.display().to_string(),
                key.display().to_string()
            ));
            if let Some(ca) = &settings.verify_clients_with {
                conf.push_str(&format!(
                    "  ca_file: {:?}\n  verify: true\n",
                    ca.display().to_string()
                ));
            }
            conf.push_str("}\n");
        }
        if !settings.nkey_users.is_empty() {
            conf.push_str("authorization {\n  users = [\n");
            for user in &settings.nkey_users {
                conf.push_str(&format!("    {{ nkey: {user:?} }}\n"));
            }
            conf.push_str("  ]\n}\n");
        }
        conf.push_str(&settings.extra);
        let conf_path = dir.join("nats-server.conf");
        std::fs::write(&conf_path, conf).expect("writing nats-server.conf");
        let log = dir.join("nats-server.log");
        let binary = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("nats-server");
        let child = Command::new(binary)
            .arg("-c")
            .arg(&conf_path)
            .arg("-l")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| {
                panic!(
                    "cannot start nats-server ({err}): this test needs the Debian package nats-server (scripts/install-deps installs it)"
                )
            });
        let mut server = NatsServer { child, port, log };
        server.wait_ready();
        server
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        let addr = self.addr();
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "nats-server exited at start ({status}); its log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "nats-server did not listen on {addr} within 15 s; its log:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `scheme://host:port` with `host` as given (a certificate names 127.0.0.1 and localhost).
    pub fn url(&self, scheme: &str, host: &str) -> String {
        format!("{scheme}://{host}:{}", self.port)
    }

    /// The server's log so far (for a failing assertion's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        // Only this server's own PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port nothing listens on now (the kernel's choice, released at once).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}
