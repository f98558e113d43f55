//! Access (contract 7, safe by default), beyond `bad_input` (no public address without a token, 401
//! without it): the ingest token, the central API token, a password in a URL and the payloads never
//! appear in the agent's logs (stderr, at the default level, through deliveries, retries and a dead
//! letter) nor in `check-config` output; every staging file is mode 0600 and every folder 0700; an
//! HTTPS central API whose certificate comes from a CA the agent does not know is refused (nothing
//! reaches it, the status says why) until `CENTRAL_API_CA_FILE` names that CA, and then everything
//! is delivered. The HTTPS server is Python's `http.server` wrapped in `ssl`, the certificates come
//! from the `openssl` command line.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use estafeta_e2e::{
    Agent, FlakyHttpServer, free_port, log_tail, run_cli, sink_status, status_with, wait_drained,
    wait_status,
};
use serde_json::json;

const INGEST_TOKEN: &str = "ingest-tok-7Q2xZp";
const API_TOKEN: &str = "api-tok-R8vLm3";
const URL_PASSWORD: &str = "url-pw-K4nW9d";
const MARKER: &str = "PAYLOAD-Maria-da-Silva-CPF-12345678900";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_and_payloads_stay_out_of_logs_and_staging_is_private() {
    let server = FlakyHttpServer::start_with_seed(7).await;
    server.fail_fraction(0.3);
    // A permanent refusal for one path: a dead letter, whose reason must not carry the payload.
    server.status_for("/refused", 400);
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://nurse:{URL_PASSWORD}@{}", server.addr());
    let env = [
        ("CENTRAL_API_URL", url.as_str()),
        ("CENTRAL_API_TOKEN", API_TOKEN),
        ("INGEST_TOKEN", INGEST_TOKEN),
        ("CRONTAB", "* * * * * *"),
        ("RETRY_BASE_SECS", "1"),
        ("RETRY_MAX_SECS", "1"),
    ];
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;
    let auth = format!("Bearer {INGEST_TOKEN}");
    for n in 0..30 {
        let body = json!({"id": format!("p{n}"), "name": MARKER, "n": n});
        let (code, answer) = agent
            .post_with("create", "patient", &body, &[("Authorization", &auth)])
            .await;
        assert_eq!(code.as_u16(), 202, "{answer}");
    }
    let (code, answer) = agent
        .post_with(
            "create",
            "refused",
            &json!({"id": "r1", "name": MARKER}),
            &[("Authorization", &auth)],
        )
        .await;
    assert_eq!(code.as_u16(), 202, "{answer}");
    // A refused request too (no token): its body must not be logged either.
    let (code, _) = agent
        .post("create", "patient", &json!({"name": MARKER}))
        .await;
    assert_eq!(code.as_u16(), 401);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = status_with(&agent, Some(INGEST_TOKEN)).await;
        let api = sink_status(&s, "api");
        if api["pending"] == 0 && api["in_flight"] == 0 && api["dead"] == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "waited 60 s for 30 delivered and 1 dead: {s}\n{}",
            log_tail(&agent, 40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The requests carried the API token and the URL's credentials (so they were in use).
    let requests = server.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.header("authorization") == Some(&format!("Bearer {API_TOKEN}"))),
        "the API token was sent"
    );

    let out = run_cli(dir.path(), &env, &["check-config"]).await;
    let offline = run_cli(dir.path(), &env, &["check-config", "--offline"]).await;
    let listing = run_cli(dir.path(), &env, &["ls", "--failed"]).await;
    agent.terminate();
    agent.wait(Duration::from_secs(30)).await;
    let texts = [
        ("agent stderr", agent.stderr()),
        ("agent stdout", agent.stdout()),
        (
            "check-config",
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ),
        (
            "check-config --offline",
            format!(
                "{}{}",
                String::from_utf8_lossy(&offline.stdout),
                String::from_utf8_lossy(&offline.stderr)
            ),
        ),
        (
            "ls --failed (stderr)",
            String::from_utf8_lossy(&listing.stderr).into_owned(),
        ),
    ];
    assert!(
        texts[0].1.contains("Flush completed") && texts[2].1.contains("CENTRAL_API_URL"),
        "the logs and check-config output are not empty:\n{}\n{}",
        texts[0].1,
        texts[2].1
    );
    for (what, text) in &texts {
        for secret in [INGEST_TOKEN, API_TOKEN, URL_PASSWORD, MARKER, "Maria"] {
            assert!(!text.contains(secret), "{what} shows {secret:?}:\n{text}");
        }
    }

    // Staging is private: files 0600, folders 0700.
    let mut checked = 0;
    let mut wrong = Vec::new();
    check_modes(&dir.path().join("staging"), &mut checked, &mut wrong);
    assert!(checked > 5, "only {checked} entries under staging");
    assert!(
        wrong.is_empty(),
        "staging entries readable by others:\n{}",
        wrong.join("\n")
    );
    eprintln!(
        "access: no secret or payload in logs or check-config; {checked} staging entries private"
    );
}

