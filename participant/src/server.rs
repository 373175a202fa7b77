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
//!
//! ## Step batches
//!
//! `ActBatch` and `CompensateBatch` carry many saga steps in one call (the coordinator sends
//! them when several steps to this participant are in flight). Each item is exactly one
//! `Act` or `Compensate`: it goes through the same validation and the same
//! [`Participant::act`] or [`Participant::compensate`] as the unary call, all items at once,
//! so they meet in the participant's transaction batch and share its flush. An item's error
//! is that item's answer, not the batch's; its trace context is its own `traceparent` field.
//! Only an empty batch or one of more than [`CALL_BATCH_ITEMS_MAX`] items is refused whole,
//! and the server admits messages up to [`STEP_BATCH_BYTES_MAX`] so a full batch fits.
//!
//! ## Who may call
//!
//! Only the coordinator should prepare, commit, abort, act, compensate (one step or a batch)
//! or report a finished saga. [`Participant::serve_with_security`] serves over TLS
//! ([`ServeSecurity::tls`]; with a client CA, mutual TLS: a caller without a certificate that
//! CA signed fails the handshake) and applies a [`CallerPolicy`] to those eight calls before
//! anything is read or written:
//! - with a coordinator identity, the caller's certificate must name it (a DNS name in its
//!   subject alternative names): no certificate is UNAUTHENTICATED, another name is
//!   PERMISSION_DENIED. That the certificate chains to the configured CA is the handshake's
//!   check, so an identity is only accepted together with a client CA;
//! - with a coordinator token, the call must carry `authorization: Bearer <token>`: a missing
//!   or wrong one is UNAUTHENTICATED.
//!
//! `Ping` stays open: it touches nothing. A service that hosts the endpoint in its own tonic
//! server gets the same checks from [`Participant::grpc_service_with`].

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use tandem_common::call_batch::CALL_BATCH_ITEMS_MAX;
use tandem_common::credentials::{self, TokenSet};
use tandem_common::{BranchIdx, TraceContext, TxnId};
use tandem_proto::v1 as pb;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::ServerTlsConfig;
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
/// What a step batch's item may take beyond its payload, in bytes: a saga id (at most
/// `TXN_ID_LEN_MAX`, 78), a handler and a step name (192), a `traceparent` (55) and the
/// protobuf framing, with room to spare.
const STEP_ITEM_OVERHEAD_BYTES: usize = 1024;
/// Largest request message the endpoint decodes, in bytes: a step batch of
/// [`CALL_BATCH_ITEMS_MAX`] items, each with a payload of [`PAYLOAD_BYTES_MAX`] (about 33 MiB).
/// Every unary request is far smaller.
pub const STEP_BATCH_BYTES_MAX: usize =
    CALL_BATCH_ITEMS_MAX * (PAYLOAD_BYTES_MAX + STEP_ITEM_OVERHEAD_BYTES);

/// The gRPC service wrapping a [`Participant`].
pub struct ParticipantService {
    participant: Participant,
    callers: Arc<CallerPolicy>,
}

/// Who may make the calls that change a participant's state (see the module docs). The
/// default checks nothing.
#[derive(Clone, Default)]
pub struct CallerPolicy {
    coordinator_name: Option<String>,
    coordinator_tokens: Option<TokenSet>,
}

impl fmt::Debug for CallerPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallerPolicy")
            .field("coordinator_name", &self.coordinator_name)
            .field("coordinator_tokens", &self.coordinator_tokens)
            .finish()
    }
}

impl CallerPolicy {
    /// Requires the caller's TLS certificate to name `name` (a DNS name). Needs mutual TLS
    /// (a client CA in [`ServeSecurity::tls`]); the name must be a valid DNS name.
    pub fn coordinator_name(mut self, name: &str) -> Result<Self, Error> {
        rustls_pki_types::DnsName::try_from(name).map_err(|_| {
            Error::InvalidArgument(format!("coordinator identity {name:?} is not a DNS name"))
        })?;
        self.coordinator_name = Some(name.to_ascii_lowercase());
        Ok(self)
    }

    /// Requires the caller to present one of `tokens` as a bearer token.
    pub fn coordinator_tokens(mut self, tokens: TokenSet) -> Self {
        self.coordinator_tokens = Some(tokens);
        self
    }

    /// Whether a coordinator identity is required (and so mutual TLS must be on).
    pub fn requires_identity(&self) -> bool {
        self.coordinator_name.is_some()
    }

