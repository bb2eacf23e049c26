use std::time::Duration;

use bytes::Bytes;
use outpost_proto::digest::{Digest, Function};
use tokio_stream::StreamExt;

use super::EmbeddedStore;
use crate::storage::{ActionCache, Cas, Error};

async fn open(dir: &std::path::Path, max: u64) -> (EmbeddedStore, tokio::task::JoinHandle<()>) {
    EmbeddedStore::open(dir.to_owned(), max)
        .await
        .expect("open store")
}

fn blob(seed: u8, len: usize) -> (Digest, Bytes) {
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    (Function::Sha256.digest_of(&data), Bytes::from(data))
}

async fn read_to_vec(
    store: &EmbeddedStore,
    d: Digest,
    offset: u64,
    limit: Option<u64>,
) -> Option<Vec<u8>> {
    let mut stream = store.read(d, offset, limit).await.expect("read")?;
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.expect("chunk"));
    }
    Some(out)
}

#[tokio::test]
async fn roundtrip_survives_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (d, data) = blob(1, 3 << 20);
    let (small, small_data) = blob(2, 100);
    {
        let (store, committer) = open(dir.path(), 1 << 30).await;
        assert_eq!(
            store.find_missing(vec![d, small]).await.expect("find"),
            vec![d, small]
        );
        Cas::put(&store, d, data.clone()).await.expect("put large");
        Cas::put(&store, small, small_data.clone())
            .await
            .expect("put small");
        store
            .update_action_result("inst", small, Bytes::from_static(b"result"))
            .await
            .expect("ac put");
        assert!(
            store
                .find_missing(vec![d, small])
                .await
                .expect("find")
                .is_empty()
        );
        assert_eq!(store.total_bytes(), d.size + small.size);
        drop(store);
        committer.await.expect("committer ends");
    }
    let (store, _committer) = open(dir.path(), 1 << 30).await;
    assert!(
        store
            .find_missing(vec![d, small])
            .await
            .expect("find")
            .is_empty()
    );
    assert_eq!(
        read_to_vec(&store, d, 0, None).await.expect("present"),
        data.to_vec()
    );
    assert_eq!(
        read_to_vec(&store, d, 10, Some(5)).await.expect("present"),
        data[10..15].to_vec()
    );
    assert_eq!(
        store.read_all(small).await.expect("read").expect("present"),
        small_data
    );
    assert_eq!(
        store
            .get_action_result("inst", small)
            .await
            .expect("ac get"),
        Some(Bytes::from_static(b"result"))
    );
    assert_eq!(
        store
            .get_action_result("other", small)
            .await
            .expect("ac get"),
        None
    );
}

#[tokio::test]
async fn wrong_data_is_refused_and_not_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _c) = open(dir.path(), 1 << 30).await;
    let (d, data) = blob(3, 2 << 20);
    let mut corrupted = data.to_vec();
    corrupted[12345] ^= 1;
    assert!(matches!(
        Cas::put(&store, d, Bytes::from(corrupted)).await,
        Err(Error::DigestMismatch { .. })
    ));
    assert!(matches!(
        Cas::put(&store, d, data.slice(1..)).await,
        Err(Error::SizeMismatch { .. })
    ));
    let mut longer = data.to_vec();
    longer.push(0);
    assert!(matches!(
        Cas::put(&store, d, Bytes::from(longer)).await,
        Err(Error::SizeMismatch { .. })
    ));
    assert_eq!(store.find_missing(vec![d]).await.expect("find"), vec![d]);
    let left: Vec<_> = std::fs::read_dir(dir.path().join("tmp"))
        .expect("tmp")
        .flatten()
        .flat_map(|d| {
            std::fs::read_dir(d.path())
                .expect("fanout")
                .flatten()
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(left.is_empty(), "temp files left: {left:?}");
}

#[tokio::test]
async fn empty_blob_always_exists() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _c) = open(dir.path(), 1 << 30).await;
    for f in [Function::Sha256, Function::Blake3] {
        let empty = f.empty();
        assert!(
            store
                .find_missing(vec![empty])
                .await
                .expect("find")
                .is_empty()
        );
        assert_eq!(read_to_vec(&store, empty, 0, None).await, Some(Vec::new()));
        Cas::put(&store, empty, Bytes::new())
            .await
            .expect("empty put");
    }
}

