//! `linux-sandbox`: user, mount, pid, ipc, uts and network namespaces, the
//! host's toolchain read-only, inputs read-only over the input root,
//! Landlock, seccomp and cgroup (or rlimit) limits; see `outpost_sandbox`
//! and `docs/isolation.md`. Set up once per agent (cgroups detected, a
//! probe action run) and refused with the reason when it does not work.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use outpost_sandbox::linux::{alias::Alias, cgroup, launch, spawner::Mode};
use outpost_sandbox::spec::{Limits, Spec};

use super::sandbox_users::{Lease, Users, mapped};
use super::spawned::{Spawned, common_spec};
use super::spawner::Spawner;
use super::{Backend, Kind, Process, Run};
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

pub struct LinuxSandbox {
    host_paths: Vec<PathBuf>,
    /// Changed by a configuration reload; each action takes a copy.
    limits: std::sync::RwLock<Limits>,
    /// Bytes of each action's `/tmp` tmpfs; 0 for `/tmp` on disk.
    tmp_size: std::sync::atomic::AtomicU64,
    limiter: cgroup::Limiter,
    /// What the probe found Landlock enforced.
    landlock: String,
    allow_network: bool,
    /// The default bound of an action's memory.
    host_memory: u64,
    /// Forks the stubs; set before the probe.
    spawner: Option<Arc<Spawner>>,
    /// On an agent running as root, the host users actions run as.
    users: Option<Arc<Users>>,
    /// The work directory's bind where those users can reach it, when
    /// they cannot reach it where it is; actions' paths are named by it.
    alias: Option<Alias>,
    /// This agent's id, as a file name.
    name: String,
}

/// One action's limits under `config`; memory defaults to the host's.
fn limits_of(config: &Config, host_memory: u64) -> Limits {
    let memory = config
        .action_memory_limit
        .map(|b| b.0)
        .unwrap_or(host_memory);
    Limits {
        memory_bytes: (memory > 0).then_some(memory),
        pids: (config.action_pids_limit > 0).then_some(config.action_pids_limit),
        cpu_millis: config.action_cpu_limit.map(|c| (c * 1000.0).round() as u64),
    }
}

impl LinuxSandbox {
    /// Detects the cgroups actions can be limited by. Done before the
    /// spawner starts: on cgroup v2 the agent moves itself into a leaf.
    pub async fn set_up(
        config: &Config,
        agent_id: &str,
        host_memory: u64,
    ) -> anyhow::Result<LinuxSandbox> {
        let mut host_paths: Vec<PathBuf> =
            DEFAULT_SANDBOX_MOUNTS.iter().map(PathBuf::from).collect();
        host_paths.extend(config.sandbox_mounts.iter().cloned());
        let limits = std::sync::RwLock::new(limits_of(config, host_memory));
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
        let cgroup_name = format!("outpost-{name}");
        let limiter = tokio::task::spawn_blocking(move || cgroup::Limiter::detect(&cgroup_name))
            .await
            .context("detecting cgroups")?;
        let users = Self::users(config)?;
        Ok(LinuxSandbox {
            host_paths,
            limits,
            tmp_size: std::sync::atomic::AtomicU64::new(config.action_tmp_size.0),
            limiter,
            landlock: String::new(),
            allow_network: config.allow_network,
            host_memory,
            spawner: None,
            users,
            alias: None,
            name,
        })
    }

