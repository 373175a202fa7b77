//! The coordinator's stored record of one transaction: one key (the transaction id), one
//! value, replaced as the transaction moves on.
//!
//! Payloads are never stored: after prepare the coordinator needs only where each branch is,
//! so a record stays small (well under `tandem_common::RECORD_BYTES_MAX`) even with the
//! maximum number of branches.

use serde::{Deserialize, Serialize};

use crate::engine::saga::{SagaProgress, SagaSpec};
use crate::engine::types::{BranchPhase, BranchTarget, Decision};

/// A digest of a transaction's branches (targets and payloads), to tell a client's retry
/// (same id, same branches) from a conflicting reuse of the id.
pub type Fingerprint = [u8; 32];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnRecord {
    /// Prepare requests are going out. Not forced: if it is lost, presumed abort covers it.
    /// Found at recovery, it means "undecided": the transaction is aborted.
    Preparing {
        branches: Vec<BranchTarget>,
        fingerprint: Fingerprint,
        created_ms: u64,
    },
    /// The decision. Forced before anyone hears of it: this write is the commit point.
    /// Found at recovery, the decision is delivered again to every branch.
    Decided {
        decision: Decision,
        branches: Vec<BranchTarget>,
        fingerprint: Fingerprint,
        decided_ms: u64,
    },
    /// Every participant acknowledged. Kept so retries and status queries are answered.
    Finished {
        decision: Decision,
        branches: Vec<BranchTarget>,
        branch_phases: Vec<BranchPhase>,
        fingerprint: Fingerprint,
        finished_ms: u64,
    },
    // Appended last: variants are encoded by position, and older logs must still decode.
    /// A participant asked about a transaction this coordinator had no record of, and was
    /// told "aborted" (presumed abort). Forced before that answer, so that the id can never
    /// start a transaction afterwards: a client's retry with the same id is answered
    /// "aborted" too, instead of preparing again branches a participant has been told to
    /// abort.
    PresumedAborted { presumed_ms: u64 },
}

impl TxnRecord {
    /// The digest of the branches; `None` for a presumed abort (no branches were known).
    pub fn fingerprint(&self) -> Option<&Fingerprint> {
        match self {
            TxnRecord::Preparing { fingerprint, .. }
            | TxnRecord::Decided { fingerprint, .. }
            | TxnRecord::Finished { fingerprint, .. } => Some(fingerprint),
            TxnRecord::PresumedAborted { .. } => None,
        }
    }

    pub fn branches(&self) -> &[BranchTarget] {
        match self {
            TxnRecord::Preparing { branches, .. }
            | TxnRecord::Decided { branches, .. }
            | TxnRecord::Finished { branches, .. } => branches,
            TxnRecord::PresumedAborted { .. } => &[],
        }
    }

    /// The decision, if this record holds one (a `Decided` record is durable by the time
    /// anyone can read it through the engine's rules).
    pub fn decision(&self) -> Option<Decision> {
        match self {
            TxnRecord::Preparing { .. } => None,
            TxnRecord::Decided { decision, .. } | TxnRecord::Finished { decision, .. } => {
                Some(decision.clone())
            }
            TxnRecord::PresumedAborted { .. } => Some(Decision::Abort {
                reason: PRESUMED_ABORT_REASON.to_string(),
            }),
        }
    }

    /// When the transaction became terminal (nothing left to do, no participant left to
    /// ask about it), if it is: `Finished` (every branch acknowledged) and `PresumedAborted`.
    /// A `Decided` record is not terminal even for an abort: a branch that has not
    /// acknowledged may still be prepared, and a committed one may still ask.
    pub fn terminal_since_ms(&self) -> Option<u64> {
        match self {
            TxnRecord::Finished { finished_ms, .. } => Some(*finished_ms),
            TxnRecord::PresumedAborted { presumed_ms } => Some(*presumed_ms),
            TxnRecord::Preparing { .. } | TxnRecord::Decided { .. } => None,
        }
    }

    /// Nothing is left to do for this transaction.
    pub fn is_finished(&self) -> bool {
        match self {
            TxnRecord::Finished { .. } | TxnRecord::PresumedAborted { .. } => true,
            TxnRecord::Preparing { .. } | TxnRecord::Decided { .. } => false,
        }
    }
}

/// The reason given for a transaction aborted by presumption.
pub const PRESUMED_ABORT_REASON: &str =
    "aborted: the coordinator had no record of this transaction when a participant asked (presumed abort)";

/// An accepted saga as it was submitted: forced before the submitter hears "accepted", never
/// replaced. Payloads are stored (the coordinator sends them later); the edge's limit on a
/// saga's total payload keeps the record under `tandem_common::RECORD_BYTES_MAX`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaSpecRecord {
    pub spec: SagaSpec,
    pub fingerprint: Fingerprint,
    pub accepted_ms: u64,
}

/// A saga as the log holds it: its spec, and its progress once it has any (progress is
/// written lazily; a saga whose progress was lost resumes from its last stored progress, and
/// the participants' barrier makes the re-sent steps harmless).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSaga {
    pub spec: SagaSpecRecord,
    pub progress: Option<SagaProgress>,
}

impl StoredSaga {
    /// If nothing is left to do for the saga (terminal, its callback delivered or none), the
    /// latest time its log knows of: its acceptance or the first send of a step's action (the
    /// stored progress carries no end time).
    pub fn terminal_since_ms(&self) -> Option<u64> {
        let progress = self.progress.as_ref()?;
        if !progress.is_finished(&self.spec.spec) {
            return None;
        }
        let last_send = progress.steps.iter().filter_map(|s| s.first_sent_ms).max();
        Some(last_send.unwrap_or(0).max(self.spec.accepted_ms))
    }
}
