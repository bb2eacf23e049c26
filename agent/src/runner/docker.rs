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

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bollard::auth::DockerCredentials;
use bollard::container::LogOutput;
use bollard::errors::Error as EngineError;
use bollard::models::{
    ContainerCreateBody, HostConfig, HostConfigLogConfig, Mount, MountBindOptions,
    MountBindOptionsPropagationEnum, MountType,
};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateImageOptionsBuilder, KillContainerOptionsBuilder,
    ListContainersOptionsBuilder, RemoveContainerOptionsBuilder, RemoveImageOptionsBuilder,
    WaitContainerOptionsBuilder,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio_stream::{Stream, StreamExt as _};

use super::linux_sandbox::read_only_paths;
use super::{Backend, Kind, Process, Run};
use crate::config::{Config, PullPolicy};
use crate::error::Error;

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

/// Why an image could not be had: the action's fault (the registry does
/// not know the image or refuses it) or the agent's (the engine or the
/// network failed).
#[derive(Clone, Debug)]
struct PullFailure {
    action_fault: bool,
    message: String,
}

impl PullFailure {
    fn error(&self) -> Error {
        if self.action_fault {
            Error::BadInput(self.message.clone())
        } else {
            Error::Retryable(self.message.clone())
        }
    }
}

type PullCell = Arc<tokio::sync::OnceCell<Result<(), PullFailure>>>;

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
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// The backend's images: look-ups and pulls (callers of one image share
/// one pull), for actions and for the pulls at start.
struct Images {
    engine: bollard::Docker,
    long: bollard::Docker,
    socket: PathBuf,
    pull_policy: PullPolicy,
    /// The file of registry credentials, read at every pull (a rotated
    /// secret is used from the next pull on).
    registry_auth: Option<PathBuf>,
    /// Pulls in flight, by image: callers of one image share one pull.
    pulls: Mutex<HashMap<String, PullCell>>,
    metrics: Metrics,
    /// Bound on the total size of the images this agent pulled; 0: none.
    cache_size: u64,
    /// The images this agent pulled, and which are in use.
    pulled: Mutex<Pulled>,
    /// Where `pulled` is kept across restarts.
    record: PathBuf,
    /// One collection at a time.
    collecting: tokio::sync::Mutex<()>,
    /// The last collection stayed past the bound (what it would have
    /// removed was in use): the next image given back collects again.
    over: AtomicBool,
}

/// The images this agent pulled, by reference, with when an action last
/// used each (Unix milliseconds).
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct Pulled {
    images: BTreeMap<String, u64>,
    #[serde(skip)]
    in_use: HashMap<String, usize>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// An action's use of its image: while it lasts, the image is not
/// collected.
struct ImageUse {
    images: Arc<Images>,
    image: String,
}

impl Drop for ImageUse {
    fn drop(&mut self) {
        {
            let mut pulled = self.images.pulled();
            if let Some(n) = pulled.in_use.get_mut(&self.image) {
                *n -= 1;
                if *n == 0 {
                    pulled.in_use.remove(&self.image);
                }
            }
            if let Some(used) = pulled.images.get_mut(&self.image) {
                *used = now_ms();
            }
        }
        if self.images.over.load(Ordering::Relaxed)
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            handle.spawn(Arc::clone(&self.images).collect());
        }
    }
}

