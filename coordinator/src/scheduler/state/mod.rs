//! The scheduler task: single owner of operations, queue, agents and leases.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_proto::digest::Digest;
use outpost_proto::fleet::{
    self, agent_message::Kind as FromAgent, coordinator_message::Kind as ToAgent,
};
use outpost_proto::reapi;
use prost::Message;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::Code;

use super::Error;

use super::platform::{self, Offer, Requirements};
use super::{AgentSummary, Job, OpState, Outgoing, Session, Settings, Snapshot, Stage};
use crate::config::Span;
use crate::metrics::{self, Metrics};
use crate::storage::{ActionCache, FleetMemory};

mod agents;
mod gpus;
mod operations;
mod queue;
mod time;

pub enum Msg {
    Submit {
        job: Box<Job>,
        reply: oneshot::Sender<Result<(String, watch::Receiver<OpState>), Error>>,
    },
    Attach {
        name: String,
        reply: oneshot::Sender<Option<(String, watch::Receiver<OpState>)>>,
    },
    Cancel {
        name: String,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    WaiterGone {
        name: String,
    },
    Join {
        register: Box<fleet::Register>,
        outgoing: Outgoing,
        reply: oneshot::Sender<Result<(Session, fleet::Registered), Error>>,
    },
    FromAgent {
        session: Session,
        message: Box<FromAgent>,
    },
    AgentGone {
        session: Session,
    },
    Snapshot {
        reply: oneshot::Sender<Snapshot>,
    },
    SetDraining {
        agent_id: String,
        draining: bool,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// The coordinator is shutting down: once no client waits on an
    /// unfinished operation, agents' streams are closed and `idle` fires,
    /// so the server can stop before its grace period ends.
    Stopping {
        idle: oneshot::Sender<()>,
    },
    /// An operation's result is stored; tell its clients.
    Completed {
        name: String,
        response: Box<reapi::ExecuteResponse>,
    },
}

const TICK: Duration = Duration::from_millis(250);
/// How an agent describes itself, for people.
#[derive(Clone, Default)]
struct Description {
    platform: String,
    os_version: String,
    isolation: Vec<String>,
}

impl Description {
    fn of(caps: &fleet::Capabilities) -> Description {
        let get = |name: &str| {
            caps.properties
                .iter()
                .find(|p| p.name == name)
                .map_or("?", |p| p.value.as_str())
                .to_owned()
        };
        Description {
            platform: format!("{}/{}", get("OSFamily"), get("Arch")),
            os_version: caps.os_version.clone(),
            // For people: what is enforced, where the agent says.
            isolation: if caps.isolation_detail.is_empty() {
                caps.isolation.clone()
            } else {
                vec![caps.isolation_detail.clone()]
            },
        }
    }
}

/// Finished actions kept for the status page.
const RECENT: usize = 100;

/// Infrastructure failures in a row after which an agent gets no more work.
const QUARANTINE_AFTER: u32 = 5;
/// How often a connected agent's "last seen" is written down.
const REMEMBER_EVERY: Duration = Duration::from_secs(60);
/// Missed heartbeats before a silent agent counts as disconnected.
const MISSED_HEARTBEATS: u32 = 3;

struct Op {
    job: Job,
    state: watch::Sender<OpState>,
    seq: u64,
    waiters: usize,
    abandoned_since: Option<Instant>,
    attempt: u32,
    lease: Option<String>,
    lost_on: Vec<String>,
    /// Why the last attempt could not run, for the final error.
    last_error: Option<String>,
    done_at: Option<Instant>,
    merge_key: Option<MergeKey>,
}

type MergeKey = (String, Digest);

struct Agent {
    hostname: String,
    /// What the status page shows.
    description: Description,
    offer: Offer,
    /// Encoded properties and resources, as remembered across restarts.
    remembered: bytes::Bytes,
    remembered_at: Instant,
    slots: u32,
    used_slots: u32,
    used: BTreeMap<String, u64>,
    /// The lease holding each of its GPUs.
    gpus: gpus::Held,
    outgoing: Option<Outgoing>,
    session: u64,
    last_heartbeat: Instant,
    disconnected_at: Option<Instant>,
    /// The agent process is shutting down (it said GoingAway).
    going_away: bool,
    /// Its registration's process id: a new one is a restart.
    process_id: String,
    leases: HashSet<String>,
    /// It streams running actions' output ("live-output" feature).
    live_output: bool,
    /// The warm keys it holds ("warm-keys" feature; None for older agents).
    warm_keys: Option<HashSet<String>>,
    /// Infrastructure failures in a row; the agent is taken out of
    /// rotation at `QUARANTINE_AFTER`.
    failures_in_a_row: u32,
}

struct Lease {
    op: String,
    agent: String,
    /// Resources and the slot are released when the process exits, which
    /// may come before the result.
    holds_slot: bool,
    resources: BTreeMap<String, u64>,
}

/// Queued operations: per requirement set, per build, in (priority, seq) order.
type Queue = HashMap<Requirements, HashMap<String, BTreeMap<(i32, u64), String>>>;

struct State {
    /// Output chunks of running leases go here (`execution::live`).
    live: Arc<crate::execution::live::Live>,
    settings: Settings,
    /// For work finished off the scheduler task to report back.
    self_tx: mpsc::Sender<Msg>,
    action_cache: Arc<dyn ActionCache>,
    memory: Arc<dyn FleetMemory>,
    metrics: Arc<Metrics>,
    started: Instant,
    next_seq: u64,
    next_session: u64,
    ops: HashMap<String, Op>,
    merged: HashMap<MergeKey, String>,
    queue: Queue,
    queued: usize,
    running_by_build: HashMap<String, usize>,
    agents: HashMap<String, Agent>,
    leases: HashMap<String, Lease>,
    /// Offers of agents seen recently, for the could-ever-run check.
    seen: HashMap<String, (Offer, Instant)>,
    /// Agents an operator drained: no new work until `undrain`, across
    /// reconnects and restarts.
    drained: HashSet<String>,
    /// Agents taken out of rotation for failing every action, with the
    /// process id that failed: a restarted process (a new id) or an
    /// `undrain` brings one back; a reconnect does not.
    quarantined: HashMap<String, String>,
    /// The fleet changed in a way that may leave queued actions with no
    /// agent that could ever run them.
    fleet_changed: bool,
    /// Shutting down (see `Msg::Stopping`): told once no client waits.
    stopping: Option<oneshot::Sender<()>>,
    recent: std::collections::VecDeque<super::RecentAction>,
}

pub async fn run(
    settings: Settings,
    action_cache: Arc<dyn ActionCache>,
    memory: Arc<dyn FleetMemory>,
    metrics: Arc<Metrics>,
    (self_tx, mut rx): (mpsc::Sender<Msg>, mpsc::Receiver<Msg>),
    shutdown: tokio_util::sync::CancellationToken,
    live: Arc<crate::execution::live::Live>,
) {
    let seen = recall(&*memory, settings.fleet_memory).await;
    let mut state = State {
        live,
        settings,
        self_tx,
        action_cache,
        memory,
        metrics,
        started: Instant::now(),
        next_seq: 0,
        next_session: 0,
        ops: HashMap::new(),
        merged: HashMap::new(),
        queue: HashMap::new(),
        queued: 0,
        running_by_build: HashMap::new(),
        agents: HashMap::new(),
        leases: HashMap::new(),
        seen,
        drained: HashSet::new(),
        quarantined: HashMap::new(),
        fleet_changed: true,
        stopping: None,
        recent: std::collections::VecDeque::new(),
    };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(msg) => state.handle(msg),
                None => return,
            },
            _ = tick.tick() => state.tick(),
            () = shutdown.cancelled() => return,
        }
    }
}

