//! The `tandem.v1.Coordinator` gRPC service: the edge where requests are validated and prost
//! messages become engine types (and back), once.
//!
//! Every limit from [`crate::config`] is checked here, before anything is started or
//! written; a violation is `INVALID_ARGUMENT` with a message naming the field and the limit.
//! Every participant address is then checked against the allow-list
//! ([`CoordinatorConfig::participant_hosts_allowed`]): a host it does not admit is
//! `PERMISSION_DENIED`, before any record is written or any connection is made.

pub mod admin;
pub mod saga;
pub mod wait_stream;

use std::time::Instant;

use tokio_stream::StreamExt;
use tracing::Instrument;

use sha2::{Digest, Sha256};
use tandem_common::call_batch::CALL_BATCH_ITEMS_MAX;
use tandem_common::{unix_now_ms, TraceContext, TxnId};
use tandem_proto::v1 as pb;
use tonic::codegen::http::Uri;
use tonic::{Request, Response, Status};

use crate::config::{
    host_allowed, CoordinatorConfig, ParticipantHost, BRANCHES_MAX, PARTICIPANT_ADDR_LEN_MAX,
    PAYLOAD_BYTES_MAX, RESOURCE_NAME_LEN_MAX, SAGA_WAIT_MS_MAX,
};
use crate::engine::types::{BranchPhase, BranchSpec, BranchTarget, Decision, Outcome, TxnPhase};
use crate::error::CoordinatorError;
use crate::log::record::Fingerprint;
use crate::runtime::{CoordinatorHandle, ExecuteRequest, QueriedOutcome, SubmitSagaRequest};

/// The gRPC service, a thin shell over the runtime's handle.
pub struct CoordinatorService {
    handle: CoordinatorHandle,
    config: CoordinatorConfig,
}

impl CoordinatorService {
    /// Validates one saga, as `SubmitSaga` and each item of `SubmitSagas` do, and makes the
    /// span its submission runs in.
    fn validate_one(
        &self,
        request: pb::SubmitSagaRequest,
        trace: Option<TraceContext>,
    ) -> Result<(SubmitSagaRequest, tracing::Span), Status> {
        let mut request = saga::validate_submit_saga(request, &self.config, unix_now_ms())?;
        request.trace = trace;
        let span = tracing::info_span!(
            "submit_saga",
            saga = %request.saga,
            trace_id = tracing::field::Empty
        );
        if let Some(trace) = &trace {
            span.record("trace_id", tracing::field::display(trace.trace_id_hex()));
            crate::otel::link(&span, trace);
        }
        Ok((request, span))
    }

    pub fn new(handle: CoordinatorHandle, config: CoordinatorConfig) -> Self {
        CoordinatorService { handle, config }
    }

    pub fn into_server(self) -> pb::coordinator_server::CoordinatorServer<Self> {
        pb::coordinator_server::CoordinatorServer::new(self)
    }
}

pub(crate) fn invalid(message: String) -> CoordinatorError {
    CoordinatorError::InvalidArgument(message)
}

