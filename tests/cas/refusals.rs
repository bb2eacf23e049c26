//! Bad input over the wire: digests and digest functions, resource names,
//! write offsets and read ranges, oversized batches, bad zstd. Each is
//! refused with an error that names it and leaves nothing behind.

use super::*;

#[tokio::test]
async fn bad_digests_and_digest_functions_are_refused() {
    let dir = tempdir();
    let server = Coordinator::start(dir.path(), &[]);
    let mut client = server.client().await;
    let (d, data) = blob(30, 5000);

    // Wrong hash for the data, in a batch and on ByteStream.
    let (other, _) = blob(31, 5000);
    let r = client
        .cas
        .batch_update_blobs(batch_update(
            Function::Sha256,
            vec![(other.to_proto(), data.clone(), Compressor::Identity)],
        ))
        .await
        .expect("batch answers per blob")
        .into_inner();
    let status = r.responses[0].status.as_ref().expect("status");
    assert_eq!(status.code, Code::InvalidArgument as i32);
    assert!(status.message.contains("hashes to"), "{}", status.message);
    assert_not_stored(&server, &mut client, &other).await;
    let name = resource::write_name("", &upload_id(), &other, Compressor::Identity);
    assert_err(
        client.write(name, data.clone(), 1000).await,
        Code::InvalidArgument,
        "hashes to",
    );
    assert_not_stored(&server, &mut client, &other).await;

    // Wrong size: more bytes than declared, and fewer.
    let small = Digest { size: 4000, ..d };
    let name = resource::write_name("", &upload_id(), &small, Compressor::Identity);
    assert_err(
        client.write(name, data.clone(), 1000).await,
        Code::InvalidArgument,
        "declares 4000",
    );
    let big = Digest { size: 6000, ..d };
    let name = resource::write_name("", &upload_id(), &big, Compressor::Identity);
    assert_err(
        client.write(name, data.clone(), 1000).await,
        Code::InvalidArgument,
        "declares 6000",
    );
    assert_not_stored(&server, &mut client, &small).await;
    assert_not_stored(&server, &mut client, &big).await;

    // Unsupported, unknown and malformed digest functions and digests.
    let find = |function: i32, digest: reapi::Digest| reapi::FindMissingBlobsRequest {
        instance_name: String::new(),
        blob_digests: vec![digest],
        digest_function: function,
    };
    assert_err(
        client.cas.find_missing_blobs(find(2, d.to_proto())).await,
        Code::InvalidArgument,
        "sha1 is not supported",
    );
    assert_err(
        client.cas.find_missing_blobs(find(77, d.to_proto())).await,
        Code::InvalidArgument,
        "unknown digest function",
    );
    let upper = reapi::Digest {
        hash: d.hash_hex().to_uppercase(),
        size_bytes: 1,
    };
    assert_err(
        client.cas.find_missing_blobs(find(1, upper)).await,
        Code::InvalidArgument,
        "lower-case hex",
    );
    let short = reapi::Digest {
        hash: "abc".into(),
        size_bytes: 1,
    };
    assert_err(
        client.cas.find_missing_blobs(find(1, short)).await,
        Code::InvalidArgument,
        "lower-case hex",
    );
    let negative = reapi::Digest {
        hash: d.hash_hex(),
        size_bytes: -1,
    };
    assert_err(
        client.cas.find_missing_blobs(find(1, negative)).await,
        Code::InvalidArgument,
        "negative",
    );
    let name = format!("uploads/{}/blobs/md5/{}/5000", upload_id(), d.hash_hex());
    assert_err(
        client.write(name, data.clone(), 1000).await,
        Code::InvalidArgument,
        "md5 is not supported",
    );
    assert_not_stored(&server, &mut client, &d).await;
}

