//! `sandbox-exec`: macOS's sandbox, as Bazel's darwin-sandbox and other Mac
//! executors use it. Each action runs under a profile rendered for it
//! ([`profile`]): it writes only its workspace (its private `TMPDIR`
//! included), the user's Darwin temp and cache directories Apple's tools
//! insist on, and devices; it reads nothing of the agent's own (work
//! directory with the other workspaces and the input cache, token, TLS
//! key, registry credentials); its network is loopback only unless it asks
//! for more and the agent allows it (`allow_network`).
//!
//! Everything it starts is killed when it ends, times out or is cancelled
//! ([`tree`]: macOS has no subreaper, so its processes are followed through
//! the process table). While it runs, `caffeinate -i -w PID` keeps the Mac
//! from sleeping. At start-up a probe action runs under a generated
//! profile and the backend is refused, saying why, if it fails.
//!
//! All of this is portable code over `sandbox-exec`, `ps`, `caffeinate` and
//! signals; it type-checks on Linux (the `portable-check` feature) and its
//! profile and process-tree logic are tested there.

pub mod profile;
pub mod tree;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
#[cfg(test)]
use std::time::Duration;

use anyhow::Context as _;

use super::{Backend, Kind, Process, Run};
use crate::config::Config;
use crate::error::Error;
use profile::{Network, Spec};

/// The tool, where macOS has it.
pub const SANDBOX_EXEC: &str = "/usr/bin/sandbox-exec";
/// Holds a power assertion while a process lives.
pub const CAFFEINATE: &str = "/usr/bin/caffeinate";

pub struct SandboxExec {
    program: PathBuf,
    /// The agent's own files: never readable by an action.
    hidden: Vec<PathBuf>,
    /// Writable besides the workspace: the Darwin user temp and cache dirs.
    writable: Vec<PathBuf>,
    allow_network: bool,
    follower: Follower,
}

