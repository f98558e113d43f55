//! The real binary under a stand-in for systemd's notify socket (`Type=notify` and
//! `WatchdogSec` in the .deb's unit): `READY=1` once it listens, with the bound address in
//! `STATUS=`; `WATCHDOG=1` at half `WATCHDOG_USEC`; `STOPPING=1` on SIGTERM; exit 0.
#![cfg(unix)]

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Datagrams received until `want` is among them or `limit` passes, joined.
fn receive_until(socket: &UnixDatagram, want: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    while !got.contains(want) && Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    got
}

#[test]
fn daemon_tells_systemd_ready_watchdog_and_stopping() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("read timeout");
    let mut child = Command::new(env!("CARGO_BIN_EXE_estafeta"))
        .arg("run")
        .current_dir(dir.path())
        .env_remove("ESTAFETA_ENV_FILE")
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "400000")
        .env("INGEST_ADDR", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start estafeta run");

    let ready = receive_until(&socket, "READY=1", Duration::from_secs(30));
    assert!(ready.contains("READY=1"), "no READY=1: {ready:?}");
    assert!(
        ready.contains("STATUS=Running; ingest API on 127.0.0.1:"),
        "no status with the bound address: {ready:?}"
    );
    // Every 200 ms (half of 400 ms): at least 3 pings in 1 s, whatever the first one did.
    let pings = receive_until(&socket, "never sent", Duration::from_secs(1));
    let count = pings.matches("WATCHDOG=1").count();
    assert!(count >= 3, "{count} watchdog pings in 1 s: {pings:?}");

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success());
    let stopping = receive_until(&socket, "STOPPING=1", Duration::from_secs(10));
    assert!(
        stopping.contains("STOPPING=1"),
        "no STOPPING=1: {stopping:?}"
    );
    let status = child.wait().expect("wait for estafeta");
    assert!(status.success(), "estafeta exited with {status}");
}
