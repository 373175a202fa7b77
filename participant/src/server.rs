//! The `tandem.v1.Participant` gRPC endpoint, hosted inside the service.
//!
//! [`Participant::serve`] is the one call that hosts it: it serves the endpoint on a listener
//! and runs the in-doubt resolver beside it until shutdown. A service with its own tonic
//! server adds [`Participant::grpc_service`] to it and spawns [`Participant::spawn_in_doubt_resolver`].
//!
//! This is the edge: requests are validated here (ids parse, payloads and names within their
//! limits, a callback's saga state well-formed and terminal), converted into domain types
//! once, handed to the [`Participant`], and its errors mapped to status codes with
//! [`Error::to_status`] (unknown resource, step or callback names are NOT_FOUND).
//!
//! Tracing: a call's W3C `traceparent` metadata (the coordinator sends one for every call of a
//! transaction) is read here, and its trace id is put on the call's span as `trace_id`, beside
//! the transaction id (`txn`, or `saga` and `step`), so the participant's logs join the
//! transaction's trace.

use std::future::Future;

use tandem_common::trace_context::TRACEPARENT;
use tandem_common::{BranchIdx, TraceContext, TxnId};
use tandem_proto::v1 as pb;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::error::Error;
use crate::participant::Participant;
use crate::resource::{BranchContext, Vote};
use crate::saga::{StepContext, StepOutcome};
use crate::saga_state::SagaState;

/// Largest prepare payload accepted, in bytes (the coordinator's limit too). Saga action and
/// compensation payloads have the same limit.
pub const PAYLOAD_BYTES_MAX: usize = 64 * 1024;
/// Longest coordinator address accepted in a prepare, in bytes.
pub const COORDINATOR_ADDR_LEN_MAX: usize = 256;
/// Longest saga step name accepted, in bytes (the contract allows 64 characters of
/// `[A-Za-z0-9_.-]`).
pub const STEP_NAME_LEN_MAX: usize = 64;
/// Longest saga step or callback handler name accepted, in bytes.
pub const HANDLER_NAME_LEN_MAX: usize = 128;

/// The gRPC service wrapping a [`Participant`].
pub struct ParticipantService {
    participant: Participant,
}

/// The trace context of a call (its `traceparent` metadata), if it has a valid one.
fn incoming_trace<T>(request: &Request<T>) -> Option<TraceContext> {
    TraceContext::from_incoming(
        request
            .metadata()
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok()),
    )
}

/// Puts the call's trace id on `span` (declared with `trace_id = Empty`) and returns it.
fn traced(span: tracing::Span, trace: Option<TraceContext>) -> tracing::Span {
    if let Some(trace) = trace {
        span.record("trace_id", tracing::field::display(trace.trace_id_hex()));
    }
    span
}

fn parse_txn(id: &str) -> Result<TxnId, Status> {
    TxnId::parse(id).map_err(|e| Status::invalid_argument(e.to_string()))
}

fn check_payload(payload: &[u8]) -> Result<(), Status> {
    if payload.len() > PAYLOAD_BYTES_MAX {
        return Err(Status::invalid_argument(format!(
            "payload is {} bytes; at most {PAYLOAD_BYTES_MAX} are allowed",
            payload.len()
        )));
    }
    Ok(())
}

fn check_handler_name(kind: &str, name: &str) -> Result<(), Status> {
    if name.len() > HANDLER_NAME_LEN_MAX {
        return Err(Status::invalid_argument(format!(
            "{kind} name is {} bytes; at most {HANDLER_NAME_LEN_MAX} are allowed",
            name.len()
        )));
    }
    Ok(())
}

/// Validates a saga step request and converts it: its context and payload.
fn step_request(request: pb::StepRequest) -> Result<(StepContext, Vec<u8>), Status> {
    let saga = parse_txn(&request.saga_id)?;
    check_payload(&request.payload)?;
    check_handler_name("saga step", &request.resource)?;
    if request.step_name.len() > STEP_NAME_LEN_MAX {
        return Err(Status::invalid_argument(format!(
            "step name is {} bytes; at most {STEP_NAME_LEN_MAX} are allowed",
            request.step_name.len()
        )));
    }
    let ctx = StepContext {
        saga,
        step: request.step,
        step_name: request.step_name,
        resource: request.resource,
    };
    Ok((ctx, request.payload))
}

