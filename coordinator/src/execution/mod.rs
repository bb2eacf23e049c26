//! `Execution` and `google.longrunning.Operations`: validates an action,
//! answers from the Action Cache when it can, and otherwise hands it to the
//! scheduler and streams the operation until it completes.

pub mod inputs;
pub mod live;

pub use inputs::Prefetched;

use std::pin::Pin;
use std::time::{Duration, SystemTime};

use outpost_proto::digest::Digest;
use outpost_proto::longrunning::{self, operations_server::Operations};
use outpost_proto::reapi::{self, execution_server::Execution};
use outpost_proto::{REQUEST_METADATA_HEADER, type_url};
use prost::Message;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::scheduler::{OpState, Scheduler, Stage, Waiter, platform};
use crate::service::{Context, action_cache, function_of, required_digest};

type OperationStream = Pin<Box<dyn Stream<Item = Result<longrunning::Operation, Status>> + Send>>;

/// Limits on Action.timeout.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub default: Duration,
    pub max: Duration,
    /// An unchanged operation is sent again this often on its streams.
    pub keepalive: Duration,
    /// How long a warm action waits for its warm agent when it does not
    /// say (`runner_recycling_max_wait`).
    pub warm_wait: Duration,
}

pub struct ExecutionService {
    ctx: Context,
    scheduler: Scheduler,
    timeouts: Timeouts,
    policy: inputs::Policy,
    /// Default platform properties per instance name.
    defaults: std::collections::HashMap<String, Vec<outpost_proto::reapi::platform::Property>>,
}

impl ExecutionService {
    pub fn new(
        ctx: Context,
        scheduler: Scheduler,
        timeouts: Timeouts,
        policy: inputs::Policy,
        defaults: std::collections::HashMap<String, Vec<outpost_proto::reapi::platform::Property>>,
    ) -> Self {
        ExecutionService {
            ctx,
            scheduler,
            timeouts,
            policy,
            defaults,
        }
    }
}

/// The build this request belongs to, for fairness.
/// Where the action may run warm (`outpost_proto::warm`): its warm key
/// and how long it waits for an agent holding it.
fn warm_of(
    instance: &str,
    platform: &[reapi::platform::Property],
    client: &str,
    default_wait: Duration,
) -> Result<Option<crate::scheduler::Warm>, Status> {
    let parsed = outpost_proto::platform::parse(platform).map_err(Status::invalid_argument)?;
    let Some(key) = outpost_proto::warm::warm_key(instance, &parsed, client) else {
        return Ok(None);
    };
    let max_wait =
        outpost_proto::warm::max_wait(&parsed, default_wait).map_err(Status::invalid_argument)?;
    Ok(Some(crate::scheduler::Warm { key, max_wait }))
}

fn invocation_id<T>(request: &Request<T>) -> String {
    request
        .metadata()
        .get_bin(REQUEST_METADATA_HEADER)
        .and_then(|v| v.to_bytes().ok())
        .and_then(|b| reapi::RequestMetadata::decode(b).ok())
        .map(|m| m.tool_invocation_id)
        .filter(|id| !id.is_empty())
        .or_else(|| request.remote_addr().map(|a| a.to_string()))
        .unwrap_or_default()
}

fn any<M: Message>(type_url: &str, m: &M) -> prost_types::Any {
    prost_types::Any {
        type_url: type_url.to_owned(),
        value: m.encode_to_vec(),
    }
}

/// The wire form of an operation in `state`.
pub fn operation(name: &str, state: &OpState) -> longrunning::Operation {
    let stage = match state.stage {
        Stage::Queued => reapi::execution_stage::Value::Queued,
        Stage::Executing => reapi::execution_stage::Value::Executing,
        Stage::Completed => reapi::execution_stage::Value::Completed,
    };
    // While it runs, its output can be followed (`live`).
    let running = state.stage == Stage::Executing;
    let stream = |kind| {
        if running {
            live::stream_name(name, kind)
        } else {
            String::new()
        }
    };
    let metadata = reapi::ExecuteOperationMetadata {
        stage: stage as i32,
        action_digest: Some(state.action_digest.to_proto()),
        digest_function: state.action_digest.function.to_proto() as i32,
        stdout_stream_name: stream(live::Kind::Stdout),
        stderr_stream_name: stream(live::Kind::Stderr),
        ..Default::default()
    };
    longrunning::Operation {
        name: name.to_owned(),
        metadata: Some(any(type_url::EXECUTE_OPERATION_METADATA, &metadata)),
        done: state.stage == Stage::Completed,
        result: state.response.as_ref().map(|r| {
            longrunning::operation::Result::Response(any(type_url::EXECUTE_RESPONSE, r.as_ref()))
        }),
    }
}

