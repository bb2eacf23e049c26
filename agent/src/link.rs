//! The agent's one connection: dial out, register, take leases, heartbeat,
//! report; on any break, back off (exponential, with jitter) and dial again.
//! Leases keep running while the link is down; their results wait and are
//! sent once the coordinator says it still expects them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::Transport as Channel;
use outpost_proto::fleet::fleet_client::FleetClient;
use outpost_proto::fleet::{
    self, agent_message::Kind as ToCoordinator, coordinator_message::Kind as FromCoordinator,
};
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::exec::{Events, Executor};

const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Leases running on this agent, by lease id.
#[derive(Default, Clone)]
pub struct Running(Arc<Mutex<HashMap<String, CancellationToken>>>);

impl Running {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, CancellationToken>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    fn len(&self) -> usize {
        self.lock().len()
    }
}

pub struct Link {
    pub channel: Channel,
    /// Sent at every registration, with the latest capabilities.
    pub register: fleet::Register,
    /// Changed by a reload; a change means registering again.
    pub capabilities: tokio::sync::watch::Receiver<fleet::Capabilities>,
    pub executor: Arc<Executor>,
    pub running: Running,
    pub outbox_tx: mpsc::Sender<ToCoordinator>,
    pub outbox: mpsc::Receiver<ToCoordinator>,
    /// Results sent (or waiting to be sent) that the coordinator has not
    /// yet confirmed; see [`Reported`].
    pub reported: Reported,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Finished leases whose results may not have reached the coordinator (the
/// link can break right after a send). Their ids are offered again at the
/// next registration; the coordinator lists the ones it still expects, and
/// those results are sent again. The others were delivered or reassigned.
#[derive(Default, Clone)]
pub struct Reported(Arc<Mutex<HashMap<String, (std::time::Instant, fleet::LeaseResult)>>>);

/// How long an unconfirmed result is kept at most.
const KEEP_REPORTED: Duration = Duration::from_secs(900);

impl Reported {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (std::time::Instant, fleet::LeaseResult)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

enum End {
    /// Shut down cleanly (drained).
    Done,
    /// The link broke; dial again.
    Broken(String),
    /// The capabilities changed: register again at once.
    Reregister,
}

impl Link {
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = BACKOFF_START;
        loop {
            let mut registered = false;
            let end = self.session(&shutdown, &mut registered).await;
            self.metrics.set_connected(false);
            match end {
                End::Done => return,
                End::Reregister => {
                    tracing::info!("capabilities changed: registering again");
                    backoff = BACKOFF_START;
                }
                End::Broken(why) => {
                    if registered {
                        backoff = BACKOFF_START;
                    }
                    let jitter = Duration::from_millis(
                        rand::random::<u64>() % (backoff.as_millis() as u64 / 2 + 1),
                    );
                    let wait = backoff + jitter;
                    tracing::warn!(reason = %why, retry_in = ?wait, "connection to the coordinator lost");
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = shutdown.cancelled() => {
                            if self.running.len() == 0 {
                                return;
                            }
                            // Keep trying to hand results over until leases finish.
                            tokio::time::sleep(wait).await;
                        }
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    async fn session(&mut self, shutdown: &CancellationToken, registered: &mut bool) -> End {
        let (tx, rx) = mpsc::channel::<fleet::AgentMessage>(256);
        let mut register = self.register.clone();
        register.capabilities = Some(self.capabilities.borrow_and_update().clone());
        register.running_leases = self.running.ids();
        register
            .running_leases
            .extend(self.reported.lock().keys().cloned());
        let send = |kind| fleet::AgentMessage { kind: Some(kind) };
        if tx
            .send(send(ToCoordinator::Register(register)))
            .await
            .is_err()
        {
            return End::Broken("cannot queue the registration".into());
        }
        let mut client = FleetClient::new(self.channel.clone());
        let mut inbound = match client
            .join(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) => return End::Broken(describe(&s)),
        };
        let registered_msg = match inbound.message().await {
            Ok(Some(fleet::CoordinatorMessage {
                kind: Some(FromCoordinator::Registered(r)),
            })) => r,
            Ok(_) => return End::Broken("the coordinator did not answer the registration".into()),
            Err(s) => return End::Broken(describe(&s)),
        };
        *registered = true;
        self.metrics.set_connected(true);
        self.executor
            .remote
            .learn_limits(self.channel.clone())
            .await;
        let interval = registered_msg
            .heartbeat_interval
            .and_then(|d| Duration::try_from(d).ok())
            .unwrap_or(Duration::from_secs(5))
            .max(Duration::from_millis(100));
        // Leases the coordinator gave up on while we were away stop here.
        let resumed: std::collections::HashSet<String> =
            registered_msg.resumed_leases.into_iter().collect();
        for (id, token) in self.running.lock().iter() {
            if !resumed.contains(id) {
                tracing::info!(lease_id = %id, "the coordinator reassigned this lease; stopping it");
                token.cancel();
            }
        }
        let again: Vec<fleet::LeaseResult> = {
            let mut reported = self.reported.lock();
            reported.retain(|id, (at, _)| resumed.contains(id) && at.elapsed() < KEEP_REPORTED);
            reported.values().map(|(_, r)| r.clone()).collect()
        };
        for result in again {
            tracing::info!(lease_id = %result.lease_id, "sending a result again after reconnecting");
            if tx
                .send(send(ToCoordinator::LeaseResult(result)))
                .await
                .is_err()
            {
                return End::Broken("the stream closed".into());
            }
        }
        tracing::info!(heartbeat = ?interval, resumed = resumed.len(), "registered with the coordinator");
        let mut heartbeat = tokio::time::interval(interval);
        let mut draining = false;
        loop {
            if draining && self.running.len() == 0 && self.outbox.is_empty() {
                // The coordinator ends the stream once it has every result of
                // a draining agent; wait for that, so nothing is lost in flight.
                let _ = tokio::time::timeout(Duration::from_secs(10), async {
                    while let Ok(Some(_)) = inbound.message().await {}
                })
                .await;
                return End::Done;
            }
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(fleet::CoordinatorMessage { kind: Some(kind) })) => match kind {
                        FromCoordinator::Lease(lease) => self.start(lease),
                        FromCoordinator::Cancel(c) => {
                            if let Some(token) = self.running.lock().get(&c.lease_id) {
                                tracing::info!(lease_id = %c.lease_id, "cancelled by the coordinator");
                                token.cancel();
                            }
                        }
                        FromCoordinator::Drain(_) => {
                            draining = true;
                            let _ = tx.send(send(ToCoordinator::GoingAway(fleet::GoingAway { reason: "drain requested".into() }))).await;
                        }
                        FromCoordinator::Registered(_) => {}
                    },
                    Ok(Some(_)) => {}
                    Ok(None) => return End::Broken("the coordinator closed the stream".into()),
                    Err(s) => return End::Broken(describe(&s)),
                },
                Some(event) = self.outbox.recv() => {
                    // A result that does not get through stays in `reported`.
                    if tx.send(send(event)).await.is_err() {
                        return End::Broken("the stream closed".into());
                    }
                }
                _ = heartbeat.tick() => {
                    let busy = u32::try_from(self.running.len()).unwrap_or(u32::MAX);
                    let _ = tx.try_send(send(ToCoordinator::Heartbeat(fleet::Heartbeat { busy_slots: busy, warm_keys: self.executor.warm_keys() })));
                }
                Ok(()) = self.capabilities.changed(), if !draining => {
                    // Running leases resume under the new registration.
                    return End::Reregister;
                }
                () = shutdown.cancelled(), if !draining => {
                    tracing::info!(running = self.running.len(), "draining: finishing running actions, taking no new ones");
                    draining = true;
                    let _ = tx.send(send(ToCoordinator::GoingAway(fleet::GoingAway { reason: "shutting down".into() }))).await;
                }
            }
        }
    }

    fn start(&self, lease: fleet::Lease) {
        let token = CancellationToken::new();
        self.running
            .lock()
            .insert(lease.lease_id.clone(), token.clone());
        let executor = Arc::clone(&self.executor);
        let outbox = self.outbox_tx.clone();
        let running = self.running.clone();
        let reported = self.reported.clone();
        let metrics = Arc::clone(&self.metrics);
        metrics.running.inc();
        tokio::spawn(async move {
            let _running = RunningGauge(Arc::clone(&metrics));
            let id = lease.lease_id.clone();
            let _ = outbox
                .send(ToCoordinator::LeaseAccepted(fleet::LeaseAccepted {
                    lease_id: id.clone(),
                }))
                .await;
            let events = LeaseEvents {
                lease_id: id.clone(),
                outbox: outbox.clone(),
            };
            tracing::info!(lease_id = %id, operation = %lease.operation_name, attempt = lease.attempt, "running an action");
            let outcome = executor.run(&lease, token, &events).await;
            let message = match outcome {
                Ok(ran) => fleet::LeaseResult {
                    lease_id: id.clone(),
                    outcome: Some(fleet::lease_result::Outcome::Result(ran.result)),
                    retryable: false,
                    timed_out: ran.timed_out,
                    message: ran.message,
                    fault: fleet::Fault::Unspecified as i32,
                    status: ran.status,
                },
                Err(Error::Cancelled) => {
                    metrics.finished("cancelled");
                    running.lock().remove(&id);
                    return;
                }
                Err(e) => {
                    let fault = e.fault();
                    tracing::warn!(lease_id = %id, error = %e, fault = fault.as_str_name(), "action could not run");
                    lease_error(id.clone(), &e)
                }
            };
            metrics.finished(outcome_of(&message));
            // Kept until confirmed, and queued before the lease stops
            // counting as running, so neither a link break nor a drain
            // loses it.
            reported
                .lock()
                .insert(id.clone(), (std::time::Instant::now(), message.clone()));
            let _ = outbox.send(ToCoordinator::LeaseResult(message)).await;
            running.lock().remove(&id);
        });
    }
}

/// Counts a running lease down however its task ends.
struct RunningGauge(Arc<crate::metrics::Metrics>);

impl Drop for RunningGauge {
    fn drop(&mut self) {
        self.0.running.dec();
    }
}

fn outcome_of(r: &fleet::LeaseResult) -> &'static str {
    match &r.outcome {
        Some(fleet::lease_result::Outcome::Result(_)) if r.timed_out => "timeout",
        Some(fleet::lease_result::Outcome::Result(a)) if a.exit_code == 0 => "success",
        Some(fleet::lease_result::Outcome::Result(_)) => "failed",
        _ => "error",
    }
}

struct LeaseEvents {
    lease_id: String,
    outbox: mpsc::Sender<ToCoordinator>,
}

impl Events for LeaseEvents {
    fn stage(&self, stage: fleet::Stage) {
        let _ = self
            .outbox
            .try_send(ToCoordinator::StageChanged(fleet::StageChanged {
                lease_id: self.lease_id.clone(),
                stage: stage as i32,
            }));
    }