#[tokio::test]
async fn concurrent_identical_uploads_store_one_blob() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _c) = open(dir.path(), 1 << 30).await;
    let (d, data) = blob(4, 1 << 20);
    let uploads: Vec<_> = (0..16)
        .map(|_| {
            let store = store.clone();
            let data = data.clone();
            tokio::spawn(async move { Cas::put(&store, d, data).await })
        })
        .collect();
    for u in uploads {
        u.await.expect("join").expect("put");
    }
    assert_eq!(store.total_bytes(), d.size);
    assert_eq!(
        read_to_vec(&store, d, 0, None).await.expect("present"),
        data.to_vec()
    );
}

#[tokio::test]
async fn eviction_is_lru_and_spares_blobs_in_use() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bound = 12 << 20;
    let (store, _c) = open(dir.path(), bound).await;
    let tick = || tokio::time::sleep(Duration::from_millis(1100));
    // Oldest first: a pinned blob, then a large blob with a read open on it
    // (larger than the reader buffers, so the read holds the file).
    let (pinned, data) = blob(10, 1 << 20);
    let _pin = store.pin(&[pinned]);
    Cas::put(&store, pinned, data).await.expect("put");
    tick().await;
    let (reading, data) = blob(11, 8 << 20);
    Cas::put(&store, reading, data.clone()).await.expect("put");
    let mut stream = store
        .read(reading, 0, None)
        .await
        .expect("read")
        .expect("present");
    tick().await;
    let newer: Vec<_> = (0..4).map(|i| blob(20 + i, 1 << 20)).collect();
    for (d, data) in &newer {
        Cas::put(&store, *d, data.clone()).await.expect("put");
        tick().await;
    }
    // Maintenance runs every second; give it one more round.
    tick().await;
    assert!(
        store.total_bytes() <= bound,
        "over the bound: {}",
        store.total_bytes()
    );
    let missing = store
        .find_missing(vec![
            pinned, reading, newer[0].0, newer[1].0, newer[2].0, newer[3].0,
        ])
        .await
        .expect("find");
    assert_eq!(
        missing,
        vec![newer[0].0, newer[1].0],
        "evicted the wrong blobs"
    );
    let mut read = Vec::new();
    while let Some(chunk) = stream.next().await {
        read.extend_from_slice(&chunk.expect("chunk"));
    }
    assert_eq!(read, data.to_vec());
}

#[tokio::test]
async fn blob_larger_than_the_bound_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _c) = open(dir.path(), 1 << 20).await;
    let (d, _) = blob(5, (1 << 20) + 1);
    assert!(matches!(store.writer(d).await, Err(Error::TooLarge { .. })));
}

#[tokio::test]
async fn recorded_results_are_read_at_once_and_committed_later() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (action, _) = blob(7, 10);
    {
        let (store, committer) = open(dir.path(), 1 << 30).await;
        store
            .record_action_result("inst", action, Bytes::from_static(b"first"))
            .await
            .expect("record");
        // Read back before the committer may have run.
        assert_eq!(
            store.get_action_result("inst", action).await.expect("get"),
            Some(Bytes::from_static(b"first"))
        );
        // A client's durable write afterwards wins, in the database too.
        store
            .update_action_result("inst", action, Bytes::from_static(b"second"))
            .await
            .expect("update");
        assert_eq!(
            store.get_action_result("inst", action).await.expect("get"),
            Some(Bytes::from_static(b"second"))
        );
        assert!(
            store
                .shared
                .core
                .pending_results
                .lock()
                .expect("lock")
                .is_empty(),
            "committed results leave the pending map"
        );
        drop(store);
        committer.await.expect("committer ends");
    }
    let (store, _committer) = open(dir.path(), 1 << 30).await;
    assert_eq!(
        store.get_action_result("inst", action).await.expect("get"),
        Some(Bytes::from_static(b"second"))
    );
}
