//! Running Outpost as a service: the units and property lists `install`
//! renders (checked by `systemd-analyze verify` and Python's plistlib), the
//! sd_notify conversation with a service manager, configuration reload at
//! SIGHUP and on file changes, and the Debian package.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{ActionSpec, Agent, Coordinator, OUTPOST, tempdir};

fn outpost(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(OUTPOST)
        .args(args)
        .current_dir(std::env::temp_dir())
        .output()
        .expect("run outpost");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The file `install --print` would write at `path`.
fn written(print: &str, path: &str) -> String {
    let header = format!("==> write {path} ");
    let mut lines = print.lines().skip_while(|l| !l.starts_with(&header));
    assert!(lines.next().is_some(), "no {path} in:\n{print}");
    let mut out = String::new();
    for line in lines.take_while(|l| !l.starts_with("==> ")) {
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn need(tool: &str, package: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("OUTPOST_REQUIRE_SERVICE_TOOLS").is_none(),
            "{tool} is missing (apt-get install {package}; scripts/test.sh does this)"
        );
        eprintln!("skipped: {tool} is not installed (apt-get install {package})");
    }
    found
}

#[test]
fn systemd_accepts_the_rendered_units() {
    if !need("systemd-analyze", "systemd") {
        return;
    }
    let dir = tempdir();
    for (role, extra) in [
        ("agent", &["--coordinator", "grpc://build.example:8980"][..]),
        ("coordinator", &["--listen", "0.0.0.0:8980"][..]),
    ] {
        let mut args = vec![role, "install", "--print", "--manager", "systemd"];
        args.extend_from_slice(extra);
        let (ok, print, err) = outpost(&args);
        assert!(ok, "{err}");
        let name = format!("outpost-{role}.service");
        let unit = written(&print, &format!("/etc/systemd/system/{name}"));
        assert!(unit.contains("Type=notify"), "{unit}");
        assert!(unit.contains(&format!(
            "ExecStart={OUTPOST} {role} --config /etc/outpost/{role}.yaml"
        )));
        let config = written(&print, &format!("/etc/outpost/{role}.yaml"));
        assert!(
            config.contains(&format!("/var/lib/outpost/{role}")),
            "{config}"
        );
        let file = dir.path().join(&name);
        std::fs::write(&file, &unit).expect("write unit");
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&file)
            .output()
            .expect("systemd-analyze");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "{name}: {said}"
        );
    }
    // The agent's unit is what lets it drain and make its cgroups.
    let (_, print, _) = outpost(&["agent", "install", "--print", "--manager", "systemd"]);
    let unit = written(&print, "/etc/systemd/system/outpost-agent.service");
    for line in [
        "Delegate=yes",
        "KillMode=mixed",
        "TimeoutStopSec=15min",
        "WatchdogSec=",
    ] {
        assert!(unit.contains(line), "{line} missing:\n{unit}");
    }
}

#[test]
fn the_launchd_property_lists_parse() {
    if !need("python3", "python3") {
        return;
    }
    let dir = tempdir();
    for (role, system) in [("agent", false), ("coordinator", true)] {
        let mut args = vec![role, "install", "--print", "--manager", "launchd"];
        if system {
            args.push("--system");
        }
        let (ok, print, err) = outpost(&args);
        assert!(ok, "{err}");
        let path = print
            .lines()
            .find_map(|l| {
                l.strip_prefix("==> write ")
                    .filter(|p| p.contains(".plist"))
            })
            .and_then(|p| p.split(" (mode").next())
            .expect("a plist is written")
            .to_owned();
        let plist = written(&print, &path);
        let file = dir.path().join(format!("{role}.plist"));
        std::fs::write(&file, &plist).expect("write plist");
        let check = format!(
            "import plistlib,sys\n\
             p = plistlib.load(open(sys.argv[1], 'rb'))\n\
             assert p['Label'] == 'dev.outpost.{role}', p\n\
             assert p['ProgramArguments'][1:3] == ['{role}', '--config'], p\n\
             assert p['RunAtLoad'] is True and 'KeepAlive' in p, p\n\
             assert p['SoftResourceLimits']['NumberOfFiles'] >= 65536, p\n"
        );
        let out = Command::new("python3")
            .args(["-c", &check])
            .arg(&file)
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "{role}: {}\n{plist}",
            String::from_utf8_lossy(&out.stderr)
        );
        if system {
            assert!(path.starts_with("/Library/LaunchDaemons/"), "{path}");
            assert!(print.contains("launchctl bootstrap system"), "{print}");
        } else {
            assert!(path.contains("/Library/LaunchAgents/"), "{path}");
            assert!(print.contains("launchctl bootstrap gui/"), "{print}");
        }
    }
    let agent = written(
        &outpost(&["agent", "install", "--print", "--manager", "launchd"]).1,
        &format!(
            "{}/Library/LaunchAgents/dev.outpost.agent.plist",
            std::env::var("HOME").expect("HOME")
        ),
    );
    assert!(agent.contains("<string>Interactive</string>"), "{agent}");
}

