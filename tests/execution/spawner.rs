//! The agent's spawner process: its death takes its actions along and a
//! new one serves the next; its protocol refuses bad requests.

use std::time::{Duration, Instant};

use crate::common::{self, ActionSpec, fleet, tempdir};
use crate::{pid_alive, read_pid};

/// The agent's spawner (`outpost __spawner`, its child), if running.
fn spawner_of(agent: u32) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let ppid: u32 = stat
            .rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        (ppid == agent && cmdline.split(|b| *b == 0).any(|a| a == b"__spawner")).then_some(pid)
    })
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_dead_spawner_takes_its_actions_along_and_is_replaced() {
    let (dir, _server, agent, mut client) = fleet(&[], "2").await;
    let first = spawner_of(agent.pid()).expect("the agent runs a spawner");
    let pid_file = dir.path().join("first.pid");
    let action = client
        .upload_action(&ActionSpec::shell(&format!(
            "if [ -e {p} ]; then echo again; else echo $$ > {p}; exec sleep 300; fi",
            p = pid_file.display()
        )))
        .await;
    let running = client.execute_in_background(action);
    let sleeper = read_pid(&pid_file).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the spawner");
    let (_, response) = running.await.expect("join").expect("execute");
    let result = response.result.expect("the retry's result");
    assert_eq!(result.exit_code, 0);
    let stdout = outpost_proto::digest::Digest::from_proto_opt(
        result.stdout_digest.as_ref(),
        outpost_proto::digest::Function::Sha256,
    )
    .expect("stdout");
    assert_eq!(client.download(&stdout).await.expect("stdout"), b"again\n");
    assert!(!pid_alive(sleeper), "the first run died with its spawner");
    agent
        .wait_for("the spawner process ended", Duration::from_secs(10))
        .await;
    let second = spawner_of(agent.pid()).expect("a new spawner");
    assert_ne!(first, second);
    // A killed agent takes its spawner along.
    let agent_pid = agent.pid();
    agent.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    // Dead, or a zombie until whoever inherited it reaps it.
    let running = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, r)| !r.trim_start().starts_with('Z'))
            })
            .unwrap_or(false)
    };
    while running(second) {
        assert!(
            Instant::now() < deadline,
            "the spawner outlived agent {agent_pid}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The spawner's protocol as the agent speaks it, bad requests included:
/// a run whose spec cannot be read ends as "cannot run", a request with the
/// wrong descriptors is refused before it is sent, a signal for an unknown
/// run is ignored, and the spawner keeps serving throughout.
#[cfg(target_os = "linux")]
#[test]
fn the_spawner_answers_bad_requests_and_keeps_serving() {
    use std::os::fd::AsFd;

    use outpost_sandbox::linux::spawner::{Client, Event, Mode};
    use outpost_sandbox::spec::Spec;

    let dir = tempdir();
    let (client, mut child) = Client::start(std::path::Path::new(common::OUTPOST)).expect("start");
    let null = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .expect("/dev/null");
    let out_path = dir.path().join("out");
    let out = std::fs::File::create(&out_path).expect("out");
    let stdio = [null.as_fd(), out.as_fd(), null.as_fd()];

    let missing = dir.path().join("no-such.spec");
    client
        .start_run(1, Mode::Reap, None, &missing, &stdio)
        .expect("sent");
    assert_eq!(
        client.next_event().expect("event"),
        Some(Event::Exited { id: 1, code: 127 })
    );
    let refused = client
        .start_run(2, Mode::Sandbox, None, &missing, &stdio)
        .expect_err("a sandbox run needs a status pipe too");
    assert!(
        refused.to_string().contains("needs 4 descriptors"),
        "{refused}"
    );
    client
        .signal(99, nix::sys::signal::Signal::SIGTERM)
        .expect("sent");

    let spec_file = dir.path().join("run.spec");
    let spec = Spec {
        argv: vec!["/bin/sh".into(), "-c".into(), "echo $GREETING".into()],
        env: vec!["GREETING=still-serving".into()],
        root: dir.path().to_owned(),
        ..Spec::default()
    };
    std::fs::write(&spec_file, spec.encode().expect("encodes")).expect("spec");
    client
        .start_run(3, Mode::Reap, None, &spec_file, &stdio)
        .expect("sent");
    assert_eq!(
        client.next_event().expect("event"),
        Some(Event::Exited { id: 3, code: 0 })
    );
    assert_eq!(
        std::fs::read_to_string(&out_path).expect("out"),
        "still-serving\n"
    );
    client.shutdown();
    assert_eq!(client.next_event().expect("end"), None);
    assert!(child.wait().expect("spawner exits").success());
}