impl Images {
    /// Makes sure the engine has `image`, pulling it as the policy says;
    /// callers asking for one image at once share one pull.
    async fn ensure_image(self: &Arc<Self>, image: &str) -> Result<(), Error> {
        // Under `always`, an image the engine had before is this agent's
        // only if it pulled it then.
        let mut had = false;
        if self.pull_policy == PullPolicy::Always {
            had = self.engine.inspect_image(image).await.is_ok();
        } else {
            match self.engine.inspect_image(image).await {
                Ok(_) => {
                    self.count_pull("hit");
                    return Ok(());
                }
                Err(EngineError::DockerResponseServerError {
                    status_code: 404, ..
                }) => {}
                Err(e) => {
                    self.count_pull("failed");
                    return Err(engine_down(
                        &self.socket,
                        &format!("looking up image {image}"),
                        e,
                    ));
                }
            }
            if self.pull_policy == PullPolicy::Never {
                self.count_pull("failed");
                return Err(Error::BadInput(format!(
                    "image {image} is not on this agent and its docker_pull_policy is never; \
                     load the image on the agent's host or name one it has"
                )));
            }
        }
        let cell = {
            let mut pulls = self.pulls.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(pulls.entry(image.to_owned()).or_default())
        };
        let mut pulled_here = false;
        let result = cell
            .get_or_init(|| {
                pulled_here = true;
                self.pull(image, !had)
            })
            .await
            .clone();
        if pulled_here {
            // The next action asking for it looks again (and, under
            // `always`, pulls again).
            let mut pulls = self.pulls.lock().unwrap_or_else(|e| e.into_inner());
            if pulls.get(image).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                pulls.remove(image);
            }
        }
        result.map_err(|f| f.error())
    }

    /// Pulls `image`; `ours`: the engine did not have it, so it counts
    /// among the images this agent pulled.
    async fn pull(self: &Arc<Self>, image: &str, ours: bool) -> Result<(), PullFailure> {
        let started = Instant::now();
        let credentials = match &self.registry_auth {
            None => None,
            Some(path) => read_registry_auth(path)
                .map_err(|e| PullFailure {
                    action_fault: false,
                    message: format!("cannot pull image {image}: docker_registry_auth: {e}"),
                })?
                .remove(&registry_of(image)),
        };
        tracing::info!(image, credentials = credentials.is_some(), "pulling image");
        let mut stream = self.long.create_image(
            Some(CreateImageOptionsBuilder::new().from_image(image).build()),
            None,
            credentials,
        );
        let mut failure = None;
        let pulling = async {
            while let Some(item) = stream.next().await {
                match item {
                    Ok(info) => {
                        if let Some(e) = info.error_detail.and_then(|d| d.message) {
                            failure = Some(classify_pull(image, &self.socket, None, &e));
                            break;
                        }
                    }
                    Err(EngineError::DockerResponseServerError {
                        status_code,
                        message,
                    }) => {
                        failure = Some(classify_pull(
                            image,
                            &self.socket,
                            Some(status_code),
                            &message,
                        ));
                        break;
                    }
                    Err(EngineError::DockerStreamError { error }) => {
                        failure = Some(classify_pull(image, &self.socket, None, &error));
                        break;
                    }
                    Err(e) => {
                        failure = Some(PullFailure {
                            action_fault: false,
                            message: engine_down(
                                &self.socket,
                                &format!("pulling image {image}"),
                                e,
                            )
                            .to_string(),
                        });
                        break;
                    }
                }
            }
        };
        if tokio::time::timeout(PULL_TIMEOUT, pulling).await.is_err() {
            failure = Some(PullFailure {
                action_fault: false,
                message: format!(
                    "pulling image {image} through the Docker engine at {} did not finish within {} minutes",
                    self.socket.display(),
                    PULL_TIMEOUT.as_secs() / 60
                ),
            });
        }
        self.metrics
            .pull_seconds
            .inc_by(started.elapsed().as_secs_f64());
        match failure {
            Some(f) => {
                tracing::warn!(image, error = %f.message, "pulling an image failed");
                self.count_pull("failed");
                Err(f)
            }
            None => {
                self.count_pull("miss");
                if ours {
                    self.pulled()
                        .images
                        .entry(image.to_owned())
                        .or_insert_with(now_ms);
                }
                if self.cache_size > 0 {
                    // It saves the record too.
                    tokio::spawn(Arc::clone(self).collect());
                } else if ours {
                    self.save_record();
                }
                Ok(())
            }
        }
    }

    fn count_pull(&self, outcome: &'static str) {
        self.metrics
            .pulls
            .get_or_create(&PullLabels { outcome })
            .inc();
    }

    fn pulled(&self) -> std::sync::MutexGuard<'_, Pulled> {
        self.pulled.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `image` in use by an action until the returned guard goes.
    fn hold(self: &Arc<Self>, image: &str) -> ImageUse {
        let mut pulled = self.pulled();
        *pulled.in_use.entry(image.to_owned()).or_default() += 1;
        if let Some(used) = pulled.images.get_mut(image) {
            *used = now_ms();
        }
        ImageUse {
            images: Arc::clone(self),
            image: image.to_owned(),
        }
    }

    /// The images this agent pulled, as a previous run left them.
    fn load_record(path: &Path) -> Pulled {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(
                    "{} is not a record of pulled images ({e}); starting a new one",
                    path.display()
                );
                Pulled::default()
            }),
            Err(_) => Pulled::default(),
        }
    }

    fn save_record(&self) {
        let text = {
            let pulled = self.pulled();
            serde_json::to_vec(&*pulled).unwrap_or_default()
        };
        let tmp = self.record.with_extension("json.tmp");
        if let Err(e) =
            std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &self.record))
        {
            tracing::warn!(
                "cannot keep the record of pulled images in {}: {e}",
                self.record.display()
            );
        }
    }

    fn forget(&self, image: &str) {
        self.pulled().images.remove(image);
    }

    /// Keeps the images this agent pulled within `docker_image_cache_size`:
    /// past it, removes those no action is using, least recently used
    /// first. The engine refuses to remove an image any container uses.
    async fn collect(self: Arc<Self>) {
        if self.cache_size == 0 {
            return;
        }
        let _one = self.collecting.lock().await;
        let known: Vec<(String, u64)> = self
            .pulled()
            .images
            .iter()
            .map(|(i, u)| (i.clone(), *u))
            .collect();
        let mut sized = Vec::new();
        let mut total = 0u64;
        for (image, used) in known {
            match self.engine.inspect_image(&image).await {
                Ok(found) => {
                    let size = u64::try_from(found.size.unwrap_or(0)).unwrap_or(0);
                    total = total.saturating_add(size);
                    sized.push((image, used, size));
                }
                // Removed by someone else.
                Err(EngineError::DockerResponseServerError {
                    status_code: 404, ..
                }) => self.forget(&image),
                Err(e) => {
                    tracing::warn!(
                        "cannot size image {image} to keep docker_image_cache_size: {e}"
                    );
                    return;
                }
            }
        }
        sized.sort_by_key(|(_, used, _)| *used);
        for (image, _, size) in sized {
            if total <= self.cache_size {
                break;
            }
            if self.pulled().in_use.contains_key(&image) {
                continue;
            }
            match self
                .engine
                .remove_image(
                    &image,
                    Some(RemoveImageOptionsBuilder::new().force(false).build()),
                    None,
                )
                .await
            {
                Ok(_) => {
                    total -= size;
                    self.forget(&image);
                    self.metrics.images_removed.inc();
                    tracing::info!(
                        "removed image {image} ({} MiB), the least recently used of the images \
                         this agent pulled, to keep them within docker_image_cache_size ({} MiB)",
                        size >> 20,
                        self.cache_size >> 20
                    );
                }
                Err(EngineError::DockerResponseServerError {
                    status_code: 404, ..
                }) => {
                    total -= size;
                    self.forget(&image);
                }
                // A container (not an action's) uses it.
                Err(EngineError::DockerResponseServerError {
                    status_code: 409,
                    message,
                }) => tracing::debug!("image {image} is in use: {message}"),
                Err(e) => tracing::warn!("cannot remove image {image}: {e}"),
            }
        }
        self.over.store(total > self.cache_size, Ordering::Relaxed);
        self.save_record();
    }

    /// Pulls `images` (each on its own, so one registry that does not
    /// answer holds up no other), saying in the log how each went.
    fn pull_at_start(self: &Arc<Self>, images: Vec<String>) {
        for image in images {
            let images = Arc::clone(self);
            tokio::spawn(async move {
                match images.ensure_image(&image).await {
                    Ok(()) => tracing::info!("image {image} from docker_images_at_start is ready"),
                    Err(e) => tracing::warn!(
                        "image {image} from docker_images_at_start could not be pulled: {e}; \
                         actions that need it try again"
                    ),
                }
            });
        }
    }
}

