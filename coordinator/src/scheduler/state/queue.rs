//! The queue: handing queued work to agents with free slots (fair between
//! builds, least-loaded agents first) and leasing it.

use super::*;

impl State {
    /// Hands out queued work, one action per agent per round, least loaded
    /// agents first, so work spreads over the fleet.
    pub(super) fn dispatch_all(&mut self) {
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
    pub(super) fn dispatch_one(&mut self, agent_id: &str) -> bool {
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
        // Actions this agent holds warm first, then fairness between builds.
        let mut best: Option<((bool, usize, i32, u64), String)> = None;
        for (req, builds) in &self.queue {
            if !agent.offer.satisfies(req) || !fits_now(agent, req) {
                continue;
            }
            for (build, q) in builds {
                // The build's first action not held for another agent.
                let Some(((priority, seq), name, op)) =
                    q.iter().take(WARM_SCAN).find_map(|(order, name)| {
                        let op = self.ops.get(name)?;
                        (!self.held_for_another(agent_id, op, req)).then_some((order, name, op))
                    })
                else {
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
                let cold = !op
                    .job
                    .warm
                    .as_ref()
                    .is_some_and(|w| holds_warm(agent, &w.key));
                let key = (cold, running, *priority, *seq);
                if best.as_ref().is_none_or(|(k, _)| key < *k) {
                    best = Some((key, name.clone()));
                }
            }
        }
        let Some((_, name)) = best else { return false };
        self.dequeue(&name);
        self.lease(&name, agent_id)
    }

    /// Whether `op` waits for another agent that holds its warm key (one
    /// connected, taking work and able to run it) rather than going to
    /// `agent_id`: only while it has been queued less than its
    /// `runner-recycling-max-wait`.
    pub(super) fn held_for_another(&self, agent_id: &str, op: &Op, req: &Requirements) -> bool {
        let Some(warm) = &op.job.warm else {
            return false;
        };
        let here = self.agents.get(agent_id);
        if here.is_some_and(|a| holds_warm(a, &warm.key)) {
            return false;
        }
        let waited = op.job.queued_at.elapsed().unwrap_or_default();
        waited < warm.max_wait
            && self.agents.iter().any(|(id, a)| {
                id != agent_id
                    && a.outgoing.is_some()
                    && self.takes_work(id)
                    && holds_warm(a, &warm.key)
                    && a.offer.satisfies(req)
            })
    }

    pub(super) fn another_agent_could_run(&self, agent_id: &str, req: &Requirements) -> bool {
        self.agents.iter().any(|(id, a)| {
            id != agent_id && a.outgoing.is_some() && self.takes_work(id) && a.offer.satisfies(req)
        })
    }

    /// Leases an operation to an agent; false if the agent could not be
    /// reached (the operation is queued again).
    pub(super) fn lease(&mut self, name: &str, agent_id: &str) -> bool {
        let lease_id = random_id();
        let Some(op) = self.ops.get_mut(name) else {
            return false;
        };
        op.attempt += 1;
        let (gpus, named_gpus) = self
            .agents
            .get(agent_id)
            .map_or_else(Default::default, |a| {
                let gpus = a.free_gpus(&op.job.requirements).unwrap_or_default();
                let named = a.named_gpus(&gpus);
                (gpus, named)
            });
        let message = fleet::CoordinatorMessage {
            kind: Some(ToAgent::Lease(fleet::Lease {
                lease_id: lease_id.clone(),
                operation_name: name.to_owned(),
                instance_name: op.job.instance_name.clone(),
                action_digest: Some(op.job.action_digest.to_proto()),
                digest_function: op.job.action_digest.function.to_proto() as i32,
                attempt: op.attempt,
                timeout: prost_types::Duration::try_from(op.job.timeout).ok(),
                platform: Some(reapi::Platform {
                    properties: op.job.platform.clone(),
                }),
                queued_at: Some(prost_types::Timestamp::from(op.job.queued_at)),
                // Only agents that keep workers apart by it get one.
                warm_key: match (&op.job.warm, self.agents.get(agent_id)) {
                    (Some(w), Some(a)) if a.warm_keys.is_some() => w.key.clone(),
                    _ => String::new(),
                },
                stream_output: self.agents.get(agent_id).is_some_and(|a| a.live_output),
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
                gpus: named_gpus,
            })),
        };
        let agent = self
            .agents
            .get_mut(agent_id)
            .expect("dispatch checked the agent");
        let sent = agent
            .outgoing
            .as_ref()
            .is_some_and(|out| out.try_send(message).is_ok());
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
        agent.hold_gpus(&gpus, &lease_id);
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

    pub(super) fn queue_gauge(
        &self,
        req: &Requirements,
    ) -> prometheus_client::metrics::gauge::Gauge {
        self.metrics
            .queue_length
            .get_or_create(&metrics::PlatformLabels {
                platform: req.to_string(),
            })
            .clone()
    }
}

/// Queued actions of one build looked at past ones held for a warm agent.
const WARM_SCAN: usize = 64;

/// Whether the agent said it holds `key` warm.
pub(super) fn holds_warm(agent: &Agent, key: &str) -> bool {
    agent.warm_keys.as_ref().is_some_and(|k| k.contains(key))
}

/// Whether the agent has the consumable resources free right now.
pub(super) fn fits_now(agent: &Agent, req: &Requirements) -> bool {
    req.min.iter().all(|(k, need)| {
        let total = agent.offer.resources.get(k).copied().unwrap_or(0);
        let used = agent.used.get(k).copied().unwrap_or(0);
        total.saturating_sub(used) >= *need
    }) && agent.free_gpus(req).is_some()
}
