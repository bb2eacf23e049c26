//! `outpost.fleet.v1.Fleet`: the agents' side of the coordinator. Each
//! agent holds one `Join` stream; this service turns it into scheduler
//! calls and carries the scheduler's messages back.

use std::pin::Pin;
use std::time::Duration;

use outpost_proto::fleet::{self, fleet_server::Fleet};
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Auth, Principal};
use crate::scheduler::Scheduler;

/// An agent must register this soon after opening its stream.
const REGISTER_WITHIN: Duration = Duration::from_secs(30);
/// Messages queued towards one agent at most.
const OUTGOING_CAPACITY: usize = 256;

type CoordinatorStream =
    Pin<Box<dyn Stream<Item = Result<fleet::CoordinatorMessage, Status>> + Send>>;

pub struct FleetService {
    scheduler: Scheduler,
    auth: Auth,
}

impl FleetService {
    pub fn new(scheduler: Scheduler, auth: Auth) -> Self {
        FleetService { scheduler, auth }
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
        let principal = request.extensions().get::<Principal>().cloned();
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
        // A revoked token ends the stream: the reader stops (the agent is
        // gone to the scheduler) and the agent gets UNAUTHENTICATED.
        let revoked = tokio_util::sync::CancellationToken::new();
        let done = tokio_util::sync::CancellationToken::new();
        let principal = principal.filter(Principal::has_token);
        // With a token, the stream may end in UNAUTHENTICATED: sent on
        // `end`, which closes once the agent is gone.
        let (end_tx, end) = tokio::sync::mpsc::channel(1);
        if let Some(principal) = &principal {
            let (auth, principal, revoked, done, agent_id) = (
                self.auth.clone(),
                principal.clone(),
                revoked.clone(),
                done.clone(),
                session.agent_id.clone(),
            );
            tokio::spawn(async move {
                tokio::select! {
                    () = auth.revoked(&principal) => {
                        tracing::warn!(%agent_id, "the agent's token was revoked: closing its stream");
                        revoked.cancel();
                        let _ = end_tx
                            .send(Err(Status::unauthenticated("this agent's token was revoked")))
                            .await;
                    }
                    () = done.cancelled() => {}
                }
            });
        }
        let scheduler = self.scheduler.clone();
        let (reader_revoked, reader_done) = (revoked.clone(), done.clone());
        tokio::spawn(async move {
            let _done = reader_done.drop_guard();
            loop {
                let message = tokio::select! {
                    m = incoming.message() => m,
                    () = reader_revoked.cancelled() => break,
                };
                match message {
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
        let outgoing = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok);
        if principal.is_none() {
            return Ok(Response::new(Box::pin(outgoing)));
        }
        let end = tokio_stream::wrappers::ReceiverStream::new(end);
        Ok(Response::new(Box::pin(outgoing.merge(end))))
    }
}
