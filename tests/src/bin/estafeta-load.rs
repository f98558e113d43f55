//! `estafeta-load`: a small HTTP/1.1 load client for the ingest API.
//!
//! `--connections N` tasks each send requests back to back over their own keep-alive
//! connection until `--duration` seconds pass or `--requests` requests were sent in all; each
//! request carries one JSON object (`--batch 1`) or an array of `--batch K` objects, each
//! object padded to about `--payload-bytes` with a distinct `id`. At the end it prints one
//! JSON line: connections, batch, requests, records (acknowledged), errors (anything but 202),
//! seconds, records_per_sec and p50 / p99 / max time to acknowledge one request, in ms.
//!
//! It speaks HTTP/1.1 over a plain `TcpStream` itself rather than through reqwest: on a
//! 2-core machine the client shares the CPU with the server it measures, so it should cost as
//! little as possible per request. Only `http://` URLs.
//!
//! For the reliability tests and `scripts/soak` it is also the *separate load process* of
//! the crash loop under load: `--ack-log FILE` appends one JSON line per acknowledged record
//! (`{"id","seq","key","n","payload"}`, the id and seq from the agent's 202 answer) and one
//! `{"unanswered":true,"key","n"}` line per record whose request got no answer (the agent died
//! under it: it may or may not have been staged, and nobody was told it was). Each request's
//! lines go out in one `write` on a file opened for appending, so a line is in the file the
//! moment its answer was read, whatever happens to the agent afterwards. `--keys K` gives each
//! connection K keys (the `id` field `<prefix>-<conn>-k<i>`, records cycling over them), so
//! per-key order is the order one client posted them. A connection that is refused (the
//! agent is restarting) is retried with the same records every 20 ms until the run ends, so a
//! crash loop does not burn through the request budget.
//!
//! `--retry` makes the clients behave like real ones, which retry until answered: every request
//! carries `Idempotency-Key: <prefix>-<conn>-r<request number>` (unique per request of the
//! run), and a request that got no answer (an I/O error, the connection reset, `--timeout`) or
//! a 5xx status (the agent answers 503/507 when it cannot stage) is sent again, the same bytes
//! with the same key, on a fresh connection after a pause of 20–50 ms, until some other answer
//! comes. The agent promises that a repeated key gets the first answer (`202` with
//! `Idempotent-Replayed: true` and the same ids and seqs) and stages nothing twice, even after a
//! crash. A 202, new or replayed, logs its records with the ids and seqs of that answer (a
//! replayed one adds `"replayed":true` to its lines; it must name as many records as were
//! sent, and a replay of a key never sent before counts as error `replay_of_unsent`). Once
//! `--duration` is over, a request still being retried keeps going for at most `--retry-for`
//! seconds (without `--duration`: `--retry-for` seconds after its first send) and only then is
//! given up: logged as unanswered and counted as `gave_up`. The summary line then also counts
//! `retries` (sends beyond the first), `retry_kinds` (why), `replayed` (202s with
//! `Idempotent-Replayed: true`) and `gave_up` (requests); `errors` counts only the final answer
//! of each request, so with `--retry` an `unanswered` line means given up, nothing else.
//! Without `--retry`, nothing carries a key and nothing that reached the agent is sent twice.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::Parser;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Load client for the Estafeta ingest API (HTTP/1.1, keep-alive, one connection per task).
#[derive(Debug, Parser)]
#[command(name = "estafeta-load")]
struct Args {
    /// Endpoint to POST to, e.g. http://127.0.0.1:8787/v1/records/create/patient
    #[arg(long)]
    url: String,
    /// Concurrent connections, each sending requests back to back.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Stop after this many seconds (default 10 unless --requests is given).
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Stop after this many requests in all.
    #[arg(long, value_name = "N")]
    requests: Option<u64>,
    /// Records per request: 1 sends a JSON object, K>1 a JSON array of K objects.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Approximate size of each JSON object, in bytes.
    #[arg(long, default_value_t = 1024)]
    payload_bytes: usize,
    /// Bearer token (Authorization header).
    #[arg(long, env = "INGEST_TOKEN")]
    token: Option<String>,
    /// Give up on one request after this many seconds (counted as an error).
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    timeout: f64,
    /// Runtime worker threads (1: a single-threaded runtime, lightest beside the server).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Prefix of the records' `id` fields (default: derived from the clock, so that runs differ).
    #[arg(long)]
    id_prefix: Option<String>,
    /// Steady load: at most this many requests per second in all, spread evenly over the
    /// connections (default: as fast as the server answers).
    #[arg(long, value_name = "PER_SEC")]
    rate: Option<f64>,
    /// Append one JSON line per acknowledged record (and per unanswered one) to this file.
    #[arg(long, value_name = "FILE")]
    ack_log: Option<std::path::PathBuf>,
    /// Keys per connection: record `id`s cycle over `<prefix>-<conn>-k0..k(K-1)` (default:
    /// every record its own key).
    #[arg(long, value_name = "K")]
    keys: Option<u64>,
    /// Retry like a real client: each request carries `Idempotency-Key:
    /// <prefix>-<conn>-r<request number>`, and one that gets no answer (I/O error, reset,
    /// timeout) or a 5xx is sent again, same bytes and key, on a fresh connection after 20–50 ms,
    /// until it gets another answer.
    #[arg(long)]
    retry: bool,
    /// With --retry: how long after --duration ends a request still being retried keeps going
    /// before it is given up (logged as unanswered); without --duration, how long after its
    /// first send.
    #[arg(long, default_value_t = 60.0, value_name = "SECS")]
    retry_for: f64,
}

