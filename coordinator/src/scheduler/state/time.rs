//! What happens with time: gauges, heartbeats and lost agents, abandoned
//! and finished operations, the forgotten fleet, and shutting down.

use super::*;

impl State {
    /// Brings the fleet gauges up to date (after every message and tick).
    pub(super) fn update_gauges(&self) {
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
        self.gpu_gauges();
    }

    pub(super) fn tick(&mut self) {
        let now = Instant::now();
        self.update_gauges();
        // An action held for a warm agent goes to any agent once its wait
        // is over, even if nothing else happens.
        if self.queued > 0 {
            self.dispatch_all();
        }
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
            self.fleet_changed = true;
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
        self.fleet_changed |= self.seen.len() < before;
        self.fail_unsatisfiable();
        self.release_agents_when_idle();
    }

    /// While shutting down: once no client waits on an unfinished
    /// operation, ends every agent's stream (agents keep what they run and
    /// reconnect to the next coordinator), so the server can stop.
    pub(super) fn release_agents_when_idle(&mut self) {
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
