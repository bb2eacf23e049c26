//! The redb index and its single writer.
//!
//! All writes to the database go through one task ([`run_committer`]) that
//! takes requests in batches: one batch makes every new blob file durable
//! with a single filesystem sync and records them, the Action Cache entries
//! and the pending access times in a single transaction (group commit). The
//! same task evicts, so renames and deletions of blob files never race.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use outpost_proto::digest::{Digest, SUPPORTED};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use super::in_use::InUse;
use super::layout::{self, Key, Layout};
use super::temp::TempFile;
use crate::storage::Error;

/// Blob key -> (size, last access in seconds since the epoch).
pub const BLOBS: TableDefinition<&Key, (u64, u64)> = TableDefinition::new("blobs");
/// (last access, blob key): the eviction order.
pub const LRU: TableDefinition<(u64, &Key), ()> = TableDefinition::new("lru");
/// (instance name, action key) -> encoded ActionResult.
pub const ACTION_CACHE: TableDefinition<(&str, &Key), &[u8]> = TableDefinition::new("action_cache");
/// Agent id -> (last seen in seconds since the epoch, encoded capabilities).
pub const AGENTS: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("agents");
/// Counters: `total_bytes`.
pub const STATS: TableDefinition<&str, u64> = TableDefinition::new("stats");

const TOTAL_BYTES: &str = "total_bytes";
/// Requests taken into one group commit at most.
const MAX_BATCH: usize = 1024;
/// How often access times are written and the size bound enforced.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(1);
/// Eviction frees down to this share of the bound, so it runs in bursts.
const LOW_WATER_PERCENT: u64 = 95;
const EVICT_ROUND: usize = 1000;

pub enum Request {
    Blob {
        digest: Digest,
        temp: TempFile,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    ActionResult {
        instance_name: String,
        action: Digest,
        result: Bytes,
        /// A client's entry: the commit reaches the disk before this reply.
        /// `None` for the result of an executed action, which readers find
        /// in `pending_results` meanwhile, committed without waiting.
        reply: Option<oneshot::Sender<Result<(), Error>>>,
    },
    /// The index lists a blob whose file is gone: drop the entry.
    Forget(Digest),
    /// An agent was seen (access-time-like: not worth a reply).
    Agent {
        agent_id: String,
        capabilities: Bytes,
        seen_at: u64,
    },
}

/// State the committer shares with readers.
pub struct Core {
    pub layout: Layout,
    pub db: redb::Database,
    pub in_use: Arc<InUse>,
    pub touched: Mutex<HashSet<Digest>>,
    pub total_bytes: AtomicU64,
    pub max_bytes: u64,
    /// Blobs evicted since start-up.
    pub evicted: AtomicU64,
    /// A commit since the last one that reached the disk did not wait for
    /// it; the next maintenance tick syncs, so at most about a second of
    /// such entries can be lost in a crash (and redb reclaims pages).
    pub unsynced: std::sync::atomic::AtomicBool,
    /// Results of actions this coordinator ran, handed to the committer
    /// but not yet in the database: reads see them at once, so nobody
    /// waits for the commit (`record_action_result`).
    pub pending_results: Mutex<HashMap<(String, Digest), Bytes>>,
}

pub fn db_err(context: &str) -> impl Fn(&dyn std::fmt::Display) -> Error + '_ {
    move |e| Error::Database {
        context: context.to_owned(),
        message: e.to_string(),
    }
}

macro_rules! db {
    ($ctx:expr, $e:expr) => {
        $e.map_err(|e| $crate::storage::embedded::index::db_err($ctx)(&e))
    };
}
pub(crate) use db;

pub use crate::storage::now_secs;

impl Core {
    /// Creates the tables if needed and reads the byte total.
    pub fn init_db(db: &redb::Database) -> Result<u64, Error> {
        let txn = db!("opening the index", db.begin_write())?;
        let total = {
            txn.open_table(BLOBS)
                .map_err(|e| db_err("creating tables")(&e))?;
            txn.open_table(LRU)
                .map_err(|e| db_err("creating tables")(&e))?;
            txn.open_table(ACTION_CACHE)
                .map_err(|e| db_err("creating tables")(&e))?;
            txn.open_table(AGENTS)
                .map_err(|e| db_err("creating tables")(&e))?;
            let stats = db!("creating tables", txn.open_table(STATS))?;
            db!("reading totals", stats.get(TOTAL_BYTES))?.map_or(0, |v| v.value())
        };
        db!("creating tables", txn.commit())?;
        Ok(total)
    }

