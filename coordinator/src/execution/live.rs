//! Live output: the stdout and stderr of running actions, readable with
//! ByteStream Read under the names `ExecuteOperationMetadata` gives
//! (`stdout_stream_name`, `stderr_stream_name`) while the action runs.
//!
//! Names are `operations/ID/streams/stdout` and `.../stderr`: no segment is
//! `blobs`, `compressed-blobs` or `uploads`, and `operations` is reserved in
//! REAPI instance names, so a stream name is never a blob's resource name.
//!
//! Agents with the "live-output" feature send chunks over the fleet stream
//! (`OutputChunk`), bounded in rate; the scheduler checks the lease and
//! hands them to [`Live`], which keeps the newest [`WINDOW`] bytes of each
//! stream of each running attempt, in memory only. A read follows the
//! output from its offset as it comes and ends when the action ends: what
//! it has not read by then comes from the result's stdout (stderr) blob,
//! so a read from 0 to the end is always that blob, byte for byte. Bytes
//! the agent skipped under its rate bound, or that fell out of the window,
//! are never guessed: a reader that reaches them waits for the end and
//! goes on from the blob. An action that runs again (its agent was lost)
//! starts a new stream: a reader in the middle of the old one gets
//! ABORTED and may read again from 0.
//!
//! Retention: a stream's bytes are dropped when its lease ends; after
//! that the name serves the blobs for as long as the operation is known
//! (`keep_finished`). A reader counts as a client waiting on the
//! operation while it reads.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use outpost_proto::bytestream;
use outpost_proto::digest::Digest;
use outpost_proto::fleet::{self, OutputStream};
use tokio::sync::watch;
use tokio_stream::{Stream, StreamExt as _};
use tonic::Status;

use crate::scheduler::{Scheduler, Stage, Waiter};
use crate::service::{Context, storage_status};

/// The newest bytes kept of each stream of a running action.
pub const WINDOW: usize = 1 << 20;
/// The most bytes one ReadResponse carries.
const READ_CHUNK: usize = 64 << 10;

/// stdout or stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Stdout,
    Stderr,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Stdout => "stdout",
            Kind::Stderr => "stderr",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    fn of(stream: i32) -> Option<Kind> {
        match OutputStream::try_from(stream).ok()? {
            OutputStream::Stdout => Some(Kind::Stdout),
            OutputStream::Stderr => Some(Kind::Stderr),
            OutputStream::Unspecified => None,
        }
    }
}

/// The ByteStream name of an operation's live stdout or stderr.
pub fn stream_name(operation: &str, kind: Kind) -> String {
    format!("{operation}/streams/{}", kind.name())
}

/// The operation and stream a live stream name names; `None` for any
/// other resource name (a blob's, say).
pub fn parse(name: &str) -> Option<(String, Kind)> {
    let (operation, kind) = if let Some(op) = name.strip_suffix("/streams/stdout") {
        (op, Kind::Stdout)
    } else {
        (name.strip_suffix("/streams/stderr")?, Kind::Stderr)
    };
    let id = operation.strip_prefix("operations/")?;
    (!id.is_empty() && !id.contains('/')).then(|| (operation.to_owned(), kind))
}

/// The bytes `[start, start + data.len())` of one stream.
#[derive(Default)]
struct Window {
    start: u64,
    data: Vec<u8>,
}

impl Window {
    fn end(&self) -> u64 {
        self.start + self.data.len() as u64
    }

    fn append(&mut self, offset: u64, data: &[u8]) {
        let end = self.end();
        if offset > end {
            // The agent skipped bytes: what came before the gap can no
            // longer be followed on, so the window starts again here.
            self.start = offset;
            self.data.clear();
            self.data.extend_from_slice(data);
        } else {
            // Bytes already held (a chunk sent again) are skipped.
            let skip = usize::try_from(end - offset).unwrap_or(usize::MAX);
            if skip < data.len() {
                self.data.extend_from_slice(&data[skip..]);
            }
        }
        if self.data.len() > WINDOW {
            let drop = self.data.len() - WINDOW;
            self.data.drain(..drop);
            self.start += drop as u64;
        }
    }
}

