//! Storage: the CAS and the Action Cache behind traits, so that a shared
//! backend (Redis, an S3-compatible object store) can stand in for the
//! embedded one. Only this module names a storage engine.
//!
//! Contract every backend keeps:
//! - a blob is reported present only once its bytes are verified against
//!   its digest and durable;
//! - the empty blob is always present;
//! - a blob that is being read, written or is pinned is never evicted.

pub mod embedded;

/// Seconds since the epoch, the clock storage records times in.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

use std::any::Any;
use std::pin::Pin as StdPin;

use async_trait::async_trait;
use bytes::Bytes;
use outpost_proto::digest::Digest;
use tokio_stream::Stream;

/// Blob bytes in chunks, as a backend streams them.
pub type BlobStream = StdPin<Box<dyn Stream<Item = Result<Bytes, Error>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("blob {0:?} is not in the CAS")]
    NotFound(Digest),
    #[error("data for {expected:?} hashes to {actual:?}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("{received} bytes sent for {digest:?}, which declares {} bytes", .digest.size)]
    SizeMismatch { digest: Digest, received: u64 },
    #[error("blob {digest:?} is larger than the CAS size bound of {max} bytes")]
    TooLarge { digest: Digest, max: u64 },
    #[error("no space left on the storage device while storing {context}")]
    NoSpace { context: String },
    #[error("storage i/o error while {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("storage database error while {context}: {message}")]
    Database { context: String, message: String },
    #[error("storage is shutting down")]
    Closed,
}

impl Error {
    /// Wraps an I/O error, recognising a full disk.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        let context = context.into();
        if source.kind() == std::io::ErrorKind::StorageFull
            || source.raw_os_error() == Some(28 /* ENOSPC */)
            || source.kind() == std::io::ErrorKind::QuotaExceeded
        {
            Error::NoSpace { context }
        } else {
            Error::Io { context, source }
        }
    }
}

/// Keeps blobs from being evicted while it lives. Obtained from
/// [`Cas::pin`]; dropping it releases the pins.
pub struct Pin(#[allow(dead_code)] Box<dyn Any + Send + Sync>);

impl Pin {
    pub fn new(inner: impl Any + Send + Sync) -> Pin {
        Pin(Box::new(inner))
    }
}

/// Writes one blob; nothing is visible until [`BlobWriter::commit`] verified
/// it. Dropping an uncommitted writer discards what was written.
#[async_trait]
pub trait BlobWriter: Send {
    /// Appends bytes. Fails once more bytes arrive than the digest declares.
    async fn write(&mut self, data: Bytes) -> Result<(), Error>;
    /// Bytes accepted so far.
    fn written(&self) -> u64;
    /// Verifies size and hash, makes the blob durable and present.
    async fn commit(self: Box<Self>) -> Result<(), Error>;
}

/// The content-addressable storage.
#[async_trait]
pub trait Cas: Send + Sync + 'static {
    /// Returns the digests that are not present, in the order they were
    /// asked; refreshes the others in the eviction order.
    async fn find_missing(&self, digests: Vec<Digest>) -> Result<Vec<Digest>, Error>;
    /// Streams `limit` bytes (all if `None`) from `offset`; `None` when the
    /// blob is absent. The caller checked `offset <= size`.
    async fn read(
        &self,
        digest: Digest,
        offset: u64,
        limit: Option<u64>,
    ) -> Result<Option<BlobStream>, Error>;
    /// Reads a whole small blob into memory; `None` when absent.
    async fn read_all(&self, digest: Digest) -> Result<Option<Bytes>, Error>;
    /// Starts writing a blob.
    async fn writer(&self, digest: Digest) -> Result<Box<dyn BlobWriter>, Error>;
    /// Keeps `digests` from eviction until the returned [`Pin`] is dropped.
    fn pin(&self, digests: &[Digest]) -> Pin;
    /// The size bound, so callers can refuse a blob early.
    fn max_blob_size(&self) -> u64;

    /// Verifies and stores a blob held in memory.
    async fn put(&self, digest: Digest, data: Bytes) -> Result<(), Error> {
        let mut writer = self.writer(digest).await?;
        writer.write(data).await?;
        writer.commit().await
    }

    async fn contains(&self, digest: Digest) -> Result<bool, Error> {
        Ok(self.find_missing(vec![digest]).await?.is_empty())
    }
}

/// What the coordinator remembers of its agents across restarts, so that
/// "no agent could ever run this" is judged against the recent fleet, not
/// just the agents that reconnected so far. Storage does not interpret the
/// capabilities.
#[async_trait]
pub trait FleetMemory: Send + Sync + 'static {
    /// Records an agent's encoded capabilities and when it was last seen
    /// (seconds since the epoch).
    async fn remember_agent(
        &self,
        agent_id: &str,
        capabilities: Bytes,
        seen_at: u64,
    ) -> Result<(), Error>;
    /// Every remembered agent: (id, capabilities, last seen).
    async fn recall_agents(&self) -> Result<Vec<(String, Bytes, u64)>, Error>;
}

/// The Action Cache: encoded `ActionResult`s keyed by instance name and
/// action digest. Storage does not interpret them.
#[async_trait]
pub trait ActionCache: Send + Sync + 'static {
    async fn get_action_result(
        &self,
        instance_name: &str,
        action: Digest,
    ) -> Result<Option<Bytes>, Error>;
    /// Stores a result a client sent; durable before it returns (the
    /// client was told it is stored).
    async fn update_action_result(
        &self,
        instance_name: &str,
        action: Digest,
        result: Bytes,
    ) -> Result<(), Error>;

    /// Stores a result of an action this coordinator ran. Readers see it
    /// once this returns, but it need not survive a crash (a lost entry
    /// only means the action runs again), so it does not wait for the disk.
    async fn record_action_result(
        &self,
        instance_name: &str,
        action: Digest,
        result: Bytes,
    ) -> Result<(), Error> {
        self.update_action_result(instance_name, action, result)
            .await
    }
}
