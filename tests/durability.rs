//! Storage under stress: a kill -9 in the middle of an upload, a restart,
//! and a disk that fills up mid-write.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Coordinator, OUTPOST, blob, files_under, tempdir, upload_id, write_requests};
use outpost_proto::resource::{self, Compressor};
use tonic::Code;

#[tokio::test]
async fn kill_during_a_large_upload_leaves_no_blob_and_allows_a_retry() {
    let dir = tempdir();
    let data_dir = dir.path().join("data");
    let server = Coordinator::start(&data_dir, &[]);
    let client = server.client().await;
    let (d, data) = blob(1, 96 << 20);
    let name = resource::write_name("", &upload_id(), &d, Compressor::Identity);

    // Feed the upload through a channel so it is still running when the
    // coordinator dies.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut upload_client = client.clone();
    let upload = tokio::spawn(async move {
        upload_client
            .bytestream
            .write(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    let requests = write_requests(name, data.clone(), 0, 1 << 20, true);
    let total = requests.len();
    for r in requests.into_iter().take(total / 2) {
        tx.send(r).await.expect("upload stream open");
    }
    // Wait until the coordinator has written part of it to disk.
    let tmp = data_dir.join("tmp");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while files_under(&tmp)
        .iter()
        .all(|f| f.metadata().map_or(0, |m| m.len()) == 0)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the upload never reached the disk"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill();
    let outcome = upload.await.expect("join");
    assert!(
        outcome.is_err(),
        "the upload cannot have succeeded: {outcome:?}"
    );
    drop(tx);

    let server = Coordinator::start(&data_dir, &[]);
    let mut client2 = server.client().await;
    assert_eq!(
        client2.find_missing(&[d]).await,
        vec![d.to_proto()],
        "a half-written blob is present"
    );
    let err = client2.download(&d).await.expect_err("absent");
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        files_under(&tmp).is_empty(),
        "temp files survived the restart"
    );
    let blob_files: Vec<_> = files_under(&data_dir.join("cas"));
    assert!(
        blob_files.is_empty(),
        "blob files without a finished upload: {blob_files:?}"
    );

    client2.upload(&d, data.clone()).await;
    assert!(
        client2.download(&d).await.expect("read") == data.to_vec(),
        "re-uploaded blob reads back wrong"
    );
    drop(client);
}

#[tokio::test]
async fn stored_blobs_and_results_survive_a_restart() {
    let dir = tempdir();
    let server = Coordinator::start(dir.path(), &[]);
    let mut client = server.client().await;
    let blobs: Vec<_> = (0..30)
        .map(|i| blob(100 + i, 10_000 * i as usize + 1))
        .collect();
    for (d, data) in &blobs {
        client.upload(d, data.clone()).await;
    }
    // A clean stop and a kill -9 both keep what was reported stored.
    server.stop().await;
    let server = Coordinator::start(dir.path(), &[]);
    let mut client = server.client().await;
    let (late, late_data) = blob(200, 3 << 20);
    client.upload(&late, late_data.clone()).await;
    server.kill();
    let server = Coordinator::start(dir.path(), &[]);
    let mut client = server.client().await;
    for (d, data) in blobs.iter().chain([(late, late_data)].iter()) {
        assert_eq!(
            client.download(d).await.expect("present after restart"),
            data.to_vec()
        );
    }
}

#[tokio::test]
async fn a_full_disk_refuses_the_upload_and_keeps_serving() {
    if Command::new("unshare").arg("--help").output().is_err() {
        panic!("this test needs unshare (util-linux) to mount a small tmpfs; install util-linux");
    }
    let dir = tempdir();
    let data_dir = dir.path().join("data");
    std::fs::create_dir_all(&data_dir).expect("mkdir");
    // The coordinator runs in its own user and mount namespace, with its
    // data directory on a 40 MiB tmpfs.
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--user",
        "--map-root-user",
        "--mount",
        "sh",
        "-c",
        "mount -t tmpfs -o size=40m tmpfs \"$0\" && exec \"$@\"",
    ])
    .arg(&data_dir)
    .arg(OUTPOST);
    let server = Coordinator::start_with(cmd, &data_dir, &[]);
    let mut client = server.client().await;

    let (first, first_data) = blob(1, 12 << 20);
    client.upload(&first, first_data.clone()).await;
    let (big, big_data) = blob(2, 48 << 20);
    let name = resource::write_name("", &upload_id(), &big, Compressor::Identity);
    let err = client
        .write(name, big_data, 1 << 20)
        .await
        .expect_err("the disk is too small");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("no space left"), "{}", err.message());
    assert_eq!(client.find_missing(&[big]).await, vec![big.to_proto()]);

    // Still serving: an earlier blob reads back, a small one still fits.
    assert_eq!(
        client.download(&first).await.expect("read"),
        first_data.to_vec()
    );
    let (small, small_data) = blob(3, 1 << 20);
    client.upload(&small, small_data.clone()).await;
    assert_eq!(
        client.download(&small).await.expect("read"),
        small_data.to_vec()
    );
}