    pub fn is_present(&self, digest: &Digest) -> Result<bool, Error> {
        if digest.is_empty_blob() {
            return Ok(true);
        }
        let txn = db!("reading the index", self.db.begin_read())?;
        let blobs = db!("reading the index", txn.open_table(BLOBS))?;
        Ok(db!("reading the index", blobs.get(&layout::key(digest)))?.is_some())
    }

    /// Presence of many digests in one read transaction; present ones are
    /// queued for an access-time refresh.
    pub fn find_missing(&self, digests: Vec<Digest>) -> Result<Vec<Digest>, Error> {
        let txn = db!("reading the index", self.db.begin_read())?;
        let blobs = db!("reading the index", txn.open_table(BLOBS))?;
        let mut missing = Vec::new();
        let mut present = Vec::with_capacity(digests.len());
        // Blobs on their way out count as missing, so a caller that pinned
        // them first (to run an action) re-uploads them.
        let evicting = self.in_use.evicting_among(&digests);
        for d in digests {
            if d.is_empty_blob() {
                continue;
            }
            if evicting.contains(&d) {
                missing.push(d);
                continue;
            }
            if db!("reading the index", blobs.get(&layout::key(&d)))?.is_some() {
                present.push(d);
            } else {
                missing.push(d);
            }
        }
        self.touch(present);
        Ok(missing)
    }

    pub fn touch(&self, digests: impl IntoIterator<Item = Digest>) {
        let mut touched = self.touched.lock().unwrap_or_else(|e| e.into_inner());
        touched.extend(digests);
    }

    pub fn recall_agents(&self) -> Result<Vec<(String, Bytes, u64)>, Error> {
        let txn = db!("reading agents", self.db.begin_read())?;
        let table = db!("reading agents", txn.open_table(AGENTS))?;
        let mut out = Vec::new();
        for entry in db!("reading agents", table.iter())? {
            let (k, v) = db!("reading agents", entry)?;
            let (seen_at, caps) = v.value();
            out.push((k.value().to_owned(), Bytes::copy_from_slice(caps), seen_at));
        }
        Ok(out)
    }

    /// Drops pending results whose write is settled (committed, or lost);
    /// a later write of the same key stays until its own commit.
    pub fn settle_pending(&self, written: impl IntoIterator<Item = ((String, Digest), Bytes)>) {
        let mut pending = self
            .pending_results
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (key, value) in written {
            if pending.get(&key) == Some(&value) {
                pending.remove(&key);
            }
        }
    }

    pub fn get_action_result(
        &self,
        instance_name: &str,
        action: &Digest,
    ) -> Result<Option<Bytes>, Error> {
        let key = (instance_name.to_owned(), *action);
        if let Some(pending) = self
            .pending_results
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(Some(pending.clone()));
        }
        let txn = db!("reading the action cache", self.db.begin_read())?;
        let table = db!("reading the action cache", txn.open_table(ACTION_CACHE))?;
        let found = db!(
            "reading the action cache",
            table.get((instance_name, &layout::key(action)))
        )?;
        Ok(found.map(|v| Bytes::copy_from_slice(v.value())))
    }
}