/// Patient data at rest (contract 7, safe by default): the other files that hold patient data or
/// its traces. The embedded central database (the default sink, with whole payloads) and its
/// `-wal`/`-shm` are 0600, the log folder 0700 and its files 0600, whatever the umask of whoever
/// started the agent (0022 here, as in a shell); log files an earlier version left 0644 are
/// narrowed; `LOG_RETENTION_DAYS` keeps that many daily files and deletes the older ones at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_database_and_the_logs_are_private_and_old_logs_are_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    std::fs::set_permissions(&logs, std::fs::Permissions::from_mode(0o755)).unwrap();
    for day in 1..=6 {
        let old = logs.join(format!("estafeta.2026-01-0{day}.log"));
        std::fs::write(&old, format!("an old day's log {day}\n")).unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
        // The appender orders files by creation time, which the kernel keeps at clock-tick
        // precision: made a day apart in real life, a few ticks apart here.
        std::thread::sleep(Duration::from_millis(30));
    }
    // The umask is this test process's (other tests' files are unaffected by 022), inherited by
    // the agent it spawns.
    let previous = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
    let env = [
        ("CRONTAB", "* * * * * *"),
        ("LOG_DIR", "logs"),
        ("LOG_RETENTION_DAYS", "3"),
    ];
    let mut agent = Agent::start(dir.path(), &env);
    rustix::process::umask(previous);
    agent.wait_ready(Duration::from_secs(20)).await;
    for n in 0..5 {
        let body = json!({"id": format!("p{n}"), "name": MARKER});
        let (code, answer) = agent.post("create", "patient", &body).await;
        assert_eq!(code.as_u16(), 202, "{answer}");
    }
    wait_drained(&agent, Duration::from_secs(30)).await;

    // While the agent runs, SQLite's -wal and -shm files exist beside the database.
    let mut wrong = Vec::new();
    for name in ["central.db", "central.db-wal", "central.db-shm"] {
        let path = dir.path().join(name);
        let meta = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{name} is missing ({e}):\n{}", log_tail(&agent, 20)));
        let mode = meta.permissions().mode() & 0o777;
        if mode != 0o600 {
            wrong.push(format!("{mode:o} {name}"));
        }
    }
    let mode = std::fs::metadata(&logs).unwrap().permissions().mode() & 0o777;
    if mode != 0o700 {
        wrong.push(format!("{mode:o} logs/"));
    }
    let mut kept: Vec<String> = Vec::new();
    for entry in std::fs::read_dir(&logs).unwrap() {
        let entry = entry.unwrap();
        let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
        let name = entry.file_name().to_string_lossy().into_owned();
        if mode != 0o600 {
            wrong.push(format!("{mode:o} logs/{name}"));
        }
        kept.push(name);
    }
    agent.terminate();
    agent.wait(Duration::from_secs(30)).await;
    assert!(
        wrong.is_empty(),
        "readable by others:\n{}",
        wrong.join("\n")
    );
    kept.sort();
    assert_eq!(
        kept.len(),
        3,
        "LOG_RETENTION_DAYS=3 keeps three daily files: {kept:?}"
    );
    assert_eq!(
        &kept[..2],
        ["estafeta.2026-01-05.log", "estafeta.2026-01-06.log"]
    );
    let today = std::fs::read_to_string(logs.join(&kept[2])).unwrap();
    assert!(today.contains("Flush completed"), "today's log: {today}");
}

fn check_modes(path: &Path, checked: &mut usize, wrong: &mut Vec<String>) {
    let meta = std::fs::symlink_metadata(path).unwrap();
    let mode = meta.permissions().mode() & 0o777;
    *checked += 1;
    let expected = if meta.is_dir() { 0o700 } else { 0o600 };
    if mode & 0o077 != 0 || (meta.is_file() && mode != expected) {
        wrong.push(format!("{:o} {}", mode, path.display()));
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            check_modes(&entry.unwrap().path(), checked, wrong);
        }
    }
}