/// What a reader at some offset can have now.
enum Now {
    Bytes(Bytes),
    /// Nothing yet at this offset.
    Wait,
    /// The offset is before what is kept: only the final blob has it.
    Gone,
}

/// One running attempt's output.
pub struct Entry {
    lease: String,
    agent: String,
    windows: Mutex<[Window; 2]>,
    changed: watch::Sender<()>,
}

impl Entry {
    fn windows(&self) -> std::sync::MutexGuard<'_, [Window; 2]> {
        self.windows.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn at(&self, kind: Kind, offset: u64) -> Now {
        let windows = self.windows();
        let w = &windows[kind.index()];
        if offset < w.start {
            Now::Gone
        } else if offset >= w.end() {
            Now::Wait
        } else {
            let from = usize::try_from(offset - w.start).unwrap_or(usize::MAX);
            let to = w.data.len().min(from + READ_CHUNK);
            Now::Bytes(Bytes::copy_from_slice(&w.data[from..to]))
        }
    }
}

/// A running action's output as the status page lists it.
#[derive(Clone, Debug)]
pub struct Running {
    pub operation: String,
    pub agent: String,
    /// Bytes of stdout and stderr produced so far (as far as they came).
    pub stdout: u64,
    pub stderr: u64,
}

/// The live output of every running action that streams it.
pub struct Live {
    entries: Mutex<HashMap<String, Arc<Entry>>>,
    /// Bumped when an entry comes or goes, for readers waiting on one.
    generation: watch::Sender<u64>,
}

impl Default for Live {
    fn default() -> Self {
        Live {
            entries: Mutex::default(),
            generation: watch::channel(0).0,
        }
    }
}

impl Live {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Entry>>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a chunk of `operation`'s current lease (the scheduler checked
    /// that `agent` holds it). A chunk of a new lease starts over.
    pub fn append(&self, operation: &str, agent: &str, chunk: &fleet::OutputChunk) {
        let Some(kind) = Kind::of(chunk.stream) else {
            return;
        };
        let entry = {
            let mut entries = self.entries();
            let current = entries
                .get(operation)
                .filter(|e| e.lease == chunk.lease_id)
                .cloned();
            match current {
                Some(entry) => entry,
                None => {
                    let entry = Arc::new(Entry {
                        lease: chunk.lease_id.clone(),
                        agent: agent.to_owned(),
                        windows: Mutex::default(),
                        changed: watch::channel(()).0,
                    });
                    entries.insert(operation.to_owned(), Arc::clone(&entry));
                    self.generation.send_modify(|g| *g += 1);
                    entry
                }
            }
        };
        entry.windows()[kind.index()].append(chunk.offset, &chunk.data);
        entry.changed.send_replace(());
    }

    /// The lease running `operation` ended: its bytes go.
    pub fn end(&self, operation: &str) {
        if self.entries().remove(operation).is_some() {
            self.generation.send_modify(|g| *g += 1);
        }
    }

    fn get(&self, operation: &str) -> Option<Arc<Entry>> {
        self.entries().get(operation).cloned()
    }

    /// Every streaming action, by operation name.
    pub fn running(&self) -> Vec<Running> {
        let mut list: Vec<Running> = self
            .entries()
            .iter()
            .map(|(op, e)| {
                let w = e.windows();
                Running {
                    operation: op.clone(),
                    agent: e.agent.clone(),
                    stdout: w[0].end(),
                    stderr: w[1].end(),
                }
            })
            .collect();
        list.sort_by(|a, b| a.operation.cmp(&b.operation));
        list
    }

