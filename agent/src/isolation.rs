//! How the agent isolates actions: the backends it offers, the one each
//! action gets (from its `workload-isolation-type` and `dockerNetwork`
//! properties), and the command that starts it — the reaper stub for
//! `none`, the sandbox stub for `linux-sandbox`. On Linux both are forked
//! by the agent's spawner ([`crate::spawn`]) rather than executed afresh.
//!
//! An agent configured for `linux-sandbox` proves it works at start-up by
//! running a probe action in it, and refuses to start otherwise: it never
//! falls back to running actions unisolated on its own.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use outpost_proto::reapi::platform::Property;
#[cfg(target_os = "linux")]
use outpost_sandbox::linux::{cgroup, launch, spawner::Mode};
use outpost_sandbox::spec::Limits;
#[cfg(target_os = "linux")]
use outpost_sandbox::spec::Spec;

use crate::config::Config;
use crate::error::Error;

/// Host paths every sandbox shows read-only: what compilers, linkers and
/// shells need, and no more of `/etc` than name lookup and TLS roots.
pub const DEFAULT_SANDBOX_MOUNTS: &[&str] = &[
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc/alternatives",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/localtime",
    // Certificates only: /etc/ssl/private holds the host's TLS keys.
    "/etc/ssl/certs",
    "/etc/ssl/openssl.cnf",
    "/etc/ca-certificates",
    "/etc/os-release",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    None,
    LinuxSandbox,
}

impl Kind {
    fn parse(s: &str) -> Option<Kind> {
        match s {
            "none" => Some(Kind::None),
            "linux-sandbox" => Some(Kind::LinuxSandbox),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::None => "none",
            Kind::LinuxSandbox => "linux-sandbox",
        }
    }
}

/// What one action gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    pub kind: Kind,
    pub network: bool,
}

pub struct Isolation {
    /// The default first.
    kinds: Vec<Kind>,
    allow_network: bool,
    /// This binary: the stubs are its `__reap` and `__sandbox` modes.
    #[cfg_attr(target_os = "linux", allow(dead_code))]
    exe: PathBuf,
    /// Forks the stubs (Linux); `None` only in unit tests.
    #[cfg(target_os = "linux")]
    spawner: Option<crate::spawn::Spawner>,
    #[cfg(target_os = "linux")]
    sandbox: Option<Sandbox>,
}

#[cfg(target_os = "linux")]
struct Sandbox {
    host_paths: Vec<PathBuf>,
    /// Changed by a configuration reload; each action takes a copy.
    limits: std::sync::RwLock<Limits>,
    /// Bytes of each action's `/tmp` tmpfs; 0 for `/tmp` on disk.
    tmp_size: std::sync::atomic::AtomicU64,
    limiter: cgroup::Limiter,
    /// What the probe found Landlock enforced.
    landlock: String,
}

/// An action ready to start, and what must live until it ends.
pub struct Prepared {
    #[cfg(target_os = "linux")]
    mode: Mode,
    /// The spec the stub reads: program, environment, layout, limits.
    #[cfg(target_os = "linux")]
    spec_file: PathBuf,
    #[cfg(not(target_os = "linux"))]
    command: std::process::Command,
    #[cfg(target_os = "linux")]
    status: Option<launch::StatusPipe>,
    #[cfg(target_os = "linux")]
    group: Option<cgroup::Group>,
}

/// A started action.
pub struct Started {
    #[cfg(target_os = "linux")]
    process: crate::spawn::Running,
    #[cfg(not(target_os = "linux"))]
    process: tokio::process::Child,
    /// The sandbox stub's report, read while the action runs.
    #[cfg(target_os = "linux")]
    report: Option<tokio::task::JoinHandle<launch::Report>>,
    #[cfg(target_os = "linux")]
    group: Option<cgroup::Group>,
}

