//! Persistent workers with real Bazel (4.2.3) against a real coordinator
//! and agent: tests/worker-workspace's Python worker, asked for through
//! `exec_properties`, serves many actions from one process in both
//! framings; the same tool without the property runs plain; a worker that
//! crashes or answers garbage costs its action nothing (it runs again as a
//! plain command) and is not used again.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Agent, Coordinator, tempdir};

/// One output of worker.py: who wrote it.
#[derive(Debug)]
struct Written {
    pid: u32,
    /// A random id per process: pids repeat across sandboxes.
    id: String,
    served: u32,
    mode: String,
}

fn read_output(bin: &Path, name: &str) -> Written {
    let text = std::fs::read_to_string(bin.join(format!("{name}.out")))
        .unwrap_or_else(|e| panic!("{name}.out: {e}"));
    let field = |key: &str| {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key} in {text:?}"))
            .to_owned()
    };
    assert!(
        text.contains(&format!("text={}", name.replace('_', " "))),
        "{text}"
    );
    Written {
        pid: field("pid").parse().expect("pid"),
        id: field("id"),
        served: field("served").parse().expect("served"),
        mode: field("mode"),
    }
}

struct Workspace {
    dir: PathBuf,
    output_root: PathBuf,
}

impl Workspace {
    fn new(scratch: &Path) -> Option<Workspace> {
        if Command::new("bazel").arg("help").output().is_err() {
            let why = "bazel is not installed (apt-get install bazel-bootstrap)";
            assert!(std::env::var_os("OUTPOST_REQUIRE_BAZEL").is_none(), "{why}");
            eprintln!("SKIPPED: {why}");
            return None;
        }
        let dir = scratch.join("workspace");
        let status = Command::new("cp")
            .arg("-a")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/worker-workspace"))
            .arg(&dir)
            .status()
            .expect("cp");
        assert!(status.success());
        Some(Workspace {
            dir,
            output_root: scratch.join("bazel-root"),
        })
    }

    fn build(&self, executor: &str, targets: &[&str]) {
        let mut args = vec![
            "build",
            executor,
            "--remote_timeout=600",
            "--color=no",
            "--curses=no",
            "--noshow_progress",
            "--jobs=4",
        ];
        args.extend(targets);
        let (ok, text) = common::bazel(&self.dir, &self.output_root, &args);
        eprintln!("{text}");
        assert!(ok, "bazel build {targets:?} failed (output above)");
    }

    fn bin(&self) -> PathBuf {
        self.dir.join("bazel-bin")
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        let _ = common::bazel(&self.dir, &self.output_root, &["shutdown"]);
    }
}

/// Starts a coordinator and an agent of one slot (`extra` flags added) and
/// returns them with the `--remote_executor` flag.
fn fleet(scratch: &Path, extra: &[&str]) -> (Coordinator, Agent, String) {
    let server = Coordinator::start(&scratch.join("outpost-data"), &[]);
    // One slot: the chains run one action at a time, so one worker per key
    // serves them all.
    let mut flags = vec!["--slots", "1"];
    flags.extend_from_slice(extra);
    let agent = Agent::start(&server.endpoint(), &scratch.join("agent"), &flags);
    let executor = format!("--remote_executor={}", server.endpoint());
    (server, agent, executor)
}

/// The chain PREFIX_0..4 was written by one worker, in order.
fn one_worker_wrote(bin: &Path, prefix: &str) {
    let written: Vec<Written> = (0..5)
        .map(|i| read_output(bin, &format!("{prefix}_{i}")))
        .collect();
    let processes: BTreeSet<(u32, &str)> = written.iter().map(|w| (w.pid, w.id.as_str())).collect();
    assert_eq!(
        processes.len(),
        1,
        "{prefix}: one worker served all: {written:?}"
    );
    assert!(written.iter().all(|w| w.mode == "worker"), "{written:?}");
    let served: Vec<u32> = written.iter().map(|w| w.served).collect();
    assert_eq!(served, [1, 2, 3, 4, 5], "{prefix}: {written:?}");
}

