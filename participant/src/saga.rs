//! What a service implements to take part in sagas: a step ([`CompensableResource`]) and a
//! completion callback ([`SagaCallbackHandler`]).
//!
//! A saga (Garcia-Molina & Salem, "Sagas", SIGMOD 1987) is a sequence (or graph) of steps, each
//! an *action* at one participant and the *compensation* that semantically undoes it. The
//! coordinator runs the actions; when one fails for a business reason it runs the compensation
//! of every step whose action was attempted, newest first. There is no isolation: an action's
//! writes are visible (and committed) as soon as it answers.
//!
//! What the SDK guarantees a step, through the saga barrier ([`crate::saga_barrier`]), in the
//! same sled transaction as the service's writes:
//!
//! - `action` takes effect at most once per `(saga, step)`: a repeated `Act` answers the
//!   recorded result without calling it;
//! - an action that answers [`StepOutcome::Failed`] leaves no writes (they are discarded, and
//!   the failure is recorded instead), so its compensation has nothing to undo and does not run;
//! - `compensate` runs at most once, and only after an action of the same step that succeeded;
//!   a compensation that arrives first is recorded as done without running ("null
//!   compensation"), and an action that arrives after it is refused without running ("no
//!   hanging");
//! - every answer is released only after the flush that made its record durable.
//!
//! A [`SagaCallbackHandler`] hears each finished saga once: the SDK records the delivery in
//! the same sled transaction as the handler's writes, so the coordinator's repeated deliveries
//! (it retries until acknowledged, across its own restarts too) are acknowledged without
//! calling the handler again.
//!
//! As for [`crate::TwoPhaseResource`], sled may run a call's closure more than once (on a
//! conflict, or when another call of the same batch abandons), so these methods must only
//! read and write through the [`ServiceTrees`] they are handed, with no other side effects,
//! and must pass sled's errors on with `?`.

use tandem_common::TxnId;

use crate::resource::{ResourceError, ServiceTrees};
use crate::saga_state::SagaState;

/// Longest business-failure reason recorded and answered, in bytes; longer reasons are cut
/// (at a character boundary), so that step records stay small.
pub const REASON_BYTES_MAX: usize = 1024;

/// Which saga step a call is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepContext {
    /// The saga's id.
    pub saga: TxnId,
    /// The step's index in the saga's step list (0-based): with `saga`, what the barrier keys
    /// its record by.
    pub step: u32,
    /// The step's name in the saga, for logs and the service's own use (may be empty if the
    /// coordinator did not send it).
    pub step_name: String,
    /// The name the step handler is registered under in this participant ("" for the
    /// default).
    pub resource: String,
}

/// A step action's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepOutcome {
    /// The action took effect; its writes commit with the barrier's record.
    Succeeded,
    /// A business failure (insufficient funds, a closed account): the action's writes are
    /// discarded, the failure is recorded, and the coordinator compensates the saga.
    Failed { reason: String },
}

/// A saga step hosted by a participant: an action and its compensation.
pub trait CompensableResource: Send + Sync + 'static {
    /// The sled trees the step reads and writes (opened for it at start). Names starting with
    /// `tandem.` are reserved.
    fn trees(&self) -> Vec<String>;

    /// Does the step's work, or answers a business failure (whose writes are then discarded).
    /// An `Err` is no answer: the call is answered with an error and the coordinator retries.
    fn action(
        &self,
        ctx: &StepContext,
        payload: &[u8],
        trees: &ServiceTrees<'_>,
    ) -> Result<StepOutcome, ResourceError>;

    /// Undoes what a successful `action` of the same step did. `payload` is the step's
    /// compensation payload. Must not fail for a business reason: an `Err` is retried by the
    /// coordinator (without limit, the saga flagged stuck meanwhile).
    fn compensate(
        &self,
        ctx: &StepContext,
        payload: &[u8],
        trees: &ServiceTrees<'_>,
    ) -> Result<(), ResourceError>;
}

/// Hears the outcome of sagas this service submitted with a completion callback.
pub trait SagaCallbackHandler: Send + Sync + 'static {
    /// The sled trees the handler reads and writes. Names starting with `tandem.` are
    /// reserved.
    fn trees(&self) -> Vec<String>;

    /// Called once per saga (and handler), with the saga's terminal state, in the same sled
    /// transaction as the SDK's delivery record. An `Err` records nothing and is answered with
    /// an error, so the coordinator delivers again later.
    fn on_finished(
        &self,
        saga: &TxnId,
        outcome: &SagaState,
        trees: &ServiceTrees<'_>,
    ) -> Result<(), ResourceError>;
}

/// `reason` cut to at most [`REASON_BYTES_MAX`] bytes, at a character boundary.
pub(crate) fn bounded_reason(reason: String) -> String {
    tandem_common::clip_text(reason, REASON_BYTES_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_reasons_are_cut_at_a_character_boundary() {
        assert_eq!(bounded_reason("short".into()), "short");
        let long = "é".repeat(REASON_BYTES_MAX);
        let cut = bounded_reason(long);
        assert!(cut.len() <= REASON_BYTES_MAX && cut.len() >= REASON_BYTES_MAX - 4);
        assert!(cut.ends_with("...") && cut.trim_end_matches('.').chars().all(|c| c == 'é'));
    }
}
