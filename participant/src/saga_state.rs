//! A saga as the coordinator reports it: its state ([`SagaState`]) and its changes
//! ([`SagaChange`]), as domain types of the SDK.
//!
//! The client reads them (`get_saga`, `wait`, `watch`) and a [`crate::SagaCallbackHandler`]
//! is handed one; both receive them as prost messages (`tandem.v1.SagaState`,
//! `tandem.v1.SagaChange`) and convert them here, once, at the edge. The conversion checks
//! what the contract promises (known enum values, a well-formed saga id, `terminal` agreeing
//! with the phase, a FINISHED change carrying the final state, at most [`SAGA_STEPS_MAX`]
//! steps), so the code behind it never handles an unspecified phase.
//!
//! The types are serde-serialisable so that a service can store or print them (the bank
//! sample's callback log does both).

use serde::{Deserialize, Serialize};
use tandem_common::TxnId;
use tandem_proto::v1 as pb;

/// Most steps a saga may have (the contract's limit).
pub const SAGA_STEPS_MAX: usize = 32;

/// Where a saga is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaPhase {
    /// Actions are running.
    Running,
    /// A step failed (or an operator aborted): compensations are running, newest step first.
    Compensating,
    /// Terminal: every action succeeded.
    Completed,
    /// Terminal: a step failed and every attempted step was compensated.
    Compensated,
    /// Terminal: compensated after an operator aborted the saga.
    Aborted,
}

impl SagaPhase {
    /// Whether the saga can no longer change.
    pub fn is_terminal(self) -> bool {
        match self {
            SagaPhase::Running | SagaPhase::Compensating => false,
            SagaPhase::Completed | SagaPhase::Compensated | SagaPhase::Aborted => true,
        }
    }

    fn from_pb(value: i32) -> Result<Self, String> {
        match pb::SagaPhase::try_from(value) {
            Ok(pb::SagaPhase::Running) => Ok(SagaPhase::Running),
            Ok(pb::SagaPhase::Compensating) => Ok(SagaPhase::Compensating),
            Ok(pb::SagaPhase::Completed) => Ok(SagaPhase::Completed),
            Ok(pb::SagaPhase::Compensated) => Ok(SagaPhase::Compensated),
            Ok(pb::SagaPhase::Aborted) => Ok(SagaPhase::Aborted),
            Ok(pb::SagaPhase::Unspecified) | Err(_) => {
                Err(format!("saga phase {value} is not a known phase"))
            }
        }
    }
}

/// Where one step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepPhase {
    /// Waiting for the steps it depends on.
    Pending,
    /// Action sent (or waiting to be retried).
    Running,
    Succeeded,
    /// The action failed (a business failure, or its retries were exhausted).
    Failed,
    Compensating,
    Compensated,
    /// Never attempted: the saga was compensated before the step could start.
    Skipped,
}

impl StepPhase {
    fn from_pb(value: i32) -> Result<Self, String> {
        match pb::StepPhase::try_from(value) {
            Ok(pb::StepPhase::Pending) => Ok(StepPhase::Pending),
            Ok(pb::StepPhase::Running) => Ok(StepPhase::Running),
            Ok(pb::StepPhase::Succeeded) => Ok(StepPhase::Succeeded),
            Ok(pb::StepPhase::Failed) => Ok(StepPhase::Failed),
            Ok(pb::StepPhase::Compensating) => Ok(StepPhase::Compensating),
            Ok(pb::StepPhase::Compensated) => Ok(StepPhase::Compensated),
            Ok(pb::StepPhase::Skipped) => Ok(StepPhase::Skipped),
            Ok(pb::StepPhase::Unspecified) | Err(_) => {
                Err(format!("step phase {value} is not a known phase"))
            }
        }
    }
}

/// One step's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepState {
    /// The step's name in the saga.
    pub name: String,
    pub phase: StepPhase,
    /// How many times the action has been sent.
    pub action_attempts: u32,
    /// How many times the compensation has been sent.
    pub compensation_attempts: u32,
    /// The last error seen for the step (a transport error or a business failure's reason);
    /// empty if none.
    pub last_error: String,
}

