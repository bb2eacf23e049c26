//! Remote execution end to end: a coordinator and agents as separate
//! processes, driven over plain REAPI.
//!
//! These tests watch actions from the host (pid files, counters in the
//! test's directory), which the sandbox rightly forbids, so their agents
//! run with `--isolation none`; `tests/sandbox/` covers isolation.

#[path = "../common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{ActionSpec, Agent, Coordinator, fleet, free_port, tempdir, wait_for_fleet};
use outpost_proto::reapi;
use prost::Message as _;
use tonic::Code;

fn pid_alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

async fn read_pid(path: &std::path::Path) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(pid) = text.trim().parse()
        {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_action_runs_and_its_outputs_come_back() {
    let (_dir, _server, _agent, mut client) = fleet(&[], "2").await;

    let mut spec = ActionSpec::shell(
        "mkdir -p out/tree/sub && cat input.txt > out/copy.txt && echo leaf > out/tree/sub/leaf \
         && ln -s copy.txt out/link && echo to-stdout && echo to-stderr >&2 && exit 3",
    );
    spec.inputs = vec![(
        "input.txt".into(),
        bytes::Bytes::from_static(b"hello input\n"),
    )];
    spec.output_paths = vec!["out/copy.txt".into(), "out/tree".into(), "out/link".into()];
    let action = client.upload_action(&spec).await;
    let (_, response) = client.execute(&action, false).await.expect("execute");
    let result = response.result.expect("a result");
    assert_eq!(
        result.exit_code, 3,
        "a non-zero exit is a result, not an error"
    );
    assert_eq!(response.status.map_or(0, |s| s.code), 0);
    let copy = &result.output_files[0];
    assert_eq!(copy.path, "out/copy.txt");
    let digest = outpost_proto::digest::Digest::from_proto_opt(
        copy.digest.as_ref(),
        outpost_proto::digest::Function::Sha256,
    )
    .expect("digest");
    assert_eq!(
        client.download(&digest).await.expect("output"),
        b"hello input\n"
    );
    assert_eq!(result.output_directories[0].path, "out/tree");
    assert_eq!(result.output_symlinks[0].target, "copy.txt");
    let stdout = outpost_proto::digest::Digest::from_proto_opt(
        result.stdout_digest.as_ref(),
        outpost_proto::digest::Function::Sha256,
    )
    .expect("stdout");
    assert_eq!(
        client.download(&stdout).await.expect("stdout"),
        b"to-stdout\n"
    );
    let meta = result.execution_metadata.expect("metadata");
    assert!(!meta.worker.is_empty());
    for t in [
        meta.queued_timestamp,
        meta.worker_start_timestamp,
        meta.input_fetch_start_timestamp,
        meta.input_fetch_completed_timestamp,
        meta.execution_start_timestamp,
        meta.execution_completed_timestamp,
        meta.output_upload_start_timestamp,
        meta.output_upload_completed_timestamp,
        meta.worker_completed_timestamp,
    ] {
        assert!(t.is_some(), "a stage timestamp is missing");
    }
    // A failed action is not cached: it runs again.
    let (_, again) = client.execute(&action, false).await.expect("execute");
    assert!(!again.cached_result);
    // A successful one is.
    let ok = client
        .upload_action(&ActionSpec::shell("echo cached"))
        .await;
    let (_, first) = client.execute(&ok, false).await.expect("execute");
    assert!(!first.cached_result);
    let (_, second) = client.execute(&ok, false).await.expect("execute");
    assert!(
        second.cached_result,
        "the second run should come from the action cache"
    );
}

#[tokio::test]
async fn unsatisfiable_platforms_fail_fast_with_the_reason() {
    let (_dir, _server, _agent, mut client) = fleet(&["--startup-grace", "0s"], "1").await;
    for (name, value, words) in [
        (
            "OSFamily",
            "plan9",
            "OSFamily=plan9 (the fleet offers OSFamily=linux)",
        ),
        ("gpu-count", "4", "gpu-count >= 4"),
    ] {
        let action = client
            .upload_action(&ActionSpec::shell("true").with_platform(name, value))
            .await;
        let started = Instant::now();
        let err = client
            .execute(&action, true)
            .await
            .expect_err("unsatisfiable");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "took {:?}",
            started.elapsed()
        );
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.message().contains(words), "{}", err.message());
    }
    // Configuration-only properties do not stop an action from running.
    let action = client
        .upload_action(
            &ActionSpec::shell("true")
                .with_platform("OSFamily", "Linux")
                .with_platform("dockerNetwork", "off"),
        )
        .await;
    let (_, r) = client.execute(&action, true).await.expect("runs");
    assert_eq!(r.result.expect("result").exit_code, 0);
}