/// Validates a completion callback and converts it: the handler's name and the final state.
fn finished_request(request: pb::SagaFinishedRequest) -> Result<(String, SagaState), Status> {
    let saga = parse_txn(&request.saga_id)?;
    check_handler_name("saga callback", &request.resource)?;
    let mut outcome = request
        .outcome
        .ok_or_else(|| Status::invalid_argument("a saga callback carries the saga's outcome"))?;
    if outcome.saga_id.is_empty() {
        outcome.saga_id = saga.to_string();
    }
    let outcome = SagaState::from_pb(outcome).map_err(Status::invalid_argument)?;
    if outcome.id != saga {
        return Err(Status::invalid_argument(format!(
            "the callback of saga {saga} carries the state of saga {}",
            outcome.id
        )));
    }
    if !outcome.terminal {
        return Err(Status::invalid_argument(format!(
            "saga {saga} is {:?}, not finished: a callback carries a terminal state",
            outcome.phase
        )));
    }
    Ok((request.resource, outcome))
}

#[tonic::async_trait]
impl pb::participant_server::Participant for ParticipantService {
    async fn prepare(
        &self,
        request: Request<pb::PrepareRequest>,
    ) -> Result<Response<pb::PrepareResponse>, Status> {
        let trace = incoming_trace(&request);
        let request = request.into_inner();
        let txn = parse_txn(&request.txn_id)?;
        check_payload(&request.payload)?;
        if request.coordinator.len() > COORDINATOR_ADDR_LEN_MAX {
            return Err(Status::invalid_argument("coordinator address too long"));
        }
        let ctx = BranchContext {
            txn,
            branch: BranchIdx(request.branch),
            resource: request.resource,
        };
        let span = tracing::debug_span!("prepare", txn = %ctx.txn, branch = %ctx.branch, trace_id = tracing::field::Empty);
        let span = traced(span, trace);
        let vote = self
            .participant
            .prepare(&ctx, &request.payload, &request.coordinator)
            .instrument(span)
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
        let trace = incoming_trace(&request);
        self.decide(request.into_inner(), true, trace).await
    }

    async fn abort(
        &self,
        request: Request<pb::DecisionRequest>,
    ) -> Result<Response<pb::DecisionResponse>, Status> {
        let trace = incoming_trace(&request);
        self.decide(request.into_inner(), false, trace).await
    }

    async fn ping(
        &self,
        _request: Request<pb::PingRequest>,
    ) -> Result<Response<pb::PingResponse>, Status> {
        Ok(Response::new(pb::PingResponse {}))
    }

    async fn act(
        &self,
        request: Request<pb::StepRequest>,
    ) -> Result<Response<pb::ActResponse>, Status> {
        let trace = incoming_trace(&request);
        let (ctx, payload) = step_request(request.into_inner())?;
        let span = tracing::debug_span!("act_call", saga = %ctx.saga, step = ctx.step, trace_id = tracing::field::Empty);
        let span = traced(span, trace);
        // The participant's calls open their own spans too (with the step's name).
        let outcome = self
            .participant
            .act(&ctx, &payload)
            .instrument(span)
            .await
            .map_err(|e| e.to_status())?;
        let (result, reason) = match outcome {
            StepOutcome::Succeeded => (pb::StepResult::Succeeded, String::new()),
            StepOutcome::Failed { reason } => (pb::StepResult::Failed, reason),
        };
        Ok(Response::new(pb::ActResponse {
            result: result as i32,
            reason,
        }))
    }

    async fn compensate(
        &self,
        request: Request<pb::StepRequest>,
    ) -> Result<Response<pb::CompensateResponse>, Status> {
        let trace = incoming_trace(&request);
        let (ctx, payload) = step_request(request.into_inner())?;
        let span = tracing::debug_span!("compensate_call", saga = %ctx.saga, step = ctx.step, trace_id = tracing::field::Empty);
        let span = traced(span, trace);
        self.participant
            .compensate(&ctx, &payload)
            .instrument(span)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(pb::CompensateResponse {}))
    }

    async fn saga_finished(
        &self,
        request: Request<pb::SagaFinishedRequest>,
    ) -> Result<Response<pb::SagaFinishedResponse>, Status> {
        let trace = incoming_trace(&request);
        let (handler, outcome) = finished_request(request.into_inner())?;
        let span = tracing::debug_span!("saga_finished_call", saga = %outcome.id, trace_id = tracing::field::Empty);
        let span = traced(span, trace);
        self.participant
            .saga_finished(&handler, &outcome)
            .instrument(span)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(pb::SagaFinishedResponse {}))
    }
}

