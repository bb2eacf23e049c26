//! `outpost.fleet.v1.Fleet`: the agents' side of the coordinator. Each
//! agent holds one `Join` stream; this service turns it into scheduler
//! calls and carries the scheduler's messages back.

use std::pin::Pin;
use std::time::Duration;

use outpost_proto::fleet::{self, fleet_server::Fleet};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::scheduler::Scheduler;

/// An agent must register this soon after opening its stream.
const REGISTER_WITHIN: Duration = Duration::from_secs(30);
/// Messages queued towards one agent at most.
const OUTGOING_CAPACITY: usize = 256;

type CoordinatorStream =
    Pin<Box<dyn Stream<Item = Result<fleet::CoordinatorMessage, Status>> + Send>>;

pub struct FleetService {
    scheduler: Scheduler,
}

impl FleetService {
    pub fn new(scheduler: Scheduler) -> Self {
        FleetService { scheduler }
    }
}

#[tonic::async_trait]
impl Fleet for FleetService {
    type JoinStream = CoordinatorStream;

    async fn join(
        &self,
        request: Request<Streaming<fleet::AgentMessage>>,
    ) -> Result<Response<CoordinatorStream>, Status> {
        let peer = request.remote_addr();
        let mut incoming = request.into_inner();
        let first = tokio::time::timeout(REGISTER_WITHIN, incoming.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Register message within 30s of joining"))??
            .ok_or_else(|| Status::invalid_argument("the stream ended before Register"))?;
        let Some(fleet::agent_message::Kind::Register(register)) = first.kind else {
            return Err(Status::invalid_argument(
                "the first message on a Join stream must be Register",
            ));
        };
        let (tx, rx) = tokio::sync::mpsc::channel(OUTGOING_CAPACITY);
        // The scheduler queues Registered on `tx` itself, ahead of any lease.
        let (session, _registered) = self.scheduler.join(register, tx).await?;
        tracing::debug!(agent_id = %session.agent_id, ?peer, "fleet stream open");
        let scheduler = self.scheduler.clone();
        tokio::spawn(async move {
            loop {
                match incoming.message().await {
                    Ok(Some(fleet::AgentMessage { kind: Some(kind) })) => {
                        if scheduler.agent_message(&session, kind).await.is_err() {
                            break;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(agent_id = %session.agent_id, error = %e, "fleet stream broke");
                        break;
                    }
                }
            }
            scheduler.agent_gone(&session).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
