//! Persistent workers: a runner lifetime over any backend. A worker action
//! (see [`plan`]) is sent, as a Bazel `WorkRequest`, to a long-lived worker
//! process started from its command, instead of starting the command
//! afresh; the response's exit code and `output` (as stderr) become the
//! action's, its outputs are collected as for any action.
//!
//! - [`protocol`]: the proto and JSON framings;
//! - [`flagfiles`]: splitting the argv and expanding `@flagfile`s as
//!   Bazel's worker runner does;
//! - [`mirror`]: each request's inputs copied into the worker's own
//!   directory (what replaces per-action read-only cache links);
//! - [`process`]: one worker process, started through a backend.
//!
//! Workers are pooled by a key covering the action's warm key (instance,
//! platform, client), the start command, the environment, the working
//! directory, the isolation asked for and the digests of the tool files
//! the start command names: a changed tool gets a new worker. Caps: live
//! workers per key, requests per worker, idle time, idle workers in all.
//! A worker that dies, hangs past the action's timeout, or answers
//! garbage or too much is stopped and never reused, and the caller runs
//! the action once as a plain command. Worker processes die with the agent
//! (they hang off the spawner like any action; a Docker worker is a
//! container the backend removes, at the latest when the agent starts
//! again).

pub mod flagfiles;
pub mod mirror;
pub mod process;
pub mod protocol;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use outpost_proto::blaze::worker::{Input, WorkRequest};
use outpost_proto::digest::Digest;
use outpost_proto::platform::Parsed;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;

use super::{RunOptions, Runners, Workspace};
use crate::cache::Cache;
use crate::error::Error;
use process::{Failed, Start, Worker};
use protocol::Framing;

/// The pool's caps (agent settings `worker_*`).
#[derive(Clone, Debug)]
pub struct Caps {
    /// Live workers per key; an action finding them all busy runs plain.
    pub per_key: usize,
    /// Requests one worker serves before it is replaced (0: no bound).
    pub requests: u64,
    /// How long an idle worker is kept.
    pub idle: Duration,
    /// Idle workers kept in all; past it the least recently used goes.
    pub idle_total: usize,
    /// Bytes of one response.
    pub response: usize,
}

/// Counters of warm execution, registered under `outpost_agent_warm_*`.
#[derive(Clone, Default)]
pub struct Metrics {
    /// Warm hits and misses, by kind (`worker`).
    pub requests: Family<WarmLabels, Counter>,
    /// Workers or runners given up, by reason.
    pub evictions: Family<ReasonLabels, Counter>,
    /// Worker processes alive now (idle or busy).
    pub live_workers: Gauge,
    /// Idle workers in the pool now.
    pub pool_size: Gauge,
    /// Recycled runners' workspaces kept now, and their bytes on disk.
    pub kept_runners: Gauge,
    pub kept_runner_bytes: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WarmLabels {
    pub kind: &'static str,
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub kind: &'static str,
    pub reason: &'static str,
}

impl Metrics {
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "warm_requests",
            "Actions that asked for warm execution, by kind and whether one was warm (hit, miss)",
            self.requests.clone(),
        );
        registry.register(
            "warm_evictions",
            "Persistent workers and recycled runners given up, by kind and reason",
            self.evictions.clone(),
        );
        registry.register(
            "live_workers",
            "Persistent worker processes alive",
            self.live_workers.clone(),
        );
        registry.register(
            "worker_pool_size",
            "Idle persistent workers kept for the next action",
            self.pool_size.clone(),
        );
        registry.register(
            "kept_runners",
            "Workspaces of recycle-runner actions kept for the next action of their key",
            self.kept_runners.clone(),
        );
        registry.register(
            "kept_runner_bytes",
            "Bytes the kept workspaces take on disk",
            self.kept_runner_bytes.clone(),
        );
    }

    fn evicted(&self, reason: &'static str) {
        self.evictions
            .get_or_create(&ReasonLabels {
                kind: "worker",
                reason,
            })
            .inc();
    }
}

/// One worker action, as [`plan`] read it.
pub struct Job {
    key: String,
    warm_key: String,
    start: Vec<String>,
    framing: Framing,
    request: WorkRequest,
}

