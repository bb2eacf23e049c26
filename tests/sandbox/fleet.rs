//! The sandbox suite's harness: a coordinator and an agent run as root or
//! as an unprivileged user in a delegated cgroup, and what the tests use
//! to look at the host.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{self, ActionSpec, Agent, Coordinator, OUTPOST, tempdir};
use outpost_proto::digest::{Digest, Function};
use outpost_proto::reapi;

/// Who runs the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum As {
    Root,
    Unprivileged,
}

pub const NOBODY: u32 = 65534;

pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub _server: Coordinator,
    pub agent: Agent,
    pub client: common::Client,
    pub _cgroups: Cgroups,
}

/// Removes the delegated cgroups (and what the agent made in them).
pub struct Cgroups(Vec<PathBuf>);

impl Drop for Cgroups {
    fn drop(&mut self) {
        fn remove(dir: &Path) {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    if e.path().is_dir() {
                        remove(&e.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
        for d in &self.0 {
            remove(d);
        }
    }
}

/// Prints one line per attempt; `sh -c` so each runs on its own.
pub const TRY: &str = r#"t() { if sh -c "$2" >/dev/null 2>&1; then echo "$1: ESCAPED"; else echo "$1: refused"; fi; }
"#;

/// Whether this host's cgroup v2 hierarchy (at `/sys/fs/cgroup`) offers
/// the memory controller, as on hosts without v1 controllers.
pub fn cgroup_v2_with_memory() -> bool {
    std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
        .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"))
}

/// Cgroups owned by `NOBODY`, for the unprivileged agent to make its action
/// cgroups in, as systemd's `Delegate=yes` would give it: one v2 cgroup
/// where v2 has the memory controller, else a v1 memory and a v1 pids
/// cgroup (empty on hosts with neither).
pub fn delegated_cgroups(name: &str) -> Vec<PathBuf> {
    if cgroup_v2_with_memory() {
        let root = Path::new("/sys/fs/cgroup");
        for c in ["+memory", "+pids", "+cpu"] {
            let _ = std::fs::write(root.join("cgroup.subtree_control"), c);
        }
        let dir = root.join(name);
        if std::fs::create_dir(&dir).is_err() {
            return Vec::new();
        }
        chown_tree(&dir);
        return vec![dir];
    }
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut out = Vec::new();
    for controller in ["memory", "pids"] {
        let Some(path) = own.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let _ = parts.next();
            let cs = parts.next()?;
            let path = parts.next()?;
            cs.split(',').any(|c| c == controller).then_some(path)
        }) else {
            continue;
        };
        let dir = Path::new("/sys/fs/cgroup")
            .join(controller)
            .join(path.trim_start_matches('/'))
            .join(name);
        if std::fs::create_dir_all(&dir).is_err() {
            continue;
        }
        chown_tree(&dir);
        out.push(dir);
    }
    out
}

pub fn chown_tree(p: &Path) {
    let status = Command::new("chown")
        .args(["-R", &format!("{NOBODY}:{NOBODY}")])
        .arg(p)
        .status()
        .expect("chown");
    assert!(status.success(), "chown {}", p.display());
}

impl Fleet {
    pub async fn start(user: As, extra: &[&str]) -> Fleet {
        Fleet::start_after(user, extra, "").await
    }

