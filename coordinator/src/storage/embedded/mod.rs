//! The embedded backend: blob bytes as files under the data directory,
//! their index, the LRU order and the Action Cache in redb. Zero setup.
//!
//! Writes go to a temp file, are verified against the digest, then renamed
//! into place and indexed by the single committer ([`index`]); blob bytes
//! never live in the database. Reads stream from the file while an
//! [`in_use::Guard`] keeps eviction away.

mod in_use;
mod index;
mod layout;
mod temp;
mod writer;

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use outpost_proto::digest::Digest;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use self::index::{Core, Request};
use self::layout::Layout;
use super::{ActionCache, BlobStream, BlobWriter, Cas, Error, FleetMemory, Pin};

/// Chunk size of streamed reads.
const READ_CHUNK: usize = 1 << 20;
/// Blobs up to this size are read on the calling task (see `read_all`).
const INLINE_READ: usize = 64 << 10;

/// The embedded store; cheap to clone.
#[derive(Clone)]
pub struct EmbeddedStore {
    shared: Arc<Shared>,
}

struct Shared {
    core: Arc<Core>,
    commits: mpsc::Sender<Request>,
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store under `dir`. The returned task
    /// is the committer; it ends after the last clone of the store is
    /// dropped and pending access times are written.
    pub async fn open(
        dir: PathBuf,
        max_bytes: u64,
    ) -> Result<(EmbeddedStore, JoinHandle<()>), Error> {
        let core = tokio::task::spawn_blocking(move || -> Result<Core, Error> {
            let layout = Layout { root: dir };
            layout.prepare()?;
            let db = index::db!(
                &format!("opening {}", layout.db().display()),
                redb::Database::create(layout.db())
            )?;
            let total = Core::init_db(&db)?;
            Ok(Core {
                layout,
                db,
                in_use: Arc::default(),
                touched: Default::default(),
                total_bytes: AtomicU64::new(total),
                max_bytes,
                evicted: AtomicU64::new(0),
                unsynced: std::sync::atomic::AtomicBool::new(false),
                pending_results: Default::default(),
            })
        })
        .await
        .map_err(|_| Error::Closed)??;
        let core = Arc::new(core);
        let (commits, requests) = mpsc::channel(4096);
        let committer = tokio::spawn(index::run_committer(Arc::clone(&core), requests));
        Ok((
            EmbeddedStore {
                shared: Arc::new(Shared { core, commits }),
            },
            committer,
        ))
    }

    /// Bytes of blobs currently stored.
    pub fn total_bytes(&self) -> u64 {
        self.shared.core.total_bytes.load(Ordering::Relaxed)
    }

    /// Blobs evicted since start-up.
    pub fn evicted_blobs(&self) -> u64 {
        self.shared.core.evicted.load(Ordering::Relaxed)
    }

    fn forget(&self, digest: Digest) {
        tracing::warn!(%digest, "blob file vanished from the data directory; forgetting it");
        let _ = self.shared.commits.try_send(Request::Forget(digest));
    }

    /// Opens a blob for reading at `offset`, holding it in use.
    async fn open_blob(
        &self,
        digest: Digest,
        offset: u64,
    ) -> Result<Option<(std::fs::File, in_use::Guard)>, Error> {
        let core = Arc::clone(&self.shared.core);
        let Some(guard) = core.in_use.try_use(digest) else {
            return Ok(None);
        };
        let opened = tokio::task::spawn_blocking(move || open_file(&core, &digest, offset))
            .await
            .map_err(|_| Error::Closed)?;
        Ok(self.vanished_is_absent(opened)?.map(|file| (file, guard)))
    }

    /// A blob file that vanished (`NotFound` from [`open_file`]) is
    /// forgotten and reported absent.
    fn vanished_is_absent<T>(&self, result: Result<Option<T>, Error>) -> Result<Option<T>, Error> {
        match result {
            Err(Error::NotFound(d)) => {
                self.forget(d);
                Ok(None)
            }
            other => other,
        }
    }
}

