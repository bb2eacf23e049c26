//! The agent's local input cache: content-addressed files on the work
//! directory's filesystem, hard-linked read-only into action directories.
//!
//! An action could try to change a hard-linked input in place; every entry
//! records the inode, size, mtime, ctime and link count it had when stored,
//! and an entry that no longer matches is dropped and fetched again instead
//! of being linked. Hard links made or removed by the agent itself change
//! the ctime too, so a changed ctime is accepted only together with a
//! changed link count (and the new values are recorded); a write, chmod or
//! touch that leaves the link count alone is caught.

use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use outpost_proto::digest::Digest;

use crate::error::Error;
use crate::remote::Remote;

/// Fetches of large blobs at once.
const PARALLEL_FETCHES: usize = 8;

/// A fetch in progress; its file goes away unless it was adopted.
struct PartialFile(Option<PathBuf>);

impl PartialFile {
    fn path(&self) -> &Path {
        self.0.as_deref().expect("present until kept")
    }

    /// The file was moved into the cache: nothing to remove.
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

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
    stamp: Stamp,
    used: u64,
}

/// What a cached file looked like when the agent last touched it.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    inode: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    links: u64,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        Stamp {
            inode: meta.ino(),
            size: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            links: meta.nlink(),
        }
    }

    /// Whether `now` is this file, unmodified (see the module docs).
    fn still_valid(&self, now: &Stamp) -> bool {
        self.inode == now.inode
            && self.size == now.size
            && self.mtime == now.mtime
            && (self.ctime == now.ctime || self.links != now.links)
    }
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
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(actions_dir)
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

    /// The cache's bound: the most input bytes one action may need.
    pub fn max_bytes(&self) -> u64 {
        self.inner.max_bytes
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
        let (small, large): (Vec<Digest>, Vec<Digest>) = missing
            .into_iter()
            .partition(|d| d.size <= remote.batch_blob_limit());
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
                // Removed if the fetch fails or is abandoned (a cancelled
                // lease drops this task).
                let temp = PartialFile(Some(cache.temp_path()));
                remote.read_to_file(d, temp.path()).await?;
                tokio::task::spawn_blocking(move || {
                    let adopted = cache.adopt(d, temp.path());
                    if adopted.is_ok() {
                        temp.keep();
                    }
                    adopted
                })
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
        let stamp = Stamp::of(&meta);
        let mut state = self.lock();
        state.clock += 1;
        let used = state.clock;
        if let Some(old) = state.entries.insert(d, Entry { stamp, used }) {
            state.total -= old.stamp.size;
        }
        state.total += stamp.size;
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
        if !entry.stamp.still_valid(&Stamp::of(&meta)) {
            // Concurrent links and unlinks by this agent's own actions also
            // move the ctime: the content decides. Dropping a good entry
            // here would pull it from under actions that are placing it.
            let writable = meta.permissions().mode() & 0o222 != 0;
            if writable || !self.content_matches(d, &src) {
                tracing::warn!(digest = %d, "a cached input changed since it was stored; fetching it again");
                self.drop_entry(d);
                return Ok(false);
            }
            self.restamp(d);
        }
        let placed = if executable {
            std::fs::copy(&src, dest).and_then(|_| {
                std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o555))
            })
        } else {
            std::fs::hard_link(&src, dest)
        };
        match placed {
            Ok(()) => {}
            // Evicted or dropped by another action in between: fetch again.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(Error::local(format!("placing {}", dest.display()), e)),
        }
        if !executable {
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
        let now = Stamp::of(&meta);
        let mut state = self.lock();
        let changed = match state.entries.get_mut(d) {
            Some(e) if e.stamp.still_valid(&now) => {
                e.stamp = now;
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

    /// Whether the file at `path` still holds `d`'s bytes (hashed again).
    fn content_matches(&self, d: &Digest, path: &Path) -> bool {
        let Ok(mut file) = std::fs::File::open(path) else {
            return false;
        };
        let mut hasher = d.function.hasher();
        let mut buf = vec![0u8; 256 << 10];
        let mut size = 0u64;
        loop {
            match std::io::Read::read(&mut file, &mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    hasher.update(&buf[..n]);
                    size += n as u64;
                }
                Err(_) => return false,
            }
        }
        hasher.finish_with_size(size) == *d
    }

    fn drop_entry(&self, d: &Digest) {
        let mut state = self.lock();
        if let Some(e) = state.entries.remove(d) {
            state.total -= e.stamp.size;
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
                .map(|(d, e)| (e.used, *d, e.stamp.size))
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

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_proto::digest::Function;

    fn cache_with(data: &[u8]) -> (tempfile::TempDir, Cache, Digest) {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(
            dir.path().join("cache"),
            &dir.path().join("actions"),
            1 << 30,
        )
        .expect("open");
        let d = Function::Sha256.digest_of(data);
        let temp = cache.temp_path();
        std::fs::write(&temp, data).expect("write");
        cache.adopt(d, &temp).expect("adopt");
        (dir, cache, d)
    }

    #[test]
    fn links_survive_the_agents_own_links_and_unlinks() {
        let (dir, cache, d) = cache_with(b"header contents");
        let actions = dir.path().join("actions");
        for i in 0..5 {
            let dest = actions.join(format!("copy-{i}"));
            assert!(cache.place(&d, &dest, false).expect("place"), "round {i}");
            std::fs::remove_file(&dest).expect("unlink");
            cache.restamp(&d);
        }
        // Executables are private copies.
        let exe = actions.join("tool");
        assert!(cache.place(&d, &exe, true).expect("place"));
        assert_eq!(std::fs::metadata(&exe).expect("meta").nlink(), 1);
    }

    #[test]
    fn a_tampered_entry_is_dropped_not_linked() {
        let (dir, cache, d) = cache_with(b"original");
        let linked = dir.path().join("actions/input");
        assert!(cache.place(&d, &linked, false).expect("place"));
        // An action makes its read-only input writable and changes it in
        // place (same length, mtime restored), through its hard link.
        let mtime = std::fs::metadata(&linked)
            .expect("meta")
            .modified()
            .expect("mtime");
        std::fs::set_permissions(&linked, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        std::fs::write(&linked, b"tampered").expect("write");
        std::fs::File::options()
            .write(true)
            .open(&linked)
            .and_then(|f| f.set_modified(mtime))
            .expect("restore mtime");
        let again = dir.path().join("actions/input-2");
        assert!(
            !cache.place(&d, &again, false).expect("place"),
            "a tampered entry was linked again"
        );
        assert!(!again.exists());
    }
}
