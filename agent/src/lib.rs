//! The Outpost agent: dials out to a coordinator over one stream
//! ([`link`]), advertises what its host can do ([`host`]), runs the actions
//! it is leased ([`exec`]) with inputs from a local hard-linked cache
//! ([`cache`]), and uploads their results ([`remote`]). It opens no
//! listening port.
//!
//! Start at [`Agent::start`]. Every command runs through the [`runner`]
//! seam, behind a stub of `outpost-sandbox`: the Linux sandbox, or the
//! reaper for `none`; either way a timeout or cancellation kills everything
//! it started.

pub mod cache;
pub mod config;
pub mod error;
pub mod exec;
pub mod host;
pub mod link;
pub mod metrics;
pub mod remote;
pub mod runner;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use outpost_proto::fleet;
use outpost_proto::settings::Reloaded;
use tokio_util::sync::CancellationToken;

pub use config::Config;

pub use outpost_proto::client::{Bearer, Transport};

/// The agent's stable id: kept in the work directory, made once from the
/// host name and a random suffix.
fn agent_id(work_dir: &Path) -> anyhow::Result<String> {
    let path = work_dir.join("agent-id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim().to_owned();
        if !id.is_empty() {
            return Ok(id);
        }
    }
    let host = hostname();
    let id = format!("{host}-{:08x}", rand::random::<u32>());
    std::fs::write(&path, format!("{id}\n"))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "agent".to_owned())
}

/// Marks a directory as an agent's work directory; the agent clears parts of
/// it, so it refuses a non-empty directory without this mark.
const WORK_DIR_MARK: &str = "OUTPOST-AGENT-WORK-DIR";

fn prepare_work_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the work directory {}", dir.display()))?;
    let dir = std::fs::canonicalize(dir)?;
    // Private to the agent: no other user of the host reaches an action's
    // files (a set-uid program one made, say), the cache or the agent's id.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making the work directory {} private", dir.display()))?;
    }
    let mark = dir.join(WORK_DIR_MARK);
    if !mark.exists() {
        let nonempty = std::fs::read_dir(&dir)?.next().is_some();
        if nonempty {
            anyhow::bail!(
                "{} is not empty and is not an outpost agent work directory (no {WORK_DIR_MARK} file); \
                 the agent deletes its cache and action directories there, so point --work-dir at a \
                 new or empty directory",
                dir.display()
            );
        }
        std::fs::write(&mark, "This directory belongs to an outpost agent.\n")
            .with_context(|| format!("writing {}", mark.display()))?;
    }
    Ok(dir)
}

/// Settings a running agent takes from a reloaded configuration (copied in
/// [`Control::reload`]); the others need a restart. `log` is applied by the
/// caller, which owns logging.
pub const RELOADABLE: &[&str] = &[
    "log",
    "labels",
    "pool",
    "action_memory_limit",
    "action_pids_limit",
    "action_cpu_limit",
    "action_tmp_size",
];

/// A started agent: work directory, cache and runners ready, not yet
/// connected.
pub struct Agent {
    link: link::Link,
    control: Control,
    metrics_listener: Option<tokio::net::TcpListener>,
}

/// Changes a running agent's settings; see [`RELOADABLE`].
#[derive(Clone)]
pub struct Control {
    inner: Arc<ControlInner>,
}

struct ControlInner {
    config: std::sync::Mutex<Config>,
    slots: u32,
    work_dir: PathBuf,
    runners: Arc<runner::Runners>,
    capabilities: tokio::sync::watch::Sender<fleet::Capabilities>,
}