/// Opens a present blob's file at `offset`; `NotFound` if the index has it
/// but the file is gone.
fn open_file(core: &Core, digest: &Digest, offset: u64) -> Result<Option<std::fs::File>, Error> {
    if !core.is_present(digest)? {
        return Ok(None);
    }
    let path = core.layout.blob(digest);
    let mut file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NotFound(*digest));
        }
        Err(e) => return Err(Error::io(format!("opening {}", path.display()), e)),
    };
    if offset > 0 {
        file.seek(SeekFrom::Start(offset))
            .map_err(|e| Error::io(format!("seeking in {}", path.display()), e))?;
    }
    Ok(Some(file))
}

fn read_chunk(file: &mut std::fs::File, want: usize, digest: &Digest) -> Result<Bytes, Error> {
    // `read_to_end` reads into the vector's spare capacity without zeroing
    // it first (a measurable share of a large download otherwise).
    let mut buf = Vec::with_capacity(want);
    loop {
        match file
            .by_ref()
            .take((want - buf.len()) as u64)
            .read_to_end(&mut buf)
        {
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(format!("reading {digest:?}"), e)),
        }
    }
    if buf.len() < want {
        return Err(Error::io(
            format!("reading {digest:?}"),
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "blob file is shorter than its digest",
            ),
        ));
    }
    Ok(Bytes::from(buf))
}

#[async_trait]
impl Cas for EmbeddedStore {
    async fn find_missing(&self, digests: Vec<Digest>) -> Result<Vec<Digest>, Error> {
        let core = Arc::clone(&self.shared.core);
        if digests.len() <= 64 {
            return core.find_missing(digests);
        }
        // Large requests are split over the blocking threads (one read
        // transaction each).
        let parts = if digests.len() >= 2048 { 2 } else { 1 };
        let per = digests.len().div_ceil(parts);
        let mut tasks = Vec::new();
        let mut rest = digests;
        while !rest.is_empty() {
            let tail = rest.split_off(per.min(rest.len()));
            let part = std::mem::replace(&mut rest, tail);
            let core = Arc::clone(&core);
            tasks.push(tokio::task::spawn_blocking(move || core.find_missing(part)));
        }
        let mut missing = Vec::new();
        for t in tasks {
            missing.extend(t.await.map_err(|_| Error::Closed)??);
        }
        Ok(missing)
    }

    async fn read(
        &self,
        digest: Digest,
        offset: u64,
        limit: Option<u64>,
    ) -> Result<Option<BlobStream>, Error> {
        let remaining = digest.size.saturating_sub(offset);
        let len = limit.map_or(remaining, |l| l.min(remaining));
        if len == 0 {
            return Ok(if self.shared.core.is_present(&digest)? {
                Some(Box::pin(tokio_stream::empty()))
            } else {
                None
            });
        }
        let Some((mut file, guard)) = self.open_blob(digest, offset).await? else {
            return Ok(None);
        };
        self.shared.core.touch([digest]);
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let _guard = guard;
            let mut left = len;
            while left > 0 {
                let want = usize::try_from(left).unwrap_or(usize::MAX).min(READ_CHUNK);
                let chunk = read_chunk(&mut file, want, &digest);
                let failed = chunk.is_err();
                if tx.blocking_send(chunk).is_err() || failed {
                    return;
                }
                left -= want as u64;
            }
        });
        Ok(Some(Box::pin(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        ))))
    }

    async fn read_all(&self, digest: Digest) -> Result<Option<Bytes>, Error> {
        if digest.is_empty_blob() {
            return Ok(Some(Bytes::new()));
        }
        let len = usize::try_from(digest.size).map_err(|_| Error::TooLarge {
            digest,
            max: usize::MAX as u64,
        })?;
        let core = Arc::clone(&self.shared.core);
        let Some(guard) = core.in_use.try_use(digest) else {
            return Ok(None);
        };
        let read = move || -> Result<Option<Bytes>, Error> {
            let _guard = guard;
            let Some(mut file) = open_file(&core, &digest, 0)? else {
                return Ok(None);
            };
            read_chunk(&mut file, len, &digest).map(Some)
        };
        // Small blobs (Actions, Commands, Directories on the way of every
        // Execute) are read in place: a lookup and a page-cache read take
        // less than handing them to a blocking thread and back.
        let read = if len <= INLINE_READ {
            read()
        } else {
            tokio::task::spawn_blocking(read)
                .await
                .map_err(|_| Error::Closed)?
        };
        let read = self.vanished_is_absent(read)?;
        if read.is_some() {
            self.shared.core.touch([digest]);
        }
        Ok(read)
    }

    async fn writer(&self, digest: Digest) -> Result<Box<dyn BlobWriter>, Error> {
        if digest.size > self.shared.core.max_bytes {
            return Err(Error::TooLarge {
                digest,
                max: self.shared.core.max_bytes,
            });
        }
        Ok(Box::new(writer::Writer::new(
            Arc::clone(&self.shared),
            digest,
        )))
    }

    fn pin(&self, digests: &[Digest]) -> Pin {
        Pin::new(self.shared.core.in_use.pin(digests))
    }

    fn max_blob_size(&self) -> u64 {
        self.shared.core.max_bytes
    }
}

