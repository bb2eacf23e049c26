//! Docker isolation against the real engine on this host: a coordinator
//! and an agent with `--isolation docker` (real `outpost` processes), and
//! actions in a local toolchain image (`scripts/test-image.sh` builds it
//! when it is missing; no registry is reachable).
//!
//! Without a Docker engine the tests say so loudly and pass, unless
//! `OUTPOST_REQUIRE_DOCKER=1` (as `scripts/test.sh` sets), where they fail.

#![cfg(target_os = "linux")]

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

/// A registry on loopback (Debian's `docker-registry`), killed when dropped.
struct Registry {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// `None` (after saying why) where `docker-registry` is not installed
    /// and the run does not require it.
    fn start() -> Option<Registry> {
        Registry::start_with(None)
    }

    /// A registry that wants `user` and `password` (htpasswd, bcrypt).
    fn with_login(user: &str, password: &str) -> Option<Registry> {
        Registry::start_with(Some((user, password)))
    }

    fn start_with(login: Option<(&str, &str)>) -> Option<Registry> {
        if Command::new("docker-registry")
            .arg("--version")
            .output()
            .is_err()
        {
            let why = "docker-registry is not installed (apt-get install docker-registry; \
                       scripts/test.sh does this)";
            assert!(
                std::env::var_os("OUTPOST_REQUIRE_DOCKER").is_none(),
                "{why}"
            );
            eprintln!("SKIPPED: {why}");
            return None;
        }
        let dir = tempdir();
        let port = common::free_port();
        let config = dir.path().join("config.yml");
        let mut text = format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        if let Some((user, password)) = login {
            // The registry reads bcrypt entries only.
            let hash = Command::new("python3")
                .args([
                    "-c",
                    "import crypt, sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))",
                    password,
                ])
                .output()
                .expect("python3 makes a bcrypt hash");
            assert!(hash.status.success(), "{hash:?}");
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(
                &htpasswd,
                format!("{user}:{}", String::from_utf8_lossy(&hash.stdout).trim()),
            )
            .expect("htpasswd");
            text.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: outpost-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        std::fs::write(&config, text).expect("registry config");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start docker-registry");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the registry did not start listening"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Registry {
            child,
            port,
            _dir: dir,
        })
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn docker(args: &[&str]) {
    let output = Command::new("docker").args(args).output().expect("docker");
    assert!(
        output.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The test image pushed to `registry` as `name:1`; only the registry has
/// it under that name afterwards (the layers stay, as the test image's).
fn push_test_image(registry: &Registry, name: &str) -> String {
    let image = format!("127.0.0.1:{}/{name}:1", registry.port);
    docker(&["tag", IMAGE, &image]);
    docker(&["push", &image]);
    docker(&["rmi", &image]);
    image
}

/// Images are pulled on demand from a real registry (on loopback): actions
/// that ask for one missing image at once share one pull, and a tag the
/// registry does not have fails the action at once, naming it.
#[tokio::test(flavor = "multi_thread")]
async fn an_image_is_pulled_once_for_actions_that_want_it_at_once() {
    if !docker_ready() {
        return;
    }
    let Some(registry) = Registry::start() else {
        return;
    };
    let image = push_test_image(&registry, "outpost-pull-test");
    let metrics = format!("127.0.0.1:{}", common::free_port());
    let Some(f) = Fleet::ready(As::Root, &["--slots", "3", "--metrics-listen", &metrics]).await
    else {
        return;
    };
    let runs = (0..3).map(|i| {
        let mut client = f.client.clone();
        let spec = in_named(&format!("docker://{image}"), &format!("echo action {i}"));
        async move { client.run(&spec).await }
    });
    for (i, ran) in futures_join_all(runs).await.into_iter().enumerate() {
        ok(&ran);
        assert_eq!(ran.stdout, format!("action {i}\n"));
    }
    assert_eq!(
        agent_metric(
            &metrics,
            "outpost_agent_docker_pulls_total{outcome=\"miss\"}"
        ),
        1.0,
        "one pull for three actions"
    );
    assert_eq!(
        agent_metric(&metrics, "outpost_agent_docker_containers_total"),
        3.0
    );
    let missing = format!("127.0.0.1:{}/outpost-pull-test:no-such-tag", registry.port);
    let mut client = f.client.clone();
    let started = Instant::now();
    let ran = client
        .run(&in_named(&format!("docker://{missing}"), "true"))
        .await;
    refused(&ran, &[&missing]);
    assert!(started.elapsed() < Duration::from_secs(10));
    docker(&["rmi", &image]);
}

/// Runs futures at once and collects their outputs in order.
async fn futures_join_all<F: std::future::Future + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("join"));
    }
    out
}

/// Actions may run as another user (`dockerUser`) or as root
/// (`dockerRunAsRoot`, where the agent allows it); what they write is
/// collected and removed by the unprivileged agent all the same.
#[tokio::test(flavor = "multi_thread")]
async fn actions_of_another_user_or_root_leave_nothing_the_agent_cannot_remove() {
    let Some(mut f) = Fleet::ready(As::Unprivileged, &["--docker-allow-root", "true"]).await else {
        return;
    };
    let script = "id -u; mkdir -p out/tree/deep && echo made > out/tree/deep/f && \
                  chmod 700 out/tree/deep out/tree && echo file > out/file && chmod 600 out/file";
    for (name, value, uid) in [
        ("dockerUser", "1000:1000", "1000"),
        ("dockerRunAsRoot", "true", "0"),
    ] {
        let mut spec = in_image(script).with_platform(name, value);
        spec.output_paths = vec!["out/tree".into(), "out/file".into()];
        let ran = f.run(&spec).await;
        ok(&ran);
        assert_eq!(ran.stdout.trim(), uid, "{name}={value}");
        let paths: Vec<&str> = ran
            .result
            .output_files
            .iter()
            .map(|o| o.path.as_str())
            .chain(
                ran.result
                    .output_directories
                    .iter()
                    .map(|o| o.path.as_str()),
            )
            .collect();
        assert!(
            paths.contains(&"out/file") && paths.contains(&"out/tree"),
            "{name}={value}: {paths:?}"
        );
    }
    f.no_action_directories_left().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn root_in_a_container_needs_the_agents_permission() {
    let Some(mut f) = Fleet::ready(As::Root, &[]).await else {
        return;
    };
    for (name, value) in [("dockerRunAsRoot", "true"), ("dockerUser", "0:0")] {
        let ran = f.run(&in_image("true").with_platform(name, value)).await;
        refused(&ran, &["docker_allow_root"]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_the_image_lacks_is_the_actions_fault() {
    let Some(mut f) = Fleet::ready(As::Root, &[]).await else {
        return;
    };
    let spec = ActionSpec {
        args: vec!["outpost-no-such-tool".into(), "--version".into()],
        ..ActionSpec::default()
    }
    .with_platform("container-image", &format!("docker://{IMAGE}"));
    let ran = f.run(&spec).await;
    refused(&ran, &["outpost-no-such-tool"]);
    let id = f.agent().id();
    eventually("removing the container", Duration::from_secs(10), || {
        containers_of(&id).is_empty()
    })
    .await;
}

/// Pulls from a registry that wants a login send the credentials
/// `docker_registry_auth` holds for it (a file as `docker login` writes
/// it); without them the action fails at once as its own fault, naming the
/// image and "unauthorized".
#[tokio::test(flavor = "multi_thread")]
async fn a_registry_that_wants_a_login_gets_the_configured_credentials() {
    if !docker_ready() {
        return;
    }
    let Some(registry) = Registry::with_login("outpost", "s3cret-pull") else {
        return;
    };
    let logins = tempdir();
    let client_config = logins.path().to_str().expect("utf-8").to_owned();
    let host = format!("127.0.0.1:{}", registry.port);
    let login = Command::new("docker")
        .args(["--config", &client_config, "login", "--username", "outpost"])
        .args(["--password-stdin", &host])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(b"s3cret-pull\n")?;
            child.wait_with_output()
        })
        .expect("docker login");
    assert!(login.status.success(), "{login:?}");
    let image = format!("{host}/outpost-auth-test:1");
    docker(&["tag", IMAGE, &image]);
    docker(&["--config", &client_config, "push", &image]);
    docker(&["rmi", &image]);

    let without = Fleet::ready(As::Root, &[]).await;
    let Some(mut without) = without else {
        return;
    };
    let started = Instant::now();
    let ran = without
        .run(&in_named(&format!("docker://{image}"), "true"))
        .await;
    refused(&ran, &[&image, "unauthorized"]);
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(without);

    let auth_file = logins.path().join("config.json");
    let Some(mut with) = Fleet::ready(
        As::Root,
        &["--docker-registry-auth", auth_file.to_str().expect("utf-8")],
    )
    .await
    else {
        return;
    };
    let ran = with
        .run(&in_named(
            &format!("docker://{image}"),
            "echo pulled with a login",
        ))
        .await;
    ok(&ran);
    assert_eq!(ran.stdout, "pulled with a login\n");
    docker(&["rmi", &image]);
}

/// `docker_images_at_start` are pulled in the background when the agent
/// starts: it registers without waiting for them (one comes from a
/// "registry" that never answers), and a pull that fails is logged with
/// the image and the registry's reason.
#[tokio::test(flavor = "multi_thread")]
async fn images_at_start_are_pulled_in_the_background() {
    if !docker_ready() {
        return;
    }
    let Some(registry) = Registry::start() else {
        return;
    };
    let image = push_test_image(&registry, "outpost-at-start");
    let missing = format!("127.0.0.1:{}/outpost-at-start:no-such-tag", registry.port);
    // Accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let hanging = format!(
        "127.0.0.1:{}/outpost-at-start:1",
        silent.local_addr().expect("addr").port()
    );
    let started = Instant::now();
    let list = format!("{hanging},docker://{image},{missing}");
    let Some(mut f) = Fleet::ready(As::Root, &["--docker-image-at-start", &list]).await else {
        return;
    };
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "registered without waiting for the pulls: {:?}",
        started.elapsed()
    );
    f.agent()
        .wait_for(
            &format!("image {image} from docker_images_at_start is ready"),
            Duration::from_secs(60),
        )
        .await;
    assert!(
        Command::new("docker")
            .args(["image", "inspect", &image])
            .output()
            .expect("docker")
            .status
            .success()
    );
    let failed = format!("image {missing} from docker_images_at_start could not be pulled");
    f.agent().wait_for(&failed, Duration::from_secs(30)).await;
    assert_eq!(
        f.agent()
            .count(&format!("{failed}: cannot pull image {missing}")),
        1
    );
    // An action wanting it finds it there.
    let ran = f
        .run(&in_named(&format!("docker://{image}"), "echo already here"))
        .await;
    ok(&ran);
    docker(&["rmi", &image]);
    drop(silent);
}

/// The size the engine gives `image`.
fn image_size(image: &str) -> u64 {
    let out = Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Size}}", image])
        .output()
        .expect("docker image inspect");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a size")
}

