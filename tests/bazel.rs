//! Real Bazel (4.2.3 from Debian's bazel-bootstrap) against the real
//! coordinator and agents: the example workspace in tests/bazel-workspace
//! builds and tests with --remote_cache and with --remote_executor.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use std::time::Duration;

use common::{Agent, Coordinator, tempdir};

/// A Bazel with its own output root; shut down when dropped.
struct Bazel {
    workspace: PathBuf,
    output_root: PathBuf,
}

impl Bazel {
    fn run(&self, args: &[&str]) -> (bool, String) {
        common::bazel(&self.workspace, &self.output_root, args)
    }

    /// `bazel test //...` against the cache; returns Bazel's process summary.
    fn test_all(&self, cache: &str) -> String {
        self.expect_ok(&["test", "//...", &format!("--remote_cache={cache}")])
    }

    /// Runs a command with the common flags; returns (success, output).
    fn remote(&self, args: &[&str]) -> (bool, String) {
        let mut all: Vec<&str> = args.to_vec();
        all.extend([
            "--remote_timeout=600",
            "--color=no",
            "--curses=no",
            "--noshow_progress",
            "--jobs=8",
        ]);
        let (ok, text) = self.run(&all);
        eprintln!("{text}");
        (ok, text)
    }

    /// Like [`Bazel::remote`] but must succeed; returns the process summary.
    fn expect_ok(&self, args: &[&str]) -> String {
        let (ok, text) = self.remote(args);
        assert!(ok, "bazel {args:?} failed (output above)");
        summary(&text)
    }

    fn clean(&self) {
        let (ok, text) = self.run(&["clean"]);
        assert!(ok, "bazel clean failed: {text}");
    }
}

impl Drop for Bazel {
    fn drop(&mut self) {
        let _ = self.run(&["shutdown"]);
    }
}

fn summary(text: &str) -> String {
    text.lines()
        .find(|l| l.contains(" processes: "))
        .map(str::to_owned)
        .expect("bazel printed a process summary")
}

/// Kinds of spawns in a summary like
/// `INFO: 63 processes: 35 remote cache hit, 28 internal.`
fn spawn_kinds(summary: &str) -> Vec<(u32, String)> {
    let list = summary
        .split(" processes: ")
        .nth(1)
        .expect("summary")
        .trim_end_matches('.');
    list.split(", ")
        .map(|part| {
            let (n, kind) = part.split_once(' ').expect("COUNT KIND");
            (n.parse().expect("count"), kind.to_owned())
        })
        .collect()
}

/// How many spawns of `kind` a summary counts.
fn spawns(summary: &str, kind: &str) -> u32 {
    spawn_kinds(summary)
        .iter()
        .find(|(_, k)| k == kind)
        .map_or(0, |(n, _)| *n)
}

fn assert_all_hits(summary: &str) {
    let kinds = spawn_kinds(summary);
    let hits = spawns(summary, "remote cache hit");
    assert!(
        hits >= 30,
        "expected every action to be a remote cache hit: {summary}"
    );
    for (n, kind) in &kinds {
        assert!(
            kind == "remote cache hit" || kind == "internal",
            "{n} actions ran as {kind}: {summary}"
        );
    }
}

/// Copies the workspace, leaving out Bazel's convenience symlinks that a
/// local build may have left in the source tree.
fn copy_workspace(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp");
    assert!(status.success());
    for entry in std::fs::read_dir(to).expect("copied workspace").flatten() {
        if entry.file_name().to_string_lossy().starts_with("bazel-") {
            std::fs::remove_file(entry.path()).expect("remove a bazel-* symlink");
        }
    }
}

/// A fresh copy of the example workspace with its own Bazel output root;
/// `None` (after saying why) when Bazel is not installed and the run does
/// not require it.
fn bazel_in(scratch: &Path) -> Option<Bazel> {
    if Command::new("bazel").arg("help").output().is_err() {
        let required = std::env::var_os("OUTPOST_REQUIRE_BAZEL").is_some();
        let why =
            "bazel is not installed (apt-get install bazel-bootstrap; scripts/test.sh does this)";
        assert!(!required, "{why}");
        eprintln!("SKIPPED: {why}");
        return None;
    }
    let workspace = scratch.join("workspace");
    copy_workspace(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bazel-workspace"),
        &workspace,
    );
    Some(Bazel {
        workspace,
        output_root: scratch.join("bazel-root"),
    })
}

