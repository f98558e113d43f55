//! Hostile input (contract 6, clear errors on bad input; THREATS.md), beyond what `bad_input`
//! covers: names with NUL, raw and encoded non-ASCII, encoded slashes and dots in the URL path; a
//! 100 MB body (announced and chunked) refused with 413 while the agent's memory (VmRSS) stays
//! bounded; JSON nested 100,000 deep (400, no stack overflow); invalid UTF-8 in headers and path;
//! more wrong content types; 1,000 simultaneous connections (every one answered, no 5xx); slow
//! clients that never finish their body (timed out with 408 while others are served) or their
//! headers (slowloris: disconnected). Every case checks the agent is still alive and staged
//! nothing. Then schemathesis (from PyPI, installed by `scripts/install-schemathesis`) runs against
//! `/v1/openapi.json`: no 5xx, every answer conforms to the document.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use estafeta_e2e::{Agent, log_tail, record_files, status};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `request` as raw bytes and reads the answer until the server closes or `within`
/// passes. Returns the status code and the body bytes, or `None` when no HTTP answer came.
async fn raw(addr: SocketAddr, request: &[u8], within: Duration) -> Option<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect(addr).await.expect("connecting");
    let _ = stream.write_all(request).await;
    read_answer(&mut stream, within).await
}

async fn read_answer(stream: &mut TcpStream, within: Duration) -> Option<(u16, Vec<u8>)> {
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(within, async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&answer[..split]).into_owned();
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, answer[split + 4..].to_vec()))
}

