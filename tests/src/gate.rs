//! [`TcpGate`]: a TCP proxy on 127.0.0.1 in front of a test server that can *refuse* the
//! agent's connections and count every attempt it makes meanwhile.
//!
//! A port that is really closed refuses a connection in the kernel, where a test without root
//! cannot count it. So a refusing gate keeps listening, and answers every connection it accepts
//! with an immediate reset (`SO_LINGER` 0, no byte read or forwarded): the agent's request fails
//! at once, as against a closed port, and the gate counts the attempt. Turning the gate to
//! refusing also cuts every connection open through it, and remembers when, so a test can tell
//! a resend caused by a cut (the answer was lost on the way) from any other.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

struct Shared {
    refusing: AtomicBool,
    refused: AtomicU64,
    forwarded: AtomicU64,
    conns: Mutex<Vec<JoinHandle<()>>>,
    cuts: Mutex<Vec<Instant>>,
}

/// A gate in front of `target`; dropping it stops it and cuts every connection.
pub struct TcpGate {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl TcpGate {
    /// Starts the gate, open, on a free port of 127.0.0.1.
    pub async fn start(target: SocketAddr) -> TcpGate {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the gate");
        let addr = listener.local_addr().expect("the gate's address");
        let shared = Arc::new(Shared {
            refusing: AtomicBool::new(false),
            refused: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            conns: Mutex::new(Vec::new()),
            cuts: Mutex::new(Vec::new()),
        });
        let accept = tokio::spawn(accept_loop(listener, target, shared.clone()));
        TcpGate {
            addr,
            shared,
            accept,
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Refuses from now on: cuts every open connection and resets every new one (counted).
    pub fn refuse(&self) {
        self.shared.refusing.store(true, Ordering::SeqCst);
        let conns = std::mem::take(&mut *self.shared.conns.lock().expect("gate lock"));
        for conn in conns {
            conn.abort();
        }
        self.shared
            .cuts
            .lock()
            .expect("gate lock")
            .push(Instant::now());
    }

    /// Forwards connections again.
    pub fn open(&self) {
        self.shared.refusing.store(false, Ordering::SeqCst);
    }

    /// Connections refused (accepted and reset at once) so far.
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// Connections forwarded to the target so far.
    pub fn forwarded(&self) -> u64 {
        self.shared.forwarded.load(Ordering::SeqCst)
    }

    /// When each [`TcpGate::refuse`] cut the open connections.
    pub fn cuts(&self) -> Vec<Instant> {
        self.shared.cuts.lock().expect("gate lock").clone()
    }
}

impl Drop for TcpGate {
    fn drop(&mut self) {
        self.accept.abort();
        for conn in self.shared.conns.lock().expect("gate lock").drain(..) {
            conn.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(e) => {
                eprintln!("gate: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // The flag is read under the lock `refuse` takes after setting it, so a connection
        // is either reset here or cut there, never let through after a refusal.
        let mut conns = shared.conns.lock().expect("gate lock");
        if shared.refusing.load(Ordering::SeqCst) {
            drop(conns);
            shared.refused.fetch_add(1, Ordering::SeqCst);
            // Linger 0: closing sends a reset, as a closed port would.
            let _ = client.set_zero_linger();
            drop(client);
            continue;
        }
        shared.forwarded.fetch_add(1, Ordering::SeqCst);
        let conn = tokio::spawn(async move {
            let Ok(mut server) = TcpStream::connect(target).await else {
                return;
            };
            let mut client = client;
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        });
        conns.retain(|c| !c.is_finished());
        conns.push(conn);
    }
}
