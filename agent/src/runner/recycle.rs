//! Recycled runners (`recycle-runner=true`): an action's workspace kept
//! after it ends well and handed to the next action with the same runner
//! key (its warm key, which covers instance, platform, client, plus how it
//! runs).
//!
//! Before the next action the previous one's outputs and inputs are
//! removed (the input links' cache entries checked again). With
//! `preserve-workspace=true` whatever else the previous actions left stays,
//! under the new inputs (an input wins where both have a path); without it
//! (the default) nothing stays and the workspace is as fresh as a new one.
//! A workspace is never kept after a failed, timed-out or cancelled action
//! (any non-zero exit counts), nor past `runner_max_disk`; the least
//! recently used go first past `runner_max_count` kept workspaces or
//! `runner_max_disk` bytes in all. Nothing of them survives an agent
//! restart: `actions/` is emptied at start.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use super::Workspace;
use super::worker::{Metrics, ReasonLabels, WarmLabels};
use crate::error::Error;

/// The kept workspaces' caps (agent settings `runner_max_*`).
#[derive(Clone, Debug)]
pub struct Caps {
    pub count: usize,
    pub disk: u64,
}

/// What an action asks of recycling.
#[derive(Clone, Debug)]
pub struct Recycling {
    /// The runner key (warm key and run options).
    pub key: String,
    /// The warm key, reported to the coordinator.
    pub warm_key: String,
    /// `preserve-workspace=true`.
    pub preserve: bool,
}

struct Kept {
    key: String,
    warm_key: String,
    workspace: Workspace,
    /// Paths under the root the last action had as inputs and outputs.
    inputs: Vec<PathBuf>,
    outputs: Vec<PathBuf>,
    bytes: u64,
    used: Instant,
}

/// The agent's kept workspaces.
pub struct Recycler {
    caps: Mutex<Caps>,
    kept: Mutex<Vec<Kept>>,
    metrics: Metrics,
}

