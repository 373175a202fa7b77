//! How the coordinator reaches participants: a trait, and its gRPC implementation.
//!
//! The runtime only ever calls [`ParticipantTransport`]; tests plug in their own. The gRPC
//! implementation keeps one lazily connected tonic channel per participant address (HTTP/2
//! multiplexes every concurrent call over it) and bounds every call with a timeout. Saga step
//! calls (actions and compensations) to one participant are carried in batches when several
//! are in flight at once ([`step_batch`]); the runtime still sees one call and one answer per
//! step.
//!
//! Every call carries its transaction's trace context, when it has one, as the W3C
//! `traceparent` gRPC metadata entry ([`set_traceparent`]), so the participant's logs join the
//! transaction's trace; a batched step carries it in its item's `traceparent` field.
//!
//! Security ([`ParticipantSecurity`]): an `https://` participant is called over TLS, trusting
//! the configured CA and, when a client identity is configured, presenting it (participants
//! that require mutual TLS check that it names the coordinator). A configured token goes with
//! every call as `authorization: Bearer <token>`. The edge admits only the scheme that matches
//! this configuration (`CoordinatorConfig::participant_tls`); the check here covers work
//! recovered from the log that named another.

mod step_batch;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_common::credentials::{BearerInterceptor, Token};
use tandem_common::{BranchIdx, TraceContext, TxnId};
use tandem_proto::v1 as pb;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::engine::saga::ActionAnswer;
use crate::engine::types::{BranchTarget, Vote};
use crate::runtime::SagaView;

use step_batch::{StepBatcher, STEP_BATCH_ANSWER_BYTES_MAX};
pub use step_batch::{STEP_BATCHES_IN_FLIGHT, STEP_BATCH_BYTES_BUDGET};

/// Why a call to a participant got no usable answer. The coordinator cannot tell whether the
/// participant acted on the request.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct TransportError(pub String);

pub type CallFuture<T> = Pin<Box<dyn Future<Output = Result<T, TransportError>> + Send>>;

/// A prepare request for one branch.
#[derive(Debug, Clone)]
pub struct PrepareCall {
    pub txn: TxnId,
    pub branch: BranchIdx,
    pub target: BranchTarget,
    pub payload: Vec<u8>,
    /// Where the participant can ask this coordinator for the outcome.
    pub coordinator: String,
    pub timeout: Duration,
    /// The trace context to send (a child of the transaction's).
    pub trace: Option<TraceContext>,
}

/// A decision for one branch.
#[derive(Debug, Clone)]
pub struct DecisionCall {
    pub txn: TxnId,
    pub branch: BranchIdx,
    pub target: BranchTarget,
    pub commit: bool,
    pub timeout: Duration,
    /// The trace context to send (a child of the transaction's).
    pub trace: Option<TraceContext>,
}

/// A saga step's action or compensation.
#[derive(Debug, Clone)]
pub struct StepCall {
    pub saga: TxnId,
    pub step: u32,
    pub step_name: String,
    pub target: BranchTarget,
    pub payload: Vec<u8>,
    pub timeout: Duration,
    /// The trace context to send (a child of the transaction's).
    pub trace: Option<TraceContext>,
}

/// A saga's completion callback.
#[derive(Debug, Clone)]
pub struct CallbackCall {
    pub saga: TxnId,
    pub target: BranchTarget,
    /// The saga's final state.
    pub state: SagaView,
    pub timeout: Duration,
    /// The trace context to send (a child of the transaction's).
    pub trace: Option<TraceContext>,
}

pub trait ParticipantTransport: Send + Sync + 'static {
    fn prepare(&self, call: PrepareCall) -> CallFuture<Vote>;
    fn deliver(&self, call: DecisionCall) -> CallFuture<()>;
    /// Runs a step's action. An error (no answer, or an error status) is retried by the
    /// engine; only an answer of FAILED is a business failure.
    fn act(&self, call: StepCall) -> CallFuture<ActionAnswer>;
    fn compensate(&self, call: StepCall) -> CallFuture<()>;
    fn saga_finished(&self, call: CallbackCall) -> CallFuture<()>;
}

/// How the coordinator proves itself to participants.
#[derive(Clone, Default)]
pub struct ParticipantSecurity {
    /// TLS settings for `https://` participants: the CA to trust, and the identity presented
    /// to participants that require mutual TLS. `None`: no participant is called over TLS.
    pub tls: Option<ClientTlsConfig>,
    /// Sent with every call as `authorization: Bearer <token>` (participants that require a
    /// token from the coordinator check it).
    pub token: Option<Token>,
}

// By hand: tonic's `ClientTlsConfig` would print its identity's private key.
impl std::fmt::Debug for ParticipantSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParticipantSecurity")
            .field("tls", &self.tls.is_some())
            .field("token", &self.token)
            .finish()
    }
}

type ParticipantClient =
    pb::participant_client::ParticipantClient<InterceptedService<Channel, BearerInterceptor>>;

