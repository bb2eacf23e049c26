//! The coordinator as a REAPI cache, over the wire: every CAS, ByteStream
//! and Action Cache call, the happy paths and the bad input that must be
//! refused with a clear error and leave nothing behind.

#[path = "../common/mod.rs"]
mod common;

use bytes::Bytes;
use common::{Client, Coordinator, blob, blob_with, tempdir, upload_id, write_requests, zstd};
use outpost_proto::bytestream;
use outpost_proto::digest::{Digest, Function};
use outpost_proto::reapi;
use outpost_proto::resource::{self, Compressor};
use prost::Message;
use tonic::Code;

fn assert_err<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, words: &str) {
    match result {
        Ok(v) => panic!("expected {code:?} mentioning {words:?}, got Ok({v:?})"),
        Err(status) => {
            assert_eq!(status.code(), code, "wrong code for {:?}", status.message());
            assert!(
                status
                    .message()
                    .to_lowercase()
                    .contains(&words.to_lowercase()),
                "message {:?} does not mention {words:?}",
                status.message()
            );
        }
    }
}

/// Nothing of a refused upload may remain: not in the index, no temp file.
async fn assert_not_stored(server: &Coordinator, client: &mut Client, digest: &Digest) {
    assert_eq!(
        client.find_missing(&[*digest]).await,
        vec![digest.to_proto()],
        "{digest:?} was stored"
    );
    let left = common::files_under(&server.data_dir.join("tmp"));
    assert!(left.is_empty(), "temp files left behind: {left:?}");
}

fn batch_update(
    function: Function,
    blobs: Vec<(reapi::Digest, Bytes, Compressor)>,
) -> reapi::BatchUpdateBlobsRequest {
    reapi::BatchUpdateBlobsRequest {
        instance_name: String::new(),
        requests: blobs
            .into_iter()
            .map(
                |(digest, data, c)| reapi::batch_update_blobs_request::Request {
                    digest: Some(digest),
                    data,
                    compressor: match c {
                        Compressor::Identity => reapi::compressor::Value::Identity as i32,
                        Compressor::Zstd => reapi::compressor::Value::Zstd as i32,
                    },
                },
            )
            .collect(),
        digest_function: function.to_proto() as i32,
    }
}