/// Agents seen within `window` before the last stop.
async fn recall(memory: &dyn FleetMemory, window: Duration) -> HashMap<String, (Offer, Instant)> {
    let now_secs = crate::storage::now_secs();
    let now = Instant::now();
    let mut seen = HashMap::new();
    match memory.recall_agents().await {
        Ok(agents) => {
            for (id, caps, seen_at) in agents {
                let ago = Duration::from_secs(now_secs.saturating_sub(seen_at));
                if ago >= window {
                    continue;
                }
                let Ok(caps) = fleet::Capabilities::decode(caps) else {
                    continue;
                };
                let at = now.checked_sub(ago).unwrap_or(now);
                let offer = Offer::of(&caps);
                seen.insert(id, (offer, at));
            }
            if !seen.is_empty() {
                tracing::info!(agents = seen.len(), "remembered the recent fleet");
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot recall the fleet; matching starts from the agents that connect")
        }
    }
    seen
}

fn random_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn status(code: Code, message: impl Into<String>) -> tonic_types::pb::Status {
    tonic_types::pb::Status {
        code: code as i32,
        message: message.into(),
        details: Vec::new(),
    }
}

impl State {
    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Submit { job, reply } => {
                // A client that left before the answer counted as a
                // waiter; take it back so the operation can be abandoned.
                if let Err(Ok((name, _))) = reply.send(self.submit(*job)) {
                    self.waiter_gone(&name);
                }
            }
            Msg::Attach { name, reply } => {
                let attached = self.ops.get_mut(&name).map(|op| {
                    op.waiters += 1;
                    op.abandoned_since = None;
                    (name.clone(), op.state.subscribe())
                });
                if let Err(Some((name, _))) = reply.send(attached) {
                    self.waiter_gone(&name);
                }
            }
            Msg::Cancel { name, reply } => {
                // A merged action keeps running while other clients wait on it.
                let others = self
                    .ops
                    .get(&name)
                    .map_or(0, |op| op.waiters.saturating_sub(1));
                if others > 0 {
                    tracing::info!(operation = %name, others, "not cancelling: other clients still wait on this action");
                    let _ = reply.send(Ok(()));
                } else {
                    let _ = reply.send(self.cancel(&name, "cancelled by CancelOperation"));
                }
            }
            Msg::WaiterGone { name } => self.waiter_gone(&name),
            Msg::Join {
                register,
                outgoing,
                reply,
            } => {
                let _ = reply.send(self.join(*register, outgoing));
                self.update_gauges();
            }
            Msg::FromAgent { session, message } => self.on_agent_message(&session, *message),
            Msg::AgentGone { session } => {
                if let Some(agent) = self.agents.get_mut(&session.agent_id)
                    && agent.session == session.id
                {
                    tracing::info!(agent_id = %session.agent_id, "agent disconnected");
                    agent.outgoing = None;
                    agent.disconnected_at = Some(Instant::now());
                }
                self.update_gauges();
            }
            Msg::Snapshot { reply } => {
                let _ = reply.send(self.snapshot());
            }
            Msg::Completed { name, response } => self.complete(&name, *response),
            Msg::Stopping { idle } => {
                self.stopping = Some(idle);
                self.release_agents_when_idle();
            }
            Msg::SetDraining {
                agent_id,
                draining,
                reply,
            } => {
                let result = match self.agents.get_mut(&agent_id) {
                    Some(agent) => {
                        tracing::info!(agent_id, draining, "drain changed by an operator");
                        if draining {
                            self.drained.insert(agent_id);
                        } else {
                            // Undrain also ends a quarantine: the operator
                            // says the agent is fit again.
                            agent.failures_in_a_row = 0;
                            self.drained.remove(&agent_id);
                            self.quarantined.remove(&agent_id);
                        }
                        Ok(())
                    }
                    None => Err(Error::NotFound(format!(
                        "no agent {agent_id:?} is connected; `outpost fleet` lists them"
                    ))),
                };
                let _ = reply.send(result);
                if !draining {
                    self.dispatch_all();
                }
            }
        }
    }

    fn waiter_gone(&mut self, name: &str) {
        if let Some(op) = self.ops.get_mut(name) {
            op.waiters = op.waiters.saturating_sub(1);
            if op.waiters == 0 && op.done_at.is_none() {
                op.abandoned_since = Some(Instant::now());
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            queued: self.queued,
            executing: self.leases.len(),
            agents: self
                .agents
                .iter()
                .map(|(id, a)| AgentSummary {
                    id: id.clone(),
                    hostname: a.hostname.clone(),
                    connected: a.outgoing.is_some(),
                    slots: a.slots,
                    used_slots: a.used_slots,
                    draining: !self.takes_work(id),
                    platform: a.description.platform.clone(),
                    os_version: a.description.os_version.clone(),
                    isolation: a.description.isolation.clone(),
                    gpus: a.describe_gpus(),
                    last_heartbeat: a.last_heartbeat.elapsed(),
                    warm_keys: {
                        let mut keys: Vec<String> = a.warm_keys.iter().flatten().cloned().collect();
                        keys.sort();
                        keys
                    },
                })
                .collect(),
            queue: self
                .queue
                .iter()
                .map(|(req, builds)| (req.to_string(), builds.values().map(BTreeMap::len).sum()))
                .collect(),
            recent: self.recent.iter().cloned().collect(),
        }
    }
}

#[cfg(test)]
#[path = "../tests.rs"]
mod tests;
