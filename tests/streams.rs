//! The streams around an execution. Broken Execute streams: a client whose
//! stream breaks carries on with WaitExecution (BuildStream's
//! buildbox-casd does) and gets the result of the run already under way,
//! never a second run. Live output: a running action's stdout and stderr
//! through ByteStream Read under the names its operation's metadata gives,
//! the status page and `outpost logs`.

mod common;

use std::time::{Duration, Instant};

use common::{ActionSpec, Client, OUTPOST, fleet, follow, http_get};
use outpost_proto::bytestream::ReadRequest;
use outpost_proto::digest::{Digest, Function};
use outpost_proto::{longrunning, reapi};
use prost::Message as _;

/// How many times the action ran: lines in its side-effect file.
fn runs(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_execute_stream_resumes_with_wait_execution_and_runs_once() {
    let (dir, server, _agent, mut client) = fleet(&[], "2").await;
    let log = dir.path().join("runs");
    // Unisolated (`fleet` runs `none`), so the action can leave a mark on
    // the host each time it runs.
    let spec = ActionSpec::shell(&format!(
        "echo ran >> '{}'; sleep 2; echo the output",
        log.display()
    ));
    let action = client.upload_action(&spec).await;

    // The Execute call on a connection of its own, cut (the whole
    // connection closes) right after the first Operation.
    let name = {
        let mut doomed = Client::connect(&server.endpoint()).await;
        let (stream, first) = doomed.start_execute(&action).await;
        assert!(!first.done, "a 2 s action is not done at once");
        drop(stream);
        drop(doomed);
        first.name
    };
    assert!(name.starts_with("operations/"), "{name}");

    let stream = client
        .execution
        .wait_execution(reapi::WaitExecutionRequest { name: name.clone() })
        .await
        .expect("WaitExecution attaches to the running operation")
        .into_inner();
    let (waited_name, response) = follow(stream).await.expect("the operation completes");
    assert_eq!(waited_name, name);
    assert!(
        response.status.as_ref().is_none_or(|s| s.code == 0),
        "{:?}",
        response.status
    );
    let result = response.result.expect("a result");
    assert_eq!(result.exit_code, 0);
    assert_eq!(
        client.text(result.stdout_digest.as_ref()).await,
        "the output\n"
    );

    // WaitExecution after the end answers with the same result at once.
    let again = client
        .execution
        .wait_execution(reapi::WaitExecutionRequest { name: name.clone() })
        .await
        .expect("a finished operation is still known")
        .into_inner();
    let (_, response_again) = follow(again).await.expect("done");
    assert_eq!(response_again.result, Some(result));

    // Ran exactly once, and nothing runs it again later.
    assert_eq!(runs(&log), 1, "the action ran {} times", runs(&log));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(runs(&log), 1, "the action ran again after it finished");
}

/// The operation's metadata.
fn metadata(op: &longrunning::Operation) -> reapi::ExecuteOperationMetadata {
    let any = op.metadata.as_ref().expect("metadata");
    reapi::ExecuteOperationMetadata::decode(any.value.as_slice()).expect("ExecuteOperationMetadata")
}

/// Reads `name` from `offset` to its end, noting when each chunk came.
async fn read_all(
    client: &mut Client,
    name: &str,
    offset: i64,
) -> Result<Vec<(Instant, Vec<u8>)>, tonic::Status> {
    let mut stream = client
        .bytestream
        .read(ReadRequest {
            resource_name: name.to_owned(),
            read_offset: offset,
            read_limit: 0,
        })
        .await?
        .into_inner();
    let mut chunks = Vec::new();
    while let Some(r) = stream.message().await? {
        chunks.push((Instant::now(), r.data.to_vec()));
    }
    Ok(chunks)
}

fn joined(chunks: &[(Instant, Vec<u8>)]) -> Vec<u8> {
    chunks.iter().flat_map(|(_, d)| d.clone()).collect()
}

async fn blob(client: &mut Client, d: Option<&reapi::Digest>) -> Vec<u8> {
    match d {
        None => Vec::new(),
        Some(d) => {
            let d = Digest::from_proto(d, Function::Sha256).expect("digest");
            client.download(&d).await.expect("the blob")
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_actions_output_streams_live_and_ends_as_its_blobs() {
    let (_dir, server, _agent, mut client) = fleet(&[], "2").await;
    // A line a second for 5 s on stdout, two lines on stderr.
    let spec = ActionSpec::shell(
        "echo starting >&2; for i in 1 2 3 4 5; do echo line $i; sleep 1; done; echo done >&2",
    );
    let action = client.upload_action(&spec).await;
    let (mut stream, first) = client.start_execute(&action).await;
    let name = first.name.clone();
    // The stream names come with the EXECUTING stage.
    let mut op = first;
    while metadata(&op).stdout_stream_name.is_empty() {
        assert!(!op.done, "the action finished before its output streamed");
        op = stream
            .message()
            .await
            .expect("stream")
            .expect("an operation");
    }
    let meta = metadata(&op);
    assert_eq!(meta.stdout_stream_name, format!("{name}/streams/stdout"));
    assert_eq!(meta.stderr_stream_name, format!("{name}/streams/stderr"));

    let readers = {
        let (mut a, mut b, mut c) = (client.clone(), client.clone(), client.clone());
        let (out, err) = (
            meta.stdout_stream_name.clone(),
            meta.stderr_stream_name.clone(),
        );
        let out_again = out.clone();
        (
            tokio::spawn(async move { read_all(&mut a, &out, 0).await }),
            tokio::spawn(async move { read_all(&mut b, &err, 0).await }),
            // From an offset: past "line 1\n".
            tokio::spawn(async move { read_all(&mut c, &out_again, 7).await }),
        )
    };

    // While it runs: the status page lists it, and its live view shows
    // what came so far.
    let deadline = Instant::now() + Duration::from_secs(4);
    let id = name.trim_start_matches("operations/").to_owned();
    loop {
        let (status, body) = http_get(server.addr, &format!("/live/operations/{id}/stdout")).await;
        assert_eq!(status, 200, "{body}");
        if body.starts_with("line 1\n") {
            let (_, page) = http_get(server.addr, "/").await;
            assert!(page.contains("Running actions"), "{page}");
            assert!(page.contains(&format!("/live/{name}/stdout")), "{page}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no live output within 4 s: {body:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (_, response) = follow(stream).await.expect("the operation completes");
    let completed = Instant::now();
    let result = response.result.expect("a result");
    assert_eq!(result.exit_code, 0);
    let stdout = blob(&mut client, result.stdout_digest.as_ref()).await;
    let stderr = blob(&mut client, result.stderr_digest.as_ref()).await;
    assert_eq!(
        String::from_utf8_lossy(&stdout),
        "line 1\nline 2\nline 3\nline 4\nline 5\n"
    );

    let out = readers.0.await.expect("task").expect("stdout read");
    let err = readers.1.await.expect("task").expect("stderr read");
    let out_from_7 = readers.2.await.expect("task").expect("offset read");
    // The first lines came while the action still ran (it ran 4 s more).
    let (first_at, first) = &out[0];
    assert!(
        first.starts_with(b"line 1"),
        "{:?}",
        String::from_utf8_lossy(first)
    );
    assert!(
        completed.duration_since(*first_at) > Duration::from_secs(2),
        "the first line came {:?} before the end",
        completed.duration_since(*first_at)
    );
    // Complete reads are the blobs, byte for byte.
    assert_eq!(joined(&out), stdout);
    assert_eq!(joined(&err), stderr);
    assert_eq!(joined(&out_from_7), stdout[7..]);

    // After the end the names still serve the blobs, from any offset;
    // past the end is out of range.
    let again = read_all(&mut client, &meta.stdout_stream_name, 14)
        .await
        .expect("read");
    assert_eq!(joined(&again), stdout[14..]);
    let past = read_all(&mut client, &meta.stdout_stream_name, 1000).await;
    assert_eq!(
        past.expect_err("past the end").code(),
        tonic::Code::OutOfRange
    );
    let unknown = read_all(&mut client, "operations/nosuch/streams/stdout", 0).await;
    assert_eq!(unknown.expect_err("unknown").code(), tonic::Code::NotFound);

    // `outpost logs` prints the whole output of the finished operation.
    let logs = std::process::Command::new(OUTPOST)
        .args(["logs", &name, "--coordinator", &server.endpoint()])
        .output()
        .expect("outpost logs");
    assert!(
        logs.status.success(),
        "{}",
        String::from_utf8_lossy(&logs.stderr)
    );
    assert_eq!(logs.stdout, stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outpost_logs_follow_prints_the_output_as_it_comes() {
    let (_dir, server, _agent, mut client) = fleet(&[], "1").await;
    let spec = ActionSpec::shell("for i in 1 2 3; do echo tick $i; sleep 1; done; echo oops >&2");
    let action = client.upload_action(&spec).await;
    let (stream, first) = client.start_execute(&action).await;
    let name = first.name;
    let endpoint = server.endpoint();
    let follow_logs = |stream: &'static str| {
        let mut cmd = tokio::process::Command::new(OUTPOST);
        cmd.args(["logs", &name, "--follow", "--coordinator", &endpoint]);
        if stream == "stderr" {
            cmd.arg("--stderr");
        }
        cmd.output()
    };
    let (out, err) = tokio::join!(follow_logs("stdout"), follow_logs("stderr"));
    let (out, err) = (out.expect("outpost logs"), err.expect("outpost logs"));
    // It ends when the action ends, with all of it.
    let (_, response) = follow(stream).await.expect("done");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "tick 1\ntick 2\ntick 3\n"
    );
    assert_eq!(String::from_utf8_lossy(&err.stdout), "oops\n");
    assert_eq!(response.result.expect("a result").exit_code, 0);
    // An operation that does not exist is an error that says so.
    let missing = std::process::Command::new(OUTPOST)
        .args([
            "logs",
            "operations/nosuch",
            "--follow",
            "--coordinator",
            &endpoint,
        ])
        .output()
        .expect("outpost logs");
    assert!(!missing.status.success());
    let text = String::from_utf8_lossy(&missing.stderr);
    assert!(
        text.contains("operations/nosuch") && text.contains("not known"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_skipped_under_the_rate_bound_comes_from_the_blob() {
    let (_dir, _server, _agent, mut client) = fleet(&[], "1").await;
    // 2 MB at once: far more than the agent sends live, so it skips to
    // the newest bytes; then a pause, so the reader waits on the gap.
    let spec = ActionSpec::shell("head -c 2000000 /dev/zero | tr '\\0' x; echo; sleep 2; echo end");
    let action = client.upload_action(&spec).await;
    let (mut stream, first) = client.start_execute(&action).await;
    let name = first.name.clone();
    let mut op = first;
    while metadata(&op).stdout_stream_name.is_empty() {
        op = stream
            .message()
            .await
            .expect("stream")
            .expect("an operation");
    }
    let stdout_name = metadata(&op).stdout_stream_name;
    let mut reader = client.clone();
    let read = tokio::spawn(async move { read_all(&mut reader, &stdout_name, 0).await });
    let (_, response) = follow(stream).await.expect("done");
    let result = response.result.expect("a result");
    let stdout = blob(&mut client, result.stdout_digest.as_ref()).await;
    assert_eq!(stdout.len(), 2_000_005, "{name}");
    let read = joined(&read.await.expect("task").expect("read"));
    // Never a guessed byte: the whole read is the blob.
    assert_eq!(read.len(), stdout.len());
    assert!(read == stdout, "the read differs from the stdout blob");
}