/// Reads whether an action is a worker action and, if it is, what its
/// worker and request are. `argv`, `env` and `workdir` are the Command's;
/// `isolation` is how it runs (its run options, as text); `root` holds the
/// laid-out inputs, `inputs` their digests. None: the
/// action runs plain (it asks for no worker, came without a warm key, or
/// has no flagfile argument). A flagfile that cannot be read is the
/// action's error, as it would be for Bazel.
#[allow(clippy::too_many_arguments)]
pub fn plan(
    parsed: &Parsed,
    warm_key: &str,
    argv: &[String],
    env: &[String],
    workdir: &Path,
    isolation: &str,
    root: &Path,
    inputs: &[(PathBuf, Digest)],
) -> Result<Option<Job>, Error> {
    if !outpost_proto::warm::wants_worker(parsed) || warm_key.is_empty() {
        return Ok(None);
    }
    let framing =
        Framing::parse(parsed.get("persistentWorkerProtocol")).map_err(Error::BadInput)?;
    let Some((start, flagfiles)) = flagfiles::split(argv) else {
        return Ok(None);
    };
    let arguments = flagfiles::expand(&root.join(workdir), &flagfiles).map_err(Error::BadInput)?;
    let by_path: HashMap<&Path, &Digest> = inputs.iter().map(|(p, d)| (p.as_path(), d)).collect();
    // The files the start command names, by digest: a new compiler is a
    // new worker even under the same persistentWorkerKey.
    let tools: Vec<String> = start
        .iter()
        .filter_map(|a| {
            let path = workdir.join(a);
            by_path.get(path.as_path()).map(|d| format!("{a}={d}"))
        })
        .collect();
    let mut env_sorted = env.to_vec();
    env_sorted.sort();
    let workdir_text = workdir.to_string_lossy();
    let counts = [start.len(), env_sorted.len(), tools.len()].map(|n| n.to_string());
    let key = outpost_proto::warm::fingerprint(
        [warm_key, framing.name(), &workdir_text, isolation]
            .into_iter()
            .chain(counts.iter().map(String::as_str))
            .chain(start.iter().map(String::as_str))
            .chain(env_sorted.iter().map(String::as_str))
            .chain(tools.iter().map(String::as_str)),
    );
    let request = WorkRequest {
        arguments,
        inputs: inputs
            .iter()
            .map(|(path, d)| Input {
                // Relative to the root, as Bazel names them (its execroot).
                path: path.to_string_lossy().into_owned(),
                digest: d.hash_hex().into_bytes().into(),
            })
            .collect(),
        ..Default::default()
    };
    Ok(Some(Job {
        key,
        warm_key: warm_key.to_owned(),
        start,
        framing,
        request,
    }))
}

/// What came of sending an action to a worker.
pub enum Outcome {
    /// The worker answered: the action's exit code, and its `output`.
    Answered { exit_code: i32, output: String },
    /// No worker could take it (all busy at the per-key cap): run plain.
    Busy,
    /// The worker failed and is gone: run plain once; the reason (with the
    /// worker's stderr) for the action's stderr.
    Broken(String),
}

/// What a worker action runs with, besides its [`Job`].
pub struct Request<'a> {
    pub env: Vec<String>,
    pub workdir: &'a Path,
    pub options: RunOptions,
    /// The action's root, inputs laid out; outputs are moved into it.
    pub root: &'a Path,
    pub outputs: Vec<PathBuf>,
    pub timeout: Duration,
}

struct Pool {
    idle: Vec<Worker>,
    /// Live workers per key, idle or busy.
    live: HashMap<String, usize>,
}