#[test]
fn one_worker_serves_many_actions_and_broken_workers_fall_back_to_plain_runs() {
    let scratch = tempdir();
    let Some(ws) = Workspace::new(scratch.path()) else {
        return;
    };
    // The default isolation: linux-sandbox.
    let listen = format!("127.0.0.1:{}", common::free_port());
    let (_server, agent, executor) = fleet(scratch.path(), &["--metrics-listen", &listen]);
    ws.build(&executor, &["//:proto", "//:json", "//:plain", "//:broken"]);
    let bin = ws.bin();

    for framing in ["proto", "json"] {
        one_worker_wrote(&bin, framing);
    }
    let plain: Vec<Written> = (0..5)
        .map(|i| read_output(&bin, &format!("plain_{i}")))
        .collect();
    assert!(
        plain.iter().all(|w| w.mode == "plain" && w.served == 1),
        "{plain:?}"
    );
    assert_eq!(
        plain.iter().map(|w| &w.id).collect::<BTreeSet<_>>().len(),
        5,
        "each plain run is its own process: {plain:?}"
    );

    for broken in ["crash", "garbage"] {
        let before = read_output(&bin, &format!("{broken}_before"));
        let during = read_output(&bin, &format!("{broken}_broken"));
        let after = read_output(&bin, &format!("{broken}_after"));
        assert_eq!(before.mode, "worker", "{before:?}");
        // The broken request ran again as a plain command.
        assert_eq!(during.mode, "plain", "{broken}: {during:?}");
        // The next action of the key got a new worker.
        assert_eq!(after.mode, "worker", "{after:?}");
        assert_ne!(
            after.id, before.id,
            "{broken}: the broken worker was used again"
        );
        assert_eq!(after.served, 1, "{after:?}");
    }
    assert_eq!(
        agent.count("persistent worker failed"),
        2,
        "one fallback per broken worker"
    );

    // Ten chained actions in two workers, six in four (two broken).
    let metrics = metrics_of(&listen);
    let series = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let warm = "outpost_agent_warm_requests_total";
    assert_eq!(
        series(&format!("{warm}{{kind=\"worker\",status=\"miss\"}}")),
        6.0
    );
    assert_eq!(
        series(&format!("{warm}{{kind=\"worker\",status=\"hit\"}}")),
        10.0
    );
    assert_eq!(
        series("outpost_agent_warm_evictions_total{kind=\"worker\",reason=\"broken\"}"),
        2.0
    );
    assert_eq!(series("outpost_agent_live_workers"), 4.0, "{metrics}");
    assert_eq!(series("outpost_agent_worker_pool_size"), 4.0, "{metrics}");
}

/// The agent's /metrics text.
fn metrics_of(listen: &str) -> String {
    let addr = listen.parse().expect("address");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (status, body) = runtime.block_on(common::http_get(addr, "/metrics"));
    assert_eq!(status, 200);
    body
}

#[test]
fn workers_run_unisolated_too() {
    let scratch = tempdir();
    let Some(ws) = Workspace::new(scratch.path()) else {
        return;
    };
    let (_server, agent, executor) = fleet(scratch.path(), &["--isolation", "none"]);
    ws.build(&executor, &["//:proto"]);
    one_worker_wrote(&ws.bin(), "proto");

    // The worker is alive in its directory under the agent's; killing the
    // agent (SIGKILL: it cleans nothing up) takes the worker with it.
    let workers_dir = scratch.path().join("agent/workers");
    assert_eq!(processes_under(&workers_dir).len(), 1, "one live worker");
    agent.kill();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !processes_under(&workers_dir).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "workers outlived the agent: {:?}",
            processes_under(&workers_dir)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Pids of the processes whose working directory is under `dir`, but
/// the shells and stubs around them.
fn processes_under(dir: &Path) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"));
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            cwd.is_ok_and(|c| c.starts_with(dir))
                && String::from_utf8_lossy(&cmdline).contains("--persistent_worker")
        })
        .collect()
}

