//! The agent's and the coordinator's flags (with their `OUTPOST_*`
//! variables), and how they layer over a config file: defaults, then the
//! YAML file, then variables, then flags. Parsed by `main`, which is the
//! only place that reads argv and the environment.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use outpost_coordinator::Config;
use outpost_coordinator::config::{ByteSize, Span};

#[derive(Args, Clone)]
pub struct AgentArgs {
    /// YAML config file (see docs/configuration.md).
    #[arg(long, env = "OUTPOST_CONFIG")]
    pub config: Option<PathBuf>,
    /// The coordinator to dial, grpc://HOST:PORT [default: grpc://127.0.0.1:8980].
    #[arg(long, env = "OUTPOST_COORDINATOR")]
    pub coordinator: Option<String>,
    /// Work directory: agent id, input cache, action directories [default: ./outpost-agent].
    #[arg(long, env = "OUTPOST_WORK_DIR")]
    pub work_dir: Option<PathBuf>,
    /// Actions to run at once [default: one per CPU].
    #[arg(long, env = "OUTPOST_SLOTS")]
    pub slots: Option<u32>,
    /// A property actions can require, KEY=VALUE (repeatable).
    #[arg(long = "label", env = "OUTPOST_LABELS", value_delimiter = ',')]
    pub labels: Vec<String>,
    /// The pool this agent serves (the Pool property).
    #[arg(long, env = "OUTPOST_POOL")]
    pub pool: Option<String>,
    /// Bound on the local input cache, e.g. 20GiB [default: 10GiB].
    #[arg(long, env = "OUTPOST_CACHE_SIZE")]
    pub cache_size: Option<ByteSize>,
    /// Serve /metrics, /healthz and /readyz on HOST:PORT [default: no port].
    #[arg(long, env = "OUTPOST_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Isolation backends, the default first: linux-sandbox, docker, sandbox-exec (macOS), none [default: linux-sandbox on Linux, none elsewhere].
    #[arg(long, env = "OUTPOST_ISOLATION", value_delimiter = ',')]
    pub isolation: Vec<String>,
    /// Let sandboxed actions that ask (dockerNetwork=bridge) use the host's network.
    #[arg(long, env = "OUTPOST_ALLOW_NETWORK")]
    pub allow_network: Option<bool>,
    /// Extra host path shown read-only in the sandbox (repeatable).
    #[arg(
        long = "sandbox-mount",
        env = "OUTPOST_SANDBOX_MOUNTS",
        value_delimiter = ','
    )]
    pub sandbox_mounts: Vec<PathBuf>,
    /// Directory searched for Xcode*.app (repeatable) [default: /Applications, /Applications/Xcodes].
    #[arg(long = "xcode-dir", env = "OUTPOST_XCODE_DIRS", value_delimiter = ',')]
    pub xcode_dirs: Vec<PathBuf>,
    /// First of the host ids a root agent's sandboxed actions run as (group BASE, users BASE+1..) [default: 990000].
    #[arg(long, env = "OUTPOST_SANDBOX_UID_BASE")]
    pub sandbox_uid_base: Option<u32>,
    /// How many host users a root agent's sandboxed actions may use, one per running action [default: 1000].
    #[arg(long, env = "OUTPOST_SANDBOX_UID_COUNT")]
    pub sandbox_uid_count: Option<u32>,
    /// Memory one action may use, e.g. 8GiB [default: the host's memory].
    #[arg(long, env = "OUTPOST_ACTION_MEMORY_LIMIT")]
    pub action_memory_limit: Option<ByteSize>,
    /// Processes and threads one action may have; 0 for no limit [default: 8192].
    #[arg(long, env = "OUTPOST_ACTION_PIDS_LIMIT")]
    pub action_pids_limit: Option<u64>,
    /// CPUs one action may use, e.g. 2 or 0.5 [default: no limit].
    #[arg(long, env = "OUTPOST_ACTION_CPU_LIMIT")]
    pub action_cpu_limit: Option<f64>,
    /// Bytes one action's outputs may total, stdout and stderr included [default: 4GiB].
    #[arg(long, env = "OUTPOST_ACTION_OUTPUT_LIMIT")]
    pub action_output_limit: Option<ByteSize>,
    /// Size of a sandboxed action's /tmp (a tmpfs; 0: on disk, unbounded) [default: 1GiB].
    #[arg(long, env = "OUTPOST_ACTION_TMP_SIZE")]
    pub action_tmp_size: Option<ByteSize>,
    /// The Docker engine's socket, for isolation docker [default: /var/run/docker.sock].
    #[arg(long, env = "OUTPOST_DOCKER_SOCKET")]
    pub docker_socket: Option<PathBuf>,
    /// Image of Docker actions that name no container-image, e.g. docker://gcc:12 [default: none].
    #[arg(long, env = "OUTPOST_DOCKER_DEFAULT_IMAGE")]
    pub docker_default_image: Option<String>,
    /// When to pull an action's image: missing, always, never [default: missing].
    #[arg(long, env = "OUTPOST_DOCKER_PULL_POLICY")]
    pub docker_pull_policy: Option<outpost_agent::config::PullPolicy>,
    /// An image pattern actions may run, e.g. 'gcc:*' (repeatable) [default: any image].
    #[arg(
        long = "docker-allowed-image",
        env = "OUTPOST_DOCKER_ALLOWED_IMAGES",
        value_delimiter = ','
    )]
    pub docker_allowed_images: Vec<String>,
    /// Let containers that ask (dockerNetwork=bridge) have the bridge network.
    #[arg(long, env = "OUTPOST_DOCKER_NETWORK")]
    pub docker_network: Option<bool>,
    /// Let actions run as root in their container (dockerRunAsRoot=true).
    #[arg(long, env = "OUTPOST_DOCKER_ALLOW_ROOT")]
    pub docker_allow_root: Option<bool>,
    /// File of registry credentials in Docker's config.json format (auths) [default: none].
    #[arg(long, env = "OUTPOST_DOCKER_REGISTRY_AUTH")]
    pub docker_registry_auth: Option<PathBuf>,
    /// An image to pull when the agent starts, in the background (repeatable) [default: none].
    #[arg(
        long = "docker-image-at-start",
        env = "OUTPOST_DOCKER_IMAGES_AT_START",
        value_delimiter = ','
    )]
    pub docker_images_at_start: Vec<String>,
    /// Bound on the images this agent pulled, unused ones removed past it; 0: never [default: 20GiB].
    #[arg(long, env = "OUTPOST_DOCKER_IMAGE_CACHE_SIZE")]
    pub docker_image_cache_size: Option<ByteSize>,
    /// Persistent workers alive at once per worker key [default: 4].
    #[arg(long, env = "OUTPOST_WORKER_MAX_PER_KEY")]
    pub worker_max_per_key: Option<u32>,
    /// Requests one persistent worker serves before it is replaced; 0: no bound [default: 0].
    #[arg(long, env = "OUTPOST_WORKER_MAX_REQUESTS")]
    pub worker_max_requests: Option<u64>,
    /// How long an idle persistent worker is kept [default: 10m].
    #[arg(long, env = "OUTPOST_WORKER_IDLE_TIMEOUT")]
    pub worker_idle_timeout: Option<Span>,
    /// Idle persistent workers kept in all [default: 16].
    #[arg(long, env = "OUTPOST_WORKER_MAX_IDLE")]
    pub worker_max_idle: Option<u32>,
    /// Bytes of one persistent worker response [default: 16MiB].
    #[arg(long, env = "OUTPOST_WORKER_MAX_RESPONSE")]
    pub worker_max_response: Option<ByteSize>,
    /// Workspaces of recycle-runner actions kept for the next action of their key [default: 4].
    #[arg(long, env = "OUTPOST_RUNNER_MAX_COUNT")]
    pub runner_max_count: Option<u32>,
    /// Bytes the kept workspaces may take in all [default: 10GiB].
    #[arg(long, env = "OUTPOST_RUNNER_MAX_DISK")]
    pub runner_max_disk: Option<ByteSize>,
    /// Log filter [default: info].
    #[arg(long, env = "OUTPOST_LOG")]
    pub log: Option<String>,
    /// File holding this agent's token for the coordinator [default: none].
    #[arg(long, env = "OUTPOST_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// PEM CA certificates that vouch for a grpcs:// coordinator [default: the system's roots].
    #[arg(long, visible_alias = "ca", env = "OUTPOST_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM certificate to present to a coordinator that requires one (mutual TLS).
    #[arg(long, env = "OUTPOST_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "OUTPOST_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Print the effective configuration as YAML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Reload when the --config file changes, not only at SIGHUP.
    #[arg(long, env = "OUTPOST_WATCH_CONFIG", requires = "config")]
    pub watch_config: bool,
}