    /// Starts the agent from a shell that first runs `prelude` (which
    /// ends with `;`), e.g. to open descriptors the agent inherits.
    pub async fn start_after(user: As, extra: &[&str], prelude: &str) -> Fleet {
        let dir = tempdir();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        // Symlinks that climb out of the input root are let through, so the
        // sandbox's own containment of them is what gets tested.
        let server = Coordinator::start(
            &dir.path().join("data"),
            &["--allow-escaping-symlinks", "true"],
        );
        let work_dir = dir.path().join("agent");
        let (agent, cgroups) = match user {
            As::Root => {
                let mut cmd = Command::new("sh");
                cmd.arg("-c")
                    .arg(format!("{prelude} exec \"$0\" \"$@\""))
                    .arg(OUTPOST);
                (
                    Agent::start_with(cmd, &server.endpoint(), &work_dir, extra),
                    Vec::new(),
                )
            }
            As::Unprivileged => {
                std::fs::create_dir(&work_dir).expect("work dir");
                chown_tree(&work_dir);
                let name = format!("outpost-test-{}", rand::random::<u32>());
                let cgroups = delegated_cgroups(&name);
                let mut join = String::new();
                for c in &cgroups {
                    join.push_str(&format!("echo $$ > {}/cgroup.procs && ", c.display()));
                }
                let mut cmd = Command::new("sh");
                cmd.arg("-c")
                    .arg(format!(
                        "{prelude} {join}exec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups \"$0\" \"$@\""
                    ))
                    .arg(OUTPOST);
                (
                    Agent::start_with(cmd, &server.endpoint(), &work_dir, extra),
                    cgroups,
                )
            }
        };
        agent
            .wait_for("registered with the coordinator", Duration::from_secs(30))
            .await;
        if cgroup_v2_with_memory() {
            assert_eq!(
                agent.count("limits=cgroup v2"),
                1,
                "this host has cgroup v2 with memory: the agent must use it"
            );
        } else if Path::new("/sys/fs/cgroup/memory").is_dir() {
            assert_eq!(
                agent.count("limits=cgroup"),
                1,
                "this host has cgroup v1 memory and pids: the agent must use them"
            );
        }
        let client = server.client().await;
        Fleet {
            dir,
            _server: server,
            agent,
            client,
            _cgroups: Cgroups(cgroups),
        }
    }

    pub async fn run(&mut self, spec: &ActionSpec) -> Ran {
        let action = self.client.upload_action(spec).await;
        let (_, response) = self.client.execute(&action, true).await.expect("execute");
        let result = response.result.clone().unwrap_or_default();
        let stdout = self.output(result.stdout_digest.as_ref()).await;
        let stderr = self.output(result.stderr_digest.as_ref()).await;
        Ran {
            response,
            result,
            stdout,
            stderr,
        }
    }

    pub async fn output(&mut self, digest: Option<&reapi::Digest>) -> String {
        let Some(d) = digest else {
            return String::new();
        };
        let d = Digest::from_proto(d, Function::Sha256).expect("digest");
        String::from_utf8_lossy(&self.client.download(&d).await.expect("download")).into_owned()
    }

    /// Runs `t` lines; asserts each named attempt was refused.
    pub async fn refuses(&mut self, spec: ActionSpec, names: &[&str]) -> Ran {
        let ran = self.run(&spec).await;
        for name in names {
            assert!(
                ran.stdout.contains(&format!("{name}: refused")),
                "{name} was not refused:\nstdout: {}\nstderr: {}",
                ran.stdout,
                ran.stderr
            );
        }
        assert!(
            !ran.stdout.contains("ESCAPED"),
            "escaped:\n{}\nstderr: {}",
            ran.stdout,
            ran.stderr
        );
        ran
    }

    pub fn work_dir(&self) -> PathBuf {
        self.dir.path().join("agent")
    }
}

pub struct Ran {
    pub response: reapi::ExecuteResponse,
    pub result: reapi::ActionResult,
    pub stdout: String,
    pub stderr: String,
}

pub fn script(body: &str) -> ActionSpec {
    ActionSpec::shell(&format!("{TRY}{body}"))
}

pub fn alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

/// Host processes whose command line contains `marker`.
pub fn processes_with(marker: &str) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(marker) {
            out.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    out
}

/// Waits (a little) until no host process carries `marker`.
pub async fn all_gone(marker: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !processes_with(marker).is_empty() {
        assert!(
            Instant::now() < deadline,
            "{what}: {:?}",
            processes_with(marker)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A host user that is neither root nor the unprivileged agent's.
pub const OTHER_USER: u32 = 4242;

/// Runs `script` with `sh` as [`OTHER_USER`]; whether it succeeded.
pub fn as_other_user(script: &str) -> bool {
    Command::new("setpriv")
        .args([
            &format!("--reuid={OTHER_USER}"),
            &format!("--regid={OTHER_USER}"),
            "--clear-groups",
            "sh",
            "-c",
            script,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("setpriv")
        .success()
}

/// Files below `dir` named `name` (the host's view, as root).
pub fn find_named(dir: &Path, name: &str) -> Vec<PathBuf> {
    common::files_under(dir)
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == name))
        .collect()
}