/// A worker that never answers is stopped at the action's timeout, and the
/// action runs again as a plain command (here, without Bazel).
#[tokio::test]
async fn a_hung_worker_is_stopped_at_the_timeout_and_the_action_runs_plain() {
    let scratch = tempdir();
    let (server, agent, _) = fleet(scratch.path(), &["--isolation", "none"]);
    let mut client = server.client().await;
    common::wait_for_fleet(&mut client).await;
    let spec = worker_action("hangs", "hang 0", &["--break=hang"]);
    let started = std::time::Instant::now();
    let ran = client.run(&spec).await;
    assert_eq!(ran.result.exit_code, 0, "{}", ran.stderr);
    assert!(started.elapsed() >= std::time::Duration::from_secs(2));
    assert!(
        ran.stderr.contains("did not answer within 2s")
            && ran.stderr.contains("ran again as a plain command"),
        "{}",
        ran.stderr
    );
    let text = output_of(&mut client, &ran).await;
    assert!(text.contains("mode=plain"), "{text}");
    // The hung worker is gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !processes_under(&scratch.path().join("agent/workers")).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the hung worker lives on"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    drop(agent);
}

/// worker.py run with a flagfile, asking for a worker of `key`, on
/// `text`, with `extra` arguments in the flagfile.
fn worker_action(key: &str, text: &str, extra: &[&str]) -> common::ActionSpec {
    let tool = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/worker-workspace/worker.py"),
    )
    .expect("worker.py");
    let mut args = String::from("--src=src.txt\n--out=out.txt\n");
    for a in extra {
        args.push_str(a);
        args.push('\n');
    }
    common::ActionSpec {
        args: ["python3", "worker.py", "@args"].map(String::from).to_vec(),
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        platform: vec![("persistentWorkerKey".into(), key.into())],
        output_paths: vec!["out.txt".into()],
        timeout: Some(std::time::Duration::from_secs(2)),
        inputs: vec![
            ("worker.py".into(), tool.into()),
            ("args".into(), args.into()),
            ("src.txt".into(), format!("{text}\n").into()),
        ],
        ..Default::default()
    }
}

/// The action's out.txt.
async fn output_of(client: &mut common::Client, ran: &common::Ran) -> String {
    let out = ran
        .result
        .output_files
        .first()
        .and_then(|f| f.digest.clone())
        .expect("out.txt");
    client.text(Some(&out)).await
}

/// Who wrote the output of `key`'s action on `text`.
async fn served_by(client: &mut common::Client, key: &str, text: &str) -> (String, u32) {
    let ran = client.run(&worker_action(key, text, &[])).await;
    assert_eq!(ran.result.exit_code, 0, "{}", ran.stderr);
    let out = output_of(client, &ran).await;
    let field = |k: &str| {
        out.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("{k} in {out:?}"))
            .to_owned()
    };
    assert_eq!(field("mode"), "worker", "{out}");
    (field("id"), field("served").parse().expect("served"))
}

#[tokio::test]
async fn a_worker_is_replaced_after_its_requests_and_the_idle_pool_is_bounded() {
    let scratch = tempdir();
    let (server, _agent, _) = fleet(
        scratch.path(),
        &[
            "--isolation",
            "none",
            "--worker-max-requests",
            "2",
            "--worker-max-idle",
            "1",
        ],
    );
    let mut client = server.client().await;
    common::wait_for_fleet(&mut client).await;
    let (a1, n1) = served_by(&mut client, "a", "one").await;
    let (a2, n2) = served_by(&mut client, "a", "two").await;
    let (a3, n3) = served_by(&mut client, "a", "three").await;
    assert_eq!((a1 == a2, n1, n2), (true, 1, 2), "one worker, two requests");
    assert_ne!(a3, a1, "replaced after worker_max_requests");
    assert_eq!(n3, 1);
    // Another key's worker takes the one idle place: a's worker goes.
    let (b1, _) = served_by(&mut client, "b", "four").await;
    let (a4, n4) = served_by(&mut client, "a", "five").await;
    assert_ne!(a4, a3, "the least recently used idle worker was stopped");
    assert_ne!(a4, b1);
    assert_eq!(n4, 1);
}

#[tokio::test]
async fn an_idle_worker_is_stopped_after_the_idle_timeout() {
    let scratch = tempdir();
    let (server, _agent, _) = fleet(
        scratch.path(),
        &["--isolation", "none", "--worker-idle-timeout", "1s"],
    );
    let mut client = server.client().await;
    common::wait_for_fleet(&mut client).await;
    let (first, _) = served_by(&mut client, "idle", "one").await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let (second, served) = served_by(&mut client, "idle", "two").await;
    assert_ne!(first, second, "an idle worker outlived worker_idle_timeout");
    assert_eq!(served, 1);
}