/// `NAME` means `NAME:latest`, as the engine reads it; pulling a bare name
/// would fetch every tag.
fn with_tag(image: &str) -> String {
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') || last.contains(':') {
        image.to_owned()
    } else {
        format!("{image}:latest")
    }
}

/// Whether `text` matches `pattern`, whose `*` stands for any run of
/// characters.
fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &text[first.len()..];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

/// The registry an image reference names: its first component when that
/// is a host (it has a `.` or a `:`, or is `localhost`), Docker Hub
/// (`docker.io`) otherwise.
fn registry_of(image: &str) -> String {
    match image.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => {
            registry_key(first)
        }
        _ => "docker.io".to_owned(),
    }
}

/// A registry as `config.json` may name it (`https://index.docker.io/v1/`,
/// `http://host:5000`, `host:5000`), reduced to its host and port.
fn registry_key(name: &str) -> String {
    let name = name
        .strip_prefix("https://")
        .or_else(|| name.strip_prefix("http://"))
        .unwrap_or(name);
    let host = name.split('/').next().unwrap_or(name).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_owned()
        }
        _ => host,
    }
}

/// One registry's entry in Docker's `config.json`: `auth` (base64 of
/// `user:password`), or `username` and `password`, or an `identitytoken`.
#[derive(serde::Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

