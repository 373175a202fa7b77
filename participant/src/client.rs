//! The client services use to start transactions through a coordinator.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tandem_participant::Error> {
//! use tandem_participant::{Branch, Outcome, TandemClient};
//! let mut client = TandemClient::connect("127.0.0.1:7400").await?;
//! let outcome = client
//!     .execute_2pc(vec![
//!         Branch::new("127.0.0.1:7401", "bank", b"{\"op\":\"debit\",\"account\":\"alice\",\"amount\":10}".to_vec()),
//!         Branch::new("127.0.0.1:7402", "bank", b"{\"op\":\"credit\",\"account\":\"bob\",\"amount\":10}".to_vec()),
//!     ])
//!     .await?;
//! assert!(matches!(outcome, Outcome::Committed | Outcome::Aborted { .. }));
//! # Ok(()) }
//! ```
//!
//! Retries are safe: [`TandemClient::execute_2pc`] picks the transaction id itself before the
//! first attempt, and when the coordinator cannot be reached or is briefly overloaded it asks
//! again with the same id (the coordinator answers a retry with the original outcome).
//!
//! Sagas: describe one with [`Saga::sequence`] or [`Saga::graph`] and [`Step`]s, submit it with
//! [`TandemClient::submit_saga`] (which returns once the saga is durably accepted, retrying
//! with the same id just as `execute_2pc` does), then follow it as suits the caller:
//! [`TandemClient::wait`], [`TandemClient::watch`] (a stream of [`SagaChange`]s),
//! [`TandemClient::get_saga`], or a completion callback ([`Saga::callback`]) handled by a
//! [`crate::SagaCallbackHandler`] in the submitting service.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tandem_participant::Error> {
//! use std::time::Duration;
//! use tandem_participant::{bank, Saga, SagaOutcome, TandemClient};
//! let client = TandemClient::connect("127.0.0.1:7400").await?;
//! let saga = Saga::sequence(bank::transfer_saga_steps(
//!     ("127.0.0.1:7401", "alice"),
//!     ("127.0.0.1:7402", "bob"),
//!     10,
//! ));
//! let id = client.submit_saga(saga).await?;
//! let state = client.wait(&id, Duration::from_secs(10)).await?;
//! match state.outcome() {
//!     Some(SagaOutcome::Completed) => {}
//!     Some(SagaOutcome::Compensated { failed_step, reason }) => { let _ = (failed_step, reason); }
//!     Some(SagaOutcome::Aborted { .. }) | None => {}
//! }
//! # Ok(()) }
//! ```
//!
//! Tracing: every transaction and saga is submitted with a W3C `traceparent` (gRPC metadata):
//! the one given ([`TandemClient::execute_2pc_traced`], [`Saga::trace`]) or a new one. The
//! coordinator passes it on to every participant call, so one transaction reads as one trace.
//!
//! Security: [`TandemClient::connect_with`] takes [`ConnectOptions`]: TLS settings (the CA
//! that signed the coordinator's certificate and, under mutual TLS, the client's identity)
//! and a bearer token; [`TandemClient::with_token`] adds a token to a client already
//! connected. A token is sent with every call as `authorization: Bearer <token>` and never
//! printed.
//!
//! Prost types stay in here: sagas go out converted from [`Saga`], states come back converted
//! into [`SagaState`] and [`SagaChange`] (see [`crate::saga_state`]).

use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_common::call_batch::{BatchLimits, CallBatcher};
use tandem_common::credentials::{BearerInterceptor, Token};
use tandem_common::{unix_now_ms, TraceContext, TxnId};
use tandem_proto::v1 as pb;
use tokio_stream::{Stream, StreamExt};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tracing::Instrument;

use crate::error::Error;
use crate::saga_state::{SagaChange, SagaState};
use crate::wait_stream::{WaitStreams, Waited};

/// How many times a call is tried before its last error is returned.
const ATTEMPTS_MAX: u32 = 4;
/// Longest wait one `WaitSaga` call may ask for (the contract's limit), in ms; longer waits are
/// made of several calls.
const WAIT_CALL_MS_MAX: u64 = 300_000;
/// How much longer than the wait it asked for a `WaitSaga` call may take before the client
/// gives up on that call, in ms.
const WAIT_CALL_GRACE_MS: u64 = 5_000;
/// Pause between `WaitSaga` calls when the coordinator answers early or errs, in ms.
const WAIT_PAUSE_MS: u64 = 50;

/// One branch of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Branch {
    /// The participant's endpoint, `host:port` or `http://host:port`.
    pub participant: String,
    /// The resource inside the participant ("" for its default).
    pub resource: String,
    /// Handed to the resource's prepare.
    pub payload: Vec<u8>,
}

impl Branch {
    pub fn new(
        participant: impl Into<String>,
        resource: impl Into<String>,
        payload: Vec<u8>,
    ) -> Self {
        Branch {
            participant: participant.into(),
            resource: resource.into(),
            payload,
        }
    }
}

/// A transaction's outcome, durable when it is returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every participant commits.
    Committed,
    /// No participant commits.
    Aborted { reason: String },
}

/// How a saga step's action is retried when it gets no answer (a transport error, a timeout,
/// UNAVAILABLE); a business failure is never retried. Every field's zero means the
/// coordinator's default (given as "default: ..."), so `RetryPolicy::default()` is "all
/// defaults".
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RetryPolicy {
    /// Delay before the first retry (default: 50 ms).
    pub initial_delay_ms: u64,
    /// Growth of the delay per retry (default: 2.0); otherwise at least 1.0.
    pub multiplier: f64,
    /// Cap of the delay (default: 5,000 ms).
    pub max_delay_ms: u64,
    /// Attempts in all, the first included (default: 10); at most 1,000.
    pub max_attempts: u32,
    /// No new attempt starts this long after the first. 0 means no deadline once a policy is
    /// given; a step with no policy at all gets the coordinator's 60,000 ms.
    pub deadline_ms: u64,
}

/// One step of a saga: an action at one participant and the compensation that undoes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Unique within the saga: 1 to 64 of `[A-Za-z0-9_.-]`.
    pub name: String,
    /// The participant's endpoint, `host:port` or `http://host:port`.
    pub participant: String,
    /// The saga step handler inside the participant ("" for its default).
    pub resource: String,
    /// Handed to the action. At most 64 KiB.
    pub action: Vec<u8>,
    /// Handed to the compensation. At most 64 KiB.
    pub compensation: Vec<u8>,
    /// Names of the steps that must succeed before this one starts (graphs only; empty in a
    /// sequence).
    pub after: Vec<String>,
    /// The action's retry policy; `None` for the coordinator's default.
    pub retry: Option<RetryPolicy>,
    /// Bound of one action call; `None` for the coordinator's default (10 s).
    pub timeout: Option<Duration>,
}