#[tokio::test]
async fn malformed_resource_names_are_refused() {
    let dir = tempdir();
    let server = Coordinator::start(dir.path(), &[]);
    let mut client = server.client().await;
    let (d, data) = blob(40, 100);
    let h = d.hash_hex();
    for name in [
        String::new(),
        "blobs".to_owned(),
        format!("blobs/{h}"),
        format!("blobs/{h}/100/extra"),
        format!("blobs/{h}/1e2"),
        format!("instance//blobs/{h}/100"),
        format!("../blobs/{h}/100"),
        format!("compressed-blobs/gzip/{h}/100"),
        format!("uploads/{}/blobs/{h}/100", upload_id()),
    ] {
        assert_err(
            client.read(name.clone(), 0, 0).await,
            Code::InvalidArgument,
            "resource name",
        );
    }
    for name in [
        format!("blobs/{h}/100"),
        format!("uploads/blobs/{h}/100"),
        format!("uploads/not a uuid/blobs/{h}/100"),
        format!("uploads/{}/compressed-blobs/brotli/{h}/100", upload_id()),
    ] {
        assert_err(
            client.write(name.clone(), data.clone(), 100).await,
            Code::InvalidArgument,
            "resource name",
        );
        assert_err(
            client
                .bytestream
                .query_write_status(bytestream::QueryWriteStatusRequest {
                    resource_name: name,
                })
                .await,
            Code::InvalidArgument,
            "resource name",
        );
    }
    assert_not_stored(&server, &mut client, &d).await;
}

#[tokio::test]
async fn write_offsets_must_continue_and_reads_must_stay_inside() {
    let dir = tempdir();
    let server = Coordinator::start(dir.path(), &[]);
    let mut client = server.client().await;
    let (d, data) = blob(50, 300_000);
    let name = resource::write_name("", &upload_id(), &d, Compressor::Identity);

    // A new upload cannot start in the middle.
    let mut requests = write_requests(name.clone(), data.slice(1000..), 1000, 100_000, true);
    requests[0].resource_name = name.clone();
    assert_err(
        client.bytestream.write(tokio_stream::iter(requests)).await,
        Code::InvalidArgument,
        "write_offset",
    );
    // An offset that skips ahead, and one that rewinds.
    for delta in [1000i64, -1000] {
        let name = resource::write_name("", &upload_id(), &d, Compressor::Identity);
        let mut requests = write_requests(name, data.clone(), 0, 100_000, true);
        requests[2].write_offset += delta;
        assert_err(
            client.bytestream.write(tokio_stream::iter(requests)).await,
            Code::InvalidArgument,
            "skips or rewinds",
        );
    }
    // A changed resource name within one stream.
    let mut requests = write_requests(name.clone(), data.clone(), 0, 100_000, true);
    requests[1].resource_name = resource::write_name("", &upload_id(), &d, Compressor::Identity);
    assert_err(
        client.bytestream.write(tokio_stream::iter(requests)).await,
        Code::InvalidArgument,
        "changed",
    );
    assert_not_stored(&server, &mut client, &d).await;

    // Reads past the end, negative values, absent blobs.
    client.upload(&d, data).await;
    let read_name = resource::read_name("", &d, Compressor::Identity);
    assert_err(
        client.read(read_name.clone(), 300_001, 0).await,
        Code::OutOfRange,
        "past the end",
    );
    assert_err(
        client.read(read_name.clone(), -1, 0).await,
        Code::OutOfRange,
        "negative",
    );
    assert_err(
        client.read(read_name.clone(), 0, -5).await,
        Code::InvalidArgument,
        "negative",
    );
    assert_err(
        client
            .read(resource::read_name("", &d, Compressor::Zstd), 10_000_000, 0)
            .await,
        Code::OutOfRange,
        "past the end",
    );
    let (absent, _) = blob(51, 10);
    assert_err(
        client.download(&absent).await,
        Code::NotFound,
        "not in the cas",
    );
}