/// The gRPC transport: `tandem.v1.Participant` over tonic.
pub struct GrpcTransport {
    channels: Mutex<HashMap<String, Channel>>,
    /// The step batching of each participant address (see [`step_batch`]).
    batchers: Mutex<HashMap<String, Arc<StepBatcher>>>,
    tls: Option<ClientTlsConfig>,
    bearer: BearerInterceptor,
}

impl Default for GrpcTransport {
    fn default() -> Self {
        GrpcTransport::new()
    }
}

impl GrpcTransport {
    /// Plaintext, without a token.
    pub fn new() -> Self {
        GrpcTransport::with_security(ParticipantSecurity::default())
    }

    pub fn with_security(security: ParticipantSecurity) -> Self {
        GrpcTransport {
            channels: Mutex::new(HashMap::new()),
            batchers: Mutex::new(HashMap::new()),
            tls: security.tls,
            bearer: BearerInterceptor::new(security.token.as_ref()),
        }
    }

    fn client(&self, participant: &str) -> Result<ParticipantClient, TransportError> {
        let mut channels = self.channels.lock().unwrap();
        let channel = match channels.get(participant) {
            Some(channel) => channel.clone(),
            None => {
                let mut endpoint = Endpoint::from_shared(participant.to_string())
                    .map_err(|e| {
                        TransportError(format!("bad participant address {participant:?}: {e}"))
                    })?
                    .connect_timeout(Duration::from_secs(2))
                    .tcp_nodelay(true);
                if participant.starts_with("https://") {
                    let tls = self.tls.clone().ok_or_else(|| {
                        TransportError(format!(
                            "{participant}: an https participant, but this coordinator has no TLS settings for participants (--participant-ca)"
                        ))
                    })?;
                    endpoint = endpoint
                        .tls_config(tls)
                        .map_err(|e| TransportError(format!("{participant}: TLS settings: {e}")))?;
                }
                let channel = endpoint.connect_lazy();
                channels.insert(participant.to_string(), channel.clone());
                channel
            }
        };
        Ok(pb::participant_client::ParticipantClient::with_interceptor(
            channel,
            self.bearer.clone(),
        ))
    }

    /// The step batcher of `participant`, made on first use.
    fn batcher(&self, participant: &str) -> Result<Arc<StepBatcher>, TransportError> {
        let mut batchers = self.batchers.lock().unwrap();
        if let Some(batcher) = batchers.get(participant) {
            return Ok(batcher.clone());
        }
        let client = self
            .client(participant)?
            .max_decoding_message_size(STEP_BATCH_ANSWER_BYTES_MAX);
        let batcher = StepBatcher::new(participant.to_string(), client);
        batchers.insert(participant.to_string(), batcher.clone());
        Ok(batcher)
    }
}

/// Longest reason or error text taken from a participant's answer, in bytes: such texts end
/// up in forced records, which must stay under `tandem_common::RECORD_BYTES_MAX`.
pub const REASON_BYTES_MAX: usize = 1024;

fn status_error(participant: &str, status: tonic::Status) -> TransportError {
    let message = format!("{participant}: {:?}: {}", status.code(), status.message());
    TransportError(tandem_common::clip_text(message, REASON_BYTES_MAX))
}

impl ParticipantTransport for GrpcTransport {
    fn prepare(&self, call: PrepareCall) -> CallFuture<Vote> {
        let client = self.client(&call.target.participant);
        Box::pin(async move {
            let mut client = client?;
            let mut request = tonic::Request::new(pb::PrepareRequest {
                txn_id: call.txn.to_string(),
                branch: call.branch.0,
                resource: call.target.resource.clone(),
                payload: call.payload,
                coordinator: call.coordinator,
            });
            request.set_timeout(call.timeout);
            set_traceparent(&mut request, call.trace.as_ref());
            let answer = tokio::time::timeout(call.timeout, client.prepare(request))
                .await
                .map_err(|_| {
                    TransportError(format!(
                        "{}: prepare timed out after {:?}",
                        call.target.participant, call.timeout
                    ))
                })?
                .map_err(|s| status_error(&call.target.participant, s))?
                .into_inner();
            match pb::Vote::try_from(answer.vote) {
                Ok(pb::Vote::Yes) => Ok(Vote::Yes),
                Ok(pb::Vote::No) => Ok(Vote::No {
                    reason: tandem_common::clip_text(answer.reason, REASON_BYTES_MAX),
                }),
                Ok(pb::Vote::Unspecified) | Err(_) => Err(TransportError(format!(
                    "{}: prepare answered without a vote ({})",
                    call.target.participant, answer.vote
                ))),
            }
        })
    }

    fn deliver(&self, call: DecisionCall) -> CallFuture<()> {
        let client = self.client(&call.target.participant);
        Box::pin(async move {
            let mut client = client?;
            let mut request = tonic::Request::new(pb::DecisionRequest {
                txn_id: call.txn.to_string(),
                branch: call.branch.0,
                resource: call.target.resource.clone(),
            });
            request.set_timeout(call.timeout);
            set_traceparent(&mut request, call.trace.as_ref());
            let answer = if call.commit {
                client.commit(request).await
            } else {
                client.abort(request).await
            };
            answer
                .map(|_| ())
                .map_err(|s| status_error(&call.target.participant, s))
        })
    }

