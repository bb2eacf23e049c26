//! Docker isolation against the real engine on this host: a coordinator
//! and an agent with `--isolation docker` (real `outpost` processes), and
//! actions in a local toolchain image (`scripts/test-image.sh` builds it
//! when it is missing; no registry is reachable).
//!
//! Without a Docker engine the tests say so loudly and pass, unless
//! `OUTPOST_REQUIRE_DOCKER=1` (as `scripts/test.sh` sets), where they fail.

#![cfg(target_os = "linux")]

#[path = "../common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{ActionSpec, Agent, Coordinator, Ran, tempdir};

const IMAGE: &str = "outpost-test-toolchain:1";
const NOBODY: u32 = 65534;

/// Whether the engine answers and the test image is there (built if not).
fn docker_ready() -> bool {
    common::docker_with_image(IMAGE)
}

/// Containers the engine has with this agent's label.
fn containers_of(agent_id: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=dev.outpost.agent={agent_id}"),
        ])
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

async fn eventually(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Who runs the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum As {
    Root,
    /// uid 65534, in the engine socket's group.
    Unprivileged,
}

struct Fleet {
    dir: tempfile::TempDir,
    server: Coordinator,
    agent: Option<Agent>,
    client: common::Client,
    extra: Vec<String>,
    agent_id: String,
}

impl Drop for Fleet {
    /// The agent is killed with the test, and a killed agent leaves its
    /// running containers (its next start would remove them): remove them
    /// here, however the test ended.
    fn drop(&mut self) {
        drop(self.agent.take());
        let left = containers_of(&self.agent_id);
        if !left.is_empty() {
            let _ = Command::new("docker")
                .args(["rm", "-f"])
                .args(&left)
                .output();
        }
    }
}

impl Fleet {
    /// A fleet with a Docker agent, or `None` (after saying why) where no
    /// engine answers and the run does not require one.
    async fn ready(user: As, extra: &[&str]) -> Option<Fleet> {
        if !docker_ready() {
            return None;
        }
        Some(Fleet::start(user, extra).await)
    }

    async fn start(user: As, extra: &[&str]) -> Fleet {
        let dir = tempdir();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        // Actions nothing can run fail at once: the agent is registered
        // before any action is sent.
        let server = Coordinator::start(&dir.path().join("data"), &["--startup-grace", "0s"]);
        let mut extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        extra.splice(0..0, ["--isolation".to_owned(), "docker".to_owned()]);
        let work_dir = dir.path().join("agent");
        let agent = match user {
            As::Root => start_agent(&server, &work_dir, &extra, None),
            As::Unprivileged => {
                std::fs::create_dir(&work_dir).expect("work dir");
                let status = Command::new("chown")
                    .arg(format!("{NOBODY}:{NOBODY}"))
                    .arg(&work_dir)
                    .status()
                    .expect("chown");
                assert!(status.success());
                start_agent(&server, &work_dir, &extra, Some(NOBODY))
            }
        };
        agent
            .wait_for("registered with the coordinator", Duration::from_secs(30))
            .await;
        let client = server.client().await;
        Fleet {
            agent_id: agent.id(),
            dir,
            server,
            agent: Some(agent),
            client,
            extra,
        }
    }

    fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("an agent")
    }

    async fn run(&mut self, spec: &ActionSpec) -> Ran {
        self.client.run(spec).await
    }

    /// Waits until the agent has removed every action's directory.
    async fn no_action_directories_left(&self) {
        let actions = self.dir.path().join("agent/actions");
        eventually(
            "removing the actions' directories",
            Duration::from_secs(10),
            || std::fs::read_dir(&actions).map_or(true, |d| d.count() == 0),
        )
        .await;
    }
}

fn start_agent(server: &Coordinator, work_dir: &Path, extra: &[String], uid: Option<u32>) -> Agent {
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    match uid {
        None => Agent::start(&server.endpoint(), work_dir, &extra),
        Some(uid) => {
            use std::os::unix::fs::MetadataExt;
            let group = std::fs::metadata("/var/run/docker.sock")
                .expect("the engine's socket")
                .gid();
            let mut cmd = Command::new("setpriv");
            cmd.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={uid}"))
                .arg(format!("--groups={group}"))
                .arg(common::OUTPOST);
            Agent::start_with(cmd, &server.endpoint(), work_dir, &extra)
        }
    }
}

/// A shell action in the test image.
fn in_image(script: &str) -> ActionSpec {
    in_named(&format!("docker://{IMAGE}"), script)
}

/// A shell action in `image`.
fn in_named(image: &str, script: &str) -> ActionSpec {
    ActionSpec {
        args: vec!["/bin/sh".into(), "-c".into(), script.into()],
        ..ActionSpec::default()
    }
    .with_platform("container-image", image)
}

/// The action was refused as its own fault (INVALID_ARGUMENT), with a
/// message holding every one of `words`.
fn refused(ran: &Ran, words: &[&str]) {
    let status = ran.response.status.clone().expect("a status");
    assert_eq!(
        status.code,
        tonic::Code::InvalidArgument as i32,
        "{status:?}"
    );
    for w in words {
        assert!(status.message.contains(w), "{w}: {}", status.message);
    }
}

fn ok(ran: &Ran) {
    assert_eq!(
        ran.response.status.as_ref().map_or(0, |s| s.code),
        0,
        "{:?}\nstdout: {}\nstderr: {}",
        ran.response.status,
        ran.stdout,
        ran.stderr
    );
    assert_eq!(
        ran.result.exit_code, 0,
        "stdout: {}\nstderr: {}",
        ran.stdout, ran.stderr
    );
}

/// The value of a sample in the agent's `/metrics` (0 when absent).
fn agent_metric(addr: &str, series: &str) -> f64 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the agent's metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).expect("read");
    reply
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().expect("a number"))
}

mod bazel;
mod images;
mod running;
