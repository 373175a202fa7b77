//! The coordinator's stored record of one transaction: one key (the transaction id), one
//! value, replaced as the transaction moves on.
//!
//! Payloads are never stored: after prepare the coordinator needs only where each branch is,
//! so a record stays small (well under `tandem_common::RECORD_BYTES_MAX`) even with the
//! maximum number of branches.

use serde::{Deserialize, Serialize};

use crate::engine::saga::{ChangeKind, SagaProgress, SagaSpec};
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

/// Most history entries kept per transaction or saga: the first [`HISTORY_HEAD_KEPT`] and the
/// latest ones (a compensation retried for days would otherwise grow its history forever).
pub const HISTORY_ENTRIES_MAX: usize = 128;
/// How many of the oldest history entries are never dropped (how it began).
pub const HISTORY_HEAD_KEPT: usize = 32;
/// Longest detail kept in a history entry, in bytes (longer ones are cut).
pub const HISTORY_DETAIL_BYTES_MAX: usize = 512;

/// One state change of a transaction or a saga, kept in the log (lazily) so that operators
/// see when things happened, also after a restart. Stored apart from the records the protocol
/// reads (its own tree), so older logs, which have none, still decode: their transactions
/// simply show no changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub at_ms: u64,
    pub kind: HistoryKind,
    /// The branch or step concerned; `None` for the whole transaction or saga.
    pub part: Option<u32>,
    /// The attempt concerned; 0 when none.
    pub attempt: u32,
    /// Human-readable detail, at most [`HISTORY_DETAIL_BYTES_MAX`] bytes; may be empty.
    pub detail: String,
}

impl HistoryEntry {
    pub fn new(
        at_ms: u64,
        kind: HistoryKind,
        part: Option<u32>,
        attempt: u32,
        detail: String,
    ) -> Self {
        HistoryEntry {
            at_ms,
            kind,
            part,
            attempt,
            detail: tandem_common::clip_text(detail, HISTORY_DETAIL_BYTES_MAX),
        }
    }
}

/// What a [`HistoryEntry`] records. Variants are encoded by position: append new ones last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HistoryKind {
    /// 2PC: prepare requests went out.
    Began,
    /// 2PC: a branch voted no (`detail`: its reason).
    VotedNo,
    /// 2PC: a branch did not answer prepare.
    PrepareFailed,
    /// 2PC: the decision was made (`detail`: commit, or abort and why).
    Decided,
    /// 2PC: a decision delivery failed; it will be sent again.
    DeliveryFailed,
    /// 2PC: every branch acknowledged the decision.
    Finished,
    /// A saga's change, as watchers saw it.
    Saga(ChangeKind),
    /// An operator asked for an abort (`detail`: the reason).
    OperatorAbort,
    /// An operator asked for a retry now (`attempt`: how many calls were sent).
    OperatorRetry,
}

impl HistoryKind {
    /// The stable lowercase name the admin contract and the CLI show.
    pub fn name(&self) -> &'static str {
        match self {
            HistoryKind::Began => "began",
            HistoryKind::VotedNo => "voted_no",
            HistoryKind::PrepareFailed => "prepare_failed",
            HistoryKind::Decided => "decided",
            HistoryKind::DeliveryFailed => "delivery_failed",
            HistoryKind::Finished => "finished",
            HistoryKind::OperatorAbort => "operator_abort",
            HistoryKind::OperatorRetry => "operator_retry",
            HistoryKind::Saga(kind) => match kind {
                ChangeKind::Accepted => "accepted",
                ChangeKind::StepStarted => "step_started",
                ChangeKind::StepSucceeded => "step_succeeded",
                ChangeKind::StepFailed => "step_failed",
                ChangeKind::StepRetried => "step_retried",
                ChangeKind::CompensationStarted => "compensation_started",
                ChangeKind::StepCompensated => "step_compensated",
                ChangeKind::CompensationRetried => "compensation_retried",
                ChangeKind::Stuck => "stuck",
                ChangeKind::Finished => "finished",
            },
        }
    }
}

/// A transaction's or saga's history as the log holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    /// Oldest first.
    pub entries: Vec<HistoryEntry>,
    /// Entries were dropped between the first [`HISTORY_HEAD_KEPT`] and the latest.
    pub truncated: bool,
}

/// Appends `entry` to `history` within the bounds; returns the index dropped, if one was.
pub fn bounded_push(entries: &mut Vec<HistoryEntry>, entry: HistoryEntry) -> Option<usize> {
    let dropped = (entries.len() >= HISTORY_ENTRIES_MAX).then(|| {
        entries.remove(HISTORY_HEAD_KEPT);
        HISTORY_HEAD_KEPT
    });
    entries.push(entry);
    dropped
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
