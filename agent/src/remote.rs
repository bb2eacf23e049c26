//! The agent's REAPI client for the coordinator's CAS: fetching inputs
//! (verified against their digests) and uploading outputs.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::Transport as Channel;
use bytes::Bytes;
use outpost_proto::bytestream::{self, byte_stream_client::ByteStreamClient};
use outpost_proto::digest::{Digest, Function};
use outpost_proto::reapi::{
    self, content_addressable_storage_client::ContentAddressableStorageClient,
};
use outpost_proto::resource::{self, Compressor};
use prost::Message;
use tokio_stream::StreamExt;

use crate::error::Error;

/// Blobs up to this size travel in batch calls.
const BATCH_BLOB: u64 = 1 << 20;
/// Payload per batch call until the coordinator's limit is known (its
/// default limit is 4 MiB).
const BATCH_TOTAL: u64 = 3 << 20;
const CHUNK: usize = 1 << 20;

#[derive(Clone)]
pub struct Remote {
    cas: ContentAddressableStorageClient<Channel>,
    bytestream: ByteStreamClient<Channel>,
    instance_name: String,
    /// Bytes per batch call: below the coordinator's advertised limit.
    batch_total: Arc<AtomicU64>,
    /// The largest blob the coordinator's CAS takes; 0 until it says.
    max_blob: Arc<AtomicU64>,
}

/// Something to upload: bytes in memory or a file on disk.
pub enum Blob {
    Bytes(Bytes),
    File(PathBuf),
}

impl Remote {
    pub fn new(channel: Channel, instance_name: &str) -> Remote {
        let max = 64 << 20;
        Remote {
            cas: ContentAddressableStorageClient::new(channel.clone())
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
            bytestream: ByteStreamClient::new(channel.clone()).max_decoding_message_size(max),
            instance_name: instance_name.to_owned(),
            batch_total: Arc::new(AtomicU64::new(BATCH_TOTAL)),
            max_blob: Arc::new(AtomicU64::new(0)),
        }
    }

    fn batch_limit(&self) -> u64 {
        self.batch_total.load(Ordering::Relaxed)
    }

    /// Blobs up to this size are read and written with batch calls.
    pub fn batch_blob_limit(&self) -> u64 {
        BATCH_BLOB.min(self.batch_limit())
    }

    /// The largest blob the coordinator's CAS takes, once it said.
    pub fn max_blob_size(&self) -> Option<u64> {
        Some(self.max_blob.load(Ordering::Relaxed)).filter(|&m| m > 0)
    }

    /// Asks the coordinator for its batch limit and its largest blob, and
    /// stays below them.
    pub async fn learn_limits(&self, channel: Channel) {
        let mut caps = reapi::capabilities_client::CapabilitiesClient::new(channel);
        let asked = caps.get_capabilities(reapi::GetCapabilitiesRequest::default());
        let Ok(Ok(response)) =
            tokio::time::timeout(std::time::Duration::from_secs(10), asked).await
        else {
            return;
        };
        let cache = response.into_inner().cache_capabilities.unwrap_or_default();
        self.max_blob.store(
            u64::try_from(cache.max_cas_blob_size_bytes).unwrap_or(0),
            Ordering::Relaxed,
        );
        let advertised = cache.max_batch_total_size_bytes;
        if let Ok(limit) = u64::try_from(advertised)
            && limit > 0
        {
            // Room for the digests and framing around the blobs.
            let total = (limit / 4 * 3).clamp(16 << 10, BATCH_TOTAL);
            self.batch_total.store(total, Ordering::Relaxed);
            // Blobs above the batch size go through ByteStream.
        }
    }

    pub fn with_instance(&self, instance_name: &str) -> Remote {
        Remote {
            instance_name: instance_name.to_owned(),
            ..self.clone()
        }
    }

