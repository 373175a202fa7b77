//! The participant SDK's one error enum.
//!
//! Each variant maps to one gRPC status when the endpoint answers the coordinator, and says
//! whether retrying can help and whether the outcome of the call is known.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request or argument is malformed; retrying the same call cannot succeed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request names a resource this participant does not host.
    #[error("no resource named {0:?} is hosted by this participant")]
    UnknownResource(String),
    /// The request names a saga step handler this participant does not host.
    #[error("no saga step named {0:?} is hosted by this participant")]
    UnknownSagaStep(String),
    /// The request names a saga callback handler this participant does not host.
    #[error("no saga callback named {0:?} is hosted by this participant")]
    UnknownSagaCallback(String),
    /// The request contradicts what the branch log recorded (for example a commit of a branch
    /// that voted no): a protocol violation, reported and never acted on.
    #[error("{0}")]
    Conflict(String),
    /// A transaction with this id exists with different branches.
    #[error("{0}")]
    AlreadyExists(String),
    /// The service's own code failed (not a business NO, which is a vote).
    #[error("resource failed: {0}")]
    Resource(String),
    #[error("storage error: {0}")]
    Storage(String),
    #[error(transparent)]
    Flush(#[from] tandem_common::FlushError),
    #[error(transparent)]
    Codec(#[from] tandem_common::CodecError),
    /// The coordinator (or a participant) could not be reached or did not answer in time.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The coordinator's admission control refused the call (RESOURCE_EXHAUSTED): nothing
    /// was started; retry after `retry_after`, the coordinator's hint when it gave one.
    #[error("coordinator overloaded: {message}")]
    Overloaded {
        message: String,
        retry_after: Option<std::time::Duration>,
    },
    /// The coordinator answered with another error status.
    #[error("coordinator error {code:?}: {message}")]
    Coordinator { code: tonic::Code, message: String },
}

impl Error {
    /// Whether the same call may succeed if retried unchanged.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Unavailable(_) | Error::Storage(_) | Error::Overloaded { .. } => true,
            Error::Coordinator { code, .. } => {
                matches!(
                    code,
                    tonic::Code::Unavailable | tonic::Code::ResourceExhausted
                )
            }
            Error::InvalidArgument(_)
            | Error::UnknownResource(_)
            | Error::UnknownSagaStep(_)
            | Error::UnknownSagaCallback(_)
            | Error::Conflict(_)
            | Error::AlreadyExists(_)
            | Error::Resource(_)
            | Error::Flush(_)
            | Error::Codec(_) => false,
        }
    }

    /// Whether the caller knows what became of its request despite the error. `false` means
    /// it may or may not have taken effect (the connection broke, the coordinator was
    /// stopping): retry with the same id to learn the outcome, never with a new one.
    pub fn is_outcome_known(&self) -> bool {
        match self {
            Error::Unavailable(_) | Error::Storage(_) | Error::Flush(_) => false,
            // Refused at the edge or by admission control: nothing was started.
            Error::Coordinator { code, .. } => !matches!(
                code,
                tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Cancelled
                    | tonic::Code::Unknown
                    | tonic::Code::Internal
            ),
            Error::InvalidArgument(_)
            | Error::UnknownResource(_)
            | Error::UnknownSagaStep(_)
            | Error::UnknownSagaCallback(_)
            | Error::Conflict(_)
            | Error::AlreadyExists(_)
            | Error::Resource(_)
            | Error::Overloaded { .. }
            | Error::Codec(_) => true,
        }
    }

    pub fn to_status(&self) -> tonic::Status {
        let message = self.to_string();
        match self {
            Error::InvalidArgument(_) => tonic::Status::invalid_argument(message),
            Error::UnknownResource(_)
            | Error::UnknownSagaStep(_)
            | Error::UnknownSagaCallback(_) => tonic::Status::not_found(message),
            Error::Conflict(_) => tonic::Status::failed_precondition(message),
            Error::AlreadyExists(_) => tonic::Status::already_exists(message),
            Error::Unavailable(_) => tonic::Status::unavailable(message),
            Error::Coordinator { code, .. } => tonic::Status::new(*code, message),
            Error::Overloaded { .. } => tonic::Status::resource_exhausted(message),
            Error::Resource(_) | Error::Storage(_) | Error::Flush(_) | Error::Codec(_) => {
                tonic::Status::internal(message)
            }
        }
    }
}

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Self {
        Error::Storage(e.to_string())
    }
}