/// Where the preserved files wait while the next inputs are laid out.
const PRESERVED: &str = "preserved";

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Recycler {
    pub fn new(caps: Caps, metrics: Metrics) -> Recycler {
        Recycler {
            caps: Mutex::new(caps),
            kept: Mutex::new(Vec::new()),
            metrics,
        }
    }

    fn count(&self, status: &'static str) {
        self.metrics
            .requests
            .get_or_create(&WarmLabels {
                kind: "runner",
                status,
            })
            .inc();
    }

    fn evicted(&self, reason: &'static str) {
        self.metrics
            .evictions
            .get_or_create(&ReasonLabels {
                kind: "runner",
                reason,
            })
            .inc();
    }

    /// Brings the pool gauges up to date.
    fn gauge(&self, kept: &[Kept]) {
        self.metrics.kept_runners.set(kept.len() as i64);
        let bytes: u64 = kept.iter().map(|k| k.bytes).sum();
        self.metrics
            .kept_runner_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// The warm keys of the kept workspaces.
    pub fn warm_keys(&self) -> Vec<String> {
        lock(&self.kept)
            .iter()
            .map(|k| k.warm_key.clone())
            .collect()
    }

    /// A kept workspace for `r`, made ready for the next action's inputs
    /// (its root gone, what is preserved set aside), or None.
    pub async fn take(&self, r: &Recycling) -> Result<Option<Workspace>, Error> {
        let found = {
            let mut kept = lock(&self.kept);
            let found = kept
                .iter()
                .rposition(|k| k.key == r.key)
                .map(|i| kept.remove(i));
            self.gauge(&kept);
            found
        };
        let Some(mut kept) = found else {
            self.count("miss");
            return Ok(None);
        };
        self.count("hit");
        let preserve = r.preserve;
        let ready = tokio::task::spawn_blocking(move || -> std::io::Result<Kept> {
            let root = kept.workspace.root().to_owned();
            for p in kept.outputs.iter().chain(&kept.inputs) {
                remove_path(&root.join(p))?;
            }
            kept.workspace.restamp_linked();
            let aside = kept.workspace.dir().join(PRESERVED);
            super::workspace::remove_tree(&aside);
            if preserve {
                std::fs::rename(&root, &aside)?;
            } else {
                super::workspace::remove_tree(&root);
            }
            Ok(kept)
        })
        .await
        .map_err(|_| Error::Retryable("a blocking task failed".into()))?;
        match ready {
            Ok(kept) => Ok(Some(kept.workspace)),
            Err(e) => {
                tracing::warn!(error = %e, "a kept workspace could not be cleaned; starting afresh");
                self.evicted("broken");
                Ok(None)
            }
        }
    }

    /// Puts back under the new inputs what `take` set aside.
    pub async fn restore(workspace: &Workspace) -> Result<(), Error> {
        let aside = workspace.dir().join(PRESERVED);
        let root = workspace.root().to_owned();
        tokio::task::spawn_blocking(move || {
            if aside.exists() {
                merge(&aside, &root)?;
                super::workspace::remove_tree(&aside);
            }
            Ok::<(), std::io::Error>(())
        })
        .await
        .map_err(|_| Error::Retryable("a blocking task failed".into()))?
        .map_err(|e| Error::local("restoring a recycled workspace", e))
    }

    /// Keeps `workspace` for the next action of `r` when `ok` and within
    /// the caps; otherwise it is removed (when dropped).
    pub async fn give_back(
        &self,
        r: Recycling,
        workspace: Workspace,
        ok: bool,
        inputs: Vec<PathBuf>,
        outputs: Vec<PathBuf>,
    ) {
        if !ok {
            self.evicted("failed");
            return;
        }
        let root = workspace.root().to_owned();
        let bytes = tokio::task::spawn_blocking(move || tree_bytes(&root))
            .await
            .unwrap_or(u64::MAX);
        let caps = lock(&self.caps).clone();
        if bytes > caps.disk {
            self.evicted("disk");
            return;
        }
        let evicted = {
            let mut kept = lock(&self.kept);
            kept.push(Kept {
                key: r.key,
                warm_key: r.warm_key,
                workspace,
                inputs,
                outputs,
                bytes,
                used: Instant::now(),
            });
            kept.sort_by_key(|k| k.used);
            let mut gone = Vec::new();
            while kept.len() > caps.count {
                gone.push((kept.remove(0), "count"));
            }
            while kept.iter().map(|k| k.bytes).sum::<u64>() > caps.disk {
                gone.push((kept.remove(0), "disk"));
            }
            self.gauge(&kept);
            gone
        };
        for (k, reason) in evicted {
            tracing::debug!(key = %k.key, reason, "recycled workspace evicted");
            self.evicted(reason);
        }
    }
}

/// Removes a file, symlink or tree, if there.
fn remove_path(p: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => {
            super::workspace::remove_tree(p);
            Ok(())
        }
        Ok(_) => std::fs::remove_file(p),
    }
}

/// Moves what `from` has and `to` lacks into `to`; directories both have
/// are merged; where `to` has something else, `to` wins.
fn merge(from: &Path, to: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        match std::fs::symlink_metadata(&dest) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::rename(entry.path(), &dest)?;
            }
            Err(e) => return Err(e),
            Ok(m) if m.is_dir() && entry.file_type()?.is_dir() => merge(&entry.path(), &dest)?,
            Ok(_) => {}
        }
    }
    Ok(())
}

/// Bytes the files under `root` take on disk.
fn tree_bytes(root: &Path) -> u64 {
    let mut total = 0u64;
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if let Ok(m) = e.metadata() {
                if m.is_dir() {
                    stack.push(e.path());
                } else {
                    total = total.saturating_add(m.blocks() * 512);
                }
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preserved_files_go_back_under_the_new_inputs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (aside, root) = (dir.path().join("aside"), dir.path().join("root"));
        std::fs::create_dir_all(aside.join("cache/sub")).expect("mkdir");
        std::fs::write(aside.join("cache/sub/kept"), "old").expect("write");
        std::fs::write(aside.join("clash"), "old").expect("write");
        std::fs::create_dir_all(root.join("cache")).expect("mkdir");
        std::fs::write(root.join("clash"), "input").expect("write");
        merge(&aside, &root).expect("merge");
        assert_eq!(
            std::fs::read_to_string(root.join("cache/sub/kept")).expect("kept"),
            "old"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("clash")).expect("input"),
            "input"
        );
        assert!(tree_bytes(&root) > 0);
    }
}