/// Where to connect and what to send in the request line.
#[derive(Debug, Clone)]
struct Target {
    addr: String,
    host_header: String,
    path: String,
}

fn parse_url(url: &str) -> anyhow::Result<Target> {
    let Some(rest) = url.strip_prefix("http://") else {
        bail!("only http:// URLs are supported, got {url:?}");
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        bail!("no host in {url:?}");
    }
    let addr = if authority
        .rsplit(':')
        .next()
        .is_some_and(|p| p.parse::<u16>().is_ok())
        && !authority.ends_with(']')
    {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok(Target {
        addr,
        host_header: authority.to_string(),
        path: path.to_string(),
    })
}

/// What one task measured.
#[derive(Default)]
struct TaskResult {
    requests: u64,
    ok: u64,
    /// Time to acknowledge each 202, in microseconds.
    latencies_us: Vec<u32>,
    /// Error kind (an HTTP status or "io"/"timeout") → count.
    errors: BTreeMap<String, u64>,
    first_error: Option<String>,
    /// Connection attempts refused (the agent was down); the records were sent again.
    refused: u64,
    /// With --retry: sends beyond the first of a request, and why (an HTTP status, "io",
    /// "timeout").
    retries: u64,
    retry_kinds: BTreeMap<String, u64>,
    /// 202s that carried `Idempotent-Replayed: true`.
    replayed: u64,
    /// Requests given up on after --retry-for (logged as unanswered).
    gave_up: u64,
}

impl TaskResult {
    fn error(&mut self, kind: String, detail: String) {
        *self.errors.entry(kind).or_default() += 1;
        if self.first_error.is_none() {
            self.first_error = Some(detail);
        }
    }
}

/// Shared limits: the deadline and/or the request budget.
struct Limits {
    deadline: Option<Instant>,
    budget: Option<u64>,
    issued: AtomicU64,
}

impl Limits {
    /// Takes the next request slot, or `false` when the run is over.
    fn take(&self) -> bool {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return false;
        }
        match self.budget {
            Some(n) => self.issued.fetch_add(1, Ordering::Relaxed) < n,
            None => true,
        }
    }
}

