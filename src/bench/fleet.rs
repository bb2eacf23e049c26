//! fleet: simulated agents on Outpost's fleet protocol. Measures what a
//! large idle fleet costs the coordinator, and the cost of scheduling one
//! action with a short and with a deep queue.
//!
//! The deep queue is made of actions only a "filler" agent could run, and it
//! is busy with the first of them forever; the measured actions go to the
//! other simulated agents, which answer every lease at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use outpost_proto::client::Transport as Channel;
use outpost_proto::fleet::fleet_client::FleetClient;
use outpost_proto::fleet::{
    self, agent_message::Kind as ToCoordinator, coordinator_message::Kind as FromCoordinator,
};
use outpost_proto::reapi::{self, execution_client::ExecutionClient};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::exec::{execute, run_id, trivial_actions};
use super::report::Report;
use super::{BenchArgs, channels};

const MEASURED: usize = 200;
const SHALLOW: usize = 100;

fn prop(name: &str, value: &str) -> reapi::platform::Property {
    reapi::platform::Property {
        name: name.to_owned(),
        value: value.to_owned(),
    }
}

/// One simulated agent: registers, heartbeats, and (if `answer`) completes
/// every lease at once with exit code 0.
async fn agent(
    channel: Channel,
    id: String,
    properties: Vec<reapi::platform::Property>,
    answer: bool,
    registered: mpsc::Sender<()>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel(64);
    let send = |kind| fleet::AgentMessage { kind: Some(kind) };
    tx.send(send(ToCoordinator::Register(fleet::Register {
        protocol_version: outpost_proto::FLEET_PROTOCOL_VERSION,
        agent_id: id.clone(),
        hostname: "bench".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        capabilities: Some(fleet::Capabilities {
            properties,
            slots: 4,
            cpus: 4,
            ..Default::default()
        }),
        running_leases: Vec::new(),
        process_id: format!("{:032x}", rand::random::<u128>()),
    })))
    .await?;
    let mut inbound = FleetClient::new(channel)
        .join(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .context("Fleet.Join")?
        .into_inner();
    let mut interval = Duration::from_secs(5);
    let mut heartbeat = tokio::time::interval(interval);
    loop {
        tokio::select! {
            msg = inbound.message() => match msg.context("fleet stream")?.and_then(|m| m.kind) {
                Some(FromCoordinator::Registered(r)) => {
                    interval = r.heartbeat_interval.and_then(|d| Duration::try_from(d).ok()).unwrap_or(interval);
                    heartbeat = tokio::time::interval(interval);
                    let _ = registered.send(()).await;
                }
                Some(FromCoordinator::Lease(lease)) if answer => {
                    tx.send(send(ToCoordinator::LeaseResult(fleet::LeaseResult {
                        lease_id: lease.lease_id,
                        outcome: Some(fleet::lease_result::Outcome::Result(reapi::ActionResult::default())),
                        retryable: false,
                        timed_out: false,
                        message: String::new(),
                        ..Default::default()
                    })))
                    .await?;
                }
                Some(_) => {}
                None => return Ok(()),
            },
            _ = heartbeat.tick() => {
                tx.send(send(ToCoordinator::Heartbeat(fleet::Heartbeat { busy_slots: 0, ..Default::default() }))).await?;
            }
            () = stop.cancelled() => return Ok(()),
        }
    }
}

/// (CPU ticks, RSS bytes) of a process, from /proc.
fn usage(pid: u32) -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 of stat; after ')' they are 11 and 12.
    let ticks = fields
        .get(11)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    Ok((ticks, rss_kb * 1024))
}