/// The agent's persistent workers.
pub struct Workers {
    caps: Mutex<Caps>,
    pool: Mutex<Pool>,
    pub metrics: Metrics,
    /// Worker workspaces go here, named `worker-N`.
    dir: PathBuf,
    cache: Cache,
    next: std::sync::atomic::AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Workers {
    pub fn new(caps: Caps, dir: PathBuf, cache: Cache) -> Workers {
        Workers {
            caps: Mutex::new(caps),
            pool: Mutex::new(Pool {
                idle: Vec::new(),
                live: HashMap::new(),
            }),
            metrics: Metrics::default(),
            dir,
            cache,
            next: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Takes the caps of a reloaded configuration.
    pub fn set_caps(&self, caps: Caps) {
        *lock(&self.caps) = caps;
        self.expire(Instant::now());
    }

    /// The warm keys of the idle workers, for the coordinator.
    pub fn warm_keys(&self) -> Vec<String> {
        let pool = lock(&self.pool);
        let mut keys: Vec<String> = pool.idle.iter().map(|w| w.warm_key.clone()).collect();
        keys.sort();
        keys.dedup();
        keys
    }

    /// Stops idle workers past the idle time or dead since they were used.
    pub fn expire(&self, now: Instant) {
        let idle = lock(&self.caps).idle;
        let mut gone = Vec::new();
        {
            let mut pool = lock(&self.pool);
            let (keep, old): (Vec<Worker>, Vec<Worker>) = std::mem::take(&mut pool.idle)
                .into_iter()
                .partition(|w| w.alive() && now.duration_since(w.last_used) < idle);
            pool.idle = keep;
            for w in old {
                let reason = if w.alive() { "idle" } else { "exited" };
                gone.push((w, reason));
            }
        }
        for (w, reason) in gone {
            self.discard(w, reason);
        }
    }

    /// Forgets a worker, which stops it.
    fn discard(&self, worker: Worker, reason: &'static str) {
        self.release_slot(&worker.key);
        self.metrics
            .pool_size
            .set(lock(&self.pool).idle.len() as i64);
        self.metrics.live_workers.dec();
        self.metrics.evicted(reason);
        tracing::debug!(key = %worker.key, served = worker.served, reason, "persistent worker stopped");
        drop(worker);
    }

    /// An idle worker for `key`, or room to start one; None when the key
    /// is at its cap.
    fn take(&self, key: &str) -> Option<Option<Worker>> {
        let per_key = lock(&self.caps).per_key;
        let mut pool = lock(&self.pool);
        // The most recently used first.
        if let Some(i) = pool.idle.iter().rposition(|w| w.key == key && w.alive()) {
            let w = pool.idle.remove(i);
            self.metrics.pool_size.set(pool.idle.len() as i64);
            return Some(Some(w));
        }
        let live = pool.live.entry(key.to_owned()).or_default();
        if *live >= per_key {
            return None;
        }
        *live += 1;
        Some(None)
    }

    /// Puts a worker that served well back, within the caps.
    fn give_back(&self, worker: Worker) {
        let caps = lock(&self.caps).clone();
        if caps.requests > 0 && worker.served >= caps.requests {
            return self.discard(worker, "requests");
        }
        if !worker.alive() {
            return self.discard(worker, "exited");
        }
        let evicted = {
            let mut pool = lock(&self.pool);
            pool.idle.push(worker);
            let excess = pool.idle.len().saturating_sub(caps.idle_total);
            // Oldest first: the pool is in order of use.
            let evicted: Vec<Worker> = pool.idle.drain(..excess).collect();
            self.metrics.pool_size.set(pool.idle.len() as i64);
            evicted
        };
        for w in evicted {
            self.discard(w, "count");
        }
    }

    /// Runs `job` in a worker of its key.
    pub async fn run(
        &self,
        runners: &Runners,
        job: Job,
        req: Request<'_>,
        cancel: &CancellationToken,
    ) -> Result<Outcome, Error> {
        // Idle workers past their time go now, not only at the heartbeat.
        self.expire(Instant::now());
        let hit = |status| WarmLabels {
            kind: "worker",
            status,
        };
        let Some(taken) = self.take(&job.key) else {
            self.metrics.requests.get_or_create(&hit("busy")).inc();
            return Ok(Outcome::Busy);
        };
        let mut worker = match taken {
            Some(w) => {
                self.metrics.requests.get_or_create(&hit("hit")).inc();
                w
            }
            None => {
                self.metrics.requests.get_or_create(&hit("miss")).inc();
                match self.start(runners, &job, &req).await {
                    Ok(w) => w,
                    Err(e) => {
                        self.release_slot(&job.key);
                        return Ok(Outcome::Broken(format!("the worker could not start: {e}")));
                    }
                }
            }
        };
        let max = lock(&self.caps).response;
        let served = worker
            .serve(
                req.root,
                &job.request,
                &req.outputs,
                max,
                req.timeout,
                cancel,
            )
            .await;
        match served {
            Ok(response) => {
                self.give_back(worker);
                Ok(Outcome::Answered {
                    exit_code: response.exit_code,
                    output: response.output,
                })
            }
            Err(Failed::Cancelled) => {
                // Mid-request: its state is unknown.
                self.discard(worker, "cancelled");
                Err(Error::Cancelled)
            }
            Err(Failed::Broken(why)) => {
                // Let its last words reach the tail before quoting it.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let tail = worker.stderr_tail(4096);
                self.discard(worker, "broken");
                let mut text = format!("the persistent worker failed: {why}");
                if !tail.trim().is_empty() {
                    text.push_str("; its stderr ends with:\n");
                    text.push_str(tail.trim_end());
                }
                Ok(Outcome::Broken(text))
            }
        }
    }

    /// One live worker of `key` fewer (stopped, or never started).
    fn release_slot(&self, key: &str) {
        let mut pool = lock(&self.pool);
        if let Some(n) = pool.live.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                pool.live.remove(key);
            }
        }
    }

    async fn start(
        &self,
        runners: &Runners,
        job: &Job,
        req: &Request<'_>,
    ) -> Result<Worker, Error> {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let workspace = Workspace::create(&self.dir, &format!("worker-{n}"), self.cache.clone())?;
        let worker = Worker::start(
            runners,
            workspace,
            Start {
                argv: &job.start,
                env: req.env.clone(),
                workdir: req.workdir,
                options: req.options.clone(),
                framing: job.framing,
            },
            job.key.clone(),
            job.warm_key.clone(),
        )
        .await?;
        self.metrics.live_workers.inc();
        tracing::debug!(key = %job.key, argv = ?job.start, "persistent worker started");
        Ok(worker)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_proto::digest::Function;
    use outpost_proto::platform::{from_pairs, parse};

    fn argv(args: &[&str]) -> Vec<String> {
        args.iter().map(|a| (*a).to_owned()).collect()
    }

    #[test]
    fn the_pool_key_follows_the_tool_not_just_the_users_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("args"), "--out=x\n").expect("write");
        let parsed = parse(&from_pairs(&[("persistentWorkerKey", "javac")])).expect("parses");
        let tool = |content: &[u8]| {
            vec![
                (
                    PathBuf::from("tool.py"),
                    Function::Sha256.digest_of(content),
                ),
                (
                    PathBuf::from("args"),
                    Function::Sha256.digest_of(b"--out=x\n"),
                ),
            ]
        };
        let plan_with = |warm: &str, args: &[&str], inputs: &[(PathBuf, Digest)]| {
            plan(
                &parsed,
                warm,
                &argv(args),
                &["A=1".to_owned()],
                Path::new(""),
                "none",
                dir.path(),
                inputs,
            )
            .expect("plans")
        };
        let cmd = ["python3", "tool.py", "@args"];
        let one = plan_with("w", &cmd, &tool(b"v1")).expect("a worker action");
        assert_eq!(
            one.start,
            argv(&["python3", "tool.py", "--persistent_worker"])
        );
        assert_eq!(one.request.arguments, argv(&["--out=x"]));
        assert_eq!(one.request.inputs[0].path, "tool.py");
        assert_eq!(
            one.request.inputs[0].digest,
            Function::Sha256.digest_of(b"v1").hash_hex().into_bytes()
        );
        let same = plan_with("w", &cmd, &tool(b"v1")).expect("a worker action");
        assert_eq!(one.key, same.key);
        let new_tool = plan_with("w", &cmd, &tool(b"v2")).expect("a worker action");
        assert_ne!(one.key, new_tool.key, "a changed tool is a new worker");
        let other_client = plan_with("w2", &cmd, &tool(b"v1")).expect("a worker action");
        assert_ne!(one.key, other_client.key);
        // No warm key from the coordinator, or no flagfile: a plain run.
        assert!(plan_with("", &cmd, &tool(b"v1")).is_none());
        assert!(plan_with("w", &["python3", "tool.py"], &tool(b"v1")).is_none());
    }
}