#[tokio::test]
async fn capabilities_describe_the_cache() {
    let dir = tempdir();
    let server = Coordinator::start(dir.path(), &[]);
    let mut client = server.client().await;
    let caps = client
        .capabilities
        .get_capabilities(reapi::GetCapabilitiesRequest::default())
        .await
        .expect("GetCapabilities")
        .into_inner();
    let cache = caps.cache_capabilities.expect("cache capabilities");
    assert_eq!(cache.digest_functions, vec![1, 9], "SHA256 and BLAKE3");
    assert_eq!(cache.max_batch_total_size_bytes, 4 << 20);
    assert!(
        cache
            .action_cache_update_capabilities
            .expect("ac")
            .update_enabled
    );
    assert_eq!(
        cache.supported_compressors,
        vec![reapi::compressor::Value::Zstd as i32]
    );
    assert!(caps.execution_capabilities.expect("exec").exec_enabled);
    assert_eq!(caps.low_api_version.expect("low").major, 2);
    assert_eq!(caps.high_api_version.expect("high").minor, 3);
    // Plain HTTP health on the same port.
    let mut stream = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.expect("read");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

#[tokio::test]
async fn batch_calls_roundtrip_with_both_digest_functions_and_zstd() {
    let dir = tempdir();
    let server = Coordinator::start(dir.path(), &[]);
    let mut client = server.client().await;
    for function in [Function::Sha256, Function::Blake3] {
        let blobs: Vec<_> = (0..20)
            .map(|i| blob_with(function, i, 100 + i as usize * 1000))
            .collect();
        let digests: Vec<Digest> = blobs.iter().map(|b| b.0).collect();
        assert_eq!(client.find_missing(&digests).await.len(), 20);
        let request = batch_update(
            function,
            blobs
                .iter()
                .enumerate()
                .map(|(i, (d, data))| {
                    if i % 2 == 0 {
                        (d.to_proto(), data.clone(), Compressor::Identity)
                    } else {
                        (d.to_proto(), zstd(data), Compressor::Zstd)
                    }
                })
                .collect(),
        );
        let responses = client
            .cas
            .batch_update_blobs(request)
            .await
            .expect("update")
            .into_inner()
            .responses;
        assert_eq!(responses.len(), 20);
        for r in &responses {
            assert_eq!(r.status.as_ref().expect("status").code, 0, "{r:?}");
        }
        assert!(client.find_missing(&digests).await.is_empty());
        // The missing come back in the order asked, duplicates included,
        // with 10,000 digests too (the store splits such requests).
        let absent: Vec<Digest> = (100..5100).map(|i| blob_with(function, i, 10).0).collect();
        let mut asked = Vec::new();
        for (i, d) in absent.iter().enumerate() {
            asked.push(*d);
            asked.push(digests[i % digests.len()]);
        }
        asked.push(absent[7]);
        let mut expected: Vec<reapi::Digest> = absent.iter().map(Digest::to_proto).collect();
        expected.push(absent[7].to_proto());
        assert_eq!(client.find_missing(&asked).await, expected);

        let read = client
            .cas
            .batch_read_blobs(reapi::BatchReadBlobsRequest {
                instance_name: String::new(),
                digests: digests.iter().map(Digest::to_proto).collect(),
                acceptable_compressors: vec![reapi::compressor::Value::Zstd as i32],
                digest_function: function.to_proto() as i32,
            })
            .await
            .expect("read")
            .into_inner();
        for (r, (d, data)) in read.responses.iter().zip(&blobs) {
            assert_eq!(r.digest.as_ref(), Some(&d.to_proto()));
            let got = if r.compressor == reapi::compressor::Value::Zstd as i32 {
                Bytes::from(zstd::bulk::decompress(&r.data, data.len()).expect("zstd"))
            } else {
                r.data.clone()
            };
            assert_eq!(&got, data);
        }
    }
    // The empty blob is always there.
    assert!(
        client
            .find_missing(&[Function::Sha256.empty()])
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn bytestream_reads_and_writes_with_offsets_compression_and_resume() {
    let dir = tempdir();
    let server = Coordinator::start(dir.path(), &[]);
    let mut client = server.client().await;

    // Plain chunked upload, then reads with offset and limit.
    let (d, data) = blob(1, 5 << 20);
    client.upload(&d, data.clone()).await;
    assert_eq!(client.download(&d).await.expect("read"), data.to_vec());
    let name = resource::read_name("", &d, Compressor::Identity);
    assert_eq!(
        client.read(name.clone(), 1000, 10).await.expect("window"),
        data[1000..1010].to_vec()
    );
    assert_eq!(
        client
            .read(name.clone(), d.size as i64, 0)
            .await
            .expect("at end"),
        Vec::<u8>::new()
    );

    // Uploading it again finishes at once with the full size.
    let again = client
        .write(
            resource::write_name("", &upload_id(), &d, Compressor::Identity),
            data.clone(),
            1 << 20,
        )
        .await
        .expect("re-upload");
    assert_eq!(again.committed_size, d.size as i64);

    // zstd upload under BLAKE3 and an instance name; zstd download.
    let (d3, data3) = blob_with(Function::Blake3, 2, 3 << 20);
    let packed = zstd(&data3);
    let name = resource::write_name("team/a", &upload_id(), &d3, Compressor::Zstd);
    assert!(name.contains("/blake3/"), "{name}");
    let r = client
        .write(name, packed.clone(), 64 << 10)
        .await
        .expect("zstd upload");
    assert_eq!(r.committed_size, packed.len() as i64);
    let compressed = client
        .read(resource::read_name("team/a", &d3, Compressor::Zstd), 0, 0)
        .await
        .expect("zstd read");
    assert_eq!(
        zstd::bulk::decompress(&compressed, data3.len()).expect("valid zstd"),
        data3.to_vec()
    );
    let tail = client
        .read(resource::read_name("", &d3, Compressor::Zstd), 10, 0)
        .await
        .expect("zstd read at an offset");
    assert_eq!(tail, compressed[10..].to_vec());

    // A resumed upload: the first stream ends early, QueryWriteStatus says
    // how much arrived, the second stream continues from there.
    let (d4, data4) = blob(4, 3 << 20);
    let name = resource::write_name("", &upload_id(), &d4, Compressor::Identity);
    let half = data4.slice(..(1 << 20));
    let first = client
        .bytestream
        .write(tokio_stream::iter(write_requests(
            name.clone(),
            half,
            0,
            256 << 10,
            false,
        )))
        .await;
    assert_err(first, Code::InvalidArgument, "without finish_write");
    let status = client
        .bytestream
        .query_write_status(bytestream::QueryWriteStatusRequest {
            resource_name: name.clone(),
        })
        .await
        .expect("status")
        .into_inner();
    assert_eq!((status.committed_size, status.complete), (1 << 20, false));
    let wrong_resume = client
        .bytestream
        .write(tokio_stream::iter(write_requests(
            name.clone(),
            data4.slice(5..),
            5,
            1 << 20,
            true,
        )))
        .await;
    assert_err(wrong_resume, Code::InvalidArgument, "resume at 1048576");
    let rest = data4.slice((1 << 20)..);
    let done = client
        .bytestream
        .write(tokio_stream::iter(write_requests(
            name.clone(),
            rest,
            1 << 20,
            256 << 10,
            true,
        )))
        .await
        .expect("resumed upload")
        .into_inner();
    assert_eq!(done.committed_size, d4.size as i64);
    assert_eq!(client.download(&d4).await.expect("read"), data4.to_vec());
    let status = client
        .bytestream
        .query_write_status(bytestream::QueryWriteStatusRequest {
            resource_name: name,
        })
        .await
        .expect("status")
        .into_inner();
    assert!(status.complete);
}

#[tokio::test]
async fn identical_concurrent_uploads_are_safe() {
    let dir = tempdir();
    let server = Coordinator::start(dir.path(), &[]);
    let client = server.client().await;
    let (d, data) = blob(7, 8 << 20);
    let uploads: Vec<_> = (0..12)
        .map(|_| {
            let mut client = client.clone();
            let data = data.clone();
            tokio::spawn(async move {
                let name = resource::write_name("", &upload_id(), &d, Compressor::Identity);
                client.write(name, data, 128 << 10).await
            })
        })
        .collect();
    for u in uploads {
        let r = u.await.expect("join").expect("upload");
        assert_eq!(r.committed_size, d.size as i64);
    }
    let mut client = client;
    assert_eq!(client.download(&d).await.expect("read"), data.to_vec());
    assert!(common::files_under(&dir.path().join("tmp")).is_empty());
}

#[tokio::test]
async fn get_tree_pages_through_every_directory_once() {
    let dir = tempdir();
    let server = Coordinator::start(dir.path(), &[]);
    let mut client = server.client().await;
    let put = |d: &reapi::Directory| {
        let bytes = Bytes::from(d.encode_to_vec());
        (Function::Sha256.digest_of(&bytes), bytes)
    };
    let (file, file_data) = blob(9, 10);
    let leaf = |name: &str| reapi::Directory {
        files: vec![reapi::FileNode {
            name: name.to_owned(),
            digest: Some(file.to_proto()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut uploads = vec![(file.to_proto(), file_data, Compressor::Identity)];
    let mut middles = Vec::new();
    for i in 0..3 {
        let mut children = Vec::new();
        for j in 0..2 {
            let (d, bytes) = put(&leaf(&format!("f{i}{j}")));
            uploads.push((d.to_proto(), bytes, Compressor::Identity));
            children.push(reapi::DirectoryNode {
                name: format!("c{j}"),
                digest: Some(d.to_proto()),
            });
        }
        let (d, bytes) = put(&reapi::Directory {
            directories: children,
            ..Default::default()
        });
        uploads.push((d.to_proto(), bytes, Compressor::Identity));
        middles.push(reapi::DirectoryNode {
            name: format!("m{i}"),
            digest: Some(d.to_proto()),
        });
    }
    let (root, bytes) = put(&reapi::Directory {
        directories: middles,
        ..Default::default()
    });
    uploads.push((root.to_proto(), bytes, Compressor::Identity));
    client
        .cas
        .batch_update_blobs(batch_update(Function::Sha256, uploads))
        .await
        .expect("upload tree");

    let mut seen = Vec::new();
    let mut token = String::new();
    let mut calls = 0;
    loop {
        calls += 1;
        let mut stream = client
            .cas
            .get_tree(reapi::GetTreeRequest {
                instance_name: String::new(),
                root_digest: Some(root.to_proto()),
                page_size: 4,
                page_token: token.clone(),
                digest_function: 0,
            })
            .await
            .expect("GetTree")
            .into_inner();
        // Read only the first page of each call, as a paging client does.
        let page = stream.message().await.expect("page").expect("one page");
        assert!(page.directories.len() <= 4);
        seen.extend(page.directories);
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(calls, 3);
    assert_eq!(seen.len(), 10, "root + 3 + 6 directories");
    assert_err(
        client
            .cas
            .get_tree(reapi::GetTreeRequest {
                root_digest: Some(root.to_proto()),
                page_token: "garbage".into(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "page_token",
    );
    let (absent, _) = blob(10, 10);
    assert_err(
        client
            .cas
            .get_tree(reapi::GetTreeRequest {
                root_digest: Some(absent.to_proto()),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "not in the cas",
    );
}

#[tokio::test]
async fn action_cache_is_per_instance_and_misses_when_outputs_are_gone() {
    let dir = tempdir();
    let server = Coordinator::start(dir.path(), &[]);
    let mut client = server.client().await;
    let (action, _) = blob(20, 100);
    let (out, out_data) = blob(21, 1000);
    let (absent, _) = blob(22, 1000);
    client.upload(&out, out_data).await;
    let result = |digest: &Digest| reapi::ActionResult {
        output_files: vec![reapi::OutputFile {
            path: "bin/tool".into(),
            digest: Some(digest.to_proto()),
            is_executable: true,
            ..Default::default()
        }],
        exit_code: 0,
        ..Default::default()
    };
    let update = |instance: &str, action: &Digest, r: reapi::ActionResult| {
        reapi::UpdateActionResultRequest {
            instance_name: instance.into(),
            action_digest: Some(action.to_proto()),
            action_result: Some(r),
            ..Default::default()
        }
    };
    let get = |instance: &str, action: &Digest| reapi::GetActionResultRequest {
        instance_name: instance.into(),
        action_digest: Some(action.to_proto()),
        ..Default::default()
    };
    client
        .ac
        .update_action_result(update("main", &action, result(&out)))
        .await
        .expect("update");
    let hit = client
        .ac
        .get_action_result(get("main", &action))
        .await
        .expect("hit")
        .into_inner();
    assert_eq!(hit, result(&out));
    assert_err(
        client.ac.get_action_result(get("other", &action)).await,
        Code::NotFound,
        "no action result",
    );

    // A result whose output is not in the CAS is a miss, not a broken build.
    let (action2, _) = blob(23, 100);
    client
        .ac
        .update_action_result(update("main", &action2, result(&absent)))
        .await
        .expect("update");
    assert_err(
        client.ac.get_action_result(get("main", &action2)).await,
        Code::NotFound,
        "no action result",
    );

    // Invalid results are refused.
    let mut bad = result(&out);
    bad.output_files[0].digest = Some(reapi::Digest {
        hash: "xyz".into(),
        size_bytes: 1,
    });
    assert_err(
        client
            .ac
            .update_action_result(update("main", &action2, bad))
            .await,
        Code::InvalidArgument,
        "hash",
    );
    let mut bad = result(&out);
    bad.output_files[0].path = "/etc/passwd".into();
    assert_err(
        client
            .ac
            .update_action_result(update("main", &action2, bad))
            .await,
        Code::InvalidArgument,
        "relative",
    );
}

mod refusals;
