//! What a fleet meets in its first week, end to end with the real binary:
//! agents restarted at once, clients that share or cancel an action, a
//! coordinator stopped with work in flight, bad cache entries, and client
//! input far too large to quote back.
//!
//! Agents run with `--isolation none` (the actions write marker files on
//! the host); `tests/sandbox/` covers isolation.

mod common;

use std::time::{Duration, Instant};

use common::{ActionSpec, Agent, Coordinator, fleet, http_get, tempdir, wait_for_fleet};
use outpost_proto::digest::Function;
use outpost_proto::{longrunning, reapi};
use tonic::Code;

/// An action that appends a line to `runs` each time it starts, so the
/// test counts how often it ran.
fn counted(runs: &std::path::Path, then: &str) -> ActionSpec {
    ActionSpec::shell(&format!("echo run >> {}; {then}", runs.display()))
}

fn runs(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

async fn wait_runs(path: &std::path::Path, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while runs(path) < n {
        assert!(Instant::now() < deadline, "the action did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_agent_killed_and_restarted_at_once_runs_its_action_again_unseen() {
    let dir = tempdir();
    // The restarted agent is back long before its reconnect grace ends.
    let server = Coordinator::start(
        &dir.path().join("data"),
        &["--agent-reconnect-grace", "30s"],
    );
    let work = dir.path().join("agent");
    let agent = Agent::start(&server.endpoint(), &work, &["--isolation", "none"]);
    let mut client = server.client().await;
    wait_for_fleet(&mut client).await;
    let marker = dir.path().join("runs");
    let action = client
        .upload_action(&counted(&marker, "sleep 2; echo done"))
        .await;
    let (stream, _) = client.start_execute(&action).await;
    wait_runs(&marker, 1).await;
    agent.kill();
    // What systemd's Restart= does: the same work dir, at once.
    let agent = Agent::start(&server.endpoint(), &work, &["--isolation", "none"]);
    let (_, response) = tokio::time::timeout(Duration::from_secs(60), common::follow(stream))
        .await
        .expect("finished within 60s")
        .expect("no error reaches the client");
    assert!(
        response.status.as_ref().is_none_or(|s| s.code == 0),
        "{response:?}"
    );
    let result = response.result.expect("a result");
    assert_eq!(result.exit_code, 0);
    assert_eq!(runs(&marker), 2, "ran once before the kill and once after");
    assert_eq!(
        agent.count("the coordinator did not answer the registration"),
        0,
        "the agent flapped"
    );
}

#[tokio::test]
async fn one_client_cancelling_a_merged_action_leaves_it_to_the_other() {
    let (dir, server, _agent, mut first) = fleet(&[], "2").await;
    let mut second = server.client().await;
    let marker = dir.path().join("runs");
    let action = first
        .upload_action(&counted(&marker, "sleep 3; echo done"))
        .await;
    let (first_stream, op) = first.start_execute(&action).await;
    let (second_stream, op2) = second.start_execute(&action).await;
    assert_eq!(op.name, op2.name, "identical actions were not merged");
    wait_runs(&marker, 1).await;
    first
        .operations
        .cancel_operation(longrunning::CancelOperationRequest {
            name: op.name.clone(),
        })
        .await
        .expect("CancelOperation");
    drop(first_stream);
    let (_, response) = common::follow(second_stream)
        .await
        .expect("the other client gets the result");
    assert!(
        response.status.as_ref().is_none_or(|s| s.code == 0),
        "{response:?}"
    );
    assert_eq!(response.result.expect("a result").exit_code, 0);
    assert_eq!(runs(&marker), 1);
    // Alone, a client's CancelOperation does cancel.
    let lone = first
        .upload_action(&counted(&dir.path().join("lone"), "sleep 60"))
        .await;
    let (stream, op) = first.start_execute(&lone).await;
    wait_runs(&dir.path().join("lone"), 1).await;
    first
        .operations
        .cancel_operation(longrunning::CancelOperationRequest {
            name: op.name.clone(),
        })
        .await
        .expect("CancelOperation");
    let (_, response) = common::follow(stream).await.expect("an answer");
    assert_eq!(
        response.status.expect("status").code,
        Code::Cancelled as i32
    );
}

#[tokio::test]
async fn a_stopping_coordinator_lets_waiting_clients_have_their_results() {
    let (dir, server, _agent, mut client) = fleet(&["--shutdown-grace", "60s"], "2").await;
    let marker = dir.path().join("runs");
    let action = client
        .upload_action(&counted(&marker, "sleep 3; echo done"))
        .await;
    let (stream, _) = client.start_execute(&action).await;
    wait_runs(&marker, 1).await;
    let stopped_at = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let (_, response) = common::follow(stream)
        .await
        .expect("the stream ends with the result, not UNAVAILABLE");
    assert_eq!(response.result.expect("a result").exit_code, 0);
    // With nobody waiting any more it stops well before its grace.
    let mut server = server;
    let deadline = stopped_at + Duration::from_secs(30);
    while server.is_running() {
        assert!(Instant::now() < deadline, "still running 30s after SIGTERM");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_tree_digest_that_is_not_a_tree_is_refused() {
    let dir = tempdir();
    let server = Coordinator::start(&dir.path().join("data"), &[]);
    let mut client = server.client().await;
    let (not_a_tree, data) = (
        Function::Sha256.digest_of(b"\xff\xff\xff not a tree"),
        bytes::Bytes::from_static(b"\xff\xff\xff not a tree"),
    );
    client.upload(&not_a_tree, data).await;
    let action = Function::Sha256.digest_of(b"some action");
    let err = client
        .ac
        .update_action_result(reapi::UpdateActionResultRequest {
            action_digest: Some(action.to_proto()),
            action_result: Some(reapi::ActionResult {
                output_directories: vec![reapi::OutputDirectory {
                    path: "out".into(),
                    tree_digest: Some(not_a_tree.to_proto()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("not a Tree"), "{}", err.message());
    // Nothing was stored: the action is a plain miss.
    let err = client
        .ac
        .get_action_result(reapi::GetActionResultRequest {
            action_digest: Some(action.to_proto()),
            ..Default::default()
        })
        .await
        .expect_err("a miss");
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn huge_client_input_is_not_echoed_back() {
    let dir = tempdir();
    let server = Coordinator::start(&dir.path().join("data"), &[]);
    let mut client = server.client().await;
    let name = format!("operations/{}", "x".repeat(100_000));
    let err = client
        .execution
        .wait_execution(reapi::WaitExecutionRequest { name: name.clone() })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().len() < 1000, "{}", err.message().len());
    let err = client
        .operations
        .get_operation(longrunning::GetOperationRequest { name: name.clone() })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = client
        .operations
        .cancel_operation(longrunning::CancelOperationRequest { name })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().len() < 1000, "{}", err.message().len());
    let action = client
        .upload_action(&ActionSpec::shell("true").with_platform("Pool", &"p".repeat(100_000)))
        .await;
    let err = client.execute(&action, true).await.expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().len() < 1000 && err.message().contains("too long"),
        "{}",
        &err.message()[..err.message().len().min(300)]
    );
}

#[tokio::test]
async fn a_fresh_coordinator_exports_every_outcome_series() {
    let dir = tempdir();
    let server = Coordinator::start(&dir.path().join("data"), &[]);
    let (_, body) = http_get(server.addr, "/metrics").await;
    for series in [
        r#"outpost_actions_total{outcome="success"} 0"#,
        r#"outpost_actions_total{outcome="error"} 0"#,
        r#"outpost_action_cache_lookups_total{result="miss"} 0"#,
        r#"outpost_cas_lookups_total{result="hit"} 0"#,
        r#"outpost_action_stage_seconds_count{stage="execution"} 0"#,
    ] {
        assert!(body.contains(series), "{series} missing from\n{body}");
    }
}

#[tokio::test]
async fn a_sub_second_timeout_is_reported_as_such() {
    let (_dir, _server, _agent, mut client) = fleet(&[], "2").await;
    let mut spec = ActionSpec::shell("sleep 30");
    spec.timeout = Some(Duration::from_millis(500));
    let action = client.upload_action(&spec).await;
    let (_, response) = client.execute(&action, true).await.expect("execute");
    let status = response.status.expect("status");
    assert_eq!(status.code, Code::DeadlineExceeded as i32);
    assert!(
        status.message.contains("timeout of 500ms"),
        "{}",
        status.message
    );
}
