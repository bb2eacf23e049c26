//! GPUs end to end: a coordinator and an agent as separate processes.
//!
//! On this machine (no GPU) an action asking for one fails at once, saying
//! the fleet has none, and the sandbox shows the device nodes its spec
//! names and no others (what GPUs go through, on `/dev/fuse`). The tests
//! marked `ignore` need an NVIDIA GPU and
//! its driver; `scripts/device-gpu.sh` runs them on such a host, with a
//! CUDA program it built there with `nvcc` (`OUTPOST_TEST_CUDA_PROGRAM`).

mod common;

use std::path::Path;
use std::time::Duration;

use common::{ActionSpec, Agent, Coordinator, tempdir, wait_for_fleet};
use tonic::Code;

#[tokio::test]
async fn an_action_asking_for_a_gpu_fails_at_once_when_the_fleet_has_none() {
    let dir = tempdir();
    let server = Coordinator::start(&dir.path().join("data"), &["--startup-grace", "0s"]);
    let _agent = Agent::start(
        &server.endpoint(),
        &dir.path().join("agent"),
        &["--isolation", "none"],
    );
    let mut client = server.client().await;
    wait_for_fleet(&mut client).await;
    for (name, value, words) in [
        (
            "gpu-count",
            "1",
            "gpu-count >= 1 (the most any agent has is 0)",
        ),
        ("gpu-model", "h100", "no agent has a GPU"),
    ] {
        let spec = ActionSpec::shell("true").with_platform(name, value);
        let action = client.upload_action(&spec).await;
        let err = client
            .execute(&action, true)
            .await
            .expect_err("no agent has a GPU");
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains(words), "{}", err.message());
    }
}

/// Panics, saying what this host lacks, unless it has an NVIDIA GPU.
fn require_a_gpu() {
    assert!(
        Path::new("/dev/nvidiactl").exists(),
        "no NVIDIA GPU on this host (no /dev/nvidiactl): run this test on a GPU host, \
         e.g. with scripts/device-gpu.sh"
    );
}

/// Runs `ld.so PROGRAM`: inputs arrive without the executable bit.
const RUN_INPUT: &str = r#"ld=$(ls /lib64/ld-linux-*.so.* /lib/ld-linux-*.so.* 2>/dev/null | head -n 1)
run() { "$ld" "$@"; }
"#;

