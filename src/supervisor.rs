//! Telling the service manager what the process is doing: systemd's
//! `sd_notify` protocol (`READY=1`, `RELOADING=1`, `STOPPING=1`,
//! `WATCHDOG=1`, `STATUS=`). Without `NOTIFY_SOCKET` (launchd, a terminal)
//! every call is a no-op.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;

/// Set once shutdown began: READY and RELOADING are not sent after
/// STOPPING (a reload during a drain must not tell the manager the service
/// is back).
static STOPPING: AtomicBool = AtomicBool::new(false);

fn send(states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// Start-up is done: the service is ready to serve.
pub fn ready(status: &str) {
    if STOPPING.load(Ordering::Relaxed) {
        send(&[NotifyState::Status(
            "shutting down: finishing work in flight",
        )]);
        return;
    }
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload begins; [`ready`] ends it.
pub fn reloading() {
    if STOPPING.load(Ordering::Relaxed) {
        return;
    }
    send(&[
        NotifyState::Reloading,
        NotifyState::monotonic_usec_now().unwrap_or(NotifyState::MonotonicUsec(0)),
        NotifyState::Status("reloading the configuration"),
    ]);
}

/// Shutdown begins (a drain may follow).
pub fn stopping(status: &str) {
    STOPPING.store(true, Ordering::Relaxed);
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// Pings the service manager's watchdog at half its interval, through
/// shutdown and drain, for as long as the runtime runs tasks: a hung
/// runtime stops the pings and the manager restarts the service.
pub fn watchdog() {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = (interval / 2).max(Duration::from_millis(10));
    tracing::debug!(?interval, "pinging the service manager's watchdog");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            send(&[NotifyState::Watchdog]);
        }
    });
}
