//! exec-latency, exec-throughput and ac-hit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use outpost_proto::client::Transport as Channel;
use outpost_proto::digest::{Digest, Function};
use outpost_proto::longrunning;
use outpost_proto::reapi::{
    self, action_cache_client::ActionCacheClient,
    content_addressable_storage_client::ContentAddressableStorageClient,
    execution_client::ExecutionClient,
};
use prost::Message;

use super::report::Report;
use super::{BenchArgs, channels};

/// Distinct from every earlier run, so nothing is served from a cache.
pub fn run_id() -> u64 {
    rand::random()
}

/// Uploads small blobs with batch calls.
pub async fn put_all(
    cas: &mut ContentAddressableStorageClient<Channel>,
    instance: &str,
    blobs: Vec<(Digest, Bytes)>,
) -> anyhow::Result<()> {
    let mut batch = Vec::new();
    let mut size = 0;
    let send = |batch: Vec<(Digest, Bytes)>| {
        let mut cas = cas.clone();
        let instance = instance.to_owned();
        async move {
            let response = cas
                .batch_update_blobs(reapi::BatchUpdateBlobsRequest::of(&instance, 0, batch))
                .await
                .context("BatchUpdateBlobs")?;
            for r in response.into_inner().responses {
                if let Some(s) = r.status
                    && s.code != 0
                {
                    anyhow::bail!("upload refused: {}", s.message);
                }
            }
            Ok(())
        }
    };
    for (d, data) in blobs {
        if size + data.len() > 2 << 20 {
            send(std::mem::take(&mut batch)).await?;
            size = 0;
        }
        size += data.len();
        batch.push((d, data));
    }
    if !batch.is_empty() {
        send(batch).await?;
    }
    Ok(())
}

fn message<M: Message>(m: &M) -> (Digest, Bytes) {
    let bytes = Bytes::from(m.encode_to_vec());
    (Function::Sha256.digest_of(&bytes), bytes)
}

/// Uploads `n` distinct trivial actions; returns their digests.
pub async fn trivial_actions(
    args: &BenchArgs,
    channel: &Channel,
    n: usize,
    platform: Vec<reapi::platform::Property>,
) -> anyhow::Result<Vec<Digest>> {
    let command = reapi::Command {
        arguments: vec!["/bin/true".into()],
        environment_variables: vec![reapi::command::EnvironmentVariable {
            name: "PATH".into(),
            value: "/usr/bin:/bin".into(),
        }],
        ..Default::default()
    };
    let (command_digest, command_bytes) = message(&command);
    let root = Function::Sha256.empty();
    let run = run_id();
    let mut blobs = vec![(command_digest, command_bytes)];
    let mut actions = Vec::with_capacity(n);
    for i in 0..n {
        let action = reapi::Action {
            command_digest: Some(command_digest.to_proto()),
            input_root_digest: Some(root.to_proto()),
            salt: Bytes::from(format!("{run}-{i}")),
            platform: Some(reapi::Platform {
                properties: platform.clone(),
            }),
            ..Default::default()
        };
        let (d, bytes) = message(&action);
        actions.push(d);
        blobs.push((d, bytes));
    }
    put_all(
        &mut ContentAddressableStorageClient::new(channel.clone()),
        &args.instance_name,
        blobs,
    )
    .await?;
    Ok(actions)
}

/// Runs one action to completion; fails unless it exited 0. Returns what
/// the server said about where the time went, if it said.
pub async fn execute(
    client: &mut ExecutionClient<Channel>,
    instance: &str,
    action: Digest,
) -> anyhow::Result<Option<reapi::ExecutedActionMetadata>> {
    let mut stream = client
        .execute(reapi::ExecuteRequest {
            instance_name: instance.to_owned(),
            action_digest: Some(action.to_proto()),
            skip_cache_lookup: true,
            ..Default::default()
        })
        .await
        .context("Execute")?
        .into_inner();
    while let Some(op) = stream.message().await.context("Execute stream")? {
        if !op.done {
            continue;
        }
        let Some(longrunning::operation::Result::Response(any)) = op.result else {
            anyhow::bail!("operation {} finished without a response", op.name);
        };
        let response = reapi::ExecuteResponse::decode(any.value.as_slice())?;
        if let Some(s) = response.status
            && s.code != 0
        {
            anyhow::bail!("action failed: {}", s.message);
        }
        let exit = response.result.as_ref().map_or(-1, |r| r.exit_code);
        anyhow::ensure!(exit == 0, "action exited with {exit}");
        return Ok(response.result.and_then(|r| r.execution_metadata));
    }
    anyhow::bail!("the Execute stream ended early")
}

pub async fn latency(args: &BenchArgs) -> anyhow::Result<Report> {
    let channel = channels(args, 1).await?.remove(0);
    let warmup = 10.min(args.count);
    let actions = trivial_actions(args, &channel, args.count + warmup, args.properties()?).await?;
    let mut client = ExecutionClient::new(channel);
    let mut samples = Vec::with_capacity(args.count);
    let mut phases = Phases::default();
    for (i, action) in actions.into_iter().enumerate() {
        let started = Instant::now();
        let meta = execute(&mut client, &args.instance_name, action).await?;
        if i >= warmup {
            let took = started.elapsed();
            samples.push(took);
            if let Some(m) = meta {
                phases.add(&m, took);
            }
        }
    }
    let mut report = Report::new("exec-latency");
    report.add("n", args.count).percentiles("", &mut samples);
    phases.report(&mut report);
    Ok(report)
}

