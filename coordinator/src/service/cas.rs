//! `ContentAddressableStorage`: presence checks, batch transfers of small
//! blobs, and GetTree.

use std::collections::{HashSet, VecDeque};
use std::pin::Pin;

use bytes::Bytes;
use outpost_proto::digest::{Digest, Function};
use outpost_proto::reapi::{self, content_addressable_storage_server::ContentAddressableStorage};
use prost::Message;
use tokio::task::JoinSet;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};

use super::compression;
use super::{
    Context, function_of, ok_status, required_digest, rpc_status, rpc_status_of, storage_status,
};

/// Directories per GetTree response when the client does not choose.
const DEFAULT_TREE_PAGE: usize = 1000;
const MAX_TREE_PAGE: usize = 10_000;
/// Directories in one tree at most.
const MAX_TREE_DIRECTORIES: usize = 1_000_000;
/// A directory message is small; anything above this is not one.
const MAX_DIRECTORY_SIZE: u64 = 16 << 20;
/// Blobs at least this large are sent zstd-compressed when the client accepts it.
const COMPRESS_FROM: usize = 1024;

pub struct CasService {
    ctx: Context,
}

impl CasService {
    pub fn new(ctx: Context) -> Self {
        CasService { ctx }
    }

    fn check_batch_total(&self, total: u64, what: &str) -> Result<(), Status> {
        if total > self.ctx.max_batch_size {
            return Err(Status::invalid_argument(format!(
                "{what} carries {total} bytes, over the advertised max_batch_total_size_bytes of {}; \
                 send large blobs with ByteStream",
                self.ctx.max_batch_size
            )));
        }
        Ok(())
    }
}

async fn update_one(
    ctx: Context,
    function: Function,
    request: reapi::batch_update_blobs_request::Request,
) -> tonic_types::pb::Status {
    let digest = match required_digest(request.digest.as_ref(), function, "digest") {
        Ok(d) => d,
        Err(status) => return rpc_status_of(&status),
    };
    let data = match reapi::compressor::Value::try_from(request.compressor) {
        Ok(reapi::compressor::Value::Identity) => request.data,
        Ok(reapi::compressor::Value::Zstd) => {
            let size = digest.size;
            match tokio::task::spawn_blocking(move || {
                compression::decompress_all(&request.data, size)
            })
            .await
            {
                Ok(Ok(data)) => data,
                Ok(Err(e)) => {
                    return rpc_status(Code::InvalidArgument, format!("blob {digest}: {e}"));
                }
                Err(_) => return rpc_status(Code::Internal, "decompression task failed"),
            }
        }
        _ => {
            return rpc_status(
                Code::InvalidArgument,
                format!(
                    "blob {digest}: compressor {} is not supported; use identity or zstd",
                    request.compressor
                ),
            );
        }
    };
    match ctx.cas.put(digest, data).await {
        Ok(()) => ok_status(),
        Err(e) => rpc_status_of(&storage_status(e)),
    }
}

async fn read_one(
    ctx: Context,
    digest: Digest,
    zstd: bool,
) -> reapi::batch_read_blobs_response::Response {
    let response = |data: Bytes, compressor: reapi::compressor::Value, status| {
        reapi::batch_read_blobs_response::Response {
            digest: Some(digest.to_proto()),
            data,
            compressor: compressor as i32,
            status: Some(status),
        }
    };
    match ctx.cas.read_all(digest).await {
        Ok(Some(data)) if zstd && data.len() >= COMPRESS_FROM => {
            match tokio::task::spawn_blocking(move || compression::compress_all(&data)).await {
                Ok(Ok(packed)) => response(packed, reapi::compressor::Value::Zstd, ok_status()),
                _ => response(
                    Bytes::new(),
                    reapi::compressor::Value::Identity,
                    rpc_status(Code::Internal, "compression failed"),
                ),
            }
        }
        Ok(Some(data)) => response(data, reapi::compressor::Value::Identity, ok_status()),
        Ok(None) => response(
            Bytes::new(),
            reapi::compressor::Value::Identity,
            rpc_status(Code::NotFound, format!("blob {digest} is not in the CAS")),
        ),
        Err(e) => response(
            Bytes::new(),
            reapi::compressor::Value::Identity,
            rpc_status_of(&storage_status(e)),
        ),
    }
}

