//! `google.bytestream` for CAS blobs: streamed reads with offset and limit,
//! resumable writes, and both in `compressed-blobs/zstd` form.
//!
//! An upload is a session keyed by its resource name. A Write stream that
//! breaks leaves the session (and what it received) in place, so the client
//! can ask QueryWriteStatus and resume from the committed size; sessions
//! idle longer than `upload_expiry` are dropped.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use outpost_proto::bytestream::{self, byte_stream_server::ByteStream};
use outpost_proto::digest::Digest;
use outpost_proto::resource::{self, Compressor};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::compression::{self, Decompressor};
use super::{Context, storage_status};
use crate::storage::BlobWriter;

/// Uploads in progress at once; each holds a temp file open.
const MAX_SESSIONS: usize = 4096;

pub struct ByteStreamService {
    ctx: Context,
    uploads: Arc<Uploads>,
    /// Serves running actions' output (`execution::live`).
    scheduler: Option<crate::scheduler::Scheduler>,
}

#[derive(Default)]
struct Uploads {
    sessions: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Session>>>>,
}

struct Session {
    digest: Digest,
    compressor: Compressor,
    writer: Option<Box<dyn BlobWriter>>,
    decompressor: Option<Decompressor>,
    /// Bytes received on the wire (compressed bytes for zstd uploads).
    received: u64,
    /// Set while a chunk is being fed; still set afterwards means the Write
    /// was dropped half-way and the session no longer matches `received`.
    feeding: bool,
    last_used: Instant,
}

impl Session {
    fn new(digest: Digest, compressor: Compressor) -> Session {
        Session {
            digest,
            compressor,
            writer: None,
            decompressor: None,
            received: 0,
            feeding: false,
            last_used: Instant::now(),
        }
    }
}

impl Uploads {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<tokio::sync::Mutex<Session>>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get_or_create(
        &self,
        key: &str,
        digest: Digest,
        compressor: Compressor,
    ) -> Result<Arc<tokio::sync::Mutex<Session>>, Status> {
        let mut sessions = self.lock();
        if let Some(s) = sessions.get(key) {
            return Ok(Arc::clone(s));
        }
        if sessions.len() >= MAX_SESSIONS {
            return Err(Status::resource_exhausted(format!(
                "{MAX_SESSIONS} uploads are already in progress; retry later"
            )));
        }
        let session = Arc::new(tokio::sync::Mutex::new(Session::new(digest, compressor)));
        sessions.insert(key.to_owned(), Arc::clone(&session));
        Ok(session)
    }

    fn get(&self, key: &str) -> Option<Arc<tokio::sync::Mutex<Session>>> {
        self.lock().get(key).cloned()
    }

    fn remove(&self, key: &str) {
        self.lock().remove(key);
    }

    /// Drops sessions nobody wrote to for `expiry`.
    fn expire(&self, expiry: Duration) {
        let mut sessions = self.lock();
        sessions.retain(|_, s| match s.try_lock() {
            Ok(session) => session.last_used.elapsed() < expiry,
            Err(_) => true,
        });
    }
}

/// The session key: the resource name up to the size (metadata after it
/// does not distinguish uploads).
fn session_key(r: &resource::WriteResource) -> String {
    resource::write_name(&r.instance_name, &r.upload_id, &r.digest, r.compressor)
}

type ReadStream = Pin<Box<dyn Stream<Item = Result<bytestream::ReadResponse, Status>> + Send>>;

