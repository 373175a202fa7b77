//! The saga barrier: what a participant does with a saga step call, given what its step log
//! recorded.
//!
//! Every call names `(saga, step)`. Its record in the step log (tree
//! [`crate::participant::STEPS_TREE`]) decides, before any service code runs, what happens:
//!
//! | recorded \ call   | act                               | compensate                          |
//! |-------------------|-----------------------------------|-------------------------------------|
//! | nothing           | run the action                    | record null compensation, done      |
//! | ActionSucceeded   | answer SUCCEEDED (repeat)         | run the compensation                |
//! | ActionFailed      | answer FAILED + reason (repeat)   | record null compensation, done      |
//! | Compensated       | answer FAILED "compensated"       | answer done (repeat)                |
//!
//! - Running the action records `ActionSucceeded` (its writes commit with the record) or, for
//!   a business failure, `ActionFailed` (its writes are discarded: the transaction is
//!   abandoned and re-run in a form that only records the failure).
//! - Running the compensation records `Compensated { action_applied: true }`; a null
//!   compensation records `Compensated { action_applied: false }`: either nothing arrived
//!   before it ("null compensation"), or the action failed and so left nothing to undo.
//! - An action after its step's compensation is refused without running ("no hanging": it
//!   must not change anything that nobody will ever undo); the refusal is a normal FAILED
//!   answer with the reason [`REFUSED_AFTER_COMPENSATION`], not an error.
//!
//! Unlike 2PC there is no "refuse" cell: every order of `act` and `compensate` has an answer.
//! This module is pure; [`crate::participant`] applies its answer inside the sled transaction
//! that reads the record, together with the service's writes.
//!
//! Step records are removed once older than the participant's retention ([`crate::prune`]);
//! a call for a step whose record may have been removed is answered there, before this table.

use serde::{Deserialize, Serialize};

use crate::saga::StepOutcome;

/// The reason an action refused after its compensation answers with.
pub const REFUSED_AFTER_COMPENSATION: &str = "compensated";

/// What the step log holds for one saga step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepRecord {
    /// The action ran and succeeded; its writes are committed.
    ActionSucceeded {
        /// The step handler that ran it (its compensation must be run by the same one).
        resource: String,
        acted_ms: u64,
    },
    /// The action answered a business failure; it left no writes.
    ActionFailed {
        resource: String,
        /// The failure's reason (at most [`crate::saga::REASON_BYTES_MAX`] bytes).
        reason: String,
        acted_ms: u64,
    },
    /// The step is compensated: no action may run any more.
    Compensated {
        /// True if a succeeded action was undone; false for a null compensation (nothing
        /// arrived before it, or the action had failed and left nothing).
        action_applied: bool,
        compensated_ms: u64,
    },
}

/// A saga call from the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepCall {
    Act,
    Compensate,
}

/// What to do with the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepDecision {
    /// Run the action and record its outcome.
    RunAction,
    /// Run the compensation and record `Compensated { action_applied: true }`.
    RunCompensation,
    /// Record `Compensated { action_applied: false }`, running nothing, and answer done.
    RecordNullCompensation,
    /// Answer this outcome to the act, running nothing.
    AnswerOutcome(StepOutcome),
    /// Answer "done" to the compensate again: it was applied before.
    AnswerDone,
}

