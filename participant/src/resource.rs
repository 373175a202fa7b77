//! The trait a service implements to take part in two-phase commit, and what it is handed.
//!
//! Each call runs inside one sled transaction that also holds the SDK's branch record, so the
//! service's writes and the barrier's record commit together or not at all. sled may run the
//! closure more than once on a conflict, so a resource must only read and write through the
//! [`ServiceTrees`] it is given (no other side effects), and must pass sled's errors on with
//! `?` so that conflicts are retried.

use sled::transaction::{TransactionalTree, UnabortableTransactionError};
use tandem_common::{BranchIdx, TxnId};

/// A resource's answer to prepare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vote {
    /// Ready to commit; whatever commit or abort will need is written (for example a hold).
    Yes,
    /// Cannot commit (a business reason: insufficient funds, unknown account). The service's
    /// writes in this call are discarded.
    No { reason: String },
}

/// Why a resource call failed (distinct from a NO vote, which is a normal answer).
#[derive(Debug)]
pub enum ResourceError {
    /// A sled error; pass it on with `?` so conflicts are retried.
    Storage(UnabortableTransactionError),
    /// The service's own failure (a bug, a malformed stored value). The call is answered with
    /// an error; the coordinator aborts (at prepare) or redelivers (at commit/abort).
    Failed(String),
}

impl From<UnabortableTransactionError> for ResourceError {
    fn from(e: UnabortableTransactionError) -> Self {
        ResourceError::Storage(e)
    }
}

/// Which branch a call is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BranchContext {
    pub txn: TxnId,
    pub branch: BranchIdx,
    pub resource: String,
}

/// The service's own trees, inside the current sled transaction.
pub struct ServiceTrees<'a> {
    /// The handler's tree names, as its `trees()` listed them ([`TwoPhaseResource::trees`],
    /// [`crate::CompensableResource::trees`], [`crate::SagaCallbackHandler::trees`]).
    pub(crate) names: &'a [String],
    /// Where each of those trees is in `views`.
    pub(crate) indices: &'a [usize],
    /// The views of every tree of the participant in the current transaction.
    pub(crate) views: &'a [TransactionalTree],
}

impl ServiceTrees<'_> {
    /// The tree named `name` (one the handler listed in its `trees()`).
    ///
    /// Panics if the handler did not declare it: that is a bug in the handler.
    pub fn tree(&self, name: &str) -> &TransactionalTree {
        let i = self
            .names
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("tree {name:?} was not declared by the handler's trees()"));
        &self.views[self.indices[i]]
    }
}

/// A two-phase resource hosted by a participant.
///
/// The SDK guarantees, through the barrier: `prepare` runs at most once per branch (a repeat
/// gets the recorded vote); `commit` and `abort` run at most once, and only after a YES
/// prepare of the same branch; the `payload` handed to `commit` and `abort` is the one
/// `prepare` received. A prepare that arrives after its branch's abort is answered NO without
/// calling `prepare`.
pub trait TwoPhaseResource: Send + Sync + 'static {
    /// The sled trees the resource reads and writes (opened for it at start).
    fn trees(&self) -> Vec<String>;

    /// Check and reserve. A YES must leave everything commit and abort need written.
    fn prepare(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
        trees: &ServiceTrees<'_>,
    ) -> Result<Vote, ResourceError>;

    /// Make the prepared work permanent. Must not fail for a business reason.
    fn commit(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
        trees: &ServiceTrees<'_>,
    ) -> Result<(), ResourceError>;

    /// Release what prepare reserved.
    fn abort(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
        trees: &ServiceTrees<'_>,
    ) -> Result<(), ResourceError>;
}
