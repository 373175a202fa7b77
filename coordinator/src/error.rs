//! The coordinator's one error enum, which classifies itself.
//!
//! Each variant knows whether the caller may retry and whether the transaction's outcome is
//! known, and maps to exactly one gRPC status at the edge ([`CoordinatorError::to_status`]).
//! Broken invariants are not errors: they are assertions that stop the process.

use crate::log::LogError;

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The request is malformed or outside a limit; nothing was started.
    #[error("{0}")]
    InvalidArgument(String),
    /// The id names a transaction with different branches.
    #[error("transaction {txn} already exists with different branches")]
    AlreadyExists { txn: String },
    #[error("no transaction {txn} is known to this coordinator")]
    NotFound { txn: String },
    /// A participant address (of a branch, a saga step or a saga callback, named by `place`)
    /// is on a host the coordinator's allow-list does not admit. Nothing was started and no
    /// connection was made; the same request will be refused again.
    #[error("{place}: participant host {host} is not allowed: this coordinator calls only the hosts its configuration allows (tandem serve --allow-participants)")]
    ParticipantNotAllowed { place: String, host: String },
    /// Admission control refused the request: too much work in flight or queued (`what`
    /// names the bound). Nothing was started; the caller should retry after
    /// `retry_after_ms`, which the status carries as a `google.rpc.RetryInfo` detail.
    #[error("too many {what} ({count}, limit {limit}); retry in {retry_after_ms} ms")]
    Overloaded {
        what: &'static str,
        count: usize,
        limit: usize,
        retry_after_ms: u64,
    },
    /// The coordinator is stopping; the transaction's outcome, if it started, is unknown to
    /// this caller (retry with the same id to learn it).
    #[error("the coordinator is shutting down")]
    ShuttingDown,
    /// An operator's retry or abort that cannot apply to the transaction as it stands (its
    /// outcome is decided, or it is finished); `why` says what stands. Nothing was changed.
    #[error("{id} {why}")]
    OperatorRefused { id: String, why: String },
    #[error(transparent)]
    Log(#[from] LogError),
}

impl CoordinatorError {
    /// Whether the same call may succeed if retried unchanged.
    pub fn is_retryable(&self) -> bool {
        match self {
            CoordinatorError::Overloaded { .. } | CoordinatorError::ShuttingDown => true,
            CoordinatorError::InvalidArgument(_)
            | CoordinatorError::AlreadyExists { .. }
            | CoordinatorError::NotFound { .. }
            | CoordinatorError::ParticipantNotAllowed { .. }
            | CoordinatorError::OperatorRefused { .. }
            | CoordinatorError::Log(_) => false,
        }
    }

    /// Whether the caller knows what became of its request: `false` only when the
    /// coordinator stopped while the transaction may have started (retry with the same id to
    /// learn its outcome). Every other error means nothing was started.
    pub fn is_outcome_known(&self) -> bool {
        match self {
            CoordinatorError::ShuttingDown | CoordinatorError::Log(_) => false,
            CoordinatorError::InvalidArgument(_)
            | CoordinatorError::AlreadyExists { .. }
            | CoordinatorError::NotFound { .. }
            | CoordinatorError::ParticipantNotAllowed { .. }
            | CoordinatorError::OperatorRefused { .. }
            | CoordinatorError::Overloaded { .. } => true,
        }
    }

    /// The gRPC status this error is reported as.
    pub fn to_status(&self) -> tonic::Status {
        let message = self.to_string();
        match self {
            CoordinatorError::InvalidArgument(_) => tonic::Status::invalid_argument(message),
            CoordinatorError::AlreadyExists { .. } => tonic::Status::already_exists(message),
            CoordinatorError::NotFound { .. } => tonic::Status::not_found(message),
            CoordinatorError::ParticipantNotAllowed { .. } => {
                tonic::Status::permission_denied(message)
            }
            CoordinatorError::Overloaded { retry_after_ms, .. } => {
                use tonic_types::{ErrorDetails, StatusExt};
                tonic::Status::with_error_details(
                    tonic::Code::ResourceExhausted,
                    message,
                    ErrorDetails::with_retry_info(Some(std::time::Duration::from_millis(
                        *retry_after_ms,
                    ))),
                )
            }
            CoordinatorError::OperatorRefused { .. } => tonic::Status::failed_precondition(message),
            CoordinatorError::ShuttingDown => tonic::Status::unavailable(message),
            CoordinatorError::Log(_) => tonic::Status::internal(message),
        }
    }
}

impl From<CoordinatorError> for tonic::Status {
    fn from(e: CoordinatorError) -> Self {
        e.to_status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_whether_to_retry_and_whether_the_outcome_is_known() {
        let refused = CoordinatorError::InvalidArgument("no branches".into());
        assert!(!refused.is_retryable() && refused.is_outcome_known());
        assert_eq!(refused.to_status().code(), tonic::Code::InvalidArgument);
        let busy = CoordinatorError::Overloaded {
            what: "transactions in flight",
            count: 10,
            limit: 10,
            retry_after_ms: 100,
        };
        assert!(busy.is_retryable() && busy.is_outcome_known());
        let status = busy.to_status();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "too many transactions in flight (10, limit 10); retry in 100 ms"
        );
        use tonic_types::StatusExt;
        let hint = status.get_details_retry_info().expect("a RetryInfo detail");
        assert_eq!(
            hint.retry_delay,
            Some(std::time::Duration::from_millis(100))
        );
        let not_allowed = CoordinatorError::ParticipantNotAllowed {
            place: "branch #0".into(),
            host: "10.1.2.3".into(),
        };
        assert!(!not_allowed.is_retryable() && not_allowed.is_outcome_known());
        let status = not_allowed.to_status();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(status
            .message()
            .starts_with("branch #0: participant host 10.1.2.3"));
        let stopping = CoordinatorError::ShuttingDown;
        assert!(stopping.is_retryable() && !stopping.is_outcome_known());
        assert_eq!(stopping.to_status().code(), tonic::Code::Unavailable);
    }
}