/// Builds the request bodies of one task: a distinct `id` per record, padded to size.
struct BodyMaker {
    prefix: String,
    batch: usize,
    payload_bytes: usize,
    pad: Arc<str>,
    next: u64,
    /// `Some(K)`: keys cycle over K per connection (`--keys`).
    keys: Option<u64>,
    /// The records of the last body: key, n and the byte range of the object in the body.
    records: Vec<(String, u64, std::ops::Range<usize>)>,
}

impl BodyMaker {
    fn write_record(&mut self, out: &mut Vec<u8>) {
        let n = self.next;
        self.next += 1;
        let key = match self.keys {
            Some(k) => format!("{}-k{}", self.prefix, n % k.max(1)),
            None => format!("{}-{n}", self.prefix),
        };
        let start = out.len();
        let head = format!("{{\"id\":\"{key}\",\"n\":{n},\"kind\":\"bench\",\"pad\":\"");
        let tail = "\"}";
        let pad_len = self
            .payload_bytes
            .saturating_sub(head.len() + tail.len())
            .min(self.pad.len());
        out.extend_from_slice(head.as_bytes());
        out.extend_from_slice(&self.pad.as_bytes()[..pad_len]);
        out.extend_from_slice(tail.as_bytes());
        self.records.push((key, n, start..out.len()));
    }

    fn body(&mut self, out: &mut Vec<u8>) {
        out.clear();
        self.records.clear();
        if self.batch <= 1 {
            self.write_record(out);
        } else {
            out.push(b'[');
            for i in 0..self.batch {
                if i > 0 {
                    out.push(b',');
                }
                self.write_record(out);
            }
            out.push(b']');
        }
    }
}

/// A parsed response head and where its body starts in the buffer.
struct Head {
    status: u16,
    header_len: usize,
    content_length: Option<usize>,
    chunked: bool,
    close: bool,
    /// `Idempotent-Replayed: true`: the agent answered a repeated `Idempotency-Key` with the
    /// first answer.
    replayed: bool,
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn parse_head(buf: &[u8]) -> anyhow::Result<Option<Head>> {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        if buf.len() > 64 * 1024 {
            bail!("response head longer than 64 KiB");
        }
        return Ok(None);
    };
    let text = std::str::from_utf8(&buf[..end]).context("response head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split(' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        bail!("not an HTTP/1.x response: {status_line:?}");
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut head = Head {
        status,
        header_len: end + 4,
        content_length: None,
        chunked: false,
        close: version == "HTTP/1.0",
        replayed: false,
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            head.content_length = Some(value.parse().context("bad Content-Length")?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("idempotent-replayed") {
            head.replayed = value.eq_ignore_ascii_case("true");
        } else if name.eq_ignore_ascii_case("connection") {
            let v = value.to_ascii_lowercase();
            if v.contains("close") {
                head.close = true;
            } else if v.contains("keep-alive") {
                head.close = false;
            }
        }
    }
    Ok(Some(head))
}

/// Reads more bytes into `buf`; an early EOF is an error.
async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<()> {
    let start = buf.len();
    buf.resize(start + 16 * 1024, 0);
    let n = stream.read(&mut buf[start..]).await;
    match n {
        Ok(0) => {
            buf.truncate(start);
            bail!("connection closed by the server")
        }
        Ok(n) => {
            buf.truncate(start + n);
            Ok(())
        }
        Err(err) => {
            buf.truncate(start);
            Err(err.into())
        }
    }
}

/// One whole response.
struct Answer {
    status: u16,
    body: Vec<u8>,
    /// The server closes the connection after it.
    close: bool,
    /// It carried `Idempotent-Replayed: true`.
    replayed: bool,
}

/// Reads one whole response. Consumes it from `buf`.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<Answer> {
    let head = loop {
        if let Some(head) = parse_head(buf)? {
            break head;
        }
        fill(stream, buf).await?;
    };
    let body_start = head.header_len;
    let (body, consumed) = if head.chunked {
        // Decode chunks until the zero-size one and the trailer's blank line.
        let mut body = Vec::new();
        let mut pos = body_start;
        loop {
            let line_end = loop {
                if let Some(i) = find(&buf[pos..], b"\r\n") {
                    break pos + i;
                }
                fill(stream, buf).await?;
            };
            let size_text = std::str::from_utf8(&buf[pos..line_end])?;
            let size_text = size_text.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_text, 16)
                .with_context(|| format!("bad chunk size {size_text:?}"))?;
            pos = line_end + 2;
            if size == 0 {
                // Trailer lines up to an empty line.
                loop {
                    let end = loop {
                        if let Some(i) = find(&buf[pos..], b"\r\n") {
                            break pos + i;
                        }
                        fill(stream, buf).await?;
                    };
                    let empty = end == pos;
                    pos = end + 2;
                    if empty {
                        break;
                    }
                }
                break;
            }
            while buf.len() < pos + size + 2 {
                fill(stream, buf).await?;
            }
            body.extend_from_slice(&buf[pos..pos + size]);
            pos += size + 2;
        }
        (body, pos)
    } else if let Some(len) = head.content_length {
        while buf.len() < body_start + len {
            fill(stream, buf).await?;
        }
        (buf[body_start..body_start + len].to_vec(), body_start + len)
    } else if head.status == 204 || head.status == 304 || head.status < 200 {
        (Vec::new(), body_start)
    } else {
        // Body delimited by the end of the connection.
        while fill(stream, buf).await.is_ok() {}
        (buf[body_start..].to_vec(), buf.len())
    };
    buf.drain(..consumed);
    Ok(Answer {
        status: head.status,
        body,
        close: head.close,
        replayed: head.replayed,
    })
}