/// Queues `n` actions no free agent can take, each through Execute whose
/// stream is dropped once the action is QUEUED.
async fn fill_queue(
    args: &BenchArgs,
    chans: &[Channel],
    n: usize,
    platform: Vec<reapi::platform::Property>,
) -> anyhow::Result<()> {
    let actions = trivial_actions(args, &chans[0], n, platform).await?;
    let queue = Arc::new(tokio::sync::Mutex::new(actions));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..64 {
        let mut client = ExecutionClient::new(chans[i % chans.len()].clone());
        let queue = Arc::clone(&queue);
        let instance = args.instance_name.clone();
        tasks.spawn(async move {
            loop {
                let Some(action) = queue.lock().await.pop() else {
                    return anyhow::Ok(());
                };
                let mut stream = client
                    .execute(reapi::ExecuteRequest {
                        instance_name: instance.clone(),
                        action_digest: Some(action.to_proto()),
                        skip_cache_lookup: true,
                        ..Default::default()
                    })
                    .await
                    .context("Execute (filler)")?
                    .into_inner();
                stream.message().await.context("Execute (filler)")?;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

async fn measure(
    args: &BenchArgs,
    channel: &Channel,
    platform: Vec<reapi::platform::Property>,
) -> anyhow::Result<Vec<Duration>> {
    let actions = trivial_actions(args, channel, MEASURED, platform).await?;
    let mut client = ExecutionClient::new(channel.clone());
    let mut samples = Vec::new();
    for action in actions {
        let started = Instant::now();
        execute(&mut client, &args.instance_name, action).await?;
        samples.push(started.elapsed());
    }
    Ok(samples)
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<Report> {
    let run = run_id().to_string();
    let chans = channels(args, 16).await?;
    let stop = CancellationToken::new();
    let (registered, mut ready) = mpsc::channel(args.agents + 1);
    let mut agents = tokio::task::JoinSet::new();
    let workers = vec![prop("OSFamily", "linux"), prop("bench-fleet", &run)];
    for i in 0..args.agents {
        agents.spawn(agent(
            chans[i % chans.len()].clone(),
            format!("bench-{run}-{i}"),
            workers.clone(),
            true,
            registered.clone(),
            stop.clone(),
        ));
    }
    agents.spawn(agent(
        chans[0].clone(),
        format!("bench-{run}-filler"),
        vec![prop("bench-filler", &run)],
        false,
        registered.clone(),
        stop.clone(),
    ));
    let started = Instant::now();
    for _ in 0..=args.agents {
        tokio::time::timeout(Duration::from_secs(120), ready.recv())
            .await
            .context("simulated agents did not all register within 120s")?;
    }
    let mut report = Report::new("fleet");
    report.add("agents", args.agents).add(
        "register_s",
        format!("{:.2}", started.elapsed().as_secs_f64()),
    );

    if let Some(pid) = args.coordinator_pid {
        let (t0, _) = usage(pid)?;
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(args.idle_seconds)).await;
        let (t1, rss) = usage(pid)?;
        let ticks_per_s = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64;
        let cpu = (t1 - t0) as f64 / ticks_per_s / started.elapsed().as_secs_f64() * 100.0;
        report
            .add("idle_cpu_pct", format!("{cpu:.2}"))
            .add("idle_rss_mb", format!("{:.1}", rss as f64 / 1e6));
    }

    let filler = vec![prop("bench-filler", &run)];
    fill_queue(args, &chans, SHALLOW, filler.clone()).await?;
    let mut shallow = measure(args, &chans[1], workers.clone()).await?;
    report.percentiles(&format!("q{SHALLOW}"), &mut shallow);
    let started = Instant::now();
    fill_queue(
        args,
        &chans,
        args.deep_queue.saturating_sub(SHALLOW),
        filler,
    )
    .await?;
    report.add("fill_s", format!("{:.1}", started.elapsed().as_secs_f64()));
    let mut deep = measure(args, &chans[1], workers).await?;
    report.percentiles(&format!("q{}", args.deep_queue), &mut deep);
    if let Some(pid) = args.coordinator_pid {
        report.add("deep_rss_mb", format!("{:.1}", usage(pid)?.1 as f64 / 1e6));
    }
    stop.cancel();
    while agents.join_next().await.is_some() {}
    Ok(report)
}