impl ByteStreamService {
    pub fn new(
        ctx: Context,
        upload_expiry: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Self {
        let uploads = Arc::new(Uploads::default());
        let sweeper = Arc::clone(&uploads);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(30).min(upload_expiry));
            loop {
                tokio::select! {
                    _ = tick.tick() => sweeper.expire(upload_expiry),
                    () = shutdown.cancelled() => return,
                }
            }
        });
        ByteStreamService {
            ctx,
            uploads,
            scheduler: None,
        }
    }

    /// Also serves the live output streams of the scheduler's actions.
    pub fn with_live_output(mut self, scheduler: crate::scheduler::Scheduler) -> Self {
        self.scheduler = Some(scheduler);
        self
    }

    async fn write_session(
        &self,
        session: &mut Session,
        first: bytestream::WriteRequest,
        name: &str,
        stream: &mut Streaming<bytestream::WriteRequest>,
    ) -> Result<WriteOutcome, Status> {
        if session.feeding {
            // A Write died in the middle of a chunk: start over.
            *session = Session::new(session.digest, session.compressor);
        }
        if first.write_offset == 0 && session.received > 0 {
            // The client starts over.
            *session = Session::new(session.digest, session.compressor);
        } else if first.write_offset != session.received as i64 {
            return Ok(WriteOutcome::Interrupted(Status::invalid_argument(
                format!(
                    "write_offset {} does not continue this upload: {} bytes are committed; \
                 resume at {} or restart at 0",
                    first.write_offset, session.received, session.received
                ),
            )));
        }
        let mut next = Some(first);
        loop {
            let Some(msg) = next.take() else {
                return Ok(WriteOutcome::Incomplete);
            };
            if !msg.resource_name.is_empty() && msg.resource_name != name {
                return Ok(WriteOutcome::Interrupted(Status::invalid_argument(
                    format!(
                        "resource_name changed within one Write: {:?} after {name:?}",
                        msg.resource_name
                    ),
                )));
            }
            if msg.write_offset != session.received as i64 {
                return Ok(WriteOutcome::Interrupted(Status::invalid_argument(
                    format!(
                        "write_offset {} skips or rewinds: {} bytes were received so far",
                        msg.write_offset, session.received
                    ),
                )));
            }
            session.last_used = Instant::now();
            if !msg.data.is_empty() {
                session.feeding = true;
                feed(&self.ctx, session, msg.data).await?;
                session.feeding = false;
            }
            if msg.finish_write {
                return Ok(WriteOutcome::Finished);
            }
            next = match stream.message().await {
                Ok(m) => m,
                Err(status) => return Ok(WriteOutcome::Interrupted(status)),
            };
        }
    }
}

enum WriteOutcome {
    Finished,
    /// The client closed the stream without `finish_write`.
    Incomplete,
    /// The stream broke or went wrong (transport error, bad offset); what
    /// arrived so far is kept for a resume.
    Interrupted(Status),
}

/// Appends wire bytes to the session's blob, decompressing if needed.
async fn feed(ctx: &Context, session: &mut Session, data: Bytes) -> Result<(), Status> {
    let digest = session.digest;
    if session.writer.is_none() {
        session.writer = Some(ctx.cas.writer(digest).await.map_err(storage_status)?);
        if session.compressor == Compressor::Zstd {
            session.decompressor =
                Some(Decompressor::new(digest.size).map_err(|e| Status::internal(e.to_string()))?);
        }
    }
    let wire_len = data.len() as u64;
    let pieces = match session.decompressor.take() {
        None => vec![data],
        Some(mut d) => {
            let (d, pieces) = tokio::task::spawn_blocking(move || {
                let pieces = d.feed(&data);
                (d, pieces)
            })
            .await
            .map_err(|_| Status::internal("decompression task failed"))?;
            session.decompressor = Some(d);
            pieces.map_err(|e| Status::invalid_argument(format!("upload of {digest}: {e}")))?
        }
    };
    let writer = session.writer.as_mut().expect("created above");
    for piece in pieces {
        writer.write(piece).await.map_err(storage_status)?;
    }
    session.received += wire_len;
    Ok(())
}

#[tonic::async_trait]
impl ByteStream for ByteStreamService {
    type ReadStream = ReadStream;