impl Agent {
    /// Prepares the work directory, the input cache and the runners (proving
    /// a configured sandbox works), and describes the host.
    pub async fn start(config: Config) -> anyhow::Result<Agent> {
        config.validate()?;
        let work_dir = prepare_work_dir(&config.work_dir)?;
        let id = agent_id(&work_dir)?;
        let slots = if config.slots == 0 {
            host::cpus()
        } else {
            config.slots
        };
        let actions_dir = work_dir.join("actions");
        if actions_dir.exists() {
            // Left by a previous run that was killed.
            let _ = std::fs::remove_dir_all(&actions_dir);
        }
        let cache = cache::Cache::open(work_dir.join("cache"), &actions_dir, config.cache_size.0)?;
        // Persistent workers' directories: a previous run's went with its
        // workers (they die with the agent).
        let workers_dir = work_dir.join("workers");
        let _ = std::fs::remove_dir_all(&workers_dir);
        std::fs::create_dir_all(&workers_dir)
            .with_context(|| format!("creating {}", workers_dir.display()))?;
        let workers = Arc::new(runner::Workers::new(
            config.worker_caps(),
            workers_dir,
            cache.clone(),
        ));
        let runners =
            Arc::new(runner::Runners::new(&config, &work_dir, &id, host::memory_bytes()).await?);
        host::xcode::search_in(config.xcode_dirs.clone());
        let capabilities = host::capabilities(&config, slots, &work_dir, &runners.offers());
        tracing::info!(
            agent_id = %id,
            slots,
            os = %capabilities.os_version,
            gpus = capabilities.gpus.len(),
            isolation = %capabilities.isolation_detail,
            coordinator = %config.coordinator,
            "agent starting"
        );
        let dial = config.dial();
        let endpoint = dial
            .endpoint()?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(16 << 20))
            .max_frame_size(Some(1 << 20))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        let channel = dial.transport(endpoint)?;
        let executor = Arc::new(exec::Executor {
            agent_id: id.clone(),
            remote: remote::Remote::new(channel.clone(), ""),
            cache,
            actions_dir,
            runners: Arc::clone(&runners),
            output_limit: config.action_output_limit.0,
            workers: Arc::clone(&workers),
            recycler: Arc::new(runner::Recycler::new(
                config.runner_caps(),
                workers.metrics.clone(),
            )),
        });
        let metrics = metrics::Metrics::new(
            runners.spawner_starts(),
            runners.docker_metrics(),
            &workers.metrics,
        );
        let metrics_listener = match config.metrics_listen {
            Some(addr) => Some(metrics::bind(addr).await?),
            None => None,
        };
        let (capabilities_tx, capabilities) = tokio::sync::watch::channel(capabilities);
        let (outbox_tx, outbox) = tokio::sync::mpsc::channel(1024);
        let link = link::Link {
            channel,
            register: fleet::Register {
                protocol_version: outpost_proto::FLEET_PROTOCOL_VERSION,
                agent_id: id,
                hostname: hostname(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                capabilities: None,
                running_leases: Vec::new(),
                // New at every start: tells the coordinator a restart from
                // a reconnect.
                process_id: format!("{:032x}", rand::random::<u128>()),
            },
            capabilities,
            executor,
            running: link::Running::default(),
            outbox_tx,
            outbox,
            reported: link::Reported::default(),
            metrics,
        };
        let control = Control {
            inner: Arc::new(ControlInner {
                config: std::sync::Mutex::new(config),
                slots,
                work_dir,
                runners,
                capabilities: capabilities_tx,
            }),
        };
        Ok(Agent {
            link,
            control,
            metrics_listener,
        })
    }

    pub fn control(&self) -> Control {
        self.control.clone()
    }

    /// Dials the coordinator and runs what it leases until `shutdown` fires
    /// and running actions finished.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        if let Some(listener) = self.metrics_listener {
            let (metrics, shutdown) = (Arc::clone(&self.link.metrics), shutdown.clone());
            tokio::spawn(async move {
                if let Err(e) = metrics::serve(listener, metrics, shutdown).await {
                    tracing::error!("{e:#}");
                }
            });
        }
        self.link.run(shutdown).await;
        tracing::info!("agent stopped");
        Ok(())
    }
}

impl Control {
    /// Takes what can change at run time from `new`: action limits for
    /// actions that start from now on, and labels and pool, which the
    /// agent advertises again (registering anew; running actions go on).
    pub async fn reload(&self, new: Config) -> anyhow::Result<Reloaded> {
        new.validate()?;
        let old = self
            .inner
            .config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let reloaded = Reloaded::between(&old.to_yaml(), &new.to_yaml(), RELOADABLE);
        let running = Config {
            log: new.log,
            labels: new.labels,
            pool: new.pool,
            action_memory_limit: new.action_memory_limit,
            action_pids_limit: new.action_pids_limit,
            action_cpu_limit: new.action_cpu_limit,
            action_tmp_size: new.action_tmp_size,
            ..old.clone()
        };
        self.inner.runners.set_limits(&running);
        if running.labels != old.labels || running.pool != old.pool {
            let inner = Arc::clone(&self.inner);
            let config = running.clone();
            let capabilities = tokio::task::spawn_blocking(move || {
                host::capabilities(
                    &config,
                    inner.slots,
                    &inner.work_dir,
                    &inner.runners.offers(),
                )
            })
            .await
            .context("describing the host")?;
            self.inner.capabilities.send_replace(capabilities);
        }
        *self.inner.config.lock().unwrap_or_else(|e| e.into_inner()) = running;
        Ok(reloaded)
    }
}

/// Runs the agent until `shutdown` fires and running actions finished.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    Agent::start(config).await?.run(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_foreign_work_dir_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("precious"), "keep").expect("write");
        let err = prepare_work_dir(dir.path()).expect_err("refused");
        assert!(
            err.to_string()
                .contains("not an outpost agent work directory"),
            "{err}"
        );
        assert!(dir.path().join("precious").exists());
        let fresh = dir.path().join("fresh");
        prepare_work_dir(&fresh).expect("a new directory");
        std::fs::write(fresh.join("agent-id"), "x").expect("write");
        prepare_work_dir(&fresh).expect("its own directory again");
    }
}
