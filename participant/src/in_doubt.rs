//! The in-doubt resolver: a participant never decides a prepared branch alone; it asks.
//!
//! At start-up every branch left prepared is in doubt; later, any branch prepared longer ago
//! than `in_doubt_age_ms_min` is (the coordinator normally delivers the decision first). For
//! each, the resolver asks the coordinator named in the branch's record (`QueryOutcome`) and
//! applies a COMMITTED or ABORTED answer through the barrier, exactly as a delivered decision
//! would be applied (so a decision arriving both ways is applied once). PENDING, or no answer,
//! leaves the branch prepared until the next round: the wait between rounds is the backoff.
//!
//! An `https://` coordinator is asked over TLS with [`crate::ParticipantConfig::coordinator_tls`],
//! and the configured client token, if any, goes with every query.

use std::collections::HashMap;
use std::time::Duration;
use tracing::Instrument;

use tandem_common::credentials::BearerInterceptor;
use tandem_common::unix_now_ms;
use tandem_proto::v1 as pb;
use tonic::transport::{Channel, Endpoint};

use crate::participant::{Participant, PreparedBranch};

impl Participant {
    /// Runs the resolver in the background; abort the handle to stop it.
    pub fn spawn_in_doubt_resolver(&self) -> tokio::task::JoinHandle<()> {
        let participant = self.clone();
        tokio::spawn(async move { resolve_forever(participant).await })
    }

    /// One round: asks about every prepared branch at least `age_ms_min` old; returns how
    /// many branches it resolved.
    pub async fn resolve_in_doubt_once(&self, age_ms_min: u64) -> usize {
        let mut clients = HashMap::new();
        self.resolve_round(age_ms_min, &mut clients).await
    }

    async fn resolve_round(
        &self,
        age_ms_min: u64,
        clients: &mut HashMap<String, Channel>,
    ) -> usize {
        let prepared = match self.prepared_branches() {
            Ok(prepared) => prepared,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the branch log to find branches in doubt");
                return 0;
            }
        };
        let now = unix_now_ms();
        let mut resolved = 0;
        for branch in prepared
            .into_iter()
            .filter(|b| now.saturating_sub(b.prepared_ms) >= age_ms_min)
        {
            if self.resolve_branch(&branch, clients).await {
                resolved += 1;
            }
        }
        resolved
    }

    async fn resolve_branch(
        &self,
        branch: &PreparedBranch,
        clients: &mut HashMap<String, Channel>,
    ) -> bool {
        let span =
            tracing::info_span!("in_doubt", txn = %branch.ctx.txn, branch = %branch.ctx.branch);
        self.resolve_branch_in_span(branch, clients)
            .instrument(span)
            .await
    }

    async fn resolve_branch_in_span(
        &self,
        branch: &PreparedBranch,
        clients: &mut HashMap<String, Channel>,
    ) -> bool {
        let channel = match clients.get(&branch.coordinator) {
            Some(channel) => channel.clone(),
            None => match self.coordinator_endpoint(&branch.coordinator) {
                Ok(endpoint) => {
                    let channel = endpoint
                        .connect_timeout(Duration::from_secs(2))
                        .connect_lazy();
                    clients.insert(branch.coordinator.clone(), channel.clone());
                    channel
                }
                Err(e) => {
                    tracing::error!(coordinator = %branch.coordinator, error = %e, "cannot ask the coordinator the branch names");
                    return false;
                }
            },
        };
        let mut client = pb::coordinator_client::CoordinatorClient::with_interceptor(
            channel,
            BearerInterceptor::new(self.config().coordinator_token.as_ref()),
        );
        let timeout = Duration::from_millis(self.config().coordinator_query_timeout_ms);
        let mut request = tonic::Request::new(pb::QueryOutcomeRequest {
            txn_id: branch.ctx.txn.to_string(),
            branch: branch.ctx.branch.0,
        });
        request.set_timeout(timeout);
        let answer = match tokio::time::timeout(timeout, client.query_outcome(request)).await {
            Ok(Ok(answer)) => answer.into_inner(),
            Ok(Err(status)) => {
                tracing::info!(code = ?status.code(), message = status.message(), "coordinator did not answer the outcome query");
                return false;
            }
            Err(_) => {
                tracing::info!("outcome query timed out");
                return false;
            }
        };
        let commit = match pb::Outcome::try_from(answer.outcome) {
            Ok(pb::Outcome::Committed) => true,
            Ok(pb::Outcome::Aborted) => false,
            Ok(pb::Outcome::Pending) | Ok(pb::Outcome::Unspecified) | Err(_) => return false,
        };
        match self
            .decide(
                &branch.ctx.txn,
                branch.ctx.branch,
                &branch.ctx.resource,
                commit,
            )
            .await
        {
            Ok(()) => {
                tracing::info!(commit, "in-doubt branch resolved by asking the coordinator");
                true
            }
            Err(e) => {
                tracing::error!(error = %e, commit, "could not apply the outcome to an in-doubt branch");
                false
            }
        }
    }
}

impl Participant {
    /// The endpoint of the coordinator at `address`, over TLS if it is `https://`.
    fn coordinator_endpoint(&self, address: &str) -> Result<Endpoint, String> {
        let endpoint = Endpoint::from_shared(address.to_string()).map_err(|e| e.to_string())?;
        if !address.starts_with("https://") {
            return Ok(endpoint);
        }
        let tls = self.config().coordinator_tls.clone().ok_or(
            "the coordinator is https, but this participant has no TLS settings for it (ParticipantConfig::coordinator_tls)",
        )?;
        endpoint.tls_config(tls).map_err(|e| e.to_string())
    }
}

async fn resolve_forever(participant: Participant) {
    let mut clients = HashMap::new();
    let interval = Duration::from_millis(participant.config().in_doubt_check_interval_ms.max(10));
    // First round: everything left prepared by an earlier run is in doubt.
    let mut age_ms_min = 0;
    loop {
        participant.resolve_round(age_ms_min, &mut clients).await;
        age_ms_min = participant.config().in_doubt_age_ms_min;
        tokio::time::sleep(interval).await;
    }
}
