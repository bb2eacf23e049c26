//! The `outpost` command: parses flags and config, sets up logging and the
//! runtime, and hands over to the coordinator library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

mod admin;
mod bench;
mod credentials;
mod install;
mod logging;
mod logs;
mod reload;
mod supervisor;

use clap::{Args, Parser, Subcommand};
use outpost_coordinator::config::{ByteSize, Span};
use outpost_coordinator::{Config, Coordinator};
use outpost_proto::settings::Reloaded;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "outpost",
    version,
    about = "Remote build execution for self-hosted, mixed fleets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
// Parsed once and matched at once: the size of the largest variant costs
// nothing.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Run the coordinator: the REAPI endpoint, CAS, Action Cache and queue.
    Coordinator(CoordinatorCommand),
    /// Run an agent: dial out to a coordinator and run the actions it leases.
    Agent(AgentCommand),
    /// Measure a REAPI server (Outpost or any other) with plain REAPI calls.
    Bench(bench::BenchArgs),
    #[command(flatten)]
    Admin(admin::Admin),
    /// Try Outpost on this machine: a coordinator on 127.0.0.1:8980 with its
    /// data in ./outpost-data and a local agent, and the .bazelrc lines to
    /// use them.
    #[command(mut_arg("listen", |a| a.help(
        "Address to serve gRPC and HTTP on [default: 127.0.0.1:8980]"
    )))]
    Up(CoordinatorArgs),
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct AgentCommand {
    #[command(subcommand)]
    service: Option<AgentService>,
    #[command(flatten)]
    args: AgentArgs,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once, at start-up
enum AgentService {
    /// Install the agent as a service (systemd unit or launchd job) with
    /// these settings as its config file, and start it.
    Install {
        #[command(flatten)]
        options: install::Options,
        #[command(flatten)]
        args: AgentArgs,
    },
    /// Stop and remove the agent's service; its config and work directory stay.
    Uninstall(install::Target),
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct CoordinatorCommand {
    #[command(subcommand)]
    service: Option<CoordinatorService>,
    #[command(flatten)]
    args: CoordinatorArgs,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once, at start-up
enum CoordinatorService {
    /// Install the coordinator as a service (systemd unit or launchd job)
    /// with these settings as its config file, and start it.
    Install {
        #[command(flatten)]
        options: install::Options,
        #[command(flatten)]
        args: CoordinatorArgs,
    },
    /// Stop and remove the coordinator's service; its config and data stay.
    Uninstall(install::Target),
}

#[derive(Args, Clone)]
struct AgentArgs {
    /// YAML config file (see docs/configuration.md).
    #[arg(long, env = "OUTPOST_CONFIG")]
    config: Option<PathBuf>,
    /// The coordinator to dial, grpc://HOST:PORT [default: grpc://127.0.0.1:8980].
    #[arg(long, env = "OUTPOST_COORDINATOR")]
    coordinator: Option<String>,
    /// Work directory: agent id, input cache, action directories [default: ./outpost-agent].
    #[arg(long, env = "OUTPOST_WORK_DIR")]
    work_dir: Option<PathBuf>,
    /// Actions to run at once [default: one per CPU].
    #[arg(long, env = "OUTPOST_SLOTS")]
    slots: Option<u32>,
    /// A property actions can require, KEY=VALUE (repeatable).
    #[arg(long = "label", env = "OUTPOST_LABELS", value_delimiter = ',')]
    labels: Vec<String>,
    /// The pool this agent serves (the Pool property).
    #[arg(long, env = "OUTPOST_POOL")]
    pool: Option<String>,
    /// Bound on the local input cache, e.g. 20GiB [default: 10GiB].
    #[arg(long, env = "OUTPOST_CACHE_SIZE")]
    cache_size: Option<ByteSize>,
    /// Serve /metrics, /healthz and /readyz on HOST:PORT [default: no port].
    #[arg(long, env = "OUTPOST_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Isolation backends, the default first: linux-sandbox, docker, sandbox-exec (macOS), none [default: linux-sandbox on Linux, none elsewhere].
    #[arg(long, env = "OUTPOST_ISOLATION", value_delimiter = ',')]
    isolation: Vec<String>,
    /// Let sandboxed actions that ask (dockerNetwork=bridge) use the host's network.
    #[arg(long, env = "OUTPOST_ALLOW_NETWORK")]
    allow_network: Option<bool>,
    /// Extra host path shown read-only in the sandbox (repeatable).
    #[arg(
        long = "sandbox-mount",
        env = "OUTPOST_SANDBOX_MOUNTS",
        value_delimiter = ','
    )]
    sandbox_mounts: Vec<PathBuf>,
    /// Directory searched for Xcode*.app (repeatable) [default: /Applications, /Applications/Xcodes].
    #[arg(long = "xcode-dir", env = "OUTPOST_XCODE_DIRS", value_delimiter = ',')]
    xcode_dirs: Vec<PathBuf>,
    /// First of the host ids a root agent's sandboxed actions run as (group BASE, users BASE+1..) [default: 990000].
    #[arg(long, env = "OUTPOST_SANDBOX_UID_BASE")]
    sandbox_uid_base: Option<u32>,
    /// How many host users a root agent's sandboxed actions may use, one per running action [default: 1000].
    #[arg(long, env = "OUTPOST_SANDBOX_UID_COUNT")]
    sandbox_uid_count: Option<u32>,
    /// Memory one action may use, e.g. 8GiB [default: the host's memory].
    #[arg(long, env = "OUTPOST_ACTION_MEMORY_LIMIT")]
    action_memory_limit: Option<ByteSize>,
    /// Processes and threads one action may have; 0 for no limit [default: 8192].
    #[arg(long, env = "OUTPOST_ACTION_PIDS_LIMIT")]
    action_pids_limit: Option<u64>,
    /// CPUs one action may use, e.g. 2 or 0.5 [default: no limit].
    #[arg(long, env = "OUTPOST_ACTION_CPU_LIMIT")]
    action_cpu_limit: Option<f64>,
    /// Bytes one action's outputs may total, stdout and stderr included [default: 4GiB].
    #[arg(long, env = "OUTPOST_ACTION_OUTPUT_LIMIT")]
    action_output_limit: Option<ByteSize>,
    /// Size of a sandboxed action's /tmp (a tmpfs; 0: on disk, unbounded) [default: 1GiB].
    #[arg(long, env = "OUTPOST_ACTION_TMP_SIZE")]
    action_tmp_size: Option<ByteSize>,
    /// The Docker engine's socket, for isolation docker [default: /var/run/docker.sock].
    #[arg(long, env = "OUTPOST_DOCKER_SOCKET")]
    docker_socket: Option<PathBuf>,
    /// Image of Docker actions that name no container-image, e.g. docker://gcc:12 [default: none].
    #[arg(long, env = "OUTPOST_DOCKER_DEFAULT_IMAGE")]
    docker_default_image: Option<String>,
    /// When to pull an action's image: missing, always, never [default: missing].
    #[arg(long, env = "OUTPOST_DOCKER_PULL_POLICY")]
    docker_pull_policy: Option<outpost_agent::config::PullPolicy>,
    /// An image pattern actions may run, e.g. 'gcc:*' (repeatable) [default: any image].
    #[arg(
        long = "docker-allowed-image",
        env = "OUTPOST_DOCKER_ALLOWED_IMAGES",
        value_delimiter = ','
    )]
    docker_allowed_images: Vec<String>,
    /// Let containers that ask (dockerNetwork=bridge) have the bridge network.
    #[arg(long, env = "OUTPOST_DOCKER_NETWORK")]
    docker_network: Option<bool>,
    /// Let actions run as root in their container (dockerRunAsRoot=true).
    #[arg(long, env = "OUTPOST_DOCKER_ALLOW_ROOT")]
    docker_allow_root: Option<bool>,
    /// File of registry credentials in Docker's config.json format (auths) [default: none].
    #[arg(long, env = "OUTPOST_DOCKER_REGISTRY_AUTH")]
    docker_registry_auth: Option<PathBuf>,
    /// An image to pull when the agent starts, in the background (repeatable) [default: none].
    #[arg(
        long = "docker-image-at-start",
        env = "OUTPOST_DOCKER_IMAGES_AT_START",
        value_delimiter = ','
    )]
    docker_images_at_start: Vec<String>,
    /// Bound on the images this agent pulled, unused ones removed past it; 0: never [default: 20GiB].
    #[arg(long, env = "OUTPOST_DOCKER_IMAGE_CACHE_SIZE")]
    docker_image_cache_size: Option<ByteSize>,
    /// Persistent workers alive at once per worker key [default: 4].
    #[arg(long, env = "OUTPOST_WORKER_MAX_PER_KEY")]
    worker_max_per_key: Option<u32>,
    /// Requests one persistent worker serves before it is replaced; 0: no bound [default: 0].
    #[arg(long, env = "OUTPOST_WORKER_MAX_REQUESTS")]
    worker_max_requests: Option<u64>,
    /// How long an idle persistent worker is kept [default: 10m].
    #[arg(long, env = "OUTPOST_WORKER_IDLE_TIMEOUT")]
    worker_idle_timeout: Option<Span>,
    /// Idle persistent workers kept in all [default: 16].
    #[arg(long, env = "OUTPOST_WORKER_MAX_IDLE")]
    worker_max_idle: Option<u32>,
    /// Bytes of one persistent worker response [default: 16MiB].
    #[arg(long, env = "OUTPOST_WORKER_MAX_RESPONSE")]
    worker_max_response: Option<ByteSize>,
    /// Workspaces of recycle-runner actions kept for the next action of their key [default: 4].
    #[arg(long, env = "OUTPOST_RUNNER_MAX_COUNT")]
    runner_max_count: Option<u32>,
    /// Bytes the kept workspaces may take in all [default: 10GiB].
    #[arg(long, env = "OUTPOST_RUNNER_MAX_DISK")]
    runner_max_disk: Option<ByteSize>,
    /// Log filter [default: info].
    #[arg(long, env = "OUTPOST_LOG")]
    log: Option<String>,
    /// File holding this agent's token for the coordinator [default: none].
    #[arg(long, env = "OUTPOST_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// PEM CA certificates that vouch for a grpcs:// coordinator [default: the system's roots].
    #[arg(long, visible_alias = "ca", env = "OUTPOST_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// PEM certificate to present to a coordinator that requires one (mutual TLS).
    #[arg(long, env = "OUTPOST_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "OUTPOST_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Print the effective configuration as YAML and exit.
    #[arg(long)]
    print_config: bool,
    /// Reload when the --config file changes, not only at SIGHUP.
    #[arg(long, env = "OUTPOST_WATCH_CONFIG", requires = "config")]
    watch_config: bool,
}