    async fn read(
        &self,
        request: Request<bytestream::ReadRequest>,
    ) -> Result<Response<ReadStream>, Status> {
        let req = request.into_inner();
        if req.read_offset < 0 {
            return Err(Status::out_of_range(format!(
                "read_offset {} is negative",
                req.read_offset
            )));
        }
        if req.read_limit < 0 {
            return Err(Status::invalid_argument(format!(
                "read_limit {} is negative",
                req.read_limit
            )));
        }
        let offset = req.read_offset as u64;
        let limit = (req.read_limit > 0).then_some(req.read_limit as u64);
        if let (Some((operation, kind)), Some(scheduler)) = (
            crate::execution::live::parse(&req.resource_name),
            &self.scheduler,
        ) {
            let (ctx, scheduler) = (self.ctx.clone(), scheduler.clone());
            let stream =
                crate::execution::live::read(ctx, scheduler, operation, kind, offset, limit);
            return Ok(Response::new(stream.await?));
        }
        let r = resource::parse_read(&req.resource_name)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let digest = r.digest;
        let not_found = || Status::not_found(format!("blob {digest} is not in the CAS"));
        let to_response =
            |chunk: Result<Bytes, Status>| chunk.map(|data| bytestream::ReadResponse { data });
        match r.compressor {
            Compressor::Identity => {
                if offset > digest.size {
                    return Err(Status::out_of_range(format!(
                        "read_offset {offset} is past the end of blob {digest}"
                    )));
                }
                let blob = self
                    .ctx
                    .cas
                    .read(digest, offset, limit)
                    .await
                    .map_err(storage_status)?;
                let blob = blob.ok_or_else(not_found)?;
                Ok(Response::new(Box::pin(
                    blob.map(|c| c.map_err(storage_status)).map(to_response),
                )))
            }
            Compressor::Zstd => {
                let blob = self
                    .ctx
                    .cas
                    .read(digest, 0, None)
                    .await
                    .map_err(storage_status)?;
                let blob = blob.ok_or_else(not_found)?;
                let compressed = compress_stream(blob, offset, limit, digest);
                Ok(Response::new(Box::pin(compressed.map(to_response))))
            }
        }
    }