impl Step {
    pub fn new(
        name: impl Into<String>,
        participant: impl Into<String>,
        resource: impl Into<String>,
        action: Vec<u8>,
        compensation: Vec<u8>,
    ) -> Self {
        Step {
            name: name.into(),
            participant: participant.into(),
            resource: resource.into(),
            action,
            compensation,
            after: Vec::new(),
            retry: None,
            timeout: None,
        }
    }

    /// The steps this one waits for (in a [`Saga::graph`]).
    pub fn after<I, S>(mut self, steps: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.after = steps.into_iter().map(Into::into).collect();
        self
    }

    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    fn into_pb(self) -> pb::SagaStep {
        pb::SagaStep {
            name: self.name,
            participant: self.participant,
            resource: self.resource,
            action: self.action,
            compensation: self.compensation,
            after: self.after,
            retry: self.retry.map(|r| pb::RetryPolicy {
                initial_delay_ms: r.initial_delay_ms,
                multiplier: r.multiplier,
                max_delay_ms: r.max_delay_ms,
                max_attempts: r.max_attempts,
                deadline_ms: r.deadline_ms,
            }),
            timeout_ms: self.timeout.map_or(0, duration_ms),
        }
    }
}

/// How a saga's steps are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SagaShape {
    /// One after another, in the order given.
    Sequence,
    /// Each step as soon as the steps in its `after` have succeeded; independent steps run
    /// concurrently.
    Graph,
}

/// A saga to submit: its steps, how they are ordered, optionally its id and a completion
/// callback. Validated by the coordinator (1 to 32 steps, unique names, no cycles, payload
/// sizes): a malformed saga is refused with [`Error::InvalidArgument`].
#[derive(Debug, Clone, PartialEq)]
pub struct Saga {
    id: Option<TxnId>,
    steps: Vec<Step>,
    shape: SagaShape,
    /// `(participant endpoint, callback handler name)`.
    callback: Option<(String, String)>,
    /// The trace the saga joins; `None` for a new one.
    trace: Option<TraceContext>,
}

impl Saga {
    /// Steps that run one after another in the order given.
    pub fn sequence(steps: impl IntoIterator<Item = Step>) -> Self {
        Saga {
            id: None,
            steps: steps.into_iter().collect(),
            shape: SagaShape::Sequence,
            callback: None,
            trace: None,
        }
    }

    /// Steps that run as their [`Step::after`] dependencies allow.
    pub fn graph(steps: impl IntoIterator<Item = Step>) -> Self {
        Saga {
            shape: SagaShape::Graph,
            ..Saga::sequence(steps)
        }
    }

    /// Uses `id` as the saga's id (submitting again with it is idempotent). Without it,
    /// [`TandemClient::submit_saga`] picks a fresh one.
    pub fn id(mut self, id: TxnId) -> Self {
        self.id = Some(id);
        self
    }

    /// Has the coordinator report the outcome to the callback handler `name` hosted by the
    /// participant at `participant` (retried until acknowledged; the handler runs once).
    pub fn callback(mut self, participant: impl Into<String>, name: impl Into<String>) -> Self {
        self.callback = Some((participant.into(), name.into()));
        self
    }

    /// Submits the saga as part of the trace `trace` (the caller's span, as W3C trace
    /// context); without it, the submission starts a new trace.
    pub fn trace(mut self, trace: TraceContext) -> Self {
        self.trace = Some(trace);
        self
    }

    /// The id set with [`Saga::id`], if any.
    pub fn saga_id(&self) -> Option<&TxnId> {
        self.id.as_ref()
    }

    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    pub fn shape(&self) -> SagaShape {
        self.shape
    }

    fn into_pb(self, id: &TxnId) -> pb::SubmitSagaRequest {
        pb::SubmitSagaRequest {
            saga_id: id.to_string(),
            steps: self.steps.into_iter().map(Step::into_pb).collect(),
            sequential: match self.shape {
                SagaShape::Sequence => true,
                SagaShape::Graph => false,
            },
            callback: self
                .callback
                .map(|(participant, resource)| pb::SagaCallback {
                    participant,
                    resource,
                }),
            traceparent: String::new(),
        }
    }
}

/// `d` in whole milliseconds, at least 1 (0 means "the default" on the wire).
fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// The coordinator answered something the contract rules out.
fn malformed_answer(what: &str, problem: String) -> Error {
    Error::Coordinator {
        code: tonic::Code::Internal,
        message: format!("coordinator answered a malformed {what}: {problem}"),
    }
}

/// `message` as a request carrying `trace` as its `traceparent` metadata.
fn traced<T>(message: T, trace: &TraceContext) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    trace.set_on(&mut request);
    request
}

pub(crate) type CoordinatorClient =
    pb::coordinator_client::CoordinatorClient<InterceptedService<Channel, BearerInterceptor>>;

/// How [`TandemClient::connect_with`] reaches the coordinator.
#[derive(Clone, Default)]
pub struct ConnectOptions {
    /// TLS settings: the CA that signed the coordinator's certificate and, for a coordinator
    /// that requires mutual TLS, this client's identity. With them, an address without a
    /// scheme is `https://`.
    pub tls: Option<ClientTlsConfig>,
    /// Sent with every call as `authorization: Bearer <token>`.
    pub token: Option<Token>,
}

// By hand: tonic's `ClientTlsConfig` would print its identity's private key.
impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("tls", &self.tls.is_some())
            .field("token", &self.token)
            .finish()
    }
}

impl ConnectOptions {
    /// TLS settings read from PEM files: the CA that signed the coordinator's certificate,
    /// and optionally this client's certificate and key (for mutual TLS). Errors name the
    /// file.
    pub fn tls_from_files(
        ca: &std::path::Path,
        identity: Option<(&std::path::Path, &std::path::Path)>,
    ) -> Result<ClientTlsConfig, Error> {
        use tandem_common::credentials::{client_tls_from_files, PemFile};
        let file = |path, setting| PemFile { path, setting };
        let tls = client_tls_from_files(
            file(ca, "CA certificate"),
            identity.map(|(cert, key)| (file(cert, "client certificate"), file(key, "client key"))),
        )
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        Ok(tls)
    }
}

