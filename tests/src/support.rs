//! Small helpers the end-to-end tests share: the agent's status (`GET /v1/status`) and waiting
//! on it, the tail of the agent's log for failure messages, the record files of a staging
//! folder, JSON-lines output of the CLI, and raw HTTP/1.1 requests for what reqwest will not
//! send as given (paths with `..`, chunked bodies).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::agent::{Agent, body_value};

/// The last `lines` lines of everything the agent wrote to stderr.
pub fn log_tail(agent: &Agent, lines: usize) -> String {
    let text = agent.stderr();
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    all[start..].join("\n")
}

/// `GET /v1/status` (with `Authorization: Bearer <token>` when given) as JSON.
///
/// # Panics
/// When the answer is not 200, with the tail of the agent's log.
pub async fn status_with(agent: &Agent, token: Option<&str>) -> Value {
    let mut request = agent.client().get(agent.url("/v1/status"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET /v1/status failed: {e}\n{}", log_tail(agent, 40)));
    let code = response.status();
    let bytes = response.bytes().await.unwrap_or_default();
    let body = body_value(&bytes);
    assert_eq!(
        code,
        StatusCode::OK,
        "GET /v1/status answered {code}: {body}\nagent log tail:\n{}",
        log_tail(agent, 40)
    );
    body
}

/// `GET /v1/status` without a token; see [`status_with`].
pub async fn status(agent: &Agent) -> Value {
    status_with(agent, None).await
}

/// The entry of `sink` in a status document (`sinks[]`), or null.
pub fn sink_status<'a>(status: &'a Value, sink: &str) -> &'a Value {
    status["sinks"]
        .as_array()
        .and_then(|sinks| sinks.iter().find(|s| s["sink"] == sink))
        .unwrap_or(&Value::Null)
}

/// Polls `GET /v1/status` every 100 ms until `done` holds; returns that status.
///
/// # Panics
/// When `timeout` passes first, naming `what`, with the last status and the agent's log tail.
pub async fn wait_status(
    agent: &Agent,
    timeout: Duration,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let status = status(agent).await;
        if done(&status) {
            return status;
        }
        if Instant::now() >= deadline {
            panic!(
                "waited {timeout:?} for {what}; last status:\n{}\nagent log tail:\n{}",
                serde_json::to_string_pretty(&status).unwrap_or_default(),
                log_tail(agent, 60)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether nothing is left to deliver: no record pending for any sink, none in flight, none dead.
pub fn drained(status: &Value) -> bool {
    status["records_pending"] == 0
        && status["sinks"].as_array().is_some_and(|sinks| {
            sinks
                .iter()
                .all(|s| s["pending"] == 0 && s["in_flight"] == 0 && s["dead"] == 0)
        })
}

/// Waits until [`drained`]; returns the status.
pub async fn wait_drained(agent: &Agent, timeout: Duration) -> Value {
    wait_status(agent, timeout, "every record to be delivered", drained).await
}

/// Every file under the staging folder outside its `_state` bookkeeping folder (segments,
/// dead letters, foreign files), sorted.
pub fn record_files(staging: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n == "_state") {
                    continue;
                }
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(staging, &mut out);
    out.sort();
    out
}

/// One JSON value per non-empty line (the CLI's `--json` listings).
///
/// # Panics
/// When a line is not JSON.
pub fn json_lines(bytes: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(bytes)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

/// The body of a [`raw_request`].
#[derive(Debug, Clone)]
pub enum RawBody<'a> {
    /// No body.
    None,
    /// Sent with `Content-Length`.
    Full(&'a [u8]),
    /// Sent with `Transfer-Encoding: chunked`, one chunk per slice (no length announced).
    Chunked(Vec<&'a [u8]>),
}

/// Sends one HTTP/1.1 request exactly as given (the target is not normalised, so `..` stays)
/// with `Connection: close`, and returns the status and the body as [`body_value`] reads it.
///
/// # Panics
/// When the connection fails or the answer is not HTTP.
pub async fn raw_request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: RawBody<'_>,
) -> (u16, Value) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    let mut bytes = Vec::new();
    match &body {
        RawBody::None => head.push_str("\r\n"),
        RawBody::Full(data) => {
            head.push_str(&format!("Content-Length: {}\r\n\r\n", data.len()));
            bytes.extend_from_slice(data);
        }
        RawBody::Chunked(chunks) => {
            head.push_str("Transfer-Encoding: chunked\r\n\r\n");
            for chunk in chunks {
                bytes.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                bytes.extend_from_slice(chunk);
                bytes.extend_from_slice(b"\r\n");
            }
            bytes.extend_from_slice(b"0\r\n\r\n");
        }
    }
    let mut request = head.into_bytes();
    request.extend_from_slice(&bytes);
    // The server may answer (413) and close before reading everything: a failed write is
    // fine as long as the answer can be read.
    let _ = stream.write_all(&request).await;
    let _ = stream.flush().await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
                // A reset after the answer arrived (unread request bytes) ends the answer.
                Err(_) if !answer.is_empty() => break,
                Err(e) => panic!("reading the answer to {method} {target}: {e}"),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer to {method} {target} within 30 s");
    parse_answer(&answer)
        .unwrap_or_else(|| panic!("not an HTTP answer: {:?}", String::from_utf8_lossy(&answer)))
}

fn parse_answer(answer: &[u8]) -> Option<(u16, Value)> {
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&answer[..split]).ok()?;
    let mut body = answer[split + 4..].to_vec();
    let status: u16 = head
        .lines()
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if chunked {
        body = dechunk(&body)?;
    }
    Some((status, body_value(&body)))
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}