fn image_exists(image: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", image])
        .output()
        .expect("docker")
        .status
        .success()
}

/// An image of the test image and one small file of its own, pushed to
/// `registry` as `name` and removed from the engine.
fn push_variant(registry: &Registry, name: &str) -> String {
    let dir = tempdir();
    std::fs::write(dir.path().join("own"), name.repeat(10_000)).expect("file");
    std::fs::write(
        dir.path().join("Dockerfile"),
        format!("FROM {IMAGE}\nCOPY own /own\n"),
    )
    .expect("Dockerfile");
    let image = format!("127.0.0.1:{}/{name}:1", registry.port);
    docker(&[
        "build",
        "-q",
        "-t",
        &image,
        dir.path().to_str().expect("utf-8"),
    ]);
    docker(&["push", &image]);
    docker(&["rmi", &image]);
    image
}

/// Past `docker_image_cache_size`, the images this agent pulled that no
/// action uses are removed, least recently used first; an image in use
/// stays, and images it did not pull (the test image) are never removed.
#[tokio::test(flavor = "multi_thread")]
async fn images_this_agent_pulled_are_removed_past_the_bound() {
    if !docker_ready() {
        return;
    }
    let Some(registry) = Registry::start() else {
        return;
    };
    let first = push_variant(&registry, "outpost-gc-first");
    let second = push_variant(&registry, "outpost-gc-second");
    // Room for one of them, not for both.
    let bound = image_size(IMAGE) * 3 / 2;
    let metrics = format!("127.0.0.1:{}", common::free_port());
    let Some(f) = Fleet::ready(
        As::Root,
        &[
            "--slots",
            "2",
            "--metrics-listen",
            &metrics,
            "--docker-image-cache-size",
            &bound.to_string(),
            "--docker-image-at-start",
            &first,
        ],
    )
    .await
    else {
        return;
    };
    f.agent()
        .wait_for(
            &format!("image {first} from docker_images_at_start is ready"),
            Duration::from_secs(60),
        )
        .await;
    assert!(image_size(&first) <= bound && image_size(&first) * 2 > bound);
    // The first, least recently used, is in use while the second is
    // pulled and used: the second, once its action is done, is what goes.
    let id = f.agent().id();
    let mut client = f.client.clone();
    let long = in_named(&format!("docker://{first}"), "sleep 12; echo first");
    let running = tokio::spawn(async move { client.run(&long).await });
    eventually(
        "the first image's action starting",
        Duration::from_secs(30),
        || !containers_of(&id).is_empty(),
    )
    .await;
    let mut client = f.client.clone();
    let ran = client
        .run(&in_named(&format!("docker://{second}"), "echo second"))
        .await;
    ok(&ran);
    let ran = running.await.expect("join");
    ok(&ran);
    assert_eq!(ran.stdout, "first\n");
    eventually("removing the second image", Duration::from_secs(20), || {
        !image_exists(&second)
    })
    .await;
    assert!(image_exists(&first), "the image in use stays");
    assert!(image_exists(IMAGE), "an image the agent did not pull stays");
    assert_eq!(
        agent_metric(&metrics, "outpost_agent_docker_images_removed_total"),
        1.0
    );
    docker(&["rmi", &first]);
}