/// A client of the coordinator. Cheap to clone (clones share the connection, and the queue
/// of submissions waiting to be carried).
#[derive(Clone)]
pub struct TandemClient {
    channel: Channel,
    inner: CoordinatorClient,
    submits: SubmitBatcher,
    waits: Arc<WaitStreams>,
}

/// Saga submissions on their way to the coordinator: concurrent ones share `SubmitSagas`
/// calls ([`tandem_common::call_batch`]); each answers its saga's id or the error a single
/// `SubmitSaga` would have got.
type SubmitBatcher = CallBatcher<pb::SubmitSagaRequest, Result<String, tonic::Status>>;

/// Whether the coordinator takes `SubmitSagas` (one older than it answers UNIMPLEMENTED).
const BATCHING_UNKNOWN: u8 = 0;
const BATCHING_TAKEN: u8 = 1;
const BATCHING_REFUSED: u8 = 2;

fn submit_batcher(client: CoordinatorClient) -> SubmitBatcher {
    let batching = Arc::new(AtomicU8::new(BATCHING_UNKNOWN));
    CallBatcher::new(
        BatchLimits::default(),
        |item: &pb::SubmitSagaRequest| prost::Message::encoded_len(item),
        move |items| Box::pin(submit_batch(client.clone(), items, batching.clone())),
    )
}

/// Carries one batch of submissions: as one `SubmitSagas` call, or, to a coordinator that
/// does not take it, as one `SubmitSaga` call per item.
async fn submit_batch(
    mut client: CoordinatorClient,
    items: Vec<pb::SubmitSagaRequest>,
    batching: Arc<AtomicU8>,
) -> Vec<Result<String, tonic::Status>> {
    let count = items.len();
    let known = batching.load(Ordering::Relaxed);
    if known != BATCHING_REFUSED {
        // Kept for single calls only until the coordinator is known to take batches.
        let spare = (known == BATCHING_UNKNOWN).then(|| items.clone());
        let request = pb::SubmitSagasRequest { sagas: items };
        match client.submit_sagas(request).await {
            Ok(answer) => {
                batching.store(BATCHING_TAKEN, Ordering::Relaxed);
                let results = answer.into_inner().results;
                if results.len() != count {
                    let status = tonic::Status::internal(format!(
                        "the coordinator answered {} results for {count} submitted sagas",
                        results.len()
                    ));
                    return vec![Err(status); count];
                }
                return results.into_iter().map(submit_result).collect();
            }
            Err(status) if status.code() == tonic::Code::Unimplemented && spare.is_some() => {
                tracing::debug!("the coordinator takes no SubmitSagas; submitting one by one");
                batching.store(BATCHING_REFUSED, Ordering::Relaxed);
                return submit_singly(client, spare.expect("checked")).await;
            }
            Err(status) => return vec![Err(status); count],
        }
    }
    submit_singly(client, items).await
}

fn submit_result(result: pb::SubmitSagaResult) -> Result<String, tonic::Status> {
    match result.result {
        Some(pb::submit_saga_result::Result::SagaId(id)) => Ok(id),
        Some(pb::submit_saga_result::Result::Error(e)) => Err(e.into()),
        None => Err(tonic::Status::internal(
            "the coordinator answered a submitted saga without a result",
        )),
    }
}

async fn submit_singly(
    client: CoordinatorClient,
    items: Vec<pb::SubmitSagaRequest>,
) -> Vec<Result<String, tonic::Status>> {
    futures::future::join_all(items.into_iter().map(|mut item| {
        let mut client = client.clone();
        async move {
            let traceparent = std::mem::take(&mut item.traceparent);
            let mut request = tonic::Request::new(item);
            if let Some(trace) = TraceContext::of_item(&traceparent) {
                trace.set_on(&mut request);
            }
            client
                .submit_saga(request)
                .await
                .map(|answer| answer.into_inner().saga_id)
        }
    }))
    .await
}

fn endpoint_uri(address: &str, tls: bool) -> String {
    if address.contains("://") {
        address.to_string()
    } else if tls {
        format!("https://{address}")
    } else {
        format!("http://{address}")
    }
}

/// How long to wait before retry number `attempt` (from 1) after `error`: the coordinator's
/// hint when it refused the call for overload, with up to half of it again added at random
/// so that refused clients do not all return at the same instant; otherwise exponential.
fn retry_delay(attempt: u32, error: &Error) -> Duration {
    match error {
        Error::Overloaded {
            retry_after: Some(hint),
            ..
        } => {
            let seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |t| t.as_nanos() as u64);
            let mut rng = tandem_common::backoff::SplitMix64::new(seed ^ u64::from(attempt));
            hint.mul_f64(1.0 + 0.5 * rng.next_f64())
        }
        _ => Duration::from_millis(50 << attempt),
    }
}

fn status_error(status: tonic::Status) -> Error {
    match status.code() {
        tonic::Code::InvalidArgument => Error::InvalidArgument(status.message().to_string()),
        tonic::Code::AlreadyExists => Error::AlreadyExists(status.message().to_string()),
        tonic::Code::Unavailable | tonic::Code::Unknown
            if status.message().contains("transport") =>
        {
            Error::Unavailable(status.message().to_string())
        }
        tonic::Code::Unavailable => Error::Unavailable(status.message().to_string()),
        // The client never cancels a call it still awaits (dropping the future is how it gives
        // up), so a CANCELLED status comes from the connection: the coordinator died mid-call
        // or is down behind a proxy that accepted the connection. Like UNAVAILABLE, the outcome
        // is unknown and a retry with the same id learns it (found by the chaos run).
        tonic::Code::Cancelled => Error::Unavailable(format!(
            "the call was cancelled by the connection: {}",
            status.message()
        )),
        tonic::Code::ResourceExhausted => {
            use tonic_types::StatusExt;
            Error::Overloaded {
                message: status.message().to_string(),
                retry_after: status
                    .get_details_retry_info()
                    .and_then(|hint| hint.retry_delay),
            }
        }
        code => Error::Coordinator {
            code,
            message: status.message().to_string(),
        },
    }
}

impl TandemClient {
    /// Connects to the coordinator at `address` (`host:port` or `http://host:port`),
    /// plaintext and without a token.
    pub async fn connect(address: &str) -> Result<Self, Error> {
        TandemClient::connect_with(address, ConnectOptions::default()).await
    }

