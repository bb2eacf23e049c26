//! The `outpost` command: parses flags and config, sets up logging and the
//! runtime, and hands over to the coordinator library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

mod admin;
mod bench;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use outpost_coordinator::config::{ByteSize, Span};
use outpost_coordinator::{Config, Coordinator};
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
enum Command {
    /// Run the coordinator: the REAPI endpoint, CAS, Action Cache and queue.
    Coordinator(CoordinatorArgs),
    /// Run an agent: dial out to a coordinator and run the actions it leases.
    Agent(AgentArgs),
    /// Measure a REAPI server (Outpost or any other) with plain REAPI calls.
    Bench(bench::BenchArgs),
    #[command(flatten)]
    Admin(admin::Admin),
    /// Try Outpost on this machine: a coordinator on 127.0.0.1:8980 with its
    /// data in ./outpost-data and a local agent, and the .bazelrc lines to
    /// use them.
    Up(CoordinatorArgs),
}

#[derive(Args)]
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
    /// Log filter [default: info].
    #[arg(long, env = "OUTPOST_LOG")]
    log: Option<String>,
    /// Print the effective configuration as YAML and exit.
    #[arg(long)]
    print_config: bool,
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
        overlay(&mut config.log, self.log.clone());
        config.validate()?;
        Ok(config)
    }
}

#[derive(Args)]
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
    /// Timeout of actions that set none [default: 1h].
    #[arg(long, env = "OUTPOST_DEFAULT_ACTION_TIMEOUT")]
    default_action_timeout: Option<Span>,
    /// Longest timeout an action may ask for [default: 6h].
    #[arg(long, env = "OUTPOST_MAX_ACTION_TIMEOUT")]
    max_action_timeout: Option<Span>,
    /// Log filter, e.g. info or outpost_coordinator=debug [default: info].
    #[arg(long, env = "OUTPOST_LOG")]
    log: Option<String>,
    /// Print the effective configuration as YAML and exit.
    #[arg(long)]
    print_config: bool,
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
        overlay(&mut config.heartbeat_interval, self.heartbeat_interval);
        overlay(
            &mut config.agent_reconnect_grace,
            self.agent_reconnect_grace,
        );
        overlay(&mut config.max_attempts, self.max_attempts);
        overlay(&mut config.fleet_memory, self.fleet_memory);
        overlay(&mut config.startup_grace, self.startup_grace);
        overlay(
            &mut config.default_action_timeout,
            self.default_action_timeout,
        );
        overlay(&mut config.max_action_timeout, self.max_action_timeout);
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
    // The reaper stub runs in front of every action: no flag parsing, no
    // logging, no runtime.
    if argv.get(1).map(String::as_str) == Some("__reap") {
        let rest = argv.get(2..).unwrap_or_default();
        let rest = rest.strip_prefix(&["--".to_owned()]).unwrap_or(rest);
        let code = outpost_sandbox::reaper::main(rest);
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    let cli = Cli::parse();
    let (args, up) = match &cli.command {
        Command::Coordinator(args) => (args, false),
        Command::Up(args) => (args, true),
        Command::Agent(args) => return agent_main(args),
        Command::Bench(args) => {
            let args = args.clone();
            return launch("warn", bench::run(args));
        }
        Command::Admin(admin) => {
            let admin = admin.clone();
            return launch("warn", admin::run(admin));
        }
    };
    let base = if up {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8980)),
            ..Config::default()
        }
    } else {
        Config::default()
    };
    let config = match args.resolve(base) {
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
    launch(&config.log.clone(), run_coordinator(config, up))
}

/// Sets up logging and the runtime, runs `work`, and maps its outcome to an
/// exit code.
fn launch(log: &str, work: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    if let Err(e) = init_logging(log) {
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
        Err(e) => {
            tracing::error!("{e:#}");
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
    launch(&config.log.clone(), async {
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        outpost_agent::run(config, shutdown).await
    })
}

async fn run_coordinator(config: Config, up: bool) -> anyhow::Result<()> {
    let data_dir = config.data_dir.clone();
    let log = config.log.clone();
    let coordinator = Coordinator::bind(config).await?;
    let addr = coordinator.local_addr()?;
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
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
            shutdown.cancel();
        } else {
            std::process::exit(130);
        }
    }
}

fn init_logging(filter: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("log filter {filter:?} is not valid"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))
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
