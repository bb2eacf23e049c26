//! The agent as a container: the image `scripts/images.sh` builds (from
//! the `outpost` binary under test) runs against a coordinator on this
//! host, with the engine's socket and its work dir mounted at the host's
//! path, so its Docker actions run in sibling containers; started with
//! `--memory 2g --cpus 1`, it advertises 2 GiB and 1 CPU. The
//! coordinator's image serves as a non-root user with its data volume.
//!
//! Without a Docker engine the test says so loudly and passes, unless
//! `OUTPOST_REQUIRE_DOCKER=1` (as `scripts/test.sh` sets), where it fails.

#![cfg(target_os = "linux")]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{ActionSpec, Agent, Coordinator, blob, free_port, tempdir};

const TOOLCHAIN: &str = "outpost-test-toolchain:1";
const TAG: &str = "test";

/// Whether the engine answers; builds the toolchain image and the agent
/// and coordinator images (of the binary under test) when missing.
fn docker_ready() -> bool {
    if !common::docker_with_image(TOOLCHAIN) {
        return false;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/images.sh");
    let built = common::docker_image_build(Command::new(script).args([
        "--if-missing",
        "--tag",
        TAG,
        "--binary",
        common::OUTPOST,
    ]));
    assert!(built, "scripts/images.sh could not build the images");
    true
}

/// Removes the agent's container and the action containers it left,
/// however the test ends.
struct Cleanup {
    container: String,
    agent_id: Option<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.container])
            .output();
        if let Some(id) = &self.agent_id {
            let out = Command::new("docker")
                .args([
                    "ps",
                    "-aq",
                    "--filter",
                    &format!("label=dev.outpost.agent={id}"),
                ])
                .output();
            let left: Vec<String> = out
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            if !left.is_empty() {
                let _ = Command::new("docker")
                    .args(["rm", "-f"])
                    .args(&left)
                    .output();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_image_runs_docker_actions_within_its_container_limits() {
    if !docker_ready() {
        return;
    }
    let dir = tempdir();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
    }
    // Actions no agent can run fail at once.
    let server = Coordinator::start(&dir.path().join("data"), &["--startup-grace", "0s"]);
    let work_dir = dir.path().join("agent");
    std::fs::create_dir(&work_dir).expect("work dir");
    let work = work_dir.to_str().expect("a UTF-8 path");
    let mut cleanup = Cleanup {
        container: format!("outpost-agent-test-{}", std::process::id()),
        agent_id: None,
    };

    // The coordinator listens on this host's loopback: the agent shares
    // the host's network. Its work dir is at the same path inside, since
    // the engine resolves the action containers' bind mounts on the host.
    let mut docker = Command::new("docker");
    docker.args([
        "run",
        "--rm",
        "--name",
        &cleanup.container,
        "--network",
        "host",
        "--memory",
        "2g",
        "--cpus",
        "1",
        "-e",
        "OUTPOST_LOG",
        "-v",
        "/var/run/docker.sock:/var/run/docker.sock",
        "-v",
        &format!("{work}:{work}"),
        "--entrypoint",
        "/usr/local/bin/outpost",
        &format!("outpost-agent:{TAG}"),
    ]);
    let agent = Agent::start_with(
        docker,
        &server.endpoint(),
        &work_dir,
        &["--isolation", "docker"],
    );
    agent
        .wait_for("registered with the coordinator", Duration::from_secs(60))
        .await;
    cleanup.agent_id = Some(agent.id());

    // It read its container's limits, not the host's.
    assert_eq!(agent.count("cgroup limits apply"), 1);
    assert_eq!(agent.count("cpus=Some(1)"), 1);
    assert_eq!(agent.count("memory_bytes=Some(2147483648)"), 1);

    // And advertises them: the coordinator finds no agent for more.
    let mut client = server.client().await;
    let image = format!("docker://{TOOLCHAIN}");
    let docker_action = |script: &str| {
        ActionSpec::shell(script)
            .with_platform("workload-isolation-type", "docker")
            .with_platform("container-image", &image)
    };
    for (name, value) in [("EstimatedMemory", "3GiB"), ("EstimatedCPU", "2")] {
        let action = client
            .upload_action(&docker_action("true").with_platform(name, value))
            .await;
        let started = Instant::now();
        let refused = client
            .execute(&action, true)
            .await
            .expect_err("no agent offers that much");
        assert_eq!(
            refused.code(),
            tonic::Code::FailedPrecondition,
            "{name}={value}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    // A Docker action within them runs in a sibling container of the
    // toolchain image (the agent's image has no shell at all).
    let ran = client
        .run(
            &docker_action("echo hello from $OUTPOST_TEST_IMAGE; pwd")
                .with_platform("EstimatedMemory", "2GiB")
                .with_platform("EstimatedCPU", "1"),
        )
        .await;
    assert_eq!(ran.result.exit_code, 0, "stderr: {}", ran.stderr);
    assert!(ran.stdout.starts_with("hello from 1\n"), "{}", ran.stdout);
    assert!(
        ran.stdout.contains(work),
        "the input root is at the host's path: {}",
        ran.stdout
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_coordinator_image_serves_from_its_volume() {
    if !docker_ready() {
        return;
    }
    let cleanup = Cleanup {
        container: format!("outpost-coordinator-test-{}", std::process::id()),
        agent_id: None,
    };
    let listen = format!("127.0.0.1:{}", free_port());
    let started = Command::new("docker")
        .args([
            "run",
            "-d",
            "--rm",
            "--name",
            &cleanup.container,
            "--network",
            "host",
            &format!("outpost-coordinator:{TAG}"),
            "--listen",
            &listen,
            "--data-dir",
            "/var/lib/outpost",
        ])
        .output()
        .expect("docker run");
    assert!(
        started.status.success(),
        "{}",
        String::from_utf8_lossy(&started.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logs = Command::new("docker")
            .args(["logs", &cleanup.container])
            .output()
            .expect("docker logs");
        if String::from_utf8_lossy(&logs.stderr).contains("coordinator listening on") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the coordinator's container did not start listening: {}",
            String::from_utf8_lossy(&logs.stderr)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Not root: the data directory in the volume is the image's user's.
    let inspect = Command::new("docker")
        .args([
            "inspect",
            "--format",
            "{{.Config.User}}",
            &cleanup.container,
        ])
        .output()
        .expect("docker inspect");
    assert_eq!(
        String::from_utf8_lossy(&inspect.stdout).trim(),
        "10001:10001"
    );

    // A blob written lands in the volume and is found again.
    let mut client = common::Client::connect(&format!("http://{listen}")).await;
    let (digest, data) = blob(7, 100_000);
    client.upload(&digest, data.clone()).await;
    assert!(client.find_missing(&[digest]).await.is_empty());
    assert_eq!(client.download(&digest).await.expect("read"), data);
}