#[test]
fn install_refuses_what_cannot_work_and_changes_nothing() {
    // Without a running systemd (as on this test machine) install says so.
    if !Path::new("/run/systemd/system").exists() {
        let (ok, _, err) = outpost(&["agent", "install", "--coordinator", "grpc://x:1"]);
        assert!(!ok);
        assert!(err.contains("systemd is not running"), "{err}");
        assert!(!Path::new("/etc/systemd/system/outpost-agent.service").exists());
    }
    let (ok, _, err) = outpost(&["agent", "install", "--manager", "launchd"]);
    if !cfg!(target_os = "macos") {
        assert!(!ok);
        assert!(err.contains("launchd runs on macOS only"), "{err}");
    }
    let (ok, _, err) = outpost(&["agent", "install", "--print", "--system"]);
    assert!(!ok && err.contains("--system is for launchd"), "{err}");
    let (ok, out, err) = outpost(&["agent", "uninstall", "--print", "--manager", "systemd"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("systemctl disable --now outpost-agent.service"),
        "{out}"
    );
    assert!(out.contains("kept /etc/outpost/agent.yaml"), "{out}");
}

/// Datagrams a service manager would receive.
struct NotifySocket {
    path: PathBuf,
    got: Arc<Mutex<Vec<String>>>,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&got);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                sink.lock().expect("lock").push(text);
            }
        });
        NotifySocket { path, got }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(OUTPOST);
        cmd.env("NOTIFY_SOCKET", &self.path)
            .env("WATCHDOG_USEC", "200000");
        cmd
    }

    fn messages(&self) -> Vec<String> {
        self.got.lock().expect("lock").clone()
    }

    /// Waits for a message with `field`; returns how many came before it.
    async fn wait_for(&self, field: &str, after: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.messages();
            if let Some(i) = got
                .iter()
                .skip(after)
                .position(|m| m.lines().any(|l| l == field))
            {
                return after + i;
            }
            assert!(Instant::now() < deadline, "never got {field}: {got:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).expect("signal");
}

/// A reload that arrives while the agent still starts (its sandbox probe
/// done, the host not yet described) is ignored, not fatal.
#[tokio::test]
async fn a_sighup_during_start_up_does_not_end_the_agent() {
    use nix::sys::signal::Signal;
    let dir = tempdir();
    let coordinator = Coordinator::start(&dir.path().join("data"), &[]);
    let mut agent = Agent::start(&coordinator.endpoint(), &dir.path().join("agent"), &[]);
    agent
        .wait_for("linux-sandbox ready", Duration::from_secs(30))
        .await;
    signal(agent.pid(), Signal::SIGHUP);
    agent
        .wait_for("registered with the coordinator", Duration::from_secs(30))
        .await;
    assert!(agent.is_running());
}

#[tokio::test]
async fn the_service_manager_hears_ready_watchdog_reload_and_stopping() {
    use nix::sys::signal::Signal;
    let dir = tempdir();
    let socket = NotifySocket::bind(dir.path());
    let coordinator = Coordinator::start_with(socket.command(), &dir.path().join("data"), &[]);
    let ready = socket.wait_for("READY=1", 0).await;
    socket.wait_for("WATCHDOG=1", ready).await;
    signal(coordinator.pid(), Signal::SIGHUP);
    let reloading = socket.wait_for("RELOADING=1", ready).await;
    assert!(
        socket.messages()[reloading].contains("MONOTONIC_USEC="),
        "{:?}",
        socket.messages()
    );
    socket.wait_for("READY=1", reloading).await;

    std::fs::create_dir(dir.path().join("a")).expect("mkdir");
    let agent_socket = NotifySocket::bind(&dir.path().join("a"));
    let agent = Agent::start_with(
        agent_socket.command(),
        &coordinator.endpoint(),
        &dir.path().join("agent"),
        &["--isolation", "none"],
    );
    let ready = agent_socket.wait_for("READY=1", 0).await;
    agent_socket.wait_for("WATCHDOG=1", ready).await;
    agent
        .wait_for("registered with the coordinator", Duration::from_secs(30))
        .await;
    // A reload during the drain (an action still running) must not tell
    // the manager the agent is ready again.
    let mut client = coordinator.client().await;
    let action = client.upload_action(&ActionSpec::shell("sleep 2")).await;
    let (_stream, _) = client.start_execute(&action).await;
    agent
        .wait_for("running an action", Duration::from_secs(30))
        .await;
    let pid = agent.pid();
    let stop = tokio::spawn(agent.stop());
    let stopping = agent_socket.wait_for("STOPPING=1", ready).await;
    signal(pid, Signal::SIGHUP);
    assert!(stop.await.expect("join").success());
    // Nothing claims readiness, or a reload, again once stopping.
    assert!(
        !agent_socket.messages()[stopping..]
            .iter()
            .any(|m| m.contains("READY=1") || m.contains("RELOADING=1")),
        "agent {pid}: {:?}",
        agent_socket.messages()
    );
    let before = socket.messages().len();
    coordinator.stop().await;
    socket
        .wait_for("STOPPING=1", before.saturating_sub(1))
        .await;
}

#[tokio::test]
async fn a_reload_applies_labels_and_keeps_running_actions() {
    use nix::sys::signal::Signal;
    let dir = tempdir();
    let coordinator = Coordinator::start(&dir.path().join("data"), &["--startup-grace", "0s"]);
    let config = dir.path().join("agent.yaml");
    std::fs::write(&config, "labels:\n  - team=a\nslots: 2\n").expect("write config");
    let config_arg = config.to_str().expect("utf-8 path");
    let agent = Agent::start(
        &coordinator.endpoint(),
        &dir.path().join("agent"),
        &[
            "--isolation",
            "none",
            "--config",
            config_arg,
            "--watch-config",
        ],
    );
    agent
        .wait_for("registered with the coordinator", Duration::from_secs(30))
        .await;
    let mut client = coordinator.client().await;
    let on_b = client
        .upload_action(&ActionSpec::shell("echo on-b").with_platform("team", "b"))
        .await;
    let refused = client
        .execute(&on_b, true)
        .await
        .expect_err("team=b is offered by nobody yet");
    assert!(refused.message().contains("team=b"), "{refused:?}");
    // Running through the change of labels.
    let long = client
        .upload_action(&ActionSpec::shell("sleep 2; echo long-done"))
        .await;
    let (long_stream, _) = client.start_execute(&long).await;
    agent
        .wait_for("running an action", Duration::from_secs(10))
        .await;

    std::fs::write(&config, "labels:\n  - team=b\nslots: 3\n").expect("write config");
    signal(agent.pid(), Signal::SIGHUP);
    agent
        .wait_for("registering again", Duration::from_secs(10))
        .await;
    // Registered anew (the running action resumed): the coordinator has
    // the new labels before anything asks for them.
    agent.wait_for("resumed=1", Duration::from_secs(10)).await;
    agent
        .wait_for("take effect only after a restart", Duration::from_secs(10))
        .await;
    assert!(
        agent.count("settings=[\"slots\"]") >= 1,
        "slots needs a restart"
    );
    let (_, ran) = client.execute(&on_b, true).await.expect("execute");
    assert_eq!(ran.result.as_ref().map(|r| r.exit_code), Some(0), "{ran:?}");
    let (_, long_ran) = common::follow(long_stream).await.expect("the long action");
    assert_eq!(
        long_ran.result.as_ref().map(|r| r.exit_code),
        Some(0),
        "the running action survived the reload: {long_ran:?}"
    );

    // A broken file (noticed by --watch-config alone) changes nothing.
    std::fs::write(&config, "labels: [\n").expect("write config");
    agent
        .wait_for("configuration not reloaded", Duration::from_secs(10))
        .await;
    let echo = client
        .upload_action(&ActionSpec::shell("echo still-b").with_platform("team", "b"))
        .await;
    let (_, still) = client.execute(&echo, true).await.expect("execute");
    assert_eq!(
        still.result.as_ref().map(|r| r.exit_code),
        Some(0),
        "{still:?}"
    );
}

#[tokio::test]
async fn a_reload_changes_the_log_filter() {
    use nix::sys::signal::Signal;
    let dir = tempdir();
    let socket = NotifySocket::bind(dir.path());
    let config = dir.path().join("coordinator.yaml");
    std::fs::write(&config, "log: warn\nlisten: 127.0.0.1:0\n").expect("write config");
    let mut child = socket
        .command()
        .args(["coordinator", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env_remove("OUTPOST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the coordinator");
    let stderr = child.stderr.take().expect("piped");
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = Arc::clone(&lines);
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            eprintln!("[coordinator] {line}");
            sink.lock().expect("lock").push(line);
        }
    });
    let ready = socket.wait_for("READY=1", 0).await;
    let count = |needle: &str| {
        lines
            .lock()
            .expect("lock")
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    };
    assert_eq!(count(" INFO "), 0, "log: warn hides info lines");
    std::fs::write(&config, "log: info\nlisten: 127.0.0.1:0\nmax_attempts: 5\n")
        .expect("write config");
    signal(child.id(), Signal::SIGHUP);
    let reloaded = socket.wait_for("RELOADING=1", ready).await;
    socket.wait_for("READY=1", reloaded).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while count("configuration reloaded") == 0 || count("max_attempts") == 0 {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            lines.lock().expect("lock")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(count(" INFO ") > 0);
    let _ = child.kill();
    let _ = child.wait();
}

/// `scripts/package-deb.sh` builds a package that `dpkg -i` installs (the
/// binary, both units, the service user) and `dpkg --purge` removes.
#[test]
fn the_debian_package_installs_and_purges() {
    if !need("dpkg-deb", "dpkg") || !need("systemd-analyze", "systemd") {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: dpkg -i needs root");
        return;
    }
    let installed = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "outpost"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("installed"));
    if installed {
        eprintln!("skipped: an outpost package is installed on this machine; not touching it");
        return;
    }
    let dir = tempdir();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join("scripts/package-deb.sh"))
        .args(["--fast", "--no-strip", "--binary", OUTPOST, "--out"])
        .arg(dir.path())
        .current_dir(root)
        .output()
        .expect("package-deb.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = stdout
        .lines()
        .last()
        .expect("the .deb path")
        .trim()
        .to_owned();
    let dpkg = |args: &[&str]| {
        let out = Command::new("dpkg").args(args).output().expect("dpkg");
        assert!(
            out.status.success(),
            "dpkg {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    dpkg(&["-i", &deb]);
    let result = std::panic::catch_unwind(|| {
        let version = Command::new("/usr/bin/outpost")
            .arg("--version")
            .output()
            .expect("the installed binary runs");
        assert!(String::from_utf8_lossy(&version.stdout).starts_with("outpost "));
        for unit in ["outpost-agent.service", "outpost-coordinator.service"] {
            let path = format!("/lib/systemd/system/{unit}");
            let out = Command::new("systemd-analyze")
                .args(["verify", "--man=no", &path])
                .output()
                .expect("systemd-analyze");
            let said = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(
                out.status.success() && said.trim().is_empty(),
                "{unit}: {said}"
            );
        }
        assert!(Path::new("/etc/outpost/agent.yaml").exists());
        assert!(
            nix::unistd::User::from_name("outpost")
                .ok()
                .flatten()
                .is_some()
        );
    });
    dpkg(&["--purge", "outpost"]);
    assert!(!Path::new("/usr/bin/outpost").exists());
    assert!(!Path::new("/lib/systemd/system/outpost-agent.service").exists());
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