/// How a terminal saga ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SagaOutcome {
    /// Every action succeeded.
    Completed,
    /// `failed_step` failed for `reason`; every attempted step was compensated.
    Compensated { failed_step: String, reason: String },
    /// An operator aborted the saga (for `reason`); every attempted step was compensated.
    Aborted { reason: String },
}

/// A saga's state, with every step's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaState {
    pub id: TxnId,
    pub phase: SagaPhase,
    /// Whether `phase` is final (always `phase.is_terminal()`; kept as the contract has it).
    pub terminal: bool,
    /// For a compensated saga, the step that failed; empty otherwise.
    pub failed_step: String,
    /// For a compensated saga, why its step failed; for an aborted one, the operator's
    /// reason; empty otherwise.
    pub reason: String,
    /// Every step, in the order the saga lists them.
    pub steps: Vec<StepState>,
    /// A compensation has failed many times in a row (it is still being retried).
    pub stuck: bool,
    /// The completion callback was acknowledged (false also when the saga has none).
    pub callback_delivered: bool,
    /// When the saga was accepted, in ms since the Unix epoch.
    pub accepted_ms: u64,
    /// Accepted while the coordinator held saga execution: no step starts until an operator
    /// resumes it (`tandem txn resume-sagas`).
    #[serde(default)]
    pub held: bool,
}

impl SagaState {
    /// How the saga ended; `None` while it is still running or compensating.
    pub fn outcome(&self) -> Option<SagaOutcome> {
        match self.phase {
            SagaPhase::Running | SagaPhase::Compensating => None,
            SagaPhase::Completed => Some(SagaOutcome::Completed),
            SagaPhase::Compensated => Some(SagaOutcome::Compensated {
                failed_step: self.failed_step.clone(),
                reason: self.reason.clone(),
            }),
            SagaPhase::Aborted => Some(SagaOutcome::Aborted {
                reason: self.reason.clone(),
            }),
        }
    }