#[async_trait]
impl ActionCache for EmbeddedStore {
    async fn get_action_result(
        &self,
        instance_name: &str,
        action: Digest,
    ) -> Result<Option<Bytes>, Error> {
        self.shared.core.get_action_result(instance_name, &action)
    }

    async fn update_action_result(
        &self,
        instance_name: &str,
        action: Digest,
        result: Bytes,
    ) -> Result<(), Error> {
        self.write_action_result(instance_name, action, result)
            .await
    }

    async fn record_action_result(
        &self,
        instance_name: &str,
        action: Digest,
        result: Bytes,
    ) -> Result<(), Error> {
        // Readers see it at once; the commit follows without anyone
        // waiting (and without reaching the disk before the next sync).
        self.shared
            .core
            .pending_results
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((instance_name.to_owned(), action), result.clone());
        let queued = self
            .queue_action_result(instance_name, action, result.clone(), None)
            .await;
        if queued.is_err() {
            self.shared
                .core
                .settle_pending([((instance_name.to_owned(), action), result)]);
        }
        queued
    }
}

impl EmbeddedStore {
    /// Writes a client's Action Cache entry and waits until it is on disk.
    async fn write_action_result(
        &self,
        instance_name: &str,
        action: Digest,
        result: Bytes,
    ) -> Result<(), Error> {
        let (reply, done) = oneshot::channel();
        self.queue_action_result(instance_name, action, result, Some(reply))
            .await?;
        done.await.map_err(|_| Error::Closed)?
    }

    /// Hands an Action Cache entry to the committer: durable, with a reply
    /// once it is on disk, or (without a reply) as soon as convenient.
    async fn queue_action_result(
        &self,
        instance_name: &str,
        action: Digest,
        result: Bytes,
        reply: Option<oneshot::Sender<Result<(), Error>>>,
    ) -> Result<(), Error> {
        self.shared
            .commits
            .send(Request::ActionResult {
                instance_name: instance_name.to_owned(),
                action,
                result,
                reply,
            })
            .await
            .map_err(|_| Error::Closed)
    }
}

#[async_trait]
impl FleetMemory for EmbeddedStore {
    async fn remember_agent(
        &self,
        agent_id: &str,
        capabilities: Bytes,
        seen_at: u64,
    ) -> Result<(), Error> {
        self.shared
            .commits
            .send(Request::Agent {
                agent_id: agent_id.to_owned(),
                capabilities,
                seen_at,
            })
            .await
            .map_err(|_| Error::Closed)
    }

    async fn recall_agents(&self) -> Result<Vec<(String, Bytes, u64)>, Error> {
        let core = Arc::clone(&self.shared.core);
        tokio::task::spawn_blocking(move || core.recall_agents())
            .await
            .map_err(|_| Error::Closed)?
    }
}

#[cfg(test)]
mod tests;