/// Normalises a participant address to `http://host:port`, refusing anything else.
pub fn normalize_participant(address: &str) -> Result<String, CoordinatorError> {
    if address.is_empty() {
        return Err(invalid("branch participant address is empty".into()));
    }
    if address.len() > PARTICIPANT_ADDR_LEN_MAX {
        return Err(invalid(format!(
            "participant address is {} bytes long; at most {PARTICIPANT_ADDR_LEN_MAX} are allowed",
            address.len()
        )));
    }
    let with_scheme = if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    };
    let bad = |why: &str| {
        invalid(format!("participant address {address:?} is not usable: {why} (expected host:port, http://host:port or https://host:port)"))
    };
    let uri: Uri = with_scheme.parse().map_err(|_| bad("not a valid URI"))?;
    let scheme = match uri.scheme_str() {
        Some(scheme @ ("http" | "https")) => scheme,
        Some(_) | None => return Err(bad("only the http and https schemes are supported")),
    };
    let authority = uri.authority().ok_or_else(|| bad("no host"))?;
    if authority.host().is_empty() {
        return Err(bad("no host"));
    }
    let port = authority.port_u16().ok_or_else(|| bad("no port"))?;
    if port == 0 {
        return Err(bad("port 0"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(bad("a path or query is not allowed"));
    }
    Ok(format!("{scheme}://{}:{port}", authority.host()))
}

/// Refuses `participant`, an address [`normalize_participant`] made, unless the allow-list
/// admits its host (PERMISSION_DENIED) and its scheme is the one this coordinator calls
/// participants with: `https` with `participant_tls`, `http` without (INVALID_ARGUMENT). `place` names the address within the request ("branch #0", "callback").
/// The host is taken as written: a name is never resolved here (see [`crate::config`]).
pub fn check_participant_allowed(
    participant: &str,
    config: &CoordinatorConfig,
    place: impl FnOnce() -> String,
) -> Result<(), CoordinatorError> {
    let (scheme, authority) = participant
        .split_once("://")
        .unwrap_or_else(|| panic!("{participant:?} was not normalised"));
    let (host, _port) = authority
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{participant:?} was normalised without a port"));
    let host = ParticipantHost::parse(host);
    if !host_allowed(&config.participant_hosts_allowed, &host) {
        let place = place();
        tracing::warn!(%place, %participant, "refused a participant address the allow-list does not admit");
        return Err(CoordinatorError::ParticipantNotAllowed {
            place,
            host: host.to_string(),
        });
    }
    // The scheme must match how this coordinator calls participants: a client cannot turn
    // TLS off by writing http://, nor ask for TLS the coordinator has no settings for.
    match (scheme == "https", config.participant_tls) {
        (true, true) | (false, false) => Ok(()),
        (false, true) => Err(invalid(format!(
            "{}: participant address {participant} is plaintext http, but this coordinator calls participants over TLS only (tandem serve --participant-ca): write https://host:port",
            place()
        ))),
        (true, false) => Err(invalid(format!(
            "{}: participant address {participant} asks for TLS, but this coordinator has no TLS settings for participants (tandem serve --participant-ca)",
            place()
        ))),
    }
}

pub(crate) fn validate_resource(resource: &str) -> Result<(), CoordinatorError> {
    if resource.len() > RESOURCE_NAME_LEN_MAX {
        return Err(invalid(format!(
            "resource name is {} bytes long; at most {RESOURCE_NAME_LEN_MAX} are allowed",
            resource.len()
        )));
    }
    if !resource
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
    {
        return Err(invalid(format!(
            "resource name {resource:?} may only hold [A-Za-z0-9_.-]"
        )));
    }
    Ok(())
}

/// The digest that tells a retry (same branches) from a conflicting reuse of an id.
pub fn fingerprint(branches: &[BranchSpec]) -> Fingerprint {
    let mut hasher = Sha256::new();
    hasher.update((branches.len() as u64).to_le_bytes());
    for branch in branches {
        for part in [
            branch.target.participant.as_bytes(),
            branch.target.resource.as_bytes(),
            &branch.payload,
        ] {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
    }
    hasher.finalize().into()
}

/// Validates a client-supplied id against the age window, or makes a fresh one.
pub fn validate_txn_id(
    id: &str,
    config: &CoordinatorConfig,
    now_ms: u64,
) -> Result<TxnId, CoordinatorError> {
    if id.is_empty() {
        return Ok(TxnId::generate(now_ms));
    }
    let txn = TxnId::parse(id).map_err(|e| invalid(e.to_string()))?;
    let created = txn.created_ms();
    if created + config.txn_id_age_ms_max < now_ms {
        return Err(invalid(format!(
            "transaction id {txn} was created {} ms ago; ids older than {} ms are refused so that no id is ever reused",
            now_ms - created,
            config.txn_id_age_ms_max
        )));
    }
    if created > now_ms + config.txn_id_future_ms_max {
        return Err(invalid(format!(
            "transaction id {txn} is dated {} ms in the future; at most {} ms of clock skew is allowed",
            created - now_ms,
            config.txn_id_future_ms_max
        )));
    }
    Ok(txn)
}

/// Validates an `Execute2pc` request into the runtime's form. Changes nothing.
pub fn validate_execute(
    request: pb::Execute2pcRequest,
    config: &CoordinatorConfig,
    now_ms: u64,
) -> Result<ExecuteRequest, CoordinatorError> {
    if request.branches.is_empty() {
        return Err(invalid(
            "a transaction needs at least one branch; none were given".into(),
        ));
    }
    if request.branches.len() > BRANCHES_MAX {
        return Err(invalid(format!(
            "{} branches given; at most {BRANCHES_MAX} are allowed",
            request.branches.len()
        )));
    }
    let timeout_ms = match request.timeout_ms {
        0 => config.prepare_timeout_ms_default,
        t if t > config.prepare_timeout_ms_max => {
            return Err(invalid(format!(
                "timeout_ms {t} is out of range: at most {} (0 means the default, {})",
                config.prepare_timeout_ms_max, config.prepare_timeout_ms_default
            )))
        }
        t => t,
    };
    let mut branches = Vec::with_capacity(request.branches.len());
    for (i, branch) in request.branches.into_iter().enumerate() {
        let participant = normalize_participant(&branch.participant)
            .map_err(|e| invalid(format!("branch #{i}: {e}")))?;
        check_participant_allowed(&participant, config, || format!("branch #{i}"))?;
        validate_resource(&branch.resource).map_err(|e| invalid(format!("branch #{i}: {e}")))?;
        if branch.payload.len() > PAYLOAD_BYTES_MAX {
            return Err(invalid(format!(
                "branch #{i}: payload is {} bytes; at most {PAYLOAD_BYTES_MAX} are allowed",
                branch.payload.len()
            )));
        }
        branches.push(BranchSpec {
            target: BranchTarget {
                participant,
                resource: branch.resource,
            },
            payload: branch.payload,
        });
    }
    let txn = validate_txn_id(&request.txn_id, config, now_ms)?;
    let fingerprint = fingerprint(&branches);
    Ok(ExecuteRequest {
        txn,
        branches,
        fingerprint,
        timeout_ms,
        trace: None,
    })
}

fn parse_existing_id(id: &str) -> Result<TxnId, Status> {
    TxnId::parse(id).map_err(|e| Status::invalid_argument(e.to_string()))
}

fn outcome_to_pb(outcome: &Outcome) -> (pb::Outcome, String) {
    match outcome {
        Outcome::Committed => (pb::Outcome::Committed, String::new()),
        Outcome::Aborted { reason } => (pb::Outcome::Aborted, reason.clone()),
    }
}

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for CoordinatorService {
    async fn execute2pc(
        &self,
        request: Request<pb::Execute2pcRequest>,
    ) -> Result<Response<pb::Execute2pcResponse>, Status> {
        let started = Instant::now();
        let trace = TraceContext::of_request(request.metadata());
        let mut request = validate_execute(request.into_inner(), &self.config, unix_now_ms())?;
        request.trace = trace;
        let txn = request.txn.clone();
        let span = tracing::info_span!(
            "execute_2pc",
            txn = %txn,
            branches = request.branches.len(),
            trace_id = tracing::field::Empty
        );
        if let Some(trace) = &trace {
            span.record("trace_id", tracing::field::display(trace.trace_id_hex()));
            crate::otel::link(&span, trace);
        }
        let outcome = self
            .handle
            .execute(request)
            .instrument(span.clone())
            .await?;
        span.in_scope(|| {
            tracing::debug!(
                ?outcome,
                elapsed_us = started.elapsed().as_micros() as u64,
                "answered"
            )
        });
        let (outcome, reason) = outcome_to_pb(&outcome);
        Ok(Response::new(pb::Execute2pcResponse {
            txn_id: txn.to_string(),
            outcome: outcome as i32,
            reason,
        }))
    }

    async fn get_transaction(
        &self,
        request: Request<pb::GetTransactionRequest>,
    ) -> Result<Response<pb::GetTransactionResponse>, Status> {
        let txn = parse_existing_id(&request.into_inner().txn_id)?;
        let span = tracing::debug_span!("get_transaction", txn = %txn);
        let status = self
            .handle
            .status(txn.clone())
            .instrument(span)
            .await?
            .ok_or_else(|| CoordinatorError::NotFound {
                txn: txn.to_string(),
            })?;
        let (outcome, reason) = match &status.decision {
            Some(decision) => outcome_to_pb(&decision.outcome()),
            None => (pb::Outcome::Pending, String::new()),
        };
        let commit = matches!(status.decision, Some(Decision::Commit));
        let phase = match status.phase {
            TxnPhase::Preparing | TxnPhase::Deciding => pb::TxnPhase::Preparing,
            TxnPhase::Delivering if commit => pb::TxnPhase::Committing,
            TxnPhase::Delivering => pb::TxnPhase::Aborting,
            TxnPhase::Finished if commit => pb::TxnPhase::Committed,
            TxnPhase::Finished => pb::TxnPhase::Aborted,
        };
        let branches = status
            .branches
            .into_iter()
            .map(|b| pb::BranchStatus {
                branch: Some(pb::Branch {
                    participant: b.target.participant,
                    resource: b.target.resource,
                    payload: Vec::new(),
                }),
                phase: match b.phase {
                    BranchPhase::Preparing => pb::BranchPhase::Preparing,
                    BranchPhase::VotedYes => pb::BranchPhase::VotedYes,
                    BranchPhase::VotedNo => pb::BranchPhase::VotedNo,
                    BranchPhase::Acknowledged if commit => pb::BranchPhase::Committed,
                    BranchPhase::Acknowledged => pb::BranchPhase::Aborted,
                } as i32,
                attempts: b.attempts,
                last_error: b.last_error.unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(pb::GetTransactionResponse {
            txn_id: txn.to_string(),
            phase: phase as i32,
            outcome: outcome as i32,
            reason,
            branches,
        }))
    }

    async fn query_outcome(
        &self,
        request: Request<pb::QueryOutcomeRequest>,
    ) -> Result<Response<pb::QueryOutcomeResponse>, Status> {
        let request = request.into_inner();
        let txn = parse_existing_id(&request.txn_id)?;
        let span = tracing::debug_span!("query_outcome", txn = %txn);
        let outcome = match self.handle.query_outcome(txn).instrument(span).await? {
            QueriedOutcome::Committed => pb::Outcome::Committed,
            QueriedOutcome::Aborted => pb::Outcome::Aborted,
            QueriedOutcome::Pending => pb::Outcome::Pending,
        };
        Ok(Response::new(pb::QueryOutcomeResponse {
            outcome: outcome as i32,
        }))
    }

    async fn ping(
        &self,
        _request: Request<pb::PingRequest>,
    ) -> Result<Response<pb::PingResponse>, Status> {
        Ok(Response::new(pb::PingResponse {}))
    }

    type WatchSagaStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::SagaChange, Status>> + Send + 'static>,
    >;

    async fn submit_saga(
        &self,
        request: Request<pb::SubmitSagaRequest>,
    ) -> Result<Response<pb::SubmitSagaResponse>, Status> {
        let trace = TraceContext::of_request(request.metadata());
        let (request, span) = self.validate_one(request.into_inner(), trace)?;
        let saga = self.handle.submit_saga(request).instrument(span).await?;
        Ok(Response::new(pb::SubmitSagaResponse {
            saga_id: saga.to_string(),
        }))
    }

    async fn submit_sagas(
        &self,
        request: Request<pb::SubmitSagasRequest>,
    ) -> Result<Response<pb::SubmitSagasResponse>, Status> {
        let items = request.into_inner().sagas;
        if items.is_empty() || items.len() > CALL_BATCH_ITEMS_MAX {
            return Err(Status::invalid_argument(format!(
                "a SubmitSagas call carries 1 to {CALL_BATCH_ITEMS_MAX} sagas, not {}",
                items.len()
            )));
        }
        // Every valid item goes to the runtime in one command: they are taken in one loop turn,
        // and one forced write covers all the accepted ones.
        let (mut requests, mut spans) = (Vec::new(), Vec::new());
        let checked: Vec<Result<(), Status>> = items
            .into_iter()
            .map(|mut item| {
                let trace = TraceContext::of_item(&std::mem::take(&mut item.traceparent));
                let (request, span) = self.validate_one(item, trace)?;
                requests.push(request);
                spans.push(span);
                Ok(())
            })
            .collect();
        let mut accepting = self.handle.submit_sagas(requests).into_iter().zip(spans);
        let results = futures::future::join_all(checked.into_iter().map(|checked| {
            let submitted = checked.map(|()| accepting.next().expect("one per valid item"));
            async move {
                match submitted {
                    Ok((accepted, span)) => Ok(accepted.instrument(span).await?),
                    Err(status) => Err(status),
                }
            }
        }))
        .await;
        let results = results
            .into_iter()
            .map(|result| pb::SubmitSagaResult {
                result: Some(match result {
                    Ok(saga) => pb::submit_saga_result::Result::SagaId(saga.to_string()),
                    Err(status) => pb::submit_saga_result::Result::Error((&status).into()),
                }),
            })
            .collect();
        Ok(Response::new(pb::SubmitSagasResponse { results }))
    }

    async fn get_saga(
        &self,
        request: Request<pb::GetSagaRequest>,
    ) -> Result<Response<pb::SagaState>, Status> {
        let saga = saga::parse_saga_id(&request.into_inner().saga_id)?;
        let span = tracing::debug_span!("get_saga", saga = %saga);
        match self.handle.get_saga(saga.clone()).instrument(span).await? {
            Some(view) => Ok(Response::new(saga::view_to_pb(&view))),
            None => Err(CoordinatorError::NotFound {
                txn: saga.to_string(),
            }
            .into()),
        }
    }

    async fn wait_saga(
        &self,
        request: Request<pb::WaitSagaRequest>,
    ) -> Result<Response<pb::SagaState>, Status> {
        let request = request.into_inner();
        let saga = saga::parse_saga_id(&request.saga_id)?;
        if request.timeout_ms > SAGA_WAIT_MS_MAX {
            return Err(Status::invalid_argument(format!(
                "timeout_ms {} is out of range: at most {SAGA_WAIT_MS_MAX}",
                request.timeout_ms
            )));
        }
        let timeout = std::time::Duration::from_millis(request.timeout_ms);
        let span = tracing::debug_span!("wait_saga", saga = %saga);
        match self
            .handle
            .wait_saga(saga.clone(), timeout)
            .instrument(span)
            .await?
        {
            Some(view) => Ok(Response::new(saga::view_to_pb(&view))),
            None => Err(CoordinatorError::NotFound {
                txn: saga.to_string(),
            }
            .into()),
        }
    }

    type WaitSagasStream = wait_stream::WaitSagasStream;

    async fn wait_sagas(
        &self,
        request: Request<tonic::Streaming<pb::WaitSagasRequest>>,
    ) -> Result<Response<Self::WaitSagasStream>, Status> {
        Ok(Response::new(wait_stream::serve(
            self.handle.clone(),
            request.into_inner(),
        )))
    }

    async fn watch_saga(
        &self,
        request: Request<pb::WatchSagaRequest>,
    ) -> Result<Response<Self::WatchSagaStream>, Status> {
        let saga = saga::parse_saga_id(&request.into_inner().saga_id)?;
        let not_found = || -> Status {
            CoordinatorError::NotFound {
                txn: saga.to_string(),
            }
            .into()
        };
        let span = tracing::debug_span!("watch_saga", saga = %saga);
        let names = match self
            .handle
            .get_saga(saga.clone())
            .instrument(span.clone())
            .await?
        {
            Some(view) => view.step_names,
            None => return Err(not_found()),
        };
        let Some(changes) = self
            .handle
            .watch_saga(saga.clone())
            .instrument(span)
            .await?
        else {
            return Err(not_found());
        };
        let stream = tokio_stream::wrappers::ReceiverStream::new(changes)
            .map(move |item| Ok(saga::watch_item_to_pb(&item, &names)));
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> CoordinatorConfig {
        CoordinatorConfig::new("http://127.0.0.1:7400")
    }

    fn branch(participant: &str, payload: Vec<u8>) -> pb::Branch {
        pb::Branch {
            participant: participant.into(),
            resource: "bank".into(),
            payload,
        }
    }

    const NOW: u64 = 1_763_850_000_000;
    /// A participant address the default allow-list admits.
    const HERE: &str = "localhost:1";

    fn request(branches: Vec<pb::Branch>) -> pb::Execute2pcRequest {
        pb::Execute2pcRequest {
            txn_id: String::new(),
            branches,
            timeout_ms: 0,
        }
    }

    fn rejected(req: pb::Execute2pcRequest) -> String {
        match validate_execute(req, &config(), NOW) {
            Err(CoordinatorError::InvalidArgument(m)) => m,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn participant_addresses_are_normalised_or_refused_by_name() {
        assert_eq!(
            normalize_participant("127.0.0.1:7401").unwrap(),
            "http://127.0.0.1:7401"
        );
        assert_eq!(
            normalize_participant("http://localhost:9/").unwrap(),
            "http://localhost:9"
        );
        assert_eq!(
            normalize_participant("[::1]:80").unwrap(),
            "http://[::1]:80"
        );
        assert_eq!(
            normalize_participant("https://Bank.Internal:7401/").unwrap(),
            "https://Bank.Internal:7401"
        );
        for bad in [
            "",
            "localhost",
            "ftp://a:1",
            "a:0",
            "a:1/path",
            "a b:1",
            "a:99999",
        ] {
            assert!(normalize_participant(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn bad_requests_are_refused_with_a_message_naming_the_problem() {
        assert!(rejected(request(vec![])).contains("at least one branch"));
        let many = (0..65).map(|_| branch(HERE, vec![])).collect();
        assert!(rejected(request(many)).contains("at most 64"));
        assert!(
            rejected(request(vec![branch(HERE, vec![0; PAYLOAD_BYTES_MAX + 1])]))
                .contains("payload")
        );
        assert!(rejected(request(vec![branch("nohost", vec![])])).contains("branch #0"));
        let mut long_resource = request(vec![branch(HERE, vec![])]);
        long_resource.branches[0].resource = "r".repeat(65);
        assert!(rejected(long_resource).contains("resource name"));
        let mut timeout = request(vec![branch(HERE, vec![])]);
        timeout.timeout_ms = 300_001;
        assert!(rejected(timeout).contains("timeout_ms"));
        let mut bad_id = request(vec![branch(HERE, vec![])]);
        bad_id.txn_id = "not-an-id".into();
        assert!(rejected(bad_id).contains("not of the form"));
        let mut old_id = request(vec![branch(HERE, vec![])]);
        old_id.txn_id = format!("{}-old", NOW - 8 * 24 * 3600 * 1000);
        assert!(rejected(old_id).contains("no id is ever reused"));
        let mut future_id = request(vec![branch(HERE, vec![])]);
        future_id.txn_id = format!("{}-future", NOW + 3600 * 1000);
        assert!(rejected(future_id).contains("future"));
    }

    #[test]
    fn a_participant_address_scheme_must_match_how_participants_are_called() {
        let plaintext = config();
        validate_execute(
            request(vec![branch("http://127.0.0.1:1", vec![])]),
            &plaintext,
            NOW,
        )
        .unwrap();
        let message = rejected(request(vec![branch("https://127.0.0.1:1", vec![])]));
        assert!(
            message.starts_with("branch #0: participant address https://127.0.0.1:1 asks for TLS")
                && message.contains("--participant-ca"),
            "{message}"
        );
        let mut tls = config();
        tls.participant_tls = true;
        validate_execute(
            request(vec![branch("https://127.0.0.1:1", vec![])]),
            &tls,
            NOW,
        )
        .unwrap();
        for plain in ["127.0.0.1:1", "http://127.0.0.1:1"] {
            match validate_execute(request(vec![branch(plain, vec![])]), &tls, NOW) {
                Err(CoordinatorError::InvalidArgument(m)) => {
                    assert!(
                        m.contains("plaintext http") && m.contains("https://"),
                        "{m}"
                    )
                }
                other => panic!("{plain}: expected INVALID_ARGUMENT, got {other:?}"),
            }
        }
        // The allow-list is checked first, whatever the scheme.
        denied(validate_execute(
            request(vec![branch("https://10.1.2.3:1", vec![])]),
            &tls,
            NOW,
        ));
    }

    fn denied(result: Result<impl std::fmt::Debug, CoordinatorError>) -> String {
        match result {
            Err(e @ CoordinatorError::ParticipantNotAllowed { .. }) => {
                assert_eq!(e.to_status().code(), tonic::Code::PermissionDenied);
                e.to_string()
            }
            other => panic!("expected PERMISSION_DENIED, got {other:?}"),
        }
    }

    #[test]
    fn a_branch_on_a_host_outside_the_allow_list_is_permission_denied() {
        let loopback_only = config();
        let outside = request(vec![
            branch("127.0.0.1:7401", vec![]),
            branch("10.1.2.3:5000", vec![]),
        ]);
        let message = denied(validate_execute(outside.clone(), &loopback_only, NOW));
        assert!(
            message.starts_with("branch #1: participant host 10.1.2.3 is not allowed"),
            "{message}"
        );
        for address in [
            "http://[::ffff:10.1.2.3]:5000",
            "bank.internal:1",
            "0.0.0.0:1",
        ] {
            denied(validate_execute(
                request(vec![branch(address, vec![])]),
                &loopback_only,
                NOW,
            ));
        }
        for address in ["127.0.0.1:1", "127.8.9.10:1", "[::1]:1", "LOCALHOST:1"] {
            validate_execute(request(vec![branch(address, vec![])]), &loopback_only, NOW)
                .unwrap_or_else(|e| panic!("{address}: {e}"));
        }
        // A malformed address is still INVALID_ARGUMENT: the allow-list sees only usable ones.
        assert!(rejected(request(vec![branch("10.1.2.3", vec![])])).contains("no port"));
        let mut private = config();
        private.participant_hosts_allowed =
            crate::config::parse_host_patterns("10.0.0.0/8").unwrap();
        validate_execute(outside, &private, NOW).expect_err("loopback is no longer listed");
        validate_execute(
            request(vec![branch("10.1.2.3:5000", vec![])]),
            &private,
            NOW,
        )
        .unwrap();
    }

    #[test]
    fn a_saga_step_or_callback_on_a_host_outside_the_allow_list_is_permission_denied() {
        let step = |name: &str, participant: &str| pb::SagaStep {
            name: name.into(),
            participant: participant.into(),
            resource: "bank".into(),
            ..Default::default()
        };
        let saga = |steps: Vec<pb::SagaStep>, callback: Option<&str>| pb::SubmitSagaRequest {
            saga_id: String::new(),
            steps,
            sequential: true,
            callback: callback.map(|participant| pb::SagaCallback {
                participant: participant.into(),
                resource: "orders".into(),
            }),
            ..Default::default()
        };
        let message = denied(saga::validate_submit_saga(
            saga(
                vec![
                    step("debit", "127.0.0.1:1"),
                    step("credit", "10.1.2.3:5000"),
                ],
                None,
            ),
            &config(),
            NOW,
        ));
        assert!(
            message.starts_with("step \"credit\": participant host 10.1.2.3"),
            "{message}"
        );
        let message = denied(saga::validate_submit_saga(
            saga(vec![step("debit", "127.0.0.1:1")], Some("10.1.2.3:5000")),
            &config(),
            NOW,
        ));
        assert!(
            message.starts_with("callback: participant host 10.1.2.3"),
            "{message}"
        );
        saga::validate_submit_saga(
            saga(vec![step("debit", "127.0.0.1:1")], Some("localhost:2")),
            &config(),
            NOW,
        )
        .unwrap();
    }

    #[test]
    fn valid_requests_get_defaults_and_a_fingerprint_that_sees_every_field() {
        let valid = validate_execute(request(vec![branch(HERE, vec![1])]), &config(), NOW).unwrap();
        assert_eq!(valid.timeout_ms, 10_000);
        assert_eq!(valid.txn.created_ms(), NOW);
        let base = fingerprint(&valid.branches);
        let mut other_payload = valid.branches.clone();
        other_payload[0].payload = vec![2];
        let mut other_resource = valid.branches.clone();
        other_resource[0].target.resource = "x".into();
        assert_ne!(base, fingerprint(&other_payload));
        assert_ne!(base, fingerprint(&other_resource));
        assert_eq!(base, fingerprint(&valid.branches.clone()));
    }
}
