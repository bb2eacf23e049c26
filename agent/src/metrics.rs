//! The agent's Prometheus metrics, served only when the operator asks for a
//! port (`--metrics-listen`), with `/healthz` and `/readyz` (ready while
//! registered with the coordinator).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

pub struct Metrics {
    registry: Registry,
    /// Leases finished: `success`, `failed` (non-zero exit), `timeout`,
    /// `error` (could not run), `cancelled`.
    pub actions: Family<OutcomeLabels, Counter>,
    pub running: Gauge,
    pub connected: Gauge,
    registered: AtomicBool,
}

impl Metrics {
    /// `spawner_starts`: the isolation's count of spawner processes
    /// started (Linux), registered as `outpost_agent_spawner_starts`;
    /// `docker`: the Docker backend's counters, where it runs; `warm`:
    /// persistent workers' counters.
    pub fn new(
        spawner_starts: Option<Counter>,
        docker: Option<crate::runner::DockerMetrics>,
        warm: &crate::runner::worker::Metrics,
    ) -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("outpost_agent");
        warm.register(&mut registry);
        if let Some(docker) = docker {
            registry.register(
                "docker_containers",
                "Containers started for actions",
                docker.containers,
            );
            registry.register(
                "docker_pulls",
                "Image look-ups by outcome: hit (the engine had it), miss (pulled), failed",
                docker.pulls,
            );
            registry.register(
                "docker_pull_seconds",
                "Seconds spent pulling images",
                docker.pull_seconds,
            );
            registry.register(
                "docker_images_removed",
                "Images this agent pulled and removed to keep within docker_image_cache_size",
                docker.images_removed,
            );
        }
        if let Some(starts) = spawner_starts {
            registry.register(
                "spawner_starts",
                "Spawner processes started; more than one means one died and was replaced",
                starts,
            );
        }
        let actions = Family::<OutcomeLabels, Counter>::default();
        registry.register("actions", "Leases finished, by outcome", actions.clone());
        let running = Gauge::default();
        registry.register("running", "Actions running now", running.clone());
        let connected = Gauge::default();
        registry.register(
            "connected",
            "1 while registered with the coordinator",
            connected.clone(),
        );
        Arc::new(Metrics {
            registry,
            actions,
            running,
            connected,
            registered: AtomicBool::new(false),
        })
    }

    pub fn finished(&self, outcome: &'static str) {
        self.actions.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    pub fn set_connected(&self, connected: bool) {
        self.registered.store(connected, Ordering::Relaxed);
        self.connected.set(i64::from(connected));
    }

    fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Binds the metrics port (so a bad address fails the start-up).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on --metrics-listen {addr}"))
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use axum::routing::get;
    let addr: SocketAddr = listener.local_addr()?;
    let scrape = {
        let m = Arc::clone(&metrics);
        move || {
            let m = Arc::clone(&m);
            async move { m.render() }
        }
    };
    let ready = move || {
        let m = Arc::clone(&metrics);
        async move {
            if m.registered.load(Ordering::Relaxed) {
                (axum::http::StatusCode::OK, "ready\n")
            } else {
                (
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    "not registered with the coordinator\n",
                )
            }
        }
    };
    let app = axum::Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready));
    tracing::info!(%addr, "serving agent metrics");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .context("the metrics server failed")
}