impl AgentArgs {
    pub fn resolve(&self) -> anyhow::Result<outpost_agent::Config> {
        let mut config = match &self.config {
            Some(path) => outpost_agent::Config::load(path)?,
            None => outpost_agent::Config::default(),
        };
        overlay(&mut config.coordinator, self.coordinator.clone());
        overlay(&mut config.work_dir, self.work_dir.clone());
        overlay(&mut config.slots, self.slots);
        if !self.labels.is_empty() {
            config.labels = self.labels.clone();
        }
        if self.pool.is_some() {
            config.pool = self.pool.clone();
        }
        overlay(&mut config.cache_size, self.cache_size);
        if self.metrics_listen.is_some() {
            config.metrics_listen = self.metrics_listen;
        }
        if !self.isolation.is_empty() {
            config.isolation = self.isolation.clone();
        }
        overlay(&mut config.allow_network, self.allow_network);
        if !self.sandbox_mounts.is_empty() {
            config.sandbox_mounts = self.sandbox_mounts.clone();
        }
        if !self.xcode_dirs.is_empty() {
            config.xcode_dirs = self.xcode_dirs.clone();
        }
        if self.action_memory_limit.is_some() {
            config.action_memory_limit = self.action_memory_limit;
        }
        overlay(&mut config.action_pids_limit, self.action_pids_limit);
        if self.action_cpu_limit.is_some() {
            config.action_cpu_limit = self.action_cpu_limit;
        }
        overlay(&mut config.action_output_limit, self.action_output_limit);
        overlay(&mut config.action_tmp_size, self.action_tmp_size);
        overlay(&mut config.sandbox_uid_base, self.sandbox_uid_base);
        overlay(&mut config.sandbox_uid_count, self.sandbox_uid_count);
        overlay(&mut config.docker_socket, self.docker_socket.clone());
        if self.docker_default_image.is_some() {
            config.docker_default_image = self.docker_default_image.clone();
        }
        overlay(&mut config.docker_pull_policy, self.docker_pull_policy);
        if !self.docker_allowed_images.is_empty() {
            config.docker_allowed_images = self.docker_allowed_images.clone();
        }
        overlay(&mut config.docker_network, self.docker_network);
        overlay(&mut config.docker_allow_root, self.docker_allow_root);
        if self.docker_registry_auth.is_some() {
            config.docker_registry_auth = self.docker_registry_auth.clone();
        }
        if !self.docker_images_at_start.is_empty() {
            config.docker_images_at_start = self.docker_images_at_start.clone();
        }
        overlay(
            &mut config.docker_image_cache_size,
            self.docker_image_cache_size,
        );
        overlay(&mut config.worker_max_per_key, self.worker_max_per_key);
        overlay(&mut config.worker_max_requests, self.worker_max_requests);
        overlay(&mut config.worker_idle_timeout, self.worker_idle_timeout);
        overlay(&mut config.worker_max_idle, self.worker_max_idle);
        overlay(&mut config.worker_max_response, self.worker_max_response);
        overlay(&mut config.runner_max_count, self.runner_max_count);
        overlay(&mut config.runner_max_disk, self.runner_max_disk);
        overlay(&mut config.log, self.log.clone());
        if self.token_file.is_some() {
            config.token_file = self.token_file.clone();
        }
        overlay(&mut config.tls_ca, self.tls_ca.clone().map(Some));
        overlay(&mut config.tls_cert, self.tls_cert.clone().map(Some));
        overlay(&mut config.tls_key, self.tls_key.clone().map(Some));
        config.validate()?;
        Ok(config)
    }
}