    pub async fn find_missing(&self, digests: Vec<Digest>) -> Result<Vec<Digest>, Error> {
        let function = digests.first().map_or(Function::Sha256, |d| d.function);
        let mut missing = Vec::new();
        for chunk in digests.chunks(10_000) {
            let response = self
                .cas
                .clone()
                .find_missing_blobs(reapi::FindMissingBlobsRequest {
                    instance_name: self.instance_name.clone(),
                    blob_digests: chunk.iter().map(Digest::to_proto).collect(),
                    digest_function: function.to_proto() as i32,
                })
                .await
                .map_err(|s| Error::remote("checking blobs", s))?;
            for d in response.into_inner().missing_blob_digests {
                missing.push(
                    Digest::from_proto(&d, function).map_err(|e| Error::Protocol(e.to_string()))?,
                );
            }
        }
        Ok(missing)
    }

    /// Reads small blobs with batch calls; every one is verified.
    pub async fn read_batch(&self, digests: &[Digest]) -> Result<HashMap<Digest, Bytes>, Error> {
        let mut out = HashMap::new();
        let mut group = Vec::new();
        let mut size = 0;
        for d in digests {
            if !group.is_empty() && size + d.size > self.batch_limit() {
                self.read_group(&group, &mut out).await?;
                group.clear();
                size = 0;
            }
            group.push(*d);
            size += d.size;
        }
        if !group.is_empty() {
            self.read_group(&group, &mut out).await?;
        }
        Ok(out)
    }

    async fn read_group(
        &self,
        digests: &[Digest],
        out: &mut HashMap<Digest, Bytes>,
    ) -> Result<(), Error> {
        let function = digests[0].function;
        let response = self
            .cas
            .clone()
            .batch_read_blobs(reapi::BatchReadBlobsRequest {
                instance_name: self.instance_name.clone(),
                digests: digests.iter().map(Digest::to_proto).collect(),
                acceptable_compressors: Vec::new(),
                digest_function: function.to_proto() as i32,
            })
            .await
            .map_err(|s| Error::remote("reading inputs", s))?;
        for r in response.into_inner().responses {
            let digest = r
                .digest
                .as_ref()
                .and_then(|d| Digest::from_proto(d, function).ok())
                .ok_or_else(|| {
                    Error::Protocol("a batch read response without a valid digest".into())
                })?;
            match r.status.map_or(0, |s| s.code) {
                0 => {}
                5 => return Err(Error::MissingInput(vec![digest])),
                code => {
                    return Err(Error::Transient(format!(
                        "reading {digest} failed with code {code}"
                    )));
                }
            }
            let actual = function.digest_of(&r.data);
            if actual != digest {
                return Err(Error::Transient(format!(
                    "the coordinator sent wrong bytes for {digest}"
                )));
            }
            out.insert(digest, r.data);
        }
        Ok(())
    }

    /// Reads a small message blob.
    pub async fn read_message<M: Message + Default>(
        &self,
        digest: Digest,
        what: &str,
    ) -> Result<M, Error> {
        let bytes = if digest.size <= self.batch_blob_limit() {
            self.read_batch(&[digest])
                .await?
                .remove(&digest)
                .ok_or_else(|| Error::MissingInput(vec![digest]))?
        } else {
            self.read_bytes(digest).await?
        };
        M::decode(bytes)
            .map_err(|e| Error::BadInput(format!("{what} {digest} does not decode: {e}")))
    }

    async fn read_bytes(&self, digest: Digest) -> Result<Bytes, Error> {
        let mut stream = self.read_stream(digest).await?;
        let mut data = Vec::with_capacity(usize::try_from(digest.size).unwrap_or(0));
        while let Some(msg) = stream.next().await {
            data.extend_from_slice(&msg.map_err(|s| Error::remote("reading an input", s))?.data);
        }
        let actual = digest.function.digest_of(&data);
        if actual != digest {
            return Err(Error::Transient(format!(
                "the coordinator sent wrong bytes for {digest}"
            )));
        }
        Ok(Bytes::from(data))
    }

    async fn read_stream(
        &self,
        digest: Digest,
    ) -> Result<tonic::Streaming<bytestream::ReadResponse>, Error> {
        self.bytestream
            .clone()
            .read(bytestream::ReadRequest {
                resource_name: resource::read_name(
                    &self.instance_name,
                    &digest,
                    Compressor::Identity,
                ),
                read_offset: 0,
                read_limit: 0,
            })
            .await
            .map(|r| r.into_inner())
            .map_err(|s| {
                if s.code() == tonic::Code::NotFound {
                    Error::MissingInput(vec![digest])
                } else {
                    Error::remote("reading an input", s)
                }
            })
    }