/// An HTTPS server (Python) answering 201 to every request and printing one line per request.
/// Its threads print under a lock: `print` writes each argument separately, so two requests
/// answered at once could otherwise mix their words into one line and be counted as one.
const HTTPS_SERVER: &str = r#"
import http.server, ssl, sys, threading
OUT = threading.Lock()
class H(http.server.BaseHTTPRequestHandler):
    def handle_one(self):
        n = int(self.headers.get('Content-Length') or 0)
        self.rfile.read(n)
        with OUT:
            print("REQUEST", self.command, self.path, flush=True)
        self.send_response(201)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', '2')
        self.end_headers()
        self.wfile.write(b'{}')
    do_POST = do_PUT = do_DELETE = do_GET = handle_one
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), H)
c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
c.load_cert_chain('server.pem', 'server.key')
s.socket = c.wrap_socket(s.socket, server_side=True)
print("READY", flush=True)
s.serve_forever()
"#;

struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_api_with_an_unknown_ca_is_refused_until_central_api_ca_file_names_it() {
    let certs = tempfile::tempdir().unwrap();
    estafeta_e2e::release::test_certificates(certs.path());
    std::fs::write(certs.path().join("server.py"), HTTPS_SERVER).unwrap();
    let port = free_port();
    let log = certs.path().join("server.log");
    let server = Child(
        Command::new("python3")
            .args(["server.py", &port.to_string()])
            .current_dir(certs.path())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("this test needs python3"),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("READY")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the HTTPS server did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let requests = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("REQUEST"))
            .count()
    };

    let dir = tempfile::tempdir().unwrap();
    let url = format!("https://127.0.0.1:{port}");
    let env = [
        ("CENTRAL_API_URL", url.as_str()),
        ("CRONTAB", "* * * * * *"),
        ("RETRY_BASE_SECS", "1"),
        ("RETRY_MAX_SECS", "1"),
    ];
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;
    for n in 0..5 {
        let (code, body) = agent
            .post("create", "patient", &json!({"id": n, "name": "Ana"}))
            .await;
        assert_eq!(code.as_u16(), 202, "{body}");
    }
    let refused = wait_status(&agent, Duration::from_secs(20), "a TLS failure", |s| {
        sink_status(s, "api")["last_error"].is_string()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let error = sink_status(&refused, "api")["last_error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        error.to_lowercase().contains("certificate") || error.contains("UnknownIssuer"),
        "the status says the certificate is not trusted: {error}"
    );
    assert_eq!(
        requests(),
        0,
        "no request got through an untrusted TLS connection"
    );
    assert_eq!(refused["records_pending"], 5, "{refused}");
    let check = run_cli(dir.path(), &env, &["check-config"]).await;
    assert!(
        !check.status.success(),
        "check-config must fail against an untrusted certificate: {}",
        String::from_utf8_lossy(&check.stdout)
    );

    // The hospital's CA installed in the operating system's trust store (here the file that
    // store is read from, SSL_CERT_FILE, as rustls-native-certs reads it): without any
    // setting of the agent's, everything goes out, over TLS.
    drop(agent);
    let ca = certs.path().join("ca.pem");
    let mut agent = Agent::spec(dir.path())
        .envs(env)
        .env("SSL_CERT_FILE", &ca)
        .spawn();
    agent.wait_ready(Duration::from_secs(20)).await;
    wait_drained(&agent, Duration::from_secs(30)).await;
    assert!(
        requests() >= 5,
        "with the CA in the system's trust store, the 5 records reached the HTTPS API\n{}",
        log_tail(&agent, 20)
    );

    // The same agent, told the CA in its own setting: new records go out too.
    drop(agent);
    let mut agent = Agent::spec(dir.path())
        .envs(env)
        .env("CENTRAL_API_CA_FILE", &ca)
        .spawn();
    agent.wait_ready(Duration::from_secs(20)).await;
    for n in 5..10 {
        let (code, body) = agent
            .post("create", "patient", &json!({"id": n, "name": "Ana"}))
            .await;
        assert_eq!(code.as_u16(), 202, "{body}");
    }
    wait_drained(&agent, Duration::from_secs(30)).await;
    assert!(
        requests() >= 10,
        "with CENTRAL_API_CA_FILE, 5 more records reached the HTTPS API\n{}",
        log_tail(&agent, 20)
    );
    drop(server);
    eprintln!(
        "access: untrusted CA refused ({error}); with CENTRAL_API_CA_FILE {} requests delivered",
        requests()
    );
}
