//! The scheduler: the queue, the connected agents and their leases, and the
//! operations clients wait on. All of it lives in one task ([`state`]) fed
//! by a bounded channel; this module is the handle the services use.
//!
//! Matching is typed ([`platform`]); the queue is fair between builds (a
//! build is a `tool_invocation_id`): the next action for a free agent comes
//! from the build with the fewest actions running, then by priority, then
//! first come. Identical cacheable actions in flight run once.

pub mod gpus;
pub mod platform;
mod state;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use outpost_proto::digest::Digest;
use outpost_proto::fleet;
use outpost_proto::reapi;
use tokio::sync::{mpsc, oneshot, watch};

use crate::storage::{ActionCache, FleetMemory, Pin};
use platform::Requirements;

/// Why the scheduler refused a request; the services turn it into a gRPC
/// status (`service::scheduler_status`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No agent could ever run the action, or an agent may not join
    /// (FAILED_PRECONDITION).
    #[error("{0}")]
    Precondition(String),
    /// A malformed registration (INVALID_ARGUMENT).
    #[error("{0}")]
    Invalid(String),
    /// No such operation or agent (NOT_FOUND).
    #[error("{0}")]
    NotFound(String),
    #[error("the coordinator is shutting down")]
    ShuttingDown,
}

/// Tunables, from the coordinator's configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    pub heartbeat_interval: Duration,
    /// How long a disconnected agent may take to come back before its
    /// actions run elsewhere.
    pub reconnect_grace: Duration,
    /// Attempts of one action (agents lost under it) before it fails.
    pub max_attempts: u32,
    /// Agents seen this recently count when deciding whether an action can
    /// ever run.
    pub fleet_memory: Duration,
    /// After start-up, nothing fails fast for this long (agents reconnect).
    pub startup_grace: Duration,
    /// An operation nobody waits on any more is cancelled after this long.
    pub abandon_after: Duration,
    /// Finished operations stay visible to WaitExecution/GetOperation this long.
    pub keep_finished: Duration,
}

/// One action to run.
pub struct Job {
    pub instance_name: String,
    pub action_digest: Digest,
    pub requirements: Requirements,
    /// The platform the agent runs it by (names canonical).
    pub platform: Vec<reapi::platform::Property>,
    pub priority: i32,
    /// The build it belongs to (`tool_invocation_id`), for fairness.
    pub invocation: String,
    pub timeout: Duration,
    /// Results may be cached and identical in-flight actions merged.
    pub cacheable: bool,
    /// Keeps the action's inputs in the CAS while it is queued or running.
    pub pin: Pin,
    pub queued_at: SystemTime,
    /// Sent with the lease so the agent need not fetch them.
    pub prefetched: crate::execution::Prefetched,
    /// Bytes of distinct input files; leased only to agents whose input
    /// cache can hold them.
    pub input_bytes: u64,
    /// Set when the action asks for a warm runner or persistent worker.
    pub warm: Option<Warm>,
}

/// What a warm action is routed by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warm {
    /// Its warm key (`outpost_proto::warm::warm_key`).
    pub key: String,
    /// How long it is held for an agent holding the key.
    pub max_wait: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stage {
    Queued,
    Executing,
    Completed,
}

/// What clients see of an operation.
#[derive(Clone, Debug)]
pub struct OpState {
    pub stage: Stage,
    pub action_digest: Digest,
    pub response: Option<Arc<reapi::ExecuteResponse>>,
}

/// A client's view of an operation; dropping it tells the scheduler one
/// waiter fewer is interested.
pub struct Waiter {
    pub name: String,
    pub state: watch::Receiver<OpState>,
    _guard: WaiterGuard,
}

struct WaiterGuard {
    name: String,
    tx: mpsc::Sender<state::Msg>,
}

impl Drop for WaiterGuard {
    fn drop(&mut self) {
        let msg = state::Msg::WaiterGone {
            name: std::mem::take(&mut self.name),
        };
        if let Err(mpsc::error::TrySendError::Full(msg)) = self.tx.try_send(msg) {
            let tx = self.tx.clone();
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move { tx.send(msg).await });
            }
        }
    }
}

/// One agent connection as the fleet service holds it.
#[derive(Clone, Debug)]
pub struct Session {
    pub agent_id: String,
    pub id: u64,
}

pub type Outgoing = mpsc::Sender<fleet::CoordinatorMessage>;

#[derive(Clone)]
pub struct Scheduler {
    tx: mpsc::Sender<state::Msg>,
    /// Running actions' output as their agents stream it.
    live: Arc<crate::execution::live::Live>,
}