#[derive(Args, Clone)]
pub struct CoordinatorArgs {
    /// YAML config file (see docs/configuration.md).
    #[arg(long, env = "OUTPOST_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to serve gRPC and HTTP on [default: 0.0.0.0:8980].
    #[arg(long, env = "OUTPOST_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Data directory for the embedded storage [default: ./outpost-data].
    #[arg(long, env = "OUTPOST_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Size bound of the CAS, e.g. 50GiB [default: 50GiB].
    #[arg(long, env = "OUTPOST_MAX_CAS_SIZE")]
    pub max_cas_size: Option<ByteSize>,
    /// Largest total of one batch call, e.g. 4MiB [default: 4MiB].
    #[arg(long, env = "OUTPOST_MAX_BATCH_SIZE")]
    pub max_batch_size: Option<ByteSize>,
    /// How long an unfinished upload is kept, e.g. 10m [default: 10m].
    #[arg(long, env = "OUTPOST_UPLOAD_EXPIRY")]
    pub upload_expiry: Option<Span>,
    /// Grace period for in-flight requests on shutdown, e.g. 30s [default: 30s].
    #[arg(long, env = "OUTPOST_SHUTDOWN_GRACE")]
    pub shutdown_grace: Option<Span>,
    /// Agents' heartbeat interval [default: 5s].
    #[arg(long, env = "OUTPOST_HEARTBEAT_INTERVAL")]
    pub heartbeat_interval: Option<Span>,
    /// How long a lost agent may take to reconnect [default: 10s].
    #[arg(long, env = "OUTPOST_AGENT_RECONNECT_GRACE")]
    pub agent_reconnect_grace: Option<Span>,
    /// Attempts of an action whose agent was lost [default: 3].
    #[arg(long, env = "OUTPOST_MAX_ATTEMPTS")]
    pub max_attempts: Option<u32>,
    /// How long a disconnected agent still counts for matching [default: 10m].
    #[arg(long, env = "OUTPOST_FLEET_MEMORY")]
    pub fleet_memory: Option<Span>,
    /// Time after start-up before unsatisfiable actions fail fast [default: 15s].
    #[arg(long, env = "OUTPOST_STARTUP_GRACE")]
    pub startup_grace: Option<Span>,
    /// Cancel operations nobody waits on after this long [default: 60s].
    #[arg(long, env = "OUTPOST_ABANDON_AFTER")]
    pub abandon_after: Option<Span>,
    /// Resend an unchanged operation on Execute/WaitExecution streams this often [default: 30s].
    #[arg(long, env = "OUTPOST_STREAM_KEEPALIVE")]
    pub stream_keepalive: Option<Span>,
    /// How long an action asking for a warm runner waits for the agent holding it [default: 3s].
    #[arg(long, env = "OUTPOST_RUNNER_RECYCLING_MAX_WAIT")]
    pub runner_recycling_max_wait: Option<Span>,
    /// Timeout of actions that set none [default: 1h].
    #[arg(long, env = "OUTPOST_DEFAULT_ACTION_TIMEOUT")]
    pub default_action_timeout: Option<Span>,
    /// Longest timeout an action may ask for [default: 6h].
    #[arg(long, env = "OUTPOST_MAX_ACTION_TIMEOUT")]
    pub max_action_timeout: Option<Span>,
    /// Accept input symlinks whose relative target climbs above the input root [default: false].
    #[arg(long, env = "OUTPOST_ALLOW_ESCAPING_SYMLINKS")]
    pub allow_escaping_symlinks: Option<bool>,
    /// Log filter, e.g. info or outpost_coordinator=debug [default: info].
    #[arg(long, env = "OUTPOST_LOG")]
    pub log: Option<String>,
    /// Client tokens: `TOKEN ROLE[,ROLE...]` per line [default: none, open].
    #[arg(long, env = "OUTPOST_CLIENT_TOKENS")]
    pub client_tokens: Option<PathBuf>,
    /// Agent tokens: one per line [default: none, open].
    #[arg(long, env = "OUTPOST_AGENT_TOKENS")]
    pub agent_tokens: Option<PathBuf>,
    /// PEM certificate chain to serve TLS with; clients then dial grpcs:// [default: plain TCP].
    #[arg(long, env = "OUTPOST_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "OUTPOST_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: clients and agents must present a certificate they signed (mutual TLS).
    #[arg(long, env = "OUTPOST_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Print the effective configuration as YAML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Reload when the --config file changes, not only at SIGHUP.
    #[arg(long, env = "OUTPOST_WATCH_CONFIG", requires = "config")]
    pub watch_config: bool,
}

