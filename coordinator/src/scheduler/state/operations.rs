//! Operations: submitting, the could-ever-run check, completing, failing
//! and cancelling, and what a finished one leaves for the status page.

use super::*;

impl State {
    pub(super) fn submit(&mut self, job: Job) -> Result<(String, watch::Receiver<OpState>), Error> {
        if self.started.elapsed() >= self.settings.startup_grace
            && let Some(why) = self.unsatisfiable(&job)
        {
            return Err(Error::Precondition(why));
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
    pub(super) fn unsatisfiable(&self, job: &Job) -> Option<String> {
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
    pub(super) fn fail_unsatisfiable(&mut self) {
        if !self.fleet_changed || self.started.elapsed() < self.settings.startup_grace {
            return;
        }
        self.fleet_changed = false;
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
    pub(super) fn takes_work(&self, agent_id: &str) -> bool {
        self.agents.get(agent_id).is_some_and(|a| {
            !a.going_away
                && !self.drained.contains(agent_id)
                && !self.quarantined.contains_key(agent_id)
        })
    }

    pub(super) fn enqueue(&mut self, name: &str, op: &Op) {
        self.queue
            .entry(op.job.requirements.clone())
            .or_default()
            .entry(op.job.invocation.clone())
            .or_default()
            .insert((op.job.priority, op.seq), name.to_owned());
        self.queued += 1;
        self.queue_gauge(&op.job.requirements).inc();
    }

    pub(super) fn dequeue(&mut self, name: &str) -> bool {
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

    pub(super) fn complete(&mut self, name: &str, response: reapi::ExecuteResponse) {
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

    pub(super) fn fail(&mut self, name: &str, code: Code, message: String) {
        self.complete(
            name,
            reapi::ExecuteResponse {
                status: Some(status(code, message.clone())),
                message,
                ..Default::default()
            },
        );
    }

    pub(super) fn cancel(&mut self, name: &str, why: &str) -> Result<(), Error> {
        let Some(op) = self.ops.get(name) else {
            return Err(Error::NotFound(format!(
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
}

pub(super) fn duration_between(
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

pub(super) fn recent_action(
    name: &str,
    digest: Digest,
    response: &reapi::ExecuteResponse,
) -> crate::scheduler::RecentAction {
    let result = response.result.as_ref();
    let meta = result.and_then(|r| r.execution_metadata.as_ref());
    let span =
        |from: fn(&reapi::ExecutedActionMetadata) -> &Option<prost_types::Timestamp>,
         to: fn(&reapi::ExecutedActionMetadata) -> &Option<prost_types::Timestamp>| {
            meta.and_then(|m| duration_between(from(m), to(m)))
        };
    let digest_of =
        |d: Option<&reapi::Digest>| d.and_then(|d| Digest::from_proto(d, digest.function).ok());
    crate::scheduler::RecentAction {
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
pub(super) fn record_outcome(m: &Metrics, response: &reapi::ExecuteResponse) {
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
