//! Real Bazel (4.2.3 from Debian's bazel-bootstrap) against the real
//! coordinator: the example workspace in tests/bazel-workspace builds and
//! tests with --remote_cache, and after `bazel clean` every action is a
//! remote cache hit, also after the coordinator was killed and restarted.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Coordinator, tempdir};

/// A Bazel with its own output root; shut down when dropped.
struct Bazel {
    workspace: PathBuf,
    output_root: PathBuf,
}

impl Bazel {
    fn run(&self, args: &[&str]) -> (bool, String) {
        let output = Command::new("bazel")
            .arg(format!("--output_user_root={}", self.output_root.display()))
            .args(args)
            .current_dir(&self.workspace)
            .output()
            .expect("run bazel");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), text)
    }

    /// `bazel test //...` against the cache; returns Bazel's process summary.
    fn test_all(&self, cache: &str) -> String {
        let (ok, text) = self.run(&[
            "test",
            "//...",
            &format!("--remote_cache={cache}"),
            "--remote_timeout=60",
            "--color=no",
            "--curses=no",
            "--noshow_progress",
        ]);
        eprintln!("{text}");
        assert!(ok, "bazel test failed (output above)");
        text.lines()
            .find(|l| l.contains(" processes: "))
            .map(str::to_owned)
            .expect("bazel printed a process summary")
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

fn assert_all_hits(summary: &str) {
    let kinds = spawn_kinds(summary);
    let hits = kinds
        .iter()
        .find(|(_, k)| k == "remote cache hit")
        .map_or(0, |(n, _)| *n);
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

#[test]
fn bazel_builds_from_the_remote_cache_after_clean_and_restart() {
    if Command::new("bazel").arg("help").output().is_err() {
        let required = std::env::var_os("OUTPOST_REQUIRE_BAZEL").is_some();
        let why =
            "bazel is not installed (apt-get install bazel-bootstrap; scripts/test.sh does this)";
        assert!(!required, "{why}");
        eprintln!("SKIPPED: {why}");
        return;
    }
    let scratch = tempdir();
    let workspace = scratch.path().join("workspace");
    copy_workspace(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bazel-workspace"),
        &workspace,
    );
    let bazel = Bazel {
        workspace,
        output_root: scratch.path().join("bazel-root"),
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