#[derive(serde::Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
}

/// Reads a credentials file in Docker's `config.json` format: the
/// credentials of each registry its `auths` names, by registry.
fn read_registry_auth(path: &Path) -> Result<HashMap<String, DockerCredentials>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_registry_auth(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn parse_registry_auth(text: &str) -> Result<HashMap<String, DockerCredentials>, String> {
    use base64::Engine as _;
    let file: AuthFile = serde_json::from_str(text).map_err(|e| {
        format!(
            "not a Docker config.json ({{\"auths\": {{\"REGISTRY\": {{\"auth\": ...}}}}}}): {e}"
        )
    })?;
    let mut out = HashMap::new();
    for (name, entry) in file.auths {
        let registry = registry_key(&name);
        let (username, password) = match (entry.auth, entry.username, entry.password) {
            (Some(auth), _, _) if !auth.is_empty() => {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| format!("the auth of {name} is not base64 of USER:PASSWORD"))?;
                let (user, password) = decoded
                    .split_once(':')
                    .ok_or_else(|| format!("the auth of {name} is not base64 of USER:PASSWORD"))?;
                (Some(user.to_owned()), Some(password.to_owned()))
            }
            (_, user, password) => (user, password),
        };
        if username.is_none() && entry.identitytoken.is_none() {
            return Err(format!(
                "{name} has no credentials (auth, username and password, or identitytoken); \
                 credential helpers (credsStore, credHelpers) are not read"
            ));
        }
        out.insert(
            registry.clone(),
            DockerCredentials {
                username,
                password,
                identitytoken: entry.identitytoken,
                serveraddress: Some(registry),
                ..Default::default()
            },
        );
    }
    Ok(out)
}

/// An engine call failed for a reason of the agent's: retried elsewhere.
fn engine_down(socket: &Path, what: &str, e: EngineError) -> Error {
    Error::Retryable(format!(
        "{what}: the Docker engine at {} failed: {e}",
        socket.display()
    ))
}