#[tokio::test]
async fn missing_inputs_are_listed() {
    let dir = tempdir();
    let server = Coordinator::start(&dir.path().join("data"), &[]);
    let mut client = server.client().await;
    let (absent, _) = common::blob(99, 10);
    let err = client
        .execute(&absent, false)
        .await
        .expect_err("missing action");
    assert_eq!(err.code(), Code::FailedPrecondition);
    let details = tonic_types::StatusExt::get_error_details(&err);
    let failure = details
        .precondition_failure()
        .expect("a PreconditionFailure");
    assert_eq!(failure.violations[0].r#type, "MISSING");
    assert_eq!(failure.violations[0].subject, format!("blobs/{absent}"));
}

#[tokio::test]
async fn identical_concurrent_executes_run_once() {
    let (dir, _server, _agent, mut client) = fleet(&[], "4").await;
    let count = dir.path().join("count");
    let action = client
        .upload_action(&ActionSpec::shell(&format!(
            "echo ran >> {} && sleep 2",
            count.display()
        )))
        .await;
    let calls: Vec<_> = (0..200)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move { client.execute(&action, false).await })
        })
        .collect();
    for call in calls {
        let (_, r) = call.await.expect("join").expect("execute");
        assert_eq!(r.result.expect("result").exit_code, 0);
    }
    let runs = std::fs::read_to_string(&count)
        .expect("the action ran")
        .lines()
        .count();
    assert_eq!(
        runs, 1,
        "200 identical executions ran the action {runs} times"
    );
}

