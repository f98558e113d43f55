//! Telling the service manager how the daemon is doing. Under systemd (`Type=notify`, the
//! .deb's unit) the daemon sends `READY=1` once the store is open and the ingest port is bound,
//! `WATCHDOG=1` every half `WatchdogSec` from a task on the async runtime (a wedged runtime stops
//! the pings, so systemd kills and restarts the agent; a restart loses nothing, the records are
//! on disk), and `STOPPING=1` when it begins to drain. Every call is a no-op when systemd did not
//! ask for it (`NOTIFY_SOCKET` / `WATCHDOG_USEC` unset: a terminal, the tests, Windows, where
//! the service control manager is told by `winservice` instead).

use std::time::Duration;

/// Shortest watchdog ping interval, whatever `WatchdogSec` says.
pub const MIN_WATCHDOG_PING: Duration = Duration::from_millis(100);

/// Tells the service manager the daemon is up, with a one-line status for `systemctl status`.
pub fn ready(status: &str) {
    imp::send(&[imp::State::Ready, imp::State::Status(status)]);
}

/// Tells the service manager the daemon is stopping (draining), with a one-line status.
pub fn stopping(status: &str) {
    imp::send(&[imp::State::Stopping, imp::State::Status(status)]);
}

/// Updates the one-line status `systemctl status` shows.
pub fn status(status: &str) {
    imp::send(&[imp::State::Status(status)]);
}

/// When the service manager asked for watchdog pings, starts a task on the current runtime
/// that sends one every half interval, until the returned handle is aborted.
pub fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let timeout = imp::watchdog_timeout()?;
    let every = (timeout / 2).max(MIN_WATCHDOG_PING);
    tracing::info!(
        timeout_secs = timeout.as_secs_f64(),
        ping_secs = every.as_secs_f64(),
        "systemd watchdog enabled."
    );
    Some(tokio::spawn(async move {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            imp::send(&[imp::State::Watchdog]);
        }
    }))
}

#[cfg(unix)]
mod imp {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    pub use sd_notify::NotifyState as State;

    /// Set after the first failed send, so a broken socket logs once, not every ping.
    static FAILED: AtomicBool = AtomicBool::new(false);

    pub fn send(states: &[State<'_>]) {
        if let Err(err) = sd_notify::notify(states)
            && !FAILED.swap(true, Ordering::Relaxed)
        {
            tracing::error!(
                error = %err,
                "Could not notify systemd (NOTIFY_SOCKET); with Type=notify it will time out the start or the watchdog and restart the agent. Check the unit's NotifyAccess=."
            );
        }
    }

    pub fn watchdog_timeout() -> Option<Duration> {
        sd_notify::watchdog_enabled().filter(|t| !t.is_zero())
    }
}

#[cfg(not(unix))]
mod imp {
    use std::time::Duration;

    /// The states the daemon reports; nothing listens for them off Unix.
    #[allow(dead_code)]
    pub enum State<'a> {
        Ready,
        Stopping,
        Watchdog,
        Status(&'a str),
    }

    pub fn send(_states: &[State<'_>]) {}

    pub fn watchdog_timeout() -> Option<Duration> {
        None
    }
}
