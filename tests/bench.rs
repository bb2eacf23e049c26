//! A smoke run of every `outpost bench` scenario (tiny counts, debug build)
//! against a real coordinator and agent, so the benchmarks keep working.
//! Benchmarks are not timed tests: the figures are only checked for shape.

mod common;

use std::process::Command;

use common::{Agent, Coordinator, OUTPOST, tempdir};

fn bench(endpoint: &str, args: &[&str]) -> String {
    let out = Command::new(OUTPOST)
        .arg("bench")
        .args(args)
        .args(["--endpoint", endpoint])
        .output()
        .expect("run outpost bench");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "bench {args:?} failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[tokio::test]
async fn every_scenario_runs_and_prints_its_figures() {
    let dir = tempdir();
    let server = Coordinator::start(&dir.path().join("data"), &["--abandon-after", "10m"]);
    let _agent = Agent::start(
        &server.endpoint(),
        &dir.path().join("agent"),
        &["--slots", "4"],
    );
    let endpoint = server.endpoint();
    let pid = server.pid().to_string();
    let runs: Vec<(Vec<&str>, &[&str])> = vec![
        (
            vec!["exec-latency", "-n", "5"],
            &["exec-latency n=5 p50_ms="],
        ),
        (
            vec!["exec-throughput", "-n", "10", "-c", "4"],
            &["actions_per_s="],
        ),
        (
            vec!["cas", "--large-mib", "2"],
            &[
                "small_upload_mb_s=",
                "large_download_mb_s=",
                "find_missing_p99_ms=",
            ],
        ),
        (
            vec!["ac-hit", "-n", "50", "-c", "4", "--json"],
            &["{\"scenario\":\"ac-hit\"", "\"hits_per_s\":"],
        ),
        (
            vec![
                "fleet",
                "--agents",
                "5",
                "--deep-queue",
                "150",
                "--idle-seconds",
                "1",
                "--coordinator-pid",
                &pid,
            ],
            &[
                "fleet agents=5",
                "idle_rss_mb=",
                "q100_p50_ms=",
                "q150_p99_ms=",
            ],
        ),
    ];
    for (args, expect) in runs {
        let out = bench(&endpoint, &args);
        for e in expect {
            assert!(out.contains(e), "{args:?} printed {out:?}, missing {e:?}");
        }
    }
}
