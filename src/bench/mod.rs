//! `outpost bench`: measures any REAPI server with plain REAPI calls, so the
//! same run can be pointed at Outpost or at another server. Each scenario
//! prints one line of `key=value` figures (or JSON with `--json`).

mod cas;
mod exec;
mod fleet;
mod report;

use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use outpost_proto::client::Transport as Channel;
use outpost_proto::reapi::platform::Property;

use crate::credentials::Credentials;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Scenario {
    /// N distinct trivial actions one at a time: p50/p90/p99 of Execute to completed.
    ExecLatency,
    /// N distinct trivial actions at concurrency C: actions per second.
    ExecThroughput,
    /// Upload/download throughput for 4 KiB (batch), 1 MiB and large (ByteStream)
    /// blobs, and FindMissingBlobs latency for 10,000 digests.
    Cas,
    /// GetActionResult hits per second at concurrency C.
    AcHit,
    /// Simulated agents on the fleet protocol (Outpost only): idle cost of a
    /// large fleet, and scheduling cost with a short and a deep queue.
    Fleet,
}

#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// The server, grpc://HOST:PORT or grpcs://HOST:PORT (TLS).
    #[arg(long, default_value = "grpc://127.0.0.1:8980")]
    pub endpoint: String,
    #[command(flatten)]
    pub credentials: Credentials,
    /// REAPI instance name.
    #[arg(long, default_value = "")]
    pub instance_name: String,
    /// Platform property for the actions, KEY=VALUE (repeatable).
    #[arg(long = "platform", value_delimiter = ',')]
    pub platform: Vec<String>,
    /// How many actions / requests.
    #[arg(short = 'n', long, default_value_t = 500)]
    pub count: usize,
    /// Requests in flight at once.
    #[arg(short = 'c', long, default_value_t = 32)]
    pub concurrency: usize,
    /// Size of the large ByteStream blob in MiB (cas).
    #[arg(long, default_value_t = 256)]
    pub large_mib: usize,
    /// Simulated agents (fleet).
    #[arg(long, default_value_t = 1000)]
    pub agents: usize,
    /// Depth of the deep queue (fleet).
    #[arg(long, default_value_t = 100_000)]
    pub deep_queue: usize,
    /// Seconds to watch an idle fleet (fleet).
    #[arg(long, default_value_t = 10)]
    pub idle_seconds: u64,
    /// The coordinator's process id, to read its RSS and CPU (fleet; same machine only).
    #[arg(long)]
    pub coordinator_pid: Option<u32>,
    /// Print JSON instead of key=value.
    #[arg(long)]
    pub json: bool,
}

impl BenchArgs {
    pub fn properties(&self) -> anyhow::Result<Vec<Property>> {
        self.platform
            .iter()
            .map(|p| {
                let (name, value) = p
                    .split_once('=')
                    .with_context(|| format!("--platform {p:?} must look like KEY=VALUE"))?;
                Ok(Property {
                    name: name.to_owned(),
                    value: value.to_owned(),
                })
            })
            .collect()
    }
}

/// Channels to the endpoint: several, so concurrency is not capped by one
/// HTTP/2 connection.
pub async fn channels(args: &BenchArgs, n: usize) -> anyhow::Result<Vec<Channel>> {
    let dial = args.credentials.dial(&args.endpoint);
    let bearer = dial.bearer()?;
    let mut out = Vec::new();
    for _ in 0..n.max(1) {
        let channel = dial
            .endpoint()?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(10))
            .initial_connection_window_size(Some(16 << 20))
            .initial_stream_window_size(Some(8 << 20))
            .max_frame_size(Some(1 << 20))
            .connect()
            .await
            .with_context(|| format!("cannot connect to {}", args.endpoint))?;
        out.push(Channel::new(channel, bearer.clone()));
    }
    Ok(out)
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let report: report::Report = match args.scenario {
        Scenario::ExecLatency => exec::latency(&args).await?,
        Scenario::ExecThroughput => exec::throughput(&args).await?,
        Scenario::Cas => cas::run(&args).await?,
        Scenario::AcHit => exec::ac_hit(&args).await?,
        Scenario::Fleet => fleet::run(&args).await?,
    };
    println!(
        "{}",
        if args.json {
            report.json()
        } else {
            report.line()
        }
    );
    Ok(())
}