impl Started {
    /// The stub's exit code: the action's, or 128+N when it died of signal
    /// N; see `outpost_sandbox` for the stubs' own codes.
    pub async fn wait(&mut self) -> Result<i32, Error> {
        #[cfg(target_os = "linux")]
        return self.process.wait().await;
        #[cfg(not(target_os = "linux"))]
        {
            use std::os::unix::process::ExitStatusExt;
            let status = self
                .process
                .wait()
                .await
                .map_err(|e| Error::local("waiting for the action", e))?;
            Ok(status
                .code()
                .or_else(|| status.signal().map(|s| 128 + s))
                .unwrap_or(-1))
        }
    }

    /// Stops the action and everything it started.
    pub fn stop(&self) {
        #[cfg(target_os = "linux")]
        self.process.stop();
        #[cfg(not(target_os = "linux"))]
        if let Some(pid) = self.process.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(0)),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }

    /// After `wait`: why the sandbox could not be built, if it could not;
    /// otherwise a note for the action's result (an OOM kill), if any.
    pub async fn finish(mut self) -> Result<Option<String>, Error> {
        #[cfg(target_os = "linux")]
        {
            if let Some(report) = self.report.take() {
                let report = report
                    .await
                    .map_err(|_| Error::Retryable("reading the sandbox's report failed".into()))?;
                if let Some(e) = report.error {
                    return Err(Error::Retryable(format!(
                        "the sandbox could not be set up on this agent: {e}"
                    )));
                }
            }
            let note = self.group.as_ref().filter(|g| g.oom_killed()).map(|g| {
                format!(
                    "the action was killed for running out of memory (its limit is {} MiB; \
                     set action_memory_limit on the agent to change it)",
                    g.memory_limit().unwrap_or(0) >> 20
                )
            });
            // Removing the cgroups may wait for the kernel: not on the way
            // of the result.
            if let Some(group) = self.group.take() {
                tokio::task::spawn_blocking(move || drop(group));
            }
            Ok(note)
        }
        #[cfg(not(target_os = "linux"))]
        Ok(None)
    }
}

/// Where one action's sandbox lives on the host.
pub struct Layout<'a> {
    /// The action's directory: the spec, `tmp` and `sysroot` go here.
    pub dir: &'a Path,
    pub root: &'a Path,
    pub workdir: &'a Path,
    pub writable: Vec<PathBuf>,
    pub read_only: Vec<PathBuf>,
}