impl SandboxExec {
    /// Sets the backend up for this agent and proves it works with a probe
    /// action; fails saying why otherwise.
    pub async fn set_up(config: &Config, work_dir: &Path) -> anyhow::Result<SandboxExec> {
        let work_dir = std::fs::canonicalize(work_dir)
            .with_context(|| format!("resolving the work directory {}", work_dir.display()))?;
        let mut hidden = vec![work_dir.clone()];
        hidden.extend(
            [
                &config.token_file,
                &config.tls_key,
                &config.docker_registry_auth,
            ]
            .into_iter()
            .flatten()
            .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone())),
        );
        let writable = ["DARWIN_USER_TEMP_DIR", "DARWIN_USER_CACHE_DIR"]
            .iter()
            .filter_map(|name| crate::host::output("getconf", &[name]))
            // `getconf` ends them with a slash; as components, none.
            .map(|dir| Path::new(dir.trim()).components().collect::<PathBuf>())
            .filter(|dir| dir.is_absolute())
            .collect();
        let backend = SandboxExec {
            program: PathBuf::from(SANDBOX_EXEC),
            hidden,
            writable,
            allow_network: config.allow_network,
            follower: Follower::start(),
        };
        backend.probe(&work_dir).await?;
        Ok(backend)
    }

    /// The profile for one action.
    fn spec(&self, workspace: &Path, network: Network) -> Spec {
        Spec {
            workspace: workspace.to_owned(),
            writable: self.writable.clone(),
            hidden: self.hidden.clone(),
            network,
        }
    }

    /// Runs a probe under a generated profile: it must write its workspace
    /// and must not write the agent's work directory.
    async fn probe(&self, work_dir: &Path) -> anyhow::Result<()> {
        let dir = work_dir.join("sandbox-exec-probe");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).context("creating the sandbox-exec probe's directory")?;
        let profile = profile::render(&self.spec(&dir, Network::None))?;
        let profile_path = dir.join("probe.sb");
        std::fs::write(&profile_path, profile).context("writing the probe's profile")?;
        let out = tokio::process::Command::new(&self.program)
            .arg("-f")
            .arg(&profile_path)
            .args([
                "/bin/sh",
                "-c",
                "echo ok > \"$1/written\" && ! (echo x > \"$2/forbidden\") 2>/dev/null",
                "sh",
            ])
            .arg(&dir)
            .arg(work_dir)
            .stdin(std::process::Stdio::null())
            .output()
            .await;
        let written = dir.join("written").exists();
        let forbidden = work_dir.join("forbidden");
        let escaped = forbidden.exists();
        let _ = std::fs::remove_file(&forbidden);
        let _ = std::fs::remove_dir_all(&dir);
        let out = out.with_context(|| {
            format!(
                "isolation sandbox-exec: cannot run {} (use isolation none on this host)",
                self.program.display()
            )
        })?;
        if !out.status.success() || !written || escaped {
            anyhow::bail!(
                "isolation sandbox-exec: the probe action did not run as it must ({}; wrote its \
                 workspace: {written}; wrote the agent's work directory: {escaped}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Backend for SandboxExec {
    fn kind(&self) -> Kind {
        Kind::SandboxExec
    }

    fn describe(&self) -> String {
        format!(
            "sandbox-exec: actions write only their workspace, cannot read the agent's files, \
             network {}",
            if self.allow_network {
                "loopback, or all when asked"
            } else {
                "loopback only"
            }
        )
    }

    fn allows_network(&self) -> bool {
        self.allow_network
    }

    async fn start(&self, run: Run<'_>) -> Result<Box<dyn Process>, Error> {
        let tmp = run.dir.join("tmp");
        std::fs::create_dir_all(&tmp)
            .map_err(|e| Error::local("creating the action's TMPDIR", e))?;
        // Off (dockerNetwork unset or off): loopback, as Bazel's own
        // darwin sandbox leaves it; asked and allowed: all.
        let network = if run.options.network {
            Network::All
        } else {
            Network::Localhost
        };
        let spec = self.spec(run.dir, network);
        let rendered = profile::render(&spec).map_err(|e| Error::Retryable(e.to_string()))?;
        let profile_path = run.dir.join("sandbox.sb");
        std::fs::write(&profile_path, rendered)
            .map_err(|e| Error::local("writing the action's sandbox profile", e))?;
        let mut command = std::process::Command::new(&self.program);
        command
            .arg("-f")
            .arg(&profile_path)
            .arg("--")
            .args(run.argv)
            .current_dir(run.root.join(run.workdir))
            .env_clear()
            .envs(run.env.iter().map(|e| e.split_once('=').unwrap_or((e, ""))))
            .env("TMPDIR", &tmp)
            .stdin(std::process::Stdio::null())
            .stdout(run.stdout)
            .stderr(run.stderr);
        Ok(Box::new(Sandboxed::start(command, &self.follower)?))
    }
}

type Followed = Arc<Mutex<tree::Family>>;

/// Follows every running action's family with one `ps` per poll, however
/// many run (none while none does); its task ends with the backend.
#[derive(Clone)]
struct Follower {
    families: Arc<Mutex<Vec<std::sync::Weak<Mutex<tree::Family>>>>>,
}

impl Follower {
    fn start() -> Follower {
        let follower = Follower {
            families: Arc::default(),
        };
        let families = Arc::downgrade(&follower.families);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(tree::POLL).await;
                let Some(families) = families.upgrade() else {
                    return;
                };
                let live: Vec<Followed> = match families.lock() {
                    Ok(mut list) => {
                        list.retain(|f| f.strong_count() > 0);
                        list.iter().filter_map(std::sync::Weak::upgrade).collect()
                    }
                    Err(_) => return,
                };
                drop(families);
                if live.is_empty() {
                    continue;
                }
                let Ok(Ok(rows)) = tokio::task::spawn_blocking(tree::table).await else {
                    continue;
                };
                for family in live {
                    if let Ok(mut f) = family.lock() {
                        f.refresh(&rows);
                    }
                }
            }
        });
        follower
    }

    /// Follows `family` for as long as it is held elsewhere.
    fn follow(&self, family: &Followed) {
        if let Ok(mut list) = self.families.lock() {
            list.push(Arc::downgrade(family));
        }
    }
}

/// A started action: its first process, the family followed while it
/// runs, and the power assertion.
struct Sandboxed {
    child: tokio::process::Child,
    family: Followed,
    _awake: Option<tokio::process::Child>,
}

impl Sandboxed {
    fn start(mut command: std::process::Command, follower: &Follower) -> Result<Sandboxed, Error> {
        use std::os::unix::process::CommandExt;
        command.process_group(0);
        let child = tokio::process::Command::from(command)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::local("starting sandbox-exec", e))?;
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| Error::Retryable("sandbox-exec exited at once".into()))?;
        let family = Arc::new(Mutex::new(tree::Family::new(pid)));
        follower.follow(&family);
        Ok(Sandboxed {
            child,
            family,
            _awake: stay_awake(pid),
        })
    }

    /// Kills every process of the action, off the async threads.
    fn kill_all(&self) -> std::thread::JoinHandle<()> {
        let family = Arc::clone(&self.family);
        std::thread::spawn(move || {
            let Ok(mut f) = family.lock() else {
                return;
            };
            if let Err(why) = f.kill_all(tree::table, 50) {
                tracing::warn!(%why, "an action's processes could not all be killed");
            }
        })
    }
}

