//! `docker`: every action in a container of its own, made through the
//! Docker Engine API (`bollard`) on the configured socket; Podman's
//! Docker-compatible socket serves too.
//!
//! - The image is the action's `container-image` (or the agent's
//!   `docker_default_image`), checked against `docker_allowed_images` and
//!   pulled by `docker_pull_policy`; concurrent pulls of one image happen
//!   once, with the credentials `docker_registry_auth` holds for the
//!   image's registry. An image the registry does not know or refuses is the action's
//!   fault; an engine that does not answer is the agent's.
//! - The input root is bind-mounted at the same path as on the host, the
//!   Command's argv and working directory are used as they are, and the
//!   environment is the image's overlaid by the Command's (the engine
//!   merges them; the Command wins).
//! - The input files are hard links into the agent's cache, so the root is
//!   mounted writable but every input subtree (or lone input file) is bound
//!   read-only over it, as `linux-sandbox` does: an action cannot poison the
//!   cache through its inputs.
//! - The action runs as the agent's uid:gid unless it asks otherwise
//!   (`dockerUser`, or `dockerRunAsRoot=true` where `docker_allow_root`
//!   lets it); no capabilities, `no-new-privileges`, the engine's default
//!   seccomp profile, no devices, never the engine's socket; network `none`
//!   unless the action asks for `bridge` and `docker_network` allows it;
//!   memory, CPU and pids bounded.
//! - The images this agent pulled (and only those) are kept within
//!   `docker_image_cache_size`: past it, those no action is using are
//!   removed, least recently used first. Which they are is kept in the
//!   work directory, so a restarted agent still knows.
//! - Every container carries the agent's id as a label: those a killed
//!   agent left behind are removed when it starts again. A container is
//!   removed when its action ends, times out or is cancelled.
//!
//! This module is the backend (start-up, the container's definition,
//! starting it); [`images`] pulls and keeps images, [`container`] is the
//! started action's handle.

mod container;
mod gpus;
mod images;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bollard::errors::Error as EngineError;
use bollard::models::{
    ContainerCreateBody, HostConfig, HostConfigLogConfig, Mount, MountBindOptions,
    MountBindOptionsPropagationEnum, MountType,
};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::linux_sandbox::read_only_paths;
use super::{Backend, Kind, Process, Run};
use crate::config::Config;
use crate::error::Error;

use container::*;
use images::*;

/// The label every container of an agent carries, with the agent's id.
pub const AGENT_LABEL: &str = "dev.outpost.agent";
/// The label naming the lease a container runs.
const LEASE_LABEL: &str = "dev.outpost.lease";

/// How long a short engine call (inspect, create, start, kill, remove) may
/// take before the engine counts as not answering.
const ENGINE_TIMEOUT: Duration = Duration::from_secs(60);
/// Waiting for a container, reading its output and pulling images take as
/// long as they take; the action's own timeout bounds them.
const LONG_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long after its exit a container's output may still be arriving.
const OUTPUT_DRAIN: Duration = Duration::from_secs(10);
/// The longest one pull may take: a registry that stops answering fails
/// the pull (the agent's fault) rather than holding the action forever.
const PULL_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// One action's bounds, from the agent's configuration.
#[derive(Clone, Copy, Debug, Default)]
struct Limits {
    memory: Option<u64>,
    cpu_millis: Option<u64>,
    pids: Option<u64>,
}

