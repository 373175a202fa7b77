//! The `tandem.v1.Admin` gRPC service: the operator's edge. Requests are validated here and
//! prost messages become the runtime's admin types (and back), once.
//!
//! Statuses: INVALID_ARGUMENT for a malformed id, page token, enum value, a limit above
//! [`LIST_LIMIT_MAX`] or an abort reason above [`ABORT_REASON_BYTES_MAX`] bytes; NOT_FOUND for
//! an id the log does not hold; FAILED_PRECONDITION when an abort or retry cannot apply (the
//! message says which outcome stands). Authentication of operators (a bearer token on the
//! `/tandem.v1.Admin/` paths) is the daemon's concern, not this service's.

use tandem_common::{unix_now_ms, TxnId};
use tandem_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::invalid;
use super::saga::step_phase_to_pb;
use crate::engine::types::BranchPhase;
use crate::error::CoordinatorError;
use crate::runtime::{
    CoordinatorHandle, ListFilter, PartPhase, TxnDetail, TxnKind, TxnState, TxnSummary,
    ABORT_REASON_BYTES_MAX, LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX,
};

/// The admin service, a thin shell over the runtime's handle.
pub struct AdminService {
    handle: CoordinatorHandle,
}

impl AdminService {
    pub fn new(handle: CoordinatorHandle) -> Self {
        AdminService { handle }
    }

    pub fn into_server(self) -> pb::admin_server::AdminServer<Self> {
        pb::admin_server::AdminServer::new(self)
    }
}

fn parse_id(id: &str) -> Result<TxnId, CoordinatorError> {
    TxnId::parse(id).map_err(|e| invalid(format!("id: {e}")))
}

fn state_from_pb(value: i32) -> Result<Option<TxnState>, CoordinatorError> {
    let state = pb::TxnState::try_from(value)
        .map_err(|_| invalid(format!("state: {value} is not a TxnState")))?;
    Ok(match state {
        pb::TxnState::Unspecified => None,
        pb::TxnState::Preparing => Some(TxnState::Preparing),
        pb::TxnState::Committing => Some(TxnState::Committing),
        pb::TxnState::Aborting => Some(TxnState::Aborting),
        pb::TxnState::Committed => Some(TxnState::Committed),
        pb::TxnState::Aborted => Some(TxnState::Aborted),
        pb::TxnState::Running => Some(TxnState::Running),
        pb::TxnState::Compensating => Some(TxnState::Compensating),
        pb::TxnState::Completed => Some(TxnState::Completed),
        pb::TxnState::Compensated => Some(TxnState::Compensated),
    })
}

fn state_to_pb(state: TxnState) -> pb::TxnState {
    match state {
        TxnState::Preparing => pb::TxnState::Preparing,
        TxnState::Committing => pb::TxnState::Committing,
        TxnState::Aborting => pb::TxnState::Aborting,
        TxnState::Committed => pb::TxnState::Committed,
        TxnState::Aborted => pb::TxnState::Aborted,
        TxnState::Running => pb::TxnState::Running,
        TxnState::Compensating => pb::TxnState::Compensating,
        TxnState::Completed => pb::TxnState::Completed,
        TxnState::Compensated => pb::TxnState::Compensated,
    }
}

fn kind_to_pb(kind: TxnKind) -> pb::TxnKind {
    match kind {
        TxnKind::TwoPhase => pb::TxnKind::TwoPhase,
        TxnKind::Saga => pb::TxnKind::Saga,
    }
}

fn branch_phase_to_pb(phase: &BranchPhase, committed: bool) -> pb::BranchPhase {
    match phase {
        BranchPhase::Preparing => pb::BranchPhase::Preparing,
        BranchPhase::VotedYes => pb::BranchPhase::VotedYes,
        BranchPhase::VotedNo => pb::BranchPhase::VotedNo,
        BranchPhase::Acknowledged if committed => pb::BranchPhase::Committed,
        BranchPhase::Acknowledged => pb::BranchPhase::Aborted,
    }
}