/// Where each action's time went, from the timestamps the server puts in
/// `ExecutedActionMetadata` (servers that leave them out get no figures).
#[derive(Default)]
struct Phases {
    /// Queued until a worker took it.
    queued: Vec<Duration>,
    /// Worker start until the command started: inputs, layout, sandbox.
    prepare: Vec<Duration>,
    /// The command itself.
    run: Vec<Duration>,
    /// The command's end until the worker was done: outputs uploaded.
    upload: Vec<Duration>,
    /// Everything outside: the client, the network, the server's handling
    /// of Execute before queueing and of the result after the worker.
    rest: Vec<Duration>,
}

impl Phases {
    fn add(&mut self, m: &reapi::ExecutedActionMetadata, total: Duration) {
        fn at<T: Clone>(t: &Option<T>) -> Option<std::time::SystemTime>
        where
            std::time::SystemTime: TryFrom<T>,
        {
            t.clone()
                .and_then(|t| std::time::SystemTime::try_from(t).ok())
        }
        let (Some(queued), Some(start), Some(exec), Some(done), Some(end)) = (
            at(&m.queued_timestamp),
            at(&m.worker_start_timestamp),
            at(&m.execution_start_timestamp),
            at(&m.execution_completed_timestamp),
            at(&m.worker_completed_timestamp),
        ) else {
            return;
        };
        let between = |a: std::time::SystemTime, b: std::time::SystemTime| {
            b.duration_since(a).unwrap_or_default()
        };
        self.queued.push(between(queued, start));
        self.prepare.push(between(start, exec));
        self.run.push(between(exec, done));
        self.upload.push(between(done, end));
        self.rest.push(total.saturating_sub(between(queued, end)));
    }

    /// Adds the median of each phase: `queued_p50_ms=...`.
    fn report(mut self, report: &mut Report) {
        for (name, samples) in [
            ("queued", &mut self.queued),
            ("prepare", &mut self.prepare),
            ("run", &mut self.run),
            ("upload", &mut self.upload),
            ("rest", &mut self.rest),
        ] {
            if samples.is_empty() {
                continue;
            }
            samples.sort_unstable();
            report.add(
                &format!("{name}_p50_ms"),
                format!(
                    "{:.2}",
                    super::report::ms(super::report::percentile(samples, 50))
                ),
            );
        }
    }
}

pub async fn throughput(args: &BenchArgs) -> anyhow::Result<Report> {
    let channels = channels(args, 4).await?;
    let actions = trivial_actions(args, &channels[0], args.count, args.properties()?).await?;
    let queue = Arc::new(tokio::sync::Mutex::new(actions));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for i in 0..args.concurrency.max(1) {
        let mut client = ExecutionClient::new(channels[i % channels.len()].clone());
        let queue = Arc::clone(&queue);
        let instance = args.instance_name.clone();
        workers.spawn(async move {
            loop {
                let Some(action) = queue.lock().await.pop() else {
                    return anyhow::Ok(());
                };
                execute(&mut client, &instance, action).await?;
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done??;
    }
    let took = started.elapsed();
    let mut report = Report::new("exec-throughput");
    report
        .add("n", args.count)
        .add("c", args.concurrency)
        .add(
            "actions_per_s",
            format!("{:.0}", args.count as f64 / took.as_secs_f64()),
        )
        .add("seconds", format!("{:.2}", took.as_secs_f64()));
    Ok(report)
}

pub async fn ac_hit(args: &BenchArgs) -> anyhow::Result<Report> {
    let channels = channels(args, 4).await?;
    let run = run_id();
    let output = Bytes::from(format!("bench output {run}"));
    let output_digest = Function::Sha256.digest_of(&output);
    let action = Function::Sha256.digest_of(format!("bench action {run}").as_bytes());
    put_all(
        &mut ContentAddressableStorageClient::new(channels[0].clone()),
        &args.instance_name,
        vec![(output_digest, output)],
    )
    .await?;
    ActionCacheClient::new(channels[0].clone())
        .update_action_result(reapi::UpdateActionResultRequest {
            instance_name: args.instance_name.clone(),
            action_digest: Some(action.to_proto()),
            action_result: Some(reapi::ActionResult {
                output_files: vec![reapi::OutputFile {
                    path: "out".into(),
                    digest: Some(output_digest.to_proto()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .context("UpdateActionResult")?;
    let remaining = Arc::new(std::sync::atomic::AtomicUsize::new(args.count));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    let mut samples = Vec::new();
    for i in 0..args.concurrency.max(1) {
        let mut client = ActionCacheClient::new(channels[i % channels.len()].clone());
        let remaining = Arc::clone(&remaining);
        let request = reapi::GetActionResultRequest {
            instance_name: args.instance_name.clone(),
            action_digest: Some(action.to_proto()),
            ..Default::default()
        };
        workers.spawn(async move {
            let mut took = Vec::new();
            while remaining
                .fetch_update(
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                    |n| n.checked_sub(1),
                )
                .is_ok()
            {
                let t = Instant::now();
                client
                    .get_action_result(request.clone())
                    .await
                    .context("GetActionResult")?;
                took.push(t.elapsed());
            }
            anyhow::Ok(took)
        });
    }
    while let Some(done) = workers.join_next().await {
        samples.extend(done??);
    }
    let took = started.elapsed();
    let mut report = Report::new("ac-hit");
    report
        .add("n", args.count)
        .add("c", args.concurrency)
        .add(
            "hits_per_s",
            format!("{:.0}", args.count as f64 / took.as_secs_f64()),
        )
        .percentiles("", &mut samples);
    Ok(report)
}
