//! How the agent runs an action: the one seam every way of running goes
//! through. Nothing outside this module names a backend.
//!
//! - A [`Backend`] per isolation kind (`none`, `linux-sandbox`, `docker`), set up and
//!   probed when the agent starts, starts a command in a workspace and
//!   hands back a [`Process`] (wait, stop, finish).
//! - A [`Workspace`] is an action's directory with an explicit lifecycle:
//!   made private, inputs laid out, removed when dropped.
//! - [`RunOptions`] are what the action's platform asks for, read through
//!   the vocabulary the coordinator matched it with
//!   (`outpost_proto::platform`).
//! - [`Runners`] holds the backends, says what they offer, and picks one
//!   per action.
//!
//! On Linux both backends start their stubs through the agent's spawner
//! ([`spawner`]) rather than executing the binary afresh. An agent
//! configured for `linux-sandbox` proves it works at start-up by running a
//! probe action in it, and refuses to start otherwise: it never falls back
//! to running actions unisolated on its own.

#[cfg(os_linux)]
mod docker;
pub mod gpu;
#[cfg(os_linux)]
mod linux_sandbox;
mod none;
mod options;
pub mod recycle;
mod sandbox_exec;
#[cfg(os_linux)]
mod sandbox_users;
#[cfg(os_linux)]
mod spawned;
#[cfg(os_linux)]
pub mod spawner;
pub mod worker;
mod workspace;
pub mod xcode;

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use outpost_proto::platform::Parsed;

use crate::config::Config;
use crate::error::Error;

pub use options::{ContainerOptions, RunOptions};
pub use recycle::Recycler;
pub use worker::Workers;
pub use workspace::{Workspace, make_dirs};

#[cfg(os_linux)]
pub use docker::Metrics as DockerMetrics;
#[cfg(os_linux)]
pub use linux_sandbox::DEFAULT_SANDBOX_MOUNTS;

/// The Docker backend's counters (none off Linux).
#[cfg(not(os_linux))]
#[derive(Clone)]
pub struct DockerMetrics {
    pub containers: prometheus_client::metrics::counter::Counter,
    pub pulls: prometheus_client::metrics::counter::Counter,
    pub pull_seconds: prometheus_client::metrics::counter::Counter,
    pub images_removed: prometheus_client::metrics::counter::Counter,
}

/// The isolation kinds this build knows, by their
/// `workload-isolation-type` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    None,
    LinuxSandbox,
    Docker,
    SandboxExec,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::None,
        Kind::LinuxSandbox,
        Kind::Docker,
        Kind::SandboxExec,
    ];

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::None => "none",
            Kind::LinuxSandbox => "linux-sandbox",
            Kind::Docker => "docker",
            Kind::SandboxExec => "sandbox-exec",
        }
    }

    /// The `dockerNetwork` value saying this kind gives the bridge
    /// (`outpost_proto::platform::network_pair`).
    pub fn bridge(self) -> &'static str {
        match self {
            Kind::None => "none/bridge",
            Kind::LinuxSandbox => "linux-sandbox/bridge",
            Kind::Docker => "docker/bridge",
            Kind::SandboxExec => "sandbox-exec/bridge",
        }
    }
}

/// One command to start in a workspace.
pub struct Run<'a> {
    pub argv: &'a [String],
    /// The whole environment, as `NAME=VALUE`.
    pub env: Vec<String>,
    /// The workspace's directory (the backend's own files go there) and
    /// its input root.
    pub dir: &'a Path,
    pub root: &'a Path,
    /// The working directory, under the root.
    pub workdir: &'a Path,
    /// Directories under the root the action may write: the working
    /// directory and the outputs' parents.
    pub writable: Vec<PathBuf>,
    /// The input files, under the root.
    pub inputs: &'a [PathBuf],
    pub options: RunOptions,
    pub stdout: std::fs::File,
    pub stderr: std::fs::File,
}

/// One way of running actions.
#[tonic::async_trait]
pub trait Backend: Send + Sync {
    fn kind(&self) -> Kind;

