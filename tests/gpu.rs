//! GPUs end to end: a coordinator and an agent as separate processes.
//!
//! On this machine (no GPU) an action asking for one fails at once, saying
//! the fleet has none. The tests marked `ignore` need an NVIDIA GPU and
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
