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
use tonic::{Code, Status};

use super::platform::{self, Offer, Requirements};
use super::{AgentSummary, Job, OpState, Outgoing, Session, Settings, Snapshot, Stage};
use crate::config::Span;
use crate::metrics::{self, Metrics};
use crate::storage::{ActionCache, FleetMemory};

pub enum Msg {
    Submit {
        job: Box<Job>,
        reply: oneshot::Sender<Result<(String, watch::Receiver<OpState>), Status>>,
    },
    Attach {
        name: String,
        reply: oneshot::Sender<Option<(String, watch::Receiver<OpState>)>>,
    },
    Cancel {
        name: String,
        reply: oneshot::Sender<Result<(), Status>>,
    },
    WaiterGone {
        name: String,
    },
    Join {
        register: Box<fleet::Register>,
        outgoing: Outgoing,
        reply: oneshot::Sender<Result<(Session, fleet::Registered), Status>>,
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
        reply: oneshot::Sender<Result<(), Status>>,
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
    gpus: Vec<String>,
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
            gpus: caps.gpus.iter().map(|g| g.model.clone()).collect(),
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
    outgoing: Option<Outgoing>,
    session: u64,
    last_heartbeat: Instant,
    disconnected_at: Option<Instant>,
    /// The agent process is shutting down (it said GoingAway).
    going_away: bool,
    /// Its registration's process id: a new one is a restart.
    process_id: String,
    leases: HashSet<String>,
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
    fleet_shrank: bool,
    /// Shutting down (see `Msg::Stopping`): told once no client waits.
    stopping: Option<oneshot::Sender<()>>,
    recent: std::collections::VecDeque<super::RecentAction>,
}

pub async fn run(
    settings: Settings,
    action_cache: Arc<dyn ActionCache>,
    memory: Arc<dyn FleetMemory>,
    metrics: Arc<Metrics>,
    self_tx: mpsc::Sender<Msg>,
    mut rx: mpsc::Receiver<Msg>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let seen = recall(&*memory, settings.fleet_memory).await;
    let mut state = State {
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
        fleet_shrank: true,
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
                let offer =
                    Offer::new(&caps.properties, &caps.resources).holding(caps.max_input_bytes);
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
                    None => Err(Status::not_found(format!(
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
                    gpus: a.description.gpus.clone(),
                    last_heartbeat: a.last_heartbeat.elapsed(),
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

    // ---- operations ----

    fn submit(&mut self, job: Job) -> Result<(String, watch::Receiver<OpState>), Status> {
        if self.started.elapsed() >= self.settings.startup_grace
            && let Some(why) = self.unsatisfiable(&job)
        {
            return Err(Status::failed_precondition(why));
        }
        let merge_key = job
            .cacheable
            .then(|| (job.instance_name.clone(), job.action_digest));
        if let Some(key) = &merge_key
            && let Some(name) = self.merged.get(key)
            && let Some(op) = self.ops.get_mut(name)
        {
            op.waiters += 1;
            op.abandoned_since = None;
            tracing::debug!(operation = %name, action_digest = %job.action_digest, "merged with an identical action in flight");
            return Ok((name.clone(), op.state.subscribe()));
        }
        let name = format!("operations/{}", random_id());
        let (state, rx) = watch::channel(OpState {
            stage: Stage::Queued,
            action_digest: job.action_digest,
            response: None,
        });
        self.next_seq += 1;
        let op = Op {
            job,
            state,
            seq: self.next_seq,
            waiters: 1,
            abandoned_since: None,
            attempt: 0,
            lease: None,
            lost_on: Vec::new(),
            last_error: None,
            done_at: None,
            merge_key: merge_key.clone(),
        };
        tracing::debug!(operation = %name, action_digest = %op.job.action_digest, "queued");
        self.enqueue(&name, &op);
        self.ops.insert(name.clone(), op);
        if let Some(key) = merge_key {
            self.merged.insert(key, name.clone());
        }
        self.dispatch_all();
        Ok((name, rx))
    }

    /// Why no agent connected now or seen within the fleet memory could
    /// ever run `job`; `None` if one could.
    fn unsatisfiable(&self, job: &Job) -> Option<String> {
        let offers: Vec<&Offer> = self
            .agents
            .values()
            .map(|a| &a.offer)
            .chain(self.seen.values().map(|(o, _)| o))
            .collect();
        let runs = |o: &&Offer| o.satisfies(&job.requirements) && o.holds_inputs(job.input_bytes);
        if offers.iter().any(runs) {
            return None;
        }
        Some(platform::explain_unsatisfiable(
            &job.requirements,
            job.input_bytes,
            &offers,
        ))
    }

    /// Fails queued actions that no agent could ever run any more: the
    /// start-up grace ended, or the fleet shrank. They would otherwise wait
    /// until their clients gave up.
    fn fail_unsatisfiable(&mut self) {
        if !self.fleet_shrank || self.started.elapsed() < self.settings.startup_grace {
            return;
        }
        self.fleet_shrank = false;
        let queued: Vec<String> = self
            .queue
            .values()
            .flat_map(|builds| builds.values().flat_map(|q| q.values().cloned()))
            .collect();
        for name in queued {
            let Some(why) = self
                .ops
                .get(&name)
                .and_then(|op| self.unsatisfiable(&op.job))
            else {
                continue;
            };
            self.dequeue(&name);
            tracing::info!(operation = %name, reason = %why, "failing a queued action no agent can run");
            self.fail(&name, Code::FailedPrecondition, why);
        }
    }

    /// Whether the agent may be given new work now (connected or not).
    fn takes_work(&self, agent_id: &str) -> bool {
        self.agents.get(agent_id).is_some_and(|a| {
            !a.going_away
                && !self.drained.contains(agent_id)
                && !self.quarantined.contains_key(agent_id)
        })
    }

    fn enqueue(&mut self, name: &str, op: &Op) {
        self.queue
            .entry(op.job.requirements.clone())
            .or_default()
            .entry(op.job.invocation.clone())
            .or_default()
            .insert((op.job.priority, op.seq), name.to_owned());
        self.queued += 1;
        self.queue_gauge(&op.job.requirements).inc();
    }

    fn dequeue(&mut self, name: &str) -> bool {
        let Some(op) = self.ops.get(name) else {
            return false;
        };
        let req = &op.job.requirements;
        let Some(builds) = self.queue.get_mut(req) else {
            return false;
        };
        let Some(q) = builds.get_mut(&op.job.invocation) else {
            return false;
        };
        let removed = q.remove(&(op.job.priority, op.seq)).is_some();
        if q.is_empty() {
            builds.remove(&op.job.invocation);
        }
        if builds.is_empty() {
            self.queue.remove(req);
        }
        if removed {
            self.queued -= 1;
            let req = op.job.requirements.clone();
            self.queue_gauge(&req).dec();
        }
        removed
    }

    fn complete(&mut self, name: &str, response: reapi::ExecuteResponse) {
        let Some(op) = self.ops.get_mut(name) else {
            return;
        };
        if op.done_at.is_some() {
            return;
        }
        op.done_at = Some(Instant::now());
        op.lease = None;
        if let Some(key) = op.merge_key.take() {
            self.merged.remove(&key);
        }
        // Inputs may be evicted again.
        op.job.pin = crate::storage::Pin::new(());
        op.job.prefetched = Default::default();
        let code = response.status.as_ref().map_or(0, |s| s.code);
        record_outcome(&self.metrics, &response);
        let recent = recent_action(name, op.job.action_digest, &response);
        self.recent.push_front(recent);
        self.recent.truncate(RECENT);
        tracing::info!(
            operation = %name,
            action_digest = %op.job.action_digest,
            exit_code = response.result.as_ref().map(|r| r.exit_code),
            status = code,
            "operation finished"
        );
        op.state.send_replace(OpState {
            stage: Stage::Completed,
            action_digest: op.job.action_digest,
            response: Some(Arc::new(response)),
        });
    }

    fn fail(&mut self, name: &str, code: Code, message: String) {
        self.complete(
            name,
            reapi::ExecuteResponse {
                status: Some(status(code, message.clone())),
                message,
                ..Default::default()
            },
        );
    }

    fn cancel(&mut self, name: &str, why: &str) -> Result<(), Status> {
        let Some(op) = self.ops.get(name) else {
            return Err(Status::not_found(format!(
                "operation {} is not known",
                outpost_proto::quote::quoted(name)
            )));
        };
        if op.done_at.is_some() {
            return Ok(());
        }
        if let Some(lease_id) = op.lease.clone() {
            self.end_lease(&lease_id, true);
        } else {
            self.dequeue(name);
        }
        self.fail(name, Code::Cancelled, format!("operation {name} was {why}"));
        Ok(())
    }

    // ---- agents ----

    fn join(
        &mut self,
        register: fleet::Register,
        outgoing: Outgoing,
    ) -> Result<(Session, fleet::Registered), Status> {
        if register.protocol_version != outpost_proto::FLEET_PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "agent {} speaks fleet protocol version {}; this coordinator ({}) accepts version {}; \
                 run the same outpost release on the agent and the coordinator",
                register.agent_id,
                register.protocol_version,
                env!("CARGO_PKG_VERSION"),
                outpost_proto::FLEET_PROTOCOL_VERSION
            )));
        }
        if register.agent_id.is_empty() || register.agent_id.len() > 256 {
            return Err(Status::invalid_argument(
                "agent_id must be 1 to 256 characters",
            ));
        }
        let caps = register.capabilities.unwrap_or_default();
        if caps.slots == 0 {
            return Err(Status::invalid_argument("an agent needs at least one slot"));
        }
        let offer = Offer::new(&caps.properties, &caps.resources).holding(caps.max_input_bytes);
        let remembered = bytes::Bytes::from(
            fleet::Capabilities {
                properties: caps.properties.clone(),
                resources: caps.resources.clone(),
                max_input_bytes: caps.max_input_bytes,
                ..Default::default()
            }
            .encode_to_vec(),
        );
        self.remember(&register.agent_id, remembered.clone());
        self.next_session += 1;
        let session = Session {
            agent_id: register.agent_id.clone(),
            id: self.next_session,
        };
        let still_running: HashSet<String> = register.running_leases.into_iter().collect();
        let mut resumed = Vec::new();
        let mut lost = Vec::new();
        // The same process after a broken stream, or a new one. Agents
        // without process ids look like the same process each time.
        let mut restarted = false;
        if let Some(agent) = self.agents.get_mut(&register.agent_id) {
            restarted = register.process_id.is_empty() || agent.process_id != register.process_id;
            for lease in &agent.leases {
                if still_running.contains(lease) {
                    resumed.push(lease.clone());
                } else {
                    lost.push(lease.clone());
                }
            }
            agent.hostname = register.hostname.clone();
            agent.description = Description::of(&caps);
            agent.offer = offer.clone();
            agent.remembered = remembered;
            agent.remembered_at = Instant::now();
            agent.slots = caps.slots;
            agent.outgoing = Some(outgoing);
            agent.session = session.id;
            agent.last_heartbeat = Instant::now();
            agent.disconnected_at = None;
            agent.going_away = false;
            agent.process_id = register.process_id.clone();
            if restarted {
                agent.failures_in_a_row = 0;
            }
        } else {
            self.agents.insert(
                register.agent_id.clone(),
                Agent {
                    hostname: register.hostname.clone(),
                    description: Description::of(&caps),
                    offer: offer.clone(),
                    remembered,
                    remembered_at: Instant::now(),
                    slots: caps.slots,
                    used_slots: 0,
                    used: BTreeMap::new(),
                    outgoing: Some(outgoing),
                    session: session.id,
                    last_heartbeat: Instant::now(),
                    disconnected_at: None,
                    going_away: false,
                    process_id: register.process_id.clone(),
                    leases: HashSet::new(),
                    failures_in_a_row: 0,
                },
            );
        }
        self.seen
            .insert(register.agent_id.clone(), (offer, Instant::now()));
        self.fleet_shrank = true;
        if let Some(failed) = self.quarantined.get(&register.agent_id) {
            if !register.process_id.is_empty() && *failed != register.process_id {
                tracing::info!(agent_id = %register.agent_id, "a quarantined agent restarted; giving it work again");
                self.quarantined.remove(&register.agent_id);
            } else {
                tracing::warn!(agent_id = %register.agent_id, "a quarantined agent reconnected; it gets no work until it restarts or `outpost undrain` it");
            }
        }
        tracing::info!(
            agent_id = %register.agent_id,
            hostname = %register.hostname,
            version = %register.version,
            slots = caps.slots,
            resumed = resumed.len(),
            "agent registered"
        );
        let registered = fleet::Registered {
            heartbeat_interval: prost_types::Duration::try_from(self.settings.heartbeat_interval)
                .ok(),
            resumed_leases: resumed,
        };
        // Registered goes first on the stream, before any lease: the agent
        // reads nothing else until it has it.
        if let Some(out) = self
            .agents
            .get(&session.agent_id)
            .and_then(|a| a.outgoing.as_ref())
        {
            let _ = out.try_send(Ok(fleet::CoordinatorMessage {
                kind: Some(ToAgent::Registered(registered.clone())),
            }));
        }
        // Leases the agent no longer runs go back to the queue (and may be
        // dispatched to it again, now that Registered is on its way). A
        // reconnect of the same process lost them to the network, not to
        // the action: that costs no attempt. A restart may have been the
        // action's doing (it crashed the agent), so it counts.
        for lease in lost {
            self.lose_lease(&lease, restarted);
        }
        self.dispatch_all();
        Ok((session, registered))
    }

    /// Writes down that an agent was seen now (in the background).
    fn remember(&self, agent_id: &str, capabilities: bytes::Bytes) {
        let memory = Arc::clone(&self.memory);
        let id = agent_id.to_owned();
        tokio::spawn(async move {
            if let Err(e) = memory
                .remember_agent(&id, capabilities, crate::storage::now_secs())
                .await
            {
                tracing::debug!(agent_id = %id, error = %e, "cannot remember an agent");
            }
        });
    }

    fn on_agent_message(&mut self, session: &Session, message: FromAgent) {
        let Some(agent) = self.agents.get_mut(&session.agent_id) else {
            return;
        };
        if agent.session != session.id {
            return;
        }
        agent.last_heartbeat = Instant::now();
        match message {
            FromAgent::Heartbeat(_) | FromAgent::LeaseAccepted(_) | FromAgent::StageChanged(_) => {}
            FromAgent::Register(_) => {
                tracing::warn!(agent_id = %session.agent_id, "duplicate registration ignored")
            }
            FromAgent::GoingAway(g) => {
                tracing::info!(agent_id = %session.agent_id, reason = %g.reason, "agent is draining");
                agent.going_away = true;
                self.release_if_drained(&session.agent_id);
            }
            FromAgent::ProcessExited(p) => {
                if self.owned_lease(&p.lease_id, &session.agent_id) {
                    self.release_slot(&p.lease_id);
                    self.dispatch_all();
                }
            }
            FromAgent::LeaseResult(r) => {
                if !self.owned_lease(&r.lease_id, &session.agent_id) {
                    tracing::info!(agent_id = %session.agent_id, lease_id = %r.lease_id, "dropping a result for a lease this agent no longer holds");
                    return;
                }
                self.finish_lease(r);
                self.release_if_drained(&session.agent_id);
                self.dispatch_all();
            }
        }
    }

    /// A draining agent with nothing left to report: end its stream, which
    /// tells it every result arrived.
    fn release_if_drained(&mut self, agent_id: &str) {
        if let Some(agent) = self.agents.get_mut(agent_id)
            && agent.going_away
            && agent.leases.is_empty()
            && agent.outgoing.take().is_some()
        {
            tracing::info!(agent_id, "agent drained");
            agent.disconnected_at = Some(Instant::now());
        }
    }

    fn owned_lease(&self, lease_id: &str, agent_id: &str) -> bool {
        self.leases
            .get(lease_id)
            .is_some_and(|l| l.agent == agent_id)
    }

    fn finish_lease(&mut self, r: fleet::LeaseResult) {
        let agent_id = self.leases.get(&r.lease_id).map(|l| l.agent.clone());
        let Some(op_name) = self.end_lease(&r.lease_id, false) else {
            return;
        };
        let fault = fault_of(&r);
        if let Some(id) = &agent_id
            && let Some(agent) = self.agents.get_mut(id)
        {
            match fault {
                Fault::Agent => {
                    agent.failures_in_a_row += 1;
                    if agent.failures_in_a_row >= QUARANTINE_AFTER
                        && !self.quarantined.contains_key(id)
                    {
                        tracing::error!(
                            agent_id = %id,
                            failures = agent.failures_in_a_row,
                            "agent failed every action it was given; taking it out of rotation until its process restarts or `outpost undrain` brings it back"
                        );
                        self.quarantined
                            .insert(id.clone(), agent.process_id.clone());
                    }
                }
                // Trouble on the way is nobody's fault in particular.
                Fault::Transient => {}
                Fault::Action | Fault::None => agent.failures_in_a_row = 0,
            }
        }
        match r.outcome {
            Some(fleet::lease_result::Outcome::Result(result)) => {
                let cacheable = self.ops.get(&op_name).is_some_and(|op| op.job.cacheable);
                let timeout = self.ops.get(&op_name).map(|op| op.job.timeout);
                // The action ran but not all its outputs could be collected
                // (an output file that is a directory): the client gets
                // the result with that status, and it is not cached.
                let uncollected = r.status.clone().filter(|s| s.code != Code::Ok as i32);
                let status = if r.timed_out {
                    status(
                        Code::DeadlineExceeded,
                        format!(
                            "the action ran past its timeout of {} and was killed",
                            timeout.map_or_else(|| "?".to_owned(), |t| Span(t).to_string())
                        ),
                    )
                } else if let Some(s) = uncollected.clone() {
                    s
                } else {
                    status(Code::Ok, "")
                };
                let response = reapi::ExecuteResponse {
                    result: Some(result),
                    cached_result: false,
                    status: Some(status),
                    message: r.message.clone(),
                    ..Default::default()
                };
                if cacheable
                    && !r.timed_out
                    && uncollected.is_none()
                    && response.result.as_ref().is_some_and(|r| r.exit_code == 0)
                {
                    // Completed once the Action Cache has it, so a client
                    // that asks again right away gets the cached result.
                    self.write_action_cache_then_complete(&op_name, response);
                } else {
                    self.complete(&op_name, response);
                }
            }
            Some(fleet::lease_result::Outcome::Error(e))
                if matches!(fault, Fault::Agent | Fault::Transient) =>
            {
                tracing::warn!(operation = %op_name, error = %e.message, ?fault, "action could not run on its agent; retrying");
                if let Some(op) = self.ops.get_mut(&op_name) {
                    op.last_error = Some(e.message);
                }
                // Another agent may do better than one that is broken.
                let avoid = (fault == Fault::Agent).then_some(agent_id).flatten();
                self.retry(&op_name, avoid);
            }
            Some(fleet::lease_result::Outcome::Error(e)) => {
                let message = e.message.clone();
                self.complete(
                    &op_name,
                    reapi::ExecuteResponse {
                        status: Some(e),
                        message,
                        ..Default::default()
                    },
                );
            }
            None => self.fail(
                &op_name,
                Code::Internal,
                "the agent sent an empty result".to_owned(),
            ),
        }
    }

    fn write_action_cache_then_complete(&self, op_name: &str, response: reapi::ExecuteResponse) {
        let Some(op) = self.ops.get(op_name) else {
            return;
        };
        let ac = Arc::clone(&self.action_cache);
        let instance = op.job.instance_name.clone();
        let digest = op.job.action_digest;
        let bytes = response
            .result
            .as_ref()
            .map(|r| r.encode_to_vec())
            .unwrap_or_default()
            .into();
        let name = op_name.to_owned();
        let tx = self.self_tx.clone();
        tokio::spawn(async move {
            if let Err(e) = ac.record_action_result(&instance, digest, bytes).await {
                tracing::warn!(action_digest = %digest, error = %e, "cannot write the action cache");
            }
            let _ = tx
                .send(Msg::Completed {
                    name,
                    response: Box::new(response),
                })
                .await;
        });
    }

    /// Frees a lease's slot and resources (once).
    fn release_slot(&mut self, lease_id: &str) {
        let Some(lease) = self.leases.get_mut(lease_id) else {
            return;
        };
        if !lease.holds_slot {
            return;
        }
        lease.holds_slot = false;
        let resources = std::mem::take(&mut lease.resources);
        if let Some(agent) = self.agents.get_mut(&lease.agent) {
            agent.used_slots = agent.used_slots.saturating_sub(1);
            for (k, v) in resources {
                if let Some(u) = agent.used.get_mut(&k) {
                    *u = u.saturating_sub(v);
                }
            }
        }
    }

    /// Ends a lease; with `tell_agent`, the agent is told to kill it.
    /// Returns the operation it was for.
    fn end_lease(&mut self, lease_id: &str, tell_agent: bool) -> Option<String> {
        self.release_slot(lease_id);
        let lease = self.leases.remove(lease_id)?;
        if let Some(agent) = self.agents.get_mut(&lease.agent) {
            agent.leases.remove(lease_id);
            if tell_agent && let Some(out) = &agent.outgoing {
                let _ = out.try_send(Ok(fleet::CoordinatorMessage {
                    kind: Some(ToAgent::Cancel(fleet::Cancel {
                        lease_id: lease_id.to_owned(),
                    })),
                }));
            }
        }
        if let Some(op) = self.ops.get(&lease.op)
            && let Some(n) = self.running_by_build.get_mut(&op.job.invocation)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                // One entry per build would otherwise pile up forever.
                self.running_by_build.remove(&op.job.invocation);
            }
        }
        if let Some(op) = self.ops.get_mut(&lease.op) {
            op.lease = None;
        }
        Some(lease.op)
    }

    /// The agent holding this lease is gone: run the action elsewhere.
    /// Unless `counts`, the attempt is given back (the action was not to
    /// blame).
    fn lose_lease(&mut self, lease_id: &str, counts: bool) {
        let agent = self.leases.get(lease_id).map(|l| l.agent.clone());
        if let Some(op) = self.end_lease(lease_id, false) {
            if counts {
                self.retry(&op, agent);
            } else {
                if let Some(op) = self.ops.get_mut(&op) {
                    op.attempt = op.attempt.saturating_sub(1);
                }
                self.retry(&op, None);
            }
        }
    }

    fn retry(&mut self, name: &str, lost_on: Option<String>) {
        let Some(op) = self.ops.get_mut(name) else {
            return;
        };
        if op.done_at.is_some() {
            return;
        }
        op.lost_on.extend(lost_on);
        if op.attempt >= self.settings.max_attempts {
            let agents = op.lost_on.join(", ");
            let last = op
                .last_error
                .as_deref()
                .map_or_else(String::new, |e| format!("; the last error: {e}"));
            let message = format!(
                "action {} failed {} times because its agent was lost or could not run it \
                 (agents: {agents}){last}; it may crash agents, so it is not retried again",
                op.job.action_digest, op.attempt
            );
            self.fail(name, Code::Internal, message);
            return;
        }
        op.state.send_modify(|s| s.stage = Stage::Queued);
        self.metrics.retries.inc();
        // Keeps its place: seq is unchanged.
        let op = self.ops.remove(name).expect("checked above");
        self.enqueue(name, &op);
        self.ops.insert(name.to_owned(), op);
        self.dispatch_all();
    }

    // ---- dispatch ----

    /// Hands out queued work, one action per agent per round, least loaded
    /// agents first, so work spreads over the fleet.
    fn dispatch_all(&mut self) {
        loop {
            if self.queued == 0 {
                return;
            }
            let mut ids: Vec<(u64, String)> = self
                .agents
                .iter()
                .filter(|(id, a)| {
                    a.outgoing.is_some() && self.takes_work(id) && a.used_slots < a.slots
                })
                .map(|(id, a)| {
                    (
                        u64::from(a.used_slots) * 1000 / u64::from(a.slots.max(1)),
                        id.clone(),
                    )
                })
                .collect();
            ids.sort_unstable();
            let mut progress = false;
            for (_, id) in ids {
                progress |= self.dispatch_one(&id);
            }
            if !progress {
                return;
            }
        }
    }

    /// Gives the agent one action, if it has a free slot and one fits.
    fn dispatch_one(&mut self, agent_id: &str) -> bool {
        let Some(agent) = self.agents.get(agent_id) else {
            return false;
        };
        if agent.outgoing.is_none()
            || !self.takes_work(agent_id)
            || agent.used_slots >= agent.slots
            || self.queued == 0
        {
            return false;
        }
        let mut best: Option<((usize, i32, u64), String)> = None;
        for (req, builds) in &self.queue {
            if !agent.offer.satisfies(req) || !fits_now(agent, req) {
                continue;
            }
            for (build, q) in builds {
                let Some(((priority, seq), name)) = q.first_key_value() else {
                    continue;
                };
                let Some(op) = self.ops.get(name) else {
                    continue;
                };
                if !agent.offer.holds_inputs(op.job.input_bytes) {
                    continue;
                }
                if op.lost_on.iter().any(|a| a == agent_id)
                    && self.another_agent_could_run(agent_id, req)
                {
                    continue;
                }
                let running = self.running_by_build.get(build).copied().unwrap_or(0);
                let key = (running, *priority, *seq);
                if best.as_ref().is_none_or(|(k, _)| key < *k) {
                    best = Some((key, name.clone()));
                }
            }
        }
        let Some((_, name)) = best else { return false };
        self.dequeue(&name);
        self.lease(&name, agent_id)
    }

    fn another_agent_could_run(&self, agent_id: &str, req: &Requirements) -> bool {
        self.agents.iter().any(|(id, a)| {
            id != agent_id && a.outgoing.is_some() && self.takes_work(id) && a.offer.satisfies(req)
        })
    }

    /// Leases an operation to an agent; false if the agent could not be
    /// reached (the operation is queued again).
    fn lease(&mut self, name: &str, agent_id: &str) -> bool {
        let lease_id = random_id();
        let Some(op) = self.ops.get_mut(name) else {
            return false;
        };
        op.attempt += 1;
        let message = fleet::CoordinatorMessage {
            kind: Some(ToAgent::Lease(fleet::Lease {
                lease_id: lease_id.clone(),
                operation_name: name.to_owned(),
                instance_name: op.job.instance_name.clone(),
                action_digest: Some(op.job.action_digest.to_proto()),
                digest_function: op.job.action_digest.function.to_proto() as i32,
                attempt: op.attempt,
                timeout: prost_types::Duration::try_from(op.job.timeout).ok(),
                config: op.job.config.clone(),
                queued_at: Some(prost_types::Timestamp::from(op.job.queued_at)),
                action: op.job.prefetched.action.clone(),
                command: op.job.prefetched.command.clone(),
                directories: op
                    .job
                    .prefetched
                    .directories
                    .iter()
                    .map(|(d, data)| fleet::Blob {
                        digest: Some(d.to_proto()),
                        data: data.clone(),
                    })
                    .collect(),
            })),
        };
        let agent = self
            .agents
            .get_mut(agent_id)
            .expect("dispatch checked the agent");
        let sent = agent
            .outgoing
            .as_ref()
            .is_some_and(|out| out.try_send(Ok(message)).is_ok());
        if !sent {
            // The stream is gone or stuck: the agent never got it.
            agent.outgoing = None;
            agent.disconnected_at.get_or_insert_with(Instant::now);
            op.attempt -= 1;
            let op = self.ops.remove(name).expect("present");
            self.enqueue(name, &op);
            self.ops.insert(name.to_owned(), op);
            return false;
        }
        agent.used_slots += 1;
        for (k, v) in &op.job.requirements.min {
            *agent.used.entry(k.clone()).or_default() += v;
        }
        agent.leases.insert(lease_id.clone());
        op.lease = Some(lease_id.clone());
        op.state.send_modify(|s| s.stage = Stage::Executing);
        *self
            .running_by_build
            .entry(op.job.invocation.clone())
            .or_default() += 1;
        tracing::debug!(operation = %name, agent_id, lease_id = %lease_id, attempt = op.attempt, "leased");
        self.leases.insert(
            lease_id,
            Lease {
                op: name.to_owned(),
                agent: agent_id.to_owned(),
                holds_slot: true,
                resources: op.job.requirements.min.clone(),
            },
        );
        true
    }

    // ---- time ----

    /// Brings the fleet gauges up to date (after every message and tick).
    fn update_gauges(&self) {
        let connected = self
            .agents
            .values()
            .filter(|a| a.outgoing.is_some())
            .count();
        self.metrics
            .agents_connected
            .set(i64::try_from(connected).unwrap_or(i64::MAX));
        self.metrics
            .executing
            .set(i64::try_from(self.leases.len()).unwrap_or(i64::MAX));
    }

    fn tick(&mut self) {
        let now = Instant::now();
        self.update_gauges();
        let silent_after = self.settings.heartbeat_interval * MISSED_HEARTBEATS;
        let mut lost_agents = Vec::new();
        for (id, agent) in &mut self.agents {
            if agent.outgoing.is_some() && now.duration_since(agent.last_heartbeat) > silent_after {
                tracing::warn!(agent_id = %id, "agent missed its heartbeats; treating it as disconnected");
                agent.outgoing = None;
                agent.disconnected_at = Some(now);
            }
            if let Some(at) = agent.disconnected_at
                && now.duration_since(at) > self.settings.reconnect_grace
            {
                lost_agents.push(id.clone());
            }
        }
        let stale: Vec<(String, bytes::Bytes)> = self
            .agents
            .iter_mut()
            .filter(|(_, a)| {
                a.outgoing.is_some() && now.duration_since(a.remembered_at) > REMEMBER_EVERY
            })
            .map(|(id, a)| {
                a.remembered_at = now;
                (id.clone(), a.remembered.clone())
            })
            .collect();
        for (id, caps) in stale {
            self.remember(&id, caps);
        }
        for id in lost_agents {
            let Some(agent) = self.agents.remove(&id) else {
                continue;
            };
            self.remember(&id, agent.remembered.clone());
            tracing::warn!(agent_id = %id, leases = agent.leases.len(), "agent lost; its actions run elsewhere");
            self.metrics.agents_lost.inc();
            self.seen.insert(id.clone(), (agent.offer.clone(), now));
            // Put the agent back briefly so lease bookkeeping finds it.
            let leases: Vec<String> = agent.leases.iter().cloned().collect();
            self.agents.insert(id.clone(), agent);
            for lease in leases {
                self.lose_lease(&lease, true);
            }
            self.fleet_shrank = true;
            self.agents.remove(&id);
        }
        let abandoned: Vec<String> = self
            .ops
            .iter()
            .filter(|(_, op)| {
                op.done_at.is_none()
                    && op
                        .abandoned_since
                        .is_some_and(|t| now.duration_since(t) > self.settings.abandon_after)
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in abandoned {
            let _ = self.cancel(&name, "cancelled: no client waits for it any more");
        }
        let keep = self.settings.keep_finished;
        self.ops
            .retain(|_, op| op.done_at.is_none_or(|t| now.duration_since(t) < keep));
        let memory = self.settings.fleet_memory;
        let agents = &self.agents;
        let before = self.seen.len();
        self.seen
            .retain(|id, (_, at)| now.duration_since(*at) < memory || agents.contains_key(id));
        self.fleet_shrank |= self.seen.len() < before;
        self.fail_unsatisfiable();
        self.release_agents_when_idle();
    }

    /// While shutting down: once no client waits on an unfinished
    /// operation, ends every agent's stream (agents keep what they run and
    /// reconnect to the next coordinator), so the server can stop.
    fn release_agents_when_idle(&mut self) {
        if self.stopping.is_none()
            || self
                .ops
                .values()
                .any(|op| op.done_at.is_none() && op.waiters > 0)
        {
            return;
        }
        if let Some(idle) = self.stopping.take() {
            let _ = idle.send(());
        }
        let mut released = 0;
        for agent in self.agents.values_mut() {
            if agent.outgoing.take().is_some() {
                agent.disconnected_at = Some(Instant::now());
                released += 1;
            }
        }
        if released > 0 {
            tracing::info!(
                agents = released,
                "no client waits on a running action; closing the agents' streams"
            );
        }
    }
}

impl State {
    fn queue_gauge(&self, req: &Requirements) -> prometheus_client::metrics::gauge::Gauge {
        self.metrics
            .queue_length
            .get_or_create(&metrics::PlatformLabels {
                platform: req.to_string(),
            })
            .clone()
    }
}

fn duration_between(
    a: &Option<prost_types::Timestamp>,
    b: &Option<prost_types::Timestamp>,
) -> Option<Duration> {
    let (Some(a), Some(b)) = (a, b) else {
        return None;
    };
    let a = std::time::SystemTime::try_from(*a).ok()?;
    let b = std::time::SystemTime::try_from(*b).ok()?;
    b.duration_since(a).ok()
}

fn recent_action(
    name: &str,
    digest: Digest,
    response: &reapi::ExecuteResponse,
) -> super::RecentAction {
    let result = response.result.as_ref();
    let meta = result.and_then(|r| r.execution_metadata.as_ref());
    let span =
        |from: fn(&reapi::ExecutedActionMetadata) -> &Option<prost_types::Timestamp>,
         to: fn(&reapi::ExecutedActionMetadata) -> &Option<prost_types::Timestamp>| {
            meta.and_then(|m| duration_between(from(m), to(m)))
        };
    let digest_of =
        |d: Option<&reapi::Digest>| d.and_then(|d| Digest::from_proto(d, digest.function).ok());
    super::RecentAction {
        operation: name.to_owned(),
        action_digest: digest,
        worker: meta.map(|m| m.worker.clone()).unwrap_or_default(),
        exit_code: result.map(|r| r.exit_code),
        error: response
            .status
            .as_ref()
            .filter(|s| s.code != 0)
            .map(|s| s.message.clone())
            .unwrap_or_default(),
        queued: span(|m| &m.queued_timestamp, |m| &m.worker_start_timestamp),
        fetch: span(
            |m| &m.input_fetch_start_timestamp,
            |m| &m.input_fetch_completed_timestamp,
        ),
        execution: span(
            |m| &m.execution_start_timestamp,
            |m| &m.execution_completed_timestamp,
        ),
        upload: span(
            |m| &m.output_upload_start_timestamp,
            |m| &m.output_upload_completed_timestamp,
        ),
        stdout: digest_of(result.and_then(|r| r.stdout_digest.as_ref())),
        stderr: digest_of(result.and_then(|r| r.stderr_digest.as_ref())),
        finished: std::time::SystemTime::now(),
    }
}

/// Counts a finished operation by outcome and records its stage times.
fn record_outcome(m: &Metrics, response: &reapi::ExecuteResponse) {
    let code = response.status.as_ref().map_or(0, |s| s.code);
    let outcome = match (Code::from_i32(code), &response.result) {
        (Code::Ok, Some(r)) if r.exit_code == 0 => metrics::Outcome::Success,
        (Code::Ok, Some(_)) => metrics::Outcome::Failed,
        (Code::DeadlineExceeded, _) => metrics::Outcome::Timeout,
        (Code::Cancelled, _) => metrics::Outcome::Cancelled,
        _ => metrics::Outcome::Error,
    };
    m.action(outcome);
    let Some(meta) = response
        .result
        .as_ref()
        .and_then(|r| r.execution_metadata.as_ref())
    else {
        return;
    };
    for (stage, from, to) in [
        (
            metrics::Stage::Queued,
            &meta.queued_timestamp,
            &meta.worker_start_timestamp,
        ),
        (
            metrics::Stage::InputFetch,
            &meta.input_fetch_start_timestamp,
            &meta.input_fetch_completed_timestamp,
        ),
        (
            metrics::Stage::Execution,
            &meta.execution_start_timestamp,
            &meta.execution_completed_timestamp,
        ),
        (
            metrics::Stage::Upload,
            &meta.output_upload_start_timestamp,
            &meta.output_upload_completed_timestamp,
        ),
    ] {
        if let Some(took) = duration_between(from, to) {
            m.stage(stage, took);
        }
    }
}

/// Whose fault an error result is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Not an error: the action ran.
    None,
    Action,
    Agent,
    Transient,
}

fn fault_of(r: &fleet::LeaseResult) -> Fault {
    if !matches!(r.outcome, Some(fleet::lease_result::Outcome::Error(_))) {
        return Fault::None;
    }
    match fleet::Fault::try_from(r.fault).unwrap_or_default() {
        fleet::Fault::Action => Fault::Action,
        fleet::Fault::Agent => Fault::Agent,
        fleet::Fault::Transient => Fault::Transient,
        // Agents that do not say: retryable errors were the agent's.
        fleet::Fault::Unspecified if r.retryable => Fault::Agent,
        fleet::Fault::Unspecified => Fault::Action,
    }
}

/// Whether the agent has the consumable resources free right now.
fn fits_now(agent: &Agent, req: &Requirements) -> bool {
    req.min.iter().all(|(k, need)| {
        let total = agent.offer.resources.get(k).copied().unwrap_or(0);
        let used = agent.used.get(k).copied().unwrap_or(0);
        total.saturating_sub(used) >= *need
    })
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
