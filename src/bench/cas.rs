//! cas: blob transfer throughput and FindMissingBlobs latency.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use outpost_proto::bytestream::{self, byte_stream_client::ByteStreamClient};
use outpost_proto::client::Transport as Channel;
use outpost_proto::digest::{Digest, Function};
use outpost_proto::reapi::{
    self, content_addressable_storage_client::ContentAddressableStorageClient,
};
use outpost_proto::resource::{self, Compressor};
use tokio_stream::StreamExt;

use super::exec::{put_all, run_id};
use super::report::{Report, mb_per_s};
use super::{BenchArgs, channels};

const SMALL: usize = 4 << 10;
const SMALL_COUNT: usize = 4096;
const MEDIUM: usize = 1 << 20;
const MEDIUM_COUNT: usize = 64;
const CHUNK: usize = 1 << 20;
const FIND_DIGESTS: usize = 10_000;
const FIND_ROUNDS: usize = 30;

/// Pseudo-random bytes, different per run and seed (xorshift: fast enough
/// not to distort the figures).
fn data(run: u64, seed: u64, len: usize) -> (Digest, Bytes) {
    let mut x = (run ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    (Function::Sha256.digest_of(&out), Bytes::from(out))
}

async fn write(
    client: &mut ByteStreamClient<Channel>,
    instance: &str,
    d: Digest,
    blob: Bytes,
) -> anyhow::Result<()> {
    let name = resource::write_name(
        instance,
        &format!("{:032x}", rand::random::<u128>()),
        &d,
        Compressor::Identity,
    );
    let mut requests = Vec::new();
    let mut at = 0;
    while at < blob.len() || requests.is_empty() {
        let end = (at + CHUNK).min(blob.len());
        requests.push(bytestream::WriteRequest {
            resource_name: if at == 0 { name.clone() } else { String::new() },
            write_offset: at as i64,
            finish_write: end == blob.len(),
            data: blob.slice(at..end),
        });
        at = end;
    }
    let r = client
        .write(tokio_stream::iter(requests))
        .await
        .context("ByteStream.Write")?;
    anyhow::ensure!(
        r.into_inner().committed_size == d.size as i64,
        "short write of {d}"
    );
    Ok(())
}

async fn read(
    client: &mut ByteStreamClient<Channel>,
    instance: &str,
    d: Digest,
) -> anyhow::Result<u64> {
    let mut stream = client
        .read(bytestream::ReadRequest {
            resource_name: resource::read_name(instance, &d, Compressor::Identity),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .context("ByteStream.Read")?
        .into_inner();
    let mut n = 0;
    while let Some(msg) = stream.next().await {
        n += msg.context("ByteStream.Read")?.data.len() as u64;
    }
    anyhow::ensure!(n == d.size, "short read of {d}");
    Ok(n)
}

/// Runs `work` for every item with `concurrency` in flight; returns the time.
async fn timed<T, F, Fut>(items: Vec<T>, concurrency: usize, work: F) -> anyhow::Result<Duration>
where
    T: Send + 'static,
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for item in items {
        if tasks.len() >= concurrency
            && let Some(done) = tasks.join_next().await
        {
            done??;
        }
        tasks.spawn(work(item));
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(started.elapsed())
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<Report> {
    let chans = channels(args, 4).await?;
    let instance = args.instance_name.clone();
    let run = run_id();
    let mut report = Report::new("cas");

    // Many small blobs through the batch calls.
    let small: Vec<(Digest, Bytes)> = (0..SMALL_COUNT as u64)
        .map(|i| data(run, i, SMALL))
        .collect();
    let total = (SMALL * SMALL_COUNT) as u64;
    let batches: Vec<Vec<(Digest, Bytes)>> = small.chunks(512).map(<[_]>::to_vec).collect();
    let up = timed(batches, 4, |batch| {
        let mut cas =
            ContentAddressableStorageClient::new(chans[batch.len() % chans.len()].clone());
        let instance = instance.clone();
        async move { put_all(&mut cas, &instance, batch).await }
    })
    .await?;
    let groups: Vec<Vec<Digest>> = small
        .chunks(512)
        .map(|c| c.iter().map(|(d, _)| *d).collect())
        .collect();
    let down = timed(groups, 4, |group| {
        let mut cas =
            ContentAddressableStorageClient::new(chans[group.len() % chans.len()].clone());
        let instance = instance.clone();
        async move {
            let r = cas
                .batch_read_blobs(reapi::BatchReadBlobsRequest {
                    instance_name: instance,
                    digests: group.iter().map(Digest::to_proto).collect(),
                    ..Default::default()
                })
                .await
                .context("BatchReadBlobs")?;
            anyhow::ensure!(
                r.into_inner()
                    .responses
                    .iter()
                    .all(|r| r.status.as_ref().is_none_or(|s| s.code == 0))
            );
            Ok(())
        }
    })
    .await?;
    report
        .add("small_upload_mb_s", mb_per_s(total, up))
        .add("small_download_mb_s", mb_per_s(total, down));

    // 1 MiB blobs through ByteStream, 8 at a time.
    let medium: Vec<(Digest, Bytes)> = (0..MEDIUM_COUNT as u64)
        .map(|i| data(run, 1_000_000 + i, MEDIUM))
        .collect();
    let total = (MEDIUM * MEDIUM_COUNT) as u64;
    let up = timed(medium.clone(), 8, |(d, blob)| {
        let mut bs = ByteStreamClient::new(chans[d.hash[0] as usize % chans.len()].clone())
            .max_decoding_message_size(64 << 20);
        let instance = instance.clone();
        async move { write(&mut bs, &instance, d, blob).await }
    })
    .await?;
    let down = timed(medium.iter().map(|(d, _)| *d).collect(), 8, |d| {
        let mut bs = ByteStreamClient::new(chans[d.hash[0] as usize % chans.len()].clone())
            .max_decoding_message_size(64 << 20);
        let instance = instance.clone();
        async move { read(&mut bs, &instance, d).await.map(|_| ()) }
    })
    .await?;
    report
        .add("medium_upload_mb_s", mb_per_s(total, up))
        .add("medium_download_mb_s", mb_per_s(total, down));

    // One large blob through ByteStream.
    let (large, blob) = data(run, 2_000_000, args.large_mib << 20);
    let mut bs = ByteStreamClient::new(chans[0].clone()).max_decoding_message_size(64 << 20);
    let started = Instant::now();
    write(&mut bs, &instance, large, blob).await?;
    let up = started.elapsed();
    let started = Instant::now();
    read(&mut bs, &instance, large).await?;
    let down = started.elapsed();
    report
        .add("large_mib", args.large_mib)
        .add("large_upload_mb_s", mb_per_s(large.size, up))
        .add("large_download_mb_s", mb_per_s(large.size, down));

    // FindMissingBlobs of 10,000 digests, half present.
    let mut digests: Vec<reapi::Digest> = small.iter().map(|(d, _)| d.to_proto()).collect();
    digests.extend((0..(FIND_DIGESTS - digests.len()) as u64).map(|i| {
        Function::Sha256
            .digest_of(&(run ^ i).to_le_bytes())
            .to_proto()
    }));
    let mut cas =
        ContentAddressableStorageClient::new(chans[0].clone()).max_decoding_message_size(64 << 20);
    let mut samples = Vec::new();
    for _ in 0..FIND_ROUNDS {
        let request = reapi::FindMissingBlobsRequest {
            instance_name: instance.clone(),
            blob_digests: digests.clone(),
            digest_function: 0,
        };
        let started = Instant::now();
        cas.find_missing_blobs(request)
            .await
            .context("FindMissingBlobs")?;
        samples.push(started.elapsed());
    }
    report
        .add("find_missing_n", digests.len())
        .percentiles("find_missing", &mut samples);
    Ok(report)
}