/// The barrier's rule for `call` given the step's `recorded` state.
pub fn decide(recorded: Option<&StepRecord>, call: StepCall) -> StepDecision {
    use StepRecord as R;
    match (recorded, call) {
        (None, StepCall::Act) => StepDecision::RunAction,
        (None, StepCall::Compensate) => StepDecision::RecordNullCompensation,
        (Some(R::ActionSucceeded { .. }), StepCall::Act) => {
            StepDecision::AnswerOutcome(StepOutcome::Succeeded)
        }
        (Some(R::ActionSucceeded { .. }), StepCall::Compensate) => StepDecision::RunCompensation,
        (Some(R::ActionFailed { reason, .. }), StepCall::Act) => {
            StepDecision::AnswerOutcome(StepOutcome::Failed {
                reason: reason.clone(),
            })
        }
        (Some(R::ActionFailed { .. }), StepCall::Compensate) => {
            StepDecision::RecordNullCompensation
        }
        (Some(R::Compensated { .. }), StepCall::Act) => {
            StepDecision::AnswerOutcome(StepOutcome::Failed {
                reason: REFUSED_AFTER_COMPENSATION.into(),
            })
        }
        (Some(R::Compensated { .. }), StepCall::Compensate) => StepDecision::AnswerDone,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn succeeded() -> StepRecord {
        StepRecord::ActionSucceeded {
            resource: "bank".into(),
            acted_ms: 1,
        }
    }

    fn failed() -> StepRecord {
        StepRecord::ActionFailed {
            resource: "bank".into(),
            reason: "insufficient funds".into(),
            acted_ms: 2,
        }
    }

    fn compensated(action_applied: bool) -> StepRecord {
        StepRecord::Compensated {
            action_applied,
            compensated_ms: 3,
        }
    }

    #[test]
    fn every_recorded_state_and_call_has_the_documented_decision() {
        let refused = StepDecision::AnswerOutcome(StepOutcome::Failed {
            reason: "compensated".into(),
        });
        let cells: Vec<(Option<StepRecord>, StepCall, StepDecision)> = vec![
            (None, StepCall::Act, StepDecision::RunAction),
            (
                None,
                StepCall::Compensate,
                StepDecision::RecordNullCompensation,
            ),
            (
                Some(succeeded()),
                StepCall::Act,
                StepDecision::AnswerOutcome(StepOutcome::Succeeded),
            ),
            (
                Some(succeeded()),
                StepCall::Compensate,
                StepDecision::RunCompensation,
            ),
            (
                Some(failed()),
                StepCall::Act,
                StepDecision::AnswerOutcome(StepOutcome::Failed {
                    reason: "insufficient funds".into(),
                }),
            ),
            (
                Some(failed()),
                StepCall::Compensate,
                StepDecision::RecordNullCompensation,
            ),
            (Some(compensated(true)), StepCall::Act, refused.clone()),
            (
                Some(compensated(true)),
                StepCall::Compensate,
                StepDecision::AnswerDone,
            ),
            (Some(compensated(false)), StepCall::Act, refused),
            (
                Some(compensated(false)),
                StepCall::Compensate,
                StepDecision::AnswerDone,
            ),
        ];
        for (recorded, call, expected) in cells {
            assert_eq!(
                decide(recorded.as_ref(), call),
                expected,
                "recorded {recorded:?}, call {call:?}"
            );
        }
    }

    /// What a participant would do: applies the decision to the record, as the participant
    /// does in its transaction, with the action answering `action_succeeds`.
    fn apply(
        record: &mut Option<StepRecord>,
        call: StepCall,
        action_succeeds: bool,
        ran: &mut Vec<&'static str>,
    ) {
        match decide(record.as_ref(), call) {
            StepDecision::RunAction => {
                ran.push("action");
                *record = Some(if action_succeeds {
                    succeeded()
                } else {
                    failed()
                });
            }
            StepDecision::RunCompensation => {
                ran.push("compensation");
                *record = Some(compensated(true));
            }
            StepDecision::RecordNullCompensation => *record = Some(compensated(false)),
            StepDecision::AnswerOutcome(_) | StepDecision::AnswerDone => {}
        }
    }

    /// Every sequence of up to five calls, delivered in any order and repeated: the action
    /// takes effect at most once, never after a compensation was answered; the compensation
    /// runs at most once, only after a succeeded action; a succeeded action that was
    /// compensated is undone exactly once.
    #[test]
    fn no_order_of_calls_runs_an_action_twice_or_after_its_compensation() {
        for action_succeeds in [true, false] {
            for len in 1..=5u32 {
                for bits in 0..(1u32 << len) {
                    let calls: Vec<StepCall> = (0..len)
                        .map(|i| {
                            if bits & (1 << i) == 0 {
                                StepCall::Act
                            } else {
                                StepCall::Compensate
                            }
                        })
                        .collect();
                    let mut record = None;
                    let mut ran = Vec::new();
                    let mut compensation_answered = false;
                    for &call in &calls {
                        let before = ran.len();
                        apply(&mut record, call, action_succeeds, &mut ran);
                        if compensation_answered {
                            assert_eq!(ran.len(), before, "{calls:?}: something ran late");
                        }
                        compensation_answered |= call == StepCall::Compensate;
                    }
                    let actions = ran.iter().filter(|r| **r == "action").count();
                    let compensations = ran.iter().filter(|r| **r == "compensation").count();
                    assert!(actions <= 1, "{calls:?}: {ran:?}");
                    assert!(compensations <= actions, "{calls:?}: {ran:?}");
                    if compensations == 1 {
                        assert!(action_succeeds, "{calls:?}: undid a failed action");
                        assert_eq!(ran, ["action", "compensation"], "{calls:?}");
                    }
                    if compensation_answered && actions == 1 && action_succeeds {
                        assert_eq!(compensations, 1, "{calls:?}: applied and never undone");
                    }
                }
            }
        }
    }
}
