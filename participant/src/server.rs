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
//! ## Who may call
//!
//! Only the coordinator should prepare, commit, abort, act, compensate or report a finished
//! saga. [`Participant::serve_with_security`] serves over TLS ([`ServeSecurity::tls`]; with a
//! client CA, mutual TLS: a caller without a certificate that CA signed fails the handshake)
//! and applies a [`CallerPolicy`] to those six calls before anything is read or written:
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

use tandem_common::credentials::{self, TokenSet};
use tandem_common::trace_context::TRACEPARENT;
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

/// Longest a caller may take over its TLS handshake, in ms; a slower one is dropped.
pub const TLS_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;

impl ServeSecurity {
    /// TLS read from PEM files: the server's certificate chain and key and, for mutual TLS,
    /// the CA that must have signed every caller's certificate. Errors name the file.
    pub fn tls_from_files(
        cert: &std::path::Path,
        key: &std::path::Path,
        client_ca: Option<&std::path::Path>,
    ) -> Result<ServeSecurity, Error> {
        use tandem_common::credentials::{read_pem_certs, read_pem_key};
        use tonic::transport::{Certificate, Identity};
        let invalid = |e: credentials::CredentialError| Error::InvalidArgument(e.to_string());
        let cert = read_pem_certs(cert).map_err(invalid)?;
        let key = read_pem_key(key).map_err(invalid)?;
        let mut tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(cert, key))
            .timeout(std::time::Duration::from_millis(TLS_HANDSHAKE_TIMEOUT_MS));
        if let Some(ca) = client_ca {
            let ca = read_pem_certs(ca).map_err(invalid)?;
            tls = tls.client_ca_root(Certificate::from_pem(ca));
        }
        // Built once here so that a key that is not the certificate's is reported now.
        tonic::transport::Server::builder()
            .tls_config(tls.clone())
            .map_err(|e| {
                Error::InvalidArgument(format!(
                    "TLS certificate and key not usable: {}",
                    tandem_common::error_chain(&e)
                ))
            })?;
        Ok(ServeSecurity {
            tls: Some(tls),
            mutual_tls: client_ca.is_some(),
            callers: CallerPolicy::default(),
        })
    }
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
        self.callers.check(&request)?;
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
        self.callers.check(&request)?;
        let trace = incoming_trace(&request);
        self.decide(request.into_inner(), true, trace).await
    }

    async fn abort(
        &self,
        request: Request<pb::DecisionRequest>,
    ) -> Result<Response<pb::DecisionResponse>, Status> {
        self.callers.check(&request)?;
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
        self.callers.check(&request)?;
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
        self.callers.check(&request)?;
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
        self.callers.check(&request)?;
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
