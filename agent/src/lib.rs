//! The Outpost agent: dials out to a coordinator over one stream
//! ([`link`]), advertises what its host can do ([`host`]), runs the actions
//! it is leased ([`exec`]) with inputs from a local hard-linked cache
//! ([`cache`]), and uploads their results ([`remote`]). It opens no
//! listening port.
//!
//! Start at [`run`]. Every command runs behind the reaper stub of
//! `outpost-sandbox`, so a timeout or cancellation kills everything it
//! started.

pub mod cache;
pub mod config;
pub mod error;
pub mod exec;
pub mod host;
pub mod link;
pub mod metrics;
pub mod remote;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use outpost_proto::fleet;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

pub use config::Config;

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

/// Runs the agent until `shutdown` fires and running actions finished.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
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
    let capabilities = host::capabilities(&config, slots, &work_dir);
    tracing::info!(
        agent_id = %id,
        slots,
        os = %capabilities.os_version,
        gpus = capabilities.gpus.len(),
        coordinator = %config.coordinator,
        "agent starting"
    );
    let channel = Endpoint::from_shared(config.endpoint())
        .with_context(|| format!("coordinator address {:?}", config.coordinator))?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .max_frame_size(Some(1 << 20))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
        .connect_lazy();
    let reaper: PathBuf =
        std::env::current_exe().context("finding this binary to run actions through")?;
    let executor = Arc::new(exec::Executor {
        agent_id: id.clone(),
        remote: remote::Remote::new(channel.clone(), ""),
        cache,
        actions_dir,
        reaper,
    });
    let metrics = metrics::Metrics::new();
    if let Some(addr) = config.metrics_listen {
        let listener = metrics::bind(addr).await?;
        let (metrics, shutdown) = (std::sync::Arc::clone(&metrics), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(listener, metrics, shutdown).await {
                tracing::error!("{e:#}");
            }
        });
    }
    let (outbox_tx, outbox) = tokio::sync::mpsc::channel(1024);
    let link = link::Link {
        channel,
        register: fleet::Register {
            protocol_version: outpost_proto::FLEET_PROTOCOL_VERSION,
            agent_id: id,
            hostname: hostname(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            capabilities: Some(capabilities),
            running_leases: Vec::new(),
        },
        executor,
        running: link::Running::default(),
        outbox_tx,
        outbox,
        reported: link::Reported::default(),
        metrics,
    };
    link.run(shutdown).await;
    tracing::info!("agent stopped");
    Ok(())
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