#[test]
fn bazel_builds_from_the_remote_cache_after_clean_and_restart() {
    let scratch = tempdir();
    let Some(bazel) = bazel_in(scratch.path()) else {
        return;
    };
    let data_dir = scratch.path().join("outpost-data");

    let server = Coordinator::start(&data_dir, &[]);
    let cold = bazel.test_all(&server.endpoint());
    let executed: u32 = spawn_kinds(&cold)
        .iter()
        .filter(|(_, k)| k != "internal")
        .map(|(n, _)| n)
        .sum();
    assert!(executed >= 30, "the cold build ran too few actions: {cold}");

    bazel.clean();
    assert_all_hits(&bazel.test_all(&server.endpoint()));

    // The cache survives the coordinator dying hard.
    server.kill();
    let server = Coordinator::start(&data_dir, &[]);
    bazel.clean();
    assert_all_hits(&bazel.test_all(&server.endpoint()));

    // The 64 MiB generated file came back intact (its test checks the digest
    // too); look at it directly as well.
    let blob = bazel.workspace.join("bazel-bin/gen/blob.bin");
    let meta = std::fs::metadata(&blob).expect("bazel downloaded gen/blob.bin");
    assert!(
        meta.len() >= 50 << 20,
        "{} is only {} bytes",
        blob.display(),
        meta.len()
    );
}

#[test]
fn bazel_runs_every_action_remotely_on_two_agents() {
    let scratch = tempdir();
    let Some(bazel) = bazel_in(scratch.path()) else {
        return;
    };
    let server = Coordinator::start(&scratch.path().join("outpost-data"), &[]);
    let first = Agent::start(
        &server.endpoint(),
        &scratch.path().join("agent-1"),
        &["--slots", "2"],
    );
    let second = Agent::start(
        &server.endpoint(),
        &scratch.path().join("agent-2"),
        &["--slots", "2"],
    );
    let executor = format!("--remote_executor={}", server.endpoint());

    let cold = bazel.expect_ok(&["test", "//...", &executor]);
    let kinds = spawn_kinds(&cold);
    let remote = spawns(&cold, "remote");
    assert!(
        remote >= 30,
        "expected every action to run remotely: {cold}"
    );
    for (n, kind) in &kinds {
        assert!(
            kind == "remote" || kind == "internal",
            "{n} actions ran as {kind}: {cold}"
        );
    }
    let (on_first, on_second) = (
        first.count("running an action"),
        second.count("running an action"),
    );
    assert!(
        on_first > 0 && on_second > 0,
        "work was not spread: {on_first} and {on_second} actions"
    );
    assert_eq!(on_first + on_second, remote as usize);

    // Every action ran in the linux-sandbox, the agents' default.
    bazel.expect_ok(&["test", "//:sandboxed_test", &executor]);
    let log = std::fs::read_to_string(
        bazel
            .workspace
            .join("bazel-testlogs/sandboxed_test/test.log"),
    )
    .expect("the sandboxed test's log was downloaded");
    assert!(log.contains("OUTPOST_SANDBOXED: ok"), "{log}");
    assert_eq!(first.count("linux-sandbox ready"), 1);
    assert_eq!(second.count("linux-sandbox ready"), 1);

    // The failing test fails, and its log comes back.
    let (ok, text) = bazel.remote(&["test", "//:failing_test", &executor]);
    assert!(!ok, "the failing test passed");
    assert!(text.contains("FAILED"), "{text}");
    let log = std::fs::read_to_string(bazel.workspace.join("bazel-testlogs/failing_test/test.log"))
        .expect("the failing test's log was downloaded");
    assert!(log.contains("OUTPOST_EXPECTED_FAILURE"), "{log}");

    // A clean rebuild comes from the action cache.
    bazel.clean();
    assert_all_hits(&bazel.expect_ok(&["test", "//...", &executor]));
}

