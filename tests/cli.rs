//! The command line: `outpost up`, configuration layering and the errors a
//! person sees for bad configuration or a foreign data directory.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{OUTPOST, tempdir};

fn outpost(args: &[&str], cwd: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(OUTPOST)
        .args(args)
        .current_dir(cwd)
        .env_remove("OUTPOST_LISTEN")
        .output()
        .expect("run outpost");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn up_runs_a_coordinator_and_a_local_agent_and_prints_bazelrc_lines() {
    let dir = tempdir();
    let mut child = Command::new(OUTPOST)
        .args(["up", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start outpost up");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("outpost up printed its bazelrc lines");
        if line.starts_with("build --remote_cache=") {
            break line;
        }
    };
    assert!(
        line.starts_with("build --remote_cache=grpc://127.0.0.1:"),
        "{line}"
    );
    assert!(
        dir.path().join("outpost-data/FORMAT").exists(),
        "no ./outpost-data"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn config_file_environment_and_flags_layer_in_that_order() {
    let dir = tempdir();
    let config = dir.path().join("c.yaml");
    std::fs::write(
        &config,
        "max_cas_size: 2GiB\nmax_batch_size: 1MiB\nlog: warn\n",
    )
    .expect("write");
    let out = Command::new(OUTPOST)
        .args(["coordinator", "--print-config", "--config"])
        .arg(&config)
        .args(["--max-batch-size", "2MiB"])
        .env("OUTPOST_MAX_CAS_SIZE", "3GiB")
        .env("OUTPOST_LOG", "debug")
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("max_cas_size: 3GiB"),
        "env beats file: {text}"
    );
    assert!(
        text.contains("max_batch_size: 2MiB"),
        "flag beats file: {text}"
    );
    assert!(text.contains("log: debug"), "{text}");
    assert!(
        text.contains("listen: 0.0.0.0:8980"),
        "defaults fill the rest: {text}"
    );
}

#[test]
fn bad_configuration_is_refused_with_the_line() {
    let dir = tempdir();
    let config = dir.path().join("c.yaml");
    std::fs::write(
        &config,
        "listen: 127.0.0.1:1\n# a comment\nmax_cas_sise: 2GiB\n",
    )
    .expect("write");
    let (code, _, err) = outpost(
        &["coordinator", "--config", config.to_str().expect("utf-8")],
        dir.path(),
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("line 3") && err.contains("max_cas_sise"),
        "{err}"
    );

    std::fs::write(&config, "max_batch_size: 1KiB\n").expect("write");
    let (code, _, err) = outpost(
        &["coordinator", "--config", config.to_str().expect("utf-8")],
        dir.path(),
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("64KiB minimum"), "{err}");

    let (code, _, err) = outpost(&["coordinator", "--max-cas-size", "lots"], dir.path());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a size"), "{err}");
}

#[test]
fn a_foreign_or_newer_data_directory_is_refused() {
    let dir = tempdir();
    let foreign = dir.path().join("foreign");
    std::fs::create_dir(&foreign).expect("mkdir");
    std::fs::write(foreign.join("precious.txt"), "keep me").expect("write");
    let (code, _, err) = outpost(
        &[
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            foreign.to_str().expect("utf-8"),
        ],
        dir.path(),
    );
    assert_ne!(code, 0);
    assert!(err.contains("not an outpost data directory"), "{err}");
    assert_eq!(
        std::fs::read_to_string(foreign.join("precious.txt")).expect("kept"),
        "keep me"
    );

    let newer = dir.path().join("newer");
    std::fs::create_dir(&newer).expect("mkdir");
    std::fs::write(newer.join("FORMAT"), "outpost-data-format 7\n").expect("write");
    let (code, _, err) = outpost(
        &[
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            newer.to_str().expect("utf-8"),
        ],
        dir.path(),
    );
    assert_ne!(code, 0);
    assert!(err.contains("reads data format 1 only"), "{err}");
}

#[test]
fn up_help_shows_the_address_up_listens_on() {
    let dir = tempdir();
    let (code, help, err) = outpost(&["up", "--help"], dir.path());
    assert_eq!(code, 0, "{err}");
    assert!(help.contains("[default: 127.0.0.1:8980]"), "{help}");
    assert!(!help.contains("0.0.0.0"), "{help}");
    let (_, help, _) = outpost(&["coordinator", "--help"], dir.path());
    assert!(help.contains("[default: 0.0.0.0:8980]"), "{help}");
    let (code, config, err) = outpost(&["up", "--print-config"], dir.path());
    assert_eq!(code, 0, "{err}");
    assert!(config.contains("listen: 127.0.0.1:8980"), "{config}");
}

#[test]
fn a_missing_config_file_is_reported_once() {
    let dir = tempdir();
    for role in ["coordinator", "agent"] {
        let (code, _, err) = outpost(
            &[role, "--print-config", "--config", "missing.yaml"],
            dir.path(),
        );
        assert_eq!(code, 2, "{role}: {err}");
        assert!(err.contains("missing.yaml"), "{role}: {err}");
        assert_eq!(err.matches("os error 2").count(), 1, "{role}: {err}");
    }
}