#[tokio::test]
async fn cancelling_kills_the_action_and_what_it_left_behind() {
    let (dir, _server, _agent, mut client) = fleet(&[], "2").await;
    let main_pid = dir.path().join("main.pid");
    let daemon_pid = dir.path().join("daemon.pid");
    // The action starts a daemon in its own session, then sleeps.
    let script = format!(
        "setsid sh -c 'echo $$ > {d}; exec sleep 300' & echo $$ > {m}; sleep 300",
        d = daemon_pid.display(),
        m = main_pid.display()
    );
    let action = client.upload_action(&ActionSpec::shell(&script)).await;
    let (stream, first) = client.start_execute(&action).await;
    let main = read_pid(&main_pid).await;
    let daemon = read_pid(&daemon_pid).await;
    assert!(pid_alive(main) && pid_alive(daemon));
    client
        .operations
        .cancel_operation(outpost_proto::longrunning::CancelOperationRequest {
            name: first.name.clone(),
        })
        .await
        .expect("cancel");
    let (_, response) = common::follow(stream).await.expect("the operation ends");
    assert_eq!(
        response.status.expect("status").code,
        Code::Cancelled as i32
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_alive(main) || pid_alive(daemon) {
        assert!(
            Instant::now() < deadline,
            "processes survived the cancellation"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_timeout_kills_the_action_and_says_so() {
    let (dir, _server, _agent, mut client) = fleet(&[], "1").await;
    let pid_file = dir.path().join("slow.pid");
    let mut spec = ActionSpec::shell(&format!(
        "echo $$ > {}; echo started; sleep 300",
        pid_file.display()
    ));
    spec.timeout = Some(Duration::from_secs(1));
    let action = client.upload_action(&spec).await;
    let started = Instant::now();
    let (_, response) = client.execute(&action, true).await.expect("execute");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(
        response.status.expect("status").code,
        Code::DeadlineExceeded as i32
    );
    let result = response.result.expect("what it produced until then");
    let stdout = outpost_proto::digest::Digest::from_proto_opt(
        result.stdout_digest.as_ref(),
        outpost_proto::digest::Function::Sha256,
    )
    .expect("stdout");
    assert_eq!(
        client.download(&stdout).await.expect("stdout"),
        b"started\n"
    );
    assert!(!pid_alive(read_pid(&pid_file).await));
    // Too long a timeout is refused.
    let mut spec = ActionSpec::shell("true");
    spec.timeout = Some(Duration::from_secs(7 * 3600));
    let action = client.upload_action(&spec).await;
    let err = client
        .execute(&action, true)
        .await
        .expect_err("over the maximum");
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn work_of_a_killed_agent_runs_on_another() {
    let dir = tempdir();
    let server = Coordinator::start(&dir.path().join("data"), &["--agent-reconnect-grace", "1s"]);
    let first = Agent::start(
        &server.endpoint(),
        &dir.path().join("first"),
        &["--slots", "1", "--isolation", "none"],
    );
    let mut client = server.client().await;
    wait_for_fleet(&mut client).await;
    let marker = dir.path().join("started");
    let action = client
        .upload_action(&ActionSpec::shell(&format!(
            "echo x >> {}; sleep 3; echo finished",
            marker.display()
        )))
        .await;
    let running = client.execute_in_background(action);
    read_pid_or_text(&marker).await;
    let second = Agent::start(
        &server.endpoint(),
        &dir.path().join("second"),
        &["--slots", "1", "--isolation", "none"],
    );
    second
        .wait_for("registered with the coordinator", Duration::from_secs(30))
        .await;
    first.kill();
    let (_, response) = running
        .await
        .expect("join")
        .expect("the client sees no error");
    let result = response.result.expect("result");
    assert_eq!(result.exit_code, 0);
    assert_eq!(
        result.execution_metadata.expect("metadata").worker,
        second.id()
    );
    assert_eq!(
        std::fs::read_to_string(&marker)
            .expect("marker")
            .lines()
            .count(),
        2,
        "ran twice: killed, then retried"
    );
}

async fn read_pid_or_text(path: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(path).map_or(true, |m| m.len() == 0) {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn agents_reconnect_after_a_coordinator_restart_mid_action() {
    let dir = tempdir();
    let listen = format!("127.0.0.1:{}", free_port());
    let data = dir.path().join("data");
    let server = Coordinator::start_at(&data, &listen, &[]);
    let agent = Agent::start(
        &server.endpoint(),
        &dir.path().join("agent"),
        &["--slots", "1", "--isolation", "none"],
    );
    let mut client = server.client().await;
    wait_for_fleet(&mut client).await;
    // An action is running when the coordinator dies.
    let marker = dir.path().join("started");
    let pid_file = dir.path().join("long.pid");
    let long = client
        .upload_action(&ActionSpec::shell(&format!(
            "echo $$ > {}; echo x > {}; sleep 300",
            pid_file.display(),
            marker.display()
        )))
        .await;
    let running = client.execute_in_background(long);
    read_pid_or_text(&marker).await;
    server.kill();
    assert!(
        running.await.expect("join").is_err(),
        "the client's stream must break with the coordinator"
    );
    let server = Coordinator::start_at(&data, &listen, &[]);
    let mut client = server.client().await;
    // Queued until the agent is back, then run; nobody touched the agent.
    let action = client
        .upload_action(&ActionSpec::shell("echo after restart"))
        .await;
    let (_, response) = client
        .execute(&action, true)
        .await
        .expect("execute after restart");
    assert_eq!(response.result.expect("result").exit_code, 0);
    assert!(
        agent.count("registered with the coordinator") >= 2,
        "the agent did not re-register"
    );
    // The new coordinator did not know the old lease, so the agent stopped it.
    let pid = read_pid(&pid_file).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_alive(pid) {
        assert!(
            Instant::now() < deadline,
            "the orphaned action kept running"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_fleet_is_remembered_across_a_restart() {
    let dir = tempdir();
    let data = dir.path().join("data");
    let server = Coordinator::start(&data, &["--startup-grace", "0s"]);
    let agent = Agent::start(
        &server.endpoint(),
        &dir.path().join("agent"),
        &["--slots", "1", "--isolation", "none"],
    );
    let mut client = server.client().await;
    wait_for_fleet(&mut client).await;
    agent.kill();
    server.stop().await;
    // No agent is connected and there is no start-up grace, yet the
    // coordinator knows what the fleet offered.
    let server = Coordinator::start(&data, &["--startup-grace", "0s"]);
    let mut client = server.client().await;
    let plan9 = client
        .upload_action(&ActionSpec::shell("true").with_platform("OSFamily", "plan9"))
        .await;
    let err = client
        .execute(&plan9, true)
        .await
        .expect_err("unsatisfiable");
    assert!(
        err.message().contains("the fleet offers OSFamily=linux"),
        "{}",
        err.message()
    );
    let linux = client
        .upload_action(&ActionSpec::shell("echo waited").with_platform("OSFamily", "linux"))
        .await;
    let waiting = client.execute_in_background(linux);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "the action should wait for an agent, not fail"
    );
    let _agent = Agent::start(
        &server.endpoint(),
        &dir.path().join("agent"),
        &["--slots", "1", "--isolation", "none"],
    );
    let (_, response) = waiting
        .await
        .expect("join")
        .expect("ran once the agent came back");
    assert_eq!(response.result.expect("result").exit_code, 0);
}

#[tokio::test]
async fn a_draining_agent_finishes_its_work_and_exits() {
    let (dir, _server, agent, mut client) = fleet(&[], "1").await;
    let marker = dir.path().join("started");
    let action = client
        .upload_action(&ActionSpec::shell(&format!(
            "echo x > {}; sleep 2; echo done",
            marker.display()
        )))
        .await;
    let running = client.execute_in_background(action);
    read_pid_or_text(&marker).await;
    let status = agent.stop().await;
    assert!(status.success(), "the agent exited with {status}");
    let (_, response) = running
        .await
        .expect("join")
        .expect("finished before the agent left");
    assert_eq!(response.result.expect("result").exit_code, 0);
}

#[tokio::test]
async fn wait_execution_reattaches_and_unknown_operations_are_not_found() {
    let (_dir, _server, _agent, mut client) = fleet(&[], "1").await;
    let action = client
        .upload_action(&ActionSpec::shell("sleep 2; echo reattached"))
        .await;
    let (stream, first) = client.start_execute(&action).await;
    assert!(!first.done);
    // The client's stream breaks; it comes back by name.
    drop(stream);
    let again = client
        .execution
        .wait_execution(outpost_proto::reapi::WaitExecutionRequest {
            name: first.name.clone(),
        })
        .await
        .expect("WaitExecution")
        .into_inner();
    let (name, response) = common::follow(again).await.expect("the operation finishes");
    assert_eq!(name, first.name);
    assert_eq!(response.result.expect("result").exit_code, 0);
    let err = client
        .execution
        .wait_execution(outpost_proto::reapi::WaitExecutionRequest {
            name: "operations/unknown".into(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains("execute the action again"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn an_input_tree_naming_one_path_twice_is_refused() {
    let dir = tempdir();
    let server = Coordinator::start(&dir.path().join("data"), &[]);
    let mut client = server.client().await;
    let mut spec = ActionSpec::shell("true");
    spec.inputs = vec![
        ("same".into(), bytes::Bytes::from_static(b"one")),
        ("same".into(), bytes::Bytes::from_static(b"two")),
    ];
    let action = client.upload_action(&spec).await;
    let err = client.execute(&action, true).await.expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("\"same\" appears more than once"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn agents_follow_a_small_batch_limit() {
    let (_dir, _server, _agent, mut client) = fleet(&["--max-batch-size", "64KiB"], "1").await;
    let (_, input) = common::blob(7, 200_000);
    let mut spec = ActionSpec::shell("head -c 100000 input.bin > out.bin");
    spec.inputs = vec![("input.bin".into(), input.clone())];
    spec.output_paths = vec!["out.bin".into()];
    let action = client.upload_action(&spec).await;
    let (_, response) = client.execute(&action, true).await.expect("execute");
    let result = response.result.expect("result");
    assert_eq!(result.exit_code, 0, "{:?}", response.status);
    let out = outpost_proto::digest::Digest::from_proto_opt(
        result.output_files[0].digest.as_ref(),
        outpost_proto::digest::Function::Sha256,
    )
    .expect("digest");
    assert_eq!(
        client.download(&out).await.expect("output"),
        input[..100_000].to_vec()
    );
}

#[tokio::test]
async fn outputs_are_not_collected_through_a_symlinked_directory() {
    let (dir, _server, _agent, mut client) = fleet(&[], "1").await;
    let secret_dir = dir.path().join("secret");
    std::fs::create_dir(&secret_dir).expect("mkdir");
    std::fs::write(secret_dir.join("key"), "do not upload").expect("write");
    // The agent creates out/ (the output's parent); the action swaps it for
    // a symlink to a directory outside the input root.
    let mut spec = ActionSpec::shell(&format!("rmdir out && ln -s {} out", secret_dir.display()));
    spec.output_paths = vec!["out/key".into()];
    let action = client.upload_action(&spec).await;
    let (_, response) = client.execute(&action, true).await.expect("execute");
    let status = response.status.expect("status");
    assert_eq!(status.code, Code::InvalidArgument as i32, "{status:?}");
    assert!(status.message.contains("symlink"), "{}", status.message);
    assert!(response.result.is_none());
}

/// Uploads `messages` (Command, Directories) and an Action over `command`
/// and `root`; returns the Action's digest.
async fn raw_action(
    client: &mut common::Client,
    command: &reapi::Command,
    root: &reapi::Directory,
    more: &[reapi::Directory],
) -> outpost_proto::digest::Digest {
    let mut uploads = Vec::new();
    let command = common::put_message(command, &mut uploads);
    let root = common::put_message(root, &mut uploads);
    for d in more {
        common::put_message(d, &mut uploads);
    }
    let action = common::put_message(
        &reapi::Action {
            command_digest: Some(command.to_proto()),
            input_root_digest: Some(root.to_proto()),
            ..Default::default()
        },
        &mut uploads,
    );
    for (d, data) in uploads {
        client.upload(&d, data).await;
    }
    action
}

#[tokio::test]
async fn hostile_trees_and_commands_are_refused_before_anything_is_queued() {
    let dir = tempdir();
    let server = Coordinator::start(&dir.path().join("data"), &[]);
    let mut client = server.client().await;
    let command = |args: &[&str], workdir: &str, outputs: &[&str]| reapi::Command {
        arguments: args.iter().map(|a| (*a).to_owned()).collect(),
        working_directory: workdir.to_owned(),
        output_paths: outputs.iter().map(|o| (*o).to_owned()).collect(),
        ..Default::default()
    };
    let ok = command(&["true"], "", &[]);
    let file = |name: &str| reapi::FileNode {
        name: name.to_owned(),
        digest: Some(
            outpost_proto::digest::Function::Sha256
                .digest_of(b"")
                .to_proto(),
        ),
        ..Default::default()
    };
    let link = |name: &str, target: &str| reapi::SymlinkNode {
        name: name.to_owned(),
        target: target.to_owned(),
        ..Default::default()
    };
    client
        .upload(
            &outpost_proto::digest::Function::Sha256.digest_of(b""),
            bytes::Bytes::new(),
        )
        .await;
    // 600 directories, each inside the next.
    let mut chain = vec![reapi::Directory::default()];
    for _ in 0..600 {
        let inner = chain.last().expect("one");
        let digest = outpost_proto::digest::Function::Sha256.digest_of(&inner.encode_to_vec());
        chain.push(reapi::Directory {
            directories: vec![reapi::DirectoryNode {
                name: "d".into(),
                digest: Some(digest.to_proto()),
            }],
            ..Default::default()
        });
    }
    let deep_root = chain.pop().expect("root");
    let cases: Vec<(
        &str,
        reapi::Command,
        reapi::Directory,
        Vec<reapi::Directory>,
        &str,
    )> = vec![
        (
            "unsorted",
            ok.clone(),
            reapi::Directory {
                files: vec![file("b"), file("a")],
                ..Default::default()
            },
            vec![],
            "not sorted by name",
        ),
        (
            "escaping symlink",
            ok.clone(),
            reapi::Directory {
                symlinks: vec![link("up", "x/../../etc")],
                ..Default::default()
            },
            vec![],
            "points outside the input root",
        ),
        (
            "deep",
            ok.clone(),
            deep_root,
            chain,
            "more than 512 directories deep",
        ),
        (
            "output outside",
            command(&["true"], "pkg", &["../../x"]),
            reapi::Directory::default(),
            vec![],
            "leaves the input root",
        ),
        (
            "absolute output",
            command(&["true"], "", &["/etc/passwd"]),
            reapi::Directory::default(),
            vec![],
            "is absolute",
        ),
        (
            "working directory outside",
            command(&["true"], "../..", &[]),
            reapi::Directory::default(),
            vec![],
            "leaves the input root",
        ),
        (
            "no program",
            command(&[], "", &[]),
            reapi::Directory::default(),
            vec![],
            "no program",
        ),
    ];
    for (what, command, root, more, expected) in cases {
        let action = raw_action(&mut client, &command, &root, &more).await;
        let err = client.execute(&action, true).await.expect_err(what);
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert!(
            err.message().contains(expected),
            "{what}: {}",
            err.message()
        );
    }
    // Absolute symlink targets and climbing output paths that stay inside
    // are fine: such an action is accepted (and waits for an agent).
    let fine = raw_action(
        &mut client,
        &command(&["true"], "pkg", &["../out/x"]),
        &reapi::Directory {
            symlinks: vec![link("cc", "/usr/bin/cc"), link("self", "a/..")],
            ..Default::default()
        },
        &[],
    )
    .await;
    let (_stream, first) = client.start_execute(&fine).await;
    assert!(!first.done, "{first:?}");
    let out = std::process::Command::new(common::OUTPOST)
        .args(["queue", "--coordinator", &server.endpoint()])
        .output()
        .expect("outpost queue");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("1 queued, 0 executing"), "{said}");
}

mod long_actions;
mod result_outputs;
mod spawner;