    fn act(&self, call: StepCall) -> CallFuture<ActionAnswer> {
        let batcher = self.batcher(&call.target.participant);
        Box::pin(async move {
            let batcher = batcher?;
            if batcher.unary_only() {
                return unary_act(batcher.client(), call).await;
            }
            batcher.act(call).await
        })
    }

    fn compensate(&self, call: StepCall) -> CallFuture<()> {
        let batcher = self.batcher(&call.target.participant);
        Box::pin(async move {
            let batcher = batcher?;
            if batcher.unary_only() {
                return unary_compensate(batcher.client(), call).await;
            }
            batcher.compensate(call).await
        })
    }

    fn saga_finished(&self, call: CallbackCall) -> CallFuture<()> {
        let client = self.client(&call.target.participant);
        Box::pin(async move {
            let mut client = client?;
            let participant = call.target.participant.clone();
            let mut request = tonic::Request::new(pb::SagaFinishedRequest {
                saga_id: call.saga.to_string(),
                resource: call.target.resource.clone(),
                outcome: Some(crate::server::saga::view_to_pb(&call.state)),
            });
            request.set_timeout(call.timeout);
            set_traceparent(&mut request, call.trace.as_ref());
            bounded(
                call.timeout,
                &participant,
                "callback",
                client.saga_finished(request),
            )
            .await
            .map(|_| ())
        })
    }
}

/// A step's message, without its trace context (a unary call carries it in metadata, a
/// batch item in its `traceparent` field).
fn step_message(call: &StepCall) -> pb::StepRequest {
    pb::StepRequest {
        saga_id: call.saga.to_string(),
        step: call.step,
        resource: call.target.resource.clone(),
        payload: call.payload.clone(),
        step_name: call.step_name.clone(),
        traceparent: String::new(),
    }
}

/// A unary step call's request: the step, its timeout and its trace context.
fn step_request(call: &StepCall) -> tonic::Request<pb::StepRequest> {
    let mut request = tonic::Request::new(step_message(call));
    request.set_timeout(call.timeout);
    set_traceparent(&mut request, call.trace.as_ref());
    request
}

/// A step's action as one unary `Act` call.
async fn unary_act(
    mut client: ParticipantClient,
    call: StepCall,
) -> Result<ActionAnswer, TransportError> {
    let participant = &call.target.participant;
    let answer = bounded(
        call.timeout,
        participant,
        "action",
        client.act(step_request(&call)),
    )
    .await?
    .into_inner();
    act_answer(participant, answer)
}

/// A step's compensation as one unary `Compensate` call.
async fn unary_compensate(
    mut client: ParticipantClient,
    call: StepCall,
) -> Result<(), TransportError> {
    let participant = &call.target.participant;
    let request = step_request(&call);
    bounded(
        call.timeout,
        participant,
        "compensation",
        client.compensate(request),
    )
    .await
    .map(|_| ())
}

/// What an action's answer means to the engine (a unary answer or a batch item's).
fn act_answer(participant: &str, answer: pb::ActResponse) -> Result<ActionAnswer, TransportError> {
    match pb::StepResult::try_from(answer.result) {
        Ok(pb::StepResult::Succeeded) => Ok(ActionAnswer::Succeeded),
        Ok(pb::StepResult::Failed) => Ok(ActionAnswer::Failed {
            reason: tandem_common::clip_text(answer.reason, REASON_BYTES_MAX),
        }),
        Ok(pb::StepResult::Unspecified) | Err(_) => Err(TransportError(format!(
            "{participant}: action answered without a result ({})",
            answer.result
        ))),
    }
}

/// Puts `trace` into the request's metadata as W3C `traceparent`.
pub fn set_traceparent<T>(request: &mut tonic::Request<T>, trace: Option<&TraceContext>) {
    if let Some(trace) = trace {
        trace.set_on(request);
    }
}

/// Awaits a call for at most `timeout`; a timeout or an error status is a transport error.
async fn bounded<T>(
    timeout: Duration,
    participant: &str,
    what: &str,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<tonic::Response<T>, TransportError> {
    bounded_status(timeout, participant, what, call)
        .await?
        .map_err(|s| status_error(participant, s))
}

/// Awaits a call for at most `timeout`, a timeout being a transport error; the call's status
/// is left to the caller (a step batch reads UNIMPLEMENTED as "unary calls only").
async fn bounded_status<T>(
    timeout: Duration,
    participant: &str,
    what: &str,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<Result<tonic::Response<T>, tonic::Status>, TransportError> {
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| timed_out(participant, what, timeout))
}

/// The error of a call that got no answer within `timeout`.
fn timed_out(participant: &str, what: &str, timeout: Duration) -> TransportError {
    TransportError(format!("{participant}: {what} timed out after {timeout:?}"))
}