    /// What it enforces, for logs and the fleet page.
    fn describe(&self) -> String;

    /// Whether actions asking for the network may have it here.
    fn allows_network(&self) -> bool;

    /// Starts `run`'s command (stdin empty).
    async fn start(&self, run: Run<'_>) -> Result<Box<dyn Process>, Error>;

    /// Takes the action limits of a reloaded configuration.
    fn set_limits(&self, _config: &Config) {}
}

/// A started action.
#[tonic::async_trait]
pub trait Process: Send {
    /// Its exit code: the action's, or 128+N when it died of signal N.
    async fn wait(&mut self) -> Result<i32, Error>;

    /// Stops the action and everything it started.
    fn stop(&self);

    /// After `wait`: why the backend could not run it, if it could not;
    /// otherwise a note for the action's result (an OOM kill), if any.
    async fn finish(self: Box<Self>) -> Result<Option<String>, Error>;
}

/// The backends of this agent, the default first.
pub struct Runners {
    backends: Vec<Box<dyn Backend>>,
    /// Forks the stubs (Linux), shared by the backends.
    #[cfg(os_linux)]
    spawner: Option<std::sync::Arc<spawner::Spawner>>,
    /// The Docker backend's counters, when it is one of the backends.
    #[cfg(os_linux)]
    docker: Option<DockerMetrics>,
}

impl Runners {
    /// Sets up the configured backends; fails, saying why and what to do,
    /// when one does not work here. `host_memory` is the default bound of
    /// an action's memory.
    pub async fn new(
        config: &Config,
        work_dir: &Path,
        agent_id: &str,
        host_memory: u64,
    ) -> anyhow::Result<Runners> {
        let kinds = config
            .isolation
            .iter()
            .map(|k| {
                Kind::parse(k).with_context(|| {
                    format!(
                        "isolation {k:?} is not one of {}",
                        Kind::ALL.map(Kind::name).join(", ")
                    )
                })
            })
            .collect::<anyhow::Result<Vec<Kind>>>()?;
        #[cfg(os_linux)]
        {
            // Cgroups first: on cgroup v2 the agent moves itself into a leaf
            // and enables controllers on the cgroup it left, which the
            // kernel refuses while another process (a spawner) is in it.
            let mut sandbox = None;
            if kinds.contains(&Kind::LinuxSandbox) {
                sandbox =
                    Some(linux_sandbox::LinuxSandbox::set_up(config, agent_id, host_memory).await?);
            }
            // The agent's own binary image, even if an upgrade replaced the
            // file since: a spawner started again later must speak the
            // same protocol.
            let exe = PathBuf::from("/proc/self/exe");
            let spawner = std::sync::Arc::new(
                tokio::task::spawn_blocking(move || spawner::Spawner::start(&exe))
                    .await
                    .context("starting the spawner process")?
                    .context("starting the spawner process")?,
            );
            let mut backends: Vec<Box<dyn Backend>> = Vec::new();
            let mut docker_metrics = None;
            for kind in kinds {
                match kind {
                    Kind::None => backends.push(Box::new(none::Unisolated::new(
                        std::sync::Arc::clone(&spawner),
                    ))),
                    Kind::LinuxSandbox => {
                        // Set up above; a second mention adds nothing.
                        if let Some(mut sandbox) = sandbox.take() {
                            sandbox.attach(std::sync::Arc::clone(&spawner));
                            sandbox.probe(work_dir).await?;
                            backends.push(Box::new(sandbox));
                        }
                    }
                    // Refused by the configuration off macOS; its probe
                    // would say the same.
                    Kind::SandboxExec => backends.push(Box::new(
                        sandbox_exec::SandboxExec::set_up(config, work_dir).await?,
                    )),
                    Kind::Docker => {
                        let backend = docker::Docker::set_up(config, agent_id).await?;
                        docker_metrics = Some(backend.metrics.clone());
                        backends.push(Box::new(backend));
                    }
                }
            }
            Ok(Runners {
                backends,
                spawner: Some(spawner),
                docker: docker_metrics,
            })
        }
        #[cfg(not(os_linux))]
        {
            let _ = (work_dir, agent_id, host_memory);
            let exe =
                std::env::current_exe().context("finding this binary to run actions through")?;
            let mut backends: Vec<Box<dyn Backend>> = Vec::new();
            for kind in kinds {
                match kind {
                    Kind::None => backends.push(Box::new(none::Unisolated::new(exe.clone()))),
                    Kind::LinuxSandbox => {
                        anyhow::bail!("isolation linux-sandbox needs Linux; use none on this host")
                    }
                    Kind::Docker => {
                        anyhow::bail!("isolation docker needs Linux; use none on this host")
                    }
                    Kind::SandboxExec => backends.push(Box::new(
                        sandbox_exec::SandboxExec::set_up(config, work_dir).await?,
                    )),
                }
            }
            Ok(Runners { backends })
        }
    }