/// Streams every change of the operation until it is done.
fn stream_operation(waiter: Waiter, keepalive: Duration) -> OperationStream {
    Box::pin(async_stream(move |tx| async move {
        // The whole waiter moves into the task, its guard included, so it
        // lives exactly as long as the client's stream (a closure that
        // used only some fields would capture just those, and the guard
        // would drop, telling the scheduler the client left, at once).
        let mut waiter = waiter;
        let name = waiter.name.clone();
        let state = &mut waiter.state;
        loop {
            let current = state.borrow_and_update().clone();
            let done = current.stage == Stage::Completed;
            if tx.send(Ok(operation(&name, &current))).await.is_err() || done {
                return;
            }
            // Wait for a change, or for the client to go away (which drops
            // the waiter, so an abandoned operation is noticed at once).
            tokio::select! {
                changed = state.changed() => {
                    if changed.is_err() {
                        let _ = tx
                            .send(Err(Status::unavailable("the coordinator is shutting down")))
                            .await;
                        return;
                    }
                }
                () = tx.closed() => return,
                // Nothing changed for a while: say so, so the stream is
                // never quiet long enough for a proxy to cut it.
                () = tokio::time::sleep(keepalive) => {}
            }
        }
    }))
}

/// A stream fed by a task (keeps this module free of a stream macro crate).
fn async_stream<T, F, Fut>(body: F) -> impl Stream<Item = T> + Send + 'static
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(body(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn done_operation(
    name: String,
    action: Digest,
    response: reapi::ExecuteResponse,
) -> OperationStream {
    let state = OpState {
        stage: Stage::Completed,
        action_digest: action,
        response: Some(std::sync::Arc::new(response)),
    };
    Box::pin(tokio_stream::once(Ok(operation(&name, &state))))
}

#[tonic::async_trait]
impl Execution for ExecutionService {
    type ExecuteStream = OperationStream;
    type WaitExecutionStream = OperationStream;

    async fn execute(
        &self,
        request: Request<reapi::ExecuteRequest>,
    ) -> Result<Response<OperationStream>, Status> {
        let invocation = invocation_id(&request);
        let client = request
            .extensions()
            .get::<crate::auth::Principal>()
            .map(crate::auth::Principal::identity)
            .unwrap_or_default();
        let req = request.into_inner();
        let function = function_of(req.digest_function)?;
        let action_digest = required_digest(req.action_digest.as_ref(), function, "action_digest")?;
        let checked = inputs::check(&self.ctx, action_digest, self.policy).await?;
        let action = &checked.action;
        let platform = action
            .platform
            .as_ref()
            .or(checked.command.platform.as_ref())
            .map(|p| p.properties.as_slice())
            .unwrap_or_default();
        // The Xcode the Command's environment names is a requirement too;
        // the Command is in the action's digest, so merging stays exact.
        let with_xcode;
        let platform = match outpost_proto::xcode::with_environment(
            platform,
            checked
                .command
                .environment_variables
                .iter()
                .map(|e| (e.name.as_str(), e.value.as_str())),
        ) {
            Some(merged) => {
                with_xcode = merged;
                &with_xcode[..]
            }
            None => platform,
        };
        let merged;
        let platform = match self.defaults.get(&req.instance_name) {
            Some(defaults) => {
                merged = outpost_proto::platform::with_defaults(platform, defaults);
                &merged[..]
            }
            None => platform,
        };
        let (requirements, platform) =
            platform::requirements(platform).map_err(Status::invalid_argument)?;
        let timeout = match &action.timeout {
            None => self.timeouts.default,
            Some(t) => {
                let t = Duration::try_from(*t)
                    .map_err(|_| Status::invalid_argument("Action.timeout must not be negative"))?;
                if t.is_zero() {
                    self.timeouts.default
                } else {
                    t
                }
            }
        };
        if timeout > self.timeouts.max {
            return Err(Status::invalid_argument(format!(
                "Action.timeout of {}s is over this coordinator's maximum of {}s",
                timeout.as_secs(),
                self.timeouts.max.as_secs()
            )));
        }
        if !req.skip_cache_lookup
            && !action.do_not_cache
            && let Some(result) =
                action_cache::lookup(&self.ctx, &req.instance_name, action_digest).await?
        {
            self.ctx.metrics.action(crate::metrics::Outcome::Cached);
            let name = format!("operations/cached-{}", action_digest.hash_hex());
            return Ok(Response::new(done_operation(
                name,
                action_digest,
                reapi::ExecuteResponse {
                    result: Some(result),
                    cached_result: true,
                    status: Some(crate::service::ok_status()),
                    ..Default::default()
                },
            )));
        }
        let priority = req.execution_policy.map_or(0, |p| p.priority);
        let warm = warm_of(
            &req.instance_name,
            &platform,
            &client,
            self.timeouts.warm_wait,
        )?;
        let job = crate::scheduler::Job {
            warm,
            instance_name: req.instance_name,
            action_digest,
            requirements,
            platform,
            priority,
            invocation,
            timeout,
            cacheable: !action.do_not_cache,
            pin: checked.pin,
            prefetched: checked.prefetched,
            input_bytes: checked.input_bytes,
            queued_at: SystemTime::now(),
        };
        let waiter = self.scheduler.submit(job).await?;
        Ok(Response::new(stream_operation(
            waiter,
            self.timeouts.keepalive,
        )))
    }

    async fn wait_execution(
        &self,
        request: Request<reapi::WaitExecutionRequest>,
    ) -> Result<Response<OperationStream>, Status> {
        let name = request.into_inner().name;
        match self.scheduler.attach(&name).await? {
            Some(waiter) => Ok(Response::new(stream_operation(
                waiter,
                self.timeouts.keepalive,
            ))),
            None => Err(Status::not_found(format!(
                "operation {} is not known (the coordinator may have restarted); execute the action again",
                outpost_proto::quote::quoted(&name)
            ))),
        }
    }
}

pub struct OperationsService {
    scheduler: Scheduler,
}

impl OperationsService {
    pub fn new(scheduler: Scheduler) -> Self {
        OperationsService { scheduler }
    }
}

#[tonic::async_trait]
impl Operations for OperationsService {
    async fn list_operations(
        &self,
        _request: Request<longrunning::ListOperationsRequest>,
    ) -> Result<Response<longrunning::ListOperationsResponse>, Status> {
        Err(Status::unimplemented(
            "listing operations is not supported; use GetOperation by name",
        ))
    }

    async fn get_operation(
        &self,
        request: Request<longrunning::GetOperationRequest>,
    ) -> Result<Response<longrunning::Operation>, Status> {
        let name = request.into_inner().name;
        let waiter = self.scheduler.attach(&name).await?.ok_or_else(|| {
            Status::not_found(format!(
                "operation {} is not known",
                outpost_proto::quote::quoted(&name)
            ))
        })?;
        let state = waiter.state.borrow().clone();
        Ok(Response::new(operation(&name, &state)))
    }

    async fn delete_operation(
        &self,
        _request: Request<longrunning::DeleteOperationRequest>,
    ) -> Result<Response<()>, Status> {
        Err(Status::unimplemented(
            "operations are deleted by the coordinator when they expire",
        ))
    }

    async fn cancel_operation(
        &self,
        request: Request<longrunning::CancelOperationRequest>,
    ) -> Result<Response<()>, Status> {
        self.scheduler.cancel(&request.into_inner().name).await?;
        Ok(Response::new(()))
    }

    async fn wait_operation(
        &self,
        _request: Request<longrunning::WaitOperationRequest>,
    ) -> Result<Response<longrunning::Operation>, Status> {
        Err(Status::unimplemented(
            "use Execution.WaitExecution to wait for an operation",
        ))
    }
}