#[test]
fn bazel_survives_an_agent_killed_mid_action() {
    let scratch = tempdir();
    let Some(bazel) = bazel_in(scratch.path()) else {
        return;
    };
    let server = Coordinator::start(
        &scratch.path().join("outpost-data"),
        &["--agent-reconnect-grace", "2s"],
    );
    let first = Agent::start(
        &server.endpoint(),
        &scratch.path().join("agent-1"),
        &["--slots", "1"],
    );
    let executor = format!("--remote_executor={}", server.endpoint());
    let build = std::thread::spawn(move || {
        let result = bazel.remote(&["build", "//slow:slow", &executor]);
        (result, bazel)
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        first
            .wait_for("running an action", Duration::from_secs(120))
            .await;
        let second = Agent::start(
            &server.endpoint(),
            &scratch.path().join("agent-2"),
            &["--slots", "1"],
        );
        second
            .wait_for("registered with the coordinator", Duration::from_secs(30))
            .await;
        first.kill();
        let ((ok, text), bazel) = build.join().expect("bazel thread");
        assert!(ok, "the build failed after an agent was killed: {text}");
        assert!(!text.contains("ERROR"), "bazel showed an error: {text}");
        assert!(
            second.count("running an action") >= 1,
            "the retry did not run on the second agent"
        );
        let out = std::fs::read_to_string(bazel.workspace.join("bazel-bin/slow/slow.txt"))
            .expect("output");
        assert_eq!(out, "finished\n");
    });
}

/// Bazel sends its token with --remote_header; the agent has its own.
/// (Bazel over TLS is not tested here: Debian's bazel-bootstrap carries a
/// Netty without ALPN and fails any grpcs:// remote with "JDK provider
/// does not support ALPN protocol" before it connects; tests/tls.rs uses
/// gRPC's C core client instead.)
#[test]
fn bazel_builds_with_a_token() {
    let scratch = tempdir();
    let Some(bazel) = bazel_in(scratch.path()) else {
        return;
    };
    let d = scratch.path();
    let builder_token = "bazel-builder-token-0001";
    std::fs::write(d.join("client-tokens"), format!("{builder_token}\n")).expect("write");
    std::fs::write(d.join("agent-tokens"), "agent-token-0000000001\n").expect("write");
    std::fs::write(d.join("agent.token"), "agent-token-0000000001\n").expect("write");
    let path = |p: &Path| p.display().to_string();
    let server = Coordinator::start(
        &d.join("outpost-data"),
        &[
            "--client-tokens",
            &path(&d.join("client-tokens")),
            "--agent-tokens",
            &path(&d.join("agent-tokens")),
        ],
    );
    let agent = Agent::start(
        &server.endpoint(),
        &d.join("agent"),
        &[
            "--slots",
            "2",
            "--token-file",
            &path(&d.join("agent.token")),
        ],
    );
    let executor = format!("--remote_executor={}", server.endpoint());
    let header = format!("--remote_header=authorization=Bearer {builder_token}");
    let cold = bazel.expect_ok(&["test", "//...", &executor, &header]);
    let remote = spawns(&cold, "remote");
    assert!(
        remote >= 30,
        "expected every action to run remotely: {cold}"
    );
    assert_eq!(agent.count("running an action"), remote as usize);

    // Without the token, Bazel is turned away with the reason.
    bazel.clean();
    let (ok, text) = bazel.remote(&["build", "//:greet_test", &executor]);
    assert!(!ok, "a build without a token succeeded");
    assert!(text.contains("UNAUTHENTICATED"), "{text}");
}

/// An action that runs longer than `abandon_after` while Bazel waits on
/// its Execute stream: Bazel is still there, so the operation must not be
/// abandoned. No retries are allowed, so the action has to finish in the
/// one attempt, on the one agent.
#[test]
fn bazel_gets_the_result_of_an_action_longer_than_abandon_after() {
    let scratch = tempdir();
    let Some(bazel) = bazel_in(scratch.path()) else {
        return;
    };
    let server = Coordinator::start(
        &scratch.path().join("outpost-data"),
        &["--abandon-after", "3s"],
    );
    let agent = Agent::start(
        &server.endpoint(),
        &scratch.path().join("agent"),
        &["--slots", "1"],
    );
    let executor = format!("--remote_executor={}", server.endpoint());
    let summary = bazel.expect_ok(&["build", "//long:long", &executor, "--remote_retries=0"]);
    assert_eq!(spawns(&summary, "remote"), 1, "{summary}");
    let out = std::fs::read_to_string(bazel.workspace.join("bazel-bin/long/long.txt"))
        .expect("the output was downloaded");
    assert_eq!(out, "finished after 8s\n");
    assert_eq!(
        agent.count("running an action"),
        1,
        "the action was run more than once"
    );
}