fn limits_of(config: &Config) -> Limits {
    Limits {
        memory: config.action_memory_limit.map(|b| b.0).filter(|m| *m > 0),
        cpu_millis: config.action_cpu_limit.map(|c| (c * 1000.0).round() as u64),
        pids: (config.action_pids_limit > 0).then_some(config.action_pids_limit),
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PullLabels {
    /// `hit` (the engine had it), `miss` (pulled), `failed`.
    pub outcome: &'static str,
}

/// What the Docker backend counts.
#[derive(Clone, Default)]
pub struct Metrics {
    /// Containers started.
    pub containers: Counter,
    /// Image look-ups by outcome.
    pub pulls: Family<PullLabels, Counter>,
    /// Seconds spent pulling images.
    pub pull_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    /// Images removed to keep within `docker_image_cache_size`.
    pub images_removed: Counter,
}

pub struct Docker {
    /// Short calls.
    engine: bollard::Docker,
    /// Calls that last as long as an action or a pull.
    long: bollard::Docker,
    socket: PathBuf,
    /// The engine's version and the API version agreed on.
    version: String,
    agent_id: String,
    default_image: Option<String>,
    allowed: Vec<String>,
    allow_network: bool,
    allow_root: bool,
    images: Arc<Images>,
    /// `uid:gid` of the agent: who actions run as unless they ask.
    agent_user: String,
    agent_is_root: bool,
    limits: RwLock<Limits>,
    /// Whether the engine can give containers GPUs; else its runtimes.
    nvidia: Result<(), String>,
    pub metrics: Metrics,
}

/// Connecting and version negotiation, bounded: an engine that accepts
/// the connection but never answers must not hang the agent's start.
async fn connect(socket: &Path) -> Result<(bollard::Docker, String), String> {
    let path = socket
        .to_str()
        .ok_or_else(|| format!("the socket path {} is not UTF-8", socket.display()))?;
    let engine = bollard::Docker::connect_with_unix(
        path,
        ENGINE_TIMEOUT.as_secs(),
        bollard::API_DEFAULT_VERSION,
    )
    .map_err(|e| format!("connecting to {}: {e}", socket.display()))?;
    let answered = tokio::time::timeout(Duration::from_secs(15), async {
        let engine = engine.negotiate_version().await?;
        let version = engine.version().await?;
        Ok::<_, EngineError>((engine, version))
    })
    .await
    .map_err(|_| {
        format!(
            "the engine at {} did not answer within 15s",
            socket.display()
        )
    })?
    .map_err(|e| format!("the engine at {} did not answer: {e}", socket.display()))?;
    let (engine, version) = answered;
    let described = format!(
        "engine {} (API {})",
        version.version.as_deref().unwrap_or("unknown"),
        engine.client_version()
    );
    Ok((engine, described))
}

impl Docker {
    /// Connects to the engine, agrees on an API version and removes the
    /// containers a previous run of this agent left; refuses, saying why,
    /// when the engine does not answer.
    pub async fn set_up(config: &Config, agent_id: &str) -> anyhow::Result<Docker> {
        let socket = config.docker_socket.clone();
        let (engine, version) = connect(&socket).await.map_err(|why| {
            anyhow::anyhow!(
                "isolation docker cannot be used: {why}; start the Docker engine (or Podman's \
                 Docker-compatible service), give this agent access to its socket, or set \
                 docker_socket (see docs/isolation.md)"
            )
        })?;
        let long = engine.clone().with_timeout(LONG_TIMEOUT);
        let metrics = Metrics::default();
        let record = config.work_dir.join("docker-images.json");
        let images = Arc::new(Images {
            engine: engine.clone(),
            long: long.clone(),
            socket: socket.clone(),
            pull_policy: config.docker_pull_policy,
            registry_auth: config.docker_registry_auth.clone(),
            pulls: Mutex::new(HashMap::new()),
            metrics: metrics.clone(),
            cache_size: config.docker_image_cache_size.0,
            pulled: Mutex::new(Images::load_record(&record)),
            record,
            collecting: tokio::sync::Mutex::new(()),
            over: AtomicBool::new(false),
        });
        let (uid, gid) = {
            use std::os::unix::fs::MetadataExt;
            let me = std::fs::metadata("/proc/self")
                .map_err(|e| anyhow::anyhow!("reading who this agent runs as: {e}"))?;
            (me.uid(), me.gid())
        };
        let nvidia = match engine.info().await {
            Ok(info) => gpus::nvidia_runtime(&info),
            Err(e) => Err(format!("unknown, `docker info` failed: {e}")),
        };
        let docker = Docker {
            engine,
            long,
            socket,
            version,
            agent_id: agent_id.to_owned(),
            default_image: config
                .docker_default_image
                .as_deref()
                .map(|i| outpost_proto::platform::image_reference(i).map(str::to_owned))
                .transpose()
                .map_err(|e| anyhow::anyhow!("docker_default_image: {e}"))?,
            allowed: config.docker_allowed_images.clone(),
            allow_network: config.docker_network,
            allow_root: config.docker_allow_root,
            images,
            agent_user: format!("{uid}:{gid}"),
            agent_is_root: uid == 0,
            limits: RwLock::new(limits_of(config)),
            nvidia,
            metrics,
        };
        if let Some(path) = &docker.images.registry_auth {
            let registries = read_registry_auth(path)
                .map_err(|e| anyhow::anyhow!("docker_registry_auth: {e}"))?;
            tracing::info!(
                file = %path.display(),
                registries = %registries.keys().cloned().collect::<Vec<_>>().join(", "),
                "registry credentials"
            );
        }
        let removed = docker.remove_leftovers().await.map_err(|e| {
            anyhow::anyhow!(
                "isolation docker: removing the containers a previous run of this agent left \
                 failed: {e}; check the engine at {}",
                docker.socket.display()
            )
        })?;
        if removed > 0 {
            tracing::warn!(
                containers = removed,
                "removed containers a previous run of this agent left behind"
            );
        }
        tracing::info!(
            socket = %docker.socket.display(),
            engine = %docker.version,
            pull_policy = ?docker.images.pull_policy,
            "docker ready"
        );
        let at_start = config
            .docker_images_at_start
            .iter()
            .map(|i| outpost_proto::platform::image_reference(i).map(with_tag))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("docker_images_at_start: {e}"))?;
        // In the background: the agent registers meanwhile.
        docker.images.pull_at_start(at_start);
        tokio::spawn(Arc::clone(&docker.images).collect());
        Ok(docker)
    }

    /// Removes every container labelled with this agent's id.
    async fn remove_leftovers(&self) -> Result<usize, EngineError> {
        let filters = HashMap::from([(
            "label".to_owned(),
            vec![format!("{AGENT_LABEL}={}", self.agent_id)],
        )]);
        let left = self
            .engine
            .list_containers(Some(
                ListContainersOptionsBuilder::new()
                    .all(true)
                    .filters(&filters)
                    .build(),
            ))
            .await?;
        let mut removed = 0;
        for c in left {
            if let Some(id) = c.id {
                remove(&self.engine, &id).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The image an action runs, checked against the allowlist.
    fn image(&self, asked: Option<&str>) -> Result<String, Error> {
        let image = asked.or(self.default_image.as_deref()).ok_or_else(|| {
            Error::BadInput(
                "this action names no container-image and this agent has no \
                     docker_default_image; set container-image=docker://IMAGE in the action's \
                     platform"
                    .into(),
            )
        })?;
        let image = with_tag(image);
        if !self.allowed.is_empty() && !self.allowed.iter().any(|p| glob(p, &image)) {
            return Err(Error::BadInput(format!(
                "image {image} is not allowed on this agent (its docker_allowed_images are {})",
                self.allowed.join(", ")
            )));
        }
        Ok(image)
    }

    /// Who the action runs as in its container.
    fn user(&self, asked: Option<&str>, run_as_root: bool) -> Result<String, Error> {
        let user = match (asked, run_as_root) {
            (_, true) => "0:0".to_owned(),
            (Some(u), false) => u.to_owned(),
            (None, false) => return Ok(self.agent_user.clone()),
        };
        let uid = user.split(':').next().unwrap_or_default();
        if (uid == "0" || uid == "root") && !self.allow_root {
            return Err(Error::BadInput(format!(
                "this agent does not run actions as root in containers (asked: {}); drop \
                 dockerRunAsRoot and dockerUser, or run on an agent with docker_allow_root",
                if run_as_root {
                    "dockerRunAsRoot=true".to_owned()
                } else {
                    format!("dockerUser={user}")
                }
            )));
        }
        Ok(user)
    }

    /// The container's definition for `run`.
    fn definition(&self, run: &Run<'_>, image: String, user: String) -> ContainerCreateBody {
        let options = run.options.container.clone().unwrap_or_default();
        let limits = *self.limits.read().unwrap_or_else(|e| e.into_inner());
        let memory = options.memory.filter(|m| *m > 0).or(limits.memory);
        let cpu_millis = options.cpu_millis.filter(|c| *c > 0).or(limits.cpu_millis);
        let bind = |host: &Path, read_only: bool| Mount {
            target: Some(host.to_string_lossy().into_owned()),
            source: Some(host.to_string_lossy().into_owned()),
            typ: Some(MountType::BIND),
            read_only: Some(read_only),
            bind_options: Some(MountBindOptions {
                propagation: Some(MountBindOptionsPropagationEnum::RPRIVATE),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut mounts = vec![bind(run.root, false)];
        mounts.extend(
            read_only_paths(run.inputs.iter().map(PathBuf::as_path), &run.writable)
                .iter()
                .map(|p| bind(&run.root.join(p), true)),
        );
        let lease = run
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        ContainerCreateBody {
            image: Some(image),
            // The Command's argv exactly: no entrypoint of the image.
            entrypoint: Some(Vec::new()),
            cmd: Some(run.argv.to_vec()),
            env: Some(run.env.clone()),
            working_dir: Some(run.root.join(run.workdir).to_string_lossy().into_owned()),
            user: Some(user),
            labels: Some(HashMap::from([
                (AGENT_LABEL.to_owned(), self.agent_id.clone()),
                (LEASE_LABEL.to_owned(), lease),
            ])),
            attach_stdin: Some(false),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            open_stdin: Some(false),
            tty: Some(false),
            network_disabled: Some(!run.options.network),
            host_config: Some(HostConfig {
                mounts: Some(mounts),
                network_mode: Some(
                    if run.options.network {
                        "bridge"
                    } else {
                        "none"
                    }
                    .into(),
                ),
                privileged: Some(false),
                cap_drop: Some(vec!["ALL".into()]),
                security_opt: Some(vec!["no-new-privileges".into()]),
                memory: memory.map(|m| i64::try_from(m).unwrap_or(i64::MAX)),
                // No swap beyond the memory bound.
                memory_swap: memory.map(|m| i64::try_from(m).unwrap_or(i64::MAX)),
                nano_cpus: cpu_millis
                    .map(|c| i64::try_from(c.saturating_mul(1_000_000)).unwrap_or(i64::MAX)),
                pids_limit: limits.pids.map(|p| i64::try_from(p).unwrap_or(i64::MAX)),
                init: Some(options.init),
                // The agent reads the output as it comes; the engine keeps
                // no copy.
                log_config: Some(HostConfigLogConfig {
                    typ: Some("none".into()),
                    config: None,
                }),
                auto_remove: Some(false),
                device_requests: gpus::device_requests(&run.options.gpus.visible),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// An engine call failed for a reason of the agent's: retried elsewhere.
fn engine_down(socket: &Path, what: &str, e: EngineError) -> Error {
    Error::Retryable(format!(
        "{what}: the Docker engine at {} failed: {e}",
        socket.display()
    ))
}

/// Creates a container; if the caller gives up while the engine is
/// creating it (a lease cancelled while its action starts), the container
/// is removed once the engine has made it, so none is left behind.
async fn create(
    engine: &bollard::Docker,
    body: ContainerCreateBody,
) -> Result<String, EngineError> {
    struct Pending {
        creating: Option<tokio::task::JoinHandle<Result<String, EngineError>>>,
        engine: bollard::Docker,
    }
    impl Drop for Pending {
        fn drop(&mut self) {
            let (Some(creating), engine) = (self.creating.take(), self.engine.clone()) else {
                return;
            };
            tokio::spawn(async move {
                if let Ok(Ok(id)) = creating.await
                    && let Err(e) = remove(&engine, &id).await
                {
                    tracing::warn!(container = %id, error = %e, "cannot remove an action's container");
                }
            });
        }
    }
    let mut pending = Pending {
        creating: Some(tokio::spawn({
            let engine = engine.clone();
            async move { engine.create_container(None, body).await.map(|c| c.id) }
        })),
        engine: engine.clone(),
    };
    let creating = pending.creating.as_mut().expect("set above");
    let made = creating.await;
    pending.creating = None;
    made.unwrap_or_else(|e| {
        Err(EngineError::IOError {
            err: std::io::Error::other(e),
        })
    })
}

async fn remove(engine: &bollard::Docker, id: &str) -> Result<(), EngineError> {
    match engine
        .remove_container(
            id,
            Some(
                RemoveContainerOptionsBuilder::new()
                    .force(true)
                    .v(true)
                    .build(),
            ),
        )
        .await
    {
        Err(EngineError::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        other => other,
    }
}

#[tonic::async_trait]
impl Backend for Docker {
    fn kind(&self) -> Kind {
        Kind::Docker
    }

    fn describe(&self) -> String {
        format!(
            "docker: {} at {}, no capabilities, inputs read-only{}",
            self.version,
            self.socket.display(),
            if self.allow_network {
                ", bridge network on request"
            } else {
                ", no network"
            }
        )
    }

    fn allows_network(&self) -> bool {
        self.allow_network
    }

    async fn start(&self, run: Run<'_>) -> Result<Box<dyn Process>, Error> {
        if !run.options.gpus.visible.is_empty()
            && let Err(runtimes) = &self.nvidia
        {
            return Err(gpus::no_runtime(&self.socket, runtimes));
        }
        let options = run.options.container.clone().unwrap_or_default();
        let image = self.image(options.image.as_deref())?;
        let user = self.user(options.user.as_deref(), options.run_as_root)?;
        let other_user = user != self.agent_user;
        if other_user {
            // Another user writes the working directory and the outputs'
            // directories; the workspace's own directory (0700) keeps
            // everyone else on the host out.
            use std::os::unix::fs::PermissionsExt;
            for w in &run.writable {
                std::fs::set_permissions(run.root.join(w), std::fs::Permissions::from_mode(0o777))
                    .map_err(|e| Error::local("opening the action's directories to its user", e))?;
            }
        }
        let began = Instant::now();
        let image_use = self.images.hold(&image);
        self.images.ensure_image(&image).await?;
        let imaged = Instant::now();
        let memory_limit =
            options
                .memory
                .or(self.limits.read().unwrap_or_else(|e| e.into_inner()).memory);
        let definition = self.definition(&run, image.clone(), user);
        let mounts = definition
            .host_config
            .as_ref()
            .and_then(|h| h.mounts.clone())
            .unwrap_or_default();
        let created = Instant::now();
        let mut made = create(&self.engine, definition.clone()).await;
        if let Err(EngineError::DockerResponseServerError {
            status_code: 404, ..
        }) = &made
        {
            // The image went between its look-up and now (removed past
            // docker_image_cache_size as another action ended, or by hand):
            // have it again, once.
            self.images.ensure_image(&image).await?;
            made = create(&self.engine, definition).await;
        }
        let id = match made {
            Ok(id) => id,
            Err(EngineError::DockerResponseServerError {
                status_code,
                message,
            }) if (400..500).contains(&status_code) && status_code != 404 => {
                return Err(Error::BadInput(format!(
                    "the Docker engine refused a container of image {image}: {message}"
                )));
            }
            Err(e) => {
                return Err(engine_down(
                    &self.socket,
                    &format!("creating a container of image {image}"),
                    e,
                ));
            }
        };
        // Removed when dropped, whatever fails from here on.
        let mut container = Container {
            engine: self.engine.clone(),
            long: self.long.clone(),
            socket: self.socket.clone(),
            id: id.clone(),
            handle: tokio::runtime::Handle::current(),
            copying: None,
            oom_killed: false,
            memory_limit,
            removed: false,
            image_use: Some(image_use),
            give_back: (other_user && !self.agent_is_root).then(|| GiveBack {
                image: image.clone(),
                mounts,
                root: run.root.to_owned(),
                owner: self.agent_user.clone(),
            }),
        };
        let attaching = Instant::now();
        // Attached before it starts, so no output is missed.
        let attached = self
            .long
            .attach_container(
                &id,
                Some(
                    AttachContainerOptionsBuilder::new()
                        .stream(true)
                        .stdout(true)
                        .stderr(true)
                        .build(),
                ),
            )
            .await
            .map_err(|e| engine_down(&self.socket, "attaching to the action's container", e))?;
        container.copying = Some(tokio::spawn(copy_output(
            attached.output,
            run.stdout,
            run.stderr,
        )));
        let starting = Instant::now();
        match self.engine.start_container(&id, None).await {
            Ok(()) => {}
            Err(EngineError::DockerResponseServerError {
                status_code,
                message,
                // The command is not in the image (runc: `exec: "cc": ...`).
            }) if (400..500).contains(&status_code) || message.contains("exec: ") => {
                return Err(Error::BadInput(format!(
                    "the action's container (image {image}) could not start its command {}: \
                     {message}",
                    run.argv.first().map(String::as_str).unwrap_or_default()
                )));
            }
            Err(e) => {
                return Err(engine_down(
                    &self.socket,
                    "starting the action's container",
                    e,
                ));
            }
        }
        self.metrics.containers.inc();
        let ms = |from: Instant, to: Instant| (to - from).as_secs_f64() * 1000.0;
        tracing::debug!(
            container = %id,
            image_ms = ms(began, imaged),
            create_ms = ms(created, attaching),
            attach_ms = ms(attaching, starting),
            start_ms = ms(starting, Instant::now()),
            "container started"
        );
        Ok(Box::new(container))
    }

    fn set_limits(&self, config: &Config) {
        *self.limits.write().unwrap_or_else(|e| e.into_inner()) = limits_of(config);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_patterns() {
        for (pattern, image, matches) in [
            ("gcc:*", "gcc:12", true),
            ("gcc:*", "gccx:12", false),
            ("*", "anything/at:all", true),
            ("registry.example/*", "registry.example/team/cc:1", true),
            (
                "registry.example/*",
                "evil.example/registry.example/x:1",
                false,
            ),
            ("ubuntu:24.04", "ubuntu:24.04", true),
            ("ubuntu:24.04", "ubuntu:24.04x", false),
            ("*/cc:*", "team/cc:1", true),
            ("a*b*c", "abc", true),
            ("a*b*c", "ac", false),
        ] {
            assert_eq!(glob(pattern, image), matches, "{pattern} vs {image}");
        }
    }

    #[test]
    fn bare_names_mean_latest() {
        assert_eq!(with_tag("gcc"), "gcc:latest");
        assert_eq!(with_tag("gcc:12"), "gcc:12");
        assert_eq!(with_tag("localhost:5000/cc"), "localhost:5000/cc:latest");
        assert_eq!(with_tag("localhost:5000/cc:1"), "localhost:5000/cc:1");
        let pinned = format!("cc@sha256:{}", "a".repeat(64));
        assert_eq!(with_tag(&pinned), pinned);
    }

    #[test]
    fn registries_of_images_and_their_credentials() {
        assert_eq!(registry_of("gcc:12"), "docker.io");
        assert_eq!(registry_of("team/cc:1"), "docker.io");
        assert_eq!(registry_of("127.0.0.1:5000/cc:1"), "127.0.0.1:5000");
        assert_eq!(
            registry_of("Registry.Example/team/cc:1"),
            "registry.example"
        );
        assert_eq!(registry_of("localhost/cc:1"), "localhost");
        // As `docker login` writes it (tabs, base64 of user:password).
        let file = "{\n\t\"auths\": {\n\t\t\"https://index.docker.io/v1/\": {\n\t\t\t\"auth\": \"dTpwOnc=\"\n\t\t},\n\t\t\"http://127.0.0.1:5000\": {\"username\": \"a\", \"password\": \"b\"}\n\t}\n}";
        let auths = parse_registry_auth(file).expect("parses");
        let hub = &auths["docker.io"];
        assert_eq!(hub.username.as_deref(), Some("u"));
        assert_eq!(hub.password.as_deref(), Some("p:w"));
        assert_eq!(auths["127.0.0.1:5000"].password.as_deref(), Some("b"));
        for bad in [
            "auths: {}",
            "{\"auths\": {\"r.example\": {}}}",
            "{\"auths\": {\"r.example\": {\"auth\": \"bm9jb2xvbg==\"}}}",
        ] {
            assert!(parse_registry_auth(bad).is_err(), "{bad}");
        }
        assert!(parse_registry_auth("{\"credsStore\": \"desktop\"}").is_ok_and(|a| a.is_empty()));
    }

    #[test]
    fn pull_failures_say_whose_fault() {
        let socket = Path::new("/var/run/docker.sock");
        for (status, said, action) in [
            (Some(404), "manifest for nosuch:1 not found", true),
            (
                None,
                "pull access denied for nosuch, repository does not exist",
                true,
            ),
            (
                Some(500),
                "Get \"https://registry-1.docker.io/v2/\": dial tcp: lookup registry-1.docker.io: no such host",
                true,
            ),
            (Some(401), "unauthorized: authentication required", true),
            (
                Some(500),
                "Get \"https://r.example/v2/\": net/http: TLS handshake timeout",
                false,
            ),
            (Some(500), "connection refused", false),
        ] {
            let f = classify_pull("nosuch:1", socket, status, said);
            assert_eq!(f.action_fault, action, "{said}");
            assert!(f.message.contains("nosuch:1"), "{}", f.message);
        }
    }
}
