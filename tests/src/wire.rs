//! A recording TCP proxy for "what crosses the wire" tests: it listens on a free loopback port,
//! forwards every connection to a target address, and keeps every byte that went either way,
//! so a test can look for a canary in the traffic. With TLS the canary must be absent; without
//! it, present (so the test can fail). No capture privileges needed, unlike tcpdump.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// A running proxy; stops accepting when dropped (open connections end with their peers).
pub struct Recorder {
    addr: SocketAddr,
    bytes: Arc<Mutex<Vec<u8>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Recorder {
    /// Starts forwarding a new loopback port to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the recording proxy");
        let addr = listener.local_addr().unwrap();
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&bytes);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let kept = Arc::clone(&kept);
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let up = pump(client_read, server_write, Arc::clone(&kept));
                    let down = pump(server_read, client_write, kept);
                    let _ = tokio::join!(up, down);
                });
            }
        });
        Self {
            addr,
            bytes,
            accept,
        }
    }

    /// Where clients connect instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every byte forwarded so far, both directions interleaved.
    pub fn captured(&self) -> Vec<u8> {
        self.bytes.lock().unwrap().clone()
    }

    /// Whether `needle` went through the proxy in clear.
    pub fn saw(&self, needle: &str) -> bool {
        let hay = self.captured();
        hay.windows(needle.len()).any(|w| w == needle.as_bytes())
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    kept: Arc<Mutex<Vec<u8>>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.lock().unwrap().extend_from_slice(&buf[..n]);
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}
