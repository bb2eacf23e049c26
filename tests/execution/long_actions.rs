//! Actions longer than the windows that once cut them off: a minute with
//! default settings, and past `abandon_after` with gRPC's C core client.

use std::time::{Duration, Instant};

use crate::common::{self, ActionSpec, Coordinator, fleet};

/// The longest time between two consecutive operation messages, from the
/// times they arrived.
fn largest_gap(arrivals: &[f64]) -> f64 {
    arrivals.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max)
}

/// An action of 65 s with every setting at its default: past the default
/// `abandon_after` (60 s) while the client still waits on its Execute
/// stream, which must get the result; a stream that quiet must carry the
/// operation at least every 30 s (the default `stream_keepalive`), so
/// proxies that cut streams idle for 60 s leave it open.
#[tokio::test]
async fn an_action_longer_than_a_minute_completes_with_default_settings() {
    let (dir, _server, _agent, mut client) = fleet(&[], "1").await;
    let runs = dir.path().join("runs");
    let action = client
        .upload_action(&ActionSpec::shell(&format!(
            "echo run >> {}; sleep 65; echo done",
            runs.display()
        )))
        .await;
    let started = Instant::now();
    let (stream, first) = client.start_execute(&action).await;
    let mut arrivals = vec![started.elapsed().as_secs_f64()];
    assert!(!first.done);
    let (_, response) = common::follow_timed(stream, started, &mut arrivals)
        .await
        .unwrap_or_else(|e| panic!("the stream failed after {:?}: {e}", started.elapsed()));
    assert!(
        response.status.as_ref().is_none_or(|s| s.code == 0),
        "{:?}",
        response.status
    );
    assert_eq!(response.result.expect("result").exit_code, 0);
    assert!(started.elapsed() >= Duration::from_secs(65));
    let ran = std::fs::read_to_string(&runs).expect("the action ran");
    assert_eq!(ran.lines().count(), 1, "the action ran more than once");
    let gap = largest_gap(&arrivals);
    assert!(
        gap <= 35.0,
        "the stream was quiet for {gap:.1}s (messages at {arrivals:?}s)"
    );
}

/// Runs tests/grpc_core_client.py against `server`; its output lines.
async fn grpc_core_client(python: &str, server: &Coordinator, args: &[&str]) -> Vec<String> {
    let mut cmd = std::process::Command::new(python);
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/grpc_core_client.py"
    ))
    .arg(server.addr.to_string())
    .args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .expect("run python3");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{said}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the gRPC core client failed: {said}");
    said.lines().map(str::to_owned).collect()
}

/// The same as Bazel's long action with gRPC's C core as the client: an
/// action longer than a short `abandon_after` completes on its first
/// Execute stream, which carries the operation at least every
/// `stream_keepalive` while the action runs; then a client whose stream
/// breaks comes back with WaitExecution and gets the result of the one run.
#[tokio::test]
async fn a_grpc_core_client_gets_the_result_of_an_action_longer_than_abandon_after() {
    let Some(python) = common::grpc_core_python() else {
        return;
    };
    let (dir, server, _agent, _client) =
        fleet(&["--abandon-after", "3s", "--stream-keepalive", "1s"], "1").await;
    for (name, extra) in [("execute", None), ("reattach", Some("--break-first"))] {
        let runs = dir.path().join(name);
        let script = format!("echo run >> {}; sleep 8; echo done", runs.display());
        let mut args = vec![script.as_str()];
        args.extend(extra);
        let lines = grpc_core_client(python, &server, &args).await;
        let result = lines
            .iter()
            .find_map(|l| l.strip_prefix("result "))
            .unwrap_or_else(|| panic!("no result line: {lines:?}"));
        assert!(
            result.starts_with("exit=0 status=0 executes=1 "),
            "{name}: {result}"
        );
        if extra.is_some() {
            assert!(result.contains(" waits=1 "), "{result}");
        } else {
            assert!(result.contains(" waits=0 "), "{result}");
            let arrivals: Vec<f64> = lines
                .iter()
                .filter_map(|l| l.strip_prefix("update "))
                .map(|l| l.split(' ').next().expect("time").parse().expect("seconds"))
                .collect();
            assert!(arrivals.last().is_some_and(|t| *t >= 8.0), "{arrivals:?}");
            let gap = largest_gap(&arrivals);
            assert!(
                gap <= 3.5,
                "the stream was quiet for {gap:.1}s with a 1s keepalive (messages at {arrivals:?}s)"
            );
        }
        let ran = std::fs::read_to_string(&runs).expect("the action ran");
        assert_eq!(
            ran.lines().count(),
            1,
            "{name}: the action ran more than once"
        );
    }
}
