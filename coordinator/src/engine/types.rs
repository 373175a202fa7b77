//! The engine's vocabulary: what a branch targets, what was decided, what a client is told.
//!
//! These are the domain types the edge converts prost messages into, once. They carry no
//! transport or storage detail.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Where one branch runs: a participant endpoint and a resource inside it.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BranchTarget {
    /// The participant's endpoint, normalised to `http://host:port`.
    pub participant: String,
    /// The resource inside the participant; empty means its default resource.
    pub resource: String,
}

impl fmt::Debug for BranchTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.participant, self.resource)
    }
}

/// A branch as a client asked for it: the target and the payload handed to its prepare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BranchSpec {
    pub target: BranchTarget,
    pub payload: Vec<u8>,
}

/// A participant's answer to prepare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vote {
    /// The branch is durably prepared and will commit if told to.
    Yes,
    /// The branch cannot commit; it holds nothing.
    No { reason: String },
}

/// What the coordinator decided for a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decision {
    Commit,
    Abort { reason: String },
}

impl Decision {
    pub fn outcome(&self) -> Outcome {
        match self {
            Decision::Commit => Outcome::Committed,
            Decision::Abort { reason } => Outcome::Aborted {
                reason: reason.clone(),
            },
        }
    }

    pub fn is_commit(&self) -> bool {
        matches!(self, Decision::Commit)
    }
}

/// What a client is told: only ever once the decision is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Committed,
    Aborted { reason: String },
}

/// Where one branch is, as the coordinator knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BranchPhase {
    /// Prepare sent (or about to be); no vote yet.
    Preparing,
    VotedYes,
    /// Voted no: the participant holds nothing, so the decision need not be delivered to it.
    VotedNo,
    /// The participant acknowledged the decision.
    Acknowledged,
}

/// Where a transaction is in its life (as `GetTransaction` reports it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnPhase {
    Preparing,
    /// Decided, the decision being forced to disk: not announced yet.
    Deciding,
    /// Decided and durable; delivering the decision.
    Delivering,
    /// Every participant acknowledged.
    Finished,
}

/// A snapshot of one branch for status queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BranchStatus {
    pub target: BranchTarget,
    pub phase: BranchPhase,
    pub attempts: u32,
    pub last_error: Option<String>,
}

/// A snapshot of one transaction for status queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnStatus {
    pub phase: TxnPhase,
    /// The decision, once it is durable (never before).
    pub decision: Option<Decision>,
    pub branches: Vec<BranchStatus>,
}
