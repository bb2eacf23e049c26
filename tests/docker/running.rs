//! Actions in containers: outputs, argv and environment, network, timeouts
//! and cancels, a killed agent's containers, bad images, memory, hostile
//! actions.

use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_cpp_compile_runs_in_a_container_and_its_outputs_belong_to_the_agent() {
    let Some(mut f) = Fleet::ready(As::Unprivileged, &[]).await else {
        return;
    };
    let mut spec = in_image(
        "g++ -O1 -o out/hello src/hello.cc && ./out/hello && test -f /.dockerenv && \
         stat -c 'owner %u:%g' out/hello && id -u",
    );
    spec.inputs = vec![(
        "src/hello.cc".into(),
        Bytes::from_static(
            b"#include <iostream>\nint main() { std::cout << \"hello from a container\" << std::endl; }\n",
        ),
    )];
    spec.output_paths = vec!["out/hello".into()];
    let ran = f.run(&spec).await;
    ok(&ran);
    assert!(
        ran.stdout.contains("hello from a container"),
        "{}",
        ran.stdout
    );
    assert!(
        ran.stdout.contains(&format!("owner {NOBODY}:{NOBODY}")),
        "the output belongs to the agent's user: {}",
        ran.stdout
    );
    let binary = ran
        .result
        .output_files
        .iter()
        .find(|o| o.path == "out/hello")
        .expect("the compiled binary is an output");
    assert!(binary.digest.as_ref().is_some_and(|d| d.size_bytes > 1000));
    // The action's container is gone once it is done.
    let id = f.agent().id();
    eventually("removing the container", Duration::from_secs(10), || {
        containers_of(&id).is_empty()
    })
    .await;
    // Nothing of the action stays in the agent's work dir.
    f.no_action_directories_left().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn argv_environment_and_working_directory_are_exactly_the_commands() {
    let Some(mut f) = Fleet::ready(As::Root, &[]).await else {
        return;
    };
    let spec = ActionSpec {
        args: vec![
            "sh".into(),
            "-c".into(),
            "printf '[%s]' \"$0\" \"$@\"; echo; pwd; echo \"PATH=$PATH\"; \
             echo \"OUTPOST_TEST_IMAGE=$OUTPOST_TEST_IMAGE\"; echo \"ODD=$ODD\"; \
             echo \"HOME=${HOME-unset}\""
                .into(),
            "zero".into(),
            "a b".into(),
            "$HOME".into(),
            "".into(),
        ],
        // No PATH: the image's is kept. The image's OUTPOST_TEST_IMAGE is
        // overridden by the Command's.
        env: vec![
            ("OUTPOST_TEST_IMAGE".into(), "from-the-command".into()),
            ("ODD".into(), "x=y z".into()),
        ],
        working_directory: "sub/dir".into(),
        inputs: vec![("sub/dir/.keep".into(), Bytes::from_static(b""))],
        ..ActionSpec::default()
    }
    .with_platform("container-image", &format!("docker://{IMAGE}"));
    let ran = f.run(&spec).await;
    ok(&ran);
    let lines: Vec<&str> = ran.stdout.lines().collect();
    assert_eq!(lines[0], "[zero][a b][$HOME][]", "{}", ran.stdout);
    // The input root is at the same path inside as on the host.
    let work_dir = f.dir.path().join("agent").canonicalize().expect("work dir");
    assert!(
        lines[1].starts_with(&work_dir.to_string_lossy().into_owned())
            && lines[1].ends_with("/root/sub/dir"),
        "{}",
        ran.stdout
    );
    assert_eq!(
        lines[2],
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    );
    assert_eq!(lines[3], "OUTPOST_TEST_IMAGE=from-the-command");
    assert_eq!(lines[4], "ODD=x=y z");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_network_is_off_unless_allowed_and_asked() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let Some(mut f) = Fleet::ready(As::Root, &[]).await else {
        return;
    };
    let ran = f
        .run(&in_image(&format!(
            "ls /sys/class/net; if timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}'; \
             then echo REACHED; else echo unreachable; fi"
        )))
        .await;
    ok(&ran);
    assert_eq!(
        ran.stdout.split_whitespace().collect::<Vec<_>>(),
        ["lo", "unreachable"]
    );
    // This agent does not allow the network: nothing in the fleet offers
    // it, and the action fails at once rather than waits.
    let action = f
        .client
        .upload_action(&in_image("true").with_platform("dockerNetwork", "bridge"))
        .await;
    let started = Instant::now();
    let refused = f
        .client
        .execute(&action, true)
        .await
        .expect_err("nothing can run it");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("dockerNetwork=docker/bridge"),
        "{}",
        refused.message()
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    drop(listener);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_bridge_network_is_given_where_allowed() {
    let Some(mut f) = Fleet::ready(As::Root, &["--docker-network", "true"]).await else {
        return;
    };
    let ran = f
        .run(&in_image("ls /sys/class/net").with_platform("dockerNetwork", "bridge"))
        .await;
    ok(&ran);
    assert!(ran.stdout.contains("eth0"), "{}", ran.stdout);
    let ran = f.run(&in_image("ls /sys/class/net")).await;
    ok(&ran);
    assert_eq!(ran.stdout.trim(), "lo", "off unless asked");
}

#[tokio::test(flavor = "multi_thread")]
async fn timeout_and_cancel_leave_no_container_behind() {
    let Some(mut f) = Fleet::ready(As::Root, &[]).await else {
        return;
    };
    let id = f.agent().id();
    let mut spec = in_image("sleep 600");
    spec.timeout = Some(Duration::from_secs(2));
    let started = Instant::now();
    let ran = f.run(&spec).await;
    let status = ran.response.status.clone().expect("a status");
    assert_eq!(
        status.code,
        tonic::Code::DeadlineExceeded as i32,
        "{status:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    eventually(
        "removing the timed-out container",
        Duration::from_secs(10),
        || containers_of(&id).is_empty(),
    )
    .await;

    // Cancelled while running.
    let action = f.client.upload_action(&in_image("sleep 601")).await;
    let (stream, first) = f.client.start_execute(&action).await;
    eventually("the container starting", Duration::from_secs(30), || {
        !containers_of(&id).is_empty()
    })
    .await;
    f.client
        .operations
        .cancel_operation(outpost_proto::longrunning::CancelOperationRequest {
            name: first.name.clone(),
        })
        .await
        .expect("cancel");
    drop(stream);
    eventually(
        "removing the cancelled container",
        Duration::from_secs(15),
        || containers_of(&id).is_empty(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_agents_container_is_removed_when_it_starts_again() {
    let Some(mut f) = Fleet::ready(As::Root, &[]).await else {
        return;
    };
    let id = f.agent().id();
    let action = f.client.upload_action(&in_image("sleep 602")).await;
    let (_stream, _first) = f.client.start_execute(&action).await;
    eventually("the container starting", Duration::from_secs(30), || {
        !containers_of(&id).is_empty()
    })
    .await;
    let left = containers_of(&id);
    f.agent.take().expect("an agent").kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        containers_of(&id),
        left,
        "the container outlives a killed agent"
    );
    let agent = start_agent(&f.server, &f.dir.path().join("agent"), &f.extra, None);
    agent
        .wait_for("registered with the coordinator", Duration::from_secs(30))
        .await;
    assert_eq!(agent.id(), id);
    assert_eq!(
        agent.count("removed containers a previous run of this agent left behind"),
        1
    );
    // The action may run again on the new agent, in a new container; the
    // one the killed agent left is gone.
    let now = containers_of(&id);
    assert!(left.iter().all(|c| !now.contains(c)), "{left:?} {now:?}");
    f.agent = Some(agent);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_image_fails_within_seconds_naming_it() {
    for policy in ["missing", "never"] {
        let Some(mut f) = Fleet::ready(As::Root, &["--docker-pull-policy", policy]).await else {
            return;
        };
        let spec = in_named("docker://outpost-no-such-image:1", "true");
        let action = f.client.upload_action(&spec).await;
        let started = Instant::now();
        let (_, response) = f.client.execute(&action, true).await.expect("execute");
        let status = response.status.expect("a status");
        assert_ne!(status.code, 0, "{policy}");
        assert!(
            status.message.contains("outpost-no-such-image:1"),
            "{policy}: {}",
            status.message
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{policy}: {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_image_outside_the_allowlist_is_refused() {
    let Some(mut f) = Fleet::ready(As::Root, &["--docker-allowed-image", "gcc:*"]).await else {
        return;
    };
    let ran = f.run(&in_image("true")).await;
    refused(&ran, &[IMAGE, "gcc:*"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn running_out_of_memory_is_reported() {
    let Some(mut f) = Fleet::ready(As::Root, &[]).await else {
        return;
    };
    let ran = f
        .run(
            &in_image("x=$(head -c 300000000 /dev/zero | tr '\\0' a); echo survived")
                .with_platform("EstimatedMemory", "64MiB"),
        )
        .await;
    assert_ne!(ran.result.exit_code, 0, "{}", ran.stdout);
    assert!(ran.stderr.contains("out of memory"), "{}", ran.stderr);
    assert!(
        ran.response.message.contains("out of memory"),
        "{}",
        ran.response.message
    );
}

/// Prints one line per attempt; `sh -c` so each runs on its own.
const TRY: &str = r#"t() { if sh -c "$2" >/dev/null 2>&1; then echo "$1: ESCAPED"; else echo "$1: refused"; fi; }
"#;

#[tokio::test(flavor = "multi_thread")]
async fn hostile_actions_are_contained() {
    let Some(mut f) = Fleet::ready(As::Root, &[]).await else {
        return;
    };
    let original = Bytes::from_static(b"the original input\n");
    let work_dir = f.dir.path().join("agent").canonicalize().expect("work dir");
    let script = format!(
        "{TRY}\
         t rewrite-input 'echo poisoned > lib/input.txt'\n\
         t append-input 'echo poisoned >> lib/input.txt'\n\
         t chmod-input 'chmod 666 lib/input.txt'\n\
         t remove-input 'rm -f lib/input.txt'\n\
         t replace-input 'mv lib lib2 && echo poisoned > lib2/input.txt'\n\
         t rewrite-top-input 'echo poisoned > top.txt'\n\
         t link-input 'ln lib/input.txt out/link'\n\
         t engine-socket 'test -e /var/run/docker.sock || test -e /run/docker.sock'\n\
         t agent-work-dir 'ls {work}/cache'\n\
         t agent-token 'ls {work}/agent-id'\n\
         t mknod 'mknod /tmp/disk b 8 0'\n\
         t mount 'mount -t tmpfs none /mnt'\n\
         t host-devices 'test -e /dev/sda || test -e /dev/nvme0n1 || test -e /dev/vda'\n\
         echo escaped > {work}/escaped-by-action 2>/dev/null\n\
         echo written > out/ok\n\
         cat lib/input.txt\n",
        work = work_dir.display()
    );
    let mut spec = in_image(&script);
    spec.inputs = vec![
        ("lib/input.txt".into(), original.clone()),
        ("top.txt".into(), original.clone()),
    ];
    spec.output_paths = vec!["out/ok".into()];
    let ran = f.run(&spec).await;
    ok(&ran);
    for line in ran.stdout.lines().filter(|l| l.contains(": ")) {
        assert!(line.ends_with("refused"), "{line}\n{}", ran.stdout);
    }
    assert_eq!(ran.stdout.matches("refused").count(), 13, "{}", ran.stdout);
    assert!(
        ran.stdout.ends_with("the original input\n"),
        "{}",
        ran.stdout
    );
    assert!(
        ran.result.output_files.iter().any(|o| o.path == "out/ok"),
        "outputs are still written"
    );
    // Nothing reached the host outside the input root.
    assert!(!work_dir.join("escaped-by-action").exists());
    // The cache is intact: the same inputs read back as they were.
    let mut again = in_image("cat lib/input.txt top.txt");
    again.inputs = spec.inputs.clone();
    let ran = f.run(&again).await;
    ok(&ran);
    assert_eq!(ran.stdout, "the original input\nthe original input\n");
}