fn post_bytes(path: &[u8], headers: &str, body: &[u8]) -> Vec<u8> {
    let mut request = b"POST ".to_vec();
    request.extend_from_slice(path);
    request.extend_from_slice(
        format!(
            " HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{headers}Content-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    request.extend_from_slice(body);
    request
}

const JSON: &str = "Content-Type: application/json\r\n";
const GOOD: &[u8] = br#"{"id": 1, "name": "Ana"}"#;

/// The agent's resident memory in KiB, from /proc/<pid>/status.
fn rss_kib(agent: &Agent) -> u64 {
    let pid = agent.pid().expect("the agent runs");
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading /proc");
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

async fn alive(agent: &mut Agent, after: &str) {
    assert!(
        agent.try_wait().is_none(),
        "the agent died after {after}:\n{}",
        log_tail(agent, 60)
    );
    let (code, _) = agent.get("/healthz").await;
    assert_eq!(code.as_u16(), 200, "healthz after {after}");
}

fn start(dir: &std::path::Path) -> Agent {
    Agent::start(
        dir,
        &[
            ("CENTRAL_API_URL", "http://127.0.0.1:9"),
            ("CRONTAB", "0 0 1 1 *"),
            ("INGEST_BODY_TIMEOUT_SECS", "3"),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_paths_bodies_and_headers_are_refused_and_the_agent_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = start(dir.path());
    agent.wait_ready(Duration::from_secs(20)).await;
    let addr = agent.addr();
    let mut tried = 0usize;
    let mut problems = Vec::new();

    // Names: (raw path bytes, expected status). Hyper refuses what is not a valid request
    // target (400 before routing); the agent refuses the rest as invalid_name (400) or 404.
    let paths: Vec<(&[u8], u16)> = vec![
        (b"/v1/records/create/pat%00ient", 400),
        (b"/v1/records/cre%00ate/patient", 400),
        (b"/v1/records/create/pat\x00ient", 400),
        (b"/v1/records/create/paciente%C3%A9", 400),
        (b"/v1/records/cria%C3%A7%C3%A3o/patient", 400),
        (b"/v1/records/create/paciente\xc3\xa9", 400),
        (b"/v1/records/create/\xff\xfe", 400),
        (b"/v1/records/create/%ff%fe", 400),
        (b"/v1/records/create/%2e%2e%2f%2e%2e%2fetc", 400),
        (b"/v1/records/create/%2e", 400),
        (b"/v1/records/create/.", 400),
        (b"/v1/records/%2e%2e/%2e%2e", 400),
        (b"/v1/records/create/%252e%252e", 400),
        (b"/v1/records/create/..%5c..%5cwindows", 400),
        (b"/v1/records/create/a%2Fb", 400),
        (b"/v1/records/create%2F..%2F_state/patient", 400),
        (b"/v1/records/create/a/b", 404),
        (b"/v1/records/create/../../etc/passwd", 404),
        (b"/v1/records//patient", 400),
        (b"/v1/records/create/pa%20tient%0d%0aX-Injected:%201", 400),
    ];
    for (path, expected) in &paths {
        tried += 1;
        let shown = String::from_utf8_lossy(path).into_owned();
        match raw(addr, &post_bytes(path, JSON, GOOD), Duration::from_secs(10)).await {
            Some((code, body)) if code == *expected => {
                // Answers the agent itself gives are JSON {error, message}.
                if let Ok(value) = serde_json::from_slice::<Value>(&body)
                    && (value["error"].as_str().is_none() || value["message"].as_str().is_none())
                {
                    problems.push(format!("{shown:?}: not a JSON error: {value}"));
                }
            }
            Some((code, body)) => problems.push(format!(
                "{shown:?}: answered {code}, expected {expected}: {}",
                String::from_utf8_lossy(&body)
            )),
            None => problems.push(format!("{shown:?}: no answer")),
        }
    }

    // Invalid UTF-8 and control characters in headers: 400, never staged.
    let headers: Vec<(&[u8], u16)> = vec![
        (b"X-Record-Key: \xff\xfe\r\n", 400),
        (b"Idempotency-Key: caf\xc3\xa9\r\n", 400),
        (b"Idempotency-Key: \x01\x02\r\n", 400),
        (b"Content-Type: application/json\xff\r\n", 415),
    ];
    for (header, expected) in &headers {
        tried += 1;
        let mut request = b"POST /v1/records/create/patient HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\n".to_vec();
        if header.starts_with(b"Content-Type") {
            request =
                b"POST /v1/records/create/patient HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                    .to_vec();
        }
        request.extend_from_slice(header);
        request.extend_from_slice(format!("Content-Length: {}\r\n\r\n", GOOD.len()).as_bytes());
        request.extend_from_slice(GOOD);
        let shown = String::from_utf8_lossy(header).trim().to_owned();
        match raw(addr, &request, Duration::from_secs(10)).await {
            Some((code, _)) if code == *expected => {}
            other => problems.push(format!(
                "header {shown:?}: expected {expected}, got {:?}",
                other.map(|(c, b)| (c, String::from_utf8_lossy(&b).into_owned()))
            )),
        }
    }

    // Wrong content types bad_input does not try.
    for content_type in [
        "text/json",
        "application/xml",
        "multipart/form-data; boundary=x",
        "application/jsonx",
        "application/x-ndjson",
        "application/octet-stream",
        "*/*",
        "",
    ] {
        tried += 1;
        let header = format!("Content-Type: {content_type}\r\n");
        match raw(
            addr,
            &post_bytes(b"/v1/records/create/patient", &header, GOOD),
            Duration::from_secs(10),
        )
        .await
        {
            Some((415, _)) => {}
            other => problems.push(format!(
                "Content-Type {content_type:?}: expected 415, got {:?}",
                other.map(|(c, b)| (c, String::from_utf8_lossy(&b).into_owned()))
            )),
        }
    }

    // Invalid UTF-8 in the body, in a string and in a key; a lone surrogate escape.
    for body in [
        &b"{\"id\": 1, \"name\": \"\xc3\x28\"}"[..],
        &b"{\"\xed\xa0\x80\": 1}"[..],
        &b"\xef\xbb\xbf\xff{\"id\": 1}"[..],
    ] {
        tried += 1;
        match raw(
            addr,
            &post_bytes(b"/v1/records/create/patient", JSON, body),
            Duration::from_secs(10),
        )
        .await
        {
            Some((400, _)) => {}
            other => problems.push(format!(
                "body {:?}: expected 400, got {:?}",
                String::from_utf8_lossy(body),
                other.map(|(c, b)| (c, String::from_utf8_lossy(&b).into_owned()))
            )),
        }
    }

    // JSON nested 100,000 deep, as arrays and as objects: 400, no stack overflow.
    let deep_arrays = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let deep_objects = format!("{}1{}", r#"{"a":"#.repeat(100_000), "}".repeat(100_000));
    let deep_in_record = format!(
        r#"{{"id": 1, "x": {}{}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    for (what, body) in [
        ("arrays", deep_arrays),
        ("objects", deep_objects),
        ("inside a record", deep_in_record),
    ] {
        tried += 1;
        match raw(
            addr,
            &post_bytes(b"/v1/records/create/patient", JSON, body.as_bytes()),
            Duration::from_secs(20),
        )
        .await
        {
            Some((400, b)) => {
                let value: Value = serde_json::from_slice(&b).unwrap_or_default();
                if value["error"] != "invalid_json" && value["error"] != "invalid_body" {
                    problems.push(format!("nested {what}: 400 but {value}"));
                }
            }
            other => problems.push(format!(
                "JSON nested 100,000 deep ({what}): expected 400, got {:?}",
                other.map(|(c, b)| (c, String::from_utf8_lossy(&b).into_owned()))
            )),
        }
        alive(&mut agent, "deeply nested JSON").await;
    }

    assert!(
        problems.is_empty(),
        "{} hostile request(s) were not answered as expected:\n  {}\nagent log tail:\n{}",
        problems.len(),
        problems.join("\n  "),
        log_tail(&agent, 40)
    );
    alive(&mut agent, "the hostile requests").await;
    let st = status(&agent).await;
    assert_eq!(st["ingest"]["records_staged"], 0, "{st}");
    assert_eq!(
        record_files(&dir.path().join("staging")),
        Vec::<PathBuf>::new()
    );
    let server_errors: u64 = st["ingest"]["requests"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(code, _)| code.starts_with('5'))
        .map(|(_, n)| n.as_u64().unwrap())
        .sum();
    assert_eq!(server_errors, 0, "{st}");
    // Control: a good request is still staged, so the refusals above were not vacuous.
    let (code, body) = agent.post("create", "patient", &json!({"id": 1})).await;
    assert_eq!(code.as_u16(), 202, "{body}");
    eprintln!("hostile: {tried} hostile requests refused, 0 answers 5xx, agent alive");
}

/// Streams `total` bytes of body after `head` (without reading), stopping at the first write
/// error, while reading the answer; returns the answer and how many body bytes were written.
async fn huge_body(
    addr: SocketAddr,
    head: String,
    total: usize,
    chunked: bool,
) -> (Option<u16>, usize, Duration) {
    let started = Instant::now();
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let written = counter.clone();
    let writing = tokio::spawn(async move {
        let _ = writer.write_all(head.as_bytes()).await;
        let chunk = vec![b' '; 64 * 1024];
        let mut sent = 0usize;
        while sent < total {
            let data = if chunked {
                let mut c = format!("{:x}\r\n", chunk.len()).into_bytes();
                c.extend_from_slice(&chunk);
                c.extend_from_slice(b"\r\n");
                c
            } else {
                chunk.clone()
            };
            if writer.write_all(&data).await.is_err() {
                break;
            }
            sent += chunk.len();
            written.store(sent, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(60), async {
        let mut buf = [0u8; 4096];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let took = started.elapsed();
    writing.abort();
    let _ = writing.await;
    let sent = counter.load(std::sync::atomic::Ordering::Relaxed);
    let code = String::from_utf8_lossy(&answer)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok());
    (code, sent, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_body_gets_413_and_memory_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = start(dir.path());
    agent.wait_ready(Duration::from_secs(20)).await;
    let addr = agent.addr();
    let before = rss_kib(&agent);
    const TOTAL: usize = 100 << 20;
    let announced = format!(
        "POST /v1/records/create/patient HTTP/1.1\r\nHost: localhost\r\n{JSON}Content-Length: {TOTAL}\r\n\r\n"
    );
    let (code, sent, took) = huge_body(addr, announced, TOTAL, false).await;
    assert_eq!(
        code,
        Some(413),
        "announced 100 MB body (sent {sent} bytes, {took:?})"
    );
    let chunked = format!(
        "POST /v1/records/create/patient HTTP/1.1\r\nHost: localhost\r\n{JSON}Transfer-Encoding: chunked\r\n\r\n"
    );
    let (code, sent_chunked, took_chunked) = huge_body(addr, chunked, TOTAL, true).await;
    assert_eq!(
        code,
        Some(413),
        "chunked 100 MB body (sent {sent_chunked} bytes, {took_chunked:?})"
    );
    alive(&mut agent, "100 MB bodies").await;
    let after = rss_kib(&agent);
    eprintln!(
        "hostile: 100 MB bodies answered 413 after {sent} / {sent_chunked} bytes sent ({took:?} / {took_chunked:?}); VmRSS {before} KiB -> {after} KiB"
    );
    // MAX_BODY_BYTES is 10 MiB: the agent may buffer up to that, never the 100 MB.
    assert!(
        after < before + 64 * 1024,
        "VmRSS grew from {before} KiB to {after} KiB: the agent buffered the 100 MB body"
    );
    let st = status(&agent).await;
    assert_eq!(st["ingest"]["records_staged"], 0, "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_simultaneous_connections_are_all_answered() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = start(dir.path());
    agent.wait_ready(Duration::from_secs(20)).await;
    let addr = agent.addr();
    const N: usize = 1_000;
    // Connect all first, then send every request at once.
    let mut streams = Vec::with_capacity(N);
    for _ in 0..N {
        streams.push(TcpStream::connect(addr).await.expect("connecting"));
    }
    let gate = Arc::new(tokio::sync::Barrier::new(N));
    let mut tasks = Vec::with_capacity(N);
    for (n, mut stream) in streams.into_iter().enumerate() {
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let body = format!(r#"{{"id": "c{n}", "n": {n}}}"#);
            let request = post_bytes(b"/v1/records/create/patient", JSON, body.as_bytes());
            gate.wait().await;
            let _ = stream.write_all(&request).await;
            read_answer(&mut stream, Duration::from_secs(120)).await
        }));
    }
    let mut codes: std::collections::BTreeMap<String, usize> = Default::default();
    for task in tasks {
        let key = match task.await.unwrap() {
            Some((code, _)) => code.to_string(),
            None => "no answer".to_owned(),
        };
        *codes.entry(key).or_default() += 1;
    }
    alive(&mut agent, "1,000 simultaneous connections").await;
    assert_eq!(
        codes.get("202").copied().unwrap_or(0),
        N,
        "every connection gets 202: {codes:?}\n{}",
        log_tail(&agent, 40)
    );
    let st = status(&agent).await;
    assert_eq!(st["ingest"]["records_staged"], N, "{st}");
    assert_eq!(st["records_pending"], N, "{st}");
    eprintln!("hostile: 1,000 simultaneous connections: {codes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_timed_out_and_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = start(dir.path());
    agent.wait_ready(Duration::from_secs(20)).await;
    let addr = agent.addr();
    // 50 clients announce a body and send only part of it, then go quiet.
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "POST /v1/records/create/patient HTTP/1.1\r\nHost: localhost\r\n{JSON}Content-Length: 1000\r\n\r\n{{\"id\": 1, "
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        slow.push(stream);
    }
    // Others are served meanwhile.
    for n in 0..20 {
        let (code, body) = agent.post("create", "patient", &json!({"id": n})).await;
        assert_eq!(code.as_u16(), 202, "{body}");
    }
    // The slow ones are answered 408 and closed (INGEST_BODY_TIMEOUT_SECS=3), not held forever.
    let started = Instant::now();
    let mut answers = std::collections::BTreeMap::<String, usize>::new();
    for stream in &mut slow {
        let key = match read_answer(stream, Duration::from_secs(20)).await {
            Some((code, _)) => code.to_string(),
            None => "no answer".into(),
        };
        *answers.entry(key).or_default() += 1;
    }
    assert_eq!(
        answers.get("408").copied(),
        Some(50),
        "every slow client is answered 408 (took {:?}): {answers:?}",
        started.elapsed()
    );
    alive(&mut agent, "slow clients").await;
    let st = status(&agent).await;
    assert_eq!(st["ingest"]["records_staged"], 20, "{st}");
    assert_eq!(st["ingest"]["requests"]["408"], 50, "{st}");
    eprintln!("hostile: 50 slow clients answered {answers:?}; 20 others served meanwhile");
}

/// Slowloris: clients that never finish their request's headers, sending one more header line
/// every 500 ms to look alive, are disconnected once INGEST_BODY_TIMEOUT_SECS (3 s here) has
/// passed since their request began, instead of holding a connection and a task for as long as
/// they like. Others are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_finish_their_headers_are_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = start(dir.path());
    agent.wait_ready(Duration::from_secs(20)).await;
    let addr = agent.addr();
    let started = Instant::now();
    let mut trickles = Vec::new();
    for _ in 0..50 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        trickles.push(tokio::spawn(async move {
            let head = "POST /v1/records/create/patient HTTP/1.1\r\nHost: localhost\r\n";
            let _ = stream.write_all(head.as_bytes()).await;
            let mut buf = [0u8; 1024];
            // Until the server closes the connection, or 30 s: then it never did.
            while started.elapsed() < Duration::from_secs(30) {
                if stream.write_all(b"X-Still-Here: yes\r\n").await.is_err() {
                    return Some(started.elapsed());
                }
                let read = tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buf));
                if let Ok(Ok(0) | Err(_)) = read.await {
                    return Some(started.elapsed());
                }
            }
            None
        }));
    }
    for n in 0..20 {
        let (code, body) = agent.post("create", "patient", &json!({"id": n})).await;
        assert_eq!(code.as_u16(), 202, "{body}");
    }
    let mut closed_after = Vec::new();
    for trickle in trickles {
        let closed = trickle.await.unwrap();
        closed_after
            .push(closed.expect("the server never closed a connection whose headers never ended"));
    }
    let slowest = closed_after.iter().max().unwrap();
    assert!(
        *slowest < Duration::from_secs(15),
        "every trickling client is disconnected soon after 3 s; the slowest after {slowest:?}"
    );
    alive(&mut agent, "clients that never finish their headers").await;
    let st = status(&agent).await;
    assert_eq!(st["ingest"]["records_staged"], 20, "{st}");
    eprintln!("hostile: 50 trickling clients disconnected within {slowest:?}; 20 others served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_5xx_and_no_answer_outside_the_openapi_document() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let install = Command::new(root.join("scripts/install-schemathesis"))
        .current_dir(&root)
        .output()
        .expect("running scripts/install-schemathesis");
    assert!(
        install.status.success(),
        "scripts/install-schemathesis failed (needs python3-venv and PyPI access): {}",
        String::from_utf8_lossy(&install.stderr)
    );
    let st_bin = String::from_utf8_lossy(&install.stdout).trim().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let mut agent = start(dir.path());
    agent.wait_ready(Duration::from_secs(20)).await;
    let mut cmd = tokio::process::Command::new(&st_bin);
    cmd.args([
        "run",
        &agent.url("/v1/openapi.json"),
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance",
        "--max-examples",
        "50",
        "--seed",
        "5",
        "--no-color",
        "--request-timeout",
        "20",
    ])
    .env("SCHEMATHESIS_HOOKS", "")
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(600), cmd.output())
        .await
        .expect("schemathesis ran longer than 10 minutes")
        .expect("running schemathesis");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    alive(&mut agent, "schemathesis").await;
    assert!(
        out.status.success(),
        "schemathesis found problems ({}):\n{text}\nagent log tail:\n{}",
        out.status,
        log_tail(&agent, 40)
    );
    let st = status(&agent).await;
    eprintln!(
        "hostile: schemathesis passed; ingest answers {}\n{}",
        st["ingest"]["requests"],
        text.lines().rev().take(15).collect::<Vec<_>>().join("\n")
    );
}