    async fn write(
        &self,
        request: Request<Streaming<bytestream::WriteRequest>>,
    ) -> Result<Response<bytestream::WriteResponse>, Status> {
        let mut stream = request.into_inner();
        let first = stream.message().await?.ok_or_else(|| {
            Status::invalid_argument("Write stream ended before its first message")
        })?;
        let name = first.resource_name.clone();
        let r =
            resource::parse_write(&name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let digest = r.digest;
        let max = self.ctx.cas.max_blob_size();
        if digest.size > max {
            return Err(Status::resource_exhausted(format!(
                "blob {digest} is larger than the CAS size bound of {max} bytes"
            )));
        }
        // Already stored: finish at once, as the specification allows.
        let exists = if first.write_offset == 0 {
            self.ctx
                .cas
                .contains(digest)
                .await
                .map_err(storage_status)?
        } else {
            false
        };
        if exists {
            let committed_size = match r.compressor {
                Compressor::Identity => digest.size as i64,
                Compressor::Zstd => -1,
            };
            return Ok(Response::new(bytestream::WriteResponse { committed_size }));
        }
        let key = session_key(&r);
        let session = self.uploads.get_or_create(&key, digest, r.compressor)?;
        let Ok(mut session) = session.try_lock() else {
            return Err(Status::aborted(format!(
                "another Write to upload {} is in progress; wait for it or use a new upload id",
                r.upload_id
            )));
        };
        match self
            .write_session(&mut session, first, &name, &mut stream)
            .await
        {
            Ok(WriteOutcome::Finished) => {}
            Ok(WriteOutcome::Incomplete) => {
                return Err(Status::invalid_argument(format!(
                    "Write stream for {digest} ended without finish_write after {} bytes; \
                     resume at that offset",
                    session.received
                )));
            }
            Ok(WriteOutcome::Interrupted(status)) => return Err(status),
            Err(status) => {
                // Bad data: nothing of this upload is kept.
                self.uploads.remove(&key);
                return Err(status);
            }
        }
        self.uploads.remove(&key);
        let received = session.received;
        if let Some(d) = session.decompressor.take() {
            d.finish()
                .map_err(|e| Status::invalid_argument(format!("upload of {digest}: {e}")))?;
        }
        let writer = match session.writer.take() {
            Some(w) => w,
            // finish_write with no data: only right for the empty blob.
            None => self.ctx.cas.writer(digest).await.map_err(storage_status)?,
        };
        writer.commit().await.map_err(storage_status)?;
        Ok(Response::new(bytestream::WriteResponse {
            committed_size: received as i64,
        }))
    }

    async fn query_write_status(
        &self,
        request: Request<bytestream::QueryWriteStatusRequest>,
    ) -> Result<Response<bytestream::QueryWriteStatusResponse>, Status> {
        let name = request.into_inner().resource_name;
        let r =
            resource::parse_write(&name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if self
            .ctx
            .cas
            .contains(r.digest)
            .await
            .map_err(storage_status)?
        {
            return Ok(Response::new(bytestream::QueryWriteStatusResponse {
                committed_size: r.digest.size as i64,
                complete: true,
            }));
        }
        let committed_size = match self.uploads.get(&session_key(&r)) {
            Some(session) => match session.try_lock() {
                Ok(s) if s.feeding => 0,
                Ok(s) => s.received as i64,
                Err(_) => {
                    return Err(Status::unavailable(
                        "a Write to this upload is still in progress; query again when it ends",
                    ));
                }
            },
            None => 0,
        };
        Ok(Response::new(bytestream::QueryWriteStatusResponse {
            committed_size,
            complete: false,
        }))
    }
}

/// The part of a compressed stream a read asked for: `skip` bytes dropped,
/// at most `left` bytes passed on.
struct Window {
    skip: u64,
    left: u64,
    seen: u64,
}

impl Window {
    fn cut(&mut self, mut chunk: Bytes) -> Bytes {
        self.seen += chunk.len() as u64;
        let n = self.skip.min(chunk.len() as u64);
        self.skip -= n;
        chunk = chunk.slice(n as usize..);
        if self.left < chunk.len() as u64 {
            chunk.truncate(self.left as usize);
        }
        self.left -= chunk.len() as u64;
        chunk
    }
}

/// zstd-compresses a blob stream chunk by chunk on blocking threads and
/// applies the read's offset and limit, which count compressed bytes.
fn compress_stream(
    blob: crate::storage::BlobStream,
    offset: u64,
    limit: Option<u64>,
    digest: Digest,
) -> impl Stream<Item = Result<Bytes, Status>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::spawn(async move {
        let mut blob = blob;
        let mut window = Window {
            skip: offset,
            left: limit.unwrap_or(u64::MAX),
            seen: 0,
        };
        let mut encoder = match compression::Compressor::new() {
            Ok(e) => e,
            Err(e) => {
                let _ = tx
                    .send(Err(Status::internal(format!("zstd encoder: {e}"))))
                    .await;
                return;
            }
        };
        loop {
            let next = blob.next().await;
            let done = next.is_none();
            let step = match next {
                Some(Err(e)) => {
                    let _ = tx.send(Err(storage_status(e))).await;
                    return;
                }
                Some(Ok(chunk)) => {
                    tokio::task::spawn_blocking(move || {
                        let out = encoder.feed(&chunk);
                        (encoder, out)
                    })
                    .await
                }
                None => {
                    tokio::task::spawn_blocking(move || {
                        let out = encoder.finish();
                        (encoder, out)
                    })
                    .await
                }
            };
            let out = match step {
                Ok((e, Ok(out))) => {
                    encoder = e;
                    window.cut(out)
                }
                Ok((_, Err(e))) => {
                    let _ = tx.send(Err(Status::internal(format!("zstd: {e}")))).await;
                    return;
                }
                Err(_) => {
                    let _ = tx
                        .send(Err(Status::internal("compression task failed")))
                        .await;
                    return;
                }
            };
            if !out.is_empty() && tx.send(Ok(out)).await.is_err() {
                return;
            }
            if done || window.left == 0 {
                break;
            }
        }
        if window.seen < offset {
            let _ = tx
                .send(Err(Status::out_of_range(format!(
                    "read_offset {offset} is past the end of compressed blob {digest} ({} bytes)",
                    window.seen
                ))))
                .await;
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