/// The start of a body, for error messages.
fn snippet(body: &[u8]) -> String {
    String::from_utf8_lossy(body).chars().take(200).collect()
}

/// The `--ack-log` lines of one answered request: one per record the 202 acknowledged, with
/// the id and seq the agent gave it (`id`/`seq` for one object, `ids`/`seqs` for an array),
/// and `"replayed":true` when the 202 was a replay of the first answer to its
/// `Idempotency-Key`. The answer must name as many records as the request sent.
fn ack_lines(
    answer: &[u8],
    body: &[u8],
    maker: &BodyMaker,
    replayed: bool,
) -> anyhow::Result<Vec<u8>> {
    let answer: serde_json::Value =
        serde_json::from_slice(answer).context("a 202 answer that is not JSON")?;
    let pairs: Vec<(String, u64)> = if maker.batch <= 1 {
        vec![(
            answer["id"]
                .as_str()
                .context("no id in the 202")?
                .to_owned(),
            answer["seq"].as_u64().context("no seq in the 202")?,
        )]
    } else {
        let ids = answer["ids"].as_array().context("no ids in the 202")?;
        let seqs = answer["seqs"].as_array().context("no seqs in the 202")?;
        ids.iter()
            .zip(seqs)
            .map(|(id, seq)| Some((id.as_str()?.to_owned(), seq.as_u64()?)))
            .collect::<Option<_>>()
            .context("ids and seqs of the 202")?
    };
    if pairs.len() != maker.records.len() {
        bail!(
            "the {}202 acknowledged {} records, {} were sent",
            if replayed { "replayed " } else { "" },
            pairs.len(),
            maker.records.len()
        );
    }
    let replayed = if replayed { "\"replayed\":true," } else { "" };
    let mut out = Vec::new();
    for ((id, seq), (key, n, range)) in pairs.iter().zip(&maker.records) {
        out.extend_from_slice(
            format!(
                "{{\"id\":\"{id}\",\"seq\":{seq},\"key\":\"{key}\",\"n\":{n},{replayed}\"payload\":"
            )
            .as_bytes(),
        );
        out.extend_from_slice(&body[range.clone()]);
        out.extend_from_slice(b"}\n");
    }
    Ok(out)
}

