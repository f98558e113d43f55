//! The real NATS server with JetStream on 127.0.0.1:4222, for the JetStream sink's tests: a
//! client ([`nats`]), a stream with a name and subjects no other test uses that is deleted
//! when dropped ([`TestStream`]), reading back everything a stream holds, and a loopback TCP
//! proxy in front of the server that the test can take down, bring up and freeze
//! ([`TcpProxy`]). A missing server is a failure, never a silent skip: `scripts/start-services`
//! starts it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::db::unique_name;

/// URL of the test NATS server (JetStream enabled).
pub const NATS_URL: &str = "nats://127.0.0.1:4222";
/// Its address, for a [`TcpProxy`].
pub const NATS_ADDR: &str = "127.0.0.1:4222";

/// A JetStream context on the test server.
///
/// # Panics
/// When the server cannot be reached or has no JetStream, saying to run
/// `scripts/start-services`.
pub async fn nats() -> jetstream::Context {
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(NATS_URL)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "NATS is missing: cannot connect to {NATS_URL} ({e}); run scripts/start-services"
            )
        });
    // A raw request: the client's typed account info expects fields newer servers send.
    let answer = client
        .request("$JS.API.INFO", "".into())
        .await
        .map(|m| serde_json::from_slice::<Value>(&m.payload).unwrap_or(Value::Null));
    match answer {
        Ok(info) if info.get("error").is_none() && !info.is_null() => {}
        other => panic!(
            "NATS at {NATS_URL} has no JetStream ({other:?}); start nats-server with -js (scripts/start-services)"
        ),
    }
    jetstream::new(client)
}

/// One message as the stream holds it.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub stream_seq: u64,
    pub subject: String,
    /// `Nats-Msg-Id`.
    pub msg_id: Option<String>,
    /// The body as JSON.
    pub body: Value,
}

/// A stream only this test uses: name `E2E_<unique>`, subjects under `<prefix>.>` where the
/// prefix is unique too. Deleted when dropped (also when the test panics).
pub struct TestStream {
    pub name: String,
    /// The subject prefix, `e2e_<unique>`; the agent's template goes under it.
    pub prefix: String,
    js: jetstream::Context,
}

impl TestStream {
    /// Creates the stream with subjects `<prefix>.>`, file storage and the given duplicate
    /// window (`None`: the server's default, 2 minutes).
    pub async fn create(label: &str, duplicate_window: Option<Duration>) -> TestStream {
        let js = nats().await;
        let (name, prefix) = Self::names(label);
        let mut config = stream::Config {
            name: name.clone(),
            subjects: vec![format!("{prefix}.>")],
            storage: stream::StorageType::File,
            ..Default::default()
        };
        if let Some(window) = duplicate_window {
            config.duplicate_window = window;
        }
        js.create_stream(config)
            .await
            .unwrap_or_else(|e| panic!("creating the JetStream stream {name}: {e}"));
        TestStream { name, prefix, js }
    }

    /// Names for a stream the agent creates itself (`create_stream = true`); the returned
    /// value deletes it when dropped, whether or not it was created.
    pub async fn expect(label: &str) -> TestStream {
        let js = nats().await;
        let (name, prefix) = Self::names(label);
        TestStream { name, prefix, js }
    }

    fn names(label: &str) -> (String, String) {
        let unique = unique_name(label);
        (
            format!("E2E_{}", unique.to_ascii_uppercase()),
            format!("e2e_{unique}"),
        )
    }

    /// The agent's subject template for this stream: `<prefix>.{entity}.{action}`.
    pub fn template(&self) -> String {
        format!("{}.{{entity}}.{{action}}", self.prefix)
    }

    /// The stream's state (message count, sequences).
    ///
    /// # Panics
    /// When the stream does not exist.
    pub async fn state(&self) -> stream::State {
        let stream = self
            .js
            .get_stream(&self.name)
            .await
            .unwrap_or_else(|e| panic!("the stream {} is missing: {e}", self.name));
        stream
            .get_info()
            .await
            .unwrap_or_else(|e| panic!("reading the stream {}: {e}", self.name))
            .state
    }