    /// Refuses `request` unless its caller is the coordinator as this policy knows it.
    pub fn check<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if let Some(name) = &self.coordinator_name {
            let certs = request.peer_certs().ok_or_else(|| {
                Status::unauthenticated("this participant accepts this call only from the coordinator, which must present its TLS client certificate")
            })?;
            let leaf = certs.first().ok_or_else(|| {
                Status::unauthenticated("the caller presented no TLS client certificate")
            })?;
            if !certificate_names(leaf, name) {
                tracing::warn!(identity = %name, "refused a caller whose certificate does not name the coordinator");
                return Err(Status::permission_denied(format!(
                    "the caller's certificate does not name the coordinator identity {name:?}"
                )));
            }
        }
        if let Some(tokens) = &self.coordinator_tokens {
            let presented = request
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(credentials::bearer_token);
            let Some(presented) = presented else {
                return Err(Status::unauthenticated(
                    "this call needs the coordinator's `authorization: Bearer <token>` header",
                ));
            };
            if tokens.check(presented).is_none() {
                tracing::warn!("refused a caller with a wrong coordinator token");
                return Err(Status::unauthenticated(
                    "the bearer token is not the coordinator's",
                ));
            }
        }
        Ok(())
    }
}

/// Whether the certificate `der` is valid for the DNS name `name` (its subject alternative
/// names; the handshake already checked its signature chain).
fn certificate_names(der: &rustls_pki_types::CertificateDer<'_>, name: &str) -> bool {
    let Ok(cert) = webpki::EndEntityCert::try_from(der) else {
        return false;
    };
    let Ok(server_name) = rustls_pki_types::ServerName::try_from(name) else {
        return false;
    };
    cert.verify_is_valid_for_subject_name(&server_name).is_ok()
}

/// How [`Participant::serve_with_security`] serves: TLS (optionally mutual) and who may call.
#[derive(Debug, Clone, Default)]
pub struct ServeSecurity {
    /// `None`: plaintext.
    pub tls: Option<ServerTlsConfig>,
    /// Whether `tls` has a client CA (mutual TLS); a coordinator identity needs it.
    pub mutual_tls: bool,
    pub callers: CallerPolicy,
}

impl ServeSecurity {
    /// TLS read from PEM files: the server's certificate chain and key and, for mutual TLS,
    /// the CA that must have signed every caller's certificate. Errors name the file.
    pub fn tls_from_files(
        cert: &std::path::Path,
        key: &std::path::Path,
        client_ca: Option<&std::path::Path>,
    ) -> Result<ServeSecurity, Error> {
        let file = |path, setting| credentials::PemFile { path, setting };
        let tls = credentials::server_tls_from_files(
            file(cert, "TLS certificate"),
            file(key, "TLS key"),
            client_ca.map(|ca| file(ca, "client CA")),
        )
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        Ok(ServeSecurity {
            tls: Some(tls),
            mutual_tls: client_ca.is_some(),
            callers: CallerPolicy::default(),
        })
    }
}

/// The trace context of one step: the call's metadata (a unary call), else the step's own
/// `traceparent` field (a batch's item).
fn step_trace(metadata: Option<TraceContext>, request: &pb::StepRequest) -> Option<TraceContext> {
    metadata.or_else(|| TraceContext::of_item(&request.traceparent))
}

/// A step batch's items, refused whole when there are none or too many.
fn batch_items(request: pb::StepBatchRequest) -> Result<Vec<pb::StepRequest>, Status> {
    match request.steps.len() {
        0 => Err(Status::invalid_argument(
            "a step batch carries at least one step",
        )),
        n if n > CALL_BATCH_ITEMS_MAX => Err(Status::invalid_argument(format!(
            "a step batch carries {n} steps; at most {CALL_BATCH_ITEMS_MAX} are allowed"
        ))),
        _ => Ok(request.steps),
    }
}

/// An `ActBatch` item answering what `Act` answered (`answer`).
pub fn act_batch_item(answer: Result<pb::ActResponse, Status>) -> pb::ActBatchItem {
    let answer = match answer {
        Ok(done) => pb::act_batch_item::Answer::Done(done),
        Err(status) => pb::act_batch_item::Answer::Error(pb::CallError::from(&status)),
    };
    pb::ActBatchItem {
        answer: Some(answer),
    }
}

