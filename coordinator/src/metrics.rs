//! Prometheus metrics of the coordinator, in an explicit registry (no
//! globals), served as text at `/metrics` on the main address.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// Ran and exited 0.
    Success,
    /// Ran and exited non-zero.
    Failed,
    /// Answered from the Action Cache.
    Cached,
    /// Killed at its timeout.
    Timeout,
    /// Cancelled by a client or abandoned.
    Cancelled,
    /// Could not run (missing inputs, bad action, retries exhausted).
    Error,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Stage {
    Queued,
    InputFetch,
    Execution,
    Upload,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PlatformLabels {
    pub platform: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuLabels {
    pub agent: String,
    /// `used` or `free`.
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LookupLabels {
    pub result: &'static str,
}

impl Outcome {
    const ALL: [Outcome; 6] = [
        Outcome::Success,
        Outcome::Failed,
        Outcome::Cached,
        Outcome::Timeout,
        Outcome::Cancelled,
        Outcome::Error,
    ];

    fn label(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failed => "failed",
            Outcome::Cached => "cached",
            Outcome::Timeout => "timeout",
            Outcome::Cancelled => "cancelled",
            Outcome::Error => "error",
        }
    }
}

impl Stage {
    const ALL: [Stage; 4] = [
        Stage::Queued,
        Stage::InputFetch,
        Stage::Execution,
        Stage::Upload,
    ];

    fn label(self) -> &'static str {
        match self {
            Stage::Queued => "queued",
            Stage::InputFetch => "input_fetch",
            Stage::Execution => "execution",
            Stage::Upload => "upload",
        }
    }
}

/// Every metric the coordinator exports.
pub struct Metrics {
    registry: Registry,
    pub actions: Family<OutcomeLabels, Counter>,
    pub stage_seconds: Family<StageLabels, Histogram>,
    pub queue_length: Family<PlatformLabels, Gauge>,
    pub executing: Gauge,
    pub agents_connected: Gauge,
    /// Connected agents' GPUs, held by a lease or free.
    pub gpus: Family<GpuLabels, Gauge>,
    pub retries: Counter,
    pub agents_lost: Counter,
    pub cas_lookups: Family<LookupLabels, Counter>,
    pub cas_bytes: Gauge,
    pub cas_evictions: Gauge,
    pub action_cache_lookups: Family<LookupLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("outpost");
        let actions = Family::<OutcomeLabels, Counter>::default();
        registry.register("actions", "Actions finished, by outcome", actions.clone());
        let stage_seconds = Family::<StageLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 20))
        });
        registry.register(
            "action_stage_seconds",
            "Time actions spent in each stage (queued, input fetch, execution, upload)",
            stage_seconds.clone(),
        );
        let queue_length = Family::<PlatformLabels, Gauge>::default();
        registry.register(
            "queue_length",
            "Actions waiting for an agent, by platform",
            queue_length.clone(),
        );
        let executing = Gauge::default();
        registry.register("executing", "Actions leased to agents", executing.clone());
        let agents_connected = Gauge::default();
        registry.register(
            "agents_connected",
            "Agents with an open stream",
            agents_connected.clone(),
        );
        let gpus = Family::<GpuLabels, Gauge>::default();
        registry.register(
            "gpus",
            "GPUs of connected agents, by agent and state (used: held by a lease)",
            gpus.clone(),
        );
        let retries = Counter::default();
        registry.register(
            "retries",
            "Actions queued again after their agent was lost or failed",
            retries.clone(),
        );
        let agents_lost = Counter::default();
        registry.register(
            "agents_lost",
            "Agents that disconnected and did not come back in time",
            agents_lost.clone(),
        );
        let cas_lookups = Family::<LookupLabels, Counter>::default();
        registry.register(
            "cas_lookups",
            "Blobs asked about with FindMissingBlobs, by result",
            cas_lookups.clone(),
        );
        let cas_bytes = Gauge::default();
        registry.register("cas_bytes", "Bytes of blobs stored", cas_bytes.clone());
        let cas_evictions = Gauge::default();
        registry.register(
            "cas_evicted_blobs",
            "Blobs evicted since start-up",
            cas_evictions.clone(),
        );
        let action_cache_lookups = Family::<LookupLabels, Counter>::default();
        registry.register(
            "action_cache_lookups",
            "Action Cache lookups (GetActionResult and Execute), by result",
            action_cache_lookups.clone(),
        );
        // Every known label value is exported from the start, so a fresh
        // coordinator's /metrics shows each series at 0 and rates work
        // from the first sample.
        for outcome in Outcome::ALL {
            let _ = actions.get_or_create(&OutcomeLabels {
                outcome: outcome.label(),
            });
        }
        for stage in Stage::ALL {
            let _ = stage_seconds.get_or_create(&StageLabels {
                stage: stage.label(),
            });
        }
        for result in ["hit", "miss"] {
            let _ = cas_lookups.get_or_create(&LookupLabels { result });
            let _ = action_cache_lookups.get_or_create(&LookupLabels { result });
        }
        Metrics {
            registry,
            actions,
            stage_seconds,
            queue_length,
            executing,
            agents_connected,
            gpus,
            retries,
            agents_lost,
            cas_lookups,
            cas_bytes,
            cas_evictions,
            action_cache_lookups,
        }
    }
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    pub fn action(&self, outcome: Outcome) {
        self.actions
            .get_or_create(&OutcomeLabels {
                outcome: outcome.label(),
            })
            .inc();
    }

    pub fn stage(&self, stage: Stage, took: Duration) {
        self.stage_seconds
            .get_or_create(&StageLabels {
                stage: stage.label(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn action_cache(&self, hit: bool) {
        let result = if hit { "hit" } else { "miss" };
        self.action_cache_lookups
            .get_or_create(&LookupLabels { result })
            .inc();
    }

    pub fn cas(&self, hits: u64, misses: u64) {
        self.cas_lookups
            .get_or_create(&LookupLabels { result: "hit" })
            .inc_by(hits);
        self.cas_lookups
            .get_or_create(&LookupLabels { result: "miss" })
            .inc_by(misses);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
