//! Configuration reload: at SIGHUP (`systemctl reload`), and, when asked
//! with `--watch-config`, whenever the config file changes. A reload
//! re-reads the file (flags and environment still win), applies what can
//! change at run time and names what needs a restart. A file that does not
//! parse or validate changes nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_proto::settings::Reloaded;
use tokio::sync::mpsc;

use crate::supervisor;

/// Runs `reload` at every SIGHUP and, with `watch`, at changes to that
/// file, from now on (SIGHUP is handled before this returns, so it no
/// longer ends the process).
pub fn start<F, Fut>(watch: Option<PathBuf>, mut reload: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<Reloaded>> + Send,
{
    use tokio::signal::unix::{SignalKind, signal};
    let mut sighup =
        signal(SignalKind::hangup()).map_err(|e| anyhow::anyhow!("cannot handle SIGHUP: {e}"))?;
    let (tx, mut triggers) = mpsc::channel::<&'static str>(4);
    let hup = tx.clone();
    tokio::spawn(async move {
        while sighup.recv().await.is_some() {
            let _ = hup.try_send("SIGHUP");
        }
    });
    let watcher = match watch {
        Some(path) => Some(
            watch_file(&path, tx)
                .map_err(|e| anyhow::anyhow!("cannot watch {}: {e}", path.display()))?,
        ),
        None => None,
    };
    tokio::spawn(async move {
        // Kept alive for as long as reloads are served.
        let _watcher = watcher;
        while let Some(cause) = triggers.recv().await {
            supervisor::reloading();
            match reload().await {
                Ok(outcome) => {
                    if outcome.applied.is_empty() && outcome.need_restart.is_empty() {
                        tracing::info!(cause, "configuration reloaded: nothing changed");
                    } else {
                        tracing::info!(cause, applied = ?outcome.applied, "configuration reloaded");
                    }
                    if !outcome.need_restart.is_empty() {
                        tracing::warn!(
                            settings = ?outcome.need_restart,
                            "these settings changed but take effect only after a restart"
                        );
                    }
                }
                Err(e) => {
                    tracing::error!(
                        cause,
                        "configuration not reloaded, the running one stays: {e:#}"
                    );
                }
            }
            supervisor::ready("running");
        }
    });
    Ok(())
}

/// Watches the file's directory (editors replace files by renaming over
/// them) and sends a trigger, debounced, when the file itself changes.
fn watch_file(
    path: &Path,
    triggers: mpsc::Sender<&'static str>,
) -> anyhow::Result<notify::RecommendedWatcher> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let path = std::path::absolute(path)?;
    let dir = path
        .parent()
        .ok_or_else(|| anyhow::anyhow!("{} has no directory", path.display()))?
        .to_owned();
    let name = path.file_name().map(ToOwned::to_owned);
    let (raw_tx, mut raw) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        let ours = event.paths.iter().any(|p| p.file_name() == name.as_deref());
        if ours && !matches!(event.kind, EventKind::Access(_)) {
            let _ = raw_tx.send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    tokio::spawn(async move {
        while raw.recv().await.is_some() {
            // An editor's save is several events: wait for them to settle.
            tokio::time::sleep(Duration::from_millis(200)).await;
            while raw.try_recv().is_ok() {}
            if triggers.send("config file changed").await.is_err() {
                return;
            }
        }
    });
    tracing::info!(path = %path.display(), "watching the config file for changes");
    Ok(watcher)
}
