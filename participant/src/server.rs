//! The `tandem.v1.Participant` gRPC endpoint, hosted inside the service.
//!
//! [`Participant::serve`] is the one call that hosts it: it serves the endpoint on a listener
//! and runs the in-doubt resolver beside it until shutdown. A service with its own tonic
//! server adds [`Participant::grpc_service`] to it and spawns [`Participant::spawn_in_doubt_resolver`].

use std::future::Future;

use tandem_common::{BranchIdx, TxnId};
use tandem_proto::v1 as pb;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::participant::Participant;
use crate::resource::{BranchContext, Vote};

/// Largest prepare payload accepted, in bytes (the coordinator's limit too).
pub const PAYLOAD_BYTES_MAX: usize = 64 * 1024;
/// Longest coordinator address accepted in a prepare, in bytes.
pub const COORDINATOR_ADDR_LEN_MAX: usize = 256;

/// The gRPC service wrapping a [`Participant`].
pub struct ParticipantService {
    participant: Participant,
}

fn parse_txn(id: &str) -> Result<TxnId, Status> {
    TxnId::parse(id).map_err(|e| Status::invalid_argument(e.to_string()))
}

#[tonic::async_trait]
impl pb::participant_server::Participant for ParticipantService {
    async fn prepare(
        &self,
        request: Request<pb::PrepareRequest>,
    ) -> Result<Response<pb::PrepareResponse>, Status> {
        let request = request.into_inner();
        let txn = parse_txn(&request.txn_id)?;
        if request.payload.len() > PAYLOAD_BYTES_MAX {
            return Err(Status::invalid_argument(format!(
                "payload is {} bytes; at most {PAYLOAD_BYTES_MAX} are allowed",
                request.payload.len()
            )));
        }
        if request.coordinator.len() > COORDINATOR_ADDR_LEN_MAX {
            return Err(Status::invalid_argument("coordinator address too long"));
        }
        let ctx = BranchContext {
            txn,
            branch: BranchIdx(request.branch),
            resource: request.resource,
        };
        let span = tracing::debug_span!("prepare", txn = %ctx.txn, branch = %ctx.branch);
        let _enter = span.enter();
        let vote = self
            .participant
            .prepare(&ctx, &request.payload, &request.coordinator)
            .await
            .map_err(|e| e.to_status())?;
        let (vote, reason) = match vote {
            Vote::Yes => (pb::Vote::Yes, String::new()),
            Vote::No { reason } => (pb::Vote::No, reason),
        };
        Ok(Response::new(pb::PrepareResponse {
            vote: vote as i32,
            reason,
        }))
    }

    async fn commit(
        &self,
        request: Request<pb::DecisionRequest>,
    ) -> Result<Response<pb::DecisionResponse>, Status> {
        self.decide(request.into_inner(), true).await
    }

    async fn abort(
        &self,
        request: Request<pb::DecisionRequest>,
    ) -> Result<Response<pb::DecisionResponse>, Status> {
        self.decide(request.into_inner(), false).await
    }

    async fn ping(
        &self,
        _request: Request<pb::PingRequest>,
    ) -> Result<Response<pb::PingResponse>, Status> {
        Ok(Response::new(pb::PingResponse {}))
    }
}

impl ParticipantService {
    async fn decide(
        &self,
        request: pb::DecisionRequest,
        commit: bool,
    ) -> Result<Response<pb::DecisionResponse>, Status> {
        let txn = parse_txn(&request.txn_id)?;
        let span = tracing::debug_span!("decide", txn = %txn, branch = request.branch, commit);
        let _enter = span.enter();
        self.participant
            .decide(&txn, BranchIdx(request.branch), &request.resource, commit)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(pb::DecisionResponse {}))
    }
}

impl Participant {
    /// The endpoint as a tonic service, to add to a server the service already runs.
    pub fn grpc_service(&self) -> pb::participant_server::ParticipantServer<ParticipantService> {
        pb::participant_server::ParticipantServer::new(ParticipantService {
            participant: self.clone(),
        })
    }

    /// Hosts the endpoint on `listener` and runs the in-doubt resolver until `shutdown`.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let resolver = self.spawn_in_doubt_resolver();
        // Accepted sockets get TCP_NODELAY here: `Server::tcp_nodelay` only reaches sockets
        // tonic binds itself, and without it Nagle meets delayed ACKs (40 ms per call).
        let server = tonic::transport::Server::builder()
            .add_service(self.grpc_service())
            .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), shutdown);
        // Spawned, so the server runs on the runtime's workers rather than on whatever thread
        // awaits `serve` (under `#[tokio::main]`, the main thread, which is no worker).
        let served = tokio::spawn(server).await;
        resolver.abort();
        served
            .map_err(|e| Error::Unavailable(format!("participant server task failed: {e}")))?
            .map_err(|e| Error::Unavailable(format!("participant server failed: {e}")))
    }
}