/// The `--ack-log` lines of a request that got no answer.
fn unanswered_lines(maker: &BodyMaker) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, n, _) in &maker.records {
        out.extend_from_slice(
            format!("{{\"unanswered\":true,\"key\":\"{key}\",\"n\":{n}}}\n").as_bytes(),
        );
    }
    out
}

/// Appends lines to the `--ack-log` file in one `write` (the file is opened for appending, so
/// concurrent tasks never interleave within a request's lines).
fn append(log: Option<&std::sync::Mutex<std::fs::File>>, lines: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    if let Some(log) = log
        && !lines.is_empty()
    {
        let mut file = log.lock().unwrap_or_else(|e| e.into_inner());
        file.write_all(lines).context("writing the ack log")?;
    }
    Ok(())
}

/// Why a send of a request is to be repeated (with --retry).
enum Retry {
    /// No answer: an I/O error (the connection reset, closed) or none within --timeout.
    NoAnswer(&'static str, String),
    /// A 5xx answer: the agent could not stage the records.
    Status(u16, Vec<u8>),
}

/// One connection's loop.
async fn run_task(
    index: usize,
    target: Arc<Target>,
    args: Arc<Args>,
    limits: Arc<Limits>,
    pad: Arc<str>,
    prefix: String,
    log: Option<Arc<std::sync::Mutex<std::fs::File>>>,
) -> anyhow::Result<TaskResult> {
    let mut result = TaskResult::default();
    let timeout = Duration::from_secs_f64(args.timeout);
    let retry_for = Duration::from_secs_f64(args.retry_for.max(0.0));
    let mut maker = BodyMaker {
        prefix: format!("{prefix}-{index}"),
        batch: args.batch,
        payload_bytes: args.payload_bytes,
        pad,
        next: 0,
        keys: args.keys,
        records: Vec::new(),
    };
    let auth = args
        .token
        .as_deref()
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    // The pauses between retries, 20–50 ms, drawn per task (xorshift) so that clients spread.
    let mut jitter: u64 = 0x2545_F491_4F6C_DD1D ^ (index as u64 + 1).wrapping_mul(0x9E37_79B9);
    let mut body = Vec::new();
    let mut request = Vec::new();
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut conn: Option<TcpStream> = None;
    // With --rate, this task sends one request per `pace`, on a fixed schedule (a late answer
    // is caught up, not skipped, so the total stays what was asked).
    let pace = args
        .rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(args.connections as f64 / r));
    let mut next_at = tokio::time::Instant::now();
    while limits.take() {
        if let Some(pace) = pace {
            tokio::time::sleep_until(next_at).await;
            next_at += pace;
        }
        maker.body(&mut body);
        let idempotency = if args.retry {
            format!("Idempotency-Key: {}-r{}\r\n", maker.prefix, result.requests)
        } else {
            String::new()
        };
        request.clear();
        request.extend_from_slice(
            format!(
                "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{auth}{idempotency}\r\n",
                target.path,
                target.host_header,
                body.len()
            )
            .as_bytes(),
        );
        request.extend_from_slice(&body);
        result.requests += 1;
        // Sends of this request that reached a connection, and when a retried one is given up.
        let mut sends = 0u32;
        let mut give_up_at: Option<Instant> = None;
        loop {
            // A refused connection never carried the request: wait for the agent to come back
            // and send the same records (until the run's deadline, or while the request is
            // being retried, until it is given up).
            if conn.is_none() {
                loop {
                    match TcpStream::connect(&target.addr).await {
                        Ok(stream) => {
                            stream.set_nodelay(true)?;
                            buf.clear();
                            conn = Some(stream);
                            break;
                        }
                        Err(err) => {
                            result.refused += 1;
                            match give_up_at {
                                Some(at) if Instant::now() >= at => {
                                    result.gave_up += 1;
                                    result.error(
                                        "gave_up".into(),
                                        format!(
                                            "gave up after {sends} sends; connecting to {}: {err}",
                                            target.addr
                                        ),
                                    );
                                    append(log.as_deref(), &unanswered_lines(&maker))?;
                                    return Ok(result);
                                }
                                Some(_) => {}
                                None if limits.deadline.is_some_and(|d| Instant::now() >= d) => {
                                    result.error(
                                        "connect".into(),
                                        format!("connecting to {}: {err}", target.addr),
                                    );
                                    return Ok(result);
                                }
                                None => {}
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            }
            sends += 1;
            let started = Instant::now();
            if args.retry && give_up_at.is_none() {
                give_up_at = Some(limits.deadline.unwrap_or(started) + retry_for);
            }
            let attempt = tokio::time::timeout(timeout, async {
                let stream = conn.as_mut().expect("connected above");
                if let Err(err) = stream.write_all(&request).await {
                    // The server may have answered (413, say) and closed before reading it
                    // all: report its answer rather than the broken pipe when there is one.
                    return match read_response(stream, &mut buf).await {
                        Ok(answer) => Ok(Answer {
                            close: true,
                            ..answer
                        }),
                        Err(_) => Err(anyhow::Error::from(err).context("sending the request")),
                    };
                }
                read_response(stream, &mut buf).await
            })
            .await;
            let retry = match attempt {
                Ok(Ok(answer)) => {
                    if answer.close {
                        conn = None;
                    }
                    if answer.status == 202 {
                        result.ok += 1;
                        let us = started.elapsed().as_micros().min(u32::MAX as u128) as u32;
                        result.latencies_us.push(us);
                        if answer.replayed {
                            result.replayed += 1;
                            if sends == 1 {
                                // The key is unique to this request: nothing was sent before.
                                result.error(
                                    "replay_of_unsent".into(),
                                    format!(
                                        "the first send of {} was answered as a replay: {}",
                                        idempotency.trim(),
                                        snippet(&answer.body)
                                    ),
                                );
                            }
                        }
                        if log.is_some() {
                            let lines = ack_lines(&answer.body, &body, &maker, answer.replayed)?;
                            append(log.as_deref(), &lines)?;
                        }
                        break;
                    }
                    if args.retry && answer.status >= 500 {
                        Retry::Status(answer.status, answer.body)
                    } else {
                        result.error(
                            answer.status.to_string(),
                            format!("HTTP {}: {}", answer.status, snippet(&answer.body)),
                        );
                        break;
                    }
                }
                Ok(Err(err)) => {
                    conn = None;
                    if args.retry {
                        Retry::NoAnswer("io", format!("{err:#}"))
                    } else {
                        result.error("io".into(), format!("{err:#}"));
                        append(log.as_deref(), &unanswered_lines(&maker))?;
                        // Don't spin against a server that is down.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        break;
                    }
                }
                Err(_) => {
                    conn = None;
                    let detail = format!("no answer within {}s", args.timeout);
                    if args.retry {
                        Retry::NoAnswer("timeout", detail)
                    } else {
                        result.error("timeout".into(), detail);
                        append(log.as_deref(), &unanswered_lines(&maker))?;
                        break;
                    }
                }
            };
            let (kind, detail) = match retry {
                Retry::NoAnswer(kind, detail) => (kind.to_string(), detail),
                Retry::Status(status, answer) => (
                    status.to_string(),
                    format!("HTTP {status}: {}", snippet(&answer)),
                ),
            };
            if give_up_at.is_some_and(|at| Instant::now() >= at) {
                result.gave_up += 1;
                result.error(
                    "gave_up".into(),
                    format!("gave up after {sends} sends; the last: {detail}"),
                );
                append(log.as_deref(), &unanswered_lines(&maker))?;
                break;
            }
            result.retries += 1;
            *result.retry_kinds.entry(kind).or_default() += 1;
            // The same bytes again on a fresh connection, after a short pause.
            conn = None;
            jitter ^= jitter << 13;
            jitter ^= jitter >> 7;
            jitter ^= jitter << 17;
            tokio::time::sleep(Duration::from_millis(20 + jitter % 31)).await;
        }
    }
    Ok(result)
}

fn percentile_ms(sorted_us: &[u32], p: f64) -> Option<f64> {
    if sorted_us.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted_us.len() as f64).ceil() as usize;
    let i = rank.clamp(1, sorted_us.len()) - 1;
    Some(round3(sorted_us[i] as f64 / 1000.0))
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if args.threads == 0 {
        bail!("--threads must be at least 1");
    }
    let runtime = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let target = Arc::new(parse_url(&args.url)?);
    let duration = match (args.duration, args.requests) {
        (Some(d), _) => Some(d),
        (None, Some(_)) => None,
        (None, None) => Some(10.0),
    };
    if duration.is_some_and(|d| !(d > 0.0 && d.is_finite())) {
        bail!("--duration must be a positive number of seconds");
    }
    let prefix = args.id_prefix.clone().unwrap_or_else(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        format!("L{:x}", nanos % (1 << 48))
    });
    // A fixed pseudo-random alphanumeric pad (xorshift), so payloads are not trivially repetitive.
    let pad: Arc<str> = {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let alphabet = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
        let s: String = (0..args.payload_bytes)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                alphabet[(x % alphabet.len() as u64) as usize] as char
            })
            .collect();
        s.into()
    };
    let started = Instant::now();
    let limits = Arc::new(Limits {
        deadline: duration.map(|d| started + Duration::from_secs_f64(d)),
        budget: args.requests,
        issued: AtomicU64::new(0),
    });
    let log = match &args.ack_log {
        Some(path) => Some(Arc::new(std::sync::Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening the ack log {}", path.display()))?,
        ))),
        None => None,
    };
    let args = Arc::new(args);
    let mut handles = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        handles.push(tokio::spawn(run_task(
            i,
            target.clone(),
            args.clone(),
            limits.clone(),
            pad.clone(),
            prefix.clone(),
            log.clone(),
        )));
    }
    let mut requests = 0u64;
    let mut ok = 0u64;
    let mut latencies: Vec<u32> = Vec::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut first_error: Option<String> = None;
    let mut refused = 0u64;
    let mut retries = 0u64;
    let mut retry_kinds: BTreeMap<String, u64> = BTreeMap::new();
    let mut replayed = 0u64;
    let mut gave_up = 0u64;
    for handle in handles {
        let r = handle.await.context("a load task panicked")??;
        requests += r.requests;
        refused += r.refused;
        retries += r.retries;
        replayed += r.replayed;
        gave_up += r.gave_up;
        for (k, v) in r.retry_kinds {
            *retry_kinds.entry(k).or_default() += v;
        }
        ok += r.ok;
        latencies.extend_from_slice(&r.latencies_us);
        for (k, v) in r.errors {
            *errors.entry(k).or_default() += v;
        }
        if first_error.is_none() {
            first_error = r.first_error;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let records = ok * args.batch as u64;
    let error_count: u64 = errors.values().sum();
    if let Some(e) = &first_error {
        eprintln!("estafeta-load: {error_count} errors; the first: {e}");
    }
    let mut line = json!({
        "connections": args.connections,
        "batch": args.batch,
        "requests": requests,
        "records": records,
        "errors": error_count,
        "seconds": round3(seconds),
        "records_per_sec": if seconds > 0.0 { (records as f64 / seconds).round() } else { 0.0 },
        "p50_ms": percentile_ms(&latencies, 50.0),
        "p99_ms": percentile_ms(&latencies, 99.0),
        "max_ms": latencies.last().map(|&us| round3(us as f64 / 1000.0)),
        "error_kinds": errors,
        "refused_connects": refused,
    });
    if args.retry {
        line["retries"] = json!(retries);
        line["retry_kinds"] = json!(retry_kinds);
        line["replayed"] = json!(replayed);
        line["gave_up"] = json!(gave_up);
    }
    println!("{line}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = parse_url("http://127.0.0.1:8787/v1/records/create/x").unwrap();
        assert_eq!(t.addr, "127.0.0.1:8787");
        assert_eq!(t.path, "/v1/records/create/x");
        let t = parse_url("http://localhost").unwrap();
        assert_eq!(t.addr, "localhost:80");
        assert_eq!(t.path, "/");
        assert!(parse_url("https://x/").is_err());
    }

    #[test]
    fn bodies_are_valid_json_of_the_asked_size() {
        let mut m = BodyMaker {
            prefix: "p".into(),
            batch: 3,
            payload_bytes: 1024,
            pad: "a".repeat(1024).into(),
            next: 0,
            keys: None,
            records: Vec::new(),
        };
        let mut out = Vec::new();
        m.body(&mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let arr = v.as_array().unwrap();
        assert_eq!(arr.len(), 3);
        assert_eq!(arr[2]["id"], "p-2");
        for r in arr {
            assert_eq!(serde_json::to_string(r).unwrap().len(), 1024);
        }
    }

    #[test]
    fn ack_lines_name_each_acknowledged_record_with_its_payload() {
        let mut m = BodyMaker {
            prefix: "L-3".into(),
            batch: 2,
            payload_bytes: 60,
            pad: "x".repeat(100).into(),
            next: 4,
            keys: Some(3),
            records: Vec::new(),
        };
        let mut body = Vec::new();
        m.body(&mut body);
        let answer = br#"{"ids":["a","b"],"seqs":[7,9]}"#;
        let lines = ack_lines(answer, &body, &m, false).unwrap();
        let lines: Vec<serde_json::Value> = String::from_utf8(lines)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let sent: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["id"], "a");
        assert_eq!(lines[0]["seq"], 7);
        assert_eq!(lines[0]["key"], "L-3-k1");
        assert_eq!(lines[0]["n"], 4);
        assert_eq!(lines[0]["payload"], sent[0]);
        assert_eq!(lines[1]["key"], "L-3-k2");
        assert_eq!(lines[1]["payload"], sent[1]);
        assert!(lines.iter().all(|l| l.get("replayed").is_none()));
        assert!(ack_lines(br#"{"ids":["a"],"seqs":[7]}"#, &body, &m, false).is_err());
        // A replayed answer must name as many records, and its lines say it was a replay.
        assert!(ack_lines(br#"{"ids":["a"],"seqs":[7]}"#, &body, &m, true).is_err());
        let replayed = String::from_utf8(ack_lines(answer, &body, &m, true).unwrap()).unwrap();
        let replayed: Vec<serde_json::Value> = replayed
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(replayed[1]["id"], "b");
        assert_eq!(replayed[1]["seq"], 9);
        assert_eq!(replayed[1]["replayed"], true);
        assert_eq!(replayed[1]["payload"], sent[1]);
        let unanswered = String::from_utf8(unanswered_lines(&m)).unwrap();
        assert_eq!(
            unanswered,
            "{\"unanswered\":true,\"key\":\"L-3-k1\",\"n\":4}\n{\"unanswered\":true,\"key\":\"L-3-k2\",\"n\":5}\n"
        );
    }

    #[test]
    fn heads_say_whether_the_answer_is_a_replay() {
        let head = parse_head(
            b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\nIdempotent-Replayed: true\r\n\r\n{}",
        )
        .unwrap()
        .unwrap();
        assert_eq!((head.status, head.replayed, head.close), (202, true, false));
        let head = parse_head(b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\n{}")
            .unwrap()
            .unwrap();
        assert!(!head.replayed);
    }

    #[test]
    fn percentiles() {
        let v: Vec<u32> = (1..=100).map(|x| x * 1000).collect();
        assert_eq!(percentile_ms(&v, 50.0), Some(50.0));
        assert_eq!(percentile_ms(&v, 99.0), Some(99.0));
        assert_eq!(percentile_ms(&[], 99.0), None);
    }
}
