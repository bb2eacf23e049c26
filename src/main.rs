//! The `outpost` command: parses flags and config, sets up logging and the
//! runtime, and hands over to the coordinator library.

use std::net::SocketAddr;
use std::process::ExitCode;

mod admin;
mod args;
mod bench;
mod credentials;
mod install;
mod logging;
mod logs;
mod reload;
mod supervisor;

use clap::{Args, Parser, Subcommand};

use args::{AgentArgs, CoordinatorArgs};
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
