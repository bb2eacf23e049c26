//! The streams around an execution. Broken Execute streams: a client whose
//! stream breaks carries on with WaitExecution (BuildStream's
//! buildbox-casd does) and gets the result of the run already under way,
//! never a second run.

mod common;

use std::time::Duration;

use common::{ActionSpec, Client, fleet, follow};
use outpost_proto::reapi;

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