#[tokio::test]
#[ignore = "needs an NVIDIA GPU and driver; scripts/device-gpu.sh runs it on one"]
async fn a_sandboxed_action_uses_the_gpu_it_was_given_and_one_given_none_sees_none() {
    require_a_gpu();
    let program = std::env::var_os("OUTPOST_TEST_CUDA_PROGRAM").expect(
        "OUTPOST_TEST_CUDA_PROGRAM: a CUDA program built with nvcc on this host \
         (scripts/device-gpu.sh builds one)",
    );
    let program = std::fs::read(&program).expect("read the CUDA program");
    let dir = tempdir();
    let server = Coordinator::start(&dir.path().join("data"), &["--startup-grace", "0s"]);
    // The default isolation: linux-sandbox.
    let agent = Agent::start(
        &server.endpoint(),
        &dir.path().join("agent"),
        &["--slots", "2"],
    );
    agent.wait_for("GPU found", Duration::from_secs(30)).await;
    let mut client = server.client().await;
    wait_for_fleet(&mut client).await;

    let mut given = ActionSpec::shell(&format!(
        "{RUN_INPUT}set -x
nvidia-smi -L
echo CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES
ls /dev/nvidia*
run ./cuda-check"
    ))
    .with_platform("gpu-count", "1");
    given.inputs.push(("cuda-check".into(), program.into()));
    let ran = client.run(&given).await;
    println!(
        "== an action with gpu-count=1 (linux-sandbox)\nexit {}\n-- stdout\n{}\n-- stderr\n{}",
        ran.result.exit_code, ran.stdout, ran.stderr
    );
    assert_eq!(ran.result.exit_code, 0, "{}", ran.stderr);
    assert!(
        ran.stdout.contains("GPU 0: "),
        "nvidia-smi -L: {}",
        ran.stdout
    );
    assert!(
        ran.stdout.contains("CUDA_VISIBLE_DEVICES=GPU-"),
        "{}",
        ran.stdout
    );
    assert!(ran.stdout.contains("cuda-check: ok"), "{}", ran.stdout);
    // Exactly one GPU's node: the assigned one.
    let gpu_nodes = ran
        .stdout
        .split_whitespace()
        .filter(|w| {
            w.strip_prefix("/dev/nvidia")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .count();
    assert_eq!(gpu_nodes, 1, "{}", ran.stdout);

    let none = ActionSpec::shell(
        "ls /dev/nvidia* 2>&1; nvidia-smi -L 2>&1; echo CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}; exit 0",
    );
    let ran = client.run(&none).await;
    println!(
        "== an action without gpu-count (linux-sandbox)\nexit {}\n-- stdout\n{}\n-- stderr\n{}",
        ran.result.exit_code, ran.stdout, ran.stderr
    );
    assert!(!ran.stdout.contains("GPU 0: "), "{}", ran.stdout);
    assert!(
        !ran.stdout.lines().any(|l| l.starts_with("/dev/nvidia")),
        "{}",
        ran.stdout
    );
    assert!(
        ran.stdout.contains("CUDA_VISIBLE_DEVICES=unset"),
        "{}",
        ran.stdout
    );
}

/// The binding GPUs go through, on a device node every Linux host has:
/// a sandbox whose spec names `/dev/fuse` shows it, and no other node the
/// host has (`/dev/kvm`, `/dev/loop-control`, ...).
#[cfg(target_os = "linux")]
#[test]
fn the_sandbox_shows_exactly_the_device_nodes_its_spec_names() {
    use std::io::Read as _;
    use std::os::fd::AsFd;

    use outpost_sandbox::linux::spawner::{Client, Event, Mode};
    use outpost_sandbox::spec::Spec;

    let dir = tempdir();
    let made = |name: &str| {
        let p = dir.path().join(name);
        std::fs::create_dir_all(&p).expect("a directory");
        p
    };
    let spec = Spec {
        argv: vec![
            "/bin/sh".into(),
            "-c".into(),
            "test -c /dev/fuse && echo fuse: shown; ls /dev".into(),
        ],
        env: vec!["PATH=/usr/bin:/bin".into()],
        root: made("root"),
        writable: vec!["".into()],
        host_paths: outpost_agent::runner::DEFAULT_SANDBOX_MOUNTS
            .iter()
            .map(Into::into)
            .collect(),
        devices: vec!["/dev/fuse".into()],
        tmp: made("tmp"),
        scratch: made("sysroot"),
        ..Spec::default()
    };
    let spec_file = dir.path().join("run.spec");
    std::fs::write(&spec_file, spec.encode().expect("encodes")).expect("spec");
    let (client, mut child) = Client::start(Path::new(common::OUTPOST)).expect("start");
    let null = std::fs::File::open("/dev/null").expect("/dev/null");
    let out_path = dir.path().join("out");
    let out = std::fs::File::create(&out_path).expect("out");
    let (mut status, status_w) = std::io::pipe().expect("a status pipe");
    client
        .start_run(
            1,
            Mode::Sandbox,
            None,
            &spec_file,
            &[null.as_fd(), out.as_fd(), out.as_fd(), status_w.as_fd()],
        )
        .expect("sent");
    drop(status_w);
    let event = client.next_event().expect("event");
    let mut said = String::new();
    status.read_to_string(&mut said).expect("the status");
    let shown = std::fs::read_to_string(&out_path).expect("out");
    assert_eq!(
        event,
        Some(Event::Exited { id: 1, code: 0 }),
        "{said}\n{shown}"
    );
    assert!(shown.contains("fuse: shown"), "{shown}");
    let nodes: Vec<&str> = shown.lines().skip(1).collect();
    for other in ["kvm", "loop-control", "kmsg", "nvidiactl", "nvidia0"] {
        assert!(!nodes.contains(&other), "/dev/{other} is shown: {shown}");
    }
    drop(client);
    let _ = child.wait();
}