impl Scheduler {
    /// Starts the scheduler task; it ends when `shutdown` fires.
    pub fn start(
        settings: Settings,
        action_cache: Arc<dyn ActionCache>,
        memory: Arc<dyn FleetMemory>,
        metrics: Arc<crate::metrics::Metrics>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Scheduler {
        let (tx, rx) = mpsc::channel(4096);
        let live = Arc::new(crate::execution::live::Live::default());
        tokio::spawn(state::run(
            settings,
            action_cache,
            memory,
            metrics,
            (tx.clone(), rx),
            shutdown,
            Arc::clone(&live),
        ));
        Scheduler { tx, live }
    }

    /// The live output of running actions.
    pub fn live(&self) -> Arc<crate::execution::live::Live> {
        Arc::clone(&self.live)
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> state::Msg,
    ) -> Result<T, Error> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)
    }

    fn waiter(&self, (name, state): (String, watch::Receiver<OpState>)) -> Waiter {
        Waiter {
            name: name.clone(),
            state,
            _guard: WaiterGuard {
                name,
                tx: self.tx.clone(),
            },
        }
    }

    /// Queues an action (or joins an identical one in flight).
    pub async fn submit(&self, job: Job) -> Result<Waiter, Error> {
        let attached = self
            .call(|reply| state::Msg::Submit {
                job: Box::new(job),
                reply,
            })
            .await??;
        Ok(self.waiter(attached))
    }

    /// Re-attaches to an operation by name.
    pub async fn attach(&self, name: &str) -> Result<Option<Waiter>, Error> {
        let name = name.to_owned();
        Ok(self
            .call(|reply| state::Msg::Attach { name, reply })
            .await?
            .map(|a| self.waiter(a)))
    }

    pub async fn cancel(&self, name: &str) -> Result<(), Error> {
        let name = name.to_owned();
        self.call(|reply| state::Msg::Cancel { name, reply })
            .await?
    }

    /// Registers an agent connection; `outgoing` carries messages to it.
    pub async fn join(
        &self,
        register: fleet::Register,
        outgoing: Outgoing,
    ) -> Result<(Session, fleet::Registered), Error> {
        self.call(|reply| state::Msg::Join {
            register: Box::new(register),
            outgoing,
            reply,
        })
        .await?
    }

    pub async fn agent_message(
        &self,
        session: &Session,
        message: fleet::agent_message::Kind,
    ) -> Result<(), Error> {
        self.tx
            .send(state::Msg::FromAgent {
                session: session.clone(),
                message: Box::new(message),
            })
            .await
            .map_err(|_| Error::ShuttingDown)
    }

    pub async fn agent_gone(&self, session: &Session) {
        let _ = self
            .tx
            .send(state::Msg::AgentGone {
                session: session.clone(),
            })
            .await;
    }

    /// Stops (or resumes) giving an agent new work; what it runs finishes.
    pub async fn set_draining(&self, agent_id: &str, draining: bool) -> Result<(), Error> {
        let agent_id = agent_id.to_owned();
        self.call(|reply| state::Msg::SetDraining {
            agent_id,
            draining,
            reply,
        })
        .await?
    }

    /// Starts shutting down: work in flight goes on while clients wait on
    /// it; then agents' streams close and this returns.
    pub async fn shut_down_when_idle(&self) {
        let (idle, rx) = oneshot::channel();
        if self.tx.send(state::Msg::Stopping { idle }).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// A snapshot for status pages and tests.
    pub async fn snapshot(&self) -> Result<Snapshot, Error> {
        self.call(|reply| state::Msg::Snapshot { reply }).await
    }
}

/// The scheduler's state at a glance.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub queued: usize,
    pub executing: usize,
    pub agents: Vec<AgentSummary>,
    /// Queued actions per requirement set.
    pub queue: Vec<(String, usize)>,
    /// The most recent finished actions, newest first.
    pub recent: Vec<RecentAction>,
}

#[derive(Clone, Debug)]
pub struct AgentSummary {
    pub id: String,
    pub hostname: String,
    pub connected: bool,
    pub slots: u32,
    pub used_slots: u32,
    pub draining: bool,
    /// `OSFamily/Arch`, OS version, isolation backends, GPUs.
    pub platform: String,
    pub os_version: String,
    pub isolation: Vec<String>,
    pub gpus: Vec<String>,
    pub last_heartbeat: std::time::Duration,
    /// Warm keys of the persistent workers it holds idle (sorted).
    pub warm_keys: Vec<String>,
}

/// One finished action, for the status page.
#[derive(Clone, Debug)]
pub struct RecentAction {
    pub operation: String,
    pub action_digest: Digest,
    pub worker: String,
    pub exit_code: Option<i32>,
    /// Empty when the action ran; otherwise why it did not (or timed out).
    pub error: String,
    pub queued: Option<Duration>,
    pub fetch: Option<Duration>,
    pub execution: Option<Duration>,
    pub upload: Option<Duration>,
    pub stdout: Option<Digest>,
    pub stderr: Option<Digest>,
    pub finished: SystemTime,
}