impl AgentArgs {
    fn resolve(&self) -> anyhow::Result<outpost_agent::Config> {
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
struct CoordinatorArgs {
    /// YAML config file (see docs/configuration.md).
    #[arg(long, env = "OUTPOST_CONFIG")]
    config: Option<PathBuf>,
    /// Address to serve gRPC and HTTP on [default: 0.0.0.0:8980].
    #[arg(long, env = "OUTPOST_LISTEN")]
    listen: Option<SocketAddr>,
    /// Data directory for the embedded storage [default: ./outpost-data].
    #[arg(long, env = "OUTPOST_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Size bound of the CAS, e.g. 50GiB [default: 50GiB].
    #[arg(long, env = "OUTPOST_MAX_CAS_SIZE")]
    max_cas_size: Option<ByteSize>,
    /// Largest total of one batch call, e.g. 4MiB [default: 4MiB].
    #[arg(long, env = "OUTPOST_MAX_BATCH_SIZE")]
    max_batch_size: Option<ByteSize>,
    /// How long an unfinished upload is kept, e.g. 10m [default: 10m].
    #[arg(long, env = "OUTPOST_UPLOAD_EXPIRY")]
    upload_expiry: Option<Span>,
    /// Grace period for in-flight requests on shutdown, e.g. 30s [default: 30s].
    #[arg(long, env = "OUTPOST_SHUTDOWN_GRACE")]
    shutdown_grace: Option<Span>,
    /// Agents' heartbeat interval [default: 5s].
    #[arg(long, env = "OUTPOST_HEARTBEAT_INTERVAL")]
    heartbeat_interval: Option<Span>,
    /// How long a lost agent may take to reconnect [default: 10s].
    #[arg(long, env = "OUTPOST_AGENT_RECONNECT_GRACE")]
    agent_reconnect_grace: Option<Span>,
    /// Attempts of an action whose agent was lost [default: 3].
    #[arg(long, env = "OUTPOST_MAX_ATTEMPTS")]
    max_attempts: Option<u32>,
    /// How long a disconnected agent still counts for matching [default: 10m].
    #[arg(long, env = "OUTPOST_FLEET_MEMORY")]
    fleet_memory: Option<Span>,
    /// Time after start-up before unsatisfiable actions fail fast [default: 15s].
    #[arg(long, env = "OUTPOST_STARTUP_GRACE")]
    startup_grace: Option<Span>,
    /// Cancel operations nobody waits on after this long [default: 60s].
    #[arg(long, env = "OUTPOST_ABANDON_AFTER")]
    abandon_after: Option<Span>,
    /// Resend an unchanged operation on Execute/WaitExecution streams this often [default: 30s].
    #[arg(long, env = "OUTPOST_STREAM_KEEPALIVE")]
    stream_keepalive: Option<Span>,
    /// How long an action asking for a warm runner waits for the agent holding it [default: 3s].
    #[arg(long, env = "OUTPOST_RUNNER_RECYCLING_MAX_WAIT")]
    runner_recycling_max_wait: Option<Span>,
    /// Timeout of actions that set none [default: 1h].
    #[arg(long, env = "OUTPOST_DEFAULT_ACTION_TIMEOUT")]
    default_action_timeout: Option<Span>,
    /// Longest timeout an action may ask for [default: 6h].
    #[arg(long, env = "OUTPOST_MAX_ACTION_TIMEOUT")]
    max_action_timeout: Option<Span>,
    /// Accept input symlinks whose relative target climbs above the input root [default: false].
    #[arg(long, env = "OUTPOST_ALLOW_ESCAPING_SYMLINKS")]
    allow_escaping_symlinks: Option<bool>,
    /// Log filter, e.g. info or outpost_coordinator=debug [default: info].
    #[arg(long, env = "OUTPOST_LOG")]
    log: Option<String>,
    /// Client tokens: `TOKEN ROLE[,ROLE...]` per line [default: none, open].
    #[arg(long, env = "OUTPOST_CLIENT_TOKENS")]
    client_tokens: Option<PathBuf>,
    /// Agent tokens: one per line [default: none, open].
    #[arg(long, env = "OUTPOST_AGENT_TOKENS")]
    agent_tokens: Option<PathBuf>,
    /// PEM certificate chain to serve TLS with; clients then dial grpcs:// [default: plain TCP].
    #[arg(long, env = "OUTPOST_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "OUTPOST_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificates: clients and agents must present a certificate they signed (mutual TLS).
    #[arg(long, env = "OUTPOST_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
    /// Print the effective configuration as YAML and exit.
    #[arg(long)]
    print_config: bool,
    /// Reload when the --config file changes, not only at SIGHUP.
    #[arg(long, env = "OUTPOST_WATCH_CONFIG", requires = "config")]
    watch_config: bool,
}

impl CoordinatorArgs {
    /// Defaults, then the config file, then environment and flags.
    fn resolve(&self, base: Config) -> anyhow::Result<Config> {
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

fn overlay<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    // The reaper and sandbox stubs run in front of every action: no flag
    // parsing, no logging, no runtime (the sandbox must be single-threaded).
    if argv.get(1).map(String::as_str) == Some("__reap") {
        let rest = argv.get(2..).unwrap_or_default();
        let rest = rest.strip_prefix(&["--".to_owned()]).unwrap_or(rest);
        let code = outpost_sandbox::reaper::main(rest);
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    #[cfg(os_linux)]
    if argv.get(1).map(String::as_str) == Some("__spawner") {
        return ExitCode::from(u8::try_from(outpost_sandbox::linux::spawner::main()).unwrap_or(1));
    }
    #[cfg(os_linux)]
    if argv.get(1).map(String::as_str) == Some("__sandbox") {
        let code = outpost_sandbox::linux::stub::main(argv.get(2..).unwrap_or_default());
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    let cli = Cli::parse();
    let (args, up) = match &cli.command {
        Command::Coordinator(CoordinatorCommand { service, args }) => match service {
            None => (args, false),
            Some(CoordinatorService::Install { options, args }) => {
                return exit(install_coordinator(options, args));
            }
            Some(CoordinatorService::Uninstall(target)) => {
                return exit(uninstall(install::Role::Coordinator, target));
            }
        },
        Command::Up(args) => (args, true),
        Command::Agent(AgentCommand { service, args }) => match service {
            None => return agent_main(args),
            Some(AgentService::Install { options, args }) => {
                return exit(install_agent(options, args));
            }
            Some(AgentService::Uninstall(target)) => {
                return exit(uninstall(install::Role::Agent, target));
            }
        },
        Command::Bench(args) => {
            let args = args.clone();
            return launch("warn", bench::run(args));
        }
        Command::Admin(admin) => {
            let admin = admin.clone();
            return launch("warn", admin::run(admin));
        }
    };
    let config = match args.resolve(base_config(up)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("outpost: {e:#}");
            return ExitCode::from(2);
        }
    };
    if args.print_config {
        print!("{}", config.to_yaml());
        return ExitCode::SUCCESS;
    }
    if up && config.tls_cert.is_some() {
        eprintln!(
            "outpost: `outpost up` serves plain gRPC for a local agent; run `outpost coordinator` \
             with --tls-cert/--tls-key and agents with --coordinator grpcs://HOST:PORT for TLS"
        );
        return ExitCode::from(2);
    }
    ignore_sighup_until_reload_is_ready();
    launch(
        &config.log.clone(),
        run_coordinator(args.clone(), config, up),
    )
}

fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outpost: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn install_agent(options: &install::Options, args: &AgentArgs) -> anyhow::Result<()> {
    let paths = install::Paths::of(install::Role::Agent, &options.target)?;
    let mut config = args.resolve()?;
    if config.work_dir == outpost_agent::Config::default().work_dir {
        config.work_dir = paths.state_dir.clone();
    }
    install_service(options, &paths, &config.to_yaml())
}

fn install_coordinator(options: &install::Options, args: &CoordinatorArgs) -> anyhow::Result<()> {
    let paths = install::Paths::of(install::Role::Coordinator, &options.target)?;
    let mut config = args.resolve(Config::default())?;
    if config.data_dir == Config::default().data_dir {
        config.data_dir = paths.state_dir.clone();
    }
    install_service(options, &paths, &config.to_yaml())
}

fn install_service(
    options: &install::Options,
    paths: &install::Paths,
    config_yaml: &str,
) -> anyhow::Result<()> {
    let binary = match &options.binary {
        Some(b) => std::path::absolute(b)?,
        None => std::env::current_exe()?,
    };
    let existing = std::fs::read_to_string(&paths.config).ok();
    let plan = install::install(
        paths,
        &binary,
        config_yaml,
        existing.as_deref(),
        options.force,
        install::service_user_exists(),
    )?;
    if options.target.print {
        print!("{}", plan.describe());
        return Ok(());
    }
    install::check_host(paths)?;
    plan.apply()
}

fn uninstall(role: install::Role, target: &install::Target) -> anyhow::Result<()> {
    let paths = install::Paths::of(role, target)?;
    let plan = install::uninstall(&paths);
    if target.print {
        print!("{}", plan.describe());
        return Ok(());
    }
    install::check_host(&paths)?;
    plan.apply()
}

/// `outpost up` listens on loopback only.
fn base_config(up: bool) -> Config {
    if up {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8980)),
            ..Config::default()
        }
    } else {
        Config::default()
    }
}

/// Sets up logging and the runtime, runs `work`, and maps its outcome to an
/// exit code.
fn launch(log: &str, work: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    if let Err(e) = logging::init(log) {
        eprintln!("outpost: {e:#}");
        return ExitCode::from(2);
    }
    raise_open_file_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("outpost: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        // Once, on stderr (the journal, for a service), not also as a log
        // line.
        Err(e) => {
            eprintln!("outpost: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn agent_main(args: &AgentArgs) -> ExitCode {
    let config = match args.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("outpost: {e:#}");
            return ExitCode::from(2);
        }
    };
    if args.print_config {
        print!("{}", config.to_yaml());
        return ExitCode::SUCCESS;
    }
    let args = args.clone();
    ignore_sighup_until_reload_is_ready();
    launch(&config.log.clone(), async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        let agent = outpost_agent::Agent::start(config).await?;
        let control = agent.control();
        let watch = args.watch_config.then(|| args.config.clone()).flatten();
        reload::start(watch, move || {
            let (args, control) = (args.clone(), control.clone());
            async move {
                let config = args.resolve()?;
                logging::check(&config.log)?;
                let reloaded = control.reload(config.clone()).await?;
                if reloaded.applied("log") {
                    logging::set_filter(&config.log)?;
                }
                Ok(reloaded)
            }
        })?;
        supervisor::ready("running");
        supervisor::watchdog();
        agent.run(shutdown).await
    })
}

async fn run_coordinator(args: CoordinatorArgs, config: Config, up: bool) -> anyhow::Result<()> {
    let data_dir = config.data_dir.clone();
    let log = config.log.clone();
    let running = std::sync::Arc::new(std::sync::Mutex::new(config.clone()));
    let coordinator = Coordinator::bind(config).await?;
    let live = Live {
        auth: coordinator.auth(),
        tls: coordinator.tls(),
    };
    let addr = coordinator.local_addr()?;
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    let watch = args.watch_config.then(|| args.config.clone()).flatten();
    reload::start(watch, move || {
        let (args, running, live) = (args.clone(), std::sync::Arc::clone(&running), live.clone());
        async move { reload_coordinator(&args, &running, &live, up) }
    })?;
    supervisor::ready(&format!("serving on {addr}"));
    supervisor::watchdog();
    let mut agent = None;
    if up {
        let agent_config = outpost_agent::Config {
            coordinator: format!("grpc://{addr}"),
            work_dir: data_dir.join("agent"),
            log,
            ..outpost_agent::Config::default()
        };
        agent = Some(tokio::spawn(outpost_agent::run(
            agent_config,
            shutdown.clone(),
        )));
        println!(
            "Outpost is running: a coordinator on {addr} and an agent on this machine.\n\
             Add these lines to your project's .bazelrc:\n\n\
             build --remote_executor=grpc://{addr}\n\
             build --remote_timeout=3600\n\n\
             Or, to share only a cache:\n\n\
             build --remote_cache=grpc://{addr}\n\n\
             Press Ctrl-C to stop."
        );
    }
    let served = coordinator.serve(shutdown).await;
    if let Some(agent) = agent {
        agent.await??;
    }
    served
}

/// Settings the coordinator takes from a reloaded configuration; the
/// others need a restart. The TLS files are among them only while TLS is
/// on: turning it on or off needs a restart.
const COORDINATOR_RELOADABLE: &[&str] = &["log", "client_tokens", "agent_tokens"];
const TLS_KEYS: &[&str] = &["tls_cert", "tls_key", "tls_client_ca"];

/// What a reload can change in a running coordinator.
#[derive(Clone)]
struct Live {
    auth: outpost_coordinator::auth::Auth,
    tls: Option<outpost_coordinator::tls::Tls>,
}

/// Everything that can fail is read before anything is put in force, so a
/// bad file changes nothing.
fn reload_coordinator(
    args: &CoordinatorArgs,
    running: &std::sync::Mutex<Config>,
    live: &Live,
    up: bool,
) -> anyhow::Result<Reloaded> {
    let new = args.resolve(base_config(up))?;
    logging::check(&new.log)?;
    // Token and certificate files are read again even when their paths
    // did not change.
    let tokens = outpost_coordinator::auth::Tokens::load(
        new.client_tokens.as_deref(),
        new.agent_tokens.as_deref(),
    )?;
    let tls = match (&live.tls, new.tls_files()?) {
        (Some(tls), Some(files)) => Some((tls, tls.prepare(&files)?)),
        _ => None,
    };
    let mut reloadable = COORDINATOR_RELOADABLE.to_vec();
    if tls.is_some() {
        reloadable.extend_from_slice(TLS_KEYS);
    }
    let mut running = running.lock().unwrap_or_else(|e| e.into_inner());
    let reloaded = Reloaded::between(&running.to_yaml(), &new.to_yaml(), &reloadable);
    if reloaded.applied("log") {
        logging::set_filter(&new.log)?;
        running.log = new.log;
    }
    if let Some((tls, prepared)) = tls {
        tls.put_in_force(prepared);
        tracing::info!("TLS certificates in force for new connections");
        running.tls_cert = new.tls_cert;
        running.tls_key = new.tls_key;
        running.tls_client_ca = new.tls_client_ca;
    }
    tracing::info!(
        tokens = tokens.as_ref().map_or(0, |t| t.len()),
        open = tokens.is_none(),
        "tokens in force"
    );
    live.auth.replace(tokens);
    running.client_tokens = new.client_tokens;
    running.agent_tokens = new.agent_tokens;
    Ok(reloaded)
}

/// A SIGHUP (a reload) that arrives while a daemon still starts (opening
/// storage, probing the sandbox) must not end it: it is ignored until
/// `reload::start` installs the real handler.
fn ignore_sighup_until_reload_is_ready() {
    // No other thread exists yet.
    if let Err(e) = outpost_sandbox::signals::ignore(nix::sys::signal::Signal::SIGHUP) {
        eprintln!("outpost: cannot ignore SIGHUP during start-up: {e}");
    }
}

/// First SIGINT/SIGTERM: graceful shutdown. Second: exit at once.
async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    for round in 0..2 {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        if round == 0 {
            tracing::info!("signal received: shutting down (signal again to exit at once)");
            supervisor::stopping("shutting down: finishing work in flight");
            shutdown.cancel();
        } else {
            std::process::exit(130);
        }
    }
}

/// Uploads hold files open; the usual soft limit of 1024 is too low.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let target = hard.min(1 << 20);
        if soft < target
            && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, target, hard)
        {
            tracing::warn!(error = %e, "cannot raise the open file limit");
        }
    }
}