/// `caffeinate -i -w PID`: the Mac does not idle-sleep while `pid` lives
/// (it ends by itself when `pid` does). None where the tool is missing.
fn stay_awake(pid: i32) -> Option<tokio::process::Child> {
    if !Path::new(CAFFEINATE).exists() {
        return None;
    }
    tokio::process::Command::new(CAFFEINATE)
        .args(["-i", "-w", &pid.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| tracing::debug!(error = %e, "no power assertion for an action"))
        .ok()
}

#[tonic::async_trait]
impl Process for Sandboxed {
    async fn wait(&mut self) -> Result<i32, Error> {
        use std::os::unix::process::ExitStatusExt;
        let status = self
            .child
            .wait()
            .await
            .map_err(|e| Error::local("waiting for the action", e))?;
        // What it left behind goes with it.
        let killer = self.kill_all();
        let _ = tokio::task::spawn_blocking(move || killer.join()).await;
        Ok(status
            .code()
            .or_else(|| status.signal().map(|s| 128 + s))
            .unwrap_or(-1))
    }

    fn stop(&self) {
        let _ = self.kill_all();
    }

    async fn finish(self: Box<Self>) -> Result<Option<String>, Error> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `sandbox-exec` that enforces nothing: it checks its arguments as
    /// the agent passes them and runs the command.
    fn lax_sandbox_exec(dir: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("sandbox-exec");
        std::fs::write(
            &path,
            "#!/bin/sh\n[ \"$1\" = -f ] && [ -f \"$2\" ] || exit 64\nshift 2\n\
             [ \"$1\" = -- ] && shift\nexec \"$@\"\n",
        )
        .expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    }

    fn backend(program: PathBuf, work_dir: &Path) -> SandboxExec {
        SandboxExec {
            program,
            hidden: vec![work_dir.to_owned()],
            writable: Vec::new(),
            allow_network: false,
            follower: Follower::start(),
        }
    }

    #[tokio::test]
    async fn a_sandbox_that_does_not_hold_is_refused_at_start_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let work = dir.path().join("work");
        std::fs::create_dir_all(&work).expect("mkdir");
        let lax = backend(lax_sandbox_exec(dir.path()), &work);
        let err = lax.probe(&work).await.expect_err("it wrote the work dir");
        assert!(
            err.to_string()
                .contains("wrote the agent's work directory: true"),
            "{err:#}"
        );
        assert!(!work.join("forbidden").exists());
        let missing = backend(dir.path().join("no-such-tool"), &work);
        let err = missing.probe(&work).await.expect_err("no tool");
        assert!(err.to_string().contains("cannot run"), "{err:#}");
    }

    /// What `start` runs, with the lax tool and a profile beside it.
    fn command(program: &Path, script: &str) -> std::process::Command {
        let profile = program.with_file_name("action.sb");
        std::fs::write(&profile, "(version 1)\n").expect("profile");
        let mut c = std::process::Command::new(program);
        c.arg("-f")
            .arg(&profile)
            .args(["--", "/bin/sh", "-c", script]);
        c
    }

    #[tokio::test]
    async fn what_an_action_leaves_behind_dies_with_it_and_stop_kills_it_all() {
        let dir = tempfile::tempdir().expect("tempdir");
        let program = lax_sandbox_exec(dir.path());
        let follower = Follower::start();
        let pidfile = dir.path().join("daemon");
        // A daemon out of the action's group (setsid), then the action ends.
        let script = format!(
            "setsid sleep 300 & echo $! > {}; sleep 1.5; exit 3",
            pidfile.display()
        );
        let mut action = Sandboxed::start(command(&program, &script), &follower).expect("start");
        assert_eq!(action.wait().await.expect("wait"), 3);
        let daemon: i32 = std::fs::read_to_string(&pidfile)
            .expect("pid")
            .trim()
            .parse()
            .expect("a pid");
        let rows = tree::table().expect("ps");
        assert!(
            !rows.iter().any(|r| r.pid == daemon && !r.zombie),
            "the daemon outlived its action"
        );
        // Stopped while running: everything goes, the exit code says how.
        let mut action =
            Sandboxed::start(command(&program, "sleep 300 & sleep 300"), &follower).expect("start");
        tokio::time::sleep(Duration::from_millis(600)).await;
        action.stop();
        let code = tokio::time::timeout(Duration::from_secs(10), action.wait())
            .await
            .expect("ended")
            .expect("wait");
        assert_eq!(code, 128 + 9);
    }
}