impl Isolation {
    /// Sets up the configured backends; fails, saying why and what to do,
    /// when `linux-sandbox` is configured and does not work here.
    pub async fn new(
        config: &Config,
        work_dir: &Path,
        agent_id: &str,
    ) -> anyhow::Result<Isolation> {
        let exe = std::env::current_exe().context("finding this binary to run actions through")?;
        let kinds: Vec<Kind> = config
            .isolation
            .iter()
            .filter_map(|k| Kind::parse(k))
            .collect();
        let mut isolation = Isolation {
            kinds,
            allow_network: config.allow_network,
            exe,
            #[cfg(target_os = "linux")]
            spawner: None,
            #[cfg(target_os = "linux")]
            sandbox: None,
        };
        #[cfg(target_os = "linux")]
        {
            // Cgroups first: on cgroup v2 the agent moves itself into a leaf
            // and enables controllers on the cgroup it left, which the
            // kernel refuses while another process (a spawner) is in it.
            if isolation.kinds.contains(&Kind::LinuxSandbox) {
                isolation.sandbox = Some(Sandbox::start(config, agent_id).await?);
            }
            // The agent's own binary image, even if an upgrade replaced the
            // file since: a spawner started again later must speak the
            // same protocol.
            let exe = PathBuf::from("/proc/self/exe");
            isolation.spawner = Some(
                tokio::task::spawn_blocking(move || crate::spawn::Spawner::start(&exe))
                    .await
                    .context("starting the spawner process")?
                    .context("starting the spawner process")?,
            );
            if isolation.sandbox.is_some() {
                isolation.probe(work_dir).await?;
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (work_dir, agent_id);
        Ok(isolation)
    }

    /// Spawner processes started so far (Linux), for the metrics.
    pub fn spawner_starts(&self) -> Option<prometheus_client::metrics::counter::Counter> {
        #[cfg(target_os = "linux")]
        return self.spawner.as_ref().map(|s| s.starts.clone());
        #[cfg(not(target_os = "linux"))]
        None
    }

    /// Backend names, the default first: advertised as
    /// `workload-isolation-type` values.
    pub fn kinds(&self) -> Vec<String> {
        self.kinds.iter().map(|k| k.name().to_owned()).collect()
    }

    /// `dockerNetwork` values this agent serves.
    pub fn network_values(&self) -> Vec<&'static str> {
        if self.allow_network || self.kinds.contains(&Kind::None) {
            vec!["off", "bridge"]
        } else {
            vec!["off"]
        }
    }

    /// One line for logs and the fleet page.
    pub fn describe(&self) -> String {
        #[cfg(target_os = "linux")]
        if let Some(s) = &self.sandbox {
            return format!(
                "linux-sandbox: namespaces, Landlock {}, limits by {}{}",
                s.landlock,
                s.limiter.describe(),
                if self.allow_network {
                    ", network on request"
                } else {
                    ", no network"
                }
            );
        }
        "none: actions run as the agent's user, unisolated".to_owned()
    }

    /// Takes the action limits of a reloaded configuration; actions that
    /// start from now on get them.
    pub fn set_limits(&self, config: &Config) {
        #[cfg(target_os = "linux")]
        if let Some(s) = &self.sandbox {
            *s.limits.write().unwrap_or_else(|e| e.into_inner()) = limits_of(config);
            s.tmp_size.store(
                config.action_tmp_size.0,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        #[cfg(not(target_os = "linux"))]
        let _ = config;
    }

    /// The backend and network an action's platform asks for.
    pub fn choose(&self, platform: &[Property]) -> Result<Choice, Error> {
        // Read as the coordinator reads it.
        let parsed = outpost_proto::platform::parse(platform).map_err(Error::BadInput)?;
        let get = |name: &str| parsed.get(name);
        let kind = match get("workload-isolation-type") {
            None => self.kinds[0],
            Some(v) => Kind::parse(v)
                .filter(|k| self.kinds.contains(k))
                .ok_or_else(|| {
                    Error::BadInput(format!(
                        "workload-isolation-type={v} is not offered by this agent (it offers {})",
                        self.kinds().join(", ")
                    ))
                })?,
        };
        let network = match get("dockerNetwork") {
            None | Some("off") => false,
            Some("bridge" | "host") => true,
            Some(other) => {
                return Err(Error::BadInput(format!(
                    "dockerNetwork={other} is not one of off, bridge"
                )));
            }
        };
        if network && kind == Kind::LinuxSandbox && !self.allow_network {
            return Err(Error::BadInput(
                "dockerNetwork=bridge: this agent does not allow sandboxed actions the network"
                    .into(),
            ));
        }
        Ok(Choice { kind, network })
    }

    /// Everything one action needs to start: its spec written, its
    /// cgroups made. `env` is the whole environment, as `NAME=VALUE`.
    pub fn prepare(
        &self,
        choice: Choice,
        argv: &[String],
        env: Vec<String>,
        layout: &Layout<'_>,
    ) -> Result<Prepared, Error> {
        #[cfg(target_os = "linux")]
        {
            // What every stub needs; the sandbox adds its layout and limits.
            let mut spec = Spec {
                argv: argv.iter().map(Into::into).collect(),
                env: env.into_iter().map(Into::into).collect(),
                root: layout.root.to_owned(),
                workdir: layout.workdir.to_owned(),
                ..Spec::default()
            };
            let (mode, status, group) = match choice.kind {
                Kind::None => (Mode::Reap, None, None),
                Kind::LinuxSandbox => {
                    let sandbox = self.sandbox.as_ref().ok_or_else(|| {
                        Error::Retryable("linux-sandbox is not set up on this agent".into())
                    })?;
                    let group = sandbox.complete(&mut spec, choice.network, layout)?;
                    let status = launch::StatusPipe::new()
                        .map_err(|e| Error::local("making the status pipe", e))?;
                    let mode = if choice.network {
                        Mode::SandboxNetwork
                    } else {
                        Mode::Sandbox
                    };
                    (mode, Some(status), Some(group))
                }
            };
            let spec_file = layout.dir.join("run.spec");
            let encoded = spec.encode().map_err(Error::BadInput)?;
            std::fs::write(&spec_file, encoded)
                .map_err(|e| Error::local("writing the action's spec", e))?;
            Ok(Prepared {
                mode,
                spec_file,
                status,
                group,
            })
        }
        #[cfg(not(target_os = "linux"))]
        match choice.kind {
            Kind::None => {
                let mut command = std::process::Command::new(&self.exe);
                command
                    .arg("__reap")
                    .arg("--")
                    .args(argv)
                    .current_dir(layout.root.join(layout.workdir))
                    .env_clear()
                    .envs(env.iter().map(|e| e.split_once('=').unwrap_or((e, ""))));
                Ok(Prepared { command })
            }
            Kind::LinuxSandbox => Err(Error::BadInput("linux-sandbox needs Linux".into())),
        }
    }

    /// Starts a prepared action with its output going to `stdout` and
    /// `stderr` (stdin is empty).
    pub fn start(
        &self,
        prepared: Prepared,
        stdout: std::fs::File,
        stderr: std::fs::File,
    ) -> Result<Started, Error> {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsFd;
            let Prepared {
                mode,
                spec_file,
                status,
                group,
            } = prepared;
            let spawner = self
                .spawner
                .as_ref()
                .ok_or_else(|| Error::Retryable("this agent has no spawner".into()))?;
            let stdin = std::fs::File::open("/dev/null")
                .map_err(|e| Error::local("opening /dev/null", e))?;
            let mut fds = vec![stdin.as_fd(), stdout.as_fd(), stderr.as_fd()];
            if let Some(s) = &status {
                fds.push(s.writer());
            }
            let process = spawner.run(mode, &spec_file, &fds)?;
            drop(fds);
            // The stub's report arrives once the action is running (or
            // could not start); read it while it runs.
            let report = status.map(|s| tokio::task::spawn_blocking(move || s.read()));
            Ok(Started {
                process,
                report,
                group,
            })
        }
        #[cfg(not(target_os = "linux"))]
        {
            let mut command = prepared.command;
            command
                .stdin(std::process::Stdio::null())
                .stdout(stdout)
                .stderr(stderr);
            let process = tokio::process::Command::from(command)
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| Error::local("starting the action", e))?;
            Ok(Started { process })
        }
    }

    /// Runs `true` in the sandbox; fails unless it works, and records what
    /// Landlock enforced.
    #[cfg(target_os = "linux")]
    async fn probe(&mut self, work_dir: &Path) -> anyhow::Result<()> {
        let landlock = self.probe_sandbox(work_dir).await.map_err(|e| {
            anyhow::anyhow!(
                "isolation linux-sandbox does not work on this host: {e}. \
                 See docs/isolation.md for what it needs; to run actions without \
                 isolation instead, say so explicitly with --isolation none"
            )
        })?;
        let sandbox = self
            .sandbox
            .as_mut()
            .expect("probed after the sandbox was set up");
        tracing::info!(
            landlock = %landlock,
            limits = %sandbox.limiter.describe(),
            "linux-sandbox ready"
        );
        if let Some(advice) = sandbox.limiter.advice() {
            tracing::info!("{advice}");
        }
        if sandbox.limiter.rlimits_only() {
            tracing::warn!(
                "memory is not enforced: no cgroup with the memory controller is writable by \
                 this agent, so action_memory_limit becomes a per-process address-space limit \
                 (RLIMIT_AS), which several processes together, or files in /dev/shm and /tmp, \
                 exceed; run the agent with a delegated cgroup (systemd Delegate=yes, see \
                 docs/isolation.md) to bound an action's memory"
            );
        }
        sandbox.landlock = landlock;
        Ok(())
    }

    #[cfg(target_os = "linux")]
    async fn probe_sandbox(&self, work_dir: &Path) -> Result<String, String> {
        let dir = work_dir.join(format!("sandbox-probe-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let root = dir.join("root");
        std::fs::create_dir_all(&root).map_err(|e| format!("creating {}: {e}", root.display()))?;
        let layout = Layout {
            dir: &dir,
            root: &root,
            workdir: Path::new(""),
            writable: vec![PathBuf::new()],
            read_only: Vec::new(),
        };
        let choice = Choice {
            kind: Kind::LinuxSandbox,
            network: false,
        };
        let result = async {
            let stderr_path = dir.join("stderr");
            let stderr = std::fs::File::create(&stderr_path).map_err(|e| e.to_string())?;
            let stdout = std::fs::File::create(dir.join("stdout")).map_err(|e| e.to_string())?;
            let prepared = self
                .prepare(
                    choice,
                    &["true".to_owned()],
                    vec!["PATH=/usr/bin:/bin".to_owned()],
                    &layout,
                )
                .map_err(|e| e.to_string())?;
            let mut started = self
                .start(prepared, stdout, stderr)
                .map_err(|e| e.to_string())?;
            let code = started.wait().await.map_err(|e| e.to_string())?;
            let report = started.report.take().ok_or("no status pipe")?;
            let report = report.await.map_err(|e| e.to_string())?;
            if let Some(e) = report.error {
                return Err(e);
            }
            if code != 0 {
                let said = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                return Err(format!(
                    "the probe action `true` exited with {code}: {}",
                    said.trim()
                ));
            }
            Ok(report.landlock.unwrap_or_else(|| "unknown".to_owned()))
        }
        .await;
        let _ = std::fs::remove_dir_all(&dir);
        result
    }
}

/// One action's limits under `config`; memory defaults to the host's.
#[cfg(target_os = "linux")]
fn limits_of(config: &Config) -> Limits {
    let memory = config
        .action_memory_limit
        .map(|b| b.0)
        .unwrap_or_else(crate::host::memory_bytes);
    Limits {
        memory_bytes: (memory > 0).then_some(memory),
        pids: (config.action_pids_limit > 0).then_some(config.action_pids_limit),
        cpu_millis: config.action_cpu_limit.map(|c| (c * 1000.0).round() as u64),
    }
}

#[cfg(target_os = "linux")]
impl Sandbox {
    async fn start(config: &Config, agent_id: &str) -> anyhow::Result<Sandbox> {
        let mut host_paths: Vec<PathBuf> =
            DEFAULT_SANDBOX_MOUNTS.iter().map(PathBuf::from).collect();
        host_paths.extend(config.sandbox_mounts.iter().cloned());
        let limits = std::sync::RwLock::new(limits_of(config));
        let name: String = agent_id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let limiter = tokio::task::spawn_blocking(move || {
            cgroup::Limiter::detect(&format!("outpost-{name}"))
        })
        .await
        .context("detecting cgroups")?;
        Ok(Sandbox {
            host_paths,
            limits,
            tmp_size: std::sync::atomic::AtomicU64::new(config.action_tmp_size.0),
            limiter,
            landlock: String::new(),
        })
    }

    fn limits(&self) -> Limits {
        self.limits
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Fills in the sandbox's part of one action's spec; returns the
    /// cgroups it joins.
    fn complete(
        &self,
        spec: &mut Spec,
        network: bool,
        layout: &Layout<'_>,
    ) -> Result<cgroup::Group, Error> {
        let local = |what: &str, e: std::io::Error| Error::local(what.to_owned(), e);
        let tmp = layout.dir.join("tmp");
        let scratch = layout.dir.join("sysroot");
        std::fs::create_dir_all(&tmp).map_err(|e| local("creating the sandbox /tmp", e))?;
        std::fs::create_dir_all(&scratch).map_err(|e| local("creating the sandbox root", e))?;
        let group = self
            .limiter
            .create(&self.limits())
            .map_err(|e| Error::Retryable(format!("creating the action's cgroup: {e}")))?;
        spec.writable = layout.writable.clone();
        spec.read_only = layout.read_only.clone();
        spec.host_paths = self.host_paths.clone();
        spec.tmp = tmp;
        let tmp_size = self.tmp_size.load(std::sync::atomic::Ordering::Relaxed);
        spec.tmp_size = (tmp_size > 0).then_some(tmp_size);
        spec.scratch = scratch;
        spec.network = network;
        spec.cgroup_procs = group.procs_files();
        spec.rlimits = group.rlimits.clone();
        Ok(group)
    }
}

#[cfg(target_os = "linux")]
impl Drop for Started {
    fn drop(&mut self) {
        // Normally `finish` took the cgroups. An action given up before its
        // end may have a stub still about to join them: never pool those.
        let Some(group) = self.group.take() else {
            return;
        };
        let ended = self.process.is_done();
        let work = move || {
            if ended {
                drop(group);
            } else {
                group.discard();
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn_blocking(work);
            }
            Err(_) => work(),
        }
    }
}

/// What to bind read-only over the input root: for each input file, its
/// highest ancestor directory that holds no writable path (one mount for a
/// whole input subtree), or the file itself when every ancestor does.
pub fn read_only_paths<'a>(
    files: impl Iterator<Item = &'a Path>,
    writable: &[PathBuf],
) -> Vec<PathBuf> {
    let holds_writable = |dir: &Path| writable.iter().any(|w| w.starts_with(dir));
    let mut out = BTreeSet::new();
    for f in files {
        let mut prefix = PathBuf::new();
        let mut chosen = None;
        for c in f.parent().map(Path::components).into_iter().flatten() {
            prefix.push(c);
            if !holds_writable(&prefix) {
                chosen = Some(prefix.clone());
                break;
            }
        }
        out.insert(chosen.unwrap_or_else(|| f.to_path_buf()));
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn isolation(kinds: &[Kind], allow_network: bool) -> Isolation {
        Isolation {
            kinds: kinds.to_vec(),
            allow_network,
            exe: PathBuf::from("/bin/false"),
            #[cfg(target_os = "linux")]
            spawner: None,
            #[cfg(target_os = "linux")]
            sandbox: None,
        }
    }

    fn props(list: &[(&str, &str)]) -> Vec<Property> {
        list.iter()
            .map(|(n, v)| Property {
                name: (*n).to_owned(),
                value: (*v).to_owned(),
            })
            .collect()
    }

    #[test]
    fn actions_get_the_default_or_what_they_ask_for() {
        let iso = isolation(&[Kind::LinuxSandbox, Kind::None], false);
        let pick = |p: &[(&str, &str)]| iso.choose(&props(p));
        assert_eq!(pick(&[]).expect("default").kind, Kind::LinuxSandbox);
        assert_eq!(
            pick(&[("workload-isolation-type", "none")])
                .expect("none")
                .kind,
            Kind::None
        );
        assert!(pick(&[("workload-isolation-type", "docker")]).is_err());
        let err = pick(&[("dockerNetwork", "bridge")]).expect_err("no network");
        assert!(err.to_string().contains("does not allow"), "{err}");
        assert!(pick(&[("dockerNetwork", "sideways")]).is_err());
        let open = isolation(&[Kind::LinuxSandbox], true);
        let c = open
            .choose(&props(&[("dockerNetwork", "bridge")]))
            .expect("allowed");
        assert!(c.network);
        assert_eq!(open.network_values(), vec!["off", "bridge"]);
        assert_eq!(
            iso.network_values(),
            vec!["off", "bridge"],
            "none has the network"
        );
        assert_eq!(
            isolation(&[Kind::LinuxSandbox], false).network_values(),
            vec!["off"]
        );
    }

    #[test]
    fn inputs_are_covered_by_few_read_only_mounts() {
        let files: Vec<PathBuf> = [
            "BUILD",
            "src/a.c",
            "src/deep/b.h",
            "bazel-out/k8/bin/pkg/in.o",
            "bazel-out/k8/bin/lib/x.a",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        let writable = vec![PathBuf::new(), PathBuf::from("bazel-out/k8/bin/pkg")];
        let ro = read_only_paths(files.iter().map(PathBuf::as_path), &writable);
        let want: Vec<PathBuf> = [
            "BUILD",
            "bazel-out/k8/bin/lib",
            "bazel-out/k8/bin/pkg/in.o",
            "src",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(ro, want);
    }
}