/// A `CompensateBatch` item answering what `Compensate` answered (`answer`).
pub fn compensate_batch_item(answer: Result<(), Status>) -> pb::CompensateBatchItem {
    pb::CompensateBatchItem {
        error: answer.err().map(|status| pb::CallError::from(&status)),
    }
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
        self.callers.check(&request)?;
        let trace = TraceContext::of_request(request.metadata());
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
        self.callers.check(&request)?;
        let trace = TraceContext::of_request(request.metadata());
        self.decide(request.into_inner(), true, trace).await
    }

    async fn abort(
        &self,
        request: Request<pb::DecisionRequest>,
    ) -> Result<Response<pb::DecisionResponse>, Status> {
        self.callers.check(&request)?;
        let trace = TraceContext::of_request(request.metadata());
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
        self.callers.check(&request)?;
        let trace = TraceContext::of_request(request.metadata());
        let request = request.into_inner();
        let trace = step_trace(trace, &request);
        self.act_step(request, trace).await.map(Response::new)
    }

    async fn compensate(
        &self,
        request: Request<pb::StepRequest>,
    ) -> Result<Response<pb::CompensateResponse>, Status> {
        self.callers.check(&request)?;
        let trace = TraceContext::of_request(request.metadata());
        let request = request.into_inner();
        let trace = step_trace(trace, &request);
        self.compensate_step(request, trace).await?;
        Ok(Response::new(pb::CompensateResponse {}))
    }

    async fn act_batch(
        &self,
        request: Request<pb::StepBatchRequest>,
    ) -> Result<Response<pb::ActBatchResponse>, Status> {
        let answers = self
            .run_batch(request, "act", |step, trace| self.act_step(step, trace))
            .await?;
        let items = answers.into_iter().map(act_batch_item).collect();
        Ok(Response::new(pb::ActBatchResponse { items }))
    }

    async fn compensate_batch(
        &self,
        request: Request<pb::StepBatchRequest>,
    ) -> Result<Response<pb::CompensateBatchResponse>, Status> {
        let answers = self
            .run_batch(request, "compensate", |step, trace| {
                self.compensate_step(step, trace)
            })
            .await?;
        let items = answers.into_iter().map(compensate_batch_item).collect();
        Ok(Response::new(pb::CompensateBatchResponse { items }))
    }

    async fn saga_finished(
        &self,
        request: Request<pb::SagaFinishedRequest>,
    ) -> Result<Response<pb::SagaFinishedResponse>, Status> {
        self.callers.check(&request)?;
        let trace = TraceContext::of_request(request.metadata());
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
    /// Runs every item of a step batch through `run` (the unary call's path), all at once,
    /// each with its own trace context; answers by index. The caller policy and the batch's
    /// size are checked first: they refuse the batch whole.
    async fn run_batch<T, F>(
        &self,
        request: Request<pb::StepBatchRequest>,
        call: &'static str,
        run: impl Fn(pb::StepRequest, Option<TraceContext>) -> F,
    ) -> Result<Vec<Result<T, Status>>, Status>
    where
        F: Future<Output = Result<T, Status>>,
    {
        self.callers.check(&request)?;
        let steps = batch_items(request.into_inner())?;
        let span = tracing::debug_span!("step_batch", call, items = steps.len());
        let answers = futures::future::join_all(steps.into_iter().map(|step| {
            let trace = step_trace(None, &step);
            run(step, trace)
        }))
        .instrument(span);
        let mut answers = std::pin::pin!(answers);
        // The first poll queues every item's call (nothing awaits before the batcher), under a
        // hold: the flusher then takes them all into one transaction and one flush.
        let hold = self.participant.hold_batch();
        let first = futures::poll!(answers.as_mut());
        drop(hold);
        Ok(match first {
            std::task::Poll::Ready(answers) => answers,
            std::task::Poll::Pending => answers.await,
        })
    }

    /// One step's action, as `Act` and every item of `ActBatch` run it.
    async fn act_step(
        &self,
        request: pb::StepRequest,
        trace: Option<TraceContext>,
    ) -> Result<pb::ActResponse, Status> {
        let (ctx, payload) = step_request(request)?;
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
        Ok(pb::ActResponse {
            result: result as i32,
            reason,
        })
    }

    /// One step's compensation, as `Compensate` and every item of `CompensateBatch` run it.
    async fn compensate_step(
        &self,
        request: pb::StepRequest,
        trace: Option<TraceContext>,
    ) -> Result<(), Status> {
        let (ctx, payload) = step_request(request)?;
        let span = tracing::debug_span!("compensate_call", saga = %ctx.saga, step = ctx.step, trace_id = tracing::field::Empty);
        let span = traced(span, trace);
        self.participant
            .compensate(&ctx, &payload)
            .instrument(span)
            .await
            .map_err(|e| e.to_status())
    }

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
    /// The endpoint as a tonic service, to add to a server the service already runs. It
    /// checks no caller; see [`Participant::grpc_service_with`].
    pub fn grpc_service(&self) -> pb::participant_server::ParticipantServer<ParticipantService> {
        self.grpc_service_with(CallerPolicy::default())
    }

    /// The endpoint as a tonic service that accepts state-changing calls only from callers
    /// `callers` admits (a coordinator identity needs the server to run mutual TLS).
    pub fn grpc_service_with(
        &self,
        callers: CallerPolicy,
    ) -> pb::participant_server::ParticipantServer<ParticipantService> {
        pb::participant_server::ParticipantServer::new(ParticipantService {
            participant: self.clone(),
            callers: Arc::new(callers),
        })
        .max_decoding_message_size(STEP_BATCH_BYTES_MAX)
    }

    /// Hosts the endpoint on `listener` (plaintext, every caller accepted) and runs the
    /// in-doubt resolver and the pruner until `shutdown`.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        self.serve_with_security(listener, ServeSecurity::default(), shutdown)
            .await
    }

    /// [`Participant::serve`] with TLS and a caller policy. Refuses a coordinator identity
    /// without mutual TLS (it could never be checked).
    pub async fn serve_with_security(
        &self,
        listener: TcpListener,
        security: ServeSecurity,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        if security.callers.requires_identity() && !(security.tls.is_some() && security.mutual_tls)
        {
            return Err(Error::InvalidArgument(
                "a coordinator identity is checked on the caller's TLS certificate: it needs mutual TLS (a server certificate and a client CA)".into(),
            ));
        }
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = security.tls {
            builder = builder
                .tls_config(tls)
                .map_err(|e| Error::InvalidArgument(format!("TLS settings: {e}")))?;
        }
        let resolver = self.spawn_in_doubt_resolver();
        let pruner = self.spawn_pruner();
        // Accepted sockets get TCP_NODELAY here: `Server::tcp_nodelay` only reaches sockets
        // tonic binds itself, and without it Nagle meets delayed ACKs (40 ms per call).
        let server = builder
            .add_service(self.grpc_service_with(security.callers))
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
    use crate::saga_barrier::StepRecord;
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
            traceparent: String::new(),
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
        ParticipantService {
            participant,
            callers: Arc::default(),
        }
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
            held: false,
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

    /// One step of saga `saga` (an action's or a compensation's request).
    fn item(saga: &str, step: u32, resource: &str, payload: Vec<u8>) -> pb::StepRequest {
        pb::StepRequest {
            saga_id: saga.into(),
            step,
            resource: resource.into(),
            payload,
            step_name: format!("s{step}"),
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        }
    }

    fn batch(steps: Vec<pb::StepRequest>) -> Request<pb::StepBatchRequest> {
        Request::new(pb::StepBatchRequest { steps })
    }

    /// Runs `steps` as unary `Act` calls, one after another, answered in a batch's form.
    async fn unary_acts(
        service: &ParticipantService,
        steps: &[pb::StepRequest],
    ) -> Vec<pb::ActBatchItem> {
        let mut items = Vec::new();
        for step in steps {
            let answer = service.act(Request::new(step.clone())).await;
            items.push(act_batch_item(answer.map(Response::into_inner)));
        }
        items
    }

    /// Runs `steps` as unary `Compensate` calls, one after another, answered in a batch's form.
    async fn unary_compensations(
        service: &ParticipantService,
        steps: &[pb::StepRequest],
    ) -> Vec<pb::CompensateBatchItem> {
        let mut items = Vec::new();
        for step in steps {
            let answer = service.compensate(Request::new(step.clone())).await;
            items.push(compensate_batch_item(answer.map(|_| ())));
        }
        items
    }

    /// A step record with its times cleared, to compare two participants' records.
    fn timeless(record: Option<StepRecord>) -> Option<StepRecord> {
        record.map(|record| match record {
            StepRecord::ActionSucceeded { resource, .. } => StepRecord::ActionSucceeded {
                resource,
                acted_ms: 0,
            },
            StepRecord::ActionFailed {
                resource, reason, ..
            } => StepRecord::ActionFailed {
                resource,
                reason,
                acted_ms: 0,
            },
            StepRecord::Compensated { action_applied, .. } => StepRecord::Compensated {
                action_applied,
                compensated_ms: 0,
            },
        })
    }

    fn error_code(code: Code) -> Option<i32> {
        Some(code as i32)
    }

    fn act_error_code(item: &pb::ActBatchItem) -> Option<i32> {
        match &item.answer {
            Some(pb::act_batch_item::Answer::Error(e)) => Some(e.code),
            _ => None,
        }
    }

    fn act_done(item: &pb::ActBatchItem) -> Option<&pb::ActResponse> {
        match &item.answer {
            Some(pb::act_batch_item::Answer::Done(done)) => Some(done),
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_step_batch_answers_each_item_as_the_unary_calls_would_and_leaves_the_same_state() {
        const EARLIER: &str = "1763850000000-earlier";
        const TRANSFER: &str = "1763850000000-transfer";
        const LATE: &str = "1763850000000-late";
        let (unary_dir, batch_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let unary = service(unary_dir.path()).await;
        let batched = service(batch_dir.path()).await;
        // Before the batches, on both: an action whose repeat must return the recorded result.
        let earlier = item(EARLIER, 0, bank::SAGA_STEP, op(true, "alice", 10));
        for service in [&unary, &batched] {
            let answer = service.act(Request::new(earlier.clone())).await.unwrap();
            assert_eq!(answer.get_ref().result, pb::StepResult::Succeeded as i32);
        }

        // A compensation before its action (recorded, doing nothing), a malformed item and
        // an unknown handler.
        let mut bad_id = item(LATE, 1, bank::SAGA_STEP, op(false, "alice", 1));
        bad_id.saga_id = "not-an-id".into();
        let first_compensations = vec![
            item(LATE, 0, bank::SAGA_STEP, op(false, "alice", 1)),
            bad_id,
            item(LATE, 2, "nope", vec![]),
        ];
        // A success, a business failure, a malformed item, a repeat, an unknown handler and
        // the late action of a compensated step.
        let mut oversized = item(
            TRANSFER,
            3,
            bank::SAGA_STEP,
            vec![b' '; PAYLOAD_BYTES_MAX + 1],
        );
        oversized.step_name = "big".into();
        let actions = vec![
            item(TRANSFER, 0, bank::SAGA_STEP, op(true, "alice", 5)),
            item(TRANSFER, 1, bank::SAGA_STEP, op(false, "bob", 5)),
            oversized,
            earlier.clone(),
            item(TRANSFER, 2, "nope", op(true, "alice", 1)),
            item(LATE, 0, bank::SAGA_STEP, op(true, "alice", 1)),
        ];
        // Undoing the transfer's steps: a succeeded action and a failed one.
        let last_compensations = vec![
            item(TRANSFER, 0, bank::SAGA_STEP, op(false, "alice", 5)),
            item(TRANSFER, 1, bank::SAGA_STEP, op(true, "bob", 5)),
        ];

        let batch_answer = batched
            .compensate_batch(batch(first_compensations.clone()))
            .await
            .unwrap()
            .into_inner()
            .items;
        let unary_answer = unary_compensations(&unary, &first_compensations).await;
        assert_eq!(batch_answer, unary_answer);
        let codes: Vec<Option<i32>> = batch_answer
            .iter()
            .map(|i| i.error.as_ref().map(|e| e.code))
            .collect();
        assert_eq!(
            codes,
            [
                None,
                error_code(Code::InvalidArgument),
                error_code(Code::NotFound)
            ]
        );

        let batch_answer = batched
            .act_batch(batch(actions.clone()))
            .await
            .unwrap()
            .into_inner()
            .items;
        let unary_answer = unary_acts(&unary, &actions).await;
        assert_eq!(batch_answer, unary_answer);
        assert_eq!(batch_answer.len(), actions.len());
        let succeeded = pb::StepResult::Succeeded as i32;
        let failed = pb::StepResult::Failed as i32;
        assert_eq!(act_done(&batch_answer[0]).unwrap().result, succeeded);
        let refused = act_done(&batch_answer[1]).unwrap();
        assert_eq!(refused.result, failed);
        assert!(refused.reason.contains("closed"), "{refused:?}");
        assert_eq!(
            act_error_code(&batch_answer[2]),
            error_code(Code::InvalidArgument)
        );
        assert_eq!(act_done(&batch_answer[3]).unwrap().result, succeeded);
        assert_eq!(act_error_code(&batch_answer[4]), error_code(Code::NotFound));
        let late = act_done(&batch_answer[5]).unwrap();
        assert_eq!((late.result, late.reason.as_str()), (failed, "compensated"));

        let batch_answer = batched
            .compensate_batch(batch(last_compensations.clone()))
            .await
            .unwrap()
            .into_inner()
            .items;
        assert_eq!(
            batch_answer,
            unary_compensations(&unary, &last_compensations).await
        );
        assert!(
            batch_answer.iter().all(|i| i.error.is_none()),
            "{batch_answer:?}"
        );

        // The same state on disk: the service's data and every step's barrier record.
        let accounts = bank::accounts(batched.participant.db()).unwrap();
        assert_eq!(accounts, bank::accounts(unary.participant.db()).unwrap());
        assert_eq!(
            bank::balances(batched.participant.db()).unwrap()["alice"],
            90,
            "only the earlier saga's debit stays (the transfer was undone): {accounts:?}"
        );
        for (saga, steps) in [(EARLIER, 0..1), (TRANSFER, 0..4), (LATE, 0..3)] {
            let saga = TxnId::parse(saga).unwrap();
            for step in steps {
                let record = timeless(batched.participant.step_record(&saga, step).unwrap());
                assert_eq!(
                    record,
                    timeless(unary.participant.step_record(&saga, step).unwrap()),
                    "saga {saga} step {step}"
                );
            }
        }
    }

    #[tokio::test]
    async fn step_batches_that_are_empty_or_too_large_are_refused_whole() {
        let dir = tempfile::tempdir().unwrap();
        let service = service(dir.path()).await;
        let too_many: Vec<pb::StepRequest> = (0..=CALL_BATCH_ITEMS_MAX as u32)
            .map(|step| item(SAGA, step, bank::SAGA_STEP, op(true, "alice", 1)))
            .collect();
        for steps in [Vec::new(), too_many] {
            let what = format!("a batch of {} steps", steps.len());
            let status = service.act_batch(batch(steps.clone())).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
            let status = service.compensate_batch(batch(steps)).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        }
        let saga = TxnId::parse(SAGA).unwrap();
        assert_eq!(service.participant.step_record(&saga, 0).unwrap(), None);
        assert_eq!(
            bank::balances(service.participant.db()).unwrap()["alice"],
            100
        );
    }

    #[tokio::test]
    async fn step_batches_from_a_caller_the_policy_refuses_are_unauthenticated() {
        let dir = tempfile::tempdir().unwrap();
        let mut service = service(dir.path()).await;
        let token = tandem_common::credentials::Token::parse("coordinator-secret-0123").unwrap();
        service.callers = Arc::new(
            CallerPolicy::default().coordinator_tokens(TokenSet::single("coordinator", &token)),
        );
        let steps = || vec![item(SAGA, 0, bank::SAGA_STEP, op(true, "alice", 10))];
        let with = |token: Option<&str>| {
            let mut request = batch(steps());
            if let Some(token) = token {
                let value = format!("Bearer {token}").parse().unwrap();
                request.metadata_mut().insert("authorization", value);
            }
            request
        };
        for presented in [None, Some("someone-else-0123456789")] {
            let status = service.act_batch(with(presented)).await.unwrap_err();
            assert_eq!(
                status.code(),
                Code::Unauthenticated,
                "{presented:?}: {status:?}"
            );
            let status = service.compensate_batch(with(presented)).await.unwrap_err();
            assert_eq!(
                status.code(),
                Code::Unauthenticated,
                "{presented:?}: {status:?}"
            );
        }
        let saga = TxnId::parse(SAGA).unwrap();
        assert_eq!(service.participant.step_record(&saga, 0).unwrap(), None);
        // The coordinator's token is served.
        let answer = service
            .act_batch(with(Some("coordinator-secret-0123")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            act_done(&answer.items[0]).map(|done| done.result),
            Some(pb::StepResult::Succeeded as i32)
        );
        assert_eq!(
            bank::balances(service.participant.db()).unwrap()["alice"],
            90
        );
    }
}