/// Validates a `ListTransactions` request into the runtime's filter. Changes nothing.
pub fn validate_list(
    request: &pb::ListTransactionsRequest,
    now_ms: u64,
) -> Result<ListFilter, CoordinatorError> {
    let state = state_from_pb(request.state)?;
    let kind = match pb::TxnKind::try_from(request.kind) {
        Ok(pb::TxnKind::Unspecified) => None,
        Ok(pb::TxnKind::TwoPhase) => Some(TxnKind::TwoPhase),
        Ok(pb::TxnKind::Saga) => Some(TxnKind::Saga),
        Err(_) => return Err(invalid(format!("kind: {} is not a TxnKind", request.kind))),
    };
    let limit = match request.limit as usize {
        0 => LIST_LIMIT_DEFAULT,
        n if n > LIST_LIMIT_MAX => {
            return Err(invalid(format!(
                "limit {n} is out of range: at most {LIST_LIMIT_MAX} (0 means {LIST_LIMIT_DEFAULT})"
            )))
        }
        n => n,
    };
    let after = if request.page_token.is_empty() {
        None
    } else {
        Some(
            TxnId::parse(&request.page_token)
                .map_err(|e| invalid(format!("page_token is not one this service gave: {e}")))?,
        )
    };
    let created_before_ms = match request.older_than_ms {
        0 => None,
        ms => Some(now_ms.saturating_sub(ms)),
    };
    Ok(ListFilter {
        state,
        kind,
        created_before_ms,
        after,
        limit,
    })
}

/// Validates an abort's reason.
pub fn validate_abort_reason(reason: &str) -> Result<(), CoordinatorError> {
    if reason.len() > ABORT_REASON_BYTES_MAX {
        return Err(invalid(format!(
            "reason is {} bytes long; at most {ABORT_REASON_BYTES_MAX} are allowed",
            reason.len()
        )));
    }
    Ok(())
}

fn summary_to_pb(summary: &TxnSummary) -> pb::TxnSummary {
    pb::TxnSummary {
        id: summary.id.to_string(),
        kind: kind_to_pb(summary.kind) as i32,
        state: state_to_pb(summary.state) as i32,
        created_ms: summary.created_ms,
        parts: summary.parts,
        stuck: summary.stuck,
        reason: summary.reason.clone(),
        in_flight: summary.in_flight,
        held: summary.held,
    }
}