impl CoordinatorArgs {
    /// Defaults, then the config file, then environment and flags.
    pub fn resolve(&self, base: Config) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?,
            None => base,
        };
        if let Some(v) = self.listen {
            config.listen = v;
        }
        if let Some(v) = &self.data_dir {
            config.data_dir = v.clone();
        }
        if let Some(v) = self.max_cas_size {
            config.max_cas_size = v;
        }
        if let Some(v) = self.max_batch_size {
            config.max_batch_size = v;
        }
        if let Some(v) = self.upload_expiry {
            config.upload_expiry = v;
        }
        if let Some(v) = self.shutdown_grace {
            config.shutdown_grace = v;
        }
        if let Some(v) = &self.log {
            config.log = v.clone();
        }
        if self.client_tokens.is_some() {
            config.client_tokens = self.client_tokens.clone();
        }
        if self.agent_tokens.is_some() {
            config.agent_tokens = self.agent_tokens.clone();
        }
        overlay(&mut config.tls_cert, self.tls_cert.clone().map(Some));
        overlay(&mut config.tls_key, self.tls_key.clone().map(Some));
        overlay(
            &mut config.tls_client_ca,
            self.tls_client_ca.clone().map(Some),
        );
        overlay(&mut config.heartbeat_interval, self.heartbeat_interval);
        overlay(
            &mut config.agent_reconnect_grace,
            self.agent_reconnect_grace,
        );
        overlay(&mut config.max_attempts, self.max_attempts);
        overlay(&mut config.fleet_memory, self.fleet_memory);
        overlay(&mut config.startup_grace, self.startup_grace);
        overlay(&mut config.abandon_after, self.abandon_after);
        overlay(&mut config.stream_keepalive, self.stream_keepalive);
        overlay(
            &mut config.runner_recycling_max_wait,
            self.runner_recycling_max_wait,
        );
        overlay(
            &mut config.default_action_timeout,
            self.default_action_timeout,
        );
        overlay(&mut config.max_action_timeout, self.max_action_timeout);
        overlay(
            &mut config.allow_escaping_symlinks,
            self.allow_escaping_symlinks,
        );
        config.validate()?;
        Ok(config)
    }
}

pub fn overlay<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}