    fn exited(&self, exit_code: i32) {
        let _ = self
            .outbox
            .try_send(ToCoordinator::ProcessExited(fleet::ProcessExited {
                lease_id: self.lease_id.clone(),
                exit_code,
            }));
    }

    fn output_sink(&self) -> Option<crate::exec::OutputSink> {
        Some(crate::exec::live_output_sink(self.outbox.clone()))
    }
}

fn describe(s: &tonic::Status) -> String {
    format!("{} ({:?})", s.message(), s.code())
}

/// The result of a lease that ended in `e`, with whose fault it was.
fn lease_error(lease_id: String, e: &Error) -> fleet::LeaseResult {
    fleet::LeaseResult {
        lease_id,
        retryable: e.retryable(),
        outcome: Some(fleet::lease_result::Outcome::Error(error_status(e))),
        timed_out: false,
        message: String::new(),
        fault: e.fault() as i32,
        status: None,
    }
}

/// The status the client sees for an action that could not run.
fn error_status(e: &Error) -> tonic_types::pb::Status {
    let details = match e {
        Error::MissingInput(digests) => {
            let failure = tonic_types::pb::PreconditionFailure {
                violations: digests
                    .iter()
                    .map(|d| tonic_types::pb::precondition_failure::Violation {
                        r#type: "MISSING".into(),
                        subject: format!("blobs/{d}"),
                        description: "not in the CAS".into(),
                    })
                    .collect(),
            };
            vec![prost_types::Any {
                type_url: outpost_proto::type_url::PRECONDITION_FAILURE.into(),
                value: failure.encode_to_vec(),
            }]
        }
        _ => Vec::new(),
    };
    tonic_types::pb::Status {
        code: e.code() as i32,
        message: e.to_string(),
        details,
    }
}