type TreeStream = Pin<Box<dyn Stream<Item = Result<reapi::GetTreeResponse, Status>> + Send>>;

fn parse_page_token(token: &str) -> Result<usize, Status> {
    if token.is_empty() {
        return Ok(0);
    }
    token
        .parse::<usize>()
        .ok()
        .filter(|n| *n <= MAX_TREE_DIRECTORIES && !token.starts_with('+'))
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "page_token {token:?} was not issued by this server"
            ))
        })
}

#[tonic::async_trait]
impl ContentAddressableStorage for CasService {
    async fn find_missing_blobs(
        &self,
        request: Request<reapi::FindMissingBlobsRequest>,
    ) -> Result<Response<reapi::FindMissingBlobsResponse>, Status> {
        let req = request.into_inner();
        let function = function_of(req.digest_function)?;
        let digests = req
            .blob_digests
            .iter()
            .map(|d| required_digest(Some(d), function, "blob_digests"))
            .collect::<Result<Vec<_>, _>>()?;
        let asked = digests.len() as u64;
        let parsed = digests.clone();
        let missing = self
            .ctx
            .cas
            .find_missing(digests)
            .await
            .map_err(storage_status)?;
        self.ctx
            .metrics
            .cas(asked - missing.len() as u64, missing.len() as u64);
        // `missing` keeps the request's order, so the request's own wire
        // digests are handed back instead of encoding each hash again.
        let mut wanted = missing.iter().peekable();
        let mut missing_blob_digests = Vec::with_capacity(missing.len());
        for (wire, digest) in req.blob_digests.into_iter().zip(&parsed) {
            if wanted.peek() == Some(&digest) {
                wanted.next();
                missing_blob_digests.push(wire);
            }
        }
        if wanted.peek().is_some() {
            // Not in request order after all (another storage backend):
            // encode what is missing.
            missing_blob_digests = missing.iter().map(Digest::to_proto).collect();
        }
        Ok(Response::new(reapi::FindMissingBlobsResponse {
            missing_blob_digests,
        }))
    }

    async fn batch_update_blobs(
        &self,
        request: Request<reapi::BatchUpdateBlobsRequest>,
    ) -> Result<Response<reapi::BatchUpdateBlobsResponse>, Status> {
        let req = request.into_inner();
        let function = function_of(req.digest_function)?;
        let total: u64 = req.requests.iter().map(|r| r.data.len() as u64).sum();
        self.check_batch_total(total, "BatchUpdateBlobs")?;
        let digests: Vec<Option<reapi::Digest>> =
            req.requests.iter().map(|r| r.digest.clone()).collect();
        let mut tasks = JoinSet::new();
        for (i, r) in req.requests.into_iter().enumerate() {
            let ctx = self.ctx.clone();
            tasks.spawn(async move { (i, update_one(ctx, function, r).await) });
        }
        let mut statuses = vec![None; digests.len()];
        while let Some(done) = tasks.join_next().await {
            let (i, status) =
                done.map_err(|e| Status::internal(format!("upload task failed: {e}")))?;
            statuses[i] = Some(status);
        }
        Ok(Response::new(reapi::BatchUpdateBlobsResponse {
            responses: digests
                .into_iter()
                .zip(statuses)
                .map(
                    |(digest, status)| reapi::batch_update_blobs_response::Response {
                        digest,
                        status,
                    },
                )
                .collect(),
        }))
    }