    /// Streams a blob into `path` (a new file), verifying it.
    pub async fn read_to_file(&self, digest: Digest, path: &Path) -> Result<(), Error> {
        let mut stream = self.read_stream(digest).await?;
        let file = std::fs::File::create(path)
            .map_err(|e| Error::local(format!("creating {}", path.display()), e))?;
        let mut state = Some((file, digest.function.hasher(), 0u64));
        while let Some(msg) = stream.next().await {
            let data = msg.map_err(|s| Error::remote("reading an input", s))?.data;
            let (mut file, mut hasher, n) = state.take().expect("restored each round");
            let path = path.to_owned();
            state = Some(
                tokio::task::spawn_blocking(move || -> Result<_, Error> {
                    hasher.update(&data);
                    file.write_all(&data)
                        .map_err(|e| Error::local(format!("writing {}", path.display()), e))?;
                    Ok((file, hasher, n + data.len() as u64))
                })
                .await
                .map_err(|_| Error::Retryable("a fetch task failed".into()))??,
            );
        }
        let (_, hasher, n) = state.expect("present");
        let actual = hasher.finish_with_size(n);
        if actual != digest {
            return Err(Error::Transient(format!(
                "the coordinator sent wrong bytes for {digest}"
            )));
        }
        Ok(())
    }

    /// Every directory of a tree, keyed by digest.
    pub async fn get_tree(&self, root: Digest) -> Result<HashMap<Digest, reapi::Directory>, Error> {
        let mut stream = self
            .cas
            .clone()
            .get_tree(reapi::GetTreeRequest {
                instance_name: self.instance_name.clone(),
                root_digest: Some(root.to_proto()),
                page_size: 0,
                page_token: String::new(),
                digest_function: root.function.to_proto() as i32,
            })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::NotFound => Error::MissingInput(vec![root]),
                _ => Error::remote("reading the input tree", s),
            })?
            .into_inner();
        let mut dirs = HashMap::new();
        while let Some(page) = stream.next().await {
            for d in page
                .map_err(|s| Error::remote("reading the input tree", s))?
                .directories
            {
                let digest = root.function.digest_of(&d.encode_to_vec());
                dirs.insert(digest, d);
            }
        }
        Ok(dirs)
    }

    /// Uploads what the CAS does not have yet.
    pub async fn upload(&self, mut blobs: HashMap<Digest, Blob>) -> Result<(), Error> {
        // The empty blob is always present; asking costs a round trip.
        blobs.retain(|d, _| !d.is_empty_blob());
        if blobs.is_empty() {
            return Ok(());
        }
        let missing = self.find_missing(blobs.keys().copied().collect()).await?;
        let mut batch = Vec::new();
        let mut batch_size = 0;
        for digest in missing {
            let Some(blob) = blobs.remove(&digest) else {
                continue;
            };
            if digest.size > self.batch_blob_limit() {
                self.write(digest, blob).await?;
                continue;
            }
            let data = match blob {
                Blob::Bytes(b) => b,
                Blob::File(path) => read_file(&path).await?,
            };
            if batch_size + digest.size > self.batch_limit() {
                self.write_batch(std::mem::take(&mut batch)).await?;
                batch_size = 0;
            }
            batch_size += digest.size;
            batch.push((digest, data));
        }
        self.write_batch(batch).await
    }

    async fn write_batch(&self, blobs: Vec<(Digest, Bytes)>) -> Result<(), Error> {
        let Some((first, _)) = blobs.first() else {
            return Ok(());
        };
        let function = first.function;
        let response = self
            .cas
            .clone()
            .batch_update_blobs(reapi::BatchUpdateBlobsRequest::of(
                &self.instance_name,
                function.to_proto() as i32,
                blobs,
            ))
            .await
            .map_err(|s| Error::remote("uploading outputs", s))?;
        for r in response.into_inner().responses {
            if let Some(s) = r.status
                && s.code != 0
            {
                let status = tonic::Status::new(tonic::Code::from(s.code), s.message);
                return Err(
                    match r.digest.and_then(|d| Digest::from_proto(&d, function).ok()) {
                        Some(digest) => refused_upload(digest, self.max_blob_size(), status),
                        None => Error::remote("uploading outputs", status),
                    },
                );
            }
        }
        Ok(())
    }

    async fn write(&self, digest: Digest, blob: Blob) -> Result<(), Error> {
        let name = resource::write_name(
            &self.instance_name,
            &format!("{:032x}", rand::random::<u128>()),
            &digest,
            Compressor::Identity,
        );
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let reader = tokio::task::spawn_blocking(move || -> Result<(), Error> {
            let mut source: Box<dyn Read + Send> = match blob {
                Blob::Bytes(b) => Box::new(std::io::Cursor::new(b)),
                Blob::File(path) => Box::new(
                    std::fs::File::open(&path)
                        .map_err(|e| Error::local(format!("opening {}", path.display()), e))?,
                ),
            };
            let mut offset = 0i64;
            loop {
                let mut buf = vec![0u8; CHUNK];
                let n = read_full(&mut source, &mut buf)
                    .map_err(|e| Error::local("reading an output", e))?;
                buf.truncate(n);
                let finish = offset + n as i64 >= digest.size as i64;
                let request = bytestream::WriteRequest {
                    resource_name: if offset == 0 {
                        name.clone()
                    } else {
                        String::new()
                    },
                    write_offset: offset,
                    finish_write: finish,
                    data: Bytes::from(buf),
                };
                offset += n as i64;
                if tx.blocking_send(request).is_err() || finish || n == 0 {
                    return Ok(());
                }
            }
        });
        let result = self
            .bytestream
            .clone()
            .write(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        reader
            .await
            .map_err(|_| Error::Retryable("an upload task failed".into()))??;
        result.map_err(|s| refused_upload(digest, self.max_blob_size(), s))?;
        Ok(())
    }
}