    /// What is held of a running action's stream now: its first byte's
    /// offset and the bytes (for the status page).
    pub fn held(&self, operation: &str, kind: Kind) -> Option<(u64, Bytes)> {
        let entry = self.get(operation)?;
        let w = &entry.windows()[kind.index()];
        Some((w.start, Bytes::copy_from_slice(&w.data)))
    }
}

type ReadStream = Pin<Box<dyn Stream<Item = Result<bytestream::ReadResponse, Status>> + Send>>;

/// ByteStream Read of a live stream name: follows the output from `offset`
/// (at most `limit` bytes) until the action ends, then the rest from its
/// blob.
pub async fn read(
    ctx: Context,
    scheduler: Scheduler,
    operation: String,
    kind: Kind,
    offset: u64,
    limit: Option<u64>,
) -> Result<ReadStream, Status> {
    let waiter = scheduler.attach(&operation).await?.ok_or_else(|| {
        Status::not_found(format!(
            "operation {} is not known (it finished too long ago, or the coordinator restarted)",
            outpost_proto::quote::quoted(&operation)
        ))
    })?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let reader = Reader {
        ctx,
        live: scheduler.live(),
        waiter,
        operation,
        kind,
        offset,
        left: limit.unwrap_or(u64::MAX),
        lease: None,
        tx,
    };
    tokio::spawn(reader.run());
    Ok(Box::pin(
        tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(|r| r.map(|data| bytestream::ReadResponse { data })),
    ))
}

struct Reader {
    ctx: Context,
    live: Arc<Live>,
    waiter: Waiter,
    operation: String,
    kind: Kind,
    offset: u64,
    /// Bytes the read may still return.
    left: u64,
    /// The lease whose bytes this read has followed, once it has some.
    lease: Option<String>,
    tx: tokio::sync::mpsc::Sender<Result<Bytes, Status>>,
}

impl Reader {
    async fn run(mut self) {
        if let Err(status) = self.follow().await {
            let _ = self.tx.send(Err(status)).await;
        }
    }

    async fn send(&mut self, mut data: Bytes) -> Result<bool, Status> {
        if data.len() as u64 > self.left {
            data.truncate(usize::try_from(self.left).unwrap_or(usize::MAX));
        }
        self.offset += data.len() as u64;
        self.left -= data.len() as u64;
        if self.tx.send(Ok(data)).await.is_err() {
            // The client went away.
            return Ok(false);
        }
        Ok(self.left > 0)
    }

