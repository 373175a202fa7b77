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

use std::time::Duration;

use tandem_common::{unix_now_ms, TxnId};
use tandem_proto::v1 as pb;
use tonic::transport::{Channel, Endpoint};

use crate::error::Error;

/// How many times a call is tried before its last error is returned.
const ATTEMPTS_MAX: u32 = 4;

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

/// A client of the coordinator. Cheap to clone.
#[derive(Clone)]
pub struct TandemClient {
    inner: pb::coordinator_client::CoordinatorClient<Channel>,
}

fn endpoint_uri(address: &str) -> String {
    if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
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
        code => Error::Coordinator {
            code,
            message: status.message().to_string(),
        },
    }
}

impl TandemClient {
    /// Connects to the coordinator at `address` (`host:port` or `http://host:port`).
    pub async fn connect(address: &str) -> Result<Self, Error> {
        let endpoint = Endpoint::from_shared(endpoint_uri(address))
            .map_err(|e| Error::InvalidArgument(format!("coordinator address {address:?}: {e}")))?
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true);
        let channel = endpoint.connect().await.map_err(|e| {
            Error::Unavailable(format!(
                "cannot connect to the coordinator at {address}: {e}"
            ))
        })?;
        Ok(TandemClient {
            inner: pb::coordinator_client::CoordinatorClient::new(channel),
        })
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
            match self.inner.execute2pc(request.clone()).await {
                Ok(answer) => break answer.into_inner(),
                Err(status) => {
                    let error = status_error(status);
                    if !error.is_retryable() || attempt >= ATTEMPTS_MAX {
                        return Err(error);
                    }
                    tracing::debug!(txn = %txn, attempt, error = %error, "retrying with the same id");
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
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

    /// One bare round trip (for benchmarks and health checks).
    pub async fn ping(&mut self) -> Result<(), Error> {
        self.inner
            .ping(pb::PingRequest {})
            .await
            .map_err(status_error)?;
        Ok(())
    }
}