/// Whose fault a failed pull is, from what the engine said.
fn classify_pull(image: &str, socket: &Path, status: Option<u16>, said: &str) -> PullFailure {
    let lower = said.to_ascii_lowercase();
    let about_the_image = [
        "not found",
        "manifest unknown",
        "unauthorized",
        "denied",
        "does not exist",
        "invalid reference",
        "no such host",
        "repository name must",
        "authentication required",
        "no basic auth credentials",
    ]
    .iter()
    .any(|w| lower.contains(w));
    let action_fault = about_the_image || status.is_some_and(|s| (400..500).contains(&s));
    let unauthorized = [
        "unauthorized",
        "authentication required",
        "no basic auth credentials",
    ]
    .iter()
    .any(|w| lower.contains(w))
        || status == Some(401);
    let message = if unauthorized {
        format!(
            "cannot pull image {image}: unauthorized: the registry wants credentials this agent \
             does not have or refuses the ones it sent (docker_registry_auth): {}",
            said.trim()
        )
    } else if action_fault {
        format!("cannot pull image {image}: {}", said.trim())
    } else {
        format!(
            "cannot pull image {image} through the Docker engine at {}: {}",
            socket.display(),
            said.trim()
        )
    };
    PullFailure {
        action_fault,
        message,
    }
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

type Output = Pin<Box<dyn Stream<Item = Result<LogOutput, EngineError>> + Send>>;

/// Copies the container's output into the action's stdout and stderr.
async fn copy_output(
    mut output: Output,
    mut stdout: std::fs::File,
    mut stderr: std::fs::File,
) -> Result<(), String> {
    use std::io::Write;
    while let Some(item) = output.next().await {
        let written = match item.map_err(|e| e.to_string())? {
            LogOutput::StdOut { message } | LogOutput::Console { message } => {
                stdout.write_all(&message)
            }
            LogOutput::StdErr { message } => stderr.write_all(&message),
            LogOutput::StdIn { .. } => Ok(()),
        };
        written.map_err(|e| format!("writing the action's output: {e}"))?;
    }
    Ok(())
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

/// A started action's container; removed when it is finished or dropped.
struct Container {
    engine: bollard::Docker,
    long: bollard::Docker,
    socket: PathBuf,
    id: String,
    handle: tokio::runtime::Handle,
    copying: Option<tokio::task::JoinHandle<Result<(), String>>>,
    oom_killed: bool,
    memory_limit: Option<u64>,
    removed: bool,
    /// Its image's use, given back once the container is gone.
    image_use: Option<ImageUse>,
    /// An action of another user on a non-root agent: its files go back to
    /// the agent's user.
    give_back: Option<GiveBack>,
}

/// What giving an action's files back to the agent's user needs.
struct GiveBack {
    image: String,
    /// The action's mounts: the inputs stay read-only (and unchanged).
    mounts: Vec<Mount>,
    root: PathBuf,
    /// The agent's `uid:gid`.
    owner: String,
}

#[tonic::async_trait]
impl Process for Container {
    async fn wait(&mut self) -> Result<i32, Error> {
        let began = Instant::now();
        let mut waiting = self.long.wait_container(
            &self.id,
            Some(
                WaitContainerOptionsBuilder::new()
                    .condition("not-running")
                    .build(),
            ),
        );
        let code = match waiting.next().await {
            Some(Ok(r)) => r.status_code,
            // bollard reports a non-zero exit as an error carrying it.
            Some(Err(EngineError::DockerContainerWaitError { code, .. })) => code,
            Some(Err(e)) => {
                return Err(engine_down(
                    &self.socket,
                    "waiting for the action's container",
                    e,
                ));
            }
            None => -1,
        };
        if let Some(copying) = self.copying.take() {
            match tokio::time::timeout(OUTPUT_DRAIN, copying).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => {
                    tracing::warn!(container = %self.id, error = %e, "reading a container's output failed")
                }
                Ok(Err(_)) | Err(_) => {
                    tracing::warn!(container = %self.id, "a container's output did not end with it")
                }
            }
        }
        tracing::debug!(
            container = %self.id,
            wait_ms = began.elapsed().as_secs_f64() * 1000.0,
            "container exited"
        );
        // Killed (128+SIGKILL), or no code said: the engine knows whether
        // it was for memory. Other exits need no more calls.
        if code == 137 || code < 0 {
            let state = self
                .engine
                .inspect_container(&self.id, None)
                .await
                .map_err(|e| engine_down(&self.socket, "inspecting the action's container", e))?
                .state
                .unwrap_or_default();
            self.oom_killed = state.oom_killed.unwrap_or(false);
            return Ok(i32::try_from(state.exit_code.unwrap_or(code)).unwrap_or(-1));
        }
        Ok(i32::try_from(code).unwrap_or(-1))
    }

    fn stop(&self) {
        let (engine, id) = (self.engine.clone(), self.id.clone());
        self.handle.spawn(async move {
            if let Err(e) = engine
                .kill_container(
                    &id,
                    Some(KillContainerOptionsBuilder::new().signal("KILL").build()),
                )
                .await
            {
                tracing::debug!(container = %id, error = %e, "killing a container");
            }
        });
    }

    async fn finish(mut self: Box<Self>) -> Result<Option<String>, Error> {
        let note = self.oom_killed.then(|| {
            format!(
                "the action was killed for running out of memory (its container's limit is {}; \
                 raise EstimatedMemory in the action's platform or action_memory_limit on the \
                 agent)",
                self.memory_limit.map_or_else(
                    || "the host's memory".to_owned(),
                    |m| format!("{} MiB", m >> 20)
                )
            )
        });
        // Files of another user go back to the agent before it collects
        // them; otherwise the container is removed (on drop) off the way of
        // the result.
        if let Some(g) = self.give_back.take() {
            remove(&self.engine, &self.id)
                .await
                .map_err(|e| engine_down(&self.socket, "removing the action's container", e))?;
            self.removed = true;
            g.run(&self.engine, &self.long).await;
        }
        Ok(note)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Some(copying) = self.copying.take() {
            copying.abort();
        }
        if self.removed {
            return;
        }
        // Finished, or given up before its end (cancelled): the container
        // goes either way.
        let (engine, id) = (self.engine.clone(), self.id.clone());
        let give_back = self.give_back.take();
        let long = self.long.clone();
        let image_use = self.image_use.take();
        self.handle.spawn(async move {
            if let Err(e) = remove(&engine, &id).await {
                tracing::warn!(container = %id, error = %e, "cannot remove an action's container");
            }
            if let Some(g) = give_back {
                g.run(&engine, &long).await;
            }
            drop(image_use);
        });
    }
}

/// Gives the files an action of another user (root, or its `dockerUser`)
/// left in its input root back to the agent's user, so the agent can
/// collect and remove them: a short container of the same image running
/// `chown -R`, with only the capabilities that needs.
impl GiveBack {
    async fn run(self, engine: &bollard::Docker, long: &bollard::Docker) {
        let GiveBack {
            image,
            mounts,
            root,
            owner,
        } = self;
        let root_text = root.to_string_lossy().into_owned();
        let body = ContainerCreateBody {
            image: Some(image),
            entrypoint: Some(Vec::new()),
            cmd: Some(vec![
                "chown".into(),
                "-R".into(),
                "-h".into(),
                owner,
                root_text,
            ]),
            user: Some("0:0".into()),
            network_disabled: Some(true),
            labels: None,
            host_config: Some(HostConfig {
                mounts: Some(mounts),
                network_mode: Some("none".into()),
                cap_drop: Some(vec!["ALL".into()]),
                cap_add: Some(vec!["CHOWN".into(), "DAC_OVERRIDE".into(), "FOWNER".into()]),
                security_opt: Some(vec!["no-new-privileges".into()]),
                log_config: Some(HostConfigLogConfig {
                    typ: Some("none".into()),
                    config: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let result = async {
            let id = engine.create_container(None, body).await?.id;
            let ran = async {
                engine.start_container(&id, None).await?;
                let mut waiting = long
                    .wait_container(&id, None::<bollard::query_parameters::WaitContainerOptions>);
                while let Some(r) = waiting.next().await {
                    match r {
                        // Inputs are read-only: chown says so, and that is fine.
                        Ok(_) | Err(EngineError::DockerContainerWaitError { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok::<_, EngineError>(())
            }
            .await;
            remove(engine, &id).await?;
            ran
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(root = %root.display(), error = %e, "cannot give an action's files back to the agent");
        }
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