    async fn follow(&mut self) -> Result<(), Status> {
        let mut generation = self.live.generation.subscribe();
        loop {
            if self.waiter.state.borrow_and_update().stage == Stage::Completed {
                return self.rest_of_blob().await;
            }
            let entry = self.live.get(&self.operation);
            if let (Some(entry), Some(lease)) = (&entry, &self.lease)
                && entry.lease != *lease
            {
                return Err(Status::aborted(format!(
                    "operation {} runs again on another agent; read its output again from offset 0",
                    self.operation
                )));
            }
            let mut changed = entry.as_ref().map(|e| e.changed.subscribe());
            let now = entry
                .as_ref()
                .map_or(Now::Wait, |e| e.at(self.kind, self.offset));
            if let Now::Bytes(data) = now {
                self.lease = entry.as_ref().map(|e| e.lease.clone());
                if !self.send(data).await? {
                    return Ok(());
                }
                continue;
            }
            // Nothing to read yet (or only the blob has it): wait for more
            // output, a new attempt, or the end.
            let more = async {
                match (&mut changed, &now) {
                    (Some(rx), Now::Wait) => {
                        let _ = rx.changed().await;
                    }
                    _ => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = more => {}
                _ = generation.changed() => {}
                changed = self.waiter.state.changed() => {
                    if changed.is_err() {
                        return Err(Status::unavailable("the coordinator is shutting down"));
                    }
                }
                () = self.tx.closed() => return Ok(()),
            }
        }
    }

    /// The action ended: the rest comes from its stdout (stderr) blob.
    async fn rest_of_blob(&mut self) -> Result<(), Status> {
        let state = self.waiter.state.borrow().clone();
        let response = state.response.as_deref().cloned().unwrap_or_default();
        let Some(result) = response.result else {
            let why = response
                .status
                .map(|s| s.message)
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| "it did not run".to_owned());
            return Err(Status::not_found(format!(
                "operation {} has no {}: {why}",
                self.operation,
                self.kind.name()
            )));
        };
        let field = match self.kind {
            Kind::Stdout => result.stdout_digest,
            Kind::Stderr => result.stderr_digest,
        };
        let digest = match field {
            Some(d) => Digest::from_proto(&d, state.action_digest.function)
                .map_err(|e| Status::internal(format!("the result's digest: {e}")))?,
            None => state.action_digest.function.digest_of(&[]),
        };
        if self.offset > digest.size {
            return Err(Status::out_of_range(format!(
                "read_offset {} is past the end of the {} ({} bytes)",
                self.offset,
                self.kind.name(),
                digest.size
            )));
        }
        if self.offset == digest.size || self.left == 0 {
            return Ok(());
        }
        let limit = (self.left != u64::MAX).then_some(self.left);
        let mut blob = self
            .ctx
            .cas
            .read(digest, self.offset, limit)
            .await
            .map_err(storage_status)?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "the {} of operation {} ({digest}) is no longer in the CAS",
                    self.kind.name(),
                    self.operation
                ))
            })?;
        while let Some(chunk) = blob.next().await {
            let chunk = chunk.map_err(storage_status)?;
            if self.tx.send(Ok(chunk)).await.is_err() {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// The most bytes of a finished action's output the HTTP view shows.
const MAX_VIEW: u64 = 16 << 20;

/// `GET /live/operations/{id}/{stdout|stderr}`: what there is of an
/// operation's output now, as text (the status page links it, and
/// `outpost logs` without `--follow` prints it). A running action's
/// window, marked when its start is no longer kept; a finished one's whole
/// blob.
pub fn routes(scheduler: Scheduler, cas: Arc<dyn crate::storage::Cas>) -> axum::Router {
    use axum::extract::Path;
    use axum::http::StatusCode;
    let view = move |Path((id, stream)): Path<(String, String)>| {
        let (scheduler, cas) = (scheduler.clone(), Arc::clone(&cas));
        async move {
            let operation = format!("operations/{id}");
            let kind = parse(&format!("{operation}/streams/{stream}"))
                .map(|(_, kind)| kind)
                .ok_or_else(|| {
                    (
                        StatusCode::NOT_FOUND,
                        format!("no stream {stream:?}: stdout or stderr\n"),
                    )
                })?;
            let state = scheduler
                .attach(&operation)
                .await
                .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")))?
                .map(|w| w.state.borrow().clone())
                .ok_or_else(|| {
                    (
                        StatusCode::NOT_FOUND,
                        format!("operation {operation} is not known\n"),
                    )
                })?;
            let text: Vec<u8> = if state.stage != Stage::Completed {
                match scheduler.live().held(&operation, kind) {
                    None => Vec::new(),
                    Some((0, bytes)) => bytes.to_vec(),
                    Some((start, bytes)) => {
                        let mut text = format!(
                            "[outpost: the first {start} bytes are not kept while the action runs; \
                             its result has them all]\n"
                        )
                        .into_bytes();
                        text.extend_from_slice(&bytes);
                        text
                    }
                }
            } else {
                let result = state
                    .response
                    .as_ref()
                    .and_then(|r| r.result.clone())
                    .unwrap_or_default();
                let field = match kind {
                    Kind::Stdout => result.stdout_digest,
                    Kind::Stderr => result.stderr_digest,
                };
                let Some(digest) =
                    field.and_then(|d| Digest::from_proto(&d, state.action_digest.function).ok())
                else {
                    return Ok(String::new());
                };
                if digest.size > MAX_VIEW {
                    return Err((
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("{digest} is too large to show\n"),
                    ));
                }
                cas.read_all(digest)
                    .await
                    .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")))?
                    .ok_or_else(|| {
                        (
                            StatusCode::NOT_FOUND,
                            format!("{digest} is no longer in the CAS\n"),
                        )
                    })?
                    .to_vec()
            };
            Ok::<_, (StatusCode, String)>(String::from_utf8_lossy(&text).into_owned())
        }
    };
    axum::Router::new().route("/live/operations/{id}/{stream}", axum::routing::get(view))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names_are_never_blob_names() {
        for kind in [Kind::Stdout, Kind::Stderr] {
            let name = stream_name("operations/abc123", kind);
            assert_eq!(parse(&name), Some(("operations/abc123".to_owned(), kind)));
            assert!(
                outpost_proto::resource::parse_read(&name).is_err(),
                "{name}"
            );
        }
        let blob = format!("blobs/{}/0", "0".repeat(64));
        assert_eq!(parse(&blob), None);
        for other in [
            "operations//streams/stdout",
            "operations/a/b/streams/stdout",
            "x/operations/a/streams/stdout",
            "operations/a/streams/stdin",
            "operations/a/streams/stdout/",
        ] {
            assert_eq!(parse(other), None, "{other}");
        }
    }

    fn chunk(lease: &str, offset: u64, data: &str) -> fleet::OutputChunk {
        fleet::OutputChunk {
            lease_id: lease.to_owned(),
            stream: OutputStream::Stdout as i32,
            offset,
            data: Bytes::copy_from_slice(data.as_bytes()),
        }
    }

    fn text(now: Now) -> String {
        match now {
            Now::Bytes(b) => String::from_utf8_lossy(&b).into_owned(),
            Now::Wait => "<wait>".to_owned(),
            Now::Gone => "<gone>".to_owned(),
        }
    }

    #[test]
    fn chunks_are_kept_at_their_offsets_and_gaps_are_never_filled() {
        let live = Live::default();
        live.append("operations/a", "agent", &chunk("l1", 0, "one\n"));
        live.append("operations/a", "agent", &chunk("l1", 4, "two\n"));
        // Sent again: not doubled.
        live.append("operations/a", "agent", &chunk("l1", 0, "one\ntw"));
        let entry = live.get("operations/a").expect("an entry");
        assert_eq!(text(entry.at(Kind::Stdout, 0)), "one\ntwo\n");
        assert_eq!(text(entry.at(Kind::Stdout, 4)), "two\n");
        assert_eq!(text(entry.at(Kind::Stdout, 8)), "<wait>");
        assert_eq!(text(entry.at(Kind::Stderr, 0)), "<wait>");
        // The agent skipped bytes 8..100: a reader before the gap gets
        // nothing made up.
        live.append("operations/a", "agent", &chunk("l1", 100, "later\n"));
        assert_eq!(text(entry.at(Kind::Stdout, 0)), "<gone>");
        assert_eq!(text(entry.at(Kind::Stdout, 100)), "later\n");
        assert_eq!(live.running()[0].stdout, 106);
        // A new lease (the action runs again) starts over.
        live.append("operations/a", "agent2", &chunk("l2", 0, "again\n"));
        let entry = live.get("operations/a").expect("an entry");
        assert_eq!(text(entry.at(Kind::Stdout, 0)), "again\n");
        live.end("operations/a");
        assert!(live.get("operations/a").is_none());
        assert!(live.running().is_empty());
    }

    #[test]
    fn the_window_keeps_the_newest_bytes() {
        let mut w = Window::default();
        let big = vec![b'x'; WINDOW];
        w.append(0, &big);
        w.append(WINDOW as u64, b"tail");
        assert_eq!(w.start, 4);
        assert_eq!(w.end(), WINDOW as u64 + 4);
        assert_eq!(&w.data[w.data.len() - 4..], b"tail");
    }
}
