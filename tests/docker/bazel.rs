//! Bazel with every action in a container, and an agent without an engine.

use super::*;

/// Real Bazel (Debian's 4.2.3) builds and tests the example workspace with
/// every action in a container: the agent offers only Docker, and its
/// count of containers started equals Bazel's count of remote actions.
#[test]
fn bazel_builds_and_tests_with_every_action_in_a_container() {
    if !docker_ready() {
        return;
    }
    if Command::new("bazel").arg("help").output().is_err() {
        let why =
            "bazel is not installed (apt-get install bazel-bootstrap; scripts/test.sh does this)";
        assert!(std::env::var_os("OUTPOST_REQUIRE_BAZEL").is_none(), "{why}");
        eprintln!("SKIPPED: {why}");
        return;
    }
    let scratch = tempdir();
    let workspace = scratch.path().join("workspace");
    let status = Command::new("cp")
        .arg("-a")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bazel-workspace"))
        .arg(&workspace)
        .status()
        .expect("cp");
    assert!(status.success());
    for entry in std::fs::read_dir(&workspace).expect("workspace").flatten() {
        if entry.file_name().to_string_lossy().starts_with("bazel-") {
            std::fs::remove_file(entry.path()).expect("remove a bazel-* symlink");
        }
    }
    let server = Coordinator::start(&scratch.path().join("data"), &[]);
    let metrics = format!("127.0.0.1:{}", common::free_port());
    let _agent = Agent::start(
        &server.endpoint(),
        &scratch.path().join("agent"),
        &[
            "--isolation",
            "docker",
            "--slots",
            "2",
            "--metrics-listen",
            &metrics,
        ],
    );
    let bazel = |args: &[&str]| {
        let (ok, text) = common::bazel(&workspace, &scratch.path().join("bazel-root"), args);
        eprintln!("{text}");
        (ok, text)
    };
    let (ok, text) = bazel(&[
        "test",
        "//...",
        &format!("--remote_executor={}", server.endpoint()),
        &format!("--remote_default_exec_properties=container-image=docker://{IMAGE}"),
        "--remote_timeout=600",
        "--color=no",
        "--curses=no",
        "--noshow_progress",
        "--jobs=4",
    ]);
    let _ = bazel(&["shutdown"]);
    assert!(ok, "bazel test failed (output above)");
    let summary = text
        .lines()
        .find(|l| l.contains(" processes: "))
        .expect("bazel printed a process summary");
    let remote: f64 = summary
        .split(" processes: ")
        .nth(1)
        .expect("summary")
        .trim_end_matches('.')
        .split(", ")
        .filter_map(|part| part.strip_suffix(" remote"))
        .map(|n| n.parse::<f64>().expect("a count"))
        .sum();
    assert!(remote >= 30.0, "every action ran remotely: {summary}");
    assert_eq!(
        agent_metric(&metrics, "outpost_agent_docker_containers_total"),
        remote,
        "one container per remote action: {summary}"
    );
    assert_eq!(
        agent_metric(
            &metrics,
            "outpost_agent_docker_pulls_total{outcome=\"hit\"}"
        ),
        remote
    );
}

/// An agent told to use Docker where no engine answers refuses to start,
/// saying why and what to do.
#[test]
fn an_agent_without_an_engine_refuses_docker() {
    let dir = tempdir();
    let output = Command::new(common::OUTPOST)
        .args([
            "agent",
            "--isolation",
            "docker",
            "--coordinator",
            "grpc://127.0.0.1:1",
        ])
        .arg("--work-dir")
        .arg(dir.path().join("agent"))
        .arg("--docker-socket")
        .arg(dir.path().join("no-engine.sock"))
        .output()
        .expect("run the agent");
    assert!(!output.status.success());
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        said.contains("isolation docker cannot be used") && said.contains("no-engine.sock"),
        "{said}"
    );
}
