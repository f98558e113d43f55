//! Running the real `estafeta` binary: the `run` daemon as an [`Agent`] child process (start,
//! readiness, SIGKILL / SIGTERM, restart on the same port, HTTP helpers) and one-shot CLI calls.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use crate::bin::{estafeta_bin, free_port};

/// How long [`run_cli`] lets one command run.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// The environment every child starts from; everything else of the test's environment is
/// cleared. `PATH` and `HOME` pass through; `STAGING_AREA_PATH` is `<dir>/staging`. Set
/// `ESTAFETA_E2E_LOG_LEVEL` to pass a `LOG_LEVEL` to the agent.
fn base_env(dir: &Path) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = ["PATH", "HOME"]
        .into_iter()
        .filter_map(|k| std::env::var_os(k).map(|v| (k.into(), v)))
        .collect();
    env.push(("STAGING_AREA_PATH".into(), dir.join("staging").into()));
    env.push(("IS_ABSOLUTE_STAGING_AREA_PATH".into(), "true".into()));
    env.push(("RUST_BACKTRACE".into(), "1".into()));
    if let Some(level) = std::env::var_os("ESTAFETA_E2E_LOG_LEVEL") {
        env.push(("LOG_LEVEL".into(), level));
    }
    env
}

/// How to start an agent; [`Agent::restart`] starts it again the same way (same port).
#[derive(Debug, Clone)]
pub struct AgentSpec {
    program: PathBuf,
    args: Vec<OsString>,
    dir: PathBuf,
    env: Vec<(OsString, OsString)>,
    port: u16,
    /// The API is HTTPS (`INGEST_TLS_CERT`): the helpers' client trusts this CA (PEM).
    https_ca: Option<PathBuf>,
}

impl AgentSpec {
    /// `estafeta run` in `dir` on a free port.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        AgentSpec {
            program: PathBuf::new(),
            args: vec!["run".into()],
            dir: dir.into(),
            env: Vec::new(),
            port: free_port(),
            https_ca: None,
        }
    }

    /// The agent serves HTTPS (the test sets `INGEST_TLS_CERT` and `INGEST_TLS_KEY`): the
    /// helpers use `https://` and trust only `ca` (PEM). Other tests keep `http://`.
    pub fn https(mut self, ca: impl Into<PathBuf>) -> Self {
        self.https_ca = Some(ca.into());
        self
    }

    /// Adds (or overrides) one environment variable.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Adds (or overrides) environment variables.
    pub fn envs<K: Into<OsString>, V: Into<OsString>>(
        mut self,
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        self.env
            .extend(vars.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }

    /// Listens on this port instead of a free one.
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Runs another program instead of `estafeta run` (for the harness's own tests).
    pub fn program(mut self, program: impl Into<PathBuf>, args: &[&str]) -> Self {
        self.program = program.into();
        self.args = args.iter().map(OsString::from).collect();
        self
    }

    /// Starts the agent; see [`Agent::wait_ready`].
    pub fn spawn(self) -> Agent {
        let logs = tempfile::Builder::new()
            .prefix("estafeta-e2e-logs-")
            .tempdir()
            .expect("creating a directory for the agent's logs");
        let mut client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30));
        if let Some(ca) = &self.https_ca {
            let pem = std::fs::read(ca).expect("reading the test CA");
            client = client
                .tls_built_in_root_certs(false)
                .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("a PEM CA"))
                .https_only(true);
        }
        let client = client.build().expect("building the HTTP client");
        let mut agent = Agent {
            child: None,
            spec: self,
            logs,
            client,
        };
        agent.start_child();
        agent
    }
}

/// A running `estafeta run` child process. Dropping it kills the process (SIGKILL); when the
/// test is panicking it first prints the agent's stderr.
pub struct Agent {
    child: Option<Child>,
    spec: AgentSpec,
    logs: tempfile::TempDir,
    client: reqwest::Client,
}

impl Agent {
    /// `estafeta run` in `dir` with `env` added to the base environment, on a free port given
    /// to it as `INGEST_ADDR`.
    pub fn start(dir: &Path, env: &[(&str, &str)]) -> Agent {
        AgentSpec::new(dir).envs(env.iter().copied()).spawn()
    }

    /// Starts building a customised agent.
    pub fn spec(dir: &Path) -> AgentSpec {
        AgentSpec::new(dir)
    }

    fn start_child(&mut self) {
        let spec = &self.spec;
        let program = if spec.program.as_os_str().is_empty() {
            estafeta_bin()
        } else {
            spec.program.clone()
        };
        let stdout = self.log_file("stdout.log");
        let mut stderr = self.log_file("stderr.log");
        let _ = writeln!(
            stderr,
            "--- harness: starting {} {:?}",
            program.display(),
            spec.args
        );
        let mut cmd = Command::new(&program);
        cmd.args(&spec.args)
            .current_dir(&spec.dir)
            .env_clear()
            .envs(base_env(&spec.dir))
            .env("INGEST_ADDR", format!("127.0.0.1:{}", spec.port))
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        self.child = Some(child);
    }