    /// Connects to the coordinator at `address` (`host:port`, `http://host:port` or
    /// `https://host:port`) with TLS settings and a token as `options` says. An `https://`
    /// address needs TLS settings; a failed TLS handshake (a certificate the CA did not sign,
    /// or no client certificate where the coordinator requires one) is
    /// [`Error::Unavailable`].
    pub async fn connect_with(address: &str, options: ConnectOptions) -> Result<Self, Error> {
        let uri = endpoint_uri(address, options.tls.is_some());
        let mut endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|e| Error::InvalidArgument(format!("coordinator address {address:?}: {e}")))?
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true);
        if uri.starts_with("https://") {
            let tls = options.tls.ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "coordinator address {address:?} is https, but no TLS settings were given"
                ))
            })?;
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| Error::InvalidArgument(format!("TLS settings: {e}")))?;
        }
        let channel = endpoint.connect().await.map_err(|e| {
            Error::Unavailable(format!(
                "cannot connect to the coordinator at {address}: {}",
                tandem_common::error_chain(&e)
            ))
        })?;
        Ok(TandemClient::over(channel, options.token.as_ref()))
    }

    fn over(channel: Channel, token: Option<&Token>) -> Self {
        let inner = pb::coordinator_client::CoordinatorClient::with_interceptor(
            channel.clone(),
            BearerInterceptor::new(token),
        );
        TandemClient {
            submits: submit_batcher(inner.clone()),
            waits: WaitStreams::new(inner.clone()),
            inner,
            channel,
        }
    }

    /// This client, sending `token` as `authorization: Bearer <token>` with every call.
    pub fn with_token(self, token: Token) -> Self {
        TandemClient::over(self.channel, Some(&token))
    }

    /// A fresh transaction id, for callers that want to know (or log) it before executing.
    pub fn new_txn_id() -> TxnId {
        TxnId::generate(unix_now_ms())
    }

    /// Runs a two-phase-commit transaction with a fresh id and the coordinator's default
    /// prepare deadline; returns its durable outcome.
    pub async fn execute_2pc(&mut self, branches: Vec<Branch>) -> Result<Outcome, Error> {
        self.execute_2pc_with(&Self::new_txn_id(), branches, None)
            .await
    }

    /// Runs (or, with an id used before, retries) a transaction with id `txn` and an optional
    /// prepare deadline.
    pub async fn execute_2pc_with(
        &mut self,
        txn: &TxnId,
        branches: Vec<Branch>,
        timeout: Option<Duration>,
    ) -> Result<Outcome, Error> {
        self.execute_2pc_traced(txn, branches, timeout, None).await
    }

    /// [`execute_2pc_with`](Self::execute_2pc_with) as part of the trace `trace` (the caller's
    /// span, as W3C trace context; `None` starts a new trace). The coordinator and every
    /// participant log the transaction under its trace id.
    pub async fn execute_2pc_traced(
        &mut self,
        txn: &TxnId,
        branches: Vec<Branch>,
        timeout: Option<Duration>,
        trace: Option<TraceContext>,
    ) -> Result<Outcome, Error> {
        let trace = trace.unwrap_or_else(TraceContext::new_root).child();
        let span =
            tracing::debug_span!("execute_2pc", txn = %txn, trace_id = %trace.trace_id_hex());
        self.execute_2pc_once_traced(txn, branches, timeout, trace)
            .instrument(span)
            .await
    }

    async fn execute_2pc_once_traced(
        &mut self,
        txn: &TxnId,
        branches: Vec<Branch>,
        timeout: Option<Duration>,
        trace: TraceContext,
    ) -> Result<Outcome, Error> {
        let request = pb::Execute2pcRequest {
            txn_id: txn.to_string(),
            branches: branches
                .into_iter()
                .map(|b| pb::Branch {
                    participant: b.participant,
                    resource: b.resource,
                    payload: b.payload,
                })
                .collect(),
            timeout_ms: timeout.map(|t| t.as_millis().max(1) as u64).unwrap_or(0),
        };
        let mut attempt = 0;
        let answer = loop {
            attempt += 1;
            match self.inner.execute2pc(traced(request.clone(), &trace)).await {
                Ok(answer) => break answer.into_inner(),
                Err(status) => {
                    let error = status_error(status);
                    if !error.is_retryable() || attempt >= ATTEMPTS_MAX {
                        return Err(error);
                    }
                    tracing::debug!(txn = %txn, attempt, error = %error, "retrying with the same id");
                    tokio::time::sleep(retry_delay(attempt, &error)).await;
                }
            }
        };
        match pb::Outcome::try_from(answer.outcome) {
            Ok(pb::Outcome::Committed) => Ok(Outcome::Committed),
            Ok(pb::Outcome::Aborted) => Ok(Outcome::Aborted {
                reason: answer.reason,
            }),
            other => Err(Error::Coordinator {
                code: tonic::Code::Internal,
                message: format!("coordinator answered execute with outcome {other:?}"),
            }),
        }
    }

    /// The coordinator's view of a transaction.
    pub async fn get(&mut self, txn: &TxnId) -> Result<pb::GetTransactionResponse, Error> {
        let answer = self
            .inner
            .get_transaction(pb::GetTransactionRequest {
                txn_id: txn.to_string(),
            })
            .await
            .map_err(status_error)?;
        Ok(answer.into_inner())
    }

    /// Runs `call` on a fresh handle of the connection; retries (with the same request)
    /// while the error is retryable, at most [`ATTEMPTS_MAX`] times in all.
    async fn call_retrying<T, F, Fut>(&self, what: &'static str, mut call: F) -> Result<T, Error>
    where
        F: FnMut(CoordinatorClient) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match call(self.inner.clone()).await {
                Ok(answer) => return Ok(answer.into_inner()),
                Err(status) => {
                    let error = status_error(status);
                    if !error.is_retryable() || attempt >= ATTEMPTS_MAX {
                        return Err(error);
                    }
                    tracing::debug!(call = what, attempt, error = %error, "retrying");
                    tokio::time::sleep(retry_delay(attempt, &error)).await;
                }
            }
        }
    }

    /// Submits `saga` and returns its id once the coordinator has durably accepted it (it will
    /// terminate), without waiting for any step. The id is picked before the first attempt
    /// (unless the saga has one), so retries on a retryable error are idempotent.
    ///
    /// Errors: [`Error::InvalidArgument`] for a malformed saga, [`Error::AlreadyExists`] if
    /// the id names a saga with different content.
    pub async fn submit_saga(&self, saga: Saga) -> Result<TxnId, Error> {
        let id = saga.saga_id().cloned().unwrap_or_else(Self::new_txn_id);
        let trace = saga.trace.unwrap_or_else(TraceContext::new_root).child();
        let mut request = saga.into_pb(&id);
        request.traceparent = trace.to_string();
        let span =
            tracing::debug_span!("submit_saga", saga = %id, trace_id = %trace.trace_id_hex());
        let answer = self
            .call_retrying("SubmitSaga", |_| {
                let (submits, request) = (self.submits.clone(), request.clone());
                async move {
                    match submits.call(request).await {
                        Some(answer) => answer.map(|saga_id| {
                            tonic::Response::new(pb::SubmitSagaResponse { saga_id })
                        }),
                        None => Err(tonic::Status::unavailable(
                            "the call carrying the submission stopped without an answer",
                        )),
                    }
                }
            })
            .instrument(span)
            .await?;
        if answer.saga_id != id.as_str() {
            return Err(malformed_answer(
                "saga submission",
                format!(
                    "saga id {:?} for the saga submitted as {id}",
                    answer.saga_id
                ),
            ));
        }
        Ok(id)
    }

    /// The saga's current state, with every step's status. A saga the coordinator does not
    /// know is [`Error::Coordinator`] with code `NotFound`.
    pub async fn get_saga(&self, id: &TxnId) -> Result<SagaState, Error> {
        let request = pb::GetSagaRequest {
            saga_id: id.to_string(),
        };
        let span = tracing::debug_span!("get_saga", saga = %id);
        let state = self
            .call_retrying("GetSaga", |mut client| {
                let request = request.clone();
                async move { client.get_saga(request).await }
            })
            .instrument(span)
            .await?;
        SagaState::from_pb(state).map_err(|e| malformed_answer("saga state", e))
    }

    /// Waits until the saga is terminal or `timeout` has passed, and returns its state (check
    /// [`SagaState::terminal`]). Concurrent waits share one `WaitSagas` stream
    /// ([`crate::wait_stream`]); to a coordinator without it, each is a `WaitSaga` call.
    /// Waits longer than one call may ask for, and waits that fail retryably (the coordinator
    /// restarting), are covered by waiting again until `timeout`.
    pub async fn wait(&self, id: &TxnId, timeout: Duration) -> Result<SagaState, Error> {
        let span = tracing::debug_span!("wait_saga", saga = %id);
        async {
            if timeout.is_zero() {
                return self.state_at_timeout(id).await;
            }
            let deadline = Instant::now() + timeout;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let called = Instant::now();
                let (answer, asked_ms) = match self.waits.wait(id.as_str(), left).await {
                    Ok(Waited::State(state)) => (Ok(state), u64::MAX),
                    Ok(Waited::TimedOut) => return self.state_at_timeout(id).await,
                    Ok(Waited::Unsupported) => self.wait_call(id, left).await,
                    Err(status) => (Err(status_error(status)), u64::MAX),
                };
                let over = Instant::now() >= deadline;
                match answer {
                    Ok(state) => {
                        let state = SagaState::from_pb(state)
                            .map_err(|e| malformed_answer("saga state", e))?;
                        if state.terminal || over {
                            return Ok(state);
                        }
                        // Not terminal with time left: the coordinator answered early (a
                        // shorter wait limit of its own). Ask again, without spinning.
                        if called.elapsed() < Duration::from_millis(asked_ms) {
                            tokio::time::sleep(Duration::from_millis(WAIT_PAUSE_MS).min(left))
                                .await;
                        }
                    }
                    Err(error) if error.is_retryable() && !over => {
                        tracing::debug!(error = %error, "waiting again");
                        tokio::time::sleep(Duration::from_millis(WAIT_PAUSE_MS).min(left)).await;
                    }
                    Err(error) => return Err(error),
                }
            }
        }
        .instrument(span)
        .await
    }

    /// One `WaitSaga` call of at most `left` (and at most what one call may ask for), bounded
    /// by a grace on top; with the limit it asked for, in ms.
    async fn wait_call(&self, id: &TxnId, left: Duration) -> (Result<pb::SagaState, Error>, u64) {
        let call_ms = u64::try_from(left.as_millis())
            .unwrap_or(u64::MAX)
            .min(WAIT_CALL_MS_MAX);
        let request = pb::WaitSagaRequest {
            saga_id: id.to_string(),
            timeout_ms: call_ms,
        };
        let bound = Duration::from_millis(call_ms + WAIT_CALL_GRACE_MS);
        let answer = self
            .call_within(
                request,
                bound,
                format!("a wait of {call_ms} ms"),
                |mut c, r| async move { c.wait_saga(r).await },
            )
            .await;
        (answer, call_ms)
    }

    /// The saga's state when a wait's time is up: one `GetSaga` call, bounded like the grace
    /// of a `WaitSaga` call.
    async fn state_at_timeout(&self, id: &TxnId) -> Result<SagaState, Error> {
        let request = pb::GetSagaRequest {
            saga_id: id.to_string(),
        };
        let bound = Duration::from_millis(WAIT_CALL_GRACE_MS);
        let state = self
            .call_within(request, bound, "a saga's state", |mut c, r| async move {
                c.get_saga(r).await
            })
            .await?;
        SagaState::from_pb(state).map_err(|e| malformed_answer("saga state", e))
    }

    /// One call of `message`, bounded by `bound` as its gRPC deadline and by a local timer
    /// (which also covers a coordinator that took the call and never answers); `what` names
    /// the call in the error when the bound passes.
    async fn call_within<M, T, F, Fut>(
        &self,
        message: M,
        bound: Duration,
        what: impl std::fmt::Display,
        call: F,
    ) -> Result<T, Error>
    where
        F: FnOnce(CoordinatorClient, tonic::Request<M>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut request = tonic::Request::new(message);
        request.set_timeout(bound);
        match tokio::time::timeout(bound, call(self.inner.clone(), request)).await {
            Ok(Ok(answer)) => Ok(answer.into_inner()),
            Ok(Err(status)) => Err(status_error(status)),
            Err(_) => Err(Error::Unavailable(format!(
                "the coordinator did not answer {what} within {} ms",
                bound.as_millis()
            ))),
        }
    }

    /// Streams the saga's changes in order: every change recorded so far, then each new one
    /// as it happens, ending after [`crate::SagaChangeKind::Finished`]. An error in the
    /// stream (the connection broke) ends it; watching again replays from the first change.
    pub async fn watch(
        &self,
        id: &TxnId,
    ) -> Result<impl Stream<Item = Result<SagaChange, Error>> + Send + Unpin + 'static, Error> {
        let request = pb::WatchSagaRequest {
            saga_id: id.to_string(),
        };
        let span = tracing::debug_span!("watch_saga", saga = %id);
        let changes = self
            .call_retrying("WatchSaga", |mut client| {
                let request = request.clone();
                async move { client.watch_saga(request).await }
            })
            .instrument(span)
            .await?;
        Ok(changes.map(|change| match change {
            Ok(change) => {
                SagaChange::from_pb(change).map_err(|e| malformed_answer("saga change", e))
            }
            Err(status) => Err(status_error(status)),
        }))
    }

    /// One bare round trip (for benchmarks and health checks).
    pub async fn ping(&mut self) -> Result<(), Error> {
        self.inner
            .ping(pb::PingRequest {})
            .await
            .map_err(status_error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_cut_by_the_connection_or_refused_for_overload_is_retried_with_the_same_id() {
        let cancelled = status_error(tonic::Status::cancelled("operation was canceled"));
        assert!(
            cancelled.is_retryable() && !cancelled.is_outcome_known(),
            "{cancelled:?}"
        );
        let overloaded = status_error(tonic::Status::resource_exhausted("too many"));
        assert!(
            overloaded.is_retryable() && overloaded.is_outcome_known(),
            "{overloaded:?}"
        );
        let refused = status_error(tonic::Status::invalid_argument("bad id"));
        assert!(!refused.is_retryable(), "{refused:?}");
    }

    #[test]
    fn sagas_convert_to_the_contract_once() {
        let id = TxnId::parse("1763850000000-order7").unwrap();
        let saga = Saga::graph([
            Step::new(
                "reserve",
                "127.0.0.1:1",
                "stock",
                b"r".to_vec(),
                b"u".to_vec(),
            )
            .retry(RetryPolicy {
                max_attempts: 3,
                ..RetryPolicy::default()
            })
            .timeout(Duration::from_micros(10)),
            Step::new(
                "charge",
                "http://127.0.0.1:2",
                "",
                b"c".to_vec(),
                b"r".to_vec(),
            )
            .after(["reserve"]),
        ])
        .id(id.clone())
        .callback("127.0.0.1:3", "orders");
        assert_eq!(saga.saga_id(), Some(&id));
        assert_eq!(saga.shape(), SagaShape::Graph);
        let request = saga.into_pb(&id);
        assert_eq!(request.saga_id, id.as_str());
        assert!(!request.sequential);
        assert_eq!(
            request.callback,
            Some(pb::SagaCallback {
                participant: "127.0.0.1:3".into(),
                resource: "orders".into()
            })
        );
        let reserve = &request.steps[0];
        assert_eq!(reserve.name, "reserve");
        assert_eq!(reserve.resource, "stock");
        assert_eq!(
            (&reserve.action[..], &reserve.compensation[..]),
            (&b"r"[..], &b"u"[..])
        );
        assert_eq!(reserve.retry.unwrap().max_attempts, 3);
        assert_eq!(reserve.retry.unwrap().initial_delay_ms, 0, "default");
        assert_eq!(
            reserve.timeout_ms, 1,
            "a sub-millisecond timeout is not \"default\""
        );
        let charge = &request.steps[1];
        assert_eq!(charge.after, vec!["reserve".to_string()]);
        assert_eq!(charge.retry, None);
        assert_eq!(charge.timeout_ms, 0, "the coordinator's default");

        let sequence = Saga::sequence(vec![Step::new("a", "p", "", vec![], vec![])]);
        assert_eq!(sequence.saga_id(), None);
        let request = sequence.into_pb(&id);
        assert!(request.sequential);
        assert_eq!(request.callback, None);
    }

    /// A stand-in for the coordinator's saga calls, to check the client's side of them: the
    /// first submission fails UNAVAILABLE, a wait answers "still running" twice before the
    /// saga is terminal, a watch streams three changes.
    ///
    /// `SubmitSagas` is UNIMPLEMENTED (an older coordinator) unless `takes_batches`; then the
    /// first saga it is given is refused once as overloaded, with a retry hint.
    #[derive(Default)]
    struct FakeCoordinator {
        submitted: std::sync::Mutex<Vec<pb::SubmitSagaRequest>>,
        waits: std::sync::atomic::AtomicU32,
        takes_batches: bool,
        batches: std::sync::atomic::AtomicU32,
        /// Whether it serves `WaitSagas`: each id is answered COMPLETED after 50 ms, except
        /// ids ending in `missing` (NOT_FOUND) and `slow` (never answered).
        takes_wait_streams: bool,
        wait_streams: std::sync::atomic::AtomicU32,
        /// Wait streams whose client has not closed its side yet.
        wait_streams_open: Arc<std::sync::atomic::AtomicI32>,
        /// Every id sent on a wait stream, in order.
        waited_ids: Arc<std::sync::Mutex<Vec<String>>>,
        /// Set once a stream was broken for an id ending in `break` (the first time only).
        broke_once: Arc<std::sync::atomic::AtomicBool>,
    }

    fn fake_state(id: &str, phase: pb::SagaPhase) -> pb::SagaState {
        pb::SagaState {
            saga_id: id.into(),
            phase: phase as i32,
            terminal: matches!(phase, pb::SagaPhase::Completed),
            accepted_ms: 1,
            ..Default::default()
        }
    }

    #[tonic::async_trait]
    impl pb::coordinator_server::Coordinator for FakeCoordinator {
        async fn execute2pc(
            &self,
            _: tonic::Request<pb::Execute2pcRequest>,
        ) -> Result<tonic::Response<pb::Execute2pcResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("fake"))
        }
        async fn get_transaction(
            &self,
            _: tonic::Request<pb::GetTransactionRequest>,
        ) -> Result<tonic::Response<pb::GetTransactionResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("fake"))
        }
        async fn query_outcome(
            &self,
            _: tonic::Request<pb::QueryOutcomeRequest>,
        ) -> Result<tonic::Response<pb::QueryOutcomeResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("fake"))
        }
        async fn ping(
            &self,
            _: tonic::Request<pb::PingRequest>,
        ) -> Result<tonic::Response<pb::PingResponse>, tonic::Status> {
            Ok(tonic::Response::new(pb::PingResponse {}))
        }
        async fn submit_saga(
            &self,
            request: tonic::Request<pb::SubmitSagaRequest>,
        ) -> Result<tonic::Response<pb::SubmitSagaResponse>, tonic::Status> {
            let request = request.into_inner();
            let saga_id = request.saga_id.clone();
            let mut submitted = self.submitted.lock().unwrap();
            submitted.push(request);
            if submitted.len() == 1 {
                return Err(tonic::Status::unavailable("briefly down"));
            }
            Ok(tonic::Response::new(pb::SubmitSagaResponse { saga_id }))
        }
        async fn submit_sagas(
            &self,
            request: tonic::Request<pb::SubmitSagasRequest>,
        ) -> Result<tonic::Response<pb::SubmitSagasResponse>, tonic::Status> {
            use tonic_types::{ErrorDetails, StatusExt};
            if !self.takes_batches {
                return Err(tonic::Status::unimplemented("an older coordinator"));
            }
            self.batches
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut submitted = self.submitted.lock().unwrap();
            let mut results = Vec::new();
            for item in request.into_inner().sagas {
                let saga_id = item.saga_id.clone();
                submitted.push(item);
                let result = if submitted.len() == 1 {
                    let busy = tonic::Status::with_error_details(
                        tonic::Code::ResourceExhausted,
                        "busy",
                        ErrorDetails::with_retry_info(Some(Duration::from_millis(10))),
                    );
                    pb::submit_saga_result::Result::Error((&busy).into())
                } else {
                    pb::submit_saga_result::Result::SagaId(saga_id)
                };
                results.push(pb::SubmitSagaResult {
                    result: Some(result),
                });
            }
            Ok(tonic::Response::new(pb::SubmitSagasResponse { results }))
        }
        async fn get_saga(
            &self,
            request: tonic::Request<pb::GetSagaRequest>,
        ) -> Result<tonic::Response<pb::SagaState>, tonic::Status> {
            let id = request.into_inner().saga_id;
            if id.ends_with("missing") {
                return Err(tonic::Status::not_found("no such saga"));
            }
            Ok(tonic::Response::new(fake_state(
                &id,
                pb::SagaPhase::Running,
            )))
        }
        async fn wait_saga(
            &self,
            request: tonic::Request<pb::WaitSagaRequest>,
        ) -> Result<tonic::Response<pb::SagaState>, tonic::Status> {
            let request = request.into_inner();
            if request.timeout_ms == 0 {
                let state = fake_state(&request.saga_id, pb::SagaPhase::Running);
                return Ok(tonic::Response::new(state));
            }
            let n = self
                .waits
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let phase = if n < 2 {
                pb::SagaPhase::Running
            } else {
                pb::SagaPhase::Completed
            };
            Ok(tonic::Response::new(fake_state(&request.saga_id, phase)))
        }
        type WaitSagasStream = std::pin::Pin<
            Box<dyn Stream<Item = Result<pb::WaitSagasResponse, tonic::Status>> + Send + 'static>,
        >;
        async fn wait_sagas(
            &self,
            request: tonic::Request<tonic::Streaming<pb::WaitSagasRequest>>,
        ) -> Result<tonic::Response<Self::WaitSagasStream>, tonic::Status> {
            if !self.takes_wait_streams {
                return Err(tonic::Status::unimplemented("fake"));
            }
            self.wait_streams
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let open = self.wait_streams_open.clone();
            open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let waited_ids = self.waited_ids.clone();
            let broke_once = self.broke_once.clone();
            let mut incoming = request.into_inner();
            let (answers, stream) = tokio::sync::mpsc::channel(64);
            tokio::spawn(async move {
                while let Some(Ok(message)) = incoming.next().await {
                    waited_ids
                        .lock()
                        .unwrap()
                        .extend(message.saga_ids.iter().cloned());
                    if message.saga_ids.iter().any(|id| id.ends_with("break"))
                        && !broke_once.swap(true, std::sync::atomic::Ordering::Relaxed)
                    {
                        // What a stream cut by its connection ends with.
                        let cut = tonic::Status::unknown("h2 protocol error: connection reset");
                        let _ = answers.send(Err(cut)).await;
                        break;
                    }
                    let answers = answers.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        let results = message
                            .saga_ids
                            .into_iter()
                            .filter(|id| !id.ends_with("slow"))
                            .map(|id| {
                                let result = if id.ends_with("missing") {
                                    pb::wait_saga_result::Result::Error(
                                        (&tonic::Status::not_found("no such saga")).into(),
                                    )
                                } else {
                                    pb::wait_saga_result::Result::State(fake_state(
                                        &id,
                                        pb::SagaPhase::Completed,
                                    ))
                                };
                                pb::WaitSagaResult {
                                    saga_id: id,
                                    result: Some(result),
                                }
                            })
                            .collect();
                        let _ = answers.send(Ok(pb::WaitSagasResponse { results })).await;
                    });
                }
                open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            });
            Ok(tonic::Response::new(Box::pin(
                tokio_stream::wrappers::ReceiverStream::new(stream),
            )))
        }
        type WatchSagaStream = std::pin::Pin<
            Box<dyn Stream<Item = Result<pb::SagaChange, tonic::Status>> + Send + 'static>,
        >;
        async fn watch_saga(
            &self,
            request: tonic::Request<pb::WatchSagaRequest>,
        ) -> Result<tonic::Response<Self::WatchSagaStream>, tonic::Status> {
            let id = request.into_inner().saga_id;
            let change = |seq, kind: pb::SagaChangeKind, outcome| pb::SagaChange {
                seq,
                at_ms: seq,
                kind: kind as i32,
                step: if seq == 2 {
                    "debit".into()
                } else {
                    String::new()
                },
                attempt: 0,
                detail: String::new(),
                outcome,
            };
            let changes = vec![
                Ok(change(1, pb::SagaChangeKind::Accepted, None)),
                Ok(change(2, pb::SagaChangeKind::StepStarted, None)),
                Ok(change(
                    3,
                    pb::SagaChangeKind::Finished,
                    Some(fake_state(&id, pb::SagaPhase::Completed)),
                )),
            ];
            Ok(tonic::Response::new(Box::pin(tokio_stream::iter(changes))))
        }
    }

    async fn fake_coordinator() -> (String, std::sync::Arc<FakeCoordinator>) {
        serve_fake(FakeCoordinator::default()).await
    }

    async fn serve_fake(fake: FakeCoordinator) -> (String, std::sync::Arc<FakeCoordinator>) {
        let fake = std::sync::Arc::new(fake);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let server = tonic::transport::Server::builder()
            .add_service(pb::coordinator_server::CoordinatorServer::from_arc(
                fake.clone(),
            ))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
        tokio::spawn(server);
        (address, fake)
    }

    #[tokio::test]
    async fn submit_retries_with_the_same_id_and_wait_watch_and_get_convert_the_answers() {
        let (address, fake) = fake_coordinator().await;
        let client = TandemClient::connect(&address).await.unwrap();
        let saga = Saga::sequence([Step::new("debit", "p:1", "bank", vec![1], vec![2])]);
        let id = client.submit_saga(saga).await.unwrap();
        {
            let submitted = fake.submitted.lock().unwrap();
            assert_eq!(submitted.len(), 2, "retried once after UNAVAILABLE");
            assert_eq!(submitted[0], submitted[1], "the retry is the same request");
            assert_eq!(submitted[0].saga_id, id.as_str(), "with the client's id");
        }

        let running = client.wait(&id, Duration::ZERO).await.unwrap();
        assert!(!running.terminal, "a zero wait answers at once");
        let done = client.wait(&id, Duration::from_secs(30)).await.unwrap();
        assert!(done.terminal);
        assert_eq!(done.outcome(), Some(crate::SagaOutcome::Completed));
        assert_eq!(
            fake.waits.load(std::sync::atomic::Ordering::Relaxed),
            3,
            "waited again after each early answer"
        );

        let changes: Vec<SagaChange> = client
            .watch(&id)
            .await
            .unwrap()
            .collect::<Result<_, _>>()
            .await
            .unwrap();
        assert_eq!(
            changes.iter().map(|c| c.kind).collect::<Vec<_>>(),
            [
                crate::SagaChangeKind::Accepted,
                crate::SagaChangeKind::StepStarted,
                crate::SagaChangeKind::Finished
            ]
        );
        assert_eq!(changes[1].step, "debit");
        assert_eq!(
            changes[2].outcome.as_ref().map(|s| s.phase),
            Some(crate::SagaPhase::Completed)
        );

        let state = client.get_saga(&id).await.unwrap();
        assert_eq!(state.id, id);
        assert_eq!(state.phase, crate::SagaPhase::Running);
        let missing = TxnId::parse("1763850000000-missing").unwrap();
        assert!(matches!(
            client.get_saga(&missing).await,
            Err(Error::Coordinator {
                code: tonic::Code::NotFound,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn concurrent_submissions_share_calls_and_a_refused_one_is_retried_by_itself() {
        let (address, fake) = serve_fake(FakeCoordinator {
            takes_batches: true,
            ..FakeCoordinator::default()
        })
        .await;
        let client = TandemClient::connect(&address).await.unwrap();
        let sagas =
            (0..40u8).map(|i| Saga::sequence([Step::new("debit", "p:1", "bank", vec![i], vec![])]));
        let ids: Vec<TxnId> = futures::future::join_all(sagas.map(|saga| client.submit_saga(saga)))
            .await
            .into_iter()
            .map(|id| id.expect("every submission is accepted"))
            .collect();
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(
            distinct.len(),
            40,
            "each submission got its own id: {ids:?}"
        );
        let batches = fake.batches.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            batches < 40,
            "40 concurrent submissions took {batches} calls"
        );
        let submitted = fake.submitted.lock().unwrap();
        assert_eq!(
            submitted.len(),
            41,
            "the one refused as overloaded was sent again, nothing else"
        );
        assert_eq!(
            submitted
                .iter()
                .filter(|s| s.saga_id == submitted[0].saga_id)
                .count(),
            2
        );
        for item in submitted.iter() {
            assert!(
                TraceContext::parse(&item.traceparent).is_ok(),
                "an item without its trace context: {item:?}"
            );
        }
    }

    #[tokio::test]
    async fn concurrent_waits_share_one_stream_and_each_gets_its_own_answer() {
        let (address, fake) = serve_fake(FakeCoordinator {
            takes_wait_streams: true,
            ..FakeCoordinator::default()
        })
        .await;
        let client = TandemClient::connect(&address).await.unwrap();
        let ids: Vec<TxnId> = (0..50)
            .map(|i| TxnId::parse(&format!("1763850000000-wait{i:02}")).unwrap())
            .collect();
        // Two callers wait for the first saga.
        let waits = ids.iter().chain(&ids[..1]).map(|id| {
            let client = client.clone();
            async move { client.wait(id, Duration::from_secs(30)).await }
        });
        let states = futures::future::join_all(waits).await;
        for (state, id) in states.into_iter().zip(ids.iter().chain(&ids[..1])) {
            let state = state.unwrap_or_else(|e| panic!("wait for {id}: {e}"));
            assert_eq!(state.id, *id, "each caller gets its own saga's state");
            assert!(state.terminal);
        }
        assert_eq!(
            fake.wait_streams.load(std::sync::atomic::Ordering::Relaxed),
            1,
            "51 concurrent waits share one stream"
        );
        let mut sent = fake.waited_ids.lock().unwrap().clone();
        sent.sort();
        let mut expected: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
        expected.sort();
        assert_eq!(sent, expected, "each id is sent once, the shared one too");

        // Errors per id, and a limit that passes: the state then comes from GetSaga.
        let missing = TxnId::parse("1763850000000-missing").unwrap();
        assert!(matches!(
            client.wait(&missing, Duration::from_secs(30)).await,
            Err(Error::Coordinator {
                code: tonic::Code::NotFound,
                ..
            })
        ));
        let slow = TxnId::parse("1763850000000-slow").unwrap();
        let started = Instant::now();
        let state = client
            .wait(&slow, Duration::from_millis(200))
            .await
            .unwrap();
        assert!(!state.terminal, "the state when the time was up");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a wait ends at its limit, took {:?}",
            started.elapsed()
        );

        // Nobody waits any more: the client has closed every stream.
        let deadline = Instant::now() + Duration::from_secs(5);
        while fake
            .wait_streams_open
            .load(std::sync::atomic::Ordering::Relaxed)
            != 0
        {
            assert!(
                Instant::now() < deadline,
                "an idle client keeps a wait stream open"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_wait_whose_stream_breaks_waits_again_on_a_new_stream() {
        let (address, fake) = serve_fake(FakeCoordinator {
            takes_wait_streams: true,
            ..FakeCoordinator::default()
        })
        .await;
        let client = TandemClient::connect(&address).await.unwrap();
        let id = TxnId::parse("1763850000000-break").unwrap();
        let state = client.wait(&id, Duration::from_secs(30)).await.unwrap();
        assert!(state.terminal, "{state:?}");
        assert_eq!(
            fake.wait_streams.load(std::sync::atomic::Ordering::Relaxed),
            2,
            "the broken stream was replaced by a new one"
        );
    }
}