/// The single writer. Ends when every sender is gone, after a last flush.
pub async fn run_committer(core: Arc<Core>, mut requests: mpsc::Receiver<Request>) {
    {
        let core = Arc::clone(&core);
        if let Err(e) = tokio::task::spawn_blocking(move || sweep_orphans(&core)).await {
            tracing::error!(error = %e, "orphan sweep failed");
        }
    }
    let mut tick = tokio::time::interval(MAINTENANCE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut batch = Vec::new();
        let mut ticked = false;
        tokio::select! {
            received = requests.recv() => match received {
                Some(r) => batch.push(r),
                None => break,
            },
            _ = tick.tick() => ticked = true,
        }
        while batch.len() < MAX_BATCH {
            match requests.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let core = Arc::clone(&core);
        let done = tokio::task::spawn_blocking(move || {
            if !batch.is_empty() {
                commit_batch(&core, batch);
            }
            if let Err(e) = maintain(&core) {
                tracing::error!(error = %e, "storage maintenance failed");
            }
            if ticked
                && core.unsynced.swap(false, Ordering::Relaxed)
                && let Err(e) = sync_commits(&core)
            {
                core.unsynced.store(true, Ordering::Relaxed);
                tracing::error!(error = %e, "storage sync failed");
            }
        })
        .await;
        if let Err(e) = done {
            tracing::error!(error = %e, "storage commit task panicked");
        }
    }
    let _ = tokio::task::spawn_blocking(move || maintain(&core)).await;
}

fn commit_batch(core: &Core, batch: Vec<Request>) {
    let mut replies = Vec::new();
    // Blob files renamed into place in this batch that the index did not
    // list yet: removed again if the transaction fails.
    let mut placed = Vec::new();
    // Pending results this batch writes: dropped from the pending map once
    // committed, or once the commit failed (they are then lost, as a crash
    // would lose them), before anyone hears of the commit.
    let written: Vec<((String, Digest), Bytes)> = batch
        .iter()
        .filter_map(|r| match r {
            Request::ActionResult {
                instance_name,
                action,
                result,
                reply: None,
                ..
            } => Some(((instance_name.clone(), *action), result.clone())),
            _ => None,
        })
        .collect();
    let result = (|| -> Result<(), Error> {
        let mut txn = db!("starting a commit", core.db.begin_write())?;
        let mut durable = false;
        {
            let mut blobs = db!("committing", txn.open_table(BLOBS))?;
            let mut lru = db!("committing", txn.open_table(LRU))?;
            let mut ac = db!("committing", txn.open_table(ACTION_CACHE))?;
            let mut agents = db!("committing", txn.open_table(AGENTS))?;
            let mut stats = db!("committing", txn.open_table(STATS))?;
            let mut total = db!("committing", stats.get(TOTAL_BYTES))?.map_or(0, |v| v.value());
            let now = now_secs();
            let mut new_blobs = Vec::new();
            for request in batch {
                match request {
                    Request::Blob {
                        digest,
                        temp,
                        reply,
                    } => {
                        let key = layout::key(&digest);
                        let known = db!("committing", blobs.get(&key))?.is_some();
                        if known || new_blobs.iter().any(|(d, _)| *d == digest) {
                            // An identical upload won; this copy is dropped.
                            replies.push((reply, Ok(())));
                            continue;
                        }
                        let path = core.layout.blob(&digest);
                        match temp.persist(&path) {
                            Ok(()) => {
                                placed.push(path);
                                new_blobs.push((digest, key));
                                replies.push((reply, Ok(())));
                            }
                            Err(e) => replies.push((reply, Err(e))),
                        }
                    }
                    Request::ActionResult {
                        instance_name,
                        action,
                        result,
                        reply,
                    } => {
                        durable |= reply.is_some();
                        db!(
                            "writing the action cache",
                            ac.insert(
                                (instance_name.as_str(), &layout::key(&action)),
                                result.as_ref()
                            )
                        )?;
                        if let Some(reply) = reply {
                            replies.push((reply, Ok(())));
                        }
                    }
                    Request::Agent {
                        agent_id,
                        capabilities,
                        seen_at,
                    } => {
                        db!(
                            "remembering an agent",
                            agents.insert(agent_id.as_str(), (seen_at, capabilities.as_ref()))
                        )?;
                    }
                    Request::Forget(digest) => {
                        let key = layout::key(&digest);
                        let old = db!("forgetting a blob", blobs.remove(&key))?.map(|v| v.value());
                        if let Some((size, atime)) = old {
                            db!("forgetting a blob", lru.remove((atime, &key)))?;
                            total = total.saturating_sub(size);
                        }
                    }
                }
            }
            if !new_blobs.is_empty() {
                // One sync makes every renamed file and its bytes durable
                // before the index says it is present.
                sync_filesystem(&core.layout, &placed)?;
                durable = true;
            }
            for (digest, key) in &new_blobs {
                db!("committing", blobs.insert(key, (digest.size, now)))?;
                db!("committing", lru.insert((now, key), ()))?;
                total += digest.size;
            }
            db!("committing", stats.insert(TOTAL_BYTES, total))?;
            core.total_bytes.store(total, Ordering::Relaxed);
        }
        if !durable {
            // Only agent sightings, forgotten blobs or results of actions
            // this coordinator ran: a crash may lose the last of these, so
            // the commit does not wait for the disk. New blobs and Action
            // Cache entries from clients always do: a client was told they
            // are stored.
            db!("committing", txn.set_durability(redb::Durability::None))?;
            core.unsynced.store(true, Ordering::Relaxed);
        }
        db!("committing", txn.commit())
    })();
    if let Err(e) = &result
        && !written.is_empty()
    {
        tracing::warn!(error = %e, results = written.len(), "results of executed actions were not stored in the action cache");
    }
    core.settle_pending(written);
    match result {
        Ok(()) => {
            for (reply, r) in replies {
                let _ = reply.send(r);
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "group commit failed");
            for path in placed {
                let _ = std::fs::remove_file(path);
            }
            for (reply, _) in replies {
                let _ = reply.send(Err(clone_err(&e)));
            }
            // The in-memory total may have run ahead of the aborted commit.
            if let Ok(total) = read_total(core) {
                core.total_bytes.store(total, Ordering::Relaxed);
            }
        }
    }
}

fn clone_err(e: &Error) -> Error {
    match e {
        Error::NoSpace { context } => Error::NoSpace {
            context: context.clone(),
        },
        other => Error::Database {
            context: "committing".to_owned(),
            message: other.to_string(),
        },
    }
}

fn read_total(core: &Core) -> Result<u64, Error> {
    let txn = db!("reading totals", core.db.begin_read())?;
    let stats = db!("reading totals", txn.open_table(STATS))?;
    Ok(db!("reading totals", stats.get(TOTAL_BYTES))?.map_or(0, |v| v.value()))
}

#[cfg(os_linux)]
fn sync_filesystem(layout: &Layout, _placed: &[std::path::PathBuf]) -> Result<(), Error> {
    let dir = std::fs::File::open(layout.cas()).map_err(|e| Error::io("syncing blobs", e))?;
    nix::unistd::syncfs(&dir).map_err(|e| Error::io("syncing blobs", e.into()))
}

#[cfg(not(os_linux))]
fn sync_filesystem(_layout: &Layout, placed: &[std::path::PathBuf]) -> Result<(), Error> {
    let mut dirs = std::collections::BTreeSet::new();
    for path in placed {
        std::fs::File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io("syncing blobs", e))?;
        if let Some(parent) = path.parent() {
            dirs.insert(parent.to_owned());
        }
    }
    for dir in dirs {
        std::fs::File::open(&dir)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io("syncing blob directories", e))?;
    }
    Ok(())
}

