//! The `outpost` command: parses flags and config, sets up logging and the
//! runtime, and hands over to the coordinator library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

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
    /// Run the coordinator: the REAPI endpoint, CAS and Action Cache.
    Coordinator(CoordinatorArgs),
    /// Try Outpost on this machine: a coordinator on 127.0.0.1:8980 with its
    /// data in ./outpost-data, and the .bazelrc lines to use it.
    Up(CoordinatorArgs),
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
        config.validate()?;
        Ok(config)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (args, up) = match &cli.command {
        Command::Coordinator(args) => (args, false),
        Command::Up(args) => (args, true),
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
    if let Err(e) = init_logging(&config.log) {
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
    match runtime.block_on(run_coordinator(config, up)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("outpost: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_coordinator(config: Config, up: bool) -> anyhow::Result<()> {
    let coordinator = Coordinator::bind(config).await?;
    let addr = coordinator.local_addr()?;
    if up {
        println!(
            "Outpost is running. Add these lines to your project's .bazelrc:\n\n\
             build --remote_cache=grpc://{addr}\n\
             build --remote_timeout=60\n\n\
             Press Ctrl-C to stop."
        );
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    coordinator.serve(shutdown).await
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
