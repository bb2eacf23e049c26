//! The agent's local input cache: content-addressed files on the work
//! directory's filesystem, hard-linked read-only into action directories.
//!
//! An action could try to change a hard-linked input in place; every entry
//! records the size, mtime and ctime it had when stored, and an entry that
//! no longer matches is dropped and fetched again instead of being linked.
//! Linking and unlinking change the ctime too, so after the agent's own
//! links the new ctime is recorded (only if size and mtime are unchanged).

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use outpost_proto::digest::Digest;

use crate::error::Error;
use crate::remote::{BATCH_BLOB, Remote};

/// Fetches of large blobs at once.
const PARALLEL_FETCHES: usize = 8;

#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    entries: HashMap<Digest, Entry>,
    total: u64,
    clock: u64,
}

#[derive(Clone, Copy)]
struct Entry {
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    used: u64,
}

fn stamp(meta: &std::fs::Metadata) -> ((i64, i64), (i64, i64)) {
    (
        (meta.mtime(), meta.mtime_nsec()),
        (meta.ctime(), meta.ctime_nsec()),
    )
}

impl Cache {
    /// Opens the cache under `dir`, starting empty, and checks that files
    /// can be hard-linked from it into `actions_dir`.
    pub fn open(dir: PathBuf, actions_dir: &Path, max_bytes: u64) -> anyhow::Result<Cache> {
        use anyhow::Context as _;
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("clearing the input cache {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::create_dir_all(actions_dir)
            .with_context(|| format!("creating {}", actions_dir.display()))?;
        let probe = dir.join("link-probe");
        std::fs::write(&probe, b"").with_context(|| format!("writing {}", probe.display()))?;
        let linked = actions_dir.join("link-probe");
        let _ = std::fs::remove_file(&linked);
        std::fs::hard_link(&probe, &linked).with_context(|| {
            format!(
                "cannot hard-link from the input cache {} into {}: both must be on one filesystem \
                 (put --work-dir on a single filesystem)",
                dir.display(),
                actions_dir.display()
            )
        })?;
        let _ = std::fs::remove_file(&linked);
        let _ = std::fs::remove_file(&probe);
        Ok(Cache {
            inner: Arc::new(Inner {
                dir,
                max_bytes,
                state: Mutex::default(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path(&self, d: &Digest) -> PathBuf {
        self.inner
            .dir
            .join(format!("{}-{}-{}", d.function, d.hash_hex(), d.size))
    }

    /// Makes sure every digest is in the cache, fetching what is missing.
    pub async fn ensure(&self, remote: &Remote, digests: &[Digest]) -> Result<(), Error> {
        let missing: Vec<Digest> = {
            let state = self.lock();
            let mut seen = std::collections::HashSet::new();
            digests
                .iter()
                .filter(|d| {
                    !d.is_empty_blob() && !state.entries.contains_key(d) && seen.insert(**d)
                })
                .copied()
                .collect()
        };
        let (small, large): (Vec<Digest>, Vec<Digest>) =
            missing.into_iter().partition(|d| d.size <= BATCH_BLOB);
        if !small.is_empty() {
            let fetched = remote.read_batch(&small).await?;
            let cache = self.clone();
            tokio::task::spawn_blocking(move || -> Result<(), Error> {
                for (d, data) in fetched {
                    let temp = cache.temp_path();
                    std::fs::write(&temp, &data)
                        .map_err(|e| Error::local("writing to the input cache", e))?;
                    cache.adopt(d, &temp)?;
                }
                Ok(())
            })
            .await
            .map_err(|_| Error::Retryable("a cache task failed".into()))??;
        }
        let mut tasks = tokio::task::JoinSet::new();
        for d in large {
            if tasks.len() >= PARALLEL_FETCHES
                && let Some(done) = tasks.join_next().await
            {
                done.map_err(|_| Error::Retryable("a fetch task failed".into()))??;
            }
            let cache = self.clone();
            let remote = remote.clone();
            tasks.spawn(async move {
                let temp = cache.temp_path();
                let fetched = remote.read_to_file(d, &temp).await;
                if let Err(e) = fetched {
                    let _ = std::fs::remove_file(&temp);
                    return Err(e);
                }
                tokio::task::spawn_blocking(move || cache.adopt(d, &temp))
                    .await
                    .map_err(|_| Error::Retryable("a cache task failed".into()))?
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.map_err(|_| Error::Retryable("a fetch task failed".into()))??;
        }
        self.evict();
        Ok(())
    }

    fn temp_path(&self) -> PathBuf {
        self.inner
            .dir
            .join(format!("tmp-{:032x}", rand::random::<u128>()))
    }

    /// Moves a verified file into the cache, read-only.
    fn adopt(&self, d: Digest, temp: &Path) -> Result<(), Error> {
        let dest = self.path(&d);
        std::fs::set_permissions(temp, std::fs::Permissions::from_mode(0o444))
            .map_err(|e| Error::local("protecting a cached input", e))?;
        std::fs::rename(temp, &dest).map_err(|e| Error::local("adding to the input cache", e))?;
        let meta =
            std::fs::metadata(&dest).map_err(|e| Error::local("reading a cached input", e))?;
        let (mtime, ctime) = stamp(&meta);
        let mut state = self.lock();
        state.clock += 1;
        let used = state.clock;
        if let Some(old) = state.entries.insert(
            d,
            Entry {
                size: meta.len(),
                mtime,
                ctime,
                used,
            },
        ) {
            state.total -= old.size;
        }
        state.total += meta.len();
        Ok(())
    }

    /// Puts `d` at `dest`: a hard link, or a private copy for executables.
    /// `Ok(false)` when the entry is missing or was tampered with (it is
    /// then dropped; fetch it again).
    pub fn place(&self, d: &Digest, dest: &Path, executable: bool) -> Result<bool, Error> {
        if d.is_empty_blob() {
            std::fs::File::create(dest)
                .map_err(|e| Error::local(format!("creating {}", dest.display()), e))?;
            let mode = if executable { 0o555 } else { 0o444 };
            std::fs::set_permissions(dest, std::fs::Permissions::from_mode(mode))
                .map_err(|e| Error::local("setting permissions", e))?;
            return Ok(true);
        }
        let src = self.path(d);
        let Some(entry) = self.lock().entries.get(d).copied() else {
            return Ok(false);
        };
        let meta = match std::fs::metadata(&src) {
            Ok(m) => m,
            Err(_) => {
                self.drop_entry(d);
                return Ok(false);
            }
        };
        let (mtime, ctime) = stamp(&meta);
        if meta.len() != entry.size || mtime != entry.mtime || ctime != entry.ctime {
            tracing::warn!(digest = %d, "a cached input changed since it was stored; fetching it again");
            self.drop_entry(d);
            return Ok(false);
        }
        if executable {
            std::fs::copy(&src, dest)
                .map_err(|e| Error::local(format!("copying to {}", dest.display()), e))?;
            std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o555))
                .map_err(|e| Error::local("setting permissions", e))?;
        } else {
            std::fs::hard_link(&src, dest)
                .map_err(|e| Error::local(format!("linking {}", dest.display()), e))?;
            self.restamp(d);
        }
        let mut state = self.lock();
        state.clock += 1;
        let clock = state.clock;
        if let Some(e) = state.entries.get_mut(d) {
            e.used = clock;
        }
        Ok(true)
    }

    /// Records the ctime after the agent's own link or unlink, if size and
    /// mtime are unchanged; drops the entry otherwise.
    pub fn restamp(&self, d: &Digest) {
        let Ok(meta) = std::fs::metadata(self.path(d)) else {
            self.drop_entry(d);
            return;
        };
        let (mtime, ctime) = stamp(&meta);
        let mut state = self.lock();
        let changed = match state.entries.get_mut(d) {
            Some(e) if e.size == meta.len() && e.mtime == mtime => {
                e.ctime = ctime;
                false
            }
            Some(_) => true,
            None => false,
        };
        drop(state);
        if changed {
            tracing::warn!(digest = %d, "an action modified a cached input; dropping it");
            self.drop_entry(d);
        }
    }

    fn drop_entry(&self, d: &Digest) {
        let mut state = self.lock();
        if let Some(e) = state.entries.remove(d) {
            state.total -= e.size;
        }
        drop(state);
        let _ = std::fs::remove_file(self.path(d));
    }

    /// Removes least recently used entries beyond the size bound. Files
    /// linked into running actions stay valid there.
    fn evict(&self) {
        let victims: Vec<Digest> = {
            let state = self.lock();
            if state.total <= self.inner.max_bytes {
                return;
            }
            let mut entries: Vec<(u64, Digest, u64)> = state
                .entries
                .iter()
                .map(|(d, e)| (e.used, *d, e.size))
                .collect();
            entries.sort_unstable();
            let mut excess = state.total - self.inner.max_bytes / 10 * 9;
            entries
                .into_iter()
                .take_while(|(_, _, size)| {
                    let take = excess > 0;
                    excess = excess.saturating_sub(*size);
                    take
                })
                .map(|(_, d, _)| d)
                .collect()
        };
        for d in victims {
            self.drop_entry(&d);
        }
    }
}