fn detail_to_pb(detail: &TxnDetail) -> pb::ShowTransactionResponse {
    let committed = matches!(
        detail.summary.state,
        TxnState::Committing | TxnState::Committed
    );
    let name_of = |part: Option<u32>| -> String {
        part.and_then(|i| detail.parts.get(i as usize))
            .map(|p| p.name.clone())
            .unwrap_or_default()
    };
    pb::ShowTransactionResponse {
        summary: Some(summary_to_pb(&detail.summary)),
        parts: detail
            .parts
            .iter()
            .map(|part| {
                let (branch_phase, step_phase) = match &part.phase {
                    PartPhase::Branch(phase) => (
                        branch_phase_to_pb(phase, committed),
                        pb::StepPhase::Unspecified,
                    ),
                    PartPhase::Step(phase) => {
                        (pb::BranchPhase::Unspecified, step_phase_to_pb(phase))
                    }
                };
                pb::TxnPart {
                    index: part.index,
                    name: part.name.clone(),
                    participant: part.target.participant.clone(),
                    resource: part.target.resource.clone(),
                    branch_phase: branch_phase as i32,
                    step_phase: step_phase as i32,
                    attempts: part.attempts,
                    compensation_attempts: part.compensation_attempts,
                    last_error: part.last_error.clone().unwrap_or_default(),
                }
            })
            .collect(),
        changes: detail
            .history
            .entries
            .iter()
            .map(|entry| pb::TxnChange {
                at_ms: entry.at_ms,
                kind: entry.kind.name().to_string(),
                part: name_of(entry.part),
                attempt: entry.attempt,
                detail: entry.detail.clone(),
            })
            .collect(),
        changes_truncated: detail.history.truncated,
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn list_transactions(
        &self,
        request: Request<pb::ListTransactionsRequest>,
    ) -> Result<Response<pb::ListTransactionsResponse>, Status> {
        let filter = validate_list(request.get_ref(), unix_now_ms())?;
        let page = self.handle.admin_list(filter).await?;
        Ok(Response::new(pb::ListTransactionsResponse {
            transactions: page.items.iter().map(summary_to_pb).collect(),
            next_page_token: page.next.map(|id| id.to_string()).unwrap_or_default(),
        }))
    }

    async fn show_transaction(
        &self,
        request: Request<pb::ShowTransactionRequest>,
    ) -> Result<Response<pb::ShowTransactionResponse>, Status> {
        let id = parse_id(&request.get_ref().id)?;
        let detail = self.handle.admin_show(id).await?;
        Ok(Response::new(detail_to_pb(&detail)))
    }

    async fn retry_transaction(
        &self,
        request: Request<pb::RetryTransactionRequest>,
    ) -> Result<Response<pb::RetryTransactionResponse>, Status> {
        let id = parse_id(&request.get_ref().id)?;
        tracing::info!(id = %id, "operator retry");
        let answer = self.handle.admin_retry(id).await?;
        Ok(Response::new(pb::RetryTransactionResponse {
            retried: answer.retried,
            detail: answer.detail,
        }))
    }

    async fn abort_transaction(
        &self,
        request: Request<pb::AbortTransactionRequest>,
    ) -> Result<Response<pb::AbortTransactionResponse>, Status> {
        let request = request.into_inner();
        let id = parse_id(&request.id)?;
        validate_abort_reason(&request.reason)?;
        tracing::info!(id = %id, reason = %request.reason, "operator abort");
        let answer = self.handle.admin_abort(id, request.reason).await?;
        Ok(Response::new(pb::AbortTransactionResponse {
            state: state_to_pb(answer.state) as i32,
            detail: answer.detail,
        }))
    }
    async fn hold_sagas(
        &self,
        request: Request<pb::HoldSagasRequest>,
    ) -> Result<Response<pb::HoldSagasResponse>, Status> {
        let hold = request.get_ref().hold;
        tracing::info!(hold, "operator holds or resumes saga execution");
        let waiting = self.handle.admin_hold_sagas(hold).await?;
        Ok(Response::new(pb::HoldSagasResponse {
            held: hold,
            waiting: waiting as u64,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_requests_get_defaults_and_bad_ones_name_the_field() {
        let now = 1_763_850_000_000;
        let filter = validate_list(&pb::ListTransactionsRequest::default(), now).unwrap();
        assert_eq!(filter.limit, LIST_LIMIT_DEFAULT);
        assert_eq!(
            (
                filter.state,
                filter.kind,
                filter.created_before_ms,
                filter.after
            ),
            (None, None, None, None)
        );
        let filter = validate_list(
            &pb::ListTransactionsRequest {
                state: pb::TxnState::Compensating as i32,
                kind: pb::TxnKind::Saga as i32,
                older_than_ms: 600_000,
                limit: 7,
                page_token: "1763850000000-abc".into(),
            },
            now,
        )
        .unwrap();
        assert_eq!(filter.state, Some(TxnState::Compensating));
        assert_eq!(filter.kind, Some(TxnKind::Saga));
        assert_eq!(filter.created_before_ms, Some(now - 600_000));
        assert_eq!(filter.limit, 7);
        assert_eq!(filter.after.unwrap().as_str(), "1763850000000-abc");
        for (request, names) in [
            (
                pb::ListTransactionsRequest {
                    limit: 1_001,
                    ..Default::default()
                },
                "limit 1001",
            ),
            (
                pb::ListTransactionsRequest {
                    page_token: "nope".into(),
                    ..Default::default()
                },
                "page_token",
            ),
            (
                pb::ListTransactionsRequest {
                    state: 99,
                    ..Default::default()
                },
                "state: 99",
            ),
            (
                pb::ListTransactionsRequest {
                    kind: 7,
                    ..Default::default()
                },
                "kind: 7",
            ),
        ] {
            let error = validate_list(&request, now).unwrap_err();
            assert_eq!(error.to_status().code(), tonic::Code::InvalidArgument);
            assert!(error.to_string().contains(names), "{request:?}: {error}");
        }
        assert!(validate_abort_reason(&"x".repeat(ABORT_REASON_BYTES_MAX)).is_ok());
        let long = validate_abort_reason(&"x".repeat(ABORT_REASON_BYTES_MAX + 1)).unwrap_err();
        assert!(long.to_string().contains("reason is 257 bytes"), "{long}");
    }
}