    /// The stream's configuration as the server holds it.
    pub async fn config(&self) -> stream::Config {
        let stream = self
            .js
            .get_stream(&self.name)
            .await
            .unwrap_or_else(|e| panic!("the stream {} is missing: {e}", self.name));
        stream
            .get_info()
            .await
            .unwrap_or_else(|e| panic!("reading the stream {}: {e}", self.name))
            .config
    }

    /// Every message the stream holds, in stream order.
    pub async fn messages(&self) -> Vec<StoredMessage> {
        let stream = self
            .js
            .get_stream(&self.name)
            .await
            .unwrap_or_else(|e| panic!("the stream {} is missing: {e}", self.name));
        let state = stream
            .get_info()
            .await
            .unwrap_or_else(|e| panic!("reading the stream {}: {e}", self.name))
            .state;
        let mut out = Vec::with_capacity(state.messages as usize);
        if state.messages == 0 {
            return out;
        }
        for seq in state.first_sequence..=state.last_sequence {
            let message = stream
                .get_raw_message(seq)
                .await
                .unwrap_or_else(|e| panic!("reading message {seq} of {}: {e}", self.name));
            let body: Value = serde_json::from_slice(&message.payload).unwrap_or_else(|e| {
                panic!(
                    "message {seq} of {} is not JSON ({e}): {:?}",
                    self.name,
                    String::from_utf8_lossy(&message.payload)
                )
            });
            out.push(StoredMessage {
                stream_seq: message.sequence,
                subject: message.subject.to_string(),
                msg_id: message
                    .headers
                    .get("Nats-Msg-Id")
                    .map(|v| v.as_str().to_owned()),
                body,
            });
        }
        out
    }
}

impl Drop for TestStream {
    fn drop(&mut self) {
        // Drop cannot await, and may run inside a runtime: delete from a thread of its own.
        let name = self.name.clone();
        let deleted = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime to delete the test stream");
            runtime.block_on(async move {
                let Ok(client) = async_nats::connect(NATS_URL).await else {
                    return;
                };
                let _ = jetstream::new(client).delete_stream(&name).await;
            });
        })
        .join();
        if deleted.is_err() {
            eprintln!("could not delete the test stream {}", self.name);
        }
    }
}

/// A TCP proxy on 127.0.0.1 in front of `target`: [`TcpProxy::down`] closes the port (new
/// connections are refused) and cuts every open connection; [`TcpProxy::up`] listens again
/// on the same port; [`TcpProxy::freeze`] holds back everything the server sends (the
/// client's bytes still reach the server).
pub struct TcpProxy {
    addr: SocketAddr,
    target: SocketAddr,
    accept: Mutex<Option<JoinHandle<()>>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    frozen: watch::Sender<bool>,
}

impl TcpProxy {
    /// Starts the proxy, up, on a free port.
    pub async fn start(target: &str) -> TcpProxy {
        let target: SocketAddr = target.parse().expect("a socket address");
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).await;
        let addr = listener.local_addr().expect("the proxy's address");
        let (frozen, _) = watch::channel(false);
        let proxy = TcpProxy {
            addr,
            target,
            accept: Mutex::new(None),
            conns: Arc::new(Mutex::new(Vec::new())),
            frozen,
        };
        proxy.serve(listener);
        proxy
    }

    /// The address it listens on (for a proxy in front of another server than NATS).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// Stops listening and cuts every open connection.
    pub fn down(&self) {
        if let Some(task) = self.accept.lock().expect("proxy lock").take() {
            task.abort();
        }
        for conn in self.conns.lock().expect("proxy lock").drain(..) {
            conn.abort();
        }
    }

    /// Listens again on the same port.
    pub async fn up(&self) {
        let listener = bind(self.addr).await;
        self.serve(listener);
    }

    /// Holds back (true) or lets through (false) what the server sends.
    pub fn freeze(&self, frozen: bool) {
        self.frozen.send_replace(frozen);
    }

    fn serve(&self, listener: TcpListener) {
        let target = self.target;
        let conns = Arc::clone(&self.conns);
        let frozen = self.frozen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let frozen = frozen.subscribe();
                let conn = tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let upstream = async {
                        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                        let _ = server_write.shutdown().await;
                    };
                    let downstream = async {
                        let mut frozen = frozen;
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match server_read.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            while *frozen.borrow_and_update() {
                                if frozen.changed().await.is_err() {
                                    return;
                                }
                            }
                            if client_write.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = client_write.shutdown().await;
                    };
                    tokio::join!(upstream, downstream);
                });
                let mut conns = conns.lock().expect("proxy lock");
                conns.retain(|c| !c.is_finished());
                conns.push(conn);
            }
        });
        *self.accept.lock().expect("proxy lock") = Some(task);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.down();
    }
}