impl ParticipantService {
    async fn decide(
        &self,
        request: pb::DecisionRequest,
        commit: bool,
        trace: Option<TraceContext>,
    ) -> Result<Response<pb::DecisionResponse>, Status> {
        let txn = parse_txn(&request.txn_id)?;
        let span = tracing::debug_span!("decide", txn = %txn, branch = request.branch, commit, trace_id = tracing::field::Empty);
        self.participant
            .decide(&txn, BranchIdx(request.branch), &request.resource, commit)
            .instrument(traced(span, trace))
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

    /// Hosts the endpoint on `listener` and runs the in-doubt resolver and the pruner until
    /// `shutdown`.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let resolver = self.spawn_in_doubt_resolver();
        let pruner = self.spawn_pruner();
        // Accepted sockets get TCP_NODELAY here: `Server::tcp_nodelay` only reaches sockets
        // tonic binds itself, and without it Nagle meets delayed ACKs (40 ms per call).
        let server = tonic::transport::Server::builder()
            .add_service(self.grpc_service())
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                shutdown,
            );
        // Spawned, so the server runs on the runtime's workers rather than on whatever thread
        // awaits `serve` (under `#[tokio::main]`, the main thread, which is no worker).
        let served = tokio::spawn(server).await;
        resolver.abort();
        if let Some(pruner) = pruner {
            pruner.abort();
        }
        served
            .map_err(|e| Error::Unavailable(format!("participant server task failed: {e}")))?
            .map_err(|e| Error::Unavailable(format!("participant server failed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bank;
    use pb::participant_server::Participant as _;
    use tonic::Code;

    const SAGA: &str = "1763850000000-endpoint";

    fn step(step: u32, resource: &str, payload: Vec<u8>) -> Request<pb::StepRequest> {
        Request::new(pb::StepRequest {
            saga_id: SAGA.into(),
            step,
            resource: resource.into(),
            payload,
            step_name: format!("s{step}"),
        })
    }

    fn op(debit: bool, account: &str, amount: i64) -> Vec<u8> {
        let (account, op) = (account.to_string(), debit);
        if op {
            bank::BankOp::Debit { account, amount }.encode()
        } else {
            bank::BankOp::Credit { account, amount }.encode()
        }
    }

    async fn service(dir: &std::path::Path) -> ParticipantService {
        let participant = bank::open(dir).unwrap();
        bank::ensure_accounts(&participant, &[("alice".into(), 100), ("bob".into(), 0)])
            .await
            .unwrap();
        bank::close_accounts(&participant, &["bob".into()])
            .await
            .unwrap();
        ParticipantService { participant }
    }

    fn finished(saga_id: &str, phase: pb::SagaPhase, terminal: bool) -> pb::SagaState {
        pb::SagaState {
            saga_id: saga_id.into(),
            phase: phase as i32,
            terminal,
            failed_step: String::new(),
            reason: String::new(),
            steps: Vec::new(),
            stuck: false,
            callback_delivered: false,
            accepted_ms: 1,
        }
    }

    fn callback(
        resource: &str,
        outcome: Option<pb::SagaState>,
    ) -> Request<pb::SagaFinishedRequest> {
        Request::new(pb::SagaFinishedRequest {
            saga_id: SAGA.into(),
            resource: resource.into(),
            outcome,
        })
    }

    #[tokio::test]
    async fn act_answers_succeeded_or_failed_with_the_reason_and_compensate_answers_done() {
        let dir = tempfile::tempdir().unwrap();
        let service = service(dir.path()).await;
        let debit = service
            .act(step(0, bank::SAGA_STEP, op(true, "alice", 10)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(debit.result, pb::StepResult::Succeeded as i32);
        assert_eq!(debit.reason, "");
        let credit = service
            .act(step(1, bank::SAGA_STEP, op(false, "bob", 10)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(credit.result, pb::StepResult::Failed as i32);
        assert!(credit.reason.contains("closed"), "{credit:?}");
        service
            .compensate(step(1, bank::SAGA_STEP, op(true, "bob", 10)))
            .await
            .unwrap();
        service
            .compensate(step(0, bank::SAGA_STEP, op(false, "alice", 10)))
            .await
            .unwrap();
        assert_eq!(
            bank::balances(service.participant.db()).unwrap()["alice"],
            100
        );
        // A late action of a compensated step is refused as a normal answer.
        let late = service
            .act(step(0, bank::SAGA_STEP, op(true, "alice", 10)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(late.result, pb::StepResult::Failed as i32);
        assert_eq!(late.reason, "compensated");
    }

    #[tokio::test]
    async fn saga_endpoints_refuse_malformed_requests_with_the_right_code() {
        let dir = tempfile::tempdir().unwrap();
        let service = service(dir.path()).await;
        let code_of_act = |request| {
            let service = &service;
            async move { service.act(request).await.unwrap_err().code() }
        };

        let mut bad_id = step(0, bank::SAGA_STEP, op(true, "alice", 1));
        bad_id.get_mut().saga_id = "not-an-id".into();
        assert_eq!(code_of_act(bad_id).await, Code::InvalidArgument);
        let oversized = step(0, bank::SAGA_STEP, vec![b' '; PAYLOAD_BYTES_MAX + 1]);
        assert_eq!(code_of_act(oversized).await, Code::InvalidArgument);
        let mut long_name = step(0, bank::SAGA_STEP, op(true, "alice", 1));
        long_name.get_mut().step_name = "n".repeat(STEP_NAME_LEN_MAX + 1);
        assert_eq!(code_of_act(long_name).await, Code::InvalidArgument);
        let long_handler = step(0, &"h".repeat(HANDLER_NAME_LEN_MAX + 1), vec![]);
        assert_eq!(code_of_act(long_handler).await, Code::InvalidArgument);
        assert_eq!(
            code_of_act(step(0, "", op(true, "alice", 1))).await,
            Code::NotFound,
            "the bank's saga step is named \"bank\", not the default"
        );
        let mut bad_compensate = step(0, "nope", vec![]);
        bad_compensate.get_mut().saga_id = String::new();
        assert_eq!(
            service.compensate(bad_compensate).await.unwrap_err().code(),
            Code::InvalidArgument
        );
        assert_eq!(
            service
                .compensate(step(0, "nope", vec![]))
                .await
                .unwrap_err()
                .code(),
            Code::NotFound
        );

        let done = Some(finished(SAGA, pb::SagaPhase::Completed, true));
        let refusals = [
            (callback("nope", done.clone()), Code::NotFound),
            (callback(bank::CALLBACK, None), Code::InvalidArgument),
            (
                callback(
                    bank::CALLBACK,
                    Some(finished(SAGA, pb::SagaPhase::Running, false)),
                ),
                Code::InvalidArgument,
            ),
            (
                callback(
                    bank::CALLBACK,
                    Some(finished(SAGA, pb::SagaPhase::Unspecified, true)),
                ),
                Code::InvalidArgument,
            ),
            (
                callback(
                    bank::CALLBACK,
                    Some(finished(
                        "1763850000000-other",
                        pb::SagaPhase::Completed,
                        true,
                    )),
                ),
                Code::InvalidArgument,
            ),
        ];
        for (request, code) in refusals {
            let what = format!("{:?}", request.get_ref());
            assert_eq!(
                service.saga_finished(request).await.unwrap_err().code(),
                code,
                "{what}"
            );
        }
        assert!(bank::saga_callbacks(service.participant.db())
            .unwrap()
            .is_empty());

        // A well-formed callback (its state may leave the saga id to the request) is
        // acknowledged every time and handled once.
        for _ in 0..2 {
            service
                .saga_finished(callback(
                    bank::CALLBACK,
                    Some(finished("", pb::SagaPhase::Completed, true)),
                ))
                .await
                .unwrap();
        }
        assert_eq!(
            bank::saga_callbacks(service.participant.db()).unwrap()[SAGA].calls,
            1
        );
    }
}
