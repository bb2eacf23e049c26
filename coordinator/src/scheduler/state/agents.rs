//! Agents: registration (reconnects, restarts, quarantine), their
//! messages, lease results by fault, retries of lost work.

use super::*;

impl State {
    pub(super) fn join(
        &mut self,
        register: fleet::Register,
        outgoing: Outgoing,
    ) -> Result<(Session, fleet::Registered), Error> {
        if register.protocol_version != outpost_proto::FLEET_PROTOCOL_VERSION {
            return Err(Error::Precondition(format!(
                "agent {} speaks fleet protocol version {}; this coordinator ({}) accepts version {}; \
                 run the same outpost release on the agent and the coordinator",
                register.agent_id,
                register.protocol_version,
                env!("CARGO_PKG_VERSION"),
                outpost_proto::FLEET_PROTOCOL_VERSION
            )));
        }
        if register.agent_id.is_empty() || register.agent_id.len() > 256 {
            return Err(Error::Invalid(
                "agent_id must be 1 to 256 characters".to_owned(),
            ));
        }
        let caps = register.capabilities.unwrap_or_default();
        if caps.slots == 0 {
            return Err(Error::Invalid(
                "an agent needs at least one slot".to_owned(),
            ));
        }
        let offer = Offer::of(&caps);
        let remembered = bytes::Bytes::from(
            fleet::Capabilities {
                properties: caps.properties.clone(),
                resources: caps.resources.clone(),
                max_input_bytes: caps.max_input_bytes,
                gpus: caps.gpus.clone(),
                features: caps.features.clone(),
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
            agent.gpus.resize(agent.offer.gpus.len());
            agent.remembered = remembered;
            agent.remembered_at = Instant::now();
            agent.slots = caps.slots;
            agent.live_output = streams_output(&caps);
            agent.warm_keys = warm_keys_of(&caps);
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
                    gpus: Default::default(),
                    outgoing: Some(outgoing),
                    session: session.id,
                    last_heartbeat: Instant::now(),
                    disconnected_at: None,
                    going_away: false,
                    process_id: register.process_id.clone(),
                    live_output: streams_output(&caps),
                    warm_keys: warm_keys_of(&caps),
                    leases: HashSet::new(),
                    failures_in_a_row: 0,
                },
            );
        }
        self.seen
            .insert(register.agent_id.clone(), (offer, Instant::now()));
        self.fleet_changed = true;
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
            let _ = out.try_send(fleet::CoordinatorMessage {
                kind: Some(ToAgent::Registered(registered.clone())),
            });
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
    pub(super) fn remember(&self, agent_id: &str, capabilities: bytes::Bytes) {
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

    pub(super) fn on_agent_message(&mut self, session: &Session, message: FromAgent) {
        let Some(agent) = self.agents.get_mut(&session.agent_id) else {
            return;
        };
        if agent.session != session.id {
            return;
        }
        agent.last_heartbeat = Instant::now();
        match message {
            FromAgent::Heartbeat(h) => {
                if let Some(keys) = agent.warm_keys.as_mut() {
                    *keys = h.warm_keys.into_iter().collect();
                }
            }
            FromAgent::LeaseAccepted(_) | FromAgent::StageChanged(_) => {}
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
            FromAgent::OutputChunk(chunk) => {
                if let Some(lease) = self.leases.get(&chunk.lease_id)
                    && lease.agent == session.agent_id
                {
                    self.live.append(&lease.op, &lease.agent, &chunk);
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
    pub(super) fn release_if_drained(&mut self, agent_id: &str) {
        if let Some(agent) = self.agents.get_mut(agent_id)
            && agent.going_away
            && agent.leases.is_empty()
            && agent.outgoing.take().is_some()
        {
            tracing::info!(agent_id, "agent drained");
            agent.disconnected_at = Some(Instant::now());
        }
    }

    pub(super) fn owned_lease(&self, lease_id: &str, agent_id: &str) -> bool {
        self.leases
            .get(lease_id)
            .is_some_and(|l| l.agent == agent_id)
    }

    pub(super) fn finish_lease(&mut self, r: fleet::LeaseResult) {
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
            // What ran well warm stays warm there, as far as the scheduler
            // knows until the agent's next heartbeat says otherwise.
            if fault == Fault::None
                && let (Some(keys), Some(warm)) = (
                    agent.warm_keys.as_mut(),
                    self.ops.get(&op_name).and_then(|o| o.job.warm.as_ref()),
                )
            {
                keys.insert(warm.key.clone());
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

    pub(super) fn write_action_cache_then_complete(
        &self,
        op_name: &str,
        response: reapi::ExecuteResponse,
    ) {
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
    pub(super) fn release_slot(&mut self, lease_id: &str) {
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
            agent.release_gpus(lease_id);
            for (k, v) in resources {
                if let Some(u) = agent.used.get_mut(&k) {
                    *u = u.saturating_sub(v);
                }
            }
        }
    }

    /// Ends a lease; with `tell_agent`, the agent is told to kill it.
    /// Returns the operation it was for.
    pub(super) fn end_lease(&mut self, lease_id: &str, tell_agent: bool) -> Option<String> {
        self.release_slot(lease_id);
        let lease = self.leases.remove(lease_id)?;
        self.live.end(&lease.op);
        if let Some(agent) = self.agents.get_mut(&lease.agent) {
            agent.leases.remove(lease_id);
            if tell_agent && let Some(out) = &agent.outgoing {
                let _ = out.try_send(fleet::CoordinatorMessage {
                    kind: Some(ToAgent::Cancel(fleet::Cancel {
                        lease_id: lease_id.to_owned(),
                    })),
                });
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
    pub(super) fn lose_lease(&mut self, lease_id: &str, counts: bool) {
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

    pub(super) fn retry(&mut self, name: &str, lost_on: Option<String>) {
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
}

/// The warm keys an agent holds: empty at first for agents with the
/// "warm-keys" feature, none (never routed to as warm) for older ones.
fn warm_keys_of(caps: &fleet::Capabilities) -> Option<HashSet<String>> {
    caps.features
        .iter()
        .any(|f| f == outpost_proto::features::WARM_KEYS)
        .then(HashSet::new)
}

/// Whose fault an error result is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fault {
    /// Not an error: the action ran.
    None,
    Action,
    Agent,
    Transient,
}

pub(super) fn fault_of(r: &fleet::LeaseResult) -> Fault {
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

/// Whether an agent streams its actions' output while they run.
fn streams_output(caps: &fleet::Capabilities) -> bool {
    caps.features
        .iter()
        .any(|f| f == outpost_proto::features::LIVE_OUTPUT)
}