/// A listener on `addr` with SO_REUSEADDR, so the port can be taken again right after a
/// [`TcpProxy::down`].
async fn bind(addr: SocketAddr) -> TcpListener {
    let socket = TcpSocket::new_v4().expect("a TCP socket");
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket
        .bind(addr)
        .unwrap_or_else(|e| panic!("the proxy cannot bind {addr}: {e}"));
    socket
        .listen(128)
        .unwrap_or_else(|e| panic!("the proxy cannot listen on {addr}: {e}"))
}

/// Checks what a stream holds against what the agent acknowledged: exactly one message per
/// acknowledged record and nothing else, `Nats-Msg-Id` equal to the body's `id`, the body
/// carrying the record as staged (seq, action, entity, key, payload), the subject
/// `<prefix>.<entity>.<action>`, and per (entity, key) the messages in seq order.
///
/// # Errors
/// Every problem found, one per line.
pub fn check_stream_deliveries(
    messages: &[StoredMessage],
    staged: &[crate::Staged],
    prefix: &str,
) -> Result<(), String> {
    let mut problems = Vec::new();
    let by_id = crate::by_id(staged);
    let mut seen = std::collections::BTreeMap::new();
    let mut last_seq_of_key: std::collections::BTreeMap<(String, String), u64> =
        std::collections::BTreeMap::new();
    for m in messages {
        let id = m.body["id"].as_str().unwrap_or_default();
        if m.msg_id.as_deref() != Some(id) {
            problems.push(format!(
                "stream seq {}: Nats-Msg-Id {:?} differs from the body's id {id:?}",
                m.stream_seq, m.msg_id
            ));
        }
        *seen.entry(id.to_owned()).or_insert(0usize) += 1;
        let Some(s) = by_id.get(id) else {
            problems.push(format!(
                "stream seq {}: id {id:?} was never acknowledged by the agent",
                m.stream_seq
            ));
            continue;
        };
        let expected_subject = format!("{prefix}.{}.{}", s.entity, s.action);
        if m.subject != expected_subject {
            problems.push(format!(
                "{id}: subject {} instead of {expected_subject}",
                m.subject
            ));
        }
        if m.body["seq"] != s.seq
            || m.body["action"] != s.action.as_str()
            || m.body["entity"] != s.entity.as_str()
            || m.body["key"] != s.key.as_str()
            || m.body["payload"] != s.payload
        {
            problems.push(format!("{id}: the body {} differs from the record as staged (seq {}, {} {} key {}, payload {})", m.body, s.seq, s.action, s.entity, s.key, s.payload));
        }
        let key = (s.entity.clone(), s.key.clone());
        if let Some(previous) = last_seq_of_key.get(&key)
            && *previous >= s.seq
        {
            problems.push(format!(
                "key {key:?}: seq {} stored after seq {previous} (stream seq {})",
                s.seq, m.stream_seq
            ));
        }
        last_seq_of_key.insert(key, s.seq);
    }
    for (id, n) in &seen {
        if *n > 1 {
            problems.push(format!("{id}: stored {n} times"));
        }
    }
    for s in staged {
        if !seen.contains_key(&s.id) {
            problems.push(format!(
                "{} (seq {}, {} key {}) is not in the stream",
                s.id, s.seq, s.action, s.key
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}