    /// On an agent running as root, the host users its actions run as.
    /// Root only inside a user namespace without those ids (a rootless
    /// container), it runs them as itself, which is no host root.
    fn users(config: &Config) -> anyhow::Result<Option<Arc<Users>>> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(None);
        }
        let users = Users::new(config.sandbox_uid_base, config.sandbox_uid_count)?;
        let slots = if config.slots == 0 {
            crate::host::cpus()
        } else {
            config.slots
        };
        anyhow::ensure!(
            config.sandbox_uid_count > slots,
            "sandbox_uid_count {} is too small for {slots} slots: each running action and the \
             start-up probe needs a host user of its own",
            config.sandbox_uid_count
        );
        let (first, last) = (
            config.sandbox_uid_base,
            config.sandbox_uid_base + config.sandbox_uid_count,
        );
        let in_namespace = ["/proc/self/uid_map", "/proc/self/gid_map"]
            .iter()
            .all(|m| std::fs::read_to_string(m).is_ok_and(|map| mapped(&map, first, last)));
        if !in_namespace {
            tracing::warn!(
                "this agent is root in a user namespace without ids {first}-{last} \
                 (sandbox_uid_base, sandbox_uid_count): its sandboxed actions run as its own \
                 user, which is not the host's root"
            );
            return Ok(None);
        }
        Ok(Some(users))
    }

    /// The spawner that forks this backend's stubs.
    pub fn attach(&mut self, spawner: Arc<Spawner>) {
        self.spawner = Some(spawner);
    }

    fn limits(&self) -> Limits {
        self.limits
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Starts `run` in a sandbox; also what the probe runs.
    fn spawn(&self, run: Run<'_>) -> Result<Spawned, Error> {
        let spawner = self
            .spawner
            .as_ref()
            .ok_or_else(|| Error::Retryable("this agent has no spawner".into()))?;
        // The paths the stub (as its user) binds, by the alias if any.
        let (dir, root) = match &self.alias {
            Some(alias) => (alias.map(run.dir), alias.map(run.root)),
            None => (run.dir.to_owned(), run.root.to_owned()),
        };
        let run = Run {
            dir: &dir,
            root: &root,
            ..run
        };
        let mut spec = common_spec(&run);
        let lease = self.users.as_ref().map(Users::take).transpose()?;
        spec.user = lease.as_ref().map(|l| l.user);
        let group = self.complete(&mut spec, &run, lease.as_ref())?;
        let status =
            launch::StatusPipe::new().map_err(|e| Error::local("making the status pipe", e))?;
        let mode = if run.options.network {
            Mode::SandboxNetwork
        } else {
            Mode::Sandbox
        };
        Ok(Spawned::start(spawner, mode, &spec, run, Some(status), Some(group))?.holding(lease))
    }

    /// Fills in the sandbox's part of one action's spec; returns the
    /// cgroups it joins.
    fn complete(
        &self,
        spec: &mut Spec,
        run: &Run<'_>,
        lease: Option<&Lease>,
    ) -> Result<cgroup::Group, Error> {
        let local = |what: &str, e: std::io::Error| Error::local(what.to_owned(), e);
        let tmp = run.dir.join("tmp");
        let scratch = run.dir.join("sysroot");
        std::fs::create_dir_all(&tmp).map_err(|e| local("creating the sandbox /tmp", e))?;
        std::fs::create_dir_all(&scratch).map_err(|e| local("creating the sandbox root", e))?;
        if let Some(lease) = lease {
            let mut owned = vec![tmp.clone(), scratch.clone()];
            owned.extend(run.writable.iter().map(|w| run.root.join(w)));
            lease
                .grant(run.dir, &owned)
                .map_err(|e| local("giving the action's directories to its sandbox user", e))?;
        }
        let group = self
            .limiter
            .create(&self.limits())
            .map_err(|e| Error::Retryable(format!("creating the action's cgroup: {e}")))?;
        spec.read_only = read_only_paths(run.inputs.iter().map(PathBuf::as_path), &run.writable);
        spec.writable = run.writable.clone();
        spec.input_root_is_root = run.options.input_root_is_root;
        if spec.input_root_is_root {
            // The mount points of the sandbox's own /proc, /dev and /tmp,
            // made without following a link the input tree put there.
            for dir in outpost_sandbox::spec::INPUT_ROOT_MOUNTS {
                super::make_dirs(run.root, Path::new(dir), "a mount point of the sandbox")?;
            }
        } else {
            spec.host_paths = self.host_paths.clone();
            // The GPU driver's files the toolchain paths do not show already
            // (binding one inside another would write through to the host).
            spec.host_paths.extend(
                run.options
                    .gpus
                    .read_only
                    .iter()
                    .filter(|f| !self.host_paths.iter().any(|h| f.starts_with(h)))
                    .cloned(),
            );
        }
        spec.devices = run.options.gpus.devices.clone();
        spec.tmp = tmp;
        let tmp_size = self.tmp_size.load(std::sync::atomic::Ordering::Relaxed);
        spec.tmp_size = (tmp_size > 0).then_some(tmp_size);
        spec.scratch = scratch;
        spec.network = run.options.network;
        spec.cgroup_procs = group.procs_files();
        spec.rlimits = group.rlimits.clone();
        Ok(group)
    }

    /// Runs `true` in the sandbox; fails unless it works, and records what
    /// Landlock enforced.
    pub async fn probe(&mut self, work_dir: &Path) -> anyhow::Result<()> {
        if let Some(users) = &self.users {
            // The sandbox users must reach their actions' directories.
            for dir in [work_dir.to_owned(), work_dir.join("actions")] {
                users
                    .open_to_group(&dir)
                    .with_context(|| format!("opening {} to the sandbox group", dir.display()))?;
            }
            self.alias = Alias::reach(work_dir, users.gid(), &self.name)
                .map_err(|e| anyhow::anyhow!("isolation linux-sandbox cannot start: {e}"))?;
            if let Some(alias) = &self.alias {
                tracing::info!(
                    work_dir = %work_dir.display(),
                    at = %alias.path().display(),
                    "the sandbox users cannot pass through a directory above the work \
                     directory: actions' directories are named by its bind"
                );
            }
        }
        let landlock = self.probe_sandbox(work_dir).await.map_err(|e| {
            anyhow::anyhow!(
                "isolation linux-sandbox does not work on this host: {e}. \
                 See docs/isolation.md for what it needs; to run actions without \
                 isolation instead, say so explicitly with --isolation none"
            )
        })?;
        let sandbox = self;
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

    async fn probe_sandbox(&self, work_dir: &Path) -> Result<String, String> {
        let dir = work_dir.join(format!("sandbox-probe-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let root = dir.join("root");
        std::fs::create_dir_all(&root).map_err(|e| format!("creating {}: {e}", root.display()))?;
        let result = async {
            let stderr_path = dir.join("stderr");
            let stderr = std::fs::File::create(&stderr_path).map_err(|e| e.to_string())?;
            let stdout = std::fs::File::create(dir.join("stdout")).map_err(|e| e.to_string())?;
            let run = Run {
                argv: &["true".to_owned()],
                env: vec!["PATH=/usr/bin:/bin".to_owned()],
                dir: &dir,
                root: &root,
                workdir: Path::new(""),
                writable: vec![PathBuf::new()],
                inputs: &[],
                options: super::RunOptions {
                    kind: Kind::LinuxSandbox,
                    network: false,
                    container: None,
                    input_root_is_root: false,
                    gpus: Default::default(),
                },
                stdout,
                stderr,
            };
            let mut started = self.spawn(run).map_err(|e| e.to_string())?;
            let code = started.wait().await.map_err(|e| e.to_string())?;
            let report = started
                .report()
                .await
                .map_err(|e| e.to_string())?
                .ok_or("no status pipe")?;
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

#[tonic::async_trait]
impl Backend for LinuxSandbox {
    fn kind(&self) -> Kind {
        Kind::LinuxSandbox
    }

    fn describe(&self) -> String {
        format!(
            "linux-sandbox: namespaces, Landlock {}, limits by {}{}",
            self.landlock,
            self.limiter.describe(),
            if self.allow_network {
                ", network on request"
            } else {
                ", no network"
            }
        )
    }

    fn allows_network(&self) -> bool {
        self.allow_network
    }

    async fn start(&self, run: Run<'_>) -> Result<Box<dyn Process>, Error> {
        Ok(Box::new(self.spawn(run)?))
    }

    fn set_limits(&self, config: &Config) {
        *self.limits.write().unwrap_or_else(|e| e.into_inner()) =
            limits_of(config, self.host_memory);
        self.tmp_size.store(
            config.action_tmp_size.0,
            std::sync::atomic::Ordering::Relaxed,
        );
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