/// Writes pending access times, then evicts down to the low-water mark.
fn maintain(core: &Core) -> Result<(), Error> {
    flush_touches(core)?;
    let low_water = core.max_bytes / 100 * LOW_WATER_PERCENT;
    if core.total_bytes.load(Ordering::Relaxed) > core.max_bytes {
        while core.total_bytes.load(Ordering::Relaxed) > low_water {
            if evict_round(core, low_water)? == 0 {
                tracing::warn!(
                    total_bytes = core.total_bytes.load(Ordering::Relaxed),
                    max_bytes = core.max_bytes,
                    "CAS is over its size bound but every remaining blob is in use"
                );
                break;
            }
        }
    }
    Ok(())
}

fn flush_touches(core: &Core) -> Result<(), Error> {
    let touched: Vec<Digest> = {
        let mut set = core.touched.lock().unwrap_or_else(|e| e.into_inner());
        set.drain().collect()
    };
    if touched.is_empty() {
        return Ok(());
    }
    let now = now_secs();
    let txn = db!("writing access times", core.db.begin_write())?;
    {
        let mut blobs = db!("writing access times", txn.open_table(BLOBS))?;
        let mut lru = db!("writing access times", txn.open_table(LRU))?;
        for d in touched {
            let key = layout::key(&d);
            let old = db!("writing access times", blobs.get(&key))?.map(|v| v.value());
            let Some((size, atime)) = old else { continue };
            if atime >= now {
                continue;
            }
            db!("writing access times", lru.remove((atime, &key)))?;
            db!("writing access times", lru.insert((now, &key), ()))?;
            db!("writing access times", blobs.insert(&key, (size, now)))?;
        }
    }
    // Access times only order eviction; losing the last second of them in a
    // crash is harmless, so this commit does not wait for the disk.
    let mut txn = txn;
    db!(
        "writing access times",
        txn.set_durability(redb::Durability::None)
    )?;
    core.unsynced.store(true, Ordering::Relaxed);
    db!("writing access times", txn.commit())
}