    async fn batch_read_blobs(
        &self,
        request: Request<reapi::BatchReadBlobsRequest>,
    ) -> Result<Response<reapi::BatchReadBlobsResponse>, Status> {
        let req = request.into_inner();
        let function = function_of(req.digest_function)?;
        let digests = req
            .digests
            .iter()
            .map(|d| required_digest(Some(d), function, "digests"))
            .collect::<Result<Vec<_>, _>>()?;
        self.check_batch_total(digests.iter().map(|d| d.size).sum(), "BatchReadBlobs")?;
        let zstd = req
            .acceptable_compressors
            .contains(&(reapi::compressor::Value::Zstd as i32));
        let mut tasks = JoinSet::new();
        for (i, d) in digests.iter().enumerate() {
            let ctx = self.ctx.clone();
            let d = *d;
            tasks.spawn(async move { (i, read_one(ctx, d, zstd).await) });
        }
        let mut responses = vec![None; digests.len()];
        while let Some(done) = tasks.join_next().await {
            let (i, r) = done.map_err(|e| Status::internal(format!("read task failed: {e}")))?;
            responses[i] = Some(r);
        }
        Ok(Response::new(reapi::BatchReadBlobsResponse {
            responses: responses.into_iter().flatten().collect(),
        }))
    }

    type GetTreeStream = TreeStream;

    async fn get_tree(
        &self,
        request: Request<reapi::GetTreeRequest>,
    ) -> Result<Response<TreeStream>, Status> {
        let req = request.into_inner();
        let function = function_of(req.digest_function)?;
        let root = required_digest(req.root_digest.as_ref(), function, "root_digest")?;
        let page = match req.page_size {
            n if n < 0 => return Err(Status::invalid_argument("page_size must not be negative")),
            0 => DEFAULT_TREE_PAGE,
            n => usize::try_from(n)
                .unwrap_or(MAX_TREE_PAGE)
                .min(MAX_TREE_PAGE),
        };
        let skip = parse_page_token(&req.page_token)?;
        if !self.ctx.cas.contains(root).await.map_err(storage_status)? {
            return Err(Status::not_found(format!(
                "root directory {root} is not in the CAS"
            )));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            if let Err(status) = walk_tree(ctx, root, function, skip, page, &tx).await {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Breadth-first walk from `root`, each directory once; directories that
/// are not in the CAS are left out, as the specification allows. The first
/// `skip` directories were sent in earlier pages.
async fn walk_tree(
    ctx: Context,
    root: Digest,
    function: Function,
    skip: usize,
    page: usize,
    tx: &tokio::sync::mpsc::Sender<Result<reapi::GetTreeResponse, Status>>,
) -> Result<(), Status> {
    let mut queue = VecDeque::from([root]);
    let mut seen = HashSet::from([root]);
    let mut index = 0usize;
    let mut batch = Vec::new();
    while let Some(digest) = queue.pop_front() {
        if digest.size > MAX_DIRECTORY_SIZE {
            return Err(Status::failed_precondition(format!(
                "directory {digest} is too large to be a Directory"
            )));
        }
        let Some(bytes) = ctx.cas.read_all(digest).await.map_err(storage_status)? else {
            continue;
        };
        let directory = reapi::Directory::decode(bytes).map_err(|e| {
            Status::failed_precondition(format!("blob {digest} is not a Directory: {e}"))
        })?;
        for child in &directory.directories {
            let d = required_digest(child.digest.as_ref(), function, "directories.digest")?;
            if seen.insert(d) {
                if seen.len() > MAX_TREE_DIRECTORIES {
                    return Err(Status::resource_exhausted(format!(
                        "tree {root} has more than {MAX_TREE_DIRECTORIES} directories"
                    )));
                }
                queue.push_back(d);
            }
        }
        index += 1;
        if index <= skip {
            continue;
        }
        batch.push(directory);
        if batch.len() == page && !queue.is_empty() {
            let response = reapi::GetTreeResponse {
                directories: std::mem::take(&mut batch),
                next_page_token: index.to_string(),
            };
            if tx.send(Ok(response)).await.is_err() {
                return Ok(());
            }
        }
    }
    let _ = tx
        .send(Ok(reapi::GetTreeResponse {
            directories: batch,
            next_page_token: String::new(),
        }))
        .await;
    Ok(())
}