    fn log_file(&self, name: &str) -> File {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.path().join(name))
            .expect("opening an agent log file")
    }

    /// The ingest address (`INGEST_ADDR` of the spec, else 127.0.0.1 and its port).
    pub fn addr(&self) -> SocketAddr {
        let given = self
            .spec
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "INGEST_ADDR")
            .and_then(|(_, v)| v.to_str()?.parse().ok());
        given.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], self.spec.port)))
    }

    /// `http://<addr><path>` (`https://` for an agent spawned with [`AgentSpec::https`]).
    pub fn url(&self, path: &str) -> String {
        let scheme = if self.spec.https_ca.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}{path}", self.addr())
    }

    /// The working directory.
    pub fn dir(&self) -> &Path {
        &self.spec.dir
    }

    /// The process id, while the child runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the agent wrote to stderr so far (across restarts).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.logs.path().join("stderr.log")).unwrap_or_default()
    }

    /// Everything the agent wrote to stdout so far (across restarts).
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.logs.path().join("stdout.log")).unwrap_or_default()
    }

    /// Polls `GET /healthz` until it answers 200.
    ///
    /// # Panics
    /// When the process exits first or `timeout` passes, with the agent's stderr.
    pub async fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let url = self.url("/healthz");
        loop {
            if let Some(status) = self.try_wait() {
                panic!(
                    "the agent exited before it was ready ({status}); stderr:\n{}",
                    self.stderr()
                );
            }
            let answer = self
                .client
                .get(&url)
                .timeout(Duration::from_secs(1))
                .send()
                .await;
            if matches!(&answer, Ok(r) if r.status() == StatusCode::OK) {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "the agent did not answer 200 on {url} within {timeout:?} (last: {answer:?}); stderr:\n{}",
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The exit status if the child has exited (reaping it), `None` while it runs.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        child.try_wait().expect("waiting for the agent")
    }

    /// Sends SIGKILL (a crash: no cleanup at all) and reaps the process.
    pub fn kill9(&mut self) -> ExitStatus {
        self.signal(libc::SIGKILL);
        let child = self.child.as_mut().expect("the agent was started");
        child.wait().expect("waiting for the killed agent")
    }

    /// Sends SIGTERM (a graceful stop); see [`Agent::wait`].
    pub fn terminate(&mut self) {
        self.signal(libc::SIGTERM);
    }

    /// Waits for the child to exit.
    ///
    /// # Panics
    /// When it still runs after `timeout`, with the agent's stderr.
    pub async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "the agent still runs {timeout:?} later; stderr:\n{}",
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the agent again as it was started (same directory, environment and port), after
    /// the previous process exited (killing it first if it still runs).
    pub fn restart(&mut self) {
        if self.try_wait().is_none() && self.child.is_some() {
            self.kill9();
        }
        self.start_child();
    }

    /// Signals the child unless it was already reaped (so the pid cannot belong to another
    /// process).
    fn signal(&mut self, signal: libc::c_int) {
        if self.try_wait().is_some() {
            return;
        }
        let pid = self.pid().expect("the agent was started");
        send_signal(pid, signal);
    }

    /// `POST /v1/records/{action}/{entity}` with a JSON body: the status and the answer's body
    /// (JSON, or a JSON string holding a non-JSON body, or null when empty).
    pub async fn post(&self, action: &str, entity: &str, json: &Value) -> (StatusCode, Value) {
        self.post_with(action, entity, json, &[]).await
    }

    /// [`Agent::post`] with extra headers (`Idempotency-Key`, `X-Record-Key`, ...).
    pub async fn post_with(
        &self,
        action: &str,
        entity: &str,
        json: &Value,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let mut request = self
            .client
            .post(self.url(&format!("/v1/records/{action}/{entity}")))
            .json(json);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        answer(request.send().await).await
    }

    /// `GET <path>`: the status and the body as [`Agent::post`] gives it.
    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        answer(self.client.get(self.url(path)).send().await).await
    }

    /// The HTTP client the helpers use (no proxy, 30 s timeout), for other requests.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() && self.try_wait().is_none() {
            self.kill9();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- agent stderr ({}):\n{}",
                self.spec.dir.display(),
                self.stderr()
            );
        }
    }
}

async fn answer(sent: reqwest::Result<reqwest::Response>) -> (StatusCode, Value) {
    let response = sent.unwrap_or_else(|e| panic!("the request to the agent failed: {e}"));
    let status = response.status();
    let bytes = response
        .bytes()
        .await
        .unwrap_or_else(|e| panic!("reading the agent's answer failed: {e}"));
    (status, body_value(&bytes))
}

/// A body as JSON: parsed, or the text as a JSON string, or null when empty.
pub fn body_value(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

#[allow(unsafe_code)]
fn send_signal(pid: u32, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("a pid fits pid_t");
    // SAFETY: kill(2) takes plain integers and touches no memory of ours; the caller checked
    // that the child is not reaped yet, so the pid is still our child's.
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {signal}) failed: {}",
        std::io::Error::last_os_error()
    );
}

/// Runs one CLI subcommand, `estafeta <args>`, in `dir` with the same base environment as the
/// agent plus `env`, and returns its output. Async so that in-process servers of the test (such
/// as a [`crate::FlakyHttpServer`]) keep answering while it runs.
///
/// # Panics
/// When it cannot start or runs longer than [`CLI_TIMEOUT`].
pub async fn run_cli(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let bin = estafeta_bin();
    let mut cmd = tokio::process::Command::new(&bin);
    cmd.args(args)
        .current_dir(dir)
        .env_clear()
        .envs(base_env(dir))
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(CLI_TIMEOUT, cmd.output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => panic!("cannot run {} {args:?}: {e}", bin.display()),
        Err(_) => panic!(
            "`estafeta {}` ran longer than {CLI_TIMEOUT:?}",
            args.join(" ")
        ),
    }
}
