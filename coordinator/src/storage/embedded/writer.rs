//! Streams one blob into a temp file while hashing it; commit verifies and
//! hands the file to the committer.

use std::io::Write;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use outpost_proto::digest::{Digest, Hasher};
use tokio::sync::oneshot;

use super::Shared;
use super::index::Request;
use super::temp::TempFile;
use crate::storage::{BlobWriter, Error};

/// Bytes gathered before a blocking write+hash step: large enough that the
/// hop to a blocking thread is noise, small enough to keep memory flat.
const FLUSH_AT: usize = 1 << 20;

pub struct Writer {
    shared: Arc<Shared>,
    digest: Digest,
    /// `None` after a failed step: the writer is then unusable.
    state: Option<State>,
    pending: Vec<Bytes>,
    pending_len: usize,
    written: u64,
}

struct State {
    hasher: Hasher,
    /// Created on the first flush, so tiny and empty blobs stay cheap.
    file: Option<(TempFile, std::fs::File)>,
}

impl Writer {
    pub fn new(shared: Arc<Shared>, digest: Digest) -> Writer {
        Writer {
            shared,
            digest,
            state: Some(State {
                hasher: digest.function.hasher(),
                file: None,
            }),
            pending: Vec::new(),
            pending_len: 0,
            written: 0,
        }
    }

    async fn flush(&mut self) -> Result<(), Error> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut state = self.state.take().ok_or(Error::Closed)?;
        let chunks = std::mem::take(&mut self.pending);
        self.pending_len = 0;
        let tmp_dir = self.shared.core.layout.tmp_for(&self.digest);
        let digest = self.digest;
        let state = tokio::task::spawn_blocking(move || -> Result<State, Error> {
            if state.file.is_none() {
                state.file = Some(TempFile::create(&tmp_dir)?);
            }
            let (_, file) = state.file.as_mut().expect("created above");
            for chunk in &chunks {
                state.hasher.update(chunk);
                file.write_all(chunk)
                    .map_err(|e| Error::io(format!("writing {digest:?}"), e))?;
            }
            Ok(state)
        })
        .await
        .map_err(|_| Error::Closed)??;
        self.state = Some(state);
        Ok(())
    }
}

#[async_trait]
impl BlobWriter for Writer {
    async fn write(&mut self, data: Bytes) -> Result<(), Error> {
        if self.state.is_none() {
            return Err(Error::Closed);
        }
        let received = self.written + data.len() as u64;
        if received > self.digest.size {
            self.state = None;
            return Err(Error::SizeMismatch {
                digest: self.digest,
                received,
            });
        }
        self.written = received;
        self.pending_len += data.len();
        self.pending.push(data);
        if self.pending_len >= FLUSH_AT {
            self.flush().await?;
        }
        Ok(())
    }

    fn written(&self) -> u64 {
        self.written
    }

    async fn commit(mut self: Box<Self>) -> Result<(), Error> {
        if self.written != self.digest.size {
            return Err(Error::SizeMismatch {
                digest: self.digest,
                received: self.written,
            });
        }
        self.flush().await?;
        let state = self.state.take().ok_or(Error::Closed)?;
        let actual = state.hasher.finish_with_size(self.written);
        if actual != self.digest {
            return Err(Error::DigestMismatch {
                expected: self.digest,
                actual,
            });
        }
        let Some((temp, file)) = state.file else {
            // Only the empty blob has no file; it is always present.
            return Ok(());
        };
        drop(file);
        self.shared.submit(self.digest, temp).await
    }
}

impl super::Shared {
    /// Hands a verified temp file to the committer and waits until the blob
    /// is durable and indexed.
    pub(super) async fn submit(&self, digest: Digest, temp: TempFile) -> Result<(), Error> {
        let (reply, done) = oneshot::channel();
        self.commits
            .send(Request::Blob {
                digest,
                temp,
                reply,
            })
            .await
            .map_err(|_| Error::Closed)?;
        done.await.map_err(|_| Error::Closed)?
    }
}