#[tokio::test]
async fn batches_over_the_advertised_limit_are_refused_whole() {
    let dir = tempdir();
    let server = Coordinator::start(dir.path(), &[]);
    let mut client = server.client().await;
    let blobs: Vec<_> = (0..9).map(|i| blob(60 + i, 512 << 10)).collect();
    let request = batch_update(
        Function::Sha256,
        blobs
            .iter()
            .map(|(d, data)| (d.to_proto(), data.clone(), Compressor::Identity))
            .collect(),
    );
    assert_err(
        client.cas.batch_update_blobs(request).await,
        Code::InvalidArgument,
        "max_batch_total_size_bytes",
    );
    for (d, _) in &blobs {
        assert_not_stored(&server, &mut client, d).await;
    }
    let read = reapi::BatchReadBlobsRequest {
        digests: blobs.iter().map(|(d, _)| d.to_proto()).collect(),
        ..Default::default()
    };
    assert_err(
        client.cas.batch_read_blobs(read).await,
        Code::InvalidArgument,
        "max_batch_total_size_bytes",
    );
    // A missing blob in a batch read is reported per blob.
    let read = reapi::BatchReadBlobsRequest {
        digests: vec![blobs[0].0.to_proto()],
        ..Default::default()
    };
    let r = client
        .cas
        .batch_read_blobs(read)
        .await
        .expect("read")
        .into_inner();
    assert_eq!(
        r.responses[0].status.as_ref().expect("status").code,
        Code::NotFound as i32
    );
}

#[tokio::test]
async fn bad_zstd_uploads_are_refused() {
    let dir = tempdir();
    let server = Coordinator::start(dir.path(), &[]);
    let mut client = server.client().await;
    let (d, data) = blob(70, 200_000);
    let (other, other_data) = blob(71, 200_000);

    // Decompresses to other bytes than the digest says.
    let wrong = zstd(&other_data);
    let name = resource::write_name("", &upload_id(), &d, Compressor::Zstd);
    assert_err(
        client.write(name, wrong.clone(), 10_000).await,
        Code::InvalidArgument,
        "hashes to",
    );
    // Decompresses beyond the declared size (a bomb: 64 MiB of zeros).
    let bomb = zstd(&vec![0u8; 64 << 20]);
    let name = resource::write_name("", &upload_id(), &d, Compressor::Zstd);
    // Refused either for its size or for the window it asks for.
    let err = client
        .write(name, bomb.clone(), 10_000)
        .await
        .expect_err("a bomb");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("more than the declared")
            || err.message().contains("too much memory"),
        "{}",
        err.message()
    );
    // Not zstd at all, and a truncated stream.
    let name = resource::write_name("", &upload_id(), &d, Compressor::Zstd);
    assert_err(
        client.write(name, data.clone(), 10_000).await,
        Code::InvalidArgument,
        "zstd",
    );
    let good = zstd(&data);
    let name = resource::write_name("", &upload_id(), &d, Compressor::Zstd);
    let truncated = good.slice(..good.len() - 10);
    let r = client.write(name, truncated, 10_000).await;
    assert!(
        matches!(&r, Err(s) if s.code() == Code::InvalidArgument),
        "{r:?}"
    );
    assert_not_stored(&server, &mut client, &d).await;

    // The same through BatchUpdateBlobs, per blob.
    let request = batch_update(
        Function::Sha256,
        vec![
            (d.to_proto(), wrong, Compressor::Zstd),
            (d.to_proto(), bomb, Compressor::Zstd),
            (
                other.to_proto(),
                Bytes::from_static(b"garbage"),
                Compressor::Zstd,
            ),
        ],
    );
    let responses = client
        .cas
        .batch_update_blobs(request)
        .await
        .expect("batch")
        .into_inner()
        .responses;
    for r in &responses {
        assert_eq!(
            r.status.as_ref().expect("status").code,
            Code::InvalidArgument as i32,
            "{r:?}"
        );
    }
    assert_not_stored(&server, &mut client, &d).await;
    assert_not_stored(&server, &mut client, &other).await;
}