/// An empty commit that waits for the disk, making every earlier one
/// durable.
fn sync_commits(core: &Core) -> Result<(), Error> {
    let txn = db!("syncing the index", core.db.begin_write())?;
    db!("syncing the index", txn.commit())
}

/// Evicts one round of least recently used blobs; returns how many.
fn evict_round(core: &Core, low_water: u64) -> Result<usize, Error> {
    let mut candidates = Vec::new();
    {
        let txn = db!("choosing blobs to evict", core.db.begin_read())?;
        let lru = db!("choosing blobs to evict", txn.open_table(LRU))?;
        let blobs = db!("choosing blobs to evict", txn.open_table(BLOBS))?;
        let mut would_free = 0u64;
        let excess = core
            .total_bytes
            .load(Ordering::Relaxed)
            .saturating_sub(low_water);
        for entry in db!("choosing blobs to evict", lru.iter())? {
            let (k, _) = db!("choosing blobs to evict", entry)?;
            let (_, key) = k.value();
            let Some(d) = layout::digest_of_key(key) else {
                continue;
            };
            if core.in_use.is_used(&d) || db!("choosing blobs to evict", blobs.get(key))?.is_none()
            {
                continue;
            }
            candidates.push(d);
            would_free += d.size;
            if candidates.len() >= EVICT_ROUND || would_free >= excess {
                break;
            }
        }
    }
    let victims = core.in_use.claim_for_eviction(candidates);
    if victims.is_empty() {
        return Ok(0);
    }
    let result = (|| -> Result<(), Error> {
        let txn = db!("evicting", core.db.begin_write())?;
        {
            let mut blobs = db!("evicting", txn.open_table(BLOBS))?;
            let mut lru = db!("evicting", txn.open_table(LRU))?;
            let mut stats = db!("evicting", txn.open_table(STATS))?;
            let mut total = db!("evicting", stats.get(TOTAL_BYTES))?.map_or(0, |v| v.value());
            for d in &victims {
                let key = layout::key(d);
                let old = db!("evicting", blobs.remove(&key))?.map(|v| v.value());
                if let Some((size, atime)) = old {
                    db!("evicting", lru.remove((atime, &key)))?;
                    total = total.saturating_sub(size);
                }
            }
            db!("evicting", stats.insert(TOTAL_BYTES, total))?;
            core.total_bytes.store(total, Ordering::Relaxed);
        }
        db!("evicting", txn.commit())
    })();
    if result.is_ok() {
        for d in &victims {
            if let Err(e) = std::fs::remove_file(core.layout.blob(d))
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(digest = %d, error = %e, "cannot delete evicted blob");
            }
        }
        core.evicted
            .fetch_add(victims.len() as u64, Ordering::Relaxed);
        tracing::debug!(count = victims.len(), "evicted blobs");
    }
    core.in_use.finish_eviction(&victims);
    result.map(|()| victims.len())
}

/// Deletes blob files the index does not list: renamed into place by a
/// commit that never finished.
fn sweep_orphans(core: &Core) {
    let Ok(txn) = core.db.begin_read() else {
        return;
    };
    let Ok(blobs) = txn.open_table(BLOBS) else {
        return;
    };
    let mut removed = 0usize;
    for function in SUPPORTED {
        let Ok(fanout) = std::fs::read_dir(core.layout.cas().join(function.name())) else {
            continue;
        };
        for dir in fanout.flatten() {
            let Ok(files) = std::fs::read_dir(dir.path()) else {
                continue;
            };
            for file in files.flatten() {
                let name = file.file_name();
                let listed = name
                    .to_str()
                    .and_then(|n| layout::digest_of_file(function, n))
                    .is_some_and(|d| matches!(blobs.get(&layout::key(&d)), Ok(Some(_))));
                if !listed && std::fs::remove_file(file.path()).is_ok() {
                    removed += 1;
                }
            }
        }
    }
    if removed > 0 {
        tracing::info!(removed, "removed blob files left by an interrupted commit");
    }
}