    /// The Docker backend's counters, where it runs, for the metrics.
    pub fn docker_metrics(&self) -> Option<DockerMetrics> {
        #[cfg(os_linux)]
        return self.docker.clone();
        #[cfg(not(os_linux))]
        None
    }

    /// Spawner processes started so far (Linux), for the metrics.
    pub fn spawner_starts(&self) -> Option<prometheus_client::metrics::counter::Counter> {
        #[cfg(os_linux)]
        return self.spawner.as_ref().map(|s| s.starts.clone());
        #[cfg(not(os_linux))]
        None
    }

    /// What this agent offers: `workload-isolation-type` values (the
    /// default first), `dockerNetwork` values, and one line saying what is
    /// enforced. The network is offered per kind (`docker/bridge`), and as
    /// plain `bridge` when the default kind gives it, for actions that name
    /// no isolation.
    pub fn offers(&self) -> Offers {
        let mut networks = vec!["off"];
        if self.backends.first().is_some_and(|b| b.allows_network()) {
            networks.push("bridge");
        }
        networks.extend(
            self.backends
                .iter()
                .filter(|b| b.allows_network())
                .map(|b| b.kind().bridge()),
        );
        let mut root_filesystems = vec![outpost_proto::platform::HOST_ROOT];
        if self.backend(Kind::LinuxSandbox).is_some() {
            root_filesystems.push(outpost_proto::platform::INPUT_ROOT);
        }
        Offers {
            root_filesystems,
            kinds: self
                .backends
                .iter()
                .map(|b| b.kind().name().to_owned())
                .collect(),
            networks,
            detail: self
                .backends
                .first()
                .map(|b| b.describe())
                .unwrap_or_default(),
        }
    }

    /// Takes the action limits of a reloaded configuration; actions that
    /// start from now on get them.
    pub fn set_limits(&self, config: &Config) {
        for b in &self.backends {
            b.set_limits(config);
        }
    }

    /// How an action's platform asks to run it, checked against what this
    /// agent offers.
    pub fn options(&self, platform: &Parsed) -> Result<RunOptions, Error> {
        RunOptions::read(platform, self)
    }

    fn backend(&self, kind: Kind) -> Option<&dyn Backend> {
        self.backends
            .iter()
            .find(|b| b.kind() == kind)
            .map(AsRef::as_ref)
    }

    /// Starts `run` on the backend its options chose.
    pub async fn start(&self, mut run: Run<'_>) -> Result<Box<dyn Process>, Error> {
        // The GPUs it was given, named for CUDA (`runner::gpu`).
        run.env.extend(run.options.gpus.env.iter().cloned());
        let backend = self.backend(run.options.kind).ok_or_else(|| {
            Error::BadInput(format!(
                "workload-isolation-type={} is not offered by this agent",
                run.options.kind.name()
            ))
        })?;
        backend.start(run).await
    }
}

/// What an agent's runners offer, as it advertises them.
#[derive(Clone, Debug, Default)]
pub struct Offers {
    pub kinds: Vec<String>,
    pub networks: Vec<&'static str>,
    /// `root-filesystem` values: `host`, and `input-root` where
    /// `linux-sandbox` runs.
    pub root_filesystems: Vec<&'static str>,
    pub detail: String,
}