    /// Converts the contract's message, checking what the contract promises. The message
    /// says what is wrong.
    pub(crate) fn from_pb(state: pb::SagaState) -> Result<Self, String> {
        let id = TxnId::parse(&state.saga_id).map_err(|e| format!("saga state: {e}"))?;
        let phase = SagaPhase::from_pb(state.phase)?;
        if state.terminal != phase.is_terminal() {
            return Err(format!(
                "saga {id}: terminal is {} but the phase is {phase:?}",
                state.terminal
            ));
        }
        if state.steps.len() > SAGA_STEPS_MAX {
            return Err(format!(
                "saga {id} reports {} steps; at most {SAGA_STEPS_MAX} are allowed",
                state.steps.len()
            ));
        }
        let steps = state
            .steps
            .into_iter()
            .map(|step| {
                Ok(StepState {
                    phase: StepPhase::from_pb(step.phase)
                        .map_err(|e| format!("saga {id}, step {:?}: {e}", step.name))?,
                    name: step.name,
                    action_attempts: step.action_attempts,
                    compensation_attempts: step.compensation_attempts,
                    last_error: step.last_error,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(SagaState {
            id,
            phase,
            terminal: state.terminal,
            failed_step: state.failed_step,
            reason: state.reason,
            steps,
            stuck: state.stuck,
            callback_delivered: state.callback_delivered,
            accepted_ms: state.accepted_ms,
            held: state.held,
        })
    }
}

/// What kind of change a [`SagaChange`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaChangeKind {
    /// The saga was accepted (durably).
    Accepted,
    /// A step's action was sent for the first time.
    StepStarted,
    StepSucceeded,
    /// A step's action failed (a business failure, or retries exhausted): compensation starts.
    StepFailed,
    /// A step's action got no answer and is sent again.
    StepRetried,
    /// A step's compensation was sent for the first time.
    CompensationStarted,
    StepCompensated,
    /// A step's compensation failed and is sent again.
    CompensationRetried,
    /// A compensation has failed many times in a row; it keeps being retried.
    Stuck,
    /// The saga is terminal; the change's `outcome` holds the final state. The last change.
    Finished,
}

impl SagaChangeKind {
    fn from_pb(value: i32) -> Result<Self, String> {
        match pb::SagaChangeKind::try_from(value) {
            Ok(pb::SagaChangeKind::Accepted) => Ok(SagaChangeKind::Accepted),
            Ok(pb::SagaChangeKind::StepStarted) => Ok(SagaChangeKind::StepStarted),
            Ok(pb::SagaChangeKind::StepSucceeded) => Ok(SagaChangeKind::StepSucceeded),
            Ok(pb::SagaChangeKind::StepFailed) => Ok(SagaChangeKind::StepFailed),
            Ok(pb::SagaChangeKind::StepRetried) => Ok(SagaChangeKind::StepRetried),
            Ok(pb::SagaChangeKind::CompensationStarted) => Ok(SagaChangeKind::CompensationStarted),
            Ok(pb::SagaChangeKind::StepCompensated) => Ok(SagaChangeKind::StepCompensated),
            Ok(pb::SagaChangeKind::CompensationRetried) => Ok(SagaChangeKind::CompensationRetried),
            Ok(pb::SagaChangeKind::Stuck) => Ok(SagaChangeKind::Stuck),
            Ok(pb::SagaChangeKind::Finished) => Ok(SagaChangeKind::Finished),
            Ok(pb::SagaChangeKind::Unspecified) | Err(_) => {
                Err(format!("saga change kind {value} is not a known kind"))
            }
        }
    }
}

/// One change of a saga, as `watch` streams them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaChange {
    /// 1, 2, 3, ... per saga, in the order the changes happened.
    pub seq: u64,
    /// When the change happened, in ms since the Unix epoch.
    pub at_ms: u64,
    pub kind: SagaChangeKind,
    /// The step the change is about; empty for changes of the whole saga.
    pub step: String,
    /// The attempt the change is about (for retries); 0 when it does not apply.
    pub attempt: u32,
    /// An error, a failure's reason, or other detail; may be empty.
    pub detail: String,
    /// The final state: always set on [`SagaChangeKind::Finished`], `None` on every other
    /// kind.
    pub outcome: Option<SagaState>,
}

impl SagaChange {
    /// Converts the contract's message, checking that a FINISHED change (and only it) carries
    /// a terminal state.
    pub(crate) fn from_pb(change: pb::SagaChange) -> Result<Self, String> {
        let kind = SagaChangeKind::from_pb(change.kind)?;
        let outcome = change.outcome.map(SagaState::from_pb).transpose()?;
        match (kind, &outcome) {
            (SagaChangeKind::Finished, Some(state)) if state.terminal => {}
            (SagaChangeKind::Finished, Some(_)) => {
                return Err(format!(
                    "saga change {}: FINISHED carries a non-terminal state",
                    change.seq
                ))
            }
            (SagaChangeKind::Finished, None) => {
                return Err(format!(
                    "saga change {}: FINISHED carries no final state",
                    change.seq
                ))
            }
            (_, _) => {}
        }
        Ok(SagaChange {
            seq: change.seq,
            at_ms: change.at_ms,
            kind,
            step: change.step,
            attempt: change.attempt,
            detail: change.detail,
            outcome: if kind == SagaChangeKind::Finished {
                outcome
            } else {
                None
            },
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const SAGA: &str = "1763850000000-saga1";

    pub(crate) fn pb_state(phase: pb::SagaPhase, terminal: bool) -> pb::SagaState {
        pb::SagaState {
            saga_id: SAGA.into(),
            phase: phase as i32,
            terminal,
            failed_step: "credit".into(),
            reason: "account closed".into(),
            steps: vec![
                pb::StepState {
                    name: "debit".into(),
                    phase: pb::StepPhase::Compensated as i32,
                    action_attempts: 1,
                    compensation_attempts: 2,
                    last_error: "unavailable".into(),
                },
                pb::StepState {
                    name: "credit".into(),
                    phase: pb::StepPhase::Failed as i32,
                    action_attempts: 1,
                    compensation_attempts: 0,
                    last_error: "account closed".into(),
                },
            ],
            stuck: false,
            callback_delivered: true,
            accepted_ms: 1_763_850_000_123,
            held: false,
        }
    }

    #[test]
    fn saga_states_convert_from_the_contract() {
        let state =
            SagaState::from_pb(pb_state(pb::SagaPhase::Compensated, true)).expect("well-formed");
        assert_eq!(state.id.as_str(), SAGA);
        assert_eq!(state.phase, SagaPhase::Compensated);
        assert_eq!(
            state.outcome(),
            Some(SagaOutcome::Compensated {
                failed_step: "credit".into(),
                reason: "account closed".into()
            })
        );
        assert_eq!(
            state.steps[0],
            StepState {
                name: "debit".into(),
                phase: StepPhase::Compensated,
                action_attempts: 1,
                compensation_attempts: 2,
                last_error: "unavailable".into(),
            }
        );
        assert_eq!(state.steps[1].phase, StepPhase::Failed);
        assert!(state.callback_delivered);
        let running = SagaState::from_pb(pb_state(pb::SagaPhase::Running, false)).unwrap();
        assert_eq!(running.outcome(), None);
    }

    #[test]
    fn malformed_saga_states_are_refused_with_the_reason() {
        let unspecified = pb_state(pb::SagaPhase::Unspecified, false);
        assert!(SagaState::from_pb(unspecified)
            .unwrap_err()
            .contains("not a known phase"));
        let mut unknown = pb_state(pb::SagaPhase::Completed, true);
        unknown.phase = 99;
        assert!(SagaState::from_pb(unknown)
            .unwrap_err()
            .contains("not a known phase"));
        let disagreeing = pb_state(pb::SagaPhase::Completed, false);
        assert!(SagaState::from_pb(disagreeing)
            .unwrap_err()
            .contains("terminal is false"));
        let mut bad_id = pb_state(pb::SagaPhase::Completed, true);
        bad_id.saga_id = "nope".into();
        assert!(SagaState::from_pb(bad_id)
            .unwrap_err()
            .contains("not of the form"));
        let mut bad_step = pb_state(pb::SagaPhase::Completed, true);
        bad_step.steps[1].phase = 0;
        assert!(SagaState::from_pb(bad_step)
            .unwrap_err()
            .contains("step \"credit\""));
        let mut too_many = pb_state(pb::SagaPhase::Completed, true);
        too_many.steps = vec![too_many.steps[0].clone(); SAGA_STEPS_MAX + 1];
        assert!(SagaState::from_pb(too_many)
            .unwrap_err()
            .contains("at most 32"));
    }

    #[test]
    fn only_a_finished_change_carries_the_final_state() {
        let change = |kind: pb::SagaChangeKind, outcome: Option<pb::SagaState>| pb::SagaChange {
            seq: 7,
            at_ms: 1,
            kind: kind as i32,
            step: String::new(),
            attempt: 0,
            detail: String::new(),
            outcome,
        };
        let finished = SagaChange::from_pb(change(
            pb::SagaChangeKind::Finished,
            Some(pb_state(pb::SagaPhase::Completed, true)),
        ))
        .unwrap();
        assert_eq!(finished.kind, SagaChangeKind::Finished);
        assert_eq!(finished.outcome.unwrap().phase, SagaPhase::Completed);
        assert!(
            SagaChange::from_pb(change(pb::SagaChangeKind::Finished, None))
                .unwrap_err()
                .contains("no final state")
        );
        assert!(SagaChange::from_pb(change(
            pb::SagaChangeKind::Finished,
            Some(pb_state(pb::SagaPhase::Running, false))
        ))
        .unwrap_err()
        .contains("non-terminal"));
        let started = SagaChange::from_pb(change(
            pb::SagaChangeKind::StepStarted,
            Some(pb_state(pb::SagaPhase::Running, false)),
        ))
        .unwrap();
        assert_eq!(started.kind, SagaChangeKind::StepStarted);
        assert_eq!(started.outcome, None);
        assert!(
            SagaChange::from_pb(change(pb::SagaChangeKind::Unspecified, None))
                .unwrap_err()
                .contains("not a known kind")
        );
    }
}