/// Why a blob's upload failed: a CAS that refuses a blob for its size
/// (over `max_blob`, when known) refuses it everywhere, which is the
/// action's fault; anything else may pass.
fn refused_upload(digest: Digest, max_blob: Option<u64>, s: tonic::Status) -> Error {
    let over_bound = max_blob.is_some_and(|max| digest.size > max);
    // Coordinators that do not advertise their bound say it in the refusal
    // (RESOURCE_EXHAUSTED is also a full disk, which passes).
    let refused_for_size = s.code() == tonic::Code::ResourceExhausted
        && (over_bound || s.message().contains("larger than"));
    if refused_for_size {
        return Error::TooLarge(format!(
            "output blob {digest} ({} bytes) is larger than the coordinator's CAS accepts: {}; \
             make the output smaller or raise max_cas_size on the coordinator",
            digest.size,
            s.message()
        ));
    }
    Error::remote("uploading an output", s)
}

fn read_full(source: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match source.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

async fn read_file(path: &Path) -> Result<Bytes, Error> {
    tokio::fs::read(path)
        .await
        .map(Bytes::from)
        .map_err(|e| Error::local(format!("reading {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_proto::fleet::Fault;

    #[test]
    fn a_blob_refused_for_its_size_is_the_actions_fault() {
        let digest = Function::Sha256.digest_of(&[0u8; 4096]);
        // An older coordinator says why in its message only.
        let said = tonic::Status::resource_exhausted(format!(
            "blob {digest} is larger than the CAS size bound of 1024 bytes"
        ));
        let e = refused_upload(digest, None, said);
        assert_eq!(e.fault(), Fault::Action, "{e}");
        assert!(e.to_string().contains("4096 bytes"), "{e}");
        // A known bound decides.
        let e = refused_upload(digest, Some(1024), tonic::Status::resource_exhausted("no"));
        assert_eq!(e.fault(), Fault::Action, "{e}");
        // A full disk on the coordinator, or a broken stream, passes.
        let full = tonic::Status::resource_exhausted("no space left on the storage device");
        assert_eq!(refused_upload(digest, None, full).fault(), Fault::Transient);
        let e = refused_upload(digest, Some(1 << 20), tonic::Status::unavailable("reset"));
        assert_eq!(e.fault(), Fault::Transient, "{e}");
    }
}
